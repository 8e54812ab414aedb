"""gRPC over uvicorn's HTTP/2 in the worker's event loop (``grpc_h2.py``, the default gRPC server): what it does
beyond the methods that test_oip.py and test_triton_tools.py call through Triton's client, with grpcio's own client
over real sockets. The last test serves the same calls with grpcio's server (``UEMBED_GRPC_SERVER=grpcio``)."""

import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.scoring import score
from tests.serving.inprocess import InProcessService
from tests.serving.protocols.test_oip import MODEL, feature_arrays, triton_inputs
from uembed.bundle.loader import load_bundle
from uembed.loadtest.peers import grpc_request
from uembed.loadtest.servers import UvicornProcess, free_port
from uembed.serving.protocols.grpc_h2 import GrpcApp
from uembed.serving.protocols.grpc_wire import grpc_timeout, status_trailers
from uembed.serving.protocols.http2 import Http2Listener
from uembed.serving.protocols.oip import InferencePlane

INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def service(synthetic_store, tmp_path_factory):
    service = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(synthetic_store / MODEL / "1"),
                             "UEMBED_MAX_BODY_BYTES": str(64 * 1024)}, tmp_path_factory.mktemp("h2") / "service.log").start()  # fmt: skip
    yield service
    service.stop()


@pytest.fixture(scope="module")
def infer_request(synthetic_store):
    """A ModelInferRequest of examples, raw_input_contents as the peers' client sends them."""
    specs = load_bundle(synthetic_store / MODEL / "1").feature_specs
    return lambda examples: service_pb2.ModelInferRequest.FromString(grpc_request(MODEL, examples, specs))


def test_grpcio_client_scores_over_http2_like_v1(service, movielens_examples, infer_request):
    examples = movielens_examples[:32]
    with grpc.insecure_channel(service.grpc_target) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(examples), timeout=30)
    np.testing.assert_allclose(np.frombuffer(reply.raw_output_contents[0], "<f4"), score(service.url, examples), rtol=0, atol=1e-6)
    assert (reply.model_name, reply.model_version) == (MODEL, "1")


