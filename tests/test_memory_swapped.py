"""Guest RAM the host swapped out holds data: a migration reads it like any other page.
Pages a migration skips as never touched are the ones mincore calls not resident, and a page
swapped out (and dropped from the swap cache) is not resident either."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from _migration_helpers import (GUEST_KINDS, assert_consistent, block_digests, guest_config,
                                migrate_locally, running_guest)
from _swap import MemoryCgroup, resident_pages, swap_file
from pymig.memory import RamBlock, swap_in_use

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def swapped(tmp_path):
    """A swap file and a memory cgroup to push pages out with."""
    with swap_file([str(tmp_path), "/var/tmp"]):
        group = MemoryCgroup(f"pymig-test-{uuid.uuid4().hex[:8]}")
        try:
            yield group
        finally:
            group.remove()


def touched_pages(block: RamBlock) -> np.ndarray:
    bits = np.unpackbits(block.touched().view(np.uint8), bitorder="little")
    return bits[:block.npages].astype(bool)


@pytest.mark.parametrize("backing", ["anon", "memfd"])
def test_pages_swapped_out_count_as_touched(swapped, backing):
    with swapped.charged():
        block = RamBlock.allocate("ram", 8 * MiB, backing=backing, hugepages=False)
        block.array[::2 * PAGE] = 0xA5  # every other page written, the rest never touched
    try:
        written = block.npages // 2
        swapped.squeeze(block.address, block.size_bytes)
        assert swap_in_use()
        # the case this is about: pages holding data that mincore calls not resident
        assert resident_pages(block.address, block.size_bytes) < written
        touched = touched_pages(block)
        assert touched[::2].all()
        assert not touched[1::2].any()  # never written: still skipped
        assert (block.array[::2 * PAGE] == 0xA5).all()
    finally:
        block.close()


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_a_guest_whose_ram_the_host_swapped_out_arrives_whole(swapped, kind, tmp_path):
    with swapped.charged():
        guest = running_guest(guest_config(kind, memory=64 * MiB, working_set=16 * MiB),
                              min_passes=2)
    try:
        guest.pause()
        before = sum(resident_pages(b.address, b.size_bytes) for b in guest.ram_blocks)
        for block in guest.ram_blocks:
            swapped.squeeze(block.address, block.size_bytes)
        assert sum(resident_pages(b.address, b.size_bytes) for b in guest.ram_blocks) < before
        with migrate_locally(guest, f"unix:{tmp_path}/m.sock") as done:
            assert done.error is None, done.error
            assert done.digests_at_load == block_digests(guest.ram_blocks)
            assert_consistent(done.destination)
    finally:
        guest.close()
