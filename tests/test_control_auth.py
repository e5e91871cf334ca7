"""Who may run commands: over loopback TCP only a client that proves itself with the token from
the 0600 token file; anything else (no token, a wrong one, another first command, an HTTP
request, silence) gets one answer, has nothing run and is disconnected.  The unix socket is
0600: the file system is its gate."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from _childenv import child_env
from _control_helpers import WAIT_S, RawClient, serve_guest
from _migration_helpers import announced_port, finish, pymig_process, wait_for, wait_for_path
from pymig import control, control_token
from pymig.control import ControlServer
from pymig.errors import ControlError
from pymig.qmp import QmpClient
from pymig.session import Session

MiB = 1 << 20
NOBODY = 65534


@pytest.fixture
def source(tmp_path):
    served = serve_guest(tmp_path, working_set=8 * MiB)
    yield served
    served.close()


class TcpClient:
    """A bare TCP connection to a control socket: any bytes out, messages in, line by line."""

    def __init__(self, address: tuple[str, int]):
        self.sock = socket.create_connection(address, timeout=WAIT_S)
        self._file = self.sock.makefile("rb")
        self.greeting = self.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def execute(self, name: str, **arguments) -> None:
        message = {"execute": name, **({"arguments": arguments} if arguments else {})}
        self.send(json.dumps(message).encode() + b"\n")

    def read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise EOFError("the server closed the connection")
        return json.loads(line)

    def rest(self) -> list[dict]:
        """Every message up to the server closing the connection."""
        out = []
        while True:
            try:
                out.append(self.read())
            except EOFError:
                return out

    def close(self) -> None:
        self._file.close()
        self.sock.close()


@pytest.fixture
def tcp(source):
    clients = []

    def connect() -> TcpClient:
        clients.append(TcpClient(source.server.tcp_address))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


def assert_refused_and_closed(client: TcpClient, klass: str, words: str) -> None:
    messages = client.rest()
    assert len(messages) == 1, messages  # one answer, then the connection is gone
    assert messages[0]["error"]["class"] == klass
    assert words in messages[0]["error"]["desc"], messages[0]


def still_running(source) -> None:
    assert source.session.query_status() == {"running": True, "status": "running"}


# -- over TCP ---------------------------------------------------------------------------------

def test_a_client_with_the_token_is_served(source, tcp):
    with open(source.server.token_path) as f:
        token = f.read().strip()
    assert token == source.server.token and len(token) == 2 * control_token.TOKEN_BYTES
    client = tcp()
    client.execute("qmp_capabilities", token=token)
    assert client.read() == {"return": {}}
    client.execute("stop")
    answers = [client.read(), client.read()]  # the answer and the STOP event, in either order
    assert {"return": {}} in answers and any(m.get("event") == "STOP" for m in answers)
    assert source.session.query_status()["status"] == "paused"


@pytest.mark.parametrize("arguments, words", [
    ({}, "Authentication required"),
    ({"token": "0" * 64}, "Authentication failed"),
    ({"token": ""}, "Authentication failed"),
])
def test_no_token_or_a_wrong_one_is_refused_and_runs_nothing(source, tcp, arguments, words):
    client = tcp()
    # The command that follows in the same write is never read.
    client.send(json.dumps({"execute": "qmp_capabilities", "arguments": arguments}).encode()
                + b'\n{"execute": "stop"}\n')
    assert_refused_and_closed(client, "GenericError", words)
    still_running(source)


def test_a_first_message_other_than_qmp_capabilities_is_refused(source, tcp):
    client = tcp()
    client.send(b'{"execute": "stop"}\n{"execute": "stop"}\n')
    assert_refused_and_closed(client, "CommandNotFound", "qmp_capabilities")
    still_running(source)


def test_an_http_request_runs_nothing_and_is_disconnected(source, tcp):
    """What a browser sends for a cross-origin POST: even a body holding the right token and
    a command gets nothing run, because the first line is not a QMP JSON object."""
    body = (json.dumps({"execute": "qmp_capabilities",
                        "arguments": {"token": source.server.token}})
            + json.dumps({"execute": "stop"})).encode()
    client = tcp()
    client.send(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert_refused_and_closed(client, "GenericError", "JSON parse error")
    still_running(source)


@pytest.mark.parametrize("first", [b"[1, 2]\n", b'"text"\n', b"42\n"])
def test_a_first_text_that_is_not_an_object_is_disconnected(source, tcp, first):
    client = tcp()
    client.send(first)
    assert len(client.rest()) == 1


def test_an_oversized_first_message_is_disconnected(source, tcp):
    client = tcp()
    client.send(b'{"execute": "qmp_capabilities", "arguments": {"token": "'
                + b"a" * (2 * control.AUTH_MESSAGE_BYTES))
    assert_refused_and_closed(client, "GenericError", "longer than")


def test_a_silent_client_is_dropped(source, tcp, monkeypatch):
    monkeypatch.setattr(control, "AUTH_TIMEOUT_S", 0.5)
    client = tcp()
    assert client.rest() == []  # closed without a word once the time was up


def test_after_the_token_the_connection_is_an_ordinary_one(source, tcp):
    client = tcp()
    client.execute("qmp_capabilities", token=source.server.token)
    assert client.read() == {"return": {}}
    client.send(b"{not json}\n")  # a mistake now is answered, and the connection stays
    assert client.read()["error"]["class"] == "GenericError"
    client.execute("query-status")
    assert client.read() == {"return": {"running": True, "status": "running"}}


def test_a_deferred_destination_runs_no_command_for_a_stranger(tmp_path):
    """migrate-incoming exec: would run a command on the destination: without the token it is
    never read."""
    target = tmp_path / "owned"
    server = ControlServer(Session(destination=True), tcp=("127.0.0.1", 0),
                           token_path=str(tmp_path / "token"))
    try:
        client = TcpClient(server.tcp_address)
        client.send(b'{"execute": "qmp_capabilities"}\n'
                    + json.dumps({"execute": "migrate-incoming",
                                  "arguments": {"uri": f"exec:touch {target}"}}).encode()
                    + b"\n")
        assert_refused_and_closed(client, "GenericError", "Authentication required")
        client.close()
        assert server.session.incoming is None and not target.exists()
    finally:
        server.close()


# -- on the unix socket -----------------------------------------------------------------------

def test_the_unix_socket_needs_no_token_but_checks_one_given(source):
    raw = RawClient(source.path)
    try:
        answer = raw.execute("qmp_capabilities", token="wrong")
        assert answer["error"]["class"] == "GenericError"
        assert "Authentication failed" in answer["error"]["desc"]
        assert raw.execute("qmp_capabilities", token=source.server.token) == {"return": {}}
    finally:
        raw.close()
    with QmpClient(source.path) as client:  # no token: the file system let it in
        assert client.command("query-status")["status"] == "running"


def test_a_server_without_tcp_has_no_token(tmp_path):
    server = ControlServer(Session(destination=True), str(tmp_path / "c.sock"))
    try:
        assert server.token is None and server.token_path is None
        raw = RawClient(str(tmp_path / "c.sock"))
        answer = raw.execute("qmp_capabilities", token="x")
        assert "no token" in answer["error"]["desc"]
        raw.close()
    finally:
        server.close()


# -- the token file ---------------------------------------------------------------------------

def test_the_token_file_is_private_and_goes_with_the_server(tmp_path):
    path = tmp_path / "token"
    server = ControlServer(Session(destination=True), tcp=("127.0.0.1", 0),
                           token_path=str(path))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == server.token + "\n"
        other = ControlServer(Session(destination=True), tcp=("127.0.0.1", 0),
                              token_path=str(tmp_path / "token2"))
        assert other.token != server.token  # each server its own
        other.close()
    finally:
        server.close()
    assert not path.exists()


def test_the_default_token_file_is_in_the_users_runtime_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    server = ControlServer(Session(destination=True), tcp=("127.0.0.1", 0))
    try:
        port = server.tcp_address[1]
        assert server.token_path == str(tmp_path / "pymig" / f"control-{port}.token")
        assert stat.S_IMODE((tmp_path / "pymig").stat().st_mode) == 0o700
        with QmpClient(("127.0.0.1", port)) as client:  # finds it there by itself
            assert client.command("query-status")["status"] == "inmigrate"
    finally:
        server.close()
    assert not os.path.exists(server.token_path)


@pytest.mark.parametrize("mode", [0o777, 0o750])
def test_a_runtime_directory_others_can_enter_is_refused(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "pymig").mkdir()
    os.chmod(tmp_path / "pymig", mode)
    with pytest.raises(ControlError, match="not a private directory"):
        ControlServer(Session(destination=True), tcp=("127.0.0.1", 0))
    assert os.listdir(tmp_path / "pymig") == []


def test_a_client_without_the_token_says_where_it_looked(source, tmp_path):
    port = source.server.tcp_address[1]
    missing = str(tmp_path / "nothing-here")
    with pytest.raises(ControlError, match="cannot read the control token .*nothing-here"):
        QmpClient(("127.0.0.1", port), token_path=missing)
    wrong = tmp_path / "wrong"
    wrong.write_text("f" * 64 + "\n")
    with pytest.raises(ControlError, match="refused this client: Authentication failed"):
        QmpClient(("127.0.0.1", port), token_path=str(wrong))


# -- processes: another user, and the command line -------------------------------------------

_ATTACKER = r"""
import json, socket, sys
port, token_path, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    open(token_path).read()
    print("TOKEN READ")
