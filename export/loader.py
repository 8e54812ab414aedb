"""Loading and validating bundles (numpy and ONNX Runtime only: the service needs no torch).

``load_bundle`` refuses a bundle whose format version it does not know, whose files are
missing, truncated or altered (size and sha256 of every file), whose row files do not
have the declared shape, or whose hashing test vectors this build does not reproduce.
Every refusal is a :class:`BundleError` naming the file and the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.format import FORMAT, FORMAT_VERSION, NUMPY_ROW_DTYPE, sha256_file
from model.errors import BundleError
from model.features import FeatureSpec
from model.hashing import SPEC_VERSION
from model.known import KnownValues
from model.plan import EmbeddingPlan


@dataclass
class TableRows:
    """One table's rows, memory-mapped; ``gather`` returns float32 rows."""

    name: str
    rows: int
    dim: int
    dtype: str
    data: np.ndarray
    scale_bias: np.ndarray | None = None

    def gather(self, ids: np.ndarray) -> np.ndarray:
        picked = self.data[ids]
        if self.dtype == "int8":
            scale_bias = self.scale_bias[ids]
            return picked.astype(np.float32) * scale_bias[..., :1] + scale_bias[..., 1:]
        return picked.astype(np.float32, copy=False)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + (self.scale_bias.nbytes if self.scale_bias is not None else 0))


@dataclass
class Bundle:
    path: Path
    manifest: dict
    plan: EmbeddingPlan
    feature_specs: dict[str, FeatureSpec]
    tables: dict[str, TableRows]
    bias: np.ndarray  # float32 [n bias columns], added at plan.bias_columns()
    known_values: dict[str, KnownValues] = field(default_factory=dict)  # feature -> values seen in training

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def dense_path(self) -> Path:
        return self.path / self.manifest["dense"]["file"]


def _check_file(root: Path, entry: dict) -> Path:
    relative = entry.get("file", "?")
    path = root / relative
    if not path.is_file():
        raise BundleError(f"bundle {root}: file {relative} is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        state = "truncated" if size < entry["bytes"] else "larger than recorded"
        raise BundleError(f"bundle {root}: file {relative} is {state} ({size} bytes, manifest says {entry['bytes']})")
    if sha256_file(path) != entry["sha256"]:
        raise BundleError(f"bundle {root}: file {relative} fails its sha256 checksum (corrupt or altered bytes)")
    return path


def _load_array(root: Path, entry: dict, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    path = _check_file(root, entry)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise BundleError(f"bundle {root}: file {entry['file']} is not a readable .npy array: {exc}") from exc
    if array.dtype != np.dtype(dtype) or array.shape != shape:
        raise BundleError(
            f"bundle {root}: file {entry['file']} holds {array.dtype} {array.shape}, manifest says {dtype} {shape}"
        )
    return array


def read_manifest(root: Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle: no such directory")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: it has no manifest.json")
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


def load_bundle(path: str | Path) -> Bundle:
    """Validate every file of a bundle and return it ready to score."""
    root = Path(path)
    manifest = read_manifest(root)
    try:
        return _load(root, manifest)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"bundle {root}: manifest.json is incomplete or malformed ({type(exc).__name__}: {exc})") from exc


def _load(root: Path, manifest: dict) -> Bundle:
    vocabularies = {}
    known = {}
    specs = {}
    bias_parts = []
    for feature in manifest["features"]:
        specs[feature["name"]] = FeatureSpec.from_dict(feature)
        if feature.get("vocabulary"):
            entry = feature["vocabulary"]
            vocabularies[feature["name"]] = np.asarray(_load_array(root, entry, "uint64", (entry["size"],)))
        if feature.get("known"):
            entry = feature["known"]
            if entry.get("hashes") != KnownValues.HASHES:
                raise BundleError(f"bundle {root}: known/{feature['name']}.npy uses {entry.get('hashes')} hashes, this build {KnownValues.HASHES}")
            bits = np.asarray(_load_array(root, entry, "uint8", ((entry["bits"] + 7) // 8,)))
            try:
                known[feature["name"]] = KnownValues.from_arrays(np.ascontiguousarray(bits), entry["bits"])
            except ValueError as exc:
                raise BundleError(f"bundle {root}: known/{feature['name']}.npy: {exc}") from exc
        if feature.get("bias") is not None:
            bias_parts.append(np.asarray(feature["bias"], dtype=np.float32))
    plan = EmbeddingPlan.from_dict(manifest["embedding"], vocabularies)

    tables = {}
    for entry in manifest["tables"]:
        shape = (entry["rows"], entry["dim"])
        data = _load_array(root, entry, NUMPY_ROW_DTYPE[entry["dtype"]], shape)
        scale_bias = None
        if entry["dtype"] == "int8":
            scale_bias = np.asarray(_load_array(root, entry["scale_bias"], "float32", (entry["rows"], 2)))
        tables[entry["name"]] = TableRows(entry["name"], entry["rows"], entry["dim"], entry["dtype"], data, scale_bias)
    for table in plan.tables:
        if table.name not in tables:
            raise BundleError(f"bundle {root}: table {table.name!r} of the embedding plan has no row file")

    _check_file(root, manifest["dense"])
    if manifest.get("full_model"):
        for kind in ("onnx", "torchscript"):
            _check_file(root, manifest["full_model"][kind])

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
    return Bundle(root, manifest, plan, specs, tables, bias, known)
