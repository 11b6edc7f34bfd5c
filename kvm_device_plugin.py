#!/usr/bin/env python3
"""A Kubernetes device plugin for /dev/kvm, /dev/net/tun and /dev/vhost-net.

A pod that runs virtual machines (KubeVirt's virt-launcher, Kata, Firecracker
runners, CI sandboxes) asks for ``devices.kubevirt.io/kvm: 1`` in its limits
instead of running privileged; the kubelet puts the device node into that
container, and nothing else. For every resource (kvm, tun, vhost-net, ...)
this plugin, through the kubelet's Device Plugin API (v1beta1):

1. serves the ``v1beta1.DevicePlugin`` gRPC service on a unix socket of its
   own in the kubelet's device-plugins directory (one server per resource: a
   ListAndWatch request does not say which resource it is for);
2. then calls ``v1beta1.Registration/Register`` on ``kubelet.sock`` there.
   Since kubelet 1.25 the kubelet dials back and calls GetDevicePluginOptions
   before Register returns, so the server must already be running;
3. answers the kubelet's ListAndWatch stream with the FULL device list, again
   after every health change (a device missing from a message is dropped);
4. answers Allocate at pod admission with the device node to put into the
   container.

A restarting kubelet deletes every socket in the directory and never dials a
plugin again by itself: the plugin must notice and register anew. That, and
telling the truth about whether a device is really there, is most of this
file. It reads top to bottom: constants and the device table; device node
checks; the file watcher; CDI spec files; the DevicePlugin service; the link
to the kubelet; the lifecycle loop; probes and metrics; the command line. One
asyncio event loop (grpc.aio) carries everything, with no worker threads and
no locks.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, TypeVar

# gRPC core logs its own INFO lines to stderr unless told otherwise; an operator
# reading this plugin's log wants only ours. Must be set before grpc loads.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

if __name__ == "__main__":
    # Until the event loop takes the signals over (Daemon.run), a request to
    # stop finds nothing registered yet: exit 0 at once. As PID 1 in a
    # container the default would be to ignore it for the whole grace period;
    # elsewhere, to die with a signal's exit code. os._exit, not sys.exit: an
    # interpreter torn down in the middle of importing gRPC can hang (seen on
    # Python 3.13), and there is nothing to clean up yet. (Not when imported:
    # the tests' own process keeps its handlers.)
    for _signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(_signum, lambda signum, frame: os._exit(0))

import grpc
from google.protobuf.message import DecodeError, Message

import deviceplugin_pb2 as pb
import deviceplugin_pb2_grpc as pb_grpc

log = logging.getLogger("kvm-device-plugin")
Context = grpc.aio.ServicerContext  # what every handler is given besides its request
RequestT = TypeVar("RequestT", bound=Message)

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
# The kubelet uses this directory whatever its --root-dir; distributions that
# move the kubelet (k3s, microk8s, k0s) move it too, hence --plugin-dir.
DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_RESOURCE_DOMAIN = "devices.kubevirt.io"
DEFAULT_COUNT = 110  # KubeVirt's default: the kubelet's default pod limit
# A count is how many pods may share the node, which the kubelet's pod limit
# (maxPods, 110 by default) bounds anyway; each device costs memory in every
# list sent. Peak RSS over 300 kubelet restarts while the node flaps every
# 100 ms (bench_plugin.py --flood, rss_mb_count_*_peak): 43 MiB at 10,000;
# run by its path (3.8 MB more), 45 at 10,000, 52 at 20,000, 70 at 50,000
# and 100 at 100,000, past the DaemonSet's 96 Mi.
MAX_COUNT = 10_000
# The kubelet sends one ContainerAllocateRequest per Allocate (one container
# at admission), with as many IDs as that container's limit. A few more are
# answered; 100,000 one-ID containers took 642 ms of the event loop per call.
MAX_CONTAINER_REQUESTS = 8
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

# Since kubelet 1.25 Register waits for the kubelet to dial back (10 s timeout)
# and call GetDevicePluginOptions; leave room for that and then some. (Since
# 1.35 this deadline also bounds that dial-back: a short one would fail it.)
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
# On SIGTERM, streams get this long to deliver their last (empty) list; the
# whole stop is bounded so that the process exits within 2 s whatever a peer does.
SHUTDOWN_GRACE_S = 0.5
# A gRPC server's stop() waits for every call to finish, and a call whose
# reader stopped reading never finishes (its last message sits in HTTP/2 flow
# control). A new server waits at most this long for the old one's kubelet
# stream to end; the old server finishes stopping in the background.
STOP_TIMEOUT_S = 0.5
# Any process that can reach the socket may open ListAndWatch. Those streams
# are served, but only this many at once per resource (each one holds memory),
# and this many more opened within a second of the kubelet's own, in case the
# kubelet's came second (see KubeletLink.admit_stream).
MAX_OTHER_STREAMS = 4
KUBELET_STREAM_GRACE_S = 1.0
KUBELET_STREAM_GRACE_STREAMS = 2
# Any process that can reach the socket may also connect to it, and every
# HTTP/2 connection gRPC holds costs ~14 KB: 4,000 idle ones would take the
# plugin past its 96 Mi limit. Each server (there is a new one for every
# registration) takes this many at once; past that gRPC accepts a connection
# and closes it. The kubelet needs one (it dials back right after Register and
# keeps that connection), /healthz one for a moment. The cap is a race: a
# flood that fills it between the rename of a new server's socket into place
# and the kubelet's dial-back makes Register fail, and the next attempt serves
# on a new server (see _register). So it is set well above what a client
# connecting in a loop opens in those milliseconds, and low enough that one
# full server per resource fits in memory (256 x 14 KB = 3.5 MB).
MAX_CONNECTIONS = 256
# A connection with no call open for this long is closed: a flood of held,
# idle connections gives its slots back. The kubelet's connection always has
# its ListAndWatch stream open. (A maximum connection age would cut that
# stream, and the kubelet never dials again by itself.) gRPC checks every
# connection that often, calls open or not, and each check wakes its
# threads: at 2 s that tripled the idle plugin's CPU (0.14 % of a core, 31-34
# wakeups a second, against 0.05 % and 7.5 without the limit). At 10 s it
# costs 0.06-0.07 % and 11-13, and the kubelet still got in under a flood
# holding every slot as soon as with 2 s (0-10.1 s, one dial-back timeout at
# worst); at 30 s one registration took two timeouts (20.1 s).
CONNECTION_IDLE_MS = 10_000
# Streams at once on one connection. The kubelet's connection carries its
# ListAndWatch stream and one Allocate at a time (pods are admitted one by
# one); a client over the limit waits, it is not refused. A client that opens
# and resets streams as fast as it can (HTTP/2 "rapid reset") would otherwise
# have gRPC create a call for each: 13,000 a second took RSS from 41 to 81 MB
# in 10 s and failed most of the kubelet's Allocate calls. Each stream the
# limit lets in still costs the event loop a call: 2 instead of 4 took the
# plugin's CPU under that attack from about 80 % of a core to about 60 %.
MAX_STREAMS_PER_CONNECTION = 2
# A registration still unfinished after this long is stuck, whatever the
# cause: /healthz fails, so that the liveness probe restarts the pod. So it
# does past this many old servers that cannot finish stopping (each holds a
# stalled client's call, and its memory, for as long as that client lives).
# (KDP_REGISTRATION_OVERDUE_S shortens it for the tests, which must see it.)
REGISTRATION_OVERDUE_S = float(os.environ.get("KDP_REGISTRATION_OVERDUE_S", "60"))
MAX_SERVERS_STOPPING = 8
# The kubelet opens ListAndWatch right after Register; one that has not done so
# by then lost the registration somewhere, and only a new one helps.
STREAM_EXPECTED_WITHIN_S = 10.0
# A stream that ends sooner than this after registering is not a kubelet
# restart but a kubelet refusing us: wait before trying again, do not spin.
STREAM_MIN_LIFE_S = 1.0
# /healthz asks each server GetDevicePluginOptions with this deadline, and
# answers later probes from that verdict for a while: every /healthz costs a
# gRPC call per resource, and the port is open to the pod network.
SELF_CHECK_TIMEOUT_S = 2.0
HEALTHZ_REUSE_S = 1.0
# The status port is open to the pod network, so what one connection and all
# of them together may hold is bounded: a request (line and headers, which
# are ignored) must arrive whole, within a few KiB and seconds, and past
# HTTP_MAX_CONNECTIONS waiting for their request, one is dropped for the
# newest (see StatusEndpoint._serve), so that a flood of idle connections
# cannot keep a real client out.
HTTP_REQUEST_TIMEOUT_S = 5.0
HTTP_MAX_REQUEST_BYTES = 8192
HTTP_MAX_CONNECTIONS = 32
# Any client of a plugin socket can call Allocate as often as it likes, and
# each call makes a line. Per resource, up to LOG_BURST lines are logged at
# once and then one every LOG_REFILL_S; the calls past that are counted, and
# one line every LOG_SUMMARY_S says how many were allocated and refused. A
# kubelet admitting pods one by one stays within it; four clients sending
# 2,100-3,200 refused calls a second cost 0.23-0.31 KB of log a second
# instead of 1.5 KB (bench_plugin.py --flood: log_bytes_per_s_allocate_flood),
# and the metrics count every Allocate.
LOG_BURST = 10
LOG_REFILL_S = 1.0
LOG_SUMMARY_S = 10.0
# Device IDs and other peer-supplied text are cut to this many characters in
# messages and logs: an error status must fit gRPC's metadata limit (8 KiB).
MAX_QUOTED_CHARS = 64

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


# The kernel's /proc/misc is about a kilobyte. What sits at that path is
# only trusted as far as it is procfs's regular file; a mount mistake or a
# container image can put a FIFO there (opening it waits for a writer, and
# would block the event loop and every probe), /dev/zero (read() never ends,
# and RSS grows by gigabytes) or a copied file.
PROC_MISC_MAX_BYTES = 65536
_proc_misc_problem_said = ""  # the last reason /proc/misc was ignored, said once


def read_proc_misc(path: str = PROC_MISC) -> dict[str, int] | None:
    """Map driver name to misc minor for every registered misc driver.

    A misc minor appears here only while its driver is loaded, which is how an
    unprivileged process tells "node present, driver missing" from a working
    device. None when the file cannot be read (not Linux, or /proc hidden) or
    is not the kernel's (said once per cause, as a warning).
    """
    global _proc_misc_problem_said
    problem = ""
    data = b""
    try:
        # O_NONBLOCK: opening a FIFO for reading returns at once, never waits.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        # procfs files are regular files of size 0, on the filesystem of /proc.
        if not stat.S_ISREG(st.st_mode):
            problem = f"it is a {describe_file_type(st.st_mode)}"
        elif st.st_dev != os.stat(os.path.dirname(path)).st_dev:
            problem = f"it is not on the filesystem of {os.path.dirname(path)}"
        else:
            while len(data) <= PROC_MISC_MAX_BYTES:
                chunk = os.read(fd, PROC_MISC_MAX_BYTES + 1 - len(data))
                if not chunk:
                    break
                data += chunk
            if len(data) > PROC_MISC_MAX_BYTES:
                problem = f"it holds more than {PROC_MISC_MAX_BYTES} bytes"
    except OSError as e:
        problem = f"cannot read it: {e.strerror}"
    finally:
        os.close(fd)
    if problem:
        if problem != _proc_misc_problem_said:
            log.warning("ignoring %s: %s, not the kernel's list of misc drivers (a mount over "
                        "it?); drivers cannot be verified", path, problem)
            _proc_misc_problem_said = problem
        return None
    _proc_misc_problem_said = ""
    drivers: dict[str, int] = {}
    for line in data.decode("ascii", errors="replace").splitlines():
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
        (stat.S_ISCHR, "character device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISFIFO, "named pipe"),
    ):
        if test(mode):
            return name
    return "file of unknown type"


def directory_problem(path: str) -> str:
    """Why `path` cannot serve as a directory, in words."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "nor does its directory, yet"
    except OSError as e:
        return f"cannot stat {path}: {e.strerror}"
    return f"{path} is a {describe_file_type(st.st_mode)}, not a directory"


