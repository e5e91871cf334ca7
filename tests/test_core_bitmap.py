"""Dirty-bitmap kernels: compiled == reference == a plain-Python model, for every variant."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from _core_helpers import COMPILED, REF, bitmaps, bits_of, needs_compiled, variant  # noqa: F401
from pymig._coreshared import bitmap_words

pytestmark = needs_compiled


@given(bitmaps())
def test_count_indices_runs_match_reference_and_model(variant, case):
    npages, bm = case
    before = bm.copy()
    model = sorted(bits_of(bm, npages))
    assert COMPILED.bitmap_count(bm, npages) == REF.bitmap_count(bm, npages) == len(model)
    indices = COMPILED.bitmap_indices(bm, npages)
    assert indices.dtype == np.int64
    assert indices.tolist() == REF.bitmap_indices(bm, npages).tolist() == model
    runs = COMPILED.bitmap_runs(bm, npages)
    assert runs.dtype == np.int64 and runs.shape == (len(runs), 2)
    assert runs.tolist() == REF.bitmap_runs(bm, npages).tolist()
    expanded = [start + k for start, length in runs.tolist() for k in range(length)]
    assert expanded == model
    assert all(a[0] + a[1] < b[0] for a, b in zip(runs.tolist(), runs.tolist()[1:]))
    assert np.array_equal(bm, before)  # read-only kernels


@given(bitmaps(), st.data())
def test_find_next(variant, case, data):
    npages, bm = case
    start = data.draw(st.integers(0, npages + 130))
    later = [i for i in sorted(bits_of(bm, npages)) if i >= start]
    expected = later[0] if later else npages
    assert COMPILED.bitmap_find_next(bm, npages, start) == expected
    assert REF.bitmap_find_next(bm, npages, start) == expected


@given(bitmaps(), st.data())
def test_test_and_clear(variant, case, data):
    npages, bm = case
    start = data.draw(st.integers(0, npages + 70))
    count = data.draw(st.one_of(st.integers(0, npages + 70), st.just(2**62)))
    compiled, reference = bm.copy(), bm.copy()
    expected = len({i for i in bits_of(bm, npages) if start <= i < start + count})
    assert COMPILED.bitmap_test_and_clear(compiled, npages, start, count) == expected
    assert REF.bitmap_test_and_clear(reference, npages, start, count) == expected
    assert np.array_equal(compiled, reference)
    assert bits_of(compiled, npages) == {i for i in bits_of(bm, npages)
                                         if not start <= i < start + count}
    _assert_tail_unchanged(compiled, bm, npages)


@given(bitmaps(), st.data())
def test_set_range(variant, case, data):
    npages, bm = case
    start = data.draw(st.integers(0, npages + 5))
    count = data.draw(st.integers(0, npages + 5))
    compiled, reference = bm.copy(), bm.copy()
    if start + count > npages:
        for api, target in ((COMPILED, compiled), (REF, reference)):
            with pytest.raises(ValueError):
                api.bitmap_set_range(target, npages, start, count)
        assert np.array_equal(compiled, bm) and np.array_equal(reference, bm)
        return
    COMPILED.bitmap_set_range(compiled, npages, start, count)
    REF.bitmap_set_range(reference, npages, start, count)
    assert np.array_equal(compiled, reference)
    assert bits_of(compiled, npages) == bits_of(bm, npages) | set(range(start, start + count))
    _assert_tail_unchanged(compiled, bm, npages)


@given(bitmaps(), st.integers(0, 2**32 - 1))
def test_merge(variant, case, seed):
    npages, src = case
    rng = np.random.default_rng(seed)
    dst = rng.integers(0, 2**64, size=len(src), dtype=np.uint64, endpoint=False)
    dst &= rng.integers(0, 2**64, size=len(src), dtype=np.uint64, endpoint=False)
    compiled, reference = dst.copy(), dst.copy()
    new = bits_of(src, npages) - bits_of(dst, npages)
    assert COMPILED.bitmap_merge(compiled, src, npages) == len(new)
    assert REF.bitmap_merge(reference, src, npages) == len(new)
    assert np.array_equal(compiled, reference)
    assert bits_of(compiled, npages) == bits_of(dst, npages) | bits_of(src, npages)
    _assert_tail_unchanged(compiled, dst, npages)


def _assert_tail_unchanged(after: np.ndarray, before: np.ndarray, npages: int) -> None:
    """Bits at npages and beyond are never modified."""
    mask = np.zeros(len(before), dtype=np.uint64)
    words = bitmap_words(npages)
    mask[words:] = np.uint64(2**64 - 1)
    if npages % 64:
        mask[words - 1] = np.uint64(((1 << 64) - 1) ^ ((1 << (npages % 64)) - 1))
    assert np.array_equal(after & mask, before & mask)


def test_large_sparse_and_full_bitmaps(variant):
    """Word skipping (four empty words at a time) and all-ones words, at 64 GiB scale / 16."""
    npages = (1 << 20) + 37
    bm = np.zeros(bitmap_words(npages), dtype=np.uint64)
    pages = [0, 1, 63, 64, 255, 256, 4095, 70000, 70001, npages - 1]
    for page in pages:
        bm[page // 64] |= np.uint64(1 << (page % 64))
    bm[-1] |= np.uint64(1 << 63)  # past npages
    assert COMPILED.bitmap_indices(bm, npages).tolist() == pages
    assert COMPILED.bitmap_runs(bm, npages).tolist() == [
        [0, 2], [63, 2], [255, 2], [4095, 1], [70000, 2], [npages - 1, 1]]
    full = np.full(bitmap_words(npages), 2**64 - 1, dtype=np.uint64)
    assert COMPILED.bitmap_runs(full, npages).tolist() == [[0, npages]]
    assert COMPILED.bitmap_count(full, npages) == npages
    assert COMPILED.bitmap_find_next(bm, npages, 70002) == npages - 1
    assert COMPILED.bitmap_test_and_clear(full, npages, 5, 2**40) == npages - 5


@pytest.mark.parametrize("api", [pytest.param(COMPILED, id="compiled"),
                                 pytest.param(REF, id="reference")])
def test_bad_bitmaps_raise_the_same_errors(api):
    bm = np.zeros(4, dtype=np.uint64)
    with pytest.raises(ValueError, match="words"):
        api.bitmap_count(bm, 257)  # needs 5 words
    with pytest.raises(ValueError):
        api.bitmap_count(bm.astype(np.int64), 64)
    with pytest.raises(ValueError):
        api.bitmap_count(np.zeros(8, dtype=np.uint64)[::2], 64)
    with pytest.raises(TypeError):
        api.bitmap_count([0, 0], 64)
    with pytest.raises(ValueError):
        api.bitmap_count(bm, -1)
    with pytest.raises(TypeError):
        api.bitmap_count(bm, 1.5)
    frozen = bm.copy()
    frozen.flags.writeable = False
    assert api.bitmap_count(frozen, 256) == 0  # reading a read-only bitmap is fine
    with pytest.raises(ValueError, match="read-only"):
        api.bitmap_set_range(frozen, 256, 0, 1)
    assert api.new_bitmap(65).shape == (2,) and api.new_bitmap(0).shape == (0,)
    assert api.bitmap_runs(api.new_bitmap(0), 0).shape == (0, 2)


class BitmapMachine(RuleBasedStateMachine):
    """Compiled bitmap operations in any order, next to a set of pages as the model."""

    NPAGES = 333

    def __init__(self):
        super().__init__()
        self.bm = np.zeros(bitmap_words(self.NPAGES) + 1, dtype=np.uint64)
        self.bm[-1] = np.uint64(0xDEAD)  # a word past npages nobody may touch
        self.model: set[int] = set()

    pages = st.integers(0, NPAGES - 1)

    @rule(start=pages, count=st.integers(0, 80))
    def set_range(self, start, count):
        count = min(count, self.NPAGES - start)
        COMPILED.bitmap_set_range(self.bm, self.NPAGES, start, count)
        self.model |= set(range(start, start + count))

    @rule(start=pages, count=st.integers(0, 400))
    def test_and_clear(self, start, count):
        gone = {p for p in self.model if start <= p < start + count}
        assert COMPILED.bitmap_test_and_clear(self.bm, self.NPAGES, start, count) == len(gone)
        self.model -= gone

    @rule(seed=st.integers(0, 2**32 - 1))
    def merge(self, seed):
        src = np.random.default_rng(seed).integers(0, 2**64, len(self.bm), dtype=np.uint64,
                                                   endpoint=False)
        src &= src << np.uint64(7)
        added = bits_of(src, self.NPAGES) - self.model
        assert COMPILED.bitmap_merge(self.bm, src, self.NPAGES) == len(added)
        self.model |= added

    @rule(start=st.integers(0, NPAGES + 3))
    def find_next(self, start):
        later = [p for p in self.model if p >= start]
        assert COMPILED.bitmap_find_next(self.bm, self.NPAGES, start) == min(
            later, default=self.NPAGES)

    @invariant()
    def agrees(self):
        assert COMPILED.bitmap_indices(self.bm, self.NPAGES).tolist() == sorted(self.model)
        assert int(self.bm[-1]) == 0xDEAD


BitmapMachine.TestCase.settings = settings(
    max_examples=min(settings.default.max_examples, 40), stateful_step_count=25)
TestBitmapMachine = needs_compiled(BitmapMachine.TestCase)
