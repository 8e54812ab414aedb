"""The streaming pipeline: the Criteo reader, the generator, the scan, quantiles, sparse updates, resume."""

import gzip

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from uembed.contract.columns import from_table, quantile_boundaries
from uembed.contract.errors import DataError
from uembed.contract.features import FeatureSpec, SplitSpec
from uembed.contract.plan import EmbeddingPlan, build_plan
from uembed.model.data.criteo import CRITEO_COLUMNS, criteo_spec, read_criteo
from uembed.model.data.stream import (
    HeavyHitters,
    StreamSource,
    StreamStats,
    encode_batch,
    scan,
    shuffled_batches,
    split_of_rows,
)
from uembed.model.data.synthetic import CRITEO_PRESETS, CriteoShape, write_criteo_shards
from uembed.model.optim import RowWiseAdagrad
from uembed.model.streaming import StreamingMetrics, train_stream
from uembed.model.train import TrainConfig

TINY = CriteoShape(vocabulary=CRITEO_PRESETS["criteo-tiny"], seed=3)


def criteo_lines():
    """Three lines in the Criteo format: label, 13 integers, 26 hex categoricals, missing fields empty."""
    full = ["1", *[str(i) for i in range(13)], *[f"{i:08x}" for i in range(26)]]
    gaps = ["0", "", "-1", *[""] * 11, *["68fd1e64", ""] * 13]
    third = ["0", *["5"] * 13, *["05db9164"] * 26]
    return ["\t".join(fields) for fields in (full, gaps, third)]


@pytest.mark.parametrize("compressed", [False, True])
def test_criteo_reader_reads_the_format_plain_and_gzip(tmp_path, compressed):
    text = "\n".join(criteo_lines()) + "\n"
    path = tmp_path / ("day_0.gz" if compressed else "train.txt")
    path.write_bytes(gzip.compress(text.encode()) if compressed else text.encode())
    table = __import__("pyarrow").Table.from_batches(list(read_criteo(path)))
    assert table.column_names == list(CRITEO_COLUMNS) and table.num_rows == 3
    assert table["label"].to_pylist() == [1, 0, 0]
    assert table["I1"].to_pylist() == [0, None, 5] and table["I2"].to_pylist() == [1, -1, 5]
    assert table["C1"].to_pylist() == ["00000000", "68fd1e64", "05db9164"] and table["C2"].to_pylist()[1] is None
    source = StreamSource.open(path)
    assert source.format == "criteo"
    columns = encode_batch(criteo_spec().with_boundaries({f"I{i}": (1.0, 4.0) for i in range(1, 14)}), next(source.record_batches(criteo_spec()))[1])
    # missing integer -> the missing value; an empty categorical -> the missing value; values canonical as in the hashing spec
    assert columns["I1"].uniques[columns["I1"].codes[1, 0]] == b"" and columns["I2"].uniques[columns["I2"].codes[1, 0]] == b"0"
    assert [columns["C2"].uniques[c] for c in columns["C2"].codes[:, 0]] == [b"00000001", b"", b"05db9164"]


def test_a_file_that_is_not_criteo_is_refused(tmp_path):
    (tmp_path / "bad.txt").write_text("1\t2\n")
    with pytest.raises(DataError, match="not in the Criteo format"):
        list(read_criteo(tmp_path / "bad.txt"))


def test_generator_is_deterministic_and_a_prefix_of_larger_data(tmp_path):
    a = write_criteo_shards(tmp_path / "a", 70_000, TINY, shard_rows=65_536, row_group_rows=65_536, progress=False)
    b = write_criteo_shards(tmp_path / "b", 140_000, TINY, shard_rows=131_072, progress=False)
    write_criteo_shards(tmp_path / "c", 70_000, CriteoShape(vocabulary=TINY.vocabulary, seed=4), progress=False)
    read = lambda folder: __import__("pyarrow").concat_tables(pq.read_table(p) for p in sorted(folder.glob("*.parquet")))  # noqa: E731
    first, second, other = read(tmp_path / "a"), read(tmp_path / "b"), read(tmp_path / "c")
    assert a["examples"] == first.num_rows == 70_000 and len(list((tmp_path / "a").glob("*.parquet"))) == 2
    assert second.slice(0, 70_000).equals(first)
    assert not other.equals(first)
    assert 0.1 < a["positive_rate"] < 0.5 and b["shape"]["vocabulary"] == list(TINY.vocabulary)
    # power law: the most frequent value of a large feature is far more frequent than the median one
    counts = np.unique(first["C3"].drop_null().to_numpy(zero_copy_only=False), return_counts=True)[1]
    assert counts.max() > 20 * np.median(counts)
    # the largest feature uses at most its vocabulary
    assert len(counts) <= TINY.vocabulary[2]
    with pytest.raises(DataError, match="already holds generated data"):
        write_criteo_shards(tmp_path / "a", 10, TINY, progress=False)


