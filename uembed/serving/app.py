"""The HTTP adapter: FastAPI routes over a :class:`ScoringEngine` held on app state.

``create_app(settings)`` builds the app (tests build their own); the engine starts in the
lifespan and drains admitted requests on shutdown. Every error goes out in one shape,
``{"error": kind, "detail": message}`` (``errors`` too for validation), with the status
and headers of its row in the error table (``uembed/contract/errors.py``): one handler, no special
cases. The OpenAPI document declares every status a route can return, and the examples'
schema (the candidates' and the context's in a ranking request) lists the loaded models'
features with the value types and limits the service enforces, and which fields go
together, so a schema-valid request is refused only for what a schema cannot say
(a model name that is not loaded: 404). The Open Inference Protocol's routes under ``/v2``
(``uembed/serving/protocols/oip_rest.py``) share the engine, the batcher and the error table but
render errors in that protocol's shape, ``{"error": message}``; its gRPC server starts and
stops in the same lifespan. A valid ``/v1/score`` body takes a lean path around the framework
(``uembed/serving/protocols/lean_json.py``: msgspec, then this route's scoring function); any other body
goes through the route, so its errors come from one place.
"""


import asyncio
import gc
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from uembed.contract import errors
from uembed.contract.errors import (
    BodyTooLarge,
    Conflict,
    Internal,
    NotFound,
    RequestTimeout,
    UembedError,
    Unauthorized,
    ValidationFailed,
    internal,
)
from uembed.serving.engine import ScoringEngine
from uembed.serving.registry import NAME_PATTERN, NAME_RULE, describe_models
from uembed.serving.metrics import ServiceMetrics, outcome
from uembed.serving.pipeline.values import NUMERIC_STRING
from uembed.serving.protocols.disconnect import unless_abandoned
from uembed.serving.protocols.lean_json import SCORE_PATH, LeanScoreRoute
from uembed.serving.protocols.oip import InferencePlane
from uembed.serving.protocols.oip_grpc import start_grpc_server, stop_grpc_server
from uembed.serving.protocols.oip_rest import oip_router
from uembed.serving.routing import Route
from uembed.serving.settings import ServiceSettings, load_settings

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
EXAMPLE_RANKING_REQUEST = {
    "context": {"user_id": "196", "age": 49, "gender": "M", "occupation": "writer", "zip_code": "55105"},
    "candidates": [{"movie_id": "242", "genres": ["Comedy"]}, {"movie_id": "302", "genres": ["Crime", "Film-Noir"]}],
}
# Starlette's own errors (an unknown route, a wrong method, a body it cannot parse), in our shape.
HTTP_KINDS = {404: "not_found", 405: "method_not_allowed"}  # any other 4xx from Starlette: bad_request
ERROR_KINDS = tuple(sorted({cls.kind for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, UembedError)}
                           | {*HTTP_KINDS.values(), "bad_request"}))  # fmt: skip


class FieldError(BaseModel):
    field: str = Field(description="Where: `examples[3].user_id`, `context.user_id`, `candidates[3].movie_id`, `version`, `body`.")
    message: str
    type: str = Field(description="pydantic's error type, e.g. `missing`, `string_too_long`, `json_invalid`.")


class ErrorBody(BaseModel):
    """Every error the service sends, 4xx and 5xx."""

    error: Literal[ERROR_KINDS] = Field(description="The kind of error (a row of the error table).")  # type: ignore[valid-type]
    detail: str = Field(description="What is wrong, naming the field, file or value.")
    errors: list[FieldError] | None = Field(None, description="Validation only: every field at fault (at most 20).")


class ScoreResponse(BaseModel):
    model: str = Field(description="Name of the model that scored the examples.")
    version: str = Field(description="Version that scored them (in-flight requests keep theirs across a reload).")
    scores: list[float] = Field(description="Probability per example (per candidate), in request order.")


class LoadResponse(BaseModel):
    model: str
    version: str


