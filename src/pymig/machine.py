"""A guest plus everything migration needs to move it: its state registry and its RAM entry.

The registry of a machine holds, in stream order:

* ``ram`` (live, RAM priority): :class:`pymig.ram.RamSaver` / :class:`pymig.ram.RamLoader`;
* ``block`` instance *unit* (live) per disk not on shared storage: its image travels in the
  stream (:mod:`pymig.block`);
* ``cpu`` instance *i* per vCPU (or simulated writer): the vCPU state description;
* one entry per device the guest has (serial port, control port, ...).

Before the registry's sections, a stream carries the machine's configuration as a FULL section
named ``pymig.config`` (JSON of :class:`~pymig.guest.GuestConfig`), so a destination needs no
arguments to build the guest it is about to receive.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable

from pymig import stream, vmstate
from pymig.block import (BLOCK_IDSTR, BLOCK_VERSION, BlockLoader, BlockSaver, disk_id,
                         receive_offset)
from pymig.disk import DIRECT_ALIGN, buffer_address
from pymig.errors import MigrationError, PacketError, StateError, StreamError
from pymig.guest import GuestConfig, create
from pymig.guest.base import ConfigError, GuestState, StateSpec
from pymig.postcopy import OP_LISTEN, POSTCOPY_IDSTR, POSTCOPY_VERSION, parse_op
from pymig.ram import (PACKET_BYTES, RAM_IDSTR, RAM_VERSION, PacketWorker, RamLoader,
                       RamSaver)
from pymig.savevm import SaveStateEntry, SaveStateRegistry

log = logging.getLogger(__name__)

CONFIG_IDSTR = "pymig.config"
# a RAM packet of the source's size fits, and a PART of a 1 MiB disk chunk placed so that its
# data starts on a page (block.receive_offset)
LOAD_BUFFER_BYTES = PACKET_BYTES + 2 * DIRECT_ALIGN
# Catch-up reports are at most this far apart: a destination faster than its source catches
# up after every packet, and a message each time would wake the source's return-path thread
# a thousand times a second for nothing.
CAUGHT_UP_INTERVAL_S = 0.005
# Progress reports, for the same reason: the source's bandwidth is taken over iterations of
# tens of milliseconds or more, so a report every few milliseconds is as good as one a packet.
PROGRESS_INTERVAL_S = 0.005
CONFIG_VERSION = 1
CONFIG_SECTION_ID = 0xFFFF_FFFF  # outside the registry's ids: it is read before one exists
MAX_CONFIG_BYTES = 1 << 20


class SectionOut:
    """The section writer a live entry's handlers get: frames what they emit for that entry."""

    def __init__(self, writer: "stream.StreamWriter", entry: SaveStateEntry):
        self.writer = writer
        self.entry = entry

    def start(self, payload) -> None:
        e = self.entry
        self.writer.start(e.section_id, e.idstr, e.instance_id, e.version_id, payload)

    def part(self, payload, *, nocsum: bool = False, stands_for: int = 0) -> None:
        self.writer.part(self.entry.section_id, payload, nocsum=nocsum, stands_for=stands_for)

    def end(self, payload) -> None:
        self.writer.end(self.entry.section_id, payload)


class _RamHandlers:
    """Adapts the RAM saver / loader to the registry's live-handler protocol."""

    def setup(self, machine: "Machine", out: SectionOut) -> None:
        machine.ram_saver.setup(out)

    def iterate(self, machine: "Machine", out: SectionOut) -> bool:
        return machine.ram_saver.iterate(out)

    def pending(self, machine: "Machine") -> int:
        return machine.ram_saver.pending()

    def complete(self, machine: "Machine", out: SectionOut) -> None:
        machine.ram_saver.complete(out)

    def load(self, machine: "Machine", data, version_id: int, section_type: int) -> None:
        _load_section(machine.ram_loader, data, section_type, "RAM", RAM_IDSTR)

    def cleanup(self, machine: "Machine") -> None:
        if machine.ram_saver is not None:
            machine.ram_saver.cleanup()


def _load_section(loader, data, section_type: int, what: str, idstr: str) -> None:
    """A live entry's START, PART or END record into its loader."""
    if section_type == stream.RecordType.START:
        loader.load_start(data)
    elif section_type == stream.RecordType.PART:
        loader.load_part(data)
    elif section_type == stream.RecordType.END:
        loader.load_end(data)
    else:
        raise StateError(f"{what} cannot load a section of type {section_type}", entry=idstr)


