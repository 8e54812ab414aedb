"""Does the service get slower or bigger as it serves? Rounds of saturated load on one `uembed serve` worker, with
the in-process ceiling between them as the machine's own speed.

    .venv/bin/python scripts/service-aging.py [--bundle B] [--rounds 10] [--seconds 4] [--ceiling-seconds 3]
        [--out F.json] [--plot F.png]

Starts `uembed serve` (1 worker) on the demo bundle, then in each round times the ceiling (the same 64-example
MovieLens requests scored one at a time in this process, no HTTP, the bundle opened once) and saturates the service
with wrk (16 connections). Each round prints the service's requests/s and CPU a request, the ceiling's requests/s,
and the worker's RSS, PSS, threads and open files. At the end it compares the last third of the rounds with the
first: the CPU a request (medians) and the growth of RSS and open files. A service that leaks shows RSS or files
growing round after round; one that slows shows its CPU a request rising while the ceiling holds. On a noisy
machine a single round means little: read the trend. Run it alone.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import orjson
import psutil

from uembed.loadtest.load import ceiling, movielens_requests, scoring_runtime
from uembed.loadtest.peers import cpu_split, wrk
from uembed.loadtest.servers import ServeProcess

ROOT = Path(__file__).resolve().parents[1]


def worker_state(process: psutil.Process) -> dict:
    memory = process.memory_full_info()
    return {"rss_mib": round(memory.rss / 2**20, 1), "pss_mib": round(memory.pss / 2**20, 1),
            "threads": process.num_threads(), "open_files": process.num_fds()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles/movielens100k/1")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=4, help="wrk's seconds a round")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="a PNG of the CPU a request and the RSS by round")
    args = parser.parse_args()
    if not args.bundle.exists():
        parser.error(f"{args.bundle}: no such bundle; `uembed demo-bundle` builds the default one")
    if args.rounds < 3:
        parser.error("--rounds: at least 3 (the first third is compared with the last)")
    requests = movielens_requests(64, 200)
    bodies = [orjson.dumps({"examples": examples}) for examples in requests]
    runtime = scoring_runtime(args.bundle)
    work = Path(tempfile.mkdtemp(prefix="service-aging-"))
    service = ServeProcess(args.bundle, work / "service.log").start()
    rounds = []
    try:
        worker = psutil.Process(service.process.pid)
        wrk(service.url, "/v1/score", bodies, 2, 16, work)  # warm-up
        started = worker_state(worker)
        for index in range(args.rounds):
            machine = ceiling(None, requests, args.ceiling_seconds, runtime)["requests_per_s"]
            served = cpu_split(service, lambda: wrk(service.url, "/v1/score", bodies, args.seconds, 16, work))
            row = {"round": index + 1, "requests_per_s": served["requests_per_s"], "failures": served["failures"],
                   "cpu_ms_a_request": served["server_cpu_ms_per_call"], "ceiling_per_s": machine,
                   "over_ceiling": round(served["requests_per_s"] / machine, 3), **worker_state(worker)}  # fmt: skip
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        service.stop()
    third = max(1, len(rounds) // 3)
    first, last = rounds[:third], rounds[-third:]
    summary = {
        "cpu_ms_a_request_first_third": statistics.median(r["cpu_ms_a_request"] for r in first),
        "cpu_ms_a_request_last_third": statistics.median(r["cpu_ms_a_request"] for r in last),
        "ceiling_per_s_first_third": statistics.median(r["ceiling_per_s"] for r in first),
        "ceiling_per_s_last_third": statistics.median(r["ceiling_per_s"] for r in last),
        "rss_mib_after_warm_up": started["rss_mib"], "rss_mib_at_the_end": rounds[-1]["rss_mib"],
        "open_files_after_warm_up": started["open_files"], "open_files_at_the_end": rounds[-1]["open_files"],
        "failures": sum(r["failures"] for r in rounds),
    }  # fmt: skip
    print(f"CPU a request, median of the first and last thirds: {summary['cpu_ms_a_request_first_third']:.3f} and "
          f"{summary['cpu_ms_a_request_last_third']:.3f} ms (the ceiling {summary['ceiling_per_s_first_third']:,.0f} and "
          f"{summary['ceiling_per_s_last_third']:,.0f}/s); RSS {started['rss_mib']} -> {rounds[-1]['rss_mib']} MiB; "
          f"open files {started['open_files']} -> {rounds[-1]['open_files']}; failures {summary['failures']}")  # fmt: skip
    result = {"bundle": str(args.bundle), "seconds": args.seconds, "rounds": rounds, "summary": summary}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(rounds, started["rss_mib"], args.plot)


def plot(rounds: list[dict], started_rss_mib: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [r["round"] for r in rounds]
    fig, cpu_axis = plt.subplots(figsize=(7, 4.6))
    cpu_axis.plot(numbers, [r["cpu_ms_a_request"] for r in rounds], "o-", label="the worker's CPU a request (ms)")
    cpu_axis.plot(numbers, [1000 / r["ceiling_per_s"] for r in rounds], "^:", label="the ceiling's time a request (ms)")
    cpu_axis.set_xlabel("round")
    cpu_axis.set_ylabel("ms a request")
    cpu_axis.set_ylim(bottom=0)
    memory_axis = cpu_axis.twinx()
    # growth, not the whole RSS: a leak of a few MiB is invisible on an axis that starts at zero
    growth = [r["rss_mib"] - started_rss_mib for r in rounds]
    memory_axis.plot(numbers, growth, "s--", color="tab:red", label="RSS growth since the warm-up (MiB)")
    memory_axis.set_ylabel("the worker's RSS growth (MiB)", color="tab:red")
    memory_axis.set_ylim(min(0.0, *growth), max(2.0, *growth) * 1.1)
    lines = cpu_axis.get_legend_handles_labels()[0] + memory_axis.get_legend_handles_labels()[0]
    cpu_axis.legend(lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.15),
                    ncol=2, fontsize="small")
    cpu_axis.set_title("uembed serve, 1 worker, 64 examples a request, saturated rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
