import json

import numpy as np
import pytest
import torch

from uembed.contract.plan import METHODS
from uembed.contract.seo import ChunkPolicy
from uembed.model.data import load_movielens100k, synthetic
from uembed.model.train import TrainConfig, gradient_dominance, load_run, predict, train


@pytest.fixture(scope="module")
def small_synthetic():
    return synthetic({"user": 300, "item": 200, "city": 20}, 6000, seed=0).split(0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_and_writes_a_run_directory(tmp_path, small_synthetic, method):
    policy = ChunkPolicy(4, 4, 8, {"user": (0, 1, 3), "item": (1, 2), "city": (3,)}).to_dict()
    config = TrainConfig(embedding=method, budget_fraction=0.5, dim=8, hidden=(32,), epochs=4, seed=1, chunk_dim=4, policy=policy)
    result = train(config, *small_synthetic, run_dir=tmp_path / "run", progress=False)
    m = result.metrics
    assert 0.6 < m["test_auc"] <= 1.0 and m["test_logloss"] > 0
    assert m["embedding_parameters"] == result.plan.embedding_parameters
    first = m["history"][0]["health"]
    assert set(first["norms"]) == {"user", "item", "city"} and first["gradient_per_feature"]["user"] > 0
    # The run directory rebuilds the same model.
    _, plan, model, doc = load_run(tmp_path / "run")
    rows, weights = plan.encode(small_synthetic[2].columns)
    np.testing.assert_array_equal(predict(model, rows, weights), predict(result.model, rows, weights))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_auc"] == m["test_auc"]
    assert doc["train"]["embedding"] == method


def test_same_seed_same_result(small_synthetic):
    config = TrainConfig(embedding="unified", budget_fraction=0.2, dim=8, hidden=(16,), epochs=2, seed=5)
    a = train(config, *small_synthetic, progress=False).metrics
    b = train(config, *small_synthetic, progress=False).metrics
    assert a["test_auc"] == b["test_auc"] and a["test_logloss"] == b["test_logloss"]


def test_gradient_dominance_warns_only_for_shared_tables(small_synthetic):
    result = train(TrainConfig(embedding="unified", budget_rows=30, dim=4, hidden=(8,), epochs=1), *small_synthetic, progress=False)
    shares, dominant = gradient_dominance(result.plan, {"user": 9.0, "item": 0.5, "city": 0.5}, 0.5)
    assert shares["unified"]["user"] == pytest.approx(0.9)
    assert dominant == [("unified", "user", pytest.approx(0.9))]
    assert gradient_dominance(result.plan, {"user": 1.0, "item": 1.0, "city": 1.0}, 0.5)[1] == []


@pytest.mark.slow
def test_collisionless_on_movielens_reaches_the_papers_quality():
    torch.set_num_threads(1)
    train_set, val_set, test_set = load_movielens100k().split(0)
    assert (len(train_set), len(val_set), len(test_set)) == (80_000, 10_000, 10_000)
    metrics = train(TrainConfig(embedding="collisionless", seed=0), train_set, val_set, test_set, progress=False).metrics
    assert metrics["test_auc"] >= 0.78, metrics["test_auc"]


def test_reading_a_run_does_not_import_scikit_learn():
    """An export or a row push reads a run without evaluating it: scikit-learn (about a second to import) is loaded
    only where metrics are computed."""
    import subprocess
    import sys

    code = "import sys, uembed.model.export, uembed.model.train; sys.exit('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
