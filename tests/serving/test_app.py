"""The app in process (httpx.ASGITransport over create_app): request shapes, bad input, routes, the error shape.

Every error is ``{"error": kind, "detail": message}`` with the status of its row in uembed/contract/errors.py.
"""

import json
import os

import pytest

from tests.serving.inprocess import InProcessService
from uembed.contract.hashing import hashing_backend

GOOD = {"user_id": "196", "movie_id": "242", "genres": ["Comedy"]}
CONTEXT = {"user_id": "196", "age": 49, "gender": "M", "occupation": "writer", "zip_code": "55105"}
CANDIDATES = [{"movie_id": "242", "genres": ["Comedy"]}, {"movie_id": "302", "genres": ["Crime", "Film-Noir"]}]


@pytest.fixture(scope="module")
def app(synthetic_store):
    service = InProcessService(
        bundles=[synthetic_store / "movielens" / "1"], bundle_store=synthetic_store, reload_token="in-process-token-0123",
        max_examples=8, max_body_bytes=65536, max_value_chars=64, max_list_values=16,
    )  # fmt: skip
    yield service
    service.close()


BAD_BODIES = [
    ("malformed json", b'{"examples": [{"user_id": ', 422, "invalid JSON"),
    ("not utf-8", b'{"examples": [{"user_id": "\xff"}]}', 422, "body"),
    ("not an object", b"[1, 2]", 422, "body"),
    ("no examples", b'{"model": null}', 422, "examples"),
    ("empty list", b'{"examples": []}', 422, "examples"),
    ("too many examples", json.dumps({"examples": [GOOD] * 9}).encode(), 422, "examples"),
    ("example not an object", b'{"examples": [1]}', 422, "examples[0]"),
    ("unknown field", b'{"examples": [{}], "mode": 1}', 422, "mode"),
    ("unknown feature", b'{"examples": [{"user_id": "1"}, {"user_idd": "1"}]}', 422, "examples[1]: unknown feature user_idd"),
    ("nested object", b'{"examples": [{"user_id": {"id": 1}}]}', 422, "examples[0].user_id"),
    ("list for a single-valued feature", b'{"examples": [{"movie_id": ["1", "2"]}]}', 422, "examples[0].movie_id"),
    ("nested list", b'{"examples": [{"genres": [["Comedy"]]}]}', 422, "examples[0].genres"),
    ("NaN", b'{"examples": [{"age": NaN}]}', 422, "examples[0].age"),
    ("Infinity", b'{"examples": [{"age": Infinity}]}', 422, "examples[0].age"),
    ("absurd string", json.dumps({"examples": [{"zip_code": "9" * 10_000}]}).encode(), 422, "examples[0].zip_code"),
    ("absurd list", json.dumps({"examples": [{"genres": ["Comedy"] * 17}]}).encode(), 422, "examples[0].genres"),
    ("unknown model", json.dumps({"examples": [GOOD], "model": "nope"}).encode(), 404, "model"),
    ("oversized body", json.dumps({"examples": [{"user_id": "1" * 60}] * 2000}).encode(), 413, "body"),
    # The ranking form: the same limits, errors naming context.feature and candidates[i].feature.
    ("no candidates", json.dumps({"context": CONTEXT, "candidates": []}).encode(), 422, "candidates"),
    ("too many candidates", json.dumps({"context": CONTEXT, "candidates": CANDIDATES * 5}).encode(), 422, "candidates"),
    ("candidate not an object", json.dumps({"context": CONTEXT, "candidates": [CANDIDATES[0], "242"]}).encode(), 422, "candidates[1]"),
    ("context not an object", json.dumps({"context": ["196"], "candidates": CANDIDATES}).encode(), 422, "context"),
    ("unknown feature in context", json.dumps({"context": {"user": "196"}, "candidates": CANDIDATES}).encode(), 422,
     "context: unknown feature user;"),
    ("unknown feature in a candidate", json.dumps({"context": CONTEXT, "candidates": [{}, {"movie": "1"}]}).encode(), 422,
     "candidates[1]: unknown feature movie;"),
    ("feature in context and candidate", json.dumps({"context": CONTEXT, "candidates": [{}, {"age": 3}]}).encode(), 422,
     "candidates[1].age: also given in context"),
    ("absurd string in context", json.dumps({"context": {"zip_code": "9" * 100}, "candidates": CANDIDATES}).encode(), 422,
     "context.zip_code: a value of 100 characters is longer than the limit of 64"),
    ("list for a single-valued feature in context", json.dumps({"context": {"user_id": ["1", "2"]}, "candidates": CANDIDATES}).encode(),
     422, "context.user_id: takes one value"),
    ("NaN in a candidate", b'{"context": {}, "candidates": [{}, {"age": NaN}]}', 422, "candidates[1].age"),
    ("examples and candidates", json.dumps({"examples": [GOOD], "candidates": CANDIDATES}).encode(), 422,
     "body: give either examples, or context and candidates, not both"),
    ("examples and context", json.dumps({"examples": [GOOD], "context": CONTEXT}).encode(), 422, "body: give either examples"),
    ("context without candidates", json.dumps({"context": CONTEXT}).encode(), 422, "body: context goes with candidates"),
    ("null candidates", json.dumps({"context": CONTEXT, "candidates": None}).encode(), 422, "candidates"),
    ("ranking with an unknown model", json.dumps({"context": CONTEXT, "candidates": CANDIDATES, "model": "nope"}).encode(), 404, "model"),
    ("oversized ranking body", json.dumps({"context": CONTEXT, "candidates": [{"movie_id": "1" * 60}] * 2000}).encode(), 413, "body"),
]


