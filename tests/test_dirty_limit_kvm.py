"""The KVM side of per-vCPU dirty rates and limits: what the dirty ring counts, how a limit's
own logging leaves the sync contract alone, ring-full exits as control points, and the clear
refusal without a ring."""

from __future__ import annotations

import time

import pytest
from _dirty_limit_helpers import assert_shadow_is_ram, copy_dirty, dirtier
from _kvm_helpers import CMD_PAGE, build_writer, dirty, make_writer_guest, write_round

from pymig.errors import GuestError
from pymig.guest import GuestConfig, create

MiB = 1 << 20
pytestmark = [pytest.mark.kvm, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def writer_image(tmp_path_factory):
    return build_writer(tmp_path_factory.mktemp("writer"))


def test_without_the_ring_there_is_no_per_vcpu_rate():
    guest = create(GuestConfig("kvm", 16 * MiB, vcpus=2, workload="idle"))
    try:
        assert not guest.supports_dirty_limit
        guest.start_dirty_log()
        for call in (guest.vcpu_dirty_rates, lambda: guest.set_vcpu_dirty_limit(0, 1000)):
            with pytest.raises(GuestError, match="dirty_ring=N"):
                call()
        assert not guest.runtime.dirty_limits
    finally:
        guest.close()


def test_each_ring_entry_counts_once_for_the_vcpu_that_made_it(writer_image):
    with make_writer_guest(writer_image, dirty_ring=1024) as guest:
        guest.start()
        write_round(guest, [])
        guest.start_dirty_log()
        before = guest.runtime.dirty_counts()
        written = [0x100000 + 4096 * i for i in (0, 1, 64, 999)]
        write_round(guest, written)
        write_round(guest, written)  # already dirty since the last harvest: no new entries
        assert guest.runtime.dirty_counts()[0] - before[0] == len(written) + 1  # + CMD_PAGE
        write_round(guest, written)  # the harvest re-protected them: counted again
        assert guest.runtime.dirty_counts()[0] - before[0] == 2 * (len(written) + 1)
        assert dirty(guest) == [{gpa >> 12 for gpa in written} | {CMD_PAGE}]  # nothing lost
        guest.pause()


def test_a_limits_own_logging_leaves_the_sync_contract_alone(writer_image):
    with make_writer_guest(writer_image, dirty_ring=1024) as guest:
        slots = guest.runtime.slots
        guest.start()
        write_round(guest, [])
        guest.set_vcpu_dirty_limit(0, 1e9)  # tracks, never holds
        assert all(slot.logging for slot in slots)
        written = [0x100000 + 4096 * i for i in (3, 4, 200)]
        write_round(guest, written)  # logged for the limit only
        guest.start_dirty_log()
        assert dirty(guest) == [set()]  # dirty logging starts clean...
        write_round(guest, written)  # ...and the pages were re-protected: logged again
        assert dirty(guest) == [{gpa >> 12 for gpa in written} | {CMD_PAGE}]
        guest.stop_dirty_log()
        assert all(slot.logging for slot in slots)  # the limit still needs the log
        guest.set_vcpu_dirty_limit(0, None)
        assert not any(slot.logging for slot in slots)
        guest.pause()


def test_ring_full_exits_hold_the_vcpu_and_lose_nothing():
    """A 256-entry ring fills many times between two syncs: the vCPU harvests on its own exit,
    is charged there and held without a kick, and every write still reaches the shadow."""
    with dirtier("kvm", working_set_bytes=32 * MiB, dirty_ring=256) as guest:
        guest.start_dirty_log()
        shadow = [block.array.copy() for block in guest.ram_blocks]
        guest.set_vcpu_dirty_limit(0, 10_000)  # a ring-full exit (192 pages) costs 19 ms
        thread = guest.runtime.threads[0]
        guest.vcpu_dirty_rates()  # the rate window starts with the limit
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            copy_dirty(guest, shadow)
            time.sleep(0.05)
        rate = guest.vcpu_dirty_rates()[0]
        guest.pause()
        copy_dirty(guest, shadow)
        assert_shadow_is_ram(guest, shadow)
        assert thread.holds > 5
        assert rate < 10_000 * 1.3, rate
