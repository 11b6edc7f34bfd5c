"""Tests: attacks by something else on the node, played against the real plugin.

Each test plays one attack from issue 19 (a peer that writes the plugin's log,
a CDI directory swapped for a symlink, a /proc/misc that is not procfs's, a
host root whose dev is a symlink that gets repointed) and asserts on what the
plugin writes, logs and sends to the kubelet stand-in. Like test_plugin.py,
every test starts the processes it needs, bounds every wait and cleans up
after itself, also when it fails.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

import deviceplugin_pb2 as pb
import deviceplugin_pb2_grpc as pb_grpc
from fake_kubelet import free_port, mknod, unix_target
from test_plugin import WAIT_S, Env, PluginProcess, http_get, needs_strace, resource, settles


@pytest.fixture
def env():
    environment = Env()
    yield environment
    environment.close()


# ---------------------------------------------------------------------------
# Logs an attacker writes
#
# Whatever can create kubelet.sock in the device-plugins directory chooses the
# text of Register's error, and the plugin logs it. One peer error must stay
# one log line, and say nothing it did not say.
# ---------------------------------------------------------------------------

FORGED = "2026-01-01T00:00:00.000Z INFO devices.kubevirt.io/kvm: registered with the kubelet after 1 ms"
# A line break, a made-up log line, and every other way a terminal or a log
# viewer can be made to start a line, move the cursor or hide text.
HOSTILE_DETAILS = [
    ("forged lines", "denied\n" + FORGED + "\x1b[2K\x1b[1Aclear\u2028" + FORGED + "\u2029" + FORGED
     + "\u0085" + FORGED + "\r" + FORGED + "\x0b\x0c\x1c\x7f\x9b31m" + FORGED),
    # Not UTF-8: gRPC falls back to latin-1, which turns 0x85 into NEL and 0x9b into CSI.
    ("invalid UTF-8", b"denied \xff\xfe\n" + FORGED.encode() + b"\x85" + FORGED.encode() + b"\x9b2J"),
]
LINE_START = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
# What must never reach the log raw: C0 and C1 controls, DEL, and Unicode's
# line and paragraph separators (str.splitlines() splits at most of them).
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


class RefusingKubelet(pb_grpc.RegistrationServicer):
    """A kubelet.sock whose Register fails with the peer's chosen details.

    A synchronous gRPC server: its context.abort() sends bytes as they are,
    so the details can be anything, valid UTF-8 or not."""

    def __init__(self, plugin_dir: str, details: str | bytes) -> None:
        self.details = details
        self.calls = 0
        self.called = threading.Condition()
        os.makedirs(plugin_dir, exist_ok=True)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(unix_target(os.path.join(plugin_dir, "kubelet.sock")))
        self.server.start()

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.Empty:
        with self.called:
            self.calls += 1
            self.called.notify_all()
        context.abort(grpc.StatusCode.PERMISSION_DENIED, self.details)

    def wait_calls(self, calls: int) -> bool:
        with self.called:
            return self.called.wait_for(lambda: self.calls >= calls, WAIT_S)

    def stop(self) -> None:
        self.server.stop(None).wait()


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("case, details", HOSTILE_DETAILS, ids=[case for case, _ in HOSTILE_DETAILS])
def test_a_kubelet_sock_cannot_write_lines_or_controls_into_the_log(env, log_format, case, details):
    kubelet = RefusingKubelet(env.plugin_dir, details)
    try:
        plugin = env.start_plugin("--count", "1", "--devices", "kvm", "--log-format", log_format)
        # A dozen refusals: the retries back off from 1 ms to 1 s.
        assert kubelet.wait_calls(12), plugin.log()
        assert plugin.terminate() == 0
    finally:
        kubelet.stop()
    with open(plugin.log_path, "rb") as f:
        raw = f.read()
    text = raw.decode()  # the log is UTF-8, whatever the peer sent
    lines = text.splitlines()  # splits at \r, NEL, U+2028 and friends too
    controls = RAW_CONTROL.findall(text.replace("\n", ""))
    if log_format == "json":
        entries = [json.loads(line) for line in lines]  # each line one whole object
        messages = [entry["message"] for entry in entries]
        assert not [e for e in entries if "exception" in e], text
    else:
        # Lines that start with the peer's timestamp, or with no timestamp at all.
        forged = [line for line in lines if line.startswith(FORGED[:24]) or not LINE_START.match(line)]
        assert not forged, f"{len(forged)} lines the plugin did not write:\n{text}"
        messages = lines
    assert not controls, f"{len(controls)} raw control characters in the log:\n{text!r}"
    refusals = [m for m in messages if "registration with" in m]
    # Said once, with the peer's words made visible rather than obeyed.
    assert len(refusals) == 1, text
    assert "PERMISSION_DENIED: denied" in refusals[0]
    assert "\\n2026-01-01T00:00:00.000Z INFO" in refusals[0], refusals[0]
    # gRPC's own per-call complaint about the encoding, with its traceback, stays out.
    assert not [m for m in messages if "Invalid encoding" in m or "Traceback" in m], text


# A bug in handling the kubelet's answer: the refusal, an AioRpcError that
# prints the details the peer sent, becomes the cause of an unexpected
# error, which the plugin logs with its traceback.
BUG_ON_REFUSAL = """
import sys
import grpc
import kvm_device_plugin as kdp
original = kdp.KubeletLink._call_register
async def buggy(self):
    try:
        await original(self)
    except grpc.aio.AioRpcError as e:
        raise LookupError("injected") from e
