"""What the source measures while a migration converges, and the policy's input made of it.

:class:`Estimators` holds every estimator of one outgoing migration (``pymig.estimate``: the
bandwidth the destination takes in, the source's own rate, the stop-and-copy's speedup, the
dirty rates, the step throttle's trigger periods, the switchover's fixed cost), feeds them from
the channel, the RAM saver, the destination's reports and the host's CPU counters, and at each
sync turns them into the :class:`pymig.policy.Metrics` the policy decides on
(:meth:`Estimators.metrics`).  The migration thread measures through it and acts on the
answer; the rule itself is in ``pymig.policy``.

The policy weighs what is pending against the bandwidth, so both count page bytes (pages x
page size): what moves them is the pipeline, whatever their wire size (a zero page is a few
bytes there, a compressed one a few dozen).  What is in flight is known in wire bytes; it
stands for page bytes at the ratio so far.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from pymig.block import BLOCK_IDSTR
from pymig.estimate import (Bandwidth, DirtyRate, LoggedRate, StopSpeedup, SwitchoverCost,
                            TriggerPeriod, host_cpu_seconds, in_flight_bytes,
                            thread_cpu_seconds)
from pymig.parameters import MigrationParameters
from pymig.policy import Metrics


@dataclass
class Course:
    """What the converge phase carries from one sync to the next, besides the estimators."""

    iteration: int = 0  # syncs so far
    throttle_pct: int = 0  # in force
    dirty_limits: tuple[int, ...] | None = None  # per-vCPU caps in force
    hot_periods: int = 0  # the step throttle's count, from the last decision
    expected_before_wait_s: float = math.inf  # set by a catch-up wait, for the next sync
    passes_after_wait: int = 0
    waited_s: float = 0.0  # the catch-up wait before the next sync (for the trace)


class Estimators:
    """The estimators of one outgoing migration over ``channel``, fed from ``saver`` (the RAM
    saver) and, with a return path, from ``ret`` and ``progress`` (what the destination reports
    having loaded); ``registry`` gives the live entries whose pending bytes are summed.

    Built once the setup is done: the source's rate and the bandwidth start from there."""

    def __init__(self, *, channel, saver, registry, guest, writer, ret, progress,
                 ram_bytes: int, page_size: int, started: float):
        self._channel, self._saver, self._registry = channel, saver, registry
        self._guest, self._writer, self._ret, self._progress = guest, writer, ret, progress
        self.ram_bytes, self.page_size, self.started = ram_bytes, page_size, started
        self.bandwidth = Bandwidth()
        self.bandwidth.observe(time.monotonic(), self.delivered_page_bytes())
        self.source_rate = Bandwidth()
        self.restart_source_rate()
        self.speedup = StopSpeedup()
        self._observe_cpu()
        self.switchover_s = SwitchoverCost().seconds(guest.vcpu_count, ram_bytes)
        self.own_rate = DirtyRate()
        self.logged_rate = LoggedRate()
        self.trigger = TriggerPeriod()
        self.trigger.begin(time.monotonic(), saver.page_bytes_sent)
        self._last_sync = time.monotonic()
        self.sent_period = 0  # page bytes the last pass sent
        self.dirty_pps = 0.0  # the dirty rate the last sync found
        self._rate_held = False  # the next sync follows a catch-up wait

    # -- what was sent, and where it is --------------------------------------------------------
    def page_bytes_per_wire_byte(self) -> float:
        wire, pages = self._channel.bytes_sent, self._saver.page_bytes_sent
        return pages / wire if wire and pages else 1.0

    def in_flight_page_bytes(self) -> int:
        return round(in_flight_bytes(self._channel) * self.page_bytes_per_wire_byte())

    def delivered_page_bytes(self) -> int:
        """With a return path, what the destination reported loading (nothing before its
        first report); without one, what the socket no longer holds."""
        sent = self._saver.page_bytes_sent
        if self._ret is not None:
            return self._progress.delivered(sent) or 0
        return max(sent - self.in_flight_page_bytes(), 0)

    def backlog_page_bytes(self) -> int:
        return self._saver.page_bytes_sent - self.delivered_page_bytes()

    def caught_up(self) -> bool:
        """Whether the destination has loaded everything sent (always, one way)."""
        return self._ret is None or self._ret.caught_up(self._writer.bytes_written)

    # -- feeding the estimators ----------------------------------------------------------------
    def cap(self, max_bandwidth: int) -> None:
        """max-bandwidth (wire bytes/s) bounds the bandwidth, as page bytes."""
        self.bandwidth.cap(round(max_bandwidth * self.page_bytes_per_wire_byte()))

    def _sending_seconds(self) -> float:
        # Time spent waiting on max-bandwidth's token bucket is not sending: the stop-and-copy
        # goes uncapped (unless x-switchover-capped), so its rate is the one without it.
        return self._saver.busy_seconds - self._channel.rate_limiter.slept_s

    def restart_source_rate(self) -> None:
        """Measure the source's rate from here on (how fast this side moves pages over the
        time it spends sending: re-sends cost the destination no first touch, so the
        stop-and-copy can go at this rate even where the live phase waited on the
        destination; see pymig.estimate)."""
        self.source_rate = Bandwidth()
        self.source_rate.observe(self._sending_seconds(), self._saver.page_bytes_sent)

    def _observe_cpu(self) -> None:
        # the guest's CPU: everything this process ran but the migration's threads
        ret = self._ret
        own = time.thread_time() + thread_cpu_seconds(self._saver.sender.thread) + (
            thread_cpu_seconds(ret.thread) if ret is not None else 0.0)
        self.speedup.observe(time.monotonic(), *host_cpu_seconds(), time.process_time() - own)

    def passed(self, sent_bytes: int) -> None:
        """A pass sent ``sent_bytes`` page bytes (and any wait behind it is over)."""
        self.sent_period = sent_bytes
        self.bandwidth.observe(time.monotonic(), self.delivered_page_bytes())
        self.source_rate.observe(self._sending_seconds(), self._saver.page_bytes_sent)
        self._observe_cpu()

    def all_loaded(self) -> None:
        """A catch-up wait is over: everything sent is loaded, a point the socket's queues
        cannot blur (a destination's receive queue, invisible from here, holds GBs of guest
        RAM when it is compressed).  Nothing is re-armed until the next sync, so its log
        cannot show pages written again: the rate then is at least the one last measured."""
        self.bandwidth.observe(time.monotonic(), self._saver.page_bytes_sent)
        self._rate_held = True

    def disks_swept(self) -> bool:
        """Every disk that travels has been through its bulk phase (QEMU's block migration
        holds the switchover as long as one has not: what its bulk phase has yet to send is
        a first write at the destination, not a re-send)."""
        return all(e.opaque.swept for e in self._registry.live_entries()
                   if e.idstr == BLOCK_IDSTR)

    # -- the policy's input --------------------------------------------------------------------
    def metrics(self, found_pages: int, params: MigrationParameters, course: Course, *,
                manual_switchover: bool) -> Metrics:
        """The policy's input for the sync that just found ``found_pages`` dirty pages."""
        saver, page = self._saver, self.page_size
        now = time.monotonic()
        period = max(now - self._last_sync, 1e-6)
        self._last_sync = now
        measured = self.logged_rate.add(now, period, found_pages)
        self.dirty_pps = max(measured, self.dirty_pps) if self._rate_held else measured
        self._rate_held = False
        dirtied = self.dirty_pps * period
        vcpu_rates = (tuple(self._guest.vcpu_dirty_rates())
                      if params.capabilities.get("dirty-limit") else None)
        closed = self.trigger.add(now, saver.page_bytes_sent, found_pages * page)
        bandwidth = self.bandwidth.bytes_per_s
        return Metrics(
            iteration=course.iteration, elapsed_s=now - self.started,
            ram_bytes=self.ram_bytes, page_size=page,
            pending_bytes=sum(e.handlers.pending(e.opaque)
                              for e in self._registry.live_entries()),
            bandwidth_bps=bandwidth, resend_bytes=saver.resend_pending(),
            stopped_bandwidth_bps=stopped_rate(
                max(bandwidth * self.speedup.factor, self.source_rate.bytes_per_s),
                self.bandwidth, params),
            dirty_rate_bps=dirtied * page / period,
            bytes_sent_total=self._channel.bytes_sent, bytes_sent_period=self.sent_period,
            bytes_dirtied_period=round(dirtied * page), throttle_pct=course.throttle_pct,
            manual_switchover_requested=manual_switchover, switchover_s=self.switchover_s,
            # With a return path the guest stops only once the destination has loaded
            # everything sent: nothing is in flight inside the downtime then.
            in_flight_bytes=self.in_flight_page_bytes() if self._ret is None else 0,
            own_dirty_rate_bps=self.own_rate.update(dirtied * page / period,
                                                    course.throttle_pct, period),
            vcpu_dirty_rates=vcpu_rates, dirty_limited=course.dirty_limits is not None,
            period_sent_bytes=closed[0] if closed else None,
            period_dirtied_bytes=closed[1] if closed else 0, hot_periods=course.hot_periods,
            backlog_bytes=self.backlog_page_bytes(), swept=saver.swept and self.disks_swept(),
            caught_up=self.caught_up(), expected_before_wait_s=course.expected_before_wait_s,
            passes_after_wait=course.passes_after_wait)


def stopped_rate(rate: float, bandwidth: Bandwidth, params: MigrationParameters) -> float:
    """The rate the stop-and-copy is expected to send at: ``rate``, held to max-bandwidth
    only when the cap stays in force then (``x-switchover-capped``)."""
    return bandwidth.capped(rate) if params.switchover_capped else rate
