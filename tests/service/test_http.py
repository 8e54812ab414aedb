"""The service over real sockets: parity with the reference scorer, bad input, routes, metrics."""

import json

import httpx
import numpy as np
import pytest

from export.loader import load_bundle
from export.scorer import ReferenceScorer


def score(service, examples, **extra):
    return httpx.post(f"{service.url}/v1/score", json={"examples": examples, **extra}, timeout=30)


def score_in_chunks(service, examples, size=100):
    scores = []
    for start in range(0, len(examples), size):
        response = score(service, examples[start : start + size])
        assert response.status_code == 200, response.text
        scores.extend(response.json()["scores"])
    return np.array(scores)


@pytest.fixture(scope="module")
def reference(bundle_store, movielens_examples):
    return ReferenceScorer(load_bundle(bundle_store / "movielens" / "1")).score(movielens_examples)


def test_http_scores_equal_the_reference_scorer_without_redis(start_service, bundle_store, movielens_examples, reference):
    service = start_service([bundle_store / "movielens" / "1"], hot_rows_bytes=20_000)
    cold = score_in_chunks(service, movielens_examples)
    warm = score_in_chunks(service, movielens_examples)
    np.testing.assert_allclose(cold, reference, atol=1e-6, rtol=0)
    np.testing.assert_allclose(warm, reference, atol=1e-6, rtol=0)
    metrics = service.metrics()
    assert metrics['uembed_row_cache_hits_total{tier="hot"}'] > 0  # warm pass read tier 1
    assert metrics['uembed_row_cache_hits_total{tier="file"}'] > 0  # the small tier 1 left some to the files


def test_http_scores_equal_the_reference_scorer_with_redis(start_service, redis_server, bundle_store, movielens_examples, reference):
    service = start_service([bundle_store / "movielens" / "1"], redis_url=redis_server.url, hot_rows_bytes=0)
    cold = score_in_chunks(service, movielens_examples)
    assert redis_server.client().dbsize() > 0  # misses were filled back
    warm = score_in_chunks(service, movielens_examples)
    np.testing.assert_allclose(cold, reference, atol=1e-6, rtol=0)
    np.testing.assert_allclose(warm, reference, atol=1e-6, rtol=0)
    metrics = service.metrics()
    assert metrics['uembed_row_cache_hits_total{tier="redis"}'] > 0
    keys = [k.decode() for k in redis_server.client().scan_iter(count=1000)]
    assert all(k.startswith("uembed:movielens:1:unified:") for k in keys)


def test_batch_invariance_over_http(start_service, bundle_store, movielens_examples):
    service = start_service([bundle_store / "movielens" / "1"], max_examples=512)
    batch = movielens_examples[:512]
    in_batch = np.array(score(service, batch).json()["scores"])
    for index in (0, 137, 511):
        alone = score(service, [batch[index]]).json()["scores"][0]
        assert alone == in_batch[index]


@pytest.fixture(scope="module")
def shared_service(bundle_store, tmp_path_factory):
    from loadtest.servers import UvicornProcess

    env = {
        "UEMBED_BUNDLES": str(bundle_store / "movielens" / "1"),
        "UEMBED_MAX_EXAMPLES": "8",
        "UEMBED_MAX_BODY_BYTES": "65536",
        "UEMBED_MAX_VALUE_CHARS": "64",
        "UEMBED_MAX_LIST_VALUES": "16",
    }
    service = UvicornProcess("service.app:create_app", env, tmp_path_factory.mktemp("svc") / "service.log").start()
    yield service
    service.stop()


GOOD = {"user_id": "196", "movie_id": "242", "genres": ["Comedy"]}

BAD_BODIES = [
    ("malformed json", b'{"examples": [{"user_id": ', 422, "invalid JSON"),
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
]


