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

A migration with ``postcopy-preempt`` opens a second connection to the same address (the
preempt channel): a proxy made with ``links=2`` forwards it too, as its link 1, and a trigger
or an injected fault names the link it is for (a cut or a stall of one link leaves the other
carrying).
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
    link: int = 0  # which connection: 0 the first one made, 1 the next (a preempt channel)


class _Link:
    """One forwarded connection: its two sockets and what each direction carried."""

    def __init__(self, index: int, client: socket.socket, server: socket.socket):
        self.index = index
        self.sockets = [client, server]
        self.dead = {"forward": False, "return": False}
        self.forwarded = {"forward": 0, "return": 0}
        self.seen: dict[str, list[int]] = {"forward": [], "return": []}
        self.stalled = threading.Event()


class FaultProxy:
    """Forwards one connection (or ``links``) from ``listen`` to ``upstream`` (each a
    ``(host, port)`` or a unix socket path), with at most one armed trigger at a time."""

    def __init__(self, listen: str | tuple[str, int], upstream: str | tuple[str, int], *,
                 tls: bool = False, return_path: bool = True, rng=None, links: int = 1):
        family = socket.AF_UNIX if isinstance(listen, str) else socket.AF_INET
        self.upstream = upstream
        self.tls = tls
        self.return_path = return_path  # whether the return direction is in messages
        self.rng = rng
        self._server = socket.socket(family, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(listen)
        self._server.listen(links)
        self.max_links = links
        self.address = self._server.getsockname()
        self._lock = threading.RLock()
        self._trigger: Trigger | None = None
        self._callback: Callable[[str], str] | None = None
        self.fired = threading.Event()
        self.fired_at: str | None = None  # what the trigger matched
        self.fault: str | None = None
        self.corrupted: tuple[str, int, int] | None = None  # direction, offset, xor
        self.links: list[_Link] = []
        self.connected = threading.Event()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.on_connect: Callable[[], None] | None = None
        self._accepter = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._accepter.start()

    @property
    def forwarded(self) -> dict[str, int]:
        """What the first connection carried each way so far."""
        return self.links[0].forwarded if self.links else {"forward": 0, "return": 0}

    @property
    def seen(self) -> dict[str, list[int]]:
        """The first connection's message types / record sizes, in order."""
        return self.links[0].seen if self.links else {"forward": [], "return": []}

    def arm(self, trigger: Trigger, callback: Callable[[str], str]) -> None:
        """Fire ``callback(what)`` at ``trigger`` (forward offsets count from now, on its
        link; a link not made yet counts from its start); it returns the fault to apply there
        (see the module's docstring)."""
        with self._lock:
            if trigger.kind == "forward":
                done = self.links[trigger.link].forwarded["forward"] \
                    if trigger.link < len(self.links) else 0
                trigger = Trigger("forward", done + trigger.skip, link=trigger.link)
            self._trigger = trigger
            self._callback = callback

    def inject(self, fault: str, link: int = 0) -> None:
        """Apply ``fault`` now to ``link``, outside any trigger (the runner's own moment)."""
        with self._lock:
            self.fired_t = time.monotonic()
            self.fault = fault
            self.fired.set()
            if link < len(self.links):
                self._apply(fault, self.links[link], None, None)

    # -- plumbing

    def _accept(self) -> None:
        while len(self.links) < self.max_links and not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            family = socket.AF_UNIX if isinstance(self.upstream, str) else socket.AF_INET
            server = socket.socket(family, socket.SOCK_STREAM)
            if self.on_connect is not None and not self.links:
                self.on_connect()
            with self._lock:  # (made before the upstream sees it: a fault can name it then)
                link = _Link(len(self.links), client, server)
                self.links.append(link)
                closed = self._closed.is_set()
            try:
                if closed:  # (closed meanwhile: close() may have missed these)
                    raise OSError("closed")
                server.connect(self.upstream)
            except OSError:
                for sock in link.sockets:
                    _quiet(sock.shutdown, socket.SHUT_RDWR)
                    _quiet(sock.close)
                return
            self.connected.set()
            with self._lock:
                if self._trigger is not None and self._trigger.kind == "accept" \
                        and self._trigger.link == link.index:
                    self._apply(self._fire("accept"), link, None, None)
            for direction, src, dst in (("forward", client, server),
                                        ("return", server, client)):
                t = threading.Thread(target=self._pump, args=(link, direction, src, dst),
                                     name=f"fault-proxy-{direction}", daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, link: _Link, direction: str, src: socket.socket,
              dst: socket.socket) -> None:
        framed = (direction == "return" and self.return_path) or self.tls
        pending = b""
        while True:
            if link.stalled.is_set():
                self._closed.wait()
                return
            try:
                data = src.recv(CHUNK)
            except OSError:
                data = b""
            if link.stalled.is_set():
                self._closed.wait()
                return
            if not data:
                if pending and not link.dead[direction]:
                    self._send(link, direction, dst, pending)
                self._half_close(direction, dst)
                return
            if link.dead[direction]:
                continue  # a cut direction: its sender's bytes go nowhere
            if not framed:
                self._forward_raw(link, direction, dst, data)
                continue
            pending += data
            while True:
                unit = self._next_unit(pending)
                if unit is None:
                    break
                pending = pending[len(unit[0]):]
                if not self._forward_unit(link, direction, dst, *unit):
                    break
                if link.dead[direction] or link.stalled.is_set():
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

    def _forward_raw(self, link: _Link, direction: str, dst: socket.socket,
                     data: bytes) -> None:
        with self._lock:
            trigger = self._trigger
            if trigger is not None and trigger.kind == "forward" and direction == "forward" \
                    and trigger.link == link.index:
                split = trigger.skip - link.forwarded["forward"]
                if split < len(data):
                    head, data = data[:max(split, 0)], data[max(split, 0):]
                    if head:
                        self._send(link, direction, dst, head)
                    fault = self._fire(f"forward byte {link.forwarded['forward']}"
                                       + (f" of link {link.index}" if link.index else ""))
                    data = self._apply(fault, link, direction, data)
                    if data is None:
                        return
        self._send(link, direction, dst, data)

    def _forward_unit(self, link: _Link, direction: str, dst: socket.socket, unit: bytes,
                      name: int) -> bool:
        link.seen[direction].append(name)
        with self._lock:
            trigger = self._trigger
            match = trigger is not None and trigger.link == link.index and (
                (trigger.kind in ("return-type", "return-record") and direction == "return"
                 and name == trigger.value)
                or (trigger.kind == "forward-record" and direction == "forward"
                    and name == trigger.value)
                or (trigger.kind == "forward" and direction == "forward"
                    and link.forwarded["forward"] + len(unit) > trigger.skip))
            if not match:
                self._send(link, direction, dst, unit)
                return True
            what = f"{direction} {'record of' if self.tls else 'message'} {name}" + (
                f" of link {link.index}" if link.index else "")
            if trigger.after:
                self._send(link, direction, dst, unit)
                fault = self._fire(f"after {what}")
                self._apply(fault, link, direction, None)
                return True
            fault = self._fire(what)
            unit = self._apply(fault, link, direction, unit)
            if unit is None:
                return False
        self._send(link, direction, dst, unit)
        return True

    def _fire(self, what: str) -> str:
        self._trigger = None
        self.fired_at = what
        fault = self._callback(what) if self._callback is not None else "pass"
        self.fault = fault
        self.fired_t = time.monotonic()
        self.fired.set()
        return fault

    def _apply(self, fault: str, link: _Link, direction: str | None, data: bytes | None):
        """Apply ``fault`` to ``link`` and to its held ``data`` of ``direction``; returns what
        to forward, or None for nothing."""
        if fault == "pass":
            return data
        if fault == "corrupt":
            if not data:  # nothing held: the next bytes of the forward direction
                self._trigger = Trigger("forward", link.forwarded["forward"], link=link.index)
                self._callback = lambda what: "corrupt"
                return data
            data = bytearray(data)
            at = self.rng.randrange(len(data)) if self.rng else len(data) // 2
            flip = self.rng.randrange(1, 256) if self.rng else 0xff
            data[at] ^= flip
            self.corrupted = (direction, link.forwarded[direction] + at, flip)
            return bytes(data)
        if fault == "stall":
            link.stalled.set()
            return None
        if fault == "cut":
            link.dead["forward"] = link.dead["return"] = True
            for sock in link.sockets:
                _quiet(sock.shutdown, socket.SHUT_RDWR)
            return None
        if fault in ("cut-forward", "cut-return"):
            which = fault.removeprefix("cut-")
            link.dead[which] = True
            receiver = link.sockets[1] if which == "forward" else link.sockets[0]
            _quiet(receiver.shutdown, socket.SHUT_WR)
            return None if which == direction else data
        raise ValueError(f"unknown fault {fault!r}")

    def _send(self, link: _Link, direction: str, dst: socket.socket, data: bytes) -> None:
        try:
            dst.sendall(data)
        except OSError:
            return
        link.forwarded[direction] += len(data)

    def _half_close(self, direction: str, dst: socket.socket) -> None:
        _quiet(dst.shutdown, socket.SHUT_WR)

    def close(self) -> None:
        with self._lock:
            self._closed.set()
        _quiet(self._server.shutdown, socket.SHUT_RDWR)  # (an accept waiting for a link)
        _quiet(self._server.close)
        if isinstance(self.address, str):
            _quiet(os.unlink, self.address)
        for sock in [s for link in self.links for s in link.sockets]:
            # shutdown first: a pump blocked in recv holds the socket open past close(),
            # and the peer would never see the end
            _quiet(sock.shutdown, socket.SHUT_RDWR)
            _quiet(sock.close)
        for t in self._threads:
            t.join(5)
        self._accepter.join(5)


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass
