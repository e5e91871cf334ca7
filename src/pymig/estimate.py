"""What the migration thread estimates: how fast the channel carries data, and what a
switchover will cost.

The policy's expected downtime (:attr:`pymig.policy.Metrics.expected_downtime_s`) is::

    fixed switchover cost + (pages never sent + bytes still in flight) / bandwidth
                          + pages sent before (re-sends) / stop-and-copy bandwidth

    stop-and-copy bandwidth = max(bandwidth * StopSpeedup factor, source rate)

All of it counts page bytes (pages x page size), as the pending bytes do, whatever the pages
take on the wire.

* :class:`Bandwidth` is the rate the destination takes data in: delivered bytes (sent, less
  what is still in flight), the lower of the last iteration's rate and the last half second's.
  The same class, fed with the source's own sending time instead of the clock, gives the
  source rate: how fast the source encodes and sends pages.  Re-sent pages cost the
  destination no first touch of fresh memory, so where the live phase waited on that (a
  destination on a VM host faulting in 100 MB at 0.5 GB/s), the stop-and-copy of re-sends
  still goes as fast as the source can send them.
* :class:`SwitchoverCost` is what a switchover costs with nothing left to send: stopping the
  vCPUs, the last dirty-log sync, saving, sending, decoding and loading the vCPU and device
  state, and the LOADED / COMMIT / ACK exchange before the destination's vCPUs run.
* :func:`in_flight_bytes` is what the source has sent that the destination has not taken in
  yet: when the destination is the slower side, several MB wait in the socket buffers when
  the guest stops, and the destination works through them inside the downtime.
* :class:`DestinationProgress` is what the destination has loaded, from its reports on the
  return path: with one, the bandwidth counts what the destination took in, not what left.
* :class:`StopSpeedup` is how much faster than that the stop-and-copy goes, once the guest
  no longer competes with the migration for CPU.
* :class:`LoggedRate` is the rate the dirty log shows, over a window of syncs.
* :class:`DirtyRate` is the guest's own dirty rate for a throttle to aim at.
* :class:`TriggerPeriod` is what the step throttle weighs: bytes sent and dirtied over periods
  of at least a second, as QEMU's auto-converge does.
"""

from __future__ import annotations

import bisect
import os
import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class Bandwidth:
    """Bytes/s the channel carries to the destination, the figure the policy divides by.

    :meth:`observe` takes what has been *delivered* so far (sent, less what is still in
    flight) after each iteration, and the estimate is the lower of two rates: over the last
    iteration, and over the last ``window_s`` seconds.  Sent bytes alone overstate it: over a
    100 ms slice, megabytes can sit in socket buffers, and a destination busy faulting in fresh
    memory takes them in at its own pace; a switchover decided on the faster figure overruns
    the downtime limit.  The lower figure errs on the side of a longer expected downtime.
    Intervals that delivered less than ``min_sample_bytes`` do not count (unless there is
    nothing else yet); a cap bounds the estimate.
    """

    bytes_per_s: float = 0.0
    min_sample_bytes: int = 4 << 20
    window_s: float = 0.5

    def __post_init__(self) -> None:
        self._points: list[tuple[float, int]] = []  # (time, delivered bytes), oldest first
        self._cap = 0

    def cap(self, bytes_per_s: int) -> None:
        """A bandwidth cap bounds the estimate (and is the estimate before any sample); 0
        lifts it."""
        self._cap = bytes_per_s
        if bytes_per_s and (self.bytes_per_s == 0 or self.bytes_per_s > bytes_per_s):
            self.bytes_per_s = float(bytes_per_s)

    def observe(self, now: float, delivered_bytes: int) -> None:
        """Everything delivered by ``now`` (monotonic seconds); call once per iteration."""
        points = self._points
        if points and delivered_bytes < points[-1][1]:
            delivered_bytes = points[-1][1]  # in-flight figures are estimates: never go back
        points.append((now, delivered_bytes))
        while len(points) > 2 and points[1][0] <= now - self.window_s:
            points.pop(0)  # keep one point at or before the window's start
        if len(points) < 2:
            return
        (t0, b0), (t1, b1), (t2, b2) = points[0], points[-2], points[-1]
        rates = [(b2 - b1) / (t2 - t1)] if b2 - b1 >= self.min_sample_bytes and t2 > t1 else []
        if b2 - b0 >= self.min_sample_bytes and t2 > t0:
            rates.append((b2 - b0) / (t2 - t0))
        if rates:
            self._set(min(rates))
        elif self.bytes_per_s == 0 and b2 > b1 and t2 > t1:
            self._set((b2 - b1) / (t2 - t1))  # better than nothing

    def capped(self, rate: float) -> float:
        """``rate`` held to the cap, if there is one."""
        return min(rate, self._cap) if self._cap else rate

    def _set(self, rate: float) -> None:
        self.bytes_per_s = self.capped(rate)


