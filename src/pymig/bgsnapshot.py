"""Background snapshots: a one-way snapshot of the guest as it was the moment the snapshot
began, taken while the guest runs on (QEMU's ``background-snapshot`` capability).

A live ``file:`` snapshot holds the guest as it was at its end, after pre-copy passes and a
stop-and-copy.  A background snapshot stops the vCPUs only to write-protect guest RAM with
userfaultfd and to encode the device state, then lets them run while it saves every page once,
each as it was at the stop::

    vCPUs stopped   note the pages that may hold data (mincore), write-protect all RAM
                    (UFFDIO_WRITEPROTECT), encode the device state and hold it
    vCPUs running   one pass over RAM, chunk by chunk: the chunk's pages (still protected, so
                    as they were at the stop) are copied to a staging shadow of the block, the
                    chunk is un-protected, and the copies are encoded and sent;
                    a write to a page still protected faults (WRITE|WP) to the fault thread:
                    the pages of its 64-page neighbourhood the pass has not taken yet are
                    copied aside, the neighbourhood is un-protected, and the vCPU goes on; the
                    copies go into the stream between chunks
    END ram, the device state held since the stop, EOF

The stream is a snapshot stream like any other (RAM, then the device state, then EOF): every
page once, the device state after RAM, so ``pymig incoming file:PATH`` restores it as it
restores any.  A vCPU that writes a page of the chunk being staged waits for that copy (a
memcpy of at most :data:`CHUNK_PAGES` pages), never for the encoding or the wire.

The copies, the fault thread's and the pass's, live in a shadow of each block (an anonymous
mapping reserved at the block's size, MAP_NORESERVE: only pages copied take memory, each at its
own offset so the encoder reads the shadow as it reads the block, and each is handed back
once it is encoded), so what they cost is one chunk plus the pages the guest writes before
the pass reaches them, at most the guest's RAM.  The two sets of pages never meet: a page
leaves the pending bitmap once, to the one or to the other.

Whatever ends the snapshot (success, failure, cancel), :meth:`WriteTracker.stop` stops the
fault thread, then un-protects all RAM and unregisters it, so no vCPU is left waiting and every
page is writable again.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import time
from typing import Callable

import numpy as np

from pymig import core
from pymig.errors import KvmError, MigrationError
from pymig.memory import RamBlock
from pymig.uffd import read_faults

log = logging.getLogger(__name__)

#: The pass takes (stages and un-protects) RAM this many pages at a time.
CHUNK_PAGES = 1 << 10
#: The trace gets a line of the pass this often.
TRACE_INTERVAL_S = 0.1
BACKINGS = ("anon", "memfd")


def check_guest(blocks: list[RamBlock]) -> None:
    """Refuse RAM this host cannot write-protect for a snapshot (before anything changes)."""
    for block in blocks:
        if block.backing not in BACKINGS:
            raise MigrationError(f"Background-snapshot is not compatible with guest memory "
                                 f"configuration: block {block.name!r} is {block.backing} "
                                 f"RAM (anonymous or memfd RAM only)")
    from pymig._core import kvm as _kvm

    try:
        fd = _kvm.userfaultfd_open(os.O_CLOEXEC | os.O_NONBLOCK)
    except KvmError as exc:
        raise MigrationError(f"Background-snapshot is not supported by host kernel: "
                             f"userfaultfd: {os.strerror(exc.errno)}") from None
    try:
        features, _ = _kvm.uffdio_api(fd, 0)
    except KvmError as exc:
        raise MigrationError(f"Background-snapshot is not supported by host kernel: "
                             f"UFFDIO_API: {os.strerror(exc.errno)}") from None
    finally:
        os.close(fd)
    wanted = _features(blocks)
    if features & wanted != wanted:
        raise MigrationError(f"Background-snapshot is not supported by host kernel: "
                             f"userfaultfd lacks write protection (features {features:#x})")


def _features(blocks: list[RamBlock]) -> int:
    from pymig._core import kvm as _kvm

    wanted = _kvm.FEATURE_THREAD_ID | _kvm.FEATURE_PAGEFAULT_FLAG_WP
    if any(b.backing == "memfd" for b in blocks):
        wanted |= _kvm.FEATURE_WP_HUGETLBFS_SHMEM
    return wanted


class WriteTracker:
    """Write protection of guest RAM for one background snapshot, and its fault thread.

    ``pending`` are the RAM saver's bitmaps (one per block): the pages still to save.  The
    pass takes pages from them with :meth:`take`; the fault thread takes a page it copies
    aside; under one lock, so that every page is saved exactly once.
    """

    def __init__(self, blocks: list[RamBlock], pending: list[np.ndarray]):
        self.blocks = blocks
        self.pending = pending
        self._lock = threading.Lock()
        self._copied = [core.new_bitmap(b.npages) for b in blocks]  # aside, not sent yet
        self._shadows: dict[int, tuple[mmap.mmap, np.ndarray]] = {}
        self._busy: tuple[int, int, int] | None = None  # (block index, first, end) being staged
        self._uffd = -1
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.fault_error: BaseException | None = None
        self.wp_faults = 0  # write faults on protected pages
        self.pages_copied = 0  # pages the fault thread copied aside before the pass reached them
        self.waited_for_pass = 0  # faults on a page the pass was staging: waited for it
        self.pages_total = 0  # pages to save, noted at the stop
        self.pages_saved = 0  # of them, in the stream
        self.protect_ms = 0.0

    # -- protection --------------------------------------------------------------------------
    def protect(self) -> None:
        """Register all RAM for write protection and protect it (vCPUs stopped); start the
        fault thread.  A failure leaves nothing registered."""
        from pymig._core import kvm as _kvm

        began = time.perf_counter()
        self.pages_total = sum(core.bitmap_count(bm, b.npages)
                               for bm, b in zip(self.pending, self.blocks))
        uffd = _kvm.userfaultfd_open(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            _kvm.uffdio_api(uffd, _features(self.blocks))
            for block in self.blocks:
                _kvm._unsafe_uffdio_register(uffd, block.address, block.size_bytes,
                                             _kvm.REGISTER_MODE_WP)
                _writeprotect(uffd, block.address, block.size_bytes, _kvm.WRITEPROTECT_MODE_WP)
        except BaseException:
            os.close(uffd)  # (closing unregisters and lifts the protection)
            raise
        self._uffd = uffd
        self._thread = threading.Thread(target=self._fault_loop, name="pymig-bgsnapshot-faults",
                                        daemon=True)
        self._thread.start()
        self.protect_ms = (time.perf_counter() - began) * 1000

    def stop(self) -> None:
        """Stop the fault thread, un-protect all RAM (waking any vCPU waiting), unregister it,
        free the copies aside.  Safe to call twice."""
        from pymig._core import kvm as _kvm

        if self._thread is not None:
            # first, so that it never un-protects a page of a range no longer registered; a
            # vCPU that faults meanwhile is woken by the un-protection right below
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
        if self._uffd >= 0:
            for block in self.blocks:
                try:
                    _writeprotect(self._uffd, block.address, block.size_bytes, 0)
                    _kvm._unsafe_uffdio_unregister(self._uffd, block.address, block.size_bytes)
                except (KvmError, MigrationError) as exc:  # closing the fd lifts it all the same
                    log.warning("background snapshot: releasing %s: %s", block.name, exc)
            os.close(self._uffd)
            self._uffd = -1
        for mem, _ in self._shadows.values():
            # (views of it may outlive this call: the mapping closes with the last of them)
            mem.madvise(mmap.MADV_DONTNEED)
        self._shadows.clear()
        if self._stop_r >= 0:
            os.close(self._stop_r)
            os.close(self._stop_w)
            self._stop_r = self._stop_w = -1

    # -- the pass ----------------------------------------------------------------------------
    def take(self, index: int, first: int, end: int) -> np.ndarray:
        """The pending pages of [first, end) of block ``index`` (``first`` a multiple of 64),
        as a bitmap of the block's size the pass encodes from; they are no longer pending, and
        a vCPU writing one waits until :meth:`release`."""
        words = slice(first // 64, (end + 63) // 64)
        taken = core.new_bitmap(self.blocks[index].npages)
        with self._lock:
            pending = self.pending[index]
            taken[words] = pending[words]
            pending[words] = 0
            self._busy = (index, first, end)
        return taken

    def stage(self, index: int, taken: np.ndarray) -> np.ndarray:
        """Copy the pages of ``taken`` (still protected: as they were at the stop) into the
        shadow of block ``index``, at their own offsets, and return the shadow to encode them
        from: the pages need no protection once copied, so a vCPU writing one waits for the
        copy only, never for the encoding and the wire."""
        block = self.blocks[index]
        with self._lock:
            shadow = self._shadow(index)
        ps = block.page_size
        to = shadow.ctypes.data
        for first, count in core.bitmap_runs(taken, block.npages):
            # (ctypes lets go of the GIL for the copy: the fault thread needs it meanwhile)
            at, nbytes = int(first) * ps, int(count) * ps
            ctypes.memmove(to + at, block.address + at, nbytes)
        return shadow

    def release(self, index: int, first: int, end: int) -> None:
        """[first, end) of block ``index`` is staged: un-protect it, waking the vCPUs that
        wrote there meanwhile."""
        block = self.blocks[index]
        with self._lock:
            self._busy = None
        _writeprotect(self._uffd, block.address + first * block.page_size,
                      (end - first) * block.page_size, 0)

    def take_copies(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(block index, shadow array, bitmap) of every block with pages copied aside since the
        last call, to encode from the shadow; :meth:`sent` hands their memory back."""
        out = []
        with self._lock:
            for index, copied in enumerate(self._copied):
                if not copied.any():
                    continue
                taken = copied.copy()
                copied[:] = 0
                out.append((index, self._shadows[index][1], taken))
        return out

    def sent(self, index: int, bitmap: np.ndarray, count: int) -> None:
        """The shadow's pages of ``bitmap`` (``count`` of them) are encoded: that memory goes
        back to the system."""
        block = self.blocks[index]
        with self._lock:
            self.pages_saved += count
            mem = self._shadows[index][0]
        for first, length in core.bitmap_runs(bitmap, block.npages):
            mem.madvise(mmap.MADV_DONTNEED, first * block.page_size, length * block.page_size)

    def pending_pages(self) -> int:
        with self._lock:
            return self.pages_total - self.pages_saved

    def check(self) -> None:
        """Raise if the fault thread stopped (vCPUs writing protected pages would hang)."""
        if self.fault_error is not None:
            raise MigrationError(f"background snapshot: the fault thread failed: "
                                 f"{self.fault_error}")

    def query(self) -> dict:
        """query-migrate's ``background-snapshot``: the fault counters and what is left."""
        with self._lock:
            return {"wp-faults": self.wp_faults, "pages-copied": self.pages_copied,
                    "waited-for-pass": self.waited_for_pass, "pages-total": self.pages_total,
                    "pages-saved": self.pages_saved, "protect-ms": round(self.protect_ms, 2)}

    # -- the fault thread --------------------------------------------------------------------
    def _fault_loop(self) -> None:
        try:
            read_faults(self._uffd, self._stop_r, self._fault)
        except BaseException as exc:  # noqa: BLE001 - the pass checks, stop() releases
            self.fault_error = exc
            log.error("background snapshot: fault thread stopped: %s", exc)

    def _fault(self, event: int, flags: int, address: int, tid: int) -> None:
        from pymig._core import kvm as _kvm

        if event != _kvm.EVENT_PAGEFAULT or not flags & _kvm.PAGEFAULT_FLAG_WP:
            return
        index = next((i for i, b in enumerate(self.blocks)
                      if b.address <= address < b.address + b.size_bytes), None)
        if index is None:
            return
        block = self.blocks[index]
        ps = block.page_size
        page = (address - block.address) // ps
        # The pages around it too (those of its bitmap word): a guest that writes one page
        # mostly writes its neighbours next, and each fault is a round trip through this thread.
        word = page >> 6
        first, end = word * 64, min(word * 64 + 64, block.npages)
        with self._lock:
            self.wp_faults += 1
            if self._busy is not None and self._busy[0] == index \
                    and self._busy[1] <= page < self._busy[2]:
                # the pass is staging it: release() un-protects it and wakes the vCPU
                self.waited_for_pass += 1
                return
            pending = self.pending[index]
            bits = int(pending[word])
            if bits:
                # not saved yet: as they are now (still protected, so as at the stop)
                to = self._shadow(index).ctypes.data
                for run_first, count in _runs(bits):
                    at = (first + run_first) * ps
                    ctypes.memmove(to + at, block.address + at, count * ps)
                pending[word] = 0
                self._copied[index][word] |= np.uint64(bits)
                self.pages_copied += bits.bit_count()
        _writeprotect(self._uffd, block.address + first * ps, (end - first) * ps, 0)

    def _shadow(self, index: int) -> np.ndarray:
        """Block ``index``'s shadow, mapped on first use (under the lock)."""
        found = self._shadows.get(index)
        if found is None:
            size = self.blocks[index].size_bytes
            mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                            | getattr(mmap, "MAP_NORESERVE", 0x4000))
            found = self._shadows[index] = (mem, np.frombuffer(mem, dtype=np.uint8))
        return found[1]


