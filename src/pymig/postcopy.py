"""Post-copy: the guest runs at the destination before all of its RAM has arrived.

Pre-copy moves a guest that writes faster than the link only by slowing it down.  Post-copy
(QEMU's ``postcopy-ram`` capability) switches over at once instead: the source stops the
vCPUs and sends the device state and the list of pages the destination does not hold yet;
the destination registers its guest RAM with userfaultfd, runs the guest, and a vCPU that
touches a missing page waits while the destination asks the source for it.  The source
sends the pages asked for first and pushes every other one behind them::

    source                                          destination
    header, config, ADVISE ───────────────────────► postcopy-ram set? userfaultfd works?
    pre-copy passes (RAM PARTs) ──────────────────► decoded into fresh memory
    (switch: the vCPUs stop, a last sync)
    LISTEN: the pages still to send ──────────────► drop the stale copies it holds of them,
                                                    register RAM (MISSING), fault thread
    device state, EOF ────────────────────────────► state loaded
                      ◄──────────────────────────── LOADED
    COMMIT ───────────────────────────────────────► vCPUs run
                      ◄──────────────────────────── ACK (start time)
    RAM PARTs: pages asked for first, then the rest  placed with UFFDIO_COPY / UFFDIO_ZEROPAGE
                      ◄──────────────────────────── PAGE_REQUEST (a vCPU faulted)
    END ram, EOF ─────────────────────────────────► every page placed: unregister
                      ◄──────────────────────────── SHUT

With ``postcopy-preempt`` the source opens a second connection right after ADVISE (the
preempt channel), and after COMMIT sends each page asked for there the moment the request
comes, from a thread of its own, while the push goes on on the main channel: a page asked for
never waits behind pushed data (QEMU's design).

A page is placed once: UFFDIO_COPY onto a page already there fails with EEXIST and changes
nothing, so the page a vCPU asked for and the same page pushed behind it cannot both land,
whichever comes first.  Pages the destination received during pre-copy and the guest has not
written since are present and never fault; pages it received and the guest wrote again are
dropped at LISTEN (``MADV_DONTNEED``, ``MADV_REMOVE`` for memfd RAM) so that they fault
like pages never sent.  A fault on a page that is neither in the list nor present is a page
the source never had data in: it is placed as a zero page on the spot.

From COMMIT on neither side holds the whole guest: the destination runs it, the source holds
the pages not yet sent.  So a connection lost then fails neither side and loses nothing: the
source keeps its paused copy of what it did not send, and the destination keeps its guest
with the vCPUs that touch a missing page waiting in their fault (``postcopy-paused``).
Closing the userfaultfd would release them onto zero-filled pages: only a guest being
discarded does it (:meth:`PostcopyDestination.abandon`).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pymig import core, stream
from pymig.errors import KvmError, MigrationError, StateError, StreamError
from pymig.memory import RamBlock
from pymig.uffd import read_faults

log = logging.getLogger(__name__)

POSTCOPY_IDSTR = "pymig.postcopy"
POSTCOPY_SECTION_ID = 0xFFFF_FFFE  # outside the registry's ids, as the config's
POSTCOPY_VERSION = 1
OP_ADVISE = 1
OP_LISTEN = 2
OP_RESUME = 3  # the first record of a recovered connection: the pages follow again
OP_PREEMPT = 4  # the first record of a preempt channel: the token ADVISE / RESUME gave
_OP = struct.Struct("<B3x")  # op, reserved
#: ADVISE and RESUME with the postcopy-preempt capability: op, flags, reserved, the token
#: the preempt channel's PREEMPT record repeats (which ties that connection to this one)
_WITH_TOKEN = struct.Struct("<BB2xQ")
FLAG_PREEMPT = 0x01
_LISTEN_HEAD = struct.Struct("<I")  # block count
_LISTEN_BLOCK = struct.Struct("<IIQ")  # block id, reserved, npages; then the bitmap words
#: Pushed packets are at most this large, so that a page asked for waits behind one of them
#: at most (QEMU sends asked-for pages on a channel of their own for the same reason).
PUSH_PACKET_BYTES = 128 << 10
#: The page-request queue is read this often while pushing (between packets: each packet is
#: one check, this is only the wait when there is nothing to push).
REQUEST_POLL_S = 0.05
#: The preempt channel carries an empty RAM packet after this long without a page.
PREEMPT_KEEPALIVE_S = 1.0
#: The source writes a trace line of the post-copy phase this often.
TRACE_INTERVAL_S = 0.1


def advise_payload(token: int | None = None) -> bytes:
    """ADVISE; with a ``token``, a preempt channel follows (postcopy-preempt)."""
    return _op_payload(OP_ADVISE, token)


def _op_payload(op: int, token: int | None) -> bytes:
    if token is None:
        return _OP.pack(op)
    return _WITH_TOKEN.pack(op, FLAG_PREEMPT, token)


def new_token() -> int:
    """A preempt channel's token: only the source that sent it knows it."""
    return int.from_bytes(os.urandom(8), "little")


#: During post-copy each end's socket queues at most about this much: a page asked for waits
#: behind whatever pushed pages are queued ahead of it, so the less, the sooner it comes.
QUEUE_BYTES = 256 << 10