@dataclass
class LoggedRate:
    """Pages/s the dirty log showed over the last ``window_s`` seconds of syncs (at least the
    last sync's period).

    A sync shows only pages clean since they were last re-armed; syncs a millisecond apart,
    while the guest rewrites pages still dirty in the log, show none, and a rate taken from
    one such period alone says the guest stopped writing (the policy then expected a 3 ms
    switchover of a guest writing 100k pages/s).  Over the window those periods weigh by
    their length.
    """

    window_s: float = 0.2

    def __post_init__(self) -> None:
        self._periods: list[tuple[float, float, int]] = []  # (end, seconds, pages), oldest first

    def add(self, now: float, period_s: float, pages: int) -> float:
        """One sync's count over its period; returns the rate over the window."""
        periods = self._periods
        periods.append((now, max(period_s, 0.0), max(pages, 0)))
        while len(periods) > 1 and periods[0][0] <= now - self.window_s:
            periods.pop(0)
        seconds = sum(p[1] for p in periods)
        return sum(p[2] for p in periods) / seconds if seconds > 0 else 0.0


@dataclass
class DirtyRate:
    """The guest's own dirty rate, as if unthrottled (bytes/s), held at its recent peak.

    Each period gives ``measured / (1 - throttle)``: dirtying scales with the run time the
    throttle leaves the vCPUs.  What a period measures is a lower bound (the dirty log shows
    only pages that were clean, so a guest rewriting pages not yet sent shows less than it
    does), and it is noisy over the 100 ms periods a throttling policy runs on; a throttle
    aimed at it would relax, let the guest run, and tighten again.  So the estimate keeps the
    highest recent value, decaying by half every ``half_life_s`` so that a guest that really
    calms down is let go within seconds.
    """

    half_life_s: float = 1.0
    peak_bps: float = 0.0

    def update(self, measured_bps: float, throttle_pct: int, period_s: float) -> float:
        running = 1 - min(max(throttle_pct, 0), 99) / 100
        own = max(measured_bps, 0.0) / running
        self.peak_bps = max(own, self.peak_bps * 0.5 ** (max(period_s, 0.0) / self.half_life_s))
        return self.peak_bps


@dataclass
class TriggerPeriod:
    """Auto-converge's trigger period (QEMU's ``migration_trigger_throttle``, run from
    ``migration_bitmap_sync``): the page bytes sent and the bytes the guest dirtied between
    two checks at least ``period_s`` apart.  Syncs come every 100 ms while auto-converge is
    on; a step throttle judged on each would climb from nothing to its maximum within a
    second, before a step could show what it does.

    :meth:`begin` at the start; :meth:`add` at each sync returns ``(sent, dirtied)`` when the
    sync closes a period (and starts the next), None otherwise.
    """

    period_s: float = 1.0

    def __post_init__(self) -> None:
        self._start: float | None = None
        self._sent_at_start = 0
        self._dirtied = 0

    def begin(self, now: float, sent_bytes: int) -> None:
        """A period starts at ``now`` (monotonic s), with ``sent_bytes`` sent so far."""
        self._start, self._sent_at_start, self._dirtied = now, sent_bytes, 0

    def add(self, now: float, sent_bytes: int, dirtied_bytes: int) -> tuple[int, int] | None:
        """A sync at ``now``: ``sent_bytes`` sent so far, ``dirtied_bytes`` found dirtied since
        the previous sync."""
        if self._start is None:
            self.begin(now, sent_bytes)
        self._dirtied += max(dirtied_bytes, 0)
        if now - self._start < self.period_s:
            return None
        closed = (max(sent_bytes - self._sent_at_start, 0), self._dirtied)
        self.begin(now, sent_bytes)
        return closed


