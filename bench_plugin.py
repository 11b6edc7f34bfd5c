#!/usr/bin/env python3
"""Benchmark: the real plugin, as a subprocess, against the kubelet stand-in.

Each scenario gets a fresh tempfile.mkdtemp(prefix="kdpb") under /tmp (short
socket paths) with a device-plugins directory and a host root holding real
nodes made by mknod (kvm 10:232, net/tun 10:200, vhost-net 10:238 under dev/).
fake_kubelet.FakeKubelet runs in this process, the plugin in a child, started
as the image and the unit start it: ``python -m kvm_device_plugin --plugin-dir
D --host-root H ...`` from the three files compiled in a directory of their
own (deployed_app()).

"Full list" means, for every resource: a registration and a stream message
newer than the baseline, the stream open, `count` devices. Its time is the
stand-in's ResourceState.last_message_at (stamped by its reader thread), not
when this script's waiting thread wakes up. Figures (ms unless named otherwise):

startup_ms        just before Popen -> full list of every resource (--count 110,
                  kvm,tun,vhost-net): interpreter start and grpc import included.
                  startup_10000_ms: the same with --count 10000;
                  startup_ms_as_script: --count 110, run by its path.
reregister_ms_*   FakeKubelet.stop(), then t0 just before FakeKubelet.start()
                  (deletes every socket in the directory, serves a new
                  kubelet.sock) -> full list from the new registrations. Median
                  and max over the first 50 restarts of the series (quick: 30).
health_*          t0 just before os.unlink of the kvm node -> an all-Unhealthy
                  list (health_unhealthy_ms_median); t0 just before mknod ->
                  all-Healthy (health_healthy_ms_median). health_ms_median is the
                  slower median, health_ms_max the slowest flip. 30 pairs (quick:
                  10), 0.1 s apart.
allocate_*        Allocate round trip on the stand-in's channel (its stub), one
                  container with one ID: 2000 sequential calls (p50, p99), then
                  2000 over 16 threads (concurrent p50, p99). allocate_errors:
                  failed calls in both runs.
rss_mb_idle*      VmRSS after registration and 1.5 s idle: --count 110; then
                  --count 10000, separate;
                  rss_mb_idle_as_script: --count 110 run by its path (compiled
                  from source at start, as `python kvm_device_plugin.py`).
idle_cpu_percent  on-CPU time of the registered, idle plugin, summed over
                  /proc/PID/task/*/schedstat (first field), over 20 s (quick: 5),
                  in percent of one core. Threads ending mid-window are missed.
idle_wakeups_per_s  the same window's times a thread of the plugin was put on
                  a CPU (schedstat's third field), per second.
shutdown_ms       SIGTERM to the plugin's exit (code 0), registered with streams open.
late_kubelet_ms   the plugin started 3 s (quick: 1.5 s) before the stand-in: from
                  just before the stand-in starts to every full list.
rss_growth_mb_100_restarts  VmRSS after the restart series minus before it (1 s
                  idle first); 100 restarts (quick: 30, same key). fds_/threads_
                  before/after: entries in /proc/PID/fd and /task at those times.
                  registrations_per_restart: Register calls per resource (1 = ok).

reregister_ms_with_stalled_reader  --devices kvm: a second client opened
                  ListAndWatch, read one message and stopped reading (SIGSTOP),
                  then 40 health flips filled its HTTP/2 window; median (and
                  _max_) of 30 restarts (quick: 10) as in reregister_ms_*.
                  shutdown_ms_with_stalled_reader: then SIGTERM to exit 0.
rss_mb_status_flood  VmRSS with 1000 connections to --metrics-port each holding
                  a 60 KB header line that never ends (a /metrics request must
                  answer 200 meanwhile); rss_mb_after_status_flood: 1 s after
                  they all closed.
rss_growth_mb_1000_restarts  VmRSS after 1000 kubelet restarts back to back
                  (5 ms apart, most registrations cut short; quick: 200, same
                  key), then one awaited, minus before (after 5 warm-up
                  restarts, 1 s idle each time), with MALLOC_ARENA_MAX=1 as
                  deployed; _default_arenas: the same without it.
--flood instead: rss_mb_grpc_conn_flood and the rapid reset's figures (see
bench_conn_flood and bench_rapid_reset), rss_growth_mb_1000_restarts in five
runs, log_bytes_per_s_allocate_flood (bytes of JSON log a second while four
clients send refused Allocate calls as fast as they can for 30 s; with
allocate_flood_calls_per_s, and allocate_flood_calls_unaccounted: calls
neither logged nor counted in a summary line, 0), and per --count (110, 1000,
10000) rss_mb_count_<N>_idle, _after_<R>_restarts and _peak (VmRSS read every
50 ms from start through 300 kubelet restarts while kvm's node flaps every
100 ms); rss_mb_count_max_peak is the largest count's.
Every plugin here runs with DEPLOYED_ENV, the environment the DaemonSet and the
image set. --soak SECONDS runs instead one plugin under a steady mixed load and
reports its RSS slope (see soak()); with --tracemalloc, what grew, by traceback,
goes to soak-tracemalloc.txt. --runtime measures instead daemonset.yaml's pod
started in a private containerd (e2e/runtime_harness.py); --kubelet PATH the
plugin under that real kubelet binary (e2e/kubelet_harness.py, figures in
docs/real-kubelet.md): kubelet_restart_to_registered_ms,
unlink_to_kubelet_allocatable_0_ms, kvm_pod_manifest_to_running_ms,
kubelet_sock_to_all_lists_ms (p50/p99/max over 30 kubelet starts) and
reboot_admitted_fraction_* (simulated reboots, docs/real-kubelet.md "Reboots");
--cluster the README's deploy path on a two-node cluster (KDP_CLUSTER, KDP_KUBELET;
e2e/cluster_harness.py, figures in docs/cluster.md): ds_apply_to_all_ready_ms,
plugin_registered_to_api_allocatable_ms, consumer_apply_to_running_ms,
rollout_ms, delete_to_api_allocatable_0_ms, reboot_to_replacement_running_ms,
the image's size and the plugin container's memory as its cgroup counts it.

Nothing is asserted: a table, then as the last line one JSON object. Every
process and directory made is removed even on error; every wait is bounded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402

import deviceplugin_pb2 as pb  # noqa: E402
import kvm_device_plugin as kdp  # noqa: E402
from fake_kubelet import (  # noqa: E402
    DEVICE_NODES, FakeKubelet, free_port, make_device_nodes, mknod, start_stalled_reader,
)

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "kvm_device_plugin.py")
DOMAIN = "devices.kubevirt.io"
DEFAULT = ("kvm", "tun", "vhost-net")
WAIT_S = 10.0  # bound for anything that should take milliseconds
SETTLE_S = 1.5  # idle time before an RSS reading
ALLOCATIONS = 2000
CALLERS = 16
FULL = {"health_reps": 30, "restarts": 100, "timed_restarts": 50, "idle_cpu_s": 20.0, "late_kubelet_s": 3.0,
        "long_restarts": 1000, "stalled_restarts": 30}
QUICK = {"health_reps": 10, "restarts": 30, "timed_restarts": 30, "idle_cpu_s": 5.0, "late_kubelet_s": 1.5,
         "long_restarts": 200, "stalled_restarts": 10}
# What the DaemonSet and the image set: glibc's malloc otherwise keeps an arena
# per thread that ever allocated (gRPC's threads come and go), which grows RSS
# with every kubelet restart. The plugin runs with it in every figure here.
DEPLOYED_ENV = {"MALLOC_ARENA_MAX": "1"}
FLOOD_CONNECTIONS = 1000
CONN_FLOOD = 2000  # connections held to a plugin socket (--flood)
RAPID_RESET_RATE = 13000  # streams opened and reset a second, as measured in issue 19


def resource(name: str) -> str:
    return f"{DOMAIN}/{name}"


_APP: str | None = None


def deployed_app() -> str:
    """The plugin's three files, compiled, in a directory of their own, as the
    image holds them in /app (Dockerfile: compileall, then `python -m`); made
    once per process, removed at its exit. A plugin started here with -m runs
    this bytecode, as deployed: a script run by its path is compiled at every
    start, which leaves 3.8 MB more RSS (rss_mb_idle_as_script)."""
    global _APP
    if _APP is None:
        import atexit
        import compileall

        _APP = tempfile.mkdtemp(prefix="kdpapp")
        atexit.register(shutil.rmtree, _APP, True)
        for name in ("kvm_device_plugin.py", "deviceplugin_pb2.py", "deviceplugin_pb2_grpc.py"):
            shutil.copy2(os.path.join(HERE, name), _APP)
        if not compileall.compile_dir(_APP, quiet=1):
            raise RuntimeError(f"compileall failed in {_APP}")
    return _APP


class Rig:
    """A temporary directory with device nodes, the stand-in and one plugin process."""

    def __init__(self, count: int, devices: tuple[str, ...] = DEFAULT, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.count, self.devices, self.args = count, devices, args
        self.env = {**os.environ, **(DEPLOYED_ENV if env is None else env)}
        self.names = [resource(d) for d in devices]
        self.root = tempfile.mkdtemp(prefix="kdpb", dir="/tmp")
        self.plugin_dir = os.path.join(self.root, "dp")
        self.host = os.path.join(self.root, "host")
        self.log_path = os.path.join(self.root, "plugin.log")
        self.kubelet = FakeKubelet(self.plugin_dir)
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        self.helpers: list[subprocess.Popen] = []  # other processes, killed on close
        # How the plugin is started: as the image and the unit run it.
        self.wrapper = [sys.executable, "-m", "kvm_device_plugin"]

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def node(self, name: str) -> str:
        return os.path.join(self.host, DEVICE_NODES[name][0])

    def start(self, timeout: float = WAIT_S, kubelet_late_s: float = 0.0) -> float:
        """Start the stand-in and the plugin; ms from just before Popen to the full lists.

        With kubelet_late_s, the plugin starts first and the stand-in that many
        seconds later; then ms from just before the stand-in starts.
        """
        make_device_nodes(self.host)
        if not kubelet_late_s:
            self.kubelet.start()
        argv = [*self.wrapper, "--plugin-dir", self.plugin_dir, "--host-root", self.host,
                "--count", str(self.count), "--devices", ",".join(self.devices), *self.args]
        with open(self.log_path, "wb") as log:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=deployed_app(),
                                         env=self.env)
        self.pid = self.proc.pid
        if kubelet_late_s:
            time.sleep(kubelet_late_s)
            t0 = time.monotonic()
            self.kubelet.start()
        return (self.wait_lists({}, timeout) - t0) * 1000

    def shutdown_ms(self) -> float:
        """ms from SIGTERM to the plugin's exit (its exit code must be 0)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(WAIT_S)
        if code != 0:
            raise RuntimeError(f"plugin exited {code} on SIGTERM; its log:\n{self.log_tail()}")
        return (time.monotonic() - t0) * 1000

    def baseline(self) -> dict[str, tuple[int, int]]:
        with self.kubelet.cond:
            return {n: (s.registrations, s.messages) for n, s in self.kubelet.resources.items()}

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait on the stand-in's condition; fail clearly if the plugin dies or time runs out."""
        deadline = time.monotonic() + timeout
        while not self.kubelet.wait_for(predicate, min(0.5, max(0.0, deadline - time.monotonic()))):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited ({self.proc.returncode}) while waiting for "
                                   f"{what}; its log:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {what} within {timeout:.0f} s; plugin log:\n{self.log_tail()}")

    def wait_lists(self, base: dict[str, tuple[int, int]], timeout: float = WAIT_S) -> float:
        """Wait for every resource's full list on a registration newer than `base`.

        FakeKubelet.wait_registered(min_registrations=...) is not enough after a
        restart: the stand-in keeps the old device dict (marked Unhealthy), so its
        capacity check passes before the new stream has sent anything.
        Returns the stand-in's monotonic time of the last of those messages.
        """
        def ready() -> bool:
            for name in self.names:
                state = self.kubelet.resources.get(name)
                regs, msgs = base.get(name, (0, 0))
                if (state is None or state.registrations <= regs or not state.stream_open
                        or state.messages <= msgs or state.capacity != self.count):
                    return False
            return True
        self.wait_until(ready, timeout, f"full list of {self.count} devices for {self.names}")
        with self.kubelet.cond:
            return max(self.kubelet.resources[n].last_message_at for n in self.names)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        for helper in self.helpers:
            helper.kill()
            helper.wait()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        try:
            self.kubelet.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# -- /proc readings ------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def schedstat(pid: int) -> tuple[int, int]:
    """The process's on-CPU time (ns) and times put on a CPU, over its threads."""
    cpu = runs = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between listdir and open
        cpu += int(fields[0])
        runs += int(fields[2])
    return cpu, runs


