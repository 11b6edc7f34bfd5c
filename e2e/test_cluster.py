"""The README's deploy path on a real cluster: the Dockerfile built, then
`kubectl apply -f daemonset.yaml` through a real API server, its admission and
the DaemonSet controller, the scheduler placing pods by
devices.kubevirt.io/kvm, two real kubelets running them with real
containerds, and a rolling update, a node reboot and the uninstall.

KDP_CLUSTER=../shared/cluster (kube-1.36.3, etcd-3.6.8) and
KDP_KUBELET=/path/to/kubelet run it; the base image is prepared once before
(`python e2e/cluster_harness.py base /var/tmp/kdp-cluster-base`). Without
them it skips with one line; KDP_REQUIRE_CLUSTER=1 (.ci/run) makes that a
failure. cluster_harness.py says how the cluster is made, and
docs/cluster.md what it proves and what it stands in for.

One cluster serves the module, and the tests are its steps, in order: each
starts from where the one before left the cluster, and says so when that
step did not get there.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import cluster_harness as ch
import kubelet_harness as kh
import pytest
import runtime_harness as rh
import yaml

KVM, TUN, VHOST = ch.resource("kvm"), ch.resource("tun"), ch.resource("vhost-net")
PRIORITY_SYSTEM_NODE_CRITICAL = 2000001000
REBOOT_BOUND_S = 120.0  # a kvm pod Running again after kvm-node's reboot
STATUS_BOUND_S = 30.0  # the Node object follows the kubelet within nodeStatusUpdateFrequency (10 s)


class PlacementLedger:
    """Every pod that asks for kvm, and the node it was bound to, polled from
    the API every 0.25 s for the whole module: none may ever be on plain-node."""

    def __init__(self, cluster: ch.Cluster) -> None:
        self.cluster = cluster
        self.bound: dict[str, str] = {}  # pod uid -> "namespace/name on node"
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopping.wait(0.25):
                self.record()
        except BaseException as e:  # noqa: BLE001 (reported by check())
            self.error = e

    def record(self) -> None:
        for namespace in ("default", ch.NAMESPACE):
            for pod in self.cluster.pods(namespace):
                node = pod["spec"].get("nodeName")
                if node and asks_for_kvm(pod):
                    self.bound[pod["metadata"]["uid"]] = f"{namespace}/{pod['metadata']['name']} on {node}"

    def on_plain_node(self) -> list[str]:
        if self.error is not None:
            raise RuntimeError("the placement ledger failed") from self.error
        self.record()
        return [entry for entry in self.bound.values() if entry.endswith(" on plain-node")]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


def asks_for_kvm(pod: dict[str, Any]) -> bool:
    return any(KVM in ((c.get("resources") or {}).get("limits") or {}) for c in pod["spec"]["containers"])


class Story:
    """What the steps leave for the ones after them."""

    def __init__(self, cluster: ch.Cluster, host_network: tuple[list[str], list[str]]) -> None:
        self.cluster = cluster
        self.host_network = host_network  # the machine's own, before the cluster started
        self.done: set[str] = set()
        self.ledger = PlacementLedger(cluster)
        # (node, pod uid) -> failed probe counts (readiness, liveness) once Ready
        self.probe_failures: dict[tuple[str, str], tuple[float, float]] = {}
        self.manifest = ""  # the applied daemonset.yaml (image name replaced)
        self.consumers: dict[str, str] = {}  # pod name -> its container id, running on kvm-node

    def require(self, step: str) -> None:
        if step not in self.done:
            pytest.fail(f"the step before did not get the cluster to '{step}': see its failure")


@pytest.fixture(scope="module")
def story() -> Iterator[Story]:
    setup = ch.require_cluster()
    host = machine_network()
    cluster = ch.Cluster(setup)
    cluster.start()
    story = None
    try:
        story = Story(cluster, host)
        yield story
    finally:
        if story is not None:
            story.ledger.stop()
        cluster.stop()
        leftovers = pgrep(cluster.work)
        assert not leftovers, f"processes left behind: {leftovers}"


def machine_network() -> tuple[list[str], list[str]]:
    """The machine's own namespace: its interfaces and routes."""
    links = json.loads(ch.run(["ip", "-j", "link", "show"]))
    routes = json.loads(ch.run(["ip", "-j", "route", "show", "table", "all"]))
    return sorted(link["ifname"] for link in links), sorted(json.dumps(r, sort_keys=True) for r in routes)


