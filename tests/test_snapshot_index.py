"""A snapshot's restore index is held to what it claims.

The index lets a restore skip RAM records that later records supersede; anyone can write an
index whose checksum holds.  A restore checks, as it reads, that each range it skips is whole
RAM records whose every page a record read later holds again, and otherwise reads every
record: whatever the index says, a restore loads what reading the whole file loads.  ``pymig
analyze`` holds the index to the same check.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from _migration_helpers import ANY_KIND, guest_config, running_guest
from pymig.analyze import analyze
from pymig.guest.workloads import verify_selfcheck
from pymig.incoming import Incoming
from pymig.machine import Machine
from pymig.migration import Migration
from pymig.parameters import ParameterStore
from _migration_helpers import block_digests
from pymig.transport import BytesChannel
from pymig.transport.file import IndexedFileChannel
from pymig import core
from pymig.transport.snapshot_index import (IndexCheck, SnapshotIndex, SnapshotIndexError,
                                            block_shapes, packet_pages, read_index)

MiB = 1 << 20


def take_snapshot(path, kind: str, compression: str) -> None:
    """A live snapshot of a running self-checking guest that supersedes records: sent at a
    capped bandwidth, the working set is written again while the snapshot sends it, and goes
    twice at least.  (Which records a later one supersedes whole depends on timing: tried
    until a whole packet's worth is superseded.  With LZ4 a snapshot is about 100 KB on the
    wire and over in some 10 ms, and supersedes something in 40-75 % of the tries here: five
    tries all came out empty in one CI run.)"""
    for _ in range(30):
        guest = running_guest(guest_config(kind, memory=64 * MiB, working_set=16 * MiB))
        try:
            store = ParameterStore()
            store.set(**{"compression": compression, "max-bandwidth": 64 * MiB})
            migration = Migration(Machine.source(guest), store)
            migration.start(f"file:{path}")
            assert migration.wait(120).value == "completed", migration.query()
        finally:
            guest.close()
        with open(path, "rb") as handle:
            index = read_index(handle.fileno())
        if index.superseded_bytes >= (1 * MiB if compression == "none" else 1):
            return


class Snapshot:
    """A snapshot file, its index, and what restoring every record of it loads."""

    def __init__(self, path):
        self.path = path
        self.data = path.read_bytes()
        with open(path, "rb") as handle:
            self.index = read_index(handle.fileno())
        assert self.index is not None and self.index.superseded, \
            "the snapshot supersedes nothing: it cannot test the index"
        self.stream = self.data[:self.index.stream_bytes]
        self.sections = analyze(BytesChannel(self.stream)).sections
        whole = path.with_name(path.name + ".whole")
        whole.write_bytes(self.stream)  # no index: every record is read
        self.truth = restore(whole)["digests"]

    def memory_without(self, skipped: tuple[int, int] | None) -> dict[int, np.ndarray]:
        """RAM as the stream's RAM records leave it, without the record ``skipped``."""
        shapes = block_shapes(analyze(BytesChannel(self.stream)).ram.blocks)
        memory = {block: np.zeros(npages * page_size, dtype=np.uint8)
                  for block, (page_size, npages) in shapes.items()}
        for start, length in self.parts():
            if (start, length) != skipped:
                packet = self.stream[start + 12:start + length - 16]
                block, _ = packet_pages(packet, shapes)
                page_size, npages = shapes[block]
                core.decode_packet(packet, memory[block], page_size, block, npages)
        return memory

    def last_record_that_matters(self) -> tuple[int, int]:
        """The last RAM record without which RAM would differ: it holds the last version of
        a page, and that version is not the one before it.  (The very last record may re-send
        pages as they were: a page written again with what it held.)"""
        whole = self.memory_without(None)
        for part in reversed(self.parts()):
            without = self.memory_without(part)
            if any(not np.array_equal(whole[b], without[b]) for b in whole):
                return part
        raise AssertionError("no RAM record matters")

    def parts(self) -> list[tuple[int, int]]:
        """(offset, length) of every RAM PART record, in stream order."""
        return [(s["offset"], 12 + s["size"] + 16) for s in self.sections if s["type"] == "PART"]

    def record(self, kind: str, idstr: str) -> tuple[int, int]:
        s = next(s for s in self.sections if s["type"] == kind and s["idstr"] == idstr)
        header = 12 if kind in ("PART", "END") else 21 + len(idstr)
        return s["offset"], header + s["size"] + 16

    def with_index(self, tmp_path, superseded: list[tuple[int, int]]):
        """This snapshot with an index of our own, its checksum right."""
        path = tmp_path / "crafted.pymig"
        path.write_bytes(self.stream + SnapshotIndex(self.index.stream_bytes,
                                                     superseded).encode())
        return path


