"""Source side: the migration state machine and the migration thread.

.. code-block:: text

    stateDiagram-v2
        none --> setup : migrate(uri)
        setup --> active : entries set up, stream header sent
        active --> device : policy says switch over; vCPUs stop
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

from pymig import policy as policy_mod
from pymig import stream, transport
from pymig.estimate import (Bandwidth, DestinationProgress, DirtyRate, LoggedRate, StopSpeedup,
                            SwitchoverCost, TriggerPeriod, host_cpu_seconds, in_flight_bytes,
                            thread_cpu_seconds)
from pymig.errors import MigrationError, PymigError, TransportError
from pymig.machine import Machine, SectionOut
from pymig.parameters import MigrationParameters, ParameterStore
from pymig.ram import RAM_IDSTR
from pymig.stats import MigrationStats, TraceWriter

log = logging.getLogger(__name__)


class Status(str, enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


_ALLOWED: dict[Status, set[Status]] = {
    Status.NONE: {Status.SETUP},
    Status.SETUP: {Status.ACTIVE, Status.FAILED, Status.CANCELLING},
    Status.ACTIVE: {Status.DEVICE, Status.FAILED, Status.CANCELLING},
    Status.DEVICE: {Status.COMPLETED, Status.FAILED, Status.CANCELLING},
    Status.CANCELLING: {Status.CANCELLED, Status.FAILED},
    Status.FAILED: {Status.SETUP},
    Status.CANCELLED: {Status.SETUP},
    Status.COMPLETED: {Status.SETUP},  # only after a snapshot: the guest ran on here
}
ACTIVE_STATES = {Status.SETUP, Status.ACTIVE, Status.DEVICE, Status.CANCELLING}


class Cancelled(MigrationError):
    """The migration was cancelled (by the user or by a limit); the source guest keeps the run
    state it had before."""


class Migration:
    """Outgoing migration of one machine (guest + state registry)."""

    def __init__(self, machine: Machine, params: ParameterStore | None = None,
                 decide: Callable = policy_mod.decide, credentials=None):
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
        self._cancel = threading.Event()
        self._manual_switchover = threading.Event()
        self._continue_switchover = threading.Event()
        self._channel = None
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
              resume_source: bool | None = None) -> None:
        """Begin migrating to ``uri`` in the background; refuses while one is active.

        ``resume_source``: whether the source guest runs on after success, if it was running
        before.  By default it does for ``file:`` (a live snapshot: the guest carries on, the
        file holds its state at the switchover) and does not otherwise (the guest now runs at
        the destination).  A guest paused before the migration stays paused whatever happens.
        """
        parsed = transport.parse_uri(uri)  # a bad URI is the caller's error, before any change
        if resume_source is None:
            resume_source = parsed.scheme == "file"
        self.resume_source = resume_source
        self.scheme = parsed.scheme
        self.machine.registry.check_migratable()
        check_dirty_limit(self.params.snapshot(), self.machine.guest)
        tls = tls_for(self.params.snapshot(), parsed, self.credentials)
        with self._lock:
            current = self._status
        if current in ACTIVE_STATES:
            raise MigrationError(f"a migration is already {current.value}")
        if current == Status.COMPLETED and not self.resume_source:
            raise MigrationError("this guest has already migrated away")
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
        self._manual_switchover.clear()
        self._continue_switchover.clear()
        self.error = None
        blocks = self.machine.guest.ram_blocks
        self._trace = trace
        self.stats = MigrationStats(page_size=blocks[0].page_size,
                                    ram_total_bytes=sum(b.size_bytes for b in blocks),
                                    trace=self._trace)
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
        for state in (Status.SETUP, Status.ACTIVE, Status.DEVICE):
            if self._transition(state, Status.CANCELLING):
                break
        # The migration thread sees the cancel between two records and tells the destination
        # (a CANCEL record); a send stuck on a destination that stopped reading is cut short
        # after a grace period.
        channel = self._channel
        if channel is not None:
            timer = threading.Timer(CANCEL_GRACE_S, self._cut, args=(channel,))
            timer.daemon = True
            timer.start()

    def _cut(self, channel) -> None:
        """A cancel's grace period is over: unblock a send still stuck on ``channel``."""
        if self._channel is channel and self._status == Status.CANCELLING:
            channel.shutdown()

    def switchover(self) -> None:
        """Switch over at the next decision, whatever the expected downtime (manual)."""
        self._manual_switchover.set()

    def continue_switchover(self) -> None:
        """Release a migration waiting with the pause-before-switchover capability."""
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
        machine, guest = self.machine, self.machine.guest
        stats = self.stats
        trace = self._trace
        paused_by_us = False  # the stop-and-copy stopped a running guest: run it again after
        saver = machine.ram_saver
        saver.cancelled = self._cancel.is_set
        ret = None
        writer = None
        throttle = 0
        dirty_limits: tuple[int, ...] | None = None
        try:
            started = time.monotonic()
            stats.begin()
            params = self.params.snapshot()
            channel = transport.connect(uri, timeout=10.0)
            self._channel = channel
            if self._tls is not None:
                channel = self._secure(channel)
            channel.settimeout(SEND_TIMEOUT_S)  # a destination that stops reading fails us
            if self._cancel.is_set():
                raise Cancelled("migration cancelled")
            channel.set_max_bandwidth(params.max_bandwidth)
            saver.compress = params.compression == "lz4"
            writer = stream.StreamWriter(channel)
            progress = DestinationProgress()

            def packet_sent(r) -> None:
                stats.add_sent(nbytes=r.nbytes, normal_pages=r.normal_pages,
                               zero_pages=r.zero_pages, compressed_pages=r.compressed_pages)
                if ret is not None:  # (only reports ever shorten the ledger)
                    progress.packet_sent(writer.bytes_written, saver.page_bytes_sent)

            saver.on_packet = packet_sent
            if channel.has_return_path:
                ret = ReturnPath(channel, on_loaded=progress.reported)
            writer.write_header()
            machine.save_config(writer)
            saver.cap_packets(params.max_bandwidth)
            for entry in machine.registry.live_entries():
                entry.handlers.setup(entry.opaque, SectionOut(writer, entry))
            keep_alive = KeepAlive(writer, lambda: saver.keep_alive(
                SectionOut(writer, machine.registry.find(RAM_IDSTR, 0))))
            machine.rehearse_state_save()
            if not self._transition(Status.SETUP, Status.ACTIVE):
                raise Cancelled("migration cancelled")
            stats.setup_done()

            # The policy weighs pending() against the bandwidth, so both count page bytes
            # (pages x page size): what moves them is the pipeline, whatever their wire size
            # (a zero page is a few bytes there, a compressed one a few dozen).  What is in
            # flight is known in wire bytes; it stands for page bytes at the ratio so far.
            def page_bytes_per_wire_byte() -> float:
                wire = channel.bytes_sent
                return saver.page_bytes_sent / wire if wire and saver.page_bytes_sent else 1.0

            def in_flight_page_bytes() -> int:
                return round(in_flight_bytes(channel) * page_bytes_per_wire_byte())

            def delivered_page_bytes() -> int:
                # With a return path, what the destination reported loading (nothing before
                # its first report); without one, what the socket no longer holds.
                if ret is not None:
                    return progress.delivered(saver.page_bytes_sent) or 0
                return max(saver.page_bytes_sent - in_flight_page_bytes(), 0)

            def backlog_page_bytes() -> int:
                return saver.page_bytes_sent - delivered_page_bytes()

            bandwidth = Bandwidth()
            bandwidth.observe(time.monotonic(), delivered_page_bytes())
            # How fast this side moves pages, over the time it spends sending: re-sent pages
            # cost the destination no first touch, so the stop-and-copy can go at this rate
            # even where the live phase waited on the destination (see estimate.py).  Time
            # spent waiting on max-bandwidth's token bucket is not sending: the stop-and-copy
            # goes uncapped (unless x-switchover-capped), so its rate is the one without it.
            def sending_seconds() -> float:
                return saver.busy_seconds - channel.rate_limiter.slept_s

            source_rate = Bandwidth()
            source_rate.observe(sending_seconds(), saver.page_bytes_sent)
            speedup = StopSpeedup()

            def observe_cpu() -> None:
                # the guest's CPU: everything this process ran but the migration's threads
                own = time.thread_time() + thread_cpu_seconds(saver.sender.thread) + (
                    thread_cpu_seconds(ret.thread) if ret is not None else 0.0)
                speedup.observe(time.monotonic(), *host_cpu_seconds(),
                                time.process_time() - own)

            observe_cpu()
            switchover_s = SwitchoverCost().seconds(guest.vcpu_count, machine.ram_bytes)
            own_rate = DirtyRate()
            logged_rate = LoggedRate()
            trigger = TriggerPeriod()
            trigger.begin(time.monotonic(), saver.page_bytes_sent)
            hot_periods = 0
            iteration = 0
            last_sync = time.monotonic()
            sent_period = 0
            dirty_pps = 0.0
            redeciding = False
            expected_before_wait = math.inf  # the decision a catch-up wait followed
            passes_after_wait = 0
            waited_s = 0.0  # the catch-up wait before the next sync
            while True:
                self._check(ret)
                keep_alive.tick()
                params = self.params.snapshot()
                saver.cap_packets(params.max_bandwidth)
                bandwidth.cap(round(params.max_bandwidth * page_bytes_per_wire_byte()))
                found = saver.sync()
                now = time.monotonic()
                period = max(now - last_sync, 1e-6)
                last_sync = now
                iteration += 1
                measured = logged_rate.add(now, period, found)
                # After a catch-up wait nothing was re-armed since the last sync, so the log
                # cannot show pages written again: the rate is at least the one last measured.
                dirty_pps = max(measured, dirty_pps) if redeciding else measured
                redeciding = False
                dirtied = dirty_pps * period
                backlog = backlog_page_bytes()
                pending = sum(e.handlers.pending(e.opaque)
                              for e in machine.registry.live_entries())
                vcpu_rates = (tuple(guest.vcpu_dirty_rates())
                              if params.capabilities.get("dirty-limit") else None)
                closed = trigger.add(now, saver.page_bytes_sent, found * stats.page_size)
                metrics = policy_mod.Metrics(
                    iteration=iteration,
                    elapsed_s=now - started,
                    ram_bytes=machine.ram_bytes,
                    page_size=stats.page_size,
                    pending_bytes=pending,
                    bandwidth_bps=bandwidth.bytes_per_s,
                    resend_bytes=saver.resend_pending(),
                    stopped_bandwidth_bps=stopped_rate(
                        max(bandwidth.bytes_per_s * speedup.factor, source_rate.bytes_per_s),
                        bandwidth, params),
                    dirty_rate_bps=dirtied * stats.page_size / period,
                    bytes_sent_total=channel.bytes_sent,
                    bytes_sent_period=sent_period,
                    bytes_dirtied_period=round(dirtied * stats.page_size),
                    throttle_pct=throttle,
                    manual_switchover_requested=self._manual_switchover.is_set(),
                    switchover_s=switchover_s,
                    # With a return path the guest stops only once the destination has loaded
                    # everything sent (below): nothing is in flight inside the downtime then.
                    in_flight_bytes=in_flight_page_bytes() if ret is None else 0,
                    own_dirty_rate_bps=own_rate.update(dirtied * stats.page_size / period,
                                                       throttle, period),
                    vcpu_dirty_rates=vcpu_rates,
                    dirty_limited=dirty_limits is not None,
                    period_sent_bytes=closed[0] if closed else None,
                    period_dirtied_bytes=closed[1] if closed else 0,
                    hot_periods=hot_periods,
                )
                decision = self.decide(metrics, policy_params(params))
                hot_periods = decision.hot_periods
                record = stats.record_sync(
                    iteration=iteration, dirty_pages=found, remaining_bytes=pending,
                    bandwidth_bps=bandwidth.bytes_per_s,
                    stopped_bandwidth_bps=metrics.stopped_bandwidth_bps,
                    dirty_rate_pps=dirty_pps,
                    expected_downtime_s=decision.expected_downtime_s, throttle_pct=throttle,
                    vcpu_dirty_rates=vcpu_rates, vcpu_dirty_limits=decision.vcpu_dirty_limits,
                    action=decision.action.value, reason=decision.reason,
                    caught_up_wait_s=waited_s, backlog_bytes=backlog)
                waited_s = 0.0
                for callback in list(self._pass_listeners):
                    callback(record)
                if decision.throttle_pct != throttle:
                    throttle = decision.throttle_pct
                    guest.set_throttle(throttle)
                    stats.set_throttle(throttle)
                if decision.vcpu_dirty_limits != dirty_limits:
                    dirty_limits = apply_dirty_limits(guest, decision.vcpu_dirty_limits)
                    stats.set_vcpu_dirty_limits(dirty_limits)
                after_wait, expected_before_wait = expected_before_wait, math.inf
                held = None
                if decision.action == policy_mod.Action.SWITCHOVER:
                    held = switchover_held(
                        decision, expected_before_wait=after_wait,
                        passes_after_wait=passes_after_wait, swept=saver.swept,
                        backlog_bytes=backlog, bandwidth_bps=bandwidth.bytes_per_s,
                        caught_up=ret is None or ret.caught_up(writer.bytes_written))
                if held == Held.RESEND:
                    passes_after_wait += 1
                    # The source's rate so far counts the time it spent blocked behind the
                    # destination's backlog; this pass, caught up and all re-sends, is what the
                    # stop-and-copy will be like: measure the source's rate on it alone.
                    source_rate = Bandwidth()
                    source_rate.observe(sending_seconds(), saver.page_bytes_sent)
                elif held is None and decision.action == policy_mod.Action.SWITCHOVER:
                    if ret is not None and not ret.caught_up(writer.bytes_written):
                        # The guest stops only once the destination has loaded everything sent
                        # so far: a backlog left in the socket would be loaded inside the
                        # downtime.  The guest dirties pages meanwhile, so decide again then,
                        # on what is pending, with nothing sent in between.
                        wait_began = time.monotonic()
                        ret.wait_caught_up(writer.bytes_written, timeout=ACK_TIMEOUT_S,
                                           check=self._check)
                        waited_s = time.monotonic() - wait_began
                        # Everything sent is loaded now: a point the socket's queues cannot
                        # blur (a destination's receive queue, invisible from here, holds GBs
                        # of guest RAM when it is compressed).
                        bandwidth.observe(time.monotonic(), saver.page_bytes_sent)
                        redeciding = True
                        expected_before_wait = decision.expected_downtime_s
                        continue
                    stats.switchover(decision.reason, decision.expected_downtime_s)
                    break
                elif decision.action == policy_mod.Action.CANCEL:
                    raise Cancelled(f"migration cancelled: {decision.reason}")
                t0, b0 = time.monotonic(), saver.page_bytes_sent
                saver.slice_deadline = t0 + iteration_slice_s(params)
                for entry in machine.registry.live_entries():
                    entry.handlers.iterate(entry.opaque, SectionOut(writer, entry))
                sent_period = saver.page_bytes_sent - b0
                if ret is not None and backlog_page_bytes() > max(sent_period, 0) \
                        and time.monotonic() - t0 < BEHIND_PERIOD_S:
                    # The destination is further behind than this pass sent: syncing again
                    # at once finds little and takes CPU it needs.  Its next report, first.
                    ret.wait_for_report(BEHIND_PERIOD_S - (time.monotonic() - t0))
                bandwidth.observe(time.monotonic(), delivered_page_bytes())
                source_rate.observe(sending_seconds(), saver.page_bytes_sent)
                observe_cpu()

            if params.capabilities.get("pause-before-switchover"):
                while not self._continue_switchover.wait(0.05):
                    self._check(ret)
                    keep_alive.tick()  # the wait may be minutes; the destination's clock runs
            # (with a return path the loop ended caught up: the destination has built its
            # guest, READY came before any CAUGHT_UP, and loaded everything sent)
            if not self._transition(Status.ACTIVE, Status.DEVICE):
                raise Cancelled("migration cancelled")
            # Stop-and-copy: from here the guest is paused until the destination runs it, or
            # until it resumes here because something failed before the commit.
            phases = DowntimePhases(time.time_ns())
            # Only a guest that was running is started again, after a failure or a snapshot
            # (stop and cont are refused while a migration runs, so this is its state before).
            paused_by_us = guest.status == "running"
            guest.pause()
            if not self.params.snapshot().switchover_capped:
                # The cap protects the network from a guest that runs; this one is stopped,
                # and every ms now is downtime (QEMU lifts the cap here too).
                self._uncapped = True
                channel.set_max_bandwidth(0)
                saver.cap_packets(0)
            phases.mark("pause")
            writer.hold()  # what is left goes out in as few writes as it can (EOF sends it)
            for entry in machine.registry.live_entries():
                entry.handlers.complete(entry.opaque, SectionOut(writer, entry))
            phases.mark("last-ram")
            machine.save_device_state(writer)
            phases.mark("device-state")
            if ret is not None:
                writer.eof()
                phases.mark("send")
                ret.wait_for(stream.Loaded, timeout=ACK_TIMEOUT_S, check=self._check)
                self._check(ret)
                if peer_closed(channel):
                    # LOADED came with the connection's end right behind it (a destination
                    # that died as it said LOADED): a COMMIT now would reach no one, and the
                    # guest would stay paused here for want of an ACK
                    raise MigrationError("the destination closed the connection before the "
                                         "commit")
                self._commit()
                committed_ns = time.time_ns()
                stream.ReturnPathWriter(channel).commit()
                ack = ret.wait_for(stream.Ack, timeout=ACK_TIMEOUT_S, check=None)
                # The destination's word and clock: its vCPUs started after COMMIT left and
                # before their ACK was here, whatever it says (the downtime is reported).
                started_ns = min(max(ack.vcpu_start_ns, committed_ns), time.time_ns())
                phases.mark("destination", started_ns)
            else:
                # A one-way channel: the whole stream is the commit.  Cancels are refused
                # while its last record goes out; if that fails (or an exec: command exits
                # non-zero at the end), no destination has a whole stream, and the source
                # carries on.
                self._commit()
                try:
                    writer.eof()
                except BaseException:
                    with self._lock:
                        self._committed = False
                    raise
                phases.mark("send")
            stats.completed(phases.total_s, phases.seconds)
            if self.resume_source and paused_by_us:
                guest.resume()
            self._transition(Status.DEVICE, Status.COMPLETED)
        except BaseException as exc:  # noqa: BLE001 - every failure leaves the guest as it was
            if ret is not None and isinstance(exc, TransportError):
                # A destination that refuses the stream says why on the return path, then
                # closes; that reason matters more than the broken pipe it causes here.
                reason = ret.error_after_close(timeout=2.0)
                if reason is not None:
                    exc = MigrationError(f"destination failed: {reason}")
            elif not self._committed and (ret is None or ret.error is None):
                self._tell_destination(writer, ret, exc)
            # A destination that answered COMMIT with LOAD_ERROR never ran its guest (it says
            # so only before it runs, and discards it): the guest can only run here.
            committed = self._committed and not (ret is not None and ret.refused())
            self._fail(exc, resume=paused_by_us and not committed, committed=committed)
        finally:
            # Each step on its own: a guest closed under a running migration (its process
            # quitting) must not keep the others from releasing what they hold.
            for entry in machine.registry.live_entries():
                _quietly(f"cleaning up {entry.name}", entry.handlers.cleanup, entry.opaque)
            if throttle:
                _quietly("lifting the throttle", guest.set_throttle, 0)
                stats.set_throttle(0)
            if dirty_limits is not None:
                _quietly("lifting the dirty limits", apply_dirty_limits, guest, None)
                stats.set_vcpu_dirty_limits(None)
            if ret is not None:
                ret.stop()
            if self._channel is not None:
                # After a cancel or a failure, an exec: command killed or failed says so
                # here; the migration's status already tells, and the thread must not die.
                _quietly("closing the channel", self._channel.close,
                         level=logging.WARNING if self._status == Status.COMPLETED
                         else logging.DEBUG)
                self._channel = None
            if trace:
                trace.close()

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

    def _fail(self, exc: BaseException, *, resume: bool, committed: bool) -> None:
        guest = self.machine.guest
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
            for state in (Status.SETUP, Status.ACTIVE, Status.DEVICE):
                if self._transition(state, Status.CANCELLING):
                    break
            self._transition(Status.CANCELLING, Status.CANCELLED)
        else:
            self.stats.failed(text)
            for state in (Status.SETUP, Status.ACTIVE, Status.DEVICE, Status.CANCELLING):
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
#: How long a cancel waits for the migration thread to reach a record boundary (and send the
#: destination a CANCEL record) before it cuts the channel under a send that is stuck.
CANCEL_GRACE_S = 1.0
#: How long sending that CANCEL record may take.
CANCEL_SEND_TIMEOUT_S = 1.0
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
# While the destination is behind, iterations are at least this long (waiting for its reports)
BEHIND_PERIOD_S = 0.01
THROTTLE_SLICE_S = 0.1


