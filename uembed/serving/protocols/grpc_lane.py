"""The gRPC port's fast lane: a unary call answered by the HTTP/2 protocol itself, without uvicorn's ASGI cycle for
the stream (its scope, receive and send messages) or :class:`~uembed.serving.protocols.grpc_h2.GrpcApp`'s ASGI side
(the body read message by message, a watcher for a client that leaves). The call runs the same servicer method, with
the same framing checks, deadline (from the call's headers), error codes and metrics; its reply is written straight to
the stream: headers, the framed message and the status trailers.

The protocol (``http2.RotatingHttp2``) offers each new stream to :meth:`GrpcLane.take`. It takes a POST of
``application/grpc`` to a unary method, from a client that reads trailers (``te: trailers``), while the connection takes
calls and uvicorn's concurrency limit is not reached; everything else (Health's Watch, an unknown path, another
content-type, a refusal uvicorn answers itself) goes the ASGI way. A taken stream is kept where uvicorn keeps a stream's
cycle (``protocol.cycles``), and its task among the server's tasks from its headers on, as a cycle's is: uvicorn's own
code hands it its body, a RST_STREAM and a lost connection, and counts it toward the concurrency limit, GOAWAY's end of
the connection and a graceful stop. :class:`LaneCall` has what that code reads and writes there. The body is moved out
of uvicorn's buffer as it arrives (so uvicorn's read pause, meant for an app that does not read, never holds the
connection), up to ``max_body_bytes``; a body that does not arrive within ``body_timeout_ms`` ends the call
DEADLINE_EXCEEDED. A reset stream or a lost connection cancels the call: the batcher skips its work and counts it
abandoned, as the ASGI way does.
"""

from __future__ import annotations

import asyncio
import logging
import time

from uembed.contract.errors import RequestTimeout
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

log = logging.getLogger("uembed.oip.grpc")

REPLY_HEADERS = [(b"content-type", b"application/grpc")]


class LaneCall:
    """One unary call's stream in the lane. uvicorn's protocol appends to its ``body``, sets ``more_body`` and
    ``disconnected``, reads ``response_complete``, and calls ``message_event.set()`` (the call's :meth:`set`) when
    the body grows or ends, the stream is reset or the connection is lost."""

    __slots__ = ("lane", "protocol", "stream", "method", "encoding", "started", "timeout_s", "body", "message",
                 "more_body", "response_complete", "disconnected", "whole", "task")  # fmt: skip

    def __init__(self, lane: GrpcLane, protocol, stream, method: Method, encoding: bytes, timeout_s: float | None) -> None:
        self.lane, self.protocol, self.stream, self.method = lane, protocol, stream, method
        self.encoding, self.timeout_s = encoding, timeout_s
        self.started = time.perf_counter()
        self.body = bytearray()  # what uvicorn appends to
        self.message = bytearray()  # what has arrived, moved out of ``body``
        self.more_body = True
        self.response_complete = False
        self.disconnected = False
        self.whole = protocol.loop.create_future()  # done when the body has ended, or grown past the limit
        self.task: asyncio.Task | None = None

    @property
    def message_event(self) -> LaneCall:
        return self

    def set(self) -> None:
        if self.disconnected:
            if self.task is not None:
                self.task.cancel()
            return
        if self.whole.done():  # the call is answered from what it had: anything more is dropped
            self.body.clear()
        else:
            self.message += self.body
            self.body.clear()
            if not self.more_body or too_large(self.message, self.lane.max_message_bytes):
                self.whole.set_result(None)
        if self.protocol.flow.read_paused:  # uvicorn pauses reading while a cycle's body is large: ours is empty
            self.protocol.resume_reading_if_idle()

    def reply(self, message: bytes, error) -> None:
        """The reply's headers, message and status trailers, written as one."""
        protocol = self.protocol
        if self.disconnected or protocol.transport.is_closing():
            return
        self.stream.send_response(200, REPLY_HEADERS)
        if message:
            self.stream.send_data(message)
        self.stream.end_message(outcome_trailers(error))
        # answered before the client finished sending (a message past the limit): the protocol resets the stream
        # with NO_ERROR once the call completes (``http2.RotatingHttp2.on_response_complete``), as for the ASGI way
        protocol.transport.write(protocol.conn.data_to_send())
        self.response_complete = True

    def reset(self) -> None:
        """Reset the stream (a reply that could not be made), as uvicorn resets one whose app failed mid-reply."""
        protocol = self.protocol
        if self.disconnected or self.response_complete or protocol.transport.is_closing():
            return
        self.stream.reset()
        protocol.transport.write(protocol.conn.data_to_send())
        self.disconnected = True


class GrpcLane:
    """Which streams the lane takes, and how it answers them (see the module's text)."""

    def __init__(self, methods: dict[str, Method], max_message_bytes: int, body_timeout_s: float, observe) -> None:
        self.max_message_bytes, self.body_timeout_s = max_message_bytes, body_timeout_s
        self.observe = observe  # (method name, started, error or None): the call's metrics, as the ASGI way counts it
        self.methods = {path.encode(): method for path, method in methods.items() if method.request_type is not None}

    def take(self, protocol, event) -> bool:
        """Whether the lane answers this new stream (``event``: zttp's Request); if so it is registered with
        ``protocol`` and its task started."""
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
        if event.end_stream:  # headers alone: no message (refused as such)
            call.more_body = False
            call.set()
        call.task = protocol.loop.create_task(self.answer(call))
        call.task.add_done_callback(protocol.tasks.discard)
        protocol.tasks.add(call.task)
        return True

    async def answer(self, call: LaneCall) -> None:
        try:
            await self._answer(call)
        except Exception:  # noqa: BLE001 - a bug: logged, and the stream reset rather than left open
            log.exception("gRPC %s: the lane's reply failed", call.method.name)
            call.reset()
        finally:
            call.protocol.on_response_complete(call.stream.stream_id)  # the stream leaves the connection's cycles

    async def _answer(self, call: LaneCall) -> None:
        method, error, message = call.method, None, b""
        # a Timeout only for a call with a deadline: most calls have none, and one costs a few microseconds a call
        deadline = None if call.timeout_s is None else asyncio.timeout(call.timeout_s)
        try:
            if deadline is None:
                message = await self._reply(call, None)
            else:
                async with deadline:
                    message = await self._reply(call, deadline)
        except asyncio.CancelledError:
            if call.disconnected:
                return  # nobody reads a reply; counted by the batcher as abandoned
            error = SHUTTING_DOWN  # the server stops before the call ends: the client may retry elsewhere
            self.observe(method.name, call.started, error)
            call.reply(b"", error)
            raise
        except Exception as exc:  # noqa: BLE001 - each ends the call with its status code
            error = call_error(exc, method.name, method, deadline is not None and deadline.expired())
        self.observe(method.name, call.started, error)
        if call.protocol.flow.write_paused and not call.disconnected:
            await call.protocol.flow.drain()
        call.reply(message, error)

    async def _reply(self, call: LaneCall, deadline: asyncio.Timeout | None) -> bytes:
        """The call's framed reply message, once its body has arrived (within ``body_timeout_s``)."""
        if not call.whole.done():  # most calls' bodies came with their headers
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    await call.whole
            except TimeoutError:
                if deadline is not None and deadline.expired():
                    raise
                raise RequestTimeout(f"the call's message did not arrive within body_timeout_ms="
                                     f"{self.body_timeout_s * 1000:g}") from None  # fmt: skip
        method = call.method
        request = method.request_type.FromString(unframed(call.message, call.encoding, self.max_message_bytes))
        return framed(await method.call(request))
