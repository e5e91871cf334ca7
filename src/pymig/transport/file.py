"""``file:PATH``: the source writes the stream to a file, the destination reads it.

A file has no return path: the destination cannot acknowledge, so a migration to a file is a
snapshot that a later process restores (``pymig incoming file:PATH``).

Writing (:class:`SnapshotWriter`, for a regular file): the stream goes to a temporary file in
the same directory, which replaces PATH atomically once the stream's EOF record is written.
A snapshot that fails or is cancelled leaves PATH as it was (a previous snapshot stays
intact) and no partial file behind.  Right after the EOF record, before the rename, comes the
*restore index* (docs/stream-format.md, "Snapshot index"): a live snapshot re-sends the pages
the guest dirties while it is taken, so the file holds several versions of hot pages; the
index lists the RAM records that later records supersede entirely.  A path that exists and is
not a regular file (a FIFO, /dev/null) is written in place, without index.

Reading (:func:`listen`): with an index, an :class:`IndexedFileChannel` presents the stream
without the superseded records, so a restore reads each page's last version and not the ones
before it.  The index is not taken on trust: as the stream is read the channel checks that
each range it skips is whole RAM records whose every page a record read later holds again
(:mod:`pymig.transport.snapshot_index`), at the cost of the skipped records' run records, and
fails the load with a :class:`SnapshotIndexError` where that does not hold; the destination
then reads the file whole.  Without an index (or with a damaged one) the file is read as it
is.  Every byte a restore reads is checked as usual: records by their footers, pages by their
packet checksums.
"""

from __future__ import annotations

import os
import stat
import tempfile

from pymig.errors import TransportError
from pymig.transport.channel import FdChannel, transport_error
from pymig.transport.listener import ReadyListener
# (decode_index too: the index's names stay importable from here)
from pymig.transport.snapshot_index import (IndexCheck, SnapshotIndex, SnapshotIndexError,
                                            decode_index, read_index)
from pymig.transport.tap import RamTracker, StreamTap
from pymig.transport.uri import Uri, uri_error

SCHEME = "file"


def parse(rest: str, text: str) -> Uri:
    """Parse what follows ``file:``."""
    if not rest:
        raise uri_error(text, "empty path: expected file:PATH")
    if "\0" in rest:
        raise uri_error(text, "the path contains a NUL byte")
    return Uri("file", path=rest)


# -- writing ---------------------------------------------------------------------------------

class SnapshotWriter(FdChannel):
    """Writes a stream to a temporary file that becomes ``path`` at the EOF record, with the
    restore index after the stream (see the module docstring)."""

    def __init__(self, fd: int, name: str, temp_path: str, path: str):
        super().__init__(fd, name, writable=True, tap=StreamTap(ram=RamTracker))
        self.temp_path = temp_path
        self.path = path
        self._placed = False

    def _stream_ended(self) -> None:
        tap = self.tap
        if tap.ram is not None:
            self._write_index(SnapshotIndex(tap.stream_bytes, tap.ram.superseded()).encode())
        self._place()

    def _write_index(self, data: bytes) -> None:
        try:
            written = os.pwrite(self._fd, data, self.tap.stream_bytes)
        except OSError as exc:
            raise transport_error(f"writing the index of {self.name}", exc) from exc
        if written != len(data):
            raise TransportError(f"writing the index of {self.name}: short write")

    def _place(self) -> None:
        try:
            os.rename(self.temp_path, self.path)
        except OSError as exc:
            raise transport_error(f"renaming the snapshot to {self.path}", exc) from exc
        self._placed = True

    def _close(self) -> None:
        self._release_fd()
        if self._placed:
            return
        if self.tap.failed is not None:
            # Not a stream (a caller writing bytes of its own): a plain file, as written.
            self._place()
        else:
            os.unlink(self.temp_path)  # a snapshot without its EOF record is no snapshot


