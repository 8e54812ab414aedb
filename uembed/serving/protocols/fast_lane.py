"""The fast lane of ``POST /v1/score``: a valid score request answered by the service's HTTP protocol itself.

The lean path (``lean_json.py``) already skips FastAPI's route for a valid body, but each request still passes the
ASGI stack on its way there: uvicorn's request task and its messages, the proxy-headers middleware, FastAPI's and
Starlette's layers and their two exception middlewares, the limits' closures and body timer, a Starlette response
and uvicorn's header checks. On a small request that costs as much as scoring it (the profile is in
docs/BENCHMARKS.md). The service's protocol (``uembed/serving/process.py``) hands this lane a request instead when
its head allows it (:meth:`FastScoreLane.takes`): ``POST /v1/score``, a JSON body of a stated length within
``max_body_bytes``, no ``Expect: 100-continue``, the access log off, uvicorn's concurrency limit not reached. Once
the body is whole, the lane decodes it as the lean path does; what that path would not take (a body msgspec
refuses, one that breaks the one-form rule, over-long names) goes the ASGI way, body and all, and gets the route's
answer. A body still incomplete after ``body_timeout_ms`` goes the ASGI way too, where the limits time it again (so
a slow body is refused within twice the limit).

What does not change: the response (the route's own scoring function renders it, errors included, and the protocol
writes the headers uvicorn writes: its date and server headers, the response's own, ``connection: close`` when
the connection ends), the request metrics (the same series, route and status), and a client that goes away: its
connection's loss cancels the request, which the batcher then skips (counted as abandoned) and which is counted
with status 499. Not done here: the proxy-headers middleware's rewriting of the client's address (nothing on this
path reads it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from uembed.serving.metrics import ServiceMetrics
from uembed.serving.protocols.disconnect import ABANDONED
from uembed.serving.protocols.lean_json import SCORE_PATH, LeanBody, json_content_type
from uembed.serving.protocols.limits import RequestMetrics
from uembed.serving.protocols.render import CLIENT_CLOSED, json_bytes, table_error, v1_error

# (request, examples, context, candidates, model, version, routing_key) -> the answer's body; None: the client left
Scored = Callable[[None, list, dict | None, list | None, str | None, str | None, str | None], Awaitable[dict | None]]


class FastScoreLane:
    """``/v1/score``'s requests answered without the ASGI stack (module docstring); ``scored`` is the route's
    scoring function (``scored_body`` of ``v1.py``), called with no request (the protocol watches the connection)."""

    def __init__(self, scored: Scored, max_examples: int, max_body_bytes: int, body_timeout_s: float,
                 metrics: ServiceMetrics) -> None:  # fmt: skip
        self.scored = scored
        self.body = LeanBody(max_examples)
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.observed = RequestMetrics(metrics)

    def takes(self, scope: dict) -> bool:
        """Whether a request's head lets the lane answer it once its body is whole."""
        if scope["method"] != "POST" or scope["path"] != SCORE_PATH:
            return False
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                return False
        # bytes.isdigit is ASCII digits only, as the limits read the header
        fits = length is not None and len(length) <= 18 and length.isdigit() and int(length) <= self.max_body_bytes
        return fits and json_content_type(scope["headers"])

    def decode(self, body: bytes):
        """The request of a whole body, or None where the ASGI way must answer it (the lean path would not take it)."""
        return self.body.decode(body)

    async def answer(self, request, started: float) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """The status, headers and body of a decoded request's answer (None: the client went away while it was
        scored); counted in the request metrics from ``started`` (``time.perf_counter()`` when its head was read)."""
        try:
            body = await self.scored(None, request.examples, request.context, request.candidates, request.model,
                                     request.version, request.routing_key)  # fmt: skip
            # the headers a Starlette response of json_response's writes, without building one
            data = json_bytes(body)
            answer = 200, [(b"content-length", b"%d" % len(data)), (b"content-type", b"application/json")], data
        except asyncio.CancelledError as exc:
            # (no local for the task: the error it raises would hold this frame, and the task the error)
            if exc.args != (ABANDONED,) or asyncio.current_task().uncancel():  # another cancel too (the server stopping)
                self.observed.observe(SCORE_PATH, 500, started)  # the protocol answers 500, as uvicorn does
                raise
            answer = None
        except Exception as exc:  # noqa: BLE001 - as the app's handlers of errors do
            error = v1_error(table_error(exc, SCORE_PATH))
            answer = error.status_code, error.raw_headers, error.body
        self.observed.observe(SCORE_PATH, CLIENT_CLOSED if answer is None else answer[0], started)
        return answer
