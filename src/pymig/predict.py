"""Predicting a migration before running it: the real convergence policy run over a model of
the guest and the link.

The model steps through a migration as the migration thread does - a dirty-log sync, the
policy's decision, an iteration of sending, again - with modelled figures in place of
measured ones, and asks :mod:`pymig.policy` what to do at every sync through one function,
:func:`ask_policy`.  Nothing here decides whether to switch over, throttle or give up: the
policy does, on the same :class:`~pymig.policy.Metrics` the migration would give it, built
with the same estimators (:mod:`pymig.estimate`: the bandwidth, the logged rate, the guest's
own rate, the trigger period).

The guest (:class:`GuestModel`) is its working-set curve ``D(t)``: the distinct pages it
writes in a window of ``t`` seconds of run time (uniform writes over ``W`` pages at ``r``
pages/s: ``W (1 - exp(-r t / W))``; a sequential sweep: ``min(r t, W)``; or the curve ``pymig
dirtyrate`` measured).  A throttle of ``p`` % leaves it ``1 - p/100`` of the run time, and a
dirty limit caps each vCPU's share of ``r``.  Its memory is the pages holding data when the
migration starts (the first pass sends only those: pages never touched are never read),
cut into bins in address order, the working set first (where the built-in workloads keep
it).  A sync finds, in each bin, ``W_bin * D(run time since the last sync) / W`` pages: what
the dirty log shows, the distinct pages written over the period (fewer than the writes once
pages are written twice), including pages written after the last sync and sent since,
which go again.  Where the log is re-armed chunk by chunk as a pass reaches it (a KVM
guest's bitmap, manually protected: ``GuestModel.rearmed_at_send``), a page the last sync
found counts only if written after its chunk's re-arm: before, it went in the pass's copy.

The link (:class:`LinkModel`) carries wire bytes at its bandwidth, and through
``max-bandwidth``'s token bucket (:class:`TokenBucket`) while the guest runs; the source
encodes page bytes at its own rate; the destination takes first-time pages at its
first-touch rate; zero and compressible pages take less of the wire.  The stop-and-copy
sends what is left at the link's rate (through the bucket, as the live phase left it, only
with ``x-switchover-capped``), after the switchover's fixed cost (the link's, measured where
it was: :attr:`LinkModel.switchover_s`) and with the LOADED / COMMIT / ACK exchange's round
trips.

The rule is the policy's whole rule, :func:`pymig.policy.next_step`, asked from
:func:`ask_policy` with the metrics a migration would have at that sync: the verdict, a
switchover held for another pass, the catch-up wait for the destination before a switchover;
between passes, a pass behind the destination waits up to ``policy.BEHIND_PERIOD_S`` for its
next report, and a pass held for a destination far behind as long as ``policy.held_wait``
says.  None of it is written again here.

A model that never switches over ends at a limit the policy applies, at :data:`HORIZON_S`, or
once :data:`STALL_SYNCS` syncs in a row expected no shorter downtime with nothing left to
throttle: "does-not-converge".
"""

from __future__ import annotations

import bisect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from pymig import estimate, policy
from pymig.machine import CAUGHT_UP_INTERVAL_S, PROGRESS_INTERVAL_S
from pymig.ram import CLEAR_CHUNK_PAGES, capped_packet_bytes
from pymig.transport.ratelimit import BURST_SECONDS, MIN_BURST_BYTES
from pymig.parameters import MigrationParameters, ParameterStore

PAGE_SIZE = 4096
#: Bins the data pages are cut into (more: finer, slower).
BINS = 128
#: Wire bytes of a zero page (a run record's share) and a normal page's framing, as a share
#: of a page.
ZERO_PAGE_WIRE_SHARE = 0.002
PAGE_FRAMING_SHARE = 0.0026
#: The destination's reports trail what was sent by the time these wire bytes take to
#: cross (socket buffers, the packet it is loading), and by its report period: it reports
#: at most every PROGRESS_INTERVAL_S while loading, and CAUGHT_UP once nothing more arrived
#: for CAUGHT_UP_INTERVAL_S (pymig.machine).  Its reports count whole RAM packets (the source
#: turns a loaded offset into the page bytes of the packets before it), and a packet holds
#: the pending pages of one re-protect chunk (ram.CLEAR_CHUNK_PAGES of address space), as
#: many as fit its buffer (ram.capped_packet_bytes).
REPORT_LAG_WIRE_BYTES = 160 << 10
REPORT_LAG_S = max(PROGRESS_INTERVAL_S, CAUGHT_UP_INTERVAL_S)
#: What the rate limiter's bucket holds when the migration starts: its smallest burst, as
#: pymig.transport.ratelimit makes a new one (it grows to BURST_SECONDS of the cap only by
#: refilling while the sender is idle).
BURST_START_BYTES = MIN_BURST_BYTES
#: A model that never switches over ends after this much migration time...
HORIZON_S = 600.0
#: ... or once this many syncs found no lower expected downtime than before (by 0.1 %), with
#: nothing left for a throttle or a limit to change and the destination caught up.
STALL_SYNCS = 60


