"""Hybrid tables (#38, item 1): a feature's most frequent training values own a head row each, at the end of the
table it reads; every other value hashes into the rows before them. Checked against a port of the contract
written here from its text (xxhash, ``bisect``), not through uembed's hashing code."""

from bisect import bisect_left
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import xxhash

from uembed.contract.collisions import collision_report, training_value_counts
from uembed.contract.errors import BudgetError, SpecError
from uembed.contract.features import DatasetSpec, FeatureSpec, load_spec
from uembed.contract.plan import (
    HEAD_METHODS,
    EmbeddingPlan,
    HeadCounts,
    auto_head_size,
    build_plan,
    column_head_counts,
    head_share_for,
)


def port_row(name: str, value: bytes, head: list[int], head_start: int, table_rows: int, head_rows: int) -> int:
    """The contract's row of a value of a feature with a head (uembed/contract/hashing.py, 5.), written anew."""
    seed = xxhash.xxh3_64_intdigest(f"{name}#0".encode(), seed=0)
    key = xxhash.xxh3_64_intdigest(value, seed=seed)
    at = bisect_left(head, key)
    if at < len(head) and head[at] == key:
        return head_start + at
    return key % (table_rows - head_rows)


def counts_of(column) -> Counter:
    codes = column.codes[column.codes > 0].ravel()
    return Counter(column.uniques[code] for code in codes.tolist())


@pytest.mark.parametrize("method", [str(m) for m in HEAD_METHODS])
def test_head_share_zero_is_todays_plan(tiny_dataset, method):
    today = build_plan(method, tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=60)
    zero = build_plan(method, tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=60, head_share=0.0)
    assert zero.to_dict() == today.to_dict() and not zero.heads
    assert all("head_rows" not in t for t in zero.to_dict()["tables"])
    for got, want in zip(zero.encode(tiny_dataset.columns), today.encode(tiny_dataset.columns)):
        np.testing.assert_array_equal(got, want)


def test_head_and_tail_values_map_as_the_contract_says(tiny_dataset):
    columns = tiny_dataset.columns
    plan = build_plan("unified", tiny_dataset.spec, columns, 8, budget_rows=60, head_share=0.3)
    table = plan.table("unified")
    assert table.rows == 60 and table.head_rows == 18  # the budget pays for the heads: floor(0.3 * 60)
    assert plan.embedding_parameters == 60 * 8
    heads_seen = tails_seen = 0
    head_counts, tail_counts = [], []
    for feature in plan.features:
        counts = counts_of(columns[feature.name])
        values = sorted(counts)
        head = [int(k) for k in plan.heads.get(feature.name, [])]
        assert head == sorted(head)
        got = plan.rows_of_values(feature, feature.lookups[0], values)
        for value, row in zip(values, got.tolist()):
            assert row == port_row(feature.name, value, head, feature.head_start, table.rows, table.head_rows), (feature.name, value)
            in_head = row >= table.rows - table.head_rows
            heads_seen += in_head
            tails_seen += not in_head
            (head_counts if in_head else tail_counts).append(counts[value])
    assert heads_seen == table.head_rows and tails_seen > 0
    assert min(head_counts) >= max(tail_counts)  # the head rows went to the most frequent values, across features
    # Each head row is read by one value; a missing value is never in a head.
    feature = plan.features[0]
    assert plan.rows_of_values(feature, feature.lookups[0], [b""])[0] < table.hashed_rows


def test_a_hybrid_plan_round_trips_and_refuses_heads_that_break_the_contract(tiny_dataset):
    plan = build_plan("hashing-trick", tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=60, head_share=0.25)
    assert plan.heads and all(t.rows > t.head_rows for t in plan.tables)
    again = EmbeddingPlan.from_dict(plan.to_dict(), plan.vocabularies, plan.heads)
    for got, want in zip(again.encode(tiny_dataset.columns), plan.encode(tiny_dataset.columns)):
        np.testing.assert_array_equal(got, want)
    name = next(iter(plan.heads))
    with pytest.raises(SpecError, match="differ"):
        EmbeddingPlan.from_dict(plan.to_dict(), plan.vocabularies, {})
    if plan.heads[name].size > 1:
        with pytest.raises(SpecError, match="strictly increasing"):
            EmbeddingPlan.from_dict(plan.to_dict(), plan.vocabularies, {**plan.heads, name: plan.heads[name][::-1].copy()})


@pytest.mark.parametrize("share", [-0.1, 1.0, float("nan")])
def test_a_head_share_outside_0_to_1_is_a_budget_error(tiny_dataset, share):
    with pytest.raises(BudgetError, match="head-share"):
        build_plan("unified", tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=60, head_share=share)


