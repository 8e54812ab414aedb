"""int2's range search (``uembed/bundle/codecs.py``: ``quantisation_range``), compiled and in numpy's passes, side by
side in one run: seconds for ``--rows`` random rows of ``--dim`` values, each way in turn for ``--rounds`` rounds, the
median of each, their ratio, and the whole rowwise quantiser (``quantise_rows``) each way, int8's beside it; then the
compiled search in each of its builds this machine runs (baseline x86-64, AVX2, AVX-512: ``_ranges_kernel.h``), in
turn, each over the baseline's. Every search must give the same bits (checked on every round). Run it alone.

    .venv/bin/python scripts/range-search-bench.py --rows 1000000 --dim 32 --rounds 3 [--out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uembed.bundle import codecs  # noqa: E402


def timed(work) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args()
    compiled = codecs._ranges
    if compiled is None:
        parser.error("the extension uembed.bundle._ranges is not built or UEMBED_PURE_PYTHON is set (make install)")
    rows = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float32)
    seconds: dict[str, list[float]] = {"search_compiled": [], "search_numpy": [], "int2_compiled": [], "int2_numpy": [],
                                       "int8": []}  # fmt: skip
    builds = compiled.instruction_sets()
    seconds |= {f"search_{build}": [] for build in builds}
    for _ in range(args.rounds):
        spent, ours = timed(lambda: codecs.quantisation_range(rows, 2))
        seconds["search_compiled"].append(spent)
        codecs._ranges = None
        try:
            spent, numpys = timed(lambda: codecs.quantisation_range(rows, 2))
            seconds["search_numpy"].append(spent)
            seconds["int2_numpy"].append(timed(lambda: codecs.quantise_rows(rows, 2))[0])
        finally:
            codecs._ranges = compiled
        if not all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(ours, numpys)):
            raise SystemExit("the compiled search and numpy's passes disagree")
        seconds["int2_compiled"].append(timed(lambda: codecs.quantise_rows(rows, 2))[0])
        seconds["int8"].append(timed(lambda: codecs.quantise_rows(rows, 8))[0])
        for build in builds:
            spent, theirs = timed(lambda: compiled.search_ranges(rows, 2, *codecs.RANGE_SEARCH[2], build))
            seconds[f"search_{build}"].append(spent)
            if not all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(theirs, numpys)):
                raise SystemExit(f"the compiled search's {build} build and numpy's passes disagree")
    medians = {name: round(statistics.median(values), 3) for name, values in seconds.items()}
    figures = {"rows": args.rows, "dim": args.dim, "rounds": args.rounds, "builds": builds, "median_s": medians,
               "search_numpy_over_compiled": round(medians["search_numpy"] / medians["search_compiled"], 2),
               "int2_quantise_numpy_over_compiled": round(medians["int2_numpy"] / medians["int2_compiled"], 2),
               "int2_over_int8_compiled": round(medians["int2_compiled"] / medians["int8"], 2),
               "int2_over_int8_numpy": round(medians["int2_numpy"] / medians["int8"], 2),
               "search_baseline_over_build": {build: round(medians["search_baseline"] / medians[f"search_{build}"], 2)
                                              for build in builds}}  # fmt: skip
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