class LoadRequest(BaseModel):
    version: str = Field(pattern=NAME_PATTERN, description=f"Version folder under <bundle_store>/<name>/: {NAME_RULE}.")


class VersionResponse(BaseModel):
    model: str
    version: str
    primary: bool = Field(description="Whether requests naming no version (and no routing rule) get this version.")


class UnloadResponse(BaseModel):
    model: str
    version: str
    redis_keys_deleted: int | None = Field(
        description="Keys of the version's rows deleted from Redis; null without Redis, and with row_source=redis "
        "(the publication, which other replicas may read, is kept)."
    )


VersionName = Annotated[str, Field(pattern=NAME_PATTERN)]
Weight = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]


class RoutingRule(BaseModel):
    """A model's routing rule: a weighted split between loaded versions, sticky per user, and a shadow."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"split": {"1": 90, "2": 10}, "sticky_feature": "user_id", "shadow": "3", "shadow_fraction": 0.5}]})  # fmt: skip

    split: dict[VersionName, Weight] = Field(
        min_length=1, max_length=16,
        description="Loaded version -> weight; the weights sum to 1 or to 100. A version keeps the range of users "
        "its place in this order gives it: add weight to the last one to move users onto it only.",
    )  # fmt: skip
    sticky_feature: str | None = Field(
        None, min_length=1, max_length=128,
        description="The feature whose value keeps a user on one version (looked up in the context, else the first "
        "example or candidate); a request's routing_key wins over it. None: only routing_key is sticky, and a "
        "request without one gets a random version by the weights.",
    )  # fmt: skip
    shadow: VersionName | None = Field(
        None, description="A loaded version that also scores a copy of the requests, its scores only metered."
    )
    shadow_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of requests (by routing key, else at random) copied to the shadow."
    )

    @field_validator("split")
    @classmethod
    def weights_sum(cls, split: dict[str, float]) -> dict[str, float]:
        total = sum(split.values())
        if not (abs(total - 1) <= 1e-6 or abs(total - 100) <= 1e-4):
            raise PydanticCustomError("weights_sum", f"the weights sum to {total:g}; they must sum to 1 or to 100")
        return split


class RoutingResponse(BaseModel):
    model: str
    routing: dict | None = Field(description="The rule now in force, weights as shares of 1; null: none.")


def declared(*kinds: type[UembedError]) -> dict:
    """OpenAPI responses for these rows of the error table, all with the one error body."""
    out: dict[int, dict] = {}
    for kind in (*kinds, Internal):
        entry = out.setdefault(kind.status, {"model": ErrorBody, "description": ""})
        entry["description"] = "; ".join(filter(None, (entry["description"], f"{kind.kind}: {kind.description}")))
    return out


BODY_ERRORS = (ValidationFailed, BodyTooLarge, RequestTimeout)


# The two forms of a score request, as the schema states them (so a schema-valid body is never refused for its form).
REQUEST_FORMS = [
    {"title": "Examples", "required": ["examples"], "not": {"anyOf": [{"required": ["context"]}, {"required": ["candidates"]}]}},
    {"title": "Ranking", "required": ["candidates"], "not": {"required": ["examples"]}},
]
REQUEST_FORM_RULE = "give either examples, or context and candidates"


def request_forms_schema(schema: dict) -> None:
    # The fields are optional to pydantic (it checks the form after them); the schema says which go together,
    # and drops the `default: null` that would contradict their types (null is not accepted for any of them).
    for name in ("examples", "context", "candidates"):
        schema["properties"][name].pop("default", None)
    schema["oneOf"] = REQUEST_FORMS
    schema["examples"] = [EXAMPLE_REQUEST, EXAMPLE_RANKING_REQUEST]


class ScoreRequestForms(BaseModel):
    """Either ``examples``, or ``candidates`` with an optional ``context`` shared by them all; the fields are
    added per deployment by :func:`score_request_model`, with its limits."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=request_forms_schema)

    @model_validator(mode="after")
    def one_form(self):
        if self.examples is not None and (self.candidates is not None or self.context is not None):
            raise PydanticCustomError("request_form", f"{REQUEST_FORM_RULE}, not both")
        if self.examples is None and self.candidates is None:
            rule = f"context goes with candidates: {REQUEST_FORM_RULE}" if self.context is not None else REQUEST_FORM_RULE
            raise PydanticCustomError("request_form", rule)
        return self


