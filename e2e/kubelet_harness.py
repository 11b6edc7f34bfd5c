"""A real kubelet for the tests: a kubelet binary (KDP_KUBELET) run standalone
(no API server: static pods from a directory, no kubeconfig) against the
runtime harness's private containerd, with the real plugin beside it.

What a kubelet needs on these sandboxed machines, and how it gets it here:
- Its device-plugins directory is a constant (/var/lib/kubelet/device-plugins,
  whatever --root-dir says), and so is /var/log/containers. The kubelet runs
  in a mount namespace of its own (`unshare --mount --propagation private`)
  where a directory of the test's is bind-mounted over each; the plugin gets
  that directory as --plugin-dir. The host keeps its paths as they were: a
  missing mount target is created, and removed by the last run that leaves.
- The container manager wants vm.overcommit_memory=1, kernel.panic=10 and
  kernel.panic_on_oops=1, and rewrites the host's values otherwise. With
  protectKernelDefaults it only checks them, and in its namespace a file
  holding the wanted value is bind-mounted over each /proc/sys file.
- cgroupfs driver with a cgroupRoot of the test's own: containerd's cgroup
  parent (so that Containerd.stop() finds and removes everything below it),
  created beforehand in every hierarchy (cpuset copied from the parent).
- --cert-dir, volumePluginDir, podLogsDir and the root directory under the
  test's directory; every listener on 127.0.0.1 on free ports; anonymous
  authentication and AlwaysAllow (the default webhooks need an API server).
- The kubelet's view, without an API server: the read-only port's /pods, the
  pod-resources API (<root-dir>/pod-resources/kubelet.sock), the device
  manager's checkpoint and the pod log files.

Nothing here asserts: test_kubelet.py and bench_plugin.py --kubelet use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import podresources_pb2 as podres
import podresources_pb2_grpc as podres_grpc
import runtime_harness as rh

from fake_kubelet import DEVICE_NODES, free_port, make_device_nodes, mknod

KUBELET_ENV = "KDP_KUBELET"  # the kubelet binary to run
REQUIRE_ENV = "KDP_REQUIRE_KUBELET"  # 1: a missing binary or /dev/kvm fails instead of skipping
DOMAIN = "devices.kubevirt.io"
DEVICES = ("kvm", "tun", "vhost-net")
COUNT = 110  # the plugin's default
NODE_NAME = "kdp-node"  # static pods are named <pod>-<node name>
WAIT_S = 30.0  # upper bound for anything the kubelet should do in a few seconds
# Constant paths in the kubelet, bind-mounted in its namespace.
KUBELET_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
CONTAINER_LOGS = "/var/log/containers"
# The values the kubelet's container manager insists on (protectKernelDefaults).
KERNEL_DEFAULTS = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}
# Host mount targets this suite created, shared by concurrent runs: the last
# one out (the only one that gets the exclusive lock) removes them.
SHARED_LOCK = "/run/kdp-kubelet-e2e.lock"
SHARED_CREATED = "/run/kdp-kubelet-e2e.created"

T = TypeVar("T")


def resource(name: str) -> str:
    return f"{DOMAIN}/{name}"


def require_kubelet(kvm: bool) -> str:
    """The kubelet binary to run; skips (KDP_REQUIRE_KUBELET=1: fails) the
    calling test with one line when it cannot run here."""
    import pytest

    def refuse(reason: str) -> None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1 makes the real-kubelet suite mandatory)")
        pytest.skip(reason)

    binary = os.environ.get(KUBELET_ENV, "")
    if not binary:
        refuse(f"no kubelet to run: point {KUBELET_ENV}=/path/to/kubelet at one")
    elif not os.access(binary, os.X_OK):
        refuse(f"{KUBELET_ENV}={binary} is not an executable file")
    missing = rh.missing_requirement() or (None if shutil.which("unshare") else
                                           "unshare is not installed: apt-get install -y util-linux")
    if missing:
        refuse(missing)
    if kvm and not os.path.exists("/dev/kvm"):
        refuse("this machine has no /dev/kvm (no hardware virtualisation exposed)")
    return binary


def wait_for(what: str, check: Callable[[], T | None], timeout: float = WAIT_S, every: float = 0.02) -> T:
    """check()'s first true answer within `timeout`, else TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(every)


# ---------------------------------------------------------------------------
# When things happened: inotify for kubelet.sock, the kubelet's own log lines
# ---------------------------------------------------------------------------

IN_CREATE = 0x100
INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, name length; then the name


