"""What both backends of :mod:`pymig.core` share: constants, result types, argument checks,
SIMD variant names and the wording of packet errors.

Both the compiled modules (``pymig._core.*``) and the reference (``pymig._reference``) check
their arguments with the functions here, so a bad argument raises the same exception in both,
and a bad packet is described by the same :class:`PacketFault` and the same text.
"""

from __future__ import annotations

import operator
import warnings
from collections import namedtuple
from enum import IntEnum

import numpy as np

from pymig.errors import PacketError

PAGE_SIZE = 4096
MAX_PAGE_SIZE = 1 << 30
PACKET_HEADER_BYTES = 32
RUN_HEADER_BYTES = 16
PACKET_MAGIC = b"PMGP"
PACKET_VERSION = 2
RUN_NORMAL = 1
RUN_ZERO = 2
RUN_COMPRESSED = 3  # an LZ4 block of the run's pages
RUN_DELTA = 4  # reserved for a later version; refused as an unknown kind
MAX_RUN_PAGES = 0xFFFF_FFFF  # page_count is a u32
COMPRESSED_HEADER_BYTES = 8  # after a COMPRESSED run's record: u32 data length, u32 reserved
COMPRESS_UNIT_BYTES = 64 * 1024  # the encoder compresses runs of at most this many bytes
MAX_COMPRESSED_RUN_BYTES = 1 << 30  # the decoder refuses compressed runs larger than this

EncodeResult = namedtuple(
    "EncodeResult", "nbytes cursor normal_pages zero_pages runs compressed_pages")
EncodeResult.__doc__ = """One encode_packet call: bytes written (0 = nothing dirty at or after
the cursor), where the next call resumes, and what the packet holds (``normal_pages`` counts
every page sent with its data, ``compressed_pages`` the part of them in COMPRESSED runs)."""
DecodeResult = namedtuple("DecodeResult", "normal_pages zero_pages runs compressed_pages")
DecodeResult.__doc__ = "What one decode_packet call applied."


def new_compress_state() -> np.ndarray:
    """The state encode_packet keeps between packets when it compresses: ``[units to copy
    without trying, failures in a row]`` (see kernels.h, pymig_compress_state)."""
    return np.zeros(2, dtype=np.uint32)


def compress_bound(total: int) -> int:
    """The most LZ4 block bytes ``total`` bytes can need (LZ4_COMPRESSBOUND)."""
    return total + total // 255 + 16
PacketInfo = namedtuple(
    "PacketInfo", "version block_id page_size record_count payload_len checksum nbytes")
PacketInfo.__doc__ = """The checked 32-byte header of a packet; ``nbytes`` = header + payload,
the number of bytes a receiver must read for the whole packet."""

# ------------------------------------------------------------------------- SIMD variants

SIMD_VARIANTS = ("avx512", "avx2", "scalar")  # preference order; matches kernels.h
_SIMD_OPTIONAL = SIMD_VARIANTS[:-1]  # "scalar" is always there and cannot be disabled


def disabled_variants(value: str | None) -> list[str]:
    """Variants named by ``PYMIG_DISABLE_SIMD`` (comma separated, or ``all``), in preference
    order.  Unknown names are reported with a warning rather than silently ignored."""
    disabled: set[str] = set()
    for name in (value or "").replace(" ", "").lower().split(","):
        if not name:
            continue
        if name == "all":
            disabled.update(_SIMD_OPTIONAL)
        elif name in _SIMD_OPTIONAL:
            disabled.add(name)
        elif name == SIMD_VARIANTS[-1]:
            warnings.warn("PYMIG_DISABLE_SIMD: the portable 'scalar' variant cannot be "
                          "disabled", RuntimeWarning, stacklevel=2)
        else:
            warnings.warn(f"PYMIG_DISABLE_SIMD: unknown variant {name!r} ignored "
                          f"(known: {', '.join(_SIMD_OPTIONAL)}, all)", RuntimeWarning,
                          stacklevel=2)
    return [name for name in _SIMD_OPTIONAL if name in disabled]

# ------------------------------------------------------------------------ packet errors


