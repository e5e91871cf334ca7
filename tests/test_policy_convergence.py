"""Whole migrations in a fluid model: what the throttle modes buy a guest that dirties fast.

The model: each iteration sends the whole dirty set over a fixed-bandwidth link; meanwhile the
guest writes ``rate * (1 - throttle)`` pages/s uniformly at random over its working set, so the
pages dirty at the next sync are ``W * (1 - exp(-writes / W))``.  Its bitmap count saturates at
the working set, like KVM's dirty log does; per-vCPU rates, when given, are the true write rates.
No clock and no guest: model seconds only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pymig.estimate import TriggerPeriod
from pymig.policy import Action, Metrics, PolicyParams, decide

PAGE = 4096
GIB = 1 << 30


@dataclass
class Outcome:
    action: Action
    reason: str
    seconds: float
    throttles: list[int]


def migrate(params: PolicyParams, *, ram=2 * GIB, working_set=GIB, pages_per_s=630_000,
            bandwidth=100e6, vcpus=2, true_rates=True, horizon_s=600.0) -> Outcome:
    ws_pages = working_set // PAGE
    pending, elapsed, sent_total, throttle, iteration = ram, 0.0, 0, 0, 0
    throttles = []
    trigger, hot_periods = TriggerPeriod(), 0  # the step throttle's periods, in model seconds
    trigger.begin(0.0, 0)
    while elapsed < horizon_s:
        period = max(pending / bandwidth, 0.1)
        writes = pages_per_s * (1 - throttle / 100) * period
        dirtied = int(ws_pages * (1 - math.exp(-writes / ws_pages))) * PAGE
        sent = pending
        elapsed += period
        sent_total += sent
        iteration += 1
        pending = dirtied
        own = pages_per_s * (1 - throttle / 100) / vcpus
        closed = trigger.add(elapsed, sent_total, dirtied)
        m = Metrics(iteration=iteration, elapsed_s=elapsed, ram_bytes=ram, page_size=PAGE,
                    pending_bytes=pending, bandwidth_bps=bandwidth, dirty_rate_bps=dirtied / period,
                    bytes_sent_total=sent_total, bytes_sent_period=sent,
                    bytes_dirtied_period=dirtied, throttle_pct=throttle,
                    vcpu_dirty_rates=(own,) * vcpus if true_rates else None,
                    period_sent_bytes=closed[0] if closed else None,
                    period_dirtied_bytes=closed[1] if closed else 0, hot_periods=hot_periods)
        d = decide(m, params)
        hot_periods = d.hot_periods
        if d.action != Action.CONTINUE:
            return Outcome(d.action, d.reason, elapsed, throttles)
        throttle = d.throttle_pct
        throttles.append(throttle)
    raise AssertionError(f"no decision within {horizon_s} model seconds: {throttles}")


def test_fast_dirtier_moves_within_a_minute_with_aim_but_not_with_steps():
    aim = migrate(PolicyParams(auto_converge=True, throttle_mode="aim"))
    step = migrate(PolicyParams(auto_converge=True, throttle_mode="step"))
    assert (aim.action, aim.reason) == (Action.SWITCHOVER, "fits-limit")
    assert aim.seconds < 60 < step.seconds
    assert aim.throttles[1] == 99  # one step from the measured rate, not ten
    # QEMU's steps: 20, then +10 at a time up to 99, each after two hot periods
    rises = [b for a, b in zip([0] + step.throttles, step.throttles) if b != a]
    assert rises == [20, 30, 40, 50, 60, 70, 80, 90, 99]


def test_aim_from_a_saturated_bitmap_alone_is_never_slower_than_steps():
    aim = migrate(PolicyParams(auto_converge=True, throttle_mode="aim"), true_rates=False)
    step = migrate(PolicyParams(auto_converge=True, throttle_mode="step"), true_rates=False)
    assert aim.reason == step.reason == "fits-limit"
    assert aim.seconds < step.seconds


def test_without_auto_converge_only_a_limit_ends_it():
    out = migrate(PolicyParams(max_total_time_s=120, limit_action="cancel"))
    assert (out.action, out.reason) == (Action.CANCEL, "cancelled-by-limit: max_total_time_s")
    assert set(out.throttles) == {0}


def test_a_slow_dirtier_converges_unthrottled():
    out = migrate(PolicyParams(auto_converge=True, throttle_mode="aim"), pages_per_s=2_000)
    assert out.reason == "fits-limit" and set(out.throttles) == {0}
