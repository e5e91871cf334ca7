"""``fd:N``: an inherited, already open descriptor (socket, pipe or file).

A socket gives a full-duplex :class:`~pymig.transport.channel.SocketChannel`
with a return path; a pipe or file gives a one-way channel.  The channel owns
the descriptor from then on and closes it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat

from pymig.errors import TransportError
from pymig.transport.channel import Channel, FdChannel, SocketChannel
from pymig.transport.listener import ReadyListener
from pymig.transport.uri import Uri, uri_error

SCHEME = "fd"


def parse(rest: str, text: str) -> Uri:
    """Parse what follows ``fd:``; the descriptor must be open in this process."""
    if not (rest.isascii() and rest.isdigit()):
        raise uri_error(text, f"{rest!r} is not a descriptor number: expected fd:N")
    fd = int(rest)
    try:
        os.fstat(fd)
    except OSError:
        raise uri_error(text, f"descriptor {fd} is not open in this process") from None
    return Uri("fd", fd=fd)


def _open(uri: Uri, *, write: bool) -> Channel:
    try:
        st = os.fstat(uri.fd)
        if stat.S_ISSOCK(st.st_mode):
            sock = socket.socket(fileno=uri.fd)
            if sock.type != socket.SOCK_STREAM:
                sock.detach()
                raise TransportError(f"{uri} is not a stream socket")
            return SocketChannel(sock, str(uri))
        mode = fcntl.fcntl(uri.fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise TransportError(f"{uri}: descriptor {uri.fd} is not usable "
                             f"({exc.strerror})") from exc
    wanted = (os.O_WRONLY, os.O_RDWR) if write else (os.O_RDONLY, os.O_RDWR)
    if mode not in wanted:
        need = "writing" if write else "reading"
        raise TransportError(f"{uri}: descriptor {uri.fd} is not open for {need}")
    return FdChannel(uri.fd, str(uri), writable=write)


def connect(uri: Uri, *, timeout: float | None) -> Channel:
    """The source writes the stream to the descriptor."""
    return _open(uri, write=True)


def listen(uri: Uri) -> ReadyListener:
    """The destination reads the stream from the descriptor."""
    return ReadyListener(_open(uri, write=False), uri)
