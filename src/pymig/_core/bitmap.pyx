# distutils: sources = src/pymig/_core/c/bitmap.c
# cython: boundscheck=False, wraparound=False
"""Dirty-bitmap kernels over KVM-layout uint64 bitmaps (bit i = page i).

Bits at index >= npages are ignored: never reported, never modified.
"""

import numpy as np

from pymig._coreshared import bitmap_arg, bitmap_words, count_arg

from cpython.pystate cimport PyThreadState
from libc.stdint cimport int64_t, uint64_t

from pymig._core.cpu cimport current_ops
from pymig._core.kernels cimport (NOGIL_MIN_PAGES, pymig_bitmap_find_next,
                                  pymig_bitmap_set_range, pymig_ops, reacquire_gil,
                                  release_gil_if)


def new_bitmap(npages) -> np.ndarray:
    """A zeroed bitmap for ``npages`` pages."""
    return np.zeros(bitmap_words(npages), dtype=np.uint64)


# Pointers into views the caller keeps alive for the whole call (the export pins the array);
# NULL for an empty bitmap (npages 0), which no kernel dereferences.
cdef inline const uint64_t *_ro(const uint64_t[::1] view) noexcept:
    return &view[0] if view.shape[0] else NULL


cdef inline uint64_t *_rw(uint64_t[::1] view) noexcept:
    return &view[0] if view.shape[0] else NULL


def bitmap_count(bm, npages) -> int:
    """Number of set bits below npages."""
    cdef uint64_t n = count_arg(npages, "npages")
    cdef const uint64_t[::1] view = bitmap_arg(bm, n)
    cdef const uint64_t *bits = _ro(view)
    cdef const pymig_ops *ops = current_ops()
    cdef PyThreadState *ts = release_gil_if(n >= NOGIL_MIN_PAGES)
    cdef uint64_t total = ops.bitmap_count(bits, n) if n else 0
    reacquire_gil(ts)
    return total


def bitmap_indices(bm, npages) -> np.ndarray:
    """Indices of the set bits below npages, ascending (int64)."""
    cdef uint64_t n = count_arg(npages, "npages")
    cdef const uint64_t[::1] view = bitmap_arg(bm, n)
    cdef const uint64_t *bits = _ro(view)
    cdef const pymig_ops *ops = current_ops()
    cdef PyThreadState *ts = release_gil_if(n >= NOGIL_MIN_PAGES)
    cdef uint64_t count = ops.bitmap_count(bits, n) if n else 0
    reacquire_gil(ts)
    result = np.empty(count, dtype=np.int64)
    if count == 0:
        return result
    cdef int64_t[::1] out = result
    cdef int64_t *dst = &out[0]
    ts = release_gil_if(n >= NOGIL_MIN_PAGES)
    cdef uint64_t filled = ops.bitmap_indices(bits, n, dst, count)
    reacquire_gil(ts)
    # fewer only if another thread cleared bits meanwhile; the result is then a snapshot
    return result if filled == count else result[:filled].copy()


def bitmap_runs(bm, npages) -> np.ndarray:
    """Maximal runs of set bits below npages as an (n, 2) int64 array of (start, length)."""
    cdef uint64_t n = count_arg(npages, "npages")
    cdef const uint64_t[::1] view = bitmap_arg(bm, n)
    cdef const uint64_t *bits = _ro(view)
    cdef const pymig_ops *ops = current_ops()
    cdef PyThreadState *ts = release_gil_if(n >= NOGIL_MIN_PAGES)
    cdef uint64_t count = ops.bitmap_count_runs(bits, n) if n else 0
    reacquire_gil(ts)
    result = np.empty((count, 2), dtype=np.int64)
    if count == 0:
        return result
    cdef int64_t[:, ::1] out = result
    cdef int64_t *dst = &out[0, 0]
    ts = release_gil_if(n >= NOGIL_MIN_PAGES)
    cdef uint64_t filled = ops.bitmap_runs(bits, n, dst, count)
    reacquire_gil(ts)
    return result if filled == count else result[:filled].copy()


def bitmap_merge(dst, src, npages) -> int:
    """dst |= src for the bits below npages; returns how many bits were newly set in dst."""
    cdef uint64_t n = count_arg(npages, "npages")
    cdef uint64_t[::1] dst_view = bitmap_arg(dst, n, "dst", writable=True)
    cdef const uint64_t[::1] src_view = bitmap_arg(src, n, "src")
    cdef uint64_t *d = _rw(dst_view)
    cdef const uint64_t *s = _ro(src_view)
    cdef const pymig_ops *ops = current_ops()
    cdef PyThreadState *ts = release_gil_if(n >= NOGIL_MIN_PAGES)
    cdef uint64_t added = ops.bitmap_merge(d, s, n) if n else 0
    reacquire_gil(ts)
    return added


def bitmap_find_next(bm, npages, start) -> int:
    """First set bit at or after ``start``, or npages when there is none."""
    cdef uint64_t n = count_arg(npages, "npages")
    cdef uint64_t first = count_arg(start, "start")
    cdef const uint64_t[::1] view = bitmap_arg(bm, n)
    cdef const uint64_t *bits = _ro(view)
    if first >= n:
        return n
    cdef PyThreadState *ts = release_gil_if(n - first >= NOGIL_MIN_PAGES)
    cdef uint64_t found = pymig_bitmap_find_next(bits, n, first)
    reacquire_gil(ts)
    return found


def bitmap_test_and_clear(bm, npages, start, count) -> int:
    """Clears bits [start, start + count) (clipped to npages); returns how many were set."""
    cdef uint64_t n = count_arg(npages, "npages")
    cdef uint64_t first = count_arg(start, "start")
    cdef uint64_t c = count_arg(count, "count")
    cdef uint64_t[::1] view = bitmap_arg(bm, n, writable=True)
    cdef uint64_t *bits = _rw(view)
    cdef const pymig_ops *ops = current_ops()
    if first >= n or c == 0:
        return 0
    cdef PyThreadState *ts = release_gil_if(c >= NOGIL_MIN_PAGES)
    cdef uint64_t cleared = ops.bitmap_test_and_clear(bits, n, first, c)
    reacquire_gil(ts)
    return cleared


def bitmap_set_range(bm, npages, start, count) -> None:
    """Sets bits [start, start + count); the range must lie within npages."""
    cdef uint64_t n = count_arg(npages, "npages")
    cdef uint64_t first = count_arg(start, "start")
    cdef uint64_t c = count_arg(count, "count")
    cdef uint64_t[::1] view = bitmap_arg(bm, n, writable=True)
    cdef uint64_t *bits = _rw(view)
    if first + c > n:
        raise ValueError(f"pages [{first}, {first + c}) are outside the bitmap's {n} pages")
    if c == 0:
        return
    cdef PyThreadState *ts = release_gil_if(c >= NOGIL_MIN_PAGES)
    pymig_bitmap_set_range(bits, first, c)
    reacquire_gil(ts)
