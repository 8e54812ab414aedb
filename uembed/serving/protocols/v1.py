"""The ``/v1`` REST front: scoring, the loaded models, and the admin calls that load versions and set routing rules.

    score_route = add_v1_routes(app, engine, settings)    # the routes over one engine, on the app
    app.openapi = partial(v1_openapi, app, engine, settings)

Every error goes out in one shape, ``{"error": kind, "detail": message}`` (``errors`` too for validation), with the
status and headers of its row in the error table (``uembed/serving/protocols/render.py`` renders it; the handlers
there are wired by the app). The OpenAPI document declares every status a route can return, and the examples'
schema (the candidates' and the context's in a ranking request) lists the loaded models' features with the value
types and limits the service enforces, and which fields go together, so a schema-valid request is refused only
for what a schema cannot say (a model name that is not loaded: 404). A valid ``/v1/score`` body takes a lean path
around the framework (``uembed/serving/protocols/lean_json.py``: msgspec, then :func:`score_examples`); any other
body goes through the route, so its errors come from one place.
"""

import secrets
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Path, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, model_validator
from pydantic_core import PydanticCustomError

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
)
from uembed.contract.hashing import hashing_backend
from uembed.serving.engine import ScoringEngine
from uembed.serving.pipeline.values import NUMERIC_STRING
from uembed.serving.protocols.bodies import CheckedBodyRoute
from uembed.serving.protocols.disconnect import unless_abandoned
from uembed.serving.protocols.lean_json import SCORE_PATH
from uembed.serving.protocols.render import (
    HTTP_KINDS,
    MAX_ROUTING_KEY_CHARS,
    client_closed,
    form_problem,
    json_response,
    json_scores,
)
from uembed.serving.registry import MAX_NAME_CHARS, NAME_PATTERN, NAME_RULE, ModelRegistry
from uembed.serving.routing import Route
from uembed.serving.settings import ServiceSettings

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
MAX_WEIGHT = 1e6
# Strict: a weight is a JSON number (not "90", not true), so the schema (type number) and the server agree.
Weight = Annotated[float, Field(strict=True, gt=0, le=MAX_WEIGHT, allow_inf_nan=False)]


class RoutingRule(BaseModel):
    """A model's routing rule: a weighted split between loaded versions, sticky per user, and a shadow."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"split": {"1": 90, "2": 10}, "sticky_feature": "user_id", "shadow": "3", "shadow_fraction": 0.5}]})  # fmt: skip

    split: dict[VersionName, Weight] = Field(
        min_length=1, max_length=16,
        description="Loaded version -> weight: positive numbers up to 1,000,000, relative to each other ({\"1\": 3, "
        "\"2\": 1} sends 75% to version 1; shares of 1 or percentages work as they are). A version keeps the range of "
        "users its place in this order gives it: add weight to the last one to move users onto it only.",
    )  # fmt: skip
    sticky_feature: str | None = Field(
        None, min_length=1, max_length=MAX_NAME_CHARS,
        description="The feature whose value keeps a user on one version (looked up in the context, else the first "
        "example or candidate): a one-value feature of every version in the rule (422 naming it otherwise). A "
        "request's routing_key wins over it. None: only routing_key is sticky, and a request without one gets a "
        "random version by the weights.",
    )  # fmt: skip
    shadow: VersionName | None = Field(
        None, description="A loaded version that also scores a copy of the requests, its scores only metered."
    )
    shadow_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of requests (by routing key, else at random) copied to the shadow."
    )


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
        problem = form_problem(self.examples, self.context, self.candidates)
        if problem:
            raise PydanticCustomError("request_form", problem)
        return self


def score_request_model(settings: ServiceSettings) -> type[BaseModel]:
    """The request body, with this deployment's limits in its schema."""
    example = dict[Annotated[str, Field(max_length=MAX_NAME_CHARS)], FeatureValue]
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
        model=(str | None, Field(None, max_length=MAX_NAME_CHARS,
                                 description="Model name; the first loaded model when left out.")),  # fmt: skip
        version=(str | None, Field(None, max_length=MAX_NAME_CHARS, description="A loaded version of the model (404 "
                                   "if it is not loaded); left out: the model's routing rule, else its primary version.")),  # fmt: skip
        routing_key=(str | None, Field(None, max_length=MAX_ROUTING_KEY_CHARS, description="Keeps a user on one version "
                                       "under a routing rule (wins over the rule's sticky feature); an integer id as its digits.")),  # fmt: skip
    )


def feature_schema(spec, settings: ServiceSettings) -> dict:
    """What one feature's value may be, as the encoder checks it (``uembed/serving/pipeline/values.py``)."""
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


async def score_examples(engine: ScoringEngine, request: Request, *body_fields) -> Response:
    """The response to :func:`scored_body` (the route's and its lean path's, ``LeanScoreRoute``)."""
    body = await scored_body(engine, request, *body_fields)
    return client_closed() if body is None else json_response(body)


async def scored_body(engine: ScoringEngine, request: Request | None, examples: list | None, context: dict | None,
                      candidates: list | None, model: str | None, version: str | None,
                      routing_key: str | None) -> dict | None:  # fmt: skip
    """The body of a valid score request's answer (None: its client went away), for the route, its lean path and its
    fast lane (``FastScoreLane``) alike: the request resolved to its version once, then scored by it. Without a
    ``request`` the caller watches its connection (the fast lane's protocol cancels the work when it is lost)."""
    if candidates is not None:  # a ranking request: the candidates scored as examples, with their context
        examples, context = candidates, context or {}
    target = engine.resolve(model, version, routing_key, examples, context)
    work = engine.score_resolved(target, examples, context, owned=True)  # decoded from this request's body
    scores = await (work if request is None else unless_abandoned(request, work))
    if scores is None:
        return None
    runtime = target.runtime
    return {"model": runtime.name, "version": runtime.version, "scores": json_scores(scores)}