class SocketCreations:
    """The wall-clock times (time.time()) at which `name` was created in
    `directory`, seen by inotify in a thread of its own: the socket's ctime
    has the kernel's coarse clock (jiffies), and polling would be late by its
    interval. A thread woken late makes a creation look later, never earlier."""

    def __init__(self, directory: str, name: str) -> None:
        self.name = name.encode()
        self.times: list[float] = []
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, directory.encode(), IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {directory}")
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self.stopping:
            if not poller.poll(50):
                continue
            now = time.time()
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                _, mask, _, length = INOTIFY_EVENT.unpack_from(data, offset)
                name = data[offset + INOTIFY_EVENT.size:offset + INOTIFY_EVENT.size + length].rstrip(b"\0")
                offset += INOTIFY_EVENT.size + length
                if mask & IN_CREATE and name == self.name:
                    self.times.append(now)

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        os.close(self.fd)


# klog: "I0512 10:11:12.123456    1234 file.go:91] message", in local time.
KLOG_LINE = re.compile(r"^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d{6})\s+\d+ \S+\] (.*)$", re.MULTILINE)


def klog_lines(log: str) -> list[tuple[float, str]]:
    """(time.time() of the line, its message) for each klog line in `log`."""
    year = datetime.date.today().year
    found = []
    for day, clock, message in KLOG_LINE.findall(log):
        moment = datetime.datetime.strptime(f"{year}{day} {clock}", "%Y%m%d %H:%M:%S.%f")
        found.append((moment.timestamp(), message))
    return found


def first_lists(log: str) -> dict[str, float]:
    """resource -> when the kubelet's device manager logged the first
    ListAndWatch answer from it ("State pushed for device plugin", V(2), in
    the kubelet's stream client, right before it hands the list to the
    device manager's callback that fills the healthy set)."""
    found: dict[str, float] = {}
    for moment, message in klog_lines(log):
        pushed = re.match(r'"State pushed for device plugin" resource="([^"]+)"', message)
        if pushed and pushed[1] not in found:
            found[pushed[1]] = moment
    return found


def kubelet_log_time(log: str, message: str) -> float | None:
    """When the first klog line starting with `message` (quoted) was logged."""
    return next((moment for moment, text in klog_lines(log) if text.startswith(f'"{message}"')), None)


# ---------------------------------------------------------------------------
# Host paths shared with other runs
# ---------------------------------------------------------------------------

class SharedTargets:
    """The kubelet's constant directories as mount targets on the host: made
    when missing, and removed (if still empty) by the last run that leaves."""

    def __init__(self) -> None:
        self.lock = open(SHARED_LOCK, "a")  # noqa: SIM115 (held open: the lock lives as long as the run)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        try:
            made = []
            for path in (KUBELET_PLUGIN_DIR, CONTAINER_LOGS):
                parts = path.strip("/").split("/")
                for i in range(1, len(parts) + 1):
                    prefix = "/" + "/".join(parts[:i])
                    if not os.path.isdir(prefix):
                        os.mkdir(prefix)
                        made.append(prefix)
            if made:
                with open(SHARED_CREATED, "a") as f:
                    f.writelines(p + "\n" for p in made)
        finally:
            fcntl.flock(self.lock, fcntl.LOCK_SH)  # held while this run uses them

    def release(self) -> None:
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()  # another run still uses them: it removes them
            return
        try:
            with open(SHARED_CREATED) as f:
                made = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            made = []
        for path in sorted(set(made), key=lambda p: p.count("/"), reverse=True):
            try:
                os.rmdir(path)
            except OSError:
                pass
        try:
            os.unlink(SHARED_CREATED)
        except FileNotFoundError:
            pass
        self.lock.close()


# ---------------------------------------------------------------------------
# The kubelet
# ---------------------------------------------------------------------------

def _create_cgroup_root(name: str) -> list[str]:
    """`name` in every cgroup hierarchy (the kubelet checks each before it
    starts); cpuset needs cpus and mems before anything can join it."""
    made = []
    for entry in sorted(os.listdir("/sys/fs/cgroup")):
        hierarchy = os.path.join("/sys/fs/cgroup", entry)
        if os.path.islink(hierarchy) or not os.path.ismount(hierarchy):
            continue
        path = os.path.join(hierarchy, name.lstrip("/"))
        os.makedirs(path, exist_ok=True)
        made.append(path)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if os.path.exists(os.path.join(path, knob)):
                with open(os.path.join(hierarchy, knob)) as f:
                    value = f.read().strip()
                with open(os.path.join(path, knob), "w") as f:
                    f.write(value)
    if not made and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # cgroup v2: one tree
        os.makedirs(os.path.join("/sys/fs/cgroup", name.lstrip("/")), exist_ok=True)
    return made


