"""Dirty logging on a real KVM guest: exactly the pages the guest writes, chunked re-protection.

The writer guest (see ``_kvm_helpers.WRITER_SOURCE``) dirties exactly the pages a round lists
plus its command page (its ``done`` store); its code page is mapped read-only.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from _kvm_helpers import CMD_PAGE, build_writer, dirty, make_writer_guest, write_round

from pymig.errors import KvmError
from pymig.guest.layout import GiB

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def writer_image(tmp_path_factory):
    return build_writer(tmp_path_factory.mktemp("writer"))


def test_sync_returns_exactly_the_pages_written_then_nothing_after_clear(writer_image):
    with make_writer_guest(writer_image) as guest:
        guest.start()
        write_round(guest, [])  # the guest is running and idle in its loop
        guest.start_dirty_log()
        assert dirty(guest) == [set()]

        written = [0x100000 + 4096 * i for i in (0, 1, 63, 64, 65, 1000, 4095, 10000)]
        write_round(guest, written)
        expected = {gpa >> 12 for gpa in written} | {CMD_PAGE}
        assert dirty(guest) == [expected]
        assert dirty(guest) == [expected]  # manual protection: a sync alone clears nothing

        guest.clear_dirty(0, 0, guest.ram_blocks[0].npages)
        assert dirty(guest) == [set()]

        again = [0x100000 + 4096 * i for i in (5, 6, 7)]
        write_round(guest, again)
        assert dirty(guest) == [{gpa >> 12 for gpa in again} | {CMD_PAGE}]
        guest.pause()


def test_chunked_clear_reprotects_only_the_range_it_names(writer_image):
    with make_writer_guest(writer_image) as guest:
        guest.start()
        guest.start_dirty_log()
        base = 0x100000 >> 12  # page 256, 64-aligned
        written = list(range(base, base + 192))
        write_round(guest, [p << 12 for p in written])
        assert dirty(guest) == [set(written) | {CMD_PAGE}]

        guest.clear_dirty(0, base + 70, 30)  # inside the second 64-page chunk, unaligned
        assert dirty(guest) == [(set(written) - set(range(base + 70, base + 100))) | {CMD_PAGE}]

        guest.clear_dirty(0, base + 70, 30)  # nothing left there: a no-op
        write_round(guest, [(base + 80) << 12, (base + 150) << 12])
        # page base+80 was re-protected and is dirty again; base+150 never stopped being dirty
        assert dirty(guest) == [(set(written) - set(range(base + 70, base + 100)))
                                | {base + 80, CMD_PAGE}]
        guest.pause()


def test_two_slots_of_the_pc_layout(writer_image):
    memory = 3 * GiB + (16 << 20)
    with make_writer_guest(writer_image, memory) as guest:
        assert [b.name for b in guest.ram_blocks] == ["ram-low", "ram-high"]
        guest.start()
        guest.start_dirty_log()
        low, high = 0x200000, 4 * GiB + 0x3000
        write_round(guest, [low, high, high + 4096 * 100])
        assert dirty(guest) == [{low >> 12, CMD_PAGE}, {3, 103}]
        guest.clear_dirty(1, 0, 64)
        assert dirty(guest) == [{low >> 12, CMD_PAGE}, {103}]
        guest.pause()


def test_without_manual_protection_sync_clears(writer_image):
    with make_writer_guest(writer_image, manual_protect=False) as guest:
        assert not guest.runtime.vm.manual_protect
        guest.start()
        guest.start_dirty_log()
        write_round(guest, [0x300000])
        assert dirty(guest) == [{0x300, CMD_PAGE}]
        assert dirty(guest) == [set()]
        guest.clear_dirty(0, 0, 64)  # a no-op here
        guest.pause()


def test_logging_off_means_no_dirty_log(writer_image):
    with make_writer_guest(writer_image) as guest:
        guest.start_dirty_log()
        guest.stop_dirty_log()
        with pytest.raises(KvmError) as info:
            guest.sync_dirty()
        assert info.value.errno == errno.ENOENT
        assert info.value.ioctl == "KVM_GET_DIRTY_LOG"


def test_dirty_bitmaps_are_uint64_words_in_kvm_layout(writer_image):
    with make_writer_guest(writer_image) as guest:
        guest.start_dirty_log()
        (bitmap,) = guest.sync_dirty()
        assert bitmap.dtype == np.uint64 and bitmap.flags.c_contiguous
        assert bitmap.size == (guest.ram_blocks[0].npages + 63) // 64


def test_initially_set_reports_every_page_until_its_first_clear(writer_image):
    with make_writer_guest(writer_image, initially_set=True) as guest:
        assert guest.runtime.vm.initially_set
        npages = guest.ram_blocks[0].npages
        guest.start()
        write_round(guest, [])
        guest.start_dirty_log()
        assert dirty(guest) == [set(range(npages))]
        guest.clear_dirty(0, 0, 1024)  # the sender reached the first 4 MiB
        assert dirty(guest) == [set(range(1024, npages))]
        write_round(guest, [0x2000, 0x200000])
        assert dirty(guest) == [{2, 0x200, CMD_PAGE} | set(range(1024, npages))]
        guest.clear_dirty(0, 0, npages)
        write_round(guest, [0x300000])
        assert dirty(guest) == [{0x300, CMD_PAGE}]
        guest.pause()


def test_dirty_ring_reports_exactly_the_pages_written(writer_image):
    with make_writer_guest(writer_image, dirty_ring=1024) as guest:
        vm = guest.runtime.vm
        assert vm.dirty_ring == 1024 and not vm.manual_protect
        guest.start()
        write_round(guest, [])
        guest.start_dirty_log()
        assert dirty(guest) == [set()]
        written = [0x100000 + 4096 * i for i in (0, 1, 64, 999)]
        write_round(guest, written)
        assert dirty(guest) == [{gpa >> 12 for gpa in written} | {CMD_PAGE}]
        assert dirty(guest) == [set()]  # harvesting resets: nothing new since
        write_round(guest, written[:1])  # re-protected by the reset: logged again
        assert dirty(guest) == [{written[0] >> 12, CMD_PAGE}]
        guest.pause()


def test_a_full_dirty_ring_is_harvested_by_the_vcpu_and_nothing_is_lost(writer_image):
    with make_writer_guest(writer_image, dirty_ring=1024) as guest:
        guest.start()
        write_round(guest, [])
        guest.start_dirty_log()
        pages = list(range(0x100, 0x100 + 3000))  # three times the ring
        for at in range(0, len(pages), 400):
            write_round(guest, [p << 12 for p in pages[at:at + 400]])
        assert dirty(guest) == [set(pages) | {CMD_PAGE}]
        guest.pause()
