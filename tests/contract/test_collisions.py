"""The collision report (uembed/contract/collisions.py) against collisions counted one value at a time."""

from __future__ import annotations

import numpy as np
import pytest

from uembed.contract.collisions import (
    ValueCounts,
    collision_report,
    feature_shares,
    format_report,
    uniform_share,
    value_counts,
)
from uembed.contract.columns import FeatureColumn, canonical_column
from uembed.contract.hashing import hash_value, lookup_seed
from uembed.contract.plan import EmbeddingPlan, FeaturePlan, LookupPlan, TablePlan


def unified_plan(rows: int, lookups: dict[str, int], table: str = "unified") -> EmbeddingPlan:
    features = tuple(FeaturePlan(name, tuple(LookupPlan(table, name, j) for j in range(n))) for name, n in lookups.items())
    return EmbeddingPlan("unified", 4, (TablePlan(table, rows, 4),), features, budget_rows=rows)


def brute_force(rows: int, lookups: dict[str, int], counts: dict[str, dict[str, int]]) -> dict[str, tuple[float, float]]:
    """Per feature (share of occurrences whose every lookup's row another value reads, the same for any lookup),
    each value's rows taken straight from the hash spec: xxh3(value, seed of feature#lookup) % rows."""
    row_of = {(f, v, j): hash_value(v, lookup_seed(f, j)) % rows for f in counts for v in counts[f] for j in range(lookups[f])}
    out = {}
    for feature, values in counts.items():
        every = anyone = 0
        for value, occurrences in values.items():
            shared = [
                any(other_row == row_of[feature, value, j] and (f, v) != (feature, value) for (f, v, _), other_row in row_of.items())
                for j in range(lookups[feature])
            ]
            every += occurrences * all(shared)
            anyone += occurrences * any(shared)
        total = sum(values.values())
        out[feature] = (every / total, anyone / total)
    return out


def as_counts(counts: dict[str, dict[str, int]]) -> dict[str, ValueCounts]:
    return {f: ValueCounts([v.encode() for v in values], np.array(list(values.values()), dtype=np.int64)) for f, values in counts.items()}


def test_six_values_in_four_rows_match_a_count_by_hand():
    counts = {"a": {"x": 5, "y": 1, "z": 2, "w": 7}, "b": {"x": 3, "q": 4}}  # "x" of a and "x" of b are two values
    lookups = {"a": 1, "b": 1}
    report = collision_report(unified_plan(4, lookups), as_counts(counts))
    expected = brute_force(4, lookups, counts)
    for feature, values in counts.items():
        entry = report["features"][feature]
        assert entry["values"] == len(values) and entry["occurrences"] == sum(values.values())
        assert entry["shared_share"] == pytest.approx(expected[feature][0])
        assert entry["shared_share_any"] == entry["shared_share"]
        rows = {hash_value(v, lookup_seed(feature, 0)) % 4 for v in values}
        assert entry["rows"] == len(rows)
        # 6 values, 4 rows: the 5 others of a value miss its row with probability (3/4)^5 each under a uniform hash
        assert entry["predicted_share"] == pytest.approx(1 - 0.75**5)
    assert max(report["features"][f]["shared_share"] for f in counts) > 0  # six values cannot all own one of four rows
    assert report["tables"]["unified"]["lookups"] == 6


def test_multi_lookup_features_report_all_and_any_lookups_separately():
    counts = {"m": {f"v{i}": i + 1 for i in range(12)}, "s": {f"u{i}": 2 for i in range(5)}}
    lookups = {"m": 3, "s": 1}
    report = collision_report(unified_plan(16, lookups), as_counts(counts))
    expected = brute_force(16, lookups, counts)
    entry = report["features"]["m"]
    assert (entry["shared_share"], entry["shared_share_any"]) == pytest.approx(expected["m"])
    assert entry["shared_share"] <= entry["shared_share_any"] and entry["lookups"] == 3
    p = 1 - (15 / 16) ** (12 * 3 + 5 - 3)  # the other lookups of the table: every lookup but the value's own three
    assert entry["predicted_share"] == pytest.approx(p**3) and entry["predicted_share_any"] == pytest.approx(1 - (1 - p) ** 3)


def test_a_values_own_lookups_on_one_row_are_no_collision():
    one_value = collision_report(unified_plan(1, {"m": 2}), as_counts({"m": {"only": 4}}))["features"]["m"]
    assert one_value["shared_share_any"] == 0 and one_value["predicted_share_any"] == 0 and one_value["rows"] == 1
    two_values = collision_report(unified_plan(1, {"m": 2}), as_counts({"m": {"one": 4, "two": 1}}))["features"]["m"]
    assert two_values["shared_share"] == 1 and two_values["predicted_share"] == 1


def test_collisionless_features_share_nothing_and_predict_nothing():
    names = [b"a", b"b", b"c"]
    keys = np.sort(np.array([hash_value(v, lookup_seed("f", 0)) for v in names], dtype=np.uint64))
    plan = EmbeddingPlan("collisionless", 4, (TablePlan("f", 4, 4),), (FeaturePlan("f", (LookupPlan("f", "f"),), vocabulary=True),),
                         budget_rows=4, vocabularies={"f": keys})  # fmt: skip
    entry = collision_report(plan, {"f": ValueCounts(names, np.array([1, 2, 3]))})["features"]["f"]
    assert entry["shared_share"] == 0 and entry["rows"] == 3 and entry["predicted_share"] is None


def test_the_uniform_prediction_is_the_simulated_chance_of_sharing_a_row():
    rng = np.random.default_rng(0)
    rows, others, trials = 7, 9, 40_000
    mine = rng.integers(0, rows, trials)
    theirs = rng.integers(0, rows, (trials, others))
    simulated = float((theirs == mine[:, None]).any(axis=1).mean())
    assert uniform_share(rows, others) == pytest.approx(simulated, abs=0.01)


def test_value_counts_count_every_list_item_and_leave_missing_and_padding_out():
    column = canonical_column([[b"a", b"b"], [], [b"a"], [b"c", b"a"]])
    counted = value_counts(column)
    assert dict(zip(counted.values, counted.counts.tolist())) == {b"a": 3, b"b": 1, b"c": 1}
    unused = FeatureColumn([b"", b"gone", b"kept"], np.array([[2], [0], [2]], dtype=np.int32))  # a split without "gone"
    assert list(value_counts(unused).values) == [b"kept"]


def test_the_table_and_the_gauge_values_come_from_the_report():
    counts = {"a": {"x": 5, "y": 1, "z": 2, "w": 7}, "b": {"x": 3, "q": 4}}
    report = collision_report(unified_plan(4, {"a": 1, "b": 1}), as_counts(counts))
    lines = format_report(report).splitlines()
    assert lines[1].split() == ["feature", "values", "rows", "shared", "uniform", "hash"]
    row_a = lines[2].split()
    assert row_a[:3] == ["a", "4", str(report["features"]["a"]["rows"])]
    assert row_a[3] == f"{report['features']['a']['shared_share']:.1%}"
    assert feature_shares({"collisions": report}) == {f: report["features"][f]["shared_share"] for f in counts}
    assert feature_shares({}) == {} and feature_shares({"collisions": "garbled"}) == {}
    assert "not computed for streamed runs" in format_report({"features": {}, "not_computed": "not computed for streamed runs: x"})
