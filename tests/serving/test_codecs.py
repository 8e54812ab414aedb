"""The compressed row codecs served (issue #37): every codec scores like the reference scorer with tier 1 and
Redis on and off, over /v1 and the Open Inference Protocol with the rows published to Redis, and row updates
travel in the codec's form. Each bundle is the MovieLens shape of ``synthetic_store``, in one codec."""

import asyncio

import httpx
import numpy as np
import pytest

from tests.conftest import MOVIELENS_TABLE_ROWS
from tests.scoring import score
from uembed.bundle.codecs import decode_records
from uembed.bundle.loader import load_bundle
from uembed.bundle.synthetic import write_synthetic_bundle
from uembed.model.data import load_movielens100k, movielens100k_table
from uembed.serving.engine import ScoringEngine
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.rows.published import publish
from uembed.serving.rows.push import RowPublisher, delta_file_rows
from uembed.serving.rows.redis import RedisTier
from uembed.serving.rows.store import TableStore
from uembed.serving.settings import load_settings

CODECS = ["int4", "int2", "pq"]


@pytest.fixture(scope="module")
def codec_store(tmp_path_factory):
    """movielens/<codec>: random rows in each codec, the same dense net (one seed)."""
    root = tmp_path_factory.mktemp("codec-bundles")
    features = load_movielens100k().spec.features
    width = max(len(genres) for genres in movielens100k_table()["genres"].to_pylist())
    for codec in CODECS:
        write_synthetic_bundle(root, "movielens", features, MOVIELENS_TABLE_ROWS, version=codec, dtype=codec, width=width,
                               seed=5, progress=False)  # fmt: skip
    return root


def engine_scores(path, examples, **settings) -> tuple[np.ndarray, np.ndarray, dict]:
    """Scores of ``examples`` twice (cold, then warm) by an engine with ``settings``, and its tier hits."""

    async def main():
        engine = ScoringEngine(load_settings(**settings))
        engine.registry.load(path)
        await engine.astart()
        try:
            cold = np.concatenate([(await engine.score(examples[i : i + 100]))[0] for i in range(0, len(examples), 100)])
            store = engine.registry.models["movielens"].stores[0]
            if store.redis is not None:
                assert await asyncio.to_thread(store.redis.flush), "Redis fills never finished"
            warm = (await engine.score(examples))[0]
            hits = {tier: sum(sample.value for metric in engine.metrics.registry.collect() for sample in metric.samples
                              if sample.name == "uembed_row_cache_hits_total" and sample.labels.get("tier") == tier)
                    for tier in ("hot", "redis")}  # fmt: skip
            return cold, warm, hits
        finally:
            await engine.astop()

    return asyncio.run(main())


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("hot, redis", [(0, False), (20_000, False), (0, True), (20_000, True)])
def test_scores_equal_the_reference_with_tiers_on_and_off(codec, hot, redis, codec_store, movielens_examples, redis_server):
    path = codec_store / "movielens" / codec
    examples = movielens_examples[:400]
    expected = ReferenceScorer(load_bundle(path)).score(examples)
    settings = {"hot_rows_bytes": hot} | ({"redis_url": redis_server.url} if redis else {})
    cold, warm, hits = engine_scores(path, examples, **settings)
    np.testing.assert_allclose(cold, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(warm, expected, atol=1e-6, rtol=0)
    assert (hits["hot"] > 0) == bool(hot) and (hits["redis"] > 0) == redis


@pytest.mark.parametrize("codec", CODECS)
def test_tier_1_holds_decoded_rows_and_redis_the_encoded_records(codec, codec_store, redis_server):
    table = load_bundle(codec_store / "movielens" / codec).tables["unified"]
    redis = RedisTier(redis_server.url, timeout_s=0.5, retry_s=0.1, bucket_rows=64, fill_queue=16)
    store = TableStore(table, f"test:{codec}", hot_bytes=table.rows * table.dim * 4, redis=redis)
    ids = np.arange(table.rows)
    rows = store.gather(ids)
    assert redis.flush()
    slots = store.hot.index.get(ids)
    assert (slots >= 0).all()
    assert np.array_equal(store.hot.records[slots].view(np.float32), rows)  # float32 rows, not records
    assert np.array_equal(rows, table.gather(ids))
    records = np.empty((table.rows, table.record_bytes), dtype=np.uint8)
    assert redis.read(f"test:{codec}", ids, records).all()
    assert table.record_bytes < table.dim * 2  # a quarter or an eighth of float32 and the scale and bias, or pq's codes
    assert np.array_equal(decode_records(records, codec, table.dim, table.codebooks), rows)
    redis.close()


@pytest.mark.parametrize("codec", CODECS)
def test_published_rows_serve_over_oip_like_the_reference(codec, codec_store, movielens_examples, redis_server, start_service):
    path = codec_store / "movielens" / codec
    report = publish(path, redis_server.url, bucket_rows=64, verify=True, progress=False)
    assert report["bad_rows"] == {} and report["marker_problem"] is None
    service = start_service([path], redis_url=redis_server.url, row_source="redis", hot_rows_bytes=4096)
    examples = movielens_examples[:50]
    expected = ReferenceScorer(load_bundle(path)).score(examples)
    np.testing.assert_allclose(score(service.url, examples), expected, atol=1e-6, rtol=0)
    inputs = []
    for name in ("user_id", "movie_id", "age", "gender", "occupation", "zip_code"):
        values = [example[name] for example in examples]
        datatype = "INT64" if all(type(value) is int for value in values) else "BYTES"
        inputs.append({"name": name, "datatype": datatype, "shape": [len(values)], "data": values})
    width = max(len(example["genres"]) for example in examples)
    genres = [example["genres"] + [""] * (width - len(example["genres"])) for example in examples]
    inputs.append({"name": "genres", "datatype": "BYTES", "shape": [len(examples), width], "data": genres})
    response = httpx.post(f"{service.url}/v2/models/movielens/infer", json={"inputs": inputs}, timeout=30)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["outputs"][0]["data"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("codec", CODECS)
def test_row_updates_travel_and_apply_in_the_codecs_form(codec, codec_store, tmp_path):
    served = load_bundle(codec_store / "movielens" / codec)
    table = served.tables["unified"]
    ids = np.array([3, 40, 41, 200])
    rows = np.random.default_rng(7).normal(scale=0.3, size=(len(ids), table.dim)).astype(np.float32)
    np.savez(tmp_path / "delta.npz", **{"unified.ids": ids, "unified.rows": rows})
    changed, compared = RowPublisher(served, None).changed(delta_file_rows(tmp_path / "delta.npz", served))
    sent_ids, records = changed["unified"]
    assert compared == len(ids) and sent_ids.tolist() == ids.tolist()
    assert np.array_equal(records, table.encode(rows)) and records.shape[1] == table.record_bytes
    store = TableStore(table, "updates", hot_bytes=table.rows * table.dim * 4)
    store.gather(np.arange(table.rows))  # every row in tier 1, decoded
    store.apply_rows(sent_ids, records)
    got = store.gather(ids)
    assert np.array_equal(got, decode_records(records, codec, table.dim, table.codebooks))
    assert not np.allclose(got, table.gather(ids), atol=1e-3)  # the new rows, not the bundle's
    assert np.array_equal(store.hot.records[store.hot.index.get(ids)].view(np.float32), got)
