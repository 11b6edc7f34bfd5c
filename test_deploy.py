"""Tests: the deployment files against Kubernetes' schemas, hadolint and the plugin.

No cluster and no container engine are at hand, so these tests catch
statically what would otherwise show up only on a node:

- a manifest that the API server of Kubernetes 1.25 or 1.37 would reject
  (kubernetes-validate --strict, with the schemas it ships);
- a Dockerfile that hadolint warns about, or whose files .dockerignore leaves
  out of the build context;
- a DaemonSet whose command line the plugin's own argument parser rejects
  (the pod would crash-loop on every node), or whose probes ask a port or a
  path the plugin does not serve;
- mounts that do not line up with --host-root and --plugin-dir (the plugin
  would report every device missing, or never reach the kubelet);
- a security setting of the DaemonSet or of the example consumer pod that was
  quietly loosened;
- a systemd unit (deploy/kvm-device-plugin.service) that systemd would
  reject or warn about, or whose command line, environment and limits drift
  from the DaemonSet's.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

import kvm_device_plugin as kdp

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)  # the venv's bin: kubernetes-validate, hadolint
MANIFESTS = ["daemonset.yaml"] + sorted(
    os.path.relpath(path, HERE) for path in glob.glob(os.path.join(HERE, "examples", "*.yaml"))
)
# The oldest and the newest version that kubernetes-validate 1.37 has schemas for.
KUBERNETES_VERSIONS = ["1.25.0", "1.37.0"]
SCRIPT_NAME = "kvm_device_plugin.py"
MODULE_NAME = "kvm_device_plugin"
KUBELET_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"  # on the node
UNIT = "deploy/kvm-device-plugin.service"
INSTALL_DIR = "/opt/kvm-device-plugin"  # where the unit expects the plugin and its venv
# Set by .ci/run, which installs the Debian packages: a missing one fails instead of skipping.
REQUIRE_ENV = "KDP_REQUIRE_RUNTIME"


def load_documents(name: str) -> list[dict]:
    with open(os.path.join(HERE, name)) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def only(docs: list[dict], kind: str) -> dict:
    matching = [doc for doc in docs if doc["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60
    )


def args_after_script(command: list[str]) -> list[str]:
    """The arguments that follow the plugin in a command line: its script's
    path, or `-m kvm_device_plugin`."""
    scripts = [i for i, word in enumerate(command) if os.path.basename(word) == SCRIPT_NAME]
    scripts += [i + 1 for i, word in enumerate(command[:-1]) if (word, command[i + 1]) == ("-m", MODULE_NAME)]
    assert scripts, f"neither {SCRIPT_NAME} nor -m {MODULE_NAME} is in {command}"
    return command[scripts[0] + 1:]


def parse_plugin_args(argv: list[str]):
    """Parse argv with the plugin's own parser; fail the test with its message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return kdp.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{SCRIPT_NAME} rejects {shlex.join(argv)}:\n{stderr.getvalue().strip()}")


@pytest.fixture(scope="module")
def daemonset_docs() -> list[dict]:
    return load_documents("daemonset.yaml")


@pytest.fixture(scope="module")
def daemonset(daemonset_docs) -> dict:
    return only(daemonset_docs, "DaemonSet")


@pytest.fixture(scope="module")
def pod_spec(daemonset) -> dict:
    return daemonset["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod_spec) -> dict:
    assert len(pod_spec["containers"]) == 1
    return pod_spec["containers"][0]


def command_line(container: dict) -> list[str]:
    return container.get("command", []) + container.get("args", [])


def plugin_args(container: dict):
    return parse_plugin_args(args_after_script(command_line(container)))


def mount_and_volume(pod_spec: dict, container: dict, match) -> tuple[dict, dict]:
    """The one volume mount of the container whose volume satisfies match."""
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    found = [(m, volumes[m["name"]]) for m in container["volumeMounts"] if match(volumes[m["name"]])]
    assert len(found) == 1, f"expected one matching mount, found {found}"
    return found[0]


def host_path(path: str):
    return lambda volume: volume.get("hostPath", {}).get("path") == path


def require_program(program: str, package: str) -> str:
    """The program's path; or skip with one line naming the Debian package
    (a failure where .ci/run has installed it)."""
    path = shutil.which(program)
    if path is None:
        missing = f"{program} is not installed: apt-get install -y {package}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{missing} ({REQUIRE_ENV}=1: .ci/run installs it)")
        pytest.skip(missing)
    return path


