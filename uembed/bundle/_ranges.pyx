# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The int2 export's range search (``codecs.quantisation_range``) a row at a time in C: the same float32 operations in
the same order as its numpy passes (so the same bits, and the same choices as the torch mirror of
``uembed/model/qat.py``), with one row's values and errors kept in registers and L1 instead of ``[2, rows, dim]``
temporaries written and read again some ten times a step. ``codecs.py`` uses numpy's passes without this extension,
with ``UEMBED_PURE_PYTHON=1``, and for rows whose values or range are not finite.

No contraction into fused multiply-adds (``-ffp-contract=off``): numpy rounds each product and each sum.
"""

import numpy as np

# 1.5 * 2**23: a float32 in [0, 2**22] plus this, minus this, is itself rounded to the nearest integer, ties to even,
# as numpy's rint rounds it (the default rounding mode); the values rounded here are clipped to [0, levels] first.
cdef float ROUNDER = 12582912.0
# float32 constants: a C literal such as 1.0 is a double, and an expression with one is computed in double precision
cdef float ZERO = 0.0
cdef float ONE = 1.0


cdef inline float range_error(const float* row, Py_ssize_t dim, float low, float high, float levels,
                              float* scratch, Py_ssize_t padded) noexcept nogil:
    """The tree-summed squared error of ``row`` quantised over ``[low, high]`` (``codecs.squared_errors`` then
    ``codecs.tree_sum``)."""
    cdef float scale = (high - low) / levels
    cdef float safe = scale if scale > ZERO else ONE
    cdef float value, code, error
    cdef Py_ssize_t j, half
    for j in range(dim):
        value = (row[j] - low) / safe
        # clip then round equals numpy's round then clip for finite values: both give 0 below 0 and levels above it
        value = value if value > ZERO else ZERO
        value = value if value < levels else levels
        code = (value + ROUNDER) - ROUNDER
        error = code * scale + low - row[j]
        scratch[j] = error * error
    for j in range(dim, padded):
        scratch[j] = ZERO
    half = padded // 2
    while half >= 1:
        for j in range(half):
            scratch[j] = scratch[j] + scratch[j + half]
        half //= 2
    return scratch[0]


def search_ranges(const float[:, ::1] rows, int bits, int bins, int shrink_steps):
    """float32 ``[k, 1]`` low and high ends of each row's range of least squared error: ``codecs._search_range``'s
    search (cut ``[min, max]`` into ``bins`` steps, ``shrink_steps`` times move whichever end leaves the smaller
    error, keep the best range seen). The rows and their ranges must be finite (``codecs.py`` checks); a zero end is +0."""
    cdef Py_ssize_t count = rows.shape[0], dim = rows.shape[1], r, j, step_index
    cdef Py_ssize_t padded = 1
    while padded < dim:
        padded *= 2
    lows = np.empty((count, 1), dtype=np.float32)
    highs = np.empty((count, 1), dtype=np.float32)
    scratch_array = np.empty(max(padded, 1), dtype=np.float32)
    cdef float[:, ::1] low_out = lows
    cdef float[:, ::1] high_out = highs
    cdef float[::1] scratch = scratch_array
    cdef float levels = <float>((1 << bits) - 1)
    cdef float low, high, step, best_error, error, raise_error, lower_error
    cdef float raised, lowered, best_raised, best_lowered
    cdef const float* row
    if dim == 0:
        raise ValueError("rows of no values have no range")
    with nogil:
        for r in range(count):
            row = &rows[r, 0]
            low = row[0]
            high = row[0]
            for j in range(1, dim):
                low = row[j] if row[j] < low else low
                high = row[j] if row[j] > high else high
            low = low + ZERO  # a zero end is +0, as codecs.row_ends makes it (-0 + 0 is +0)
            high = high + ZERO
            step = (high - low) / <float>bins
            best_error = range_error(row, dim, low, high, levels, &scratch[0], padded)
            raised = ZERO
            lowered = ZERO
            best_raised = ZERO
            best_lowered = ZERO
            for step_index in range(shrink_steps):
                raise_error = range_error(row, dim, low + (raised + ONE) * step, high - lowered * step, levels,
                                          &scratch[0], padded)
                lower_error = range_error(row, dim, low + raised * step, high - (lowered + ONE) * step, levels,
                                          &scratch[0], padded)
                if raise_error < lower_error:
                    raised = raised + ONE
                    error = raise_error
                else:
                    lowered = lowered + ONE
                    error = lower_error
                if error < best_error:
                    best_error = error
                    best_raised = raised
                    best_lowered = lowered
            low_out[r, 0] = low + best_raised * step
            high_out[r, 0] = high - best_lowered * step
    return lows, highs