@dataclass(frozen=True)
class GuestModel:
    """A guest as a migration sees it."""

    ram_bytes: int
    write_rate_pps: float  # pages/s first written, unthrottled (the curve's slope at 0)
    working_set_pages: int
    pattern: str = "uniform"  # "uniform" | "sequential" | "curve" (the measured points)
    curve: tuple[tuple[float, float], ...] = ()  # (window s, distinct pages), ascending
    data_pages: int = 0  # pages holding data at the start (0: the working set)
    zero_share: float = 0.0  # of the data pages, those all zero
    # where they are: the share all zero of each equal stretch of the data pages, in address
    # order (what Source.zero_profile measures); empty: zero_share everywhere
    zero_profile: tuple[float, ...] = ()
    compressed_share: float = 1.0  # wire bytes / page bytes of a data page under LZ4
    # the dirty log is re-armed chunk by chunk as a pass reaches it (KVM's bitmap with manual
    # protection), not by the sync: a page the sync found and the guest writes again before
    # its chunk is re-armed goes in this pass's copy and is not logged again
    rearmed_at_send: bool = False
    vcpus: int = 1
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        if self.ram_bytes <= 0 or self.ram_bytes % self.page_size:
            raise ValueError(f"ram_bytes must be a positive multiple of {self.page_size}")
        if self.write_rate_pps < 0 or self.working_set_pages < 0:
            raise ValueError("the write rate and the working set cannot be negative")
        if self.working_set_pages > self.ram_pages:
            raise ValueError(f"a working set of {self.working_set_pages} pages does not fit "
                             f"{self.ram_pages} pages of RAM")
        if self.pattern not in ("uniform", "sequential", "curve"):
            raise ValueError(f"pattern is uniform, sequential or curve, not {self.pattern!r}")
        if self.pattern == "curve" and not self.curve:
            raise ValueError("pattern 'curve' needs the curve's points")
        if not (0 <= self.zero_share <= 1 and 0 < self.compressed_share <= 1):
            raise ValueError("zero_share is in [0, 1], compressed_share in (0, 1]")
        if any(not 0 <= z <= 1 for z in self.zero_profile):
            raise ValueError("a zero profile's shares are in [0, 1]")

    @property
    def ram_pages(self) -> int:
        return self.ram_bytes // self.page_size

    @property
    def first_pass_pages(self) -> int:
        return min(max(self.data_pages, self.working_set_pages, 1), self.ram_pages)

    def distinct(self, window_s: float) -> float:
        """Distinct pages written in a window of ``window_s`` seconds of run time."""
        t, w, r = max(window_s, 0.0), float(self.working_set_pages), self.write_rate_pps
        if w <= 0 or r <= 0 or t <= 0:
            return 0.0
        if self.pattern == "uniform":
            return w * -math.expm1(-r * t / w)
        if self.pattern == "sequential":
            return min(r * t, w)
        times = [p[0] for p in self.curve]
        pages = [max(p[1], 1e-9) for p in self.curve]
        if t <= times[0]:
            return min(r * t, pages[0]) if r * times[0] >= pages[0] else pages[0] * t / times[0]
        if t >= times[-1]:
            return pages[-1]
        return float(np.exp(np.interp(math.log(t), np.log(times), np.log(pages))))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["curve"] = [list(p) for p in self.curve]
        out["zero_profile"] = list(self.zero_profile)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GuestModel":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown guest model fields: {', '.join(sorted(unknown))}")
        values = dict(data)
        values["curve"] = tuple(tuple(map(float, p)) for p in values.get("curve", ()))
        values["zero_profile"] = tuple(map(float, values.get("zero_profile", ())))
        return cls(**values)

    @classmethod
    def from_dirty_rate(cls, info: dict[str, Any], ram_bytes: int, *, vcpus: int = 1,
                        use_curve: bool = True, **overrides: Any) -> "GuestModel":
        """From ``query-dirty-rate``'s answer (a measured guest): its write rate, its working
        set and, with ``use_curve``, the curve itself."""
        ws = info.get("working-set") or {}
        page_size = int(info.get("page-size", PAGE_SIZE))
        rate = float(info.get("write-rate-pages") or 0.0)
        pages = int(ws.get("pages", 0))
        curve = tuple((p["window-ms"] / 1000.0, float(p["pages"])) for p in ws.get("curve", ())
                      if p.get("window-ms", 0) > 0 and p.get("pages", 0) > 0)
        values: dict[str, Any] = dict(ram_bytes=ram_bytes, write_rate_pps=rate,
                                      working_set_pages=pages, vcpus=vcpus, page_size=page_size,
                                      pattern="curve" if use_curve and curve else "uniform",
                                      curve=curve if use_curve else ())
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_trace(cls, records: list[dict[str, Any]], ram_bytes: int,
                   **overrides: Any) -> "GuestModel":
        """From a migration's trace (``--trace``): the dirty rate it logged with no throttle
        on (the median of the syncs after the first), and the most pages one sync found as
        the working set (a lower bound, as the log's counts are)."""
        rates = [r["dirty_rate"] for r in records[1:] if r.get("throttle_pct", 0) == 0
                 and r.get("dirty_rate", 0) > 0]
        found = [r["dirty_pages"] for r in records[1:]]
        if not rates:
            raise ValueError("the trace has no sync with a dirty rate to model the guest on")
        values: dict[str, Any] = dict(ram_bytes=ram_bytes, write_rate_pps=float(np.median(rates)),
                                      working_set_pages=max(max(found, default=0), 1),
                                      page_size=int(records[0].get("page_size", PAGE_SIZE)))
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class LinkModel:
    """The path the pages take.  Figures measured on the development host are the defaults
    where a user gives none (docs/convergence.md)."""

    bandwidth_bps: float = 0.0  # wire bytes/s the link carries (0: the source's rate bounds)
    rtt_s: float = 0.0
    source_rate_bps: float = 1.5e9  # page bytes/s the source reads, encodes and sends
    first_touch_bps: float = 0.0  # page bytes/s a destination takes first-time pages at (0: any)
    setup_s: float = 0.003  # connection, header, configuration, before the first sync
    per_sync_s: float = 0.0005  # a dirty-log sync and a decision
    switchover_s: float = 0.0  # the switchover's fixed cost (0: pymig.estimate's figure)
    # from the start until the destination has built its guest and loads (and reports)
    destination_ready_s: float = 0.0
    # seconds the destination takes to load a page it never had, all zero or holding data
    # (faulting fresh memory in): measure_first_touch() measures them (0: no time)
    first_touch_zero_s: float = 0.0
    first_touch_data_s: float = 0.0


