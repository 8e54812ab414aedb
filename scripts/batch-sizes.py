"""Requests a batch under saturated load, per tree: how many requests the batch loop gathers before it runs a batch.

    .venv/bin/python scripts/batch-sizes.py TREE [TREE ...] [--rounds 2] [--seconds 5] [--out sizes.json]

Each round starts one worker of each tree in turn on the demo bundle (``PYTHONPATH=TREE``, the tree's own code and
compiled extensions: build them in a worktree first), loads it for ``--seconds`` with gRPC ModelInfer calls (the peers phase's client, ``grpc_frames``)
and then with wrk's REST v1 requests (16 connections, one request in flight on each, 64 real MovieLens examples a
request, as ``uembed bench --peers``), and reads the worker's ``uembed_batch_examples`` histogram before and after
each: its examples over its batches, over 64, is the requests a batch. Prints a line per tree and round, and the
whole as JSON. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uembed.bundle.loader import load_bundle  # noqa: E402
from uembed.loadtest.load import movielens_requests  # noqa: E402
from uembed.loadtest.peers import frames_grpc_checked, grpc_request, wrk  # noqa: E402
from uembed.loadtest.servers import UvicornProcess, free_port  # noqa: E402

EXAMPLES = 64
SETTLE_S = 0.7  # the batch loop flushes its tallied metrics at most half a second after a batch


def batch_examples(url: str) -> tuple[float, float]:
    """The worker's ``uembed_batch_examples`` histogram: its sum and count."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    total = lambda name: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))  # noqa: E731
    return total("uembed_batch_examples_sum"), total("uembed_batch_examples_count")


def requests_a_batch(server: UvicornProcess, load) -> tuple[dict, float]:
    """``load()``'s figures, and the requests a batch it made."""
    time.sleep(SETTLE_S)
    before = batch_examples(server.url)
    figures = load()
    time.sleep(SETTLE_S)
    after = batch_examples(server.url)
    return figures, round((after[0] - before[0]) / (after[1] - before[1]) / EXAMPLES, 2)


def measure(tree: Path, bundle: Path, calls: list[bytes], bodies: list[bytes], seconds: float, work: Path) -> dict:
    server = UvicornProcess("uembed.serving.app:create_app",
                            {"UEMBED_BUNDLES": str(bundle), "PYTHONPATH": str(tree), "UEMBED_GRPC_PORT": str(free_port())},
                            work / f"{tree.name}.log")  # fmt: skip
    server.cwd = tree
    server.start()
    try:
        frames_grpc_checked(server, calls, 2, work, 16)  # warm-up
        grpc, grpc_size = requests_a_batch(server, lambda: frames_grpc_checked(server, calls, seconds, work, 16))
        wrk(server.url, "/v1/score", bodies, 2, 16, work)
        v1, v1_size = requests_a_batch(server, lambda: wrk(server.url, "/v1/score", bodies, seconds, 16, work))
        return {"grpc": {"requests_per_s": grpc["requests_per_s"], "requests_a_batch": grpc_size},
                "v1": {"requests_per_s": v1["requests_per_s"], "requests_a_batch": v1_size}}  # fmt: skip
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", type=Path, nargs="+", help="checkouts whose services to load, their extensions built")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the trees taking turns in each")
    parser.add_argument("--seconds", type=float, default=5, help="seconds of load a front")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "movielens100k" / "1", help="bundle to serve")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    served = load_bundle(bundle)
    requests = movielens_requests(EXAMPLES)
    calls = [grpc_request(served.name, r, served.feature_specs) for r in requests]
    bodies = [json.dumps({"examples": r}).encode() for r in requests]
    work = Path(tempfile.mkdtemp(prefix="uembed-batch-sizes-"))
    rounds = []
    for number in range(1, args.rounds + 1):
        trees = args.trees if number % 2 else list(reversed(args.trees))
        figures = {str(tree): measure(tree.resolve(), bundle, calls, bodies, args.seconds, work) for tree in trees}
        for tree, result in figures.items():
            print(f"round {number} {tree}: gRPC {result['grpc']} | v1 {result['v1']}", flush=True)
        rounds.append(figures)
    result = {"bundle": str(bundle), "examples_per_request": EXAMPLES, "seconds": args.seconds, "rounds": rounds}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
