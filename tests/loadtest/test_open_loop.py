"""The open-loop HTTP/1.1 client (``uembed/loadtest/open_loop.py``) against a real uvicorn over sockets: requests at
their scheduled times, every answer read whole, failures counted, and connections the server closes opened again."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from uembed.loadtest import open_loop as open_loop_module
from uembed.loadtest.open_loop import open_loop, response_length, sequential
from uembed.loadtest.servers import HttpProcess, free_port


async def echo_app(scope, receive, send) -> None:
    """Answers each request with its own body: 500 for ``fail``, ``close`` closes the connection after it, and
    ``hang`` is answered only after five seconds."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if body == b"hang":
        await asyncio.sleep(5)
    headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
    if body == b"close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 500 if body == b"fail" else 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "tests.loadtest.test_open_loop:echo_app", "--host", "127.0.0.1", "--port",
            str(port), "--no-access-log", "--timeout-graceful-shutdown", "1"]  # fmt: skip
    server = HttpProcess(argv, {}, tmp_path_factory.mktemp("echo") / "echo.log", f"http://127.0.0.1:{port}/", "echo").start()
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.stop()


def test_requests_go_at_their_rate_and_each_failure_is_counted(echo):
    result = open_loop(echo.url, [b'{"ok": 1}', b"fail"], seconds=1.0, rate=200, connections=4, path="/score")
    assert result.requests == 200, "every request scheduled within the second is sent and answered"
    assert result.failures == 100, "the requests take turns, and every other one is answered 500"
    assert all(latency > 0 for latency in result.latencies) and result.summary()["p99_ms"] < 1000


def test_connections_the_server_closes_are_opened_again_with_no_request_lost(echo):
    """A response with ``connection: close`` ends its connection: the next request goes on a new one, never on the
    closing one (where it would be lost if the server's close came after it was sent)."""
    result = open_loop(echo.url, [b"close", b"kept"], seconds=0.5, rate=400, connections=2, path="/score")
    assert (result.requests, result.failures) == (200, 0)
    result = sequential(echo.url, [b"close", b"kept"], 10, path="/score")
    assert (result.requests, result.failures, len(result.latencies)) == (10, 0, 10)


def test_a_server_that_stops_answering_fails_each_request_after_the_timeout_and_the_run_ends(echo, monkeypatch):
    monkeypatch.setattr(open_loop_module, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(open_loop_module, "DRAIN_S", 0.5)
    started = time.monotonic()
    result = open_loop(echo.url, [b"hang"], seconds=0.5, rate=20, connections=2, path="/score")
    assert (result.requests, result.failures) == (10, 10)
    assert time.monotonic() - started < 20, "each request fails after the timeout; nothing waits for the server"


def test_one_request_at_a_time_for_the_unloaded_latency(echo):
    result = sequential(echo.url, [b"a", b"fail"], 20, path="/score")
    assert (result.requests, result.failures, len(result.latencies)) == (20, 10, 20)


def test_a_response_is_whole_once_its_stated_length_has_arrived():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n"
    assert response_length(bytearray(head[:-2])) is None
    assert response_length(bytearray(head + b"ab")) == (200, len(head) + 5, False)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert response_length(bytearray(chunked)) == (0, len(chunked), True), "a reply without a length is not read"
    # one that ends its connection, the header's tokens in any case
    closing = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: Keep-Alive, Close\r\n\r\n"
    assert response_length(bytearray(closing)) == (503, len(closing), True)