class TokenBucket:
    """max-bandwidth's token bucket (:class:`pymig.transport.ratelimit.RateLimiter`) as a
    fluid: it refills at the cap, up to its burst (``BURST_SECONDS`` of the cap, at least
    ``MIN_BURST_BYTES``), whenever the sender does not take from it (a catch-up wait, a pass
    held for the destination, the time a pass waits on the source or the destination), and
    what it holds goes at once; a new one holds its smallest burst.  A rate of 0: no cap."""

    def __init__(self, rate_bps: float, now: float):
        self.rate = float(max(rate_bps, 0))
        self.burst = max(float(MIN_BURST_BYTES), self.rate * BURST_SECONDS)
        self.tokens = min(float(BURST_START_BYTES), self.burst) if self.rate else 0.0
        self.stamp = now

    def send(self, now: float, wire_bytes: float, busy_s: float = 0.0) -> float:
        """Seconds the bucket holds a send of ``wire_bytes`` starting at ``now`` (or where the
        last send ended, if later), the sender busy ``busy_s`` with it anyway."""
        if self.rate <= 0:
            return 0.0
        start = max(now, self.stamp)
        tokens = min(self.burst, self.tokens + (start - self.stamp) * self.rate)
        wait = max(wire_bytes - tokens, 0.0) / self.rate
        seconds = max(wait, busy_s)
        self.tokens = min(self.burst, max(tokens - wire_bytes + seconds * self.rate, 0.0))
        self.stamp = start + seconds
        return wait


