/*
 * AVX2 packet helpers (variants "avx2" and "avx512"), chosen at run time by cpu.c.
 *
 * xxh3: xxHash's own AVX2 accumulate and scramble stages (the ones its x86 dispatcher uses),
 * driving the same XXH3_state_t as the portable code, so states and digests mix freely and
 * the hash value is the same whichever stage ran.
 *
 * Copies into guest memory use non-temporal stores: the destination is not read again soon,
 * and ordinary stores would first read every destination line from DRAM (write-allocate),
 * doubling the memory traffic of a decode.
 */
#include <string.h>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TARGET_AVX2 __attribute__((target("avx2")))
#define XXH_INLINE_ALL
#define XXH_DISPATCH_AVX2 1
#define XXH_TARGET_AVX2 TARGET_AVX2
#include "xxhash/xxhash.h"

/* Copies shorter than this stay in the cache: a few pages are likely read again soon. */
#define STREAM_MIN_BYTES (64u * 1024u)

TARGET_AVX2 void pymig_xxh3_update_avx2(void *state, const unsigned char *buf, size_t len_bytes)
{
    XXH3_update((XXH3_state_t *)state, buf, len_bytes, XXH3_accumulate_avx2,
                XXH3_scrambleAcc_avx2);
}

TARGET_AVX2 void pymig_copy_to_guest_avx2(unsigned char *dst, const unsigned char *src,
                                          size_t len_bytes)
{
    if (len_bytes < STREAM_MIN_BYTES) {
        memcpy(dst, src, len_bytes);
        return;
    }
    /* ordinary stores up to the first 32-byte boundary of dst, then streaming stores */
    size_t head = (size_t)(-(uintptr_t)dst & 31);
    memcpy(dst, src, head);
    unsigned char *d = dst + head;
    const unsigned char *s = src + head;
    size_t n = len_bytes - head;
    for (; n >= 128; n -= 128, d += 128, s += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)s);
        __m256i b = _mm256_loadu_si256((const __m256i *)(s + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(s + 64));
        __m256i e = _mm256_loadu_si256((const __m256i *)(s + 96));
        _mm256_stream_si256((__m256i *)d, a);
        _mm256_stream_si256((__m256i *)(d + 32), b);
        _mm256_stream_si256((__m256i *)(d + 64), c);
        _mm256_stream_si256((__m256i *)(d + 96), e);
    }
    memcpy(d, s, n);
    _mm_sfence(); /* streaming stores are weakly ordered: publish them before returning */
}
#endif
