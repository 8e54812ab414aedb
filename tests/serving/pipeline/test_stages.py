"""Stages shared by every runtime (uembed/serving/pipeline/stages.py)."""

import numpy as np
import pytest

from uembed.serving.pipeline.stages import pool_slots, pooling_runs


def pooling_matrix(widths: list[int]) -> np.ndarray:
    """[groups, slots] with each group's slots side by side, as EmbeddingPlan.pooling_matrix lays them out."""
    matrix = np.zeros((len(widths), sum(widths)), dtype=np.float32)
    for group, (start, width) in enumerate(zip(np.cumsum([0, *widths[:-1]]), widths)):
        matrix[group, start : start + width] = 1
    return matrix


@pytest.mark.parametrize("widths", [[1, 1, 1, 1, 1, 1, 6], [3], [1], [4, 1, 1, 2, 1, 5, 1], [2, 2, 2], [1, 3, 1, 1]])
def test_pooled_slots_are_the_pooling_matrix_product(widths):
    matrix = pooling_matrix(widths)
    weighted = np.random.default_rng(len(widths)).normal(size=(37, matrix.shape[1], 8)).astype(np.float32)
    runs = pooling_runs(matrix)
    assert sum(stop - group for group, stop, _, _ in runs) == len(widths)  # every group in exactly one run
    pooled = pool_slots(weighted, runs, len(widths))
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, np.einsum("gs,bsd->bgd", matrix, weighted), rtol=1e-6, atol=1e-6)


def test_one_slot_groups_side_by_side_make_one_run():
    assert pooling_runs(pooling_matrix([1, 1, 1, 1, 1, 1, 6])) == [(0, 6, 0, 1), (6, 7, 6, 6)]
    assert pooling_runs(pooling_matrix([2, 1, 1, 3, 1])) == [(0, 1, 0, 2), (1, 3, 2, 1), (3, 4, 4, 3), (4, 5, 7, 1)]
