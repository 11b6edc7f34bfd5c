"""The plugin under a real kubelet: a kubelet binary (KDP_KUBELET=/path/to/kubelet)
run standalone against a private containerd, the real plugin registering with
it, and static pods that ask for the plugin's devices.

What the kubelet says is read where a node without an API server shows it:
its log, the pod-resources API (GetAllocatableResources: healthy devices per
resource; List: devices per container), the read-only port's /pods (static
pods and their status), the device manager's checkpoint and the pods' logs.
kubelet_harness.py says what the kubelet needs on these machines.

One kubelet, containerd and plugin serve the whole module (starting them
costs seconds); each test first brings the plugin back to registered with the
kvm node present, and removes its own pods at the end, so each holds alone.
Without KDP_KUBELET the tests skip with one line; KDP_REQUIRE_KUBELET=1 (set
by .ci/run) makes that a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

import kubelet_harness as kh
from fake_kubelet import DEVICE_NODES, mknod

KVM, TUN = kh.resource("kvm"), kh.resource("tun")
HLT = "kvm: ok KVM_RUN exit reason KVM_EXIT_HLT, ax=0x1235"
TUN_OPENED = "open: ok open /dev/net/tun"
VMM_SCRIPT = "/probe id kvm open=/dev/net/tun"
KVM_REGISTERED = re.compile(r"devices\.kubevirt\.io/kvm: registered (?:again )?with the kubelet")


@pytest.fixture(scope="module")
def shared_node() -> Iterator[kh.Node]:
    node = kh.Node(kh.require_kubelet(kvm=False))
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def node(shared_node: kh.Node) -> Iterator[kh.Node]:
    """The module's node, with the plugin running and registered and the kvm
    node in place whatever an earlier test did; this test's pods removed after."""
    if not os.path.exists(shared_node.kvm_node()):
        mknod(shared_node.kvm_node(), DEVICE_NODES["kvm"][1])
    if shared_node.plugin is None or shared_node.plugin.poll() is not None:
        shared_node.start_plugin()
    shared_node.wait_allocatable(kh.COUNT)
    kubelet = shared_node.kubelet
    assert kubelet is not None
    before = set(os.listdir(kubelet.manifests))
    yield shared_node
    for name in set(os.listdir(kubelet.manifests)) - before:
        kubelet.remove_pod(name.removesuffix(".yaml"))


def kubelet_of(node: kh.Node) -> kh.Kubelet:
    assert node.kubelet is not None
    return node.kubelet


