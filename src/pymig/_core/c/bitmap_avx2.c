/*
 * Bitmap kernels for the "avx2" variant (and "avx512", whose CPUs have the same scalar
 * extensions): compiled for POPCNT, BMI1/2 and AVX2, chosen at run time by cpu.c.  Only
 * dispatch files like this one may carry target attributes.
 */
#include "kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("popcnt,bmi,bmi2,avx2")

#define PYMIG_SUFFIX avx2
#define PYMIG_POPCOUNT(w) ((uint64_t)__builtin_popcountll(w))
#include "bitmap_impl.h"

#pragma GCC pop_options
#endif
