"""Hostile peers, round two: what a neighbour on the node does to the plugin's
sockets, its names in the device-plugins directory and its log.

Each test plays one attack against the real plugin (a subprocess) and the
kubelet stand-in, and checks what the plugin sends and logs.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import threading
import time

import grpc
import pytest

import deviceplugin_pb2 as pb
import deviceplugin_pb2_grpc as pb_grpc
import kvm_device_plugin as kdp
from test_plugin import DEFAULT, WAIT_S, env, kubelet, resource, running, settles  # noqa: F401 - fixtures

SOCKET = "kvm-device-plugin-kvm.sock"


def log_lines(plugin, pattern: str) -> list[str]:
    return [line for line in plugin.log().splitlines() if re.search(pattern, line)]


# ---------------------------------------------------------------------------
# Names planted in the device-plugins directory
# ---------------------------------------------------------------------------


def test_an_empty_directory_at_the_socket_name_is_taken_back(env):
    env.kubelet.start()
    os.mkdir(os.path.join(env.plugin_dir, SOCKET))  # a hostPath mount gone wrong, or a mkdir
    plugin = env.start_plugin("--count", "3")
    assert env.kubelet.wait_registered([resource(n) for n in DEFAULT], 3), plugin.log()
    assert env.kubelet.allocate(resource("kvm"), [["kvm0"]]).container_responses
    os.mkdir(os.path.join(env.plugin_dir, "kvm-device-plugin-tun.sock.x"))  # not ours: left alone
    # Planted again between the kubelet's cleanup and the plugin's next look:
    # stopped meanwhile, the plugin cannot make its socket first (it did, now
    # and then, when it ran on), and on waking finds the directory there.
    plugin.proc.send_signal(signal.SIGSTOP)
    try:
        env.kubelet.restart()
        os.mkdir(os.path.join(env.plugin_dir, SOCKET))
    finally:
        plugin.proc.send_signal(signal.SIGCONT)
    assert env.kubelet.wait_registered([resource("kvm")], 3, min_registrations=2), plugin.log()
    assert os.path.isdir(os.path.join(env.plugin_dir, "kvm-device-plugin-tun.sock.x"))


def test_a_directory_with_content_at_the_socket_name_is_reported_once_and_left_alone(env):
    env.kubelet.start()
    planted = os.path.join(env.plugin_dir, SOCKET)
    os.makedirs(os.path.join(planted, "data"))
    plugin = env.start_plugin("--count", "3")
    assert env.kubelet.wait_registered([resource("tun"), resource("vhost-net")], 3), plugin.log()
    plugin.wait_log(rf"kvm: registration with .* failed \(cannot put a socket at {re.escape(planted)}: "
                    r"Directory not empty\)")
    # Retries go on at one a second, each with a new server bound under a
    # name of its own that stays until the next: wait for four of them, and
    # the cause is still said once.
    deadline = time.monotonic() + WAIT_S
    seen: set[str] = set()
    spares = os.path.join(env.plugin_dir, ".kvm-device-plugin")
    while len(seen) < 4 and time.monotonic() < deadline:
        seen |= {e.name for e in os.scandir(spares) if e.name.startswith("kvm.")}
        time.sleep(0.005)
    assert len(seen) >= 4, seen
    assert len(log_lines(plugin, "kvm: registration with")) == 1, plugin.log()
    assert os.path.isdir(os.path.join(planted, "data"))  # never removed
    os.rmdir(os.path.join(planted, "data"))
    assert env.kubelet.wait_registered([resource("kvm")], 3), plugin.log()


def test_regular_files_at_every_old_bind_name_do_not_stop_registration(env):
    env.kubelet.start()
    os.makedirs(env.plugin_dir, exist_ok=True)
    for n in range(1000):  # the names "<socket>.0" to ".999" that bind names used to be
        with open(os.path.join(env.plugin_dir, f"{SOCKET}.{n}"), "w"):
            pass
    plugin = env.start_plugin("--count", "3")
    assert env.kubelet.wait_registered([resource(n) for n in DEFAULT], 3), plugin.log()
    assert "failed" not in plugin.log()


def test_a_reader_holding_a_lock_on_the_directory_does_not_keep_the_plugin_out(env):
    env.kubelet.start()
    reader = os.open(env.plugin_dir, os.O_RDONLY | os.O_DIRECTORY)  # all a read-only mount allows
    try:
        fcntl.flock(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)
        plugin = env.start_plugin("--count", "3")
        assert env.kubelet.wait_registered([resource(n) for n in DEFAULT], 3), plugin.log()
        assert plugin.proc.poll() is None
        # A second instance is still told apart from the reader, and refused.
        second = env.start_plugin("--count", "3")
        assert second.proc.wait(WAIT_S) == 1
        assert "another kvm-device-plugin is already serving" in second.log()
        assert env.kubelet.state(resource("kvm")).registrations == 1
    finally:
        os.close(reader)


def test_a_killed_instances_leftover_does_not_keep_the_next_one_out(env):
    env.kubelet.start()
    first = env.start_plugin("--count", "3")
    assert env.kubelet.wait_registered([resource(n) for n in DEFAULT], 3), first.log()
    first.kill()  # SIGKILL: its sockets stay behind
    assert "kvm-device-plugin.sock" in os.listdir(env.plugin_dir)
    second = env.start_plugin("--count", "3")
    assert env.kubelet.wait_registered([resource(n) for n in DEFAULT], 3, min_registrations=2), second.log()
    assert second.proc.poll() is None


def fill_backlog(path: str) -> list[socket.socket]:
    """Connections to the listening unix socket at `path`, made until the
    kernel says its backlog is full (EAGAIN on a non-blocking connect)."""
    queued: list[socket.socket] = []
    try:
        while len(queued) < 1000:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                conn.connect(path)
            except BlockingIOError:
                conn.close()
                return queued
            queued.append(conn)
        raise AssertionError(f"{path} queued 1000 connections: nobody listens there with a backlog")
    except BaseException:
        for conn in queued:
            conn.close()
        raise


def test_a_live_instance_whose_backlog_is_full_is_not_taken_for_a_leftover(env):
    # A live instance that is busy (stopped here, so that it accepts nothing)
    # and a neighbour that connects and never lets go can fill its instance
    # socket's backlog. A connect then fails with EAGAIN, not the
    # ECONNREFUSED of a killed run's leftover: the instance is alive, and a
    # second one must not take over its sockets.
    env.kubelet.start()
    first = env.start_plugin("--count", "3")
    assert env.kubelet.wait_registered([resource(n) for n in DEFAULT], 3), first.log()
    socket_path = os.path.join(env.plugin_dir, SOCKET)
    before = os.stat(socket_path)
    first.proc.send_signal(signal.SIGSTOP)
    queued: list[socket.socket] = []
    try:
        queued = fill_backlog(os.path.join(env.plugin_dir, kdp.INSTANCE_SOCKET))
        second = env.start_plugin("--count", "3")
        assert settles(lambda: second.proc.poll() is not None), f"second instance running:\n{second.log()}"
        assert second.proc.returncode == 1
        assert "another kvm-device-plugin is already serving" in second.log()
    finally:
        first.proc.send_signal(signal.SIGCONT)
        for conn in queued:
            conn.close()
    after = os.stat(socket_path)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)  # the first's, untouched
    assert env.kubelet.state(resource("kvm")).registrations == 1
    assert env.kubelet.allocate(resource("kvm"), [["kvm2"]]).container_responses


# ---------------------------------------------------------------------------
# The stream cap's window next to the kubelet's stream
# ---------------------------------------------------------------------------


def test_streams_opened_next_to_the_kubelets_are_capped_too(running):
    kvm = resource("kvm")
    running.kubelet.restart()
    assert running.kubelet.wait_registered([kvm], 3, min_registrations=2), running.plugin.log()
    # Within the second after the kubelet's stream opened: 40 foreign streams,
    # each on a connection of its own (one connection carries only a few).
    path = os.path.join(running.plugin_dir, SOCKET)
    # (A channel of its own is not enough: channels to one address share a
    # connection unless each has a subchannel pool of its own.)
    channels = [grpc.insecure_channel(f"unix://{path}", options=kdp.CHANNEL_OPTIONS) for _ in range(40)]
    try:
        streams = [pb_grpc.DevicePluginStub(c).ListAndWatch(pb.Empty(), timeout=WAIT_S) for c in channels]
        served = refused = 0
        for stream in streams:
            try:
                next(stream)
                served += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                refused += 1
        for stream in streams:
            stream.cancel()
    finally:
        for channel in channels:
            channel.close()
    # Four for other clients, and at most two more next to the kubelet's.
    assert served <= 4 + 2 and refused >= 34, (served, refused)
    assert running.kubelet.allocate(kvm, [["kvm1"]]).container_responses


# ---------------------------------------------------------------------------
# Logs a peer can make the plugin write
# ---------------------------------------------------------------------------


def test_an_allocate_flood_is_logged_at_a_bounded_rate_with_a_count(running):
    """A client of the socket can call Allocate as fast as it likes: beyond a
    burst, one line a second is logged per resource, and every call left out
    is counted, by outcome, in a summary line (the node's log is not a
    neighbour's to fill: 0.2 KB a second under a flood, bench_plugin.py)."""
    path = os.path.join(running.plugin_dir, SOCKET)
    started = time.monotonic()
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = pb_grpc.DevicePluginStub(channel)
        good = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["kvm1"])])
        bad = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["kvm7"])])
        refused = 0
        for _ in range(600):
            stub.Allocate(good, timeout=WAIT_S)
            try:
                stub.Allocate(bad, timeout=WAIT_S)
            except grpc.RpcError:
                refused += 1
    assert refused == 600
    seconds = time.monotonic() - started

    def accounted() -> tuple[int, int, int]:
        log = running.plugin.log()
        allocated = len(log_lines(running.plugin, r"kvm: allocated kvm1"))
        unknown = len(log_lines(running.plugin, r"kvm: unknown device ID"))
        for left_allocated, left_refused in re.findall(
                r"kvm: \d+ calls not logged in the last 10 s: (\d+) allocated, (\d+) refused", log):
            allocated += int(left_allocated)
            unknown += int(left_refused)
        return allocated, unknown, allocated + unknown
    # Every call accounted for, by outcome, once the summary is out...
    deadline = time.monotonic() + kdp.LOG_SUMMARY_S + WAIT_S
    while accounted()[2] < 1200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert accounted() == (600, 600, 1200), running.plugin.log()[-3000:]
    # ... with a burst, then about one line a second, about them.
    per_call = len(log_lines(running.plugin, r"kvm: (allocated|unknown device ID)"))
    assert per_call <= kdp.LOG_BURST + seconds / kdp.LOG_REFILL_S + 1, (per_call, seconds)
    # The kubelet's own allocation after the flood is logged again.
    time.sleep(kdp.LOG_REFILL_S + 0.1)
    assert running.kubelet.allocate(resource("kvm"), [["kvm2"]]).container_responses
    running.plugin.wait_log(r"kvm: allocated kvm2")


