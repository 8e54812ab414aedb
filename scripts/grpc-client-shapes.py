"""How the shape of the load client moves the gRPC front's requests/s and batches, beside REST v1's, on one worker.

    .venv/bin/python scripts/grpc-client-shapes.py [--rounds 4] [--seconds 5] [--out shapes.json]

The same service (the demo bundle, 64 real MovieLens examples a request, 16 calls in flight) loaded in turn by:

    v1 wrk               wrk -t1 -c16, every request the next of 200 bodies (the peers phase's v1 load)
    v1 wrk, one body     the same, every request the same body
    grpc frames          uembed/loadtest/grpc_frames.py: one thread, 16 connections, every call the next of 200 requests
                         (the peers phase's gRPC load since the sixteenth session)
    grpc h2load 16x1     16 h2load processes of one connection each, a body a process (the peers phase's before)
    grpc h2load 1x16     one h2load process of 16 connections: every call the same body (h2load sends one a run)

For each: requests/s, the requests a batch (the worker's ``uembed_batch_examples`` histogram), the worker's and the
client's CPU a call. The shapes take turns, their order reversed every round. Run it alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uembed.bundle.loader import load_bundle  # noqa: E402
from uembed.loadtest.load import movielens_requests  # noqa: E402
from uembed.loadtest.peers import (  # noqa: E402
    INFER_METHOD,
    checked_by_server,
    cpu_split,
    frames_grpc_checked,
    grpc_frame,
    grpc_request,
    h2load_grpc_checked,
    wrk,
)
from uembed.loadtest.servers import UvicornProcess, free_port  # noqa: E402

EXAMPLES, CONNECTIONS = 64, 16


def h2load_one_process(server: UvicornProcess, call: bytes, seconds: int, work: Path) -> dict:
    """One h2load process, one thread, CONNECTIONS connections, for ``seconds``: every call ``call``."""
    body = work / "one-call.bin"
    body.write_bytes(grpc_frame(call))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["h2load", "-t1", f"-c{CONNECTIONS}", "-m1", f"-D{seconds}", "-d", str(body), "-H",
                          "content-type: application/grpc", "-H", "te: trailers", f"http://{server.grpc_target}{INFER_METHOD}"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    counts = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    rate = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1))
    done = int(counts.group(1))
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"requests": done, "requests_per_s": rate, "failures": int(counts.group(2)), "client_cpu_ms_per_call": round(cpu / max(done, 1) * 1000, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5, help="whole seconds of load a shape (h2load's -D takes whole seconds)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "movielens100k" / "1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("batch_sizes", ROOT / "scripts" / "batch-sizes.py")
    sizes = importlib.util.module_from_spec(spec)  # its requests_a_batch: a script's name has a hyphen
    spec.loader.exec_module(sizes)

    bundle = load_bundle(args.bundle)
    requests = movielens_requests(EXAMPLES)
    calls = [grpc_request(bundle.name, r, bundle.feature_specs) for r in requests]
    bodies = [orjson.dumps({"examples": r}) for r in requests]
    work = Path(tempfile.mkdtemp(prefix="uembed-grpc-shapes-"))
    server = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(args.bundle.resolve()),
                            "UEMBED_GRPC_PORT": str(free_port())}, work / "service.log")  # fmt: skip
    seconds = args.seconds
    shapes = {
        "v1 wrk": lambda: wrk(server.url, "/v1/score", bodies, seconds, CONNECTIONS, work),
        "v1 wrk, one body": lambda: wrk(server.url, "/v1/score", bodies[:1], seconds, CONNECTIONS, work),
        "grpc frames": lambda: frames_grpc_checked(server, calls, seconds, work, CONNECTIONS),
        "grpc h2load 16x1": lambda: h2load_grpc_checked(server, calls, seconds, work, CONNECTIONS),
        "grpc h2load 1x16": lambda: checked_by_server(server, lambda: h2load_one_process(server, calls[0], seconds, work)),
    }
    server.start()
    rounds = []
    try:
        wrk(server.url, "/v1/score", bodies, 2, CONNECTIONS, work)  # warm-up
        frames_grpc_checked(server, calls, 2, work, CONNECTIONS)
        for number in range(args.rounds):
            row = {}
            for name in list(shapes) if number % 2 == 0 else list(reversed(shapes)):
                figures, a_batch = sizes.requests_a_batch(server, lambda: cpu_split(server, shapes[name]))
                row[name] = {"requests_per_s": figures["requests_per_s"], "requests_a_batch": a_batch,
                             "server_cpu_ms_per_call": figures["server_cpu_ms_per_call"],
                             "client_cpu_ms_per_call": figures.get("client_cpu_ms_per_call"), "failures": figures["failures"]}  # fmt: skip
                print(f"round {number + 1} {name}: {row[name]}", flush=True)
            row["grpc frames over v1 wrk"] = round(row["grpc frames"]["requests_per_s"] / row["v1 wrk"]["requests_per_s"], 3)
            row["grpc h2load 16x1 over v1 wrk"] = round(row["grpc h2load 16x1"]["requests_per_s"] / row["v1 wrk"]["requests_per_s"], 3)
            rounds.append(row)
    finally:
        server.stop()
    result = {"bundle": str(args.bundle), "examples_per_request": EXAMPLES, "connections": CONNECTIONS, "seconds": seconds, "rounds": rounds}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
