"""Convergence: the whole rule, pure, from the metrics of one sync to what the migration does next.

After each dirty-log sync the migration thread measures a :class:`Metrics` snapshot and asks
:func:`next_step`, which answers with a :class:`Step`: the :class:`Move` to make, why, and the
estimate's :class:`Decision` (the vCPU throttle and dirty caps to have in force, the downtime
it expects).  Between two passes :func:`behind_wait_s` says how long to wait for a destination
that is behind.  Nothing here reads a clock, keeps state from call to call (what is counted
across syncs comes in with the metrics and goes out with the step) or touches the guest, so
every rule is tested with synthetic numbers, a model can run the same rule a migration runs,
and a user can swap in an estimate of their own with :func:`decide`'s signature
(:data:`Policy`): the holds and the waits below apply to its verdict as to the default one.

The estimate's verdict (:func:`decide`), in order (the first that holds decides):

1. **fits-limit** - the expected downtime ``switchover_s + (pending_bytes - resend_bytes +
   in_flight_bytes) / bandwidth_bps + resend_bytes / stopped_bandwidth_bps``
   (:attr:`Metrics.expected_downtime_s`: re-sends go at the stop-and-copy's own rate) is
   within ``downtime_limit_s``:
   switch over.  Nothing pending or in flight means the fixed cost ``switchover_s``; bytes to
   send with no bandwidth estimate (0) mean "unknown" (``math.inf``) and never fit.
2. **manual** - the user asked for switchover now: switch over, whatever the estimate.
3. **a limit** - ``max_iterations``, ``max_total_time_s`` or ``max_bytes_ratio`` (bytes sent
   over RAM size) is reached: ``limit_action`` says whether to switch over anyway
   (``forced-by-limit: <limit>``) or give up (``cancelled-by-limit: <limit>``).
4. **keep iterating** - ``converging`` with the current throttle, unless auto-converge or a
   dirty limit is on and the guest is found dirtying more than ``throttle_trigger_threshold``
   of what was sent, then ``throttling: ...`` with a new throttle (or the caps):

   * ``step`` (the default; QEMU's ``migration_trigger_throttle`` and
     ``mig_throttle_guest_down``): the comparison is made over trigger periods of at least a
     second (:attr:`Metrics.period_sent_bytes`, ``None`` on the syncs in between), and the
     throttle rises on the second hot period since it last rose (QEMU's
     ``dirty_rate_high_cnt``: :attr:`Metrics.hot_periods` in, :attr:`Decision.hot_periods`
     out): first to ``throttle_initial_pct``, then by ``throttle_increment_pct``, never above
     ``throttle_max_pct`` and never lowered while the migration runs.  With
     ``throttle_tailslow`` an increment is at most what brings the guest's share of CPU to
     the one that would dirty exactly the threshold (``cpu-throttle-tailslow``).
   * ``aim`` (pymig's own, ``x-cpu-throttle-mode aim``): take the guest's unthrottled dirty
     rate ``D = dirty_rate / (1 - throttle)`` (dirtying scales with vCPU run time; or
     ``own_dirty_rate_bps``, the recent peak of that, when higher) and pick the smallest ``t``
     with ``D * (1 - t) <= throttle_aim_margin * bandwidth``, clamped to
     ``[throttle_initial_pct, throttle_max_pct]``; recomputed at every sync from the period's
     bytes, so it corrects itself up or down.  In the fluid model of
     tests/test_policy_convergence.py a guest dirtying 630k pages/s (2.6 GB/s) over a
     100 MB/s link gets 99 % at once, where steps take minutes; a guest whose rate was
     overestimated is stopped nearly dead meanwhile.  Without a bandwidth estimate it steps.
   * with ``dirty_limit_pages_per_s`` set, each vCPU is capped at that dirty rate instead of
     being time-throttled (QEMU's dirty-limit), on the first sync whose period was hot; once
     on, the caps stay on.

What the migration does with it (:func:`next_step`), in order:

5. **cancel** - the verdict cancels: the migration ends, the guest runs on here.
6. **iterate** / **throttle** - the verdict continues: send another pass (or slice) with the
   guest running; ``throttle`` when it changed the throttle or turned the caps on.
7. **resend** - a switchover the estimate allowed (``fits-limit``; never one the user or a
   limit forced) right after a catch-up wait (step 9) whose expected downtime grew
   :data:`RESEND_GROWTH` times over the one decided before the wait: what the guest dirtied
   during the wait goes once more with the guest running (the destination holds those pages,
   so they cost it no first touch), at most :data:`MAX_PASSES_AFTER_WAIT` times.
8. **hold** - a switchover the estimate allowed waits for another pass while (a) the first
   pass over RAM, or a travelling disk's bulk phase, is not through (:attr:`Metrics.swept`,
   as QEMU's block migration holds it through the bulk phase: a page never sent costs the
   destination a first touch of fresh memory, whose rate a VM host varies widely from one
   region to the next, docs/performance.md: the estimate is not trusted with it), or (b) the
   destination is further behind than it loads in the downtime expected
   (:func:`keep_sending`: waiting for it would take longer than the downtime, with the guest
   writing all along).
9. **wait** - any other switchover, while the destination has not loaded everything sent
   (:attr:`Metrics.caught_up`; always true one way): the guest stops only once it has, so
   that no backlog is loaded inside the downtime.  The guest dirties pages meanwhile, so the
   thread syncs and asks again after the wait, with nothing sent in between, the dirty rate
   held at least at the one last measured and ``expected_before_wait_s`` set (step 7).
10. **switchover** - otherwise: stop the guest and copy what is left.

Between two passes (:func:`behind_wait_s`): with a return path, a pass that sent less than the
destination's backlog and took less than :data:`BEHIND_PERIOD_S` waits for the destination's
next report before the next sync: syncing again at once finds little and takes CPU the
destination needs.  A pass held for a destination far behind (step 8, b) waits longer
(:func:`held_wait`): until the destination is no further behind than it loads in the downtime
expected, or until the guest has dirtied what makes that downtime :data:`RESEND_GROWTH` times
longer, whichever comes first; so a guest that dirties little waits out a slow destination in
one pass or a few, where a sync every :data:`BEHIND_PERIOD_S` would find a few pages each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum


class Action(StrEnum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    CANCEL = "cancel"


@dataclass(frozen=True)
class Metrics:
    """What the migration thread knows right after a dirty-log sync.

    Rates are measured over the last period (between the previous sync and this one) with the
    current throttle in force.
    """

    iteration: int  # syncs since setup: one per pass over RAM, or per 100 ms slice while a
    # throttling capability is on (pymig.migration.iteration_slice_s)
    elapsed_s: float  # since the migration started
    ram_bytes: int  # guest RAM size
    page_size: int  # bytes
    # Every byte figure but bytes_sent_total counts page bytes (pages x page size), whatever
    # the pages take on the wire (a zero page a few bytes, a compressed one a few dozen).
    pending_bytes: int  # dirty bytes still to send
    bandwidth_bps: float  # bytes/s the migration moves to the destination (0 = unknown)
    dirty_rate_bps: float  # bytes/s the guest dirtied
    bytes_sent_total: int  # on the wire, since the start
    bytes_sent_period: int  # page bytes sent since the last sync
    bytes_dirtied_period: int
    throttle_pct: int = 0  # the throttle in force now
    switchover_s: float = 0.0  # fixed cost of a switchover (pymig.estimate.SwitchoverCost)
    own_dirty_rate_bps: float = 0.0  # the guest's unthrottled rate, recent peak (DirtyRate)
    # The step throttle's trigger period (pymig.estimate.TriggerPeriod): on the sync that closes
    # one, the page bytes sent and the bytes the guest dirtied over it (None on the syncs in
    # between), and the hot periods since the throttle last rose (QEMU's dirty_rate_high_cnt)
    period_sent_bytes: int | None = None
    period_dirtied_bytes: int = 0
    hot_periods: int = 0
    in_flight_bytes: int = 0  # sent, not yet taken in by the destination (as page bytes)
    vcpu_dirty_rates: tuple[float, ...] | None = None  # pages/s per vCPU, when known
    manual_switchover_requested: bool = False
    dirty_limited: bool = False  # per-vCPU dirty caps are in force
    # Of pending_bytes, those the destination holds an older copy of (re-sends), and the rate
    # the stop-and-copy moves them at: with no first touch to wait on and the guest no longer
    # competing for CPU (pymig.estimate: StopSpeedup, the source rate; 0 = bandwidth_bps).
    # Pages sent for the first time may wait on the destination's first touch of fresh
    # memory: they count at bandwidth_bps.
    resend_bytes: int = 0
    stopped_bandwidth_bps: float = 0.0
    # What the holds and the catch-up wait weigh (steps 7-9 of the rule); their defaults are
    # a migration with nothing to hold for: the first pass through, the destination caught up
    backlog_bytes: int = 0  # sent, not yet loaded by the destination (as page bytes)
    swept: bool = True  # the first pass over RAM, and every disk's bulk phase, is through
    caught_up: bool = True  # the destination has loaded everything sent (always, one way)
    expected_before_wait_s: float = math.inf  # the downtime the decision before a catch-up
    # wait expected, on the sync right after that wait (math.inf on every other sync)
    passes_after_wait: int = 0  # resend passes so far in this migration

    @property
    def expected_downtime_s(self) -> float:
        """Seconds the guest would stay stopped if it stopped now: the fixed switchover cost,
        then sending what is pending and what the destination still has to take in;
        ``math.inf`` when that is unknown."""
        pending = max(self.pending_bytes, 0)
        resend = min(max(self.resend_bytes, 0), pending)
        live = pending - resend + max(self.in_flight_bytes, 0)
        if live + resend <= 0:
            return self.switchover_s
        stopped = self.stopped_bandwidth_bps or self.bandwidth_bps
        if not (self.bandwidth_bps > 0 and stopped > 0) or math.isinf(self.bandwidth_bps):
            return math.inf
        return self.switchover_s + live / self.bandwidth_bps + resend / stopped


@dataclass
class PolicyParams:
    """The knobs of :func:`decide`; defaults follow QEMU's where QEMU has one."""

    downtime_limit_s: float = 0.300
    auto_converge: bool = False
    throttle_initial_pct: int = 20
    throttle_increment_pct: int = 10
    throttle_max_pct: int = 99
    throttle_trigger_threshold: float = 0.5  # bytes dirtied / bytes sent, per period
    throttle_tailslow: bool = False  # step: smaller increments near the threshold (QEMU's)
    throttle_mode: str = "step"  # "step" (QEMU's) | "aim" (pymig's own)
    throttle_aim_margin: float = 0.5  # aim: share of bandwidth the throttled dirty rate may use
    dirty_limit_pages_per_s: int | None = None  # per vCPU; instead of time throttling
    max_iterations: int | None = None
    max_total_time_s: float | None = None
    max_bytes_ratio: float | None = None  # bytes sent / RAM size
    limit_action: str = "switchover"  # "switchover" | "cancel"

    def __post_init__(self) -> None:
        if not self.downtime_limit_s >= 0:
            raise ValueError(f"downtime_limit_s must be >= 0, not {self.downtime_limit_s}")
        if not 0 <= self.throttle_initial_pct <= self.throttle_max_pct <= 99:
            raise ValueError("need 0 <= throttle_initial_pct <= throttle_max_pct <= 99, got "
                             f"{self.throttle_initial_pct} and {self.throttle_max_pct}")
        if self.throttle_increment_pct < 1:
            raise ValueError("throttle_increment_pct must be at least 1")
        if not self.throttle_trigger_threshold > 0:
            raise ValueError("throttle_trigger_threshold must be > 0")
        if self.throttle_mode not in ("step", "aim"):
            raise ValueError(f"throttle_mode is 'step' or 'aim', not {self.throttle_mode!r}")
        if not 0 < self.throttle_aim_margin <= 1:
            raise ValueError("throttle_aim_margin must be in (0, 1]")
        if self.dirty_limit_pages_per_s is not None and self.dirty_limit_pages_per_s < 1:
            raise ValueError("dirty_limit_pages_per_s must be at least 1 page/s")
        for name in ("max_iterations", "max_total_time_s", "max_bytes_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or None for no limit), not {value}")
        if self.limit_action not in ("switchover", "cancel"):
            raise ValueError(f"limit_action is 'switchover' or 'cancel', not "
                             f"{self.limit_action!r}")