def shrink_queue(channel, option: int) -> None:
    """Hold ``channel``'s socket queue (SO_SNDBUF or SO_RCVBUF) to :data:`QUEUE_BYTES`, where
    it is a socket; best effort."""
    import socket

    sock = getattr(channel, "sock", None)
    if isinstance(sock, socket.socket):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, QUEUE_BYTES)
        except OSError as exc:
            log.debug("post-copy: cannot shrink the socket queue: %s", exc)


def advise(writer: "stream.StreamWriter", token: int | None = None) -> None:
    """ADVISE, right after the configuration: the source may switch to post-copy, so the
    destination checks now, while the guest still runs at the source, that it can.  With
    ``token`` (postcopy-preempt) the source opens the preempt channel right after it."""
    writer.full(POSTCOPY_SECTION_ID, POSTCOPY_IDSTR, 0, POSTCOPY_VERSION,
                advise_payload(token))


def resume(writer: "stream.StreamWriter", token: int | None = None) -> None:
    """RESUME, after a recovered connection's stream header: post-copy's pages follow (and,
    with ``token``, a new preempt channel opens right after it)."""
    writer.full(POSTCOPY_SECTION_ID, POSTCOPY_IDSTR, 0, POSTCOPY_VERSION,
                _op_payload(OP_RESUME, token))


def open_preempt(writer: "stream.StreamWriter", token: int) -> None:
    """A preempt channel's first records: the stream header, then PREEMPT with the token of
    the main channel's ADVISE or RESUME."""
    writer.write_header()
    writer.full(POSTCOPY_SECTION_ID, POSTCOPY_IDSTR, 0, POSTCOPY_VERSION,
                _WITH_TOKEN.pack(OP_PREEMPT, 0, token))


def listen_payload(blocks: list[RamBlock], bitmaps: list[np.ndarray]) -> bytes:
    """LISTEN: per block, the bitmap (KVM layout, uint64 little-endian words) of the pages
    the destination must fault for."""
    parts = [_OP.pack(OP_LISTEN), _LISTEN_HEAD.pack(len(blocks))]
    for block, bitmap in zip(blocks, bitmaps):
        words = (block.npages + 63) // 64
        parts.append(_LISTEN_BLOCK.pack(block.block_id, 0, block.npages))
        parts.append(np.ascontiguousarray(bitmap[:words], dtype="<u8").tobytes())
    return b"".join(parts)


def parse_op(payload, offset: int) -> int:
    """The operation of a ``pymig.postcopy`` record; refuses anything else."""
    if len(payload) < _OP.size:
        raise StreamError(offset, f"{POSTCOPY_IDSTR} record of {len(payload)} bytes is too short")
    op = payload[0]
    if op in (OP_ADVISE, OP_RESUME, OP_PREEMPT):
        parse_token(payload, offset)
        return op
    if op != OP_LISTEN or any(bytes(payload[1:4])):
        raise StreamError(offset, f"unknown {POSTCOPY_IDSTR} operation {op} (or reserved "
                                  f"bytes set)")
    return op


def parse_token(payload, offset: int) -> int | None:
    """The preempt channel's token of an ADVISE, RESUME or PREEMPT record (None: an ADVISE
    or RESUME without one); anything else in their few bytes is refused."""
    view = bytes(payload[:_WITH_TOKEN.size])
    op = view[0]
    if len(payload) == _OP.size and op != OP_PREEMPT and not any(view[1:4]):
        return None
    if len(payload) != _WITH_TOKEN.size:
        raise StreamError(offset, f"{POSTCOPY_IDSTR} operation {op} of {len(payload)} bytes; "
                                  f"it takes {_OP.size} or {_WITH_TOKEN.size}")
    _, flags, token = _WITH_TOKEN.unpack(view)
    expected = 0 if op == OP_PREEMPT else FLAG_PREEMPT
    if flags != expected or any(view[2:4]):
        raise StreamError(offset + 1, f"{POSTCOPY_IDSTR} operation {op} with flags "
                                      f"0x{flags:02x} (or reserved bytes set)")
    return token


