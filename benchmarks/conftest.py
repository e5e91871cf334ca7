"""pytest-benchmark setup for the page-core benchmarks (not part of the default test run).

``PYMIG_BENCH_QUICK=1`` shrinks the buffers (64 MiB of guest memory instead of 1 GiB) for a
smoke run.  At the end of the session the ratios to each ceiling are printed as a table.
"""

from __future__ import annotations

import io
import os
import statistics

import pytest

from pymig import benchcore

QUICK = os.environ.get("PYMIG_BENCH_QUICK") == "1"
_results: dict[str, dict] = {}
_migrations: list = []  # pymig.benchmigrate.ScenarioResult, one per scenario run
_modes: list[dict] = []  # test_bench_modes.py: one row per mode and loop
_dirtyrate: list[dict] = []  # test_bench_dirtyrate.py: one row per kind, mode and case
_predict: list[dict] = []  # test_bench_predict.py: one row per point of the grid


@pytest.fixture
def migration_results() -> list:
    """Where test_bench_migration.py puts each scenario's results for the summary table."""
    return _migrations


@pytest.fixture
def mode_results() -> list[dict]:
    """Where test_bench_modes.py puts each mode's rate and ratio for the summary table."""
    return _modes


@pytest.fixture
def predict_results() -> list[dict]:
    """Where test_bench_predict.py puts each point's prediction errors for the summary."""
    return _predict


@pytest.fixture
def dirtyrate_results() -> list[dict]:
    """Where test_bench_dirtyrate.py puts each case's errors for the summary table."""
    return _dirtyrate


@pytest.fixture
def run_case(benchmark):
    """Time a benchcore case with pytest-benchmark, its ceiling interleaved round by round,
    and record the ratio (and SIMD variant) in extra_info."""

    def run(case: benchcore.Case) -> dict:
        ceilings = []

        def before_round():
            ceilings.append(benchcore.timed(case.ceiling))  # back to back with the kernel
            case.reset()

        benchcore.prepare(case)
        benchmark.group = case.group
        benchmark.pedantic(case.kernel, setup=before_round,
                           rounds=benchcore.rounds_for(case, QUICK), iterations=1)
        row = benchcore.result_row(case, benchmark.stats.stats.median,
                                   statistics.median(ceilings))
        benchmark.extra_info.update(row)
        _results[case.name] = row
        return row

    return run


#: A benchmark runs whole migrations in turns (five pairs of 1 GiB migrations over TLS take
#: minutes on a busy host): the suite's five-minute timeout is for tests, not for these.
BENCHMARK_TIMEOUT_S = 3600


def pytest_collection_modifyitems(items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.path).startswith(here + os.sep) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(BENCHMARK_TIMEOUT_S))


def pytest_terminal_summary(terminalreporter):
    from rich.console import Console

    if _results:
        text = io.StringIO()
        Console(file=text, width=120, force_terminal=False).print(
            benchcore.format_report(dict(_results)))
        terminalreporter.write_sep("-", "page core: ratio to ceiling")
        terminalreporter.write(text.getvalue())
    if _migrations:
        from pymig.benchmigrate import format_table

        text = io.StringIO()
        Console(file=text, width=120, force_terminal=False).print(format_table(_migrations))
        terminalreporter.write_sep("-", "migration: ratio to target")
        terminalreporter.write(text.getvalue())
    if _modes:
        terminalreporter.write_sep("-", "guest modes: instructions per vCPU CPU-second, "
                                   "ratio to 64-bit CPL 3 (--flat64)")
        for row in _modes:
            if "error" in row:
                terminalreporter.write_line(f"{row['mode']:12s} {row['loop']:5s} "
                                            f"fails: {row['error']}")
            else:
                terminalreporter.write_line(
                    f"{row['mode']:12s} {row['loop']:5s} {row['instr_per_cpu_s'] / 1e6:10.2f} M "
                    f"(reference {row['reference_per_cpu_s'] / 1e6:8.1f} M)  "
                    f"ratio {row['ratio']:.5f}")
    if _dirtyrate:
        terminalreporter.write_sep("-", "dirty rate: error against the truth (median, worst), "
                                   "and the guest's slowdown while measured")
        for row in _dirtyrate:
            terminalreporter.write_line(
                f"{row['kind']:9s} {row['mode']:13s} {row['case']:11s} error "
                f"{row['median_error'] * 100:+6.1f} % (worst {row['worst_error'] * 100:+6.1f} %)"
                f"  guest wrote {row['median_written']:9,.0f} pages/s, "
                f"{row['median_slowdown'] * 100:+5.1f} % slower")
    if _predict:
        terminalreporter.write_sep("-", "pymig predict against the migration: medians per point "
                                   "(predicted / measured - 1; downtime in ms)")
        for row in _predict:
            total = ("-" if row["total_error"] is None
                     else f"{row['total_error'] * 100:+6.1f} %")
            down = ("-" if row["downtime_error_ms"] is None
                    else f"{row['downtime_error_ms']:+7.1f} ms")
            terminalreporter.write_line(
                f"{row['rate']:6,} pages/s {row['bandwidth'] / 1e6:5.1f} MB/s  converges "
                f"{'yes' if row['converged'] else 'no ':3s} "
                f"({'right' if row['convergence_right'] else 'WRONG'})  total time {total}  "
                f"downtime {down}")
