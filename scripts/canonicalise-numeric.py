"""A Criteo-shaped request's canonicalise stage (13 numeric features bucketised by 16 boundaries, 26 categorical ids),
in process: numeric columns in one compiled pass (``numeric_column``) beside the checked path value by value, with
and without the value cache, the best of five passes, all in one run. Run it alone.

    .venv/bin/python scripts/canonicalise-numeric.py [--examples 500] [--out numeric.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uembed.bundle.synthetic import synthetic_plan  # noqa: E402
from uembed.contract import hashing  # noqa: E402
from uembed.contract.features import FeatureSpec  # noqa: E402
from uembed.serving.pipeline.encoding import ExampleEncoder  # noqa: E402
from uembed.serving.pipeline.values import ValueLimits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not hashing.compiled_available():
        raise SystemExit("the compiled hashing extension is not built (make install)")
    hashing.use_backend("compiled")
    specs = {f"I{i}": FeatureSpec(f"I{i}", kind="numeric", boundaries=tuple(float(2**k) for k in range(16))) for i in range(1, 14)}
    specs |= {f"C{i}": FeatureSpec(f"C{i}") for i in range(1, 27)}
    plan = synthetic_plan(list(specs.values()), 100_000, 16, 1, ())
    rng = random.Random(0)
    examples = [{**{f"I{i}": rng.choice([None, rng.randrange(0, 5000), rng.uniform(0, 5000)]) for i in range(1, 14)},
                 **{f"C{i}": f"{rng.randrange(2**32):08x}" for i in range(1, 27)}} for _ in range(args.examples)]  # fmt: skip
    compiled_pass = hashing._fasthash.numeric_column
    results = {}
    for way in ("numeric columns in one compiled pass", "numeric values checked one by one"):
        hashing._fasthash.numeric_column = compiled_pass if way.startswith("numeric columns") else (lambda *args: None)
        for cache_bytes in (0, 64 << 20):
            encoder = ExampleEncoder(specs, plan, ValueLimits(), cache_bytes, {})
            encoder.canonicalise(examples)  # the cache filled, as by the requests before
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                encoder.canonicalise(examples)
                best = min(best, time.perf_counter() - started)
            name = f"{way}, value cache {'off' if not cache_bytes else '64 MiB'}"
            results[name] = round(best * 1e3, 3)
            print(f"{best * 1e3:8.2f} ms  {name}")
    hashing._fasthash.numeric_column = compiled_pass
    if args.out:
        args.out.write_text(json.dumps({"milliseconds_a_request": results, "examples": args.examples}, indent=1))


if __name__ == "__main__":
    main()