def restore(path, *, count_reads: list | None = None) -> dict:
    """Restore ``path``: the RAM digests as loaded (before the guest ran), the stream bytes the
    load read, and the self-check of the guest once it ran."""
    digests: list[str] = []
    result = Incoming(f"file:{path}", limits=ANY_KIND, before_start=lambda m: digests.extend(
        block_digests(m.guest.ram_blocks))).run()
    guest = result.machine.guest
    try:
        guest.pause()
        report = verify_selfcheck(guest)
        return {"digests": digests, "received": result.bytes_received, "selfcheck": report}
    finally:
        guest.close()


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """``snapshots(kind, compression)``: one snapshot of each sort for the module."""
    made: dict[tuple[str, str], Snapshot] = {}

    def get(kind: str, compression: str) -> Snapshot:
        if (kind, compression) not in made:
            path = tmp_path_factory.mktemp(f"index-{kind}-{compression}") / "guest.pymig"
            take_snapshot(path, kind, compression=compression)
            made[kind, compression] = Snapshot(path)
        return made[kind, compression]

    return get


SIMULATED = pytest.param(("simulated", "none"), id="simulated")
KVM = pytest.param(("kvm", "none"), id="kvm", marks=pytest.mark.kvm)
# Pages compressed: COMPRESSED runs, and many pages to a packet.
COMPRESSED = pytest.param(("simulated", "lz4"), id="simulated-lz4")


@pytest.fixture(params=[SIMULATED, KVM])
def snapshot(request, snapshots) -> Snapshot:
    """Pages as they are: a packet holds 256 of them, so that the first pass's records of the
    working set hold nothing else, and the last records hold the pages written last."""
    return snapshots(*request.param)


@pytest.fixture(params=[SIMULATED, KVM, COMPRESSED])
def any_snapshot(request, snapshots) -> Snapshot:
    return snapshots(*request.param)


def assert_loads_what_reading_all_loads(snap: Snapshot, restored: dict) -> None:
    assert restored["digests"] == snap.truth
    assert restored["selfcheck"].ok and restored["selfcheck"].errors == 0, \
        restored["selfcheck"].detail


# -- a restore -------------------------------------------------------------------------------

def test_a_good_index_is_followed_and_loads_what_reading_all_loads(any_snapshot):
    snapshot = any_snapshot
    restored = restore(snapshot.path)
    assert restored["received"] == snapshot.index.stream_bytes - snapshot.index.superseded_bytes
    assert_loads_what_reading_all_loads(snapshot, restored)
    assert analyze(BytesChannel(snapshot.data)).ok


def test_the_check_reads_the_run_records_of_what_it_skips_not_their_pages(snapshot,
                                                                          monkeypatch):
    snap = snapshot
    read = {"bytes": 0}
    pread = IndexedFileChannel._pread

    def counted(self, nbytes, offset):
        data = pread(self, nbytes, offset)
        read["bytes"] += len(data)
        return data

    monkeypatch.setattr(IndexedFileChannel, "_pread", counted)
    restored = restore(snap.path)
    assert restored["received"] == snap.index.stream_bytes - snap.index.superseded_bytes
    assert_loads_what_reading_all_loads(snap, restored)
    assert 0 < read["bytes"] < snap.index.superseded_bytes // 20, read