def kubelet_minor(node: kh.Node) -> int:
    version = subprocess.run([node.binary, "--version"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    found = re.search(r"v1\.(\d+)\.", version)
    assert found, version
    return int(found[1])


def probe_lines(kubelet: kh.Kubelet, name: str) -> list[str]:
    """The pod's container log once the probe has finished (the script says so)."""
    pod = kubelet.wait_pod(name, kh.running, "running")

    def finished() -> list[str] | None:
        lines = kubelet.container_log(pod, "vmm")
        return lines if any(line.startswith("probe exit") for line in lines) else None

    return kh.wait_for(f"pod {name}'s probe to finish", finished)


def run_vmm(kubelet: kh.Kubelet, name: str) -> tuple[dict[str, Any], list[str]]:
    kubelet.add_pod(name, kh.pod_spec(VMM_SCRIPT))
    lines = probe_lines(kubelet, name)
    assert HLT in lines and TUN_OPENED in lines and "probe exit 0" in lines, lines
    pod = kubelet.pod(name)
    assert pod is not None
    return pod, lines


def container_id(pod: dict[str, Any]) -> str:
    return kh.container_status(pod, "vmm").get("containerID", "")


def allocated_in_plugin_log(node: kh.Node) -> dict[str, list[str]]:
    """resource -> IDs from the plugin's "<resource>: allocated <IDs>" lines."""
    found: dict[str, list[str]] = {}
    for name, ids in re.findall(r" INFO (\S+): allocated (\S+)", node.plugin_log()):
        found.setdefault(name, []).append(ids)
    return found


# ---------------------------------------------------------------------------


def test_registers_every_resource_and_the_kubelet_allocates_110_kvm_and_tun(node):
    """1. The kubelet logs a registration for kvm, tun and vhost-net, and its
    allocatable (pod-resources) holds 110 distinct kvm and 110 distinct tun."""
    kh.require_kubelet(kvm=True)
    kubelet = kubelet_of(node)
    assert kubelet.registered() >= {kh.resource(n) for n in kh.DEVICES}, kubelet.log()[-3000:]
    allocatable = kubelet.allocatable()
    for name in (KVM, TUN):
        assert len(set(allocatable.get(name, []))) == kh.COUNT, (name, allocatable.get(name))


def test_a_non_root_pod_runs_a_vm_with_the_same_device_ids_everywhere(node):
    """2. A static pod asking for kvm and tun, uid/gid 1000, runAsNonRoot, all
    capabilities but NET_ADMIN dropped, no privilege escalation, seccomp
    RuntimeDefault: runs a guest to KVM_EXIT_HLT and opens /dev/net/tun. Its
    device IDs are the same in the kubelet's checkpoint, in pod-resources List
    and in the plugin's allocation log line."""
    kh.require_kubelet(kvm=True)
    kubelet = kubelet_of(node)
    pod, lines = run_vmm(kubelet, "vmm-a")
    print("\n".join(lines))
    assert re.match(r"id: uid=1000 gid=1000 ", lines[0]), lines

    listed = kubelet.pod_devices()[(pod["metadata"]["name"], "vmm")]
    checkpointed = kubelet.checkpoint_devices()[(pod["metadata"]["uid"], "vmm")]
    logged = allocated_in_plugin_log(node)
    assert set(listed) == set(checkpointed) == {KVM, TUN}, (listed, checkpointed)
    for name in (KVM, TUN):
        assert len(listed[name]) == 1 and listed[name] == checkpointed[name], (listed, checkpointed)
        assert listed[name][0] in logged.get(name, []), (name, listed[name], logged)


def test_a_kubelet_restart_keeps_the_running_pod_and_admits_a_new_one(node):
    """3. The kubelet stopped with SIGTERM and started again: the plugin
    registers again (the new kubelet's log, its allocatable), the first pod
    runs the same container, and a second kvm pod is admitted and runs."""
    kh.require_kubelet(kvm=True)
    kubelet = kubelet_of(node)
    first, _ = run_vmm(kubelet, "vmm-before")
    registrations = len(KVM_REGISTERED.findall(node.plugin_log()))
    assert kubelet.stop() == 0, kubelet.log()[-3000:]
    kubelet.start()
    node.wait_registered()  # in this kubelet process's log, and 110 allocatable again
    assert len(KVM_REGISTERED.findall(node.plugin_log())) == registrations + 1, node.plugin_log()
    still = kubelet.wait_pod("vmm-before", lambda p: kh.running(p) and bool(container_id(p)), "running again")
    assert container_id(still) == container_id(first)
    run_vmm(kubelet, "vmm-after")


def test_an_unlinked_kvm_node_stops_admission_and_its_return_restores_it(node):
    """4. With --host-root a tree of the test's own: its kvm node unlinked,
    the kubelet's allocatable kvm drops to 0 and a new kvm pod fails admission
    (UnexpectedAdmissionError); the node re-created, a new pod runs."""
    kh.require_kubelet(kvm=True)
    kubelet = kubelet_of(node)
    os.unlink(node.kvm_node())
    kh.wait_for("allocatable kvm 0", lambda: kubelet.without(KVM))
    assert re.search(r"WARNING devices\.kubevirt\.io/kvm: 110 devices Unhealthy: .*missing", node.plugin_log()), \
        node.plugin_log()[-2000:]
    kubelet.add_pod("vmm-refused", kh.pod_spec(VMM_SCRIPT))
    refused = kubelet.wait_pod("vmm-refused", lambda p: p.get("status", {}).get("phase") == "Failed", "Failed")
    status = refused["status"]
    print(status)
    assert status.get("reason") == "UnexpectedAdmissionError", status
    assert KVM in status.get("message", ""), status
    assert not kh.container_status(refused, "vmm").get("containerID"), status

    mknod(node.kvm_node(), DEVICE_NODES["kvm"][1])
    node.wait_allocatable(kh.COUNT)
    run_vmm(kubelet, "vmm-returned")


def test_a_pod_without_a_device_request_has_neither_node(node):
    """5. No device asked for: /dev/kvm and /dev/net/tun do not exist in the
    container (ENOENT), while the plugin serves both."""
    kubelet = kubelet_of(node)
    kubelet.add_pod("bare", kh.pod_spec("/probe open=/dev/kvm open=/dev/net/tun", devices=()))
    lines = probe_lines(kubelet, "bare")
    assert lines[:2] == ["open: FAILED open /dev/kvm: errno 2 (No such file or directory)",
                         "open: FAILED open /dev/net/tun: errno 2 (No such file or directory)"], lines
    pod = kubelet.pod("bare")
    assert pod is not None and not kubelet.pod_devices().get((pod["metadata"]["name"], "vmm")), \
        kubelet.pod_devices()


def test_sigterm_to_the_plugin_empties_the_kubelets_list_and_leaves_its_files(node):
    """6. SIGTERM to the plugin: exit 0; the kubelet's allocatable has no kvm
    and no tun, and its checkpoint no longer lists their devices (the empty
    list drops them at once; a broken stream would keep them registered, as
    unhealthy, for 5 minutes); only kubelet.sock and the checkpoint remain."""
    kubelet = kubelet_of(node)
    assert node.stop_plugin() == 0, node.plugin_log()[-2000:]
    kh.wait_for("allocatable without kvm and tun", lambda: kubelet.without(KVM) and kubelet.without(TUN))

    def dropped() -> bool:
        registered = kubelet.registered_devices()
        return not registered.get(KVM) and not registered.get(TUN)

    kh.wait_for("the checkpoint without kvm and tun devices", dropped)
    assert sorted(os.listdir(kubelet.plugin_dir)) == ["kubelet.sock", "kubelet_internal_checkpoint"]


def test_device_health_reaches_pod_status_while_the_pod_keeps_running(node):
    """7. A running kvm pod while its node is unlinked and re-created: it keeps
    running the same container. From 1.36 the kubelet reports per-device health
    in the container status (allocatedResourcesStatus): Unhealthy, then Healthy
    again. Before 1.36 (the gate is off) the field must be absent, and the test
    says so."""
    kh.require_kubelet(kvm=True)
    kubelet = kubelet_of(node)
    pod, _ = run_vmm(kubelet, "vmm-health")
    reports = kubelet_minor(node) >= 36

    def kvm_health(p: dict[str, Any]) -> str | None:
        for entry in kh.container_status(p, "vmm").get("allocatedResourcesStatus") or []:
            if entry["name"] == KVM:
                return entry["resources"][0]["health"]
        return None

    if reports:
        kubelet.wait_pod("vmm-health", lambda p: kvm_health(p) == "Healthy", "kvm Healthy")
    os.unlink(node.kvm_node())
    kh.wait_for("allocatable kvm 0", lambda: kubelet.without(KVM))
    if reports:
        kubelet.wait_pod("vmm-health", lambda p: kvm_health(p) == "Unhealthy", "kvm Unhealthy")
    mknod(node.kvm_node(), DEVICE_NODES["kvm"][1])
    node.wait_allocatable(kh.COUNT)
    if reports:
        kubelet.wait_pod("vmm-health", lambda p: kvm_health(p) == "Healthy", "kvm Healthy again")
    now = kubelet.pod("vmm-health")
    assert now is not None and kh.running(now) and container_id(now) == container_id(pod), now
    if not reports:
        assert "allocatedResourcesStatus" not in kh.container_status(now, "vmm"), now
        print(f"kubelet 1.{kubelet_minor(node)} reports no allocatedResourcesStatus "
              f"(ResourceHealthStatus is off before 1.36): health in pod status not checked")
