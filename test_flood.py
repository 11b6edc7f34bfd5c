"""Tests: floods on the plugin's gRPC sockets (issue 19, items 1 and 3).

The plugin runs as a subprocess against the kubelet stand-in, through the
benchmark's Rig (a temporary directory with real device nodes, removed with
every process on exit); the attackers (flood_peers.py) are processes of their
own, started and killed here. Memory is asserted as growth of the plugin's
VmRSS with a wide margin: the unbounded cases grow by tens of megabytes within
the few seconds each attack lasts.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest

import deviceplugin_pb2 as pb
import kvm_device_plugin as kdp
from bench_plugin import Rig, resource, rss_mb
from fake_kubelet import free_port
from test_plugin import http_get, settles
from flood_peers import (
    hold_connections,
    open_connections,
    start_connect_loop,
    start_rapid_reset,
)

WAIT_S = 10.0
# The stand-in's dial-back waits 10 s, as a kubelet's does; a Register that
# lost the race to a flood fails after that and is made again on a new server.
REGISTER_UNDER_FLOOD_S = 3 * 10.0 + 5.0
KVM = resource("kvm")
ALLOCATE = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["kvm1"])])


@pytest.fixture
def rig():
    with Rig(110, ("kvm",)) as started:
        started.start()
        yield started


def socket_path(rig: Rig) -> str:
    return os.path.join(rig.plugin_dir, kdp.plugin_socket_name("kvm"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))




def test_kubelet_registers_and_allocates_while_a_flood_holds_every_connection_it_can(rig):
    fds_before, rss_before = open_fds(rig.pid), rss_mb(rig.pid)
    flood = start_connect_loop(socket_path(rig), 60)
    rig.helpers.append(flood)
    # The flood fills the server: the plugin holds about MAX_CONNECTIONS more
    # descriptors, and no more however long the flood goes on.
    assert settles(lambda: open_fds(rig.pid) >= fds_before + kdp.MAX_CONNECTIONS - 8), open_fds(rig.pid)
    time.sleep(1.0)
    assert open_fds(rig.pid) <= fds_before + kdp.MAX_CONNECTIONS + 8, (fds_before, open_fds(rig.pid))
    # The kubelet restarts in the middle of it: the new server's slots are
    # raced for by the flood and the kubelet's dial-back.
    base = rig.baseline()
    rig.kubelet.restart()
    rig.wait_lists(base, REGISTER_UNDER_FLOOD_S)
    response = rig.kubelet.allocate(KVM, [["kvm1"]])
    assert response.container_responses[0].devices[0].host_path == "/dev/kvm"
    assert flood.poll() is None, "the flood ended before the kubelet got in"
    assert rss_mb(rig.pid) - rss_before < 15, (rss_before, rss_mb(rig.pid))


def test_liveness_fails_while_the_server_in_place_takes_no_new_connection():
    # A server whose connection slots are all taken accepts a connection and
    # closes it at once: a restarting kubelet's dial-back would fail the same
    # way. /healthz asks each server in place GetDevicePluginOptions over a
    # connection of its own, and says which one does not answer. Held
    # connections are closed after 10 s idle (CONNECTION_IDLE_MS); the probe
    # comes right after they are made, and its connection is accepted after
    # theirs, past the cap.
    port = free_port()
    with Rig(110, ("kvm",), args=("--metrics-port", str(port))) as rig:
        rig.start()
        held = hold_connections(socket_path(rig), kdp.MAX_CONNECTIONS + 16)
        try:
            answer = http_get(port, "/healthz")
        finally:
            for conn in held:
                conn.close()
        assert answer == (503, "devices.kubevirt.io/kvm: server does not answer (UNAVAILABLE)\n"), answer
        # Slots free again: alive again (a verdict is reused for a second at most).
        assert settles(lambda: http_get(port, "/healthz") == (200, "ok\n")), rig.log_tail()


def test_idle_connections_are_closed_and_the_kubelets_stays(rig):
    held = hold_connections(socket_path(rig), 100)
    try:
        assert open_connections(held) == 100
        # All closed by the plugin (an idle connection holds a slot and memory);
        # the kubelet's, which always has its stream open, is not.
        assert settles(lambda: open_connections(held) == 0, kdp.CONNECTION_IDLE_MS / 1000 + WAIT_S)
    finally:
        for conn in held:
            conn.close()
    state = rig.kubelet.state(KVM)
    assert state.stream_open and state.registrations == 1 and state.stream_ends == 0
    rig.kubelet.allocate(KVM, [["kvm1"]])


def test_rapid_reset_fails_no_kubelet_allocate_and_keeps_memory_bounded(rig):
    stub = rig.kubelet.stub(KVM)
    rss_before = rss_mb(rig.pid)
    attacker = start_rapid_reset(socket_path(rig), 5.0, rate=13000)
    rig.helpers.append(attacker)
    failed, calls, rss_max = [], 0, rss_before
    while attacker.poll() is None:
        try:
            stub.Allocate(ALLOCATE, timeout=WAIT_S)
        except grpc.RpcError as e:
            failed.append(e.code().name)
        calls += 1
        rss_max = max(rss_max, rss_mb(rig.pid))
        time.sleep(0.02)
    streams = int(attacker.stdout.read().split()[0])
    assert streams > 20_000, f"the attacker sent only {streams} streams: not an attack"
    assert calls > 20 and not failed, f"{len(failed)} of {calls} kubelet Allocate calls failed: {failed[:5]}"
    assert rss_max - rss_before < 10, (rss_before, rss_max)
    state = rig.kubelet.state(KVM)
    assert state.stream_open and state.registrations == 1


def test_allocate_takes_a_few_containers_per_call_not_as_many_as_there_are_devices(rig):
    # A kubelet sends one container per Allocate; 110 one-ID containers are
    # within --count but not what any kubelet sends, and each costs the loop.
    few = rig.kubelet.allocate(KVM, [[f"kvm{i}"] for i in range(kdp.MAX_CONTAINER_REQUESTS)])
    assert len(few.container_responses) == kdp.MAX_CONTAINER_REQUESTS
    with pytest.raises(grpc.RpcError) as caught:
        rig.kubelet.allocate(KVM, [[f"kvm{i}"] for i in range(110)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "AllocateRequest has 110 container requests; a kubelet sends one per call" in caught.value.details()