class Kubelet:
    """One kubelet process in its own mount namespace; start() and stop()
    may be called again (a kubelet restart keeps every directory)."""

    def __init__(self, binary: str, containerd: rh.Containerd, work: str) -> None:
        self.binary = binary
        self.containerd = containerd
        self.work = work
        self.root_dir = os.path.join(work, "root")
        self.plugin_dir = os.path.join(work, "dp")
        self.container_logs = os.path.join(work, "containers")
        self.pod_logs = os.path.join(work, "pods")
        self.manifests = os.path.join(work, "manifests")
        self.config_path = os.path.join(work, "kubelet.yaml")
        self.log_path = os.path.join(work, "kubelet.log")
        self.pod_resources_socket = os.path.join(self.root_dir, "pod-resources", "kubelet.sock")
        self.checkpoint = os.path.join(self.plugin_dir, "kubelet_internal_checkpoint")
        for path in (self.root_dir, self.plugin_dir, self.container_logs, self.pod_logs, self.manifests):
            os.makedirs(path, exist_ok=True)
        self.port, self.read_only_port, self.healthz_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.log_offset = 0  # where the current process's log starts
        self._channel: grpc.Channel | None = None
        self._write_config()

    def _write_config(self) -> None:
        sysctl_dir = os.path.join(self.work, "sysctl")
        os.makedirs(sysctl_dir, exist_ok=True)
        for key, value in KERNEL_DEFAULTS.items():
            with open(os.path.join(sysctl_dir, key.replace("/", ".")), "w") as f:
                f.write(value + "\n")
        with open(self.config_path, "w") as f:
            json.dump(self._config(), f, indent=1)  # JSON is YAML

    def _config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.port,
            "readOnlyPort": self.read_only_port,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "staticPodPath": self.manifests,
            "fileCheckFrequency": "1s",
            "containerRuntimeEndpoint": f"unix://{self.containerd.socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.containerd.cgroup_parent,
            "failSwapOn": False,
            "failCgroupV1": False,  # a cgroup v1 hybrid host: 1.36 exits at once without it
            "makeIPTablesUtilChains": False,
            "protectKernelDefaults": True,
            "volumePluginDir": os.path.join(self.work, "volume-plugins"),
            "podLogsDir": self.pod_logs,
            "resolvConf": "",
        }

    def _command(self) -> list[str]:
        """unshare execs sh, sh makes the mounts and execs the kubelet: the
        Popen's pid is the kubelet's, and the namespace (with its mounts) goes
        when the kubelet exits."""
        binds = [(self.plugin_dir, KUBELET_PLUGIN_DIR), (self.container_logs, CONTAINER_LOGS)]
        binds += [(os.path.join(self.work, "sysctl", key.replace("/", ".")), f"/proc/sys/{key}")
                  for key in KERNEL_DEFAULTS]
        script = " && ".join(f"mount --bind '{source}' '{target}'" for source, target in binds)
        script += ' && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "kubelet",
                self.binary, f"--config={self.config_path}", f"--root-dir={self.root_dir}",
                f"--cert-dir={os.path.join(self.work, 'pki')}", f"--hostname-override={NODE_NAME}", "--v=2"]

    def start(self) -> float:
        """Start the kubelet; returns when its device manager listens (the
        time, monotonic, when the new kubelet.sock was seen)."""
        socket_path = os.path.join(self.plugin_dir, "kubelet.sock")
        self.log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        # Inode numbers are reused at once: a socket made after this instant
        # (its ctime; the kernel's clock is coarse, hence the margin) is the new one.
        started = time.time() - 0.02
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(), stdout=log, stderr=log, start_new_session=True)

        def listening() -> float | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the kubelet exited {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                return time.monotonic() if os.stat(socket_path).st_ctime >= started else None
            except FileNotFoundError:
                return None

        seen = wait_for("the kubelet's kubelet.sock", listening, every=0.001)
        wait_for("the kubelet's pod-resources socket", lambda: os.path.exists(self.pod_resources_socket))
        return seen

    def stop(self) -> int | None:
        """SIGTERM by pid; its exit code (None if it had to be killed)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        return rh.stop_process(proc, WAIT_S)

    def log(self) -> str:
        """This kubelet process's log (since the last start)."""
        return rh.read_text(self.log_path, self.log_offset)

    # The kubelet's view --------------------------------------------------

    def registered(self) -> set[str]:
        """Resources this kubelet process logged a registration request for."""
        return set(re.findall(r'Got registration request from device plugin with resource"?\s+'
                              r'resourceName="([^"]+)"', self.log()))

    def _pod_resources(self) -> podres_grpc.PodResourcesListerStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.pod_resources_socket}",
                                                  options=[("grpc.use_local_subchannel_pool", 1)])
        return podres_grpc.PodResourcesListerStub(self._channel)

    def allocatable(self) -> dict[str, list[str]]:
        """GetAllocatableResources: the healthy device IDs per resource."""
        response = self._pod_resources().GetAllocatableResources(podres.AllocatableResourcesRequest(), timeout=5)
        found: dict[str, list[str]] = {}
        for devices in response.devices:
            found.setdefault(devices.resource_name, []).extend(devices.device_ids)
        return found

    def poll_allocatable(self) -> dict[str, list[str]] | None:
        """allocatable(), or None while the kubelet's rate limit on the
        pod-resources API (100 per second, bursts of 10) refuses the call."""
        try:
            return self.allocatable()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return None
            raise

    def without(self, name: str) -> bool:
        """True once the kubelet's allocatable holds no device of `name`."""
        allocatable = self.poll_allocatable()
        return allocatable is not None and not allocatable.get(name)

    def pod_devices(self) -> dict[tuple[str, str], dict[str, list[str]]]:
        """List: (pod name, container name) -> resource -> device IDs."""
        response = self._pod_resources().List(podres.ListPodResourcesRequest(), timeout=5)
        found: dict[tuple[str, str], dict[str, list[str]]] = {}
        for pod in response.pod_resources:
            for container in pod.containers:
                entry = found.setdefault((pod.name, container.name), {})
                for devices in container.devices:
                    entry.setdefault(devices.resource_name, []).extend(devices.device_ids)
        return found

    def pods(self) -> dict[str, dict[str, Any]]:
        """The read-only port's /pods: name -> pod (static pods carry their status)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.read_only_port}/pods", timeout=5) as answer:
            items = json.load(answer).get("items") or []
        return {pod["metadata"]["name"]: pod for pod in items}

    def checkpoint_devices(self) -> dict[tuple[str, str], dict[str, list[str]]]:
        """The device manager's checkpoint: (pod UID, container) -> resource -> IDs."""
        with open(self.checkpoint) as f:
            data = json.load(f)["Data"]
        found: dict[tuple[str, str], dict[str, list[str]]] = {}
        for entry in data.get("PodDeviceEntries") or []:
            ids = entry["DeviceIDs"]
            # Since 1.20 a map of NUMA node -> IDs; before, a plain list.
            flat = [i for group in ids.values() for i in group] if isinstance(ids, dict) else list(ids)
            found.setdefault((entry["PodUID"], entry["ContainerName"]), {})[entry["ResourceName"]] = flat
        return found

    def registered_devices(self) -> dict[str, list[str]]:
        """The checkpoint's RegisteredDevices: every device (healthy or not)
        of every resource the device manager holds."""
        with open(self.checkpoint) as f:
            return json.load(f)["Data"].get("RegisteredDevices") or {}

    # Static pods -----------------------------------------------------------

    def add_pod(self, name: str, spec: dict[str, Any]) -> float:
        """Write a static pod manifest (atomically); returns when it was written."""
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"}, "spec": spec}
        # Written under a dot name, which the kubelet's file source ignores,
        # then renamed: a pod read from a half-written or temporary file would
        # be replaced by another UID, and its successor waits ~10 s for it to end.
        hidden = os.path.join(self.manifests, f".{name}.yaml")
        with open(hidden, "w") as f:
            json.dump(pod, f)
        written = time.monotonic()
        os.rename(hidden, os.path.join(self.manifests, f"{name}.yaml"))
        return written

    def remove_pod(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.manifests, f"{name}.yaml"))
        except FileNotFoundError:
            pass

    def pod(self, name: str) -> dict[str, Any] | None:
        return self.pods().get(f"{name}-{NODE_NAME}")

    def wait_pod(self, name: str, check: Callable[[dict[str, Any]], bool], what: str,
                 timeout: float = WAIT_S) -> dict[str, Any]:
        seen: list[dict[str, Any]] = []

        def ready() -> dict[str, Any] | None:
            pod = self.pod(name)
            if pod is not None:
                seen[:] = [pod]
                if check(pod):
                    return pod
            return None

        try:
            return wait_for(f"pod {name} {what}", ready, timeout, every=0.01)
        except TimeoutError as e:
            status = json.dumps(seen[0].get("status") if seen else None)
            raise TimeoutError(f"{e}; its status: {status}\nkubelet log tail:\n{self.log()[-3000:]}") from None

    def container_log(self, pod: dict[str, Any], container: str) -> list[str]:
        """The log of the container's current attempt (<restartCount>.log)."""
        uid = pod["metadata"]["uid"]
        directory = os.path.join(self.pod_logs, f"default_{pod['metadata']['name']}_{uid}", container)
        attempt = container_status(pod, container).get("restartCount") or 0
        return rh.read_log(os.path.join(directory, f"{attempt}.log"))


