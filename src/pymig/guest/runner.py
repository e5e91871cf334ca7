"""Run a KVM guest in the foreground: its serial output live, its dirty rate about once a
second, a clean stop on Ctrl-C or when the guest powers off.

Build the configuration with :func:`pymig.guest.make_config`; :func:`parse_params` reads
``KEY=VALUE`` workload parameters.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import numpy as np

from pymig.errors import GuestError
from pymig.guest.base import GuestConfig


def parse_params(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["rate_pages_per_s=20000", "pattern=hotspot"]`` -> a params dict; values that read
    as integers (any base prefix) or floats become numbers, the rest stay strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"workload parameter {item!r} is not KEY=VALUE")
        value: Any = text
        for convert in (lambda t: int(t, 0), float):
            try:
                value = convert(text)
                break
            except ValueError:
                continue
        params[key.strip()] = value
    return params


@dataclass
class Sample:
    """One status line: seconds since start, pages/s and what it was measured from."""

    elapsed: float
    pages_per_s: float
    source: str  # "mailbox" (pages_written) or "dirty log" (distinct pages dirtied)
    progress: dict[str, int]

    def line(self) -> str:
        p = self.progress
        return (f"[pymig] {self.elapsed:7.1f} s  {self.pages_per_s:12,.0f} pages/s "
                f"({self.source})  passes {p['passes']}  errors {p['errors']}")


class RateMeter:
    """Pages per second between two calls, from the mailbox or from the dirty log."""

    def __init__(self, guest, dirty_log: bool):
        self.guest = guest
        self.dirty_log = dirty_log
        self.t0 = self._last_t = time.monotonic()
        self._last_written = guest.progress()["pages_written"]
        if dirty_log:
            guest.start_dirty_log()

    def sample(self) -> Sample:
        now = time.monotonic()
        progress = self.guest.progress()
        if self.dirty_log:
            count = 0
            for i, bitmap in enumerate(self.guest.sync_dirty()):
                count += int(np.unpackbits(bitmap.view(np.uint8)).sum())
                self.guest.clear_dirty(i, 0, self.guest.ram_blocks[i].npages)
            pages, source = count, "dirty log"
        else:
            pages, source = progress["pages_written"] - self._last_written, "mailbox"
        rate = pages / max(now - self._last_t, 1e-9)
        self._last_t, self._last_written = now, progress["pages_written"]
        return Sample(now - self.t0, rate, source, progress)


def run(config: GuestConfig, *, serial_out: BinaryIO | None = None,
        serial_file: str | None = None, status: Callable[[str], None] | None = None,
        interval: float = 1.0, dirty_log: bool = False, duration: float | None = None) -> int:
    """Run ``config`` until the guest stops, ``duration`` passes or Ctrl-C.

    Serial output goes to ``serial_out`` (default: stdout) and is appended to
    ``serial_file``; a status line goes to ``status`` (default: stderr) every ``interval``
    seconds.  Returns the guest's exit code (power off), 0 on Ctrl-C or timeout, 1 on a
    guest error.
    """
    from pymig.guest.kvm_guest import KvmGuest

    out = serial_out if serial_out is not None else sys.stdout.buffer
    say = status or (lambda text: print(text, file=sys.stderr, flush=True))
    guest = KvmGuest.create(config)
    tee = None
    try:
        guest.console.subscribe(lambda data: (out.write(data), out.flush()))
        if serial_file:
            tee = guest.console.tee_to_file(serial_file)
        meter = RateMeter(guest, dirty_log)
        guest.start()
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while not guest.machine.stopped.wait(interval):
                say(meter.sample().line())
                if deadline is not None and time.monotonic() >= deadline:
                    break
        except KeyboardInterrupt:
            say("[pymig] interrupted; stopping the guest")
        guest.pause()
        if guest.status == "shutdown":
            say(f"[pymig] guest stopped: {guest.machine.stop_reason}")
            return guest.machine.exit_code or 0
        return 0
    except GuestError as exc:
        say(f"[pymig] guest error: {exc}")
        return 1
    finally:
        if tee is not None:
            guest.console.unsubscribe(tee)
            tee.close()
        guest.close()
