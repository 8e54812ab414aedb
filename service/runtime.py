"""One loaded model version: the request's stages from canonical values to probabilities.

``ModelRuntime`` is the reference scorer (``export/scorer.py``) with its lookup put
through the tiered row store. The stages, in the order a batch runs them::

    canonicalise  per request, before queueing: raw values -> canonical bytes (a bad value is that request's 422)
    hash          per batch: canonical bytes -> row ids [B, S] and pooling weights [B, S]
    lookup        per batch: one dedupe per table, rows through tiers 1 / 2 / 3 -> [B, S, D]
    assemble      pooling, multi-size concat, feature biases -> [B, E]
    dense         ONNX Runtime (or the TorchScript full model) -> probabilities [B]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from export.loader import Bundle
from export.scorer import CPU_PROVIDERS, ExampleError, ReferenceScorer
from model.data import canonical_column
from service.rowstore import RedisTier, TableStore


CANONICAL_CACHE_ENTRIES = 65536


def cache_key(value: object) -> object:
    """A dict key for values whose canonical form depends on the value alone: str and int (not bool,
    which equals 1), and lists of str. None for anything else (checked and canonicalised every time)."""
    kind = type(value)
    if kind is str or kind is int:
        return value
    if kind is list and all(type(item) is str for item in value):
        return tuple(value)
    return None


@dataclass(frozen=True)
class ValueLimits:
    """What one feature value may be over HTTP: a string, number, boolean or null (a list of those for
    multivalent features), strings of at most ``max_chars``, lists of at most ``max_list`` items, finite numbers."""

    max_chars: int = 256
    max_list: int = 256

    def check(self, value: object, multivalent: bool) -> None:
        if isinstance(value, list):
            if not multivalent:
                raise TypeError("takes one value, got a list")
            if len(value) > self.max_list:
                raise ValueError(f"a list of {len(value)} values is longer than the limit of {self.max_list}")
            for item in value:
                self._scalar(item)
        else:
            self._scalar(value)

    def _scalar(self, value: object) -> None:
        if value is None or isinstance(value, (bool, int)):
            return
        if isinstance(value, str):
            if len(value) > self.max_chars:
                raise ValueError(f"a value of {len(value)} characters is longer than the limit of {self.max_chars}")
            return
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{value} is not a finite number (send null for a missing value)")
            return
        raise TypeError(f"takes a string, number, boolean or null, got {type(value).__name__}")


@dataclass
class CanonicalExamples:
    """One request's examples as canonical bytes, ready to join a batch."""

    count: int
    values: dict[str, list]  # feature -> per example, a list of canonical values (multivalent) or one value
    ids: int  # row ids this request looks up (its cost in a batch)
    truncated: dict[str, int]  # feature -> lists cut to the trained width


