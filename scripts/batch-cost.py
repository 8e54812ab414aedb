"""What a request costs each stage of the pipeline alone in its batch against in a batch of several: a batch's fixed work.

    .venv/bin/python scripts/batch-cost.py [BUNDLE] [--sizes 1 2 4 8 16] [--batches 400] [--rounds 2] [--out F.json]

At half load the service's requests come one at a time, so each is its own batch; at saturation a batch holds about
sixteen. This scores real 64-example MovieLens requests in process (no HTTP, no event loop): canonicalise each
request, then ``score_batch`` of ``size`` requests at once, back to back, the sizes taking turns each round. Prints,
per size, the microseconds a request of canonicalise and of each stage (hash, lookup, assemble, dense: the stage times
``score_batch`` reports), the median of the rounds; and each stage's fixed work a batch and work a request, from the
smallest and largest sizes (time a batch = fixed + size x a request). Run it alone: it times the machine too.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from uembed.loadtest.load import movielens_requests
from uembed.serving.engine import ScoringEngine
from uembed.serving.settings import load_settings

STAGES = ("canonicalise", "hash", "lookup", "assemble", "dense")


def per_request(runtime, requests: list, size: int, batches: int) -> dict[str, float]:
    """Microseconds a request of each stage, over ``batches`` batches of ``size`` requests."""
    totals = dict.fromkeys((*STAGES, "total"), 0.0)
    for b in range(batches):
        chosen = [requests[(b * size + i) % len(requests)] for i in range(size)]
        started = time.perf_counter()
        parts = [runtime.canonicalise(examples) for examples in chosen]
        canonical = time.perf_counter()
        _, times = runtime.score_batch(parts)
        totals["total"] += time.perf_counter() - started
        totals["canonicalise"] += canonical - started
        for stage in STAGES[1:]:
            totals[stage] += getattr(times, stage)
    return {stage: seconds / (batches * size) * 1e6 for stage, seconds in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, nargs="?", default=Path("bundles/movielens100k/1"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="requests a batch")
    parser.add_argument("--examples", type=int, default=64, help="examples a request")
    parser.add_argument("--batches", type=int, default=400, help="batches a size a round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.bundle.exists():
        parser.error(f"{args.bundle}: no such bundle; `uembed demo-bundle` builds the default one")
    runtime = ScoringEngine(load_settings()).registry.open(args.bundle)
    requests = movielens_requests(args.examples, 200)
    per_request(runtime, requests, max(args.sizes), 50)  # warm-up: caches, the allocator, ONNX Runtime
    rounds = {size: [] for size in args.sizes}
    for _ in range(args.rounds):
        for size in args.sizes:
            rounds[size].append(per_request(runtime, requests, size, args.batches))
    medians = {size: {stage: round(statistics.median(r[stage] for r in runs), 1) for stage in runs[0]}
               for size, runs in rounds.items()}  # fmt: skip
    small, large = min(args.sizes), max(args.sizes)
    split = {}
    for stage in (*STAGES, "total"):  # us a batch of n = fixed + n x each: two sizes give both
        a, b = medians[small][stage] * small, medians[large][stage] * large
        each = (b - a) / (large - small) if large > small else float("nan")
        split[stage] = {"fixed_us_a_batch": round(a - small * each, 1), "us_a_request": round(each, 1)}
    result = {"bundle": str(args.bundle), "examples_a_request": args.examples, "batches": args.batches,
              "rounds": args.rounds, "us_a_request_by_batch_size": medians, "fixed_and_per_request": split,
              "alone_over_largest": round(medians[small]["total"] / medians[large]["total"], 2)}  # fmt: skip
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
