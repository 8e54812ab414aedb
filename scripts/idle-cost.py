"""What a request's work costs on this machine when it runs back to back against when it follows an idle gap.

    .venv/bin/python scripts/idle-cost.py [BUNDLE] [--calls 300] [--gaps 0 0.001 0.005] [--wait sleep|spin|both]

At half load the service's requests arrive a millisecond or more apart, so each one runs after the worker slept;
at saturation they run back to back. This times, in one process, the same work both ways: the encoder's
canonicalise + hash + lookup + assemble + dense of one 64-example MovieLens request (``ModelRuntime.score_batch``
on the demo bundle, one request a batch, as the in-process ceiling), and a numpy sort of a batch's row ids alone
(no uembed code), each after sleeping ``gap`` seconds. Prints the median and p90 microseconds a call per gap (the gaps
taking turns) and the median's ratio to the first gap's, as JSON. A ratio well above 1 is the machine (caches and clocks after a sleep), not the
code: nothing in either workload depends on the time between calls.
"""

import argparse
import json
import time

import numpy as np

from uembed.loadtest.load import movielens_requests
from uembed.serving.engine import ScoringEngine
from uembed.serving.settings import load_settings


def spin(seconds: float) -> None:
    """Wait without giving the core up, as a busy-polling server would between requests."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def timed(work, calls: int, gaps: list[float], waits: dict, rounds: int = 10) -> dict[str, dict[str, dict[str, float]]]:
    """Microseconds a call after each gap, per way of waiting: the gaps and the waits take turns, ``calls / rounds``
    calls at a time, so a drift of the machine's speed during the run reaches every gap and wait alike."""
    spent: dict[tuple[str, float], list[float]] = {(name, gap): [] for name in waits for gap in gaps}
    for _ in range(rounds):
        for name, wait in waits.items():
            for gap in gaps:
                for i in range(max(calls // rounds, 1)):
                    if gap:
                        wait(gap)
                    started = time.perf_counter()
                    work(i)
                    spent[name, gap].append(time.perf_counter() - started)
    figures: dict = {name: {} for name in waits}
    for (name, gap), seconds in spent.items():
        micros = np.asarray(seconds) * 1e6
        figures[name][f"gap {gap * 1000:g} ms"] = {"p50_us": round(float(np.percentile(micros, 50)), 1),
                                                   "p90_us": round(float(np.percentile(micros, 90)), 1)}  # fmt: skip
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", default="bundles/movielens100k/1",
                        help="a MovieLens bundle (default: the demo bundle; `uembed demo-bundle` makes it)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.001, 0.005])
    parser.add_argument("--wait", choices=["sleep", "spin", "both"], default="sleep",
                        help="how a gap passes: asleep (the core may idle), spinning on the clock (it stays busy), or "
                             "both, taking turns (default: sleep)")
    args = parser.parse_args()
    runtime = ScoringEngine(load_settings()).registry.open(args.bundle)
    requests = movielens_requests(64, 200)
    ids = np.random.default_rng(0).integers(0, 35_000, (64, 12))
    work = {
        "score_batch of one 64-example request": lambda i: runtime.score_batch([runtime.canonicalise(requests[i % 200])]),
        "np.unique of 768 row ids": lambda i: np.unique(ids, return_inverse=True),
    }
    out: dict = {"bundle": args.bundle}
    for name, call in work.items():
        for _ in range(50):  # warm: every cache filled, every page touched
            call(0)
        waits = {"sleep": time.sleep, "spin": spin}
        figures = timed(call, args.calls, args.gaps, {w: waits[w] for w in (waits if args.wait == "both" else [args.wait])})
        for by_gap in figures.values():
            base = by_gap[f"gap {args.gaps[0] * 1000:g} ms"]["p50_us"]
            for figure in by_gap.values():
                figure["p50_over_first"] = round(figure["p50_us"] / base, 2)
        out[name] = figures  # by way of waiting ("sleep", "spin"), then by gap
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
