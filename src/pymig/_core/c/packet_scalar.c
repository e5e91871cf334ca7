/*
 * The portable packet helpers (variant "scalar"): xxh3 streaming with xxHash's compile-time
 * choice (SSE2 on x86-64, NEON on aarch64) and a plain memcpy into guest memory.
 */
#include <string.h>

#include "kernels.h"

#define XXH_INLINE_ALL
#include "xxhash/xxhash.h"

void pymig_xxh3_update_scalar(void *state, const unsigned char *buf, size_t len_bytes)
{
    XXH3_64bits_update((XXH3_state_t *)state, buf, len_bytes);
}

void pymig_copy_to_guest_scalar(unsigned char *dst, const unsigned char *src, size_t len_bytes)
{
    memcpy(dst, src, len_bytes);
}
