"""The migration stream: framing of sections, and the return path.  Nothing about RAM.

All integers are little-endian.  Full description: docs/stream-format.md, "Migration stream".

Stream header (16 bytes)::

    0        8          12         16
    +--------+----------+----------+
    |PYMIGSTR|version u32|flags u32 |   version 1, flags 0
    +--------+----------+----------+

Record (START, PART, END, FULL, EOF)::

    0      1       2            4              8
    +------+-------+------------+--------------+
    | type | flags | reserved=0 | section_id   |          8 bytes
    +------+-------+------------+--------------+
    START/FULL only:
    +------------+-----------------+-------------+------------+
    | idstr_len  | idstr (1..255)  | instance_id | version_id |
    | u8         | ASCII           | u32         | u32        |
    +------------+-----------------+-------------+------------+
    +-------------+---------------------+
    | payload_len | payload             |
    | u32         | payload_len bytes   |
    +-------------+---------------------+
    footer (16 bytes):
    +---------+------------+----------------------------------------+
    | "PMFT"  | section_id | checksum u64 = xxh3-64(record header   |
    |         | u32        |   bytes + payload; header only if      |
    |         |            |   flags & NOCSUM)                      |
    +---------+------------+----------------------------------------+

    type: 1 START, 2 PART, 3 END, 4 FULL, 0x0E CANCEL (section 0, payload: why, UTF-8),
          0x0F EOF (section 0, no payload)
    flags: bit 0 NOCSUM (the payload checks itself, e.g. a RAM packet)

Return-path message (destination -> source, same full-duplex socket)::

    0          2              4           8
    +----------+--------------+-----------+---------------+
    | type u16 | reserved u16 | len u32   | payload (len) |
    +----------+--------------+-----------+---------------+

A reader refuses a length above its limit before allocating anything, and every
error is a :class:`~pymig.errors.StreamError` giving the absolute byte offset
in the stream of the byte found wrong (or of the end, for a truncated stream).
With a progress timeout, the header and each record must arrive whole within it of
the reader asking for them, or :class:`ProgressTimeout` is raised: a peer that
trickles bytes cannot hold a destination.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Callable, ClassVar, NamedTuple

import xxhash

from pymig.errors import SourceCancelled, StreamError, TransportError
from pymig.transport.channel import Channel, DeadlineExceeded, PeerClosedError, byte_view

MAGIC = b"PYMIGSTR"
VERSION = 1
HEADER = struct.Struct("<8sII")
HEADER_BYTES = HEADER.size  # 16

RECORD_HEAD = struct.Struct("<BBHI")  # type, flags, reserved, section_id
PLAIN_HEAD = struct.Struct("<BBHII")  # ... then payload_len: a whole PART/END/EOF header
SECTION_INFO = struct.Struct("<II")  # instance_id, version_id (after the idstr)
U8 = struct.Struct("<B")
U32 = struct.Struct("<I")
FOOTER = struct.Struct("<4sIQ")  # marker, section_id, checksum
FOOTER_MAGIC = b"PMFT"
FOOTER_BYTES = FOOTER.size  # 16

#: A TLS record's first byte when it carries a handshake (then 3, the major version): what a
#: TLS source sends first.
TLS_HANDSHAKE_RECORD = 0x16

FLAG_NOCSUM = 0x01
KNOWN_FLAGS = FLAG_NOCSUM
MAX_IDSTR_BYTES = 255
MAX_U32 = 0xFFFF_FFFF
DEFAULT_MAX_PAYLOAD = 64 << 20
#: Longest reason a CANCEL record (or message) carries; a longer one is cut.
MAX_CANCEL_BYTES = 1024


class RecordType(IntEnum):
    """What a record is: the pieces of a section, or the end of the stream."""

    START = 1  # first part of an iterative section: names the entry
    PART = 2  # a middle part
    END = 3  # the last part
    FULL = 4  # a whole section in one record: names the entry
    CANCEL = 0x0E  # the source gives the migration up (and says why): nothing follows
    EOF = 0x0F  # the stream is complete


_NAMED = (RecordType.START, RecordType.FULL)
_TYPES = {int(t): t for t in RecordType}


class RecordHeader(NamedTuple):
    """A record's header as read; ``idstr``, ``instance_id`` and ``version_id`` are None
    except for START and FULL.  ``offset`` is where the record starts in the stream."""

    type: RecordType
    flags: int
    section_id: int
    idstr: str | None
    instance_id: int | None
    version_id: int | None
    payload_len: int
    offset: int

    @property
    def nocsum(self) -> bool:
        return bool(self.flags & FLAG_NOCSUM)

    def describe(self) -> str:
        return f"{self.type.name} record of section {self.section_id} at byte {self.offset}"


def _u32(name: str, value: int) -> int:
    if not 0 <= value <= MAX_U32:
        raise ValueError(f"{name} {value} does not fit in 32 bits")
    return value


def _payload_views(payload) -> list[memoryview]:
    if isinstance(payload, (list, tuple)):
        return [byte_view(p) for p in payload]
    return [byte_view(payload)]


#: Largest record :meth:`StreamWriter.hold` copies and keeps back, and the most it keeps back.
HOLD_RECORD_BYTES = 64 << 10
#: The most guest RAM held records may stand for (``part(..., stands_for=...)``) before they
#: go out: a compressed RAM packet is a few KB on the wire and a MiB of pages to decode.
HOLD_GUEST_BYTES = 1 << 20


class StreamWriter:
    """Writes the stream to a channel.  One thread writes; records are never interleaved.

    Payloads are any buffer or a list of buffers; they go to the channel by
    scatter-gather next to the small header and footer, never copied.
    """

    def __init__(self, channel: Channel):
        self.channel = channel
        self.bytes_written = 0
        #: a send failed, perhaps halfway through a record: nothing more can follow
        self.broken = False
        #: the EOF record went out
        self.ended = False
        self._held: bytearray | None = None
        self._held_stands_for = 0  # guest RAM bytes the held records carry

    def hold(self) -> None:
        """Gather small records (copied) until :meth:`eof`, which sends them in one write.

        For the stop-and-copy: the last RAM records, the device state and EOF are a few
        kilobytes in a dozen records, and a write per record wakes the destination a dozen
        times, which on a host short of CPUs then takes turns with the source inside the
        downtime.  Records over :data:`HOLD_RECORD_BYTES` go out at once, after those held,
        and so do the held records once they add up to that much, or once they stand for
        :data:`HOLD_GUEST_BYTES` of guest RAM: the destination then decodes while the source
        encodes, rather than all of it after EOF.
        """
        if self._held is None:
            self._held = bytearray()
            self._held_stands_for = 0

    def write_header(self) -> None:
        """Write the 16-byte stream header."""
        self._send(HEADER.pack(MAGIC, VERSION, 0))
        self.bytes_written += HEADER_BYTES

    def start(self, section_id: int, idstr: str, instance_id: int, version_id: int,
              payload=b"", *, nocsum: bool = False) -> None:
        """Open an iterative section for entry (idstr, instance_id) at version_id."""
        self._record(RecordType.START, section_id, payload, nocsum,
                     _section_info(idstr, instance_id, version_id))

    def part(self, section_id: int, payload=b"", *, nocsum: bool = False,
             stands_for: int = 0) -> None:
        """Continue a section opened by :meth:`start`; ``stands_for``: the bytes of guest RAM
        the payload carries, however few it takes on the wire (see :meth:`hold`)."""
        self._record(RecordType.PART, section_id, payload, nocsum, stands_for=stands_for)

    def end(self, section_id: int, payload=b"", *, nocsum: bool = False) -> None:
        """Complete a section opened by :meth:`start`."""
        self._record(RecordType.END, section_id, payload, nocsum)

    def full(self, section_id: int, idstr: str, instance_id: int, version_id: int,
             payload=b"", *, nocsum: bool = False) -> None:
        """A whole section (e.g. one device's state) in a single record."""
        self._record(RecordType.FULL, section_id, payload, nocsum,
                     _section_info(idstr, instance_id, version_id))

    def eof(self) -> None:
        """Mark the end of the stream (and send what :meth:`hold` gathered)."""
        self._record(RecordType.EOF, 0, b"", False)
        held, self._held = self._held, None
        if held:
            self._send(held)
        self.ended = True

    def cancel(self, reason: str = "") -> None:
        """End the stream with a CANCEL record saying ``reason``: the source gives the
        migration up.  Only between records (not after :attr:`broken`) and before EOF; what
        :meth:`hold` gathered is dropped, as the destination will load nothing more."""
        if self.broken or self.ended:
            raise RuntimeError("a CANCEL record follows a whole record, before EOF")
        self._held = None
        self._record(RecordType.CANCEL, 0, _cut_utf8(reason, MAX_CANCEL_BYTES), False)

    def _send(self, data) -> None:
        try:
            self.channel.send(data)
        except BaseException:
            self.broken = True
            raise

    def _sendv(self, parts) -> None:
        try:
            self.channel.sendv(parts)
        except BaseException:
            self.broken = True
            raise

    def _record(self, rtype: RecordType, section_id: int, payload, nocsum: bool,
                info: bytes = b"", *, stands_for: int = 0) -> None:
        views = _payload_views(payload)
        payload_len = sum(map(len, views))
        if payload_len > MAX_U32:
            raise ValueError(f"a record payload of {payload_len} bytes does not fit in 32 bits")
        if not 0 <= section_id <= MAX_U32:
            raise ValueError(f"section id {section_id} does not fit in 32 bits")
        flags = FLAG_NOCSUM if nocsum else 0
        if info:
            head = (RECORD_HEAD.pack(rtype, flags, 0, section_id) + info
                    + U32.pack(payload_len))
        else:  # PART/END/EOF: one pack for the whole 12-byte header
            head = PLAIN_HEAD.pack(rtype, flags, 0, section_id, payload_len)
        if nocsum or not payload_len:
            checksum = xxhash.xxh3_64_intdigest(head)
        else:
            hasher = xxhash.xxh3_64(head)
            for view in views:
                hasher.update(view)
            checksum = hasher.intdigest()
        parts = [head, *views, FOOTER.pack(FOOTER_MAGIC, section_id, checksum)]
        size = len(head) + payload_len + FOOTER_BYTES
        held = self._held
        if held is None:
            self._sendv(parts)
        elif size <= HOLD_RECORD_BYTES:
            for part in parts:
                held += part
            self._held_stands_for += stands_for
            if len(held) >= HOLD_RECORD_BYTES or self._held_stands_for >= HOLD_GUEST_BYTES:
                # Many small records (a compressed last pass: MBs of guest RAM in KBs of
                # packets) go out as they gather, so the destination decodes while the
                # source encodes rather than after it.
                self._send(held)
                self._held = bytearray()
                self._held_stands_for = 0
        else:
            if held:
                self._send(held)
                self._held = bytearray()  # a new one: the channel may still hold a view of it
                self._held_stands_for = 0
            self._sendv(parts)
        self.bytes_written += size


def _section_info(idstr: str, instance_id: int, version_id: int) -> bytes:
    try:
        raw = idstr.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"idstr {idstr!r} is not ASCII") from None
    if not 1 <= len(raw) <= MAX_IDSTR_BYTES:
        raise ValueError(f"idstr must be 1..{MAX_IDSTR_BYTES} bytes, {idstr!r} is {len(raw)}")
    return (U8.pack(len(raw)) + raw
            + SECTION_INFO.pack(_u32("instance id", instance_id), _u32("version id", version_id)))


