"""``uembed bench --phases peers``: the request path beside its peers, side by side in one run.

The same bundle and the same scoring code (``uembed/serving/pipeline/encoding.py``, the row files, the ONNX dense net) served by:

    v1 REST     this service (``uembed serve``), ``POST /v1/score`` with JSON examples (its lean path)
    v2 REST     this service, the Open Inference Protocol's JSON form (``/v2/models/{name}/infer``)
    gRPC        this service, ``ModelInfer`` with binary tensors (``raw_input_contents``)
    LitServe    ``uembed/loadtest/litserve_app.py``: LitServe's servers and dynamic batching around the reference scorer
    naive       ``uembed/loadtest/naive_app.py``: a sync FastAPI route scoring each request alone

and this service's v2 REST and gRPC fronts measured again by Triton's perf_analyzer (``perf_analyzer.py``), which
sends its own random tensors shaped from the model's metadata and configuration (one set, reused), where it can be
installed;

with 1 and 2 workers each, requests of 8, 64 and 512 real MovieLens-100K examples. HTTP load comes from wrk
(closed loop: each connection sends as soon as its answer arrives, one thread, every request the next of the
bodies); gRPC load in the same shape from ``grpc_frames.py`` (:func:`frames_grpc`: one thread, a call in flight on each
connection, every call the next request, its HTTP/2 frames prepared before the run, so a call costs the client about
what a request costs wrk). Beside it, where it is installed, h2load (nghttp2's compiled HTTP/2 load generator,
:func:`h2load_grpc`), which sends one body a run: a process a connection, so that the calls in flight differ; the
calls a batch's replies release then arrive spread over sixteen processes' wake-ups, and the batches are smaller than
wrk's (``closed_h2load``). ``grpc_aio`` measures the gRPC front with client processes of grpcio's own (``grpc.aio``,
requests serialised once before the run): a Python client takes more of the cores the server needs. The client's CPU time
per call is reported for every closed loop. ``paired_with_v1`` measures gRPC and v1 again in rounds taking turns on
one service; with one worker ``paired_with_v1_pinned`` does it again with the worker's threads on one core and the
load generators on the others (:func:`server_on_its_own_core`), so neither client's CPU is taken from the server's
core, as where clients run on other machines. With one worker ``paired_with_ceiling`` measures v1 and the in-process
ceiling again in rounds taking turns (``v1_over_ceiling_paired``): the ceiling's own phase runs minutes before the
service's, and this machine's speed moves in between. The open loop sends at half of each front's saturated rate,
latency measured from each request's scheduled time (no coordinated omission): the Python load generator of
``uembed/loadtest/load.py`` for HTTP (a thread a connection on ``http.client``), then again the client of
``open_loop.py`` (requests prepared as bytes, one thread sending, one reading; ``*_prepared``), each with its CPU a
call (``client_cpu_ms_per_call``: a client that takes less of the shared cores keeps to its rate longer); for gRPC,
``grpc_frames``' open loop (8 connections, a call in flight on each, ``send_lag_p99_ms`` how late its sends went),
checked by the server, or the ``grpc.aio`` client's own schedule where only its front runs. Server and load
generators share this machine over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

from uembed.bundle.loader import load_bundle
from uembed.loadtest.grpc_frames import GIVE_UP_S, write_bodies
from uembed.loadtest.load import ceiling, movielens_requests, run_load, scoring_runtime, unloaded
from uembed.loadtest.open_loop import open_loop, sequential
from uembed.loadtest.perf_analyzer import find_perf_analyzer
from uembed.loadtest.servers import HttpProcess, ServeProcess, UvicornProcess, free_port, worker_pids
from uembed.model.demo import demo_bundle
from uembed.serving.protocols.http2 import STREAMS_PER_CONNECTION

SIZES = (8, 64, 512)
# What the phase can measure; --peer-fronts picks some (v1 and grpc alone: the gRPC-over-REST ratio in a minute).
KEPT_UP = 0.995  # an open loop that sent at least this share of the rate it offered measured the service

FRONTS = ("ceiling", "v1", "v2", "grpc", "grpc_aio", "perf_analyzer", "litserve", "naive")
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
WARM_UP_S = 2.0  # seconds of load on each front before it is measured (caches, the allocator, first calls)


# --- request bodies --------------------------------------------------------------------------


def feature_arrays(examples: list[dict], specs) -> dict[str, np.ndarray]:
    """One array per feature as a client builds it: a multivalent feature [N, W] padded with "", integer columns
    INT64, numeric columns FP64 (NaN for a missing value), any other column BYTES (strings)."""
    arrays = {}
    for name, spec in specs.items():
        values = [example.get(name) for example in examples]
        if spec.multivalent:
            lists = [[str(v) for v in value] if isinstance(value, list) else ([] if value is None else [str(value)]) for value in values]
            width = max(1, max(map(len, lists)))
            arrays[name] = np.array([items + [""] * (width - len(items)) for items in lists], dtype=object)
        elif all(type(value) is int for value in values):
            arrays[name] = np.array(values, dtype=np.int64)
        elif spec.kind == "numeric":
            arrays[name] = np.array([np.nan if value is None else float(value) for value in values], dtype=np.float64)
        else:
            arrays[name] = np.array(["" if value is None else str(value) for value in values], dtype=object)
    return arrays


DATATYPES = {np.dtype(np.int64): "INT64", np.dtype(np.float64): "FP64", np.dtype(object): "BYTES"}


def raw_bytes(array: np.ndarray) -> bytes:
    """A tensor's data as the binary extension and raw_input_contents carry it (BYTES: a 4-byte length per element)."""
    if array.dtype != object:
        return array.astype(array.dtype.newbyteorder("<")).tobytes()
    encoded = [value.encode() for value in array.ravel()]
    return b"".join(len(value).to_bytes(4, "little") + value for value in encoded)


def v2_json_body(examples: list[dict], specs) -> bytes:
    inputs = [{"name": name, "datatype": DATATYPES[array.dtype], "shape": list(array.shape), "data": array.ravel().tolist()}
              for name, array in feature_arrays(examples, specs).items()]  # fmt: skip
    return orjson.dumps({"inputs": inputs})


def grpc_request(model: str, examples: list[dict], specs) -> bytes:
    """A serialised ``ModelInferRequest`` with every input in ``raw_input_contents``."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in feature_arrays(examples, specs).items():
        tensor = request.inputs.add(name=name, datatype=DATATYPES[array.dtype])
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(raw_bytes(array))
    return request.SerializeToString()


# --- wrk (HTTP, closed loop) -----------------------------------------------------------------

WRK_SCRIPT = """
local bodies, i = {}, 0
function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  i = math.random(#bodies)
end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "{path}", {["Content-Type"] = "application/json"}, bodies[i])
end
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, path: str, bodies: list[bytes], seconds: float, connections: int, workdir: Path) -> dict:
    """Saturated requests/s and latency percentiles of ``POST path`` over ``connections`` keep-alive connections, for
    ``seconds`` rounded to whole seconds, at least one (wrk's -d takes no fraction)."""
    seconds = max(1, round(seconds))
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed; `make system-deps` installs it (apt-get install wrk)")
    script, lines = workdir / "post.lua", workdir / "bodies.jsonl"
    script.write_text(WRK_SCRIPT.replace("{path}", path))
    lines.write_bytes(b"\n".join(bodies) + b"\n")
    command = [binary, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url, "--", str(lines)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    figures = {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
               "requests_per_s": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), 1)}  # fmt: skip
    for q, value, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)$", out, re.M):
        figures[f"p{q}_ms"] = round(float(value) * UNITS[unit], 3)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    figures["non_2xx"] = int(errors.group(1)) if errors else 0
    # Reads cut at the end of the run (wrk closes its connections with answers on the way) count here too.
    figures["socket_errors"] = sum(map(int, sockets.groups())) if sockets else 0
    figures["failures"] = figures["non_2xx"] + figures["socket_errors"]
    # as the gRPC client reports it: on a machine the server shares, a load generator's CPU is the server's loss
    figures["client_cpu_ms_per_call"] = round(client_cpu_s / max(figures["requests"], 1) * 1000, 3)
    return figures


# --- the gRPC load client --------------------------------------------------------------------


def grpc_client_process(target: str, requests: list[bytes], seconds: float, concurrency: int, channels: int,
                        rate: float | None, start_at: float, results) -> None:  # fmt: skip
    """One load process: ``concurrency`` calls in flight over ``channels`` connections (closed loop), or calls sent
    at ``rate`` per second (open loop); puts (calls, failures, latencies, client CPU seconds) on ``results``."""
    import grpc

    async def run() -> tuple[int, dict[str, int], list[float], float]:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 * 2**20),
                   ("grpc.max_send_message_length", 64 * 2**20)]  # own connections: spread over SO_REUSEPORT workers
        opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
        await asyncio.gather(*(channel.channel_ready() for channel in opened))
        calls = [channel.unary_unary(INFER_METHOD) for channel in opened]  # bytes in, bytes out: no client-side protobuf
        latencies: list[float] = []
        failures: dict[str, int] = {}  # by status code
        counter = iter(range(10**9))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        begin = time.perf_counter()
        stop = begin + seconds

        async def one(index: int, scheduled: float) -> None:
            try:
                await calls[index % channels](requests[index % len(requests)], timeout=30)
            except grpc.aio.AioRpcError as error:
                failures[error.code().name] = failures.get(error.code().name, 0) + 1
            latencies.append(time.perf_counter() - scheduled)

        async def closed_loop() -> None:
            while time.perf_counter() < stop:
                await one(next(counter), time.perf_counter())

        if rate is None:
            await asyncio.gather(*(closed_loop() for _ in range(concurrency)))
        else:
            pending = set()
            for index in counter:
                scheduled = begin + index / rate
                if scheduled >= stop:
                    break
                await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                task = asyncio.create_task(one(index, scheduled))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending)
        elapsed = time.perf_counter() - begin
        for channel in opened:
            await channel.close()
        return len(latencies), failures, latencies, elapsed

    cpu = time.process_time()
    calls, failures, latencies, elapsed = asyncio.run(run())
    results.put((calls, failures, latencies, elapsed, time.process_time() - cpu))


def grpc_load(target: str, requests: list[bytes], seconds: float, processes: int = 2, concurrency: int = 16,
              rate: float | None = None) -> dict:  # fmt: skip
    """``concurrency`` calls in flight in all (closed loop) or ``rate`` calls/s in all (open loop), over
    ``processes`` client processes with two connections each."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 3.0  # the processes' imports and connections first
    workers = [context.Process(target=grpc_client_process, daemon=True, args=(
        target, requests, seconds, max(1, concurrency // processes), 2, rate / processes if rate else None, start_at, results))
        for _ in range(processes)]  # fmt: skip
    for worker in workers:
        worker.start()
    parts = [results.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join()
    calls = sum(p[0] for p in parts)
    latencies = np.concatenate([np.asarray(p[2]) for p in parts]) * 1000
    elapsed = max(p[3] for p in parts)
    by_code: dict[str, int] = {}
    for part in parts:
        for code, count in part[1].items():
            by_code[code] = by_code.get(code, 0) + count
    return {
        "client": "grpc.aio", "requests": calls, "failures": sum(by_code.values()), "failures_by_code": by_code,
        "requests_per_s": round(calls / elapsed, 1),
        **{f"p{q}_ms": round(float(np.percentile(latencies, q)), 3) for q in (50, 90, 99)},
        "client_cpu_ms_per_call": round(sum(p[4] for p in parts) / max(calls, 1) * 1000, 3),
    }  # fmt: skip


# --- h2load (gRPC, closed loop) -------------------------------------------------------------

# The calls one h2load run opens on its connection: the port ends a connection with GOAWAY after
# STREAMS_PER_CONNECTION streams, and h2load would not reconnect, so a run never reaches that many.
H2LOAD_CALLS_PER_CONNECTION = STREAMS_PER_CONNECTION - 512


def grpc_frame(request: bytes) -> bytes:
    """A serialised message as a gRPC call's body carries it: uncompressed, its length in four bytes, big-endian."""
    return b"\x00" + len(request).to_bytes(4, "big") + request


