"""Deadlines: a peer that makes no progress (no whole record) for the destination's progress
timeout is dropped, however it trickles bytes; a source that is slow or quiet for a good
reason (a low bandwidth cap, a wait for migrate-continue, a guest with nothing to send) is
not."""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest

from _migration_helpers import guests  # noqa: F401 - fixture
from _migration_helpers import (ANY_KIND, assert_arrived_and_runs, finish, guest_config,
                                migrate_locally, save_snapshot, start_destination, wait_for)
from pymig import policy, stream, transport
from pymig.errors import MigrationError
from pymig.guest import GuestConfig
from pymig.incoming import Incoming
from pymig.migration import KEEPALIVE_INTERVAL_S
from _migration_helpers import block_digests
from pymig.ram import RamLoader, RamSaver, describe_blocks, empty_packet
from pymig.transport import BytesChannel, DeadlineExceeded, FdChannel, SocketChannel

MiB = 1 << 20
DEADLINE_S = 2.0
# A receive must end at its deadline, give or take what a busy host adds (generous: the
# host is shared); a trickling peer sends its next byte only a second later.
LATE_S = 6.0


class Trickle:
    """Writes ``data`` to ``write`` one byte per ``interval_s`` in a thread, until done or
    stopped."""

    def __init__(self, write, data: bytes, interval_s: float = 1.0):
        self._stop = threading.Event()
        self.sent = 0

        def run() -> None:
            for byte in data:
                if self._stop.wait(interval_s):
                    return
                try:
                    write(bytes([byte]))
                except OSError:
                    return  # dropped
                self.sent += 1

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the channel's receive deadline ----------------------------------------------------------

@pytest.mark.parametrize("carrier", ["socket", "pipe"])
def test_a_receive_deadline_ends_a_receive_that_a_peer_trickles(carrier):
    if carrier == "socket":
        a, b = socket.socketpair()
        reader, write, close = SocketChannel(a, "socketpair:a"), b.sendall, b.close
    else:
        r, w = os.pipe()
        reader = FdChannel(r, "pipe", writable=False)
        write, close = (lambda data: os.write(w, data)), (lambda: os.close(w))
    reader.settimeout(0.5)  # each byte comes well within it: the timeout alone never trips
    trickle = Trickle(write, bytes(100), interval_s=0.2)
    try:
        began = time.monotonic()
        reader.set_recv_deadline(began + 1.5)
        with pytest.raises(DeadlineExceeded) as info:
            reader.recv_into(bytearray(100))
        took = time.monotonic() - began
        assert 1.5 <= took < 1.5 + LATE_S, took
        assert 1 <= info.value.received < 100 and info.value.expected == 100
        assert "before the receive deadline" in str(info.value)
    finally:
        trickle.stop()
        reader.close()
        close()


def test_a_deadline_passes_nothing_that_arrives_whole_and_can_be_lifted():
    a, b = socket.socketpair()
    channel = SocketChannel(a, "socketpair:a")
    try:
        channel.settimeout(30)
        channel.set_recv_deadline(time.monotonic() + 30)
        b.sendall(b"x" * 1000)
        buf = bytearray(1000)
        assert channel.recv_into(buf) == 1000  # whole before the deadline
        channel.set_recv_deadline(time.monotonic() - 1)  # passed, and the data is there
        b.sendall(b"y" * 10)
        assert channel.recv_into(buf, 10) == 10
        channel.set_recv_deadline(None)
        later = threading.Timer(1.0, b.sendall, args=(b"z" * 10,))
        later.start()
        assert channel.recv_into(buf, 10) == 10 and bytes(buf[:10]) == b"z" * 10
        later.join()
    finally:
        channel.close()
        b.close()


# -- a destination drops a peer that makes no progress ---------------------------------------

@pytest.fixture(scope="module")
def saved_stream(tmp_path_factory) -> bytes:
    """The stream of a whole migration of a running self-checking guest, up to its EOF record
    (the restore index after it is the file's, not the stream's)."""
    path = tmp_path_factory.mktemp("deadline") / "guest.pymig"
    save_snapshot(path, guest_config("simulated", memory=32 * MiB, working_set=4 * MiB))
    data = path.read_bytes()
    reader = stream.StreamReader(BytesChannel(data))
    reader.read_header()
    while reader.next_record().type != stream.RecordType.EOF:
        reader.skip_payload()
    return data[:reader.offset]


def record_ends(data: bytes) -> list[int]:
    """Where each record of ``data`` ends."""
    reader = stream.StreamReader(BytesChannel(data))
    reader.read_header()
    ends = []
    while True:
        record = reader.next_record()
        if record.payload_len:
            reader.skip_payload()
        ends.append(reader.offset)
        if record.type == stream.RecordType.EOF:
            return ends


