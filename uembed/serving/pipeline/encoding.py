"""Examples -> row ids: the one path from a client's feature values to rows.

The export check (``ReferenceScorer``), the service (``ModelRuntime`` and the CUDA path)
and the naive benchmark baseline all encode through :class:`ExampleEncoder`, so a value
scores the same everywhere by construction. The service only adds caches around it.

A score runs these stages, in this order (each one function)::

    canonicalise  per request: raw values -> checked canonical bytes per feature
                  (a bad value is an ExampleError naming examples[i].feature)       ExampleEncoder.canonicalise
    hash          per batch: canonical bytes -> row ids [B, S], pooling weights [B, S]  ExampleEncoder.hash
    lookup        rows through the row store (hot rows, Redis, row files) -> [B, S, D]  ReferenceScorer / ModelRuntime
    assemble      pooling, multi-size concat, feature biases -> [B, E]
    dense         the dense network -> probabilities [B]

A ranking request sends the features its candidates share once, as a context, and the
candidates' own features per candidate. The context is checked and canonicalised once
per request (errors name ``context.feature``; the candidates' name ``candidates[i].feature``)
and its rows are hashed once. A batch of ranking requests keeps them at one row per request
(``hash_split`` -> :class:`SplitBatch`): the service looks them up once and writes them into
every candidate's embeddings (``lookup_split``, ``assemble_split``); ``hash``
repeats them to every candidate instead. Either way it scores exactly as the same examples
sent flat, with the context's values copied into each. Where the bundle's dense network is split by the
context's features (``uembed/bundle/dense_split.py``), the context's part of its first layer is computed once a
request too (``ReferenceScorer.factored_inputs``), with the same floats.

What a value may be over HTTP (:class:`ValueLimits`): a string of at most ``max_chars``
characters, a number, a boolean or null; a list of those (at most ``max_list`` items) for
multivalent features. Numbers must be finite: JSON has no NaN or Infinity, and the strings
``"NaN"``, ``"inf"`` and ``"-Infinity"`` are refused for numeric features for the same
reason (send null for a missing value). A numeric feature takes a number, null, or a
string holding a finite decimal number; a boolean is not a number.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import NoReturn

import numpy as np

from uembed.contract.columns import canonical_column
from uembed.contract.errors import ExampleError
from uembed.contract.features import FeatureSpec
from uembed.contract.hashing import MISSING, hash_canonical_columns, rows_of
from uembed.contract.known import KnownValues
from uembed.contract.plan import EmbeddingPlan, FeaturePlan

# A numeric feature's value sent as a string: a finite decimal number, blanks around it allowed, or "" (missing).
# Written as a regular expression so the OpenAPI schema can carry it; float() alone would also take "NaN",
# "inf" and "1_0".
NUMERIC_STRING = r"^(\s*[-+]?([0-9]{1,20}(\.[0-9]{0,20})?|\.[0-9]{1,20})([eE][-+]?[0-9]{1,2})?\s*)?$"


@dataclass(frozen=True)
class ValueLimits:
    """What a feature value may be. ``None`` turns a limit off (the export check, on training values)."""

    max_chars: int | None = 256
    max_list: int | None = 256
    finite_only: bool = True

    def check(self, value: object, spec: FeatureSpec) -> None:
        if isinstance(value, list):
            if not spec.multivalent:
                raise TypeError("takes one value, got a list")
            if self.max_list is not None and len(value) > self.max_list:
                raise ValueError(f"a list of {len(value)} values is longer than the limit of {self.max_list}")
            for item in value:
                self._scalar(item, spec)
        else:
            self._scalar(value, spec)

    def _scalar(self, value: object, spec: FeatureSpec) -> None:
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, int):
            if spec.kind == "numeric" and abs(value) > sys.float_info.max:
                raise ValueError(f"takes a finite number, got an integer of {value.bit_length()} bits, past a float's range")
            return
        if isinstance(value, str):
            if self.max_chars is not None and len(value) > self.max_chars:
                raise ValueError(f"a value of {len(value)} characters is longer than the limit of {self.max_chars}")
            if self.finite_only and spec.kind == "numeric" and not re.fullmatch(NUMERIC_STRING, value):
                raise TypeError(f"takes a finite number (a number, or a string of decimal digits; null when missing), got {value[:40]!r}")
            return
        if isinstance(value, float):
            if self.finite_only and not math.isfinite(value):
                raise ValueError(f"{value} is not a finite number (send null for a missing value)")
            return
        raise TypeError(f"takes a string, number, boolean or null, got {type(value).__name__}")


NO_LIMITS = ValueLimits(max_chars=None, max_list=None, finite_only=False)


class ValueCache:
    """A dict bounded by an estimate of the bytes its keys and values hold; emptied when full.

    Emptying (rather than evicting one by one) keeps a hit to one dict lookup; the values
    that recur come straight back.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: dict = {}

    def get(self, key):
        return self.entries.get(key)

    def put(self, key, value, size: int) -> None:
        if size > self.max_bytes:
            return
        if self.bytes + size > self.max_bytes:
            self.entries.clear()
            self.bytes = 0
        self.entries[key] = value
        self.bytes += size