def cpu_ns(pid: int) -> int:
    return schedstat(pid)[0]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]  # nearest rank


# -- measurements ----------------------------------------------------------------------


def idle_cpu_percent(pid: int, seconds: float) -> tuple[float, float]:
    """Percent of one core, and times on a CPU per second, over `seconds`."""
    (start_ns, start_runs), start = schedstat(pid), time.monotonic()
    time.sleep(seconds)
    (end_ns, end_runs), took = schedstat(pid), time.monotonic() - start
    return (end_ns - start_ns) / (took * 1e9) * 100, (end_runs - start_runs) / took


def allocate_latencies(rig: Rig, callers: int) -> tuple[list[float], int]:
    """ALLOCATIONS Allocate round trips in ms over `callers` threads, and the error count."""
    stub = rig.kubelet.stub(resource("kvm"))
    requests = [pb.AllocateRequest(container_requests=[
        pb.ContainerAllocateRequest(devices_ids=[f"kvm{i % rig.count}"])]) for i in range(ALLOCATIONS)]

    def caller(first: int) -> tuple[list[float], int]:
        took, errors = [], 0
        for request in requests[first::callers]:
            t0 = time.perf_counter()
            try:
                stub.Allocate(request, timeout=WAIT_S)
            except grpc.RpcError:
                errors += 1
            took.append((time.perf_counter() - t0) * 1000)
        return took, errors

    with ThreadPoolExecutor(max_workers=callers) as pool:
        results = list(pool.map(caller, range(callers)))
    return [ms for took, _ in results for ms in took], sum(errors for _, errors in results)