class Destination:
    """An Incoming with a short progress timeout, run in a thread; ``took`` is how long
    from its connection being accepted to its failure."""

    def __init__(self, tmp_path, **options):
        options.setdefault("progress_timeout", DEADLINE_S)
        self.incoming = Incoming(f"unix:{tmp_path}/dst.sock", accept_timeout=30,
                                 limits=ANY_KIND, **options)
        self.uri = self.incoming.listen()
        self.error: BaseException | None = None
        self.failed_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            result = self.incoming.run()
            result.machine.close()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc
            self.failed_at = time.monotonic()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the destination still waits after {timeout} s"


class Peer:
    """A source as an attacker writes one: a connection and whatever bytes it chooses; it
    collects what comes back on the return path."""

    def __init__(self, uri: str):
        self.channel = transport.connect(uri, timeout=10)
        self.messages: list = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        reader = stream.ReturnPathReader(self.channel)
        try:
            while True:
                self.messages.append(reader.recv())
        except Exception:  # noqa: BLE001 - closed: the test looks at what came
            return

    def send(self, data: bytes) -> None:
        self.channel.send(data)

    def load_error(self) -> str:
        self.thread.join(10)
        errors = [m.text for m in self.messages if isinstance(m, stream.LoadError)]
        assert errors, f"no LOAD_ERROR, only {self.messages}"
        return errors[0]

    def close(self) -> None:
        self.channel.close()


def test_a_connection_that_never_sends_a_header_is_dropped(tmp_path):
    destination = Destination(tmp_path)
    peer = Peer(destination.uri)
    began = time.monotonic()
    try:
        destination.join(DEADLINE_S + LATE_S)
        assert DEADLINE_S <= destination.failed_at - began < DEADLINE_S + LATE_S
        text = ("made no progress for 2 s (the progress timeout): nothing whole arrived; 0 of "
                "16 bytes of the stream header came in that time")
        assert text in str(destination.error)
        assert text in peer.load_error()
        assert destination.incoming.status == "failed"
    finally:
        peer.close()


def test_pymig_incoming_drops_a_peer_after_its_progress_timeout(tmp_path):
    dst, _, uri = start_destination(tmp_path, "tcp:127.0.0.1:0", "--progress-timeout", "2")
    peer = transport.connect(uri, timeout=10)
    trickle = Trickle(peer.send, b"PYMIGSTR" + bytes(8))
    began = time.monotonic()
    try:
        assert dst.wait(DEADLINE_S + LATE_S + 10) == 1
        assert time.monotonic() - began < DEADLINE_S + LATE_S + 10
        err = dst.stderr.read().decode()
        assert "made no progress for 2 s (the progress timeout)" in err, err
        assert "of 16 bytes of the stream header came in that time" in err, err
        assert "Traceback" not in err
    finally:
        trickle.stop()
        peer.close()
        finish(dst)


def test_a_peer_that_sends_one_byte_a_second_is_dropped(tmp_path, saved_stream):
    """Header and configuration at once (the destination builds its guest), then the rest a
    byte a second: each byte comes well within any per-receive timeout, no record ever
    completes, and the destination drops the peer at its deadline."""
    config_end = record_ends(saved_stream)[0]
    destination = Destination(tmp_path)
    peer = Peer(destination.uri)
    trickle = None
    try:
        peer.send(saved_stream[:config_end])
        wait_for(lambda: destination.incoming.machine is not None, what="the guest to be built")
        began = time.monotonic()
        trickle = Trickle(peer.send, saved_stream[config_end:])
        destination.join(DEADLINE_S + LATE_S)
        assert DEADLINE_S - 0.5 <= destination.failed_at - began < DEADLINE_S + LATE_S
        text = str(destination.error)
        match = re.search(r"made no progress for 2 s \(the progress timeout\): nothing whole "
                          r"arrived; (\d+) of 8 bytes of the header of the record at byte "
                          rf"{config_end} came in that time", text)
        assert match and int(match.group(1)) >= 1, text  # bytes came, and did not help
        assert match.group(0) in peer.load_error()
        assert destination.incoming.machine is None  # the guest it built is gone
    finally:
        if trickle is not None:
            trickle.stop()
        peer.close()


def test_a_commit_trickled_a_byte_a_second_never_starts_the_guest(tmp_path, saved_stream):
    destination = Destination(tmp_path, commit_timeout=DEADLINE_S)
    peer = Peer(destination.uri)
    trickle = None
    started = []
    destination.incoming.before_start = started.append
    try:
        peer.send(saved_stream)
        wait_for(lambda: any(isinstance(m, stream.Loaded) for m in peer.messages),
                 what="LOADED")
        began = time.monotonic()
        trickle = Trickle(peer.send, stream.encode_return(stream.Commit()))
        destination.join(DEADLINE_S + LATE_S)
        assert destination.failed_at - began < DEADLINE_S + LATE_S
        assert "the source did not commit within 2 s" in str(destination.error)
        assert started == [] and destination.incoming.machine is None
    finally:
        if trickle is not None:
            trickle.stop()
        peer.close()


# -- ... and keeps a source that is slow or quiet for a good reason --------------------------

