"""A real cluster for the tests, on one machine: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler (KDP_CLUSTER: the folder that holds
kube-1.36.3 and etcd-3.6.8) and two nodes, each a real kubelet (KDP_KUBELET)
with a containerd of its own.

The network. Everything runs in one network namespace made here (`unshare
--net`): etcd, the control plane, both nodes, their containerds and, through
CNI's bridge plugin, their pods. Before anything starts, the namespace is
checked to have nothing but its loopback and no route at all: pod addresses
are routed only inside it, and no packet can leave the machine. The test
process stays in the machine's namespace; what it sends to the cluster (API
requests, /metrics) goes from one thread of its own that joined the
cluster's namespace (setns acts on the calling thread only), and every
command (kubectl, buildah) runs under `nsenter --net`.

The nodes. Each node is a mount namespace of its own, shared by its kubelet and
its containerd, as on a real node where both see one filesystem: the node's
own directories are bind-mounted over /var/lib, /var/log and /run, so the
DaemonSet's hostPath /var/lib/kubelet/device-plugins, the kubelet's
/var/log/containers and containerd's shim sockets and pinned network
namespaces are the node's, and the machine's stay as they were. kvm-node sees
the machine's /dev; plain-node a tmpfs at /dev holding copies (mknod) of the
machine's device nodes but kvm. The machine's /dev/kvm is never touched. Each
node has its own cgroup root, ports, pod subnet (10.244.N.0/24 on a bridge of
its own) and node address (the bridge's).

The images. The plugin's image is built from the project's Dockerfile,
unchanged, with buildah, on a stand-in for python:3.11-slim-bookworm made
from Debian's packages (prepare_base: debootstrap, then a venv at /usr/local
so that `python` and `pip` are on PATH as in the official image). The base
and the wheels that `pip install -r requirements.txt` takes are fetched once,
before the suite (`python e2e/cluster_harness.py base DIR`): the build itself
runs in the cluster's namespace, offline, pip reading the wheels from a
folder (a pip.conf mounted for the build). The consumer's busybox:1.36.1 and
the sandbox image are the runtime tests' image (static busybox) under those
names.

Cleanup, also on failure: the API objects first (the kubelet stops a pod's
sandbox only once the pod is deleted), then the kubelets, the containerds
(every sandbox, shim and cgroup), the control plane and etcd, each stopped by
its pid; then the nodes' mount namespaces (their mounts go with them), the
cgroup roots, the network namespace (its bridges and veths go with it) and
the files.

Nothing here asserts: test_cluster.py and bench_plugin.py --cluster use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

if __name__ == "__main__":  # as a script: the project importable, as pytest.ini makes it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc
import kubelet_harness as kh
import runtime_harness as rh
from runtime_harness import cri

CLUSTER_ENV = "KDP_CLUSTER"  # the folder with kube-1.36.3 and etcd-3.6.8
REQUIRE_ENV = "KDP_REQUIRE_CLUSTER"  # 1: a missing binary or a skip fails
BASE_ENV = "KDP_CLUSTER_BASE"  # the prepared base image and wheels (prepare_base)
DEFAULT_BASE = "/var/tmp/kdp-cluster-base"
KUBE = "kube-1.36.3"
ETCD = "etcd-3.6.8"
# The README's `docker build -t` name; daemonset.yaml's placeholder is replaced by it.
PLUGIN_IMAGE = "registry.example.org/kvm-device-plugin:0.1.0"
MANIFEST_IMAGE = "kvm-device-plugin:0.1.0"
BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"  # the Dockerfile's FROM
BUSYBOX_IMAGE = "docker.io/library/busybox:1.36.1"  # examples/consumer-pod.yaml's
CNI_PLUGINS = "/usr/lib/cni"  # Debian's containernetworking-plugins
DOMAIN = "devices.kubevirt.io"
NAMESPACE = "kube-system"
DAEMONSET = "kvm-device-plugin"
PLUGIN_CONTAINER = "kvm-device-plugin"
API = "https://127.0.0.1:6443"
WAIT_S = 60.0  # upper bound for anything the cluster should do in seconds
CLONE_NEWNET = 0x40000000
KVM_NUMBERS = (10, 232)  # /dev/kvm's major and minor

T = TypeVar("T")


def resource(name: str) -> str:
    return f"{DOMAIN}/{name}"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    index: int  # its pod subnet 10.244.<index>.0/24, its ports
    kvm: bool  # sees the machine's /dev (else a /dev without kvm)

    @property
    def gateway(self) -> str:
        """The bridge's address: the pods' gateway and the node's address."""
        return f"10.244.{self.index}.1"

    @property
    def bridge(self) -> str:
        return f"kdp-{self.name}"[:15]  # an interface name has at most 15 bytes


NODES = (NodeSpec("kvm-node", 1, True), NodeSpec("plain-node", 2, False))


@dataclass(frozen=True)
class Setup:
    kube: str
    etcd: str
    kubelet: str
    base: str


def missing_requirement() -> str | None:
    """One line naming what is missing to run the cluster here, or None."""
    folder = os.environ.get(CLUSTER_ENV, "")
    if not folder:
        return (f"no cluster to run: point {CLUSTER_ENV} at a folder with {KUBE} and {ETCD} "
                f"(../shared/cluster) and {kh.KUBELET_ENV} at a kubelet, and prepare the base image "
                f"once with `python e2e/cluster_harness.py base {DEFAULT_BASE}`")
    for name in (KUBE, ETCD):
        if not os.access(os.path.join(folder, name), os.X_OK):
            return f"{CLUSTER_ENV}={folder} has no executable {name}"
    kubelet = os.environ.get(kh.KUBELET_ENV, "")
    if not kubelet or not os.access(kubelet, os.X_OK):
        return f"{kh.KUBELET_ENV}={kubelet!r} is not an executable kubelet"
    missing = rh.missing_requirement()
    if missing:
        return missing
    for program, package in (("buildah", "buildah"), ("debootstrap", "debootstrap"),
                             ("openssl", "openssl"), ("unshare", "util-linux")):
        if shutil.which(program) is None:
            return f"{program} is not installed: apt-get install -y {package}"
    for plugin in ("bridge", "host-local", "loopback"):
        if not os.access(os.path.join(CNI_PLUGINS, plugin), os.X_OK):
            return f"no CNI plugin {CNI_PLUGINS}/{plugin}: apt-get install -y containernetworking-plugins"
    if not os.path.exists("/dev/kvm"):
        return "this machine has no /dev/kvm (no hardware virtualisation exposed): kvm-node would have none"
    base = base_dir()
    if not base_ready(base):
        return (f"the base image is not prepared in {base}: "
                f"python e2e/cluster_harness.py base {base} (fetches Debian's packages and the wheels)")
    return None


