"""The streaming pipeline: files -> Arrow record batches -> encoded, shuffled training batches.

For data that must not be held as Python objects (tens of millions of rows): a
:class:`StreamSource` reads Parquet shards, CSV/TSV or Criteo-format files batch by batch
(pyarrow, in file and row-group order), every row numbered by its position in the stream.
The split is a seeded hash of that position (or the spec's split column), so the same row
is in the same split whatever the batch size. ``scan`` makes one pass over the training
rows for what a plan needs (distinct values per feature, and their keys for collisionless
tables; with ``head_sketch``, each feature's most frequent values for hybrid tables) and for the quantile boundaries of ``quantiles:N`` features (a seeded uniform
sample of at most ``QUANTILE_SAMPLE`` values per feature). ``shuffled_batches`` keeps a
shuffle buffer of ``capacity`` examples: memory is bounded by that buffer and one record
batch, never by the number of examples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from uembed.contract.columns import FeatureColumn, encode_values, quantile_boundaries, split_codes
from uembed.contract.errors import DataError
from uembed.contract.features import DatasetSpec, FeatureKind, FeatureSpec, SplitSpec
from uembed.contract.hashing import MISSING, canonical_bytes, hash_canonical, lookup_seed
from uembed.contract.plan import AUTO, HeadCounts
from uembed.model.data.criteo import CRITEO_COLUMNS, line_range, read_criteo, text_rows
from uembed.model.data.synthetic import _unit, splitmix64

FORMATS = ("parquet", "csv", "tsv", "criteo")
QUANTILE_SAMPLE = 1 << 20
# Values per feature the scan counts for hybrid tables when the head size is not known before it (a --budget
# fraction): 16 bytes a value, twice that while a batch is merged.
HEAD_SKETCH = 1 << 16
SPLITS = ("train", "validation", "test")
# Row groups a rank's block of Parquet rows spans under data parallelism (StreamSource._row_range_share).
BLOCK_GROUPS = 8


@dataclass(frozen=True)
class StreamSource:
    """Files of one dataset in one format, read in order as record batches.

    ``dataset`` is a file, or a folder of Parquet shards (``*.parquet``) or of Criteo files
    (``*.txt``, ``*.gz``), read in name order.
    """

    paths: tuple[Path, ...]
    format: str
    name: str

    @classmethod
    def open(cls, dataset: str | Path, format: str | None = None) -> StreamSource:
        path = Path(dataset)
        if format is not None and format not in FORMATS:
            raise DataError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
        if path.is_dir():
            found = {
                "parquet": sorted(path.glob("*.parquet")),
                "criteo": sorted(p for p in path.iterdir() if p.suffix in (".txt", ".gz")),
                "csv": sorted(path.glob("*.csv")),
                "tsv": sorted(path.glob("*.tsv")),
            }
            kind = format or next((k for k in ("parquet", "criteo", "csv", "tsv") if found[k]), None)
            if kind is None or not found[kind]:
                raise DataError(f"{path} holds no {format or 'Parquet, Criteo, CSV or TSV'} files")
            return cls(tuple(found[kind]), kind, path.name)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty")
        suffixes = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".txt": "criteo", ".gz": "criteo"}
        kind = format or suffixes.get(path.suffix)
        if kind is None:
            raise DataError(f"data file {path}: unknown format (expected .parquet, .csv, .tsv, or Criteo .txt/.gz)")
        return cls((path,), kind, path.name)

    def column_names(self) -> list[str]:
        if self.format == "criteo":
            return list(CRITEO_COLUMNS)
        if self.format == "parquet":
            return pq.ParquetFile(self.paths[0]).schema_arrow.names
        reader = pacsv.open_csv(self.paths[0], parse_options=self._parse_options())
        try:
            return reader.schema.names
        finally:
            reader.close()

    def _parse_options(self) -> pacsv.ParseOptions:
        return pacsv.ParseOptions(delimiter="\t" if self.format == "tsv" else ",")

    def check_columns(self, spec: DatasetSpec) -> list[str]:
        """The columns the spec needs, refused with their names when the data lacks them."""
        split_column = spec.split.column if spec.split else None
        needed = list(dict.fromkeys([spec.label.column, *(f.column for f in spec.features), *([split_column] if split_column else [])]))
        have = self.column_names()
        missing = [c for c in needed if c not in have]
        if missing:
            raise DataError(
                f"{self.name}: unknown column(s) {', '.join(repr(c) for c in missing)}; the data has {', '.join(have)}"
            )
        return needed

    def record_batches(
        self, spec: DatasetSpec, batch_rows: int = 1 << 18, start_row: int = 0, shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[int, pa.RecordBatch]]:  # fmt: skip
        """``(first_row, batch)`` pairs of the spec's columns, from row ``start_row`` (a batch boundary) on.

        ``shard = (rank, world)``: only this rank's share, disjoint from the other ranks' (data-parallel
        training): of Parquet data, equal blocks of rows dealt round-robin (:meth:`_row_range_share`); of each
        plain Criteo text file, the rank's byte range on line boundaries (:func:`line_range`), which the other
        ranks never parse; of gzip Criteo files (which cannot be split) and CSV/TSV files, every world-th record batch (each
        rank reads it all, keeping its batches). Rows keep their stream position.
        """
        if shard[1] > 1 and self.format == "parquet":
            yield from self._row_range_share(spec, batch_rows, start_row, shard)
            return
        if shard[1] > 1 and self.format == "criteo" and all(path.suffix != ".gz" for path in self.paths):
            yield from self._byte_range_share(spec, batch_rows, start_row, shard)
            return
        columns = self.check_columns(spec)
        row, index = 0, 0
        for path in self.paths:
            if self.format == "parquet":
                handle = pq.ParquetFile(path)
                rows = handle.metadata.num_rows
                if row + rows <= start_row:
                    row += rows
                    continue
                batches = handle.iter_batches(batch_size=batch_rows, columns=columns)
            elif self.format == "criteo":
                batches = _rebatch(read_criteo(path, columns), batch_rows)
            else:
                string_columns = {f.column: pa.string() for f in spec.features if f.kind != FeatureKind.NUMERIC}
                reader = pacsv.open_csv(
                    path, parse_options=self._parse_options(),
                    convert_options=pacsv.ConvertOptions(column_types=string_columns, include_columns=columns),
                )  # fmt: skip
                batches = _rebatch(iter(reader), batch_rows)
            try:
                for batch in batches:
                    if row >= start_row and index % shard[1] == shard[0]:
                        yield row, batch
                    row += batch.num_rows
                    index += 1
            except pa.ArrowInvalid as exc:
                raise DataError(f"{path} could not be read: {exc}") from exc

    def _row_range_share(self, spec: DatasetSpec, batch_rows: int, start_row: int, shard: tuple[int, int]) -> Iterator[tuple[int, pa.RecordBatch]]:
        """The rank's blocks of rows: the rows cut into ``world * K`` blocks as equal as rows allow, rank ``r``
        taking blocks ``r, r + world, ...``. Whole row groups would leave one rank a group longer than another,
        and every step of that group the others wait for it; ``K`` (one block per ``BLOCK_GROUPS`` row groups a
        rank) keeps a rank's share spread over the source, as dealing groups did (a split column that puts
        validation and test at the end must not leave the last rank without training rows), while a group on
        a block's edge, which both of its ranks decode, stays a small part of a block."""
        columns = self.check_columns(spec)
        handles = {path: pq.ParquetFile(path) for path in self.paths}
        groups = [(path, index, handle.metadata.row_group(index).num_rows)
                  for path, handle in handles.items() for index in range(handle.metadata.num_row_groups)]  # fmt: skip
        total, world = sum(rows for _, _, rows in groups), shard[1]
        blocks = world * max(1, len(groups) // (world * BLOCK_GROUPS))
        edges = [total * b // blocks for b in range(blocks + 1)]
        mine = [(max(edges[b], start_row), edges[b + 1]) for b in range(shard[0], blocks, world) if edges[b + 1] > start_row]
        row = 0
        for path, index, rows in groups:
            wanted = [(low, high) for low, high in mine if low < row + rows and row < high]
            if wanted:
                first = row
                for batch in handles[path].iter_batches(batch_size=batch_rows, row_groups=[index], columns=columns):
                    for low, high in wanted:
                        begin, end = max(first, low), min(first + batch.num_rows, high)
                        if begin < end:
                            yield begin, batch.slice(begin - first, end - begin)
                    first += batch.num_rows
                    if first >= wanted[-1][1]:
                        break  # the rest of the group is another rank's
            row += rows

    def _byte_range_share(self, spec: DatasetSpec, batch_rows: int, start_row: int, shard: tuple[int, int]) -> Iterator[tuple[int, pa.RecordBatch]]:
        columns = self.check_columns(spec)
        files_rows = 0  # rows of the files before this one
        for path in self.paths:
            begin, end, first = line_range(path, *shard)
            row = files_rows + first
            try:
                for batch in _rebatch(read_criteo(path, columns, byte_range=(begin, end)), batch_rows):
                    if row + batch.num_rows > start_row:
                        skip = max(start_row - row, 0)
                        yield row + skip, batch.slice(skip) if skip else batch
                    row += batch.num_rows
            except pa.ArrowInvalid as exc:
                raise DataError(f"{path} could not be read: {exc}") from exc
            if path != self.paths[-1]:
                files_rows += text_rows(path)


def _rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of exactly ``rows`` rows (the last one shorter), whatever the reader's block size."""
    pending, size = [], 0
    for batch in batches:
        pending.append(batch)
        size += batch.num_rows
        while size >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows).combine_chunks().to_batches()[0]
            rest = table.slice(rows)
            pending, size = rest.to_batches(), rest.num_rows
    if size:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def all_numbers(values: list[bytes]) -> bool:
    """Whether every value reads as a number (a column a user may have meant as numeric); none: True."""
    try:
        return all(np.isfinite(float(v)) for v in values)
    except ValueError:
        return False


def split_of_rows(first_row: int, batch: pa.RecordBatch, split: SplitSpec, seed: int, source: str) -> np.ndarray:
    """int8 split (0 train, 1 validation, 2 test) of each row: its split column, or a seeded hash of its position."""
    if split.column:
        return split_codes(batch.column(split.column), source)
    positions = np.arange(first_row, first_row + batch.num_rows, dtype=np.uint64)
    u = _unit(splitmix64(positions ^ np.uint64(lookup_seed("split", seed))))
    train, validation = split.fractions
    return np.where(u < train, 0, np.where(u < train + validation, 1, 2)).astype(np.int8)


def encode_column(feature: FeatureSpec, array: pa.Array) -> FeatureColumn:
    """One feature of a record batch as a FeatureColumn, vectorised (canonical values as in
    ``FeatureSpec.canonical_values``: only the batch's distinct values go through Python)."""
    if feature.missing and not feature.multivalent:
        markers = pa.array([m.decode("utf-8", "surrogateescape") for m in feature.missing_bytes], pa.string())
        as_text = array if pa.types.is_string(array.type) else pc.cast(array, pa.string())
        array = pc.if_else(pc.is_in(as_text, value_set=markers), pa.nulls(len(array), array.type), array)
    if feature.kind == FeatureKind.NUMERIC:
        if pa.types.is_string(array.type):
            array = pc.if_else(pc.equal(array, ""), pa.nulls(len(array), array.type), array)
        try:
            numbers = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"numeric feature {feature.name!r}: {exc}") from exc
        boundaries = np.asarray(feature.boundaries)
        buckets = np.searchsorted(boundaries, numbers, side="right")
        codes = np.where(np.isnan(numbers), 0, buckets + 1).astype(np.int32)[:, None]
        return FeatureColumn([MISSING] + [str(b).encode() for b in range(boundaries.size + 1)], codes)
    if feature.multivalent:
        if pa.types.is_string(array.type):
            array = pc.split_pattern(array, feature.separator)
        return encode_values(feature, array.to_pylist())
    encoded = pc.dictionary_encode(array)
    canonical = [canonical_bytes(v) for v in encoded.dictionary.to_pylist()]
    remap = np.array([0] + [0 if c == MISSING else i + 1 for i, c in enumerate(canonical)], dtype=np.int32)
    indices = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return FeatureColumn([MISSING] + canonical, remap[indices + 1][:, None])


