"""Tuned studies (uembed/model/tuning.py): the same search for every cell, selection on validation only."""

import csv
import json

import numpy as np
import pytest
import torch

import uembed.model.train
import uembed.model.tuning
from uembed.contract.errors import SpecError
from uembed.contract.plan import build_plan, collisionless_rows, vocabulary_sizes
from uembed.model.data import synthetic
from uembed.model.train import TrainConfig, build_model, build_optimizer
from uembed.model.tuning import Cell, cell_config, fixed_params, run_tuned_study, study_cells, write_tuned_outputs

BASE = TrainConfig(dim=4, hidden=(8,), epochs=2, patience=1, chunk_dim=2)


@pytest.fixture
def dataset():
    return synthetic({"user": 300, "item": 120, "city": 12}, 3000, seed=0)


def test_a_two_trial_study_runs_end_to_end_and_never_selects_on_test(tmp_path, dataset, monkeypatch):
    train_set, val_set, test_set = dataset.split(BASE.split_seed)
    evaluated = []  # which split each evaluation scored, in call order
    real_evaluate = uembed.model.train.evaluate

    def spy(labels, probabilities):
        split = "validation" if np.array_equal(labels, val_set.labels) else "test" if np.array_equal(labels, test_set.labels) else "?"
        evaluated.append((split, tuning_phase[0]))
        return real_evaluate(labels, probabilities)

    tuning_phase = [False]
    real_tune = uembed.model.tuning.tune_cell

    def tune(*args, **kwargs):
        tuning_phase[0] = True
        try:
            return real_tune(*args, **kwargs)
        finally:
            tuning_phase[0] = False

    monkeypatch.setattr(uembed.model.train, "evaluate", spy)
    monkeypatch.setattr(uembed.model.tuning, "tune_cell", tune)
    assert not np.array_equal(val_set.labels, test_set.labels)  # the spy tells the splits apart by their labels
    chosen, records = run_tuned_study(
        dataset, ["collisionless", "unified", "seo-applier-exact"], [0.2], [0, 1], BASE, trials=2, out_dir=tmp_path
    )
    assert {split for split, tuning in evaluated if tuning} == {"validation"}
    assert ("test", False) in evaluated

    with (tmp_path / "trials.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    assert len(trials) == 3 * 2
    for cell in ("collisionless@1", "unified@0.2", "seo-applier-exact@0.2"):
        method, budget = cell.split("@")
        mine = [t for t in trials if t["method"] == method and float(t["budget_fraction"]) == float(budget)]
        complete = [t for t in mine if t["state"] == "COMPLETE"]
        # The first trial is the fixed settings; the selection is the best validation AUC of the cell's trials.
        assert json.loads(mine[0]["params"]) == fixed_params(BASE, method)
        best = max(complete, key=lambda t: float(t["val_auc"]))
        assert chosen[cell]["params"] == json.loads(best["params"]) and chosen[cell]["val_auc"] == float(best["val_auc"])
        assert chosen[cell]["trials"] == 2
    # Final runs: tuned and fixed settings, each once per seed, with the test split.
    assert len(records) == 3 * 2 * 2 and all(r["test_auc"] is not None for r in records)
    assert all(r.get("policy") for r in records if r["method"] == "seo-applier-exact")  # the policy each Applier used
    tuned, fixed = write_tuned_outputs(chosen, records, tmp_path, "uembed study --trials 2 ...", "synthetic")
    assert len(tuned) == len(fixed) == 3
    table = (tmp_path / "summary.md").read_text()
    assert "uembed study --trials 2 ..." in table and "| seo-applier-exact | 0.2 |" in table
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    selected = json.loads((tmp_path / "selected.json").read_text())
    assert selected["unified@0.2"]["params"] == chosen["unified@0.2"]["params"]


def test_the_selected_configuration_is_reused_not_tuned_again(tmp_path, dataset, monkeypatch):
    chosen, _ = run_tuned_study(dataset, ["unified"], [0.2], [0], BASE, trials=2, out_dir=tmp_path)
    trials_before = (tmp_path / "trials.csv").read_text()
    # Pretend the cell chose something else: the re-run must train exactly that.
    picked = dict(chosen["unified@0.2"]["params"], dim=8, batch_size=512)
    selected = json.loads((tmp_path / "selected.json").read_text())
    selected["unified@0.2"]["params"] = picked
    (tmp_path / "selected.json").write_text(json.dumps(selected))

    def must_not_tune(*args, **kwargs):
        raise AssertionError("a selected cell was tuned again")

    monkeypatch.setattr(uembed.model.tuning, "tune_cell", must_not_tune)
    _, records = run_tuned_study(dataset, ["unified"], [0.2], [0], BASE, trials=2, out_dir=tmp_path)
    tuned = [r for r in records if r["settings"] == "tuned"]
    assert [(r["dim"], r["batch_size"]) for r in tuned] == [(8, 512)]
    assert (tmp_path / "trials.csv").read_text() == trials_before


def test_the_budget_is_held_in_parameters_whatever_the_dim(dataset):
    train_set, _, _ = dataset.split(0)
    reference = collisionless_rows(vocabulary_sizes(train_set.columns))
    cell = Cell("unified", 0.2)
    sizes = {}
    for dim in (2, 4, 8):
        config = cell_config(cell, dict(fixed_params(BASE, "unified"), dim=dim), BASE, reference)
        plan = build_plan("unified", train_set.spec, train_set.columns, config.dim, budget_rows=config.budget_rows)
        sizes[dim] = plan.embedding_parameters
    # rows = parameters / dim, rounded: equal to within one row of the widest table.
    assert max(sizes.values()) - min(sizes.values()) <= 8
    assert sizes[4] == round(0.2 * reference) * 4  # the fixed settings get the fixed-settings study's rows


def test_lookup_offset_moves_multi_size_lookups_within_one_to_four(dataset):
    train_set, _, _ = dataset.split(0)
    counts = {}
    for offset in (-1, 0, 1):
        plan = build_plan("multi-size-unified", train_set.spec, train_set.columns, 4, budget_rows=60, lookups_offset=offset)
        counts[offset] = {f.name: len(f.lookups) for f in plan.features}
    assert counts[0] == {"user": 2, "item": 2, "city": 1}
    assert counts[1] == {"user": 3, "item": 3, "city": 2}
    assert counts[-1] == {"user": 1, "item": 1, "city": 1}


def test_weight_decay_reaches_the_tables_only(dataset):
    train_set, _, _ = dataset.split(0)
    config = TrainConfig(dim=4, hidden=(8,), embedding_weight_decay=0.01)
    plan = build_plan("unified", train_set.spec, train_set.columns, 4, budget_rows=40)
    net = build_model(plan, config)
    optimizer = build_optimizer(net, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert decayed == {id(p) for p in net.embedding.parameters()}
    plain = build_optimizer(net, TrainConfig(dim=4, hidden=(8,)))
    assert type(plain) is torch.optim.Adam


def test_the_seo_search_is_a_stage_not_a_cell():
    assert [c.key for c in study_cells(["collisionless", "unified"], [0.1, 0.3])] == [
        "collisionless@1", "unified@0.1", "unified@0.3",
    ]  # fmt: skip
    with pytest.raises(SpecError, match="seo-applier"):
        study_cells(["seo-search"], [0.1])


def test_an_exact_feature_leaves_the_shared_table_for_a_collisionless_one(dataset):
    train_set, _, _ = dataset.split(0)
    shared = build_plan("multi-size-unified", train_set.spec, train_set.columns, 4, budget_rows=60)
    ablated = build_plan("multi-size-unified", train_set.spec, train_set.columns, 4, budget_rows=60, exact_features=("user",))
    user = next(f for f in ablated.features if f.name == "user")
    assert user.vocabulary and [lookup.table for lookup in user.lookups] == ["exact:user"]
    assert ablated.table("unified").rows == shared.table("unified").rows
    vocabulary = vocabulary_sizes(train_set.columns)["user"]
    assert ablated.embedding_parameters == shared.embedding_parameters + (vocabulary + 1) * 4
    # Every training value of the exact feature has a row of its own (row 0: unknown).
    rows, _ = ablated.encode({"user": train_set.columns["user"], **{k: v for k, v in train_set.columns.items() if k != "user"}})
    user_rows = rows[:, : user.width]
    assert len(np.unique(user_rows)) == vocabulary and user_rows.min() >= 1
    with pytest.raises(SpecError, match="unknown feature"):
        build_plan("unified", train_set.spec, train_set.columns, 4, budget_rows=60, exact_features=("nope",))


def test_the_collision_ablation_trains_each_feature_exact(dataset):
    from uembed.model.tuning import collision_ablation

    records = collision_ablation(dataset, Cell("unified", 0.2), fixed_params(BASE, "unified"), BASE, [0])
    assert [r["exact_features"] for r in records] == ["(none)", "user", "item", "city", "user+item+city"]
    assert records[0]["embedding_parameters"] < records[1]["embedding_parameters"] < records[-1]["embedding_parameters"]


def test_a_selection_is_retrained_by_the_train_command_it_names(tmp_path, dataset):
    from uembed.cli import build_parser
    from uembed.cli.model_commands import config_from_args

    train_set, _, _ = dataset.split(0)
    reference = collisionless_rows(vocabulary_sizes(train_set.columns))
    params = dict(fixed_params(BASE, "multi-size-unified"), dim=8, learning_rate=0.004, batch_size=512, hidden_layers=2,
                  cross_layers=3, decay_tables=True, embedding_weight_decay=0.01, lookups_offset=1)  # fmt: skip
    config = cell_config(Cell("multi-size-unified", 0.2), params, BASE, reference)
    arguments = uembed.model.tuning.train_arguments(config)
    args = build_parser().parse_args(["train", "--embedding", "multi-size-unified", *arguments.split()])
    again = config_from_args(args, embedding="multi-size-unified", budget_rows=args.budget_rows, budget_fraction=None)
    assert again == config
