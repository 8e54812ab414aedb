"""The baseline the benchmark compares against: a naive FastAPI service.

What a first version usually looks like: a sync endpoint that encodes the request's
examples and runs the bundle's TorchScript full model once per request. No batching
across requests, no row cache, no ONNX Runtime. (One torch thread, like the real
service, so the comparison is about batching and the serving path, not thread
oversubscription on a small machine.) It encodes through the same ``ExampleEncoder``
as the service, so both score the same rows. Bundle from ``NAIVE_BUNDLE``.
"""

import os

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from export.encoding import ExampleEncoder, ValueLimits
from export.loader import load_bundle
from model.errors import UembedError


def create_app() -> FastAPI:
    torch.set_num_threads(1)
    bundle = load_bundle(os.environ["NAIVE_BUNDLE"])
    encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits())
    model = torch.jit.load(str(bundle.path / bundle.manifest["full_model"]["torchscript"]["file"]))
    app = FastAPI()

    @app.exception_handler(UembedError)
    async def refused(request, exc: UembedError) -> JSONResponse:
        return JSONResponse({"error": exc.kind, "detail": str(exc)}, status_code=exc.status)

    @app.post("/v1/score")
    def score(body: dict) -> dict:
        rows, weights = encoder.encode(body["examples"])
        with torch.no_grad():
            scores = model(torch.from_numpy(rows), torch.from_numpy(weights))
        return {"model": bundle.name, "version": bundle.version, "scores": scores.tolist()}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    return app
