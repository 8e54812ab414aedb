"""Loading and validating bundles (numpy and ONNX Runtime only: the service needs no torch).

``load_bundle`` refuses a bundle whose format version it does not know, whose files are
missing, truncated or altered (size and sha256 of every file), whose row files do not
have the declared shape, or whose hashing test vectors this build does not reproduce.
Every refusal is a :class:`BundleError` naming the file and the reason.

Row files are by far the largest (gigabytes at Criteo scale), and a sha256 reads every
byte. ``load_bundle(path, defer_row_checks=True)`` maps them after checking their size and
shape only, and returns their sha256 checks as :class:`RowChecks`, which run on a thread
(hashlib releases the GIL): the caller decides what may happen before they pass (the
service: nothing is scored, ``/readyz`` answers 503). Either way a file's bytes are read once, by the first load
that checks them: a file that passes gets a verification stamp (``uembed/bundle/stamps.py``) that a restart or
another worker trusts while the file's device, inode, size, mtime and ctime are unchanged, so they map the files
without reading them (``verify="always"`` reads every file at every load). Without that read the page cache
fills as lookups fault their pages in.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uembed.bundle.codecs import (
    NUMPY_ROW_DTYPE,
    ROW_DTYPES,
    ROWWISE_BITS,
    SCALE_BIAS_BYTES,
    decode_rows,
    encode_records,
    row_width,
)
from uembed.bundle.format import FORMAT, FORMAT_VERSION
from uembed.bundle.stamps import Stamps
from uembed.contract.errors import BundleError, SpecError
from uembed.contract.features import FeatureSpec
from uembed.contract.hashing import SPEC_VERSION
from uembed.contract.known import KnownValues
from uembed.contract.plan import EmbeddingPlan

log = logging.getLogger("uembed.bundle")


@dataclass
class TableRows:
    """One table's rows, memory-mapped, in the codec its ``dtype`` names (``uembed/bundle/codecs.py``); ``gather``
    returns float32 rows. ``data`` is None for a bundle loaded with ``row_files=False`` (its rows live only in
    Redis, ``UEMBED_ROW_SOURCE=redis``): the table then has its shape, dtype and codebooks but no rows here."""

    name: str
    rows: int
    dim: int
    dtype: str
    data: np.ndarray | None
    scale_bias: np.ndarray | None = None  # float32 [rows, 2] of the rowwise codecs (int8, int4, int2)
    codebooks: np.ndarray | None = None  # float32 [M, 256, dim / M] of a pq table

    @property
    def files(self) -> bool:
        """Whether the rows are here, in the bundle's row files."""
        return self.data is not None

    @property
    def row_dtype(self) -> np.dtype:
        """The stored values' numpy dtype (uint8 codes for the int and pq codecs)."""
        return np.dtype(NUMPY_ROW_DTYPE[self.dtype])

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's stored values (a row of the row file)."""
        subvectors = None if self.codebooks is None else self.codebooks.shape[0]
        return row_width(self.dtype, self.dim, subvectors) * self.row_dtype.itemsize

    @property
    def record_bytes(self) -> int:
        """Bytes of one row as every tier stores it: its values, then for the rowwise codecs its float32 scale and bias."""
        return self.row_bytes + (SCALE_BIAS_BYTES if self.dtype in ROWWISE_BITS else 0)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows ``[*ids.shape, dim]`` of row ids of any shape."""
        flat = np.asarray(ids).reshape(-1)
        scale_bias = self.scale_bias[flat] if self.scale_bias is not None else None
        rows = decode_rows(self.data[flat], self.dtype, self.dim, scale_bias, self.codebooks)
        return rows.reshape(*np.shape(ids), self.dim)

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows ``[k, dim]`` as this table's records (row updates in its codec, with its codebooks)."""
        return encode_records(rows, self.dtype, self.codebooks)

    @property
    def nbytes(self) -> int:
        """Bytes of the table's rows (the row files' arrays, whether or not they are here) and codebooks."""
        return int(self.rows * self.record_bytes) + (0 if self.codebooks is None else int(self.codebooks.nbytes))

    def resident_bytes(self) -> int:
        """Bytes of the mapped row files now in memory (the page cache, shared by every process mapping them)."""
        if not self.files:
            return 0
        arrays = [self.data] if self.scale_bias is None else [self.data, self.scale_bias]
        return sum(resident_bytes(array) for array in arrays)


PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _page_span(array: np.ndarray) -> tuple[int, int]:
    start = array.ctypes.data // PAGE * PAGE
    return start, array.ctypes.data + array.nbytes - start


def advise(array: np.ndarray, advice: int = mmap.MADV_RANDOM) -> None:
    """madvise(2) on a mapped array. MADV_RANDOM (the loader's, for row files): a page fault reads its page,
    not the device's read-ahead window (8 MiB on some disks), which a lookup of scattered rows would waste
    on rows nobody asked for. MADV_SEQUENTIAL: for a reader that goes through a whole file."""
    if array.nbytes:
        start, length = _page_span(array)
        if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) != 0:
            log.warning("madvise(%d) failed: %s", advice, os.strerror(ctypes.get_errno()))


def resident_bytes(array: np.ndarray) -> int:
    """Bytes of ``array``'s pages in memory, by mincore(2): for a memory-mapped file, how much of it is cached
    (whoever read it); for an ordinary array, its resident pages. Whole pages, so up to a page over nbytes."""
    if array.nbytes == 0:
        return 0
    start, length = _page_span(array)
    pages = (length + PAGE - 1) // PAGE
    flags = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), flags) != 0:
        raise OSError(ctypes.get_errno(), f"mincore: {os.strerror(ctypes.get_errno())}")
    return int(np.count_nonzero(np.frombuffer(flags, dtype=np.uint8) & 1)) * PAGE


@dataclass
class Bundle:
    path: Path
    manifest: dict
    plan: EmbeddingPlan
    feature_specs: dict[str, FeatureSpec]
    tables: dict[str, TableRows]
    bias: np.ndarray  # float32 [n bias columns], added at plan.bias_columns()
    known_values: dict[str, KnownValues] = field(default_factory=dict)  # feature -> values seen in training
    # Deferred checks that gate scoring: the row files' sha256 (RowChecks; None: all checked at load), or for rows
    # that live only in Redis their completion marker (uembed/serving/rows/published.py, set by the service).
    row_checks: RowChecks | None = None

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def dense_path(self) -> Path:
        return self.path / self.manifest["dense"]["file"]


class RowChecks:
    """The sha256 checks of a bundle's row files, run once on a thread: progress, outcome, a wait."""

    CHUNK = 8 << 20
    what = "row files"  # what the checks are of, in the service's not-ready messages

    def __init__(self, root: Path, entries: list[dict], stamps: Stamps, then: Callable[[], None] | None = None) -> None:
        self.root = root
        self.entries = entries
        self.stamps = stamps  # a file verified before (by any worker or load) is not read again
        self.then = then  # what checks the rows once their bytes are known good (the tables' test rows)
        self.total_bytes = sum(e["bytes"] for e in entries)
        self.checked_bytes = 0
        self.error: BundleError | None = None
        self.failed_file: str | None = None
        self.seconds: float | None = None
        self.done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RowChecks:
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="uembed-row-checks", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        started = time.perf_counter()
        try:
            for entry in self.entries:
                if not self.stamps.verify(entry["file"], entry["sha256"], self.CHUNK, self._checked):
                    self.failed_file = entry["file"]
                    raise BundleError(f"bundle {self.root}: file {entry['file']} fails its sha256 checksum (corrupt or altered bytes)")
            if self.then is not None:
                self.then()
        except BundleError as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001 - whatever stops the check must fail it, never leave it running
            self.error = BundleError(f"bundle {self.root}: checking its row files failed: {type(exc).__name__}: {exc}")
        finally:
            self.seconds = time.perf_counter() - started
            if self.error is None:
                log.info("bundle %s: %d row files (%.2f GB) pass their sha256 checks in %.1fs",
                         self.root, len(self.entries), self.total_bytes / 1e9, self.seconds)  # fmt: skip
            else:
                log.error("%s", self.error)
            self.done.set()

    def _checked(self, count: int) -> None:
        self.checked_bytes += count

    @property
    def passed(self) -> bool:
        return self.done.is_set() and self.error is None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def wait(self, timeout_s: float | None = None) -> None:
        """Run the checks here if nobody started them; raise the BundleError of a failed one, or TimeoutError."""
        if self._thread is None and not self.done.is_set():
            self._thread = threading.current_thread()
            self.run()
        if not self.done.wait(timeout_s):
            raise TimeoutError(f"row checks of {self.root}: {self.describe()} after {timeout_s}s")
        if self.error is not None:
            raise self.error

    def describe(self) -> str:
        """For clients: the progress, or which file failed (no server paths; the log has the whole error)."""
        if self.error is not None:
            return f"failed: {self.failed_file or 'the row files'} did not pass its sha256 check (see the service log)"
        if self.done.is_set():
            return "passed"
        return f"checking: {self.checked_bytes / 1e9:.2f} of {self.total_bytes / 1e9:.2f} GB"