def health_latencies(rig: Rig, reps: int, pause_s: float = 0.1) -> tuple[list[float], list[float]]:
    """ms from unlink to an all-Unhealthy list, and from mknod to all-Healthy."""
    kvm, (path, minor) = resource("kvm"), (rig.node("kvm"), DEVICE_NODES["kvm"][1])
    state = rig.kubelet.state(kvm)

    def flip(action: Callable[[], None], health: str) -> float:
        base = state.messages
        t0 = time.monotonic()
        action()
        rig.wait_until(lambda: state.messages > base and set(state.devices.values()) == {health},
                       WAIT_S, f"kvm devices {health}")
        return (state.last_message_at - t0) * 1000

    if set(state.devices.values()) != {"Healthy"}:
        raise RuntimeError(f"kvm is not Healthy to begin with:\n{rig.log_tail()}")
    down, up = [], []
    for _ in range(reps):
        down.append(flip(lambda: os.unlink(path), "Unhealthy"))
        time.sleep(pause_s)
        up.append(flip(lambda: mknod(path, minor), "Healthy"))
        time.sleep(pause_s)
    return down, up


def restart_series(rig: Rig, restarts: int) -> tuple[list[float], float]:
    """Restart the stand-in `restarts` times; ms per re-registration, and Register calls per restart."""
    regs_before = rig.baseline()
    took = []
    for _ in range(restarts):
        base = rig.baseline()
        rig.kubelet.stop()
        t0 = time.monotonic()
        rig.kubelet.start()
        took.append((rig.wait_lists(base) - t0) * 1000)
    regs_after = rig.baseline()
    per_restart = statistics.mean(regs_after[n][0] - regs_before[n][0] for n in rig.names) / restarts
    return took, per_restart


