"""The readable twin of every compiled kernel (``pymig._core``), in Python and numpy.

Same arguments, same results bit for bit, same exceptions (with the same packet offsets and
reasons); clarity comes before speed.  ``PYMIG_PUREPYTHON=1`` makes :mod:`pymig.core` use this
module, and the differential tests hold the compiled kernels to it.
"""

from __future__ import annotations

import os
import struct

import lz4.block
import numpy as np
import xxhash

from pymig._coreshared import (COMPRESS_UNIT_BYTES, COMPRESSED_HEADER_BYTES,
                               MAX_COMPRESSED_RUN_BYTES, MAX_RUN_PAGES, PACKET_HEADER_BYTES,
                               PACKET_MAGIC, PACKET_VERSION, RUN_COMPRESSED, RUN_HEADER_BYTES,
                               RUN_NORMAL, RUN_ZERO, DecodeResult, EncodeResult, PacketFault, PacketInfo,
                               bitmap_arg, bitmap_words, byte_view, count_arg, decode_args,
                               compress_bound, disabled_variants, encode_args, memory_arg,
                               packet_error,
                               page_size_arg, pages_arg, runs_args)

backend = "reference"

# magic, version, flags, block_id, page_size, record_count, payload_len, checksum
_HEADER = struct.Struct("<4sHHIIIIQ")
# first_page, page_count, kind, reserved u8, reserved u16
_RUN = struct.Struct("<QIBBH")
# after a COMPRESSED run's record: LZ4 data length, reserved u32
_COMPRESSED = struct.Struct("<II")
assert _HEADER.size == PACKET_HEADER_BYTES and _RUN.size == RUN_HEADER_BYTES


def cpu_info() -> dict:
    """The reference has a single, portable variant."""
    return {"variant": "scalar", "available": ["scalar"],
            "disabled": disabled_variants(os.environ.get("PYMIG_DISABLE_SIMD")),
            "backend": "reference"}

# ------------------------------------------------------------------------------ bitmaps


def new_bitmap(npages) -> np.ndarray:
    """A zeroed bitmap for ``npages`` pages."""
    return np.zeros(bitmap_words(npages), dtype=np.uint64)


def _unpack(bm: np.ndarray, npages: int) -> np.ndarray:
    """Bits [0, npages) as bools: bit i of the little-endian words is page i."""
    words = bm[: bitmap_words(npages)].astype("<u8", copy=False)
    return np.unpackbits(words.view(np.uint8), count=npages, bitorder="little").astype(bool)


def _store(bm: np.ndarray, npages: int, bits: np.ndarray) -> None:
    """Write bits [0, npages) back into bm, keeping the bits at npages and beyond."""
    words = bitmap_words(npages)
    packed = np.zeros(words * 8, dtype=np.uint8)
    flat = np.packbits(bits, bitorder="little")
    packed[: flat.size] = flat
    new = packed.view("<u8").astype(np.uint64)
    inside = np.full(words, np.iinfo(np.uint64).max, dtype=np.uint64)
    if npages % 64:
        inside[-1] = np.uint64((1 << (npages % 64)) - 1)
    bm[:words] = (bm[:words] & ~inside) | (new & inside)


def bitmap_count(bm, npages) -> int:
    """Number of set bits below npages."""
    npages = count_arg(npages, "npages")
    return int(_unpack(bitmap_arg(bm, npages), npages).sum())


def bitmap_indices(bm, npages) -> np.ndarray:
    """Indices of the set bits below npages, ascending (int64)."""
    npages = count_arg(npages, "npages")
    return np.flatnonzero(_unpack(bitmap_arg(bm, npages), npages)).astype(np.int64)


