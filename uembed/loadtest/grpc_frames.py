"""A closed-loop gRPC load generator in wrk's shape: one thread, ``connections`` HTTP/2 connections, one unary call
in flight on each, every call the next of a list of request bodies (as ``peers.WRK_SCRIPT`` sends REST v1's).

h2load, the compiled HTTP/2 load generator, sends one body a run: so either every call in flight carries the same
request, or (the peers bench until now) each connection is its own h2load process, and the calls a reply wakes
arrive spread over sixteen processes' wake-ups. Neither is what wrk gives REST v1. This client is: each call's frames
are prepared before the run (the header block HPACK-encoded once, without indexing, so the same bytes serve every
stream; each body's DATA frame), and a call costs one ``send`` of them with the stream's id patched in, and the
reply's frames are read until its trailers (HEADERS with END_STREAM). It advertises the largest flow-control windows
at the start, so it never has to open them again, answers SETTINGS and PING, and opens a new connection when the
server ends one (GOAWAY, after its calls in flight). It does not decode the server's headers: which calls the server
answered OK is checked against the server's own count by status (``peers.h2load_grpc_checked``'s check).

Run as its own process (``python -m uembed.loadtest.grpc_frames``): its CPU is the client's, as wrk's is.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import sys
import time
from pathlib import Path

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_ENABLE_PUSH = 0x4, 0x2
LARGEST_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
READ_BYTES = 262144


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def hpack_literal(name_index: int | None, name: bytes, value: bytes) -> bytes:
    """A header field as a literal not indexed (RFC 7541, 6.2.2): it adds nothing to the server's dynamic table, so
    one encoded block serves every stream. ``name_index``: the name's entry in HPACK's static table, if it has one."""

    def length(size: int) -> bytes:  # a 7-bit prefixed integer, Huffman off
        if size < 127:
            return bytes((size,))
        out, size = [127], size - 127
        while size >= 128:
            out.append(size % 128 + 128)
            size //= 128
        return bytes(out + [size])

    if name_index is None:
        return b"\x00" + length(len(name)) + name + length(len(value)) + value
    if name_index < 15:
        return bytes((name_index,)) + length(len(value)) + value
    return bytes((15, name_index - 15)) + length(len(value)) + value  # fits one continuation byte: indices below 143


def header_block(authority: str, path: str) -> bytes:
    """A unary gRPC call's request headers. ``:method POST`` and ``:scheme http`` are static entries 3 and 6."""
    return (b"\x83\x86" + hpack_literal(4, b":path", path.encode()) + hpack_literal(1, b":authority", authority.encode())
            + hpack_literal(31, b"content-type", b"application/grpc") + hpack_literal(None, b"te", b"trailers"))  # fmt: skip