def test_an_unknown_method_is_unimplemented_naming_the_services_and_counted_under_one_label(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        for path in ("/some.Other/Method", "/some.Other/Another"):
            with pytest.raises(grpc.RpcError) as error:
                channel.unary_unary(path)(b"", timeout=10)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert f"{path}: no such method here" in error.value.details()
            assert "inference.GRPCInferenceService" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:  # the protocol's streaming method: the servicer's own answer
            next(channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(iter([b""]), timeout=10))
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED and "ModelStreamInfer is not implemented" in error.value.details()
    counted = service.metrics()
    assert counted['uembed_grpc_requests_total{code="UNIMPLEMENTED",method="unknown"}'] == 2
    assert not any("Method" in name and "unknown" not in name for name in counted if name.startswith("uembed_grpc_requests_total"))


def test_a_compressed_call_is_unimplemented_and_says_to_send_it_uncompressed(service, movielens_examples, infer_request):
    with grpc.insecure_channel(service.grpc_target, compression=grpc.Compression.Gzip) as channel:
        with pytest.raises(grpc.RpcError) as error:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(movielens_examples[:4]), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED and "send them uncompressed" in error.value.details()


def test_a_message_past_max_body_bytes_is_resource_exhausted(service, movielens_examples, infer_request):
    request = infer_request(movielens_examples[:4])
    request.id = "x" * (80 * 1024)  # past the service's 64 KiB
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_body_bytes" in error.value.details()
        request.id = "ok"  # the connection serves the next call
        assert len(stub.ModelInfer(request, timeout=10).raw_output_contents[0]) == 4 * 4


def test_a_request_that_is_not_the_methods_message_is_invalid_argument(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            channel.unary_unary(INFER)(b"\xff\xff\xff", timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInferRequest" in error.value.details()


def test_a_request_that_is_not_grpc_is_415_naming_what_the_port_serves(synthetic_store):
    service = InProcessService(bundles=[synthetic_store / MODEL / "1"], grpc_port=0)
    try:
        app = service.run(grpc_app(service))
        sent = service.run(call_app(app, "/v1/score", b"{}", [], content_type=b"application/json"))
        assert sent[0]["status"] == 415 and b"this port serves gRPC (POST, content-type application/grpc); POST /v1/score" in sent[1]["body"]
    finally:
        service.close()


def test_plain_http_1_1_on_the_grpc_port_is_refused(service):
    with pytest.raises(httpx.HTTPError):  # the port speaks HTTP/2 alone, as gRPC's cleartext channels do
        httpx.post(f"http://{service.grpc_target}/v1/score", json={"examples": []}, timeout=10)


def test_a_channel_keeps_working_past_the_streams_one_connection_may_open(service):
    """zttp allows 4096 streams a connection over its life; the server says GOAWAY gracefully before that, so a
    channel's calls past it, 8 in flight at a time, all succeed on the connections that follow."""
    with grpc.insecure_channel(service.grpc_target) as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        request = service_pb2.ServerLiveRequest().SerializeToString()
        failures = 0
        for _ in range(5000 // 8):
            for future in [live.future(request, timeout=30) for _ in range(8)]:
                try:
                    assert service_pb2.ServerLiveResponse.FromString(future.result()).live
                except grpc.RpcError:
                    failures += 1
    assert failures == 0
    assert "enhance your calm" not in service.log_path.read_text()


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "asgi"])
def test_connections_rotate_after_their_streams_with_no_call_lost(synthetic_store, movielens_examples, lane):
    """With a connection's streams set low, many rotations under 16 calls in flight: every call scores, answered by
    the gRPC lane or the ASGI way."""
    service = InProcessService(bundles=[synthetic_store / MODEL / "1"], grpc_port=0)
    port = free_port()
    app = service.run(grpc_app(service))
    listener = Http2Listener(app, service.settings, "127.0.0.1", port, streams_per_connection=20, lane=app.lane if lane else None)
    service.run(listener.start())
    try:
        specs = service.engine.registry.find(MODEL, None).bundle.feature_specs
        body = grpc_request(MODEL, movielens_examples[:4], specs)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(INFER)
            for _ in range(15):
                replies = [call.future(body, timeout=30) for _ in range(16)]
                assert all(len(service_pb2.ModelInferResponse.FromString(r.result()).raw_output_contents[0]) == 16 for r in replies)
        assert listener.connections_made >= 240 // (20 + 16)  # each said GOAWAY after about 20 calls
    finally:
        service.run(listener.stop())
        service.close()


def test_a_status_message_outside_printable_ascii_is_percent_encoded(service, movielens_examples):
    with grpc.insecure_channel(service.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                service_pb2.ModelInferRequest(model_name="modèle 100%"), timeout=10)  # fmt: skip
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "'modèle 100%'" in error.value.details()


def test_status_trailers_percent_encode_all_but_printable_ascii_other_than_percent():
    assert status_trailers(grpc.StatusCode.NOT_FOUND, "model 'modèle 100%': no\nsuch") == [
        (b"grpc-status", b"5"), (b"grpc-message", b"model 'mod%C3%A8le 100%25': no%0Asuch")]
    assert status_trailers(grpc.StatusCode.OK) == [(b"grpc-status", b"0")]


@pytest.mark.parametrize(("header", "seconds"), [(b"5S", 5.0), (b"250m", 0.25), (b"3M", 180.0), (b"100n", 1e-7),
                                                 (b"", None), (b"5", None), (b"123456789S", None), (b"5x", None)])  # fmt: skip
def test_grpc_timeout_headers(header, seconds):
    assert grpc_timeout(header) == (pytest.approx(seconds) if seconds is not None else None)


def test_a_deadline_that_passes_on_the_server_is_deadline_exceeded(synthetic_store, movielens_examples, infer_request):
    """The call's grpc-timeout runs on the server: a call whose deadline passes before its batch is scored ends
    DEADLINE_EXCEEDED there, and is counted so."""
    service = InProcessService(bundles=[synthetic_store / MODEL / "1"], grpc_port=0)
    try:
        app = service.run(grpc_app(service))
        message = infer_request(movielens_examples[:4]).SerializeToString()
        sent = service.run(call_app(app, INFER, message, [(b"grpc-timeout", b"1n")]))
        assert sent[0]["status"] == 200 and dict(sent[-1]["headers"])[b"grpc-status"] == b"4"
        assert service.metrics()['uembed_grpc_requests_total{code="DEADLINE_EXCEEDED",method="ModelInfer"}'] == 1
        sent = service.run(call_app(app, INFER, message, [(b"grpc-timeout", b"30S")]))
        assert dict(sent[-1]["headers"])[b"grpc-status"] == b"0"
        assert len(service_pb2.ModelInferResponse.FromString(sent[1]["body"][5:]).raw_output_contents[0]) == 16
    finally:
        service.close()


async def grpc_app(service: InProcessService) -> GrpcApp:
    return GrpcApp(InferencePlane(service.engine, service.settings), service.settings)


async def call_app(app: GrpcApp, path: str, message: bytes, headers: list, content_type: bytes = b"application/grpc") -> list[dict]:
    """One call through the ASGI app, as uvicorn's HTTP/2 protocol makes it: what the app sent."""
    scope = {"type": "http", "http_version": "2", "method": "POST", "path": path,
             "headers": [(b"content-type", content_type), (b"te", b"trailers"), *headers]}  # fmt: skip
    events = [{"type": "http.request", "body": b"\0" + len(message).to_bytes(4, "big") + message, "more_body": False}]
    sent = []

    async def receive():
        return events.pop(0) if events else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_grpcio_server_serves_the_same_calls(synthetic_store, movielens_examples, tmp_path):
    service = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(synthetic_store / MODEL / "1"),
                             "UEMBED_GRPC_SERVER": "grpcio"}, tmp_path / "grpcio.log").start()  # fmt: skip
    try:
        examples = movielens_examples[:16]
        client = triton_grpc.InferenceServerClient(service.grpc_target)
        scores = client.infer(MODEL, triton_inputs(triton_grpc, feature_arrays(examples))).as_numpy("score")
        np.testing.assert_allclose(scores, score(service.url, examples), rtol=0, atol=1e-6)
        assert client.is_server_ready()
    finally:
        service.stop()


def test_a_watch_ends_when_the_server_stops(synthetic_store):
    """(A cancelled call, either way through the server: test_grpc_lane.py.)"""
    service = InProcessService(bundles=[synthetic_store / MODEL / "1"], grpc_port=0)
    port = free_port()
    listener = Http2Listener(service.run(grpc_app(service)), service.settings, "127.0.0.1", port)
    service.run(listener.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = channel.unary_stream("/grpc.health.v1.Health/Watch")(health_pb2.HealthCheckRequest().SerializeToString(), timeout=30)
            assert health_pb2.HealthCheckResponse.FromString(next(watch)).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            service.run(listener.stop())
            with pytest.raises(grpc.RpcError) as error:
                next(watch)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 3
    finally:
        service.run(listener.stop())
        service.close()
