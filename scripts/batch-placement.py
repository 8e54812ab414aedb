"""Batches on the event loop against batches on a compute thread, side by side on one bundle.

    .venv/bin/python scripts/batch-placement.py scale-work/criteo-scale/1 --seconds 5 --rounds 2

Starts one worker with ``UEMBED_COMPUTE_ON_EVENT_LOOP`` true, then false, in turn for ``--rounds``
rounds; each saturates it (8 connections, keep-alive, ``uembed.loadtest.load.run_load``) with the scale
benchmark's traffic (``uembed/loadtest/scale_bench.py``: 1 context x 500 candidates, the same 500 examples
flat, 64 flat examples) and prints requests/s and the worker's CPU milliseconds a request. Run it alone:
the load generator shares the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import psutil

from uembed.loadtest.load import run_load
from uembed.loadtest.scale_bench import request_bodies, worker_pids
from uembed.loadtest.servers import UvicornProcess


def measure(bundle: Path, on_loop: bool, bodies: dict[str, list[bytes]], seconds: float, log: Path) -> dict:
    env = {"UEMBED_BUNDLES": str(bundle), "UEMBED_HOT_ROWS_BYTES": str(64 * 2**20), "UEMBED_MAX_EXAMPLES": "1024",
           "UEMBED_MAX_BODY_BYTES": str(16 * 2**20), "UEMBED_COMPUTE_ON_EVENT_LOOP": str(on_loop).lower()}  # fmt: skip
    server = UvicornProcess("uembed.serving.app:create_app", env, log, workers=1).start(600)
    try:
        worker = psutil.Process(worker_pids(server)[0])
        out = {}
        for shape, shape_bodies in bodies.items():
            run_load(server.url, shape_bodies, 1.0, 8)  # warm-up
            before = sum(worker.cpu_times()[:2])
            result = run_load(server.url, shape_bodies, seconds, 8).summary()
            cpu_s = sum(worker.cpu_times()[:2]) - before
            out[shape] = {"requests_per_s": result["requests_per_s"], "failures": result["failures"],
                          "cpu_ms_per_request": round(cpu_s / max(result["requests"], 1) * 1000, 2)}  # fmt: skip
        return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle of the scale benchmark's shape (Criteo C1..C26)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per saturated phase")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (loop, thread)")
    args = parser.parse_args()
    bodies = request_bodies(1.05, 500, 64, count=60)
    logs = Path(tempfile.mkdtemp(prefix="batch-placement-"))
    rounds = []
    for number in range(args.rounds):
        rounds.append({placement: measure(args.bundle, placement == "loop", bodies, args.seconds, logs / f"{placement}-{number}.log")
                       for placement in ("loop", "thread")})  # fmt: skip
        print(json.dumps(rounds[-1]), flush=True)
    for shape in bodies:
        gains = [r["loop"][shape]["requests_per_s"] / r["thread"][shape]["requests_per_s"] for r in rounds]
        print(f"{shape}: loop over thread, requests/s, per round: {', '.join(f'{g:.2f}x' for g in gains)}")


if __name__ == "__main__":
    main()
