"""SEO: policy derivation, Exact and round-robin assignment, exact budgets, and a search that learns."""

import json

import numpy as np
import pytest
import torch

from uembed.contract.errors import BudgetError, SpecError
from uembed.contract.plan import build_plan, collisionless_rows, vocabulary_sizes
from uembed.contract.seo import (
    ChunkPolicy,
    attention,
    chunk_table_rows,
    derive_policy,
    exact_assignment,
    load_policy,
    round_robin_assignment,
)
from uembed.model.data import synthetic
from uembed.model.train import TrainConfig, train


def test_policy_from_known_logits():
    logits = np.log(np.array([[4.0, 1.0, 4.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, 8.0, 0.5, 0.5]]))
    alpha = attention(logits, temperature=1.0)
    assert alpha.sum() == pytest.approx(1.0)
    policy = derive_policy(logits, ["a", "b", "c"], temperature=1.0, chunk_dim=8, dim=16)
    # uniform share is 1/12; a's 4/23.5 chunks and c's 8/23.5 chunk clear it, b's 1/23.5 do not: b keeps its best (the first)
    assert policy.features == {"a": (0, 2), "b": (0,), "c": (1,)}
    assert policy.attention["c"][1] == pytest.approx(8 / 23.5, abs=1e-6)
    # a lower temperature sharpens the same logits: c's chunk takes almost everything, a keeps one chunk
    sharp = derive_policy(logits, ["a", "b", "c"], 0.25, 8, 16)
    assert sharp.features == {"a": (0,), "b": (0,), "c": (1,)} and sharp.attention["c"][1] > 0.85


def test_exact_and_round_robin_on_the_papers_examples():
    # Figure 1(d): X reads chunks 1, 2 and 4, Y reads chunks 1 and 3 (1-based) -> all four chunks in use.
    policy = ChunkPolicy(chunk_dim=8, pool_chunks=4, dim=16, features={"X": (0, 1, 3), "Y": (0, 2)})
    assert exact_assignment(policy) == (4, {"X": (0, 1, 3), "Y": (0, 2)})
    # Section 3.2: F1 needs 2 chunks, F2 needs 3, four tables -> {T1, T2} and {T3, T4, T1}.
    assert round_robin_assignment({"F1": 2, "F2": 3}, 4) == {"F1": (0, 1), "F2": (2, 3, 0)}
    # Exact renumbers the chunks in use: chunks 1 and 3 only -> two tables.
    sparse = ChunkPolicy(8, 4, 16, {"a": (3,), "b": (1, 3)})
    assert exact_assignment(sparse) == (2, {"a": (1,), "b": (0, 1)})
    with pytest.raises(SpecError, match="needs 3 chunks but there are 2"):
        round_robin_assignment({"a": 3}, 2)


POLICIES = [
    {"user": (0,), "item": (0, 1, 2, 3), "home_city": (1,), "work_city": (2,), "tags": (3,), "age": (0, 3)},
    {"user": (0, 1), "item": (0, 1), "home_city": (0,), "work_city": (0,), "tags": (1,), "age": (1,)},
    {"user": (2,), "item": (2,), "home_city": (2,), "work_city": (2,), "tags": (2,), "age": (2,)},
]


@pytest.mark.parametrize("features", POLICIES)
@pytest.mark.parametrize("method", ["seo-applier-exact", "seo-applier-rr"])
@pytest.mark.parametrize("budget_rows", [37, 50, 401])
def test_applier_parameters_equal_the_budget_exactly(tiny_dataset, features, method, budget_rows):
    policy = ChunkPolicy(chunk_dim=4, pool_chunks=4, dim=8, features=features)
    plan = build_plan(method, tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=budget_rows, policy=policy)
    assert plan.embedding_parameters == budget_rows * 8
    baseline = build_plan("separate", tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=budget_rows)
    assert plan.embedding_parameters == baseline.embedding_parameters
    for feature in plan.features:
        assert len(feature.lookups) == len(features[feature.name])
        assert len({lookup.seed for lookup in feature.lookups}) == 1  # one key, read in every chunk table