def accept_and_close(path: str, stop: threading.Event, accepted: list[float]) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(0.05)

    def serve() -> None:
        with listener:
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                accepted.append(time.monotonic())
                connection.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_kubelet_sock_that_accepts_and_closes_is_reported_once(env):
    os.makedirs(env.plugin_dir)
    stop, accepted = threading.Event(), []
    thread = accept_and_close(os.path.join(env.plugin_dir, "kubelet.sock"), stop, accepted)
    try:
        plugin = env.start_plugin("--count", "3", "--devices", "kvm")
        plugin.wait_log(r"kvm: registration with .* failed")
        first_warning = time.monotonic()
        # Retried about once a second from here; four more tries, one line.
        assert env.kubelet.wait_for(lambda: sum(t > first_warning for t in accepted) >= 4, WAIT_S), accepted
        assert len(log_lines(plugin, "registration with")) == 1, plugin.log()
    finally:
        stop.set()
        thread.join(WAIT_S)


@pytest.fixture
def small_tmpfs(env):
    """The plugin directory on a tmpfs with room for 8 inodes, unmounted after."""
    os.makedirs(env.plugin_dir)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nr_inodes=8,size=1m", "kdp-test", env.plugin_dir], check=True)
    try:
        yield env
    finally:
        env.kubelet.stop()
        subprocess.run(["umount", "-l", env.plugin_dir], check=False)


def test_a_plugin_dir_out_of_inodes_is_reported_once_with_the_real_cause(small_tmpfs):
    env = small_tmpfs
    env.kubelet.start()
    fillers = []
    while True:  # take every free inode
        try:
            path = os.path.join(env.plugin_dir, f"filler{len(fillers)}")
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY))
            fillers.append(path)
        except OSError:
            break
    plugin = env.start_plugin("--count", "3", "--devices", "kvm")
    plugin.wait_log(r"kvm: registration with .* failed \((cannot bind a socket in|cannot make) \S+: "
                    r"No space left on device\)")
    time.sleep(3.5)  # three more tries at one a second
    assert len(log_lines(plugin, "registration with")) == 1, plugin.log()
    for path in fillers:
        os.unlink(path)
    assert env.kubelet.wait_registered([resource("kvm")], 3), plugin.log()