def connect(uri: Uri, *, timeout: float | None) -> FdChannel:
    """Write the stream to the file (see :class:`SnapshotWriter`)."""
    try:
        st = os.stat(uri.path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise transport_error(f"creating {uri}", exc) from exc
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(uri.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise transport_error(f"opening {uri}", exc) from exc
        return FdChannel(fd, str(uri), writable=True)
    target = os.path.realpath(uri.path)  # through a symlink: replace what it points to
    directory, name = os.path.split(target)
    try:
        fd, temp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    except OSError as exc:
        raise transport_error(f"creating {uri}", exc) from exc
    return SnapshotWriter(fd, str(uri), temp_path, target)


# -- reading ---------------------------------------------------------------------------------

class IndexedFileChannel(FdChannel):
    """Reads a snapshot's stream without the records its index says are superseded, and
    holds the index to that claim (see the module docstring): a range that does not bear it
    out fails the read with a :class:`SnapshotIndexError` that names its file offset, at the
    skip or, for a page no later record holds, when the last byte of the stream is read.

    The reader sees a valid stream that is shorter than the file: offsets it reports count
    the bytes it read (a failed load is retried through :meth:`sequential`, whose offsets are
    the file's).
    """

    def __init__(self, fd: int, name: str, index: SnapshotIndex):
        super().__init__(fd, name, writable=False)
        self.index = index
        self.check = IndexCheck(index)
        # (with nothing to skip there is nothing to check: no need to follow the stream)
        self.tap = StreamTap(ram=self.check.ram_blocks) if index.superseded else None
        self._pos = 0  # next file offset to read
        self._skips = list(index.superseded)
        self._next = 0  # the next superseded range at or after _pos

    def _recv_some(self, view: memoryview) -> int:
        self._check_direction(False)
        skips = self._skips
        while self._next < len(skips) and skips[self._next][0] <= self._pos:
            offset, length = skips[self._next]
            self._skip(offset, length)
            self._pos = offset + length
            self._next += 1
        stream_bytes = self.index.stream_bytes
        limit = skips[self._next][0] if self._next < len(skips) else stream_bytes
        nbytes = min(len(view), limit - self._pos)
        if nbytes <= 0:
            return 0
        got = self._pread_into(view[:nbytes], self._pos)
        self._pos += got
        if self.tap is not None:
            self.tap.feed([view[:got]])
            if self._pos == stream_bytes:
                self._follows("the end of the stream")
                self.check.finish()
        return got

    def _skip(self, offset: int, length: int) -> None:
        self._follows(f"the range of the index at byte {offset}")
        if not self.tap.between_records:
            raise SnapshotIndexError(offset, f"the index skips from byte {offset}, inside a "
                                             f"record")
        self.check.skip(offset, length, self._pread, self.tap.ram_section)
        self.tap.skip(length)

    def _follows(self, where: str) -> None:
        """The stream read so far could be followed: else the index cannot be checked."""
        reason = self.tap.failed or self.tap.ram_failed
        if reason is not None:
            raise SnapshotIndexError(self._pos, f"the index cannot be checked at {where}: "
                                                f"{reason}")

    def _pread_into(self, view: memoryview, offset: int) -> int:
        try:
            return os.preadv(self._fd, [view], offset)
        except OSError as exc:
            raise transport_error(f"reading from {self.name}", exc) from exc

    def _pread(self, nbytes: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, nbytes, offset)
        except OSError as exc:
            raise transport_error(f"reading from {self.name}", exc) from exc

    def sequential(self) -> FdChannel:
        """A new channel reading the whole file from its start, ignoring the index."""
        try:
            fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise transport_error(f"reopening {self.name}", exc) from exc
        return FdChannel(fd, self.name, writable=False)


def listen(uri: Uri) -> ReadyListener:
    """Open the file to read the stream from it (through its index when it has a good one)."""
    try:
        fd = os.open(uri.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise transport_error(f"opening {uri}", exc) from exc
    channel: FdChannel
    try:
        index = read_index(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (SnapshotIndexError, OSError):
        index = None  # the stream may still be whole: read it all, and check it as usual
    if index is not None:
        channel = IndexedFileChannel(fd, str(uri), index)
    else:
        channel = FdChannel(fd, str(uri), writable=False)
    return ReadyListener(channel, uri)
