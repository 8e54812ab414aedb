"""The peer benchmark (``uembed bench --peers``, uembed/loadtest/peers.py): its request bodies carry the same examples on
every front, and the whole phase runs end to end against real servers (this service, LitServe, the naive
service) with wrk, h2load and the gRPC load client."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import orjson
import psutil
import pytest
from tritonclient.grpc import service_pb2

from uembed.bundle.loader import load_bundle
from uembed.cli.service_commands import PEER_FRONTS
from uembed.loadtest.load import movielens_requests
from uembed.loadtest.peers import (
    FRONTS,
    answered_ok_share,
    cpu_split,
    frames_grpc_checked,
    grpc_calls_by_code,
    grpc_request,
    h2load_grpc,
    h2load_grpc_checked,
    peer_ratios,
    run_peers,
    server_on_its_own_core,
    threads_of,
    v2_json_body,
    wrk,
)
from uembed.loadtest.servers import SERVICE_APP, ServeProcess, UvicornProcess, wait_until, worker_pids
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.protocols.oip import InputTensor, columns_from_inputs
from uembed.serving.protocols.oip_grpc import read_inputs


@pytest.fixture(scope="module")
def runtime(synthetic_store):
    return ModelRuntime(load_bundle(synthetic_store / "movielens" / "1"))


def test_every_front_s_body_holds_the_same_examples(runtime):
    """The v2 JSON body and the gRPC request decode, through the service's own readers, to columns that score
    exactly as the v1 examples they were built from."""
    examples = movielens_requests(64, count=1)[0]
    specs = runtime.bundle.feature_specs
    want = ReferenceScorer(runtime.bundle).score(examples)
    body = orjson.loads(v2_json_body(examples, specs))
    from_json = columns_from_inputs(runtime, [InputTensor(t["name"], t["datatype"], t["shape"], t["data"]) for t in body["inputs"]], 1024)
    request = service_pb2.ModelInferRequest.FromString(grpc_request(runtime.name, examples, specs))
    assert request.model_name == runtime.name and len(request.raw_input_contents) == len(specs)
    from_grpc = columns_from_inputs(runtime, read_inputs(request), 1024)
    for decoded in (from_json, from_grpc):
        np.testing.assert_array_equal(ReferenceScorer(runtime.bundle).score(decoded), want)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make system-deps)")
def test_the_peers_phase_runs_every_front_and_reports_its_ratios(synthetic_store, tmp_path, capsys):
    args = argparse.Namespace(bundle=synthetic_store / "movielens" / "1", bundle_store=synthetic_store, peer_sizes=[8],
                              peer_workers=[1], seconds=1.0, concurrency=4)  # fmt: skip
    reported = {}
    run_peers(args, tmp_path, lambda name, figures: reported.__setitem__(name, figures))
    results = reported["peers"]
    # where perf_analyzer can be had it measures the service's v2 and gRPC fronts too; else the run says why not
    by_the_tool = set() if "peers perf_analyzer" in reported else {"perf_analyzer http", "perf_analyzer grpc"}
    assert set(results) == {"ceiling", "v1", "v2", "grpc", "grpc_aio", "litserve", "naive"} | by_the_tool
    for front in by_the_tool:
        assert results[front]["1w"]["8"]["closed"]["requests_per_s"] > 0, results[front]
    # the gRPC front's saturated load in wrk's shape; h2load's beside it where it is installed (CI's system-deps)
    assert results["grpc"]["1w"]["8"]["closed"]["client"] == "grpc_frames"
    assert results["grpc_aio"]["1w"]["8"]["closed"]["client"] == "grpc.aio"
    assert results["grpc_aio"]["1w"]["8"]["closed"]["failures_by_code"] == {}
    if shutil.which("h2load"):
        by_h2load = results["grpc"]["1w"]["8"]["closed_h2load"]
        assert by_h2load["client"] == "h2load" and by_h2load["failures"] == 0 and by_h2load["requests"] > 0, by_h2load
        assert reported["peers_ratios"]["1w 8"]["grpc_h2load_over_v1"] == round(
            by_h2load["requests_per_s"] / results["v1"]["1w"]["8"]["closed"]["requests_per_s"], 2)
    # gRPC and v1 again in rounds taking turns on one service, the ratio their median
    paired = results["grpc"]["1w"]["8"]["paired_with_v1"]
    assert len(paired["rounds"]) == 4 and [r["first"] for r in paired["rounds"]] == ["v1", "grpc", "v1", "grpc"]
    assert all(r[front]["failures"] == 0 and r[front]["requests_per_s"] > 0 for r in paired["rounds"] for front in ("v1", "grpc"))
    ratios_of_rounds = sorted(r["grpc_over_v1"] for r in paired["rounds"])
    assert paired["grpc_over_v1_median"] == round((ratios_of_rounds[1] + ratios_of_rounds[2]) / 2, 3)
    assert reported["peers_ratios"]["1w 8"]["grpc_over_v1_paired"] == paired["grpc_over_v1_median"]
    # v1 and the in-process ceiling in rounds taking turns too (1 worker)
    with_ceiling = results["v1"]["1w"]["8"]["paired_with_ceiling"]
    assert [r["first"] for r in with_ceiling["rounds"]] == ["v1", "ceiling", "v1", "ceiling"]
    assert all(r["v1"]["failures"] == 0 and r["ceiling"]["requests_per_s"] > 0 for r in with_ceiling["rounds"])
    ratios_of_rounds = sorted(r["v1_over_ceiling"] for r in with_ceiling["rounds"])
    assert with_ceiling["v1_over_ceiling_median"] == round((ratios_of_rounds[1] + ratios_of_rounds[2]) / 2, 3)
    assert reported["peers_ratios"]["1w 8"]["v1_over_ceiling_paired"] == with_ceiling["v1_over_ceiling_median"]
    # and again with the worker on a core of its own, the load generators on the others
    if len(os.sched_getaffinity(0)) > 1:
        pinned = results["grpc"]["1w"]["8"]["paired_with_v1_pinned"]
        assert len(pinned["rounds"]) == 4 and pinned["server_cores"] == sorted(os.sched_getaffinity(0))[-1:]
        assert reported["peers_ratios"]["1w 8"]["grpc_over_v1_paired_pinned"] == pinned["grpc_over_v1_median"]
    # wrk's shape: one call in flight on each of the run's connections
    closed = results["grpc"]["1w"]["8"]["closed"]
    assert (closed["connections"], closed["streams"]) == (args.concurrency, 1)
    aio = results["grpc_aio"]["1w"]["8"]["closed"]["requests_per_s"]
    assert reported["peers_ratios"]["1w 8"]["grpc_aio_over_v1"] == round(aio / results["v1"]["1w"]["8"]["closed"]["requests_per_s"], 2)
    for front in ("v1", "v2", "grpc", "grpc_aio", "litserve", "naive"):
        closed = results[front]["1w"]["8"]["closed"]
        assert closed["requests"] > 0 and closed["failures"] == 0, (front, closed)
        if front == "grpc_aio":  # its open loop is the grpc front's
            continue
        open_loop = results[front]["1w"]["8"]["open_at_half"]
        assert open_loop["failures"] == 0 and open_loop["requests"] > 0, (front, open_loop)
        assert open_loop["client_cpu_ms_per_call"] > 0, (front, open_loop)
        if front == "grpc":  # grpc_frames' open loop, its calls checked against the server's count
            assert open_loop["client"] == "grpc_frames" and open_loop["not_ok"] == 0 and open_loop["worker_cpu_s"][0] > 0, open_loop
        if front != "grpc":  # the HTTP fronts' latency one request at a time, the base of the tail's ratio
            alone = results[front]["1w"]["8"]["unloaded"]
            assert alone["failures"] == 0 and 0 < alone["p50_ms"] <= alone["p99_ms"], (front, alone)
            # and both again by the client of prepared requests, with its CPU a call
            prepared, alone = results[front]["1w"]["8"]["open_at_half_prepared"], results[front]["1w"]["8"]["unloaded_prepared"]
            assert prepared["failures"] == 0 and prepared["requests"] > 0 and prepared["client_cpu_ms_per_call"] > 0, (front, prepared)
            assert alone["failures"] == 0 and alone["requests"] == 200 and 0 < alone["p50_ms"] <= alone["p99_ms"], (front, alone)
    assert results["v1"]["1w"]["8"]["closed"]["worker_cpu_s"][0] > 0  # the one worker served the load
    ratios = reported["peers_ratios"]["1w 8"]
    assert ratios["v1_half_load_achieved_over_offered"] > 0 and ratios["v1_over_1_worker"] is None
    assert ratios["v1_half_load_achieved_over_offered_prepared"] > 0
    assert ratios["grpc_half_load_answered_ok"] == 1.0, "every call of gRPC's open loop answered OK"
    assert ratios["grpc_half_load_achieved_over_offered"] > 0.5
    assert ratios == peer_ratios(results)["1w 8"] and all(value > 0 for value in ratios.values() if value is not None)
    assert (ratios["perf_analyzer_grpc_over_http"] is None) == (not by_the_tool)
    json.dumps(reported)  # the bench writes every figure as JSON
    # LitServe's processes outlive a SIGTERM to its parent: none of this run's may be left polling.
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if "uembed.loadtest.litserve_app" in (p.info["cmdline"] or [])
            and str(args.bundle) in (p.info["cmdline"] or [])]  # fmt: skip
    assert not left, f"LitServe processes left running: {left}"


def test_the_share_answered_ok_counts_every_call_made_whichever_client_counted_it():
    # checked by the server: its OK count over every call the client made, those it never got an answer to included
    assert answered_ok_share({"requests": 90, "failures": 25, "calls": 100, "answered_ok": 75}) == 0.75
    assert answered_ok_share({"requests": 0, "failures": 10, "calls": 10, "answered_ok": 0}) == 0.0
    # grpc.aio's: every call in its requests, each failure with its status
    assert answered_ok_share({"requests": 200, "failures": 12}) == 0.94
    assert answered_ok_share(None) is None and answered_ok_share({"requests": 0, "failures": 0}) is None


def test_the_peers_service_is_uembed_serve_whose_workers_share_the_grpc_port_and_sum_their_metrics(synthetic_store, tmp_path):
    """The service the peers bench measures is started as users start it: two workers of `uembed serve`, on free
    ports, its /metrics every worker's (so that the gRPC checks count every call), its gRPC calls and its HTTP
    requests spread over both workers."""
    path = synthetic_store / "movielens" / "1"
    bundle = load_bundle(path)
    calls = [grpc_request(bundle.name, r, bundle.feature_specs) for r in movielens_requests(8, count=3)]
    service = ServeProcess(path, tmp_path / "service.log", workers=2).start(timeout_s=120)
    try:
        assert service.process.args[1:4] == ["-m", "uembed", "serve"] and len(worker_pids(service)) == 2
        checked = cpu_split(service, lambda: frames_grpc_checked(service, calls, 1.0, tmp_path, 8, rate=200))
        assert (checked["requests"], checked["failures"], checked["not_ok"], checked["answered_ok"]) == (200, 0, 0, 200), checked
        assert min(checked["worker_cpu_s"]) / max(checked["worker_cpu_s"]) >= 0.3, "both workers answered calls"
        body = orjson.dumps({"examples": movielens_requests(8, count=1)[0]})
        served = cpu_split(service, lambda: wrk(service.url, "/v1/score", [body], 1, 8, tmp_path))
        assert served["requests"] > 0 and served["failures"] == 0 and min(served["worker_cpu_s"]) / max(served["worker_cpu_s"]) >= 0.3, served
        scored = service.metrics()
        assert sum(v for k, v in scored.items() if k.startswith("uembed_http_requests_total{") and 'route="/v1/score"' in k) >= served["requests"]
    finally:
        assert service.stop() == 0
    assert not psutil.pid_exists(service.process.pid)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is not installed (make system-deps)")
def test_h2load_loads_the_grpc_port_past_its_calls_a_connection_and_every_call_is_checked(synthetic_store, tmp_path):
    """The port ends a connection after a number of calls and h2load does not reconnect: the load is several h2load
    runs, each under the cap (here a small one), and what h2load counts is checked against the server's gRPC codes."""
    path = synthetic_store / "movielens" / "1"
    bundle = load_bundle(path)
    calls = [grpc_request(bundle.name, r, bundle.feature_specs) for r in movielens_requests(8, count=3)]
    service = UvicornProcess(SERVICE_APP, {"UEMBED_BUNDLES": str(path)}, tmp_path / "service.log").start()
    try:
        before = grpc_calls_by_code(service).get("OK", 0.0)
        figures = h2load_grpc(service.grpc_target, calls, 1.0, tmp_path, connections=2, streams=2, calls_per_connection=40)
        # each connection its own runs, none past the cap
        assert figures["h2load_runs"] > 2 and figures["largest_run_calls"] == 40 and figures["failures"] == 0, figures
        assert grpc_calls_by_code(service)["OK"] - before == figures["requests"] > 80
        assert 0 < figures["mean_ms"] <= figures["max_ms"] and figures["client"] == "h2load"
        assert figures["requests_per_s"] > 0 and figures["client_cpu_ms_per_call"] > 0

        checked = h2load_grpc_checked(service, calls, 0.5, tmp_path, 8)
        assert checked["failures"] == checked["not_ok"] == 0 and checked["requests"] > 0, checked
        # HTTP 200 with a gRPC error in the trailers: h2load counts it a success, the check does not
        unknown = [grpc_request("no-such-model", r, bundle.feature_specs) for r in movielens_requests(8, count=1)]
        refused = h2load_grpc_checked(service, unknown, 0.3, tmp_path, 8)
        assert refused["requests"] > 0 and refused["not_ok"] == refused["requests"] == refused["failures"], refused
    finally:
        service.stop()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to move")