def bitmap_runs(bm, npages) -> np.ndarray:
    """Maximal runs of set bits below npages as an (n, 2) int64 array of (start, length)."""
    npages = count_arg(npages, "npages")
    bits = _unpack(bitmap_arg(bm, npages), npages)
    # +1 where a run starts, -1 just past where it ends
    edges = np.diff(np.concatenate(([0], bits.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return np.stack([starts, ends - starts], axis=1).astype(np.int64).reshape(-1, 2)


def bitmap_merge(dst, src, npages) -> int:
    """dst |= src for the bits below npages; returns how many bits were newly set in dst."""
    npages = count_arg(npages, "npages")
    old = _unpack(bitmap_arg(dst, npages, "dst", writable=True), npages)
    new = _unpack(bitmap_arg(src, npages, "src"), npages)
    _store(dst, npages, old | new)
    return int((new & ~old).sum())


def bitmap_find_next(bm, npages, start) -> int:
    """First set bit at or after ``start``, or npages when there is none."""
    npages = count_arg(npages, "npages")
    start = count_arg(start, "start")
    bits = _unpack(bitmap_arg(bm, npages), npages)
    found = np.flatnonzero(bits[start:])
    return start + int(found[0]) if found.size else npages


def bitmap_test_and_clear(bm, npages, start, count) -> int:
    """Clears bits [start, start + count) (clipped to npages); returns how many were set."""
    npages = count_arg(npages, "npages")
    start = count_arg(start, "start")
    count = count_arg(count, "count")
    bitmap_arg(bm, npages, writable=True)
    if start >= npages or count == 0:
        return 0
    bits = _unpack(bm, npages)
    end = min(start + count, npages)
    cleared = int(bits[start:end].sum())
    bits[start:end] = False
    _store(bm, npages, bits)
    return cleared


def bitmap_set_range(bm, npages, start, count) -> None:
    """Sets bits [start, start + count); the range must lie within npages."""
    npages = count_arg(npages, "npages")
    start = count_arg(start, "start")
    count = count_arg(count, "count")
    bitmap_arg(bm, npages, writable=True)
    if start + count > npages:
        raise ValueError(f"pages [{start}, {start + count}) are outside the bitmap's "
                         f"{npages} pages")
    bits = _unpack(bm, npages)
    bits[start:start + count] = True
    _store(bm, npages, bits)

# --------------------------------------------------------------------------- zero pages


def _page(view: memoryview, page_size: int, page: int) -> np.ndarray:
    return np.frombuffer(view, dtype=np.uint8, count=page_size, offset=page * page_size)


def is_zero(buf) -> bool:
    """True if every byte of ``buf`` (any C-contiguous buffer) is zero."""
    return not np.frombuffer(byte_view(buf, "buf"), dtype=np.uint8).any()


def zero_pages(mem, page_size, pages) -> np.ndarray:
    """For each page index in ``pages``: True if that page of ``mem`` is all zero."""
    page_size = page_size_arg(page_size)
    view = byte_view(mem, "mem")
    pages = pages_arg(pages, len(view) // page_size)
    return np.array([not _page(view, page_size, int(p)).any() for p in pages], dtype=bool)


def zero_bitmap(mem, page_size, bm, npages) -> np.ndarray:
    """Bitmap of the pages set in ``bm`` (below npages) whose contents are all zero."""
    page_size = page_size_arg(page_size)
    npages = count_arg(npages, "npages")
    view = memory_arg(mem, page_size, npages)
    dirty = np.flatnonzero(_unpack(bitmap_arg(bm, npages), npages))
    zero = np.zeros(npages, dtype=bool)
    for page in dirty:
        zero[page] = not _page(view, page_size, int(page)).any()
    result = new_bitmap(npages)
    _store(result, npages, zero)
    return result

# ----------------------------------------------------------------------------- page hashes


def page_hashes(mem, page_size, pages) -> np.ndarray:
    """For each page index in ``pages``: the xxh3-64 of that page of ``mem`` (uint64)."""
    page_size = page_size_arg(page_size)
    view = byte_view(mem, "mem")
    pages = pages_arg(pages, len(view) // page_size)
    return np.array([xxhash.xxh3_64_intdigest(view[int(p) * page_size:(int(p) + 1) * page_size])
                     for p in pages], dtype=np.uint64)

# ------------------------------------------------------------------------------ packets


def _header(view: memoryview) -> tuple:
    """The checks every header gets, in the compiled order; returns the unpacked fields."""
    if len(view) < PACKET_HEADER_BYTES:
        raise packet_error(PacketFault.HEADER_TRUNCATED, len(view), len(view))
    fields = _HEADER.unpack_from(view)
    magic, version, flags, _block, page_size, records, payload_len, _sum = fields
    if magic != PACKET_MAGIC:
        raise packet_error(PacketFault.MAGIC, 0, int.from_bytes(magic, "little"))
    if version != PACKET_VERSION:
        raise packet_error(PacketFault.VERSION, 4, version)
    if flags:
        raise packet_error(PacketFault.FLAGS, 6, flags)
    try:
        page_size_arg(page_size)
    except ValueError:
        raise packet_error(PacketFault.PAGE_SIZE, 12, page_size) from None
    if records * RUN_HEADER_BYTES > payload_len:
        raise packet_error(PacketFault.RECORD_COUNT, 16, records, payload_len)
    return fields


def packet_info(buf) -> PacketInfo:
    """Parse and check the 32-byte header at the start of ``buf`` (the rest is not read)."""
    _, version, _, block_id, page_size, records, payload_len, checksum = _header(
        byte_view(buf, "buf"))
    return PacketInfo(version, block_id, page_size, records, payload_len, checksum,
                      PACKET_HEADER_BYTES + payload_len)


def _packet_checksum(head: bytes | memoryview, payload: bytes | memoryview) -> int:
    """xxh3-64 (seed 0) of the payload followed by the header's first 24 bytes."""
    state = xxhash.xxh3_64()
    state.update(payload)
    state.update(head[:24])
    return state.intdigest()


def _try_compress(state: np.ndarray, data: memoryview) -> bytes | None:
    """``data`` as an LZ4 block when that shrinks it by an eighth, else None; ``state`` is
    the backoff kept between packets (``[units to copy without trying, failures in a row]``)."""
    if state[0]:
        state[0] -= 1
        return None
    packed = lz4.block.compress(data, store_size=False)
    if len(packed) + COMPRESSED_HEADER_BYTES <= len(data) - len(data) // 8:
        state[1] = 0
        return packed
    state[1] = min(int(state[1]) + 1, 7)
    state[0] = 1 << (int(state[1]) - 1)
    return None


def encode_packet(mem, page_size, block_id, bm, npages, cursor, out,
                  compress=None) -> EncodeResult:
    """Move dirty pages from ``bm`` (at or after ``cursor``; each bit taken is cleared) into
    one packet written at the start of ``out``, whose length is the packet capacity.

    Pages join the current run when they follow it and are of the same kind (NORMAL: has
    data, ZERO: all zero); the packet ends before the first page that would not fit.  With a
    ``compress`` state, a NORMAL run holds at most 32 KiB and goes out as a COMPRESSED run
    (an LZ4 block) when that shrinks it by an eighth.
    """
    mem, page_size, block_id, bm, npages, cursor, out, compress = encode_args(
        mem, page_size, block_id, bm, npages, cursor, out, compress)
    unit = COMPRESS_UNIT_BYTES // page_size if page_size <= COMPRESS_UNIT_BYTES else 0
    if not unit:
        compress = None  # pages larger than a unit are never compressed
    max_normal = unit if compress is not None else MAX_RUN_PAGES
    capacity = min(len(out), PACKET_HEADER_BYTES + 0xFFFF_FFFF)
    runs: list[list[int]] = []  # [first_page, page_count, kind]
    used = PACKET_HEADER_BYTES
    resume = npages
    bits = _unpack(bm, npages)
    dirty = np.flatnonzero(bits[cursor:]) + cursor
    for page in map(int, dirty):
        kind = RUN_ZERO if not _page(mem, page_size, page).any() else RUN_NORMAL
        data = page_size if kind == RUN_NORMAL else 0
        limit = max_normal if kind == RUN_NORMAL else MAX_RUN_PAGES
        last = runs[-1] if runs else None
        extend = (last is not None and last[2] == kind and last[0] + last[1] == page
                  and last[1] < limit)
        need = data + (0 if extend else RUN_HEADER_BYTES)
        if used + need > capacity:
            resume = page
            break
        if extend:
            last[1] += 1
        else:
            runs.append([page, 1, kind])
        used += need
    if not runs:
        return EncodeResult(0, npages, 0, 0, 0, 0)

    payload = bytearray()
    compressed = 0
    for first, count, kind in runs:
        bits[first:first + count] = False  # taken: test-and-clear
        data = mem[first * page_size:(first + count) * page_size]
        packed = (_try_compress(compress, data)
                  if kind == RUN_NORMAL and compress is not None else None)
        if packed is not None:
            payload += _RUN.pack(first, count, RUN_COMPRESSED, 0, 0)
            payload += _COMPRESSED.pack(len(packed), 0) + packed
            compressed += count
            continue
        payload += _RUN.pack(first, count, kind, 0, 0)
        if kind == RUN_NORMAL:
            payload += data
    used = PACKET_HEADER_BYTES + len(payload)
    head = _HEADER.pack(PACKET_MAGIC, PACKET_VERSION, 0, block_id, page_size, len(runs),
                        len(payload), 0)
    checksum = _packet_checksum(head, payload)
    _store(bm, npages, bits)
    out[:used] = head[:24] + checksum.to_bytes(8, "little") + payload
    normal = sum(count for _, count, kind in runs if kind == RUN_NORMAL)
    zero = sum(count for _, count, kind in runs if kind == RUN_ZERO)
    return EncodeResult(used, resume, normal, zero, len(runs), compressed)


def _walk_runs(view: memoryview, records: int, payload_len: int, page_size: int,
               npages: int) -> list[tuple[int, int, int, int]]:
    """Check every run record; returns (first_page, page_count, kind, data_offset) each."""
    runs = []
    off, end, prev_end = PACKET_HEADER_BYTES, PACKET_HEADER_BYTES + payload_len, 0
    for r in range(records):
        left = end - off
        if left < RUN_HEADER_BYTES:
            raise packet_error(PacketFault.RUN_TRUNCATED, off, r, left)
        first, count, kind, reserved8, reserved16 = _RUN.unpack_from(view, off)
        if count == 0:
            raise packet_error(PacketFault.RUN_EMPTY, off + 8, r)
        if kind not in (RUN_NORMAL, RUN_ZERO, RUN_COMPRESSED):
            raise packet_error(PacketFault.RUN_KIND, off + 12, r, kind)
        if reserved8:
            raise packet_error(PacketFault.RUN_RESERVED, off + 13, r)
        if reserved16:
            raise packet_error(PacketFault.RUN_RESERVED, off + 14, r)
        if first >= npages or count > npages - first:
            raise packet_error(PacketFault.RUN_RANGE, off, r, first, count, npages)
        if first < prev_end:
            raise packet_error(PacketFault.RUN_ORDER, off, r, first, prev_end)
        room = left - RUN_HEADER_BYTES
        data = count * page_size if kind == RUN_NORMAL else 0
        if kind == RUN_COMPRESSED:
            data = COMPRESSED_HEADER_BYTES
            if data <= room:
                clen, reserved32 = _COMPRESSED.unpack_from(view, off + RUN_HEADER_BYTES)
                if reserved32:
                    raise packet_error(PacketFault.RUN_RESERVED, off + RUN_HEADER_BYTES + 4, r)
                total = count * page_size
                if total > MAX_COMPRESSED_RUN_BYTES or clen > compress_bound(total):
                    raise packet_error(PacketFault.RUN_COMPRESSED_SIZE, off + 8, r, total, clen)
                data += clen
        if data > room:
            raise packet_error(PacketFault.RUN_DATA, off + 16, r, data, room)
        runs.append((first, count, kind, off + RUN_HEADER_BYTES))
        off += RUN_HEADER_BYTES + data
        prev_end = first + count
    if off != end:
        raise packet_error(PacketFault.TRAILING, off, end - off, records)
    return runs


def _checked_runs(packet: memoryview, page_size: int, block_id: int, npages: int):
    """Header against the caller's block, page size and length, then every run record;
    returns the runs (see _walk_runs) and the header's checksum."""
    _, _, _, got_block, got_page_size, records, payload_len, checksum = _header(packet)
    if got_block != block_id:
        raise packet_error(PacketFault.BLOCK, 8, got_block, block_id)
    if got_page_size != page_size:
        raise packet_error(PacketFault.PAGE_SIZE_MISMATCH, 12, got_page_size, page_size)
    if len(packet) - PACKET_HEADER_BYTES != payload_len:
        raise packet_error(PacketFault.LENGTH, 20, payload_len,
                           len(packet) - PACKET_HEADER_BYTES)
    return _walk_runs(packet, records, payload_len, page_size, npages), checksum


def packet_runs(packet, page_size, block_id, npages) -> np.ndarray:
    """Each run of ``packet`` as (first page, page count), an int64 array of shape (runs, 2),
    after the checks decode_packet makes before the checksum (which is not checked)."""
    packet, page_size, block_id, npages = runs_args(packet, page_size, block_id, npages)
    runs, _ = _checked_runs(packet, page_size, block_id, npages)
    return np.array([(first, count) for first, count, _, _ in runs],
                    dtype=np.int64).reshape(-1, 2)


def decode_packet(packet, mem, page_size, block_id, npages, present=None) -> DecodeResult:
    """Check ``packet`` completely, then apply it to ``mem`` (``npages`` pages).

    Order of checks: header, header against the caller's block/page size/buffer length, every
    run record, checksum; only then are pages written.  NORMAL pages are copied and
    COMPRESSED runs decoded into their pages (both set in ``present``); ZERO pages are cleared only where not already zero, and skipped unread where
    ``present`` says they are known zero (their bit is cleared).
    """
    packet, mem, page_size, block_id, npages, present = decode_args(
        packet, mem, page_size, block_id, npages, present)
    runs, checksum = _checked_runs(packet, page_size, block_id, npages)
    computed = _packet_checksum(packet[:24], packet[PACKET_HEADER_BYTES:])
    if computed != checksum:
        raise packet_error(PacketFault.CHECKSUM, 24, checksum, computed)

    memory = np.frombuffer(mem, dtype=np.uint8)
    known = _unpack(present, npages) if present is not None else None
    for r, (first, count, kind, data_off) in enumerate(runs):
        pages = slice(first * page_size, (first + count) * page_size)
        if kind == RUN_COMPRESSED:
            total = count * page_size
            clen, _ = _COMPRESSED.unpack_from(packet, data_off)
            start = data_off + COMPRESSED_HEADER_BYTES
            try:
                raw = lz4.block.decompress(packet[start:start + clen], uncompressed_size=total)
            except lz4.block.LZ4BlockError:
                raw = b""
            if len(raw) != total:
                raise packet_error(PacketFault.RUN_DECOMPRESS, data_off - RUN_HEADER_BYTES, r,
                                   total)
            memory[pages] = np.frombuffer(raw, np.uint8)
        if kind in (RUN_NORMAL, RUN_COMPRESSED):
            if kind == RUN_NORMAL:
                memory[pages] = np.frombuffer(packet, np.uint8, count * page_size, data_off)
            if known is not None:
                known[first:first + count] = True
            continue
        for page in range(first, first + count):
            if known is not None:
                if not known[page]:
                    continue  # known zero: neither read nor written
                known[page] = False
            data = memory[page * page_size:(page + 1) * page_size]
            if data.any():
                data[:] = 0
    if known is not None:
        _store(present, npages, known)
    normal = sum(count for _, count, kind, _ in runs if kind != RUN_ZERO)
    compressed = sum(count for _, count, kind, _ in runs if kind == RUN_COMPRESSED)
    return DecodeResult(normal, sum(count for _, count, _, _ in runs) - normal, len(runs),
                        compressed)