def _runs(bits: int):
    """(first bit, count) of each run of set bits in ``bits``, lowest first."""
    at = 0
    while bits:
        skip = (bits & -bits).bit_length() - 1
        bits >>= skip
        at += skip
        count = (~bits & (bits + 1)).bit_length() - 1
        yield at, count
        bits >>= count
        at += count


def _writeprotect(uffd: int, start: int, length: int, mode: int) -> None:
    """UFFDIO_WRITEPROTECT, again while the kernel says the mapping is changing (EAGAIN)."""
    from pymig._core import kvm as _kvm

    for _ in range(1000):
        try:
            _kvm._unsafe_uffdio_writeprotect(uffd, start, length, mode)
            return
        except KvmError as exc:
            if exc.errno != errno.EAGAIN:
                raise
    raise MigrationError("UFFDIO_WRITEPROTECT: the mapping kept changing (EAGAIN)")


def save_ram(saver, out, tracker: WriteTracker, check: Callable[[], None],
             trace: Callable[[], None]) -> None:
    """The pass: every pending page once, as it was at the stop; then END.

    ``check()`` raises to stop (a cancel); ``trace()`` writes a trace line (every
    :data:`TRACE_INTERVAL_S`, and once at the end)."""
    next_trace = time.monotonic() + TRACE_INTERVAL_S
    for index, block in enumerate(saver.blocks):
        for first in range(0, block.npages, CHUNK_PAGES):
            check()
            tracker.check()
            end = min(first + CHUNK_PAGES, block.npages)
            taken = tracker.take(index, first, end)
            try:
                shadow = tracker.stage(index, taken)
            finally:
                tracker.release(index, first, end)
            staged = taken.copy()  # send_pages clears the bits it sends
            tracker.sent(index, staged, saver.send_pages(out, index, shadow, taken, first, end))
            _send_copies(saver, out, tracker)
            if time.monotonic() >= next_trace:
                trace()
                next_trace = time.monotonic() + TRACE_INTERVAL_S
    _send_copies(saver, out, tracker)
    saver.sender.drain()
    trace()
    out.end(b"")


def _send_copies(saver, out, tracker: WriteTracker) -> None:
    for index, shadow, bitmap in tracker.take_copies():
        block = saver.blocks[index]
        sending = bitmap.copy()  # send_pages clears the bits it sends
        count = saver.send_pages(out, index, shadow, bitmap, 0, block.npages)
        tracker.sent(index, sending, count)
