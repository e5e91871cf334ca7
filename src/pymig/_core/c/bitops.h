/*
 * Small inline helpers over KVM-layout bitmaps (u64 words, bit i = page i), shared by the
 * bitmap kernels and the packet encoder.
 */
#ifndef PYMIG_BITOPS_H
#define PYMIG_BITOPS_H

#include <stdint.h>
#include <string.h>

static inline uint64_t pymig_words(uint64_t npages)
{
    return (npages + 63) >> 6;
}

/* Mask of the bits of word `word` that lie below npages (all ones for a full word). */
static inline uint64_t pymig_word_mask(uint64_t word, uint64_t npages)
{
    uint64_t first = word << 6;
    if (npages >= first + 64)
        return ~UINT64_C(0);
    return (UINT64_C(1) << (npages - first)) - 1;
}

/* Bits of [lo, 64) of a word: lo in [0, 63]. */
static inline uint64_t pymig_bits_from(unsigned lo)
{
    return ~UINT64_C(0) << lo;
}

/* Bits of [0, hi) of a word: hi in [1, 64]. */
static inline uint64_t pymig_bits_below(unsigned hi)
{
    return ~UINT64_C(0) >> (64 - hi);
}

static inline int pymig_ctz64(uint64_t w)
{
    return __builtin_ctzll(w);
}

/* Trailing zeros with 64 for a zero word (one tzcnt with BMI, bsf + cmov without): lets the
 * decoders below run without a branch per bit. */
static inline uint64_t pymig_tz64(uint64_t w)
{
    return w ? (uint64_t)__builtin_ctzll(w) : 64;
}

/* The bits of w at position e and above; none when e >= 64. */
static inline uint64_t pymig_bits_at_or_above(uint64_t w, uint64_t e)
{
    return w & (~UINT64_C(0) << (e & 63)) & (UINT64_C(0) - (uint64_t)(e < 64));
}

/* First set bit at or after start, or npages. */
static inline uint64_t pymig_next_set(const uint64_t *bm, uint64_t npages, uint64_t start)
{
    if (start >= npages)
        return npages;
    uint64_t nwords = pymig_words(npages);
    uint64_t i = start >> 6;
    uint64_t w = bm[i] & pymig_bits_from(start & 63);
    while (w == 0) {
        /* sparse bitmaps: skip four empty words per test */
        i++;
        while (i + 4 <= nwords && (bm[i] | bm[i + 1] | bm[i + 2] | bm[i + 3]) == 0)
            i += 4;
        if (i >= nwords)
            return npages;
        w = bm[i];
    }
    uint64_t page = (i << 6) + (uint64_t)pymig_ctz64(w);
    return page < npages ? page : npages;
}

static inline uint64_t pymig_load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* The bits of word i inside [start, end), for start >> 6 <= i <= (end - 1) >> 6. */
static inline uint64_t pymig_range_mask(uint64_t i, uint64_t start, uint64_t end)
{
    uint64_t mask = ~UINT64_C(0);
    if (i == start >> 6)
        mask &= pymig_bits_from(start & 63);
    if (i == (end - 1) >> 6)
        mask &= pymig_bits_below((unsigned)(end - (i << 6)));
    return mask;
}

/* Sets [start, start + count); the caller checked the range. */
static inline void pymig_set_range(uint64_t *bm, uint64_t start, uint64_t count)
{
    if (count == 0)
        return;
    uint64_t end = start + count;
    for (uint64_t i = start >> 6; i <= (end - 1) >> 6; i++)
        bm[i] |= pymig_range_mask(i, start, end);
}

#endif /* PYMIG_BITOPS_H */
