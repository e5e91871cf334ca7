"""The files pymig makes for its sockets: a control path never replaces what is there (a file,
or a socket another process serves; a dead socket is replaced), every socket file is 0600
whatever the umask, and the socket files and the token file go when the process ends, on
quit, SIGTERM or SIGINT alike."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess

import pytest

from _migration_helpers import finish, pymig_process, run_pymig, wait_for, wait_for_path
from pymig import transport
from pymig.control import ControlServer
from pymig.errors import ControlError
from pymig.qmp import QmpClient
from pymig.session import Session
from pymig.transport import sockfile
from _migration_helpers import ANY_KIND_ARGS

RUN = ("run", "--simulated", "--memory", "64M", "--quiet")


def refused(tmp_path, ctl: str, words: str) -> None:
    out = run_pymig(*RUN, "--control", ctl, timeout=120)
    assert out.returncode == 1, out.stderr
    assert words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_control_path_holding_a_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "precious"
    path.write_text("keep me")
    refused(tmp_path, str(path), "exists and is not a socket")
    assert path.read_text() == "keep me"


def test_a_control_path_that_is_a_link_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    link = tmp_path / "ctl"
    link.symlink_to(target)
    refused(tmp_path, str(link), "exists and is not a socket")
    assert os.path.islink(link) and target.read_text() == "keep me"


def test_a_control_path_another_process_serves_is_refused(tmp_path):
    path = str(tmp_path / "busy.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        refused(tmp_path, path, "another process is listening")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(path)  # still there, still the other process's
        probe.close()
    finally:
        live.close()


def test_a_dead_control_socket_is_replaced(tmp_path):
    path = str(tmp_path / "ctl.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # its process is gone; the file stayed
    proc = pymig_process(*RUN, "--control", path, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _serves(path), timeout=60, what="the control socket")
        with QmpClient(path) as client:
            assert client.command("query-status")["status"] == "running"
            client.command("quit")
        assert proc.wait(60) == 0
        assert not os.path.exists(path)
    finally:
        finish(proc)


def _serves(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_the_control_server_refuses_in_process_too(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(Session(destination=True), str(path))
    assert path.read_text() == "x"


# -- modes ------------------------------------------------------------------------------------

def mode(path) -> int:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode)


def test_socket_files_are_0600_under_an_open_umask(tmp_path):
    previous = os.umask(0)
    try:
        with transport.listen(f"unix:{tmp_path}/m.sock"):
            assert mode(tmp_path / "m.sock") == 0o600
        server = ControlServer(Session(destination=True), str(tmp_path / "c.sock"))
        assert mode(tmp_path / "c.sock") == 0o600
        server.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockfile.bind_private(sock, str(tmp_path / "s"))
        assert mode(tmp_path / "s") == 0o600
        sock.close()
    finally:
        os.umask(previous)


def test_a_destinations_socket_files_are_0600_under_an_open_umask(tmp_path):
    mig, ctl = str(tmp_path / "m.sock"), str(tmp_path / "c.sock")
    proc = pymig_process("incoming", f"unix:{mig}", *ANY_KIND_ARGS, "--control", ctl, "--quiet",
                         stderr=subprocess.PIPE, preexec_fn=lambda: os.umask(0))
    try:
        wait_for_path(ctl, proc)
        assert mode(mig) == 0o600 and mode(ctl) == 0o600
    finally:
        finish(proc)


# -- the files go with the process ------------------------------------------------------------

def start(tmp_path, kind: str) -> tuple[subprocess.Popen, list[str]]:
    """A ``pymig run`` or ``pymig incoming unix:`` with a control socket on a path and on TCP;
    returns the process and the files it made, once they all exist."""
    ctl, token = str(tmp_path / "c.sock"), str(tmp_path / "c.token")
    control = ("--control", ctl, "--control-tcp", "0", "--control-tcp-token", token)
    if kind == "run":
        proc = pymig_process(*RUN, *control, stderr=subprocess.PIPE)
        files = [ctl, token]
    else:
        mig = str(tmp_path / "m.sock")
        proc = pymig_process("incoming", f"unix:{mig}", *ANY_KIND_ARGS, "--quiet", *control,
                             stderr=subprocess.PIPE)
        files = [mig, ctl, token]
    for path in files:
        wait_for_path(path, proc)
    return proc, files


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("kind", ["run", "incoming"])
def test_a_signal_takes_the_files_away(tmp_path, kind, signum):
    proc, files = start(tmp_path, kind)
    try:
        proc.send_signal(signum)
        assert proc.wait(60) == 0, proc.stderr.read().decode(errors="replace")
        assert [path for path in files if os.path.lexists(path)] == []
    finally:
        finish(proc)


@pytest.mark.parametrize("kind", ["run", "incoming"])
def test_quit_takes_the_files_away(tmp_path, kind):
    proc, files = start(tmp_path, kind)
    try:
        with QmpClient(str(tmp_path / "c.sock")) as client:
            client.command("quit")
        assert proc.wait(60) == 0, proc.stderr.read().decode(errors="replace")
        assert [path for path in files if os.path.lexists(path)] == []
    finally:
        finish(proc)


def test_a_deferred_destinations_listener_goes_on_sigterm(tmp_path):
    ctl, mig = str(tmp_path / "c.sock"), str(tmp_path / "m.sock")
    proc = pymig_process("incoming", "defer", *ANY_KIND_ARGS, "--control", ctl, "--quiet",
                         stderr=subprocess.PIPE)
    try:
        wait_for_path(ctl, proc)
        with QmpClient(ctl) as client:
            client.command("migrate-incoming", uri=f"unix:{mig}")
        assert mode(mig) == 0o600
        proc.terminate()
        assert proc.wait(60) == 0
        assert not os.path.lexists(mig) and not os.path.lexists(ctl)
    finally:
        finish(proc)
