"""Block migration of KVM guests: a diskcheck guest whose disk is not on shared storage moves
with its image while it writes it (tcp, unix, file:), the destination's image byte-equal to
the source's as it was at the stop and diskcheck finding no error there; a cancel and a torn
connection leave the source's image and guest as they were and the destination's image marked
incomplete, which pymig run then refuses; a destination refuses a stream whose disk has no
target, a target that holds data, and a block record that points past the disk's end; pymig
migrate --blk between processes, with the disk counters; the switchover waits for the disk's
bulk phase.

(The simulated guest's disks, which no controller drives, migrate too: test_block_simulated.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading

import pytest
from _ata_helpers import diskcheck_runs_clean_behind, make_image
from _migration_helpers import (finish, migrate_locally, pymig_process, run_pymig,
                                start_destination, wait_for, wait_for_path)

from pymig.block import KIND_DATA, RECORD, DiskTarget
from pymig.disk import incomplete_marker
from pymig import policy
from pymig.errors import DiskError, MigrationError
from pymig.guest import create, make_config
from pymig.guest.workloads import verify_diskcheck
from pymig.incoming import Incoming
from pymig.limits import DestinationLimits
from pymig.machine import Machine
from pymig.migration import Migration
from pymig.parameters import ParameterStore
from pymig.qmp import QmpClient

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(300)]

MiB = 1 << 20
KiB = 1 << 10
DISK_BYTES = 64 * MiB
FILLED_AT = 40 * MiB  # data the guest never writes: only the bulk phase moves it
FILLED_BYTES = 8 * MiB


def sha(path, start: int = 0, length: int | None = None) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        return hashlib.sha256(f.read(length if length is not None else -1)).hexdigest()


def disk_guest(tmp_path, working_set=256 * KiB):
    disk = make_image(tmp_path / "source.img", DISK_BYTES)
    with open(disk, "r+b") as f:
        f.seek(FILLED_AT)
        f.write(os.urandom(FILLED_BYTES))
    config = make_config(memory_bytes=32 * MiB, workload="diskcheck",
                         params={"disk_working_set_bytes": working_set}, disks=[str(disk)])
    guest = create(config)
    guest.start()
    wait_for(lambda: guest.progress()["passes"] >= 1, timeout=120, what="a diskcheck pass")
    return disk, config, guest


def assert_diskcheck_runs_clean(dest, image) -> None:
    passes = dest.progress()["passes"]
    wait_for(lambda: dest.progress()["passes"] >= passes + 2, timeout=120,
             what="two more passes at the destination")
    dest.pause()
    report = verify_diskcheck(str(image), dest.config, dest.mailbox()[0])
    assert report.ok and report.errors == 0, report.detail
    assert dest.progress()["errors"] == 0 and dest.progress()["result"] == 0


def snapshot_with_its_disk(guest, snapshot) -> None:
    """A ``file:`` snapshot of ``guest`` with the block capability (its disk inside), the
    guest left paused."""
    store = ParameterStore()
    store.set_capabilities(block=True)
    migration = Migration(Machine.source(guest), store)
    migration.start(f"file:{snapshot}", resume_source=False)
    assert migration.wait(120).value == "completed", migration.query()


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_a_guest_writing_its_disk_moves_with_its_image(tmp_path, scheme):
    disk, config, guest = disk_guest(tmp_path)
    target = tmp_path / "target.img"
    at_stop: dict = {}
    uri = "tcp:127.0.0.1:0" if scheme == "tcp" else f"unix:{tmp_path / 'mig.sock'}"
    weighed: list = []

    def decide(metrics, params):  # the policy as it is, seeing what it weighs
        weighed.append(metrics)
        return policy.decide(metrics, params)

    with guest:
        written_before = guest.progress()["pages_written"]
        # a cap stretches the bulk phase over ~0.5 s of the guest writing
        with migrate_locally(guest, uri, capabilities={"block": True}, decide=decide,
                             params={"max-bandwidth": 16 * MiB},
                             guest_options={"disk_targets": [DiskTarget(0, str(target))]},
                             before_start=lambda m: at_stop.update(
                                 target=sha(target),
                                 marked=os.path.exists(incomplete_marker(str(target))))) as done:
            assert done.error is None, done.error
            info = done.migration.query()
            assert info["status"] == "completed", info
            # the source stays paused from the stop on: its image is as it was then
            assert guest.status == "paused"
            assert guest.progress()["pages_written"] > written_before  # I/O ran throughout
            assert at_stop["target"] == sha(disk)
            assert at_stop["marked"]  # partial until the guest runs there
            assert not os.path.exists(incomplete_marker(str(target)))
            assert info["disk"]["total"] == DISK_BYTES and info["disk"]["remaining"] == 0
            # the disk's pending bytes are the policy's: the bulk phase's first, not RAM's
            assert weighed[0].pending_bytes >= FILLED_BYTES + 256 * KiB
            assert FILLED_BYTES <= info["disk"]["transferred"] < 3 * FILLED_BYTES
            assert os.stat(target).st_blocks * 512 < 2 * FILLED_BYTES  # sparse, as the source
            dest = done.destination
            assert dest.config.disks[0].path == str(target)
            assert_diskcheck_runs_clean(dest, target)
        report = verify_diskcheck(str(disk), config, guest.mailbox()[0])
        assert report.ok and report.errors == 0, report.detail


def test_the_switchover_waits_for_the_disk_bulk_phase(tmp_path):
    """A downtime limit the whole disk fits in lets the estimate switch over at the first
    sync; the migration still sends the disk's first copy with the guest running (QEMU's
    block migration holds the switchover through its bulk phase), and stops the guest only
    at a sync where the bulk phase is through."""
    disk, config, guest = disk_guest(tmp_path)
    target = tmp_path / "target.img"
    weighed: list = []

    def decide(metrics, params):
        weighed.append(metrics)
        return policy.decide(metrics, params)

    with guest:
        with migrate_locally(guest, "tcp:127.0.0.1:0", capabilities={"block": True},
                             decide=decide,
                             params={"max-bandwidth": 4 * MiB, "downtime-limit": 60_000},
                             guest_options={"disk_targets": [DiskTarget(0, str(target))]}
                             ) as done:
            assert done.error is None, done.error
            assert done.migration.query()["status"] == "completed"
    # the estimate allowed a switchover while the disk's bulk phase was under way ...
    early = [m for m in weighed if not m.swept]
    assert early and all(policy.decide(m, policy.PolicyParams(downtime_limit_s=60)).action
                         == policy.Action.SWITCHOVER for m in early)
    assert early[0].pending_bytes >= FILLED_BYTES
    # ... and the guest stopped only once it was through: what was left then is what the
    # guest wrote since the last pass (its 256 KiB working set at most) and its RAM's few
    # pages, never megabytes of the disk's first copy
    assert weighed[-1].swept and weighed.index(early[-1]) < len(weighed) - 1
    assert weighed[-1].pending_bytes < 1 * MiB, weighed[-1]


def test_a_snapshot_carries_the_disk_and_restores_into_a_target(tmp_path):
    disk, config, guest = disk_guest(tmp_path)
    snapshot = tmp_path / "snap.pymig"
    with guest:
        snapshot_with_its_disk(guest, snapshot)
        assert guest.status == "paused"
        at_snapshot = sha(disk)
    target = tmp_path / "restored.img"
    at_load: dict = {}
    incoming = Incoming(f"file:{snapshot}", limits=DestinationLimits(accept_kinds=("kvm",)),
                        guest_options={"disk_targets": [DiskTarget(0, str(target))]},
                        before_start=lambda m: at_load.update(target=sha(target)))
    result = incoming.run()
    with result.machine.guest as dest:
        assert at_load["target"] == at_snapshot
        assert_diskcheck_runs_clean(dest, target)


def test_a_cancel_leaves_the_source_as_it_was_and_the_target_marked_incomplete(tmp_path):
    disk, config, guest = disk_guest(tmp_path)
    target = tmp_path / "target.img"
    filled = sha(disk, FILLED_AT, FILLED_BYTES)

    def cancel_in_the_bulk_phase(migration):
        wait_for(lambda: migration.query().get("disk", {}).get("transferred", 0) > MiB,
                 timeout=60, what="the bulk phase under way")
        migration.cancel()

    with guest:
        done = migrate_locally(guest, "tcp:127.0.0.1:0", capabilities={"block": True},
                               params={"max-bandwidth": 4 * MiB},
                               guest_options={"disk_targets": [DiskTarget(0, str(target))]},
                               during=cancel_in_the_bulk_phase)
        assert done.migration.status.value == "cancelled"
        assert done.error is not None and done.destination is None
        assert guest.status == "running"
        assert sha(disk, FILLED_AT, FILLED_BYTES) == filled  # the migration never wrote it
        assert not guest.disk_images[0].logging
        passes = guest.progress()["passes"]
        wait_for(lambda: guest.progress()["passes"] >= passes + 1, timeout=120,
                 what="a pass after the cancel")
        guest.pause()
        report = verify_diskcheck(str(disk), config, guest.mailbox()[0])
        assert report.ok and report.errors == 0, report.detail
    assert os.path.exists(incomplete_marker(str(target)))
    with pytest.raises(DiskError, match=f"{target} is incomplete: an incoming migration of "
                                        f"{disk} into this image has not completed"):
        create(make_config(memory_bytes=32 * MiB, workload="diskcheck",
                           params={"disk_working_set_bytes": 256 * KiB},
                           disks=[str(target)]))
    # and the operator, at the command line, is told the same, without a traceback
    done = run_pymig("run", "--workload", "diskcheck", "--memory", "32M", "--disk",
                     str(target), "--quiet", timeout=60)
    assert done.returncode != 0 and "is incomplete" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_without_blk_a_disk_that_is_not_shared_keeps_the_guest_here(tmp_path):
    disk, config, guest = disk_guest(tmp_path)
    with guest:
        migration = Migration(Machine.source(guest))
        with pytest.raises(MigrationError, match=r"not on shared storage: migrate with --blk"):
            migration.start(f"file:{tmp_path / 'snap.pymig'}")
        assert guest.status == "running" and not guest.disk_images[0].logging


@pytest.mark.parametrize("setup,said", [
    ("none", "travels with the guest (block migration): name where it goes, pymig incoming "
             "--disk disk0=PATH"),
    ("data", "already holds data; give disk0="),
    ("size", "the incoming disk is 67108864"),
])
def test_a_destination_refuses_a_disk_it_has_no_place_for(tmp_path, setup, said):
    disk, config, guest = disk_guest(tmp_path)
    target = tmp_path / "target.img"
    if setup == "data":
        make_image(target, DISK_BYTES, b"precious" * 64)
    elif setup == "size":
        make_image(target, DISK_BYTES // 2)
    before = sha(target) if target.exists() else None
    targets = [] if setup == "none" else [DiskTarget(0, str(target))]
    with guest:
        done = migrate_locally(guest, "tcp:127.0.0.1:0", capabilities={"block": True},
                               guest_options={"disk_targets": targets})
        assert done.migration.status.value == "failed"
        assert said in done.migration.query()["error-desc"], done.migration.query()
        assert guest.status == "running"
    if before is not None:
        assert sha(target) == before and not os.path.exists(incomplete_marker(str(target)))


def test_a_block_record_past_the_disk_end_is_a_stream_error_and_writes_nothing(tmp_path):
    from pymig.analyze import analyze
    from pymig.fuzz import repair
    from pymig.transport import BytesChannel

    disk, config, guest = disk_guest(tmp_path)
    snapshot = tmp_path / "snap.pymig"
    with guest:
        snapshot_with_its_disk(guest, snapshot)
    good = analyze(BytesChannel(snapshot.read_bytes()))
    assert good.ok, good.problems
    disk_stats = good.to_dict()["disks"]["block/0"]
    assert disk_stats["size"] == DISK_BYTES and disk_stats["chunk"] == MiB
    assert disk_stats["ended"] and disk_stats["data-bytes"] >= FILLED_BYTES
    assert disk_stats["data-bytes"] + disk_stats["zero-bytes"] < DISK_BYTES // 2  # no holes
    data = bytearray(snapshot.read_bytes())
    header = RECORD.pack(KIND_DATA, MiB, FILLED_AT)
    at = data.find(header)
    assert at > 0
    data[at:at + RECORD.size] = RECORD.pack(KIND_DATA, MiB, DISK_BYTES)  # one chunk too far
    bad = tmp_path / "bad.pymig"
    bad.write_bytes(repair.records(data)[0])
    damaged = analyze(BytesChannel(bad.read_bytes()))
    assert not damaged.ok
    assert damaged.problems[0].offset == at  # the record's own bytes
    assert "goes past the end of the 67108864-byte disk" in damaged.problems[0].reason
    target = tmp_path / "target.img"
    incoming = Incoming(f"file:{bad}", limits=DestinationLimits(accept_kinds=("kvm",)),
                        guest_options={"disk_targets": [DiskTarget(0, str(target))]})
    with pytest.raises(MigrationError, match=r"at byte \d+: block record \[67108864, "
                                             r"68157440\) goes past the end of the "
                                             r"67108864-byte disk \(block/0 record at byte"):
        incoming.run()
    assert os.path.getsize(target) == DISK_BYTES
    assert sha(target, FILLED_AT, FILLED_BYTES) != sha(disk, FILLED_AT, FILLED_BYTES)
    assert os.path.exists(incomplete_marker(str(target)))


def test_pymig_migrate_blk_between_processes_and_a_torn_connection(tmp_path):
    disk = make_image(tmp_path / "source.img", DISK_BYTES)
    with open(disk, "r+b") as f:
        f.seek(FILLED_AT)
        f.write(os.urandom(FILLED_BYTES))
    src_ctl = str(tmp_path / "src.sock")
    source = pymig_process("run", "--workload", "diskcheck", "--memory", "32M", "--disk",
                           str(disk), "--disk-working-set", "256K", "--control", src_ctl,
                           "--quiet", stderr=subprocess.PIPE)
    procs = [source]
    try:
        wait_for_path(src_ctl, source)
        with QmpClient(src_ctl) as client:
            wait_for(lambda: client.command("query-guest")["progress"]["passes"] >= 1,
                     timeout=120, what="a pass at the source")
        # a destination killed in the bulk phase: the source runs on, the target is partial
        (tmp_path / "torn").mkdir()
        torn_target = tmp_path / "torn.img"
        torn, _, bound = start_destination(tmp_path / "torn", "tcp:127.0.0.1:0", "--disk",
                                           f"disk0={torn_target}")
        procs.append(torn)
        result: dict = {}

        def migrate_slowly():
            result["done"] = run_pymig("migrate", "--control", src_ctl, bound, "--blk",
                                       "--max-bandwidth", "2M", "--json")

        thread = threading.Thread(target=migrate_slowly)
        thread.start()
        wait_for(lambda: os.path.exists(incomplete_marker(str(torn_target)))
                 and os.stat(torn_target).st_blocks * 512 >= MiB, timeout=60,
                 what="the bulk phase at the destination")
        torn.kill()
        thread.join(120)
        done = result["done"]
        assert done.returncode == 1, done.stdout + done.stderr
        assert json.loads(done.stdout.splitlines()[-1])["status"] == "failed"
        with QmpClient(src_ctl) as client:
            assert client.command("query-status")["status"] == "running"
        refused = run_pymig("run", "--workload", "diskcheck", "--memory", "32M", "--disk",
                            str(torn_target), "--quiet", timeout=60)
        assert refused.returncode != 0 and "is incomplete" in refused.stderr

        # then into a target named on the command line, with the disk counters
        target = tmp_path / "target.img"
        dest, dst_ctl, bound = start_destination(tmp_path, "tcp:127.0.0.1:0", "--disk",
                                                 f"disk0={target}")
        procs.append(dest)
        done = run_pymig("migrate", "--control", src_ctl, bound, "--blk", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        info = json.loads(done.stdout.splitlines()[-1])
        assert info["disk"]["total"] == DISK_BYTES and info["disk"]["remaining"] == 0
        assert info["disk"]["transferred"] >= FILLED_BYTES
        diskcheck_runs_clean_behind(dst_ctl)
        assert sha(target, FILLED_AT, FILLED_BYTES) == sha(disk, FILLED_AT, FILLED_BYTES)
        assert not os.path.exists(incomplete_marker(str(target)))
    finally:
        finish(*procs)


# --- incremental ---------------------------------------------------------------------------

def test_an_incremental_migration_sends_what_was_written_since_the_checkpoint(tmp_path):
    import shutil

    from pymig.disk import checkpoint_files

    disk = make_image(tmp_path / "source.img", DISK_BYTES)
    with open(disk, "r+b") as f:
        f.seek(FILLED_AT)
        f.write(os.urandom(FILLED_BYTES))
    config = make_config(memory_bytes=32 * MiB, workload="diskcheck",
                         params={"disk_working_set_bytes": 256 * KiB},
                         disks=[f"{disk},checkpoint=base"])  # made here, before the guest runs
    target = tmp_path / "copy.img"
    # the destination's copy, taken after the checkpoint was made (the guest may be writing
    # by then: every chunk it writes is in the map)
    guest = create(config)
    guest.start()
    shutil.copyfile(disk, target)
    shutil.copyfile(checkpoint_files(str(disk), "base")[0],
                    checkpoint_files(str(target), "base")[0])
    wait_for(lambda: guest.progress()["passes"] >= 1, timeout=120, what="a diskcheck pass")
    at_stop: dict = {}
    with guest:
        with migrate_locally(guest, "tcp:127.0.0.1:0", start_options={"inc": True},
                             guest_options={"disk_targets": [DiskTarget(0, str(target))]},
                             before_start=lambda m: at_stop.update(target=sha(target))) as done:
            assert done.error is None, done.error
            info = done.migration.query()
            assert info["status"] == "completed", info
            assert at_stop["target"] == sha(disk)
            # the working set's chunk (and what diskcheck wrote during the copy), never the
            # 8 MiB the guest did not touch
            assert info["disk"]["transferred"] < 2 * MiB, info["disk"]
            assert_diskcheck_runs_clean(done.destination, target)


def test_an_incremental_migration_needs_a_checkpoint_and_its_copy(tmp_path):
    disk, config, guest = disk_guest(tmp_path)
    with guest:
        migration = Migration(Machine.source(guest))
        with pytest.raises(MigrationError, match=r"has no checkpoint: an incremental "
                                                 r"migration sends what was written"):
            migration.start(f"file:{tmp_path / 'snap.pymig'}", inc=True)
    config = make_config(memory_bytes=32 * MiB, workload="diskcheck",
                         params={"disk_working_set_bytes": 256 * KiB},
                         disks=[f"{disk},checkpoint=base"])
    target = make_image(tmp_path / "not-a-copy.img", DISK_BYTES, b"something else")
    before = sha(target)
    with create(config) as guest:
        guest.start()
        done = migrate_locally(guest, "tcp:127.0.0.1:0", start_options={"inc": True},
                               guest_options={"disk_targets": [DiskTarget(0, str(target))]})
        assert done.migration.status.value == "failed"
        assert "is not a copy of checkpoint base of the source's image" in \
            done.migration.query()["error-desc"]
        assert guest.status == "running"
    assert sha(target) == before and not os.path.exists(incomplete_marker(str(target)))


@pytest.mark.parametrize("direction", ["write", "read"])
def test_a_block_migration_in_the_middle_of_a_pio_transfer_resumes_it(tmp_path, direction):
    from test_ata_kvm import pause_inside_a_transfer

    from pymig.kvm import ata

    disk, config, guest = disk_guest(tmp_path)
    target = tmp_path / "target.img"
    with guest:
        state = pause_inside_a_transfer(guest, ata.XFER_OUT if direction == "write"
                                        else ata.XFER_IN)
        assert state.status & ata.DRQ and state.pos < len(state.buffer)
        with migrate_locally(guest, f"unix:{tmp_path / 'mig.sock'}",
                             capabilities={"block": True},
                             guest_options={"disk_targets": [DiskTarget(0, str(target))]}) as done:
            assert done.error is None, done.error
            assert_diskcheck_runs_clean(done.destination, target)