def pgrep(text: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "pgrep" not in line]


def kubectl_json(cluster: ch.Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


def wait_unschedulable(cluster: ch.Cluster, name: str, why: str) -> str:
    """The pod's PodScheduled condition's message once it says `why`."""
    def pending() -> str | None:
        pod = cluster.pod(name)
        for condition in (pod or {}).get("status", {}).get("conditions") or []:
            if condition["type"] == "PodScheduled" and condition["status"] == "False" \
                    and why in condition.get("message", ""):
                return condition["message"]
        return None

    return ch.wait_for(f"pod {name} unschedulable for {why}", pending)


def delete_pod(cluster: ch.Cluster, name: str) -> None:
    cluster.kubectl("delete", "pod", name, "--wait=true", timeout=ch.WAIT_S)


def record_probes_once_ready(story: Story, pods: dict[str, dict[str, Any]]) -> None:
    """Each Ready plugin pod's failed probe counts, once both probes have run
    and succeeded at least once: they must not grow from here on."""
    cluster = story.cluster
    for node, pod in pods.items():
        uid = pod["metadata"]["uid"]

        def both_succeeded(node: str = node, uid: str = uid) -> dict[tuple[str, str], float] | None:
            counts = probe_counts(cluster, node, uid)
            succeeded = counts[("Readiness", "successful")] and counts[("Liveness", "successful")]
            return counts if succeeded else None

        what = f"{node}'s kubelet: a successful readiness and liveness probe of {pod['metadata']['name']}"
        counts = ch.wait_for(what, both_succeeded, timeout=30)
        story.probe_failures[(node, uid)] = (counts[("Readiness", "failed")], counts[("Liveness", "failed")])


def probe_counts(cluster: ch.Cluster, node: str, uid: str) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], float] = {(t, r): 0.0 for t in ("Readiness", "Liveness")
                                            for r in ("successful", "failed", "unknown")}
    for (pod_uid, probe, result), value in cluster.nodes[node].probe_counts().items():
        if pod_uid == uid:
            counts[(probe, result)] = value
    return counts


def assert_no_probe_failed_since_ready(story: Story) -> None:
    """For every plugin pod still running: no readiness or liveness failure
    since it was Ready."""
    for (node, uid), (readiness, liveness) in story.probe_failures.items():
        counts = probe_counts(story.cluster, node, uid)
        if not counts[("Readiness", "successful")]:
            continue  # that pod is gone, and its counts with it
        assert (counts[("Readiness", "failed")], counts[("Liveness", "failed")]) == (readiness, liveness), \
            f"{node}: a probe of plugin pod {uid} failed after it was Ready: {counts}"


def plugin_container_ids(cluster: ch.Cluster) -> dict[str, str]:
    return {node: ch.container_id(pod, ch.PLUGIN_CONTAINER) for node, pod in cluster.plugin_pods().items()}


def assert_consumers_kept(story: Story) -> None:
    """The consumer pods still run the same containers, never restarted,
    each with /dev/kvm (10:232) in its own filesystem."""
    cluster, node = story.cluster, story.cluster.nodes["kvm-node"]
    for name, container in story.consumers.items():
        pod = cluster.pod(name)
        assert pod is not None, f"consumer {name} is gone"
        status = kh.container_status(pod, "vmm")
        assert kh.running(pod) and ch.container_id(pod, "vmm") == container, (name, status)
        assert status.get("restartCount") == 0, (name, status)
        assert node.container_device(container, "/dev/kvm") == ch.KVM_NUMBERS, f"{name}: /dev/kvm is gone"


# ---------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------