def require_cluster() -> Setup:
    """The binaries and the base; skips (KDP_REQUIRE_CLUSTER=1: fails) the
    calling test with one line when the cluster cannot run here."""
    import pytest

    missing = missing_requirement()
    if missing:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{missing} ({REQUIRE_ENV}=1 makes the cluster suite mandatory)")
        pytest.skip(missing)
    return setup_from_env()


def setup_from_env() -> Setup:
    folder = os.environ[CLUSTER_ENV]
    return Setup(os.path.join(folder, KUBE), os.path.join(folder, ETCD), os.environ[kh.KUBELET_ENV],
                 base_dir())


def wait_for(what: str, check: Callable[[], T | None], timeout: float = WAIT_S, every: float = 0.1) -> T:
    return kh.wait_for(what, check, timeout, every)


def run(argv: list[str], timeout: float = WAIT_S, input: str | None = None) -> str:
    """argv's standard output; RuntimeError with its output when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result.stdout


# ---------------------------------------------------------------------------
# The base image and the wheels, fetched once before the suite
# ---------------------------------------------------------------------------

def base_dir() -> str:
    return os.environ.get(BASE_ENV) or DEFAULT_BASE


def base_ready(base: str) -> bool:
    return os.path.exists(os.path.join(base, "ready"))


def buildah(base: str, runroot: str) -> list[str]:
    """buildah on the base's own image store (vfs: no overlay mounts to clean)."""
    return ["buildah", "--storage-driver", "vfs", "--root", os.path.join(base, "storage"),
            "--runroot", runroot]


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources)."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        with contextlib.suppress(OSError), open(path) as f:
            text = f.read()
            found = re.search(r"^URIs:\s*(\S+)", text, re.MULTILINE) or \
                re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+\s+main", text, re.MULTILINE)
            if found:
                return found[1]
    return "http://deb.debian.org/debian"


def prepare_base(base: str) -> None:
    """The stand-in for python:3.11-slim-bookworm, in base/storage, and the
    wheels requirements.txt takes for it, in base/wheels. Fetches from
    Debian's mirror and PyPI: run it before the suite, not during it."""
    os.makedirs(base, exist_ok=True)
    rootfs = os.path.join(base, "rootfs")
    runroot = os.path.join(base, "run")
    shutil.rmtree(rootfs, ignore_errors=True)
    try:
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", rootfs, debian_mirror()], timeout=900)
        # The official image has python and pip on PATH in /usr/local/bin.
        run(["chroot", rootfs, "python3", "-m", "venv", "/usr/local"], timeout=120)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in os.listdir(os.path.join(rootfs, cache)):
                path = os.path.join(rootfs, cache, entry)
                if os.path.isfile(path):
                    os.unlink(path)
        tool = buildah(base, runroot)
        container = run([*tool, "from", "scratch"]).strip()
        try:
            run([*tool, "copy", container, rootfs + "/", "/"], timeout=600)
            path = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
            description = ("kvm-device-plugin's stand-in for python:3.11-slim-bookworm: "
                           "Debian bookworm minbase, python3 and a venv at /usr/local")
            run([*tool, "config", "--env", f"PATH={path}", "--env", "LANG=C.UTF-8", "--cmd", "python3",
                 "--label", f"org.opencontainers.image.description={description}", container])
            run([*tool, "commit", "-q", container, BASE_IMAGE], timeout=600)
        finally:
            subprocess.run([*tool, "rm", container], capture_output=True, timeout=60)
        wheels = os.path.join(base, "wheels")
        shutil.rmtree(wheels, ignore_errors=True)
        machine = platform.machine()
        run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
             "--only-binary=:all:",
             "--python-version", "3.11", "--implementation", "cp",
             "--platform", f"manylinux2014_{machine}", "--platform", f"manylinux_2_17_{machine}",
             "-r", os.path.join(rh.PROJECT, "requirements.txt"), "-d", wheels], timeout=600)
        with open(os.path.join(base, "ready"), "w") as f:
            f.write(f"{BASE_IMAGE}: debootstrap --variant=minbase bookworm + python3, python3-venv, "
                    f"ca-certificates; venv at /usr/local\nwheels: {' '.join(sorted(os.listdir(wheels)))}\n")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
        shutil.rmtree(runroot, ignore_errors=True)


# ---------------------------------------------------------------------------
# The network namespace
# ---------------------------------------------------------------------------

