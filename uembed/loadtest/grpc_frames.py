"""A closed-loop gRPC load generator in wrk's shape: one thread, ``connections`` HTTP/2 connections, one unary call
in flight on each, every call the next of a list of request bodies (as ``peers.WRK_SCRIPT`` sends REST v1's); with
``--rate``, an open loop of the same calls at evenly spaced times (:func:`run_open`).

h2load, the compiled HTTP/2 load generator, sends one body a run: so either every call in flight carries the same
request, or (the peers bench until now) each connection is its own h2load process, and the calls a reply wakes
arrive spread over sixteen processes' wake-ups. Neither is what wrk gives REST v1. This client is: each call's frames
are prepared before the run (the header block HPACK-encoded once, without indexing, so the same bytes serve every
stream; each body framed), and a call costs one ``send`` of its frames (DATA split at 16 KiB and held to the server's
flow-control windows), and the reply's frames are read until its trailers (HEADERS with END_STREAM). It advertises
the largest flow-control windows for the replies at the start (the connection's opened again after each GiB read),
answers SETTINGS and PING, and opens a new connection when the server ends one (GOAWAY, after its call in flight). It does not decode the server's headers: which calls the server
answered OK is checked against the server's own count by status (``peers.checked_by_server``).

Run as its own process (``python -m uembed.loadtest.grpc_frames``): its CPU is the client's, as wrk's is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import select
import socket
import struct
import sys
import time
from collections import deque
from pathlib import Path

from uembed.loadtest.results import LoadResult

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_ENABLE_PUSH = 0x4, 0x2
LARGEST_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
MAX_FRAME_BYTES = 16384  # the least SETTINGS_MAX_FRAME_SIZE a server may set, and its default
REOPEN_AFTER_BYTES = 2**30
CONNECT_TIMEOUT_S = 5.0
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
    """One HTTP/2 connection carrying one call at a time. A message is sent in DATA frames of at most the protocol's
    smallest maximum frame size, as the server's flow-control windows (the connection's and the stream's) allow: what
    they do not, waits for the server's WINDOW_UPDATE."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)  # a stalled server: no hang
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.next_stream = 1
        self.in_flight: int | None = None  # the stream of the call in flight
        self.started = 0.0
        self.goaway = False
        self.send_window = DEFAULT_WINDOW  # the connection's, as the server opens it
        self.stream_window = self.initial_window = DEFAULT_WINDOW  # the stream in flight's; until the server's SETTINGS say
        self.unsent = memoryview(b"")  # the message's bytes the windows have held back
        self.received = 0  # DATA bytes since the connection's window was last opened again
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, LARGEST_WINDOW) + struct.pack(">HI", SETTINGS_ENABLE_PUSH, 0)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings)
                          + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", LARGEST_WINDOW - DEFAULT_WINDOW)))  # fmt: skip

    def send_call(self, headers: bytes, message: bytes) -> None:
        stream = self.next_stream
        self.next_stream += 2
        self.in_flight, self.started = stream, time.perf_counter()
        self.stream_window = self.initial_window
        size = len(message)
        if size <= MAX_FRAME_BYTES and size <= self.send_window and size <= self.stream_window:  # one frame, sent whole
            self.send_window -= size
            self.stream_window -= size
            self.sock.sendall(frame(HEADERS, END_HEADERS, stream, headers) + frame(DATA, END_STREAM, stream, message))
            return
        self.unsent = memoryview(message)
        self.sock.sendall(frame(HEADERS, END_HEADERS, stream, headers) + self._data_frames())

    def _data_frames(self) -> bytes:
        """The DATA frames of the message's unsent bytes that the windows allow, the last with END_STREAM."""
        frames = []
        while self.unsent:
            size = min(len(self.unsent), MAX_FRAME_BYTES, self.send_window, self.stream_window)
            if size <= 0:
                break
            chunk, self.unsent = self.unsent[:size], self.unsent[size:]
            self.send_window -= size
            self.stream_window -= size
            frames.append(frame(DATA, 0 if self.unsent else END_STREAM, self.in_flight, chunk))
        return b"".join(frames)

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
            if kind == DATA:
                self.received += size
            if kind == WINDOW_UPDATE:
                increment = int.from_bytes(view[start:start + 4], "big") & 0x7FFFFFFF
                if stream == 0:
                    self.send_window += increment
                elif stream == self.in_flight:
                    self.stream_window += increment
            elif stream and stream == self.in_flight:
                if (kind == HEADERS and flags & END_STREAM) or kind == RST_STREAM or (kind == DATA and flags & END_STREAM):
                    ended, failed = True, kind == RST_STREAM
                    self.in_flight, self.unsent = None, memoryview(b"")
            elif kind == SETTINGS and not flags & ACK:
                for offset in range(start, at - 5, 6):
                    if int.from_bytes(view[offset:offset + 2], "big") == SETTINGS_INITIAL_WINDOW_SIZE:
                        value = int.from_bytes(view[offset + 2:offset + 6], "big")
                        self.stream_window += value - self.initial_window  # RFC 9113 6.9.2: open streams move by the change
                        self.initial_window = value
                replies.append(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                replies.append(frame(PING, ACK, 0, bytes(view[start:at])))
            elif kind == GOAWAY:
                self.goaway = True
                last = int.from_bytes(view[start:start + 4], "big") & 0x7FFFFFFF
                if self.in_flight is not None and self.in_flight > last:  # not served: counted failed
                    ended, failed = True, True
                    self.in_flight, self.unsent = None, memoryview(b"")
        del view[:at]
        if self.received >= REOPEN_AFTER_BYTES:  # the window opened at the start, opened again long before it closes
            replies.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
            self.received = 0
        if self.unsent and self.in_flight is not None:
            replies.append(self._data_frames())
        if replies:
            self.sock.sendall(b"".join(replies))
        return ended, failed

    def close(self) -> None:
        self.sock.close()


GIVE_UP_S = 30.0  # after the deadline, how long the calls still in flight are waited for before they count as failed


def prepared_calls(host: str, port: int, path: str, bodies: list[bytes]) -> tuple[bytes, list[bytes]]:
    """The header block every call sends, and each body as a gRPC message (uncompressed, its length before it)."""
    if not bodies:
        raise ValueError("no request bodies to send")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return header_block(authority, path), [b"\x00" + len(body).to_bytes(4, "big") + body for body in bodies]


def run(host: str, port: int, path: str, bodies: list[bytes], seconds: float, connections: int) -> dict:
    """Closed-loop calls until ``seconds`` pass: each connection sends its next call when its last one ends. A call
    the server resets, or that a lost connection or GOAWAY leaves unanswered, is a failure; its connection is opened
    again while the run lasts. The client's own CPU time is in the result (``client_cpu_s``), its start left out."""
    headers, messages = prepared_calls(host, port, path, bodies)
    poller = select.epoll()
    open_: dict[int, Connection] = {}
    calls = failed = sent = 0
    total_s = longest_s = 0.0

    def send(connection: Connection) -> bool:
        """The connection's next call; False (the call counted failed, the connection closed) where it is lost."""
        nonlocal sent, failed
        try:
            connection.send_call(headers, messages[sent % len(messages)])
        except OSError:
            failed += 1
            close(connection.sock.fileno())
            return False
        finally:
            sent += 1
        return True

    def open_one() -> None:
        connection = Connection(host, port)
        open_[connection.sock.fileno()] = connection
        poller.register(connection.sock.fileno(), select.EPOLLIN)
        send(connection)

    def close(fd: int) -> None:
        poller.unregister(fd)
        open_.pop(fd).close()

    cpu = time.process_time()
    begin = time.perf_counter()
    deadline = begin + seconds
    for _ in range(connections):
        open_one()
    while open_:
        events = poller.poll(1.0)
        if time.perf_counter() > deadline + GIVE_UP_S:
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
            if not call_failed:
                total_s, longest_s = total_s + took, max(longest_s, took)
            if connection.goaway or took + connection.started >= deadline:
                close(fd)
                if connection.goaway and time.perf_counter() < deadline:
                    open_one()
                continue
            if not send(connection) and time.perf_counter() < deadline:
                open_one()
    poller.close()
    elapsed = time.perf_counter() - begin
    return {"client": "grpc_frames", "requests": calls, "requests_per_s": round(calls / elapsed, 1), "failures": failed,
            "mean_ms": round(total_s / max(calls, 1) * 1000, 3), "max_ms": round(longest_s * 1000, 3),
            "connections": connections, "streams": 1, "client_cpu_s": round(time.process_time() - cpu, 4)}  # fmt: skip


def run_open(host: str, port: int, path: str, bodies: list[bytes], seconds: float, connections: int, rate: float) -> dict:
    """Open-loop calls: ``rate`` a second at evenly spaced times for ``seconds``, each the next request, sent on a
    free connection (one call in flight on each). A call's latency counts from its scheduled time, so a call that
    waited for a free connection (the server behind) counts the wait; ``send_lag_p99_ms`` says how late the sends
    went. Every call scheduled within the run is sent, late where it must wait, unless every connection is lost or
    ``GIVE_UP_S`` pass after the run: those never sent fail. A call the server resets or a lost connection leaves
    unanswered fails (its connection opened again), as do those still unanswered ``GIVE_UP_S`` after the run. The
    wait for the next send is ``select``'s, in microseconds (epoll's is whole milliseconds, as long as a gap here)."""
    if rate <= 0 or connections < 1:
        raise ValueError(f"an open loop needs a rate above 0 and a connection (rate={rate}, connections={connections})")
    headers, messages = prepared_calls(host, port, path, bodies)
    pool = [Connection(host, port) for _ in range(connections)]
    free = deque(pool)
    scheduled_at: dict[Connection, float] = {}
    latencies: list[float] = []
    lags: list[float] = []
    failed = index = 0

    def replace(connection: Connection) -> None:
        """A lost or ended connection's place taken by a new one while calls are still to be sent (none while the
        server refuses)."""
        pool.remove(connection)
        if connection in free:
            free.remove(connection)
        connection.close()
        if index >= count:
            return
        with contextlib.suppress(OSError):
            fresh = Connection(host, port)
            pool.append(fresh)
            free.append(fresh)

    cpu = time.process_time()
    begin = time.perf_counter()
    count = math.ceil(seconds * rate)  # the calls scheduled within the run: begin + i / rate < begin + seconds
    while index < count or scheduled_at:
        now = time.perf_counter()
        if not pool:  # every connection lost and none opened again (or none needed): nothing more can be sent
            failed += count - index
            break
        if now > begin + seconds + GIVE_UP_S:
            failed += len(scheduled_at) + count - index  # unanswered, and never sent
            break
        while index < count and free and begin + index / rate <= now:
            connection, scheduled = free.popleft(), begin + index / rate
            try:
                connection.send_call(headers, messages[index % len(messages)])
            except OSError:
                failed += 1
                replace(connection)
            else:
                scheduled_at[connection] = scheduled
                lags.append(time.perf_counter() - scheduled)
            index += 1
        wait = begin + index / rate - time.perf_counter() if index < count and free else 1.0
        readable, _, _ = select.select([c.sock for c in pool], [], [], min(max(wait, 0.0), 1.0))
        by_socket = {c.sock: c for c in pool}
        for sock in readable:
            connection = by_socket[sock]
            try:
                ended, call_failed = connection.read()
            except OSError:  # ConnectionError included: a call in flight is lost with its connection
                ended, call_failed, connection.goaway = connection in scheduled_at, True, True
            if ended:
                scheduled = scheduled_at.pop(connection)
                failed += call_failed
                if not call_failed:
                    latencies.append(time.perf_counter() - scheduled)
            if connection.goaway:
                if connection not in scheduled_at:  # its call in flight (if any) answered: the new one takes its place
                    replace(connection)
            elif ended:
                free.append(connection)
    elapsed = time.perf_counter() - begin
    for connection in pool:
        connection.close()
    lags.sort()
    figures = LoadResult(len(latencies), failed, elapsed, latencies).summary()
    return {"client": "grpc_frames", **figures, "offered_per_s": rate, "connections": connections,
            "send_lag_p99_ms": round(lags[int(0.99 * (len(lags) - 1))] * 1000, 3) if lags else None,
            "client_cpu_s": round(time.process_time() - cpu, 4)}  # fmt: skip


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
    parser.add_argument("--rate", type=float, help="calls a second at evenly spaced times (an open loop); "
                        "default: a closed loop, a call in flight on each connection")  # fmt: skip
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if args.rate is not None:
        result = run_open(host.strip("[]"), int(port), args.path, read_bodies(args.bodies), args.seconds, args.connections, args.rate)
    else:
        result = run(host.strip("[]"), int(port), args.path, read_bodies(args.bodies), args.seconds, args.connections)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