class NodeChecker:
    """Decides whether one kind of device node is usable, and says why not.

    Owns the memory of the last open() attempt: opening a node whose driver is
    missing makes the kernel try to load a module, so the node is opened again
    only when something about it (its identity, or its driver's presence in
    /proc/misc) has changed, never once per event or timer tick. A result is
    kept only if it belongs to the file it was obtained from: a node unlinked
    and re-created between lstat() and open() (a module reload, a udev rename)
    can get the same inode number and ctime, and a verdict about the old one
    must not stick to the new one.
    """

    def __init__(self, kind: DeviceKind, host_root: str) -> None:
        self.kind = kind
        self.node_path = os.path.join(host_root, kind.path.lstrip("/"))
        self._probe_key: tuple | None = None
        self._probe: tuple[str, str] = ("", "")
        self._refusal_logged = False

    def forget_errors(self, misc: dict[str, int] | None) -> None:
        """Let the next check open the node again unless its last open worked or
        was refused (those hold until the node changes), or found no driver
        while /proc/misc (`misc`) says whether one has come since."""
        outcome = self._probe[0]
        if outcome == "error" or (outcome == "nodriver" and misc is None):
            self._probe_key = None

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
            self._probe, opened = self._open_probe()
            # Kept only when the file opened is the file stat'ed; a node that
            # vanished or was replaced meanwhile is looked at again next time
            # (its unlink and re-creation woke the lifecycle loop already).
            same_file = opened is not None and (opened.st_dev, opened.st_ino, opened.st_rdev) == key[:3]
            self._probe_key = key if same_file or self._probe[0] in ("refused", "nodriver") else None
            if opened is not None and not same_file:
                return Verdict(False, f"{kind.path} was replaced while being checked")
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

    def _open_probe(self) -> tuple[tuple[str, str], os.stat_result | None]:
        """Open the node as a VMM would; for kvm ask its API version.

        Returns ((outcome, detail), the opened file's fstat or None), with
        outcome one of ok, refused (device cgroup or permissions), nodriver
        (ENODEV/ENXIO: no driver behind the minor) or error.
        """
        kind = self.kind
        try:
            # O_NOFOLLOW: the node was lstat'ed as a character device; a
            # symlink planted there since is not followed.
            fd = os.open(self.node_path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            if e.errno in (errno.EPERM, errno.EACCES):
                return ("refused", f"{name}: {e.strerror}"), None
            if e.errno in (errno.ENODEV, errno.ENXIO):
                return ("nodriver", name), None
            if e.errno == errno.ENOENT:
                return ("error", f"{kind.path} vanished while being checked"), None
            if e.errno == errno.ELOOP:
                return ("error", f"{kind.path} was replaced by a symbolic link while being checked"), None
            return ("error", f"cannot open {kind.path}: {name} {e.strerror}"), None
        try:
            opened = os.fstat(fd)
            if not kind.kvm_api:
                return ("ok", "opened read-write"), opened
            try:
                version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
            except OSError as e:
                return ("error", f"KVM_GET_API_VERSION on {kind.path} failed: {e.strerror}"), opened
            if version != KVM_API_VERSION:
                return ("error", f"KVM API version {version}, expected {KVM_API_VERSION}"), opened
            return ("ok", f"KVM API version {version}"), opened
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
IN_DONT_FOLLOW = 0x2000000
IN_MASK_ADD = 0x20000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = (
    IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ATTRIB
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
    # Watches are added again on every wake-up. Without IN_MASK_ADD the
    # kernel replaces a watch's mask by setting it to 0 and then to the new
    # bits, and an event in a directory in that instant is dropped (an
    # unlink of /dev/kvm went unseen until the safety net, about once in
    # 2,000). Adding the same bits changes nothing, so nothing is dropped.
    | IN_MASK_ADD
)
WAKE_ALWAYS = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then the name
MAX_SYMLINKS = 40  # the kernel's limit on links followed in one lookup


def lookup_chain(path: str) -> list[tuple[str, str]]:
    """Every (directory, name) the kernel looks up to reach the absolute
    `path`, following symbolic links as it does (a link's target is looked up
    in turn), up to the first name that is missing. Each directory is a path
    without links; a change to any of these entries can change what `path`
    names."""
    visited: list[tuple[str, str]] = []
    pending = collections.deque(part for part in path.split("/") if part)
    directory, links = "/", 0
    while pending:
        name = pending.popleft()
        if name == ".":
            continue
        if name == "..":
            directory = os.path.dirname(directory)
            continue
        visited.append((directory, name))
        entry = os.path.join(directory, name)
        try:
            st = os.lstat(entry)
        except OSError:
            break  # missing (or unreadable): its creation, in `directory`, is what to wait for
        if stat.S_ISLNK(st.st_mode) and links < MAX_SYMLINKS:
            links += 1
            try:
                target = os.readlink(entry)
            except OSError:
                break
            if target.startswith("/"):
                directory = "/"
            pending.extendleft(reversed([part for part in target.split("/") if part]))
        else:
            directory = entry
    return visited


class DirectoryWatcher:
    """Calls wake() when a file we care about changes, or anything on the way to it.

    `paths` are the files of interest. inotify watches an inode, not a path:
    a watch on /host/dev stays on the directory it was added to, and sees
    nothing when /host/dev, a symbolic link, is pointed elsewhere (that
    change is an entry in /host), nor when a directory on the way is renamed
    or replaced. So every directory the kernel passes through to reach a path
    is watched: each ancestor up to /, and, where a component is a symbolic
    link, the ancestors of its target too (see lookup_chain). A missing
    directory (no /dev/net yet) is covered by its parent's watch. Only events
    whose name is a component of such a lookup wake, so a busy /dev full of
    unrelated nodes costs a read, not a reconcile.

    The watches follow the paths: any waking event first re-resolves every
    path, adds watches on what they lead to now and drops the ones they no
    longer pass through, then wakes. The watch on a new directory is thus in
    place before the reconcile it triggers looks inside it: a node made in
    it after that look is an event, not a change left to the safety net.
    """

    def __init__(self, paths: list[str], wake: Callable[[], None]) -> None:
        self.paths = sorted(set(paths))
        self.names: set[str] = set()
        self.watches: dict[int, str] = {}  # watch descriptor -> directory
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
        """(Re)add watches. False, and watching stops, when out of watches."""
        if self.fd < 0 or self._libc is None:
            return False
        if not self._watch_lookups():
            log.warning(
                "out of inotify watches (fs.inotify.max_user_watches): "
                "polling every %.0f s instead", POLL_WITHOUT_INOTIFY_S,
            )
            self.close()
            return False
        return True

    def _watch_lookups(self) -> bool:
        """Watch every directory on the way to each path, and only those;
        False when out of watches."""
        assert self._libc is not None
        chains = [lookup_chain(path) for path in self.paths]
        self.names = {name for chain in chains for _, name in chain}
        watches: dict[int, str] = {}
        for directory in sorted({directory for chain in chains for directory, _ in chain}):
            # IN_DONT_FOLLOW: a link swapped in since the lookup is not
            # followed; its own directory's watch has seen the swap.
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), WATCH_MASK)
            if wd >= 0:
                watches[wd] = directory
            elif ctypes.get_errno() == errno.ENOSPC:
                return False
            # Otherwise gone or not a directory since the lookup: that
            # change was an event in its parent's watch.
        for wd in self.watches.keys() - watches.keys():
            self._libc.inotify_rm_watch(self.fd, wd)  # its IN_IGNORED wakes us once more: harmless
        self.watches = watches
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
                name = data[start:start + length].rstrip(b"\0").decode(errors="surrogateescape")
                offset = start + length
                if mask & WAKE_ALWAYS or name in self.names:
                    relevant = True
        if relevant:
            # Out of watches: the lifecycle loop's own sync() says so and polls.
            self._watch_lookups()
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
    were given the CDI name still need it).

    The directory is shared with other CDI producers, and whoever can write
    its parent can put a symbolic link in its place (rename a link over it,
    or swap the two with RENAME_EXCHANGE) between two of our calls: written
    by path, the spec, as root, would land wherever the link points,
    replacing a file of the same name there. So the directory is held open,
    opened without following a link at its last component, and every file
    is created, written, renamed and checked relative to that descriptor.
    Each refresh looks at what the path names now: another directory (one
    replaced on purpose) is opened afresh; a symbolic link is refused, said
    once. Its ancestors are resolved once, at startup: a configured
    /var/run/cdi, where /var/run is a link to /run on most hosts, is
    /run/cdi from then on, and a link swapped in above it later is not
    followed either. Only the directory itself must not be a link.
    """

    def __init__(self, directory: str, resource_name: str, kind: DeviceKind, permissions: str) -> None:
        vendor, _, device_class = resource_name.partition("/")
        parent, last = os.path.split(os.path.abspath(directory))
        self.directory = os.path.join(os.path.realpath(parent), last)
        self.name = f"{vendor}-{device_class}.json"
        self.path = os.path.join(self.directory, self.name)
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
        self.dir_fd = -1
        self.dir_identity: tuple[int, int] | None = None  # (device, inode) of the directory held
        self.written: tuple[int, int, int] | None = None  # identity of the file we wrote
        self.error_logged = False

    def _directory_held(self) -> bool:
        """Whether the path still names the directory we hold open."""
        try:
            st = os.stat(self.directory, follow_symlinks=False)
        except OSError:
            return False
        return self.dir_fd >= 0 and (st.st_dev, st.st_ino) == self.dir_identity

    def _spec_unchanged(self) -> bool:
        """The directory held holds the spec as we wrote it."""
        if self.written is None:
            return False
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_ctime_ns) == self.written

    def in_place(self) -> bool:
        """The spec as we wrote it is what a runtime reading the path finds."""
        return self._directory_held() and self._spec_unchanged()

    def _open_directory(self) -> None:
        """Hold the directory the path names now; OSError when it cannot be."""
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd, self.dir_identity = -1, None
        os.makedirs(self.directory, exist_ok=True)
        # O_NOFOLLOW: ELOOP when the last component is a symbolic link.
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(fd)
        self.dir_fd, self.dir_identity = fd, (st.st_dev, st.st_ino)

    def refresh(self) -> None:
        # The path is looked at once: it may change again meanwhile, and that
        # is the next wake-up's business, not a reason to write.
        held = self._directory_held()
        if held and self._spec_unchanged():
            return
        temporary = None
        try:
            if not held:
                self._open_directory()
                if self._spec_unchanged():
                    return  # the directory we wrote into is back, the spec in it as written
            # A fixed temporary name could be a planted symlink, and writing
            # through it would overwrite any file as root. So: a new file under
            # a random name, created exclusively, never through a link.
            # (tempfile.mkstemp does the same, but its import costs the daemon
            # 0.6 MB of RSS, and it takes no directory descriptor.)
            name = f".{self.name}.{os.urandom(6).hex()}"
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=self.dir_fd)
            temporary = name  # ours to remove if anything below fails
            with open(fd, "wb") as f:
                f.write(self.content)
                f.flush()
                os.fsync(fd)  # no empty spec after a crash
            # rename() replaces the file (or a link planted there) in one step:
            # a runtime reading the directory never sees half a spec.
            os.rename(temporary, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError as e:
            if temporary is not None:
                try:
                    os.unlink(temporary, dir_fd=self.dir_fd)
                except OSError:
                    pass
            if not self.error_logged:
                if os.path.islink(self.directory):
                    reason = (f"{self.directory} is a symbolic link, not a directory; not writing "
                              "through it (name the directory it should be in --cdi-spec-dir)")
                else:
                    reason = e.strerror or str(e)
                log.warning("%s: cannot write CDI spec %s: %s", self.resource_name, self.path, reason)
                self.error_logged = True
            return
        rewritten = self.written is not None or self.error_logged
        self.written = (st.st_dev, st.st_ino, st.st_ctime_ns)
        self.error_logged = False
        log.info("%s: %s CDI spec %s", self.resource_name, "rewrote" if rewritten else "wrote", self.path)


# ---------------------------------------------------------------------------
# What the kubelet sees: the DevicePlugin service
#
# One instance per resource: its device list and health verdict, and the
# answers to the kubelet's five calls, refusals included. It knows nothing of
# sockets or registration: the KubeletLink below serves it, and tells it
# which of its ListAndWatch streams is the kubelet's.
# ---------------------------------------------------------------------------


def quoted(text: str) -> str:
    """Peer-supplied text for a message or a log line: repr(), cut short.

    An error status travels in gRPC metadata (8 KiB at most): a 1 MB device
    ID echoed whole would turn INVALID_ARGUMENT into RESOURCE_EXHAUSTED.
    """
    if len(text) <= MAX_QUOTED_CHARS:
        return repr(text)
    return f"{text[:MAX_QUOTED_CHARS]!r}... ({len(text)} characters)"


class ThrottledLog:
    """Log lines that a peer causes at its own pace (each Allocate call causes
    one): a budget of LOG_BURST lines, refilled by one every LOG_REFILL_S; a
    line past the budget is counted by kind, and one line LOG_SUMMARY_S after
    the first of them gives the counts."""

    def __init__(self, resource_name: str) -> None:
        self.resource_name = resource_name
        self.budget = float(LOG_BURST)
        self.refilled_at = time.monotonic()
        self.left_out: collections.Counter[str] = collections.Counter()

    def __call__(self, kind: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        self.budget = min(float(LOG_BURST), self.budget + (now - self.refilled_at) / LOG_REFILL_S)
        self.refilled_at = now
        if self.budget >= 1.0:
            self.budget -= 1.0
            log.log(level, message, *args)
            return
        if not self.left_out:
            asyncio.get_running_loop().call_later(LOG_SUMMARY_S, self.report_left_out)
        self.left_out[kind] += 1

    def report_left_out(self) -> None:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.left_out.items()))
        log.warning("%s: %d calls not logged in the last %g s: %s (the metrics count every Allocate)",
                    self.resource_name, sum(self.left_out.values()), LOG_SUMMARY_S, counts)
        self.left_out.clear()


class ListAndWatchStream:
    """One open ListAndWatch call: woken on every health change, marked when it ends."""

    def __init__(self) -> None:
        self.from_kubelet = False  # KubeletLink.admit_stream decides,
        self.past_cap = False  # and whether it is let in past the cap
        self.opened_at = time.monotonic()
        self.changed = asyncio.Event()
        self.ended = asyncio.Event()


class DeviceService(pb_grpc.DevicePluginServicer):
    def __init__(self, kind: DeviceKind, resource_name: str, count: int, permissions: str,
                 host_root: str, cdi_spec_dir: str | None = None) -> None:
        self.kind = kind
        self.resource_name = resource_name
        self.count = count
        self.checker = NodeChecker(kind, host_root)
        self.cdi = CdiSpec(cdi_spec_dir, resource_name, kind, permissions) if cdi_spec_dir else None
        # The kubelet gets the node's own path, never the host-root-prefixed
        # one we look at: the runtime creates the node from the host's path.
        device = pb.DeviceSpec(container_path=kind.path, host_path=kind.path, permissions=permissions)
        self.answer = pb.ContainerAllocateResponse(devices=[device])
        self.answer_with_cdi = self.answer
        if self.cdi is not None:
            self.answer_with_cdi = pb.ContainerAllocateResponse(
                devices=[device], cdi_devices=[pb.CDIDevice(name=self.cdi.device_name)]
            )
        self.verdict = Verdict(False, "not checked yet")
        # Built on first use and kept: with --count 10000 building a list
        # takes tens of milliseconds, and health flaps back and forth.
        self.lists: dict[str, pb.ListAndWatchResponse] = {}
        self.streams: set[ListAndWatchStream] = set()  # every open ListAndWatch
        self.stopping = False
        # Set by the KubeletLink and the lifecycle loop.
        self.admit_stream: Callable[[ListAndWatchStream], bool] = lambda stream: True
        self.wake: Callable[[], None] = lambda: None
        self.allocations = 0  # container requests answered, whoever asked
        self.allocation_errors = 0
        self.log_call = ThrottledLog(resource_name)

    # -- health ---------------------------------------------------------------

    def device_list(self) -> pb.ListAndWatchResponse:
        """The full list, every device with the resource's one health.

        All devices of a resource share one node, so they are healthy or not
        together. IDs are deterministic (kvm0 ... kvm109): the kubelet
        checkpoints allocations by ID and must find them again after a plugin
        restart. A v1beta1 Device holds only an ID, a health and a topology:
        the verdict's reason reaches people through our log and Allocate's
        refusals, never the kubelet or the pod's status. Topology stays
        unset: these devices have no NUMA affinity, and a NUMA hint could make
        a single-numa-node policy reject pods.
        """
        health = self.verdict.state
        if health not in self.lists:
            self.lists[health] = pb.ListAndWatchResponse(
                devices=[pb.Device(ID=f"{self.kind.name}{i}", health=health) for i in range(self.count)]
            )
        return self.lists[health]

    def refresh_health(self, misc: dict[str, int] | None) -> None:
        verdict = self.checker.check(misc)
        if verdict == self.verdict:
            return
        self.verdict = verdict
        log.log(logging.INFO if verdict.healthy else logging.WARNING,
                "%s: %d devices %s: %s", self.resource_name, self.count, verdict.state, verdict.reason)
        for stream in self.streams:
            stream.changed.set()

    def stop_streams(self) -> None:
        """Have every stream send its last, empty list and end."""
        self.stopping = True
        for stream in self.streams:
            stream.changed.set()

    # -- the DevicePlugin service -------------------------------------------------
    # Every handler returns a message (gRPC turns a None into INTERNAL); a
    # refusal goes through context.abort() with a status and a message.

    async def GetDevicePluginOptions(self, request: pb.Empty, context: Context) -> pb.DevicePluginOptions:
        return PLUGIN_OPTIONS

    async def ListAndWatch(self, request: pb.Empty,
                           context: Context) -> AsyncIterator[pb.ListAndWatchResponse]:
        """Stream the full device list now and after every health change.

        The kubelet opens one stream per registration and reads it forever. If
        that stream ends while we are running, the kubelet marks every device
        unhealthy and never reconnects: the end of the kubelet's stream wakes
        the lifecycle loop, which registers again. Only the newest list ever
        waits to be sent: a reader that stops reading holds back one message,
        never a backlog (every change since folds into one wake-up).
        """
        stream = ListAndWatchStream()
        if not self.admit_stream(stream):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.resource_name}: already serving {MAX_OTHER_STREAMS} ListAndWatch streams "
                "to clients other than the kubelet",
            )
        self.streams.add(stream)
        try:
            while not self.stopping:
                yield self.device_list()
                await stream.changed.wait()
                stream.changed.clear()
            # An empty list makes the kubelet drop the devices at once instead
            # of keeping them unhealthy for five minutes.
            yield pb.ListAndWatchResponse()
        finally:
            self.streams.discard(stream)
            stream.ended.set()
            if stream.from_kubelet and not self.stopping:
                self.wake()

    async def GetPreferredAllocation(self, request: pb.PreferredAllocationRequest,
                                     context: Context) -> pb.PreferredAllocationResponse:
        return pb.PreferredAllocationResponse()  # never called: the option is off

    async def PreStartContainer(self, request: pb.PreStartContainerRequest,
                                context: Context) -> pb.PreStartContainerResponse:
        return pb.PreStartContainerResponse()  # never called: the option is off

    async def Allocate(self, request: pb.AllocateRequest, context: Context) -> pb.AllocateResponse:
        """Give each container the device node.

        The kubelet calls this at pod admission, once per container, and uses
        container_responses[0]; we answer one response per request anyway.
        It sets no deadline and admits pods one at a time, so a slow answer
        holds up every pod on the node: this answers from state kept ready
        (the responses, the last verdict; two stat() calls for the CDI spec),
        never by opening a device. An
        error here rejects the pod with our message in its status, so the
        message names the resource and what is wrong.
        """
        refusal = self.allocation_refusal(request)
        if refusal is not None:
            self.allocation_errors += 1
            self.log_call("refused", logging.WARNING, "%s", refusal[1])
            await context.abort(*refusal)
        self.allocations += len(request.container_requests)
        ids = [i for c in request.container_requests for i in c.devices_ids]
        shown = ",".join(ids[:8]) + (f",... ({len(ids)} IDs)" if len(ids) > 8 else "")
        self.log_call("allocated", logging.INFO, "%s: allocated %s", self.resource_name, shown)
        answer = self.answer_with_cdi if self.cdi is not None and self.cdi.in_place() else self.answer
        return pb.AllocateResponse(container_responses=[answer] * len(request.container_requests))

    def allocation_refusal(self, request: pb.AllocateRequest) -> tuple[grpc.StatusCode, str] | None:
        """Why this request must be refused (status code and message), or None."""
        name = self.resource_name
        if not request.container_requests:
            return grpc.StatusCode.INVALID_ARGUMENT, f"{name}: AllocateRequest has no container requests"
        # Checked before any per-ID work: no container can hold more devices
        # than there are, and a request naming half a million IDs would keep
        # the event loop (and every probe) waiting for seconds.
        if len(request.container_requests) > MAX_CONTAINER_REQUESTS:
            return grpc.StatusCode.INVALID_ARGUMENT, (
                f"{name}: AllocateRequest has {len(request.container_requests)} container requests; "
                f"a kubelet sends one per call, this plugin takes at most {MAX_CONTAINER_REQUESTS}"
            )
        most = max(len(container.devices_ids) for container in request.container_requests)
        if most > self.count or len(request.container_requests) > self.count:
            return grpc.StatusCode.INVALID_ARGUMENT, (
                f"{name}: AllocateRequest has {len(request.container_requests)} container requests, "
                f"one of {most} device IDs; this plugin has {self.count} devices"
            )
        for index, container in enumerate(request.container_requests):
            if not container.devices_ids:
                return (grpc.StatusCode.INVALID_ARGUMENT,
                        f"{name}: container request {index} has no device IDs")
            for device_id in container.devices_ids:
                if not self.is_known_id(device_id):
                    return grpc.StatusCode.INVALID_ARGUMENT, (
                        f"{name}: unknown device ID {quoted(device_id)} "
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

    async def decode(self, request_type: type[RequestT], raw: bytes, context: Context) -> RequestT:
        """The request as a message, or INVALID_ARGUMENT with one log line.

        gRPC itself would answer bytes that do not decode with UNKNOWN and log
        a traceback: a peer's garbage is not our bug.
        """
        try:
            return request_type.FromString(raw)
        except DecodeError:
            if request_type is pb.AllocateRequest:
                self.allocation_errors += 1  # a refused Allocate like any other
            message = (f"{self.resource_name}: {len(raw)} request bytes do not decode "
                       f"as {request_type.DESCRIPTOR.name}")
            self.log_call("refused", logging.WARNING, "%s", message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


def device_plugin_service(service: DeviceService) -> grpc.GenericRpcHandler:
    """The v1beta1.DevicePlugin service, decoding requests itself.

    Unlike the generated add_DevicePluginServicer_to_server, which lets gRPC
    decode (see DeviceService.decode for why not). The method table is read
    from the proto's descriptor, so it cannot drift from the stubs.
    """
    descriptor = pb.DESCRIPTOR.services_by_name["DevicePlugin"]
    return grpc.method_handlers_generic_handler(
        descriptor.full_name, {m.name: decoding_handler(service, m) for m in descriptor.methods}
    )


def decoding_handler(service: DeviceService, method: Any) -> grpc.RpcMethodHandler:
    request_type = getattr(pb, method.input_type.name)
    serialize = getattr(pb, method.output_type.name).SerializeToString
    implementation = getattr(service, method.name)
    if method.server_streaming:
        async def stream(raw: bytes, context: Context) -> AsyncIterator[Any]:
            request = await service.decode(request_type, raw, context)
            # aclosing: the generator's cleanup (the end of the kubelet's
            # stream wakes the lifecycle loop) runs now, not whenever the
            # garbage collector gets to it.
            async with contextlib.aclosing(implementation(request, context)) as responses:
                async for response in responses:
                    yield response
        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=serialize)

    async def unary(raw: bytes, context: Context) -> Any:
        return await implementation(await service.decode(request_type, raw, context), context)
    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)


# ---------------------------------------------------------------------------
# The link to the kubelet: socket, server, registration
#
# One instance per resource. It serves the resource's DeviceService on a
# socket of its own in the kubelet's directory, registers it with the
# kubelet, and tells the kubelet's ListAndWatch stream from other clients'.
# The lifecycle loop asks it one thing: be registered with the kubelet.sock
# that is there now.
# ---------------------------------------------------------------------------


def plugin_socket_name(device: str) -> str:
    # Our own prefix, so that an operator listing the directory sees whose
    # sockets these are; the kubelet only cares that it is a bare file name.
    return f"kvm-device-plugin-{device}.sock"


# Each server binds "<SPARE_DIR>/<device>.<6 random hex digits>" and is
# hard-linked to its socket name when a registration needs it (see
# PluginServer.make_spare); the instance socket binds "<its name>.<6 hex
# digits>". Every name bound is at most this many bytes longer than the
# socket name it stands for.
SPARE_DIR = ".kvm-device-plugin"
BIND_SUFFIX_BYTES = 7
URI_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/-._~")


def grpc_unix_target(path: str) -> str:
    """The gRPC target for the unix socket at the absolute `path` (main()
    makes the directory absolute: after "unix://" a relative path's first
    component would be read as the URI's authority).

    gRPC parses a target as a URI: '#' would start a fragment, '?' a query,
    and '%' escapes are decoded. Percent-encoding every other byte of the
    path gives it back to the kernel as it is. (A ',' still splits the
    address list in any form, so main() refuses a directory containing one.)
    """
    return "unix://" + "".join(chr(b) if b in URI_SAFE else f"%{b:02X}" for b in path.encode())


def bind_problem(path: str) -> str:
    """Why a unix socket cannot be bound at `path`. gRPC's own error says only
    "Failed to bind"; a bind of our own learns the kernel's reason."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(path)
    except OSError as e:
        return e.strerror or str(e)
    finally:
        probe.close()
    os.unlink(path)
    return "gRPC could not bind it (GRPC_VERBOSITY=debug says why)"


class PinnedFile:
    """A file held by an O_PATH descriptor, to be told from any file made at
    its path later.

    (device, inode) alone cannot: once a file is deleted its inode number is
    free, and a restarting kubelet's new kubelet.sock may get the old one's.
    ctime cannot either: a touch, chmod or chown by a node agent changes it,
    and this kernel changes a socket's once just after bind() and listen().
    Holding the file keeps its inode, and so its number, taken.
    """

    def __init__(self, path: str, fd: int) -> None:
        st = os.fstat(fd)
        self.path = path  # where it was pinned
        self.fd = fd
        self.key: tuple[int, int] | None = (st.st_dev, st.st_ino)

    @classmethod
    def at(cls, path: str) -> PinnedFile | None:
        try:
            return cls(path, os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC))
        except OSError:
            return None

    def is_at(self, path: str) -> bool:
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return False
        return self.key == (st.st_dev, st.st_ino)

    def close(self) -> None:
        if self.key is not None:
            os.close(self.fd)
            self.key = None