def test_the_daemonset_is_admitted_and_turns_ready_on_each_node(story: Story):
    """Step 1. `kubectl apply -f daemonset.yaml`, only the image name changed:
    the ServiceAccount and the DaemonSet admitted in kube-system with
    system-node-critical, a plugin pod Ready on each node, its probes run by
    the kubelet against the pod's address, and kvm-node's allocatable as the
    README shows it (vhost-net 0 where the machine has none)."""
    cluster = story.cluster
    story.manifest = ch.daemonset_manifest(cluster.work)
    with open(os.path.join(rh.PROJECT, "daemonset.yaml")) as f, open(story.manifest) as g:
        pairs = zip(f.read().splitlines(), g.read().splitlines(), strict=True)
        changed = [(a, b) for a, b in pairs if a != b]
    assert changed == [(f"          image: {ch.MANIFEST_IMAGE}", f"          image: {ch.PLUGIN_IMAGE}")]

    out = cluster.kubectl("apply", "-f", story.manifest)
    assert "serviceaccount/kvm-device-plugin created" in out, out
    assert "daemonset.apps/kvm-device-plugin created" in out, out
    account = kubectl_json(cluster, "get", "serviceaccount", "kvm-device-plugin", "-n", "kube-system")
    assert account["automountServiceAccountToken"] is False
    daemonset = kubectl_json(cluster, "get", "daemonset", ch.DAEMONSET, "-n", "kube-system")
    assert daemonset["spec"]["template"]["spec"]["priorityClassName"] == "system-node-critical"

    pods = cluster.wait_plugins_ready()
    for node, pod in pods.items():
        assert pod["spec"]["priority"] == PRIORITY_SYSTEM_NODE_CRITICAL, node
        assert pod["status"]["podIP"].startswith(f"10.244.{cluster.nodes[node].spec.index}."), pod["status"]
        # The pod's address answers inside the namespace only.
        assert cluster.network.http(f"http://{pod['status']['podIP']}:9110/readyz")[0] == 200
    record_probes_once_ready(story, pods)

    cluster.wait_allocatable("kvm-node", "kvm", 110, STATUS_BOUND_S)
    # The README's own command.
    allocatable = json.loads(cluster.kubectl("get", "node", "kvm-node", "-o",
                                             "jsonpath={.status.allocatable}"))
    print(f"kvm-node allocatable: {allocatable}")
    vhost = "110" if os.path.exists("/dev/vhost-net") else "0"
    assert (allocatable[KVM], allocatable[TUN], allocatable[VHOST]) == ("110", "110", vhost)
    story.done.add("plugins ready")


def test_plain_node_has_kvm_capacity_but_none_allocatable_and_its_plugin_stays_ready(story: Story):
    """Step 1, plain-node (its /dev has no kvm): capacity 110, allocatable 0,
    the plugin pod's log says why, and the pod stays Ready: the plugin is
    healthy, the device is not."""
    story.require("plugins ready")
    cluster = story.cluster
    cluster.wait_allocatable("plain-node", "kvm", 0, STATUS_BOUND_S, capacity=110)
    cluster.wait_allocatable("plain-node", "tun", 110, STATUS_BOUND_S)
    pod = cluster.plugin_pods()["plain-node"]
    lines = cluster.nodes["plain-node"].pod_log(pod, ch.PLUGIN_CONTAINER)
    # The plugin names the node's path; the start-up line names the mount (host root /host).
    said = "devices.kubevirt.io/kvm: 110 devices Unhealthy: /dev/kvm is missing"
    assert any(said in line for line in lines), lines
    assert any("host root /host" in line for line in lines), lines
    assert ch.pod_ready(pod)
    assert_no_probe_failed_since_ready(story)


def test_the_cluster_network_reaches_nothing_off_the_machine(story: Story):
    """Every process of the cluster and every pod is in the namespace the
    harness made: no default route, no interface but lo, the nodes' bridges
    and the pods' veths; a connection to an outside address fails before a
    packet is sent; the machine's own interfaces and routes are as they were."""
    story.require("plugins ready")
    cluster = story.cluster
    assert cluster.network.isolation_problems(expect_only_lo=False) == []
    kinds = sorted({(link.get("linkinfo") or {}).get("info_kind", "lo") for link in cluster.network.links()})
    assert kinds == ["bridge", "lo", "veth"], kinds  # the pods' veths exist: the check saw them

    def connect_out() -> int:
        with socket.socket() as s:
            s.settimeout(2)
            return s.connect_ex(("192.0.2.1", 80))

    assert cluster.network.call(connect_out) == errno.ENETUNREACH
    for process in ("kube-1.36.3", "etcd-3.6.8", os.path.basename(cluster.setup.kubelet), "containerd"):
        for line in pgrep(process):
            pid = int(line.split()[0])
            if cluster.work in line or process in ("kube-1.36.3", "etcd-3.6.8"):
                assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(cluster.network.path).st_ino, line
    assert machine_network() == story.host_network


