"""Source side: the migration state machine and the migration thread.

.. code-block:: text

    stateDiagram-v2
        none --> setup : migrate(uri)
        setup --> active : entries set up, stream header sent
        active --> completed : background-snapshot: every page saved (the guest ran all along)
        active --> device : policy says switch over; vCPUs stop
        active --> postcopy_active : migrate-start-postcopy (or x-postcopy-after passes); vCPUs stop
        postcopy_active --> completed : every page placed at the destination
        postcopy_active --> postcopy_paused : connection lost after the commit
        postcopy_active --> failed : before the commit (the guest runs on here)
        postcopy_paused --> postcopy_recover : migrate uri resume=true
        postcopy_recover --> postcopy_active : reconnected; the pages follow again
        postcopy_recover --> postcopy_paused : the new connection failed too
        device --> completed : destination loaded everything, committed, started
        setup --> failed
        active --> failed
        device --> failed
        setup --> cancelling : migrate_cancel
        active --> cancelling
        device --> cancelling
        cancelling --> cancelled
        cancelling --> failed
        failed --> setup : migrate again
        cancelled --> setup

Every transition is compare-and-set (:meth:`Migration._transition`) and emits an event.
Whatever goes wrong before the destination is told to commit, the source guest ends up in the
run state it had before the migration (running if it ran, paused if it was stopped: as QEMU,
only a guest that was running is started again) with its memory intact, dirty logging off, the
throttle lifted and the channel closed; so does a ``file:`` snapshot's source, unless asked to
stop.  After the commit the guest belongs to the destination: the source stays paused even if
the final acknowledgement is lost, so a guest never runs in two places; only a destination that
answers the commit with LOAD_ERROR (which it sends before its guest runs, and never after)
gives the guest back to the source.
"""

from __future__ import annotations

import enum
import logging
import math
import socket
import threading
import time
from typing import Callable

from pymig import bgsnapshot
from pymig import policy as policy_mod
from pymig import postcopy as postcopy_mod
from pymig import core, stream, transport
from pymig.estimate import DestinationProgress
from pymig.errors import MigrationError, PymigError, TransportError
from pymig.machine import Machine, SectionOut
from pymig.measure import Course, Estimators
from pymig.parameters import MigrationParameters, ParameterStore
from pymig.policy import Move, Step
from pymig.postcopy import PREEMPT_SCHEMES, PostcopySource
from pymig.ram import RAM_IDSTR
from pymig.stats import MigrationStats, TraceWriter

log = logging.getLogger(__name__)


