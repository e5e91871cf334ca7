/*
 * The instruction-set sensitive bitmap kernels, written once and compiled per variant:
 * bitmap.c includes this for the portable build, bitmap_avx2.c under a target pragma (POPCNT
 * and BMI make popcount and "clear lowest set bit" single instructions).  The includer
 * defines PYMIG_SUFFIX and PYMIG_POPCOUNT before including.
 *
 * Every kernel masks the last word so bits at index >= npages are neither reported nor
 * modified.
 */
#include "bitops.h"
#include "kernels.h"

#define PYMIG_CAT2(a, b) a##_##b
#define PYMIG_CAT(a, b) PYMIG_CAT2(a, b)
#define PYMIG_FN(name) PYMIG_CAT(name, PYMIG_SUFFIX)

uint64_t PYMIG_FN(pymig_bitmap_count)(const uint64_t *bm, uint64_t npages)
{
    uint64_t full = npages >> 6, total = 0;
    for (uint64_t i = 0; i < full; i++)
        total += PYMIG_POPCOUNT(bm[i]);
    if (npages & 63)
        total += PYMIG_POPCOUNT(bm[full] & pymig_bits_below(npages & 63));
    return total;
}

/* A run starts at every set bit whose lower neighbour is clear. */
uint64_t PYMIG_FN(pymig_bitmap_count_runs)(const uint64_t *bm, uint64_t npages)
{
    uint64_t full = npages >> 6, total = 0, carry = 0;
    for (uint64_t i = 0; i < full; i++) {
        uint64_t w = bm[i];
        total += PYMIG_POPCOUNT(w & ~((w << 1) | carry));
        carry = w >> 63;
    }
    if (npages & 63) {
        uint64_t w = bm[full] & pymig_bits_below(npages & 63);
        total += PYMIG_POPCOUNT(w & ~((w << 1) | carry));
    }
    return total;
}

/* Word i with the bits past npages cleared. */
static inline uint64_t PYMIG_FN(word)(const uint64_t *bm, uint64_t i, uint64_t nwords,
                                      uint64_t npages)
{
    return i + 1 < nwords ? bm[i] : bm[i] & pymig_word_mask(i, npages);
}

/* Index of the first non-zero word at or after i (nwords if none): four words per test. */
static inline uint64_t PYMIG_FN(skip_zero)(const uint64_t *bm, uint64_t i, uint64_t nwords,
                                           uint64_t npages)
{
    while (i + 4 <= nwords && (bm[i] | bm[i + 1] | bm[i + 2] | bm[i + 3]) == 0)
        i += 4;
    while (i < nwords && PYMIG_FN(word)(bm, i, nwords, npages) == 0)
        i++;
    return i;
}

void PYMIG_FN(pymig_bitmap_indices)(const uint64_t *bm, uint64_t npages, int64_t *out)
{
    uint64_t nwords = pymig_words(npages);
    for (uint64_t i = PYMIG_FN(skip_zero)(bm, 0, nwords, npages); i < nwords;
         i = PYMIG_FN(skip_zero)(bm, i + 1, nwords, npages)) {
        uint64_t w = PYMIG_FN(word)(bm, i, nwords, npages);
        int64_t base = (int64_t)(i << 6);
        if (w == ~UINT64_C(0)) {
            for (int b = 0; b < 64; b++)
                *out++ = base + b;
            continue;
        }
        while (w) {
            *out++ = base + pymig_ctz64(w);
            w &= w - 1;
        }
    }
}

/* (start, length) pairs.  A run ends at the first clear bit after its start; the masked last
 * word makes every run stop at npages. */
void PYMIG_FN(pymig_bitmap_runs)(const uint64_t *bm, uint64_t npages, int64_t *out)
{
    uint64_t nwords = pymig_words(npages);
    uint64_t i = PYMIG_FN(skip_zero)(bm, 0, nwords, npages);
    if (i >= nwords)
        return;
    uint64_t w = PYMIG_FN(word)(bm, i, nwords, npages);
    for (;;) {
        unsigned bit = (unsigned)pymig_ctz64(w);
        uint64_t start = (i << 6) + bit;
        uint64_t inv = ~w & pymig_bits_from(bit);
        while (inv == 0) {
            /* the run covers the rest of this word; all-ones words pass in one step */
            if (++i >= nwords) {
                *out++ = (int64_t)start;
                *out++ = (int64_t)(npages - start);
                return;
            }
            w = PYMIG_FN(word)(bm, i, nwords, npages);
            inv = ~w;
        }
        unsigned end_bit = (unsigned)pymig_ctz64(inv);
        *out++ = (int64_t)start;
        *out++ = (int64_t)((i << 6) + end_bit - start);
        w &= pymig_bits_from(end_bit);
        if (w == 0) {
            i = PYMIG_FN(skip_zero)(bm, i + 1, nwords, npages);
            if (i >= nwords)
                return;
            w = PYMIG_FN(word)(bm, i, nwords, npages);
        }
    }
}

uint64_t PYMIG_FN(pymig_bitmap_merge)(uint64_t *dst, const uint64_t *src, uint64_t npages)
{
    uint64_t full = npages >> 6, added = 0;
    for (uint64_t i = 0; i < full; i++) {
        added += PYMIG_POPCOUNT(src[i] & ~dst[i]);
        dst[i] |= src[i];
    }
    if (npages & 63) {
        uint64_t s = src[full] & pymig_bits_below(npages & 63);
        added += PYMIG_POPCOUNT(s & ~dst[full]);
        dst[full] |= s;
    }
    return added;
}

uint64_t PYMIG_FN(pymig_bitmap_test_and_clear)(uint64_t *bm, uint64_t npages, uint64_t start,
                                               uint64_t count)
{
    if (start >= npages || count == 0)
        return 0;
    uint64_t end = count > npages - start ? npages : start + count;
    uint64_t cleared = 0;
    for (uint64_t i = start >> 6; i <= (end - 1) >> 6; i++) {
        uint64_t mask = pymig_range_mask(i, start, end);
        cleared += PYMIG_POPCOUNT(bm[i] & mask);
        bm[i] &= ~mask;
    }
    return cleared;
}
