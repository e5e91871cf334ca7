"""Whole migrations over TLS (tcp, and a socket passed as fd:), the return path inside the same
session, the TLS parameters over QMP, and the session's full duplex under load."""

from __future__ import annotations

import json
import os
import random
import socket
import threading

import pytest

from _migration_helpers import (GUEST_KINDS, assert_arrived_and_runs, assert_carries_on,
                                e2e_kind, finish, guest_config, guest_passes, guests,  # noqa: F401
                                migrate_locally, run_pymig, start_destination, start_source,
                                wait_for)
from _tls_helpers import SOURCE_DN, Pki, pki  # noqa: F401

from pymig.errors import MigrationError
from pymig.machine import Machine
from pymig.migration import Migration
from pymig.parameters import ParameterStore
from pymig.qmp import QmpClient, QmpError
from pymig.session import CommandError, Session
from pymig.transport import tls
from pymig.transport.channel import SocketChannel

KIND = e2e_kind()


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_tls_migration_over_tcp(guests, pki, kind):
    guest = guests(guest_config(kind))
    done = migrate_locally(guest, "tcp:127.0.0.1:0", params={"tls-creds": "tls0"},
                           credentials=pki.store(pki.dir()),
                           tls=(pki.creds(), (SOURCE_DN,)))
    with done:
        stats = done.migration.query()
        assert stats["tls"]["version"] == "TLSv1.3"
        assert "GCM" in stats["tls"]["cipher"] or "CHACHA20" in stats["tls"]["cipher"]
        assert 0 < stats["tls"]["handshake-time"] <= stats["setup-time"] + 1
        # the destination's LOADED and ACK came back inside the session: a measured downtime
        assert stats["downtime"] >= 0 and "downtime-breakdown" in stats
        assert_arrived_and_runs(done, guest)


def test_tls_needs_a_socket_and_a_name_to_check(guests, pki, tmp_path):
    guest = guests(guest_config("simulated", memory=32 << 20, working_set=4 << 20))
    store = ParameterStore()
    store.set(**{"tls-creds": "tls0"})
    migration = Migration(Machine.source(guest), store, credentials=pki.store(pki.dir()))
    with pytest.raises(MigrationError, match="TLS protects tcp:, unix: and fd: sockets only"):
        migration.start(f"file:{tmp_path / 'snap'}")
    with pytest.raises(MigrationError, match="TLS over unix: needs tls-hostname"):
        migration.start(f"unix:{tmp_path / 'm.sock'}")
    store.set(**{"tls-creds": "nothing-loaded"})
    with pytest.raises(MigrationError, match="neither the id of loaded credentials"):
        migration.start("tcp:127.0.0.1:1")
    assert migration.status.value == "none" and guest.status == "running"


def test_tls_parameters_over_qmp(pki, tmp_path):
    session = Session(destination=True)
    try:
        defaults = session.query_parameters()
        assert (defaults["tls-creds"], defaults["tls-hostname"], defaults["tls-authz"]) == \
            ("", "", [])
        directory = pki.dir()
        session.set_parameters({"tls-creds": directory, "tls-hostname": "dst.example",
                                "tls-authz": [SOURCE_DN, "CN=*.example,O=Example"]})
        shown = session.query_parameters()
        assert shown["tls-creds"] == directory and shown["tls-hostname"] == "dst.example"
        assert shown["tls-authz"] == [SOURCE_DN, "CN=*.example,O=Example"]
        assert json.loads(json.dumps(shown)) == shown  # what QMP sends
        session.set_parameters({"tls-authz": SOURCE_DN})  # one identity, as a string
        assert session.query_parameters()["tls-authz"] == [SOURCE_DN]
        # credentials that cannot work are refused when set, and nothing changes
        with open(f"{directory}/server-key.pem", "wb") as out:
            out.write(pki.ca.issue_cert("x.example").private_key_pem.bytes())
        with pytest.raises(CommandError, match="server-key.pem is not the key"):
            session.set_parameters({"tls-creds": directory, "tls-hostname": "changed"})
        with pytest.raises(CommandError, match="neither the id of loaded credentials"):
            session.set_parameters({"tls-creds": "tls9"})
        with pytest.raises(CommandError, match="not a distinguished name"):
            session.set_parameters({"tls-authz": ["src.example"]})
        assert session.query_parameters()["tls-hostname"] == "dst.example"
        session.load_credentials(pki.dir())
        assert session.query_parameters()["tls-creds"] == "tls0"
        session.set_parameters({"tls-creds": ""})  # TLS off again
        assert session.query_parameters()["tls-creds"] == ""
    finally:
        session.close()


def _secured_pair(pki: Pki):
    a, b = socket.socketpair()
    box = {}
    server_creds, client_creds = pki.creds(), pki.creds()
    server = threading.Thread(target=lambda: box.update(
        s=tls.accept(SocketChannel(b, "destination end"), server_creds)))
    server.start()
    client = tls.connect(SocketChannel(a, "source end"), client_creds, "localhost")
    server.join(30)
    return client, box["s"]