def test_the_consumer_pod_is_placed_by_the_scheduler(story: Story):
    """Step 2. `kubectl apply -f examples/consumer-pod.yaml`, unchanged: where
    the machine has vhost-net it runs on kvm-node and lists the three nodes;
    where it has not, it stays Pending for vhost-net, and the same pod
    without the vhost-net request runs on kvm-node."""
    story.require("plugins ready")
    cluster = story.cluster
    cluster.kubectl("apply", "-f", os.path.join(rh.PROJECT, "examples", "consumer-pod.yaml"))
    if os.path.exists("/dev/vhost-net"):
        pod = cluster.wait_running("kvm-consumer")
        wanted = ("/dev/kvm", "/dev/net/tun", "/dev/vhost-net")
    else:
        message = wait_unschedulable(cluster, "kvm-consumer", "Insufficient devices.kubevirt.io/vhost-net")
        print(f"kvm-consumer stays Pending: {message}")
        time.sleep(2)
        assert cluster.pod("kvm-consumer")["spec"].get("nodeName") is None  # type: ignore[index]
        delete_pod(cluster, "kvm-consumer")
        with open(os.path.join(rh.PROJECT, "examples", "consumer-pod.yaml")) as f:
            consumer = yaml.safe_load(f)
        container = consumer["spec"]["containers"][0]
        del container["resources"]["limits"][VHOST]
        script = container["command"][2]
        container["command"][2] = script.replace(" /dev/vhost-net", "")
        assert container["command"][2].count("/dev/kvm /dev/net/tun;") == 1, script
        cluster.apply(consumer)
        pod = cluster.wait_running("kvm-consumer")
        wanted = ("/dev/kvm", "/dev/net/tun")
    assert pod["spec"]["nodeName"] == "kvm-node"

    def listing() -> list[str] | None:
        lines = cluster.nodes["kvm-node"].pod_log(pod, "vmm")
        return lines if len(lines) >= len(wanted) else None

    lines = ch.wait_for("the consumer's listing", listing, timeout=10)
    print("kvm-consumer's log:", *lines, sep="\n  ")
    for path in wanted:
        assert any(line.startswith("crw") and line.endswith(path) for line in lines), (path, lines)
    delete_pod(cluster, "kvm-consumer")
    assert story.ledger.on_plain_node() == []
    story.done.add("consumer")


def test_when_kvm_runs_out_a_pod_waits_until_one_is_freed(story: Story):
    """Step 3. The DaemonSet re-applied with --count 2: two kvm pods run on
    kvm-node, a third stays Pending (Insufficient devices.kubevirt.io/kvm),
    and runs once one of the two is deleted."""
    story.require("consumer")
    cluster = story.cluster
    before = {pod["metadata"]["uid"] for pod in cluster.plugin_pods().values()}
    story.manifest = ch.daemonset_manifest(cluster.work, count="2")
    cluster.kubectl("apply", "-f", story.manifest)
    record_probes_once_ready(story, cluster.wait_plugins_ready(besides=before))
    cluster.wait_allocatable("kvm-node", "kvm", 2, STATUS_BOUND_S)

    for name in ("kvm-a", "kvm-b"):
        cluster.apply(ch.kvm_pod(name))
    for name in ("kvm-a", "kvm-b"):
        assert cluster.wait_running(name)["spec"]["nodeName"] == "kvm-node"
    cluster.apply(ch.kvm_pod("kvm-c"))
    message = wait_unschedulable(cluster, "kvm-c", "Insufficient devices.kubevirt.io/kvm")
    print(f"kvm-c stays Pending: {message}")
    delete_pod(cluster, "kvm-b")
    pod = cluster.wait_running("kvm-c")
    assert pod["spec"]["nodeName"] == "kvm-node"
    for name in ("kvm-a", "kvm-c"):
        pod = cluster.pod(name)
        assert pod is not None
        story.consumers[name] = ch.container_id(pod, "vmm")
    assert_consumers_kept(story)
    assert story.ledger.on_plain_node() == []
    story.done.add("kvm ran out")


