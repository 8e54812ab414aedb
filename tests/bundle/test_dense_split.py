"""A dense network split by a context feature group: the context's part of the first layer once a ranking request,
the very floats of the flat form (uembed/bundle/dense_split.py)."""

import asyncio
import json

import numpy as np
import pytest

from uembed.bundle.dense_split import write_context_split
from uembed.bundle.loader import load_bundle
from uembed.bundle.synthetic import criteo_features, write_synthetic_bundle
from uembed.contract.errors import BundleError, UembedError
from uembed.serving.engine import ScoringEngine
from uembed.serving.pipeline.dense import onnx_session
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.settings import load_settings

CONTEXT = tuple(f"C{i}" for i in (1, 2, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15))  # split in runs, as a real group is
ITEMS = tuple(f"C{i}" for i in (3, 4, 12, 16))


@pytest.fixture(scope="module")
def split_bundle(tmp_path_factory):
    features = criteo_features(16)
    return write_synthetic_bundle(tmp_path_factory.mktemp("split"), "split", features, 5000, dtype="float16",
                                  progress=False, context_features=CONTEXT)  # fmt: skip


def requests(count: int, candidates: int, seed: int = 0) -> list[tuple[dict, list[dict]]]:
    rng = np.random.default_rng(seed)
    value = lambda: f"{rng.integers(0, 400):x}"  # noqa: E731 - repeats across candidates and requests
    return [({f: value() for f in CONTEXT}, [{f: value() for f in ITEMS} for _ in range(candidates)]) for _ in range(count)]


def test_the_two_parts_score_as_the_whole_network_up_to_rounding(split_bundle):
    bundle = load_bundle(split_bundle)
    scorer = ReferenceScorer(bundle)
    whole = onnx_session(bundle.dense_path)
    embeddings = np.random.default_rng(1).standard_normal((300, bundle.plan.output_dim)).astype(np.float32)
    np.testing.assert_allclose(scorer.dense(embeddings), whole.run(None, {"embeddings": embeddings})[0], rtol=0, atol=1e-6)


def test_ranking_requests_with_the_split_context_score_their_flat_examples_floats(split_bundle):
    """Several ranking requests in one split batch: the factored path (the context's part once a request) gives each
    candidate exactly the floats of its flat example, in the reference scorer and the service's runtime, cold and
    with tier 1 answering."""
    from uembed.serving.pipeline.cpu import ModelRuntime

    bundle = load_bundle(split_bundle)
    batch = requests(3, 50)
    for scorer in (ReferenceScorer(bundle), ModelRuntime(bundle, hot_rows_bytes=2**16)):
        rows, weights = scorer.hash([scorer.canonicalise([{**context, **item} for context, items in batch for item in items])])
        assert scorer.dense_parts is not None and scorer.dense_parts.columns_from_rows
        assert scorer.lookup_factored(rows, weights) is None  # the parts in one model take the assembled input
        flat = scorer.dense(scorer.assemble(scorer.lookup(rows), weights))
        one_model, scorer.dense_parts.flat_session = scorer.dense_parts.flat_session, None  # as a bundle without it
        np.testing.assert_array_equal(scorer.dense(scorer.lookup_factored(rows, weights)), flat)  # each part's columns looked up apart
        np.testing.assert_array_equal(scorer.dense(scorer.assemble(scorer.lookup(rows), weights)), flat)  # or taken
        scorer.dense_parts.flat_session = one_model
        for _ in range(2):
            parts = [scorer.canonicalise(items, context) for context, items in batch]
            split = scorer.hash_split(parts)
            looked_up = scorer.lookup_split(split)
            inputs = scorer.factored_inputs(split, *looked_up)
            assert inputs is not None and inputs.context.shape == (3, len(CONTEXT) * bundle.plan.dim)
            np.testing.assert_array_equal(scorer.dense(inputs), flat)
            np.testing.assert_array_equal(scorer.dense(scorer.assemble_split(split, *looked_up)), flat)
        for count in (50, 1):  # one request a batch, as a lone 500-candidate request runs: its context part on one row
            context, items = batch[1]
            split = scorer.hash_split([scorer.canonicalise(items[:count], context)])
            inputs = scorer.factored_inputs(split, *scorer.lookup_split(split))
            assert len(inputs.context) == 1
            np.testing.assert_array_equal(scorer.dense(inputs), flat[50 : 50 + count])


