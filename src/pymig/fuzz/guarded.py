"""Guest RAM fenced by PROT_NONE pages, reused from one input to the next.

A destination guest under fuzzing gets RAM blocks whose memory lies between two inaccessible
guard regions, so that a write just past either end of guest memory (a decoder or a simulated
vCPU going astray) faults at once instead of landing silently in a neighbouring mapping.  The
regions are kept in a pool by size and handed out again, zeroed (``MADV_DONTNEED`` on private
anonymous memory), to the next guest: mapping fresh memory for every input would cost more than
the input.  Memory from the pool is never unmapped, so a view of it kept by mistake stays
harmless.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterator, Sequence

from pymig.memory import RamBlock

GUARD_BYTES = 1 << 20
PROT_NONE = 0
MAP_NORESERVE = 0x4000
MADV_DONTNEED = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class _Region:
    """``size`` bytes of read-write memory with GUARD_BYTES of PROT_NONE below and above."""

    def __init__(self, size: int):
        total = size + 2 * GUARD_BYTES
        base = _libc.mmap(None, total, PROT_NONE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if base in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"reserving {total} bytes: {os.strerror(err)}")
        self.size = size
        self.address = base + GUARD_BYTES
        _check(_libc.mprotect(self.address, size, mmap.PROT_READ | mmap.PROT_WRITE),
               "mprotect")

    def zero(self) -> None:
        _check(_libc.madvise(self.address, self.size, MADV_DONTNEED), "madvise")


class Pool:
    """Guarded regions by size; :meth:`allocate` stands in for
    ``pymig.guest.base._allocate``."""

    def __init__(self) -> None:
        self._free: dict[int, list[_Region]] = {}
        self.mapped_bytes = 0

    def take(self, size: int) -> _Region:
        free = self._free.get(size)
        if free:
            return free.pop()
        self.mapped_bytes += size
        return _Region(size)

    def give_back(self, region: _Region) -> None:
        region.zero()
        self._free.setdefault(region.size, []).append(region)

    def allocate(self, layouts: Sequence, *, backing: str = "anon", hugepages: bool = True,
                 populate: bool = False) -> list[RamBlock]:
        """RAM blocks for ``layouts`` (anonymous memory whatever ``backing`` asks for)."""
        blocks = []
        for index, layout in enumerate(layouts):
            if layout.size_bytes <= 0 or layout.size_bytes % mmap.PAGESIZE:
                raise ValueError(f"RAM block {layout.name!r}: size {layout.size_bytes} is not "
                                 f"a positive multiple of the page size")
            region = self.take(layout.size_bytes)
            blocks.append(RamBlock(layout.name, _memory(self, region), layout.size_bytes,
                                   layout.guest_phys_addr, index, mmap.PAGESIZE, None, "anon"))
        return blocks


def _memory(pool: Pool, region: _Region):
    """A buffer over ``region`` that RamBlock can hold as its ``mem``; closing it hands the
    region back to ``pool``, zeroed."""

    class Memory(ctypes.c_ubyte * region.size):
        closed = False

        def madvise(self, option: int, start: int = 0, length: int = 0) -> None:
            _check(_libc.madvise(region.address + start, length or region.size - start,
                                 option), "madvise")

        def close(self) -> None:
            if not self.closed:
                self.closed = True
                pool.give_back(region)

    return Memory.from_address(region.address)


@contextlib.contextmanager
def guest_ram(pool: Pool) -> Iterator[Pool]:
    """Within the block, every guest this process builds takes its RAM from ``pool``."""
    from pymig.guest import base

    real = base._allocate
    base._allocate = pool.allocate
    try:
        yield pool
    finally:
        base._allocate = real
