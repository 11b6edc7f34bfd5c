"""A real container runtime for the tests: a private containerd, driven over CRI
the way the kubelet drives it.

- Containerd: its own root, state, socket, CNI and pod-log directories under one
  short temporary directory, and a config file written here. It shares only the
  kernel with the host: sandboxes' network namespaces (containerd 1.6 pins them
  under /var/run/netns) and cgroups (under a parent named after that directory)
  are its only traces outside it, and stop() removes them.
- build_image(): no registry is reachable, so the image is made here: a rootfs
  with the static busybox and the static probe (testdata/vmm_probe.c, compiled
  now), written as an OCI image archive and imported with `ctr images import`.
  The same image is the sandbox ("pause") image.
- RuntimeClient: runtime.v1.RuntimeService through the stubs generated from
  cri_runtime.proto (names and field numbers of k8s.io/cri-api).
- runtime_options(): ContainerAllocateResponses -> CRI devices, mounts, envs,
  annotations and CDI names, as the kubelet's device manager and kuberuntime do.
- security_context(), container_config(): a pod manifest's container -> CRI
  config, as kuberuntime does for the fields the manifests here use.

Nothing here asserts; the tests (test_runtime.py, test_runtime_daemonset.py,
test_kubelet.py) and bench_plugin.py --runtime and --kubelet use it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import grpc

import cri_runtime_pb2 as cri
import cri_runtime_pb2_grpc as cri_grpc
import deviceplugin_pb2 as dp

HERE = os.path.dirname(os.path.abspath(__file__))  # e2e/
PROJECT = os.path.dirname(HERE)  # the plugin, daemonset.yaml, Dockerfile
PROBE_SOURCE = os.path.join(HERE, "testdata", "vmm_probe.c")
CNI_PLUGIN = os.path.join(HERE, "testdata", "cni-kdp-pod-net")
IMAGE = "docker.io/library/kdp-runtime-test:1"
BUSYBOX = "/bin/busybox"
# The applets the tests' containers call; each is a symlink to busybox.
APPLETS = ("sh", "sleep", "cat", "ls", "mknod", "id", "echo", "true")
CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin works in
# Environment variable that turns "not installed" skips into failures (.ci/run sets it).
REQUIRE_ENV = "KDP_REQUIRE_RUNTIME"
WAIT_S = 20.0  # upper bound for anything the runtime should do in about a second
# Host directories containerd 1.6 and its CNI library use whatever the config
# says: pinned sandbox network namespaces, CNI result cache, shim sockets and
# runc state. Whatever a Containerd here made in them goes at stop(), and the
# directories too when they did not exist before.
NETNS_DIR = "/var/run/netns"
CNI_CACHE = "/var/lib/cni"
HOST_TRACES = (NETNS_DIR, CNI_CACHE, "/run/containerd")


# ---------------------------------------------------------------------------
# What the machine must have
# ---------------------------------------------------------------------------

def _is_static_elf(path: str) -> bool:
    """True when the ELF file has no PT_INTERP: it needs no dynamic loader,
    so it runs in an image that has no libc. (Debian's `busybox` package is
    dynamic; `busybox-static` is what the image needs.)"""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only, as the probe is
            return False
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def require_runtime(kvm: bool = True) -> None:
    """Skip (or, with KDP_REQUIRE_RUNTIME=1, fail) the calling test with one
    line when the runtime tests cannot run here. `kvm`: the test also needs
    /dev/kvm (that skip stays a skip: no machine can be made to have it)."""
    import pytest

    missing = missing_requirement()
    if missing:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{missing} ({REQUIRE_ENV}=1 makes the runtime tests mandatory)")
        pytest.skip(missing)
    if kvm:
        require_kvm()


def require_kvm() -> None:
    import pytest

    if not os.path.exists("/dev/kvm"):
        pytest.skip("this machine has no /dev/kvm (no hardware virtualisation exposed)")


def missing_requirement() -> str | None:
    """One line naming what to install, or None when the runtime tests can run."""
    if os.geteuid() != 0:
        return "the runtime tests run containerd and need root"
    for program, package in (("containerd", "containerd"), ("ctr", "containerd"),
                             ("runc", "runc"), ("gcc", "gcc"), ("ip", "iproute2"),
                             ("nsenter", "util-linux")):
        if shutil.which(program) is None:
            return f"{program} is not installed: apt-get install -y {package}"
    if not os.path.exists(BUSYBOX) or not _is_static_elf(BUSYBOX):
        return f"no static {BUSYBOX}: apt-get install -y busybox-static"
    return None


# ---------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------

def compile_probe(out_dir: str) -> str:
    path = os.path.join(out_dir, "vmm_probe")
    result = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", path, PROBE_SOURCE],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"gcc -static failed (static glibc: apt-get install -y libc6-dev):\n{result.stderr}")
    return path


def _oci_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _blob(blobs: dict[str, bytes], data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def _layer(probe: str) -> bytes:
    """The rootfs as one uncompressed tar layer."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_link(name: str, target: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for name in ("bin", "dev", "proc", "sys", "etc", "usr", "run", "var"):
            add_dir(name)
        add_dir("tmp", 0o1777)
        # The DaemonSet test runs the host's Python with the host's /usr mounted
        # read-only at /usr: its loader and libraries are found through /lib and
        # /lib64, which on a merged-/usr host are symlinks into /usr. Elsewhere
        # they are directories (and the test mounts the host's).
        for name in ("lib", "lib64"):
            host = os.path.join("/", name)
            if os.path.islink(host):
                add_link(name, os.readlink(host))
            elif os.path.isdir(host):
                add_dir(name)
        with open(BUSYBOX, "rb") as f:
            add_file("bin/busybox", f.read(), 0o755)
        for applet in APPLETS:
            add_link(f"bin/{applet}", "busybox")
        with open(probe, "rb") as f:
            add_file("probe", f.read(), 0o755)
        add_file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\nvmm:x:1000:1000:vmm:/:/bin/sh\n", 0o644)
        add_file("etc/group", b"root:x:0:\nvmm:x:1000:\n", 0o644)
    return buffer.getvalue()


