"""Block migration of simulated guests (no KVM needed): a simulated guest's disk, which nothing
in the guest drives, is written by the host through its image while the guest runs (the path
the KVM guest's disk controller takes), and moves with it: the destination's image is
byte-equal to the source's as it was at the stop, holes stay holes, what was written during
the migration goes again; a file: snapshot carries the disk; without blk the migration is
refused; query-block shows the disk."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest

from _ata_helpers import make_image
from _migration_helpers import guest_config, migrate_locally, running_guest
from pymig.block import DiskTarget
from pymig.disk import DiskSpec, incomplete_marker
from pymig.errors import MigrationError
from pymig.guest import make_config
from pymig.machine import Machine
from pymig.migration import Migration

MiB = 1 << 20
KiB = 1 << 10
DISK_BYTES = 32 * MiB
FILLED_AT = 20 * MiB
FILLED_BYTES = 4 * MiB
WRITES = [(i * 3 * MiB + 4 * KiB, 64 * KiB) for i in range(5)]  # during the migration


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def disk_guest(tmp_path, *disk_options: str):
    disk = make_image(tmp_path / "source.img", DISK_BYTES)
    with open(disk, "r+b") as f:
        f.seek(FILLED_AT)
        f.write(os.urandom(FILLED_BYTES))
    disks = make_config(kind="simulated", memory_bytes=32 * MiB,
                        disks=[",".join([str(disk), *disk_options])]).disks
    config = dataclasses.replace(
        guest_config("simulated", memory=32 * MiB, working_set=4 * MiB), disks=disks)
    return disk, running_guest(config)


def test_a_simulated_guest_moves_with_its_disk_written_during_the_migration(tmp_path):
    disk, guest = disk_guest(tmp_path)
    target = tmp_path / "target.img"
    at_stop: dict = {}

    def write_while_it_runs(migration) -> None:
        image = guest.disk_images[0]
        for offset, length in WRITES:
            image.pwrite(offset, os.urandom(length))

    with guest:
        # a cap stretches the bulk phase past the writes
        with migrate_locally(guest, "tcp:127.0.0.1:0", capabilities={"block": True},
                             params={"max-bandwidth": 8 * MiB}, during=write_while_it_runs,
                             guest_options={"disk_targets": [DiskTarget(0, str(target))]},
                             before_start=lambda m: at_stop.update(
                                 target=sha(target), source=sha(disk),
                                 marked=os.path.exists(incomplete_marker(str(target))))
                             ) as done:
            assert done.error is None, done.error
            info = done.migration.query()
            assert info["status"] == "completed", info
            assert at_stop["marked"] and at_stop["target"] == at_stop["source"] == sha(disk)
            assert not os.path.exists(incomplete_marker(str(target)))
            # the data and what was written, never the holes
            written = sum(length for _, length in WRITES)
            assert FILLED_BYTES + written <= info["disk"]["transferred"] \
                < FILLED_BYTES + 3 * MiB, info["disk"]
            assert os.stat(target).st_blocks * 512 < 2 * FILLED_BYTES  # sparse, as the source
            dest = done.destination
            assert dest.config.kind == "simulated"
            assert dest.config.disks[0].path == str(target)
            assert [d.path for d in dest.disk_images] == [str(target)]
            assert dest.progress()["errors"] == 0


def test_the_destinations_disk_is_on_stable_storage_before_its_ack(tmp_path, monkeypatch):
    """A source that says completed may be torn down at once: by the ACK that makes it say so,
    the disk that travelled is flushed (fdatasync) and no longer marked incomplete."""
    from pymig import disk as disk_mod
    from pymig import stream

    disk, guest = disk_guest(tmp_path)
    target = tmp_path / "target.img"
    events: list = []
    real_flush, real_ack = disk_mod.DiskImage.flush, stream.ReturnPathWriter.ack

    def flush(image):
        real_flush(image)
        events.append(("flush", image.path))

    def ack(writer, *args, **kwargs):
        events.append(("ack", os.path.exists(incomplete_marker(str(target)))))
        return real_ack(writer, *args, **kwargs)

    monkeypatch.setattr(disk_mod.DiskImage, "flush", flush)
    monkeypatch.setattr(stream.ReturnPathWriter, "ack", ack)
    with guest:
        with migrate_locally(guest, "tcp:127.0.0.1:0", capabilities={"block": True},
                             guest_options={"disk_targets": [DiskTarget(0, str(target))]}
                             ) as done:
            assert done.error is None, done.error
            assert done.migration.query()["status"] == "completed"
    acks = [i for i, e in enumerate(events) if e[0] == "ack"]
    assert len(acks) == 1, events
    assert ("flush", str(target)) in events[:acks[0]], events
    assert events[acks[0]] == ("ack", False), events  # unmarked by then


def test_a_simulated_guests_disk_is_refused_without_blk_and_rides_in_a_snapshot(tmp_path):
    disk, guest = disk_guest(tmp_path)
    with guest:
        with pytest.raises(MigrationError, match="is not on shared storage: migrate with --blk"):
            Migration(Machine.source(guest)).start(f"file:{tmp_path / 'no.pymig'}")
        snapshot = tmp_path / "snap.pymig"
        migration = Migration(Machine.source(guest))
        migration.start(f"file:{snapshot}", blk=True)
        assert migration.wait(120).value == "completed", migration.query()
        assert migration.query()["disk"]["transferred"] >= FILLED_BYTES
        assert guest.status == "running"  # a live snapshot: the guest carries on


def test_a_shared_disk_of_a_simulated_guest_stays_where_it_is(tmp_path):
    disk, guest = disk_guest(tmp_path, "shared")
    before = sha(disk)
    with guest:
        with migrate_locally(guest, "tcp:127.0.0.1:0",
                             guest_options={"disk_paths": [str(disk)]}) as done:
            assert done.error is None, done.error
            info = done.migration.query()
            assert info["status"] == "completed" and "disk" not in info, info
            assert done.destination.disk_images[0].path == str(disk)
    assert sha(disk) == before
    assert DiskSpec.parse(f"{disk},shared").shared


def test_pymig_qmp_makes_a_checkpoint_whose_argument_is_called_name(tmp_path):
    """``pymig qmp ... name=NAME``: a command argument called ``name`` reaches the server (the
    client's own first parameter is the command's name)."""
    from _control_helpers import Served
    from _migration_helpers import run_pymig
    from pymig.disk import checkpoint_names
    from pymig.session import Session

    disk, guest = disk_guest(tmp_path)
    served = Served(Session(guest), str(tmp_path / "ctl.sock"))
    try:
        done = run_pymig("qmp", "--control", served.path, "block-dirty-bitmap-add",
                         "node=disk0", "name=nightly", "persistent=true")
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        assert checkpoint_names(str(disk)) == ["nightly"]
        done = run_pymig("qmp", "--control", served.path, "query-block")
        assert done.returncode == 0, done.stderr
        assert '"name": "nightly"' in done.stdout
    finally:
        served.close()