def test_the_parts_in_one_model_score_flat_batches_with_the_two_parts_floats(split_bundle, tmp_path):
    """dense_flat.onnx, the two parts in one model (the input's columns cut by slices): recorded in the manifest, used
    for flat batches, the two parts' floats at every batch size; a bundle exported before it (no ``flat`` entry)
    runs the two parts and scores the same."""
    import shutil

    bundle = load_bundle(split_bundle)
    split = bundle.manifest["dense"]["context_split"]
    assert split["flat"]["file"] == "dense_flat.onnx" and (split_bundle / "dense_flat.onnx").is_file()
    parts = ReferenceScorer(bundle).dense_parts
    assert parts.flat_session is not None and len(parts.context_runs) > 1  # CONTEXT is cut in several runs
    rng = np.random.default_rng(5)
    for size in (1, 2, 7, 64, 300, 1000):
        embeddings = rng.standard_normal((size, bundle.plan.output_dim)).astype(np.float32)
        np.testing.assert_array_equal(parts.score(embeddings), parts._parts(embeddings))
    older = tmp_path / "older"
    shutil.copytree(split_bundle, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["dense"]["context_split"]["flat"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    (older / "dense_flat.onnx").unlink()
    examples = [{**context, **item} for context, items in requests(2, 30, seed=6) for item in items]
    without = ReferenceScorer(load_bundle(older))
    assert without.dense_parts.flat_session is None
    np.testing.assert_array_equal(without.score(examples), ReferenceScorer(bundle).score(examples))


def test_a_flat_model_that_scores_unlike_the_parts_or_takes_another_input_is_not_used(split_bundle, tmp_path, monkeypatch, caplog):
    """An optional file: a flat model the service cannot trust is dropped with a log line, never the reason a bundle
    does not load; flat batches then run the two parts, with the same floats."""
    import shutil

    from uembed.bundle.format import file_entry
    from uembed.serving.pipeline.dense import DenseParts

    examples = [{**context, **item} for context, items in requests(1, 20, seed=7) for item in items]
    want = ReferenceScorer(load_bundle(split_bundle)).score(examples)
    copy = tmp_path / "copy"
    shutil.copytree(split_bundle, copy)
    shutil.copyfile(copy / "dense_rest.onnx", copy / "dense_flat.onnx")  # a model of other inputs under its name
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["dense"]["context_split"]["flat"] = file_entry(copy, "dense_flat.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    scorer = ReferenceScorer(load_bundle(copy))
    assert scorer.dense_parts is not None and scorer.dense_parts.flat_session is None
    assert "dense_flat.onnx (dense.context_split.flat): it takes" in caplog.text
    np.testing.assert_array_equal(scorer.score(examples), want)
    caplog.clear()
    monkeypatch.setattr(DenseParts, "flat_matches_parts", lambda self, session: False)
    scorer = ReferenceScorer(load_bundle(split_bundle))
    assert scorer.dense_parts is not None and scorer.dense_parts.flat_session is None
    assert "it scores otherwise than the two parts; flat batches run the two parts instead" in caplog.text
    np.testing.assert_array_equal(scorer.score(examples), want)


@pytest.mark.parametrize("failure", ["other floats", "an error"])
def test_an_export_whose_flat_model_fails_writes_the_two_parts_without_it(split_bundle, tmp_path, monkeypatch, caplog, failure):
    import shutil

    from uembed.bundle import dense_split

    def refuse(*args):
        if failure == "an error":
            raise RuntimeError("ONNX Runtime refused it")
        return False

    copy = tmp_path / "copy"
    shutil.copytree(split_bundle, copy)
    (copy / "dense_flat.onnx").unlink()
    layout = json.loads((copy / "manifest.json").read_text())["dense"]["layout"]
    monkeypatch.setattr(dense_split, "_flat_gives_parts_floats", refuse)
    entry = write_context_split(copy, "dense.onnx", layout, list(CONTEXT))
    assert "flat" not in entry and {"context", "rest"} <= set(entry)
    assert not (copy / "dense_flat.onnx").exists() and (copy / "dense_rest.onnx").is_file()
    reason = "ONNX Runtime refused it" if failure == "an error" else "other than the two parts do"
    assert "not writing dense_flat.onnx, dense.onnx's parts in one model: " in caplog.text and reason in caplog.text


def test_another_context_takes_the_whole_path_and_scores_alike(split_bundle):
    bundle = load_bundle(split_bundle)
    scorer = ReferenceScorer(bundle)
    context, items = requests(1, 20, seed=2)[0]
    smaller = {f: context[f] for f in CONTEXT[:-1]}  # one context feature sent per candidate instead
    candidates = [{**item, CONTEXT[-1]: context[CONTEXT[-1]]} for item in items]
    split = scorer.hash_split([scorer.canonicalise(candidates, smaller)])
    looked_up = scorer.lookup_split(split)
    assert scorer.factored_inputs(split, *looked_up) is None
    flat = scorer.score([{**context, **item} for item in items])
    np.testing.assert_array_equal(scorer.dense(scorer.assemble_split(split, *looked_up)), flat)


def test_the_engine_batches_ranking_requests_through_the_split_network(split_bundle):
    batch = requests(6, 40, seed=3)
    expected = ReferenceScorer(load_bundle(split_bundle)).score([{**c, **i} for c, items in batch for i in items])

    async def main():
        engine = ScoringEngine(load_settings(max_wait_ms=20))
        engine.registry.load(split_bundle)
        await engine.astart()
        results = await asyncio.gather(*(engine.score(items, context=context) for context, items in batch))
        flat = await engine.score([{**c, **i} for c, items in batch for i in items])
        await engine.astop()
        return np.concatenate([scores for scores, _ in results]), flat[0]

    ranking, flat = asyncio.run(main())
    np.testing.assert_array_equal(ranking, expected)
    np.testing.assert_array_equal(flat, expected)


def test_a_split_part_altered_on_disk_is_refused_at_load(split_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(split_bundle, copy)
    for part in ("rest", "flat"):
        file = json.loads((copy / "manifest.json").read_text())["dense"]["context_split"][part]["file"]
        data = bytearray((copy / file).read_bytes())
        data[-1] ^= 1
        (copy / file).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=f"{file} fails its sha256"):
            load_bundle(copy)
        data[-1] ^= 1
        (copy / file).write_bytes(bytes(data))
    (copy / "dense_flat.onnx").unlink()  # recorded, yet gone
    with pytest.raises(BundleError, match="file dense_flat.onnx is missing"):
        load_bundle(copy)


def test_a_split_needs_a_first_matmul_and_known_features(split_bundle, tmp_path):
    import shutil

    import onnx
    from onnx import helper

    copy = tmp_path / "copy"
    shutil.copytree(split_bundle, copy)
    layout = json.loads((copy / "manifest.json").read_text())["dense"]["layout"]
    with pytest.raises(UembedError, match=r"C99 not among the model's features \(C1, C2,"):
        write_context_split(copy, "dense.onnx", layout, ["C99"])
    with pytest.raises(UembedError, match="every feature is in the context"):
        write_context_split(copy, "dense.onnx", layout, [entry["feature"] for entry in layout])
    with pytest.raises(UembedError, match="C99 not among"):  # before a single row is written
        write_synthetic_bundle(tmp_path, "bad", criteo_features(16), 10**9, progress=False, context_features=["C99"])
    assert not any((tmp_path / "bad").iterdir())  # no staging folder, no rows
    model = onnx.load(str(copy / "dense.onnx"))
    relu = helper.make_node("Relu", ["embeddings"], ["relu_first"])
    first = model.graph.node[0]
    first.input[0] = "relu_first"
    model.graph.node.insert(0, relu)
    onnx.save(model, str(copy / "relu_first.onnx"))
    with pytest.raises(UembedError, match="must multiply its input by a weight matrix .* its input feeds Relu .*: not a matrix product"):
        write_context_split(copy, "relu_first.onnx", layout, list(CONTEXT))


def test_parts_that_do_not_match_the_bundle_are_refused_at_load(split_bundle, tmp_path):
    """A manifest whose split names an unknown feature, or parts written from another dense.onnx, is a BundleError
    naming the bundle, not an error at the first request."""
    import shutil

    for change, message in ((lambda split: split.update(features=["C99"]), "C99 not among the model's features"),
                            (lambda split: split.update(of="0" * 64), "cut from another dense.onnx"),
                            (lambda split: split.pop("width"), "no width .written by an older export"),
                            (lambda split: split.pop("of"), "no of .written by an older export")):  # fmt: skip
        copy = tmp_path / message[:6].replace(" ", "-")
        shutil.copytree(split_bundle, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        change(manifest["dense"]["context_split"])
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=f"{copy}.*{message}"):
            ReferenceScorer(load_bundle(copy))


def test_parts_that_score_a_row_unlike_alone_and_among_others_are_not_used(split_bundle, monkeypatch, caplog):
    """If the context part's floats for a row depended on its batch, no form could keep its scores: the bundle is then
    served through dense.onnx whole, and the log says so."""
    from uembed.serving.pipeline.dense import DenseParts

    monkeypatch.setattr(DenseParts, "rows_independent", lambda self: False)
    bundle = load_bundle(split_bundle)
    scorer = ReferenceScorer(bundle)
    assert scorer.dense_parts is None and "serving dense.onnx whole" in caplog.text
    embeddings = np.random.default_rng(4).standard_normal((10, bundle.plan.output_dim)).astype(np.float32)
    np.testing.assert_array_equal(scorer.dense(embeddings), onnx_session(bundle.dense_path).run(None, {"embeddings": embeddings})[0])
