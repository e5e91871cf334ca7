"""Fuzz target ``packet``: ``core.decode_packet`` on untrusted packets, into fenced memory.

Input: 4 bytes of decoding parameters, then the packet::

    0 flags u8   bit 0: a present bitmap (else None)   bit 1: memory starts zero (else 0x5a)
                 bit 2: the caller expects block 7 (else the block the header names)
                 bits 3-4: page size 4096, 512, 8192, 65536
    1 npages u16 guest memory of 1 + npages % MAX_PAGES pages (at most MAX_BYTES bytes)
    3 present u8 the bitmap's pattern: all ones, alternating, ... (bit 0 chooses)

The packet is decoded into guest memory with GUARD_BYTES of a known pattern on either side
(they must never change), by the backend ``pymig.core`` uses and, where both are there, by the
other one too: the two must agree on the result or the error, the memory and the bitmap.  On
a refused packet the memory and bitmap must be as before, except inside the pages of the
packet's runs when LZ4 data failed to decode (found only while decoding, after the runs
before it were applied).  Each input also runs with its
checksum (and payload length) repaired, so that the mutations reach the page writes.
"""

from __future__ import annotations

import struct

import numpy as np
import xxhash

from pymig import _reference, core
from pymig._coreshared import PacketFault
from pymig.errors import PacketError
from pymig.fuzz import repair
from pymig.fuzz._harness import Finding

GUARD_BYTES = 4096
GUARD = 0xA5
FILL = 0x5A
MAX_PAGES = 1 << 12
MAX_BYTES = 4 << 20
PAGE_SIZES = (4096, 512, 8192, 65536)
OTHER_BLOCK = 7
PARAMS = struct.Struct("<BHB")

_backends: list = []


def setup() -> None:
    """The backend in use, then the other one if it loads (the compiled core may be
    missing in a pure-Python install)."""
    _backends.clear()
    _backends.append(core)
    other = "reference" if core.backend == "compiled" else "compiled"
    try:
        _backends.append(core.load_backend(other))
    except ImportError:
        pass


class _Arena:
    """Guest memory with guard bytes before and after, reset for each decode."""

    def __init__(self) -> None:
        self.buf = np.empty(GUARD_BYTES + MAX_BYTES + GUARD_BYTES, dtype=np.uint8)

    def region(self, nbytes: int, fill: int) -> np.ndarray:
        self.buf[:GUARD_BYTES] = GUARD
        self.buf[GUARD_BYTES:GUARD_BYTES + nbytes] = fill
        self.buf[GUARD_BYTES + nbytes:GUARD_BYTES + nbytes + GUARD_BYTES] = GUARD
        return self.buf[GUARD_BYTES:GUARD_BYTES + nbytes]

    def check_guards(self, nbytes: int, backend: str) -> None:
        before = self.buf[:GUARD_BYTES]
        after = self.buf[GUARD_BYTES + nbytes:GUARD_BYTES + nbytes + GUARD_BYTES]
        for name, guard in (("before", before), ("after", after)):
            bad = np.flatnonzero(guard != GUARD)
            if bad.size:
                raise Finding(f"{backend}: decode_packet wrote {bad.size} guard bytes "
                              f"{name} guest memory (first at guard byte {int(bad[0])})")


_arenas: list[_Arena] = []


def _arena(i: int) -> _Arena:
    while len(_arenas) <= i:
        _arenas.append(_Arena())
    return _arenas[i]


def test_one_input(data: bytes) -> None:
    if not _backends:
        setup()
    if len(data) < PARAMS.size:
        return
    _decode_everywhere(data)
    fixed = data[:PARAMS.size] + repair.packet(data[PARAMS.size:], fix_length=True)
    if fixed != data:
        _decode_everywhere(fixed)


