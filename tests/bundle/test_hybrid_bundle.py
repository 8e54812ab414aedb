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
from uembed.cli import main
from uembed.contract import hashing
from uembed.model.data import from_table
from uembed.model.data.criteo import criteo_spec
from uembed.model.data.stream import StreamSource, StreamStats, encode_batch, scan
from uembed.model.data.synthetic import CRITEO_PRESETS, CriteoShape, write_criteo_shards
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
    heads = {f["name"]: f["head"] for f in manifest["features"] if f.get("head")}
    assert sum(h["size"] for h in heads.values()) == table["head_rows"]
    assert set(port_vector_kinds(bundle, "unified").values()) == {True, False}  # a head value and a tail value both have vectors


def port_vector_kinds(bundle, table_name: str) -> dict[tuple[str, str], bool]:
    """Each test vector of a feature with a head, row recomputed by a port of the contract (xxhash, bisect): whether
    its value is a head value."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    table = next(t for t in manifest["embedding"]["tables"] if t["name"] == table_name)
    hashed_rows = table["rows"] - table["head_rows"]
    heads = {f["name"]: f["head"] for f in manifest["features"] if f.get("head")}
    kinds = {}
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
        kinds[(vector["feature"], vector["value"])] = found
    return kinds


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
    assert {"user", "item", "home_city", "work_city"} <= set(together.one_slot_hashed) and one_by_one.row_cache
    assert set(together.one_slot_hashed) & set(served.plan.heads)
    want, _ = served.plan.encode(dataset.columns)
    np.testing.assert_array_equal(together.encode(examples)[0], want)
    before = hashing.hashing_backend()
    for backend in hashing.BACKENDS if hashing.compiled_available() else ["python"]:
        hashing.use_backend(backend)  # python: each feature's row cache; compiled: hashed together, with their filters
        try:
            np.testing.assert_array_equal(one_by_one.encode(examples)[0], want)
        finally:
            hashing.use_backend(before)


@pytest.fixture(scope="module")
def streamed_hybrid(tmp_path_factory):
    """A streamed run (#38 item 1: the scan counts the values) with --head-share, through the command line."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("streamed-hybrid")
    write_criteo_shards(root / "data", 12_000, CriteoShape(vocabulary=CRITEO_PRESETS["criteo-tiny"], seed=5), progress=False)
    options = ["--dataset", str(root / "data"), "--embedding", "unified", "--budget-rows", "2000", "--epochs", "1",
               "--dim", "4", "--network", "mlp", "--hidden", "16", "--batch-size", "512", "--shuffle-buffer", "4096",
               "--read-rows", "2048", "--quiet", "--runs-dir", str(root / "runs")]  # fmt: skip
    assert main(["train", *options, "--name", "r", "--head-share", "0.3"]) == 0
    bundle = export_run(root / "runs" / "r", root / "store", "criteo", dtype="float32")
    return root, options, bundle


def test_a_streamed_hybrid_run_exports_heads_whose_values_score_through_their_rows(streamed_hybrid):
    root, _, bundle = streamed_hybrid
    run_dir = root / "runs" / "r"
    _, plan, model, doc = load_run(run_dir)
    stats = StreamStats.load(run_dir / "stats")
    assert stats.head_sketch == 2 * int(0.3 * 2000) and stats.head_counts
    table = plan.table("unified")
    assert table.rows == 2000 and table.head_rows == int(0.3 * 2000)
    kinds = port_vector_kinds(bundle, "unified")
    partial = [name for name, head in plan.heads.items() if stats.vocabulary[name] > head.size]
    assert partial and len(partial) < len(plan.heads)  # large features keep a tail, a few buckets fit in the head
    for name in plan.heads:  # a head value's vector, and a tail value's where training had one (missing: always hashed)
        want = {True, False} if name in partial else {True}
        assert {found for (feature, value), found in kinds.items() if feature == name and value} == want, name
        assert kinds.get((name, ""), False) is False
    served = load_bundle(bundle)
    assert served.plan.to_dict() == plan.to_dict()
    batch = next(StreamSource.open(root / "data").record_batches(stats.spec, 1000))[1]
    rows, weights = plan.encode(encode_batch(stats.spec, batch))
    assert (rows >= table.hashed_rows).any() and (rows < table.hashed_rows).any()
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(rows), torch.from_numpy(weights))).numpy()
    examples = [{k: v for k, v in row.items() if k != "label"} for row in batch.to_pylist()]
    np.testing.assert_allclose(ReferenceScorer(served).score(examples), expected, atol=1e-5, rtol=0)


def test_streamed_statistics_without_counts_refuse_heads_in_one_line(streamed_hybrid, tmp_path, capsys):
    root, options, _ = streamed_hybrid
    source = StreamSource.open(root / "data")
    scan(source, criteo_spec(), batch_rows=4096, progress=False).save(tmp_path / "stats")
    capsys.readouterr()
    assert main(["train", *options, "--name", "again", "--head-share", "0.3", "--stats", str(tmp_path / "stats")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --head-share needs how often each training value occurs: these streamed statistics were scanned "
        "without counting them; scan again (without --stats)")
