"""Post-copy (the postcopy-ram capability): the guest runs at the destination before all of its
RAM is there, vCPUs fault for the missing pages through userfaultfd, and a cut connection
leaves both sides paused with nothing lost."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import numpy as np
import pytest

from _migration_helpers import ANY_KIND, MiB, assert_consistent, guest_config, wait_for
from _tls_helpers import pki  # noqa: F401
from _uffd import needs_uffd

from pymig import core, postcopy
from pymig._core import kvm as _kvm
from pymig.errors import KvmError, MigrationError, PacketError, StateError, StreamError
from pymig.guest import create
from pymig.incoming import Incoming
from pymig.machine import Machine
from pymig.memory import RamBlock, touch_without_gil
from pymig.migration import Migration
from pymig.parameters import ParameterStore
from pymig.stats import read_trace

POSTCOPY_KINDS = [
    pytest.param("simulated", id="simulated"),
    pytest.param("kvm", id="kvm", marks=pytest.mark.kvm),
]




class Run:
    """A post-copy migration between two threads of this process."""

    def __init__(self, guest, *, params=None, capabilities=None, dest_postcopy=True,
                 timeout=120.0, trace=None, guest_options=None, dest_preempt=None,
                 tls=None, credentials=None):
        if dest_preempt is None:  # as the source, unless the test says otherwise
            dest_preempt = bool((capabilities or {}).get("postcopy-preempt"))
        self.incoming = Incoming("tcp:127.0.0.1:0", accept_timeout=timeout, limits=ANY_KIND,
                                 postcopy=dest_postcopy, guest_options=guest_options,
                                 postcopy_preempt=dest_preempt, tls=tls)
        bound = self.incoming.listen()
        self.box: dict = {}
        self.dest_statuses: list[str] = []
        self.incoming.on_status(lambda old, new: self.dest_statuses.append(new))
        self.thread = threading.Thread(target=self._destination, daemon=True)
        self.thread.start()
        store = ParameterStore()
        store.set(**(params or {}))
        store.set_capabilities(**{"postcopy-ram": True, **(capabilities or {})})
        self.migration = Migration(Machine.source(guest), store, credentials=credentials)
        self.statuses: list[str] = []
        self.migration.on_status(lambda old, new: self.statuses.append(new.value))
        self.migration.start(bound, trace_path=trace)

    def _destination(self) -> None:
        try:
            self.box["result"] = self.incoming.run()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.box["error"] = exc

    def wait(self, timeout=120.0) -> None:
        self.migration.wait(timeout)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the destination did not finish"

    @property
    def destination(self):
        return self.incoming.machine.guest if self.incoming.machine is not None else None


@pytest.fixture
def cleanup():
    things = []
    yield things.append
    for thing in reversed(things):
        if isinstance(thing, Run):
            if thing.incoming.postcopy is not None:
                thing.incoming.postcopy.abandon()  # a paused guest's vCPUs wait: release them
            if thing.incoming.machine is not None:
                thing.incoming.machine.close()
        else:
            thing.close()


def _running(config, cleanup, **options):
    guest = create(config, **options)
    cleanup(guest)
    guest.start()
    wait_for(lambda: guest.progress()["passes"] >= 1, what="the guest to run")
    return guest


# -- the wire --------------------------------------------------------------------------------

def _blocks(*npages):
    blocks = [RamBlock.allocate(f"b{i}", n * 4096, block_id=i, hugepages=False)
              for i, n in enumerate(npages)]
    return blocks


def test_listen_round_trips_each_blocks_bitmap():
    blocks = _blocks(100, 64)
    bitmaps = [core.new_bitmap(100), core.new_bitmap(64)]
    core.bitmap_set_range(bitmaps[0], 100, 3, 40)
    core.bitmap_set_range(bitmaps[1], 64, 63, 1)
    payload = postcopy.listen_payload(blocks, bitmaps)
    assert postcopy.parse_op(payload, 0) == postcopy.OP_LISTEN
    parsed = postcopy.parse_listen(payload, blocks, 0)
    assert np.array_equal(parsed[0], bitmaps[0]) and np.array_equal(parsed[1], bitmaps[1])


@pytest.mark.parametrize("damage", ["short", "long", "count", "block-id", "npages", "tail-bit",
                                    "reserved"])
def test_listen_that_does_not_fit_this_guest_is_refused(damage):
    blocks = _blocks(100, 64)
    payload = bytearray(postcopy.listen_payload(blocks, [core.new_bitmap(100),
                                                         core.new_bitmap(64)]))
    first_block = 4 + 4
    if damage == "short":
        payload = payload[:-8]
    elif damage == "long":
        payload += bytes(8)
    elif damage == "count":
        payload[4] = 3
    elif damage == "block-id":
        payload[first_block] = 9
    elif damage == "npages":
        payload[first_block + 8] = 101
    elif damage == "tail-bit":
        payload[first_block + 16 + 8 + 7] = 0x80  # page 127 of a 100-page block
    elif damage == "reserved":
        payload[first_block + 4] = 1
    with pytest.raises(StreamError):
        postcopy.parse_listen(bytes(payload), blocks, 0)


def test_an_unknown_operation_is_refused():
    with pytest.raises(StreamError):
        postcopy.parse_op(bytes([7, 0, 0, 0]), 0)
    with pytest.raises(StreamError):
        postcopy.parse_op(bytes([1, 0, 0, 0, 5]), 0)  # ADVISE carries nothing


@pytest.mark.parametrize("call,args,name", [
    (_kvm.uffdio_api, (0,), "UFFDIO_API"),
    (_kvm._unsafe_uffdio_register, (0, 4096, 1), "UFFDIO_REGISTER"),
    (_kvm._unsafe_uffdio_unregister, (0, 4096), "UFFDIO_UNREGISTER"),
    (_kvm._unsafe_uffdio_copy, (0, 0, 4096), "UFFDIO_COPY"),
    (_kvm._unsafe_uffdio_zeropage, (0, 4096), "UFFDIO_ZEROPAGE"),
    (_kvm._unsafe_uffdio_wake, (0, 4096), "UFFDIO_WAKE"),
])
def test_every_userfaultfd_wrapper_raises_ebadf_on_a_bad_fd(call, args, name):
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(KvmError) as info:
        call(fd, *args)
    assert (info.value.errno, info.value.ioctl) == (errno.EBADF, name)


@needs_uffd
def test_a_page_is_placed_once():
    """UFFDIO_COPY onto a page already there says so (EEXIST) and changes nothing: the page
    asked for and the same page pushed can both arrive, the first one wins."""
    block = RamBlock.allocate("ram", 4 * 4096, hugepages=False)
    uffd = _kvm.userfaultfd_open(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        _kvm.uffdio_api(uffd, 0)
        _kvm._unsafe_uffdio_register(uffd, block.address, block.size_bytes,
                                     _kvm.REGISTER_MODE_MISSING)
        src = np.full(2 * 4096, 0xAB, dtype=np.uint8)
        assert _kvm._unsafe_uffdio_copy(uffd, block.address + 4096, src.ctypes.data,
                                        4096) == (4096, 0)
        src[:] = 0xCD
        # page 0 placed, then it stops at page 1, which was there
        assert _kvm._unsafe_uffdio_copy(uffd, block.address, src.ctypes.data,
                                        2 * 4096) == (4096, errno.EAGAIN)
        assert _kvm._unsafe_uffdio_copy(uffd, block.address + 4096, src.ctypes.data,
                                        4096) == (0, errno.EEXIST)
        assert block.array[0] == 0xCD and block.array[4096] == 0xAB
        assert _kvm._unsafe_uffdio_zeropage(uffd, block.address + 4096, 4096)[1] == errno.EEXIST
    finally:
        os.close(uffd)
        block.close()


# -- whole migrations ------------------------------------------------------------------------

@needs_uffd
@pytest.mark.parametrize("kind", POSTCOPY_KINDS)
def test_selfcheck_guest_runs_on_with_no_error_after_postcopy(kind, cleanup, tmp_path):
    """Switched to post-copy after one pass, with the guest writing all along: the
    destination runs it before its pages arrive, and it finds every page it checks right."""
    guest = _running(guest_config(kind, memory=64 * MiB, working_set=16 * MiB), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1}, trace=tmp_path / "trace")
    cleanup(run)
    run.wait()
    assert "error" not in run.box, run.box.get("error")
    query = run.migration.query()
    assert query["status"] == "completed", query
    assert "postcopy-active" in run.statuses and "device" not in run.statuses
    assert query["switchover-reason"] == "postcopy"
    assert guest.status == "paused"  # the guest is the destination's now
    assert "postcopy-active" in run.dest_statuses and run.incoming.status == "completed"
    dest = run.destination
    stats = run.incoming.postcopy.query()
    assert stats["pages-left"] == 0
    if kind == "kvm":
        assert len(stats["postcopy-vcpu-blocktime"]) == dest.vcpu_count
    # the trace follows the post-copy phase to its end
    lines = [line for line in read_trace(tmp_path / "trace") if line["action"] == "postcopy"]
    assert lines and lines[-1]["pending_bytes"] == 0
    last, final = lines[-1]["postcopy"], query["postcopy"]
    assert (last["pages-requested"], last["pages-pushed"]) == \
        (final["pages-requested"], final["pages-pushed"])
    assert last["requests"] <= final["requests"]  # (requests may come after the last page)
    passes = dest.progress()["passes"]
    wait_for(lambda: dest.progress()["passes"] > passes + 1, what="the guest to run on")
    assert_consistent(dest)


@needs_uffd
@pytest.mark.parametrize("kind", POSTCOPY_KINDS)
def test_migrate_start_postcopy_switches_a_migration_under_way(kind, cleanup):
    guest = _running(guest_config(kind, memory=64 * MiB, working_set=16 * MiB), cleanup)
    # a link too slow for the guest's writes: pre-copy alone would not end
    run = Run(guest, params={"max-bandwidth": 8 * MiB, "downtime-limit": 1})
    cleanup(run)
    wait_for(lambda: run.migration.status.value == "active", what="the migration to start")
    run.migration.start_postcopy()
    run.wait()
    assert run.migration.query()["status"] == "completed", run.migration.query()
    assert_consistent(run.destination)


@needs_uffd
def test_a_guest_that_outruns_its_link_completes_without_throttling(cleanup, tmp_path):
    """A guest that dirties its working set far faster than a capped link moves it never
    converges in pre-copy; with post-copy it moves, and no throttle touches it."""
    guest = _running(guest_config("simulated", memory=128 * MiB, working_set=64 * MiB,
                                  rate=0), cleanup)
    trace = tmp_path / "trace"
    run = Run(guest, params={"max-bandwidth": 32 * MiB, "x-postcopy-after": 2,
                             "downtime-limit": 1}, trace=trace)
    cleanup(run)
    run.wait()
    query = run.migration.query()
    assert query["status"] == "completed", query
    assert query["cpu-throttle-peak"] == 0
    # two passes (at least: the switch also waits for the destination to have loaded
    # ADVISE), and what the guest dirtied outran the link at every one: no convergence
    assert query["iterations"] >= 3
    assert all(line["action"] != "switchover" for line in read_trace(trace))
    # the guest ran into pages not there yet, asked for them and waited for them
    source_side = query["postcopy"]
    dest_side = run.incoming.postcopy.query()
    assert source_side["requests"] > 0
    assert dest_side["requests"] > 0 and dest_side["blocktime-faults"] > 0
    assert dest_side["blocktime-total"] > 0 and dest_side["pages-left"] == 0
    assert dest_side["pages-requested"] + dest_side["pages-pushed"] == \
        source_side["pages-requested"] + source_side["pages-pushed"]
    assert_consistent(run.destination)


@needs_uffd
@pytest.mark.parametrize("kind", POSTCOPY_KINDS)
def test_postcopy_into_memfd_ram(kind, cleanup):
    """memfd RAM (shared memory): stale pages are dropped from the file too (MADV_REMOVE), and
    zero pages are placed by copy (shmem has no UFFDIO_ZEROPAGE)."""
    guest = _running(guest_config(kind, memory=64 * MiB, working_set=16 * MiB), cleanup,
                     backing="memfd")
    run = Run(guest, params={"x-postcopy-after": 1, "downtime-limit": 1},
              guest_options={"backing": "memfd"})
    cleanup(run)
    run.wait()
    assert run.migration.query()["status"] == "completed", run.migration.query()
    assert run.destination.ram_blocks[0].backing == "memfd"
    assert run.incoming.postcopy.query()["pages-left"] == 0
    assert_consistent(run.destination)


@needs_uffd
def test_a_destination_without_the_capability_refuses_before_the_guest_stops(cleanup):
    guest = _running(guest_config("simulated"), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1}, dest_postcopy=False)
    cleanup(run)
    run.wait()
    query = run.migration.query()
    assert query["status"] == "failed"
    assert "postcopy-ram" in query["error-desc"]
    assert "postcopy-active" not in run.statuses
    assert guest.status == "running"


def test_migrate_start_postcopy_needs_the_capability(cleanup):
    guest = _running(guest_config("simulated"), cleanup)
    migration = Migration(Machine.source(guest))
    with pytest.raises(MigrationError, match="Enable postcopy"):
        migration.start_postcopy()


def test_postcopy_needs_a_return_path(cleanup, tmp_path):
    guest = _running(guest_config("simulated"), cleanup)
    store = ParameterStore()
    store.set_capabilities(**{"postcopy-ram": True})
    with pytest.raises(MigrationError, match="return path"):
        Migration(Machine.source(guest), store).start(f"file:{tmp_path / 'snap'}")


def _touch_in_thread(guest, page: int) -> threading.Thread:
    block = guest.ram_blocks[0]

    def touch() -> None:
        # faults if missing, and waits for the page (without the GIL, as any reader must)
        touch_without_gil(block.address + page * block.page_size, 8)

    thread = threading.Thread(target=touch, daemon=True)
    thread.start()
    return thread


def _slow_push(run) -> None:
    """Cap the push at 1 MiB/s from the switch on (set as the destination starts its guest,
    before its ACK lets the push begin), so that pages are still missing seconds later."""
    run.incoming.after_start = lambda machine: run.migration.params.set(
        **{"max-bandwidth": 1 * MiB})


def _ask_for_the_last_missing_page(run) -> None:
    """Once the guest runs at the destination, touch the page the (slowed) push would send
    last: that page must be asked for.  (A guest's own accesses are no sure request: on a busy
    host its vCPU may not run before the push has brought every page it touches.)"""
    wait_for(lambda: "postcopy-active" in run.dest_statuses, timeout=60,
             what="the switch to post-copy")
    pc = run.incoming.postcopy
    block = run.destination.ram_blocks[0]
    left = core.bitmap_indices(pc.missing[block.block_id], block.npages)
    assert len(left), "every page arrived before the test could ask for one"
    toucher = _touch_in_thread(run.destination, int(left[-1]))
    toucher.join(60)
    assert not toucher.is_alive(), "a page asked for did not arrive"


@needs_uffd
@pytest.mark.parametrize("kind", POSTCOPY_KINDS)
def test_a_cut_connection_pauses_both_sides_and_loses_nothing(kind, cleanup):
    """The connection goes while the pages are being pushed: neither side claims success;
    the source keeps its copy of what it did not send, paused; the destination reports
    postcopy-paused and a thread touching a missing page waits for it rather than read a
    made-up zero page."""
    guest = _running(guest_config(kind, memory=64 * MiB, working_set=48 * MiB), cleanup)
    # the push goes at the cap too, so that the cut lands while pages remain
    run = Run(guest, params={"x-postcopy-after": 1, "max-bandwidth": 4 * MiB,
                             "x-switchover-capped": True, "compression": "none"})
    cleanup(run)
    wait_for(lambda: run.migration.query().get("postcopy", {}).get("pages-pushed", 0) > 0,
             timeout=60, what="pages to be pushed")
    run.migration._channel.shutdown()  # the network goes
    run.wait()
    query = run.migration.query()
    assert run.migration.status.value == "postcopy-paused", query
    assert query["status"] == "postcopy-paused" and "error-desc" in query
    assert guest.status == "paused"
    left_at_source = run.migration.postcopy.saver.pending_pages()
    assert left_at_source > 0
    assert run.incoming.status == "postcopy-paused"
    assert isinstance(run.box.get("error"), MigrationError)
    pc = run.incoming.postcopy
    assert pc.pages_left() > 0 and run.incoming.machine is not None
    # one missing page: touching it waits (its thread is still blocked a while later)
    block = run.destination.ram_blocks[0]
    page = int(core.bitmap_indices(pc.missing[block.block_id], block.npages)[0])
    toucher = _touch_in_thread(run.destination, page)
    time.sleep(0.5)
    assert toucher.is_alive(), "a missing page read without its data"
    # only a guest given up is released (onto zero pages, with its memory discarded)
    pc.abandon()
    toucher.join(10)
    assert not toucher.is_alive()


class _Out:
    """A RAM section writer that keeps what it is given."""

    def __init__(self):
        self.parts = []

    def part(self, payload, *, nocsum=False, stands_for=0):
        self.parts.append(bytes(payload))

    def end(self, payload):
        self.parts.append(("end", bytes(payload)))


def test_page_requests_are_bounded_and_served_once(cleanup):
    """A request names pages of guest RAM or is ignored (counted); a page already sent is
    not sent again for a request."""
    from pymig import stream
    from pymig.ram import RamSaver

    guest = _running(guest_config("simulated", memory=16 * MiB, working_set=4 * MiB), cleanup)
    saver = RamSaver(guest)
    block = saver.blocks[0]
    core.bitmap_set_range(saver.bitmaps[0], block.npages, 10, 4)
    source = postcopy.PostcopySource(saver)
    out = _Out()
    for request in (stream.PageRequest(7, 0, 1),  # no such block
                    stream.PageRequest(block.block_id, block.npages, 1),  # past the end
                    stream.PageRequest(block.block_id, block.npages - 1, 2),  # runs past it
                    stream.PageRequest(block.block_id, 0, 0),  # no page
                    stream.PageRequest(block.block_id, 11, 2),
                    stream.PageRequest(block.block_id, 11, 2)):  # sent already
        source.page_request(request)
    source._serve(out, bytearray(postcopy.PUSH_PACKET_BYTES))
    assert source.counters.bad_requests == 4 and source.counters.requests == 6
    assert source.counters.pages_requested == 2 and len(out.parts) == 1
    runs = core.packet_runs(out.parts[0], block.page_size, block.block_id, block.npages)
    assert runs.tolist() == [[11, 2]]
    # what is left goes out pushed, then END
    source.run(out, check=lambda: None)
    assert source.counters.pages_pushed == 2 and out.parts[-1] == ("end", b"")
    assert saver.pending_pages() == 0


@needs_uffd
@pytest.mark.parametrize("preempt", [False, True], ids=["main", "preempt"])
def test_pymig_migrate_postcopy_between_processes(preempt, tmp_path):
    """pymig incoming --postcopy and pymig migrate --postcopy --postcopy-after 1 (and
    --postcopy-preempt on both): the MIGRATION events go through postcopy-active, the guest
    runs on at the destination with its self-check clean, and query-migrate there reports
    the post-copy figures."""
    from _migration_helpers import (assert_carries_on, finish, run_pymig, start_destination,
                                    start_source)
    from pymig.qmp import QmpClient

    flags = ("--postcopy-preempt",) if preempt else ()
    src, src_ctl = start_source("simulated", tmp_path)
    dst, dst_ctl, bound = start_destination(tmp_path, "tcp:127.0.0.1:0", "--postcopy", *flags)
    try:
        with QmpClient(dst_ctl) as watcher:
            done = run_pymig("migrate", "--control", src_ctl, bound, "--postcopy", *flags,
                             "--postcopy-after", "1", "--downtime-limit", "1", "--json")
            assert done.returncode == 0, done.stderr
            info = json.loads(done.stdout)
            assert info["status"] == "completed" and info["switchover-reason"] == "postcopy"
            assert info["settings"]["capabilities"]["postcopy-ram"] is True
            assert info["settings"]["capabilities"]["postcopy-preempt"] is preempt
            assert "postcopy-ram on" in done.stderr
            assert ("postcopy-preempt on" in done.stderr) is preempt
            wait_for(lambda: watcher.command("query-migrate")["status"] == "completed",
                     what="the destination to complete")
            statuses = []
            while not watcher.events.empty():
                event = watcher.events.get_nowait()
                if event["event"] == "MIGRATION":
                    statuses.append(event["data"]["status"])
            assert statuses[-2:] == ["postcopy-active", "completed"], statuses
            assert watcher.command("query-migrate")["postcopy"]["pages-left"] == 0
        assert_carries_on(dst_ctl)
    finally:
        finish(src, dst)


@needs_uffd
def test_a_cut_before_the_commit_fails_and_the_source_guest_runs_on(cleanup, monkeypatch):
    """The connection goes after the switch but before COMMIT (the destination has registered
    its RAM and loaded the state; LOADED never arrives): the source still holds every page,
    so the migration fails there as a stop-and-copy's would, its guest running again, and the
    destination discards its guest."""
    from pymig import stream

    def cut_instead(rp):
        rp.channel.shutdown()
        raise MigrationError("cut")

    monkeypatch.setattr(stream.ReturnPathWriter, "loaded", cut_instead)
    guest = _running(guest_config("simulated"), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1, "downtime-limit": 1})
    cleanup(run)
    run.wait()
    assert "postcopy-active" in run.statuses
    assert run.migration.status.value == "failed", run.migration.query()
    assert guest.status == "running"
    passes = guest.progress()["passes"]
    wait_for(lambda: guest.progress()["passes"] > passes, what="the source guest to run on")
    assert run.incoming.status == "failed" and run.incoming.machine is None
    assert_consistent(guest)


@needs_uffd
@pytest.mark.parametrize("bad", ["past-the-end", "unknown-block", "garbage", "not-ram"])
def test_the_preempt_channel_is_bounded_like_the_main_one(bad, cleanup, monkeypatch):
    """What comes on the preempt channel is checked as the main stream is: a page past the
    end of guest RAM, a block the guest has not, a packet that does not parse or a record
    that is not a RAM page pauses the post-copy (nothing placed from it, nothing lost) with
    the reason, rather than write anything."""
    original = postcopy.PostcopySource._serve_one

    def serve(self, out, buf, request, preempt=False):
        if not preempt:
            return original(self, out, buf, request, preempt)
        block = self.saver.blocks[0]
        if bad in ("past-the-end", "unknown-block"):
            npages = block.npages + 1
            fake = np.full(npages * block.page_size, 0x5A, dtype=np.uint8)
            bitmap = core.new_bitmap(npages)
            core.bitmap_set_range(bitmap, npages, block.npages, 1)  # the page after the last
            block_id = block.block_id if bad == "past-the-end" else 99
            result = core.encode_packet(fake, block.page_size, block_id, bitmap, npages,
                                        block.npages, buf, None)
            out.part(memoryview(buf)[:result.nbytes], nocsum=True)
        elif bad == "garbage":
            out.part(b"\xff" * 64, nocsum=True)
        else:
            out.writer.full(0x1234, "nonsense", 0, 1, b"x")

    monkeypatch.setattr(postcopy.PostcopySource, "_serve_one", serve)
    guest = _running(guest_config("simulated", memory=64 * MiB, working_set=32 * MiB), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1, "max-bandwidth": 8 * MiB,
                             "x-switchover-capped": True, "compression": "none",
                             "downtime-limit": 1}, capabilities=PREEMPT)
    cleanup(run)
    run.wait()
    assert run.incoming.status == "postcopy-paused", run.incoming.status
    assert run.migration.status.value == "postcopy-paused", run.migration.query()
    assert isinstance(run.box.get("error"), MigrationError)
    # the cause, not the main channel it shut behind it
    assert isinstance(run.incoming.error, (PacketError, StateError, StreamError))
    assert run.incoming.postcopy.pages_left() > 0
    assert run.incoming.postcopy.query()["pages-preempt"] == 0


@needs_uffd
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cut", ["main", "main-with-preempt", "preempt"])
def test_a_cut_at_any_moment_never_claims_success_nor_loses_a_page(cut, seed, cleanup):
    """Whenever a connection goes (pre-copy, the switch, post-copy, the very end; the main
    one, or with postcopy-preempt either), the two sides end in one of three agreed outcomes:
    failed before the commit (the source's guest runs on, whole; the destination has none),
    paused after it (both postcopy-paused, or the destination complete if only SHUT was lost;
    a missing page waits, and a recovery reconnects every channel and brings the rest), or
    completed (the destination's guest whole).  The moments spread over the whole migration:
    its first pass takes about a second at the cap, the post-copy push about as long."""
    delay = 0.3 + 0.6 * seed
    guest = _running(guest_config("simulated", memory=64 * MiB, working_set=16 * MiB), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1, "max-bandwidth": 16 * MiB,
                             "x-switchover-capped": True, "compression": "none",
                             "downtime-limit": 1},
              capabilities=None if cut == "main" else PREEMPT)
    cleanup(run)
    time.sleep(delay)
    channel = run.migration._preempt_channel if cut == "preempt" else run.migration._channel
    if channel is not None:
        channel.shutdown()
    run.wait()
    source, dest = run.migration.status.value, run.incoming.status
    if source == "failed":
        assert guest.status == "running" and run.incoming.machine is None, (source, dest)
        assert_consistent(guest)
        return
    if source == "postcopy-paused" and dest == "postcopy-paused":
        assert guest.status == "paused"
        pc = run.incoming.postcopy
        assert pc.pages_left() > 0
        block = run.destination.ram_blocks[0]
        page = int(core.bitmap_indices(pc.missing[block.block_id], block.npages)[0])
        toucher = _touch_in_thread(run.destination, page)
        time.sleep(0.3)
        assert toucher.is_alive(), "a missing page read without its data"
        run.migration.recover(run.incoming.recover("tcp:127.0.0.1:0"))
        run.migration.wait(120)
        wait_for(lambda: run.incoming.status == "completed", timeout=120,
                 what="the destination to complete after the recovery")
        toucher.join(10)
        source, dest = run.migration.status.value, run.incoming.status
    assert dest == "completed", (source, dest)
    assert source in ("completed", "postcopy-paused"), source  # (only SHUT lost)
    assert run.incoming.postcopy.pages_left() == 0
    assert_consistent(run.destination)


@needs_uffd
@pytest.mark.parametrize("kind", POSTCOPY_KINDS)
def test_a_paused_postcopy_recovers_and_the_guest_checks_clean(kind, cleanup):
    """Cut during the push, then migrate-recover at the destination and migrate
    resume=true at the source: the pages follow on the new connection (those a vCPU waits
    for asked again), both sides complete, and the guest finds every page right."""
    guest = _running(guest_config(kind, memory=64 * MiB, working_set=32 * MiB), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1, "max-bandwidth": 8 * MiB,
                             "x-switchover-capped": True, "compression": "none",
                             "downtime-limit": 1})
    cleanup(run)
    wait_for(lambda: run.migration.query().get("postcopy", {}).get("pages-pushed", 0) > 0,
             timeout=60, what="pages to be pushed")
    run.migration._channel.shutdown()
    run.wait()
    assert run.migration.status.value == "postcopy-paused"
    assert run.incoming.status == "postcopy-paused"
    left = run.incoming.postcopy.pages_left()
    assert left > 0
    block = run.destination.ram_blocks[0]
    page = int(core.bitmap_indices(run.incoming.postcopy.missing[block.block_id],
                                   block.npages)[-1])
    toucher = _touch_in_thread(run.destination, page)  # waits across the recovery
    run.migration.params.set(**{"max-bandwidth": 0})
    bound = run.incoming.recover("tcp:127.0.0.1:0")
    assert run.incoming.status == "postcopy-recover"
    run.migration.recover(bound)
    run.migration.wait(120)
    wait_for(lambda: run.incoming.status == "completed", timeout=120,
             what="the destination to complete")
    assert run.migration.status.value == "completed", run.migration.query()
    assert "postcopy-recover" in run.statuses and "postcopy-recover" in run.dest_statuses
    toucher.join(10)
    assert not toucher.is_alive()
    assert run.incoming.postcopy.pages_left() == 0
    assert_consistent(run.destination)


# -- the preempt channel (postcopy-preempt) ---------------------------------------------------

PREEMPT = {"postcopy-preempt": True}


def test_advise_resume_and_preempt_carry_the_token_or_are_refused():
    token = postcopy.new_token()
    for op, payload in ((postcopy.OP_ADVISE, postcopy.advise_payload(token)),
                        (postcopy.OP_ADVISE, postcopy.advise_payload())):
        assert postcopy.parse_op(payload, 0) == op
    assert postcopy.parse_token(postcopy.advise_payload(token), 0) == token
    assert postcopy.parse_token(postcopy.advise_payload(), 0) is None
    preempt = postcopy._WITH_TOKEN.pack(postcopy.OP_PREEMPT, 0, token)
    assert postcopy.parse_op(preempt, 0) == postcopy.OP_PREEMPT
    assert postcopy.parse_token(preempt, 0) == token
    for bad in (postcopy._OP.pack(postcopy.OP_PREEMPT),  # PREEMPT without its token
                postcopy._WITH_TOKEN.pack(postcopy.OP_ADVISE, 0x02, token),  # unknown flag
                postcopy._WITH_TOKEN.pack(postcopy.OP_RESUME, 0, token),  # token, no flag
                postcopy._WITH_TOKEN.pack(postcopy.OP_PREEMPT, 1, token),
                postcopy.advise_payload(token) + b"\0",
                bytes([postcopy.OP_ADVISE, 0, 1, 0])):
        with pytest.raises(StreamError):
            postcopy.parse_op(bad, 0)


@pytest.mark.parametrize("uri", ["exec:cat > /dev/null", "file:{tmp}/snap", "fd:0"])
def test_postcopy_preempt_is_refused_where_no_second_connection_can_be_made(uri, cleanup,
                                                                           tmp_path):
    """Both sides refuse postcopy-preempt on a transport that gives one stream (QEMU's
    condition), and without postcopy-ram, before anything starts."""
    uri = uri.format(tmp=tmp_path)
    guest = _running(guest_config("simulated"), cleanup)
    store = ParameterStore()
    store.set_capabilities(**{"postcopy-ram": True, **PREEMPT})
    migration = Migration(Machine.source(guest), store)
    with pytest.raises(MigrationError, match="postcopy-preempt capability needs a second "
                                             "connection"):
        migration.start(uri)
    assert migration.status.value == "none" and guest.status == "running"
    with pytest.raises(ValueError, match="second connection"):
        Incoming(uri, postcopy=True, postcopy_preempt=True)
    store = ParameterStore()
    store.set_capabilities(**PREEMPT)
    with pytest.raises(MigrationError, match="needs postcopy-ram"):
        Migration(Machine.source(guest), store).start("tcp:127.0.0.1:1")
    with pytest.raises(ValueError, match="needs postcopy-ram"):
        Incoming("tcp:127.0.0.1:0", postcopy_preempt=True)


@needs_uffd
@pytest.mark.parametrize("source_preempt", [True, False])
def test_postcopy_preempt_on_one_side_only_is_refused_before_the_guest_stops(source_preempt,
                                                                            cleanup):
    guest = _running(guest_config("simulated"), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1},
              capabilities=PREEMPT if source_preempt else None,
              dest_preempt=not source_preempt)
    cleanup(run)
    run.wait()
    query = run.migration.query()
    assert query["status"] == "failed", query
    assert "postcopy-preempt" in query["error-desc"]
    assert "postcopy-active" not in run.statuses
    assert guest.status == "running"
    assert run.incoming.status == "failed" and run.incoming.machine is None


@needs_uffd
@pytest.mark.parametrize("kind", POSTCOPY_KINDS)
def test_preempt_channel_carries_requested_pages_while_the_push_goes_on(kind, cleanup):
    """With postcopy-preempt the pages a vCPU asks for arrive on the preempt channel while
    the capped push on the main channel still has pages to send; the guest checks clean."""
    guest = _running(guest_config(kind, memory=64 * MiB, working_set=48 * MiB), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1, "max-bandwidth": 8 * MiB,
                             "x-switchover-capped": True, "compression": "none",
                             "downtime-limit": 1}, capabilities=PREEMPT)
    cleanup(run)
    _slow_push(run)
    seen = {}

    def preempted_mid_push() -> bool:
        pc = run.incoming.postcopy
        if pc is None:
            return False
        query = pc.query()  # one snapshot: both figures under the same lock
        seen.update(query)
        return query["pages-preempt"] > 0 and query["pages-left"] > 0

    _ask_for_the_last_missing_page(run)
    wait_for(preempted_mid_push, timeout=60, what="a requested page on the preempt channel "
                                                  "during the push")
    run.migration.params.set(**{"max-bandwidth": 0})
    run.wait()
    assert "error" not in run.box, run.box.get("error")
    query = run.migration.query()
    assert query["status"] == "completed", query
    # the source served them there: every page sent for a request went on the preempt
    # channel, none in the main channel's push
    assert query["postcopy"]["pages-preempt"] == query["postcopy"]["pages-requested"] > 0
    dest = run.incoming.postcopy.query()
    assert dest["pages-left"] == 0 and dest["pages-preempt"] > 0
    assert run.incoming._preempt is None  # closed with the main channel
    assert_consistent(run.destination)


@needs_uffd
def test_the_preempt_channel_is_tls_when_the_main_one_is(cleanup, pki):
    from _tls_helpers import SOURCE_DN

    from pymig.transport.tls import TlsChannel

    guest = _running(guest_config("simulated", memory=64 * MiB, working_set=32 * MiB), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1, "max-bandwidth": 8 * MiB,
                             "x-switchover-capped": True, "tls-creds": "tls0"},
              capabilities=PREEMPT, credentials=pki.store(pki.dir()),
              tls=(pki.creds(), (SOURCE_DN,)))
    cleanup(run)
    _slow_push(run)
    # Both ends of the preempt channel, looked at while it is open: from ADVISE (the setup)
    # until the destination has every page.  The pages it carried are counted after the end,
    # from the destination's post-copy state, which outlives the channel.
    wait_for(lambda: run.incoming._preempt is not None
             and run.migration._preempt_channel is not None
             or run.migration.query()["status"] in ("completed", "failed"),
             timeout=60, what="the preempt channel to open")
    preempt = run.incoming._preempt
    dest_side, source_side = preempt[0] if preempt else None, run.migration._preempt_channel
    _ask_for_the_last_missing_page(run)
    run.migration.params.set(**{"max-bandwidth": 0})
    run.wait()
    query = run.migration.query()
    assert query["status"] == "completed", query
    assert "error" not in run.box, run.box.get("error")
    assert isinstance(dest_side, TlsChannel) and isinstance(source_side, TlsChannel)
    dest = run.incoming.postcopy.query()
    assert dest["pages-preempt"] > 0 and dest["pages-left"] == 0, dest
    assert query["postcopy"]["pages-preempt"] == query["postcopy"]["pages-requested"] > 0
    assert_consistent(run.destination)


@needs_uffd
@pytest.mark.parametrize("kind", POSTCOPY_KINDS)
@pytest.mark.parametrize("cut", ["main", "preempt"])
def test_a_cut_of_either_channel_pauses_and_both_recover(cut, kind, cleanup):
    """Either connection goes during the push: both sides pause, nothing lost; a recovery
    reconnects both channels, the page a thread waits for across it comes on the new preempt
    channel, and the guest checks clean."""
    guest = _running(guest_config(kind, memory=64 * MiB, working_set=32 * MiB), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1, "max-bandwidth": 8 * MiB,
                             "x-switchover-capped": True, "compression": "none",
                             "downtime-limit": 1}, capabilities=PREEMPT)
    cleanup(run)
    wait_for(lambda: run.migration.query().get("postcopy", {}).get("pages-pushed", 0) > 0,
             timeout=60, what="pages to be pushed")
    channel = run.migration._channel if cut == "main" else run.migration._preempt_channel
    channel.shutdown()
    run.wait()
    assert run.migration.status.value == "postcopy-paused", run.migration.query()
    assert run.incoming.status == "postcopy-paused"
    assert run.migration._preempt_channel is None and run.incoming._preempt is None
    pc = run.incoming.postcopy
    assert pc.pages_left() > 0
    block = run.destination.ram_blocks[0]
    page = int(core.bitmap_indices(pc.missing[block.block_id], block.npages)[-1])
    toucher = _touch_in_thread(run.destination, page)
    time.sleep(0.2)
    assert toucher.is_alive(), "a missing page read without its data"
    before = pc.query()["pages-preempt"]
    bound = run.incoming.recover("tcp:127.0.0.1:0")
    run.migration.recover(bound)
    run.migration.wait(120)
    wait_for(lambda: run.incoming.status == "completed", timeout=120,
             what="the destination to complete")
    assert run.migration.status.value == "completed", run.migration.query()
    toucher.join(10)
    assert not toucher.is_alive()
    assert pc.pages_left() == 0
    assert pc.query()["pages-preempt"] > before  # the new preempt channel carried pages
    assert_consistent(run.destination)


@needs_uffd
def test_recover_is_only_for_a_paused_postcopy(cleanup):
    guest = _running(guest_config("simulated"), cleanup)
    run = Run(guest, params={"x-postcopy-after": 1, "downtime-limit": 1})
    cleanup(run)
    run.wait()
    assert run.migration.status.value == "completed"
    with pytest.raises(MigrationError, match="paused in post-copy"):
        run.incoming.recover("tcp:127.0.0.1:0")
    with pytest.raises(MigrationError, match="paused in post-copy"):
        run.migration.recover("tcp:127.0.0.1:1")


@needs_uffd
def test_a_cut_postcopy_into_hugetlb_ram_recovers(cleanup):
    """Cut during the push into hugetlb RAM: a thread touching a missing huge page waits
    across the pause; after the recovery (both channels) it and the rest come whole."""
    from _hugetlb import free_huge_pages

    with free_huge_pages(40):
        guest = _running(guest_config("simulated", memory=64 * MiB, working_set=32 * MiB,
                                      rate=2000), cleanup)
        run = Run(guest, params={"x-postcopy-after": 1, "max-bandwidth": 8 * MiB,
                                 "x-switchover-capped": True, "compression": "none",
                                 "downtime-limit": 1}, capabilities=PREEMPT,
                  guest_options={"backing": "hugetlb"})
        try:
            wait_for(lambda: run.migration.query().get("postcopy", {}).get("pages-pushed", 0)
                     > 0, timeout=60, what="pages to be pushed")
            run.migration._channel.shutdown()
            run.wait()
            assert run.incoming.status == "postcopy-paused"
            pc = run.incoming.postcopy
            block = run.destination.ram_blocks[0]
            page = int(core.bitmap_indices(pc.missing[block.block_id], block.npages)[-1])
            toucher = _touch_in_thread(run.destination, page)
            time.sleep(0.2)
            assert toucher.is_alive(), "a missing page read without its data"
            run.migration.recover(run.incoming.recover("tcp:127.0.0.1:0"))
            run.migration.wait(120)
            wait_for(lambda: run.incoming.status == "completed", timeout=120,
                     what="the destination to complete")
            toucher.join(10)
            assert not toucher.is_alive() and pc.pages_left() == 0
            assert_consistent(run.destination)
        finally:
            if run.incoming.postcopy is not None:
                run.incoming.postcopy.abandon()
            if run.incoming.machine is not None:
                run.incoming.machine.close()


def test_ram_post_copy_cannot_place_is_refused_with_the_reason():
    """Anonymous, memfd and hugetlb RAM take post-copy; anything else is refused before
    anything changes (the source at start, the destination at ADVISE)."""
    from types import SimpleNamespace

    postcopy.check_backing([SimpleNamespace(name="ram", backing="anon"),
                            SimpleNamespace(name="ram2", backing="memfd")])
    with pytest.raises(MigrationError, match="'ram' is file"):
        postcopy.check_backing([SimpleNamespace(name="ram", backing="file")])


@needs_uffd
@pytest.mark.parametrize("kind", POSTCOPY_KINDS)
@pytest.mark.parametrize("preempt", [False, True], ids=["main", "preempt"])
def test_postcopy_into_hugetlb_ram_places_whole_huge_pages(preempt, kind, cleanup):
    """A destination on hugetlb RAM: a huge page holding a page the guest wrote since it went
    is dropped whole (its other pages kept aside), a fault asks for the whole huge page, and
    each is placed once all of it is there; the guest checks clean, its RAM still hugetlb."""
    from _hugetlb import free_huge_pages

    with free_huge_pages(40):  # the destination's 64 MiB
        # written slowly enough that a huge page holds pages written since they went
        # beside pages that were not
        guest = _running(guest_config(kind, memory=64 * MiB, working_set=32 * MiB,
                                      rate=2000), cleanup)
        run = Run(guest, params={"x-postcopy-after": 1, "max-bandwidth": 16 * MiB,
                                 "x-switchover-capped": True, "compression": "none",
                                 "downtime-limit": 1},
                  capabilities=PREEMPT if preempt else None,
                  guest_options={"backing": "hugetlb"})
        try:
            run.wait()
            assert "error" not in run.box, run.box.get("error")
            assert run.migration.query()["status"] == "completed", run.migration.query()
            dest = run.destination
            assert {b.backing for b in dest.ram_blocks} == {"hugetlb"}
            stats = run.incoming.postcopy.query()
            assert stats["pages-left"] == 0 and stats["requests"] > 0
            assert stats["listen"]["stale-runs"] > 0  # huge pages dropped and gathered again
            assert_consistent(dest)
        finally:
            if run.incoming.postcopy is not None:
                run.incoming.postcopy.abandon()
            if run.incoming.machine is not None:
                run.incoming.machine.close()


@needs_uffd
def test_the_benchmark_measures_what_it_reports():
    """python -m pymig.benchpostcopy, small: the bare round trip and a post-copy migration
    with its downtime, blocktime and a clean self-check."""
    from pymig import benchpostcopy

    bare = benchpostcopy.bare_round_trip(50)
    assert bare["pages"] == 50 and bare["uffd_fault_median_us"] > 0
    assert bare["first_touch_median_us"] > 0
    for preempt in (False, True):
        run = benchpostcopy.postcopy_migration("simulated", 32, 8, preempt=preempt)
        assert run["status"] == "completed" and run["selfcheck_errors"] == 0
        assert run["downtime_ms"] is not None and "destination" in run["downtime_breakdown_ms"]
        assert run["destination"]["pages-left"] == 0 and run["preempt"] is preempt
    # against pre-copy: the same non-converging guest, auto-converge throttling it there,
    # never under post-copy
    precopy = benchpostcopy.postcopy_migration("simulated", 32, 16, postcopy=False,
                                               workload="dirtier")
    assert precopy["status"] == "completed" and precopy["mode"] == "precopy-auto-converge"
    assert precopy["destination"] == {} and precopy["passes"] > 2
    post = benchpostcopy.postcopy_migration("simulated", 32, 16, preempt=True,
                                            workload="dirtier")
    assert post["status"] == "completed" and post["cpu_throttle_peak"] == 0
    assert post["destination"]["pages-left"] == 0


# -- a recovery asked for the moment the destination pauses ---------------------------------

@needs_uffd
@pytest.mark.parametrize("preempt", [False, True], ids=["main", "preempt"])
def test_migrate_recover_at_once_after_the_pause_keeps_the_destination(preempt, cleanup,
                                                                       monkeypatch):
    """An operator (or the fault campaign) who answers postcopy-paused with migrate-recover at
    once can land between the destination's pause and its process's look at how the incoming
    migration ended: that look must still see a paused post-copy (the guest runs here, the only
    holder of its newer pages), not a failure to quit on, and nothing the ended connection
    leaves to close may close the recovery's channels.  The operator's command is made to land
    there: inside the incoming migration's end, after the pause."""
    from pymig.session import Session

    guest = _running(guest_config("simulated", memory=64 * MiB, working_set=32 * MiB), cleanup)
    dest = Session(destination=True)
    dest.incoming_options = {"limits": ANY_KIND}
    cleanup(dest)
    dest.params.set_capabilities(**{"postcopy-ram": True, **(PREEMPT if preempt else {})})
    box: dict = {}
    original = Incoming._receive_postcopy

    def receive_postcopy(self, channel, rp):
        try:
            return original(self, channel, rp)
        except MigrationError:
            if box:  # (the recovery's own run: as it is)
                raise
            box["uri"] = dest.migrate_recover("tcp:127.0.0.1:0")
            wait_for(lambda: migration.status.value == "postcopy-paused", timeout=60,
                     what="the source to pause")
            migration.recover(box["uri"])
            # the recovered connection (and its preempt channel) accepted, before the first
            # connection's end is through
            wait_for(lambda: self.status == "postcopy-active", timeout=60,
                     what="the recovery to connect")
            raise

    monkeypatch.setattr(Incoming, "_receive_postcopy", receive_postcopy)
    bound = dest.start_incoming("tcp:127.0.0.1:0")
    store = ParameterStore()
    store.set(**{"x-postcopy-after": 1, "max-bandwidth": 8 * MiB, "x-switchover-capped": True,
                 "compression": "none", "downtime-limit": 1})
    store.set_capabilities(**{"postcopy-ram": True, **(PREEMPT if preempt else {})})
    migration = Migration(Machine.source(guest), store)
    migration.start(bound)
    wait_for(lambda: migration.query().get("postcopy", {}).get("pages-pushed", 0) > 0,
             timeout=60, what="pages to be pushed")
    migration._channel.shutdown()
    wait_for(lambda: "uri" in box, timeout=60, what="the destination to pause")
    wait_for(lambda: migration.status.value in ("completed", "postcopy-paused")
             and dest.incoming.status in ("completed", "postcopy-paused"), timeout=120,
             what="the recovery to end")
    assert not dest.quit_requested.is_set(), f"the destination quits: {dest.incoming_failed}"
    assert dest.incoming_failed is None
    assert (migration.status.value, dest.incoming.status) == ("completed", "completed"), \
        (migration.query(), dest.incoming.error)
    assert dest.run_state() == "running"
    assert_consistent(dest.machine.guest)


_MISSING_MAILBOX = r'''
import mmap, os, sys, threading
import numpy as np
from pymig._core import kvm as _kvm
from pymig.guest import create
from pymig.guest.config import GuestConfig
from pymig.guest.layout import MAILBOX_GPA, locate
from pymig.uffd import read_faults

kind = sys.argv[1]
guest = create(GuestConfig(kind, 16 << 20, workload="selfcheck",
                           params={"working_set_bytes": 4 << 20}))
index, offset = locate(guest.ram_blocks, MAILBOX_GPA, 64)
block = guest.ram_blocks[index]
page = offset - offset % block.page_size
saved = np.array(block.array[page:page + block.page_size])  # what the source would send
saved[offset - page] = 0x5A
uffd = _kvm.userfaultfd_open(os.O_CLOEXEC | os.O_NONBLOCK)
_kvm.uffdio_api(uffd, 0)
block.discard([(page // block.page_size, 1)])
_kvm._unsafe_uffdio_register(uffd, block.address + page, block.page_size,
                             _kvm.REGISTER_MODE_MISSING)
stop_r, stop_w = os.pipe()

def serve(event, flags, address, tid):  # Python, as the destination's fault thread
    _kvm._unsafe_uffdio_copy(uffd, block.address + page, saved.ctypes.data, block.page_size)

server = threading.Thread(target=read_faults, args=(uffd, stop_r, serve), daemon=True)
server.start()
guest.progress()  # the page is missing: served by the thread above, or never
assert block.array[offset] == 0x5A
os.write(stop_w, b"x")
server.join()
print("ok")
'''


@needs_uffd
@pytest.mark.parametrize("kind", POSTCOPY_KINDS)
def test_progress_reads_a_missing_mailbox_page_without_holding_the_gil(kind, tmp_path):
    """A destination in post-copy reads its guest's progress (the status line, query-guest)
    from the mailbox page, which may still be missing (the source paused before sending it,
    or its request was lost with a connection).  Faulting on it while holding the GIL would
    stop the thread that fetches it, and the control socket with it: the process hangs and no
    migrate-recover can reach it.  Run in a child process, which such a hang cannot take the
    test run down with."""
    import subprocess
    import sys

    script = tmp_path / "mailbox.py"
    script.write_text(_MISSING_MAILBOX)
    try:
        done = subprocess.run([sys.executable, str(script), kind], capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("progress() waited for its missing mailbox page holding the GIL: hung")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@needs_uffd
def test_calc_dirty_rate_waits_for_the_guest_ram_to_have_arrived(cleanup):
    """Measuring the dirty rate hashes sampled pages of guest RAM; at a destination whose
    post-copy is not over those pages may be missing, and hashing one holding the GIL would
    hang the process as a missing mailbox page did.  Refused until the migration completed,
    as a full self-check is."""
    from pymig.session import CommandError, Session

    guest = _running(guest_config("simulated", memory=64 * MiB, working_set=32 * MiB), cleanup)
    dest = Session(destination=True)
    dest.incoming_options = {"limits": ANY_KIND}
    cleanup(dest)
    dest.params.set_capabilities(**{"postcopy-ram": True})
    bound = dest.start_incoming("tcp:127.0.0.1:0")
    store = ParameterStore()
    store.set(**{"x-postcopy-after": 1, "max-bandwidth": 8 * MiB, "x-switchover-capped": True,
                 "compression": "none", "downtime-limit": 1})
    store.set_capabilities(**{"postcopy-ram": True})
    migration = Migration(Machine.source(guest), store)
    migration.start(bound)
    wait_for(lambda: migration.query().get("postcopy", {}).get("pages-pushed", 0) > 0,
             timeout=60, what="pages to be pushed")
    migration._channel.shutdown()
    wait_for(lambda: dest.incoming.status == "postcopy-paused", timeout=60,
             what="the destination to pause")
    with pytest.raises(CommandError, match="still arriving"):
        dest.calc_dirty_rate({"calc-time": 1})
    migration.recover(dest.migrate_recover("tcp:127.0.0.1:0"))
    wait_for(lambda: dest.incoming.status == "completed", timeout=120,
             what="the destination to complete")
    dest.calc_dirty_rate({"calc-time": 1})  # (its RAM is all there now)
    wait_for(lambda: dest.query_dirty_rate()["status"] == "measured", timeout=30,
             what="the measurement")


@pytest.mark.parametrize("incoming,reads", [("postcopy-active", False), ("postcopy-paused", False),
                                            ("postcopy-recover", False), ("completed", True)])
def test_the_status_loop_reads_no_progress_while_the_pages_still_come(incoming, reads):
    """A destination process's status loop, which also ends the process on quit or a signal,
    reads the guest's progress (its mailbox page) every second: not while an incoming
    post-copy's pages still come, when that page may be missing and the loop would wait for
    it for as long as the post-copy stays paused, deaf to quit and SIGTERM."""
    from types import SimpleNamespace

    from pymig import process
    from pymig.session import Session

    session = Session(destination=True)
    calls = []

    def progress():
        calls.append(1)
        return {"pages_written": 0, "passes": 0, "errors": 0, "result": 0, "done": 0}

    guest = SimpleNamespace(status="running", config=SimpleNamespace(workload="selfcheck"),
                            progress=progress)
    session.machine = SimpleNamespace(guest=guest)
    session.incoming = SimpleNamespace(status=incoming, error=None, postcopy=None)
    timer = threading.Timer(0.6, session.quit_requested.set)
    timer.start()
    lines: list[str] = []
    try:
        code = process._watch(session, SimpleNamespace(received=None), quiet=False,
                              interval=0.1, say=lines.append)
    finally:
        timer.cancel()
    assert code == 0 and lines  # it ran, and said where things stand
    assert bool(calls) is reads, (calls, lines)