def build_image(work_dir: str) -> str:
    """Write the test image as an OCI image archive; returns its path."""
    probe = compile_probe(work_dir)
    layer = _layer(probe)
    blobs: dict[str, bytes] = {}
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(blobs, layer)}
    config = {
        "architecture": _oci_arch(),
        "os": "linux",
        # As the sandbox ("pause") image it only has to stay alive; containerd
        # ends it with SIGKILL when the sandbox stops.
        "config": {"Entrypoint": ["/bin/sleep", "2147483647"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},  # uncompressed: diff_id = digest
    }
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_blob(blobs, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                     **_blob(blobs, json.dumps(manifest).encode()),
                     # ctr names the imported image after this annotation.
                     "annotations": {"io.containerd.image.name": IMAGE,
                                     "org.opencontainers.image.ref.name": IMAGE.rsplit(":", 1)[1]}}
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    archive = os.path.join(work_dir, "image.tar")
    with tarfile.open(archive, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(f"blobs/sha256/{digest.split(':', 1)[1]}", data)
    return archive


# ---------------------------------------------------------------------------
# containerd
# ---------------------------------------------------------------------------

def _mounts_under(prefixes: Iterable[str]) -> list[str]:
    """Mount points at or below any of `prefixes`, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def _umount(path: str) -> None:
    # MNT_DETACH: a busy mount (a shim still holding a rootfs) goes anyway.
    subprocess.run(["umount", "-l", path], capture_output=True, timeout=10)



def read_text(path: str, offset: int = 0) -> str:
    """A log file's text from `offset` on; "" while it does not exist."""
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return ""


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; reaped either
    way. Its exit code, or None if it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None

class Containerd:
    """A private containerd with the CRI plugin, on a socket of its own."""

    def __init__(self, name: str, device_ownership_from_security_context: bool) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"kdp{name}")
        self.root = os.path.join(self.dir, "root")
        self.state = os.path.join(self.dir, "state")
        self.socket = os.path.join(self.dir, "c.sock")
        self.pod_logs = os.path.join(self.dir, "pods")
        self.config_path = os.path.join(self.dir, "config.toml")
        self.log_path = os.path.join(self.dir, "containerd.log")
        # Every sandbox's cgroups go below this parent: stop() finds leftover
        # processes there, and removes the directories.
        self.cgroup_parent = "/" + os.path.basename(self.dir)
        self.ownership = device_ownership_from_security_context
        self.proc: subprocess.Popen | None = None
        self.client: RuntimeClient | None = None
        self.netns_paths: set[str] = set()
        self.network_name = "kdp-" + os.path.basename(self.dir)  # names its CNI cache files
        self.preexisting = {path for path in HOST_TRACES if os.path.exists(path)}
        # Namespaces to run it in (nsenter ...), for the cluster suite's nodes.
        self.command_prefix: list[str] = []

    def write_cni(self, cni_conf: str) -> str:
        """The pod network: its configuration in `cni_conf`; returns the
        directory of CNI plugins. Here the tests' own plugin (nothing on the host)."""
        cni_bin = os.path.join(self.dir, "cni-bin")
        os.makedirs(cni_bin, exist_ok=True)
        # containerd 1.6 runs "loopback" for every sandbox besides the configured network.
        for name in ("kdp-pod-net", "loopback"):
            shutil.copy(CNI_PLUGIN, os.path.join(cni_bin, name))
        with open(os.path.join(cni_conf, "10-kdp.conf"), "w") as f:
            json.dump({"cniVersion": "0.4.0", "name": self.network_name, "type": "kdp-pod-net"}, f)
        return cni_bin

    def write_config(self) -> None:
        cni_conf = os.path.join(self.dir, "cni-conf")
        os.makedirs(cni_conf, exist_ok=True)
        cni_bin = self.write_cni(cni_conf)
        cri_section = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""\
version = 2
root = "{self.root}"
state = "{self.state}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir}/opt"
[{cri_section}]
  sandbox_image = "{IMAGE}"
  # runc cannot lower oom_score_adj on this machine ("can't get final child's
  # PID from pipe"); this keeps containers at containerd's own value or above.
  restrict_oom_score_adj = true
  # Device nodes in containers owned by run_as_user/run_as_group instead of
  # the host node's owner: the setting non-root VMMs need.
  device_ownership_from_security_context = {str(self.ownership).lower()}
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
[{cri_section}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri_section}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri_section}.cni]
  bin_dir = "{cni_bin}"
  conf_dir = "{cni_conf}"
  max_conf_num = 1