def _join_netns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class Network:
    """The cluster's network namespace, held by a sleeping process; calls
    from the test go through one thread that joined it."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.holder: subprocess.Popen | None = None
        self.pool: ThreadPoolExecutor | None = None

    @property
    def path(self) -> str:
        assert self.holder is not None
        return f"/proc/{self.holder.pid}/ns/net"

    def start(self) -> None:
        """The namespace with lo up; RuntimeError, and nothing left running,
        if it has a route or an interface it should not."""
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && exec sleep 2147483647"],
            start_new_session=True)
        mine = os.stat("/proc/self/ns/net").st_ino
        wait_for("the network namespace", lambda: self._up(mine), every=0.01)
        problems = self.isolation_problems(expect_only_lo=True)
        if problems:
            self.stop()
            raise RuntimeError("the cluster's network namespace is not isolated: " + "; ".join(problems))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cluster-netns", initializer=_join_netns,
                                       initargs=(self.path,))

    def _up(self, mine: int) -> bool:
        assert self.holder is not None
        if self.holder.poll() is not None:
            raise RuntimeError(f"unshare --net exited {self.holder.returncode}")
        try:
            if os.stat(self.path).st_ino == mine:
                return False
        except FileNotFoundError:
            return False
        return "UP" in self.ip("-j", "link", "show", "lo")

    def enter(self) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--"]

    def ip(self, *args: str) -> str:
        return run([*self.enter(), "ip", *args])

    def links(self) -> list[dict[str, Any]]:
        return json.loads(self.ip("-j", "-d", "link", "show"))

    def routes(self) -> list[dict[str, Any]]:
        """Every route of every table, IPv4 and IPv6."""
        return json.loads(self.ip("-j", "route", "show", "table", "all")) + \
            json.loads(self.ip("-j", "-6", "route", "show", "table", "all"))

    def isolation_problems(self, expect_only_lo: bool) -> list[str]:
        """What could carry a packet off the machine: a default route, or an
        interface that is not the namespace's own (lo, the nodes' bridges,
        and veths whose other end is in a pod's namespace, which CNI made)."""
        problems = []
        for route in self.routes():
            if route.get("dst") == "default" or route.get("gateway"):
                problems.append(f"route {json.dumps(route)}")
        bridges = {spec.bridge for spec in NODES}
        for link in self.links():
            name, kind = link["ifname"], (link.get("linkinfo") or {}).get("info_kind")
            if name == "lo":
                continue
            if expect_only_lo:
                problems.append(f"interface {name} before anything started")
            elif not (kind == "bridge" and name in bridges) and \
                    not (kind == "veth" and "link_netnsid" in link and link.get("master") in bridges):
                problems.append(f"interface {name} ({kind}, master {link.get('master')})")
        return problems

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = WAIT_S) -> T:
        """fn(*args) on the thread inside the namespace."""
        assert self.pool is not None
        return self.pool.submit(fn, *args).result(timeout)

    def http(self, url: str, token: str | None = None, method: str = "GET",
             timeout: float = 5.0) -> tuple[int, str]:
        """(status, body) of a request made from inside the namespace; TLS
        unverified (the API server and the kubelets sign their own)."""
        return self.call(_http, url, token, method, timeout, timeout=timeout + 5)

    def stop(self) -> None:
        """The thread first (it holds the namespace too), then the holder:
        with the last process out, the kernel removes the namespace and every
        interface in it."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        if self.holder is not None:
            rh.stop_process(self.holder)
            self.holder = None


def _http(url: str, token: str | None, method: str, timeout: float) -> tuple[int, str]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            return answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

class Service:
    """One long-running process with its log in a file; stopped by its pid."""

    def __init__(self, name: str, argv: list[str], log_path: str) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, start_new_session=True)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.name} exited {code}:\n{self.log()[-3000:]}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        return rh.stop_process(proc, WAIT_S)

    def log(self) -> str:
        return rh.read_text(self.log_path)


# ---------------------------------------------------------------------------
# The control plane
# ---------------------------------------------------------------------------

class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler, as
    ../shared/cluster/README.md lists what worked: one token (group
    system:masters) in every component's kubeconfig, the API server's own
    serving certificate, no leader election, no node IPAM."""

    def __init__(self, setup: Setup, work: str, network: Network) -> None:
        self.work = os.path.join(work, "control-plane")
        os.makedirs(self.work)
        self.setup = setup
        self.network = network
        self.token = secrets.token_hex(16)
        self.kubeconfig = os.path.join(self.work, "kubeconfig")
        self.services: list[Service] = []

    def _files(self) -> None:
        with open(os.path.join(self.work, "tokens.csv"), "w") as f:
            f.write(f"{self.token},kdp-admin,kdp-admin,system:masters\n")
        key = os.path.join(self.work, "sa.key")
        run(["openssl", "genrsa", "-out", key, "2048"])
        run(["openssl", "rsa", "-in", key, "-pubout", "-out", os.path.join(self.work, "sa.pub")])
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kdp",
            "clusters": [{"name": "kdp", "cluster": {"server": API, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "kdp-admin", "user": {"token": self.token}}],
            "contexts": [{"name": "kdp", "context": {"cluster": "kdp", "user": "kdp-admin"}}],
        }
        with open(self.kubeconfig, "w") as f:
            json.dump(config, f)

    def _service(self, name: str, argv: list[str]) -> Service:
        service = Service(name, [*self.network.enter(), *argv], os.path.join(self.work, f"{name}.log"))
        self.services.append(service)
        service.start()
        return service

    def _wait_healthy(self, service: Service, url: str, token: str | None = None) -> None:
        def healthy() -> bool:
            service.check_alive()
            try:
                return self.network.http(url, token)[0] == 200
            except OSError:
                return False

        wait_for(f"{service.name} at {url}", healthy, every=0.1)

    def start(self) -> None:
        self._files()
        work, kube = self.work, self.setup.kube
        etcd = self._service("etcd", [
            self.setup.etcd, "--data-dir", os.path.join(work, "etcd"),
            "--listen-client-urls", "http://127.0.0.1:2379", "--listen-peer-urls", "http://127.0.0.1:2380"])
        self._wait_healthy(etcd, "http://127.0.0.1:2379/health")
        apiserver = self._service("kube-apiserver", [
            kube, "apiserver", "--etcd-servers=http://127.0.0.1:2379",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port=6443",
            # A loopback address cannot be the `kubernetes` Service's endpoint.
            "--endpoint-reconciler-type=none",
            f"--token-auth-file={work}/tokens.csv", "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={work}/sa.pub", f"--service-account-signing-key-file={work}/sa.key",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.96.0.0/16", f"--cert-dir={work}/pki", "--allow-privileged=true"])
        self._wait_healthy(apiserver, f"{API}/readyz", self.token)
        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1"]
        controllers = self._service("kube-controller-manager", [
            kube, "controller-manager", *common, "--secure-port=10257",
            f"--service-account-private-key-file={work}/sa.key", "--use-service-account-credentials=false",
            "--controllers=*,-nodeipam"])
        scheduler = self._service("kube-scheduler", [kube, "scheduler", *common, "--secure-port=10259"])
        self._wait_healthy(controllers, "https://127.0.0.1:10257/healthz")
        self._wait_healthy(scheduler, "https://127.0.0.1:10259/healthz")

    def stop(self) -> None:
        """Last started, first stopped: etcd goes last."""
        for service in reversed(self.services):
            service.stop()


# ---------------------------------------------------------------------------
# A node: its mount namespace, containerd and kubelet
# ---------------------------------------------------------------------------

def plain_dev_script() -> list[str]:
    """Shell lines that put a tmpfs at /dev holding a copy (mknod, same
    numbers and modes) of each of the machine's device nodes but kvm, and the
    usual symlinks and mounts."""
    lines = ["mount -t tmpfs -o mode=0755,nosuid tmpfs /dev"]
    for directory in ("/dev", "/dev/net"):
        if directory != "/dev":
            lines.append(f"mkdir -p {directory}")
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            if path == "/dev/kvm":
                continue
            info = os.lstat(path)
            kind = "c" if stat.S_ISCHR(info.st_mode) else "b" if stat.S_ISBLK(info.st_mode) else None
            if kind:
                lines.append(f"mknod -m {stat.S_IMODE(info.st_mode):o} {path} {kind} "
                             f"{os.major(info.st_rdev)} {os.minor(info.st_rdev)}")
            elif stat.S_ISLNK(info.st_mode):
                lines.append(f"ln -s {os.readlink(path)} {path}")
    lines += ["mkdir -p /dev/pts /dev/shm",
              "mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts",
              "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm"]
    return lines


class NodeContainerd(rh.Containerd):
    """The runtime harness's containerd, run in the node's namespaces, with
    CNI's bridge plugin (Debian's containernetworking-plugins): each pod a veth
    on the node's bridge, an address from the node's subnet (host-local)."""

    def __init__(self, node: ClusterNode) -> None:
        super().__init__(f"c{node.spec.index}", device_ownership_from_security_context=False)
        self.node = node  # command_prefix is set once the node's namespace is there

    def write_cni(self, cni_conf: str) -> str:
        spec = self.node.spec
        network = {
            "cniVersion": "0.4.0", "name": "kdp-pods",
            "plugins": [{
                "type": "bridge", "bridge": spec.bridge, "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": f"10.244.{spec.index}.0/24",
                                                            "gateway": spec.gateway}]]},
            }],
        }
        with open(os.path.join(cni_conf, "10-kdp-pods.conflist"), "w") as f:
            json.dump(network, f)
        return CNI_PLUGINS

    def processes(self) -> set[int]:
        """Its shims' and containers' processes (those in its cgroup parent)."""
        return self._leftovers()[0]

    def halt(self) -> None:
        """What a node's shutdown leaves of it: every sandbox and container
        gone, containerd stopped; its images kept."""
        assert self.client is not None
        for sandbox in self.client.stub.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=WAIT_S).items:
            self.client.remove_sandbox(sandbox.id)
        self.client.close()
        self.client = None
        if self.proc is not None:
            rh.stop_process(self.proc)
            self.proc = None