class ProgressTimeout(TransportError):
    """The peer made no progress: the stream header or a record did not arrive whole within
    the reader's progress timeout, however many of its bytes trickled in."""

    def __init__(self, message: str, offset: int):
        self.offset = offset
        super().__init__(message)


class StreamReader:
    """Reads and checks the stream from a channel, tracking the absolute offset.

    Call :meth:`read_header` once, then :meth:`next_record` and
    :meth:`read_payload` (or :meth:`skip_payload`) for each record until EOF.
    A stream that ends early is a :class:`StreamError`; a connection that
    breaks (reset, timeout) stays a :class:`~pymig.errors.TransportError`.

    ``progress_timeout`` (seconds, None: none): the header, and each record from its
    header through its footer, must arrive within that long of :meth:`read_header` /
    :meth:`next_record` being called, or :class:`ProgressTimeout` is raised.  The clock
    starts when the reader asks, so time the caller spends between records (building a
    guest, loading state) is not the peer's.  It sets the channel's receive deadline.
    """

    def __init__(self, channel: Channel, *, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 progress_timeout: float | None = None):
        if progress_timeout is not None and not progress_timeout > 0:
            raise ValueError(f"a progress timeout must be positive or None, not "
                             f"{progress_timeout!r}")
        self.channel = channel
        self.max_payload = max_payload
        self.progress_timeout = progress_timeout
        #: Bytes of the stream consumed so far (= offset of the next byte).
        self.offset = 0
        self.version: int | None = None
        self._scratch = bytearray(MAX_IDSTR_BYTES + FOOTER_BYTES)
        self._buf = bytearray(0)
        self._hasher = xxhash.xxh3_64()
        self._pending: RecordHeader | None = None

    # --- low level --------------------------------------------------------------------------
    def _read(self, view: memoryview, what: str | Callable[[], str]) -> memoryview:
        """Fill ``view`` from the channel; a premature end is a StreamError at that offset.
        ``what`` names the part being read, or is a function that does: messages are only
        built for errors, not for every record of a healthy stream."""
        try:
            self.channel.recv_into(view)
        except PeerClosedError as exc:
            if callable(what):
                what = what()
            raise StreamError(self.offset + exc.received,
                              f"stream truncated in {what}: {exc.received} of {len(view)} bytes "
                              f"arrived before the end of the stream") from exc
        except DeadlineExceeded as exc:
            if callable(what):
                what = what()
            raise ProgressTimeout(
                f"{self.channel.name} made no progress for {self.progress_timeout:g} s (the "
                f"progress timeout): nothing whole arrived; {exc.received} of {len(view)} bytes "
                f"of {what} came in that time", self.offset + exc.received) from None
        self.offset += len(view)
        return view

    def _start_clock(self) -> None:
        """The next unit (the header, or a record) must arrive within the progress timeout
        of now."""
        if self.progress_timeout is not None:
            self.channel.set_recv_deadline(time.monotonic() + self.progress_timeout)

    def _small(self, nbytes: int, what: str | Callable[[], str]) -> memoryview:
        return self._read(memoryview(self._scratch)[:nbytes], what)

    # --- stream header ----------------------------------------------------------------------
    def read_header(self) -> int:
        """Read and check the stream header; returns the stream version."""
        self._start_clock()
        raw = self._small(HEADER_BYTES, "the stream header")
        magic, version, flags = HEADER.unpack(raw)
        if magic != MAGIC:
            if magic[0] == TLS_HANDSHAKE_RECORD and magic[1] == 3:
                raise StreamError(0, "the source speaks TLS (the stream starts with a TLS "
                                     "handshake), but this destination has no tls-creds: "
                                     "start it with --tls-creds DIR, or set tls-creds before "
                                     "migrate-incoming")
            raise StreamError(0, f"not a pymig migration stream (starts with {bytes(magic)!r}, "
                                 f"expected {MAGIC!r})")
        if version != VERSION:
            raise StreamError(8, f"unsupported stream version {version}; this pymig reads "
                                 f"version {VERSION}")
        if flags:
            raise StreamError(12, f"unsupported stream flags 0x{flags:08x}; version {VERSION} "
                                  "defines none")
        self.version = version
        return version

    # --- records ----------------------------------------------------------------------------
    def next_record(self) -> RecordHeader:
        """Read the next record's header (and, for an empty payload, its footer)."""
        if self._pending is not None:
            if self._pending.payload_len:
                raise RuntimeError("read_payload() or skip_payload() must come before "
                                   "the next next_record()")
            self._pending = None
        self._start_clock()
        start = self.offset
        try:
            head = self._small(RECORD_HEAD.size,
                               lambda: f"the header of the record at byte {start}")
        except StreamError as exc:
            if exc.offset == start:
                raise StreamError(start, "stream ended without an EOF record") from exc.__cause__
            raise
        rtype, flags, reserved, section_id = RECORD_HEAD.unpack(head)
        if rtype not in _TYPES:
            raise StreamError(start, f"unknown record type 0x{rtype:02x}")
        rtype = _TYPES[rtype]
        if flags & ~KNOWN_FLAGS:
            raise StreamError(start + 1, f"unknown flags 0x{flags:02x} in the {rtype.name} "
                                         f"record at byte {start}")
        if reserved:
            raise StreamError(start + 2, f"reserved field is 0x{reserved:04x}, expected 0, in "
                                         f"the {rtype.name} record at byte {start}")
        hasher = self._hasher
        hasher.reset()
        hasher.update(head)
        idstr = instance_id = version_id = None

        def what() -> str:
            return f"the header of the {rtype.name} record at byte {start}"

        if rtype in _NAMED:
            raw_idstr_len = self._small(1, what)
            hasher.update(raw_idstr_len)
            idstr_len = raw_idstr_len[0]
            if idstr_len == 0:
                raise StreamError(self.offset - 1, f"empty idstr in {what()}")
            raw = self._small(idstr_len, what)
            hasher.update(raw)
            try:
                idstr = bytes(raw).decode("ascii")
            except UnicodeDecodeError:
                raise StreamError(self.offset - idstr_len,
                                  f"idstr {bytes(raw)!r} in {what()} is not ASCII") from None
            info = self._small(SECTION_INFO.size, what)
            hasher.update(info)
            instance_id, version_id = SECTION_INFO.unpack(info)
        len_offset = self.offset
        raw_len = self._small(U32.size, what)
        hasher.update(raw_len)
        (payload_len,) = U32.unpack(raw_len)
        if rtype in (RecordType.EOF, RecordType.CANCEL) and section_id:
            raise StreamError(start + 4, f"the {rtype.name} record carries section id "
                                         f"{section_id}; it must be 0")
        if rtype is RecordType.EOF and payload_len:
            raise StreamError(len_offset, f"the EOF record declares a {payload_len}-byte "
                                          "payload; it must be empty")
        if rtype is RecordType.CANCEL and payload_len > MAX_CANCEL_BYTES:
            raise StreamError(len_offset, f"the CANCEL record declares a {payload_len}-byte "
                                          f"reason; at most {MAX_CANCEL_BYTES}")
        if payload_len > self.max_payload:
            raise StreamError(len_offset, f"payload length {payload_len} of the {rtype.name} "
                                          f"record at byte {start} exceeds the limit of "
                                          f"{self.max_payload} bytes")
        header = RecordHeader(rtype, flags, section_id, idstr, instance_id, version_id,
                              payload_len, start)
        self._pending = header
        if payload_len == 0:
            self._check_footer(header)
        if rtype is RecordType.CANCEL:
            self._cancelled(header)
        return header

    def _cancelled(self, header: RecordHeader) -> None:
        """A whole CANCEL record: raise what it says."""
        payload = self.read_payload() if header.payload_len else memoryview(b"")
        try:
            reason = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StreamError(self.offset - FOOTER_BYTES - len(payload) + exc.start,
                              f"the reason of the {header.describe()} is not UTF-8") from None
        raise SourceCancelled(reason, header.offset)

    def read_payload(self, into=None) -> memoryview:
        """Read the pending record's payload and check its footer.

        Without ``into`` the payload lands in a buffer the reader owns and
        reuses: the view is valid until the next :meth:`read_payload`.  With
        ``into`` (any writable buffer at least ``payload_len`` long) it lands
        there and the view covers its first ``payload_len`` bytes.
        """
        header = self._pending
        if header is None:
            raise RuntimeError("no record payload to read: call next_record() first")
        self._pending = None
        size = header.payload_len
        if size == 0:
            return memoryview(b"")
        if into is None:
            if len(self._buf) < size:
                # Replace rather than resize: a caller may still hold a view of the old one.
                self._buf = bytearray(size)
            view = memoryview(self._buf)[:size]
        else:
            view = byte_view(into)
            if view.readonly:
                raise TypeError("read_payload(into=...) needs a writable buffer")
            if len(view) < size:
                raise ValueError(f"buffer of {len(view)} bytes is too small for the "
                                 f"{size}-byte payload of the {header.describe()}")
            view = view[:size]
        self._read(view, lambda: f"the payload of the {header.describe()}")
        if not header.nocsum:
            self._hasher.update(view)
        self._check_footer(header)
        return view

    def skip_payload(self) -> None:
        """Read and check the pending record without keeping its payload."""
        self.read_payload()

    def _check_footer(self, header: RecordHeader) -> None:
        at = self.offset
        raw = self._small(FOOTER_BYTES, lambda: f"the footer of the {header.describe()}")
        marker, section_id, checksum = FOOTER.unpack(raw)
        if marker != FOOTER_MAGIC:
            raise StreamError(at, f"footer marker of the {header.describe()} is {marker!r}, "
                                  f"expected {FOOTER_MAGIC!r}")
        if section_id != header.section_id:
            raise StreamError(at + 4, f"footer of the {header.describe()} names section "
                                      f"{section_id}")
        computed = self._hasher.intdigest()
        if checksum != computed:
            covered = "header" if header.nocsum else "header and payload"
            raise StreamError(at + 8, f"checksum mismatch over the {covered} of the "
                                      f"{header.describe()}: stored 0x{checksum:016x}, "
                                      f"computed 0x{computed:016x}")