def stall_a_reader(rig: Rig, flips: int = 40) -> None:
    """A stalled ListAndWatch reader on the kvm socket, its HTTP/2 window filled by health flips."""
    rig.helpers.append(start_stalled_reader(os.path.join(rig.plugin_dir, "kvm-device-plugin-kvm.sock")))
    health_latencies(rig, flips // 2, pause_s=0.0)


def status_flood_rss(rig: Rig, port: int) -> tuple[float, float]:
    """VmRSS (MB) with FLOOD_CONNECTIONS connections each holding a 60 KB header
    line that never ends, and after they closed; /metrics must answer meanwhile."""
    import socket
    import urllib.request
    flood = []
    try:
        for _ in range(FLOOD_CONNECTIONS):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                conn.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 60_000)
            except OSError:
                pass  # dropped for a newer one already
            flood.append(conn)
        during = rss_mb(rig.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            if response.status != 200:
                raise RuntimeError(f"/metrics answered {response.status} under the flood")
    finally:
        for conn in flood:
            conn.close()
    return during, process_facts(rig.pid)[0]


def process_facts(pid: int) -> tuple[float, int, int]:
    """RSS, open fds and threads after 1 s idle."""
    time.sleep(1.0)
    return rss_mb(pid), len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def bench_default(plan: dict[str, float], r: dict[str, float]) -> None:
    """Every figure for --count 110 and the default devices, on one plugin process."""
    with Rig(110) as rig:
        r["startup_ms"] = rig.start()
        time.sleep(SETTLE_S)
        r["rss_mb_idle"] = rss_mb(rig.pid)
        r["idle_cpu_percent"], r["idle_wakeups_per_s"] = idle_cpu_percent(rig.pid, plan["idle_cpu_s"])
        sequential, errors_seq = allocate_latencies(rig, 1)
        concurrent, errors_conc = allocate_latencies(rig, CALLERS)
        r["allocate_p50_ms"], r["allocate_p99_ms"] = percentile(sequential, 50), percentile(sequential, 99)
        r["allocate_concurrent_p50_ms"] = percentile(concurrent, 50)
        r["allocate_concurrent_p99_ms"] = percentile(concurrent, 99)
        r["allocate_errors"] = errors_seq + errors_conc
        down, up = health_latencies(rig, plan["health_reps"])
        r["health_unhealthy_ms_median"], r["health_healthy_ms_median"] = statistics.median(down), statistics.median(up)
        r["health_ms_median"] = max(r["health_unhealthy_ms_median"], r["health_healthy_ms_median"])
        r["health_ms_max"] = max(down + up)
        rss_before, r["fds_before"], r["threads_before"] = process_facts(rig.pid)
        took, r["registrations_per_restart"] = restart_series(rig, plan["restarts"])
        rss_after, r["fds_after"], r["threads_after"] = process_facts(rig.pid)
        timed = took[:plan["timed_restarts"]]
        r["reregister_ms_median"], r["reregister_ms_max"] = statistics.median(timed), max(timed)
        r["rss_growth_mb_100_restarts"] = rss_after - rss_before
        r["shutdown_ms"] = rig.shutdown_ms()
    with Rig(110) as rig:
        r["late_kubelet_ms"] = rig.start(kubelet_late_s=plan["late_kubelet_s"])


def bench_hostile(plan: dict[str, float], r: dict[str, float]) -> None:
    """Figures under hostile or careless peers, and memory over many restarts."""
    with Rig(110, ("kvm",)) as rig:
        rig.start()
        stall_a_reader(rig)
        took, _ = restart_series(rig, plan["stalled_restarts"])
        r["reregister_ms_with_stalled_reader"] = statistics.median(took)
        r["reregister_ms_max_with_stalled_reader"] = max(took)
        r["shutdown_ms_with_stalled_reader"] = rig.shutdown_ms()
    port = free_port()
    with Rig(110, args=("--metrics-port", str(port))) as rig:
        rig.start()
        time.sleep(SETTLE_S)
        r["rss_mb_status_flood"], r["rss_mb_after_status_flood"] = status_flood_rss(rig, port)
    for key, env in (("rss_growth_mb_1000_restarts", None),
                     ("rss_growth_mb_1000_restarts_default_arenas", {})):
        with Rig(110, env=env) as rig:
            rig.start()
            restart_series(rig, 5)  # warm-up: the first restarts load code paths
            before = process_facts(rig.pid)[0]
            for _ in range(plan["long_restarts"]):  # back to back, registrations cut short
                rig.kubelet.restart()
                time.sleep(0.005)
            restart_series(rig, 1)  # and registered again at the end
            r[key] = process_facts(rig.pid)[0] - before


def bench_large(r: dict[str, float]) -> None:
    """Startup and memory with --count 10000 (the largest the plugin takes)
    in a fresh process and directory; and --count 110 run as a script (by
    its path)."""
    with Rig(110) as rig:
        rig.wrapper = [sys.executable, SCRIPT]
        r["startup_ms_as_script"] = rig.start()
        time.sleep(SETTLE_S)
        r["rss_mb_idle_as_script"] = rss_mb(rig.pid)
    with Rig(kdp.MAX_COUNT) as rig:
        r["startup_10000_ms"] = rig.start(timeout=60)
        time.sleep(SETTLE_S)
        r["rss_mb_idle_10000"] = rss_mb(rig.pid)


# -- floods on the plugin's gRPC sockets and scale (--flood) ----------------------------


def bench_conn_flood(r: dict[str, float]) -> None:
    """rss_mb_grpc_conn_flood: VmRSS with CONN_FLOOD idle HTTP/2 connections
    held to the kvm socket (attempts: past the cap the plugin closes them);
    then a kubelet restart must register and allocate."""
    import flood_peers
    with Rig(110, ("kvm",)) as rig:
        rig.start()
        time.sleep(SETTLE_S)
        r["rss_mb_before_grpc_conn_flood"] = rss_mb(rig.pid)
        held = flood_peers.hold_connections(os.path.join(rig.plugin_dir, "kvm-device-plugin-kvm.sock"),
                                            CONN_FLOOD)
        try:
            time.sleep(SETTLE_S)
            r["rss_mb_grpc_conn_flood"] = rss_mb(rig.pid)
            r["grpc_conn_flood_kept"] = flood_peers.open_connections(held)
            base = rig.baseline()
            t0 = time.monotonic()
            rig.kubelet.restart()
            r["reregister_ms_grpc_conn_flood"] = (rig.wait_lists(base) - t0) * 1000
            rig.kubelet.allocate(resource("kvm"), [["kvm1"]])
        finally:
            for conn in held:
                conn.close()
        r["rss_mb_after_grpc_conn_flood"] = process_facts(rig.pid)[0]


def bench_rapid_reset(seconds: float, r: dict[str, float]) -> None:
    """RAPID_RESET_RATE HEADERS + RST_STREAM a second on the kvm socket for
    `seconds`; meanwhile the stand-in's Allocate every 20 ms on the same socket
    (p99, failures), the plugin's CPU and its largest VmRSS."""
    import flood_peers
    with Rig(110, ("kvm",)) as rig:
        rig.start()
        time.sleep(SETTLE_S)
        stub = rig.kubelet.stub(resource("kvm"))
        request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["kvm1"])])
        attacker = flood_peers.start_rapid_reset(os.path.join(rig.plugin_dir, "kvm-device-plugin-kvm.sock"),
                                                 seconds, RAPID_RESET_RATE)
        rig.helpers.append(attacker)
        start_ns, start = cpu_ns(rig.pid), time.monotonic()
        took, failed, rss_max = [], 0, 0.0
        while attacker.poll() is None:
            t0 = time.perf_counter()
            try:
                stub.Allocate(request, timeout=WAIT_S)
            except grpc.RpcError:
                failed += 1
            took.append((time.perf_counter() - t0) * 1000)
            rss_max = max(rss_max, rss_mb(rig.pid))
            time.sleep(0.02)
        r["rapid_reset_cpu_percent"] = (cpu_ns(rig.pid) - start_ns) / ((time.monotonic() - start) * 1e9) * 100
        r["rapid_reset_streams_per_s"] = int(attacker.stdout.read().split()[0]) / seconds
        r["rapid_reset_rss_mb"] = rss_max
        r["allocate_p50_ms_under_rapid_reset"] = percentile(took, 50)
        r["allocate_p99_ms_under_rapid_reset"] = percentile(took, 99)
        r["allocate_failed_under_rapid_reset"] = failed


