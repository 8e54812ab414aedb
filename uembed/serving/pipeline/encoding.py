"""Examples -> row ids: the one path from a client's feature values to rows.

The export check (``ReferenceScorer``), the service (the CPU and CUDA runtimes)
and the naive benchmark baseline all encode through :class:`ExampleEncoder`, so a value
scores the same everywhere by construction. The service only adds caches around it.
Canonicalise lives in ``canonical.py`` (:class:`Canonicaliser`, which the encoder extends), what a
value may be in ``values.py`` (:class:`ValueLimits`); hash is here; the stages after it are ``stages.py``'s.

A ranking request sends the features its candidates share once, as a context, and the
candidates' own features per candidate. The context is checked and canonicalised once
per request (errors name ``context.feature``; the candidates' name ``candidates[i].feature``)
and its rows are hashed once. A batch of ranking requests keeps them at one row per request
(``hash_split`` -> :class:`SplitBatch`): the service looks them up once and writes them into
every candidate's embeddings (``lookup_split``, ``assemble_split``); ``hash``
repeats them to every candidate instead. Either way it scores exactly as the same examples
sent flat, with the context's values copied into each. Where the bundle's dense network is split by the
context's features (``uembed/bundle/dense_split.py``), the context's part of its first layer is computed once a
request too (``Stages.factored_inputs``), with the same floats.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from uembed.contract.columns import canonical_column
from uembed.contract.hashing import (
    MISSING,
    compiled_extension,
    hash_canonical,
    hash_canonical_columns,
    hash_canonical_rows,
    hashing_backend,
    head_rows,
    lookup_seed,
)
from uembed.contract.known import KnownSets, KnownValues
from uembed.contract.plan import FeaturePlan, Pooling
from uembed.serving.pipeline.canonical import CanonicalExamples, Canonicaliser
from uembed.serving.pipeline.values import ENTRY_OVERHEAD, ValueCache, entry_bytes


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
class HashLayout:
    """How :meth:`ExampleEncoder._hash_columns` hashes one set of one-slot features: their seeds and table rows, and
    for those with training values (``known``: their positions) the filters, the seeds of the filters' keys (the
    feature's own lookup-0 seed; ``known_keys_hashed``: the same as the rows' keys, not hashed again) and the key
    of the missing value under each, which never counts as unseen."""

    seeds: list[int]
    table_rows: np.ndarray  # uint64 [F, 1]
    known: list[int]
    filters: KnownSets
    known_seeds: list[int]
    known_keys_hashed: bool
    missing_keys: np.ndarray  # uint64 [len(known), 1]

    @classmethod
    def of(cls, encoder: ExampleEncoder, names: list[str]) -> HashLayout:
        seeds = [encoder.one_slot_hashed[name][0] for name in names]
        table_rows = np.array([[encoder.one_slot_hashed[name][1]] for name in names], dtype=np.uint64)
        known = [i for i, name in enumerate(names) if name in encoder.known]
        known_seeds = [lookup_seed(names[i], 0) for i in known]
        missing = np.array([[hash_canonical([MISSING], seed)[0]] for seed in known_seeds], dtype=np.uint64)
        return cls(seeds, table_rows, known, KnownSets([encoder.known[names[i]] for i in known]), known_seeds,
                   known_seeds == [seeds[i] for i in known], missing.reshape(len(known), 1))  # fmt: skip


@dataclass
class ExampleEncoder(Canonicaliser):
    """Canonicalise (:class:`Canonicaliser`) and hash examples for one bundle's features and plan."""

    LAYOUTS_KEPT = 64  # slot layouts of distinct context feature sets remembered (clients choose the sets)

    def __post_init__(self) -> None:
        super().__post_init__()
        # One-value features with one hashed lookup: (seed, table rows hashed into). Their columns are hashed together
        # in one pass; with the compiled hash, those with training values too, their unseen values counted by one
        # pass over all their filters (KnownSets): cheaper than a cache of each value's rows, warm or cold. With the
        # pure-Python hash, a feature with training values keeps a cached tuple of rows and unseen flag per value
        # (row_cache: its filter lookup costs more than a cache hit), as do the others with training values.
        self.direct = frozenset(name for name in self.one_value if name not in self.known)
        self.one_slot_hashed = {
            f.name: (f.lookups[0].seed, self.plan.table(f.lookups[0].table).hashed_rows)
            for f in self.plan.features
            if f.name in self.one_value and len(f.lookups) == 1 and not f.vocabulary
        }
        self._hashing_of: dict[tuple[str, ...], HashLayout] = {}
        self._filters: dict[str, KnownSets] = {}  # a multivalent feature's training values, asked per batch
        self.head_start = {f.name: f.head_start for f in self.plan.features if f.name in self.plan.heads}
        # Unseen flags of the other features' values (a filter lookup per batch costs more than the hash).
        self.row_cache = {name: ValueCache(self.cache_share) for name in self.rows_cached} if self.cache_bytes else {}
        self.flag_cache = {name: ValueCache(self.cache_share) for name in self.flagged} if self.cache_bytes else {}
        self.unseen = dict.fromkeys(self.known, 0)  # feature -> values unseen in training since take_unseen()
        self._slot_split: dict[frozenset[str], tuple] = {}  # context features -> their slots, the others', runs
        # Multivalent features whose every lookup hashes into a table (no vocabulary, no head): their seeds and table
        # rows, for the compiled pass over a column's lists (_hashed_list_rows).
        self.hashed_lists = {
            f.name: (np.array([lookup.seed for lookup in f.lookups], dtype=np.uint64),
                     np.array([self.plan.table(lookup.table).hashed_rows for lookup in f.lookups], dtype=np.uint64))
            for f in self.plan.features
            if self.specs[f.name].multivalent and not f.vocabulary and f.name not in self.plan.heads
        }
        self.missing_keys: dict[str, int] = {}  # feature -> the missing value's key under its lookup-0 seed

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
        compiled = hashing_backend() == "compiled"
        together = [f.name for f in features if f.name in self.one_slot_hashed and f.name not in broadcast
                    and (compiled or f.name in self.direct)]  # fmt: skip
        rows_of_together: dict[str, np.ndarray] = {}
        if together:
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
        """Rows [n, 1] of each of several one-slot hashed features, from their columns of n canonical values each;
        the values unseen in training counted, for those with training values."""
        layout = self._hashing_of.get(tuple(names))
        if layout is None:
            if len(self._hashing_of) >= self.LAYOUTS_KEPT:
                self._hashing_of.clear()
            layout = self._hashing_of[tuple(names)] = HashLayout.of(self, names)
        keys, rows = hash_canonical_rows(columns, layout.seeds, layout.table_rows)
        for i, name in enumerate(names):
            if name in self.plan.heads:  # hybrid table: a head value's key reads its head row (one binary search)
                rows[i] = head_rows(keys[i], self.plan.heads[name], self.head_start[name], int(layout.table_rows[i, 0]))
        if layout.known:
            if layout.known_keys_hashed:
                unseen = layout.filters.unseen(keys, layout.known, layout.missing_keys)  # missing never counts
            else:
                known_keys = hash_canonical_columns([columns[i] for i in layout.known], layout.known_seeds)
                unseen = layout.filters.unseen(known_keys, range(len(layout.known)), layout.missing_keys)
            for i, count in zip(layout.known, unseen.tolist()):
                self.unseen[names[i]] += count
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
        elif self.specs[name].multivalent and hashing_backend() == "compiled":
            rows, weights = self._list_rows(feature, values)
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

    def _list_rows(self, feature: FeaturePlan, values: list) -> tuple[np.ndarray, np.ndarray]:
        """A multivalent feature's rows and weights, as ``plan.encode_feature`` gives them, from every value of the
        column hashed in one call (no table of its distinct values first: with the compiled hash, building one cost
        more than hashing each value); its unseen values counted, the missing one and those past the width not."""
        if feature.name in self.hashed_lists:  # the common case in one compiled pass
            return self._hashed_list_rows(feature, values)
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        flat = [MISSING, *chain.from_iterable(values)]  # the missing value first: the padding slots' rows
        present = np.arange(feature.width) < lengths[:, None]  # values past the width are cut
        slots = np.where(present, (np.cumsum(lengths) - lengths + 1)[:, None] + np.arange(feature.width), 0)
        if feature.pooling == Pooling.MEAN:
            weights = (present / np.maximum(present.sum(axis=1, keepdims=True), 1)).astype(np.float32)
        else:
            weights = present.astype(np.float32)
        rows = [self.plan.rows_of_values(feature, lookup, flat)[slots] for lookup in feature.lookups]
        if feature.name in self.known:
            if feature.name not in self._filters:
                self._filters[feature.name] = KnownSets([self.known[feature.name]])
            keys = KnownValues.keys(feature.name, flat)
            unseen = ~self._filters[feature.name].contains(keys[None])[0] & (keys != keys[0])  # keys[0]: missing's
            self.unseen[feature.name] += int(unseen[slots].sum())  # a padding slot reads the missing value
        return np.concatenate(rows, axis=1), np.tile(weights, (1, len(feature.lookups)))

    def _hashed_list_rows(self, feature: FeaturePlan, values: list) -> tuple[np.ndarray, np.ndarray]:
        """``_list_rows`` of a feature whose lookups all hash into tables (no vocabulary, no head), by the extension."""
        known = feature.name in self.known
        seeds, rows = self.hashed_lists[feature.name]
        found, weights, keys = compiled_extension().list_rows(values, feature.width, feature.pooling == Pooling.MEAN,
                                                              seeds, rows, lookup_seed(feature.name, 0) if known else None)  # fmt: skip
        if known:
            if feature.name not in self._filters:
                self._filters[feature.name] = KnownSets([self.known[feature.name]])
            missing = self.missing_keys.get(feature.name)
            if missing is None:
                missing = self.missing_keys[feature.name] = KnownValues.keys(feature.name, [MISSING])[0]
            self.unseen[feature.name] += int(self._filters[feature.name].unseen(keys[None], [0], [missing])[0])
        return found, weights

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
