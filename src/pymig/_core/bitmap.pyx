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


ctypedef uint64_t (*_count_fn)(const uint64_t *bm, uint64_t npages) noexcept nogil
ctypedef uint64_t (*_fill_fn)(const uint64_t *bm, uint64_t npages, int64_t *out,
                              uint64_t cap) noexcept nogil


cdef object _decode(bm, npages, _count_fn count, _fill_fn fill, Py_ssize_t width):
    """Count, allocate exactly, fill: ``width`` int64 values per item."""
    cdef uint64_t n = count_arg(npages, "npages")
    cdef const uint64_t[::1] view = bitmap_arg(bm, n)
    cdef const uint64_t *bits = _ro(view)
    cdef PyThreadState *ts = release_gil_if(n >= NOGIL_MIN_PAGES)
    cdef uint64_t items = count(bits, n) if n else 0
    reacquire_gil(ts)
    result = np.empty(items * width, dtype=np.int64)
    cdef uint64_t filled = 0
    cdef int64_t[::1] out = result
    if items:
        ts = release_gil_if(n >= NOGIL_MIN_PAGES)
        filled = fill(bits, n, &out[0], items)
        reacquire_gil(ts)
    if filled < items:  # another thread cleared bits meanwhile: a snapshot, exactly sized
        result = result[: filled * width].copy()
    return result if width == 1 else result.reshape(-1, width)


def bitmap_indices(bm, npages) -> np.ndarray:
    """Indices of the set bits below npages, ascending (int64)."""
    cdef const pymig_ops *ops = current_ops()
    return _decode(bm, npages, ops.bitmap_count, ops.bitmap_indices, 1)


def bitmap_runs(bm, npages) -> np.ndarray:
    """Maximal runs of set bits below npages as an (n, 2) int64 array of (start, length)."""
    cdef const pymig_ops *ops = current_ops()
    return _decode(bm, npages, ops.bitmap_count_runs, ops.bitmap_runs, 2)


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


cdef tuple _range_args(bm, npages, start, count):
    """(npages, start, count, bitmap) of the range kernels, checked for writing."""
    npages = count_arg(npages, "npages")
    return (npages, count_arg(start, "start"), count_arg(count, "count"),
            bitmap_arg(bm, npages, writable=True))


def bitmap_test_and_clear(bm, npages, start, count) -> int:
    """Clears bits [start, start + count) (clipped to npages); returns how many were set."""
    cdef uint64_t n, first, c
    n, first, c, array = _range_args(bm, npages, start, count)
    cdef uint64_t[::1] view = array
    cdef const pymig_ops *ops = current_ops()
    if first >= n or c == 0:
        return 0
    cdef PyThreadState *ts = release_gil_if(c >= NOGIL_MIN_PAGES)
    cdef uint64_t cleared = ops.bitmap_test_and_clear(&view[0], n, first, c)
    reacquire_gil(ts)
    return cleared


def bitmap_set_range(bm, npages, start, count) -> None:
    """Sets bits [start, start + count); the range must lie within npages."""
    cdef uint64_t n, first, c
    n, first, c, array = _range_args(bm, npages, start, count)
    cdef uint64_t[::1] view = array
    if first + c > n:
        raise ValueError(f"pages [{first}, {first + c}) are outside the bitmap's {n} pages")
    if c == 0:
        return
    cdef PyThreadState *ts = release_gil_if(c >= NOGIL_MIN_PAGES)
    pymig_bitmap_set_range(&view[0], first, c)
    reacquire_gil(ts)