class Spare(NamedTuple):
    """A gRPC server, the path it bound and its start(): made ahead as the
    spare, then serving at the socket's name."""
    server: grpc.aio.Server
    path: str
    started: asyncio.Future


class PluginServer:
    """The resource's gRPC server at its socket's name in the kubelet's
    directory, the spare that will replace it, and old ones still stopping."""

    def __init__(self, service: DeviceService, plugin_dir: str) -> None:
        self.service = service
        self.socket_path = os.path.join(plugin_dir, plugin_socket_name(service.kind.name))
        self.spare_dir = os.path.join(plugin_dir, SPARE_DIR)
        self.current: Spare | None = None  # the server at the socket's name
        self.socket: PinnedFile | None = None  # the socket file the server is at
        self.spare: Spare | None = None
        self.stopping: set[asyncio.Future] = set()  # stops still finishing

    def intact(self) -> bool:
        return self.socket is not None and self.socket.is_at(self.socket_path)

    def prepare_spare(self) -> None:
        if self.spare is None:
            with contextlib.suppress(OSError):  # registering will try again and say why
                self.spare = self.make_spare()

    def make_spare(self) -> Spare:
        """A fresh server, bound and starting, for the next registration.

        A starting kubelet admits the pods it already has 10-200 ms (mostly
        55-70 ms) after it listens, and fails those whose resource has not
        sent its first list by then; building a gRPC server takes 12-16 ms a resource while
        the kubelet keeps both cores busy. So the next server is made ahead,
        in a directory of ours inside the kubelet's: kubelets delete every
        file (up to 1.32) or every socket (1.33 on) there when they start,
        but no directory. Its name is random, so that no one can plant a file
        at every name it might use.
        """
        try:
            os.makedirs(self.spare_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot make {self.spare_dir}: {e.strerror}") from None
        path = os.path.join(self.spare_dir, f"{self.service.kind.name}.{os.urandom(3).hex()}")
        # A request holds device IDs, a few bytes each and never more than
        # count of them. gRPC's default limit (4 MiB) lets any client have us
        # decode 500,000 container requests: 0.5 s on the loop and 70 MB of
        # RSS kept afterwards, an OOM kill under the DaemonSet's limit.
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", 65536 + 16 * self.service.count),
            # Connection floods (see MAX_CONNECTIONS): past the cap gRPC
            # accepts and closes at once; connections without a call are
            # closed after a while (the kubelet's always has its stream).
            ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
            ("grpc.max_connection_idle_ms", CONNECTION_IDLE_MS),
            # HTTP/2 rapid reset (see MAX_STREAMS_PER_CONNECTION): a stream
            # the client reset keeps counting against the limit until gRPC
            # has let go of it, so a resetting client gets refused streams.
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            ("grpc.http.overload_protection", 1),
        ])
        server.add_generic_rpc_handlers((device_plugin_service(self.service),))
        try:
            server.add_insecure_port(grpc_unix_target(path))  # binds the path now
        except RuntimeError:
            problem = bind_problem(path)
            raise OSError(f"cannot bind a socket in {self.spare_dir}: {problem}") from None
        return Spare(server, path, asyncio.ensure_future(server.start()))

    async def restart(self, old_stream_ended: asyncio.Event | None) -> None:
        """Stop the old server, then serve the spare at our socket's name.

        Stopping first ends the old stream before the new registration, as
        kubelets up to at least 1.36 need (the old connection's end could
        tear down the new one). A stopping gRPC server deletes the file at
        the path it bound, maybe long after stop() (see stop): that is the
        spare's own name, never the socket name the kubelet dials.
        """
        await self.stop(None, old_stream_ended)
        spare, self.spare = self.spare, None
        if spare is None:
            spare = self.make_spare()
        # Held before the start is awaited: a registration cancelled meanwhile
        # leaves a server that the next stop() stops, not an orphan.
        self.current = spare
        await asyncio.shield(spare.started)
        self.socket = PinnedFile.at(spare.path)
        self.take_socket_path(spare.path)

    def take_socket_path(self, spare_path: str) -> None:
        """Hard-link the spare to our socket name, over whatever is there: a
        killed run's socket, a file, an empty directory (what a hostPath mount
        of a missing file leaves). A directory with something in it is not
        ours."""
        try:
            try:
                os.link(spare_path, self.socket_path)  # the usual case: a kubelet deleted ours
            except FileExistsError:
                temporary = f"{self.socket_path}.{os.urandom(3).hex()}"
                os.link(spare_path, temporary)
                try:
                    if os.path.isdir(self.socket_path) and not os.path.islink(self.socket_path):
                        os.rmdir(self.socket_path)
                    os.rename(temporary, self.socket_path)  # in one step: never no socket there
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temporary)
        except OSError as e:
            raise OSError(f"cannot put a socket at {self.socket_path}: {e.strerror}") from None

    async def stop(self, grace: float | None, old_stream_ended: asyncio.Event | None) -> None:
        """Stop the current server, waiting only for what must end first.

        gRPC's stop() waits for every call, and a call whose reader stopped
        reading never ends (HTTP/2 flow control). So we wait at shutdown for
        the `grace` the streams get to send their empty list, and before a new
        registration until the kubelet's stream has ended; the rest of the
        stop finishes in the background.
        """
        current, self.current = self.current, None
        socket_file, self.socket = self.socket, None
        if socket_file is not None:
            # Both of its names, if they are still its own: the server would
            # remove its bound name only when it has finished stopping.
            for path in (self.socket_path, socket_file.path):
                if socket_file.is_at(path):
                    try:
                        os.unlink(path)
                    except OSError as e:  # gone already, or a read-only directory: stop anyway
                        if e.errno != errno.ENOENT:
                            log.warning("%s: cannot remove %s: %s",
                                        self.service.resource_name, path, e.strerror)
            socket_file.close()
        if current is None:
            return
        stopping = self.stop_in_background(current, grace)
        if grace is not None:
            await asyncio.wait([stopping], timeout=grace + STOP_TIMEOUT_S)
        elif old_stream_ended is not None:
            # Not wait_for(): before Python 3.12 it can swallow a cancellation
            # that comes as the stream ends, and a cancelled registration would
            # then go on beside its successor, on the same server.
            ended = asyncio.ensure_future(old_stream_ended.wait())
            try:
                await asyncio.wait([ended], timeout=STOP_TIMEOUT_S)
            finally:
                ended.cancel()

    def stop_in_background(self, spare: Spare, grace: float | None) -> asyncio.Future:
        async def stop() -> None:
            # Stopping a server whose start() has not finished crashes gRPC's
            # core (SIGSEGV, seen at SIGTERM during a registration).
            await asyncio.wait([spare.started])
            await spare.server.stop(grace)
        stopping = asyncio.ensure_future(stop())
        self.stopping.add(stopping)
        stopping.add_done_callback(self.stopping.discard)
        return stopping

    async def close(self) -> None:
        spare, self.spare = self.spare, None
        if spare is not None:
            with contextlib.suppress(OSError):
                os.unlink(spare.path)
            await asyncio.wait([self.stop_in_background(spare, 0)],
                               timeout=STOP_TIMEOUT_S)
        await self.stop(SHUTDOWN_GRACE_S, None)
        with contextlib.suppress(OSError):  # the last resource's close removes it
            os.rmdir(self.spare_dir)

    async def problem(self) -> str | None:
        """Why the server is not alive, or None."""
        name = self.service.resource_name
        if len(self.stopping) > MAX_SERVERS_STOPPING:
            return (f"{name}: {len(self.stopping)} old gRPC servers cannot finish stopping "
                    "(clients that stopped reading hold them)")
        current = self.current
        if not self.intact():
            return None  # between servers: the lifecycle loop is on it
        try:
            async with grpc.aio.insecure_channel(
                grpc_unix_target(self.socket_path), options=CHANNEL_OPTIONS
            ) as channel:
                await pb_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
                    pb.Empty(), timeout=SELF_CHECK_TIMEOUT_S
                )
        except grpc.aio.AioRpcError as e:
            if self.current is not current or not self.intact():
                return None  # a kubelet restart deleted the socket meanwhile: no flapping
            return f"{name}: server does not answer ({e.code().name})"
        return None


