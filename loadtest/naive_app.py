"""The baseline the benchmark compares against: a naive FastAPI service.

What a first version usually looks like: a sync endpoint that encodes the request's
examples and runs the bundle's TorchScript full model once per request. No batching
across requests, no row cache, no ONNX Runtime. (One torch thread, like the real
service, so the comparison is about batching and the serving path, not thread
oversubscription on a small machine.) Bundle from ``NAIVE_BUNDLE``.
"""

import os

import torch
from fastapi import FastAPI

from export.loader import load_bundle
from model.data import encode_values


def create_app() -> FastAPI:
    torch.set_num_threads(1)
    bundle = load_bundle(os.environ["NAIVE_BUNDLE"])
    model = torch.jit.load(str(bundle.path / bundle.manifest["full_model"]["torchscript"]["file"]))
    app = FastAPI()

    @app.post("/v1/score")
    def score(body: dict) -> dict:
        examples = body["examples"]
        columns = {name: encode_values(spec, [e.get(name) for e in examples]) for name, spec in bundle.feature_specs.items()}
        rows, weights = bundle.plan.encode(columns)
        with torch.no_grad():
            scores = model(torch.from_numpy(rows), torch.from_numpy(weights))
        return {"model": bundle.name, "version": bundle.version, "scores": scores.tolist()}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    return app