def unit_settings(text: str) -> dict[str, list[str]]:
    """A systemd unit file as {"Section.Key": [values in order]}: comments
    dropped, backslash continuations joined, repeated keys kept."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, value = line.split("=", 1)
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    with open(os.path.join(HERE, UNIT)) as f:
        return unit_settings(f.read())


# --- Schemas and linter -----------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS)
def test_manifest_matches_kubernetes_schema(manifest, version):
    result = run([os.path.join(BIN, "kubernetes-validate"), "--strict", "-k", version, manifest])
    assert result.returncode == 0, result.stdout
    # An unknown kind or apiVersion is only a WARN with exit 0: insist that
    # every resource in the file was actually checked and passed.
    assert "WARN" not in result.stdout, result.stdout
    for doc in load_documents(manifest):
        resource = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        assert f"{manifest} passed for resource {resource} " in result.stdout, result.stdout


def test_dockerfile_passes_hadolint():
    result = run([os.path.join(BIN, "hadolint"), "--no-color", "Dockerfile"])
    assert (result.returncode, result.stdout) == (0, ""), result.stdout


def test_dockerfile_entrypoint_is_the_daemonset_command(container):
    with open(os.path.join(HERE, "Dockerfile")) as f:
        entrypoints = [line.split(None, 1)[1] for line in f if line.startswith("ENTRYPOINT ")]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == container["command"]


def test_the_image_runs_the_plugin_from_bytecode_compiled_at_build(container):
    """Python compiles a script run by its path at every start, and the
    compiler's garbage stays in RSS (3.8 MB: bench_plugin.py's
    rss_mb_idle_as_script); a module imported from its compiled bytecode
    leaves none. The image compiles /app after copying the plugin there and
    runs it with -m, which finds it through PYTHONPATH, and so does the unit."""
    with open(os.path.join(HERE, "Dockerfile")) as f:
        lines = f.read().replace("\\\n", " ").splitlines()
    copy = next(i for i, line in enumerate(lines) if line.startswith("COPY ") and SCRIPT_NAME in line)
    compiles = [i for i, line in enumerate(lines) if line.split()[:4] == ["RUN", "python", "-m", "compileall"]]
    assert compiles and compiles[0] > copy and lines[compiles[0]].split()[-1] == "/app"
    assert container["command"] == ["python", "-m", MODULE_NAME]
    assert any(line.startswith("ENV ") and "PYTHONPATH=/app" in line for line in lines)


def test_the_benchmark_measures_the_environment_the_daemonset_and_the_image_set(container):
    import bench_plugin
    env = {entry["name"]: entry["value"] for entry in container.get("env", [])}
    with open(os.path.join(HERE, "Dockerfile")) as f:
        dockerfile = f.read()
    for name, value in bench_plugin.DEPLOYED_ENV.items():
        assert env.get(name) == value, f"daemonset.yaml sets {name}={env.get(name)}, the benchmark {value}"
        assert f"{name}={value}" in dockerfile, f"the Dockerfile does not set {name}={value}"


def test_dockerignore_lets_through_every_file_the_dockerfile_copies():
    with open(os.path.join(HERE, "Dockerfile")) as f:
        copies = [line.split()[1:] for line in f if line.startswith("COPY ")]
    sources = [word for words in copies for word in words[:-1]]
    assert "kvm_device_plugin.py" in sources
    with open(os.path.join(HERE, ".dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    # An allowlist: everything is excluded, then each copied file let back in.
    assert patterns[0] == "*"
    for source in sources:
        assert os.path.isfile(os.path.join(HERE, source)), source
        assert f"!{source}" in patterns, f"{source} is copied but left out by .dockerignore"


# --- The DaemonSet against the plugin's command line --------------------------


def test_plugin_accepts_the_daemonset_command_line(container):
    plugin_args(container)


def test_host_dev_is_mounted_where_host_root_points(pod_spec, container):
    args = plugin_args(container)
    mount, _ = mount_and_volume(pod_spec, container, host_path("/dev"))
    assert os.path.normpath(mount["mountPath"]) == os.path.join(os.path.abspath(args.host_root), "dev")
    assert mount.get("readOnly") is True
    # Where the plugin will actually look for each device node:
    for name in args.devices:
        node_path = kdp.NodeChecker(kdp.DEVICE_TABLE[name], os.path.abspath(args.host_root)).node_path
        assert node_path.startswith(mount["mountPath"] + "/"), node_path


def test_kubelet_device_plugins_dir_is_mounted_at_plugin_dir(pod_spec, container):
    args = plugin_args(container)
    mount, volume = mount_and_volume(pod_spec, container, host_path(KUBELET_PLUGIN_DIR))
    assert mount["mountPath"] == args.plugin_dir
    assert not mount.get("readOnly", False)  # the plugin creates its sockets there
    assert volume["hostPath"]["type"] == "Directory"


def test_metrics_port_is_declared_and_annotated(daemonset, container):
    args = plugin_args(container)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == int(args.metrics_port)
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(args.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("kind, path", [("readiness", "/readyz"), ("liveness", "/healthz"),
                                        ("startup", "/healthz")])
def test_probes_ask_the_plugins_own_endpoint(container, kind, path):
    # test_plugin.py checks that these paths answer 200 for a registered plugin.
    probe = container[f"{kind}Probe"]["httpGet"]
    assert probe == {"path": path, "port": "metrics"}
    assert plugin_args(container).metrics_port is not None


def test_startup_probe_asks_every_second_and_waits_long_enough(container):
    """The startup probe makes the first readiness probe come about a second
    after the start (docs/cluster.md: without it, one apply in 12 waited 10 s
    more for the next readiness period); it must still let a slow start
    through, and never restart a plugin that is only waiting for its kubelet:
    /healthz answers while it waits."""
    probe = container["startupProbe"]
    assert probe["periodSeconds"] == 1
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 30


# --- The DaemonSet's security and scheduling ---------------------------------


def test_container_is_unprivileged(container):
    security = container["securityContext"]
    assert security["runAsUser"] == 0  # owner of the kubelet's directory, no capabilities
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_pod_shares_nothing_with_the_host_but_two_directories(daemonset_docs, pod_spec):
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod_spec.get(key, False), key
    assert pod_spec["automountServiceAccountToken"] is False
    host_paths = sorted(v["hostPath"]["path"] for v in pod_spec["volumes"] if "hostPath" in v)
    assert host_paths == ["/dev", KUBELET_PLUGIN_DIR]
    for doc in daemonset_docs:
        assert doc["metadata"]["namespace"] == "kube-system", doc["kind"]


def test_runs_on_every_node_before_other_pods(pod_spec):
    assert pod_spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod_spec["tolerations"]  # no key: every taint


def test_rolling_update_never_runs_two_plugins_on_a_node(daemonset):
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert str(strategy["rollingUpdate"]["maxSurge"]) == "0"
    assert str(strategy["rollingUpdate"]["maxUnavailable"]) == "1"


def test_resources_are_bounded(container):
    resources = container["resources"]
    for section in ("requests", "limits"):
        assert set(resources[section]) == {"cpu", "memory"}, section


# --- The example consumer pod -------------------------------------------------


def test_consumer_pod_requests_the_three_devices_unprivileged():
    pod = only(load_documents("examples/consumer-pod.yaml"), "Pod")
    (container,) = pod["spec"]["containers"]
    limits = container["resources"]["limits"]
    for name in kdp.DEFAULT_DEVICES:
        assert limits[f"{kdp.DEFAULT_RESOURCE_DOMAIN}/{name}"] == "1", name
    security = container["securityContext"]
    assert security.get("privileged", False) is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    # The plugin, not a hostPath, puts the device nodes into the container.
    assert not any("hostPath" in volume for volume in pod["spec"].get("volumes", []))
    script = " ".join(container["command"])
    assert "ls -l /dev/kvm /dev/net/tun /dev/vhost-net" in script
    # Admitted before the plugin registered, the container has no devices: it
    # checks at start and exits 1, and only a restart gets them (e2e/test_reboot.py).
    assert '[ -c "$node" ] ||' in script and "exit 1" in script
    assert pod["spec"]["restartPolicy"] in ("OnFailure", "Always")


# --- The host-level install: deploy/kvm-device-plugin.service ------------------


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = require_program("systemd-analyze", "systemd")
    with open(os.path.join(HERE, UNIT)) as f:
        text = f.read()
    # verify insists that ExecStart's program exists: point the install
    # directory at this checkout and this interpreter; nothing else changes.
    assert text.count(f"{INSTALL_DIR}/venv/bin/python ") == 1
    text = text.replace(f"{INSTALL_DIR}/venv/bin/python ", f"{sys.executable} ")
    text = text.replace(f"{INSTALL_DIR}/", f"{HERE}/")
    copy = tmp_path / os.path.basename(UNIT)
    copy.write_text(text)
    result = run([analyze, "verify", str(copy)])
    # An unknown or misspelt setting is only a warning with exit 0: insist on silence.
    assert (result.returncode, result.stdout) == (0, ""), result.stdout


def test_systemd_unit_runs_the_daemonset_command_line(unit, container):
    (exec_start,) = unit["Service.ExecStart"]
    command = shlex.split(exec_start)
    assert command[:3] == [f"{INSTALL_DIR}/venv/bin/python", "-m", MODULE_NAME]
    on_host = vars(parse_plugin_args(args_after_script(command)))
    in_pod = vars(plugin_args(container))
    # Where they must differ: the host's own /dev, and a status port that stays
    # on the node (the pod's is on the pod's own address).
    assert (on_host.pop("host_root"), in_pod.pop("host_root")) == ("/", "/host")
    assert on_host.pop("metrics_address") == "127.0.0.1"
    in_pod.pop("metrics_address")
    assert on_host == in_pod


def test_systemd_unit_sets_the_daemonsets_environment_and_limits(unit, container):
    environment = dict(word.split("=", 1) for value in unit["Service.Environment"]
                       for word in shlex.split(value))
    for entry in container.get("env", []):
        assert environment.get(entry["name"]) == entry["value"], entry["name"]
    limits = container["resources"]["limits"]
    assert limits["memory"].endswith("Mi")  # systemd's M is 1024 * 1024 bytes, as Mi
    assert unit["Service.MemoryMax"] == [limits["memory"].removesuffix("Mi") + "M"]
    assert unit["Service.CPUQuota"] == [f"{int(limits['cpu']) * 100}%"]


def test_systemd_unit_starts_before_the_kubelet_without_binding_it(unit):
    assert "kubelet.service" in unit["Unit.Before"][0].split()
    assert "kubelet.service" in unit["Install.WantedBy"][0].split()
    # The kubelet must run whether or not the plugin does.
    for key in ("Unit.Requires", "Unit.BindsTo", "Unit.Requisite", "Unit.PartOf",
                "Install.RequiredBy", "Install.UpheldBy"):
        assert key not in unit, key
    assert unit["Service.Restart"] == ["on-failure"]


def test_systemd_unit_is_confined_as_the_daemonset_is(unit, container):
    # No capability and no way to gain one, as `capabilities: drop: [ALL]`
    # and `allowPrivilegeEscalation: false`; a read-only system but the
    # kubelet's directory, as `readOnlyRootFilesystem` and the two mounts.
    assert unit["Service.CapabilityBoundingSet"] == [""]
    assert unit["Service.AmbientCapabilities"] == [""]
    assert unit["Service.NoNewPrivileges"] == ["yes"]
    assert unit["Service.ProtectSystem"] == ["strict"]
    assert unit["Service.ReadWritePaths"] == [plugin_args(container).plugin_dir]
    for key in ("ProtectHome", "PrivateTmp", "ProtectKernelModules", "ProtectKernelTunables"):
        assert unit[f"Service.{key}"] == ["yes"], key
    # The device nodes the plugin probes, and no others.
    assert unit["Service.DevicePolicy"] == ["closed"]
    allowed = sorted(value.split()[0] for value in unit["Service.DeviceAllow"])
    nodes = sorted(kdp.DEVICE_TABLE[name].path for name in plugin_args(container).devices)
    assert allowed == nodes
