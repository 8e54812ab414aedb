"""The fast lane of /v1/score (uembed/serving/protocols/fast_lane.py), on a real uvicorn over loopback sockets with
the service's protocol: it answers as the ASGI way does (the same request sent chunked, which the lane leaves to
that way, is the reference), takes only what its head and body allow, and keeps HTTP/1.1's order and connection
rules: pipelined requests, a body in pieces, Connection: close, HTTP/1.0, Expect: 100-continue."""

import asyncio
import functools
import gc
import json
import weakref

import pytest
import uvicorn

from tests.serving.garbage import collector_off, described
from uembed.contract.errors import RowsUnavailable
from uembed.loadtest.servers import free_port
from uembed.serving.app import create_app
from uembed.serving.process import HeadDeadlineProtocol
from uembed.serving.settings import load_settings


class CountingProtocol(HeadDeadlineProtocol):
    """The service's protocol, counting the requests its lane answers."""

    answered = 0
    lane_of_the_app = None  # the served app's FastScoreLane
    served_app = None
    alive = weakref.WeakSet()  # the protocols not freed yet

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        type(self).alive.add(self)

    async def _lane_answer(self, *args) -> None:
        type(self).answered += 1
        await super()._lane_answer(*args)


@pytest.fixture
def serve(synthetic_store):
    """serve(check) runs ``await check(port)`` against a service on this test's loop, then stops it."""

    def run(check, **settings):
        async def main():
            app = create_app(load_settings(bundles=[synthetic_store / "movielens" / "1"], grpc_port=free_port(), **settings))
            CountingProtocol.lane_of_the_app, CountingProtocol.served_app = app.state.fast_lane, app
            port = free_port()
            config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=5,  # a connection a failing test leaves open
                                    http=functools.partial(CountingProtocol, head_timeout_s=10))  # fmt: skip
            server = uvicorn.Server(config)
            serving = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.01)
            try:
                await check(port)
            finally:
                server.should_exit = True
                await serving

        CountingProtocol.answered = 0
        CountingProtocol.alive = weakref.WeakSet()
        asyncio.run(main())

    return run


def request(body: bytes, chunked: bool = False, headers: bytes = b"", version: bytes = b"1.1") -> bytes:
    head = b"POST /v1/score HTTP/" + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n" + headers
    if chunked:  # the lane leaves a body of no stated length to the ASGI way
        return head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    status = int((await reader.readuntil(b"\r\n")).split()[1])
    headers = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, value = line.rstrip(b"\r\n").split(b": ", 1)
        headers[name.lower()] = value
    body = await reader.readexactly(int(headers[b"content-length"]))
    return status, headers, body


async def exchange(port: int, *requests: bytes) -> list[tuple[int, dict, bytes]]:
    """The requests sent in one write on one connection (pipelined), and their responses in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(requests))
    answers = [await response(reader) for _ in requests]
    writer.close()
    return answers


def bodies(examples: list[dict]) -> dict[str, bytes]:
    user = ("user_id", "age", "gender", "occupation", "zip_code")
    return {
        "flat": json.dumps({"examples": examples[:3]}).encode(),
        "ranking": json.dumps({"context": {k: examples[0][k] for k in user},
                               "candidates": [{k: v for k, v in e.items() if k not in user} for e in examples[:4]]}).encode(),
        "a value of the wrong type": json.dumps({"examples": [{**examples[0], "age": [1, 2]}]}).encode(),
        "an unknown model": json.dumps({"examples": examples[:1], "model": "nope"}).encode(),
        "not JSON": b'{"examples": [',
        "both forms": json.dumps({"examples": examples[:1], "candidates": examples[:1]}).encode(),
        "an unknown field": json.dumps({"examples": examples[:1], "extra": 1}).encode(),
    }  # fmt: skip


def test_the_lane_answers_as_the_asgi_way_does(serve, movielens_examples):
    """Each body sent with a stated length (the lane's, where it decodes) and chunked (the ASGI way's): the same
    status, body and headers but the date; the lane answers exactly the bodies the lean path takes."""
    sent = bodies(movielens_examples)
    lane_takes = {"flat", "ranking", "a value of the wrong type", "an unknown model"}

    async def check(port):
        for name, body in sent.items():
            before = CountingProtocol.answered
            [(status, headers, answer)] = await exchange(port, request(body))
            took = CountingProtocol.answered - before
            [(asgi_status, asgi_headers, asgi_answer)] = await exchange(port, request(body, chunked=True))
            assert CountingProtocol.answered - before == took == (name in lane_takes), name
            assert (status, answer) == (asgi_status, asgi_answer), name
            assert {k: v for k, v in headers.items() if k != b"date"} == {k: v for k, v in asgi_headers.items() if k != b"date"}, name
        assert status == 422 and json.loads(answer)["error"] == "validation"

    serve(check)


def test_pipelined_requests_are_answered_in_order(serve, movielens_examples):
    """Three requests in one write, the middle one the ASGI way's: three responses in their order."""

    async def check(port):
        sizes = (1, 2, 3)
        sent = [request(json.dumps({"examples": movielens_examples[:n]}).encode(), chunked=n == 2) for n in sizes]
        answers = await exchange(port, *sent)
        assert [len(json.loads(body)["scores"]) for _, _, body in answers] == list(sizes)
        assert CountingProtocol.answered == 2

    serve(check)


