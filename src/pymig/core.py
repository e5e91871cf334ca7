"""The page core: dirty bitmaps, zero pages, page hashes and RAM packets, over whole buffers.

The backend is chosen once, at import: the compiled kernels of :mod:`pymig._core` (SIMD
variant chosen at import too, see :func:`cpu_info`), or with ``PYMIG_PUREPYTHON=1`` their
readable twins in :mod:`pymig._reference`.  Both give identical results and raise identical
exceptions; :data:`backend` says which one is in use.

Bitmaps are 1-D C-contiguous numpy uint64 arrays in KVM's layout (bit i = page i); bits at
index >= npages are ignored.  Buffers (guest memory, packets) are any C-contiguous buffer:
numpy arrays, mmap objects, bytes/bytearray, memoryviews.  The packet format is described in
docs/stream-format.md, "RAM packets".
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

from pymig._coreshared import (PACKET_HEADER_BYTES, PAGE_SIZE, RUN_COMPRESSED, RUN_DELTA,
                               RUN_HEADER_BYTES, RUN_NORMAL, RUN_ZERO, DecodeResult,
                               EncodeResult, PacketInfo, bitmap_words, new_compress_state)

API = (
    "cpu_info", "new_bitmap", "bitmap_count", "bitmap_indices", "bitmap_runs", "bitmap_merge",
    "bitmap_find_next", "bitmap_test_and_clear", "bitmap_set_range", "is_zero", "zero_pages",
    "zero_bitmap", "page_hashes", "encode_packet", "packet_info", "decode_packet",
    "packet_runs",
)
_COMPILED_MODULES = ("cpu", "bitmap", "zeropage", "pagehash", "packet")


def load_backend(name: str) -> SimpleNamespace:
    """The kernel functions of backend ``name`` ("compiled" or "reference") as a namespace.

    :mod:`pymig.core` exposes one of them; tests load both to compare them.  Raises
    ImportError for "compiled" when the extension modules have not been built.
    """
    if name == "reference":
        module = importlib.import_module("pymig._reference")
        return SimpleNamespace(backend=name, **{fn: getattr(module, fn) for fn in API})
    if name != "compiled":
        raise ValueError(f"unknown backend {name!r} (use 'compiled' or 'reference')")
    functions = {}
    try:
        for module_name in _COMPILED_MODULES:
            module = importlib.import_module(f"pymig._core.{module_name}")
            functions.update({fn: getattr(module, fn) for fn in API if hasattr(module, fn)})
    except ImportError as exc:
        raise ImportError(
            f"pymig's compiled core is not built ({exc}); run `python setup.py build_ext "
            f"--inplace`, or set PYMIG_PUREPYTHON=1 for the pure-Python reference") from exc
    return SimpleNamespace(backend=name, **functions)


_api = load_backend("reference" if os.environ.get("PYMIG_PUREPYTHON") == "1" else "compiled")

backend: str = _api.backend
cpu_info = _api.cpu_info
new_bitmap = _api.new_bitmap
bitmap_count = _api.bitmap_count
bitmap_indices = _api.bitmap_indices
bitmap_runs = _api.bitmap_runs
bitmap_merge = _api.bitmap_merge
bitmap_find_next = _api.bitmap_find_next
bitmap_test_and_clear = _api.bitmap_test_and_clear
bitmap_set_range = _api.bitmap_set_range
is_zero = _api.is_zero
zero_pages = _api.zero_pages
zero_bitmap = _api.zero_bitmap
page_hashes = _api.page_hashes
encode_packet = _api.encode_packet
packet_info = _api.packet_info
decode_packet = _api.decode_packet
packet_runs = _api.packet_runs

__all__ = [
    "backend", "PAGE_SIZE", "PACKET_HEADER_BYTES", "RUN_HEADER_BYTES", "RUN_NORMAL",
    "RUN_ZERO", "RUN_COMPRESSED", "RUN_DELTA", "EncodeResult", "DecodeResult", "PacketInfo",
    "bitmap_words", "new_compress_state", "load_backend", *API,
]
