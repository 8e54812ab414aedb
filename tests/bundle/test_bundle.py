import json
import shutil
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from uembed.bundle.format import quantise_rows
from uembed.bundle.loader import BundleError, load_bundle
from uembed.contract import hashing
from uembed.contract.errors import ExampleError
from uembed.model.data import load_movielens100k, movielens100k_table, split_indices
from uembed.model.export import ExportError, export_run
from uembed.model.train import TrainConfig, load_run, train
from uembed.serving.pipeline.dense import onnx_session
from uembed.serving.pipeline.encoding import ExampleEncoder
from uembed.serving.pipeline.reference import ReferenceScorer

FEATURES = ("user_id", "movie_id", "zip_code", "age", "occupation", "gender", "genres")


@pytest.fixture(scope="module")
def movielens():
    torch.set_num_threads(1)
    dataset = load_movielens100k()
    _, _, test_index = split_indices(len(dataset), 0)
    raw = movielens100k_table().take(test_index[:1000]).to_pylist()
    examples = [{name: row[name] for name in FEATURES} for row in raw]
    return dataset.split(0), examples


@pytest.fixture(scope="module", params=["collisionless", "semantic-group", "multi-size-unified"])
def exported(request, movielens, tmp_path_factory):
    (train_set, val_set, test_set), _ = movielens
    root = tmp_path_factory.mktemp(request.param)
    config = TrainConfig(embedding=request.param, budget_fraction=0.1, epochs=2, seed=0)
    train(config, train_set, val_set, test_set, run_dir=root / "run", progress=False)
    bundles = {dtype: export_run(root / "run", root / "bundles", "ml", dtype=dtype) for dtype in ("float32", "float16", "int8", "int4", "int2", "pq")}
    return root / "run", bundles


def test_parity_of_torch_torchscript_onnx_and_reference_scorer(movielens, exported):
    (_, _, test_set), examples = movielens
    run_dir, bundles = exported
    _, plan, model, _ = load_run(run_dir)
    rows, weights = plan.encode(test_set.take(np.arange(1000)).columns)
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(rows), torch.from_numpy(weights))).numpy()
        scripted = torch.jit.load(str(bundles["float32"] / "model.pt"))(torch.from_numpy(rows), torch.from_numpy(weights)).numpy()
    full_onnx = onnx_session(bundles["float32"] / "model.onnx").run(None, {"rows": rows, "weights": weights})[0]
    reference = ReferenceScorer(load_bundle(bundles["float32"])).score(examples)
    for name, scores in (("torchscript", scripted), ("full onnx", full_onnx), ("reference scorer", reference)):
        np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0, err_msg=name)


def test_float16_and_int_bundles_keep_the_auc(movielens, exported):
    (_, _, test_set), _ = movielens
    _, bundles = exported
    aucs = {}
    for dtype, path in bundles.items():
        bundle = load_bundle(path)
        rows, weights = bundle.plan.encode(test_set.columns)
        aucs[dtype] = roc_auc_score(test_set.labels, ReferenceScorer(bundle).score_encoded(rows, weights))
        assert bundle.manifest["full_model"] is (None if dtype != "float32" else bundle.manifest["full_model"])
    assert abs(aucs["float16"] - aucs["float32"]) < 0.002
    assert abs(aucs["int8"] - aucs["float32"]) < 0.01
    assert abs(aucs["int4"] - aucs["float32"]) < 0.005 and abs(aucs["int2"] - aucs["float32"]) < 0.02  # no QAT here
    assert abs(aucs["pq"] - aucs["float32"]) < 0.005
    sizes = {d: sum(t.nbytes for t in load_bundle(p).tables.values()) for d, p in bundles.items()}
    assert sizes["float16"] * 2 == sizes["float32"] and sizes["int2"] < sizes["int4"] < sizes["int8"] < sizes["float16"]


