"""Helpers shared by the transport and stream tests: connected channel pairs, a sample stream,
and whole streams taken apart into records and put together again."""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import Callable
from contextlib import contextmanager

from pymig import transport
from pymig.stream import RecordHeader, RecordType, StreamReader, StreamWriter
from pymig.transport import BytesChannel, Channel, SocketChannel

#: Every way to get a connected, full-duplex pair of channels on this machine.
SOCKET_KINDS = ["socketpair", "tcp4", "tcp6", "unix"]
#: Generous bound for any wait in a test that should take milliseconds.
WAIT_S = 20.0


@contextmanager
def channel_pair(kind: str, tmp_path) -> tuple[Channel, Channel]:
    """(source, destination) channels connected through ``kind``; closed afterwards."""
    if kind == "socketpair":
        a, b = socket.socketpair()
        pair = (SocketChannel(a, "socketpair:a"), SocketChannel(b, "socketpair:b"))
    else:
        uri = {"tcp4": "tcp:127.0.0.1:0", "tcp6": "tcp:[::1]:0",
               "unix": f"unix:{tmp_path}/mig.sock"}[kind]
        with transport.listen(uri) as listener:
            source = transport.connect(listener.uri, timeout=WAIT_S)
            pair = (source, listener.accept(WAIT_S))
    try:
        yield pair
    finally:
        for channel in pair:
            channel.close()


class Background:
    """Runs ``fn`` in a thread; :meth:`result` joins (bounded) and re-raises its exception."""

    def __init__(self, fn: Callable, *args):
        self._value = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn(*args)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = WAIT_S):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"background call did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value


_RNG = random.Random(20240607)  # fixed: a child process must build the same records

#: (method, args) for one record of every kind, with payloads of several shapes.
SAMPLE_RECORDS = [
    ("start", (1, "ram", 0, 4, b"setup-bytes")),
    ("part", (1, _RNG.randbytes(5000))),
    ("part", (1, [b"scatter", memoryview(b"-gather-"), bytearray(b"payload")])),
    ("part", (1, _RNG.randbytes(300)), {"nocsum": True}),
    ("part", (1, b"")),
    ("end", (1, b"final")),
    ("full", (2, "serial", 0, 1, b"\x00" * 64)),
    ("full", (3, "x" * 255, 0xFFFF_FFFF, 7, b"")),
    ("start", (4, "block", 1, 2)),
    ("end", (4,)),
    ("eof", ()),
]


def write_records(writer: StreamWriter, records=SAMPLE_RECORDS, header: bool = True) -> None:
    if header:
        writer.write_header()
    for method, args, *kw in records:
        getattr(writer, method)(*args, **(kw[0] if kw else {}))


def expected_records(records=SAMPLE_RECORDS) -> list[tuple]:
    """(type, section_id, idstr, instance_id, version_id, payload bytes, nocsum) per record."""
    out = []
    for method, args, *kw in records:
        rtype = RecordType[method.upper()]
        nocsum = bool(kw and kw[0].get("nocsum"))
        if rtype in (RecordType.START, RecordType.FULL):
            sid, idstr, inst, ver, *rest = args
            payload = rest[0] if rest else b""
        elif rtype is RecordType.EOF:
            sid, idstr, inst, ver, payload = 0, None, None, None, b""
        else:
            sid, *rest = args
            idstr = inst = ver = None
            payload = rest[0] if rest else b""
        if isinstance(payload, list):
            payload = b"".join(bytes(p) for p in payload)
        out.append((rtype, sid, idstr, inst, ver, bytes(payload), nocsum))
    return out


def sample_stream(records=SAMPLE_RECORDS) -> bytes:
    """The bytes of a complete stream holding ``records``."""
    channel = BytesChannel()
    write_records(StreamWriter(channel), records)
    return channel.getvalue()


def read_stream(reader: StreamReader) -> list[tuple]:
    """Read a whole stream (header to EOF) in the shape of expected_records()."""
    reader.read_header()
    out = []
    while True:
        h = reader.next_record()
        payload = bytes(reader.read_payload())
        out.append((h.type, h.section_id, h.idstr, h.instance_id, h.version_id, payload,
                    h.nocsum))
        if h.type is RecordType.EOF:
            return out


def page_data(packet: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the bytes of pages (NORMAL) or LZ4 blocks (COMPRESSED) in a RAM
    packet: what only the packet checksum protects (run records are checked one by one)."""
    page_size, count = struct.unpack_from("<II", packet, 12)
    spans, off = [], 32
    for _ in range(count):
        _, pages, kind = struct.unpack_from("<QIB", packet, off)
        off += 16
        size = {1: pages * page_size, 2: 0}.get(kind)
        if size is None:  # COMPRESSED: u32 length, u32 reserved, the block
            size = 8 + struct.unpack_from("<I", packet, off)[0]
            spans.append((off + 8, size - 8))
        elif size:
            spans.append((off, size))
        off += size
    return spans


def stream_records(data: bytes) -> list[tuple[RecordHeader, bytes]]:
    """Every record of a whole stream (header to EOF) with its payload."""
    reader = StreamReader(BytesChannel(data))
    reader.read_header()
    out = []
    while True:
        record = reader.next_record()
        out.append((record, bytes(reader.read_payload()) if record.payload_len else b""))
        if record.type is RecordType.EOF:
            return out


def stream_of(items: list[tuple[RecordHeader, bytes]]) -> bytes:
    """A whole stream of ``items`` (as stream_records() gives them, changed at will): every
    footer and checksum right, whatever the records say."""
    channel = BytesChannel()
    writer = StreamWriter(channel)
    writer.write_header()
    for record, payload in items:
        t = record.type
        if t is RecordType.EOF:
            writer.eof()
        elif t in (RecordType.START, RecordType.FULL):
            method = writer.start if t is RecordType.START else writer.full
            method(record.section_id, record.idstr, record.instance_id, record.version_id,
                   payload, nocsum=record.nocsum)
        else:
            method = writer.part if t is RecordType.PART else writer.end
            method(record.section_id, payload, nocsum=record.nocsum)
    return channel.getvalue()
