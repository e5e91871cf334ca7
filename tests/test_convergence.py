"""Guests that dirty memory faster than the link carries it: auto-converge and the limits."""

from __future__ import annotations

import pytest

from _migration_helpers import guests  # noqa: F401 - fixture
from _migration_helpers import (GUEST_KINDS, assert_consistent, guest_config, migrate_locally,
                                wait_for)
from pymig.stats import read_trace

# A working set rewritten far faster than the capped link can carry it.
BANDWIDTH = 24 << 20
# the cap holds the guest back only if what it moves is not compressed 200 times first
CAPPED = {"max-bandwidth": BANDWIDTH, "compression": "none"}
RATE = {"simulated": 200_000, "kvm": 0}  # pages/s; KVM flat out is ~100k+ distinct pages/s


@pytest.fixture
def hot_guest(guests):
    """A self-checking guest whose working set cannot cross the capped link unthrottled."""
    return lambda kind="simulated": guests(guest_config(kind, "selfcheck", memory=128 << 20,
                                                        working_set=32 << 20, rate=RATE[kind]))


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_auto_converge_throttles_a_guest_that_would_not_converge(kind, hot_guest, tmp_path):
    trace = tmp_path / "trace.jsonl"
    with migrate_locally(hot_guest(kind), f"unix:{tmp_path}/m.sock", timeout=120,
                         params=CAPPED,
                         capabilities={"auto-converge": True}, trace_path=str(trace)) as done:
        assert done.error is None, done.error
        stats = done.migration.query()
        assert stats["status"] == "completed"
        assert stats["switchover-reason"] == "fits-limit"
        assert max(r["throttle_pct"] for r in read_trace(trace)) > 0, "never throttled"
        assert stats["cpu-throttle-percentage"] == 0, "the throttle outlived the migration"
        assert_consistent(done.destination)


def test_without_auto_converge_the_same_guest_hits_the_iteration_limit(hot_guest, tmp_path):
    source = hot_guest()
    with migrate_locally(source, f"unix:{tmp_path}/m.sock", timeout=120,
                         params={**CAPPED, "max-iterations": 4,
                                 "limit-action": "cancel"}) as done:
        assert done.migration.status.value == "cancelled"
        assert "cancelled-by-limit: max_iterations" in str(done.migration.error)
        assert done.migration.query()["iterations"] == 4
        assert source.status == "running"
        assert_consistent(source)


@pytest.mark.parametrize("limit, reason", [
    ({"max-iterations": 3}, "max_iterations"), ({"max-total-time": 1500}, "max_total_time"),
    ({"max-bytes-ratio": 0.3}, "max_bytes_ratio")])
def test_a_reached_limit_forces_the_switchover_and_says_which(limit, reason, hot_guest,
                                                             tmp_path):
    with migrate_locally(hot_guest(), f"unix:{tmp_path}/m.sock", timeout=120,
                         params={**CAPPED, **limit,
                                 "limit-action": "switchover"}) as done:
        assert done.error is None, done.error
        stats = done.migration.query()
        assert stats["status"] == "completed"
        assert stats["switchover-reason"].startswith(f"forced-by-limit: {reason}")
        # a forced switchover accepts a downtime above the limit, and reports it
        assert stats["downtime-expected-at-switchover"] > 300
        assert stats["downtime"] > 0
        assert_consistent(done.destination)


def test_manual_switchover_is_recorded_as_such(hot_guest, tmp_path):
    def switch_when_active(migration):
        wait_for(lambda: migration.query().get("iterations", 0) >= 2, timeout=60,
                 what="two iterations")
        migration.switchover()

    with migrate_locally(hot_guest(), f"unix:{tmp_path}/m.sock", timeout=120,
                         params=CAPPED, during=switch_when_active) as done:
        assert done.error is None, done.error
        assert done.migration.query()["switchover-reason"] == "manual"