def test_a_session_carries_both_directions_at_once(pki):
    """The stream one way and return-path messages the other, from two threads each side, as a
    migration does: every byte arrives, in order, and nothing stalls."""
    client, server = _secured_pair(pki)
    rng = random.Random(7)
    stream = os.urandom(24 << 20)
    messages = [rng.randbytes(rng.randint(8, 600)) for _ in range(3000)]
    got_stream = bytearray(len(stream))
    got_messages: list[bytes] = []
    errors: list[BaseException] = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return run

    @guard
    def send_stream():
        view, offset = memoryview(stream), 0
        while offset < len(stream):
            sizes = [rng.choice((3, 16, 4096, 65536, 1 << 20)) for _ in range(3)]
            pieces = []
            for size in sizes:
                pieces.append(view[offset:offset + size])
                offset += len(pieces[-1])
            client.sendv([p for p in pieces if len(p)])

    @guard
    def receive_stream():
        server.recv_into(got_stream)

    @guard
    def send_messages():
        for message in messages:
            server.send(len(message).to_bytes(2, "little") + message)

    @guard
    def receive_messages():
        for _ in messages:
            head = client.recv_exact(2)
            got_messages.append(client.recv_exact(int.from_bytes(head, "little")))

    threads = [threading.Thread(target=t) for t in
               (send_stream, receive_stream, send_messages, receive_messages)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert not any(t.is_alive() for t in threads), "a direction stalled"
        assert not errors, errors
        assert bytes(got_stream) == stream
        assert got_messages == messages
    finally:
        client.close()
        server.close()


def test_closing_one_end_ends_the_other_cleanly(pki):
    client, server = _secured_pair(pki)
    client.send(b"last words")
    client.close()
    assert server.recv_exact(10) == b"last words"
    from pymig.transport import PeerClosedError

    with pytest.raises(PeerClosedError, match="after 0 of 4 bytes"):
        server.recv_exact(4)
    server.close()


def _tls_processes(pki: Pki, tmp_path, uri="tcp:127.0.0.1:0", *, pass_fds=()):
    directory = pki.dir()
    src, src_ctl = start_source(KIND, tmp_path, memory="64M", working_set="8M",
                                extra=("--tls-creds", directory), pass_fds=pass_fds[:1])
    dst, dst_ctl, bound = start_destination(tmp_path, uri, "--tls-creds", directory,
                                            "--tls-authz", "CN=src.*,OU=migration,O=Example",
                                            pass_fds=pass_fds[1:])
    wait_for(lambda: guest_passes(src_ctl) >= 2, what="the source guest to run")
    return src, src_ctl, dst, dst_ctl, bound


def test_tls_migration_between_processes(pki, tmp_path):
    """pymig run --tls-creds, pymig incoming --tls-creds --tls-authz, pymig migrate: as the
    README shows it."""
    src, src_ctl, dst, dst_ctl, bound = _tls_processes(pki, tmp_path)
    try:
        with QmpClient(dst_ctl) as client:
            params = client.command("query-migrate-parameters")
        assert params["tls-creds"] == "tls0"
        assert params["tls-authz"] == ["CN=src.*,OU=migration,O=Example"]
        out = run_pymig("migrate", "--control", src_ctl, bound, "--json")
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        assert stats["status"] == "completed" and stats["tls"]["version"] == "TLSv1.3"
        assert_carries_on(dst_ctl)
        src.wait(30)  # pymig migrate quits a source whose guest moved away
    finally:
        finish(src, dst)


def test_tls_migration_over_an_fd_socket(pki, tmp_path):
    ours, theirs = socket.socketpair()
    src_fd, dst_fd = ours.fileno(), theirs.fileno()
    src, src_ctl, dst, dst_ctl, _ = _tls_processes(pki, tmp_path, f"fd:{dst_fd}",
                                                   pass_fds=(src_fd, dst_fd))
    ours.close()
    theirs.close()
    try:
        with QmpClient(src_ctl) as client:
            with pytest.raises(QmpError, match="TLS over fd: needs tls-hostname"):
                client.command("migrate", uri=f"fd:{src_fd}")
            client.command("migrate-set-parameters", **{"tls-hostname": "localhost"})
            client.command("migrate", uri=f"fd:{src_fd}")
            wait_for(lambda: client.command("query-migrate")["status"] in (
                "completed", "failed"), timeout=120, what="the migration to end")
            stats = client.command("query-migrate")
        assert stats["status"] == "completed", stats
        assert stats["tls"]["version"] == "TLSv1.3" and stats["downtime"] >= 0
        assert_carries_on(dst_ctl)
    finally:
        finish(src, dst)


def test_bad_credentials_stop_pymig_run_before_it_starts(pki):
    directory = pki.dir()
    with open(f"{directory}/client-key.pem", "wb") as out:
        out.write(pki.ca.issue_cert("x.example").private_key_pem.bytes())
    out = run_pymig("run", "--simulated", "--memory", "16M", "--tls-creds", directory,
                    timeout=60)
    assert out.returncode == 1
    assert "client-key.pem is not the key of client-cert.pem" in out.stderr
    assert "Traceback" not in out.stderr