@dataclass(frozen=True)
class Decision:
    """What to do after this sync.

    ``throttle_pct`` is the vCPU throttle to have in force while the migration goes on (the
    current one when unchanged; the migration lifts it when it ends).  ``vcpu_dirty_limits``
    is None (no caps) or one cap in pages/s per vCPU, in ``Metrics.vcpu_dirty_rates`` order (a
    single cap for every vCPU when the metrics carry no per-vCPU rates).
    ``expected_downtime_s`` is ``math.inf`` when unknown.  ``hot_periods`` is what the next
    sync's :attr:`Metrics.hot_periods` should be.
    """

    action: Action
    reason: str
    throttle_pct: int
    vcpu_dirty_limits: tuple[int, ...] | None
    expected_downtime_s: float
    hot_periods: int = 0


Policy = Callable[[Metrics, PolicyParams], Decision]


def decide(metrics: Metrics, params: PolicyParams) -> Decision:
    """The convergence rule of the module docstring."""
    expected = metrics.expected_downtime_s
    throttle = min(max(metrics.throttle_pct, 0), params.throttle_max_pct)
    caps = _dirty_caps(metrics, params) if metrics.dirty_limited else None

    def finish(action: Action, reason: str, new_throttle: int = throttle,
               hot_periods: int = metrics.hot_periods) -> Decision:
        return Decision(action, reason, new_throttle, caps, expected, hot_periods)

    if expected <= params.downtime_limit_s:
        return finish(Action.SWITCHOVER, "fits-limit")
    if metrics.manual_switchover_requested:
        return finish(Action.SWITCHOVER, "manual")
    limit = _limit_reached(metrics, params)
    if limit is not None:
        if params.limit_action == "cancel":
            return finish(Action.CANCEL, f"cancelled-by-limit: {limit}")
        return finish(Action.SWITCHOVER, f"forced-by-limit: {limit}")
    if not params.auto_converge and params.dirty_limit_pages_per_s is None:
        return finish(Action.CONTINUE, "converging")

    hot = trigger_hot(metrics.bytes_sent_period, metrics.bytes_dirtied_period, params)
    if params.dirty_limit_pages_per_s is not None:
        if metrics.dirty_limited or not hot:
            return finish(Action.CONTINUE, "converging")
        return Decision(Action.CONTINUE,
                        f"throttling: dirty limit {params.dirty_limit_pages_per_s} pages/s per "
                        f"vCPU ({_hot_text(metrics)})",
                        throttle, _dirty_caps(metrics, params), expected)
    if params.throttle_mode == "aim":
        if (hot or throttle > 0) and metrics.bandwidth_bps > 0:
            new, raw_rate = aim_throttle(metrics, params)
            if hot:  # still losing ground: the rate was underestimated, never less than a step
                new = max(new, step_throttle(throttle, params))
            return finish(Action.CONTINUE, f"throttling: aim {throttle}% -> {new}% (unthrottled "
                          f"dirty rate {_rate(raw_rate)}, bandwidth "
                          f"{_rate(metrics.bandwidth_bps)})", new)
        if not hot:
            return finish(Action.CONTINUE, "converging")
        new = step_throttle(throttle, params)
        return finish(Action.CONTINUE, f"throttling: step {throttle}% -> {new}% "
                                       f"({_hot_text(metrics)})", new)

    # step, QEMU's way: over trigger periods, on the second hot one
    sent, dirtied = metrics.period_sent_bytes, metrics.period_dirtied_bytes
    if sent is None or not trigger_hot(sent, dirtied, params):
        return finish(Action.CONTINUE, "converging")
    hot_periods = max(metrics.hot_periods, 0) + 1
    if hot_periods < HOT_PERIODS_PER_STEP:
        return finish(Action.CONTINUE, "converging", hot_periods=hot_periods)
    new = step_throttle(throttle, params, sent, dirtied)
    return finish(Action.CONTINUE, f"throttling: step {throttle}% -> {new}% (hot period "
                                   f"{hot_periods} of {HOT_PERIODS_PER_STEP}: dirtied {dirtied} "
                                   f"B while sending {sent} B)", new, hot_periods=0)


