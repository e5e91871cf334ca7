"""What migration needs from a guest, whatever runs it (KVM or the simulated writer).

Everything above ``pymig.guest`` (RAM entry, migration thread, destination) talks to a guest
only through :class:`Guest`, so the same code paths run on a machine without /dev/kvm.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np

from pymig.memory import RamBlock

GiB = 1 << 30
# PC layout: RAM below the 3 GiB PCI hole, the rest from 4 GiB, as firmware would report it.
LOW_RAM_LIMIT = 3 * GiB
HIGH_RAM_BASE = 4 * GiB

# Guest-physical map shared by the KVM and the simulated guest (both run the same workloads):
#
#   0x0000_5000  parameter block, one page, written by the host before start
#   0x0000_6000  mailbox: one 64-byte progress record per vCPU, written by the guest
#   0x0010_0000  working set / compute region (1 MiB upwards)
#
# The field layouts of the parameter block and the mailbox are in pymig.guest.workloads.
GUEST_PAGE_SIZE = 4096
PARAMS_GPA = 0x5000
MAILBOX_GPA = 0x6000
MAILBOX_RECORD_BYTES = 64
WORKSET_GPA = 0x100000
# Every guest runs on at most 8 vCPUs, whatever its kind: the built-in workloads' low memory
# has room for eight stacks (pymig.guest.builtin) and their parameter block for eight share
# records; a user image gets no MP or ACPI table through which it could find more than its
# boot vCPU; and each vCPU costs the host a thread and descriptors, which a stream must not
# be able to ask for by the hundred.
MAX_VCPUS = 8
# A guest's RAM map: at most this many blocks (the PC layout has one or two), each named in
# at most MAX_BLOCK_NAME_BYTES of printable ASCII, all below x86-64's architectural limit on
# physical addresses.
MAX_RAM_BLOCKS = 32
MAX_BLOCK_NAME_BYTES = 64
GUEST_PHYS_LIMIT = 1 << 52


@dataclass(frozen=True)
class RamLayout:
    """One RAM block of a guest's memory map."""

    name: str
    size_bytes: int
    guest_phys_addr: int


def pc_layout(memory_bytes: int) -> list[RamLayout]:
    """Split ``memory_bytes`` of RAM around the PC hole: ``ram-low`` at 0, ``ram-high`` at 4 GiB."""
    if memory_bytes <= 0:
        raise ValueError(f"guest memory size must be positive, not {memory_bytes}")
    low = min(memory_bytes, LOW_RAM_LIMIT)
    blocks = [RamLayout("ram-low", low, 0)]
    if memory_bytes > low:
        blocks.append(RamLayout("ram-high", memory_bytes - low, HIGH_RAM_BASE))
    return blocks