def stopped_rate(rate: float, bandwidth: Bandwidth, params: MigrationParameters) -> float:
    """The rate the stop-and-copy is expected to send at: ``rate``, held to max-bandwidth
    only when the cap stays in force then (``x-switchover-capped``)."""
    return bandwidth.capped(rate) if params.switchover_capped else rate


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

#: A switchover decided right after a catch-up wait waits for one more pass instead when the
#: downtime it expects grew this many times over the one decided before the wait ...
RESEND_GROWTH = 2.0
#: ... at most this many times in a migration.
MAX_PASSES_AFTER_WAIT = 1


class Held(enum.Enum):
    """Why a switchover the estimate allowed waits for another pass (:func:`switchover_held`)."""

    RESEND = "what the guest dirtied during a long catch-up wait goes once more first"
    FIRST_PASS = "the first pass over RAM is not through"
    BEHIND = "the destination is further behind than it loads in the downtime expected"


def switchover_held(decision: policy_mod.Decision, *, expected_before_wait: float,
                    passes_after_wait: int, swept: bool, backlog_bytes: int,
                    bandwidth_bps: float, caught_up: bool) -> Held | None:
    """Why the switchover ``decision`` should wait for another pass with the guest running,
    or None to go ahead.  Only one the estimate allowed ("fits-limit") waits, never one a limit
    or the user forced.

    * RESEND (:func:`resend_first`): a catch-up wait made the expected downtime grow.
    * FIRST_PASS: pages never sent cost the destination a first touch of fresh memory, whose
      rate a VM host can change fourfold from one region to the next (memory it has taken
      back); until the first pass over RAM is through, the estimate is not trusted with them.
    * BEHIND (:func:`keep_sending`): waiting for the destination would take longer than the
      downtime expected, with the guest writing all along; the source goes on sending, paced
      by the destination's reports.
    """
    if decision.reason != "fits-limit":
        return None
    if resend_first(decision, expected_before_wait, passes_after_wait):
        return Held.RESEND
    if not swept:
        return Held.FIRST_PASS
    if not caught_up and keep_sending(decision, backlog_bytes, bandwidth_bps):
        return Held.BEHIND
    return None


