"""Ctrl-C on ``pymig migrate``: the migration is cancelled, the source confirms, the user is
told where the guest runs, and the destination that the source cancelled.  Real processes,
real signals."""

from __future__ import annotations

import signal
import subprocess

import pytest

from _migration_helpers import (assert_carries_on, finish, guest_passes, pymig_process,
                                start_destination, start_source, wait_for)
from pymig.qmp import QmpClient

MiB = 1 << 20
WAIT_S = 60.0

# How the guest writes, and the cap: a first pass of seconds either way.
# Converging: 64 MiB stamped at 20 MB/s, sent at 30 MB/s (it would complete after a few
# passes, seconds after the signal).
CONVERGING = {"working_set": "64M", "rate": "5000", "cap": "30M"}
# Not converging: 16 MiB stamped at 800 MB/s, sent at 4 MB/s.
DIVERGING = {"working_set": "16M", "rate": "200000", "cap": "4M"}


def _slow_migration(tmp_path, how: dict):
    """A source whose working set has been stamped once, a destination and a ``pymig
    migrate`` between them, uncompressed and capped (``how``); returns (source, its control
    socket, destination, migrate) once pages are on the wire."""
    src, ctl = start_source("simulated", tmp_path, memory="128M",
                            working_set=how["working_set"], rate=how["rate"])
    wait_for(lambda: guest_passes(ctl) >= 1, timeout=WAIT_S, what="a first pass")
    dst, _, bound = start_destination(tmp_path)
    migrate = pymig_process("migrate", "--control", ctl, bound, "--max-bandwidth", how["cap"],
                            "--compression", "none", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with QmpClient(ctl) as client:
        wait_for(lambda: client.command("query-migrate").get("ram", {}).get(
            "transferred", 0) > MiB, timeout=WAIT_S, what="pages on the wire")
    return src, ctl, dst, migrate


@pytest.mark.parametrize("how, signum", [
    pytest.param(CONVERGING, signal.SIGINT, id="converging-ctrl-c"),
    pytest.param(DIVERGING, signal.SIGINT, id="not-converging-ctrl-c"),
    pytest.param(DIVERGING, signal.SIGTERM, id="not-converging-sigterm"),
])
def test_a_signal_cancels_the_migration_and_says_where_the_guest_runs(how, signum, tmp_path):
    src, ctl, dst, migrate = _slow_migration(tmp_path, how)
    try:
        migrate.send_signal(signum)
        out, err = migrate.communicate(timeout=WAIT_S)
        assert migrate.returncode == 1, err
        assert "Traceback" not in err and "Aborted" not in err, err
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        assert f"{name}: cancelling the migration" in err, err
        assert "migration cancelled as asked; the guest stays at the source, running" in err, err
        assert "cancelled" in out  # the figures of what had moved
        with QmpClient(ctl) as client:
            assert client.command("query-migrate")["status"] == "cancelled"
            assert client.command("query-status")["status"] == "running"
        assert_carries_on(ctl)
        # the destination heard it from the source, and ran nothing
        assert dst.wait(WAIT_S) == 1
        dst_err = dst.stderr.read().decode()
        assert "the source cancelled the migration" in dst_err, dst_err
        assert "stream ended without an EOF record" not in dst_err
    finally:
        finish(migrate, src, dst)


def test_a_second_signal_stops_waiting_even_on_a_source_that_does_not_answer(tmp_path):
    src, ctl, dst, migrate = _slow_migration(tmp_path, DIVERGING)
    try:
        src.send_signal(signal.SIGSTOP)  # the source answers nothing from here
        migrate.send_signal(signal.SIGINT)
        # the first signal is taken (the cancel is on its way) before the second is sent: two
        # signals pending at once are one
        wait_for_text(migrate.stderr, "cancelling the migration")
        migrate.send_signal(signal.SIGINT)
        out, err = migrate.communicate(timeout=WAIT_S)
        assert migrate.returncode == 128 + signal.SIGINT, err
        assert "Traceback" not in err
        assert "stopped waiting" in err and "a cancel was asked for" in err, err
        assert f"pymig qmp --control {ctl} query-migrate" in err
        # the source, going on, carries out the cancel it was sent
        src.send_signal(signal.SIGCONT)
        with QmpClient(ctl) as client:
            wait_for(lambda: client.command("query-migrate")["status"] == "cancelled",
                     timeout=WAIT_S, what="the source to cancel")
            assert client.command("query-status")["status"] == "running"
    finally:
        if src.poll() is None:
            src.send_signal(signal.SIGCONT)
        finish(migrate, src, dst)


def wait_for_text(pipe, text: str, timeout: float = WAIT_S) -> str:
    """Read ``pipe`` (text mode) line by line until a line holds ``text``; returns what was
    read."""
    import os
    import select
    import time

    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s: {seen!r}"
        ready, _, _ = select.select([pipe], [], [], 0.1)
        if ready:
            chunk = os.read(pipe.fileno(), 4096).decode(errors="replace")
            assert chunk, f"the pipe closed before {text!r}: {seen!r}"
            seen += chunk
    return seen
