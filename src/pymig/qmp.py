"""A small client for pymig's control socket (the CLI's, and any script's).

Over loopback TCP it proves itself with the server's token (see :mod:`pymig.control_token`),
read from the token file: ``token_path``, or the default file of the port.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from pymig import control_token
from pymig.errors import ControlError, PymigError

if TYPE_CHECKING:
    import subprocess


#: How often a command waiting for its answer looks whether it should stop waiting.
POLL_S = 0.05


class Interrupted(PymigError):
    """The caller stopped waiting for a command's answer (see :meth:`QmpClient.command`)."""


class QmpError(PymigError):
    """The server answered a command with an error object."""

    def __init__(self, klass: str, desc: str):
        self.klass = klass
        self.desc = desc
        super().__init__(f"{klass}: {desc}")


def control_address(text: str) -> str | tuple[str, int]:
    """A control socket address as users write it: ``tcp:HOST:PORT`` (loopback TCP, as
    ``--control-tcp`` serves it) or a unix socket path."""
    if text.startswith("tcp:"):
        from pymig.transport import parse_uri

        uri = parse_uri(text)
        return (uri.host or "127.0.0.1", uri.port)
    return text


class QmpClient:
    """Connects, negotiates capabilities, runs commands and collects events.

    ``address`` is a unix socket path, or ``(host, port)`` for loopback TCP; there the token
    comes from ``token_path`` (default: the port's default token file).
    """

    def __init__(self, address: str | tuple[str, int], timeout: float = 30.0, *,
                 token_path: str | None = None):
        token = None
        if isinstance(address, tuple):
            token = control_token.read(token_path or control_token.default_path(address[1]))
            try:
                self.sock = socket.create_connection(address, timeout=timeout)
            except OSError as exc:
                raise PymigError(f"cannot reach the control socket tcp:{address[0]}:"
                                 f"{address[1]}: {exc.strerror or exc}") from None
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(address)
            except OSError as exc:
                self.sock.close()
                raise PymigError(f"cannot reach the control socket {address}: "
                                 f"{exc.strerror or exc}") from None
        self.timeout = timeout
        self.events: "queue.Queue[dict]" = queue.Queue()
        self._answers: "queue.Queue[dict]" = queue.Queue()
        self._next_id = 0
        self._lock = threading.Lock()
        self._file = self.sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise PymigError(f"{address} is not a pymig control socket")
        self.greeting = greeting["QMP"]
        self.sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="qmp-client")
        self._reader.start()
        try:
            self.command("qmp_capabilities", **({"token": token} if token else {}))
        except QmpError as exc:
            self.close()
            raise ControlError(f"the control socket refused this client: {exc.desc}") from None

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise PymigError("the control socket closed the connection")
        return json.loads(line)

    def _read_loop(self) -> None:
        while True:
            try:
                message = self._read()
            except (PymigError, OSError, ValueError) as exc:
                self._answers.put({"error": {"class": "ConnectionLost", "desc": str(exc)}})
                return
            if "event" in message:
                self.events.put(message)
            else:
                self._answers.put(message)

    def command(self, name: str, /, *, interrupted: Callable[[], bool] | None = None,
                **arguments: Any) -> Any:
        """Run one command; returns its value or raises :class:`QmpError`.  ``name`` is
        positional only: a command's own argument may be called ``name`` (QEMU's
        ``block-dirty-bitmap-add`` has one).

        ``interrupted``: polled while waiting for the answer; once it returns true the wait
        ends with :class:`Interrupted` (the command may still run on the server)."""
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            message: dict[str, Any] = {"execute": name, "id": ident}
            if arguments:
                message["arguments"] = arguments
            self.sock.sendall((json.dumps(message) + "\n").encode())
            deadline = time.monotonic() + self.timeout
            while True:
                wait = max(deadline - time.monotonic(), 0.001)
                try:
                    answer = self._answers.get(
                        timeout=wait if interrupted is None else min(wait, POLL_S))
                except queue.Empty:
                    if interrupted is not None and interrupted():
                        raise Interrupted(f"stopped waiting for the answer to {name}") from None
                    if time.monotonic() < deadline:
                        continue
                    raise PymigError(f"no answer to {name} in {self.timeout:.0f} s") from None
                if answer.get("id") not in (ident, None):
                    continue
                if "error" in answer:
                    err = answer["error"]
                    raise QmpError(err.get("class", "GenericError"), err.get("desc", ""))
                return answer.get("return")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_socket(path: str, proc: "subprocess.Popen", what: str, timeout: float) -> None:
    """Wait until the child process ``proc`` (the ``what`` process) serves its control socket
    at ``path``; PymigError if it exits first or takes longer than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise PymigError(f"the {what} process exited with status {proc.returncode} before "
                             f"its control socket appeared")
        if time.monotonic() > deadline:
            raise PymigError(f"the {what} process did not open its control socket in "
                             f"{timeout:.0f} s")
        time.sleep(0.02)
