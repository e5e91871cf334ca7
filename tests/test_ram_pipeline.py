"""The packet workers: the RAM saver's sender thread and the destination's decoder thread.
Order, completeness, errors raised where the caller sees them, no byte read or written out
of turn."""

from __future__ import annotations

import math
import socket
import threading
import time

import numpy as np
import pytest

from pymig import stream
from pymig.errors import PacketError, PymigError, StreamError, TransportError
from _migration_helpers import block_digests
from pymig.guest import GuestConfig, create
from pymig.machine import Machine, SectionOut, load_config
from pymig.ram import OVERLAP_ENV, OVERLAP_MIN_CPUS, PacketWorker, RamSaver, packet_overlap
from pymig.transport import BytesChannel
from pymig.transport.channel import SocketChannel

MiB = 1 << 20


@pytest.fixture(params=["on", "off"])
def overlap(request, monkeypatch):
    """Packet workers with a thread of their own ("on") and without ("off"), whatever the
    number of CPUs of the host."""
    monkeypatch.setenv(OVERLAP_ENV, request.param)
    return request.param == "on"


def test_worker_runs_jobs_in_order_and_drain_waits_for_all():
    worker = PacketWorker("test-worker", nbuffers=2, buffer_bytes=16, overlap=True)
    done: list[int] = []
    gate = threading.Event()
    try:
        for i in range(6):
            buf = worker.buffer()
            buf[0] = i

            def job(i=i, buf=buf) -> None:
                if i == 0:
                    gate.wait(5)
                assert buf[0] == i  # nobody reused the buffer while it was in flight
                done.append(i)

            worker.submit(buf, job)
            if i == 0:
                gate.set()
        worker.drain()
        assert done == list(range(6))
    finally:
        worker.close()


def test_worker_failure_is_raised_and_later_jobs_dropped():
    worker = PacketWorker("test-worker", nbuffers=2, buffer_bytes=16, overlap=True)
    ran: list[int] = []

    def fail() -> None:
        raise TransportError("peer gone")

    try:
        worker.submit(worker.buffer(), fail)
        worker.submit(worker.buffer(), lambda: ran.append(1))
        with pytest.raises(TransportError, match="peer gone"):
            worker.drain()
        with pytest.raises(TransportError, match="peer gone"):
            worker.buffer()
        assert ran == []
    finally:
        worker.close()
    # closed, it starts afresh
    worker.submit(worker.buffer(), lambda: ran.append(2))
    worker.drain()
    worker.close()
    assert ran == [2]


def test_a_lone_job_runs_in_the_callers_thread():
    worker = PacketWorker("test-worker", nbuffers=3, buffer_bytes=16, overlap=True)
    threads: list[str] = []
    try:
        worker.submit(worker.buffer(), lambda: threads.append(threading.current_thread().name))
        worker.drain()
        assert threads == [threading.current_thread().name]
        assert worker._thread is None  # no wake-up for a single packet
        for _ in range(3):
            worker.submit(worker.buffer(),
                      lambda: threads.append(threading.current_thread().name))
        worker.drain()
        assert threads[1:] == ["test-worker"] * 3  # in flight together: all by the thread
    finally:
        worker.close()


def test_without_overlap_each_job_runs_at_once_in_the_callers_thread():
    worker = PacketWorker("test-worker", nbuffers=3, buffer_bytes=16, overlap=False)
    ran: list[tuple[int, str]] = []
    try:
        for i in range(4):
            buf = worker.buffer()
            worker.submit(buf, lambda i=i: ran.append((i, threading.current_thread().name)))
            assert ran[-1] == (i, threading.current_thread().name)  # done before submit returns
            assert worker.buffer() is buf  # one buffer, free again, the same each time
            worker.give_back(buf)

        def fail() -> None:
            raise TransportError("peer gone")

        with pytest.raises(TransportError, match="peer gone"):
            worker.submit(worker.buffer(), fail)
        worker.drain()  # nothing in flight, nothing held back
        assert worker.thread is None
        worker.buffer()  # the failed job's buffer came back too
    finally:
        worker.close()


