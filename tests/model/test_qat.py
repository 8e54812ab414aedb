"""Quantization-aware training (#37, item 3): the forward pass quantises rows as the export does, and a QAT run's
bundle scores as the run did; a streamed bundle's test AUC streams too (item 7)."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_spec, tiny_table
from uembed.bundle import codecs
from uembed.bundle.codecs import ROWWISE_BITS, decode_rows, encode_rows
from uembed.bundle.loader import load_bundle
from uembed.contract.errors import SpecError, UembedError
from uembed.model import qat
from uembed.model.data import from_table
from uembed.model.data.criteo import criteo_spec
from uembed.model.data.stream import StreamSource, encode_batch, scan
from uembed.model.data.synthetic import CRITEO_PRESETS, CriteoShape, write_criteo_shards
from uembed.model.export import ExportError, export_run
from uembed.model.pruning import PruneError, check_prune_options
from uembed.model.qat import fake_quantise
from uembed.model.streaming import stream_metrics, train_stream
from uembed.model.train import TrainConfig, build_model, load_run, plan_for, set_quantised, train
from uembed.serving.pipeline.reference import ReferenceScorer

CODECS = tuple(ROWWISE_BITS)
QAT_CODECS = (*CODECS, "pq")


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


def edge_case_rows(dim: int, seed: int) -> np.ndarray:
    """float32 rows ``[1500 + 6, dim]`` at three scales, then a constant row, a zero row, a row with one outlier, a
    row of halfway values, a row of two values and a row whose min and max are one float apart."""
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.normal(0, scale, (500, dim)) for scale in (1e-3, 0.1, 3.0)]).astype(np.float32)
    outlier = rng.normal(size=dim).astype(np.float32)
    outlier[dim // 2] = 50.0
    halfway = np.arange(dim, dtype=np.float32) / np.float32(max(dim - 1, 1)) * np.float32(1.5)
    two_values = np.where(np.arange(dim) % 2 == 0, np.float32(-0.5), np.float32(0.25)).astype(np.float32)
    near = np.full(dim, 1.0, dtype=np.float32)
    near[-1] = np.nextafter(np.float32(1.0), np.float32(2.0))
    edges = np.stack([np.full(dim, 0.25, np.float32), np.zeros(dim, np.float32), outlier, halfway, two_values, near])
    return np.concatenate([rows, edges])


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dim", [1, 3, 16, 17])
def test_training_and_export_choose_the_same_range_codes_scale_and_bias_bit_for_bit(codec, dim):
    """The range (int2: a search) is found in numpy at export and in torch in training: same floats, same choices."""
    bits = ROWWISE_BITS[codec]
    rows = edge_case_rows(dim, bits * 100 + dim)
    low, high = codecs.quantisation_range(rows, bits)
    torch_low, torch_high = qat.quantisation_range(torch.from_numpy(rows).view(3, -1, dim), bits)
    np.testing.assert_array_equal(torch_low.numpy().reshape(-1, 1), low)
    np.testing.assert_array_equal(torch_high.numpy().reshape(-1, 1), high)
    codes, scale_bias = codecs.quantise_rows(rows, bits)
    torch_codes, torch_scale_bias = qat.quantise_rows(torch.from_numpy(rows).view(3, -1, dim), bits)
    np.testing.assert_array_equal(torch_codes.numpy().reshape(-1, dim), codes.astype(np.float32))
    np.testing.assert_array_equal(torch_scale_bias.numpy().reshape(-1, 2), scale_bias)
    decoded = qat.quantise_dequantise(torch.from_numpy(rows).view(3, -1, dim), bits).numpy().reshape(-1, dim)
    np.testing.assert_array_equal(decoded, codecs.dequantise_rows(codes, scale_bias))
    assert scale_bias[-6].tolist() == [0.0, 0.25] and scale_bias[-5].tolist() == [0.0, 0.0]  # constant, zeros
    assert not codes[-6:-4].any()


@pytest.mark.parametrize("codec", CODECS)
def test_a_zero_end_is_positive_zero_in_training_and_at_export_bit_for_bit(codec):
    """Rows whose min or max is a zero of either sign, or zeros of both signs: which zero a reduction returns is each
    library's own pick, so both make a zero end +0; the scale and bias bits are the same (and are the pure numpy
    path's and the compiled search's)."""
    bits, dim = ROWWISE_BITS[codec], 5
    rng = np.random.default_rng(bits)
    rows = np.where(rng.random((300, dim)) < 0.5, np.float32(0.0), np.float32(-0.0)).astype(np.float32)
    rows[100:200, 0] = -1.0  # the max is a zero of either sign
    rows[200:, 0] = 1.0  # the min is
    low, high = codecs.quantisation_range(rows, bits)
    torch_low, torch_high = qat.quantisation_range(torch.from_numpy(rows).view(3, -1, dim), bits)
    for ours, theirs in ((low, torch_low), (high, torch_high)):
        assert np.array_equal(ours.view(np.uint32), theirs.numpy().reshape(-1, 1).view(np.uint32))
    assert not np.signbit(high[:200]).any() and not np.signbit(low[200:]).any() and not np.signbit(low[:100]).any()
    _, scale_bias = codecs.quantise_rows(rows, bits)
    _, torch_scale_bias = qat.quantise_rows(torch.from_numpy(rows).view(3, -1, dim), bits)
    assert np.array_equal(scale_bias.view(np.uint32), torch_scale_bias.numpy().reshape(-1, 2).view(np.uint32))
    if codecs._ranges is not None and bits in codecs.RANGE_SEARCH:
        codecs._ranges, compiled = None, codecs._ranges
        try:
            pure = codecs.quantisation_range(rows, bits)
        finally:
            codecs._ranges = compiled
        assert all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(pure, (low, high)))


@pytest.mark.parametrize("codec", CODECS)
def test_a_pruned_rows_kept_columns_quantise_in_training_as_the_narrowed_row_exports(codec):
    bits, dim = ROWWISE_BITS[codec], 16
    rows = edge_case_rows(dim, bits).reshape(-1, 2, dim)  # [B, S, D]: two slots
    columns = np.zeros((2, dim), dtype=bool)
    columns[0, [0, 3, 4, 9, 10, 15]] = True  # a slot's table keeps 6 columns here and there
    columns[1, 2:13] = True
    decoded = qat.quantise_dequantise(torch.from_numpy(rows), bits, torch.from_numpy(columns)).numpy()
    for slot in range(2):
        narrowed = rows[:, slot][:, columns[slot]]
        np.testing.assert_array_equal(decoded[:, slot][:, columns[slot]], codecs.dequantise_rows(*codecs.quantise_rows(narrowed, bits)))
        assert not decoded[:, slot][:, ~columns[slot]].any()


@pytest.fixture(scope="module")
def qat_runs(tmp_path_factory):
    """One in-memory run a codec, trained through that codec's quantiser."""
    torch.set_num_threads(1)
    train_set, val_set, test_set = from_table(tiny_table(2000), tiny_spec(), name="tiny").split(0)
    root = tmp_path_factory.mktemp("qat")
    for codec in QAT_CODECS:
        config = TrainConfig(budget_fraction=0.5, dim=8, hidden=(16,), epochs=2, qat=codec)
        train(config, train_set, val_set, test_set, run_dir=root / codec, progress=False, echo_warnings=False)
    return root, test_set


