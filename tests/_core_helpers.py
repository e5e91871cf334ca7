"""Shared pieces of the page-core tests: both backends, the SIMD variant fixture, strategies,
and an independent packet builder/parser used as the tests' own oracle."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import strategies as st

from pymig._coreshared import SIMD_VARIANTS, bitmap_words
from pymig.core import load_backend

REF = load_backend("reference")
try:
    COMPILED = load_backend("compiled")
    COMPILED_MISSING = None
except ImportError as exc:  # pragma: no cover - the build is part of every test run here
    COMPILED = None
    COMPILED_MISSING = str(exc)

needs_compiled = pytest.mark.skipif(COMPILED is None, reason=f"{COMPILED_MISSING}")

PAGE_SIZES = [512 << k for k in range(8)]  # 512 .. 65536


def _runnable_variants() -> list[str]:
    """The SIMD variants this CPU/OS can run and PYMIG_DISABLE_SIMD leaves on.  A variant the
    machine cannot run is not a test to skip here: test_core_dispatch checks it is reported as
    unavailable, and the machines that have it run its tests."""
    if COMPILED is None:
        return []
    info = COMPILED.cpu_info()
    return [v for v in SIMD_VARIANTS if v in info["available"] and v not in info["disabled"]]


RUNNABLE_VARIANTS = _runnable_variants()


@pytest.fixture(scope="module", params=RUNNABLE_VARIANTS or [pytest.param(
    None, marks=pytest.mark.skip(reason=str(COMPILED_MISSING)))])
def variant(request):
    """Runs the module's tests once per SIMD variant this machine can run, then restores the
    variant chosen at import."""
    from pymig._core import cpu

    chosen = cpu.cpu_info()["variant"]
    cpu._set_variant(request.param)
    yield request.param
    cpu._set_variant(chosen)

# ----------------------------------------------------------------------------- bitmaps


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """bool array (length a multiple of 64) -> KVM-layout uint64 words."""
    return np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)


@st.composite
def bitmaps(draw, max_pages: int = 2000):
    """(npages, bm): npages often not a multiple of 64, extra words, bits past npages set,
    densities from empty to full, and long runs as well as scattered bits."""
    npages = draw(st.one_of(st.integers(0, max_pages),
                            st.sampled_from([1, 63, 64, 65, 127, 128, 129, 255, 256, 257])))
    words = bitmap_words(npages) + draw(st.integers(0, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        density = draw(st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5, 0.9, 1.0]))
        bits = rng.random(words * 64) < density
    else:
        bits = np.zeros(words * 64, dtype=bool)
        for _ in range(draw(st.integers(0, 8))):
            start = int(rng.integers(0, max(1, words * 64)))
            bits[start:start + int(rng.integers(1, 300))] = True
    if draw(st.booleans()):
        bits[npages:] = True  # garbage past npages must be ignored
    return npages, pack_bits(bits)


def bits_of(bm: np.ndarray, npages: int) -> set[int]:
    """The set bits below npages, by shifting each page's word (not the reference's way)."""
    pages = np.arange(npages, dtype=np.uint64)
    hit = (bm[pages // np.uint64(64)] >> (pages % np.uint64(64))) & np.uint64(1)
    return set(np.flatnonzero(hit).tolist())

# ----------------------------------------------------------------------------- packets

HEADER = struct.Struct("<4sHHIIIIQ")
RUN = struct.Struct("<QIBBH")


def build_packet(runs, page_size: int, block_id: int = 0, *, data: bytes | None = None,
                 records: int | None = None, payload_len: int | None = None,
                 magic: bytes = b"PMGP", version: int = 2, flags: int = 0,
                 checksum: int | None = None) -> bytes:
    """A packet from (first_page, page_count, kind[, reserved8, reserved16]) tuples, NORMAL
    runs filled with ``data`` (default: a byte pattern); every field can be overridden and the
    checksum is computed over whatever results, so structural faults are reached."""
    payload = bytearray()
    for run in runs:
        first, count, kind, r8, r16 = (tuple(run) + (0, 0))[:5]
        payload += RUN.pack(first, count, kind, r8, r16)
        if kind == 1:
            n = count * page_size
            payload += (data[:n] if data is not None else bytes((first + i) % 251 + 1
                                                                  for i in range(n)))
    head = HEADER.pack(magic, version, flags, block_id, page_size,
                       len(runs) if records is None else records,
                       len(payload) if payload_len is None else payload_len, 0)
    if checksum is None:
        checksum = xxhash.xxh3_64_intdigest(bytes(payload) + head[:24])
    return head[:24] + checksum.to_bytes(8, "little") + bytes(payload)


def parse_runs(packet) -> list[tuple[int, int, int]]:
    """(first_page, page_count, kind) of each run of a well-formed packet."""
    packet = bytes(packet)
    records = HEADER.unpack_from(packet)[5]
    runs, off = [], 32
    for _ in range(records):
        first, count, kind, _, _ = RUN.unpack_from(packet, off)
        runs.append((first, count, kind))
        off += 16
        if kind == 1:
            off += count * HEADER.unpack_from(packet)[4]
        elif kind == 3:  # u32 LZ4 length, u32 reserved, the LZ4 block
            off += 8 + int.from_bytes(packet[off:off + 4], "little")
    return runs


@st.composite
def guest_memories(draw, max_bytes: int = 1 << 20):
    """(page_size, npages, mem, dirty bitmap): pages zero, fully random, or zero but for one
    byte (first, last or anywhere); the memory view starts at a drawn misalignment."""
    page_size = draw(st.sampled_from(PAGE_SIZES))
    npages = draw(st.integers(1, max(1, min(300, max_bytes // page_size))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offset = draw(st.sampled_from([0, 1, 8, 33]))
    raw = np.zeros(npages * page_size + offset, dtype=np.uint8)
    mem = raw[offset:]
    kinds = rng.choice(4, size=npages, p=draw(st.sampled_from(
        [[0.25, 0.25, 0.25, 0.25], [0.9, 0.05, 0.05, 0.0], [0.0, 1.0, 0.0, 0.0]])))
    for page, kind in enumerate(kinds):
        base = page * page_size
        if kind == 1:
            mem[base:base + page_size] = rng.integers(0, 256, page_size, dtype=np.uint8)
        elif kind == 2:
            mem[base + page_size - 1] = rng.integers(1, 256)
        elif kind == 3:
            mem[base + int(rng.integers(page_size))] = rng.integers(1, 256)
    density = draw(st.sampled_from([0.05, 0.5, 1.0]))
    bits = np.zeros(bitmap_words(npages) * 64, dtype=bool)
    bits[:npages] = rng.random(npages) < density
    bits[npages:] = draw(st.booleans())
    return page_size, npages, mem, pack_bits(bits)


def encode_all(api, mem, page_size, block_id, bm, npages, capacity):
    """Every packet encode_packet makes from bm, until it reports nothing left."""
    packets, cursor = [], 0
    out = bytearray(capacity)
    while True:
        result = api.encode_packet(mem, page_size, block_id, bm, npages, cursor, out)
        if result.nbytes == 0:
            return packets
        packets.append((bytes(out[:result.nbytes]), result))
        cursor = result.cursor
