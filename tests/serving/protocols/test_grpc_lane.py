"""The gRPC port's fast lane (``grpc_lane.py``): a unary call answered by the HTTP/2 protocol itself. One in-process
service serves two gRPC listeners, one with the lane and one without (every call the ASGI way); grpcio's client over
real sockets sends each the same calls, and their outcomes must be the same. The ASGI app behind the lane's listener
counts the calls it is given, so a test knows which way a call went."""

import gzip
import socket
import time

import grpc
import pytest
import zttp
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2

from tests.serving.garbage import collector_off, described
from tests.serving.inprocess import InProcessService
from tests.serving.protocols.test_grpc_h2 import INFER, grpc_app
from tests.serving.protocols.test_oip import MODEL
from uembed.bundle.loader import load_bundle
from uembed.loadtest.peers import grpc_request
from uembed.loadtest.servers import free_port, wait_until
from uembed.serving.protocols import http2
from uembed.serving.protocols.http2 import Http2Listener

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
CANCELLED = 'uembed_abandoned_requests_total{reason="cancelled"}'


class RawConnection:
    """An HTTP/2 connection with zttp as the client: a client that sends what it is told (a grpc-timeout, a body in
    parts, headers alone) on as many streams as it opens."""

    def __init__(self, port: int) -> None:
        self.conn = zttp.Connection(zttp.CLIENT, protocol=zttp.HTTP2)
        self.conn.initiate_connection()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.replies: dict[int, dict] = {}

    def open(self, path: str, headers: list = ()):
        return self.conn.send_request(b"POST", path.encode(), b"HTTP/2", [(b"host", b"127.0.0.1"), (b"content-type", b"application/grpc"),
                                                                       (b"te", b"trailers"), *headers])  # fmt: skip

    def send(self, stream, data: bytes = b"", end: bool = False) -> None:
        if data:
            stream.send_data(data)
        if end:
            stream.end_message()
        self.flush()

    def flush(self) -> None:
        pending = self.conn.data_to_send()
        if pending:
            self.sock.sendall(pending)

    def reply(self, stream) -> tuple[list, bytes, list]:
        """The stream's reply headers, body and trailers, reading (and sending what flow control released) until they end."""
        while "trailers" not in self.replies.get(stream.stream_id, {}):
            data = self.sock.recv(65536)
            assert data, "the connection closed before the reply's end"
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) is not zttp.NEED_DATA:
                reply = self.replies.setdefault(getattr(event, "stream_id", 0), {"headers": [], "body": b""})
                if isinstance(event, zttp.Response):
                    reply["headers"] = event.headers
                elif isinstance(event, zttp.Data):
                    reply["body"] += event.data
                elif isinstance(event, zttp.EndOfMessage):
                    reply["trailers"] = event.trailers
                elif isinstance(event, zttp.RstStream):
                    reply["reset"] = event.error_code
                    reply["resets"] = reply.get("resets", 0) + 1  # a stream is reset once at most (RFC 9113, 5.1)
            self.flush()
        reply = self.replies[stream.stream_id]
        return reply["headers"], reply["body"], reply["trailers"]

    def close(self) -> None:
        self.sock.close()


COMPRESSED = b"\1"  # a message's flag byte when it is compressed


def framed(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4, "big") + message


def raw_call(port: int, path: str, message: bytes, headers: list = ()) -> tuple[list, bytes, list]:
    """One call over a connection of its own: the reply's headers, body and trailers."""
    connection = RawConnection(port)
    try:
        stream = connection.open(path, headers)
        connection.send(stream, framed(message), end=True)
        return connection.reply(stream)
    finally:
        connection.close()


class CountingApp:
    """The ASGI app, counting the calls it is given."""

    def __init__(self, app) -> None:
        self.app, self.calls = app, 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await self.app(scope, receive, send)