@pytest.mark.parametrize("value, expected", [("on", True), ("1", True), ("off", False),
                                             ("0", False), (" OFF ", False)])
def test_the_environment_can_force_overlap_either_way(monkeypatch, value, expected):
    monkeypatch.setenv(OVERLAP_ENV, value)
    assert packet_overlap() is expected
    assert PacketWorker("test-worker", buffer_bytes=16).overlap is expected


def test_by_default_overlap_follows_the_cpus_of_the_process(monkeypatch):
    monkeypatch.delenv(OVERLAP_ENV, raising=False)
    for cpus, expected in ((1, False), (OVERLAP_MIN_CPUS - 1, False),
                           (OVERLAP_MIN_CPUS, True), (64, True)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert packet_overlap() is expected


def test_a_bad_overlap_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "sometimes")
    with pytest.raises(ValueError, match=f"{OVERLAP_ENV}='sometimes'.*on, off or auto"):
        packet_overlap()


class _FailingOut:
    """A section writer whose n-th part fails (a connection that breaks mid-iteration)."""

    def __init__(self, fail_at: int):
        self.fail_at = fail_at
        self.parts = 0
        self.after_return = False

    def start(self, payload) -> None:
        pass

    def part(self, payload, *, nocsum: bool = False, stands_for: int = 0) -> None:
        assert not self.after_return, "the sender thread wrote after iterate() returned"
        self.parts += 1
        if self.parts == self.fail_at:
            raise TransportError("sending to tcp:test failed: EPIPE")


def test_iterate_raises_a_send_failure_and_leaves_the_stream_alone(overlap):
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


def _migration_stream(tmp_extra: bytes = b"") -> tuple[bytes, list[str]]:
    """A whole migration stream of an idle simulated guest holding 6 MiB of random content
    (six RAM packets), as a one-way channel carries it, and the source's RAM digests."""
    config = GuestConfig("simulated", 16 * MiB, workload="idle",
                         params={"fill_bytes": 6 * MiB})
    guest = create(config)
    machine = Machine.source(guest)
    channel = BytesChannel()
    writer = stream.StreamWriter(channel)
    try:
        writer.write_header()
        machine.save_config(writer)
        (entry,) = machine.registry.live_entries()
        out = SectionOut(writer, entry)
        machine.ram_saver.setup(out)
        machine.ram_saver.sync()
        machine.ram_saver.iterate(out)
        machine.ram_saver.complete(out)
        machine.save_device_state(writer)
        writer.eof()
        return channel.getvalue() + tmp_extra, block_digests(guest.ram_blocks)
    finally:
        machine.ram_saver.cleanup()
        guest.close()


def _load(data: bytes):
    channel = BytesChannel(data)
    reader = stream.StreamReader(channel)
    reader.read_header()
    machine = Machine.incoming(load_config(reader))
    return channel, reader, machine


def test_loading_decodes_every_packet_and_reads_nothing_after_eof(overlap):
    data, digests = _migration_stream(b"COMMIT")
    channel, reader, machine = _load(data)
    try:
        machine.load_stream(reader)
        assert block_digests(machine.guest.ram_blocks) == digests
        assert machine.load_counters()["packets"] >= 6
        # what follows EOF (COMMIT on a real channel) is still there for the incoming side
        assert channel.recv_exact(6) == b"COMMIT"
        assert not any(t.name == "pymig-ram-decoder" for t in threading.enumerate())
    finally:
        machine.close()