def _check_file(root: Path, entry: dict, stamps: Stamps | None) -> Path:
    """Check a file's presence and size, and with ``stamps`` its sha256 (None: left to the caller, e.g. RowChecks)."""
    relative = entry.get("file", "?")
    path = root / relative
    if not path.is_file():
        raise BundleError(f"bundle {root}: file {relative} is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        state = "truncated" if size < entry["bytes"] else "larger than recorded"
        raise BundleError(f"bundle {root}: file {relative} is {state} ({size} bytes, manifest says {entry['bytes']})")
    expected = entry["sha256"]  # recorded even when the check is left for later
    if stamps is not None and not stamps.verify(relative, expected):
        raise BundleError(f"bundle {root}: file {relative} fails its sha256 checksum (corrupt or altered bytes)")
    return path


def _load_array(root: Path, entry: dict, dtype: str, shape: tuple[int, ...], stamps: Stamps | None) -> np.ndarray:
    path = _check_file(root, entry, stamps)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise BundleError(f"bundle {root}: file {entry['file']} is not a readable .npy array: {exc}") from exc
    if array.dtype != np.dtype(dtype) or array.shape != shape:
        raise BundleError(
            f"bundle {root}: file {entry['file']} holds {array.dtype} {array.shape}, manifest says {dtype} {shape}"
        )
    return array


def _load_codebooks(root: Path, entry: dict, stamps: Stamps) -> np.ndarray:
    """A pq table's codebooks, float32 ``[M, 256, dim / M]``, checked against the manifest (always read whole)."""
    subvectors, dim = entry.get("subvectors"), entry["dim"]
    if not isinstance(subvectors, int) or subvectors < 1 or dim % subvectors or not entry.get("codebooks"):
        raise BundleError(f"bundle {root}: pq table {entry['name']!r} needs subvectors dividing its dim {dim} and a codebooks file")
    return np.asarray(_load_array(root, entry["codebooks"], "float32", (subvectors, 256, dim // subvectors), stamps))


def _check_test_rows(root: Path, table: TableRows, test_rows: list[dict]) -> None:
    """Decode the rows whose floats the manifest records: a build that decodes the codec otherwise is refused."""
    for test in test_rows:
        got = table.gather(np.array([test["row"]], dtype=np.int64))[0]
        if not np.array_equal(got, np.asarray(test["values"], dtype=np.float32)):
            raise BundleError(
                f"bundle {root}: table {table.name!r} row {test['row']} decodes ({table.dtype}) to other floats here than its "
                f"test row in manifest.json: this build decodes the codec differently (or the row file changed), refusing to serve"
            )


def what_it_is(folder: Path) -> str:
    """What a folder given as a bundle holds instead, and the command that gets a bundle from it."""
    if (folder / "checkpoint.pt").is_file():
        return f"; it is a training run: export it first (uembed export {folder})"
    versions = sorted((child.name for child in folder.iterdir() if (child / "manifest.json").is_file()),
                      key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))  # fmt: skip
    if versions:
        return f"; it holds the versions {', '.join(versions)} of a model: serve one, e.g. {folder / versions[-1]}"
    return ""


def read_manifest(root: Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle: no such directory")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: it has no manifest.json{what_it_is(root)}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {root}: manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{root} is not a bundle: manifest.json does not declare format {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle {root}: manifest.json has format version {manifest.get('format_version')!r}; "
            f"this build reads version {FORMAT_VERSION}"
        )
    if manifest.get("hashing", {}).get("version") != SPEC_VERSION:
        raise BundleError(f"bundle {root}: hashing spec {manifest.get('hashing', {}).get('version')!r} is not {SPEC_VERSION!r}")
    return manifest


def filing(path: str | Path, store: str | Path | None = None) -> tuple[str, str] | None:
    """The (model, version) a folder is filed as in a bundle store, ``<store>/<name>/<version>``: given ``store``,
    when the folder sits directly in it; None elsewhere (a folder of any name, given by path)."""
    folder = Path(os.path.abspath(path))
    if store is not None and folder.parent.parent == Path(os.path.abspath(store)):
        return folder.parent.name, folder.name
    return None


def check_filing(root: Path, manifest: dict, filed_as: tuple[str, str] | None) -> None:
    """A request naming a version must get that version's scores, so a bundle filed as ``<name>/<version>`` must
    be that model's version by its manifest. ``filed_as`` None: a folder given by path, held to its place only
    when it sits in a store's layout (its parent named for its model)."""
    name, version = str(manifest.get("name")), str(manifest.get("version"))
    if filed_as is None:
        if Path(os.path.abspath(root)).parent.name != name:
            return
        filed_as = (name, Path(os.path.abspath(root)).name)
    if (name, version) != tuple(filed_as):
        raise BundleError(
            f"bundle {root}: its manifest.json says model {name!r} version {version!r}, but it is filed as "
            f"{filed_as[0]}/{filed_as[1]}; a bundle store's <name>/<version> folder must hold that model's version "
            "(move the folder, or export the bundle as that version)"
        )


def load_bundle(path: str | Path, defer_row_checks: bool = False, row_files: bool = True,
                filed_as: tuple[str, str] | None = None, verify: str = "once") -> Bundle:  # fmt: skip
    """Validate every file of a bundle and return it ready to score; with ``defer_row_checks`` the row
    files' sha256 checks are left to ``bundle.row_checks`` (not started: call ``start()`` or ``wait()``).
    With ``row_files=False`` the row files are neither needed nor read (rows that live only in Redis,
    published by ``uembed publish``): every other file is checked as always, and the tables have no rows.
    ``filed_as``: the (model, version) the folder is filed as in a bundle store, which its manifest must name
    (``check_filing``). ``verify``: ``once`` trusts a file's verification stamp where its key still matches (its
    sha256 read once per file, ``uembed/bundle/stamps.py``), ``always`` reads every file's bytes."""
    root = Path(path)
    manifest = read_manifest(root)
    check_filing(root, manifest, filed_as)
    try:
        return _load(root, manifest, defer_row_checks, row_files, verify)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"bundle {root}: manifest.json is incomplete or malformed ({type(exc).__name__}: {exc})") from exc


def _load(root: Path, manifest: dict, defer_row_checks: bool, row_files: bool, verify: str) -> Bundle:
    stamps = Stamps(root, verify)
    row_stamps = None if defer_row_checks else stamps
    vocabularies = {}
    heads = {}
    known = {}
    specs = {}
    bias_parts = []
    for feature in manifest["features"]:
        specs[feature["name"]] = FeatureSpec.from_dict(feature)
        if feature.get("vocabulary"):
            entry = feature["vocabulary"]
            vocabularies[feature["name"]] = np.asarray(_load_array(root, entry, "uint64", (entry["size"],), stamps))
        if feature.get("head"):
            entry = feature["head"]
            heads[feature["name"]] = np.asarray(_load_array(root, entry, "uint64", (entry["size"],), stamps))
        if feature.get("known"):
            entry = feature["known"]
            if entry.get("hashes") != KnownValues.HASHES:
                raise BundleError(f"bundle {root}: known/{feature['name']}.npy uses {entry.get('hashes')} hashes, this build {KnownValues.HASHES}")
            bits = np.asarray(_load_array(root, entry, "uint8", ((entry["bits"] + 7) // 8,), stamps))
            try:
                known[feature["name"]] = KnownValues.from_arrays(np.ascontiguousarray(bits), entry["bits"])
            except ValueError as exc:
                raise BundleError(f"bundle {root}: known/{feature['name']}.npy: {exc}") from exc
        if feature.get("bias") is not None:
            bias_parts.append(np.asarray(feature["bias"], dtype=np.float32))
    try:
        plan = EmbeddingPlan.from_dict(manifest["embedding"], vocabularies, heads)
    except SpecError as exc:
        raise BundleError(f"bundle {root}: manifest.json: {exc}") from exc

    tables = {}
    deferred = []
    for entry in manifest["tables"]:
        dtype = entry["dtype"]
        if dtype not in ROW_DTYPES:
            raise BundleError(f"bundle {root}: table {entry['name']!r} has row dtype {dtype!r}; this build reads {', '.join(ROW_DTYPES)}")
        codebooks = _load_codebooks(root, entry, stamps) if dtype == "pq" else None  # small, and needed with rows only in Redis
        if not row_files:
            tables[entry["name"]] = TableRows(entry["name"], entry["rows"], entry["dim"], dtype, None, codebooks=codebooks)
            continue
        shape = (entry["rows"], row_width(dtype, entry["dim"], entry.get("subvectors")))
        data = _load_array(root, entry, NUMPY_ROW_DTYPE[dtype], shape, row_stamps)
        deferred.append(entry)
        scale_bias = None
        if dtype in ROWWISE_BITS:
            scale_bias = _load_array(root, entry["scale_bias"], "float32", (entry["rows"], 2), row_stamps)
            deferred.append(entry["scale_bias"])
        for array in (data, scale_bias) if scale_bias is not None else (data,):
            advise(array, mmap.MADV_RANDOM)
        tables[entry["name"]] = TableRows(entry["name"], entry["rows"], entry["dim"], dtype, data, scale_bias, codebooks)
    for table in plan.tables:
        if table.name not in tables:
            raise BundleError(f"bundle {root}: table {table.name!r} of the embedding plan has no row file")

    _check_file(root, manifest["dense"], stamps)
    split = manifest["dense"].get("context_split")
    for part in ("context", "rest", "flat") if split else ():
        if part in split or part != "flat":  # flat: optional (written since the parts in one model were)
            _check_file(root, split[part], stamps)
    if manifest.get("full_model"):
        for kind in ("onnx", "torchscript"):
            _check_file(root, manifest["full_model"][kind], stamps)

    features = {f.name: f for f in plan.features}
    for vector in manifest["hashing"]["test_vectors"]:
        feature = features[vector["feature"]]
        value = vector["value"].encode("utf-8", "surrogateescape")
        rows = [int(plan.rows_of_values(feature, lookup, [value])[0]) for lookup in feature.lookups]
        if rows != vector["rows"]:
            raise BundleError(
                f"bundle {root}: hashing test vector {vector['feature']}={vector['value']!r} gives rows {rows} "
                f"here but {vector['rows']} in manifest.json: this build hashes differently, refusing to serve"
            )
    bias = np.concatenate(bias_parts) if bias_parts else np.zeros(0, dtype=np.float32)
    if bias.size != plan.bias_columns().size:
        raise BundleError(f"bundle {root}: manifest.json has {bias.size} bias values, the plan needs {plan.bias_columns().size}")
    test_rows = {entry["name"]: entry.get("test_rows", []) for entry in manifest["tables"]}

    def check_test_rows() -> None:
        for name, table in tables.items():
            _check_test_rows(root, table, test_rows[name])

    row_checks = None
    if row_files and defer_row_checks:
        row_checks = RowChecks(root, deferred, stamps, then=check_test_rows)  # a changed row file is named by its sha256 first
    elif row_files:
        check_test_rows()
    return Bundle(root, manifest, plan, specs, tables, bias, known, row_checks)