class PacketFault(IntEnum):
    """Why a packet was refused; the numbers are those of ``enum pymig_packet_fault``."""

    HEADER_TRUNCATED = 1
    MAGIC = 2
    VERSION = 3
    FLAGS = 4
    PAGE_SIZE = 5
    RECORD_COUNT = 6
    BLOCK = 7
    PAGE_SIZE_MISMATCH = 8
    LENGTH = 9
    RUN_TRUNCATED = 10
    RUN_EMPTY = 11
    RUN_KIND = 12
    RUN_RESERVED = 13
    RUN_RANGE = 14
    RUN_ORDER = 15
    RUN_DATA = 16
    TRAILING = 17
    CHECKSUM = 18
    RUN_COMPRESSED_SIZE = 19
    RUN_DECOMPRESS = 20


_REASONS = {
    PacketFault.HEADER_TRUNCATED: lambda n, *_: f"packet header truncated: {n} of "
                                                f"{PACKET_HEADER_BYTES} bytes",
    PacketFault.MAGIC: lambda m, *_: f"bad magic {m.to_bytes(4, 'little')!r} "
                                     f"(expected {PACKET_MAGIC!r})",
    PacketFault.VERSION: lambda v, *_: f"unsupported packet version {v} (this build reads "
                                       f"version {PACKET_VERSION})",
    PacketFault.FLAGS: lambda f, *_: f"unknown packet flags {f:#06x} (version "
                                     f"{PACKET_VERSION} defines none)",
    PacketFault.PAGE_SIZE: lambda ps, *_: f"page size {ps} is not a power of two in "
                                          f"[512, {MAX_PAGE_SIZE}]",
    PacketFault.RECORD_COUNT: lambda n, p, *_: f"{n} run records cannot fit in a {p}-byte "
                                               f"payload",
    PacketFault.BLOCK: lambda b, e, *_: f"packet is for block {b}, expected block {e}",
    PacketFault.PAGE_SIZE_MISMATCH: lambda ps, e, *_: f"packet page size {ps}, expected {e}",
    PacketFault.LENGTH: lambda p, n, *_: f"header declares a {p}-byte payload but {n} bytes "
                                         f"follow the header",
    PacketFault.RUN_TRUNCATED: lambda r, n, *_: f"run {r}: record truncated ({n} of "
                                                f"{RUN_HEADER_BYTES} bytes left in the payload)",
    PacketFault.RUN_EMPTY: lambda r, *_: f"run {r} has no pages",
    PacketFault.RUN_KIND: lambda r, k, *_: f"run {r}: unknown run kind {k}",
    PacketFault.RUN_RESERVED: lambda r, *_: f"run {r}: reserved bytes are not zero",
    PacketFault.RUN_RANGE: lambda r, f, c, n: f"run {r}: pages [{f}, {f + c}) are outside the "
                                              f"block's {n} pages",
    PacketFault.RUN_ORDER: lambda r, f, e, *_: f"run {r} starts at page {f}, before the end of "
                                               f"the previous run (page {e})",
    PacketFault.RUN_DATA: lambda r, d, n, *_: f"run {r}: {d} bytes of page data overrun the "
                                              f"payload ({n} bytes left)",
    PacketFault.TRAILING: lambda n, r, *_: f"{n} payload bytes follow the last of {r} run "
                                           f"records",
    PacketFault.CHECKSUM: lambda s, c, *_: f"checksum mismatch: header says {s:#018x}, the "
                                           f"packet hashes to {c:#018x}",
    PacketFault.RUN_COMPRESSED_SIZE: lambda r, t, n, *_: (
        f"run {r}: a compressed run of {t} bytes with {n} bytes of LZ4 data (at most "
        f"{MAX_COMPRESSED_RUN_BYTES} bytes, and LZ4_COMPRESSBOUND of them)"),
    PacketFault.RUN_DECOMPRESS: lambda r, t, *_: f"run {r}: LZ4 data does not decode to the "
                                                 f"run's {t} bytes",
}


def packet_error(fault: int, offset: int, *args: int) -> PacketError:
    """The PacketError for a fault found at ``offset`` of the packet, with its numbers."""
    args = tuple(args) + (0,) * (4 - len(args))
    return PacketError(offset, _REASONS[PacketFault(fault)](*args))

# ---------------------------------------------------------------------- argument checks


def count_arg(value, name: str, upper: int | None = None) -> int:
    """A non-negative integer below 2**63 (and <= ``upper`` when given)."""
    value = operator.index(value)
    if value < 0 or value >= 1 << 63:
        raise ValueError(f"{name} must be a non-negative 63-bit integer, not {value}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} {value} is beyond {upper}")
    return value


def page_size_arg(page_size) -> int:
    page_size = operator.index(page_size)
    if page_size < 512 or page_size > MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(f"page size must be a power of two in [512, {MAX_PAGE_SIZE}], "
                         f"not {page_size}")
    return page_size