kdp.KubeletLink._call_register = buggy
sys.exit(kdp.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_traceback_carrying_a_peers_words_cannot_write_lines_into_the_log(env, log_format):
    # A traceback is the one thing that spans lines in the log, and the last
    # line of each exception in it is that exception's own text: for an
    # AioRpcError, the details a kubelet.sock chose, line breaks and all. The
    # frames are the plugin's and gRPC's code; the exceptions' text must be
    # escaped like any message. No code path of the plugin logs a peer's
    # error with its traceback today, so the bug is injected (BUG_ON_REFUSAL).
    kubelet = RefusingKubelet(env.plugin_dir, HOSTILE_DETAILS[0][1])
    try:
        plugin = PluginProcess([sys.executable, "-c", BUG_ON_REFUSAL, "--plugin-dir", env.plugin_dir,
                                "--host-root", env.host, "--count", "1", "--devices", "kvm",
                                "--log-format", log_format], env.root, None)
        env.plugins.append(plugin)
        plugin.wait_log(r"LookupError: injected")
        assert plugin.terminate() == 0
    finally:
        kubelet.stop()
    text = plugin.log()
    if log_format == "json":
        (traceback,) = [e["exception"] for e in map(json.loads, text.splitlines()) if "exception" in e]
    else:
        traceback = text
    # The kubelet's refusal is in the traceback, as the bug's cause ...
    assert "The above exception was the direct cause of the following exception" in traceback, text
    assert "AioRpcError" in traceback and "PERMISSION_DENIED" in traceback, traceback
    # ... its words made visible rather than obeyed.
    forged = [line for line in traceback.splitlines() if line.startswith(FORGED[:24])]
    assert not forged, f"{len(forged)} lines the plugin did not write:\n{traceback}"
    controls = RAW_CONTROL.findall(traceback.replace("\n", ""))
    assert not controls, f"{len(controls)} raw control characters in the traceback:\n{traceback!r}"
    assert "denied\\n2026-01-01T00:00:00.000Z INFO" in traceback, traceback


# ---------------------------------------------------------------------------
# Files the plugin reads and writes
# ---------------------------------------------------------------------------

def over_proc_misc(source: str) -> list[str]:
    """Run a command where `source` is bind-mounted over /proc/misc, in a
    mount namespace of its own: what a mount mistake in a manifest does."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind {source} /proc/misc && exec "$@"', "sh"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def make_fifo(root: str) -> str:
    path = os.path.join(root, "fifo")
    os.mkfifo(path)
    return path


def make_huge_file(root: str) -> str:
    path = os.path.join(root, "huge")
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # sparse: a GiB of zeros that costs no disk
    return path


RSS_LIMIT_MB = 96  # the DaemonSet's memory limit
# The tests below read kvm's health or allocate it: the node they make opens
# only where the host kernel has kvm.
needs_kvm = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="this machine has no /dev/kvm")


@needs_kvm
@pytest.mark.parametrize("source, what", [
    (make_fifo, "a named pipe"),
    (lambda root: "/dev/zero", "a character device"),
    (make_huge_file, "not on the filesystem of /proc"),
    # procfs's own, but megabytes: read no further than /proc/misc could ever be.
    (lambda root: "/proc/kallsyms", "more than 65536 bytes"),
    # procfs's own and all but endless: 8 bytes for every page of the
    # plugin's address space, 256 GB (the shell's $$ is the plugin's pid: it
    # execs it). It takes reads of whole 8-byte entries only, so reading
    # 65537 bytes fails with EINVAL; reading it to its end would never end.
    (lambda root: "/proc/$$/pagemap", "(cannot read it: Invalid argument|more than 65536 bytes)"),
], ids=["fifo", "dev-zero", "huge-file", "procfs-but-huge", "procfs-endless"])
def test_a_proc_misc_that_is_not_procfs_blocks_nothing_and_grows_nothing(env, source, what):
    mknod(env.node("dev/sev"), 124)  # a dynamic minor: only /proc/misc can vouch for it
    env.kubelet.start()
    port = free_port()
    plugin = env.start_plugin("--count", "2", "--devices", "kvm,sev", "--metrics-port", str(port),
                              prefix=over_proc_misc(source(env.root)))
    names = [resource("kvm"), resource("sev")]
    deadline = time.monotonic() + WAIT_S
    peak_mb = 0.0
    # Watched while waiting: reading /dev/zero whole would take the machine's memory.
    while not env.kubelet.wait_registered(names, 2, timeout=0.05):
        peak_mb = max(peak_mb, rss_mb(plugin.proc.pid))
        assert peak_mb < RSS_LIMIT_MB and time.monotonic() < deadline, (
            f"not registered; RSS {peak_mb:.0f} MB\n{plugin.log()}")
    assert http_get(port, "/healthz") == (200, "ok\n")
    assert env.kubelet.state(resource("kvm")).allocatable == 2  # its minor is static: still checked
    plugin.wait_log(rf"WARNING ignoring /proc/misc: .*{what}")
    plugin.wait_log(r"devices\.kubevirt\.io/sev: 2 devices Unhealthy: cannot read /proc/misc to learn "
                    r"the minor of /dev/sev")
    env.kubelet.restart()  # more reconciles, each reading /proc/misc again
    assert env.kubelet.wait_registered(names, 2, min_registrations=2), plugin.log()
    assert rss_mb(plugin.proc.pid) < RSS_LIMIT_MB
    assert plugin.terminate() == 0
    assert len(re.findall(r"ignoring /proc/misc", plugin.log())) == 1, plugin.log()


RENAME_EXCHANGE = 2  # renameat2(2): swap two names atomically, whatever they are
AT_FDCWD = -100


def exchange(first: str, second: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), second)


def cdi_names(env: Env) -> list[str]:
    response = env.kubelet.allocate(resource("kvm"), [["kvm0"]])
    return [device.name for device in response.container_responses[0].cdi_devices]


@needs_kvm
def test_a_cdi_directory_swapped_for_a_symlink_is_never_written_through(env):
    cdi_dir = os.path.join(env.root, "cdi")
    spec = os.path.join(cdi_dir, "devices.kubevirt.io-kvm.json")
    victim = os.path.join(env.root, "victim")  # a directory root's specs must never reach
    os.makedirs(victim)
    with open(os.path.join(victim, "devices.kubevirt.io-kvm.json"), "w") as f:
        f.write("precious\n")  # same name as the spec: what the issue saw overwritten
    link = os.path.join(env.root, "cdi.link")
    os.symlink(victim, link)
    env.kubelet.start()
    plugin = env.start_plugin("--count", "1", "--devices", "kvm", "--cdi-spec-dir", cdi_dir)
    assert env.kubelet.wait_registered([resource("kvm")], 1), plugin.log()
    plugin.wait_log(r"devices\.kubevirt\.io/kvm: wrote CDI spec")

    # The attack: the link and the directory trade places, over and over,
    # each swap a wake-up for the plugin while the link is in place.
    swaps = 0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline or swaps % 2:
        exchange(link, cdi_dir)
        swaps += 1
        time.sleep(0.002)
    with open(os.path.join(victim, "devices.kubevirt.io-kvm.json")) as f:
        planted = f.read()
    assert (os.listdir(victim), planted) == (["devices.kubevirt.io-kvm.json"], "precious\n"), (
        f"after {swaps} swaps: {len(os.listdir(victim)) - 1} files written into the link's target, "
        f"the planted file now {len(planted)} bytes")

    # With the link in place the spec is not where a runtime looks: Allocate
    # does not name it. Back as it was, it does again, without a rewrite.
    exchange(link, cdi_dir)
    assert cdi_names(env) == []
    plugin.wait_log(r"cannot write CDI spec \S+: \S+/cdi is a symbolic link, not a directory")
    exchange(link, cdi_dir)
    assert settles(lambda: cdi_names(env) == ["devices.kubevirt.io/kvm=kvm"]), plugin.log()
    assert os.listdir(victim) == ["devices.kubevirt.io-kvm.json"]
    assert len(re.findall(r"is a symbolic link", plugin.log())) == 1, plugin.log()

    # A directory really replaced (by another directory) is written into.
    os.rename(cdi_dir, cdi_dir + ".old")
    os.makedirs(cdi_dir, exist_ok=True)
    assert settles(lambda: os.path.isfile(spec)), plugin.log()
    with open(spec) as f:
        assert json.load(f)["kind"] == resource("kvm")
    assert plugin.terminate() == 0


# The safety net re-checks every 5 s (RECHECK_S): a change seen later than
# this was not seen through inotify. A correctness bound, not a speed target.
SEEN_WITHOUT_SAFETY_NET_S = 2.5


def seconds_until_health(env: Env, name: str, health: str, since: float) -> float:
    state = env.kubelet.state(resource(name))
    assert env.kubelet.wait_for(lambda: set(state.devices.values()) == {health}, WAIT_S), health
    return time.monotonic() - since


def repoint(link: str, target: str) -> float:
    """Point the symbolic link `link` at `target` in one step, as a package
    manager or a mount helper does: a new link renamed over the old one."""
    os.symlink(target, link + ".new")
    os.rename(link + ".new", link)
    return time.monotonic()


@needs_kvm
def test_a_host_root_dev_symlink_repointed_is_seen_at_once(env):
    dev_a, dev_b = env.node("dev-a"), env.node("dev-b")
    os.rename(env.node("dev"), dev_a)  # every node, kvm included
    os.makedirs(os.path.join(dev_b, "net"))
    mknod(os.path.join(dev_b, "net", "tun"), 200)  # no kvm here; tun in both
    os.symlink("dev-a", env.node("dev"))
    env.kubelet.start()
    plugin = env.start_plugin("--count", "1", "--devices", "kvm,tun")
    assert env.kubelet.wait_registered([resource("kvm"), resource("tun")], 1), plugin.log()
    assert seconds_until_health(env, "kvm", "Healthy", time.monotonic()) >= 0
    delays = []
    for _ in range(6):  # a lucky safety-net tick passes 2.5 s with p = 1/2; six times each way, 1/4096
        delays.append(seconds_until_health(env, "kvm", "Unhealthy", repoint(env.node("dev"), "dev-b")))
        delays.append(seconds_until_health(env, "kvm", "Healthy", repoint(env.node("dev"), "dev-a")))
    # A directory on the way replaced by another (swapped with RENAME_EXCHANGE): tun goes and comes back.
    os.makedirs(os.path.join(dev_a, "net.other"))
    for _ in range(3):
        since = time.monotonic()
        exchange(os.path.join(dev_a, "net"), os.path.join(dev_a, "net.other"))
        delays.append(seconds_until_health(env, "tun", "Unhealthy", since))
        since = time.monotonic()
        exchange(os.path.join(dev_a, "net"), os.path.join(dev_a, "net.other"))
        delays.append(seconds_until_health(env, "tun", "Healthy", since))
    assert max(delays) < SEEN_WITHOUT_SAFETY_NET_S, [f"{d * 1000:.0f} ms" for d in delays]
    assert plugin.terminate() == 0


@needs_kvm
def test_a_node_changed_behind_a_host_root_dev_symlink_is_seen_at_once(env):
    # A host root whose dev is a symbolic link (to dev-a here), left as it
    # is: kvm lives in the link's target, and a change there is an event
    # only for a watch on that directory, not for one on the link's. Missed,
    # it would reach the kubelet only through the 5 s safety net: the first
    # change up to 5 s late, every later one (made right after the one
    # before was seen) a full 5 s.
    os.rename(env.node("dev"), env.node("dev-a"))
    os.symlink("dev-a", env.node("dev"))
    env.kubelet.start()
    plugin = env.start_plugin("--count", "1", "--devices", "kvm")
    assert env.kubelet.wait_registered([resource("kvm")], 1), plugin.log()
    assert seconds_until_health(env, "kvm", "Healthy", time.monotonic()) >= 0
    node = env.node("dev-a/kvm")
    for change in range(6):
        since = time.monotonic()
        os.unlink(node)
        delay = seconds_until_health(env, "kvm", "Unhealthy", since)
        assert delay < SEEN_WITHOUT_SAFETY_NET_S, f"unlink {change} seen after {delay * 1000:.0f} ms"
        since = time.monotonic()
        mknod(node, 232)
        delay = seconds_until_health(env, "kvm", "Healthy", since)
        assert delay < SEEN_WITHOUT_SAFETY_NET_S, f"mknod {change} seen after {delay * 1000:.0f} ms"
    assert plugin.terminate() == 0


@needs_kvm
def test_every_unlink_and_recreation_of_the_node_is_seen_at_once(env):
    env.kubelet.start()
    plugin = env.start_plugin("--count", "1", "--devices", "kvm")
    assert env.kubelet.wait_registered([resource("kvm")], 1), plugin.log()
    node = env.node("dev/kvm")
    delays = []
    # One change in about 2,000 used to wait for the safety net: the watches'
    # masks were replaced on every wake-up, and the kernel drops an event
    # that comes in that instant (see the next test).
    for _ in range(500):
        since = time.monotonic()
        os.unlink(node)
        delays.append(seconds_until_health(env, "kvm", "Unhealthy", since))
        since = time.monotonic()
        mknod(node, 232)
        delays.append(seconds_until_health(env, "kvm", "Healthy", since))
    late = [f"change {i}: {d * 1000:.0f} ms" for i, d in enumerate(delays) if d >= SEEN_WITHOUT_SAFETY_NET_S]
    assert not late, late
    assert plugin.terminate() == 0


@needs_strace
def test_watches_are_added_again_without_replacing_their_mask(env):
    # The watches are added again on every wake-up. A call that replaces a
    # watch's mask (no IN_MASK_ADD) zeroes it for an instant, and the kernel
    # drops an event in the directory then: one unlink of /dev/kvm in about
    # 2,000 reached the kubelet only through the 5 s safety net. The race is
    # too narrow to hit from here at will; what the plugin asks of the kernel
    # is not.
    trace = os.path.join(env.root, "strace.out")
    env.kubelet.start()
    plugin = env.start_plugin("--count", "1", "--devices", "kvm", prefix=[
        "strace", "-f", "--seccomp-bpf", "-qq", "-o", trace, "-e", "trace=inotify_add_watch",
        "setpriv", "--pdeathsig", "KILL"])
    assert env.kubelet.wait_registered([resource("kvm")], 1), plugin.log()
    node = env.node("dev/kvm")
    for _ in range(3):
        since = time.monotonic()
        os.unlink(node)
        assert seconds_until_health(env, "kvm", "Unhealthy", since) >= 0
        mknod(node, 232)
        assert seconds_until_health(env, "kvm", "Healthy", since) >= 0
    with open(f"/proc/{plugin.proc.pid}/task/{plugin.proc.pid}/children") as f:
        os.kill(int(f.read().split()[0]), signal.SIGTERM)  # strace's child: the plugin
    assert plugin.proc.wait(WAIT_S) == 0  # strace exits as its child did
    with open(trace) as f:
        calls = [line for line in f if "inotify_add_watch(" in line]
    host_dev = [call for call in calls if f'"{env.node("dev")}"' in call]
    assert len(host_dev) >= 7, calls  # the first watch, then once per change at least
    replacing = [call for call in calls if "IN_MASK_ADD" not in call]
    assert not replacing, replacing
