"""Live migration with source and destination in one process (threads, real sockets)."""

from __future__ import annotations

import time

import pytest

from _migration_helpers import (GUEST_KINDS, guest_config, migrate_locally, running_guest,
                                wait_for)
from pymig.errors import GuestError, MigrationError
from pymig.guest.workloads import expected_compute_result, verify_selfcheck
from pymig.machine import Machine
from pymig.migration import Migration
from pymig.policy import Action, Decision
from pymig.ram import block_digests


@pytest.fixture(params=["tcp4", "tcp6", "unix"])
def uri(request, tmp_path):
    return {"tcp4": "tcp:127.0.0.1:0", "tcp6": "tcp:[::1]:0",
            "unix": f"unix:{tmp_path}/migration.sock"}[request.param]


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_running_selfcheck_guest_continues_on_destination(kind, uri):
    source = running_guest(guest_config(kind, vcpus=2))
    try:
        done = migrate_locally(source, uri)
        assert done.error is None, done.error
        assert done.migration.status.value == "completed"
        # the source stays paused at the switchover point: what it holds is what moved
        assert source.status == "paused"
        assert block_digests(source.ram_blocks) == done.digests_at_load
        dest = done.destination
        before = dest.progress()["passes"]
        wait_for(lambda: dest.progress()["passes"] > before + 1, what="passes on destination")
        dest.pause()
        report = verify_selfcheck(dest)
        assert report.ok, report.detail
        assert report.errors == 0
        stats = done.migration.query()
        assert stats["status"] == "completed"
        assert stats["ram"]["remaining"] == 0
        assert stats["downtime"] >= 0
        assert stats["switchover-reason"] == "fits-limit"
    finally:
        source.close()
        if done.destination is not None:
            done.destination.close()


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_computation_started_on_source_finishes_on_destination(kind, tmp_path):
    params = {"rounds": 400, "region_bytes": 4 << 20}
    config = guest_config(kind, "compute", **params)
    source = running_guest(config)
    try:
        time.sleep(0.05)
        assert not source.progress()["done"], "the computation finished before migrating"
        done = migrate_locally(source, f"unix:{tmp_path}/m.sock")
        assert done.error is None, done.error
        dest = done.destination
        wait_for(lambda: dest.progress()["done"], timeout=120, what="the computation")
        assert dest.progress()["result"] == expected_compute_result(config.params, 1)
    finally:
        source.close()
        if done.destination is not None:
            done.destination.close()


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_random_content_arrives_page_for_page(kind, tmp_path):
    source = running_guest(guest_config(kind, "idle", memory=32 << 20, fill_bytes=12 << 20))
    done = None
    try:
        done = migrate_locally(source, f"unix:{tmp_path}/m.sock")
        assert done.error is None, done.error
        assert block_digests(source.ram_blocks) == done.digests_at_load
        stats = done.migration.query()
        assert stats["ram"]["normal"] >= (12 << 20) // 4096
    finally:
        source.close()
        if done is not None and done.destination is not None:
            done.destination.close()


def test_cancel_mid_migration_keeps_source_running_and_destination_stopped(tmp_path):
    source = running_guest(guest_config("simulated", memory=128 << 20, working_set=64 << 20))

    def cancel_when_active(migration):
        wait_for(lambda: migration.query().get("ram", {}).get("transferred", 0) > (4 << 20),
                 what="some RAM on the wire")
        migration.cancel()

    try:
        done = migrate_locally(source, f"unix:{tmp_path}/m.sock",
                               params={"max-bandwidth": 20 << 20}, during=cancel_when_active)
        assert done.migration.status.value == "cancelled"
        assert done.result is None and done.error is not None
        assert source.status == "running"
        before = source.progress()["passes"]
        wait_for(lambda: source.progress()["passes"] > before, what="source progress")
        with pytest.raises(GuestError):
            source.sync_dirty()  # dirty logging is off again
        source.pause()
        assert verify_selfcheck(source).ok
        assert done.migration.query()["status"] == "cancelled"
    finally:
        source.close()


def test_destination_refusal_resumes_source_with_its_reason(tmp_path):
    from pymig.incoming import Incoming
    import threading

    source = running_guest(guest_config("simulated"))
    try:
        def refuse(config):
            raise ValueError("this destination only takes 2 vCPUs")

        incoming = Incoming(f"unix:{tmp_path}/m.sock", check_config=refuse, accept_timeout=30)
        bound = incoming.listen()
        errors = []
        thread = threading.Thread(target=lambda: _capture(incoming.run, errors), daemon=True)
        thread.start()
        migration = Migration(Machine.source(source))
        migration.start(bound)
        assert migration.wait(60).value == "failed"
        thread.join(30)
        assert "only takes 2 vCPUs" in migration.query()["error-desc"]
        assert errors and "only takes 2 vCPUs" in str(errors[0])
        assert source.status == "running"
        assert incoming.machine is None
    finally:
        source.close()


def _capture(fn, errors):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)


def test_a_second_migrate_is_refused_while_one_is_active(tmp_path):
    source = running_guest(guest_config("simulated", memory=128 << 20, working_set=64 << 20))

    def second(migration):
        with pytest.raises(MigrationError, match="already"):
            migration.start(f"unix:{tmp_path}/other.sock")
        migration.cancel()

    try:
        done = migrate_locally(source, f"unix:{tmp_path}/m.sock",
                               params={"max-bandwidth": 10 << 20}, during=second)
        assert done.migration.status.value == "cancelled"
    finally:
        source.close()


def test_blocker_refuses_with_its_reason(tmp_path):
    source = running_guest(guest_config("simulated"))
    try:
        machine = Machine.source(source)
        machine.registry.add_blocker("device passthrough has no migration support")
        with pytest.raises(MigrationError, match="passthrough"):
            Migration(machine).start(f"unix:{tmp_path}/m.sock")
        assert source.status == "running"
    finally:
        source.close()


def test_bad_uri_is_refused_before_anything_starts():
    source = running_guest(guest_config("simulated"))
    try:
        migration = Migration(Machine.source(source))
        with pytest.raises(ValueError, match="bad migration URI"):
            migration.start("tcp:localhost")
        assert migration.status.value == "none"
    finally:
        source.close()


def test_injected_policy_can_cancel_and_source_keeps_running(tmp_path):
    def never(metrics, params):
        return Decision(Action.CANCEL, "cancelled-by-limit: test", 0, None, float("inf"))

    source = running_guest(guest_config("simulated"))
    try:
        done = migrate_locally(source, f"unix:{tmp_path}/m.sock", decide=never)
        assert done.migration.status.value == "cancelled"
        assert "cancelled-by-limit: test" in str(done.migration.error)
        assert source.status == "running"
    finally:
        source.close()


def test_trace_has_one_line_per_sync(tmp_path):
    from pymig.stats import read_trace

    source = running_guest(guest_config("simulated"))
    try:
        done = migrate_locally(source, f"unix:{tmp_path}/m.sock",
                               trace_path=str(tmp_path / "trace.jsonl"))
        assert done.error is None
        records = read_trace(tmp_path / "trace.jsonl")
        assert len(records) == done.migration.query()["ram"]["dirty-sync-count"]
        assert [r["iteration"] for r in records] == list(range(1, len(records) + 1))
        assert records[0]["bytes"] == 0  # nothing sent before the first sync
        assert all(r["page_size"] == 4096 for r in records)
    finally:
        source.close()
        done.destination.close()
