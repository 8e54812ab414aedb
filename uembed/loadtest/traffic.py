"""Scoring traffic for load tests: examples built from a served model's features.

Two kinds: Zipf-distributed values per feature (a few values are hot, most are rare, as in
ranking traffic) and real MovieLens-100K examples. Plain Python and numpy, so the locustfile,
the benchmark and the tests share it.
"""

from __future__ import annotations

import json
import urllib.request

import numpy as np

from uembed.model.data import movielens100k_table

MOVIELENS_FEATURES = ("user_id", "movie_id", "zip_code", "age", "occupation", "gender", "genres")


def zipf_cdf(vocabulary: int, exponent: float) -> np.ndarray:
    """Unnormalised CDF of Zipf(exponent) over ranks 0 .. vocabulary-1."""
    return np.cumsum(1.0 / np.arange(1, vocabulary + 1, dtype=np.float64) ** exponent)


def zipf_ranks(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    return np.searchsorted(cdf, rng.random(size) * cdf[-1])


def served_features(url: str, model: str | None = None, timeout_s: float = 10) -> tuple[str, list[dict]]:
    """(model name, features) of ``model`` (or the default model) from the service's GET /v1/models."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=timeout_s) as response:
        models = json.load(response)["models"]
    for entry in models:
        if (model is None and entry["default"]) or entry["name"] == model:
            return entry["name"], entry["features"]
    raise ValueError(f"model {model!r} is not served at {url}; served: {', '.join(m['name'] for m in models)}")


class ZipfExamples:
    """Examples whose values follow Zipf(exponent) over ``vocabulary`` values per feature.

    Categorical features get the value's rank as a string ("0" is the hottest); multivalent
    features a list of 1..width such values; numeric features a number spread over their
    bucket boundaries, the hottest buckets first.
    """

    def __init__(self, features: list[dict], exponent: float = 1.1, vocabulary: int = 100_000, seed: int | None = None):
        if not features:
            raise ValueError("the model has no features")
        self.features = features
        self.rng = np.random.default_rng(seed)
        self.cdf = zipf_cdf(vocabulary, exponent)

    def _values(self, feature: dict, count: int) -> list:
        ranks = zipf_ranks(self.rng, self.cdf, count)
        if feature["kind"] == "numeric":
            edges = np.asarray(feature["boundaries"], dtype=np.float64)
            points = np.concatenate([[edges[0] - 1.0], (edges[:-1] + edges[1:]) / 2, [edges[-1] + 1.0]])
            return points[ranks % len(points)].tolist()
        if feature["kind"] == "multivalent":
            width = max(1, int(feature.get("width") or 1))
            lengths = self.rng.integers(1, width + 1, count)
            values = zipf_ranks(self.rng, self.cdf, int(lengths.sum())).astype(str).tolist()
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            return [values[bounds[i] : bounds[i + 1]] for i in range(count)]
        return ranks.astype(str).tolist()

    def batch(self, count: int) -> list[dict]:
        columns = {feature["name"]: self._values(feature, count) for feature in self.features}
        return [{name: values[i] for name, values in columns.items()} for i in range(count)]


class MovieLensExamples:
    """Real MovieLens-100K ratings as examples (the dataset is fetched and cached on first use)."""

    def __init__(self, seed: int | None = None):
        self.rows = movielens100k_table().select(list(MOVIELENS_FEATURES)).to_pylist()
        self.rng = np.random.default_rng(seed)

    def batch(self, count: int) -> list[dict]:
        start = int(self.rng.integers(0, len(self.rows) - count))
        return self.rows[start : start + count]