def test_quantile_boundaries_cut_equal_buckets():
    values = np.arange(1000, dtype=float)
    assert quantile_boundaries(values, 4) == (250.0, 500.0, 750.0)
    assert quantile_boundaries(np.array([0.0] * 90 + [1.0] * 10), 4) == (1.0,)  # ties give fewer buckets, 0 and 1 apart
    spec = FeatureSpec.from_dict({"name": "x", "kind": "numeric", "boundaries": "quantiles:4"})
    assert spec.needs_quantiles and spec.quantiles == 4
    with pytest.raises(Exception, match="quantile boundaries have not been computed"):
        spec.canonical_values(3)


def test_scan_matches_the_in_memory_path_and_its_quantiles(tmp_path):
    write_criteo_shards(tmp_path / "d", 50_000, TINY, progress=False)
    source = StreamSource.open(tmp_path / "d")
    spec = criteo_spec(quantiles=8)
    stats = scan(source, spec, seed=0, batch_rows=8192, progress=False)
    assert sum(stats.examples.values()) == 50_000 and abs(stats.examples["train"] / 50_000 - 0.8) < 0.01
    table = __import__("pyarrow").concat_tables(pq.read_table(p) for p in sorted((tmp_path / "d").glob("*.parquet")))
    codes = np.concatenate([split_of_rows(first, batch, SplitSpec(), 0, "d") for first, batch in source.record_batches(spec, 8192)])
    train_table = table.filter(__import__("pyarrow").array(codes == 0))
    # quantiles from a sample that holds every value are the exact quantiles of the training rows
    i5 = train_table["I5"].drop_null().to_numpy().astype(float)
    assert stats.spec.feature("I5").boundaries == quantile_boundaries(i5, 8)
    # the vocabularies (and the collisionless keys) are those of the in-memory path on the same rows
    memory = from_table(train_table, stats.spec, "d")
    collisionless = build_plan("collisionless", stats.spec, memory.columns, 4)
    streamed = build_plan("collisionless", stats.spec, stats, 4)
    for feature in ("C3", "C12", "I5"):
        np.testing.assert_array_equal(streamed.vocabularies[feature], collisionless.vocabularies[feature])
    # a batch's rows encode as the in-memory path encodes them
    rows, weights = streamed.encode(encode_batch(stats.spec, train_table.slice(0, 500).to_batches()[0]))
    expected, _ = collisionless.encode(from_table(train_table.slice(0, 500), stats.spec, "d").columns)
    np.testing.assert_array_equal(rows, expected)