def test_a_damaged_packet_fails_the_load_and_stops_the_decoder(overlap):
    data, _ = _migration_stream()
    damaged = bytearray(data)
    at = damaged.index(b"PMGP", len(damaged) // 3)  # a packet in the middle of the RAM
    damaged[at + 4096] ^= 0x40  # page data: only the packet checksum can tell
    channel, reader, machine = _load(bytes(damaged))
    try:
        with pytest.raises(PymigError, match="checksum"):
            machine.load_stream(reader)
        assert not any(t.name == "pymig-ram-decoder" for t in threading.enumerate())
    finally:
        machine.close()


def test_a_stream_cut_in_a_packet_fails_the_load(overlap):
    data, _ = _migration_stream()
    at = data.index(b"PMGP", len(data) // 2)
    channel, reader, machine = _load(data[:at + 100_000])
    try:
        with pytest.raises(StreamError, match="truncated"):
            machine.load_stream(reader)
    finally:
        machine.close()


class _CollectingOut:
    """A section writer that decodes every RAM packet into a copy of the guest's RAM."""

    def __init__(self, blocks):
        from pymig import core

        self.core = core
        self.copies = [np.zeros(b.size_bytes, dtype=np.uint8) for b in blocks]
        self.present = [core.new_bitmap(b.npages) for b in blocks]
        self.blocks = blocks
        self.pages = 0

    def start(self, payload) -> None:
        pass

    def part(self, payload, *, nocsum: bool = False, stands_for: int = 0) -> None:
        info = self.core.packet_info(payload)
        b = self.blocks[info.block_id]
        result = self.core.decode_packet(payload, self.copies[info.block_id], b.page_size,
                                         b.block_id, b.npages, self.present[info.block_id])
        self.pages += result.normal_pages + result.zero_pages
        # what the packet stands for, so that held stop-and-copy packets go out by the MiB
        assert stands_for == result.normal_pages * b.page_size

    def end(self, payload) -> None:
        pass


@pytest.fixture
def filled_saver():
    """A RAM saver over a guest with 20 MiB of random content, set up; and where it sends."""
    guest = create(GuestConfig("simulated", 32 * MiB, workload="idle",
                               params={"fill_bytes": 20 * MiB}))
    saver = RamSaver(guest)
    out = _CollectingOut(saver.blocks)
    try:
        saver.setup(out)
        yield saver, out
    finally:
        saver.cleanup()
        guest.close()


def test_sliced_iterations_go_on_where_they_stopped_and_send_each_page_once(filled_saver):
    saver, out = filled_saver
    pending = saver.pending_pages()
    saver.slice_deadline = 0.0  # already past: one chunk per call
    calls = 0
    while saver.pending_pages():
        before = saver.pending_pages()
        done = saver.iterate(out)
        calls += 1
        assert 0 < before - saver.pending_pages() <= 1024  # one 4 MiB chunk
        assert done == (saver.pending_pages() == 0) or not done
    assert calls >= 5 and out.pages == pending  # every page once, none twice
    assert np.array_equal(out.copies[0], saver.blocks[0].array)


def test_the_first_pass_is_through_once_it_reached_the_end_of_ram(filled_saver):
    saver, out = filled_saver
    block = saver.blocks[0]

    def pages(bitmap):
        return np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:block.npages]

    saver.slice_deadline = 0.0  # one chunk per call
    saver.iterate(out)
    assert not saver.swept and not np.array_equal(out.copies[0], block.array)
    # the guest writes again the first chunk it sent: pages stay pending behind the cursor
    first = np.flatnonzero(pages(out.present[0]))
    saver.bitmaps[0][first.min() // 64] |= np.uint64(1)
    calls = 1
    while not saver.swept:
        assert saver.pending_pages(), "pending pages ran out before the pass was through"
        saver.iterate(out)
        calls += 1
    assert calls >= 5  # 20 MiB, 4 MiB a call
    assert np.array_equal(out.copies[0], block.array)  # every page that held data went


def test_a_slice_resumes_after_the_chunk_it_stopped_at(filled_saver):
    saver, out = filled_saver
    saver.slice_deadline = 0.0
    saver.iterate(out)
    first = np.flatnonzero(np.unpackbits(out.present[0].view(np.uint8), bitorder="little"))
    # put the first chunk back as if the guest wrote it again: it comes last, after the
    # chunks not sent yet
    saver.bitmaps[0][first.min() // 64:(first.max() + 64) // 64] |= \
        out.present[0][first.min() // 64:(first.max() + 64) // 64]
    saver.iterate(out)
    second = np.flatnonzero(np.unpackbits(out.present[0].view(np.uint8), bitorder="little"))
    assert second.max() > first.max()


def test_sync_counts_what_the_guest_dirtied_even_where_pages_were_pending():
    config = GuestConfig("simulated", 32 * MiB, workload="dirtier",
                         params={"working_set_bytes": 4 * MiB, "rate_pages_per_s": 50_000,
                                 "pattern": "sequential"})
    guest = create(config)
    saver = RamSaver(guest)
    out = _CollectingOut(saver.blocks)
    try:
        guest.start()
        deadline = time.monotonic() + 20
        while guest.progress()["passes"] < 1:  # the whole working set touched once
            assert time.monotonic() < deadline
            time.sleep(0.005)
        saver.setup(out)  # the whole working set is pending from here
        pending = saver.pending_pages()
        threading.Event().wait(0.1)
        dirtied = saver.sync()
        # nothing was sent, so nothing became newly pending, yet the guest dirtied pages
        assert saver.pending_pages() <= pending + 16
        assert dirtied > 500
    finally:
        guest.pause()
        saver.cleanup()
        guest.close()


def test_only_throttling_policies_slice_their_iterations():
    from pymig.migration import THROTTLE_SLICE_S, iteration_slice_s
    from pymig.parameters import MigrationParameters

    params = MigrationParameters()
    assert iteration_slice_s(params) == math.inf
    params.capabilities["auto-converge"] = True
    assert iteration_slice_s(params) == THROTTLE_SLICE_S


def test_caught_up_reports_only_what_is_loaded_and_not_too_often(overlap):
    """The destination's READY and CAUGHT_UP: never before the records already received are
    decoded (they would land in the downtime), never twice for one offset, and at most once
    per interval."""
    from pymig.machine import CAUGHT_UP_INTERVAL_S

    data, digests = _migration_stream()
    split = data.index(b"PMGP", len(data) // 2) - 12  # a RAM record's first byte
    head = stream.HEADER_BYTES
    a, b = socket.socketpair()
    sender, receiver = SocketChannel(a, "test:a"), SocketChannel(b, "test:b")
    machine = None
    calls: list[tuple[int, int, float]] = []

    def caught_up(offset: int) -> None:
        calls.append((offset, machine.load_counters()["packets"], time.monotonic()))

    try:
        first = threading.Thread(target=sender.send, args=(data[:split],))
        first.start()  # more than a socket buffer holds
        reader = stream.StreamReader(receiver)
        reader.read_header()
        machine = Machine.incoming(load_config(reader))
        loading = threading.Thread(target=machine.load_stream, args=(reader, caught_up))
        loading.start()
        first.join(30)
        deadline = time.monotonic() + 30
        while not (calls and calls[-1][0] == split) and time.monotonic() < deadline:
            time.sleep(0.01)
        # everything sent so far is loaded, and said so
        assert calls[-1][0] == split
        sender.send(data[split:])
        loading.join(30)
        assert not loading.is_alive()
        assert block_digests(machine.guest.ram_blocks) == digests
    finally:
        sender.close()
        receiver.close()
        if machine is not None:
            machine.close()
    # (the receiver may catch up between two of the sender's writes: what counts is what it
    # had read and decoded when it said so)
    for offset, packets, _ in calls:
        assert head < offset and packets == data[head:offset].count(b"PMGP")
    offsets = [offset for offset, _, _ in calls]
    assert offsets == sorted(set(offsets))
    times = [at for _, _, at in calls]
    assert all(later - earlier >= CAUGHT_UP_INTERVAL_S * 0.9
               for earlier, later in zip(times, times[1:]))


def test_progress_reports_what_is_loaded_while_more_waits(monkeypatch):
    """The destination's PROGRESS: sent while later records are already received (a backlog
    the source cannot see), each offset the end of a record, every packet before it decoded,
    increasing, at most once per interval.  (Only a decoder thread leaves received records
    waiting: without one, each is loaded before the next is read.)"""
    monkeypatch.setenv(OVERLAP_ENV, "on")
    from pymig.machine import PROGRESS_INTERVAL_S
    from pymig.ram import RamLoader

    load_part = RamLoader.load_part

    def slow_load_part(self, payload):  # a destination faulting in fresh memory
        time.sleep(2 * PROGRESS_INTERVAL_S)
        load_part(self, payload)

    monkeypatch.setattr(RamLoader, "load_part", slow_load_part)
    data, digests = _migration_stream()
    reader = stream.StreamReader(BytesChannel(data))
    reader.read_header()
    machine = Machine.incoming(load_config(reader))
    calls: list[tuple[int, int, int, float]] = []

    def progress(offset: int) -> None:
        calls.append((offset, machine.load_counters()["packets"], reader.offset,
                      time.monotonic()))

    try:
        machine.load_stream(reader, progress=progress)
        assert block_digests(machine.guest.ram_blocks) == digests
    finally:
        machine.close()
    assert len(calls) >= 3
    for offset, packets, _, _ in calls:
        assert data[offset - 16:offset - 12] == b"PMFT"  # a record's footer ends there
        assert packets >= data[stream.HEADER_BYTES:offset].count(b"PMGP")
    assert any(offset < received for offset, _, received, _ in calls)  # more was waiting
    offsets = [offset for offset, _, _, _ in calls]
    assert offsets == sorted(set(offsets))
    times = [at for _, _, _, at in calls]
    assert all(later - earlier >= PROGRESS_INTERVAL_S * 0.9
               for earlier, later in zip(times, times[1:]))


def test_pages_sent_before_count_as_resends_and_fresh_ones_do_not(filled_saver):
    saver, out = filled_saver
    block = saver.blocks[0]
    assert saver.resend_pending() == 0  # nothing sent yet: all of it is fresh
    saver.slice_deadline = 0.0
    saver.iterate(out)  # one 4 MiB chunk
    sent = np.flatnonzero(np.unpackbits(out.present[0].view(np.uint8), bitorder="little"))
    assert saver.resend_pending() == 0  # what is left was never sent
    # the guest writes again three pages it had sent and one it had not
    unsent = next(p for p in range(block.npages)
                  if not out.present[0][p // 64] >> np.uint64(p % 64) & np.uint64(1)
                  and saver.bitmaps[0][p // 64] >> np.uint64(p % 64) & np.uint64(1))
    for page in (*sent[:3], unsent):
        saver.bitmaps[0][page // 64] |= np.uint64(1) << np.uint64(page % 64)
    assert saver.resend_pending() == 3 * block.page_size
    saver.slice_deadline = math.inf
    saver.iterate(out)
    assert saver.pending() == saver.resend_pending() == 0


def test_disk_records_are_written_by_a_thread_of_their_own_in_stream_order_with_ram(
        monkeypatch):
    """A disk's PART records go to the disk writer, a thread even where RAM packets are
    decoded in the caller's thread (its writes wait on the storage: the next record is
    received meanwhile); a RAM packet after them is loaded only once they are, and a disk
    record's failure is raised before anything after it is loaded."""
    from types import SimpleNamespace

    from pymig.machine import _LoadWorkers

    monkeypatch.setenv(OVERLAP_ENV, "off")
    disk, ram = SimpleNamespace(idstr="block"), SimpleNamespace(idstr="ram")
    workers = _LoadWorkers()
    done: list[tuple[str, int, str]] = []
    gate = threading.Event()
    try:
        for i in range(4):
            worker = workers.for_entry(disk)

            def write(i=i) -> None:
                if i == 1:
                    gate.wait(5)  # the writer is slow: the RAM packet must wait for it
                done.append(("disk", i, threading.current_thread().name))

            worker.submit(worker.buffer(), write)
        gate.set()
        worker = workers.for_entry(ram)
        assert [d[:2] for d in done] == [("disk", i) for i in range(4)]
        worker.submit(worker.buffer(), lambda: done.append(
            ("ram", 0, threading.current_thread().name)))
        workers.drain()
        assert done[-1] == ("ram", 0, threading.current_thread().name)
        assert {d[2] for d in done[:4]} >= {"pymig-disk-writer"}

        def fail() -> None:
            raise PacketError(0, "a bad disk record")

        worker = workers.for_entry(disk)
        worker.submit(worker.buffer(), fail)
        worker.submit(worker.buffer(), lambda: done.append(("disk", 9, "")))
        with pytest.raises(PacketError, match="a bad disk record"):
            workers.for_entry(ram)
        assert ("disk", 9, "") not in done
    finally:
        workers.close()
