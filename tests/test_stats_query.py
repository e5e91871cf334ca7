"""query-migrate fields, units and presence; concurrent updates while querying."""

from __future__ import annotations

import math
import threading

import pytest

from pymig.stats import STATUSES, MigrationStats

PAGE = 4096


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


RAM_KEYS = {"transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "compressed",
            "dirty-pages-rate", "dirty-sync-count", "mbps", "pages-per-second", "page-size"}


def test_before_start_only_the_status():
    assert MigrationStats().query() == {"status": "none"}


def test_a_whole_migration_in_query_migrate_terms():
    clock = FakeClock()
    stats = MigrationStats(page_size=PAGE, clock=clock)
    stats.begin(ram_total_bytes=64 * PAGE)
    clock.now += 0.25
    stats.setup_done()
    info = stats.query()
    assert info["status"] == "active" and info["setup-time"] == 250 and info["total-time"] == 250
    assert set(info["ram"]) == RAM_KEYS and info["ram"]["total"] == 64 * PAGE
    assert "downtime" not in info and "error-desc" not in info

    # 1 s later: 40 normal pages and 20 zero pages went out in 1,000,000 bytes.
    clock.now += 1.0
    stats.add_sent(nbytes=600_000, normal_pages=30, zero_pages=20)
    stats.add_sent(nbytes=400_000, normal_pages=10)
    record = stats.record_sync(iteration=1, dirty_pages=5, remaining_bytes=5 * PAGE,
                               bandwidth_bps=1e6, dirty_rate_pps=12.4, expected_downtime_s=0.0214,
                               throttle_pct=20)
    info = stats.query()
    ram = info["ram"]
    assert ram["transferred"] == 1_000_000 and ram["remaining"] == 5 * PAGE
    assert ram["normal"] == 40 and ram["duplicate"] == 20 and ram["normal-bytes"] == 40 * PAGE
    assert ram["dirty-pages-rate"] == 12 and ram["dirty-sync-count"] == 1
    assert ram["mbps"] == pytest.approx(8.0 * 1_000_000 / 1.25 / 1e6)  # since begin: 1.25 s
    assert ram["pages-per-second"] == 48 and ram["page-size"] == PAGE
    assert info["expected-downtime"] == 21 and info["cpu-throttle-percentage"] == 20
    assert info["iterations"] == 1 and info["total-time"] == 1250
    assert (record.pages_sent, record.bytes, record.time) == (60, 1_000_000, 1.25)

    clock.now += 0.5
    stats.add_sent(nbytes=250_000, normal_pages=5)
    stats.record_sync(iteration=2, dirty_pages=0, remaining_bytes=0, bandwidth_bps=5e5,
                      dirty_rate_pps=0, expected_downtime_s=0.0, throttle_pct=20)
    assert stats.query()["ram"]["mbps"] == pytest.approx(250_000 * 8 / 0.5 / 1e6)
    assert stats.query()["ram"]["pages-per-second"] == 10

    stats.switchover("fits-limit", 0.0123)
    assert stats.query()["status"] == "device"
    clock.now += 0.04
    stats.completed()
    clock.now += 10  # a finished migration's times do not move on
    info = stats.query()
    assert info["status"] == "completed" and info["downtime"] == 40
    assert info["total-time"] == 1790 and "expected-downtime" not in info
    assert info["switchover-reason"] == "fits-limit"
    assert info["downtime-expected-at-switchover"] == 12.3  # to 0.01 ms
    assert info["ram"]["remaining"] == 0
    assert info["ram"]["mbps"] == pytest.approx(1_250_000 * 8 / 1.79 / 1e6)


def test_destination_measured_downtime_wins():
    clock = FakeClock()
    stats = MigrationStats(clock=clock)
    stats.begin(1 << 20)
    stats.switchover("manual", math.inf)
    clock.now += 5
    stats.completed(downtime_s=0.0314)
    info = stats.query()
    assert info["downtime"] == 31 and info["switchover-reason"] == "manual"
    assert "downtime-expected-at-switchover" not in info  # unknown estimate is not a number


def test_failed_and_cancelled():
    stats = MigrationStats(clock=FakeClock())
    stats.begin(1 << 20)
    stats.failed("connection reset by destination")
    assert stats.query()["error-desc"] == "connection reset by destination"
    assert stats.query()["status"] == "failed"
    other = MigrationStats(clock=FakeClock())
    other.begin(1 << 20)
    other.set_status("cancelling")
    assert other.query()["status"] == "cancelling"
    other.cancelled()
    assert other.query()["status"] == "cancelled" and "error-desc" not in other.query()
    with pytest.raises(ValueError):
        other.set_status("paused")
    assert set(STATUSES) >= {"setup", "active", "device", "completed", "failed"}


