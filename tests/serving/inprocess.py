"""The app without sockets: ``create_app`` over ``httpx.ASGITransport``, for request-shape and bad-input tests.

The engine and the app run on an event loop of their own thread, so tests stay plain functions.
Real uvicorn stays for what needs a real server: parity under batching, faults, connections.
"""

from __future__ import annotations

import asyncio
import threading

import httpx

from tests.scoring import post_score
from uembed.loadtest.servers import parse_exposition
from uembed.serving.app import create_app
from uembed.serving.engine import ScoringEngine
from uembed.serving.settings import load_settings


class InProcessService:
    def __init__(self, **settings) -> None:
        self.settings = load_settings(**settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="in-process-service", daemon=True)
        self.thread.start()
        self.engine = ScoringEngine(self.settings)
        for path in self.settings.bundles:
            self.engine.registry.load(path)
        self.app = create_app(self.settings, self.engine)
        self.run(self.engine.astart())
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://uembed.test", timeout=30)

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        return self.run(self.client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def score(self, examples: list[dict], **options) -> httpx.Response:
        """POST /v1/score's response, whatever its status (``tests/scoring.py``'s ``score`` for checked scores)."""
        return post_score(self, examples, **options)

    def metrics(self) -> dict[str, float]:
        return parse_exposition(self.get("/metrics").text)

    def close(self) -> None:
        self.run(self.engine.astop())
        self.run(self.client.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