def resend_first(decision: policy_mod.Decision, expected_before_wait: float,
                 passes_after_wait: int) -> bool:
    """Whether a switchover decided right after a catch-up wait (``expected_before_wait``: the
    downtime expected when the wait began; ``math.inf`` when there was no wait) should wait
    for one more pass.  Only one the estimate allowed, not one a limit or the user forced;
    only when the pages the guest dirtied during the wait made the expected downtime grow
    :data:`RESEND_GROWTH` times; at most :data:`MAX_PASSES_AFTER_WAIT` times."""
    return (decision.reason == "fits-limit" and passes_after_wait < MAX_PASSES_AFTER_WAIT
            and decision.expected_downtime_s > RESEND_GROWTH * expected_before_wait)


def keep_sending(decision: policy_mod.Decision, backlog_bytes: int,
                 bandwidth_bps: float) -> bool:
    """Whether a switchover the estimate allowed (not one a limit or the user forced) should
    wait while the source goes on sending: the destination has more to load than it loads in
    the downtime expected.  Not while it has loaded nothing yet (building its guest, say):
    how long that takes is anyone's guess, and the catch-up wait is there for it."""
    if decision.reason != "fits-limit" or backlog_bytes <= 0 or bandwidth_bps <= 0:
        return False
    return backlog_bytes / bandwidth_bps > decision.expected_downtime_s


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
    ended): ``pause`` (the vCPUs stopping), ``last-ram`` (the last sync and pages),
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


class ReturnPath:
    """Reads the destination's messages in a thread; an error fails the migration at once."""

    def __init__(self, channel, on_loaded: Callable[[int], None] | None = None):
        self.reader = stream.ReturnPathReader(channel)
        # on_loaded(offset), in this object's thread: the destination loaded the stream up to
        # offset (a PROGRESS or CAUGHT_UP report)
        self._on_loaded = on_loaded
        self._reports = 0  # PROGRESS and CAUGHT_UP messages so far
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
                            and stream.Ack not in self._messages:
                        self.error = f"return path lost: {exc}"
                    self._stopped = True
                    self._cond.notify_all()
                return
            report = isinstance(message, (stream.Progress, stream.CaughtUp))
            if report and self._on_loaded is not None:
                self._on_loaded(message.offset)
            with self._cond:
                self._reports += report
                if isinstance(message, stream.LoadError):
                    self.error = message.text
                self._messages[type(message)] = message
                self._cond.notify_all()

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
