import csv

import pytest

from uembed.model.data import synthetic
from uembed.model.study import read_csv, run_study, summarise, write_outputs
from uembed.model.train import TrainConfig


def test_study_writes_every_run_a_summary_and_a_plot(tmp_path):
    dataset = synthetic({"user": 200, "item": 100}, 3000, seed=0)
    base = TrainConfig(dim=4, hidden=(8,), epochs=1)
    records = run_study(dataset, ["collisionless", "unified"], [0.1, 0.5], [0, 1], base)
    # collisionless once per seed; unified at each budget and seed
    assert [(r["method"], r["budget_fraction"], r["seed"]) for r in records] == [
        ("collisionless", 1.0, 0), ("collisionless", 1.0, 1),
        ("unified", 0.1, 0), ("unified", 0.1, 1), ("unified", 0.5, 0), ("unified", 0.5, 1),
    ]  # fmt: skip
    summary = write_outputs(records, tmp_path, "uembed study ...", "synthetic")
    assert [(s["method"], s["budget_fraction"], s["runs"]) for s in summary] == [
        ("collisionless", 1.0, 2), ("unified", 0.1, 2), ("unified", 0.5, 2),
    ]  # fmt: skip
    assert summary[1]["embedding_bytes"] < summary[2]["embedding_bytes"]
    rows = read_csv(tmp_path / "runs.csv")
    assert len(rows) == 6 and summarise(rows)[0]["auc"][0] == summary[0]["auc"][0]
    table = (tmp_path / "summary.md").read_text()
    assert "uembed study ..." in table and table.count("| unified |") == 2
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    with (tmp_path / "runs.csv").open() as handle:
        assert next(csv.reader(handle))[:3] == ["method", "budget_fraction", "seed"]


@pytest.mark.slow
def test_study_runs_each_applier_after_its_own_search_in_parallel(tmp_path):
    dataset = synthetic({"user": 200, "item": 100}, 3000, seed=0)
    base = TrainConfig(dim=8, chunk_dim=4, network="mlp", hidden=(8,), epochs=1)
    methods = ["separate", "seo-search", "seo-applier-exact", "seo-applier-rr"]
    records = run_study(dataset, methods, [0.5], [0, 1], base, jobs=2)
    assert [(r["method"], r["seed"]) for r in records] == [
        ("separate", 0), ("separate", 1), ("seo-search", 0), ("seo-search", 1),
        ("seo-applier-exact", 0), ("seo-applier-exact", 1), ("seo-applier-rr", 0), ("seo-applier-rr", 1),
    ]  # fmt: skip
    by = {(r["method"], r["seed"]): r for r in records}
    for seed in (0, 1):
        assert by[("seo-applier-exact", seed)]["policy"] == by[("seo-search", seed)]["policy"]
        assert by[("seo-applier-rr", seed)]["embedding_parameters"] == by[("separate", seed)]["embedding_parameters"]


def test_a_streamed_study_table_shows_examples_rss_and_wall_time():
    from uembed.model.study import markdown_table

    row = {"method": "unified", "budget_fraction": 0.1, "runs": 1, "auc": (0.81, 0.0), "logloss": (0.44, 0.0),
           "embedding_bytes": 1000, "seconds_per_epoch": 10.0, "examples_per_second": 30000.0,
           "peak_rss_bytes": 2**30, "train_examples": 5000, "wall_seconds": 12.0}  # fmt: skip
    table = markdown_table([row], "uembed study ...", "d")
    assert "| unified | 0.1 | 1 | 5,000 | 0.8100 ± 0.0000 | 0.4400 ± 0.0000 | 1,000 | 30,000 | 1.00 GiB | 12 |" in table
    assert "seconds per training epoch" not in table and table.count("| method |") == 1


def test_a_study_with_head_share_trains_the_methods_without_heads_as_they_are():
    dataset = synthetic({"user": 200, "item": 100}, 3000, seed=0)
    base = TrainConfig(dim=4, hidden=(8,), epochs=1, head_share=0.2)
    records = run_study(dataset, ["collisionless", "unified"], [0.5], [0], base)
    assert [r["method"] for r in records] == ["collisionless", "unified"]
