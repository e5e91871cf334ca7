"""Block migration's bulk throughput against the raw socket, measured in the same run.

    .venv/bin/python -m pytest benchmarks/test_bench_block.py -s

A KVM guest (idle workload, 32 MiB of RAM) whose disk is not on shared storage migrates
between two processes over loopback TCP with ``pymig migrate --blk``; its image holds
``PYMIG_BENCH_DISK_MIB`` MiB (default 256) of random data, so every chunk goes as data, none
as a hole or a zero record.  The rate is the disk bytes on the wire over the migration's
time after setup (RAM's few hundred KB and the stop-and-copy included: a lower bound of the
bulk phase's rate).  The ceiling is a plain ``sendall`` loop into a receiving process over
the same loopback (:func:`pymig.transport.ceiling.raw_socket_throughput`), run before and
after each migration; the ratio is the medians'.  A second ceiling, measured in the same
run: the image's bytes copied over the same loopback into a fresh file beside the target, the
fastest way this host's kernel offers a program that writes its target past the page cache as
the destination does (:func:`pymig.transport.ceiling.file_copy_throughput`: ``sendfile`` of
the image, or a read into one buffer and ``sendall``; received into page-aligned buffers that
a second thread writes with ``O_DIRECT``), the better of the two ways' medians.  Another
case: a sparse image of 10x the size holding the same data, whose time is compared with the
dense one's.
"""

from __future__ import annotations

import atexit
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from pymig.demo import kvm_usable
from pymig.transport.ceiling import file_copy_throughput, raw_socket_throughput

MiB = 1 << 20
DISK_MIB = int(os.environ.get("PYMIG_BENCH_DISK_MIB", "256"))
RUNS = int(os.environ.get("PYMIG_BENCH_RUNS", "3"))
TARGET_RATIO = 0.6

pytestmark = pytest.mark.skipif(not kvm_usable(), reason="needs /dev/kvm")


_BYTECODE: dict[str, str] = {}