class _BlockHandlers:
    """Adapts one disk's :class:`~pymig.block.BlockSaver` / :class:`~pymig.block.BlockLoader`
    to the live-handler protocol (the opaque is the saver or the loader)."""

    def setup(self, saver: BlockSaver, out: SectionOut) -> None:
        saver.setup(out)

    def iterate(self, saver: BlockSaver, out: SectionOut) -> bool:
        return saver.iterate(out)

    def pending(self, saver: BlockSaver) -> int:
        return saver.pending()

    def complete(self, saver: BlockSaver, out: SectionOut) -> None:
        saver.complete(out)

    def load(self, loader: BlockLoader, data, version_id: int, section_type: int) -> None:
        _load_section(loader, data, section_type, loader.name, BLOCK_IDSTR)

    def cleanup(self, saver: BlockSaver) -> None:
        if isinstance(saver, BlockSaver):
            saver.cleanup()


class _LoadWorkers:
    """The workers PART records are loaded by, in stream order: RAM packets by the RAM
    decoder (a thread of its own only where CPUs are many: decoding is CPU work), a disk's
    records by the disk writer (always a thread of its own: its writes to the target mostly
    wait on the storage, and the next record is received meanwhile).  Only one of them has
    work at a time: a record for the other waits until it is done."""

    def __init__(self):
        self.ram = PacketWorker("pymig-ram-decoder", buffer_bytes=LOAD_BUFFER_BYTES)
        self.disk: PacketWorker | None = None
        self._busy: PacketWorker | None = None

    def for_entry(self, entry: SaveStateEntry) -> PacketWorker:
        if entry.idstr == BLOCK_IDSTR:
            if self.disk is None:
                self.disk = PacketWorker("pymig-disk-writer", buffer_bytes=LOAD_BUFFER_BYTES,
                                         overlap=True)
            worker = self.disk
        else:
            worker = self.ram
        if self._busy is not None and self._busy is not worker:
            self._busy.drain()
        self._busy = worker
        return worker

    def drain(self) -> None:
        """Until every record handed over is loaded; raises the first failure."""
        busy, self._busy = self._busy, None
        try:
            if busy is not None:
                busy.drain()
        finally:
            for worker in (self.ram, self.disk):
                if worker is not None and worker is not busy:
                    worker.drain()

    def close(self) -> None:
        for worker in (self.ram, self.disk):
            if worker is not None:
                worker.close()