def test_applier_refuses_bad_policies_and_budgets(tiny_dataset, tmp_path):
    with pytest.raises(SpecError, match="needs a policy"):
        build_plan("seo-applier-exact", tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=50)
    partial = ChunkPolicy(4, 4, 8, {"user": (0,)})
    with pytest.raises(SpecError, match="no chunks for feature"):
        build_plan("seo-applier-rr", tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=50, policy=partial)
    with pytest.raises(BudgetError, match="whole number"):
        chunk_table_rows(budget_rows=3, dim=3, chunk_dim=2, tables=2)
    with pytest.raises(SpecError, match="distinct"):
        ChunkPolicy(4, 4, 8, {"user": (0, 0)})
    (tmp_path / "p.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SpecError, match="not a uembed-seo-policy"):
        load_policy(tmp_path / "p.json")


def test_policy_round_trips_through_its_json_file(tmp_path):
    policy = ChunkPolicy(8, 4, 16, {"a": (2, 0), "b": (1,)}, attention={"a": [0.3, 0.1, 0.4, 0.0]}, search={"seed": 3})
    loaded = load_policy(policy.save(tmp_path / "policy.json"))
    assert loaded.features == {"a": (0, 2), "b": (1,)} and loaded.search == {"seed": 3}


def test_monolithic_shared_reads_every_chunk_and_separate_splits_evenly(tiny_dataset):
    mono = build_plan("monolithic-shared", tiny_dataset.spec, tiny_dataset.columns, 16, budget_rows=60)
    assert [t.dim for t in mono.tables] == [8, 8] and all(len(f.lookups) == 2 for f in mono.features)
    assert mono.output_dim == 6 * 16
    separate = build_plan("separate", tiny_dataset.spec, tiny_dataset.columns, 16, budget_rows=60)
    assert {t.rows for t in separate.tables} == {10}


def test_search_plan_adjusts_hash_buckets(tiny_dataset):
    plan = build_plan("seo-search", tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=100, search_multiplier=2)
    assert plan.tables[0].rows == 50 and plan.dim == 16 and plan.embedding_parameters == 100 * 8
    wide = build_plan("seo-search", tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=100, adjust_hash_buckets=False)
    assert wide.tables[0].rows == 100


def test_search_learns_a_non_uniform_policy_and_starves_the_noise_feature():
    torch.set_num_threads(1)
    vocabulary = {"user": 300, "item": 200, "noise": 300}
    dataset = synthetic(vocabulary, 20_000, seed=0, noise_features=("noise",))
    train_set, val_set, test_set = dataset.split(0)
    budget = collisionless_rows(vocabulary_sizes(train_set.columns))
    config = TrainConfig(embedding="seo-search", budget_rows=budget, dim=8, chunk_dim=4, search_multiplier=2,
                         network="mlp", hidden=(32,), epochs=6, patience=6, seed=0, batch_size=512)  # fmt: skip
    result = train(config, train_set, val_set, test_set, progress=False)
    policy = ChunkPolicy.from_dict(result.metrics["policy"])
    mass = {name: sum(weights) for name, weights in policy.attention.items()}
    assert mass["noise"] < min(mass["user"], mass["item"])
    assert policy.counts()["noise"] <= min(policy.counts()["user"], policy.counts()["item"])
    assert len(set(policy.features.values())) > 1 or len(set(policy.counts().values())) > 1  # not uniform

    applier = TrainConfig(embedding="seo-applier-rr", budget_rows=budget, dim=8, network="mlp", hidden=(32,),
                          epochs=3, seed=0, policy=policy.to_dict())  # fmt: skip
    trained = train(applier, train_set, val_set, test_set, progress=False)
    assert trained.plan.embedding_parameters == budget * 8
    assert trained.metrics["test_auc"] > 0.6
