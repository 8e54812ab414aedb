"""The lean path of ``POST /v1/score``: msgspec decodes the body straight into the engine's input.

FastAPI's route for ``/v1/score`` (``uembed/serving/protocols/v1.py``) stays the contract: its OpenAPI schema, its
pydantic model and its error messages. But for a typical request the framework around that route (stdlib
``json.loads``, pydantic walking every value into ``Any``, dependency solving, the router, two exception
middlewares) costs more than canonicalising its values (the profile is in docs/BENCHMARKS.md). This middleware
sits inside the limits and metrics middleware and answers the requests the route would accept, the same way:

- the body is read (the limits above still refuse one too large or too slow) and decoded by a msgspec type built
  from the same limits as the pydantic model (examples per request, feature-name length, no unknown fields); the
  usual form (examples or candidates of the same features, plain values) is read by a compiled reader straight into
  one list of values per feature instead (``_score_json.pyx``: the same values msgspec's dicts would hold, without
  the dicts);
- a body that msgspec refuses, or that breaks the one-form rule, is replayed to the FastAPI route unchanged, so
  every error a client sees comes from the one validating path, message for message;
- a body it accepts is scored by the route's own scoring function (``score``), so both paths render the same
  response and the same errors from the engine.

msgspec may refuse what pydantic accepts (a JSON ``NaN``, a number past a float's range, a lone surrogate): those
take the route. It accepts nothing the route would refuse: the fields are not optional (an explicit ``null`` is
refused, as pydantic refuses it, except for ``model``, ``version`` and ``routing_key``), and the form rule is the
route's (``uembed/serving/protocols/render.py``).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from uembed.serving.pipeline.canonical import ExampleColumns
from uembed.serving.protocols.render import MAX_ROUTING_KEY_CHARS, form_problem, table_error, v1_error
from uembed.serving.registry import MAX_NAME_CHARS

try:  # built by the install (make install); msgspec's decoding alone without it
    from uembed.serving.protocols import _score_json
except ImportError:
    _score_json = None
if os.environ.get("UEMBED_PURE_PYTHON", "") not in ("", "0"):
    _score_json = None

SCORE_PATH = "/v1/score"

# (request, examples, context, candidates, model, version, routing_key) -> the response
Score = Callable[[Request, list, dict | None, list | None, str | None, str | None, str | None], Awaitable[Response]]


def score_body_type(max_examples: int) -> type[msgspec.Struct]:
    """The score request as msgspec checks it: the pydantic model's fields, limits and ``extra="forbid"``; the
    length of feature names is checked after decoding (:func:`names_fit`), once per distinct name (a limit on
    the dict keys' type would be checked on every key of every example, slowing the decoding down)."""
    example = dict[str, Any]
    examples = Annotated[list[example], msgspec.Meta(min_length=1, max_length=max_examples)]
    # Defaults of None on types without None: a field left out is None, an explicit null is refused (as the route
    # refuses it for these three).
    return msgspec.defstruct(
        "LeanScoreRequest",
        [("examples", examples, None), ("context", example, None), ("candidates", examples, None),
         # the route takes a null model, version and routing key
         ("model", Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)] | None, None),
         ("version", Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)] | None, None),
         ("routing_key", Annotated[str, msgspec.Meta(max_length=MAX_ROUTING_KEY_CHARS)] | None, None)],
        forbid_unknown_fields=True,
    )  # fmt: skip


def json_content_type(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether FastAPI would read this body as JSON: ``application/json`` or ``application/*+json``."""
    for name, value in headers:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))
    return False


def replayed(body: bytes, receive):
    """A ``receive`` that gives the already-read body once, then whatever the connection sends next."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


@dataclass(slots=True)
class ColumnsBody:
    """A score body read by the compiled reader: its examples (or a ranking request's candidates) as one list of
    values per feature."""

    examples: ExampleColumns | None
    model: str | None
    version: str | None
    routing_key: str | None
    context: dict | None = None
    candidates: ExampleColumns | None = None


class LeanBody:
    """A score body decoded as the lean path takes it: the request, or None where the route must answer. The compiled
    reader (``_score_json.pyx``) reads the usual form straight into columns; msgspec decodes the rest, a dict an
    example."""

    def __init__(self, max_examples: int) -> None:
        self.max_examples = max_examples
        self.decoder = msgspec.json.Decoder(score_body_type(max_examples))

    def decode(self, body: bytes):
        if _score_json is not None:
            read = _score_json.score_columns(body, self.max_examples, MAX_NAME_CHARS, MAX_ROUTING_KEY_CHARS)
            if read is not None:
                columns, count, model, version, routing_key, context, ranking = read
                examples = ExampleColumns(columns, count)
                if ranking:
                    return ColumnsBody(None, model, version, routing_key, context, examples)
                return ColumnsBody(examples, model, version, routing_key)
        try:
            request = self.decoder.decode(body)
        # ValidationError is a DecodeError; bad UTF-8 a ValueError; a body nested too deep a RecursionError (the
        # route refuses it before parsing)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return None
        if form_problem(request.examples, request.context, request.candidates) or not names_fit(request):
            return None
        return request


class LeanScoreRoute:
    """ASGI middleware: ``POST /v1/score`` bodies that the route would accept, decoded by msgspec and scored by
    ``score``; anything else goes on to ``app`` (the FastAPI route) unchanged."""

    def __init__(self, app, route, max_examples: int, score: Score) -> None:
        self.app = app
        self.route = route  # the FastAPI route: set on the scope, so metrics label the request by its path
        self.body = LeanBody(max_examples)
        self.score = score

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != SCORE_PATH or scope["method"] != "POST" or not json_content_type(scope["headers"]):
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away, or the limits refused the body (they answer it)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        request = self.body.decode(body)
        if request is None:
            return await self.app(scope, replayed(body, receive), send)
        del body, chunks, message  # decoded: not kept while the request waits for its batch
        scope["route"] = self.route
        try:
            response = await self.score(Request(scope, receive), request.examples, request.context, request.candidates,
                                        request.model, request.version, request.routing_key)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - as the app's handlers of errors do
            response = v1_error(table_error(exc, SCORE_PATH))
        await response(scope, receive, send)


def names_fit(request) -> bool:
    """Every feature name within the route's length limit."""
    names = set().union(*(request.examples or request.candidates), request.context or ())
    return not names or max(map(len, names)) <= MAX_NAME_CHARS