class ModelRuntime(ReferenceScorer):
    """The CPU path. ``service/device.py`` has the CUDA path, which keeps every stage's name and contract."""

    device = "cpu"

    def __init__(
        self,
        bundle: Bundle,
        hot_rows_bytes: int = 0,
        redis: RedisTier | None = None,
        redis_prefix: str = "uembed",
        threads: int = 1,
        dense_backend: str = "onnx",
        providers: Sequence = CPU_PROVIDERS,
        hot_on_device: bool = False,
    ) -> None:
        super().__init__(bundle, threads, providers)
        self.widths = {f.name: f.width for f in self.plan.features}
        self.slots = self.plan.slots
        # Hot-row budget is per model, shared by its tables in proportion to their bytes.
        total_bytes = sum(t.nbytes for t in bundle.tables.values()) or 1
        self.stores = [
            TableStore(
                rows,
                namespace=f"{redis_prefix}:{bundle.name}:{bundle.version}:{rows.name}",
                hot_bytes=int(hot_rows_bytes * rows.nbytes / total_bytes),
                redis=redis,
                hot_on_device=hot_on_device,
            )
            for rows, _ in self.table_slots
        ]
        # Checked, canonical values of recent strings and ints per feature: most traffic repeats values,
        # and canonicalising in Python is the costliest per-request step.
        self.canonical_cache: dict[str, dict] = {name: {} for name in bundle.feature_specs}
        # Row ids of recent values of one-value features (value -> one row per lookup): the same values
        # recur across requests, so most are hashed once, not per batch.
        self.scalar_rows: dict[str, dict[bytes, tuple[int, ...]]] = {
            f.name: {} for f in self.plan.features if f.width == 1 and not bundle.feature_specs[f.name].multivalent
        }
        self.torchscript = None
        if dense_backend == "torchscript":
            self.torchscript = load_torchscript(bundle, threads)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    def canonicalise(self, examples: Sequence[Mapping[str, object]], limits: ValueLimits | None = None) -> CanonicalExamples:
        """Validate one request's examples against the bundle's features; a missing feature is the missing value."""
        specs = self.bundle.feature_specs
        limits = limits or ValueLimits()
        for index, example in enumerate(examples):
            if not isinstance(example, Mapping):
                raise ExampleError(f"examples[{index}]: an example is an object of feature -> value, got {type(example).__name__}")
            unknown = example.keys() - specs.keys()
            if unknown:
                raise ExampleError(
                    f"examples[{index}]: unknown feature {', '.join(sorted(map(str, unknown)))[:200]}; "
                    f"this model takes {', '.join(specs)}"
                )
        values: dict[str, list[list[bytes]]] = {}
        truncated = {}
        for name, spec in specs.items():
            cache = self.canonical_cache[name]
            column = []
            for index, example in enumerate(examples):
                value = example.get(name)
                key = cache_key(value)
                items = cache.get(key) if key is not None else None
                if items is None:
                    try:
                        limits.check(value, spec.multivalent)
                        # A tuple of bytes, not a list: the collector stops tracking it, so a full cache
                        # does not make every garbage collection walk it (measured: -25% throughput).
                        items = tuple(spec.canonical_values(value))
                    except (TypeError, ValueError) as exc:
                        raise ExampleError(f"examples[{index}].{name}: {exc}") from exc
                    if key is not None:
                        if len(cache) >= CANONICAL_CACHE_ENTRIES:
                            cache.clear()
                        cache[key] = items
                column.append(items)
            if spec.multivalent:
                cut = sum(len(items) > self.widths[name] for items in column)
                if cut:
                    truncated[name] = cut
            else:
                column = [items[0] for items in column]
            values[name] = column
        return CanonicalExamples(len(examples), values, len(examples) * self.slots, truncated)

    def hash(self, parts: Sequence[CanonicalExamples]) -> tuple[np.ndarray, np.ndarray]:
        """Row ids int64 [B, S] and pooling weights float32 [B, S] of a whole batch, hashing each distinct value once."""
        row_parts, weight_parts = [], []
        for feature in self.plan.features:
            values = parts[0].values[feature.name] if len(parts) == 1 else [v for p in parts for v in p.values[feature.name]]
            if feature.name in self.scalar_rows:
                rows = self._scalar_rows(feature, values)
                row_parts.append(rows)
                weight_parts.append(np.ones(rows.shape, dtype=np.float32))
            else:
                rows, weights = self.plan.encode_feature(feature, canonical_column(values))
                row_parts.append(rows)
                weight_parts.append(weights)
        return np.concatenate(row_parts, axis=1), np.concatenate(weight_parts, axis=1)

    def _scalar_rows(self, feature, values: list[bytes]) -> np.ndarray:
        """Rows [N, lookups] of a one-value feature (weight 1 under either pooling), remembering each value's rows."""
        cache = self.scalar_rows[feature.name]
        unseen = [v for v in dict.fromkeys(values) if v not in cache]
        if unseen:
            if len(cache) + len(unseen) > CANONICAL_CACHE_ENTRIES:
                cache.clear()  # and so this batch's values that were cached must be hashed again too
                unseen = list(dict.fromkeys(values))
            found = np.stack([self.plan.rows_of_values(feature, lookup, unseen) for lookup in feature.lookups], axis=1)
            cache.update(zip(unseen, map(tuple, found.tolist())))  # tuples of ints: untracked by the collector
        return np.array([cache[v] for v in values], dtype=np.int64).reshape(len(values), len(feature.lookups))

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Rows of every slot, float32 [B, S, D]: one dedupe per table, then the row store."""
        out = np.empty(rows.shape + (self.plan.dim,), dtype=np.float32)
        for (_, slots), store in zip(self.table_slots, self.stores):
            ids = rows[:, slots]
            unique, inverse = np.unique(ids, return_inverse=True)
            out[:, slots] = store.gather(unique)[inverse.reshape(ids.shape)]
        return out

    def score_encoded(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        if self.torchscript is not None:
            return self.torchscript(rows, weights)
        return super().score_encoded(rows, weights)

    def memory_bytes(self) -> dict[str, dict[str, int]]:
        """Per table, bytes per tier."""
        return {store.table.name: store.memory_bytes() for store in self.stores}


def load_torchscript(bundle: Bundle, threads: int):
    """The bundle's TorchScript full model as a numpy -> numpy function (torch imported only here)."""
    from export.loader import BundleError

    if not bundle.manifest.get("full_model"):
        raise BundleError(
            f"bundle {bundle.path}: dense_backend=torchscript needs the full model.pt, which this bundle does not "
            "have (only float32 bundles under the full-model size limit carry one); use dense_backend=onnx"
        )
    try:
        import torch
    except ImportError as exc:
        raise BundleError("dense_backend=torchscript needs torch: pip install 'uembed[train]'") from exc
    torch.set_num_threads(threads)
    module = torch.jit.load(str(bundle.path / bundle.manifest["full_model"]["torchscript"]["file"]))

    def run(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(rows), torch.from_numpy(weights)).numpy()

    return run
