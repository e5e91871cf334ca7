"""What the migration thread estimates: bandwidth, the stop-and-copy's speed-up, the fixed cost
of a switchover, bytes in flight, what the destination has loaded."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from pymig.estimate import (Bandwidth, DestinationProgress, DirtyRate, LoggedRate, StopSpeedup,
                            SwitchoverCost, TriggerPeriod, host_cpu_seconds, in_flight_bytes,
                            thread_cpu_seconds)
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


def test_a_guest_that_took_half_a_busy_host_doubles_the_stop_and_copy():
    speedup = StopSpeedup(window_s=0.5)
    speedup.observe(0.0, 100.0, 50.0, 10.0)
    assert speedup.factor == 1.0  # one point says nothing yet
    speedup.observe(0.1, 100.2, 50.0, 10.1)  # 2 CPUs busy for 0.1 s, the guest one of them
    assert speedup.factor == pytest.approx(2.0)


def test_a_host_with_idle_cpu_gains_nothing_from_stopping_the_guest():
    speedup = StopSpeedup()
    speedup.observe(0.0, 0.0, 0.0, 0.0)
    speedup.observe(0.1, 0.12, 0.08, 0.06)  # 60 % busy: the migration waited on something else
    assert speedup.factor == 1.0
    partly = StopSpeedup(full_at=0.95, none_at=0.75)
    partly.observe(0.0, 0.0, 0.0, 0.0)
    partly.observe(0.1, 0.17, 0.03, 0.085)  # 85 % busy: half way, half the gain
    assert partly.factor == pytest.approx(1.5)


def test_the_speedup_is_capped_and_reads_a_window():
    speedup = StopSpeedup(window_s=0.5, max_factor=3.0)
    speedup.observe(0.0, 0.0, 0.0, 0.0)
    speedup.observe(0.1, 0.2, 0.0, 0.199)  # the migration barely ran: no tenfold promise
    assert speedup.factor == 3.0
    for i in range(2, 12):  # then a second of a guest that took nothing
        speedup.observe(i / 10, 0.2 * i, 0.0, 0.199)
    assert speedup.factor == 1.0


def test_host_cpu_is_read_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 400 20 5 5 70 0 0\ncpu0 1 2 3\n")
    busy, idle = host_cpu_seconds(str(stat))
    ticks = os.sysconf("SC_CLK_TCK")
    assert (busy, idle) == (pytest.approx(160 / ticks), pytest.approx(420 / ticks))
    assert host_cpu_seconds(str(tmp_path / "missing")) == (0.0, 0.0)
    busy_now, idle_now = host_cpu_seconds()
    assert busy_now > 0 and idle_now > 0


def test_a_threads_cpu_time_is_its_own():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin)
    assert thread_cpu_seconds(thread) == 0.0  # not started
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while thread_cpu_seconds(thread) < 0.05:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    assert thread_cpu_seconds(thread) == 0.0  # gone


def test_the_logged_rate_is_taken_over_a_window_of_syncs():
    rate = LoggedRate(window_s=0.2)
    assert rate.add(1.000, 0.100, 10_000) == pytest.approx(100_000)
    # syncs a millisecond apart that show nothing do not make the guest look idle
    assert rate.add(1.001, 0.001, 0) == pytest.approx(10_000 / 0.101)
    assert rate.add(1.002, 0.001, 0) == pytest.approx(10_000 / 0.102)
    # periods older than the window drop out, the last one always counts
    assert rate.add(1.300, 0.298, 0) == 0.0
    assert rate.add(1.310, 0.010, 500) == pytest.approx(500 / 0.308)
    assert LoggedRate().add(5.0, 0.0, 3) == 0.0


MB = 1 << 20


def _sent(progress: DestinationProgress, packets: int, first: int = 1) -> None:
    """Packets ``first`` .. ``first + packets - 1``: packet n ends at stream byte 1000 n and
    brings the page bytes sent to n MiB."""
    for n in range(first, first + packets):
        progress.packet_sent(1000 * n, n * MB)


def test_nothing_counts_as_loaded_before_the_destination_reports():
    progress = DestinationProgress()
    _sent(progress, 4)
    assert progress.delivered(4 * MB) is None


def test_what_the_destination_reports_is_what_counts_as_delivered():
    progress = DestinationProgress()
    _sent(progress, 4)
    progress.reported(2000)  # loaded up to the end of packet 2
    assert progress.delivered(4 * MB) == 2 * MB
    _sent(progress, 2, first=5)  # sent is not loaded: nothing more counts until it says so
    assert progress.delivered(6 * MB) == 2 * MB
    progress.reported(5500)  # an offset inside a record: the packets that ended before it
    assert progress.delivered(6 * MB) == 5 * MB
    progress.reported(6000)
    assert progress.delivered(6 * MB) == 6 * MB


def test_what_is_loaded_never_goes_back_nor_beyond_what_was_sent():
    progress = DestinationProgress()
    _sent(progress, 8)
    progress.reported(6000)
    progress.reported(1000)  # a report that says less than one before it
    assert progress.delivered(8 * MB) == 6 * MB
    assert progress.delivered(3 * MB) == 3 * MB  # never more than was sent


def test_a_long_migration_keeps_answering_exactly():
    progress = DestinationProgress()
    for n in range(1, 20_001):
        progress.packet_sent(1000 * n, n * MB)
        if n % 100 == 0:
            progress.reported(1000 * (n - 10) + 500)  # ten packets behind
            assert progress.delivered(n * MB) == (n - 10) * MB
    assert len(progress._points) < 2_000  # what is loaded is forgotten


def test_trigger_periods_last_a_second_or_more_and_add_up_what_their_syncs_found():
    trigger = TriggerPeriod(period_s=1.0)
    trigger.begin(10.0, 1000)
    # syncs every 0.3 s: the fourth is the first a second or more after the start
    assert trigger.add(10.3, 2000, 100) is None
    assert trigger.add(10.6, 3000, 200) is None
    assert trigger.add(10.9, 4000, 300) is None
    assert trigger.add(11.2, 5000, 400) == (4000, 1000)
    # the next period starts where that one closed
    assert trigger.add(11.5, 5500, 10) is None
    assert trigger.add(12.2, 6000, 20) == (1000, 30)
    # sent bytes never count backwards, nor negative finds
    assert trigger.add(13.5, 5000, -5) == (0, 0)