def measure_first_touch(page_size: int = PAGE_SIZE, pages: int = 2048,
                        repeats: int = 3) -> tuple[float, float]:
    """(seconds per all-zero page, seconds per data page) this host takes to load pages into
    memory never touched before, as a destination loads a first pass: RAM packets made by the
    source's encoder (``core.encode_packet``) decoded by the destination's
    (``core.decode_packet``) into a fresh anonymous mapping; the best of ``repeats``."""
    import mmap

    from pymig import core

    best = []
    for kind in ("zero", "data"):
        source = mmap.mmap(-1, pages * page_size)
        if kind == "data":
            view = np.frombuffer(source, dtype=np.uint8).reshape(pages, page_size)
            view[:, :8] = 1
            del view
        bitmap = np.full((pages + 63) // 64, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
        packets, cursor = [], 0
        while True:
            out = bytearray((1 << 20) + page_size)
            result = core.encode_packet(source, page_size, 0, bitmap, pages, cursor, out, None)
            if result.nbytes == 0:
                break
            packets.append(bytes(out[:result.nbytes]))
            cursor = result.cursor
        source.close()
        seconds = math.inf
        for _ in range(repeats):
            fresh = mmap.mmap(-1, pages * page_size)
            began = time.perf_counter()
            for packet in packets:
                core.decode_packet(packet, fresh, page_size, 0, pages)
            seconds = min(seconds, time.perf_counter() - began)
            fresh.close()
        best.append(seconds / pages)
    return best[0], best[1]


@dataclass
class Prediction:
    """What the model says the migration does."""

    status: str  # "completed", "cancelled" (by a limit) or "does-not-converge"
    converges: bool  # switched over on the estimate's word (fits-limit)
    reason: str  # the policy's last reason
    total_s: float
    downtime_s: float  # math.nan unless completed
    expected_downtime_s: float  # what the policy expected at the switchover
    bytes_sent: int  # on the wire
    page_bytes_sent: int
    passes: int  # dirty-log syncs, as the migration's "iterations"
    throttle_peak_pct: int
    trace: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """One flat row (ms, bytes), the names :meth:`pymig.experiment.Run.summary` uses."""
        return {"status": self.status, "converged": self.converges, "reason": self.reason,
                "total_ms": _ms(self.total_s), "downtime_ms": _ms(self.downtime_s),
                "expected_downtime_ms": _ms(self.expected_downtime_s),
                "transferred_bytes": self.bytes_sent, "page_bytes": self.page_bytes_sent,
                "iterations": self.passes, "throttle_peak_pct": self.throttle_peak_pct}


def _ms(seconds: float) -> float | None:
    return round(float(seconds) * 1000, 3) if math.isfinite(seconds) else None


def parameters(**qmp: Any) -> MigrationParameters:
    """Migration parameters (and capabilities, as ``capabilities={...}``) by QMP name,
    checked as ``migrate-set-parameters`` checks them."""
    caps = qmp.pop("capabilities", None) or {}
    store = ParameterStore()
    if qmp:
        store.set(**qmp)
    if caps:
        store.set_capabilities(**caps)
    return store.snapshot()


# -- the one meeting point with the policy ---------------------------------------------------

@dataclass(frozen=True)
class Step:
    """What the policy said, in the model's terms."""

    action: str  # "continue" | "switchover" | "cancel"
    reason: str
    throttle_pct: int
    dirty_limits: tuple[int, ...] | None
    expected_downtime_s: float
    hot_periods: int
    wait_s: float = 0.0  # wait this long for the destination, then sync and ask again
    held: policy.HeldWait | None = None  # after the pass, wait so for a destination far behind


def ask_policy(state: "_State", params: MigrationParameters) -> Step:
    """Build the policy's metrics from the model's state, ask the whole rule
    (:func:`pymig.policy.next_step`, as the migration thread asks it), and map its move.

    Every call into the convergence rule goes through here (and :func:`_slice_s`)."""
    from pymig import measure, migration

    backlog = state.backlog()
    metrics = policy.Metrics(
        iteration=state.iteration,
        elapsed_s=state.now,
        ram_bytes=state.guest.ram_bytes,
        page_size=state.guest.page_size,
        pending_bytes=state.pending_bytes,
        bandwidth_bps=state.bandwidth.bytes_per_s,
        resend_bytes=state.resend_bytes,
        stopped_bandwidth_bps=measure.stopped_rate(
            max(state.bandwidth.bytes_per_s, state.source_rate.bytes_per_s),
            state.bandwidth, params),
        dirty_rate_bps=state.dirty_pps * state.guest.page_size,
        bytes_sent_total=round(state.wire_sent),
        bytes_sent_period=round(state.sent_period),
        bytes_dirtied_period=round(state.dirty_pps * state.period * state.guest.page_size),
        throttle_pct=state.throttle,
        switchover_s=state.switchover_s,
        in_flight_bytes=0,  # a return path: the guest stops once everything sent is loaded
        own_dirty_rate_bps=state.own_rate_bps,
        vcpu_dirty_rates=state.vcpu_rates(params),
        dirty_limited=state.dirty_limits is not None,
        period_sent_bytes=state.closed[0] if state.closed else None,
        period_dirtied_bytes=state.closed[1] if state.closed else 0,
        hot_periods=state.hot_periods,
        backlog_bytes=round(backlog),
        swept=state.swept,
        caught_up=backlog <= 0,
        expected_before_wait_s=state.expected_before_wait,
        passes_after_wait=state.passes_after_wait,
    )
    # policy.decide looked up now, so that a test's stand-in for it is the one asked
    step = policy.next_step(metrics, migration.policy_params(params), policy.decide)
    decision, move = step.decision, step.move
    action, reason, wait_s, held = policy.Action.CONTINUE.value, decision.reason, 0.0, None
    if move in (policy.Move.SWITCHOVER, policy.Move.CANCEL):
        action = move.value
    elif move in (policy.Move.RESEND, policy.Move.HOLD):
        reason = f"held: {policy.Held(step.reason).name.lower()}"
        if move == policy.Move.RESEND:
            state.passes_after_wait += 1
        if policy.Held(step.reason) is policy.Held.BEHIND:
            held = policy.held_wait(decision, metrics)
    elif move == policy.Move.WAIT:
        wait_s = state.catch_up_s()
        reason = f"{decision.reason}; waiting for the destination"
    state.expected_before_wait = decision.expected_downtime_s if wait_s else math.inf
    return Step(action, reason, decision.throttle_pct, decision.vcpu_dirty_limits,
                decision.expected_downtime_s, decision.hot_periods, wait_s, held)


def _slice_s(params: MigrationParameters) -> float:
    from pymig import migration

    return migration.iteration_slice_s(params)


def _behind_wait_s(state: "_State", began: float) -> float:
    """After an iteration that began at ``began``: how long the migration thread waits for
    the destination's next report, being further behind than the iteration sent."""
    left = policy.BEHIND_PERIOD_S - (state.now - began)
    if state.backlog() <= max(state.sent_period, 0) or left <= 0:
        return 0.0
    ready = state.link.setup_s + state.link.destination_ready_s
    return min(left, max(ready - state.now, REPORT_LAG_S))


def _held_wait_s(state: "_State", held: policy.HeldWait, began: float) -> float:
    """After a pass held for a destination far behind, begun at ``began``: how long the
    migration thread waits for its reports (until its backlog is down to
    ``held.backlog_bytes``, at most ``held.at_most_s`` after ``began``), seen report period by
    report period."""
    deadline = min(began + held.at_most_s, state.now + HORIZON_S)
    now = state.now
    try:
        while state.backlog() > held.backlog_bytes and state.now < deadline:
            # the next report: a PROGRESS a report period on, or the CAUGHT_UP before it
            caught_up = state.caught_up_at()
            step = caught_up - state.now if caught_up > state.now else REPORT_LAG_S
            state.now = min(state.now + min(step, REPORT_LAG_S), deadline)
        return state.now - now
    finally:
        state.now = now


def zero_by_bin(guest: GuestModel, edges: np.ndarray) -> np.ndarray:
    """The share of each bin's pages (``edges``: page indices) all zero at the start: the
    guest's zero profile spread over the bins, or its zero share everywhere."""
    n = len(edges) - 1
    if not guest.zero_profile:
        return np.full(n, guest.zero_share)
    profile = np.asarray(guest.zero_profile, dtype=float)
    total = float(edges[-1]) or 1.0
    # zero pages up to each page index, the profile's stretches being equal in pages
    stretch = np.linspace(0.0, total, len(profile) + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(profile * np.diff(stretch))])
    at_edges = np.interp(edges.astype(float), stretch, cumulative)
    sizes = np.diff(edges).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(np.where(sizes > 0, np.diff(at_edges) / sizes, 0.0), 0.0, 1.0)


# -- the model's state -----------------------------------------------------------------------