def container_status(pod: dict[str, Any], container: str) -> dict[str, Any]:
    return next((s for s in pod.get("status", {}).get("containerStatuses") or [] if s["name"] == container), {})


def running(pod: dict[str, Any], container: str = "vmm") -> bool:
    return "running" in container_status(pod, container).get("state", {})


# ---------------------------------------------------------------------------
# The plugin and the whole node
# ---------------------------------------------------------------------------

class Node:
    """containerd, the kubelet and the plugin, with --host-root a tree of the
    test's own (mknod'ed nodes: the host's /dev is never touched; Allocate
    still names /dev/kvm, the node's real path, for the runtime)."""

    def __init__(self, binary: str) -> None:
        self.work = tempfile.mkdtemp(prefix="kdpk")
        self.host_root = os.path.join(self.work, "host")
        make_device_nodes(self.host_root)
        self.plugin_log_path = os.path.join(self.work, "plugin.log")
        self.plugin: subprocess.Popen | None = None
        self.plugin_log_offset = 0
        self.image_dir = os.path.join(self.work, "image")
        os.makedirs(self.image_dir)
        self.containerd: rh.Containerd | None = None
        self.kubelet: Kubelet | None = None
        self.targets: SharedTargets | None = None
        self.cgroups: list[str] = []
        self.binary = binary

    def start(self) -> None:
        """Everything up, the plugin registered; on failure all is undone."""
        try:
            self.targets = SharedTargets()
            self.containerd = rh.start_containerd("k", True, rh.build_image(self.image_dir))
            self.cgroups = _create_cgroup_root(self.containerd.cgroup_parent)
            self.kubelet = Kubelet(self.binary, self.containerd, self.work)
            self.kubelet.start()
            self.start_plugin()
        except BaseException:
            self.stop()
            raise

    def kvm_node(self) -> str:
        return os.path.join(self.host_root, DEVICE_NODES["kvm"][0])

    def start_plugin(self, wait: bool = True) -> None:
        """Start the plugin; with `wait`, return once it is registered."""
        assert self.kubelet is not None
        self.plugin_log_offset = os.path.getsize(self.plugin_log_path) if os.path.exists(self.plugin_log_path) else 0
        with open(self.plugin_log_path, "ab") as log:
            self.plugin = subprocess.Popen(
                [sys.executable, os.path.join(rh.PROJECT, "kvm_device_plugin.py"),
                 "--plugin-dir", self.kubelet.plugin_dir, "--host-root", self.host_root],
                stdout=log, stderr=log, cwd=rh.PROJECT, start_new_session=True)
        if wait:
            self.wait_registered()

    def wait_registered(self) -> None:
        """Every resource registered in this kubelet process's log, and 110 kvm
        and tun allocatable; a timeout says what both logs said."""
        assert self.kubelet is not None
        kubelet = self.kubelet

        def registered() -> bool:
            if self.plugin is not None and self.plugin.poll() is not None:
                raise RuntimeError(f"the plugin exited {self.plugin.returncode}:\n{self.plugin_log()[-3000:]}")
            return kubelet.registered() >= {resource(n) for n in DEVICES}

        try:
            wait_for("the kubelet's registrations of " + ", ".join(DEVICES), registered)
            self.wait_allocatable(COUNT)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nplugin log:\n{self.plugin_log()[-3000:]}\n"
                               f"kubelet log:\n{kubelet.log()[-3000:]}") from None

    def wait_allocatable(self, count: int, names: tuple[str, ...] = ("kvm", "tun")) -> dict[str, list[str]]:
        assert self.kubelet is not None
        kubelet = self.kubelet

        def enough() -> dict[str, list[str]] | None:
            allocatable = kubelet.poll_allocatable()
            if allocatable is not None and all(len(allocatable.get(resource(n), [])) == count for n in names):
                return allocatable
            return None

        return wait_for(f"allocatable {count} of " + ", ".join(names), enough, every=0.002)

    def plugin_log(self) -> str:
        return rh.read_text(self.plugin_log_path, self.plugin_log_offset)

    def stop_plugin(self) -> int | None:
        if self.plugin is None:
            return None
        proc, self.plugin = self.plugin, None
        return rh.stop_process(proc, WAIT_S)

    def stop(self) -> None:
        """Plugin, kubelet (its namespace and mounts go with it), containerd
        (every sandbox, leftover process and cgroup below the cgroup root),
        the shared mount targets if this is the last run, the directory."""
        try:
            self.stop_plugin()
            if self.kubelet is not None:
                self.kubelet.stop()
        finally:
            try:
                if self.containerd is not None:
                    self.containerd.stop()
            finally:
                for path in sorted(self.cgroups, key=lambda p: p.count("/"), reverse=True):
                    for dirpath, _, _ in sorted(os.walk(path), key=lambda w: w[0].count("/"), reverse=True):
                        try:
                            os.rmdir(dirpath)
                        except OSError:
                            pass
                if self.targets is not None:
                    self.targets.release()
                    self.targets = None
                shutil.rmtree(self.work, ignore_errors=True)


    # Reboots ------------------------------------------------------------------

    def shut_down(self) -> None:
        """What a node's shutdown leaves: the kubelet stopped (first, as
        systemd stops it before a unit ordered Before= it), then the plugin;
        every pod sandbox and container gone from containerd, which stays up
        (it comes up before the kubelet at boot, empty). The kubelet's files
        are kept: the device manager's checkpoint, a stale kubelet.sock, the
        static pod manifests, its root directory. The pods' log directories
        go, so that each boot's container log is its own."""
        assert self.kubelet is not None and self.containerd is not None and self.containerd.client is not None
        self.kubelet.stop()
        self.stop_plugin()
        client = self.containerd.client
        for sandbox in client.stub.ListPodSandbox(rh.cri.ListPodSandboxRequest(), timeout=WAIT_S).items:
            client.remove_sandbox(sandbox.id)
        for entry in os.listdir(self.kubelet.pod_logs):
            shutil.rmtree(os.path.join(self.kubelet.pod_logs, entry), ignore_errors=True)

    def boot(self, plugin_late_s: float | None) -> None:
        """Start the kubelet and the plugin as a booting node does: with
        `plugin_late_s` None the plugin first and the kubelet right after it
        (a systemd unit of Type=exec ordered Before=kubelet.service: the
        kubelet starts once the plugin's process runs), else the kubelet
        first and the plugin that long after the kubelet's kubelet.sock
        appeared (a DaemonSet pod: the kubelet starts it)."""
        assert self.kubelet is not None
        if plugin_late_s is None:
            self.start_plugin(wait=False)
            self.kubelet.start()
        else:
            seen = self.kubelet.start()
            time.sleep(max(0.0, seen + plugin_late_s - time.monotonic()))
            self.start_plugin(wait=False)