def test_a_body_in_pieces_is_answered_once_whole(serve, movielens_examples):
    async def check(port):
        whole = request(json.dumps({"examples": movielens_examples[:4]}).encode())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for start in range(0, len(whole), len(whole) // 4 + 1):
            writer.write(whole[start : start + len(whole) // 4 + 1])
            await writer.drain()
            await asyncio.sleep(0.05)
        status, _, body = await response(reader)
        writer.close()
        assert status == 200 and len(json.loads(body)["scores"]) == 4 and CountingProtocol.answered == 1

    serve(check)


@pytest.mark.parametrize("headers, version", [(b"Connection: close\r\n", b"1.1"), (b"", b"1.0")])
def test_a_connection_that_ends_is_closed_after_its_answer(serve, movielens_examples, headers, version):
    async def check(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(json.dumps({"examples": movielens_examples[:1]}).encode(), headers=headers, version=version))
        status, answer_headers, _ = await response(reader)
        assert status == 200 and answer_headers[b"connection"] == b"close"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
        writer.close()
        assert CountingProtocol.answered == 1

    serve(check)


def test_expect_100_continue_goes_the_asgi_way(serve, movielens_examples):
    """A client that waits for 100 Continue before its body gets it (the lane would wait for the body first)."""

    async def check(port):
        body = json.dumps({"examples": movielens_examples[:2]}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = request(body, headers=b"Expect: 100-continue\r\n")
        writer.write(head[: len(head) - len(body)])
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        status, _, answer = await response(reader)
        writer.close()
        assert status == 200 and len(json.loads(answer)["scores"]) == 2 and CountingProtocol.answered == 0

    serve(check)


def test_the_lane_counts_its_requests_under_the_route(serve, movielens_examples, synthetic_store):
    async def check(port):
        await exchange(port, request(json.dumps({"examples": movielens_examples[:1]}).encode()))
        await exchange(port, request(bodies(movielens_examples)["a value of the wrong type"]))
        _, _, text = (await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))[0]
        samples = text.decode()
        assert 'uembed_http_requests_total{route="/v1/score",status="200"} 1.0' in samples
        assert 'uembed_http_requests_total{route="/v1/score",status="422"} 1.0' in samples
        assert CountingProtocol.answered == 2

    serve(check)


def metric(text: bytes, sample: str) -> float:
    lines = [line for line in text.decode().splitlines() if line.startswith(sample + " ")]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


async def metrics(port: int) -> bytes:
    return (await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))[0][2]


def test_a_client_that_leaves_is_counted_and_its_work_skipped(serve, movielens_examples):
    """The connection lost while the request waits for its batch: the batcher skips it, the request is counted as
    499, and the service goes on answering."""
    left = 'uembed_http_requests_total{route="/v1/score",status="499"}'
    skipped = 'uembed_abandoned_requests_total{reason="cancelled"}'

    async def check(port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(json.dumps({"examples": movielens_examples[:3]}).encode()))
        await writer.drain()
        await asyncio.sleep(0.2)  # read and queued: the batch waits max_wait_ms
        writer.close()
        for _ in range(100):
            text = await metrics(port)
            if metric(text, skipped):
                break
            await asyncio.sleep(0.1)
        assert metric(text, left) == 1 and metric(text, skipped) == 1
        [(status, _, _)] = await exchange(port, request(json.dumps({"examples": movielens_examples[:1]}).encode()))
        assert status == 200 and CountingProtocol.answered == 2

    serve(check, max_wait_ms=1500)


def test_a_pipelined_body_that_stalls_is_refused_in_time(serve, movielens_examples):
    """A second request in the same write as the first, its body cut short: after the first answer its body's
    clock runs (it waits in the lane, not read by a task) and it gets the limits' 408, its connection closed."""

    async def check(port):
        first = request(json.dumps({"examples": movielens_examples[:1]}).encode())
        second = request(json.dumps({"examples": movielens_examples[:2]}).encode())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first + second[:-5])
        assert (await response(reader))[0] == 200
        status, _, body = await asyncio.wait_for(response(reader), 10)
        assert status == 408 and json.loads(body)["error"] == "request_timeout", body
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    serve(check, body_timeout_ms=300)


def test_a_failure_in_the_lane_is_a_500_never_a_hang(serve, movielens_examples, monkeypatch):
    """Scoring that raises is the error table's 500 in /v1's shape, as the route answers it; a failure of the lane
    itself is uvicorn's 500 with the connection closed. Both counted."""

    async def check(port):
        body = request(json.dumps({"examples": movielens_examples[:1]}).encode())

        async def broken_scoring(*args):
            raise RuntimeError("a bug")

        lane = CountingProtocol.lane_of_the_app
        monkeypatch.setattr(lane, "scored", broken_scoring)
        [(status, _, answer)] = await exchange(port, body)
        assert status == 500 and json.loads(answer)["error"] == "internal"

        async def broken_lane(*args):
            raise RuntimeError("a bug in the lane")

        monkeypatch.setattr(lane, "answer", broken_lane)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(body)
        status, headers, answer = await asyncio.wait_for(response(reader), 5)
        assert (status, headers[b"connection"], answer) == (500, b"close", b"Internal Server Error")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    serve(check)


def test_a_closed_connection_is_freed_at_once_not_by_the_garbage_collector(serve, movielens_examples):
    """With the cycle collector off, the protocol of each connection is freed as soon as it closes: after a lane
    answer on a kept-alive connection and with Connection: close, after the ASGI way's, after a client that left
    before its answer, and after one that left before the end of its body. The service collects young objects rarely (``gc_gen0_threshold``), so a connection held in a
    reference cycle would keep its request's body and buffers long after it closed."""

    async def check(port):
        body = json.dumps({"examples": movielens_examples[:3]}).encode()
        gc.disable()
        try:
            await exchange(port, request(body))
            await exchange(port, request(body, chunked=True))
            await exchange(port, request(body, headers=b"Connection: close\r\n"))
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request(body))
            await writer.drain()
            await asyncio.sleep(0.2)  # read and queued: the batch waits max_wait_ms
            writer.close()
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request(body)[:-10])  # the lane waits for the rest of the body, which never comes
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
            for _ in range(100):
                if CountingProtocol.answered == 3 and not CountingProtocol.alive:
                    break
                await asyncio.sleep(0.05)
            assert CountingProtocol.answered == 3
            assert not CountingProtocol.alive, [vars(protocol).get("cycle") for protocol in CountingProtocol.alive]
        finally:
            gc.enable()

    serve(check, max_wait_ms=1000)


