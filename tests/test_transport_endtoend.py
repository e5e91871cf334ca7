"""exec:, fd: and file: migrate a running self-checking guest between processes, as users drive
them (``pymig run`` / ``pymig incoming`` / ``pymig migrate``), and the guest carries on: its
passes keep growing from where they were, and its self-check finds every page consistent.

One-way channels (exec, pipes, files) have no return path: the destination starts at the EOF
record, and the source stays paused afterwards, in ``postmigrate``, except for a file
snapshot, after which the guest carries on (or, asked to stop, stays ``paused``).  A failure
before the end of the stream resumes the source.
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from _migration_helpers import (announced_port, assert_carries_on, e2e_kind, finish,
                                guest_config, guest_passes, pymig_process, run_pymig,
                                running_guest, start_destination, start_source, wait_for,
                                wait_for_path)
from pymig.analyze import analyze
from pymig.qmp import QmpClient, QmpError
from pymig.session import Session
from pymig.transport import FdChannel

KIND = e2e_kind()
SMALL = {"memory": "64M", "working_set": "8M"}


def migrate_cli(control: str, uri: str, *extra: str) -> dict:
    """``pymig migrate --json``: the CLI, as a user runs it."""
    out = run_pymig("migrate", "--control", control, uri, "--json", *extra)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["status"] == "completed" and stats["ram"]["remaining"] == 0
    return stats


def migrate(control: str, uri: str, **arguments) -> dict:
    """``migrate`` over the control socket, followed to its end (a script's way)."""
    with QmpClient(control) as client:
        client.command("migrate", uri=uri, **arguments)
        wait_for(lambda: client.command("query-migrate")["status"] in ("completed", "failed",
                                                                        "cancelled"),
                 timeout=120, what="the migration to end")
        stats = client.command("query-migrate")
    assert stats["status"] == "completed" and stats["ram"]["remaining"] == 0, stats
    return stats


def running_source(tmp_path, **popen):
    src, ctl = start_source(KIND, tmp_path, **SMALL, **popen)
    wait_for(lambda: guest_passes(ctl) >= 2, what="the source guest to run")
    return src, ctl


def moved_away(ctl: str) -> int:
    """The source after a migration that handed its guest over: paused for good.  Quits it
    and returns the passes its guest had made."""
    with QmpClient(ctl) as client:
        assert client.command("query-status") == {"running": False, "status": "postmigrate"}
        with pytest.raises(QmpError, match="migrated away"):
            client.command("cont")
        passes = client.command("query-guest")["progress"]["passes"]
        client.command("quit")
    return passes


def quit_process(ctl: str, proc) -> None:
    with QmpClient(ctl) as client:
        client.command("quit")
    assert proc.wait(30) == 0


def test_exec_live_through_a_fifo(tmp_path):
    fifo = tmp_path / "stream.fifo"
    os.mkfifo(fifo)
    src, src_ctl = running_source(tmp_path)
    dst, dst_ctl, uri = start_destination(tmp_path, f"exec:cat {fifo}")
    try:
        assert uri == f"exec:cat {fifo}"
        migrate(src_ctl, f"exec:cat > {fifo}")
        moved = moved_away(src_ctl)
        assert src.wait(30) == 0
        assert_carries_on(dst_ctl, at_least=moved)
        quit_process(dst_ctl, dst)
    finally:
        finish(src, dst)


@pytest.mark.skipif(shutil.which("gzip") is None, reason="needs gzip")
def test_exec_through_a_compressor_then_restored_by_another_process(tmp_path):
    saved = tmp_path / "guest.pymig.gz"
    src, src_ctl = running_source(tmp_path)
    dst = None
    try:
        migrate(src_ctl, f"exec:gzip -1 -c > {saved}")
        moved = moved_away(src_ctl)
        assert src.wait(30) == 0
        dst, dst_ctl, _ = start_destination(tmp_path, f"exec:gzip -dc {saved}")
        assert_carries_on(dst_ctl, at_least=moved)
        quit_process(dst_ctl, dst)
    finally:
        finish(src, *([dst] if dst else []))


def test_fd_socketpair_has_a_return_path(tmp_path):
    ours, theirs = socket.socketpair()
    src_fd, dst_fd = ours.fileno(), theirs.fileno()
    src, src_ctl = running_source(tmp_path, pass_fds=[src_fd])
    dst, dst_ctl, _ = start_destination(tmp_path, f"fd:{dst_fd}", pass_fds=[dst_fd])
    ours.close()
    theirs.close()
    try:
        stats = migrate(src_ctl, f"fd:{src_fd}")
        assert stats["downtime"] >= 0
        moved = moved_away(src_ctl)
        assert_carries_on(dst_ctl, at_least=moved)
        quit_process(dst_ctl, dst)
    finally:
        finish(src, dst)


def test_fd_pipe_is_one_way(tmp_path):
    read_fd, write_fd = os.pipe()
    src, src_ctl = running_source(tmp_path, pass_fds=[write_fd])
    dst, dst_ctl, _ = start_destination(tmp_path, f"fd:{read_fd}", pass_fds=[read_fd])
    os.close(read_fd)
    os.close(write_fd)
    try:
        migrate(src_ctl, f"fd:{write_fd}")
        moved = moved_away(src_ctl)
        assert_carries_on(dst_ctl, at_least=moved)
        quit_process(dst_ctl, dst)
    finally:
        finish(src, dst)


def test_file_snapshot_is_live_and_restores_in_a_new_process(tmp_path):
    snap = tmp_path / "guest.pymig"
    src, src_ctl = running_source(tmp_path)
    dst = None
    try:
        before = guest_passes(src_ctl)
        stats = migrate(src_ctl, f"file:{snap}")
        # one way: nothing comes back, the downtime ends with the stream written
        assert list(stats["downtime-breakdown"]) == ["pause", "last-ram", "device-state", "send"]
        with QmpClient(src_ctl) as client:
            assert client.command("query-status") == {"running": True, "status": "running"}
        assert_carries_on(src_ctl, at_least=before)
        with open(snap, "rb") as handle:
            report = analyze(FdChannel(os.dup(handle.fileno()), str(snap), writable=False))
        assert report.ok and report.index is not None
        dst, dst_ctl, _ = start_destination(tmp_path, f"file:{snap}")
        assert_carries_on(dst_ctl, at_least=before)
        quit_process(dst_ctl, dst)
        quit_process(src_ctl, src)
    finally:
        finish(src, *([dst] if dst else []))


def test_file_snapshot_with_stop_leaves_the_guest_paused_where_the_restore_resumes(tmp_path):
    snap = tmp_path / "guest.pymig"
    src, src_ctl = running_source(tmp_path)
    dst = None
    try:
        migrate_cli(src_ctl, f"file:{snap}", "--stop")
        assert src.poll() is None  # a snapshot is no move: pymig migrate leaves the source be
        with QmpClient(src_ctl) as client:
            assert client.command("query-status") == {"running": False, "status": "paused"}
            frozen = client.command("query-guest")["progress"]["passes"]
        dst, dst_ctl, _ = start_destination(tmp_path, f"file:{snap}")
        assert_carries_on(dst_ctl, at_least=frozen)
        quit_process(dst_ctl, dst)
        with QmpClient(src_ctl) as client:
            client.command("cont")  # the snapshot was a copy: the original may carry on too
            assert client.command("query-status")["status"] == "running"
        quit_process(src_ctl, src)
    finally:
        finish(src, *([dst] if dst else []))


def test_deferred_destination_configured_over_its_socket(tmp_path):
    src, src_ctl = running_source(tmp_path, extra=["--control-tcp", "0"])
    port = announced_port(src)
    dst_ctl = str(tmp_path / "dst.sock")
    dst = pymig_process("incoming", "defer", "--control", dst_ctl, "--quiet")
    try:
        wait_for_path(dst_ctl, dst)
        assert qmp(dst_ctl, "query-status") == {"running": False, "status": "inmigrate"}
        qmp(dst_ctl, "migrate-set-capabilities",
            'capabilities=[{"capability": "auto-converge", "state": true}]')
        uri = qmp(dst_ctl, "migrate-incoming", "uri=tcp:127.0.0.1:0")["uri"]
        assert uri.startswith("tcp:127.0.0.1:") and not uri.endswith(":0")
        again = run_pymig("qmp", "--control", dst_ctl, "migrate-incoming", "uri=tcp:127.0.0.1:0")
        assert again.returncode == 1 and "is already setup" in again.stderr, again.stderr
        migrate_cli(f"tcp:127.0.0.1:{port}", uri)  # the CLI, through the TCP control socket
        assert src.wait(30) == 0  # the guest moved: pymig migrate quit the source
        assert_carries_on(dst_ctl, at_least=2)
        quit_process(dst_ctl, dst)
    finally:
        finish(src, dst)


def qmp(control: str, command: str, *arguments: str):
    out = run_pymig("qmp", "--control", control, command, *arguments)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("uri, words", [
    ("exec:head -c 4096 > /dev/null", "EPIPE"),  # the command stops reading mid-stream
    ("exec:cat > /dev/null; exit 3", "exited with status 3"),  # it fails at the very end
    ("exec:exec 0<&-; sleep 1", "EPIPE"),  # it closes its input at once
])
def test_a_one_way_channel_failing_before_the_end_resumes_the_source(uri, words):
    guest = running_guest(guest_config(KIND, memory=64 << 20, working_set=8 << 20))
    session = Session(guest)
    # Uncompressed, the stream is megabytes: more than a pipe holds, so it cannot all be in
    # the pipe before head has read its 4096 bytes and gone (compressed, it could, and head's
    # exit status 0 would then say the command took it all)
    session.params.set(compression="none")
    try:
        session.migrate(uri)
        assert session.migration.wait(60).value == "failed"
        assert words in session.query_migrate()["error-desc"]
        assert session.query_status() == {"running": True, "status": "running"}
        before = guest.progress()["passes"]
        wait_for(lambda: guest.progress()["passes"] > before, what="the source to carry on")
    finally:
        session.close()


def test_a_pipe_whose_reader_is_gone_fails_and_resumes_the_source():
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    guest = running_guest(guest_config(KIND, memory=64 << 20, working_set=8 << 20))
    session = Session(guest)
    try:
        session.migrate(f"fd:{write_fd}")
        assert session.migration.wait(60).value == "failed"
        assert "EPIPE" in session.query_migrate()["error-desc"]
        assert session.query_status()["status"] == "running"
    finally:
        session.close()
