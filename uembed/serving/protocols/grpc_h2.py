"""gRPC over uvicorn's HTTP/2 (h2c, zttp's parser), in the worker's own event loop: the default gRPC server.

gRPC is HTTP/2 with a fixed shape: a POST to ``/<service>/<method>``, ``content-type: application/grpc``, each message
framed by a flag byte (compressed or not) and a 4-byte big-endian length, and the outcome in the trailers
(``grpc-status``, ``grpc-message`` percent-encoded). :class:`GrpcApp` is that shape as an ASGI app over the
servicers of ``oip_grpc.py`` (the same methods, messages, error codes and metrics as the grpcio server there), and
:class:`Http2Listener` serves it on the gRPC port with uvicorn's HTTP/2 protocol, beside the HTTP port, on the same
loop as the engine. So a call costs no thread hand-off and no grpcio core: its bytes are parsed by zttp and
protobuf's C library, and it reaches the batcher as an HTTP request does.

What is not taken: compressed messages (``grpc-encoding`` other than identity: UNIMPLEMENTED), more than one message
on a unary call (INVALID_ARGUMENT); a message past ``max_body_bytes`` is RESOURCE_EXHAUSTED, as grpcio's
``max_receive_message_length``. A client's deadline (``grpc-timeout``) ends the call with DEADLINE_EXCEEDED. A
request that is not gRPC (another content-type) gets 415 naming what the port serves; the port speaks HTTP/2 alone
(prior knowledge, as gRPC's cleartext channels do). A connection ends gracefully after ``STREAMS_PER_CONNECTION``
calls (GOAWAY, NO_ERROR): its calls in flight finish, and the client opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import grpc
import uvicorn
from google.protobuf import message as protobuf_message
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2
from uvicorn.protocols.http.zttp_h2_impl import ZttpH2Protocol

from uembed.contract.errors import (
    BodyTooLarge,
    DeadlineExceeded,
    TensorError,
    UembedError,
    Unsupported,
)
from uembed.serving.metrics import outcome
from uembed.serving.protocols import oip_grpc
from uembed.serving.protocols.oip import InferencePlane
from uembed.serving.protocols.oip_grpc import (
    SHUTDOWN_GRACE_S,
    HealthServicer,
    InferenceServicer,
    bind_address,
)
from uembed.serving.protocols.render import grpc_code, table_error
from uembed.serving.settings import ServiceSettings

log = logging.getLogger("uembed.oip.grpc")

FRAME_HEADER_BYTES = 5
WATCH = "/grpc.health.v1.Health/Watch"
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/grpc")], "trailers": True}
# grpc-timeout's units (gRPC over HTTP/2: "TimeoutValue TimeoutUnit", at most 8 digits)
TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# zttp ends a connection that ever opens more than 4096 streams (its rapid-reset guard) with GOAWAY ENHANCE_YOUR_CALM,
# failing the calls in flight; a gRPC channel makes every call a stream. So a connection says GOAWAY (NO_ERROR) itself
# first, with room to spare for the streams a client may open before it reads that: its calls in flight finish, and
# the client opens a new connection for the next ones (as load balancers do after a number of requests).
STREAMS_PER_CONNECTION = 3584
CLOSE_WAIT_S = 5.0
# grpc-message is percent-encoded except printable ASCII other than '%'
MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class Cancelled(Exception):
    """The client reset the stream or went away before its reply."""


@dataclass(frozen=True)
class Method:
    name: str
    request_type: Any  # the protobuf message class of its request
    call: Callable[[Any], Awaitable[Any]]  # request message -> reply message, raising the error table's rows


def unary_methods(plane: InferencePlane) -> dict[str, Method]:
    """Every unary method of ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` by its path: the
    servicers' own methods, unwrapped from grpcio's call plumbing (they never use its context)."""
    loop = asyncio.get_running_loop()
    methods = {}
    for servicer, module in ((InferenceServicer(plane, loop), service_pb2), (HealthServicer(plane, loop), health_pb2)):
        (service,) = module.DESCRIPTOR.services_by_name.values()
        for descriptor in service.methods:
            if descriptor.client_streaming or descriptor.server_streaming:
                continue  # ModelStreamInfer and Health.Watch: their own paths below
            body = getattr(type(servicer), descriptor.name).__wrapped__

            async def call(request, body=body, servicer=servicer):
                return await body(servicer, request, None)

            request_type = getattr(module, descriptor.input_type.name)
            methods[f"/{service.full_name}/{descriptor.name}"] = Method(descriptor.name, request_type, call)
    return methods


def grpc_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` header; None for a malformed one (ignored, as grpcio does)."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in TIMEOUT_UNITS:
        return None
    return int(digits) * TIMEOUT_UNITS[unit]


def call_error(exc: Exception, name: str, method: Method | None) -> UembedError:
    """The error-table row that ends a call."""
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded("the call's deadline (grpc-timeout) passed before its reply")
    if isinstance(exc, protobuf_message.DecodeError) and method is not None:
        return TensorError(f"{name}: the request is not a valid {method.request_type.DESCRIPTOR.name}: {exc}")
    return table_error(exc, name)