class TwoWays:
    """An in-process service with a gRPC listener with the lane and one without."""

    def __init__(self, bundle, **settings) -> None:
        self.service = InProcessService(bundles=[bundle], grpc_port=0, **settings)
        app = self.service.run(grpc_app(self.service))
        self.counting = CountingApp(app)
        self.lane = Http2Listener(self.counting, self.service.settings, "127.0.0.1", free_port(), lane=app.lane)
        self.asgi = Http2Listener(app, self.service.settings, "127.0.0.1", free_port())
        for listener in (self.lane, self.asgi):
            self.service.run(listener.start())

    def call(self, listener: Http2Listener, path: str, body: bytes, **options):
        """(code, details, trailing metadata, reply bytes) of one call."""
        with grpc.insecure_channel(f"127.0.0.1:{listener.port}", **options) as channel:
            try:
                reply, call = channel.unary_unary(path).with_call(body, timeout=30)
            except grpc.RpcError as error:
                return error.code(), error.details(), tuple(error.trailing_metadata() or ()), None
        return call.code(), call.details(), tuple(call.trailing_metadata() or ()), reply

    def close(self) -> None:
        for listener in (self.lane, self.asgi):
            self.service.run(listener.stop())
        self.service.close()


@pytest.fixture
def two_ways(synthetic_store):
    ways = TwoWays(synthetic_store / MODEL / "1", max_body_bytes=256 * 1024)
    yield ways
    ways.close()


@pytest.fixture(scope="module")
def body_of(synthetic_store):
    specs = load_bundle(synthetic_store / MODEL / "1").feature_specs
    return lambda examples, **fields: grpc_request(MODEL, examples, specs) + service_pb2.ModelInferRequest(**fields).SerializeToString()


def test_each_call_has_the_same_outcome_in_the_lane_as_the_asgi_way_and_never_reaches_the_app(two_ways, movielens_examples,
                                                                                              body_of):  # fmt: skip
    calls = {
        "scored": (INFER, body_of(movielens_examples[:32], id="call-1")),
        "a message over 64 KiB, read whole": (INFER, body_of(movielens_examples[:1000])),
        "unknown model": (INFER, body_of(movielens_examples[:4], model_name="nope")),
        "a bad tensor": (INFER, service_pb2.ModelInferRequest(model_name=MODEL, inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(name="user_id", datatype="FP32", shape=[1])]).SerializeToString()),
        "not the method's message": (INFER, b"\xff\xff\xff"),
        "health": (HEALTH_CHECK, health_pb2.HealthCheckRequest().SerializeToString()),
    }  # fmt: skip
    for name, (path, body) in calls.items():
        in_lane = two_ways.call(two_ways.lane, path, body)
        assert in_lane == two_ways.call(two_ways.asgi, path, body), name
        assert raw_call(two_ways.lane.port, path, body) == raw_call(two_ways.asgi.port, path, body), name
    gzip = {"compression": grpc.Compression.Gzip}
    compressed = two_ways.call(two_ways.lane, INFER, calls["scored"][1], **gzip)
    assert compressed[0] == grpc.StatusCode.UNIMPLEMENTED and "send them uncompressed" in compressed[1]
    assert compressed == two_ways.call(two_ways.asgi, INFER, calls["scored"][1], **gzip)
    scored = service_pb2.ModelInferResponse.FromString(two_ways.call(two_ways.lane, *calls["scored"])[3])
    assert (scored.model_name, scored.id, len(scored.raw_output_contents[0])) == (MODEL, "call-1", 32 * 4)
    assert len(service_pb2.ModelInferResponse.FromString(two_ways.call(two_ways.lane, *calls["a message over 64 KiB, read whole"])[3])
               .raw_output_contents[0]) == 1000 * 4  # fmt: skip
    assert two_ways.counting.calls == 0
    counted = two_ways.service.metrics()
    assert counted['uembed_grpc_requests_total{code="OK",method="ModelInfer"}'] == 2 * 4 + 2
    assert counted['uembed_grpc_requests_total{code="NOT_FOUND",method="ModelInfer"}'] == 4
    assert counted['uembed_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}'] == 2 * 4


def test_what_the_lane_does_not_take_goes_the_asgi_way(two_ways):
    assert two_ways.call(two_ways.lane, "/some.Other/Method", b"")[0] == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(f"127.0.0.1:{two_ways.lane.port}") as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")(health_pb2.HealthCheckRequest().SerializeToString(), timeout=30)
        assert health_pb2.HealthCheckResponse.FromString(next(watch)).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    assert two_ways.counting.calls == 2


