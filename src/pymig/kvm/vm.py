"""``Vm`` and ``MemorySlot``: a VM's file descriptor, its RAM slots and their dirty logs.

Dirty logging uses KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 when the host has it: turning logging on
write-protects the slot, :meth:`MemorySlot.sync` copies KVM's bitmap without touching
protection, and :meth:`MemorySlot.clear` re-protects exactly the pages the last sync returned
in the range it names (KVM_CLEAR_DIRTY_LOG), so re-protection follows the sender chunk by chunk
instead of the whole guest at each sync.  Without manual protection, sync clears and
re-protects everything it returns and clear is a no-op.

``initially_set=True`` adds KVM_DIRTY_LOG_INITIALLY_SET: turning logging on protects nothing
and every page reads as dirty until its first clear, so the guest runs unhindered until the
sender reaches each chunk (the guest writes faster during the first pass, and enabling the
log costs less: docs/performance.md, "Figures behind the code").  The price is that the first sync reports every page.

``dirty_ring=N`` uses KVM's dirty ring instead (KVM_CAP_DIRTY_LOG_RING, N entries per vCPU):
KVM appends each newly dirtied page to the writing vCPU's ring; a sync harvests every ring
into the per-slot bitmaps and resets them (KVM_RESET_DIRTY_RINGS re-protects what was
harvested), so clear is a no-op as without manual protection.  A vCPU whose ring fills exits
with KVM_EXIT_DIRTY_RING_FULL and harvests before it goes on; what it harvested waits in the
slots' pending bitmaps for the next sync.

The ring also says *who* dirtied a page: every harvest adds the entries it took from a vCPU's
ring to that vCPU's ``dirty_pages`` count (pages newly dirtied since KVM last re-protected them,
i.e. since the previous harvest), which is what per-vCPU dirty rates and the dirty limit
measure.  Harvesting is safe at any time, from any thread: what it takes goes to the pending
bitmaps, never away from the next sync.  ``on_harvest`` (if set) is called after every harvest
that found entries, outside the ring lock.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import numpy as np

from pymig._core import kvm as _kvm
from pymig.errors import UnsupportedCapability
from pymig.memory import RamBlock

# Real-mode support on Intel needs 3 pages of guest-physical space for KVM's TSS; this sits in
# the PC hole below 4 GiB, where no RAM slot of the PC layout lives.
DEFAULT_TSS_ADDR = 0xFFFBD000
TSS_BYTES = 3 * 4096
RING_HARVEST_BATCH = 4096


class MemorySlot:
    """A :class:`RamBlock` registered with KVM_SET_USER_MEMORY_REGION as one slot.

    ``bitmap`` (uint64 words, KVM layout) receives KVM_GET_DIRTY_LOG; compiled code may read it
    directly.  While the slot exists it keeps an export of the block's mmap, so the memory KVM
    maps cannot be unmapped under it (RamBlock.close raises BufferError instead).
    """

    def __init__(self, vm: "Vm", slot_id: int, block: RamBlock, log_dirty: bool = False):
        self.vm = vm
        self.slot_id = slot_id
        self.block = block
        self.npages = block.size_bytes // 4096
        words = (self.npages + 63) // 64
        self.bitmap = np.zeros(words, dtype=np.uint64)
        self._synced = np.zeros(words, dtype=np.uint64)  # what the last sync returned
        self._clear_buf = np.zeros(words, dtype=np.uint64)
        self.pending = np.zeros(words, dtype=np.uint64)  # dirty-ring pages since the last sync
        self._pin = memoryview(block.mem)
        self.logging = False
        self._register(log_dirty)

    def _register(self, log_dirty: bool) -> None:
        flags = _kvm.MEM_LOG_DIRTY_PAGES if log_dirty else 0
        _kvm._unsafe_set_user_memory_region(self.vm.fd, self.slot_id, flags,
                                            self.block.guest_phys_addr, self.block.size_bytes,
                                            self.block.address)
        self.logging = log_dirty
        self._synced[:] = 0

    def set_logging(self, enabled: bool) -> None:
        """Toggle KVM_MEM_LOG_DIRTY_PAGES (re-registers the slot with the new flags)."""
        if enabled != self.logging:
            self._register(enabled)

    def sync(self) -> np.ndarray:
        """KVM_GET_DIRTY_LOG into :attr:`bitmap`; valid until the next sync."""
        _kvm.get_dirty_log(self.vm.fd, self.slot_id, self.bitmap)
        if self.vm.manual_protect:
            np.copyto(self._synced, self.bitmap)
        return self.bitmap

    def fetch_and_clear(self, out: np.ndarray) -> np.ndarray:
        """KVM_GET_DIRTY_LOG into ``out`` and re-protect what it holds (KVM_CLEAR_DIRTY_LOG
        over the slot, with manual protection; without it the GET did both): ``out`` then
        holds each page dirtied since it was last re-protected, and the next write to any of
        them is logged again.  For a reader beside the migration (KvmGuest's DirtyLogShare):
        the pages it re-protects leave the bits the last :meth:`sync` returned, so a
        :meth:`clear` after it cannot re-protect, unseen, a page written since."""
        _kvm.get_dirty_log(self.vm.fd, self.slot_id, out)
        if self.vm.manual_protect and out.any():
            _kvm.clear_dirty_log(self.vm.fd, self.slot_id, out, 0, self.npages)
            self._synced &= ~out
        return out

    def clear(self, start_page: int, npages: int) -> None:
        """Re-protect the pages of [start_page, start_page + npages) that the last sync
        returned (KVM_CLEAR_DIRTY_LOG over the 64-page-aligned cover, bits outside the range
        masked off).  A no-op without manual protection, where sync already re-protected."""
        if not self.vm.manual_protect or npages <= 0:
            return
        if start_page < 0 or start_page + npages > self.npages:
            raise ValueError(f"pages [{start_page}, {start_page + npages}) outside slot of "
                             f"{self.npages} pages")
        end = start_page + npages
        w0, w1 = start_page // 64, (end + 63) // 64
        words = self._clear_buf[: w1 - w0]
        np.copyto(words, self._synced[w0:w1])
        if start_page % 64:
            words[0] &= np.uint64((0xFFFFFFFFFFFFFFFF << (start_page % 64)) & 0xFFFFFFFFFFFFFFFF)
        if end % 64:
            words[-1] &= np.uint64((1 << (end % 64)) - 1)
        if not words.any():
            return
        first = w0 * 64
        _kvm.clear_dirty_log(self.vm.fd, self.slot_id, words, first,
                             min(len(words) * 64, self.npages - first))
        self._synced[w0:w1] &= ~words

    def delete(self) -> None:
        """Remove the slot from the VM and release the pin on the block's memory."""
        if self._pin is None:
            return
        if self.vm.fd >= 0:
            _kvm._unsafe_set_user_memory_region(self.vm.fd, self.slot_id, 0,
                                                self.block.guest_phys_addr, 0, 0)
        self._pin.release()
        self._pin = None


class Vm:
    """A KVM virtual machine.  Owns its fd, its slots and its vCPUs; close() releases all."""

    def __init__(self, kvm, *, irqchip: bool = True, manual_protect: bool = True,
                 initially_set: bool = False, dirty_ring: int = 0,
                 tss_addr: int | None = DEFAULT_TSS_ADDR):
        self.kvm = kvm
        self.fd = _kvm.create_vm(kvm.fd)
        self.slots: list[MemorySlot] = []
        self.vcpus: list = []
        self.dirty_ring = dirty_ring
        self.on_harvest: Callable[[], None] | None = None
        self._ring_lock = threading.Lock()
        self._ring_slots = np.empty(RING_HARVEST_BATCH, dtype=np.int64)
        self._ring_offsets = np.empty(RING_HARVEST_BATCH, dtype=np.int64)
        try:
            if dirty_ring:
                self._enable_dirty_ring(dirty_ring)
                manual_protect = False  # the ring replaces the bitmap interface
            if tss_addr is not None:
                _kvm.set_tss_addr(self.fd, tss_addr)
            self.irqchip = irqchip and kvm.check("KVM_CAP_IRQCHIP") > 0
            if self.irqchip:
                _kvm.create_irqchip(self.fd)
            offered = kvm.check("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
            want = _kvm.DIRTY_LOG_MANUAL_PROTECT_ENABLE
            self.manual_protect = bool(manual_protect and offered & want)
            self.initially_set = bool(self.manual_protect and initially_set
                                      and offered & _kvm.DIRTY_LOG_INITIALLY_SET)
            if self.initially_set:
                want |= _kvm.DIRTY_LOG_INITIALLY_SET
            if self.manual_protect:
                _kvm.enable_cap(self.fd, _kvm.CAPS["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"], want)
            self.xsave_size = max(_kvm.check_extension(self.fd, _kvm.CAPS["KVM_CAP_XSAVE2"]),
                                  _kvm.XSAVE_LEGACY_BYTES)
        except BaseException:
            os.close(self.fd)
            raise

    def _enable_dirty_ring(self, entries: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING) with ``entries`` per vCPU (before vCPUs)."""
        limit = self.kvm.check("KVM_CAP_DIRTY_LOG_RING")
        size = entries * _kvm.DIRTY_GFN_BYTES
        if limit <= 0:
            raise UnsupportedCapability("KVM_CAP_DIRTY_LOG_RING", "dirty_ring")
        if entries & (entries - 1) or size > limit or size < 4096:
            raise ValueError(f"dirty ring of {entries} entries: use a power of two from "
                             f"{4096 // _kvm.DIRTY_GFN_BYTES} to {limit // _kvm.DIRTY_GFN_BYTES}")
        _kvm.enable_cap(self.fd, _kvm.CAPS["KVM_CAP_DIRTY_LOG_RING"], size)

    def sync_dirty(self) -> list[np.ndarray]:
        """Every slot's dirty bitmap: KVM_GET_DIRTY_LOG per slot, or harvested rings."""
        if not self.dirty_ring:
            return [slot.sync() for slot in self.slots]
        with self._ring_lock:
            found = self._harvest_locked()
            for slot in self.slots:
                np.copyto(slot.bitmap, slot.pending)
                slot.pending[:] = 0
        self._harvested(found)
        return [slot.bitmap for slot in self.slots]

    def fetch_and_clear(self, outs: list[np.ndarray]) -> list[np.ndarray]:
        """Every slot's pages dirtied since it was last re-protected into ``outs`` (one per
        slot), re-protected: the rings harvested and the pending bitmaps taken, or each slot's
        :meth:`MemorySlot.fetch_and_clear`.  Unlike :meth:`sync_dirty`, the slots' own
        bitmaps (what the last sync returned) are left alone."""
        if not self.dirty_ring:
            return [slot.fetch_and_clear(out) for slot, out in zip(self.slots, outs)]
        with self._ring_lock:
            found = self._harvest_locked()
            for slot, out in zip(self.slots, outs):
                np.copyto(out, slot.pending)
                slot.pending[:] = 0
        self._harvested(found)
        return outs

    def harvest_rings(self) -> int:
        """Move every vCPU ring's entries into the slots' pending bitmaps and reset the rings
        (a vCPU thread on KVM_EXIT_DIRTY_RING_FULL, the dirty-limit controller, a rate
        measurement); returns entries harvested."""
        with self._ring_lock:
            found = self._harvest_locked()
        self._harvested(found)
        return found

    def _harvested(self, found: int) -> None:
        if found and self.on_harvest is not None:
            self.on_harvest()

    def _harvest_locked(self) -> int:
        total = 0
        by_id = {slot.slot_id: slot for slot in self.slots}
        for vcpu in self.vcpus:
            while True:
                n, vcpu.ring_fetch = _kvm.harvest_dirty_ring(
                    vcpu.ring, vcpu.ring_fetch, self._ring_slots, self._ring_offsets)
                vcpu.dirty_pages += n
                ids, offsets = self._ring_slots[:n] & 0xFFFF, self._ring_offsets[:n]
                for slot_id in np.unique(ids):
                    slot = by_id.get(int(slot_id))
                    if slot is None:
                        continue  # a slot deleted since the write
                    pages = offsets[ids == slot_id]
                    pages = pages[pages < slot.npages].astype(np.uint64)
                    np.bitwise_or.at(slot.pending, pages >> np.uint64(6),
                                     np.uint64(1) << (pages & np.uint64(63)))
                total += n
                if n < RING_HARVEST_BATCH:
                    break
        if total:
            _kvm.reset_dirty_rings(self.fd)
        return total

    def add_memory(self, block: RamBlock, *, log_dirty: bool = False) -> MemorySlot:
        """Register ``block`` as the next slot."""
        slot = MemorySlot(self, len(self.slots), block, log_dirty)
        self.slots.append(slot)
        return slot

    def create_vcpu(self, index: int):
        from pymig.kvm.vcpu import Vcpu

        vcpu = Vcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close the vCPUs, delete the slots (releasing the RAM pins) and close the VM."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)  # KVM drops every slot with the VM
            self.fd = -1
        for slot in self.slots:
            slot.delete()
        self.slots.clear()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