@pytest.mark.parametrize("codec", QAT_CODECS)
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
    set_quantised(model.embedding, TrainConfig(qat=codec), False)  # the float rows the quantiser saw: not the bundle's
    assert np.abs(served - model_scores(model, rows, weights)).max() > 1e-5


def test_a_qat_run_takes_no_other_codec_and_an_unknown_codec_is_refused(qat_runs, tmp_path):
    root, test_set = qat_runs
    with pytest.raises(ExportError, match=r"was trained with --qat int4: export it with --dtype int4 \(the rows it learned with\), not int8$"):
        export_run(root / "int4", tmp_path, "m", dtype="int8")
    with pytest.raises(ExportError, match="not float32$"):
        export_run(root / "int4", tmp_path, "m", dtype="float32")
    assert not (tmp_path / "m").exists()
    with pytest.raises(SpecError, match=r"^unknown --qat 'int3'; choose one of int8, int4, int2, pq$"):
        train(TrainConfig(qat="int3", epochs=1), test_set, test_set, None, progress=False)


def test_a_pq_qat_run_is_not_pruned(qat_runs):
    root, _ = qat_runs
    with pytest.raises(PruneError, match="was trained with --qat pq: its codebooks are as wide as its rows, so it is not pruned$"):
        check_prune_options(root / "pq", 4, 1)