def test_a_rolling_update_stops_each_old_plugin_before_starting_its_successor(story: Story):
    """Step 4. A changed DaemonSet (--count back to 110): on each node the old
    plugin container has exited (0) before the new one started, as the
    node's containerd saw it (maxSurge 0); the new pods turn Ready,
    allocatable is back, and the consumers keep their containers and devices."""
    story.require("kvm ran out")
    cluster = story.cluster
    assert_no_probe_failed_since_ready(story)
    old = plugin_container_ids(cluster)
    before = {pod["metadata"]["uid"] for pod in cluster.plugin_pods().values()}
    watches = {name: ch.ContainerWatch(node) for name, node in cluster.nodes.items()}
    try:
        story.manifest = ch.daemonset_manifest(cluster.work)
        started = time.monotonic()
        cluster.kubectl("apply", "-f", story.manifest)
        pods = cluster.wait_plugins_ready(besides=before)
        print(f"rollout: both new plugin pods Ready {time.monotonic() - started:.1f} s after the apply")
    finally:
        seen = {name: watch.stop() for name, watch in watches.items()}
    record_probes_once_ready(story, pods)
    for node, pod in pods.items():
        new = ch.container_id(pod, ch.PLUGIN_CONTAINER)
        previous, successor = seen[node][old[node]], seen[node][new]
        assert previous.state == rh.cri.CONTAINER_EXITED and previous.exit_code == 0, previous
        gap_ms = (successor.started_at - previous.finished_at) / 1e6
        print(f"{node}: old plugin exited, new one started {gap_ms:.0f} ms later")
        assert previous.finished_at < successor.started_at, (node, previous, successor)
        # Never two plugin containers running at once on the node.
        plugins = sorted((s.started_at, s.finished_at or float("inf")) for s in seen[node].values()
                         if s.metadata.name == ch.PLUGIN_CONTAINER and s.started_at)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(plugins)), plugins
    cluster.wait_allocatable("kvm-node", "kvm", 110, STATUS_BOUND_S)
    assert_consumers_kept(story)
    for name in list(story.consumers):
        delete_pod(cluster, name)
        del story.consumers[name]
    story.done.add("rolled")


def test_after_a_node_reboot_the_deployment_has_a_running_kvm_pod(story: Story):
    """Step 5. A Deployment of one kvm pod runs on kvm-node; kvm-node reboots
    (kubelet and containerd stopped, every sandbox and container gone, the
    device manager's checkpoint kept, both started again). Within
    REBOOT_BOUND_S the Deployment has a Running pod with /dev/kvm; whether
    the first pod was rejected (UnexpectedAdmissionError) is recorded."""
    story.require("rolled")
    cluster, node = story.cluster, story.cluster.nodes["kvm-node"]
    cluster.apply(ch.kvm_deployment("vmm"))
    reboot = cluster.reboot_with("vmm", REBOOT_BOUND_S)
    print(f"reboot: {reboot.describe()}")
    assert reboot.processes_left == set()
    assert os.path.exists(node.kubelet.checkpoint)  # kept through the reboot
    replacement = reboot.replacement
    assert replacement["spec"]["nodeName"] == "kvm-node"
    pods = cluster.wait_plugins_ready()
    record_probes_once_ready(story, pods)
    story.consumers[replacement["metadata"]["name"]] = ch.container_id(replacement, "vmm")
    assert_consumers_kept(story)
    assert story.ledger.on_plain_node() == []
    story.done.add("rebooted")


def test_metrics_from_the_plugin_pods_address(story: Story):
    """Step 6. /metrics from each plugin pod's address, inside the namespace:
    every resource registered."""
    story.require("plugins ready")
    cluster = story.cluster
    for node, pod in cluster.wait_plugins_ready().items():
        status, body = cluster.network.http(f"http://{pod['status']['podIP']}:9110/metrics")
        assert status == 200, (node, status)
        for name in (KVM, TUN, VHOST):
            assert f'kvm_device_plugin_registered{{resource="{name}"}} 1' in body.splitlines(), (node, name)
    assert_no_probe_failed_since_ready(story)