def test_an_index_that_skips_the_last_version_of_pages_is_not_trusted(snapshot, tmp_path,
                                                                      caplog):
    """The index of the finding: it also skips the last RAM record that holds the last
    version of pages, which no later record holds.  Taken on trust it restored their older
    versions and the guest's self-check counted errors; now the restore notices, says so, and
    reads every record."""
    last = snapshot.last_record_that_matters()
    crafted = snapshot.with_index(tmp_path, sorted(snapshot.index.superseded + [last]))
    with caplog.at_level(logging.WARNING, logger="pymig.incoming"):
        restored = restore(crafted)
    assert_loads_what_reading_all_loads(snapshot, restored)
    assert restored["received"] == snapshot.index.stream_bytes  # every record
    assert f"the RAM record at byte {last[0]}" in caplog.text
    assert "no record after it holds page" in caplog.text
    report = analyze(BytesChannel(crafted.read_bytes()))
    assert not report.ok and report.problems[0].offset == last[0]
    assert "no record after it holds page" in report.problems[0].reason


def crafted_ranges(snap: Snapshot) -> dict[str, list[tuple[int, int]]]:
    """Indexes that claim what is not so, each with its checksum right."""
    parts = snap.parts()
    first_offset, first_length = snap.index.superseded[0]
    later = next(p for p in parts if p[0] > first_offset + first_length)
    end_ram = snap.record("END", "ram")
    return {
        "not-ram": [snap.record("FULL", "cpu")],
        "starts-inside-a-record": [(first_offset + 1, first_length - 1)],
        "ends-inside-a-record": [(first_offset, first_length - 1)],
        "runs-past-the-ram-section": [(parts[-1][0], parts[-1][1] + end_ram[1])],
        "header-and-config": [(16, parts[0][0] - 16)],
        # the record that supersedes a skipped one is skipped too: the pages are in neither
        "both-versions": sorted(set(snap.index.superseded) | {later}),
    }


CRAFTED = ["not-ram", "starts-inside-a-record", "ends-inside-a-record",
           "runs-past-the-ram-section", "header-and-config", "both-versions"]


@pytest.mark.parametrize("case", CRAFTED)
def test_an_index_that_claims_what_is_not_so_makes_the_restore_read_every_record(
        snapshot, tmp_path, caplog, case):
    ranges = crafted_ranges(snapshot)[case]
    crafted = snapshot.with_index(tmp_path, ranges)
    with caplog.at_level(logging.WARNING, logger="pymig.incoming"):
        restored = restore(crafted)
    assert_loads_what_reading_all_loads(snapshot, restored)
    assert restored["received"] == snapshot.index.stream_bytes
    assert "reading every record instead" in caplog.text
    report = analyze(BytesChannel(crafted.read_bytes()))
    assert report.complete and not report.ok
    assert report.index is not None
    assert ranges[0][0] <= report.problems[0].offset < snapshot.index.stream_bytes


# -- the check, record by record ------------------------------------------------------------

BLOCKS = [{"id": 0, "size": 64 * 4096, "page_size": 4096, "name": "ram0", "gpa": 0}]


def runs(*pairs) -> tuple[int, np.ndarray]:
    return 0, np.array(pairs, dtype=np.int64).reshape(-1, 2)


def check_of(superseded, records):
    """Feed ``records`` ((start, end, pages or None), contiguous) to a check of an index
    that skips ``superseded``; returns the check after finish(), or raises."""
    check = IndexCheck(SnapshotIndex(records[-1][1], superseded)).ram_blocks(BLOCKS)
    for start, end, pages in records:
        check.record(start, end, pages)
    check.finish()
    return check


