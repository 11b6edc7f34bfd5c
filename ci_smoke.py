"""Smoke check of the plugin against each kind of kubelet stand-in.

Needs only grpcio and protobuf (no pytest), so that CI can run it in a virtual
environment holding the lowest versions requirements.txt allows: it proves
that the committed stubs import there and that registration, Allocate, a
kubelet restart and shutdown work.

For each stand-in mode (current: kubelet 1.25+; legacy: 1.10 to 1.24;
pre_cdi: kubelet 1.18's proto) it makes a host root with real device nodes
(mknod: run as root), runs kvm_device_plugin.py --count 3 as a subprocess,
and checks in turn: the 3 resources register; Allocate of kvm0 gives one
DeviceSpec /dev/kvm -> /dev/kvm with the permissions --permissions auto
must give on this host (rwm on cgroup v2, rw on v1); after a kubelet restart they register
again and Allocate still works; SIGTERM ends the plugin with exit code 0.
One line per mode; exit code 1 if any failed. Every wait is bounded.

    python ci_smoke.py
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import google.protobuf  # noqa: E402
import grpc  # noqa: E402

from fake_kubelet import FakeKubelet, make_device_nodes, unknown_fields  # noqa: E402

SCRIPT = os.path.join(HERE, "kvm_device_plugin.py")
WAIT_S = 10.0
COUNT = 3
RESOURCES = [f"devices.kubevirt.io/{name}" for name in ("kvm", "tun", "vhost-net")]
MODES = {  # name: FakeKubelet keyword arguments
    "current": {},
    "legacy": {"legacy": True},
    "pre_cdi": {"proto": "pre_cdi"},
}
# What a kubelet of each mode may ignore in an AllocateResponse: a pre-CDI
# kubelet does not know cdi_devices (field 5).
IGNORABLE = {"current": set(), "legacy": set(), "pre_cdi": {"container_responses.5"}}
# --permissions auto: rwm on a cgroup v2 host (older runc's eBPF device filter
# wants "m" there too), rw on cgroup v1.
PERMISSIONS = "rwm" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "rw"


class Failed(Exception):
    pass


def check(condition: object, what: str) -> None:
    if not condition:
        raise Failed(what)


def check_allocate(kubelet: FakeKubelet, mode: str) -> None:
    try:
        response = kubelet.allocate(RESOURCES[0], [["kvm0"]], timeout=WAIT_S)
    except grpc.RpcError as e:
        raise Failed(f"Allocate failed: {e.code().name}: {e.details()}") from None
    check(len(response.container_responses) == 1,
          f"Allocate: {len(response.container_responses)} container responses, expected 1")
    specs = [(d.host_path, d.container_path, d.permissions) for d in response.container_responses[0].devices]
    check(specs == [("/dev/kvm", "/dev/kvm", PERMISSIONS)],
          f"Allocate: DeviceSpecs {specs}, expected one /dev/kvm -> /dev/kvm with {PERMISSIONS}")
    ignored = set(unknown_fields(response)) - IGNORABLE[mode]
    check(not ignored, f"Allocate: fields this kubelet does not know: {sorted(ignored)}")


def run_mode(mode: str) -> str:
    root = tempfile.mkdtemp(prefix="kdps", dir="/tmp")  # a unix socket path is limited to 107 bytes
    plugin_dir, host = os.path.join(root, "dp"), os.path.join(root, "host")
    log_path = os.path.join(root, "plugin.log")
    kubelet = FakeKubelet(plugin_dir, **MODES[mode])
    plugin = None
    try:
        make_device_nodes(host)
        kubelet.start()
        started = time.monotonic()
        with open(log_path, "wb") as log:
            plugin = subprocess.Popen(
                [sys.executable, SCRIPT, "--plugin-dir", plugin_dir, "--host-root", host, "--count", str(COUNT)],
                stdout=log, stderr=subprocess.STDOUT, cwd=HERE, env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
            )
        check(kubelet.wait_registered(RESOURCES, COUNT, timeout=WAIT_S),
              f"not all of {RESOURCES} registered with {COUNT} devices within {WAIT_S:.0f} s")
        registered_ms = (time.monotonic() - started) * 1000
        state = kubelet.state(RESOURCES[0])
        if kubelet.legacy:
            check(state.options_calls == 0, "a legacy kubelet called GetDevicePluginOptions")
        else:
            check(state.options_calls == 1, f"GetDevicePluginOptions called {state.options_calls} times, expected 1")
        check(state.options is not None and not state.options.pre_start_required,
              f"options {state.options}: pre_start_required should be off")
        check_allocate(kubelet, mode)
        kubelet.restart()
        check(kubelet.wait_registered(RESOURCES, COUNT, timeout=WAIT_S, min_registrations=2),
              f"not registered again within {WAIT_S:.0f} s of a kubelet restart")
        check_allocate(kubelet, mode)
        plugin.send_signal(signal.SIGTERM)
        try:
            code = plugin.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            raise Failed(f"still running {WAIT_S:.0f} s after SIGTERM") from None
        check(code == 0, f"exit code {code} after SIGTERM, expected 0")
        return f"registered in {registered_ms:.0f} ms, Allocate gave /dev/kvm, re-registered after a restart, SIGTERM exit 0"
    except Failed as e:
        with open(log_path, errors="replace") as f:
            tail = "".join(f.readlines()[-20:])
        raise Failed(f"{e}\n--- plugin log (last 20 lines) ---\n{tail}") from None
    finally:
        if plugin is not None and plugin.poll() is None:
            plugin.kill()
            plugin.wait()
        kubelet.release.set()
        kubelet.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    print(f"ci_smoke: Python {sys.version.split()[0]}, grpcio {grpc.__version__}, "
          f"protobuf {google.protobuf.__version__}", flush=True)
    failures = 0
    for mode in MODES:
        try:
            print(f"ci_smoke: {mode}: ok: {run_mode(mode)}", flush=True)
        except Exception as e:  # one mode's failure must not hide the others'
            failures += 1
            print(f"ci_smoke: {mode}: FAILED: {type(e).__name__ + ': ' if not isinstance(e, Failed) else ''}{e}",
                  flush=True)
    print(f"ci_smoke: {len(MODES) - failures} passed, {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
