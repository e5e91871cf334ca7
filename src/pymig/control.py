"""The control socket: QMP-style JSON over a unix socket (optionally TCP on loopback).

Protocol, as QEMU's QMP: on connect the server sends a greeting
``{"QMP": {"version": {...}, "capabilities": []}}``; the client must first send
``{"execute": "qmp_capabilities"}``; then each command ``{"execute": NAME, "arguments": {...},
"id": ANY}`` gets exactly one answer, ``{"return": VALUE, "id": ANY}`` or
``{"error": {"class": CLASS, "desc": TEXT}, "id": ANY}``.  Events arrive at any time as
``{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}``.

Input is a stream of JSON objects, with or without newlines between them (the server splits
it the way QEMU's JSON streamer does, by bracket depth).  Answers and events go out one per
line.  Error classes: ``CommandNotFound`` (an unknown command, or any command before
``qmp_capabilities``) and ``GenericError`` (everything else: malformed JSON, a non-object, bad
arguments, a command that does not fit the current state).  None of these end the connection;
only a message above :data:`MAX_MESSAGE_BYTES` does, after its error answer.

Who may connect: the unix socket is a file of mode 0600, so only its owner can.  Loopback TCP
is open to every local user, so a TCP connection must prove itself first: its first message
must be ``qmp_capabilities`` with the server's secret token as its ``token`` argument (see
:mod:`pymig.control_token`).  Anything else (another command, a wrong token, a text that is not
a JSON object, such as an HTTP request line, or no message within :data:`AUTH_TIMEOUT_S`)
gets one error answer and the connection closed, with nothing run.

Every client has its own outgoing queue and writer thread, so a client that stops reading
never stalls the migration thread that emits events; once its queue holds
:data:`MAX_QUEUED_MESSAGES`, the server drops that client.
"""

from __future__ import annotations

import json
import math
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pymig import __version__, control_token
from pymig.errors import ControlError, PymigError
from pymig.session import CommandError, Session
from pymig.transport import sockfile

MAX_MESSAGE_BYTES = 1 << 20
MAX_QUEUED_MESSAGES = 4096
#: A TCP connection that has not proved itself: how long it may take, how long its message.
AUTH_TIMEOUT_S = 10.0
AUTH_MESSAGE_BYTES = 4096
#: Capabilities QEMU knows for qmp_capabilities' 'enable' (none of them offered here).
QMP_CAPABILITIES = ("oob",)

#: JSON types by the names QMP's error messages use.
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "boolean": (bool,), "array": (list,), "object": (dict,),
    "integer": (int,), "any": (object,),
}


@dataclass(frozen=True)
class Arg:
    """One argument of a command: its JSON type and whether it must be given."""

    kind: str = "any"
    required: bool = False


@dataclass(frozen=True)
class Command:
    """One control command: its handler, its arguments (None: any, the handler checks) and
    what it does."""

    run: Callable[[Session, dict], Any]
    args: dict[str, Arg] | None
    doc: str


def _migrate(s: Session, a: dict) -> None:
    s.migrate(_uri(a), trace_path=a.get("trace"), resume=a.get("resume"),
              blk=bool(a.get("blk")), inc=bool(a.get("inc")))


def _uri(args: dict) -> str:
    if not args["uri"]:
        raise CommandError("Parameter 'uri' must not be empty")
    return args["uri"]


def _capabilities(s: Session, a: dict) -> dict:
    for name in a.get("enable", []):  # QEMU's words for each refusal
        if name not in QMP_CAPABILITIES:
            raise CommandError(f"Parameter 'enable' does not accept value {name!r}")
        raise CommandError(f"Capability '{name}' not available")
    return {}


def _continue(s: Session, a: dict) -> None:
    if a.get("state", "pre-switchover") != "pre-switchover":
        raise CommandError(f"Parameter 'state' must be 'pre-switchover', not {a['state']!r}")
    s.migrate_continue()


