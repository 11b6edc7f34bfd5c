"""The DaemonSet's own pod, run by a real containerd exactly as daemonset.yaml says.

The pod template is read from daemonset.yaml itself and turned into CRI
PodSandboxConfig and ContainerConfig as the kubelet would
(runtime_harness.daemonset_sandbox_config / daemonset_container_config): the
command and args as they are, env, the securityContext (uid 0, every
capability dropped, no_new_privs, read-only root filesystem, seccomp
RuntimeDefault), each volumeMount over its hostPath volume, resources,
terminationGracePeriodSeconds. Two substitutions, both outside the manifest:
the kubelet stand-in's temporary directory is the device-plugins hostPath, and
since no image can be pulled or built here, the container gets the host's
Python and the project's virtual environment read-only at their own paths and
the project at /app (with PATH set so that the manifest's `python` is found).
The point is the security context and the mounts, not the image.

The kubelet's side is fake_kubelet.FakeKubelet on the host; probes are HTTP GETs
on the pod's IP and the manifest's probe port, from inside the pod's network
namespace, as the kubelet reaches a pod from the node.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from typing import Iterator

import pytest

import cri_runtime_pb2 as cri
import runtime_harness as rh
from fake_kubelet import FakeKubelet

DEVICES = ("kvm", "tun", "vhost-net")
WAIT_S = 20.0


def resource(name: str) -> str:
    return f"devices.kubevirt.io/{name}"


@pytest.fixture(scope="module")
def daemonset() -> dict:
    return rh.load_daemonset()


@pytest.fixture(scope="module")
def containerd() -> Iterator[rh.Containerd]:
    """containerd's defaults (device ownership from the host): the plugin's pod
    is given no devices. Only the first test needs /dev/kvm (it checks kvm
    Healthy); the others hold on any machine with the runtime."""
    rh.require_runtime(kvm=False)
    work = tempfile.mkdtemp(prefix="kdpimg")
    try:
        instance = rh.start_containerd("d", False, rh.build_image(work))
        try:
            yield instance
        finally:
            instance.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Node:
    """One node: the kubelet stand-in's device-plugins directory, and the
    DaemonSet's pods on it, each stopped and removed when the test ends."""

    def __init__(self, containerd: rh.Containerd, daemonset: dict) -> None:
        self.containerd = containerd
        self.client = containerd.client
        self.daemonset = daemonset
        self.dir = tempfile.mkdtemp(prefix="kdpds")
        self.plugin_dir = os.path.join(self.dir, "dp")
        os.makedirs(self.plugin_dir)  # the kubelet makes it; the manifest's hostPath type is Directory
        self.kubelet = FakeKubelet(self.plugin_dir)
        self.kubelet.start()
        self.pods: list[rh.PluginPod] = []
        args = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
        self.count = int(args[args.index("--count") + 1])

    def start_pod(self, name: str) -> rh.PluginPod:
        pod = rh.start_daemonset_pod(self.containerd, self.plugin_dir, name)
        self.pods.append(pod)
        return pod

    def wait_registered(self, pod: rh.PluginPod, registrations: int = 1) -> None:
        names = [resource(n) for n in DEVICES]
        assert self.kubelet.wait_registered(names, self.count, timeout=WAIT_S, min_registrations=registrations), \
            "\n".join(self.log(pod))

    def log(self, pod: rh.PluginPod) -> list[str]:
        return rh.read_log(self.client.status(pod.container_id).log_path)

    def probe(self, pod: rh.PluginPod, probe: str) -> tuple[int, str]:
        path, port = rh.probe_path_and_port(self.daemonset, probe)
        return rh.http_get(pod.sandbox.netns, pod.sandbox.ip, port, path)

    def wait_probe(self, pod: rh.PluginPod, probe: str, status: int) -> tuple[int, str]:
        deadline = time.monotonic() + WAIT_S
        while True:
            answer = self.probe(pod, probe)
            if answer[0] == status or time.monotonic() > deadline:
                return answer
            time.sleep(0.05)

    def sockets(self) -> list[str]:
        return sorted(n for n in os.listdir(self.plugin_dir)
                      if stat.S_ISSOCK(os.lstat(os.path.join(self.plugin_dir, n)).st_mode))

    def close(self) -> None:
        for pod in self.pods:
            self.client.remove_sandbox(pod.sandbox.id)
        self.kubelet.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def node(containerd: rh.Containerd, daemonset: dict) -> Iterator[Node]:
    made = Node(containerd, daemonset)
    yield made
    made.close()


def json_log(lines: list[str]) -> list[dict]:
    """`--log-format json`: every line of the CRI log file one JSON object."""
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and set(r) >= {"time", "level", "message"} for r in records), lines
    return records


