#!/usr/bin/env python3
"""A Kubernetes device plugin for /dev/kvm, /dev/net/tun and /dev/vhost-net.

Why it exists
-------------
A pod that runs virtual machines (KubeVirt's virt-launcher, Kata, Firecracker
runners, CI sandboxes) needs a few device nodes. Without a device plugin the
only way to get them is a privileged container. With it, the pod asks for
``devices.kubevirt.io/kvm: 1`` in its limits, the scheduler places it only on
nodes that advertise the resource, and the kubelet adds the device node to the
container's device cgroup and /dev, and nothing else.

How it talks to the kubelet (Device Plugin API v1beta1)
-------------------------------------------------------
For every resource (kvm, tun, vhost-net, ...) the plugin:

1. serves the ``v1beta1.DevicePlugin`` gRPC service on its own unix socket in
   the kubelet's device-plugins directory (one server per resource, because a
   ListAndWatch request does not say which resource it is for);
2. then calls ``v1beta1.Registration/Register`` on ``kubelet.sock`` in that
   directory, naming its socket file and resource. Since kubelet 1.25 the
   kubelet dials the plugin back and calls GetDevicePluginOptions before
   Register returns, which is why the server must already be running;
3. answers the kubelet's ListAndWatch stream with the FULL device list, again
   after every health change (a device missing from a message is dropped);
4. answers Allocate at pod admission with the device node to put into the
   container.

When the kubelet restarts it deletes every socket in the directory and never
dials a plugin again by itself: the plugin has to notice and register anew.
That, and telling the truth about whether a device is really there, is most of
this file.

The file reads top to bottom: constants and the device table; device node
checks; the file watcher; CDI spec files; the DevicePlugin servicer and its
registration; the lifecycle loop; probes and metrics; the command line.
Everything runs on one asyncio event loop (grpc.aio): streams, file watches,
signals and timers, with no worker threads and no locks.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import signal
import stat
import struct
import sys
import time
from typing import Callable, NamedTuple

# gRPC core logs its own INFO lines to stderr unless told otherwise; an operator
# reading this plugin's log wants only ours. Must be set before grpc loads.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402

import deviceplugin_pb2 as pb  # noqa: E402
import deviceplugin_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("kvm-device-plugin")

# ---------------------------------------------------------------------------
# Constants and the device table
#
# Everything the kubelet and the kernel fix lives here, so that the rest of the
# file can be read without knowing the numbers. Adding a device is one line in
# DEVICE_TABLE.
# ---------------------------------------------------------------------------

API_VERSION = "v1beta1"  # the only version kubelets 1.10 to today speak
HEALTHY = "Healthy"  # the kubelet compares these strings exactly
UNHEALTHY = "Unhealthy"
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_RESOURCE_DOMAIN = "devices.kubevirt.io"
DEFAULT_COUNT = 110  # KubeVirt's default: the kubelet's default pod limit
MAX_COUNT = 100_000
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

# Since kubelet 1.25 Register waits for the kubelet to dial back (10 s timeout)
# and call GetDevicePluginOptions; leave room for that and then some.
REGISTER_TIMEOUT_S = 20.0
# A kubelet.sock that exists but refuses is usually a kubelet a few
# milliseconds from listening (bound, not yet listening): retry fast first,
# then at most once a second, and only call it a problem once it has lasted.
RETRY_FIRST_S = 0.001
RETRY_MAX_S = 1.0
# Channels to one address share one connection and its ~1 s reconnect
# backoff after a refused connect; a channel made just before the kubelet
# listens would delay every later one. Each channel gets its own instead.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
# Safety net for a missed inotify event, an overflowed inotify queue, and the
# only way to see a kernel module loaded later (/proc/misc cannot be watched).
RECHECK_S = 5.0
# Without inotify (a node out of watches) the safety net is all there is.
POLL_WITHOUT_INOTIFY_S = 1.0
# On SIGTERM, streams get this long to deliver their last (empty) list.
SHUTDOWN_GRACE_S = 1.0
# The kubelet opens ListAndWatch right after Register; one that has not done so
# by then lost the registration somewhere, and only a new one helps.
STREAM_EXPECTED_WITHIN_S = 10.0
# A stream that ends sooner than this after registering is not a kubelet
# restart but a kubelet refusing us: wait before trying again, do not spin.
STREAM_MIN_LIFE_S = 1.0
# /healthz asks each server GetDevicePluginOptions with this deadline; a
# request to the status endpoint must arrive whole within the other.
SELF_CHECK_TIMEOUT_S = 2.0
HTTP_REQUEST_TIMEOUT_S = 5.0
HTTP_MAX_HEADERS = 100

# Neither PreStartContainer nor GetPreferredAllocation is useful for devices
# that any number of containers may share. The kubelet reads these options from
# RegisterRequest up to 1.24 and from GetDevicePluginOptions from 1.25 on, so
# the same message is sent both ways.
PLUGIN_OPTIONS = pb.DevicePluginOptions(
    pre_start_required=False, get_preferred_allocation_available=False
)

MISC_MAJOR = 10  # kvm, tun, vhost-net and friends are all "misc" devices
PROC_MISC = "/proc/misc"  # the host kernel's in any container: not namespaced
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO=0xAE, 0x00)
KVM_API_VERSION = 12  # stable since Linux 2.6.22


class DeviceKind(NamedTuple):
    name: str  # resource name suffix, device ID prefix, --devices value
    path: str  # the node's path on the host, and in the container
    minor: int | None  # misc minor; None = assigned at load time
    misc_name: str  # the driver's name in /proc/misc
    module: str  # what an operator loads with modprobe
    kvm_api: bool = False  # ask KVM_GET_API_VERSION when the node opens


DEVICE_TABLE: dict[str, DeviceKind] = {
    kind.name: kind
    for kind in (
        DeviceKind("kvm", "/dev/kvm", 232, "kvm", "kvm_intel or kvm_amd", kvm_api=True),
        DeviceKind("tun", "/dev/net/tun", 200, "tun", "tun"),
        DeviceKind("vhost-net", "/dev/vhost-net", 238, "vhost-net", "vhost_net"),
        DeviceKind("vhost-vsock", "/dev/vhost-vsock", 241, "vhost-vsock", "vhost_vsock"),
        DeviceKind("sev", "/dev/sev", None, "sev", "ccp"),
        DeviceKind("mshv", "/dev/mshv", None, "mshv", "mshv_root (mshv on older kernels)"),
    )
}
DEFAULT_DEVICES = ("kvm", "tun", "vhost-net")


# ---------------------------------------------------------------------------
# Device node checks
#
# A device is advertised Healthy only when it would work in a container: the
# node exists where the kubelet will look for it, it is the right device, and
# its driver is loaded. Every Unhealthy verdict carries a reason an operator
# can act on, because "0 allocatable" alone explains nothing.
# ---------------------------------------------------------------------------


class Verdict(NamedTuple):
    healthy: bool
    reason: str  # why not, or what was verified

    @property
    def state(self) -> str:
        return HEALTHY if self.healthy else UNHEALTHY


def read_proc_misc(path: str = PROC_MISC) -> dict[str, int] | None:
    """Map driver name to misc minor for every registered misc driver.

    A misc minor appears here only while its driver is loaded, which is how an
    unprivileged process tells "node present, driver missing" from a working
    device. None when the file cannot be read (not Linux, or /proc hidden).
    """
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    drivers: dict[str, int] = {}
    for line in text.splitlines():
        minor, _, name = line.strip().partition(" ")
        if minor.isdigit() and name:
            drivers[name.strip()] = int(minor)
    return drivers


def describe_file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISFIFO, "named pipe"),
    ):
        if test(mode):
            return name
    return "file of unknown type"


class NodeChecker:
    """Decides whether one kind of device node is usable, and says why not.

    Owns the memory of the last open() attempt: opening a node whose driver is
    missing makes the kernel try to load a module, so the node is opened again
    only when something about it (its identity, or its driver's presence in
    /proc/misc) has changed, never once per event or timer tick.
    """

    def __init__(self, kind: DeviceKind, host_root: str) -> None:
        self.kind = kind
        self.node_path = os.path.join(host_root, kind.path.lstrip("/"))
        self._probe_key: tuple | None = None
        self._probe: tuple[str, str] = ("", "")
        self._refusal_logged = False

    def check(self, misc: dict[str, int] | None) -> Verdict:
        kind = self.kind
        load = f"load kernel module {kind.module}"
        try:
            st = os.lstat(self.node_path)
        except FileNotFoundError:
            return Verdict(False, f"{kind.path} is missing ({load})")
        except OSError as e:
            return Verdict(False, f"cannot stat {kind.path}: {e.strerror}")
        if not stat.S_ISCHR(st.st_mode):
            what = describe_file_type(st.st_mode)
            return Verdict(False, f"{kind.path} is a {what}, not a character device")

        if kind.minor is not None:
            expected_minor = kind.minor
        elif misc is None:
            return Verdict(False, f"cannot read {PROC_MISC} to learn the minor of {kind.path}")
        elif kind.misc_name not in misc:
            # The node's minor may belong to another driver now: never open it.
            return Verdict(
                False, f"driver not loaded: no '{kind.misc_name}' in {PROC_MISC} ({load})"
            )
        else:
            expected_minor = misc[kind.misc_name]
        found = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if found != (MISC_MAJOR, expected_minor):
            return Verdict(
                False,
                f"{kind.path} has device number {found[0]}:{found[1]}, "
                f"expected {MISC_MAJOR}:{expected_minor}",
            )

        driver_listed = misc is None or expected_minor in misc.values()
        key = (st.st_dev, st.st_ino, st.st_rdev, st.st_ctime_ns, driver_listed)
        if key != self._probe_key:
            self._probe_key = key
            self._probe = self._open_probe()
        outcome, detail = self._probe

        if outcome == "ok":
            return Verdict(True, detail)
        if outcome == "refused":
            # The normal case in an unprivileged pod: the device cgroup lets the
            # plugin see the node but not open it. Trust stat and /proc/misc.
            if not self._refusal_logged:
                self._refusal_logged = True
                log.info(
                    "cannot open %s (%s): checking its device number and %s only",
                    kind.path, detail, PROC_MISC,
                )
            if misc is None:
                return Verdict(True, f"node {MISC_MAJOR}:{expected_minor} present "
                                     f"(driver not verifiable: {PROC_MISC} unreadable)")
            if not driver_listed:
                return Verdict(
                    False, f"driver not loaded: minor {expected_minor} not in {PROC_MISC} ({load})"
                )
            return Verdict(True, f"node {MISC_MAJOR}:{expected_minor} present, driver loaded")
        if outcome == "nodriver":
            return Verdict(False, f"driver not loaded: opening {kind.path} gave {detail} ({load})")
        return Verdict(False, detail)

    def _open_probe(self) -> tuple[str, str]:
        """Open the node as a VMM would; for kvm ask its API version.

        Returns (outcome, detail) with outcome one of ok, refused (device cgroup
        or permissions), nodriver (ENODEV/ENXIO: no driver behind the minor)
        or error.
        """
        kind = self.kind
        try:
            fd = os.open(self.node_path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            name = errno.errorcode.get(e.errno, str(e.errno))
            if e.errno in (errno.EPERM, errno.EACCES):
                return "refused", f"{name}: {e.strerror}"
            if e.errno in (errno.ENODEV, errno.ENXIO):
                return "nodriver", name
            if e.errno == errno.ENOENT:
                return "error", f"{kind.path} vanished while being checked"
            return "error", f"cannot open {kind.path}: {name} {e.strerror}"
        try:
            if not kind.kvm_api:
                return "ok", "opened read-write"
            try:
                version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
            except OSError as e:
                return "error", f"KVM_GET_API_VERSION on {kind.path} failed: {e.strerror}"
            if version != KVM_API_VERSION:
                return "error", f"KVM API version {version}, expected {KVM_API_VERSION}"
            return "ok", f"KVM API version {version}"
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# The file watcher
#
# Two kinds of change must be seen at once: the kubelet restarting (it deletes
# every socket in its directory and creates a new kubelet.sock) and a device
# node appearing or vanishing. inotify tells us within microseconds. Events are
# only wake-ups: whoever is woken looks at what is true now and acts, so a
# missed, merged or self-inflicted event (a stopping gRPC server deletes its own
# socket) can never lead us astray.
# ---------------------------------------------------------------------------

def file_identity(path: str) -> tuple[int, int, int] | None:
    """(device, inode, ctime) of a file, or None when it is not there.

    What the reconcile steps compare: "the socket I bound" against a socket
    made since at that path, "the kubelet I registered with" against a
    restarted one, "the CDI spec I wrote" against an edited one.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = (
    IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ATTRIB
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
)
WAKE_ALWAYS = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then the name


