"""Restoring a live file snapshot against reading the whole file, measured in the same run.

    .venv/bin/python -m pytest benchmarks/test_bench_snapshot.py --benchmark-only -s

A live snapshot of a guest that keeps dirtying its working set holds several versions of many
pages (each pass re-sends what the guest dirtied meanwhile).  Restoring reads each page's last
version only, through the restore index, and never reads pages the guest never touched, so it
takes less time than the file's size over the read ceiling would suggest.  The ceiling is a
plain sequential read of the same file into one reused 1 MiB buffer, right after the restore,
from the same page cache, and a sequential O_DIRECT read (the disk's bandwidth).  ``speedup``
= (file bytes / read ceiling) / restore time: above 1 means the restore beat reading the file
from the page cache; ``disk_speedup`` the same against the disk.
"""

from __future__ import annotations

import os
import statistics
import time


from pymig.demo import kvm_usable
from pymig.guest import GuestConfig, create
from pymig.incoming import Incoming
from pymig.limits import DestinationLimits
from pymig.machine import Machine
from pymig.migration import Migration
from pymig.parameters import ParameterStore

MiB, GiB = 1 << 20, 1 << 30
RUNS = int(os.environ.get("PYMIG_BENCH_RUNS", "5"))


WORKING_SET = 64 * MiB


def take_snapshot(path: str, kind: str) -> dict:
    """A 1 GiB guest rewriting a 64 MiB working set at 40k pages/s (160 MB/s), saved live over
    a link capped at 100 MiB/s: it cannot converge, so the snapshot switches over after six
    passes, each of which re-sent most of the set."""
    config = GuestConfig(kind, 1 * GiB, workload="dirtier",
                         params={"working_set_bytes": WORKING_SET, "rate_pages_per_s": 40_000})
    guest = create(config)
    guest.start()
    try:
        time.sleep(0.5)
        store = ParameterStore()
        store.set(**{"max-bandwidth": 100 * MiB, "downtime-limit": 100, "max-iterations": 6,
                     "limit-action": "switchover"})
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


def disk_ceiling_bps(path: str) -> float | None:
    """Sequential O_DIRECT read of the file: the disk under it, bypassing the page cache
    (None where the file system does not do O_DIRECT)."""
    import mmap

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    buf = mmap.mmap(-1, 4 * MiB)  # page aligned, as O_DIRECT wants
    total = 0
    t0 = time.perf_counter()
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
        buf.close()
    return total / (time.perf_counter() - t0)


def restore_s(path: str) -> float:
    incoming = Incoming(f"file:{path}",
                        limits=DestinationLimits(accept_kinds=("kvm", "simulated")))
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
    restores, ceilings, disks = [], [], []

    def one_round():
        restores.append(restore_s(path))
        ceilings.append(read_ceiling_bps(path))
        disks.append(disk_ceiling_bps(path))

    benchmark.group = "file snapshot restore"
    benchmark.pedantic(one_round, rounds=RUNS, iterations=1)
    restore, ceiling = statistics.median(restores), statistics.median(ceilings)
    figures = {
        "guest": kind,
        "file_bytes": size,
        "pages_in_file": saved["ram"]["normal"],
        "working_set_pages": WORKING_SET // 4096,
        "restore_ms": restore * 1000,
        "read_ceiling_bps": ceiling,
        "file_over_ceiling_ms": size / ceiling * 1000,
        "speedup": size / ceiling / restore,
    }
    if None not in disks:
        disk = statistics.median(disks)
        figures.update(disk_ceiling_bps=disk, file_over_disk_ms=size / disk * 1000,
                       disk_speedup=size / disk / restore)
    benchmark.extra_info.update(figures)
    print()
    for key, value in figures.items():
        print(f"  {key:24} {value:,.2f}" if isinstance(value, float) else f"  {key:24} {value}")
