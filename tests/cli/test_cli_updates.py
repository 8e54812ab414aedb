"""`uembed push-rows` and `uembed train --continue-from RUN --publish-updates` against a real redis-server: what
they publish, replayed into an engine, scores as the bundle their rows come from."""

import numpy as np
import pytest

from tests.cli.test_cli import uembed
from uembed.bundle.loader import load_bundle
from uembed.serving.engine import ScoringEngine
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.rows.updates import stream_key
from uembed.serving.settings import load_settings

KEY = stream_key("uembed", "movielens", "1")


def replayed_scores(served, url: str, examples) -> np.ndarray:
    """Scores of a replica that starts now: it replays the stream before serving."""
    engine = ScoringEngine(load_settings(row_updates_url=url))
    runtime = engine.registry.load(served)
    try:
        return runtime.score(examples)
    finally:
        engine.updates.stop()


def test_push_rows_publishes_a_newer_bundles_changed_rows_and_a_dry_run_nothing(synthetic_store, redis_server, movielens_examples):
    served, newer = synthetic_store / "movielens" / "1", synthetic_store / "movielens" / "2"  # float32, and the same rows in float16
    common = ("--bundle", str(served), "--redis-url", redis_server.url, "--chunk-rows", "100")
    dry = uembed("push-rows", str(newer), *common, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would publish 350 changed rows of 350 compared (unified 350) as 4 deltas" in dry.stdout
    assert redis_server.client().exists(KEY) == 0

    result = uembed("push-rows", str(newer), *common)
    assert result.returncode == 0, result.stderr
    assert f"as 4 deltas on {KEY}" in result.stdout and redis_server.client().xlen(KEY) == 4
    examples = movielens_examples[:200]
    expected = ReferenceScorer(load_bundle(newer)).score(examples)  # float16 rows, decoded: what the overlay now holds
    assert np.abs(expected - ReferenceScorer(load_bundle(served)).score(examples)).max() > 1e-6
    np.testing.assert_allclose(replayed_scores(served, redis_server.url, examples), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"other.ids": np.array([1]), "other.rows": np.zeros((1, 16), np.float32)}, "'other' needs other.ids and other.rows"),
        ({"unified.ids": np.array([1, 2]), "unified.rows": np.zeros((2, 8), np.float32)}, "unified.rows must be [len(ids), 16]"),
        ({"unified.ids": np.array([1, 1]), "unified.rows": np.zeros((2, 16), np.float32)}, "holds a row id twice"),
    ],
)
def test_push_rows_refuses_a_bad_delta_file_in_one_line(synthetic_store, redis_server, tmp_path, arrays, message):
    np.savez(tmp_path / "delta.npz", **arrays)
    result = uembed("push-rows", str(tmp_path / "delta.npz"), "--bundle", str(synthetic_store / "movielens" / "1"), "--redis-url", redis_server.url)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr and redis_server.client().exists(KEY) == 0


@pytest.mark.slow
def test_train_continue_from_publish_updates_reaches_the_continued_runs_bundle(bundle_store, redis_server, movielens_examples, tmp_path):
    from uembed.model.export import export_run  # torch: the train extra

    served = bundle_store / "movielens" / "1"
    result = uembed(
        "train", "--continue-from", str(bundle_store.parent / "run"), "--epochs", "2", "--publish-updates",
        "--bundle", str(served), "--redis-url", redis_server.url, "--runs-dir", str(tmp_path / "runs"), "--name", "more",
        "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("changed rows") == 2 and "continued" in result.stdout
    assert redis_server.client().xlen(KEY) >= 2
    continued = export_run(tmp_path / "runs" / "more", tmp_path / "store", "movielens", "1")
    report = load_bundle(continued).manifest["collisions"]  # a continued run reports on the data it trained on
    assert set(report["features"]) == {feature["name"] for feature in load_bundle(served).manifest["features"]}
    examples = movielens_examples[:200]
    expected = ReferenceScorer(load_bundle(continued)).score(examples)
    np.testing.assert_allclose(replayed_scores(served, redis_server.url, examples), expected, atol=2e-6, rtol=0)


def test_publish_updates_needs_a_continued_run(tmp_path):
    result = uembed("train", "--publish-updates", "--runs-dir", str(tmp_path))
    assert result.returncode == 2 and "give --continue-from RUN" in result.stderr
