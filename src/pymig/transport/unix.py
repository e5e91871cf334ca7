"""``unix:PATH``: an AF_UNIX stream socket in the file system.

The listener creates the socket file, mode 0600 from the start, and removes it
again on close (only if it is still the file it created).  A leftover socket
file that nobody listens on any more is replaced; a live one is an error, as is
any other kind of file.
"""

from __future__ import annotations

import os
import socket

from pymig.errors import TransportError
from pymig.transport import sockfile
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


def listen(uri: Uri) -> SocketListener:
    """Create the socket file (0600: only its owner may connect) and listen for the source."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sockfile.claim(uri.path)
        created = sockfile.bind_private(sock, uri.path)
        sock.listen(1)
    except ValueError as exc:
        sock.close()
        raise TransportError(f"listening on {uri} failed: {exc}") from None
    except OSError as exc:
        sock.close()
        raise transport_error(f"listening on {uri}", exc) from exc
    return SocketListener(sock, uri, on_close=lambda: sockfile.remove_if_same(uri.path, created))
