"""Several versions of a model live at once, a weighted and sticky split between them, and shadow scoring
(uembed/serving/routing.py, the admin routes of uembed/serving/protocols/v1.py): the engine in process for the 10,000-request split,
real uvicorn over real sockets and a real redis-server for the rest."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.scoring import scored
from tests.serving.inprocess import InProcessService
from tests.waiting import steady
from uembed.bundle.loader import load_bundle
from uembed.contract.errors import BundleError, ExampleError
from uembed.loadtest.servers import UvicornProcess, wait_until
from uembed.serving.engine import ScoringEngine
from uembed.serving.registry import Target
from uembed.serving.routing import Route
from uembed.serving.settings import load_settings

TOKEN = "routing-test-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "movielens"


@pytest.fixture(scope="module")
def routing_store(synthetic_store, tmp_path_factory):
    """The synthetic store's movielens/1 and /2, and movielens/9: a bundle of that name with other features (I1, C1), so
    every MovieLens example is refused by it: a shadow that fails every copy."""
    from uembed.bundle.synthetic import write_synthetic_bundle
    from uembed.contract.features import FeatureSpec

    root = tmp_path_factory.mktemp("routing-store")
    (root / MODEL).mkdir()
    for version in ("1", "2"):
        (root / MODEL / version).symlink_to(synthetic_store / MODEL / version)
    features = (FeatureSpec("I1", kind="numeric", boundaries=(0.0, 1.0)), FeatureSpec("C1"))
    write_synthetic_bundle(root, MODEL, features, 1000, version="9", progress=False)
    return root


@pytest.fixture
def app(routing_store):
    service = InProcessService(bundles=[routing_store / MODEL / "1"], bundle_store=routing_store, reload_token=TOKEN)
    yield service
    service.close()


def versions_of(engine, users, **where) -> list[str]:
    """The version the engine routes each user's request to (without scoring it)."""
    out = []
    for user in users:
        if where.get("form") == "context":
            request = {"examples": [{}], "context": {"user_id": user}}
        elif where.get("form") == "routing_key":
            request = {"examples": [{"user_id": "someone-else"}], "context": None, "routing_key": str(user)}
        else:
            request = {"examples": [{"user_id": user, "movie_id": "1"}], "context": None}
        runtime = engine.registry.resolve(MODEL, None, request.get("routing_key"), request["examples"], request["context"]).runtime
        out.append(runtime.version)
    return out


def test_a_90_10_split_over_10000_users_lands_within_1_5_points_of_10_percent_and_keeps_each_user(app):
    engine = app.engine
    app.run(engine.registry.add_version(MODEL, "2"))
    app.run(engine.registry.set_routing(Route(MODEL, {"1": 90, "2": 10}, sticky_feature="user_id")))
    users = [str(u) for u in range(10_000)]
    chosen = versions_of(engine, users)
    share = chosen.count("2") / len(users)
    assert abs(share - 0.10) <= 0.015, share
    assert set(chosen) == {"1", "2"}
    # The same user, every time and in every form of request: 196 as an int or a string, in a context or as routing_key.
    assert versions_of(engine, users) == chosen
    assert versions_of(engine, [int(u) for u in users[:2000]], form="context") == chosen[:2000]
    assert versions_of(engine, users[:2000], form="routing_key") == chosen[:2000]
    # Weight moved to the last-listed version moves users onto it only.
    app.run(engine.registry.set_routing(Route(MODEL, {"1": 0.8, "2": 0.2}, sticky_feature="user_id")))
    wider = versions_of(engine, users)
    assert all(after == "2" for before, after in zip(chosen, wider) if before == "2")
    assert abs(wider.count("2") / len(users) - 0.20) <= 0.015


def test_a_request_without_a_key_is_split_by_the_weights_and_a_list_key_is_refused(app):
    engine = app.engine
    app.run(engine.registry.add_version(MODEL, "2"))
    app.run(engine.registry.set_routing(Route(MODEL, {"1": 50, "2": 50}, sticky_feature="user_id")))
    chosen = [engine.registry.resolve(MODEL, None, None, [{"movie_id": "1"}], None).runtime.version for _ in range(2000)]
    assert 0.4 < chosen.count("2") / len(chosen) < 0.6
    with pytest.raises(ExampleError, match=r"context.user_id: model movielens routes requests by user_id"):
        engine.registry.resolve(MODEL, None, None, [{}], {"user_id": ["1", "2"]})
    pinned = engine.registry.resolve(MODEL, "2", None, [{"user_id": "1"}], None)
    assert pinned == Target(engine.registry.versions[MODEL]["2"], None)


