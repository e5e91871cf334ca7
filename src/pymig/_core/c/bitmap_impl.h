/*
 * The instruction-set sensitive bitmap kernels, written once and compiled per variant:
 * bitmap.c includes this for the portable build, bitmap_avx2.c under a target pragma (POPCNT
 * and BMI make popcount, tzcnt and "clear lowest set bit" single instructions).  The includer
 * defines PYMIG_SUFFIX, PYMIG_POPCOUNT and PYMIG_TZ (trailing zeros, 64 for 0) before
 * including, and PYMIG_CUSTOM_COUNTS when it supplies its own count and count_runs (built on
 * the *_from helpers here).
 *
 * Every kernel masks the last word so bits at index >= npages are neither reported nor
 * modified.
 */
#include "bitops.h"
#include "kernels.h"

#define PYMIG_CAT2(a, b) a##_##b
#define PYMIG_CAT(a, b) PYMIG_CAT2(a, b)
#define PYMIG_FN(name) PYMIG_CAT(name, PYMIG_SUFFIX)

/* Set bits of words [i, npages / 64) and of the partial last word. */
static inline uint64_t PYMIG_FN(count_from)(const uint64_t *bm, uint64_t npages, uint64_t i)
{
    uint64_t full = npages >> 6, total = 0;
    for (; i < full; i++) {
        if (i + 4 <= full && (bm[i] | bm[i + 1] | bm[i + 2] | bm[i + 3]) == 0) {
            i += 3; /* empty stretches of sparse bitmaps: four words per test */
            continue;
        }
        total += PYMIG_POPCOUNT(bm[i]);
    }
    if (npages & 63)
        total += PYMIG_POPCOUNT(bm[full] & pymig_bits_below(npages & 63));
    return total;
}

/* Run starts (set bits whose lower neighbour is clear) from word i on; carry is bit 63 of
 * word i - 1. */
