"""Guest RAM from the host's hugetlb pool (``--mem-backing hugetlb``): memory a host keeps for
guests, so that a destination does not pay for memory its own hypervisor has to back again.
It must behave as any guest RAM does, and a pool too small is a clear error that loses
nothing."""

from __future__ import annotations

import numpy as np
import pytest
from _hugetlb import free_huge_pages
from _migration_helpers import (GUEST_KINDS, assert_arrived_and_runs, assert_carries_on, finish,
                               guest_config, guest_passes, migrate_locally, running_guest,
                               start_destination, start_source, wait_for)

from pymig.memory import RamBlock, hugetlb_pool
from pymig.qmp import QmpClient

MiB = 1 << 20


def test_a_hugetlb_block_is_zero_tracks_what_was_touched_and_gives_its_pages_back():
    with free_huge_pages(16):
        huge, _, free = hugetlb_pool()
        block = RamBlock.allocate("ram", 16 * huge, backing="hugetlb")
        try:
            assert not block.touched().any()  # reserved, not faulted in
            block.array[5 * huge + 7] = 1  # one write faults in one huge page
            touched = np.unpackbits(block.touched().view(np.uint8), bitorder="little")
            per_huge = huge // block.page_size
            assert np.flatnonzero(touched).tolist() == list(range(5 * per_huge, 6 * per_huge))
            block.populate(0, per_huge)
            assert hugetlb_pool()[2] == free - 2
            assert np.count_nonzero(block.array) == 1  # (a read faults in the rest)
        finally:
            block.close()
        assert hugetlb_pool()[2] == free


def test_a_block_the_pool_cannot_hold_or_of_a_size_it_cannot_map_is_refused():
    with free_huge_pages(4):
        huge, total, _ = hugetlb_pool()
        with pytest.raises(OSError, match=r"cannot reserve \d+ huge pages.*nr_hugepages"):
            RamBlock.allocate("ram", (total + 1) * huge, backing="hugetlb")
        with pytest.raises(ValueError, match="not a multiple of the huge page size"):
            RamBlock.allocate("ram", huge + 4096, backing="hugetlb")


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_a_guest_migrates_from_and_into_hugetlb_memory_and_runs_there(kind):
    with free_huge_pages(72):  # two guests of 64 MiB
        source = running_guest(guest_config(kind, "selfcheck", memory=64 * MiB),
                               backing="hugetlb")
        try:
            with migrate_locally(source, "tcp:127.0.0.1:0",
                                 guest_options={"backing": "hugetlb"}) as done:
                guest = assert_arrived_and_runs(done, source)
                assert {block.backing for block in guest.ram_blocks} == {"hugetlb"}
        finally:
            source.close()


def migrate_to(src_ctl: str, uri: str) -> dict:
    """Once the source guest runs, migrate it to ``uri``; query-migrate once it has ended."""
    wait_for(lambda: guest_passes(src_ctl) >= 1, what="the source guest to run")
    with QmpClient(src_ctl) as client:
        client.command("migrate", uri=uri)
        wait_for(lambda: client.command("query-migrate")["status"] in ("completed", "failed"),
                 timeout=120, what="the migration to end")
        return client.command("query-migrate")


def test_pymig_incoming_into_a_pool_too_small_fails_and_the_source_runs_on(tmp_path):
    """``pymig incoming --mem-backing hugetlb`` learns the guest's size from the stream: a pool
    that cannot hold it fails the migration with the reason, and the source carries on."""
    with free_huge_pages(4, exactly=True):  # 8 MiB: far less than the guest's RAM
        src, src_ctl = start_source("simulated", tmp_path)
        dst, dst_ctl, uri = start_destination(tmp_path, "tcp:127.0.0.1:0",
                                              "--mem-backing", "hugetlb")
        try:
            stats = migrate_to(src_ctl, uri)
            assert stats["status"] == "failed", stats
            error = stats["error-desc"]
            assert "huge pages" in error and "nr_hugepages" in error, error
            assert_carries_on(src_ctl, at_least=guest_passes(src_ctl))
            assert dst.wait(30) != 0
        finally:
            finish(src, dst)


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_pymig_run_and_incoming_on_hugetlb_carry_the_guest_over(kind, tmp_path):
    with free_huge_pages(136):  # two guests of 128 MiB
        src, src_ctl = start_source(kind, tmp_path, extra=("--mem-backing", "hugetlb"))
        dst, dst_ctl, uri = start_destination(tmp_path, "tcp:127.0.0.1:0",
                                              "--mem-backing", "hugetlb")
        try:
            stats = migrate_to(src_ctl, uri)
            assert stats["status"] == "completed", stats
            assert_carries_on(dst_ctl)  # runs on, and its self-check passes
        finally:
            finish(src, dst)