def test_manifest_carries_the_contract(exported):
    _, bundles = exported
    manifest = json.loads((bundles["float32"] / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["version"] == "1"
    assert len(manifest["hashing"]["test_vectors"]) >= 12
    assert {f["name"] for f in manifest["features"]} == set(FEATURES)
    assert manifest["dense"]["input"]["shape"][1] == manifest["dense"]["layout"][-1]["stop"]
    assert manifest["training"]["test_auc"] > 0.5 and manifest["software"]["xxhash"]
    assert sorted(p.name for p in bundles["float32"].parent.iterdir()) == ["1", "2", "3", "4", "5", "6"]  # no staging left


def test_the_manifest_carries_the_runs_collision_report_of_the_rows_training_read(movielens, exported):
    (train_set, _, _), _ = movielens
    run_dir, bundles = exported
    report = json.loads((run_dir / "collisions.json").read_text())
    assert load_bundle(bundles["int8"]).manifest["collisions"] == report
    # Counted again from the rows training looked up (plan.encode of the training examples): which values read each row.
    _, plan, _, _ = load_run(run_dir)
    rows, _ = plan.encode(train_set.columns)
    readers, places, slot = {}, {}, 0
    for feature in plan.features:
        codes = train_set.columns[feature.name].codes[:, : feature.width]
        present = codes >= 1
        places[feature.name] = []
        for lookup in feature.lookups:
            read = [(lookup.table, row) for row in rows[:, slot : slot + codes.shape[1]][present].tolist()]
            places[feature.name].append(read)
            for place, code in zip(read, codes[present].tolist()):
                readers.setdefault(place, set()).add((feature.name, code))
            slot += feature.width
    for feature in plan.features:
        shared = np.array([[len(readers[place]) > 1 for place in read] for read in places[feature.name]])
        entry = report["features"][feature.name]
        codes = train_set.columns[feature.name].codes
        assert entry["occurrences"] == shared.shape[1] and entry["values"] == len(np.unique(codes[codes >= 1]))
        assert entry["shared_share"] == pytest.approx(shared.all(axis=0).mean())
        assert entry["shared_share_any"] == pytest.approx(shared.any(axis=0).mean())
        assert entry["rows"] == len({place for read in places[feature.name] for place in read})
        assert (entry["predicted_share"] is None) == feature.vocabulary
        if feature.vocabulary:
            assert entry["shared_share"] == 0 and entry["rows"] == entry["values"]


def test_reference_scorer_rejects_unknown_features_and_scores_missing_ones(exported):
    _, bundles = exported
    scorer = ReferenceScorer(load_bundle(bundles["float32"]))
    with pytest.raises(ExampleError, match=r"examples\[1\]: unknown feature colour; this model takes user_id"):
        scorer.score([{"user_id": 1}, {"colour": "red"}])
    with pytest.raises(ExampleError, match="takes one value"):
        scorer.score([{"user_id": [1, 2]}])
    alone = scorer.score([{"user_id": 196}])
    assert alone.shape == (1,) and 0 < alone[0] < 1


def test_quantise_rows_round_trips_within_half_a_step():
    rows = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    rows[3] = 0.25  # a constant row has zero range
    codes, scale_bias = quantise_rows(rows)
    restored = codes.astype(np.float32) * scale_bias[:, :1] + scale_bias[:, 1:]
    assert codes.dtype == np.uint8
    assert np.all(np.abs(restored - rows) <= scale_bias[:, :1] / 2 + 1e-6)
    np.testing.assert_array_equal(restored[3], rows[3])


@pytest.fixture
def bundle_copy(exported, tmp_path):
    _, bundles = exported
    return shutil.copytree(bundles["float32"], tmp_path / "bundle")


def first_table_file(path):
    return path / json.loads((path / "manifest.json").read_text())["tables"][0]["file"]


def edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "dense.onnx").unlink()
    with pytest.raises(BundleError, match="file dense.onnx is missing"):
        load_bundle(bundle_copy)


def test_truncated_row_file_is_refused(bundle_copy):
    table = first_table_file(bundle_copy)
    table.write_bytes(table.read_bytes()[:-100])
    with pytest.raises(BundleError, match=f"file tables/{table.name} is truncated"):
        load_bundle(bundle_copy)


def test_flipped_byte_is_refused(bundle_copy):
    table = first_table_file(bundle_copy)
    data = bytearray(table.read_bytes())
    data[-7] ^= 0x01
    table.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"file tables/{table.name} fails its sha256 checksum"):
        load_bundle(bundle_copy)


def test_unknown_format_version_is_refused(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="format version 99; this build reads version 1"):
        load_bundle(bundle_copy)


