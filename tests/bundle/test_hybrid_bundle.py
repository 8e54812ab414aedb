"""A hybrid run (#38, item 1) trains, exports and serves: the bundle carries each head's sorted keys and start,
its test vectors hold head and tail values that a port of the contract reproduces, and the service (rows from
Redis, published) and the reference scorer give the training model's scores."""

import json
from bisect import bisect_left

import numpy as np
import pytest
import torch
import xxhash

from tests.conftest import tiny_spec, tiny_table
from tests.scoring import score
from uembed.bundle.loader import BundleError, load_bundle
from uembed.model.data import from_table
from uembed.model.export import export_run
from uembed.model.train import TrainConfig, load_run, train
from uembed.serving.pipeline.encoding import ExampleEncoder
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.rows.published import publish

BUDGET_ROWS = 60


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hybrid")
    table = tiny_table()
    dataset = from_table(table, tiny_spec(), name="tiny")
    config = TrainConfig(embedding="unified", budget_rows=BUDGET_ROWS, head_share=0.3, dim=8, hidden=(16,), epochs=2, seed=0)
    train(config, *dataset.split(0), run_dir=root / "run", progress=False)
    bundle = export_run(root / "run", root / "store", "tiny", dtype="float32")
    examples = [{k: v for k, v in row.items() if k != "clicked"} for row in table.to_pylist()]
    return root / "run", bundle, dataset, examples


def test_the_manifest_states_the_heads_and_a_port_reproduces_its_head_and_tail_vectors(hybrid):
    _, bundle, _, _ = hybrid
    manifest = json.loads((bundle / "manifest.json").read_text())
    table = next(t for t in manifest["embedding"]["tables"] if t["name"] == "unified")
    assert table["rows"] == BUDGET_ROWS and table["head_rows"] == int(0.3 * BUDGET_ROWS)
    hashed_rows = table["rows"] - table["head_rows"]
    heads = {f["name"]: f["head"] for f in manifest["features"] if f.get("head")}
    assert sum(h["size"] for h in heads.values()) == table["head_rows"]
    kinds = set()
    for vector in manifest["hashing"]["test_vectors"]:
        head = heads.get(vector["feature"])
        if head is None:
            continue
        keys = np.load(bundle / head["file"]).tolist()
        seed = xxhash.xxh3_64_intdigest(f"{vector['feature']}#0".encode(), seed=0)
        key = xxhash.xxh3_64_intdigest(vector["value"].encode("utf-8", "surrogateescape"), seed=seed)
        at = bisect_left(keys, key)
        found = at < len(keys) and keys[at] == key
        assert vector["head"] == found
        assert vector["rows"] == [head["start"] + at if found else key % hashed_rows]
        kinds.add(found)
    assert kinds == {True, False}  # a head value and a tail value both have vectors


def test_a_bundle_whose_head_left_its_rows_is_refused(hybrid, tmp_path):
    _, bundle, _, _ = hybrid
    manifest = json.loads((bundle / "manifest.json").read_text())
    feature = next(f for f in manifest["embedding"]["features"] if "head_start" in f)
    feature["head_start"] = 0  # inside the hashed rows: tail values would read head rows
    copy = tmp_path / "bundle"
    copy.mkdir()
    for path in bundle.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(bundle)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(bundle)).write_bytes(path.read_bytes())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not within the head rows"):
        load_bundle(copy)


def test_a_hybrid_bundle_serves_the_training_models_scores(hybrid, redis_server, start_service):
    run_dir, bundle, dataset, examples = hybrid
    _, plan, model, _ = load_run(run_dir)
    rows, weights = plan.encode(dataset.columns)
    assert (rows >= plan.table("unified").hashed_rows).any() and (rows < plan.table("unified").hashed_rows).any()
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(rows), torch.from_numpy(weights))).numpy()
    np.testing.assert_allclose(ReferenceScorer(load_bundle(bundle)).score(examples), expected, atol=1e-5, rtol=0)
    report = publish(bundle, redis_server.url, bucket_rows=64, verify=True, progress=False)
    assert report["bad_rows"] == {}
    service = start_service([bundle], redis_url=redis_server.url, row_source="redis", hot_rows_bytes=1024)
    np.testing.assert_allclose(score(service.url, examples, chunk=100), expected, atol=1e-5, rtol=0)
    user = {k: examples[0][k] for k in ("user", "age")}  # a ranking request: its context hashed once
    candidates = [{k: v for k, v in e.items() if k not in user} for e in examples[:50]]
    ranked = score(service.url, candidates, context=user)
    np.testing.assert_allclose(ranked, ReferenceScorer(load_bundle(bundle)).score([{**e, **user} for e in candidates]), atol=1e-5, rtol=0)


def test_head_values_hashed_together_read_their_head_rows(hybrid):
    """Without training values the one-value features are hashed in one pass over their columns; a head value's
    key must still read its head row there, as through each feature's own row cache and the training encoder."""
    _, bundle, dataset, examples = hybrid
    served = load_bundle(bundle)
    together = ExampleEncoder(served.feature_specs, served.plan)
    one_by_one = ExampleEncoder(served.feature_specs, served.plan, cache_bytes=2**20, known=served.known_values)
    assert {"user", "item", "home_city", "work_city"} <= set(together.one_slot_hashed) and not one_by_one.one_slot_hashed
    assert set(together.one_slot_hashed) & set(served.plan.heads)
    want, _ = served.plan.encode(dataset.columns)
    for encoder in (together, one_by_one):
        np.testing.assert_array_equal(encoder.encode(examples)[0], want)
