"""COMPRESSED runs: the LZ4 encoder equals the reference byte for byte (backoff state
included), compressible pages shrink and come back exactly, incompressible memory backs off,
and LZ4 data that lies is refused without a write outside its own run."""

from __future__ import annotations

import mmap
import struct

import lz4.block
import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from _core_helpers import (COMPILED, REF, encode_all, guest_memories, needs_compiled,
                           parse_runs, variant)  # noqa: F401
from pymig._coreshared import RUN_COMPRESSED, bitmap_words, new_compress_state
from pymig.errors import PacketError
from test_core_packet import _decode_both_fail_alike

pytestmark = needs_compiled

BLOCK = 3
PS = 4096
HEADER = struct.Struct("<4sHHIIIIQ")
RUN = struct.Struct("<QIBBH")
BACKENDS = [pytest.param(COMPILED, id="compiled"), pytest.param(REF, id="reference")]


def _all_dirty(npages: int) -> np.ndarray:
    return np.full(bitmap_words(npages), 2**64 - 1, dtype=np.uint64)


def _sparse(npages: int, page_size: int = PS) -> np.ndarray:
    """Pages that are zero but for one byte each: the dirtier's pages."""
    mem = np.zeros(npages * page_size, dtype=np.uint8)
    mem[::page_size] = np.arange(npages) % 255 + 1
    return mem


@given(guest_memories(), st.data())
def test_compressed_encode_matches_reference_byte_for_byte(variant, case, data):
    """Packet after packet, from any backoff state: same bytes, same results, same state."""
    page_size, npages, mem, bm = case
    capacity = data.draw(st.one_of(st.just(48 + page_size),
                                   st.integers(48 + page_size, 3 * page_size),
                                   st.just(1 << 20)))
    start = data.draw(st.sampled_from([(0, 0), (1, 1), (0, 3), (5, 7), (0, 7)]))
    state_c, state_r = new_compress_state(), new_compress_state()
    state_c[:] = state_r[:] = start
    bm_c, bm_r = bm.copy(), bm.copy()
    cursor = data.draw(st.integers(0, npages))
    while True:
        out_c, out_r = bytearray(b"\xee" * capacity), bytearray(b"\xee" * capacity)
        got = COMPILED.encode_packet(mem, page_size, BLOCK, bm_c, npages, cursor, out_c, state_c)
        want = REF.encode_packet(mem, page_size, BLOCK, bm_r, npages, cursor, out_r, state_r)
        assert got == want
        # (past nbytes, the compiled encoder may leave what it planned before compressing)
        assert out_c[:got.nbytes] == out_r[:got.nbytes]
        assert state_c.tolist() == state_r.tolist()
        assert np.array_equal(bm_c, bm_r)
        if got.nbytes == 0:
            break
        info = COMPILED.packet_info(out_c)
        assert info.nbytes == got.nbytes and info.record_count == got.runs
        assert info.checksum == xxhash.xxh3_64_intdigest(bytes(out_c[32:got.nbytes]) +
                                                         bytes(out_c[:24]))
        assert got.compressed_pages <= got.normal_pages
        cursor = got.cursor


@given(guest_memories(), st.data())
def test_compressed_round_trip(variant, case, data):
    """Whatever compresses or not, both decoders rebuild exactly the dirty pages."""
    page_size, npages, mem, bm = case
    capacity = data.draw(st.sampled_from([48 + page_size, 3 * page_size, 1 << 20]))
    state = new_compress_state()
    dest = np.random.default_rng(7).integers(0, 256, npages * page_size, dtype=np.uint8)
    expected = dest.copy()
    for page in COMPILED.bitmap_indices(bm, npages).tolist():
        expected[page * page_size:(page + 1) * page_size] = \
            mem[page * page_size:(page + 1) * page_size]
    packets, cursor, out = [], 0, bytearray(capacity)
    while True:
        result = COMPILED.encode_packet(mem, page_size, BLOCK, bm, npages, cursor, out, state)
        if result.nbytes == 0:
            break
        packets.append((bytes(out[:result.nbytes]), result))
        cursor = result.cursor
    for api, target in ((COMPILED, dest), (REF, dest.copy())):
        for packet, result in packets:
            decoded = api.decode_packet(packet, target, page_size, BLOCK, npages)
            assert decoded == (result.normal_pages, result.zero_pages, result.runs,
                               result.compressed_pages)
        assert np.array_equal(target, expected)


