# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""A table gradient's rows coalesced in compiled code: one pass over the rows, no sort of them.

``uembed/model/optim.py: coalesce_rows`` calls ``sum_rows`` when this extension is built (and
``UEMBED_PURE_PYTHON`` is not set) and otherwise sorts the row ids and adds with torch; both sum a repeated id's
rows in the order they come, from zero, so both give the same bits (the tests hold them to it). A training step
coalesces its batch's lookups (tens of thousands of rows, a few thousand distinct) and, data-parallel, every
rank's rows again: a sort of every lookup was most of that work.
"""

from libc.stdint cimport int32_t, int64_t

import numpy as np


def sum_rows(const int64_t[::1] indices, const float[:, ::1] values, int32_t[::1] slots):
    """``(rows int64 [k], sums float32 [k, D])``: the distinct ids of ``indices`` in the order they first come and
    each one's rows of ``values`` summed. ``slots`` holds -1 for every id of the table (one entry an id) and is
    left so: an id's entry holds its place in the output while the pass runs."""
    cdef Py_ssize_t n = indices.shape[0], width = values.shape[1], count = 0, i, j, place
    cdef int64_t row
    if values.shape[0] != n:
        raise ValueError(f"sum_rows takes one id per row of values, got {n} ids and {values.shape[0]} rows")
    rows_array = np.empty(n, dtype=np.int64)
    sums_array = np.empty((n, width), dtype=np.float32)
    cdef int64_t[::1] rows = rows_array
    cdef float[:, ::1] sums = sums_array
    cdef Py_ssize_t table = slots.shape[0]
    for i in range(n):
        if indices[i] < 0 or indices[i] >= table:
            raise IndexError(f"row id {indices[i]} is outside a table of {table} rows")
    with nogil:
        for i in range(n):
            row = indices[i]
            place = slots[row]
            if place < 0:
                place = count
                slots[row] = <int32_t>place
                rows[place] = row
                count += 1
                for j in range(width):
                    sums[place, j] = 0.0
            for j in range(width):
                sums[place, j] += values[i, j]
        for i in range(count):
            slots[rows[i]] = -1
    return rows_array[:count], sums_array[:count]
