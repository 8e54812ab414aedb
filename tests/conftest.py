import numpy as np
import pyarrow as pa
import pytest

from model.data import from_table
from model.features import DatasetSpec, FeatureSpec, LabelSpec


def tiny_table(examples: int = 400, seed: int = 0) -> pa.Table:
    """Users, items, cities and tags with a label that depends on user and item."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, examples)
    items = rng.integers(0, 40, examples)
    tags = [[f"t{t}" for t in rng.choice(8, rng.integers(0, 4), replace=False)] for _ in range(examples)]
    label = ((users % 3 == 0) ^ (items % 2 == 0)).astype(int)
    return pa.table(
        {
            "user": [f"u{u}" for u in users],
            "item": items.tolist(),
            "home_city": [f"c{c}" for c in rng.integers(0, 10, examples)],
            "work_city": [f"c{c}" for c in rng.integers(0, 10, examples)],
            "tags": tags,
            "age": rng.uniform(15, 70, examples).round(1).tolist(),
            "clicked": label.tolist(),
        }
    )


def tiny_spec() -> DatasetSpec:
    return DatasetSpec(
        features=(
            FeatureSpec("user"),
            FeatureSpec("item"),
            FeatureSpec("home_city"),
            FeatureSpec("work_city"),
            FeatureSpec("tags", kind="multivalent", pooling="sum"),
            FeatureSpec("age", kind="numeric", boundaries=(18.0, 30.0, 50.0)),
        ),
        label=LabelSpec("clicked"),
        groups={"city": ("home_city", "work_city")},
    )


@pytest.fixture
def tiny_dataset():
    return from_table(tiny_table(), tiny_spec(), name="tiny")