COMMANDS: dict[str, Command] = {
    "qmp_capabilities": Command(_capabilities, {"enable": Arg("array"), "token": Arg("string")},
                                "leave capabilities negotiation; token: the control token "
                                "(needed over TCP)"),
    "query-commands": Command(lambda s, a: [{"name": n} for n in sorted(COMMANDS)], {},
                              "every command this server knows"),
    "query-version": Command(lambda s, a: _version(), {}, "pymig's version"),
    "migrate": Command(_migrate, {"uri": Arg("string", True), "detach": Arg("boolean"),
                                  "trace": Arg("string"), "resume": Arg("boolean"),
                                  "blk": Arg("boolean"), "inc": Arg("boolean")},
                       "start migrating the guest to uri; returns at once, whatever 'detach' "
                       "says (as QEMU), so follow it with query-migrate or MIGRATION events; "
                       "resume: whether the guest runs on here afterwards (default: only for "
                       "file: snapshots), or, for a migration paused in post-copy, reconnect "
                       "it to the destination's migrate-recover uri; trace: a file for one "
                       "JSON line per iteration; blk: disks not on shared storage travel with "
                       "the guest; inc: only what was written to them since their checkpoint"),
    "migrate-incoming": Command(lambda s, a: {"uri": s.migrate_incoming(_uri(a))},
                                {"uri": Arg("string", True)},
                                "a destination started with 'defer': receive on uri now"),
    "migrate_cancel": Command(lambda s, a: s.migrate_cancel(), {},
                              "cancel the outgoing migration; the guest keeps running here"),
    "migrate-continue": Command(_continue, {"state": Arg("string")},
                                "release a migration paused before switchover"),
    "migrate-recover": Command(lambda s, a: {"uri": s.migrate_recover(_uri(a))},
                               {"uri": Arg("string", True)},
                               "a destination paused in post-copy: listen on uri for the "
                               "source's 'migrate uri resume=true'"),
    "migrate-start-postcopy": Command(lambda s, a: s.migrate_start_postcopy(), {},
                                      "switch the outgoing migration to post-copy (needs the "
                                      "postcopy-ram capability on both sides): the guest runs "
                                      "at the destination at once, its missing pages follow"),
    "x-migrate-switchover": Command(lambda s, a: s.migrate_switchover(), {},
                                    "switch over now, whatever the expected downtime"),
    "query-migrate": Command(lambda s, a: s.query_migrate(), {}, "migration status and stats"),
    "migrate-set-parameters": Command(lambda s, a: s.set_parameters(a), None,
                                      "set migration parameters (QMP names), all or none"),
    "query-migrate-parameters": Command(lambda s, a: s.query_parameters(), {},
                                        "every migration parameter"),
    "migrate-set-capabilities": Command(lambda s, a: s.set_capabilities(a["capabilities"]),
                                        {"capabilities": Arg("array", True)},
                                        "switch capabilities (not during a migration)"),
    "query-migrate-capabilities": Command(lambda s, a: s.query_capabilities(), {},
                                          "every migration capability and its state"),
    "calc-dirty-rate": Command(lambda s, a: s.calc_dirty_rate(a),
                               {"calc-time": Arg("integer", True),
                                "calc-time-unit": Arg("string"), "sample-pages": Arg("integer"),
                                "mode": Arg("string")},
                               "measure the guest's dirty rate over calc-time (in "
                               "calc-time-unit: second or millisecond), mode page-sampling "
                               "(sample-pages per GiB), dirty-bitmap or dirty-ring; returns at "
                               "once, query-dirty-rate follows it"),
    "query-dirty-rate": Command(lambda s, a: s.query_dirty_rate(a.get("calc-time-unit",
                                                                      "second")),
                                {"calc-time-unit": Arg("string")},
                                "the latest dirty-rate measurement: QEMU's fields, the write "
                                "rate, the working-set curve, what it cost the guest"),
    "query-status": Command(lambda s, a: s.query_status(), {}, "the guest's run state"),
    "query-guest": Command(lambda s, a: s.query_guest(a.get("verify", False)),
                           {"verify": Arg("boolean")},
                           "workload progress, self-check (verify: pause-free only when "
                           "stopped), console tail"),
    "query-block": Command(lambda s, a: s.query_block(), {},
                           "the guest's disks: image, node name, and each checkpoint as a "
                           "persistent dirty bitmap (inserted.dirty-bitmaps)"),
    "block-dirty-bitmap-add": Command(lambda s, a: s.block_dirty_bitmap_add(a),
                                      {"node": Arg("string", True),
                                       "name": Arg("string", True),
                                       "granularity": Arg("integer"),
                                       "persistent": Arg("boolean"),
                                       "disabled": Arg("boolean")},
                                      "make checkpoint name of disk node (ide0-hd0 or disk0), "
                                      "kept beside its image, recording from now on: what "
                                      "migrate inc sends from (persistent: true needed)"),
    "block-dirty-bitmap-remove": Command(lambda s, a: s.block_dirty_bitmap_remove(a),
                                         {"node": Arg("string", True),
                                          "name": Arg("string", True)},
                                         "delete checkpoint name of disk node (refused while "
                                         "a migration sends from it)"),
    "stop": Command(lambda s, a: s.stop(), {}, "pause the guest"),
    "cont": Command(lambda s, a: s.cont(), {}, "resume the guest"),
    "quit": Command(lambda s, a: None, {}, "end this process (after answering)"),
}


