"""Guests that dirty memory faster than the link carries it: auto-converge and the limits."""

from __future__ import annotations

import re
import subprocess

import pytest

from _migration_helpers import guests  # noqa: F401 - fixture
from _migration_helpers import (GUEST_KINDS, assert_consistent, finish, guest_config,
                                migrate_locally, pymig_process, start_destination, start_source,
                                wait_for)
from pymig.estimate import TriggerPeriod
from pymig.qmp import QmpClient
from pymig.stats import read_trace

# A working set rewritten far faster than the capped link can carry it.
BANDWIDTH = 24 << 20
# the cap holds the guest back only if what it moves is not compressed 200 times first; it
# stands for a link that slow, so it holds the stop-and-copy too (by default that goes
# uncapped, and the policy counts on it)
CAPPED = {"max-bandwidth": BANDWIDTH, "compression": "none", "x-switchover-capped": True}
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
        throttles = [r["throttle_pct"] for r in read_trace(trace)]
        assert max(throttles) > 0, "never throttled"
        assert stats["cpu-throttle-percentage"] == 0, "the throttle outlived the migration"
        assert stats["cpu-throttle-peak"] == max(throttles)
        # QEMU's steps by default: 20 first, then 10 at a time
        rises = [b for a, b in zip([0] + throttles, throttles) if b != a]
        assert rises == [20, 30, 40, 50, 60, 70, 80, 90, 99][:len(rises)], rises
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


def test_cli_auto_converge_steps_from_initial_by_increment_to_max_and_reports_the_peak(tmp_path):
    """QEMU's auto-converge through the command line, on a guest that does not converge over
    its capped link even at the highest throttle allowed: the throttle starts at
    cpu-throttle-initial, rises by cpu-throttle-increment, at most once per two trigger
    periods (a second or more each), stops at max-cpu-throttle, and the summary says how far it
    went (the throttle in force is lifted by then)."""
    src, ctl = start_source("simulated", tmp_path, memory="128M", working_set="32M",
                            rate=str(RATE["simulated"]))
    dst, _, uri = start_destination(tmp_path)
    trace = tmp_path / "trace.jsonl"
    migrate = None
    try:
        with QmpClient(ctl) as client:
            client.command("migrate-set-parameters", **{
                "cpu-throttle-initial": 40, "cpu-throttle-increment": 25,
                "max-cpu-throttle": 90, "x-switchover-capped": True})
            assert client.command("query-migrate-parameters")["x-cpu-throttle-mode"] == "step"
            migrate = pymig_process("migrate", "--control", ctl, uri, "--auto-converge",
                                    "--max-bandwidth", str(BANDWIDTH), "--compression", "none",
                                    "--trace", str(trace), stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)

            def at_max_a_while() -> bool:
                records = read_trace(trace) if trace.exists() else []
                return sum(r["throttle_pct"] == 90 for r in records) >= 5

            wait_for(at_max_a_while, timeout=120, interval=0.1, what="the throttle at its max")
            client.command("x-migrate-switchover")  # it would not converge on its own
            out, _ = migrate.communicate(timeout=120)
        assert migrate.returncode == 0, out
        records = read_trace(trace)
        throttles = [r["throttle_pct"] for r in records]
        assert max(throttles) == 90
        rises = [(r["time"], b) for a, b, r in zip([0] + throttles, throttles, records) if b != a]
        assert [pct for _, pct in rises] == [40, 65, 90]
        # two trigger periods of a second or more before each step
        times = [0.0] + [t for t, _ in rises]
        assert all(later - earlier >= 2 * TriggerPeriod.period_s * 0.99
                   for earlier, later in zip(times, times[1:])), rises
        summary = out.decode()
        assert re.search(r"vCPU throttle \(highest\)\s+90 %", summary), summary
        assert "vCPU throttle (now)" not in summary
        assert re.search(r"switchover reason\s+manual", summary), summary
    finally:
        finish(src, dst, *([migrate] if migrate is not None else []))
