"""``unix:PATH``: an AF_UNIX stream socket in the file system.

The listener creates the socket file and removes it again on close (only if
it is still the file it created).  A leftover socket file that nobody listens
on any more is replaced; a live one is an error, as is any other kind of file.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from pymig.errors import TransportError
from pymig.transport.channel import SocketChannel, transport_error
from pymig.transport.listener import SocketListener
from pymig.transport.uri import Uri, uri_error

SCHEME = "unix"
#: sun_path holds 108 bytes including the terminating NUL.
MAX_PATH_BYTES = 107


def parse(rest: str, text: str) -> Uri:
    """Parse what follows ``unix:``."""
    if not rest:
        raise uri_error(text, "empty socket path: expected unix:PATH")
    if "\0" in rest:
        raise uri_error(text, "the socket path contains a NUL byte")
    size = len(os.fsencode(rest))
    if size > MAX_PATH_BYTES:
        raise uri_error(text, f"the socket path is {size} bytes; AF_UNIX allows at most "
                              f"{MAX_PATH_BYTES}")
    return Uri("unix", path=rest)


def connect(uri: Uri, *, timeout: float | None) -> SocketChannel:
    """Connect to a destination listening on the socket file."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(uri.path)
    except OSError as exc:
        sock.close()
        raise transport_error(f"connecting to {uri}", exc, timeout) from exc
    return SocketChannel(sock, str(uri))


def _remove_stale(uri: Uri) -> None:
    """Delete a socket file nobody listens on; refuse anything else in the way."""
    try:
        st = os.stat(uri.path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"listening on {uri} failed: {uri.path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(uri.path)
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise transport_error(f"checking the existing socket {uri.path}", exc) from exc
        os.unlink(uri.path)
    else:
        raise TransportError(f"listening on {uri} failed: another process is listening there")
    finally:
        probe.close()


def listen(uri: Uri) -> SocketListener:
    """Create the socket file and listen for the source."""
    _remove_stale(uri)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(uri.path)
        sock.listen(1)
        created = os.stat(uri.path)
    except OSError as exc:
        sock.close()
        raise transport_error(f"listening on {uri}", exc) from exc

    def remove_socket_file() -> None:
        try:
            now = os.stat(uri.path)
        except OSError:
            return
        if (now.st_dev, now.st_ino) == (created.st_dev, created.st_ino):
            os.unlink(uri.path)

    return SocketListener(sock, uri, on_close=remove_socket_file)