def parse_listen(payload, blocks: list[RamBlock], offset: int) -> dict[int, np.ndarray]:
    """The LISTEN bitmaps by block id, held to this guest's blocks: the same blocks in the
    same order, exactly as many words as each needs, no bit past a block's last page."""
    view = memoryview(payload)
    expected = _OP.size + _LISTEN_HEAD.size + sum(
        _LISTEN_BLOCK.size + 8 * ((b.npages + 63) // 64) for b in blocks)
    if len(view) != expected:
        raise StreamError(offset, f"{POSTCOPY_IDSTR} LISTEN of {len(view)} bytes; this guest's "
                                  f"RAM takes {expected}")
    at = _OP.size
    (count,) = _LISTEN_HEAD.unpack_from(view, at)
    if count != len(blocks):
        raise StreamError(offset + at, f"LISTEN names {count} RAM blocks; this guest has "
                                       f"{len(blocks)}")
    at += _LISTEN_HEAD.size
    bitmaps = {}
    for block in blocks:
        block_id, reserved, npages = _LISTEN_BLOCK.unpack_from(view, at)
        if (block_id, reserved, npages) != (block.block_id, 0, block.npages):
            raise StreamError(offset + at, f"LISTEN block ({block_id}, {npages} pages) is not "
                                           f"this guest's ({block.block_id}, {block.npages})")
        at += _LISTEN_BLOCK.size
        words = (block.npages + 63) // 64
        bitmap = np.frombuffer(view[at:at + 8 * words], dtype="<u8").astype(np.uint64)
        tail = block.npages % 64
        if tail and int(bitmap[-1]) >> tail:
            raise StreamError(offset + at + 8 * (words - 1),
                              f"LISTEN bitmap of block {block_id} marks pages past its end")
        bitmaps[block_id] = bitmap
        at += 8 * words
    return bitmaps


def check_preempt(postcopy: bool, preempt: bool, scheme: str) -> None:
    """Refuse postcopy-preempt where it cannot work: without postcopy-ram, or on a transport
    that gives one stream only (exec:, fd:, file:)."""
    if not preempt:
        return
    if not postcopy:
        raise ValueError("the postcopy-preempt capability needs postcopy-ram")
    if scheme not in PREEMPT_SCHEMES:
        raise ValueError(f"the postcopy-preempt capability needs a second connection for the "
                         f"preempt channel, which a {scheme}: migration cannot make (tcp: and "
                         f"unix: can)")


#: The transports on which a source can open the preempt channel beside the main one.
PREEMPT_SCHEMES = ("tcp", "unix")


# -- source --------------------------------------------------------------------------------

@dataclass
class SourceCounters:
    """What the source sent after the switch (query-migrate's ``postcopy``)."""

    requests: int = 0  # PAGE_REQUEST messages received (some after every page went)
    pages_requested: int = 0  # pages sent because a request named them
    pages_pushed: int = 0  # pages sent in the background
    pages_preempt: int = 0  # of the pages requested, those sent on the preempt channel
    bad_requests: int = 0  # requests outside guest RAM, ignored


class PostcopySource:
    """The source's half after the switch: serve page requests first, push the rest.

    With a preempt channel (postcopy-preempt) a thread of its own sends the pages asked for
    there the moment a request comes, while the push goes on on the main channel: a page
    asked for waits behind no pushed packet, only behind other pages asked for."""

    def __init__(self, saver, stats=None):
        self.saver = saver
        self.stats = stats
        self.counters = SourceCounters()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._by_id = {b.block_id: i for i, b in enumerate(saver.blocks)}
        # the pending bitmaps and what counts the pages sent: the push and the preempt
        # thread each take a page's bit under it, so that a page goes once
        self._lock = threading.Lock()
        self._stop_preempt = threading.Event()
        self._preempt_thread: threading.Thread | None = None
        self.preempt_error: BaseException | None = None
        self.listened: list[np.ndarray] | None = None  # LISTEN's bitmaps, from the switch on
        self._scratch: dict[int, np.ndarray] = {}  # per block: the pages of one request

    def page_request(self, message: "stream.PageRequest") -> None:
        """From the return path's thread: a vCPU at the destination waits for these pages."""
        self.counters.requests += 1
        self._requests.put(message)

    def listen(self, writer: "stream.StreamWriter") -> int:
        """The LISTEN record: the pages the destination must fault for (a final sync with the
        vCPUs stopped went before).  Returns how many."""
        saver = self.saver
        writer.full(POSTCOPY_SECTION_ID, POSTCOPY_IDSTR, 0, POSTCOPY_VERSION,
                    listen_payload(saver.blocks, saver.bitmaps))
        # what the destination faults for, for as long as it may: a recovery sends it again
        self.listened = [bitmap.copy() for bitmap in saver.bitmaps]
        return saver.pending_pages()

    def rewind(self) -> None:
        """After a lost connection: every page LISTEN named is pending again.  What went before
        the cut may have died in the sockets' queues; the destination skips the pages it
        placed (a page is placed once), and its waiting vCPUs ask again first."""
        for bitmap, listened in zip(self.saver.bitmaps, self.listened):
            bitmap[:] = listened
        self._requests = queue.SimpleQueue()
        self._scratch = {}  # (a send cut short may have left bits there)
        self.preempt_error = None

    def start_preempt(self, out) -> None:
        """Serve the requests from now on in a thread of their own, on ``out`` (the RAM
        section's writer on the preempt channel), until :meth:`stop_preempt`: after the push
        too, as long as the destination has not placed every page (pushed pages still queued
        towards it are what a vCPU would wait behind)."""
        self._stop_preempt.clear()
        self.preempt_error = None
        self._preempt_thread = threading.Thread(target=self._preempt_loop, args=(out,),
                                                name="pymig-postcopy-preempt", daemon=True)
        self._preempt_thread.start()

    def stop_preempt(self) -> None:
        thread, self._preempt_thread = self._preempt_thread, None
        if thread is not None:
            self._stop_preempt.set()
            thread.join()

    def run(self, out, check: Callable[[], None]) -> None:
        """Send every page still pending, those asked for first (between packets, or at once
        on the preempt channel if :meth:`start_preempt` started its thread), then END;
        ``check()`` raises to stop (the destination failed, the return path was lost)."""
        saver = self.saver
        buf = bytearray(PUSH_PACKET_BYTES)
        compress = saver._compress_state if saver.compress else None
        traced = time.monotonic()
        preempt = self._preempt_thread is not None
        for index, (block, bitmap) in enumerate(zip(saver.blocks, saver.bitmaps)):
            cursor = 0
            while True:
                check()
                if not preempt:
                    self._serve(out, buf)
                elif self.preempt_error is not None:
                    raise self.preempt_error
                if self.stats is not None and time.monotonic() - traced >= TRACE_INTERVAL_S:
                    traced = time.monotonic()
                    self.stats.record_postcopy(self.query(), saver.pending())
                with self._lock:
                    result = core.encode_packet(block.array, block.page_size, block.block_id,
                                                bitmap, block.npages, cursor, buf, compress)
                if result.nbytes == 0:
                    break
                self._send(out, buf, result, block.page_size)
                with self._lock:
                    self.counters.pages_pushed += result.normal_pages + result.zero_pages
                cursor = result.cursor
        if not preempt:
            self._serve(out, buf)
        out.end(b"")
        if self.stats is not None:
            self.stats.record_postcopy(self.query(), 0)

    def _preempt_loop(self, out) -> None:
        """The preempt channel's thread: each request served as it comes."""
        buf = bytearray(PUSH_PACKET_BYTES)
        sent = time.monotonic()
        try:
            while not self._stop_preempt.is_set():
                try:
                    request = self._requests.get(timeout=REQUEST_POLL_S)
                except queue.Empty:
                    if time.monotonic() - sent >= PREEMPT_KEEPALIVE_S:
                        # a guest that faults on nothing for a while: the destination's
                        # progress timeout holds for this channel too
                        self.saver.keep_alive(out)
                        sent = time.monotonic()
                    continue
                self._serve_one(out, buf, request, preempt=True)
                sent = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - the push raises it
            self.preempt_error = exc
            # (once every page is placed the destination closes it: nothing lost)
            log.info("post-copy: the preempt channel ended: %s", exc)

    def _serve(self, out, buf: bytearray) -> None:
        """Send what the requests received so far ask for and is still pending."""
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            self._serve_one(out, buf, request)

    def _serve_one(self, out, buf: bytearray, request, preempt: bool = False) -> None:
        saver = self.saver
        index = self._by_id.get(request.block_id)
        block = saver.blocks[index] if index is not None else None
        if (block is None or request.npages < 1
                or request.first_page >= block.npages
                or request.npages > block.npages - request.first_page):
            # The destination's word, bounded: never a read outside guest RAM.
            self.counters.bad_requests += 1
            log.warning("post-copy: ignoring a page request outside guest RAM (block %d, "
                        "pages %d+%d)", request.block_id, request.first_page, request.npages)
            return
        end = request.first_page + request.npages
        cursor = request.first_page
        bitmap = saver.bitmaps[index]
        if preempt and self.listened is not None:
            # Every page asked for goes, sent already or not: one pushed is queued behind
            # pushed data on the main channel, which is what the vCPU would wait for; the
            # destination places whichever copy comes first and skips the other.  (The
            # guest is stopped here: both copies are the same.)
            bitmap = self._request_bitmap(index, request.first_page, request.npages)
        while cursor < end:
            # Pages already sent have no bit left: they are on their way.
            with self._lock:
                result = core.encode_packet(block.array, block.page_size, block.block_id,
                                            bitmap, end, cursor, buf, None)
            if result.nbytes == 0:
                break
            self._send(out, buf, result, block.page_size)
            with self._lock:
                pages = result.normal_pages + result.zero_pages
                self.counters.pages_requested += pages
                if preempt:
                    self.counters.pages_preempt += pages
            cursor = result.cursor

    def _request_bitmap(self, index: int, first: int, count: int) -> np.ndarray:
        """The pages [first, first + count) of block ``index`` that LISTEN named, as a bitmap
        of their own (encoding clears it again); they leave the pending bitmap."""
        scratch = self._scratch.get(index)
        if scratch is None:
            scratch = self._scratch[index] = core.new_bitmap(self.saver.blocks[index].npages)
        with self._lock:
            _copy_bits(self.listened[index], scratch, first, count)
            _clear_bits(self.saver.bitmaps[index], first, count)
        return scratch

    def _send(self, out, buf: bytearray, result, page_size: int) -> None:
        out.part(memoryview(buf)[:result.nbytes], nocsum=True,
                 stands_for=result.normal_pages * page_size)
        with self._lock:
            self.saver.page_bytes_sent += (result.normal_pages + result.zero_pages) * page_size
            self.saver.on_packet(result)

    def query(self) -> dict:
        c = self.counters
        return {"requests": c.requests, "pages-requested": c.pages_requested,
                "pages-pushed": c.pages_pushed, "pages-preempt": c.pages_preempt}


# -- destination ---------------------------------------------------------------------------

def check_backing(blocks: list[RamBlock]) -> None:
    """Refuse RAM that post-copy cannot serve here (before anything is changed)."""
    for block in blocks:
        if block.backing not in ("anon", "memfd", "hugetlb"):
            raise MigrationError(f"post-copy needs anonymous, memfd or hugetlb guest RAM; "
                                 f"block {block.name!r} is {block.backing}")
        if block.backing == "hugetlb":
            huge = huge_page_pages(block)
            if huge < 1 or block.npages % huge:
                raise MigrationError(f"post-copy places whole huge pages: block "
                                     f"{block.name!r} is not made of them")


def huge_page_pages(block: RamBlock) -> int:
    """How many of the block's pages make one of its host pages (1 unless hugetlb)."""
    if block.backing != "hugetlb":
        return 1
    from pymig.memory import hugetlb_pool

    return hugetlb_pool()[0] // block.page_size


def probe_userfaultfd() -> None:
    """Open a userfaultfd and shake hands with it, or say why this host cannot (at ADVISE,
    so that a source learns it before its guest stops)."""
    from pymig._core import kvm as _kvm

    try:
        fd = _kvm.userfaultfd_open(os.O_CLOEXEC | os.O_NONBLOCK)
    except KvmError as exc:
        raise MigrationError(f"post-copy needs userfaultfd, which this host refuses: "
                             f"{os.strerror(exc.errno)} (vm.unprivileged_userfaultfd, or a "
                             f"kernel without it)") from None
    try:
        _kvm.uffdio_api(fd, _kvm.FEATURE_THREAD_ID)
    except KvmError as exc:
        raise MigrationError(f"post-copy: the userfaultfd API handshake failed: "
                             f"{os.strerror(exc.errno)}") from None
    finally:
        os.close(fd)


@dataclass
class Blocktime:
    """Time vCPUs spent waiting for pages (QEMU's postcopy-blocktime), from the moment the
    fault thread read each fault to the moment its page was placed."""

    vcpus: int
    faults: int = 0  # faults that waited for a page from the source
    wait_s: float = 0.0  # their waits added up
    all_blocked_s: float = 0.0  # time every vCPU thread was waiting at once
    per_thread_s: dict[int, float] = field(default_factory=dict)
    blocked: dict[int, float] = field(default_factory=dict)  # thread id -> fault time
    _all_since: float | None = None

    def fault(self, tid: int, now: float) -> None:
        if tid in self.blocked:
            return
        self.blocked[tid] = now
        if len(self.blocked) >= self.vcpus and self._all_since is None:
            self._all_since = now

    def placed(self, tid: int, now: float) -> None:
        since = self.blocked.pop(tid, None)
        if since is None:
            return
        self.faults += 1
        self.wait_s += now - since
        self.per_thread_s[tid] = self.per_thread_s.get(tid, 0.0) + now - since
        if self._all_since is not None and len(self.blocked) < self.vcpus:
            self.all_blocked_s += now - self._all_since
            self._all_since = None


class PostcopyDestination:
    """The destination's half: userfaultfd on guest RAM, the fault thread, page placement.

    ``request(block_id, first_page, npages)`` sends a PAGE_REQUEST (from the fault thread);
    ``vcpu_threads()`` gives the thread ids of the vCPUs (for per-vCPU blocktime), or None.
    """

    def __init__(self, guest, request: Callable[[int, int, int], None],
                 vcpu_threads: Callable[[], list[int] | None] | None = None):
        self.guest = guest
        self.blocks: list[RamBlock] = list(guest.ram_blocks)
        self.by_id = {b.block_id: b for b in self.blocks}
        self._request = request
        self._vcpu_threads = vcpu_threads or (lambda: None)
        self._lock = threading.Lock()
        self.missing: dict[int, np.ndarray] = {}
        self._asked: dict[tuple[int, int], list[int]] = {}  # page -> thread ids waiting on it
        self.blocktime = Blocktime(vcpus=max(guest.vcpu_count, 1))
        self.requests = 0
        self.pages_requested = 0  # placed pages a vCPU was waiting for
        self.pages_pushed = 0  # placed pages nobody waited for
        self.zero_faults = 0  # faults on pages the source never had data in
        self.pages_preempt = 0  # placed pages that came on the preempt channel
        self.missing_pages = 0
        self._uffd = -1
        self._staging: dict[int, tuple[mmap.mmap, np.ndarray, np.ndarray]] = {}
        self._zero = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.fault_error: BaseException | None = None
        self.requests_lost = False  # the return path broke: faults now wait for a recovery
        self.listen_ms: dict = {}
        # hugetlb blocks: a huge page is placed whole, once every page of it is in the
        # staging area (``arrived``); both channels' packets go through one staging area
        # under one lock, so that a huge page gathers what either brings
        self._huge: dict[int, int] = {b.block_id: huge_page_pages(b) for b in self.blocks
                                      if b.backing == "hugetlb"}
        self._arrived: dict[int, np.ndarray] = {}
        self._huge_lock = threading.Lock()

    # -- LISTEN ------------------------------------------------------------------------------
    def listen(self, payload, offset: int) -> None:
        """Apply LISTEN: drop the stale pages, register RAM with userfaultfd, start the fault
        thread; from here on a missing page is placed, never written."""
        from pymig._core import kvm as _kvm

        began = time.perf_counter()
        bitmaps = parse_listen(payload, self.blocks, offset)
        check_backing(self.blocks)
        self.missing = bitmaps
        stale_runs = 0
        self.missing_pages = sum(core.bitmap_count(bitmaps[b.block_id], b.npages)
                                 for b in self.blocks)
        for block in self.blocks:
            # What the destination holds of a page the guest wrote since it went is stale:
            # drop it, so that the page faults as one never sent did.
            stale = bitmaps[block.block_id] & block.touched()
            if block.block_id in self._huge:
                stale_runs += self._listen_huge(block, bitmaps[block.block_id], stale)
                continue
            runs = core.bitmap_runs(stale, block.npages)
            block.discard(runs)
            stale_runs += len(runs)
            block.no_hugepages()  # pages are placed 4 KiB at a time
        discarded = time.perf_counter()
        uffd = _kvm.userfaultfd_open(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            features, _ = _kvm.uffdio_api(uffd, _kvm.FEATURE_THREAD_ID)
            for block in self.blocks:
                _kvm._unsafe_uffdio_register(uffd, block.address, block.size_bytes,
                                             _kvm.REGISTER_MODE_MISSING)
        except BaseException:
            os.close(uffd)
            raise
        self._uffd = uffd
        # inside the downtime: what LISTEN cost, and how much of it went on stale pages
        self.listen_ms = {"discard": round((discarded - began) * 1000, 2),
                          "stale-runs": stale_runs,
                          "register": round((time.perf_counter() - discarded) * 1000, 2)}
        self._thread = threading.Thread(target=self._fault_loop, name="pymig-postcopy-faults",
                                        daemon=True)
        self._thread.start()
        log.info("post-copy: %d pages to come, RAM registered with userfaultfd",
                 self.missing_pages)

    def _listen_huge(self, block: RamBlock, listened: np.ndarray, stale: np.ndarray) -> int:
        """LISTEN on a hugetlb block: a huge page holding a stale page is dropped whole, so
        the pages of it that are not stale go to the staging area first, to be placed with
        the rest once that comes.  Every page LISTEN does not name has arrived already (held,
        or zero).  Returns the runs of huge pages dropped."""
        huge, ps = self._huge[block.block_id], block.page_size
        _, array, present = self._staging_for(block, False)
        arrived = np.bitwise_not(listened)
        tail = block.npages % 64
        if tail:
            arrived[-1] &= np.uint64((1 << tail) - 1)
        self._arrived[block.block_id] = arrived
        indices = core.bitmap_indices(stale, block.npages)
        # (inside the downtime: one step per huge page, none per stale page)
        firsts = np.unique(np.asarray(indices, dtype=np.int64) // huge) * huge
        runs = []
        for first in firsts.tolist():
            at, length = first * ps, huge * ps
            array[at:at + length] = block.array[at:at + length]
            core.bitmap_set_range(present, block.npages, first, huge)
            if runs and runs[-1][0] + runs[-1][1] == first:
                runs[-1][1] += huge
            else:
                runs.append([first, huge])
        block.discard(runs)
        return len(runs)

    # -- placing pages -----------------------------------------------------------------------
    def place(self, payload, preempt: bool = False) -> None:
        """Decode a RAM packet (checked whole first, as always) into a staging area, then
        place each of its pages that is still missing.  The main channel's thread and the
        preempt channel's (``preempt``) place at once, each through a staging area of its
        own."""
        from pymig._core import kvm as _kvm

        info = core.packet_info(payload)
        block = self.by_id.get(info.block_id)
        if block is None:
            raise StateError(f"RAM packet for unknown block id {info.block_id}", entry="ram")
        if block.block_id in self._huge:
            with self._huge_lock:
                self._place_huge(_kvm, block, payload, preempt)
            return
        staging, array, present = self._staging_for(block, preempt)
        result = core.decode_packet(payload, array, block.page_size, block.block_id,
                                    block.npages, present)
        runs = core.packet_runs(payload, block.page_size, block.block_id, block.npages)
        ps = block.page_size
        placed_runs = []
        for first, count in runs.tolist():
            data = bool((int(present[first >> 6]) >> (first & 63)) & 1)
            placed = self._place_run(_kvm, block, array, first, count, data)
            if data:
                _clear_bits(present, first, count)
                _madvise(array.ctypes.data + first * ps, count * ps, mmap.MADV_DONTNEED)
            placed_runs.append((first, count))
            del placed
        self._placed(block, placed_runs, result.normal_pages + result.zero_pages, preempt)

    def _placed(self, block: RamBlock, placed_runs, pages: int, preempt: bool) -> None:
        """Runs of pages are placed: no longer missing; the threads waiting for them run."""
        now = time.monotonic()
        with self._lock:
            missing = self.missing[block.block_id]
            for first, count in placed_runs:
                _clear_bits(missing, first, count)
            waited = 0
            for key in [k for k in self._asked if k[0] == block.block_id
                        and any(f <= k[1] < f + c for f, c in placed_runs)]:
                for tid in self._asked.pop(key):
                    self.blocktime.placed(tid, now)
                waited += 1
            self.pages_requested += waited
            self.pages_pushed += pages - waited
            if preempt:
                self.pages_preempt += pages

    def _place_huge(self, _kvm, block: RamBlock, payload, preempt: bool) -> None:
        """A packet for a hugetlb block: its pages join the staging area, and each huge page
        it completes is placed whole (UFFDIO_COPY of the huge page)."""
        huge, ps = self._huge[block.block_id], block.page_size
        _, array, present = self._staging_for(block, False)
        arrived = self._arrived[block.block_id]
        result = core.decode_packet(payload, array, ps, block.block_id, block.npages, present)
        runs = core.packet_runs(payload, ps, block.block_id, block.npages).tolist()
        firsts = set()
        for first, count in runs:
            core.bitmap_set_range(arrived, block.npages, first, count)
            firsts.update(range(first - first % huge, first + count, huge))
        placed_runs = []
        for first in sorted(firsts):
            if _count_bits(arrived, first, huge) < huge:
                continue
            at, length = first * ps, huge * ps
            with self._lock:
                wanted = _count_bits(self.missing[block.block_id], first, huge)
            if wanted:  # (else placed already: what came again is dropped)
                done, err = 0, errno.EAGAIN
                while err == errno.EAGAIN and done < length:
                    more, err = _kvm._unsafe_uffdio_copy(self._uffd, block.address + at + done,
                                                         array.ctypes.data + at + done,
                                                         length - done)
                    done += more
                placed_runs.append((first, huge))  # (EEXIST: a zero page was, and stays)
            _clear_bits(present, first, huge)
            _madvise(array.ctypes.data + at, length, mmap.MADV_DONTNEED)
        self._placed(block, placed_runs, result.normal_pages + result.zero_pages, preempt)

    def _place_run(self, _kvm, block: RamBlock, array: np.ndarray, first: int, count: int,
                   data: bool) -> int:
        """Place pages [first, first + count) of ``block`` (from the staging copy, or zero);
        pages already there are skipped.  Returns the pages placed."""
        ps = block.page_size
        at, end = first, first + count
        placed = 0
        while at < end:
            dst = block.address + at * ps
            length = (end - at) * ps
            if data:
                done, err = _kvm._unsafe_uffdio_copy(self._uffd, dst, array.ctypes.data + at * ps,
                                                     length)
            else:
                done, err = self._place_zero(_kvm, block, dst, length)
            placed += done // ps
            at += done // ps
            if err == errno.EEXIST:
                at += 1  # placed already (asked for and pushed, or zero-faulted): skip it
        return placed

    def _place_zero(self, _kvm, block: RamBlock, dst: int, length: int):
        if block.backing == "anon":
            return _kvm._unsafe_uffdio_zeropage(self._uffd, dst, length)
        # shmem takes no UFFDIO_ZEROPAGE: copy from zeroes
        zero = self._zero_source(length)
        return _kvm._unsafe_uffdio_copy(self._uffd, dst, zero.ctypes.data, length)

    def _zero_source(self, length: int) -> np.ndarray:
        if self._zero is None or self._zero.size < length:
            self._zero = np.zeros(max(length, 1 << 20), dtype=np.uint8)
        return self._zero

    def _staging_for(self, block: RamBlock, preempt: bool):
        """A private, lazily backed mapping of the block's size: packets decode into it at
        their pages' offsets (decode_packet's bounds hold there too), each placed run is
        dropped from it again, so it holds about one packet at a time."""
        key = (preempt, block.block_id)
        with self._lock:
            staged = self._staging.get(key)
        if staged is None:
            mem = mmap.mmap(-1, block.size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                            | getattr(mmap, "MAP_NORESERVE", 0x4000))
            staged = (mem, np.frombuffer(mem, dtype=np.uint8), core.new_bitmap(block.npages))
            with self._lock:
                self._staging[key] = staged
        return staged

    @property
    def complete(self) -> bool:
        """Whether every page the source was to send has been placed."""
        with self._lock:
            return all(not core.bitmap_count(self.missing[b.block_id], b.npages)
                       for b in self.blocks)

    def pages_left(self) -> int:
        with self._lock:
            return sum(core.bitmap_count(self.missing[b.block_id], b.npages)
                       for b in self.blocks)

    # -- the fault thread --------------------------------------------------------------------
    def _fault_loop(self) -> None:
        try:
            read_faults(self._uffd, self._stop_r, self._fault)
        except BaseException as exc:  # noqa: BLE001 - reported by query and at the end
            self.fault_error = exc
            log.error("post-copy fault thread stopped: %s", exc)

    def _fault(self, event: int, flags: int, address: int, tid: int) -> None:
        from pymig._core import kvm as _kvm

        if event != _kvm.EVENT_PAGEFAULT:
            return
        block = next((b for b in self.blocks
                      if b.address <= address < b.address + b.size_bytes), None)
        if block is None:
            return
        page = (address - block.address) // block.page_size
        huge = self._huge.get(block.block_id, 1)
        page -= page % huge  # a hugetlb block faults, and is asked for, a huge page at once
        dst = block.address + page * block.page_size
        now = time.monotonic()
        with self._lock:
            if huge > 1:
                waiting = _count_bits(self.missing[block.block_id], page, huge) > 0
            else:
                waiting = bool((int(self.missing[block.block_id][page >> 6])
                                >> (page & 63)) & 1)
            if waiting:
                self.blocktime.fault(tid, now)
                key = (block.block_id, page)
                first = key not in self._asked
                self._asked.setdefault(key, []).append(tid)
        if waiting:
            if first and not self.requests_lost:
                try:
                    self._request(block.block_id, page, huge)
                    self.requests += 1
                except Exception as exc:  # noqa: BLE001 - the vCPU waits for a recovery
                    self.requests_lost = True
                    log.warning("post-copy: a page request could not go: %s", exc)
            return
        # Never sent and never written here: a zero page (or one placed meanwhile: wake).
        done, err = self._place_zero(_kvm, block, dst, huge * block.page_size)
        if err == errno.EEXIST:
            _kvm._unsafe_uffdio_wake(self._uffd, dst, huge * block.page_size)
        else:
            self.zero_faults += 1

    def reconnect(self, request: Callable[[int, int, int], None]) -> None:
        """A recovered connection: requests go there, and every page a thread waits for is
        asked for again (what was asked before the cut may never have been answered)."""
        with self._lock:
            self._request = request
            self.requests_lost = False
            waited = list(self._asked)
        for block_id, page in waited:
            request(block_id, page, self._huge.get(block_id, 1))
            self.requests += 1

    # -- the end -----------------------------------------------------------------------------
    def finish(self) -> None:
        """Every page is placed: stop the fault thread, unregister RAM, close userfaultfd."""
        from pymig._core import kvm as _kvm

        self._stop_thread()
        if self._uffd >= 0:
            for block in self.blocks:
                try:
                    _kvm._unsafe_uffdio_unregister(self._uffd, block.address, block.size_bytes)
                except KvmError as exc:
                    log.warning("post-copy: unregistering %s: %s", block.name, exc)
            os.close(self._uffd)
            self._uffd = -1
        self._release_staging()

    def abandon(self) -> None:
        """The guest is being discarded: release any thread waiting in a fault (onto zero
        pages: nothing of this guest survives anyway)."""
        self._stop_thread()
        if self._uffd >= 0:
            os.close(self._uffd)
            self._uffd = -1
        self._release_staging()

    def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                os.write(self._stop_w, b"x")
            except BlockingIOError:
                pass
            thread.join()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stop_r = self._stop_w = -1

    def _release_staging(self) -> None:
        staging, self._staging = self._staging, {}
        for mem, array, _ in staging.values():
            del array
            try:
                mem.close()
            except BufferError:
                pass

    def query(self) -> dict:
        """query-migrate's ``postcopy`` at the destination: requests, pages asked for and
        pushed, and the blocktime (ms)."""
        with self._lock:
            bt = self.blocktime
            info = {
                "requests": self.requests,
                "pages-requested": self.pages_requested,
                "pages-pushed": self.pages_pushed,
                "zero-faults": self.zero_faults,
                "pages-preempt": self.pages_preempt,
                "pages-left": sum(core.bitmap_count(self.missing[b.block_id], b.npages)
                                  for b in self.blocks) if self.missing else 0,
                "postcopy-blocktime": round(bt.all_blocked_s * 1000, 3),
                "blocktime-total": round(bt.wait_s * 1000, 3),
                "blocktime-faults": bt.faults,
                "blocktime-per-fault-us": round(bt.wait_s / bt.faults * 1e6, 1)
                if bt.faults else 0.0,
                "listen": dict(self.listen_ms),
            }
            per_thread = dict(bt.per_thread_s)
        tids = self._vcpu_threads()
        if tids:
            info["postcopy-vcpu-blocktime"] = [round(per_thread.get(t, 0.0) * 1000, 3)
                                               for t in tids]
        return info


def _clear_bits(bitmap: np.ndarray, first: int, count: int) -> None:
    """Clear bits [first, first + count) of a uint64-word bitmap."""
    end = first + count
    while first < end:
        word, bit = first >> 6, first & 63
        n = min(64 - bit, end - first)
        mask = ((1 << n) - 1) << bit
        bitmap[word] = np.uint64(int(bitmap[word]) & ~mask & 0xFFFF_FFFF_FFFF_FFFF)
        first += n


def _count_bits(bitmap: np.ndarray, first: int, count: int) -> int:
    """How many bits of [first, first + count) are set in a uint64-word bitmap."""
    total, end = 0, first + count
    while first < end:
        word, bit = first >> 6, first & 63
        n = min(64 - bit, end - first)
        total += ((int(bitmap[word]) >> bit) & ((1 << n) - 1)).bit_count()
        first += n
    return total


def _copy_bits(source: np.ndarray, target: np.ndarray, first: int, count: int) -> None:
    """Set in ``target`` the bits of [first, first + count) that are set in ``source``."""
    end = first + count
    while first < end:
        word, bit = first >> 6, first & 63
        n = min(64 - bit, end - first)
        mask = ((1 << n) - 1) << bit
        target[word] = np.uint64(int(target[word]) | (int(source[word]) & mask))
        first += n


def _madvise(address: int, length: int, advice: int) -> None:
    from pymig.memory import madvise

    madvise(address, length, advice)
