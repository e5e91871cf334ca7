"""Achieved vs asked dirty rate of the simulated guest (dirtier, uniform, 64 MiB working set).

Run with pytest-benchmark (``pytest benchmarks/bench_sim_rate.py``: each case records asked,
achieved, achieved/asked and the writers' CPU share in ``extra_info``) or as a script for a
table: ``.venv/bin/python benchmarks/bench_sim_rate.py [seconds]``.

The ceiling for "as fast as it can" is measured in the same run: numpy incrementing the first
byte of random pages of an equally large, pre-faulted buffer (one cache line per page, so the
same TLB- and miss-bound access pattern, without any dirty logging).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from pymig.guest.base import GuestConfig
from pymig.guest.simulated import SimulatedGuest

MiB = 1 << 20
WORKING_SET = 64 * MiB
ASKED = [1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 0]


def measure(asked: int, vcpus: int, seconds: float = 1.0, logging: bool = True) -> dict:
    """Run the dirtier for ``seconds`` (after a warm-up that faults the working set in)."""
    config = GuestConfig("simulated", WORKING_SET + 2 * MiB, vcpus=vcpus, workload="dirtier",
                         params={"working_set_bytes": WORKING_SET, "rate_pages_per_s": asked,
                                 "pattern": "uniform"})
    with SimulatedGuest.create(config) as guest:
        guest.ram_blocks[0].populate(0, guest.ram_blocks[0].npages)
        if logging:
            guest.start_dirty_log()
        guest.start()
        time.sleep(0.2)
        guest.pause()
        before = guest.progress()["pages_written"]
        cpu0, t0 = time.process_time(), time.monotonic()
        guest.resume()
        time.sleep(seconds)
        guest.pause()
        elapsed = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        achieved = (guest.progress()["pages_written"] - before) / elapsed
    return {"asked": asked, "vcpus": vcpus, "achieved": round(achieved),
            "ratio": round(achieved / asked, 3) if asked else None,
            "writer_cpu_share": round(cpu / elapsed, 3)}


def random_touch_ceiling(seconds: float = 0.5) -> float:
    """Pages/s numpy reaches incrementing byte 0 of random pages of a WORKING_SET buffer."""
    pages = np.ones((WORKING_SET // 4096, 4096), dtype=np.uint8)
    first = pages[:, 0]
    rng = np.random.default_rng(1)
    done, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        index = rng.integers(0, first.size, 1 << 16)
        first[index] += 1
        done += index.size
    return done / (time.monotonic() - start)


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("asked", ASKED)
def test_dirty_rate(benchmark, asked, vcpus):
    result = benchmark.pedantic(measure, args=(asked, vcpus), rounds=1, iterations=1)
    benchmark.group = f"sim dirty rate, {vcpus} vCPU(s)"
    benchmark.extra_info.update(result)
    if asked == 0:
        benchmark.extra_info["ceiling_pages_per_s"] = round(random_touch_ceiling())


def main(seconds: float) -> None:
    ceiling = random_touch_ceiling()
    print(f"ceiling (numpy, random first-byte increments, 64 MiB): {ceiling:,.0f} pages/s")
    print(f"{'vCPUs':>5} {'asked':>9} {'achieved':>10} {'ratio':>6} {'cpu':>5}")
    for vcpus in (1, 2):
        for asked in ASKED:
            r = measure(asked, vcpus, seconds)
            ratio = f"{r['ratio']:.3f}" if asked else f"{r['achieved'] / ceiling:.2f}c"
            print(f"{vcpus:>5} {asked or 'max':>9} {r['achieved']:>10,} {ratio:>6} "
                  f"{r['writer_cpu_share']:>5.2f}", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