# --- return path ------------------------------------------------------------------------------

RP_HEAD = struct.Struct("<HHI")  # type, reserved, len
RP_HEAD_BYTES = RP_HEAD.size  # 8
#: Longest return-path payload (LOAD_ERROR text is cut to fit).
MAX_RETURN_PAYLOAD = 4096


class ReturnType(IntEnum):
    READY = 1  # the destination read the stream header and is loading
    LOAD_ERROR = 2  # loading failed: utf-8 text
    ACK = 3  # the destination runs the guest: u64 vcpu_start_ns, u64 sent_ns
    PAGE_REQUEST = 4  # u32 block_id, u64 first_page, u32 npages (post-copy)
    PING = 5  # u32 id
    PONG = 6  # u32 id, echoing a PING
    SHUT = 7  # the destination is closing the return path
    LOADED = 8  # the destination loaded everything and waits for COMMIT before starting
    COMMIT = 9  # source to destination, on the stream's channel: start the guest now
    CAUGHT_UP = 10  # u64 stream offset: everything before it is loaded, nothing more waits
    PROGRESS = 11  # u64 stream offset: everything before it is loaded (more may wait)
    CANCEL = 12  # source to destination, instead of COMMIT: the source gave up; utf-8 text


@dataclass(frozen=True)
class Ready:
    """The destination read the stream header and is loading."""

    TYPE: ClassVar[ReturnType] = ReturnType.READY
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<")


