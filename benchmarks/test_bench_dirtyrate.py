"""pytest-benchmark: how far a dirty-rate measurement (pymig.dirtyrate) is from the truth, per
mode and guest kind; the error is the figure.

    .venv/bin/python -m pytest benchmarks/test_bench_dirtyrate.py --benchmark-only -s

Each case runs the dirtier on a guest of 256 MiB (two vCPUs) and measures it for 2 s
(``PYMIG_BENCH_RUNS`` times, default 3):

* ``rate-N``: uniform writes at N pages/s over a 64 MiB working set; the error of the write
  rate against the pages the guest's own counter says it wrote during the measurement (on KVM
  the measurement slows the guest: that is the cost, reported beside it);
* ``working-set``: sequential writes at 20,000 pages/s over 16 MiB (4096 pages, written
  through every 0.2 s); the error of the working set against 4096 pages.

Errors are signed (measured / truth - 1), their median and largest magnitude go to
``extra_info`` and to the table printed at the end; nothing is asserted: the host is shared
and noisy, and the figures are what docs/convergence.md records.  pytest-benchmark's own
timing is a whole measurement's wall time and means little.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

from pymig.dirtyrate import DirtyRateConfig, DirtyRateMeasurement
from pymig.guest import GuestConfig, create

RUNS = int(os.environ.get("PYMIG_BENCH_RUNS", "3"))
MiB = 1 << 20
MODES = ("page-sampling", "dirty-bitmap", "dirty-ring")
CASES = {"rate-5000": ("uniform", 64, 5_000), "rate-20000": ("uniform", 64, 20_000),
         "rate-80000": ("uniform", 64, 80_000), "working-set": ("sequential", 16, 20_000)}


def kinds() -> list:
    from pymig.demo import kvm_usable

    out = [pytest.param("simulated", id="simulated")]
    out.append(pytest.param("kvm", id="kvm") if kvm_usable() else pytest.param(
        "kvm", id="kvm", marks=pytest.mark.skip(reason="/dev/kvm is not usable here")))
    return out


def one_run(kind: str, mode: str, case: str) -> dict:
    pattern, ws_mib, rate = CASES[case]
    config = GuestConfig(kind, 256 * MiB, vcpus=2, workload="dirtier",
                         params={"working_set_bytes": ws_mib * MiB, "rate_pages_per_s": rate,
                                 "pattern": pattern})
    guest = create(config, dirty_ring=4096 if kind == "kvm" and mode == "dirty-ring" else 0)
    try:
        guest.start()
        target = ws_mib * MiB // 4096
        deadline = time.monotonic() + 60
        while guest.progress()["pages_written"] < target and time.monotonic() < deadline:
            time.sleep(0.01)  # every page touched once: no first-touch faults in the figure
        measurement = DirtyRateMeasurement(guest, DirtyRateConfig(
            2000, mode, 16384 if mode == "page-sampling" else 512), baseline_s=0.5)
        measurement.start()
        measurement.wait(120)
        info = measurement.info("millisecond")
    finally:
        guest.close()
    if "error-desc" in info:
        raise AssertionError(info["error-desc"])
    cost = info["guest-cost"]
    if case == "working-set":
        error = info["working-set"]["pages"] / target - 1
    else:
        error = info["write-rate-pages"] / cost["during"] - 1
    return {"error": error, "slowdown": cost["slowdown"], "written": cost["during"],
            "measured": info["write-rate-pages"], "working_set": info["working-set"]["pages"]}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", kinds())
def test_dirty_rate_error(benchmark, kind, mode, case, dirtyrate_results):
    runs: list[dict] = []
    benchmark.group = f"dirty rate: {case} (seconds per measurement)"
    benchmark.pedantic(lambda: runs.append(one_run(kind, mode, case)), rounds=RUNS,
                       iterations=1)
    errors = [r["error"] for r in runs]
    row = {"kind": kind, "mode": mode, "case": case,
           "median_error": statistics.median(errors),
           "worst_error": max(errors, key=abs),
           "median_slowdown": statistics.median(r["slowdown"] for r in runs),
           "median_written": statistics.median(r["written"] for r in runs), "runs": runs}
    benchmark.extra_info.update(row)
    dirtyrate_results.append(row)