def _child_env() -> dict[str, str]:
    """The environment of the pymig processes: with the bytecode cache an installed pymig
    has.  Without one (``PYTHONDONTWRITEBYTECODE``, as a development checkout may run) each
    process compiles every module it imports from source, and a destination's warm-up
    (importing the guest modules while it listens) is still compiling when the stream
    arrives: the first hundred milliseconds of every migration measured Python's compiler."""
    if not _BYTECODE:
        import pymig

        prefix = tempfile.mkdtemp(prefix="pymig-bench-bytecode-")
        atexit.register(shutil.rmtree, prefix, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = prefix
        subprocess.run([sys.executable, "-m", "compileall", "-q",
                        os.path.dirname(pymig.__file__)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        _BYTECODE.update(env)
    return dict(_BYTECODE)


def _pymig(*args: str, **popen) -> subprocess.Popen:
    # the pymig this interpreter imports (an installed one has its compiled core; src/ alone
    # does not)
    return subprocess.Popen([sys.executable, "-m", "pymig", *args],
                            stdin=subprocess.DEVNULL, env=_child_env(), **popen)


# A destination listens before a source migrates to it; it spends its first moments warming
# up (pymig.machine.WarmUp: the guest modules imported, KVM probed) and the benchmark lets it,
# so that the migration's time is the migration's.
SETTLE_S = 1.0


def _wait_for_path(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.05)


def fill(path: str, data_mib: int, size_mib: int) -> None:
    """``data_mib`` MiB of random bytes at the start of a sparse ``size_mib`` MiB image."""
    with open(path, "wb") as handle:
        for _ in range(data_mib):
            handle.write(os.urandom(MiB))
        handle.truncate(size_mib * MiB)


def write_ceiling_bps(directory: str, total_mib: int) -> tuple[float, float]:
    """Sequential 1 MiB pwrites of random bytes into a fresh file in ``directory`` (the
    destination's storage, as its page cache and writeback take them): bytes/s until the last
    write returned, and until an fdatasync after it did (what the storage sustains: into a
    disk-backed file system, writes into the page cache run ahead of it only until the
    kernel's dirty limits hold the writer back)."""
    data = os.urandom(MiB)
    path = os.path.join(directory, "ceiling.img")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for i in range(total_mib):
            os.pwrite(fd, data, i * MiB)
        written = time.perf_counter()
        os.fdatasync(fd)
        synced = time.perf_counter()
        return total_mib * MiB / (written - t0), total_mib * MiB / (synced - t0)
    finally:
        os.close(fd)
        os.unlink(path)


def migrate_disk(directory: str, image: str, target_dir: str) -> dict:
    """One ``pymig migrate --blk`` of an idle guest with ``image`` as its disk; the final
    ``query-migrate`` answer."""
    from pymig.qmp import QmpClient

    directory = tempfile.mkdtemp(dir=directory)  # the sockets and the target of this run
    src_ctl, dst_ctl = os.path.join(directory, "src.sock"), os.path.join(directory, "dst.sock")
    target = os.path.join(tempfile.mkdtemp(dir=target_dir), "target.img")
    source = _pymig("run", "--workload", "idle", "--memory", "32M", "--disk", image,
                    "--control", src_ctl, "--quiet")
    dest = _pymig("incoming", "tcp:127.0.0.1:0", "--disk", f"disk0={target}", "--control",
                  dst_ctl, "--quiet")
    try:
        _wait_for_path(src_ctl, source)
        _wait_for_path(dst_ctl, dest)
        time.sleep(SETTLE_S)
        with QmpClient(dst_ctl) as client:
            bound = client.command("query-migrate")["socket-address"]
        done = _pymig("migrate", "--control", src_ctl, bound, "--blk", "--json",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = done.communicate(timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"migration failed: {out} {err}")
        return json.loads(out.splitlines()[-1])
    finally:
        for proc in (source, dest):
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(os.path.dirname(target), ignore_errors=True)


def file_copy_bps(image: str, target_dir: str, how: str) -> float:
    """The file-to-file ceiling: ``image`` copied over loopback TCP into a fresh file in
    ``target_dir`` (removed after)."""
    directory = tempfile.mkdtemp(dir=target_dir)
    try:
        return file_copy_throughput(image, os.path.join(directory, "copy.img"), how=how)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def disk_rate(info: dict) -> float:
    seconds = (info["total-time"] - info.get("setup-time", 0)) / 1000
    return info["disk"]["transferred"] / seconds


@pytest.mark.parametrize("storage", ["tmpfs", "tmp"])
def test_bulk_throughput_against_the_raw_socket(tmp_path, storage):
    """``storage``: where the destination's target goes, /dev/shm (no writeback: the
    migration's own pipeline) or the test's temporary directory (the host's disk)."""
    target_dir = "/dev/shm" if storage == "tmpfs" else str(tmp_path)
    if not os.path.isdir(target_dir):
        pytest.skip(f"no {target_dir}")
    dense = str(tmp_path / "dense.img")
    sparse = str(tmp_path / "sparse.img")
    fill(dense, DISK_MIB, DISK_MIB)
    fill(sparse, DISK_MIB, 10 * DISK_MIB)
    raw, rates, dense_s, sparse_s, writes = [], [], [], [], []
    copies: dict[str, list[float]] = {"sendfile": [], "read": []}
    raw.append(raw_socket_throughput("tcp", receiver="process"))
    for _ in range(RUNS):
        info = migrate_disk(str(tmp_path), dense, target_dir)
        rates.append(disk_rate(info))
        dense_s.append(info["total-time"] / 1000)
        raw.append(raw_socket_throughput("tcp", receiver="process"))
        sparse_s.append(migrate_disk(str(tmp_path), sparse, target_dir)["total-time"] / 1000)
        writes.append(write_ceiling_bps(target_dir, DISK_MIB))
        for how, runs in copies.items():
            runs.append(file_copy_bps(dense, target_dir, how))
    raw_median, rate_median = statistics.median(raw), statistics.median(rates)
    ratio = rate_median / raw_median
    write_median = statistics.median(w[0] for w in writes)
    synced_median = statistics.median(w[1] for w in writes)
    print(f"\nblock migration, {DISK_MIB} MiB of random data over loopback TCP into "
          f"{storage}, {RUNS} runs:")
    print(f"  raw sendall into a process: {raw_median / 1e9:.2f} GB/s "
          f"(runs: {', '.join(f'{r / 1e9:.2f}' for r in raw)})")
    print(f"  sequential 1 MiB writes into the target's storage: {write_median / 1e9:.2f} GB/s "
          f"(runs: {', '.join(f'{r[0] / 1e9:.2f}' for r in writes)}); with an fdatasync "
          f"at the end: {synced_median / 1e9:.2f} GB/s "
          f"(runs: {', '.join(f'{r[1] / 1e9:.2f}' for r in writes)})")
    copy_medians = {how: statistics.median(runs) for how, runs in copies.items()}
    copy_best = max(copy_medians.values())
    print("  the image copied over the same loopback into a file past the page cache: "
          + "; ".join(f"{how} {copy_medians[how] / 1e9:.2f} GB/s "
                      f"(runs: {', '.join(f'{r / 1e9:.2f}' for r in runs)})"
                      for how, runs in copies.items())
          + f"; the file-to-file ceiling {copy_best / 1e9:.2f} GB/s, "
            f"{copy_best / raw_median:.2f} of the raw socket")
    print(f"  disk bulk rate: {rate_median / 1e9:.2f} GB/s "
          f"(runs: {', '.join(f'{r / 1e9:.2f}' for r in rates)}), ratio {ratio:.2f} "
          f"(target {TARGET_RATIO}); to the file-to-file ceiling "
          f"{rate_median / copy_best:.2f}")
    print(f"  total time, dense {DISK_MIB} MiB image: {statistics.median(dense_s):.2f} s; "
          f"sparse {10 * DISK_MIB} MiB image with the same data: "
          f"{statistics.median(sparse_s):.2f} s "
          f"(x{statistics.median(sparse_s) / statistics.median(dense_s):.2f})")
    print(f"  ratio to the lower ceiling (socket or storage): "
          f"{rate_median / min(raw_median, write_median):.2f}; to the lower of the socket "
          f"and what the storage sustains (with the fdatasync): "
          f"{rate_median / min(raw_median, synced_median):.2f}")
    assert rate_median > 0 and raw_median > 0 and copy_best > 0


# Downtimes on this shared host vary several times over from one migration to the next:
# medians of this many migrations each way, taken in turns.
DOWNTIME_RUNS = int(os.environ.get("PYMIG_BENCH_DOWNTIME_RUNS", "7"))
WRITE_RATE = 20_000_000  # bytes/s the writer puts on the disk while the guest migrates
WRITE_BLOCK = 64 << 10


def _writer(guest, stop, working_set: int, written: list) -> None:
    """Random 64 KiB writes over the disk's first ``working_set`` bytes at WRITE_RATE, through
    the guest's own image (the path the disk controller's writes take: the dirty-chunk log
    sees them the same way), only while the guest runs, as its vCPU's would be."""
    image = guest.disk_images[0]
    import random

    rng = random.Random(20)
    data = os.urandom(WRITE_BLOCK)
    t0 = time.monotonic()
    done = 0
    while not stop.is_set():
        ahead = done / WRITE_RATE - (time.monotonic() - t0)
        if ahead > 0 or guest.status != "running":
            time.sleep(min(max(ahead, 0.001), 0.01))
            continue
        image.pwrite(rng.randrange(working_set // WRITE_BLOCK) * WRITE_BLOCK, data)
        done += WRITE_BLOCK
    written.append(done / (time.monotonic() - t0))


def test_downtime_with_a_guest_writing_its_disk(tmp_path):
    """Total time and downtime of the same guest (idle workload, 64 MiB of RAM, a 256 MiB
    disk holding 64 MiB) with and without 20 MB/s of writes over those 64 MiB during the
    migration, in turns; the destination is a pymig incoming process."""
    import threading

    from pymig.guest import create, make_config
    from pymig.machine import Machine
    from pymig.migration import Migration
    from pymig.parameters import ParameterStore
    from pymig.qmp import QmpClient

    disk = str(tmp_path / "disk.img")
    fill(disk, 64, 256)
    rows: dict[bool, list] = {False: [], True: []}
    rates: list = []
    for run in range(2 * DOWNTIME_RUNS):
        writing = bool(run % 2)
        directory = tempfile.mkdtemp(dir=str(tmp_path))
        dst_ctl = os.path.join(directory, "dst.sock")
        dest = _pymig("incoming", "tcp:127.0.0.1:0", "--disk",
                      f"disk0={os.path.join(directory, 'target.img')}", "--control", dst_ctl,
                      "--quiet")
        guest = create(make_config(memory_bytes=64 * MiB, workload="idle", disks=[disk]))
        stop = threading.Event()
        try:
            _wait_for_path(dst_ctl, dest)
            with QmpClient(dst_ctl) as client:
                bound = client.command("query-migrate")["socket-address"]
            guest.start()
            writer = threading.Thread(target=_writer, args=(guest, stop,
                                                            64 * MiB, rates))
            if writing:
                writer.start()
                time.sleep(0.5)
            store = ParameterStore()
            store.set_capabilities(block=True)
            migration = Migration(Machine.source(guest), store)
            migration.start(bound)
            migration.wait(300)
            stop.set()
            if writing:
                writer.join()
            info = migration.query()
            assert info["status"] == "completed", info
            rows[writing].append((info["total-time"], info["downtime"],
                                  info["disk"]["transferred"],
                                  info.get("downtime-breakdown", {})))
        finally:
            stop.set()
            guest.close()
            if dest.poll() is None:
                dest.kill()
            dest.wait(30)
            shutil.rmtree(directory, ignore_errors=True)
    print(f"\nblock migration of a 256 MiB disk (64 MiB of data), {DOWNTIME_RUNS} runs each, "
          f"in turns:")
    for writing in (False, True):
        total = statistics.median(r[0] for r in rows[writing])
        down = statistics.median(r[1] for r in rows[writing])
        sent = statistics.median(r[2] for r in rows[writing])
        label = (f"writing {statistics.median(rates) / 1e6:.0f} MB/s" if writing
                 else "no writes")
        print(f"  {label:>16}: "
              f"total {total} ms, downtime {down} ms, disk sent {sent / 1e6:.0f} MB "
              f"(runs: {', '.join(f'{r[0]}/{r[1]}' for r in rows[writing])} ms)")
        phases = {phase for r in rows[writing] for phase in r[3]}
        print("      downtime by phase, medians (ms): " + ", ".join(
            f"{phase} {statistics.median(r[3].get(phase, 0) for r in rows[writing]):g}"
            for phase in sorted(phases)))
    ratio = statistics.median(r[1] for r in rows[True]) / statistics.median(
        r[1] for r in rows[False])
    print(f"  downtime ratio writing / not writing: {ratio:.2f} (target <= 2)")