@pytest.mark.parametrize("api", BACKENDS)
def test_sparse_pages_travel_compressed_and_come_back_exactly(api):
    npages = 300
    mem = _sparse(npages)
    packets = encode_all(api, mem, PS, BLOCK, _all_dirty(npages), npages, 1 << 20)
    # without a compression state: the same pages, in full
    assert all(result.compressed_pages == 0 for _, result in packets)
    state = new_compress_state()
    bm, cursor, out, sent = _all_dirty(npages), 0, bytearray(1 << 20), []
    while (result := api.encode_packet(mem, PS, BLOCK, bm, npages, cursor, out, state)).nbytes:
        sent.append((bytes(out[:result.nbytes]), result))
        cursor = result.cursor
    assert sum(r.normal_pages for _, r in sent) == npages
    assert sum(r.compressed_pages for _, r in sent) == npages
    assert all(kind == RUN_COMPRESSED for packet, _ in sent for _, _, kind in parse_runs(packet))
    assert sum(len(packet) for packet, _ in sent) < npages * PS // 50
    dest = np.full(npages * PS, 0x5A, dtype=np.uint8)
    present = np.zeros(bitmap_words(npages), dtype=np.uint64)
    for packet, result in sent:
        assert api.decode_packet(packet, dest, PS, BLOCK, npages, present).compressed_pages == \
            result.compressed_pages
    assert np.array_equal(dest, mem)
    assert api.bitmap_count(present, npages) == npages  # LZ4-decoded pages are present


@pytest.mark.parametrize("api", BACKENDS)
def test_incompressible_memory_backs_off_and_compressible_memory_resets_it(api):
    """Units of 16 pages (64 KiB): a unit that fails skips 1, then 2, then 4 ... units."""
    npages = 128
    mem = np.random.default_rng(5).integers(0, 256, npages * PS, dtype=np.uint8)
    state = new_compress_state()
    out = bytearray(1 << 20)
    result = api.encode_packet(mem, PS, BLOCK, _all_dirty(npages), npages, 0, out, state)
    assert result.normal_pages == npages and result.compressed_pages == 0
    assert result.runs == npages // 16  # one record per unit
    # units 0, 2 and 5 were tried and failed (skips 1, 2, 4); units 6 and 7 used up two skips
    assert state.tolist() == [2, 3]
    sparse = _sparse(npages)
    result = api.encode_packet(sparse, PS, BLOCK, _all_dirty(npages), npages, 0, out, state)
    # two units go as they are while the backoff runs out; the first one tried compresses
    assert result.compressed_pages == npages - 32 and state.tolist() == [0, 0]


@pytest.mark.parametrize("api", BACKENDS)
def test_pages_larger_than_a_compression_unit_go_as_they_are(api):
    npages, page_size = 4, 128 * 1024
    state = new_compress_state()
    out = bytearray(1 << 20)
    result = api.encode_packet(_sparse(npages, page_size), page_size, BLOCK, _all_dirty(npages),
                               npages, 0, out, state)
    assert result.normal_pages == npages and result.compressed_pages == 0
    assert state.tolist() == [0, 0]


@pytest.mark.parametrize("api", BACKENDS)
@pytest.mark.parametrize("bad", [np.zeros(2, np.uint64), np.zeros(3, np.uint32), [0, 0],
                                 np.zeros(2, np.uint32)[::-1]])
def test_a_bad_compression_state_is_refused(api, bad):
    with pytest.raises(TypeError, match="new_compress_state"):
        api.encode_packet(_sparse(1), PS, BLOCK, _all_dirty(1), 1, 0, bytearray(1 << 16), bad)


# -------------------------------------------------------------------- hostile LZ4 runs

def _packet(runs, page_size: int = PS) -> bytes:
    """A packet of (first, count, kind, bytes after the record) runs, checksum right."""
    payload = b"".join(RUN.pack(first, count, kind, 0, 0) + extra
                       for first, count, kind, extra in runs)
    head = HEADER.pack(b"PMGP", 2, 0, BLOCK, page_size, len(runs), len(payload), 0)
    checksum = xxhash.xxh3_64_intdigest(payload + head[:24])
    return head[:24] + checksum.to_bytes(8, "little") + payload


def _lz4_run(block: bytes, reserved: int = 0, length: int | None = None) -> bytes:
    return struct.pack("<II", len(block) if length is None else length, reserved) + block


