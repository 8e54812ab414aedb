"""The half-load tail against the load: p99 over the unloaded p50 at several fractions of the saturated rate.

    .venv/bin/python scripts/tail-curve.py [--fractions 0.05 0.1 0.2 0.3 0.4 0.5] [--rounds 2] [--seconds 8] [--plot F.png] [--out F.json]

The peers bench's tail goal (p99 at half load no more than 3x the unloaded p50) reads one point: half the saturated
requests/s. This starts one worker on the demo bundle (uvicorn with the service's HTTP protocol and loop), saturates it with wrk (16 connections,
64-example MovieLens requests) for the rate, times 200 requests one at a time for the unloaded p50, then sends each
fraction of the saturated rate at evenly spaced times with the peers' open-loop client of prepared requests
(``open_loop.py``), the fractions in a new order each round. For each it prints the p50 and p99, the p99 over the
unloaded p50, the share of a core the worker used (its CPU seconds over the run's): where that share nears 1,
requests queue; and the worker's CPU a request over a saturated request's: spaced requests make batches of one, each
dearer than a batched request, and on this project's machines dearer still the sparser they come (cold caches and
clocks after the worker slept are the likely cause, not measured here), so that half the saturated rate can keep the
worker nearly busy. Run it alone.
"""

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import orjson

from uembed.loadtest.load import movielens_requests
from uembed.loadtest.open_loop import open_loop, sequential
from uembed.loadtest.peers import cpu_split, wrk
from uembed.loadtest.servers import UvicornProcess

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles/movielens100k/1")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5], help="of the saturated rate")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds a point")
    parser.add_argument("--plot", type=Path, help="a PNG of the ratio and the worker's busy share against the load")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.bundle.exists():
        parser.error(f"{args.bundle}: no such bundle; `uembed demo-bundle` builds the default one")
    model = json.loads((args.bundle / "manifest.json").read_text())["name"]
    bodies = [orjson.dumps({"model": model, "examples": examples}) for examples in movielens_requests(64, 200)]
    work = Path(tempfile.mkdtemp(prefix="tail-curve-"))
    server = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(args.bundle)}, work / "service.log").start()
    try:
        wrk(server.url, "/v1/score", bodies, 2, 16, work)  # warm-up
        closed = cpu_split(server, lambda: wrk(server.url, "/v1/score", bodies, args.seconds, 16, work))
        saturated, saturated_cpu_ms = closed["requests_per_s"], closed["server_cpu_ms_per_call"]
        alone = sequential(server.url, bodies, 200).summary()
        points = {fraction: [] for fraction in args.fractions}
        for round_ in range(args.rounds):
            order = list(args.fractions)
            random.Random(round_).shuffle(order)
            for fraction in order:
                rate = saturated * fraction
                figures = cpu_split(server, lambda: open_loop(server.url, bodies, args.seconds, rate, 8).summary())
                points[fraction].append(figures | {"offered_per_s": round(rate, 1)})
                print(json.dumps({"round": round_ + 1, "fraction": fraction, **figures}), flush=True)
    finally:
        server.stop()
    curve = []
    for fraction, runs in sorted(points.items()):
        p99 = statistics.median(r["p99_ms"] for r in runs)
        busy = statistics.median(r["worker_cpu_s"][0] / args.seconds for r in runs)
        curve.append({"fraction": fraction, "offered_per_s": round(saturated * fraction, 1),
                      "p50_ms": statistics.median(r["p50_ms"] for r in runs), "p99_ms": p99,
                      "p99_over_unloaded_p50": round(p99 / alone["p50_ms"], 2),
                      "worker_busy_share": round(busy, 3),
                      "cpu_a_call_over_saturated": round(statistics.median(r["server_cpu_ms_per_call"] for r in runs) / saturated_cpu_ms, 2),
                      "runs": runs})  # fmt: skip
    result = {"saturated_per_s": saturated, "saturated_cpu_ms_per_call": saturated_cpu_ms, "unloaded": alone,
              "rounds": args.rounds, "seconds": args.seconds, "curve": curve}  # fmt: skip
    print(f"saturated {saturated:,.1f}/s at {saturated_cpu_ms:.3f} ms of the worker's CPU a request; unloaded p50 {alone['p50_ms']:.2f} ms")
    for point in curve:
        print(f"{point['fraction']:.2f} of saturated ({point['offered_per_s']:7.1f}/s): p50 {point['p50_ms']:.2f} ms, "
              f"p99 {point['p99_ms']:.2f} ms, over the unloaded p50 {point['p99_over_unloaded_p50']:.2f}, "
              f"the worker busy {point['worker_busy_share']:.2f} of a core, "
              f"its CPU a request {point['cpu_a_call_over_saturated']:.2f}x a saturated one's")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [p["fraction"] for p in result["curve"]]
    fig, ratio_axis = plt.subplots(figsize=(7, 4))
    ratio_axis.plot(fractions, [p["p99_over_unloaded_p50"] for p in result["curve"]], "o-", label="p99 / unloaded p50")
    ratio_axis.plot(fractions, [p["cpu_a_call_over_saturated"] for p in result["curve"]], "^-", color="tab:green",
                    label="worker CPU a request / a saturated one's")  # fmt: skip
    ratio_axis.axhline(3, color="grey", linestyle="--", label="the goal (3)")
    ratio_axis.set_xlabel("offered load, fraction of the saturated requests/s")
    ratio_axis.set_ylabel("ratio")
    busy_axis = ratio_axis.twinx()
    busy_axis.plot(fractions, [p["worker_busy_share"] for p in result["curve"]], "s:", color="tab:red", label="worker busy")
    busy_axis.set_ylabel("the worker's CPU, share of a core", color="tab:red")
    busy_axis.set_ylim(0, 1.05)
    lines = ratio_axis.get_legend_handles_labels()[0] + busy_axis.get_legend_handles_labels()[0]
    ratio_axis.legend(lines, [line.get_label() for line in lines], loc="upper left")
    ratio_axis.set_title(f"1 worker, 64 examples; saturated {result['saturated_per_s']:,.0f} requests/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
