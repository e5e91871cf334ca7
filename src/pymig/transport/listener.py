"""Listeners: the destination's side of opening a channel.

A socket listener accepts the one migration connection.  For exec:, fd: and
file: there is nothing to accept; the listener already holds the channel that
reads the bytes and hands it over once.
"""

from __future__ import annotations

import abc
import socket
from collections.abc import Callable

from pymig.errors import TransportError
from pymig.transport.channel import Channel, Closable, SocketChannel, transport_error
from pymig.transport.uri import Uri


class Listener(Closable):
    """Where a destination waits for the source; ``uri`` is the real address.

    :meth:`close` stops listening and releases what the listener created; it is
    idempotent, and a listener is a context manager.
    """

    def __init__(self, uri: Uri):
        self.uri = uri

    @abc.abstractmethod
    def accept(self, timeout: float | None = None) -> Channel:
        """Wait up to ``timeout`` seconds (None: forever) for the source; return its channel."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri}>"


class SocketListener(Listener):
    """A listening stream socket; ``on_close`` undoes what binding created (a socket file)."""

    def __init__(self, sock: socket.socket, uri: Uri,
                 on_close: Callable[[], None] | None = None):
        super().__init__(uri)
        self.sock = sock
        self._on_close = on_close

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, timeout: float | None = None) -> Channel:
        if self._closed:
            raise TransportError(f"listener on {self.uri} is closed")
        self.sock.settimeout(timeout)
        try:
            conn, peer = self.sock.accept()
        except OSError as exc:
            raise transport_error(f"waiting for a connection on {self.uri}", exc,
                                  timeout) from exc
        name = f"{self.uri}"
        if self.uri.scheme == "tcp":
            host, port = peer[0], peer[1]
            name += f" (peer {'[' + host + ']' if ':' in host else host}:{port})"
        return SocketChannel(conn, name)

    def _close(self) -> None:
        self.sock.close()
        if self._on_close is not None:
            self._on_close()


class ReadyListener(Listener):
    """Hands over a channel that is already open (exec:, fd:, file:); only once."""

    def __init__(self, channel: Channel, uri: Uri):
        super().__init__(uri)
        self._channel: Channel | None = channel

    def accept(self, timeout: float | None = None) -> Channel:
        if self._closed or self._channel is None:
            raise TransportError(f"{self.uri} carries one stream and it was already taken")
        channel, self._channel = self._channel, None
        return channel

    def _close(self) -> None:
        # A channel never accepted is ours to release; an accepted one belongs to the caller.
        if self._channel is not None:
            channel, self._channel = self._channel, None
            channel.close()