def expected_health(name: str) -> str:
    return "Healthy" if os.path.exists({"kvm": "/dev/kvm", "tun": "/dev/net/tun",
                                        "vhost-net": "/dev/vhost-net"}[name]) else "Unhealthy"


# ---------------------------------------------------------------------------


def test_registers_with_health_from_stat_and_probes_answer(node):
    """1. Every resource registers; kvm is Healthy from stat and /proc/misc
    although the device cgroup refuses its open, and the log says so once; a
    missing node is Unhealthy with its reason. 2. /readyz and /healthz are 200."""
    rh.require_kvm()
    pod = node.start_pod("kvm-device-plugin-a")
    node.wait_registered(pod)
    for name in DEVICES:
        assert set(node.kubelet.state(resource(name)).devices.values()) == {expected_health(name)}
    assert node.wait_probe(pod, "readinessProbe", 200) == (200, "ready\n")
    assert node.probe(pod, "livenessProbe") == (200, "ok\n")

    messages = [r["message"] for r in json_log(node.log(pod))]
    print("\n".join(node.log(pod)))
    refused = [m for m in messages if m.startswith("cannot open /dev/kvm")]
    assert len(refused) == 1 and "EPERM" in refused[0], messages
    assert any(m.startswith("devices.kubevirt.io/kvm: 110 devices Healthy: node 10:232 present, driver loaded")
               for m in messages), messages
    if not os.path.exists("/dev/vhost-net"):
        assert ("devices.kubevirt.io/vhost-net: 110 devices Unhealthy: "
                "/dev/vhost-net is missing (load kernel module vhost_net)") in messages


def test_kubelet_restart_is_seen_through_the_bind_mount(node):
    """3. The stand-in deletes the sockets and re-creates kubelet.sock in the
    host directory; the plugin sees it through the bind mount and registers again."""
    pod = node.start_pod("kvm-device-plugin-a")
    node.wait_registered(pod)
    node.kubelet.restart()
    node.wait_registered(pod, registrations=2)
    assert node.wait_probe(pod, "readinessProbe", 200)[0] == 200
    assert any("kubelet restarted" in r["message"] for r in json_log(node.log(pod)))


def test_second_pod_on_the_node_refuses_and_the_first_keeps_serving(node):
    """4. The directory lock holds across containers: a second pod from the
    same template exits 1 saying why; the first is still registered and ready."""
    first = node.start_pod("kvm-device-plugin-a")
    node.wait_registered(first)
    second = node.start_pod("kvm-device-plugin-b")
    exited = node.client.wait_exit(second.container_id, WAIT_S)
    assert exited.exit_code == 1, exited.lines
    assert any("another kvm-device-plugin is already serving" in r["message"] for r in json_log(exited.lines))
    assert node.client.status(first.container_id).state == cri.CONTAINER_RUNNING
    assert all(node.kubelet.state(resource(n)).registrations == 1 for n in DEVICES)
    assert node.probe(first, "readinessProbe")[0] == 200


def test_stop_within_grace_period_leaves_nothing_and_writes_no_rootfs(node, daemonset):
    """5. StopContainer with the manifest's grace period: exit code 0, the
    kubelet got the empty list, the sockets are gone; the root filesystem is
    mounted read-only and nothing tried to write it. 6. The container log is one
    JSON object per line."""
    pod = node.start_pod("kvm-device-plugin-a")
    node.wait_registered(pod)
    info = node.client.stub.ContainerStatus(cri.ContainerStatusRequest(container_id=pod.container_id,
                                                                       verbose=True), timeout=WAIT_S).info
    pid = json.loads(info["info"])["pid"]
    with open(f"/proc/{pid}/mountinfo") as f:
        root = next(line.split() for line in f if line.split()[4] == "/")
    assert "ro" in root[5].split(","), root

    node.client.stub.StopContainer(cri.StopContainerRequest(container_id=pod.container_id,
                                                            timeout=rh.grace_period(daemonset)),
                                   timeout=rh.grace_period(daemonset) + WAIT_S)
    status = node.client.status(pod.container_id)
    lines = node.log(pod)
    print("\n".join(lines))
    assert status.state == cri.CONTAINER_EXITED and status.exit_code == 0, lines  # not SIGKILLed: 137
    for name in DEVICES:  # the empty list, not a broken stream (that keeps the capacity)
        assert node.kubelet.state(resource(name)).capacity == 0
    assert node.sockets() == ["kubelet.sock"]
    assert os.listdir(node.plugin_dir) == ["kubelet.sock"]  # and no files of its own
    records = json_log(lines)
    assert records[-1]["message"] == "stopped"
    assert not [r for r in records if r["level"] == "error" or "Read-only file system" in r["message"]]