@pytest.mark.parametrize("body,status,names", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_4xx_that_names_the_field(shared_service, body, status, names):
    response = httpx.post(
        f"{shared_service.url}/v1/score", content=body, headers={"content-type": "application/json"}, timeout=10
    )
    assert response.status_code == status, response.text
    assert names in response.json()["detail"]


def test_oversized_chunked_body_is_refused(shared_service):
    def chunks():
        yield b'{"examples": ['
        for _ in range(5000):
            yield b'{"user_id": "12345678901234567890"},'
        yield b"{}]}"

    response = httpx.post(f"{shared_service.url}/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_the_service_still_scores_after_bad_requests(shared_service):
    for body in (b"{", b'{"examples": [{"age": NaN}]}'):
        httpx.post(f"{shared_service.url}/v1/score", content=body, headers={"content-type": "application/json"})
    assert score(shared_service, [GOOD]).status_code == 200
    metrics = shared_service.metrics()
    assert metrics.get('uembed_http_requests_total{route="/v1/score",status="500"}', 0) == 0


def test_a_missing_feature_scores_as_the_missing_value(shared_service):
    explicit = {"user_id": "196", "movie_id": None, "genres": [], "age": None}
    left_out = {"user_id": "196"}
    scores = score(shared_service, [explicit, left_out]).json()["scores"]
    assert scores[0] == scores[1]


def test_lists_longer_than_the_trained_width_are_cut_and_counted(shared_service):
    width = next(f["width"] for f in httpx.get(f"{shared_service.url}/v1/models").json()["models"][0]["features"] if f["name"] == "genres")
    genres = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
              "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller"]  # fmt: skip
    assert width < len(genres)
    long, cut = {"genres": genres}, {"genres": genres[:width]}
    scores = score(shared_service, [long, cut]).json()["scores"]
    assert scores[0] == scores[1]
    assert shared_service.metrics()['uembed_truncated_lists_total{feature="genres"}'] >= 1


def test_models_health_readiness_and_openapi(shared_service):
    models = httpx.get(f"{shared_service.url}/v1/models").json()["models"]
    assert [(m["name"], m["version"], m["method"]) for m in models] == [("movielens", "1", "unified")]
    table = models[0]["tables"][0]
    assert table["name"] == "unified" and table["dtype"] == "float32" and table["bytes"]["file"] == table["rows"] * table["dim"] * 4
    assert {f["name"] for f in models[0]["features"]} >= {"user_id", "genres"}
    assert httpx.get(f"{shared_service.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{shared_service.url}/readyz").json()["version"] == "1"
    schema = httpx.get(f"{shared_service.url}/openapi.json").json()
    request = schema["components"]["schemas"]["ScoreRequest"]
    assert request["examples"][0]["examples"][0]["user_id"] == "196"
    assert request["properties"]["examples"]["maxItems"] == 8


def test_reload_is_off_without_a_token(shared_service):
    response = httpx.post(f"{shared_service.url}/v1/models/movielens/load", json={"version": "2"})
    assert response.status_code == 404 and "UEMBED_RELOAD_TOKEN" in response.json()["detail"]


def test_metrics_follow_prometheus_conventions(shared_service):
    score(shared_service, [GOOD])
    text = httpx.get(f"{shared_service.url}/metrics").text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    expected = {
        "uembed_request_duration_seconds", "uembed_http_requests_total", "uembed_stage_duration_seconds",
        "uembed_batch_examples", "uembed_batch_ids", "uembed_queue_examples", "uembed_table_memory_bytes",
        "uembed_row_cache_hits_total", "uembed_row_cache_misses_total", "uembed_redis_errors_total",
        "uembed_redis_fallbacks_total", "uembed_model_info", "uembed_model_reloads_total",
        "uembed_rejected_requests_total",
    }  # fmt: skip
    assert expected <= names
    assert not any(name.endswith("_created") for name in names)
    samples = shared_service.metrics()
    for stage in ("queue", "hash", "lookup", "assemble", "dense"):
        assert samples[f'uembed_stage_duration_seconds_count{{stage="{stage}"}}'] >= 1
    assert samples['uembed_model_info{dtype="float32",method="unified",model="movielens",version="1"}'] == 1
    assert samples['uembed_table_memory_bytes{model="movielens",table="unified",tier="file"}'] > 0
