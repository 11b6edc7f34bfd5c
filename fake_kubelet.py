"""A kubelet stand-in for the tests and the benchmark.

It does what ../shared/KUBELET.md says a kubelet does, not what is convenient:

- start() deletes every unix socket in the device-plugins directory (keeping
  other files, such as kubelet_internal_checkpoint), then serves Registration on
  a fresh kubelet.sock;
- Register validates the version, the resource name and the endpoint, and
  answers errors as gRPC UNKNOWN with a message;
- in the default mode (kubelet 1.25 and later) Register dials the plugin back
  and calls GetDevicePluginOptions (10 s timeout) before it returns; in
  `legacy` mode (1.10 to 1.24) it returns at once, then in the background dials
  the plugin (10 s timeout; a failed dial drops the registration silently, as
  those kubelets did), takes the options from the RegisterRequest and never
  calls GetDevicePluginOptions;
- it then reads one ListAndWatch stream per registration, taking every message
  as the FULL device list; when a stream ends it marks all the resource's
  devices unhealthy (capacity unchanged) and never re-dials;
- registering a resource again replaces (and closes) its old endpoint.

Misbehaving kubelets, for the tests of the plugin's retry pacing: `reject_with`
answers every Register with that error (gRPC UNKNOWN, as a kubelet rejects a
registration); `stream_limit` ends every ListAndWatch stream after that many
messages, and 0 opens none (a kubelet that lost the registration).

Which proto it speaks is the `proto` argument:

- "current": ../deviceplugin.proto through the committed generated stubs;
- "pre_cdi": testdata/deviceplugin_pre_cdi.proto, the API as kubelet 1.18 knew
  it (no GetPreferredAllocation, no get_preferred_allocation_available, no
  cdi_devices). Every message the stand-in receives, RegisterRequest included,
  is parsed with that proto; fields it does not know are kept as unknown
  fields and ignored, as such a kubelet does (`unknown_fields()` lists them).
  A 1.18 kubelet registers the legacy way, so this mode implies `legacy`.

It runs in the caller's process on gRPC's thread pool; its state is read
through wait_for(), which blocks on a condition variable until a predicate
holds or a timeout passes.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

import deviceplugin_pb2 as pb
import deviceplugin_pb2_grpc as pb_grpc
from testdata import deviceplugin_pre_cdi_pb2 as pre_cdi_pb

KUBELET_SOCKET = "kubelet.sock"
DIAL_BACK_TIMEOUT_S = 10.0
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
WIRE_PACKAGE = "v1beta1"  # what method paths carry, whatever a proto's package
PROTOS = {"current": pb, "pre_cdi": pre_cdi_pb}
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


# The node's side of every test, benchmark and smoke run: real character
# device nodes under a temporary host root. Name -> (path under the root,
# misc minor); misc devices all have major 10.
DEVICE_NODES = {"kvm": ("dev/kvm", 232), "tun": ("dev/net/tun", 200), "vhost-net": ("dev/vhost-net", 238)}


def unix_target(path: str) -> str:
    """gRPC's target for a unix socket path. gRPC parses targets as URIs, so
    '#', '?' and '%' are percent-encoded (the kubelet, in Go, dials the path
    as it is). A ',' cannot be dialled in any form."""
    return "unix://" + urllib.parse.quote(path, safe="/")


# A careless peer for the tests and the benchmark: a client that opens
# ListAndWatch on a plugin socket, takes one message and stops reading (SIGSTOP
# keeps its connection open with nothing ever read again).
STALLED_READER = """
import os, signal, sys
import grpc
import deviceplugin_pb2 as pb, deviceplugin_pb2_grpc as pb_grpc
from fake_kubelet import unix_target
stream = pb_grpc.DevicePluginStub(grpc.insecure_channel(unix_target(sys.argv[1]))).ListAndWatch(pb.Empty())
next(stream)
print("read one", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def start_stalled_reader(socket_path: str) -> subprocess.Popen:
    """The stalled reader on `socket_path`, once it has read its message and
    stopped. The caller kills it (SIGKILL ends a stopped process too)."""
    here = os.path.dirname(os.path.abspath(__file__))
    reader = subprocess.Popen([sys.executable, "-c", STALLED_READER, socket_path], cwd=here,
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None  # stdout=PIPE
    try:
        if reader.stdout.readline() != "read one\n":
            raise RuntimeError("the stalled reader read nothing")
        while open(f"/proc/{reader.pid}/stat").read().rsplit(") ", 1)[1][0] != "T":
            time.sleep(0.01)
    except BaseException:
        reader.kill()
        reader.wait()
        raise
    return reader


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for --metrics-port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mknod(path: str, minor: int, major: int = 10) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(major, minor))


def make_device_nodes(host_root: str) -> None:
    for relative, minor in DEVICE_NODES.values():
        mknod(os.path.join(host_root, relative), minor)


def resource_name_error(name: str) -> str | None:
    """Why the kubelet would reject `name` as an extended resource name, or None."""
    domain, slash, short = name.partition("/")
    if not slash or not short:
        return f"resource name {name!r} is not of the form domain/name"
    if not re.fullmatch(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*", domain) or len(domain) > 253:
        return f"resource domain {domain!r} is not a DNS subdomain"
    if "kubernetes.io/" in name:  # the kubelet's test for its own (native) resources
        return f"resource name {name!r} is a native kubernetes.io resource"
    if name.startswith("requests."):
        return f"resource name {name!r} starts with the quota prefix requests."
    if len(short) > 63 or not re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", short):
        return f"resource name part {short!r} is not a qualified name"
    return None


def unknown_fields(message: Message, prefix: str = "") -> list[str]:
    """The fields of `message`, at any depth, that its proto does not know, as
    "path.number" (e.g. "container_responses.5" for cdi_devices seen by a
    pre-CDI kubelet): what a kubelet built from that proto ignores."""
    unknown = UnknownFieldSet(message)  # indexable, not declared iterable
    found = {f"{prefix}{unknown[i].field_number}" for i in range(len(unknown))}
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        for item in value if field.is_repeated else [value]:
            found.update(unknown_fields(item, f"{prefix}{field.name}."))
    return sorted(found)


class MethodPathStub:
    """A DevicePlugin client for a proto with another package name: every rpc
    that proto declares (and no other), called at the kubelet's own method path
    with that proto's messages. The wire carries only the path and the field
    numbers."""

    def __init__(self, channel: grpc.Channel, messages: Any) -> None:
        for method in messages.DESCRIPTOR.services_by_name["DevicePlugin"].methods:
            request = getattr(messages, method.input_type.name)
            response = getattr(messages, method.output_type.name)
            call = channel.unary_stream if method.server_streaming else channel.unary_unary
            setattr(self, method.name, call(
                f"/{WIRE_PACKAGE}.DevicePlugin/{method.name}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            ))


class Endpoint:
    """One registration: the channel to the plugin and what its stream said."""

    def __init__(self, resource: str, socket_path: str, options: Message, messages: Any) -> None:
        self.resource = resource
        self.socket_path = socket_path
        self.options = options
        self.channel = grpc.insecure_channel(unix_target(socket_path), options=CHANNEL_OPTIONS)
        # Any: MethodPathStub's methods are made at run time.
        self.stub: Any
        if messages is pb:
            self.stub = pb_grpc.DevicePluginStub(self.channel)
        else:
            self.stub = MethodPathStub(self.channel, messages)
        self.stream: grpc.Future | None = None
        self.closed = False

    def dial(self, timeout: float) -> bool:
        """A legacy kubelet's blocking dial: wait (up to `timeout`) until the
        plugin's socket accepts a connection. (grpc.channel_ready_future would
        do, but its polling adds up to 0.2 s.)"""
        deadline = time.monotonic() + timeout
        while not self.closed:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(self.socket_path)
                    return True
                except OSError:
                    pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return False

    def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.cancel()
        self.channel.close()


class ResourceState:
    """What the node status would show for one resource."""

    def __init__(self) -> None:
        self.devices: dict[str, str] = {}  # ID -> health, from the last message
        self.messages = 0
        self.messages_since_registration = 0
        self.last_message_at = 0.0  # time.monotonic() of the last message
        self.registrations = 0
        self.registered_at = 0.0
        self.stream_open = False
        self.stream_ends = 0
        self.endpoint: Endpoint | None = None
        self.options: Message | None = None  # a DevicePluginOptions of the stand-in's proto
        self.options_calls = 0

    @property
    def capacity(self) -> int:
        return len(self.devices)

    @property
    def allocatable(self) -> int:
        return sum(1 for health in self.devices.values() if health == "Healthy")


class FakeKubelet(pb_grpc.RegistrationServicer):
    def __init__(self, plugin_dir: str, legacy: bool = False, register_delay_s: float = 0.0,
                 proto: str = "current", reject_with: str | None = None,
                 stream_limit: int | None = None) -> None:
        if proto not in PROTOS:
            raise ValueError(f"proto must be one of {sorted(PROTOS)}, not {proto!r}")
        self.plugin_dir = plugin_dir
        self.socket_path = os.path.join(plugin_dir, KUBELET_SOCKET)
        self.proto = proto
        self.messages = PROTOS[proto]  # the module whose messages this kubelet knows
        # Kubelets before 1.25 register without dialling back; every pre-CDI
        # proto here is such a kubelet's.
        self.legacy = legacy or proto != "current"
        # Seconds Register sleeps before answering: a kubelet going away.
        self.register_delay_s = register_delay_s
        self.release = threading.Event()  # set to end every such delay at once
        self.reject_with = reject_with
        self.stream_limit = stream_limit
        self.register_calls = 0
        # Per Register call, in order: when it arrived (time.monotonic()) and
        # the deadline the plugin put on it (seconds left; None without one).
        self.register_times: list[float] = []
        self.register_deadlines: list[float | None] = []
        self.resources: dict[str, ResourceState] = {}
        self.rejections: list[str] = []  # errors Register answered
        self.dial_failures: list[str] = []  # legacy: registrations dropped after Register returned
        self.cond = threading.Condition()
        self.server: grpc.Server | None = None
        self.replaced_servers: list[grpc.Server] = []  # see recreate_socket()
        self.generation = 0
        self._dialing: set[Endpoint] = set()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        os.makedirs(self.plugin_dir, exist_ok=True)
        for name in os.listdir(self.plugin_dir):
            path = os.path.join(self.plugin_dir, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
        server = self._serve(self.socket_path)
        with self.cond:
            self.generation += 1
            self.server = server

    def _serve(self, path: str) -> grpc.Server:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        if self.messages is pb:
            pb_grpc.add_RegistrationServicer_to_server(self, server)
        else:
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                f"{WIRE_PACKAGE}.Registration",
                {"Register": grpc.unary_unary_rpc_method_handler(
                    self.Register,
                    request_deserializer=self.messages.RegisterRequest.FromString,
                    response_serializer=self.messages.Empty.SerializeToString,
                )},
            ),))
        server.add_insecure_port(unix_target(path))
        server.start()
        return server

    def recreate_socket(self) -> None:
        """A new kubelet.sock, and nothing else: this kubelet keeps its
        registrations, its streams and its old server (whose socket file is
        gone). Bound elsewhere and renamed into place, so the path never
        lacks a listening socket."""
        fresh = self._serve(self.socket_path + ".new")
        os.rename(self.socket_path + ".new", self.socket_path)
        with self.cond:
            if self.server is not None:
                self.replaced_servers.append(self.server)
            self.server = fresh

    def stop(self) -> None:
        """The kubelet process ends: its socket goes, its plugin connections close.

        A Register call held by register_delay_s stays held until `release`
        is set: a kubelet going away may keep a plugin waiting that long.
        """
        with self.cond:
            server, self.server = self.server, None
            replaced, self.replaced_servers = self.replaced_servers, []
            endpoints = [r.endpoint for r in self.resources.values() if r.endpoint]
            endpoints += self._dialing
            self._dialing = set()
            for state in self.resources.values():
                state.endpoint = None
        for old in [*replaced, server]:
            if old is not None:
                old.stop(None).wait()
        for endpoint in endpoints:
            endpoint.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- the Registration service ---------------------------------------------

    def Register(
        self, request: pb.RegisterRequest | pre_cdi_pb.RegisterRequest, context: grpc.ServicerContext
    ) -> Message:
        generation = self.generation
        with self.cond:
            self.register_calls += 1
            self.register_times.append(time.monotonic())
            self.register_deadlines.append(context.time_remaining())
            self.cond.notify_all()
        error = None
        if self.reject_with:
            error = self.reject_with
        elif request.version != "v1beta1":
            error = f"unsupported device plugin API version {request.version!r}"
        elif resource_name_error(request.resource_name):
            error = resource_name_error(request.resource_name)
        elif not request.endpoint or "/" in request.endpoint:
            error = f"endpoint {request.endpoint!r} is not a file name in {self.plugin_dir}"
        if error:
            with self.cond:
                self.rejections.append(error)
                self.cond.notify_all()
            context.abort(grpc.StatusCode.UNKNOWN, error)
        if self.register_delay_s:
            self.release.wait(self.register_delay_s)
        endpoint = Endpoint(request.resource_name, os.path.join(self.plugin_dir, request.endpoint),
                            request.options, self.messages)
        if self.legacy:
            # Kubelets up to 1.24: answer now, dial and read the stream afterwards.
            threading.Thread(target=self._dial_and_read, args=(endpoint, generation), daemon=True).start()
            return self.messages.Empty()
        try:
            endpoint.options = endpoint.stub.GetDevicePluginOptions(
                self.messages.Empty(), timeout=DIAL_BACK_TIMEOUT_S, wait_for_ready=True
            )
        except grpc.RpcError as e:
            endpoint.close()
            context.abort(grpc.StatusCode.UNKNOWN, f"failed to get device plugin options: {e.details()}")
        with self.cond:
            self.resources.setdefault(request.resource_name, ResourceState()).options_calls += 1
        if not self._register_endpoint(endpoint, generation):
            context.abort(grpc.StatusCode.UNAVAILABLE, "kubelet is shutting down")
        threading.Thread(target=self._read_stream, args=(endpoint,), daemon=True).start()
        return self.messages.Empty()

    def _dial_and_read(self, endpoint: Endpoint, generation: int) -> None:
        """A legacy kubelet's registration after Register has returned: dial
        (blocking, 10 s), record the endpoint, read its stream. A failed dial
        is only logged by such a kubelet; the plugin never hears of it."""
        with self.cond:
            if generation != self.generation or self.server is None:
                endpoint.close()
                return
            self._dialing.add(endpoint)  # stop() closes it, which ends the dial
        dialled = endpoint.dial(DIAL_BACK_TIMEOUT_S)
        with self.cond:
            self._dialing.discard(endpoint)
            if not dialled and not endpoint.closed:
                self.dial_failures.append(f"{endpoint.resource}: cannot dial {endpoint.socket_path}")
                self.cond.notify_all()
        if dialled and self._register_endpoint(endpoint, generation):
            self._read_stream(endpoint)
        else:
            endpoint.close()

    def _register_endpoint(self, endpoint: Endpoint, generation: int) -> bool:
        """Make `endpoint` the resource's own, replacing (and closing) the old one;
        False if the kubelet that took the Register call has gone since."""
        with self.cond:
            if generation != self.generation or self.server is None:
                endpoint.close()
                return False
            state = self.resources.setdefault(endpoint.resource, ResourceState())
            old, state.endpoint = state.endpoint, endpoint
            state.options = endpoint.options
            state.registrations += 1
            state.messages_since_registration = 0
            state.registered_at = time.monotonic()
            self.cond.notify_all()
        if old is not None:
            old.close()
        return True

    def _read_stream(self, endpoint: Endpoint) -> None:
        state = self.resources[endpoint.resource]
        if self.stream_limit == 0:
            return  # this kubelet lost the registration: no stream, ever
        try:
            stream = endpoint.stub.ListAndWatch(self.messages.Empty(), wait_for_ready=True)
            endpoint.stream = stream
            if endpoint.closed:
                stream.cancel()
            with self.cond:
                if state.endpoint is endpoint:
                    state.stream_open = True
                    self.cond.notify_all()
            for message in stream:
                with self.cond:
                    if state.endpoint is not endpoint:
                        break
                    state.devices = {d.ID: d.health for d in message.devices}
                    state.messages += 1
                    state.messages_since_registration += 1
                    state.last_message_at = time.monotonic()
                    self.cond.notify_all()
                if self.stream_limit is not None and state.messages_since_registration >= self.stream_limit:
                    stream.cancel()  # this kubelet ends every stream
        except grpc.RpcError:
            pass
        except ValueError:
            pass  # "Channel closed": stop() or a newer registration closed it first
        finally:
            with self.cond:
                if state.endpoint is endpoint or state.endpoint is None:
                    # Capacity stays; nothing is allocatable until the plugin
                    # registers again.
                    state.devices = dict.fromkeys(state.devices, "Unhealthy")
                    state.stream_open = False
                    state.stream_ends += 1
                    self.cond.notify_all()

    # -- what tests and the benchmark ask ---------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout=timeout)

    def state(self, resource: str) -> ResourceState:
        with self.cond:
            return self.resources.setdefault(resource, ResourceState())

    def wait_registered(self, resources: list[str], count: int, timeout: float = 10.0,
                        min_registrations: int = 1) -> bool:
        """Every resource registered, its stream open and `count` devices listed
        by a message of the latest registration."""
        def ready() -> bool:
            for name in resources:
                state = self.resources.get(name)
                if (state is None or state.registrations < min_registrations
                        or not state.stream_open or not state.messages_since_registration
                        or state.capacity != count):
                    return False
            return True
        return self.wait_for(ready, timeout)

    def allocate(self, resource: str, containers: list[list[str]], timeout: float = 5.0) -> Message:
        """Allocate as this kubelet does; the AllocateResponse is of its proto."""
        with self.cond:
            endpoint = self.resources[resource].endpoint
        assert endpoint is not None, f"{resource} is not registered"
        m = self.messages
        request = m.AllocateRequest(
            container_requests=[m.ContainerAllocateRequest(devices_ids=ids) for ids in containers]
        )
        return endpoint.stub.Allocate(request, timeout=timeout)

    def stub(self, resource: str) -> pb_grpc.DevicePluginStub | MethodPathStub:
        """The resource's DevicePlugin client: the generated stub for the current
        proto, a MethodPathStub (only the rpcs that proto has) for an older one."""
        with self.cond:
            endpoint = self.resources[resource].endpoint
        assert endpoint is not None, f"{resource} is not registered"
        return endpoint.stub

    def end_stream(self, resource: str) -> None:
        """The kubelet ends a ListAndWatch stream while both sides keep running."""
        with self.cond:
            endpoint = self.resources[resource].endpoint
        assert endpoint is not None and endpoint.stream is not None, f"{resource} has no stream"
        endpoint.stream.cancel()
