"""Transports: how the migration stream gets from the source to the destination.

One module per URI scheme, chosen by the text before the first ``:``::

    tcp:HOST:PORT     tcp:127.0.0.1:4444, tcp:[::1]:4444, tcp:host.example:4444,
                      tcp:0.0.0.0:0 (listen on any free port)         return path
    unix:PATH         an AF_UNIX stream socket file                   return path
    exec:COMMAND      source: COMMAND's stdin; destination: its stdout
    fd:N              an inherited descriptor (socket: return path; pipe or file: none)
    file:PATH         source writes the file, destination reads it

The source calls :func:`connect`; the destination calls :func:`listen` and then
``accept()`` on the listener.  Both give a :class:`Channel`.
"""

from __future__ import annotations

from types import ModuleType

from pymig.errors import TransportError, UriError
from pymig.transport import exec as _exec
from pymig.transport import fd as _fd
from pymig.transport import file as _file
from pymig.transport import tcp as _tcp
from pymig.transport import unix as _unix
from pymig.transport.channel import (Channel, DeadlineExceeded, FdChannel, PeerClosedError,
                                     SocketChannel, byte_view)
from pymig.transport.listener import Listener, ReadyListener, SocketListener
from pymig.transport.memory import BytesChannel
from pymig.transport.ratelimit import RateLimiter
from pymig.transport.uri import Uri, uri_error

__all__ = [
    "BytesChannel", "Channel", "DeadlineExceeded", "FdChannel", "Listener", "PeerClosedError",
    "RateLimiter", "ReadyListener", "SocketChannel", "SocketListener", "TransportError", "Uri", "UriError",
    "byte_view", "connect", "listen", "parse_uri", "SCHEMES",
]

#: Scheme name -> module providing ``parse``, ``connect`` and ``listen``.
SCHEMES: dict[str, ModuleType] = {m.SCHEME: m for m in (_tcp, _unix, _exec, _fd, _file)}

#: How long :func:`connect` waits by default for the destination to answer.
DEFAULT_CONNECT_TIMEOUT_S = 30.0


def parse_uri(uri: str | Uri) -> Uri:
    """Parse a migration URI, or raise :class:`UriError` saying what is wrong with it."""
    if isinstance(uri, Uri):
        return uri
    if not isinstance(uri, str):
        raise UriError(f"a migration URI must be a string, not {type(uri).__name__}")
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise uri_error(uri, "no scheme; expected one of " + _scheme_list())
    module = SCHEMES.get(scheme)
    if module is None:
        raise uri_error(uri, f"unknown scheme {scheme!r}; expected one of " + _scheme_list())
    return module.parse(rest, uri)


def _scheme_list() -> str:
    return ", ".join(f"{name}:" for name in SCHEMES)


def connect(uri: str | Uri, *, timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S) -> Channel:
    """Open the source's side: connect (tcp, unix) or open the byte sink (exec, fd, file).

    ``timeout`` bounds connecting only; use :meth:`Channel.settimeout` for the transfer.
    """
    parsed = parse_uri(uri)
    return SCHEMES[parsed.scheme].connect(parsed, timeout=timeout)


def listen(uri: str | Uri) -> Listener:
    """Open the destination's side; ``accept()`` on the result gives the channel."""
    parsed = parse_uri(uri)
    return SCHEMES[parsed.scheme].listen(parsed)
