"""Destination side: accept one migration, load it completely, then (and only then) run it.

::

    listen(uri) ── accept ── header ── config (FULL "pymig.config") ── build a paused guest
        ── sections: RAM START / PART... / END, device state FULL ... ── EOF
        ── every entry complete? ── load vCPU + device state ── LOADED ──► source
        ◄── COMMIT ── start vCPUs ── ACK(start time) ──► source

Every packet checksum, every section footer and every page bound is checked on the way in.  On
any failure the destination reports it on the return path, never starts the guest, frees it and
raises; the source then resumes its own copy.

The stream's sender is not trusted with this side's resources or time.  The guest it describes
must fit the destination's own limits (:class:`pymig.limits.DestinationLimits`: guest kinds,
RAM, vCPUs), checked before anything is mapped or created.  And it must keep making progress:
the stream header and then each record must arrive whole within ``progress_timeout`` seconds
of this side asking for it (:class:`pymig.stream.StreamReader`), and COMMIT within
``commit_timeout`` of LOADED, however the bytes trickle in.  A source with nothing to send for
a while (a converged idle guest, or one waiting for ``migrate-continue`` before its
switchover) sends an empty RAM packet every second to show it is there
(:data:`pymig.migration.KEEPALIVE_INTERVAL_S`).  Waiting for the connection itself has no
deadline by default (``accept_timeout``): a listener holds nothing.

Restoring a ``file:`` snapshot that has a restore index (:mod:`pymig.transport.file`) reads
the stream without the RAM records that later ones supersede, so each page is read in its last
version only; the channel checks, as it reads, that what it skips is superseded indeed.  Should
that load fail (an index that does not hold included), the file is loaded once more from its
first byte without the index: a damaged or lying index never makes a good stream unloadable
nor restores an older page, and the error a damaged stream gets names its offset in the file.
"""

from __future__ import annotations

import enum
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pymig import stream, transport
from pymig.errors import (MigrationError, PostcopyPaused, PymigError, SourceCancelled,
                          StateError, StreamError, TransportError)
from pymig.guest import GuestConfig
from pymig.limits import DestinationLimits
from pymig.machine import LOAD_BUFFER_BYTES, Machine, WarmUp, load_config
from pymig.postcopy import (OP_ADVISE, OP_LISTEN, OP_PREEMPT, OP_RESUME, POSTCOPY_IDSTR,
                            PREEMPT_SCHEMES, PostcopyDestination, check_backing,
                            check_preempt, parse_op, parse_token, probe_userfaultfd,
                            shrink_queue)
from pymig.ram import RAM_IDSTR
from pymig.transport.channel import DeadlineExceeded
from pymig.transport.file import IndexedFileChannel, SnapshotIndexError
from pymig.transport.tls import PlaintextPeerError

log = logging.getLogger(__name__)


@dataclass
class IncomingResult:
    """What a finished incoming migration produced: a running guest and how it got there."""

    machine: Machine
    bytes_received: int
    load_time_s: float
    started_ns: int
    stats: dict = field(default_factory=dict)


#: How long the stream header, and then each record, may take to arrive whole (seconds).
DEFAULT_PROGRESS_TIMEOUT_S = 60.0


class IncomingStatus(enum.StrEnum):
    """The destination's side of a migration, under QEMU's names (its ``query-migrate``)."""

    NONE = "none"
    SETUP = "setup"  # listening
    ACTIVE = "active"  # a source connected: loading
    POSTCOPY_ACTIVE = "postcopy-active"  # LISTEN loaded; after the commit the guest runs here
    POSTCOPY_PAUSED = "postcopy-paused"  # the source is gone with pages the guest still lacks
    POSTCOPY_RECOVER = "postcopy-recover"  # listening for the source's reconnection
    COMPLETED = "completed"
    FAILED = "failed"