def score_request_model(settings: ServiceSettings) -> type[BaseModel]:
    """The request body, with this deployment's limits in its schema."""
    example = dict[Annotated[str, Field(max_length=128)], FeatureValue]
    examples = Annotated[list[example], Field(min_length=1, max_length=settings.max_examples)]
    return create_model(
        "ScoreRequest",
        __base__=ScoreRequestForms,
        __doc__="Either `examples`, each with all its features, or `candidates` and a `context`: the context's "
        "features are the same for every candidate (a ranking request's user), sent and encoded once. The scores "
        "are identical to sending each candidate with the context's features copied into it.",
        examples=(examples, Field(None, description="Feature name -> value, per example.")),
        context=(example, Field(None, description="Feature name -> value, shared by every candidate: encoded once "
                                "per request. A feature goes in the context or in the candidates, not both.")),  # fmt: skip
        candidates=(examples, Field(None, description="Feature name -> value, per candidate (with `context`); the "
                                    "same limits as `examples`. Scores come back in candidate order.")),  # fmt: skip
        model=(str | None, Field(None, max_length=128, description="Model name; the first loaded model when left out.")),
        version=(str | None, Field(None, max_length=128, description="A loaded version of the model (404 if it is "
                                   "not loaded); left out: the model's routing rule, else its primary version.")),  # fmt: skip
        routing_key=(str | None, Field(None, max_length=256, description="Keeps a user on one version under a "
                                       "routing rule (wins over the rule's sticky feature); an integer id as its digits.")),  # fmt: skip
    )


def feature_schema(spec, settings: ServiceSettings) -> dict:
    """What one feature's value may be, as the encoder checks it (``uembed/serving/pipeline/encoding.py``)."""
    text = {"type": "string", "maxLength": settings.max_value_chars}
    scalars = [text, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
    if spec.kind == "numeric":
        return {"anyOf": [{"type": "number"}, {"type": "null"}, {**text, "pattern": NUMERIC_STRING}],
                "description": "A finite number (or a string of one); null when missing."}
    if spec.multivalent:
        items = {"type": "array", "maxItems": settings.max_list_values, "items": {"anyOf": scalars}}
        return {"anyOf": [items, *scalars], "description": f"A list (or one string split on {spec.separator!r})."}
    return {"anyOf": scalars}


def examples_schema(engine: ScoringEngine, settings: ServiceSettings) -> dict | None:
    """An example's schema from the loaded models' features (their union when several are loaded)."""
    properties: dict[str, dict] = {}
    for runtime in engine.registry.loaded():
        for name, spec in runtime.bundle.feature_specs.items():
            properties.setdefault(name, feature_schema(spec, settings))
    if not properties:
        return None
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "description": "Feature name -> value. Features of the loaded models: " + ", ".join(properties)}  # fmt: skip


def given_twice_schema(features: list[str]) -> dict:
    """A ranking request that gives a feature both in its context and in a candidate (refused with a 422)."""
    return {
        "required": ["context", "candidates"],
        "anyOf": [
            {"properties": {"context": {"required": [name]}, "candidates": {"contains": {"required": [name]}}}}
            for name in features
        ],
    }


def field_path(location: tuple) -> str:
    """('body', 'examples', 3, 'user_id') -> 'examples[3].user_id'."""
    out = ""
    for part in location[1:] if location and location[0] in ("body", "path", "header") else location:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def error_response(error: UembedError, **extra) -> JSONResponse:
    return JSONResponse({"error": error.kind, "detail": str(error), **extra}, status_code=error.status,
                        headers=error.headers or None)  # fmt: skip


