"""The restore index of a ``file:`` snapshot: its layout, and the check a restore holds it to.

A live snapshot re-sends the pages the guest dirties while it is taken, so the file holds
several versions of hot pages.  Right after the stream's EOF record comes the index
(docs/stream-format.md, "Snapshot index"), which lists the RAM records that later records
supersede entirely, so that a restore reads each page's last version only::

    stream_bytes
    +------------+-----------------+---------------+------------------+------------+
    | "PMINDEX1" | version u32 = 1 | flags u32 = 0 | stream_bytes u64 | ranges u64 |
    +------------+-----------------+---------------+------------------+------------+
    | offset u64 | length u64 |  x ranges (ascending, not overlapping)
    +------------+------------+
    | checksum u64: xxh3-64 from "PMINDEX1" through the last range |
    +---------------------------------------------------------------+------------+
    | index_bytes u64 (from "PMINDEX1" through the checksum)        | "PMIXTAIL" |
    +---------------------------------------------------------------+------------+

The checksum finds damage, not intent: anyone can write an index that checks out.  What an
index claims is that each range is one or more whole RAM records (PART records of the RAM
section) and that a record read after them writes every one of their pages again, so that
skipping them leaves memory as reading them would.  :class:`IndexCheck` holds the records of
the stream to that claim, in stream order:

* a range starts where one record ends and is tiled by whole RAM records;
* a page a skipped record holds is *pending* until a record that is not skipped, later in
  the stream, holds it again (ZERO runs count: they replace what came before);
* at the end of the stream no page is pending and every range was met.

A restore (:class:`pymig.transport.file.IndexedFileChannel`) feeds it the records it reads
(their runs, walked in the core, only while a page is pending) and walks the records it
skips with a few small reads each: their record headers and footers and their packets' run
records, never their pages.  ``pymig analyze`` feeds it every record of the stream.  Anything
the check refuses is a :class:`SnapshotIndexError`, and the restore reads every record
instead.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xxhash

from pymig._coreshared import (COMPRESSED_HEADER_BYTES, PACKET_HEADER_BYTES, PACKET_MAGIC,
                               PACKET_VERSION, RUN_COMPRESSED, RUN_HEADER_BYTES, RUN_NORMAL,
                               RUN_ZERO)
from pymig.core import packet_info, packet_runs
from pymig.errors import PymigError

INDEX_MAGIC = b"PMINDEX1"
INDEX_TAIL_MAGIC = b"PMIXTAIL"
INDEX_VERSION = 1
INDEX_HEAD = struct.Struct("<8sIIQQ")  # magic, version, flags, stream_bytes, ranges
INDEX_RANGE = struct.Struct("<QQ")  # offset, length
INDEX_SUM = struct.Struct("<Q")
INDEX_TAIL = struct.Struct("<Q8s")  # index_bytes (magic through checksum), tail magic
#: An index larger than this is not one (a million ranges).
MAX_INDEX_BYTES = 16 << 20

_PACKET_HEAD = struct.Struct("<4sHHIIIIQ")
_RUN = struct.Struct("<QIBBH")  # first page, page count, kind, reserved u8, reserved u16
_COMPRESSED = struct.Struct("<II")  # LZ4 block length, reserved
#: Up to this many runs are marked a slice each, and so are runs of more pages than
#: _EXPAND_MAX_PAGES in all; others as one array of their pages.
_SLICED_RUNS = 8
_EXPAND_MAX_PAGES = 1 << 16
#: How much a walk through a skipped record reads at a time: enough for the run records of
#: a few ZERO or COMPRESSED runs in a row, little of a NORMAL run's pages, which it passes over.
_WALK_READ_BYTES = 1024


@dataclass
class SnapshotIndex:
    """What the index of a snapshot says."""

    stream_bytes: int  #: length of the stream; the index starts there
    superseded: list[tuple[int, int]]  #: (offset, length) of RAM records a restore skips

    @property
    def superseded_bytes(self) -> int:
        return sum(length for _, length in self.superseded)

    def encode(self) -> bytes:
        """The index as stored after the stream, tail included."""
        parts = [INDEX_HEAD.pack(INDEX_MAGIC, INDEX_VERSION, 0, self.stream_bytes,
                                 len(self.superseded))]
        parts += [INDEX_RANGE.pack(offset, length) for offset, length in self.superseded]
        body = b"".join(parts)
        body += INDEX_SUM.pack(xxhash.xxh3_64_intdigest(body))
        return body + INDEX_TAIL.pack(len(body), INDEX_TAIL_MAGIC)


class SnapshotIndexError(PymigError):
    """An index that is damaged, or whose claim the stream does not bear out; ``offset`` is
    where, in the file.  Not a StreamError: the stream itself may be whole (a restore then
    reads every record of it), and a reader must not take it for the stream's own end."""

    def __init__(self, offset: int, reason: str):
        self.offset = offset
        self.reason = reason
        super().__init__(f"at byte {offset}: {reason}")

    def __reduce__(self):
        return (type(self), (self.offset, self.reason))


