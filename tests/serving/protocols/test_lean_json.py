"""The lean path of POST /v1/score (uembed/serving/protocols/lean_json.py): valid bodies skip the framework, every other
body is replayed to the FastAPI route, so both paths answer as the route does.

The bad bodies of tests/serving/test_app.py (malformed JSON, bad UTF-8, the form rule, limits, ...) all pass
through the lean path first; these tests add the cases where msgspec and pydantic could disagree.
"""

import json

import pytest

from tests.serving.inprocess import InProcessService
from uembed.serving.protocols.lean_json import LeanScoreRoute, json_content_type

GOOD = {"user_id": "196", "movie_id": "242", "genres": ["Comedy"]}
CONTEXT = {"user_id": 196, "age": 49, "gender": "M"}
CANDIDATES = [{"movie_id": 242, "genres": ["Comedy"]}, {"movie_id": "302", "genres": ["Crime", "Film-Noir"]}]


class CountingApp:
    """Stands between the lean path and the framework, counting the requests the lean path hands on."""

    def __init__(self, app) -> None:
        self.app = app
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += scope["type"] == "http"
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def service(synthetic_store):
    service = InProcessService(bundles=[synthetic_store / "movielens" / "1"], max_examples=8, max_value_chars=64)
    assert service.get("/healthz").status_code == 200  # builds the middleware stack
    layer = service.app.middleware_stack
    while not isinstance(layer, LeanScoreRoute):
        layer = layer.app
    layer.app = service.framework = CountingApp(layer.app)
    yield service
    service.close()


def post(service, body: bytes, content_type: str = "application/json"):
    before = service.framework.calls
    response = service.post("/v1/score", content=body, headers={"content-type": content_type})
    return response, service.framework.calls - before


@pytest.mark.parametrize("body", [{"examples": [GOOD, {"user_id": 7, "age": 30}]}, {"context": CONTEXT, "candidates": CANDIDATES},
                                  {"candidates": CANDIDATES, "model": "movielens"}, {"examples": [GOOD], "model": None},
                                  {"examples": [GOOD], "version": "1", "routing_key": "196"},
                                  {"examples": [GOOD], "version": None, "routing_key": None}])  # fmt: skip
def test_valid_bodies_are_scored_without_the_framework(service, body):
    response, handed_on = post(service, json.dumps(body).encode())
    assert response.status_code == 200, response.text
    assert handed_on == 0
    assert len(response.json()["scores"]) == len(body.get("examples") or body["candidates"])


def test_the_lean_path_scores_as_the_engine_does(service):
    examples = [{**CONTEXT, **candidate} for candidate in CANDIDATES]
    response, _ = post(service, json.dumps({"examples": examples}).encode())
    scores, _ = service.run(service.engine.score(examples))
    assert response.json()["scores"] == scores.astype(float).tolist()
    ranked, _ = post(service, json.dumps({"context": CONTEXT, "candidates": CANDIDATES}).encode())
    assert ranked.json()["scores"] == response.json()["scores"]


LONG_NAME = "f" * 129
# Bodies where msgspec alone could answer differently from the route: each is handed on, and the route's answer
# (status, field, pydantic's error type) is what the client gets.
HANDED_ON = [
    ("explicit null examples", {"examples": None, "candidates": CANDIDATES}, 422, "examples", "list_type"),
    ("explicit null context", {"context": None, "candidates": CANDIDATES}, 422, "context", "dict_type"),
    ("feature name over 128 characters", {"examples": [{LONG_NAME: 1}]}, 422, "examples[0]", "string_too_long"),
    ("feature name over 128 characters in context", {"context": {LONG_NAME: 1}, "candidates": CANDIDATES}, 422, "context", "string_too_long"),
    ("model name over 128 characters", {"examples": [GOOD], "model": LONG_NAME}, 422, "model", "string_too_long"),
    ("nine examples", {"examples": [GOOD] * 9}, 422, "examples", "too_long"),
    ("no form", {"model": "movielens"}, 422, "body", "request_form"),
]


@pytest.mark.parametrize("body,status,field,kind", [c[1:] for c in HANDED_ON], ids=[c[0] for c in HANDED_ON])
def test_bodies_the_route_refuses_are_handed_to_it(service, body, status, field, kind):
    response, handed_on = post(service, json.dumps(body).encode())
    assert handed_on == 1
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error"] == "validation" and error["errors"][0]["field"].startswith(field)
    assert error["errors"][0]["type"] == kind


def test_json_the_stdlib_reads_and_msgspec_does_not_is_handed_on(service):
    # A JSON NaN: msgspec refuses the token, the route's json.loads reads it and the encoder names the value.
    response, handed_on = post(service, b'{"examples": [{"age": NaN}]}')
    assert handed_on == 1 and response.status_code == 422
    assert response.json()["detail"].startswith("examples[0].age:")


@pytest.mark.parametrize("content_type,lean", [("application/json", True), ("application/json; charset=utf-8", True),
                                               ("Application/JSON", True), ("application/problem+json", True),
                                               ("text/plain", False), ("application/x-www-form-urlencoded", False)])  # fmt: skip
def test_only_json_content_types_take_the_lean_path(service, content_type, lean):
    assert json_content_type([(b"content-type", content_type.encode())]) is lean
    response, handed_on = post(service, json.dumps({"examples": [GOOD]}).encode(), content_type)
    assert handed_on == (not lean)
    assert response.status_code == (200 if lean else 422), response.text


def test_scoring_errors_from_the_lean_path_have_the_one_shape(service):
    response, handed_on = post(service, json.dumps({"examples": [GOOD], "model": "nope"}).encode())
    assert handed_on == 0 and response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "model: no model 'nope' is loaded; loaded: movielens"}
    response, handed_on = post(service, json.dumps({"examples": [{"user_id": {"id": 1}}]}).encode())
    assert handed_on == 0 and response.status_code == 422 and response.json()["detail"].startswith("examples[0].user_id:")


def test_metrics_count_lean_requests_under_the_route(service):
    post(service, json.dumps({"examples": [GOOD]}).encode())
    samples = service.metrics()
    assert samples['uembed_http_requests_total{route="/v1/score",status="200"}'] >= 1
    assert 'uembed_http_requests_total{route="unmatched",status="200"}' not in samples


@pytest.mark.parametrize("extra,status,handed_on,words", [
    ({"version": "7"}, 404, 0, "version: model movielens has no loaded version '7'"),   # valid: the lean path, the engine's 404
    ({"version": "v" * 129}, 422, 1, "version: String should have at most 128 characters"),
    ({"routing_key": 196}, 422, 1, "routing_key: Input should be a valid string"),
    ({"routing_key": "k" * 257}, 422, 1, "routing_key: String should have at most 256 characters"),
])  # fmt: skip
def test_version_and_routing_key_are_checked_as_the_route_checks_them(service, extra, status, handed_on, words):
    response, handed = post(service, json.dumps({"examples": [GOOD], **extra}).encode())
    assert (response.status_code, handed) == (status, handed_on), response.text
    assert response.json()["detail"].startswith(words)