def test_unknown_expected_downtime_is_left_out():
    stats = MigrationStats(clock=FakeClock())
    stats.begin(1 << 20)
    stats.setup_done()
    stats.record_sync(iteration=1, dirty_pages=3, remaining_bytes=3 * PAGE, bandwidth_bps=0,
                      dirty_rate_pps=1, expected_downtime_s=math.inf, throttle_pct=0)
    assert "expected-downtime" not in stats.query()


def test_concurrent_updates_while_querying():
    stats = MigrationStats(page_size=PAGE)
    stats.begin(1 << 30)
    stats.setup_done()
    writers, per_writer = 4, 2000
    snapshots = []
    done = threading.Event()

    def send():
        for _ in range(per_writer):
            stats.add_sent(nbytes=PAGE + 16, normal_pages=1, zero_pages=1)

    def watch():
        while not done.is_set():
            snapshots.append(stats.query())

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=send) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    done.set()
    watcher.join(timeout=60)
    snapshots.append(stats.query())

    total = writers * per_writer
    final = snapshots[-1]["ram"]
    assert final["normal"] == final["duplicate"] == total
    assert final["transferred"] == total * (PAGE + 16)
    previous = 0
    for snap in snapshots:
        ram = snap["ram"]
        # Each snapshot is one consistent moment: counters that move together agree.
        assert ram["normal"] == ram["duplicate"]
        assert ram["transferred"] == ram["normal"] * (PAGE + 16)
        assert ram["normal-bytes"] == ram["normal"] * PAGE
        assert ram["transferred"] >= previous
        previous = ram["transferred"]


def test_the_highest_throttle_outlives_the_throttle():
    """cpu-throttle-percentage is the throttle in force, lifted when the migration ends;
    cpu-throttle-peak is the highest the migration applied, for its summary."""
    from pymig.monitor import stats_table

    stats = MigrationStats(page_size=PAGE, clock=FakeClock())
    stats.begin(ram_total_bytes=64 * PAGE)
    stats.setup_done()
    assert stats.query()["cpu-throttle-peak"] == 0
    for pct in (20, 30, 40):
        stats.set_throttle(pct)
        stats.record_sync(iteration=1, dirty_pages=1, remaining_bytes=PAGE, bandwidth_bps=1e6,
                          dirty_rate_pps=1, expected_downtime_s=1.0, throttle_pct=pct)
    info = stats.query()
    assert (info["cpu-throttle-percentage"], info["cpu-throttle-peak"]) == (40, 40)
    stats.switchover("fits-limit", 0.01)
    stats.completed()
    stats.set_throttle(0)  # the migration lifts it once it is over
    info = stats.query()
    assert (info["cpu-throttle-percentage"], info["cpu-throttle-peak"]) == (0, 40)
    rows = {str(label): str(value) for label, value in zip(
        stats_table(info).columns[0]._cells, stats_table(info).columns[1]._cells)}
    assert rows["vCPU throttle (highest)"] == "40 %"
    assert "vCPU throttle (now)" not in rows  # 0 % then, which says nothing of the migration


def test_the_progress_line_shows_page_and_wire_rates_and_their_ratio():
    from pymig.monitor import progress_figures

    info = {"status": "active", "iterations": 3, "expected-downtime": 4,
            "ram": {"remaining": 12 << 20, "transferred": 1 << 20, "normal": 2048,
                    "duplicate": 2048, "page-size": 4096, "mbps": 16.0,
                    "pages-per-second": 100_000}}
    # 16 MiB of pages moved in 1 MiB on the wire; 2 MB/s on the wire carry 410 MB/s of pages
    assert progress_figures(info) == ("pass 3, 12.0 MiB left, pages 410 MB/s, wire 2 MB/s "
                                      "(16x less), downtime ≈4 ms")
    assert progress_figures({"status": "setup"}) == ""


def test_the_final_table_shows_an_error_as_it_was_said():
    # error-desc quotes the destination's LOAD_ERROR, which may hold anything: it is printed
    # as text (a closing tag with nothing to close made rich raise, a tag restyled the rest)
    import io

    from rich.console import Console

    from pymig.monitor import stats_table

    said = "destination failed: unknown section '[/]' [bold]x[/bold] [link=file:///x]y"
    out = Console(file=io.StringIO(), width=200, color_system=None)
    out.print(stats_table({"status": "failed", "error-desc": said}))
    assert said in out.file.getvalue()
