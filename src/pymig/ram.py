"""The RAM live entry: guest memory as START / PART... / END sections of core packets.

Source (:class:`RamSaver`)::

    setup     start dirty logging, then seed the migration bitmap with the pages that may hold
              data (mincore): pages never touched are zero on both sides and are never read;
              START carries the block list so the destination can refuse a mismatch
    sync      pull the dirty log and OR it into the migration bitmap (the migration thread
              calls this once per iteration, before asking the policy)
    iterate   take pages from the migration bitmap in packets (core.encode_packet: test-and-
              clear, zero check, copy or LZ4, checksum, all in C) and send each as a PART
              section;
              re-arm dirty tracking (KVM_CLEAR_DIRTY_LOG) for each 4 MiB chunk just before
              reading it, so a write after the clear is logged again and a write before it is
              in the copy.
              Where the host has CPUs to spare, a sender thread puts each packet on the
              wire while the next one is encoded (:class:`PacketWorker`; both steps run
              without the GIL); elsewhere the migration thread sends each packet itself
    complete  vCPUs are stopped: a last sync and everything still dirty, then END

Under a bandwidth cap a packet carries at most what the cap lets through in a quarter of a
second (:func:`capped_packet_bytes`), so every record still arrives within a destination's
progress timeout however low the cap; a source with nothing to send shows it is there with an
empty packet (:meth:`RamSaver.keep_alive`), which any destination loads as nothing.

Destination (:class:`RamLoader`): checks the block list against its own guest, then decodes
each packet straight into the block it names (core.decode_packet: bounds-checked, checksummed);
a page the destination never received stays untouched, which for fresh memory means zero.
"""

from __future__ import annotations

import json
import math
import struct
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import xxhash

from pymig import core
from pymig.errors import MigrationError, StateError
from pymig.memory import RamBlock

RAM_IDSTR = "ram"
RAM_VERSION = 1
MAX_BLOCK_LIST_BYTES = 64 << 10  # the START payload: a few blocks of JSON
PACKET_BYTES = 1 << 20  # 256 pages of 4 KiB: ~1k Python calls per GiB, each GIL-free inside
PACKET_BUFFERS = 4  # one being encoded, one held back, one queued, one being sent
# Re-protect 4 MiB (four packets) at a time, just ahead of the sender: a page the guest writes
# again after its clear is sent again next iteration, so the shorter the time from a page's
# clear to the end of the pass, the less there is to resend; each clear costs one ioctl,
# 256 per GiB sent.
CLEAR_CHUNK_PAGES = 1 << 10
# A packet worker overlaps the two halves of moving a packet in two threads, which pays only
# where each busy thread has a CPU of its own: with fewer CPUs than busy threads, the
# handovers cost wake-ups and each packet crosses between the CPUs' caches twice more, which
# made a loopback migration slower (docs/performance.md, "Figures behind the code").  So a
# worker overlaps from this many CPUs up.
OVERLAP_MIN_CPUS = 4
OVERLAP_ENV = "PYMIG_PACKET_OVERLAP"  # "on" / "off" override the CPU count (tests, profiling)
# Under a bandwidth cap, a packet carries at most what the cap lets through in this long.
CAPPED_PACKET_SECONDS = 0.25
_PACKET_HEAD = struct.Struct("<4sHHIIII")  # a packet header up to its checksum (docs)
PACKET_VERSION = 2


def capped_packet_bytes(max_bandwidth: int, page_size: int) -> int:
    """The most bytes a RAM packet may take at ``max_bandwidth`` bytes/s (0: no cap): what
    the cap carries in :data:`CAPPED_PACKET_SECONDS`, at least one page's packet, at most
    :data:`PACKET_BYTES`.  A destination drops a source whose record does not arrive within
    its progress timeout, and a megabyte takes minutes under a cap of a few KB/s."""
    if not max_bandwidth:
        return PACKET_BYTES
    one_page = core.PACKET_HEADER_BYTES + core.RUN_HEADER_BYTES + page_size
    return min(PACKET_BYTES, max(int(max_bandwidth * CAPPED_PACKET_SECONDS), one_page))


