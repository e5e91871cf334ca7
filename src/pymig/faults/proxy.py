"""A proxy between a migration's source and destination that injects faults at chosen points.

::

    source ──► [listen] ── forward (the stream, COMMIT) ──► [upstream] destination
           ◄──          ◄── return (READY, PROGRESS, LOADED, ACK) ──

Each direction is pumped by its own thread.  A *trigger* names a point of the conversation:
the first forward bytes once ``skip`` more have passed (``forward``), a return-path message of
a type (``return-type``; a plaintext return path is read message by message), or, under TLS,
whose content it cannot read, a TLS record of a given size (``return-record`` /
``forward-record``: the return path's fixed-size messages keep their size inside TLS 1.3).
When the trigger is reached its pump holds the bytes, calls the runner's callback (which
reads the migration's state and kills a process, or asks for a fault here), and then applies
the fault asked for: ``cut`` (both directions closed), ``cut-forward`` / ``cut-return`` (one
direction half-closed towards its receiver and its sender's bytes dropped), ``stall`` (no byte
either way, sockets open), ``corrupt`` (one byte of the held bytes flipped), or nothing
(``pass``).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

RP_HEAD = struct.Struct("<HHI")  # the return path's framing (docs/stream-format.md)
TLS_HEAD = struct.Struct("!BHH")  # content type, version, length
CHUNK = 64 * 1024


@dataclass
class Trigger:
    """Where the fault goes: ``kind`` accept | forward | return-type | return-record |
    forward-record (``accept``: the connection made, no byte through yet);
    ``skip``: forward bytes to let pass first; ``value``: the message type, or the TLS
    record's length; ``after``: fire once the matched bytes were forwarded (a point *after*
    a message, such as after COMMIT) instead of while holding them."""

    kind: str
    skip: int = 0
    value: int = 0
    after: bool = False


class FaultProxy:
    """Forwards one connection from ``listen`` to ``upstream`` (each a ``(host, port)`` or a
    unix socket path), with at most one armed trigger at a time."""

    def __init__(self, listen: str | tuple[str, int], upstream: str | tuple[str, int], *,
                 tls: bool = False, return_path: bool = True, rng=None):
        family = socket.AF_UNIX if isinstance(listen, str) else socket.AF_INET
        self.upstream = upstream
        self.tls = tls
        self.return_path = return_path  # whether the return direction is in messages
        self.rng = rng
        self._server = socket.socket(family, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(listen)
        self._server.listen(1)
        self.address = self._server.getsockname()
        self._lock = threading.RLock()
        self._trigger: Trigger | None = None
        self._callback: Callable[[str], str] | None = None
        self.fired = threading.Event()
        self.fired_at: str | None = None  # what the trigger matched
        self.fault: str | None = None
        self.corrupted: tuple[str, int, int] | None = None  # direction, offset, xor
        self.forwarded = {"forward": 0, "return": 0}
        self.seen = {"forward": [], "return": []}  # message types / record sizes, in order
        self.connected = threading.Event()
        self._stalled = threading.Event()
        self._closed = threading.Event()
        self._dead = {"forward": False, "return": False}
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.on_connect: Callable[[], None] | None = None
        self._accepter = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._accepter.start()

    def arm(self, trigger: Trigger, callback: Callable[[str], str]) -> None:
        """Fire ``callback(what)`` at ``trigger`` (forward offsets count from now); it returns
        the fault to apply there (see the module's docstring)."""
        with self._lock:
            if trigger.kind == "forward":
                trigger = Trigger("forward", self.forwarded["forward"] + trigger.skip)
            self._trigger = trigger
            self._callback = callback

    def inject(self, fault: str) -> None:
        """Apply ``fault`` now, outside any trigger (the runner's own moment)."""
        with self._lock:
            self.fired_t = time.monotonic()
            self.fault = fault
            self.fired.set()
            self._apply(fault, None, None)

    # -- plumbing

    def _accept(self) -> None:
        try:
            client, _ = self._server.accept()
        except OSError:
            return
        family = socket.AF_UNIX if isinstance(self.upstream, str) else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        self._sockets = [client, server]
        if self.on_connect is not None:
            self.on_connect()
        try:
            server.connect(self.upstream)
        except OSError:
            client.close()
            server.close()
            return
        self.connected.set()
        with self._lock:
            if self._trigger is not None and self._trigger.kind == "accept":
                self._apply(self._fire("accept"), None, None)
        for direction, src, dst in (("forward", client, server), ("return", server, client)):
            t = threading.Thread(target=self._pump, args=(direction, src, dst),
                                 name=f"fault-proxy-{direction}", daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, direction: str, src: socket.socket, dst: socket.socket) -> None:
        framed = (direction == "return" and self.return_path) or self.tls
        pending = b""
        while True:
            if self._stalled.is_set():
                self._closed.wait()
                return
            try:
                data = src.recv(CHUNK)
            except OSError:
                data = b""
            if self._stalled.is_set():
                self._closed.wait()
                return
            if not data:
                if pending and not self._dead[direction]:
                    self._send(direction, dst, pending)
                self._half_close(direction, dst)
                return
            if self._dead[direction]:
                continue  # a cut direction: its sender's bytes go nowhere
            if not framed:
                self._forward_raw(direction, dst, data)
                continue
            pending += data
            while True:
                unit = self._next_unit(pending)
                if unit is None:
                    break
                pending = pending[len(unit[0]):]
                if not self._forward_unit(direction, dst, *unit):
                    break
                if self._dead[direction] or self._stalled.is_set():
                    pending = b""
                    break

    def _next_unit(self, pending: bytes):
        """The next whole message (plaintext return path) or TLS record, and what names it."""
        if self.tls:
            if len(pending) < TLS_HEAD.size:
                return None
            _, _, length = TLS_HEAD.unpack_from(pending)
            end = TLS_HEAD.size + length
            return (pending[:end], length) if len(pending) >= end else None
        if len(pending) < RP_HEAD.size:
            return None
        kind, _, length = RP_HEAD.unpack_from(pending)
        end = RP_HEAD.size + min(length, 1 << 20)
        return (pending[:end], kind) if len(pending) >= end else None

    def _forward_raw(self, direction: str, dst: socket.socket, data: bytes) -> None:
        with self._lock:
            trigger = self._trigger
            if trigger is not None and trigger.kind == "forward" and direction == "forward":
                split = trigger.skip - self.forwarded["forward"]
                if split < len(data):
                    head, data = data[:max(split, 0)], data[max(split, 0):]
                    if head:
                        self._send(direction, dst, head)
                    fault = self._fire(f"forward byte {self.forwarded['forward']}")
                    data = self._apply(fault, direction, data)
                    if data is None:
                        return
        self._send(direction, dst, data)

    def _forward_unit(self, direction: str, dst: socket.socket, unit: bytes, name: int) -> bool:
        self.seen[direction].append(name)
        with self._lock:
            trigger = self._trigger
            match = trigger is not None and (
                (trigger.kind in ("return-type", "return-record") and direction == "return"
                 and name == trigger.value)
                or (trigger.kind == "forward-record" and direction == "forward"
                    and name == trigger.value)
                or (trigger.kind == "forward" and direction == "forward"
                    and self.forwarded["forward"] + len(unit) > trigger.skip))
            if not match:
                self._send(direction, dst, unit)
                return True
            what = f"{direction} {'record of' if self.tls else 'message'} {name}"
            if trigger.after:
                self._send(direction, dst, unit)
                fault = self._fire(f"after {what}")
                self._apply(fault, direction, None)
                return True
            fault = self._fire(what)
            unit = self._apply(fault, direction, unit)
            if unit is None:
                return False
        self._send(direction, dst, unit)
        return True

    def _fire(self, what: str) -> str:
        self._trigger = None
        self.fired_at = what
        fault = self._callback(what) if self._callback is not None else "pass"
        self.fault = fault
        self.fired_t = time.monotonic()
        self.fired.set()
        return fault

    def _apply(self, fault: str, direction: str | None, data: bytes | None):
        """Apply ``fault`` to the held ``data`` of ``direction``; returns what to forward, or
        None for nothing."""
        if fault == "pass":
            return data
        if fault == "corrupt":
            if not data:  # nothing held: the next bytes of the forward direction
                self._trigger = Trigger("forward", self.forwarded["forward"])
                self._callback = lambda what: "corrupt"
                return data
            data = bytearray(data)
            at = self.rng.randrange(len(data)) if self.rng else len(data) // 2
            flip = self.rng.randrange(1, 256) if self.rng else 0xff
            data[at] ^= flip
            self.corrupted = (direction, self.forwarded[direction] + at, flip)
            return bytes(data)
        if fault == "stall":
            self._stalled.set()
            return None
        if fault == "cut":
            self._dead["forward"] = self._dead["return"] = True
            for sock in self._sockets:
                _quiet(sock.shutdown, socket.SHUT_RDWR)
            return None
        if fault in ("cut-forward", "cut-return"):
            which = fault.removeprefix("cut-")
            self._dead[which] = True
            receiver = self._sockets[1] if which == "forward" else self._sockets[0]
            _quiet(receiver.shutdown, socket.SHUT_WR)
            return None if which == direction else data
        raise ValueError(f"unknown fault {fault!r}")

    def _send(self, direction: str, dst: socket.socket, data: bytes) -> None:
        try:
            dst.sendall(data)
        except OSError:
            return
        self.forwarded[direction] += len(data)

    def _half_close(self, direction: str, dst: socket.socket) -> None:
        _quiet(dst.shutdown, socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        _quiet(self._server.close)
        if isinstance(self.address, str):
            _quiet(os.unlink, self.address)
        for sock in self._sockets:
            # shutdown first: a pump blocked in recv holds the socket open past close(),
            # and the peer would never see the end
            _quiet(sock.shutdown, socket.SHUT_RDWR)
            _quiet(sock.close)
        for t in self._threads:
            t.join(5)


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass
