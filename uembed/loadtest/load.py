"""The load generator and the in-process ceiling every benchmark phase measures with: closed and open loops of
HTTP requests from threads on keep-alive connections, one request at a time, and the scoring work alone."""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path

from uembed.loadtest.results import LoadResult
from uembed.loadtest.servers import UvicornProcess
from uembed.loadtest.traffic import MovieLensExamples
from uembed.serving.engine import ScoringEngine
from uembed.serving.settings import load_settings


def movielens_requests(examples_per_request: int, count: int = 200, seed: int = 0) -> list[list[dict]]:
    examples = MovieLensExamples(seed)
    return [examples.batch(examples_per_request) for _ in range(count)]


# --- load generation -------------------------------------------------------------------------


def post(connection: http.client.HTTPConnection, body: bytes, path: str = "/v1/score") -> bool:
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status == 200


def run_load(url: str, bodies: list[bytes], seconds: float, concurrency: int, rate: float | None = None,
             path: str = "/v1/score") -> LoadResult:  # fmt: skip
    """Closed loop (``rate`` None: each thread sends as fast as answers come) or open loop at ``rate``
    requests/s, latency measured from the scheduled send time (no coordinated omission)."""
    host, port = url.removeprefix("http://").split(":")
    lock = threading.Lock()
    latencies: list[float] = []
    failures = 0
    counter = iter(range(10**9))
    start = time.perf_counter() + 0.05
    stop_at = start + seconds

    def worker(seed: int) -> None:
        nonlocal failures
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        local, local_failures = [], 0
        while True:
            if rate is None:
                scheduled = time.perf_counter()
            else:
                scheduled = start + next(counter) / rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            if scheduled >= stop_at:
                break
            try:
                ok = post(connection, bodies[(seed * 7919 + len(local)) % len(bodies)], path)
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
            local.append(time.perf_counter() - scheduled)
            local_failures += not ok
        with lock:
            latencies.extend(local)
            failures += local_failures
        connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(len(latencies), failures, time.perf_counter() - start, latencies)


def unloaded(url: str, bodies: list[bytes], requests: int, path: str = "/v1/score") -> LoadResult:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    latencies, failures = [], 0
    started = time.perf_counter()
    try:
        for i in range(requests):
            sent = time.perf_counter()
            failures += not post(connection, bodies[i % len(bodies)], path)
            latencies.append(time.perf_counter() - sent)
    finally:
        connection.close()
    return LoadResult(requests, failures, time.perf_counter() - started, latencies)


# --- phases ----------------------------------------------------------------------------------


def scoring_runtime(bundle_path: Path):
    """The bundle opened as the service opens it, in this process: the ceiling's scorer."""
    return ScoringEngine(load_settings()).registry.open(bundle_path)


def ceiling(bundle_path: Path | None, requests: list[list[dict]], seconds: float, runtime=None) -> dict:
    """Requests/s of the scoring work alone, one request per batch, in this process (on ``runtime``, an opened
    bundle that measures again without opening it anew, else the bundle at ``bundle_path``)."""
    runtime = scoring_runtime(bundle_path) if runtime is None else runtime
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runtime.score_batch([runtime.canonicalise(requests[done % len(requests)])])
        done += 1
    elapsed = time.perf_counter() - started
    return {"requests": done, "requests_per_s": round(done / elapsed, 1)}


def http_phase(app: str, env: dict, bodies: list[bytes], seconds: float, concurrency: int, workdir: Path,
               half_load: bool, workers: int = 1) -> dict:  # fmt: skip
    server = UvicornProcess(app, env, workdir / f"{app.split(':')[0].rsplit('.', 1)[-1]}.log", workers=workers).start()
    try:
        run_load(server.url, bodies, 1.0, concurrency)  # warm-up: tier 1, allocator, connections
        single = unloaded(server.url, bodies, 200)
        saturated = run_load(server.url, bodies, seconds, concurrency)
        out = {"unloaded": single.summary(), "saturated": saturated.summary()}
        if half_load:
            half = run_load(server.url, bodies, seconds, 8, rate=saturated.throughput / 2)
            out["half_saturation"] = half.summary() | {"offered_per_s": round(saturated.throughput / 2, 1)}
        return out
    finally:
        server.stop()
