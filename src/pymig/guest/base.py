"""What migration needs from a guest, whatever runs it (KVM or the simulated writer).

Everything above ``pymig.guest`` (RAM entry, migration thread, destination) talks to a guest
only through :class:`Guest`, so the same code paths run on a machine without /dev/kvm.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np

from pymig.disk import MAX_DISK_BYTES, MAX_PATH_CHARS, SECTOR_BYTES
from pymig.guest.layout import GUEST_PAGE_SIZE, RamLayout, locate, pc_layout
from pymig.guest.loader import check_image_params
from pymig.guest.workloads import DEFAULTS, parse_params
from pymig.memory import RamBlock, not_enough_memory

CONSOLE_BYTES = 1 << 20  # the newest serial output a guest keeps in memory


@dataclass(frozen=True)
class DiskConfig:
    """One disk of a guest's configuration: its image file (an absolute path), the image's
    size, and how it is used (``--disk PATH[,readonly][,shared]``)."""

    path: str
    size_bytes: int
    readonly: bool = False
    shared: bool = False


@dataclass
class GuestConfig:
    """Everything a destination needs to build an identical, paused guest.

    ``kind`` is ``"kvm"`` or ``"simulated"``; ``workload`` names a built-in workload (or
    ``"image"`` for a user's boot sector / flat binary) and ``params`` its parameters.  The
    guest's memory and vCPU state travel in the migration stream, so an image itself is not part
    of the configuration.  ``disks`` are the ATA channel's master and slave (:class:`DiskConfig`:
    an image file named by its absolute path, its size, whether it is read-only and whether it
    is shared: a destination opens a shared image where the source did); a simulated guest
    has the images, with no controller to drive them.
    """

    kind: str
    memory_bytes: int
    vcpus: int = 1
    workload: str = "idle"
    params: dict[str, Any] = field(default_factory=dict)
    blocks: list[RamLayout] = field(default_factory=list)
    disks: list[DiskConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.blocks:
            self.blocks = pc_layout(self.memory_bytes)
        self.blocks = [b if isinstance(b, RamLayout) else RamLayout(**b) for b in self.blocks]
        if sum(b.size_bytes for b in self.blocks) != self.memory_bytes:
            raise ValueError("RAM blocks do not add up to the guest's memory size")
        if self.vcpus < 1:
            raise ValueError(f"a guest needs at least one vCPU, not {self.vcpus}")
        self.disks = [d if isinstance(d, DiskConfig) else DiskConfig(**d) for d in self.disks]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "GuestConfig":
        """The configuration a stream (or a file) describes, every key checked against
        :data:`CONFIG_FIELDS` first: ConfigError names the key and its value."""
        if not isinstance(data, dict):
            raise ConfigError(f"a guest configuration is a JSON object, not "
                              f"{type(data).__name__}", None, data)
        unknown = sorted(str(key) for key in set(data) - {f.name for f in CONFIG_FIELDS})
        if unknown:
            raise ConfigError(f"unknown guest configuration keys: {unknown}", unknown[0], None)
        for f in CONFIG_FIELDS:
            if f.name in data:
                f.validate(data[f.name], data)
            elif f.required:
                raise ConfigError(f"{f.name}: missing", f.name, None)
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc), None, None) from None


class ConfigError(ValueError):
    """A guest configuration key that is missing, of the wrong type or out of its bounds."""

    def __init__(self, message: str, field: str | None, value: Any):
        super().__init__(message)
        self.field = field
        self.value = value


@dataclass(frozen=True)
class ConfigField:
    """One key of a guest configuration (the ``pymig.config`` section of a stream): its JSON
    type and the values a destination takes, ``lo``..``hi`` for a number and ``check(value,
    config)`` for the rest (the problem in words, or None).  These are the sane values of the
    field; how much memory or how many vCPUs a destination is willing to give is its own
    policy, applied on top."""

    name: str
    type: type
    lo: int | None = None
    hi: int | None = None
    check: Callable[[Any, dict], str | None] | None = None
    required: bool = False

    def validate(self, value: Any, config: dict) -> None:
        ok = isinstance(value, self.type) and not (isinstance(value, bool)
                                                   and self.type is not bool)
        if not ok:
            raise ConfigError(f"{self.name}: {_short(value)} is not {self.type.__name__}",
                              self.name, value)
        if (self.lo is not None and value < self.lo) or (self.hi is not None
                                                         and value > self.hi):
            raise ConfigError(f"{self.name}: {value} is out of bounds [{self.lo}, {self.hi}]",
                              self.name, value)
        if self.check is not None:
            try:
                problem = self.check(value, config)
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                problem = str(exc) or type(exc).__name__
            if problem:
                raise ConfigError(f"{self.name}: {_short(value)}: {problem}", self.name, value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Architectural ceilings, not a destination's policy: x86-64 addresses at most 2**52 bytes of
# guest-physical memory, and KVM creates at most 4096 vCPUs in a VM (KVM_MAX_VCPUS).
MAX_GUEST_PHYS = 1 << 52
KVM_MAX_VCPUS = 4096
MAX_RAM_BLOCKS = 8
MAX_NAME_CHARS = 64
MAX_PARAMS = 16
MAX_PARAM_TEXT = 4096


def _one_of(*choices: str) -> Callable[[Any, dict], str | None]:
    return lambda value, config: None if value in choices else f"not one of {list(choices)}"


def _page_multiple(value: int, config: dict) -> str | None:
    return f"not a multiple of {GUEST_PAGE_SIZE}" if value % GUEST_PAGE_SIZE else None


def _known_workload(value: str, config: dict) -> str | None:
    return None if value in DEFAULTS or value == "image" else "not a workload this build knows"


def _param_value_ok(value: Any) -> bool:
    if value is None or isinstance(value, (bool, str)):
        return not isinstance(value, str) or len(value) <= MAX_PARAM_TEXT
    if isinstance(value, int):
        return -(1 << 64) < value < 1 << 64
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return len(value) <= KVM_MAX_VCPUS and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in value)
    return False


def _workload_params(value: dict, config: dict) -> str | None:
    """A few scalars (or a list of per-vCPU integers), then the workload's own checks."""
    if len(value) > MAX_PARAMS:
        return f"{len(value)} parameters, more than {MAX_PARAMS}"
    for key, item in value.items():
        if len(key) > MAX_NAME_CHARS or not _param_value_ok(item):
            return f"parameter {key[:MAX_NAME_CHARS]!r} = {_short(item)} is not a sane value"
    workload = config.get("workload", "idle")
    if workload == "image":
        check_image_params(value)
    elif isinstance(workload, str):
        if workload in DEFAULTS:
            parse_params(workload, value)
    return None