@dataclass(frozen=True)
class LoadError:
    """The destination failed to load the stream; ``text`` says why (the source's reader
    escapes what is not printable in it: :func:`printable`)."""

    text: str
    TYPE: ClassVar[ReturnType] = ReturnType.LOAD_ERROR
    FORMAT: ClassVar[None] = None  # variable length


@dataclass(frozen=True)
class Ack:
    """The destination's vCPUs run.  Both times are CLOCK_REALTIME in ns, so the source
    can compute the true downtime (its stop time to ``vcpu_start_ns``)."""

    vcpu_start_ns: int
    sent_ns: int
    TYPE: ClassVar[ReturnType] = ReturnType.ACK
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQ")


@dataclass(frozen=True)
class PageRequest:
    """The destination needs ``npages`` pages of block ``block_id`` from ``first_page``."""

    block_id: int
    first_page: int
    npages: int
    TYPE: ClassVar[ReturnType] = ReturnType.PAGE_REQUEST
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IQI")


@dataclass(frozen=True)
class Ping:
    id: int
    TYPE: ClassVar[ReturnType] = ReturnType.PING
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<I")


@dataclass(frozen=True)
class Pong:
    id: int
    TYPE: ClassVar[ReturnType] = ReturnType.PONG
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<I")


@dataclass(frozen=True)
class Shut:
    """The destination closes the return path; nothing follows."""

    TYPE: ClassVar[ReturnType] = ReturnType.SHUT
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<")