class Move(StrEnum):
    """What the migration thread does after a sync (steps 5-10 of the rule)."""

    ITERATE = "iterate"  # another pass (or slice) with the guest running
    THROTTLE = "throttle"  # the same, with a new throttle or the dirty caps turned on
    RESEND = "resend"  # another pass, of what the guest dirtied during a catch-up wait
    HOLD = "hold"  # another pass: a switchover the estimate allowed is not trusted yet
    WAIT = "wait"  # until the destination has loaded everything sent; then sync, ask again
    SWITCHOVER = "switchover"  # stop the guest, copy what is left
    CANCEL = "cancel"


@dataclass(frozen=True)
class Step:
    """The answer to one sync: the move, why, and the estimate's verdict it came from (whose
    throttle and caps are to be in force whatever the move)."""

    move: Move
    reason: str
    decision: Decision


class Held(Enum):
    """Why a switchover the estimate allowed waits for another pass (:func:`switchover_held`)."""

    RESEND = "what the guest dirtied during a long catch-up wait goes once more first"
    FIRST_PASS = "the first pass over RAM is not through"
    BEHIND = "the destination is further behind than it loads in the downtime expected"


#: A switchover decided right after a catch-up wait waits for one more pass instead when the
#: downtime it expects grew this many times over the one decided before the wait ...
RESEND_GROWTH = 2.0
#: ... at most this many times in a migration.
MAX_PASSES_AFTER_WAIT = 1
#: While the destination is behind, passes are at least this long (waiting for its reports).
BEHIND_PERIOD_S = 0.01


