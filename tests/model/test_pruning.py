"""Structured dimension pruning (issue #37, item 4): a pruned run is a narrower normal run, and its export scores
like it."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

from tests.conftest import tiny_spec, tiny_table
from uembed.bundle.loader import load_bundle
from uembed.cli import main
from uembed.model.data import from_table
from uembed.model.export import export_run
from uembed.model.networks import RankingModel
from uembed.model.pruning import MaskedEmbedding, column_scores, narrow_model, output_mask, prune_run, prune_step
from uembed.model.train import TrainConfig, build_model, load_run, plan_for, predict, train
from uembed.serving.pipeline.reference import ReferenceScorer

DIM, KEEP = 8, 3


def tiny_split(lookups: int = 0):
    """The tiny data set; with ``lookups``, the user feature concatenates that many multi-size lookups."""
    spec = tiny_spec()
    if lookups:
        spec = replace(spec, features=tuple(replace(f, lookups=lookups) if f.name == "user" else f for f in spec.features))
    return from_table(tiny_table(1200), spec, name="tiny").split(0)


@pytest.mark.parametrize(
    ("method", "network", "lookups"),
    [("unified", "dcn", 0), ("multi-size-unified", "mlp", 3), ("semantic-group", "dcn", 0)],
)
def test_a_pruned_export_is_narrower_and_scores_like_its_run(tmp_path, method, network, lookups):
    torch.set_num_threads(1)
    train_set, val_set, test_set = splits = tiny_split(lookups)
    config = TrainConfig(embedding=method, budget_rows=80, budget_fraction=None, dim=DIM, network=network, hidden=(16,), epochs=2)
    trained = train(config, *splits, run_dir=tmp_path / "run", progress=False)
    result = prune_run(tmp_path / "run", train_set, val_set, test_set, KEEP, epochs=3, out_dir=tmp_path / "pruned", progress=False)

    pruning = result.metrics["pruning"]
    assert (pruning["dim"], pruning["kept"]) == (DIM, KEEP)
    assert pruning["test_auc_before"] == pytest.approx(trained.metrics["test_auc"], abs=1e-9)
    assert pruning["test_auc_after"] == result.metrics["test_auc"]
    assert [entry["kept"] for entry in result.metrics["history"]] == [6, KEEP, KEEP]  # 2 of the 5 columns go, then 3, then fine-tuned
    assert all(len(columns) == KEEP for columns in pruning["columns"].values())
    assert json.loads((tmp_path / "pruned" / "plan.json").read_text())["dim"] == KEEP

    bundle_path = export_run(tmp_path / "pruned", tmp_path / "bundles", "tiny", full_model_limit_bytes=0)  # dense.onnx alone
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    assert manifest["embedding"]["dim"] == KEEP and {t["dim"] for t in manifest["tables"]} == {KEEP}
    for table in manifest["tables"]:
        assert np.load(bundle_path / table["file"], mmap_mode="r").shape == (table["rows"], KEEP)
    groups = sum(len(f.lookups) for f in result.plan.features)
    assert groups > len(result.plan.features) or lookups == 0
    assert manifest["dense"]["input"]["shape"] == ["batch", groups * KEEP]

    _, plan, model, _ = load_run(tmp_path / "pruned")
    rows, weights = plan.encode(test_set.columns)
    expected = predict(model, rows, weights)
    np.testing.assert_allclose(ReferenceScorer(bundle).score_encoded(rows, weights), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "network", "lookups"), [("multi-size-unified", "dcn", 2), ("semantic-group", "mlp", 0)])
def test_the_narrowed_model_scores_as_the_masked_one(method, network, lookups):
    """Columns removed from a shared table leave every slot reading it (each lookup of a multi-size feature and each
    feature bias too): the narrowed model's scores are the masked model's."""
    torch.manual_seed(0)
    train_set, _, test_set = tiny_split(lookups)
    config = TrainConfig(embedding=method, budget_rows=80, budget_fraction=None, dim=DIM, network=network, hidden=(16,), cross_layers=2)
    plan = plan_for(config, train_set.spec, train_set.columns)
    model = build_model(plan, config)
    with torch.no_grad():
        model.embedding.bias.normal_()  # no zero bias to hide a bias column left in place
    rng = np.random.default_rng(0)
    kept = [np.isin(np.arange(DIM), rng.choice(DIM, KEEP, replace=False)) for _ in plan.tables]
    masked = RankingModel(MaskedEmbedding(model.embedding), model.network)
    masked.embedding.mask.copy_(torch.from_numpy(output_mask(plan, kept).astype(np.float32)))
    narrow, narrow_plan = narrow_model(masked, plan, config, kept)
    assert narrow_plan.output_dim == plan.groups * KEEP
    assert plan.groups > len(plan.features) or lookups == 0
    rows, weights = plan.encode(test_set.columns)
    np.testing.assert_allclose(predict(narrow, rows, weights), predict(masked, rows, weights), atol=1e-6, rtol=0)


def test_the_columns_that_contribute_least_go_first():
    """A table column that is zero over the rows, or that the first layer never reads, scores nothing and is pruned
    before the others; a shared table's column is scored over every feature that reads it."""
    train_set, _, _ = tiny_split()
    config = TrainConfig(embedding="unified", budget_rows=80, budget_fraction=None, dim=DIM, network="mlp", hidden=(16,))
    plan = plan_for(config, train_set.spec, train_set.columns)
    model = build_model(plan, config)
    first = model.network.layers[0].weight
    with torch.no_grad():
        model.embedding.weight[:, 2] = 0.0
        first[:, [g * DIM + 5 for g in range(plan.groups)]] = 0.0  # column 5: read by no feature
        first[:, 7] = 0.0  # column 7: unread by the first feature only, still read by the others
    scores = column_scores(model.embedding, model.network, plan)[0]
    assert scores[2] == 0 and scores[5] == 0 and scores[7] > 0
    kept = prune_step([np.ones(DIM, dtype=bool)], [scores], DIM - 2)[0]
    assert not kept[2] and not kept[5] and kept.sum() == DIM - 2
    assert set(np.flatnonzero(output_mask(plan, [kept]) == 0) % DIM) == {2, 5}  # gone from every feature's slot