def empty_packet(block_id: int, page_size: int) -> bytes:
    """A RAM packet of block ``block_id`` that carries no page: decoded, it changes nothing
    (docs/stream-format.md, "Deadlines and keep-alives")."""
    head = _PACKET_HEAD.pack(b"PMGP", PACKET_VERSION, 0, block_id, page_size, 0, 0)
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))


def packet_overlap() -> bool:
    """Whether packet workers run their jobs in a thread of their own (see OVERLAP_MIN_CPUS)."""
    choice = os.environ.get(OVERLAP_ENV, "auto").strip().lower()
    if choice in ("on", "1"):
        return True
    if choice in ("off", "0"):
        return False
    if choice != "auto":
        raise ValueError(f"{OVERLAP_ENV}={choice!r}: expected on, off or auto")
    return len(os.sched_getaffinity(0)) >= OVERLAP_MIN_CPUS


@dataclass
class RamCounters:
    """What the RAM entry has sent (source) or loaded (destination); read by the stats."""

    normal_pages: int = 0  # pages sent with their data, compressed or not
    zero_pages: int = 0
    compressed_pages: int = 0  # of normal_pages, those in LZ4 blocks
    packets: int = 0
    bytes: int = 0  # packet bytes, headers included


def describe_blocks(blocks: list[RamBlock]) -> bytes:
    """The START payload: the block list, so a destination refuses a guest of another shape."""
    return json.dumps([
        {"name": b.name, "id": b.block_id, "size": b.size_bytes, "page_size": b.page_size,
         "gpa": b.guest_phys_addr} for b in blocks
    ]).encode()