async def finish(send, error: UembedError | None, body: bytes = b"") -> None:
    """The end of a call whose reply has started: the rest of its body, and its status in the trailers."""
    await send({"type": "http.response.body", "body": body, "more_body": False})
    trailers = status_trailers(grpc.StatusCode.OK) if error is None else status_trailers(grpc_code(error), str(error))
    await send({"type": "http.response.trailers", "headers": trailers})


def framed(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4, "big") + message


def status_trailers(code: grpc.StatusCode, message: str = "") -> list[tuple[bytes, bytes]]:
    trailers = [(b"grpc-status", str(code.value[0]).encode())]
    if message:
        trailers.append((b"grpc-message", quote(message, safe=MESSAGE_SAFE).encode()))
    return trailers


class GrpcApp:
    """The gRPC calls as an ASGI app (see the module's text)."""

    def __init__(self, plane: InferencePlane, settings: ServiceSettings) -> None:
        self.plane = plane
        self.metrics = plane.engine.metrics
        self.max_message_bytes = settings.max_body_bytes
        self.methods = unary_methods(plane)
        self.health = HealthServicer(plane, asyncio.get_running_loop())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        if not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            await plain_refusal(send, f"this port serves gRPC (content-type application/grpc); {scope['method']} "
                                      f"{scope['path'][:200]} is not a gRPC call")  # fmt: skip
            return
        path = scope["path"]
        if path == WATCH:
            await self.watch(headers, receive, send)
            return
        method = self.methods.get(path)
        name = method.name if method else path.rsplit("/", 1)[-1][:100]
        started = time.perf_counter()
        try:
            async with asyncio.timeout(grpc_timeout(headers.get(b"grpc-timeout", b""))):
                if method is None:
                    raise Unsupported(f"{path[:200]}: no such method here; this server (uembed) serves "
                                      "inference.GRPCInferenceService and grpc.health.v1.Health")  # fmt: skip
                request = method.request_type.FromString(await self.message(headers, receive))
                reply = await method.call(request)
        except Cancelled:
            return
        except Exception as exc:  # noqa: BLE001 - each ends the call with its status code
            error = call_error(exc, name, method)
            self.observe(name, started, error)
            await send(START)
            await finish(send, error)
            return
        self.observe(name, started, None)
        await send(START)
        await finish(send, None, framed(reply.SerializeToString()))

    async def message(self, headers: dict[bytes, bytes], receive) -> bytes:
        """The one message of a unary call, unframed."""
        encoding = headers.get(b"grpc-encoding", b"identity")
        body = bytearray()
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                raise Cancelled
            body += event.get("body", b"")
            if len(body) > self.max_message_bytes + FRAME_HEADER_BYTES:
                raise BodyTooLarge(f"the request message is over {self.max_message_bytes} bytes (max_body_bytes)")
            if not event.get("more_body", False):
                break
        if len(body) < FRAME_HEADER_BYTES:
            raise TensorError("the call carries no gRPC message")
        if body[0]:
            raise Unsupported(f"compressed messages (grpc-encoding {encoding.decode(errors='replace')[:40]}) are not "
                              "taken; send them uncompressed")  # fmt: skip
        length = int.from_bytes(body[1:5], "big")
        if len(body) != FRAME_HEADER_BYTES + length:
            raise TensorError("a unary call carries exactly one message; this one's frames do not add up to one")
        return bytes(body[FRAME_HEADER_BYTES:])

    async def watch(self, headers: dict[bytes, bytes], receive, send) -> None:
        """``grpc.health.v1.Health/Watch``: the status now, then each change, until the client goes away or its
        deadline passes."""
        try:
            request = health_pb2.HealthCheckRequest.FromString(await self.message(headers, receive))
        except Cancelled:
            return
        except Exception as exc:  # noqa: BLE001 - ends the call with its status code
            await send(START)
            await finish(send, call_error(exc, "Watch", None))
            return
        await send(START)
        disconnected = asyncio.ensure_future(receive())  # the body is read: its next event is the disconnect
        deadline = grpc_timeout(headers.get(b"grpc-timeout", b""))
        deadline = None if deadline is None else time.monotonic() + deadline
        last = None
        try:
            while not disconnected.done():
                if deadline is not None and time.monotonic() >= deadline:
                    await finish(send, DeadlineExceeded("the call's deadline (grpc-timeout) passed"))
                    return
                status = await self.health.status(request.service)
                if status != last:
                    reply = health_pb2.HealthCheckResponse(status=status).SerializeToString()
                    await send({"type": "http.response.body", "body": framed(reply), "more_body": True})
                    last = status
                wait = self.health.WATCH_EVERY_S
                if deadline is not None:
                    wait = min(wait, max(deadline - time.monotonic(), 0))
                await asyncio.wait([disconnected], timeout=wait)
        finally:
            disconnected.cancel()

    def observe(self, method: str, started: float, error: UembedError | None) -> None:
        code = grpc.StatusCode.OK if error is None else grpc_code(error)
        status = 200 if error is None else error.status
        self.metrics.grpc_seconds.labels(method, outcome(status)).observe(time.perf_counter() - started)
        self.metrics.grpc_requests.labels(method, code.name).inc()


