"""Helpers for the dirty-limit tests: a migration-like copy loop over the dirty log."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from pymig.core import bitmap_indices
from pymig.guest import GuestConfig, create
from pymig.guest.kvm_guest import DIRTY_LIMIT_RING_ENTRIES

MiB = 1 << 20
PAGE = 4096
SLOW_RATE = 2000  # vCPU 1's paced rate, pages/s


@contextmanager
def dirtier(kind: str, working_set_bytes: int = 128 * MiB,
            dirty_ring: int = DIRTY_LIMIT_RING_ENTRIES):
    """A started 2-vCPU dirtier (vCPU 0 unpaced, vCPU 1 at SLOW_RATE); KVM with the ring.

    By default shares of 64 MiB (16 Ki pages): far more than a ring of 4096 entries, so few of
    vCPU 0's writes between two harvests hit a page it already dirtied (KVM counts such a page
    once, the workload's counter every time).
    """
    params = {"working_set_bytes": working_set_bytes, "vcpu_rates_pages_per_s": [0, SLOW_RATE]}
    config = GuestConfig(kind, working_set_bytes + 32 * MiB, vcpus=2, workload="dirtier",
                         params=params)
    guest = create(config, dirty_ring=dirty_ring)
    try:
        guest.start()
        yield guest
    finally:
        if guest.status not in ("closed", "shutdown"):
            guest.pause()
        guest.close()


def copy_dirty(guest, shadow: list[np.ndarray]) -> int:
    """One migration-like round: sync, re-arm, copy the dirty pages; returns pages copied."""
    copied = 0
    for index, (block, bitmap) in enumerate(zip(guest.ram_blocks, guest.sync_dirty())):
        pages = bitmap_indices(bitmap, block.npages)
        guest.clear_dirty(index, 0, block.npages)
        ram = block.array.reshape(-1, PAGE)
        shadow[index].reshape(-1, PAGE)[pages] = ram[pages]
        copied += pages.size
    return copied


def assert_shadow_is_ram(guest, shadow: list[np.ndarray]) -> None:
    """Every page of the (paused) guest's RAM equals the copy the dirty log kept up to date."""
    for block, copy in zip(guest.ram_blocks, shadow):
        differ = np.flatnonzero((block.array != copy).reshape(-1, PAGE).any(axis=1))
        assert differ.size == 0, f"{block.name}: pages {differ[:10]} missed by the dirty log"
