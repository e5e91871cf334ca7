"""The RAM live entry: guest memory as START / PART... / END sections of core packets.

Source (:class:`RamSaver`)::

    setup     start dirty logging, then seed the migration bitmap with the pages that may hold
              data (mincore): pages never touched are zero on both sides and are never read;
              START carries the block list so the destination can refuse a mismatch
    sync      pull the dirty log and OR it into the migration bitmap (the migration thread
              calls this once per iteration, before asking the policy)
    iterate   take pages from the migration bitmap in packets (core.encode_packet: test-and-
              clear, zero check, copy, checksum, all in C) and send each as a PART section;
              re-arm dirty tracking (KVM_CLEAR_DIRTY_LOG) for each 4 MiB chunk just before
              reading it, so a write after the clear is logged again and a write before it is
              in the copy.
              A sender thread puts each packet on the wire while the next one is encoded
              (:class:`PacketSender`; both steps run without the GIL)
    complete  vCPUs are stopped: a last sync and everything still dirty, then END

Destination (:class:`RamLoader`): checks the block list against its own guest, then decodes
each packet straight into the block it names (core.decode_packet: bounds-checked, checksummed);
a page the destination never received stays untouched, which for fresh memory means zero.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pymig import core
from pymig.errors import MigrationError, StateError
from pymig.memory import RamBlock

RAM_IDSTR = "ram"
RAM_VERSION = 1
PACKET_BYTES = 1 << 20  # 256 pages of 4 KiB: ~1k Python calls per GiB, each GIL-free inside
PACKET_BUFFERS = 3  # one being encoded, one being sent, one queued between them
# Re-protect 4 MiB (four packets) at a time, just ahead of the sender: a page the guest writes
# again after its clear is sent again next iteration, so the shorter the time from a page's
# clear to the end of the pass, the less there is to resend; each clear costs one ioctl
# (~20 us with pymig's bookkeeping), 256 per GiB sent.
CLEAR_CHUNK_PAGES = 1 << 10


@dataclass
class RamCounters:
    """What the RAM entry has sent (source) or loaded (destination); read by the stats."""

    normal_pages: int = 0
    zero_pages: int = 0
    packets: int = 0
    bytes: int = 0  # packet bytes, headers included


def describe_blocks(blocks: list[RamBlock]) -> bytes:
    """The START payload: the block list, so a destination refuses a guest of another shape."""
    return json.dumps([
        {"name": b.name, "id": b.block_id, "size": b.size_bytes, "page_size": b.page_size,
         "gpa": b.guest_phys_addr} for b in blocks
    ]).encode()


class PacketSender:
    """Sends packets from a thread of its own, so that the RAM saver encodes packet n+1 (guest
    memory into a packet buffer, in C without the GIL) while packet n goes out (sendmsg,
    without the GIL).  Packets go out in the order they were handed over.

    The saver takes a free buffer (:meth:`buffer`), encodes into it and hands it over with the
    function that sends it (:meth:`send`); :meth:`flush` waits until everything handed over
    is on the wire.  A send that fails is raised by the next :meth:`buffer` or :meth:`flush`;
    the packets handed over after it are dropped (the migration fails anyway).
    """

    def __init__(self, nbuffers: int = PACKET_BUFFERS, packet_bytes: int = PACKET_BYTES):
        self.packet_bytes = packet_bytes
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(nbuffers):
            self._free.put(bytearray(packet_bytes))
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def buffer(self) -> bytearray:
        """A buffer no packet in flight uses (waits for one)."""
        buf = self._free.get()
        if self.error is not None:
            self._free.put(buf)
            raise self.error
        return buf

    def give_back(self, buf: bytearray) -> None:
        """Return a buffer taken with :meth:`buffer` and not sent."""
        self._free.put(buf)

    def send(self, buf: bytearray, job: Callable[[], None]) -> None:
        """Run ``job`` (which sends ``buf``) in the sender thread; ``buf`` is free after it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pymig-ram-sender",
                                            daemon=True)
            self._thread.start()
        self._jobs.put((buf, job))

    def flush(self, *, raise_error: bool = True) -> None:
        """Wait until every packet handed over is sent (or dropped after a failure)."""
        if self._thread is not None:
            done = threading.Event()
            self._jobs.put((None, done.set))
            done.wait()
        if raise_error and self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the thread (after what was handed over); the sender can start again later."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()
        self.error = None

    def _loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            buf, job = item
            try:
                if buf is None or self.error is None:
                    job()
            except BaseException as exc:  # noqa: BLE001 - handed to the saver's thread
                self.error = exc
            finally:
                if buf is not None:
                    self._free.put(buf)


