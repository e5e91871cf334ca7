/*
 * The vendored LZ4 block compressor (c/lz4/, LZ4 1.9.4, BSD 2-Clause) as a translation unit of
 * the packet module.  Its symbols stay hidden: python-lz4, loaded in the same process, exports
 * the same names from its own copy.
 */
#define LZ4_DISABLE_DEPRECATE_WARNINGS /* lz4.c defines its deprecated functions too */
/* the C library's declarations first, so that only LZ4's own symbols become hidden */
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__GNUC__)
#pragma GCC visibility push(hidden)
#endif
#include "lz4_local.h"
#include "lz4/lz4.c"
#if defined(__GNUC__)
#pragma GCC visibility pop
#endif