def test_a_shadow_scores_copies_without_changing_what_is_served(app, movielens_examples):
    """In process: a shadow of version 2 scores every copy; the served scores are version 1's, byte for byte."""
    examples = movielens_examples[:64]
    served_before = [app.score(examples[i : i + 8]).json() for i in range(0, 64, 8)]
    assert app.post(f"/v1/models/{MODEL}/versions/2", headers=AUTH).status_code == 200
    rule = {"split": {"1": 1}, "shadow": "2"}
    assert app.request("PUT", f"/v1/models/{MODEL}/routing", json=rule, headers=AUTH).status_code == 200
    served = [app.score(examples[i : i + 8]).json() for i in range(0, 64, 8)]
    assert served == served_before
    key = f'{{model="{MODEL}",outcome="scored",version="2"}}'
    wait_until(lambda: app.metrics().get(f"uembed_shadow_requests_total{key}") == 8, 10, "shadow copies scored")
    metrics = app.metrics()
    assert metrics[f'uembed_example_score_count{{model="{MODEL}",traffic="shadow",version="2"}}'] == 64
    assert metrics[f'uembed_example_score_count{{model="{MODEL}",traffic="served",version="1"}}'] >= 64
    assert metrics[f'uembed_shadow_score_difference_count{{model="{MODEL}",version="2"}}'] == 64
    assert metrics[f'uembed_shadow_score_difference_sum{{model="{MODEL}",version="2"}}'] > 0  # v2's rows are float16
    assert metrics[f'uembed_model_request_duration_seconds_count{{model="{MODEL}",traffic="shadow",version="2"}}'] == 8
    assert metrics[f'uembed_routing_share{{model="{MODEL}",version="2"}}'] == 0
    assert len(app.engine.registry.runtimes_for(MODEL, "2")) == 2  # the served copy and the shadow thread's own