"""
        with open(self.config_path, "w") as f:
            f.write(config)

    def start(self) -> None:
        self.write_config()
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*self.command_prefix, "containerd", "--config", self.config_path,
                                      "--log-level", "info"],
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.client = RuntimeClient(self.socket)
        deadline = time.monotonic() + WAIT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                self.client.stub.Version(cri.VersionRequest(version="v1"), timeout=1)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"containerd's CRI did not answer:\n{self.log()[-3000:]}")
                time.sleep(0.05)

    def log(self) -> str:
        return read_text(self.log_path)

    def import_image(self, archive: str) -> None:
        result = subprocess.run(
            ["ctr", "--address", self.socket, "-n", CRI_NAMESPACE, "images", "import", archive],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ctr images import failed: {result.stderr}")

    def stop(self) -> None:
        """Remove every sandbox, stop containerd by its pid, then clean what is
        left even if containerd had died: shims and container processes (found
        by our socket and our cgroup parent), mounts, netns files, cgroups."""
        if self.client is not None and self.proc is not None and self.proc.poll() is None:
            try:
                for sandbox in self.client.stub.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=10).items:
                    self.client.remove_sandbox(sandbox.id)
            except grpc.RpcError:
                pass
        if self.client is not None:
            self.client.close()
        if self.proc is not None:
            stop_process(self.proc)
        pids, ids = self._leftovers()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for point in _mounts_under([self.dir, *self.netns_paths]):
            _umount(point)
        for path in self.netns_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._remove_cgroups()
        self._remove_host_traces(ids)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_host_traces(self, ids: set[str]) -> None:
        """`ids`: sandboxes and containers containerd did not get to delete
        (it was killed): their runc state, shim socket and CNI cache files."""
        results = os.path.join(CNI_CACHE, "results")
        if os.path.isdir(results):
            for name in os.listdir(results):
                # <network>-<sandbox id>-<ifname>; the loopback network is containerd's own.
                if name.startswith(self.network_name + "-") or any(f"-{i}-" in name for i in ids):
                    os.unlink(os.path.join(results, name))
        for container_id in ids:
            shutil.rmtree(os.path.join("/run/containerd/runc", CRI_NAMESPACE, container_id), ignore_errors=True)
            # containerd 1.6 names a shim's socket by the hash of address/namespace/id.
            digest = hashlib.sha256(os.path.join(self.socket, CRI_NAMESPACE, container_id).encode()).hexdigest()
            try:
                os.unlink(os.path.join("/run/containerd/s", digest))
            except FileNotFoundError:
                pass
        for top in HOST_TRACES:
            if top in self.preexisting or not os.path.isdir(top):
                continue
            # Bottom-up, empty directories only: another containerd may still use one.
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass

    def _leftovers(self) -> tuple[set[int], set[str]]:
        """Processes of ours still running (shims, containers) and the ids of
        sandboxes and containers whose cgroups or shims are still there."""
        pids: set[int] = set()
        ids: set[str] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            # containerd-shim-runc-v2 -namespace k8s.io -id <sandbox id> -address <our socket>
            if b"-address" in argv and self.socket.encode() in argv:
                pids.add(int(entry))
                if b"-id" in argv[:-1]:
                    ids.add(argv[argv.index(b"-id") + 1].decode())
        # cgroup v2 has one tree, v1 one per controller (pids names every process).
        for controller in ("", "pids"):
            top = os.path.join("/sys/fs/cgroup", controller, self.cgroup_parent.lstrip("/"))
            for dirpath, _, files in os.walk(top):
                if dirpath != top:
                    ids.add(os.path.basename(dirpath))
                if "cgroup.procs" in files:
                    with open(os.path.join(dirpath, "cgroup.procs")) as f:
                        pids.update(int(line) for line in f if line.strip())
        return pids, ids

    def _remove_cgroups(self) -> None:
        roots = ["/sys/fs/cgroup"]
        if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # cgroup v1: one tree per controller
            roots = [os.path.join("/sys/fs/cgroup", c) for c in os.listdir("/sys/fs/cgroup")]
        for root in roots:
            top = os.path.join(root, self.cgroup_parent.lstrip("/"))
            if not os.path.isdir(top) or os.path.islink(root):
                continue
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass


def start_containerd(name: str, ownership: bool, image_archive: str) -> Containerd:
    """A started Containerd with the test image imported; stopped again if that fails."""
    containerd = Containerd(name, device_ownership_from_security_context=ownership)
    try:
        containerd.start()
        containerd.import_image(image_archive)
    except BaseException:
        containerd.stop()
        raise
    return containerd


# ---------------------------------------------------------------------------
# CRI
# ---------------------------------------------------------------------------

@dataclass
class Sandbox:
    id: str
    config: cri.PodSandboxConfig
    pid: int  # the sandbox ("pause") process, for its namespaces
    ip: str

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"


@dataclass
class Exited:
    exit_code: int
    reason: str
    lines: list[str] = field(default_factory=list)  # the container's log, stream tags removed


class RuntimeClient:
    """The kubelet's side of CRI, as far as the tests need it."""

    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.stub = cri_grpc.RuntimeServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def run_sandbox(self, containerd: Containerd, name: str, host_network: bool = False) -> Sandbox:
        uid = str(uuid.uuid4())
        log_dir = os.path.join(containerd.pod_logs, f"default_{name}_{uid}")
        os.makedirs(log_dir)
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="default"),
            hostname="" if host_network else name,
            log_directory=log_dir,
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=containerd.cgroup_parent,
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(
                        network=cri.NODE if host_network else cri.POD,
                        pid=cri.CONTAINER,  # the kubelet's default for a v1 pod
                    ),
                    seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault),
                ),
            ),
        )
        return self.start_sandbox(containerd, config)

    def start_sandbox(self, containerd: Containerd, config: cri.PodSandboxConfig) -> Sandbox:
        before = set(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else set()
        try:
            sandbox_id = self.stub.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                                 timeout=WAIT_S).pod_sandbox_id
        finally:
            # The tests make one sandbox at a time: a namespace that appeared
            # meanwhile is this one's, even when RunPodSandbox failed after
            # pinning it. stop() unmounts and removes it if containerd did not.
            if os.path.isdir(NETNS_DIR):
                # (realpath: /var/run is /run, the name mountinfo uses)
                containerd.netns_paths.update(os.path.realpath(os.path.join(NETNS_DIR, n))
                                              for n in set(os.listdir(NETNS_DIR)) - before)
        status = self.stub.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True),
                                            timeout=WAIT_S)
        info = json.loads(status.info.get("info", "{}"))
        return Sandbox(sandbox_id, config, int(info.get("pid", 0)), status.status.network.ip)

    def remove_sandbox(self, sandbox_id: str) -> None:
        # The kubelet stops a sandbox (its containers are killed) before removing it.
        self.stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=WAIT_S)
        self.stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=WAIT_S)

    def create_and_start(self, sandbox: Sandbox, config: cri.ContainerConfig) -> str:
        container_id = self.stub.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=sandbox.id, config=config, sandbox_config=sandbox.config), timeout=WAIT_S).container_id
        self.stub.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=WAIT_S)
        return container_id

    def status(self, container_id: str) -> cri.ContainerStatus:
        return self.stub.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id), timeout=WAIT_S).status

    def wait_exit(self, container_id: str, timeout: float = WAIT_S) -> Exited:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(container_id)
            if status.state == cri.CONTAINER_EXITED:
                return Exited(status.exit_code, status.reason, read_log(status.log_path))
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {status.metadata.name} still {cri.ContainerState.Name(status.state)}"
                                   f" after {timeout} s; log: {read_log(status.log_path)}")
            time.sleep(0.02)

    def run_to_exit(self, sandbox: Sandbox, config: cri.ContainerConfig) -> Exited:
        container_id = self.create_and_start(sandbox, config)
        try:
            return self.wait_exit(container_id)
        finally:
            self.stub.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id), timeout=WAIT_S)


