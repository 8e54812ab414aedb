"""canonicalise, the first stage: one request's raw feature values -> checked canonical bytes per feature.

A bad value is an :class:`ExampleError` naming ``examples[i].feature`` (``candidates[i].feature`` and
``context.feature`` for a ranking request). What a value may be is :class:`ValueLimits`
(``uembed/serving/pipeline/values.py``); the canonical bytes of a value are the contract's
(``uembed/contract/features.py``), so a value scores the same wherever it is encoded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import NoReturn

from uembed.contract.errors import ExampleError
from uembed.contract.features import FeatureSpec
from uembed.contract.hashing import MISSING, canonical_column, compiled_extension, hashing_backend
from uembed.contract.known import KnownValues
from uembed.contract.plan import EmbeddingPlan
from uembed.serving.pipeline.column_readers import (
    EMPTY_LIST,
    RawColumn,
    bucketised,
    numeric_buckets,
    plain_list_column,
    raw_canonical,
)
from uembed.serving.pipeline.values import (
    NO_LIMITS,
    ValueCache,
    ValueLimits,
    cache_key,
    entry_bytes,
    int_bytes,
    scalar_bytes,
)


class ValueRefused(ExampleError):
    """A value a feature refuses, with where it is (the example's index, None for a context's) and why kept apart,
    so a front that names its inputs otherwise (a tensor and its element) can say so."""

    def __init__(self, where: str, index: int | None, feature: str, reason: str) -> None:
        super().__init__(f"{where if index is None else f'{where}[{index}]'}.{feature}: {reason}")
        self.index, self.feature, self.reason = index, feature, reason


def refuse_missing(location: str, lacking: list[str]) -> NoReturn:
    raise ExampleError(f"{location}: missing features: {', '.join(lacking)} "
                       "(UEMBED_REQUIRE_FEATURES is on: send every feature, null for a missing value)")  # fmt: skip


def refuse_both(location: str, both: set) -> NoReturn:
    """An example (at ``location``) that also names some of the context's features ``both``: the first named."""
    raise ExampleError(f"{location}.{min(both)}: also given in context "
                       "(a feature goes in the context or in the candidates, not both)")  # fmt: skip


@dataclass
class CanonicalExamples:
    """One request's examples as canonical bytes, ready to join a batch."""

    count: int
    values: dict[str, list]  # feature -> per example, a tuple or list of canonical values (multivalent) or one value
    ids: int  # row ids this request looks up (its cost in a batch)
    truncated: dict[str, int]  # feature -> lists cut to the trained width
    # Features given once for the whole request (its context): their ``values`` hold one entry, not ``count``.
    shared: frozenset[str] = frozenset()
    missing: dict[str, int] = field(default_factory=dict)  # feature -> examples that left it out


@dataclass(frozen=True)
class ExampleColumns:
    """A request's examples as one list of values per feature, ``count`` values each (a front that decodes columns,
    as the Open Inference Protocol's tensors are). Canonicalised column by column; read as examples (feature ->
    value, as ``/v1/score`` takes them) one at a time, and only where one is asked for: a routing rule's sticky
    feature, a shadow version's copy."""

    columns: Mapping[str, list]
    count: int

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(f"example {index} of {self.count}")
        return {name: column[index] for name, column in self.columns.items()}


class PlainColumns:
    """A request's examples, each a dict (``/v1/score``'s JSON), read as feature -> its value in each example (None
    where an example leaves it out) on demand: the compiled readers take the examples themselves, one pass a column."""

    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __getitem__(self, name: str) -> list:
        return list(map(dict.get, self.examples, repeat(name)))