class Status(str, enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"


_ALLOWED: dict[Status, set[Status]] = {
    Status.NONE: {Status.SETUP},
    Status.SETUP: {Status.ACTIVE, Status.FAILED, Status.CANCELLING},
    # (active -> completed: a background snapshot, which has no stop-and-copy)
    Status.ACTIVE: {Status.PRE_SWITCHOVER, Status.DEVICE, Status.POSTCOPY_ACTIVE,
                    Status.COMPLETED, Status.FAILED, Status.CANCELLING},
    # the guest is stopped, waiting for migrate-continue (pause-before-switchover)
    Status.PRE_SWITCHOVER: {Status.DEVICE, Status.FAILED, Status.CANCELLING},
    Status.POSTCOPY_ACTIVE: {Status.COMPLETED, Status.POSTCOPY_PAUSED, Status.FAILED,
                             Status.CANCELLING},
    # neither side holds the whole guest: only a recovery moves on from here
    Status.POSTCOPY_PAUSED: {Status.POSTCOPY_RECOVER},
    Status.POSTCOPY_RECOVER: {Status.POSTCOPY_ACTIVE, Status.POSTCOPY_PAUSED},
    Status.DEVICE: {Status.COMPLETED, Status.FAILED, Status.CANCELLING},
    Status.CANCELLING: {Status.CANCELLED, Status.FAILED},
    Status.FAILED: {Status.SETUP},
    Status.CANCELLED: {Status.SETUP},
    Status.COMPLETED: {Status.SETUP},  # only after a snapshot: the guest ran on here
}
#: The states a cancel or a failure moves on from, in the order a migration passes them.
CANCELLABLE_STATES = (Status.SETUP, Status.ACTIVE, Status.PRE_SWITCHOVER, Status.DEVICE,
                      Status.POSTCOPY_ACTIVE)
ACTIVE_STATES = {*CANCELLABLE_STATES, Status.CANCELLING, Status.POSTCOPY_PAUSED,
                 Status.POSTCOPY_RECOVER}


class Cancelled(MigrationError):
    """The migration was cancelled (by the user or by a limit); the source guest keeps the run
    state it had before."""


class Migration:
    """Outgoing migration of one machine (guest + state registry).

    ``decide`` gives the estimate's verdict at each sync (:data:`pymig.policy.Policy`); the
    rest of the rule, :func:`pymig.policy.next_step`, applies to it as to the default one."""

    def __init__(self, machine: Machine, params: ParameterStore | None = None,
                 decide: policy_mod.Policy = policy_mod.decide, credentials=None):
        self.machine = machine
        self.credentials = credentials  # a tlscreds.CredentialStore: what tls-creds names
        self.params = params or ParameterStore()
        self.decide = decide
        self.stats = MigrationStats()
        self._status = Status.NONE
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._listeners: list[Callable[[Status, Status], None]] = []
        self._pass_listeners: list[Callable[[dict], None]] = []
        self._thread: threading.Thread | None = None
        self._cut_timer: threading.Timer | None = None  # a cancel's grace period, running
        self._cancel = threading.Event()
        self._manual_switchover = threading.Event()
        self._continue_switchover = threading.Event()
        self._start_postcopy = threading.Event()
        self.postcopy = None  # a postcopy.PostcopySource with the postcopy-ram capability
        self._channel = None
        # postcopy-preempt: the second connection, on which requested pages go, its writer
        self._preempt_channel = None
        self._preempt_writer: stream.StreamWriter | None = None
        self._uncapped = False  # the stop-and-copy lifted max-bandwidth
        self._trace: TraceWriter | None = None
        self.resume_source = False
        self.scheme: str | None = None  # of the URI of the last start()
        self._committed = False
        self.error: BaseException | None = None
        self._tls = None  # (credentials, host name) when the stream goes over TLS
        self.params.on_change(self._params_changed)

    # -- state machine -----------------------------------------------------------------------
    @property
    def status(self) -> Status:
        return self._status

    @property
    def moved_away(self) -> bool:
        """True once this migration handed the guest to a destination (a file snapshot does
        not: the guest stays here, running or, when asked, paused)."""
        return (self._status == Status.COMPLETED and not self.resume_source
                and self.scheme != "file")

    def on_status(self, callback: Callable[[Status, Status], None]) -> None:
        """``callback(old, new)`` after every transition (from the thread that made it)."""
        self._listeners.append(callback)

    def on_pass(self, callback: Callable[[dict], None]) -> None:
        """``callback(trace_record)`` after every dirty-log sync (QMP's MIGRATION_PASS)."""
        self._pass_listeners.append(callback)

    def _transition(self, expected: Status, new: Status) -> bool:
        """Move ``expected`` → ``new`` if the state is still ``expected``; False otherwise."""
        with self._lock:
            if self._status != expected:
                return False
            if new not in _ALLOWED[expected]:
                raise AssertionError(f"transition {expected.value} -> {new.value} not allowed")
            self._status = new
            self.stats.set_status(new.value)
            self._changed.notify_all()
        for callback in list(self._listeners):
            callback(expected, new)
        return True

    # -- control -----------------------------------------------------------------------------
    def start(self, uri: str, *, trace_path: str | None = None,
              resume_source: bool | None = None, blk: bool = False,
              inc: bool = False) -> None:
        """Begin migrating to ``uri`` in the background; refuses while one is active.

        ``resume_source``: whether the source guest runs on after success, if it was running
        before.  By default it does for ``file:`` (a live snapshot: the guest carries on, the
        file holds its state at the switchover) and does not otherwise (the guest now runs at
        the destination).  A guest paused before the migration stays paused whatever happens.
        ``blk`` (or the ``block`` capability): disks not on shared storage travel too;
        ``inc``: only what was written to them since their checkpoint.
        """
        parsed = transport.parse_uri(uri)  # a bad URI is the caller's error, before any change
        if resume_source is None:
            resume_source = parsed.scheme == "file"
        with self._lock:
            current = self._status
        if current in ACTIVE_STATES:
            raise MigrationError(f"a migration is already {current.value}")
        self.wait_released()
        # the run that completed last decides: after a snapshot the guest is still here
        if current == Status.COMPLETED and not self.resume_source:
            raise MigrationError("this guest has already migrated away")
        self.machine.check_migratable(
            block=blk or self.params.snapshot().capabilities.get("block", False),
            incremental=inc)
        check_dirty_limit(self.params.snapshot(), self.machine.guest)
        check_postcopy(self.params.snapshot(), parsed.scheme, self.machine.guest)
        check_background_snapshot(self.params.snapshot(), parsed.scheme, self.machine.guest)
        tls = tls_for(self.params.snapshot(), parsed, self.credentials)
        self.resume_source = resume_source
        self.scheme = parsed.scheme
        try:
            trace = TraceWriter(trace_path) if trace_path else None
        except OSError as exc:
            raise MigrationError(f"cannot write the trace {trace_path}: "
                                 f"{exc.strerror or exc}") from None
        if not self._transition(current, Status.SETUP):
            if trace is not None:
                trace.close()
            raise MigrationError("a migration started concurrently")
        self._tls = tls
        self._cancel.clear()
        self._committed = False
        self._uncapped = False  # a snapshot's stop-and-copy lifted the cap of that run only
        self._manual_switchover.clear()
        self._continue_switchover.clear()
        self._start_postcopy.clear()
        self.postcopy = None
        self.error = None
        blocks = self.machine.guest.ram_blocks
        self._trace = trace
        self.stats = MigrationStats(page_size=blocks[0].page_size,
                                    ram_total_bytes=sum(b.size_bytes for b in blocks),
                                    trace=self._trace, disk=self.machine.disk_counters)
        self.stats.set_status(Status.SETUP.value)
        self._thread = threading.Thread(target=self._run, args=(uri,), name="pymig-migration",
                                        daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Ask the migration to stop; the source guest keeps (or returns to) the run state it
        had before the migration.

        Refused (MigrationError) once the destination has been told to start the guest: from
        then on the guest is the destination's, and stopping halfway would lose it.
        """
        with self._lock:
            if self._status not in ACTIVE_STATES:
                return  # nothing under way: nothing to cancel
            if self._committed:
                raise MigrationError("too late to cancel: the destination is starting the guest")
            self._cancel.set()
        for state in CANCELLABLE_STATES:
            if self._transition(state, Status.CANCELLING):
                break
        # The migration thread sees the cancel between two records and tells the destination
        # (a CANCEL record); a send stuck on a destination that stopped reading is cut short
        # after a grace period.
        channel = self._channel
        with self._lock:
            # Not once the migration has ended: its release no longer waits for the timer.
            if channel is not None and self._status == Status.CANCELLING \
                    and self._cut_timer is None:
                timer = threading.Timer(CANCEL_GRACE_S, self._cut, args=(channel,))
                timer.name = "pymig-cancel-grace"
                timer.daemon = True
                timer.start()
                self._cut_timer = timer

    def _cut(self, channel) -> None:
        """A cancel's grace period is over: unblock a send still stuck on ``channel``."""
        if self._channel is channel and self._status == Status.CANCELLING:
            channel.shutdown()

    def _stop_cut_timer(self) -> None:
        """The migration is over: a cancel's grace period has nothing left to cut."""
        with self._lock:
            timer, self._cut_timer = self._cut_timer, None
        if timer is not None:
            timer.cancel()
            if timer is not threading.current_thread():
                timer.join()

    def wait_released(self) -> None:
        """Until the last run's thread has ended: it does right after its status, once it has
        cleaned up the live entries, closed its channel and joined its threads.  A new run,
        of this migration or another of the same machine, waits for that, so that the old one
        never cleans up or closes what the new one set up; MigrationError if it takes more
        than RELEASE_WAIT_S."""
        previous = self._thread
        if previous is None or previous is threading.current_thread():
            return
        previous.join(RELEASE_WAIT_S)
        if previous.is_alive():
            raise MigrationError(f"the previous migration is still releasing its resources "
                                 f"after {RELEASE_WAIT_S:g} s")

    def switchover(self) -> None:
        """Switch over at the next decision, whatever the expected downtime (manual)."""
        self._manual_switchover.set()

    def recover(self, uri: str) -> None:
        """``migrate uri resume=true`` on a migration paused in post-copy: connect to the
        destination's ``migrate-recover`` URI and send it every page it may still lack."""
        parsed = transport.parse_uri(uri)
        if parsed.scheme not in TLS_SCHEMES:
            raise MigrationError(f"a post-copy recovery needs a return path (tcp:, unix: or "
                                 f"fd: sockets), which a {parsed.scheme}: URI has not")
        if (self.params.snapshot().capabilities.get("postcopy-preempt")
                and parsed.scheme not in PREEMPT_SCHEMES):
            raise MigrationError(f"with postcopy-preempt a recovery reconnects both channels, "
                                 f"which a {parsed.scheme}: URI cannot (tcp: and unix: can)")
        self.wait_released()
        if not self._transition(Status.POSTCOPY_PAUSED, Status.POSTCOPY_RECOVER):
            raise MigrationError(f"only a migration paused in post-copy resumes; this one is "
                                 f"{self._status.value}")
        self._thread = threading.Thread(target=self._recover, args=(uri,),
                                        name="pymig-migration", daemon=True)
        self._thread.start()

    def _recover(self, uri: str) -> None:
        stats = self.stats
        ret = None
        try:
            channel = transport.connect(uri, timeout=10.0)
            self._channel = channel
            if self._tls is not None:
                channel = self._secure(channel)
            channel.settimeout(SEND_TIMEOUT_S)
            writer = stream.StreamWriter(channel)
            self.postcopy.rewind()
            ret = ReturnPath(channel, on_page_request=self.postcopy.page_request)
            writer.write_header()
            token = self._preempt_token()
            postcopy_mod.resume(writer, token)
            if token is not None:
                self._connect_preempt(uri, token)
            if not self._transition(Status.POSTCOPY_RECOVER, Status.POSTCOPY_ACTIVE):
                raise MigrationError("the recovery was interrupted")
            self._push_the_rest(writer, channel, ret)
            stats.completed(stats.downtime_s, stats.downtime_phases)
            self._transition(Status.POSTCOPY_ACTIVE, Status.COMPLETED)
        except BaseException as exc:  # noqa: BLE001 - paused again, nothing lost
            self.error = exc
            stats.paused(f"post-copy paused: {exc}")
            for state in (Status.POSTCOPY_RECOVER, Status.POSTCOPY_ACTIVE):
                if self._transition(state, Status.POSTCOPY_PAUSED):
                    break
        finally:
            if ret is not None:
                ret.stop()
            if self._channel is not None:
                _quietly("closing the channel", self._channel.close, level=logging.DEBUG)
                self._channel = None
            self._close_preempt()
            if ret is not None:
                ret.join()

    def start_postcopy(self) -> None:
        """``migrate-start-postcopy``: switch to post-copy at the next decision.  Needs the
        postcopy-ram capability and a migration under way (QEMU's conditions and words)."""
        if not self.params.snapshot().capabilities.get("postcopy-ram"):
            raise MigrationError("Enable postcopy with migrate_set_capability before the start "
                                 "of migration")
        if self._status not in (Status.SETUP, Status.ACTIVE):
            raise MigrationError("Postcopy must be started after migration has been started")
        self._start_postcopy.set()

    def continue_switchover(self) -> None:
        """``migrate-continue``: release a migration waiting in ``pre-switchover`` (the
        pause-before-switchover capability); refused in any other state, as QEMU does."""
        with self._lock:
            if self._status != Status.PRE_SWITCHOVER:
                raise MigrationError(f"Migration not in expected state: {self._status.value}")
            self._continue_switchover.set()

    def wait(self, timeout: float | None = None) -> Status:
        """Block until the migration ends (or ``timeout``); returns the status."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._status

    def query(self) -> dict:
        return self.stats.query()

    def _params_changed(self, changed: dict) -> None:
        channel = self._channel
        if channel is not None and "max_bandwidth" in changed and not self._uncapped:
            channel.set_max_bandwidth(changed["max_bandwidth"])

    # -- the migration thread ----------------------------------------------------------------
    def _run(self, uri: str) -> None:
        run = _Run(self)
        try:
            run.setup(uri)
            if run.tracker is not None:
                run.background_snapshot()
            else:
                run.converge()
                run.stop_and_copy()
        except BaseException as exc:  # noqa: BLE001 - every failure leaves the guest as it was
            run.failed(exc)
        finally:
            run.release()

    def _secure(self, channel):
        """The TLS session over ``channel`` (the destination checked and accepting us)."""
        from pymig.errors import TlsError
        from pymig.transport import tls
        from pymig.transport.channel import SocketChannel

        creds, hostname = self._tls
        if not isinstance(channel, SocketChannel):
            raise TlsError(f"TLS needs a socket, and {channel.name} is not one (a pipe or a "
                           f"file passed as fd:)")
        secured = tls.connect(channel, creds, hostname)
        self._channel = secured
        self.stats.set_tls(secured.version, secured.cipher, secured.handshake_s)
        return secured

    # -- the preempt channel (postcopy-preempt) ----------------------------------------------
    def _preempt_token(self) -> int | None:
        """A fresh token for ADVISE or RESUME if a preempt channel is to follow, else None."""
        if not self.params.snapshot().capabilities.get("postcopy-preempt"):
            return None
        return postcopy_mod.new_token()

    def _connect_preempt(self, uri: str, token: int) -> None:
        """Open the preempt channel to ``uri`` (where the main one went, behind it: the
        destination accepts it once it has read ADVISE or RESUME), over TLS if the main
        channel is, and send its header and PREEMPT with ``token``."""
        from pymig.errors import TlsError
        from pymig.transport import tls
        from pymig.transport.channel import SocketChannel

        channel = transport.connect(uri, timeout=10.0)
        self._preempt_channel = channel
        if self._tls is not None:
            creds, hostname = self._tls
            if not isinstance(channel, SocketChannel):
                raise TlsError(f"TLS needs a socket, and {channel.name} is not one")
            channel.settimeout(SEND_TIMEOUT_S)
            self._preempt_channel = channel = tls.connect(channel, creds, hostname)
        channel.settimeout(SEND_TIMEOUT_S)
        writer = stream.StreamWriter(channel)
        postcopy_mod.open_preempt(writer, token)
        self._preempt_writer = writer

    def _close_preempt(self) -> None:
        channel, self._preempt_channel = self._preempt_channel, None
        self._preempt_writer = None
        if channel is not None:
            _quietly("closing the preempt channel", channel.close, level=logging.DEBUG)

    def _tell_destination(self, writer: "stream.StreamWriter | None",
                          ret: "ReturnPath | None", exc: BaseException) -> None:
        """The migration ends here, before the commit, for a reason of the source's own (a
        cancel, a limit, a failure on this side): say so to the destination, which would
        otherwise only see the stream end.  Best effort, and only where the stream is at a
        record boundary."""
        channel = self._channel
        if writer is None or writer.broken or channel is None or channel.closed:
            return
        if isinstance(exc, Cancelled) or self._cancel.is_set():
            reason = str(exc).removeprefix("migration cancelled").lstrip(": ")
        else:
            reason = f"the source failed: {exc}"
        try:
            channel.settimeout(CANCEL_SEND_TIMEOUT_S)
            if not writer.ended:
                writer.cancel(reason)
            elif channel.has_return_path:  # the destination waits for COMMIT: not that
                stream.ReturnPathWriter(channel).cancel(reason)
        except (PymigError, OSError) as send_exc:
            log.debug("could not tell the destination the migration ended: %s", send_exc)
            return
        if ret is not None:
            # Closing a TCP socket with return-path messages unread resets the connection,
            # and a reset can drop what the destination had not read yet, the CANCEL with
            # it: end the stream, and let the return path read on until the destination,
            # having read it, closes.
            channel.end_sending()
            ret.error_after_close(CANCEL_SEND_TIMEOUT_S)

    def _commit(self) -> None:
        """Cross the point of no return, unless a cancel got there first."""
        with self._lock:
            if self._cancel.is_set():
                raise Cancelled("migration cancelled")
            self._committed = True

    def _check(self, ret: "ReturnPath | None") -> None:
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")
        if ret is not None and ret.error is not None:
            raise MigrationError(f"destination failed: {ret.error}")

    def _postcopy_switch(self, writer: "stream.StreamWriter", channel,
                         ret: "ReturnPath") -> None:
        """Switch to post-copy: stop the vCPUs, send LISTEN (the pages still to send), the
        device state and EOF; on COMMIT the destination runs the guest, and every page
        still here follows, those it asks for first (pymig.postcopy)."""
        machine, guest, saver, stats = self.machine, self.machine.guest, \
            self.machine.ram_saver, self.stats
        # The guest stops only once the destination has loaded everything sent: a backlog
        # left in the socket would be loaded inside the downtime (as before a stop-and-copy).
        # What the guest writes meanwhile is only more for LISTEN to name.
        ret.wait_caught_up(writer.bytes_written, timeout=ACK_TIMEOUT_S, check=self._check)
        if self._preempt_channel is not None and peer_closed(self._preempt_channel):
            # idle since the setup: lost now, it would pause the post-copy at its first page;
            # the guest can still run on here
            raise MigrationError("the preempt channel was lost before the switch to post-copy")
        if not self._transition(Status.ACTIVE, Status.POSTCOPY_ACTIVE):
            raise Cancelled("migration cancelled")
        phases = DowntimePhases(time.time_ns())
        guest.pause()
        if not self.params.snapshot().switchover_capped:
            self._uncapped = True
            channel.set_max_bandwidth(0)
        phases.mark("pause")
        writer.hold()
        saver.sync()  # what the guest wrote since the last pass: still to send
        self.postcopy.listen(writer)
        phases.mark("last-ram")
        machine.save_device_state(writer)
        phases.mark("device-state")
        writer.eof()
        phases.mark("send")
        ret.wait_for(stream.Loaded, timeout=ACK_TIMEOUT_S, check=self._check)
        self._check(ret)
        self._commit()
        committed_ns = time.time_ns()
        stream.ReturnPathWriter(channel).commit()
        ack = ret.wait_for(stream.Ack, timeout=ACK_TIMEOUT_S, check=None)
        started_ns = min(max(ack.vcpu_start_ns, committed_ns), time.time_ns())
        phases.mark("destination", started_ns)
        stats.set_downtime(phases.total_s, phases.seconds)
        self._push_the_rest(writer, channel, ret)
        stats.completed(phases.total_s, phases.seconds)
        self._transition(Status.POSTCOPY_ACTIVE, Status.COMPLETED)

    def _push_the_rest(self, writer: "stream.StreamWriter", channel, ret: "ReturnPath") -> None:
        """Post-copy with the guest running at the destination: every page still here goes,
        those it asks for first, then EOF, until the destination says it has them all."""
        postcopy_mod.shrink_queue(channel, socket.SO_SNDBUF)
        entry = self.machine.registry.find(RAM_IDSTR, 0)
        ram = SectionOut(writer, entry)
        preempt = self._preempt_writer
        if preempt is not None:
            self.postcopy.start_preempt(SectionOut(preempt, entry))
        try:
            self.postcopy.run(ram, check=ret.check_alive)
            writer.eof()
            # (requests are served on the preempt channel until the destination has every
            # page: the end of the push is still on its way to it)
            ret.wait_for(stream.Shut, timeout=ACK_TIMEOUT_S, check=None)
        finally:
            self.postcopy.stop_preempt()

    def _fail(self, exc: BaseException, *, resume: bool, committed: bool) -> None:
        guest = self.machine.guest
        if committed and self._status == Status.POSTCOPY_ACTIVE:
            # Neither side holds the whole guest: this one keeps what it did not send, paused,
            # for a recovery; the destination's vCPUs wait in their faults.
            self.error = exc
            self.stats.paused(f"post-copy paused: {exc}")
            self._transition(Status.POSTCOPY_ACTIVE, Status.POSTCOPY_PAUSED)
            return
        if resume:
            try:
                guest.resume()
            except PymigError as resume_exc:  # reported, never hidden
                exc = MigrationError(f"{exc}; and resuming the source failed: {resume_exc}")
        cancelled = isinstance(exc, Cancelled) or self._cancel.is_set()
        if committed:
            text = (f"the destination was told to start but did not confirm: {exc}; the guest "
                    f"stays paused here so that it never runs twice")
        elif isinstance(exc, PymigError):
            text = str(exc)
        else:
            text = f"{type(exc).__name__}: {exc}"
        self.error = exc
        if cancelled:
            self.stats.cancelled()
            for state in CANCELLABLE_STATES:
                if self._transition(state, Status.CANCELLING):
                    break
            self._transition(Status.CANCELLING, Status.CANCELLED)
        else:
            self.stats.failed(text)
            for state in (*CANCELLABLE_STATES, Status.CANCELLING):
                if self._transition(state, Status.FAILED):
                    break


def peer_closed(channel) -> bool:
    """Whether the end of ``channel``'s connection is already waiting in its receive queue
    (a FIN or a reset the return path's thread may not have read yet); False for a channel
    without a socket, or with data still to read before the end."""
    sock = getattr(channel, "sock", None)
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


ACK_TIMEOUT_S = 60.0
#: A pass held for a destination far behind waits for its reports in slices this long at most,
#: to see a cancel or the user's switchover between them.
HELD_WAIT_SLICE_S = 0.1
#: How long a cancel waits for the migration thread to reach a record boundary (and send the
#: destination a CANCEL record) before it cuts the channel under a send that is stuck.
CANCEL_GRACE_S = 1.0
#: How long sending that CANCEL record may take.
CANCEL_SEND_TIMEOUT_S = 1.0
#: How long a closed channel's return-path thread may take to end (it wakes at once: the close
#: shuts the socket down under its receive).
RETURN_PATH_JOIN_S = 10.0
#: How long a new migration waits for the previous one's thread to release what it held (an
#: exec: command's exit is waited for up to 30 s).
RELEASE_WAIT_S = 60.0
#: After this long without writing a record, the source sends an empty RAM packet: a
#: destination drops a source from which nothing whole came for its progress timeout, and a
#: source may rightly have nothing to send for longer (a converged idle guest that cannot
#: switch over yet, a wait for migrate-continue).
KEEPALIVE_INTERVAL_S = 1.0


class KeepAlive:
    """Calls ``send`` (which writes a record) whenever :meth:`tick` finds that ``writer``
    has written nothing for :data:`KEEPALIVE_INTERVAL_S`; tick at least that often while
    the stream may be quiet."""

    def __init__(self, writer: "stream.StreamWriter", send: Callable[[], None],
                 interval_s: float = KEEPALIVE_INTERVAL_S):
        self._writer = writer
        self._send = send
        self._interval = interval_s
        self._written = writer.bytes_written
        self._since = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if self._writer.bytes_written != self._written:
            self._written, self._since = self._writer.bytes_written, now
        elif now - self._since >= self._interval:
            self._send()
            self._written, self._since = self._writer.bytes_written, now


THROTTLE_SLICE_S = 0.1


def iteration_slice_s(params: MigrationParameters) -> float:
    """How long one iteration sends before the next sync and decision.  A policy that may
    throttle the guest needs its dirty rate now, not after a whole pass over RAM (seconds of
    a large guest at a capped bandwidth): then an iteration is a slice of
    :data:`THROTTLE_SLICE_S` and the next one goes on where it stopped.  Otherwise an
    iteration is a whole pass (``math.inf``)."""
    caps = params.capabilities
    if caps.get("auto-converge") or caps.get("dirty-limit"):
        return THROTTLE_SLICE_S
    return math.inf


SEND_TIMEOUT_S = 120.0


def _quietly(what: str, fn: Callable[..., object], *args: object,
             level: int = logging.WARNING) -> None:
    try:
        fn(*args)
    except (PymigError, OSError) as exc:
        log.log(level, "migration cleanup: %s failed: %s", what, exc)


def check_dirty_limit(params: MigrationParameters, guest) -> None:
    """Refuse a dirty-limit migration that could not apply its caps, before anything starts."""
    caps = params.capabilities
    if not caps.get("dirty-limit"):
        return
    if caps.get("auto-converge"):
        raise MigrationError("the dirty-limit and auto-converge capabilities exclude each other: "
                             "one slows the vCPUs that dirty too fast, the other all of them")
    if not params.dirty_limit_pages_per_s:
        raise MigrationError("the dirty-limit capability needs the vcpu-dirty-limit parameter "
                             "(pages/s per vCPU)")
    if not getattr(guest, "supports_dirty_limit", False):
        raise MigrationError("the dirty-limit capability needs per-vCPU dirty rates, which this "
                             "guest cannot measure: a KVM guest needs the dirty ring "
                             "(pymig run --dirty-ring N)")


def check_postcopy(params: MigrationParameters, scheme: str, guest) -> None:
    """Refuse a post-copy migration that could not switch, before anything starts."""
    try:
        postcopy_mod.check_preempt(params.capabilities.get("postcopy-ram", False),
                      params.capabilities.get("postcopy-preempt", False), scheme)
    except ValueError as exc:
        raise MigrationError(str(exc)) from None
    if not params.capabilities.get("postcopy-ram"):
        return
    if scheme not in TLS_SCHEMES:
        raise MigrationError(f"the postcopy-ram capability needs a return path (tcp:, unix: or "
                             f"fd: sockets), which a {scheme}: migration has not")
    postcopy_mod.check_backing(guest.ram_blocks)


def check_background_snapshot(params: MigrationParameters, scheme: str, guest) -> None:
    """Refuse a background snapshot that could not be taken, before anything starts."""
    if not params.capabilities.get("background-snapshot"):
        return
    if scheme in ("tcp", "unix"):  # (an fd: socket is refused once connected: setup)
        raise MigrationError(f"the background-snapshot capability writes a snapshot, a one-way "
                             f"stream (file:, exec:, a file or pipe as fd:), not a migration "
                             f"to a destination ({scheme}:)")
    bgsnapshot.check_guest(guest.ram_blocks)


def postcopy_due(requested: bool, iteration: int, params: MigrationParameters) -> bool:
    """Whether to switch to post-copy at this sync: asked for (migrate-start-postcopy), or
    ``x-postcopy-after`` passes over RAM are through (the sync after pass N is number N+1)."""
    after = params.postcopy_after_passes
    return requested or (after > 0 and iteration > after)


def apply_dirty_limits(guest, limits: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Cap each vCPU's dirty rate at ``limits`` (one per vCPU, or one for all), or lift every
    cap (None).  Returns what is now in force."""
    if limits is None:
        for index in range(guest.vcpu_count):
            guest.set_vcpu_dirty_limit(index, None)
        return None
    if len(limits) == 1:
        limits = limits * guest.vcpu_count
    for index, limit in enumerate(limits):
        guest.set_vcpu_dirty_limit(index, limit)
    return tuple(limits)


def policy_params(params: MigrationParameters) -> policy_mod.PolicyParams:
    """The policy's view of the current parameters and capabilities."""
    caps = params.capabilities
    return policy_mod.PolicyParams(
        downtime_limit_s=params.downtime_limit_ms / 1000.0,
        auto_converge=caps.get("auto-converge", False),
        throttle_initial_pct=params.throttle_initial_pct,
        throttle_increment_pct=params.throttle_increment_pct,
        throttle_max_pct=params.throttle_max_pct,
        throttle_trigger_threshold=params.throttle_trigger_threshold / 100.0,
        throttle_tailslow=params.throttle_tailslow,
        throttle_mode=params.throttle_mode,
        dirty_limit_pages_per_s=(params.dirty_limit_pages_per_s or None)
        if caps.get("dirty-limit") else None,
        max_iterations=params.max_iterations or None,
        max_total_time_s=(params.max_total_time_ms / 1000.0) or None,
        max_bytes_ratio=params.max_bytes_ratio or None,
        limit_action=params.limit_action,
    )


class DowntimePhases:
    """Where a downtime went, phase by phase, in seconds (``seconds``, in the order they
    ended): ``pause`` (the vCPUs stopping), ``pre-switchover`` (with that capability: the
    wait for ``migrate-continue``), ``last-ram`` (the last sync and pages),
    ``device-state`` (saving and encoding the vCPUs and devices), ``send`` (the held records
    and EOF written), ``destination`` (loading, LOADED / COMMIT, until its vCPUs ran: a
    channel with a return path only).  The downtime is their sum, from the stop to the
    destination's vCPUs running (or, one way, to the stream's end)."""

    def __init__(self, start_ns: int):
        self._start = self._last = start_ns
        self.seconds: dict[str, float] = {}

    @property
    def total_s(self) -> float:
        return max(self._last - self._start, 0) / 1e9

    def mark(self, phase: str, at_ns: int | None = None) -> None:
        """``phase`` ended now (or at ``at_ns``, CLOCK_REALTIME)."""
        now = time.time_ns() if at_ns is None else at_ns
        self.seconds[phase] = max(now - self._last, 0) / 1e9
        self._last = now


#: The schemes whose channel is a socket TLS can run over.
TLS_SCHEMES = ("tcp", "unix", "fd")


def tls_for(params: MigrationParameters, uri, credentials):
    """(credentials, host name) for a migration to ``uri`` (parsed) with ``params``, or None
    without ``tls-creds``; raises MigrationError for TLS that cannot be: credentials that do
    not load, a scheme that is not a socket, no name to check the destination against."""
    if not params.tls_creds:
        return None
    from pymig.errors import TlsError
    from pymig.transport.tlscreds import CredentialStore

    if uri.scheme not in TLS_SCHEMES:
        raise MigrationError(f"tls-creds is set, and TLS protects tcp:, unix: and fd: sockets "
                             f"only: a {uri.scheme}: stream would go out in plaintext (set "
                             f"tls-creds to \"\" to send it so)")
    try:
        creds = (credentials or CredentialStore()).resolve(params.tls_creds)
        creds.for_role(server=False)
    except TlsError as exc:
        raise MigrationError(str(exc)) from None
    hostname = params.tls_hostname or (uri.host if uri.scheme == "tcp" else "")
    if not hostname:
        raise MigrationError(f"TLS over {uri.scheme}: needs tls-hostname: the name the "
                             f"destination's certificate must carry (a {uri.scheme}: URI has "
                             f"no host)")
    return creds, hostname


class _Run:
    """One outgoing migration on the migration thread: its phases (:meth:`setup`,
    :meth:`converge`, :meth:`stop_and_copy`, and :meth:`release` whatever happened) and what
    they share.  It measures (:class:`pymig.measure.Estimators`), asks the policy
    (:func:`pymig.policy.next_step`) and does what it says; the rule is the policy's alone."""

    def __init__(self, migration: Migration):
        self.migration = migration
        self.machine, self.guest = migration.machine, migration.machine.guest
        self.stats, self.trace = migration.stats, migration._trace
        self.saver = migration.machine.ram_saver
        self.saver.cancelled = migration._cancel.is_set
        self.started = time.monotonic()
        self.params: MigrationParameters | None = None  # as of the last sync
        self.channel = None
        self.writer: stream.StreamWriter | None = None
        self.ret: ReturnPath | None = None
        self.progress = DestinationProgress()
        self.keep_alive: KeepAlive | None = None
        self.estimators: Estimators | None = None
        self.course = Course()
        self.metrics: policy_mod.Metrics | None = None  # the last sync's
        self.paused_by_us = False  # the stop-and-copy stopped a running guest: run it again after
        self.advised_at = 0  # the stream offset past post-copy's ADVISE
        # with the background-snapshot capability: RAM's write protection (setup makes it)
        self.tracker: bgsnapshot.WriteTracker | None = None
        self.to_postcopy = False  # converging ended in a switch to post-copy

    def _live(self, handler: str) -> None:
        """Call ``handler`` of every live entry (RAM, and whatever else iterates beside it)."""
        for entry in self.machine.registry.live_entries():
            getattr(entry.handlers, handler)(entry.opaque, SectionOut(self.writer, entry))

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, uri: str) -> None:
        """Connect, send the header, the configuration and each live entry's setup; then
        setup → active, and the estimators start."""
        m, saver = self.migration, self.saver
        self.started = time.monotonic()
        self.stats.begin()
        self.params = params = m.params.snapshot()
        self.channel = channel = transport.connect(uri, timeout=10.0)
        m._channel = channel
        if m._tls is not None:
            self.channel = channel = m._secure(channel)
        channel.settimeout(SEND_TIMEOUT_S)  # a destination that stops reading fails us
        if m._cancel.is_set():
            raise Cancelled("migration cancelled")
        channel.set_max_bandwidth(params.max_bandwidth)
        saver.compress = params.compression == "lz4"
        background = params.capabilities.get("background-snapshot", False)
        if background:
            if channel.has_return_path:
                raise MigrationError(f"the background-snapshot capability writes a snapshot, "
                                     f"a one-way stream, and {channel.name} is a socket with "
                                     f"a return path")
            self.tracker = bgsnapshot.WriteTracker(saver.blocks, saver.bitmaps)
            self.stats.set_background_snapshot(self.tracker.query)
        saver.track_dirty = not background
        self.writer = writer = stream.StreamWriter(channel)
        saver.on_packet = self._packet_sent
        if params.capabilities.get("postcopy-ram"):
            if not channel.has_return_path:
                raise MigrationError(f"post-copy needs a return path, which {channel.name} "
                                     f"has not")
            m.postcopy = PostcopySource(saver, self.stats)
            self.stats.set_postcopy(m.postcopy.query)
        if channel.has_return_path:
            self.ret = ReturnPath(channel, on_loaded=self.progress.reported,
                                  on_page_request=m.postcopy.page_request
                                  if m.postcopy is not None else None)
        writer.write_header()
        self.machine.save_config(writer)
        if m.postcopy is not None:
            token = m._preempt_token()
            postcopy_mod.advise(writer, token)
            self.advised_at = writer.bytes_written
            if token is not None:
                m._connect_preempt(uri, token)
        saver.cap_packets(params.max_bandwidth)
        self._live("setup")
        self.keep_alive = KeepAlive(writer, lambda: saver.keep_alive(
            SectionOut(writer, self.machine.registry.find(RAM_IDSTR, 0))))
        self.machine.rehearse_state_save()
        if not m._transition(Status.SETUP, Status.ACTIVE):
            raise Cancelled("migration cancelled")
        self.stats.setup_done()
        self.estimators = Estimators(
            channel=channel, saver=saver, registry=self.machine.registry, guest=self.guest,
            writer=writer, ret=self.ret, progress=self.progress,
            ram_bytes=self.machine.ram_bytes, page_size=self.stats.page_size,
            started=self.started)

    def _packet_sent(self, r) -> None:
        self.stats.add_sent(nbytes=r.nbytes, normal_pages=r.normal_pages,
                            zero_pages=r.zero_pages, compressed_pages=r.compressed_pages)
        if self.ret is not None:  # (only reports ever shorten the ledger)
            self.progress.packet_sent(self.writer.bytes_written, self.saver.page_bytes_sent)

    # -- converge --------------------------------------------------------------------------------
    def converge(self) -> None:
        """Sync, ask the policy, do what it says, until it says switch over (or cancel)."""
        while True:
            step = self._sync_and_ask()
            if self.to_postcopy:
                self.stats.switchover("postcopy", step.decision.expected_downtime_s)
                return
            if step.move is Move.SWITCHOVER:
                self.stats.switchover(step.reason, step.decision.expected_downtime_s)
                return
            if step.move is Move.CANCEL:
                raise Cancelled(f"migration cancelled: {step.reason}")
            if step.move is Move.WAIT:
                self._wait_caught_up(step.decision)
                continue
            if step.move is Move.RESEND:
                self.course.passes_after_wait += 1
                # The source's rate so far counts the time it spent blocked behind the
                # destination's backlog; this pass, caught up and all re-sends, is what the
                # stop-and-copy will be like: measure the source's rate on it alone.
                self.estimators.restart_source_rate()
            held = None
            if step.move is Move.HOLD and step.reason == policy_mod.Held.BEHIND.value:
                held = policy_mod.held_wait(step.decision, self.metrics)
            self._iterate(held)

    def _sync_and_ask(self) -> Step:
        m, course = self.migration, self.course
        m._check(self.ret)
        self.keep_alive.tick()
        self.params = params = m.params.snapshot()
        self.saver.cap_packets(params.max_bandwidth)
        self.estimators.cap(params.max_bandwidth)
        found = self.saver.sync()
        course.iteration += 1
        metrics = self.estimators.metrics(found, params, course,
                                          manual_switchover=m._manual_switchover.is_set())
        course.expected_before_wait_s = math.inf
        self.metrics = metrics
        step = policy_mod.next_step(metrics, policy_params(params), m.decide)
        course.hot_periods = step.decision.hot_periods
        self._record(found, metrics, step.decision)
        if (m.postcopy is not None and self.ret.loaded_up_to(self.advised_at)
                and postcopy_due(m._start_postcopy.is_set(), course.iteration, params)):
            # Asked for, post-copy goes first (as QEMU's), whatever the policy says, and
            # before any throttle it wants: post-copy needs none.  Not before the destination
            # loaded ADVISE, though: one that cannot take post-copy says so then, and the
            # guest must not stop for nothing.
            self.to_postcopy = True
            return step
        self._apply(step.decision)
        return step

    def _record(self, found: int, metrics: policy_mod.Metrics,
                decision: policy_mod.Decision) -> None:
        """The sync in the stats and the trace, and to whoever listens for passes."""
        course = self.course
        record = self.stats.record_sync(
            iteration=course.iteration, dirty_pages=found, remaining_bytes=metrics.pending_bytes,
            bandwidth_bps=metrics.bandwidth_bps,
            stopped_bandwidth_bps=metrics.stopped_bandwidth_bps,
            dirty_rate_pps=self.estimators.dirty_pps,
            expected_downtime_s=decision.expected_downtime_s, throttle_pct=course.throttle_pct,
            vcpu_dirty_rates=metrics.vcpu_dirty_rates,
            vcpu_dirty_limits=decision.vcpu_dirty_limits,
            action=decision.action.value, reason=decision.reason,
            caught_up_wait_s=course.waited_s, backlog_bytes=metrics.backlog_bytes)
        course.waited_s = 0.0
        for callback in list(self.migration._pass_listeners):
            callback(record)

    def _apply(self, decision: policy_mod.Decision) -> None:
        """The throttle and the dirty caps the decision wants in force."""
        guest, course = self.guest, self.course
        if decision.throttle_pct != course.throttle_pct:
            course.throttle_pct = decision.throttle_pct
            guest.set_throttle(course.throttle_pct)
            self.stats.set_throttle(course.throttle_pct)
        if decision.vcpu_dirty_limits != course.dirty_limits:
            course.dirty_limits = apply_dirty_limits(guest, decision.vcpu_dirty_limits)
            self.stats.set_vcpu_dirty_limits(course.dirty_limits)

    def _wait_caught_up(self, decision: policy_mod.Decision) -> None:
        """Until the destination has loaded everything sent: a backlog left in the socket
        would be loaded inside the downtime (the next sync and decision follow at once)."""
        began = time.monotonic()
        self.ret.wait_caught_up(self.writer.bytes_written, timeout=ACK_TIMEOUT_S,
                                check=self.migration._check)
        self.course.waited_s = time.monotonic() - began
        self.estimators.all_loaded()
        self.course.expected_before_wait_s = decision.expected_downtime_s

    def _iterate(self, held: policy_mod.HeldWait | None = None) -> None:
        """One pass (or slice) of every live entry, then, behind a slow destination, its
        next report (:func:`pymig.policy.behind_wait_s`), or, ``held`` for a destination far
        behind, its reports until it is close enough (:func:`pymig.policy.held_wait`)."""
        saver, ret = self.saver, self.ret
        t0, b0 = time.monotonic(), saver.page_bytes_sent
        saver.slice_deadline = t0 + iteration_slice_s(self.params)
        self._live("iterate")
        sent = saver.page_bytes_sent - b0
        if ret is not None and held is not None:
            self._wait_behind(held, t0)
        elif ret is not None:
            wait_s = policy_mod.behind_wait_s(self.estimators.backlog_page_bytes(), sent,
                                              time.monotonic() - t0)
            if wait_s > 0:
                ret.wait_for_report(wait_s)
        self.estimators.passed(sent)

    def _wait_behind(self, held: policy_mod.HeldWait, began: float) -> None:
        """The destination's reports until its backlog is down to ``held.backlog_bytes`` or
        ``held.at_most_s`` after ``began``; a cancel, the user's switchover or a return path
        gone ends it."""
        m = self.migration
        deadline = began + held.at_most_s
        while self.estimators.backlog_page_bytes() > held.backlog_bytes:
            left = deadline - time.monotonic()
            if left <= 0 or m._manual_switchover.is_set():
                return
            self.ret.wait_for_report(min(left, HELD_WAIT_SLICE_S))
            m._check(self.ret)
            self.ret.check_alive()

    # -- stop-and-copy ---------------------------------------------------------------------------
    def stop_and_copy(self) -> None:
        """Stop the guest, send what is left and the device state, commit, active → device →
        completed.  From the stop on the guest is paused until the destination runs it, or
        until it resumes here because something failed before the commit."""
        m, guest, saver, ret = self.migration, self.guest, self.saver, self.ret
        if self.to_postcopy:
            self.paused_by_us = guest.status == "running"
            m._postcopy_switch(self.writer, self.channel, ret)
            return
        # (with a return path converging ended caught up: the destination has built its
        # guest, READY came before any CAUGHT_UP, and loaded everything sent)
        pause_first = self.params.capabilities.get("pause-before-switchover")
        if not m._transition(Status.ACTIVE,
                             Status.PRE_SWITCHOVER if pause_first else Status.DEVICE):
            raise Cancelled("migration cancelled")
        phases = DowntimePhases(time.time_ns())
        # Only a guest that was running is started again, after a failure or a snapshot
        # (stop and cont are refused while a migration runs, so this is its state before).
        self.paused_by_us = guest.status == "running"
        guest.pause()
        if not m.params.snapshot().switchover_capped:
            # The cap protects the network from a guest that runs; this one is stopped,
            # and every ms now is downtime (QEMU lifts the cap here too).
            m._uncapped = True
            self.channel.set_max_bandwidth(0)
            saver.cap_packets(0)
        phases.mark("pause")
        if pause_first:
            self._wait_for_continue()
            phases.mark("pre-switchover")
            if not m._transition(Status.PRE_SWITCHOVER, Status.DEVICE):
                raise Cancelled("migration cancelled")
        self.writer.hold()  # what is left goes out in as few writes as it can (EOF sends it)
        self._live("complete")
        phases.mark("last-ram")
        self.machine.save_device_state(self.writer)
        phases.mark("device-state")
        if ret is not None:
            self._commit_two_way(phases)
        else:
            self._commit_one_way(phases)
        self.stats.completed(phases.total_s, phases.seconds)
        if m.resume_source and self.paused_by_us:
            guest.resume()
        m._transition(Status.DEVICE, Status.COMPLETED)

    def _wait_for_continue(self) -> None:
        """pause-before-switchover: with the guest stopped, wait in ``pre-switchover`` for
        ``migrate-continue`` (QEMU's order: the operator acts on a guest that no longer
        runs, before its device state is saved); the wait is downtime."""
        m = self.migration
        while not m._continue_switchover.wait(0.05):
            m._check(self.ret)
            self.keep_alive.tick()  # the wait may be minutes; the destination's clock runs

    def _commit_two_way(self, phases: DowntimePhases) -> None:
        m, ret = self.migration, self.ret
        self.writer.eof()
        phases.mark("send")
        ret.wait_for(stream.Loaded, timeout=ACK_TIMEOUT_S, check=m._check)
        m._check(ret)
        if peer_closed(self.channel) and not ret.acknowledged_before_end(ACK_TIMEOUT_S):
            # LOADED came with the connection's end right behind it (a destination that died
            # as it said LOADED): a COMMIT now would reach no one, and the guest would stay
            # paused here for want of an ACK.  (One that said ACK already claims the guest
            # runs there: resuming it here could run it twice.)
            raise MigrationError("the destination closed the connection before the commit")
        m._commit()
        committed_ns = time.time_ns()
        stream.ReturnPathWriter(self.channel).commit()
        ack = ret.wait_for(stream.Ack, timeout=ACK_TIMEOUT_S, check=None)
        # The destination's word and clock: its vCPUs started after COMMIT left and before
        # their ACK was here, whatever it says (the downtime is reported).
        started_ns = min(max(ack.vcpu_start_ns, committed_ns), time.time_ns())
        phases.mark("destination", started_ns)

    def _commit_one_way(self, phases: DowntimePhases) -> None:
        # A one-way channel: the whole stream is the commit.  Cancels are refused while its
        # last record goes out; if that fails (or an exec: command exits non-zero at the
        # end), no destination has a whole stream, and the source carries on.
        m = self.migration
        m._commit()
        try:
            self.writer.eof()
        except BaseException:
            with m._lock:
                m._committed = False
            raise
        phases.mark("send")

    # -- background snapshot ---------------------------------------------------------------------
    def background_snapshot(self) -> None:
        """Stop the vCPUs, write-protect RAM, encode the device state, let the vCPUs run on;
        then save every page as it was at the stop, and the device state after them
        (pymig.bgsnapshot); active → completed.  The downtime is the stop alone."""
        m, guest, saver, tracker = self.migration, self.guest, self.saver, self.tracker
        phases = DowntimePhases(time.time_ns())
        self.paused_by_us = guest.status == "running"
        guest.pause()
        phases.mark("pause")
        for bitmap, block in zip(saver.bitmaps, saver.blocks):
            # with the vCPUs stopped: a page first written before now is resident now
            core.bitmap_merge(bitmap, block.touched(), block.npages)
        tracker.protect()
        phases.mark("protect")
        device_state = self.machine.encode_device_state()
        phases.mark("device-state")
        if self.paused_by_us:
            guest.resume()
            self.paused_by_us = False
        phases.mark("resume")
        self.stats.set_downtime(phases.total_s, phases.seconds)
        ram = SectionOut(self.writer, self.machine.registry.find(RAM_IDSTR, 0))
        bgsnapshot.save_ram(
            saver, ram, tracker, check=lambda: m._check(None),
            trace=lambda: self.stats.record_background_snapshot(
                tracker.query(), tracker.pending_pages() * self.stats.page_size))
        self.machine.write_device_state(self.writer, device_state)
        self._commit_one_way(DowntimePhases(time.time_ns()))
        tracker.stop()
        self.stats.completed(phases.total_s, phases.seconds)
        if not m.resume_source and guest.status == "running":
            guest.pause()  # asked to stop once the snapshot is taken
        m._transition(Status.ACTIVE, Status.COMPLETED)

    # -- the end, whatever it is -----------------------------------------------------------------
    def failed(self, exc: BaseException) -> None:
        """The migration failed or was cancelled: the guest as it was, the destination told."""
        m, ret = self.migration, self.ret
        if self.tracker is not None:
            # before the guest resumes: every page writable again, no vCPU left waiting
            _quietly("lifting the write protection", self.tracker.stop)
        if ret is not None and isinstance(exc, TransportError):
            # A destination that refuses the stream says why on the return path, then
            # closes; that reason matters more than the broken pipe it causes here.
            reason = ret.error_after_close(timeout=2.0)
            if reason is not None:
                exc = MigrationError(f"destination failed: {reason}")
        elif not m._committed and (ret is None or ret.error is None):
            m._tell_destination(self.writer, ret, exc)
        # A destination that answered COMMIT with LOAD_ERROR never ran its guest (it says so
        # only before it runs, and discards it): the guest can only run here.
        committed = m._committed and not (ret is not None and ret.refused())
        m._fail(exc, resume=self.paused_by_us and not committed, committed=committed)

    def release(self) -> None:
        """Whatever happened: the live entries cleaned up, the throttle and caps lifted, the
        return path and the channel closed, the trace written.  Each step on its own: a guest
        closed under a running migration (its process quitting) must not keep the others
        from releasing what they hold."""
        m, guest, stats, course = self.migration, self.guest, self.stats, self.course
        if self.tracker is not None:
            _quietly("lifting the write protection", self.tracker.stop)
        for entry in self.machine.registry.live_entries():
            _quietly(f"cleaning up {entry.name}", entry.handlers.cleanup, entry.opaque)
        if course.throttle_pct:
            _quietly("lifting the throttle", guest.set_throttle, 0)
            stats.set_throttle(0)
        if course.dirty_limits is not None:
            _quietly("lifting the dirty limits", apply_dirty_limits, guest, None)
            stats.set_vcpu_dirty_limits(None)
        if self.ret is not None:
            self.ret.stop()
        if m._channel is not None:
            # After a cancel or a failure, an exec: command killed or failed says so here;
            # the migration's status already tells, and the thread must not die.
            _quietly("closing the channel", m._channel.close,
                     level=logging.WARNING if m._status == Status.COMPLETED
                     else logging.DEBUG)
            m._channel = None
        m._close_preempt()
        if self.ret is not None:
            self.ret.join()  # it ends once the channel is closed under it
        m._stop_cut_timer()
        if self.trace:
            self.trace.close()


class ReturnPath:
    """Reads the destination's messages in a thread; an error fails the migration at once."""

    def __init__(self, channel, on_loaded: Callable[[int], None] | None = None,
                 on_page_request: Callable[["stream.PageRequest"], None] | None = None):
        self.reader = stream.ReturnPathReader(channel)
        # on_page_request(message), in this object's thread: post-copy's requests, in order
        self._on_page_request = on_page_request
        # on_loaded(offset), in this object's thread: the destination loaded the stream up to
        # offset (a PROGRESS or CAUGHT_UP report)
        self._on_loaded = on_loaded
        self._reports = 0  # PROGRESS and CAUGHT_UP messages so far
        self._loaded = 0  # the furthest offset they said the destination loaded
        self.error: str | None = None
        self._messages: dict[type, object] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self.thread = threading.Thread(target=self._loop, name="pymig-return-path",
                                       daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                message = self.reader.recv(timeout=None)
            except PymigError as exc:
                with self._cond:
                    if not self._stopped and self.error is None \
                            and stream.Ack not in self._messages \
                            and stream.Shut not in self._messages:
                        self.error = f"return path lost: {exc}"
                    self._stopped = True
                    self._cond.notify_all()
                return
            if isinstance(message, stream.PageRequest):
                if self._on_page_request is not None:
                    self._on_page_request(message)
                    continue
            report = isinstance(message, (stream.Progress, stream.CaughtUp))
            if report and self._on_loaded is not None:
                self._on_loaded(message.offset)
            with self._cond:
                self._reports += report
                if report:
                    self._loaded = max(self._loaded, message.offset)
                if isinstance(message, stream.LoadError):
                    self.error = message.text
                self._messages[type(message)] = message
                self._cond.notify_all()

    def loaded_up_to(self, offset: int) -> bool:
        """Whether the destination reported loading the stream up to ``offset`` or beyond."""
        with self._cond:
            return self._loaded >= offset

    def check_alive(self) -> None:
        """Raise if the destination failed or the return path is gone (before SHUT)."""
        with self._cond:
            if self.error is not None:
                raise MigrationError(f"destination failed: {self.error}")
            if self._stopped and stream.Shut not in self._messages:
                raise MigrationError("the connection to the destination was lost")

    def acknowledged(self) -> bool:
        """Whether the destination said its guest runs (ACK)."""
        with self._cond:
            return stream.Ack in self._messages

    def acknowledged_before_end(self, timeout: float) -> bool:
        """Whether the destination said ACK before its end, which is in the socket's queue: its
        messages may still be in this object's thread, read from the socket but not yet
        handed over, so this waits (at most ``timeout``) for that thread to reach the end."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopped or stream.Ack in self._messages,
                                timeout)
            return stream.Ack in self._messages

    def refused(self) -> bool:
        """Whether the destination said it failed (LOAD_ERROR) and never acknowledged."""
        with self._cond:
            return stream.LoadError in self._messages and stream.Ack not in self._messages

    def caught_up(self, offset: int) -> bool:
        """Whether the destination said it loaded the stream up to ``offset`` or beyond."""
        with self._cond:
            return self._caught_up(offset)

    def _caught_up(self, offset: int) -> bool:
        latest = self._messages.get(stream.CaughtUp)
        return latest is not None and latest.offset >= offset

    def wait_for_report(self, timeout: float) -> None:
        """Until the destination's next PROGRESS or CAUGHT_UP, at most ``timeout`` seconds
        (returns early, without raising, if the return path failed: the caller checks)."""
        with self._cond:
            seen = self._reports
            self._cond.wait_for(lambda: self._reports != seen or self._stopped
                                or self.error is not None, max(timeout, 0.0))

    def wait_caught_up(self, offset: int, timeout: float, check: Callable | None) -> None:
        """Until the destination has loaded the stream up to ``offset``; raises as
        :meth:`wait_for` does."""
        self._wait(lambda: True if self._caught_up(offset) else None, timeout, check)

    def wait_for(self, kind: type, timeout: float, check: Callable | None):
        """The first message of type ``kind``; raises if the destination failed or went away,
        if ``check(None)`` raises (cancel), or after ``timeout`` seconds."""
        return self._wait(lambda: self._messages.get(kind), timeout, check)

    def _wait(self, found: Callable[[], object], timeout: float, check: Callable | None):
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                result = found()
                if result is not None:
                    return result
                if self.error is not None:
                    raise MigrationError(f"destination failed: {self.error}")
                if self._stopped:
                    raise MigrationError("the destination closed the connection")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MigrationError(f"no answer from the destination in {timeout:.0f} s")
                self._cond.wait(min(remaining, 0.05))
            if check is not None:
                check(None)

    def error_after_close(self, timeout: float) -> str | None:
        """The destination's LOAD_ERROR text, waiting up to ``timeout`` for the return path
        to deliver it or close."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.error is None and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self.error is not None and not self.error.startswith("return path lost"):
                return self.error
            return None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def join(self, timeout: float = RETURN_PATH_JOIN_S) -> None:
        """Wait for the thread to end: call once the channel is closed, which wakes a
        receive blocked in it with the end of the stream."""
        if self.thread is threading.current_thread():
            return
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("the return path's thread did not end within %g s of its channel's "
                        "close", timeout)