def read_log(path: str) -> list[str]:
    """A CRI log file's lines: each is "<RFC3339 time> <stream> <P|F> <text>";
    P (partial) pieces join the following ones up to an F (full) line."""
    lines, partial = [], ""
    try:
        with open(path, errors="replace") as f:
            for raw in f:
                parts = raw.rstrip("\n").split(" ", 3)
                if len(parts) < 3:
                    continue
                text = parts[3] if len(parts) == 4 else ""
                if parts[2] == "P":
                    partial += text
                else:
                    lines.append(partial + text)
                    partial = ""
    except FileNotFoundError:
        pass
    return lines


# ---------------------------------------------------------------------------
# The kubelet's translations
# ---------------------------------------------------------------------------

@dataclass
class RunOptions:
    """What the kubelet's device manager hands kuberuntime for one container
    (kubecontainer.RunContainerOptions), already in CRI types."""
    devices: list[cri.Device] = field(default_factory=list)
    mounts: list[cri.Mount] = field(default_factory=list)
    envs: list[cri.KeyValue] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    cdi_devices: list[cri.CDIDevice] = field(default_factory=list)


def runtime_options(responses: list[dp.ContainerAllocateResponse], runtime_supports_cdi: bool) -> RunOptions:
    """The kubelet's GetDeviceRunContainerOptions, then kuberuntime's makeDevices:
    the responses of every resource the container asked for, merged; an entry
    already there for the same container path (or env name, annotation, CDI
    name) with the same value is dropped, a different one is an error, as the
    kubelet does. Each DeviceSpec becomes a CRI Device field for field.

    CDI names go in ContainerConfig.CDI_devices only where the runtime applies
    them (containerd 1.7 with enable_cdi, 2.0, CRI-O); containerd 1.6 does not
    know that field, so for it the DeviceSpecs alone must do (and do)."""
    options = RunOptions()
    devices: dict[str, cri.Device] = {}
    mounts: dict[str, cri.Mount] = {}
    envs: dict[str, str] = {}
    cdi: dict[str, None] = {}
    for response in responses:
        for spec in response.devices:
            device = cri.Device(container_path=spec.container_path, host_path=spec.host_path,
                                permissions=spec.permissions)
            known = devices.setdefault(spec.container_path, device)
            if known.host_path != spec.host_path:
                raise ValueError(f"container device {spec.container_path} has conflicting host devices "
                                 f"{known.host_path} and {spec.host_path}")
        for spec in response.mounts:
            mount = cri.Mount(container_path=spec.container_path, host_path=spec.host_path, readonly=spec.read_only)
            known = mounts.setdefault(spec.container_path, mount)
            if known.host_path != spec.host_path:
                raise ValueError(f"container mount {spec.container_path} has conflicting host paths")
        for key, value in response.envs.items():
            if envs.setdefault(key, value) != value:
                raise ValueError(f"environment variable {key} has conflicting values")
        for key, value in response.annotations.items():
            if options.annotations.setdefault(key, value) != value:
                raise ValueError(f"annotation {key} has conflicting values")
        for name in response.cdi_devices:
            cdi.setdefault(name.name)
    options.devices = list(devices.values())
    options.mounts = list(mounts.values())
    options.envs = [cri.KeyValue(key=k, value=v) for k, v in envs.items()]
    if runtime_supports_cdi:
        options.cdi_devices = [cri.CDIDevice(name=n) for n in cdi]
    return options


