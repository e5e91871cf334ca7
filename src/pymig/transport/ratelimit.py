"""A thread-safe token bucket that caps how fast a channel sends.

Migration bandwidth is a knob the user turns while a migration runs (QEMU's
``max-bandwidth``), so the rate can change at any moment and a sender that is
sleeping on the old rate is woken to re-plan with the new one.

The bucket works on debt: a send of ``n`` bytes proceeds as soon as the bucket
is not in debt and then takes ``n`` tokens, possibly driving the balance
negative; the next send waits until the debt is paid back at ``rate`` bytes/s.
This keeps the long-run rate exact for writes of any size (a 1 MiB write at
1 MiB/s simply costs one second) without ever splitting a write into pieces
smaller than the caller chose.  The balance is capped at ``burst_bytes``, so an
idle channel cannot save up more than one burst.
"""

from __future__ import annotations

import threading
import time

#: The bucket holds at most this many seconds' worth of tokens...
BURST_SECONDS = 0.1
#: ...but always room for at least one write of this size, so a 1 MiB packet
#: never has to be split just to fit the bucket.
MIN_BURST_BYTES = 1 << 20
#: Upper bound on one sleep, so a sleeper re-checks the clock even if a wake-up
#: were lost.
_MAX_SLEEP_S = 0.25


class RateLimiter:
    """Caps the throughput of whoever calls :meth:`acquire` to ``rate`` bytes/s.

    ``rate == 0`` means unlimited: :meth:`acquire` returns at once and costs one
    attribute read.  :meth:`set_rate` may be called from any thread; it wakes
    every sender that is waiting so the new rate applies immediately.
    """

    def __init__(self, rate_bytes_per_s: int = 0, *, burst_seconds: float = BURST_SECONDS,
                 min_burst_bytes: int = MIN_BURST_BYTES, clock=time.monotonic):
        if burst_seconds <= 0:
            raise ValueError(f"burst_seconds must be positive, got {burst_seconds}")
        self._burst_seconds = burst_seconds
        self._min_burst_bytes = int(min_burst_bytes)
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._rate = 0
        self._burst = self._min_burst_bytes
        self._tokens = float(self._burst)
        self._stamp = clock()
        #: seconds senders have slept here, in all: what a sender's own speed leaves out
        self.slept_s = 0.0
        self.set_rate(rate_bytes_per_s)

    @property
    def rate(self) -> int:
        """The current cap in bytes per second (0 = unlimited)."""
        return self._rate

    @property
    def burst_bytes(self) -> int:
        """How many bytes may go out back to back after an idle period."""
        return self._burst

    def set_rate(self, rate_bytes_per_s: int) -> None:
        """Change the cap; takes effect for senders already waiting."""
        rate = int(rate_bytes_per_s)
        if rate < 0:
            raise ValueError(f"a rate cannot be negative, got {rate} bytes/s")
        with self._cond:
            self._refill()
            self._rate = rate
            self._burst = max(self._min_burst_bytes, int(rate * self._burst_seconds))
            if rate == 0:
                # Unlimited: forget any debt so that a later limit starts afresh.
                self._tokens = float(self._burst)
            else:
                self._tokens = min(self._tokens, float(self._burst))
            self._cond.notify_all()

    def acquire(self, nbytes: int) -> float:
        """Wait until ``nbytes`` may be sent, charge them, and return the seconds slept."""
        if self._rate == 0:
            return 0.0
        slept = 0.0
        with self._cond:
            while True:
                self._refill()
                if self._rate == 0 or self._tokens >= 0:
                    if self._rate:
                        self._tokens -= nbytes
                    self.slept_s += slept
                    return slept
                wait_s = min(-self._tokens / self._rate, _MAX_SLEEP_S)
                start = self._clock()
                self._cond.wait(wait_s)
                slept += self._clock() - start

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._stamp
        self._stamp = now
        if self._rate and elapsed > 0:
            self._tokens = min(float(self._burst), self._tokens + elapsed * self._rate)
