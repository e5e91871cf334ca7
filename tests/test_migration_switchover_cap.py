"""max-bandwidth caps a migration while its guest runs; the stop-and-copy, with the guest
stopped, goes uncapped (as QEMU's), and the expected downtime counts on that, unless
``x-switchover-capped`` keeps the cap: the same capped migration, switched over with
megabytes pending, stops its guest for a fraction of the time it does with the cap kept."""

from __future__ import annotations

import pytest

from _migration_helpers import guests  # noqa: F401 - fixture
from _migration_helpers import GUEST_KINDS, assert_arrived_and_runs, guest_config, migrate_locally
from pymig.parameters import ParameterStore, validate
from pymig.stats import read_trace

MiB = 1 << 20
CAP = 4 * MiB


def capped_migration(guests, tmp_path, kind: str, keep_cap: bool) -> dict:
    """A 16 MiB guest rewriting 4 MiB flat out, migrated at 4 MiB/s, switched over by
    max-iterations after its first pass: the whole working set is pending then."""
    source = guests(guest_config(kind, memory=16 * MiB, working_set=4 * MiB))
    name = "capped" if keep_cap else "uncapped"
    trace = tmp_path / f"{name}.jsonl"
    params = {"max-bandwidth": CAP, "compression": "none", "max-iterations": 2,
              "limit-action": "switchover", "downtime-limit": 1}
    if keep_cap:
        params["x-switchover-capped"] = True
    with migrate_locally(source, f"unix:{tmp_path}/{name}.sock", params=params,
                         trace_path=str(trace)) as done:
        assert_arrived_and_runs(done, source)
        stats = done.migration.query()
    records = read_trace(trace)
    return {"downtime_ms": stats["downtime"],
            "expected_ms": stats["downtime-expected-at-switchover"],
            "pending": records[-1]["pending_bytes"],
            "stopped_bandwidth": records[-1]["stopped_bandwidth"]}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_the_stop_and_copy_goes_uncapped_unless_asked(guests, tmp_path, kind):
    uncapped = capped_migration(guests, tmp_path, kind, keep_cap=False)
    capped = capped_migration(guests, tmp_path, kind, keep_cap=True)
    # the same megabytes pending at the switchover...
    assert capped["pending"] >= 2 * MiB and uncapped["pending"] >= 2 * MiB, (capped, uncapped)
    # ...take the cap's time with the cap kept, a fraction of it without
    assert capped["downtime_ms"] >= 0.6 * capped["pending"] / CAP * 1000, capped
    assert uncapped["downtime_ms"] * 4 < capped["downtime_ms"], (uncapped, capped)
    # and the expected downtime knew: the stop-and-copy's rate is held to the cap only when
    # the cap stays in force then
    assert uncapped["stopped_bandwidth"] > 2 * capped["stopped_bandwidth"], (uncapped, capped)
    assert uncapped["expected_ms"] * 2 < capped["expected_ms"], (uncapped, capped)


def test_the_parameter():
    store = ParameterStore()
    assert store.snapshot().switchover_capped is False
    assert store.snapshot().qmp()["x-switchover-capped"] is False
    store.set(**{"x-switchover-capped": True})
    assert store.snapshot().switchover_capped is True
    with pytest.raises(ValueError, match="true or false"):
        validate("x-switchover-capped", 1)



def test_a_migration_after_a_snapshot_takes_a_lowered_cap_while_it_runs(guests, tmp_path):
    # One Migration, started again after a snapshot (its guest ran on): the snapshot's
    # stop-and-copy went uncapped, and the next run must still obey max-bandwidth lowered
    # while it runs.
    import time

    from pymig.machine import Machine
    from pymig.migration import Migration
    from test_migration_fresh_stats import _receive_in_thread

    low = 2 * MiB
    source = guests(guest_config("simulated", memory=64 * MiB, working_set=16 * MiB))
    store = ParameterStore()
    migration = Migration(Machine.source(source), store)
    migration.start(f"file:{tmp_path}/snap.pymig")
    migration.wait(60)
    assert migration.status.value == "completed" and source.status == "running"

    bound, join = _receive_in_thread("unix:" + str(tmp_path / "m.sock"))
    # a downtime the rewritten working set never fits: it iterates until cancelled
    store.set(**{"max-bandwidth": 10 * CAP, "downtime-limit": 1})
    migration.start(bound)
    time.sleep(1.0)
    store.set(**{"max-bandwidth": low})
    time.sleep(1.0)  # what the old cap let through before the new one took hold
    before = migration.query()["ram"]["transferred"]
    time.sleep(2.0)
    after = migration.query()["ram"]["transferred"]
    migration.cancel()
    migration.wait(60)
    assert migration.status.value == "cancelled"
    join()
    # at most the new cap, with room for a packet and the limiter's burst; the old cap
    # (40 MiB/s) would have let 80 MiB through in those two seconds
    assert after - before <= 2 * low * 2 + 2 * MiB, (before, after)