except PermissionError:
    print("TOKEN UNREADABLE")
attempts = [
    [{"execute": "qmp_capabilities"}],
    [{"execute": "qmp_capabilities", "arguments": {"token": "0" * 64}}],
    [],
]
for first in attempts:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    lines = [json.dumps(m) for m in first]
    lines.append(json.dumps({"execute": "migrate", "arguments": {"uri": "exec:id > " + target}}))
    data = ("\n".join(lines) + "\n").encode()
    if not first:  # a browser's POST: the body is what it wants run
        data = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(data) + data
    s.sendall(data)
    received = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        received += chunk
    print("CLOSED", json.dumps([json.loads(x) for x in received.splitlines()]))
    s.close()
"""


@pytest.fixture
def shared_dir():
    """A directory every user may enter (pytest's tmp_path is root's alone): what is inside
    is protected by its own mode only."""
    path = tempfile.mkdtemp(prefix="pymig-auth-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def python_for_nobody() -> str:
    """A Python interpreter the unprivileged user can run (a virtual environment's may sit
    in a directory only root can enter)."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        if os.path.exists(candidate) and as_nobody(candidate, "-I", "-c", "").returncode == 0:
            return candidate
    raise AssertionError("no Python interpreter that user 65534 may run")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_another_user_cannot_run_commands_over_tcp(shared_dir):
    """The attack: an unprivileged user connects to root's TCP control socket and asks for an
    exec: migration that would run a command as root.  It cannot read the token, every attempt
    is answered with an error and disconnected, and the command never runs."""
    token_path = os.path.join(shared_dir, "control.token")
    ctl = os.path.join(shared_dir, "src.sock")
    target = os.path.join(shared_dir, "owned")
    src = pymig_process("run", "--simulated", "--memory", "64M", "--control", ctl,
                        "--control-tcp", "0", "--control-tcp-token", token_path,
                        stderr=subprocess.PIPE)
    try:
        port = announced_port(src)
        wait_for_path(ctl, src)
        python = python_for_nobody()
        out = as_nobody(python, "-I", "-c", _ATTACKER, str(port), token_path, target)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "TOKEN UNREADABLE"
        attempts = [json.loads(line.split(" ", 1)[1]) for line in lines[1:]]
        assert len(attempts) == 3
        for messages in attempts:  # the greeting, one error, then the end
            assert len(messages) == 2 and "QMP" in messages[0], messages
            assert messages[1]["error"]["class"] in ("GenericError", "CommandNotFound")
        assert not os.path.exists(target)
        # The unix socket is 0600: that user cannot even connect to it.
        unix = as_nobody(python, "-I", "-c",
                         "import socket, sys; s = socket.socket(socket.AF_UNIX); "
                         "s.connect(sys.argv[1])", ctl)
        assert unix.returncode != 0 and "PermissionError" in unix.stderr
        # The owner, with the token, is served.
        with QmpClient(("127.0.0.1", port), token_path=token_path) as client:
            assert client.command("query-status")["status"] == "running"
    finally:
        finish(src)
    assert not os.path.exists(target)


