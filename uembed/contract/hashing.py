"""The hashing contract: (feature, value) -> 64-bit key -> row of a table.

Training, export, the service and the load generator all call this module and nothing
else hashes, so a value maps to the same row everywhere (no train/serve skew).

The spec, version ``uembed-hash-v1``:

1. Canonical bytes of a value: ``None``, ``NaN``, ``""`` and an empty list are *missing*
   and canonicalise to the empty byte string ``b""`` (so a missing value has its own
   row, found like any other value). ``True``/``False`` -> ``b"true"``/``b"false"``;
   an int -> its decimal digits; a float with an integral value -> the digits of that
   integer (so ``3.0`` read from a CSV and ``3`` from Parquet agree); any other float
   -> ``repr``; a string -> its UTF-8 bytes, unchanged.
2. Seed of lookup ``j`` of hash namespace ``name`` (a feature name, or a semantic group
   whose features share a vocabulary): ``xxh3_64(utf8(name) + b"#" + ascii(j), seed=0)``.
3. Key: ``xxh3_64(canonical_bytes, seed=lookup_seed)``, an unsigned 64-bit integer.
4. Row of a hashed table of ``rows`` rows: ``key % rows``. A collisionless table keeps
   a sorted array of known keys; a key found at index ``i`` reads row ``i + 1``, an
   unknown or missing key reads row 0.
5. A feature with a *head* (a hybrid table, ``head_rows``): its head is a sorted array of keys (under
   the feature's lookup-0 seed) of its most frequent training values and the first row of its block,
   ``head_start``. A key found at index ``i`` of the head reads row ``head_start + i``; any other key
   (a tail value, an unseen or missing one) reads ``key % hashed_rows``, where ``hashed_rows`` is the
   table's rows less all its head rows (the heads' blocks follow the hashed rows). Found means equal
   to the key at the binary-search (lower bound) position.

From another language (a Go or Java feature pipeline, a C++ ranker) the same keys need:
XXH3 64-bit (the reference C library or a port that passes its test vectors; not XXH64,
not XXH3-128), called with a 64-bit seed; the canonical bytes above, byte for byte (UTF-8
without normalisation, integers without a sign for zero or leading zeros, Python's
``repr`` for non-integral floats: the shortest string that round-trips, e.g. ``0.1`` and
``1e-05``); the seed string ``<namespace>#<lookup>`` in UTF-8, hashed with seed 0; and
``key % rows`` on unsigned 64-bit integers. ``tests/contract/test_golden_hashing.py`` lists
literal (namespace, value, lookup) -> seed, key and rows to check a port against; every
bundle's manifest also carries test vectors of its own values.

Two implementations of steps 1 and 3 over whole columns: this module's pure Python, and the compiled extension
``uembed/contract/_fasthash.pyx`` (built by the install; it calls libxxhash's ``XXH3_64bits_withSeed`` with no
Python call per value). The compiled one is used when it is importable, unless the environment variable
``UEMBED_PURE_PYTHON=1`` is set when this module is imported; :func:`hashing_backend` says which is in use and
:func:`use_backend` switches (the tests hold both to the golden vectors).

Example::

    >>> seed = lookup_seed("user_id", 0)
    >>> key = hash_value(196, seed)
    >>> int(rows_of(np.array([key], dtype=np.uint64), 1000)[0]) == key % 1000
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from itertools import chain, repeat

import numpy as np
import xxhash

try:
    from uembed.contract import _fasthash
except ImportError:  # not built (a source tree without `make install`): the pure-Python path does the same work
    _fasthash = None

SPEC_VERSION = "uembed-hash-v1"
MISSING = b""
BACKENDS = ("compiled", "python")


def _agrees_with_xxhash(module) -> bool:
    """Whether the extension's xxh3 (the system's libxxhash) gives python-xxhash's keys, which the contract and its
    golden vectors are written in: a libxxhash from before XXH3 was stable would import and hash differently."""
    samples = [b"", b"a", b"uembed", bytes(range(256)) * 9]
    return all(
        module.hash_bytes(samples, seed).tolist() == [xxhash.xxh3_64_intdigest(v, seed) for v in samples]
        for seed in (0, 1, 2**63 + 11)
    )


# What the callers use; an extension built from an older source lacks some (the .so is not rebuilt by a checkout).
EXTENSION_FUNCTIONS = ("canonical_column", "hash_values", "hash_bytes", "hash_bytes_columns", "filters_contain",
                       "length_prefixed", "text_column_of", "text_column", "list_column_of", "list_column", "rows_without_padding",
                       "list_rows", "hash_bytes_rows", "filters_unseen", "framed_count", "framed_text_column", "framed_list_column",
                       "integer_text_column", "numeric_column")  # fmt: skip
_lacking = [name for name in EXTENSION_FUNCTIONS if not hasattr(_fasthash, name)] if _fasthash is not None else []
if _lacking:
    if os.environ.get("UEMBED_REQUIRE_EXTENSION", "") not in ("", "0"):
        raise ImportError(f"uembed.contract._fasthash was built from an older source (no {', '.join(_lacking)}): "
                          "rebuild it (make install)")  # fmt: skip
    _fasthash = None  # the pure path, until it is rebuilt
if _fasthash is not None and not _agrees_with_xxhash(_fasthash):
    if os.environ.get("UEMBED_REQUIRE_EXTENSION", "") not in ("", "0"):
        raise ImportError("uembed.contract._fasthash hashes differently from python-xxhash (libxxhash older than 0.8?)")
    _fasthash = None  # the pure path: slower, never wrong
_compiled = _fasthash if os.environ.get("UEMBED_PURE_PYTHON", "") in ("", "0") else None


def hashing_backend() -> str:
    """``compiled`` (the extension hashes columns) or ``python`` (not built, or ``UEMBED_PURE_PYTHON=1``)."""
    return "python" if _compiled is None else "compiled"


def compiled_available() -> bool:
    """Whether the compiled extension is built and importable (whichever backend is in use)."""
    return _fasthash is not None


def compiled_extension():
    """The compiled extension while the compiled backend is in use, else None: for the contract's other per-value
    loops (``known.py``'s filter probes), which follow the same switch."""
    return _compiled


def use_backend(backend: str) -> None:
    """Hash with ``compiled`` or ``python`` from now on, in this process."""
    global _compiled
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "compiled" and _fasthash is None:
        raise ImportError("the compiled hashing extension uembed.contract._fasthash is not built (make install)")
    _compiled = _fasthash if backend == "compiled" else None


def canonical_bytes(value: object) -> bytes:
    """Canonical UTF-8 form of one scalar value (see the module docstring)."""
    if value is None:
        return MISSING
    if isinstance(value, bool):  # before int: bool is an int subclass
        return b"true" if value else b"false"
    if isinstance(value, (int, np.integer)):
        return str(int(value)).encode()
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return MISSING
        if number.is_integer():
            return str(int(number)).encode()
        return repr(number).encode()
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    raise TypeError(f"cannot hash a value of type {type(value).__name__}: {value!r}")


def lookup_seed(namespace: str, lookup: int = 0) -> int:
    """Hash seed of lookup number ``lookup`` of a feature (or shared-vocabulary group)."""
    return xxhash.xxh3_64_intdigest(f"{namespace}#{lookup}".encode("utf-8"), seed=0)


def hash_value(value: object, seed: int) -> int:
    """64-bit key of one value under one lookup seed."""
    return xxhash.xxh3_64_intdigest(canonical_bytes(value), seed=seed)


def canonical_column(values: Sequence[object] | np.ndarray) -> list[bytes]:
    """``canonical_bytes`` of each value of a column, in one call."""
    if _compiled is not None:
        return _compiled.canonical_column(values, canonical_bytes)
    return list(map(canonical_bytes, values.tolist() if isinstance(values, np.ndarray) else values))


def hash_values(values: Sequence[object] | np.ndarray, seed: int) -> np.ndarray:
    """Keys (uint64) of a column of raw values under one seed: ``hash_value`` of each, in one call."""
    if _compiled is not None:
        return _compiled.hash_values(values, seed, canonical_bytes)
    return hash_canonical(canonical_column(values), seed, count=len(values))


def hash_canonical(values: Sequence[bytes] | Iterable[bytes], seed: int, count: int = -1) -> np.ndarray:
    """Keys (uint64) of already-canonical byte strings, one per value."""
    if _compiled is not None:
        keys = _compiled.hash_bytes(values, seed)
        if 0 <= count < keys.size:  # as np.fromiter's count: the first values
            return keys[:count]
        if keys.size < count:
            raise ValueError(f"{keys.size} values where {count} were expected")
        return keys
    # map over a repeated seed, not a generator expression: no Python frame per value (docs/BENCHMARKS.md)
    return np.fromiter(map(xxhash.xxh3_64_intdigest, values, repeat(seed)), dtype=np.uint64, count=count)


def hash_canonical_columns(columns: Sequence[Sequence[bytes]], seeds: Sequence[int]) -> np.ndarray:
    """Keys uint64 [len(columns), n] of columns of n canonical byte strings each, column i under ``seeds[i]``: as
    ``hash_canonical`` of each column, in one pass (one numpy call per column cost more than the hashing itself
    for a ranking request's 20 one-value context features)."""
    if _compiled is not None:
        return _compiled.hash_bytes_columns(columns, seeds)
    n = len(columns[0]) if columns else 0
    if any(len(column) != n for column in columns):
        raise ValueError(f"columns of different lengths: {[len(column) for column in columns]}")
    seeded = chain.from_iterable(repeat(seed, n) for seed in seeds)
    keys = np.fromiter(map(xxhash.xxh3_64_intdigest, chain.from_iterable(columns), seeded), dtype=np.uint64, count=n * len(columns))
    return keys.reshape(len(columns), n)


def hash_canonical_rows(columns: Sequence[Sequence[bytes]], seeds: Sequence[int], table_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``hash_canonical_columns``' keys [F, n] and their rows (int64 [F, n]) in hashed tables of ``table_rows``
    (uint64 [F, 1]) rows, as ``rows_of`` gives them: in the hashing pass itself where the extension is built."""
    table_rows = np.asarray(table_rows)
    if table_rows.shape != (len(columns), 1) or table_rows.dtype.kind not in "iu":
        raise ValueError(f"{len(columns)} columns but table rows of shape {table_rows.shape} and dtype {table_rows.dtype}: "
                         f"integers [{len(columns)}, 1] are needed")  # fmt: skip
    if table_rows.dtype.kind == "i" and (table_rows <= 0).any():  # unsigned (the encoder's): 0 is refused below
        raise ValueError(f"a table needs at least one row, got {table_rows.min()}")
    if _compiled is not None:
        return _compiled.hash_bytes_rows(columns, seeds, np.ascontiguousarray(table_rows, dtype=np.uint64))
    keys = hash_canonical_columns(columns, seeds)
    return keys, rows_of(keys, table_rows)


def rows_of(keys: np.ndarray, rows: int | np.ndarray) -> np.ndarray:
    """Row ids (int64) of keys in a hashed table of ``rows`` rows (or tables: an array broadcast against ``keys``)."""
    if isinstance(rows, np.ndarray):
        if (rows <= 0).any():
            raise ValueError(f"a table needs at least one row, got {rows.min()}")
        return (keys % rows.astype(np.uint64, copy=False)).astype(np.int64)
    if rows <= 0:
        raise ValueError(f"a table needs at least one row, got {rows}")
    return (keys % np.uint64(rows)).astype(np.int64)


def vocabulary_rows(keys: np.ndarray, sorted_vocabulary: np.ndarray) -> np.ndarray:
    """Row ids (int64) of keys in a collisionless table: known key i -> i + 1, else 0."""
    if sorted_vocabulary.size == 0:
        return np.zeros(keys.shape, dtype=np.int64)
    position = np.searchsorted(sorted_vocabulary, keys)
    clipped = np.minimum(position, sorted_vocabulary.size - 1)
    found = sorted_vocabulary[clipped] == keys
    return np.where(found, clipped + 1, 0).astype(np.int64)


def head_rows(keys: np.ndarray, head_keys: np.ndarray, head_start: int, hashed_rows: int) -> np.ndarray:
    """Row ids (int64) of keys in a hybrid table: a head key i -> ``head_start + i``, else ``key % hashed_rows``."""
    found = vocabulary_rows(keys, head_keys)
    return np.where(found > 0, head_start + found - 1, rows_of(keys, hashed_rows))


def spec_description() -> dict:
    """The spec as recorded in a bundle's manifest."""
    return {
        "version": SPEC_VERSION,
        "hash": "xxh3_64",
        "library": f"xxhash {xxhash.VERSION} (xxHash {xxhash.XXHASH_VERSION})",
        "canonical": "utf-8; missing (None, NaN, '', []) -> b''; bool -> true/false; "
        "integral floats -> integer digits; other floats -> repr",
        "seed": "xxh3_64(utf8(namespace) + b'#' + ascii(lookup), seed=0)",
        "key": "xxh3_64(canonical_bytes, seed)",
        "hashed_row": "key % rows",
        "vocabulary_row": "index of key in the sorted vocabulary + 1; unknown or missing -> 0",
        "head_row": "a feature with a head: key at index i of its sorted head keys -> head_start + i; "
        "else key % hashed_rows (the table's rows less its head rows)",
    }