def test_pq_codes_are_the_exports_nearest_centroids_with_a_straight_through_gradient():
    rng = np.random.default_rng(11)
    rows = rng.normal(size=(1000, 8)).astype(np.float32)
    codebooks = rng.normal(size=(2, 256, 4)).astype(np.float32)
    codebooks[1, 9] = codebooks[1, 4]  # a repeated centroid: the lower index wins, as in the export
    rows[0, :4], rows[1, 4:] = codebooks[0, 7], codebooks[1, 4]
    codes = qat.pq_codes(torch.from_numpy(rows), torch.from_numpy(codebooks)).numpy()
    np.testing.assert_array_equal(codes, codecs.pq_encode(rows, codebooks))
    assert codes[0, 0] == 7 and codes[1, 1] == 4 and 9 not in codes[:, 1]
    x = torch.from_numpy(rows).requires_grad_()
    quantised = qat.pq_fake_quantise(x, torch.from_numpy(codebooks))
    np.testing.assert_array_equal(quantised.detach().numpy(), codecs.pq_decode(codes.astype(np.uint8), codebooks))
    upstream = torch.from_numpy(rng.normal(size=(1000, 8)).astype(np.float32))
    quantised.backward(upstream)
    torch.testing.assert_close(x.grad, upstream, rtol=0, atol=0)


@pytest.mark.parametrize("width", [2, 4, 8, 16])
def test_training_and_export_break_near_ties_alike(width):
    """Rows at the midpoint of two centroids: float32 distances from two matrix products (torch's, numpy's, or one
    library's in blocks of other sizes) ranked them differently; float64 ones do not."""
    rng = np.random.default_rng(width)
    codebooks = rng.normal(size=(1, 256, width)).astype(np.float32)
    first, second = rng.integers(0, 256, 3000), rng.integers(0, 256, 3000)
    rows = ((codebooks[0, first] + codebooks[0, second]) / 2).astype(np.float32)
    expected = codecs.pq_encode(rows, codebooks)
    np.testing.assert_array_equal(qat.pq_codes(torch.from_numpy(rows), torch.from_numpy(codebooks)).numpy(), expected)
    one_at_a_time = np.concatenate([codecs.pq_encode(rows[i : i + 1], codebooks) for i in range(0, 3000, 7)])
    np.testing.assert_array_equal(one_at_a_time, expected[::7])