@dataclass(frozen=True)
class SwitchoverCost:
    """The fixed part of a switchover's downtime, in seconds:
    ``base_s + per_vcpu_s * vCPUs + per_gib_s * GiB of RAM``.

    Measured on the development host (2 vCPUs, kvm_pvm; source and destination processes on
    loopback, idle 1 GiB guests, nothing left to send): 3-5 ms with one vCPU (medians of ten
    runs 3.5-4 ms; to 0.01 ms since the downtime-breakdown, single runs 2-5 ms, medians of
    five 2.2-3.4 ms from set to set), about 1 ms of it per vCPU (saving its state 0.3-0.5 ms, encoding it
    0.2-0.8 ms, decoding it 0.3-1.1 ms, restoring it 0.1-0.4 ms; the slow end is the first
    time in a process, which both sides rehearse ahead of the switchover).  The rest is the
    pause (0.1-0.5 ms), the last sync (0.5 ms), the devices, and the LOADED / COMMIT / ACK
    exchange between two processes that must each wake up.  A 16 GiB guest adds 1-1.5 ms
    (the last sync and its bitmaps on the source, about as much on the destination).
    """

    base_s: float = 0.002
    per_vcpu_s: float = 0.001
    per_gib_s: float = 0.0001

    def seconds(self, vcpus: int, ram_bytes: int = 0) -> float:
        return (self.base_s + self.per_vcpu_s * max(vcpus, 0)
                + self.per_gib_s * max(ram_bytes, 0) / (1 << 30))


def in_flight_bytes(channel) -> int:
    """Bytes sent on ``channel`` that the destination has not read yet, as far as this side
    can tell: the socket's send queue (``SIOCOUTQ``), and when that queue is backed up, the
    destination's receive queue too, which is then full (the kernel stops sending when it is):
    its size is the receive buffer the kernel gave it, not visible from here, so it counts as
    much as the send queue holds (the two grow together under Linux's buffer auto-tuning).
    0 for channels that are not sockets or cannot say."""
    queued = channel.unsent_bytes()
    if queued <= 0:
        return 0
    sock = getattr(channel, "sock", None)
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        return 2 * queued
    return queued


