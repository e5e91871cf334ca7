"""Restoring a live file snapshot against reading the whole file, measured in the same run.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_snapshot.py --benchmark-only -s

A live snapshot of a guest that keeps dirtying its working set holds several versions of many
pages (each pass re-sends what the guest dirtied meanwhile).  Restoring reads each page's last
version only, through the restore index, and never reads pages the guest never touched, so it
takes less time than the file's size over the read ceiling would suggest.  The ceiling is a
plain sequential read of the same file into one reused 1 MiB buffer, right after the restore,
from the same page cache.  ``speedup`` = (file bytes / read ceiling) / restore time: above 1
means the restore beat reading the file.
"""

from __future__ import annotations

import os
import statistics
import time


from pymig.demo import kvm_usable
from pymig.guest import GuestConfig, create
from pymig.incoming import Incoming
from pymig.machine import Machine
from pymig.migration import Migration
from pymig.parameters import ParameterStore

MiB, GiB = 1 << 20, 1 << 30
RUNS = int(os.environ.get("PYMIG_BENCH_RUNS", "5"))


def take_snapshot(path: str, kind: str) -> dict:
    """A 1 GiB guest rewriting a 256 MiB working set at ~240 MB/s, saved live over a link
    capped at 300 MB/s: it converges, after passes that re-send most of the set."""
    config = GuestConfig(kind, 1 * GiB, workload="dirtier",
                         params={"working_set_bytes": 256 * MiB, "rate_pages_per_s": 60_000})
    guest = create(config)
    guest.start()
    try:
        time.sleep(0.5)
        store = ParameterStore()
        store.set(**{"max-bandwidth": 300 * MiB, "downtime-limit": 100})
        migration = Migration(Machine.source(guest), store)
        migration.start(f"file:{path}")
        assert migration.wait(120).value == "completed", migration.query()
        return migration.query()
    finally:
        guest.close()


def read_ceiling_bps(path: str) -> float:
    buf = bytearray(MiB)
    t0 = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buf):
            total += n
    return total / (time.perf_counter() - t0)


def restore_s(path: str) -> float:
    incoming = Incoming(f"file:{path}")
    t0 = time.perf_counter()
    result = incoming.run()
    elapsed = time.perf_counter() - t0
    result.machine.close()
    return elapsed


def test_restore_reads_less_than_the_file(benchmark, tmp_path):
    kind = "kvm" if kvm_usable() else "simulated"
    path = str(tmp_path / "guest.pymig")
    saved = take_snapshot(path, kind)
    size = os.path.getsize(path)
    restores, ceilings = [], []

    def one_round():
        restores.append(restore_s(path))
        ceilings.append(read_ceiling_bps(path))

    benchmark.group = "file snapshot restore"
    benchmark.pedantic(one_round, rounds=RUNS, iterations=1)
    restore, ceiling = statistics.median(restores), statistics.median(ceilings)
    figures = {
        "guest": kind,
        "file_bytes": size,
        "pages_in_file": saved["ram"]["normal"],
        "working_set_pages": 256 * MiB // 4096,
        "restore_ms": restore * 1000,
        "read_ceiling_bps": ceiling,
        "file_over_ceiling_ms": size / ceiling * 1000,
        "speedup": size / ceiling / restore,
    }
    benchmark.extra_info.update(figures)
    print()
    for key, value in figures.items():
        print(f"  {key:24} {value:,.2f}" if isinstance(value, float) else f"  {key:24} {value}")