@dataclass(frozen=True)
class Loaded:
    """Every section loaded and checked; the destination waits for :class:`Commit`."""

    TYPE: ClassVar[ReturnType] = ReturnType.LOADED
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<")


@dataclass(frozen=True)
class Commit:
    """Sent by the source after LOADED, in the stream's direction: run the guest there.

    The two-step ending means a guest never runs twice: the destination starts only on COMMIT,
    and the source resumes its own copy only if it never sent one."""

    TYPE: ClassVar[ReturnType] = ReturnType.COMMIT
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<")


@dataclass(frozen=True)
class CaughtUp:
    """The destination has loaded the stream up to byte ``offset`` (counted from the stream
    header's first byte) and found nothing more waiting: what the source sent before that
    costs the downtime nothing."""

    offset: int
    TYPE: ClassVar[ReturnType] = ReturnType.CAUGHT_UP
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<Q")


@dataclass(frozen=True)
class Progress:
    """The destination has loaded the stream up to byte ``offset``; more may be waiting in
    its socket.  What the source sent is not what arrived: megabytes can wait in the socket
    buffers of a destination slower than its source, so only this says how fast the
    destination really takes pages in."""

    offset: int
    TYPE: ClassVar[ReturnType] = ReturnType.PROGRESS
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<Q")


