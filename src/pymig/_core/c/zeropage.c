/*
 * Zero-page detection: the portable kernels and the per-page drivers.
 *
 * A page holding data almost always has a non-zero byte near its start, so every variant
 * tests the first bytes alone before streaming through the rest in blocks with one branch per
 * block: a non-zero page costs about one cache line, an all-zero page one full read.
 */
#include "kernels.h"
#include "bitops.h"

int pymig_is_zero_scalar(const unsigned char *buf, size_t len_bytes)
{
    const unsigned char *p = buf, *end = buf + len_bytes;
    if (len_bytes < 64) {
        for (; p + 8 <= end; p += 8)
            if (pymig_load64(p))
                return 0;
        for (; p < end; p++)
            if (*p)
                return 0;
        return 1;
    }
    if (pymig_load64(p))
        return 0;
    /* after the first word, continue from the next 8-byte boundary (already covered) */
    p = (const unsigned char *)(((uintptr_t)p + 8) & ~(uintptr_t)7);
    for (; p + 64 <= end; p += 64) {
        uint64_t acc = (pymig_load64(p) | pymig_load64(p + 8)) |
                       (pymig_load64(p + 16) | pymig_load64(p + 24)) |
                       (pymig_load64(p + 32) | pymig_load64(p + 40)) |
                       (pymig_load64(p + 48) | pymig_load64(p + 56));
        if (acc)
            return 0;
    }
    if (p < end) {
        /* the last 64 bytes, overlapping bytes already known to be zero */
        const unsigned char *q = end - 64;
        uint64_t acc = 0;
        for (int k = 0; k < 64; k += 8)
            acc |= pymig_load64(q + k);
        return acc == 0;
    }
    return 1;
}

uint64_t pymig_read_sum_scalar(const unsigned char *buf, size_t len_bytes)
{
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 32 <= len_bytes; i += 32) {
        s0 += pymig_load64(buf + i);
        s1 += pymig_load64(buf + i + 8);
        s2 += pymig_load64(buf + i + 16);
        s3 += pymig_load64(buf + i + 24);
    }
    for (; i < len_bytes; i++)
        s0 += buf[i];
    return s0 + s1 + s2 + s3;
}

int pymig_zero_pages(const unsigned char *mem, uint64_t npages, uint32_t page_size,
                     const int64_t *pages, uint64_t count, unsigned char *out, uint64_t *bad,
                     const pymig_ops *ops)
{
    for (uint64_t i = 0; i < count; i++) {
        int64_t page = pages[i];
        /* checked again here: the index array is caller memory another thread could change */
        if (page < 0 || (uint64_t)page >= npages) {
            *bad = i;
            return -34; /* ERANGE */
        }
        out[i] = (unsigned char)ops->is_zero(mem + (uint64_t)page * page_size, page_size);
    }
    return 0;
}

void pymig_zero_bitmap(const unsigned char *mem, uint32_t page_size, const uint64_t *bm,
                       uint64_t npages, uint64_t *out, const pymig_ops *ops)
{
    for (uint64_t page = pymig_next_set(bm, npages, 0); page < npages;
         page = pymig_next_set(bm, npages, page + 1)) {
        if (ops->is_zero(mem + page * page_size, page_size))
            out[page >> 6] |= UINT64_C(1) << (page & 63);
    }
}
