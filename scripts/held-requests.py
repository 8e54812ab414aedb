"""What holding decoded requests costs the ones that follow: the service's request work in one process, with the last
K requests' decoded JSON kept alive (as requests waiting for their batch kept theirs until 194b9b2) or freed at once.

    .venv/bin/python scripts/held-requests.py [--bundle B] [--held 0 16 32] [--rounds 8] [--requests 4000] [--out F.json]

Each request is what the fast lane does with a 64-example MovieLens body: msgspec decodes it (``LeanBody``), the
bundle's canonicaliser reads it, and every 8 requests are scored as one batch and their replies encoded. With
``--held K`` the decoded bodies of the last K requests stay referenced (a ring), as 16 connections' requests stay
while they wait; with 0 each is freed as soon as it is canonicalised. The settings take turns within each round;
prints the process CPU a request for each and the medians over the rounds. Run it alone.
"""

import argparse
import collections
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import orjson

from uembed.loadtest.load import movielens_requests, scoring_runtime
from uembed.serving.protocols.lean_json import LeanBody

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8


def cpu_a_request(runtime, decoder: LeanBody, bodies: list[bytes], requests: int, held: int) -> float:
    """Process CPU microseconds a request over ``requests`` requests, the last ``held`` decoded bodies kept."""
    ring = collections.deque(maxlen=held) if held else None
    started = time.process_time()
    for first in range(0, requests, BATCH):
        parts = []
        for index in range(first, first + BATCH):
            request = decoder.decode(bodies[index % len(bodies)])
            parts.append(runtime.canonicalise(request.examples))
            if ring is not None:
                ring.append(request)
        scores, _ = runtime.score_batch(parts)
        for part in np.split(np.asarray(scores, dtype=np.float32).reshape(-1), BATCH):
            orjson.dumps({"scores": part}, option=orjson.OPT_SERIALIZE_NUMPY)
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles/movielens100k/1")
    parser.add_argument("--held", type=int, nargs="+", default=[0, 16, 32], help="decoded requests kept alive")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4000, help="requests a setting a round (a multiple of 8)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.bundle.exists():
        parser.error(f"{args.bundle}: no such bundle; `uembed demo-bundle` builds the default one")
    bodies = [orjson.dumps({"examples": examples}) for examples in movielens_requests(64, 200)]
    runtime = scoring_runtime(args.bundle)
    decoder = LeanBody(max_examples=10_000)
    cpu_a_request(runtime, decoder, bodies, 400, 0)  # warm-up: caches, ONNX Runtime's first runs
    gc.collect()
    gc.freeze()  # as the service does after loading (its young passes rare, gc_gen0_threshold)
    gc.set_threshold(50_000, *gc.get_threshold()[1:])
    rounds: dict[int, list[float]] = {held: [] for held in args.held}
    for index in range(args.rounds):
        order = args.held if index % 2 == 0 else list(reversed(args.held))
        for held in order:
            rounds[held].append(round(cpu_a_request(runtime, decoder, bodies, args.requests, held), 1))
        print(json.dumps({"round": index + 1, **{f"held_{held}_us": rounds[held][-1] for held in args.held}}), flush=True)
    medians = {held: statistics.median(values) for held, values in rounds.items()}
    base = medians[args.held[0]]
    summary = {f"held_{held}": {"cpu_us_a_request_median": medians[held], "over_first": round(medians[held] / base, 3),
                                "rounds": rounds[held]} for held in args.held}  # fmt: skip
    print(json.dumps({held: (value["cpu_us_a_request_median"], value["over_first"]) for held, value in summary.items()}))
    if args.out:
        args.out.write_text(json.dumps({"bundle": str(args.bundle), "requests_a_round": args.requests, **summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