class KubeletLink:
    def __init__(self, service: DeviceService, plugin_dir: str) -> None:
        self.service = service
        service.admit_stream = self.admit_stream
        self.server = PluginServer(service, plugin_dir)
        self.kubelet_socket = os.path.join(plugin_dir, KUBELET_SOCKET)
        self.wake: Callable[[], None] = lambda: None  # the lifecycle loop's
        self.awaiting_kubelet_stream = False  # Register sent on the current server
        self.kubelet_stream: ListAndWatchStream | None = None
        self.kubelet: PinnedFile | None = None  # the kubelet.sock registered, or registering, with
        self.registered_at: float | None = None  # when Register with it returned
        self.registration: asyncio.Task | None = None
        self.outage_started: float | None = None  # when registering became necessary
        self.registration_started = 0.0
        self.registrations = 0  # successful Register calls

    # -- what the lifecycle loop and the probes ask -------------------------------

    def registering(self) -> bool:
        return self.registration is not None and not self.registration.done()

    def is_registered_with(self, kubelet: PinnedFile | None) -> bool:
        return (kubelet is not None and kubelet is self.kubelet and self.registered_at is not None
                and self.kubelet_stream is not None and not self.kubelet_stream.ended.is_set())

    def reconcile(self, kubelet: PinnedFile | None) -> None:
        """Register with `kubelet` (the kubelet.sock there now) unless done or under way."""
        reason = self.reason_to_register(kubelet)
        if not self.registering():
            self.server.prepare_spare()
        if reason is None or kubelet is None:
            return
        if self.registration is not None and self.registering():
            # A Register to a kubelet that is going away can hang for its 10 s
            # dial-back; the new kubelet must not wait for that.
            self.registration.cancel()
        now = time.monotonic()
        if self.outage_started is None:
            self.outage_started = now
        if self.registrations:
            log.info("%s: registering again: %s", self.service.resource_name, reason)
        # A kubelet (the same one: a new one is always served at once) that
        # ends every stream right after registering would otherwise have us
        # register again at full speed, forever.
        refused = (kubelet is self.kubelet and self.kubelet_stream is not None
                   and self.kubelet_stream.ended.is_set() and self.registered_at is not None
                   and now - self.registered_at < STREAM_MIN_LIFE_S)
        self.kubelet, self.registered_at = kubelet, None
        self.registration_started = now
        self.registration = asyncio.create_task(self._register(kubelet, RETRY_MAX_S if refused else 0.0))

    def reason_to_register(self, kubelet: PinnedFile | None) -> str | None:
        if kubelet is None:
            return None
        if kubelet is not self.kubelet:
            return "not registered yet" if self.kubelet is None else "kubelet.sock was re-created"
        if self.registered_at is None:
            return None if self.registering() else "not registered yet"
        if not self.server.intact():
            return "plugin socket was deleted"
        if self.kubelet_stream is None:
            if time.monotonic() - self.registered_at > STREAM_EXPECTED_WITHIN_S:
                return f"kubelet opened no ListAndWatch stream within {STREAM_EXPECTED_WITHIN_S:.0f} s"
        elif self.kubelet_stream.ended.is_set():
            return "kubelet ended the ListAndWatch stream"
        return None

    def admit_stream(self, stream: ListAndWatchStream) -> bool:
        """The kubelet's stream is the first ListAndWatch on the current server
        after Register was sent: no peer credentials reach a gRPC handler, so
        this is a guess. It errs on the safe side (another client that wins
        the race and drops its stream costs one more registration), and a few
        streams opened close to it get past the cap of other clients' streams,
        in case the kubelet's came second."""
        if self.awaiting_kubelet_stream and self.kubelet_stream is None:
            stream.from_kubelet = True
            self.kubelet_stream = stream
            return True
        others = [s for s in self.service.streams if not s.from_kubelet]
        if len(others) < MAX_OTHER_STREAMS:
            return True
        first = self.kubelet_stream
        if (first is None or stream.opened_at - first.opened_at > KUBELET_STREAM_GRACE_S
                or sum(s.past_cap for s in others) >= KUBELET_STREAM_GRACE_STREAMS):
            return False
        stream.past_cap = True
        return True

    async def liveness_problem(self) -> str | None:
        pending = time.monotonic() - self.registration_started
        if self.registering() and pending > REGISTRATION_OVERDUE_S:
            return f"{self.service.resource_name}: registration under way for {pending:.0f} s"
        return await self.server.problem()

    async def restart_server(self) -> None:
        """A fresh server for a new registration: the old one's kubelet stream
        is no longer the kubelet's."""
        old_stream, self.kubelet_stream = self.kubelet_stream, None
        self.awaiting_kubelet_stream = False
        await self.server.restart(old_stream.ended if old_stream is not None else None)

    # -- registration -------------------------------------------------------------------

    async def _register(self, kubelet: PinnedFile, pause: float) -> None:
        name = self.service.resource_name
        delay = RETRY_FIRST_S
        logged_cause = ""
        served = self.server.intact() and not self.awaiting_kubelet_stream  # no Register sent on it yet
        try:
            await asyncio.sleep(pause)
            while True:
                if not kubelet.is_at(self.kubelet_socket):
                    return  # that kubelet is gone; the lifecycle loop serves the new one
                unexpected: Exception | None = None
                try:
                    if not served or not self.server.intact():
                        await self.restart_server()
                        served = True
                    await self._call_register()
                    break
                except grpc.aio.AioRpcError as e:
                    # Said once per status code: the details of a refused
                    # connection differ every time.
                    cause, error = e.code().name, f"{e.code().name}: {e.details()}"
                    transient = e.code() == grpc.StatusCode.UNAVAILABLE
                    # The kubelet answered but refused: maybe because its dial-back
                    # found every connection slot of our server taken (see
                    # MAX_CONNECTIONS). The next attempt serves on a new server.
                    served = transient
                except (OSError, RuntimeError) as e:
                    cause = error = str(e)
                    transient = True
                except Exception as e:  # noqa: BLE001 - a bug, or a case no one foresaw
                    # Logged once with its traceback, then retried like a
                    # refusal: a daemon that gives up leaves the node at 0.
                    cause = error = f"{type(e).__name__}: {e}"
                    transient, unexpected = False, e
                # A refusal is worth a line once it has lasted about a second
                # (the retries have slowed to RETRY_MAX_S); a rejection by the
                # kubelet (invalid name, ...) at once. Each cause only once.
                if cause != logged_cause and (delay >= RETRY_MAX_S or not transient):
                    log.warning("%s: registration with %s failed (%s); retrying every %.0f s at most",
                                name, self.kubelet_socket, error, RETRY_MAX_S, exc_info=unexpected)
                    logged_cause = cause
                self.server.prepare_spare()  # while waiting anyway: for the next try, or kubelet
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            now = time.monotonic()
            self.registered_at = now
            took_ms = (now - (self.outage_started or now)) * 1000
            self.outage_started = None
            again = "again " if self.registrations else ""
            self.registrations += 1
            log.info("%s: registered %swith the kubelet after %.0f ms (%d devices %s)",
                     name, again, took_ms, self.service.count, self.service.verdict.state)
        finally:
            self.wake()  # the socket or the kubelet may have changed meanwhile

    async def _call_register(self) -> None:
        async with grpc.aio.insecure_channel(
            grpc_unix_target(self.kubelet_socket), options=CHANNEL_OPTIONS
        ) as channel:
            # From here on the kubelet may dial back and open its stream; a
            # retried Register makes it open a new one.
            self.awaiting_kubelet_stream = True
            self.kubelet_stream = None
            await pb_grpc.RegistrationStub(channel).Register(
                pb.RegisterRequest(
                    version=API_VERSION,
                    endpoint=os.path.basename(self.server.socket_path),  # a bare name inside plugin_dir
                    resource_name=self.service.resource_name,
                    options=PLUGIN_OPTIONS,
                ),
                timeout=REGISTER_TIMEOUT_S,
            )

    async def shutdown(self) -> None:
        if self.registration is not None:
            self.registration.cancel()
        self.service.stop_streams()
        await self.server.close()