class _State:
    """The guest's memory in bins, the link's counters and the estimators' state."""

    def __init__(self, guest: GuestModel, link: LinkModel, params: MigrationParameters,
                 bins: int):
        self.guest, self.link, self.params = guest, link, params
        n = guest.first_pass_pages
        edges = np.linspace(0, n, min(bins, n) + 1).round().astype(np.int64)
        self.pages = np.diff(edges).astype(float)
        ws = guest.working_set_pages
        self.ws_pages = np.clip(np.minimum(edges[1:], ws) - edges[:-1], 0, None).astype(float)
        self.pending = np.ones_like(self.pages)  # share of each bin in the migration bitmap
        self.sent_before = np.zeros_like(self.pages, dtype=bool)
        ps = guest.page_size
        compressed = guest.compressed_share if params.compression == "lz4" else 1.0
        self.zero_wire = ps * ZERO_PAGE_WIRE_SHARE
        self.data_wire = ps * (compressed + PAGE_FRAMING_SHARE)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.ws_share = np.where(self.pages > 0, self.ws_pages / self.pages, 0.0)
        self.zero_at_start = zero_by_bin(guest, edges)
        # page bytes/s the destination loads the first pass at (0: as fast as they come)
        self.first_pass_bytes = float(self.pages.sum()) * ps
        load_s = float((self.pages * (self.zero_at_start * link.first_touch_zero_s
                                      + (1 - self.zero_at_start)
                                      * link.first_touch_data_s)).sum())
        self.first_pass_rate = self.first_pass_bytes / load_s if load_s > 0 else 0.0
        self.now = link.setup_s + 1.5 * link.rtt_s  # connect, header, configuration
        self.tau = self.now  # the guest's run time (it ran through the setup)
        self.synced_tau = 0.0  # ... when the dirty log was last harvested (logging began at 0)
        self.iteration = 0
        self.period = 0.0
        self.sent_period = 0.0
        self.page_sent = 0.0
        self.wire_sent = 0.0
        self.wire_period = 0.0  # wire bytes the last pass sent
        self.busy_s = 0.0  # sending, not waiting on max-bandwidth's token bucket
        self.throttle = 0
        self.throttle_peak = 0
        self.dirty_limits: tuple[int, ...] | None = None
        self.hot_periods = 0
        self.dirty_pps = 0.0
        self.own_rate_bps = 0.0
        self.closed: tuple[int, int] | None = None
        self.next_bin = 0  # where a sliced pass goes on
        # with a log re-armed as a pass reaches each chunk: the re-protect chunk of each bin,
        # the share of each bin's working-set pages the last sync found whose chunk is not
        # re-armed yet (set in the log: writing them again logs nothing), and the run time
        # the bin's chunk was re-armed since the last sync (nan: not)
        self.chunk_of = edges[:-1] // CLEAR_CHUNK_PAGES
        self.log_set = np.zeros_like(self.pages)
        self.rearmed_tau = np.full_like(self.pages, np.nan)
        self.swept = False  # the first pass over the data pages is through
        self.in_first_pass = True  # the last pass sent was (part of) the first
        self.expected_before_wait = math.inf  # the decision a catch-up wait followed
        self.passes_after_wait = 0
        # the fixed cost the migration's own estimate counts (the policy's), and the one the
        # stop-and-copy takes: what the host was measured to take, where it was
        self.switchover_s = estimate.SwitchoverCost().seconds(guest.vcpus, guest.ram_bytes)
        self.link_switchover_s = link.switchover_s or self.switchover_s
        self.bandwidth = estimate.Bandwidth()
        self.source_rate = estimate.Bandwidth()
        self.logged = estimate.LoggedRate()
        self.own = estimate.DirtyRate()
        self.trigger = estimate.TriggerPeriod()
        self.trigger.begin(self.now, 0)
        self.bandwidth.observe(self.now, 0)
        self.history: list[tuple[float, float]] = [(self.now, 0.0)]  # (time, page bytes sent)
        self.pass_starts: list[float] = [0.0]  # page bytes sent when each pass began
        self.pass_packets: list[float] = [self.packet_page_bytes()]  # ... and its packets'

        self.bucket = TokenBucket(params.max_bandwidth, self.now)
        self.source_rate.observe(0.0, 0)

    # -- the guest --
    def run_share(self) -> float:
        """The share of the guest's unthrottled writing it does now."""
        share = 1 - self.throttle / 100
        rate = self.guest.write_rate_pps
        if self.dirty_limits is not None and rate > 0:
            per_vcpu = rate / max(self.guest.vcpus, 1)
            capped = sum(min(per_vcpu, limit) for limit in
                         (self.dirty_limits * self.guest.vcpus)[:self.guest.vcpus])
            share *= capped / rate
        return share

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.tau += seconds * self.run_share()

    def vcpu_rates(self, params: MigrationParameters) -> tuple[float, ...] | None:
        if not params.capabilities.get("dirty-limit"):
            return None
        each = self.dirty_pps / max(self.guest.vcpus, 1)
        return (each,) * self.guest.vcpus

    # -- the dirty log --
    def sync(self) -> int:
        """Harvest the dirty log into the migration bitmap; returns the pages it showed.

        Each working-set page is found if written in the window since the last sync; with a
        log re-armed as the pass reaches each chunk, a page the last sync found (its bit still
        set) only if written after its chunk was re-armed: a write before is in the copy the
        pass sent, and the log, its bit already set, shows nothing new (ram.RamSaver.sync)."""
        self.advance(self.link.per_sync_s)
        w = self.guest.working_set_pages
        share = self.guest.distinct(self.tau - self.synced_tau) / w if w > 0 else 0.0
        self.synced_tau = self.tau
        if self.guest.rearmed_at_send and w > 0:
            rearmed = ~np.isnan(self.rearmed_tau)
            since = np.where(rearmed, self.tau - np.nan_to_num(self.rearmed_tau), 0.0)
            after = np.array([self.guest.distinct(t) / w for t in since])
            found_share = (1 - self.log_set) * share + self.log_set * after
            self.log_set = found_share + np.where(rearmed, 0.0, self.log_set)
            self.rearmed_tau[:] = np.nan
            found = self.ws_pages * found_share
        else:
            found = self.ws_pages * share
        with np.errstate(invalid="ignore", divide="ignore"):
            new = np.where(self.pages > 0, found / self.pages, 0.0)
        self.pending = np.minimum(self.pending + new * (1 - self.pending), 1.0)
        return int(round(found.sum()))

    @property
    def pending_bytes(self) -> int:
        return int(round((self.pending * self.pages).sum())) * self.guest.page_size

    @property
    def resend_bytes(self) -> int:
        pages = (self.pending * self.pages)[self.sent_before].sum()
        return int(round(pages)) * self.guest.page_size

    # -- the link --
    def live_wire_bps(self) -> float:
        rates = [r for r in (self.link.bandwidth_bps, self.params.max_bandwidth) if r > 0]
        return min(rates) if rates else math.inf

    def wire_bytes(self, pages: float, b: int | None) -> float:
        """Wire bytes of ``pages`` of bin ``b`` sent for the first time (None: re-sent, so
        written, so not zero): a page still zero (never written since the start) takes a
        few bytes."""
        if b is None:
            return pages * self.data_wire
        w = self.guest.working_set_pages
        written = self.guest.distinct(self.tau) / w if w > 0 else 0.0
        zero = self.zero_at_start[b] * (1 - self.ws_share[b] * min(written, 1.0))
        return pages * (zero * self.zero_wire + (1 - zero) * self.data_wire)

    def send_time(self, pages: float, wire_bytes: float, first_time: bool,
                  capped: bool = True) -> tuple[float, float]:
        """(seconds to send ``pages`` in ``wire_bytes``, of which the source is busy): the
        rate limiter (``capped``: max-bandwidth in force), the link, the source and the
        destination's first touch, the slowest of them."""
        ps = self.guest.page_size
        link = wire_bytes / self.link.bandwidth_bps if self.link.bandwidth_bps > 0 else 0.0
        source = pages * ps / self.link.source_rate_bps
        touch = (pages * ps / self.link.first_touch_bps
                 if first_time and self.link.first_touch_bps > 0 else 0.0)
        busy = max(source, link, touch)
        wire = self.bucket.send(self.now, wire_bytes, busy) if capped else 0.0
        return max(wire, busy), busy

    def send_pass(self, slice_s: float) -> None:
        """One iteration: the pending pages in address order, from where the last one
        stopped, until none is left or the slice's time is up."""
        began, page0, wire0 = self.now, self.page_sent, self.wire_sent
        self.in_first_pass = not self.swept
        if page0 > self.pass_starts[-1]:
            self.pass_starts.append(page0)
            self.pass_packets.append(self.packet_page_bytes())
        n = len(self.pages)
        sent: list[tuple[float, float]] = []  # (pages, wire bytes) of each bin, in order
        rearmed: set[int] = set()  # bins whose chunk this pass re-armed
        for step in range(n):
            if self.now - began >= slice_s:
                break
            b = (self.next_bin + step) % n
            pages = self.pending[b] * self.pages[b]
            if pages <= 0:
                continue
            if self.guest.rearmed_at_send and b not in rearmed:
                # the pass re-arms the bin's chunk before it reads any of it
                chunk = self.chunk_of == self.chunk_of[b]
                rearmed.update(np.flatnonzero(chunk).tolist())
                self.rearmed_tau[chunk] = self.tau
            first = not self.sent_before[b]
            wire = self.wire_bytes(pages, b if first else None)
            seconds, busy = self.send_time(pages, wire, first)
            self.advance(seconds)
            self.busy_s += busy
            self.page_sent += pages * self.guest.page_size
            self.wire_sent += wire
            self.pending[b] = 0.0
            self.sent_before[b] = True
            self.history.append((self.now, self.page_sent))
            sent.append((pages, wire))
        else:
            step = n
        if not self.swept and self.sent_before.all():
            self.swept = True
            self.end_in_debt(began, self.last_chunk_wire(sent))
        self.next_bin = (self.next_bin + step) % n if math.isfinite(slice_s) else 0
        self.sent_period = self.page_sent - page0
        self.wire_period = self.wire_sent - wire0
        if self.now == began:
            self.advance(self.link.per_sync_s)  # nothing to send: the next sync comes at once

    def last_chunk_wire(self, sent: list[tuple[float, float]]) -> float:
        """Wire bytes of the first pass's last RAM packet, the pass having sent ``sent``
        (pages and wire bytes per bin, in order): the data pages of the last re-protect
        chunk they reach into (they start at page 0), as many as a packet's buffer takes."""
        tail = self.guest.first_pass_pages % CLEAR_CHUNK_PAGES or CLEAR_CHUNK_PAGES
        pages = wire = 0.0
        for bin_pages, bin_wire in reversed(sent):
            share = min(bin_pages, tail - pages) / bin_pages
            pages += bin_pages * share
            wire += bin_wire * share
            if pages >= tail:
                break
        limit = capped_packet_bytes(int(self.params.max_bandwidth), self.guest.page_size)
        return min(wire, float(limit))

    def end_in_debt(self, began: float, packet_wire: float) -> None:
        """The rate limiter runs on debt: a packet goes as soon as the bucket is not in debt,
        and the next send pays for it.  A pass whose last packet went so ends that packet's
        time at the cap before the fluid bucket has it, the bucket in debt by it: the sync
        comes that much sooner, and the pass after it pays.

        Only the first pass's is known: it sends every data page, so its last packet is the
        last chunk's pages.  A pass of re-sends ends with the pages pending in the last
        chunk that has any, which a guest's own writes outside its working set (a counter,
        a stack) make a page or a few, and the model does not know where those are."""
        bucket = self.bucket
        if bucket.rate <= 0:
            return
        owed = max(packet_wire - bucket.tokens, 0.0)
        back = min(owed / bucket.rate, self.now - began)
        if back <= 0:
            return
        self.now -= back
        self.tau -= back * self.run_share()
        bucket.tokens -= back * bucket.rate
        bucket.stamp = self.now
        self.history = [(min(t, self.now), b) for t, b in self.history]

    def last_packet_wire(self) -> float:
        """Wire bytes of the last pass's packets (its page bytes per wire byte)."""
        share = self.wire_period / self.sent_period if self.sent_period > 0 else 1.0
        return min(self.pass_packets[-1] * share, self.wire_period)

    def packet_page_bytes(self) -> float:
        """Page bytes of a RAM packet in a pass starting now: a chunk's pending pages, at
        most what the packet's buffer holds of data pages."""
        ps = self.guest.page_size
        wire_limit = capped_packet_bytes(int(self.params.max_bandwidth), ps)
        pending_share = float((self.pending * self.pages).sum()) / max(self.pages.sum(), 1.0)
        pages = min(CLEAR_CHUNK_PAGES * pending_share, wire_limit / self.data_wire)
        return max(pages, 1.0) * ps

    def lag_s(self) -> float:
        """How long the destination's reports trail what was sent: the bytes between
        sender and loader (no more than the last pass sent), crossing at the wire's rate."""
        wire_bps = self.live_wire_bps()
        queued = min(REPORT_LAG_WIRE_BYTES, self.wire_period)
        return REPORT_LAG_S + (queued / wire_bps if math.isfinite(wire_bps) else 0.0)

    def delivered(self) -> float:
        """Page bytes the destination has reported loading: what was sent :meth:`lag_s`
        ago, nothing before it has built its guest."""
        if self.now < self.link.setup_s + self.link.destination_ready_s:
            return 0.0
        if self.now >= self.caught_up_at():
            return self.page_sent
        times = [h[0] for h in self.history]
        loaded = float(np.interp(self.now - self.lag_s(), times, [h[1] for h in self.history]))
        if self.first_pass_rate:
            # the first pass's pages load no faster than the destination faults them in
            first = self.first_pass_bytes
            ready = self.link.setup_s + self.link.destination_ready_s
            capacity = max(self.now - self.lag_s() - ready, 0.0) * self.first_pass_rate
            first_loaded = min(loaded, first, capacity)
            loaded = first_loaded + (max(loaded - first, 0.0) if first_loaded >= first else 0.0)
        if loaded >= self.page_sent:
            return loaded  # caught up: the last packet of a pass is flushed as it ends
        # whole packets only, a pass's first packet starting where the pass did
        i = max(bisect.bisect_right(self.pass_starts, loaded) - 1, 0)
        base, packet = self.pass_starts[i], self.pass_packets[i]
        return base + (loaded - base) // packet * packet

    def backlog(self) -> float:
        return max(self.page_sent - self.delivered(), 0.0)

    def caught_up_at(self) -> float:
        """When the destination reports it has loaded everything sent (CAUGHT_UP).

        After a pass of re-sends, the last packet is there as the pass ends on loopback (the
        cap paces the sender, not the wire), on a link of its own once the bytes queued
        ahead of it have crossed.  The destination reports as soon as nothing more is to
        load, but no sooner than ``CAUGHT_UP_INTERVAL_S`` after its last report, which came
        as it loaded the packet before (packets a packet's time at the cap apart): so that
        interval less the packets' spacing later, at most.  A first pass loads no faster
        than its first touch allows, and nothing loads before the destination has built its
        guest."""
        ready = self.link.setup_s + self.link.destination_ready_s
        if self.in_first_pass:
            # the first pass ends in a burst of packets its zero pages make small on the
            # wire, each a chunk of fresh memory to fault in: its reports trail by lag_s
            done = max(self.history[-1][0] + self.lag_s(), ready)
            if self.first_pass_rate:
                done = max(done, ready + self.first_pass_bytes / self.first_pass_rate
                           + self.lag_s())
            return done + REPORT_LAG_S
        cap = self.bucket.rate
        spacing = self.last_packet_wire() / cap if cap > 0 else 0.0
        queued = min(REPORT_LAG_WIRE_BYTES, self.wire_period)
        crossing = queued / self.link.bandwidth_bps if self.link.bandwidth_bps > 0 else 0.0
        loaded = max(self.history[-1][0] + crossing, ready)
        if self.first_pass_rate:
            loaded = max(loaded, ready + self.first_pass_bytes / self.first_pass_rate)
        return loaded + max(CAUGHT_UP_INTERVAL_S - spacing, 0.0)

    def catch_up_s(self) -> float:
        """Until the destination has reported loading everything sent."""
        return max(self.caught_up_at() - self.now, 0.0)

    def page_per_wire(self) -> float:
        return self.page_sent / self.wire_sent if self.wire_sent and self.page_sent else 1.0

    def stop_and_copy_s(self) -> float:
        """Seconds the guest stays stopped: the fixed cost, what is pending at the link's
        rate and, with x-switchover-capped, through the rate limiter's bucket as the live
        phase and the wait before the stop left it (what it holds goes at once, the rest at
        the cap: the COMMIT that ends the downtime waits for the bucket too), the COMMIT /
        ACK round trip."""
        pages = self.pending * self.pages
        seconds = 0.0
        for first_time in (False, True):
            chosen = pages[self.sent_before != first_time].sum()
            if chosen > 0:
                seconds += self.send_time(chosen, self.wire_bytes(chosen, None), first_time,
                                          self.params.switchover_capped)[0]
        return self.link_switchover_s + seconds + self.link.rtt_s

    def record(self, found: int, step: Step) -> dict[str, Any]:
        return {"time": self.now, "iteration": self.iteration, "dirty_pages": found,
                "pending_bytes": self.pending_bytes, "bandwidth": self.bandwidth.bytes_per_s,
                "dirty_rate": self.dirty_pps, "throttle_pct": self.throttle,
                "expected_downtime": (step.expected_downtime_s * 1000
                                      if math.isfinite(step.expected_downtime_s) else None),
                "action": step.action, "reason": step.reason}


