"""An open-loop HTTP/1.1 load generator cheap enough to share the server's cores.

The benchmarks' first open-loop client (``load.run_load``) is a thread a connection on ``http.client``: each request
costs it a request object, a header parser from the email package and a hand-over of the GIL between eight threads,
on the two cores the server also runs on. Its latencies hold the client's own delays, and on several workers it
could not send the rate it was asked for. This one prepares every request's bytes before the run (request line,
headers and body, as the first client sends them), and runs two threads:

- the sender sleeps until each request's scheduled time (``rate`` a second, evenly spaced), takes a connection with
  nothing in flight (waiting for one if all are busy: the wait counts in that request's latency), and sends the
  request in one ``send``;
- the receiver waits on every connection at once (epoll), reads each response until its ``content-length`` is whole,
  and frees the connection.

Each latency runs from the request's scheduled time to its response's last byte (no coordinated omission), as the
first client's do. A connection the server closes is opened again (a request in flight on it fails). Responses must
state their length (every server the benchmarks start does); one sent chunked is a failure. ``sequential`` sends one
request at a time on one connection, for the unloaded latency measured the same way.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from uembed.loadtest.load import LoadResult

READ_BYTES = 262144
DRAIN_S = 30.0  # after the last send, how long answers still in flight are waited for


def prepared_requests(host: str, bodies: list[bytes], path: str) -> list[bytes]:
    """Each body as the whole request the client sends: a POST of JSON on a kept-alive connection."""
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: "
    return [head.encode() + b"%d\r\n\r\n" % len(body) + body for body in bodies]


def response_length(buffer: bytearray) -> tuple[int, int] | None:
    """(status, the whole response's length in bytes) once its head is in ``buffer``; None before. A response without
    a ``content-length`` has status 0 (chunked replies are not read)."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buffer[:head_end]).lower()
    start = head.find(b"\r\ncontent-length:")
    if not head.startswith(b"http/1.1 ") or start < 0:
        return 0, head_end + 4
    end = head.find(b"\r\n", start + 2)
    length = int(head[start + 17 : end if end >= 0 else len(head)])
    return int(head[9:12]), head_end + 4 + length


@dataclass
class Connection:
    address: tuple[str, int]
    sock: socket.socket = field(init=False)
    buffer: bytearray = field(default_factory=bytearray)
    scheduled: float | None = None  # the request in flight's scheduled time; None: nothing in flight

    def __post_init__(self) -> None:
        self.open()

    def open(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=30)  # a send waits for room, up to the timeout
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer.clear()


def target_address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    return host, int(port)


def open_loop(url: str, bodies: list[bytes], seconds: float, rate: float, connections: int = 8,
              path: str = "/v1/score") -> LoadResult:  # fmt: skip
    """``rate`` requests a second at evenly spaced times for ``seconds``, over ``connections`` kept-alive connections
    (module docstring); a request's latency counts from its scheduled time."""
    address = target_address(url)
    requests = prepared_requests(address[0], bodies, path)
    pool = [Connection(address) for _ in range(connections)]
    by_fd = {c.sock.fileno(): c for c in pool}
    idle: queue.SimpleQueue[Connection] = queue.SimpleQueue()
    for connection in pool:
        idle.put(connection)
    latencies: list[float] = []
    failures = 0
    sending = True
    lock = threading.Lock()  # a connection's state and socket: the receiver may open it again while the sender waits
    poller = select.epoll()
    for connection in pool:
        poller.register(connection.sock.fileno(), select.EPOLLIN)
    start = time.perf_counter() + 0.05
    stop_at = start + seconds

    def reopen(connection: Connection) -> None:
        poller.unregister(by_fd.pop(connection.sock.fileno()).sock.fileno())
        connection.sock.close()
        connection.open()
        by_fd[connection.sock.fileno()] = connection
        poller.register(connection.sock.fileno(), select.EPOLLIN)

    def finish(connection: Connection, ok: bool) -> None:  # with the lock held
        nonlocal failures
        latencies.append(time.perf_counter() - connection.scheduled)
        failures += not ok
        connection.scheduled = None
        idle.put(connection)

    def receive() -> None:
        while sending or any(c.scheduled is not None for c in pool):
            if not sending and time.perf_counter() > stop_at + DRAIN_S:
                break
            for fd, _ in poller.poll(0.05):
                connection = by_fd.get(fd)
                if connection is None:
                    continue
                try:
                    data = connection.sock.recv(READ_BYTES)
                except OSError:
                    data = b""
                with lock:
                    if not data:  # the server closed it: the request in flight, if any, failed
                        in_flight = connection.scheduled is not None
                        reopen(connection)
                        if in_flight:
                            finish(connection, False)
                        continue
                    connection.buffer += data
                    parsed = response_length(connection.buffer)
                    if parsed is None or len(connection.buffer) < parsed[1] or connection.scheduled is None:
                        continue
                    status, length = parsed
                    del connection.buffer[:length]
                    if status == 0:  # a reply this client cannot read: start the connection afresh
                        reopen(connection)
                    finish(connection, status == 200)

    receiver = threading.Thread(target=receive, name="open-loop-receiver", daemon=True)
    receiver.start()
    try:
        index = 0
        while (scheduled := start + index / rate) < stop_at:
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            connection = idle.get()
            with lock:
                connection.scheduled = scheduled
                try:
                    connection.sock.sendall(requests[index % len(requests)])
                except OSError:  # a connection the server closed: the receiver opens it again
                    finish(connection, False)
            index += 1
    finally:
        sending = False
        receiver.join()
        poller.close()
        for connection in pool:
            connection.sock.close()
    return LoadResult(len(latencies), failures, time.perf_counter() - start, latencies)


def sequential(url: str, bodies: list[bytes], requests: int, path: str = "/v1/score") -> LoadResult:
    """``requests`` requests one at a time on one connection, each sent as its answer arrives: the unloaded latency,
    measured as :func:`open_loop` measures it."""
    address = target_address(url)
    prepared = prepared_requests(address[0], bodies, path)
    latencies, failures = [], 0
    started = time.perf_counter()
    with socket.create_connection(address, timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        for i in range(requests):
            sent = time.perf_counter()
            sock.sendall(prepared[i % len(prepared)])
            while (parsed := response_length(buffer)) is None or len(buffer) < parsed[1]:
                data = sock.recv(READ_BYTES)
                if not data:
                    raise ConnectionError("the server closed the connection")
                buffer += data
            latencies.append(time.perf_counter() - sent)
            failures += parsed[0] != 200
            del buffer[: parsed[1]]
    return LoadResult(requests, failures, time.perf_counter() - started, latencies)