# ---------------------------------------------------------------------------
# The lifecycle loop
#
# One loop reconciles everything: on every wake-up (inotify, a stream ending, a
# registration finishing, a signal, or the periodic safety net) it re-checks
# every device, looks at which kubelet.sock is there, and has each link
# register with it where it is not registered already.
# ---------------------------------------------------------------------------


# The name of the socket that says "an instance of this plugin serves here".
INSTANCE_SOCKET = "kvm-device-plugin.sock"


def unix_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


class InstanceSocket:
    """Holds a listening socket at a fixed name in the plugin directory, the
    proof that this is the one instance serving it.

    Two instances on one directory would replace each other's sockets
    silently. A flock on the directory would keep a second one out, but any
    process that can read the directory (a pod with a read-only mount of it)
    can hold a shared flock and keep every instance out; and a lock file would
    not last, since kubelets up to 1.32 delete every file there when they
    start. Making a socket takes write access; a live one accepts connections
    while a killed run's leftover refuses them; and one that a kubelet
    deleted is made again at the next reconcile.
    """

    def __init__(self, plugin_dir: str) -> None:
        self.path = os.path.join(plugin_dir, INSTANCE_SOCKET)
        self.listener: socket.socket | None = None
        self.file: PinnedFile | None = None

    def hold(self) -> bool:
        """Hold the name, or False when another live instance holds it."""
        if self.file is not None and self.file.is_at(self.path):
            return True
        self.release()
        if self.other_instance_answers():
            return False
        listener = unix_socket()
        bind_path = f"{self.path}.{os.urandom(3).hex()}"
        try:
            listener.bind(bind_path)
            listener.listen(8)
            self.file = PinnedFile.at(bind_path)
            # rename() replaces a killed run's leftover in one step. Should two
            # instances start together, the later rename wins, and the other
            # sees at its next reconcile that the name answers for someone else.
            os.rename(bind_path, self.path)
        except OSError:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(bind_path)
            self.release()
            return True  # cannot write here: registration will say why
        asyncio.get_running_loop().add_reader(listener.fileno(), self.answer)
        self.listener = listener
        return True

    def answer(self) -> None:
        """Accept and close: being there is the whole answer."""
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.accept()[0].close()

    def other_instance_answers(self) -> bool:
        probe = unix_socket()
        try:
            probe.connect(self.path)
        except BlockingIOError:
            return True  # its backlog is full: alive, and busy
        except OSError:
            return False  # nothing there, or a dead instance's leftover
        finally:
            probe.close()
        return True

    def release(self) -> None:
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        if self.file is not None:
            if self.file.is_at(self.path):
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            self.file.close()
            self.file = None


