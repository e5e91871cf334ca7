"""Block migration: a disk image that is not on shared storage travels with its guest.

One live entry per such disk (``block``, instance = the disk's unit on the ATA channel), in
QEMU's shape (``migration/block.c``): the disk's dirty-chunk log
(:meth:`pymig.disk.DiskImage.start_dirty_log`) goes on at setup, so every write from the
start of the migration is known; a first pass (the bulk phase) sends every 1 MiB chunk that
may hold data, one bounded slice per iteration of the migration loop, taking turns with RAM;
what the guest writes meanwhile is sent again in the log's 64 KiB units (the dirty phase);
the last ones go in the stop-and-copy.  :meth:`BlockSaver.pending` (what is still to send) is
what the convergence policy weighs with RAM's pending bytes.

Holes are never read: the chunks to send are taken from ``SEEK_DATA`` / ``SEEK_HOLE``, a
hole inside a chunk goes as a zero record, and so does data that reads as zeroes; the
destination punches a hole for each, so its image stays as sparse as the source's.

The destination writes into an image named for the disk (``pymig incoming --disk
disk0=PATH``, :func:`open_target`): created sparse at the disk's size where it does not
exist, refused if it has another size, or holds data, unless told to overwrite.  Until the
guest runs there, the image carries a marker file beside it (``PATH.incomplete``) saying it is
partial; :class:`~pymig.disk.DiskImage` refuses to open an image that has one, so a guest is
never run on half a disk.

The destination writes each record's data past the page cache where the target's file system
allows (:meth:`~pymig.disk.DiskImage.write_through`), and receives each PART so that its first
record's data lands page-aligned in memory (:func:`receive_offset`): the usual PART, one
chunk of data, goes from the receive buffer to the storage without another copy.

Wire (``docs/stream-format.md``, "Block sections"): START ``<QII`` disk size, chunk size,
flags; each PART a run of records ``<BxxxIQ`` kind, length, offset (kind 1: the length's
bytes of data follow; kind 2: that range reads as zeroes); END empty.  Every field is
bounded against the destination's own image before anything is written.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pymig.disk import (CHECKPOINT_NAME, DIRECT_ALIGN, DIRTY_CHUNK_BYTES, SECTOR_BYTES, Checkpoint,
                        DiskImage, checkpoint_files, incomplete_marker,
                        read_checkpoint_identity)
from pymig.errors import DiskError, MigrationError, PacketError

BLOCK_IDSTR = "block"
BLOCK_VERSION = 1
DISK_START = struct.Struct("<QII")  # disk size, chunk bytes, flags
FLAG_INCREMENTAL = 1  # then: u8 name length, the checkpoint's name, its id (32 hex digits)
CHECKPOINT_ID_BYTES = 32
RECORD = struct.Struct("<BxxxIQ")  # kind, length, offset
KIND_DATA = 1
KIND_ZERO = 2
MAX_CHUNK_BYTES = 64 << 20
# The dirty log's unit: a guest's write makes this much go again (QEMU's is the 1 MiB chunk;
# a 4 KiB write would then cost a 1 MiB re-send).  The bulk phase still sends whole chunks.
TRACK_BYTES = 64 << 10
# An iterate() sends for about as long as the rest of the loop took since the previous one
# (RAM's pass), within these bounds: neither the disk nor RAM waits on the other for long.
SLICE_MIN_S = 0.05
SLICE_MAX_S = 0.25


def disk_id(unit: int) -> str:
    """How the destination names a disk (``--disk disk0=PATH``)."""
    return f"disk{unit}"


def max_part_bytes(chunk_bytes: int) -> int:
    """The largest PART a chunk of ``chunk_bytes`` makes: its data, and a record per extent
    and per hole, at most one of each per two sectors."""
    return chunk_bytes + (chunk_bytes // SECTOR_BYTES + 1) * RECORD.size


@dataclass
class BlockCounters:
    """What one disk's migration has moved (query-migrate's ``disk``)."""

    transferred: int = 0  # bytes of block records on the wire
    data_bytes: int = 0  # disk bytes sent as data
    zero_bytes: int = 0  # disk bytes sent as zero records
    parts: int = 0


class BlockSaver:
    """Source half of one disk's live entry."""

    def __init__(self, image: DiskImage, unit: int, chunk_bytes: int = DIRTY_CHUNK_BYTES,
                 track_bytes: int = TRACK_BYTES):
        if chunk_bytes % track_bytes or track_bytes % SECTOR_BYTES:
            raise ValueError(f"a chunk of {chunk_bytes} bytes is not whole tracking units of "
                             f"{track_bytes}")
        self.image = image
        self.unit = unit
        self.chunk_bytes = chunk_bytes  # the most one PART covers
        self.track_bytes = track_bytes  # the dirty log's unit: what a write makes go again
        self.counters = BlockCounters()
        # pending() as of the migration loop's last call (what query-migrate reports: only
        # the migration thread touches the units still to send)
        self.last_pending = 0
        self._todo = np.zeros(0, dtype=bool)  # per tracking unit: still to send
        self._cursor = 0
        self.swept = False  # the bulk phase is over: every chunk that held data went once
        self._last_end: float | None = None
        self._buffer: memoryview | None = None
        # incremental (migrate inc): the checkpoint whose copy the destination holds; only
        # the chunks written since it go, and those the guest writes meanwhile
        self.checkpoint: Checkpoint | None = None
        self.cancelled: Callable[[], bool] = lambda: False
        # after each PART is on the wire: (disk bytes it stands for, seconds it took)
        self.on_sent: Callable[[int, float], None] = lambda nbytes, seconds: None

    @property
    def units(self) -> int:
        return -(-self.image.size_bytes // self.track_bytes)

    def setup(self, out) -> None:
        """Log writes from now on, then take every unit that may hold data: one written
        before the log began holds data now, one written after is in the log."""
        image = self.image
        image.start_dirty_log(self.track_bytes)
        self._todo = np.zeros(self.units, dtype=bool)
        checkpoint = self.checkpoint
        if checkpoint is not None:
            per_chunk = checkpoint.chunk_bytes // self.track_bytes
            self._todo |= np.repeat(checkpoint.written(), per_chunk)[: self.units]
        else:
            for offset, length in image.data_extents():
                self._todo[offset // self.track_bytes:
                           (offset + length - 1) // self.track_bytes + 1] = True
        self._cursor = 0
        self.swept = False
        self._last_end = None
        self.counters = BlockCounters()
        self.last_pending = self._pending_bytes()
        if checkpoint is None:
            out.start(DISK_START.pack(image.size_bytes, self.chunk_bytes, 0))
        else:
            name = checkpoint.name.encode()
            out.start(DISK_START.pack(image.size_bytes, self.chunk_bytes, FLAG_INCREMENTAL)
                      + bytes([len(name)]) + name + checkpoint.id.encode())

    def _sync(self) -> None:
        if not self.image.logging:
            return
        words = self.image.sync_dirty()
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.units]
        self._todo |= bits.astype(bool)

    def _pending_bytes(self) -> int:
        count = int(np.count_nonzero(self._todo))
        if count and self._todo[-1]:
            tail = self.image.size_bytes - (self.units - 1) * self.track_bytes
            return (count - 1) * self.track_bytes + tail
        return count * self.track_bytes

    def pending(self) -> int:
        """Bytes of the disk still to send, as far as the dirty log knows now."""
        self._sync()
        self.last_pending = self._pending_bytes()
        return self.last_pending

    def iterate(self, out) -> bool:
        """Send from where the last call stopped for one slice; True when nothing is left to
        send."""
        now = time.monotonic()
        others = SLICE_MIN_S if self._last_end is None else now - self._last_end
        deadline = now + min(max(others, SLICE_MIN_S), SLICE_MAX_S)
        try:
            self._sync()
            return self._send(out, deadline)
        finally:
            self._last_end = time.monotonic()

    def complete(self, out) -> None:
        """With the guest stopped: everything left, then END."""
        self._sync()
        self._send(out, float("inf"))
        self.last_pending = 0
        out.end(b"")

    def cleanup(self) -> None:
        self.image.stop_dirty_log()
        self._buffer = None

    def _send(self, out, deadline: float) -> bool:
        """One PART at a time: the first unit to send from the cursor on (wrapping around),
        and the units after it that are to be sent too, up to a chunk: whole chunks in the
        bulk phase, only what was written in the dirty phase."""
        todo = self._todo
        per_part = self.chunk_bytes // self.track_bytes
        while True:
            if self.cancelled():
                raise MigrationError("migration cancelled")
            # argmax stops at the first unit to send; flatnonzero would list them all, a
            # scan of the rest of the disk for every chunk
            first = _first_set(todo, self._cursor, len(todo))
            if first < 0:
                self.swept = True
                first = _first_set(todo, 0, self._cursor)
                if first < 0:
                    return True
            run = todo[first:first + per_part]
            stop = first + (int(np.argmin(run)) if not run.all() else len(run))
            todo[first:stop] = False  # before the read: a write after it is logged again
            self._send_range(out, first * self.track_bytes,
                             min(stop * self.track_bytes, self.image.size_bytes))
            self._cursor = stop
            if self._cursor >= len(todo):
                self._cursor = 0
                self.swept = True
            if time.monotonic() >= deadline:
                return not todo.any()

    def _send_range(self, out, start: int, end: int) -> None:
        """``[start, end)``, at most a chunk, as one PART."""
        t0 = time.monotonic()
        image = self.image
        if self._buffer is None or len(self._buffer) < self.chunk_bytes:
            # one buffer for every chunk: fresh memory for each read would cost a fault per
            # page, and the record is on the wire (or copied) before the next read
            self._buffer = memoryview(bytearray(self.chunk_bytes))
        parts: list = []
        data_bytes = 0
        pos = start
        for offset, length in image.data_extents(start, end):
            offset, stop = max(offset, start), min(offset + length, end)
            # extents are file-system blocks; a record is whole sectors
            offset -= offset % SECTOR_BYTES
            stop += -stop % SECTOR_BYTES
            if offset > pos:
                parts.append(RECORD.pack(KIND_ZERO, offset - pos, pos))
            data = self._buffer[offset - start:stop - start]
            image.pread_into(offset, data)
            if _all_zero(data):
                parts.append(RECORD.pack(KIND_ZERO, len(data), offset))
            else:
                parts.append(RECORD.pack(KIND_DATA, len(data), offset))
                parts.append(data)
                data_bytes += len(data)
            pos = stop
        if end > pos:
            parts.append(RECORD.pack(KIND_ZERO, end - pos, pos))
        payload = _merge_zero_records(parts)
        out.part(payload, stands_for=end - start)
        c = self.counters
        c.transferred += sum(map(len, payload))
        c.data_bytes += data_bytes
        c.zero_bytes += end - start - data_bytes
        c.parts += 1
        self.on_sent(end - start, time.monotonic() - t0)


def _first_set(todo: np.ndarray, start: int, stop: int) -> int:
    """The first True in ``todo[start:stop]`` (its index in ``todo``), or -1."""
    if start >= stop:
        return -1
    at = int(todo[start:stop].argmax())
    return start + at if todo[start + at] else -1


def _all_zero(data) -> bool:
    words = np.frombuffer(data, dtype=np.uint64)  # whole sectors: a multiple of 8 bytes
    # data that is not zero nearly always says so in its first words: a pass over the whole
    # chunk only for those that may be
    return not words[:8].any() and not words.any()


def _merge_zero_records(parts: list[bytes]) -> list[bytes]:
    """Adjacent zero records as one (a hole next to data that reads as zeroes)."""
    merged: list = []
    for part in parts:
        if (isinstance(part, bytes) and merged and isinstance(merged[-1], bytes)
                and part[0] == KIND_ZERO and merged[-1][0] == KIND_ZERO):
            _, length, offset = RECORD.unpack(part)
            _, last_length, last_offset = RECORD.unpack(merged[-1])
            if last_offset + last_length == offset:
                merged[-1] = RECORD.pack(KIND_ZERO, last_length + length, last_offset)
                continue
        merged.append(part)
    return merged


def receive_offset(buffer_address: int) -> int:
    """Where in a buffer at ``buffer_address`` to receive a PART so that its first record's
    data starts on a page (:data:`pymig.disk.DIRECT_ALIGN`)."""
    return -(buffer_address + RECORD.size) % DIRECT_ALIGN


def parse_part(payload, size_bytes: int, chunk_bytes: int) -> list[tuple[int, int, int, int]]:
    """The records of a PART as ``(kind, offset, length, payload position of the data)``,
    each checked against a disk of ``size_bytes``: PacketError (offset into the payload)
    for anything out of bounds, before the caller writes a byte."""
    view = memoryview(payload).cast("B")
    if len(view) > max_part_bytes(chunk_bytes):
        raise PacketError(0, f"a block record run of {len(view)} bytes, more than a "
                             f"{chunk_bytes}-byte chunk makes")
    records = []
    pos = 0
    covered = 0
    while pos < len(view):
        if len(view) - pos < RECORD.size:
            raise PacketError(pos, f"a block record header cut short ({len(view) - pos} of "
                                   f"{RECORD.size} bytes)")
        kind, length, offset = RECORD.unpack_from(view, pos)
        if kind not in (KIND_DATA, KIND_ZERO):
            raise PacketError(pos, f"unknown block record kind {kind}")
        if length == 0 or length % SECTOR_BYTES or offset % SECTOR_BYTES:
            raise PacketError(pos, f"block record [{offset}, +{length}) is not whole "
                                   f"{SECTOR_BYTES}-byte sectors")
        if length > chunk_bytes:
            raise PacketError(pos, f"block record of {length} bytes, more than the "
                                   f"{chunk_bytes}-byte chunk")
        if offset + length > size_bytes:
            raise PacketError(pos, f"block record [{offset}, {offset + length}) goes past the "
                                   f"end of the {size_bytes}-byte disk")
        covered += length
        if covered > chunk_bytes:
            raise PacketError(pos, f"block records covering {covered} bytes, more than the "
                                   f"{chunk_bytes}-byte chunk")
        pos += RECORD.size
        data_at = pos
        if kind == KIND_DATA:
            if len(view) - pos < length:
                raise PacketError(pos, f"block data cut short ({len(view) - pos} of {length} "
                                       f"bytes)")
            pos += length
        records.append((kind, offset, length, data_at))
    if not records:
        raise PacketError(0, "a block PART with no record")
    return records


def parse_start(payload, name: str) -> tuple[int, int, int, dict | None]:
    """A disk's START: (size, chunk, flags, the checkpoint of an incremental one or None);
    PacketError for a header that is not one."""
    view = memoryview(payload).cast("B")
    if len(view) < DISK_START.size:
        raise PacketError(0, f"{name}: a disk header of {len(view)} bytes, not "
                             f"{DISK_START.size}")
    size, chunk, flags = DISK_START.unpack_from(view)
    if flags & ~FLAG_INCREMENTAL:
        raise PacketError(12, f"{name}: unknown disk flags {flags:#x}")
    rest = view[DISK_START.size:]
    if not flags:
        if len(rest):
            raise PacketError(0, f"{name}: a disk header of {len(view)} bytes, not "
                                 f"{DISK_START.size}")
        return size, chunk, flags, None
    at = DISK_START.size
    if not len(rest) or len(rest) != 1 + rest[0] + CHECKPOINT_ID_BYTES:
        raise PacketError(at, f"{name}: an incremental disk header of {len(view)} bytes does "
                              f"not hold a checkpoint's name and id")
    checkpoint = bytes(rest[1:1 + rest[0]]).decode("ascii", "replace")
    ident = bytes(rest[1 + rest[0]:]).decode("ascii", "replace")
    if not CHECKPOINT_NAME.match(checkpoint):
        raise PacketError(at + 1, f"{name}: {checkpoint!r} is not a checkpoint name")
    if not all(c in "0123456789abcdef" for c in ident):
        raise PacketError(at + 1 + rest[0], f"{name}: {ident!r} is not a checkpoint id")
    return size, chunk, flags, {"name": checkpoint, "id": ident}


class BlockLoader:
    """Destination half of one disk's live entry: writes into the target image."""

    def __init__(self, image: DiskImage, unit: int):
        self.image = image
        self.unit = unit
        self.chunk_bytes = 0
        self.incremental = False
        self.started = False
        self.ended = False
        self.bytes_written = 0
        self.bytes_zeroed = 0

    @property
    def name(self) -> str:
        return f"{BLOCK_IDSTR}/{self.unit}"

    def load_start(self, payload) -> None:
        if self.started:
            raise PacketError(0, f"{self.name}: a second START")
        size, chunk, flags, incremental = parse_start(payload, self.name)
        if size != self.image.size_bytes:
            raise PacketError(0, f"{self.name}: the source's disk is {size} bytes, the target "
                                 f"{self.image.path} is {self.image.size_bytes}")
        if not SECTOR_BYTES <= chunk <= MAX_CHUNK_BYTES or chunk % SECTOR_BYTES:
            raise PacketError(8, f"{self.name}: a chunk of {chunk} bytes (whole sectors up to "
                                 f"{MAX_CHUNK_BYTES})")
        if getattr(self.image, "target", None) is not None:
            prepare_target(self.image, incremental)  # before the first write
        self.image.open_direct()
        self.chunk_bytes = chunk
        self.incremental = incremental is not None
        self.started = True

    def load_part(self, payload) -> None:
        if not self.started:
            raise PacketError(0, f"{self.name}: disk data before its header")
        if self.ended:
            raise PacketError(0, f"{self.name}: disk data after its end")
        records = parse_part(payload, self.image.size_bytes, self.chunk_bytes)
        view = memoryview(payload).cast("B")
        for kind, offset, length, data_at in records:
            if kind == KIND_DATA:
                self.image.write_through(offset, view[data_at:data_at + length])
                self.bytes_written += length
            else:
                self.image.write_zeroes(offset, length)
                self.bytes_zeroed += length

    def load_end(self, payload) -> None:
        if not self.started:
            raise PacketError(0, f"{self.name}: disk end before its header")
        if len(payload):
            raise PacketError(0, f"{self.name}: a disk end of {len(payload)} bytes; it "
                                 f"carries none")
        self.ended = True

    def finish(self) -> None:
        """The guest runs on this image now: on stable storage, and no longer partial."""
        self.image.flush()
        self.image.close_direct()  # the guest's writes go through the page cache
        try:
            os.unlink(incomplete_marker(self.image.path))
        except FileNotFoundError:
            pass


# --- the destination's target images ---------------------------------------------------------

@dataclass(frozen=True)
class DiskTarget:
    """Where an incoming disk goes: ``disk0=PATH[,overwrite]``."""

    unit: int
    path: str
    overwrite: bool = False

    @classmethod
    def parse(cls, text: str) -> "DiskTarget":
        name, sep, rest = text.partition("=")
        if not sep or not name.startswith("disk") or not name[4:].isdigit():
            raise ValueError(f"--disk {text!r}: a target is diskN=PATH[,overwrite]")
        path, *options = rest.split(",")
        if not path:
            raise ValueError(f"--disk {text!r}: no image path")
        unknown = [o for o in options if o != "overwrite"]
        if unknown:
            raise ValueError(f"--disk {text!r}: unknown option(s) {unknown} (known: "
                             f"overwrite)")
        return cls(int(name[4:]), os.path.abspath(path), "overwrite" in options)


def is_target(text: str) -> bool:
    """Whether ``--disk TEXT`` of ``pymig incoming`` names a target (``diskN=PATH``) rather
    than a shared image."""
    name, sep, _ = text.partition("=")
    return bool(sep) and name.startswith("disk") and name[4:].isdigit()


def open_target(target: DiskTarget, size_bytes: int, source_path: str) -> DiskImage:
    """The image disk ``target.unit`` is written into, ``size_bytes`` long and marked
    incomplete: created sparse where it does not exist; an existing one must have that size,
    and hold no data unless ``target.overwrite`` (then it is emptied)."""
    path = target.path
    name = disk_id(target.unit)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DiskError(f"{name} target {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_size == 0:
            os.ftruncate(fd, size_bytes)
        elif info.st_size != size_bytes:
            raise DiskError(f"{name} target {path} is {info.st_size} bytes; the incoming "
                            f"disk is {size_bytes} (a target of another size is never "
                            f"resized)")
    except OSError as exc:
        raise DiskError(f"{name} target {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    image = DiskImage(path, allow_incomplete=True)
    image.target = target
    image.incoming_from = source_path
    return image


def prepare_target(image: DiskImage, incremental: dict | None) -> None:
    """Ready a target for the disk's data, as its START says, before anything is written;
    then mark it incomplete.  A whole copy (``incremental`` None) goes into a target that
    holds no data, or one the operator said to overwrite (emptied now), or one an earlier
    migration left incomplete.  An incremental one goes into the copy the checkpoint named
    (``incremental``: its name and id) was taken for: the target keeps its data."""
    target: DiskTarget = image.target
    name, path = disk_id(target.unit), image.path
    marked = os.path.exists(incomplete_marker(path))
    try:
        if incremental is not None:
            identity_path = checkpoint_files(path, incremental["name"])[0]
            try:
                ours = read_checkpoint_identity(identity_path)
            except DiskError as exc:
                raise DiskError(f"{name} target {path} is not a copy of checkpoint "
                                f"{incremental['name']} of the source's image ({exc})") \
                    from None
            if ours["id"] != incremental["id"] or ours["size_bytes"] != image.size_bytes:
                raise DiskError(f"{name} target {path} is not a copy of checkpoint "
                                f"{incremental['name']} of the source's image: its identity "
                                f"is {ours['id']}, the source's {incremental['id']}")
            if marked:
                raise DiskError(f"{name} target {path} is incomplete: an incremental "
                                f"migration needs the whole copy the checkpoint was taken for")
            has_data = False
        else:
            has_data = next(iter(image.data_extents()), None) is not None
            if has_data and not target.overwrite and not marked:
                raise DiskError(f"{name} target {path} already holds data; give "
                                f"{name}={path},overwrite to replace it")
        with open(incomplete_marker(path), "w") as marker:
            json.dump({"reason": f"an incoming migration of {image.incoming_from} into this "
                                 f"image has not completed",
                       "began": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, marker)
        if has_data:
            image.write_zeroes(0, image.size_bytes)
    except OSError as exc:
        raise DiskError(f"{name} target {path}: {exc.strerror or exc}") from None
