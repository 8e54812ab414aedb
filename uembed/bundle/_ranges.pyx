# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The int2 export's range search (``codecs.quantisation_range``) a row at a time in C: the same float32 operations in
the same order as its numpy passes (so the same bits, and the same choices as the torch mirror of
``uembed/model/qat.py``), with one row's values and errors kept in registers and L1 instead of ``[2, rows, dim]``
temporaries written and read again some ten times a step. ``codecs.py`` uses numpy's passes without this extension,
with ``UEMBED_PURE_PYTHON=1``, and for rows whose values or range are not finite.

No contraction into fused multiply-adds (``-ffp-contract=off``): numpy rounds each product and each sum. The loop is in
``_ranges_kernel.h``, built once per instruction set on x86-64 (the same bits from each).
"""

import numpy as np


cdef extern from "_ranges_kernel.h":
    int UEMBED_AUTO, UEMBED_BASELINE, UEMBED_AVX2, UEMBED_AVX512
    int uembed_has(int isa) nogil
    int uembed_search_ranges(int isa, const float* rows, Py_ssize_t count, Py_ssize_t dim, float levels, int bins,
                             int shrink_steps, float* lows, float* highs, float* scratch, Py_ssize_t padded) nogil

INSTRUCTION_SETS = {"auto": UEMBED_AUTO, "baseline": UEMBED_BASELINE, "avx2": UEMBED_AVX2, "avx512f": UEMBED_AVX512}


def instruction_sets():
    """The builds of the search this machine runs, narrowest first (``auto`` picks the last)."""
    return [name for name, isa in INSTRUCTION_SETS.items() if name != "auto" and uembed_has(isa)]


def search_ranges(const float[:, ::1] rows, int bits, int bins, int shrink_steps, str instruction_set="auto"):
    """float32 ``[k, 1]`` low and high ends of each row's range of least squared error: ``codecs._search_range``'s
    search (cut ``[min, max]`` into ``bins`` steps, ``shrink_steps`` times move whichever end leaves the smaller
    error, keep the best range seen). The rows and their ranges must be finite (``codecs.py`` checks); a zero end is +0.
    The loop is ``_ranges_kernel.h``'s, in the build for ``instruction_set`` (one of :func:`instruction_sets`, or
    ``auto``: the widest); every build gives the same bits."""
    cdef Py_ssize_t count = rows.shape[0], dim = rows.shape[1]
    cdef Py_ssize_t padded = 1
    cdef int isa, used
    if instruction_set not in INSTRUCTION_SETS:
        raise ValueError(f"instruction_set must be one of {', '.join(INSTRUCTION_SETS)}, got {instruction_set!r}")
    isa = INSTRUCTION_SETS[instruction_set]
    if not uembed_has(isa):
        raise ValueError(f"this machine does not run the {instruction_set} build (it runs {', '.join(instruction_sets())})")
    while padded < dim:
        padded *= 2
    lows = np.empty((count, 1), dtype=np.float32)
    highs = np.empty((count, 1), dtype=np.float32)
    scratch_array = np.empty(max(padded, 1), dtype=np.float32)
    cdef float[:, ::1] low_out = lows
    cdef float[:, ::1] high_out = highs
    cdef float[::1] scratch = scratch_array
    cdef float levels = <float>((1 << bits) - 1)
    if dim == 0:
        raise ValueError("rows of no values have no range")
    if count == 0:
        return lows, highs
    with nogil:
        used = uembed_search_ranges(isa, &rows[0, 0], count, dim, levels, bins, shrink_steps, &low_out[0, 0],
                                    &high_out[0, 0], &scratch[0], padded)
    if used < 0:
        raise ValueError(f"this machine does not run the {instruction_set} build")
    return lows, highs