def test_a_deadline_that_passes_in_the_lane_is_deadline_exceeded(two_ways, movielens_examples, body_of):
    """The call's grpc-timeout runs on the server: one whose deadline passes before its batch is scored ends
    DEADLINE_EXCEEDED, and is counted so."""
    body = body_of(movielens_examples[:4])
    _, reply, trailers = raw_call(two_ways.lane.port, INFER, body, [(b"grpc-timeout", b"1n")])
    assert reply == b"" and dict(trailers)[b"grpc-status"] == b"4" and b"deadline" in dict(trailers)[b"grpc-message"]
    assert two_ways.service.metrics()['uembed_grpc_requests_total{code="DEADLINE_EXCEEDED",method="ModelInfer"}'] == 1
    _, reply, trailers = raw_call(two_ways.lane.port, INFER, body, [(b"grpc-timeout", b"30S")])
    assert dict(trailers)[b"grpc-status"] == b"0"
    assert len(service_pb2.ModelInferResponse.FromString(reply[5:]).raw_output_contents[0]) == 4 * 4
    assert two_ways.counting.calls == 0


@pytest.mark.parametrize("way", ["lane", "asgi"])
def test_a_call_the_client_cancels_is_skipped_by_the_batcher(synthetic_store, movielens_examples, body_of, way):
    ways = TwoWays(synthetic_store / MODEL / "1", compute_on_event_loop=False)
    try:
        listener = getattr(ways, way)
        with grpc.insecure_channel(f"127.0.0.1:{listener.port}") as channel:
            call = channel.unary_unary(INFER)
            body = body_of(movielens_examples[:4])
            call(body, timeout=30)
            before = ways.service.metrics().get(CANCELLED, 0)
            ways.service.engine.batcher.executor.submit(time.sleep, 1.0)  # as a long batch holds the compute thread
            running = call.future(body, timeout=30)  # its batch waits for the compute thread
            time.sleep(0.2)
            queued = call.future(body, timeout=30)  # queued behind that batch
            time.sleep(0.2)
            queued.cancel()  # RST_STREAM while the call waits for its batch
            assert len(service_pb2.ModelInferResponse.FromString(running.result()).raw_output_contents[0]) == 16
            wait_until(lambda: ways.service.metrics().get(CANCELLED, 0) > before, 10, "the cancelled call skipped")
            assert call(body, timeout=30)  # the connection serves the next call
        if way == "lane":
            assert ways.counting.calls == 0
    finally:
        ways.close()


def test_a_call_in_the_lane_when_the_server_stops_is_unavailable(synthetic_store, movielens_examples, body_of, monkeypatch):
    monkeypatch.setattr(http2, "SHUTDOWN_GRACE_S", 0.3)
    ways = TwoWays(synthetic_store / MODEL / "1", compute_on_event_loop=False)
    try:
        ways.service.engine.batcher.executor.submit(time.sleep, 2.0)
        with grpc.insecure_channel(f"127.0.0.1:{ways.lane.port}") as channel:
            waiting = channel.unary_unary(INFER).future(body_of(movielens_examples[:4]), timeout=30)
            time.sleep(0.3)
            ways.service.run(ways.lane.stop())
            with pytest.raises(grpc.RpcError) as error:
                waiting.result()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.value.details()
    finally:
        ways.close()


def test_a_large_body_still_arriving_does_not_stop_the_connection_reading_for_the_others(two_ways, movielens_examples, body_of):
    """uvicorn stops reading a connection while a stream holds a large unread body; the lane moves each part out as it
    arrives, so a call over 64 KiB still uploading does not hold back a call beside it, nor its own end."""
    connection = RawConnection(two_ways.lane.port)
    try:
        large = framed(body_of(movielens_examples[:1000]))
        assert len(large) > 65536
        uploading = connection.open(INFER)
        connection.send(uploading, large[:-10])
        too_large = connection.open(INFER)
        connection.send(too_large, framed(b"x" * (300 * 1024)), end=True)  # past max_body_bytes (256 KiB)
        assert dict(connection.reply(too_large)[2])[b"grpc-status"] == b"8"  # RESOURCE_EXHAUSTED
        connection.send(uploading, large[-10:], end=True)
        _, reply, trailers = connection.reply(uploading)
        assert dict(trailers)[b"grpc-status"] == b"0"
        assert len(service_pb2.ModelInferResponse.FromString(reply[5:]).raw_output_contents[0]) == 1000 * 4
        # answered before the client had sent it all: the stream is reset with NO_ERROR after the reply, so the
        # client may stop sending; the one answered after its whole body is not
        assert connection.replies[too_large.stream_id].get("reset") == zttp.H2ErrorCode.NO_ERROR
        assert "reset" not in connection.replies[uploading.stream_id]
    finally:
        connection.close()


