"""Producing row updates: the rows of a newer run, bundle or delta file that differ from a served bundle's,
published on the served version's stream (``uembed/serving/rows/updates.py`` has the format and the reader).

Rows are compared as records in the served table's codec (float16, int8, int4, int2 or pq rows, the last with
the served bundle's codebooks, are encoded exactly as an export would write them), so a row is sent only when what a replica serves would change, and a replica that
applies every delta serves what a bundle exported from the same tables would. A publisher remembers what it
sent (an overlay over the served rows), so publishing again after more training sends only what changed since.

    >>> publisher = RowPublisher(load_bundle("bundles/movielens/1"), redis_client(url, 10.0, 3))  # doctest: +SKIP
    >>> publisher.publish(source_rows(Path("runs/continued"), publisher.bundle, load_run), source="runs/continued")  # doctest: +SKIP
    {'rows_compared': 9436, 'rows_changed': 812, 'entries': 1, ...}

Sources (each yields ``(table, ids, records)`` chunks in the served dtype):

- a run directory (``checkpoint.pt``; needs torch): every row of its tables;
- a bundle directory (``manifest.json``), e.g. a newer export of the same model: every row;
- a delta file ``.npz`` with ``<table>.ids`` (int64 [k]) and ``<table>.rows`` (float32 [k, dim]) per table:
  rows computed anywhere else (another trainer).

Only rows travel: the dense network and everything else in the bundle stay as served, so the source must
share the served bundle's embedding plan (tables, hashing seeds), which is checked, and its dense network,
which is the trainer's job (``uembed train --continue-from`` keeps it frozen).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from uembed.bundle.format import chunk_bounds
from uembed.bundle.loader import Bundle, load_bundle
from uembed.contract.errors import UembedError
from uembed.serving.rows.files import FileRows
from uembed.serving.rows.overlay import RowOverlay
from uembed.serving.rows.updates import chunked, encode_delta, publish_entries, stream_key

Chunk = tuple[str, np.ndarray, np.ndarray]  # table, ids, records in the served dtype


def same_plan(plan: dict, served: Bundle, what: str) -> None:
    """Refuse rows of another embedding plan: the same row id would be another (feature, value)'s row there."""
    if json.loads(json.dumps(plan)) != served.manifest["embedding"]:
        raise UembedError(f"{what} has another embedding plan (tables, sizes or hashing seeds) than the served bundle "
                          f"{served.path}: its rows do not belong to that bundle's row ids")  # fmt: skip


def table_rows(tables: dict[str, np.ndarray], served: Bundle) -> Iterator[Chunk]:
    """Chunks of whole float32 tables (table -> ``[rows, dim]``), encoded in the served dtypes."""
    for name, rows in tables.items():
        table = served.tables[name]
        for start, stop in chunk_bounds(table.rows):
            yield name, np.arange(start, stop, dtype=np.int64), table.encode(rows[start:stop])


def model_rows(model, plan, served: Bundle, what: str) -> Iterator[Chunk]:
    """Chunks of a trained model's tables (a ``RankingModel`` with its plan; needs torch)."""
    same_plan(plan.to_dict(), served, what)
    return table_rows({name: weight.detach().numpy() for name, weight in model.embedding.table_weights().items()}, served)


def bundle_rows(path: Path, served: Bundle) -> Iterator[Chunk]:
    """Chunks of every row of another bundle of the same plan (its records as they are when the codecs agree: the
    dtype, and for pq the codebooks)."""
    newer = load_bundle(path)
    same_plan(newer.manifest["embedding"], served, f"bundle {path}")
    for name, table in newer.tables.items():
        target = served.tables[name]
        same = table.dtype == target.dtype and (table.codebooks is None or np.array_equal(table.codebooks, target.codebooks))
        files = FileRows(table)
        for start, stop in chunk_bounds(table.rows):
            ids = np.arange(start, stop, dtype=np.int64)
            yield name, ids, files.read(ids) if same else target.encode(table.gather(ids))


