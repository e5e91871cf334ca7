"""The token bucket: holds a rate, follows changes mid-stream, wakes sleepers at once.

Bands are generous on the side the host's noise can push (a slow host sends less), and tight
only where the limiter itself decides (it never lets more through than rate x time + burst).
"""

from __future__ import annotations

import threading
import time

import pytest

from pymig.transport import RateLimiter

from _wire_helpers import WAIT_S, Background, channel_pair

CHUNK = 64 << 10


def _pump(channel, stop: threading.Event, sent: list[tuple[float, int]]) -> None:
    """Send CHUNK after CHUNK until ``stop``; record (time, total sent) after each."""
    data = bytes(CHUNK)
    while not stop.is_set():
        channel.send(data)
        sent.append((time.monotonic(), channel.bytes_sent))


def _drain(channel, stop: threading.Event) -> None:
    buf = bytearray(CHUNK)
    while not stop.is_set() and channel.wait_readable(0.05):
        channel.recv_into(buf)


def _sent_between(samples, t0: float, t1: float) -> int:
    before = max((n for t, n in samples if t <= t0), default=0)
    after = max((n for t, n in samples if t <= t1), default=0)
    return after - before


def test_rate_holds_and_changes_mid_stream(tmp_path):
    rate_a, rate_b = 4 << 20, 12 << 20
    with channel_pair("socketpair", tmp_path) as (src, dst):
        src.set_max_bandwidth(rate_a)
        burst = src.rate_limiter.burst_bytes
        stop = threading.Event()
        samples: list[tuple[float, int]] = []
        drainer = Background(_drain, dst, stop)
        start = time.monotonic()
        pump = Background(_pump, src, stop, samples)
        time.sleep(1.0)
        switch = time.monotonic()
        src.set_max_bandwidth(rate_b)
        time.sleep(1.0)
        end = time.monotonic()
        stop.set()
        pump.result()
        drainer.result()

    phase_a = _sent_between(samples, start, switch)
    phase_b = _sent_between(samples, switch, end)
    # Never more than rate x time + one burst + the chunk in flight.
    assert phase_a <= rate_a * (switch - start) + burst + CHUNK
    assert phase_b <= rate_b * (end - switch) + burst + 2 * CHUNK
    # A loopback socketpair easily reaches these rates; only a stalled host would not.
    assert phase_a >= 0.4 * rate_a * (switch - start)
    assert phase_b >= 0.4 * rate_b * (end - switch)
    assert phase_b > 1.5 * phase_a


def test_lifting_the_limit_wakes_a_sleeping_sender(tmp_path):
    with channel_pair("socketpair", tmp_path) as (src, dst):
        src.set_max_bandwidth(100_000)  # the second 1 MiB write would wait ~10 s
        drainer = Background(dst.recv_exact, 2 << 20)
        sender = Background(lambda: [src.send(bytes(1 << 20)) for _ in range(2)])
        time.sleep(0.3)
        src.set_max_bandwidth(0)
        sender.result(timeout=5.0)
        assert len(drainer.result()) == 2 << 20
        assert src.max_bandwidth == 0


def test_large_send_is_paced_in_bursts(tmp_path):
    limiter = RateLimiter(40 << 20)
    assert limiter.burst_bytes == 4 << 20  # 100 ms worth
    assert RateLimiter(1000).burst_bytes == 1 << 20  # at least one 1 MiB write
    with channel_pair("socketpair", tmp_path) as (src, dst):
        src.set_max_bandwidth(16 << 20)  # burst 1.6 MiB
        drainer = Background(dst.recv_exact, 8 << 20)
        start = time.monotonic()
        src.send(bytes(8 << 20))
        elapsed = time.monotonic() - start
        drainer.result()
    # 8 MiB at 16 MiB/s with one burst of grace cannot finish in under ~0.35 s.
    assert elapsed >= (8 << 20) / (16 << 20) - 0.15
    assert src.bytes_sent == 8 << 20


def test_limiter_is_shared_safely_between_threads():
    limiter = RateLimiter(8 << 20)
    start = time.monotonic()
    done = []

    def worker():
        for _ in range(8):
            limiter.acquire(256 << 10)
        done.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    elapsed = time.monotonic() - start
    assert len(done) == 4
    # 8 MiB total at 8 MiB/s with a 1 MiB burst: at least ~0.8 s, whatever the interleaving.
    assert elapsed >= 0.75


def test_unlimited_never_waits_and_rates_must_be_sane():
    limiter = RateLimiter()
    assert limiter.rate == 0
    assert limiter.acquire(1 << 40) == 0.0
    with pytest.raises(ValueError):
        limiter.set_rate(-1)
    with pytest.raises(ValueError):
        RateLimiter(1, burst_seconds=0)
