"""The return path: every message round-trips; malformed ones are StreamErrors with offsets."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from pymig.errors import StreamError, TransportError
from pymig.stream import (MAX_CANCEL_BYTES, MAX_RETURN_PAYLOAD, Ack, Cancel, CaughtUp, Commit,
                          LoadError, PageRequest, Ping, Pong, Progress, Ready,
                          ReturnPathReader, ReturnPathWriter, Shut, encode_return)
from pymig.transport import BytesChannel, PeerClosedError, SocketChannel

from _wire_helpers import SOCKET_KINDS, WAIT_S, channel_pair

MESSAGES = [
    Ready(),
    LoadError("section 'serial' v2: field 'ier' out of range — ünïcode ok"),
    LoadError(""),
    Ack(vcpu_start_ns=1_717_000_000_123_456_789, sent_ns=1_717_000_000_123_999_999),
    PageRequest(block_id=3, first_page=(1 << 40) + 5, npages=512),
    Ping(0),
    Pong(0xFFFF_FFFF),
    Shut(),
    CaughtUp(16),
    Progress((1 << 63) + 1),
    Commit(),
    Cancel("migrate_cancel"),
    Cancel(""),
]


@pytest.mark.parametrize("kind", SOCKET_KINDS)
def test_every_message_round_trips(kind, tmp_path):
    with channel_pair(kind, tmp_path) as (src, dst):
        writer, reader = ReturnPathWriter(dst), ReturnPathReader(src)
        for message in MESSAGES:
            writer.send(message)
        assert [reader.recv(timeout=WAIT_S) for _ in MESSAGES] == MESSAGES
        assert reader.offset == src.bytes_received == dst.bytes_sent


def test_layout():
    assert encode_return(Ready()) == bytes([1, 0, 0, 0, 0, 0, 0, 0])
    assert encode_return(Ping(7)) == struct.pack("<HHII", 5, 0, 4, 7)
    assert encode_return(Ack(1, 2)) == struct.pack("<HHIQQ", 3, 0, 16, 1, 2)
    assert encode_return(PageRequest(1, 2, 3)) == struct.pack("<HHIIQI", 4, 0, 16, 1, 2, 3)
    assert encode_return(LoadError("é")) == struct.pack("<HHI", 2, 0, 2) + "é".encode()
    assert encode_return(CaughtUp(9)) == struct.pack("<HHIQ", 10, 0, 8, 9)
    assert encode_return(Progress(9)) == struct.pack("<HHIQ", 11, 0, 8, 9)


def test_convenience_methods_and_ack_time():
    with channel_pair("socketpair", None) as (src, dst):
        w, r = ReturnPathWriter(dst), ReturnPathReader(src)
        before = time.time_ns()
        w.ready()
        w.load_error("boom")
        w.ack(vcpu_start_ns=before)
        w.page_request(1, 2, 3)
        w.ping(4)
        w.pong(4)
        w.shut()
        w.caught_up(5)
        w.progress(6)
        got = [r.recv(WAIT_S) for _ in range(9)]
    assert got[:2] == [Ready(), LoadError("boom")]
    assert got[2].vcpu_start_ns == before and before <= got[2].sent_ns <= time.time_ns()
    assert got[3:] == [PageRequest(1, 2, 3), Ping(4), Pong(4), Shut(), CaughtUp(5), Progress(6)]


def test_long_error_text_is_cut_on_a_character_boundary():
    text = "é" * MAX_RETURN_PAYLOAD  # 2 bytes each
    with channel_pair("socketpair", None) as (src, dst):
        ReturnPathWriter(dst).load_error(text)
        got = ReturnPathReader(src).recv(WAIT_S)
    assert got == LoadError("é" * (MAX_RETURN_PAYLOAD // 2))


def test_values_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        encode_return(Ping(1 << 32))
    with pytest.raises(ValueError, match="does not fit"):
        encode_return(PageRequest(0, -1, 1))


def test_recv_times_out_with_none_and_closed_return_path_raises():
    with channel_pair("tcp4", None) as (src, dst):
        reader = ReturnPathReader(src)
        assert reader.recv(timeout=0.05) is None
        dst.close()
        with pytest.raises(PeerClosedError):
            reader.recv(timeout=WAIT_S)


def test_writer_is_safe_from_several_threads():
    with channel_pair("socketpair", None) as (src, dst):
        writer, reader = ReturnPathWriter(dst), ReturnPathReader(src)
        threads = [threading.Thread(target=lambda base=base: [writer.ping(base + i)
                                                              for i in range(200)])
                   for base in (0, 1000, 2000, 3000)]
        for t in threads:
            t.start()
        got = [reader.recv(WAIT_S) for _ in range(800)]
        for t in threads:
            t.join(WAIT_S)
    assert sorted(m.id for m in got) == sorted(b + i for b in (0, 1000, 2000, 3000)
                                               for i in range(200))


def test_channels_without_return_path_are_refused():
    with pytest.raises(TransportError, match="no return path"):
        ReturnPathReader(BytesChannel())


def _recv_raw(raw: bytes, prefix: bytes = b""):
    """What the source's reader makes of ``prefix + raw`` sent by a (broken) destination."""
    a, b = socket.socketpair()
    src = SocketChannel(a, "src")
    try:
        b.sendall(prefix + raw)
        b.shutdown(socket.SHUT_WR)
        reader = ReturnPathReader(src)
        if prefix:
            reader.recv(WAIT_S)
        return reader.recv(WAIT_S)
    finally:
        src.close()
        b.close()