class DirectoryWatcher:
    """Calls wake() when a file we care about changes in a watched directory.

    `paths` are the files of interest. Their directories are watched; while a
    directory does not exist yet (no /dev/net, no device-plugins directory) its
    nearest existing ancestor is watched instead, so its creation wakes us too.
    Only events whose name is a component of a path of interest wake: a busy
    /dev full of unrelated nodes costs a read, not a reconcile.
    """

    def __init__(self, paths: list[str], wake: Callable[[], None]) -> None:
        self.directories = sorted({os.path.dirname(p) for p in paths})
        self.names = {part for p in paths for part in p.split("/") if part}
        self.wake = wake
        self.fd = -1
        self._libc: ctypes.CDLL | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Begin watching; False (and the caller polls) when inotify is unavailable."""
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            problem = os.strerror(ctypes.get_errno()) if fd < 0 else ""
        except (OSError, AttributeError) as e:  # no libc, or one without inotify
            fd, problem = -1, str(e)
        if fd < 0:
            log.warning("inotify is unavailable (%s): polling every %.0f s instead",
                        problem, POLL_WITHOUT_INOTIFY_S)
            return False
        self.fd = fd
        loop.add_reader(fd, self._drain)
        return self.sync()

    def sync(self) -> bool:
        """(Re)add watches; directories come and go. False when out of watches."""
        if self.fd < 0 or self._libc is None:
            return False
        for directory in self.directories:
            target = directory
            while True:
                wd = self._libc.inotify_add_watch(self.fd, os.fsencode(target), WATCH_MASK)
                if wd >= 0:
                    break
                err = ctypes.get_errno()
                if err == errno.ENOSPC:
                    log.warning(
                        "out of inotify watches (fs.inotify.max_user_watches): "
                        "polling every %.0f s instead", POLL_WITHOUT_INOTIFY_S,
                    )
                    self.close()
                    return False
                parent = os.path.dirname(target)
                if parent == target:
                    break
                target = parent
        return True

    def _drain(self) -> None:
        relevant = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                relevant = True
                break
            offset = 0
            while offset + EVENT_HEADER.size <= len(data):
                _wd, mask, _cookie, length = EVENT_HEADER.unpack_from(data, offset)
                start = offset + EVENT_HEADER.size
                name = data[start:start + length].rstrip(b"\0").decode(errors="replace")
                offset = start + length
                if mask & WAKE_ALWAYS or name in self.names:
                    relevant = True
        if relevant:
            self.wake()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                asyncio.get_running_loop().remove_reader(self.fd)
            except RuntimeError:
                pass
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------
# CDI spec files (opt-in, --cdi-spec-dir)
#
# Kubelets from 1.28 on pass CDI device names from Allocate to the container
# runtime, and CDI-aware runtimes (containerd 1.7+ with CDI on, CRI-O) build
# the container's devices from a spec file on the node instead of from the
# DeviceSpec. The plugin writes one spec per resource and names it in
# Allocate only while the file is there as written; the DeviceSpec stays, so
# kubelets and runtimes without CDI keep working.
# ---------------------------------------------------------------------------

# 0.3.0 is the oldest CDI version with device node permissions; runtimes
# reject versions they do not know, so a spec claims the lowest it needs.
CDI_VERSION = "0.3.0"


class CdiSpec:
    """One resource's CDI spec file: written atomically, rewritten when it is
    deleted or changed, left in place on exit (restarting containers that
    were given the CDI name still need it)."""

    def __init__(self, directory: str, resource_name: str, kind: DeviceKind, permissions: str) -> None:
        vendor, _, device_class = resource_name.partition("/")
        self.path = os.path.join(directory, f"{vendor}-{device_class}.json")
        self.device_name = f"{resource_name}={kind.name}"  # the fully qualified CDI name
        self.resource_name = resource_name
        self.content = json.dumps({
            "cdiVersion": CDI_VERSION,
            "kind": resource_name,
            "devices": [{
                "name": kind.name,
                "containerEdits": {"deviceNodes": [{"path": kind.path, "permissions": permissions}]},
            }],
        }, indent=2).encode() + b"\n"
        self.written: tuple[int, int, int] | None = None  # identity of the file we wrote
        self.error_logged = False

    def in_place(self) -> bool:
        return self.written is not None and file_identity(self.path) == self.written

    def refresh(self) -> None:
        if self.in_place():
            return
        directory = os.path.dirname(self.path)
        temporary = os.path.join(directory, f".{os.path.basename(self.path)}.tmp")
        try:
            os.makedirs(directory, exist_ok=True)
            with open(temporary, "wb") as f:
                f.write(self.content)
                f.flush()
                os.fsync(f.fileno())  # no empty spec after a crash
            # rename() replaces the file in one step: a runtime reading the
            # directory never sees half a spec.
            os.rename(temporary, self.path)
        except OSError as e:
            self.written = None
            try:
                os.unlink(temporary)
            except OSError:
                pass
            if not self.error_logged:
                log.warning("%s: cannot write CDI spec %s: %s", self.resource_name, self.path, e.strerror)
                self.error_logged = True
            return
        rewritten = self.written is not None or self.error_logged
        self.written = file_identity(self.path)
        self.error_logged = False
        log.info("%s: %s CDI spec %s", self.resource_name, "rewrote" if rewritten else "wrote", self.path)


# ---------------------------------------------------------------------------
# The DevicePlugin servicer and its registration
#
# One instance per resource. It owns that resource's gRPC server, its socket,
# its open ListAndWatch streams, its health verdict and its registration
# state. The kubelet only ever sees what this class sends.
# ---------------------------------------------------------------------------


def plugin_socket_name(device: str) -> str:
    # Our own prefix, so that an operator listing the directory sees whose
    # sockets these are; the kubelet only cares that it is a bare file name.
    return f"kvm-device-plugin-{device}.sock"


class DevicePlugin(pb_grpc.DevicePluginServicer):
    def __init__(
        self,
        kind: DeviceKind,
        resource_name: str,
        count: int,
        permissions: str,
        plugin_dir: str,
        host_root: str,
        cdi_spec_dir: str | None = None,
    ) -> None:
        self.kind = kind
        self.resource_name = resource_name
        self.count = count
        self.socket_name = plugin_socket_name(kind.name)
        self.socket_path = os.path.join(plugin_dir, self.socket_name)
        self.kubelet_socket = os.path.join(plugin_dir, KUBELET_SOCKET)
        self.checker = NodeChecker(kind, host_root)
        self.wake: Callable[[], None] = lambda: None  # the lifecycle loop's, set by Daemon

        self.cdi = CdiSpec(cdi_spec_dir, resource_name, kind, permissions) if cdi_spec_dir else None
        # The kubelet gets the node's own path, never the host-root-prefixed
        # one we look at: the runtime creates the node from the host's path.
        device = pb.DeviceSpec(container_path=kind.path, host_path=kind.path, permissions=permissions)
        self._container_response = pb.ContainerAllocateResponse(devices=[device])
        if self.cdi is not None:
            self._container_response_cdi = pb.ContainerAllocateResponse(
                devices=[device], cdi_devices=[pb.CDIDevice(name=self.cdi.device_name)]
            )
        self.verdict = Verdict(False, "not checked yet")
        # Built on first use and kept: with --count 100000 building a list
        # takes a few hundred milliseconds, and health flaps back and forth.
        self._lists: dict[str, pb.ListAndWatchResponse] = {}

        self.server: grpc.aio.Server | None = None
        self.generation = 0  # bumped for every fresh server
        self.bound_socket: tuple[int, int, int] | None = None
        self.streams: set[asyncio.Event] = set()
        self.stream_seen = False  # the kubelet opened ListAndWatch on this server
        self.stream_ended = False
        self.stopping = False

        self.registered_with: tuple[int, int, int] | None = None  # kubelet.sock identity
        self.registered_at = 0.0  # time.monotonic() of the last registration
        self.registration: asyncio.Task | None = None
        self.registration_target: tuple[int, int, int] | None = None
        self.outage_started: float | None = None  # when registering became necessary
        self.registrations = 0  # successful Register calls, for the metrics
        self.allocations = 0  # containers given the device
        self.allocation_errors = 0

    # -- health ---------------------------------------------------------------

    def device_list(self) -> pb.ListAndWatchResponse:
        """The full list, every device with the resource's one health.

        All devices of a resource share one node, so they are healthy or not
        together. IDs are deterministic (kvm0 ... kvm109): the kubelet
        checkpoints allocations by ID and must find them again after a plugin
        restart. Topology stays unset: these devices have no NUMA affinity, and
        a NUMA hint could make a single-numa-node policy reject pods.
        """
        health = self.verdict.state
        if health not in self._lists:
            self._lists[health] = pb.ListAndWatchResponse(
                devices=[pb.Device(ID=f"{self.kind.name}{i}", health=health) for i in range(self.count)]
            )
        return self._lists[health]

    def refresh_health(self, misc: dict[str, int] | None) -> None:
        verdict = self.checker.check(misc)
        if verdict == self.verdict:
            return
        self.verdict = verdict
        log.log(logging.INFO if verdict.healthy else logging.WARNING,
                "%s: %d devices %s: %s", self.resource_name, self.count, verdict.state, verdict.reason)
        for changed in self.streams:
            changed.set()

    # -- the DevicePlugin service -------------------------------------------------
    # Every handler returns a message (gRPC turns a None into INTERNAL); a
    # refusal goes through context.abort() with a status and a message.

    async def GetDevicePluginOptions(self, request, context):
        return PLUGIN_OPTIONS

    async def ListAndWatch(self, request, context):
        """Stream the full device list now and after every health change.

        The kubelet opens one stream per registration and reads it forever. If
        the stream ends while we are running, the kubelet marks every device
        unhealthy and never reconnects: the lifecycle loop must register again,
        so the end of a current stream wakes it.
        """
        changed = asyncio.Event()
        generation = self.generation
        self.streams.add(changed)
        self.stream_seen = True
        log.debug("%s: kubelet opened ListAndWatch", self.resource_name)
        try:
            while not self.stopping:
                yield self.device_list()
                await changed.wait()
                changed.clear()
            # An empty list makes the kubelet drop the devices at once instead
            # of keeping them unhealthy for five minutes.
            yield pb.ListAndWatchResponse()
        finally:
            self.streams.discard(changed)
            if not self.stopping and generation == self.generation:
                self.stream_ended = True
                self.wake()

    async def GetPreferredAllocation(self, request, context):
        return pb.PreferredAllocationResponse()  # never called: the option is off

    async def PreStartContainer(self, request, context):
        return pb.PreStartContainerResponse()  # never called: the option is off

    async def Allocate(self, request, context):
        """Give each container the device node.

        The kubelet calls this at pod admission, once per container, and uses
        container_responses[0]; we answer one response per request anyway. An
        error here rejects the pod with our message in its status, so the
        message names the resource and what is wrong.
        """
        refusal = self.allocation_refusal(request)
        if refusal is not None:
            self.allocation_errors += 1
            log.warning("%s", refusal[1])
            await context.abort(*refusal)
        self.allocations += len(request.container_requests)
        ids = ",".join(i for c in request.container_requests for i in c.devices_ids)
        log.info("%s: allocated %s", self.resource_name, ids)
        if self.cdi is not None and self.cdi.in_place():
            response = self._container_response_cdi
        else:
            response = self._container_response
        return pb.AllocateResponse(container_responses=[response] * len(request.container_requests))

    def allocation_refusal(self, request: pb.AllocateRequest) -> tuple[grpc.StatusCode, str] | None:
        """Why this request must be refused (status code and message), or None."""
        name = self.resource_name
        if not request.container_requests:
            return grpc.StatusCode.INVALID_ARGUMENT, f"{name}: AllocateRequest has no container requests"
        for index, container in enumerate(request.container_requests):
            if not container.devices_ids:
                return (grpc.StatusCode.INVALID_ARGUMENT,
                        f"{name}: container request {index} has no device IDs")
            for device_id in container.devices_ids:
                if not self.is_known_id(device_id):
                    return grpc.StatusCode.INVALID_ARGUMENT, (
                        f"{name}: unknown device ID {device_id!r} "
                        f"(this plugin serves {self.kind.name}0 to {self.kind.name}{self.count - 1})"
                    )
        if not self.verdict.healthy:
            # The container could not start without the node: fail admission
            # now, with the reason, rather than at container creation.
            return grpc.StatusCode.FAILED_PRECONDITION, f"{name}: device unhealthy: {self.verdict.reason}"
        return None

    def is_known_id(self, device_id: str) -> bool:
        prefix, number = self.kind.name, device_id[len(self.kind.name):]
        # ASCII digits without a leading zero: "kvm01" is not "kvm1", and a
        # kubelet never sends "kvm²" or a 5000-digit number.
        return (
            device_id.startswith(prefix)
            and re.fullmatch(r"0|[1-9][0-9]{0,5}", number, re.ASCII) is not None
            and int(number) < self.count
        )

    # -- server and registration -------------------------------------------------

    def socket_intact(self) -> bool:
        return self.bound_socket is not None and file_identity(self.socket_path) == self.bound_socket

    def reason_to_register(self, kubelet: tuple[int, int, int] | None) -> str | None:
        if kubelet is None:
            return None
        if self.registered_with is None:
            return "not registered yet"
        if self.registered_with != kubelet:
            return "kubelet.sock was re-created"
        if not self.socket_intact():
            return "plugin socket was deleted"
        if self.stream_ended:
            return "kubelet ended the ListAndWatch stream"
        if not self.stream_seen and time.monotonic() - self.registered_at > STREAM_EXPECTED_WITHIN_S:
            return f"kubelet opened no ListAndWatch stream within {STREAM_EXPECTED_WITHIN_S:.0f} s"
        return None

    def reconcile_registration(self, kubelet: tuple[int, int, int] | None) -> None:
        reason = self.reason_to_register(kubelet)
        if reason is None:
            return
        if self.registration is not None and not self.registration.done():
            if self.registration_target == kubelet:
                return  # already on it
            # A Register to a kubelet that is going away can hang for its 10 s
            # dial-back; the new kubelet must not wait for that.
            self.registration.cancel()
        if self.outage_started is None:
            self.outage_started = time.monotonic()
        if self.registrations:
            log.info("%s: registering again: %s", self.resource_name, reason)
        # A kubelet (the same one: a new one is always served at once) that
        # ends every stream right after registering would otherwise have us
        # register again at full speed, forever.
        refused = self.registered_with == kubelet and self.stream_ended
        short_lived = time.monotonic() - self.registered_at < STREAM_MIN_LIFE_S
        pause = RETRY_MAX_S if refused and short_lived else 0.0
        self.registration_target = kubelet
        self.registered_with = None
        self.registration = asyncio.create_task(self._register(kubelet, pause))

    async def restart_server(self) -> None:
        """Stop the old server, then serve afresh on the same path.

        Order matters: stopping a gRPC server deletes the file at its socket
        path even when a successor owns it, and binding silently replaces a
        live socket. Stopping first also ends the old ListAndWatch stream
        before the new registration, as kubelets before the late-2025 fix
        need (the old connection's end could tear down the new one).
        """
        await self.stop_server(grace=None)
        try:
            os.unlink(self.socket_path)  # stale, from a killed earlier run
        except FileNotFoundError:
            pass
        self.stream_seen = self.stream_ended = False
        server = grpc.aio.server()
        pb_grpc.add_DevicePluginServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.socket_path}")  # binds the path now
        # Held before the first await: a registration cancelled during start()
        # must leave a server the next stop_server() stops, not an orphan that
        # deletes its successor's socket when it is garbage-collected.
        self.server = server
        await server.start()
        self.bound_socket = file_identity(self.socket_path)

    async def stop_server(self, grace: float | None) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        self.generation += 1  # the ending streams are no longer "current"
        mine = self.bound_socket
        self.bound_socket = None
        await server.stop(grace)
        # grpc removes its socket file on stop; make sure, but never touch a
        # file that is not the one we bound.
        if mine is not None and file_identity(self.socket_path) == mine:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    async def _register(self, kubelet: tuple[int, int, int], pause: float) -> None:
        delay = RETRY_FIRST_S
        last_error = ""
        served = False
        try:
            await asyncio.sleep(pause)
            while True:
                if file_identity(self.kubelet_socket) != kubelet:
                    # That kubelet is gone; the lifecycle loop starts afresh
                    # for the one there now. Registering with it under the
                    # old identity would only cost a second registration.
                    return
                try:
                    if not served or not self.socket_intact():
                        await self.restart_server()
                        served = True
                    await self._call_register()
                    break
                except grpc.aio.AioRpcError as e:
                    error = f"{e.code().name}: {e.details()}"
                    transient = e.code() == grpc.StatusCode.UNAVAILABLE
                except (OSError, RuntimeError) as e:  # cannot bind: directory gone
                    error, transient = str(e), True
                # A refusal is worth a line once it has lasted about a second
                # (the retries have slowed to RETRY_MAX_S); a rejection by the
                # kubelet (invalid name, ...) at once. Each only once.
                if error != last_error and (delay >= RETRY_MAX_S or not transient):
                    log.warning(
                        "%s: registration with %s failed (%s); retrying every %.0f s at most",
                        self.resource_name, self.kubelet_socket, error, RETRY_MAX_S,
                    )
                    last_error = error
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            self.registered_with = kubelet
            self.registered_at = time.monotonic()
            took_ms = (time.monotonic() - (self.outage_started or time.monotonic())) * 1000
            self.outage_started = None
            again = "again " if self.registrations else ""
            self.registrations += 1
            log.info(
                "%s: registered %swith the kubelet after %.0f ms (%d devices %s)",
                self.resource_name, again, took_ms, self.count, self.verdict.state,
            )
        finally:
            self.wake()  # the socket or the kubelet may have changed meanwhile

    async def _call_register(self) -> None:
        async with grpc.aio.insecure_channel(
            f"unix://{self.kubelet_socket}", options=CHANNEL_OPTIONS
        ) as channel:
            await pb_grpc.RegistrationStub(channel).Register(
                pb.RegisterRequest(
                    version=API_VERSION,
                    endpoint=self.socket_name,  # a bare name inside plugin_dir
                    resource_name=self.resource_name,
                    options=PLUGIN_OPTIONS,
                ),
                timeout=REGISTER_TIMEOUT_S,
            )

    async def shutdown(self) -> None:
        self.stopping = True
        if self.registration is not None:
            self.registration.cancel()
        for changed in self.streams:
            changed.set()
        await self.stop_server(grace=SHUTDOWN_GRACE_S)


# ---------------------------------------------------------------------------
# The lifecycle loop
#
# One loop reconciles everything: on every wake-up (inotify, a stream ending, a
# registration finishing, a signal, or the periodic safety net) it re-checks
# every device, then asks each plugin whether it is registered with the
# kubelet.sock that exists now over a socket that is still its own, and starts
# (or restarts) registration where it is not.
# ---------------------------------------------------------------------------


class Daemon:
    def __init__(self, plugins: list[DevicePlugin], plugin_dir: str,
                 status_port: int | None = None) -> None:
        self.plugins = plugins
        for plugin in plugins:
            plugin.wake = self.wake
        self.plugin_dir = plugin_dir
        self.kubelet_socket = os.path.join(plugin_dir, KUBELET_SOCKET)
        self.woken = asyncio.Event()
        self.stop_requested = False
        self.exit_code = 0
        self.lock_fd = -1
        self.lock_identity: tuple[int, int] | None = None  # (device, inode) of the locked directory
        self.last_kubelet: tuple[int, int, int] | None = None  # the last kubelet.sock seen
        self.waiting_logged = False
        watched = [self.kubelet_socket]
        for plugin in plugins:
            watched += [plugin.socket_path, plugin.checker.node_path]
            if plugin.cdi is not None:
                watched.append(plugin.cdi.path)
        self.watcher = DirectoryWatcher(watched, self.wake)
        self.poll_s = RECHECK_S
        self.status = StatusEndpoint(self, status_port) if status_port is not None else None

    def wake(self) -> None:
        self.woken.set()

    def is_ready(self, plugin: DevicePlugin) -> bool:
        kubelet = file_identity(self.kubelet_socket)
        return kubelet is not None and plugin.registered_with == kubelet and bool(plugin.streams)

    def not_ready(self) -> list[str]:
        return [f"{p.resource_name}: not registered with a stream open" for p in self.plugins
                if self.stop_requested or not self.is_ready(p)]

    async def not_alive(self) -> list[str]:
        async def answers(plugin: DevicePlugin) -> str | None:
            if not plugin.socket_intact():
                return None  # between servers: the lifecycle loop is on it
            try:
                async with grpc.aio.insecure_channel(
                    f"unix://{plugin.socket_path}", options=CHANNEL_OPTIONS
                ) as channel:
                    await pb_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
                        pb.Empty(), timeout=SELF_CHECK_TIMEOUT_S
                    )
            except grpc.aio.AioRpcError as e:
                return f"{plugin.resource_name}: server does not answer ({e.code().name})"
            return None

        results = await asyncio.gather(*(answers(p) for p in self.plugins))
        return [problem for problem in results if problem]

    def request_stop(self, signum: int) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        self.stop_requested = True
        self.wake()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            # As PID 1 in a container SIGTERM would otherwise do nothing.
            loop.add_signal_handler(signum, self.request_stop, signum)
        if not self.watcher.start(loop):
            self.poll_s = POLL_WITHOUT_INOTIFY_S
        if self.status is not None:
            try:
                await self.status.start()
            except OSError as e:
                log.error("cannot serve metrics on port %d: %s", self.status.port, e.strerror)
                return 1
        try:
            while not self.stop_requested:
                self.woken.clear()
                self.reconcile()
                try:
                    await asyncio.wait_for(self.woken.wait(), timeout=self.poll_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            await asyncio.gather(*(plugin.shutdown() for plugin in self.plugins))
            self.watcher.close()
            if self.status is not None:
                await self.status.close()
        log.info("stopped")
        return self.exit_code

    def reconcile(self) -> None:
        misc = read_proc_misc()
        for plugin in self.plugins:
            plugin.refresh_health(misc)
        if self.watcher.fd >= 0 and not self.watcher.sync():
            self.poll_s = POLL_WITHOUT_INOTIFY_S
        if not os.path.isdir(self.plugin_dir):
            self.note_kubelet(
                None, f"{self.kubelet_socket} does not exist (nor does its directory, yet)"
            )
            return
        if not self.hold_lock():
            return
        # Only the instance holding the lock writes anything, CDI specs included.
        for plugin in self.plugins:
            if plugin.cdi is not None:
                plugin.cdi.refresh()
        kubelet = file_identity(self.kubelet_socket)
        self.note_kubelet(kubelet, f"{self.kubelet_socket} does not exist")
        for plugin in self.plugins:
            plugin.reconcile_registration(kubelet)

    def note_kubelet(self, kubelet: tuple[int, int, int] | None, why_absent: str) -> None:
        """Log the kubelet coming and going once, not once per wake-up."""
        if kubelet is None:
            if not self.waiting_logged:
                log.info("waiting for the kubelet: %s", why_absent)
                self.waiting_logged = True
            return
        if self.last_kubelet is not None and kubelet != self.last_kubelet:
            log.info("kubelet restarted: %s was re-created", self.kubelet_socket)
        elif self.last_kubelet is None and self.waiting_logged:
            log.info("kubelet appeared: %s", self.kubelet_socket)
        self.waiting_logged = False
        self.last_kubelet = kubelet

    def hold_lock(self) -> bool:
        """Hold an exclusive flock on the plugin directory while we run.

        Two instances on one directory would replace each other's sockets
        silently (binding a unix socket path replaces what is there), and a
        check whether a socket answers races when both start together. The
        lock is on the directory itself: the kubelet's directory holds no file
        of ours but our sockets.
        """
        try:
            st = os.stat(self.plugin_dir)
        except OSError:
            return False
        # Device and inode only: a directory's ctime changes with every file
        # created in it, and re-locking then would open a gap for a rival.
        identity = (st.st_dev, st.st_ino)
        if self.lock_fd >= 0 and identity == self.lock_identity:
            return True
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # the directory was replaced: lock the new one
            self.lock_fd = -1
        fd = os.open(self.plugin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.error(
                "another kvm-device-plugin is already serving %s (it holds the lock on the "
                "directory); refusing to take over its sockets", self.plugin_dir,
            )
            self.exit_code = 1
            self.stop_requested = True
            return False
        self.lock_fd, self.lock_identity = fd, identity
        return True


# ---------------------------------------------------------------------------
# Probes and metrics
#
# The Device Plugin API cannot tell anyone whether a plugin is registered, and
# "0 allocatable" on a node says nothing about why. One small HTTP endpoint on
# the same event loop answers the kubelet's probes and Prometheus:
#   /readyz   200 when every resource is registered with the kubelet.sock that
#             exists now and its ListAndWatch stream is open;
#   /healthz  200 when the loop answers and every server whose socket is in
#             place answers GetDevicePluginOptions (a blocked loop answers
#             nothing, so the probe times out);
#   /metrics  devices, health, registrations and allocations per resource.
# HTTP probes cost the node nothing between calls, where an exec probe would
# start a Python process with gRPC every few seconds (~0.25 s of CPU each).
# asyncio's own streams serve it: http.server would need a thread.
# ---------------------------------------------------------------------------

class StatusEndpoint:
    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon = daemon
        self.port = port
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, port=self.port)
        log.info("serving /metrics, /healthz and /readyz on port %d", self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(self._read_request(reader), HTTP_REQUEST_TIMEOUT_S)
            method, _, rest = request_line.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method != "GET":
                status, body = "405 Method Not Allowed", "only GET\n"
            elif path == "/metrics":
                status, body = "200 OK", self.metrics()
            elif path == "/readyz":
                problems = self.daemon.not_ready()
                status = "503 Service Unavailable" if problems else "200 OK"
                body = "".join(f"{p}\n" for p in problems) or "ready\n"
            elif path == "/healthz":
                problems = await self.daemon.not_alive()
                status = "503 Service Unavailable" if problems else "200 OK"
                body = "".join(f"{p}\n" for p in problems) or "ok\n"
            else:
                status, body = "404 Not Found", "try /metrics, /healthz or /readyz\n"
            payload = body.encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
            )
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, ValueError):
            pass  # slow, half-open, overlong or garbled: drop it, keep serving
        finally:
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> bytes:
        """The request line; the headers are read and ignored (none matters here)."""
        request_line = await reader.readline()  # ValueError past 64 KiB
        for _ in range(HTTP_MAX_HEADERS):
            if not (await reader.readline()).strip():
                return request_line
        raise ValueError("too many header lines")

    def metrics(self) -> str:
        plugins = self.daemon.plugins
        families = [
            ("devices", "gauge", "Devices advertised to the kubelet.", lambda p: p.count),
            ("healthy_devices", "gauge", "Devices advertised Healthy.",
             lambda p: p.count if p.verdict.healthy else 0),
            ("registered", "gauge", "1 while registered with the kubelet and its stream is open.",
             lambda p: int(self.daemon.is_ready(p))),
            ("registrations_total", "counter", "Successful registrations with the kubelet.",
             lambda p: p.registrations),
            ("reregistrations_total", "counter", "Registrations after the first (kubelet restarts, "
             "ended streams, deleted sockets).", lambda p: max(p.registrations - 1, 0)),
            ("allocations_total", "counter", "Containers given the device.", lambda p: p.allocations),
            ("allocation_errors_total", "counter", "Allocate calls refused.", lambda p: p.allocation_errors),
        ]
        lines = []
        for name, kind, help_text, value in families:
            metric = f"kvm_device_plugin_{name}"
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
            lines += [f'{metric}{{resource="{p.resource_name}"}} {value(p)}' for p in plugins]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The command line
#
# The flag names are a contract with users, manifests and tests. Usage errors
# are one line on stderr and exit code 2.
# ---------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_count(text: str) -> int:
    value = int(text) if re.fullmatch(r"[0-9]{1,6}", text, re.ASCII) else 0
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_COUNT}, got {text!r}")
    return value


def parse_devices(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DEVICE_TABLE]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown device {', '.join(map(repr, unknown)) or repr(text)}; "
            f"known: {', '.join(DEVICE_TABLE)}"
        )
    return list(dict.fromkeys(names))


def parse_port(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text, re.ASCII) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}")
    return int(text)


DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


def parse_domain(text: str) -> str:
    # The kubelet takes only extended resource names: a DNS subdomain, nothing
    # ending in "kubernetes.io" (its own resources), not starting with
    # "requests." (quota's prefix), and short enough that "requests.<domain>"
    # is still a valid prefix (253 characters). Say so before registering.
    if (
        len(text) > 253 - len("requests.")
        or not re.fullmatch(rf"{DNS_LABEL}(\.{DNS_LABEL})*", text, re.ASCII)
        or text.endswith("kubernetes.io")
        or text.startswith("requests.")
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a DNS subdomain of at most 244 characters outside kubernetes.io "
            "and requests."
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvm_device_plugin.py",
        description="Advertise /dev/kvm, /dev/net/tun and /dev/vhost-net to the kubelet.",
    )
    parser.add_argument("--count", type=parse_count, default=DEFAULT_COUNT,
                        help=f"devices per resource (1 to {MAX_COUNT}; default {DEFAULT_COUNT})")
    parser.add_argument("--devices", type=parse_devices, default=list(DEFAULT_DEVICES),
                        help=f"comma-separated resources to serve (default {','.join(DEFAULT_DEVICES)};"
                             f" known: {', '.join(DEVICE_TABLE)})")
    parser.add_argument("--resource-domain", type=parse_domain, default=DEFAULT_RESOURCE_DOMAIN,
                        help=f"resource name prefix (default {DEFAULT_RESOURCE_DOMAIN})")
    parser.add_argument("--plugin-dir", default=DEFAULT_PLUGIN_DIR,
                        help=f"the kubelet's device-plugins directory (default {DEFAULT_PLUGIN_DIR})")
    parser.add_argument("--host-root", default="/",
                        help="prefix under which device nodes are checked (default /)")
    parser.add_argument("--permissions", choices=("auto", "rw", "rwm"), default="auto",
                        help="cgroup permissions in each DeviceSpec; auto = rwm on cgroup v2, rw otherwise")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text lines, or one JSON object per line for log pipelines")
    parser.add_argument("--metrics-port", type=parse_port, default=None,
                        help="serve /metrics, /healthz and /readyz over HTTP on this port (default off)")
    parser.add_argument("--cdi-spec-dir", default=None,
                        help="also write a CDI spec per resource here (for example /var/run/cdi) and name "
                             "it in Allocate (default off)")
    parser.add_argument("--check", action="store_true",
                        help="check the device nodes, print one line each, exit 0 if all are healthy")
    return parser


class TextFormatter(logging.Formatter):
    """2026-11-26T23:59:01.123Z INFO message: UTC, so nodes' logs line up."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")


class JsonFormatter(TextFormatter):
    """One JSON object per line: {"time", "level", "message"}, and "exception"
    with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def resolve_permissions(choice: str) -> str:
    if choice != "auto":
        return choice
    # On a cgroup v2 host, older runc's eBPF device filter refuses access() on
    # the node unless "m" (mknod) is granted too; KubeVirt uses rwm there.
    return "rwm" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "rw"


def run_check(devices: list[str], host_root: str) -> int:
    misc = read_proc_misc()
    all_healthy = True
    for name in devices:
        kind = DEVICE_TABLE[name]
        verdict = NodeChecker(kind, host_root).check(misc)
        all_healthy &= verdict.healthy
        print(f"{name:<12} {kind.path:<18} {verdict.state:<10} {verdict.reason}")
    return 0 if all_healthy else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else TextFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    host_root = os.path.abspath(args.host_root)
    if args.check:
        return run_check(args.devices, host_root)

    plugin_dir = os.path.abspath(args.plugin_dir)
    for name in [KUBELET_SOCKET] + [plugin_socket_name(d) for d in args.devices]:
        path = os.path.join(plugin_dir, name)
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            parser.error(
                f"socket path {path} is {len(os.fsencode(path))} bytes; "
                f"a unix socket path is limited to {UNIX_PATH_MAX}"
            )

    permissions = resolve_permissions(args.permissions)

    async def serve() -> int:
        plugins = [
            DevicePlugin(
                DEVICE_TABLE[name], f"{args.resource_domain}/{name}", args.count,
                permissions, plugin_dir, host_root,
                os.path.abspath(args.cdi_spec_dir) if args.cdi_spec_dir else None,
            )
            for name in args.devices
        ]
        daemon = Daemon(plugins, plugin_dir, args.metrics_port)
        log.info(
            "serving %s with %d devices each (permissions %s, host root %s, plugin dir %s)",
            ", ".join(p.resource_name for p in plugins), args.count, permissions, host_root, plugin_dir,
        )
        return await daemon.run()

    return asyncio.run(serve())


if __name__ == "__main__":
    sys.exit(main())
