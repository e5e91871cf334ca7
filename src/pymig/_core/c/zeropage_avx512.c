/*
 * AVX-512 zero detection and read pass (variant "avx512"), chosen at run time by cpu.c only
 * where the CPU has AVX512F/BW and the OS saves the ZMM state.
 */
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw")))

TARGET_AVX512 static inline __m512i or256(const unsigned char *p)
{
    const __m512i *q = (const __m512i *)p;
    __m512i a = _mm512_or_si512(_mm512_loadu_si512(q), _mm512_loadu_si512(q + 1));
    __m512i b = _mm512_or_si512(_mm512_loadu_si512(q + 2), _mm512_loadu_si512(q + 3));
    return _mm512_or_si512(a, b);
}

TARGET_AVX512 static inline int zero512(__m512i v)
{
    return _mm512_test_epi64_mask(v, v) == 0;
}

TARGET_AVX512 int pymig_is_zero_avx512(const unsigned char *buf, size_t len_bytes)
{
    if (len_bytes < 256)
        return pymig_is_zero_scalar(buf, len_bytes);
    const unsigned char *end = buf + len_bytes;
    if (!zero512(_mm512_loadu_si512((const void *)buf)))
        return 0;
    const unsigned char *p = (const unsigned char *)(((uintptr_t)buf + 64) & ~(uintptr_t)63);
    for (; p + 256 <= end; p += 256)
        if (!zero512(or256(p)))
            return 0;
    if (p < end)
        return zero512(or256(end - 256));
    return 1;
}

TARGET_AVX512 uint64_t pymig_read_sum_avx512(const unsigned char *buf, size_t len_bytes)
{
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 256 <= len_bytes; i += 256) {
        const __m512i *q = (const __m512i *)(buf + i);
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(q));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(q + 1));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(q + 2));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(q + 3));
    }
    __m512i s = _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3));
    return (uint64_t)_mm512_reduce_add_epi64(s) + pymig_read_sum_scalar(buf + i, len_bytes - i);
}
#endif
