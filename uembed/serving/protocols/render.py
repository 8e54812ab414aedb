"""What the fronts answer alike, and each protocol's rendering of the one error table (``uembed/contract/errors.py``).

Every failure is a row of the error table before it is rendered: :func:`table_error` makes anything else an
:class:`~uembed.contract.errors.Internal` (500) and logs it. Each protocol then renders a row its own way::

    /v1 (REST)           v1_error(error)     {"error": kind, "detail": message}, the row's status and headers
    Open Inference REST  oip_error(error)    {"error": message}, the row's status and headers
    Open Inference gRPC  grpc_code(error)    the gRPC status code of the row's HTTP status; the message as details

A scoring request whose client went away gets :func:`client_closed`; scores go out as JSON through
:func:`json_scores` and :func:`json_response`, so every front writes a score with the same digits. The score
request's one-form rule (:func:`form_problem`) is checked alike by the ``/v1`` route and its lean path.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from uembed.contract.errors import UembedError, ValidationFailed, drop_tracebacks, internal

log = logging.getLogger("uembed.protocols")

CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection first
MAX_ROUTING_KEY_CHARS = 256  # a score request's routing_key, as the /v1 route and its lean path limit it


# --- what every front shares -----------------------------------------------------------------------------------
def table_error(exc: Exception, where: str) -> UembedError:
    """``exc`` as a row of the error table: itself when it is one, its tracebacks dropped (:func:`drop_tracebacks`);
    else (a bug, a failed dependency) an ``Internal`` naming only its type, its traceback logged with ``where`` (a
    path, an RPC) and kept."""
    if isinstance(exc, UembedError):
        drop_tracebacks(exc)
    else:
        log.error("unexpected error on %s", where, exc_info=exc)
    return internal(exc)


def client_closed() -> Response:
    """The answer to a scoring request whose client went away: nobody reads it; logged as a client close, as nginx
    does."""
    return Response(status_code=CLIENT_CLOSED)


def json_scores(scores: np.ndarray) -> np.ndarray:
    """Scores as a JSON body carries them: float64, which orjson writes digit for digit as ``json.dumps`` would."""
    return scores.astype(np.float64)


def json_response(body: dict) -> Response:
    """``body`` as JSON, its numpy arrays (:func:`json_scores`) as lists of numbers."""
    return Response(json_bytes(body), media_type="application/json")


def json_bytes(body: dict) -> bytes:
    """``body`` as :func:`json_response` writes it."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


REQUEST_FORM_RULE = "give either examples, or context and candidates"


def form_problem(examples: list | None, context: dict | None, candidates: list | None) -> str | None:
    """What breaks the score request's one-form rule (``examples`` alone, or ``candidates`` with an optional
    ``context``); None when the request keeps it."""
    if examples is not None and (candidates is not None or context is not None):
        return f"{REQUEST_FORM_RULE}, not both"
    if examples is None and candidates is None:
        return f"context goes with candidates: {REQUEST_FORM_RULE}" if context is not None else REQUEST_FORM_RULE
    return None


# --- /v1 -------------------------------------------------------------------------------------------------------
def v1_error(error: UembedError, **extra) -> JSONResponse:
    """``/v1``'s error body, ``{"error": kind, "detail": message}`` (``extra``: a validation error's ``errors``)."""
    return JSONResponse({"error": error.kind, "detail": str(error), **extra}, status_code=error.status,
                        headers=error.headers or None)  # fmt: skip


# The app's error handlers, wired by create_app (the OIP routes catch their own errors). Starlette's own errors (an
# unknown route, a wrong method, a body it cannot parse) take /v1's shape too.
HTTP_KINDS = {404: "not_found", 405: "method_not_allowed"}  # any other 4xx from Starlette: bad_request


async def v1_table_error(request: Request, exc: Exception) -> JSONResponse:
    """Any exception: a row of the error table as it is, anything else an Internal (500), logged."""
    return v1_error(table_error(exc, request.url.path))


async def v1_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body, path or header that does not fit the route's model: every field at fault (at most 20)."""
    found = []
    for e in exc.errors()[:20]:
        if e["type"] == "json_invalid":  # loc is ('body', character offset)
            found.append({"field": "body", "message": f"invalid JSON at character {e['loc'][-1]}", "type": e["type"]})
        else:
            found.append({"field": field_path(tuple(e["loc"])), "message": e["msg"], "type": e["type"]})
    first = found[0] if found else {"field": "body", "message": "invalid request"}
    drop_tracebacks(exc)  # FastAPI raises a body it cannot parse from a frame that holds the error
    return v1_error(ValidationFailed(f"{first['field']}: {first['message']}"), errors=found)


async def v1_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    drop_tracebacks(exc)  # FastAPI's 400 for a body it could not read is raised from a frame that holds it
    if exc.status_code == 400:  # FastAPI could not read the body (not UTF-8, or not JSON): as any bad body
        found = [{"field": "body", "message": str(exc.detail), "type": "body_invalid"}]
        return v1_error(ValidationFailed(f"body: {exc.detail}"), errors=found)
    body = {"error": HTTP_KINDS.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal"),
            "detail": f"{request.url.path}: {exc.detail}"}  # fmt: skip
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:  # Starlette names the first route of the path's methods; a path may have several
        allowed = {method for route in request.app.routes if route.matches(request.scope)[0] != Match.NONE
                   for method in getattr(route, "methods", None) or ()}  # fmt: skip
        headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def field_path(location: tuple) -> str:
    """('body', 'examples', 3, 'user_id') -> 'examples[3].user_id'."""
    out = ""
    for part in location[1:] if location and location[0] in ("body", "path", "header") else location:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


# --- the Open Inference Protocol -------------------------------------------------------------------------------
def oip_error(error: UembedError) -> JSONResponse:
    """The Open Inference Protocol's REST error body, ``{"error": message}``."""
    return JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers or None)


# The error table's HTTP statuses, as gRPC codes (any other: INTERNAL).
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(error: UembedError) -> grpc.StatusCode:
    """The Open Inference Protocol's gRPC status for an error (its message goes as the status details)."""
    return GRPC_CODES.get(error.status, grpc.StatusCode.INTERNAL)
