/*
 * vmm_probe: the smallest VMM, to prove inside a container that the device
 * nodes the plugin handed out are usable, and that others are not.
 *
 * Each argument is one step; each step prints one line, "<step>: ok ..." or
 * "<step>: FAILED ... errno N (text)", and the exit code is 0 only when every
 * step succeeded:
 *
 *   kvm         open /dev/kvm, KVM_GET_API_VERSION, KVM_CREATE_VM,
 *               KVM_CREATE_VCPU, then run a few real-mode guest instructions
 *               to HLT (KVM_RUN must exit with KVM_EXIT_HLT)
 *   tap=NAME    open /dev/net/tun and TUNSETIFF a tap named NAME: creates it
 *               (needs CAP_NET_ADMIN) or attaches to an existing tap whose
 *               owner is our uid (needs nothing more)
 *   vhost-net   open /dev/vhost-net and VHOST_SET_OWNER; skipped (and said so)
 *               when the node does not exist in this container
 *   open=PATH   open PATH read-write and report the result (isolation checks)
 *   id          print uid, gid and the effective capability set
 *
 * Built static (gcc -static) so that the image needs no libc of its own.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <linux/kvm.h>
#include <linux/vhost.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static int failed(const char *step, const char *what)
{
    int e = errno;
    printf("%s: FAILED %s: errno %d (%s)\n", step, what, e, strerror(e));
    return 1;
}

/* Guest code at guest physical 0x1000, run in real mode from there:
 *   mov ax, 0x1234 ; add ax, 1 ; hlt
 * KVM_RUN must come back with KVM_EXIT_HLT and ax = 0x1235. */
static const uint8_t guest_code[] = {0xb8, 0x34, 0x12, 0x05, 0x01, 0x00, 0xf4};
#define GUEST_ADDR 0x1000
#define GUEST_SIZE 0x1000

static int step_kvm(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return failed("kvm", "open /dev/kvm");
    int version = ioctl(kvm, KVM_GET_API_VERSION, 0);
    if (version < 0)
        return failed("kvm", "KVM_GET_API_VERSION");
    printf("kvm: ok open /dev/kvm, KVM_GET_API_VERSION %d\n", version);

    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        return failed("kvm", "KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, GUEST_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return failed("kvm", "mmap guest memory");
    memcpy(mem, guest_code, sizeof guest_code);
    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = GUEST_ADDR,
        .memory_size = GUEST_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        return failed("kvm", "KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        return failed("kvm", "KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        return failed("kvm", "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        return failed("kvm", "mmap kvm_run");
    printf("kvm: ok KVM_CREATE_VM, KVM_CREATE_VCPU\n");

    /* Real mode, code segment at 0: execution starts at cs:ip = 0:0x1000. */
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        return failed("kvm", "KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        return failed("kvm", "KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = GUEST_ADDR, .rflags = 0x2};  /* bit 1 is reserved, always 1 */
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        return failed("kvm", "KVM_SET_REGS");

    if (ioctl(vcpu, KVM_RUN, 0) < 0)
        return failed("kvm", "KVM_RUN");
    if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
        return failed("kvm", "KVM_GET_REGS");
    if (run->exit_reason != KVM_EXIT_HLT || (regs.rax & 0xffff) != 0x1235) {
        printf("kvm: FAILED KVM_RUN: exit reason %u, ax=0x%llx (expected KVM_EXIT_HLT, ax=0x1235)\n",
               run->exit_reason, (unsigned long long)(regs.rax & 0xffff));
        return 1;
    }
    printf("kvm: ok KVM_RUN exit reason KVM_EXIT_HLT, ax=0x%llx\n", (unsigned long long)(regs.rax & 0xffff));
    close(vcpu);
    close(vm);
    close(kvm);
    return 0;
}

static int step_tap(const char *name)
{
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return failed("tun", "open /dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    char what[64];
    snprintf(what, sizeof what, "TUNSETIFF %s", name);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        return failed("tun", what);
    printf("tun: ok open /dev/net/tun, TUNSETIFF %s\n", ifr.ifr_name);
    close(fd);
    return 0;
}

static int step_vhost_net(void)
{
    struct stat st;
    if (stat("/dev/vhost-net", &st) < 0 && errno == ENOENT) {
        printf("vhost-net: skipped, /dev/vhost-net does not exist here\n");
        return 0;
    }
    int fd = open("/dev/vhost-net", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return failed("vhost-net", "open /dev/vhost-net");
    if (ioctl(fd, VHOST_SET_OWNER, 0) < 0)
        return failed("vhost-net", "VHOST_SET_OWNER");
    printf("vhost-net: ok open /dev/vhost-net, VHOST_SET_OWNER\n");
    close(fd);
    return 0;
}

static int step_open(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    char what[300];
    snprintf(what, sizeof what, "open %s", path);
    if (fd < 0)
        return failed("open", what);
    printf("open: ok %s\n", what);
    close(fd);
    return 0;
}

static int step_id(void)
{
    char line[256], capeff[64] = "?";
    FILE *status = fopen("/proc/self/status", "r");
    while (status && fgets(line, sizeof line, status))
        if (sscanf(line, "CapEff: %63s", capeff) == 1)
            break;
    if (status)
        fclose(status);
    printf("id: uid=%d gid=%d CapEff=%s\n", (int)getuid(), (int)getgid(), capeff);
    return 0;
}

int main(int argc, char **argv)
{
    int failures = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);  /* one line at a time into the container log */
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "kvm") == 0)
            failures += step_kvm();
        else if (strncmp(arg, "tap=", 4) == 0)
            failures += step_tap(arg + 4);
        else if (strcmp(arg, "vhost-net") == 0)
            failures += step_vhost_net();
        else if (strncmp(arg, "open=", 5) == 0)
            failures += step_open(arg + 5);
        else if (strcmp(arg, "id") == 0)
            failures += step_id();
        else {
            printf("usage: FAILED unknown step %s\n", arg);
            failures++;
        }
    }
    return failures ? 1 : 0;
}
