# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The lookup and assemble stages' passes over a batch in C (``stages.py``): a table's distinct ids by a slot an id
(``distinct_ids``, for tables small enough to keep one int32 a row), and the gather, weighting and pooling of a
batch's rows in one pass (``pool_rows``, ``Stages.assemble`` of a one-table plan): what ``np.take``, a product with
the weights and ``pool_slots`` give, with the same float32 operations in the same order (so the same bits), without
the three [B, S, D] arrays between them. ``stages.py`` falls back to Arrow and numpy without this extension, or with
``UEMBED_PURE_PYTHON=1``.
"""

from libc.stdint cimport int64_t

import numpy as np


def pool_rows(const float[:, ::1] rows, const int64_t[:, ::1] inverse, const float[:, ::1] weights, runs,
              Py_ssize_t groups, bint weighted):
    """float32 [B, groups * D]: group g of example b is the sum, slot after slot, of ``weights[b, s] *
    rows[inverse[b, s]]`` over its slots (``pooling_runs``' runs: ``(group, stop, first, width)``, one-slot groups
    side by side in a run of width 1). Without ``weighted`` every weight is 1 and the rows are copied or summed.
    Raises IndexError for an index outside ``rows`` (nothing is read out of bounds)."""
    cdef Py_ssize_t batch = inverse.shape[0], slots = inverse.shape[1], dim = rows.shape[1], count = rows.shape[0]
    cdef Py_ssize_t b, s, d, g, group, stop, first, width, slot
    cdef float weight
    cdef float* target
    cdef const float* row
    if weighted and (weights.shape[0] != batch or weights.shape[1] != slots):
        raise ValueError(f"weights of shape {(weights.shape[0], weights.shape[1])} for ids of shape {(batch, slots)}")
    plan = [tuple(int(value) for value in run) for run in runs]
    for group, stop, first, width in plan:
        if group < 0 or stop > groups or first < 0 or first + (stop - group if width == 1 else width) > slots:
            raise ValueError(f"run {(group, stop, first, width)} outside {groups} groups of {slots} slots")
    for b in range(batch):
        for s in range(slots):
            if not 0 <= inverse[b, s] < count:
                raise IndexError(f"row {inverse[b, s]} of {count}")
    out = np.empty((batch, groups * dim), dtype=np.float32)
    cdef float[:, ::1] pooled = out
    if batch == 0 or dim == 0:
        return out
    for group, stop, first, width in plan:
        for b in range(batch):
            if width == 1:  # consecutive one-slot groups: each its slot's row
                for g in range(group, stop):
                    slot = first + g - group
                    row = &rows[inverse[b, slot], 0]
                    target = &pooled[b, g * dim]
                    if weighted:
                        weight = weights[b, slot]
                        for d in range(dim):
                            target[d] = weight * row[d]
                    else:
                        for d in range(dim):
                            target[d] = row[d]
            else:  # one group's slots summed in order, as pool_slots adds them
                target = &pooled[b, group * dim]
                for s in range(width):
                    slot = first + s
                    row = &rows[inverse[b, slot], 0]
                    weight = weights[b, slot] if weighted else 1.0
                    if s == 0:
                        for d in range(dim):
                            target[d] = weight * row[d] if weighted else row[d]
                    else:
                        for d in range(dim):
                            target[d] += weight * row[d] if weighted else row[d]
    return out


def distinct_ids(const int64_t[::1] ids, int[::1] scratch):
    """The distinct ``ids`` in order of first appearance (int64) and where each id is among them (int64, as ``ids``):
    what ``stages.distinct`` gives, by a table of one slot an id (``scratch``: int32, at least one slot a row of the
    table, every slot 0; an id's slot holds its place + 1 during the call, and is 0 again after it). Raises
    IndexError for an id outside the scratch."""
    cdef Py_ssize_t n = ids.shape[0], rows = scratch.shape[0], i, found = 0
    cdef int64_t id
    for i in range(n):
        if not 0 <= ids[i] < rows:
            raise IndexError(f"row id {ids[i]} outside a table of {rows} rows")
    inverse_array = np.empty(n, dtype=np.int64)
    first_array = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] inverse = inverse_array
    cdef int64_t[::1] first = first_array
    for i in range(n):
        id = ids[i]
        if scratch[id] == 0:
            first[found] = id
            found += 1
            scratch[id] = <int>found
        inverse[i] = scratch[id] - 1
    for i in range(found):
        scratch[first[i]] = 0
    return first_array[:found].copy(), inverse_array
