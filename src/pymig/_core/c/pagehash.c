/*
 * Hashes of chosen pages: the page-sampling dirty-rate measurement hashes the same few hundred
 * pages per GiB again and again, and compares each hash with the previous one (QEMU's
 * page-sampling mode, which hashes each sampled page at the start and at the end).
 *
 * A page is hashed as it is at the moment it is read: the guest may be writing it meanwhile,
 * and a torn read only makes the hash differ, which is what a write does anyway.
 */
#include <errno.h>

#include "kernels.h"

#define XXH_INLINE_ALL
#include "xxhash/xxhash.h"

int pymig_page_hashes(const unsigned char *mem, uint64_t npages, uint32_t page_size,
                      const int64_t *pages, uint64_t count, uint64_t *out, uint64_t *bad,
                      const pymig_ops *ops)
{
    for (uint64_t i = 0; i < count; i++) {
        int64_t page = pages[i];
        /* checked again here: the index array is caller memory another thread could change */
        if (page < 0 || (uint64_t)page >= npages) {
            *bad = i;
            return -ERANGE;
        }
        XXH3_state_t state;
        XXH3_64bits_reset(&state);
        ops->xxh3_update(&state, mem + (uint64_t)page * page_size, page_size);
        out[i] = XXH3_64bits_digest(&state);
    }
    return 0;
}