class RamSaver:
    """Source half of the RAM entry for one guest."""

    def __init__(self, guest, packet_bytes: int = PACKET_BYTES):
        self.guest = guest
        self.blocks: list[RamBlock] = list(guest.ram_blocks)
        self.bitmaps = [core.new_bitmap(b.npages) for b in self.blocks]
        self.counters = RamCounters()
        self.sender = PacketSender(packet_bytes=packet_bytes)
        self.dirty_pages_last_sync = 0
        self._logging = False
        self._lock = threading.Lock()
        self.cancelled: Callable[[], bool] = lambda: False
        # on_packet(nbytes, normal_pages, zero_pages) after each packet is on the wire
        self.on_packet: Callable[[int, int, int], None] = lambda nbytes, normal, zero: None

    # -- setup -------------------------------------------------------------------------------
    def setup(self, out) -> None:
        """Turn dirty logging on, then seed the bitmap with every page that may hold data."""
        self.guest.start_dirty_log()
        self._logging = True
        # Order matters: logging first, then mincore. A page first written after the mincore
        # is in the dirty log; one written before is resident, so it is in `touched`.
        for bitmap, block in zip(self.bitmaps, self.blocks):
            core.bitmap_merge(bitmap, block.touched(), block.npages)
        out.start(describe_blocks(self.blocks))

    # -- per iteration -----------------------------------------------------------------------
    def sync(self) -> int:
        """Merge the dirty log into the migration bitmap; returns pages newly dirtied."""
        newly = 0
        for bitmap, block, log in zip(self.bitmaps, self.blocks, self.guest.sync_dirty()):
            newly += core.bitmap_merge(bitmap, log, block.npages)
        self.dirty_pages_last_sync = newly
        return newly

    def pending_pages(self) -> int:
        return sum(core.bitmap_count(bm, b.npages) for bm, b in zip(self.bitmaps, self.blocks))

    def pending(self) -> int:
        """Bytes the destination still lacks, as far as the last sync knows."""
        return sum(core.bitmap_count(bm, b.npages) * b.page_size
                   for bm, b in zip(self.bitmaps, self.blocks))

    def iterate(self, out) -> bool:
        """Send every page the migration bitmap holds; True when it is empty.

        Returns once every packet is on the wire (a failure to send raises here)."""
        sender = self.sender
        try:
            for index, (block, bitmap) in enumerate(zip(self.blocks, self.bitmaps)):
                for first in self._chunks(bitmap, block.npages):
                    end = min(first + CLEAR_CHUNK_PAGES, block.npages)
                    # Re-arm dirty tracking for the chunk before any of it is read: a write
                    # after this is logged again, a write before it is in the copy.
                    self.guest.clear_dirty(index, first, end - first)
                    cursor = first
                    while True:
                        if self.cancelled():
                            raise MigrationError("migration cancelled")
                        buf = sender.buffer()
                        result = core.encode_packet(block.array, block.page_size,
                                                    block.block_id, bitmap, end, cursor, buf)
                        if result.nbytes == 0:  # the chunk is sent
                            sender.give_back(buf)
                            break
                        sender.send(buf, self._send_job(out, buf, result))
                        cursor = result.cursor
        except BaseException:
            sender.flush(raise_error=False)  # the thread stays off the stream from here
            raise
        sender.flush()
        return True

    def _chunks(self, bitmap, npages: int):
        """First pages of the clear chunks holding pending pages, in sending order."""
        words = CLEAR_CHUNK_PAGES // 64
        nchunks = (npages + CLEAR_CHUNK_PAGES - 1) // CLEAR_CHUNK_PAGES
        padded = np.zeros(nchunks * words, dtype=np.uint64)
        padded[: bitmap.size] = bitmap
        busy = np.flatnonzero(padded.reshape(nchunks, words).any(axis=1))
        return (busy * CLEAR_CHUNK_PAGES).tolist()

    def _send_job(self, out, buf: bytearray, result) -> Callable[[], None]:
        def job() -> None:
            out.part(memoryview(buf)[: result.nbytes], nocsum=True)
            c = self.counters
            c.normal_pages += result.normal_pages
            c.zero_pages += result.zero_pages
            c.packets += 1
            c.bytes += result.nbytes
            self.on_packet(result.nbytes, result.normal_pages, result.zero_pages)

        return job

    # -- stop-and-copy -----------------------------------------------------------------------
    def complete(self, out) -> None:
        """With the vCPUs stopped: last sync, every remaining page, then END."""
        self.sync()
        self.iterate(out)
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

    def load_start(self, payload) -> None:
        try:
            theirs = json.loads(bytes(payload))
        except ValueError as exc:
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
        info = core.packet_info(payload)
        block = self.by_id.get(info.block_id)
        if block is None:
            raise StateError(f"RAM packet for unknown block id {info.block_id}", entry=RAM_IDSTR)
        result = core.decode_packet(payload, block.array, block.page_size, block.block_id,
                                    block.npages, self.present[block.block_id])
        c = self.counters
        c.normal_pages += result.normal_pages
        c.zero_pages += result.zero_pages
        c.packets += 1
        c.bytes += len(payload)

    def load_end(self, payload) -> None:
        if not self.started:
            raise StateError("RAM end before the RAM block list", entry=RAM_IDSTR)
        self.ended = True


def _layout_text(blocks) -> str:
    if not isinstance(blocks, list):
        return repr(blocks)
    return ", ".join(f"{b.get('name')}={b.get('size')} bytes" if isinstance(b, dict) else repr(b)
                     for b in blocks)


def block_digests(blocks: list[RamBlock]) -> list[str]:
    """A digest per block of its whole content (tests compare source and destination)."""
    import xxhash

    return [xxhash.xxh3_128_hexdigest(b.mem) for b in blocks]

