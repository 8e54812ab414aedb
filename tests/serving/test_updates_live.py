"""Row updates end to end: continued training publishes deltas while a real service (uvicorn, redis-server) is
under load; its scores move to those of a bundle exported after the same training, with no failed request, and a
replica started afterwards replays the stream to the same scores."""

import time

import httpx
import numpy as np
import pytest

from tests.scoring import score
from tests.serving.test_faults import Traffic
from uembed.bundle.loader import load_bundle
from uembed.loadtest.servers import wait_until
from uembed.model.data import load_movielens100k
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.rows.push import RowPublisher, model_rows
from uembed.serving.rows.redis import redis_client

pytestmark = pytest.mark.slow


def row_updates(service) -> dict:
    return httpx.get(f"{service.url}/v1/models", timeout=10).json()["models"][0]["row_updates"]


def test_continued_training_published_under_load_moves_scores_to_the_new_bundle(
    start_service, bundle_store, movielens_examples, redis_server, tmp_path
):
    from uembed.model.export import export_run
    from uembed.model.train import continue_training  # torch: the train extra

    served = bundle_store / "movielens" / "1"
    settings = {"redis_url": redis_server.url, "row_updates_url": redis_server.url, "request_timeout_ms": 5000}
    service = start_service([served], **settings)
    examples = movielens_examples[:300]
    before = score(service.url, examples)
    publisher = RowPublisher(load_bundle(served), redis_client(redis_server.url, 10.0), chunk_rows=100)  # the table has 350 rows: several deltas per publication
    reports = []

    def publish(model, plan, epoch):
        reports.append(publisher.publish(model_rows(model, plan, publisher.bundle, "continued"), source=f"epoch {epoch}"))

    _, new_data, _ = load_movielens100k().split(0)  # the validation split: examples the served run never trained on
    with Traffic(service.url, movielens_examples) as traffic:
        wait_until(lambda: traffic.count() >= 10, 20, "traffic before the training")
        continue_training(bundle_store.parent / "run", new_data, epochs=2, out_dir=tmp_path / "continued",
                          after_epoch=publish, progress=False)  # fmt: skip
        wait_until(lambda: row_updates(service)["applied_id"] == reports[-1]["last_id"], 20, "the last delta applied")
        applied_at = time.perf_counter()
        wait_until(lambda: traffic.count_since(applied_at) >= 10, 20, "traffic after the last delta")
    assert traffic.count() > 20 and traffic.failures() == []
    assert len(reports) == 2 and all(r["rows_changed"] > 0 for r in reports) and reports[0]["entries"] > 1

    expected = ReferenceScorer(load_bundle(export_run(tmp_path / "continued", tmp_path / "store", "movielens", "1"))).score(examples)
    assert np.abs(expected - before).max() > 1e-3  # the training moved the scores
    np.testing.assert_allclose(score(service.url, examples), expected, atol=2e-6, rtol=0)
    metrics = service.metrics()
    applied = metrics['uembed_row_updates_total{model="movielens",outcome="applied",reason="",version="1"}']
    assert applied == sum(r["entries"] for r in reports)
    assert metrics['uembed_row_overlay_rows{model="movielens",table="unified"}'] == publisher.sent["unified"].rows

    # Without tier 1 every row comes through the overlay (changed rows) or Redis and the files (the others).
    replica = start_service([served], hot_rows_bytes=0, **settings)  # replays the stream before it reports ready
    assert row_updates(replica)["applied_id"] == reports[-1]["last_id"]
    np.testing.assert_allclose(score(replica.url, examples), expected, atol=2e-6, rtol=0)
    assert replica.metrics()['uembed_row_cache_hits_total{tier="overlay"}'] > 0