class NodeKubelet(kh.Kubelet):
    """The real-kubelet suite's kubelet, in the node's namespaces, with a
    kubeconfig: it registers its Node and runs what the API server binds to it."""

    def __init__(self, binary: str, containerd: NodeContainerd, node: ClusterNode, kubeconfig: str) -> None:
        self.node = node
        self.kubeconfig = kubeconfig
        super().__init__(binary, containerd, os.path.join(node.work, "kubelet"))
        # The constant path inside the node is the node's own directory here.
        self.plugin_dir = node.plugin_dir
        self.checkpoint = os.path.join(self.plugin_dir, "kubelet_internal_checkpoint")

    @property
    def api_port(self) -> int:
        return 10250 + 100 * self.node.spec.index

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config.update({
            "address": self.node.spec.gateway,
            "port": self.api_port,
            "readOnlyPort": 0,
            "healthzPort": 10248 + 100 * self.node.spec.index,
        })
        del config["staticPodPath"], config["fileCheckFrequency"]
        return config

    def _command(self) -> list[str]:
        """The node's holder made every mount (and the sysctl files) already."""
        return [*self.node.enter(), self.binary, f"--config={self.config_path}",
                f"--root-dir={self.root_dir}",
                f"--cert-dir={os.path.join(self.work, 'pki')}", f"--kubeconfig={self.kubeconfig}",
                f"--hostname-override={self.node.spec.name}", f"--node-ip={self.node.spec.gateway}", "--v=2"]

    def start(self) -> float:
        """The kubelet; returns once its device manager listens (it then registers its Node)."""
        return super().start()


