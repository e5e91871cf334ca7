"""QEMU's own QMP library (``qemu.qmp``) drives pymig's control socket as it drives QEMU: the
greeting and capabilities negotiation, commands and their errors, MIGRATION and MIGRATION_PASS
events, a cancelled migration and a whole one between two processes; and over TCP, with the
token in ``qmp_capabilities``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest
from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient

from _control_helpers import WAIT_S, serve_guest
from _migration_helpers import (ANY_KIND_ARGS, GUEST_KINDS, announced_port, assert_carries_on,
                                finish, pymig_process, start_source, wait_for_path)

MiB = 1 << 20
SMALL = {"memory": "64M", "working_set": "8M"}
TERMINAL = ("completed", "failed", "cancelled")


def check_greeting(client: QMPClient) -> None:
    qmp = client.greeting.QMP
    assert qmp.capabilities == []  # no out-of-band execution offered, so none negotiated
    assert qmp.version["package"] == "pymig"
    assert sorted(qmp.version["qemu"]) == ["major", "micro", "minor"]
    assert all(isinstance(v, int) for v in qmp.version["qemu"].values())


def check_timestamp(event) -> None:
    stamp = event["timestamp"]
    assert sorted(stamp) == ["microseconds", "seconds"], event
    assert isinstance(stamp["seconds"], int) and isinstance(stamp["microseconds"], int)
    assert 0 <= stamp["microseconds"] < 1_000_000
    assert abs(stamp["seconds"] + stamp["microseconds"] / 1e6 - time.time()) < 600


async def until(listener: EventListener, done, timeout: float = WAIT_S) -> list:
    """Events from ``listener`` up to and including the first that ``done`` accepts."""
    seen = []
    while not seen or not done(seen[-1]):
        seen.append(await asyncio.wait_for(listener.get(), timeout))
        check_timestamp(seen[-1])
    return seen


def migration_ended(event) -> bool:
    return event["event"] == "MIGRATION" and event["data"]["status"] in TERMINAL


def statuses(events) -> list[str]:
    return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]


async def connect(address) -> QMPClient:
    client = QMPClient("pymig")
    await client.connect(address)
    return client


async def disconnect(client: QMPClient, server_closes: bool = False) -> None:
    """As QEMU's own test harness does after ``quit``: when the server closes the connection
    (``server_closes``), the EOF the client meets is the expected end."""
    try:
        await client.disconnect()
    except EOFError:
        if not server_closes:
            raise


# -- errors and a cancelled migration ---------------------------------------------------------

async def errors_and_cancel(ctl: str) -> None:
    client = await connect(ctl)
    try:
        check_greeting(client)
        with pytest.raises(ExecuteError) as caught:
            await client.execute("x-no-such-command")
        assert caught.value.error_class == "CommandNotFound"
        assert caught.value.error.error.desc == "The command x-no-such-command has not been found"
        with pytest.raises(ExecuteError) as caught:
            await client.execute("qmp_capabilities")
        assert caught.value.error_class == "CommandNotFound"  # negotiated already
        for command, arguments, words in [
            ("migrate", {}, "Parameter 'uri' is missing"),
            ("migrate", {"uri": 7}, "Invalid parameter type for 'uri', expected: string"),
            ("migrate", {"uri": "tcp:127.0.0.1:1", "bogus": True}, "'bogus' is unexpected"),
            ("migrate-set-parameters", {"downtime-limit": "soon"}, "downtime-limit"),
            ("migrate-set-capabilities", {"capabilities": [{"capability": "x", "state": True}]},
             "x"),
        ]:
            with pytest.raises(ExecuteError) as caught:
                await client.execute(command, arguments)
            assert caught.value.error_class == "GenericError", (command, arguments)
            assert words in caught.value.error.error.desc, caught.value.error.error.desc
        assert (await client.execute("query-status"))["status"] == "running"

        events = EventListener(("MIGRATION", "MIGRATION_PASS"))
        with client.listen(events):
            await client.execute("migrate-set-parameters",
                                 {"max-bandwidth": 1 * MiB, "compression": "none"})
            assert await client.execute("migrate", {"uri": "exec:cat > /dev/null"}) == {}
            seen = await until(events, lambda e: e["event"] == "MIGRATION_PASS")
            assert statuses(seen)[:2] == ["setup", "active"]
            assert seen[-1]["data"]["pass"] >= 1
            assert (await client.execute("query-migrate"))["status"] == "active"
            assert await client.execute("migrate_cancel") == {}
            seen = await until(events, migration_ended)
        assert statuses(seen)[-2:] == ["cancelling", "cancelled"]
        assert (await client.execute("query-migrate"))["status"] == "cancelled"
        assert await client.execute("query-status") == {"running": True, "status": "running"}
        assert await client.execute("quit") == {}
    finally:
        await disconnect(client, server_closes=True)


def test_errors_and_a_cancelled_migration_through_qemu_qmp(tmp_path):
    src, ctl = start_source("simulated", tmp_path, **SMALL)
    try:
        asyncio.run(errors_and_cancel(ctl))
        assert src.wait(60) == 0
        # The cancelled exec: command was killed: the migration says so, no thread dies of it.
        assert "Traceback" not in src.stderr.read().decode(errors="replace")
    finally:
        finish(src)


async def negotiation(ctl: str) -> None:
    client = QMPClient("pymig")
    client.negotiate = False  # the client negotiates by hand, as a QEMU script may
    await client.connect(ctl)
    try:
        with pytest.raises(ExecuteError) as caught:
            await client.execute("query-status")
        assert caught.value.error_class == "CommandNotFound"
        assert "qmp_capabilities" in caught.value.error.error.desc
        with pytest.raises(ExecuteError) as caught:
            await client.execute("qmp_capabilities", {"enable": ["oob"]})
        assert caught.value.error.error.desc == "Capability 'oob' not available"
        with pytest.raises(ExecuteError) as caught:
            await client.execute("qmp_capabilities", {"enable": ["warp-drive"]})
        assert "does not accept value 'warp-drive'" in caught.value.error.error.desc
        assert await client.execute("qmp_capabilities", {"enable": []}) == {}
        assert (await client.execute("query-status"))["running"] is True
    finally:
        await client.disconnect()


def test_capabilities_negotiation_as_qemu_answers_it(tmp_path):
    served = serve_guest(tmp_path, working_set=8 * MiB)
    try:
        asyncio.run(negotiation(served.path))
    finally:
        served.close()


@pytest.mark.parametrize("ident", [None, 0, "x", [1, {"a": None}], {"nested": ["id"]}])
def test_any_json_id_comes_back_as_it_was(tmp_path, ident):
    served = serve_guest(tmp_path, working_set=8 * MiB)
    try:
        raw = served.raw().negotiate()
        raw.send(json.dumps({"execute": "query-status", "id": ident}).encode() + b"\n")
        answer = raw.answer()
        assert "id" in answer and answer["id"] == ident
        raw.send(json.dumps({"execute": "no-such", "id": ident}).encode() + b"\n")
        answer = raw.answer()
        assert answer["error"]["class"] == "CommandNotFound" and answer["id"] == ident
    finally:
        served.close()


# -- a whole migration between two processes --------------------------------------------------

async def migrate_with_qemu_qmp(src_ctl: str, dst_ctl: str, uri: str) -> None:
    src, dst = await connect(src_ctl), await connect(dst_ctl)
    try:
        check_greeting(src)
        check_greeting(dst)
        assert await dst.execute("query-status") == {"running": False, "status": "inmigrate"}
        assert (await dst.execute("migrate-incoming", {"uri": uri}))["uri"] == uri
        await src.execute("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 0})
        params = await src.execute("query-migrate-parameters")
        assert params["downtime-limit"] == 300 and params["max-bandwidth"] == 0
        await src.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "auto-converge", "state": True},
            {"capability": "pause-before-switchover", "state": True}]})
        capabilities = {c["capability"]: c["state"]
                        for c in await src.execute("query-migrate-capabilities")}
        assert capabilities["auto-converge"] and capabilities["pause-before-switchover"]

        src_events = EventListener(("MIGRATION", "MIGRATION_PASS", "STOP"))
        dst_events = EventListener(("MIGRATION", "RESUME"))
        with src.listen(src_events), dst.listen(dst_events):
            assert await src.execute("migrate", {"uri": uri, "detach": True}) == {}
            seen = await until(src_events, lambda e: e["event"] == "MIGRATION"
                               and e["data"]["status"] == "pre-switchover", timeout=120)
            assert await src.execute("query-status") == {"running": False,
                                                         "status": "finish-migrate"}
            assert await src.execute("migrate-continue", {"state": "pre-switchover"}) == {}
            seen += await until(src_events, migration_ended, timeout=120)
            arrived = await until(dst_events, lambda e: e["event"] == "RESUME")
        assert statuses(seen) == ["setup", "active", "pre-switchover", "device", "completed"]
        passes = [e["data"]["pass"] for e in seen if e["event"] == "MIGRATION_PASS"]
        assert passes and passes == sorted(passes) and passes[0] >= 1
        assert any(e["event"] == "STOP" for e in seen)  # the guest paused for the switchover
        assert statuses(arrived)[-1] == "completed"

        info = await src.execute("query-migrate")
        assert info["status"] == "completed"
        assert info["ram"]["remaining"] == 0 and info["ram"]["transferred"] > 0
        assert info["total-time"] > 0 and info["downtime"] >= 0
        assert await src.execute("query-status") == {"running": False, "status": "postmigrate"}
        assert await dst.execute("query-status") == {"running": True, "status": "running"}
        assert await src.execute("quit") == {}
    finally:
        await disconnect(src, server_closes=True)
        await disconnect(dst)


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_a_whole_migration_through_qemu_qmp(tmp_path, kind):
    src, src_ctl = start_source(kind, tmp_path, **SMALL)
    dst_ctl = str(tmp_path / "dst.sock")
    dst = pymig_process("incoming", "defer", *ANY_KIND_ARGS, "--control", dst_ctl, "--quiet",
                        stderr=subprocess.PIPE)
    try:
        wait_for_path(dst_ctl, dst)
        asyncio.run(migrate_with_qemu_qmp(src_ctl, dst_ctl, f"unix:{tmp_path}/m.sock"))
        assert src.wait(60) == 0
        assert_carries_on(dst_ctl)  # the guest runs on over there, every page consistent
    finally:
        finish(src, dst)


# -- over TCP ---------------------------------------------------------------------------------

async def over_tcp(port: int, token: str) -> None:
    refused = QMPClient("no-token")
    with pytest.raises(ConnectError):  # its own negotiation carries no token
        await refused.connect(("127.0.0.1", port))

    wrong = QMPClient("wrong-token")
    wrong.negotiate = False
    await wrong.connect(("127.0.0.1", port))
    try:
        with pytest.raises(ExecuteError) as caught:
            await wrong.execute("qmp_capabilities", {"token": "f" * len(token)})
        assert "Authentication failed" in caught.value.error.error.desc
    finally:
        await disconnect(wrong, server_closes=True)  # it refused the client

    client = QMPClient("with-token")
    client.negotiate = False
    await client.connect(("127.0.0.1", port))
    try:
        assert await client.execute("qmp_capabilities", {"token": token}) == {}
        check_greeting(client)
        events = EventListener(("STOP", "RESUME"))
        with client.listen(events):
            assert await client.execute("stop") == {}
            assert (await until(events, lambda e: True))[0]["event"] == "STOP"
            assert await client.execute("cont") == {}
            assert (await until(events, lambda e: True))[0]["event"] == "RESUME"
        assert (await client.execute("query-status"))["status"] == "running"
    finally:
        await client.disconnect()


def test_qemu_qmp_over_tcp_with_the_token(tmp_path):
    token_path = tmp_path / "control.token"
    src, _ = start_source("simulated", tmp_path, **SMALL,
                          extra=["--control-tcp", "0", "--control-tcp-token", str(token_path)])
    try:
        port = announced_port(src)
        asyncio.run(over_tcp(port, token_path.read_text().strip()))
    finally:
        finish(src)
