# distutils: sources = src/pymig/_core/c/zeropage.c
# cython: boundscheck=False, wraparound=False
"""Zero-page detection over whole buffers, pages chosen by index list or bitmap.

Each page test stops at the first non-zero block, so pages with data cost about one cache line
and all-zero pages one read at memory speed.
"""

import numpy as np

from pymig._coreshared import (bitmap_arg, bitmap_words, byte_view, count_arg, memory_arg,
                               page_size_arg, pages_arg)

from cpython.pystate cimport PyThreadState
from libc.stdint cimport int64_t, uint32_t, uint64_t

from pymig._core.cpu cimport current_ops
from pymig._core.kernels cimport (NOGIL_MIN_BYTES, pymig_ops, pymig_zero_bitmap,
                                  pymig_zero_pages, reacquire_gil, release_gil_if)


def is_zero(buf) -> bool:
    """True if every byte of ``buf`` (any C-contiguous buffer) is zero."""
    cdef const unsigned char[::1] view = byte_view(buf, "buf")
    cdef size_t n = view.shape[0]
    if n == 0:
        return True
    cdef const unsigned char *p = &view[0]
    cdef const pymig_ops *ops = current_ops()
    cdef PyThreadState *ts = release_gil_if(n >= NOGIL_MIN_BYTES)
    cdef int zero = ops.is_zero(p, n)
    reacquire_gil(ts)
    return zero != 0


def zero_pages(mem, page_size, pages) -> np.ndarray:
    """For each page index in ``pages``: True if that page of ``mem`` is all zero."""
    cdef uint32_t ps = page_size_arg(page_size)
    cdef const unsigned char[::1] view = byte_view(mem, "mem")
    cdef uint64_t npages = view.shape[0] // ps
    cdef const int64_t[::1] index = pages_arg(pages, npages)
    cdef uint64_t count = index.shape[0], bad = 0
    result = np.zeros(count, dtype=np.bool_)
    if count == 0:
        return result
    cdef unsigned char[::1] out = result.view(np.uint8)
    cdef const unsigned char *src = &view[0]
    cdef const int64_t *idx = &index[0]
    cdef unsigned char *dst = &out[0]
    cdef const pymig_ops *ops = current_ops()
    cdef PyThreadState *ts = release_gil_if(count * ps >= NOGIL_MIN_BYTES)
    cdef int rc = pymig_zero_pages(src, npages, ps, idx, count, dst, &bad, ops)
    reacquire_gil(ts)
    if rc:
        raise ValueError(f"pages[{bad}] changed while it was being read")
    return result


def zero_bitmap(mem, page_size, bm, npages) -> np.ndarray:
    """Bitmap of the pages set in ``bm`` (below npages) whose contents are all zero."""
    cdef uint32_t ps = page_size_arg(page_size)
    cdef uint64_t n = count_arg(npages, "npages")
    cdef const unsigned char[::1] view = memory_arg(mem, ps, n)
    cdef const uint64_t[::1] dirty = bitmap_arg(bm, n)
    result = np.zeros(bitmap_words(n), dtype=np.uint64)
    if n == 0:
        return result
    cdef uint64_t[::1] out = result
    cdef const unsigned char *src = &view[0]
    cdef const uint64_t *bits = &dirty[0]
    cdef uint64_t *dst = &out[0]
    cdef const pymig_ops *ops = current_ops()
    cdef PyThreadState *ts = release_gil_if(n * ps >= NOGIL_MIN_BYTES)
    pymig_zero_bitmap(src, ps, bits, n, dst, ops)
    reacquire_gil(ts)
    return result
