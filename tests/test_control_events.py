"""Asynchronous events (MIGRATION statuses in order, MIGRATION_PASS per iteration, STOP and
RESUME) reach every client, and parameters changed during a migration take effect."""

from __future__ import annotations


from _control_helpers import pair, source  # noqa: F401 - fixtures
from _control_helpers import (WAIT_S, all_events, events_until, migrate_incoming, next_event,
                              serve_destination, serve_guest, start_slow_migration,
                              statuses_until_end, wait_status)
from _migration_helpers import ANY_KIND, wait_for

MiB = 1 << 20


def names(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]


def test_a_migration_reports_every_status_and_pass_to_every_client(pair, tmp_path):
    src, dst = pair
    watchers = [src.client(), src.client()]
    dwatch = dst.client()
    uri = migrate_incoming(dwatch, tmp_path)
    assert next_event(dwatch, "MIGRATION")["data"] == {"status": "setup"}
    watchers[0].command("migrate", uri=uri)
    final = wait_status(watchers[0], "completed")
    assert dst.session.guest_ready.wait(WAIT_S)
    syncs = final["ram"]["dirty-sync-count"]
    for client in watchers:
        events = events_until(client, {"event": "MIGRATION", "data": {"status": "completed"}})
        migration = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
        assert migration == ["setup", "active", "device", "completed"]
        passes = [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"]
        assert passes == list(range(1, syncs + 1))
        order = [n for n in names(events) if n in ("MIGRATION", "STOP", "RESUME")]
        assert order == ["MIGRATION", "MIGRATION", "MIGRATION", "STOP", "MIGRATION"]
        assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in events)
    wait_for(lambda: dwatch.command("query-migrate")["status"] == "completed",
             what="the destination to finish")
    rest = events_until(dwatch, {"event": "MIGRATION", "data": {"status": "completed"}})
    assert [e["data"]["status"] for e in rest if e["event"] == "MIGRATION"] == ["active",
                                                                                 "completed"]
    next_event(dwatch, "RESUME")  # the guest runs here once everything has loaded


def test_a_cancelled_migration_reports_cancelling_then_cancelled(pair, tmp_path):
    src, dst = pair
    client = src.client()
    start_slow_migration(client, migrate_incoming(dst.client(), tmp_path))
    client.command("migrate_cancel")
    assert statuses_until_end(client) == ["setup", "active", "cancelling", "cancelled"]
    assert "STOP" not in names(all_events(client))  # the guest never stopped


def test_a_refused_migration_reports_failed_with_the_reason(pair, tmp_path):
    src, dst = pair

    def refuse(config):
        raise ValueError("this destination takes no guests today")

    dst.session.incoming_options = {"check_config": refuse, "limits": ANY_KIND}
    client = src.client()
    client.command("migrate", uri=migrate_incoming(dst.client(), tmp_path))
    statuses = statuses_until_end(client)
    assert statuses in (["setup", "active", "failed"], ["setup", "failed"])
    assert "no guests today" in client.command("query-migrate")["error-desc"]
    assert client.command("query-status")["status"] == "running"


def test_a_snapshot_stops_the_guest_then_resumes_it(pair, tmp_path):
    src, _ = pair
    client = src.client()
    client.command("migrate", uri=f"file:{tmp_path}/snap.pymig")
    assert statuses_until_end(client) == ["setup", "active", "device", "completed"]
    next_event(client, "RESUME")  # after "completed" (the STOP before it was skipped)
    assert client.command("query-status")["status"] == "running"


def test_max_bandwidth_changed_during_a_pass_applies_at_once(tmp_path):
    """At 256 KiB/s the first pass over 32 MiB would take two minutes; lifting the cap in the
    middle of that pass lets it finish within the wait."""
    src = serve_guest(tmp_path, working_set=32 * MiB)
    dst = serve_destination(tmp_path)
    try:
        client = src.client()
        client.command("migrate-set-parameters", **{"max-bandwidth": 256 << 10,
                                                    "compression": "none"})
        client.command("migrate", uri=migrate_incoming(dst.client(), tmp_path))
        next_event(client, "MIGRATION_PASS")
        wait_for(lambda: client.command("query-migrate")["ram"]["transferred"] > 1 * MiB,
                 what="the capped first pass to be under way")
        during = client.command("query-migrate")
        assert during["status"] == "active" and during["ram"]["dirty-sync-count"] == 1
        client.command("migrate-set-parameters", **{"max-bandwidth": 0})
        assert wait_status(client, "completed", timeout=60)["status"] == "completed"
    finally:
        dst.close()
        src.close()


def test_downtime_limit_changed_during_a_migration_applies_at_the_next_iteration(pair,
                                                                                  tmp_path):
    """A guest dirtying 400 MB/s over 32 MiB/s never fits a 1 ms limit; with a generous limit
    the next decision switches over, because the limit now fits."""
    src, dst = pair
    client = src.client()
    client.command("migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": 32 * MiB,
                                                "compression": "none"})
    client.command("migrate", uri=migrate_incoming(dst.client(), tmp_path))
    for _ in range(3):
        seen = next_event(client, "MIGRATION_PASS")["data"]["pass"]
    assert client.command("query-migrate")["status"] == "active"
    client.command("migrate-set-parameters", **{"downtime-limit": 60_000})
    final = wait_status(client, "completed")
    assert final["switchover-reason"] == "fits-limit"
    # the pass under way when the limit changed, at most, and then the next decision
    assert final["ram"]["dirty-sync-count"] <= seen + 2