def _version() -> dict:
    """QEMU's VersionInfo, which QMP clients read from the greeting: the triple is pymig's,
    and ``package`` names the server, as QEMU's downstreams do."""
    major, minor, micro = (int(x) for x in __version__.split(".")[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": "pymig"}


def timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


#: A message without an ``id`` (an ``"id": null`` is echoed, as QEMU does).
NO_ID = object()


def error(ident: Any, klass: str, desc: str) -> dict:
    answer: dict[str, Any] = {"error": {"class": klass, "desc": desc}}
    if ident is not NO_ID:
        answer["id"] = ident
    return answer


# -- input -----------------------------------------------------------------------------------

class MessageSplitter:
    """Cuts a byte stream into JSON texts, as QEMU's JSON streamer does.

    A text that opens with ``{`` or ``[`` ends where its brackets balance (strings and their
    escapes are skipped); a string ends at its closing quote; anything else (a number, a stray
    word) ends at the next whitespace or bracket or quote.  Whitespace between texts is dropped.  A text may still
    be malformed JSON: the caller parses it and answers an error.
    """

    def __init__(self, limit: int = MAX_MESSAGE_BYTES):
        self.limit = limit
        self._text = bytearray()
        self._depth = 0  # open brackets in the current text
        self._in_string = False
        self._escape = False
        self._bare = False  # the current text is a bare token (ends at whitespace)

    def feed(self, data: bytes) -> list[bytes]:
        """The texts ``data`` completes; raises ValueError when one outgrows the limit."""
        done: list[bytes] = []
        text = self._text
        for c in data:
            if self._bare and (c in _WHITESPACE or c in _STRUCTURAL):
                done.append(self._take())  # a literal never holds these: it ended
            if not text:  # between texts
                if c in _WHITESPACE:
                    continue
                text.append(c)
                if c in _OPEN:
                    self._depth = 1
                elif c == _QUOTE:
                    self._in_string = True
                elif c in _CLOSE:
                    done.append(self._take())  # a stray closer: a text of its own
                else:
                    self._bare = True
                continue
            text.append(c)
            if self._bare:
                pass
            elif self._in_string:
                if self._escape:
                    self._escape = False
                elif c == _BACKSLASH:
                    self._escape = True
                elif c == _QUOTE:
                    self._in_string = False
                    if not self._depth:  # a string on its own
                        done.append(self._take())
            elif c == _QUOTE:
                self._in_string = True
            elif c in _OPEN:
                self._depth += 1
            elif c in _CLOSE:
                self._depth -= 1
                if not self._depth:
                    done.append(self._take())
            if len(text) > self.limit:
                self._take()
                raise ValueError(f"message longer than {self.limit} bytes")
        return done

    def _take(self) -> bytes:
        out = bytes(self._text)
        self._text.clear()
        self._depth = 0
        self._in_string = self._escape = self._bare = False
        return out


_WHITESPACE = frozenset(b" \t\r\n")
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
_QUOTE = ord('"')
_STRUCTURAL = frozenset(b'{}[]"')
_BACKSLASH = ord("\\")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_message(text: bytes) -> Any:
    """JSON as QMP reads it: no NaN, no Infinity, no number that overflows to them."""
    return json.loads(text, parse_float=_finite_float, parse_constant=_no_constants)


def check_arguments(spec: dict[str, Arg], args: dict) -> str | None:
    """Why ``args`` do not fit the command's ``spec`` (None when they do), in QMP's words."""
    for key, value in args.items():
        arg = spec.get(key)
        if arg is None:
            return f"Parameter '{key}' is unexpected"
        wanted = _TYPES[arg.kind]
        # bool is an int in Python but not in JSON
        if not isinstance(value, wanted) or (arg.kind == "integer" and isinstance(value, bool)):
            return f"Invalid parameter type for '{key}', expected: {arg.kind}"
    for key, arg in spec.items():
        if arg.required and key not in args:
            return f"Parameter '{key}' is missing"
    return None


# -- connections -----------------------------------------------------------------------------

class _Client:
    """One connection: reads commands, answers them, and forwards events once negotiated.

    ``needs_token``: the connection came over TCP and must prove itself with its first
    message (see the module docstring)."""

    def __init__(self, server: "ControlServer", sock: socket.socket, needs_token: bool):
        self.server = server
        self.sock = sock
        self.needs_token = needs_token
        self.negotiated = False
        # a stranger gets one short message, soon (AUTH_TIMEOUT_S), to prove itself
        self._splitter = MessageSplitter(AUTH_MESSAGE_BYTES if needs_token
                                         else MAX_MESSAGE_BYTES)
        self.closed = False
        self._out: "queue.Queue[bytes | None]" = queue.Queue()
        self._lock = threading.Lock()

    # -- output: one writer thread per client, so nobody waits on a slow reader -------------
    def send(self, message: dict) -> None:
        try:
            data = (json.dumps(message, allow_nan=False) + "\n").encode()
        except (TypeError, ValueError) as exc:  # an answer that is not JSON is a bug: say so
            data = (json.dumps(error(message.get("id", NO_ID), "GenericError",
                                     f"internal error: unencodable answer: {exc}"))
                    + "\n").encode()
        with self._lock:
            if self.closed:
                return
            if self._out.qsize() >= MAX_QUEUED_MESSAGES:
                self._drop()  # it stopped reading: losing it beats stalling the migration
                return
            self._out.put(data)

    def _drop(self) -> None:
        self.closed = True
        self._out.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write_loop(self) -> None:
        while True:
            data = self._out.get()
            if data is None:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                with self._lock:
                    self._drop()
                return

    def event(self, name: str, data: dict) -> None:
        if self.negotiated:
            self.send({"event": name, "data": data, "timestamp": timestamp()})

    # -- input ------------------------------------------------------------------------------
    def serve(self) -> None:
        writer = threading.Thread(target=self._write_loop, daemon=True,
                                  name="pymig-control-writer")
        writer.start()
        self.send({"QMP": {"version": _version(), "capabilities": []}})
        session = self.server.session
        session.subscribe(self.event)
        if self.needs_token:
            self.sock.settimeout(AUTH_TIMEOUT_S)
        quitting = False
        try:
            while not self.closed:
                try:
                    chunk = self.sock.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                stranger = self.needs_token
                outcome = self.receive(chunk)
                if stranger and not self.needs_token:
                    self.sock.settimeout(None)  # it proved itself
                if outcome is not None:
                    quitting = outcome == "quit"
                    break
        finally:
            session.unsubscribe(self.event)
            with self._lock:
                if not self.closed:
                    self.closed = True
                    self._out.put(None)
            writer.join(5.0)  # the last answers (quit's above all) reach the client first
            if quitting:
                session.quit()
            try:
                self.sock.close()
            except OSError:
                pass
            self.server.forget(self)

    def receive(self, data: bytes) -> str | None:
        """Take the next bytes the client sent: answer (:meth:`send`) every text they
        complete.  Returns None to read on, ``"quit"`` once ``quit`` was answered (what came
        after it is not run), ``"end"`` when the connection must close: a text above the
        limit, or a client that had to prove itself and did not (nothing more is read)."""
        try:
            texts = self._splitter.feed(data)
        except ValueError as exc:
            self.send(error(NO_ID, "GenericError", str(exc)))
            return "end"
        for text in texts:
            answer, name = self.handle(text)
            self.send(answer)
            if self.needs_token:
                if not self.negotiated:
                    return "end"
                self.needs_token = False
                self._splitter.limit = MAX_MESSAGE_BYTES
            if name == "quit" and "return" in answer:
                return "quit"
        return None

    def handle(self, text: bytes) -> tuple[dict, str | None]:
        """The answer to one JSON text, and the command it ran (None if none); never raises."""
        try:
            message = parse_message(text)
        except (ValueError, RecursionError) as exc:
            return _failed(NO_ID, "GenericError", f"JSON parse error: {exc}")
        if not isinstance(message, dict):
            return _failed(NO_ID, "GenericError", "QMP input must be a JSON object")
        ident = message.get("id", NO_ID)
        name = message.get("execute")
        if not isinstance(name, str):
            return _failed(ident, "GenericError", "QMP input lacks member 'execute'")
        args = message.get("arguments", {})
        if not isinstance(args, dict):
            return _failed(ident, "GenericError",
                           "QMP input member 'arguments' must be an object")
        unknown_keys = set(message) - {"execute", "arguments", "id"}
        if unknown_keys:
            return _failed(ident, "GenericError",
                           f"QMP input member {sorted(unknown_keys)[0]!r} is unexpected")
        if not self.negotiated and name != "qmp_capabilities":
            return _failed(ident, "CommandNotFound",
                           "Expecting capabilities negotiation with 'qmp_capabilities'")
        if self.negotiated and name == "qmp_capabilities":
            return _failed(ident, "CommandNotFound",
                           "Capabilities negotiation is already complete, command ignored")
        command = COMMANDS.get(name)
        if command is None:
            return _failed(ident, "CommandNotFound", f"The command {name} has not been found")
        if command.args is not None:
            problem = check_arguments(command.args, args)
            if problem is not None:
                return _failed(ident, "GenericError", problem)
        if name == "qmp_capabilities":
            problem = self.server.check_token(args.get("token"), self.needs_token)
            if problem is not None:
                return _failed(ident, "GenericError", problem)
        try:
            value = command.run(self.server.session, args)
        except CommandError as exc:
            return _failed(ident, exc.klass, str(exc))
        except (PymigError, ValueError, OSError) as exc:
            return _failed(ident, "GenericError", str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not take the socket down
            return _failed(ident, "GenericError", f"internal error in {name}: "
                                                  f"{type(exc).__name__}: {exc}")
        if name == "qmp_capabilities":
            self.negotiated = True
        answer: dict[str, Any] = {"return": {} if value is None else value}
        if ident is not NO_ID:
            answer["id"] = ident
        return answer, name


def _failed(ident: Any, klass: str, desc: str) -> tuple[dict, None]:
    return error(ident, klass, desc), None


class ControlServer:
    """Serves :data:`COMMANDS` for one :class:`Session` on a unix path and/or loopback TCP.

    ``tcp=(host, 0)`` binds a free port; :attr:`tcp_address` says which.  With TCP the server
    makes a :attr:`token` and writes it to ``token_path`` (default:
    :func:`pymig.control_token.default_path` of the port), :attr:`token_path` says where.
    """

    def __init__(self, session: Session, path: str | None = None,
                 tcp: tuple[str, int] | None = None, *, token_path: str | None = None):
        if path is None and tcp is None:
            raise ValueError("a control server needs a unix path or a TCP address")
        self.session = session
        self.path = path
        self._socks: list[tuple[socket.socket, bool]] = []  # (listening socket, over TCP)
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._socket_file: os.stat_result | None = None
        self._token_file: control_token.TokenFile | None = None
        self.tcp_address: tuple[str, int] | None = None
        self.token: str | None = None
        self.token_path: str | None = None
        try:
            if path is not None:
                self._socks.append((self._bind_unix(path), False))
            if tcp is not None:
                self._socks.append((self._bind_tcp(*tcp), True))
                self.token = control_token.new_token()
                self.token_path = token_path or control_token.default_path(self.tcp_address[1])
                self._token_file = control_token.TokenFile(self.token_path, self.token,
                                                           default=token_path is None)
        except BaseException:
            self.close()
            raise
        for sock, over_tcp in self._socks:
            threading.Thread(target=self._accept, args=(sock, over_tcp), daemon=True,
                             name="pymig-control").start()

    def _bind_unix(self, path: str) -> socket.socket:
        # Whoever sees the path appear may connect at once: so the socket listens under a
        # temporary name first and is then linked into place (link(), unlike rename(), never
        # replaces what may have appeared at the path meanwhile).
        staging = os.path.join(os.path.dirname(path) or ".",
                               f".{os.path.basename(path)}.{os.getpid()}.tmp")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staged = None
        try:
            sockfile.claim(path)
            sockfile.claim(staging)
            staged = sockfile.bind_private(sock, staging)
            sock.listen(8)
            os.link(staging, path)
            self._socket_file = staged
        except (ValueError, OSError) as exc:
            sock.close()
            if isinstance(exc, FileExistsError):
                exc = f"{path} appeared while the socket was being made"
            elif isinstance(exc, OSError):
                exc = f"{path}: {exc.strerror or exc}"
            raise ControlError(f"cannot serve the control socket: {exc}") from None
        finally:
            if staged is not None:
                sockfile.remove_if_same(staging, staged)
        return sock

    def _bind_tcp(self, host: str, port: int) -> socket.socket:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"the control socket listens on loopback only, not {host}")
        if not 0 <= port <= 65535:
            raise ValueError(f"TCP port {port} is outside 0..65535")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(8)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot serve the control socket on tcp:{host}:{port}: "
                               f"{exc.strerror or exc}") from None
        self.tcp_address = sock.getsockname()[:2]
        return sock

    def check_token(self, given: str | None, needed: bool) -> str | None:
        """Why ``qmp_capabilities`` with token ``given`` is refused (None: it is not).

        A token given is checked on any socket; ``needed`` (TCP) makes it compulsory."""
        if given is None:
            if not needed:
                return None
            return (f"Authentication required: over TCP, qmp_capabilities needs the argument "
                    f"'token', the contents of {self.token_path}")
        if self.token is None:
            return "This control socket has no token (it serves no TCP): leave 'token' out"
        if not control_token.matches(given, self.token):
            return f"Authentication failed: 'token' is not the one in {self.token_path}"
        return None

    def _accept(self, sock: socket.socket, over_tcp: bool) -> None:
        while not self._closed:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            client = _Client(self, conn, needs_token=over_tcp)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._clients.add(client)
            threading.Thread(target=client.serve, daemon=True, name="pymig-control-client").start()

    def forget(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)

    def close(self) -> None:
        """Stop serving and remove the socket file and the token file (each only if it is
        still the one this server made)."""
        with self._lock:
            self._closed = True
            clients = list(self._clients)
        for sock, _ in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for client in clients:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._socket_file is not None:
            sockfile.remove_if_same(self.path, self._socket_file)
            self._socket_file = None
        if self._token_file is not None:
            self._token_file.remove()
            self._token_file = None