# What became of a pod asking for kvm after a boot.
ADMITTED = "admitted"  # running, /dev/kvm in its container
REJECTED = "rejected"  # Failed: UnexpectedAdmissionError
WITHOUT_DEVICE = "admitted without the device"  # running, no /dev/kvm
KVM_OPENED = "open: ok open /dev/kvm"
KVM_MISSING = "open: FAILED open /dev/kvm: errno 2 (No such file or directory)"


def boot_outcome(kubelet: Kubelet, name: str, timeout: float = WAIT_S) -> tuple[str, dict[str, Any]]:
    """Wait for pod `name` to be refused or to run its probe of /dev/kvm
    (pod_spec("/probe open=/dev/kvm")); the outcome and the pod."""
    def decided(pod: dict[str, Any]) -> bool:
        if pod.get("status", {}).get("phase") == "Failed":
            return True
        if not running(pod):
            return False
        lines = kubelet.container_log(pod, "vmm")
        return KVM_OPENED in lines or KVM_MISSING in lines

    pod = kubelet.wait_pod(name, decided, "refused, or running its probe", timeout)
    status = pod.get("status", {})
    if status.get("phase") == "Failed":
        refused = status.get("reason") == "UnexpectedAdmissionError"
        return (REJECTED if refused else "failed: " + json.dumps(status)), pod
    return (ADMITTED if KVM_OPENED in kubelet.container_log(pod, "vmm") else WITHOUT_DEVICE), pod


