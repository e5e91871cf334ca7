"""Page hashes (what page-sampling dirty-rate measurements compare): compiled == reference ==
xxh3-64 of each page, for every SIMD variant, page size and alignment; a changed byte
anywhere in a page changes its hash and no other; out-of-range indices are refused by both."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from _core_helpers import COMPILED, PAGE_SIZES, REF, needs_compiled, variant  # noqa: F401

pytestmark = needs_compiled


@st.composite
def memories(draw):
    """(page size, pages, a view of them at an odd offset, the page indices to hash)."""
    page_size = draw(st.sampled_from(PAGE_SIZES))
    npages = draw(st.integers(1, max(1, (1 << 18) // page_size)))
    offset = draw(st.sampled_from([0, 1, 8, 64]))
    raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(
        0, 256, offset + npages * page_size, dtype=np.uint8)
    if draw(st.booleans()):  # zero pages, and pages that differ in one byte only
        raw[offset:] = 0
        for page in draw(st.lists(st.integers(0, npages - 1), max_size=4)):
            raw[offset + page * page_size + draw(st.integers(0, page_size - 1))] = 1
    indices = draw(st.lists(st.integers(0, npages - 1), max_size=2 * npages))
    return page_size, npages, raw[offset:], np.array(indices, dtype=np.int64)


@given(memories())
def test_page_hashes_are_the_xxh3_of_each_page(variant, case):
    page_size, _, mem, pages = case
    expected = [xxhash.xxh3_64_intdigest(mem[p * page_size:(p + 1) * page_size].tobytes())
                for p in pages.tolist()]
    for api in (COMPILED, REF):
        hashes = api.page_hashes(mem, page_size, pages)
        assert hashes.dtype == np.uint64 and hashes.tolist() == expected


@given(memories(), st.data())
def test_a_write_changes_that_page_hash_only(variant, case, data):
    page_size, npages, mem, _ = case
    pages = np.arange(npages, dtype=np.int64)
    before = COMPILED.page_hashes(mem, page_size, pages)
    page = data.draw(st.integers(0, npages - 1))
    where = data.draw(st.sampled_from([0, page_size - 1, page_size // 2]))
    mem = mem.copy()
    mem[page * page_size + where] ^= data.draw(st.integers(1, 255))
    for api in (COMPILED, REF):
        changed = np.flatnonzero(api.page_hashes(mem, page_size, pages) != before).tolist()
        assert changed == [page]


@pytest.mark.parametrize("bad", [-1, 4, 1 << 40])
def test_pages_outside_the_memory_are_refused_by_both(variant, bad):
    mem = np.zeros(4 * 4096, dtype=np.uint8)
    for api in (COMPILED, REF):
        with pytest.raises(ValueError, match="outside the buffer"):
            api.page_hashes(mem, 4096, np.array([0, bad], dtype=np.int64))


def test_no_pages_no_hashes(variant):
    for api in (COMPILED, REF):
        assert api.page_hashes(b"", 4096, []).tolist() == []
        assert api.page_hashes(np.zeros(4096, np.uint8), 4096, []).dtype == np.uint64