def test_the_server_runs_on_a_core_of_its_own_within_the_block_and_every_thread_gets_its_cores_back():
    # a server that starts a thread every 50 ms: some start while it is pinned, and inherit its cores
    code = ("import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "    time.sleep(0.05)")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        server = types.SimpleNamespace(process=process)
        cores = sorted(os.sched_getaffinity(0))
        wait_until(lambda: len(threads_of(process.pid)) >= 3, 10, "the server's first threads")

        def cores_of(pid: int) -> set[frozenset]:
            return {frozenset(os.sched_getaffinity(tid)) for tid in threads_of(pid)}

        with server_on_its_own_core(server) as pinned:
            assert pinned == (cores[-1:], cores[:-1])
            started_within = len(threads_of(process.pid))
            wait_until(lambda: len(threads_of(process.pid)) > started_within + 2, 10, "threads started while pinned")
            assert cores_of(process.pid) == {frozenset(cores[-1:])}
            # a load generator started here runs on the other cores, and so does a thread of this process
            started = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"], capture_output=True, text=True)
            assert started.stdout.strip() == str(cores[:-1])
            stop = threading.Event()
            thread = threading.Thread(target=stop.wait)
            thread.start()
        try:
            assert cores_of(process.pid) == {frozenset(cores)}
            assert cores_of(os.getpid()) == {frozenset(cores)}  # the thread started within too
        finally:
            stop.set()
            thread.join()
    finally:
        process.kill()
        process.wait()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make system-deps)")