# ---------------------------------------------------------------------------
# Pods
# ---------------------------------------------------------------------------

PLUGIN_LATE_S = 1.0  # a DaemonSet plugin after a reboot: the kubelet starts it
UID = 1000
NON_ROOT_VMM = {
    "runAsUser": UID,
    "runAsGroup": UID,
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod_spec(script: str, devices: tuple[str, ...] = ("kvm", "tun")) -> dict[str, Any]:
    """One container "vmm" running `script` then sleeping (it stays running
    for the checks that follow), non-root, asking for one of each device."""
    limits = {resource(n): "1" for n in devices}
    return {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 0,
        "containers": [{
            "name": "vmm",
            "image": rh.IMAGE,
            "imagePullPolicy": "Never",
            "command": ["/bin/sh", "-c", f"{script}; echo probe exit $?; exec sleep 2147483647"],
            "securityContext": NON_ROOT_VMM,
            "resources": {"limits": limits, "requests": limits} if limits else {},
        }],
    }


# ---------------------------------------------------------------------------
# bench_plugin.py --kubelet
# ---------------------------------------------------------------------------

def sock_to_all_lists(node: Node, starts: int) -> list[dict[str, Any]]:
    """`starts` kubelet restarts with the plugin running: for each, from the
    new kubelet.sock's creation (inotify) to every resource's first list in
    the kubelet's device manager (its log, microseconds), in ms; with each
    resource's own figure and the kubelet's "Starting device plugin
    registration server" line (just before it deletes the sockets and listens)
    relative to the creation, to tell the clocks apart."""
    kubelet = node.kubelet
    assert kubelet is not None
    runs = []
    watch = SocketCreations(kubelet.plugin_dir, "kubelet.sock")
    try:
        for _ in range(starts):
            kubelet.stop()
            before = len(watch.times)
            kubelet.start()
            node.wait_registered()
            created = wait_for("kubelet.sock's creation seen by inotify",
                               lambda n=before: watch.times[n] if len(watch.times) > n else None)
            # wait_registered() waits for kvm's and tun's devices, not for
            # vhost-net's list (its node may be missing: Unhealthy, not in allocatable).
            wait_for("every resource's first list in the kubelet's log",
                     lambda: len(first_lists(kubelet.log())) >= len(DEVICES))
            log = kubelet.log()
            lists = {name.rsplit("/", 1)[1]: round((moment - created) * 1000, 2)
                     for name, moment in first_lists(log).items()}
            server = kubelet_log_time(log, "Starting device plugin registration server")
            runs.append({"ms": max(lists[n] for n in DEVICES), "lists": lists,
                         "server_log_ms": round((server - created) * 1000, 2) if server else None,
                         "wall": created})
    finally:
        watch.close()
    return runs


def reboots(node: Node, boots: int, plugin_late_s: float | None, checkpoint: bool = True) -> list[str]:
    """The static pod `vmm` (kvm, restartPolicy Always) running, then
    `boots` simulated reboots (Node.shut_down, the checkpoint removed unless
    `checkpoint`, Node.boot): the outcome of each for the pod. Between boots
    the plugin is let register, as on a node that ran a while."""
    kubelet = node.kubelet
    assert kubelet is not None
    spec = pod_spec("/probe open=/dev/kvm", devices=("kvm",))
    spec["restartPolicy"] = "Always"
    # A static pod's UID is its manifest's hash: one of its own per series,
    # or the kubelet would take it for the last series' (Failed) pod.
    spec["containers"][0]["env"] = [{"name": "SERIES", "value": os.urandom(4).hex()}]
    kubelet.add_pod("vmm", spec)
    outcomes = []
    try:
        outcome, _ = boot_outcome(kubelet, "vmm")
        if outcome != ADMITTED:
            raise RuntimeError(f"vmm before any reboot: {outcome}\n{kubelet.log()[-3000:]}")
        for _ in range(boots):
            node.shut_down()
            if not checkpoint:
                # A boot without the device leaves none behind to remove.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(kubelet.checkpoint)
            node.boot(plugin_late_s)
            outcomes.append(boot_outcome(kubelet, "vmm")[0])
            node.wait_registered()
    finally:
        kubelet.remove_pod("vmm")
        wait_for("pod vmm gone", lambda: kubelet.pod("vmm") is None)
    return outcomes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def bench_main(binary: str, quick: bool) -> int:
    """Medians of several runs, a table, then one JSON object as the last line."""
    import statistics

    if not os.access(binary, os.X_OK):
        print(f"bench --kubelet: {binary} is not an executable file", file=sys.stderr)
        return 1
    missing = rh.missing_requirement()
    if missing or not os.path.exists("/dev/kvm"):
        print(f"bench --kubelet: {missing or 'no /dev/kvm'}", file=sys.stderr)
        return 1
    runs = 3 if quick else 7
    starts = 10 if quick else 30  # kubelet starts for kubelet_sock_to_all_lists_ms
    boots, silent_boots = (3, 2) if quick else (10, 5)
    figures: dict[str, list[float]] = {"kubelet_restart_to_registered_ms": [],
                                       "unlink_to_kubelet_allocatable_0_ms": [],
                                       "kvm_pod_manifest_to_running_ms": []}
    node = Node(binary)
    node.start()
    try:
        kubelet = node.kubelet
        assert kubelet is not None
        for run in range(runs):
            # The kubelet restarted: new kubelet.sock -> every resource registered
            # in its log and every device allocatable in pod-resources.
            kubelet.stop()
            seen = kubelet.start()
            node.wait_registered()
            figures["kubelet_restart_to_registered_ms"].append(round((time.monotonic() - seen) * 1000, 1))
            # The node unlinked -> the kubelet's allocatable kvm 0; re-created after.
            # First a pause that refills the pod-resources rate limiter's burst
            # (10 calls, 100 per second), so that the polling below is not refused.
            time.sleep(0.2)
            os.unlink(node.kvm_node())
            gone = time.monotonic()
            wait_for("allocatable kvm 0", lambda: kubelet.without(resource("kvm")), every=0)
            figures["unlink_to_kubelet_allocatable_0_ms"].append(round((time.monotonic() - gone) * 1000, 2))
            mknod(node.kvm_node(), DEVICE_NODES["kvm"][1])
            node.wait_allocatable(COUNT)
            # A manifest written -> its container running in /pods.
            name = f"bench-{run}"
            written = kubelet.add_pod(name, pod_spec("/probe kvm"))
            kubelet.wait_pod(name, running, "running")
            figures["kvm_pod_manifest_to_running_ms"].append(round((time.monotonic() - written) * 1000, 1))
            kubelet.remove_pod(name)
            wait_for(f"pod {name} gone", lambda gone=name: kubelet.pod(gone) is None)
        sock_runs = sock_to_all_lists(node, starts)
        outcomes = {"plugin_first": reboots(node, boots, None),
                    "plugin_late": reboots(node, boots, PLUGIN_LATE_S),
                    "no_checkpoint_plugin_late": reboots(node, silent_boots, PLUGIN_LATE_S, checkpoint=False)}
    finally:
        node.stop()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                             check=True).stdout.strip()
    print(f"{version}: the plugin under a real kubelet, {runs} runs each (ms)")
    print(f"{'figure':<36} {'median':>8} {'min':>8} {'max':>8}  runs")
    results: dict[str, Any] = {}
    for key, values in figures.items():
        print(f"{key:<36} {statistics.median(values):>8.1f} {min(values):>8.1f} {max(values):>8.1f}  {values}")
        results[key] = round(statistics.median(values), 2)
    sock_ms = [run["ms"] for run in sock_runs]
    print(f"kubelet_sock_to_all_lists_ms over {len(sock_ms)} kubelet starts: "
          f"p50 {percentile(sock_ms, 0.5):.1f} p99 {percentile(sock_ms, 0.99):.1f} max {max(sock_ms):.1f}")
    print(f"  each: {sorted(sock_ms)}")
    for run in sorted(sock_runs, key=lambda r: -r["ms"])[:5]:
        wall = time.strftime("%H:%M:%S", time.gmtime(run["wall"])) + f".{int(run['wall'] % 1 * 1000):03d}Z"
        print(f"  slowest: {run['ms']:.1f} ms, per resource {run['lists']}, the kubelet's 'Starting device "
              f"plugin registration server' at {run['server_log_ms']} ms; kubelet.sock made at {wall}")
    results["kubelet_sock_to_all_lists_ms_p50"] = percentile(sock_ms, 0.5)
    results["kubelet_sock_to_all_lists_ms_p99"] = percentile(sock_ms, 0.99)
    results["kubelet_sock_to_all_lists_ms_max"] = max(sock_ms)
    for ordering, seen in outcomes.items():
        admitted = seen.count(ADMITTED)
        print(f"reboot_admitted_fraction_{ordering}: {admitted}/{len(seen)}  {seen}")
        results[f"reboot_admitted_fraction_{ordering}"] = round(admitted / len(seen), 2)
    print(json.dumps(results), flush=True)
    return 0
