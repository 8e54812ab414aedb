"""The lean path of ``POST /v1/score``: msgspec decodes the body straight into the engine's input.

FastAPI's route for ``/v1/score`` stays the contract: its OpenAPI schema, its pydantic model and its error
messages. On this machine a 64-example request spent more time in the framework around that route (stdlib
``json.loads``, pydantic walking every value into ``Any``, dependency solving, the router, two exception
middlewares) than in canonicalising its values; see the profile in docs/BENCHMARKS.md. This middleware sits
inside the limits and metrics middleware and answers the requests the route would accept, the same way:

- the body is read (the limits above still refuse one too large or too slow) and decoded by a msgspec type built
  from the same limits as the pydantic model (examples per request, feature-name length, no unknown fields);
- a body that msgspec refuses, or that breaks the one-form rule, is replayed to the FastAPI route unchanged, so
  every error a client sees comes from the one validating path, message for message;
- a body it accepts is scored by the route's own scoring function (``score``), so both paths render the same
  response and the same errors from the engine.

msgspec may refuse what pydantic accepts (a JSON ``NaN``, a number past a float's range, a lone surrogate): those
take the route. It accepts nothing the route would refuse: the fields are not optional (an explicit ``null`` is
refused, as pydantic refuses it, except for ``model``, ``version`` and ``routing_key``), and the form rule is checked here as the route's model checks it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from uembed.contract.errors import UembedError, internal

log = logging.getLogger("uembed.app")

SCORE_PATH = "/v1/score"

# (request, examples, context, candidates, model, version, routing_key) -> the response
Score = Callable[[Request, list, dict | None, list | None, str | None, str | None, str | None], Awaitable[Response]]


MAX_NAME_CHARS = 128  # a feature, model or version name, as the route's model limits it
MAX_ROUTING_KEY_CHARS = 256


def score_body_type(max_examples: int) -> type[msgspec.Struct]:
    """The score request as msgspec checks it: the pydantic model's fields, limits and ``extra="forbid"``; the
    length of feature names is checked after decoding (:func:`names_fit`), once per distinct name (a limit on
    the dict keys' type doubled the decoding time of a 64-example body)."""
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


class LeanScoreRoute:
    """ASGI middleware: ``POST /v1/score`` bodies that the route would accept, decoded by msgspec and scored by
    ``score``; anything else goes on to ``app`` (the FastAPI route) unchanged."""

    def __init__(self, app, route, max_examples: int, score: Score,
                 render_error: Callable[[UembedError], Response]) -> None:  # fmt: skip
        self.app = app
        self.route = route  # the FastAPI route: set on the scope, so metrics label the request by its path
        self.decoder = msgspec.json.Decoder(score_body_type(max_examples))
        self.score = score
        self.render_error = render_error

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
        try:
            request = self.decoder.decode(body)
        except (msgspec.DecodeError, ValueError):  # ValidationError is a DecodeError; bad UTF-8 a ValueError
            request = None
        if request is None or not one_form(request) or not names_fit(request):
            return await self.app(scope, replayed(body, receive), send)
        scope["route"] = self.route
        try:
            response = await self.score(Request(scope, receive), request.examples, request.context, request.candidates,
                                        request.model, request.version, request.routing_key)  # fmt: skip
        except UembedError as exc:
            response = self.render_error(exc)
        except Exception as exc:  # noqa: BLE001 - as the app's handler of unexpected errors does
            log.exception("unexpected error on %s", SCORE_PATH)
            response = self.render_error(internal(exc))
        await response(scope, receive, send)


def one_form(request) -> bool:
    """The route's form rule (``ScoreRequestForms.one_form``): examples alone, or candidates with an optional context."""
    if request.examples is not None:
        return request.candidates is None and request.context is None
    return request.candidates is not None


def names_fit(request) -> bool:
    """Every feature name within the route's length limit."""
    names = set().union(*(request.examples or request.candidates), request.context or ())
    return not names or max(map(len, names)) <= MAX_NAME_CHARS