class PacketWorker:
    """Runs packet jobs in a second thread, one packet behind the caller, so that the two
    halves of moving a packet overlap: on the source the RAM saver encodes packet n+1 (guest
    memory into a buffer, in C without the GIL) while the worker sends packet n (sendmsg,
    without the GIL); on the destination the loader receives packet n+1 (recv_into, without
    the GIL) while the worker decodes packet n into guest memory (in C, without the GIL).
    Jobs run in the order they were submitted.

    The caller takes a free buffer (:meth:`buffer`), fills it and submits it with the job that
    consumes it (:meth:`submit`); the buffer is free again once the job ran.  :meth:`drain`
    waits until every submitted job ran.  A job that fails is raised by the next
    :meth:`buffer` or :meth:`drain` (the jobs submitted after it are dropped: the migration
    fails anyway).

    Handing a job over wakes the thread; for a lone packet that wake-up is only delay (inside
    the downtime, the last pass of an idle guest is one small packet or none).  So
    :meth:`submit` keeps the latest job back until the next one comes, and :meth:`drain` runs
    a job that never got company in the caller's thread: the worker starts only when there
    are two packets to overlap.

    With ``overlap`` false (the default below :data:`OVERLAP_MIN_CPUS` CPUs) there is no
    thread: :meth:`submit` runs the job at once, in the caller's thread, and raises its
    failure there.
    """

    def __init__(self, name: str, nbuffers: int = PACKET_BUFFERS,
                 buffer_bytes: int = PACKET_BYTES, *, overlap: bool | None = None):
        self.name = name
        self.buffer_bytes = buffer_bytes
        self.overlap = packet_overlap() if overlap is None else overlap
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        # Without a thread one buffer is enough, and the same one each time stays in cache.
        for _ in range(nbuffers if self.overlap else 1):
            self._free.put(bytearray(buffer_bytes))
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._held: tuple[bytearray | None, Callable[[], None]] | None = None
        self._handed = 0  # jobs handed to the thread since the last drain
        self.error: BaseException | None = None

    def buffer(self) -> bytearray:
        """A free buffer (waits for one)."""
        buf = self._free.get()
        if self.error is not None:
            self._free.put(buf)
            raise self.error
        return buf

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread while one runs (it starts with the first job handed over)."""
        return self._thread

    def give_back(self, buf: bytearray) -> None:
        """Return a buffer taken with :meth:`buffer` and not submitted."""
        self._free.put(buf)

    def submit(self, buf: bytearray | None, job: Callable[[], None]) -> None:
        """Run ``job``, which consumes ``buf`` (one of ours, or None for a buffer of the
        caller's own), after every job submitted before it."""
        if not self.overlap:
            try:
                job()
            finally:
                if buf is not None:
                    self._free.put(buf)
            return
        held, self._held = self._held, (buf, job)
        if held is not None:
            self._hand_over(*held)

    def drain(self) -> None:
        """Run or finish every submitted job; raises the first failure."""
        held, self._held = self._held, None
        if held is not None:
            buf, job = held
            if self._handed or self.error is not None:
                self._hand_over(buf, job)
            else:  # alone: no wake-up, no thread
                try:
                    job()
                finally:
                    if buf is not None:
                        self._free.put(buf)
        self._wait()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Drop a job not yet handed over and wait for the others (after a failure of the
        caller's: the worker stays away from the stream from here)."""
        held, self._held = self._held, None
        if held is not None and held[0] is not None:
            self._free.put(held[0])
        self._wait()

    def close(self) -> None:
        """Stop the thread and forget any failure; the worker can start again later."""
        self.abandon()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()
        self.error = None

    def _hand_over(self, buf: bytearray | None, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        self._handed += 1
        self._jobs.put((buf, job))

    def _wait(self) -> None:
        if self._handed:
            done = threading.Event()
            self._jobs.put((False, done.set))
            done.wait()
            self._handed = 0

    def _loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            buf, job = item
            try:
                if buf is False or self.error is None:
                    job()
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                self.error = exc
            finally:
                if isinstance(buf, bytearray):
                    self._free.put(buf)


_NO_PAGES = core.EncodeResult(0, 0, 0, 0, 0, 0)


class RamSaver:
    """Source half of the RAM entry for one guest."""

    def __init__(self, guest, packet_bytes: int = PACKET_BYTES):
        self.guest = guest
        self.blocks: list[RamBlock] = list(guest.ram_blocks)
        self.bitmaps = [core.new_bitmap(b.npages) for b in self.blocks]
        # dirty-log bits already counted by a sync and not re-armed since (see sync())
        self._seen = [core.new_bitmap(b.npages) for b in self.blocks]
        # pages sent at least once: the destination holds a copy, so sending them again costs
        # it no first touch of fresh memory (see resend_pending())
        self._sent = [core.new_bitmap(b.npages) for b in self.blocks]
        self.sender = PacketWorker("pymig-ram-sender", buffer_bytes=packet_bytes)
        # LZ4 for pages that shrink under it (the "compression" parameter); the state is the
        # encoder's backoff over incompressible memory, kept from packet to packet
        self.compress = True
        self._compress_state = core.new_compress_state()
        self._logging = False
        # False for a background snapshot: its one pass saves pages as they were at its start,
        # whatever the guest writes since (pymig.bgsnapshot), so nothing tracks dirty pages
        self.track_dirty = True
        self.cancelled: Callable[[], bool] = lambda: False
        # iterate() stops at the first chunk boundary after this time.monotonic() (inf: it
        # sends everything); the next call goes on from there, wrapping around at the end
        self.slice_deadline: float = math.inf
        self._resume: tuple[int, int] = (0, 0)  # (block index, first page) to go on from
        # whether the pass that began at setup has reached the end of RAM: every page that
        # held data then has gone at least once
        self.swept = False
        # on_packet(EncodeResult) after each packet is on the wire
        self.on_packet: Callable[[core.EncodeResult], None] = lambda result: None
        # page bytes (pages x page size, zero pages too) whose packets are on the wire: the
        # unit of pending(), so the policy's bandwidth is counted in it
        self.page_bytes_sent = 0
        # wall-clock seconds spent in iterate(): page_bytes_sent over it is how fast this side
        # moves pages (encoding and sending), whatever the destination does with them
        self.busy_seconds = 0.0
        # the most bytes a packet may take (capped_packet_bytes); at most the buffers' size
        self.packet_limit_bytes = packet_bytes

    # -- setup -------------------------------------------------------------------------------
    def setup(self, out) -> None:
        """Turn dirty logging on, then seed the bitmap with every page that may hold data.

        One saver serves every migration of its guest's process; what it counts starts again
        here, or an earlier migration's (a failed one, a snapshot) would read as this one's
        backlog and bandwidth.  Bits a failed migration left in the migration bitmap stay:
        they only send a page again."""
        if self.track_dirty:
            self.guest.start_dirty_log()
            self._logging = True
        self._resume = (0, 0)
        self.swept = False
        self.page_bytes_sent = 0
        self.busy_seconds = 0.0
        self.slice_deadline = math.inf
        self._compress_state[:] = 0
        for seen, sent in zip(self._seen, self._sent):
            seen[:] = 0
            sent[:] = 0
        # Order matters: logging first, then mincore. A page first written after the mincore
        # is in the dirty log; one written before is resident or swapped out, so it is in
        # `touched`.
        for bitmap, block in zip(self.bitmaps, self.blocks):
            core.bitmap_merge(bitmap, block.touched(), block.npages)
        out.start(describe_blocks(self.blocks))

    # -- per iteration -----------------------------------------------------------------------
    def sync(self) -> int:
        """Merge the dirty log into the migration bitmap; returns the pages the guest dirtied
        since the last sync.

        That count is the pages whose log bit was set since: a page the guest writes again
        before its chunk is re-armed shows nothing new (the log cannot tell), so it is a lower
        bound.  It counts what the guest writes whether or not the page was already waiting to
        be sent, which is what a throttle must know during the first pass over RAM, when
        nearly every page is."""
        dirtied = 0
        for bitmap, seen, block, log in zip(self.bitmaps, self._seen, self.blocks,
                                            self.guest.sync_dirty()):
            core.bitmap_merge(bitmap, log, block.npages)
            dirtied += core.bitmap_merge(seen, log, block.npages)
        return dirtied

    def pending_pages(self) -> int:
        return sum(core.bitmap_count(bm, b.npages) for bm, b in zip(self.bitmaps, self.blocks))

    def pending(self) -> int:
        """Bytes the destination still lacks, as far as the last sync knows."""
        return sum(core.bitmap_count(bm, b.npages) * b.page_size
                   for bm, b in zip(self.bitmaps, self.blocks))

    def resend_pending(self) -> int:
        """Of :meth:`pending`, the bytes of pages the destination already holds an older copy
        of.  Those go at the rate of the pipeline; a page sent for the first time may also wait
        for the destination to fault in fresh memory, which on a VM host can be the slower of
        the two by far."""
        return sum(core.bitmap_count(bm & sent, b.npages) * b.page_size
                   for bm, sent, b in zip(self.bitmaps, self._sent, self.blocks))

    def iterate(self, out) -> bool:
        """Send the pages the migration bitmap holds, chunk by chunk, from where the last call
        stopped (wrapping around at the end); True when it got through them all, False when
        :attr:`slice_deadline` passed first.

        Returns once every packet is on the wire (a failure to send raises here)."""
        start = time.monotonic()
        try:
            return self._send(out, self.slice_deadline, rearm=True)
        finally:
            self.busy_seconds += time.monotonic() - start

    def _send(self, out, deadline: float, *, rearm: bool) -> bool:
        """:meth:`iterate`'s work; ``rearm`` re-protects each chunk before reading it."""
        sender = self.sender
        compress = self._compress_state if self.compress else None
        before = [bitmap.copy() for bitmap in self.bitmaps]
        try:
            chunks = self._chunks()
            last_in_ram = max(chunks, default=None)  # where the pass reaches the end of RAM
            for number, (index, first) in enumerate(chunks):
                block, bitmap = self.blocks[index], self.bitmaps[index]
                end = min(first + CLEAR_CHUNK_PAGES, block.npages)
                if rearm:
                    # Re-arm dirty tracking for the chunk before any of it is read: a write
                    # after this is logged again, a write before it is in the copy.
                    self.guest.clear_dirty(index, first, end - first)
                    self._seen[index][first // 64:(end + 63) // 64] = 0
                cursor = first
                limit = self.packet_limit_bytes
                while True:
                    if self.cancelled():
                        raise MigrationError("migration cancelled")
                    buf = sender.buffer()
                    out_buf = buf if limit >= len(buf) else memoryview(buf)[:limit]
                    result = core.encode_packet(block.array, block.page_size, block.block_id,
                                                bitmap, end, cursor, out_buf, compress)
                    if result.nbytes == 0:  # the chunk is sent
                        sender.give_back(buf)
                        break
                    sender.submit(buf, self._send_job(out, buf, result, block.page_size))
                    cursor = result.cursor
                if (index, first) == last_in_ram:
                    self.swept = True
                if time.monotonic() >= deadline and number + 1 < len(chunks):
                    self._resume = chunks[number + 1]
                    sender.drain()
                    self._mark_sent(before)
                    return False
        except BaseException:
            sender.abandon()
            raise
        sender.drain()
        self._mark_sent(before)
        self.swept = True
        return True

    def send_pages(self, out, index: int, array: np.ndarray, bitmap: np.ndarray, first: int,
                   end: int) -> int:
        """Encode the pages of ``bitmap`` in [first, end) of block ``index`` from ``array``
        (the block's memory, or a copy of it laid out the same) and send them; returns how
        many pages went.  The bits sent are cleared.  Every page is encoded when this returns
        (the packets may still be on their way: :attr:`sender`'s ``drain`` waits for them)."""
        block = self.blocks[index]
        compress = self._compress_state if self.compress else None
        cursor, pages = first, 0
        try:
            while True:
                if self.cancelled():
                    raise MigrationError("migration cancelled")
                buf = self.sender.buffer()
                limit = self.packet_limit_bytes
                out_buf = buf if limit >= len(buf) else memoryview(buf)[:limit]
                result = core.encode_packet(array, block.page_size, block.block_id, bitmap, end,
                                            cursor, out_buf, compress)
                if result.nbytes == 0:
                    self.sender.give_back(buf)
                    return pages
                pages += result.normal_pages + result.zero_pages
                self.sender.submit(buf, self._send_job(out, buf, result, block.page_size))
                cursor = result.cursor
        except BaseException:
            self.sender.abandon()
            raise

    def _mark_sent(self, before: list[np.ndarray]) -> None:
        """Bits taken from the migration bitmaps since ``before`` were sent."""
        for sent, old, now in zip(self._sent, before, self.bitmaps):
            sent |= old & ~now

    def _chunks(self) -> list[tuple[int, int]]:
        """(block index, first page) of every clear chunk holding pending pages, in sending
        order: from :attr:`_resume` to the end of RAM, then from the start."""
        order = []
        words = CLEAR_CHUNK_PAGES // 64
        for index, (block, bitmap) in enumerate(zip(self.blocks, self.bitmaps)):
            nchunks = (block.npages + CLEAR_CHUNK_PAGES - 1) // CLEAR_CHUNK_PAGES
            padded = np.zeros(nchunks * words, dtype=np.uint64)
            padded[: bitmap.size] = bitmap
            busy = np.flatnonzero(padded.reshape(nchunks, words).any(axis=1))
            order += [(index, first) for first in (busy * CLEAR_CHUNK_PAGES).tolist()]
        split = next((i for i, chunk in enumerate(order) if chunk >= self._resume), len(order))
        return order[split:] + order[:split]

    def _send_job(self, out, buf: bytearray, result, page_size: int) -> Callable[[], None]:
        def job() -> None:
            out.part(memoryview(buf)[: result.nbytes], nocsum=True,
                     stands_for=result.normal_pages * page_size)
            self.page_bytes_sent += (result.normal_pages + result.zero_pages) * page_size
            self.on_packet(result)

        return job

    def count_sent(self, nbytes: int, seconds: float) -> None:
        """Another live entry (a disk, :mod:`pymig.block`) put ``nbytes`` of guest data on the
        wire in ``seconds``: they count with the pages in the rates the policy weighs and in
        the destination's progress ledger, the bandwidth being what moves both (an empty
        result for :attr:`on_packet`: no RAM went)."""
        self.page_bytes_sent += nbytes
        self.busy_seconds += seconds
        self.on_packet(_NO_PAGES)

    def cap_packets(self, max_bandwidth: int) -> None:
        """Size the packets for a bandwidth cap of ``max_bandwidth`` bytes/s (0: none):
        :func:`capped_packet_bytes`, from the next chunk on."""
        page_size = max((b.page_size for b in self.blocks), default=4096)
        self.packet_limit_bytes = min(capped_packet_bytes(max_bandwidth, page_size),
                                      self.sender.buffer_bytes)

    def keep_alive(self, out) -> None:
        """Send a RAM packet that carries no page (:func:`empty_packet`): a destination that
        drops a source from which no record came for a while learns that this one is there,
        with nothing to send.  Any destination, whatever its version, loads it as nothing."""
        block = self.blocks[0]
        out.part(empty_packet(block.block_id, block.page_size), nocsum=True)

    # -- stop-and-copy -----------------------------------------------------------------------
    def complete(self, out) -> None:
        """With the vCPUs stopped: last sync, every remaining page, then END."""
        self.sync()
        # With the vCPUs stopped nothing writes: the downtime is not spent re-protecting.
        self._send(out, math.inf, rearm=False)
        out.end(b"")

    def cleanup(self) -> None:
        """Stop the sender thread and dirty logging (success or failure); safe to call
        twice."""
        self.sender.close()
        if self._logging:
            self._logging = False
            self.guest.stop_dirty_log()


class RamLoader:
    """Destination half of the RAM entry for one guest."""

    def __init__(self, guest):
        self.guest = guest
        self.blocks: list[RamBlock] = list(guest.ram_blocks)
        self.by_id = {b.block_id: b for b in self.blocks}
        # Fresh memory: no page may be non-zero until a NORMAL run writes it, so ZERO runs for
        # pages never written cost neither a read nor a fault.
        self.present = {b.block_id: core.new_bitmap(b.npages) for b in self.blocks}
        self.counters = RamCounters()
        self.started = False
        self.ended = False
        # post-copy, from LISTEN on: pages are placed through userfaultfd, never written
        self.placer = None

    def load_start(self, payload) -> None:
        # The block list must equal this guest's own, field for field: every value in it is
        # bounded by that.  A list far longer than ours is not parsed at all.
        if len(payload) > MAX_BLOCK_LIST_BYTES:
            raise StateError(f"RAM block list of {len(payload)} bytes, more than "
                             f"{MAX_BLOCK_LIST_BYTES}", entry=RAM_IDSTR, value=len(payload))
        try:
            theirs = json.loads(bytes(payload))
        except (ValueError, RecursionError) as exc:
            raise StateError(f"RAM block list is not valid JSON: {exc}", entry=RAM_IDSTR) from None
        ours = json.loads(describe_blocks(self.blocks))
        if theirs != ours:
            raise StateError(
                f"RAM layout differs: the stream has {_layout_text(theirs)}, this guest has "
                f"{_layout_text(ours)}", entry=RAM_IDSTR)
        self.started = True

    def load_part(self, payload) -> None:
        if not self.started:
            raise StateError("RAM data before the RAM block list", entry=RAM_IDSTR)
        if self.placer is not None:
            self.placer.place(payload)
            self.counters.packets += 1
            self.counters.bytes += len(payload)
            return
        info = core.packet_info(payload)
        block = self.by_id.get(info.block_id)
        if block is None:
            raise StateError(f"RAM packet for unknown block id {info.block_id}", entry=RAM_IDSTR)
        result = core.decode_packet(payload, block.array, block.page_size, block.block_id,
                                    block.npages, self.present[block.block_id])
        c = self.counters
        c.normal_pages += result.normal_pages
        c.zero_pages += result.zero_pages
        c.compressed_pages += result.compressed_pages
        c.packets += 1
        c.bytes += len(payload)

    def load_end(self, payload) -> None:
        if not self.started:
            raise StateError("RAM end before the RAM block list", entry=RAM_IDSTR)
        if len(payload):
            raise StateError(f"RAM end carries {len(payload)} bytes; it carries none",
                             entry=RAM_IDSTR, value=len(payload))
        self.ended = True


def _layout_text(blocks) -> str:
    if not isinstance(blocks, list):
        return repr(blocks)
    return ", ".join(f"{b.get('name')}={b.get('size')} bytes" if isinstance(b, dict) else repr(b)
                     for b in blocks)
