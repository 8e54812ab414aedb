"""An open-loop HTTP/1.1 load generator in wrk2's shape: one thread, requests sent at evenly spaced times whatever
the replies do, each reply's latency counted from its request's scheduled time (no coordinated omission).

The peers bench's half-load client until now was ``load.run_load``: eight Python threads, each sleeping to its next
time and sending with ``http.client``. Against a server that answers at once it alone gave a p99 of about 0.75 ms at
1,800 requests/s (a reply waits for its thread to get the interpreter back), and its threads' bursts of work take
the core the server runs on now and then. This client is one thread: the next send time is a ``timerfd`` (timer
slack set to a microsecond), every socket and the timer are waited on in one ``epoll``, and a reply is timed when
its last byte is read. A request is the next of a list of bodies, prepared whole before the run; it goes out on an
idle keep-alive connection, and when none is idle it waits (its wait counted in its latency, and in
``waited_for_a_connection``): give it enough connections.

``--rate 0`` sends one request at a time on one connection, the next when the last reply is read: the unloaded
latency, by the same client.

Run as its own process (``python -m uembed.loadtest.http_open``): its CPU is the client's, as wrk's is.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import select
import socket
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from uembed.loadtest.grpc_frames import read_bodies

GIVE_UP_S = 10.0  # after the last scheduled send, how long replies still in flight are waited for
READ_BYTES = 65536
CLOCK_MONOTONIC, TFD_NONBLOCK, TFD_CLOEXEC, TFD_TIMER_ABSTIME = 1, 0o4000, 0o2000000, 1
PR_SET_TIMERSLACK = 29


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class SendTimer:
    """A timerfd on CLOCK_MONOTONIC (``time.monotonic``'s clock) set to absolute times: epoll wakes at each, to the
    microsecond (the thread's timer slack lowered), where ``epoll.poll``'s own timeout counts whole milliseconds."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.libc.prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)  # nanoseconds
        self.fd = self.libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")

    def at(self, when: float) -> None:
        """Fire once at ``when`` (``time.monotonic()`` seconds); a time already past fires at once."""
        seconds = max(when, 1e-9)
        value = _Itimerspec(_Timespec(0, 0), _Timespec(int(seconds), int((seconds % 1) * 1e9) or 1))
        if self.libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(value), None) < 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class Connection:
    """A keep-alive HTTP/1.1 connection with at most one request in flight. A reply must say its Content-Length (the
    service's and its peers' do); a chunked one ends the run with an error rather than being timed wrong."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer = bytearray()
        self.scheduled: float | None = None  # the scheduled time of the request in flight

    def send(self, request: bytes, scheduled: float) -> None:
        self.scheduled = scheduled
        view = memoryview(request)
        while view:  # a request fits the socket's buffer at once but for the largest bodies: wait for room then
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                select.select([], [self.sock], [], GIVE_UP_S)

    def read(self) -> tuple[int, float] | None:
        """Read what arrived: the reply's status and its request's scheduled time once the reply is whole, else
        None. Raises ConnectionError when the server closed the connection."""
        chunk = self.sock.recv(READ_BYTES)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise ValueError(f"a reply without Content-Length: {bytes(self.buffer[:200])!r}")
        length = int(head[at + 17:].split(b"\r\n", 1)[0])
        if len(self.buffer) < end + 4 + length:
            return None
        del self.buffer[: end + 4 + length]
        scheduled, self.scheduled = self.scheduled, None
        return int(head[9:12]), scheduled


def request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def run(host: str, port: int, path: str, bodies: list[bytes], seconds: float, rate: float, connections: int) -> dict:
    """Requests at ``rate`` a second for ``seconds`` over up to ``connections`` keep-alive connections (``rate`` 0:
    one at a time on one connection); each reply's latency from its scheduled time. A reply other than 200, or one a
    lost connection or the give-up leaves unanswered, is a failure."""
    if not bodies:
        raise ValueError("no request bodies to send")
    if rate < 0 or connections < 1 or seconds <= 0:
        raise ValueError("rate must be 0 or more, connections at least 1, seconds more than 0")
    requests = [request_bytes(host, port, path, body) for body in bodies]
    closed_loop = rate == 0
    poller = select.epoll()
    timer = SendTimer()
    poller.register(timer.fd, select.EPOLLIN)
    idle: deque[Connection] = deque()
    open_: dict[int, Connection] = {}
    waiting: deque[float] = deque()  # scheduled times of requests with no idle connection yet
    latencies: list[float] = []
    failures = waited = sent = 0

    def connect() -> Connection:
        connection = Connection(host, port)
        open_[connection.sock.fileno()] = connection
        poller.register(connection.sock.fileno(), select.EPOLLIN)
        return connection

    def lose(connection: Connection) -> None:
        nonlocal failures
        failures += connection.scheduled is not None
        fd = connection.sock.fileno()
        poller.unregister(fd)
        open_.pop(fd)
        connection.sock.close()

    def send(scheduled: float) -> None:
        nonlocal sent
        connection = idle.popleft() if idle else connect()
        connection.send(requests[sent % len(requests)], scheduled)
        sent += 1

    for _ in range(1 if closed_loop else connections):
        idle.append(connect())
    cpu = time.process_time()
    begin = time.monotonic() + 0.01
    stop_at = begin + seconds
    scheduled_count = 0
    next_send = begin
    timer.at(next_send)
    while True:
        now = time.monotonic()
        in_flight = sum(c.scheduled is not None for c in open_.values())
        if now >= stop_at and not waiting and not in_flight:
            break
        if now >= stop_at + GIVE_UP_S:
            failures += len(waiting) + in_flight
            break
        for fd, _ in poller.poll(-1 if now < stop_at else 0.1):  # till the run's end the timer wakes the loop
            if fd == timer.fd:
                timer.clear()
                now = time.monotonic()
                while next_send <= now and next_send < stop_at:
                    waited += not idle and len(open_) >= connections
                    waiting.append(next_send)
                    scheduled_count += 1
                    next_send = float("inf") if closed_loop else begin + scheduled_count / rate
                timer.at(min(next_send, stop_at))  # at the end too: the loop wakes to find the run over
                continue
            connection = open_.get(fd)
            if connection is None:
                continue
            try:
                reply = connection.read()
            except OSError:
                lose(connection)
                if closed_loop and time.monotonic() < stop_at:
                    waiting.append(time.monotonic())
                continue
            if reply is None:
                continue
            status, scheduled = reply
            done = time.monotonic()
            latencies.append(done - scheduled)
            failures += status != 200
            idle.append(connection)
            if closed_loop and done < stop_at:
                waiting.append(done)
        while waiting and (idle or len(open_) < connections):
            send(waiting.popleft())
    elapsed = time.monotonic() - begin
    for connection in list(open_.values()):
        connection.sock.close()
    poller.close()
    timer.close()
    values = np.asarray(latencies) * 1000
    percentiles = {f"p{q}_ms": round(float(np.percentile(values, q)), 3) for q in (50, 95, 99)} if len(values) else {}
    return {"client": "http_open", "requests": len(latencies), "failures": failures,
            "requests_per_s": round(len(latencies) / elapsed, 1), **percentiles,
            "max_ms": round(float(values.max()), 3) if len(values) else None, "offered_per_s": rate or None,
            "connections": connections if not closed_loop else 1, "waited_for_a_connection": waited,
            "client_cpu_s": round(time.process_time() - cpu, 4)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="http://host:port of the service")
    parser.add_argument("--path", default="/v1/score")
    parser.add_argument("--bodies", type=Path, required=True, help="request bodies (grpc_frames.write_bodies' format)")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests a second; 0: one at a time")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    host, _, port = args.url.removeprefix("http://").rpartition(":")
    print(json.dumps(run(host.strip("[]"), int(port), args.path, read_bodies(args.bodies), args.seconds, args.rate,
                         args.connections)))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