def test_shuffle_buffer_keeps_every_example_once_in_bounded_windows():
    chunks = [(np.arange(i, i + 10, dtype=np.int32)[:, None], np.ones((10, 1), np.float32), np.zeros(10, np.float32), i + 10) for i in range(0, 100, 10)]
    batches = list(shuffled_batches(iter(chunks), capacity=30, batch_size=8, rng=np.random.default_rng(0)))
    seen = np.concatenate([b[0][:, 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(100)) and seen.tolist() != list(range(100))
    assert max(seen[:30]) < 30  # the first window holds only the first 30 examples
    assert [b[3] for b in batches if b[3] is not None] == [30, 60, 90, 100]


def test_exact_windows_hold_capacity_examples_so_ranks_refill_at_the_same_step():
    def chunks(sizes, start=0):
        row = start
        for size in sizes:
            yield np.arange(row, row + size, dtype=np.int32)[:, None], np.ones((size, 1), np.float32), np.zeros(size, np.float32), row + size
            row += size

    # two ranks whose chunks differ in size: the loose windows end at different steps, the exact ones at the same
    ranks = [[13, 9, 17, 11, 40, 3, 12], [7, 21, 16, 30, 8, 19, 4]]
    for exact in (False, True):
        ends = []
        for sizes in ranks:
            batches = list(shuffled_batches(chunks(sizes, 5), capacity=24, batch_size=8, rng=np.random.default_rng(0), exact=exact, start_row=5))
            seen = np.concatenate([b[0][:, 0] for b in batches])
            assert sorted(seen.tolist()) == list(range(5, 5 + sum(sizes)))  # every example once
            ends.append([step for step, b in enumerate(batches) if b[3] is not None])
            if exact:
                lengths = [len(b[2]) for b in batches]
                assert lengths[: 3 * 3] == [8] * 9  # every full window: exactly 24 examples, 3 batches
        if exact:
            assert ends[0][:3] == ends[1][:3] == [2, 5, 8]
        else:
            assert ends[0][:3] != ends[1][:3]
    # a window's end carries the first row of the chunk that was cut (re-reading from there loses nothing)
    batches = list(shuffled_batches(chunks([10, 20], 0), capacity=15, batch_size=5, rng=np.random.default_rng(1), exact=True))
    marks = [b[3] for b in batches if b[3] is not None]
    assert marks == [10, 30]  # the window of rows 0-14 ends inside the chunk that starts at row 10; the next at the end
    assert sorted(np.concatenate([b[0][:, 0] for b in batches[:3]]).tolist()) == list(range(15))


def test_streaming_auc_matches_sklearn():
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(0)
    labels = (rng.random(20_000) < 0.3).astype(np.float32)
    probabilities = np.clip(0.3 + 0.2 * (labels - 0.3) + rng.normal(0, 0.15, labels.size), 0.001, 0.999).astype(np.float32)
    metrics = StreamingMetrics()
    for start in range(0, labels.size, 3000):
        metrics.add(labels[start : start + 3000], probabilities[start : start + 3000])
    result = metrics.result()
    assert result["auc"] == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-4)
    assert result["logloss"] == pytest.approx(log_loss(labels, probabilities), rel=1e-5)


def test_rowwise_adagrad_sparse_equals_dense_and_a_numpy_reference():
    torch.manual_seed(0)
    start = torch.randn(50, 4)
    sparse_w, dense_w = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    sparse_opt, dense_opt = RowWiseAdagrad([sparse_w], lr=0.1), RowWiseAdagrad([dense_w], lr=0.1)
    reference, accumulator = start.numpy().astype(np.float64), np.zeros(50)
    for step in range(5):
        ids = torch.randint(0, 10, (32,))  # only rows 0..9 are touched
        target = torch.randn(32, 4)
        for weight, optimizer, sparse in ((sparse_w, sparse_opt, True), (dense_w, dense_opt, False)):
            optimizer.zero_grad()
            loss = ((torch.nn.functional.embedding(ids, weight, sparse=sparse) - target) ** 2).sum()
            loss.backward()
            assert weight.grad.is_sparse == sparse
            optimizer.step()
        grad = np.zeros((50, 4))
        np.add.at(grad, ids.numpy(), 2 * (reference[ids.numpy()] - target.numpy()))
        accumulator += (grad**2).mean(axis=1)
        reference -= 0.1 * grad / (np.sqrt(accumulator)[:, None] + 1e-8)
    torch.testing.assert_close(sparse_w.detach(), dense_w.detach(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sparse_w.detach().numpy(), reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sparse_w.detach().numpy()[10:], start.numpy()[10:])  # untouched rows never move
    assert sparse_opt.state[sparse_w]["sum"].shape == (50,)  # one accumulator per row


def test_sparse_adam_moves_only_touched_rows_like_a_lazy_dense_reference():
    torch.manual_seed(1)
    start = torch.randn(30, 3)
    weight = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.SparseAdam([weight], lr=0.05)
    m, v, reference = np.zeros((30, 3)), np.zeros((30, 3)), start.numpy().astype(np.float64)
    for step in range(1, 4):
        ids = torch.tensor([1, 4, 4, 7])
        optimizer.zero_grad()
        (torch.nn.functional.embedding(ids, weight, sparse=True).sum() * step).backward()
        optimizer.step()
        grad = np.zeros((30, 3))
        np.add.at(grad, ids.numpy(), float(step))
        rows = np.unique(ids.numpy())
        m[rows] = 0.9 * m[rows] + 0.1 * grad[rows]
        v[rows] = 0.999 * v[rows] + 0.001 * grad[rows] ** 2
        step_size = 0.05 * np.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        reference[rows] -= step_size * m[rows] / (np.sqrt(v[rows]) + 1e-8 * np.sqrt(1 - 0.999**step))
    np.testing.assert_allclose(weight.detach().numpy(), reference, rtol=1e-4, atol=1e-5)
    untouched = [r for r in range(30) if r not in (1, 4, 7)]
    np.testing.assert_array_equal(weight.detach().numpy()[untouched], start.numpy()[untouched])


@pytest.fixture(scope="module")
def tiny_stream(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream") / "data"
    write_criteo_shards(folder, 30_000, TINY, shard_rows=65_536, progress=False)
    source = StreamSource.open(folder)
    return source, scan(source, criteo_spec(quantiles=4), batch_rows=4096, progress=False)


def stream_config(**overrides):
    base = dict(embedding="unified", budget_fraction=0.2, dim=4, network="mlp", hidden=(16,), epochs=2, batch_size=512,
                embedding_optimizer="rowwise-adagrad", embedding_learning_rate=0.05, shuffle_buffer=4096, read_rows=2048)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def test_resume_from_a_checkpoint_gives_the_uninterrupted_model(tiny_stream, tmp_path):
    torch.set_num_threads(1)
    source, stats = tiny_stream
    config = stream_config(checkpoint_every=8000)
    whole = train_stream(config, source, stats, tmp_path / "whole", progress=False)
    assert not (tmp_path / "whole" / "resume.pt").exists()
    assert train_stream(config, source, stats, tmp_path / "cut", progress=False, stop_after_examples=10_000) is None
    assert (tmp_path / "cut" / "resume.pt").is_file()
    resumed = train_stream(config, source, stats, tmp_path / "cut", progress=False)
    assert resumed.metrics["train_examples"] == whole.metrics["train_examples"] == 2 * stats.examples["train"]
    for name, tensor in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert resumed.metrics["test_auc"] == whole.metrics["test_auc"] > 0.6
    other = stream_config(checkpoint_every=8000, dim=8)
    train_stream(other, source, stats, tmp_path / "cut2", progress=False, stop_after_examples=4000)
    with pytest.raises(Exception, match="checkpoint of another configuration"):
        train_stream(config, source, stats, tmp_path / "cut2", progress=False)


@pytest.mark.parametrize("optimizer", ["sparse-adam", "adam"])
def test_every_table_optimizer_trains_on_the_stream(tiny_stream, tmp_path, optimizer):
    torch.set_num_threads(1)
    source, stats = tiny_stream
    config = stream_config(embedding="collisionless", epochs=1, embedding_optimizer=optimizer, embedding_learning_rate=0.01)
    result = train_stream(config, source, stats, tmp_path / optimizer, progress=False)
    assert result.metrics["test_auc"] > 0.6 and result.metrics["embedding_optimizer"] == optimizer
    assert result.metrics["peak_rss_bytes"] > 0 and result.metrics["examples_per_second"] > 0


def test_statistics_round_trip_and_keep_their_keys_on_disk(tiny_stream, tmp_path):
    from uembed.model.data.stream import StoredKeys, StreamStats

    _, stats = tiny_stream
    loaded = StreamStats.load(stats.save(tmp_path / "a"))
    assert isinstance(loaded.keys, StoredKeys) and loaded.vocabulary == stats.vocabulary
    assert loaded.spec.feature("I1").boundaries == stats.spec.feature("I1").boundaries
    loaded.save(tmp_path / "a")  # over its own files: the keys are not rewritten while read
    loaded.save(tmp_path / "b")
    for folder in ("a", "b"):
        again = StreamStats.load(tmp_path / folder)
        for name in stats.keys:
            np.testing.assert_array_equal(again.keys[name], stats.keys[name])


def test_a_streamed_run_exports_what_training_saw_so_the_service_counts_unseen_values(tiny_stream, tmp_path):
    from uembed.bundle.loader import load_bundle
    from uembed.contract.known import KnownValues
    from uembed.model.export import export_run

    torch.set_num_threads(1)
    source, stats = tiny_stream
    train_stream(stream_config(epochs=1), source, stats, tmp_path / "run", progress=False)
    bundle = load_bundle(export_run(tmp_path / "run", tmp_path / "bundles", "criteo"))
    assert set(bundle.known_values) == set(stats.keys)
    name = next(iter(stats.keys))
    assert bundle.known_values[name].contains(stats.keys[name]).all()
    fresh = bundle.known_values[name].contains(KnownValues.keys(name, [f"never-{i}".encode() for i in range(10_000)]))
    assert fresh.mean() < 0.03
    assert bundle.manifest["collisions"]["not_computed"].startswith("not computed for streamed runs")  # and says so


@pytest.mark.parametrize("capacity", [64, 4096])
def test_heavy_hitters_keep_the_frequent_keys_within_the_misra_gries_bound(capacity):
    rng = np.random.default_rng(0)
    stream = rng.zipf(1.3, 200_000).astype(np.uint64) % np.uint64(3000)  # a power law over 3000 keys
    sketch = HeavyHitters(capacity)
    for batch in np.array_split(stream, 37):
        keys, counts = np.unique(batch, return_counts=True)
        sketch.add(keys, counts.astype(np.int64))
    got = sketch.merge()
    true_keys, true_counts = np.unique(stream, return_counts=True)
    truth = dict(zip(true_keys.tolist(), true_counts.tolist()))
    assert got.keys.size <= capacity and (got.counts > 0).all()
    if true_keys.size <= capacity:
        assert got.exact and dict(zip(got.keys.tolist(), got.counts.tolist())) == truth
        return
    assert not got.exact
    bound = stream.size / (capacity + 1)
    for key, count in zip(got.keys.tolist(), got.counts.tolist()):
        assert truth[key] - bound <= count <= truth[key]
    kept = set(got.keys.tolist())
    assert {k for k, n in truth.items() if n > bound} <= kept


@pytest.mark.parametrize(("method", "share"), [("unified", 0.3), ("separate", 0.3), ("unified", "auto")])
def test_a_scan_that_counts_every_value_gives_the_in_memory_paths_heads(tmp_path, method, share):
    write_criteo_shards(tmp_path / "d", 20_000, TINY, progress=False)
    source = StreamSource.open(tmp_path / "d")
    spec = criteo_spec(quantiles=4)
    stats = scan(source, spec, seed=0, batch_rows=4096, progress=False, head_sketch=1 << 14, sample=1 << 16)
    assert all(c.exact for c in stats.head_counts.values())
    table = __import__("pyarrow").concat_tables(pq.read_table(p) for p in sorted((tmp_path / "d").glob("*.parquet")))
    codes = np.concatenate([split_of_rows(first, batch, SplitSpec(), 0, "d") for first, batch in source.record_batches(spec, 4096)])
    memory = from_table(table.filter(__import__("pyarrow").array(codes == 0)), stats.spec, "d")
    want = build_plan(method, stats.spec, memory.columns, 4, budget_rows=3000, head_share=share)
    got = build_plan(method, stats.spec, stats, 4, budget_rows=3000, head_share=share)
    assert got.heads and got.to_dict() == want.to_dict() and not got.warnings
    for name, keys in want.heads.items():
        np.testing.assert_array_equal(got.heads[name], keys)
    # a sketch smaller than the large features' vocabularies: approximate counts, the same contract
    small = scan(source, spec, seed=0, batch_rows=4096, progress=False, head_sketch=64)
    assert not small.head_counts["C3"].exact and small.head_counts["C1"].exact
    assert small.head_counts["C3"].keys.size <= 64
    approximate = build_plan(method, small.spec, small, 4, budget_rows=3000, head_share=share)
    assert EmbeddingPlan.from_dict(approximate.to_dict(), approximate.vocabularies, approximate.heads).heads
    again = StreamStats.load(small.save(tmp_path / "stats"))
    assert again.head_sketch == 64 and build_plan(method, again.spec, again, 4, budget_rows=3000, head_share=share).to_dict() == approximate.to_dict()