def predict(guest: GuestModel, link: LinkModel, params: MigrationParameters | None = None, *,
            bins: int = BINS, horizon_s: float = HORIZON_S) -> Prediction:
    """Run the model of ``guest`` over ``link`` with ``params`` until the policy switches over
    or gives up, or until it is clear it never will."""
    params = params or MigrationParameters()
    state = _State(guest, link, params, bins)
    best_expected, stalled = math.inf, 0
    adjustable = bool(params.capabilities.get("auto-converge")
                      or params.capabilities.get("dirty-limit"))
    trace: list[dict[str, Any]] = []
    previous_sync = 0.0
    while True:
        state.bandwidth.cap(round(params.max_bandwidth * state.page_per_wire()))
        found = state.sync()
        state.iteration += 1
        # the log's count over the time since the previous sync, the pass and any wait in it
        state.period = max(state.now - previous_sync, 1e-6) if state.iteration > 1 else 1e-6
        previous_sync = state.now
        state.dirty_pps = state.logged.add(state.now, state.period, found)
        dirtied = state.dirty_pps * state.period * guest.page_size
        state.own_rate_bps = state.own.update(dirtied / state.period, state.throttle,
                                              state.period)
        state.closed = state.trigger.add(state.now, round(state.page_sent),
                                         found * guest.page_size)
        step = ask_policy(state, params)
        state.hot_periods = step.hot_periods
        trace.append(state.record(found, step))
        if step.throttle_pct != state.throttle:
            state.throttle = step.throttle_pct
            state.throttle_peak = max(state.throttle_peak, state.throttle)
        state.dirty_limits = step.dirty_limits
        if step.action == "switchover":
            downtime = state.stop_and_copy_s()
            page_left = (state.pending * state.pages).sum()
            state.page_sent += page_left * guest.page_size
            state.wire_sent += state.wire_bytes(page_left, None)
            return _result(state, "completed", step, downtime, trace)
        if step.action == "cancel":
            return _result(state, "cancelled", step, math.nan, trace)
        if step.wait_s > 0:
            state.advance(step.wait_s)
            state.bandwidth.observe(state.now, round(state.page_sent))
            state.sent_period = 0.0
            continue
        if state.now >= horizon_s:
            return _result(state, "does-not-converge", step, math.nan, trace)
        if step.expected_downtime_s < best_expected * 0.999:
            best_expected, stalled = step.expected_downtime_s, 0
        elif step.reason.startswith("held") and state.backlog() > 0:
            pass  # held for a destination still loading: its catching up ends that
        elif not adjustable or state.throttle >= params.throttle_max_pct:
            stalled += 1
            if stalled >= STALL_SYNCS and not _limits_pending(params):
                return _result(state, "does-not-converge", step, math.nan, trace)
        began = state.now
        state.send_pass(_slice_s(params))
        state.advance(_held_wait_s(state, step.held, began) if step.held is not None
                      else _behind_wait_s(state, began))
        state.bandwidth.observe(state.now, round(state.delivered()))
        state.source_rate.observe(state.busy_s, round(state.page_sent))