def restarts_with_flaps(rig: Rig, restarts: int, flap_s: float = 0.1) -> None:
    """`restarts` kubelet restarts, each awaited, while kvm's node flaps every `flap_s`."""
    import threading
    path, minor = rig.node("kvm"), DEVICE_NODES["kvm"][1]
    stop = threading.Event()

    def flap() -> None:
        while not stop.wait(flap_s):
            if os.path.exists(path):
                os.unlink(path)
            else:
                mknod(path, minor)

    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    try:
        for _ in range(restarts):
            base = rig.baseline()
            rig.kubelet.restart()
            rig.wait_lists(base, 120)
    finally:
        stop.set()
        flapper.join()
        if not os.path.exists(path):
            mknod(path, minor)


class PeakRss:
    """The highest VmRSS of `pid`, read every 50 ms from a thread of its own
    (what a memory limit meets is the peak, not a reading now and then)."""

    def __init__(self, pid: int) -> None:
        import threading
        self.pid, self.peak = pid, 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak


def bench_count_restarts(counts: tuple[int, ...], r: dict[str, float]) -> None:
    """VmRSS idle and after 50, 150 and 300 kubelet restarts (a flap every 100 ms)
    for each --count, --devices kvm: rss_mb_count_<N>_after_<R>_restarts, and
    the peak over all of it (read every 50 ms): rss_mb_count_<N>_peak;
    rss_mb_count_max_peak for the largest --count the plugin accepts."""
    for count in counts:
        with Rig(count, ("kvm",)) as rig:
            rig.start(timeout=180)
            peak = PeakRss(rig.pid)
            try:
                time.sleep(SETTLE_S)
                r[f"rss_mb_count_{count}_idle"] = rss_mb(rig.pid)
                done = 0
                for mark in (50, 150, 300):
                    restarts_with_flaps(rig, mark - done)
                    done = mark
                    r[f"rss_mb_count_{count}_after_{mark}_restarts"] = process_facts(rig.pid)[0]
            finally:
                r[f"rss_mb_count_{count}_peak"] = peak.close()
            if count == kdp.MAX_COUNT:
                r["rss_mb_count_max_peak"] = r[f"rss_mb_count_{count}_peak"]


