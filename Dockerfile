# kvm-device-plugin image. Build and push it yourself, then put its name in
# daemonset.yaml:
#   docker build -t registry.example.org/kvm-device-plugin:0.1.0 .
#
# Pinned by tag, including the Debian release, so a rebuild does not move to a
# new Python or distribution by itself.
FROM python:3.11-slim-bookworm

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
# requirements.txt bounds every version (grpcio and protobuf must match the
# generated stubs).
COPY requirements.txt .
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        -r requirements.txt

COPY kvm_device_plugin.py deviceplugin_pb2.py deviceplugin_pb2_grpc.py ./
# Compiled here, run as a module (ENTRYPOINT): Python never caches a script
# run by its path, and compiling the plugin's source at every start left
# 3.8 MB of the compiler's garbage in the plugin's RSS for good (42.2 MB idle,
# 38.4 MB from this bytecode: bench_plugin.py, rss_mb_idle_as_script). The
# root filesystem is read-only at run time, so nothing could be cached then.
RUN python -m compileall -q /app

# GRPC_VERBOSITY: gRPC core's INFO lines only clutter the plugin's log.
# PYTHONUNBUFFERED: every log line reaches the container log at once.
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in the DaemonSet.
# MALLOC_ARENA_MAX: glibc otherwise gives every thread that allocates an arena
# of its own; gRPC's threads come and go with each kubelet restart, and RSS
# crept up with them: 23 MB over 1000 back-to-back restarts, 6 MB with one
# arena (README, Benchmark: rss_growth_mb_1000_restarts).
# PYTHONPATH: `python -m kvm_device_plugin` finds it whatever the working directory.
ENV GRPC_VERBOSITY=ERROR \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=1

# No USER: daemonset.yaml runs this as uid 0 with every capability dropped,
# because the kubelet's device-plugins directory is root's.
# Exec form: the plugin is PID 1 and receives SIGTERM itself (it handles it).
ENTRYPOINT ["python", "-m", "kvm_device_plugin"]