def uembed(*args, cwd):
    return subprocess.run([sys.executable, "-m", "uembed", *args], capture_output=True, text=True, cwd=cwd)


def prune_errors(capsys, *args) -> list[str]:
    """What ``uembed prune ARGS`` printed on stderr, having exited 2 (in process: the console script's main)."""
    assert main(["prune", *args]) == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def fake_run(tmp_path):
    """A run directory as far as the option checks read it (they refuse before any data or checkpoint is read)."""

    def make(dim: int = DIM, method: str = "unified", source: dict | None = None):
        run = tmp_path / f"run-{method}-{dim}"
        run.mkdir()
        (run / "plan.json").write_text(json.dumps({"method": method, "dim": dim, "budget_rows": 10, "tables": [], "features": []}))
        (run / "config.json").write_text(json.dumps({"train": {}, "source": source or {"dataset": "movielens100k"}}))
        (run / "checkpoint.pt").write_bytes(b"")
        return run

    return make


@pytest.mark.parametrize(
    ("keep", "epochs", "run", "message"),
    [
        (DIM, 3, {}, f"--keep must be between 1 and {DIM - 1} (the run's tables have dim {DIM}), got {DIM}"),
        (DIM + 4, 3, {}, "--keep must be between 1"),
        (0, 3, {}, "--keep must be between 1"),
        (-2, 3, {}, "--keep must be between 1"),
        (KEEP, 0, {}, "--epochs must be at least 1, got 0"),
        (KEEP, 3, {"method": "seo-search"}, "is an SEO search run"),
        (KEEP, 3, {"source": {"streaming": True}}, "is a streamed run"),
        (1, 3, {"dim": 1}, "there is no column to remove"),
    ],
)
def test_bad_prune_options_are_one_line_errors(capsys, fake_run, keep, epochs, run, message):
    lines = prune_errors(capsys, str(fake_run(**run)), "--keep", str(keep), "--epochs", str(epochs))
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_prune_refuses_a_folder_that_is_no_run(capsys, tmp_path):
    lines = prune_errors(capsys, str(tmp_path), "--keep", "2")
    assert len(lines) == 1 and "is not a training run directory" in lines[0]


