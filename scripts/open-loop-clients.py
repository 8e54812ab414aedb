"""The half-load tail by the peers bench's two open-loop HTTP clients, rounds taking turns on one service.

    .venv/bin/python scripts/open-loop-clients.py [--workers 1] [--rounds 3] [--seconds 8] [--out F.json]

Starts the service on the demo bundle (``--workers``), saturates it with wrk (16 connections, 64 real MovieLens
examples a request) for the rate, then each round, the clients' order flipped every round: the unloaded p50 (200
requests one at a time) and the open loop at half the saturated rate (8 connections), by the thread-a-connection
client (``load.run_load``, ``threads``) and by the client of prepared requests (``open_loop.open_loop``,
``prepared``). Prints per round and client: the p50 and p99, the p99 over that client's unloaded p50, the share of
the offered rate it sent, its own CPU a call, and the workers' CPU. Run it alone.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import orjson

from uembed.loadtest.load import movielens_requests, run_load, unloaded
from uembed.loadtest.open_loop import open_loop, sequential
from uembed.loadtest.peers import client_cpu, cpu_split, wrk
from uembed.loadtest.servers import SERVICE_APP, UvicornProcess
from uembed.model.demo import demo_bundle

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = {
    "threads": (lambda url, bodies: unloaded(url, bodies, 200), lambda url, bodies, seconds, rate: run_load(url, bodies, seconds, 8, rate=rate)),
    "prepared": (lambda url, bodies: sequential(url, bodies, 200), lambda url, bodies, seconds, rate: open_loop(url, bodies, seconds, rate, 8)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of each open loop")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bundle = demo_bundle(ROOT / "bundles")
    bodies = [orjson.dumps({"examples": r}) for r in movielens_requests(64, count=200)]
    workdir = Path(tempfile.mkdtemp(prefix="open-loop-clients-"))
    service = UvicornProcess(SERVICE_APP, {"UEMBED_BUNDLES": str(bundle)}, workdir / "service.log", workers=args.workers).start()
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": []}
    try:
        time.sleep(2.0)  # every worker listening
        wrk(service.url, "/v1/score", bodies, 3, 16, workdir)  # warm-up
        saturated = cpu_split(service, lambda: wrk(service.url, "/v1/score", bodies, args.seconds, 16, workdir))
        rate = saturated["requests_per_s"] / 2
        results["saturated"] = {k: saturated[k] for k in ("requests_per_s", "server_cpu_ms_per_call", "worker_cpu_s")}
        print(json.dumps({"saturated": results["saturated"], "offered_per_s": rate}), flush=True)
        for round_ in range(args.rounds):
            for name in list(CLIENTS) if round_ % 2 == 0 else list(CLIENTS)[::-1]:
                alone_of, loop_of = CLIENTS[name]
                alone = alone_of(service.url, bodies).summary()
                half = cpu_split(service, lambda: client_cpu(lambda: loop_of(service.url, bodies, args.seconds, rate).summary()))
                figures = {"round": round_, "client": name, "unloaded_p50_ms": alone["p50_ms"], "half_p50_ms": half["p50_ms"],
                           "half_p99_ms": half["p99_ms"], "p99_over_unloaded_p50": round(half["p99_ms"] / alone["p50_ms"], 2),
                           "achieved_over_offered": round(half["requests_per_s"] / rate, 3), "failures": half["failures"],
                           "client_cpu_ms_per_call": half["client_cpu_ms_per_call"],
                           "server_cpu_ms_per_call": half["server_cpu_ms_per_call"], "worker_cpu_s": half["worker_cpu_s"]}  # fmt: skip
                print(json.dumps(figures), flush=True)
                results["rounds"].append(figures)
    finally:
        service.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