def test_uninstall_leaves_the_running_consumers_alone(story: Story):
    """Step 7. `kubectl delete -f daemonset.yaml`: the plugin containers exit
    0, kvm-node's allocatable kvm drops to 0 at the kubelet's next status
    update, and the running consumer keeps running with its device."""
    story.require("rebooted")
    cluster = story.cluster
    assert_no_probe_failed_since_ready(story)
    old = plugin_container_ids(cluster)
    watches = {name: ch.ContainerWatch(node) for name, node in cluster.nodes.items()}
    try:
        deleted = time.monotonic()
        out = cluster.kubectl("delete", "-f", story.manifest)
        assert "daemonset.apps \"kvm-device-plugin\" deleted" in out, out
        gone = cluster.wait_allocatable("kvm-node", "kvm", 0, STATUS_BOUND_S)
        print(f"kvm-node's allocatable kvm 0 in the API {gone - deleted:.1f} s after the delete "
              f"(nodeStatusUpdateFrequency 10 s)")
        ch.wait_for("the plugin pods gone", lambda: not cluster.plugin_pods())
        ch.wait_for("the plugin containers exited", lambda: all(
            name in watches and old[name] in watches[name].seen and
            watches[name].seen[old[name]].state == rh.cri.CONTAINER_EXITED for name in old))
    finally:
        seen = {name: watch.stop() for name, watch in watches.items()}
    for node, container in old.items():
        assert seen[node][container].exit_code == 0, (node, seen[node][container])
    time.sleep(1)
    assert_consumers_kept(story)
    assert story.ledger.on_plain_node() == []


# ---------------------------------------------------------------------------
# What cannot be done on these machines, said by tests
# ---------------------------------------------------------------------------

def test_no_docker_engine_here_so_the_image_is_built_with_buildah():
    """The README says `docker build`; these machines have a Docker client
    but no engine (and no registry to push to), so the suite builds the same
    Dockerfile with buildah and imports the image into each node's
    containerd. Where the suite runs and an engine answers, this fails: build
    with docker there."""
    ch.require_cluster()
    docker = shutil.which("docker")
    answers = docker is not None and subprocess.run([docker, "info"], capture_output=True,
                                                    timeout=30).returncode == 0
    assert not answers, "a Docker engine answers: use `docker build` as the README does"


def test_this_kubectl_has_no_logs_or_exec():
    """The README's troubleshooting uses `kubectl logs` and `kubectl exec`;
    the kubectl in ../shared/cluster has only apply, get, delete, wait and
    api-resources, so the suite reads container logs from the nodes' pod log
    files. If it ever has them, this fails: use them then."""
    setup = ch.require_cluster()
    for verb in ("logs", "exec"):
        answer = subprocess.run([setup.kube, "kubectl", verb, "--help"], capture_output=True, text=True,
                                timeout=30)
        assert answer.returncode != 0 and "unknown command" in answer.stdout + answer.stderr, verb


def test_this_kernel_cannot_give_vhost_net_so_the_three_device_consumer_runs_elsewhere():
    """examples/consumer-pod.yaml asks for vhost-net too; on a node without
    it the pod stays Pending, and that is the branch the consumer step ran
    here. Where /dev/vhost-net exists the step runs the unchanged pod
    instead; where it does not, the kernel must show that it cannot have it
    (built without vhost-net, or without module loading), else the node is
    only missing `modprobe vhost_net` and the suite should load it."""
    ch.require_cluster()
    config = ""
    if os.path.exists("/proc/config.gz"):
        import gzip
        with gzip.open("/proc/config.gz", "rt") as f:
            config = f.read()
    built_without = "# CONFIG_VHOST_NET is not set" in config.splitlines()
    no_modules = not os.path.exists("/proc/modules")
    assert os.path.exists("/dev/vhost-net") or built_without or no_modules, \
        "/dev/vhost-net is missing but the kernel could load vhost_net"

