"""Fuzz target ``index``: a snapshot file's restore index, as a restore opens the file.

Input: a whole snapshot file (stream, then index).  It is put in a memfd and opened the way
``pymig incoming file:`` opens a file (:func:`pymig.transport.file.listen`, through
``/proc/self/fd``), and :func:`~pymig.transport.snapshot_index.read_index` reads the index on
its own.  An index decoded from its own encoding must be the same index.

Through an index that decoded, the :class:`~pymig.transport.file.IndexedFileChannel` holds the
stream to what the index claims (:class:`~pymig.transport.snapshot_index.IndexCheck`) as it
reads: it either refuses (SnapshotIndexError; a restore then reads every record) or gives
exactly the stream minus the ranges the index skips, and the stream header is never among
them.  When it gives them, a guest restored from what it gave must be the guest restored from
the whole stream: the same RAM, the same vCPU state (where both load).  The records of the
file are then read and checked by a StreamReader up to the EOF record, as a restore reads
them.

Clean ends: SnapshotIndexError, and PymigError while reading.  Each input also runs with its
index checksum (and the stream's) repaired.
"""

from __future__ import annotations

import contextlib
import os

from pymig import stream
from pymig.errors import PymigError
from pymig.fuzz import repair, streamload
from pymig.fuzz._harness import Finding
from pymig.fuzz.mutate import stream_mutator as mutator  # noqa: F401 - for _harness
from pymig.fuzz.words import stream_words as dictionary  # noqa: F401 - for _harness
from pymig.transport import PeerClosedError
from pymig.transport import file as snapshot
from pymig.transport.snapshot_index import SnapshotIndexError, decode_index, read_index
from pymig.transport.uri import Uri

HEADER_BYTES = stream.HEADER_BYTES


def test_one_input(data: bytes) -> None:
    _open(data)
    fixed = repair.everything(data)
    if fixed != data:
        _open(fixed)


def _open(data: bytes) -> None:
    fd = os.memfd_create("pymig-fuzz-snapshot", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        try:
            index = read_index(fd)
        except SnapshotIndexError:
            index = None
        if index is not None:
            again = decode_index(index.encode(), index.stream_bytes)
            if again != index:
                raise Finding(f"an index does not survive its own encoding: {index} became "
                              f"{again}")
        path = f"/proc/self/fd/{fd}"
        with _opened(path) as channel:
            if isinstance(channel, snapshot.IndexedFileChannel):
                _check_bytes(channel, data)
        with _opened(path) as channel:
            _read_records(channel)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _opened(path: str):
    """The channel a restore of ``path`` reads (through its index when that checks out)."""
    listener = snapshot.listen(Uri("file", path=path))
    channel = listener.accept()
    try:
        yield channel
    finally:
        channel.close()
        listener.close()


def _check_bytes(channel, data: bytes) -> None:
    """What the indexed channel gives is the file without the skipped ranges, or a refusal;
    and what it gives restores the guest the whole stream restores."""
    index = channel.index
    if index.superseded and index.superseded[0][0] < HEADER_BYTES:
        raise Finding(f"an index that skips the stream header checked out: "
                      f"{index.superseded[0]}")
    expected = bytearray()
    pos = 0
    for offset, length in index.superseded:
        expected += data[pos:offset]
        pos = offset + length
    expected += data[pos:index.stream_bytes]
    got = bytearray(len(expected) + 1)
    try:
        channel.recv_into(got)
    except PeerClosedError as exc:
        got = got[:exc.received]
    except PymigError:
        return  # the index does not hold: a restore reads every record instead
    else:
        raise Finding(f"the indexed channel gave more than the {len(expected)} bytes the "
                      f"index leaves of the stream")
    if got != expected:
        raise Finding(f"the indexed channel gave {len(got)} bytes, not the {len(expected)} "
                      f"the index leaves of the stream")
    if index.superseded:
        _check_restore(bytes(got), data[:index.stream_bytes])


def _check_restore(indexed: bytes, whole: bytes) -> None:
    """A guest restored through an index that held is the guest the whole stream gives."""
    through_index = streamload.restored(indexed)
    if through_index is None:
        return
    everything = streamload.restored(whole)
    if everything is not None and through_index != everything:
        raise Finding("a restore through an index that checked out gave another guest than "
                      "the whole stream: " + ", ".join(
                          what for what, a, b in zip(("RAM", "vCPU state"), through_index,
                                                     everything) if a != b))


def _read_records(channel) -> None:
    """Every record up to EOF, checked, as a restore reads them before loading."""
    reader = stream.StreamReader(channel)
    try:
        reader.read_header()
        while reader.next_record().type != stream.RecordType.EOF:
            reader.skip_payload()
    except PymigError:
        pass
