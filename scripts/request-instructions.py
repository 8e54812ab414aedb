"""Instructions the service spends on one request, counted by valgrind (callgrind) in the worker, per front and per
tree: what a call costs the server, measured so that the speed of a shared, noisy machine does not move it.

    .venv/bin/python scripts/request-instructions.py TREE [TREE ...] [--fronts v1 grpc] [--calls 200] [--in-flight 1]
        [--out F]

For each tree (a checkout with its compiled extensions built), one worker (``PYTHONPATH=TREE python -m uvicorn``, as
``scripts/ab-service.py`` starts it, on the demo bundle) runs under callgrind with its instrumentation off while it
starts. Then, for each front in turn, warm-up calls, the counters zeroed, ``--calls`` calls (ten 64-example requests,
the first 640 examples of MovieLens-100K in turn: ``/v1/score`` JSON over kept-alive HTTP/1.1 connections, ModelInfer
with binary tensors over one gRPC channel), and the counters dumped: every thread of the worker, its instructions over
the calls. With ``--in-flight 1`` (the default) each call is its own batch in every tree, so the count is a lone
request's, the half-load case; with more in flight the calls share batches as at saturation (the calls a batch are
printed: compare fronts at similar batching). Prints instructions a call per front and tree, each tree over the first,
and gRPC over v1 (lower is cheaper: ``grpc_over_v1`` 0.9 means a gRPC call costs the server 10% fewer instructions
than a v1 request); each also without the event loop's timer callbacks, work the clock drives (the metrics flush),
which runs far more often a call under valgrind's slowdown than in a real run. Counts are not time: a change that trades instructions for cache misses or system calls (the
kernel's work is not counted) shows here only in part; the side-by-side timings (``scripts/ab-service.py``) say the
rest. With ``--cache-sim`` callgrind also simulates the caches (its own model, not this machine's) and each front
reports the data reads that miss the first level and the last level a call: where a change moves cache misses
rather than instructions, this shows it without the machine's noise (and runs slower). Needs valgrind (Debian's
``valgrind``); a tree takes a few minutes. Run it alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uembed.bundle.loader import load_bundle  # noqa: E402
from uembed.loadtest.peers import grpc_request  # noqa: E402
from uembed.loadtest.servers import UvicornProcess, free_port  # noqa: E402
from uembed.loadtest.traffic import MOVIELENS_FEATURES  # noqa: E402
from uembed.model.data import movielens100k_table  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
WARM_UP_CALLS = 30


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def counted(dumps: Path, pid: int, before: set[Path]) -> tuple[dict[str, int], int]:
    """The events of the dump callgrind wrote last (its ``totals:`` line by its ``events:`` names: ``Ir`` the
    instructions, with ``--cache-sim`` also ``D1mr``, ``DLmr``...), and of the instructions those in the event
    loop's timer callbacks (:func:`timer_instructions`)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = [path for path in dumps.glob(f"callgrind.{pid}.*") if path not in before and path.stat().st_size]
        for path in new:
            text = path.read_text(errors="replace")
            names = re.search(r"^events:\s+(.+)$", text, re.MULTILINE)
            totals = re.search(r"^totals:\s+(.+)$", text, re.MULTILINE)
            if names and totals:
                return dict(zip(names.group(1).split(), map(int, totals.group(1).split()))), timer_instructions(path)
        time.sleep(0.5)
    raise RuntimeError(f"no callgrind dump of worker {pid} in {dumps}")


def timer_instructions(dump: Path) -> int:
    """Instructions in uvloop's timer callbacks, callees included. That work is driven by the clock, not by calls
    (above all the metrics flush, every half second), and a call under valgrind takes tens of times as long as
    without it, so it runs far more often a call than in a real run. Work a timer only schedules is not in it: the
    steps of a task it starts (a slow ASGI request's watch for its client, after 20 ms) run as the loop's other
    callbacks, and stay in the count."""
    annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
                               capture_output=True, text=True, check=True, timeout=300).stdout  # fmt: skip
    # one line per file the function's code came from (inlined headers too); a recursive entry ('2) is in them
    lines = [line for line in annotated.splitlines() if re.search(r":__pyx_f_6uvloop_4loop_11TimerHandle__run( |$)", line)]
    if not lines:
        print(f"warning: no uvloop TimerHandle._run in {dump} (another event loop, or its symbols stripped): "
              "nothing is subtracted", file=sys.stderr)  # fmt: skip
    return sum(int(line.split()[0].replace(",", "")) for line in lines)


