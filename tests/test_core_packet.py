"""RAM packets: encode == reference byte for byte, round trips, splitting at the capacity,
and malformed packets refused with the same PacketError by both backends, without writes
outside the pages a packet declares."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from _core_helpers import (COMPILED, REF, bits_of, build_packet, encode_all, guest_memories,
                           needs_compiled, parse_runs, variant)  # noqa: F401
from pymig._coreshared import bitmap_words, new_compress_state
from pymig.errors import PacketError

pytestmark = needs_compiled

BLOCK = 3


@pytest.mark.parametrize("size", [0, 1, 16, 17, 128, 129, 240, 241, 256, 1024, 4096, 65537,
                                  1 << 20])
def test_vendored_xxh3_matches_the_xxhash_package(variant, size):
    from pymig._core.packet import _xxh3_64

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert _xxh3_64(data) == xxhash.xxh3_64_intdigest(data)


def _capacity(draw, page_size):
    return draw(st.one_of(st.just(48 + page_size), st.integers(48 + page_size, 3 * page_size),
                          st.just(1 << 20)))


@given(guest_memories(), st.data())
def test_encode_matches_reference_byte_for_byte(variant, case, data):
    page_size, npages, mem, bm = case
    capacity = _capacity(data.draw, page_size)
    cursor = data.draw(st.integers(0, npages))
    out_c, out_r = bytearray(b"\xee" * capacity), bytearray(b"\xee" * capacity)
    bm_c, bm_r = bm.copy(), bm.copy()
    got = COMPILED.encode_packet(mem, page_size, BLOCK, bm_c, npages, cursor, out_c)
    want = REF.encode_packet(mem, page_size, BLOCK, bm_r, npages, cursor, out_r)
    assert got == want
    assert out_c == out_r  # including the untouched tail
    assert np.array_equal(bm_c, bm_r)
    if got.nbytes:
        info = COMPILED.packet_info(out_c)
        assert info == REF.packet_info(out_r)
        assert info.nbytes == got.nbytes and info.record_count == got.runs
        assert info.checksum == xxhash.xxh3_64_intdigest(bytes(out_c[32:got.nbytes]) +
                                                         bytes(out_c[:24]))


@given(guest_memories(), st.data())
def test_round_trip_and_splitting(variant, case, data):
    """All packets of a bitmap rebuild the dirty pages exactly; every packet but the last is
    full (its next page would not fit); pages come in order, each once."""
    page_size, npages, mem, bm = case
    capacity = _capacity(data.draw, page_size)
    dirty = COMPILED.bitmap_indices(bm, npages).tolist()
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    dest = rng.integers(0, 256, npages * page_size, dtype=np.uint8)
    dest[: page_size * (npages // 2)] = 0  # some destination pages already zero
    expected = dest.copy()
    for page in dirty:
        expected[page * page_size:(page + 1) * page_size] = mem[page * page_size:
                                                                (page + 1) * page_size]
    work = bm.copy()
    packets = encode_all(COMPILED, mem, page_size, BLOCK, work, npages, capacity)
    assert COMPILED.bitmap_count(work, npages) == 0
    assert np.array_equal(work[npages // 64 + 1:], bm[npages // 64 + 1:])

    seen = []
    targets = [(COMPILED, dest), (REF, dest.copy())]
    for i, (packet, result) in enumerate(packets):
        runs = parse_runs(packet)
        assert len(packet) <= capacity and result.runs == len(runs)
        seen += [first + k for first, count, _ in runs for k in range(count)]
        if i + 1 < len(packets):
            nxt = result.cursor
            kind = 2 if not mem[nxt * page_size:(nxt + 1) * page_size].any() else 1
            last_first, last_count, last_kind = runs[-1]
            extends = last_kind == kind and last_first + last_count == nxt
            need = (page_size if kind == 1 else 0) + (0 if extends else 16)
            assert len(packet) + need > capacity
        for api, target in targets:
            decoded = api.decode_packet(packet, target, page_size, BLOCK, npages)
            assert decoded == (result.normal_pages, result.zero_pages, result.runs, 0)
    assert seen == dirty
    for _, target in targets:
        assert np.array_equal(target, expected)


@given(guest_memories(max_bytes=1 << 18), st.data())
def test_round_trip_with_present_bitmap(variant, case, data):
    page_size, npages, mem, bm = case
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    present_bits = rng.random(bitmap_words(npages) * 64) < 0.5
    present = np.packbits(present_bits, bitorder="little").view("<u8").astype(np.uint64)
    dest = np.zeros(npages * page_size, dtype=np.uint8)
    for page in np.flatnonzero(present_bits[:npages]):  # only present pages may hold data
        dest[page * page_size + int(rng.integers(page_size))] = 0xAB
    dirty = COMPILED.bitmap_indices(bm, npages).tolist()
    expected_dest = dest.copy()
    expected_present = set(np.flatnonzero(present_bits[:npages]).tolist())
    for page in dirty:
        chunk = mem[page * page_size:(page + 1) * page_size]
        expected_dest[page * page_size:(page + 1) * page_size] = chunk
        (expected_present.add if chunk.any() else expected_present.discard)(page)

    results = []
    for api in (COMPILED, REF):
        work, target, known = bm.copy(), dest.copy(), present.copy()
        for packet, _ in encode_all(api, mem, page_size, BLOCK, work, npages,
                                     4 * page_size):
            api.decode_packet(packet, target, page_size, BLOCK, npages, present=known)
        assert np.array_equal(target, expected_dest)
        results.append(known)
    assert np.array_equal(results[0], results[1])
    assert bits_of(results[0], npages) == expected_present
    tail = bitmap_words(npages)
    assert np.array_equal(results[0][tail:], present[tail:])


def _digest_outside(mem: np.ndarray, page_size: int, runs) -> bytes:
    """Hash of every byte of mem outside the pages the runs declare."""
    keep = np.ones(len(mem), dtype=bool)
    for first, count, _ in runs:
        keep[first * page_size:(first + count) * page_size] = False
    return hashlib.sha256(mem[keep].tobytes()).digest()


def _declared_runs(packet: bytes, npages: int) -> list[tuple[int, int, int]]:
    """Runs a (possibly damaged) packet declares, as far as they parse and lie in range."""
    try:
        runs = parse_runs(packet)
    except Exception:
        return []
    return [(f, c, k) for f, c, k in runs if f < npages and c <= npages - f]


def _decode_both_fail_alike(packet, mem, page_size, npages, present=None):
    """Decode with both backends into copies of mem; both must raise the same PacketError and
    leave everything outside the declared pages as it was (everything, unless only the
    checksum was wrong).  Returns the error."""
    errors = []
    for api in (COMPILED, REF):
        target = mem.copy()
        known = None if present is None else present.copy()
        with pytest.raises(PacketError) as caught:
            api.decode_packet(packet, target, page_size, BLOCK, npages, present=known)
        error = caught.value
        assert isinstance(error.offset, int) and error.reason
        # a bad checksum is found after the structure checks, LZ4 data that does not decode
        # while writing its own run: only the declared pages may have changed
        if error.reason.startswith("checksum mismatch") or "LZ4 data" in error.reason:
            runs = _declared_runs(packet, npages)
            assert _digest_outside(target, page_size, runs) == _digest_outside(mem, page_size,
                                                                                runs)
        else:
            assert np.array_equal(target, mem)
            assert present is None or np.array_equal(known, present)
        errors.append((error.offset, error.reason))
    assert errors[0] == errors[1]
    return errors[0]


@st.composite
def valid_packets(draw):
    page_size, npages, mem, bm = draw(guest_memories(max_bytes=1 << 16))
    out = bytearray(draw(st.integers(48 + page_size, 4 * page_size + 200)))
    compress = new_compress_state() if draw(st.booleans()) else None  # LZ4 runs too
    result = COMPILED.encode_packet(mem, page_size, BLOCK, bm.copy(), npages, 0, out, compress)
    if result.nbytes == 0:  # nothing dirty: make one page dirty
        bm = np.ones(bitmap_words(npages), dtype=np.uint64)
        result = COMPILED.encode_packet(mem, page_size, BLOCK, bm, npages, 0, out, compress)
    return page_size, npages, bytes(out[:result.nbytes])


@given(valid_packets(), st.data())
def test_bit_flips_are_refused_identically(variant, case, data):
    page_size, npages, packet = case
    damaged = bytearray(packet)
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.one_of(st.integers(0, 47), st.integers(0, len(packet) - 1)))
        damaged[position] ^= 1 << data.draw(st.integers(0, 7))
    if bytes(damaged) == packet:
        return  # flips cancelled out
    mem = np.random.default_rng(1).integers(0, 256, npages * page_size, dtype=np.uint8)
    _decode_both_fail_alike(bytes(damaged), mem, page_size, npages)


@given(valid_packets(), st.data())
def test_truncated_and_extended_packets_are_refused(variant, case, data):
    page_size, npages, packet = case
    cut = data.draw(st.integers(0, len(packet) - 1))
    mem = np.zeros(npages * page_size, dtype=np.uint8)
    mem[::97] = 5
    present = np.full(bitmap_words(npages), 2**64 - 1, dtype=np.uint64)
    offset, reason = _decode_both_fail_alike(packet[:cut], mem, page_size, npages, present)
    if cut < 32:
        assert (offset, reason) == (cut, f"packet header truncated: {cut} of 32 bytes")
    else:
        assert offset == 20 and "payload" in reason
    offset, reason = _decode_both_fail_alike(packet + b"\0", mem, page_size, npages)
    assert offset == 20


PS = 512


@pytest.mark.parametrize("packet, npages, offset, reason", [
    (build_packet([(0, 1, 1)], PS, BLOCK, magic=b"PMGQ"), 8, 0, "bad magic b'PMGQ'"),
    (build_packet([(0, 1, 1)], PS, BLOCK, version=1), 8, 4, "unsupported packet version 1"),
    (build_packet([(0, 1, 1)], PS, BLOCK, flags=1), 8, 6, "unknown packet flags 0x0001"),
    (build_packet([], 768, BLOCK), 8, 12, "page size 768 is not a power of two"),
    (build_packet([(0, 1, 2)], PS, BLOCK, records=2), 8, 16, "2 run records cannot fit"),
    (build_packet([(0, 1, 1)], PS, BLOCK + 1), 8, 8, "packet is for block 4, expected block 3"),
    (build_packet([(0, 1, 1)], 1024, BLOCK), 8, 12, "packet page size 1024, expected 512"),
    (build_packet([(0, 1, 2)], PS, BLOCK, payload_len=17), 8, 20, "17-byte payload"),
    (build_packet([(0, 1, 2), (1, 1, 2)], PS, BLOCK, records=1), 8, 48,
     "16 payload bytes follow the last of 1 run records"),
    (build_packet([(0, 0, 2)], PS, BLOCK), 8, 40, "run 0 has no pages"),
    (build_packet([(0, 1, 5)], PS, BLOCK), 8, 44, "run 0: unknown run kind 5"),
    (build_packet([(0, 1, 4)], PS, BLOCK), 8, 44, "run 0: unknown run kind 4"),
    (build_packet([(0, 1, 2, 1)], PS, BLOCK), 8, 45, "run 0: reserved bytes are not zero"),
    (build_packet([(0, 1, 2, 0, 256)], PS, BLOCK), 8, 46, "run 0: reserved bytes are not zero"),
    (build_packet([(7, 2, 2)], PS, BLOCK), 8, 32, "run 0: pages [7, 9) are outside"),
    (build_packet([(2**64 - 1, 2, 2)], PS, BLOCK), 8, 32, "are outside the block's 8 pages"),
    (build_packet([(0, 1, 2), (8, 1, 2)], PS, BLOCK), 8, 48, "run 1: pages [8, 9)"),
    (build_packet([(2, 3, 2), (4, 1, 2)], PS, BLOCK), 8, 48,
     "run 1 starts at page 4, before the end of the previous run (page 5)"),
    (build_packet([(0, 1, 1)], PS, BLOCK, data=bytes(PS))[:-1], 8, 20, "payload"),
    (build_packet([(0, 2, 1)], PS, BLOCK, data=bytes(PS))[:-1], 8, 20, "payload"),
])
def test_specific_faults(packet, npages, offset, reason):
    mem = np.full(npages * PS, 7, dtype=np.uint8)
    got = _decode_both_fail_alike(packet, mem, PS, npages)
    assert got[0] == offset and reason in got[1], got


def test_run_data_overrun_and_checksum_offsets():
    # a NORMAL run whose data is cut short, with the header's payload length telling the truth
    short = build_packet([(0, 2, 1)], PS, BLOCK, data=bytes(2 * PS))
    short = build_packet([(0, 2, 1)], PS, BLOCK, data=bytes(PS),
                         payload_len=len(short) - 32 - PS)
    mem = np.zeros(4 * PS, dtype=np.uint8)
    assert _decode_both_fail_alike(short, mem, PS, 4) == (
        48, f"run 0: {2 * PS} bytes of page data overrun the payload ({PS} bytes left)")
    good = build_packet([(1, 1, 1)], PS, BLOCK)
    bad = good[:24] + (int.from_bytes(good[24:32], "little") ^ 1).to_bytes(8, "little") + \
        good[32:]
    offset, reason = _decode_both_fail_alike(bad, mem, PS, 4)
    assert offset == 24 and reason.startswith("checksum mismatch")
    assert COMPILED.decode_packet(good, mem, PS, BLOCK, 4) == (1, 0, 1, 0)


@pytest.mark.parametrize("api", [pytest.param(COMPILED, id="compiled"),
                                 pytest.param(REF, id="reference")])
def test_packet_info(api):
    packet = build_packet([(0, 1, 1), (5, 2, 2)], PS, BLOCK)
    info = api.packet_info(packet + b"trailing bytes are not read")
    assert info == (2, BLOCK, PS, 2, len(packet) - 32,
                    int.from_bytes(packet[24:32], "little"), len(packet))
    for cut in (0, 5, 31):
        with pytest.raises(PacketError) as caught:
            api.packet_info(packet[:cut])
        assert caught.value.offset == cut
    with pytest.raises(PacketError, match="bad magic"):
        api.packet_info(b"\0" * 32)


@pytest.mark.parametrize("api", [pytest.param(COMPILED, id="compiled"),
                                 pytest.param(REF, id="reference")])
def test_bad_arguments_raise_the_same_errors(api):
    mem = np.zeros(8 * 4096, dtype=np.uint8)
    bm = np.ones(1, dtype=np.uint64)
    out = bytearray(1 << 16)
    with pytest.raises(ValueError, match="needs at least"):
        api.encode_packet(mem, 4096, 0, bm, 8, 0, bytearray(4096 + 47))
    with pytest.raises(TypeError, match="writable"):
        api.encode_packet(mem, 4096, 0, bm, 8, 0, bytes(1 << 16))
    with pytest.raises(ValueError, match="too short"):
        api.encode_packet(mem, 4096, 0, bm, 9, 0, out)
    with pytest.raises(ValueError, match="power of two"):
        api.encode_packet(mem, 4095, 0, bm, 8, 0, out)
    with pytest.raises(ValueError):
        api.encode_packet(mem, 4096, 2**32, bm, 8, 0, out)
    with pytest.raises(ValueError):
        api.encode_packet(mem, 4096, 0, bm, 8, 9, out)
    with pytest.raises(ValueError):
        api.encode_packet(mem, 4096, 0, bm.astype(np.float64), 8, 0, out)
    assert int(bm[0]) == 1  # nothing taken by a refused call
    packet = build_packet([(0, 1, 2)], 4096, 0)
    with pytest.raises(TypeError, match="writable"):
        api.decode_packet(packet, bytes(mem), 4096, 0, 8)
    with pytest.raises(ValueError, match="words"):
        api.decode_packet(packet, mem, 4096, 0, 8, present=np.zeros(0, dtype=np.uint64))
    assert api.encode_packet(mem, 4096, 0, np.zeros(0, np.uint64), 0, 0, out) == (0, 0, 0, 0, 0, 0)


def _runs_or_fault(api, packet, page_size, npages):
    try:
        return api.packet_runs(packet, page_size, BLOCK, npages).tolist()
    except PacketError as error:
        return (error.offset, error.reason)


@given(valid_packets(), st.data())
def test_packet_runs_match_the_reference_and_the_runs_declared(variant, case, data):
    page_size, npages, packet = case
    runs = COMPILED.packet_runs(packet, page_size, BLOCK, npages)
    assert runs.dtype == np.int64 and runs.shape[1] == 2
    assert runs.tolist() == [[first, count] for first, count, _ in parse_runs(packet)]
    assert runs.tolist() == REF.packet_runs(packet, page_size, BLOCK, npages).tolist()
    # damaged or cut short: both refuse it the same way (or, where only the checksum
    # would notice, both read the same runs)
    damaged = bytearray(packet[:data.draw(st.integers(0, len(packet)))])
    if damaged:
        damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    assert (_runs_or_fault(COMPILED, bytes(damaged), page_size, npages)
            == _runs_or_fault(REF, bytes(damaged), page_size, npages))