_ALLOWED: dict[IncomingStatus, set[IncomingStatus]] = {
    IncomingStatus.NONE: {IncomingStatus.SETUP},
    IncomingStatus.SETUP: {IncomingStatus.ACTIVE, IncomingStatus.FAILED},
    IncomingStatus.ACTIVE: {IncomingStatus.POSTCOPY_ACTIVE, IncomingStatus.COMPLETED,
                            IncomingStatus.FAILED},
    IncomingStatus.POSTCOPY_ACTIVE: {IncomingStatus.POSTCOPY_PAUSED, IncomingStatus.COMPLETED,
                                     IncomingStatus.FAILED},
    IncomingStatus.POSTCOPY_PAUSED: {IncomingStatus.POSTCOPY_RECOVER},
    IncomingStatus.POSTCOPY_RECOVER: {IncomingStatus.POSTCOPY_ACTIVE,
                                      IncomingStatus.POSTCOPY_PAUSED},
    IncomingStatus.COMPLETED: set(),
    IncomingStatus.FAILED: set(),
}


class Incoming:
    """One incoming migration on ``uri``.

    ``limits`` is what this destination accepts (default: :class:`DestinationLimits` with
    every default); ``check_config`` may refuse the stream's guest configuration further by
    raising ValueError; ``guest_options`` go to the guest factory.  ``progress_timeout``
    (seconds, None: none) drops a source from which the header or a record does not arrive
    whole in that time; ``commit_timeout`` bounds the wait for COMMIT after LOADED;
    ``accept_timeout`` (None: none) the wait for the connection; ``idle_timeout`` each wait
    for the peer that no deadline covers (sends on the return path, and receives without a
    progress timeout).
    """

    def __init__(self, uri: str, *, limits: DestinationLimits | None = None,
                 check_config: Callable[[GuestConfig], None] | None = None,
                 guest_options: dict | None = None, accept_timeout: float | None = None,
                 progress_timeout: float | None = DEFAULT_PROGRESS_TIMEOUT_S,
                 commit_timeout: float = 60.0, idle_timeout: float = 120.0,
                 before_start: Callable[[Machine], None] | None = None,
                 after_start: Callable[[Machine], None] | None = None,
                 tls: tuple | None = None, postcopy: bool = False,
                 postcopy_preempt: bool = False):
        parsed = transport.parse_uri(uri)
        check_preempt(postcopy, postcopy_preempt, parsed.scheme)
        if tls is not None and parsed.scheme not in ("tcp", "unix", "fd"):
            raise ValueError(f"tls-creds is set, and TLS protects tcp:, unix: and fd: sockets "
                             f"only: a {parsed.scheme}: stream cannot be received over TLS")
        if progress_timeout is not None and not progress_timeout > 0:
            raise ValueError(f"a progress timeout must be positive or None (none), not "
                             f"{progress_timeout!r}")
        self.uri = uri
        self.limits = limits if limits is not None else DestinationLimits()
        self.check_config = check_config
        self.guest_options = guest_options or {}
        self.accept_timeout = accept_timeout
        self.progress_timeout = progress_timeout
        self.commit_timeout = commit_timeout
        self.idle_timeout = idle_timeout  # a source silent this long is gone: fail, not hang
        self.before_start = before_start  # sees the loaded machine before its vCPUs run
        self.after_start = after_start  # gets the machine once they run, before the ACK
        # (TlsCredentials, tls-authz patterns): the source must open a TLS session that
        # these credentials accept before a byte of its stream is read
        self.tls = tls
        # the postcopy-ram capability: a source may switch to post-copy (pymig.postcopy)
        self.postcopy_enabled = postcopy
        self.postcopy: PostcopyDestination | None = None
        # postcopy-preempt: the source opens a second connection on this URI right after
        # ADVISE (and RESUME), on which the pages a vCPU waits for come
        self.postcopy_preempt = postcopy_preempt
        self._preempt = None  # (channel, reader) of the preempt channel
        self._preempt_error: BaseException | None = None
        self._rp: stream.ReturnPathWriter | None = None
        self._reader: stream.StreamReader | None = None
        self.status = IncomingStatus.NONE
        self.error: BaseException | None = None
        self.machine: Machine | None = None
        self._listener = None
        self._warm_up = None
        self._listeners: list[Callable[[IncomingStatus, IncomingStatus], None]] = []
        self._lock = threading.Lock()

    def on_status(self, callback: Callable[[IncomingStatus, IncomingStatus], None]) -> None:
        self._listeners.append(callback)

    def _set_status(self, new: IncomingStatus) -> None:
        """Move to ``new`` from whatever the status is; a move the table does not allow is a
        bug (AssertionError)."""
        with self._lock:
            old = self.status
        if not self._transition(old, new):
            raise AssertionError(f"destination status moved from {old} under a move to {new}")

    def _transition(self, expected: IncomingStatus, new: IncomingStatus) -> bool:
        """Compare-and-set: ``expected`` → ``new``, or False if the status is no longer
        ``expected``."""
        with self._lock:
            if self.status != expected:
                return False
            if new not in _ALLOWED[expected]:
                raise AssertionError(f"destination transition {expected} -> {new} not allowed")
            self.status = new
        for callback in list(self._listeners):
            callback(expected, new)
        return True

    def listen(self) -> str:
        """Start listening; returns the address actually bound (e.g. the port for tcp:...:0)."""
        self._listener = transport.listen(self.uri)
        self._warm_up = WarmUp()  # while no stream is coming, not once it is
        self._set_status(IncomingStatus.SETUP)
        return str(self._listener.uri)

    def close(self) -> None:
        """Stop listening if no source was accepted yet (its socket file goes with it)."""
        if self._listener is not None:
            self._listener.close()

    def run(self) -> IncomingResult:
        """Accept, load and start; raises on any failure without ever starting the guest.

        Once the guest runs it is this side's, whatever happens next: the source committed
        and stays paused, so an ACK that cannot reach it fails nothing (it is logged)."""
        if self._listener is None:
            self.listen()
        channel = None
        paused = False
        try:
            channel, rp, load_time, started_ns = self._receive_and_start()
            if self.after_start is not None:
                self.after_start(self.machine)
            # The disks that travelled are whole: flushed and their incomplete markers gone
            # before the ACK, so that a source that says completed (and may be torn down) never
            # leaves the only copy of the disk in a page cache.  (The guest runs already: the
            # flush is not in the downtime.)
            self.machine.finish_incoming()
            if rp is not None:
                try:
                    rp.ack(started_ns)
                except PymigError as exc:
                    log.warning("the guest runs here, but its ACK did not reach the source: %s",
                                describe(exc))
            if self.postcopy is not None:
                self._receive_postcopy(channel, rp)
            self.machine.release_load_buffers()
            self._set_status(IncomingStatus.COMPLETED)
            return IncomingResult(self.machine, channel.bytes_received, load_time, started_ns,
                                  self.machine.load_counters())
        except PostcopyPaused:
            # (its channels closed before it said so: a recovery may have begun since, and
            # the preempt channel it holds now is the recovery's)
            paused = True
            raise
        finally:
            if channel is not None:
                channel.close()
            if not paused:
                self._close_preempt()
            if self._listener is not None:
                self._listener.close()

    def _receive_and_start(self):
        """Accept, load, wait for COMMIT and run the guest: (channel, return path writer or
        None, load seconds, vCPU start ns).  On any failure before the guest runs: report it,
        discard the guest, close the channel and raise."""
        channel = None
        rp = None
        try:
            channel = self._listener.accept(self.accept_timeout)
            if not self.postcopy_preempt:  # (else ADVISE's preempt channel comes here too)
                self._listener.close()
            if self.tls is not None:
                raw = channel
                try:
                    channel = self._secure(raw)
                except PlaintextPeerError:
                    rp = stream.ReturnPathWriter(raw)  # the source reads its answer in plaintext
                    raise
            channel.settimeout(self.idle_timeout)
            self._set_status(IncomingStatus.ACTIVE)
            t0 = time.monotonic()
            if channel.has_return_path:
                rp = stream.ReturnPathWriter(channel)
            self._rp = rp
            try:
                self._load(channel, rp)
            except (StreamError, StateError, SnapshotIndexError) as exc:
                if not isinstance(channel, IndexedFileChannel):
                    raise
                if isinstance(exc, SnapshotIndexError):
                    log.warning("%s: %s; reading every record instead", channel.name, exc)
                self._discard_machine()  # and load it all, to report the file's offsets
                indexed, channel = channel, channel.sequential()
                indexed.close()
                self._load(channel, rp)
            load_time = time.monotonic() - t0
            if rp is not None:
                try:
                    rp.loaded()
                except TransportError:
                    # a source that gave up while this side loaded the last records told why,
                    # then closed: its CANCEL is the reason, not the broken pipe
                    cancelled = _cancelled_meanwhile(channel)
                    if cancelled is not None:
                        raise cancelled from None
                    raise
                # COMMIT, all 8 bytes of it, by then: not a byte now and then
                channel.set_recv_deadline(time.monotonic() + self.commit_timeout)
                # (after it, post-copy's pages: their offsets count the COMMIT's bytes)
                self._reader.offset += await_commit(channel, self.commit_timeout)
            channel.set_recv_deadline(None)
            if self.before_start is not None:
                self.before_start(self.machine)
            started_ns = time.time_ns()
            self.machine.guest.resume()
            return channel, rp, load_time, started_ns
        except BaseException as exc:
            self.error = exc
            if rp is not None:
                try:
                    rp.load_error(describe(exc))
                except PymigError:
                    pass
            self._discard_machine()
            self._set_status(IncomingStatus.FAILED)
            if channel is not None:
                channel.close()
            if isinstance(exc, (PymigError, ValueError)):
                raise MigrationError(f"incoming migration failed: {describe(exc)}") from exc
            raise

    def _secure(self, channel):
        """The TLS session with the source on ``channel``, its certificate and identity
        accepted."""
        from pymig.errors import TlsError
        from pymig.transport import tls
        from pymig.transport.channel import SocketChannel

        if not isinstance(channel, SocketChannel):
            channel.close()
            raise TlsError(f"TLS needs a socket, and {channel.name} is not one (a pipe or a "
                           f"file passed as fd:)")
        creds, authz = self.tls
        secured = tls.accept(channel, creds, authz)
        log.info("%s: TLS %s, %s, source %s", channel.name, secured.version, secured.cipher,
                 secured.peer_identity)
        return secured

    def _load(self, channel, rp) -> None:
        """Read the stream into a new, paused machine (``self.machine``)."""
        reader = stream.StreamReader(channel, progress_timeout=self.progress_timeout)
        self._reader = reader
        reader.read_header()
        config = load_config(reader)
        # before anything is mapped or created for the guest
        self.limits.check(config, backing=self.guest_options.get("backing", "anon"),
                          prealloc=self.guest_options.get("prealloc"))
        if self.check_config is not None:
            self.check_config(config)
        if self._warm_up is not None:
            self._warm_up.finish()
        self.machine = Machine.incoming(config, **self.guest_options)
        if self.postcopy_enabled:
            self.machine.postcopy_record = self._postcopy_record
        self.machine.rehearse_state_load()
        # READY once the guest exists and what the source sent while it was being built is
        # loaded, CAUGHT_UP each time the backlog is: the source stops its guest only after
        # one, so neither building the guest nor a backlog counts as downtime.  PROGRESS as
        # it loads: the source's bandwidth is what this side has taken in, not what it sent.
        if rp is None:
            self.machine.load_stream(reader)
        else:
            self.machine.load_stream(reader, _best_effort(_reporter(rp)),
                                     _best_effort(rp.progress))

    # -- post-copy ---------------------------------------------------------------------------
    def _postcopy_record(self, op: int, payload, offset: int) -> None:
        """ADVISE: check that post-copy can work here, while the source's guest still runs;
        LISTEN: drop the stale pages, register guest RAM with userfaultfd, start the fault
        thread (before anything lands in a missing page)."""
        guest = self.machine.guest
        if op == OP_ADVISE:
            if self._rp is None:
                raise MigrationError("post-copy needs a return path, and this stream has none")
            token = parse_token(payload, offset)
            self._check_preempt_token(token)
            check_backing(guest.ram_blocks)
            probe_userfaultfd()
            if token is not None:
                self._preempt = self._accept_preempt(self._listener, token)
            return
        if op != OP_LISTEN:
            raise StreamError(offset, f"post-copy operation {op} in the migration stream")
        if self.postcopy is not None:
            raise StreamError(offset, "a second post-copy LISTEN")
        pc = PostcopyDestination(guest, self._rp.page_request,
                                 getattr(guest, "vcpu_thread_ids", None))
        pc.listen(payload, offset)
        self.postcopy = pc
        self.machine.ram_loader.placer = pc
        self._set_status(IncomingStatus.POSTCOPY_ACTIVE)

    def recover(self, uri: str) -> str:
        """``migrate-recover``: listen on ``uri`` for the source's reconnection (``migrate
        uri resume=true``) of a migration paused in post-copy; returns the address bound.
        The pages follow on the new connection, in a thread; the status says how it ends."""
        parsed = transport.parse_uri(uri)
        if parsed.scheme not in ("tcp", "unix", "fd"):
            raise MigrationError(f"a post-copy recovery needs a return path (tcp:, unix: or "
                                 f"fd: sockets), which a {parsed.scheme}: URI has not")
        if self.status != IncomingStatus.POSTCOPY_PAUSED:
            raise MigrationError(f"migrate-recover resumes a migration paused in post-copy; "
                                 f"this one is {self.status}")
        if self.postcopy_preempt and parsed.scheme not in PREEMPT_SCHEMES:
            raise MigrationError(f"with postcopy-preempt a recovery reconnects both channels, "
                                 f"which a {parsed.scheme}: URI cannot (tcp: and unix: can)")
        listener = transport.listen(uri)
        if not self._transition(IncomingStatus.POSTCOPY_PAUSED,
                                IncomingStatus.POSTCOPY_RECOVER):
            listener.close()
            raise MigrationError(f"migrate-recover resumes a migration paused in post-copy; "
                                 f"this one is {self.status}")
        thread = threading.Thread(target=self._recover, args=(listener,),
                                  name="pymig-incoming", daemon=True)
        thread.start()
        return str(listener.uri)

    def _recover(self, listener) -> None:
        channel = None
        try:
            try:
                channel = listener.accept(self.accept_timeout)
                if self.tls is not None:
                    channel = self._secure(channel)
                channel.settimeout(self.idle_timeout)
                rp = stream.ReturnPathWriter(channel)
                reader = stream.StreamReader(channel, progress_timeout=self.progress_timeout)
                reader.read_header()
                payload, offset = _first_postcopy_record(reader, OP_RESUME, "a recovered "
                                                         "connection")
                token = parse_token(payload, offset)
                self._check_preempt_token(token)
                if token is not None:
                    self._preempt = self._accept_preempt(listener, token)
            finally:
                listener.close()
            self._reader = reader
            self.postcopy.reconnect(rp.page_request)
            self._set_status(IncomingStatus.POSTCOPY_ACTIVE)
        except BaseException as exc:  # noqa: BLE001 - paused as before, nothing changed
            self.error = exc
            if channel is not None:
                channel.close()
            self._close_preempt()
            self._set_status(IncomingStatus.POSTCOPY_PAUSED)
            log.warning("post-copy recovery failed: %s", describe(exc))
            return
        try:
            self._receive_postcopy(channel, rp)
        except PostcopyPaused as exc:
            channel.close()  # (the preempt channel was closed before the pause: see run)
            log.warning("%s", exc)
            return
        except BaseException:
            channel.close()
            self._close_preempt()
            raise
        channel.close()
        self._close_preempt()
        self.machine.release_load_buffers()
        self._set_status(IncomingStatus.COMPLETED)

    def _receive_postcopy(self, channel, rp) -> None:
        """The guest runs: place the pages that follow (asked for or pushed) until the source
        ends the stream, then hand the RAM back to the kernel.  A stream that breaks (or lies)
        leaves the guest paused in its faults, never on made-up pages: ``postcopy-paused``."""
        pc, reader, machine = self.postcopy, self._reader, self.machine
        shrink_queue(channel, socket.SO_RCVBUF)
        buf = bytearray(LOAD_BUFFER_BYTES)
        preempt = self._start_preempt(channel)
        try:
            while True:
                record = reader.next_record()
                if record.type == stream.RecordType.EOF:
                    break
                entry = machine.stream_entries.get(record.section_id)
                if (record.type not in (stream.RecordType.PART, stream.RecordType.END)
                        or entry is None or entry.idstr != RAM_IDSTR):
                    raise StreamError(record.offset, f"post-copy carries RAM records only, not "
                                                     f"a {record.describe()}")
                payload = reader.read_payload(buf if record.payload_len <= len(buf)
                                              else bytearray(record.payload_len))
                if record.type == stream.RecordType.PART:
                    machine.ram_loader.load_part(payload)
                else:
                    machine.ram_loader.load_end(payload)
            if preempt is not None:
                self._await_preempted_pages(preempt)
            left = pc.pages_left()
            if left:
                raise MigrationError(f"the source ended post-copy with {left} pages never sent")
        except BaseException as exc:
            if self._preempt_error is not None:
                exc = self._preempt_error  # the cause; the main channel was shut behind it
            self._close_preempt()
            if preempt is not None:
                preempt.join()
            self.error = exc
            self._set_status(IncomingStatus.POSTCOPY_PAUSED)
            raise PostcopyPaused(f"post-copy paused, the guest waits for its missing pages "
                                 f"({pc.pages_left()} left): {describe(exc)}") from exc
        self._close_preempt()
        pc.finish()
        try:
            rp.shut()
        except PymigError as exc:
            log.warning("the guest has all its pages, but SHUT did not reach the source: %s",
                        describe(exc))

    # -- the preempt channel (postcopy-preempt) ----------------------------------------------
    def _check_preempt_token(self, token: int | None) -> None:
        """Both sides have postcopy-preempt, or neither (as QEMU wants it)."""
        if token is not None and not self.postcopy_preempt:
            raise MigrationError("the source sends requested pages on a preempt channel "
                                 "(postcopy-preempt), and this destination takes none: set the "
                                 "postcopy-preempt capability here too")
        if token is None and self.postcopy_preempt:
            raise MigrationError("this destination has the postcopy-preempt capability, and the "
                                 "source opens no preempt channel: set it on both sides")

    def _accept_preempt(self, listener, token: int):
        """The source's second connection on this URI, right behind ADVISE or RESUME: TLS if
        the main channel is, a stream header, then PREEMPT with ``token`` (a connection
        without it is refused).  Returns (channel, reader)."""
        try:
            channel = listener.accept(self.progress_timeout or self.idle_timeout)
        except TransportError as exc:
            raise MigrationError(f"the source's preempt channel did not come: "
                                 f"{describe(exc)}") from exc
        finally:
            listener.close()
        try:
            if self.tls is not None:
                channel = self._secure(channel)
            channel.settimeout(self.idle_timeout)
            reader = stream.StreamReader(channel, progress_timeout=self.progress_timeout)
            reader.read_header()
            payload, offset = _first_postcopy_record(reader, OP_PREEMPT, "a preempt channel")
            if parse_token(payload, offset) != token:
                raise StreamError(offset, "the preempt channel's token is not the one of this "
                                          "migration's ADVISE or RESUME")
        except BaseException:
            channel.close()
            raise
        log.info("post-copy: preempt channel %s", channel.name)
        return channel, reader

    def _start_preempt(self, main) -> threading.Thread | None:
        """The preempt channel's thread, placing the pages that come on it; if it fails, it
        shuts ``main`` down, which pauses the post-copy."""
        if self._preempt is None:
            return None
        self._preempt_error = None
        thread = threading.Thread(target=self._receive_preempt, args=(main,),
                                  name="pymig-postcopy-preempt", daemon=True)
        thread.start()
        return thread

    def _receive_preempt(self, main) -> None:
        channel, reader = self._preempt
        pc, machine = self.postcopy, self.machine
        buf = bytearray(LOAD_BUFFER_BYTES)
        try:
            while True:
                record = reader.next_record()
                if record.type == stream.RecordType.EOF:
                    return
                entry = machine.stream_entries.get(record.section_id)
                if (record.type != stream.RecordType.PART or entry is None
                        or entry.idstr != RAM_IDSTR):
                    raise StreamError(record.offset, f"a preempt channel carries RAM pages only, "
                                                     f"not a {record.describe()}")
                payload = reader.read_payload(buf if record.payload_len <= len(buf)
                                              else bytearray(record.payload_len))
                pc.place(payload, preempt=True)
        except BaseException as exc:  # noqa: BLE001 - the main thread reports it
            if not channel.closed:  # (closed by the main thread: not the cause)
                self._preempt_error = exc
                log.warning("post-copy: the preempt channel failed: %s", describe(exc))
                main.shutdown()

    def _await_preempted_pages(self, thread: threading.Thread) -> None:
        """At the main channel's EOF: the pages the preempt channel alone carried (asked for
        before the push came to them) may still be on their way; wait for them (as long as
        the progress timeout), then close the preempt channel, the source's cue to stop."""
        pc = self.postcopy
        deadline = time.monotonic() + (self.progress_timeout or self.idle_timeout)
        while pc.pages_left() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(PREEMPT_POLL_S)
        if self._preempt_error is not None:
            raise self._preempt_error
        self._close_preempt()
        thread.join()

    def _close_preempt(self) -> None:
        preempt, self._preempt = self._preempt, None
        if preempt is not None:
            preempt[0].close()

    def _discard_machine(self) -> None:
        if self.postcopy is not None:
            self.postcopy.abandon()
            self.postcopy = None
        if self.machine is not None:
            self.machine.close()
            self.machine = None