class ClusterNode:
    """One node: a mount namespace (held by a sleeping process) in the
    cluster's network namespace, a bridge, a containerd and a kubelet."""

    def __init__(self, spec: NodeSpec, work: str, network: Network, kubelet: str, kubeconfig: str) -> None:
        self.spec = spec
        self.work = os.path.join(work, spec.name)
        self.network = network
        self.var_lib = os.path.join(self.work, "var-lib")
        self.var_log = os.path.join(self.work, "var-log")
        self.run_dir = os.path.join(self.work, "run")
        self.plugin_dir = os.path.join(self.var_lib, "kubelet", "device-plugins")
        for path in (self.plugin_dir, self.var_log, self.run_dir):
            os.makedirs(path)
        self.holder: subprocess.Popen | None = None
        self.cgroups: list[str] = []
        self.containerd = NodeContainerd(self)
        self.kubelet = NodeKubelet(kubelet, self.containerd, self, kubeconfig)

    def enter(self) -> list[str]:
        """A command prefix that runs in this node's namespaces (the holder's
        pid is read when the prefix is made, after start())."""
        assert self.holder is not None
        return ["nsenter", f"--net={self.network.path}", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--"]

    def _holder_script(self) -> str:
        binds = [(self.var_lib, "/var/lib"), (self.var_log, "/var/log"), (self.run_dir, "/run")]
        binds += [(os.path.join(self.kubelet.work, "sysctl", key.replace("/", ".")), f"/proc/sys/{key}")
                  for key in kh.KERNEL_DEFAULTS]
        lines = [f"mount --bind '{source}' '{target}'" for source, target in binds]
        if not self.spec.kvm:
            lines += plain_dev_script()
        lines.append("exec sleep 2147483647")
        return " && ".join(lines)

    def start(self, images: list[str]) -> None:
        """The namespace, the bridge, containerd with `images` imported (and
        the sandbox image also named busybox:1.36.1), the kubelet."""
        self.holder = subprocess.Popen(
            [*self.network.enter(), "unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", self._holder_script()], start_new_session=True)
        mine = os.stat("/proc/self/ns/mnt").st_ino
        wait_for(f"{self.spec.name}'s mount namespace", lambda: self._holding(mine), every=0.01)
        bridge, gateway = self.spec.bridge, self.spec.gateway
        self.network.ip("link", "add", bridge, "type", "bridge")
        self.network.ip("addr", "add", f"{gateway}/24", "dev", bridge)
        self.network.ip("link", "set", bridge, "up")
        self.cgroups = kh._create_cgroup_root(self.containerd.cgroup_parent)
        self.containerd.command_prefix = self.enter()
        self.containerd.start()
        for archive in images:
            self.containerd.import_image(archive)
        run(["ctr", "--address", self.containerd.socket, "-n", rh.CRI_NAMESPACE, "images", "tag",
             rh.IMAGE, BUSYBOX_IMAGE])
        self.kubelet.start()

    def _holding(self, mine: int) -> bool:
        assert self.holder is not None
        if self.holder.poll() is not None:
            raise RuntimeError(f"{self.spec.name}'s namespace holder exited {self.holder.returncode}")
        try:
            if os.stat(f"/proc/{self.holder.pid}/ns/mnt").st_ino == mine:
                return False
            with open(f"/proc/{self.holder.pid}/comm") as f:
                return f.read().strip() == "sleep"  # every mount made
        except FileNotFoundError:
            return False

    def shut_down(self) -> None:
        """A node's shutdown: the kubelet stopped, every sandbox and
        container gone, containerd stopped, /run emptied (a tmpfs on a real
        node). Kept: /var/lib (the device manager's checkpoint, the kubelet's
        pods, containerd's images) and /var/log."""
        self.kubelet.stop()
        self.containerd.halt()
        for entry in os.listdir(self.run_dir):
            path = os.path.join(self.run_dir, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)

    def boot(self) -> float:
        """containerd, then the kubelet; returns when the kubelet listens (monotonic)."""
        self.containerd.start()
        return self.kubelet.start()

    def stop(self) -> None:
        """The kubelet, containerd (sandboxes, shims, cgroups below its
        parent), the holder (the namespace and its mounts go with it), the
        cgroup root."""
        try:
            self.kubelet.stop()
        finally:
            try:
                self.containerd.stop()
            finally:
                if self.holder is not None:
                    rh.stop_process(self.holder)
                    self.holder = None
                for path in sorted(self.cgroups, key=lambda p: p.count("/"), reverse=True):
                    for dirpath, _, _ in sorted(os.walk(path), key=lambda w: w[0].count("/"), reverse=True):
                        with contextlib.suppress(OSError):
                            os.rmdir(dirpath)

    # What the node's containerd says -------------------------------------

    def containers(self, name: str | None = None) -> list[cri.ContainerStatus]:
        """Every container containerd has (of `name`), with its status."""
        client = self.containerd.client
        assert client is not None
        found = []
        for container in client.stub.ListContainers(cri.ListContainersRequest(), timeout=WAIT_S).containers:
            if name is None or container.metadata.name == name:
                with contextlib.suppress(grpc.RpcError):  # removed meanwhile
                    found.append(client.status(container.id))
        return found

    def container_pid(self, container_id: str) -> int:
        client = self.containerd.client
        assert client is not None
        request = cri.ContainerStatusRequest(container_id=container_id, verbose=True)
        answer = client.stub.ContainerStatus(request, timeout=WAIT_S)
        return int(json.loads(answer.info.get("info", "{}")).get("pid", 0))

    def container_device(self, container_id: str, path: str) -> tuple[int, int] | None:
        """(major, minor) of the character device at `path` in the running
        container's own filesystem (its init process's root), or None."""
        pid = self.container_pid(container_id)
        try:
            info = os.stat(f"/proc/{pid}/root{path}")
        except OSError:
            return None
        return (os.major(info.st_rdev), os.minor(info.st_rdev)) if stat.S_ISCHR(info.st_mode) else None

    def container_memory(self, container_id: str) -> dict[str, int]:
        """The container's memory as its cgroup counts it: usage, and the
        working set (usage less inactive file pages), as the kubelet does."""
        pid = self.container_pid(container_id)
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
        v1 = next((line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"), None)
        if v1 is not None:
            directory = os.path.join("/sys/fs/cgroup/memory", v1.lstrip("/"))
            usage_file, inactive_key = "memory.usage_in_bytes", "total_inactive_file"
        else:
            directory = os.path.join("/sys/fs/cgroup", lines[0].split(":", 2)[2].lstrip("/"))
            usage_file, inactive_key = "memory.current", "inactive_file"
        with open(os.path.join(directory, usage_file)) as f:
            usage = int(f.read())
        with open(os.path.join(directory, "memory.stat")) as f:
            stats = dict(line.split() for line in f)
        return {"usage": usage, "working_set": usage - int(stats.get(inactive_key, 0)),
                "rss": int(stats.get("total_rss", stats.get("anon", 0)))}

    def probe_counts(self) -> dict[tuple[str, str, str], float]:
        """Its kubelet's prober_probe_total: (pod UID, probe type, result) -> count."""
        url = f"https://{self.spec.gateway}:{self.kubelet.api_port}/metrics/probes"
        status, body = self.network.http(url)
        if status != 200:
            raise RuntimeError(f"{self.spec.name}'s /metrics/probes: {status} {body[:300]}")
        counts = {}
        for labels, value in re.findall(r'^prober_probe_total\{([^}]*)\} (\S+)$', body, re.MULTILINE):
            fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            key = (fields.get("pod_uid", ""), fields.get("probe_type", ""), fields.get("result", ""))
            counts[key] = float(value)
        return counts

    def pod_log(self, pod: dict[str, Any], container: str) -> list[str]:
        """The log of a container's current attempt, from the node's pod log
        directory (this kubectl has no `logs`)."""
        meta = pod["metadata"]
        directory = os.path.join(self.kubelet.pod_logs, f"{meta['namespace']}_{meta['name']}_{meta['uid']}",
                                 container)
        attempt = kh.container_status(pod, container).get("restartCount") or 0
        return rh.read_log(os.path.join(directory, f"{attempt}.log"))


class ContainerWatch:
    """Every container a node's containerd has, polled from a thread every
    `every` s: id -> its latest status (kept after containerd removed it).
    The times in a status are containerd's own (ns), not the poll's."""

    def __init__(self, node: ClusterNode, every: float = 0.05) -> None:
        self.node = node
        self.every = every
        self.seen: dict[str, cri.ContainerStatus] = {}
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.client = rh.RuntimeClient(node.containerd.socket)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopping.wait(self.every):
                listed = self.client.stub.ListContainers(cri.ListContainersRequest(), timeout=WAIT_S)
                for container in listed.containers:
                    known = self.seen.get(container.id)
                    if known is None or known.state != cri.CONTAINER_EXITED:
                        with contextlib.suppress(grpc.RpcError):
                            self.seen[container.id] = self.client.status(container.id)
        except BaseException as e:  # noqa: BLE001 (reported by stop())
            self.error = e

    def stop(self) -> dict[str, cri.ContainerStatus]:
        self.stopping.set()
        self.thread.join()
        self.client.close()
        if self.error is not None:
            raise RuntimeError(f"watching {self.node.spec.name}'s containers failed") from self.error
        return self.seen


# ---------------------------------------------------------------------------
# The whole cluster
# ---------------------------------------------------------------------------

def container_id(pod: dict[str, Any], container: str) -> str:
    """The pod's container's id in its runtime ("containerd://<id>")."""
    return kh.container_status(pod, container).get("containerID", "").rpartition("://")[2]


def pod_ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def kvm_pod_spec(restart: str = "OnFailure") -> dict[str, Any]:
    """A pod like examples/consumer-pod.yaml asking for kvm only: it checks
    /dev/kvm at start (exit 1 without it, to be restarted with it) and sleeps."""
    return {
        "restartPolicy": restart,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 0,
        "containers": [{
            "name": "vmm",
            "image": "busybox:1.36.1",
            "command": ["sh", "-c", ("[ -c /dev/kvm ] || { echo /dev/kvm is missing; exit 1; }; "
                                     "ls -l /dev/kvm && exec sleep 2147483647")],
            "resources": {"limits": {resource("kvm"): "1", "cpu": "100m", "memory": "32Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}},
        }],
    }


def kvm_pod(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": kvm_pod_spec()}


def kvm_deployment(name: str) -> dict[str, Any]:
    """One replica of kvm_pod_spec, as a VM's controller keeps one."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": kvm_pod_spec(restart="Always")}}}


@dataclass
class Reboot:
    first: dict[str, Any]  # the pod running before
    replacement: dict[str, Any]  # the pod running with /dev/kvm after (maybe the same pod)
    first_outcome: str  # what became of the first: "Failed UnexpectedAdmissionError", "Running", "deleted"
    seconds: float  # from the kubelet listening again to the replacement running with /dev/kvm
    processes_left: set[int]  # the node's container processes still there after the shutdown (none)

    def describe(self) -> str:
        same = self.replacement["metadata"]["uid"] == self.first["metadata"]["uid"]
        return (f"the first pod {self.first['metadata']['name']}: {self.first_outcome}; "
                f"{'the same pod' if same else 'a replacement pod ' + self.replacement['metadata']['name']} "
                f"running with /dev/kvm {self.seconds:.1f} s after the kubelet started")


class Cluster:
    """Everything above, started in order and stopped in reverse, also when
    the start fails half-way."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.work = tempfile.mkdtemp(prefix="kdpc")
        # kubectl: a symlink to the multi-call binary, as ../shared/cluster/README.md does
        self.bin = os.path.join(self.work, "bin")
        os.makedirs(self.bin)
        os.symlink(setup.kube, os.path.join(self.bin, "kubectl"))
        self.network = Network(self.work)
        self.control: ControlPlane | None = None
        self.nodes: dict[str, ClusterNode] = {}
        self.plugin_archive = ""
        self.image_size_mb = 0.0
        self.image_built = False

    # Start and stop --------------------------------------------------------

    def start(self) -> None:
        try:
            self.network.start()
            self.control = ControlPlane(self.setup, self.work, self.network)
            self.control.start()
            self.build_plugin_image()
            images = [self.plugin_archive, rh.build_image(self.work)]
            for spec in NODES:
                node = ClusterNode(spec, self.work, self.network, self.setup.kubelet, self.control.kubeconfig)
                self.nodes[spec.name] = node
                node.start(images)
            for name in self.nodes:
                self.wait_node_ready(name)
            # Pods in `default` need its ServiceAccount, which a controller makes.
            account = "/api/v1/namespaces/default/serviceaccounts/default"
            wait_for("the default ServiceAccount", lambda: self.api_get(account, missing_ok=True))
        except BaseException:
            self.stop()
            raise

    def build_plugin_image(self) -> None:
        """`docker build -t PLUGIN_IMAGE .` as buildah does it, in the
        cluster's namespace (offline: pip reads the prepared wheels), then
        the image as a docker archive for the nodes' containerds."""
        base = self.setup.base
        pip_conf = os.path.join(self.work, "pip.conf")
        with open(pip_conf, "w") as f:
            f.write("[global]\nno-index = true\nfind-links = /wheels\n")
        tool = buildah(base, os.path.join(self.work, "buildah-run"))
        self.image_built = True
        run([*self.network.enter(), *tool, "bud", "--isolation", "chroot", "-q",
             "-v", f"{os.path.join(base, 'wheels')}:/wheels:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro",
             "-t", PLUGIN_IMAGE, "-f", os.path.join(rh.PROJECT, "Dockerfile"), rh.PROJECT], timeout=600)
        self.plugin_archive = os.path.join(self.work, "plugin-image.tar")
        run([*tool, "push", "-q", PLUGIN_IMAGE, f"docker-archive:{self.plugin_archive}:{PLUGIN_IMAGE}"],
            timeout=300)
        self.image_size_mb = round(os.path.getsize(self.plugin_archive) / 1e6, 1)

    def stop(self) -> None:
        """API objects, then every node, the control plane, the network, the
        image built and the files; each step also when an earlier one failed."""
        try:
            if self.control is not None and self.nodes:
                with contextlib.suppress(Exception):
                    self.delete_workloads()
        finally:
            try:
                for node in self.nodes.values():
                    with contextlib.suppress(Exception):
                        node.stop()
            finally:
                try:
                    if self.control is not None:
                        self.control.stop()
                finally:
                    self.network.stop()
                    if self.image_built:
                        subprocess.run([*buildah(self.setup.base, os.path.join(self.work, "buildah-run")),
                                        "rmi", "-f", PLUGIN_IMAGE], capture_output=True, timeout=120)
                    shutil.rmtree(self.work, ignore_errors=True)

    def delete_workloads(self) -> None:
        """Every pod and its controller, waited for: the kubelets stop the
        sandboxes of deleted pods."""
        for namespace in ("default", NAMESPACE):
            self.kubectl("delete", "daemonset,deployment,replicaset,pod", "--all", "-n", namespace,
                         "--grace-period=0", "--force", "--wait=false", check=False)
        wait_for("every pod gone", lambda: not self.pods("default") and not self.pods(NAMESPACE))

    # The API ------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = WAIT_S) -> str:
        """`kubectl ARGS` inside the network namespace; its stdout."""
        assert self.control is not None
        argv = [*self.network.enter(), os.path.join(self.bin, "kubectl"),
                f"--kubeconfig={self.control.kubeconfig}", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} exited {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}")
        return result.stdout

    def api_get(self, path: str, missing_ok: bool = False) -> dict[str, Any] | None:
        """A GET on the API server, straight from the namespace's thread
        (kubectl costs a process start; this is for polling)."""
        assert self.control is not None
        status, body = self.network.http(API + path, self.control.token)
        if status == 404 and missing_ok:
            return None
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:500]}")
        return json.loads(body)

    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        query = f"?labelSelector={urllib.request.quote(selector)}" if selector else ""
        answer = self.api_get(f"/api/v1/namespaces/{namespace}/pods{query}")
        assert answer is not None
        return answer.get("items") or []

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.api_get(f"/api/v1/namespaces/{namespace}/pods/{name}", missing_ok=True)

    def node_status(self, name: str) -> dict[str, Any]:
        answer = self.api_get(f"/api/v1/nodes/{name}")
        assert answer is not None
        return answer["status"]

    def wait_node_ready(self, name: str) -> None:
        node = self.nodes[name]

        def ready() -> bool:
            if node.kubelet.proc is None or node.kubelet.proc.poll() is not None:
                raise RuntimeError(f"{name}'s kubelet exited:\n{node.kubelet.log()[-3000:]}")
            answer = self.api_get(f"/api/v1/nodes/{name}", missing_ok=True)
            if answer is None:
                return False
            conditions = answer.get("status", {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) \
                and not answer.get("spec", {}).get("taints")

        try:
            wait_for(f"node {name} Ready and untainted", ready)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nkubelet log:\n{node.kubelet.log()[-4000:]}") from None

    def apply(self, obj: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def wait_running(self, name: str, timeout: float = WAIT_S) -> dict[str, Any]:
        """Pod `name` in `default`, once its container "vmm" runs."""
        def running() -> dict[str, Any] | None:
            pod = self.pod(name)
            return pod if pod is not None and kh.running(pod) else None

        try:
            return wait_for(f"pod {name} running", running, timeout, every=0.05)
        except TimeoutError as e:
            pod = self.pod(name)
            raise TimeoutError(f"{e}; its status: {json.dumps((pod or {}).get('status'))}") from None

    def kvm_pod_running(self, app: str, timeout: float, besides: str = "") -> dict[str, Any]:
        """A pod labelled app=`app` on kvm-node once its container "vmm"
        (not the one `besides`) runs with /dev/kvm in its own filesystem."""
        node = self.nodes["kvm-node"]

        def found() -> dict[str, Any] | None:
            for pod in self.pods("default", f"app={app}"):
                container = container_id(pod, "vmm")
                if kh.running(pod) and container and container != besides and \
                        pod["spec"].get("nodeName") == "kvm-node" and \
                        node.container_device(container, "/dev/kvm") == KVM_NUMBERS:
                    return pod
            return None

        try:
            return wait_for(f"a pod app={app} running with /dev/kvm", found, timeout, every=0.1)
        except TimeoutError as e:
            statuses = [(p["metadata"]["name"], p.get("status")) for p in self.pods("default", f"app={app}")]
            raise TimeoutError(f"{e}: {json.dumps(statuses)[:3000]}\n{self.describe_plugins()}") from None

    def reboot_with(self, app: str, timeout: float) -> Reboot:
        """kvm-node rebooted under a running kvm pod labelled app=`app` (a
        Deployment's): until a pod of it runs with /dev/kvm again, and what
        became of the pod that ran before."""
        node = self.nodes["kvm-node"]
        first = self.kvm_pod_running(app, WAIT_S)
        node.shut_down()
        left = node.containerd.processes()
        booted = node.boot()
        replacement = self.kvm_pod_running(app, timeout, besides=container_id(first, "vmm"))
        took = time.monotonic() - booted
        old = self.pod(first["metadata"]["name"])
        outcome = "deleted" if old is None else \
            f"{old['status'].get('phase')} {old['status'].get('reason', '')}".strip()
        return Reboot(first, replacement, outcome, took, left)

    def plugin_pods(self) -> dict[str, dict[str, Any]]:
        """Node name -> the DaemonSet's pod bound to it (not being deleted)."""
        found = {}
        for pod in self.pods(NAMESPACE, f"app.kubernetes.io/name={DAEMONSET}"):
            if pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp"):
                found[pod["spec"]["nodeName"]] = pod
        return found

    def wait_plugins_ready(self, timeout: float = WAIT_S, besides: set[str] = frozenset()) -> dict[str, dict]:
        """Both nodes' plugin pods Ready (none of the pod UIDs in `besides`)."""
        def ready() -> dict[str, dict[str, Any]] | None:
            pods = self.plugin_pods()
            if set(pods) == set(self.nodes) and all(pod_ready(p) and p["metadata"]["uid"] not in besides
                                                    for p in pods.values()):
                return pods
            return None

        try:
            return wait_for("a Ready plugin pod on each node", ready, timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.describe_plugins()}") from None

    def describe_plugins(self) -> str:
        """What went wrong with the plugin pods: their status and logs, and the kubelets' log tails."""
        lines = []
        for name, pod in self.plugin_pods().items():
            lines.append(f"{name}: {json.dumps(pod.get('status'))[:2000]}")
            lines += [f"  {line}" for line in self.nodes[name].pod_log(pod, PLUGIN_CONTAINER)[-20:]]
        for name, node in self.nodes.items():
            lines.append(f"{name}'s kubelet log tail:\n{node.kubelet.log()[-2000:]}")
        return "\n".join(lines)

    def wait_allocatable(self, node: str, name: str, count: int, timeout: float = WAIT_S,
                         capacity: int | None = None) -> float:
        """Until the Node object's allocatable of `name` is `count` (0 also
        when the resource is gone), and its capacity `capacity` if given;
        returns when (monotonic)."""
        def there() -> float | None:
            status = self.node_status(node)
            value = int((status.get("allocatable") or {}).get(resource(name), "0"))
            total = (status.get("capacity") or {}).get(resource(name))
            if value == count and (capacity is None or total == str(capacity)):
                return time.monotonic()
            return None

        what = f"{node}'s allocatable {name} {count}"
        if capacity is not None:
            what += f", capacity {capacity}"
        return wait_for(what, there, timeout, every=0.05)


def daemonset_manifest(work: str, count: str = "110", extra: dict[str, str] | None = None) -> str:
    """daemonset.yaml written to `work` with its image name replaced (as the
    README says to), --count `count` where it is not 110, and each key of
    `extra` (a whole line's text, without its indentation) replaced by its
    value; its path. Each line replaced must be there exactly once."""
    replace = {f"image: {MANIFEST_IMAGE}": f"image: {PLUGIN_IMAGE}"}
    if count != "110":
        replace['- "110"  # the kubelet\'s default max pods: every pod may get one'] = f'- "{count}"'
    replace.update(extra or {})
    with open(os.path.join(rh.PROJECT, "daemonset.yaml")) as f:
        text = f.read()
    for old, new in replace.items():
        pattern = re.compile(rf"^(\s*){re.escape(old)}$", re.MULTILINE)
        if len(pattern.findall(text)) != 1:
            raise ValueError(f"daemonset.yaml: {old!r} is not one line of its own")
        text = pattern.sub(lambda m, n=new: m[1] + n, text)
    path = os.path.join(work, f"{len(os.listdir(work))}-daemonset.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------
# bench_plugin.py --cluster
# ---------------------------------------------------------------------------

def log_time(raw: str) -> float:
    """A CRI log line's timestamp (RFC 3339, nanoseconds, UTC) as time.time()."""
    stamp = raw.split(" ", 1)[0].rstrip("Z")
    whole, _, fraction = stamp.partition(".")
    moment = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp() + float(f"0.{fraction or '0'}")


def registered_at(node: ClusterNode, pod: dict[str, Any], name: str) -> float:
    """When the plugin's container logged that `name` registered (the line's
    timestamp in the node's pod log, written by containerd)."""
    meta = pod["metadata"]
    path = os.path.join(node.kubelet.pod_logs, f"{meta['namespace']}_{meta['name']}_{meta['uid']}",
                        PLUGIN_CONTAINER, "0.log")

    def logged() -> float | None:
        with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as f:
            for raw in f:
                if f"{resource(name)}: registered with the kubelet" in raw:
                    return log_time(raw)
        return None

    return wait_for(f"{name} registered in {path}", logged)


def bench_main(quick: bool) -> int:
    """Medians of `runs` installs, consumers, rollouts, uninstalls and
    reboots on the two-node cluster; a table, then one JSON object."""
    import statistics

    missing = missing_requirement()
    if missing:
        print(f"bench --cluster: {missing}", file=sys.stderr)
        return 1
    setup = setup_from_env()
    runs = 3 if quick else 5
    keys = ("ds_apply_to_all_ready_ms", "plugin_registered_to_api_allocatable_ms",
            "consumer_apply_to_running_ms", "rollout_ms", "delete_to_api_allocatable_0_ms",
            "reboot_to_replacement_running_ms")
    figures: dict[str, list[float]] = {key: [] for key in keys}
    memory: list[dict[str, int]] = []
    outcomes: list[str] = []
    started = time.monotonic()
    with running_cluster(setup) as cluster:
        started_s = time.monotonic() - started
        kvm_node = cluster.nodes["kvm-node"]
        for run_index in range(runs):
            manifest = daemonset_manifest(cluster.work)
            applied = time.monotonic()
            cluster.kubectl("apply", "-f", manifest)
            pods = cluster.wait_plugins_ready()
            figures["ds_apply_to_all_ready_ms"].append((time.monotonic() - applied) * 1000)
            cluster.wait_allocatable("kvm-node", "kvm", 110, 30)
            seen = time.time()
            figures["plugin_registered_to_api_allocatable_ms"].append(
                (seen - registered_at(kvm_node, pods["kvm-node"], "kvm")) * 1000)
            name = f"consumer-{run_index}"
            applied = time.monotonic()
            cluster.apply(kvm_pod(name))
            cluster.wait_running(name)
            figures["consumer_apply_to_running_ms"].append((time.monotonic() - applied) * 1000)
            cluster.kubectl("delete", "pod", name, "--wait=true")
            before = {pod["metadata"]["uid"] for pod in pods.values()}
            # A changed pod template (one more environment value): a rolling update.
            one_more = f'value: ERROR\n            - name: KDP_ROLLOUT\n              value: "{run_index}"'
            rolled = daemonset_manifest(cluster.work, extra={"value: ERROR": one_more})
            applied = time.monotonic()
            cluster.kubectl("apply", "-f", rolled)
            pods = cluster.wait_plugins_ready(besides=before)
            figures["rollout_ms"].append((time.monotonic() - applied) * 1000)
            time.sleep(10)  # idle, then the plugin's memory as its cgroup counts it
            memory.append(kvm_node.container_memory(container_id(pods["kvm-node"], PLUGIN_CONTAINER)))
            deleted = time.monotonic()
            cluster.kubectl("delete", "-f", rolled)
            cluster.wait_allocatable("kvm-node", "kvm", 0, 30)
            figures["delete_to_api_allocatable_0_ms"].append((time.monotonic() - deleted) * 1000)
            wait_for("the plugin pods gone", lambda: not cluster.plugin_pods())
        cluster.kubectl("apply", "-f", daemonset_manifest(cluster.work))
        cluster.wait_plugins_ready()
        cluster.wait_allocatable("kvm-node", "kvm", 110, 30)
        cluster.apply(kvm_deployment("vmm"))
        for _ in range(runs):
            reboot = cluster.reboot_with("vmm", 180)
            print(f"reboot: {reboot.describe()}", flush=True)
            figures["reboot_to_replacement_running_ms"].append(reboot.seconds * 1000)
            outcomes.append(reboot.first_outcome)
            cluster.wait_plugins_ready()
        image_mb = cluster.image_size_mb
    kubelet_version = run([setup.kubelet, "--version"]).strip()
    print(f"{kubelet_version} on two nodes, control plane {KUBE}; cluster up in {started_s:.0f} s; "
          f"{runs} runs each (ms)")
    print(f"{'figure':<42} {'median':>9} {'min':>9} {'max':>9}  runs")
    results: dict[str, Any] = {}
    for key, values in figures.items():
        values = [round(v, 1) for v in values]
        median = statistics.median(values)
        print(f"{key:<42} {median:>9.1f} {min(values):>9.1f} {max(values):>9.1f}  {values}")
        results[key] = round(statistics.median(values), 1)
    print("plugin_registered_to_api_allocatable_ms against the kubelet's nodeStatusUpdateFrequency (10 s): "
          f"median {results['plugin_registered_to_api_allocatable_ms'] / 10000:.0%} of the period")
    print(f"reboots: the first pod each time: {outcomes}")
    results["reboot_first_pod_rejected_fraction"] = round(
        sum("UnexpectedAdmissionError" in o for o in outcomes) / len(outcomes), 2)
    results["image_mb"] = image_mb
    for key in ("working_set", "usage", "rss"):
        values = [m[key] / 2**20 for m in memory]
        results[f"plugin_container_memory_{key}_mib"] = round(statistics.median(values), 1)
        print(f"plugin container memory ({key}, cgroup, 10 s idle after Ready): median "
              f"{statistics.median(values):.1f} MiB, {min(values):.1f}-{max(values):.1f}")
    print(f"image (docker archive of {PLUGIN_IMAGE}): {image_mb} MB")
    print(json.dumps(results), flush=True)
    return 0


@contextlib.contextmanager
def running_cluster(setup: Setup) -> Iterator[Cluster]:
    cluster = Cluster(setup)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def main() -> int:
    """`base DIR`: prepare the base image and wheels. `up`: start a cluster,
    print how to reach it, and keep it until Ctrl-C (for a look by hand)."""
    if len(sys.argv) == 3 and sys.argv[1] == "base":
        prepare_base(sys.argv[2])
        print(f"prepared {sys.argv[2]}")
        return 0
    if len(sys.argv) == 2 and sys.argv[1] == "up":
        missing = missing_requirement()
        if missing:
            print(missing, file=sys.stderr)
            return 1
        with running_cluster(setup_from_env()) as cluster:
            assert cluster.control is not None
            print(f"up: nsenter --net={cluster.network.path} {cluster.bin}/kubectl "
                  f"--kubeconfig={cluster.control.kubeconfig} get nodes", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return 0
    print(f"usage: {sys.argv[0]} base DIR | up", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
