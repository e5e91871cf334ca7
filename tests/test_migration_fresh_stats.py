"""Every migration a process starts begins with statistics, estimates and a trace of its own:
nothing a failed migration or an earlier snapshot sent shows in the next one's bandwidth,
backlog, expected downtime or counters."""

from __future__ import annotations

import json
import threading

import pytest

from _control_helpers import WAIT_S, serve_guest
from _migration_helpers import (GUEST_KINDS, finish, pymig_process, run_pymig, start_source,
                                wait_for)
from pymig.incoming import Incoming
from pymig.qmp import QmpClient
from pymig.stats import read_trace
from _migration_helpers import ANY_KIND, ANY_KIND_ARGS

MiB = 1 << 20
CAP = 20_000_000  # max-bandwidth of the second migration, bytes/s
FAIL_AT_END = "exec:cat > /dev/null; exit 3"  # takes the whole stream, then fails it


def _receive_in_thread(uri: str):
    """A destination in this process; returns (bound address, join() -> its error or None)."""
    incoming = Incoming(uri, limits=ANY_KIND, accept_timeout=WAIT_S)
    bound = incoming.listen()
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = incoming.run()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join(WAIT_S)
        assert not thread.is_alive(), "the destination did not finish"
        result = box.get("result")
        if result is not None:
            result.machine.guest.close()
        return box.get("error")

    return bound, join


def _wait_ended(client: QmpClient) -> dict:
    box = {}

    def ended() -> bool:
        box["info"] = client.command("query-migrate")
        return box["info"]["status"] in ("completed", "failed", "cancelled")

    wait_for(ended, timeout=WAIT_S * 2, interval=0.05, what="the migration to end")
    return box["info"]


def assert_first_record_is_its_own(first: dict, *, cap: int) -> None:
    """The first sync of a migration comes before it sent any page: no backlog, a bandwidth
    that is only the cap (nothing measured yet), and an expected downtime that sends every
    pending byte at that bandwidth."""
    assert first["iteration"] == 1
    assert first["pages_sent"] == 0 and first["bytes"] == 0, first
    assert first["backlog_bytes"] == 0, first
    assert 0 < first["bandwidth"] <= cap, first
    assert first["pending_bytes"] > 0, first
    assert first["expected_downtime"] is not None, first
    assert first["expected_downtime"] >= first["pending_bytes"] / cap * 1000 * 0.99, first
    assert first["reason"] != "fits-limit" or first["pending_bytes"] <= cap * 0.3, first


def assert_counters_are_its_own(final: dict, records: list[dict]) -> None:
    """query-migrate once the migration completed counts its own syncs and bytes only."""
    assert final["status"] == "completed", final
    assert final["ram"]["dirty-sync-count"] == len(records)
    assert final["iterations"] == records[-1]["iteration"]
    traced = sum(r["bytes"] for r in records)
    # what the syncs saw sent, plus the stop-and-copy: never less, and not a whole guest more
    assert traced <= final["ram"]["transferred"] <= traced + final["ram"]["total"] // 2, \
        (traced, final["ram"])


@pytest.mark.parametrize("kind", GUEST_KINDS)
@pytest.mark.parametrize("first_uri", ["failed-exec", "snapshots"])
def test_second_migration_in_a_process_starts_fresh(kind, first_uri, tmp_path):
    served = serve_guest(tmp_path, kind=kind, memory=64 * MiB, working_set=16 * MiB)
    try:
        client = served.client()
        if first_uri == "failed-exec":
            client.command("migrate", uri=FAIL_AT_END)
            first = _wait_ended(client)
            assert first["status"] == "failed", first
            # it did send the guest's pages (the working set's: 4096 of them)
            assert first["ram"]["normal"] + first["ram"]["duplicate"] >= 4096, first
        else:
            for name in ("one", "two"):
                client.command("migrate", uri=f"file:{tmp_path}/{name}.pymig")
                assert _wait_ended(client)["status"] == "completed"
        assert client.command("query-status")["status"] == "running"

        bound, join = _receive_in_thread("tcp:127.0.0.1:0")
        trace = tmp_path / "second.jsonl"
        client.command("migrate-set-parameters", **{"max-bandwidth": CAP})
        client.command("migrate", uri=bound, trace=str(trace))
        final = _wait_ended(client)
        assert join() is None
        records = read_trace(trace)
        assert_first_record_is_its_own(records[0], cap=CAP)
        assert_counters_are_its_own(final, records)
    finally:
        served.close()


def test_cli_migrate_after_a_failed_one_and_two_snapshots_starts_fresh(tmp_path):
    """The same through the command line, with a source and a destination process."""
    src, ctl = start_source("simulated", tmp_path, memory="64M", working_set="16M")
    dst = None
    try:
        failed = run_pymig("migrate", "--control", ctl, FAIL_AT_END, "--json")
        assert failed.returncode == 1, failed.stderr
        assert json.loads(failed.stdout)["status"] == "failed"
        for name in ("one", "two"):
            done = run_pymig("migrate", "--control", ctl, f"file:{tmp_path}/{name}.pymig",
                             "--json")
            assert done.returncode == 0, done.stderr

        dst_ctl = str(tmp_path / "dst.sock")
        dst = pymig_process("incoming", "tcp:127.0.0.1:0", *ANY_KIND_ARGS, "--control", dst_ctl, "--quiet")
        wait_for(lambda: _address(dst_ctl) is not None, timeout=WAIT_S, what="the destination")
        trace = tmp_path / "t.jsonl"
        moved = run_pymig("migrate", "--control", ctl, _address(dst_ctl), "--max-bandwidth",
                          str(CAP), "--trace", str(trace), "--json")
        assert moved.returncode == 0, moved.stderr
        records = read_trace(trace)
        assert_first_record_is_its_own(records[0], cap=CAP)
        assert_counters_are_its_own(json.loads(moved.stdout), records)
    finally:
        finish(*(p for p in (src, dst) if p is not None))


def _address(ctl: str) -> str | None:
    try:
        with QmpClient(ctl) as client:
            return client.command("query-migrate").get("socket-address")
    except (OSError, Exception):  # noqa: BLE001 - not listening yet
        return None