class Machine:
    """A guest and its registry, as a migration source or destination."""

    def __init__(self, guest, *, destination: bool):
        self.guest = guest
        self.is_destination = destination
        self.registry = SaveStateRegistry()
        self.ram_saver = None if destination else RamSaver(guest)
        self.ram_loader = RamLoader(guest) if destination else None
        self.registry.register_savevm_live(RAM_IDSTR, 0, RAM_VERSION, _RamHandlers(), self)
        self.block_savers: list[BlockSaver] = []
        self.block_loaders: list[BlockLoader] = []
        images = getattr(guest, "disk_images", [])
        for unit, disk in enumerate(guest.config.disks):
            if disk.shared:
                continue
            if destination:
                opaque = BlockLoader(images[unit], unit)
                self.block_loaders.append(opaque)
            else:
                opaque = BlockSaver(images[unit], unit)
                # the disk's bytes count with RAM's in the rates the policy weighs: the
                # bandwidth is what moves both
                opaque.on_sent = self.ram_saver.count_sent
                opaque.cancelled = lambda: self.ram_saver.cancelled()
                self.block_savers.append(opaque)
            self.registry.register_savevm_live(BLOCK_IDSTR, unit, BLOCK_VERSION,
                                               _BlockHandlers(), opaque)
        for reason in guest.migration_blockers():  # e.g. a disk the destination cannot open
            self.registry.add_blocker(reason)
        self.ram_bytes = sum(b.size_bytes for b in guest.ram_blocks)
        self.specs: dict[int, StateSpec] = {}
        self._load_worker: _LoadWorkers | None = None
        # the destination's answer to a pymig.postcopy record: postcopy_record(op, payload,
        # offset) (None: this destination refuses post-copy)
        self.postcopy_record: Callable[[int, object, int], None] | None = None
        self.postcopy_listening = False
        self.stream_entries: dict[int, SaveStateEntry] = {}
        for spec in guest.state_specs():
            if spec.shape is None:  # its fields could not be bounded against this guest
                raise TypeError(f"state entry {spec.idstr}/{spec.instance_id} comes without the "
                                f"guest's shape")
            entry = self.registry.register_vmstate(spec.idstr, spec.instance_id, spec.vmsd, None)
            self.specs[entry.section_id] = spec

    @classmethod
    def source(cls, guest) -> "Machine":
        return cls(guest, destination=False)

    @classmethod
    def incoming(cls, config: GuestConfig, **guest_options) -> "Machine":
        """A destination machine: a new paused guest with fresh RAM for ``config``."""
        return cls(create(config, incoming=True, **guest_options), destination=True)

    # -- source ------------------------------------------------------------------------------
    def check_migratable(self, block: bool, incremental: bool = False) -> None:
        """MigrationError naming every reason this guest cannot migrate now: the registry's
        blockers, and each disk not on shared storage unless its image travels too
        (``block``: ``migrate --blk``, the ``block`` capability; ``incremental``: ``migrate
        --inc``, only what was written since the disk's checkpoint, which it must have
        exactly one of).  Sets each disk's mode for the migration that follows."""
        reasons = self.registry.blockers()
        for saver in self.block_savers:
            saver.checkpoint = None
            if not incremental:
                continue
            names = sorted(saver.image.checkpoints)
            if len(names) != 1:
                reasons.append(
                    f"disk {saver.unit} ({saver.image.path}) has "
                    f"{'no checkpoint' if not names else 'checkpoints ' + ', '.join(names)}: "
                    f"an incremental migration sends what was written since its one "
                    f"checkpoint (pymig run --disk PATH,checkpoint=NAME makes it)")
            else:
                saver.checkpoint = saver.image.checkpoints[names[0]]
        if not block and not incremental:
            reasons += [f"disk {s.unit} ({s.image.path}) is not on shared storage: migrate "
                        f"with --blk (QMP: blk, or the block capability) to move its image "
                        f"with the guest, or run it as --disk {s.image.path},shared if the "
                        f"destination opens the same file" for s in self.block_savers]
        if reasons:
            raise MigrationError("migration is blocked: " + "; ".join(reasons))

    def disk_counters(self) -> dict | None:
        """query-migrate's ``disk``: bytes of the disks moved, left and in all (None: no disk
        travels)."""
        if not self.block_savers:
            return None
        return {"transferred": sum(s.counters.transferred for s in self.block_savers),
                "remaining": sum(s.last_pending for s in self.block_savers),
                "total": sum(s.image.size_bytes for s in self.block_savers),
                "disks": {disk_id(s.unit): {"data-bytes": s.counters.data_bytes,
                                            "zero-bytes": s.counters.zero_bytes,
                                            "bulk-completed": s.swept}
                          for s in self.block_savers}}

    def save_config(self, writer: "stream.StreamWriter") -> None:
        payload = json.dumps(self.guest.config.to_dict()).encode()
        writer.full(CONFIG_SECTION_ID, CONFIG_IDSTR, 0, CONFIG_VERSION, payload)

    def save_device_state(self, writer: "stream.StreamWriter") -> None:
        """Every state entry as a FULL section (vCPUs paused)."""
        self.write_device_state(writer, self.encode_device_state())

    def encode_device_state(self) -> list[tuple[SaveStateEntry, bytes]]:
        """Every state entry and its encoded state, as of now (vCPUs paused): a background
        snapshot encodes them at its start and writes them after RAM."""
        state = self.guest.save_state()
        return [(entry, self._encode_state(entry, state))
                for entry in self.registry.state_entries()]

    @staticmethod
    def write_device_state(writer: "stream.StreamWriter",
                           records: list[tuple[SaveStateEntry, bytes]]) -> None:
        for entry, payload in records:
            writer.full(entry.section_id, entry.idstr, entry.instance_id, entry.version_id,
                        payload)

    def rehearse_state_save(self) -> None:
        """Encode a blank object of every state entry's description, so that the switchover's
        encoding is not the first in the process (the vCPUs run: their real state cannot be
        read now).  A failure here is only logged."""
        for entry in self.registry.state_entries():
            vmsd = entry.vmsd
            try:
                vmstate.save(vmsd, vmsd.factory() if vmsd.factory else {})
            except Exception as exc:  # noqa: BLE001 - an optimisation: never the reason to fail
                log.debug("state save rehearsal of %s stopped: %s", entry.name, exc)

    def _encode_state(self, entry: SaveStateEntry, state: GuestState) -> bytes:
        return entry.save_state(self.specs[entry.section_id].get(state))

    # -- destination -------------------------------------------------------------------------
    def load_stream(self, reader: "stream.StreamReader",
                    caught_up: Callable[[int], None] | None = None,
                    progress: Callable[[int], None] | None = None) -> None:
        """Load sections until EOF, then hand the vCPU and device state to the guest.

        ``caught_up(offset)`` is called whenever everything received so far (the stream up to
        ``offset``) is loaded and the next record has not arrived yet (the destination answers
        READY the first time, CAUGHT_UP each time).  At most once per
        :data:`CAUGHT_UP_INTERVAL_S`: within it, it waits that long for more to arrive first.
        ``progress(offset)`` says the stream is loaded up to ``offset`` whatever waits behind
        it (the destination answers PROGRESS), as records are loaded, at most once per
        :data:`PROGRESS_INTERVAL_S`.

        Each section is matched to an entry by (idstr, instance) on START/FULL and by section id
        after that; the source's section ids need not equal ours.  RAM packets (PART records)
        go to a :class:`pymig.ram.PacketWorker`: where the host has CPUs to spare, its thread
        decodes one while this one receives the next, elsewhere this one decodes each in turn;
        every other record is loaded in stream order once the packets before it are.
        """
        by_stream_id: dict[int, SaveStateEntry] = {}
        versions: dict[int, int] = {}
        state = GuestState(cpus=[None] * self.guest.vcpu_count, devices={})
        loaded: set[int] = set()
        decoder = _LoadWorkers()
        reported_offset, reported_at = -1, -math.inf
        report = (_Progress(progress, reader.offset, PROGRESS_INTERVAL_S)
                  if progress is not None else None)
        try:
            while True:
                if (caught_up is not None and reader.offset != reported_offset
                        and not reader.channel.wait_readable(0)):
                    wait = CAUGHT_UP_INTERVAL_S - (time.monotonic() - reported_at)
                    if wait <= 0 or not reader.channel.wait_readable(wait):
                        decoder.drain()
                        caught_up(reader.offset)
                        reported_offset, reported_at = reader.offset, time.monotonic()
                try:
                    record = reader.next_record()
                except BaseException:
                    decoder.drain()  # a bad packet before a bad record is the first error
                    raise
                if record.type == stream.RecordType.EOF:
                    break
                if record.type == stream.RecordType.FULL and record.idstr == POSTCOPY_IDSTR:
                    decoder.drain()  # LISTEN: nothing decodes into guest RAM from here
                    self._load_postcopy(record, reader.read_payload())
                    continue
                entry, version = self._entry_for(record, by_stream_id, versions)
                loaded.add(entry.section_id)
                if record.type == stream.RecordType.PART and entry.is_live:
                    self._load_part_behind(decoder.for_entry(entry), reader, record, entry,
                                           version, report)
                    continue
                decoder.drain()
                payload = reader.read_payload()
                self._load_record(entry, record, payload, version, state,
                                  reader.offset - stream.FOOTER_BYTES - len(payload))
                if report is not None:
                    report.loaded(reader.offset)
            decoder.drain()
        finally:
            decoder.close()
            # Its buffers are freed once the guest runs (release_load_buffers): unmapping
            # megabytes costs the downtime a TLB shootdown across CPUs.
            self._load_worker = decoder
        self.stream_entries = by_stream_id  # post-copy's RAM records follow EOF
        self._check_complete(state, loaded)
        self.guest.load_state(state)

    def _load_part_behind(self, decoder: "PacketWorker", reader: "stream.StreamReader",
                          record, entry: SaveStateEntry, version: int,
                          progress: "_Progress | None") -> None:
        """Receive a PART record's payload and have the decoder load it, then tell
        ``progress`` where the stream is loaded up to."""
        # a disk's data goes to its image past the page cache: received page-aligned, it
        # needs no copy into an aligned buffer first
        slack = DIRECT_ALIGN if entry.idstr == BLOCK_IDSTR else 0
        if record.payload_len + slack <= decoder.buffer_bytes:
            buf = decoder.buffer()
        else:  # larger than a RAM packet: a buffer of its own
            buf = None
        try:
            into = buf if buf is not None else bytearray(record.payload_len + slack)
            if slack:
                into = memoryview(into)[receive_offset(buffer_address(into)):]
            payload = reader.read_payload(into)
        except BaseException:
            if buf is not None:
                decoder.give_back(buf)
            decoder.drain()
            raise
        end = reader.offset
        start = end - stream.FOOTER_BYTES - len(payload)

        def job() -> None:
            try:
                entry.handlers.load(entry.opaque, payload, version, record.type)
            except PacketError as exc:
                # its offset is into the packet: the stream's is what analyze and a hex dump
                # of the file show
                what = "RAM packet" if entry.idstr == RAM_IDSTR else f"{entry.name} record"
                raise PacketError(start + exc.offset,
                                  f"{exc.reason} ({what} at byte {start})") from None
            if progress is not None:
                progress.loaded(end)

        decoder.submit(buf, job)

    def _load_postcopy(self, record, payload) -> None:
        if record.version_id != POSTCOPY_VERSION:
            raise StreamError(record.offset, f"{POSTCOPY_IDSTR} version {record.version_id} is "
                                             f"not supported (this build reads "
                                             f"{POSTCOPY_VERSION})")
        op = parse_op(payload, record.offset)
        if self.postcopy_record is None:
            raise StateError("the source may switch to post-copy, and this destination does "
                             "not take it: set the postcopy-ram capability here too",
                             entry=POSTCOPY_IDSTR)
        self.postcopy_record(op, payload, record.offset)
        if op == OP_LISTEN:
            self.postcopy_listening = True

    def _entry_for(self, record, by_stream_id: dict[int, SaveStateEntry],
                   versions: dict[int, int]) -> tuple[SaveStateEntry, int]:
        """The state entry a record belongs to, and the version its section is loaded at."""
        if record.type in (stream.RecordType.START, stream.RecordType.FULL):
            entry = self.registry.find(record.idstr, record.instance_id)
            if entry is None:
                raise StreamError(record.offset, f"unknown section {record.idstr!r} "
                                                 f"instance {record.instance_id}")
            entry.check_load_version(record.version_id)
            if record.type == stream.RecordType.START and not entry.is_live:
                raise StreamError(record.offset, f"{entry.name} is not a live entry")
            by_stream_id[record.section_id] = entry
            versions[record.section_id] = record.version_id
            return entry, record.version_id
        entry = by_stream_id.get(record.section_id)
        if entry is None:
            raise StreamError(record.offset, f"section id {record.section_id} was never "
                                             f"started")
        return entry, versions[record.section_id]

    def _load_record(self, entry: SaveStateEntry, record, payload, version: int,
                     state: GuestState, start: int = 0) -> None:
        if entry.is_live:
            try:
                entry.handlers.load(entry.opaque, payload, version, record.type)
            except PacketError as exc:
                if entry.idstr == RAM_IDSTR:
                    raise
                raise PacketError(start + exc.offset,
                                  f"{exc.reason} ({entry.name} record at byte {start})") \
                    from None
        else:
            self._decode_state(entry, payload, version, state)

    def _decode_state(self, entry: SaveStateEntry, payload, version: int,
                      state: GuestState) -> None:
        spec = self.specs[entry.section_id]
        spec.put(state, entry.load_state(payload, version, spec.shape))

    def rehearse_state_load(self) -> None:
        """Put this new, paused guest's own vCPU and device state through a save, an encoding,
        a decoding and a load, so that the switchover's load is not the first in the process
        (the first run of those paths costs 2-4 times a later one, inside the downtime).  The
        guest ends as it began; a failure here is only logged (the real load will say)."""
        try:
            state = self.guest.save_state()
            again = GuestState(cpus=[None] * self.guest.vcpu_count, devices={})
            for entry in self.registry.state_entries():
                self._decode_state(entry, self._encode_state(entry, state), entry.version_id,
                                   again)
            self.guest.load_state(again)
        except Exception as exc:  # noqa: BLE001 - an optimisation: never the reason to fail
            log.debug("state load rehearsal stopped: %s", exc)

    def _check_complete(self, state: GuestState, loaded: set[int]) -> None:
        missing = [e.name for e in self.registry.entries() if e.section_id not in loaded]
        if missing:
            raise StateError(f"the stream ended without state for {', '.join(missing)}")
        if not self.ram_loader.ended and not self.postcopy_listening:
            raise StateError("the stream ended before the RAM was complete", entry=RAM_IDSTR)
        for loader in self.block_loaders:
            if not loader.ended:
                raise StateError(f"the stream ended before {loader.name} (disk {loader.unit}) "
                                 f"was complete", entry=BLOCK_IDSTR)

    def finish_incoming(self) -> None:
        """The guest runs here now: each disk that travelled is flushed and no longer marked
        incomplete."""
        for loader in self.block_loaders:
            loader.finish()

    def load_counters(self) -> dict:
        c = self.ram_loader.counters
        return {"normal": c.normal_pages, "duplicate": c.zero_pages,
                "compressed": c.compressed_pages, "packets": c.packets, "bytes": c.bytes}

    def release_load_buffers(self) -> None:
        """Free what loading the stream kept for after the switchover."""
        self._load_worker = None

    def close(self) -> None:
        self._load_worker = None
        self.guest.close()


