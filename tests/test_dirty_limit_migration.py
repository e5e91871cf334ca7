"""The dirty-limit capability: a migration caps the dirty rate of each vCPU (measured from the
dirty ring, or the simulated writers' own counts) instead of throttling every vCPU by run
time, so a guest with one vCPU dirtying far faster than the link carries still converges, and
only that vCPU slows down.  The caps are lifted the moment the migration ends or is cancelled.
"""

from __future__ import annotations

import time

import pytest

from _migration_helpers import guests  # noqa: F401 - fixture
from _migration_helpers import GUEST_KINDS, guest_config, migrate_locally, running_guest, wait_for
from pymig.errors import MigrationError
from pymig.guest.kvm_guest import DIRTY_LIMIT_RING_ENTRIES
from pymig.guest.workloads import read_mailbox
from pymig.machine import Machine
from pymig.migration import Migration
from pymig.parameters import ParameterStore
from _migration_helpers import block_digests
from pymig.stats import read_trace

BANDWIDTH = 24 << 20  # 6k pages/s: far below vCPU 0 flat out
FAST = {"simulated": 200_000, "kvm": 0}  # pages/s (0: as fast as it can)
SLOW = 500  # vCPU 1's pace, under the cap
LIMIT = 2000  # pages/s per vCPU


@pytest.fixture
def two_speed_guest(guests):
    """vCPU 0 dirties flat out, vCPU 1 at SLOW pages/s; with the dirty ring on KVM."""
    return lambda kind: guests(
        guest_config(kind, "dirtier", memory=128 << 20, working_set=32 << 20, vcpus=2, rate=0,
                     vcpu_rates_pages_per_s=(FAST[kind], SLOW)),
        dirty_ring=DIRTY_LIMIT_RING_ENTRIES)


def pages_written_rate(guest, vcpu: int | None = None, seconds: float = 0.3) -> float:
    """Pages/s the guest (or its vCPU ``vcpu``) writes, from its own counters in its mailbox."""
    def written() -> int:
        records = read_mailbox(guest.ram_blocks, guest.vcpu_count)
        return sum(r.pages_written for r in (records if vcpu is None else [records[vcpu]]))

    before = written()
    time.sleep(seconds)
    return (written() - before) / seconds


# a cap on pages sent as they are, standing for a link that slow: the stop-and-copy too
DIRTY_LIMIT = {"params": {"max-bandwidth": BANDWIDTH, "vcpu-dirty-limit": LIMIT,
                          "compression": "none", "x-switchover-capped": True},
               "capabilities": {"dirty-limit": True}}


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_the_fast_vcpu_is_capped_and_the_guest_converges(kind, two_speed_guest, tmp_path):
    source = two_speed_guest(kind)
    assert pages_written_rate(source, 0) > 5 * LIMIT  # far faster than its cap, free
    trace = tmp_path / "trace.jsonl"
    with migrate_locally(source, f"unix:{tmp_path}/m.sock", timeout=120,
                         trace_path=str(trace), **DIRTY_LIMIT) as done:
        assert done.error is None, done.error
        stats = done.migration.query()
        assert stats["status"] == "completed" and stats["switchover-reason"] == "fits-limit"
        assert block_digests(source.ram_blocks) == done.digests_at_load
        assert "vcpu-dirty-limit" not in stats, "the caps outlived the migration"
        assert stats["cpu-throttle-percentage"] == 0  # slowed by caps, not by run time
        records = read_trace(trace)
        capped = [r for r in records if r.get("vcpu_dirty_limits")]
        assert capped and capped[0]["vcpu_dirty_limits"] == [LIMIT, LIMIT], records
        assert capped[0]["vcpu_dirty_rates"][0] > LIMIT, records  # the rate that got it capped
        # Once capped (one period later), vCPU 0 dirties about LIMIT pages/s, and vCPU 1,
        # under its cap, keeps about its pace.  A period's rate is the cap plus what the
        # vCPU wrote before its last hold (the controller charges every 10 ms, later when
        # the host is busy): up to 1.7 x the cap was seen here in the 200 ms periods right
        # after it, 2.05 x once in a CI run on a busy host, against more than 5 x (asserted
        # above) without it.
        later = capped[1:]
        assert later, records
        assert min(r["vcpu_dirty_rates"][0] for r in later) < 2.5 * LIMIT, later
        assert max(r["vcpu_dirty_rates"][1] for r in later) > 0.4 * SLOW, later


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_a_cancelled_migration_lifts_the_caps(kind, two_speed_guest, tmp_path):
    source = two_speed_guest(kind)

    def cancel_once_capped(migration):
        wait_for(lambda: "vcpu-dirty-limit" in migration.query(), timeout=60,
                 what="the caps to be set")
        time.sleep(0.3)
        migration.cancel()

    params = dict(DIRTY_LIMIT["params"], **{"max-bandwidth": 4 << 20})  # never converges
    with migrate_locally(source, f"unix:{tmp_path}/m.sock", timeout=120, params=params,
                         capabilities=DIRTY_LIMIT["capabilities"],
                         during=cancel_once_capped) as done:
        assert done.migration.status.value == "cancelled"
        assert "vcpu-dirty-limit" not in done.migration.query()
        assert source.status == "running"
        # Free again: far above the two caps together.
        wait_for(lambda: pages_written_rate(source) > 4 * (LIMIT + SLOW), timeout=30,
                 what="the source's fast vCPU to run free")


@pytest.mark.parametrize("capabilities, params, words", [
    ({"dirty-limit": True}, {}, "vcpu-dirty-limit parameter"),
    ({"dirty-limit": True, "auto-converge": True}, {"vcpu-dirty-limit": LIMIT},
     "exclude each other"),
])
def test_a_dirty_limit_that_cannot_work_is_refused_before_anything_starts(
        capabilities, params, words):
    guest = running_guest(guest_config("simulated", "dirtier", memory=32 << 20,
                                       working_set=8 << 20))
    try:
        store = ParameterStore()
        if params:
            store.set(**params)
        store.set_capabilities(**capabilities)
        migration = Migration(Machine.source(guest), store)
        with pytest.raises(MigrationError, match=words):
            migration.start("unix:/nonexistent/never-used.sock")
        assert migration.status.value == "none" and guest.status == "running"
    finally:
        guest.close()


@pytest.mark.kvm
def test_a_kvm_guest_without_the_dirty_ring_cannot_have_a_dirty_limit():
    guest = running_guest(guest_config("kvm", "dirtier", memory=32 << 20, working_set=8 << 20))
    try:
        store = ParameterStore()
        store.set(**{"vcpu-dirty-limit": LIMIT})
        store.set_capabilities(**{"dirty-limit": True})
        with pytest.raises(MigrationError, match=r"dirty ring \(pymig run --dirty-ring N\)"):
            Migration(Machine.source(guest), store).start("unix:/nonexistent/never-used.sock")
        assert guest.status == "running"
    finally:
        guest.close()
