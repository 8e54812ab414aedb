"""In-memory datasets as canonical feature values: columns, datasets, splits, labels.

Every dataset becomes a :class:`Dataset`: per feature a :class:`FeatureColumn` (the
distinct canonical byte strings, and per example the indices into them), plus a float
label. Hashing happens later, per embedding plan, on the distinct values only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uembed.contract.errors import DataError
from uembed.contract.features import DatasetSpec, FeatureSpec, LabelSpec
from uembed.contract.hashing import MISSING


@dataclass
class FeatureColumn:
    """One feature of N examples.

    ``uniques[0]`` is always the missing value ``b""``; ``codes`` is int32 ``[N, L]``,
    ``L`` the longest list (1 for univalent features), ``-1`` padding shorter lists.
    Example: values ``["a", None, "a"]`` -> uniques ``[b"", b"a"]``, codes ``[[1], [0], [1]]``.
    """

    uniques: list[bytes]
    codes: np.ndarray

    def take(self, index: np.ndarray) -> FeatureColumn:
        return FeatureColumn(self.uniques, self.codes[index])

    def present_values(self) -> list[bytes]:
        """Distinct non-missing values that occur in these examples."""
        used = np.unique(self.codes[self.codes > 0])
        return [self.uniques[i] for i in used]


def encode_values(spec: FeatureSpec, values: Sequence[object]) -> FeatureColumn:
    """Canonicalise one feature's raw values (scalars, or lists for multivalent)."""
    index: dict[bytes, int] = {MISSING: 0}
    memo: dict[object, list[int]] = {}
    rows: list[list[int]] = []
    for value in values:
        memo_key = tuple(value) if isinstance(value, (list, np.ndarray)) else value
        try:
            codes = memo.get(memo_key)
        except TypeError:  # an unhashable value: canonical_values raises the clear error
            memo_key, codes = None, None
        if codes is None:
            codes = [index.setdefault(item, len(index)) for item in spec.canonical_values(value)]
            if memo_key is not None:
                memo[memo_key] = codes
        rows.append(codes)
    return FeatureColumn(uniques=list(index), codes=code_matrix(rows))


def canonical_column(lists: Sequence[Sequence[bytes]]) -> FeatureColumn:
    """A column from already-canonical values (one list per example, as ``canonical_values`` gives): the distinct
    values in order of first appearance after the missing one, each value's code found by C-level maps (no Python
    step per value: the service builds one per request of each multivalent feature)."""
    flat = list(itertools.chain.from_iterable(lists))
    uniques = list(dict.fromkeys(itertools.chain((MISSING,), flat)))
    position = dict(zip(uniques, range(len(uniques))))
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    codes = np.fromiter(map(position.__getitem__, flat), dtype=np.int32, count=len(flat))
    return FeatureColumn(uniques=uniques, codes=padded_codes(codes, lengths))


def code_matrix(rows: Sequence[list[int]]) -> np.ndarray:
    """int32 ``[N, longest]`` codes, ``-1`` padding shorter lists."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    return padded_codes(flat, lengths)


def padded_codes(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int32 ``[N, longest]`` from the codes of N lists one after another and each list's length, ``-1`` padding."""
    rows = len(lengths)
    width = int(lengths.max()) if rows else 1
    if width == 1 and flat.size == rows:
        return flat.reshape(-1, 1)
    matrix = np.full((rows, max(width, 1)), -1, dtype=np.int32)
    matrix[np.arange(matrix.shape[1]) < lengths[:, None]] = flat
    return matrix


@dataclass
class Dataset:
    """Examples with canonical features and a 0/1 float32 label."""

    name: str
    spec: DatasetSpec
    columns: dict[str, FeatureColumn]
    labels: np.ndarray
    source: dict = field(default_factory=dict)  # the CLI's data options, to load it again
    split_codes: np.ndarray | None = None  # 0 train, 1 validation, 2 test: from the spec's split column

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray) -> Dataset:
        codes = None if self.split_codes is None else self.split_codes[index]
        return Dataset(self.name, self.spec, {n: c.take(index) for n, c in self.columns.items()}, self.labels[index], self.source, codes)

    def split(self, seed: int, fractions: tuple[float, float] | None = None) -> tuple[Dataset, Dataset, Dataset]:
        """Train / validation / test: by the spec's split column when it has one, else a seeded
        shuffle by ``fractions`` (default: the spec's, else 80/10/10; the rest is test)."""
        if self.split_codes is not None:
            return tuple(self.take(np.flatnonzero(self.split_codes == code)) for code in range(3))
        if fractions is None:
            fractions = self.spec.split.fractions if self.spec.split else (0.8, 0.1)
        return tuple(self.take(index) for index in split_indices(len(self), seed, fractions))


