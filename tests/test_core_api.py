"""pymig.core, the facade: backend choice, the API both backends expose, and a round trip
through whichever backend this run uses (the suite runs with and without PYMIG_PUREPYTHON)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from _childenv import child_env

from _core_helpers import needs_compiled
from pymig import core
from pymig.errors import PacketError, StreamError



def test_backend_follows_the_environment():
    expected = "reference" if os.environ.get("PYMIG_PUREPYTHON") == "1" else "compiled"
    assert core.backend == expected
    assert core.cpu_info()["backend"] == expected
    env = child_env(PYMIG_PUREPYTHON="1")
    done = subprocess.run([sys.executable, "-c", "import pymig.core as c; print(c.backend)"],
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "reference"


@needs_compiled
def test_both_backends_expose_the_same_api():
    reference = core.load_backend("reference")
    compiled = core.load_backend("compiled")
    for name in core.API:
        assert callable(getattr(reference, name)) and callable(getattr(compiled, name))
    with pytest.raises(ValueError):
        core.load_backend("fortran")


def test_constants():
    assert (core.PAGE_SIZE, core.PACKET_HEADER_BYTES, core.RUN_HEADER_BYTES) == (4096, 32, 16)
    assert (core.RUN_NORMAL, core.RUN_ZERO, core.RUN_COMPRESSED, core.RUN_DELTA) == (1, 2, 3, 4)
    assert core.bitmap_words(0) == 0 and core.bitmap_words(65) == 2
    assert issubclass(PacketError, StreamError)


def test_migrate_a_small_block_through_the_active_backend():
    """Source memory with data, zero and stale pages -> packets -> a destination that ends up
    identical, with a present map telling which destination pages may be non-zero."""
    npages, ps = 1000, core.PAGE_SIZE
    rng = np.random.default_rng(7)
    src = np.zeros(npages * ps, dtype=np.uint8)
    for page in rng.choice(npages, 300, replace=False):
        src[page * ps: page * ps + 64] = rng.integers(1, 256, 64, dtype=np.uint8)
    dst = np.zeros_like(src)
    dst[5 * ps] = 1  # stale data the migration must clear
    present = core.new_bitmap(npages)
    core.bitmap_set_range(present, npages, 5, 1)
    dirty = core.new_bitmap(npages)
    core.bitmap_set_range(dirty, npages, 0, npages)
    out = bytearray(256 * 1024)
    cursor, packets = 0, 0
    while (result := core.encode_packet(src, ps, 1, dirty, npages, cursor, out)).nbytes:
        info = core.packet_info(out)
        assert info.nbytes == result.nbytes and info.block_id == 1
        core.decode_packet(memoryview(out)[:result.nbytes], dst, ps, 1, npages, present)
        cursor, packets = result.cursor, packets + 1
    assert packets >= 300 * ps // len(out) and core.bitmap_count(dirty, npages) == 0
    assert np.array_equal(dst, src)
    nonzero_pages = np.flatnonzero(src.reshape(npages, ps).any(axis=1))
    assert core.bitmap_indices(present, npages).tolist() == nonzero_pages.tolist()
    assert core.zero_pages(dst, ps, [5, int(nonzero_pages[0])]).tolist() == [True, False]
    assert core.bitmap_runs(present, npages).shape[1] == 2
    with pytest.raises(PacketError) as caught:
        core.decode_packet(bytes(out[:40]), dst, ps, 1, npages)
    assert caught.value.offset == 20