def test_the_cli_reads_the_default_token_file(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = child_env(XDG_RUNTIME_DIR=str(runtime))
    src = subprocess.Popen([sys.executable, "-m", "pymig", "run", "--simulated", "--memory",
                            "64M", "--quiet", "--control-tcp", "0"], env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    try:
        port = announced_port(src)
        token_file = runtime / "pymig" / f"control-{port}.token"
        wait_for(token_file.exists, what="the token file")

        def qmp(*args: str, env=env) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "pymig", "qmp", "--control",
                                   f"tcp:127.0.0.1:{port}", *args], capture_output=True,
                                  text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)

        served = qmp("query-status")
        assert served.returncode == 0, served.stderr
        assert json.loads(served.stdout)["status"] == "running"
        elsewhere = qmp("query-status", env=child_env(XDG_RUNTIME_DIR=str(tmp_path)))
        assert elsewhere.returncode == 1
        assert "cannot read the control token" in elsewhere.stderr
        assert "Traceback" not in elsewhere.stderr
        given = qmp("--control-tcp-token", str(token_file), "query-status",
                    env=child_env(XDG_RUNTIME_DIR=str(tmp_path)))
        assert given.returncode == 0, given.stderr
        src.terminate()
        assert src.wait(60) == 0
        assert not token_file.exists()
    finally:
        finish(src)