def _limits_pending(params: MigrationParameters) -> bool:
    """A limit (time, iterations, bytes) would end a stalled migration: run the model to it."""
    return bool(params.max_iterations or params.max_total_time_ms or params.max_bytes_ratio)


def _result(state: _State, status: str, step: Step, downtime: float,
            trace: list) -> Prediction:
    total = float(state.now + (downtime if math.isfinite(downtime) else 0.0))
    return Prediction(status=status, converges=status == "completed"
                      and step.reason == "fits-limit", reason=step.reason, total_s=total,
                      downtime_s=float(downtime),
                      expected_downtime_s=float(step.expected_downtime_s),
                      bytes_sent=round(state.wire_sent), page_bytes_sent=round(state.page_sent),
                      passes=state.iteration, throttle_peak_pct=state.throttle_peak,
                      trace=trace)


def load_guest(path: str | os.PathLike, ram_bytes: int | None = None,
               **overrides: Any) -> GuestModel:
    """A guest model from a file: a saved model (:meth:`GuestModel.to_dict` as JSON), a saved
    ``query-dirty-rate`` answer (``pymig dirtyrate --json``; needs ``ram_bytes``), or a
    migration's trace (JSON lines; needs ``ram_bytes``)."""
    from pymig.stats import read_trace

    text = open(path, encoding="utf-8").read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "write_rate_pps" in data:
        return GuestModel.from_dict({**data, **overrides})
    if ram_bytes is None:
        raise ValueError(f"{os.fspath(path)}: a measurement or a trace does not say the "
                         f"guest's RAM size; give it (--memory)")
    if isinstance(data, dict) and "working-set" in data:
        return GuestModel.from_dirty_rate(data, ram_bytes, **overrides)
    if isinstance(data, dict) and "return" in data and "working-set" in data["return"]:
        return GuestModel.from_dirty_rate(data["return"], ram_bytes, **overrides)
    return GuestModel.from_trace(read_trace(path), ram_bytes, **overrides)