class Daemon:
    def __init__(self, links: list[KubeletLink], plugin_dir: str,
                 status_port: int | None = None, status_address: str | None = None) -> None:
        self.links = links
        for link in links:
            link.wake = link.service.wake = self.wake
        self.plugin_dir = plugin_dir
        self.kubelet_socket = os.path.join(plugin_dir, KUBELET_SOCKET)
        self.kubelet: PinnedFile | None = None  # the kubelet.sock there at the last reconcile
        self.kubelet_seen = False
        self.waiting_logged = False
        self.woken = asyncio.Event()
        self.stop_requested = False
        self.exit_code = 0
        self.instance = InstanceSocket(plugin_dir)
        self.loop_errors_seen: set[tuple] = set()
        watched = [self.kubelet_socket, self.instance.path]
        for link in links:
            watched += [link.server.socket_path, link.service.checker.node_path]
            if link.service.cdi is not None:
                watched.append(link.service.cdi.path)
        self.watcher = DirectoryWatcher(watched, self.wake)
        self.poll_s = RECHECK_S
        self.status = StatusEndpoint(self, status_port, status_address) if status_port is not None else None

    def wake(self) -> None:
        self.woken.set()

    def is_ready(self, link: KubeletLink) -> bool:
        kubelet = self.kubelet
        return kubelet is not None and kubelet.is_at(self.kubelet_socket) and link.is_registered_with(kubelet)

    def not_ready(self) -> list[str]:
        return [f"{link.service.resource_name}: not registered with a stream open" for link in self.links
                if self.stop_requested or not self.is_ready(link)]

    async def not_alive(self) -> list[str]:
        results = await asyncio.gather(*(link.liveness_problem() for link in self.links))
        return [problem for problem in results if problem]

    def request_stop(self, signum: int) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        self.stop_requested = True
        self.wake()

    def log_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's report of an error nobody awaited (a failed accept(), a
        task's exception): logged once per cause, with its traceback, so that
        a peer repeating it cannot flood the log."""
        error = context.get("exception")
        cause = (context.get("message"), type(error).__name__, getattr(error, "errno", None))
        if cause in self.loop_errors_seen:
            return
        self.loop_errors_seen.add(cause)
        log.error("%s (%r); further ones like it are not logged", context.get("message"), error,
                  exc_info=error)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self.log_loop_error)
        # As PID 1 in a container SIGTERM would otherwise do nothing, and the
        # default action of the others is to die without a word: sockets left
        # behind, the kubelet never told. SIGHUP and SIGQUIT ask a daemon to
        # stop as much as SIGTERM does; SIGUSR1 and SIGUSR2 mean nothing here.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        for signum in (signal.SIGUSR1, signal.SIGUSR2):
            loop.add_signal_handler(signum, log.info, "ignoring %s", signal.Signals(signum).name)
        if not self.watcher.start(loop):
            self.poll_s = POLL_WITHOUT_INOTIFY_S
        if self.status is not None:
            try:
                await self.status.start()
            except OSError as e:
                log.error("cannot serve metrics on %s port %d: %s",
                          self.status.address or "every interface", self.status.port, e.strerror)
                return 1
        last_recheck = time.monotonic()
        try:
            while not self.stop_requested:
                self.woken.clear()
                # The safety net, on its own clock (a steady trickle of events
                # must not postpone it).
                recheck = time.monotonic() - last_recheck >= self.poll_s
                if recheck:
                    last_recheck = time.monotonic()
                try:
                    self.reconcile(recheck)
                except Exception as e:  # noqa: BLE001 - a bug: say so, keep the node served
                    self.log_loop_error(loop, {"message": "reconcile failed", "exception": e})
                    await asyncio.sleep(RETRY_MAX_S)  # not at the pace of events
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.woken.wait(), timeout=self.poll_s)
        finally:
            await asyncio.gather(*(link.shutdown() for link in self.links))
            self.instance.release()
            self.watcher.close()
            if self.status is not None:
                await self.status.close()
        log.info("stopped")
        return self.exit_code

    def reconcile(self, recheck: bool = False) -> None:
        misc = read_proc_misc()
        for link in self.links:
            if recheck:
                # A check that failed for a passing reason (the node vanished
                # while being opened) is made again.
                link.service.checker.forget_errors(misc)
            link.service.refresh_health(misc)
        if self.watcher.fd >= 0 and not self.watcher.sync():
            self.poll_s = POLL_WITHOUT_INOTIFY_S
        if not os.path.isdir(self.plugin_dir):
            problem = directory_problem(self.plugin_dir)
            self.note_kubelet(None, f"{self.kubelet_socket} does not exist ({problem})")
            return
        if not self.instance.hold():
            log.error("another kvm-device-plugin is already serving %s (its %s answers); refusing to "
                      "take over its sockets", self.plugin_dir, INSTANCE_SOCKET)
            self.exit_code = 1
            self.stop_requested = True
            return
        # Only the one instance writes anything, CDI specs included.
        for link in self.links:
            if link.service.cdi is not None:
                link.service.cdi.refresh()
        if self.kubelet is None or not self.kubelet.is_at(self.kubelet_socket):
            self.note_kubelet(PinnedFile.at(self.kubelet_socket), f"{self.kubelet_socket} does not exist")
        for link in self.links:
            link.reconcile(self.kubelet)

    def note_kubelet(self, kubelet: PinnedFile | None, why_absent: str) -> None:
        """Take `kubelet` as the kubelet.sock there now; log its coming and
        going once, not once per wake-up."""
        if self.kubelet is not None:
            self.kubelet.close()
        self.kubelet = kubelet
        if kubelet is None:
            if not self.waiting_logged:
                log.info("waiting for the kubelet: %s", why_absent)
                self.waiting_logged = True
            return
        if self.kubelet_seen:
            log.info("kubelet restarted: %s was re-created", self.kubelet_socket)
        elif self.waiting_logged:
            log.info("kubelet appeared: %s", self.kubelet_socket)
        self.kubelet_seen = True
        self.waiting_logged = False


# ---------------------------------------------------------------------------
# Probes and metrics
#
# The Device Plugin API cannot tell anyone whether a plugin is registered, and
# "0 allocatable" on a node says nothing about why. One small HTTP endpoint on
# the same event loop answers the kubelet's probes and Prometheus:
#   /readyz   200 when every resource is registered with the kubelet.sock that
#             exists now and its ListAndWatch stream is open;
#   /healthz  200 when the loop answers, every server whose socket is in
#             place answers GetDevicePluginOptions, and no registration has
#             been under way for over REGISTRATION_OVERDUE_S (a blocked loop
#             answers nothing, so the probe times out);
#   /metrics  devices, health, registrations and allocations per resource.
# HTTP probes cost the node nothing between calls, where an exec probe would
# start a Python process with gRPC every few seconds (~0.25 s of CPU each).
# asyncio's own streams serve it: http.server would need a thread, and its
# import (ssl, email) alone costs 2.5 MB of RSS. The port is
# reachable from the pod network, unauthenticated: every connection is bounded
# in bytes, time and number, and answers read state, never change it.
# ---------------------------------------------------------------------------

class StatusEndpoint:
    def __init__(self, daemon: Daemon, port: int, address: str | None) -> None:
        self.daemon = daemon
        self.port = port
        self.address = address  # None: every interface
        self.server: asyncio.base_events.Server | None = None
        # Connections whose request has not arrived yet, oldest first, with
        # their peer's address. Those being answered are not here: they end
        # within SELF_CHECK_TIMEOUT_S, and are never dropped.
        self.waiting: dict[asyncio.StreamWriter, str] = {}
        self._alive_check: asyncio.Future | None = None
        self._alive_checked_at = 0.0

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._serve, host=self.address, port=self.port, limit=HTTP_MAX_REQUEST_BYTES
        )
        log.info("serving /metrics, /healthz and /readyz on %s port %d",
                 self.address or "every interface", self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def alive_problems(self) -> list[str]:
        """Daemon.not_alive(), computed at most once per HEALTHZ_REUSE_S."""
        now = time.monotonic()
        if self._alive_check is None or now - self._alive_checked_at > HEALTHZ_REUSE_S:
            self._alive_check = asyncio.ensure_future(self.daemon.not_alive())
            self._alive_checked_at = now
        # Shielded: a client that hangs up must not cancel the others' answer.
        return await asyncio.shield(self._alive_check)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.waiting[writer] = str((writer.get_extra_info("peername") or ("",))[0])
        if len(self.waiting) > HTTP_MAX_CONNECTIONS:
            # Drop the oldest waiting connection of the address that holds the
            # most: a flood from one pod evicts its own connections, never the
            # kubelet's probe, and a real client, which sends its request
            # within milliseconds, is served even amid idle connections.
            busiest = collections.Counter(self.waiting.values()).most_common(1)[0][0]
            oldest = next(w for w, address in self.waiting.items() if address == busiest)
            oldest.transport.abort()
            del self.waiting[oldest]
        try:
            request_line = await asyncio.wait_for(self._read_request(reader), HTTP_REQUEST_TIMEOUT_S)
            self.waiting.pop(writer, None)
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
                problems = await self.alive_problems()
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
            self.waiting.pop(writer, None)
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> bytes:
        """The request line; the headers are read and ignored (none matters here)."""
        request_line = await reader.readline()  # ValueError past the reader's limit
        received = len(request_line)
        while received <= HTTP_MAX_REQUEST_BYTES:
            line = await reader.readline()
            if not line.strip():
                return request_line
            received += len(line)
        raise ValueError("request too large")

    def metrics(self) -> str:
        links = self.daemon.links
        families: list[tuple[str, str, str, Callable[[KubeletLink], int]]] = [
            ("devices", "gauge", "Devices advertised to the kubelet.", lambda link: link.service.count),
            ("healthy_devices", "gauge", "Devices advertised Healthy.",
             lambda link: link.service.count if link.service.verdict.healthy else 0),
            ("registered", "gauge", "1 while registered with the kubelet and its stream is open.",
             lambda link: int(self.daemon.is_ready(link))),
            ("registrations_total", "counter", "Successful registrations with the kubelet.",
             lambda link: link.registrations),
            ("reregistrations_total", "counter",
             "Registrations after the first (kubelet restarts, ended streams, deleted sockets).",
             lambda link: max(link.registrations - 1, 0)),
            ("allocations_total", "counter",
             "Container requests answered with the device (by the kubelet or any other client).",
             lambda link: link.service.allocations),
            ("allocation_errors_total", "counter", "Allocate calls refused (by anyone's request).",
             lambda link: link.service.allocation_errors),
        ]
        lines = []
        for name, kind, help_text, value in families:
            metric = f"kvm_device_plugin_{name}"
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
            lines += [f'{metric}{{resource="{link.service.resource_name}"}} {value(link)}' for link in links]
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
    parser.add_argument("--metrics-address", default=None,
                        help="the address to serve them on (default: every interface, as Prometheus "
                             "in the pod network needs; 127.0.0.1 for the node alone)")
    parser.add_argument("--cdi-spec-dir", default=None,
                        help="also write a CDI spec per resource here (for example /var/run/cdi) and name "
                             "it in Allocate (default off)")
    parser.add_argument("--check", action="store_true",
                        help="check the device nodes, print one line each, exit 0 if all are healthy")
    return parser


# Peer text reaches log lines: a Register error's details (whatever created
# kubelet.sock chose them), device IDs, file names, an exception's message. A
# log line is what an operator and a log pipeline trust, so every character
# that could end a line (\n, \r, NEL, U+2028/2029, VT, FF, FS...), move a
# terminal's cursor (ESC, CSI) or reorder text (bidi controls) is written as
# an escape. Done in the formatters, the one place every line passes, ours and
# gRPC's, rather than at each call that might carry a peer's words.
LOG_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]},
    **{code: f"\\u{code:04x}" for code in [0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
                                          *range(0x2066, 0x206A)]},
    ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r",  # as repr() writes them
}


def escaped(text: str) -> str:
    return text.translate(LOG_ESCAPES)


class TextFormatter(logging.Formatter):
    """2026-11-26T23:59:01.123Z INFO message: UTC, so nodes' logs line up.

    One record is one line, whatever its message holds; a traceback is the
    only thing that spans lines (see formatException)."""

    converter = staticmethod(time.gmtime)
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escaped(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        """The traceback, Python's way, but with each exception's own text
        escaped: its frames are our code's and gRPC's, its message may be a
        peer's (an AioRpcError prints the details it was sent, line breaks
        and all)."""
        error: BaseException | None = ei[1]
        parts: list[str] = []
        seen: set[int] = set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            summary = "".join(traceback.format_exception_only(type(error), error)).rstrip("\n")
            parts.append("Traceback (most recent call last):\n"
                         + "".join(traceback.format_tb(error.__traceback__)) + escaped(summary))
            if error.__cause__ is not None:
                parts.append("\nThe above exception was the direct cause of the following exception:\n")
                error = error.__cause__
            elif error.__context__ is not None and not error.__suppress_context__:
                parts.append("\nDuring handling of the above exception, another exception occurred:\n")
                error = error.__context__
            else:
                error = None
        return "\n".join(reversed(parts))


class JsonFormatter(TextFormatter):
    """One JSON object per line: {"time", "level", "message"}, and "exception"
    with the traceback when there is one. json.dumps escapes every control
    character (and, with ensure_ascii, all non-ASCII); the message is escaped
    as in text, so that a pipeline showing it unquoted shows one line too."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "message": escaped(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class GrpcPerCallErrorFilter(logging.Filter):
    """Drops what gRPC logs, with a traceback, every time a peer does a thing
    that the plugin already handles, so that a peer cannot flood the log:

    - ExecuteBatchError: a stream whose peer went away in the middle of a
      message (a kubelet restart does that to a large list); the stream's end
      is handled like any other;
    - "Invalid encoding": a peer sent text that is not UTF-8 (a Register
      error's grpc-message, a method name); gRPC decodes it as latin-1 anyway,
      and where it matters the plugin's own line quotes it, once.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Invalid encoding")
                    or "ExecuteBatchError" in record.getMessage())


def resolve_permissions(choice: str) -> str:
    if choice != "auto":
        return choice
    # On a cgroup v2 host, older runc's eBPF device filter refuses access() on
    # the node unless "m" (mknod) is granted too; KubeVirt uses rwm there.
    return "rwm" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "rw"


def non_root_access(path: str) -> str | None:
    """The node's mode, owner and group, and whether a container process that
    is not root can open it read-write as it is; None when it is not there.

    The runtime creates the container's node with the host node's mode, uid
    and gid, unless it is told to give it the pod's (containerd and CRI-O:
    device_ownership_from_security_context). Without CAP_DAC_OVERRIDE only
    the permission bits decide.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    owner = f"{stat.filemode(st.st_mode)} uid {st.st_uid} gid {st.st_gid}"
    if st.st_mode & 0o006 == 0o006:
        return f"{owner}: non-root containers can open it"
    if st.st_mode & 0o060 == 0o060:
        return (f"{owner}: non-root containers can open it with supplementalGroups [{st.st_gid}], "
                "or with the runtime's device_ownership_from_security_context")
    return (f"{owner}: non-root containers cannot open it unless the runtime gives it the pod's "
            "uid (device_ownership_from_security_context)")