def split_indices(
    examples: int, seed: int, fractions: tuple[float, float] = (0.8, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train / validation / test split (so raw rows can be matched too)."""
    order = np.random.default_rng(seed).permutation(examples)
    n_train = int(round(fractions[0] * examples))
    n_val = int(round(fractions[1] * examples))
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def binary_labels(values, label: LabelSpec, source: str) -> np.ndarray:
    """0/1 float32 labels by the spec's rule (``LabelSpec.binarise``); numbers or an Arrow array."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array(np.asarray(values))
    return label.binarise(values, source)


def quantile_boundaries(sample: np.ndarray, buckets: int) -> tuple[float, ...]:
    """Boundaries that cut ``sample`` (numbers, NaN ignored) into ``buckets`` equally filled
    buckets. Boundary ``i`` is the first value above the ``i / buckets`` quantile, so a value
    never shares a bucket with a larger one because of ties; repeated boundaries are dropped
    (heavy ties give fewer buckets). Example: 90 zeros and 10 ones in 4 buckets -> ``(1.0,)``."""
    values = np.sort(np.asarray(sample, dtype=np.float64))
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (0.0,)
    cuts = np.quantile(values, np.arange(1, buckets) / buckets, method="lower")
    above = np.searchsorted(values, cuts, side="right")
    return tuple(float(v) for v in np.unique(values[above[above < values.size]])) or (float(values[-1]),)


def resolve_table_quantiles(table: pa.Table, spec: DatasetSpec) -> DatasetSpec:
    """Resolve ``quantiles:N`` boundaries from the whole column of an in-memory table."""
    boundaries = {}
    for name in spec.needs_quantiles:
        feature = spec.feature(name)
        column = table[feature.column]
        if feature.missing:
            column = pc.if_else(pc.is_in(column.cast(pa.string()), value_set=pa.array(list(feature.missing), pa.string())), None, column)
        try:
            numbers = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"column {feature.column!r} of numeric feature {name!r} holds values that are not numbers: {exc}") from exc
        boundaries[name] = quantile_boundaries(numbers, feature.quantiles)
    return spec.with_boundaries(boundaries)


def from_table(table: pa.Table, spec: DatasetSpec, name: str) -> Dataset:
    """Build a dataset from an Arrow table; errors name missing columns."""
    if table.num_rows == 0:
        raise DataError(f"{name}: the data has no rows")
    split_column = spec.split.column if spec.split else None
    needed = [spec.label.column] + [f.column for f in spec.features] + ([split_column] if split_column else [])
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(
            f"{name}: unknown column(s) {', '.join(repr(c) for c in missing)}; "
            f"the data has {', '.join(table.column_names)}"
        )
    spec = resolve_table_quantiles(table, spec)
    columns = {}
    for feature in spec.features:
        raw = table[feature.column]
        if feature.multivalent and pa.types.is_string(raw.type):
            raw = pc.split_pattern(raw, feature.separator)
        try:
            columns[feature.name] = encode_values(feature, raw.to_pylist())
        except TypeError as exc:
            raise DataError(f"{name}: column {feature.column!r}: {exc}") from exc
    labels = spec.label.binarise(table[spec.label.column], name)
    codes = split_codes(table[split_column], name) if split_column else None
    return Dataset(name=name, spec=spec, columns=columns, labels=labels, split_codes=codes)


SPLIT_NAMES = {"train": 0, "validation": 1, "val": 1, "valid": 1, "test": 2}


def split_codes(values, source: str) -> np.ndarray:
    """int8 split of each example (0 train, 1 validation, 2 test) from a split column's names."""
    names = pc.utf8_lower(pc.cast(values, pa.string()))
    unknown = set(pc.unique(names).to_pylist()) - set(SPLIT_NAMES)
    if unknown:
        shown = ", ".join(repr(v) for v in sorted(unknown, key=str)[:5])
        raise DataError(f"{source}: the split column holds {shown}; expected train, validation (or val) and test")
    codes = pc.index_in(names, value_set=pa.array(list(SPLIT_NAMES)))
    return np.asarray(list(SPLIT_NAMES.values()), dtype=np.int8)[codes.to_numpy(zero_copy_only=False)]