def bench_allocate_flood_log(seconds: float, r: dict[str, float]) -> None:
    """log_bytes_per_s_allocate_flood: bytes of log a second (JSON lines, as
    deployed) while 4 clients of the kvm socket send Allocate calls with
    unknown IDs as fast as they can, over `seconds` (allocate_flood_calls_per_s:
    how many); the calls counted in the log's lines must add up."""
    import re
    import threading
    with Rig(110, ("kvm",), args=("--log-format", "json")) as rig:
        rig.start()
        time.sleep(SETTLE_S)
        path = os.path.join(rig.plugin_dir, kdp.plugin_socket_name("kvm"))
        bad = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["kvm999999"])])
        stop, calls = threading.Event(), [0] * 4

        def caller(index: int) -> None:
            with grpc.insecure_channel(f"unix://{path}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                call = channel.unary_unary("/v1beta1.DevicePlugin/Allocate",
                                           request_serializer=pb.AllocateRequest.SerializeToString)
                while not stop.is_set():
                    try:
                        call(bad, timeout=WAIT_S)
                    except grpc.RpcError:
                        pass
                    calls[index] += 1

        size_before = os.path.getsize(rig.log_path)
        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        took = time.monotonic() - started
        written = os.path.getsize(rig.log_path) - size_before
        r["log_bytes_per_s_allocate_flood"] = written / took
        r["allocate_flood_calls_per_s"] = sum(calls) / took
        time.sleep(kdp.LOG_SUMMARY_S + 1)  # the last summary
        with open(rig.log_path, errors="replace") as f:
            f.seek(size_before)
            text = f.read()
        logged = len(re.findall(r"kvm: unknown device ID", text))
        summed = sum(int(n) for n in re.findall(r"calls not logged in the last [\d.]+ s: (\d+) refused", text))
        r["allocate_flood_calls_unaccounted"] = sum(calls) - logged - summed


