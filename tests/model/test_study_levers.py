"""A study of AUC against bytes (issue #37, item 6): row codecs, QAT, head shares and pruning as grid axes, the
bytes each configuration serves, and the frontier per byte budget."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_spec, tiny_table
from uembed.bundle.codecs import decode_rows
from uembed.bundle.loader import load_bundle
from uembed.cli import main
from uembed.model.data import from_table, synthetic
from uembed.model.export import export_run
from uembed.model.levers import served_bytes, table_holder, with_codec
from uembed.model.study import Levers, frontier, read_csv, run_study, summarise, write_outputs
from uembed.model.train import TrainConfig, evaluate, predict, train


def tiny_splits():
    return from_table(tiny_table(1200), tiny_spec(), name="tiny").split(0)


def test_served_bytes_count_records_scales_codebooks_biases_and_maps():
    train_set, _, _ = tiny_splits()
    config = TrainConfig(embedding="unified", budget_rows=90, budget_fraction=None, dim=8, head_share=0.3, epochs=1)
    plan = train(config, *tiny_splits(), progress=False).plan
    rows = sum(t.rows for t in plan.tables)
    maps = sum(k.nbytes for k in plan.heads.values()) + sum(v.nbytes for v in plan.vocabularies.values())
    assert plan.heads and maps > 0
    biases = 4 * plan.bias_parameters
    assert served_bytes(plan, "float32") == rows * 8 * 4 + biases + maps == plan.embedding_bytes() + maps
    assert served_bytes(plan, "float16") == rows * 8 * 2 + biases + maps
    assert served_bytes(plan, "int4") == rows * (4 + 8) + biases + maps  # 8 values in 4 bytes, float32 scale and bias
    assert served_bytes(plan, "int2") == rows * (2 + 8) + biases + maps
    assert served_bytes(plan, "pq", 2) == rows * 2 + len(plan.tables) * 256 * 8 * 4 + biases + maps
    assert served_bytes(plan, "pq") == served_bytes(plan, "pq", 4)  # the export's default: half the dim


@pytest.mark.parametrize("codec", ["int4", "int2", "pq"])
def test_a_codec_copy_holds_the_rows_its_bundle_decodes(tmp_path, codec):
    """The study's AUC of a codec is the AUC of that codec's bundle: the copy's rows are the exported rows decoded."""
    torch.set_num_threads(1)
    config = TrainConfig(embedding="unified", budget_rows=300, budget_fraction=None, dim=8, hidden=(16,), epochs=1)
    result = train(config, *tiny_splits(), run_dir=tmp_path / "run", progress=False)
    bundle_path = export_run(tmp_path / "run", tmp_path / "bundles", "tiny", dtype=codec, full_model_limit_bytes=0)
    bundle = load_bundle(bundle_path)
    copy = table_holder(with_codec(result.model, codec))
    original = table_holder(result.model)
    for (name, start, stop), entry in zip(copy.table_slices, bundle.manifest["tables"], strict=True):
        assert entry["name"] == name
        values = np.load(bundle_path / entry["file"])
        scale_bias = np.load(bundle_path / entry["scale_bias"]["file"]) if entry.get("scale_bias") else None
        codebooks = np.load(bundle_path / entry["codebooks"]["file"]) if entry.get("codebooks") else None
        decoded = decode_rows(values, codec, entry["dim"], scale_bias, codebooks)
        np.testing.assert_allclose(copy.weight[start:stop].detach().numpy(), decoded, atol=1e-6, rtol=0)
        assert not torch.equal(copy.weight[start:stop], original.weight[start:stop])  # the original stays float32


def test_a_qat_run_scores_in_its_own_codec_as_it_trained():
    torch.set_num_threads(1)
    train_set, val_set, test_set = splits = tiny_splits()
    config = TrainConfig(embedding="unified", budget_rows=300, budget_fraction=None, dim=8, hidden=(16,), epochs=2, qat="int4")
    result = train(config, *splits, progress=False)
    coded = evaluate(test_set.labels, predict(with_codec(result.model, "int4"), *result.plan.encode(test_set.columns)))
    assert coded["auc"] == pytest.approx(result.metrics["test_auc"], abs=1e-9)
    assert coded["logloss"] == pytest.approx(result.metrics["test_logloss"], abs=1e-6)


