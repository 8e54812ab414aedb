"""The peers' gRPC load clients (``uembed/loadtest/grpc_frames.py``, and grpcio's) against the service's real HTTP/2 port: every call
the next request, connections the server ends (GOAWAY) opened again with no call lost, and its figures checked
against the server's own count."""

from __future__ import annotations

import pytest

from tests.serving.inprocess import InProcessService
from uembed.bundle.loader import load_bundle
from uembed.loadtest.grpc_frames import hpack_literal, read_bodies, run, run_open, write_bodies
from uembed.loadtest.load import movielens_requests
from uembed.loadtest.peers import INFER_METHOD, frames_grpc, frames_grpc_checked, grpc_load, grpc_request
from uembed.loadtest.servers import SERVICE_APP, UvicornProcess, free_port
from uembed.serving.protocols.grpc_h2 import GrpcApp
from uembed.serving.protocols.http2 import Http2Listener
from uembed.serving.protocols.oip import InferencePlane

MODEL = "movielens"


async def listening(service: InProcessService, port: int, streams_per_connection: int) -> Http2Listener:
    app = GrpcApp(InferencePlane(service.engine, service.settings), service.settings)
    listener = Http2Listener(app, service.settings, "127.0.0.1", port, streams_per_connection=streams_per_connection, lane=app.lane)
    await listener.start()
    return listener


@pytest.fixture
def port_ending_connections(synthetic_store):
    """The gRPC port of an in-process service, ending each connection after 20 calls, and two requests to take
    turns: one it answers OK, one NOT_FOUND (an unknown model)."""
    path = synthetic_store / MODEL / "1"
    service = InProcessService(bundles=[path], grpc_port=0)
    port = free_port()
    listener = service.run(listening(service, port, 20))
    specs = load_bundle(path).feature_specs
    examples = movielens_requests(8, count=1)[0]
    yield service, port, listener, [grpc_request(MODEL, examples, specs), grpc_request("no-such-model", examples, specs)]
    service.run(listener.stop())
    service.close()


def calls_by_code(service: InProcessService) -> dict[str, float]:
    counted = service.metrics()
    return {code: counted.get(f'uembed_grpc_requests_total{{code="{code}",method="ModelInfer"}}', 0) for code in ("OK", "NOT_FOUND")}


def test_every_call_is_the_next_request_through_connections_the_server_ends(port_ending_connections):
    """Two requests taking turns, one the server answers NOT_FOUND: its count by status shows each call sent the next
    one; the port ends each connection after 20 calls and the client opens another, no call lost."""
    service, port, listener, bodies = port_ending_connections
    figures = run("127.0.0.1", port, INFER_METHOD, bodies, 1.0, 4)
    assert figures["failures"] == 0 and figures["requests"] > 100, figures
    assert listener.connections_made >= figures["requests"] // 20
    assert calls_by_code(service) == {"OK": (figures["requests"] + 1) // 2, "NOT_FOUND": figures["requests"] // 2}
    assert 0 < figures["mean_ms"] <= figures["max_ms"]


def test_the_open_loop_sends_every_call_of_its_schedule_through_connections_the_server_ends(port_ending_connections):
    """``--rate``: the calls scheduled within the run, each the next request, all sent and answered while the port
    ends each connection after 20 calls (a new connection takes the place of each), latencies from the schedule."""
    service, port, listener, bodies = port_ending_connections
    figures = run_open("127.0.0.1", port, INFER_METHOD, bodies, 1.0, 3, rate=150)
    assert (figures["requests"], figures["failures"]) == (150, 0), figures
    assert listener.connections_made >= 150 // 20 + 3 - 1
    assert calls_by_code(service) == {"OK": 75, "NOT_FOUND": 75}
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] and figures["send_lag_p99_ms"] >= 0 and figures["offered_per_s"] == 150
    assert 0.8 < figures["requests_per_s"] / 150 < 1.1, "sent at the rate, not as fast as answers come"
    # a rate one connection cannot keep to: the calls wait for it, and their latencies count from their schedule
    behind = run_open("127.0.0.1", port, INFER_METHOD, bodies[:1], 0.25, 1, rate=4000)
    assert (behind["requests"], behind["failures"]) == (1000, 0), behind
    assert behind["p99_ms"] >= behind["send_lag_p99_ms"] > 50, behind
    with pytest.raises(ValueError, match="rate above 0"):
        run_open("127.0.0.1", port, INFER_METHOD, bodies, 1.0, 1, rate=0)


