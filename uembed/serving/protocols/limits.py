"""What every HTTP request goes through first, whatever its front: the body limits and the request metrics.

A body over ``max_body_bytes`` (413) or slower than ``body_timeout_ms`` (408) is refused and its connection closed,
in ``/v1``'s error shape; every request is timed and counted by its route (``uembed_http_requests_total``,
``uembed_http_request_duration_seconds``).
"""

from __future__ import annotations

import asyncio
import time

from uembed.contract.errors import BodyTooLarge, RequestTimeout, UembedError
from uembed.serving.metrics import ServiceMetrics, outcome
from uembed.serving.protocols.render import v1_error


class LimitsAndMetrics:
    """ASGI middleware: a body over ``max_body_bytes`` (413) or slower than ``body_timeout_s`` (408) is refused
    and its connection closed; every request is timed and counted."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.observed = RequestMetrics(metrics)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        length = dict(scope["headers"]).get(b"content-length")
        # bytes.isdigit is ASCII digits only; past 18 of them int() may refuse it, and the body is counted as it comes
        if length is not None and len(length) <= 18 and length.isdigit() and int(length) > self.max_body_bytes:
            await v1_error(BodyTooLarge(f"body: {int(length)} bytes is over the limit of {self.max_body_bytes}"))(scope, receive, send)
            return self._observe(scope, 413, started)
        received = 0
        refused: UembedError | None = None
        body_done = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited_receive():
            # A body over the limit or too slow: the app sees a disconnect, the client gets our 413 or 408.
            nonlocal received, refused, body_done
            if body_done:
                return await receive()  # after the body: waits for the client to go away
            try:
                async with asyncio.timeout_at(deadline):  # a timer on this task, no task of its own (the hot path)
                    message = await receive()
            except TimeoutError:
                refused = RequestTimeout(f"body: not received within body_timeout_ms={self.body_timeout_s * 1000:g}")
                return {"type": "http.disconnect"}
            received += len(message.get("body", b""))
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if received > self.max_body_bytes:
                refused = BodyTooLarge(f"body: over the limit of {self.max_body_bytes} bytes")
                return {"type": "http.disconnect"}
            return message

        async def recording_send(message):
            nonlocal status
            if refused is not None:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                await self.app(scope, limited_receive, recording_send)
            except Exception:
                if refused is None:
                    raise
            if refused is not None:
                status = refused.status
                await v1_error(refused)(scope, receive, send)
        finally:
            self._observe(scope, status, started)

    def _observe(self, scope, status: int, started: float) -> None:
        self.observed.observe(getattr(scope.get("route"), "path", "unmatched"), status, started)


class RequestMetrics:
    """A request's time and count by its route and status (``uembed_http_request_duration_seconds``,
    ``uembed_http_requests_total``)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        # (route, status) -> its latency histogram's and counter's children: labels() costs more than the observation,
        # and these series are never removed (routes and status codes are few)
        self._children: dict[tuple[str, int], tuple] = {}

    def observe(self, route: str, status: int, started: float) -> None:
        children = self._children.get((route, status))
        if children is None:
            children = self._children[(route, status)] = (self.metrics.request_seconds.labels(route, outcome(status)),
                                                          self.metrics.requests.labels(route, str(status)))  # fmt: skip
        children[0].observe(time.perf_counter() - started)
        children[1].inc()