def test_wrk_runs_for_whole_seconds_whatever_it_is_asked(synthetic_store, tmp_path):
    """wrk's -d takes no fraction (it prints its usage and fails): half of an odd --seconds is rounded, as the paired
    rounds ask."""
    service = UvicornProcess(SERVICE_APP, {"UEMBED_BUNDLES": str(synthetic_store / "movielens" / "1")}, tmp_path / "service.log").start()
    try:
        bodies = [orjson.dumps({"examples": r}) for r in movielens_requests(8, count=2)]
        figures = wrk(service.url, "/v1/score", bodies, 0.6, 2, tmp_path)
        assert figures["requests"] > 0 and figures["failures"] == 0, figures
    finally:
        service.stop()


def test_the_grpc_check_refuses_several_workers_whose_metrics_are_not_summed(tmp_path):
    """With several workers and no PROMETHEUS_MULTIPROC_DIR, /metrics is one worker's: the check would count the
    other workers' calls as missing, so it refuses to run (before any load)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
        server = UvicornProcess(SERVICE_APP, {"UEMBED_BUNDLES": str(tmp_path)}, tmp_path / "service.log", workers=2)
        # a bench's service with several workers gets one, as `uembed serve` gives them; one worker needs none
        metrics_dir = Path(server.env["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_dir() and not any(metrics_dir.iterdir())
        assert "PROMETHEUS_MULTIPROC_DIR" not in UvicornProcess(SERVICE_APP, {}, tmp_path / "one.log").env
        del server.env["PROMETHEUS_MULTIPROC_DIR"]  # a service started some other way
        with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
            h2load_grpc_checked(server, [b""], 1.0, tmp_path, 16)


def test_the_ratios_compare_two_workers_with_one_and_the_workers_cpu():
    def v1(rate: float, workers_cpu: list[float], achieved: float = 400.0, half_cpu: list[float] | None = None) -> dict:
        return {"closed": {"requests_per_s": rate, "worker_cpu_s": workers_cpu, "server_cpu_ms_per_call": 0.5},
                "unloaded": {"p50_ms": 1.0},
                "open_at_half": {"p99_ms": 2.5, "requests_per_s": achieved, "offered_per_s": 400.0,
                                 "server_cpu_ms_per_call": 0.9, "worker_cpu_s": half_cpu or workers_cpu}}  # fmt: skip

    ratios = peer_ratios({"v1": {"1w": {"64": v1(1000.0, [9.0])}, "2w": {"64": v1(1800.0, [9.0, 7.5])}}})
    assert ratios["1w 64"]["v1_over_1_worker"] is None and ratios["1w 64"]["v1_worker_cpu_spread"] is None
    two = ratios["2w 64"]
    assert (two["v1_over_1_worker"], two["v1_worker_cpu_spread"], two["v1_p99_at_half_over_unloaded_p50"]) == (1.8, 1.2, 2.5)
    assert two["v1_server_cpu_at_half_over_saturated"] == 1.8  # a call's CPU in the open loop over a saturated one's
    # a worker no connection reached: no spread, its zero shown
    idle = peer_ratios({"v1": {"1w": {"64": v1(1000.0, [9.0])}, "2w": {"64": v1(1000.0, [9.0, 0.0])}}})["2w 64"]
    assert idle["v1_worker_cpu_spread"] is None and idle["v1_worker_cpu_s"] == [9.0, 0.0]
    # at half load, as saturated: how evenly the open loop's connections spread
    lopsided = peer_ratios({"v1": {"2w": {"64": v1(1800.0, [9.0, 7.5], half_cpu=[8.26, 0.01])}}})["2w 64"]
    assert (lopsided["v1_half_load_worker_cpu_spread"], lopsided["v1_half_load_worker_cpu_s"]) == (826.0, [8.26, 0.01])
    assert two["v1_half_load_worker_cpu_spread"] == 1.2 and ratios["1w 64"]["v1_half_load_worker_cpu_s"] is None
    # a load generator that fell behind the rate it offered: its tail is not the service's
    behind = peer_ratios({"v1": {"1w": {"64": v1(1000.0, [9.0], achieved=300.0)}}})["1w 64"]
    assert behind["v1_half_load_achieved_over_offered"] == 0.75 and behind["v1_p99_at_half_over_unloaded_p50"] is None
    slightly = peer_ratios({"v1": {"1w": {"64": v1(1000.0, [9.0], achieved=387.0)}}})["1w 64"]  # 0.9675: still behind
    assert slightly["v1_p99_at_half_over_unloaded_p50"] is None
    # gRPC's open loop: the share of its calls answered OK (a service whose queue is full sheds calls)
    grpc = {"closed": {"requests_per_s": 1900.0}, "open_at_half": {"requests": 26182, "failures": 3243}}
    shed = peer_ratios({"v1": {"2w": {"64": v1(1800.0, [9.0, 7.5])}}, "grpc": {"2w": {"64": grpc}}})["2w 64"]
    assert shed["grpc_half_load_answered_ok"] == 0.8761 and two["grpc_half_load_answered_ok"] is None
    # grpc_frames' open loop, checked by the server: its OK count over every call, and the calls/s it kept to
    checked = {"requests": 1490, "failures": 10, "calls": 1500, "answered_ok": 1488, "requests_per_s": 149.0, "offered_per_s": 200.0}
    late = peer_ratios({"v1": {"2w": {"64": v1(1800.0, [9.0, 7.5])}}, "grpc": {"2w": {"64": grpc | {"open_at_half": checked}}}})["2w 64"]
    assert (late["grpc_half_load_answered_ok"], late["grpc_half_load_achieved_over_offered"]) == (0.992, 0.745)
    # v1 over the ceiling, paired with it in rounds (1 worker)
    paired = v1(1000.0, [9.0]) | {"paired_with_ceiling": {"v1_over_ceiling_median": 0.61}}
    assert peer_ratios({"v1": {"1w": {"64": paired}}})["1w 64"]["v1_over_ceiling_paired"] == 0.61


def test_the_cli_offers_every_front_the_peers_phase_measures():
    assert PEER_FRONTS == FRONTS
