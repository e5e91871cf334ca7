"""Figures for the KVM side of pymig, measured on this host in this run.

    PYTHONPATH=tests .venv/bin/python benchmarks/kvm_figures.py [--quick] [--json out.json]

* dirty-log sync time (KVM_GET_DIRTY_LOG + the copy pymig keeps) for 1, 4 and 16 GiB slots,
  all clean and 1 % dirty, with and without manual protection; KVM_CLEAR_DIRTY_LOG of 1 %;
* the dirtier's achieved rate against the asked rate (1k..200k pages/s, and unpaced, with
  and without dirty logging);
* the guest's write rate during a migration-like first pass (sync, clear one twentieth of the
  slot every 50 ms) right after logging is turned on, with and without INITIALLY_SET;
* vCPU pause latency (median, max) for a busy, a pacing and a halted guest;
* vCPU state save and restore time.

Medians of repeated runs; the host is noisy (2 vCPUs shared with everything else).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
from _kvm_helpers import build_writer, kvm_config, wait_for, write_round  # noqa: E402

from pymig.guest.base import GuestConfig
from pymig.guest.layout import GiB, RamLayout
from pymig.guest.kvm_guest import KvmGuest  # noqa: E402

MiB = 1 << 20
HIGH = 4 * GiB


def _median_us(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def big_slot_guest(writer: Path, slot_gib: int, manual_protect: bool) -> KvmGuest:
    """The writer guest with 64 MiB of low RAM and one ``slot_gib`` GiB slot at 4 GiB."""
    blocks = [RamLayout("ram-low", 64 * MiB, 0), RamLayout("ram-high", slot_gib * GiB, HIGH)]
    config = GuestConfig(kind="kvm", memory_bytes=64 * MiB + slot_gib * GiB, workload="image",
                         params={"image": str(writer), "kind": "flat64",
                                 "load_address": 0x8000, "stack": 0x7000}, blocks=blocks)
    return KvmGuest.create(config, manual_protect=manual_protect)


def dirty_one_percent(guest: KvmGuest) -> int:
    """Have the guest write every 100th page of the high slot; returns the page count."""
    npages = guest.ram_blocks[1].npages
    gpas = [HIGH + (i << 12) for i in range(0, npages, 100)]
    for at in range(0, len(gpas), 400):
        write_round(guest, gpas[at:at + 400])
    return len(gpas)


def sync_figures(writer: Path, sizes=(1, 4, 16), repeat: int = 30) -> list[dict]:
    rows = []
    for gib in sizes:
        for manual in (True, False):
            with big_slot_guest(writer, gib, manual) as guest:
                guest.start()
                write_round(guest, [])
                guest.start_dirty_log()
                slot = guest.runtime.slots[1]
                slot.sync()
                slot.clear(0, slot.npages)
                clean = _median_us(slot.sync, repeat)
                if manual:
                    n = dirty_one_percent(guest)
                    dirty = _median_us(slot.sync, repeat)
                    assert int(np.unpackbits(slot.bitmap.view(np.uint8)).sum()) == n
                    t0 = time.perf_counter()
                    slot.clear(0, slot.npages)
                    clear = (time.perf_counter() - t0) * 1e6
                else:
                    samples = []
                    for _ in range(3):  # each sync re-protects: dirty again every time
                        n = dirty_one_percent(guest)
                        samples.append(_median_us(slot.sync, 1))
                    dirty, clear = statistics.median(samples), None
                guest.pause()
            rows.append({"slot_gib": gib, "manual_protect": manual, "sync_clean_us": clean,
                         "sync_1pct_us": dirty, "clear_1pct_us": clear, "dirty_pages": n})
    return rows


def rate_figures(rates=(1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000),
                 seconds: float = 2.0) -> list[dict]:
    """Achieved against asked rate; unpaced also with logging (bitmap, and dirty ring)."""
    rows = []
    for rate in (*rates, 0):
        for log in ((None, "bitmap", "ring") if rate == 0 else (None,)):
            params = {"working_set_bytes": 128 * MiB, "rate_pages_per_s": rate}
            options = {"dirty_ring": 65536} if log == "ring" else {}
            config = kvm_config("dirtier", params, memory_mib=256)
            with KvmGuest.create(config, **options) as guest:
                guest.start()
                if log:
                    guest.start_dirty_log()
                time.sleep(0.3)
                a, t0, distinct = guest.progress()["pages_written"], time.perf_counter(), 0
                while time.perf_counter() - t0 < seconds:
                    time.sleep(0.05)
                    if log:  # like a migration: sync, count, re-protect
                        bitmap = guest.sync_dirty()[0]
                        distinct += int(np.unpackbits(bitmap.view(np.uint8)).sum())
                        guest.clear_dirty(0, 0, guest.ram_blocks[0].npages)
                elapsed = time.perf_counter() - t0
                got = (guest.progress()["pages_written"] - a) / elapsed
                guest.pause()
            rows.append({"asked": rate, "dirty_log": log, "achieved": got,
                         "distinct_dirtied_per_s": distinct / elapsed if log else None,
                         "error_pct": (got / rate - 1) * 100 if rate else None})
    return rows


def first_pass_figures(seconds: float = 2.0) -> list[dict]:
    rows = []
    for initially_set in (False, True):
        params = {"working_set_bytes": 1024 * MiB}
        config = kvm_config("dirtier", params, memory_mib=1536)
        with KvmGuest.create(config, initially_set=initially_set) as guest:
            guest.start()
            wait_for(lambda: guest.progress()["passes"] >= 3)  # every page mapped
            t0 = time.perf_counter()
            guest.start_dirty_log()
            enable = time.perf_counter() - t0
            npages = guest.ram_blocks[0].npages
            chunk, i = npages // 20, 0
            a, t0 = guest.progress()["pages_written"], time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                guest.sync_dirty()
                guest.clear_dirty(0, (i % 20) * chunk, chunk)
                i += 1
                time.sleep(0.05)
            rate = (guest.progress()["pages_written"] - a) / (time.perf_counter() - t0)
            guest.pause()
        rows.append({"initially_set": initially_set, "enable_ms": enable * 1e3,
                     "writes_per_s": rate})
    return rows


def pause_figures(cycles: int = 200) -> list[dict]:
    cases = {
        "busy (unpaced dirtier)": ("dirtier", {"working_set_bytes": 16 * MiB}),
        "pacing (dirtier at 1k pages/s)": ("dirtier", {"working_set_bytes": 16 * MiB,
                                                       "rate_pages_per_s": 1000}),
        "halted (idle)": ("idle", {}),
    }
    rows = []
    for name, (workload, params) in cases.items():
        with KvmGuest.create(kvm_config(workload, params)) as guest:
            guest.start()
            time.sleep(0.05)
            for _ in range(cycles):
                guest.pause()
                guest.resume()
                time.sleep(0.002)
            guest.pause()
            lat = guest.pause_latencies[-cycles:]
        rows.append({"case": name, "median_us": statistics.median(lat) * 1e6,
                     "max_us": max(lat) * 1e6, "cycles": cycles})
    return rows


def state_figures(repeat: int = 30) -> list[dict]:
    rows = []
    for vcpus in (1, 2):
        with KvmGuest.create(kvm_config("selfcheck", {"working_set_bytes": 4 * MiB},
                                        vcpus=vcpus)) as guest:
            guest.start()
            wait_for(lambda: guest.progress()["passes"] >= 1)
            guest.pause()
            save = _median_us(guest.save_state, repeat)
            state = guest.save_state()
            load = _median_us(lambda: guest.load_state(state), repeat)
        rows.append({"vcpus": vcpus, "save_us": save, "restore_us": load})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller slots, fewer repeats")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        writer = build_writer(Path(tmp))
        figures = {
            "sync": sync_figures(writer, (1, 4) if args.quick else (1, 4, 16)),
            "rate": rate_figures(seconds=1.0 if args.quick else 2.0),
            "first_pass": first_pass_figures(),
            "pause": pause_figures(50 if args.quick else 200),
            "state": state_figures(),
        }
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