@dataclass
class Canonicaliser:
    """The canonicalise stage for one bundle's features and plan (:class:`ExampleEncoder` adds the hash stage).

    ``cache_bytes`` > 0 keeps recent values' canonical forms (and, in the encoder, their rows), bounded in bytes in
    all: most traffic repeats values, and canonicalising in Python is the costliest per-request step. ``known``
    (feature -> :class:`KnownValues`) counts values unseen in training.
    """

    specs: Mapping[str, FeatureSpec]
    plan: EmbeddingPlan
    limits: ValueLimits = NO_LIMITS
    cache_bytes: int = 0
    known: Mapping[str, KnownValues] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.widths = {f.name: f.width for f in self.plan.features}
        self.feature_slots = {f.name: f.width * len(f.lookups) for f in self.plan.features}
        self.slots = self.plan.slots
        self.one_value = [f.name for f in self.plan.features if f.width == 1 and not self.specs[f.name].multivalent]
        # The cache budget is shared evenly by every cache the encoder keeps: one of canonical values per feature,
        # one of rows per one-value feature with training values, one of unseen flags per other such feature.
        self.rows_cached = [name for name in self.one_value if name in self.known]
        self.flagged = [f.name for f in self.plan.features if f.name not in self.one_value and f.name in self.known]
        self.cache_share = self.cache_bytes // max(len(self.specs) + len(self.rows_cached) + len(self.flagged), 1)
        self.canonical_cache = {name: ValueCache(self.cache_share) for name in self.specs} if self.cache_bytes else {}
        # What the compiled column readers check (negative: no limit), and each feature's missing markers, canonical.
        # A negative limit (the Python API does not refuse one) leaves every value to the checked path.
        self.column_readers = all(limit is None or limit >= 0 for limit in (self.limits.max_chars, self.limits.max_list))
        self.char_limit = -1 if self.limits.max_chars is None else self.limits.max_chars
        self.list_limits = {
            name: min([*([self.limits.max_list] if self.limits.max_list is not None else []),
                       *([spec.max_values] if spec.max_values else [])], default=-1)
            for name, spec in self.specs.items()
        }
        self.missing_markers = {name: spec.missing_bytes for name, spec in self.specs.items()}
        self.numeric_buckets = numeric_buckets(self.specs)
        # One-value categorical features: a column of strings is canonicalised in one pass (_text_column).
        self.text_features = frozenset(
            name for name, spec in self.specs.items() if not spec.multivalent and spec.kind != "numeric"
        )

    def canonicalise(
        self,
        examples: Sequence[Mapping[str, object]] | ExampleColumns,
        context: Mapping[str, object] | None = None,
        where: str | None = None,
    ) -> CanonicalExamples:
        """Check one request's examples against the features; a feature left out is the missing value.

        With ``context`` (feature -> value, for every example of the request: a ranking request's user and
        query), each context value is checked and canonicalised once and kept once (``shared``); ``hash``
        broadcasts its rows. A feature goes in the context or in the examples, not both. ``where`` names the
        examples in error messages: ``examples``, or ``candidates`` when there is a context; the context's
        errors name ``context.feature``. A context list cut to the trained width counts once in ``truncated``
        (and ``hash`` counts an unseen context value once): per request, not per candidate. Examples given as
        :class:`ExampleColumns` take :meth:`canonicalise_columns`.
        """
        if isinstance(examples, ExampleColumns):
            where = where or ("examples" if context is None else "candidates")
            return self.canonicalise_columns(examples.columns, examples.count, where, context)
        specs = self.specs
        where = where or ("examples" if context is None else "candidates")
        self._check_context(context)
        # One union of every example's features (a C-level pass) rather than a check per example; only a
        # request at fault is walked example by example, to name the first one.
        plain = set(map(type, examples)) == {dict}  # then a column is read by a C loop (dict.get)
        try:
            named = set().union(*examples) if plain else None
        except TypeError:
            named = None
        if named is None or not named <= specs.keys() or (context and not named.isdisjoint(context.keys())):
            self._refuse_examples(examples, context, where)
        own = [name for name in specs if not context or name not in context]
        missing = self._left_out(examples, own, plain, where)
        if plain and type(examples) is list:
            columns = PlainColumns(examples)
        elif plain:
            columns = {name: list(map(dict.get, examples, repeat(name))) for name in own}
        else:
            columns = {name: [e.get(name) for e in examples] for name in own}
        canonical = self._canonical_columns(columns, len(examples), context, where)
        canonical.missing = missing
        return canonical

    def _left_out(self, examples: Sequence[Mapping], own: list[str], plain: bool, where: str) -> dict[str, int]:
        """Feature -> examples that leave it out (a context's features count as given); with
        ``limits.require_features``, the first such example refused, naming what it lacks."""
        # Every example names only its own features (checked before): a count of keys says whether any is missing,
        # in one C pass; only then is each feature counted.
        if plain and sum(map(len, examples)) == len(own) * len(examples):
            return {}
        if plain:
            missing = {name: len(examples) - sum(map(dict.__contains__, examples, repeat(name))) for name in own}
        else:
            missing = {name: len(examples) - sum(name in e for e in examples) for name in own}
        missing = {name: count for name, count in missing.items() if count}
        if missing and self.limits.require_features:
            for index, example in enumerate(examples):
                lacking = [name for name in own if name not in example]
                if lacking:
                    refuse_missing(f"{where}[{index}]", lacking)
        return missing

    def canonicalise_columns(self, columns: Mapping[str, Sequence], count: int, where: str = "examples",
                             context: Mapping[str, object] | None = None) -> CanonicalExamples:  # fmt: skip
        """:meth:`canonicalise` of ``count`` examples given as one list of values per feature (a front that decodes
        columns, as the Open Inference Protocol's tensors are; /v1's reader of the usual body), with a ranking
        request's ``context``: the same checks, the same errors naming ``examples[i].feature`` (or
        ``candidates[i].feature`` and ``context.feature``), the same result. Every example names the features its
        column has (an error about them names the first); a feature left out is the missing value in every
        example."""
        specs = self.specs
        self._check_context(context)
        unknown = columns.keys() - specs.keys()
        if unknown:
            self._refuse_unknown(f"{where}[0]", unknown)
        if context:
            both = columns.keys() & context.keys()
            if both:
                refuse_both(f"{where}[0]", both)
        lacking = [name for name in specs if name not in columns and not (context and name in context)]
        if lacking and self.limits.require_features:
            refuse_missing(f"{where}[0]", lacking)
        nothing = [None] * count
        own = {name: columns.get(name, nothing) for name in specs if not context or name not in context}
        canonical = self._canonical_columns(own, count, context, where)
        canonical.missing = dict.fromkeys(lacking, count)
        return canonical

    def _canonical_columns(self, columns: Mapping[str, Sequence], count: int, context: Mapping | None,
                           where: str) -> CanonicalExamples:  # fmt: skip
        """The canonical values of the examples' ``columns`` (feature -> value per example) and of the ``context``'s
        features (every feature is in one or the other)."""
        specs = self.specs
        values: dict[str, list] = {}
        truncated = {}
        compiled = compiled_extension()
        # the examples themselves, read feature by feature in one compiled pass where that is all a column needs
        plain = columns.examples if compiled is not None and self.column_readers and isinstance(columns, PlainColumns) else None
        for name, spec in specs.items():
            cache = self.canonical_cache.get(name)
            entries = cache.entries if cache is not None else None  # dict.get on the hot path, not a method call
            if context and name in context:
                value = context[name]
                key = cache_key(value) if entries is not None else None
                items = entries.get(key) if key is not None else None
                if items is None:
                    items = self._canonical(name, spec, value, key, cache, "context")
                column = [items]
            else:
                raw = columns[name] if plain is None else None
                column = None
                if type(raw) is RawColumn:  # a tensor's bytes: read as they are where they need no more
                    if compiled is not None and self.column_readers:
                        column = raw_canonical(self, compiled, name, spec, raw)
                    if column is not None and name in self.text_features:
                        values[name] = column
                        continue
                    if column is None:
                        raw = raw.values
                if column is None and name in self.text_features:
                    encoded = None
                    if plain is not None:
                        encoded = compiled.text_column_of(plain, name, self.char_limit, self.missing_markers[name])
                    elif compiled is not None and self.column_readers and type(raw) is list:  # a front's columns
                        encoded = compiled.text_column(raw, self.char_limit, self.missing_markers[name])
                    if encoded is None:
                        encoded = self._text_column(spec, columns[name] if raw is None else raw)
                    if encoded is not None:
                        values[name] = encoded
                        continue
                if column is None and name in self.numeric_buckets and compiled is not None and self.column_readers:
                    raw = columns[name] if raw is None else raw
                    encoded = bucketised(self, compiled, name, raw)
                    if encoded is not None:
                        values[name] = encoded
                        continue
                # lists of strings: one pass with the compiled hash; the pure one's cache hits cost less
                if column is None and spec.multivalent and compiled is not None:
                    if plain is not None:
                        column = compiled.list_column_of(plain, name, self.char_limit, self.list_limits[name],
                                                         self.missing_markers[name], EMPTY_LIST)  # fmt: skip
                    if column is None and self.column_readers and type(raw) is list:  # a front's columns
                        column = compiled.list_column(raw, self.char_limit, self.list_limits[name],
                                                      self.missing_markers[name], EMPTY_LIST)  # fmt: skip
                    if column is None:
                        column = plain_list_column(self.limits, spec, columns[name] if raw is None else raw)
                if column is None:
                    raw = columns[name] if raw is None else raw
                    column = []
                    for index, value in enumerate(raw):
                        key = cache_key(value) if entries is not None else None
                        items = entries.get(key) if key is not None else None
                        if items is None:
                            items = self._canonical(name, spec, value, key, cache, where, index)
                        column.append(items)
            if spec.multivalent:
                width = self.widths[name]
                if max(map(len, column)) > width:  # a C pass: lists past the trained width are rare
                    truncated[name] = sum(len(items) > width for items in column)  # a context list counts once
            else:
                column = [items[0] for items in column]
            values[name] = column
        shared = frozenset(context.keys() & specs.keys()) if context else frozenset()
        ids = self.ids_looked_up(count, 1, shared)  # alone in a batch, with its context split out
        return CanonicalExamples(count, values, ids, truncated, shared)

    def _text_column(self, spec: FeatureSpec, raw: list) -> list[bytes] | None:
        """Canonical bytes of a one-value categorical feature's column when every value is a string within the
        length limit or an integer (ids sent as JSON numbers): UTF-8 and decimal digits, with no per-value checks
        or cache (a few times faster than a cache hit, and values never seen before, the long tail of an item id,
        cost the same). None: take the checked path."""
        kinds = set(map(type, raw))
        if kinds == {str}:
            if self.limits.max_chars is not None and max(map(len, raw)) > self.limits.max_chars:
                return None
            to_bytes = str.encode
        elif kinds == {int}:
            to_bytes = int_bytes
        elif kinds == {str, int}:
            if self.limits.max_chars is not None and max(len(v) for v in raw if type(v) is str) > self.limits.max_chars:
                return None
            to_bytes = scalar_bytes
        else:
            return None
        try:
            if hashing_backend() == "compiled":  # the extension's one pass over the column, whatever its mix
                encoded = canonical_column(raw)
            # ints: every decimal in one string, split in C (no Python call per value); their digits hold no space
            elif to_bytes is int_bytes:
                encoded = " ".join(map(str, raw)).encode().split()
            else:
                encoded = list(map(to_bytes, raw))
        except (UnicodeEncodeError, ValueError):  # a lone surrogate, an int past str()'s digits: the checked path names it
            return None
        missing = spec.missing_bytes
        if missing and not missing.isdisjoint(encoded):  # a C pass: most columns hold no missing marker
            return [MISSING if value in missing else value for value in encoded]
        return encoded

    def _refuse_examples(self, examples: Sequence, context: Mapping | None, where: str) -> None:
        """Raise for the first example that is not an object, names an unknown feature or one of the context's."""
        for index, example in enumerate(examples):
            if not isinstance(example, Mapping):
                raise ExampleError(f"{where}[{index}]: an example is an object of feature -> value, got {type(example).__name__}")
            unknown = example.keys() - self.specs.keys()
            if unknown:
                self._refuse_unknown(f"{where}[{index}]", unknown)
            if context:
                both = example.keys() & context.keys()
                if both:
                    refuse_both(f"{where}[{index}]", both)

    def _check_context(self, context: Mapping | None) -> None:
        if context is not None:
            if not isinstance(context, Mapping):
                raise ExampleError(f"context: an object of feature -> value, got {type(context).__name__}")
            unknown = context.keys() - self.specs.keys()
            if unknown:
                self._refuse_unknown("context", unknown)

    def _refuse_unknown(self, location: str, unknown: set) -> NoReturn:
        raise ExampleError(
            f"{location}: unknown feature {', '.join(sorted(map(str, unknown)))[:200]}; this model takes {', '.join(self.specs)}"
        )

    def _canonical(self, name: str, spec: FeatureSpec, value: object, key: object, cache: ValueCache | None,
                   where: str, index: int | None = None) -> tuple:  # fmt: skip
        """A value the cache did not have: checked, canonicalised, and cached when it has a key."""
        try:
            self.limits.check(value, spec)
            # A tuple of bytes, not a list: the collector stops tracking it, so a full cache
            # does not make every garbage collection walk it (a full cache would slow every collection).
            items = tuple(spec.canonical_values(value))
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an int past float's range
            raise ValueRefused(where, index, name, str(exc).removeprefix(f"feature {name!r} ")) from exc
        if key is not None:
            cache.put(key, items, entry_bytes(key, items))
        return items

    def ids_looked_up(self, count: int, parts: int, context: frozenset[str]) -> int:
        """Row ids a batch of ``count`` examples in ``parts`` requests looks up when ``context`` (the features every
        part shares) is split out (:meth:`hash_split`): those once a part, the others once an example."""
        shared_slots = sum(self.feature_slots[name] for name in context) if context else 0
        return count * (self.slots - shared_slots) + parts * shared_slots
