"""``exec:COMMAND``: the stream goes through a shell command's standard streams.

On the source the stream is written to ``sh -c COMMAND``'s standard input (for
example ``exec:gzip > vm.gz``); on the destination it is read from the
command's standard output (``exec:gzip -dc vm.gz``).  A pipe carries one
direction only, so there is no return path: the command's exit status is the
only answer the source gets.  So the source's channel ends the command's input
right after the stream's EOF record and waits for the command to exit (at most
30 s), inside the write of that record: a command that fails (non-zero exit,
killed by a signal) fails the migration with a
:class:`~pymig.errors.TransportError` while the source can still resume its
guest.  A source command must therefore exit once its input ends.  On the
destination, closing the channel waits for the command and reports a failure
the same way.
"""

from __future__ import annotations

import os
import subprocess

from pymig.transport.channel import FdChannel, transport_error
from pymig.transport.listener import ReadyListener
from pymig.transport.tap import StreamTap
from pymig.transport.uri import Uri, uri_error

SCHEME = "exec"
SHELL = "/bin/sh"


def parse(rest: str, text: str) -> Uri:
    """Parse what follows ``exec:``."""
    if not rest.strip():
        raise uri_error(text, "no command: expected exec:COMMAND")
    return Uri("exec", command=rest)


def _spawn(uri: Uri, *, source: bool) -> FdChannel:
    read_fd, write_fd = os.pipe()
    ours, theirs = (write_fd, read_fd) if source else (read_fd, write_fd)
    streams = {"stdin": theirs} if source else {"stdout": theirs}
    try:
        process = subprocess.Popen([SHELL, "-c", uri.command], close_fds=True, **streams)
    except OSError as exc:
        os.close(ours)
        raise transport_error(f"starting {uri}", exc) from exc
    finally:
        os.close(theirs)
    return FdChannel(ours, str(uri), writable=source, process=process,
                     tap=StreamTap() if source else None)


def connect(uri: Uri, *, timeout: float | None) -> FdChannel:
    """Start the command with the stream as its standard input."""
    return _spawn(uri, source=True)


def listen(uri: Uri) -> ReadyListener:
    """Start the command and read the stream from its standard output."""
    return ReadyListener(_spawn(uri, source=False), uri)
