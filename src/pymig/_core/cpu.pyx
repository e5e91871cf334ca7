# distutils: sources = src/pymig/_core/c/cpu.c src/pymig/_core/c/zeropage.c src/pymig/_core/c/zeropage_avx2.c src/pymig/_core/c/zeropage_avx512.c src/pymig/_core/c/bitmap.c src/pymig/_core/c/bitmap_avx2.c src/pymig/_core/c/packet_scalar.c src/pymig/_core/c/packet_avx2.c
"""Runtime SIMD dispatch: which kernel variant runs, chosen once at import.

The first variant of ``avx512``, ``avx2``, ``scalar`` that the CPU and OS support and that
``PYMIG_DISABLE_SIMD`` (``avx512,avx2`` or ``all``) does not name is used by every kernel of
:mod:`pymig._core`.  :func:`cpu_info` says which; ``_set_variant`` lets tests run every
available variant in turn.
"""

import os

from pymig._coreshared import SIMD_VARIANTS, byte_view, disabled_variants

from cpython.pystate cimport PyThreadState
from libc.stdint cimport uint64_t

from pymig._core.kernels cimport (NOGIL_MIN_BYTES, PYMIG_NVARIANTS, pymig_ops,
                                  pymig_variant_ops, pymig_variant_supported, reacquire_gil,
                                  release_gil_if)

cdef const pymig_ops *_ops = NULL
cdef int _variant = -1
_disabled = disabled_variants(os.environ.get("PYMIG_DISABLE_SIMD"))

assert len(SIMD_VARIANTS) == PYMIG_NVARIANTS
for _i, _name in enumerate(SIMD_VARIANTS):
    assert pymig_variant_ops(_i) == NULL or pymig_variant_ops(_i).name.decode() == _name


cdef const pymig_ops *current_ops() noexcept nogil:
    return _ops


def _available() -> list:
    """Variants compiled in and supported by this CPU and OS, in preference order."""
    return [name for i, name in enumerate(SIMD_VARIANTS)
            if pymig_variant_ops(i) != NULL and pymig_variant_supported(i)]


def cpu_info() -> dict:
    """The variant in use, those this machine can run, and those PYMIG_DISABLE_SIMD turned off."""
    return {"variant": SIMD_VARIANTS[_variant], "available": _available(),
            "disabled": list(_disabled), "backend": "compiled"}


def _set_variant(str name) -> None:
    """Switch every kernel to variant ``name`` (tests and benchmarks only; not thread-safe
    against kernels running at the same moment)."""
    global _ops, _variant
    if name not in _available():
        raise ValueError(f"SIMD variant {name!r} is not available here "
                         f"(available: {', '.join(_available())})")
    if name in _disabled:
        raise ValueError(f"SIMD variant {name!r} is disabled by PYMIG_DISABLE_SIMD")
    _variant = SIMD_VARIANTS.index(name)
    _ops = pymig_variant_ops(_variant)


def _read_sum(buf) -> int:
    """Sum of ``buf`` as u64 words: a pure read pass with the current variant, the ceiling the
    zero-page scan is measured against."""
    cdef const unsigned char[::1] view = byte_view(buf, "buf")
    cdef size_t n = view.shape[0]
    if n == 0:
        return 0
    cdef const unsigned char *p = &view[0]
    cdef PyThreadState *ts = release_gil_if(n >= NOGIL_MIN_BYTES)
    cdef uint64_t total = _ops.read_sum(p, n)
    reacquire_gil(ts)
    return total


_set_variant(next(name for name in _available() if name not in _disabled))