def _decode_everywhere(data: bytes) -> None:
    flags, npages_raw, pattern = PARAMS.unpack_from(data)
    packet = data[PARAMS.size:]
    page_size = PAGE_SIZES[(flags >> 3) & 3]
    npages = min(1 + npages_raw % MAX_PAGES, MAX_BYTES // page_size)
    if flags & 4:
        block_id = OTHER_BLOCK
    else:
        block_id = int.from_bytes(packet[8:12], "little") if len(packet) >= 12 else 0
    fill = 0 if flags & 2 else FILL
    present = _present(pattern, npages) if flags & 1 else None
    outcomes = []
    for i, backend in enumerate(_backends):
        outcomes.append(_decode(backend, _arena(i), packet, page_size, block_id, npages, fill,
                                None if present is None else present.copy()))
    first = outcomes[0]
    for other, backend in zip(outcomes[1:], _backends[1:], strict=True):
        if other[0] != first[0]:
            raise Finding(f"backends disagree: {_backends[0].backend} gave {first[0]!r}, "
                          f"{backend.backend} gave {other[0]!r}")
        if other[1] is not None and first[1] is not None and other[1] != first[1]:
            raise Finding(f"backends disagree on guest memory or the present bitmap after "
                          f"{first[0]!r}")


def _present(pattern: int, npages: int) -> np.ndarray:
    words = core.new_bitmap(npages)
    word = (0xFFFF_FFFF_FFFF_FFFF if pattern & 1
            else int.from_bytes(bytes([pattern]) * 8, "little"))
    words[:] = np.uint64(word)
    return words


def _decode(backend, arena: _Arena, packet: bytes, page_size: int, block_id: int, npages: int,
            fill: int, present: np.ndarray | None):
    """(what decode_packet returned or raised, digest of memory and bitmap or None)."""
    nbytes = npages * page_size
    mem = arena.region(nbytes, fill)
    before = None if present is None else present.copy()
    try:
        result = backend.decode_packet(packet, mem, page_size, block_id, npages, present)
    except PacketError as exc:
        arena.check_guards(nbytes, backend.backend)
        memory = xxhash.xxh3_64_intdigest(mem)
        if memory != _filled(nbytes, fill) or (present is not None
                                               and not np.array_equal(present, before)):
            _check_untouched(backend.backend, exc, packet, page_size, block_id, npages, mem,
                             fill, present, before)
        if _fault_of(exc) == PacketFault.RUN_DECOMPRESS:
            return (type(exc).__name__, str(exc)), None  # a partial run may differ
        return (type(exc).__name__, str(exc)), _digest(memory, present)
    arena.check_guards(nbytes, backend.backend)
    return tuple(result), _digest(xxhash.xxh3_64_intdigest(mem), present)


_fills: dict[tuple[int, int], int] = {}


def _filled(nbytes: int, fill: int) -> int:
    """The digest of ``nbytes`` bytes of ``fill``."""
    key = (nbytes, fill)
    if key not in _fills:
        _fills[key] = xxhash.xxh3_64_intdigest(np.full(nbytes, fill, dtype=np.uint8))
    return _fills[key]


def _fault_of(exc: PacketError) -> PacketFault | None:
    return PacketFault.RUN_DECOMPRESS if "LZ4 data does not decode" in exc.reason else None


def _check_untouched(name: str, exc: PacketError, packet: bytes, page_size: int, block_id: int,
                     npages: int, mem: np.ndarray, fill: int, present, before) -> None:
    """A refused packet leaves memory and bitmap as they were (see the module docstring)."""
    changed = mem != fill
    declared = np.zeros(npages, dtype=bool)  # pages a run names: a failed LZ4 run may write
    if _fault_of(exc) == PacketFault.RUN_DECOMPRESS:
        for first, count in _reference.packet_runs(packet, page_size, block_id,
                                                   npages).tolist():
            declared[first:first + count] = True
        changed[np.repeat(declared, page_size)] = False
    bad = np.flatnonzero(changed)
    if bad.size:
        raise Finding(f"{name}: decode_packet refused the packet ({exc}) but changed guest "
                      f"memory at byte {int(bad[0])} ({bad.size} bytes)")
    if present is not None:
        flipped = np.unpackbits((present ^ before).view(np.uint8), bitorder="little")[:npages]
        if np.any(flipped.astype(bool) & ~declared):
            raise Finding(f"{name}: decode_packet refused the packet ({exc}) but changed the "
                          f"present bitmap outside its pages")


def _digest(memory: int, present: np.ndarray | None) -> tuple[int, int | None]:
    return memory, None if present is None else xxhash.xxh3_64_intdigest(present)
