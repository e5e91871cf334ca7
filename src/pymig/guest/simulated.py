"""A guest without KVM: native writer threads stand in for vCPUs.

:class:`SimulatedGuest` behaves like a KVM guest as far as migration can tell: its RAM blocks
change while migration reads them, its dirty log has KVM's semantics (a write is logged after it
lands; a sync fetches and clears), it pauses with bounded latency, it can be throttled, and its
"vCPU state" (each writer's position, pass, generator state, partial checksum) saves into a
:class:`~pymig.guest.base.GuestState` that, loaded into a destination built with
``create(config, incoming=True)``, continues the workload exactly where the source stopped.

The writers are C threads (``pymig._core.simguest``) that hold no GIL, in both backends: they
stand in for a guest, not for a kernel with a Python twin.  The workloads, the parameter block
and the mailbox are those of :mod:`pymig.guest.workloads`, shared with the KVM guest: the
writers are configured from the very parameter block a source writes into guest RAM, packed
for their clock (one tick per nanosecond of CLOCK_MONOTONIC).

Status transitions::

    created --start()/resume()--> running --pause()--> paused --resume()--> running
    any --close()--> shutdown

``clear_dirty`` is a no-op: ``sync_dirty`` already cleared the bits it returned, atomically with
reading them.  KVM's manual-protect mode separates the two so that re-protection can happen
just before a range is sent instead of at sync time; either way a write that lands after the
range is re-armed is reported by the next sync, and a write before it is in the data the
migration reads after clearing.  Clearing at sync time re-arms earlier than any clear_dirty
could, so it reports a superset of what manual mode reports (at worst a page sent twice) and
never fewer.

Per-vCPU dirty rates and limits: each writer counts the pages of its share it dirties where it
sets their dirty bits, so :meth:`~SimulatedGuest.vcpu_dirty_rates` needs no ring; a writer with
a dirty limit enforces its own quota in C, between batches (``_core/c/simguest.c``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from pymig._core.simguest import CPU_FIELDS, Writers
from pymig.disk import DiskImage
from pymig.errors import GuestError, StateError
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
    StateSpec,
    allocate_ram,
    check_dirty_limit,
    check_vcpu_index,
    write_phys,
)
from pymig.guest.disks import open_disks, with_targets
from pymig.guest.layout import PARAMS_GPA
from pymig.guest.workloads import (KVM_ONLY, Workload, pack_params, progress_from_mailbox,
                                   resolve, touch_mailbox, write_fill)
from pymig.memory import Backing, RamBlock
from pymig.vmstate import Field, VMStateDescription, any_value

TICK_KHZ = 1_000_000  # the writers' clock: CLOCK_MONOTONIC, one tick per nanosecond


@dataclass
class SimCpuState:
    """One simulated vCPU (writer): where it is in its workload and what it carries.

    ``index``, ``workload``, ``first_frame`` and ``npages`` say which share of which workload the
    state belongs to (checked on load); the rest is the writer's position: ``phase`` (compute:
    0 fill, 1 fold, 2 feed, 3 done), ``pos`` (next page of the share), ``pass_number``
    (selfcheck: the pass being stamped; compute: the round), ``rng`` (xorshift64 state of the
    dirtier or of compute's fill), ``acc`` and ``partial_sum`` (compute's checksum c so far
    and this round's s).  Version 2: the workloads of :mod:`pymig.guest.workloads` as the KVM
    guest runs them (version 1 writers ran other generators and another compute round).
    """

    VERSION: ClassVar[int] = 2

    index: int
    workload: int
    first_frame: int
    npages: int
    phase: int
    pos: int
    pass_number: int
    rng: int
    acc: int
    partial_sum: int


PHASE_DONE = 3  # compute's last phase (0 fill, 1 fold, 2 feed, 3 done)
U64_MAX = (1 << 64) - 1


def _is(workload: str) -> Callable[[StateShape], bool]:
    return lambda g: g.workload.name == workload


_compute, _selfcheck = _is("compute"), _is("selfcheck")

# Every field bounded against the writer the destination built for this entry's vCPU: the
# identity fields must be its own, the position inside its share (the writer writes
# base + pos * 4096), the phase and pass within what its workload can reach.
SIM_CPU_VMSD = VMStateDescription(
    "cpu", version_id=SimCpuState.VERSION, minimum_version_id=SimCpuState.VERSION,
    fields=[
        Field.u64("index", lo=lambda g: g.instance, hi=lambda g: g.instance),
        Field.u64("workload", lo=lambda g: g.workload.params.workload_id,
                  hi=lambda g: g.workload.params.workload_id),
        Field.u64("first_frame", lo=lambda g: g.share.first_frame,
                  hi=lambda g: g.share.first_frame),
        Field.u64("npages", lo=lambda g: g.share.npages, hi=lambda g: g.share.npages),
        Field.u64("phase", hi=lambda g: PHASE_DONE if _compute(g) else 0),
        # idle writers have an empty share and never move
        Field.u64("pos", hi=lambda g: max(g.share.npages, 1) - 1),
        # selfcheck stamps pass p >= 1; compute counts rounds up to its last
        Field.u64("pass_number", lo=lambda g: 1 if _selfcheck(g) else 0,
                  hi=lambda g: g.workload.params.rounds if _compute(g) else U64_MAX),
        Field.u64("rng", bound=any_value("xorshift64 state: any value is a state")),
        Field.u64("acc", bound=any_value("compute's checksum so far")),
        Field.u64("partial_sum", bound=any_value("compute's sum of this round so far")),
    ],
    factory=lambda: SimCpuState(*[0] * len(dataclasses.fields(SimCpuState))),
)
assert [f.name for f in SIM_CPU_VMSD.fields] == [f.name for f in dataclasses.fields(SimCpuState)]


class SimulatedGuest:
    """A :class:`~pymig.guest.base.Guest` whose vCPUs are native writer threads."""

    def __init__(self, config: GuestConfig, workload: Workload, ram_blocks: list[RamBlock],
                 writers: Writers, incoming: bool, disks: Sequence[DiskImage] = ()):
        self.config = config
        # its disks have no device model: nothing in the guest writes them, only the host
        # through these images (as the KVM guest's ATA channel does), and they travel with it
        self.disk_images = list(disks)
        self.workload = workload
        self.ram_blocks = ram_blocks
        self.vcpu_count = config.vcpus
        self.console = Console()
        self.incoming = incoming
        self._writers = writers
        self._status = GuestStatus.CREATED
        self._has_state = not incoming
        self._logging = False  # the migration's log (start_dirty_log)
        self._writers_logging = False  # the writers log: for the migration or a reader
        self._share = DirtyLogShare(writers.nwords)
        self._throttle = 0
        self._dirty_limits: dict[int, float] = {}
        self._rates = DirtyRateMeter()
        self._lock = threading.RLock()

    @classmethod
    def create(cls, config: GuestConfig, incoming: bool = False, *, backing: Backing = "anon",
               hugepages: bool = True, dirty_ring: int = 0,
               prealloc: PreallocatedRam | None = None,
               disk_paths: Sequence[str] | None = None,
               disk_targets: Sequence = (), disk_dir: str | None = None) -> "SimulatedGuest":
        """A new, stopped guest with fresh RAM (or RAM made ready earlier: ``prealloc``).

        ``dirty_ring`` is accepted so that one set of options builds either kind of guest; the
        writers count their own dirty pages and need no ring.  Disks are opened as a KVM
        guest's are (:func:`pymig.guest.disks.open_disks`: ``disk_paths``, ``disk_targets``,
        ``disk_dir``), with no device to drive them.

        A source (``incoming=False``) gets its parameter block (and an idle guest's random fill)
        written and its writers set at the workload's start.  A destination
        (``incoming=True``) gets nothing written at all, not even the parameter block or the
        mailbox: the migration brings the memory, then :meth:`load_state` the writers' state.
        """
        if config.kind != "simulated":
            raise ValueError(f"a SimulatedGuest needs kind 'simulated', not {config.kind!r}")
        if config.workload in KVM_ONLY:
            raise ValueError(f"{config.workload} drives a disk controller, which only a KVM "
                             f"guest has")
        workload = resolve(config)
        params = pack_params(workload, TICK_KHZ)
        disks = open_disks(config, incoming, disk_paths, disk_targets, disk_dir)
        blocks: list[RamBlock] = []
        try:
            config = with_targets(config, disks)
            blocks = allocate_ram(config, backing=backing, hugepages=hugepages,
                                  prealloc=prealloc)
            writers = Writers([(b.guest_phys_addr, b.array) for b in blocks], params)
        except BaseException:
            for block in blocks:
                block.close()
            for disk in disks:
                disk.close()
            raise
        guest = cls(config, workload, blocks, writers, incoming, disks)
        if not incoming:
            write_phys(blocks, PARAMS_GPA, params)
            write_fill(blocks, workload)
        return guest

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def status(self) -> GuestStatus:
        return self._status

    def start(self) -> None:
        """Run the workload from its start (a source) or from the loaded state (a destination)."""
        with self._lock:
            if self._status != GuestStatus.CREATED:
                raise GuestError(f"start() needs a created guest; this one is {self._status}")
            if not self.incoming:
                self.console.write(f"pymig simulated guest: {self.vcpu_count} vCPU(s), workload "
                                   f"{self.workload.name}\n".encode())
            self._run()

    def resume(self) -> None:
        """Continue a paused guest, or run a created one (a destination after load_state)."""
        with self._lock:
            if self._status == GuestStatus.RUNNING:
                return
            if self._status not in (GuestStatus.CREATED, GuestStatus.PAUSED):
                raise GuestError(f"cannot resume a guest that is {self._status}")
            self._run()

    def _run(self) -> None:
        if not self._has_state:
            raise GuestError("an incoming guest runs only after load_state() gave it its vCPU "
                             "state")
        self._writers.run()
        self._status = GuestStatus.RUNNING

    def pause(self) -> None:
        """Return once every writer is stopped between two page writes (within one batch)."""
        with self._lock:
            if self._status == GuestStatus.RUNNING:
                self._writers.pause()
                self._status = GuestStatus.PAUSED
            elif self._status == GuestStatus.SHUTDOWN:
                raise GuestError("the guest is shut down")

    def close(self) -> None:
        """Join the writers and unmap the RAM.  Idempotent.

        A block that a caller still holds a view of (say ``block.array[...]`` kept in a local)
        stays mapped until the last such view is gone; the guest is shut down either way.
        """
        with self._lock:
            if self._status == GuestStatus.SHUTDOWN:
                return
            self._writers.close()
            self._dirty_limits.clear()  # limits die with the writers
            self._status = GuestStatus.SHUTDOWN
            for disk in self.disk_images:
                disk.close()
            for block in self.ram_blocks:
                try:
                    block.close()
                except BufferError:
                    pass  # unmapped when the caller's view and this guest are collected

    def __enter__(self) -> "SimulatedGuest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._status == GuestStatus.SHUTDOWN:
            raise GuestError("the guest is shut down")

    # --- dirty log ---------------------------------------------------------------------------

    def start_dirty_log(self) -> None:
        """Log every write from the moment this returns (the bitmaps start empty, or, while a
        dirty-log reader keeps the writers logging, hold what was written since its last
        harvest: a page sent once more at worst)."""
        with self._lock:
            self._check_open()
            if not self._logging:
                if not self._dirty_limits:
                    self._restart_rates()
                with self._share.lock:
                    self._share.start_migration()
                    self._logging = True
                    self._update_logging()

    def stop_dirty_log(self) -> None:
        """Stop logging and forget what was logged since the last sync (the writers log on
        while a dirty-log reader is open)."""
        with self._lock:
            self._check_open()
            if self._logging:
                with self._share.lock:
                    self._share.stop_migration()
                    self._logging = False
                    self._update_logging()

    def _update_logging(self) -> None:
        """The writers log while anyone reads the log (both locks held)."""
        wanted = self._share.wanted
        if wanted != self._writers_logging:
            self._writers.set_logging(wanted)
            self._writers_logging = wanted

    def _fetch(self) -> list[np.ndarray]:
        """Per block, a new bitmap of the pages written since any previous fetch
        (fetch-and-clear; the share's lock held)."""
        bitmaps = []
        for index, words in enumerate(self._writers.nwords):
            out = np.empty(words, dtype=np.uint64)
            self._writers.sync(index, out)
            bitmaps.append(out)
        return bitmaps

    def sync_dirty(self) -> list[np.ndarray]:
        """Per block, a new bitmap of the pages written since the previous sync (fetch-and-clear).

        Every write whose bit a sync returns is visible in the block once this returns.
        """
        with self._lock:  # close() must not free the bitmaps under a sync
            self._check_open()
            if not self._logging:
                raise GuestError("sync_dirty() needs dirty logging on (start_dirty_log)")
            with self._share.lock:
                return self._share.migration_fetched(self._fetch())

    def open_dirty_reader(self) -> DirtyLogReader:
        """A reader of the dirty log beside the migration (:class:`DirtyLogShare`); the
        writers log while it is open.  Its first harvest reports the pages written from now."""
        with self._lock:
            self._check_open()
            reader = DirtyLogReader(self._reader_harvest, self._reader_close)
            with self._share.lock:
                self._share.add(reader)
                self._update_logging()
                self._share.reader_fetched(reader, self._fetch())  # from now on
            return reader

    def _reader_harvest(self, reader: DirtyLogReader) -> list[np.ndarray]:
        with self._lock:
            self._check_open()
            with self._share.lock:
                return self._share.reader_fetched(reader, self._fetch())

    def _reader_close(self, reader: DirtyLogReader) -> None:
        with self._lock:
            with self._share.lock:
                self._share.remove(reader)
                if self._status != GuestStatus.SHUTDOWN:
                    self._update_logging()

    def clear_dirty(self, block_index: int, start_page: int, npages: int) -> None:
        """A no-op: :meth:`sync_dirty` cleared the bits it returned (see the module docstring)."""
        block = self.ram_blocks[block_index]
        if start_page < 0 or npages < 0 or start_page + npages > block.npages:
            raise ValueError(f"pages [{start_page}, {start_page + npages}) outside RAM block "
                             f"{block.name!r} of {block.npages} pages")

    # --- state -------------------------------------------------------------------------------

    def save_state(self) -> GuestState:
        """Every writer's state; the guest must be stopped (created or paused)."""
        with self._lock:
            if self._status not in (GuestStatus.CREATED, GuestStatus.PAUSED):
                raise GuestError(f"save_state() needs a stopped guest; this one is "
                                 f"{self._status}")
            if not self._has_state:
                raise GuestError("this incoming guest has no vCPU state yet")
            cpus = [SimCpuState(index=share.index, workload=self.workload.params.workload_id,
                                first_frame=share.first_frame, npages=share.npages,
                                **self._writers.get_cpu(share.index))
                    for share in self.workload.shares]
            return GuestState(cpus=cpus, devices={})

    def load_state(self, state: GuestState) -> None:
        """Give every writer the state a source saved; the guest must be stopped."""
        with self._lock:
            if self._status not in (GuestStatus.CREATED, GuestStatus.PAUSED):
                raise GuestError(f"load_state() needs a stopped guest; this one is "
                                 f"{self._status}")
            if len(state.cpus) != self.vcpu_count:
                raise StateError(f"state has {len(state.cpus)} vCPUs, the guest "
                                 f"{self.vcpu_count}", entry="cpu")
            for share, cpu in zip(self.workload.shares, state.cpus):
                _check_cpu(share.index, self.workload.params.workload_id, share.first_frame,
                           share.npages, cpu)
            for cpu in state.cpus:
                self._writers.set_cpu(cpu.index, {name: getattr(cpu, name) for name in CPU_FIELDS})
            self._has_state = True

    def state_specs(self) -> list[StateSpec]:
        """One ``cpu`` entry per writer; the simulated guest has no devices."""
        return [StateSpec("cpu", i, SIM_CPU_VMSD, cpu=i, shape=self.state_shape(i))
                for i in range(self.vcpu_count)]

    def state_shape(self, instance: int = 0) -> StateShape:
        """What the bounds of state entry ``instance`` check a stream against."""
        return StateShape(self.vcpu_count, self.config.memory_bytes, instance,
                          workload=self.workload)

    # --- workload ----------------------------------------------------------------------------

    def migration_blockers(self) -> list[str]:
        """Nothing keeps a simulated guest from migrating."""
        return []

    def set_throttle(self, percent: int) -> None:
        """Take ``percent`` (0..99) of every writer's run time, in 10 ms timeslices."""
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 99:
            raise ValueError(f"throttle must be an integer percentage 0..99, not {percent!r}")
        with self._lock:
            self._check_open()
            self._writers.set_throttle(percent)
            self._throttle = percent

    @property
    def throttle(self) -> int:
        return self._throttle

    # --- per-vCPU dirty rates and limits (Guest protocol) ------------------------------------

    @property
    def supports_dirty_limit(self) -> bool:
        return True

    def vcpu_dirty_rates(self) -> list[float]:
        """Per writer, the pages of its share it dirtied per second since the previous call
        (or since tracking started: dirty logging on or a limit set; GuestError otherwise)."""
        with self._lock:
            self._check_open()
            if not (self._logging or self._dirty_limits):
                raise GuestError("vcpu_dirty_rates() measures while dirty logging is on or a "
                                 "dirty limit is set; call start_dirty_log() first")
            return self._rates.rates(self._writers.dirty_counts(), time.monotonic())

    def vcpu_dirty_counts(self) -> list[int]:
        """Per writer, the pages of its share it has written so far (every write counts, as
        each would be logged)."""
        with self._lock:
            self._check_open()
            return [int(n) for n in self._writers.dirty_counts()]

    def set_vcpu_dirty_limit(self, index: int, pages_per_s: float | None) -> None:
        """Cap writer ``index`` at ``pages_per_s`` dirtied pages per second (None: lift it);
        the writer waits out its excess between batches, the others run on."""
        index = check_vcpu_index(index, self.vcpu_count)
        limit = check_dirty_limit(pages_per_s)
        with self._lock:
            self._check_open()
            if not (self._logging or self._dirty_limits) and limit is not None:
                self._restart_rates()
            self._writers.set_dirty_limit(index, limit or 0.0)
            if limit is None:
                self._dirty_limits.pop(index, None)
            else:
                self._dirty_limits[index] = limit

    def _restart_rates(self) -> None:
        self._rates.restart(self._writers.dirty_counts(), time.monotonic())

    def progress(self) -> dict[str, int]:
        """The workload's counters from the mailbox in guest RAM (see progress_from_mailbox)."""
        self._check_open()
        touch_mailbox(self.ram_blocks, self.vcpu_count)  # (a post-copy page may be missing)
        return progress_from_mailbox(self.ram_blocks, self.vcpu_count)

    def __repr__(self) -> str:
        return (f"SimulatedGuest({self.workload.name}, {self.vcpu_count} vCPU(s), "
                f"{self.config.memory_bytes} bytes, {self._status})")


def _check_cpu(index: int, workload: int, first_frame: int, npages: int, cpu: Any) -> None:
    """Refuse a vCPU state that does not belong to this guest's vCPU ``index``."""
    if not isinstance(cpu, SimCpuState):
        raise StateError(f"vCPU {index}: expected a SimCpuState, got {type(cpu).__name__}",
                         entry="cpu")
    expected = {"index": index, "workload": workload, "first_frame": first_frame,
                "npages": npages}
    for name, value in expected.items():
        if getattr(cpu, name) != value:
            raise StateError(f"vCPU {index}: state is for {name} {getattr(cpu, name)}, this "
                             f"guest has {value}", entry="cpu", field=name)
    for f in dataclasses.fields(cpu):
        value = getattr(cpu, f.name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise StateError(f"vCPU {index}: {f.name} = {value!r} is not a u64", entry="cpu",
                             field=f.name, value=value)
    # What the writer indexes memory with, again here for a state that did not come through
    # the description (the writer itself refuses it too).
    limits = {"pos": max(npages, 1) - 1, "phase": PHASE_DONE}
    for name, hi in limits.items():
        value = getattr(cpu, name)
        if value > hi:
            raise StateError(f"vCPU {index}: {name} {value} is out of bounds: this guest "
                             f"takes [0, {hi}]", entry="cpu", field=name, value=value)