def test_heads_are_refused_where_they_cannot_hold(tiny_dataset):
    with pytest.raises(SpecError, match="not collisionless"):
        build_plan("collisionless", tiny_dataset.spec, tiny_dataset.columns, 8, head_share=0.2)
    names = [f.name for f in tiny_dataset.spec.features]
    streamed = SimpleNamespace(vocabulary=dict.fromkeys(names, 10), widths=dict.fromkeys(names, 1),
                               keys={n: np.arange(10, dtype=np.uint64) for n in names})  # fmt: skip
    with pytest.raises(SpecError, match="scanned without counting"):
        build_plan("unified", tiny_dataset.spec, streamed, 8, budget_rows=60, head_share=0.2)


def test_the_collision_report_of_a_hybrid_plan_counts_head_values_as_owning_their_rows(tiny_dataset):
    """A head value never shares its row, measured or predicted: a feature wholly in the head is at 0 in both, and
    the prediction of one partly in it is the tail's chance times the tail's share of its occurrences."""
    columns = tiny_dataset.columns
    plan = build_plan("unified", tiny_dataset.spec, columns, 8, budget_rows=60, head_share=0.3)
    report = collision_report(plan, training_value_counts(columns))["features"]
    whole = [f.name for f in plan.features if f.name in plan.heads and plan.heads[f.name].size == len(counts_of(columns[f.name]))]
    partial = [f.name for f in plan.features if f.name in plan.heads and f.name not in whole]
    assert whole and partial
    for name in whole:
        assert report[name]["shared_share"] == 0.0 and report[name]["predicted_share"] == 0.0
    table = plan.table("unified")
    hashed_lookups = sum(1 for f in plan.features for v in counts_of(columns[f.name])
                         if plan.rows_of_values(f, f.lookups[0], [v])[0] < table.hashed_rows)  # fmt: skip
    for name in partial:
        feature = next(f for f in plan.features if f.name == name)
        counts = counts_of(columns[name])
        tail = sum(n for v, n in counts.items() if plan.rows_of_values(feature, feature.lookups[0], [v])[0] < table.hashed_rows)
        chance = 1 - (1 - 1 / table.hashed_rows) ** (hashed_lookups - 1)
        assert report[name]["predicted_share"] == pytest.approx(chance * tail / sum(counts.values()), rel=1e-9)


def with_shares(spec, **shares):
    return replace(spec, features=tuple(replace(f, head_share=shares[f.name]) if f.name in shares else f for f in spec.features))


def test_a_features_own_head_share_gives_it_its_own_rows_and_the_rest_compete_for_the_global_share(tiny_dataset):
    columns = tiny_dataset.columns
    spec = with_shares(tiny_dataset.spec, user=0.25, item=0.0)
    plan = build_plan("unified", spec, columns, 8, budget_rows=60, head_share=0.1)
    table = plan.table("unified")
    user = counts_of(columns["user"])
    assert len(user) > 15  # more users than its 15 rows: the head holds the most frequent ones, not all
    assert "item" not in plan.heads  # its own share of 0: no head, whatever the global share
    assert plan.heads["user"].size == int(0.25 * 60)
    assert table.head_rows == int(0.25 * 60) + int(0.1 * 60)
    feature = next(f for f in plan.features if f.name == "user")
    rows = dict(zip(sorted(user), plan.rows_of_values(feature, feature.lookups[0], sorted(user)).tolist()))
    in_head = [user[v] for v, r in rows.items() if r >= table.hashed_rows]
    assert min(in_head) >= max(user[v] for v, r in rows.items() if r < table.hashed_rows)
    # the others (not user, not item) share the global 0.1 among themselves, most frequent first
    others = [f for f in plan.features if f.name in plan.heads and f.name != "user"]
    taken = sum(int((plan.rows_of_values(f, f.lookups[0], sorted(counts_of(columns[f.name]))) >= table.hashed_rows).sum()) for f in others)
    assert taken == int(0.1 * 60)
    # and no global share: only the features that ask for a head get one
    alone = build_plan("unified", spec, columns, 8, budget_rows=60)
    assert set(alone.heads) == {"user"} and alone.table("unified").head_rows == 15
    for got, want in zip(EmbeddingPlan.from_dict(alone.to_dict(), alone.vocabularies, alone.heads).encode(columns), alone.encode(columns)):
        np.testing.assert_array_equal(got, want)


def test_per_feature_shares_that_take_a_whole_table_are_refused_naming_it(tiny_dataset):
    spec = with_shares(tiny_dataset.spec, user=0.6, item=0.5)
    with pytest.raises(BudgetError, match=r"table 'unified': the heads of user, item would take 66 of its 60 rows"):
        build_plan("unified", spec, tiny_dataset.columns, 8, budget_rows=60)
    separate = build_plan("separate", spec, tiny_dataset.columns, 8, budget_rows=60)  # a table each: both fit
    assert {"user", "item"} == set(separate.heads)


