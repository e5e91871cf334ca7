"""Following a migration stream as a channel writes or reads it.

A one-way channel (``exec:``, ``file:``) has no return path, so the end of the stream is the
only moment it can still fail the migration before the source counts it as delivered.  A
:class:`StreamTap` watches the bytes going out and reports when the EOF record has passed:
``exec:`` then waits for its command, ``file:`` writes its index.  For ``file:`` it also
records which RAM pages each RAM record carries, so that the index can tell a restore which
records later ones supersede entirely (see :class:`RamTracker`).  A restore follows the bytes
it reads the same way, to hold the index to that claim
(:class:`pymig.transport.snapshot_index.IndexCheck`); it tells the tap where it skipped
(:meth:`StreamTap.skip`).

The tap parses framing only (the layout of docs/stream-format.md); it checks nothing, since
the writer is our own (and a reader's loader checks every byte), and it never fails a write:
on bytes it cannot follow it stops following (``failed`` says why) and the channel simply
does without it.

It is a sans-IO parser: a generator asks for ``n`` bytes (``yield n``, answered with a view
that is valid only until its next request) or to pass ``n`` bytes over (``yield -n``).
:meth:`StreamTap.feed` answers from the buffers being written, without copying them except
for the small pieces that straddle two buffers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterable
from typing import Protocol

import numpy as np

from pymig.core import packet_info, packet_runs
from pymig.errors import StreamError
from pymig.transport.channel import byte_view
from pymig.transport.snapshot_index import block_shapes, run_pages


class TapError(Exception):
    """Bytes the tap cannot follow."""


class RamObserver(Protocol):
    """What follows the RAM records a tap sees (made from the RAM block list)."""

    #: whether :meth:`packet` wants the next RAM record's packet (else the tap passes it over)
    wants_packets: bool

    def packet(self, payload: memoryview, start: int, end: int) -> None:
        """The RAM record at bytes ``start``..``end`` of the stream carries ``payload``."""


class RamTracker:
    """Which RAM record wrote each page last (``last[block_id][page]``: the record's number,
    counted from 0 in stream order; -1 for a page never written).  ZERO runs count as
    writes: they too replace what came before.  4 bytes per page: 1 MiB per GiB of RAM."""

    wants_packets = True

    def __init__(self, blocks: list[dict]):
        self.last: dict[int, np.ndarray] = {}
        self.page_size: dict[int, int] = {}
        for block_id, (page_size, npages) in block_shapes(blocks).items():
            self.last[block_id] = np.full(npages, -1, dtype=np.int32)
            self.page_size[block_id] = page_size
        #: (first byte, end) of every RAM record carrying a packet, in stream order
        self.records: list[tuple[int, int]] = []

    def packet(self, payload: memoryview, start: int, end: int) -> None:
        """Note the runs of one packet, the payload of the RAM record at bytes
        ``start``..``end`` of the stream (the next record in :attr:`records`)."""
        record = len(self.records)
        info = packet_info(payload)
        block_id, page_size = info.block_id, info.page_size
        last = self.last.get(block_id)
        if last is None or page_size != self.page_size[block_id]:
            raise TapError(f"RAM packet of unknown shape (block {block_id})")
        runs = packet_runs(payload, page_size, block_id, last.size)  # walked in the core
        if runs.size:
            last[run_pages(runs)] = record
        self.records.append((start, end))

    def superseded(self) -> list[tuple[int, int]]:
        """Byte ranges (offset, length) of RAM records whose every page a later record wrote
        again; adjacent ones are merged."""
        needed = np.zeros(len(self.records), dtype=bool)
        for last in self.last.values():
            needed[last[last >= 0]] = True
        ranges: list[tuple[int, int]] = []
        for index in np.flatnonzero(~needed):
            start, end = self.records[index]
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
            else:
                ranges.append((start, end - start))
        return ranges


class StreamTap:
    """Follows the stream a channel writes or reads; see the module docstring.

    ``ram``: also follow the RAM records, into what it makes of the RAM block list (a
    :class:`RamObserver`, kept as ``ram``; :class:`RamTracker` for a snapshot's writer).
    """

    def __init__(self, *, ram: Callable[[list], RamObserver] | None = None):
        self.make_ram = ram
        self.ended = False  #: the EOF record has passed
        self.stream_bytes = 0  #: the stream's length once ``ended``
        self.failed: str | None = None  #: why the tap stopped following, if it did
        self.ram: RamObserver | None = None
        self.ram_failed: str | None = None  #: why RAM is not followed (no index then)
        self.ram_section: int | None = None  #: the RAM section's id, once its START passed
        self._pos = 0  # stream bytes the parser has passed, skipped ones included
        self._between_records = False  # the parser waits for a record header
        self._buf = bytearray()
        self._parser = self._parse()
        self._want = next(self._parser)

    @property
    def between_records(self) -> bool:
        """Whether the bytes so far end with a whole record (or the stream header)."""
        return self.following and self._between_records and not self._buf

    def skip(self, nbytes: int) -> None:
        """The next ``nbytes`` of the stream are passed over unseen (whole records, which
        the caller checks): the offsets the tap reports stay the stream's."""
        if not self.between_records:
            raise TapError("bytes skipped inside a record")
        self._pos += nbytes

    @property
    def following(self) -> bool:
        return self.failed is None and not self.ended

    def feed(self, buffers: Iterable) -> None:
        """The next bytes of the stream, as written (any buffers)."""
        if not self.following:
            return
        try:
            for buf in buffers:
                self._feed(byte_view(buf))
                if not self.following:
                    break
        except TapError as exc:
            self._stop(str(exc))

    def _stop(self, reason: str) -> None:
        self.failed = reason
        self._parser.close()

    def _feed(self, view: memoryview) -> None:
        pos, size = 0, len(view)
        while pos < size:
            want = self._want
            if want < 0:  # pass bytes over
                take = min(-want, size - pos)
                pos += take
                if take < -want:
                    self._want = want + take
                    return
                answer = None
            elif not self._buf and size - pos >= want:
                answer = view[pos:pos + want]  # whole in this buffer: no copy
                pos += want
            else:
                take = min(want - len(self._buf), size - pos)
                self._buf += view[pos:pos + take]
                pos += take
                if len(self._buf) < want:
                    return
                answer = memoryview(bytes(self._buf))
                self._buf.clear()
            try:
                self._want = self._parser.send(answer)
            except StopIteration:
                self.ended = True
                if pos < size:
                    raise TapError("bytes after the EOF record") from None
                return

    def _parse(self) -> Generator[int, memoryview | None, None]:
        from pymig import stream  # here, not at import: pymig.stream imports the transports

        header = yield stream.HEADER_BYTES
        if bytes(header[:8]) != stream.MAGIC:
            raise TapError("not a pymig stream")
        self._pos = stream.HEADER_BYTES
        while True:
            self._between_records = True
            head = yield stream.RECORD_HEAD.size
            self._between_records = False
            start = self._pos  # (after any skip)
            rtype, _flags, _reserved, section_id = stream.RECORD_HEAD.unpack(head)
            pos = start + stream.RECORD_HEAD.size
            idstr = None
            if rtype in (stream.RecordType.START, stream.RecordType.FULL):
                length = (yield 1)[0]
                idstr = bytes((yield length)).decode("ascii", "replace") if length else ""
                yield -stream.SECTION_INFO.size
                pos += 1 + length + stream.SECTION_INFO.size
            (payload_len,) = stream.U32.unpack((yield stream.U32.size))
            pos += stream.U32.size
            end = pos + payload_len + stream.FOOTER_BYTES
            if rtype == stream.RecordType.EOF:
                yield -stream.FOOTER_BYTES
                self._pos = self.stream_bytes = end
                return
            if idstr == "ram" and rtype == stream.RecordType.START:
                self.ram_section = section_id
                payload = (yield payload_len) if payload_len else memoryview(b"")
                self._ram_setup(payload)
            elif (section_id == self.ram_section and rtype == stream.RecordType.PART
                  and self.ram is not None and payload_len and self.ram.wants_packets):
                payload = yield payload_len
                self._ram_packet(payload, start, end)
            elif payload_len:
                yield -payload_len
            yield -stream.FOOTER_BYTES
            self._pos = end

    def _ram_setup(self, payload: memoryview) -> None:
        if self.make_ram is None or self.ram_failed:
            return
        if self.ram is not None:
            self.ram, self.ram_failed = None, "a second RAM START record"
            return
        try:
            self.ram = self.make_ram(json.loads(bytes(payload)))
        except (ValueError, RecursionError, MemoryError) as exc:
            self.ram_failed = f"RAM block list not understood: {exc}"

    def _ram_packet(self, payload: memoryview, start: int, end: int) -> None:
        try:
            self.ram.packet(payload, start, end)
        except (TapError, StreamError, IndexError, ValueError) as exc:
            self.ram, self.ram_failed = None, f"RAM record at byte {start}: {exc}"