class LimitsAndMetrics:
    """ASGI middleware: a body over ``max_body_bytes`` (413) or slower than ``body_timeout_s`` (408) is refused
    and its connection closed; every request is timed and counted."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await error_response(BodyTooLarge(f"body: {int(length)} bytes is over the limit of {self.max_body_bytes}"))(scope, receive, send)
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
                await error_response(refused)(scope, receive, send)
        finally:
            self._observe(scope, status, started)

    def _observe(self, scope, status: int, started: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.request_seconds.labels(route, outcome(status)).observe(time.perf_counter() - started)
        self.metrics.requests.labels(route, str(status)).inc()


def create_app(settings: ServiceSettings | None = None, engine: ScoringEngine | None = None) -> FastAPI:
    settings = settings or load_settings()
    engine = engine or ScoringEngine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.registry.models:
            if not settings.bundles:
                raise UembedError("no bundle to serve: set UEMBED_BUNDLES, or start with `uembed serve` (demo bundle)")
            for path in settings.bundles:
                engine.registry.load(path)
        # Bundles, sessions and caches live as long as the process: keep them out of GC passes (tail latency).
        gc.collect()
        gc.freeze()
        if settings.gc_gen0_threshold:
            _, older, oldest = gc.get_threshold()
            gc.set_threshold(settings.gc_gen0_threshold, older, oldest)
        await engine.astart()
        try:
            grpc_server = await start_grpc_server(plane, settings)
        except BaseException:
            await engine.astop()
            raise
        yield
        await stop_grpc_server(grpc_server)  # its calls in flight finish before the engine drains
        await engine.astop()

    app = FastAPI(
        title="uembed scoring service",
        version="1",
        summary="Scores ranking examples with unified-embedding models from exported bundles.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    plane = InferencePlane(engine, settings)  # the Open Inference Protocol, REST here and gRPC from the lifespan
    app.include_router(oip_router(plane))
    ScoreRequest = score_request_model(settings)

    @app.exception_handler(UembedError)
    async def uembed_error(request: Request, exc: UembedError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        found = []
        for e in exc.errors()[:20]:
            if e["type"] == "json_invalid":  # loc is ('body', character offset)
                found.append({"field": "body", "message": f"invalid JSON at character {e['loc'][-1]}", "type": e["type"]})
            else:
                found.append({"field": field_path(tuple(e["loc"])), "message": e["msg"], "type": e["type"]})
        first = found[0] if found else {"field": "body", "message": "invalid request"}
        return error_response(ValidationFailed(f"{first['field']}: {first['message']}"), errors=found)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not read the body (not UTF-8, or not JSON): as any bad body
            found = [{"field": "body", "message": str(exc.detail), "type": "body_invalid"}]
            return error_response(ValidationFailed(f"body: {exc.detail}"), errors=found)
        body = {"error": HTTP_KINDS.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal"),
                "detail": f"{request.url.path}: {exc.detail}"}  # fmt: skip
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names the first route of the path's methods; a path may have several
            allowed = {method for route in app.routes if route.matches(request.scope)[0] != Match.NONE
                       for method in getattr(route, "methods", None) or ()}  # fmt: skip
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(internal(exc))

    @app.post(
        SCORE_PATH,
        response_model=ScoreResponse,
        responses=declared(*BODY_ERRORS, errors.ExampleError, NotFound, errors.Overloaded, errors.NotReady,
                           errors.RowsUnavailable, errors.DeadlineExceeded),  # fmt: skip
        summary="Score examples, or a context's candidates",
        description="Each example maps feature names to values; the schema lists the loaded models' features and "
        "what each takes. A ranking request sends the features its candidates share once, as `context`, and "
        "`candidates` with their own: the context is checked and encoded once, and the scores are those of the "
        "flat examples. Errors name `examples[i].feature`, `context.feature` or `candidates[i].feature`. A "
        "`model` or `version` that is not loaded is a 404. With several models loaded the schema lists the union of their "
        "features, and a feature of another model is a 422 naming it.",
    )
    async def score(request: Request, body: ScoreRequest) -> Response:  # type: ignore[valid-type]
        return await score_examples(request, body.examples, body.context, body.candidates, body.model, body.version,
                                    body.routing_key)  # fmt: skip

    async def score_examples(request: Request, examples: list | None, context: dict | None, candidates: list | None,
                             model: str | None, version: str | None, routing_key: str | None) -> Response:  # fmt: skip
        """The route's work once its body is valid, for the route and its lean path (``LeanScoreRoute``) alike."""
        if candidates is not None:
            scoring = engine.score(candidates, model, context=context or {}, version=version, routing_key=routing_key)
        else:
            scoring = engine.score(examples, model, version=version, routing_key=routing_key)
        scored = await unless_abandoned(request, scoring)
        if scored is None:
            return Response(status_code=499)  # nobody reads it; logged as a client close, as nginx does
        scores, runtime = scored
        # orjson writes the float64 scores digit for digit as json.dumps would, 20x faster (0.17 ms for 500).
        body = {"model": runtime.name, "version": runtime.version, "scores": scores.astype(np.float64)}
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    # Valid score bodies skip the framework (uembed/serving/protocols/lean_json.py); the limits and metrics wrap both paths.
    score_route = next(route for route in app.routes if getattr(route, "path", None) == SCORE_PATH)
    app.add_middleware(LeanScoreRoute, route=score_route, max_examples=settings.max_examples, score=score_examples,
                       render_error=error_response)  # fmt: skip
    app.add_middleware(LimitsAndMetrics, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_ms / 1000, metrics=engine.metrics)  # fmt: skip

    @app.get("/v1/models", summary="Loaded models and versions, features, tables with bytes per tier, routing rules",
             responses=declared())  # fmt: skip
    async def models() -> dict:
        return {"models": describe_models(engine.registry), "routing": engine.registry.describe_routing()}

    def require_token(authorization: str | None) -> None:
        """The admin calls' guard: off (404) without a configured token, 401 without the right bearer token."""
        if settings.reload_token is None:
            raise NotFound("the admin endpoints are off: set UEMBED_RELOAD_TOKEN to enable them")
        expected = f"Bearer {settings.reload_token.get_secret_value()}"
        if not authorization or not secrets.compare_digest(authorization.encode(), expected.encode()):
            raise Unauthorized("Authorization: a valid bearer token is required")

    ModelName = Annotated[str, Path(pattern=NAME_PATTERN, description=f"Model name: {NAME_RULE}.")]
    VersionPath = Annotated[str, Path(pattern=NAME_PATTERN, description=f"Version folder under <bundle_store>/<name>/: {NAME_RULE}.")]
    Authorization = Annotated[str | None, Header()]

    @app.post(
        "/v1/models/{name}/load",
        response_model=LoadResponse,
        responses=declared(*BODY_ERRORS, Unauthorized, NotFound, errors.InvalidName, errors.BundleError, errors.NotReady),
        summary="Load another version from the bundle store (bearer token)",
        description="404 when the endpoint is off (no UEMBED_RELOAD_TOKEN), or there is no such bundle; 422 when "
        "the bundle cannot be served. Requests already admitted finish on the version they started with.",
    )
    async def load_model(body: LoadRequest, name: ModelName, authorization: Authorization = None) -> dict:
        require_token(authorization)
        runtime = await engine.registry.reload(name, body.version)
        return {"model": runtime.name, "version": runtime.version}

    @app.post(
        "/v1/models/{name}/versions/{version}",
        response_model=VersionResponse,
        responses=declared(Unauthorized, NotFound, errors.InvalidName, errors.BundleError, errors.NotReady),
        summary="Load a version beside the loaded ones, not primary (bearer token)",
        description="Requests get it when they name it (`version`) or a routing rule sends them; the first version "
        "of a model is its primary. A version already loaded is answered as it is. 404 when the admin endpoints "
        "are off (no UEMBED_RELOAD_TOKEN) or there is no such bundle; 422 when the bundle cannot be served.",
    )
    async def load_version(name: ModelName, version: VersionPath, authorization: Authorization = None) -> dict:
        require_token(authorization)
        runtime = await engine.registry.add_version(name, version)
        return {"model": runtime.name, "version": runtime.version, "primary": engine.registry.models[name] is runtime}

    @app.delete(
        "/v1/models/{name}/versions/{version}",
        response_model=UnloadResponse,
        responses=declared(ValidationFailed, Unauthorized, NotFound, Conflict, errors.NotReady),
        summary="Unload a version and delete its rows from Redis (bearer token)",
        description="409 for the primary version (make another primary first) or a version the routing rule uses. "
        "Requests already admitted finish on it; then its keys are deleted from Redis (SCAN and UNLINK, in "
        "batches; on a cluster, every node). 404 when the admin endpoints are off or the version is not loaded.",
    )
    async def unload_version(name: ModelName, version: VersionPath, authorization: Authorization = None) -> dict:
        require_token(authorization)
        runtime, deleted = await engine.remove_version(name, version)
        return {"model": runtime.name, "version": runtime.version, "redis_keys_deleted": deleted}

    @app.put(
        "/v1/models/{name}/routing",
        response_model=RoutingResponse,
        responses=declared(*BODY_ERRORS, Unauthorized, NotFound),
        summary="Set a model's routing rule: weighted split, sticky key, shadow (bearer token)",
        description="The versions named must be loaded (404 naming `split.<version>` or `shadow`); weights that do "
        "not sum to 1 or 100 are a 422 naming `split`. Visible in GET /v1/models.",
    )
    async def set_routing(body: RoutingRule, name: ModelName, authorization: Authorization = None) -> dict:
        require_token(authorization)
        route = Route(name, body.split, body.sticky_feature, body.shadow, body.shadow_fraction)
        await engine.registry.set_routing(route)
        return {"model": name, "routing": route.describe()}

    @app.delete(
        "/v1/models/{name}/routing",
        response_model=RoutingResponse,
        responses=declared(ValidationFailed, Unauthorized, NotFound),
        summary="Remove a model's routing rule: its primary scores every request naming no version (bearer token)",
    )
    async def clear_routing(name: ModelName, authorization: Authorization = None) -> dict:
        require_token(authorization)
        engine.registry.clear_routing(name)
        return {"model": name, "routing": None}

    @app.get("/healthz", summary="The process is alive", responses=declared())
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded and a one-example score succeeds",
             responses=declared(errors.NotReady, errors.Overloaded, errors.RowsUnavailable, errors.DeadlineExceeded))  # fmt: skip
    async def readyz() -> dict:
        runtime = await engine.ready()
        # The worker that answered: with several workers, each connection reaches one of them.
        return {"status": "ready", "model": runtime.name, "version": runtime.version, "worker": os.getpid()}

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"description": "The Prometheus text format", "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
                   **declared()},  # fmt: skip
    )
    async def metrics() -> Response:
        await asyncio.to_thread(engine.registry.observe_files)
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict:
        # Built per call (it is small), so the examples' schema follows the models a reload brings in.
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        example = examples_schema(engine, settings)
        if example is not None:
            request = schema["components"]["schemas"]["ScoreRequest"]
            fields = request["properties"]
            fields["examples"]["items"] = fields["candidates"]["items"] = example
            fields["context"] = {**example, "description": fields["context"]["description"]}
            request["not"] = given_twice_schema(list(example["properties"]))
        return schema

    app.openapi = openapi
    return app