@pytest.mark.parametrize("way", ["lane", "asgi"])
def test_a_call_answered_before_its_message_is_whole_is_reset_with_no_error(two_ways, movielens_examples, body_of, way):
    """A message past the limit is refused before the client has sent it all: the stream is then reset with NO_ERROR
    after the reply (RFC 9113, 8.1), so the client may stop sending, in the lane and the ASGI way alike; a call
    answered after its whole message is not reset, and the connection serves it."""
    connection = RawConnection(getattr(two_ways, way).port)
    try:
        too_large = connection.open(INFER)
        connection.send(too_large, framed(b"x" * (300 * 1024)))  # past max_body_bytes (256 KiB), the stream left open
        assert dict(connection.reply(too_large)[2])[b"grpc-status"] == b"8"  # RESOURCE_EXHAUSTED
        whole = connection.open(INFER)
        connection.send(whole, framed(body_of(movielens_examples[:4])), end=True)
        assert dict(connection.reply(whole)[2])[b"grpc-status"] == b"0"
        assert connection.replies[too_large.stream_id].get("reset") == zttp.H2ErrorCode.NO_ERROR
        assert connection.replies[too_large.stream_id]["resets"] == 1
        assert "reset" not in connection.replies[whole.stream_id]
    finally:
        connection.close()


def test_a_call_of_headers_alone_is_refused_at_once(two_ways):
    connection = RawConnection(two_ways.lane.port)
    try:
        stream = connection.open(INFER)
        connection.send(stream, end=True)
        trailers = dict(connection.reply(stream)[2])
        assert trailers[b"grpc-status"] == b"3" and b"no gRPC message" in trailers[b"grpc-message"]
    finally:
        connection.close()
    assert two_ways.counting.calls == 0


def test_a_body_that_does_not_arrive_in_time_ends_the_call(synthetic_store, movielens_examples, body_of):
    ways = TwoWays(synthetic_store / MODEL / "1", body_timeout_ms=300)
    connection = RawConnection(ways.lane.port)
    try:
        stream = connection.open(INFER)
        connection.send(stream, framed(body_of(movielens_examples[:4]))[:-3])
        started = time.monotonic()
        trailers = dict(connection.reply(stream)[2])
        assert trailers[b"grpc-status"] == b"4" and b"body_timeout_ms=300" in trailers[b"grpc-message"]
        assert time.monotonic() - started < 5
    finally:
        connection.close()
        ways.close()


def test_a_call_still_uploading_counts_as_the_servers_task_and_a_stop_ends_it_unavailable(synthetic_store, movielens_examples,
                                                                                         body_of, monkeypatch):  # fmt: skip
    monkeypatch.setattr(http2, "SHUTDOWN_GRACE_S", 0.3)
    ways = TwoWays(synthetic_store / MODEL / "1")
    connection = RawConnection(ways.lane.port)
    try:
        stream = connection.open(INFER)
        connection.send(stream, framed(body_of(movielens_examples[:4]))[:-3])
        wait_until(lambda: len(ways.lane.state.tasks) == 1, 5, "the uploading call counted")
        started = time.monotonic()
        ways.service.run(ways.lane.stop())
        trailers = dict(connection.reply(stream)[2])
        assert trailers[b"grpc-status"] == b"14" and b"shutting down" in trailers[b"grpc-message"]
        assert time.monotonic() - started >= 0.3  # the grace a call in flight gets
    finally:
        connection.close()
        ways.close()


