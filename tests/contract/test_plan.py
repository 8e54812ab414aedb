import numpy as np
import pytest

from uembed.contract.errors import BudgetError, SpecError
from uembed.contract.hashing import hash_value, lookup_seed
from uembed.contract.plan import (
    BUDGETED_METHODS,
    EmbeddingPlan,
    build_plan,
    collisionless_rows,
    default_lookups,
    split_by_share,
    vocabulary_sizes,
)


def test_split_by_share_sums_exactly_and_keeps_a_row_each():
    assert split_by_share(10, {"a": 3, "b": 1}) == {"a": 7, "b": 3}
    shares = split_by_share(101, {"big": 10_000, "tiny": 1, "mid": 500})
    assert sum(shares.values()) == 101
    assert shares["tiny"] == 1
    with pytest.raises(BudgetError, match="cannot give 3 tables"):
        split_by_share(2, {"a": 1, "b": 1, "c": 1})


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.37, 1.0, 2.0])
def test_every_budgeted_method_has_the_same_embedding_parameters(tiny_dataset, fraction):
    counts = {
        method: build_plan(method, tiny_dataset.spec, tiny_dataset.columns, 8, budget_fraction=fraction).embedding_parameters
        for method in BUDGETED_METHODS
    }
    budget_rows = round(fraction * collisionless_rows(vocabulary_sizes(tiny_dataset.columns)))
    assert set(counts.values()) == {budget_rows * 8}, counts


def test_budget_in_rows_and_budget_too_small(tiny_dataset):
    plan = build_plan("unified", tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=50)
    assert plan.tables[0].rows == 50
    with pytest.raises(BudgetError, match="smaller than the 6 features"):
        build_plan("hashing-trick", tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=5)
    with pytest.raises(BudgetError, match="positive"):
        build_plan("unified", tiny_dataset.spec, tiny_dataset.columns, 4, budget_fraction=-0.1)
    with pytest.raises(SpecError, match="unknown embedding method"):
        build_plan("magic", tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=50)


def test_hashing_trick_splits_by_vocabulary_share(tiny_dataset):
    plan = build_plan("hashing-trick", tiny_dataset.spec, tiny_dataset.columns, 4, budget_fraction=0.5)
    rows = {t.name: t.rows for t in plan.tables}
    assert rows["user"] > rows["item"] > rows["home_city"] >= rows["age"]


def test_semantic_group_tables_and_biases(tiny_dataset):
    plan = build_plan("semantic-group", tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=80)
    assert [t.name for t in plan.tables] == ["user", "item", "city", "tags", "age"]
    assert {f.name for f in plan.features if f.bias} == {"home_city", "work_city"}
    assert plan.table_features()["city"] == ["home_city", "work_city"]
    assert plan.bias_parameters == 2 * 4


def test_multi_size_lookups_default_and_override(tiny_dataset):
    assert [default_lookups(v) for v in (2, 60, 943, 1682, 10**9)] == [1, 1, 2, 3, 4]
    plan = build_plan("multi-size-unified", tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=64)
    lookups = {f.name: len(f.lookups) for f in plan.features}
    assert lookups["user"] == 1 and plan.output_dim == 4 * sum(lookups.values())
    assert len({lookup.seed for f in plan.features for lookup in f.lookups}) == sum(lookups.values())


def test_encode_rows_weights_and_missing(tiny_dataset):
    plan = build_plan("unified", tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=97)
    rows, weights = plan.encode(tiny_dataset.columns)
    assert rows.shape == weights.shape == (len(tiny_dataset), plan.slots)
    assert rows.min() >= 0 and rows.max() < 97
    # Slot 0 is the user feature: its row is the hash of the value modulo the table.
    first_user = tiny_dataset.columns["user"].uniques[tiny_dataset.columns["user"].codes[0, 0]]
    assert rows[0, 0] == hash_value(first_user, lookup_seed("user")) % 97
    # tags pool by sum over a list padded to the longest list; an empty list is the missing value.
    tags = plan.features[4]
    start = sum(f.width for f in plan.features[:4])
    tag_weights = weights[:, start : start + tags.width]
    assert set(np.unique(tag_weights)) <= {0.0, 1.0}
    empty = np.where(tiny_dataset.columns["tags"].codes[:, 0] == 0)[0]
    assert empty.size and (tag_weights[empty].sum(axis=1) == 1).all()
    assert (rows[empty, start] == hash_value(b"", lookup_seed("tags")) % 97).all()


def test_collisionless_unknown_values_read_row_zero(tiny_dataset):
    train, _, test = tiny_dataset.split(seed=1, fractions=(0.05, 0.0))
    plan = build_plan("collisionless", train.spec, train.columns, 4)
    rows, _ = plan.encode(test.columns)
    user_codes = test.columns["user"].codes[:, 0]
    seen = set(train.columns["user"].present_values())
    unseen = np.array([test.columns["user"].uniques[c] not in seen for c in user_codes])
    assert unseen.any() and (rows[unseen, 0] == 0).all() and (rows[~unseen, 0] > 0).all()


def test_plan_round_trips_through_a_dict(tiny_dataset):
    plan = build_plan("collisionless", tiny_dataset.spec, tiny_dataset.columns, 4)
    again = EmbeddingPlan.from_dict(plan.to_dict(), plan.vocabularies)
    assert again.to_dict() == plan.to_dict()
    assert np.array_equal(again.encode(tiny_dataset.columns)[0], plan.encode(tiny_dataset.columns)[0])


def test_the_registry_holds_every_method_and_its_role():
    from uembed.contract.plan import (
        APPLIER_METHODS,
        METHOD_REGISTRY,
        METHODS,
        SEARCH_METHOD,
        Method,
        applier_method,
        method_spec,
    )

    assert tuple(METHOD_REGISTRY) == tuple(Method) and METHODS == tuple(m.value for m in Method)
    assert [m for m in METHODS if method_spec(m).fixed_size] == ["collisionless"]
    assert SEARCH_METHOD == "seo-search" and not method_spec(SEARCH_METHOD).servable
    assert applier_method("rr") == "seo-applier-rr" and set(APPLIER_METHODS) == {"seo-applier-exact", "seo-applier-rr"}
    assert all(method_spec(m).needs_policy for m in APPLIER_METHODS)
    with pytest.raises(SpecError, match="unknown embedding method 'magic'"):
        method_spec("magic")


def test_feature_kind_and_pooling_are_enums(tiny_dataset):
    from uembed.contract.features import FeatureKind, FeatureSpec, Pooling

    spec = FeatureSpec("tags", kind="multivalent", pooling="sum")
    assert spec.kind is FeatureKind.MULTIVALENT and spec.pooling is Pooling.SUM
    assert spec.to_dict()["pooling"] == "sum" and type(spec.to_dict()["kind"]) is str
    with pytest.raises(SpecError, match="pooling must be one of"):
        FeatureSpec("tags", pooling="max")
    plan = build_plan("unified", tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=50)
    assert EmbeddingPlan.from_dict(plan.to_dict()).features[4].pooling is Pooling.SUM
