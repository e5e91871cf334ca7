"""``file:PATH``: the source writes the stream to a file, the destination reads it.

A file has no return path: the destination cannot acknowledge, so a migration
to a file is a snapshot that a later process loads.
"""

from __future__ import annotations

import os

from pymig.transport.channel import FdChannel, transport_error
from pymig.transport.listener import ReadyListener
from pymig.transport.uri import Uri, uri_error

SCHEME = "file"


def parse(rest: str, text: str) -> Uri:
    """Parse what follows ``file:``."""
    if not rest:
        raise uri_error(text, "empty path: expected file:PATH")
    if "\0" in rest:
        raise uri_error(text, "the path contains a NUL byte")
    return Uri("file", path=rest)


def connect(uri: Uri, *, timeout: float | None) -> FdChannel:
    """Create (or truncate) the file and write the stream to it."""
    try:
        fd = os.open(uri.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise transport_error(f"creating {uri}", exc) from exc
    return FdChannel(fd, str(uri), writable=True)


def listen(uri: Uri) -> ReadyListener:
    """Open the file to read the stream from it."""
    try:
        fd = os.open(uri.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise transport_error(f"opening {uri}", exc) from exc
    return ReadyListener(FdChannel(fd, str(uri), writable=False), uri)
