"""Zero-page kernels: compiled == reference == the obvious answer, for every variant, with the
single non-zero byte anywhere (first, last, block edges) and any alignment."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _core_helpers import (COMPILED, PAGE_SIZES, REF, bits_of, needs_compiled,
                           variant)  # noqa: F401
from pymig._coreshared import bitmap_words

pytestmark = needs_compiled


@st.composite
def buffers_with_one_byte(draw):
    """(buffer view, index of the one non-zero byte or None): lengths around the 64/256-byte
    blocks and page sizes, misaligned starts, non-zero bytes just outside the view."""
    length = draw(st.one_of(st.integers(0, 600), st.sampled_from(PAGE_SIZES),
                            st.integers(0, 70000)))
    offset = draw(st.integers(0, 70))
    raw = np.zeros(offset + length + 64, dtype=np.uint8)
    raw[:offset] = 0xFF  # neighbours a kernel must not read
    raw[offset + length:] = 0xFF
    position = None
    if length and draw(st.booleans()):
        position = draw(st.one_of(st.sampled_from([0, length - 1, min(31, length - 1),
                                                   min(255, length - 1),
                                                   min(256, length - 1)]),
                                  st.integers(0, length - 1)))
        raw[offset + position] = draw(st.integers(1, 255))
    return raw[offset:offset + length], position


@given(buffers_with_one_byte())
def test_is_zero(variant, case):
    buf, position = case
    assert COMPILED.is_zero(buf) is REF.is_zero(buf) is (position is None)


@st.composite
def pages_cases(draw):
    page_size = draw(st.sampled_from(PAGE_SIZES))
    npages = draw(st.integers(1, max(1, (1 << 19) // page_size)))
    offset = draw(st.sampled_from([0, 3, 64]))
    raw = np.zeros(npages * page_size + offset, dtype=np.uint8)
    mem = raw[offset:]
    nonzero = {}
    for page in draw(st.lists(st.integers(0, npages - 1), max_size=npages)):
        where = draw(st.one_of(st.sampled_from([0, page_size - 1]),
                               st.integers(0, page_size - 1)))
        mem[page * page_size + where] = 1
        nonzero[page] = where
    return page_size, npages, mem, nonzero


@given(pages_cases(), st.data())
def test_zero_pages(variant, case, data):
    page_size, npages, mem, nonzero = case
    pages = data.draw(st.lists(st.integers(0, npages - 1), max_size=2 * npages))
    expected = [p not in nonzero for p in pages]
    for api in (COMPILED, REF):
        result = api.zero_pages(mem, page_size, np.array(pages, dtype=np.int64))
        assert result.dtype == np.bool_ and result.tolist() == expected


@given(pages_cases(), st.integers(0, 2**32 - 1))
def test_zero_bitmap(variant, case, seed):
    page_size, npages, mem, nonzero = case
    bits = np.random.default_rng(seed).random(bitmap_words(npages) * 64) < 0.6
    bm = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
    expected = {p for p in bits_of(bm, npages) if p not in nonzero}
    compiled = COMPILED.zero_bitmap(mem, page_size, bm, npages)
    assert np.array_equal(compiled, REF.zero_bitmap(mem, page_size, bm, npages))
    assert bits_of(compiled, npages) == expected
    assert compiled.dtype == np.uint64 and compiled.shape == (bitmap_words(npages),)


def test_mmap_and_bytes_buffers(variant):
    with mmap.mmap(-1, 1 << 20) as mem:
        assert COMPILED.is_zero(mem)
        mem[(1 << 20) - 1] = 1
        assert not COMPILED.is_zero(mem)
        assert COMPILED.zero_pages(mem, 4096, [0, 255]).tolist() == [True, False]
    assert COMPILED.is_zero(b"") and REF.is_zero(b"")
    assert COMPILED.is_zero(np.zeros(9, dtype=np.uint64))  # any buffer, viewed as bytes


@pytest.mark.parametrize("api", [pytest.param(COMPILED, id="compiled"),
                                 pytest.param(REF, id="reference")])
def test_bad_arguments_raise_the_same_errors(api):
    mem = np.zeros(8192, dtype=np.uint8)
    for page_size in (256, 1000, 3 << 12, 0, -4096):
        with pytest.raises(ValueError, match="power of two"):
            api.zero_pages(mem, page_size, [0])
    with pytest.raises(ValueError, match="outside"):
        api.zero_pages(mem, 4096, [0, 2])
    with pytest.raises(ValueError, match="outside"):
        api.zero_pages(mem, 4096, [-1])
    with pytest.raises(ValueError, match="outside"):
        api.zero_pages(mem, 4096, np.array([2**63 + 1], dtype=np.uint64))
    with pytest.raises(TypeError):
        api.zero_pages(mem, 4096, [0.5])
    with pytest.raises(ValueError, match="too short"):
        api.zero_bitmap(mem, 4096, np.ones(1, dtype=np.uint64), 3)
    with pytest.raises(ValueError, match="contiguous"):
        api.is_zero(np.zeros((4, 4), dtype=np.uint8)[:, 1])
    with pytest.raises(TypeError):
        api.is_zero(12)
    assert api.zero_pages(mem, 4096, []).tolist() == []
