"""Every control-socket command doing its job (sessions served in this process)."""

from __future__ import annotations

import time

import pytest

from _control_helpers import pair, source  # noqa: F401 - fixtures
from _control_helpers import (WAIT_S, migrate_incoming, next_event, refused,
                              start_slow_migration, statuses_until_end, wait_status)
from _migration_helpers import assert_carries_on, wait_for
from pymig.control import COMMANDS, ControlServer
from pymig.qmp import QmpClient, QmpError, control_address
from pymig.session import Session

MiB = 1 << 20


def test_greeting_then_negotiation(source):
    raw = source.raw()
    qmp = raw.greeting["QMP"]
    assert qmp["capabilities"] == []
    # QEMU's VersionInfo, as QMP clients read it (qmp-shell prints version.qemu), naming pymig
    assert set(qmp["version"]["qemu"]) == {"major", "minor", "micro"}
    assert qmp["version"]["package"] == "pymig"
    assert raw.execute("qmp_capabilities", enable=[]) == {"return": {}}


def test_query_commands_and_version(source):
    client = source.client()
    names = {c["name"] for c in client.command("query-commands")}
    assert names == set(COMMANDS)
    assert names >= {"qmp_capabilities", "migrate", "migrate-incoming", "query-migrate",
                     "migrate_cancel", "migrate-set-parameters", "query-migrate-parameters",
                     "migrate-set-capabilities", "query-migrate-capabilities", "query-status",
                     "stop", "cont", "quit"}
    assert client.command("query-version")["package"] == "pymig"


def test_stop_and_cont(source):
    client = source.client()
    assert client.command("query-status") == {"running": True, "status": "running"}
    client.command("stop")
    next_event(client, "STOP")
    assert client.command("query-status") == {"running": False, "status": "paused"}
    written = client.command("query-guest")["progress"]["pages_written"]
    time.sleep(0.2)
    assert client.command("query-guest")["progress"]["pages_written"] == written
    assert client.command("query-guest", verify=True)["selfcheck"]["ok"]
    client.command("cont")
    next_event(client, "RESUME")
    assert client.command("query-status") == {"running": True, "status": "running"}
    wait_for(lambda: client.command("query-guest")["progress"]["pages_written"] > written,
             what="the guest to run again")


def test_parameters_set_and_query(source):
    client = source.client()
    defaults = client.command("query-migrate-parameters")
    assert defaults["downtime-limit"] == 300 and defaults["max-bandwidth"] == 0
    assert defaults["vcpu-dirty-limit"] == 0  # no cap until a user sets one
    # auto-converge is QEMU's unless pymig's own aim is asked for
    assert defaults["x-cpu-throttle-mode"] == "step"
    assert (defaults["cpu-throttle-initial"], defaults["cpu-throttle-increment"],
            defaults["max-cpu-throttle"], defaults["cpu-throttle-tailslow"]) == (20, 10, 99, False)
    client.command("migrate-set-parameters", **{
        "downtime-limit": 50, "max-bandwidth": 10 * MiB, "cpu-throttle-initial": 30,
        "cpu-throttle-increment": 5, "max-cpu-throttle": 90, "x-cpu-throttle-mode": "aim",
        "throttle-trigger-threshold": 40, "cpu-throttle-tailslow": True, "max-iterations": 7,
        "max-total-time": 60000,
        "max-bytes-ratio": 2.5, "limit-action": "cancel"})
    now = client.command("query-migrate-parameters")
    assert now == dict(defaults, **{
        "downtime-limit": 50, "max-bandwidth": 10 * MiB, "cpu-throttle-initial": 30,
        "cpu-throttle-increment": 5, "max-cpu-throttle": 90, "x-cpu-throttle-mode": "aim",
        "throttle-trigger-threshold": 40, "cpu-throttle-tailslow": True, "max-iterations": 7,
        "max-total-time": 60000,
        "max-bytes-ratio": 2.5, "limit-action": "cancel"})
    client.command("migrate-set-parameters")  # nothing to set is fine
    assert client.command("query-migrate-parameters") == now


