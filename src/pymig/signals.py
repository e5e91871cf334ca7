"""SIGINT and SIGTERM handled by an object for as long as a ``with`` block lasts.

Handlers are installed only from the main thread (Python allows no other), a signal the process
was started with ignored (nohup, a background job) stays ignored, and the previous handlers come
back on exit.  Subclasses say what a signal does in ``_handle``: only record it, since a handler
runs wherever the main thread happens to be.
"""

from __future__ import annotations

import signal
import threading

CAUGHT = (signal.SIGINT, signal.SIGTERM)


class CaughtSignals:
    def __init__(self) -> None:
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in CAUGHT:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = previous
                    signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
