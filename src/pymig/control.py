"""The control socket: QMP-style JSON over a unix socket (optionally TCP on loopback).

Protocol, as QEMU's QMP: on connect the server sends a greeting
``{"QMP": {"version": {...}, "capabilities": []}}``; the client must first send
``{"execute": "qmp_capabilities"}``; then each command ``{"execute": NAME, "arguments": {...},
"id": ANY}`` gets exactly one answer, ``{"return": VALUE, "id": ANY}`` or
``{"error": {"class": CLASS, "desc": TEXT}, "id": ANY}``.  Events arrive at any time as
``{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}``.  Messages
are one JSON object per line.  Malformed JSON, a non-object, an unknown command or bad
arguments get an error answer; the connection and the server carry on.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pymig import __version__
from pymig.errors import PymigError
from pymig.session import CommandError, Session

MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class Command:
    """One control command: its handler and the arguments it takes (name → required?)."""

    run: Callable[[Session, dict], Any]
    args: dict[str, bool]
    doc: str


def _migrate(s: Session, a: dict) -> None:
    if a.get("detach") is False:
        raise CommandError("only detached migration is supported: follow it with query-migrate "
                           "or MIGRATION events")
    resume = a.get("resume")
    if resume is not None and not isinstance(resume, bool):
        raise CommandError("'resume' must be true or false")
    s.migrate(_string(a, "uri"), trace_path=a.get("trace"), resume=resume)


def _migrate_incoming(s: Session, a: dict) -> dict:
    return {"uri": s.migrate_incoming(_string(a, "uri"))}


def _string(args: dict, name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise CommandError(f"'{name}' must be a non-empty string")
    return value


COMMANDS: dict[str, Command] = {
    "qmp_capabilities": Command(lambda s, a: {}, {"enable": False},
                                "leave capabilities negotiation"),
    "query-commands": Command(lambda s, a: [{"name": n} for n in sorted(COMMANDS)], {},
                              "every command this server knows"),
    "query-version": Command(lambda s, a: _version(), {}, "pymig's version"),
    "migrate": Command(_migrate, {"uri": True, "detach": False, "trace": False,
                                  "resume": False},
                       "start migrating the guest to uri (returns at once); resume: whether "
                       "the guest runs on here afterwards (default: only for file: "
                       "snapshots)"),
    "migrate-incoming": Command(_migrate_incoming, {"uri": True},
                                "a destination started with 'defer': listen on uri now"),
    "migrate_cancel": Command(lambda s, a: s.migrate_cancel(), {},
                              "cancel the outgoing migration; the guest keeps running here"),
    "migrate-continue": Command(lambda s, a: s.migrate_continue(), {"state": False},
                                "release a migration paused before switchover"),
    "x-migrate-switchover": Command(lambda s, a: s.migrate_switchover(), {},
                                    "switch over now, whatever the expected downtime"),
    "query-migrate": Command(lambda s, a: s.query_migrate(), {}, "migration status and stats"),
    "migrate-set-parameters": Command(lambda s, a: s.set_parameters(a), {"*": False},
                                      "set migration parameters (QMP names)"),
    "query-migrate-parameters": Command(lambda s, a: s.query_parameters(), {},
                                        "every migration parameter"),
    "migrate-set-capabilities": Command(lambda s, a: s.set_capabilities(_list(a, "capabilities")),
                                        {"capabilities": True}, "switch capabilities"),
    "query-migrate-capabilities": Command(lambda s, a: s.query_capabilities(), {},
                                          "every migration capability and its state"),
    "query-status": Command(lambda s, a: s.query_status(), {}, "the guest's run state"),
    "query-guest": Command(lambda s, a: s.query_guest(bool(a.get("verify", False))),
                           {"verify": False}, "workload progress, self-check, console tail"),
    "stop": Command(lambda s, a: s.stop(), {}, "pause the guest"),
    "cont": Command(lambda s, a: s.cont(), {}, "resume the guest"),
    "quit": Command(lambda s, a: None, {}, "end this process (after answering)"),
}


def _list(args: dict, name: str) -> list:
    value = args.get(name)
    if not isinstance(value, list):
        raise CommandError(f"'{name}' must be a list")
    return value


def _version() -> dict:
    major, minor, micro = (int(x) for x in __version__.split(".")[:3])
    return {"pymig": {"major": major, "minor": minor, "micro": micro}, "package": "pymig"}


def timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


class _Client:
    """One connection: reads lines, answers commands, forwards events once negotiated."""

    def __init__(self, server: "ControlServer", sock: socket.socket):
        self.server = server
        self.sock = sock
        self.negotiated = False
        self._quitting = False
        self.send_lock = threading.Lock()
        self.closed = False

    def send(self, message: dict) -> None:
        try:
            data = (json.dumps(message) + "\n").encode()
        except (TypeError, ValueError) as exc:  # an answer that is not JSON is a bug: say so
            data = (json.dumps(error(message.get("id"), "GenericError",
                                     f"internal error: unencodable answer: {exc}"))
                    + "\n").encode()
        with self.send_lock:
            if self.closed:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def event(self, name: str, data: dict) -> None:
        if self.negotiated:
            self.send({"event": name, "data": data, "timestamp": timestamp()})

    def serve(self) -> None:
        self.send({"QMP": {"version": _version(), "capabilities": []}})
        session = self.server.session
        session.subscribe(self.event)
        buffer = b""
        try:
            while not self.closed:
                try:
                    chunk = self.sock.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        answer = self.handle(line)
                        self.send(answer)
                        if answer.get("return") is not None and self._quitting:
                            session.quit()  # only now: the answer must reach the client

                if len(buffer) > MAX_LINE_BYTES:
                    self.send(error(None, "GenericError", "message too long"))
                    break
        finally:
            session.unsubscribe(self.event)
            with self.send_lock:
                self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def handle(self, line: bytes) -> dict:
        try:
            message = json.loads(line)
        except ValueError as exc:
            return error(None, "GenericError", f"JSON parse error: {exc}")
        if not isinstance(message, dict):
            return error(None, "GenericError", "QMP input must be a JSON object")
        ident = message.get("id")
        name = message.get("execute")
        if not isinstance(name, str):
            return error(ident, "GenericError", "QMP input lacks member 'execute'")
        args = message.get("arguments", {})
        if not isinstance(args, dict):
            return error(ident, "GenericError", "QMP input member 'arguments' must be an object")
        unknown_keys = set(message) - {"execute", "arguments", "id"}
        if unknown_keys:
            return error(ident, "GenericError",
                         f"QMP input member {sorted(unknown_keys)[0]!r} is unexpected")
        if not self.negotiated and name != "qmp_capabilities":
            return error(ident, "CommandNotFound",
                         "Expecting capabilities negotiation with 'qmp_capabilities'")
        if self.negotiated and name == "qmp_capabilities":
            return error(ident, "CommandNotFound",
                         "Capabilities negotiation is already complete, command ignored")
        command = COMMANDS.get(name)
        if command is None:
            return error(ident, "CommandNotFound", f"The command {name} has not been found")
        if "*" not in command.args:
            for key in args:
                if key not in command.args:
                    return error(ident, "GenericError", f"Parameter '{key}' is unexpected")
            for key, required in command.args.items():
                if required and key not in args:
                    return error(ident, "GenericError", f"Parameter '{key}' is missing")
        try:
            value = command.run(self.server.session, args)
        except CommandError as exc:
            return error(ident, exc.klass, str(exc))
        except (PymigError, ValueError, OSError) as exc:
            return error(ident, "GenericError", str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not take the socket down
            return error(ident, "GenericError", f"internal error in {name}: "
                                                f"{type(exc).__name__}: {exc}")
        if name == "qmp_capabilities":
            self.negotiated = True
        answer: dict[str, Any] = {"return": {} if value is None else value}
        if ident is not None:
            answer["id"] = ident
        self._quitting = name == "quit"
        return answer


def error(ident: Any, klass: str, desc: str) -> dict:
    answer: dict[str, Any] = {"error": {"class": klass, "desc": desc}}
    if ident is not None:
        answer["id"] = ident
    return answer


class ControlServer:
    """Serves :data:`COMMANDS` for one :class:`Session` on a unix path and/or loopback TCP."""

    def __init__(self, session: Session, path: str | None = None,
                 tcp: tuple[str, int] | None = None):
        if path is None and tcp is None:
            raise ValueError("a control server needs a unix path or a TCP address")
        self.session = session
        self.path = path
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._clients: list[_Client] = []
        self._closed = False
        if path is not None:
            if os.path.exists(path):
                _remove_stale_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            os.chmod(path, 0o600)
            self._socks.append(sock)
        self.tcp_address: tuple[str, int] | None = None
        if tcp is not None:
            host, port = tcp
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(f"the control socket listens on loopback only, not {host}")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            self.tcp_address = sock.getsockname()[:2]
            self._socks.append(sock)
        for sock in self._socks:
            sock.listen(8)
            thread = threading.Thread(target=self._accept, args=(sock,), daemon=True,
                                      name="pymig-control")
            thread.start()
            self._threads.append(thread)

    def _accept(self, sock: socket.socket) -> None:
        while not self._closed:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            client = _Client(self, conn)
            self._clients.append(client)
            threading.Thread(target=client.serve, daemon=True, name="pymig-control-client").start()

    def close(self) -> None:
        self._closed = True
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for client in self._clients:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)


def _remove_stale_socket(path: str) -> None:
    """Refuse a path another live server answers on; remove a dead one's leftover."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ValueError(f"another process is already serving on {path}")
