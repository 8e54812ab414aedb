"""The HTTP adapter: FastAPI routes over a :class:`ScoringEngine` held on app state.

``create_app(settings)`` builds the app (tests build their own); the engine starts in the
lifespan and drains admitted requests on shutdown. Every error a client can cause is a
4xx whose message names the field: request-shape errors from pydantic, feature values
from the model's own check, and one handler maps the error taxonomy to status codes.
"""


import gc
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, WithJsonSchema, create_model

from model.errors import UembedError
from service.engine import Overloaded, ScoringEngine
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings, load_settings

log = logging.getLogger("uembed.app")

FEATURE_VALUE_SCHEMA = {
    "description": "A string, number, boolean or null; a list of those for a multivalent feature. "
    "A feature left out (or null, or an empty list) scores with the missing value's row.",
    "anyOf": [
        {"type": "string"},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}},
    ],
}
FeatureValue = Annotated[Any, WithJsonSchema(FEATURE_VALUE_SCHEMA)]
EXAMPLE_REQUEST = {
    "examples": [
        {"user_id": "196", "movie_id": "242", "age": 49, "gender": "M", "occupation": "writer",
         "zip_code": "55105", "genres": ["Comedy"]},
        {"user_id": "186", "movie_id": "302", "genres": ["Crime", "Film-Noir", "Mystery", "Thriller"]},
    ]
}


class ScoreResponse(BaseModel):
    model: str = Field(description="Name of the model that scored the examples.")
    version: str = Field(description="Version that scored them (in-flight requests keep theirs across a reload).")
    scores: list[float] = Field(description="Probability per example, in request order.")


class LoadRequest(BaseModel):
    version: str = Field(min_length=1, max_length=128, description="Version folder under <bundle_store>/<name>/.")


class BodyTooLarge(UembedError):
    kind = "body_too_large"
    status = 413


class Unauthorized(UembedError):
    kind = "unauthorized"
    status = 401


def score_request_model(settings: ServiceSettings) -> type[BaseModel]:
    """The request body, with this deployment's limits in its schema."""
    return create_model(
        "ScoreRequest",
        examples=(
            Annotated[
                list[dict[Annotated[str, Field(max_length=128)], FeatureValue]],
                Field(min_length=1, max_length=settings.max_examples, description="Feature name -> value, per example."),
            ],
            ...,
        ),
        model=(str | None, Field(None, max_length=128, description="Model name; the first loaded model when left out.")),
        __config__={"extra": "forbid", "json_schema_extra": {"examples": [EXAMPLE_REQUEST]}},
    )


def field_path(location: tuple) -> str:
    """('body', 'examples', 3, 'user_id') -> 'examples[3].user_id'."""
    out = ""
    for part in location[1:] if location and location[0] == "body" else location:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def error_response(status: int, kind: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": message, **extra}, status_code=status, headers=headers)


class LimitsAndMetrics:
    """ASGI middleware: refuses bodies over ``max_body_bytes`` (413) and times every request."""

    def __init__(self, app, max_body_bytes: int, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            response = error_response(413, BodyTooLarge.kind, f"body: {int(length)} bytes is over the limit of {self.max_body_bytes}")
            await response(scope, receive, send)
            return self._observe(scope, 413, started)
        received = 0
        too_large = False

        async def limited_receive():
            # A streamed body over the limit: the app sees a disconnect, the client gets our 413.
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                too_large = True
                return {"type": "http.disconnect"}
            return message

        async def recording_send(message):
            nonlocal status
            if too_large:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                await self.app(scope, limited_receive, recording_send)
            except Exception:
                if not too_large:
                    raise
            if too_large:
                status = 413
                response = error_response(413, BodyTooLarge.kind, f"body: over the limit of {self.max_body_bytes} bytes")
                await response(scope, receive, send)
        finally:
            self._observe(scope, status, started)

    def _observe(self, scope, status: int, started: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        outcome = "ok" if status < 400 else {503: "overloaded", 504: "timeout"}.get(status, "client_error" if status < 500 else "error")
        self.metrics.request_seconds.labels(route, outcome).observe(time.perf_counter() - started)
        self.metrics.requests.labels(route, str(status)).inc()


def create_app(settings: ServiceSettings | None = None, engine: ScoringEngine | None = None) -> FastAPI:
    settings = settings or load_settings()
    engine = engine or ScoringEngine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.models:
            if not settings.bundles:
                raise UembedError("no bundle to serve: set UEMBED_BUNDLES, or start with `uembed serve` (demo bundle)")
            for path in settings.bundles:
                engine.load(path)
        # Bundles, sessions and caches live as long as the process: keep them out of GC passes (tail latency).
        gc.collect()
        gc.freeze()
        if settings.gc_gen0_threshold:
            _, older, oldest = gc.get_threshold()
            gc.set_threshold(settings.gc_gen0_threshold, older, oldest)
        await engine.astart()
        yield
        await engine.astop()

    app = FastAPI(
        title="uembed scoring service",
        version="1",
        summary="Scores ranking examples with unified-embedding models from exported bundles.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.add_middleware(LimitsAndMetrics, max_body_bytes=settings.max_body_bytes, metrics=engine.metrics)
    ScoreRequest = score_request_model(settings)

    @app.exception_handler(UembedError)
    async def uembed_error(request: Request, exc: UembedError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(exc, Overloaded) else None
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(exc.status, exc.kind, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors()[:20]:
            if e["type"] == "json_invalid":  # loc is ('body', character offset)
                errors.append({"field": "body", "message": f"invalid JSON at character {e['loc'][-1]}", "type": e["type"]})
            else:
                errors.append({"field": field_path(tuple(e["loc"])), "message": e["msg"], "type": e["type"]})
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        return error_response(422, "validation", f"{first['field']}: {first['message']}", errors=errors)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal", f"internal error ({type(exc).__name__}); see the service log")

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses={413: {"description": "Body too large"}, 422: {"description": "Invalid example; the message names the field"},
                   503: {"description": "Overloaded (Retry-After set) or no model"}, 504: {"description": "Deadline passed"}},
        summary="Score examples",
    )
    async def score(body: ScoreRequest) -> JSONResponse:  # type: ignore[valid-type]
        scores, runtime = await engine.score(body.examples, body.model)
        return JSONResponse({"model": runtime.name, "version": runtime.version, "scores": scores.tolist()})

    @app.get("/v1/models", summary="Loaded models, features and tables with bytes per tier")
    async def models() -> dict:
        return {"models": engine.describe()}

    @app.post("/v1/models/{name}/load", summary="Load another version from the bundle store (bearer token)")
    async def load_model(name: str, body: LoadRequest, authorization: Annotated[str | None, Header()] = None) -> dict:
        if settings.reload_token is None:
            return error_response(404, "not_found", "the reload endpoint is off: set UEMBED_RELOAD_TOKEN to enable it")
        expected = f"Bearer {settings.reload_token.get_secret_value()}"
        if not authorization or not secrets.compare_digest(authorization.encode(), expected.encode()):
            raise Unauthorized("Authorization: a valid bearer token is required")
        runtime = await engine.reload(name, body.version)
        return {"model": runtime.name, "version": runtime.version}

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded and a one-example score succeeds")
    async def readyz() -> dict:
        runtime = await engine.ready()
        return {"status": "ready", "model": runtime.name, "version": runtime.version}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
