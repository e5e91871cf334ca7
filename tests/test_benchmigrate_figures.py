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


def test_the_tls_ceiling_adds_the_cipher_to_the_plaintext_cost_both_ways():
    from pymig.benchmigrate import GiB, tls_ceilings

    # the plaintext migration: 1 CPU-second per GiB, both ends; 1 GiB/s. The cipher: a GiB
    # sealed in 0.5 s and opened in 0.25 s on one core.
    c = tls_ceilings(GiB, 1.0, {"encrypt_bps": 2 * GiB, "decrypt_bps": 4 * GiB})
    assert c["cipher_cpu_s_per_gib"] == pytest.approx(0.75)
    assert c["cpu_ceiling_ratio"] == pytest.approx(1 / 1.75)
    # the source's thread: 1 s of plaintext work and 0.5 s of sealing per GiB
    assert c["thread_ceiling_ratio"] == pytest.approx(1 / 1.5)


def test_the_tls_comparison_reports_the_ratio_as_a_fraction_of_its_ceilings():
    from pymig.benchmigrate import GiB, SCENARIOS, ScenarioResult, TlsComparison

    run = {"throughput_bps": GiB, "setup_ms": 5.0, "total_ms": 1000.0, "cpu_s_per_gib": 1.0}
    tls_run = run | {"throughput_bps": 0.5 * GiB, "cpu_s_per_gib": 2.5, "tls_handshake_ms": 4}
    figures = TlsComparison(ScenarioResult(SCENARIOS["random-1g"], [run]),
                            ScenarioResult(SCENARIOS["random-1g-tls"], [tls_run]),
                            {"encrypt_bps": 2 * GiB, "decrypt_bps": 4 * GiB}).figures()
    assert figures["throughput_ratio"] == pytest.approx(0.5) == figures["pair_ratio_median"]
    assert figures["fraction_of_cpu_ceiling"] == pytest.approx(0.5 * 1.75)
    assert figures["fraction_of_thread_ceiling"] == pytest.approx(0.5 * 1.5)
    assert (figures["plaintext_cpu_s_per_gib"], figures["tls_cpu_s_per_gib"]) == (1.0, 2.5)
    without = TlsComparison(ScenarioResult(SCENARIOS["random-1g"], [run]),
                            ScenarioResult(SCENARIOS["random-1g-tls"], [tls_run])).figures()
    assert "cpu_ceiling_ratio" not in without  # no cipher measured: no ceiling claimed
