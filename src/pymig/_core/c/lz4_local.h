/* How pymig includes the vendored LZ4 (c/lz4/): with hidden symbols, see lz4_unit.c. */
#ifndef PYMIG_LZ4_LOCAL_H
#define PYMIG_LZ4_LOCAL_H
#if defined(__GNUC__)
#define LZ4LIB_VISIBILITY __attribute__((visibility("hidden")))
#endif
#include "lz4/lz4.h"
#endif