def run_check(devices: list[str], host_root: str) -> int:
    misc = read_proc_misc()
    all_healthy = True
    for name in devices:
        kind = DEVICE_TABLE[name]
        checker = NodeChecker(kind, host_root)
        verdict = checker.check(misc)
        all_healthy &= verdict.healthy
        print(f"{name:<12} {kind.path:<18} {verdict.state:<10} {verdict.reason}")
        access = non_root_access(checker.node_path)
        if access is not None:
            print(f"{'':<12} {access}")
    return 0 if all_healthy else 1


def plugin_dir_problem(plugin_dir: str, devices: list[str]) -> str | None:
    """Why the plugin could never serve in `plugin_dir`, or None.

    Refused at startup, in one line, rather than retried forever.
    """
    try:
        plugin_dir.encode()
    except UnicodeEncodeError:
        return f"--plugin-dir {plugin_dir!r} is not valid UTF-8, and gRPC takes socket paths as UTF-8"
    if "," in plugin_dir:
        return f"--plugin-dir {plugin_dir!r} contains ',', which gRPC reads as a list of addresses"
    # The directory itself may come later (the kubelet creates it), but not
    # through a file where a directory must be.
    existing = plugin_dir
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"--plugin-dir {plugin_dir}: {directory_problem(existing)}"
    for name in [KUBELET_SOCKET] + [plugin_socket_name(d) for d in devices]:
        path = os.path.join(plugin_dir, name)
        size = len(os.fsencode(path)) + (0 if name == KUBELET_SOCKET else BIND_SUFFIX_BYTES)
        if size > UNIX_PATH_MAX:
            return (f"socket path {path} is {len(os.fsencode(path))} bytes; a unix socket path is limited "
                    f"to {UNIX_PATH_MAX}, and the plugin binds its sockets under names up to "
                    f"{BIND_SUFFIX_BYTES} bytes longer before linking them there")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else TextFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    logging.getLogger("grpc._cython.cygrpc").addFilter(GrpcPerCallErrorFilter())
    host_root = os.path.abspath(args.host_root)
    if args.check:
        return run_check(args.devices, host_root)

    plugin_dir = os.path.abspath(args.plugin_dir)
    problem = plugin_dir_problem(plugin_dir, args.devices)
    if problem:
        parser.error(problem)

    permissions = resolve_permissions(args.permissions)

    cdi_spec_dir = os.path.abspath(args.cdi_spec_dir) if args.cdi_spec_dir else None

    async def serve() -> int:
        links = [
            KubeletLink(DeviceService(DEVICE_TABLE[name], f"{args.resource_domain}/{name}", args.count,
                                      permissions, host_root, cdi_spec_dir), plugin_dir)
            for name in args.devices
        ]
        daemon = Daemon(links, plugin_dir, args.metrics_port, args.metrics_address)
        log.info(
            "serving %s with %d devices each (permissions %s, host root %s, plugin dir %s)",
            ", ".join(link.service.resource_name for link in links), args.count, permissions, host_root,
            plugin_dir,
        )
        code = await daemon.run()
        if any(link.server.stopping for link in links):
            # A server whose peer stopped reading never finishes stopping, and
            # asyncio.run() would wait for gRPC's executor thread forever.
            log.warning("exiting while a gRPC server is still stopping (a client stopped reading)")
        # The sockets are gone and the kubelet was told: nothing is left to do
        # but tear the interpreter down, gRPC's threads and servers with it,
        # and that teardown has nothing to add but ways to hang or crash.
        logging.shutdown()
        os._exit(code)

    return asyncio.run(serve())


if __name__ == "__main__":
    sys.exit(main())
