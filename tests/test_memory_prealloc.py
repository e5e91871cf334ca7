"""A destination's RAM made ready before the stream comes (``pymig incoming --mem-prealloc``,
:class:`pymig.guest.base.PreallocatedRam`): faulted in while the destination waits, handed to
the guest the stream describes, and refused, loudly, to any other guest."""

from __future__ import annotations

import numpy as np
import pytest
from _hugetlb import free_huge_pages
from _migration_helpers import (ANY_KIND, GUEST_KINDS, assert_arrived_and_runs, assert_carries_on,
                               e2e_kind, finish, guest_config, migrate_locally, run_pymig,
                               running_guest, start_destination, start_source)
from _wire_helpers import page_data
from test_memory_hugetlb import migrate_to
from test_migration_streams import records, saved_stream  # noqa: F401 - a fixture

from pymig import stream
from pymig.errors import MigrationError
from pymig.guest.base import GuestConfig, PreallocatedRam
from pymig.guest.layout import RamLayout
from pymig.incoming import Incoming

MiB = 1 << 20


def resident_pages(block) -> int:
    return int(np.unpackbits(block.touched().view(np.uint8)).sum())


def test_preallocated_ram_is_resident_zero_and_goes_to_the_guest():
    ram = PreallocatedRam(16 * MiB)
    try:
        config = GuestConfig("simulated", 16 * MiB)
        [block] = ram.blocks
        assert resident_pages(block) == block.npages  # every page faulted in, before any guest
        assert not block.array.any()
        assert ram.take(config, "anon") == [block]
        assert ram.blocks == []
        # a second guest (a file loaded again to report where it is bad) gets new blocks,
        # populated as well
        [again] = ram.take(config, "anon")
        assert again is not block and resident_pages(again) == again.npages
        again.close()
    finally:
        ram.close()
        block.close()


@pytest.mark.parametrize("config, backing, message", [
    (GuestConfig("kvm", 32 * MiB), "anon", r"ram-low 33554432 bytes.*preallocated ones "
                                           r"\(ram-low 16777216 bytes at 0x0\)"),
    (GuestConfig("kvm", 16 * MiB, blocks=[RamLayout("ram-low", 8 * MiB, 0),
                                          RamLayout("ram-high", 8 * MiB, 1 << 32)]), "anon",
     "not the preallocated ones"),
    (GuestConfig("kvm", 16 * MiB), "memfd", "asks for memfd RAM, the preallocated RAM is anon"),
])
def test_preallocated_ram_refuses_a_guest_of_another_shape(config, backing, message):
    ram = PreallocatedRam(16 * MiB)
    try:
        with pytest.raises(ValueError, match=message):
            ram.take(config, backing)
        assert ram.take(GuestConfig("kvm", 16 * MiB), "anon")  # still there for the right one
    finally:
        ram.close()


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_a_guest_migrates_into_preallocated_ram_and_runs_there(kind):
    source = running_guest(guest_config(kind, "selfcheck", memory=64 * MiB))
    ram = PreallocatedRam(64 * MiB)
    prepared = ram.blocks
    try:
        with migrate_locally(source, "tcp:127.0.0.1:0",
                             guest_options={"prealloc": ram}) as done:
            guest = assert_arrived_and_runs(done, source)
            assert guest.ram_blocks == prepared  # the very blocks made ready before
    finally:
        source.close()
        ram.close()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_pymig_incoming_mem_prealloc_readies_the_ram_before_listening_and_the_guest_runs(
        tmp_path):
    kind = e2e_kind()
    src, src_ctl = start_source(kind, tmp_path, memory="128M")
    dst, dst_ctl, uri = start_destination(tmp_path, "tcp:127.0.0.1:0", "--memory", "128M",
                                          "--mem-prealloc")
    try:
        # listening means ready: the 128 MiB are resident before any stream arrives
        assert _rss_bytes(dst.pid) >= 128 * MiB
        stats = migrate_to(src_ctl, uri)
        assert stats["status"] == "completed", stats
        assert_carries_on(dst_ctl)
    finally:
        finish(src, dst)