class Connection:
    """One HTTP/2 connection carrying one call at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.next_stream = 1
        self.in_flight: int | None = None  # the stream of the call in flight
        self.started = 0.0
        self.goaway = False
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, LARGEST_WINDOW) + struct.pack(">HI", SETTINGS_ENABLE_PUSH, 0)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings)
                          + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", LARGEST_WINDOW - DEFAULT_WINDOW)))  # fmt: skip

    def send_call(self, headers: bytes, data: bytes) -> None:
        stream = self.next_stream
        self.next_stream += 2
        self.in_flight, self.started = stream, time.perf_counter()
        self.sock.sendall(frame(HEADERS, END_HEADERS, stream, headers) + frame(DATA, END_STREAM, stream, data))

    def read(self) -> tuple[bool, bool]:
        """Read what has arrived: (the call in flight ended, it failed). The connection's own frames are answered."""
        chunk = self.sock.recv(READ_BYTES)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk
        ended = failed = False
        view, at, replies = self.buffer, 0, []
        while len(view) - at >= 9:
            size = int.from_bytes(view[at:at + 3], "big")
            if len(view) - at < 9 + size:
                break
            kind, flags = view[at + 3], view[at + 4]
            stream = int.from_bytes(view[at + 5:at + 9], "big") & 0x7FFFFFFF
            start, at = at + 9, at + 9 + size
            if stream and stream == self.in_flight:
                if (kind == HEADERS and flags & END_STREAM) or kind == RST_STREAM or (kind == DATA and flags & END_STREAM):
                    ended, failed = True, kind == RST_STREAM
                    self.in_flight = None
            elif kind == SETTINGS and not flags & ACK:
                replies.append(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                replies.append(frame(PING, ACK, 0, bytes(view[start:at])))
            elif kind == GOAWAY:
                self.goaway = True
                last = int.from_bytes(view[start:start + 4], "big") & 0x7FFFFFFF
                if self.in_flight is not None and self.in_flight > last:  # not served: sent again on the next connection
                    ended, failed = True, True
                    self.in_flight = None
        del view[:at]
        if replies:
            self.sock.sendall(b"".join(replies))
        return ended, failed

    def close(self) -> None:
        self.sock.close()


GIVE_UP_S = 30.0  # after the deadline, how long the calls still in flight are waited for before they count as failed


def run(host: str, port: int, path: str, bodies: list[bytes], seconds: float, connections: int) -> dict:
    """Closed-loop calls until ``seconds`` pass: each connection sends its next call when its last one ends. A call
    the server resets, or that a lost connection or GOAWAY leaves unanswered, is a failure; its connection is opened
    again while the run lasts."""
    headers = header_block(f"{host}:{port}", path)
    data = [b"\x00" + len(body).to_bytes(4, "big") + body for body in bodies]
    poller = select.epoll()
    open_: dict[int, Connection] = {}
    calls = failed = sent = 0
    total_s = longest_s = 0.0

    def send(connection: Connection) -> None:
        nonlocal sent
        connection.send_call(headers, data[sent % len(data)])
        sent += 1

    def open_one() -> None:
        connection = Connection(host, port)
        open_[connection.sock.fileno()] = connection
        poller.register(connection.sock.fileno(), select.EPOLLIN)
        send(connection)

    def close(fd: int) -> None:
        poller.unregister(fd)
        open_.pop(fd).close()

    begin = time.perf_counter()
    deadline = begin + seconds
    for _ in range(connections):
        open_one()
    while open_:
        events = poller.poll(1.0)
        now = time.perf_counter()
        if not events and now > deadline + GIVE_UP_S:
            failed += len(open_)  # each holds a call the server did not answer
            for fd in list(open_):
                close(fd)
            break
        for fd, _ in events:
            connection = open_.get(fd)
            if connection is None:
                continue
            try:
                ended, call_failed = connection.read()
            except OSError:  # ConnectionError included: the call in flight is lost with its connection
                ended, call_failed, connection.goaway = True, True, True
            if not ended:
                continue
            took = time.perf_counter() - connection.started
            calls, failed = calls + (not call_failed), failed + call_failed
            total_s, longest_s = total_s + took, max(longest_s, took)
            if connection.goaway or took + connection.started >= deadline:
                close(fd)
                if connection.goaway and time.perf_counter() < deadline:
                    open_one()
                continue
            send(connection)
    poller.close()
    elapsed = time.perf_counter() - begin
    return {"client": "grpc_frames", "requests": calls, "requests_per_s": round(calls / elapsed, 1), "failures": failed,
            "mean_ms": round(total_s / max(calls + failed, 1) * 1000, 3), "max_ms": round(longest_s * 1000, 3),
            "connections": connections, "streams": 1}  # fmt: skip


def read_bodies(path: Path) -> list[bytes]:
    """Request bodies written one after another, each after its length in four bytes, big-endian."""
    raw, bodies, at = path.read_bytes(), [], 0
    while at < len(raw):
        size = int.from_bytes(raw[at:at + 4], "big")
        bodies.append(raw[at + 4:at + 4 + size])
        at += 4 + size
    return bodies


def write_bodies(path: Path, bodies: list[bytes]) -> None:
    path.write_bytes(b"".join(len(body).to_bytes(4, "big") + body for body in bodies))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="host:port of the gRPC port")
    parser.add_argument("--path", required=True, help="the method's path, e.g. /inference.GRPCInferenceService/ModelInfer")
    parser.add_argument("--bodies", type=Path, required=True, help="serialised requests (write_bodies' format)")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    result = run(host.strip("[]"), int(port), args.path, read_bodies(args.bodies), args.seconds, args.connections)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
