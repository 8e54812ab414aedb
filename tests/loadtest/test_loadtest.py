"""The load generator: Zipf examples from a model's features, the loopback guard, and a real
stepped locust run (MovieLens scenario) against the service, with its plot."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uembed.bundle.loader import load_bundle
from uembed.bundle.synthetic import criteo_features
from uembed.contract.errors import UembedError
from uembed.loadtest.run import check_target
from uembed.loadtest.servers import ephemeral_ports, free_port
from uembed.loadtest.traffic import ZipfExamples, served_features
from uembed.serving.pipeline.reference import ReferenceScorer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def features(synthetic_store):
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    widths = {feature.name: feature.width for feature in bundle.plan.features}
    return [spec.to_dict() | {"width": widths[name]} for name, spec in bundle.feature_specs.items()], bundle


def test_zipf_examples_fit_the_model_and_are_skewed(features):
    specs, bundle = features
    examples = ZipfExamples(specs, exponent=1.1, vocabulary=1000, seed=0).batch(20_000)
    assert len(examples) == 20_000 and all(set(e) == set(bundle.feature_specs) for e in examples[:100])
    ReferenceScorer(bundle).encode(examples[:2000])  # every value is one the service accepts
    by_kind = {spec["kind"]: spec for spec in specs}
    genres = [e[by_kind["multivalent"]["name"]] for e in examples]
    assert all(1 <= len(g) <= by_kind["multivalent"]["width"] for g in genres)
    edges = [1.0, 5.0, 10.0, 50.0]
    prices = [e["price"] for e in ZipfExamples([{"name": "price", "kind": "numeric", "boundaries": edges}], seed=0).batch(5000)]
    buckets = np.searchsorted(edges, prices, side="right")
    assert set(buckets) == set(range(len(edges) + 1)), "every bucket of a numeric feature is reached"
    users = np.array([int(e["user_id"]) for e in examples])
    hottest = np.mean(users == 0)
    expected = 1 / np.sum(1 / np.arange(1, 1001) ** 1.1)
    assert abs(hottest - expected) < 0.01, (hottest, expected)
    assert np.mean(users < 10) > 0.3 and users.max() > 500, "a hot head and a long tail"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000"])
def test_loopback_targets_are_allowed(url):
    check_target(url, allow_remote=False)


def test_other_targets_need_allow_remote():
    with pytest.raises(UembedError, match="--url: 10.1.2.3 is not a loopback address"):
        check_target("http://10.1.2.3:8000", allow_remote=False)
    check_target("http://10.1.2.3:8000", allow_remote=True)
    with pytest.raises(UembedError, match="--url"):
        check_target("127.0.0.1:8000", allow_remote=False)
    run = subprocess.run([sys.executable, "-m", "uembed", "loadtest", "--url", "http://example.com"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "not a loopback address" in run.stderr


def test_a_stepped_movielens_run_reports_each_step_and_plots_latency_against_load(synthetic_store, start_service, tmp_path):
    service = start_service([synthetic_store / "movielens" / "1"])
    model, features = served_features(service.url)
    assert model == "movielens" and {f["name"] for f in features} >= {"user_id", "genres"}
    with pytest.raises(ValueError, match="not served"):
        served_features(service.url, "no-such-model")
    plot = tmp_path / "latency.png"
    run = subprocess.run(
        [sys.executable, "-m", "uembed", "loadtest", "--url", service.url, "--scenario", "movielens", "--examples", "16",
         "--steps", "2", "--step-users", "2", "--step-seconds", "8", "--user-rate", "10", "--plot", str(plot),
         "--out", str(tmp_path / "out"), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["requests"] > 100
    assert [s["users"] for s in summary["steps"]] == [2, 4]
    assert [s["offered_per_s"] for s in summary["steps"]] == [20, 40]
    for step in summary["steps"]:
        assert 0.5 * step["offered_per_s"] < step["achieved_per_s"] < 1.5 * step["offered_per_s"], step
        assert 0 < step["p50_ms"] <= step["p95_ms"] <= step["p99_ms"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000


def test_the_server_helpers_need_no_http_client_package():
    """`uembed stack` and `uembed bench` start their servers through uembed/loadtest/servers.py; it imported httpx,
    which their extras need not bring. The standard library serves now."""
    import subprocess
    import sys

    code = "import sys; sys.modules['httpx'] = None; import uembed.loadtest.servers as s; assert callable(s.http_get)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_wait_until_retries_connection_errors_of_either_client():
    import httpx

    from uembed.loadtest.servers import wait_until

    url = f"http://127.0.0.1:{free_port()}/readyz"  # nothing listens there
    for check in (lambda: httpx.get(url).status_code == 200, lambda: __import__("urllib.request").request.urlopen(url)):
        with pytest.raises(TimeoutError):
            wait_until(check, 0.3, "nothing")


@pytest.mark.slow
def test_the_scale_benchmark_runs_end_to_end_on_a_small_bundle(tmp_path):
    """`uembed bench --phases scale` at a test size: every figure it reports, from real servers (1 worker)."""
    out = tmp_path / "scale.json"
    run = subprocess.run(
        [sys.executable, "-m", "uembed", "bench", "--phases", "scale", "--scale-rows", "200000", "--seconds", "0.5",
         "--scale-workers", "1", "--scale-candidates", "40", "--examples", "16", "--scale-dir", str(tmp_path),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    service, naive = figures["scale_service_1_workers"], figures["scale_naive_1_workers"]
    for shape in ("ranking", "flat_same_examples", "flat_16"):
        assert service[f"{shape}_saturated"]["requests"] > 0 and service[f"{shape}_saturated"]["failures"] == 0
    assert service["start_up"]["live_s"] <= service["start_up"]["ready_s"]
    assert service["candidates_over_flat"] > 0 and set(service["tier_hit_rates"]) == {"hot", "redis", "file"}
    rounds = service["candidates_over_flat_rounds"]
    assert len(rounds) == 3 and all(r["ranking"] > 0 and r["flat"] > 0 for r in rounds)
    assert service["candidates_over_flat"] == sorted(r["ratio"] for r in rounds)[1]
    assert all(r["ranking_cpu_ms"] > 0 and r["flat_cpu_ms"] > 0 for r in rounds)  # the worker's own CPU a request
    assert service["candidates_over_flat_worker_cpu"] == sorted(r["cpu_ratio"] for r in rounds)[1]
    (worker,) = service["memory_per_worker"]
    assert 0 < worker["pss_gib"] <= worker["rss_gib"]
    assert naive["flat_same_examples_saturated"]["failures"] == 0 and len(naive["memory_per_worker"]) == 1


def test_the_ranking_benchmark_runs_end_to_end_on_a_split_movielens_bundle(tmp_path):
    """`uembed bench --phases ranking` at a test size: one user x N movies against the same examples flat, from a
    real server, on a MovieLens-shaped bundle split by the user's features as the demo bundle is."""
    from uembed.bundle.synthetic import write_synthetic_bundle
    from uembed.model.data import load_movielens100k
    from uembed.model.demo import DEMO_CONTEXT_FEATURES

    write_synthetic_bundle(tmp_path, "ml", load_movielens100k().spec.features, 50_000, width=6, progress=False,
                           context_features=DEMO_CONTEXT_FEATURES)  # fmt: skip
    out = tmp_path / "ranking.json"
    run = subprocess.run(
        [sys.executable, "-m", "uembed", "bench", "--phases", "ranking", "--bundle", str(tmp_path / "ml" / "1"),
         "--seconds", "0.5", "--ranking-candidates", "40", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["ranking_requests"]["context_features"] == list(DEMO_CONTEXT_FEATURES)
    assert figures["ranking_requests"]["body_kib"]["ranking"] < figures["ranking_requests"]["body_kib"]["flat"]
    one = figures["ranking_1_workers"]
    for form in ("ranking", "flat"):
        assert one[f"{form}_unloaded"]["failures"] == 0 and one[f"{form}_saturated"]["failures"] == 0
        assert one[f"{form}_saturated"]["requests"] > 0
    rounds = one["rounds"]
    assert len(rounds) == 3 and one["ranking_over_flat_requests_per_s"] == sorted(r["ratio"] for r in rounds)[1]
    assert one["flat_over_ranking_worker_cpu_ms"] == sorted(r["cpu_ratio"] for r in rounds)[1]
    assert all(r["failures"] == 0 and r["requests"] > 0 for r in rounds)


def test_a_ranking_request_and_its_flat_twin_carry_the_same_examples():
    from uembed.loadtest.ranking_bench import MOVIE_FEATURES, ranking_bodies
    from uembed.model.demo import DEMO_CONTEXT_FEATURES

    bodies = ranking_bodies(list(DEMO_CONTEXT_FEATURES), list(MOVIE_FEATURES), 300, count=3)
    for ranking, flat in zip(bodies["ranking"], bodies["flat"]):
        ranking, flat = json.loads(ranking), json.loads(flat)
        assert set(ranking["context"]) == set(DEMO_CONTEXT_FEATURES)
        assert flat["examples"] == [{**ranking["context"], **candidate} for candidate in ranking["candidates"]]
        assert len({c["movie_id"] for c in ranking["candidates"]}) == 300  # distinct movies
        assert all(set(c) == set(MOVIE_FEATURES) for c in ranking["candidates"])


def test_the_ranking_benchmark_refuses_what_it_cannot_measure(synthetic_store, tmp_path):
    from uembed.bundle.synthetic import write_synthetic_bundle
    from uembed.loadtest.ranking_bench import check_ranking_args, context_features_of
    from uembed.model.data import load_movielens100k

    with pytest.raises(UembedError, match="no context split.*--context-features"):
        context_features_of(synthetic_store / "movielens" / "1")
    features = load_movielens100k().spec.features
    write_synthetic_bundle(tmp_path, "part", features, 1000, width=6, progress=False, context_features=["user_id"])
    with pytest.raises(UembedError, match="the context is to be the user's features"):
        context_features_of(tmp_path / "part" / "1")
    write_synthetic_bundle(tmp_path, "criteo", criteo_features(4), 1000, progress=False, context_features=["C1"])
    with pytest.raises(UembedError, match="not a MovieLens bundle"):
        context_features_of(tmp_path / "criteo" / "1")
    args = argparse.Namespace(phases=["ranking"], bundle=None, ranking_candidates=5000, ranking_workers=[1])
    with pytest.raises(UembedError, match="--ranking-candidates: between 1 and the 1682"):
        check_ranking_args(args)
    with pytest.raises(UembedError, match="--ranking-workers"):
        check_ranking_args(argparse.Namespace(**{**vars(args), "ranking_candidates": 10, "ranking_workers": [0]}))


def test_free_ports_are_below_the_ephemeral_range_listenable_and_not_handed_out_twice():
    """A free port for a server is drawn where no outgoing connection's local end can take it before the server
    binds it, and two servers started one after the other never get the same one."""
    ephemeral = ephemeral_ports()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    if ephemeral.start - 10000 >= 4096:
        assert all(port < ephemeral.start for port in ports)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", ports[-1]))
        listening.listen()