def security_context(manifest: dict[str, Any]) -> cri.LinuxContainerSecurityContext:
    """A container's securityContext (Kubernetes API, as parsed YAML) as the
    kubelet's determineEffectiveSecurityContext writes it for CRI, for the fields
    these manifests use. allowPrivilegeEscalation: false is no_new_privs; a
    seccompProfile RuntimeDefault is the runtime's default profile; capability
    names go as they are (CRI accepts them with or without "CAP_")."""
    sc = manifest or {}
    out = cri.LinuxContainerSecurityContext(
        privileged=bool(sc.get("privileged", False)),
        readonly_rootfs=bool(sc.get("readOnlyRootFilesystem", False)),
        # Unset means true for the API (unless privileged or CAP_SYS_ADMIN), but
        # the kubelet then sets no_new_privs false: only an explicit false sets it.
        no_new_privs=sc.get("allowPrivilegeEscalation") is False,
        namespace_options=cri.NamespaceOption(network=cri.POD, pid=cri.CONTAINER),
    )
    caps = sc.get("capabilities") or {}
    out.capabilities.add_capabilities.extend(caps.get("add") or [])
    out.capabilities.drop_capabilities.extend(caps.get("drop") or [])
    if "runAsUser" in sc:
        out.run_as_user.value = int(sc["runAsUser"])
    if "runAsGroup" in sc:
        out.run_as_group.value = int(sc["runAsGroup"])
    profile = (sc.get("seccompProfile") or {}).get("type")
    if profile == "RuntimeDefault":
        out.seccomp.profile_type = cri.SecurityProfile.RuntimeDefault
    elif profile in (None, "Unconfined"):
        # The API's unset seccomp is Unconfined (kubelet: no profile).
        out.seccomp.profile_type = cri.SecurityProfile.Unconfined
    else:
        raise ValueError(f"seccompProfile {profile!r} is not handled by the tests' translation")
    return out


