"""Stages shared by every runtime (uembed/serving/pipeline/stages.py)."""

import numpy as np
import pytest

from uembed.contract.errors import UembedError
from uembed.contract.plan import APPLIER_METHODS, METHODS, build_plan
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