class KeptAlive:
    """``/v1/score`` over one kept-alive HTTP/1.1 connection per client thread, as wrk sends it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def __call__(self, body: bytes) -> None:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            connection.request("POST", "/v1/score", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            connection.close()  # kept alive past the server's keep-alive timeout (a slow step between fronts): again
            connection.request("POST", "/v1/score", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"/v1/score answered {response.status}")


def batches(server: UvicornProcess) -> float:
    """Batches the worker has scored (read outside the counted calls: /metrics is a request too)."""
    return sum(value for name, value in server.metrics().items() if name.startswith("uembed_batch_examples_count"))


def measure(tree: Path, fronts: list[str], calls: int, in_flight: int, bundle: Path, work: Path,
            cache_sim: list[str] | None = None) -> dict[str, dict]:  # fmt: skip
    """Instructions a call of each front, and calls a batch, in one worker of ``tree`` under callgrind."""
    import grpc

    specs = load_bundle(bundle).feature_specs
    rows = movielens100k_table().slice(0, 640).to_pylist()
    requests = [[{k: row[k] for k in MOVIELENS_FEATURES} for row in rows[i : i + 64]] for i in range(0, 640, 64)]
    v1_bodies = [json.dumps({"examples": request}).encode() for request in requests]
    grpc_bodies = [grpc_request(load_bundle(bundle).name, request, specs) for request in requests]
    grpc_port = free_port()
    # UEMBED_REQUIRE_EXTENSION: a tree whose compiled extensions are missing or stale fails to start, rather than
    # being counted on the pure path
    server = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(bundle), "PYTHONPATH": str(tree),
                                                               "UEMBED_GRPC_PORT": str(grpc_port), "UEMBED_REQUIRE_EXTENSION": "1"},
                            work / f"{tree.name}.log")  # fmt: skip
    server.cwd = tree
    dumps = work / tree.name
    dumps.mkdir()
    # uvicorn execs no worker process for --workers 1: the valgrind'd process is the worker
    server.argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dumps}/callgrind.%p",
                   *(cache_sim or []), *server.argv]  # fmt: skip
    server.start(timeout_s=900)
    pid = server.process.pid
    results = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            infer = channel.unary_unary(INFER)
            v1 = KeptAlive(int(server.url.rsplit(":", 1)[1]))
            send = {"v1": lambda i: v1(v1_bodies[i % len(v1_bodies)]),
                    "grpc": lambda i: infer(grpc_bodies[i % len(grpc_bodies)], timeout=300)}  # fmt: skip
            callgrind_control("--instr=on", str(pid))
            with ThreadPoolExecutor(in_flight) as clients:
                for front in fronts:
                    everyone = threading.Barrier(in_flight)  # a warm-up call on every client thread: its connection open

                    def warm_up(i, front=front, everyone=everyone):
                        send[front](i)
                        everyone.wait(timeout=600)

                    list(clients.map(warm_up, range(in_flight)))
                    list(clients.map(send[front], range(WARM_UP_CALLS)))
                    batched = batches(server)
                    callgrind_control("--zero", str(pid))
                    list(clients.map(send[front], range(calls)))  # at most in_flight calls at once
                    before = set(dumps.glob("callgrind.*"))
                    callgrind_control("--dump", str(pid))
                    events, in_timers = counted(dumps, pid, before)
                    instructions = events["Ir"]
                    results[front] = {"instructions_per_call": round(instructions / calls),
                                      "of_them_in_timer_callbacks": round(in_timers / calls),
                                      "without_timer_callbacks": round((instructions - in_timers) / calls),
                                      "calls_per_batch": round(calls / max(batches(server) - batched, 1), 2)}  # fmt: skip
                    if cache_sim:  # data reads that miss the first level, and the last level, a call
                        results[front] |= {"d1_read_misses_per_call": round(events["D1mr"] / calls),
                                           "ll_read_misses_per_call": round(events["DLmr"] / calls)}  # fmt: skip
                    print(json.dumps({"tree": str(tree), "front": front, **results[front]}), flush=True)
    finally:
        server.stop(timeout_s=300)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts to compare (the first is the base)")
    parser.add_argument("--fronts", nargs="+", choices=("v1", "grpc"), default=["v1", "grpc"])
    parser.add_argument("--calls", type=int, default=200, help="calls counted per front")
    parser.add_argument("--in-flight", type=int, default=1,
                        help="calls in flight at once (1: each call its own batch; more: batches share their work)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "movielens100k" / "1",
                        help="the demo bundle (`uembed demo-bundle` makes it)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    parser.add_argument("--cache-sim", action="store_true",
                        help="also count the data reads that miss callgrind's simulated caches, a call")
    parser.add_argument("--last-level-bytes", type=int, metavar="BYTES",
                        help="with --cache-sim: the simulated last level's size (8-way, 64-byte lines), e.g. 1048576 for "
                             "a core's own L2 (callgrind models two levels; by default its last is this machine's)")  # fmt: skip
    parser.add_argument("--keep-dumps", type=Path, metavar="DIR",
                        help="keep callgrind's dumps here, one folder per tree (callgrind_annotate --inclusive=yes FILE "
                             "says which functions the instructions went to)")  # fmt: skip
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install valgrind)")
    if not (args.bundle / "manifest.json").exists():
        parser.error(f"no bundle at {args.bundle}: run `uembed demo-bundle` first")
    cache_sim = None
    if args.cache_sim:
        cache_sim = ["--cache-sim=yes", *([f"--LL={args.last_level_bytes},8,64"] if args.last_level_bytes else [])]
    per_tree = {}
    with tempfile.TemporaryDirectory() as work:
        for tree in args.trees:
            measured = measure(tree.resolve(), args.fronts, args.calls, args.in_flight, args.bundle.resolve(), Path(work),
                               cache_sim)  # fmt: skip
            per_tree[str(tree)] = measured
            if args.keep_dumps:
                shutil.copytree(Path(work) / tree.resolve().name, args.keep_dumps / tree.resolve().name, dirs_exist_ok=True)
    summary = {"calls": args.calls, "in_flight": args.in_flight, "cache_sim": cache_sim, "per_tree": per_tree}
    # the ratios of all a call's instructions, and of those outside the timer callbacks (the clock's work, which
    # valgrind's slowdown inflates: timer_instructions)
    for key, suffix in (("instructions_per_call", ""), ("without_timer_callbacks", "_without_timer_callbacks")):
        counts = {tree: {front: figures[key] for front, figures in fronts.items()} for tree, fronts in per_tree.items()}
        first = counts[str(args.trees[0])]
        summary[f"over_first_tree{suffix}"] = {tree: {front: round(n[front] / first[front], 3) for front in n}
                                               for tree, n in counts.items()}  # fmt: skip
        summary[f"grpc_over_v1{suffix}"] = {tree: round(n["grpc"] / n["v1"], 3) for tree, n in counts.items()
                                            if {"grpc", "v1"} <= n.keys()}  # fmt: skip
    if args.cache_sim:
        for key in ("d1_read_misses_per_call", "ll_read_misses_per_call"):
            first = per_tree[str(args.trees[0])]
            summary[f"over_first_tree_{key}"] = {tree: {front: round(f[key] / max(first[front][key], 1), 3) for front, f in fronts.items()}
                                                 for tree, fronts in per_tree.items()}  # fmt: skip
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