def test_a_migration_under_a_low_bandwidth_cap_is_not_dropped(tmp_path, guests):
    """At 256 KiB/s a packet of 1 MiB takes 4 s (past the cap's first burst), twice the
    destination's deadline: under a cap the source sends packets the cap carries in a quarter
    of a second."""
    # 3 MiB of random fill: pages that do not compress, in a guest that writes nothing more
    source = guests(GuestConfig("simulated", 32 * MiB, workload="idle",
                                params={"fill_bytes": 3 * MiB}))
    with migrate_locally(source, f"unix:{tmp_path}/m.sock", progress_timeout=DEADLINE_S,
                         params={"max-bandwidth": 256 << 10}, timeout=60) as done:
        assert done.error is None, done.error
        assert done.migration.query()["status"] == "completed"
        assert done.migration.query()["ram"]["normal-bytes"] >= 3 * MiB
        assert done.digests_at_load == block_digests(source.ram_blocks)
        assert done.destination.status == "running"


def test_a_source_waiting_for_migrate_continue_is_not_dropped(tmp_path, guests):
    source = guests(guest_config("simulated"))
    waited = []

    def hold(migration) -> None:
        # the policy has decided and the source waits for migrate-continue: quiet for longer
        # than the destination's deadline
        wait_for(lambda: migration.status.value == "pre-switchover",
                 what="the wait before switchover")
        time.sleep(3 * DEADLINE_S)
        waited.append(migration.status.value)
        migration.continue_switchover()

    with migrate_locally(source, f"unix:{tmp_path}/m.sock", progress_timeout=DEADLINE_S,
                         capabilities={"pause-before-switchover": True}, during=hold) as done:
        assert waited == ["pre-switchover"]
        assert_arrived_and_runs(done, source)


def test_a_source_with_nothing_to_send_for_a_while_is_not_dropped(tmp_path, guests):
    """An idle guest converges at once; a policy that holds its switchover for longer than
    the destination's deadline leaves the stream with nothing to carry meanwhile."""
    source = guests(GuestConfig("simulated", 32 * MiB, workload="idle"))
    began = time.monotonic()

    def later(metrics, params):
        if time.monotonic() - began < 3 * DEADLINE_S:
            time.sleep(0.01)
            return policy.Decision(policy.Action.CONTINUE, "not yet", 0, None, 0.0)
        return policy.Decision(policy.Action.SWITCHOVER, "manual", 0, None, 0.0)

    with migrate_locally(source, f"unix:{tmp_path}/m.sock", progress_timeout=DEADLINE_S,
                         decide=later) as done:
        assert done.error is None, done.error
        assert done.migration.status.value == "completed", done.migration.query()
        assert done.destination.status == "running"


def test_a_keep_alive_is_an_empty_ram_packet_any_destination_loads_as_nothing():
    """It needs no new record type: a destination of any version loads a RAM packet that
    carries no page, and its memory stays as it was."""
    from pymig.guest import create

    guest = create(GuestConfig("simulated", 16 * MiB, workload="idle"), incoming=True)
    try:
        loader = RamLoader(guest)
        loader.load_start(describe_blocks(guest.ram_blocks))
        before = [bytes(b.mem) for b in guest.ram_blocks]
        block = guest.ram_blocks[0]
        loader.load_part(empty_packet(block.block_id, block.page_size))
        assert [bytes(b.mem) for b in guest.ram_blocks] == before
        assert loader.counters.normal_pages == loader.counters.zero_pages == 0
    finally:
        guest.close()
    assert KEEPALIVE_INTERVAL_S < DEADLINE_S  # what the tests above rely on


def test_progress_timeout_is_positive_or_none(tmp_path):
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="progress timeout must be positive"):
            Incoming(f"unix:{tmp_path}/x.sock", progress_timeout=bad)
    Incoming(f"unix:{tmp_path}/x.sock", progress_timeout=None)


def test_a_deadline_failure_fails_the_source_with_the_reason(tmp_path, guests, monkeypatch):
    """A source whose records stop coming (here: its sends stall for longer than the
    destination's deadline) is dropped, and its migration fails with the destination's
    reason; its guest runs on."""
    source = guests(guest_config("simulated"))
    original = RamSaver.sync
    stalled = threading.Event()

    def stall_once(self):
        if not stalled.is_set() and self.page_bytes_sent:
            stalled.set()  # after the first pass: the destination waits for more
            time.sleep(3 * DEADLINE_S)
        return original(self)

    monkeypatch.setattr(RamSaver, "sync", stall_once)
    with migrate_locally(source, f"unix:{tmp_path}/m.sock",
                         progress_timeout=DEADLINE_S) as done:
        assert done.migration.status.value == "failed"
        assert "made no progress for 2 s (the progress timeout)" in \
            done.migration.query()["error-desc"]
        assert isinstance(done.error, MigrationError)
        assert stalled.is_set()
    assert source.status == "running"
