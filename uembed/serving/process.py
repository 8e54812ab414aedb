"""The server process around the app (``uembed serve``): who owns the gRPC port, how long a connection may take
to send its request head, and when the listening socket closes.

- **One gRPC socket, every worker accepting on it.** With several workers the server (their parent) binds the
  gRPC port itself, *without* SO_REUSEPORT, and hands that socket to its workers with uvicorn's configuration
  (:class:`ServiceConfig`), as uvicorn hands them the HTTP socket; the workers listen on it once their gRPC server
  starts (a connection before then is refused, not queued unanswered). The workers' event loop spreads a client's
  gRPC connections evenly over them, as it spreads HTTP ones (``accepts.py``); with a socket a worker
  (SO_REUSEPORT) the kernel picked a worker by each connection's addresses, blind to load. A lock named after the
  port (an abstract socket name, one per network namespace) comes first: another server's start finds the port
  taken and stops with a one-line message. With one worker, or ``UEMBED_GRPC_SERVER=grpcio`` (grpcio's server binds
  the port in each worker with SO_REUSEPORT), the server only claims the port: the lock, and a socket bound without
  SO_REUSEPORT that only then sets it (its own workers may bind beside it; no other server may) and never listens.
  Under a plain ``uvicorn --workers N`` nothing is handed down: each worker binds the port with SO_REUSEPORT.
- **A request head within header_timeout_s.** uvicorn closes idle keep-alive connections, but not one that sent
  part of a request line or headers: enough of those fill ``max_connections`` and every new request gets 503.
  :class:`HeadDeadlineProtocol` closes a connection that has no request in flight when its deadline passes.
- **One send a response.** uvicorn writes a response's status line and headers, then its body: two sends, each a
  system call and a wake-up of the client. :class:`HeadDeadlineProtocol` coalesces a connection's writes a turn of
  the event loop (:class:`~uembed.serving.protocols.writes.CoalescedWrites`), as the gRPC port does.
  ``uvicorn --http uembed.serving.process:ServiceHttpProtocol`` runs the same protocol (the benchmarks do).
- **The fast lane.** A ``POST /v1/score`` whose head allows it is answered by the protocol itself once its body is
  whole, without the ASGI stack (:class:`~uembed.serving.protocols.fast_lane.FastScoreLane`, found on the app's
  state); anything else, and a body the lane would not take, is uvicorn's request task as before.
- **SIGTERM closes the listening socket first.** With several workers the parent binds the HTTP socket and each
  worker accepts on a copy; uvicorn's parent keeps its copy listening while the workers drain, so new connections
  are accepted into the backlog, then reset when it exits. :class:`ClosingMultiprocess` closes the parent's copy
  as the signal arrives: once the workers close theirs, new connections are refused while requests in flight
  finish.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import functools
import os
import socket
import time

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from uembed.contract.errors import UembedError
from uembed.serving.protocols.disconnect import ABANDONED
from uembed.serving.protocols.fast_lane import FastScoreLane
from uembed.serving.protocols.http2 import hand_down_listener
from uembed.serving.protocols.lean_json import SCORE_PATH
from uembed.serving.protocols.render import CLIENT_CLOSED
from uembed.serving.protocols.writes import CoalescedWrites
from uembed.serving.settings import load_settings


def claim_port(host: str, port: int, move_hint: str, *, shared: bool) -> list[socket.socket]:
    """Claim ``host:port`` for this process and its workers (module docstring); keep the sockets open as long as
    the server runs. ``shared``: the last socket is bound, not listening, for the workers to listen and accept on
    (:class:`ServiceConfig`); else the claim only holds the port, for workers that bind it with SO_REUSEPORT. A port
    held by anything else is a one-line :class:`UembedError` naming it and ``move_hint``."""
    # A lock on the port in the network namespace's abstract socket names: exclusive, released with the process,
    # and shared by exactly the processes that share the port's namespace. Without it, two servers' claims (bound
    # with SO_REUSEADDR, so that connections in TIME_WAIT after a restart do not block them) could both succeed
    # before either listens.
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    claims = [lock]
    try:
        lock.bind(f"\0uembed-port-{host}-{port}")
        if shared:  # one socket, bound as each worker's gRPC listener would bind its own, without SO_REUSEPORT
            claim = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            claims.append(claim)
            claim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if host == "::":  # every address, IPv4 ones too
                claim.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            claim.bind((host, port))
            return claims
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            claim = socket.socket(family, kind, proto)
            claims.append(claim)
            claim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            claim.bind(address)  # without SO_REUSEPORT: fails while a socket listens on the port or holds it alone
            claim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # now this server's workers may bind beside it
    except OSError as exc:
        for held in claims:
            held.close()
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        held_by = ": another server holds it" if exc.errno == errno.EADDRINUSE else ""
        raise UembedError(f"port {port} on {host} is taken ({why}){held_by}; {move_hint}") from None
    return claims


class ServiceConfig(uvicorn.Config):
    """uvicorn's configuration, carrying the gRPC socket the server bound (``grpc_socket``, with the address the
    settings name) to the workers. Each spawned worker unpickles its copy of the configuration, the socket duplicated
    into it as uvicorn's HTTP sockets are; loading the configuration hands the socket to the worker's gRPC listener."""

    def __init__(self, *args, grpc_socket: socket.socket | None = None, grpc_address: tuple[str, int] | None = None,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.grpc_socket, self.grpc_address = grpc_socket, grpc_address

    def load(self) -> None:
        if self.grpc_socket is not None:
            hand_down_listener(*self.grpc_address, self.grpc_socket)
        super().load()


# The event loop `uembed serve` runs its workers on: uvicorn's, accepting on the shared HTTP socket so that
# connections spread evenly over the workers (uembed/serving/accepts.py).
BALANCED_LOOP = "uembed.serving.accepts:BalancedLoop"

# uvicorn's answer to an app that fails before its response (its connection: close is added as the cycle ends)
INTERNAL_ERROR_HEADERS = ((b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"))


def no_response() -> None:
    """A lane request's callback once its response is done (``_lane_answer``)."""


