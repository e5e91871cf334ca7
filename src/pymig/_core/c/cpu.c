/*
 * Which SIMD variants this CPU can run, and the kernel table of each.
 *
 * A variant needs the instructions (cpuid) and the OS saving the wider registers on context
 * switches (OSXSAVE, then the XCR0 bits read with xgetbv): a CPU with AVX2 under a kernel
 * that does not enable the YMM state must take the portable path.
 */
#include "kernels.h"

#if defined(__x86_64__)
#include <cpuid.h>

#define XCR0_SSE_AVX 0x06u        /* XMM and YMM state */
#define XCR0_AVX512 0xe0u         /* opmask, ZMM_Hi256, Hi16_ZMM state */

static uint64_t read_xcr0(void)
{
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

static int detect(int variant)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    if (!(c & bit_OSXSAVE) || !(c & bit_AVX) || !(c & bit_POPCNT))
        return 0;
    uint64_t xcr0 = read_xcr0();
    if ((xcr0 & XCR0_SSE_AVX) != XCR0_SSE_AVX)
        return 0;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b & bit_AVX2) && (b & bit_BMI) && (b & bit_BMI2);
    if (variant == PYMIG_VARIANT_AVX2)
        return avx2;
    return avx2 && (b & bit_AVX512F) && (b & bit_AVX512BW) &&
           (xcr0 & XCR0_AVX512) == XCR0_AVX512;
}

static const pymig_ops avx512_ops = {
    "avx512", pymig_is_zero_avx512, pymig_read_sum_avx512,
    pymig_bitmap_count_avx2, pymig_bitmap_count_runs_avx2, pymig_bitmap_indices_avx2,
    pymig_bitmap_runs_avx2, pymig_bitmap_merge_avx2, pymig_bitmap_test_and_clear_avx2,
    pymig_xxh3_update_avx2, pymig_copy_to_guest_avx2,
};

static const pymig_ops avx2_ops = {
    "avx2", pymig_is_zero_avx2, pymig_read_sum_avx2,
    pymig_bitmap_count_avx2, pymig_bitmap_count_runs_avx2, pymig_bitmap_indices_avx2,
    pymig_bitmap_runs_avx2, pymig_bitmap_merge_avx2, pymig_bitmap_test_and_clear_avx2,
    pymig_xxh3_update_avx2, pymig_copy_to_guest_avx2,
};
#endif

static const pymig_ops scalar_ops = {
    "scalar", pymig_is_zero_scalar, pymig_read_sum_scalar,
    pymig_bitmap_count_scalar, pymig_bitmap_count_runs_scalar, pymig_bitmap_indices_scalar,
    pymig_bitmap_runs_scalar, pymig_bitmap_merge_scalar, pymig_bitmap_test_and_clear_scalar,
    pymig_xxh3_update_scalar, pymig_copy_to_guest_scalar,
};

const pymig_ops *pymig_variant_ops(int variant)
{
    switch (variant) {
#if defined(__x86_64__)
    case PYMIG_VARIANT_AVX512:
        return &avx512_ops;
    case PYMIG_VARIANT_AVX2:
        return &avx2_ops;
#endif
    case PYMIG_VARIANT_SCALAR:
        return &scalar_ops;
    default:
        return NULL;
    }
}

int pymig_variant_supported(int variant)
{
    if (variant == PYMIG_VARIANT_SCALAR)
        return 1;
#if defined(__x86_64__)
    if (variant == PYMIG_VARIANT_AVX2 || variant == PYMIG_VARIANT_AVX512)
        return detect(variant);
#endif
    return 0;
}
