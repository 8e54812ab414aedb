"""Quantization-aware training (#37, item 3): the forward pass quantises rows as the export does, and a QAT run's
bundle scores as the run did; a streamed bundle's test AUC streams too (item 7)."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_spec, tiny_table
from uembed.bundle.codecs import ROWWISE_BITS, decode_rows, encode_rows
from uembed.bundle.loader import load_bundle
from uembed.contract.errors import SpecError
from uembed.model.data import from_table
from uembed.model.data.criteo import criteo_spec
from uembed.model.data.stream import StreamSource, encode_batch, scan
from uembed.model.data.synthetic import CRITEO_PRESETS, CriteoShape, write_criteo_shards
from uembed.model.export import ExportError, export_run
from uembed.model.qat import fake_quantise
from uembed.model.streaming import stream_metrics, train_stream
from uembed.model.train import TrainConfig, load_run, train
from uembed.serving.pipeline.reference import ReferenceScorer

CODECS = tuple(ROWWISE_BITS)


def model_scores(model, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(rows), torch.from_numpy(weights))).numpy()


@pytest.mark.parametrize("codec", CODECS)
def test_fake_quantisation_is_the_export_codec_bit_for_bit_with_a_straight_through_gradient(codec):
    rng = np.random.default_rng(ROWWISE_BITS[codec])
    rows = np.concatenate([rng.normal(0, scale, (500, 12)) for scale in (1e-3, 0.1, 3.0)]).astype(np.float32)
    rows[0] = 0.25  # a constant row: scale 0
    rows[1] = np.arange(12, dtype=np.float32) / 11 * ((1 << ROWWISE_BITS[codec]) - 1) / 2  # halfway values: ties
    values, scale_bias = encode_rows(rows, codec)
    decoded = decode_rows(values, codec, 12, scale_bias)
    x = torch.from_numpy(rows).view(30, 50, 12).requires_grad_()  # gathered rows [B, S, D]
    quantised = fake_quantise(x, ROWWISE_BITS[codec])
    np.testing.assert_array_equal(quantised.detach().numpy().reshape(-1, 12), decoded)
    assert not np.array_equal(decoded, rows)
    upstream = torch.from_numpy(rng.normal(size=(30, 50, 12)).astype(np.float32))
    quantised.backward(upstream)
    torch.testing.assert_close(x.grad, upstream, rtol=0, atol=0)


@pytest.fixture(scope="module")
def qat_runs(tmp_path_factory):
    """One in-memory run a codec, trained through that codec's quantiser."""
    torch.set_num_threads(1)
    train_set, val_set, test_set = from_table(tiny_table(2000), tiny_spec(), name="tiny").split(0)
    root = tmp_path_factory.mktemp("qat")
    for codec in CODECS:
        config = TrainConfig(budget_fraction=0.5, dim=8, hidden=(16,), epochs=2, qat=codec)
        train(config, train_set, val_set, test_set, run_dir=root / codec, progress=False, echo_warnings=False)
    return root, test_set


@pytest.mark.parametrize("codec", CODECS)
def test_a_qat_run_exports_in_its_codec_and_the_bundle_scores_as_the_run(qat_runs, codec):
    root, test_set = qat_runs
    assert json.loads((root / codec / "config.json").read_text())["train"]["qat"] == codec
    bundle = load_bundle(export_run(root / codec, root / "bundles", codec))  # no dtype: the run's codec
    assert {t.dtype for t in bundle.tables.values()} == {codec}
    assert bundle.manifest["training"]["config"]["qat"] == codec
    _, plan, model, _ = load_run(root / codec)
    assert not model.training
    rows, weights = plan.encode(test_set.columns)
    served = ReferenceScorer(bundle).score_encoded(rows, weights)
    np.testing.assert_allclose(served, model_scores(model, rows, weights), rtol=0, atol=1e-5)
    model.embedding.qat_bits = 0  # the float rows the quantiser saw: their scores are not the bundle's
    assert np.abs(served - model_scores(model, rows, weights)).max() > 1e-5


def test_a_qat_run_takes_no_other_codec_and_an_unknown_codec_is_refused(qat_runs, tmp_path):
    root, test_set = qat_runs
    with pytest.raises(ExportError, match=r"was trained with --qat int4: export it with --dtype int4 \(the rows it learned with\), not int8$"):
        export_run(root / "int4", tmp_path, "m", dtype="int8")
    with pytest.raises(ExportError, match="not float32$"):
        export_run(root / "int4", tmp_path, "m", dtype="float32")
    assert not (tmp_path / "m").exists()
    with pytest.raises(SpecError, match=r"^unknown --qat 'int3'; choose one of int8, int4, int2$"):
        train(TrainConfig(qat="int3", epochs=1), test_set, test_set, None, progress=False)


@pytest.fixture(scope="module")
def tiny_stream(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream") / "data"
    write_criteo_shards(folder, 12_000, CriteoShape(vocabulary=CRITEO_PRESETS["criteo-tiny"], seed=3), progress=False)
    source = StreamSource.open(folder)
    return source, scan(source, criteo_spec(quantiles=4), batch_rows=4096, progress=False)


def test_a_streamed_qat_run_exports_a_bundle_that_scores_and_streams_its_test_auc_as_the_run(tiny_stream, tmp_path):
    torch.set_num_threads(1)
    source, stats = tiny_stream
    config = TrainConfig(budget_fraction=0.2, dim=4, network="mlp", hidden=(16,), epochs=1, batch_size=512, qat="int2",
                         embedding_optimizer="rowwise-adagrad", embedding_learning_rate=0.05, shuffle_buffer=4096, read_rows=2048)  # fmt: skip
    result = train_stream(config, source, stats, tmp_path / "run", progress=False)
    bundle = load_bundle(export_run(tmp_path / "run", tmp_path / "bundles", "criteo"))
    assert {t.dtype for t in bundle.tables.values()} == {"int2"}
    _, plan, model, _ = load_run(tmp_path / "run")
    rows, weights = plan.encode(encode_batch(stats.spec, next(source.record_batches(stats.spec, 2048))[1]))
    scorer = ReferenceScorer(bundle)
    np.testing.assert_allclose(scorer.score_encoded(rows, weights), model_scores(model, rows, weights), rtol=0, atol=1e-5)
    test = stream_metrics(scorer.score_encoded, bundle.plan, source, stats, (2,), config.split_seed, config.read_rows)["test"]
    assert test["examples"] == result.metrics["test_examples"] == stats.examples["test"]
    assert test["auc"] == pytest.approx(result.metrics["test_auc"], abs=1e-4)
    assert test["logloss"] == pytest.approx(result.metrics["test_logloss"], abs=1e-5)