@dataclass
class GuestConfig:
    """Everything a destination needs to build an identical, paused guest.

    ``kind`` is ``"kvm"`` or ``"simulated"``; ``workload`` names a built-in workload (or
    ``"image"`` for a user's boot sector / flat binary) and ``params`` its parameters.  The
    guest's memory and vCPU state travel in the migration stream, so an image itself is not part
    of the configuration.
    """

    kind: str
    memory_bytes: int
    vcpus: int = 1
    workload: str = "idle"
    params: dict[str, Any] = field(default_factory=dict)
    blocks: list[RamLayout] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.blocks:
            self.blocks = pc_layout(self.memory_bytes)
        self.blocks = [b if isinstance(b, RamLayout) else RamLayout(**b) for b in self.blocks]
        if sum(b.size_bytes for b in self.blocks) != self.memory_bytes:
            raise ValueError("RAM blocks do not add up to the guest's memory size")
        if self.vcpus < 1:
            raise ValueError(f"a guest needs at least one vCPU, not {self.vcpus}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GuestConfig":
        """The configuration ``data`` describes (what :meth:`to_dict` gave), with its fields'
        types and RAM map checked (:func:`check_shape`); ValueError or TypeError says what
        is wrong.  What the workload or image makes of it is checked by
        :func:`pymig.guest.validate_config`."""
        if not isinstance(data, dict):
            raise ValueError(f"a guest configuration is a JSON object, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown guest configuration keys: {sorted(unknown)}")
        check_shape(data)
        return cls(**data)


def _integer(name: str, value: Any, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], not {value}")
    return value


def check_shape(data: dict[str, Any]) -> None:
    """Check the fields of a configuration as :meth:`GuestConfig.to_dict` gives them: their
    types, at least one vCPU (how many at most is the destination's to say), and a RAM map of
    1 to :data:`MAX_RAM_BLOCKS` blocks, each with a name of its own, a size and an address in
    whole pages, all inside :data:`GUEST_PHYS_LIMIT` and none overlapping another, adding up
    to the memory size.  ValueError says what is wrong.  It reads nothing of the host: a
    destination runs it on a stream's configuration before it maps or creates anything."""
    if not isinstance(data.get("kind"), str):
        raise ValueError(f"kind must be a string, not {data.get('kind')!r}")
    memory = _integer("memory_bytes", data.get("memory_bytes"), GUEST_PAGE_SIZE,
                      GUEST_PHYS_LIMIT)
    if memory % GUEST_PAGE_SIZE:
        raise ValueError(f"memory_bytes must be a multiple of {GUEST_PAGE_SIZE}, not {memory}")
    _integer("vcpus", data.get("vcpus", 1), 1, 1 << 32)
    if not isinstance(data.get("workload", "idle"), str):
        raise ValueError(f"workload must be a string, not {data.get('workload')!r}")
    params = data.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ValueError(f"params must be an object, not {params!r}")
    blocks = data.get("blocks") or [dataclasses.asdict(b) for b in pc_layout(memory)]
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= MAX_RAM_BLOCKS:
        raise ValueError(f"a guest has 1 to {MAX_RAM_BLOCKS} RAM blocks, not "
                         f"{len(blocks) if isinstance(blocks, list) else blocks!r}")
    names: set[str] = set()
    spans = []
    for index, block in enumerate(blocks):
        if not isinstance(block, dict) or set(block) != {"name", "size_bytes",
                                                         "guest_phys_addr"}:
            raise ValueError(f"RAM block {index} must be an object of name, size_bytes and "
                             f"guest_phys_addr, not {block!r}")
        name = block["name"]
        if (not isinstance(name, str) or not 1 <= len(name) <= MAX_BLOCK_NAME_BYTES
                or not name.isascii() or not name.isprintable()):
            raise ValueError(f"RAM block {index}'s name must be 1 to {MAX_BLOCK_NAME_BYTES} "
                             f"printable ASCII characters, not {name!r}")
        if name in names:
            raise ValueError(f"two RAM blocks are named {name!r}")
        names.add(name)
        size = _integer(f"RAM block {name!r}'s size", block["size_bytes"], GUEST_PAGE_SIZE,
                        GUEST_PHYS_LIMIT)
        gpa = _integer(f"RAM block {name!r}'s guest-physical address",
                       block["guest_phys_addr"], 0, GUEST_PHYS_LIMIT - size)
        if size % GUEST_PAGE_SIZE or gpa % GUEST_PAGE_SIZE:
            raise ValueError(f"RAM block {name!r} must start and end on a "
                             f"{GUEST_PAGE_SIZE}-byte page ({size} bytes at {gpa:#x})")
        spans.append((gpa, gpa + size, name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"RAM blocks {first!r} and {second!r} overlap")
    total = sum(end - start for start, end, _ in spans)
    if total != memory:
        raise ValueError(f"the RAM blocks add up to {total} bytes, not the memory size "
                         f"{memory}")


def locate(blocks: Sequence[RamLayout | RamBlock], gpa: int, nbytes: int = 1) -> tuple[int, int]:
    """Which block holds guest-physical ``[gpa, gpa + nbytes)``: ``(block index, byte offset)``.

    The whole range must lie inside one block; a range across a hole or a block edge raises
    ValueError (workloads keep their structures inside one block).
    """
    for index, block in enumerate(blocks):
        offset = gpa - block.guest_phys_addr
        if 0 <= offset and offset + nbytes <= block.size_bytes:
            return index, offset
    raise ValueError(f"guest-physical range [{gpa:#x}, {gpa + nbytes:#x}) is not inside one RAM "
                     f"block")


def allocate_ram(config: GuestConfig, *, backing: str = "anon", hugepages: bool = True,
                 prealloc: PreallocatedRam | None = None) -> list[RamBlock]:
    """Fresh, untouched RAM blocks for ``config``'s memory map (all of them or none), or the
    blocks ``prealloc`` made ready before the stream came."""
    if prealloc is not None:
        return prealloc.take(config, backing)
    return _allocate(config.blocks, backing=backing, hugepages=hugepages, populate=False)


def _allocate(layouts: Sequence[RamLayout], *, backing: str, hugepages: bool,
              populate: bool) -> list[RamBlock]:
    blocks: list[RamBlock] = []
    try:
        for index, layout in enumerate(layouts):
            blocks.append(RamBlock.allocate(layout.name, layout.size_bytes,
                                            layout.guest_phys_addr, block_id=index,
                                            backing=backing, hugepages=hugepages,
                                            populate=populate))
    except BaseException:
        for block in blocks:
            block.close()
        raise
    return blocks


class PreallocatedRam:
    """A destination's guest RAM, mapped and faulted in before the stream that fills it comes
    (QEMU's ``-mem-prealloc``).

    A page's first write costs a fault, and on a host that is itself a VM the memory behind it
    may have to be backed again by the host's own hypervisor: 0.5-0.65 GB/s on the development
    host, several times slower than the loopback socket the pages come over.  Paid while the
    destination waits, that cost leaves the migration.  The price: the memory is resident from
    the start, so a later outgoing migration of this guest reads every page (an untouched page
    is known to be zero without reading it; these are all touched).

    The blocks follow the PC layout of ``memory_bytes``; :meth:`take` gives them to the guest
    the stream describes and refuses a stream whose RAM blocks differ.
    """

    def __init__(self, memory_bytes: int, *, backing: str = "anon", hugepages: bool = True):
        self.layout = pc_layout(memory_bytes)
        self.backing = backing
        self._hugepages = hugepages
        self._blocks: list[RamBlock] | None = _allocate(self.layout, backing=backing,
                                                        hugepages=hugepages, populate=True)

    @property
    def blocks(self) -> list[RamBlock]:
        """The blocks, until a guest takes them (then none)."""
        return list(self._blocks or ())

    def take(self, config: GuestConfig, backing: str) -> list[RamBlock]:
        """The blocks, for the guest ``config`` describes with RAM of ``backing``.

        Taken a second time (a destination that loads a file again after a failure, to
        report its offsets), they are gone with the first guest: new ones are populated now.
        """
        if config.blocks != self.layout:
            raise ValueError(f"the stream's RAM blocks ({_describe(config.blocks)}) are not the "
                             f"preallocated ones ({_describe(self.layout)})")
        if backing != self.backing:
            raise ValueError(f"the guest asks for {backing} RAM, the preallocated RAM is "
                             f"{self.backing}")
        if self._blocks is None:
            return _allocate(self.layout, backing=self.backing, hugepages=self._hugepages,
                             populate=True)
        blocks, self._blocks = self._blocks, None
        return blocks

    def close(self) -> None:
        """Unmap the blocks if no guest took them."""
        for block in self._blocks or ():
            block.close()
        self._blocks = None


def _describe(blocks: Sequence[RamLayout]) -> str:
    return ", ".join(f"{b.name} {b.size_bytes} bytes at {b.guest_phys_addr:#x}" for b in blocks)


def write_phys(blocks: Sequence[RamBlock], gpa: int, data: bytes) -> None:
    """Copy ``data`` to guest-physical ``gpa`` (the range must lie inside one block)."""
    index, offset = locate(blocks, gpa, len(data))
    blocks[index].array[offset:offset + len(data)] = np.frombuffer(data, dtype=np.uint8)


@dataclass
class GuestState:
    """What ``Guest.save_state()`` returns and ``Guest.load_state()`` takes.

    ``cpus`` holds one state object per vCPU (``CpuState`` for KVM, ``SimCpuState`` for the
    simulated writer) and ``devices`` the device states by name.  Every element is a dataclass
    with a ``VERSION`` class attribute and typed fields only, so a declarative state description
    can serialise it.
    """

    VERSION: ClassVar[int] = 1

    cpus: list
    devices: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class StateSpec:
    """One piece of a guest's state as the migration registry sees it: the entry's idstr and
    instance, its state description, and where its object lives in :class:`GuestState`
    (``cpus[cpu]`` or ``devices[device]``)."""

    idstr: str
    instance_id: int
    vmsd: Any  # pymig.vmstate.VMStateDescription (not imported: guests stay below vmstate)
    cpu: int | None = None
    device: str | None = None

    def get(self, state: GuestState) -> Any:
        return state.cpus[self.cpu] if self.cpu is not None else state.devices[self.device]

    def put(self, state: GuestState, obj: Any) -> None:
        if self.cpu is not None:
            state.cpus[self.cpu] = obj
        else:
            state.devices[self.device] = obj


class Console:
    """The guest's serial output: kept in memory, appended to files, fanned out to callbacks."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[bytes], None]] = []

    def write(self, data: bytes) -> None:
        with self._lock:
            self._data += data
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback(data)

    def data(self) -> bytes:
        with self._lock:
            return bytes(self._data)

    def text(self) -> str:
        return self.data().decode("utf-8", "replace")

    def subscribe(self, callback: Callable[[bytes], None]) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[bytes], None]) -> None:
        with self._lock:
            self._subscribers.remove(callback)

    def tee_to_file(self, path: str) -> Callable[[bytes], None]:
        """Append everything the guest prints from now on to ``path``; returns the callback."""
        handle = open(path, "ab", buffering=0)  # noqa: SIM115 - closed with the console's guest

        def write(data: bytes) -> None:
            handle.write(data)

        write.close = handle.close  # type: ignore[attr-defined]
        self.subscribe(write)
        return write


class DirtyRateMeter:
    """Per-vCPU pages/s between two readings of cumulative per-vCPU dirty counts."""

    def __init__(self) -> None:
        self._counts: list[int] | None = None
        self._time = 0.0

    def restart(self, counts: Sequence[int], now: float) -> None:
        """Measure from here (dirty tracking has just started)."""
        self._counts, self._time = list(counts), now

    def rates(self, counts: Sequence[int], now: float) -> list[float]:
        """Pages/s per vCPU since the previous reading (or the restart); this becomes the
        previous reading."""
        if self._counts is None:
            self.restart(counts, now)
        elapsed = now - self._time
        rates = [(new - old) / elapsed if elapsed > 0 else 0.0
                 for new, old in zip(counts, self._counts)]
        self.restart(counts, now)
        return rates


def check_vcpu_index(index: Any, vcpus: int) -> int:
    """A vCPU index of a guest with ``vcpus`` vCPUs (IndexError otherwise)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) \
            or not 0 <= index < vcpus:
        raise IndexError(f"no vCPU {index!r} (the guest has {vcpus})")
    return int(index)


def check_dirty_limit(pages_per_s: Any) -> float | None:
    """A dirty limit as :meth:`Guest.set_vcpu_dirty_limit` takes it: None, or a finite number
    of pages per second > 0 (ValueError otherwise)."""
    if pages_per_s is None:
        return None
    if isinstance(pages_per_s, bool) or not isinstance(pages_per_s, (int, float, np.integer,
                                                                     np.floating)):
        raise ValueError(f"a dirty limit is a number of pages per second or None, not "
                         f"{pages_per_s!r}")
    limit = float(pages_per_s)
    if not limit > 0 or math.isinf(limit):
        raise ValueError(f"a dirty limit must be a finite number of pages per second > 0, not "
                         f"{pages_per_s!r} (None lifts it)")
    return limit


@runtime_checkable
class Guest(Protocol):
    """A running guest as migration sees it.  ``KvmGuest`` and ``SimulatedGuest`` implement it.

    **Per-vCPU dirty rates and dirty limits** (QEMU's dirty-limit: throttle only the vCPUs that
    dirty too fast, by sleeping them, instead of every vCPU by run time):

    * ``supports_dirty_limit`` is False where the guest cannot tell which vCPU dirtied a page:
      a KVM guest created without the dirty ring (``create(config, dirty_ring=N)``;
      KVM_GET_DIRTY_LOG's bitmap has no owner per page).  The two methods below then raise
      GuestError saying so; they never make a figure up.  KVM enables the ring only before
      the vCPUs exist, so ring mode is chosen when the guest is created, never by a migration.
    * *Dirty tracking* is on while dirty logging is (``start_dirty_log``) or any vCPU has a
      limit.  A limit turns tracking on by itself (KVM: the slots log while any limit is set,
      even after ``stop_dirty_log``) and leaves the sync contract untouched:
      ``start_dirty_log`` still starts from a clean log and ``sync_dirty`` / ``clear_dirty``
      report every write exactly as without limits.
    * ``vcpu_dirty_rates()`` -> one float per vCPU: the pages/s it dirtied between the previous
      call and this one (the first call: since tracking started), measured by the dirty
      tracking itself, never by the workload.  KVM: ring entries harvested from that vCPU's
      ring, i.e. pages newly dirtied since KVM last re-protected them, so a page rewritten
      between two harvests counts once (harvests happen at every sync, ring-full exit, call,
      and every 10 ms while a limit is set).  Simulated: the pages of its share a writer
      logged, counted where it sets their dirty bits.  GuestError while tracking is off.
    * ``set_vcpu_dirty_limit(index, pages_per_s)`` caps vCPU ``index`` at ``pages_per_s``
      (a finite number > 0) dirtied pages per second, as measured above; ``None`` lifts the
      cap.  Each page the vCPU dirties costs it 1/quota s (with at most 10 ms of unused quota
      carried over) and it is kept from running until it has paid (KVM: its thread waits out
      of guest mode, checked at every harvest; simulated: the writer waits between batches),
      so only that vCPU slows, in proportion to how far over quota it is, and the guest's
      clock keeps running.  Limits are lifted when the guest closes; they are not part of the
      migrated state.  IndexError for a vCPU that does not exist, ValueError for a bad rate.
    """

    config: GuestConfig
    ram_blocks: list[RamBlock]
    vcpu_count: int
    console: Console

    @property
    def status(self) -> str:
        """``created`` | ``running`` | ``paused`` | ``shutdown`` | ``error``."""

    def start(self) -> None: ...
    def pause(self) -> None:
        """Return once no vCPU (or writer) is changing guest memory or its own state."""
    def resume(self) -> None: ...
    def close(self) -> None: ...

    def start_dirty_log(self) -> None: ...
    def stop_dirty_log(self) -> None: ...
    def sync_dirty(self) -> list[np.ndarray]:
        """Per block, the pages dirtied since the last sync/clear; valid until the next sync."""
    def clear_dirty(self, block_index: int, start_page: int, npages: int) -> None:
        """Re-arm dirty tracking for that range (a no-op where syncing already did)."""

    def save_state(self) -> Any: ...
    def load_state(self, state: Any) -> None: ...
    def state_specs(self) -> list[StateSpec]:
        """The state entries this guest migrates besides RAM (vCPUs, devices)."""
    def set_throttle(self, percent: int) -> None: ...
    def progress(self) -> dict[str, int]: ...

    @property
    def supports_dirty_limit(self) -> bool:
        """Whether this guest measures per-vCPU dirty rates (and so can limit them)."""
    def vcpu_dirty_rates(self) -> list[float]:
        """Per vCPU, pages/s dirtied since the previous call (see the class docstring)."""
    def set_vcpu_dirty_limit(self, index: int, pages_per_s: float | None) -> None:
        """Cap vCPU ``index``'s dirty rate at ``pages_per_s``; None lifts the cap."""


def create(config: GuestConfig, **options: Any) -> Guest:
    """Build a new, paused guest with fresh RAM for ``config`` (source or destination)."""
    if config.kind == "kvm":
        from pymig.guest.kvm_guest import KvmGuest

        return KvmGuest.create(config, **options)
    if config.kind == "simulated":
        from pymig.guest.simulated import SimulatedGuest

        return SimulatedGuest.create(config, **options)
    raise ValueError(f"unknown guest kind {config.kind!r} (use 'kvm' or 'simulated')")