def test_calls_and_their_connections_leave_no_reference_cycles_in_the_lane_or_the_asgi_way(two_ways, movielens_examples,
                                                                                          body_of):  # fmt: skip
    """With the cycle collector off, four connections of five calls each, for each kind of call, leave nothing of the
    service's for it to find once closed, in the lane and the ASGI way. An error kept as the call's outcome holds its
    traceback, whose frames hold the error: a cycle over the call that the service's rare GC passes would keep,
    unless the error-table row drops its tracebacks (``render.table_error``)."""
    calls = {  # name: the status it ends with, its path, its message, its headers
        "scored": (0, INFER, body_of(movielens_examples[:32])),
        "unknown model": (5, INFER, body_of(movielens_examples[:4], model_name="nope")),
        "a bad tensor": (3, INFER, service_pb2.ModelInferRequest(model_name=MODEL, inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(name="user_id", datatype="FP32", shape=[1])]).SerializeToString()),
        "not the method's message": (3, INFER, b"\xff\xff\xff"),
        "another method": (12, "/some.Other/Method", b""),
        # a deadline that passes while the call waits for its batch: the timeout's error and the call's task
        "the deadline passed": (4, INFER, body_of(movielens_examples[:32]), [(b"grpc-timeout", b"1n")]),
        "a compressed message": (12, INFER, COMPRESSED + framed(gzip.compress(body_of(movielens_examples[:4])))[1:],
                                 [(b"grpc-encoding", b"gzip")]),
        "a message over the limit": (8, INFER, body_of(movielens_examples[:1000]) * 8),
    }  # fmt: skip

    def calls_on_connections(port: int, path: str, body: bytes, headers: list, connections: int = 4, each: int = 5) -> set:
        statuses = set()
        for _ in range(connections):
            connection = RawConnection(port)
            for _ in range(each):
                stream = connection.open(path, headers)
                connection.send(stream, body if body[:1] == COMPRESSED else framed(body), end=True)
                statuses.add(int(dict(connection.reply(stream)[2])[b"grpc-status"]))
            connection.close()
        time.sleep(0.2)  # the service's thread sees the closes
        return statuses

    for way in ("lane", "asgi"):
        port = getattr(two_ways, way).port
        for name, (status, path, body, *headers) in calls.items():
            headers = headers[0] if headers else []
            # once first: one-time work (imports, caches) out of the count
            assert calls_on_connections(port, path, body, headers, 1, 1) == {status}, (way, name)
            with collector_off() as found:
                assert calls_on_connections(port, path, body, headers) == {status}, (way, name)
            assert len(found) < 10, (way, name, len(found), described(found))


def test_calls_the_client_cancels_leave_no_reference_cycles_in_the_lane_or_the_asgi_way(synthetic_store,
                                                                                     movielens_examples, body_of):  # fmt: skip
    """A call reset while it waits for its batch (the batcher skips it) leaves nothing for the cycle collector to find:
    neither the cancelled task nor its connection."""
    ways = TwoWays(synthetic_store / MODEL / "1", compute_on_event_loop=False)
    body = framed(body_of(movielens_examples[:4]))

    def cancel_calls(port: int, calls: int) -> None:
        for _ in range(calls):
            connection = RawConnection(port)
            ways.service.engine.batcher.executor.submit(time.sleep, 0.3)  # as a long batch holds the compute thread
            running = connection.open(INFER)
            connection.send(running, body, end=True)
            time.sleep(0.1)  # its batch waits for the compute thread
            queued = connection.open(INFER)
            connection.send(queued, body, end=True)  # queued behind that batch
            wait_until(lambda: ways.service.engine.batcher.queue, 5, "the call queued")
            queued.reset(zttp.H2ErrorCode.CANCEL)  # RST_STREAM while the call waits for its batch
            connection.flush()
            assert dict(connection.reply(running)[2])[b"grpc-status"] == b"0"
            connection.close()
        time.sleep(0.2)  # the service's thread sees the closes

    try:
        for way in ("lane", "asgi"):
            port = getattr(ways, way).port
            cancel_calls(port, 1)  # one-time work out of the count
            before = ways.service.metrics().get(CANCELLED, 0)
            with collector_off() as found:
                cancel_calls(port, 4)
            wait_until(lambda: ways.service.metrics().get(CANCELLED, 0) >= before + 4, 10, f"{way}: the cancelled calls skipped")
            assert len(found) < 10, (way, len(found), described(found))
    finally:
        ways.close()
