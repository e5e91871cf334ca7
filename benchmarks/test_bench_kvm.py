"""pytest-benchmark entry points for the KVM figures (outside the default test paths).

    PYTHONPATH=tests .venv/bin/python -m pytest benchmarks/test_bench_kvm.py --benchmark-only

Each benchmark records the figure it stands for in ``extra_info``; kvm_figures.py prints the
whole set as JSON.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import kvm_figures  # noqa: E402
from _kvm_helpers import build_writer, kvm_config, write_round  # noqa: E402

from pymig.guest.kvm_guest import KvmGuest  # noqa: E402

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    return build_writer(tmp_path_factory.mktemp("writer"))


@pytest.mark.parametrize("dirty", ["clean", "1pct"])
@pytest.mark.parametrize("slot_gib", [1, 4, 16])
def test_dirty_log_sync(benchmark, writer, slot_gib, dirty):
    benchmark.group = f"KVM_GET_DIRTY_LOG {slot_gib} GiB"
    with kvm_figures.big_slot_guest(writer, slot_gib, manual_protect=True) as guest:
        guest.start()
        write_round(guest, [])
        guest.start_dirty_log()
        slot = guest.runtime.slots[1]
        if dirty == "1pct":
            benchmark.extra_info["dirty_pages"] = kvm_figures.dirty_one_percent(guest)
        benchmark(slot.sync)
        guest.pause()


def test_pause_latency(benchmark):
    benchmark.group = "vCPU pause"
    with KvmGuest.create(kvm_config("dirtier", {"working_set_bytes": 16 << 20})) as guest:
        guest.start()

        def cycle():
            guest.pause()
            guest.resume()

        benchmark.pedantic(cycle, rounds=200, iterations=1)
        guest.pause()
        lat = guest.pause_latencies
        benchmark.extra_info["pause_median_us"] = statistics.median(lat) * 1e6
        benchmark.extra_info["pause_max_us"] = max(lat) * 1e6


@pytest.mark.parametrize("vcpus", [1, 2])
def test_state_save_restore(benchmark, vcpus):
    benchmark.group = "vCPU state"
    config = kvm_config("selfcheck", {"working_set_bytes": 4 << 20}, vcpus=vcpus)
    with KvmGuest.create(config) as guest:
        guest.start()
        guest.pause()
        benchmark(lambda: guest.load_state(guest.save_state()))


def test_dirty_rate_achieved_vs_asked(benchmark):
    benchmark.group = "dirtier rate"
    rows = benchmark.pedantic(kvm_figures.rate_figures, kwargs={"seconds": 1.0}, rounds=1,
                              iterations=1)
    benchmark.extra_info["rates"] = rows
    for row in rows:
        if row["asked"]:
            assert abs(row["error_pct"]) < 50, row  # a broken pacer, not a noisy host