@pytest.mark.parametrize(("share", "shown"), [(-0.1, "-0.1"), (1, "1"), (1.5, "1.5"), ("0.2", "'0.2'"), (True, "True"), (float("nan"), "nan")])
def test_a_features_head_share_outside_0_to_1_or_not_a_number_is_a_one_line_spec_error(share, shown):
    with pytest.raises(SpecError) as error:
        FeatureSpec.from_dict({"name": "user", "head_share": share})
    assert str(error.value) == f"feature 'user': head_share must be a number at least 0 and below 1, got {shown}"


def test_a_features_head_share_is_read_from_a_spec_file_and_recorded_only_when_set(tmp_path):
    (tmp_path / "spec.toml").write_text("label='clicked'\n[[features]]\nname='user'\nhead_share=0.2\n[[features]]\nname='item'\n")
    spec = load_spec(tmp_path / "spec.toml")
    assert spec.feature("user").head_share == 0.2 and spec.feature("item").head_share is None
    assert spec.feature("user").to_dict()["head_share"] == 0.2 and "head_share" not in spec.feature("item").to_dict()
    assert DatasetSpec.from_dict(spec.to_dict()) == spec


def counted(counts) -> HeadCounts:
    return HeadCounts(np.arange(len(counts), dtype=np.uint64), np.asarray(counts, dtype=np.int64))


def test_auto_head_size_gives_rows_to_frequent_values_only_where_they_pay_for_the_row():
    # equally frequent values, many more than rows: a head row spares one value and crowds all the others
    assert auto_head_size(100, [counted([5] * 1000)]) == 0
    # a power law: the frequent values get rows of their own, never the whole table
    power = (10**6 / np.arange(1, 5001) ** 1.1).astype(np.int64) + 1
    size = auto_head_size(1000, [counted(power)])
    assert 0 < size < 999
    # a table that holds every value: no tail value is left to share a row
    assert auto_head_size(100, [counted([7, 3, 2, 1, 1])]) >= 4
    # others' keys in the hashed rows make each row dearer: never a larger head
    assert auto_head_size(1000, [counted(power)], others=20_000) <= size


@pytest.mark.parametrize("method", ["unified", "hashing-trick", "semantic-group", "multi-size-unified"])
def test_head_share_auto_picks_each_tables_head_by_the_rule_and_keeps_the_contract(tiny_dataset, method):
    columns = tiny_dataset.columns
    plan = build_plan(method, tiny_dataset.spec, columns, 8, budget_rows=60, head_share="auto")
    assert plan.heads and plan.embedding_parameters == build_plan(method, tiny_dataset.spec, columns, 8, budget_rows=60).embedding_parameters
    for table in plan.tables:
        readers = [f for f in plan.features if len(f.lookups) == 1 and f.lookups[0].table == table.name]
        others = sum(len(counts_of(columns[f.name])) * sum(1 for lookup in f.lookups if lookup.table == table.name)
                     for f in plan.features if f not in readers)  # fmt: skip
        want = auto_head_size(table.rows, [column_head_counts(columns[f.name], f.name) for f in readers], others)
        assert table.head_rows == want, table.name
    again = EmbeddingPlan.from_dict(plan.to_dict(), plan.vocabularies, plan.heads)
    for got, want in zip(again.encode(columns), plan.encode(columns)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(BudgetError, match="or auto, got often"):
        build_plan(method, tiny_dataset.spec, columns, 8, budget_rows=60, head_share="often")


def test_a_specs_head_share_is_left_unused_with_a_warning_by_a_method_without_heads(tiny_dataset):
    spec = with_shares(tiny_dataset.spec, user=0.2)
    plan = build_plan("collisionless", spec, tiny_dataset.columns, 8)
    assert not plan.heads and plan.to_dict() == build_plan("collisionless", tiny_dataset.spec, tiny_dataset.columns, 8).to_dict()
    assert "collisionless has no heads: the spec's head_share of user is not used" in plan.warnings
    assert head_share_for("collisionless", 0.2) == 0.0 and head_share_for("unified", "auto") == "auto"


def test_a_specs_head_share_on_a_feature_without_a_head_is_left_unused_with_a_warning(tiny_dataset):
    """A feature with a vocabulary of its own (exact) has no hashed rows to relieve: its share is named, not dropped."""
    spec = with_shares(tiny_dataset.spec, user=0.2, item=0.1)
    plan = build_plan("unified", spec, tiny_dataset.columns, 8, budget_rows=60, exact_features=("user",))
    assert "user" not in plan.heads and plan.heads["item"].size == int(0.1 * 60)
    assert any("head_share of user is not used" in w for w in plan.warnings), plan.warnings