ENTRY_OVERHEAD = 104  # a dict slot and the tuple around a value, as sys.getsizeof counts them on CPython 3.11


def entry_bytes(key: object, items: tuple) -> int:
    """Bytes of a key (a tuple key: with its items) and a tuple of values, as sys.getsizeof counts them."""
    size = ENTRY_OVERHEAD + sys.getsizeof(key) + sum(map(sys.getsizeof, items))
    if type(key) is tuple:
        size += sum(map(sys.getsizeof, key))
    return size


def cache_key(value: object) -> object:
    """A dict key for values whose canonical form depends on the value alone: str and int (not bool,
    which equals 1), and lists of str. None for anything else (checked and canonicalised every time)."""
    kind = type(value)
    if kind is str or kind is int:
        return value
    if kind is list and all(type(item) is str for item in value):
        return tuple(value)
    return None


def int_bytes(value: int) -> bytes:
    """An int's canonical bytes, as ``canonical_bytes`` gives them (its decimal digits)."""
    return str(value).encode()


def scalar_bytes(value: str | int) -> bytes:
    return value.encode() if type(value) is str else str(value).encode()


@dataclass
class CanonicalExamples:
    """One request's examples as canonical bytes, ready to join a batch."""

    count: int
    values: dict[str, list]  # feature -> per example, a tuple of canonical values (multivalent) or one value
    ids: int  # row ids this request looks up (its cost in a batch)
    truncated: dict[str, int]  # feature -> lists cut to the trained width
    # Features given once for the whole request (its context): their ``values`` hold one entry, not ``count``.
    shared: frozenset[str] = frozenset()


@dataclass
class SplitBatch:
    """A batch whose parts all share some features (ranking requests' contexts), hashed without repeating them.

    ``rows``/``weights`` [B, S_e] are the other features' slots for every example, at ``slots`` among the S slots
    of :meth:`ExampleEncoder.hash`; ``context_rows``/``context_weights`` [P, S_c] are the shared features' slots,
    one row per part, at ``context_slots``; part p stands for ``counts[p]`` consecutive examples. Repeating each
    context row ``counts`` times and placing both at their slots gives exactly what ``hash`` returns.
    """

    rows: np.ndarray
    weights: np.ndarray
    slots: np.ndarray
    context_rows: np.ndarray
    context_weights: np.ndarray
    context_slots: np.ndarray
    counts: np.ndarray
    # (first column here, first slot of the S, length): runs of consecutive slots, for copies by slices
    runs: tuple[tuple[int, int, int], ...]
    context_runs: tuple[tuple[int, int, int], ...]

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> int:
        """Row ids the batch looks up: every example's own slots, and the context's once per part."""
        return self.rows.size + self.context_rows.size

    def place(self, own: np.ndarray, context: np.ndarray, dtype) -> np.ndarray:
        """[B, S] from a value per own slot [B, S_e] and per context slot [B, S_c], each at its slot among the S
        (copies by runs of consecutive slots: indexing the slot axis with an array costs several times as much)."""
        out = np.empty((self.count, len(self.slots) + len(self.context_slots)), dtype=dtype)
        for values, runs in ((own, self.runs), (context, self.context_runs)):
            for source, target, length in runs:
                out[:, target : target + length] = values[:, source : source + length]
        return out

    def broadcast(self) -> tuple[np.ndarray, np.ndarray]:  # the tests' check of the split; serving never needs it
        """Rows and weights [B, S] as :meth:`ExampleEncoder.hash` gives them."""
        return (self.place(self.rows, np.repeat(self.context_rows, self.counts, axis=0), np.int64),
                self.place(self.weights, np.repeat(self.context_weights, self.counts, axis=0), np.float32))  # fmt: skip


