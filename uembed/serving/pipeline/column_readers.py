"""The canonicaliser's compiled column readers of what a front hands it other than plain values
(``uembed/serving/pipeline/canonical.py`` reads those): a tensor's bytes (:class:`RawColumn`, the Open Inference
Protocol's binary data) and a numeric feature's numbers; and its one-pass reader of a column of string lists. Each answers None where a value needs more than it checks,
and the canonicaliser takes its checked path, which gives the same bytes or names the value at fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import accumulate, chain

import numpy as np

from uembed.contract.features import FeatureSpec
from uembed.contract.hashing import MISSING, canonical_column
from uembed.serving.pipeline.values import ValueLimits

EMPTY_LIST = (MISSING,)  # an empty list's canonical values (FeatureSpec.canonical_values)
INTEGER_SIZES = {"INT32": 4, "INT64": 8}  # a tensor's little-endian integer datatypes: bytes a value


class RawColumn(Sequence):
    """One feature's column still in its tensor's binary form (the Open Inference Protocol's raw contents,
    ``uembed/serving/protocols/oip.py``): ``data`` holds ``count`` examples' values as ``datatype`` BYTES
    (length-prefixed elements), INT32 or INT64 (little-endian), ``width`` to a row in an [N, W] tensor (None for
    [N]), read by the front as a list per example where ``multivalent`` (the feature as the version it was decoded for
    has it). The canonicaliser reads it straight into canonical bytes where its compiled readers can and its own
    feature reads the tensor the same way (another version's, a shadow's, may not); anything else reads the values
    the front decodes from it (``decode()``: the list a column of ``canonical.ExampleColumns`` holds), made once, when
    first asked for."""

    __slots__ = ("data", "datatype", "count", "width", "multivalent", "decode", "decoded")

    def __init__(self, data, datatype: str, count: int, width: int | None, multivalent: bool, decode) -> None:
        self.data, self.datatype, self.count, self.width, self.decode = data, datatype, count, width, decode
        self.multivalent = multivalent
        self.decoded: list | None = None

    @property
    def values(self) -> list:
        if self.decoded is None:
            self.decoded = self.decode()
        return self.decoded

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        return self.values[index]


def raw_canonical(canonicaliser, compiled, name: str, spec: FeatureSpec, raw: RawColumn) -> list | None:
    """The canonical column of a tensor's bytes for ``canonicaliser`` (a :class:`Canonicaliser`: its features, limits
    and markers), read by the compiled readers where every value needs no more than they check (one-value features'
    BYTES or integers, lists' [N, W] BYTES); None: decode its values."""
    markers = canonicaliser.missing_markers[name]
    if name in canonicaliser.text_features and not raw.multivalent and (raw.width is None or raw.width == 1):
        if raw.datatype == "BYTES":
            return compiled.framed_text_column(raw.data, raw.count, canonicaliser.char_limit, markers)
        if raw.datatype in INTEGER_SIZES:
            return compiled.integer_text_column(raw.data, INTEGER_SIZES[raw.datatype], raw.count, markers)
    elif spec.multivalent and raw.multivalent and raw.datatype == "BYTES" and raw.width is not None:
        return compiled.framed_list_column(raw.data, raw.count, raw.width, canonicaliser.char_limit,
                                           canonicaliser.list_limits[name], markers, EMPTY_LIST)  # fmt: skip
    return None


def numeric_buckets(specs: Mapping[str, FeatureSpec]) -> dict[str, tuple[np.ndarray, tuple[bytes, ...]]]:
    """One-value numeric features whose boundaries are known -> the boundaries and each bucket's canonical bytes, for
    ``bucketised``. Boundaries as floats only (as bundles and quantiles give them): the checked path compares others
    (a spec built in Python with big ints) exactly."""
    return {
        name: (np.asarray(spec.boundaries, dtype=np.float64), tuple(str(i).encode() for i in range(len(spec.boundaries) + 1)))
        for name, spec in specs.items()
        if spec.kind == "numeric" and not spec.multivalent and not spec.needs_quantiles
        and all(type(boundary) is float for boundary in spec.boundaries)
    }  # fmt: skip


def bucketised(canonicaliser, compiled, name: str, numbers) -> list[bytes] | None:
    """A numeric feature's column of numbers bucketised in one compiled pass (``numeric_column``), each bucket's bytes
    made once; None where a value needs the checked path."""
    if type(numbers) is not list:
        return None
    return compiled.numeric_column(numbers, *canonicaliser.numeric_buckets[name], canonicaliser.missing_markers[name],
                                   not canonicaliser.limits.finite_only)  # fmt: skip


def plain_list_column(limits: ValueLimits, spec: FeatureSpec, raw: list) -> list[tuple] | None:
    """Canonical tuples of a multivalent feature's column when every value is a list of strings within the limits
    that holds no missing marker and is no longer than the feature keeps (lists of genres, tags): every string's
    UTF-8 in one pass over the column, then cut back into lists, with no per-value checks or cache. None: take the
    checked path (which names a value at fault)."""
    if set(map(type, raw)) != {list}:
        return None
    lengths = list(map(len, raw))
    longest = max(lengths, default=0)
    if (limits.max_list is not None and longest > limits.max_list) or (spec.max_values and longest > spec.max_values):
        return None
    flat = list(chain.from_iterable(raw))
    if flat and (set(map(type, flat)) != {str} or (limits.max_chars is not None and max(map(len, flat)) > limits.max_chars)):
        return None
    try:
        encoded = canonical_column(flat)
    except UnicodeEncodeError:  # a lone surrogate: the checked path names it
        return None
    if MISSING in encoded or not spec.missing_bytes.isdisjoint(encoded):  # dropped from their lists there
        return None
    ends = list(accumulate(lengths))
    column = list(map(encoded.__getitem__, map(slice, chain((0,), ends), ends)))  # each list's values, by C maps
    if 0 in lengths:  # an empty list is the missing value
        column = [items if items else EMPTY_LIST for items in column]
    return column