def test_capabilities_set_and_query(source):
    client = source.client()
    caps = client.command("query-migrate-capabilities")
    assert caps == [{"capability": "block", "state": False},
                    {"capability": "auto-converge", "state": False},
                    {"capability": "dirty-limit", "state": False},
                    {"capability": "pause-before-switchover", "state": False},
                    {"capability": "postcopy-ram", "state": False},
                    {"capability": "background-snapshot", "state": False},
                    {"capability": "postcopy-preempt", "state": False}]
    client.command("migrate-set-capabilities", capabilities=[
        {"capability": "auto-converge", "state": True}])
    assert {c["capability"]: c["state"] for c in client.command(
        "query-migrate-capabilities")} == {"block": False, "auto-converge": True,
                                           "dirty-limit": False,
                                           "pause-before-switchover": False,
                                           "postcopy-ram": False,
                                           "background-snapshot": False,
                                           "postcopy-preempt": False}
    # capabilities that exclude each other are refused together, as QEMU refuses them
    with pytest.raises(QmpError, match="Background-snapshot is not compatible with "
                                       "auto-converge"):
        client.command("migrate-set-capabilities", capabilities=[
            {"capability": "background-snapshot", "state": True}])
    client.command("migrate-set-capabilities", capabilities=[
        {"capability": "auto-converge", "state": False},
        {"capability": "background-snapshot", "state": True}])
    assert {c["capability"]: c["state"] for c in client.command(
        "query-migrate-capabilities")}["background-snapshot"] is True


def test_migrate_to_a_deferred_destination(pair, tmp_path):
    src, dst = pair
    sc, dc = src.client(), dst.client()
    assert dc.command("query-status") == {"running": False, "status": "inmigrate"}
    assert dc.command("query-migrate") == {}
    assert sc.command("query-migrate") == {}
    uri = dc.command("migrate-incoming", uri=f"unix:{tmp_path}/m.sock")["uri"]
    assert uri == f"unix:{tmp_path}/m.sock"
    assert dc.command("query-migrate")["status"] == "setup"
    assert sc.command("migrate", uri=uri, detach=True) == {}
    final = wait_status(sc, "completed")
    assert set(final) >= {"status", "total-time", "setup-time", "downtime", "ram",
                          "cpu-throttle-percentage", "switchover-reason"}
    assert set(final["ram"]) >= {"transferred", "remaining", "total", "duplicate", "normal",
                                 "normal-bytes", "dirty-pages-rate", "dirty-sync-count", "mbps",
                                 "pages-per-second", "page-size"}
    assert final["ram"]["remaining"] == 0 and final["ram"]["total"] == 64 * MiB
    assert sc.command("query-status") == {"running": False, "status": "postmigrate"}
    assert dst.session.guest_ready.wait(WAIT_S)
    assert dc.command("query-status") == {"running": True, "status": "running"}
    assert dc.command("query-migrate")["status"] == "completed"
    assert_carries_on(dst.path)


def test_the_destination_guest_answers_as_soon_as_the_source_has_completed(pair, tmp_path,
                                                                            monkeypatch):
    # The source completes on the destination's ACK; the destination's receiving thread is
    # still freeing its load buffers.  A user (pymig demo) who asks the destination for its
    # guest right then gets it, not "no guest yet".
    from pymig.machine import Machine

    release = Machine.release_load_buffers

    def slow_release(self):
        time.sleep(0.5)
        release(self)

    monkeypatch.setattr(Machine, "release_load_buffers", slow_release)
    src, dst = pair
    sc, dc = src.client(), dst.client()
    uri = dc.command("migrate-incoming", uri=f"unix:{tmp_path}/m.sock")["uri"]
    sc.command("migrate", uri=uri, detach=True)
    wait_status(sc, "completed")
    assert dst.session.incoming_result is None  # the window this test is about
    assert dc.command("query-guest")["progress"]["passes"] >= 0
    assert dst.session.guest_ready.is_set()


