"""gRPC over uvicorn's HTTP/2 (h2c, zttp's parser), in the worker's own event loop: the default gRPC server.

gRPC is HTTP/2 with a fixed shape: a POST to ``/<service>/<method>``, ``content-type: application/grpc``, each message
framed by a flag byte (compressed or not) and a 4-byte big-endian length, and the outcome in the trailers (``grpc-
status``, ``grpc-message`` percent-encoded). :class:`GrpcApp` is that shape as an ASGI app over the servicers of
``oip_grpc.py`` (the same methods, messages, error codes and metrics as the grpcio server there), and
:class:`~uembed.serving.protocols.http2.Http2Listener` serves it on the gRPC port with uvicorn's HTTP/2 protocol,
beside the HTTP port, on the same loop as the engine. So a call costs no thread hand-off and no grpcio core: its bytes
are parsed by zttp, and ModelInfer's messages by a compiled reader (``infer_wire.py``; protobuf's C library reads
the others), and it reaches the batcher as an HTTP request does.

What is not taken: compressed messages (``grpc-encoding`` other than identity: UNIMPLEMENTED), more than one message
on a unary call (INVALID_ARGUMENT); a message past ``max_body_bytes`` is RESOURCE_EXHAUSTED, as grpcio's
``max_receive_message_length``. A client's deadline (``grpc-timeout``) ends the call with DEADLINE_EXCEEDED. A request
that is not gRPC (another content-type) gets 415 naming what the port serves; the port speaks HTTP/2 alone (prior
knowledge, as gRPC's cleartext channels do). A connection ends gracefully after ``STREAMS_PER_CONNECTION`` calls
(GOAWAY, NO_ERROR): its calls in flight finish, and the client opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time

from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2

from uembed.contract.errors import DeadlineExceeded, UembedError, Unsupported
from uembed.serving.protocols import oip_grpc
from uembed.serving.protocols.disconnect import unless_abandoned
from uembed.serving.protocols.grpc_lane import GrpcLane
from uembed.serving.protocols.grpc_wire import (
    SHUTTING_DOWN,
    CallMetrics,
    Method,
    call_error,
    framed,
    grpc_content_type,
    grpc_timeout,
    outcome_trailers,
    too_large,
    unframed,
)
from uembed.serving.protocols.http2 import Http2Listener
from uembed.serving.protocols.infer_wire import InferRequestReader
from uembed.serving.protocols.oip import InferencePlane
from uembed.serving.protocols.oip_grpc import (
    HealthServicer,
    InferenceServicer,
)
from uembed.serving.settings import ServiceSettings

log = logging.getLogger("uembed.oip.grpc")

WATCH = "/grpc.health.v1.Health/Watch"
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/grpc")], "trailers": True}


UNKNOWN_METHOD = "unknown"


class Disconnects:
    """What ``unless_abandoned`` watches for a client that went away: the call's ASGI receive."""

    def __init__(self, receive) -> None:
        self.receive = receive


class Cancelled(Exception):
    """The client reset the stream or went away before its reply."""


def unary_methods(plane: InferencePlane) -> dict[str, Method]:
    """Every unary method of ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` by its path: the
    servicers' own methods, unwrapped from grpcio's call plumbing (they never use its context)."""
    loop = asyncio.get_running_loop()
    methods = {}
    for servicer, module in ((InferenceServicer(plane, loop), service_pb2), (HealthServicer(plane, loop), health_pb2)):
        (service,) = module.DESCRIPTOR.services_by_name.values()
        for descriptor in service.methods:
            body = getattr(type(servicer), descriptor.name)
            if descriptor.client_streaming or descriptor.server_streaming:
                if descriptor.name == "Watch":
                    continue  # served by GrpcApp.watch
                request_type = None  # ModelStreamInfer: UNIMPLEMENTED, as the servicer answers it
            else:
                request_type = getattr(module, descriptor.input_type.name)
            body = body.__wrapped__

            async def call(request, body=body, servicer=servicer):
                return (await body(servicer, request, None)).SerializeToString()

            if descriptor.name == "ModelInfer":  # read and answered without protobuf's objects where it can be
                request_type, call = InferRequestReader, servicer.infer
            methods[f"/{service.full_name}/{descriptor.name}"] = Method(descriptor.name, request_type, call)
    return methods


