"""Fuzz target ``control``: the control socket's input, from bytes to answers.

Input::

    0 mode u8     bits 0-3: how the bytes arrive (0: in one piece, n: pieces of 1..n bytes)
                  bit 4: a message limit of SMALL_LIMIT bytes for the splitter check
                  bit 5: a destination session (else a source without a guest)
                  bit 6: a TCP connection, which must prove itself with the token first
                  bit 7: a server without a token (one that serves no TCP; unix only)
    1 bytes       what a client sends

The bytes go through the server's :class:`~pymig.control.MessageSplitter` in one piece and in
pieces, which must cut the same texts (and outgrow the limit at the same text).  Then they
reach a client connection as the server's reads would hand them over
(:meth:`pymig.control._Client.receive`, piece by piece), on a unix socket or on TCP, against a
real :class:`~pymig.session.Session` whose migrations and incoming migrations only parse their
URI, so nothing runs, listens or connects.  The server's token is :data:`TOKEN`, known here,
so that inputs can prove themselves and reach the commands behind the handshake.

Crashes, besides an exception: an answer that does not encode as JSON, or that is an
"internal error" (the catch-all for a bug in a command); on TCP, a first message answered
with success that is not ``qmp_capabilities`` with :data:`TOKEN`, or anything read (answered)
after a first message that was refused.
"""

from __future__ import annotations

import json
import queue

from pymig import transport
from pymig.control import MAX_MESSAGE_BYTES, ControlServer, MessageSplitter, _Client
from pymig.fuzz._harness import Finding
from pymig.fuzz.words import control_words
from pymig.session import CommandError, Session

SMALL_LIMIT = 64
TCP = 0x40
NO_TOKEN = 0x80
#: The token of the server under fuzzing (the seeds and the dictionary carry it).
TOKEN = "7079d16f757a7a2d746f6b656e2d666f722d7468652d636f6e74726f6c2d6861"


def dictionary() -> list[bytes]:
    return [*control_words(), f'"{TOKEN}"'.encode(), b'"token"']


class _Session(Session):
    """Everything of a session except what would start a migration or end the process."""

    def migrate(self, uri: str, *, trace_path: str | None = None,
                resume: bool | None = None, blk: bool = False, inc: bool = False) -> None:
        if self.machine is None:
            raise CommandError("there is no guest to migrate")
        transport.parse_uri(uri)

    def start_incoming(self, uri: str) -> str:
        transport.parse_uri(uri)
        return uri

    def quit(self) -> None:
        pass


class _Server:
    """What a client connection asks of its server, with :data:`TOKEN` (or none)."""

    check_token = ControlServer.check_token
    token_path = "/run/pymig-fuzz.token"

    def __init__(self, session: Session, token: str | None):
        self.session = session
        self.token = token

    def forget(self, client) -> None:
        pass


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    limit = SMALL_LIMIT if mode & 0x10 else MAX_MESSAGE_BYTES
    whole = _split(body, limit, [len(body) or 1])
    pieces = mode & 0x0F
    sizes = [1 + (i % pieces) for i in range(len(body))] if pieces else [len(body) or 1]
    if pieces:
        cut = _split(body, limit, sizes)
        # A feed that outgrows the limit raises and drops the texts it completed before:
        # the server reads 64 KiB at a time against a limit of 1 MiB, so no text it gets
        # whole shares a read with one that outgrows it.  In pieces, those come out first.
        same = cut == whole or (whole[1] and cut[1] and cut[0][:len(whole[0])] == whole[0])
        if not same:
            raise Finding(f"the splitter cuts differently in pieces of 1..{pieces} bytes: "
                          f"{whole!r} whole, {cut!r} in pieces")
    _converse(mode, body, sizes)


def _converse(mode: int, body: bytes, sizes: list[int]) -> list[str]:
    """``body`` into a client connection in pieces of ``sizes``, every answer checked; the
    answers."""
    over_tcp = bool(mode & TCP)
    token = None if mode & NO_TOKEN and not over_tcp else TOKEN
    server = _Server(_Session(destination=bool(mode & 0x20)), token)
    client = _Client(server, None, needs_token=over_tcp)
    answers: list[str] = []
    pos = i = 0
    outcome = None
    while pos < len(body) and outcome is None:
        size = sizes[i % len(sizes)]
        outcome = client.receive(body[pos:pos + size])
        answers += _drain(client)
        pos += size
        i += 1
        if over_tcp and answers:
            _check_handshake(body, answers)
    for answer in answers:
        if "internal error" in answer:
            raise Finding(f"an internal error answered {body[:200]!r}: {answer[:400]}")
    return answers


def _drain(client: _Client) -> list[str]:
    """The answers the client has queued (each one JSON text, as it goes out)."""
    out = []
    while True:
        try:
            data = client._out.get_nowait()
        except queue.Empty:
            return out
        if data is None:  # the connection was dropped
            continue
        text = data.decode()
        try:
            json.loads(text)
        except ValueError as exc:
            raise Finding(f"an answer is not JSON: {text[:400]!r}") from exc
        out.append(text)


def _check_handshake(body: bytes, answers: list[str]) -> None:
    """On TCP: the first answer is a success only for qmp_capabilities with the token, and
    nothing is answered after a first answer that was not one."""
    first = json.loads(answers[0])
    if "return" in first:
        message = _first_message(body)
        proved = (isinstance(message, dict) and message.get("execute") == "qmp_capabilities"
                  and isinstance(message.get("arguments"), dict)
                  and message["arguments"].get("token") == TOKEN)
        if not proved:
            raise Finding(f"a TCP client that did not send the token was served: {body[:200]!r}")
    elif len(answers) > 1:
        raise Finding(f"a TCP client whose first message was refused got more answers: "
                      f"{answers[:3]}")


def _first_message(body: bytes):
    texts = MessageSplitter(MAX_MESSAGE_BYTES).feed(body)
    try:
        return json.loads(texts[0]) if texts else None
    except ValueError:
        return None


def _split(body: bytes, limit: int, sizes: list[int]) -> tuple[list[bytes], bool]:
    """The texts the splitter completes from ``body`` fed in pieces of ``sizes`` (cycled),
    up to where a text outgrows ``limit``; and whether one did."""
    splitter = MessageSplitter(limit)
    texts: list[bytes] = []
    pos = i = 0
    while pos < len(body):
        size = sizes[i % len(sizes)]
        try:
            texts += splitter.feed(body[pos:pos + size])
        except ValueError:
            return texts, True
        pos += size
        i += 1
    return texts, False
