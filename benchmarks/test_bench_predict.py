"""pytest-benchmark: how far ``pymig predict`` is from the migrations it predicts, on a small
grid of simulated guests; the prediction error is the figure.

    .venv/bin/python -m pytest benchmarks/test_bench_predict.py --benchmark-only -s

Each point runs the dirtier (uniform writes at the point's rate over a 32 MiB working set of
a 64 MiB guest) and migrates it to a ``pymig incoming`` process over loopback TCP with
``max-bandwidth`` at the point's bandwidth standing for the link (``x-switchover-capped``),
a 100 ms downtime limit and ``max-total-time`` 8 s, cancelling what does not converge
(:mod:`pymig.sweep`, one run ``PYMIG_BENCH_RUNS`` times, default 3); before each run the
same guest is predicted (:mod:`pymig.predict`).  Per point: the median total time's and
downtime's error (predicted against measured), and whether convergence was predicted right,
to ``extra_info`` and to the table printed at the end.  Nothing is asserted: the host is
shared and noisy; docs/convergence.md records the figures of the full grid.
"""

from __future__ import annotations

import os

import pytest

from pymig.sweep import SweepSpec, cells, run_point

RUNS = int(os.environ.get("PYMIG_BENCH_RUNS", "3"))
MiB = 1 << 20
SPEC = SweepSpec(rates=(1000, 4000, 16000), bandwidths=(9_000_000, 30_000_000),
                 working_sets=(32 * MiB,), memory=64 * MiB, runs=RUNS, max_total_time_ms=8000)


@pytest.mark.parametrize("point", SPEC.points(),
                         ids=lambda p: f"{p['rate_pages_per_s']}pps-"
                                       f"{p['bandwidth_bps'] // 1_000_000}MBps")
def test_prediction_error(benchmark, point, predict_results):
    rows: list[dict] = []
    benchmark.group = "pymig predict against the migration (seconds per run)"
    def run() -> None:
        row = run_point(SPEC, point, len(rows))
        row.pop("trace", None)  # the per-sync trace: not a figure
        rows.append(row)

    benchmark.pedantic(run, rounds=RUNS, iterations=1)
    (cell,) = cells(rows)
    row = {"rate": point["rate_pages_per_s"], "bandwidth": point["bandwidth_bps"],
           "converged": cell.converged, "convergence_right":
           cell.converged == cell.predicted_converged, "total_error": cell.total_error,
           "downtime_error_ms": cell.downtime_error_ms, "total_ms": cell.total_ms,
           "downtime_ms": cell.downtime_ms, "runs": rows}
    benchmark.extra_info.update(row)
    predict_results.append(row)