@pytest.mark.parametrize(("subvectors", "width"), [(1, 3), (1, 4), (2, 8), (1, 16), (4, 4)])
def test_training_export_and_any_block_pick_the_same_codes_on_exact_ties_and_far_from_the_origin(subvectors, width,
                                                                                                monkeypatch):  # fmt: skip
    """Exact ties (each odd centroid is the even one before it with two values swapped, and the rows hold those two
    values equal) and sub-vectors far from the origin (one value a thousand times the rest: ``|c|^2 - 2 x.c``
    cancels): two libraries' matrix products, or one library's for one row and for a block, ranked these either way.
    Training and export agree on every row, alone or in any block, and across the block edge."""
    rng = np.random.default_rng(width * 10 + subvectors)
    codebooks = rng.normal(size=(subvectors, 256, width)).astype(np.float32)
    codebooks[..., 0] *= 1000
    codebooks[:, 1::2] = codebooks[:, 0::2]
    codebooks[:, 1::2, 1], codebooks[:, 1::2, 2] = codebooks[:, 0::2, 2], codebooks[:, 0::2, 1]
    count = qat.PQ_CODE_ROWS + 5
    chosen = rng.integers(0, 128, (count, subvectors)) * 2
    parts = codebooks[np.arange(subvectors), chosen] + rng.normal(scale=1e-2, size=(count, subvectors, width)).astype(np.float32)
    parts[..., 2] = parts[..., 1]  # equally far from the even centroid and its swapped twin
    rows = parts.reshape(count, -1).astype(np.float32)
    expected = codecs.pq_encode(rows, codebooks)
    trained = qat.pq_codes(torch.from_numpy(rows), torch.from_numpy(codebooks)).numpy()
    np.testing.assert_array_equal(trained, expected)
    np.testing.assert_array_equal(np.concatenate([codecs.pq_encode(rows[i : i + 1], codebooks) for i in range(0, count, 13)]),
                                  expected[::13])  # fmt: skip
    monkeypatch.setattr(codecs, "PQ_ENCODE_ROWS", 1000)
    np.testing.assert_array_equal(codecs.pq_encode(rows, codebooks), expected)
    monkeypatch.setattr(qat, "PQ_CODE_ROWS", 999)
    np.testing.assert_array_equal(qat.pq_codes(torch.from_numpy(rows), torch.from_numpy(codebooks)).numpy(), expected)
    # and each code is a nearest centroid, by distances in extended precision (the product form alone, cancelling
    # far from the origin, had picked others)
    exact = ((parts.astype(np.longdouble)[:, :, None, :] - codebooks.astype(np.longdouble)[None]) ** 2).sum(-1)
    picked = np.take_along_axis(exact, expected[:, :, None].astype(np.intp), axis=2)[..., 0]
    assert (picked <= exact.min(axis=2) * (1 + 1e-12)).all()


def pq_error(rows: torch.Tensor, codebooks: torch.Tensor) -> float:
    return float(((qat.pq_decode(qat.pq_codes(rows, codebooks), codebooks) - rows) ** 2).sum())


def test_a_refresh_fits_the_codebooks_to_the_rows():
    generator = torch.Generator().manual_seed(0)
    few = torch.randn(40, 6, generator=generator)  # fewer rows than centroids: every row becomes one
    codebooks = torch.zeros(3, 256, 2)
    qat.refresh_codebooks(few, codebooks, generator, first=True)
    assert pq_error(few, codebooks) == 0.0
    rows = torch.randn(5000, 6, generator=generator) * torch.linspace(0.1, 3.0, 6)
    qat.refresh_codebooks(rows, codebooks, generator, first=True)
    fitted = pq_error(rows, codebooks)
    assert fitted < 0.05 * pq_error(rows, torch.zeros_like(codebooks))
    for _ in range(3):  # the sample is the whole table: Lloyd steps never raise its error
        qat.refresh_codebooks(rows, codebooks, generator, first=False)
        assert pq_error(rows, codebooks) <= fitted * (1 + 1e-6)
        fitted = pq_error(rows, codebooks)


def test_a_refresh_fits_the_rows_recent_batches_read_not_the_unread_tail():
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(20_000, 4, generator=generator)
    read = torch.tensor([3, 17, 400, 9_999, 12_345] * 40 + [7])  # a few rows, read by many batches, and one once
    codebooks = torch.zeros(1, 256, 4)
    qat.refresh_codebooks(table, codebooks, generator, True, read)
    assert pq_error(table[read.unique()], codebooks) < 1e-9  # each read row is a centroid of its own (a mean of copies)
    qat.refresh_codebooks(table, codebooks, generator, True)  # without them: the whole table's rows
    assert pq_error(table[read.unique()], codebooks) > 1e-3