@pytest.mark.parametrize("body,status,names", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_4xx_in_the_one_error_shape_that_names_the_field(app, body, status, names):
    response = app.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()
    assert names in error["detail"]
    assert set(error) <= {"error", "detail", "errors"} and error["error"] in {"validation", "example", "not_found", "body_too_large"}


@pytest.fixture(scope="module")
def numeric_app(tmp_path_factory):
    """A synthetic bundle with a numeric feature (MovieLens has none: its age is categorical)."""
    from uembed.bundle.synthetic import write_synthetic_bundle
    from uembed.contract.features import FeatureSpec

    features = (FeatureSpec("I1", kind="numeric", boundaries=(0.0, 1.0, 10.0, 100.0)), FeatureSpec("C1"))
    bundle = write_synthetic_bundle(tmp_path_factory.mktemp("numeric"), "numeric", features, 1000, progress=False)
    service = InProcessService(bundles=[bundle])
    yield service
    service.close()


@pytest.mark.parametrize("value", ["NaN", "nan", "inf", "-Infinity", "1e400", "1_000", "twelve", "  ", True, 10**400])
def test_a_numeric_feature_refuses_what_is_not_a_finite_number(numeric_app, value):
    response = numeric_app.score([{"I1": value}])
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("examples[0].I1: takes a")


def test_numeric_strings_score_like_numbers_and_blank_is_missing(numeric_app):
    values = [49, "49", " 49.0 ", "4.9e1", "", None]
    scores = numeric_app.score([{"I1": v, "C1": "a"} for v in values]).json()["scores"]
    assert scores[0] == scores[1] == scores[2] == scores[3] and scores[4] == scores[5] != scores[0]
    features = numeric_app.get("/openapi.json").json()["components"]["schemas"]["ScoreRequest"]["properties"]["examples"]["items"]["properties"]
    assert {"type": "boolean"} not in features["I1"]["anyOf"] and {"type": "boolean"} in features["C1"]["anyOf"]


def test_oversized_chunked_body_is_refused(app):
    async def chunks():
        yield b'{"examples": ['
        for _ in range(5000):
            yield b'{"user_id": "12345678901234567890"},'
        yield b"{}]}"

    response = app.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"


@pytest.mark.parametrize("method,path,status,kind", [("GET", "/nowhere", 404, "not_found"), ("GET", "/v1/score", 405, "method_not_allowed")])
def test_routing_errors_use_the_one_shape(app, method, path, status, kind):
    response = app.request(method, path)
    assert response.status_code == status and response.json()["error"] == kind and path in response.json()["detail"]


def test_the_service_still_scores_after_bad_requests(app):
    for body in (b"{", b'{"examples": [{"age": NaN}]}', b"\xff\xfe"):
        app.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert app.score([GOOD]).status_code == 200
    assert app.metrics().get('uembed_http_requests_total{route="/v1/score",status="500"}', 0) == 0


@pytest.mark.parametrize("shared", [tuple(CONTEXT), ("user_id", "genres"), ()], ids=["user", "with-multivalent", "empty"])
def test_a_ranking_request_scores_exactly_as_its_flat_examples(app, movielens_examples, shared):
    """context + candidates gives the flat form's floats, in candidate order."""
    context = {name: movielens_examples[0][name] for name in shared}
    candidates = [{k: v for k, v in example.items() if k not in shared} for example in movielens_examples[10:18]]
    flat = app.score([{**context, **candidate} for candidate in candidates])
    ranked = app.score(candidates, context=context)
    assert flat.status_code == ranked.status_code == 200, ranked.text
    assert ranked.json() == flat.json()
    assert len(set(ranked.json()["scores"])) > 1  # distinct candidates, so the order is checked too
    reversed_ = app.score(candidates[::-1], context=context, model="movielens")
    assert reversed_.json()["scores"] == flat.json()["scores"][::-1]


def test_candidates_without_a_context_score_as_examples(app):
    assert app.post("/v1/score", json={"candidates": [GOOD]}).json() == app.score([GOOD]).json()


def test_a_missing_feature_scores_as_the_missing_value(app):
    explicit = {"user_id": "196", "movie_id": None, "genres": [], "age": None}
    left_out = {"user_id": "196"}
    scores = app.score([explicit, left_out]).json()["scores"]
    assert scores[0] == scores[1]


def test_lists_longer_than_the_trained_width_are_cut_and_counted(app):
    width = next(f["width"] for f in app.get("/v1/models").json()["models"][0]["features"] if f["name"] == "genres")
    genres = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
              "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller"]  # fmt: skip
    assert width < len(genres)
    long, cut = {"genres": genres}, {"genres": genres[:width]}
    scores = app.score([long, cut]).json()["scores"]
    assert scores[0] == scores[1]
    assert app.metrics()['uembed_truncated_lists_total{feature="genres"}'] >= 1