@dataclass(frozen=True)
class Cancel:
    """Sent by the source after LOADED instead of :class:`Commit`, on the stream's channel:
    the source gives the migration up (``text``: why, possibly empty); the destination
    discards its guest."""

    text: str
    TYPE: ClassVar[ReturnType] = ReturnType.CANCEL
    FORMAT: ClassVar[None] = None  # variable length


ReturnMessage = (Ready | LoadError | Ack | PageRequest | Ping | Pong | Shut | Loaded | Commit
                 | CaughtUp | Progress | Cancel)
_MESSAGES = {cls.TYPE: cls for cls in (Ready, LoadError, Ack, PageRequest, Ping, Pong, Shut,
                                       Loaded, Commit, CaughtUp, Progress, Cancel)}
#: Messages whose payload is UTF-8 text, and the most each carries.
_TEXT_LIMITS = {LoadError: MAX_RETURN_PAYLOAD, Cancel: MAX_CANCEL_BYTES}


def encode_return(message: ReturnMessage) -> bytes:
    """The bytes of one return-path message."""
    if type(message) in _TEXT_LIMITS:
        payload = _cut_utf8(message.text, _TEXT_LIMITS[type(message)])
    else:
        values = [getattr(message, f.name) for f in fields(message)]
        try:
            payload = message.FORMAT.pack(*values)
        except struct.error as exc:
            raise ValueError(f"{message!r} does not fit the wire format: {exc}") from None
    return RP_HEAD.pack(message.TYPE, 0, len(payload)) + payload


