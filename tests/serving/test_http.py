"""The service over real sockets: parity with the reference scorer under batching and Redis, batch invariance.

Request shapes, bad input and routes are tested in process (test_app.py); metrics in test_metrics.py."""

import numpy as np
import pytest

from tests.scoring import score
from uembed.bundle.loader import load_bundle
from uembed.loadtest.servers import wait_until
from uembed.serving.pipeline.reference import ReferenceScorer


@pytest.fixture(scope="module")
def reference(synthetic_store, movielens_examples):
    return ReferenceScorer(load_bundle(synthetic_store / "movielens" / "1")).score(movielens_examples)


def test_http_scores_equal_the_reference_scorer_without_redis(start_service, synthetic_store, movielens_examples, reference):
    service = start_service([synthetic_store / "movielens" / "1"], hot_rows_bytes=20_000)
    cold = score(service.url, movielens_examples, chunk=100)
    warm = score(service.url, movielens_examples, chunk=100)
    np.testing.assert_allclose(cold, reference, atol=1e-6, rtol=0)
    np.testing.assert_allclose(warm, reference, atol=1e-6, rtol=0)
    metrics = service.metrics()
    assert metrics['uembed_row_cache_hits_total{tier="hot"}'] > 0  # warm pass read tier 1
    assert metrics['uembed_row_cache_hits_total{tier="file"}'] > 0  # the small tier 1 left some to the files


def test_http_scores_equal_the_reference_scorer_with_redis(start_service, redis_server, synthetic_store, movielens_examples, reference):
    service = start_service([synthetic_store / "movielens" / "1"], redis_url=redis_server.url, hot_rows_bytes=0)
    cold = score(service.url, movielens_examples, chunk=100)
    wait_until(lambda: redis_server.client().dbsize() > 0, 10, "misses filled back into Redis")
    warm = score(service.url, movielens_examples, chunk=100)
    np.testing.assert_allclose(cold, reference, atol=1e-6, rtol=0)
    np.testing.assert_allclose(warm, reference, atol=1e-6, rtol=0)
    metrics = service.metrics()
    assert metrics['uembed_row_cache_hits_total{tier="redis"}'] > 0
    keys = [k.decode() for k in redis_server.client().scan_iter(count=1000)]
    assert all(k.startswith("uembed:movielens:1:unified:") for k in keys)


def test_batch_invariance_over_http(start_service, synthetic_store, movielens_examples):
    service = start_service([synthetic_store / "movielens" / "1"], max_examples=512)
    batch = movielens_examples[:512]
    in_batch = score(service.url, batch)
    for index in (0, 137, 511):
        assert score(service.url, [batch[index]])[0] == in_batch[index]


def test_a_ranking_request_over_http_scores_as_its_flat_examples(start_service, synthetic_store, movielens_examples):
    service = start_service([synthetic_store / "movielens" / "1"], max_examples=512)
    user = ("user_id", "age", "gender", "occupation", "zip_code")
    context = {name: movielens_examples[0][name] for name in user}
    candidates = [{k: v for k, v in example.items() if k not in user} for example in movielens_examples[:300]]
    flat = score(service.url, [{**context, **candidate} for candidate in candidates])
    ranked = score(service.url, candidates, context=context)
    np.testing.assert_array_equal(ranked, flat)
