"""The baseline the benchmark compares against: a naive FastAPI service.

What a first version usually looks like: a sync endpoint that encodes the request's
examples and scores them once per request. No batching across requests, no row cache,
no shared row files. (One torch thread, like the real service, so the comparison is
about batching and the serving path, not thread oversubscription on a small machine.)
It encodes through the same ``ExampleEncoder`` as the service, so both score the same
rows. Bundle from ``NAIVE_BUNDLE``.

Two models, by what the bundle carries:

- a bundle with a full model (float32, tables under the size limit): its TorchScript
  model, run once per request;
- any other bundle (the 100 M-row scale bundles): a torch model with its full tables in
  this worker's memory, as float32 tensors (every worker its own copy, as when each
  worker loads a checkpoint), looked up with ``torch.nn.functional.embedding`` and the
  dense net through ONNX Runtime.
"""

import mmap
import os

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from uembed.bundle.loader import advise, load_bundle
from uembed.contract.errors import UembedError
from uembed.serving.pipeline.encoding import ExampleEncoder
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.pipeline.values import ValueLimits

CHUNK_ROWS = 1 << 22


def full_tables_scorer(bundle):
    """rows, weights -> probabilities with every table copied into this process as float32."""
    scorer = ReferenceScorer(bundle)
    tables = []
    for table, slots in scorer.table_slots:
        advise(table.data, mmap.MADV_SEQUENTIAL)  # read front to back: read-ahead helps (the loader advised random)
        weight = torch.empty((table.rows, table.dim), dtype=torch.float32)
        for start in range(0, table.rows, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, table.rows)
            weight[start:stop] = torch.from_numpy(table.gather(np.arange(start, stop)))
        tables.append((weight, torch.from_numpy(slots)))

    def score(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(rows)
        looked_up = torch.empty(rows.shape + (scorer.plan.dim,), dtype=torch.float32)
        for weight, slots in tables:
            looked_up[:, slots] = torch.nn.functional.embedding(ids[:, slots], weight)
        return scorer.dense(scorer.assemble(looked_up.numpy(), weights))

    return score


def create_app() -> FastAPI:
    torch.set_num_threads(1)
    bundle = load_bundle(os.environ["NAIVE_BUNDLE"])
    encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits())
    if bundle.manifest.get("full_model"):
        model = torch.jit.load(str(bundle.path / bundle.manifest["full_model"]["torchscript"]["file"]))

        def run(rows: np.ndarray, weights: np.ndarray) -> list[float]:
            with torch.no_grad():
                return model(torch.from_numpy(rows), torch.from_numpy(weights)).tolist()
    else:
        full = full_tables_scorer(bundle)

        def run(rows: np.ndarray, weights: np.ndarray) -> list[float]:
            with torch.no_grad():
                return full(rows, weights).tolist()

    app = FastAPI()

    @app.exception_handler(UembedError)
    async def refused(request, exc: UembedError) -> JSONResponse:
        return JSONResponse({"error": exc.kind, "detail": str(exc)}, status_code=exc.status)

    @app.post("/v1/score")
    def score(body: dict) -> dict:
        rows, weights = encoder.encode(body["examples"])
        return {"model": bundle.name, "version": bundle.version, "scores": run(rows, weights)}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready", "worker": os.getpid()}  # as the service's: the bench waits for every worker

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return app
