"""Stages shared by every runtime (uembed/serving/pipeline/stages.py)."""

import numpy as np
import pytest

from uembed.contract.errors import UembedError
from uembed.contract.plan import APPLIER_METHODS, METHODS, build_plan
from uembed.serving.pipeline import stages
from uembed.serving.pipeline.stages import pool_slots, pooling_runs


@pytest.mark.parametrize("method", [m for m in METHODS if m not in APPLIER_METHODS])  # appliers need a search's policy
def test_pooled_slots_are_the_pooling_matrix_product(method, tiny_dataset):
    """Every method's plan (one-value features, a list, a numeric feature; several lookups a feature in the
    multi-size plans) pools by runs exactly as the product with its pooling matrix does."""
    plan = build_plan(method, tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=60)
    matrix = plan.pooling_matrix()
    weighted = np.random.default_rng(len(method)).normal(size=(37, matrix.shape[1], 4)).astype(np.float32)
    runs = pooling_runs(matrix)
    assert sum(stop - group for group, stop, _, _ in runs) == len(matrix)  # every group in exactly one run
    pooled = pool_slots(weighted, runs, len(matrix))
    np.testing.assert_allclose(pooled, np.einsum("gs,bsd->bgd", matrix, weighted), rtol=1e-6, atol=1e-6)


def test_one_slot_groups_side_by_side_make_one_run():
    matrix = np.zeros((7, 12), dtype=np.float32)
    matrix[np.arange(6), np.arange(6)] = 1
    matrix[6, 6:] = 1
    assert pooling_runs(matrix) == [(0, 6, 0, 1), (6, 7, 6, 6)]


def test_a_pooling_that_is_not_runs_of_slots_is_refused():
    matrix = np.zeros((2, 3), dtype=np.float32)
    matrix[0, [0, 2]] = 1  # a group's slots apart
    matrix[1, 1] = 1
    with pytest.raises(UembedError, match="not runs of side-by-side slots"):
        pooling_runs(matrix)
    with pytest.raises(UembedError, match="not runs"):
        pooling_runs(np.zeros((1, 2), dtype=np.float32))  # a group with no slot


needs_pool = pytest.mark.skipif(stages._pool is None, reason="the compiled assemble (_pool.pyx) is not built (make install)")


@needs_pool
@pytest.mark.parametrize("method", [m for m in METHODS if m not in APPLIER_METHODS])
def test_the_compiled_assemble_gives_numpys_bits(method, tiny_dataset):
    """pool_rows (gather, weight and pool in one pass) against numpy's take, product and pool_slots: the same float32
    bits, weighted and not, on every method's plan (several lookups a feature in the multi-size plans)."""
    plan = build_plan(method, tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=60)
    matrix = plan.pooling_matrix()
    rng = np.random.default_rng(len(method))
    rows = rng.normal(size=(50, 4)).astype(np.float32)
    inverse = rng.integers(0, 50, size=(37, matrix.shape[1]))
    weights = rng.uniform(0, 1, size=inverse.shape).astype(np.float32)
    runs = pooling_runs(matrix)
    for weighted in (True, False):
        looked_up = np.take(rows, inverse, axis=0)
        want = pool_slots(looked_up * weights[..., None] if weighted else looked_up, runs, len(matrix))
        got = stages._pool.pool_rows(rows, inverse, weights, runs, len(matrix), weighted)
        assert got.dtype == np.float32 and got.tobytes() == want.reshape(len(inverse), -1).tobytes()
    with pytest.raises(IndexError, match="row 50 of 50"):
        stages._pool.pool_rows(rows, np.full_like(inverse, 50), weights, runs, len(matrix), True)
    with pytest.raises(ValueError, match="outside"):
        stages._pool.pool_rows(rows, inverse[:, :1].copy(), weights[:, :1].copy(), runs, len(matrix), True)


@needs_pool
@pytest.mark.parametrize("bias", [(), ("user_id", "genres")], ids=["no-bias", "bias"])
def test_the_service_scores_the_same_bits_with_the_compiled_assemble(tmp_path, bias, movielens_examples):
    """A CPU runtime on a one-table bundle with a mean-pooled list (and feature biases) takes the one-pass assemble;
    its scores are the numpy passes' bit for bit, and the reference scorer's."""
    from uembed.bundle.loader import load_bundle
    from uembed.bundle.synthetic import write_synthetic_bundle
    from uembed.model.data import load_movielens100k
    from uembed.serving.pipeline.cpu import ModelRuntime
    from uembed.serving.pipeline.reference import ReferenceScorer

    features = load_movielens100k().spec.features
    path = write_synthetic_bundle(tmp_path, "movielens", features, 300, width=6, bias_features=bias, progress=False)
    bundle = load_bundle(path)
    runtime = ModelRuntime(bundle, hot_rows_bytes=2**20)  # tier 1 on, as served
    assert runtime.pools_in_one_pass
    batches = [movielens_examples[i : i + 97] for i in range(0, 970, 97)]
    user = ("user_id", "age", "gender", "occupation", "zip_code")  # a ranking request: one user, 97 movies
    rankings = [({k: batch[0][k] for k in user}, [{k: v for k, v in e.items() if k not in user} for e in batch])
                for batch in batches]  # fmt: skip

    def scores():
        return [runtime.score(batch) for batch in batches], [runtime.score(c, context) for context, c in rankings]

    compiled = scores()
    runtime.pools_in_one_pass = False
    numpy = scores()
    reference = ReferenceScorer(bundle)
    for got, want, batch in zip(compiled[0], numpy[0], batches):
        assert got.tobytes() == want.tobytes()
        np.testing.assert_allclose(got, reference.score(batch), rtol=1e-6, atol=1e-6)
    for got, want, (context, candidates) in zip(compiled[1], numpy[1], rankings):  # the split batch's assemble
        assert got.tobytes() == want.tobytes()
        np.testing.assert_allclose(got, reference.score(candidates, context), rtol=1e-6, atol=1e-6)


@needs_pool
def test_distinct_ids_by_a_slot_a_row_are_arrows():
    """distinct_ids (a batch's distinct row ids by one int32 a table row) gives Arrow's hash table's answer: the ids
    in order of first appearance and each id's place among them; it leaves its scratch as it found it."""
    rng = np.random.default_rng(5)
    scratch = np.zeros(1000, dtype=np.int32)
    for shape in ((64, 12), (1, 1), (0, 3), (300, 7)):
        ids = (rng.zipf(1.3, size=shape) % 1000).astype(np.int64)
        want_unique, want_inverse = stages.distinct(ids)
        unique, inverse = stages._pool.distinct_ids(ids.ravel(), scratch)
        assert unique.tolist() == want_unique.tolist() and inverse.reshape(shape).tolist() == want_inverse.tolist()
        assert not scratch.any()
    with pytest.raises(IndexError, match="row id 1000 outside a table of 1000 rows"):
        stages._pool.distinct_ids(np.array([3, 1000], dtype=np.int64), scratch)
    assert not scratch.any()