def test_a_skipped_record_whose_pages_a_later_one_holds_again_passes():
    check_of([(100, 100)], [(16, 100, None), (100, 200, runs((0, 4), (10, 2))),
                            (200, 300, runs((0, 8))), (300, 400, runs((9, 5)))])


def test_pages_held_again_before_the_skipped_record_do_not_count():
    with pytest.raises(SnapshotIndexError) as info:
        check_of([(200, 100)], [(16, 100, None), (100, 200, runs((0, 8))),
                                (200, 300, runs((0, 4))), (300, 400, runs((2, 1)))])
    assert info.value.offset == 200
    assert "page 0 of RAM block 0" in info.value.reason and "3 page(s)" in info.value.reason


def test_a_zero_run_holds_a_page_again_too():
    check_of([(100, 100)], [(16, 100, None), (100, 200, runs((5, 3))),
                            (200, 300, runs((0, 64)))])


def test_a_page_skipped_twice_needs_a_version_after_the_second_skip():
    records = [(16, 100, None), (100, 200, runs((3, 1))), (200, 300, runs((3, 1))),
               (300, 400, runs((3, 1))), (400, 500, None)]
    check_of([(100, 100), (300, 100)], records[:3] + [(300, 400, runs((3, 1))),
                                                       (400, 500, runs((3, 1)))])
    with pytest.raises(SnapshotIndexError) as info:
        check_of([(100, 100), (300, 100)], records)
    assert info.value.offset == 300  # the last skipped record holding it


def test_a_range_must_be_whole_ram_records():
    base = [(16, 100, None), (100, 200, runs((0, 1))), (200, 300, runs((0, 1))),
            (300, 350, None)]
    for superseded, offset in [([(100, 50)], 100), ([(150, 50)], 150), ([(16, 84)], 16),
                               ([(100, 250)], 300), ([(300, 50)], 300)]:
        with pytest.raises(SnapshotIndexError) as info:
            check_of(superseded, base)
        assert info.value.offset == offset, superseded


def test_ranges_the_stream_never_reached_are_refused():
    with pytest.raises(SnapshotIndexError, match="not whole records"):
        check_of([(500, 10)], [(16, 100, None), (100, 200, runs((0, 1)))])


def test_a_restore_walks_what_it_skips_from_the_file(any_snapshot):
    """The walk through skipped records finds the same pages as the records themselves."""
    snapshot = any_snapshot
    with open(snapshot.path, "rb") as handle:
        fd = handle.fileno()
        offset, length = snapshot.index.superseded[0]
        walked = IndexCheck(SnapshotIndex(snapshot.index.stream_bytes, [(offset, length)]))
        read = IndexCheck(SnapshotIndex(snapshot.index.stream_bytes, []))
        blocks = analyze(BytesChannel(snapshot.stream)).ram.blocks
        walked.ram_blocks(blocks)
        read.ram_blocks(blocks)
        section = next(s["section-id"] for s in snapshot.sections if s["idstr"] == "ram")
        walked.skip(offset, length, lambda n, at: os.pread(fd, n, at), section)
        pages = [read.packet_pages(snapshot.stream[start + 12:start + size - 16])
                 for start, size in snapshot.parts() if offset <= start < offset + length]
    got = [(block, r.tolist()) for _, block, r in walked._skipped]
    assert got == [(block, r.tolist()) for block, r in pages] and got


def test_a_stream_read_through_the_index_still_checks_every_record_it_reads(snapshot,
                                                                            tmp_path):
    """Damage in a record the index does not skip fails the restore with the file's offset."""
    data = bytearray(snapshot.data)
    cpu_offset, cpu_length = snapshot.record("FULL", "cpu")
    data[cpu_offset + cpu_length - 1] ^= 0x01  # the footer's checksum
    path = tmp_path / "damaged.pymig"
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=f"at byte {cpu_offset + cpu_length - 8}"):
        Incoming(f"file:{path}", limits=ANY_KIND).run()