PATTERN = bytes(range(256)) * (2 * PS // 256)  # two pages that compress well


def test_a_handmade_lz4_run_decodes_in_both_backends():
    packet = _packet([(1, 2, 3, _lz4_run(lz4.block.compress(PATTERN, store_size=False)))])
    for api in (COMPILED, REF):
        mem = np.full(8 * PS, 7, dtype=np.uint8)
        assert api.decode_packet(packet, mem, PS, BLOCK, 8) == (2, 0, 1, 2)
        assert mem[PS:3 * PS].tobytes() == PATTERN
        assert not np.any(mem[:PS] != 7) and not np.any(mem[3 * PS:] != 7)


@pytest.mark.parametrize("extra, offset, words", [
    (_lz4_run(b"\xff" * 40), 32, "LZ4 data does not decode to the run's 8192 bytes"),
    (_lz4_run(lz4.block.compress(PATTERN[:PS], store_size=False)), 32,
     "LZ4 data does not decode"),                                     # one page short
    (_lz4_run(lz4.block.compress(PATTERN + PATTERN[:PS], store_size=False)), 32,
     "LZ4 data does not decode"),                                     # one page too many
    (_lz4_run(lz4.block.compress(PATTERN, store_size=False), reserved=1), 52,
     "reserved bytes are not zero"),
    (_lz4_run(b"\0" * 10, length=11), 48, "run 0: 19 bytes of page data overrun the payload "
                                          "(18 bytes left)"),
    (b"\0\0\0\0", 48, "run 0: 8 bytes of page data overrun the payload (4 bytes left)"),
    (_lz4_run(b"\0" * 8242), 40, "8192 bytes with 8242 bytes of LZ4 data"),  # > COMPRESSBOUND
])
def test_lying_lz4_runs_are_refused_alike_and_write_only_inside_their_run(variant, extra,
                                                                          offset, words):
    packet = _packet([(1, 2, 3, extra)])
    mem = np.random.default_rng(3).integers(0, 256, 8 * PS, dtype=np.uint8)
    got = _decode_both_fail_alike(packet, mem, PS, 8)
    assert got[0] == offset and words in got[1], got


def test_a_compressed_run_over_a_gib_is_refused_before_any_write():
    count = (1 << 18) + 1  # 4 KiB pages: 1 GiB + 4 KiB
    packet = _packet([(0, count, 3, _lz4_run(b"\0" * 16))])
    backing = mmap.mmap(-1, count * PS)  # never touched: the check comes first
    for api in (COMPILED, REF):
        with pytest.raises(PacketError) as caught:
            api.decode_packet(packet, backing, PS, BLOCK, count)
        assert caught.value.offset == 40
        assert f"a compressed run of {count * PS} bytes" in caught.value.reason


@given(st.binary(max_size=300), st.integers(1, 4), st.integers(0, 4), st.data())
def test_any_lz4_bytes_decode_or_are_refused_without_a_write_outside_their_run(
        variant, blob, count, first, data):
    """LZ4 data is untrusted: garbage, a valid block of another size, or a block cut short,
    in a packet whose checksum holds.  Both backends agree on success or on the error, and
    nothing outside the run's pages ever changes."""
    npages = 8
    if data.draw(st.booleans()):  # a real block of some size, maybe cut or padded
        raw = bytes(data.draw(st.binary(min_size=1, max_size=6 * 512)))
        blob = lz4.block.compress(raw, store_size=False)
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    packet = _packet([(first, count, 3, _lz4_run(blob))], page_size=512)
    mem = np.random.default_rng(9).integers(0, 256, npages * 512, dtype=np.uint8)
    outcomes = []
    for api in (COMPILED, REF):
        target = mem.copy()
        try:
            outcomes.append(("ok", api.decode_packet(packet, target, 512, BLOCK, npages)))
        except PacketError as error:
            outcomes.append(("error", error.offset, error.reason))
        outside = np.ones(npages * 512, dtype=bool)
        outside[first * 512:(first + count) * 512] = False
        assert np.array_equal(target[outside], mem[outside])
        if outcomes[-1][0] == "ok":
            assert target[first * 512:(first + count) * 512].tobytes() == \
                lz4.block.decompress(blob, uncompressed_size=count * 512)
    assert outcomes[0] == outcomes[1]