def decode_index(data: bytes, at: int) -> SnapshotIndex:
    """The index in ``data`` (the bytes after the stream, which ends at file offset ``at``):
    from its magic through its tail, nothing more.  Raises :class:`SnapshotIndexError` naming
    the file offset of the first thing that is off (a short ``data`` is "truncated")."""
    view = memoryview(data)

    def need(pos: int, nbytes: int, what: str) -> None:
        if pos + nbytes > len(view):
            raise SnapshotIndexError(at + len(view), f"the snapshot index is truncated in {what}")

    def fail(pos: int, reason: str):
        raise SnapshotIndexError(at + pos, f"the snapshot index: {reason}")

    need(0, INDEX_HEAD.size, "its header")
    magic, version, flags, stream_bytes, nranges = INDEX_HEAD.unpack_from(view)
    if magic != INDEX_MAGIC:
        fail(0, f"bad magic {bytes(magic)!r}")
    if version != INDEX_VERSION:
        fail(8, f"version {version}; this pymig reads version {INDEX_VERSION}")
    if flags:
        fail(12, f"unknown flags 0x{flags:08x}")
    if stream_bytes != at:
        fail(16, f"says the stream ends at byte {stream_bytes}, but it follows byte {at}")
    pos = INDEX_HEAD.size
    if nranges > MAX_INDEX_BYTES // INDEX_RANGE.size:
        fail(24, f"impossible range count {nranges}")
    need(pos, nranges * INDEX_RANGE.size, "its ranges")
    ranges = [INDEX_RANGE.unpack_from(view, pos + i * INDEX_RANGE.size) for i in range(nranges)]
    previous_end = 16  # the stream header is never skipped
    for i, (offset, length) in enumerate(ranges):
        if length == 0 or offset < previous_end or offset + length > stream_bytes:
            fail(pos + i * INDEX_RANGE.size, f"range ({offset}, {length}) is out of order or "
                                             f"outside the stream")
        previous_end = offset + length
    pos += nranges * INDEX_RANGE.size
    need(pos, INDEX_SUM.size + INDEX_TAIL.size, "its checksum and tail")
    (checksum,) = INDEX_SUM.unpack_from(view, pos)
    if xxhash.xxh3_64_intdigest(view[:pos]) != checksum:
        fail(pos, "checksum mismatch")
    index_bytes, tail_magic = INDEX_TAIL.unpack_from(view, pos + INDEX_SUM.size)
    end = pos + INDEX_SUM.size + INDEX_TAIL.size
    if tail_magic != INDEX_TAIL_MAGIC or index_bytes != pos + INDEX_SUM.size:
        fail(pos + INDEX_SUM.size, "bad tail")
    if end != len(view):
        fail(end, f"{len(view) - end} bytes after the index")
    return SnapshotIndex(stream_bytes, [tuple(r) for r in ranges])


def read_index(fd: int) -> SnapshotIndex | None:
    """The index at the end of the regular file ``fd``, or None if it has none.

    Raises :class:`SnapshotIndexError` for an index that is there but damaged.
    """
    size = os.fstat(fd).st_size
    if size < INDEX_TAIL.size:
        return None
    index_bytes, magic = INDEX_TAIL.unpack(os.pread(fd, INDEX_TAIL.size, size - INDEX_TAIL.size))
    if magic != INDEX_TAIL_MAGIC:
        return None
    at = size - INDEX_TAIL.size - index_bytes
    if not 0 < index_bytes <= MAX_INDEX_BYTES or at < 0:
        raise SnapshotIndexError(size - INDEX_TAIL.size,
                                 f"the snapshot index: impossible length {index_bytes}")
    return decode_index(os.pread(fd, index_bytes + INDEX_TAIL.size, at), at)


# -- the check -------------------------------------------------------------------------------