def test_mismatched_hashing_test_vector_is_refused(bundle_copy):
    def corrupt(manifest):
        manifest["hashing"]["test_vectors"][0]["rows"][0] += 1

    edit_manifest(bundle_copy, corrupt)
    with pytest.raises(BundleError, match="hashing test vector user_id=.* this build hashes differently"):
        load_bundle(bundle_copy)


def test_a_model_folder_or_a_run_given_as_a_bundle_says_what_to_serve_instead(tmp_path):
    model = tmp_path / "bundles" / "clicks"
    for version in ("1", "2", "10"):
        (model / version).mkdir(parents=True)
        (model / version / "manifest.json").write_text("{}")
    with pytest.raises(BundleError, match=r"holds the versions 1, 2, 10 of a model: serve one, e\.g\. .*clicks/10$"):
        load_bundle(model)
    run = tmp_path / "runs" / "clicks"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(BundleError, match=r"it is a training run: export it first \(uembed export .*runs/clicks\)"):
        load_bundle(run)


def test_a_directory_that_is_not_a_bundle_is_named_as_such(tmp_path):
    with pytest.raises(BundleError, match="is not a bundle: it has no manifest.json"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="is not a bundle: no such directory"):
        load_bundle(tmp_path / "absent")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json is not valid JSON"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text('{"name": "something else"}')
    with pytest.raises(BundleError, match="is not a bundle: manifest.json does not declare format"):
        load_bundle(tmp_path)


def test_export_refuses_an_existing_version_and_a_non_run(exported, tmp_path):
    run_dir, bundles = exported
    with pytest.raises(ExportError, match="already exists"):
        export_run(run_dir, bundles["float32"].parent.parent, "ml", version="1")
    with pytest.raises(ExportError, match="not a training run directory"):
        export_run(tmp_path, tmp_path / "out", "ml")
    with pytest.raises(ExportError, match="row dtype"):
        export_run(run_dir, tmp_path / "out", "ml", dtype="int3")


def test_export_refuses_bad_pq_options_in_one_line(exported, tmp_path, monkeypatch):
    run_dir, _ = exported
    with pytest.raises(ExportError, match=r"^--pq-subvectors 5 does not divide table \S+'s dim 16$"):
        export_run(run_dir, tmp_path / "out", "ml", dtype="pq", pq_subvectors=5)
    with pytest.raises(ExportError, match="^--pq-subvectors is for --dtype pq, not int4$"):
        export_run(run_dir, tmp_path / "out", "ml", dtype="int4", pq_subvectors=4)
    monkeypatch.setitem(sys.modules, "faiss", None)  # as where the train extra's faiss-cpu is not installed
    with pytest.raises(ExportError, match="^--dtype pq trains its codebooks with faiss, which is not installed"):
        export_run(run_dir, tmp_path / "out", "ml", dtype="pq")
    assert not (tmp_path / "out").exists()


USER = ("user_id", "age", "gender", "occupation", "zip_code")


def test_ranking_batches_score_the_same_split_or_broadcast(movielens, exported):
    """The split path (a context's rows hashed and looked up once a request: hash_split, lookup_split,
    assemble_split) gives the very floats of the broadcast path, in the reference scorer and the service's runtime,
    on plans with several tables, several lookups a feature and pooled lists (in the context: padding weighs 0);
    parts that share more than the batch's common context broadcast the rest."""
    from uembed.serving.pipeline.cpu import ModelRuntime

    _, examples = movielens
    _, bundles = exported
    for dtype in ("float32", "int8"):
        bundle = load_bundle(bundles[dtype])
        for scorer in (ReferenceScorer(bundle), ModelRuntime(bundle, hot_rows_bytes=2**14)):
            parts = []
            for start, shared in ((0, USER + ("genres",)), (40, USER + ("genres",)), (80, ("user_id", "genres"))):
                chunk = examples[start : start + 40]
                context = {name: chunk[0][name] for name in shared}
                parts.append(scorer.canonicalise([{k: v for k, v in e.items() if k not in shared} for e in chunk], context))
            rows, weights = scorer.hash(parts)
            split = scorer.hash_split(parts)
            assert split.context_rows.shape[0] == 3 and split.rows.shape[0] == 120
            assert split.ids == split.rows.size + split.context_rows.size < rows.size
            for got, want in zip(split.broadcast(), (rows, weights)):
                np.testing.assert_array_equal(got, want)
            for _ in range(2):  # the second pass: tier 1 answers
                embeddings = scorer.assemble_split(split, *scorer.lookup_split(split))
                np.testing.assert_array_equal(embeddings, scorer.assemble(scorer.lookup(rows), weights))
                np.testing.assert_array_equal(scorer.dense(embeddings), scorer.score_encoded(rows, weights))
            assert scorer.hash_split(parts + [scorer.canonicalise(examples[:3])]) is None  # a flat part: no split


