# distutils: sources = src/pymig/_core/c/pagehash.c
# cython: boundscheck=False, wraparound=False
"""Hashes of pages chosen by index: what a page-sampling dirty-rate measurement compares.

xxh3-64 with seed 0, the wire checksum's hash, through the SIMD variant in use.
"""

import numpy as np

from pymig._coreshared import byte_view, page_size_arg, pages_arg

from cpython.pystate cimport PyThreadState
from libc.stdint cimport int64_t, uint32_t, uint64_t

from pymig._core.cpu cimport current_ops
from pymig._core.kernels cimport (NOGIL_MIN_BYTES, pymig_ops, pymig_page_hashes,
                                  reacquire_gil, release_gil_if)


def page_hashes(mem, page_size, pages) -> np.ndarray:
    """For each page index in ``pages``: the xxh3-64 of that page of ``mem`` (uint64)."""
    cdef uint32_t ps = page_size_arg(page_size)
    cdef const unsigned char[::1] view = byte_view(mem, "mem")
    cdef uint64_t npages = view.shape[0] // ps
    cdef const int64_t[::1] index = pages_arg(pages, npages)
    cdef uint64_t count = index.shape[0], bad = 0
    result = np.zeros(count, dtype=np.uint64)
    if count == 0:
        return result
    cdef uint64_t[::1] out = result
    cdef const unsigned char *src = &view[0]
    cdef const int64_t *idx = &index[0]
    cdef uint64_t *dst = &out[0]
    cdef const pymig_ops *ops = current_ops()
    cdef PyThreadState *ts = release_gil_if(count * ps >= NOGIL_MIN_BYTES)
    cdef int rc = pymig_page_hashes(src, npages, ps, idx, count, dst, &bad, ops)
    reacquire_gil(ts)
    if rc:
        raise ValueError(f"pages[{bad}] changed while it was being read")
    return result
