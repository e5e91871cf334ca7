"""A guest's dirty log read by a migration and by dirty-rate measurements at once
(:class:`pymig.guest.base.DirtyLogShare`): each reader's harvest is exactly the pages written
since its previous one, and each migration sync leaves every page written since it was last
sent in the migration's bitmap, whoever fetched the bit: on a model of the log (a hypothesis
state machine), on KVM guests that write exactly the pages the test lists (manual
protection, without it, the dirty ring), on the simulated guest (whose writes the test
replays), and through a whole migration that a measurement runs beside."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from _kvm_helpers import CMD_PAGE, build_writer, make_writer_guest, pages, write_round
from _migration_helpers import guests  # noqa: F401 - fixture
from _migration_helpers import GUEST_KINDS, assert_arrived_and_runs, guest_config, migrate_locally
from pymig.dirtyrate import DirtyRateConfig, DirtyRateMeasurement
from pymig.guest.base import DirtyLogReader, DirtyLogShare
from pymig.guest.layout import MAILBOX_GPA
from pymig.guest.workloads import dirtier_pages

MiB = 1 << 20
NPAGES = 256


# -- the share on a model of a log ------------------------------------------------------------

def bits(page_set, npages=NPAGES) -> np.ndarray:
    flags = np.zeros(npages, dtype=bool)
    flags[list(page_set)] = True
    return np.packbits(flags, bitorder="little").view("<u8").astype(np.uint64)


def unpack(bitmap, npages=NPAGES) -> set[int]:
    return pages(bitmap, npages)


class SharedLog(RuleBasedStateMachine):
    """A fetch-and-clear log (the simulated writer's, KVM's without manual protection, the
    ring's) behind a DirtyLogShare; the migration sends what its bitmap holds."""

    def __init__(self):
        super().__init__()
        self.log: set[int] = set()
        self.share = DirtyLogShare([NPAGES // 64])
        self.now = 0
        self.written_at: dict[int, int] = {}
        self.sent_at: dict[int, int] = {}
        self.migrating = False
        self.bitmap: set[int] = set()  # the migration's
        self.readers: list[DirtyLogReader] = []
        self.owed: dict[int, set[int]] = {}  # per reader: written since its last harvest

    def fetch(self) -> list[np.ndarray]:
        taken, self.log = self.log, set()
        return [bits(taken)]

    @rule(written=st.sets(st.integers(0, NPAGES - 1), max_size=40))
    def write(self, written):
        self.now += 1
        self.log |= written
        for page in written:
            self.written_at[page] = self.now
        for owed in self.owed.values():
            owed |= written

    @precondition(lambda self: not self.migrating)
    @rule()
    def start_migration(self):
        self.share.start_migration()
        self.migrating = True
        self.bitmap = set(range(NPAGES))  # setup: every page goes once
        self.now += 1
        self.sent_at = {}

    @precondition(lambda self: self.migrating)
    @rule()
    def sync(self):
        fetched = self.share.migration_fetched(self.fetch())
        self.bitmap |= unpack(fetched[0])
        stale = {p for p, t in self.written_at.items() if t > self.sent_at.get(p, -1)}
        assert stale <= self.bitmap, sorted(stale - self.bitmap)

    @precondition(lambda self: self.migrating)
    @rule(first=st.integers(0, NPAGES - 1), count=st.integers(1, NPAGES))
    def send(self, first, count):
        self.now += 1
        for page in set(range(first, min(first + count, NPAGES))) & self.bitmap:
            self.sent_at[page] = self.now
            self.bitmap.discard(page)

    @precondition(lambda self: self.migrating)
    @rule()
    def stop_migration(self):
        self.share.stop_migration()
        self.migrating = False

    @precondition(lambda self: len(self.readers) < 3)
    @rule()
    def open_reader(self):
        reader = DirtyLogReader(lambda r: self.share.reader_fetched(r, self.fetch()),
                                self.share.remove)
        self.share.add(reader)
        reader.harvest()  # from now on
        self.readers.append(reader)
        self.owed[id(reader)] = set()

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def harvest(self, data):
        reader = data.draw(st.sampled_from(self.readers))
        assert unpack(reader.harvest()[0]) == self.owed[id(reader)]
        self.owed[id(reader)] = set()

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def close_reader(self, data):
        reader = data.draw(st.sampled_from(self.readers))
        reader.close()
        self.readers.remove(reader)
        del self.owed[id(reader)]

    @invariant()
    def logging_wanted_while_anyone_reads(self):
        assert self.share.wanted == (self.migrating or bool(self.readers))


TestSharedLog = SharedLog.TestCase


# -- guests ---------------------------------------------------------------------------------

class Checker:
    """Random steps on a guest: writes (``write()`` returns the pages written, block 0),
    migration syncs and chunk sends (clear, then the pages count as sent), reader harvests;
    every harvest and sync is checked against what was written."""

    def __init__(self, guest, write, seed: int):
        self.guest = guest
        self.write_pages = write
        self.rng = random.Random(seed)
        self.npages = guest.ram_blocks[0].npages
        self.now = 0
        self.written_at: dict[int, int] = {}
        self.sent_at: dict[int, int] = {}
        self.bitmap: set[int] = set()
        self.owed: set[int] = set()
        self.harvests = self.syncs = 0

    def write(self) -> None:
        self.now += 1
        written = self.write_pages(self.rng)
        for page in written:
            self.written_at[page] = self.now
        self.owed |= written

    def sync(self) -> None:
        self.bitmap |= pages(self.guest.sync_dirty()[0], self.npages)
        stale = {p for p, t in self.written_at.items() if t > self.sent_at.get(p, -1)}
        assert stale <= self.bitmap, sorted(stale - self.bitmap)
        self.syncs += 1

    def send(self) -> None:
        first = self.rng.randrange(0, self.npages, 64)
        count = self.rng.choice([64, 1024, self.npages])
        self.guest.clear_dirty(0, first, min(count, self.npages - first))
        self.now += 1
        for page in set(range(first, first + count)) & self.bitmap:
            self.sent_at[page] = self.now
            self.bitmap.discard(page)

    def harvest(self, reader) -> None:
        assert pages(reader.harvest()[0], self.npages) == self.owed
        self.owed = set()
        self.harvests += 1

    def run(self, steps: int) -> None:
        self.guest.start_dirty_log()
        self.bitmap = set(range(self.npages))
        with self.guest.open_dirty_reader() as reader:
            for _ in range(steps):
                step = self.rng.choice(["write", "write", "sync", "send", "harvest"])
                if step == "harvest":
                    self.harvest(reader)
                else:
                    getattr(self, step)()
            self.write()
            self.harvest(reader)
            self.sync()
        self.guest.stop_dirty_log()
        assert self.harvests > 5 and self.syncs > 5


@pytest.fixture(scope="module")
def writer_image(tmp_path_factory):
    return build_writer(tmp_path_factory.mktemp("writer"))


@pytest.mark.kvm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("log", [
    pytest.param({}, id="manual-protect"),
    pytest.param({"manual_protect": False}, id="get-clears"),
    pytest.param({"dirty_ring": 4096}, id="dirty-ring"),
])
def test_kvm_reader_and_migration_each_see_every_page_written(writer_image, log):
    with make_writer_guest(writer_image, **log) as guest:
        guest.start()
        write_round(guest, [])
        npages = guest.ram_blocks[0].npages

        def write(rng) -> set[int]:
            chosen = set(rng.sample(range(0x100, npages), rng.randrange(1, 200)))
            write_round(guest, [page << 12 for page in sorted(chosen)])
            return chosen | {CMD_PAGE}

        for seed in range(3):
            Checker(guest, write, seed).run(150)
        guest.pause()


def test_simulated_reader_and_migration_each_see_every_page_written(guests):
    guest = guests(guest_config("simulated", "dirtier", memory=64 * MiB,
                                working_set=4 * MiB, rate=200_000))
    guest.pause()
    share = guest.workload.shares[0]
    mailbox_page = MAILBOX_GPA >> 12

    def write(rng) -> set[int]:
        before = guest.progress()["pages_written"]
        guest.resume()
        time.sleep(rng.choice([0.0005, 0.002, 0.01]))
        guest.pause()
        after = guest.progress()["pages_written"]
        if after == before:
            return set()
        written = dirtier_pages(guest.workload, 0, after)[before:] + share.first_frame
        return set(written.tolist()) | {mailbox_page}

    for seed in range(3):
        Checker(guest, write, seed).run(150)


# -- a whole migration with a measurement beside it -------------------------------------------

@pytest.mark.parametrize("kind", GUEST_KINDS)
@pytest.mark.parametrize("mode", ["dirty-bitmap", "page-sampling"])
@pytest.mark.timeout(300)
def test_a_migration_with_a_measurement_beside_it_arrives_whole(guests, tmp_path, kind, mode):
    source = guests(guest_config(kind, memory=64 * MiB, working_set=16 * MiB, rate=2_000))
    measurements = []

    def measure_throughout(migration):
        # one measurement after another until the migration ends: some harvests come in
        # the first pass, some in later ones, the last in the stop-and-copy
        while migration.status.value not in ("completed", "failed", "cancelled"):
            measurement = DirtyRateMeasurement(source, DirtyRateConfig(200, mode, 16384),
                                               baseline_s=0.0)
            measurement.start()
            assert measurement.wait(60)
            measurements.append(measurement)

    with migrate_locally(source, f"unix:{tmp_path}/m.sock", during=measure_throughout,
                         params={"max-bandwidth": 24 * MiB, "compression": "none"}) as done:
        assert_arrived_and_runs(done, source)
    assert len(measurements) >= 3
    assert all(m.result is not None for m in measurements), [m.error for m in measurements]
    assert sum(m.result.dirty_pages for m in measurements) > 0