def add_v1_routes(app: FastAPI, engine: ScoringEngine, settings: ServiceSettings) -> APIRoute:
    """The ``/v1`` routes over ``engine`` on ``app`` itself (so its routes list them: the 405 handler's ``Allow``
    header reads them), with this deployment's limits in their schema; returns the ``/v1/score`` route, whose
    requests the lean path answers in its name."""
    ScoreRequest = score_request_model(settings)
    app.router.route_class = CheckedBodyRoute  # the routes added below, and the app's after them

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
        "`model` or `version` that is not loaded is a 404. With several models loaded the schema lists the union of "
        "their features, and a feature of another model is a 422 naming it.",
    )
    async def score(request: Request, body: ScoreRequest) -> Response:  # type: ignore[valid-type]
        return await score_examples(engine, request, body.examples, body.context, body.candidates, body.model,
                                    body.version, body.routing_key)  # fmt: skip

    @app.get("/v1/models", summary="Loaded models and versions, features, tables with bytes per tier, routing rules",
             responses=declared())  # fmt: skip
    async def models() -> dict:
        return {"models": describe_models(engine.registry), "routing": engine.registry.describe_routing(),
                "desired_state": engine.desired.describe(), "hashing": hashing_backend()}  # fmt: skip

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
        runtime = await engine.load(name, body.version)
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
        runtime = await engine.add_version(name, version)
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
        runtime, deleted = await engine.unload_version(name, version)
        return {"model": runtime.name, "version": runtime.version, "redis_keys_deleted": deleted}

    @app.put(
        "/v1/models/{name}/routing",
        response_model=RoutingResponse,
        responses=declared(*BODY_ERRORS, Unauthorized, NotFound),
        summary="Set a model's routing rule: weighted split, sticky key, shadow (bearer token)",
        description="The versions named must be loaded (404 naming `split.<version>` or `shadow`); weights are "
        "relative positive numbers (a 422 naming `split.<version>` otherwise), and `sticky_feature` a one-value feature "
        "of every version named (a 422 naming it otherwise). Visible in GET /v1/models.",
    )
    async def set_routing(body: RoutingRule, name: ModelName, authorization: Authorization = None) -> dict:
        require_token(authorization)
        route = Route(name, body.split, body.sticky_feature, body.shadow, body.shadow_fraction)
        await engine.set_routing(route)
        return {"model": name, "routing": route.describe()}

    @app.delete(
        "/v1/models/{name}/routing",
        response_model=RoutingResponse,
        responses=declared(ValidationFailed, Unauthorized, NotFound),
        summary="Remove a model's routing rule: its primary scores every request naming no version (bearer token)",
    )
    async def clear_routing(name: ModelName, authorization: Authorization = None) -> dict:
        require_token(authorization)
        await engine.clear_routing(name)
        return {"model": name, "routing": None}

    return next(route for route in app.routes if getattr(route, "path", None) == SCORE_PATH)


def v1_openapi(app: FastAPI, engine: ScoringEngine, settings: ServiceSettings) -> dict:
    """The app's OpenAPI document, built per call (it is small), so the examples' schema follows the models a
    reload brings in."""
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    example = examples_schema(engine, settings)
    if example is not None:
        request = schema["components"]["schemas"]["ScoreRequest"]
        fields = request["properties"]
        fields["examples"]["items"] = fields["candidates"]["items"] = example
        fields["context"] = {**example, "description": fields["context"]["description"]}
        request["not"] = given_twice_schema(list(example["properties"]))
    return schema


def describe_models(registry: ModelRegistry) -> list[dict]:
    """Every loaded version as /v1/models shows it."""
    out = []
    for runtime in registry.loaded():
        memory = runtime.memory_bytes()
        primary = registry.models.get(runtime.name) is runtime
        out.append(
            {
                "name": runtime.name,
                "version": runtime.version,
                "primary": primary,
                "method": runtime.plan.method,
                "default": primary and runtime.name == registry.default_model,
                "device": runtime.device,
                "features": [spec.to_dict() | {"width": runtime.widths[spec.name]} for spec in runtime.bundle.feature_specs.values()],
                "tables": [
                    {
                        "name": store.table.name,
                        "rows": store.table.rows,
                        "dim": store.table.dim,
                        "dtype": store.table.dtype,
                        "bytes": {**memory[store.table.name], "file": store.table.nbytes if store.table.files else 0},  # mapped
                        "hot_rows_capacity": store.hot.capacity if store.hot is not None else 0,
                        "hot_rows_on_device": store.hot_on_device,
                        "redis": registry.redis is not None,
                    }
                    for store in runtime.stores
                ],
                "training": {k: runtime.bundle.manifest["training"].get(k) for k in ("dataset", "test_auc", "test_logloss")},
                "row_checks": runtime.bundle.row_checks.describe() if runtime.bundle.row_checks else "passed",
                "row_updates": registry.updates.describe(runtime) if registry.updates is not None else None,
            }
        )
    return out