def h2load_run(binary: str, url: str, body: Path, calls: int, streams: int, timeout_s: float) -> tuple[int, int, float, float]:
    """One h2load run of ``calls`` calls over one connection: (calls answered 2xx, calls failed, mean and longest
    call in ms). h2load exits 0 whatever became of the calls; its counts say."""
    command = [binary, "-t1", "-c1", f"-m{streams}", f"-n{calls}", "-d", str(body), "-H", "content-type: application/grpc",
               "-H", "te: trailers", url]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    counts = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    done, failed = int(counts.group(1)), int(counts.group(2))
    # min, max and mean of the calls' times
    timing = re.search(r"time for request:\s+[\d.]+(?:us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    if not (timing and done):
        return done, failed, 0.0, 0.0
    return done, failed, float(timing.group(3)) * UNITS[timing.group(4)], float(timing.group(1)) * UNITS[timing.group(2)]


def h2load_grpc(target: str, requests: list[bytes], seconds: float, workdir: Path, connections: int = 16,
                streams: int = 1, calls_per_connection: int = H2LOAD_CALLS_PER_CONNECTION) -> dict:  # fmt: skip
    """Saturated ModelInfer calls from h2load (nghttp2's HTTP/2 load generator, compiled as wrk is, so the client
    takes little of a machine it shares with the server): ``connections`` connections with ``streams`` calls in
    flight each, closed loop (the default, 16 x 1, is wrk's shape for the HTTP fronts).

    Each connection is its own sequence of h2load runs until ``seconds`` have passed: the port ends a connection
    after a number of calls and h2load does not reconnect, so a run carries at most ``calls_per_connection`` calls
    and the next run opens a new connection at once (a fresh draw of the worker that accepts it, as a reconnecting
    client gets). h2load sends one body a run: each run sends the next of ``requests``, the connections starting
    at different ones, so the calls in flight together are different requests, as wrk's are. Runs after the
    first are sized by the rate seen so far to end near the deadline. h2load checks HTTP statuses only: the caller
    compares ``requests`` with the server's count of calls answered OK (:func:`h2load_grpc_checked`). Requests/s
    count the whole time, the runs' starts and connections included."""
    binary = shutil.which("h2load")
    if binary is None:
        raise RuntimeError("h2load is not installed; `make system-deps` installs it (apt-get install nghttp2-client)")
    url = f"http://{target}{INFER_METHOD}"
    folder = Path(tempfile.mkdtemp(prefix="h2load-", dir=workdir))
    bodies = []
    for index, request in enumerate(requests):
        bodies.append(folder / f"call-{index}.bin")
        bodies[-1].write_bytes(grpc_frame(request))
    totals = {"calls": 0, "failures": 0, "runs": 0, "weighted_ms": 0.0, "longest_ms": 0.0, "largest_run": 0}
    lock = threading.Lock()
    begin = time.perf_counter()
    deadline = begin + seconds

    def connection(index: int) -> None:
        calls, run = min(calls_per_connection, 50), 0  # a short first run, to learn the rate the rest are sized by
        while True:
            started = time.perf_counter()
            body = bodies[(index + run * connections) % len(bodies)]
            done, failed, mean_ms, longest_ms = h2load_run(binary, url, body, calls, streams, seconds + 120)
            took = time.perf_counter() - started
            with lock:
                totals["calls"] += done
                totals["failures"] += failed
                totals["runs"] += 1
                totals["weighted_ms"] += mean_ms * done
                totals["longest_ms"] = max(totals["longest_ms"], longest_ms)
                totals["largest_run"] = max(totals["largest_run"], calls)
            run += 1
            left = deadline - time.perf_counter()
            if left <= 0.02 or not done:
                return
            calls = min(calls_per_connection, max(10, round(done / took * left)))

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    threads = [threading.Thread(target=connection, args=(index,), daemon=True) for index in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begin
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(folder, ignore_errors=True)
    client_cpu_s = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    calls = totals["calls"]
    return {
        "client": "h2load", "requests": calls, "requests_per_s": round(calls / elapsed, 1), "failures": totals["failures"],
        "mean_ms": round(totals["weighted_ms"] / max(calls, 1), 3), "max_ms": round(totals["longest_ms"], 3),
        "h2load_runs": totals["runs"], "largest_run_calls": totals["largest_run"], "connections": connections, "streams": streams,
        "client_cpu_ms_per_call": round(client_cpu_s / max(calls, 1) * 1000, 3),
    }  # fmt: skip


def grpc_calls_by_code(server: HttpProcess) -> dict[str, float]:
    """The service's ModelInfer calls so far by gRPC status code, from its /metrics (every worker's, summed)."""
    found = {}
    for sample, value in server.metrics().items():
        if sample.startswith("uembed_grpc_requests_total{") and 'method="ModelInfer"' in sample:
            code = re.search(r'code="([^"]+)"', sample).group(1)
            found[code] = found.get(code, 0.0) + value
    return found


def checked_by_server(server: HttpProcess, load) -> dict:
    """``load()``'s figures (a closed or an open loop of ModelInfer calls), its calls checked against the server's
    count by gRPC status: a call the client counted answered that the server did not answer OK is a failure (h2load and
    ``grpc_frames`` read HTTP statuses and trailers' ends, not the status in them). Only valid while nothing else
    calls ModelInfer on the server; with several workers the server's /metrics must sum them
    (PROMETHEUS_MULTIPROC_DIR), or the other workers' calls would count as missing."""
    if server.workers > 1 and not (server.env.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR")):
        raise ValueError(f"{server.workers} workers without PROMETHEUS_MULTIPROC_DIR: /metrics would be one worker's, "
                         "and the gRPC calls could not be checked")  # fmt: skip
    codes = grpc_calls_by_code(server)
    figures = load()
    answered = {code: count - codes.get(code, 0.0) for code, count in grpc_calls_by_code(server).items()}
    not_ok, ok = round(sum(count for code, count in answered.items() if code != "OK")), round(answered.get("OK", 0.0))
    # calls the client counted as answered that the server did not answer OK: an error in the trailers, or none
    missing = max(0, figures["requests"] - ok)
    # every call the client made is counted once, answered or failed: those the server did not answer OK failed
    calls = figures["requests"] + figures["failures"]
    return figures | {"failures": max(figures["failures"] + missing, calls - ok), "not_ok": not_ok, "calls": calls,
                      "answered_ok": ok}  # fmt: skip


def h2load_grpc_checked(server: HttpProcess, requests: list[bytes], seconds: float, workdir: Path, connections: int) -> dict:
    """:func:`h2load_grpc` over ``connections`` connections, a call in flight on each, checked by the server."""
    return checked_by_server(server, lambda: h2load_grpc(server.grpc_target, requests, seconds, workdir, connections=connections))


def frames_grpc(target: str, requests: list[bytes], seconds: float, workdir: Path, connections: int = 16,
                rate: float | None = None) -> dict:  # fmt: skip
    """Saturated ModelInfer calls in wrk's shape (``grpc_frames``: one thread, ``connections`` connections, a call
    in flight on each, every call the next request), or with ``rate`` calls a second at evenly spaced times (its open
    loop, latencies from the scheduled times), from a process of its own; with its CPU a call."""
    bodies = Path(tempfile.mkdtemp(prefix="grpc-frames-", dir=workdir)) / "requests.bin"
    try:
        write_bodies(bodies, requests)
        command = [sys.executable, "-m", "uembed.loadtest.grpc_frames", "--target", target, "--path", INFER_METHOD,
                   "--bodies", str(bodies), "--seconds", str(seconds), "--connections", str(connections)]  # fmt: skip
        if rate is not None:
            command += ["--rate", str(rate)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + GIVE_UP_S + 60)
    finally:
        shutil.rmtree(bodies.parent, ignore_errors=True)
    if done.returncode:
        raise RuntimeError(f"the gRPC load client failed: {done.stderr.strip()[-2000:]}")
    figures = json.loads(done.stdout)
    if not figures["requests"]:
        raise RuntimeError(f"the gRPC load client's calls all failed ({figures['failures']}): see the server's log")
    client_cpu_s = figures.pop("client_cpu_s")  # while it loaded: its interpreter's start left out (wrk's is negligible)
    return figures | {"client_cpu_ms_per_call": round(client_cpu_s / figures["requests"] * 1000, 3)}


def frames_grpc_checked(server: HttpProcess, requests: list[bytes], seconds: float, workdir: Path, connections: int,
                        rate: float | None = None) -> dict:  # fmt: skip
    """:func:`frames_grpc`, checked by the server."""
    return checked_by_server(server, lambda: frames_grpc(server.grpc_target, requests, seconds, workdir, connections, rate))


# --- the run ---------------------------------------------------------------------------------


class LitServeProcess(HttpProcess):
    def __init__(self, bundle: Path, log_path: Path, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "uembed.loadtest.litserve_app", "--bundle", str(bundle), "--port", str(self.port),
                "--workers", str(workers)]  # fmt: skip
        super().__init__(argv, {}, log_path, f"{self.url}/health", "litserve")

    def stop(self, timeout_s: float = 20) -> int:
        """LitServe's server process outlives SIGTERM to the parent (and keeps polling its queues, a tenth of a
        core each): the whole tree is stopped, children first seen before the parent goes."""
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        code = super().stop(timeout_s)
        for child in children:
            try:
                child.terminate()
            except psutil.NoSuchProcess:
                pass
        gone, alive = psutil.wait_procs(children, timeout=timeout_s)
        for child in alive:
            child.kill()
        return code


def process_cpu_seconds(server: HttpProcess) -> dict[int, float]:
    """CPU seconds so far of a server's process and all its descendants (its workers), by pid."""
    import psutil

    root = psutil.Process(server.process.pid)
    seconds = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def grpc_open_loop(results: dict, workers: str, size: str) -> dict | None:
    """The gRPC open loop's figures (on the grpc front, or grpc_aio's where only it ran)."""
    for front in ("grpc", "grpc_aio"):
        if half := results.get(front, {}).get(workers, {}).get(size, {}).get("open_at_half"):
            return half
    return None


def answered_ok_share(figures: dict | None) -> float | None:
    """The share of an open loop's calls answered OK: by the server's count over every call made where the figures
    were checked by it (:func:`checked_by_server`), else (grpc.aio's, whose calls each carry their status) one less
    the failures' share."""
    if not figures:
        return None
    if "answered_ok" in figures:
        return round(figures["answered_ok"] / figures["calls"], 4) if figures["calls"] else None
    return round(1 - figures["failures"] / figures["requests"], 4) if figures.get("requests") else None


def client_cpu(load) -> dict:
    """``load()``'s figures with this process's CPU time a request meanwhile: the client's, where it runs here."""
    before = time.process_time()
    figures = load()
    return figures | {"client_cpu_ms_per_call": round((time.process_time() - before) / max(figures["requests"], 1) * 1000, 3)}


def cpu_split(server: HttpProcess, load):
    """``load()``'s figures with the CPU seconds each of the server's processes spent meanwhile, busiest first:
    with several workers, how the kernel and the workers' accept loops happened to spread the connections."""
    workers = worker_pids(server)
    before = process_cpu_seconds(server)
    figures = load()
    after = process_cpu_seconds(server)
    spent = sorted((after[pid] - before.get(pid, 0.0) for pid in after), reverse=True)
    # each serving process's, busiest first, an idle one included: how the connections spread over the workers
    figures = figures | {"worker_cpu_s": sorted((round(after.get(pid, 0.0) - before.get(pid, 0.0), 2) for pid in workers), reverse=True)}
    # the server's cost of a call, apart from how much of the machine the load generator left it
    per_call = round(sum(spent) / max(figures["requests"], 1) * 1000, 3)
    return figures | {"server_cpu_s": [round(s, 1) for s in spent if s >= 0.05], "server_cpu_ms_per_call": per_call}


def run_peers(args, workdir: Path, report) -> None:
    bundle_path = args.bundle or demo_bundle(args.bundle_store)
    bundle = load_bundle(bundle_path)
    specs, model = bundle.feature_specs, bundle.name
    requests = {size: movielens_requests(size, count=64 if size >= 512 else 200) for size in args.peer_sizes}
    bodies = {
        "v1": {size: [orjson.dumps({"examples": r}) for r in rs] for size, rs in requests.items()},
        "v2": {size: [v2_json_body(r, specs) for r in rs] for size, rs in requests.items()},
        "grpc": {size: [grpc_request(model, r, specs) for r in rs] for size, rs in requests.items()},
    }
    paths = {"v1": "/v1/score", "v2": f"/v2/models/{model}/infer"}
    seconds, connections = args.seconds, args.concurrency
    warm_up_s = min(WARM_UP_S, seconds)  # a short run (the suite's) warms up no longer than it measures
    open_size = 64 if 64 in args.peer_sizes else args.peer_sizes[0]
    fronts = set(getattr(args, "peer_fronts", None) or FRONTS)
    results: dict = {}
    runtime = scoring_runtime(bundle_path) if "ceiling" in fronts else None  # opened once: measured again beside v1
    for size in args.peer_sizes if "ceiling" in fronts else ():  # the scoring work alone, one request at a time, no HTTP: what a front could reach
        results.setdefault("ceiling", {})[str(size)] = ceiling(bundle_path, requests[size], seconds, runtime)
        report(f"peers ceiling {size}", results["ceiling"][str(size)])

    def measure(front: str, workers: int, size: int, figures: dict) -> None:
        results.setdefault(front, {}).setdefault(f"{workers}w", {})[str(size)] = figures
        report(f"peers {front} {workers}w {size}", figures)

    def http_front(front: str, server: HttpProcess, workers: int, body_kind: str) -> None:
        url = server.url
        for size in args.peer_sizes:
            wrk(url, paths[body_kind], bodies[body_kind][size], warm_up_s, connections, workdir)  # warm-up
            saturated = cpu_split(server, lambda: wrk(url, paths[body_kind], bodies[body_kind][size], seconds, connections, workdir))
            measure(front, workers, size, {"closed": saturated})
            if size == open_size and saturated["requests_per_s"] > 0:
                alone = unloaded(url, bodies[body_kind][size], 200, path=paths[body_kind]).summary()
                results[front][f"{workers}w"][str(size)]["unloaded"] = alone
                rate = saturated["requests_per_s"] / 2
                # the server's CPU a call here too: spaced requests make small batches, each dearer than a saturated one's
                half = cpu_split(server, lambda: client_cpu(lambda: run_load(url, bodies[body_kind][size], seconds, 8, rate=rate, path=paths[body_kind]).summary()))
                half = half | {"offered_per_s": round(rate, 1)}
                results[front][f"{workers}w"][str(size)]["open_at_half"] = half
                report(f"peers {front} {workers}w {size} unloaded, open loop", {"unloaded": alone, "open_at_half": half})
                # the same by the client of prepared requests (open_loop.py), which takes less of the shared cores
                alone = sequential(url, bodies[body_kind][size], 200, path=paths[body_kind]).summary()
                half = cpu_split(server, lambda: client_cpu(lambda: open_loop(url, bodies[body_kind][size], seconds, rate, 8, path=paths[body_kind]).summary()))
                half = half | {"offered_per_s": round(rate, 1)}
                results[front][f"{workers}w"][str(size)] |= {"unloaded_prepared": alone, "open_at_half_prepared": half}
                report(f"peers {front} {workers}w {size} unloaded, open loop, prepared requests", {"unloaded": alone, "open_at_half": half})

    analyzer = find_perf_analyzer() if "perf_analyzer" in fronts else None
    if isinstance(analyzer, str):
        report("peers perf_analyzer", {"skipped": analyzer})
        analyzer = None

    for workers in args.peer_workers:
        # `uembed serve`, as users start it; with several workers /metrics sums every worker's series (ServeProcess
        # gives them a directory), as the gRPC check needs
        service = ServeProcess(bundle_path, workdir / f"service-{workers}w.log", workers=workers).start()
        try:
            for front in ("v1", "v2"):
                if front in fronts:
                    http_front(front, service, workers, front)
            for size in args.peer_sizes if workers == 1 and {"v1", "ceiling"} <= fronts else ():
                paired = paired_v1_and_ceiling(service, bodies["v1"][size], runtime, requests[size], seconds, connections, workdir)
                results["v1"]["1w"][str(size)]["paired_with_ceiling"] = paired
                report(f"peers v1 1w {size} paired with the ceiling", paired)
            for size in args.peer_sizes if fronts & {"grpc", "grpc_aio"} else ():
                calls = bodies["grpc"][size]
                if "grpc" in fronts:  # wrk's shape: one thread, a call in flight on each connection, every call the next request
                    frames_grpc_checked(service, calls, warm_up_s, workdir, connections)  # warm-up
                    saturated = cpu_split(service, lambda: frames_grpc_checked(service, calls, seconds, workdir, connections))
                    measure("grpc", workers, size, {"closed": saturated})
                    if shutil.which("h2load"):  # the compiled client, one process a connection (it sends one body a run)
                        by_h2load = cpu_split(service, lambda: h2load_grpc_checked(service, calls, seconds, workdir, connections))
                        results["grpc"][f"{workers}w"][str(size)]["closed_h2load"] = by_h2load
                        report(f"peers grpc {workers}w {size} by h2load", by_h2load)
                if "grpc_aio" in fronts:  # grpcio's own client, in Python processes
                    grpc_load(service.grpc_target, calls, warm_up_s, concurrency=connections)  # warm-up
                    saturated = cpu_split(service, lambda: grpc_load(service.grpc_target, calls, seconds, concurrency=connections))
                    measure("grpc_aio", workers, size, {"closed": saturated})
                # the open loop at half the saturated calls/s: grpc_frames' (the HTTP open loop's 8 connections), or
                # grpc.aio's where only its front ran (it takes more of the shared cores a call)
                front = "grpc" if "grpc" in fronts else "grpc_aio"
                if size == open_size:
                    rate = results[front][f"{workers}w"][str(size)]["closed"]["requests_per_s"] / 2
                    if front == "grpc":
                        half = cpu_split(service, lambda: frames_grpc_checked(service, calls, seconds, workdir, 8, rate))
                    else:
                        half = grpc_load(service.grpc_target, calls, seconds, rate=rate)
                    results[front][f"{workers}w"][str(size)]["open_at_half"] = half | {"offered_per_s": round(rate, 1)}
                    report(f"peers {front} {workers}w {size} open loop", half)
            if {"v1", "grpc"} <= fronts:
                for size in args.peer_sizes:
                    paired = paired_grpc_and_v1(service, bodies["v1"][size], bodies["grpc"][size], seconds, connections, workdir)
                    results["grpc"][f"{workers}w"][str(size)]["paired_with_v1"] = paired
                    report(f"peers grpc {workers}w {size} paired with v1", paired)
                    if workers > 1:
                        continue
                    with server_on_its_own_core(service) as pinned:
                        if pinned:
                            paired = paired_grpc_and_v1(service, bodies["v1"][size], bodies["grpc"][size], seconds, connections, workdir)
                            paired["server_cores"], paired["client_cores"] = pinned
                            results["grpc"][f"{workers}w"][str(size)]["paired_with_v1_pinned"] = paired
                            report(f"peers grpc {workers}w {size} paired with v1, the worker on a core of its own", paired)
            if analyzer is not None:  # the same fronts measured by the tool Triton users trust, its own data
                for protocol, url in (("http", service.url.removeprefix("http://")), ("grpc", service.grpc_target)):
                    for size in args.peer_sizes:
                        figures = analyzer.measure(model, url, protocol, size, connections, workdir, seconds)
                        measure(f"perf_analyzer {protocol}", workers, size, {"closed": figures})
        finally:
            service.stop()
        if "litserve" in fronts:
            run_litserve(bundle_path, workdir, workers, http_front)
        if "naive" in fronts:
            run_naive(bundle_path, workdir, workers, http_front)

    report("peers", results)
    report("peers_ratios", peer_ratios(results))


PAIRED_ROUNDS = 4
FRONT_ROUND_KEYS = ("requests_per_s", "server_cpu_ms_per_call", "failures")  # a front's figures in a paired round


def threads_of(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


RESTORE_SWEEPS = 20


@contextlib.contextmanager
def server_on_its_own_core(server: HttpProcess):
    """Within the block, every thread of ``server``'s processes runs on this process's last core (the first tends to
    take the machine's interrupts), and this process's threads (so the load generators they start) on its other
    cores; yields (server cores, client cores), or None where this process has a single core or the server's threads
    could not be moved (nothing is then left moved). After the block every thread of both gets back the cores it had,
    and a thread started meanwhile (it inherited its creator's) those of its process."""
    import psutil

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        yield None
        return
    root = psutil.Process(server.process.pid)

    def server_threads() -> list[int]:
        return [tid for process in [root, *root.children(recursive=True)] for tid in threads_of(process.pid)]

    server_cores, client_cores = set(cores[-1:]), set(cores[:-1])
    own_cores, serving_cores = set(cores), os.sched_getaffinity(server.process.pid)
    before = {}
    for tid in server_threads() + threads_of(os.getpid()):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            before[tid] = os.sched_getaffinity(tid)

    def move(threads: list[int], to: set[int]) -> None:
        for tid in threads:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, to)

    def restore() -> None:
        # The threads there before first: a thread they start from then on inherits their own cores again. Then those
        # started meanwhile, with the pinned cores they inherited, sweep after sweep (one may have started another).
        for tid, cores_before in before.items():
            move([tid], cores_before)
        for _ in range(RESTORE_SWEEPS):
            pinned = [tid for tid in server_threads() if tid not in before and affinity(tid) == server_cores]
            own = [tid for tid in threads_of(os.getpid()) if tid not in before and affinity(tid) == client_cores]
            if not pinned and not own:
                break
            move(pinned, serving_cores)
            move(own, own_cores)

    try:
        move(server_threads(), server_cores)
        moved = all(affinity(tid) in (server_cores, None) for tid in server_threads())
        if moved:
            move(threads_of(os.getpid()), client_cores)
        yield (sorted(server_cores), sorted(client_cores)) if moved else None
    finally:
        restore()


def affinity(tid: int) -> set[int] | None:
    """A thread's cores; None where it has ended."""
    try:
        return os.sched_getaffinity(tid)
    except OSError:
        return None


def paired_rounds(measures: dict[str, Callable[[int], dict]], keys: dict[str, tuple[str, ...]], seconds: float) -> tuple[list[dict], int]:
    """Two measures (name -> a measure of so many whole seconds) in ``PAIRED_ROUNDS`` rounds of half ``seconds`` each,
    the order flipped every round: this machine's speed drifts between phases seconds apart, and a drift within a
    round falls on both. Each round's row holds each measure's ``keys[name]`` and which went first."""
    round_s = max(1, round(seconds / 2))  # whole seconds, as wrk takes them, for both
    names = list(measures)
    rounds = []
    for round_ in range(PAIRED_ROUNDS):
        order = names if round_ % 2 == 0 else names[::-1]
        figures = {name: measures[name](round_s) for name in order}
        rounds.append({name: {key: figures[name][key] for key in keys[name]} for name in names}
                      | {"first": order[0]})  # fmt: skip
    return rounds, round_s


def paired_grpc_and_v1(service: HttpProcess, v1_bodies: list[bytes], calls: list[bytes], seconds: float, connections: int,
                       workdir: Path) -> dict:  # fmt: skip
    """gRPC (``grpc_frames``) over REST v1 (wrk) in rounds taking turns on the same service (:func:`paired_rounds`).
    The median of the rounds' ratios is the run's figure."""
    rounds, round_s = paired_rounds({
        "v1": lambda s: cpu_split(service, lambda: wrk(service.url, "/v1/score", v1_bodies, s, connections, workdir)),
        "grpc": lambda s: cpu_split(service, lambda: frames_grpc_checked(service, calls, s, workdir, connections)),
    }, dict.fromkeys(("v1", "grpc"), FRONT_ROUND_KEYS), seconds)  # fmt: skip
    for row in rounds:
        row["grpc_over_v1"] = round(row["grpc"]["requests_per_s"] / row["v1"]["requests_per_s"], 3)
    return {"rounds": rounds, "round_s": round_s, "grpc_over_v1_median": round(float(np.median([r["grpc_over_v1"] for r in rounds])), 3),
            # a call's server CPU, gRPC's over v1's: the same comparison apart from how much of the machine each had
            "grpc_over_v1_server_cpu_median": round(float(np.median([r["grpc"]["server_cpu_ms_per_call"] / r["v1"]["server_cpu_ms_per_call"]
                                                                     for r in rounds])), 3)}  # fmt: skip


def paired_v1_and_ceiling(service: HttpProcess, v1_bodies: list[bytes], runtime, requests: list[list[dict]], seconds: float,
                          connections: int, workdir: Path) -> dict:  # fmt: skip
    """REST v1 (wrk, one worker) over the in-process ceiling (the same requests scored one at a time in this
    process, no HTTP, the bundle opened once) in rounds taking turns (:func:`paired_rounds`): the ceiling measured
    once, minutes before the service, moves with the machine's speed in between. The median of the rounds' ratios."""
    rounds, round_s = paired_rounds({
        "v1": lambda s: cpu_split(service, lambda: wrk(service.url, "/v1/score", v1_bodies, s, connections, workdir)),
        "ceiling": lambda s: ceiling(None, requests, s, runtime),
    }, {"v1": FRONT_ROUND_KEYS, "ceiling": ("requests_per_s",)}, seconds)  # fmt: skip
    for row in rounds:
        row["v1_over_ceiling"] = round(row["v1"]["requests_per_s"] / row["ceiling"]["requests_per_s"], 3)
    return {"rounds": rounds, "round_s": round_s,
            "v1_over_ceiling_median": round(float(np.median([r["v1_over_ceiling"] for r in rounds])), 3)}  # fmt: skip


def run_litserve(bundle_path: Path, workdir: Path, workers: int, http_front) -> None:
    litserve = LitServeProcess(bundle_path, workdir / f"litserve-{workers}w.log", workers).start(timeout_s=120)
    try:
        http_front("litserve", litserve, workers, "v1")
    finally:
        litserve.stop()


def run_naive(bundle_path: Path, workdir: Path, workers: int, http_front) -> None:
    naive = UvicornProcess("uembed.loadtest.naive_app:create_app", {"NAIVE_BUNDLE": str(bundle_path)},
                           workdir / f"naive-{workers}w.log", workers=workers).start()  # fmt: skip
    try:
        http_front("naive", naive, workers, "v1")
    finally:
        naive.stop()


def peer_ratios(results: dict) -> dict:
    """The issue's goals at 64 examples with 1 worker, and the same ratios for every size and worker count."""
    out = {}
    for workers in results.get("v1", {}):
        for size in results["v1"][workers]:
            rate = {front: results[front][workers][size]["closed"]["requests_per_s"] for front in results
                    if size in results[front].get(workers, {})}  # fmt: skip
            key = f"{workers} {size}"
            v1 = results["v1"][workers][size]
            half, alone = v1.get("open_at_half"), v1.get("unloaded")
            one_worker = results["v1"].get("1w", {}).get(size)
            cpu = v1["closed"].get("worker_cpu_s") or []
            half_cpu = (half or {}).get("worker_cpu_s") or []
            # the open loop's tail is the service's only where the load generator kept up with the rate it offered: a
            # client even slightly behind has queued its own sends long enough to swamp the service's tail (KEPT_UP)
            achieved = round(half["requests_per_s"] / half["offered_per_s"], 3) if half and half.get("offered_per_s") else None
            prepared, prepared_alone = v1.get("open_at_half_prepared"), v1.get("unloaded_prepared")
            prepared_achieved = round(prepared["requests_per_s"] / prepared["offered_per_s"], 3) if prepared and prepared.get("offered_per_s") else None
            out[key] = {
                "v1_half_load_achieved_over_offered": achieved,
                "v1_p99_at_half_over_unloaded_p50": round(half["p99_ms"] / alone["p50_ms"], 2)
                if half and alone and achieved is not None and achieved >= KEPT_UP else None,
                # the same by the client of prepared requests (open_loop.py), its unloaded p50 its own too
                "v1_half_load_achieved_over_offered_prepared": prepared_achieved,
                "v1_p99_at_half_over_unloaded_p50_prepared": round(prepared["p99_ms"] / prepared_alone["p50_ms"], 2)
                if prepared and prepared_alone and prepared_achieved is not None and prepared_achieved >= KEPT_UP else None,
                # a call's server CPU in the open loop over a saturated one's: the dearer small batches at half load
                "v1_server_cpu_at_half_over_saturated": round(half["server_cpu_ms_per_call"] / v1["closed"]["server_cpu_ms_per_call"], 2)
                if half and half.get("server_cpu_ms_per_call") and v1["closed"].get("server_cpu_ms_per_call") else None,
                "v1_over_1_worker": round(rate["v1"] / one_worker["closed"]["requests_per_s"], 2)
                if workers != "1w" and one_worker else None,
                # the busiest worker's CPU seconds over the least busy one's: how evenly the connections spread (an idle
                # worker: None, its 0 in v1_worker_cpu_s)
                "v1_worker_cpu_spread": round(cpu[0] / cpu[-1], 2) if len(cpu) > 1 and cpu[-1] else None,
                "v1_worker_cpu_s": cpu if len(cpu) > 1 else None,
                # the same at half load, where a client's connections opened at once once landed on one worker
                "v1_half_load_worker_cpu_spread": round(half_cpu[0] / half_cpu[-1], 2) if len(half_cpu) > 1 and half_cpu[-1] else None,
                "v1_half_load_worker_cpu_s": half_cpu if len(half_cpu) > 1 else None,
                "v1_over_litserve": round(rate["v1"] / rate["litserve"], 2) if "litserve" in rate else None,
                "v1_over_naive": round(rate["v1"] / rate["naive"], 2) if "naive" in rate else None,
                "grpc_over_v1": round(rate["grpc"] / rate["v1"], 2) if "grpc" in rate else None,
                # the same from rounds taking turns on one service (the median of their ratios), where they ran
                "grpc_over_v1_paired": results["grpc"][workers][size].get("paired_with_v1", {}).get("grpc_over_v1_median")
                if "grpc" in rate else None,
                # and with the worker on a core of its own, the load generators on the others (1 worker)
                "grpc_over_v1_paired_pinned": results["grpc"][workers][size].get("paired_with_v1_pinned", {}).get("grpc_over_v1_median")
                if "grpc" in rate else None,
                # the same front loaded by h2load, a process a connection (its calls spread over their wake-ups)
                "grpc_h2load_over_v1": round(results["grpc"][workers][size]["closed_h2load"]["requests_per_s"] / rate["v1"], 2)
                if "closed_h2load" in results.get("grpc", {}).get(workers, {}).get(size, {}) else None,
                # the same front loaded by the Python client (grpc.aio), which takes a share of a shared machine
                "grpc_aio_over_v1": round(rate["grpc_aio"] / rate["v1"], 2) if "grpc_aio" in rate else None,
                # gRPC's open loop: the share of its calls answered OK (by the server's count where it was checked:
                # grpc_frames', which holds a call a connection, so that the service's queue cannot fill and shed
                # calls, UNAVAILABLE, as it did under grpc.aio's late calls sent at once)
                "grpc_half_load_answered_ok": answered_ok_share(grpc_open_loop(results, workers, size)),
                # and the calls/s it kept to, over those it offered: a client behind its schedule (its connections
                # all busy) measures its own wait, as the v1 open loop's (KEPT_UP)
                "grpc_half_load_achieved_over_offered": round(grpc_half["requests_per_s"] / grpc_half["offered_per_s"], 3)
                if (grpc_half := grpc_open_loop(results, workers, size)) and grpc_half.get("offered_per_s") else None,
                "v2_over_v1": round(rate["v2"] / rate["v1"], 2) if "v2" in rate else None,
                "perf_analyzer_grpc_over_http": round(rate["perf_analyzer grpc"] / rate["perf_analyzer http"], 2)
                if "perf_analyzer http" in rate and "perf_analyzer grpc" in rate else None,
                "v1_over_ceiling": round(rate["v1"] / results["ceiling"][size]["requests_per_s"], 2)
                if size in results.get("ceiling", {}) else None,
                # the same from rounds taking turns with the ceiling (1 worker), the median of their ratios
                "v1_over_ceiling_paired": v1.get("paired_with_ceiling", {}).get("v1_over_ceiling_median"),
            }  # fmt: skip
    return out
