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

Reading (:func:`listen`): with a valid index, an :class:`IndexedFileChannel` presents the
stream without the superseded records, so a restore reads each page's last version and not
the ones before it.  Without an index (or when it does not check out) the file is read as it
is.  Every byte a restore reads is checked as usual: records by their footers, pages by their
packet checksums.
"""

from __future__ import annotations

import os
import stat
import struct
import tempfile
from dataclasses import dataclass

import xxhash

from pymig.errors import TransportError
from pymig.transport.channel import FdChannel, transport_error
from pymig.transport.listener import ReadyListener
from pymig.transport.tap import StreamTap
from pymig.transport.uri import Uri, uri_error

SCHEME = "file"

INDEX_MAGIC = b"PMINDEX1"
INDEX_TAIL_MAGIC = b"PMIXTAIL"
INDEX_VERSION = 1
INDEX_HEAD = struct.Struct("<8sIIQQ")  # magic, version, flags, stream_bytes, ranges
INDEX_RANGE = struct.Struct("<QQ")  # offset, length
INDEX_SUM = struct.Struct("<Q")
INDEX_TAIL = struct.Struct("<Q8s")  # index_bytes (magic through checksum), tail magic
#: An index larger than this is not one (a million ranges).
MAX_INDEX_BYTES = 16 << 20


def parse(rest: str, text: str) -> Uri:
    """Parse what follows ``file:``."""
    if not rest:
        raise uri_error(text, "empty path: expected file:PATH")
    if "\0" in rest:
        raise uri_error(text, "the path contains a NUL byte")
    return Uri("file", path=rest)


# -- the index -------------------------------------------------------------------------------

@dataclass
class SnapshotIndex:
    """What the index of a snapshot file says (see the module docstring)."""

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


class SnapshotIndexError(ValueError):
    """An index that does not check out; ``offset`` is where, in the file."""

    def __init__(self, offset: int, reason: str):
        self.offset = offset
        self.reason = reason
        super().__init__(f"snapshot index at byte {offset}: {reason}")


def decode_index(data: bytes, at: int) -> SnapshotIndex:
    """The index in ``data`` (the bytes after the stream, which ends at file offset ``at``):
    from its magic through its tail, nothing more.  Raises :class:`SnapshotIndexError` naming
    the file offset of the first thing that is off (a short ``data`` is "truncated")."""
    view = memoryview(data)

    def need(pos: int, nbytes: int, what: str) -> None:
        if pos + nbytes > len(view):
            raise SnapshotIndexError(at + len(view), f"truncated in {what}")

    def fail(pos: int, reason: str):
        raise SnapshotIndexError(at + pos, reason)

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
        raise SnapshotIndexError(size - INDEX_TAIL.size, f"impossible length {index_bytes}")
    return decode_index(os.pread(fd, index_bytes + INDEX_TAIL.size, at), at)


# -- writing ---------------------------------------------------------------------------------

class SnapshotWriter(FdChannel):
    """Writes a stream to a temporary file that becomes ``path`` at the EOF record, with the
    restore index after the stream (see the module docstring)."""

    def __init__(self, fd: int, name: str, temp_path: str, path: str):
        super().__init__(fd, name, writable=True, tap=StreamTap(track_ram=True))
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
    """Reads a snapshot's stream without the records its index says are superseded.

    The reader sees a valid stream that is shorter than the file: offsets it reports count
    the bytes it read (a failed load is retried through :meth:`sequential`, whose offsets are
    the file's).
    """

    def __init__(self, fd: int, name: str, index: SnapshotIndex):
        super().__init__(fd, name, writable=False)
        self.index = index
        self._pos = 0  # next file offset to read
        self._skips = list(index.superseded)
        self._next = 0  # the next superseded range at or after _pos

    def _recv_some(self, view: memoryview) -> int:
        self._check_direction(False)
        skips = self._skips
        while self._next < len(skips) and skips[self._next][0] <= self._pos:
            offset, length = skips[self._next]
            self._pos = max(self._pos, offset + length)
            self._next += 1
        limit = skips[self._next][0] if self._next < len(skips) else self.index.stream_bytes
        nbytes = min(len(view), limit - self._pos)
        if nbytes <= 0:
            return 0
        try:
            got = os.preadv(self._fd, [view[:nbytes]], self._pos)
        except OSError as exc:
            raise transport_error(f"reading from {self.name}", exc) from exc
        self._pos += got
        return got

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