def delta_file_rows(path: Path, served: Bundle) -> Iterator[Chunk]:
    """The rows of a ``.npz`` delta file: per table ``<table>.ids`` and ``<table>.rows`` (float32)."""
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UembedError(f"{path} is not a readable .npz delta file: {exc}") from exc
    with arrays:
        names = {key.rsplit(".", 1)[0] for key in arrays.files}
        for name in sorted(names):
            table = served.tables.get(name)
            if table is None or f"{name}.ids" not in arrays.files or f"{name}.rows" not in arrays.files:
                raise UembedError(f"{path}: {name!r} needs {name}.ids and {name}.rows, for a table of the served bundle "
                                  f"({', '.join(served.tables)})")  # fmt: skip
            ids, rows = arrays[f"{name}.ids"].astype(np.int64), arrays[f"{name}.rows"]
            if rows.shape != (len(ids), table.dim) or (len(ids) and (ids.min() < 0 or ids.max() >= table.rows)):
                raise UembedError(f"{path}: {name}.rows must be [len(ids), {table.dim}] and ids in [0, {table.rows}); "
                                  f"got {rows.shape} for {len(ids)} ids")  # fmt: skip
            if len(np.unique(ids)) != len(ids):
                raise UembedError(f"{path}: {name}.ids holds a row id twice")
            yield name, ids, table.encode(rows)


def source_rows(path: Path, served: Bundle, load_run: Callable | None = None) -> Iterator[Chunk]:
    """The chunks of whatever ``path`` is: a run directory, a bundle directory or a ``.npz`` delta file. A run
    directory is read by ``load_run`` (``uembed.model.train.load_run``, which needs torch: the caller, above this
    layer, passes it where torch is installed)."""
    if (path / "checkpoint.pt").is_file():
        if load_run is None:
            raise UembedError(f"{path} is a run directory: reading it needs the training code; push a bundle instead")
        _, plan, model, _ = load_run(path)
        return model_rows(model, plan, served, f"run {path}")
    if (path / "manifest.json").is_file():
        return bundle_rows(path, served)
    if path.suffix == ".npz" and path.is_file():
        return delta_file_rows(path, served)
    raise UembedError(f"{path} is neither a run directory (checkpoint.pt), a bundle (manifest.json) nor a .npz delta file")


class RowPublisher:
    """Publishes the rows that differ from what replicas of ``bundle`` serve, on its version's stream."""

    def __init__(self, bundle: Bundle, client, prefix: str = "uembed", chunk_rows: int = 4096, max_entries: int = 100_000) -> None:
        self.bundle = bundle
        self.client = client
        self.key = stream_key(prefix, bundle.name, bundle.version)
        self.chunk_rows = chunk_rows
        self.max_entries = max_entries
        self.row_files = {name: FileRows(table) for name, table in bundle.tables.items()}
        self.sent = {name: RowOverlay(table.rows, table.record_bytes) for name, table in bundle.tables.items()}

    def changed(self, chunks: Iterable[Chunk]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
        """The rows whose records differ from the served ones (the bundle's, or the last this publisher sent), and
        how many rows were compared."""
        found: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        compared = 0
        for table, ids, records in chunks:
            if table not in self.row_files:
                raise UembedError(f"table {table!r} is not in the served bundle {self.bundle.path} ({', '.join(self.row_files)})")
            served = self.row_files[table].read(ids)
            self.sent[table].lookup(ids, served)
            differ = np.flatnonzero((served != records).any(axis=1))
            compared += len(ids)
            if len(differ):
                found.setdefault(table, []).append((ids[differ], records[differ]))
        rows = {t: (np.concatenate([i for i, _ in parts]), np.concatenate([r for _, r in parts])) for t, parts in found.items()}
        return rows, compared

    def publish(self, chunks: Iterable[Chunk], source: str, dry_run: bool = False) -> dict:
        """Send the changed rows as deltas of at most ``chunk_rows`` rows; a report of what was sent."""
        rows, compared = self.changed(chunks)
        entries = [encode_delta(self.bundle.name, self.bundle.version, self.bundle.tables, group, source)
                   for group in chunked(rows, self.chunk_rows)]  # fmt: skip
        ids = [] if dry_run else publish_entries(self.client, self.key, entries, self.max_entries)
        if not dry_run:
            for table, (changed_ids, records) in rows.items():
                self.sent[table].apply(changed_ids, records)
        return {"stream": self.key, "rows_compared": compared, "rows_changed": sum(len(i) for i, _ in rows.values()),
                "tables": {t: len(i) for t, (i, _) in rows.items()}, "entries": len(entries),
                "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None}  # fmt: skip