def test_pymig_incoming_mem_prealloc_without_a_size_is_refused():
    done = run_pymig("incoming", "tcp:127.0.0.1:0", "--mem-prealloc")
    assert done.returncode != 0
    assert "--mem-prealloc needs --memory" in done.stderr


def test_pymig_incoming_mem_prealloc_of_more_than_the_host_can_give_is_refused():
    with free_huge_pages(4, exactly=True):  # 8 MiB, far from the 64 MiB asked for
        done = run_pymig("incoming", "tcp:127.0.0.1:0", "--memory", "64M", "--mem-prealloc",
                         "--mem-backing", "hugetlb", timeout=60)
    assert done.returncode != 0
    assert "--mem-prealloc:" in done.stderr and "nr_hugepages" in done.stderr, done.stderr


def test_a_bad_snapshot_loaded_into_preallocated_ram_is_refused_for_what_is_wrong(
        tmp_path, saved_stream):
    # A snapshot file that fails to load is loaded again, sequentially, to say where it is
    # bad: the second guest needs RAM too, and the error must still be the file's.
    damaged = bytearray(saved_stream)  # a whole snapshot file, its index included
    packet = next(p for r, p in records(saved_stream) if r.type == stream.RecordType.PART)
    offset, length = page_data(packet)[0]
    damaged[saved_stream.find(packet) + offset + length // 2] ^= 0x10  # a RAM page's bytes
    path = tmp_path / "bad.pymig"
    path.write_bytes(damaged)
    ram = PreallocatedRam(64 * MiB)
    try:
        incoming = Incoming(f"file:{path}", guest_options={"prealloc": ram}, limits=ANY_KIND)
        with pytest.raises(MigrationError, match="checksum"):
            incoming.run()
        assert incoming.machine is None
    finally:
        ram.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_populate_faults_in_exactly_the_range_asked_in_pieces_over_threads(threads):
    from pymig.memory import RamBlock

    block = RamBlock.allocate("ram", 16 * MiB, hugepages=False)
    try:
        # 1 MiB pieces from a start that is not on a piece's edge: 11 pieces, first one short
        block.populate(100, 2800, threads=threads, chunk_bytes=MiB)
        resident = np.unpackbits(block.touched().view(np.uint8), bitorder="little")
        assert resident[:block.npages].nonzero()[0].tolist() == list(range(100, 2900))
        assert not block.array.any()
    finally:
        block.close()


def test_populate_leaves_the_gil_to_other_threads_while_it_faults():
    import threading

    from pymig.memory import RamBlock

    block = RamBlock.allocate("ram", 256 * MiB, hugepages=False)
    ticks = []
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            ticks.append(None)
            done.wait(0.001)

    counter = threading.Thread(target=count)
    try:
        counter.start()
        block.populate(0, block.npages, threads=1)  # one madvise per 64 MiB: seconds when cold
        populated_while = len(ticks)
    finally:
        done.set()
        counter.join()
        block.close()
    # Holding the GIL through each piece, the counter would get in a tick per piece at most
    assert populated_while > 4 * (256 // 64), populated_while


def test_a_populate_that_fails_says_which_block_and_bytes_and_why():
    import mmap

    from pymig.memory import RamBlock

    readonly = mmap.mmap(-1, 4 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                         prot=mmap.PROT_READ)
    block = RamBlock("rom", readonly, 4 * MiB, 0, 0, 4096, None, "anon")
    try:
        for threads in (1, 2):
            with pytest.raises(OSError, match=r"faulting in bytes \[\d+, \d+\) of RAM "
                                              r"block 'rom': ") as info:
                block.populate(0, block.npages, threads=threads, chunk_bytes=MiB)
            assert info.value.errno is not None
    finally:
        block.close()