@pytest.mark.slow
def test_uembed_prune_fine_tunes_on_the_runs_own_data_and_the_export_is_narrower(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 30, 600), rng.integers(0, 20, 600)
    pacsv.write_csv(
        pa.table({"a": [f"v{v}" for v in a], "b": [f"w{v}" for v in b], "y": ((a % 2) ^ (b % 3 == 0)).astype(int).tolist()}),
        tmp_path / "data.csv",
    )
    (tmp_path / "spec.toml").write_text("label = 'y'\n[[features]]\nname = 'a'\n[[features]]\nname = 'b'\n")
    trained = uembed("train", "--dataset", "data.csv", "--spec", "spec.toml", "--embedding", "unified", "--budget-rows", "40", "--dim", "6",
                     "--epochs", "1", "--quiet", "--runs-dir", "runs", "--name", "base", cwd=tmp_path)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    pruned = uembed("prune", "runs/base", "--keep", "2", "--epochs", "2", "--quiet", cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    assert "dim 6 -> 2" in pruned.stdout and "uembed export runs/base-pruned2" in pruned.stdout
    metrics = json.loads((tmp_path / "runs" / "base-pruned2" / "metrics.json").read_text())
    assert metrics["tables"] == {"unified": {"rows": 40, "dim": 2}} and metrics["pruning"]["kept"] == 2
    exported = uembed("export", "runs/base-pruned2", "--out", "bundles", "--evaluate", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert f"bundle test AUC {metrics['test_auc']:.5f}" in exported.stdout
    again = uembed("prune", "runs/base", "--keep", "2", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize("setting", [{"head_share": 0.3}, {"qat": "int4"}], ids=["hybrid", "qat-int4"])
def test_a_hybrid_or_qat_run_prunes_and_its_export_scores_like_it(tmp_path, setting):
    """Pruning keeps a hybrid plan's heads (their rows and keys) and a QAT run's codec: a QAT row is quantised over
    its kept columns while pruning, so the narrowed rows quantise exactly as the masked ones did."""
    torch.set_num_threads(1)
    train_set, val_set, test_set = splits = tiny_split()
    config = TrainConfig(embedding="unified", budget_rows=80, budget_fraction=None, dim=DIM, network="dcn", hidden=(16,), epochs=2,
                         **setting)  # fmt: skip
    trained = train(config, *splits, run_dir=tmp_path / "run", progress=False)
    result = prune_run(tmp_path / "run", train_set, val_set, test_set, KEEP, epochs=3, out_dir=tmp_path / "pruned", progress=False)

    assert result.plan.dim == KEEP
    assert {n: k.tolist() for n, k in result.plan.heads.items()} == {n: k.tolist() for n, k in trained.plan.heads.items()}
    assert [t.head_rows for t in result.plan.tables] == [t.head_rows for t in trained.plan.tables]
    assert bool(result.plan.heads) == ("head_share" in setting)
    bundle = load_bundle(export_run(tmp_path / "pruned", tmp_path / "bundles", "tiny", full_model_limit_bytes=0))
    assert {t["dtype"] for t in bundle.manifest["tables"]} == {setting.get("qat", "float32")}
    _, plan, model, _ = load_run(tmp_path / "pruned")
    rows, weights = plan.encode(test_set.columns)
    np.testing.assert_allclose(ReferenceScorer(bundle).score_encoded(rows, weights), predict(model, rows, weights), atol=1e-5, rtol=0)