def bitmap_words(npages) -> int:
    """64-bit words of a bitmap of ``npages`` bits."""
    return (count_arg(npages, "npages") + 63) // 64


def byte_view(obj, name: str, *, writable: bool = False) -> memoryview:
    """A 1-D byte view of any C-contiguous buffer (numpy array, mmap, bytes, memoryview)."""
    view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if writable and view.readonly:
        raise TypeError(f"{name} must be a writable buffer")
    return view


def bitmap_arg(bm, npages: int, name: str = "bm", *, writable: bool = False) -> np.ndarray:
    """A dirty bitmap: 1-D C-contiguous numpy uint64 array of at least bitmap_words(npages)."""
    if not isinstance(bm, np.ndarray):
        raise TypeError(f"{name} must be a numpy uint64 array, not {type(bm).__name__}")
    if bm.dtype != np.uint64 or bm.ndim != 1 or not bm.flags.c_contiguous:
        raise ValueError(f"{name} must be a 1-D C-contiguous uint64 array, not {bm.ndim}-D "
                         f"{bm.dtype}")
    if writable and not bm.flags.writeable:
        raise ValueError(f"{name} is read-only")
    words = bitmap_words(npages)
    if bm.shape[0] < words:
        raise ValueError(f"{name} has {bm.shape[0]} words; {npages} pages need {words}")
    return bm


def memory_arg(mem, page_size: int, npages: int, *, writable: bool = False) -> memoryview:
    """Guest memory holding at least ``npages`` pages."""
    view = byte_view(mem, "mem", writable=writable)
    if len(view) // page_size < npages:
        raise ValueError(f"mem holds {len(view)} bytes, too short for {npages} pages of "
                         f"{page_size} bytes")
    return view


def pages_arg(pages, npages: int) -> np.ndarray:
    """Page indices as a contiguous int64 array, each in [0, npages)."""
    arr = np.asarray(pages)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"pages must be integers, not {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"pages must be 1-D, not {arr.ndim}-D")
    bad = np.flatnonzero((arr < 0) | (arr >= npages))  # in the array's own dtype: no wrap
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"page {int(arr[i])} (pages[{i}]) is outside the buffer's {npages} "
                         f"pages")
    return np.ascontiguousarray(arr, dtype=np.int64)


def compress_arg(compress):
    """encode_packet's compression state: None, or a new_compress_state() array."""
    if compress is None:
        return None
    if (not isinstance(compress, np.ndarray) or compress.dtype != np.uint32
            or compress.shape != (2,) or not compress.flags.c_contiguous
            or not compress.flags.writeable):
        raise TypeError("compress must be None or a state from new_compress_state()")
    return compress


def encode_args(mem, page_size, block_id, bm, npages, cursor, out, compress=None):
    """Checked arguments of encode_packet, in the order both backends check them."""
    page_size = page_size_arg(page_size)
    block_id = count_arg(block_id, "block_id", 0xFFFF_FFFF)
    npages = count_arg(npages, "npages")
    mem = memory_arg(mem, page_size, npages)
    bm = bitmap_arg(bm, npages, writable=True)
    cursor = count_arg(cursor, "cursor", npages)
    out = byte_view(out, "out", writable=True)
    need = PACKET_HEADER_BYTES + RUN_HEADER_BYTES + page_size
    if len(out) < need:
        raise ValueError(f"out holds {len(out)} bytes; a packet of {page_size}-byte pages "
                         f"needs at least {need}")
    return mem, page_size, block_id, bm, npages, cursor, out, compress_arg(compress)


def runs_args(packet, page_size, block_id, npages):
    """Checked arguments of packet_runs, in the order both backends check them."""
    return (byte_view(packet, "packet"), page_size_arg(page_size),
            count_arg(block_id, "block_id", 0xFFFF_FFFF), count_arg(npages, "npages"))


def decode_args(packet, mem, page_size, block_id, npages, present):
    """Checked arguments of decode_packet, in the order both backends check them."""
    packet = byte_view(packet, "packet")
    page_size = page_size_arg(page_size)
    block_id = count_arg(block_id, "block_id", 0xFFFF_FFFF)
    npages = count_arg(npages, "npages")
    mem = memory_arg(mem, page_size, npages, writable=True)
    if present is not None:
        present = bitmap_arg(present, npages, "present", writable=True)
    return packet, mem, page_size, block_id, npages, present