def test_models_say_which_hashing_path_is_in_use(app):
    assert app.get("/v1/models").json()["hashing"] == hashing_backend() in ("compiled", "python")


def test_models_health_readiness(app):
    models = app.get("/v1/models").json()["models"]
    assert [(m["name"], m["version"], m["method"]) for m in models] == [("movielens", "1", "unified")]
    table = models[0]["tables"][0]
    assert table["name"] == "unified" and table["dtype"] == "float32" and table["bytes"]["file"] == table["rows"] * table["dim"] * 4
    assert {f["name"] for f in models[0]["features"]} >= {"user_id", "genres"}
    assert app.get("/healthz").json() == {"status": "ok"}
    ready = app.get("/readyz").json()
    assert ready["version"] == "1" and ready["worker"] == os.getpid()  # the worker (process) that answered


def test_openapi_states_the_features_limits_and_every_status(app):
    schema = app.get("/openapi.json").json()
    request = schema["components"]["schemas"]["ScoreRequest"]
    assert request["examples"][0]["examples"][0]["user_id"] == "196"
    examples = request["properties"]["examples"]
    assert examples["maxItems"] == 8
    assert examples["items"]["additionalProperties"] is False
    features = examples["items"]["properties"]
    assert set(features) == {"user_id", "movie_id", "zip_code", "age", "occupation", "gender", "genres"}
    assert {"type": "string", "maxLength": 64} in features["user_id"]["anyOf"]
    assert any(s.get("maxItems") == 16 for s in features["genres"]["anyOf"])
    score = schema["paths"]["/v1/score"]["post"]["responses"]
    assert set(score) == {"200", "404", "408", "413", "422", "500", "503", "504"}
    assert score["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    load = schema["paths"]["/v1/models/{name}/load"]["post"]["responses"]
    assert {"401", "404", "422"} <= set(load)
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == [app.get("/metrics").headers["content-type"]]


def test_openapi_states_the_two_request_forms(app):
    """The schema says which fields go together, so a body it accepts is scored and one it refuses is a 422
    (schemathesis checks both ways in test_contract.py; here, the cases it may not happen to generate)."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")  # schemathesis's validator (the dev extra)
    request = app.get("/openapi.json").json()["components"]["schemas"]["ScoreRequest"]
    fields = request["properties"]
    assert fields["candidates"]["items"] == fields["examples"]["items"] and fields["candidates"]["maxItems"] == 8
    assert fields["context"]["properties"] == fields["examples"]["items"]["properties"]
    assert fields["context"]["additionalProperties"] is False
    ranking = request["examples"][1]
    assert ranking["context"]["user_id"] == "196" and ranking["candidates"][1]["movie_id"] == "302"
    schema = jsonschema_rs.Draft202012Validator(request)
    bodies = [
        *request["examples"],
        {"candidates": [{"movie_id": "1"}]},
        {"context": {}, "candidates": [{}], "model": "movielens"},
        {"examples": [GOOD], "candidates": CANDIDATES},
        {"examples": [GOOD], "context": {}},
        {"context": CONTEXT},
        {"context": CONTEXT, "candidates": [{}, {"movie_id": "1", "user_id": "2"}]},
        {"context": {"genres": []}, "candidates": [{"genres": "Comedy"}]},
        {"context": CONTEXT, "candidates": None},
        {},
    ]
    for body in bodies:
        response = app.post("/v1/score", json=body)
        assert response.status_code == (200 if schema.is_valid(body) else 422), (body, response.text)
    assert sum(schema.is_valid(body) for body in bodies) == 4


def test_reload_needs_the_token(app):
    response = app.post("/v1/models/movielens/load", json={"version": "2"})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == "unauthorized"


@pytest.mark.parametrize("name,version,field", [
    ("movielens", "é" * 128, "version"),       # 256 bytes: was OSError: File name too long, a 500
    ("movielens", "v" * 300, "version"),
    ("movielens", "versión-ü", "version"),
    ("movielens", "../../etc", "version"),
    ("m" * 300, "1", "name"),
    ("mö", "1", "name"),
])  # fmt: skip
def test_reload_names_are_checked_before_any_path_is_built(app, name, version, field):
    response = app.post(f"/v1/models/{name}/load", json={"version": version}, headers={"Authorization": "Bearer in-process-token-0123"})
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["error"] == "validation" and error["errors"][0]["field"] == field
    assert "should match pattern" in error["detail"]


def test_reload_is_off_without_a_token(synthetic_store):
    service = InProcessService(bundles=[synthetic_store / "movielens" / "1"])
    try:
        response = service.post("/v1/models/movielens/load", json={"version": "2"})
        assert response.status_code == 404 and "UEMBED_RELOAD_TOKEN" in response.json()["detail"]
    finally:
        service.close()


def test_the_readme_routes_table_and_the_openapi_document_agree(app):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("| route | does | statuses |"):]
    table = table[: table.index("\n\n")]
    documented = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for route in re.findall(r"`(GET|POST|PUT|DELETE) (/[^`]*)`", cells[0]):
            if route[1] not in ("/docs",):
                documented[route] = set(re.findall(r"\b\d{3}\b", cells[2]))
    paths = app.get("/openapi.json").json()["paths"]
    served = {(method.upper(), path): set(operation["responses"]) for path, ops in paths.items() for method, operation in ops.items()}
    documented.pop(("GET", "/openapi.json"), None)
    assert documented == served


def test_docs_pages_load_their_scripts_and_styles_from_the_service_itself(app):
    import re

    for page, kinds in (("/docs", {"javascript", "css"}), ("/redoc", {"javascript"})):
        html = app.get(page).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert urls and all(url.startswith("/") and not url.startswith("//") for url in urls), f"{page} loads {urls}"
        served = set()
        for url in urls:
            response = app.get(url)
            assert response.status_code == 200, url
            served |= {kind for kind in kinds if kind in response.headers["content-type"]}
        assert served == kinds, f"{page}: {served}"