#: How often the destination looks whether the pages the preempt channel carries are all
#: there, once the main channel has ended.
PREEMPT_POLL_S = 0.001


def _first_postcopy_record(reader: stream.StreamReader, op: int, what: str):
    """The first record of a recovered or preempt channel: a small ``pymig.postcopy`` record
    of operation ``op``; returns (payload, offset)."""
    record = reader.next_record()
    if (record.type != stream.RecordType.FULL or record.idstr != POSTCOPY_IDSTR
            or record.payload_len > 64):
        raise StreamError(record.offset, f"{what} starts with a {POSTCOPY_IDSTR} record")
    payload = bytes(reader.read_payload()) if record.payload_len else b""
    if parse_op(payload, record.offset) != op:
        raise StreamError(record.offset, f"{what} starts with the wrong {POSTCOPY_IDSTR} "
                                         f"operation")
    return payload, record.offset


def await_commit(channel, timeout: float) -> int:
    """Block until the source's COMMIT, and return how many bytes of the channel it took;
    anything else (or nothing in time) is a failure."""
    reader = stream.ReturnPathReader(channel)
    try:
        message = reader.recv(timeout)
    except DeadlineExceeded:
        message = None  # begun, never finished
    if message is None:
        raise MigrationError(f"the source did not commit within {timeout:.0f} s; the guest was "
                             f"not started here")
    if isinstance(message, stream.Cancel):
        raise SourceCancelled(message.text)
    if not isinstance(message, stream.Commit):
        raise MigrationError(f"expected COMMIT from the source, got {type(message).__name__}")
    return reader.offset