def growth_1000_restarts(restarts: int) -> float:
    """rss_growth_mb_1000_restarts, once: see the module docstring."""
    with Rig(110) as rig:
        rig.start()
        restart_series(rig, 5)
        before = process_facts(rig.pid)[0]
        for _ in range(restarts):
            rig.kubelet.restart()
            time.sleep(0.005)
        restart_series(rig, 1)
        return process_facts(rig.pid)[0] - before


def bench_flood(quick: bool) -> dict[str, float]:
    r: dict[str, float] = {}
    bench_conn_flood(r)
    bench_rapid_reset(8.0 if quick else 40.0, r)
    runs = [growth_1000_restarts(200 if quick else 1000) for _ in range(5)]
    r["rss_growth_mb_1000_restarts_min"] = min(runs)
    r["rss_growth_mb_1000_restarts_median"] = statistics.median(runs)
    r["rss_growth_mb_1000_restarts_max"] = max(runs)
    bench_allocate_flood_log(5.0 if quick else 30.0, r)
    bench_count_restarts((110, kdp.MAX_COUNT) if quick else (110, 1_000, kdp.MAX_COUNT), r)
    return {k: round(v, 3) for k, v in r.items()}


# The plugin under tracemalloc: what grew between `warm-up` seconds after start
# and its exit, largest first, into a file. Used by --soak --tracemalloc only
# (tracing makes every allocation slower and bigger).
TRACED_PLUGIN = """
import asyncio, sys, tracemalloc
import kvm_device_plugin as kdp
warm_up_s, report, argv = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
tracemalloc.start(25)
baseline = []
plain_run = kdp.Daemon.run

async def traced_run(self):
    async def take_baseline():
        await asyncio.sleep(warm_up_s)
        baseline.append(tracemalloc.take_snapshot())
    timer = asyncio.ensure_future(take_baseline())
    try:
        return await plain_run(self)
    finally:
        timer.cancel()
        if baseline:
            growth = tracemalloc.take_snapshot().compare_to(baseline[0], "traceback")
            with open(report, "w") as f:
                for stat in growth[:12]:
                    f.write(f"{stat}\\n    " + "\\n    ".join(stat.traceback.format()[-14:]) + "\\n\\n")

kdp.Daemon.run = traced_run
sys.exit(kdp.main(argv))
"""


