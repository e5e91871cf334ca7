"""What users measure: ``query-migrate`` counters and a per-iteration trace.

:class:`MigrationStats` is updated by the migration thread and read by anyone (the control
socket, the CLI's progress line, tests) at any moment: every method takes one lock, and
:meth:`~MigrationStats.query` returns a fresh dict, never a live view.

``query()`` fields (QEMU's ``query-migrate`` names, then pymig's own):

    =================================  =========================================================
    status                             none | setup | active | device | completed | failed |
                                       cancelling | cancelled
    total-time                         ms since the migration began (frozen when it ends)
    setup-time                         ms the setup phase took (once it is over)
    downtime                           ms the guest was stopped, measured (once completed)
    expected-downtime                  ms the guest would stay stopped if it stopped now, as
                                       last estimated: the switchover's fixed cost, then what
                                       is pending and still in flight at the bandwidth (while
                                       in progress, when the bandwidth is known)
    ram.transferred                    bytes of RAM data put on the wire (headers included)
    ram.remaining                      bytes still dirty at the last sync
    ram.total                          bytes of guest RAM
    ram.duplicate                      zero pages sent (as a marker, not as data)
    ram.normal                         pages sent with their data
    ram.normal-bytes                   bytes of those pages (normal * page-size)
    ram.compressed                     of ``normal``, pages sent as LZ4 blocks (the
                                       ``compression`` parameter)
    ram.dirty-pages-rate               pages/s the guest dirtied, at the last sync
    ram.dirty-sync-count               dirty-log syncs so far
    ram.mbps                           megabits/s (10^6 bit/s) sent over the last sync period;
                                       over the whole migration once it has ended
    ram.pages-per-second               pages/s sent, over the same span as mbps
    ram.page-size                      bytes
    cpu-throttle-percentage            vCPU throttle in force, percent (0 once the migration
                                       ended: the throttle is lifted then)
    cpu-throttle-peak                  the highest vCPU throttle applied during this migration,
                                       percent (pymig's own; with auto-converge)
    vcpu-dirty-limit                   pages/s cap per vCPU in force (dirty-limit capability,
                                       once the policy turned the caps on)
    vcpu-dirty-rates                   pages/s each vCPU dirtied, at the last sync (dirty-limit
                                       capability; measured from the dirty ring)
    tls                                with tls-creds: ``version`` and ``cipher`` agreed, and
                                       ``handshake-time``, ms (fractional) the TLS handshake
                                       and the destination's verdict took, within setup-time
    error-desc                         why it failed (only when status is failed)
    switchover-reason                  the policy's reason to stop the guest (once it did)
    iterations                         the migration's iteration count at the last sync
    downtime-expected-at-switchover    ms the policy expected when it switched over (once it
                                       did and the estimate was known), to 0.01 ms, like
                                       the downtime-breakdown: at 3-5 ms, whole ms would
                                       blur the comparison by a third
    downtime-breakdown                 where the downtime went, ms per phase in order: pause,
                                       last-ram, device-state, send, destination (loading
                                       there until its vCPUs ran; with a return path only);
                                       they add up to ``downtime`` (once completed)
    =================================  =========================================================

:class:`TraceWriter` writes one JSON line per dirty-log sync (keys: :class:`TraceRecord`'s
fields), flushed per line so a trace of a migration that is still running, or that crashed,
can be read with :func:`read_trace` and plotted with :func:`pymig.plot.plot_trace`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

STATUSES = ("none", "setup", "active", "pre-switchover", "device", "completed", "failed",
            "cancelling", "cancelled", "postcopy-active", "postcopy-paused", "postcopy-recover")
IN_PROGRESS = ("setup", "active", "pre-switchover", "device", "cancelling",
               "postcopy-active", "postcopy-recover")
ENDED = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class TraceRecord:
    """One dirty-log sync, as one trace line."""

    time: float  # s since the migration began
    iteration: int
    dirty_pages: int  # pages found dirty by this sync
    pages_sent: int  # pages (normal + zero) sent since the previous sync
    bytes: int  # bytes put on the wire since the previous sync
    # the policy's figures count page bytes (pages x page size), like pending_bytes: with zero
    # pages and compression they run far above the wire's bytes/s
    bandwidth: float  # page bytes/s, the live phase's estimate
    stopped_bandwidth: float  # page bytes/s the policy expects of the stop-and-copy
    expected_downtime: float | None  # ms; None when unknown
    pending_bytes: int
    throttle_pct: int
    dirty_rate: float  # pages/s
    page_size: int
    vcpu_dirty_rates: list[float] | None = None  # pages/s per vCPU (dirty-limit capability)
    vcpu_dirty_limits: list[int] | None = None  # pages/s caps in force after this sync
    # what the policy made of this sync, and how long the source waited, guest running, for
    # the destination to load its backlog before it (a switchover decided earlier)
    action: str = ""  # "continue", "switchover" or "cancel"
    reason: str = ""  # the policy's reason, e.g. "fits-limit", "converging", "throttling: ..."
    caught_up_wait_s: float = 0.0
    # page bytes sent that the destination had not loaded yet, as its reports on the return
    # path say (without a return path: what the socket's queues hold)
    backlog_bytes: int = 0
    # after a switch to post-copy (action "postcopy"): requests served, pages sent because
    # asked for and pages pushed so far (a record every POSTCOPY_TRACE_S and one at the end)
    postcopy: dict | None = None
    # during a background snapshot's pass (action "background-snapshot"): its write faults,
    # the pages copied aside before the pass reached them, and the pages saved so far
    background_snapshot: dict | None = None

    def to_json(self) -> str:
        line = dataclasses.asdict(self)
        for key in OPTIONAL_TRACE_KEYS:  # only where the dirty-limit capability measures them
            if line[key] is None:
                del line[key]
        return json.dumps(line, separators=(",", ":"))


OPTIONAL_TRACE_KEYS = ("vcpu_dirty_rates", "vcpu_dirty_limits", "postcopy",
                       "background_snapshot")


class TraceWriter:
    """Appends :class:`TraceRecord` lines to ``path`` (created or truncated), one flush each."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def write(self, record: TraceRecord) -> None:
        with self._lock:
            self._file.write(record.to_json() + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_trace(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a trace file, as dicts.

    A last line without its newline is a record being written (or a writer that died): it is
    skipped if it does not parse.  Any other bad line is a ValueError naming its number.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{os.fspath(path)}: not a trace (not UTF-8 text at byte "
                         f"{exc.start})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: unfinished
                break
            raise ValueError(f"{path}:{number}: not a trace record: {exc}") from None
    return records


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


class MigrationStats:
    """The counters of one migration (thread-safe).  ``clock`` returns seconds (monotonic)."""

    def __init__(self, *, page_size: int = 4096, ram_total_bytes: int = 0,
                 trace: TraceWriter | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 disk: Callable[[], dict | None] | None = None):
        self._lock = threading.Lock()
        # the disks that travel with the guest (block migration): query-migrate's "disk"
        self._disk = disk
        self._clock = clock
        self._trace = trace
        self.page_size = page_size
        self._status = "none"
        self._ram_total = ram_total_bytes
        self._start = self._setup_end = self._end = None
        self._stopped_at: float | None = None
        self._downtime_s: float | None = None
        self._downtime_phases: dict[str, float] | None = None
        self._expected_downtime_s = math.inf
        self._transferred = self._normal = self._duplicate = self._compressed = 0
        self._remaining = 0
        self._dirty_pages_rate = 0.0
        self._syncs = 0
        self._iterations = 0
        self._throttle = 0
        self._throttle_peak = 0
        self._vcpu_dirty_rates: list[float] | None = None
        self._vcpu_dirty_limits: list[int] | None = None
        self._mbps = 0.0
        self._pages_per_second = 0.0
        self._last_sync_time: float | None = None
        self._last_sync_bytes = 0
        self._last_sync_pages = 0
        self._error: str | None = None
        self._switchover_reason: str | None = None
        self._expected_at_switchover: float | None = None
        self._tls: dict[str, Any] | None = None
        self._postcopy: Callable[[], dict] | None = None
        self._background_snapshot: Callable[[], dict] | None = None

    # --- the migration thread's side --------------------------------------------------------

    def begin(self, ram_total_bytes: int | None = None) -> None:
        """The migration starts (status ``setup``)."""
        with self._lock:
            now = self._clock()
            self._start = self._last_sync_time = now
            if ram_total_bytes is not None:
                self._ram_total = ram_total_bytes
            self._status = "setup"

    def setup_done(self) -> None:
        """Setup is over, iterations begin (status ``active``)."""
        with self._lock:
            self._setup_end = self._clock()
            self._status = "active"

    def set_status(self, status: str) -> None:
        """Any other status change (e.g. ``cancelling``)."""
        if status not in STATUSES:
            raise ValueError(f"unknown migration status {status!r}; one of {STATUSES}")
        with self._lock:
            self._status = status

    def add_sent(self, *, nbytes: int, normal_pages: int = 0, zero_pages: int = 0,
                 compressed_pages: int = 0) -> None:
        """RAM data went out: ``nbytes`` on the wire, carrying those pages (``compressed_pages``
        of the normal ones as LZ4 blocks)."""
        with self._lock:
            self._transferred += nbytes
            self._normal += normal_pages
            self._duplicate += zero_pages
            self._compressed += compressed_pages

    def set_tls(self, version: str, cipher: str, handshake_s: float) -> None:
        """The stream goes over TLS: what was agreed, and how long setting it up took."""
        with self._lock:
            self._tls = {"version": version, "cipher": cipher,
                         "handshake-time": round(handshake_s * 1000, 2)}

    def set_throttle(self, percent: int) -> None:
        with self._lock:
            self._throttle = percent
            self._throttle_peak = max(self._throttle_peak, percent)

    def set_vcpu_dirty_limits(self, limits) -> None:
        """The per-vCPU dirty caps now in force (None: none)."""
        with self._lock:
            self._vcpu_dirty_limits = _list_or_none(limits, int)

    def record_sync(self, *, iteration: int, dirty_pages: int, remaining_bytes: int,
                    bandwidth_bps: float, dirty_rate_pps: float, expected_downtime_s: float,
                    throttle_pct: int, stopped_bandwidth_bps: float = 0.0,
                    vcpu_dirty_rates=None, vcpu_dirty_limits=None, action: str = "",
                    reason: str = "", caught_up_wait_s: float = 0.0,
                    backlog_bytes: int = 0) -> TraceRecord:
        """A dirty-log sync happened: update the rates and write a trace line (if tracing)."""
        with self._lock:
            now, period, sent_bytes, sent_pages = self._close_period()
            self._syncs += 1
            self._iterations = iteration
            self._remaining = remaining_bytes
            self._dirty_pages_rate = dirty_rate_pps
            self._expected_downtime_s = expected_downtime_s
            self._throttle = throttle_pct
            self._throttle_peak = max(self._throttle_peak, throttle_pct)
            rates = _list_or_none(vcpu_dirty_rates, float)
            if rates is not None:
                self._vcpu_dirty_rates = rates
            record = TraceRecord(
                time=now - (self._start if self._start is not None else now),
                iteration=iteration, dirty_pages=dirty_pages, pages_sent=sent_pages,
                bytes=sent_bytes, bandwidth=bandwidth_bps,
                stopped_bandwidth=stopped_bandwidth_bps or bandwidth_bps,
                expected_downtime=(_ms(expected_downtime_s) if math.isfinite(expected_downtime_s)
                                   else None),
                pending_bytes=remaining_bytes, throttle_pct=throttle_pct,
                dirty_rate=dirty_rate_pps, page_size=self.page_size,
                vcpu_dirty_rates=rates, vcpu_dirty_limits=_list_or_none(vcpu_dirty_limits, int),
                action=action, reason=reason, caught_up_wait_s=caught_up_wait_s,
                backlog_bytes=backlog_bytes)
            if self._trace is not None:
                self._trace.write(record)
            return record

    def _close_period(self) -> tuple[float, float, int, int]:
        """End the period since the last sync (or trace line), under the lock: the rates over
        it, and (now, its length, bytes and pages sent in it)."""
        now = self._clock()
        period = now - (self._last_sync_time if self._last_sync_time is not None else now)
        sent_bytes = self._transferred - self._last_sync_bytes
        pages = self._normal + self._duplicate
        sent_pages = pages - self._last_sync_pages
        if period > 0:
            self._mbps = sent_bytes * 8 / period / 1e6
            self._pages_per_second = sent_pages / period
        self._last_sync_time, self._last_sync_bytes, self._last_sync_pages = now, \
            self._transferred, pages
        return now, period, sent_bytes, sent_pages

    def record_postcopy(self, counters: dict, pending_bytes: int) -> TraceRecord:
        """A trace line of the post-copy phase: what went since the last line, what is left,
        and the post-copy counters so far."""
        return self._record_phase("postcopy", counters, pending_bytes)

    def record_background_snapshot(self, counters: dict, pending_bytes: int) -> TraceRecord:
        """A trace line of a background snapshot's pass, as :meth:`record_postcopy`'s."""
        return self._record_phase("background-snapshot", counters, pending_bytes)

    def _record_phase(self, action: str, counters: dict, pending_bytes: int) -> TraceRecord:
        with self._lock:
            now, period, sent_bytes, sent_pages = self._close_period()
            self._remaining = pending_bytes
            record = TraceRecord(
                time=now - (self._start if self._start is not None else now),
                iteration=self._iterations, dirty_pages=0, pages_sent=sent_pages,
                bytes=sent_bytes, bandwidth=sent_pages * self.page_size / period
                if period > 0 else 0.0, stopped_bandwidth=0.0, expected_downtime=None,
                pending_bytes=pending_bytes, throttle_pct=self._throttle, dirty_rate=0.0,
                page_size=self.page_size, action=action, reason=action,
                **{action.replace("-", "_"): dict(counters)})
            if self._trace is not None:
                self._trace.write(record)
            return record

    def switchover(self, reason: str, expected_downtime_s: float) -> None:
        """The guest is being stopped for the last pass (status ``device``)."""
        with self._lock:
            self._stopped_at = self._clock()
            self._switchover_reason = reason
            self._expected_at_switchover = expected_downtime_s
            self._status = "device"

    def completed(self, downtime_s: float | None = None,
                  phases: dict[str, float] | None = None) -> None:
        """Done.  ``downtime_s``: as the destination measured it (stop to resume); default:
        from :meth:`switchover` to now.  ``phases``: seconds per phase of the downtime."""
        with self._lock:
            now = self._clock()
            if downtime_s is None and self._stopped_at is not None:
                downtime_s = now - self._stopped_at
            self._downtime_s = downtime_s
            self._downtime_phases = dict(phases) if phases else None
            self._remaining = 0
            self._finish(now, "completed")

    def set_postcopy(self, query: Callable[[], dict]) -> None:
        """Post-copy's counters come from ``query()`` (query-migrate's ``postcopy``)."""
        with self._lock:
            self._postcopy = query

    def set_background_snapshot(self, query: Callable[[], dict]) -> None:
        """A background snapshot's counters come from ``query()`` (query-migrate's
        ``background-snapshot``)."""
        with self._lock:
            self._background_snapshot = query

    def set_downtime(self, downtime_s: float, phases: dict[str, float] | None = None) -> None:
        """The downtime is known before the end (post-copy: the guest runs at the destination
        while its last pages follow)."""
        with self._lock:
            self._downtime_s = downtime_s
            self._downtime_phases = dict(phases) if phases else None

    def paused(self, error: str) -> None:
        """Post-copy lost its connection: nothing is finished, nothing failed."""
        with self._lock:
            self._error = error
            self._status = "postcopy-paused"

    @property
    def downtime_s(self) -> float | None:
        with self._lock:
            return self._downtime_s

    @property
    def downtime_phases(self) -> dict[str, float] | None:
        with self._lock:
            return dict(self._downtime_phases) if self._downtime_phases else None

    def failed(self, error: str) -> None:
        with self._lock:
            self._error = error
            self._finish(self._clock(), "failed")

    def cancelled(self) -> None:
        with self._lock:
            self._finish(self._clock(), "cancelled")

    def _finish(self, now: float, status: str) -> None:
        self._end = now
        self._status = status
        if self._start is not None and now > self._start:
            span = now - self._start
            self._mbps = self._transferred * 8 / span / 1e6
            self._pages_per_second = (self._normal + self._duplicate) / span

    # --- anyone's side ----------------------------------------------------------------------

    @property
    def status(self) -> str:
        with self._lock:
            return self._status

    def query(self) -> dict[str, Any]:
        """A snapshot in ``query-migrate`` shape (see the module docstring for each field)."""
        with self._lock:
            info: dict[str, Any] = {"status": self._status}
            if self._status == "none" or self._start is None:
                return info
            end = self._end if self._end is not None else self._clock()
            info["total-time"] = _ms(end - self._start)
            if self._setup_end is not None:
                info["setup-time"] = _ms(self._setup_end - self._start)
            if self._status in ("completed", "postcopy-active", "postcopy-paused") \
                    and self._downtime_s is not None:
                info["downtime"] = _ms(self._downtime_s)
            if self._status in IN_PROGRESS and math.isfinite(self._expected_downtime_s):
                info["expected-downtime"] = _ms(self._expected_downtime_s)
            info["ram"] = {
                "transferred": self._transferred,
                "remaining": self._remaining,
                "total": self._ram_total,
                "duplicate": self._duplicate,
                "normal": self._normal,
                "normal-bytes": self._normal * self.page_size,
                "compressed": self._compressed,
                "dirty-pages-rate": int(round(self._dirty_pages_rate)),
                "dirty-sync-count": self._syncs,
                "mbps": self._mbps,
                "pages-per-second": int(round(self._pages_per_second)),
                "page-size": self.page_size,
            }
            disk = self._disk() if self._disk is not None else None
            if disk is not None:
                # the policy's pending bytes at the last sync were RAM's and the disks'
                info["ram"]["remaining"] = max(self._remaining - disk["remaining"], 0)
                info["disk"] = disk
            info["cpu-throttle-percentage"] = self._throttle
            info["cpu-throttle-peak"] = self._throttle_peak
            if self._vcpu_dirty_limits is not None:
                info["vcpu-dirty-limit"] = list(self._vcpu_dirty_limits)
            if self._vcpu_dirty_rates is not None:
                info["vcpu-dirty-rates"] = [int(round(r)) for r in self._vcpu_dirty_rates]
            if self._status in ("failed", "postcopy-paused", "postcopy-recover"):
                info["error-desc"] = self._error or "unknown error"
            if self._switchover_reason is not None:
                info["switchover-reason"] = self._switchover_reason
            info["iterations"] = self._iterations
            if self._tls is not None:
                info["tls"] = dict(self._tls)
            if self._expected_at_switchover is not None and math.isfinite(
                    self._expected_at_switchover):
                info["downtime-expected-at-switchover"] = round(
                    self._expected_at_switchover * 1000, 2)
            if self._downtime_s is not None and self._downtime_phases:
                info["downtime-breakdown"] = {phase: round(seconds * 1000, 2) for phase, seconds
                                              in self._downtime_phases.items()}
            postcopy = self._postcopy
            background = self._background_snapshot
        if postcopy is not None:
            info["postcopy"] = postcopy()
        if background is not None:
            info["background-snapshot"] = background()
        return info


def _list_or_none(values, kind) -> list | None:
    return [kind(v) for v in values] if values is not None else None
