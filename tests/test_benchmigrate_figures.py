"""The migration benchmark's figures from a query-migrate answer."""

from __future__ import annotations

import pytest

from pymig.benchmigrate import SCENARIOS, figures_from_stats


def test_downtime_and_estimate_error_are_taken_to_the_hundredth_of_a_ms():
    stats = {"status": "completed", "total-time": 25, "downtime": 4, "setup-time": 8,
             "downtime-expected-at-switchover": 4.1,
             "downtime-breakdown": {"pause": 0.5, "last-ram": 0.4, "device-state": 0.9,
                                    "send": 0.1, "destination": 1.7},
             "ram": {"transferred": 1 << 20}}
    figures = figures_from_stats(stats, 1 << 30)
    assert figures["downtime_ms"] == pytest.approx(3.6)
    assert figures["expected_error"] == pytest.approx(0.5 / 3.6)  # whole ms would say 0.0


def test_without_a_breakdown_the_whole_ms_downtime_counts():
    stats = {"total-time": 25, "downtime": 4, "downtime-expected-at-switchover": 5.0,
             "ram": {}}
    assert figures_from_stats(stats, 1 << 30)["expected_error"] == pytest.approx(0.25)


def test_every_compressing_scenario_has_an_uncompressed_twin_where_it_matters():
    for name in ("dirty-100m", "dirty-100m-hugetlb", "nonconv-512m-dl150"):
        assert SCENARIOS[name].compression == "lz4"
        twin = SCENARIOS[f"{name}-uncompressed"]
        assert twin.compression == "none" and twin.targets == SCENARIOS[name].targets


def test_fresh_memory_ceilings_measure_cold_then_warm_against_the_raw_socket():
    from pymig.benchmigrate import fresh_memory_ceilings

    slept = []
    figures = fresh_memory_ceilings(8 << 20, 2.5, sleep=slept.append)
    assert slept == [2.5]  # the quiet wait comes before the cold figure, and only once
    for key in ("cold_bps", "warm_bps", "ceiling_bps"):
        assert figures[key] > 0
    assert figures["cold_ratio"] == pytest.approx(figures["cold_bps"] / figures["ceiling_bps"])
    assert figures["warm_ratio"] == pytest.approx(figures["warm_bps"] / figures["ceiling_bps"])


def test_fresh_memory_command_prints_each_run(capsys):
    from pymig.benchmigrate import main

    assert main(["fresh-memory", "--size", "4M", "--idle", "0", "--runs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("fresh memory after 0 s idle ") and "raw socket" in line
               for line in lines)