def block_shapes(blocks) -> dict[int, tuple[int, int]]:
    """``{block id: (page size, pages)}`` from a RAM block list (the RAM START payload,
    decoded); ValueError for one that is not a list of blocks of whole pages."""
    if not isinstance(blocks, list):
        raise ValueError("the RAM block list is not a list")
    shapes = {}
    for block in blocks:
        try:
            block_id, size, page_size = block["id"], block["size"], block["page_size"]
        except (TypeError, KeyError):
            raise ValueError(f"not a RAM block: {block!r:.100}") from None
        if not all(type(v) is int for v in (block_id, size, page_size)) or page_size <= 0 \
                or size < 0 or size % page_size or block_id in shapes:
            raise ValueError(f"not a RAM block: {block!r:.100}")
        shapes[block_id] = (page_size, size // page_size)
    return shapes


Pages = tuple[int, np.ndarray]  # a RAM record's block id and its runs, (first page, count) rows


def run_pages(runs: np.ndarray) -> np.ndarray:
    """Every page of ``runs`` ((first, count) rows), in order, without a Python step per run:
    page i of the concatenated runs is i plus its run's first page less the pages before it."""
    first, count = runs[:, 0], runs[:, 1]
    before = np.cumsum(count) - count
    return np.arange(int(count.sum()), dtype=np.int64) + np.repeat(first - before, count)


def _set_pages(flags: np.ndarray, runs: np.ndarray, value: bool) -> int:
    """Set the pages of ``runs`` in ``flags`` to ``value``; returns how many changed.  A few
    runs, or long ones, a slice each; many short ones as one array of pages."""
    if len(runs) > _SLICED_RUNS and int(runs[:, 1].sum()) <= _EXPAND_MAX_PAGES:
        pages = run_pages(runs)
        was = int(np.count_nonzero(flags[pages]))
        flags[pages] = value
        return pages.size - was if value else was
    changed = 0
    for first, count in runs.tolist():
        view = flags[first:first + count]
        was = int(np.count_nonzero(view))
        view[...] = value
        changed += count - was if value else was
    return changed


def packet_pages(payload, shapes: dict[int, tuple[int, int]]) -> Pages:
    """A RAM packet's block and runs, its run records walked and checked in the core (its
    checksum is not checked: that is the loader's); ``shapes`` from :func:`block_shapes`.
    PacketError or ValueError for a packet that is not one of those blocks'."""
    block_id = packet_info(payload).block_id
    if block_id not in shapes:
        raise ValueError(f"RAM packet of unknown block {block_id}")
    page_size, npages = shapes[block_id]
    return block_id, packet_runs(payload, page_size, block_id, npages)


class IndexCheck:
    """Holds a snapshot's records to what its index claims (see the module docstring).

    Feed it, in stream order: :meth:`ram_blocks` with the RAM START's block list, then
    :meth:`record` for records, and (a restore) :meth:`skip` for each range it skips; then
    :meth:`finish`.  A restore need not feed the records it reads while
    :attr:`wants_packets` is False, nor records that are not RAM records.  Each method raises
    :class:`SnapshotIndexError` at the first thing that does not hold.
    """

    def __init__(self, index: SnapshotIndex, *, max_pages: int | None = None):
        self.index = index
        # A restore's blocks are the guest it built (the loader checked the RAM START first);
        # a reader without a guest (analyze) bounds what a block list may make it track.
        self.max_pages = max_pages
        self._ranges = index.superseded
        self._next = 0  # the first range not yet wholly met
        self._cursor: int | None = None  # inside range _next: where its next record starts
        self._shapes: dict[int, tuple[int, int]] | None = None
        self._pending: dict[int, np.ndarray] = {}  # per block: pages a skipped record holds
        self._npending = 0
        self._skipped: list[tuple[int, int, np.ndarray]] = []  # (offset, block, runs)

    @property
    def wants_packets(self) -> bool:
        """Whether a page of a skipped record still waits for a later version: only then do
        the records read matter (:class:`pymig.transport.tap.RamObserver`)."""
        return self._npending > 0

    def ram_blocks(self, blocks) -> "IndexCheck":
        """The RAM block list (decoded RAM START payload); ValueError if it is not one."""
        self._shapes = block_shapes(blocks)
        return self

    def packet(self, payload, start: int, end: int) -> None:
        """The RAM record at bytes ``start``..``end`` carrying the packet ``payload``."""
        self.record(start, end, self.packet_pages(payload))

    def packet_pages(self, payload) -> Pages:
        """A RAM packet's block and runs (see :func:`packet_pages`)."""
        if self._shapes is None:
            raise ValueError("a RAM packet before the RAM block list")
        return packet_pages(payload, self._shapes)

    def record(self, start: int, end: int, pages: Pages | None) -> None:
        """The record at bytes ``start``..``end``; ``pages`` for a RAM record, None for any
        other (or for one whose packet cannot be followed)."""
        if self._next < len(self._ranges):
            offset, length = self._ranges[self._next]
            if start >= offset:
                expected = offset if self._cursor is None else self._cursor
                if start != expected:
                    raise SnapshotIndexError(offset, f"the index skips bytes {offset}.."
                                                     f"{offset + length}, which do not begin "
                                                     f"and end with records")
                if pages is None:
                    raise SnapshotIndexError(start, f"the index skips the record at byte "
                                                    f"{start}, which is not a RAM record")
                if end > offset + length:
                    raise SnapshotIndexError(offset, f"the index skips bytes {offset}.."
                                                     f"{offset + length}, which end inside the "
                                                     f"record at byte {start}")
                self._mark(start, pages)
                if end == offset + length:
                    self._next, self._cursor = self._next + 1, None
                else:
                    self._cursor = end
                return
            if end > offset:
                raise SnapshotIndexError(offset, f"the index skips from byte {offset}, inside "
                                                 f"the record at byte {start}")
        if pages is not None and self._npending:
            flags = self._pending.get(pages[0])
            if flags is not None:
                self._npending -= _set_pages(flags, pages[1], False)

    def _mark(self, start: int, pages: Pages) -> None:
        block_id, runs = pages
        flags = self._pending.get(block_id)
        if flags is None:
            _, npages = self._shapes[block_id]
            tracked = npages + sum(f.size for f in self._pending.values())
            if self.max_pages is not None and tracked > self.max_pages:
                raise SnapshotIndexError(start, f"RAM block {block_id} of {npages} pages is "
                                                f"more than the index is checked against here "
                                                f"({self.max_pages} pages in all)")
            try:
                flags = self._pending[block_id] = np.zeros(npages, dtype=bool)
            except (MemoryError, ValueError):
                raise SnapshotIndexError(start, f"RAM block {block_id} of {npages} pages is too "
                                                f"large to check the index against") from None
        self._npending += _set_pages(flags, runs, True)
        self._skipped.append((start, block_id, runs))

    def finish(self) -> None:
        """The stream has ended: every range was met and no skipped page lacks a later
        version."""
        if self._next < len(self._ranges):
            offset, length = self._ranges[self._next]
            raise SnapshotIndexError(offset, f"the index skips bytes {offset}.."
                                             f"{offset + length}, which are not whole records "
                                             f"of the stream")
        if not self._npending:
            return
        block_id, flags = next((b, f) for b, f in self._pending.items() if f.any())
        page = int(np.argmax(flags))
        holder = next((offset for offset, block, runs in reversed(self._skipped)
                       if block == block_id and runs.size and np.any(
                           (runs[:, 0] <= page) & (page < runs[:, 0] + runs[:, 1]))), 0)
        raise SnapshotIndexError(holder, f"the index skips the RAM record at byte {holder}, but "
                                         f"no record after it holds page {page} of RAM block "
                                         f"{block_id} again: {self._npending} page(s) would "
                                         f"keep an older version")

    # -- a restore's skips -------------------------------------------------------------------
    def skip(self, offset: int, length: int, pread: Callable[[int, int], bytes],
             ram_section: int | None) -> None:
        """A restore skips bytes ``offset``..``offset + length`` of the file, which ``pread
        (nbytes, offset)`` reads: walk its records, reading their headers, footers and run
        records only, and feed them to :meth:`record`."""
        from pymig import stream

        if self._shapes is None or ram_section is None:
            raise SnapshotIndexError(offset, f"the index skips bytes {offset}.."
                                             f"{offset + length}, before the RAM section began")
        if (self._next >= len(self._ranges) or self._cursor is not None
                or self._ranges[self._next] != (offset, length)):
            raise SnapshotIndexError(offset, f"bytes {offset}..{offset + length} are not the "
                                             f"next range of the index")
        window = _Window(pread, offset)
        end = offset + length
        at = offset
        while at < end:
            head = window.read(at, stream.PLAIN_HEAD.size)
            rtype, flags, reserved, section, payload_len = stream.PLAIN_HEAD.unpack(head)
            if (rtype != stream.RecordType.PART or section != ram_section
                    or flags != stream.FLAG_NOCSUM or reserved
                    or payload_len > stream.DEFAULT_MAX_PAYLOAD):
                raise SnapshotIndexError(at, f"the index skips the record at byte {at}, which "
                                             f"is not a RAM record")
            payload_at = at + stream.PLAIN_HEAD.size
            record_end = payload_at + payload_len + stream.FOOTER_BYTES
            if record_end > end:
                raise SnapshotIndexError(offset, f"the index skips bytes {offset}..{end}, which "
                                                 f"end inside the record at byte {at}")
            marker, footer_section, checksum = stream.FOOTER.unpack(
                window.read(payload_at + payload_len, stream.FOOTER_BYTES))
            if (marker != stream.FOOTER_MAGIC or footer_section != section
                    or checksum != xxhash.xxh3_64_intdigest(head)):
                raise SnapshotIndexError(at, f"the record at byte {at}, which the index skips, "
                                             f"has a bad footer")
            self.record(at, record_end, self._walk_packet(window, payload_at, payload_len))
            at = record_end

    def _walk_packet(self, window: "_Window", at: int, nbytes: int) -> Pages:
        """The block and runs of the ``nbytes``-byte RAM packet at file offset ``at``, with
        the checks :func:`pymig.core.packet_runs` makes, reading its run records only."""
        def fail(pos: int, reason: str):
            raise SnapshotIndexError(pos, f"the RAM packet at byte {at}, which the index "
                                          f"skips: {reason}")

        if nbytes < PACKET_HEADER_BYTES:
            fail(at, "shorter than its header")
        magic, version, flags, block_id, page_size, records, payload_len, _ = \
            _PACKET_HEAD.unpack(window.read(at, PACKET_HEADER_BYTES))
        if magic != PACKET_MAGIC or version != PACKET_VERSION or flags:
            fail(at, "not a RAM packet of this version")
        if PACKET_HEADER_BYTES + payload_len != nbytes or records * RUN_HEADER_BYTES > payload_len:
            fail(at + 16, "its length or record count is off")
        shape = self._shapes.get(block_id)
        if shape is None or shape[0] != page_size:
            fail(at + 8, f"block {block_id} with {page_size}-byte pages is not a RAM block")
        npages = shape[1]
        runs = []
        pos, end, previous_end = at + PACKET_HEADER_BYTES, at + nbytes, 0
        for _ in range(records):
            if end - pos < RUN_HEADER_BYTES:
                fail(pos, "its run records overrun it")
            first, count, kind, reserved8, reserved16 = _RUN.unpack(
                window.read(pos, RUN_HEADER_BYTES))
            if not count or reserved8 or reserved16 or kind not in (RUN_NORMAL, RUN_ZERO,
                                                                   RUN_COMPRESSED):
                fail(pos, "a run record is not one")
            if first >= npages or count > npages - first or first < previous_end:
                fail(pos, f"the run of pages {first}..{first + count} is out of order or "
                          f"outside the block")
            pos += RUN_HEADER_BYTES
            if kind == RUN_NORMAL:
                pos += count * page_size
            elif kind == RUN_COMPRESSED:
                if end - pos < COMPRESSED_HEADER_BYTES:
                    fail(pos, "a compressed run overruns it")
                clen, reserved32 = _COMPRESSED.unpack(window.read(pos, COMPRESSED_HEADER_BYTES))
                if reserved32:
                    fail(pos, "a compressed run is not one")
                pos += COMPRESSED_HEADER_BYTES + clen
            if pos > end:
                fail(pos, "a run's data overruns it")
            runs.append((first, count))
            previous_end = first + count
        if pos != end:
            fail(pos, "bytes after its last run")
        return block_id, np.array(runs, dtype=np.int64).reshape(-1, 2)


class _Window:
    """Reads a file through a small window: the run records of a packet come a few at a time
    where ZERO runs follow one another, one read each across NORMAL ones."""

    def __init__(self, pread: Callable[[int, int], bytes], at: int):
        self._pread = pread
        self._at = at
        self._data = b""

    def read(self, at: int, nbytes: int) -> bytes:
        if not (self._at <= at and at + nbytes <= self._at + len(self._data)):
            self._at, self._data = at, self._pread(max(nbytes, _WALK_READ_BYTES), at)
            if len(self._data) < nbytes:
                raise SnapshotIndexError(at + len(self._data), "the file ends inside a record "
                                                               "the index skips")
        return self._data[at - self._at:at - self._at + nbytes]
