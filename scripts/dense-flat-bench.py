"""A flat batch's dense stage on a split bundle: the two parts in one model (``dense_flat.onnx``) against the two parts
called one after the other (what a bundle exported without it runs), side by side in one process.

    .venv/bin/python scripts/dense-flat-bench.py [BUNDLE] [--requests 1 4 16] [--batches 300] [--rounds 3] [--out F.json]

Scores real 64-example MovieLens requests in process (no HTTP, no event loop) on the demo bundle by default:
canonicalise, then ``score_batch`` of ``--requests`` requests at once, back to back, the two ways taking turns each
round (the flat model, then the two parts, then the other order the next round). Prints, per batch size, the
microseconds a batch of the dense stage and of the whole ``score_batch``, each way, the median of the rounds, and the
ratio two parts over one model; checks that both ways give the same floats. Run it alone: it times the machine too.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from uembed.loadtest.load import movielens_requests
from uembed.serving.engine import ScoringEngine
from uembed.serving.settings import load_settings


def timed(runtime, parts: list, batches: int) -> tuple[float, float]:
    """Microseconds a batch of the dense stage and of ``score_batch``, over ``batches`` batches of ``parts``."""
    dense = total = 0.0
    for _ in range(batches):
        started = time.perf_counter()
        _, times = runtime.score_batch(parts)
        total += time.perf_counter() - started
        dense += times.dense
    return dense / batches * 1e6, total / batches * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, nargs="?", default=Path("bundles/movielens100k/1"))
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16], help="requests a batch")
    parser.add_argument("--examples", type=int, default=64, help="examples a request")
    parser.add_argument("--batches", type=int, default=300, help="batches a size a way a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.bundle.exists():
        parser.error(f"{args.bundle}: no such bundle; `uembed demo-bundle` builds the default one")
    runtime = ScoringEngine(load_settings()).registry.open(args.bundle)
    dense_parts = runtime.dense_parts
    one_model = dense_parts.flat_session if dense_parts is not None else None
    if one_model is None:
        parser.error(f"{args.bundle}: no dense_flat.onnx in use (a bundle exported without a context split, or "
                     "before the flat model was written); `uembed demo-bundle` exports the default one with it")  # fmt: skip
    requests = movielens_requests(args.examples, 200)
    ways = {"one_model": one_model, "two_parts": None}
    results: dict = {}
    for size in args.requests:
        parts = [runtime.canonicalise(requests[i % len(requests)]) for i in range(size)]
        scores = {}
        for way, session in ways.items():
            dense_parts.flat_session = session
            scores[way] = runtime.score_batch(parts)[0]
            timed(runtime, parts, 30)  # warm-up
        if not np.array_equal(scores["one_model"], scores["two_parts"]):
            raise SystemExit(f"{size} requests: the two ways score differently")
        rounds: dict[str, list] = {way: [] for way in ways}
        for r in range(args.rounds):
            for way in list(ways) if r % 2 == 0 else list(ways)[::-1]:
                dense_parts.flat_session = ways[way]
                rounds[way].append(timed(runtime, parts, args.batches))
        medians = {way: {"dense_us": round(statistics.median(d for d, _ in runs), 1),
                         "score_batch_us": round(statistics.median(t for _, t in runs), 1)} for way, runs in rounds.items()}  # fmt: skip
        medians["two_parts_over_one_model"] = {
            stage: round(medians["two_parts"][stage] / medians["one_model"][stage], 3) for stage in ("dense_us", "score_batch_us")
        }
        results[f"{size} x {args.examples}"] = medians
        print(f"{size} requests of {args.examples}:", json.dumps(medians))
    dense_parts.flat_session = one_model
    if args.out:
        meta = {"bundle": str(args.bundle), "examples": args.examples, "batches": args.batches, "rounds": args.rounds}
        args.out.write_text(json.dumps({"settings": meta, "results": results}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