def test_answered_requests_and_their_connections_leave_no_reference_cycles(serve, movielens_examples, monkeypatch):
    """With the cycle collector off, four connections of five requests each, for each kind of request, leave nothing
    of the service's for it to find once closed: the lane's answers and errors, the ASGI way's, a body that is not
    JSON (FastAPI raises that one from a frame that holds the error), and a batch that fails (its error is set on
    every request's future). An error kept past its ``except`` holds its traceback, whose frames hold it again."""
    sent = bodies(movielens_examples)
    kinds = {"lane": request(sent["flat"]), "ASGI way": request(sent["flat"], chunked=True),
             "lane, an unknown model": request(sent["an unknown model"]),
             "ASGI way, an unknown model": request(sent["an unknown model"], chunked=True),
             "not JSON": request(sent["not JSON"]), "an unknown field": request(sent["an unknown field"]),
             "an unknown route": b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"}  # fmt: skip

    async def requests_on_connections(sent_request: bytes, connections: int = 4, each: int = 5) -> set[int]:
        statuses = set()
        for _ in range(connections):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of_the_test)
            for _ in range(each):
                writer.write(sent_request)
                statuses.add((await response(reader))[0])
            writer.close()
        await asyncio.sleep(0.1)  # the server sees the closes
        return statuses

    async def check(port):
        nonlocal port_of_the_test
        port_of_the_test = port
        for kind, sent_request in kinds.items():
            await requests_on_connections(sent_request, 1, 1)  # one-time work (imports, caches) out of the count
            with collector_off() as found:
                await requests_on_connections(sent_request)
            assert len(found) < 10, (kind, len(found), described(found))

        def failed_batch(batch):
            raise RowsUnavailable("no rows: Redis is down")

        batcher = CountingProtocol.served_app.state.engine.batcher
        monkeypatch.setattr(batcher, "_run_batch", failed_batch)
        await requests_on_connections(kinds["lane"], 1, 1)
        with collector_off() as found:
            assert await requests_on_connections(kinds["lane"]) == {503}
        assert len(found) < 10, ("a failed batch", len(found), described(found))

    port_of_the_test = None
    serve(check)
