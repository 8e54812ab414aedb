"""Two trees' services side by side on one machine: REST v1 at saturation, rounds taking turns.

    .venv/bin/python scripts/ab-service.py BEFORE_TREE [AFTER_TREE] [--rounds 4] [--seconds 8] [--out ab.json]
    .venv/bin/python scripts/ab-service.py BEFORE_TREE --open-loop 1400   # requests at evenly spaced times instead
    .venv/bin/python scripts/ab-service.py . . --after-env UEMBED_BUSY_POLL_MS=2   # one tree, two settings
    .venv/bin/python scripts/ab-service.py BEFORE_TREE --front grpc   # gRPC ModelInfer, the peers phase's clients
    .venv/bin/python scripts/ab-service.py BEFORE_TREE --bundle B --requests R.jsonl   # another bundle and its requests

Each round starts one worker of each tree in turn (``PYTHONPATH=TREE python -m uvicorn``, this venv's packages, the
tree's own code and compiled extensions: build them in a worktree first), on the demo bundle, loads it with wrk
(16 connections, 64 real MovieLens examples a request, as ``uembed bench --peers``) and records its requests/s
and its CPU a call; the order flips every round, so a drift of the machine's speed falls on both trees. With
``--open-loop RPS`` each tree gets the same RPS at evenly spaced times (the peers bench's half-load client: requests
that mostly find the worker idle, so each is its own batch) and its CPU a call and p99 are compared instead.
Prints each round and the medians of the after-over-before ratios as JSON. Run it alone.
"""

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import orjson

from uembed.bundle.loader import load_bundle
from uembed.loadtest.load import movielens_requests, run_load
from uembed.loadtest.peers import cpu_split, frames_grpc_checked, grpc_load, grpc_request, h2load_grpc_checked, wrk
from uembed.loadtest.servers import UvicornProcess, free_port

ROOT = Path(__file__).resolve().parents[1]


def measure(tree: Path, bundle: Path, bodies: list[bytes], seconds: float, work: Path, rate: float | None = None,
            env: dict[str, str] | None = None, label: str = "", calls: list[bytes] | None = None,
            grpc_client: str = "frames") -> dict:  # fmt: skip
    # the worker starts in the tree and imports uembed from it
    grpc_port = free_port() if calls else 0
    server = UvicornProcess("uembed.serving.app:create_app",
                            {"UEMBED_BUNDLES": str(bundle.resolve()), "PYTHONPATH": str(tree),
                             "UEMBED_GRPC_PORT": str(grpc_port)} | (env or {}),
                            work / f"{label or tree.name}.log")  # fmt: skip
    server.cwd = tree
    server.start()
    try:
        # which tree's compiled hashing the worker mapped: its code's, or the run is refused
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        mapped = sorted({line.split()[-1] for line in maps.splitlines() if "_fasthash" in line})
        if not mapped or not all(path.startswith(str(tree.resolve())) for path in mapped):
            raise SystemExit(f"the worker of {tree} runs other code: {mapped or 'no compiled hashing'}")
        if calls and not rate and grpc_client != "aio":  # saturated ModelInfer, as the peers phase (frames) or by h2load
            checked = frames_grpc_checked if grpc_client == "frames" else h2load_grpc_checked
            checked(server, calls, 2, work, 16)  # warm-up
            return cpu_split(server, lambda: checked(server, calls, seconds, work, 16))
        if calls:  # ModelInfer from the peers phase's grpc.aio client (2 processes, 16 calls in flight), or at a rate
            target = f"127.0.0.1:{grpc_port}"
            grpc_load(target, calls, 2, rate=rate)  # warm-up
            return cpu_split(server, lambda: grpc_load(target, calls, seconds, rate=rate))
        wrk(server.url, "/v1/score", bodies, 2, 16, work)  # warm-up
        if rate:
            return cpu_split(server, lambda: run_load(server.url, bodies, seconds, 8, rate=rate).summary())
        return cpu_split(server, lambda: wrk(server.url, "/v1/score", bodies, seconds, 16, work))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path, nargs="?", default=ROOT)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles/movielens100k/1")
    parser.add_argument("--requests", type=Path, metavar="JSONL",
                        help="the requests to send, a /v1/score body a line (default: 200 of 64 MovieLens examples, "
                        "for the demo bundle); scripts/requests-from-data.py writes them from a data set")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--open-loop", type=float, metavar="RPS", help="this many requests/s at evenly spaced times, not saturation")
    parser.add_argument("--before-env", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings for the before worker only, e.g. UEMBED_BUSY_POLL_MS=0 (the trees may be the same)")
    parser.add_argument("--after-env", nargs="+", default=[], metavar="KEY=VALUE", help="settings for the after worker only")
    parser.add_argument("--front", choices=("v1", "grpc"), default="v1", help="REST v1 with wrk, or gRPC ModelInfer")
    parser.add_argument("--grpc-client", choices=("frames", "h2load", "aio"), default="frames",
                        help="saturated gRPC load from the peers phase's client in wrk's shape (grpc_frames, the default), "
                        "h2load (a process a connection), or grpc.aio processes (which take a share of the server's cores); "
                        "an open loop is grpc.aio's")  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    envs = {}
    for name in ("before", "after"):
        pairs = getattr(args, f"{name}_env")
        if any("=" not in pair for pair in pairs):
            parser.error(f"--{name}-env takes KEY=VALUE pairs; got {pairs} (put the trees before the option)")
        envs[name] = dict(pair.split("=", 1) for pair in pairs)
    # both workers inherit this shell's settings: recorded, so a stray UEMBED_* is seen in the results
    inherited = {key: value for key, value in os.environ.items() if key.startswith("UEMBED_")}
    if args.requests:
        requests = [orjson.loads(line)["examples"] for line in args.requests.read_bytes().splitlines() if line.strip()]
    else:
        requests = movielens_requests(64, 200)
    bodies = [orjson.dumps({"examples": r}) for r in requests]
    calls = None
    if args.front == "grpc":
        served = load_bundle(args.bundle)
        calls = [grpc_request(served.name, r, served.feature_specs) for r in requests]
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for round_ in range(args.rounds):
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            figures = {name: measure(getattr(args, name), args.bundle, bodies, args.seconds, work, args.open_loop,
                                   envs[name], name, calls, args.grpc_client) for name in order}  # fmt: skip
            kept = ("requests_per_s", "server_cpu_ms_per_call", "failures")
            kept += ("p50_ms", "p99_ms") if args.open_loop or calls else ()
            # h2load gives no percentiles (its mean and longest call are kept instead)
            kept += ("mean_ms", "max_ms") if "mean_ms" in figures["before"] else ()
            row = {name: {key: figures[name][key] for key in kept if key in figures[name]} for name in ("before", "after")}
            row["after_over_before"] = round(row["after"]["requests_per_s"] / row["before"]["requests_per_s"], 3)
            row["before_cpu_over_after"] = round(row["before"]["server_cpu_ms_per_call"] / row["after"]["server_cpu_ms_per_call"], 3)
            print(json.dumps({"round": round_ + 1, "order": order, **row}), flush=True)
            rounds.append(row)
    summary = {
        "before": str(args.before), "after": str(args.after), "bundle": str(args.bundle), "requests": str(args.requests or "movielens"), "front": args.front, "grpc_client": args.grpc_client if calls else None, "before_env": envs["before"], "after_env": envs["after"],
        "inherited_env": inherited,
        "rounds": rounds,
        "median_after_over_before": statistics.median(r["after_over_before"] for r in rounds),
        "median_before_cpu_over_after": statistics.median(r["before_cpu_over_after"] for r in rounds),
    }  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