def test_a_lever_study_records_each_codec_of_each_run_and_the_frontier(tmp_path):
    torch.set_num_threads(1)
    dataset = synthetic({"user": 200, "item": 100}, 3000, seed=0)
    base = TrainConfig(dim=8, hidden=(8,), epochs=1)
    levers = Levers(codecs=("float32", "int4"), qat=(None, "int2"), head_shares=(0.0, 0.25), prune_keep=(4,), prune_epochs=2)
    records = run_study(dataset, ["collisionless", "unified"], [0.3], [0, 1], base, levers=levers)
    labels = {(r["method"], r["qat"], r["head_share"], r["prune_keep"], r["codec"]) for r in records}
    # collisionless: no head; a QAT run in its own codec only; each run pruned too
    assert labels == {
        ("collisionless", "", 0.0, "", "float32"), ("collisionless", "", 0.0, "", "int4"),
        ("collisionless", "", 0.0, 4, "float32"), ("collisionless", "", 0.0, 4, "int4"),
        ("collisionless", "int2", 0.0, "", "int2"), ("collisionless", "int2", 0.0, 4, "int2"),
        *((("unified", q, h, k, c) for h in (0.0, 0.25) for k in ("", 4) for q, c in (("", "float32"), ("", "int4"), ("int2", "int2")))),
    }  # fmt: skip
    assert len(records) == 2 * len(labels)
    for r in records:
        assert r["dim"] == (4 if r["prune_keep"] else 8)
        assert 0 <= r["test_auc"] <= 1 and np.isfinite(r["test_logloss"])
    summary = write_outputs(records, tmp_path, "uembed study --codecs ...", "synthetic")
    assert {row["runs"] for row in summary} == {2}
    table = (tmp_path / "summary.md").read_text()
    assert "## Frontier" in table and "| unified head0.25 prune4 qat-int2 int2 | 0.3 | 4 | 2 |" in table
    assert len(read_csv(tmp_path / "runs.csv")) == len(records)
    assert summarise(read_csv(tmp_path / "runs.csv"))[0]["served_bytes"] == summary[0]["served_bytes"]
    best = frontier(summary)
    assert best and all(e["row"]["served_bytes"] <= e["budget"] for e in best)
    assert [e["row"]["auc"][0] for e in best] == sorted(e["row"]["auc"][0] for e in best)
    for entry in best:  # nothing within the budget beats the frontier's pick
        assert entry["row"]["auc"][0] == max(r["auc"][0] for r in summary if r["served_bytes"] <= entry["budget"])
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--codecs", "pq", "--pq-subvectors", "3"], "--pq-subvectors 3 does not divide the dim 16"),
        (["--codecs", "int4", "--trials", "2"], "study memory levers afterwards with --settings"),
        (["--prune-keep", "16"], "--prune-keep 16 keeps every column of dim 16"),
        (["--qat", "fp8"], "unknown --qat codec(s) fp8"),
        (["--codecs", "int3"], "unknown codec(s) int3"),
        (["--head-shares", "0,1.5"], "head shares must be at least 0 and below 1 (or auto)"),
        (["--codecs", "int4", "--settings", "missing.json"], "--settings missing.json: not a readable selected.json"),
    ],
)
def test_bad_lever_options_are_one_line_errors(capsys, tmp_path, options, message):
    arguments = ["study", "--dataset", "synthetic:small", "--synthetic-examples", "2000", "--methods", "unified", "--budgets", "0.1",
                 "--seeds", "1", "--epochs", "1", "--out", str(tmp_path / "out"), *options]  # fmt: skip
    try:
        code = main(arguments)
    except SystemExit as stopped:  # argparse refuses a malformed list itself
        code = stopped.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err


def test_a_streamed_study_counts_values_for_its_head_shares_and_labels_each_run_by_the_share_it_trained(tmp_path):
    """The scan counts values when only --head-shares asks for heads; each record's share is the one its run
    trained with (a --head-share given beside it does not leak into the 0 variant)."""
    assert main(["data", "synth", "--preset", "criteo-tiny", "--examples", "6k", "--out", str(tmp_path / "data"), "--quiet"]) == 0
    arguments = ["study", "--dataset", str(tmp_path / "data"), "--methods", "collisionless,unified", "--budgets", "0.2",
                 "--seeds", "1", "--epochs", "1", "--network", "mlp", "--hidden", "8", "--batch-size", "512",
                 "--head-share", "0.3", "--head-shares", "0,0.25", "--codecs", "float32,int4", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(arguments) == 0
    records = read_csv(tmp_path / "out" / "runs.csv")
    shares = {(r["method"], float(r["head_share"]), r["codec"]) for r in records}
    assert shares == {("collisionless", 0.0, "float32"), ("collisionless", 0.0, "int4"),
                      ("unified", 0.0, "float32"), ("unified", 0.0, "int4"), ("unified", 0.25, "float32"), ("unified", 0.25, "int4")}  # fmt: skip
    runs = {p.name: json.loads((p / "plan.json").read_text()) for p in (tmp_path / "out" / "runs").iterdir()}
    heads = {name: sum(t.get("head_rows", 0) for t in plan["tables"]) for name, plan in runs.items()}
    assert heads["unified-b0.2-s0-head0.25"] > 0 and heads["unified-b0.2-s0"] == 0 and heads["collisionless-b1-s0"] == 0


def test_pq_of_a_width_its_sub_vectors_cannot_split_is_refused_before_training(capsys, tmp_path):
    arguments = ["study", "--dataset", "synthetic:small", "--synthetic-examples", "2000", "--methods", "unified", "--budgets",
                 "0.1", "--seeds", "1", "--epochs", "1", "--codecs", "pq", "--prune-keep", "5", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(arguments) == 2
    assert "does not divide the dim 5" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "runs.csv").exists()