async def finish(send, error: UembedError | None, body: bytes = b"") -> None:
    """The end of a call whose reply has started: the rest of its body, and its status in the trailers."""
    await send({"type": "http.response.body", "body": body, "more_body": False})
    await send({"type": "http.response.trailers", "headers": outcome_trailers(error)})


class GrpcApp:
    """The gRPC calls as an ASGI app (see the module's text)."""

    def __init__(self, plane: InferencePlane, settings: ServiceSettings) -> None:
        self.plane = plane
        self.observe = CallMetrics(plane.engine.metrics).observe
        self.max_message_bytes = settings.max_body_bytes
        self.methods = unary_methods(plane)
        self.lane = GrpcLane(self.methods, self.max_message_bytes, settings.body_timeout_ms / 1000, self.observe)
        self.health = HealthServicer(plane, asyncio.get_running_loop())
        self.stopping = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        if scope["method"] != "POST" or not grpc_content_type(headers.get(b"content-type", b"")):
            await plain_refusal(send, f"this port serves gRPC (POST, content-type application/grpc); {scope['method']} "
                                      f"{scope['path'][:200]} is not a gRPC call")  # fmt: skip
            return
        path = scope["path"]
        if path == WATCH:
            await self.watch(headers, receive, send)
            return
        method = self.methods.get(path)
        name = method.name if method else UNKNOWN_METHOD  # a fixed label: a client's paths must not grow the metrics
        started = time.perf_counter()
        try:
            async with asyncio.timeout(grpc_timeout(headers.get(b"grpc-timeout", b""))) as deadline:
                if method is None:
                    raise Unsupported(f"{path[:200]}: no such method here; this server (uembed) serves "
                                      "inference.GRPCInferenceService and grpc.health.v1.Health")  # fmt: skip
                request = method.request_type.FromString(await self.message(headers, receive)) if method.request_type else None
                # the client may reset the stream (cancel the call) while it waits: the batcher then skips its work
                reply = await unless_abandoned(Disconnects(receive), method.call(request))
            if reply is None:
                return  # nobody reads a reply; counted by the batcher as abandoned
        except Cancelled:
            return
        except asyncio.CancelledError:  # the server stops before the call ends: the client may retry elsewhere
            self.observe(name, started, SHUTTING_DOWN)
            await send(START)
            await finish(send, SHUTTING_DOWN)
            raise
        except Exception as exc:  # noqa: BLE001 - each ends the call with its status code
            error = call_error(exc, name, method, deadline.expired())
            self.observe(name, started, error)
            await send(START)
            await finish(send, error)
            return
        self.observe(name, started, None)
        await send(START)
        await finish(send, None, framed(reply))

    async def message(self, headers: dict[bytes, bytes], receive) -> bytes:
        """The one message of a unary call, unframed."""
        encoding = headers.get(b"grpc-encoding", b"identity")
        body = bytearray()
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                raise Cancelled
            body += event.get("body", b"")
            if too_large(body, self.max_message_bytes):
                break  # refused by unframed
            if not event.get("more_body", False):
                break
        return unframed(body, encoding, self.max_message_bytes)

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
                if self.stopping.is_set():
                    await finish(send, SHUTTING_DOWN)
                    return
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
                stopping = asyncio.ensure_future(self.stopping.wait())
                await asyncio.wait([disconnected, stopping], timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
        finally:
            disconnected.cancel()



async def plain_refusal(send, text: str) -> None:
    await send({"type": "http.response.start", "status": 415, "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": text.encode()})


async def start_grpc_server(plane: InferencePlane, settings: ServiceSettings) -> Http2Listener | oip_grpc.GrpcServerThread | None:
    """The gRPC server of ``grpc_server`` on ``grpc_host:grpc_port``; None when grpc_port is 0."""
    if settings.grpc_server == "grpcio":
        return await oip_grpc.start_grpc_server(plane, settings)
    if not settings.grpc_port:
        return None
    app = GrpcApp(plane, settings)
    server = Http2Listener(app, settings, settings.grpc_host, settings.grpc_port, lane=app.lane)
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s, HTTP/2 in this worker's event loop", server.address)
    return server


async def stop_grpc_server(server: Http2Listener | oip_grpc.GrpcServerThread | None) -> None:
    """Stop taking calls and let the calls in flight finish (up to SHUTDOWN_GRACE_S)."""
    if server is not None:
        await server.stop()