static inline uint64_t PYMIG_FN(count_runs_from)(const uint64_t *bm, uint64_t npages,
                                                 uint64_t i, uint64_t carry)
{
    uint64_t full = npages >> 6, total = 0;
    for (; i < full; i++) {
        if (i + 4 <= full && (bm[i] | bm[i + 1] | bm[i + 2] | bm[i + 3]) == 0) {
            i += 3;
            carry = 0;
            continue;
        }
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

#ifndef PYMIG_CUSTOM_COUNTS
uint64_t PYMIG_FN(pymig_bitmap_count)(const uint64_t *bm, uint64_t npages)
{
    return PYMIG_FN(count_from)(bm, npages, 0);
}

uint64_t PYMIG_FN(pymig_bitmap_count_runs)(const uint64_t *bm, uint64_t npages)
{
    return PYMIG_FN(count_runs_from)(bm, npages, 0, 0);
}
#endif

/* Word i with the bits past npages cleared. */
static inline uint64_t PYMIG_FN(word)(const uint64_t *bm, uint64_t i, uint64_t nwords,
                                      uint64_t npages)
{
    return i + 1 < nwords ? bm[i] : bm[i] & pymig_word_mask(i, npages);
}

/*
 * Decoding a bitmap costs little per set bit; what costs is a mispredicted branch per word
 * ("is this word empty?", "one more bit?"), about as often taken as not at a few percent
 * density.  So the decoders work in blocks: first the positions of the non-zero words of a
 * block are gathered without a branch (the index is always stored, the count advances by
 * w != 0), then each non-zero word is decoded two entries at a time with unconditional
 * stores, and only words with more (or with a run reaching the next word) take a loop.
 * Stores past the final count land inside the caller's buffer: the fast path runs only
 * while there is room for them.
 */
#define PYMIG_BLOCK_WORDS 512

/* Walks the non-zero words of a bitmap a block at a time.  The last word is taken unmasked
 * here (bits past npages may make it look non-zero); the decoders mask it. */
typedef struct {
    const uint64_t *bm;
    uint64_t nwords, block, next_block, m, j;
    uint32_t offsets[PYMIG_BLOCK_WORDS];
} PYMIG_FN(nonzero_walk);

static inline void PYMIG_FN(walk_init)(PYMIG_FN(nonzero_walk) *walk, const uint64_t *bm,
                                       uint64_t nwords)
{
    walk->bm = bm;
    walk->nwords = nwords;
    walk->block = walk->next_block = walk->m = walk->j = 0;
}

/* The index of the next non-zero word in *i; 0 when there is none. */
static inline int PYMIG_FN(walk_next)(PYMIG_FN(nonzero_walk) *walk, uint64_t *i)
{
    while (walk->j == walk->m) {
        uint64_t first = walk->next_block, left = walk->nwords - first;
        if (first >= walk->nwords)
            return 0;
        uint64_t size = left < PYMIG_BLOCK_WORDS ? left : PYMIG_BLOCK_WORDS, m = 0;
        for (uint64_t k = 0; k < size; k++) {
            walk->offsets[m] = (uint32_t)k;
            m += walk->bm[first + k] != 0;
        }
        walk->block = first;
        walk->next_block = first + size;
        walk->m = m;
        walk->j = 0;
    }
    *i = walk->block + walk->offsets[walk->j++];
    return 1;
}

uint64_t PYMIG_FN(pymig_bitmap_indices)(const uint64_t *bm, uint64_t npages, int64_t *out,
                                        uint64_t cap)
{
    uint64_t nwords = pymig_words(npages), n = 0;
    int sparse = cap <= 2 * nwords; /* (cap is the caller's count) the two-at-a-time path pays */
    PYMIG_FN(nonzero_walk) walk;
    PYMIG_FN(walk_init)(&walk, bm, nwords);
    for (uint64_t i; PYMIG_FN(walk_next)(&walk, &i);) {
        uint64_t base = i << 6, w = PYMIG_FN(word)(bm, i, nwords, npages);
        if (w == ~UINT64_C(0) && cap - n >= 64) {
            for (uint64_t b = 0; b < 64; b++)
                out[n + b] = (int64_t)(base + b);
            n += 64;
            continue;
        }
        if (sparse && cap - n >= 2) {
            uint64_t w2 = w & (w - 1);
            out[n] = (int64_t)(base + PYMIG_TZ(w));
            out[n + 1] = (int64_t)(base + PYMIG_TZ(w2));
            n += (w != 0) + (w2 != 0);
            w = w2 & (w2 - 1);
        }
        for (; w; w &= w - 1) {
            if (n == cap)
                return n;
            out[n++] = (int64_t)(base + PYMIG_TZ(w));
        }
    }
    return n;
}

/* (start, length) pairs; a run ends at the first clear bit after its start, and the masked
 * last word makes every run stop at npages. */
uint64_t PYMIG_FN(pymig_bitmap_runs)(const uint64_t *bm, uint64_t npages, int64_t *out,
                                     uint64_t cap)
{
    uint64_t nwords = pymig_words(npages), n = 0;
    /* a run that crossed into later words was written whole: words below `resume` are done,
     * and of word `resume` only the bits in resume_mask are left */
    uint64_t resume = 0, resume_mask = ~UINT64_C(0);
    int sparse = cap <= 2 * nwords; /* (cap is the caller's count) the two-at-a-time path pays */
    PYMIG_FN(nonzero_walk) walk;
    PYMIG_FN(walk_init)(&walk, bm, nwords);
    for (uint64_t i; PYMIG_FN(walk_next)(&walk, &i);) {
        uint64_t base = i << 6;
        if (i < resume)
            continue;
        uint64_t w = PYMIG_FN(word)(bm, i, nwords, npages);
        if (i == resume)
            w &= resume_mask;
        if (sparse && cap - n >= 2) {
            /* the first two runs of the word, whatever it holds */
            uint64_t s1 = PYMIG_TZ(w), l1 = PYMIG_TZ(~(w >> (s1 & 63)));
            uint64_t w2 = pymig_bits_at_or_above(w, s1 + l1);
            uint64_t s2 = PYMIG_TZ(w2), l2 = PYMIG_TZ(~(w2 >> (s2 & 63)));
            out[2 * n] = (int64_t)(base + s1);
            out[2 * n + 1] = (int64_t)l1;
            out[2 * n + 2] = (int64_t)(base + s2);
            out[2 * n + 3] = (int64_t)l2;
            if ((pymig_bits_at_or_above(w2, s2 + l2) | (w >> 63)) == 0) {
                n += (w != 0) + (w2 != 0);
                continue;
            }
        }
        while (w) {  /* three runs or more, or one that goes on into the next word */
            if (n == cap)
                return n;
            unsigned bit = (unsigned)pymig_ctz64(w);
            uint64_t start = base + bit, inv = ~w & pymig_bits_from(bit);
            while (inv == 0) {
                if (++i >= nwords) {
                    out[2 * n] = (int64_t)start;
                    out[2 * n + 1] = (int64_t)(npages - start);
                    return n + 1;
                }
                w = PYMIG_FN(word)(bm, i, nwords, npages);
                inv = ~w;
                base = i << 6;
            }
            unsigned end = (unsigned)pymig_ctz64(inv);
            out[2 * n] = (int64_t)start;
            out[2 * n + 1] = (int64_t)(base + end - start);
            n++;
            w &= pymig_bits_from(end);
            resume = i;
            resume_mask = pymig_bits_from(end);
        }
    }
    return n;
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
