"""An open-loop HTTP/1.1 load generator cheap enough to share the server's cores.

The benchmarks' first open-loop client (``load.run_load``) is a thread a connection on ``http.client``: each request
costs it a request object, a header parser from the email package and a hand-over of the GIL between eight threads,
on the two cores the server also runs on. Its latencies hold the client's own delays, and on several workers it
could not send the rate it was asked for. This one prepares every request's bytes before the run (request line,
headers and body, as the first client sends them), and runs two threads:

- the sender sleeps until each request's scheduled time (``rate`` a second, evenly spaced), takes a connection with
  nothing in flight (waiting for one if all are busy: the wait counts in that request's latency), and writes the
  request whole;
- the receiver waits on every connection at once (epoll), reads each response until its ``content-length`` is whole,
  and frees the connection.

Each latency runs from the request's scheduled time to its response's last byte (no coordinated omission), as the
first client's do, failures' included. A request is a failure when its answer is not 200, when the server closes the
connection before answering (the connection is opened again), when no answer comes within ``REQUEST_TIMEOUT_S``,
and when it is still unanswered ``DRAIN_S`` after the last send; requests never sent because no connection came free
within ``REQUEST_TIMEOUT_S`` (a server that stopped answering) are failures without a latency. Responses must state
their length (every server the benchmarks start does): one that does not (chunked, 1xx, HTTP/1.0) is a failure and
its connection is opened again. ``sequential`` sends one request at a time on one connection, for the unloaded
latency measured the same way.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from uembed.loadtest.results import LoadResult

READ_BYTES = 262144
REQUEST_TIMEOUT_S = 30.0
DRAIN_S = 30.0  # after the last send, how long answers still in flight are waited for
POLL_S = 0.05  # the receiver's longest wait, between checks for requests past their timeout and for the end


def prepared_requests(host: str, bodies: list[bytes], path: str) -> list[bytes]:
    """Each body as the whole request the client sends: a POST of JSON on a kept-alive connection."""
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: "
    return [head.encode() + b"%d\r\n\r\n" % len(body) + body for body in bodies]


def header_value(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in a lower-cased response head, or None."""
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    end = head.find(b"\r\n", start + 2)
    return head[start + len(name) + 3 : end if end >= 0 else len(head)].strip()


