"""What the migration thread estimates: bandwidth, the fixed cost of a switchover, bytes in
flight."""

from __future__ import annotations

import socket

import pytest

from pymig.estimate import Bandwidth, DirtyRate, SwitchoverCost, in_flight_bytes
from pymig.transport import BytesChannel, SocketChannel


def test_bandwidth_keeps_meaningful_samples_and_honours_a_cap():
    bw = Bandwidth(min_sample_bytes=1000)
    bw.observe(0.0, 0)
    bw.observe(1.0, 100)  # first interval: better than nothing
    assert bw.bytes_per_s == 100
    bw.observe(2.0, 10_100)
    assert bw.bytes_per_s == 10_000
    bw.observe(2.001, 10_600)  # too small to mean anything on its own
    assert bw.bytes_per_s == pytest.approx(10_000, rel=0.05)  # only through the window
    bw.cap(5_000)
    assert bw.bytes_per_s == 5_000


def test_switchover_cost_grows_with_the_vcpus_and_the_ram():
    cost = SwitchoverCost(base_s=0.002, per_vcpu_s=0.001, per_gib_s=0.0005)
    assert cost.seconds(1) == pytest.approx(0.003)
    assert cost.seconds(4) == pytest.approx(0.006)
    assert cost.seconds(1, 16 << 30) == pytest.approx(0.011)
    assert 0 < SwitchoverCost().seconds(1) < SwitchoverCost().seconds(1, 16 << 30)


def test_bytes_the_peer_has_not_read_are_in_flight():
    a, b = socket.socketpair()
    channel = SocketChannel(a, "socketpair")
    try:
        assert in_flight_bytes(channel) == 0
        channel.send(b"x" * 100_000)
        assert in_flight_bytes(channel) >= 100_000
        got = 0
        while got < 100_000:
            got += len(b.recv(1 << 20))
        assert in_flight_bytes(channel) == 0
    finally:
        channel.close()
        b.close()


def test_channels_that_cannot_tell_have_nothing_in_flight():
    assert in_flight_bytes(BytesChannel(b"abc")) == 0
    closed = SocketChannel(socket.socket(), "closed")
    closed.close()
    assert in_flight_bytes(closed) == 0


def test_dirty_rate_undoes_the_throttle_and_holds_its_peak_for_a_while():
    rate = DirtyRate(half_life_s=1.0)
    assert rate.update(100.0, 0, 0.1) == 100.0
    assert rate.update(100.0, 50, 0.1) == pytest.approx(200.0)  # half the run time
    held = rate.update(10.0, 50, 0.1)  # a quiet period: the peak decays, slowly
    assert held == pytest.approx(200.0 * 0.5 ** 0.1)
    for _ in range(50):  # five half-lives of a calm guest
        rate.update(10.0, 0, 0.1)
    assert rate.peak_bps == pytest.approx(10.0, rel=0.1)


def test_observed_bandwidth_is_the_lower_of_the_last_interval_and_the_window():
    bw = Bandwidth(min_sample_bytes=1000, window_s=0.5)
    bw.observe(0.0, 0)
    assert bw.bytes_per_s == 0  # one point is no rate
    bw.observe(0.1, 100_000)
    assert bw.bytes_per_s == pytest.approx(1_000_000)
    bw.observe(0.2, 400_000)  # a burst: 3 MB/s over the last interval, 2 MB/s over both
    assert bw.bytes_per_s == pytest.approx(2_000_000)
    bw.observe(0.3, 450_000)  # a slow interval counts at once
    assert bw.bytes_per_s == pytest.approx(500_000)
    for i in range(4, 12):  # steady 1 MB/s: the burst leaves the window
        bw.observe(i / 10, 450_000 + (i - 3) * 100_000)
    assert bw.bytes_per_s == pytest.approx(1_000_000)


def test_observed_bandwidth_ignores_tiny_intervals_and_in_flight_going_back():
    bw = Bandwidth(min_sample_bytes=1000)
    bw.observe(0.0, 0)
    bw.observe(1.0, 10_000)
    bw.observe(1.001, 10_500)  # 500 B: too little to mean anything on its own
    assert bw.bytes_per_s == pytest.approx(10_500 / 1.001)  # the window still counts
    bw.observe(1.1, 10_000)  # the in-flight estimate grew: delivered never goes back
    assert bw.bytes_per_s > 0


def test_observed_bandwidth_respects_the_cap():
    bw = Bandwidth(min_sample_bytes=1)
    bw.cap(1000)
    bw.observe(0.0, 0)
    bw.observe(1.0, 5000)
    assert bw.bytes_per_s == 1000
