"""Time canonicalise + hash of 64-example MovieLens requests in process (the encoder's share of a request).

    .venv/bin/python scripts/encode-timing.py BUNDLE [--seconds 3]

Prints microseconds per request with unseen-value counting on and off (the bundle's filters dropped).
"""

import argparse
import time

from uembed.bundle.loader import load_bundle
from uembed.loadtest.traffic import MOVIELENS_FEATURES
from uembed.model.data import movielens100k_table
from uembed.serving.pipeline.cpu import ModelRuntime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    rows = movielens100k_table().slice(0, 6400).to_pylist()
    requests = [[{k: r[k] for k in MOVIELENS_FEATURES} for r in rows[i : i + 64]] for i in range(0, 6400, 64)]
    bundle = load_bundle(args.bundle)
    for counting in (True, False):
        runtime = ModelRuntime(bundle)
        if not counting:
            runtime.encoder.known, runtime.encoder.unseen = {}, {}
        for request in requests:  # warm the value caches, as traffic does
            runtime.hash([runtime.canonicalise(request)])
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            for request in requests:
                runtime.hash([runtime.canonicalise(request)])
                done += 1
        per_request = (time.perf_counter() - started) / done * 1e6
        print(f"unseen counting {'on ' if counting else 'off'}: {per_request:.1f} us per request (canonicalise + hash)")


if __name__ == "__main__":
    main()
