/* The int2 export's range search over rows, in C (``_ranges.pyx`` calls it; its docstring says what it computes).

Built once per instruction set on x86-64 with GCC or Clang (baseline, AVX2, AVX-512): the widest the machine running
it has is picked at run time, so a wheel or image built for any x86-64 machine uses wider vectors where there are
some. Every build does the same float32 operations in the same order (no contraction into fused multiply-adds, no
reassociation: the build passes -ffp-contract=off and no fast-math), so each returns the same bits; the tests run
each one the machine has against numpy's passes. */

#ifndef UEMBED_RANGES_KERNEL_H
#define UEMBED_RANGES_KERNEL_H

#include <stddef.h>

#if defined(__GNUC__) && defined(__x86_64__)
#define UEMBED_X86 1
#else
#define UEMBED_X86 0
#endif

/* The instruction sets: ``uembed_search_ranges`` takes one (AUTO: the widest this machine has). */
enum { UEMBED_AUTO = 0, UEMBED_BASELINE = 1, UEMBED_AVX2 = 2, UEMBED_AVX512 = 3 };

#if defined(__GNUC__)
#define UEMBED_INLINE static inline __attribute__((always_inline))
#else
#define UEMBED_INLINE static inline
#endif

/* 1.5 * 2**23: a float32 in [0, 2**22] plus this, minus this, is itself rounded to the nearest integer, ties to even,
   as numpy's rint rounds it (the default rounding mode); the values rounded here are clipped to [0, levels] first. */
#define UEMBED_ROUNDER 12582912.0f

/* The tree-summed squared error of ``row`` quantised over [low, high] (codecs.squared_errors, then codecs.tree_sum). */
UEMBED_INLINE float uembed_range_error(const float* row, ptrdiff_t dim, float low, float high, float levels,
                                       float* scratch, ptrdiff_t padded) {
    float scale = (high - low) / levels;
    float safe = scale > 0.0f ? scale : 1.0f;
    for (ptrdiff_t j = 0; j < dim; j++) {
        float value = (row[j] - low) / safe;
        /* clip then round equals numpy's round then clip for finite values: both give 0 below 0 and levels above */
        value = value > 0.0f ? value : 0.0f;
        value = value < levels ? value : levels;
        float code = (value + UEMBED_ROUNDER) - UEMBED_ROUNDER;
        float error = code * scale + low - row[j];
        scratch[j] = error * error;
    }
    for (ptrdiff_t j = dim; j < padded; j++) {
        scratch[j] = 0.0f;
    }
    for (ptrdiff_t half = padded / 2; half >= 1; half /= 2) {
        for (ptrdiff_t j = 0; j < half; j++) {
            scratch[j] = scratch[j] + scratch[j + half];
        }
    }
    return scratch[0];
}

/* Each of ``count`` rows of ``dim`` values: its range's low and high ends (``lows[r]``, ``highs[r]``). ``scratch``
   holds ``padded`` floats (``dim`` rounded up to a power of two). */
UEMBED_INLINE void uembed_search_body(const float* rows, ptrdiff_t count, ptrdiff_t dim, float levels, int bins,
                                 int shrink_steps, float* lows, float* highs, float* scratch, ptrdiff_t padded) {
    for (ptrdiff_t r = 0; r < count; r++) {
        const float* row = rows + r * dim;
        float low = row[0], high = row[0];
        for (ptrdiff_t j = 1; j < dim; j++) {
            low = row[j] < low ? row[j] : low;
            high = row[j] > high ? row[j] : high;
        }
        low = low + 0.0f; /* a zero end is +0, as codecs.row_ends makes it (-0 + 0 is +0) */
        high = high + 0.0f;
        float step = (high - low) / (float)bins;
        float best_error = uembed_range_error(row, dim, low, high, levels, scratch, padded);
        float raised = 0.0f, lowered = 0.0f, best_raised = 0.0f, best_lowered = 0.0f;
        for (int s = 0; s < shrink_steps; s++) {
            float raise_error = uembed_range_error(row, dim, low + (raised + 1.0f) * step, high - lowered * step,
                                                   levels, scratch, padded);
            float lower_error = uembed_range_error(row, dim, low + raised * step, high - (lowered + 1.0f) * step,
                                                   levels, scratch, padded);
            float error;
            if (raise_error < lower_error) {
                raised = raised + 1.0f;
                error = raise_error;
            } else {
                lowered = lowered + 1.0f;
                error = lower_error;
            }
            if (error < best_error) {
                best_error = error;
                best_raised = raised;
                best_lowered = lowered;
            }
        }
        lows[r] = low + best_raised * step;
        highs[r] = high - best_lowered * step;
    }
}

#define UEMBED_SEARCH_ARGS const float* rows, ptrdiff_t count, ptrdiff_t dim, float levels, int bins, int shrink_steps, \
    float* lows, float* highs, float* scratch, ptrdiff_t padded
#define UEMBED_SEARCH_CALL rows, count, dim, levels, bins, shrink_steps, lows, highs, scratch, padded

static void uembed_search_baseline(UEMBED_SEARCH_ARGS) { uembed_search_body(UEMBED_SEARCH_CALL); }
#if UEMBED_X86
__attribute__((target("avx2"))) static void uembed_search_avx2(UEMBED_SEARCH_ARGS) { uembed_search_body(UEMBED_SEARCH_CALL); }
__attribute__((target("avx512f"))) static void uembed_search_avx512(UEMBED_SEARCH_ARGS) { uembed_search_body(UEMBED_SEARCH_CALL); }
#endif

/* Whether this machine runs ``isa``'s build (AUTO and BASELINE: always). */
static int uembed_has(int isa) {
#if UEMBED_X86
    __builtin_cpu_init();
    if (isa == UEMBED_AVX2) return __builtin_cpu_supports("avx2");
    if (isa == UEMBED_AVX512) return __builtin_cpu_supports("avx512f");
#else
    if (isa == UEMBED_AVX2 || isa == UEMBED_AVX512) return 0;
#endif
    return isa == UEMBED_AUTO || isa == UEMBED_BASELINE;
}

/* The search with ``isa``'s build (AUTO: the widest this machine runs); the instruction set used, or -1 where this
   machine does not run the one asked for. */
static int uembed_search_ranges(int isa, UEMBED_SEARCH_ARGS) {
    if (isa == UEMBED_AUTO) {
        isa = uembed_has(UEMBED_AVX512) ? UEMBED_AVX512 : uembed_has(UEMBED_AVX2) ? UEMBED_AVX2 : UEMBED_BASELINE;
    }
    if (!uembed_has(isa)) return -1;
#if UEMBED_X86
    if (isa == UEMBED_AVX512) { uembed_search_avx512(UEMBED_SEARCH_CALL); return isa; }
    if (isa == UEMBED_AVX2) { uembed_search_avx2(UEMBED_SEARCH_CALL); return isa; }
#endif
    uembed_search_baseline(UEMBED_SEARCH_CALL);
    return UEMBED_BASELINE;
}

#endif
