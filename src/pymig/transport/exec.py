"""``exec:COMMAND``: the stream goes through a shell command's standard streams.

On the source the stream is written to ``sh -c COMMAND``'s standard input (for
example ``exec:gzip > vm.gz``); on the destination it is read from the
command's standard output (``exec:gzip -dc vm.gz``).  A pipe carries one
direction only, so there is no return path.  Closing the channel waits for the
command and reports a failure (non-zero exit, killed by a signal) as a
:class:`~pymig.errors.TransportError`.
"""

from __future__ import annotations

import os
import subprocess

from pymig.transport.channel import FdChannel, transport_error
from pymig.transport.listener import ReadyListener
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
    return FdChannel(ours, str(uri), writable=source, process=process)


def connect(uri: Uri, *, timeout: float | None) -> FdChannel:
    """Start the command with the stream as its standard input."""
    return _spawn(uri, source=True)


def listen(uri: Uri) -> ReadyListener:
    """Start the command and read the stream from its standard output."""
    return ReadyListener(_spawn(uri, source=False), uri)
