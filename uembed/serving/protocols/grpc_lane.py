"""The gRPC port's fast lane: a unary call answered by the HTTP/2 protocol itself once its message is whole, without
uvicorn's ASGI cycle for the stream (its scope, receive and send messages, an event a stream) or
:class:`~uembed.serving.protocols.grpc_h2.GrpcApp`'s ASGI side (the body read message by message, a watcher for a
client that leaves). The call runs the same servicer method, with the same framing checks, deadline, error codes and
metrics; its reply is written straight to the stream: headers, the framed message and the status trailers.

The protocol (``http2.RotatingHttp2``) offers each new stream to :meth:`GrpcLane.take`. It takes a POST of
``application/grpc`` to a unary method, from a client that reads trailers (``te: trailers``), while the connection takes
calls and uvicorn's concurrency limit is not reached; everything else (Health's Watch, an unknown path, another
content-type, a refusal uvicorn answers itself) goes the ASGI way. A taken stream is kept where uvicorn keeps a stream's
cycle (``protocol.cycles``), so its body, a RST_STREAM, a lost connection, GOAWAY and the keep-alive timer are handled
by uvicorn's own code; :class:`LaneCall` has what that code reads and writes there. A reset stream or a lost connection
cancels the call: the batcher skips its work and counts it abandoned, as the ASGI way does.
"""

from __future__ import annotations

import asyncio
import time

from uembed.serving.protocols.grpc_wire import (
    SHUTTING_DOWN,
    Method,
    call_error,
    framed,
    grpc_content_type,
    grpc_timeout,
    outcome_trailers,
    too_large,
    unframed,
)

REPLY_HEADERS = [(b"content-type", b"application/grpc")]


class LaneCall:
    """One unary call's stream in the lane. uvicorn's protocol reads and writes its ``body``, ``more_body``,
    ``response_complete`` and ``disconnected``, and sets its ``message_event`` (the call itself) when the body grows or
    ends, the stream is reset or the connection is lost."""

    __slots__ = ("lane", "protocol", "stream", "method", "encoding", "timeout_s", "body", "more_body", "response_complete",
                 "disconnected", "task")  # fmt: skip

    def __init__(self, lane: GrpcLane, protocol, stream, method: Method, encoding: bytes, timeout_s: float | None) -> None:
        self.lane, self.protocol, self.stream, self.method = lane, protocol, stream, method
        self.encoding, self.timeout_s = encoding, timeout_s
        self.body = bytearray()
        self.more_body = True
        self.response_complete = False
        self.disconnected = False
        self.task: asyncio.Task | None = None

    @property
    def message_event(self) -> LaneCall:
        return self

    def set(self) -> None:
        if self.disconnected:
            if self.task is not None:
                self.task.cancel()
            return
        if self.task is not None:
            return
        if self.more_body and not too_large(self.body, self.lane.max_message_bytes):
            # uvicorn pauses reading past its high-water mark until a cycle reads its body; the lane reads the whole
            # message (up to max_body_bytes, past which the call fails at once) before it starts
            self.protocol.flow.resume_reading()
            return
        protocol = self.protocol
        self.task = protocol.loop.create_task(self.lane.answer(self))
        self.task.add_done_callback(protocol.tasks.discard)
        protocol.tasks.add(self.task)

    def reply(self, message: bytes, error) -> None:
        """The reply's headers, message and status trailers, written as one; the stream is then done."""
        protocol = self.protocol
        if self.disconnected or protocol.transport.is_closing():
            return
        trailers = outcome_trailers(error)
        self.stream.send_response(200, REPLY_HEADERS)
        if message:
            self.stream.send_data(message)
        self.stream.end_message(trailers)
        protocol.transport.write(protocol.conn.data_to_send())
        self.response_complete = True
        protocol.on_response_complete(self.stream.stream_id)


class GrpcLane:
    """Which streams the lane takes, and how it answers them (see the module's text)."""

    def __init__(self, methods: dict[str, Method], max_message_bytes: int, observe) -> None:
        self.max_message_bytes = max_message_bytes
        self.observe = observe  # (method name, started, error or None): the call's metrics, as the ASGI way counts it
        self.methods = {path.encode(): method for path, method in methods.items() if method.request_type is not None}

    def take(self, protocol, event) -> bool:
        """Whether the lane answers this new stream (``event``: zttp's Request); if so it is registered with
        ``protocol`` and answered once its message is whole."""
        method = self.methods.get(event.path)
        if method is None or event.method != b"POST" or protocol.shutdown_requested:
            return False
        headers = event.headers  # zttp's header block (its get is case-blind), or a list of pairs
        if isinstance(headers, list):
            headers = {name.lower(): value for name, value in headers}
        if not grpc_content_type(headers.get(b"content-type", b"")) or headers.get(b"te", b"").strip().lower() != b"trailers":
            return False
        limit = protocol.limit_concurrency
        if limit is not None and (len(protocol.connections) >= limit or len(protocol.tasks) >= limit):
            return False  # uvicorn's own 503
        call = LaneCall(self, protocol, protocol.conn.stream(event.stream_id), method, headers.get(b"grpc-encoding", b"identity"),
                        grpc_timeout(headers.get(b"grpc-timeout", b"")))  # fmt: skip
        protocol.cycles[event.stream_id] = call
        return True

    async def answer(self, call: LaneCall) -> None:
        started = time.perf_counter()
        method, error, message = call.method, None, b""
        try:
            async with asyncio.timeout(call.timeout_s) as deadline:
                request = method.request_type.FromString(unframed(call.body, call.encoding, self.max_message_bytes))
                message = framed((await method.call(request)).SerializeToString())
        except asyncio.CancelledError:
            if call.disconnected:
                return  # nobody reads a reply; counted by the batcher as abandoned
            error = SHUTTING_DOWN  # the server stops before the call ends: the client may retry elsewhere
            self.observe(method.name, started, error)
            call.reply(b"", error)
            raise
        except Exception as exc:  # noqa: BLE001 - each ends the call with its status code
            error = call_error(exc, method.name, method, deadline.expired())
        self.observe(method.name, started, error)
        if call.protocol.flow.write_paused and not call.disconnected:
            await call.protocol.flow.drain()
        call.reply(message, error)