def _cancelled_meanwhile(channel) -> SourceCancelled | None:
    """The CANCEL a source sent in place of COMMIT, if one is waiting on ``channel``."""
    try:
        message = stream.ReturnPathReader(channel).recv(0)
    except PymigError:
        return None
    return SourceCancelled(message.text) if isinstance(message, stream.Cancel) else None


def describe(exc: BaseException) -> str:
    """One line saying what went wrong, for the return path and the user."""
    if isinstance(exc, StreamError):
        return f"{type(exc).__name__} {exc}"
    return str(exc) or type(exc).__name__


def _best_effort(report: Callable[[int], None]) -> Callable[[int], None]:
    """``report`` for as long as the return path takes it.  A source that gave up may have
    closed the connection after saying why on the stream (a CANCEL record): loading goes on
    to read that, rather than fail on the report that could not go.  No guest starts without
    the source's COMMIT, which such a source never sends."""
    broken = False

    def send(offset: int) -> None:
        nonlocal broken
        if not broken:
            try:
                report(offset)
            except TransportError:
                broken = True

    return send


def _reporter(rp: stream.ReturnPathWriter) -> Callable[[int], None]:
    """READY the first time the destination catches up, CAUGHT_UP every time."""
    ready = [False]

    def caught_up(offset: int) -> None:
        if not ready[0]:
            rp.ready()
            ready[0] = True
        rp.caught_up(offset)

    return caught_up