def test_a_message_past_a_frame_and_the_flow_control_windows_is_sent_as_they_allow(synthetic_store):
    """A request larger than HTTP/2's smallest frame (16 KiB) and than the server's stream and connection windows
    (64 KiB): sent in DATA frames as the server's WINDOW_UPDATEs open the windows, every call answered."""
    path = synthetic_store / MODEL / "1"
    service = InProcessService(bundles=[path], grpc_port=0)
    port = free_port()
    listener = service.run(listening(service, port, 20))
    try:
        specs = load_bundle(path).feature_specs
        bodies = [grpc_request(MODEL, examples, specs) for examples in movielens_requests(1024, count=2)]
        assert min(map(len, bodies)) > 65535
        figures = run("127.0.0.1", port, INFER_METHOD, bodies, 1.0, 2)
        assert figures["failures"] == 0 and figures["requests"] > 4, figures
        ok = service.metrics()['uembed_grpc_requests_total{code="OK",method="ModelInfer"}']
        assert ok == figures["requests"]
    finally:
        service.run(listener.stop())
        service.close()


def test_the_checked_figures_count_a_call_not_answered_ok_as_failed(synthetic_store, tmp_path):
    path = synthetic_store / MODEL / "1"
    specs = load_bundle(path).feature_specs
    calls = [grpc_request(MODEL, r, specs) for r in movielens_requests(8, count=3)]
    service = UvicornProcess(SERVICE_APP, {"UEMBED_BUNDLES": str(path)}, tmp_path / "service.log").start()
    try:
        checked = frames_grpc_checked(service, calls, 0.5, tmp_path, 4)
        assert checked["failures"] == checked["not_ok"] == 0 and checked["requests"] > 0, checked
        assert checked["client"] == "grpc_frames" and checked["client_cpu_ms_per_call"] > 0 and "client_cpu_s" not in checked
        unknown = [grpc_request("no-such-model", r, specs) for r in movielens_requests(8, count=1)]
        refused = frames_grpc_checked(service, unknown, 0.3, tmp_path, 4)
        assert refused["requests"] > 0 and refused["not_ok"] == refused["requests"] == refused["failures"], refused
        assert (refused["calls"], refused["answered_ok"]) == (refused["requests"], 0)
        # grpcio's client (the peers' grpc_aio and open loop) names each failure's status
        by_grpcio = grpc_load(service.grpc_target, unknown, 0.3, processes=1, concurrency=2)
        assert by_grpcio["failures_by_code"] == {"NOT_FOUND": by_grpcio["requests"]} and by_grpcio["requests"] > 0, by_grpcio
    finally:
        service.stop()
    with pytest.raises(RuntimeError, match="the gRPC load client failed"):  # nothing listens there now
        frames_grpc(service.grpc_target, calls, 0.3, tmp_path, 2)


def test_bodies_round_trip_and_header_lengths_past_a_prefix_byte(tmp_path):
    with pytest.raises(ValueError, match="no request bodies"):
        run("127.0.0.1", 1, INFER_METHOD, [], 1.0, 1)
    bodies = [b"", b"x" * 300, bytes(range(256))]
    write_bodies(tmp_path / "bodies.bin", bodies)
    assert read_bodies(tmp_path / "bodies.bin") == bodies
    # RFC 7541 5.1: a length of 200 is the 7-bit prefix filled (127), then 73
    assert hpack_literal(None, b"te", b"a" * 200) == b"\x00\x02te" + bytes((127, 73)) + b"a" * 200
    assert hpack_literal(4, b":path", b"/m") == b"\x04\x02/m"
    assert hpack_literal(31, b"content-type", b"x") == b"\x0f\x10\x01x"