# --- over HTTP --------------------------------------------------------------------------------
def test_versions_and_routing_over_http(start_service, routing_store, redis_server, movielens_examples):
    service = start_service([routing_store / MODEL / "1"], bundle_store=routing_store, reload_token=TOKEN,
                            redis_url=redis_server.url, redis_prefix="rt", hot_rows_bytes=0)  # fmt: skip
    url, versions = service.url, f"{service.url}/v1/models/{MODEL}/versions"
    wrong = {"Authorization": "Bearer not-the-token-0123456"}
    for method, path, body in [("POST", f"{versions}/2", None), ("DELETE", f"{versions}/1", None),
                               ("PUT", f"{url}/v1/models/{MODEL}/routing", {"split": {"1": 1}}),
                               ("DELETE", f"{url}/v1/models/{MODEL}/routing", None)]:  # fmt: skip
        for headers in ({}, wrong):
            response = httpx.request(method, path, json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"] == "unauthorized", (method, path, response.text)

    loaded = httpx.post(f"{versions}/2", headers=AUTH, timeout=60)
    assert loaded.status_code == 200 and loaded.json() == {"model": MODEL, "version": "2", "primary": False}
    assert httpx.post(f"{versions}/7", headers=AUTH).status_code == 404
    listed = httpx.get(f"{url}/v1/models").json()
    assert [(m["name"], m["version"], m["primary"]) for m in listed["models"]] == [(MODEL, "1", True), (MODEL, "2", False)]
    assert listed["routing"] == {}

    examples = movielens_examples[:8]
    primary, pinned = scored(url, examples), scored(url, examples, version="2")
    assert (primary["version"], pinned["version"]) == ("1", "2") and primary["scores"] != pinned["scores"]
    missing = httpx.post(f"{url}/v1/score", json={"examples": examples, "version": "7"})
    assert missing.status_code == 404 and missing.json()["detail"].startswith("version: model movielens has no loaded version '7'")

    rule = {"split": {"1": 90, "2": 10}, "sticky_feature": "user_id"}
    assert httpx.put(f"{url}/v1/models/{MODEL}/routing", json=rule, headers=AUTH).status_code == 200
    assert httpx.get(f"{url}/v1/models").json()["routing"] == {
        MODEL: {"split": {"1": 0.9, "2": 0.1}, "sticky_feature": "user_id", "shadow": None, "shadow_fraction": 1.0}}
    route = Route(MODEL, rule["split"], sticky_feature="user_id")
    by_version = {"1": primary["scores"][:1], "2": pinned["scores"][:1]}
    got = []
    for user in range(300):
        expected = route.choose(route.point(str(user)))
        forms = [{"examples": [{**examples[0], "user_id": str(user)}]},
                 {"context": {"user_id": user}, "candidates": [{k: v for k, v in examples[0].items() if k != "user_id"}]},
                 {"examples": [examples[0]], "routing_key": str(user)}]  # fmt: skip
        answers = [httpx.post(f"{url}/v1/score", json=body).json() for body in forms[: 1 if user % 10 else 3]]
        assert {a["version"] for a in answers} == {expected}, (user, answers)
        got.append(expected)
        if "routing_key" in forms[-1] and len(answers) == 3:
            assert answers[2]["scores"] == by_version[expected]  # examples[0] itself, scored by the routed version
    assert set(got) == {"1", "2"}

    # OIP / KServe v2: the version in the path scores, and metadata lists every loaded version.
    assert httpx.get(f"{url}/v2/models/{MODEL}/versions/2/ready").json()["version"] == "2"
    assert httpx.get(f"{url}/v2/models/{MODEL}").json()["versions"] == ["1", "2"]

    # Unloading: not the primary, not a version the rule uses; then its keys go from Redis, version 1's stay.
    refused = httpx.delete(f"{versions}/1", headers=AUTH)
    assert refused.status_code == 409 and "primary version of model movielens" in refused.json()["detail"]
    refused = httpx.delete(f"{versions}/2", headers=AUTH)
    assert refused.status_code == 409 and "routing rule of model movielens sends requests to version 2" in refused.json()["detail"]
    assert httpx.delete(f"{url}/v1/models/{MODEL}/routing", headers=AUTH).json() == {"model": MODEL, "routing": None}
    client = redis_server.client()
    keys = lambda version: len(list(client.scan_iter(match=f"rt:movielens:{version}:*", count=1000)))  # noqa: E731
    settled = steady(lambda: (keys("1"), keys("2")))  # the fill thread writes behind the batches
    wait_until(lambda: settled() and keys("1") > 0 and keys("2") > 0, 10, "rows of both versions filled into Redis")
    before, kept = keys("2"), keys("1")
    unloaded = httpx.delete(f"{versions}/2", headers=AUTH)
    assert unloaded.status_code == 200 and unloaded.json() == {"model": MODEL, "version": "2", "redis_keys_deleted": before}
    assert keys("2") == 0 and keys("1") == kept
    assert httpx.post(f"{url}/v1/score", json={"examples": examples, "version": "2"}).status_code == 404
    assert httpx.delete(f"{versions}/2", headers=AUTH).status_code == 404
    assert scored(url, examples) == primary
    metrics = service.metrics()
    assert f'uembed_model_info{{dtype="float16",method="unified",model="{MODEL}",version="2"}}' not in metrics
    assert f'uembed_routing_share{{model="{MODEL}",version="1"}}' in metrics
    client.close()


BAD_RULES = [
    ({"split": {"1": "90"}}, 422, "split.1", "Input should be a valid number"),
    ({"split": {"1": True}}, 422, "split.1", "Input should be a valid number"),
    ({"split": {"1": 0}}, 422, "split.1", "greater than 0"),
    ({"split": {"1": 90, "2": -10}}, 422, "split.2", "greater than 0"),
    ({"split": {"1": 2e6}}, 422, "split.1", "less than or equal to 1000000"),
    ({"split": {"1": 1}, "sticky_feature": "genres"}, 422, None,
     "sticky_feature: version 1 of model movielens takes a list for 'genres'; a routing key takes one value"),
    ({"split": {"1": 1}, "sticky_feature": "user"}, 422, None, "sticky_feature: version 1 of model movielens has no feature 'user'"),
    ({"split": {}}, 422, "split", "at least 1 item"),
    ({"split": {"../x": 1}}, 422, "split.../x.[key]", "pattern"),
    ({"split": {"1": 1}, "shadow_fraction": 0}, 422, "shadow_fraction", "greater than 0"),
    ({"split": {"1": 1}, "sticky": "user_id"}, 422, "sticky", "Extra inputs are not permitted"),
    ({"split": {"1": 1}, "shadow": 2}, 422, "shadow", "valid string"),
    ({"weights": {"1": 1}}, 422, "split", "Field required"),
    ({"split": {"1": 90, "7": 10}}, 404, None, "split.7: model movielens has no loaded version '7'; loaded: 1"),
    ({"split": {"1": 1}, "shadow": "9"}, 404, None, "shadow: model movielens has no loaded version '9'"),
]


@pytest.mark.parametrize("rule,status,field,words", BAD_RULES, ids=[json.dumps(r[0]) for r in BAD_RULES])
def test_a_bad_routing_rule_is_a_4xx_naming_the_field(app, rule, status, field, words):
    response = app.request("PUT", f"/v1/models/{MODEL}/routing", json=rule, headers=AUTH)
    assert response.status_code == status, response.text
    body = response.json()
    assert words in body["detail"]
    if status == 422:
        assert body["error"] == "validation", body
    if field is not None:
        assert body["errors"][0]["field"] == field, body
    assert app.get("/v1/models").json()["routing"] == {}


def test_weights_are_relative_so_any_positive_numbers_split_by_their_ratio(app):
    """3:1 is 75/25; weights summing to 2 (what schema fuzzing found refused) are a valid rule."""
    assert app.post(f"/v1/models/{MODEL}/versions/2", headers=AUTH).status_code == 200
    for split, shares in [({"1": 3, "2": 1}, {"1": 0.75, "2": 0.25}), ({"1": 1, "2": 1}, {"1": 0.5, "2": 0.5}),
                          ({"1": 0.25, "2": 1e-3}, {"1": 0.25 / 0.251, "2": 1e-3 / 0.251})]:  # fmt: skip
        response = app.request("PUT", f"/v1/models/{MODEL}/routing", json={"split": split}, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["routing"]["split"] == pytest.approx(shares)
        assert app.get("/v1/models").json()["routing"][MODEL]["split"] == pytest.approx(shares)


def test_a_sticky_feature_must_be_a_one_value_feature_of_every_version_in_the_rule(app, movielens_examples):
    """genres is a list feature (every request would be refused); version 9 has no user_id (stickiness gone there)."""
    for version in ("2", "9"):
        assert app.post(f"/v1/models/{MODEL}/versions/{version}", headers=AUTH).status_code == 200
    for rule, words in [({"split": {"1": 1, "2": 1}, "sticky_feature": "genres"}, "version 1 of model movielens takes a list for 'genres'"),
                        ({"split": {"1": 1, "9": 1}, "sticky_feature": "user_id"}, "version 9 of model movielens has no feature 'user_id'"),
                        ({"split": {"1": 1}, "sticky_feature": "user_id", "shadow": "9"}, "version 9 of model movielens has no feature 'user_id'")]:  # fmt: skip
        response = app.request("PUT", f"/v1/models/{MODEL}/routing", json=rule, headers=AUTH)
        assert response.status_code == 422 and response.json()["detail"].startswith(f"sticky_feature: {words}"), response.text
    listed = response.json()["detail"].split("one-value features: ")[1].split(", ")
    assert "genres" not in listed and "user_id" not in listed  # version 9's: I1, C1
    assert app.get("/v1/models").json()["routing"] == {}
    assert app.score(movielens_examples[:4]).status_code == 200  # no rule was set: requests are scored as before
    rule = {"split": {"1": 1, "2": 1}, "sticky_feature": "user_id"}
    assert app.request("PUT", f"/v1/models/{MODEL}/routing", json=rule, headers=AUTH).status_code == 200


def test_an_unloaded_versions_series_go_and_stay_gone_after_its_tallied_batches_flush(app, movielens_examples):
    """A version's batches are tallied and flushed later (uembed/serving/metrics_tally.py): unloading it flushes
    them first, so no later flush brings back the series the unload removed; its row-update counts and lag go too."""
    assert app.request("POST", f"/v1/models/{MODEL}/versions/2", headers=AUTH).status_code == 200
    assert app.score(movielens_examples[:8], version="2").status_code == 200
    # a rejection of a field no load names: its series too must go with the version
    app.engine.metrics.updates.labels(MODEL, "2", "rejected", "rows.user_id").inc()
    loaded = [key for key in app.metrics() if 'version="2"' in key and key.startswith("uembed_row_update")]
    assert any('reason="rows.user_id"' in key for key in loaded) and any("lag" in key for key in loaded), loaded
    assert app.request("DELETE", f"/v1/models/{MODEL}/versions/2", headers=AUTH).status_code == 200
    app.engine.batcher.tally.flush()  # what the batch loop's timer does next
    removed = ("uembed_example_score", "uembed_model_request_duration_seconds", "uembed_model_info",
               "uembed_row_updates_total", "uembed_row_update_lag_seconds")  # fmt: skip
    assert not [key for key in app.metrics() if 'version="2"' in key and key.startswith(removed)]


def test_routing_a_model_that_is_not_loaded_is_a_404(app):
    response = app.request("PUT", "/v1/models/nope/routing", json={"split": {"1": 1}}, headers=AUTH)
    assert response.status_code == 404 and response.json()["detail"].startswith("model: no model 'nope' is loaded")


def test_a_slow_shadow_and_a_failing_shadow_never_change_the_served_responses(routing_store, movielens_examples, tmp_path):
    """Version 2 as a shadow stalls 30 s a batch on the shadow thread (far slower than the traffic); version 9 as a
    shadow refuses every copy. 8 clients: every response is 200 and the one version 1 gives with no rule."""
    env = {"UEMBED_BUNDLES": str(routing_store / MODEL / "1"), "UEMBED_BUNDLE_STORE": str(routing_store),
           "UEMBED_RELOAD_TOKEN": TOKEN, "UEMBED_SHADOW_QUEUE": "4", "SLOW_SHADOW_VERSION": "2", "SLOW_SHADOW_S": "30"}  # fmt: skip
    service = UvicornProcess("tests.serving.routing_apps:slow_shadow_app", env, tmp_path / "service.log").start()
    try:
        url = service.url
        bodies = [{"examples": movielens_examples[i : i + 4]} for i in range(0, 400, 4)]

        def send_all() -> list:
            with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
                return list(pool.map(lambda body: (lambda r: (r.status_code, r.json()))(client.post(f"{url}/v1/score", json=body)), bodies))

        reference = send_all()
        assert {status for status, _ in reference} == {200}
        for version in ("2", "9"):
            assert httpx.post(f"{url}/v1/models/{MODEL}/versions/{version}", headers=AUTH, timeout=60).status_code == 200

        rule = {"split": {"1": 100}, "shadow": "9"}
        assert httpx.put(f"{url}/v1/models/{MODEL}/routing", json=rule, headers=AUTH, timeout=60).status_code == 200
        assert send_all() == reference
        failed = f'uembed_shadow_requests_total{{model="{MODEL}",outcome="failed",version="9"}}'
        dropped9 = f'uembed_shadow_requests_total{{model="{MODEL}",outcome="dropped",version="9"}}'
        wait_until(lambda: service.metrics()[failed] + service.metrics()[dropped9] == len(bodies), 10, "copies failed")
        assert service.metrics()[failed] > 0

        rule = {"split": {"1": 100}, "shadow": "2"}
        assert httpx.put(f"{url}/v1/models/{MODEL}/routing", json=rule, headers=AUTH, timeout=60).status_code == 200
        assert send_all() == reference  # the shadow thread is stalled the whole time
        metrics = service.metrics()
        assert metrics[f'uembed_shadow_requests_total{{model="{MODEL}",outcome="dropped",version="2"}}'] > 0
        assert metrics[f'uembed_shadow_requests_total{{model="{MODEL}",outcome="scored",version="2"}}'] == 0
        assert metrics['uembed_http_requests_total{route="/v1/score",status="200"}'] == 3 * len(bodies)
    finally:
        status = service.stop(timeout_s=20)  # killed (-9) past 20 s, under the 30 s stall
    assert status in (0, -15), "a stalled shadow held the shutdown"
    assert "Application shutdown complete" in service.log_path.read_text()


def test_row_updates_reach_the_shadow_copy_on_the_shadow_thread(app, movielens_examples):
    """A delta for the shadow's version goes to the served copy at once (compute thread) and to the shadow thread's
    own copy before its next batch, never from the compute thread (that copy is the shadow thread's alone)."""
    from uembed.bundle.format import encode_records
    from uembed.serving.rows.updates import RowDelta

    engine = app.engine
    app.run(engine.registry.add_version(MODEL, "2"))
    app.run(engine.registry.set_routing(Route(MODEL, {"1": 1}, shadow="2")))
    served, shadow = engine.registry.runtimes_for(MODEL, "2")
    (table_name, table), = served.bundle.tables.items()
    ids = np.arange(20)
    rows = np.random.default_rng(3).normal(scale=0.3, size=(len(ids), np.asarray(table.data).shape[1])).astype(np.float32)
    delta = RowDelta({table_name: (ids, encode_records(rows, str(np.asarray(table.data).dtype)))})
    probe = ids.reshape(-1, 1)
    before = shadow.lookup(probe).copy()
    engine.submit_updates(MODEL, "2", [((1, 0), delta)]).result()
    assert served.update_position == (1, 0) and shadow.update_position != (1, 0)  # deferred to the shadow thread
    app.score(movielens_examples[:8])  # a copy for the shadow: its thread applies the delta first
    wait_until(lambda: shadow.update_position == (1, 0), 10, "the shadow copy's update")
    np.testing.assert_array_equal(shadow.lookup(probe), served.lookup(probe))
    assert not np.array_equal(shadow.lookup(probe), before)


# --- a bundle's identity ---------------------------------------------------------------------------
@pytest.fixture
def misfiled_store(synthetic_store, tmp_path):
    """movielens/1 as it should be; movielens/6 holding version 2 and movielens/3 a plain copy of version 1."""
    root = tmp_path / "misfiled-store"
    (root / MODEL).mkdir(parents=True)
    for folder, version in (("1", "1"), ("6", "2"), ("3", "1")):
        (root / MODEL / folder).symlink_to(synthetic_store / MODEL / version)
    return root


def test_a_bundle_filed_under_another_version_is_refused_naming_both(misfiled_store, movielens_examples):
    service = InProcessService(bundles=[misfiled_store / MODEL / "1"], bundle_store=misfiled_store, reload_token=TOKEN)
    try:
        primary = service.score(movielens_examples[:8]).json()
        for method, path, body, folder, says in [("POST", f"/v1/models/{MODEL}/versions/6", None, "6", "2"),
                                                 ("POST", f"/v1/models/{MODEL}/load", {"version": "6"}, "6", "2"),
                                                 ("POST", f"/v1/models/{MODEL}/versions/3", None, "3", "1"),
                                                 ("POST", f"/v1/models/{MODEL}/load", {"version": "3"}, "3", "1")]:  # fmt: skip
            response = service.request(method, path, json=body, headers=AUTH)
            assert response.status_code == 422 and response.json()["error"] == "bundle", response.text
            detail = response.json()["detail"]
            assert f"says model 'movielens' version '{says}', but it is filed as movielens/{folder}" in detail, detail
        listed = service.get("/v1/models").json()["models"]
        assert [(m["version"], m["primary"]) for m in listed] == [("1", True)]
        assert service.score(movielens_examples[:8], version="2").status_code == 404  # not served under another's name
        refused = service.request("DELETE", f"/v1/models/{MODEL}/versions/1", headers=AUTH)
        assert refused.status_code == 409 and "primary version of model movielens" in refused.json()["detail"]
        assert service.score(movielens_examples[:8]).json() == primary
    finally:
        service.close()


def test_a_misfiled_bundle_given_at_start_is_a_start_error(misfiled_store):
    with pytest.raises(BundleError, match=r"says model 'movielens' version '2', but it is filed as movielens/6"):
        load_bundle(misfiled_store / MODEL / "6")  # its parent is named for its model: the folder is its version
    engine = ScoringEngine(load_settings(bundle_store=misfiled_store))
    with pytest.raises(BundleError, match=r"version '1', but it is filed as movielens/3"):
        engine.registry.load(misfiled_store / MODEL / "3")
    assert engine.registry.load(misfiled_store / MODEL / "1").version == "1"
