"""The routes an orchestrator and Prometheus read: /healthz (the process is alive), /readyz (a model is loaded and
a one-example score goes through the batcher) and /metrics."""

import asyncio
import os

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from uembed.contract import errors
from uembed.serving.engine import ScoringEngine
from uembed.serving.protocols.v1 import declared


def add_probe_routes(app: FastAPI, engine: ScoringEngine) -> None:
    @app.get("/healthz", summary="The process is alive", responses=declared())
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded and a one-example score succeeds",
             responses=declared(errors.NotReady, errors.Overloaded, errors.RowsUnavailable, errors.DeadlineExceeded))  # fmt: skip
    async def readyz() -> dict:
        runtime = await engine.ready()
        # The worker that answered: with several workers, each connection reaches one of them.
        return {"status": "ready", "model": runtime.name, "version": runtime.version, "worker": os.getpid()}

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"description": "The Prometheus text format", "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
                   **declared()},  # fmt: skip
    )
    async def metrics() -> Response:
        await asyncio.to_thread(engine.observe_files)
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