def test_a_trained_network_split_by_the_user_features_scores_ranking_requests_as_flat(movielens, exported, tmp_path):
    """`uembed export --context-features`: the trained cross network's first product split by the user's features.
    A ranking request with the user as context computes the user's part of it once and gets the flat examples'
    floats; those stay within 1e-5 of dense.onnx's (the parity tolerance above)."""
    from uembed.serving.pipeline.cpu import ModelRuntime

    _, examples = movielens
    run_dir, _ = exported
    path = export_run(run_dir, tmp_path, "ml", dtype="float16", context_features=USER)
    bundle = load_bundle(path)
    split = bundle.manifest["dense"]["context_split"]
    assert split["features"] == list(USER) and ReferenceScorer(bundle).dense_parts.takes_embeddings  # a cross layer reads it again
    whole = ReferenceScorer(load_bundle(path))
    whole.dense_parts = None  # dense.onnx, unsplit
    for scorer in (ReferenceScorer(bundle), ModelRuntime(bundle, hot_rows_bytes=2**14)):
        parts, flat_examples = [], []
        for start in (0, 30, 60):
            chunk = examples[start : start + 30]
            context = {name: chunk[0][name] for name in USER}
            parts.append(scorer.canonicalise([{k: v for k, v in e.items() if k not in USER} for e in chunk], context))
            flat_examples += [{**e, **context} for e in chunk]
        flat = scorer.score(flat_examples)
        np.testing.assert_allclose(flat, whole.score(flat_examples), atol=1e-5, rtol=0)
        split_batch = scorer.hash_split(parts)
        inputs = scorer.factored_inputs(split_batch, *scorer.lookup_split(split_batch))
        assert inputs is not None and len(inputs.context) == 3
        np.testing.assert_array_equal(scorer.dense(inputs), flat)
        one = scorer.hash_split(parts[:1])  # one request a batch: its context part on one row
        inputs = scorer.factored_inputs(one, *scorer.lookup_split(one))
        assert len(inputs.context) == 1
        np.testing.assert_array_equal(scorer.dense(inputs), flat[:30])


def test_one_value_features_hashed_together_give_their_rows_hashed_one_by_one(movielens, exported):
    """Without training values, one-value features with one hashed lookup are hashed in one pass over all their
    columns, each value under its feature's seed and modulo its table's rows; with them and the pure-Python hash,
    each feature goes through its own row cache: the same rows, flat and as a ranking request's split batch (semantic-group: two tables of
    different sizes)."""
    _, examples = movielens
    _, bundles = exported
    bundle = load_bundle(bundles["float32"])
    together = ExampleEncoder(bundle.feature_specs, bundle.plan)
    one_by_one = ExampleEncoder(bundle.feature_specs, bundle.plan, cache_bytes=2**20, known=bundle.known_values)
    assert len(together.one_slot_hashed) > 1 or all(f.vocabulary or len(f.lookups) > 1 for f in bundle.plan.features)
    context = {name: examples[0][name] for name in USER}
    parts = [encoder.canonicalise([{k: v for k, v in e.items() if k not in USER} for e in examples[:50]], context)
             for encoder in (together, one_by_one)]  # fmt: skip
    before = hashing.hashing_backend()
    hashing.use_backend("python")  # where the features with training values take their row caches (the compiled
    try:  # hash takes them together too)
        assert one_by_one.row_cache and not one_by_one.direct
        one_by_one_flat, one_by_one_split = one_by_one.encode(examples), one_by_one.hash(parts[1:])
    finally:
        hashing.use_backend(before)
    for got, want in zip(together.encode(examples), one_by_one_flat):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(together.hash_split(parts[:1]).broadcast(), one_by_one_split):
        np.testing.assert_array_equal(got, want)