def soak(seconds: float, traced: bool) -> dict[str, float]:
    """The plugin under a steady mixed load for `seconds`: per second 20 Allocate
    calls, 2 health flips of kvm, 3 HTTP requests (/metrics, /healthz, /readyz),
    and a kubelet restart every 3 s. VmRSS is read every 10 s; the slope is a
    least-squares fit over the readings after the first fifth (warm-up)."""
    import urllib.request
    port = free_port()
    with Rig(110, args=("--metrics-port", str(port))) as rig:
        if traced:
            report = os.path.join(HERE, "soak-tracemalloc.txt")
            rig.wrapper = [sys.executable, "-c", TRACED_PLUGIN, str(seconds / 5), report]
        rig.start()
        kvm, (path, minor) = resource("kvm"), (rig.node("kvm"), DEVICE_NODES["kvm"][1])
        counts = {"allocations": 0, "allocation_errors": 0, "restarts": 0, "flips": 0, "http": 0}
        samples: list[tuple[float, float]] = []
        start = time.monotonic()
        tick = 0
        while (now := time.monotonic() - start) < seconds:
            if tick % 10 == 0:  # every 0.5 s: an HTTP request or three, a flip
                for page in ("/metrics", "/healthz", "/readyz")[: 2 if tick % 20 else 1]:
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}{page}", timeout=5).close()
                    except OSError:
                        pass  # 503 while the kubelet restarts
                    counts["http"] += 1
                if os.path.exists(path):
                    os.unlink(path)
                else:
                    mknod(path, minor)
                counts["flips"] += 1
            if tick % 60 == 0 and tick:  # every 3 s
                base = rig.baseline()
                rig.kubelet.restart()
                rig.wait_lists(base)
                counts["restarts"] += 1
            try:
                rig.kubelet.stub(kvm).Allocate(pb.AllocateRequest(container_requests=[
                    pb.ContainerAllocateRequest(devices_ids=[f"kvm{tick % 110}"])]), timeout=WAIT_S)
            except grpc.RpcError:
                counts["allocation_errors"] += 1  # kvm is Unhealthy half the time: refused
            counts["allocations"] += 1
            if not samples or now - samples[-1][0] >= 10:
                samples.append((now, rss_mb(rig.pid)))
            tick += 1
            time.sleep(max(0.0, start + tick * 0.05 - time.monotonic()))
        samples.append((time.monotonic() - start, rss_mb(rig.pid)))
        if not os.path.exists(path):
            mknod(path, minor)
        rig.shutdown_ms()
    fitted = [(t, mb) for t, mb in samples if t >= seconds / 5]
    mean_t, mean_mb = statistics.mean(t for t, _ in fitted), statistics.mean(mb for _, mb in fitted)
    slope = (sum((t - mean_t) * (mb - mean_mb) for t, mb in fitted)
             / sum((t - mean_t) ** 2 for t, _ in fitted))
    def rss_at(fraction: float) -> float:  # the reading nearest that point of the run
        return min(samples, key=lambda sample: abs(sample[0] - fraction * seconds))[1]
    return {"soak_s": seconds, "soak_rss_mb_start": samples[0][1], "soak_rss_mb_25pct": rss_at(0.25),
            "soak_rss_mb_50pct": rss_at(0.5), "soak_rss_mb_75pct": rss_at(0.75), "soak_rss_mb_end": samples[-1][1],
            "soak_rss_mb_max": max(mb for _, mb in samples), "soak_rss_slope_mb_per_hour": slope * 3600,
            **{f"soak_{k}": v for k, v in counts.items()}}


def run(quick: bool) -> dict[str, float]:
    results: dict[str, float] = {}
    bench_default(QUICK if quick else FULL, results)
    bench_hostile(QUICK if quick else FULL, results)
    bench_large(results)
    return {k: round(v, 3) for k, v in results.items()}


def machine_facts() -> list[tuple[str, str]]:
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        ("nproc", f"{len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("grpcio", grpc.__version__),
        ("kernel", platform.release()),
        ("loadavg", "%.2f %.2f %.2f (at start; other load skews every figure)" % os.getloadavg()),
    ]


def print_table(facts: list[tuple[str, str]], results: dict[str, float], quick: bool) -> None:
    print(f"kvm-device-plugin benchmark ({'quick' if quick else 'full'})")
    for name, value in facts:
        print(f"  {name:<8} {value}")
    print()
    width = max(map(len, results))
    for key, value in results.items():
        print(f"  {key:<{width}}  {value:>12,}" if isinstance(value, int) else f"  {key:<{width}}  {value:>12,.3f}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions and a shorter idle window (same keys)")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="instead: the soak run alone, this long (the issue's was 1200)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="with --soak: trace the plugin's allocations, the growth into soak-tracemalloc.txt")
    parser.add_argument("--runtime", action="store_true",
                        help="instead: daemonset.yaml's pod started in a private containerd (e2e/runtime_harness.py)")
    parser.add_argument("--kubelet", metavar="PATH",
                        help="instead: the plugin under this real kubelet binary (e2e/kubelet_harness.py)")
    parser.add_argument("--cluster", action="store_true",
                        help="instead: the README's deploy path on a two-node cluster (e2e/cluster_harness.py; "
                             "KDP_CLUSTER, KDP_KUBELET)")
    parser.add_argument("--flood", action="store_true",
                        help="instead: connection flood, rapid reset (40 s), memory over restarts "
                             "(five runs) and per --count (300 restarts each)")
    args = parser.parse_args()
    # SIGTERM would otherwise skip the finally blocks that remove processes and dirs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.runtime or args.kubelet or args.cluster:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e"))
    if args.runtime:
        import runtime_harness
        return runtime_harness.bench_main(args.quick)
    if args.kubelet:
        import kubelet_harness
        return kubelet_harness.bench_main(args.kubelet, args.quick)
    if args.cluster:
        import cluster_harness
        return cluster_harness.bench_main(args.quick)
    # The status flood holds FLOOD_CONNECTIONS sockets open at once.
    import resource as limits
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    limits.setrlimit(limits.RLIMIT_NOFILE, (max(soft, min(hard, 4 * FLOOD_CONNECTIONS)), hard))
    facts = machine_facts()
    if args.flood:
        results = bench_flood(args.quick)
    elif args.soak:
        results = {k: round(v, 3) for k, v in soak(args.soak, args.tracemalloc).items()}
    else:
        results = run(args.quick)
    print_table(facts, results, args.quick)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
