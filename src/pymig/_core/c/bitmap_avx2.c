/*
 * Bitmap kernels for the "avx2" variant (and "avx512", whose CPUs have the same extensions):
 * the shared kernels compiled for POPCNT, BMI1/2 and AVX2, plus counting passes that handle
 * four words per step (a nibble-table popcount, as in Mula's AVX2 popcount) and skip empty
 * stretches with one test.  Chosen at run time by cpu.c; only dispatch files like this one
 * may carry target attributes.
 */
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("popcnt,bmi,bmi2,avx2")

#define PYMIG_SUFFIX avx2
#define PYMIG_POPCOUNT(w) ((uint64_t)__builtin_popcountll(w))
#define PYMIG_TZ(w) ((uint64_t)_tzcnt_u64(w)) /* BMI: defined (64) for 0, no branch */
#define PYMIG_CUSTOM_COUNTS
#include "bitmap_impl.h"

/* Per 64-bit lane: number of set bits. */
static inline __m256i popcount_lanes(__m256i v)
{
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low));
    __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
    return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}

static inline uint64_t sum_lanes(__m256i v)
{
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, v);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

uint64_t pymig_bitmap_count_avx2(const uint64_t *bm, uint64_t npages)
{
    uint64_t full = npages >> 6, i = 0;
    __m256i acc = _mm256_setzero_si256();
    for (; i + 4 <= full; i += 4) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(bm + i));
        if (!_mm256_testz_si256(w, w))
            acc = _mm256_add_epi64(acc, popcount_lanes(w));
    }
    return sum_lanes(acc) + count_from_avx2(bm, npages, i);
}

uint64_t pymig_bitmap_count_runs_avx2(const uint64_t *bm, uint64_t npages)
{
    uint64_t full = npages >> 6, i = 1, carry = 0;
    if (full < 5)
        return count_runs_from_avx2(bm, npages, 0, 0);
    /* word 0 alone, so that every vector below can load its lower neighbours at i - 1 */
    uint64_t total = PYMIG_POPCOUNT(bm[0] & ~(bm[0] << 1));
    __m256i acc = _mm256_setzero_si256();
    for (; i + 4 <= full; i += 4) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(bm + i));
        if (_mm256_testz_si256(w, w))
            continue;
        __m256i below = _mm256_loadu_si256((const __m256i *)(bm + i - 1));
        __m256i starts = _mm256_andnot_si256(
            _mm256_or_si256(_mm256_slli_epi64(w, 1), _mm256_srli_epi64(below, 63)), w);
        acc = _mm256_add_epi64(acc, popcount_lanes(starts));
    }
    carry = bm[i - 1] >> 63;
    return total + sum_lanes(acc) + count_runs_from_avx2(bm, npages, i, carry);
}

#pragma GCC pop_options
#endif