def next_step(metrics: Metrics, params: PolicyParams, decide: Policy = decide) -> Step:
    """The whole rule of the module docstring: ``decide``'s verdict on ``metrics`` (steps
    1-4), then what to do with it (steps 5-10)."""
    decision = decide(metrics, params)
    if decision.action == Action.CANCEL:
        return Step(Move.CANCEL, decision.reason, decision)
    if decision.action == Action.CONTINUE:
        changed = (decision.throttle_pct != metrics.throttle_pct
                   or (decision.vcpu_dirty_limits is not None) != metrics.dirty_limited)
        return Step(Move.THROTTLE if changed else Move.ITERATE, decision.reason, decision)
    held = switchover_held(decision, metrics)
    if held is Held.RESEND:
        return Step(Move.RESEND, held.value, decision)
    if held is not None:
        return Step(Move.HOLD, held.value, decision)
    if not metrics.caught_up:
        return Step(Move.WAIT, "the destination has yet to load everything sent", decision)
    return Step(Move.SWITCHOVER, decision.reason, decision)


def switchover_held(decision: Decision, metrics: Metrics) -> Held | None:
    """Why the switchover ``decision`` should wait for another pass with the guest running
    (steps 7 and 8), or None to go ahead.  Only one the estimate allowed ("fits-limit")
    waits, never one a limit or the user forced."""
    if decision.action != Action.SWITCHOVER or decision.reason != "fits-limit":
        return None
    if resend_first(decision, metrics.expected_before_wait_s, metrics.passes_after_wait):
        return Held.RESEND
    if not metrics.swept:
        return Held.FIRST_PASS
    if not metrics.caught_up and keep_sending(decision, metrics.backlog_bytes,
                                              metrics.bandwidth_bps):
        return Held.BEHIND
    return None


def resend_first(decision: Decision, expected_before_wait: float,
                 passes_after_wait: int) -> bool:
    """Whether a switchover decided right after a catch-up wait (``expected_before_wait``: the
    downtime expected when the wait began; ``math.inf`` when there was no wait) should wait
    for one more pass.  Only one the estimate allowed, not one a limit or the user forced;
    only when the pages the guest dirtied during the wait made the expected downtime grow
    :data:`RESEND_GROWTH` times; at most :data:`MAX_PASSES_AFTER_WAIT` times."""
    return (decision.reason == "fits-limit" and passes_after_wait < MAX_PASSES_AFTER_WAIT
            and decision.expected_downtime_s > RESEND_GROWTH * expected_before_wait)


def keep_sending(decision: Decision, backlog_bytes: int, bandwidth_bps: float) -> bool:
    """Whether a switchover the estimate allowed (not one a limit or the user forced) should
    wait while the source goes on sending: the destination has more to load than it loads in
    the downtime expected.  Not while it has loaded nothing yet (building its guest, say):
    how long that takes is anyone's guess, and the catch-up wait is there for it."""
    if decision.reason != "fits-limit" or backlog_bytes <= 0 or bandwidth_bps <= 0:
        return False
    return backlog_bytes / bandwidth_bps > decision.expected_downtime_s


@dataclass(frozen=True)
class HeldWait:
    """How long a pass held for a destination far behind waits for it (:func:`held_wait`)."""

    backlog_bytes: int  # until the destination is behind by no more than this (page bytes)
    at_most_s: float  # ... or this long after the sync the pass began at (math.inf: no bound)


def held_wait(decision: Decision, metrics: Metrics) -> HeldWait:
    """The wait after a pass held because the destination is further behind than it loads in
    the downtime ``decision`` expects (:attr:`Held.BEHIND`): until it is no further behind
    than that, at most as long as the guest (at the rate of ``metrics``) takes to dirty what
    would add ``RESEND_GROWTH - 1`` times that downtime at the stop-and-copy's rate, and at
    least :data:`BEHIND_PERIOD_S`.  A guest that dirties nothing waits for the destination."""
    expected = decision.expected_downtime_s
    bandwidth = max(metrics.bandwidth_bps, 0.0)
    target = int(expected * bandwidth) if math.isfinite(expected) else 0
    if metrics.dirty_rate_bps <= 0:
        return HeldWait(target, math.inf)
    stopped = metrics.stopped_bandwidth_bps or bandwidth
    room = (RESEND_GROWTH - 1) * expected * stopped if math.isfinite(expected) else 0.0
    return HeldWait(target, max(room / metrics.dirty_rate_bps, BEHIND_PERIOD_S))


