"""The convergence rule on synthetic metrics."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymig.policy import (HOT_PERIODS_PER_STEP, Action, Decision, Metrics, PolicyParams,
                          aim_throttle, decide)

MB = 1_000_000
PAGE = 4096


def metrics(**changes) -> Metrics:
    """A guest mid-migration: 1 GB RAM, 100 MB/s link, 100 MB pending (1 s > 0.3 s)."""
    base = Metrics(iteration=3, elapsed_s=30.0, ram_bytes=1000 * MB, page_size=PAGE,
                   pending_bytes=100 * MB, bandwidth_bps=100 * MB, dirty_rate_bps=40 * MB,
                   bytes_sent_total=1500 * MB, bytes_sent_period=100 * MB,
                   bytes_dirtied_period=40 * MB)
    return replace(base, **changes)


def test_switches_over_when_the_expected_downtime_fits():
    d = decide(metrics(pending_bytes=20 * MB), PolicyParams())
    assert d.action == Action.SWITCHOVER and d.reason == "fits-limit"
    assert d.expected_downtime_s == pytest.approx(0.2)


def test_continues_when_it_does_not_fit():
    d = decide(metrics(), PolicyParams())
    assert (d.action, d.reason, d.throttle_pct) == (Action.CONTINUE, "converging", 0)
    assert d.expected_downtime_s == pytest.approx(1.0)
    assert decide(metrics(), PolicyParams(downtime_limit_s=1.0)).action == Action.SWITCHOVER


def test_nothing_pending_fits_even_with_unknown_bandwidth():
    d = decide(metrics(pending_bytes=0, bandwidth_bps=0), PolicyParams())
    assert (d.action, d.reason, d.expected_downtime_s) == (Action.SWITCHOVER, "fits-limit", 0.0)


def test_expected_downtime_counts_the_fixed_cost_and_what_is_in_flight():
    m = metrics(pending_bytes=20 * MB, in_flight_bytes=5 * MB, switchover_s=0.004)
    assert m.expected_downtime_s == pytest.approx(0.004 + 0.25)
    assert metrics(pending_bytes=0, switchover_s=0.004).expected_downtime_s == 0.004
    idle = decide(metrics(pending_bytes=0, bandwidth_bps=0, switchover_s=0.004), PolicyParams())
    assert (idle.action, idle.expected_downtime_s) == (Action.SWITCHOVER, 0.004)
    # bytes still in flight need a bandwidth as much as pending ones do
    assert metrics(pending_bytes=0, in_flight_bytes=1, bandwidth_bps=0).expected_downtime_s \
        == math.inf
    # the fixed cost alone can exceed a tiny limit
    tight = decide(metrics(pending_bytes=0, switchover_s=0.004),
                   PolicyParams(downtime_limit_s=0.001))
    assert tight.action == Action.CONTINUE


def test_resends_count_at_the_stop_and_copy_rate_and_fresh_pages_at_the_live_one():
    # 100 MB pending, 60 of them re-sends; live 100 MB/s, stopped 300 MB/s
    m = metrics(resend_bytes=60 * MB, stopped_bandwidth_bps=300 * MB, switchover_s=0.004)
    assert m.expected_downtime_s == pytest.approx(0.004 + 0.4 + 0.2)
    # in-flight bytes wait at the destination at the live rate
    assert replace(m, in_flight_bytes=10 * MB).expected_downtime_s == pytest.approx(0.704)
    # without a stopped rate, everything goes at the live rate; re-sends never exceed pending
    assert replace(m, stopped_bandwidth_bps=0.0).expected_downtime_s == pytest.approx(1.004)
    assert replace(m, resend_bytes=500 * MB).expected_downtime_s == pytest.approx(0.004 + 1 / 3)
    fits = replace(m, pending_bytes=65 * MB)  # 5 MB fresh, 60 MB re-sent: 254 ms
    assert decide(fits, PolicyParams()).action == Action.SWITCHOVER
    assert decide(replace(fits, resend_bytes=0), PolicyParams()).action == Action.CONTINUE


@pytest.mark.parametrize("bandwidth", [0, 0.0, -1.0, math.nan])
def test_unknown_bandwidth_never_switches_over_on_the_estimate(bandwidth):
    d = decide(metrics(pending_bytes=1, bandwidth_bps=bandwidth), PolicyParams(downtime_limit_s=60))
    assert d.action == Action.CONTINUE and d.expected_downtime_s == math.inf


def test_manual_switchover():
    d = decide(metrics(manual_switchover_requested=True), PolicyParams())
    assert (d.action, d.reason) == (Action.SWITCHOVER, "manual")
    fits = decide(metrics(pending_bytes=0, manual_switchover_requested=True), PolicyParams())
    assert fits.reason == "fits-limit"


@pytest.mark.parametrize("limit, value, changes", [
    ("max_iterations", 3, {}),
    ("max_total_time_s", 30.0, {}),
    ("max_bytes_ratio", 1.5, {}),
])
@pytest.mark.parametrize("limit_action", ["switchover", "cancel"])
def test_each_limit_forces_switchover_or_cancels(limit, value, changes, limit_action):
    params = PolicyParams(limit_action=limit_action, **{limit: value})
    d = decide(metrics(**changes), params)
    if limit_action == "switchover":
        assert (d.action, d.reason) == (Action.SWITCHOVER, f"forced-by-limit: {limit}")
    else:
        assert (d.action, d.reason) == (Action.CANCEL, f"cancelled-by-limit: {limit}")
    below = {"max_iterations": {"iteration": 2}, "max_total_time_s": {"elapsed_s": 29.9},
             "max_bytes_ratio": {"bytes_sent_total": 1499 * MB}}[limit]
    assert decide(metrics(**below), params).action == Action.CONTINUE


def test_fitting_beats_a_limit_and_manual_beats_cancel():
    params = PolicyParams(max_iterations=1, limit_action="cancel")
    assert decide(metrics(pending_bytes=MB), params).reason == "fits-limit"
    assert decide(metrics(manual_switchover_requested=True), params).reason == "manual"


HOT = {"bytes_dirtied_period": 80 * MB, "bytes_sent_period": 100 * MB}


def test_no_throttle_without_auto_converge():
    assert decide(metrics(**HOT), PolicyParams()).throttle_pct == 0


PERIOD_HOT = {"period_sent_bytes": 100 * MB, "period_dirtied_bytes": 80 * MB}
PERIOD_CALM = {"period_sent_bytes": 100 * MB, "period_dirtied_bytes": 50 * MB}  # exactly 0.5


def step_through(params: PolicyParams, periods: list[dict], throttle: int = 0) -> list[int]:
    """The throttle after each of ``periods`` (trigger periods closing one sync each), the
    hot-period count carried from one decision to the next as the migration thread does."""
    seen, hot_periods = [], 0
    for period in periods:
        d = decide(metrics(throttle_pct=throttle, hot_periods=hot_periods, **HOT, **period),
                   params)
        assert d.action == Action.CONTINUE
        assert d.reason == "converging" or \
            d.reason.startswith(f"throttling: step {throttle}% -> {d.throttle_pct}% (hot period 2")
        assert d.reason != "converging" or d.throttle_pct == throttle
        throttle, hot_periods = d.throttle_pct, d.hot_periods
        seen.append(throttle)
    return seen


def test_step_is_the_default_and_rises_on_every_second_hot_period_to_99():
    params = PolicyParams(auto_converge=True)
    assert params.throttle_mode == "step"
    assert step_through(params, [PERIOD_HOT] * 22) == [
        0, 20, 20, 30, 30, 40, 40, 50, 50, 60, 60, 70, 70, 80, 80, 90, 90, 99, 99, 99, 99, 99]


def test_step_follows_initial_increment_and_maximum():
    params = PolicyParams(auto_converge=True, throttle_initial_pct=30, throttle_increment_pct=15,
                          throttle_max_pct=80)
    assert step_through(params, [PERIOD_HOT] * 12)[1::2] == [30, 45, 60, 75, 80, 80]


def test_step_counts_hot_periods_not_syncs_and_keeps_the_count_over_calm_ones():
    params = PolicyParams(auto_converge=True)
    # A hot sync that closes no trigger period (period_sent_bytes None) changes nothing.
    d = decide(metrics(**HOT), params)
    assert (d.reason, d.throttle_pct, d.hot_periods) == ("converging", 0, 0)
    d = decide(metrics(throttle_pct=40, hot_periods=1, **HOT), params)
    assert (d.throttle_pct, d.hot_periods) == (40, 1)
    # QEMU's count: a calm period between two hot ones neither acts nor resets it
    assert step_through(params, [PERIOD_HOT, PERIOD_CALM, PERIOD_HOT]) == [0, 0, 20]
    assert step_through(params, [PERIOD_CALM] * 4, throttle=40) == [40] * 4  # never lowered


def test_step_throttle_waits_for_the_trigger_threshold_and_never_lowers():
    params = PolicyParams(auto_converge=True)
    assert decide(metrics(hot_periods=1, **PERIOD_CALM), params).throttle_pct == 0
    d = decide(metrics(throttle_pct=40, hot_periods=1, **PERIOD_CALM), params)
    assert (d.reason, d.throttle_pct) == ("converging", 40)
    # No evidence without bytes sent in the period: never throttle on a 0/0 ratio.
    assert decide(metrics(hot_periods=1, period_sent_bytes=0, period_dirtied_bytes=MB),
                  params).throttle_pct == 0
    lower = PolicyParams(auto_converge=True, throttle_trigger_threshold=0.4)
    assert step_through(lower, [PERIOD_CALM] * 2) == [0, 20]


def test_tailslow_steps_by_at_most_what_brings_the_guest_to_the_threshold():
    params = PolicyParams(auto_converge=True, throttle_tailslow=True)
    # At 40 % the guest runs 60 %; it dirtied 60 MB for a threshold of 50: the ideal share is
    # 60 * 50 / 60 = 50 %, so the step is 10 (the increment)
    near = {"period_sent_bytes": 100 * MB, "period_dirtied_bytes": 60 * MB}
    assert step_through(params, [near] * 2, throttle=40) == [40, 50]
    # just above the threshold: 60 * 50 / 52 = 57.7 -> 57, a step of 3
    nearer = {"period_sent_bytes": 100 * MB, "period_dirtied_bytes": 52 * MB}
    assert step_through(params, [nearer] * 2, throttle=40) == [40, 43]
    # far above it the increment bounds the step, and the first step is the initial one
    assert step_through(params, [PERIOD_HOT] * 4) == [0, 20, 20, 30]
    assert step_through(PolicyParams(auto_converge=True), [nearer] * 2, throttle=40) == [40, 50]


def test_aim_picks_a_throttle_that_fits_the_margin_in_one_step():
    params = PolicyParams(auto_converge=True, throttle_mode="aim")
    m = metrics(dirty_rate_bps=400 * MB, **HOT)  # needs 1 - 50/400 = 87.5 %
    d = decide(m, params)
    assert d.throttle_pct == 88 and d.reason.startswith("throttling: aim")
    assert 400 * MB * (1 - d.throttle_pct / 100) <= 0.5 * 100 * MB


def test_aim_undoes_the_current_throttle_to_find_the_guests_own_rate():
    params = PolicyParams(auto_converge=True, throttle_mode="aim")
    # Measured 100 MB/s at 50 %: the guest's own rate is 200 MB/s, so 75 % is needed.
    d = decide(metrics(throttle_pct=50, dirty_rate_bps=100 * MB, **HOT), params)
    assert d.throttle_pct == 75
    # Per-vCPU rates (pages/s) that say more than the bitmap count win.
    rates = (30_000.0, 20_000.0)  # 50k pages/s = 204.8 MB/s at 50 % -> 409.6 MB/s own rate
    d = decide(metrics(throttle_pct=50, dirty_rate_bps=100 * MB, vcpu_dirty_rates=rates, **HOT),
               params)
    assert d.throttle_pct == 88


def test_aim_relaxes_when_calm_but_not_below_initial():
    params = PolicyParams(auto_converge=True, throttle_mode="aim")
    calm = {"bytes_dirtied_period": 10 * MB, "bytes_sent_period": 100 * MB}
    d = decide(metrics(throttle_pct=90, dirty_rate_bps=2 * MB, **calm), params)
    assert d.throttle_pct == 20
    assert decide(metrics(dirty_rate_bps=2 * MB, **calm), params).throttle_pct == 0


def test_aim_when_hot_does_at_least_a_step_and_steps_without_bandwidth():
    params = PolicyParams(auto_converge=True, throttle_mode="aim")
    # The measured rate says 30 % would do, but the period was hot: at least one step.
    d = decide(metrics(throttle_pct=60, dirty_rate_bps=30 * MB, **HOT), params)
    assert d.throttle_pct == 70
    d = decide(metrics(bandwidth_bps=0, **HOT), params)
    assert d.reason.startswith("throttling: step") and d.throttle_pct == 20


def test_aim_takes_the_held_peak_of_the_guests_own_rate_when_higher():
    params = PolicyParams(auto_converge=True, throttle_mode="aim")
    quiet = metrics(throttle_pct=60, dirty_rate_bps=20 * MB, **HOT)
    assert decide(quiet, params).throttle_pct == 70  # 50 MB/s own, aim, then a step
    held = replace(quiet, own_dirty_rate_bps=400 * MB)
    assert decide(held, params).throttle_pct == 88  # 1 - 50/400, rounded up


def test_aim_clamps_to_the_maximum():
    params = PolicyParams(auto_converge=True, throttle_mode="aim", throttle_max_pct=95)
    assert decide(metrics(dirty_rate_bps=10_000 * MB, **HOT), params).throttle_pct == 95


def test_dirty_limit_caps_each_vcpu_instead_of_throttling():
    params = PolicyParams(auto_converge=True, dirty_limit_pages_per_s=1000)
    d = decide(metrics(vcpu_dirty_rates=(5000.0, 7000.0, 10.0), **HOT), params)
    assert d.vcpu_dirty_limits == (1000, 1000, 1000) and d.throttle_pct == 0
    assert d.reason.startswith("throttling: dirty limit")
    assert decide(metrics(**HOT), params).vcpu_dirty_limits == (1000,)
    # Once on, the caps stay on, calm or not, until the migration ends.
    calm = decide(metrics(dirty_limited=True, vcpu_dirty_rates=(1.0, 1.0)), params)
    assert calm.vcpu_dirty_limits == (1000, 1000) and calm.reason == "converging"
    assert decide(metrics(), params).vcpu_dirty_limits is None
    # A dirty limit is a way to converge of its own: it needs no auto-converge.
    alone = replace(params, auto_converge=False)
    assert decide(metrics(**HOT), alone).vcpu_dirty_limits == (1000,)


@pytest.mark.parametrize("bad", [
    {"throttle_mode": "pid"}, {"limit_action": "ignore"}, {"throttle_max_pct": 100},
    {"throttle_initial_pct": 50, "throttle_max_pct": 40}, {"throttle_increment_pct": 0},
    {"throttle_aim_margin": 0}, {"max_iterations": 0}, {"max_total_time_s": -1},
    {"downtime_limit_s": -0.1}, {"dirty_limit_pages_per_s": 0}, {"throttle_trigger_threshold": 0},
])
def test_params_that_make_no_sense_are_refused(bad):
    with pytest.raises(ValueError):
        PolicyParams(**bad)


counts = st.integers(0, 1 << 40)
rates = st.floats(0, 1e11, allow_nan=False) | st.just(0.0)
any_metrics = st.builds(
    Metrics, iteration=st.integers(0, 1000), elapsed_s=st.floats(0, 1e5), ram_bytes=counts,
    page_size=st.sampled_from([4096, 2 << 20]), pending_bytes=counts, bandwidth_bps=rates,
    dirty_rate_bps=rates, bytes_sent_total=counts, bytes_sent_period=counts,
    bytes_dirtied_period=counts, throttle_pct=st.integers(0, 99),
    vcpu_dirty_rates=st.none() | st.lists(st.floats(0, 1e7), max_size=4).map(tuple),
    manual_switchover_requested=st.booleans(), dirty_limited=st.booleans(),
    period_sent_bytes=st.none() | counts, period_dirtied_bytes=counts,
    hot_periods=st.integers(0, 1))
any_params = st.builds(
    PolicyParams, downtime_limit_s=st.floats(0, 10), auto_converge=st.booleans(),
    throttle_initial_pct=st.integers(0, 50), throttle_max_pct=st.integers(50, 99),
    throttle_increment_pct=st.integers(1, 50), throttle_mode=st.sampled_from(["step", "aim"]),
    throttle_tailslow=st.booleans(),
    throttle_aim_margin=st.floats(0.05, 1), throttle_trigger_threshold=st.floats(0.01, 2),
    dirty_limit_pages_per_s=st.none() | st.integers(1, 10**6),
    max_iterations=st.none() | st.integers(1, 100), max_total_time_s=st.none() | st.floats(1, 1e4),
    max_bytes_ratio=st.none() | st.floats(0.5, 10),
    limit_action=st.sampled_from(["switchover", "cancel"]))


@given(any_metrics, any_params)
def test_invariants(m, p):
    d = decide(m, p)
    assert isinstance(d, Decision)
    assert 0 <= d.throttle_pct <= p.throttle_max_pct
    if d.reason == "fits-limit":
        assert d.action == Action.SWITCHOVER and d.expected_downtime_s <= p.downtime_limit_s
    if d.action == Action.CANCEL:
        assert p.limit_action == "cancel" and d.reason.startswith("cancelled-by-limit: ")
    if m.pending_bytes > 0 and not m.bandwidth_bps > 0:
        assert d.reason != "fits-limit"
    if d.action == Action.CONTINUE:
        assert d.reason == "converging" or d.reason.startswith("throttling: ")
        assert p.auto_converge or d.throttle_pct == min(m.throttle_pct, p.throttle_max_pct)
    if p.auto_converge and p.throttle_mode == "step" and p.dirty_limit_pages_per_s is None:
        # QEMU's steps: never down, and up only by the initial throttle or one increment
        before = min(m.throttle_pct, p.throttle_max_pct)
        assert d.throttle_pct >= before
        assert d.throttle_pct in (before, p.throttle_initial_pct) \
            or 0 < d.throttle_pct - before <= p.throttle_increment_pct
        assert d.throttle_pct == before or m.period_sent_bytes is not None
    assert 0 <= d.hot_periods < HOT_PERIODS_PER_STEP
    if d.vcpu_dirty_limits is not None:
        assert p.dirty_limit_pages_per_s is not None
        assert set(d.vcpu_dirty_limits) == {p.dirty_limit_pages_per_s}


@given(st.floats(1e3, 1e11), st.floats(1e3, 1e10), st.integers(0, 99))
def test_aim_throttle_fits_unless_clamped(dirty_rate, bandwidth, current):
    params = PolicyParams(auto_converge=True, throttle_mode="aim")
    pct, own_rate = aim_throttle(metrics(dirty_rate_bps=dirty_rate, bandwidth_bps=bandwidth,
                                         throttle_pct=current), params)
    assert own_rate == pytest.approx(dirty_rate / (1 - current / 100))
    if params.throttle_initial_pct < pct < params.throttle_max_pct:
        assert own_rate * (1 - pct / 100) <= 0.5 * bandwidth * (1 + 1e-9)
        assert own_rate * (1 - (pct - 1) / 100) > 0.5 * bandwidth * (1 - 1e-9)  # and is the least
