"""Guests that dirty memory faster than the link carries it: auto-converge and the limits."""

from __future__ import annotations

import pytest

from _migration_helpers import GUEST_KINDS, guest_config, migrate_locally, running_guest
from pymig.guest.workloads import verify_selfcheck
from pymig.stats import read_trace

# A working set rewritten far faster than the capped link can carry it.
BANDWIDTH = 24 << 20
RATE = {"simulated": 200_000, "kvm": 0}  # pages/s; KVM flat out is ~100k+ distinct pages/s


def hot_guest(kind):
    return running_guest(guest_config(kind, "selfcheck", memory=128 << 20,
                                      working_set=32 << 20, rate=RATE[kind]))


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_auto_converge_throttles_a_guest_that_would_not_converge(kind, tmp_path):
    source = hot_guest(kind)
    trace = tmp_path / "trace.jsonl"
    try:
        done = migrate_locally(source, f"unix:{tmp_path}/m.sock", timeout=120,
                               params={"max-bandwidth": BANDWIDTH},
                               capabilities={"auto-converge": True}, trace_path=str(trace))
        assert done.error is None, done.error
        stats = done.migration.query()
        assert stats["status"] == "completed"
        assert stats["switchover-reason"] == "fits-limit"
        records = read_trace(trace)
        throttles = [r["throttle_pct"] for r in records]
        assert max(throttles) > 0, "the guest was never throttled"
        assert stats["cpu-throttle-percentage"] == 0, "the throttle outlived the migration"
        dest = done.destination
        dest.pause()
        assert verify_selfcheck(dest).ok
    finally:
        source.close()
        if done.destination is not None:
            done.destination.close()


def test_without_auto_converge_the_same_guest_hits_the_iteration_limit(tmp_path):
    source = hot_guest("simulated")
    try:
        done = migrate_locally(source, f"unix:{tmp_path}/m.sock", timeout=120,
                               params={"max-bandwidth": BANDWIDTH, "max-iterations": 4,
                                       "limit-action": "cancel"})
        assert done.migration.status.value == "cancelled"
        assert "cancelled-by-limit: max_iterations" in str(done.migration.error)
        assert done.migration.query()["iterations"] == 4
        assert source.status == "running"
        source.pause()
        assert verify_selfcheck(source).ok
    finally:
        source.close()


@pytest.mark.parametrize("limit", [{"max-iterations": 3}, {"max-total-time": 1500},
                                   {"max-bytes-ratio": 0.3}])
def test_a_reached_limit_forces_the_switchover_and_says_which(limit, tmp_path):
    source = hot_guest("simulated")
    try:
        done = migrate_locally(source, f"unix:{tmp_path}/m.sock", timeout=120,
                               params={"max-bandwidth": BANDWIDTH, **limit,
                                       "limit-action": "switchover"})
        assert done.error is None, done.error
        stats = done.migration.query()
        assert stats["status"] == "completed"
        name = next(iter(limit)).replace("-", "_")
        assert stats["switchover-reason"].startswith("forced-by-limit: " + name.split("_")[0])
        # a forced switchover accepts a downtime above the limit, and reports it
        assert stats["downtime-expected-at-switchover"] > 300
        assert stats["downtime"] > 0
        dest = done.destination
        dest.pause()
        assert verify_selfcheck(dest).ok
    finally:
        source.close()
        if done.destination is not None:
            done.destination.close()


def test_manual_switchover_is_recorded_as_such(tmp_path):
    source = hot_guest("simulated")

    def switch_when_active(migration):
        from _migration_helpers import wait_for

        wait_for(lambda: migration.query().get("iterations", 0) >= 2, timeout=60,
                 what="two iterations")
        migration.switchover()

    try:
        done = migrate_locally(source, f"unix:{tmp_path}/m.sock", timeout=120,
                               params={"max-bandwidth": BANDWIDTH}, during=switch_when_active)
        assert done.error is None, done.error
        assert done.migration.query()["switchover-reason"] == "manual"
    finally:
        source.close()
        if done.destination is not None:
            done.destination.close()
