"""Fuzz target ``control``: the control socket's input, from bytes to answers.

Input::

    0 mode u8     bits 0-3: how the bytes arrive (0: in one piece, n: pieces of 1..n bytes)
                  bit 4: a message limit of SMALL_LIMIT bytes (else the server's)
                  bit 5: a destination session (else a source without a guest)
    1 bytes       what a client sends

The bytes go through the server's :class:`~pymig.control.MessageSplitter` in one piece and in
pieces, which must cut the same texts (and outgrow the limit at the same text); each text is
then handled as a client connection handles it, against a real :class:`~pymig.session.Session` whose
migrations and incoming migrations only parse their URI, so nothing runs, listens or
connects.  ``handle`` answers every text and never raises; an answer must encode as JSON and
must not be an "internal error" (the catch-all for a bug in a command).
"""

from __future__ import annotations

import json

from pymig import transport
from pymig.control import MAX_MESSAGE_BYTES, MessageSplitter, _Client
from pymig.fuzz._harness import Finding
from pymig.fuzz.words import control_words as dictionary  # noqa: F401 - for _harness
from pymig.session import CommandError, Session

SMALL_LIMIT = 64


class _Session(Session):
    """Everything of a session except what would start a migration or end the process."""

    def migrate(self, uri: str, *, trace_path: str | None = None,
                resume: bool | None = None) -> None:
        if self.machine is None:
            raise CommandError("there is no guest to migrate")
        transport.parse_uri(uri)

    def start_incoming(self, uri: str) -> str:
        transport.parse_uri(uri)
        return uri

    def quit(self) -> None:
        pass


class _Server:
    def __init__(self, session: Session):
        self.session = session

    def forget(self, client) -> None:
        pass


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    limit = SMALL_LIMIT if mode & 0x10 else MAX_MESSAGE_BYTES
    whole = _split(body, limit, [len(body) or 1])
    pieces = mode & 0x0F
    if pieces:
        sizes = [1 + (i % pieces) for i in range(len(body))]
        cut = _split(body, limit, sizes)
        # A feed that outgrows the limit raises and drops the texts it completed before:
        # the server reads 64 KiB at a time against a limit of 1 MiB, so no text it gets
        # whole shares a read with one that outgrows it.  In pieces, those come out first.
        same = cut == whole or (whole[1] and cut[1] and cut[0][:len(whole[0])] == whole[0])
        if not same:
            raise Finding(f"the splitter cuts differently in pieces of 1..{pieces} bytes: "
                          f"{whole!r} whole, {cut!r} in pieces")
    texts, _ = whole
    client = _Client(_Server(_Session(destination=bool(mode & 0x20))), None)
    for text in texts:
        answer, _name = client.handle(text)
        try:
            encoded = json.dumps(answer, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise Finding(f"the answer to {text!r} is not JSON: {exc}") from exc
        if "internal error" in encoded:
            raise Finding(f"the answer to {text!r} is an internal error: {encoded}")


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