def test_a_pq_module_refreshes_its_codebooks_in_training_only():
    train_set = from_table(tiny_table(300), tiny_spec(), name="tiny")
    config = TrainConfig(budget_fraction=0.5, dim=8, hidden=(16,), qat="pq", pq_subvectors=2)
    model = build_model(plan_for(config, train_set.spec, train_set.columns), config)
    tables = model.embedding
    rows, weights = (torch.from_numpy(a) for a in tables_input(config, train_set))
    assert tables.pq_codebooks.shape == (1, 2, 256, 4) and not tables.pq_codebooks.any()
    model.train()
    model(rows, weights)
    first = tables.pq_codebooks.clone()
    assert first.any() and int(tables.pq_steps) == 1
    with torch.no_grad():
        tables.weight.mul_(2.0)
    for _ in range(qat.PQ_REFRESH_EVERY - 1):
        model(rows, weights)
    torch.testing.assert_close(tables.pq_codebooks, first, rtol=0, atol=0)  # not its turn yet
    model.eval()
    model(rows, weights)
    assert int(tables.pq_steps) == qat.PQ_REFRESH_EVERY  # scoring neither counts nor refits
    model.train()
    model(rows, weights)
    assert int(tables.pq_steps) == qat.PQ_REFRESH_EVERY + 1
    doubled = tables.weight.detach()
    assert pq_error(doubled, tables.pq_codebooks[0]) < 0.5 * pq_error(doubled, first[0])  # refitted to the doubled rows


def tables_input(config, dataset):
    return plan_for(config, dataset.spec, dataset.columns).encode(dataset.columns)


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


def test_a_warm_started_qat_run_trains_float32_first_then_keeps_a_quantised_epoch_that_exports_as_the_run(tmp_path):
    torch.set_num_threads(1)
    train_set, val_set, test_set = from_table(tiny_table(2000), tiny_spec(), name="tiny").split(0)
    config = TrainConfig(budget_fraction=0.5, dim=8, hidden=(16,), epochs=3, patience=1, qat="int2", qat_warm_start=True)
    result = train(config, train_set, val_set, test_set, run_dir=tmp_path / "run", progress=False, echo_warnings=False)
    metrics = result.metrics
    float_epochs = metrics["qat_warm_start_epochs"]
    phases = [entry["quantised"] for entry in metrics["history"]]
    assert 1 <= float_epochs <= 3 and phases == [False] * float_epochs + [True] * (len(phases) - float_epochs)
    assert len(phases) > float_epochs and metrics["best_epoch"] > float_epochs  # the kept epoch is a quantised one
    assert metrics["stopped"].startswith(f"float32 for {float_epochs} epochs, then fake-quantised (int2) at 0.1x the learning rate: ")
    bundle = load_bundle(export_run(tmp_path / "run", tmp_path / "bundles", "warm"))
    assert {t.dtype for t in bundle.tables.values()} == {"int2"}
    _, plan, model, _ = load_run(tmp_path / "run")
    rows, weights = plan.encode(test_set.columns)
    np.testing.assert_allclose(ReferenceScorer(bundle).score_encoded(rows, weights), model_scores(model, rows, weights), rtol=0, atol=1e-5)


def test_a_streamed_run_refuses_the_warm_start_it_cannot_do(tiny_stream, tmp_path):
    source, stats = tiny_stream
    config = TrainConfig(dim=8, hidden=(16,), epochs=1, qat="int2", qat_warm_start=True)
    with pytest.raises(UembedError, match="--qat-warm-start trains in memory"):
        train_stream(config, source, stats, tmp_path / "run", progress=False)
