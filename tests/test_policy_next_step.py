"""The whole convergence rule on synthetic metrics: what the migration does after a sync.

:func:`pymig.policy.next_step` is the estimate's verdict (``decide``, tested in
test_policy_decide.py) followed by the holds, the resend and the catch-up wait; every case the
migration thread acts on is a row of the table below.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymig.policy import (BEHIND_PERIOD_S, MAX_PASSES_AFTER_WAIT, RESEND_GROWTH, Action,
                          Decision, Held, Metrics, Move, PolicyParams, behind_wait_s, decide,
                          held_wait, keep_sending, next_step, switchover_held)

MB = 1_000_000
PAGE = 4096


def metrics(**changes) -> Metrics:
    """A guest mid-migration: 1 GB RAM, 100 MB/s link, 100 MB pending (1 s > 0.3 s); the
    first pass through, the destination caught up, no catch-up wait before this sync."""
    base = Metrics(iteration=3, elapsed_s=30.0, ram_bytes=1000 * MB, page_size=PAGE,
                   pending_bytes=100 * MB, bandwidth_bps=100 * MB, dirty_rate_bps=40 * MB,
                   bytes_sent_total=1500 * MB, bytes_sent_period=100 * MB,
                   bytes_dirtied_period=40 * MB)
    return replace(base, **changes)


FITS = {"pending_bytes": 5 * MB}  # 50 ms expected
HOT = {"bytes_dirtied_period": 80 * MB, "bytes_sent_period": 100 * MB}
BEHIND = {"caught_up": False, "backlog_bytes": 50 * MB}  # 500 ms to load at 100 MB/s
SHORT_BEHIND = {"caught_up": False, "backlog_bytes": 1 * MB}  # 10 ms to load
AFTER_WAIT = {"expected_before_wait_s": 0.005}  # the wait made 50 ms of 5 ms
LIMIT = PolicyParams(max_iterations=3)
LIMIT_CANCELS = PolicyParams(max_iterations=3, limit_action="cancel")
AIM = PolicyParams(auto_converge=True, throttle_mode="aim")
DIRTY_LIMIT = PolicyParams(dirty_limit_pages_per_s=1000)
first_pass, behind, resend = (Held.FIRST_PASS.value, Held.BEHIND.value, Held.RESEND.value)
waits = "the destination has yet to load everything sent"


@pytest.mark.parametrize("changes, params, move, reason", [
    # the estimate's verdict continues: another pass, with a new throttle or caps or not
    ({}, PolicyParams(), Move.ITERATE, "converging"),
    ({"swept": False, **BEHIND}, PolicyParams(), Move.ITERATE, "converging"),
    (HOT, AIM, Move.THROTTLE, "throttling: aim 0% -> 20%"),
    ({"throttle_pct": 20, "dirty_rate_bps": 1 * MB, "bytes_dirtied_period": 1 * MB}, AIM,
     Move.ITERATE, "throttling: aim 20% -> 20%"),  # recomputed, the same: an ordinary pass
    (HOT, DIRTY_LIMIT, Move.THROTTLE, "throttling: dirty limit 1000 pages/s"),
    ({"dirty_limited": True, **HOT}, DIRTY_LIMIT, Move.ITERATE, "converging"),
    # it cancels: nothing holds a cancel
    ({"swept": False, **BEHIND}, LIMIT_CANCELS, Move.CANCEL, "cancelled-by-limit: max_iter"),
    # it switches over on the estimate: held, resent, waited for, or taken
    (FITS, PolicyParams(), Move.SWITCHOVER, "fits-limit"),
    ({"swept": False, **FITS}, PolicyParams(), Move.HOLD, first_pass),
    ({**BEHIND, **FITS}, PolicyParams(), Move.HOLD, behind),
    ({**SHORT_BEHIND, **FITS}, PolicyParams(), Move.WAIT, waits),
    ({"caught_up": False, **FITS}, PolicyParams(), Move.WAIT, waits),  # nothing loaded yet
    ({"caught_up": False, "bandwidth_bps": 0.0, "pending_bytes": 0, "backlog_bytes": 50 * MB},
     PolicyParams(), Move.WAIT, waits),  # no rate measured: no telling how long it is behind
    ({**AFTER_WAIT, **FITS}, PolicyParams(), Move.RESEND, resend),
    ({**AFTER_WAIT, "swept": False, **BEHIND, **FITS}, PolicyParams(), Move.RESEND, resend),
    ({**AFTER_WAIT, "passes_after_wait": MAX_PASSES_AFTER_WAIT, **FITS}, PolicyParams(),
     Move.SWITCHOVER, "fits-limit"),  # resent once already
    ({"expected_before_wait_s": 0.04, **FITS}, PolicyParams(), Move.SWITCHOVER, "fits-limit"),
    # the user's or a limit's switchover is never held, but waits for the destination
    ({"manual_switchover_requested": True, "swept": False, **AFTER_WAIT}, PolicyParams(),
     Move.SWITCHOVER, "manual"),
    ({"manual_switchover_requested": True, **BEHIND}, PolicyParams(), Move.WAIT, waits),
    ({"swept": False, **AFTER_WAIT}, LIMIT, Move.SWITCHOVER, "forced-by-limit: max_iter"),
    (BEHIND, LIMIT, Move.WAIT, waits),
])
def test_every_move_the_migration_makes(changes, params, move, reason):
    m = metrics(**changes)
    step = next_step(m, params)
    assert step.move is move, step
    assert step.reason.startswith(reason), step
    assert step.decision == decide(m, params)  # the verdict the throttle and caps come from


def test_an_injected_estimate_is_held_and_waited_for_like_the_default_one():
    def always(metrics, params):
        return Decision(Action.SWITCHOVER, "fits-limit", 0, None, 0.001)

    assert next_step(metrics(swept=False), PolicyParams(), always).move is Move.HOLD
    assert next_step(metrics(caught_up=False), PolicyParams(), always).move is Move.WAIT
    assert next_step(metrics(), PolicyParams(), always).move is Move.SWITCHOVER


@pytest.mark.parametrize("reason, backlog, bandwidth, expected, keep", [
    ("fits-limit", 100e6, 1e9, 0.05, True),  # 100 ms behind, 50 ms of downtime: go on
    ("fits-limit", 10e6, 1e9, 0.05, False),  # 10 ms behind: wait for it
    ("fits-limit", 0, 1e9, 0.05, False),
    ("fits-limit", 100e6, 0.0, 0.05, False),  # it loaded nothing yet: wait
    ("manual", 100e6, 1e9, 0.05, False),  # the user's switchover is not held back
])
def test_a_destination_far_behind_lets_the_source_go_on_sending(reason, backlog, bandwidth,
                                                                expected, keep):
    decision = Decision(Action.SWITCHOVER, reason, 0, None, expected)
    assert keep_sending(decision, int(backlog), bandwidth) is keep


@pytest.mark.parametrize("reason, swept, caught_up, expected_before_wait, held", [
    ("fits-limit", False, True, float("inf"), "FIRST_PASS"),
    ("fits-limit", True, False, float("inf"), "BEHIND"),  # 100 MB behind at 1 GB/s
    ("fits-limit", True, True, float("inf"), None),
    ("fits-limit", False, False, 0.001, "RESEND"),  # the wait made 50 ms of 1 ms
    ("manual", False, False, 0.001, None),  # the user's switchover goes ahead
])
def test_why_a_switchover_waits_for_another_pass(reason, swept, caught_up,
                                                 expected_before_wait, held):
    decision = Decision(Action.SWITCHOVER, reason, 0, None, 0.05)
    m = metrics(expected_before_wait_s=expected_before_wait, passes_after_wait=0, swept=swept,
                backlog_bytes=100_000_000, bandwidth_bps=1e9, caught_up=caught_up)
    got = switchover_held(decision, m)
    assert got is (Held[held] if held else None)


@pytest.mark.parametrize("backlog, sent, pass_s, wait_s", [
    (10 * MB, 1 * MB, 0.002, BEHIND_PERIOD_S - 0.002),  # behind more than the pass sent
    (10 * MB, 1 * MB, BEHIND_PERIOD_S, 0.0),  # the pass lasted long enough
    (1 * MB, 1 * MB, 0.002, 0.0),  # no further behind than the pass sent
    (1 * MB, 0, 0.0, BEHIND_PERIOD_S),  # nothing to send, and it is behind
    (0, 0, 0.0, 0.0),
])
def test_a_pass_behind_a_slow_destination_waits_for_its_next_report(backlog, sent, pass_s,
                                                                   wait_s):
    assert behind_wait_s(backlog, sent, pass_s) == pytest.approx(wait_s)


@pytest.mark.parametrize("dirty_rate, stopped, at_most_s", [
    (0.0, 0.0, math.inf),  # a guest that dirties nothing: until the destination is close
    # 50 ms more of downtime at 100 MB/s is 5 MB: half a second of a guest dirtying 10 MB/s
    (10 * MB, 0.0, 0.5),
    (10 * MB, 200 * MB, 1.0),  # the stop-and-copy's own rate when known
    (1000 * MB, 0.0, BEHIND_PERIOD_S),  # a guest that dirties fast: the behind period
])
def test_a_pass_held_for_a_destination_far_behind_waits_while_the_guests_writes_stay_small(
        dirty_rate, stopped, at_most_s):
    decision = Decision(Action.SWITCHOVER, "fits-limit", 0, None, 0.05)
    m = metrics(**BEHIND, dirty_rate_bps=dirty_rate, stopped_bandwidth_bps=stopped)
    assert next_step(replace(m, pending_bytes=5 * MB), PolicyParams()).move is Move.HOLD
    held = held_wait(decision, m)
    assert held.backlog_bytes == 5 * MB  # what it loads in the 50 ms expected, at 100 MB/s
    assert held.at_most_s == pytest.approx(at_most_s)


# -- properties -----------------------------------------------------------------------------------
sizes = st.integers(0, 4000 * MB)
rates = st.one_of(st.just(0.0), st.floats(1e3, 1e10))
sync_metrics = st.builds(
    Metrics,
    iteration=st.integers(1, 100), elapsed_s=st.floats(0, 1000), ram_bytes=st.just(1000 * MB),
    page_size=st.just(PAGE), pending_bytes=sizes, bandwidth_bps=rates, dirty_rate_bps=rates,
    bytes_sent_total=sizes, bytes_sent_period=sizes, bytes_dirtied_period=sizes,
    throttle_pct=st.integers(0, 99), switchover_s=st.floats(0, 0.05),
    in_flight_bytes=st.integers(0, 50 * MB), resend_bytes=sizes, stopped_bandwidth_bps=rates,
    period_sent_bytes=st.none() | sizes, period_dirtied_bytes=sizes,
    hot_periods=st.integers(0, 2), manual_switchover_requested=st.booleans(),
    dirty_limited=st.booleans(), backlog_bytes=sizes, swept=st.booleans(),
    caught_up=st.booleans(),
    expected_before_wait_s=st.just(math.inf) | st.floats(0, 2),
    passes_after_wait=st.integers(0, 2))
policy_params = st.builds(
    PolicyParams,
    downtime_limit_s=st.floats(0, 2), auto_converge=st.booleans(),
    throttle_mode=st.sampled_from(["step", "aim"]), throttle_tailslow=st.booleans(),
    dirty_limit_pages_per_s=st.none() | st.integers(1, 10_000),
    max_iterations=st.none() | st.integers(1, 100),
    max_total_time_s=st.none() | st.floats(1, 1000),
    max_bytes_ratio=st.none() | st.floats(0.5, 5),
    limit_action=st.sampled_from(["switchover", "cancel"]))


@given(sync_metrics, policy_params)
def test_never_switches_over_beyond_the_limit_unless_the_user_or_a_limit_says_so(m, params):
    step = next_step(m, params)
    if step.move is Move.SWITCHOVER and m.expected_downtime_s > params.downtime_limit_s:
        assert step.reason == "manual" or step.reason.startswith("forced-by-limit: ")
        assert (m.manual_switchover_requested or params.max_iterations is not None
                or params.max_total_time_s is not None or params.max_bytes_ratio is not None)


@given(sync_metrics, policy_params, st.floats(1e3, 1e10), st.floats(1.0001, 3.0))
def test_never_switches_over_just_beyond_the_limit_unless_told(m, params, bandwidth, over):
    # the same metrics with the expected downtime a little over the limit
    pending = max(math.ceil(over * params.downtime_limit_s * bandwidth), 1)
    m = replace(m, pending_bytes=pending, bandwidth_bps=bandwidth, resend_bytes=0,
                in_flight_bytes=0, switchover_s=0.0)
    assert m.expected_downtime_s > params.downtime_limit_s
    step = next_step(m, params)
    if step.move is Move.SWITCHOVER:
        assert step.reason == "manual" or step.reason.startswith("forced-by-limit: ")


@given(sync_metrics, policy_params)
def test_the_guest_stops_only_with_the_destination_caught_up(m, params):
    step = next_step(m, params)
    if step.move is Move.SWITCHOVER:
        assert m.caught_up
        assert m.swept or step.reason != "fits-limit"  # a page never sent is not trusted


@given(sync_metrics, policy_params)
def test_the_moves_follow_the_estimates_verdict(m, params):
    step = next_step(m, params)
    verdict = decide(m, params)
    assert step.decision == verdict
    expected = {Action.CANCEL: {Move.CANCEL},
                Action.CONTINUE: {Move.ITERATE, Move.THROTTLE},
                Action.SWITCHOVER: {Move.SWITCHOVER, Move.HOLD, Move.RESEND, Move.WAIT}}
    assert step.move in expected[verdict.action]
    if step.move is Move.ITERATE:
        assert verdict.throttle_pct == m.throttle_pct
    if step.move in (Move.HOLD, Move.RESEND):
        assert verdict.reason == "fits-limit"
    if step.move is Move.RESEND:
        assert m.passes_after_wait < MAX_PASSES_AFTER_WAIT
        assert verdict.expected_downtime_s > RESEND_GROWTH * m.expected_before_wait_s


@given(sync_metrics, policy_params)
def test_with_nothing_to_hold_for_the_verdict_is_the_move(m, params):
    plain = replace(m, swept=True, caught_up=True, expected_before_wait_s=math.inf)
    step = next_step(plain, params)
    assert (step.move is Move.SWITCHOVER) == (decide(plain, params).action == Action.SWITCHOVER)


@given(sizes, sizes, st.floats(0, 1))
def test_a_pass_waits_at_most_to_the_behind_period(backlog, sent, pass_s):
    wait_s = behind_wait_s(backlog, sent, pass_s)
    assert 0 <= wait_s <= BEHIND_PERIOD_S
    assert wait_s == 0 or (backlog > sent and pass_s + wait_s == pytest.approx(BEHIND_PERIOD_S))


@given(sync_metrics, st.floats(0, 2))
def test_a_held_pass_waits_no_longer_than_the_guest_takes_to_grow_the_downtime(m, expected):
    decision = Decision(Action.SWITCHOVER, "fits-limit", 0, None, expected)
    held = held_wait(decision, m)
    assert held.backlog_bytes >= 0 and held.at_most_s >= BEHIND_PERIOD_S
    if m.dirty_rate_bps > 0 and held.at_most_s > BEHIND_PERIOD_S:
        # what the guest dirties over the wait adds at most (RESEND_GROWTH - 1) times the
        # downtime expected, at the stop-and-copy's rate
        stopped = m.stopped_bandwidth_bps or m.bandwidth_bps
        added = m.dirty_rate_bps * held.at_most_s / stopped
        assert added <= (RESEND_GROWTH - 1) * expected * (1 + 1e-9)