def printable(text: str) -> str:
    """``text`` with every character that is not printable (controls such as ESC and newline,
    separators, unassigned code points) written as its escape: what a peer says reaches the
    operator's terminal and logs, and must not be able to move the cursor or fake a line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _cut_utf8(text: str, limit: int) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def _require_return_path(channel: Channel) -> None:
    if not channel.has_return_path:
        raise TransportError(f"{channel.name} has no return path (exec:, file: and pipes carry "
                             "one direction only)")


class ReturnPathWriter:
    """The destination's sender of return-path messages; safe to use from several threads."""

    def __init__(self, channel: Channel):
        _require_return_path(channel)
        self.channel = channel
        self._lock = threading.Lock()

    def send(self, message: ReturnMessage) -> None:
        data = encode_return(message)
        with self._lock:
            self.channel.send(data)

    def ready(self) -> None:
        self.send(Ready())

    def load_error(self, text: str) -> None:
        self.send(LoadError(text))

    def ack(self, vcpu_start_ns: int, sent_ns: int | None = None) -> None:
        """Acknowledge the switchover; ``sent_ns`` defaults to now (CLOCK_REALTIME)."""
        self.send(Ack(vcpu_start_ns, time.time_ns() if sent_ns is None else sent_ns))

    def page_request(self, block_id: int, first_page: int, npages: int) -> None:
        self.send(PageRequest(block_id, first_page, npages))

    def ping(self, ping_id: int) -> None:
        self.send(Ping(ping_id))

    def pong(self, ping_id: int) -> None:
        self.send(Pong(ping_id))

    def shut(self) -> None:
        self.send(Shut())

    def caught_up(self, offset: int) -> None:
        self.send(CaughtUp(offset))

    def progress(self, offset: int) -> None:
        self.send(Progress(offset))

    def loaded(self) -> None:
        self.send(Loaded())

    def commit(self) -> None:
        self.send(Commit())

    def cancel(self, text: str = "") -> None:
        self.send(Cancel(text))


