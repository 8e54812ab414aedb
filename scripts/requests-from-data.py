"""/v1/score bodies from a data set's rows, for the service's benchmarks on bundles other than the demo's
(``scripts/ab-service.py --bundle B --requests R.jsonl``): each line ``{"examples": [...]}``, ``--examples`` rows each,
the features of the data set's spec (its label left out), a missing value as null.

    .venv/bin/python scripts/requests-from-data.py DATA_DIR --out requests.jsonl [--requests 200] [--examples 64]

DATA_DIR is a folder of Parquet shards with its spec.toml (``uembed data synth``'s output).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import orjson
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uembed.contract.features import load_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--examples", type=int, default=64, help="examples a request")
    args = parser.parse_args()
    columns = {spec.name: spec.column or spec.name for spec in load_spec(args.data / "spec.toml").features}
    shard = sorted(args.data.glob("*.parquet"))[0]
    table = pq.read_table(shard, columns=sorted(set(columns.values()))).slice(0, args.requests * args.examples).to_pylist()
    if len(table) < args.requests * args.examples:
        raise SystemExit(f"{shard} holds {len(table)} rows; {args.requests} x {args.examples} asked for")
    clean = lambda value: None if isinstance(value, float) and math.isnan(value) else value  # noqa: E731
    with args.out.open("wb") as out:
        for start in range(0, len(table), args.examples):
            examples = [{name: clean(row[column]) for name, column in columns.items()} for row in table[start : start + args.examples]]
            out.write(orjson.dumps({"examples": examples}) + b"\n")
    print(f"wrote {args.requests} requests of {args.examples} examples to {args.out}")


if __name__ == "__main__":
    main()
