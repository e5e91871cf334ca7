"""The control socket answers every bad input and every command in the wrong state with a QMP
error object (class and description), and carries on serving."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from _control_helpers import pair, source  # noqa: F401 - fixtures
from _control_helpers import (WAIT_S, RawClient, migrate_incoming, next_event, refused,
                              serve_destination, start_slow_migration, wait_status)
from _migration_helpers import wait_for
from pymig import control
from pymig.qmp import QmpError

MiB = 1 << 20


@pytest.fixture
def raw(source):
    return source.raw().negotiate()


def error_of(answer: dict) -> tuple[str, str]:
    assert set(answer) <= {"error", "id"}, answer
    return answer["error"]["class"], answer["error"]["desc"]


def still_serving(raw: RawClient) -> None:
    assert raw.execute("query-status")["return"]["status"] in ("running", "paused",
                                                               "postmigrate", "inmigrate")


# -- protocol --------------------------------------------------------------------------------

def test_commands_before_negotiation_are_not_found(source):
    raw = source.raw()
    assert error_of(raw.execute("query-status")) == (
        "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
    cls, desc = error_of(raw.execute("qmp_capabilities", enable=["oob"]))
    assert cls == "GenericError" and "oob" in desc
    raw.negotiate()
    assert error_of(raw.execute("qmp_capabilities"))[0] == "CommandNotFound"
    still_serving(raw)


@pytest.mark.parametrize("text, words", [
    (b'{"execute": }', "JSON parse error"),
    (b'{"execute": "query-status"', None),  # incomplete: completed by the next line below
    (b'[1, 2]', "must be a JSON object"),
    (b'42', "must be a JSON object"),
    (b'"query-status"', "must be a JSON object"),
    (b'null', "must be a JSON object"),
    (b'}', "JSON parse error"),
    (b'{"arguments": {}}', "lacks member 'execute'"),
    (b'{"execute": 5}', "lacks member 'execute'"),
    (b'{"execute": "query-status", "arguments": []}', "'arguments' must be an object"),
    (b'{"execute": "query-status", "exec-oob": 1}', "'exec-oob' is unexpected"),
    (b'{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": NaN}}',
     "NaN is not valid JSON"),
    (b'{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": Infinity}}',
     "Infinity is not valid JSON"),
    (b'{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1e400}}',
     "out of range"),
    (b'[' * 100_000 + b']' * 100_000, "JSON parse error"),
    (b'{"execute": "\xff\xfe"}', "JSON parse error"),
])
def test_malformed_input_gets_an_error_and_the_connection_goes_on(raw, text, words):
    raw.send(text + b"\n")
    if words is None:
        raw.send(b"}\n")
        assert raw.answer()["return"]["status"] == "running"
    else:
        cls, desc = error_of(raw.answer())
        assert cls == "GenericError" and words in desc, desc
    still_serving(raw)


def test_unknown_command_is_not_found(raw):
    answer = raw.execute("self-destruct")
    assert error_of(answer) == ("CommandNotFound", "The command self-destruct has not been found")
    still_serving(raw)


@pytest.mark.parametrize("command, arguments, desc", [
    ("query-status", {"verbose": True}, "Parameter 'verbose' is unexpected"),
    ("migrate", {}, "Parameter 'uri' is missing"),
    ("migrate", {"uri": 7}, "Invalid parameter type for 'uri', expected: string"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "detach": "yes"},
     "Invalid parameter type for 'detach', expected: boolean"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "resume": 1},
     "Invalid parameter type for 'resume', expected: boolean"),
    ("migrate", {"uri": "file:/x", "trace": ["t"]},
     "Invalid parameter type for 'trace', expected: string"),
    ("migrate", {"uri": ""}, "Parameter 'uri' must not be empty"),
    ("migrate-set-capabilities", {}, "Parameter 'capabilities' is missing"),
    ("migrate-set-capabilities", {"capabilities": {"auto-converge": True}},
     "Invalid parameter type for 'capabilities', expected: array"),
    ("query-guest", {"verify": "true"}, "Invalid parameter type for 'verify', expected: boolean"),
    ("migrate-continue", {"state": "active"}, "'state' must be 'pre-switchover'"),
])
def test_bad_arguments_are_refused_with_qmp_wording(raw, command, arguments, desc):
    cls, text = error_of(raw.execute(command, **arguments))
    assert cls == "GenericError" and desc in text, text
    still_serving(raw)


def test_ids_are_echoed_and_texts_need_no_newlines(raw):
    raw.send(b'{"execute":"query-status","id":1}{"execute":"nope","id":[2]}'
             b'{"execute":"query-status","id":{"three":3}}')
    assert raw.answer() == {"return": {"running": True, "status": "running"}, "id": 1}
    assert raw.answer()["id"] == [2]
    assert raw.answer()["id"] == {"three": 3}
    for byte in b'{"execute": "query-status", "id": "split"}':  # one byte per write
        raw.send(bytes([byte]))
    assert raw.answer()["id"] == "split"


def test_a_message_over_the_limit_is_refused_and_ends_only_that_connection(source, raw):
    raw.send(b'{"execute": "query-status", "arguments": {"x": "')
    try:
        for _ in range(2 * MiB // 65536):
            raw.send(b"a" * 65536)
    except OSError:
        pass  # the server stopped reading once it had refused the message
    cls, desc = error_of(raw.answer())
    assert cls == "GenericError" and "longer than" in desc
    with pytest.raises((EOFError, OSError)):
        raw.read()
    still_serving(source.raw().negotiate())


def test_clients_that_vanish_do_not_disturb_the_server(source):
    for _ in range(5):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(source.path)
        sock.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-sta')
        sock.close()
    still_serving(source.raw().negotiate())


def test_a_bug_in_a_command_is_an_internal_error_not_a_crash(source, raw, monkeypatch):
    def broken(session, args):
        raise RuntimeError("boom")

    monkeypatch.setitem(control.COMMANDS, "query-status",
                        control.Command(broken, {}, "broken on purpose"))
    cls, desc = error_of(raw.execute("query-status"))
    assert cls == "GenericError" and "internal error in query-status: RuntimeError: boom" in desc
    assert raw.execute("query-migrate") == {"return": {}}


def test_a_client_that_stops_reading_is_dropped_without_stalling_events(source, monkeypatch):
    monkeypatch.setattr(control, "MAX_QUEUED_MESSAGES", 64)
    silent = source.raw().negotiate()  # from now on it reads nothing
    server_side = next(iter(c for c in source.server._clients if c.negotiated))
    server_side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    start = time.monotonic()
    for i in range(20_000):  # about 2 MB of events: far more than any socket buffer
        source.session.emit("TEST", {"i": i, "pad": "x" * 64})
    assert time.monotonic() - start < WAIT_S  # emitting never waited for the silent client
    wait_for(lambda: silent_dropped(source, server_side), what="the silent client to be dropped")
    assert source.client().command("query-status")["status"] == "running"
    silent.close()


def silent_dropped(source, client) -> bool:
    return client.closed and client not in source.server._clients


# -- commands in the wrong state -------------------------------------------------------------

def test_wrong_state_during_a_migration(pair, tmp_path):
    src, dst = pair
    sc, dc = src.client(), dst.client()
    start_slow_migration(sc, migrate_incoming(dc, tmp_path))
    assert "already active" in refused(sc, "migrate", uri=f"unix:{tmp_path}/other.sock")
    assert "cannot stop during a migration" in refused(sc, "stop")
    assert "cannot cont during a migration" in refused(sc, "cont")
    assert "not in expected state: active" in refused(sc, "migrate-continue",
                                                      state="pre-switchover")
    assert "during a migration" in refused(
        sc, "migrate-set-capabilities",
        capabilities=[{"capability": "auto-converge", "state": True}])
    assert "already active" in refused(dc, "migrate-incoming", uri=f"unix:{tmp_path}/n.sock")
    assert "cancelled from the destination" in refused(dc, "migrate_cancel")
    assert "no guest yet" in refused(dc, "query-guest")
    assert "no guest" in refused(dc, "migrate", uri=f"unix:{tmp_path}/x.sock")
    sc.command("migrate_cancel")
    assert wait_status(sc, "cancelled")["status"] == "cancelled"
    assert sc.command("query-status")["status"] == "running"


def test_wrong_state_after_the_guest_moved_away(pair, tmp_path):
    src, dst = pair
    sc, dc = src.client(), dst.client()
    assert "runs a guest" in refused(sc, "migrate-incoming", uri=f"unix:{tmp_path}/s.sock")
    assert "not in expected state: none" in refused(sc, "migrate-continue")
    assert "no active migration" in refused(sc, "x-migrate-switchover")
    sc.command("migrate", uri=migrate_incoming(dc, tmp_path))
    wait_status(sc, "completed")
    assert sc.command("query-status")["status"] == "postmigrate"
    assert "migrated away" in refused(sc, "cont")
    assert "migrated away" in refused(sc, "migrate", uri=f"file:{tmp_path}/late.pymig")
    assert sc.command("query-status")["status"] == "postmigrate"
    assert dst.session.guest_ready.wait(WAIT_S)
    assert "already runs a guest" in refused(dc, "migrate-incoming",
                                             uri=f"unix:{tmp_path}/again.sock")


def test_migrate_incoming_with_a_bad_uri_can_be_retried(pair, tmp_path):
    _, dst = pair
    dc = dst.client()
    assert "bad migration URI" in refused(dc, "migrate-incoming", uri="carrier-pigeon:coop")
    assert "ENOENT" in refused(dc, "migrate-incoming", uri=f"file:{tmp_path}/missing.pymig")
    assert dc.command("query-status")["status"] == "inmigrate"
    uri = dc.command("migrate-incoming", uri=f"unix:{tmp_path}/m.sock")["uri"]
    assert dc.command("query-migrate") == {"status": "setup", "socket-address": uri}


def test_bad_migrate_uris(raw):
    for uri, words in [("tcp:localhost", "bad migration URI"), ("nowhere", "no scheme"),
                       ("fd:999", "not open")]:
        cls, desc = error_of(raw.execute("migrate", uri=uri))
        assert cls == "GenericError" and words in desc, desc
    assert raw.execute("query-migrate") == {"return": {}}  # nothing started
    still_serving(raw)


@pytest.mark.parametrize("values, words", [
    ({"downtime-limit": "fast"}, "must be a number"),
    ({"downtime-limit": 0}, "at least 1"),
    ({"max-cpu-throttle": 100}, "at most 99"),
    ({"max-iterations": 1.5}, "whole number"),
    ({"max-bandwidth": True}, "must be a number"),
    ({"limit-action": "explode"}, "must be one of switchover, cancel"),
    ({"x-cpu-throttle-mode": "pid"}, "must be one of step, aim"),
    ({"cpu-throttle-tailslow": 1}, "must be true or false"),
    ({"compress-level": 1}, "unknown migration parameter 'compress-level'"),
    ({"vcpu-dirty-limit": -100}, "at least 0"),
    ({"downtime-limit": 10, "max-bandwidth": -1}, "at least 0"),  # all or none
])
def test_bad_parameters_change_nothing(raw, values, words):
    before = raw.execute("query-migrate-parameters")["return"]
    cls, desc = error_of(raw.execute("migrate-set-parameters", **values))
    assert cls == "GenericError" and words in desc, desc
    assert raw.execute("query-migrate-parameters")["return"] == before


@pytest.mark.parametrize("caps, words", [
    ([{"capability": "auto-converge"}], "each capability is"),
    ([{"capability": "auto-converge", "state": "on"}], "each capability is"),
    (["auto-converge"], "each capability is"),
    ([{"capability": "x-colo", "state": True}], "unknown migration capability 'x-colo'"),
    ([{"capability": "auto-converge", "state": True}, {"capability": "zzz", "state": True}],
     "unknown"),  # all or none
])
def test_bad_capabilities_change_nothing(raw, caps, words):
    before = raw.execute("query-migrate-capabilities")["return"]
    cls, desc = error_of(raw.execute("migrate-set-capabilities", capabilities=caps))
    assert cls == "GenericError" and words in desc, desc
    assert raw.execute("query-migrate-capabilities")["return"] == before


def test_two_clients_racing_to_migrate_start_one_migration(pair, tmp_path):
    src, dst = pair
    uri = migrate_incoming(dst.client(), tmp_path)
    clients = [src.client() for _ in range(4)]
    clients[0].command("migrate-set-parameters", **{"max-bandwidth": 2 * MiB,
                                                   "compression": "none"})
    results: list = []
    barrier = threading.Barrier(len(clients))

    def go(client):
        barrier.wait()
        try:
            client.command("migrate", uri=uri)
            results.append("started")
        except QmpError as exc:
            results.append(exc.desc)

    threads = [threading.Thread(target=go, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert results.count("started") == 1, results
    assert all("already" in r for r in results if r != "started"), results
    setups = [e for e in _migration_events(clients[0]) if e == "setup"]
    assert setups == ["setup"]
    clients[0].command("migrate_cancel")
    wait_status(clients[0], "cancelled")


def _migration_events(client) -> list[str]:
    first = next_event(client, "MIGRATION")["data"]["status"]
    time.sleep(0.2)
    rest = []
    while not client.events.empty():
        event = client.events.get_nowait()
        if event["event"] == "MIGRATION":
            rest.append(event["data"]["status"])
    return [first] + rest


def test_stop_cont_and_query_guest_need_a_guest(tmp_path):
    dst = serve_destination(tmp_path)
    try:
        client = dst.client()
        for command in ("stop", "cont", "query-guest"):
            assert "no guest yet" in refused(client, command)
        assert "no guest to migrate" in refused(client, "migrate", uri="file:/tmp/x")
        assert client.command("query-status") == {"running": False, "status": "inmigrate"}
        answer = json.loads(json.dumps(client.command("query-migrate-parameters")))
        assert answer["downtime-limit"] == 300
    finally:
        dst.close()
