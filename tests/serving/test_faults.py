"""Faults under real traffic: Redis killed, restarted and paused; overload; hot reload; shutdown."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from tests.scoring import score
from uembed.bundle.loader import load_bundle
from uembed.loadtest.servers import RedisServer, wait_until
from uembed.serving.pipeline.reference import ReferenceScorer

TOKEN = "a-test-token-of-some-length"


class Traffic:
    """Threads that score chunks of examples in a loop and record every outcome."""

    def __init__(self, url: str, examples: list[dict], threads: int = 3, chunk: int = 16) -> None:
        self.url, self.examples, self.chunk = url, examples, chunk
        self.results: list[dict] = []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(timeout=10) as client:
            while not self.stop_event.is_set():
                start = int(rng.integers(0, len(self.examples) - self.chunk))
                sent = time.perf_counter()
                try:
                    response = client.post(f"{self.url}/v1/score", json={"examples": self.examples[start : start + self.chunk]})
                    body = response.json()
                except httpx.HTTPError as exc:
                    response, body = None, {"error": repr(exc)}
                record = {"start": start, "sent_at": sent, "status": response.status_code if response else None, "body": body,
                          "seconds": time.perf_counter() - sent, "headers": dict(response.headers) if response else {}}  # fmt: skip
                with self.lock:
                    self.results.append(record)

    def __enter__(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join()

    def run_for(self, seconds: float) -> None:
        """Traffic for a set time, for a fault of a set length (a paused Redis); to wait for an outcome, poll it."""
        time.sleep(seconds)

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def count_since(self, sent_after: float) -> int:
        """Requests sent after ``sent_after`` (``time.perf_counter()``) and answered."""
        with self.lock:
            return sum(r["sent_at"] > sent_after for r in self.results)

    def failures(self) -> list[dict]:
        return [r for r in self.results if r["status"] != 200]


def test_redis_killed_restarted_and_paused_under_traffic(start_service, synthetic_store, movielens_examples, tmp_path):
    redis_server = RedisServer(tmp_path).start()
    service = start_service(
        [synthetic_store / "movielens" / "1"], redis_url=redis_server.url, hot_rows_bytes=0,
        redis_timeout_ms=50, redis_retry_s=0.3, request_timeout_ms=1000,
    )  # fmt: skip
    try:
        redis_hits, fallbacks = 'uembed_row_cache_hits_total{tier="redis"}', "uembed_redis_fallbacks_total"
        fetch_errors = 'uembed_redis_errors_total{operation="fetch"}'
        with Traffic(service.url, movielens_examples) as traffic:
            wait_until(lambda: traffic.count() >= 20 and service.metrics().get(redis_hits, 0) > 0, 20, "rows read from Redis")
            before_kill = service.metrics()
            redis_server.kill()

            def fell_back() -> bool:
                now = service.metrics()
                return now[fallbacks] > before_kill[fallbacks] and now.get(fetch_errors, 0) > 0

            wait_until(fell_back, 20, "fallbacks to the row files")
            after_kill = service.metrics()

            redis_server.start()  # same port, empty: misses fill it, then it answers again
            wait_until(lambda: service.metrics()[redis_hits] > after_kill[redis_hits], 20, "rows read from the restarted Redis")

            redis_server.pause()  # longer than redis_timeout_ms: every call times out
            paused_from = traffic.count()
            traffic.run_for(1.5)  # the fault: Redis paused this long
            redis_server.resume()
            resumed_at = time.perf_counter()
            wait_until(lambda: traffic.count_since(resumed_at) >= 10, 20, "traffic after the pause")
        assert traffic.failures() == []
        paused = traffic.results[paused_from:]
        assert paused and max(r["seconds"] for r in paused) < 1.0  # within the request deadline
        assert len(traffic.results) > 50
    finally:
        redis_server.stop()


def test_overload_is_refused_with_503_and_retry_after(start_service, synthetic_store, movielens_examples):
    # A batching window of 20 ms: a second request within it finds the queue full, whether batches run on the
    # event loop (requests that arrive during a batch are admitted, or refused, when it ends) or on a thread.
    service = start_service([synthetic_store / "movielens" / "1"], max_queue_examples=64, request_timeout_ms=5000,
                            max_wait_ms=20)

    def post(index: int):
        chunk = movielens_examples[(index * 64) % 900 :][:64]
        sent = time.perf_counter()
        response = httpx.post(f"{service.url}/v1/score", json={"examples": chunk}, timeout=10)
        return response, time.perf_counter() - sent

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(post, range(400)))
    statuses = [r.status_code for r, _ in outcomes]
    assert set(statuses) <= {200, 503}
    rejected = [r for r, _ in outcomes if r.status_code == 503]
    assert rejected and all(r.headers["retry-after"] == "1" and r.json()["error"] == "overloaded" for r in rejected)
    assert statuses.count(200) > 0
    assert service.metrics()['uembed_rejected_requests_total{reason="overloaded"}'] == len(rejected)
    # Admitted requests wait behind at most one queued request's worth of work: none near the deadline.
    assert max(seconds for r, seconds in outcomes if r.status_code == 200) < 2.5


def test_hot_reload_under_traffic(start_service, synthetic_store, movielens_examples):
    service = start_service([synthetic_store / "movielens" / "1"], reload_token=TOKEN, bundle_store=synthetic_store)
    references = {
        version: ReferenceScorer(load_bundle(synthetic_store / "movielens" / version)).score(movielens_examples)
        for version in ("1", "2")
    }
    assert np.abs(references["1"] - references["2"]).max() > 1e-6  # float16 rows: the versions are told apart

    url = f"{service.url}/v1/models/movielens/load"
    assert httpx.post(url, json={"version": "2"}).status_code == 401
    assert httpx.post(url, json={"version": "2"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    missing = httpx.post(url, json={"version": "9"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 404 and "movielens/9" in missing.json()["detail"]
    escape = httpx.post(f"{service.url}/v1/models/movielens/load", json={"version": "../../etc"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert escape.status_code == 422 and escape.json()["errors"][0]["field"] == "version"

    with Traffic(service.url, movielens_examples) as traffic:
        wait_until(lambda: traffic.count() >= 20, 20, "traffic before the reload")
        response = httpx.post(url, json={"version": "2"}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert response.json() == {"model": "movielens", "version": "2"}
        reloaded_at = time.perf_counter()
        wait_until(lambda: traffic.count_since(reloaded_at) >= 20, 20, "traffic after the reload")
    assert traffic.failures() == []
    versions = [r["body"]["version"] for r in traffic.results]
    assert versions[0] == "1" and versions[-1] == "2"
    for record in traffic.results:
        expected = references[record["body"]["version"]][record["start"] : record["start"] + traffic.chunk]
        np.testing.assert_allclose(record["body"]["scores"], expected, atol=1e-6, rtol=0)
    assert httpx.get(f"{service.url}/v1/models").json()["models"][0]["version"] == "2"
    metrics = service.metrics()
    assert metrics['uembed_model_reloads_total{model="movielens",outcome="ok"}'] == 1
    assert metrics['uembed_model_info{dtype="float16",method="unified",model="movielens",version="2"}'] == 1
    assert not any('version="1"' in name for name in metrics if name.startswith("uembed_model_info"))


def test_shutdown_drains_requests_in_flight(start_service, synthetic_store, movielens_examples):
    service = start_service([synthetic_store / "movielens" / "1"], max_wait_ms=1500)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(httpx.post, f"{service.url}/v1/score", json={"examples": movielens_examples[:8]}, timeout=10)
                   for _ in range(6)]  # fmt: skip
        queued = lambda: service.metrics()["uembed_queue_examples"]  # noqa: E731
        wait_until(lambda: queued() >= 48, 5, "all six requests admitted and waiting in the batcher's window")
        assert queued() == 48, "the six requests were not all waiting when the stop began: nothing would be drained"
        # uvicorn re-raises SIGTERM once it has shut down cleanly, so -15 is a clean exit.
        assert service.stop() in (0, -15)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 6
    assert "Application shutdown complete" in service.log_path.read_text()


def test_a_dribbled_body_gets_408_and_its_connection_closed(start_service, synthetic_store):
    """Headers, then a body that never finishes: before, 200 such connections were held open for ever."""
    import socket

    service = start_service([synthetic_store / "movielens" / "1"], body_timeout_ms=500)
    connections = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"exa")
        connections.append(sock)
    for sock in connections:
        reply = b""
        while chunk := sock.recv(4096):  # returns b"" once the server closes the connection
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        assert b'"error":"request_timeout"' in reply and b"body_timeout_ms" in reply
    assert httpx.get(f"{service.url}/readyz").status_code == 200


def test_connections_over_the_cap_get_503(synthetic_store, tmp_path):
    """UEMBED_MAX_CONNECTIONS is uvicorn's limit_concurrency (uembed serve passes it): idle connections count."""
    import socket

    from uembed.loadtest.servers import UvicornProcess

    service = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(synthetic_store / "movielens" / "1")},
                             tmp_path / "capped.log", limit_concurrency=4).start()  # fmt: skip
    try:
        held = [socket.create_connection(("127.0.0.1", service.port), timeout=10) for _ in range(4)]
        response = httpx.get(f"{service.url}/healthz")
        assert response.status_code == 503
        for sock in held:
            sock.close()
        wait_until(lambda: httpx.get(f"{service.url}/healthz").status_code == 200, 5, "a connection under the cap")
    finally:
        service.stop()


def test_a_client_that_leaves_before_its_batch_is_skipped_and_counted(start_service, synthetic_store, movielens_examples):
    import json
    import socket

    service = start_service([synthetic_store / "movielens" / "1"], max_wait_ms=1500)
    before = service.metrics()
    body = json.dumps({"examples": movielens_examples[:5]}).encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        wait_until(lambda: service.metrics()["uembed_queue_examples"] >= 5, 5, "the request reaching the batcher")
        assert service.metrics()["uembed_queue_examples"] == 5
    key = 'uembed_abandoned_requests_total{reason="cancelled"}'
    wait_until(lambda: service.metrics()[key] > before[key], 10, "the batch loop meeting the abandoned request")
    after = service.metrics()
    assert after[key] - before[key] == 1
    scored = 'uembed_scored_examples_total{model="movielens"}'
    assert after.get(scored, 0) == before.get(scored, 0)  # its five examples were never scored
    score(service.url, movielens_examples[:2])