def cpu_resources(resources: dict[str, Any]) -> cri.LinuxContainerResources:
    """The kubelet's CPU translation (cgroup v1 and v2 alike): shares from the
    request (1024 per core), CFS quota from the limit over a 100 ms period;
    memory limit in bytes. Only the units these manifests use: m, Mi, Gi."""
    def cpu_millis(value: str) -> int:
        return int(value[:-1]) if value.endswith("m") else int(float(value) * 1000)

    def memory_bytes(value: str) -> int:
        units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
        return int(value[:-2]) * units[value[-2:]] if value[-2:] in units else int(value)

    requests = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    out = cri.LinuxContainerResources(cpu_period=100_000)
    request = requests.get("cpu", limits.get("cpu"))
    out.cpu_shares = max(2, cpu_millis(str(request)) * 1024 // 1000) if request else 2
    if "cpu" in limits:
        out.cpu_quota = cpu_millis(str(limits["cpu"])) * out.cpu_period // 1000
    if "memory" in limits:
        out.memory_limit_in_bytes = memory_bytes(str(limits["memory"]))
    return out


def socket_in_netns(netns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket that belongs to another network namespace (a pod's), made
    by a short thread that joins that namespace first: setns(CLONE_NEWNET)
    moves only the calling thread, and a socket keeps the namespace it was made
    in. This is how the tests reach a pod's port from outside, as the kubelet
    does on the node."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as e:  # handed to the caller
            made.append(e)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def http_get(netns: str, host: str, port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    """GET http://host:port/path from inside `netns`: the kubelet's httpGet probe
    (status 200-399 is success)."""
    with socket_in_netns(netns) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.37\r\n"
                     f"Accept: */*\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


# ---------------------------------------------------------------------------
# The plugin on the node, against the kubelet stand-in
# ---------------------------------------------------------------------------

class NodePlugin:
    """kvm_device_plugin.py run on the host with --host-root / (so its answers
    name the node's real device nodes) against fake_kubelet.FakeKubelet in a
    short temporary device-plugins directory; Allocate goes through the
    stand-in, as the kubelet's admission does."""

    DEVICES = ("kvm", "tun", "vhost-net")
    DOMAIN = "devices.kubevirt.io"

    def __init__(self, count: int = 8) -> None:
        from fake_kubelet import FakeKubelet  # the tests' stand-in, not needed by the image code above

        self.dir = tempfile.mkdtemp(prefix="kdpn")
        self.plugin_dir = os.path.join(self.dir, "dp")
        self.count = count
        self.kubelet = FakeKubelet(self.plugin_dir)
        self.log_path = os.path.join(self.dir, "plugin.log")
        self.proc: subprocess.Popen | None = None
        self._next = 0

    def resource(self, name: str) -> str:
        return f"{self.DOMAIN}/{name}"

    def start(self) -> None:
        self.kubelet.start()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(PROJECT, "kvm_device_plugin.py"), "--plugin-dir", self.plugin_dir,
                 "--host-root", "/", "--count", str(self.count)],
                stdout=log, stderr=log, cwd=PROJECT,
            )
        if not self.kubelet.wait_registered([self.resource(n) for n in self.DEVICES], self.count, timeout=WAIT_S):
            raise RuntimeError(f"the plugin did not register:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def healthy(self, name: str) -> bool:
        return set(self.kubelet.state(self.resource(name)).devices.values()) == {"Healthy"}

    def allocate(self, name: str) -> dp.ContainerAllocateResponse:
        """One container's Allocate for one device of `name`, as the kubelet
        makes it: one ContainerAllocateRequest; it uses container_responses[0]."""
        self._next += 1
        device_id = f"{name}{self._next % self.count}"
        response = self.kubelet.allocate(self.resource(name), [[device_id]])
        return response.container_responses[0]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.kubelet.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# The DaemonSet's pod, from daemonset.yaml, as the kubelet would run it
# ---------------------------------------------------------------------------

DAEMONSET_YAML = os.path.join(PROJECT, "daemonset.yaml")
DOCKERFILE = os.path.join(PROJECT, "Dockerfile")
KUBELET_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
APP_DIR = "/app"  # where the Dockerfile puts the project
# The kubelet's oom_score_adj for a pod of priority system-node-critical (and
# system-cluster-critical); restrict_oom_score_adj raises it to containerd's own.
CRITICAL_POD_OOM_SCORE_ADJ = -997


def load_daemonset(path: str = DAEMONSET_YAML) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        for document in yaml.safe_load_all(f):
            if document and document.get("kind") == "DaemonSet":
                return document
    raise ValueError(f"{path} has no DaemonSet")


def dockerfile_env(path: str = DOCKERFILE) -> dict[str, str]:
    """The Dockerfile's ENV (KEY=VALUE form): what the real image's config
    carries, and a runtime merges under the container's own env."""
    import shlex

    env: dict[str, str] = {}
    with open(path) as f:
        text = f.read().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].upper() == "ENV":
            env.update(word.split("=", 1) for word in words[1:] if "=" in word)
    return env


def host_python_mounts() -> tuple[list[cri.Mount], str]:
    """Mounts that give a container this process's Python and its virtual
    environment, read-only at their own paths, and the PATH that finds the
    venv's `python` first. The real image has its own Python; here the host's
    stands in for it (the point is the security context and the mounts).

    The venv's python is a symlink to the base interpreter (pyenv's, or
    /usr/bin's); both trees are mounted, and the host's /usr for the C library
    and the interpreter's shared libraries (through the image's /lib and /lib64,
    symlinks into /usr on a merged-/usr host; elsewhere the host's are mounted)."""
    venv = os.path.realpath(sys.prefix)
    base = os.path.realpath(sys.base_prefix)
    paths = ["/usr"]
    for name in ("/lib", "/lib64"):
        if os.path.isdir(name) and not os.path.islink(name):
            paths.append(name)
    for tree in (base, venv):
        if not any(tree == p or tree.startswith(p + "/") for p in paths):
            paths.append(tree)
    mounts = [cri.Mount(container_path=p, host_path=p, readonly=True) for p in paths]
    return mounts, f"{os.path.join(venv, 'bin')}:/usr/local/bin:/usr/bin:/bin"


def _pod_template(daemonset: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    template = daemonset["spec"]["template"]
    spec = template["spec"]
    return template, spec, spec["containers"][0]


def daemonset_sandbox_config(daemonset: dict[str, Any], containerd: Containerd, name: str) -> cri.PodSandboxConfig:
    """The pod's sandbox as the kubelet configures it: metadata, labels and
    annotations from the template; the pod's own network, IPC namespaces
    (hostNetwork and hostIPC unset) and PID namespace per container (hostPID
    unset); the sandbox's seccomp from the pod-level securityContext (none here: Unconfined)."""
    template, spec, _ = _pod_template(daemonset)
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    uid = str(uuid.uuid4())
    namespace = daemonset["metadata"].get("namespace", "default")
    log_dir = os.path.join(containerd.pod_logs, f"{namespace}_{name}_{uid}")
    os.makedirs(log_dir)
    profile = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=namespace),
        hostname=name,
        log_directory=log_dir,
        labels=template["metadata"].get("labels", {}),
        annotations=template["metadata"].get("annotations", {}),
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=containerd.cgroup_parent,
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(network=cri.POD, pid=cri.CONTAINER, ipc=cri.POD),
                seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault
                                            if profile == "RuntimeDefault" else cri.SecurityProfile.Unconfined),
            ),
        ),
    )