def encode_batch(spec: DatasetSpec, batch: pa.RecordBatch) -> dict[str, FeatureColumn]:
    return {f.name: encode_column(f, batch.column(f.column)) for f in spec.features}


@dataclass
class StreamStats:
    """What one pass over the training rows tells a plan, saved beside a run or a study.

    ``spec``: the spec with quantile boundaries resolved; ``examples`` and ``positives`` per
    split; per feature ``vocabulary`` (distinct non-missing training values), ``widths``
    (longest list) and ``keys`` (sorted keys of those values under the feature's seed: the
    collisionless vocabulary); ``missing``: per feature the training examples without a value; ``numbers``: the
    categorical features whose training values all read as numbers (the data summary says so). ``head_counts``:
    per feature its most frequent values' keys and counts (:class:`HeavyHitters`, ``head_sketch`` values at most;
    empty when the scan did not count them), what a hybrid plan's heads are chosen from.
    """

    spec: DatasetSpec
    examples: dict[str, int]
    positives: dict[str, int]
    vocabulary: dict[str, int]
    widths: dict[str, int]
    keys: Mapping[str, np.ndarray] = field(repr=False, default_factory=dict)
    seconds: float = 0.0
    missing: dict[str, int] = field(default_factory=dict)  # statistics saved before these were counted have none
    numbers: list[str] = field(default_factory=list)
    head_counts: dict[str, HeadCounts] = field(repr=False, default_factory=dict)
    head_sketch: int = 0

    def save(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        doc = {"spec": self.spec.to_dict(), "examples": self.examples, "positives": self.positives,
               "vocabulary": self.vocabulary, "widths": self.widths, "seconds": self.seconds, "missing": self.missing,
               "numbers": self.numbers, "head_sketch": self.head_sketch,
               "head_counts": {name: {"exact": c.exact, "distinct": c.distinct, "total": c.total}
                               for name, c in self.head_counts.items()}}  # fmt: skip
        (path / "stats.json").write_text(json.dumps(doc, indent=2))
        target = path / "keys.npz"
        if not (isinstance(self.keys, StoredKeys) and self.keys.path.resolve() == target.resolve()):
            np.savez(target, **{name: self.keys[name] for name in self.keys})
        if self.head_counts:
            np.savez(path / "head_keys.npz", **{name: c.keys for name, c in self.head_counts.items()})
            np.savez(path / "head_counts.npz", **{name: c.counts for name, c in self.head_counts.items()})
        return path

    @classmethod
    def load(cls, path: Path) -> StreamStats:
        """Statistics saved by ``save``; the keys stay on disk until a plan asks for them (collisionless)."""
        doc = json.loads((path / "stats.json").read_text())
        keys = StoredKeys(path / "keys.npz")
        head_counts = {}
        if doc.get("head_counts"):
            with np.load(path / "head_keys.npz", allow_pickle=False) as k, np.load(path / "head_counts.npz", allow_pickle=False) as c:
                head_counts = {name: HeadCounts(k[name], c[name], **sizes) for name, sizes in doc["head_counts"].items()}
        return cls(DatasetSpec.from_dict(doc["spec"]), doc["examples"], doc["positives"], doc["vocabulary"],
                   doc["widths"], keys, doc.get("seconds", 0.0), doc.get("missing", {}),
                   doc.get("numbers", []), head_counts, doc.get("head_sketch", 0))  # fmt: skip


class StoredKeys(Mapping):
    """A feature's sorted keys read from ``keys.npz`` when asked for, so a run whose plan does not
    need them (every hashed method) never holds the collisionless vocabulary in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with np.load(path, allow_pickle=False) as stored:
            self.names = list(stored.files)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        with np.load(self.path, allow_pickle=False) as stored:
            return stored[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class _KeySet:
    """Sorted distinct uint64 keys, merged in bulk (memory: the distinct keys, not the rows)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.pending: list[np.ndarray] = []
        self.pending_size = 0

    def add(self, keys: np.ndarray) -> None:
        self.pending.append(keys)
        self.pending_size += keys.size
        if self.pending_size > max(1 << 22, self.keys.size // 2):
            self.merge()

    def merge(self) -> np.ndarray:
        if self.pending:
            self.keys = np.unique(np.concatenate([self.keys, *self.pending]))
            self.pending, self.pending_size = [], 0
        return self.keys


class HeavyHitters:
    """The most frequent uint64 keys of a stream with their counts, in bounded memory: a Misra-Gries summary
    (the mergeable form, Agarwal et al. 2012), fed batch by batch.

    At most ``capacity`` keys are kept. Whenever more are held, the ``(capacity + 1)``-th largest count is taken
    from every count and the keys left at 0 or below are dropped. So each kept count is a lower bound of the true
    one, at most ``occurrences / (capacity + 1)`` below it, and every key more frequent than that bound is kept.
    While a feature has at most ``capacity`` distinct values nothing is ever taken: the counts are exact
    (``exact``). Memory: ``capacity`` keys and counts, and the batches' distinct keys until the next merge.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.exact = True
        self.total = 0  # every occurrence added, kept or not
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_size = 0

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.pending.append((keys, counts))
        self.pending_size += keys.size
        self.total += int(counts.sum())
        if self.pending_size > max(self.capacity, 1 << 16):
            self.merge()

    def merge(self) -> HeadCounts:
        if self.pending:
            keys = np.concatenate([self.keys, *(k for k, _ in self.pending)])
            counts = np.concatenate([self.counts, *(c for _, c in self.pending)])
            self.pending, self.pending_size = [], 0
            keys, inverse = np.unique(keys, return_inverse=True)
            counts = np.bincount(inverse.ravel(), weights=counts, minlength=keys.size).astype(np.int64)
            if keys.size > self.capacity:
                taken = np.partition(counts, keys.size - self.capacity - 1)[keys.size - self.capacity - 1]
                counts -= taken
                kept = counts > 0
                keys, counts, self.exact = keys[kept], counts[kept], False
            self.keys, self.counts = keys, counts
        return HeadCounts(self.keys, self.counts, self.exact, total=self.total)


class _Reservoir:
    """A seeded uniform sample of at most ``size`` numbers (the smallest hash priorities win)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, np.uint64(seed)
        self.priority = np.zeros(0, dtype=np.float64)
        self.values = np.zeros(0, dtype=np.float64)

    def add(self, positions: np.ndarray, values: np.ndarray) -> None:
        priority = _unit(splitmix64(positions.astype(np.uint64) ^ self.seed))
        self.priority = np.concatenate([self.priority, priority])
        self.values = np.concatenate([self.values, values])
        if self.priority.size > 2 * self.size:
            self.trim()

    def trim(self) -> np.ndarray:
        if self.priority.size > self.size:
            keep = np.argpartition(self.priority, self.size)[: self.size]
            self.priority, self.values = self.priority[keep], self.values[keep]
        return self.values


def _numbers(feature: FeatureSpec, array: pa.Array) -> np.ndarray:
    """float64 values of a numeric column (NaN: missing or a declared missing marker)."""
    if feature.missing:
        markers = pa.array([m.decode("utf-8", "surrogateescape") for m in feature.missing_bytes], pa.string())
        as_text = array if pa.types.is_string(array.type) else pc.cast(array, pa.string())
        array = pc.if_else(pc.is_in(as_text, value_set=markers), pa.nulls(len(array), array.type), array)
    if pa.types.is_string(array.type):
        array = pc.if_else(pc.equal(array, ""), pa.nulls(len(array), array.type), array)
    return pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)


def scan(
    source: StreamSource, spec: DatasetSpec, seed: int = 0, batch_rows: int = 1 << 18, progress: bool = True,
    sample: int = QUANTILE_SAMPLE, head_sketch: int = 0,
) -> StreamStats:  # fmt: skip
    """One pass: split sizes, label balance, training vocabularies and keys, quantile boundaries; with
    ``head_sketch``, each feature's most frequent values counted in a :class:`HeavyHitters` of that many (a
    ``quantiles:N`` feature's buckets: its sample's counts, scaled to its values)."""
    import sys
    import time

    from tqdm import tqdm

    started = time.perf_counter()
    split = spec.split or SplitSpec()
    quantile_features = [spec.feature(n) for n in spec.needs_quantiles]
    other = [f for f in spec.features if not f.needs_quantiles]
    keys = {f.name: _KeySet() for f in other}
    widths = {f.name: 1 for f in spec.features}
    missing = {f.name: 0 for f in spec.features}
    numbers = {f.name for f in spec.features if f.kind == FeatureKind.CATEGORICAL}
    reservoirs = {f.name: _Reservoir(sample, lookup_seed(f.name, 1_000_003 + seed)) for f in quantile_features}
    sketches = {f.name: HeavyHitters(head_sketch) for f in other} if head_sketch else {}
    examples, positives = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    bar = tqdm(unit="ex", unit_scale=True, desc="scanning", disable=not progress, file=sys.stderr)
    for first_row, batch in source.record_batches(spec, batch_rows):
        codes = split_of_rows(first_row, batch, split, seed, source.name)
        labels = spec.label.binarise(batch.column(spec.label.column), source.name, check_classes=False)
        for code, name in enumerate(SPLITS):
            chosen = codes == code
            examples[name] += int(chosen.sum())
            positives[name] += int(labels[chosen].sum())
        train = codes == 0
        if not train.any():
            bar.update(batch.num_rows)
            continue
        rows = batch.filter(pa.array(train))
        for feature in other:
            column = encode_column(feature, rows.column(feature.column))
            widths[feature.name] = max(widths[feature.name], column.codes.shape[1])
            missing[feature.name] += int((column.codes[:, 0] <= 0).sum())
            present = [v for v in column.present_values() if v != MISSING]
            keys[feature.name].add(np.unique(hash_canonical(present, lookup_seed(feature.name), count=len(present))))
            if sketches:
                occurrences = np.bincount(column.codes[column.codes > 0].ravel(), minlength=len(column.uniques))
                used = np.flatnonzero(occurrences)
                values = [column.uniques[i] for i in used]
                sketches[feature.name].add(hash_canonical(values, lookup_seed(feature.name), count=len(values)), occurrences[used].astype(np.int64))
            if feature.name in numbers and not all_numbers(present):
                numbers.discard(feature.name)
        positions = np.flatnonzero(train) + first_row
        for feature in quantile_features:
            values = _numbers(feature, rows.column(feature.column))
            known = ~np.isnan(values)
            missing[feature.name] += int(values.size - known.sum())
            reservoirs[feature.name].add(positions[known], values[known])
        bar.update(batch.num_rows)
    bar.close()
    if examples["train"] == 0:
        raise DataError(f"{source.name}: no training examples")
    if positives["train"] in (0, examples["train"]):
        raise DataError(f"{source.name}: label column {spec.label.column!r} has one class only in the training split ({spec.label.rule})")
    boundaries = {f.name: quantile_boundaries(reservoirs[f.name].trim(), f.quantiles) for f in quantile_features}
    resolved = spec.with_boundaries(boundaries)
    out_keys = {name: key_set.merge() for name, key_set in keys.items()}
    for feature in quantile_features:
        bucketed = resolved.feature(feature.name)
        values = reservoirs[feature.name].values
        buckets = np.unique(np.searchsorted(np.asarray(bucketed.boundaries), values, side="right"))
        present = [str(int(b)).encode() for b in buckets]
        out_keys[feature.name] = np.unique(hash_canonical(present, lookup_seed(feature.name), count=len(present)))
    head_counts = {name: replace(sketch.merge(), distinct=int(out_keys[name].size)) for name, sketch in sketches.items()}
    for feature in quantile_features if head_sketch else ():
        head_counts[feature.name] = _bucket_counts(resolved.feature(feature.name), reservoirs[feature.name].values,
                                                   examples["train"] - missing[feature.name])  # fmt: skip
    vocabulary = {f.name: int(out_keys[f.name].size) for f in spec.features}
    widths = {f.name: max(1, f.max_values or widths[f.name]) for f in spec.features}
    return StreamStats(resolved, examples, positives, vocabulary, widths, out_keys, time.perf_counter() - started, missing,
                       sorted(n for n in numbers if vocabulary[n]), head_counts, head_sketch)


def head_sketch_size(head_share: float | str, spec: DatasetSpec, budget_rows: int | None = None) -> int:
    """Values per feature a scan counts for hybrid tables: 0 when no head is asked for (``--head-share`` and every
    feature's ``head_share`` 0); with ``--budget-rows``, which bounds every budgeted table's rows, twice the most
    head rows one table can have (at least 1024), so a feature that takes a whole head is counted well past it;
    else (a budget fraction, known only after the scan, or ``auto``) :data:`HEAD_SKETCH`."""
    if head_share == AUTO:
        return HEAD_SKETCH
    share = max([head_share, *(f.head_share or 0.0 for f in spec.features)])
    if not share:
        return 0
    if budget_rows:
        return max(1024, 2 * int(share * budget_rows))
    return HEAD_SKETCH


def _bucket_counts(feature: FeatureSpec, sample: np.ndarray, values: int) -> HeadCounts:
    """A ``quantiles:N`` feature's bucket counts: its uniform sample's, scaled to its ``values`` training values
    (exact when the sample holds them all)."""
    buckets, counts = np.unique(np.searchsorted(np.asarray(feature.boundaries), sample, side="right"), return_counts=True)
    present = [str(int(b)).encode() for b in buckets]
    scaled = np.maximum(np.round(counts * (values / max(sample.size, 1))), 1).astype(np.int64)
    keys = hash_canonical(present, lookup_seed(feature.name), count=len(present))
    return HeadCounts(keys, scaled, sample.size >= values)


def encoded_chunks(
    source: StreamSource, spec: DatasetSpec, plan, wanted: int, seed: int = 0, batch_rows: int = 1 << 18, start_row: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:  # fmt: skip
    """``(rows int32 [n, S], weights float32 [n, S], labels float32 [n], next_row)`` of the rows of
    split ``wanted`` (0 train, 1 validation, 2 test), record batch by record batch (of ``shard``'s share)."""
    split = spec.split or SplitSpec()
    for first_row, batch in source.record_batches(spec, batch_rows, start_row, shard):
        chosen = split_of_rows(first_row, batch, split, seed, source.name) == wanted
        next_row = first_row + batch.num_rows
        if not chosen.any():
            yield np.zeros((0, plan.slots), np.int32), np.zeros((0, plan.slots), np.float32), np.zeros(0, np.float32), next_row
            continue
        rows = batch.filter(pa.array(chosen))
        labels = spec.label.binarise(rows.column(spec.label.column), source.name, check_classes=False)
        encoded, weights = plan.encode(encode_batch(spec, rows))
        yield encoded.astype(np.int32), weights, labels, next_row


def shuffled_batches(
    chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]], capacity: int, batch_size: int, rng: np.random.Generator,
    exact: bool = False, start_row: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int | None]]:  # fmt: skip
    """Batches drawn from a shuffle buffer of ``capacity`` examples: chunks fill it, it is
    shuffled and emptied batch by batch (the last batch of a window may be shorter). The
    last batch of each window carries the source row where the next window starts (a resume
    point); the others carry None.

    With ``exact``, every window but the last holds exactly ``capacity`` examples: the chunk that
    crosses the edge is cut, its rest opening the next window. Data-parallel ranks step together,
    and a window's filling (reading and encoding several chunks) is a burst that the other ranks
    wait out unless they fill theirs at the same step, which equal windows make them do. A window's
    end then carries the end of the last chunk it took whole (``start_row`` before the first): a resume
    from there would train the cut chunk's first part again, so these are no resume points (the ranks
    resume from epoch ends)."""
    pending, size, next_row = [], 0, start_row

    def drain(pending, window_end):
        rows = np.concatenate([p[0] for p in pending])
        weights = np.concatenate([p[1] for p in pending])
        labels = np.concatenate([p[2] for p in pending])
        order = rng.permutation(labels.shape[0])
        starts = range(0, labels.shape[0], batch_size)
        for start in starts:
            index = order[start : start + batch_size]
            last = start + batch_size >= labels.shape[0]
            yield rows[index], weights[index], labels[index], window_end if last else None

    for rows, weights, labels, chunk_end in chunks:
        chunk_start = next_row
        next_row = chunk_end
        if labels.size:
            pending.append((rows, weights, labels))
            size += labels.size
        while size >= capacity:
            if not exact:
                yield from drain(pending, next_row)
                pending, size = [], 0
                break
            rest = size - capacity  # of the last chunk, for the next window
            if rest:
                *full, (rows, weights, labels) = pending
                cut = labels.shape[0] - rest
                pending = [*full, (rows[:cut], weights[:cut], labels[:cut])]
            yield from drain(pending, chunk_start if rest else next_row)
            pending, size = ([(rows[cut:], weights[cut:], labels[cut:])], rest) if rest else ([], 0)
    if size:
        yield from drain(pending, next_row)
