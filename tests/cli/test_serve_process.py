"""`uembed serve` as a process, over real sockets: the ports it takes from the environment, one owner per gRPC port,
the request-head deadline and what SIGTERM does to new and in-flight connections (uembed/serving/process.py)."""

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from uembed.contract.errors import UembedError
from uembed.loadtest.servers import HttpProcess, free_port, http_get, wait_until
from uembed.serving.process import claim_port

EXAMPLE = {"user_id": "196", "movie_id": "242", "genres": ["Comedy"]}


def serve(tmp_path, name: str, port: int, args: list[str], env: dict[str, str] | None = None) -> HttpProcess:
    argv = [sys.executable, "-m", "uembed", "serve", *args]
    return HttpProcess(argv, env or {}, tmp_path / f"{name}.log", f"http://127.0.0.1:{port}/readyz", name)


def score_request(body: bytes) -> bytes:
    return (b"POST /v1/score HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length (the service's), read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the body"
        body += chunk
    return int(head.split()[1]), body


def test_serve_takes_its_port_and_host_from_the_environment(tmp_path, synthetic_store):
    port = free_port()
    service = serve(tmp_path, "env-port", port, ["--bundle", str(synthetic_store / "movielens" / "1"), "--grpc-port", "0"],
                    {"UEMBED_PORT": str(port), "UEMBED_HOST": "127.0.0.1"}).start()  # fmt: skip
    try:
        status, body = http_get(f"http://127.0.0.1:{port}/v1/models")
        assert status == 200 and json.loads(body)["models"][0]["name"] == "movielens"
    finally:
        service.stop()


def test_a_second_server_on_a_held_grpc_port_stops_naming_it(tmp_path, synthetic_store):
    bundle = str(synthetic_store / "movielens" / "1")
    grpc_port, first_port = free_port(), free_port()
    # Two workers: the claim lets the server's own workers share the port (both bind it or the server does not start).
    first = serve(tmp_path, "first", first_port, ["--bundle", bundle, "--port", str(first_port), "--grpc-port",
                                                  str(grpc_port), "--workers", "2"]).start()  # fmt: skip
    try:
        second = subprocess.run([sys.executable, "-m", "uembed", "serve", "--bundle", bundle, "--port", str(free_port()),
                                 "--grpc-port", str(grpc_port)], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and f"port {grpc_port}" in last and "--grpc-port" in last, last
        for _ in range(10):  # fresh channels, each its own connection: all reach the first server
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                metadata = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                    service_pb2.ModelMetadataRequest(name="movielens"), timeout=10)
                assert metadata.name == "movielens"
    finally:
        assert first.stop() == 0


def test_a_shared_grpc_claim_refuses_connections_until_a_worker_listens_and_no_one_else_binds_the_port():
    """The socket `uembed serve --workers N` hands its workers is bound, not listening: a client is refused until a
    worker's gRPC server listens on it (not queued unanswered while the bundles load); the port stays the server's."""
    port = free_port()
    claims = claim_port("127.0.0.1", port, "try another", shared=True)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        taken = f"port {port} on 127.0.0.1 is taken \\(Address already in use\\): another server holds it; try another"
        with pytest.raises(UembedError, match=taken):
            claim_port("127.0.0.1", port, "try another", shared=True)
        with socket.socket() as beside:
            beside.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError):
                beside.bind(("127.0.0.1", port))
        claims[-1].listen()  # as a worker's gRPC server does
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        for claim in claims:
            claim.close()


def test_connections_that_never_finish_their_request_head_are_closed(tmp_path, synthetic_store):
    port = free_port()
    args = ["--bundle", str(synthetic_store / "movielens" / "1"), "--port", str(port), "--grpc-port", "0"]
    service = serve(tmp_path, "heads", port, args, {"UEMBED_MAX_CONNECTIONS": "20", "UEMBED_HEADER_TIMEOUT_S": "1"}).start()
    try:
        held = []
        for index in range(20):  # as many as max_connections: each would hold its slot forever
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            if index == 0:  # a kept-alive connection: one whole request, then half of the next one's head
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
                assert read_response(sock)[0] == 200
            sock.sendall([b"GE", b"GET /healthz HT", b"GET /healthz HTTP/1.1\r\nHost: te"][index % 3])
            held.append(sock)
        for sock in held:
            assert sock.recv(1024) == b"", "the server closes the connection (recv times out if it never does)"
            sock.close()
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        service.stop()


def test_sigterm_refuses_new_connections_while_the_requests_in_flight_finish(tmp_path, synthetic_store):
    port = free_port()
    args = ["--bundle", str(synthetic_store / "movielens" / "1"), "--port", str(port), "--grpc-port", "0", "--workers", "2"]
    service = serve(tmp_path, "sigterm", port, args).start()
    body = json.dumps({"examples": [EXAMPLE]}).encode()
    in_flight = socket.create_connection(("127.0.0.1", port), timeout=60)
    in_flight.sendall(score_request(body) + body)
    assert read_response(in_flight)[0] == 200  # a worker holds this connection
    in_flight.sendall(score_request(body) + body[:-3])  # a request in flight, its body not all sent yet
    service.process.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_until(refused, 60, "new connections refused after SIGTERM")
    in_flight.sendall(body[-3:])
    status, answer = read_response(in_flight)
    assert status == 200 and len(json.loads(answer)["scores"]) == 1
    in_flight.close()
    assert service.process.wait(60) == 0
    service.log.close()


@pytest.mark.parametrize(("name", "closest"), [("UEMBED_MAX_EXAMPLE", "UEMBED_MAX_EXAMPLES"), ("UEMBED_REDIS_URI", "UEMBED_REDIS_URL")])
def test_a_misspelt_setting_stops_the_server_naming_the_closest(tmp_path, monkeypatch, name, closest):
    monkeypatch.setenv(name, "2")
    result = subprocess.run([sys.executable, "-m", "uembed", "serve", "--port", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: unknown setting {name}: did you mean {closest}?"


def test_each_response_leaves_in_one_write(tmp_path, synthetic_store):
    """uvicorn writes a response's head and its body apart; the service's protocol sends them as one (two system
    calls and two wake-ups of the client become one); a response that closes its connection is sent first, and so is
    one to a client that half-closed its side after the request."""
    port = free_port()
    args = ["--bundle", str(synthetic_store / "movielens" / "1"), "--port", str(port), "--grpc-port", "0"]
    service = serve(tmp_path, "writes", port, args).start()
    body = json.dumps({"examples": [EXAMPLE] * 8}).encode()

    def writes() -> int:  # the worker's write system calls so far (one worker: the server's own process)
        io = dict(line.split(": ") for line in Path(f"/proc/{service.process.pid}/io").read_text().splitlines())
        return int(io["syscw"])

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(score_request(body) + body)
            assert read_response(sock)[0] == 200
            before, responses = writes(), 100
            for _ in range(responses):
                sock.sendall(score_request(body) + body)
                status, answer = read_response(sock)
                assert status == 200 and len(json.loads(answer)["scores"]) == 8
            per_response = (writes() - before) / responses
        assert per_response < 1.5, f"{per_response:.2f} writes a response (uvicorn's own protocol makes 2)"
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            assert read_response(sock)[0] == 200
            assert sock.recv(1024) == b"", "the connection closes once its response is sent"
        for _ in range(10):  # a client that half-closes after its request still gets the response written that turn
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                assert read_response(sock)[0] == 200
    finally:
        service.stop()