@pytest.mark.parametrize("raw, offset, reason", [
    (struct.pack("<HHI", 99, 0, 0), 8, "unknown return-path message type 99"),
    (struct.pack("<HHI", 0, 0, 0), 8, "unknown return-path message type 0"),
    (struct.pack("<HHII", 5, 1, 4, 0), 10, "reserved"),
    (struct.pack("<HHI", 5, 0, 8) + bytes(8), 12, "PING message declares 8 payload bytes; "
                                                  "expected 4"),
    (struct.pack("<HHI", 1, 0, 1) + b"x", 12, "READY message declares 1"),
    (struct.pack("<HHI", 11, 0, 4) + bytes(4), 12, "PROGRESS message declares 4 payload bytes; "
                                                   "expected 8"),
    (struct.pack("<HHI", 2, 0, MAX_RETURN_PAYLOAD + 1), 12, "expected at most 4096"),
    (struct.pack("<HHI", 2, 0, 0xFFFF_FFFF), 12, "expected at most"),
    (struct.pack("<HHI", 2, 0, 3) + b"a\xffb", 8 + 8 + 1, "not valid UTF-8"),
    (struct.pack("<HHI", 12, 0, MAX_CANCEL_BYTES + 1), 12, "expected at most 1024"),
    (struct.pack("<HHI", 12, 0, 2) + b"\xffx", 8 + 8, "CANCEL text is not valid UTF-8"),
    (struct.pack("<HHI", 3, 0, 16) + bytes(10), 8 + 8 + 10, "truncated"),
    (struct.pack("<HH", 3, 0), 8 + 4, "truncated"),
])
def test_malformed_messages(raw, offset, reason):
    with pytest.raises(StreamError) as info:
        _recv_raw(raw, prefix=encode_return(Ready()))
    assert info.value.offset == offset and reason in info.value.reason, info.value


def test_a_load_error_reaches_the_source_printable():
    # What a destination says is shown to the operator: escape sequences and line breaks
    # arrive written out, and cannot move the cursor or fake a line of output.
    got = _recv_raw(encode_return(LoadError("bad\x1b[2J\nsection\u2028é\x00")))
    assert got == LoadError("bad\\x1b[2J\\nsection\\u2028é\\x00")
    assert got.text.isprintable()


def test_the_commit_a_destination_awaits_counts_in_the_stream_offsets():
    """Post-copy pages follow COMMIT on the same channel: the destination counts its bytes, so
    an error in a later record names the record's position on the connection."""
    from pymig.incoming import await_commit

    with channel_pair("socketpair", None) as (src, dst):
        ReturnPathWriter(src).send(Commit())
        assert await_commit(dst, WAIT_S) == len(encode_return(Commit())) == dst.bytes_received
