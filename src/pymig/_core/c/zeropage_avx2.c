/*
 * AVX2 zero detection and read pass (variant "avx2"), chosen at run time by cpu.c.
 */
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TARGET_AVX2 __attribute__((target("avx2")))

/* OR of eight 32-byte loads: one test and one branch per 256 bytes keeps the loop at memory
 * speed while still stopping early on data. */
TARGET_AVX2 static inline __m256i or256(const unsigned char *p)
{
    const __m256i *q = (const __m256i *)p;
    __m256i a = _mm256_or_si256(_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1));
    __m256i b = _mm256_or_si256(_mm256_loadu_si256(q + 2), _mm256_loadu_si256(q + 3));
    __m256i c = _mm256_or_si256(_mm256_loadu_si256(q + 4), _mm256_loadu_si256(q + 5));
    __m256i d = _mm256_or_si256(_mm256_loadu_si256(q + 6), _mm256_loadu_si256(q + 7));
    return _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
}

TARGET_AVX2 int pymig_is_zero_avx2(const unsigned char *buf, size_t len_bytes)
{
    if (len_bytes < 256)
        return pymig_is_zero_scalar(buf, len_bytes);
    const unsigned char *end = buf + len_bytes;
    __m256i v = _mm256_loadu_si256((const __m256i *)buf);
    if (!_mm256_testz_si256(v, v))
        return 0;
    /* continue from the next 32-byte boundary so the bulk loads never split a cache line */
    const unsigned char *p = (const unsigned char *)(((uintptr_t)buf + 32) & ~(uintptr_t)31);
    for (; p + 256 <= end; p += 256) {
        v = or256(p);
        if (!_mm256_testz_si256(v, v))
            return 0;
    }
    if (p < end) {
        v = or256(end - 256); /* overlaps bytes already known to be zero */
        return _mm256_testz_si256(v, v);
    }
    return 1;
}

TARGET_AVX2 uint64_t pymig_read_sum_avx2(const unsigned char *buf, size_t len_bytes)
{
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 128 <= len_bytes; i += 128) {
        const __m256i *q = (const __m256i *)(buf + i);
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256(q));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256(q + 1));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256(q + 2));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256(q + 3));
    }
    __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, s);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3] +
           pymig_read_sum_scalar(buf + i, len_bytes - i);
}
#endif
