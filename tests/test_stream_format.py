"""The migration stream: every record type round-trips; every malformation is a StreamError
naming the right offset."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from pymig.errors import SourceCancelled, StreamError
from pymig.stream import (DEFAULT_MAX_PAYLOAD, FOOTER_BYTES, HEADER_BYTES, MAGIC,
                          MAX_CANCEL_BYTES, RecordType, StreamReader, StreamWriter)
from pymig.transport import BytesChannel

from _wire_helpers import (SAMPLE_RECORDS, SOCKET_KINDS, Background, channel_pair,
                           expected_records, read_stream, sample_stream, write_records)

HEADER = MAGIC + struct.pack("<II", 1, 0)


def parse_all(data: bytes, **kw) -> list[tuple]:
    """Every record of a complete stream, in the shape of expected_records()."""
    return read_stream(StreamReader(BytesChannel(data), **kw))


def record(rtype: int, section_id: int, payload: bytes = b"", *, flags: int = 0,
           reserved: int = 0, info: bytes = b"", footer_id: int | None = None,
           marker: bytes = b"PMFT", payload_len: int | None = None) -> bytes:
    """A record built by hand, with a correct checksum unless told otherwise."""
    head = (struct.pack("<BBHI", rtype, flags, reserved, section_id) + info
            + struct.pack("<I", len(payload) if payload_len is None else payload_len))
    covered = head if flags & 1 else head + payload
    footer = struct.pack("<4sIQ", marker, section_id if footer_id is None else footer_id,
                         xxhash.xxh3_64_intdigest(covered))
    return head + payload + footer


def named(idstr: bytes, instance_id: int = 0, version_id: int = 1) -> bytes:
    return bytes([len(idstr)]) + idstr + struct.pack("<II", instance_id, version_id)


EOF = record(0x0F, 0)


def error_of(data: bytes, **kw) -> StreamError:
    with pytest.raises(StreamError) as info:
        parse_all(data, **kw)
    return info.value


# --- round trips ----------------------------------------------------------------------------

def test_round_trip_in_memory():
    assert parse_all(sample_stream()) == expected_records()


@pytest.mark.parametrize("kind", SOCKET_KINDS)
def test_round_trip_over_sockets(kind, tmp_path):
    big = np.random.default_rng(1).integers(0, 2**63, size=(3 << 20) // 8, dtype=np.uint64)
    records = SAMPLE_RECORDS[:-1] + [("part", (9, big)), ("part", (9, [big[:5], big[5:]]),
                                                        {"nocsum": True})] + SAMPLE_RECORDS[-1:]
    with channel_pair(kind, tmp_path) as (src, dst):
        writer = StreamWriter(src)
        sending = Background(write_records, writer, records)
        reader = StreamReader(dst)
        got = read_stream(reader)
        sending.result()
    assert got == expected_records(records)
    assert writer.bytes_written == src.bytes_sent == reader.offset == dst.bytes_received


def test_layout_of_each_structure_byte_for_byte():
    ch = BytesChannel()
    w = StreamWriter(ch)
    w.write_header()
    w.full(5, "cpu", 2, 3, b"abc")
    w.part(5, b"xy", nocsum=True)
    w.eof()
    data = ch.getvalue()
    assert data[:16] == b"PYMIGSTR\x01\x00\x00\x00\x00\x00\x00\x00"
    full = data[16:16 + 8 + 1 + 3 + 8 + 4 + 3 + 16]
    assert full[:8] == bytes([4, 0, 0, 0, 5, 0, 0, 0])
    assert full[8:20] == b"\x03cpu" + struct.pack("<II", 2, 3)
    assert full[20:27] == struct.pack("<I", 3) + b"abc"
    assert full[27:35] == b"PMFT" + struct.pack("<I", 5)
    assert full[35:43] == struct.pack("<Q", xxhash.xxh3_64_intdigest(full[:27]))
    part = data[16 + len(full):16 + len(full) + 12 + 2 + 16]
    assert part[:14] == bytes([2, 1, 0, 0, 5, 0, 0, 0, 2, 0, 0, 0]) + b"xy"
    assert part[-8:] == struct.pack("<Q", xxhash.xxh3_64_intdigest(part[:12]))  # header only
    assert data[-28:] == EOF == bytes([0x0F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + b"PMFT" + \
        bytes(4) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes([0x0F]) + bytes(11)))
    assert len(data) == w.bytes_written


class _Recorder(BytesChannel):
    """Keeps the buffers the writer hands to the channel."""

    def __init__(self):
        super().__init__(name="recorder")
        self.vectors = []

    def _send_vector(self, views):
        self.vectors.append(views)

    def _send_all(self, view):
        self.vectors.append([view])


def test_payload_reaches_the_channel_without_a_copy():
    payload = bytearray(1 << 20)
    pieces = [np.zeros(4096, dtype=np.uint8), bytearray(100)]
    ch = _Recorder()
    w = StreamWriter(ch)
    w.part(1, payload)
    w.part(1, pieces, nocsum=True)
    (head, body, footer), (_, p0, p1, _) = ch.vectors
    assert body.obj is payload and len(head) == 12 and len(footer) == FOOTER_BYTES
    assert p0.obj is pieces[0]
    assert p1.obj is pieces[1]


def test_held_records_go_out_together_in_order_and_big_ones_at_once():
    """hold(): the stop-and-copy's small records leave in one write at EOF; a record too big
    to copy goes out at once, after the ones held before it; the bytes are the same stream."""
    small, big = bytes(range(200)), bytearray(b"\x07" * (1 << 20))
    plain, held = BytesChannel(), _Recorder()
    for channel, hold in ((plain, False), (held, True)):
        w = StreamWriter(channel)
        w.write_header()
        w.part(1, small)
        if hold:
            w.hold()
        w.part(1, small)
        w.full(2, "cpu", 0, 1, small)
        w.end(1, big)
        w.full(3, "serial", 0, 1, small)
        w.eof()
    writes = [b"".join(bytes(v) for v in vector) for vector in held.vectors]
    assert b"".join(writes) == plain.getvalue()
    # the header, the record before hold(), the two held ones, the big one, the rest and EOF
    header, before, held_first, big_record, held_last = writes
    assert len(before) == 12 + len(small) + FOOTER_BYTES
    assert held_first[0] == RecordType.PART and b"cpu" in held_first
    assert held.vectors[3][1].obj is big  # sent as given, not copied
    assert b"serial" in held_last and held_last[-12 - FOOTER_BYTES] == RecordType.EOF


def test_reader_reuses_its_buffer_or_fills_the_callers():
    ch = BytesChannel()
    w = StreamWriter(ch)
    w.write_header()
    for i in range(3):
        w.part(1, bytes([i]) * 1000)
    w.part(1, b"z" * 10)
    w.eof()
    r = StreamReader(ch)
    r.read_header()
    r.next_record()
    first = r.read_payload()
    r.next_record()
    second = r.read_payload()
    assert second.obj is first.obj and bytes(second) == b"\x01" * 1000
    target = np.zeros(2000, dtype=np.uint8)
    r.next_record()
    view = r.read_payload(into=target)
    assert len(view) == 1000 and target[:1000].tolist() == [2] * 1000 and target[1000] == 0
    r.next_record()
    with pytest.raises(ValueError, match="too small"):
        r.read_payload(into=bytearray(5))


def test_reader_insists_on_reading_each_payload():
    r = StreamReader(BytesChannel(sample_stream()))
    r.read_header()
    r.next_record()
    with pytest.raises(RuntimeError, match="read_payload"):
        r.next_record()
    r.skip_payload()
    assert r.next_record().type is RecordType.PART
    r.read_payload()
    with pytest.raises(RuntimeError, match="next_record"):
        r.read_payload()


def test_empty_payload_records_are_complete_after_next_record():
    data = HEADER + record(3, 7) + EOF
    r = StreamReader(BytesChannel(data))
    r.read_header()
    h = r.next_record()
    assert (h.type, h.payload_len, r.offset) == (RecordType.END, 0, 16 + 12 + 16)
    assert bytes(r.read_payload()) == b""
    assert r.next_record().type is RecordType.EOF  # read_payload of an empty one is optional


@pytest.mark.parametrize("call, message", [
    (lambda w: w.full(1, "", 0, 0), "idstr must be 1..255"),
    (lambda w: w.full(1, "x" * 256, 0, 0), "idstr must be 1..255"),
    (lambda w: w.start(1, "gerät", 0, 0), "not ASCII"),
    (lambda w: w.part(1 << 32), "section id"),
    (lambda w: w.start(1, "ram", -1, 0), "instance id"),
    (lambda w: w.start(1, "ram", 0, 1 << 32), "version id"),
])
def test_writer_refuses_what_the_format_cannot_hold(call, message):
    with pytest.raises(ValueError, match=message):
        call(StreamWriter(BytesChannel()))


# --- malformed streams: each error names the offset of the bad byte -------------------------

def test_bad_magic():
    e = error_of(b"QEVM\x00\x00\x00\x03" + bytes(8) + EOF)
    assert e.offset == 0 and "not a pymig migration stream" in e.reason


def test_wrong_version_names_both():
    e = error_of(MAGIC + struct.pack("<II", 7, 0) + EOF)
    assert e.offset == 8 and "version 7" in e.reason and "version 1" in e.reason


def test_unknown_stream_flags():
    e = error_of(MAGIC + struct.pack("<II", 1, 4) + EOF)
    assert e.offset == 12 and "flags" in e.reason


def test_unknown_record_type():
    e = error_of(HEADER + record(2, 1, b"ok") + record(9, 1, b"??") + EOF)
    assert e.offset == 16 + 12 + 2 + 16 and "unknown record type 0x09" in e.reason


def test_unknown_record_flag_and_reserved_field():
    assert error_of(HEADER + record(2, 1, b"a", flags=0x80) + EOF).offset == 17
    e = error_of(HEADER + record(2, 1, b"a", reserved=1) + EOF)
    assert e.offset == 18 and "reserved" in e.reason


def test_footer_id_mismatch():
    e = error_of(HEADER + record(2, 3, b"abcd", footer_id=4) + EOF)
    assert e.offset == 16 + 12 + 4 + 4 and "names section 4" in e.reason


def test_footer_marker_missing():
    e = error_of(HEADER + record(3, 3, b"abcd", marker=b"XXXX") + EOF)
    assert e.offset == 16 + 12 + 4 and "footer marker" in e.reason


@pytest.mark.parametrize("where, offset", [
    (16 + 4, 16 + 12 + 5 + 4),  # section id in the header: the footer disagrees
    (16 + 1, 16 + 1),  # flags: an unknown flag
    (16 + 12 + 2, 16 + 12 + 5 + 8),  # payload byte
    (16 + 12 + 5 + 1, 16 + 12 + 5),  # footer marker
    (16 + 12 + 5 + 4, 16 + 12 + 5 + 4),  # footer section id
    (16 + 12 + 5 + 13, 16 + 12 + 5 + 8),  # checksum
])
def test_flipped_bit_in_header_payload_footer(where, offset):
    data = bytearray(HEADER + record(2, 1, b"hello") + EOF)
    data[where] ^= 0x10
    e = error_of(bytes(data))
    assert e.offset == offset, e


def test_flipped_bit_in_payload_length():
    data = bytearray(HEADER + record(2, 1, b"hello") + record(3, 1, b"bye") + EOF)
    data[16 + 8] ^= 0x08  # 5 -> 13: the footer is looked for inside the next record
    e = error_of(bytes(data))
    assert e.offset == 16 + 12 + 13 and "footer marker" in e.reason
    data[16 + 8] ^= 0x08 | 0x40  # 5 -> 69: the reader runs off the end of the stream
    e = error_of(bytes(data))
    assert e.offset == len(data) and "truncated" in e.reason


def test_nocsum_record_checks_its_header_but_not_its_payload():
    clean = HEADER + record(2, 1, b"RAMPACKET", flags=1) + EOF
    payload_flip = bytearray(clean)
    payload_flip[16 + 12] ^= 1  # the payload's own checksum is someone else's job
    assert parse_all(bytes(payload_flip))[0][5] == b"SAMPACKET"
    header_flip = bytearray(clean)
    header_flip[16 + 5] ^= 1  # section id
    e = error_of(bytes(header_flip))
    assert "names section" in e.reason
    sid_flip = bytearray(clean)
    sid_flip[16 + 4] ^= 1
    sid_flip[16 + 12 + 9 + 4] ^= 1  # footer agrees: only the checksum can tell
    e = error_of(bytes(sid_flip))
    assert e.offset == 16 + 12 + 9 + 8 and "checksum mismatch over the header of" in e.reason


def test_oversize_payload_is_refused_before_reading_it():
    data = HEADER + record(2, 1, payload_len=0xFFFF_FFFF)[:12]  # nothing follows the length
    e = error_of(data)
    assert e.offset == 16 + 8 and f"exceeds the limit of {DEFAULT_MAX_PAYLOAD}" in e.reason
    e = error_of(HEADER + record(2, 1, b"x" * 100) + EOF, max_payload=99)
    assert e.offset == 16 + 8 and "payload length 100" in e.reason


def test_bad_idstr():
    e = error_of(HEADER + record(1, 1, info=b"\x00" + bytes(8)) + EOF)
    assert e.offset == 16 + 8 and "empty idstr" in e.reason
    e = error_of(HEADER + record(4, 1, info=named(b"ger\xe4t")) + EOF)
    assert e.offset == 16 + 9 and "not ASCII" in e.reason


def test_bad_eof_record():
    e = error_of(HEADER + record(0x0F, 2))
    assert e.offset == 16 + 4 and "must be 0" in e.reason
    e = error_of(HEADER + record(0x0F, 0, b"x"))
    assert e.offset == 16 + 8 and "must be empty" in e.reason


def test_a_cancel_record_ends_the_stream_with_the_sources_reason():
    channel = BytesChannel()
    writer = StreamWriter(channel)
    writer.write_header()
    writer.full(1, "serial", 0, 1, b"state")
    at = writer.bytes_written
    writer.cancel("cancelled-by-limit: max-total-time " + "é" * 2000)  # cut to 1024 bytes
    data = channel.getvalue()
    assert data[at] == RecordType.CANCEL == 0x0E
    reader = StreamReader(BytesChannel(data))
    reader.read_header()
    reader.next_record()
    reader.read_payload()
    with pytest.raises(SourceCancelled) as info:
        reader.next_record()
    assert info.value.offset == at
    assert info.value.reason.startswith("cancelled-by-limit: max-total-time é")
    assert len(info.value.reason.encode()) <= MAX_CANCEL_BYTES
    assert str(info.value).startswith("the source cancelled the migration: cancelled-by-limit")


def test_a_writer_sends_no_cancel_after_eof_or_a_failed_send():
    writer = StreamWriter(BytesChannel())
    writer.write_header()
    writer.eof()
    with pytest.raises(RuntimeError):
        writer.cancel("late")


def test_bad_cancel_records():
    e = error_of(HEADER + record(0x0E, 3, b"why"))
    assert e.offset == 16 + 4 and "must be 0" in e.reason
    e = error_of(HEADER + record(0x0E, 0, b"x" * (MAX_CANCEL_BYTES + 1)))
    assert e.offset == 16 + 8 and "at most 1024" in e.reason
    e = error_of(HEADER + record(0x0E, 0, b"bad \xff"))
    assert e.offset == 16 + 12 + 4 and "not UTF-8" in e.reason


def test_a_record_type_a_reader_does_not_know_is_refused_at_its_offset():
    """How a destination older than a record type (CANCEL, say) meets it: a StreamError at
    the record, nothing loaded past it."""
    e = error_of(HEADER + record(0x0D, 0, b"new") + EOF)
    assert e.offset == 16 and "unknown record type 0x0d" in e.reason


def test_stream_without_eof():
    data = HEADER + record(4, 1, b"state", info=named(b"serial"))
    e = error_of(data)
    assert e.offset == len(data) and "without an EOF record" in e.reason


# --- property tests over generated streams --------------------------------------------------

_payloads = st.binary(max_size=40)
_idstrs = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                  max_size=12)
_u32 = st.integers(0, 0xFFFF_FFFF)
_records = st.lists(st.one_of(
    st.tuples(st.just("start"), st.tuples(_u32, _idstrs, _u32, _u32, _payloads)),
    st.tuples(st.just("part"), st.tuples(_u32, _payloads)),
    st.tuples(st.just("end"), st.tuples(_u32, _payloads)),
    st.tuples(st.just("full"), st.tuples(_u32, _idstrs, _u32, _u32, _payloads)),
), max_size=4).map(lambda rs: rs + [("eof", ())])


@given(_records)
def test_generated_streams_round_trip(records):
    assert parse_all(sample_stream(records)) == expected_records(records)


@given(_records)
def test_truncation_at_every_offset_is_reported_at_that_offset(records):
    data = sample_stream(records)
    for cut in range(len(data)):
        with pytest.raises(StreamError) as info:
            parse_all(data[:cut])
        assert info.value.offset == cut, (cut, info.value)
        assert ("truncated" in info.value.reason
                or "without an EOF record" in info.value.reason), info.value


@given(_records, st.data())
def test_any_flipped_bit_is_detected(records, data):
    stream = bytearray(sample_stream(records))
    position = data.draw(st.integers(HEADER_BYTES, len(stream) - 1), label="byte")
    stream[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(StreamError) as info:
        parse_all(bytes(stream))
    # The error is never reported before the record that holds the flipped bit.
    starts = _record_starts(records)
    assert info.value.offset >= max(s for s in starts if s <= position)


def _record_starts(records) -> list[int]:
    starts, offset = [], HEADER_BYTES
    for rec in records:
        starts.append(offset)
        offset += len(sample_stream([rec])) - HEADER_BYTES
    return starts


@given(st.binary(min_size=16, max_size=16))
def test_random_stream_headers_are_refused_unless_exact(header):
    if header == HEADER:
        return
    with pytest.raises(StreamError):
        StreamReader(BytesChannel(header)).read_header()


def test_held_records_go_out_once_they_add_up_to_64_kib():
    """In the stop-and-copy the writer holds small records back for one write at EOF, but a
    compressed last pass is MBs of RAM in KBs of records: those go out as they gather, so the
    destination decodes while the source still encodes.  The stream is the same either way."""
    from pymig.stream import HOLD_RECORD_BYTES, StreamWriter

    sizes = []

    class Counting(BytesChannel):
        def _send_all(self, view):
            sizes.append(len(view))
            super()._send_all(view)

        def _send_vector(self, views):
            sizes.append(sum(len(v) for v in views))
            super()._send_vector(views)

    held, plain = Counting(), BytesChannel()
    for channel, hold in ((held, True), (plain, False)):
        writer = StreamWriter(channel)
        writer.write_header()
        writer.start(1, "ram", 0, 1, b"blocks")
        if hold:
            sizes.clear()
            writer.hold()
        for i in range(40):  # 40 records of 5 KB: 200 KB
            writer.part(1, bytes([i]) * 5000)
        if hold:
            assert 2 <= len(sizes) <= 3 and all(n >= HOLD_RECORD_BYTES for n in sizes), sizes
        writer.end(1)
        writer.eof()
    assert held.getvalue() == plain.getvalue()
    assert len(sizes) <= 4  # 42 records in a handful of writes: the rest came with EOF


def test_held_records_that_stand_for_a_mib_of_guest_ram_go_out_at_once():
    """A compressed RAM packet is a few KB on the wire and a MiB of pages to decode: held
    until EOF, the destination would decode the whole last pass inside the downtime after the
    source had encoded it.  Records that stand for HOLD_GUEST_BYTES go out as they add up."""
    from pymig.stream import HOLD_GUEST_BYTES, HOLD_RECORD_BYTES, StreamWriter

    sizes = []

    class Counting(BytesChannel):
        def _send_all(self, view):
            sizes.append(len(view))
            super()._send_all(view)

    writer = StreamWriter(Counting())
    writer.write_header()
    writer.hold()
    sizes.clear()
    writer.part(1, b"x" * 5000, stands_for=HOLD_GUEST_BYTES // 2)
    writer.part(1, b"d" * 100)  # device state: stands for no guest RAM
    assert sizes == []  # half a MiB of RAM in 5 KB: still held
    writer.part(1, b"y" * 5000, stands_for=HOLD_GUEST_BYTES // 2)
    assert len(sizes) == 1 and sizes[0] < HOLD_RECORD_BYTES  # a MiB of RAM: out at once
    writer.part(1, b"z" * 5000, stands_for=HOLD_GUEST_BYTES - 1)
    assert len(sizes) == 1  # the count started again
    writer.eof()
    assert len(sizes) == 2
