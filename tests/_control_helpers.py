"""Helpers for control-socket tests: sessions served in this process, raw and QMP clients, and
event collection."""

from __future__ import annotations

import json
import queue
import socket
import time

import pytest

from _migration_helpers import ANY_KIND, guest_config, running_guest, wait_for
from pymig.control import ControlServer
from pymig.qmp import QmpClient, QmpError
from pymig.session import Session

MiB = 1 << 20

WAIT_S = 60.0  # generous: the host is shared and noisy


class Served:
    """A :class:`Session` and its control server in this process (unix path, optionally TCP)."""

    def __init__(self, session: Session, path: str, *, tcp: bool = False):
        self.session = session
        self.path = path
        self.server = ControlServer(session, path, ("127.0.0.1", 0) if tcp else None,
                                    token_path=f"{path}.token" if tcp else None)
        self._clients: list = []

    def client(self) -> QmpClient:
        client = QmpClient(self.path, timeout=WAIT_S)
        self._clients.append(client)
        return client

    def raw(self) -> "RawClient":
        client = RawClient(self.path)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.server.close()
        self.session.close()


def serve_guest(tmp_path, name: str = "src", kind: str = "simulated", **config) -> Served:
    """A running self-checking guest behind a control socket at ``tmp_path/name.sock``."""
    guest = running_guest(guest_config(kind, **config))
    return Served(Session(guest), str(tmp_path / f"{name}.sock"), tcp=True)


def serve_destination(tmp_path, name: str = "dst") -> Served:
    """A destination started with ``defer`` (taking either kind of guest): it waits for
    migrate-incoming."""
    session = Session(destination=True)
    session.incoming_options = {"limits": ANY_KIND}
    return Served(session, str(tmp_path / f"{name}.sock"))


class RawClient:
    """A bare connection for sending any bytes at all; answers are read line by line."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(path)
        self._file = self.sock.makefile("rb")
        self.greeting = self.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict:
        """The next message (answer or event); raises EOFError when the server closed."""
        line = self._file.readline()
        if not line:
            raise EOFError("the server closed the connection")
        return json.loads(line)

    def answer(self) -> dict:
        """The next answer, skipping events."""
        while True:
            message = self.read()
            if "event" not in message:
                return message

    def execute(self, name: str, **arguments) -> dict:
        message = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.send(json.dumps(message).encode() + b"\n")
        return self.answer()

    def negotiate(self) -> "RawClient":
        assert self.execute("qmp_capabilities") == {"return": {}}
        return self

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def next_event(client: QmpClient, name: str, timeout: float = WAIT_S) -> dict:
    """The next event called ``name`` (others are dropped)."""
    return events_until(client, {"event": name}, timeout)[-1]


def statuses_until_end(client: QmpClient, timeout: float = WAIT_S) -> list[str]:
    """The MIGRATION statuses, in order, up to completed / failed / cancelled."""
    seen = []
    while not seen or seen[-1] not in ("completed", "failed", "cancelled"):
        seen.append(next_event(client, "MIGRATION", timeout)["data"]["status"])
    return seen


def all_events(client: QmpClient) -> list[dict]:
    """Every event received so far (the queue is emptied)."""
    out = []
    while True:
        try:
            out.append(client.events.get_nowait())
        except queue.Empty:
            return out


def events_until(client: QmpClient, last: dict, timeout: float = WAIT_S) -> list[dict]:
    """Every event from the queue up to and including the first whose items include ``last``
    (events reach each client through its own queue, so a client may see a status in
    query-migrate before the event announcing it arrives)."""
    deadline = time.monotonic() + timeout
    out = []
    while True:
        try:
            event = client.events.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            raise AssertionError(f"no event like {last} within {timeout} s; got {out}") from None
        out.append(event)
        if all(event.get(key) == value for key, value in last.items()):
            return out


def wait_status(client: QmpClient, status: str, timeout: float = WAIT_S) -> dict:
    """Poll query-migrate until ``status``; returns that answer."""
    answer: dict = {}

    def reached() -> bool:
        nonlocal answer
        answer = client.command("query-migrate")
        return answer.get("status") == status

    wait_for(reached, timeout=timeout, interval=0.02, what=f"migration status {status}")
    return answer


def migrate_incoming(client: QmpClient, tmp_path) -> str:
    """Give the deferred destination behind ``client`` a unix socket to receive on; its URI."""
    return client.command("migrate-incoming", uri=f"unix:{tmp_path}/m.sock")["uri"]


def start_slow_migration(client: QmpClient, uri: str) -> None:
    """Migrate to ``uri`` at 1 MiB/s (it lasts a minute); returns once RAM is on the wire."""
    client.command("migrate-set-parameters", **{"max-bandwidth": 1 * MiB, "compression": "none"})
    client.command("migrate", uri=uri)
    wait_for(lambda: client.command("query-migrate")["ram"]["transferred"] > 0,
             what="RAM on the wire")


# Fixtures for the control tests (imported by name where used).
@pytest.fixture
def source(tmp_path):
    served = serve_guest(tmp_path, working_set=8 * MiB)
    yield served
    served.close()


@pytest.fixture
def pair(tmp_path):
    """A running source and a deferred destination, each behind its control socket."""
    src = serve_guest(tmp_path, working_set=8 * MiB)
    dst = serve_destination(tmp_path)
    yield src, dst
    dst.close()
    src.close()


def refused(client, command, **arguments) -> str:
    """The GenericError text ``command`` is refused with."""
    with pytest.raises(QmpError) as info:
        client.command(command, **arguments)
    assert info.value.klass == "GenericError"
    return info.value.desc