class DestinationProgress:
    """Page bytes the destination has loaded, as it reports them.

    The destination says which stream offset it has loaded up to (PROGRESS as it loads, at
    most every few milliseconds; CAUGHT_UP when nothing more waits); the source notes, for each
    RAM packet, the stream offset the packet ends at and the page bytes sent up to it, which
    turns an offset into page bytes.  What the socket no longer holds is no measure: a
    destination slower than its source holds megabytes in its receive queue and its decoder's
    buffers, out of the source's sight.  A report is a lower bound, a few milliseconds old.

    :meth:`packet_sent` is called from the sending thread, :meth:`reported` from the
    return-path thread, :meth:`delivered` from the migration thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (stream offset after a RAM packet, page bytes sent up to it), offsets increasing
        self._points: list[tuple[int, int]] = [(0, 0)]
        self._loaded: int | None = None  # page bytes the destination said it holds

    def packet_sent(self, stream_offset: int, page_bytes_sent: int) -> None:
        with self._lock:
            self._points.append((stream_offset, page_bytes_sent))

    def reported(self, loaded_offset: int) -> None:
        """The destination loaded the stream up to ``loaded_offset``."""
        with self._lock:
            i = bisect.bisect_right(self._points, (loaded_offset, 1 << 63))
            loaded = self._points[i - 1][1] if i else 0
            self._loaded = max(self._loaded or 0, loaded)
            if i > 1024:  # the points before the one found are never asked for again
                del self._points[:i - 1]

    def delivered(self, page_bytes_sent: int) -> int | None:
        """Page bytes the destination holds of the ``page_bytes_sent`` sent so far; None
        before its first report."""
        with self._lock:
            return None if self._loaded is None else min(self._loaded, page_bytes_sent)


try:
    _CLOCK_TICKS = float(os.sysconf("SC_CLK_TCK"))  # /proc/stat's unit
except (ValueError, OSError, AttributeError):  # pragma: no cover - every Linux has it
    _CLOCK_TICKS = 100.0


def host_cpu_seconds(path: str = "/proc/stat") -> tuple[float, float]:
    """(busy, idle) CPU-seconds of the whole host since boot, from the first line of
    ``path``; iowait counts as idle, steal (time the hypervisor gave to someone else) as
    neither.  (0, 0) where the file cannot be read."""
    try:
        with open(path, "rb") as handle:
            fields = handle.readline().split()
    except OSError:
        return 0.0, 0.0
    ticks = [int(v) for v in fields[1:9]] + [0] * 8
    user, nice, system, idle, iowait, irq, softirq, _steal = ticks[:8]
    hz = _CLOCK_TICKS
    return (user + nice + system + irq + softirq) / hz, (idle + iowait) / hz


@dataclass
class StopSpeedup:
    """How much faster the stop-and-copy moves data than the live phase did, as a factor of
    :class:`Bandwidth`'s estimate.

    The live phase shares the CPUs with the running guest; once the guest stops, its share
    goes to the migration.  That helps only when the migration was short of CPU: on a host
    whose CPUs were all busy, the source's and destination's threads together got ``busy -
    guest`` CPU-seconds and will get ``busy``, so they move ``busy / (busy - guest)`` times as
    much.  On a host with idle CPU the migration was held back by something else (the wire, a
    bandwidth cap, the destination's faults), and stopping the guest changes nothing: the
    factor fades from the full figure at ``full_at`` busy to 1 at ``none_at`` busy and below.

    How well that held on one host: docs/performance.md, "Figures behind the code".  Over a
    window of ``window_s`` seconds, because /proc/stat counts in 10 ms ticks.
    """

    window_s: float = 0.5
    full_at: float = 0.95
    none_at: float = 0.75
    max_factor: float = 3.0
    factor: float = 1.0

    def __post_init__(self) -> None:
        # (time, host busy s, host idle s, guest CPU s), oldest first
        self._points: list[tuple[float, float, float, float]] = []

    def observe(self, now: float, host_busy_s: float, host_idle_s: float,
                guest_cpu_s: float) -> None:
        """Counters at ``now`` (monotonic s); call with each :meth:`Bandwidth.observe`."""
        points = self._points
        points.append((now, host_busy_s, host_idle_s, guest_cpu_s))
        while len(points) > 2 and points[1][0] <= now - self.window_s:
            points.pop(0)
        if len(points) < 2:
            return
        (_, b0, i0, g0), (_, b1, i1, g1) = points[0], points[-1]
        busy, idle, guest = b1 - b0, i1 - i0, max(g1 - g0, 0.0)
        if busy <= 0 or busy + idle <= 0:
            return
        share = busy / (busy + idle)
        weight = min(max((share - self.none_at) / (self.full_at - self.none_at), 0.0), 1.0)
        others = max(busy - guest, busy / self.max_factor)
        self.factor = min(1.0 + weight * (busy / others - 1.0), self.max_factor)


def thread_cpu_seconds(thread) -> float:
    """CPU-seconds a running :class:`threading.Thread` of this process has used (0 for one
    not started or gone)."""
    ident = getattr(thread, "ident", None)
    if ident is None or not thread.is_alive():
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (OSError, ValueError, ProcessLookupError):  # it ended in between
        return 0.0