def response_length(buffer: bytearray) -> tuple[int, int, bool] | None:
    """(status, the whole response's length in bytes, whether it ends its connection: ``connection: close``) once
    its head is in ``buffer``; None before. A response this client does not read (no ``content-length``, or not
    HTTP/1.1) has status 0."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buffer[:head_end]).lower()
    length = header_value(head, b"content-length")
    if not head.startswith(b"http/1.1 ") or length is None or not length.isdigit():
        return 0, head_end + 4, True
    closes = b"close" in [token.strip() for token in (header_value(head, b"connection") or b"").split(b",")]
    return int(head[9:12]), head_end + 4 + int(length), closes


def target_address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    return host, int(port)


@dataclass
class Connection:
    address: tuple[str, int]
    sock: socket.socket | None = field(default=None, init=False)  # None: it could not be opened again
    buffer: bytearray = field(default_factory=bytearray)
    token: int | None = None  # the request in flight's index; None: nothing in flight
    scheduled: float = 0.0  # the request in flight's scheduled time

    def open(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=REQUEST_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Non-blocking: with a timeout, Python waits for data before each recv (a peek or a stale event would wait)
        self.sock.setblocking(False)
        self.buffer.clear()


def send_whole(sock: socket.socket, data: bytes, timeout_s: float) -> None:
    """Write all of ``data`` to a non-blocking socket, waiting for room as needed for up to ``timeout_s``."""
    view, deadline = memoryview(data), time.monotonic() + timeout_s
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            pass
        if view and not select.select([], [sock], [], max(0.0, deadline - time.monotonic()))[1]:
            raise TimeoutError(f"no room to send for {timeout_s} s")


class OpenLoop:
    """One run of :func:`open_loop`: the connections, their poller and what was measured. A connection's socket and
    state change only under ``lock``; the sender writes outside it, on the socket it took."""

    def __init__(self, address: tuple[str, int], connections: int) -> None:
        self.lock = threading.Lock()
        self.poller = select.epoll()
        self.by_fd: dict[int, Connection] = {}
        self.idle: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self.latencies: list[float] = []
        self.failures = 0
        self.unsent = 0  # requests never sent: no connection could be had for them (failures without a latency)
        self.expired_at = 0.0  # when requests past their timeout were last looked for
        self.pool = [Connection(address) for _ in range(connections)]
        for connection in self.pool:
            self.reopen(connection)
            self.idle.put(connection)

    def reopen(self, connection: Connection) -> bool:
        """(Under the lock, or before the run.) A fresh socket for ``connection``; False where none could be opened."""
        if connection.sock is not None:
            self.by_fd.pop(connection.sock.fileno(), None)
            self.poller.unregister(connection.sock.fileno())
            connection.sock.close()
            connection.sock = None
        try:
            connection.open()
        except OSError:
            return False
        self.by_fd[connection.sock.fileno()] = connection
        self.poller.register(connection.sock.fileno(), select.EPOLLIN)
        return True

    def finish(self, connection: Connection, ok: bool, fresh: bool = False) -> None:
        """(Under the lock.) The request in flight on ``connection`` ends; ``fresh``: open the connection again first
        (its stream holds bytes of no request's, or none). The connection is free again unless it cannot be opened."""
        self.latencies.append(time.perf_counter() - connection.scheduled)
        self.failures += not ok
        connection.token = None
        if (fresh and not self.reopen(connection)) or connection.sock is None:
            return  # lost: the sender's wait for a free connection is bounded
        self.idle.put(connection)

    def send(self, connection: Connection, index: int, scheduled: float, request: bytes) -> None:
        with self.lock:
            # a connection the server closed since its last answer (keep-alive's end, `connection: close`), or one
            # the receiver could not open again, is opened afresh first
            if (connection.sock is None or self.closed_by_server(connection.sock)) and not self.reopen(connection):
                self.unsent += 1
                return
            sock = connection.sock
            connection.token, connection.scheduled = index, scheduled
        try:
            send_whole(sock, request, REQUEST_TIMEOUT_S)
        except (OSError, ValueError):  # ValueError: the receiver closed the socket meanwhile
            with self.lock:
                if connection.token == index:  # not already ended by the receiver
                    self.finish(connection, False, fresh=True)

    @staticmethod
    def closed_by_server(sock: socket.socket) -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def receive_ready(self) -> None:
        for fd, _ in self.poller.poll(POLL_S):
            connection = self.by_fd.get(fd)
            sock = connection.sock if connection else None
            if sock is None:
                continue
            try:
                data = sock.recv(READ_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            with self.lock:
                if connection.sock is not sock:  # opened again meanwhile: this was the old socket's
                    continue
                if not data or connection.token is None:  # closed by the server, or bytes no request asked for
                    if connection.token is not None:
                        self.finish(connection, False, fresh=True)
                    else:  # a free connection: the sender opens it again if this cannot
                        self.reopen(connection)
                    continue
                connection.buffer += data
                parsed = response_length(connection.buffer)
                if parsed is None or len(connection.buffer) < parsed[1]:
                    continue
                status, length, closes = parsed
                del connection.buffer[:length]
                # a connection the server ends after this response is opened afresh now: sent on before the server's
                # close arrived, the next request would be lost with it
                self.finish(connection, status == 200, fresh=status == 0 or closes or bool(connection.buffer))

    def expire(self, older_than: float) -> None:
        """(Under the lock.) Requests scheduled before ``older_than`` and still unanswered fail."""
        self.expired_at = time.perf_counter()
        for connection in self.pool:
            if connection.token is not None and connection.scheduled < older_than:
                self.finish(connection, False, fresh=True)

    def in_flight(self) -> bool:
        return any(connection.token is not None for connection in self.pool)

    def close(self) -> None:
        self.poller.close()
        for connection in self.pool:
            if connection.sock is not None:
                connection.sock.close()


def open_loop(url: str, bodies: list[bytes], seconds: float, rate: float, connections: int = 8,
              path: str = "/v1/score") -> LoadResult:  # fmt: skip
    """``rate`` requests a second at evenly spaced times for ``seconds``, over ``connections`` kept-alive connections
    (module docstring); a request's latency counts from its scheduled time."""
    if rate <= 0 or connections < 1:
        raise ValueError(f"an open loop needs a rate above 0 and a connection (rate={rate}, connections={connections})")
    address = target_address(url)
    requests = prepared_requests(address[0], bodies, path)
    run = OpenLoop(address, connections)
    sending = True
    last_send = time.perf_counter()
    start = last_send + 0.05
    stop_at = start + seconds

    def receive() -> None:
        while sending or (run.in_flight() and time.perf_counter() < last_send + DRAIN_S):
            run.receive_ready()
            if time.perf_counter() - run.expired_at > POLL_S:
                with run.lock:
                    run.expire(time.perf_counter() - REQUEST_TIMEOUT_S)

    receiver = threading.Thread(target=receive, name="open-loop-receiver", daemon=True)
    receiver.start()
    try:
        index = 0
        while (scheduled := start + index / rate) < stop_at:
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                connection = run.idle.get(timeout=REQUEST_TIMEOUT_S + 2 * POLL_S)
            except queue.Empty:  # every connection lost: the rest are not sent
                while start + index / rate < stop_at:
                    run.unsent += 1
                    index += 1
                break
            run.send(connection, index, scheduled, requests[index % len(requests)])
            last_send = time.perf_counter()
            index += 1
    finally:
        sending = False
        receiver.join()
        with run.lock:
            run.expire(float("inf"))  # unanswered DRAIN_S after the last send
        run.close()
    return LoadResult(len(run.latencies) + run.unsent, run.failures + run.unsent, time.perf_counter() - start, run.latencies)


def sequential(url: str, bodies: list[bytes], requests: int, path: str = "/v1/score") -> LoadResult:
    """``requests`` requests one at a time on one connection, each sent as its answer arrives: the unloaded latency,
    measured as :func:`open_loop` measures it."""
    address = target_address(url)
    prepared = prepared_requests(address[0], bodies, path)
    latencies, failures = [], 0

    def connected() -> socket.socket:
        sock = socket.create_connection(address, timeout=REQUEST_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    started = time.perf_counter()
    sock = connected()
    try:
        buffer = bytearray()
        for i in range(requests):
            sent = time.perf_counter()
            sock.sendall(prepared[i % len(prepared)])
            while (parsed := response_length(buffer)) is None or len(buffer) < parsed[1]:
                data = sock.recv(READ_BYTES)
                if not data:
                    raise ConnectionError("the server closed the connection")
                buffer += data
            if parsed[0] == 0:
                raise ConnectionError(f"a response this client does not read: {bytes(buffer[:200])!r}")
            latencies.append(time.perf_counter() - sent)
            failures += parsed[0] != 200
            del buffer[: parsed[1]]
            if parsed[2]:  # the server ends the connection after this response: the next request goes on a new one
                sock.close()
                sock, buffer = connected(), bytearray()
    finally:
        sock.close()
    return LoadResult(requests, failures, time.perf_counter() - started, latencies)
