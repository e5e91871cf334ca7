"""An in-memory channel: a stream held in a bytearray.

For building or inspecting a stream without a peer (tests, sizing a stream,
keeping a small snapshot in memory).  What is sent is appended; what is
received is read from the front; reading past the end is a
:class:`~pymig.transport.channel.PeerClosedError`, exactly like a peer that
closed.
"""

from __future__ import annotations

from pymig.transport.channel import Channel


class BytesChannel(Channel):
    """Sends append to a buffer, receives consume it; no return path."""

    has_return_path = False

    def __init__(self, data=b"", name: str = "memory"):
        super().__init__(name)
        self._data = bytearray(data)
        self._pos = 0

    def getvalue(self) -> bytes:
        """Everything sent (plus the initial data), including what was already read."""
        return bytes(self._data)

    def fileno(self) -> int:
        raise OSError("an in-memory channel has no file descriptor")

    def _send_all(self, view: memoryview) -> None:
        self._data += view

    def _send_vector(self, views: list[memoryview]) -> None:
        for view in views:
            self._data += view

    def _recv_some(self, view: memoryview) -> int:
        n = min(len(view), len(self._data) - self._pos)
        view[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n

    def _apply_timeout(self, seconds: float | None) -> None:
        pass  # never waits

    def wait_readable(self, timeout: float | None) -> bool:
        return True  # a read returns at once: data or end of stream

    def shutdown(self) -> None:
        pass

    def _close(self) -> None:
        pass