# Modules a destination imports to build and load either kind of guest.
_GUEST_MODULES = ("pymig.guest.kvm_guest", "pymig.kvm.statedesc", "pymig.guest.simulated")


def warm_up_incoming() -> None:
    """Pay ahead of any stream what building the first destination guest of a process costs
    once: importing the guest modules and probing the host's KVM (the scratch-vCPU MSR and TSC
    probes, tens of ms, cached per process).

    A destination waits for its stream with nothing else to do, while the source waits for
    READY, which comes only once the guest is built; so this runs while listening
    (:meth:`pymig.incoming.Incoming.listen`) and :meth:`Machine.incoming` then costs only
    the VM itself.  Failures are left for the real build to report.
    """
    try:
        for name in _GUEST_MODULES:
            importlib.import_module(name)
        from pymig.kvm.system import Kvm

        with Kvm() as kvm:
            kvm.migratable_msrs(kvm.check("KVM_CAP_IRQCHIP") > 0)
    except Exception as exc:  # noqa: BLE001 - e.g. no /dev/kvm: a simulated guest needs none
        log.debug("incoming warm-up stopped early: %s", exc)


WARM_UP_DELAY_S = 0.2


class WarmUp:
    """:func:`warm_up_incoming` in a daemon thread, :data:`WARM_UP_DELAY_S` after it is
    created (the process that just started listening has its own start-up to finish first,
    such as its control socket) or at once when :meth:`finish` is called, which then waits
    for it: call it before building the guest."""

    def __init__(self, delay_s: float = WARM_UP_DELAY_S):
        self._go = threading.Event()
        self._delay_s = delay_s
        self._thread = threading.Thread(target=self._run, name="pymig-warm-up", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._go.wait(self._delay_s)
        warm_up_incoming()

    def finish(self) -> None:
        self._go.set()
        self._thread.join()


def load_config(reader: "stream.StreamReader") -> GuestConfig:
    """Read the ``pymig.config`` section that opens every stream."""
    record = reader.next_record()
    if record.type != stream.RecordType.FULL or record.idstr != CONFIG_IDSTR:
        raise StreamError(record.offset, f"expected the {CONFIG_IDSTR} section first, found "
                                         f"{record.idstr or 'a record of type ' + str(record.type)}")
    if record.version_id != CONFIG_VERSION:
        raise StreamError(record.offset, f"{CONFIG_IDSTR} version {record.version_id} is not "
                                         f"supported (this build reads {CONFIG_VERSION})")
    if record.payload_len > MAX_CONFIG_BYTES:
        raise StreamError(record.offset, f"{CONFIG_IDSTR} section of {record.payload_len} bytes "
                                         f"is too large")
    payload = bytes(reader.read_payload())
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise StreamError(record.offset, f"bad guest configuration: {exc}") from None
    try:
        return GuestConfig.from_dict(data)
    except ConfigError as exc:
        raise StateError(f"{CONFIG_IDSTR}: {exc}", entry=CONFIG_IDSTR, field=exc.field,
                         value=exc.value) from None


class _Progress:
    """The destination's PROGRESS reports: the stream offset loaded so far, at most once per
    ``interval_s`` (the calls in between dropped: a destination that then has nothing more to
    load says CAUGHT_UP)."""

    def __init__(self, send: Callable[[int], None], loaded_offset: int, interval_s: float):
        self._send = send
        self._offset = loaded_offset
        self._interval = interval_s
        self._last = -math.inf
        self._lock = threading.Lock()  # one report at a time, offsets in order

    def loaded(self, offset: int) -> None:
        """The stream is loaded up to ``offset``."""
        with self._lock:
            self._offset = max(self._offset, offset)
            now = time.monotonic()
            if now - self._last >= self._interval:
                self._last = now
                self._send(self._offset)
