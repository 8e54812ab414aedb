"""Synthetic power-law data: small in-memory datasets with the vocabulary sizes of a preset."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.data.columns import Dataset, FeatureColumn
from model.errors import DataError
from model.features import DatasetSpec, FeatureSpec, LabelSpec
from model.hashing import MISSING


CRITEO_VOCABULARY = (676, 533, 17447, 19995, 180, 13, 9693, 337, 3, 14637, 4378, 17795, 3067, 26, 6504, 18679, 10, 3102, 1557, 3, 18230, 10, 14, 13079, 56, 10581)  # fmt: skip
AVAZU_VOCABULARY = {
    "C1": 8, "C14": 2309, "C15": 9, "C16": 10, "C17": 405, "C18": 5, "C19": 66, "C20": 167, "C21": 56,
    "app_category": 29, "app_domain": 277, "app_id": 4438, "banner_pos": 8, "device_conn_type": 5,
    "device_id": 67767, "device_ip": 163804, "device_model": 6217, "device_type": 6, "site_category": 24,
    "site_domain": 3887, "site_id": 3317, "hour": 24,
}  # fmt: skip
SYNTHETIC_PRESETS = {
    "criteo": {f"C{i + 14}": v for i, v in enumerate(CRITEO_VOCABULARY)},
    "avazu": AVAZU_VOCABULARY,
    "small": {"user": 2000, "item": 1000, "city": 50, "device": 5},
}


def synthetic(
    vocabulary: dict[str, int],
    examples: int,
    seed: int = 0,
    zipf: float = 1.1,
    noise_features: Sequence[str] = (),
) -> Dataset:
    """Power-law categorical data with a planted logistic label.

    Each feature draws values with probability proportional to ``rank ** -zipf``; each
    (feature, value) carries a random weight, and the label is Bernoulli of the sigmoid
    of the summed weights of the features not listed in ``noise_features`` (those carry
    no signal at all). Values are the strings ``"0"`` .. ``str(V - 1)``.
    """
    if examples <= 0:
        raise DataError("a synthetic dataset needs at least one example")
    unknown = set(noise_features) - set(vocabulary)
    if unknown:
        raise DataError(f"noise feature(s) {', '.join(sorted(unknown))} are not in the vocabulary")
    rng = np.random.default_rng(seed)
    columns, logit = {}, np.full(examples, 0.0)
    for name, size in vocabulary.items():
        if size < 1:
            raise DataError(f"feature {name!r}: vocabulary size must be positive, got {size}")
        probabilities = np.arange(1, size + 1, dtype=np.float64) ** -zipf
        values = rng.choice(size, size=examples, p=probabilities / probabilities.sum())
        if name not in noise_features:
            logit += rng.normal(0.0, 1.0, size=size)[values]
        uniques = [MISSING] + [str(v).encode() for v in range(size)]
        columns[name] = FeatureColumn(uniques=uniques, codes=(values + 1).astype(np.int32)[:, None])
    labels = (rng.random(examples) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    spec = DatasetSpec(features=tuple(FeatureSpec(name=n) for n in vocabulary), label=LabelSpec(column="label"))
    return Dataset(name="synthetic", spec=spec, columns=columns, labels=labels)
