"""Where the time of one /v1/score request goes: py-spy samples a saturated service, grouped by stage.

Starts the service (one worker) on the demo bundle, saturates it with wrk (16 connections, real MovieLens
examples), records py-spy samples of the worker for --seconds and prints, per thread, microseconds per
request of each stage: the event loop's side (HTTP, framework, JSON, validation, canonicalise) and the
compute thread's (hash, lookup, assemble, dense). Needs wrk and py-spy (the loadtest extra). Run it alone.

    python scripts/profile-request.py --examples 64 --out profile.txt
    python scripts/profile-request.py --tree ../an-older-checkout     # the same measurement of other code
    python scripts/profile-request.py --front grpc      # ModelInfer with binary tensors, the peers' gRPC load client (grpc_frames)
    python scripts/profile-request.py --open-loop 1200  # requests at evenly spaced times (the half-load tail's case)
    python scripts/profile-request.py --bundle scale-work/criteo-scale/1 --shape ranking   # the scale bench's requests

``--shape ranking`` and ``--shape flat_same_examples`` send the scale bench's requests (``uembed bench --phases
scale``: 1 context x 500 candidates, and the same 500 examples flat) to a Criteo-shaped bundle, served as that
bench serves it (64 MiB of tier 1, 1,024 examples a request at most).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uembed.loadtest.load import movielens_requests  # noqa: E402
from uembed.loadtest.peers import frames_grpc, grpc_request, wrk  # noqa: E402
from uembed.loadtest.servers import UvicornProcess  # noqa: E402

# A sample's stage: the first of these found walking from the innermost frame outwards.
STAGES = [
    ("JSON decode", ("json/decoder.py", "json/__init__.py")),
    ("request validation (pydantic)", ("pydantic", "TypeAdapter")),
    ("canonicalise", ("uembed/serving/pipeline/canonical.py", "uembed/serving/pipeline/values.py",
                      "uembed/serving/pipeline/encoding.py", "uembed/contract/columns.py", "uembed/contract/features.py",
                      "uembed/contract/hashing.py")),
    ("dense (ONNX Runtime)", ("onnxruntime", "DenseParts")),
    ("assemble", ("assemble", "factored_inputs")),
    ("lookup", ("lookup", "uembed/serving/rows/", "distinct")),
    ("metrics", ("prometheus_client", "uembed/serving/metrics.py")),
    ("batcher", ("uembed/serving/batcher.py", "uembed/serving/engine.py")),
    ("Open Inference Protocol: tensors to columns", ("uembed/serving/protocols/oip.py", "oip_grpc.py")),
    ("gRPC front (lane, framing, ASGI app)", ("protocols/grpc_lane.py", "protocols/grpc_wire.py", "protocols/grpc_h2.py",
                                              "protocols/http2.py")),
    ("protobuf", ("google/protobuf", "service_pb2")),
    ("gRPC (grpc.aio, cygrpc)", ("grpc/", "cygrpc", "grpc_aio", "_server.py")),
    ("our ASGI layers (limits, lean path, route)", ("uembed/serving/protocols/limits.py", "lean_json.py", "protocols/v1.py",
                                                    "protocols/render.py", "disconnect.py")),
    ("framework (FastAPI, Starlette)", ("starlette/", "fastapi/")),
    ("HTTP (uvicorn, httptools)", ("uvicorn/",)),
    ("event loop", ("asyncio/", "uvloop")),
]
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")  # the loadtest extra's, in the venv
IDLE = ("concurrent/futures/thread.py:81",)  # the compute thread waiting for a batch


def stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, keys in STAGES:
            if any(key in frame for key in keys):
                return name
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64, help="examples per request")
    parser.add_argument("--seconds", type=float, default=10, help="seconds of samples")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "movielens100k" / "1", help="bundle to serve")
    parser.add_argument("--shape", choices=("movielens", "ranking", "flat_same_examples"), default="movielens",
                        help="requests: --examples MovieLens examples each, or the scale bench's (a Criteo-shaped --bundle)")
    parser.add_argument("--requests", type=Path, metavar="JSONL",
                        help="v1: these requests instead (a /v1/score body a line, for --bundle; scripts/requests-from-data.py)")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose service to profile")
    parser.add_argument("--front", choices=("v1", "grpc"), default="v1",
                        help="v1: POST /v1/score JSON under wrk; grpc: ModelInfer with binary tensors (2 client processes)")
    parser.add_argument("--open-loop", type=float, metavar="RPS",
                        help="v1: requests/s sent at evenly spaced times (the peers bench's half-load client) instead of wrk's saturation")
    parser.add_argument("--out", type=Path, help="also write py-spy's raw samples (collapsed stacks) here")
    args = parser.parse_args()
    if args.front == "grpc" and args.shape != "movielens":
        parser.error("--front grpc sends MovieLens examples only")
    workdir = Path(tempfile.mkdtemp(prefix="uembed-profile-"))
    env = {"UEMBED_BUNDLES": str(args.bundle.resolve()), "PYTHONPATH": str(args.tree.resolve())}
    if args.requests:
        if args.front == "grpc":
            parser.error("--requests are sent to /v1/score (--front v1)")
        bodies = [line for line in args.requests.read_bytes().splitlines() if line.strip()]
    elif args.shape == "movielens":
        bodies = [json.dumps({"examples": r}).encode() for r in movielens_requests(args.examples)]
    else:
        from uembed.loadtest.scale_bench import request_bodies

        bodies = request_bodies(1.05, 500, 64, count=60)[args.shape]
        env |= {"UEMBED_HOT_ROWS_BYTES": str(64 * 2**20), "UEMBED_MAX_EXAMPLES": "1024", "UEMBED_MAX_BODY_BYTES": str(16 * 2**20)}
    service = UvicornProcess("uembed.serving.app:create_app", env, workdir / "service.log")
    service.argv += ["--app-dir", str(args.tree.resolve())]  # ahead of this checkout on the server's path
    # the lean path's module in this layout, or in a tree from before the one package
    lean = next((path for path in (args.tree / "uembed" / "serving" / "protocols" / "lean_json.py",
                                   args.tree / "service" / "protocols" / "lean_json.py") if path.exists()), None)  # fmt: skip
    if lean is not None:  # msgspec decodes in C, on this line of the lean path
        line = next(i for i, text in enumerate(lean.read_text().splitlines(), 1) if "self.decoder.decode(" in text)
        STAGES[0] = (STAGES[0][0], (*STAGES[0][1], f"lean_json.py:{line})"))
    service = service.start()
    raw = args.out or workdir / "samples.txt"
    try:
        if args.front == "grpc":
            from uembed.bundle.loader import load_bundle

            bundle = load_bundle(args.bundle)
            calls = [grpc_request(bundle.name, r, bundle.feature_specs) for r in movielens_requests(args.examples)]
            counter = 'uembed_grpc_requests_total{code="OK",method="ModelInfer"}'  # labels sorted, as exposed
            frames_grpc(service.grpc_target, calls, 3, workdir)  # warm-up
            load = threading.Thread(target=frames_grpc, args=(service.grpc_target, calls, args.seconds + 4, workdir))
            load.start()
            time.sleep(1)  # py-spy's start and its samples within the load's time
        elif args.open_loop:
            from uembed.loadtest.load import run_load

            run_load(service.url, bodies, 3, 8, rate=args.open_loop)  # warm-up
            counter = 'uembed_http_requests_total{route="/v1/score",status="200"}'
            load = threading.Thread(target=run_load, args=(service.url, bodies, args.seconds + 3, 8), kwargs={"rate": args.open_loop})
            load.start()
            time.sleep(1)
        else:
            wrk(service.url, "/v1/score", bodies, 3, 16, workdir)  # warm-up
            counter = 'uembed_http_requests_total{route="/v1/score",status="200"}'
            load = subprocess.Popen(["wrk", "-t1", "-c16", f"-d{args.seconds + 4:g}s", "-s", str(workdir / "post.lua"),
                                     service.url, "--", str(workdir / "bodies.jsonl")], stdout=subprocess.PIPE, text=True)  # fmt: skip
            time.sleep(1)
        before = service.metrics().get(counter, 0)
        subprocess.run([PY_SPY, "record", "-p", str(service.process.pid), "-d", f"{args.seconds:g}", "-r", str(args.rate),
                        "-f", "raw", "-o", str(raw), "--threads", "--nonblocking"], check=True, capture_output=True)  # fmt: skip
        scored = service.metrics().get(counter, 0) - before
        load.join() if isinstance(load, threading.Thread) else load.wait()
    finally:
        service.stop()
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = "event loop thread" if "MainThread" in frames[0] else "compute thread" if "uembed-compute" in frames[0] else "other threads"
        if any(key in frames[-1] for key in IDLE):
            continue
        per_thread[thread][stage(frames[1:])] += int(count)
    us_per_sample = 1e6 / args.rate
    shape = (f"{args.requests.name}'s requests" if args.requests else f"{args.examples} examples" if args.shape == "movielens"
             else f"shape {args.shape}")  # fmt: skip
    print(f"{scored:.0f} requests of {shape} scored while sampling ({scored / args.seconds:.0f}/s); "
          f"microseconds of each thread per request:")  # fmt: skip
    for thread, stages in per_thread.items():
        total = sum(stages.values())
        print(f"  {thread}: {total * us_per_sample / scored:.0f} us")
        for name, samples in stages.most_common():
            print(f"    {samples * us_per_sample / scored:7.0f} us  {100 * samples / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