async def plain_refusal(send, text: str) -> None:
    await send({"type": "http.response.start", "status": 415, "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": text.encode()})


class RotatingHttp2(ZttpH2Protocol):
    """uvicorn's HTTP/2 protocol that ends each connection gracefully after ``streams_per_connection`` streams: GOAWAY
    with NO_ERROR and the last stream it serves, that stream and those before it finish, and a stream the client
    opened after it is left unserved (the client retries it on a new connection, as the protocol allows)."""

    streams_per_connection = STREAMS_PER_CONNECTION

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.streams_opened = 0
        self.newest_stream = 0
        self.last_stream_served: int | None = None
        self.closing = False

    def handle_request(self, event) -> None:
        if self.last_stream_served is not None and event.stream_id > self.last_stream_served:
            return
        super().handle_request(event)
        self.streams_opened += 1
        self.newest_stream = event.stream_id
        if self.streams_opened >= self.streams_per_connection:
            self.goaway()

    def goaway(self) -> None:
        """Serve no stream newer than the newest one now, and say so (GOAWAY, NO_ERROR); close once they end."""
        if self.last_stream_served is not None or self.transport.is_closing():
            return
        self.last_stream_served = self.newest_stream
        self.conn.close(0, self.newest_stream)
        self.flush()
        self.shutdown_requested = True  # uvicorn closes the connection once its last stream ends
        if not self.cycles:
            self._close_connection()

    def _close_connection(self) -> None:
        """uvicorn's close, made gentle: GOAWAY (once: a second may not name a newer stream), then our half of the
        connection only. A close with the client's frames unread in the socket would send a TCP reset, which can
        overtake the replies and the GOAWAY written just before it; the client closes its half when it has read them
        (or the connection is closed after CLOSE_WAIT_S)."""
        if self.transport.is_closing() or self.closing:
            return
        self.closing = True
        if self.last_stream_served is None:
            self.last_stream_served = self.newest_stream
            self.conn.close(0, self.newest_stream)
            self.flush()
        try:
            self.transport.write_eof()
        except (OSError, NotImplementedError):  # the client has gone already, or the transport cannot half-close
            self.transport.close()
        else:
            self.loop.call_later(CLOSE_WAIT_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not self.closing:  # frames after our half-close are of streams it will not serve
            super().data_received(data)


class Http2Listener:
    """:class:`GrpcApp` on ``host:port`` with uvicorn's HTTP/2 protocol in this worker's event loop. The socket is bound
    with SO_REUSEPORT, so every worker listens on the port and the kernel hands each connection to one of them."""

    def __init__(self, plane: InferencePlane, settings: ServiceSettings, host: str, port: int,
                 streams_per_connection: int = STREAMS_PER_CONNECTION) -> None:  # fmt: skip
        self.plane, self.settings, self.host, self.port = plane, settings, host, port
        self.protocol = type("RotatingHttp2", (RotatingHttp2,), {"streams_per_connection": streams_per_connection})
        self.server: asyncio.Server | None = None
        self.state = uvicorn.server.ServerState()

    @property
    def address(self) -> str:
        return bind_address(self.host, self.port)

    async def start(self) -> None:
        config = uvicorn.Config(GrpcApp(self.plane, self.settings), http="zttp", http2=True, lifespan="off",
                                log_config=None, access_log=False, proxy_headers=False, server_header=False,
                                date_header=False, timeout_keep_alive=3600)  # fmt: skip
        config.load()
        try:
            sock = socket.create_server((self.host, self.port), family=socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                                        backlog=config.backlog, reuse_port=True)  # fmt: skip
        except OSError as exc:
            raise UembedError(f"gRPC: cannot listen on {self.address} ({exc.strerror or exc}); set UEMBED_GRPC_PORT to a "
                              "free port, or 0 for no gRPC")  # fmt: skip
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: self.protocol(config=config, server_state=self.state, app_state={}, _loop=loop), sock=sock
        )

    async def stop(self) -> None:
        """Stop taking connections, let the calls in flight finish (up to SHUTDOWN_GRACE_S), then close the rest."""
        if self.server is None:
            return
        self.server.close()
        for connection in list(self.state.connections):
            connection.goaway()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self.state.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.state.tasks):
            task.cancel()
        self.server = None


async def start_grpc_server(plane: InferencePlane, settings: ServiceSettings) -> Http2Listener | oip_grpc.GrpcServerThread | None:
    """The gRPC server of ``grpc_server`` on ``grpc_host:grpc_port``; None when grpc_port is 0."""
    if settings.grpc_server == "grpcio":
        return await oip_grpc.start_grpc_server(plane, settings)
    if not settings.grpc_port:
        return None
    server = Http2Listener(plane, settings, settings.grpc_host, settings.grpc_port)
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s, HTTP/2 in this worker's event loop", server.address)
    return server


async def stop_grpc_server(server: Http2Listener | oip_grpc.GrpcServerThread | None) -> None:
    """Stop taking calls and let the calls in flight finish (up to SHUTDOWN_GRACE_S)."""
    if server is not None:
        await server.stop()
