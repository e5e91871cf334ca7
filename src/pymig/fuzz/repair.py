"""Checksums made right again, so that mutated inputs get past them.

Every record of a stream ends in an xxh3-64 footer, every RAM packet carries one, and so does a
snapshot's index: a mutated byte almost always fails the checksum first, and the code behind it
would never see a mutation at all.  So the harnesses run each input twice, as it is (the
checksum checks themselves stay fuzzed) and repaired: every checksum recomputed over what the
input holds.  Repairing is lenient and never raises: it walks the framing as far as it can
follow it and leaves everything after that as it is.
"""

from __future__ import annotations

import struct

import xxhash

from pymig import stream
from pymig.transport.snapshot_index import (INDEX_HEAD, INDEX_MAGIC, INDEX_RANGE, INDEX_SUM,
                                            INDEX_TAIL, INDEX_TAIL_MAGIC, MAX_INDEX_BYTES)

PACKET_MAGIC = b"PMGP"
PACKET_HEADER_BYTES = 32
_PACKET_LEN = struct.Struct("<I")  # payload_len at byte 20 of a packet header
_PACKET_SUM = struct.Struct("<Q")  # checksum at byte 24
_NAMED = (stream.RecordType.START, stream.RecordType.FULL)


def packet(data: bytes | bytearray | memoryview, *, fix_length: bool = False) -> bytes:
    """``data`` with a RAM packet's checksum recomputed (and, with ``fix_length``, its
    payload length set to what follows the header); anything shorter than a header as it
    is."""
    out = bytearray(data)
    if len(out) < PACKET_HEADER_BYTES:
        return bytes(out)
    if fix_length:
        _PACKET_LEN.pack_into(out, 20, min(len(out) - PACKET_HEADER_BYTES, 0xFFFF_FFFF))
    state = xxhash.xxh3_64()
    state.update(memoryview(out)[PACKET_HEADER_BYTES:])
    state.update(memoryview(out)[:24])
    _PACKET_SUM.pack_into(out, 24, state.intdigest())
    return bytes(out)


def records(data: bytes | bytearray | memoryview) -> tuple[bytes, int]:
    """``data`` (a stream) with every footer it can reach rewritten to match its record, and
    RAM packets in PART records with their checksums recomputed; also the offset where the
    framing could no longer be followed (the EOF record's end, for a whole stream)."""
    out = bytearray(data)
    pos = stream.HEADER_BYTES
    if len(out) < pos:
        return bytes(out), 0
    while pos + stream.RECORD_HEAD.size <= len(out):
        start = pos
        rtype = out[pos]
        section_id = int.from_bytes(out[pos + 4:pos + 8], "little")
        pos += stream.RECORD_HEAD.size
        if rtype in _NAMED:
            if pos >= len(out):
                break
            pos += 1 + out[pos] + stream.SECTION_INFO.size
        if pos + 4 > len(out):
            break
        payload_len = int.from_bytes(out[pos:pos + 4], "little")
        pos += 4
        head_end = pos
        if pos + payload_len + stream.FOOTER_BYTES > len(out):
            break
        payload = memoryview(out)[pos:pos + payload_len]
        if rtype == stream.RecordType.PART and bytes(payload[:4]) == PACKET_MAGIC:
            payload[:] = packet(payload)
        pos += payload_len
        state = xxhash.xxh3_64(memoryview(out)[start:head_end])
        if not out[start + 1] & stream.FLAG_NOCSUM:
            state.update(memoryview(out)[head_end:pos])
        stream.FOOTER.pack_into(out, pos, stream.FOOTER_MAGIC, section_id, state.intdigest())
        pos += stream.FOOTER_BYTES
        if rtype == stream.RecordType.EOF:
            break
    return bytes(out), pos


def index(data: bytes | bytearray | memoryview, stream_bytes: int) -> bytes:
    """``data`` (a snapshot file) with the checksum and tail of the index that starts at
    ``stream_bytes`` recomputed for the ranges it declares, when they are all there."""
    out = bytearray(data)
    if len(out) < stream_bytes + INDEX_HEAD.size:
        return bytes(out)
    nranges = INDEX_HEAD.unpack_from(out, stream_bytes)[4]
    body_end = stream_bytes + INDEX_HEAD.size + nranges * INDEX_RANGE.size
    end = body_end + INDEX_SUM.size + INDEX_TAIL.size
    if nranges > MAX_INDEX_BYTES // INDEX_RANGE.size or end > len(out):
        return bytes(out)
    checksum = xxhash.xxh3_64_intdigest(memoryview(out)[stream_bytes:body_end])
    INDEX_SUM.pack_into(out, body_end, checksum)
    INDEX_TAIL.pack_into(out, body_end + INDEX_SUM.size,
                         body_end + INDEX_SUM.size - stream_bytes, INDEX_TAIL_MAGIC)
    return bytes(out)


def everything(data: bytes) -> bytes:
    """A stream with its records and packets repaired, and a snapshot index right after its
    EOF record repaired too."""
    fixed, end = records(data)
    if end < len(fixed) and fixed[end:end + 8] == INDEX_MAGIC:
        fixed = index(fixed, end)
    return fixed