class ReturnPathReader:
    """The source's reader of return-path messages (one thread reads)."""

    def __init__(self, channel: Channel):
        _require_return_path(channel)
        self.channel = channel
        #: Bytes of the return path consumed so far.
        self.offset = 0
        self._head = bytearray(RP_HEAD_BYTES)

    def _read(self, view: memoryview, what: str, start: int) -> None:
        try:
            self.channel.recv_into(view)
        except PeerClosedError as exc:
            if exc.received == 0 and self.offset == start:
                raise  # closed between messages: the peer went away, nothing malformed
            raise StreamError(self.offset + exc.received,
                              f"return path truncated in {what} at byte {start}: "
                              f"{exc.received} of {len(view)} bytes arrived") from exc
        self.offset += len(view)

    def recv(self, timeout: float | None = None) -> ReturnMessage | None:
        """The next message, or None if none began within ``timeout`` seconds.

        A return path the destination closed between messages raises
        :class:`~pymig.transport.channel.PeerClosedError` (a TransportError); a
        malformed or truncated message raises :class:`StreamError`.
        """
        if timeout is not None and not self.channel.wait_readable(timeout):
            return None
        start = self.offset
        head = memoryview(self._head)
        self._read(head, "a message header", start)
        rtype, reserved, length = RP_HEAD.unpack(head)
        cls = _MESSAGES.get(rtype)
        if cls is None:
            raise StreamError(start, f"unknown return-path message type {rtype}")
        if reserved:
            raise StreamError(start + 2, f"reserved field of the {cls.TYPE.name} message is "
                                         f"0x{reserved:04x}, expected 0")
        expected = cls.FORMAT.size if cls.FORMAT is not None else None
        limit = _TEXT_LIMITS.get(cls, MAX_RETURN_PAYLOAD)
        if (expected is not None and length != expected) or length > limit:
            want = f"{expected}" if expected is not None else f"at most {limit}"
            raise StreamError(start + 4, f"{cls.TYPE.name} message declares {length} payload "
                                         f"bytes; expected {want}")
        payload = bytearray(length)
        if length:
            self._read(memoryview(payload), f"the {cls.TYPE.name} message", start)
        if cls in _TEXT_LIMITS:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise StreamError(start + RP_HEAD_BYTES + exc.start,
                                  f"{cls.TYPE.name} text is not valid UTF-8") from None
            return cls(printable(text))
        return cls(*cls.FORMAT.unpack(payload))
