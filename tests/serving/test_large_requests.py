"""A large request is decoded beside the event loop: while its values are read and canonicalised, the loop answers
health probes and other requests (issue #35, item 9).

The large request's canonicalisation is held on an event until ``/healthz`` has answered: decoded on the loop, the
probe could not be answered before the event is set, and the test fails at its wait."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.serving.inprocess import InProcessService
from tests.serving.protocols.test_oip import json_inputs
from uembed.serving.engine import OFF_LOOP_VALUES

WAIT_S = 30
HEALTH_WAIT_S = 5  # well under WAIT_S: a probe held behind the large request fails the test, not the request


@pytest.fixture
def service(synthetic_store):
    service = InProcessService(bundles=[synthetic_store / "movielens" / "1"])
    yield service
    service.close()


def hold_canonicalising(encoder, method: str) -> tuple[threading.Event, threading.Event]:
    """Make ``encoder.<method>`` wait for ``release`` once it has started (``started`` set)."""
    started, release = threading.Event(), threading.Event()
    original = getattr(encoder, method)

    def held(*args, **kwargs):
        started.set()
        if not release.wait(WAIT_S):
            raise TimeoutError("never released")
        return original(*args, **kwargs)

    setattr(encoder, method, held)
    return started, release


def large(movielens_examples) -> list[dict]:
    examples = (movielens_examples * 2)[:1024]
    assert len(examples) * len(examples[0]) >= OFF_LOOP_VALUES
    return examples


@pytest.mark.parametrize("front", ["v1", "v2"])
def test_health_is_answered_while_a_large_request_is_decoded(service, movielens_examples, front):
    encoder = service.engine.registry.resolve("movielens", None, None, [], None).runtime.encoder
    examples = large(movielens_examples)
    if front == "v1":
        started, release = hold_canonicalising(encoder, "canonicalise")
        pending = service.client.post("/v1/score", json={"examples": examples})
    else:
        started, release = hold_canonicalising(encoder, "canonicalise_columns")
        pending = service.client.post("/v2/models/movielens/infer", json={"inputs": json_inputs(examples)})
    scored = asyncio.run_coroutine_threadsafe(pending, service.loop)
    try:
        assert started.wait(WAIT_S), "the large request never reached canonicalisation"
        # answered by the loop while the large request is held beside it
        health = asyncio.run_coroutine_threadsafe(service.client.get("/healthz"), service.loop).result(HEALTH_WAIT_S)
        assert health.status_code == 200
        assert not scored.done()
    finally:
        release.set()
    response = scored.result(timeout=WAIT_S)
    assert response.status_code == 200, response.text
    scores = response.json()["scores"] if front == "v1" else response.json()["outputs"][0]["data"]
    assert len(scores) == len(examples)
