"""Fuzz target ``returnpath``: what a destination says back to its source.

A source must not trust its destination either: the destination's return-path messages (READY,
PROGRESS, CAUGHT_UP, LOADED, ACK with its times, LOAD_ERROR with its text, ...) steer the
source's migration and end up in what the operator reads.  Input: the bytes a destination
sends on the return path.

A real migration of a small, running simulated guest (:data:`CONFIG`) runs to ``fd:N``, one end of a
socket pair whose other end plays the destination: it sends the input, closes its sending side
and reads the stream to its end.  The source's :class:`pymig.migration.ReturnPath` reads the
input through :class:`pymig.stream.ReturnPathReader` and the migration goes as the messages
say.  When it has ended, its ``query-migrate`` answer is encoded as the control socket sends
it and rendered as ``pymig migrate`` prints it (:func:`pymig.monitor.stats_table`).

Crashes, besides an exception out of any of that: a migration that fails with an exception
that is not a PymigError (a bug, which ``query-migrate`` reports as "TypeError: ..."); one
that completes without the destination having said LOADED and then ACK; a source guest that
does not run again after a migration that failed before its commit (it ran before); a
downtime longer than the whole migration (the destination's times taken on trust); a
migration still running :data:`END_TIMEOUT_S` after the destination is gone.
"""

from __future__ import annotations

import io
import json
import random
import socket
import threading

from pymig import stream
from pymig.errors import PymigError
from pymig.fuzz._harness import Finding
from pymig.guest import GuestConfig, create
from pymig.machine import Machine
from pymig.migration import Migration

MiB = 1 << 20
CONFIG = GuestConfig("simulated", 2 * MiB, vcpus=1, workload="idle")
END_TIMEOUT_S = 10.0


def mutator(mutate):
    """A libFuzzer custom mutator over ``mutate(data, max_size)`` (atheris's): most of the time
    it changes the conversation message by message (one message's payload, with its length
    made right again; a new message of any kind; one dropped, repeated or two swapped), so that
    the migration, not the reader's framing, sees the change."""
    kinds = sorted(stream._MESSAGES)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        messages = _split(data)
        choice = rng.random()
        if not messages or choice < 0.3:
            return mutate(data, max_size)
        i = rng.randrange(len(messages))
        if choice < 0.6:
            kind, payload = messages[i]
            messages[i] = (kind, mutate(payload, max(2 * len(payload), 16)))
        elif choice < 0.8:
            kind = rng.choice(kinds)
            fmt = stream._MESSAGES[kind].FORMAT
            size = fmt.size if fmt is not None else rng.randrange(64)
            messages.insert(i, (kind, rng.randbytes(size)))
        elif choice < 0.9 and len(messages) > 1:
            j = rng.randrange(len(messages))
            messages[i], messages[j] = messages[j], messages[i]
        elif rng.random() < 0.5:
            del messages[i]
        else:
            messages.insert(i, messages[i])
        out = b"".join(stream.RP_HEAD.pack(kind, 0, len(payload)) + payload
                       for kind, payload in messages)
        return out[:max_size]

    return custom_mutator


def _split(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each message whose header and payload are there."""
    messages, pos = [], 0
    while pos + stream.RP_HEAD_BYTES <= len(data):
        kind, _, length = stream.RP_HEAD.unpack_from(data, pos)
        pos += stream.RP_HEAD_BYTES
        messages.append((kind, data[pos:pos + length]))
        pos += length
    return messages


def dictionary() -> list[bytes]:
    """Each message's header (type, reserved 0, its length) and a few numbers."""
    words = []
    for cls in stream._MESSAGES.values():
        size = cls.FORMAT.size if cls.FORMAT is not None else 16
        words.append(stream.RP_HEAD.pack(cls.TYPE, 0, size))
    words += [b"\xff" * 8, b"\x00" * 8, (1 << 63).to_bytes(8, "little"), b"[/]", b"[bold]",
              b"\x1b[2J", b"\xc3\x28"]
    return words


_guest = None


def setup() -> None:
    _running_guest()


def _running_guest():
    """The source guest, running (one for every input: a migration that completed leaves it
    paused, as the destination has it now; here it runs again for the next input)."""
    global _guest
    if _guest is None:
        _guest = create(CONFIG)
        _guest.start()
    elif _guest.status != "running":
        _guest.resume()
    return _guest


def test_one_input(data: bytes) -> None:
    _migrate(_running_guest(), data)


def _migrate(guest, data: bytes) -> None:
    source_end, destination_end = socket.socketpair()
    migration = Migration(Machine.source(guest))
    peer = threading.Thread(target=_destination, args=(destination_end, data),
                            name="pymig-fuzz-destination", daemon=True)
    peer.start()
    try:
        migration.start(f"fd:{source_end.fileno()}")
        source_end.detach()  # the migration's channel owns the descriptor now
        status = migration.wait(END_TIMEOUT_S)
    finally:
        source_end.close()
    if migration.status.value not in ("completed", "failed"):
        migration.cancel()
        migration.wait(END_TIMEOUT_S)
        raise Finding(f"the migration is still {status.value} {END_TIMEOUT_S} s after its "
                      f"destination said all it had to say")
    peer.join(END_TIMEOUT_S)
    _check(migration, guest, data)


def _destination(sock: socket.socket, data: bytes) -> None:
    """Say ``data``, stop saying anything, and read the stream to its end."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass
    finally:
        sock.close()


def _check(migration: Migration, guest, data: bytes) -> None:
    error = migration.error
    if error is not None and not isinstance(error, PymigError):
        raise Finding(f"the migration failed with {type(error).__name__}: {error}") from error
    info = migration.query()
    encoded = json.dumps(info, allow_nan=False)
    if migration.status.value == "completed":
        said = _said(data)
        if stream.Loaded not in said or stream.Ack not in said:
            raise Finding(f"the migration completed, but the destination said only "
                          f"{[cls.__name__ for cls in said]}")
        downtime, total = info.get("downtime"), info.get("total-time")
        if downtime is not None and total is not None and downtime > total:
            raise Finding(f"a downtime of {downtime} ms in a migration of {total} ms: {encoded}")
    elif guest.status != "running" and not migration._committed:
        raise Finding(f"the migration failed ({info.get('error-desc')}) and the source guest "
                      f"is {guest.status}")
    _render(info)


def _said(data: bytes) -> list[type]:
    """The kinds of message in ``data`` up to the first that does not parse."""
    from pymig.transport import BytesChannel

    class Back(BytesChannel):
        has_return_path = True

    reader = stream.ReturnPathReader(Back(data))
    said = []
    try:
        while True:
            said.append(type(reader.recv()))
    except PymigError:
        return said


def _render(info: dict) -> None:
    """The final answer as ``pymig migrate`` prints it."""
    from rich.console import Console

    from pymig.monitor import stats_table

    Console(file=io.StringIO(), width=100, color_system=None).print(stats_table(info))
