"""Scoring from tests: POST /v1/score over HTTP (a URL, or anything with ``post(path, json=...)`` such as an
``httpx.Client`` with a base URL or ``tests/serving/inprocess.py``'s service), and a runtime's own path in process."""

from __future__ import annotations

import httpx
import numpy as np


def score_body(examples: list[dict], context: dict | None = None, **options) -> dict:
    """The request body: flat ``examples``, or a ranking request (``context`` and ``examples`` as its candidates);
    ``options`` (model, version, routing_key) are sent where given."""
    body = {"examples": examples} if context is None else {"context": context, "candidates": examples}
    return body | {name: value for name, value in options.items() if value is not None}


def post_score(target, examples: list[dict], context: dict | None = None, timeout_s: float = 30, **options) -> httpx.Response:
    """The response to one POST /v1/score, whatever its status."""
    body = score_body(examples, context, **options)
    if isinstance(target, str):
        return httpx.post(f"{target.rstrip('/')}/v1/score", json=body, timeout=timeout_s)
    return target.post("/v1/score", json=body, timeout=timeout_s)


def scored(target, examples: list[dict], context: dict | None = None, **options) -> dict:
    """The JSON of a 200 response (scores, model, version); an AssertionError holding the body otherwise."""
    response = post_score(target, examples, context, **options)
    assert response.status_code == 200, f"POST /v1/score: {response.status_code} {response.text[:2000]}"
    return response.json()


def score(target, examples: list[dict], context: dict | None = None, chunk: int | None = None, **options) -> np.ndarray:
    """Scores of ``examples`` in order, sent ``chunk`` at a time (all at once by default)."""
    size = chunk or max(len(examples), 1)
    parts = [scored(target, examples[start : start + size], context, **options)["scores"] for start in range(0, len(examples), size)]
    return np.asarray([value for part in parts for value in part], dtype=np.float64)


def score_in_process(runtime, examples: list[dict]) -> np.ndarray:
    """A runtime's scores through the path the service takes (canonicalise, hash with its caches, score), not the
    reference encoder's."""
    return runtime.score_encoded(*runtime.hash([runtime.canonicalise(examples)]))