def fast_lane_of(app) -> FastScoreLane | None:
    """The fast lane on the state of the app uvicorn serves, through the middlewares uvicorn wraps it in."""
    for _ in range(8):
        lane = getattr(getattr(app, "state", None), "fast_lane", None)
        if lane is not None or not hasattr(app, "app"):
            return lane
        app = app.app
    return None


class HeadDeadlineProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, closing a connection that has not sent a whole request head within
    ``head_timeout_s`` of opening or of its last response, sending each response in one write, and answering the
    fast lane's requests (give it to uvicorn as ``functools.partial(HeadDeadlineProtocol, head_timeout_s=...)``)."""

    def __init__(self, *args, head_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self.head_deadline: asyncio.TimerHandle | None = None
        # The lane's hooks are httptools' protocol's; without httptools uvicorn runs h11, and every request its task.
        self.lane = fast_lane_of(self.app) if isinstance(self, HttpToolsProtocol) else None
        self.lane_waiting: tuple | None = None  # (cycle, app, started) of a lane request whose body is not whole yet
        self.lane_deadline: asyncio.TimerHandle | None = None
        self.lane_task: asyncio.Task | None = None
        self.lane_started = False  # whether lane_task has taken its first step (a task cancelled before it never runs)

    def connection_made(self, transport) -> None:
        super().connection_made(CoalescedWrites(transport, self.loop))
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()  # the next request's head, on a kept-alive connection

    def eof_received(self):
        # A client that half-closes after its request (shutdown(SHUT_WR)): the transport closes once this returns,
        # so a response written this turn goes now, not at the turn's end.
        self.transport.flush()
        return super().eof_received()

    def handle_websocket_upgrade(self, *args, **kwargs) -> None:
        # The connection becomes the WebSocket protocol's: its head deadline must not close it later.
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None
        super().handle_websocket_upgrade(*args, **kwargs)

    def connection_lost(self, exc) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
        waiting = self._lane_stop_waiting()
        if self.lane_task is not None and self.lane_started:
            self.lane_task.cancel(ABANDONED)  # the batcher skips it (one not started yet sees the loss itself)
        super().connection_lost(exc)
        # Requests that will never start hold this protocol's callback, and it holds them: a cycle a rare GC pass
        # would free, their bodies with it. uvicorn leaves its keep-alive timer armed after a reset, too.
        if waiting is not None:
            waiting[0].on_response = no_response
        for cycle, _ in getattr(self, "pipeline", ()):  # httptools' queue of pipelined requests (h11 has none)
            cycle.on_response = no_response
        self._unset_keepalive_if_required()

    # --- the fast lane: uvicorn starts a request's task here; a lane request is answered without one ------------
    def _start_asgi_task(self, cycle, app) -> None:
        lane = self.lane
        if lane is None or app is not self.app or self.access_log or cycle.waiting_for_100_continue or not lane.takes(cycle.scope):
            return super()._start_asgi_task(cycle, app)
        self.lane_waiting = (cycle, app, time.perf_counter())
        if not cycle.more_body:
            self._lane_body_whole()
        else:  # here from a read, or from the pipeline after the previous response: either way the body's clock starts
            self.lane_deadline = self.loop.call_later(lane.body_timeout_s, self._lane_body_late)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self.lane_waiting is not None and self.lane_waiting[0] is self.cycle:
            self.flow.resume_reading()  # nothing reads it before it is whole; its stated length bounds it

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.lane_waiting is not None and self.lane_waiting[0] is self.cycle:
            self._lane_body_whole()

    def _lane_stop_waiting(self) -> tuple | None:
        waiting, self.lane_waiting = self.lane_waiting, None
        if self.lane_deadline is not None:
            self.lane_deadline.cancel()
            self.lane_deadline = None
        return waiting

    def _lane_body_late(self) -> None:
        self.lane_deadline = None
        cycle, app, _ = self._lane_stop_waiting()
        super()._start_asgi_task(cycle, app)  # the limits time the rest of the body and refuse it

    def _lane_body_whole(self) -> None:
        cycle, app, started = self._lane_stop_waiting()
        request = self.lane.decode(cycle.body)
        if request is None:
            return super()._start_asgi_task(cycle, app)  # the route's answer, from the body already read
        cycle.body = bytearray()  # decoded: not kept while the request waits for its batch
        self.lane_started = False
        self.lane_task = task = self.loop.create_task(self._lane_answer(cycle, request, started))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # uvicorn's shutdown waits for it

    async def _lane_answer(self, cycle, request, started: float) -> None:
        self.lane_started, written = True, False
        try:
            if cycle.disconnected:  # lost before this task's first step: counted as one that left, never scored
                self.lane.observed.observe(SCORE_PATH, CLIENT_CLOSED, started)
                return
            answer = await self.lane.answer(request, started)
            if self.flow.write_paused and not cycle.disconnected:
                await self.flow.drain()
            if answer is not None and not cycle.disconnected:
                self._write_answer(cycle, *answer)
                written = True
        except BaseException as exc:
            if not written and not cycle.disconnected:  # as uvicorn answers an app that failed before its response
                cycle.keep_alive = False
                self._write_answer(cycle, 500, INTERNAL_ERROR_HEADERS, b"Internal Server Error")
            if not isinstance(exc, Exception):
                raise  # a cancellation (the server stopping): the task ends cancelled, its connection closed
            self.logger.error("Exception in the fast lane of %s", SCORE_PATH, exc_info=exc)
        finally:
            self.lane_task = None
            # as uvicorn's send completes a response: the connection closes or waits for its next request
            cycle.response_started = cycle.response_complete = True
            cycle.message_event.set()
            if not cycle.keep_alive:
                self.transport.close()
            # The cycle's callback is this protocol's method, and the protocol holds the cycle: break the loop, as
            # uvicorn does after an ASGI task, so a closed connection is freed at once, not at a rare GC pass.
            on_response, cycle.on_response = cycle.on_response, no_response
            on_response()

    def _write_answer(self, cycle, status: int, headers, body: bytes) -> None:
        """A response in one write, with the headers uvicorn writes: its default ones, then the response's."""
        head = [STATUS_LINE[status]]
        says_close = False
        for name, value in (*self.server_state.default_headers, *headers):
            head += (name, b": ", value, b"\r\n")
            if name.lower() == b"connection" and b"close" in [token.strip().lower() for token in value.split(b",")]:
                says_close = True
        if says_close:
            cycle.keep_alive = False  # a response that ends its connection (as uvicorn reads the header)
        elif not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", body)
        self.transport.write(b"".join(head))

    def _arm_head_deadline(self) -> None:
        # One timer a connection, moved lazily: a response only notes when the wait for the next head began, rather
        # than cancelling a timer and arming another on every request
        self.head_wait_began = self.loop.time()
        if self.head_deadline is None:
            self.head_deadline = self.loop.call_later(self.head_timeout_s, self._head_deadline_passed)

    def _head_deadline_passed(self) -> None:
        self.head_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is in flight: its body and its response have their own limits
        left = self.head_wait_began + self.head_timeout_s - self.loop.time()
        if left > 0:  # a response since the timer was armed: the wait for the next head began later
            self.head_deadline = self.loop.call_later(left, self._head_deadline_passed)
            return
        if not self.transport.is_closing():
            self.transport.close()


def service_log_config() -> dict:
    """uvicorn's logging configuration, with the service's own loggers (``uembed.*``: the versions a worker loads,
    its gRPC port, row checks, updates, failures) at INFO through uvicorn's handler and format. Without it they reach
    no handler, and only warnings and errors show, unformatted."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["uembed"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


@functools.cache
def configured_header_timeout_s() -> float:
    return load_settings().header_timeout_s


class ServiceHttpProtocol(HeadDeadlineProtocol):
    """:class:`HeadDeadlineProtocol` with the head deadline of the settings (UEMBED_HEADER_TIMEOUT_S), for a server
    that names its protocol by import string: ``uvicorn --http uembed.serving.process:ServiceHttpProtocol``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, head_timeout_s=configured_header_timeout_s(), **kwargs)


class ClosingMultiprocess(Multiprocess):
    """uvicorn's worker supervisor, closing its copy of the listening sockets when told to stop."""

    def handle_term(self) -> None:
        self.stop_listening()
        super().handle_term()

    def handle_int(self) -> None:
        self.stop_listening()
        super().handle_int()

    def stop_listening(self) -> None:
        for sock in self.sockets:
            sock.close()
        if getattr(self.config, "grpc_socket", None) is not None:  # the gRPC socket its workers accept on, too
            self.config.grpc_socket.close()