def daemonset_container_config(daemonset: dict[str, Any], plugin_dir: str,
                               cpu_limit: str | None = "manifest") -> cri.ContainerConfig:
    """The plugin's container from the manifest's pod template, as kuberuntime
    builds it: command and args as they are; env (the image's env under the
    manifest's, PATH to find the stand-in Python); securityContext; each
    volumeMount over its hostPath volume (the kubelet's device-plugins
    directory replaced by the stand-in's `plugin_dir`; the node's /dev is the
    real one); resources. `cpu_limit` "manifest" keeps the manifest's CPU
    limit, None drops it, any other quantity replaces it (for measuring)."""
    _, spec, container = _pod_template(daemonset)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts: list[cri.Mount] = []
    for volume_mount in container.get("volumeMounts", []):
        host_path = volumes[volume_mount["name"]]["hostPath"]
        path = plugin_dir if host_path["path"] == KUBELET_PLUGIN_DIR else host_path["path"]
        if host_path.get("type") == "Directory" and not os.path.isdir(path):
            # The kubelet refuses to start the pod: hostPath type check.
            raise FileNotFoundError(f"hostPath {host_path['path']} ({path}) is not a directory")
        mounts.append(cri.Mount(container_path=volume_mount["mountPath"], host_path=path,
                                readonly=bool(volume_mount.get("readOnly", False)),
                                propagation=cri.PROPAGATION_PRIVATE))
    python_mounts, path_env = host_python_mounts()
    # The project at /app, as the Dockerfile copies it there.
    mounts += python_mounts + [cri.Mount(container_path=APP_DIR, host_path=PROJECT, readonly=True)]

    env = {**dockerfile_env(), "PATH": path_env}
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    resources = dict(container.get("resources") or {})
    if cpu_limit != "manifest":
        limits = dict(resources.get("limits") or {})
        if cpu_limit is None:
            limits.pop("cpu", None)
        else:
            limits["cpu"] = cpu_limit
        resources["limits"] = limits
    linux_resources = cpu_resources(resources)
    linux_resources.oom_score_adj = CRITICAL_POD_OOM_SCORE_ADJ
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=container["name"]),
        image=cri.ImageSpec(image=IMAGE),
        command=container.get("command", []),
        args=[str(a) for a in container.get("args", [])],
        envs=[cri.KeyValue(key=k, value=v) for k, v in env.items()],
        mounts=mounts,
        labels={"io.kubernetes.container.name": container["name"]},
        log_path=f"{container['name']}/0.log",
        linux=cri.LinuxContainerConfig(resources=linux_resources,
                                       security_context=security_context(container.get("securityContext"))),
    )


def container_port(daemonset: dict[str, Any], name: str) -> int:
    _, _, container = _pod_template(daemonset)
    return next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == name)


def probe_path_and_port(daemonset: dict[str, Any], probe: str) -> tuple[str, int]:
    """An httpGet probe's path and port number (a named port resolved)."""
    _, _, container = _pod_template(daemonset)
    http_get = container[probe]["httpGet"]
    port = http_get["port"]
    return http_get["path"], port if isinstance(port, int) else container_port(daemonset, port)


def grace_period(daemonset: dict[str, Any]) -> int:
    _, spec, _ = _pod_template(daemonset)
    return int(spec.get("terminationGracePeriodSeconds", 30))  # the API's default


@dataclass
class PluginPod:
    sandbox: Sandbox
    container_id: str
    started_at: float  # time.monotonic() just before StartContainer
    start_returned_at: float  # and when it returned (runc has started the process)