def _ram_layout(value: list, config: dict) -> str | None:
    """At most :data:`MAX_RAM_BLOCKS` named, page-aligned blocks inside the guest-physical
    address space, none overlapping another (empty: the PC layout of ``memory_bytes``)."""
    if len(value) > MAX_RAM_BLOCKS:
        return f"{len(value)} RAM blocks, more than {MAX_RAM_BLOCKS}"
    keys = {f.name for f in dataclasses.fields(RamLayout)}
    names: set[str] = set()
    spans = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or set(block) != keys:
            return f"block {i} is not an object of exactly {sorted(keys)}"
        name, size, gpa = block["name"], block["size_bytes"], block["guest_phys_addr"]
        if (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS
                or not name.isascii() or not name.isprintable()):
            return f"block {i}'s name is not 1..{MAX_NAME_CHARS} printable ASCII characters"
        if name in names:
            return f"two RAM blocks are named {name!r}"
        names.add(name)
        for what, number in (("size", size), ("address", gpa)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0 \
                    or number % GUEST_PAGE_SIZE:
                return f"block {i}'s {what} {_short(number)} is not a page multiple >= 0"
        if not size or gpa + size > MAX_GUEST_PHYS:
            return f"block {i} is empty or ends above {MAX_GUEST_PHYS:#x}"
        spans.append((gpa, gpa + size, name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            return f"RAM blocks {first!r} and {second!r} overlap"
    total = sum(end - start for start, end, _ in spans)
    memory = config.get("memory_bytes")
    if spans and total != memory:
        return f"the RAM blocks add up to {total} bytes, not the memory size {memory}"
    return None


MAX_DISKS = 2  # the ATA channel's master and slave


def _disk_list(value: list, config: dict) -> str | None:
    """At most :data:`MAX_DISKS` disks, each an object of exactly the :class:`DiskConfig` keys:
    an absolute path, a size in whole sectors that LBA48 addresses, two flags."""
    if len(value) > MAX_DISKS:
        return f"{len(value)} disks, more than the {MAX_DISKS} of an ATA channel"
    keys = {f.name for f in dataclasses.fields(DiskConfig)}
    for i, disk in enumerate(value):
        if not isinstance(disk, dict) or set(disk) != keys:
            return f"disk {i} is not an object of exactly {sorted(keys)}"
        path, size = disk["path"], disk["size_bytes"]
        if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS \
                or not path.startswith("/") or "\0" in path:
            return f"disk {i}'s path is not an absolute path of at most {MAX_PATH_CHARS} chars"
        if isinstance(size, bool) or not isinstance(size, int) \
                or not 0 < size <= MAX_DISK_BYTES or size % SECTOR_BYTES:
            return (f"disk {i}'s size {_short(size)} is not a whole number of sectors up to "
                    f"{MAX_DISK_BYTES}")
        if not all(isinstance(disk[flag], bool) for flag in ("readonly", "shared")):
            return f"disk {i}'s readonly and shared are not booleans"
    return None


#: Every key of a guest configuration, in the order a stream's is checked.
CONFIG_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("kind", str, check=_one_of("kvm", "simulated"), required=True),
    ConfigField("memory_bytes", int, lo=GUEST_PAGE_SIZE, hi=MAX_GUEST_PHYS,
                check=_page_multiple, required=True),
    ConfigField("vcpus", int, lo=1, hi=KVM_MAX_VCPUS),
    ConfigField("workload", str, check=_known_workload),
    ConfigField("params", dict, check=_workload_params),
    ConfigField("blocks", list, check=_ram_layout),
    ConfigField("disks", list, check=_disk_list),
)


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
    except BaseException as exc:
        for block in blocks:
            block.close()
        if isinstance(exc, OSError) and exc.errno == errno.ENOMEM and backing != "hugetlb":
            # the guest's size is what the user asked for, not one block's
            raise not_enough_memory(sum(layout.size_bytes for layout in layouts)) from None
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
class StateShape:
    """The guest a destination built, as the bounds of its state descriptions see it
    (:class:`pymig.vmstate.Bound`): a stream's vCPU index, XSAVE area or writer position is
    checked against these before it is believed.  One per state entry: ``instance`` is the
    entry's (the vCPU a ``cpu`` entry loads)."""

    vcpus: int
    memory_bytes: int
    instance: int = 0
    xsave_size: int = 0  # KVM: the VM's XSAVE area (KVM_CAP_XSAVE2), what KVM_SET_XSAVE reads
    irqchip: bool = False  # KVM: an in-kernel irqchip, whose local APIC page travels
    workload: Any = None  # the built-in workload placed in the guest (its shares), None: none
    disk_sectors: tuple[int, ...] = ()  # KVM: the sectors of each disk opened (master first)

    @property
    def share(self) -> Any:
        """This entry's vCPU's share of the workload."""
        return self.workload.shares[self.instance]


@dataclass(frozen=True)
class StateSpec:
    """One piece of a guest's state as the migration registry sees it: the entry's idstr and
    instance, its state description, where its object lives in :class:`GuestState`
    (``cpus[cpu]`` or ``devices[device]``), and the :class:`StateShape` its fields are
    bounded by."""

    idstr: str
    instance_id: int
    vmsd: Any  # pymig.vmstate.VMStateDescription (not imported: guests stay below vmstate)
    cpu: int | None = None
    device: str | None = None
    shape: StateShape | None = None

    def get(self, state: GuestState) -> Any:
        return state.cpus[self.cpu] if self.cpu is not None else state.devices[self.device]

    def put(self, state: GuestState, obj: Any) -> None:
        if self.cpu is not None:
            state.cpus[self.cpu] = obj
        else:
            state.devices[self.device] = obj


class Console:
    """The guest's serial output: appended to files, fanned out to callbacks, and the newest
    of it kept in memory.

    The memory is a ring of ``capacity`` bytes (:data:`CONSOLE_BYTES`, 1 MiB, by default): a
    guest that prints without end costs no more than that; :meth:`data` holds the newest
    ``capacity`` bytes printed and ``dropped`` counts the older bytes let go.  Files and
    callbacks see every byte.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity or CONSOLE_BYTES
        if self.capacity < 1:
            raise ValueError(f"a console keeps at least one byte, not {capacity}")
        self._trimmed = 0
        self._data = bytearray()
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[bytes], None]] = []

    def write(self, data: bytes) -> None:
        with self._lock:
            self._data += data
            # Let go of the oldest bytes once twice the capacity is held, so that trimming
            # (a copy of what is kept) costs a byte written O(1).
            if len(self._data) > 2 * self.capacity:
                excess = len(self._data) - self.capacity
                del self._data[:excess]
                self._trimmed += excess
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback(data)

    def data(self) -> bytes:
        """The newest ``capacity`` bytes the guest printed."""
        with self._lock:
            return bytes(self._data[-self.capacity:])

    @property
    def dropped(self) -> int:
        """How many of the bytes printed :meth:`data` no longer holds (the oldest)."""
        with self._lock:
            return self._trimmed + max(0, len(self._data) - self.capacity)

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


class DirtyLogShare:
    """One dirty log, two kinds of reader: the migration (``sync_dirty`` / ``clear_dirty``) and
    any number of :class:`DirtyLogReader` (a dirty-rate measurement), none of which loses a
    bit to another.

    A guest's log hands each dirty bit out once: whoever fetches it takes it (KVM re-protects
    the page, the simulated writer clears the bit).  So every fetch goes through here, under
    :attr:`lock`, and hands what it took to every *other* reader: the migration's syncs to each
    reader's ``pending``, a reader's harvests to the other readers and to the migration's
    ``carry``, which its next sync returns with what it fetches itself.  A reader then sees
    every page dirtied since its previous harvest, whoever took the bit; the migration sees
    every page dirtied since its previous sync, a superset at worst (a page sent once more),
    never fewer.  This is QEMU's arrangement: a dirty-rate measurement's log syncs feed the
    migration's bitmap too.

    The guest keeps its log on while the migration logs (``migration_logging``) or any reader
    is open (:attr:`wanted`).
    """

    def __init__(self, nwords: Sequence[int]):
        self.lock = threading.Lock()
        self._nwords = list(nwords)
        self._readers: list[DirtyLogReader] = []
        self._carry: list[np.ndarray] | None = None  # the migration's, while it logs

    def new_bitmaps(self) -> list[np.ndarray]:
        """Empty bitmaps, one per RAM block."""
        return [np.zeros(words, dtype=np.uint64) for words in self._nwords]

    @property
    def migration_logging(self) -> bool:
        return self._carry is not None

    @property
    def wanted(self) -> bool:
        """Whether anyone needs the log on."""
        return self._carry is not None or bool(self._readers)

    def start_migration(self) -> None:
        """The migration's log starts (lock held): nothing carried over from before."""
        self._carry = self.new_bitmaps()

    def stop_migration(self) -> None:
        """The migration's log stops (lock held)."""
        self._carry = None

    def add(self, reader: "DirtyLogReader") -> None:
        """A reader from now on (lock held); its first harvest reports what the log held."""
        reader._pending = self.new_bitmaps()
        self._readers.append(reader)

    def remove(self, reader: "DirtyLogReader") -> None:
        """(lock held)"""
        if reader in self._readers:
            self._readers.remove(reader)

    def migration_fetched(self, fetched: list[np.ndarray]) -> list[np.ndarray]:
        """What the migration's sync fetched goes to every reader; returned with the bits
        readers took from it since its previous sync, in ``fetched`` itself (lock held)."""
        for reader in self._readers:
            for pending, bits in zip(reader._pending, fetched):
                np.bitwise_or(pending, bits, out=pending)
        if self._carry is not None:
            for bits, carry in zip(fetched, self._carry):
                np.bitwise_or(bits, carry, out=bits)
                carry[:] = 0
        return fetched

    def reader_fetched(self, reader: "DirtyLogReader",
                       fetched: list[np.ndarray]) -> list[np.ndarray]:
        """What ``reader``'s harvest fetched goes to the migration and the other readers;
        returns the reader's pages, fetched or handed to it (new arrays; lock held)."""
        for other in self._readers:
            if other is not reader:
                for pending, bits in zip(other._pending, fetched):
                    np.bitwise_or(pending, bits, out=pending)
        if self._carry is not None:
            for carry, bits in zip(self._carry, fetched):
                np.bitwise_or(carry, bits, out=carry)
        result = [bits | pending for bits, pending in zip(fetched, reader._pending)]
        for pending in reader._pending:
            pending[:] = 0
        return result


class DirtyLogReader:
    """A dirty-rate measurement's view of a guest's dirty log (``guest.open_dirty_reader()``):
    :meth:`harvest` returns, per RAM block, the pages dirtied since the previous harvest (the
    first: since the reader opened).  Whatever it takes, the migration still gets
    (:class:`DirtyLogShare`).  Close it when done: the guest logs while a reader is open."""

    def __init__(self, harvest: Callable[["DirtyLogReader"], list[np.ndarray]],
                 close: Callable[["DirtyLogReader"], None]):
        self._harvest = harvest
        self._close = close
        self._pending: list[np.ndarray] = []
        self.closed = False

    def harvest(self) -> list[np.ndarray]:
        if self.closed:
            raise ValueError("this dirty-log reader is closed")
        return self._harvest(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close(self)

    def __enter__(self) -> "DirtyLogReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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



class GuestStatus(enum.StrEnum):
    """A guest's run state, the same for every kind of guest (equal to its name as text)."""

    CREATED = "created"  # built, paused, never started
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # its workload ended (or it powered off)
    ERROR = "error"  # it stopped in a state it cannot go on from
    CLOSED = "closed"  # released: nothing of it runs or is mapped any more


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
    def status(self) -> GuestStatus:
        """Where the guest is in its life (:class:`GuestStatus`)."""

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
    def open_dirty_reader(self) -> DirtyLogReader:
        """Another reader of the dirty log, for a dirty-rate measurement: it turns logging on
        while open, and takes nothing a migration's sync would report (DirtyLogShare)."""
    def vcpu_dirty_counts(self) -> list[int]:
        """Per vCPU, the pages it has dirtied so far as the dirty tracking counts them (KVM:
        dirty-ring entries harvested; simulated: the writer's logged page writes); GuestError
        where the guest cannot tell (a KVM guest without the dirty ring)."""

    def save_state(self) -> Any: ...
    def load_state(self, state: Any) -> None: ...
    def state_specs(self) -> list[StateSpec]:
        """The state entries this guest migrates besides RAM (vCPUs, devices)."""
    def migration_blockers(self) -> list[str]:
        """Why this guest cannot migrate now, one reason each (none: it can)."""
    def set_throttle(self, percent: int) -> None: ...
    def progress(self) -> dict[str, int]: ...

    @property
    def supports_dirty_limit(self) -> bool:
        """Whether this guest measures per-vCPU dirty rates (and so can limit them)."""
    def vcpu_dirty_rates(self) -> list[float]:
        """Per vCPU, pages/s dirtied since the previous call (see the class docstring)."""
    def set_vcpu_dirty_limit(self, index: int, pages_per_s: float | None) -> None:
        """Cap vCPU ``index``'s dirty rate at ``pages_per_s``; None lifts the cap."""

