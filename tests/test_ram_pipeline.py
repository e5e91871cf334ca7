"""The RAM saver's sender thread and the destination's read-ahead thread: order, completeness,
errors raised where the caller can see them, and no byte read or written out of turn."""

from __future__ import annotations

import socket
import threading

import pytest

from pymig import stream
from pymig.errors import StreamError, TransportError
from pymig.guest import GuestConfig, create
from pymig.machine import ReadAhead
from pymig.ram import PacketSender, RamSaver
from pymig.transport import BytesChannel, SocketChannel

MiB = 1 << 20


def test_sender_runs_jobs_in_order_and_flush_waits_for_all():
    sender = PacketSender(nbuffers=2, packet_bytes=16)
    done: list[int] = []
    gate = threading.Event()
    try:
        for i in range(6):
            buf = sender.buffer()
            buf[0] = i

            def job(i=i, buf=buf) -> None:
                if i == 0:
                    gate.wait(5)
                assert buf[0] == i  # nobody reused the buffer while it was in flight
                done.append(i)

            sender.send(buf, job)
            if i == 0:
                gate.set()
        sender.flush()
        assert done == list(range(6))
    finally:
        sender.close()


def test_sender_failure_is_raised_and_later_packets_dropped():
    sender = PacketSender(nbuffers=2, packet_bytes=16)
    ran: list[int] = []

    def fail() -> None:
        raise TransportError("peer gone")

    try:
        sender.send(sender.buffer(), fail)
        sender.send(sender.buffer(), lambda: ran.append(1))
        with pytest.raises(TransportError, match="peer gone"):
            sender.flush()
        with pytest.raises(TransportError, match="peer gone"):
            sender.buffer()
        assert ran == []
    finally:
        sender.close()
    # closed, it starts afresh
    sender.send(sender.buffer(), lambda: ran.append(2))
    sender.flush()
    sender.close()
    assert ran == [2]


class _FailingOut:
    """A section writer whose n-th part fails (a connection that breaks mid-iteration)."""

    def __init__(self, fail_at: int):
        self.fail_at = fail_at
        self.parts = 0
        self.after_return = False

    def start(self, payload) -> None:
        pass

    def part(self, payload, *, nocsum: bool = False) -> None:
        assert not self.after_return, "the sender thread wrote after iterate() returned"
        self.parts += 1
        if self.parts == self.fail_at:
            raise TransportError("sending to tcp:test failed: EPIPE")


def test_iterate_raises_a_send_failure_and_leaves_the_stream_alone():
    config = GuestConfig("simulated", 32 * MiB, workload="idle",
                         params={"fill_bytes": 16 * MiB})
    guest = create(config)
    saver = RamSaver(guest)
    out = _FailingOut(fail_at=3)
    try:
        saver.setup(out)  # the 16 MiB of random content is pending: 16 packets
        with pytest.raises(TransportError, match="EPIPE"):
            saver.iterate(out)
        out.after_return = True
        parts = out.parts
        assert parts >= 3
        # nothing more goes out once iterate() has raised
        threading.Event().wait(0.05)
        assert out.parts == parts
    finally:
        saver.cleanup()
        guest.close()


def _sample_stream(extra_after_eof: bytes = b"") -> bytes:
    channel = BytesChannel()
    writer = stream.StreamWriter(channel)
    writer.write_header()
    writer.start(1, "ram", 0, 1, b"start")
    for i in range(7):
        writer.part(1, bytes([i]) * (1000 + i))
    writer.part(1, b"big" * 10_000)  # larger than the read-ahead buffers below
    writer.end(1, b"")
    writer.full(2, "cpu", 0, 1, b"state")
    writer.eof()
    return channel.getvalue() + extra_after_eof


def test_read_ahead_gives_every_record_in_order_and_stops_at_eof():
    data = _sample_stream(extra_after_eof=b"COMMIT")
    channel = BytesChannel(data)
    reader = stream.StreamReader(channel)
    reader.read_header()
    seen = []
    with ReadAhead(reader, nbuffers=2, buffer_bytes=4096) as records:
        for record, payload in records:
            seen.append((record.type, bytes(payload)))
    assert [t for t, _ in seen] == ([stream.RecordType.START] + [stream.RecordType.PART] * 8
                                    + [stream.RecordType.END, stream.RecordType.FULL])
    assert seen[1][1] == bytes([0]) * 1000 and seen[8][1] == b"big" * 10_000
    # what follows EOF (COMMIT on a real channel) is still there for the incoming side
    assert channel.recv_exact(6) == b"COMMIT"


def test_read_ahead_raises_a_damaged_record_in_the_loader():
    data = bytearray(_sample_stream())
    data[200] ^= 0x40  # inside the first PART records: a checksum fails
    reader = stream.StreamReader(BytesChannel(bytes(data)))
    reader.read_header()
    got = 0
    with pytest.raises(StreamError):
        with ReadAhead(reader, nbuffers=2, buffer_bytes=4096) as records:
            for _record, _payload in records:
                got += 1
    assert got >= 1


def test_leaving_read_ahead_early_stops_its_thread():
    a, b = socket.socketpair()
    src, dst = SocketChannel(a, "a"), SocketChannel(b, "b")
    try:
        writer = stream.StreamWriter(src)
        writer.write_header()
        writer.start(1, "ram", 0, 1, b"start")
        reader = stream.StreamReader(dst)
        reader.read_header()
        ahead = ReadAhead(reader, nbuffers=2, buffer_bytes=4096)
        with pytest.raises(RuntimeError, match="loader failed"):
            with ahead as records:
                for _record, _payload in records:
                    raise RuntimeError("loader failed")
        dst.close()  # as the incoming side does on failure: wakes the thread in recv
        ahead._thread.join(5)
        assert not ahead._thread.is_alive()
    finally:
        src.close()
        dst.close()