def start_daemonset_pod(containerd: Containerd, plugin_dir: str, name: str,
                        cpu_limit: str | None = "manifest") -> PluginPod:
    """RunPodSandbox, CreateContainer, StartContainer for the manifest's pod."""
    assert containerd.client is not None
    client = containerd.client
    daemonset = load_daemonset()
    sandbox_config = daemonset_sandbox_config(daemonset, containerd, name)
    sandbox = client.start_sandbox(containerd, sandbox_config)
    try:
        config = daemonset_container_config(daemonset, plugin_dir, cpu_limit)
        container_id = client.stub.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=sandbox.id, config=config, sandbox_config=sandbox_config), timeout=WAIT_S).container_id
        started_at = time.monotonic()
        client.stub.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=WAIT_S)
        start_returned_at = time.monotonic()
    except BaseException:
        client.remove_sandbox(sandbox.id)
        raise
    return PluginPod(sandbox, container_id, started_at, start_returned_at)


# ---------------------------------------------------------------------------
# bench_plugin.py --runtime
# ---------------------------------------------------------------------------

# CPU limits measured besides the manifest's own resources: "manifest" is the
# pod as daemonset.yaml says, None the same without any CPU limit.
BENCH_CPU_LIMITS: dict[str, str | None] = {"manifest": "manifest", "cpu_limit_200m": "200m",
                                           "cpu_limit_500m": "500m", "cpu_limit_1": "1",
                                           "no_cpu_limit": None}


def bench_startup(runs: int) -> dict[str, list[float]]:
    """StartContainer of daemonset.yaml's pod -> every resource's first full
    list at the kubelet stand-in (its reader thread's timestamp), in ms, `runs`
    times per CPU limit, interleaved so that drift hits every variant alike.
    Each run gets a fresh stand-in directory; the pod is stopped with SIGTERM
    and removed after each."""
    from fake_kubelet import FakeKubelet

    daemonset = load_daemonset()
    args = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
    count = int(args[args.index("--count") + 1])
    names = [f"{NodePlugin.DOMAIN}/{n}" for n in NodePlugin.DEVICES]
    work = tempfile.mkdtemp(prefix="kdpimg")
    containerd: Containerd | None = None
    figures: dict[str, list[float]] = {key: [] for key in BENCH_CPU_LIMITS}
    figures["start_rpc"] = []  # StartContainer's own duration, every variant
    try:
        containerd = start_containerd("b", False, build_image(work))
        assert containerd.client is not None
        for run in range(runs):
            for key, cpu_limit in BENCH_CPU_LIMITS.items():
                node_dir = tempfile.mkdtemp(prefix="kdpbr")
                plugin_dir = os.path.join(node_dir, "dp")
                kubelet = FakeKubelet(plugin_dir)
                kubelet.start()
                pod = None
                try:
                    pod = start_daemonset_pod(containerd, plugin_dir, f"kdp-bench-{run}-{key.replace('_', '-')}",
                                              cpu_limit)
                    if not kubelet.wait_registered(names, count, timeout=WAIT_S):
                        raise RuntimeError(f"{key}: not registered within {WAIT_S} s")
                    done = max(kubelet.state(n).last_message_at for n in names)
                    figures[key].append(round((done - pod.started_at) * 1000, 1))
                    figures["start_rpc"].append(round((pod.start_returned_at - pod.started_at) * 1000, 1))
                    containerd.client.stub.StopContainer(cri.StopContainerRequest(
                        container_id=pod.container_id, timeout=grace_period(daemonset)), timeout=60)
                finally:
                    if pod is not None:
                        containerd.client.remove_sandbox(pod.sandbox.id)
                    kubelet.stop()
                    shutil.rmtree(node_dir, ignore_errors=True)
    finally:
        if containerd is not None:
            containerd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return figures


def bench_main(quick: bool) -> int:
    """bench_plugin.py --runtime: a table, then one JSON object as the last line."""
    import statistics

    missing = missing_requirement()
    if missing:
        print(f"bench --runtime: {missing}", file=sys.stderr)
        return 1
    runs = 3 if quick else 7
    figures = bench_startup(runs)
    limits = (load_daemonset()["spec"]["template"]["spec"]["containers"][0].get("resources") or {}).get("limits", {})
    print(f"StartContainer -> every resource registered, daemonset.yaml's pod in containerd, {runs} runs each (ms)")
    print(f"{'variant':<18} {'median':>8} {'min':>8} {'max':>8}  runs")
    results: dict[str, Any] = {}
    for key, values in figures.items():
        label = f"manifest (cpu limit {limits.get('cpu', 'none')})" if key == "manifest" else key
        print(f"{label:<18} {statistics.median(values):>8.1f} {min(values):>8.1f} {max(values):>8.1f}  {values}")
        name = "startup_ms_in_runtime" if key == "manifest" else f"startup_ms_in_runtime_{key}"
        results[name] = round(statistics.median(values), 1)
    print(json.dumps(results), flush=True)
    return 0