def test_migrate_cancel_keeps_the_guest_running(pair, tmp_path):
    src, dst = pair
    sc, dc = src.client(), dst.client()
    start_slow_migration(sc, migrate_incoming(dc, tmp_path))
    sc.command("migrate_cancel")
    assert wait_status(sc, "cancelled")["status"] == "cancelled"
    assert sc.command("query-status")["status"] == "running"
    assert_carries_on(src.path)
    assert dst.session.quit_requested.wait(WAIT_S)  # a destination whose migration failed ends
    assert dst.session.machine is None
    sc.command("migrate_cancel")  # nothing to cancel any more: fine, as QEMU


@pytest.mark.parametrize("then", ["migrate-continue", "migrate_cancel"])
def test_pause_before_switchover_waits_in_pre_switchover_with_the_guest_stopped(pair, tmp_path,
                                                                               then):
    src, dst = pair
    sc, dc = src.client(), dst.client()
    uri = migrate_incoming(dc, tmp_path)
    sc.command("migrate-set-capabilities", capabilities=[
        {"capability": "pause-before-switchover", "state": True}])
    sc.command("migrate", uri=uri)
    assert wait_status(sc, "pre-switchover")["status"] == "pre-switchover"
    time.sleep(0.3)  # it stays there, the guest stopped, until told
    assert sc.command("query-migrate")["status"] == "pre-switchover"
    assert sc.command("query-status") == {"running": False, "status": "finish-migrate"}
    if then == "migrate_cancel":
        sc.command("migrate_cancel")
        assert wait_status(sc, "cancelled")["status"] == "cancelled"
        assert sc.command("query-status") == {"running": True, "status": "running"}
        assert_carries_on(src.path)
        return
    sc.command("migrate-continue", state="pre-switchover")
    assert wait_status(sc, "completed")["status"] == "completed"
    assert statuses_until_end(sc) == ["setup", "active", "pre-switchover", "device",
                                      "completed"]
    assert "pre-switchover" in sc.command("query-migrate")["downtime-breakdown"]


def test_x_migrate_switchover_forces_a_manual_switchover(pair, tmp_path):
    src, dst = pair
    sc, dc = src.client(), dst.client()
    uri = migrate_incoming(dc, tmp_path)
    # a guest dirtying 400 MB/s over 32 MiB/s with a 1 ms limit never converges by itself
    sc.command("migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": 32 * MiB,
                                            "compression": "none"})
    sc.command("migrate", uri=uri)
    next_event(sc, "MIGRATION_PASS")
    next_event(sc, "MIGRATION_PASS")
    sc.command("x-migrate-switchover")
    final = wait_status(sc, "completed")
    assert final["switchover-reason"] == "manual"


def test_file_snapshot_keeps_the_guest_running_unless_resume_is_false(source, tmp_path):
    client = source.client()
    client.command("migrate", uri=f"file:{tmp_path}/live.pymig")
    assert wait_status(client, "completed")["status"] == "completed"
    assert client.command("query-status") == {"running": True, "status": "running"}
    assert (tmp_path / "live.pymig").stat().st_size > 0
    client.command("migrate", uri=f"file:{tmp_path}/stopped.pymig", resume=False)
    wait_status(client, "completed")
    assert client.command("query-status") == {"running": False, "status": "paused"}
    client.command("cont")  # a snapshot is a copy: the guest may carry on here
    assert client.command("query-status")["status"] == "running"


def test_quit_answers_then_ends_the_session(source):
    raw = source.raw().negotiate()
    assert raw.execute("quit") == {"return": {}}
    with pytest.raises(EOFError):
        raw.read()
    assert source.session.quit_requested.is_set()


def test_loopback_tcp_serves_the_same_commands(source):
    host, port = source.server.tcp_address
    assert host == "127.0.0.1" and port > 0
    with QmpClient(control_address(f"tcp:127.0.0.1:{port}"),
                   token_path=source.server.token_path) as client:
        assert client.command("query-status")["status"] == "running"


def test_tcp_is_loopback_only(tmp_path):
    with pytest.raises(ValueError, match="loopback only"):
        ControlServer(Session(), tcp=("0.0.0.0", 0))