def slot_runs(slots: np.ndarray) -> tuple[tuple[int, int, int], ...]:
    """``(position in slots, first slot, length)`` of each run of consecutive slot indices."""
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = np.concatenate(([0], breaks)).astype(int)
    stops = np.concatenate((breaks, [len(slots)])).astype(int)
    return tuple((int(a), int(slots[a]), int(b - a)) for a, b in zip(starts, stops) if b > a)


@dataclass
class ExampleEncoder:
    """Canonicalise and hash examples for one bundle's features and plan.

    ``cache_bytes`` > 0 keeps recent values' canonical forms and rows (most traffic repeats
    values, and canonicalising in Python is the costliest per-request step), bounded in bytes
    in all. ``known`` (feature -> :class:`KnownValues`) counts values unseen in training.
    """

    specs: Mapping[str, FeatureSpec]
    plan: EmbeddingPlan
    limits: ValueLimits = NO_LIMITS
    cache_bytes: int = 0
    known: Mapping[str, KnownValues] = field(default_factory=dict)

    LAYOUTS_KEPT = 64  # slot layouts of distinct context feature sets remembered (clients choose the sets)

    def __post_init__(self) -> None:
        self.widths = {f.name: f.width for f in self.plan.features}
        self.feature_slots = {f.name: f.width * len(f.lookups) for f in self.plan.features}
        self.slots = self.plan.slots
        one_value = [f.name for f in self.plan.features if f.width == 1 and not self.specs[f.name].multivalent]
        # One-value features with training values: one cached tuple of rows and unseen flag per value (the
        # filter lookup costs more than a cache hit). The others are hashed directly, every time: measured,
        # hashing 500 values (40 us) is cheaper than a warm cache (60 us), let alone a cold one (500 us).
        scalar = [name for name in one_value if name in self.known]
        self.direct = frozenset(name for name in one_value if name not in self.known)
        # Of those, the ones with one hashed lookup: (seed, table rows), to hash their columns together.
        self.one_slot_hashed = {
            f.name: (f.lookups[0].seed, self.plan.table(f.lookups[0].table).rows)
            for f in self.plan.features
            if f.name in self.direct and len(f.lookups) == 1 and not f.vocabulary
        }
        self._hashing_of: dict[tuple[str, ...], tuple[list[int], np.ndarray]] = {}
        # Unseen flags of the other features' values (a filter lookup per batch costs more than the hash).
        flagged = [f.name for f in self.plan.features if f.name not in one_value and f.name in self.known]
        share = self.cache_bytes // max(len(self.specs) + len(scalar) + len(flagged), 1)
        self.canonical_cache = {name: ValueCache(share) for name in self.specs} if self.cache_bytes else {}
        self.row_cache = {name: ValueCache(share) for name in scalar} if self.cache_bytes else {}
        self.flag_cache = {name: ValueCache(share) for name in flagged} if self.cache_bytes else {}
        self.unseen = dict.fromkeys(self.known, 0)  # feature -> values unseen in training since take_unseen()
        # One-value categorical features: a column of strings is canonicalised in one pass (_text_column).
        self.text_features = frozenset(
            name for name, spec in self.specs.items() if not spec.multivalent and spec.kind != "numeric"
        )
        self._slot_split: dict[frozenset[str], tuple] = {}  # context features -> their slots, the others', runs

    # --- canonicalise -----------------------------------------------------------------------
    def canonicalise(
        self,
        examples: Sequence[Mapping[str, object]],
        context: Mapping[str, object] | None = None,
        where: str | None = None,
    ) -> CanonicalExamples:
        """Check one request's examples against the features; a feature left out is the missing value.

        With ``context`` (feature -> value, for every example of the request: a ranking request's user and
        query), each context value is checked and canonicalised once and kept once (``shared``); ``hash``
        broadcasts its rows. A feature goes in the context or in the examples, not both. ``where`` names the
        examples in error messages: ``examples``, or ``candidates`` when there is a context; the context's
        errors name ``context.feature``. A context list cut to the trained width counts once in ``truncated``
        (and ``hash`` counts an unseen context value once): per request, not per candidate.
        """
        specs = self.specs
        where = where or ("examples" if context is None else "candidates")
        if context is not None:
            if not isinstance(context, Mapping):
                raise ExampleError(f"context: an object of feature -> value, got {type(context).__name__}")
            unknown = context.keys() - specs.keys()
            if unknown:
                self._refuse_unknown("context", unknown)
        # One union of every example's features (a C-level pass) rather than a check per example; only a
        # request at fault is walked example by example, to name the first one.
        plain = set(map(type, examples)) == {dict}  # then a column is read by a C loop (dict.get)
        try:
            named = set().union(*examples) if plain else None
        except TypeError:
            named = None
        if named is None or not named <= specs.keys() or (context and not named.isdisjoint(context.keys())):
            self._refuse_examples(examples, context, where)
        values: dict[str, list] = {}
        truncated = {}
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
                if name in self.text_features:
                    raw = list(map(dict.get, examples, repeat(name))) if plain else [e.get(name) for e in examples]
                    encoded = self._text_column(spec, raw)
                    if encoded is not None:
                        values[name] = encoded
                        continue
                column = []
                for index, example in enumerate(examples):
                    value = example.get(name)
                    key = cache_key(value) if entries is not None else None
                    items = entries.get(key) if key is not None else None
                    if items is None:
                        items = self._canonical(name, spec, value, key, cache, where, index)
                    column.append(items)
            if spec.multivalent:
                cut = sum(len(items) > self.widths[name] for items in column)  # a context list counts once
                if cut:
                    truncated[name] = cut
            else:
                column = [items[0] for items in column]
            values[name] = column
        shared = frozenset(context.keys() & specs.keys()) if context else frozenset()
        ids = self.ids_looked_up(len(examples), 1, shared)  # alone in a batch, with its context split out
        return CanonicalExamples(len(examples), values, ids, truncated, shared)

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
                    raise ExampleError(
                        f"{where}[{index}].{min(both)}: also given in context "
                        "(a feature goes in the context or in the candidates, not both)"
                    )

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
            # does not make every garbage collection walk it (measured: -25% throughput).
            items = tuple(spec.canonical_values(value))
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an int past float's range
            message = str(exc).removeprefix(f"feature {name!r} ")
            location = where if index is None else f"{where}[{index}]"
            raise ExampleError(f"{location}.{name}: {message}") from exc
        if key is not None:
            cache.put(key, items, entry_bytes(key, items))
        return items

    def ids_looked_up(self, count: int, parts: int, context: frozenset[str]) -> int:
        """Row ids a batch of ``count`` examples in ``parts`` requests looks up when ``context`` (the features every
        part shares) is split out (:meth:`hash_split`): those once a part, the others once an example."""
        shared_slots = sum(self.feature_slots[name] for name in context) if context else 0
        return count * (self.slots - shared_slots) + parts * shared_slots

    # --- hash -------------------------------------------------------------------------------
    def hash(self, parts: Sequence[CanonicalExamples]) -> tuple[np.ndarray, np.ndarray]:
        """Row ids int64 [B, S] and pooling weights float32 [B, S] of a whole batch, hashing each distinct value once.

        A feature that some part shares (its request's context) is hashed on the column as it comes, one entry
        per shared part and one per example of the others, and its rows repeated to one per example; so a
        context value is hashed, and counted as unseen, once per request. A batch with no context takes the
        plain path.
        """
        broadcast = {name for part in parts for name in part.shared}
        return self._encode_features(self.plan.features, parts, broadcast, sum(part.count for part in parts))

    def hash_split(self, parts: Sequence[CanonicalExamples]) -> SplitBatch | None:
        """The batch with the features every part shares kept at one row per part: what ``hash`` gives, before the
        context's rows are repeated to every example. None when some part shares nothing (a flat request): then
        ``hash`` is the whole of it."""
        context = frozenset.intersection(*(part.shared for part in parts)) if parts else frozenset()
        if not context:
            return None
        broadcast = {name for part in parts for name in part.shared} - context
        count = sum(part.count for part in parts)
        own = [f for f in self.plan.features if f.name not in context]
        rows, weights = self._encode_features(own, parts, broadcast, count)
        shared = [f for f in self.plan.features if f.name in context]
        context_rows, context_weights = self._encode_features(shared, parts, frozenset(), len(parts), one_per_part=True)
        slots, context_slots, runs, context_runs = self._slots_of(context)
        counts = np.array([part.count for part in parts], dtype=np.int64)
        return SplitBatch(rows, weights, slots, context_rows, context_weights, context_slots, counts, runs, context_runs)

    def _slots_of(self, context: frozenset[str]) -> tuple:
        """Slot indices (into the S slots of ``hash``) of the features not in ``context`` and of those in it, and
        each as runs of consecutive slots."""
        found = self._slot_split.get(context)
        if found is None:
            if len(self._slot_split) >= self.LAYOUTS_KEPT:  # clients choose their contexts: keep a few layouts
                self._slot_split.clear()
            in_context = np.concatenate(
                [np.full(self.feature_slots[f.name], f.name in context) for f in self.plan.features]
            )
            slots, context_slots = np.flatnonzero(~in_context), np.flatnonzero(in_context)
            found = self._slot_split[context] = (slots, context_slots, slot_runs(slots), slot_runs(context_slots))
        return found

    def _encode_features(self, features: Sequence[FeaturePlan], parts: Sequence[CanonicalExamples],
                         broadcast: set | frozenset, count: int, one_per_part: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Rows and weights of ``features`` (in plan order) over the batch, their slots side by side: ``count`` rows,
        one per example, or (``one_per_part``: features every part shares) one per part. The one-slot hashed
        features' columns are hashed together in one pass (a few numpy calls per feature cost more than hashing
        a ranking request's few hundred values of it)."""
        together = [f.name for f in features if f.name in self.one_slot_hashed and f.name not in broadcast]
        rows_of_together: dict[str, np.ndarray] = {}
        if len(together) > 1:
            columns = [self._column(name, parts, one_per_part) for name in together]
            rows_of_together = dict(zip(together, self._hash_columns(together, columns)))
        if not features:
            return np.zeros((count, 0), dtype=np.int64), np.zeros((count, 0), dtype=np.float32)
        ones = np.ones((count, 1), dtype=np.float32)
        row_parts, weight_parts = [], []
        for feature in features:
            rows = rows_of_together.get(feature.name)
            if rows is None:
                rows, weights = self._feature_rows(feature, parts, broadcast, one_per_part)
            else:
                weights = ones
            row_parts.append(rows)
            weight_parts.append(weights)
        return np.concatenate(row_parts, axis=1), np.concatenate(weight_parts, axis=1)

    def _hash_columns(self, names: list[str], columns: list[list]) -> list[np.ndarray]:
        """Rows [n, 1] of each of several one-slot hashed features, from their columns of n canonical values each."""
        hashing = self._hashing_of.get(tuple(names))
        if hashing is None:
            if len(self._hashing_of) >= self.LAYOUTS_KEPT:
                self._hashing_of.clear()
            seeds = [self.one_slot_hashed[name][0] for name in names]
            table_rows = np.array([[self.one_slot_hashed[name][1]] for name in names], dtype=np.uint64)
            hashing = self._hashing_of[tuple(names)] = (seeds, table_rows)
        seeds, table_rows = hashing
        rows = rows_of(hash_canonical_columns(columns, seeds), table_rows)
        return [column[:, None] for column in rows]

    @staticmethod
    def _column(name: str, parts: Sequence[CanonicalExamples], one_per_part: bool = False) -> list:
        """One feature's values over the batch: one per example (no part shares it), or one per part."""
        if one_per_part:
            return [p.values[name][0] for p in parts]
        if len(parts) == 1:
            return parts[0].values[name]
        return list(chain.from_iterable(p.values[name] for p in parts))  # no Python step per value

    def _feature_rows(self, feature: FeaturePlan, parts: Sequence[CanonicalExamples], broadcast: set | frozenset,
                      one_per_part: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """One feature's rows and weights over the batch: one per example, or (``one_per_part``, a feature every part
        shares) one per part. ``broadcast``: features some parts share, whose one value stands for each of those
        parts' examples."""
        name = feature.name
        repeats = None
        if name in broadcast and not one_per_part:
            values, repeats = self._broadcast_column(name, parts)
        else:
            values = self._column(name, parts, one_per_part)
        if name in self.direct:
            rows = np.stack([self.plan.rows_of_values(feature, lookup, values) for lookup in feature.lookups], axis=1)
            weights = np.ones(rows.shape, dtype=np.float32)
        elif name in self.row_cache:
            rows = self._scalar_rows(feature, values)
            weights = np.ones(rows.shape, dtype=np.float32)
        else:
            column = canonical_column(values if self.specs[name].multivalent else [(v,) for v in values])
            rows, weights = self.plan.encode_feature(feature, column)
            if name in self.known:
                unseen = self._unseen(name, column.uniques)
                codes = column.codes[:, : feature.width]  # values past the trained width are cut, not scored
                codes = codes[codes >= 0]
                self.unseen[name] += int(unseen[codes].sum())
        if repeats is not None:
            rows, weights = np.repeat(rows, repeats, axis=0), np.repeat(weights, repeats, axis=0)
        return rows, weights

    @staticmethod
    def _broadcast_column(name: str, parts: Sequence[CanonicalExamples]) -> tuple[list, np.ndarray]:
        """One feature's values across parts, a shared part's one value standing for all its examples, and
        how many examples each value stands for."""
        values = [v for p in parts for v in p.values[name]]
        repeats = np.concatenate(
            [np.array([p.count]) if name in p.shared else np.ones(p.count, dtype=np.int64) for p in parts]
        )
        return values, repeats

    def encode(self, examples: Sequence[Mapping[str, object]]) -> tuple[np.ndarray, np.ndarray]:
        """canonicalise + hash of one batch of examples."""
        return self.hash([self.canonicalise(examples)])

    def _known(self, name: str, values: list[bytes]) -> np.ndarray:
        return self.known[name].contains(KnownValues.keys(name, values))

    def _unseen(self, name: str, values: list[bytes]) -> np.ndarray:
        """Per value, whether training never saw it (the missing value never counts); remembered per value."""
        flags = self.flag_cache.get(name)
        if flags is not None:
            try:
                return np.array([flags.entries[v] for v in values], dtype=bool)
            except KeyError:
                pass
        unseen = ~self._known(name, values)
        unseen[[v == MISSING for v in values]] = False
        if flags is not None:
            for value, flag in zip(values, unseen.tolist()):
                flags.put(value, flag, ENTRY_OVERHEAD + sys.getsizeof(value))
        return unseen

    def _scalar_rows(self, feature: FeaturePlan, values: list[bytes]) -> np.ndarray:
        """Rows [N, lookups] of a one-value feature, remembering each value's rows (and, last, whether it is unseen)."""
        cache = self.row_cache[feature.name]
        entries = cache.entries
        try:
            table = [entries[v] for v in values]
        except KeyError:
            distinct = {v: entries.get(v) for v in values}
            missed = [v for v, entry in distinct.items() if entry is None]
            found = np.stack([self.plan.rows_of_values(feature, lookup, missed) for lookup in feature.lookups], axis=1)
            unseen = np.zeros(len(missed), dtype=np.int64)
            if feature.name in self.known:
                unseen = (~self._known(feature.name, missed)).astype(np.int64)
                unseen[[v == b"" for v in missed]] = 0
            # Tuples of ints: untracked by the collector.
            distinct.update(zip(missed, map(tuple, np.column_stack([found, unseen]).tolist())))
            for value in missed:
                cache.put(value, distinct[value], entry_bytes(value, distinct[value]))
            table = [distinct[v] for v in values]
        matrix = np.array(table, dtype=np.int64).reshape(len(values), len(feature.lookups) + 1)
        if feature.name in self.known:
            self.unseen[feature.name] += int(matrix[:, -1].sum())
        return np.ascontiguousarray(matrix[:, :-1])

    def take_unseen(self) -> dict[str, int]:
        """Values unseen in training per feature since the last call (then reset)."""
        counts, self.unseen = self.unseen, dict.fromkeys(self.known, 0)
        return counts

    def cached_bytes(self) -> int:
        return sum(c.bytes for c in (*self.canonical_cache.values(), *self.row_cache.values(), *self.flag_cache.values()))

