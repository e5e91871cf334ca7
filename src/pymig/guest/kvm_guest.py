"""``KvmGuest``: the :class:`~pymig.guest.base.Guest` protocol on a real KVM virtual machine.

One :class:`~pymig.kvm.runtime.KvmRuntime` (VM, RAM slots, vCPU threads, UART / A20 / control
port, and the ATA channel when the configuration names disks) per guest.  A source guest
(``incoming=False``) gets its workload loaded and its vCPUs set up at creation; a destination
(``incoming=True``) gets fresh, untouched RAM and default vCPUs, and takes memory from the
migration and vCPU/device state from :meth:`load_state`; it opens only shared disks.

Status::

    created --start()/resume()--> running <--pause()/resume()--> paused
       running/paused --(guest powers off / resets)--> shutdown
       running --(triple fault, failed entry, internal error)--> error

Dirty tracking: the slots log while dirty logging is on (:meth:`start_dirty_log`) or any vCPU
has a dirty limit, which needs the dirty ring (``create(..., dirty_ring=N)``): the ring names
the vCPU that dirtied each page, so :meth:`vcpu_dirty_rates` counts each vCPU's ring entries and
the dirty limit (:class:`~pymig.kvm.runtime.KvmRuntime`) holds a vCPU that produces them too fast.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Sequence

import numpy as np

from pymig._core import kvm as _kvm
from pymig.block import DiskTarget
from pymig.disk import DiskImage
from pymig.errors import GuestError
from pymig.guest import builtin, loader
from pymig.guest.base import (
    Console,
    DirtyLogReader,
    DirtyLogShare,
    DirtyRateMeter,
    GuestConfig,
    GuestState,
    GuestStatus,
    PreallocatedRam,
    StateShape,
    allocate_ram,
    check_dirty_limit,
    check_vcpu_index,
    write_phys,
)
from pymig.guest.layout import locate
from pymig.guest.config import validate_config
from pymig.guest.disks import open_disks, with_targets
from pymig.guest.workloads import (MailboxRecord, progress_from_mailbox, read_mailbox,
                                   touch_mailbox, write_fill)
from pymig.kvm import cpustate
from pymig.kvm.ata import AtaChannel, DiskErrorEvent
from pymig.kvm.runtime import KvmRuntime
from pymig.kvm.system import Kvm
from pymig.memory import RamBlock, touch_without_gil


class KvmGuest:
    """A KVM guest running a built-in workload or a user image."""

    def __init__(self, config: GuestConfig, ram_blocks: list[RamBlock], runtime: KvmRuntime,
                 console: Console, kvm: Kvm, owns_kvm: bool, disks: list[DiskImage] = ()):
        self.config = config
        self.disk_images = list(disks)
        # the latest failures of the disks' images the guest saw as disk errors
        self.disk_errors: collections.deque[DiskErrorEvent] = collections.deque(maxlen=256)
        self.disk_error_observers: list = []
        self.ata: AtaChannel | None = None
        if self.disk_images:
            self.ata = AtaChannel(self.disk_images, on_error=self._disk_error)
            runtime.ports.attach(self.ata)
        self.ram_blocks = ram_blocks
        self.vcpu_count = config.vcpus
        self.console = console
        self.runtime = runtime
        self.kvm = kvm
        self._owns_kvm = owns_kvm
        self._status = GuestStatus.CREATED
        self._lock = threading.Lock()
        self._dirty_log = False  # start_dirty_log() is in force (a limit may log on its own)
        self._tracking = False  # the slots are logging, for any reason
        # the log's readers besides the migration (a dirty-rate measurement); its lock also
        # keeps close() from unmapping what a sync, clear or harvest uses
        self._share = DirtyLogShare([slot.bitmap.size for slot in runtime.slots])
        self._rates = DirtyRateMeter()
        self.pause_latencies: list[float] = []
        # the guest's latest control-port events: (vcpu, code, argument)
        self.events: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=1024)
        runtime.ports.control.observers.append(lambda *event: self.events.append(event))

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def create(cls, config: GuestConfig, incoming: bool = False, *, backing: str = "anon",
               hugepages: bool = True, irqchip: bool = True, manual_protect: bool = True,
               initially_set: bool = False, dirty_ring: int = 0,
               kvm: Kvm | None = None, prealloc: PreallocatedRam | None = None,
               disk_paths: Sequence[str] | None = None,
               disk_targets: Sequence[DiskTarget] = (),
               disk_dir: str | None = None) -> "KvmGuest":
        """A new, paused guest for ``config`` (see the module docstring for ``incoming``).

        ``backing``/``hugepages`` shape the RAM blocks (``prealloc``: blocks a destination
        made ready before the stream came); ``irqchip`` asks for the in-kernel
        irqchip; ``manual_protect``/``initially_set``/``dirty_ring`` (entries per vCPU) choose
        the dirty-log mode (:mod:`pymig.kvm.vm`).  Per-vCPU dirty rates and limits need
        ``dirty_ring`` (:data:`DIRTY_LIMIT_RING_ENTRIES` is a good size for them).
        ``disk_paths``: the images a destination may open for the guest's shared disks (what
        ``pymig incoming --disk`` names); the stream's paths are only ever checked against it.
        ``disk_targets``: where a destination writes the disks that travel with the guest
        (block migration, ``pymig incoming --disk disk0=PATH``); the guest's configuration
        then names the target; ``disk_dir``: where a disk with no target of its own goes,
        under its image's file name (``pymig incoming --disk-dir``).
        """
        if config.kind != "kvm":
            raise ValueError(f"KvmGuest runs kind 'kvm' configurations, not {config.kind!r}")
        validate_config(config)  # before /dev/kvm is opened or a byte mapped
        blocks: list[RamBlock] = []
        disks: list[DiskImage] = []
        owns_kvm = kvm is None
        kvm = kvm or Kvm()
        runtime = None
        try:
            disks = open_disks(config, incoming, disk_paths, disk_targets, disk_dir)
            config = with_targets(config, disks)
            blocks = allocate_ram(config, backing=backing, hugepages=hugepages,
                                  prealloc=prealloc)
            console = Console()
            runtime = KvmRuntime(kvm, blocks, config.vcpus, console.write, irqchip=irqchip,
                              manual_protect=manual_protect, initially_set=initially_set,
                              dirty_ring=dirty_ring)
            guest = cls(config, blocks, runtime, console, kvm, owns_kvm, disks)
            if not incoming:
                guest._load()
            return guest
        except BaseException:
            if runtime is not None:
                runtime.close()
            for block in blocks:
                block.close()
            for disk in disks:
                disk.close()
            if owns_kvm:
                kvm.close()
            raise

    def _load(self) -> None:
        """Load the workload or image and point the vCPUs at it."""
        base = [cpustate.sregs_from_kvm(_kvm.get_sregs(v.fd)) for v in self.runtime.vcpus]
        top = max(b.guest_phys_addr + b.size_bytes for b in self.ram_blocks)
        if self.config.workload == "image":
            p = self.config.params
            kind = p.get("kind", "bootsector")
            for gpa, chunk in loader.image_writes(kind, loader.read_image(p["image"]),
                                                  p.get("load_address"), top):
                self.write_phys(gpa, chunk)
            entries = [loader.image_entry(kind, base[0], p)]
        else:
            workload = builtin.check_config(self.config)
            for gpa, chunk in builtin.memory_writes(workload, self.kvm.tsc_khz, top):
                self.write_phys(gpa, chunk)
            write_fill(self.ram_blocks, workload)
            entries = [builtin.entry(workload.name, base[i], i)
                       for i in range(self.config.vcpus)]
        for vcpu, entry in zip(self.runtime.vcpus, entries):
            _enter(vcpu, entry)

    # --- memory --------------------------------------------------------------------------------

    def write_phys(self, gpa: int, data: bytes) -> None:
        write_phys(self.ram_blocks, gpa, data)

    def read_phys(self, gpa: int, size: int) -> bytes:
        """``size`` bytes from guest-physical ``gpa`` (the range must lie inside one block)."""
        index, offset = locate(self.ram_blocks, gpa, size)
        block = self.ram_blocks[index]
        touch_without_gil(block.address + offset, size)  # a post-copy page may be on its way
        return bytes(block.array[offset:offset + size])

    # --- run control ---------------------------------------------------------------------------

    @property
    def status(self) -> GuestStatus:
        if self.runtime.error is not None:
            return GuestStatus.ERROR
        if self.runtime.stop_reason is not None:
            return GuestStatus.SHUTDOWN
        return self._status

    @property
    def stop_reason(self) -> str | None:
        """Why the guest stopped by itself (power off, reset), or None."""
        return self.runtime.stop_reason

    @property
    def exit_code(self) -> int | None:
        """The code a guest passed when it powered off through the control port."""
        return self.runtime.exit_code

    def start(self) -> None:
        """Run a freshly created guest."""
        with self._lock:
            if self.status != GuestStatus.CREATED:
                raise GuestError(f"start() needs a created guest; this one is {self.status}")
            self.runtime.resume()
            self._status = GuestStatus.RUNNING

    def pause(self) -> None:
        """Return once every vCPU is out of guest mode (a no-op unless running)."""
        with self._lock:
            if self._status != GuestStatus.RUNNING:
                return
            self.pause_latencies.append(self.runtime.pause())
            self._status = GuestStatus.PAUSED
        self.runtime.raise_if_failed()

    def resume(self) -> None:
        """Continue a paused guest, or run a destination after load_state()."""
        with self._lock:
            if self.status not in (GuestStatus.PAUSED, GuestStatus.CREATED):
                if self.status == GuestStatus.RUNNING:
                    return
                self.runtime.raise_if_failed()
                raise GuestError(f"cannot resume a guest that is {self.status}")
            self.runtime.resume()
            self._status = GuestStatus.RUNNING

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the guest stops by itself (power off, reset, error) or ``timeout``
        passes; returns the status.  Raises the GuestError when it failed."""
        self.runtime.stopped.wait(timeout)
        self.runtime.raise_if_failed()
        return self.status

    def close(self) -> None:
        with self._lock, self._share.lock:
            self.runtime.close()
            for block in self.ram_blocks:
                block.close()
            for disk in self.disk_images:
                disk.close()
            if self._owns_kvm:
                self.kvm.close()
            self._status = GuestStatus.CLOSED

    def __enter__(self) -> "KvmGuest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- dirty logging -------------------------------------------------------------------------

    def start_dirty_log(self) -> None:
        """Log every write from now on; the first sync reports only those.  In ring mode
        whatever the rings logged before (for a dirty limit) is discarded and re-protected
        (handed to the dirty-log readers, whose it is).  While a reader keeps the slots
        logging, the first sync also reports what was written since its last harvest."""
        with self._lock, self._share.lock:
            vm = self.runtime.vm
            if vm.dirty_ring:
                self._share.migration_fetched(vm.fetch_and_clear(self._share.new_bitmaps()))
            self._share.start_migration()
            self._dirty_log = True
            self._update_tracking()

    def stop_dirty_log(self) -> None:
        """Stop logging (the slots go on logging for a dirty limit or a reader while one
        is there)."""
        with self._lock, self._share.lock:
            self._share.stop_migration()
            self._dirty_log = False
            self._update_tracking()

    def _update_tracking(self) -> None:
        """(both locks held)"""
        on = self._dirty_log or bool(self.runtime.dirty_limits) or self._share.wanted
        for slot in self.runtime.slots:
            slot.set_logging(on)
        if on and not self._tracking and self.runtime.vm.dirty_ring:
            self._rates.restart(self.runtime.dirty_counts(), time.monotonic())
        self._tracking = on

    def sync_dirty(self) -> list[np.ndarray]:
        """Per block, pages dirtied since logging started or their last clear (KVM bitmap
        layout; with ``initially_set`` every page counts as dirty until its first clear);
        each array stays valid until the next sync."""
        with self._share.lock:
            self._check_open()
            return self._share.migration_fetched(self.runtime.vm.sync_dirty())

    def clear_dirty(self, block_index: int, start_page: int, npages: int) -> None:
        with self._share.lock:
            self._check_open()
            self.runtime.slots[block_index].clear(start_page, npages)

    def open_dirty_reader(self) -> DirtyLogReader:
        """A reader of the dirty log beside the migration (:class:`DirtyLogShare`); the slots
        log while it is open.  Each harvest re-protects what it takes, so its first reports
        the pages written from now, each later one those written since the one before."""
        with self._lock:
            self._check_open()
            reader = DirtyLogReader(self._reader_harvest, self._reader_close)
            with self._share.lock:
                self._share.add(reader)
                self._update_tracking()
                self._reader_fetch(reader)  # from now on
            return reader

    def _reader_fetch(self, reader: DirtyLogReader) -> list[np.ndarray]:
        fetched = self.runtime.vm.fetch_and_clear(self._share.new_bitmaps())
        return self._share.reader_fetched(reader, fetched)

    def _reader_harvest(self, reader: DirtyLogReader) -> list[np.ndarray]:
        with self._share.lock:
            self._check_open()
            return self._reader_fetch(reader)

    def _reader_close(self, reader: DirtyLogReader) -> None:
        with self._lock, self._share.lock:
            self._share.remove(reader)
            if self._status != GuestStatus.CLOSED:
                self._update_tracking()

    # --- state -----------------------------------------------------------------------------------

    def save_state(self) -> GuestState:
        """vCPUs and devices of a guest that is not running."""
        if self.status == GuestStatus.RUNNING:
            raise GuestError("save_state() needs a paused guest")
        cpus = [cpustate.capture(v) for v in self.runtime.vcpus]
        devices = {name: dataclasses.replace(s) for name, s in self.runtime.ports.save().items()}
        return GuestState(cpus=cpus, devices=devices)

    def load_state(self, state: GuestState) -> None:
        """Put a saved guest's vCPUs and devices into this (not running) guest."""
        if self.status == GuestStatus.RUNNING:
            raise GuestError("load_state() needs a paused guest")
        if len(state.cpus) != len(self.runtime.vcpus):
            raise GuestError(f"state has {len(state.cpus)} vCPUs, this guest "
                             f"{len(self.runtime.vcpus)}")
        for vcpu, cpu in zip(self.runtime.vcpus, state.cpus):
            cpustate.restore(vcpu, cpu)
        self.runtime.ports.load(state.devices)

    def state_specs(self) -> list:
        """One ``cpu`` entry per vCPU, then the serial port, the A20 gate, the control port."""
        from pymig.kvm.statedesc import kvm_state_specs

        # Which MSRs a vCPU's state carries is probed once per process; do it now, while the
        # guest runs, rather than inside a migration's downtime.
        self.kvm.migratable_msrs(self.runtime.vm.irqchip)
        return kvm_state_specs(self.state_shape())

    def state_shape(self, instance: int = 0) -> StateShape:
        """What the bounds of state entry ``instance`` check a stream against."""
        vm = self.runtime.vm
        return StateShape(len(self.runtime.vcpus), self.config.memory_bytes, instance,
                          xsave_size=vm.xsave_size, irqchip=vm.irqchip,
                          disk_sectors=tuple(d.sectors for d in self.disk_images))

    def migration_blockers(self) -> list[str]:
        """None of its own: a disk whose image is not shared travels with the guest (block
        migration), which :meth:`pymig.machine.Machine.check_migratable` asks for."""
        return []

    def _disk_error(self, event: DiskErrorEvent) -> None:
        self.disk_errors.append(event)
        for observer in list(self.disk_error_observers):
            observer(event)

    def vcpu_thread_ids(self) -> list[int]:
        """The kernel thread id of each vCPU's thread, in vCPU order (post-copy attributes
        the time a fault waits to the vCPU that took it)."""
        return [thread.native_id for thread in self.runtime.threads]

    def set_throttle(self, percent: int) -> None:
        self.runtime.set_throttle(percent)

    # --- per-vCPU dirty rates and limits (Guest protocol; dirty ring only) -------------------

    @property
    def supports_dirty_limit(self) -> bool:
        """True with the dirty ring, whose entries say which vCPU dirtied each page."""
        return bool(self.runtime.vm.dirty_ring)

    def vcpu_dirty_rates(self) -> list[float]:
        """Per vCPU, ring entries per second (pages newly dirtied since KVM last re-protected
        them) since the previous call or since tracking started.  The rings are harvested now
        (what they held goes to the next sync, as always).  GuestError without the dirty ring
        or while nothing is tracking."""
        with self._lock:
            self._check_open()
            counts = self.runtime.dirty_counts()  # GuestError without the ring
            if not self._tracking:
                raise GuestError("vcpu_dirty_rates() measures while dirty logging is on or a "
                                 "dirty limit is set; call start_dirty_log() first")
            return self._rates.rates(counts, time.monotonic())

    def set_vcpu_dirty_limit(self, index: int, pages_per_s: float | None) -> None:
        """Cap vCPU ``index`` at ``pages_per_s`` ring entries per second (None: lift it).
        The slots log while any limit is set; over quota, the vCPU's thread stays out of
        guest mode until the excess is paid for (:class:`~pymig.kvm.runtime.DirtyQuota`)."""
        index = check_vcpu_index(index, self.vcpu_count)
        limit = check_dirty_limit(pages_per_s)
        with self._lock, self._share.lock:
            self._check_open()
            self.runtime.set_dirty_limit(index, limit)
            self._update_tracking()

    def vcpu_dirty_counts(self) -> list[int]:
        """Per vCPU, the dirty-ring entries harvested from its ring so far (the rings are
        harvested now; what they held goes to the next sync and reader harvest, as always).
        GuestError without the dirty ring."""
        with self._lock:
            self._check_open()
            return self.runtime.dirty_counts()

    def _check_open(self) -> None:
        if self._status == GuestStatus.CLOSED:
            raise GuestError("the guest is closed")

    def progress(self) -> dict[str, int]:
        """The workload's counters from the mailbox in guest RAM (see
        :func:`pymig.guest.workloads.progress_from_mailbox`)."""
        self._touch_mailbox()
        return progress_from_mailbox(self.ram_blocks, self.vcpu_count)

    def mailbox(self) -> list[MailboxRecord]:
        """Each vCPU's mailbox record."""
        self._touch_mailbox()
        return read_mailbox(self.ram_blocks, self.vcpu_count)

    def _touch_mailbox(self) -> None:
        # During post-copy the mailbox page may still be missing: fault it in without the GIL.
        touch_mailbox(self.ram_blocks, self.vcpu_count)


def _enter(vcpu, entry: loader.Entry) -> None:
    """Point a fresh vCPU at ``entry`` and make it runnable."""
    _kvm.set_sregs(vcpu.fd, cpustate.sregs_to_kvm(entry.sregs))
    regs = _kvm.get_regs(vcpu.fd)
    regs.update(rip=entry.rip, rsp=entry.rsp, rsi=entry.rsi, rdx=entry.rdx, rflags=0x2)
    _kvm.set_regs(vcpu.fd, regs)
    if vcpu.vm.irqchip:
        _kvm.set_mp_state(vcpu.fd, _kvm.MP_STATE_RUNNABLE)


# Ring size for per-vCPU dirty rates and limits: a vCPU dirtying flat out fills it every few
# milliseconds, and each ring-full exit is a harvest (a fresh rate sample) and a point where the
# vCPU can be held without a kick; QEMU's documentation suggests the same size.
DIRTY_LIMIT_RING_ENTRIES = 4096

__all__ = ["DIRTY_LIMIT_RING_ENTRIES", "GuestState", "KvmGuest"]
