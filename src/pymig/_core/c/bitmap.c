/*
 * Portable bitmap kernels (the "scalar" variant) and the ones that need no variant.
 */
#include "kernels.h"
#include "bitops.h"

/* Plain x86-64 has no POPCNT instruction and __builtin_popcountll would call libgcc per word;
 * the SWAR count is a dozen register operations. */
static inline uint64_t swar_popcount(uint64_t w)
{
    w = w - ((w >> 1) & UINT64_C(0x5555555555555555));
    w = (w & UINT64_C(0x3333333333333333)) + ((w >> 2) & UINT64_C(0x3333333333333333));
    w = (w + (w >> 4)) & UINT64_C(0x0f0f0f0f0f0f0f0f);
    return (w * UINT64_C(0x0101010101010101)) >> 56;
}

#define PYMIG_SUFFIX scalar
#define PYMIG_POPCOUNT swar_popcount
#define PYMIG_TZ pymig_tz64
#include "bitmap_impl.h"

uint64_t pymig_bitmap_find_next(const uint64_t *bm, uint64_t npages, uint64_t start)
{
    return pymig_next_set(bm, npages, start);
}

void pymig_bitmap_set_range(uint64_t *bm, uint64_t start, uint64_t count)
{
    pymig_set_range(bm, start, count);
}