def behind_wait_s(backlog_bytes: int, sent_bytes: int, pass_s: float) -> float:
    """How long to wait for the destination's next report after a pass that sent
    ``sent_bytes`` in ``pass_s`` seconds, with ``backlog_bytes`` not yet loaded there: until
    the pass has lasted :data:`BEHIND_PERIOD_S` when the destination is further behind than the
    pass sent, else 0 (a return path's reports only: one way, nothing tells)."""
    if backlog_bytes > max(sent_bytes, 0) and pass_s < BEHIND_PERIOD_S:
        return BEHIND_PERIOD_S - pass_s
    return 0.0


#: QEMU's auto-converge acts on the second period found hot since it last acted.
HOT_PERIODS_PER_STEP = 2


def trigger_hot(sent_bytes: int, dirtied_bytes: int, params: PolicyParams) -> bool:
    """Whether a period in which ``sent_bytes`` were sent and the guest dirtied
    ``dirtied_bytes`` calls for a throttle: it dirtied more than the threshold's share of what
    was sent (never on nothing sent: 0/0 is no evidence)."""
    return sent_bytes > 0 and dirtied_bytes > params.throttle_trigger_threshold * sent_bytes


def step_throttle(current_pct: int, params: PolicyParams, sent_bytes: int = 0,
                  dirtied_bytes: int = 0) -> int:
    """QEMU's step: start at the initial throttle, then add the increment up to the maximum.

    With ``throttle_tailslow``, an increment is at most what takes the guest's CPU share from
    ``100 - current`` to the share that would have dirtied only the threshold's part of the
    ``sent_bytes`` (QEMU's ``cpu_ideal``), so steps shrink as the guest nears the threshold."""
    if current_pct <= 0:
        return params.throttle_initial_pct
    increment = params.throttle_increment_pct
    if params.throttle_tailslow and dirtied_bytes > 0:
        cpu_now = 100 - current_pct
        threshold_bytes = sent_bytes * params.throttle_trigger_threshold
        cpu_ideal = int(cpu_now * threshold_bytes / dirtied_bytes)
        increment = max(min(cpu_now - cpu_ideal, increment), 0)
    return min(current_pct + increment, params.throttle_max_pct)


def aim_throttle(metrics: Metrics, params: PolicyParams) -> tuple[int, float]:
    """The throttle (percent) that fits the guest's dirty rate into the margin of bandwidth,
    and the unthrottled dirty rate (bytes/s) it was computed from."""
    current = min(max(metrics.throttle_pct, 0), 99) / 100
    measured = metrics.dirty_rate_bps
    if metrics.vcpu_dirty_rates:
        measured = max(measured, sum(metrics.vcpu_dirty_rates) * metrics.page_size)
    raw_rate = max(measured / (1 - current), metrics.own_dirty_rate_bps)
    budget = params.throttle_aim_margin * metrics.bandwidth_bps
    needed = 1 - budget / raw_rate if raw_rate > 0 else 0.0
    pct = math.ceil(needed * 100 - 1e-9)  # round up: a throttle just short does not fit
    return min(max(pct, params.throttle_initial_pct), params.throttle_max_pct), raw_rate


def _limit_reached(m: Metrics, p: PolicyParams) -> str | None:
    if p.max_iterations is not None and m.iteration >= p.max_iterations:
        return "max_iterations"
    if p.max_total_time_s is not None and m.elapsed_s >= p.max_total_time_s:
        return "max_total_time_s"
    if (p.max_bytes_ratio is not None and m.ram_bytes > 0
            and m.bytes_sent_total >= p.max_bytes_ratio * m.ram_bytes):
        return "max_bytes_ratio"
    return None


def _dirty_caps(m: Metrics, p: PolicyParams) -> tuple[int, ...] | None:
    if p.dirty_limit_pages_per_s is None:
        return None
    vcpus = len(m.vcpu_dirty_rates) if m.vcpu_dirty_rates else 1
    return (p.dirty_limit_pages_per_s,) * vcpus


def _hot_text(m: Metrics) -> str:
    return f"dirtied {m.bytes_dirtied_period} B while sending {m.bytes_sent_period} B"


def _rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:.1f} MB/s"
