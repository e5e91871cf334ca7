"""Disks under KVM: real guest code drives the ATA channel through its ports.  A BIOS-era boot
sector writes, reads back and prints sectors (and, where QEMU is installed, leaves the same
bytes in its image under QEMU); string I/O arrives in one exit; the diskcheck workload runs
passes without errors, catches a sector changed behind its back, sees image failures as disk
errors; a disk that is not shared blocks migration, a shared one migrates with its guest, in
the middle of a PIO transfer too, in one process and between two."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import time

import pytest
from _ata_helpers import BOOT_DISK_MESSAGE, BOOT_SECTOR_DISK, boot_disk_pattern, \
    diskcheck_runs_clean_behind, file_bytes, make_image
from _kvm_helpers import build_image
from _migration_helpers import migrate_locally, pymig_process, run_pymig, start_destination, \
    wait_for, wait_for_path

from pymig.errors import MigrationError
from pymig.guest import create, make_config
from pymig.guest.workloads import DISK_BLOCK_BYTES, diskcheck_block, verify_diskcheck
from pymig.kvm import ata
from pymig.machine import Machine
from pymig.migration import Migration
from pymig.qmp import QmpClient

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(240)]

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("boot"), "disk-boot", BOOT_SECTOR_DISK, 0x7C00)


def record_port_calls(channel: ata.AtaChannel) -> dict[str, list]:
    """Wrap the channel's port methods to record what reaches them from the vCPU."""
    calls: dict[str, list] = {"read": [], "write": [], "read_string": [], "write_string": []}

    def wrap(name):
        real = getattr(channel, name)

        def recorded(port, size, *rest):
            count = {"read_string": lambda: rest[0],
                     "write_string": lambda: len(rest[0]) // size}.get(name, lambda: 1)()
            calls[name].append((port, size, count))
            return real(port, size, *rest)

        setattr(channel, name, recorded)

    for name in calls:
        wrap(name)
    return calls


def test_a_boot_sector_writes_and_reads_its_disk_through_the_ports(tmp_path, boot):
    path, image = boot
    disk = make_image(tmp_path / "d.img", MiB, image)  # the boot sector at LBA 0, as on a PC
    config = make_config(memory_bytes=16 * MiB, boot_sector=path, disks=[str(disk)])
    with create(config) as guest:
        calls = record_port_calls(guest.ata)
        guest.start()
        assert guest.wait(60) == "shutdown"
        output = guest.console.data()
        assert guest.exit_code == 0, output
    assert b"PYMIG HARDDISK" in output
    assert output.endswith(BOOT_DISK_MESSAGE)  # printed from what the disk gave back
    assert file_bytes(disk, 0, 3) == image + image + boot_disk_pattern()
    # Each REP INSW of 256 words (IDENTIFY, then a sector at a time) reached the device in one
    # exit and one call; no word of it went through the single-item path.
    reads = [c for c in calls["read_string"] if c[0] == ata.CMD_BASE]
    assert reads == [(ata.CMD_BASE, 2, 256)] * 3, reads
    assert not [c for c in calls["read"] if c[0] == ata.CMD_BASE]
    # KVM's emulator hands REP OUTS over one item per exit: all 512 words arrive either way
    out = [c for c in calls["write"] + calls["write_string"] if c[0] == ata.CMD_BASE]
    assert sum(c[2] for c in out) == 512


def test_a_readonly_disk_fails_the_boot_sectors_write(tmp_path, boot):
    path, image = boot
    disk = make_image(tmp_path / "ro.img", MiB, image)
    config = make_config(memory_bytes=16 * MiB, boot_sector=path,
                         disks=[f"{disk},readonly"])
    with create(config) as guest:
        guest.start()
        assert guest.wait(60) == "shutdown"
        assert guest.exit_code == 1 and guest.console.data().endswith(b"!")
        assert guest.ata.drives[0].state.error == ata.ABRT
    assert file_bytes(disk, 1, 2) == bytes(1024)


def test_qemu_leaves_the_same_bytes_in_its_image(tmp_path, boot):
    """The cross-check: the same boot sector and starting image under QEMU's IDE disk.  CI has
    no QEMU; the device's behaviour is covered without it by the tests above and by
    test_ata_device.py."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    path, image = boot
    ours = make_image(tmp_path / "pymig.img", MiB, image)
    theirs = make_image(tmp_path / "qemu.img", MiB, image)
    config = make_config(memory_bytes=16 * MiB, boot_sector=path, disks=[str(ours)])
    with create(config) as guest:
        guest.start()
        assert guest.wait(60) == "shutdown" and guest.exit_code == 0
    serial = tmp_path / "qemu-serial.txt"
    done = subprocess.run(
        [qemu, "-accel", "kvm", "-accel", "tcg", "-m", "64", "-display", "none",
         "-no-reboot", "-drive", f"file={theirs},format=raw,if=ide",
         "-serial", f"file:{serial}", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr  # isa-debug-exit: (0 << 1) | 1
    assert serial.read_bytes().endswith(BOOT_DISK_MESSAGE)
    assert b"QEMU HARDDISK" in serial.read_bytes()
    assert ours.read_bytes() == theirs.read_bytes()


# --- diskcheck --------------------------------------------------------------------------------

def diskcheck_guest(tmp_path, working_set=64 * KiB, disk_options="", size=4 * MiB):
    disk = make_image(tmp_path / "dc.img", size)
    config = make_config(memory_bytes=16 * MiB, workload="diskcheck",
                         params={"disk_working_set_bytes": working_set},
                         disks=[f"{disk}{disk_options}"])
    return disk, config, create(config)


def test_diskcheck_runs_passes_without_errors_and_its_image_verifies(tmp_path):
    disk, config, guest = diskcheck_guest(tmp_path)
    with guest:
        guest.start()
        rng = random.Random(20)
        checked = 0
        while guest.progress()["passes"] < 4:  # every command form at least once
            time.sleep(rng.uniform(0.01, 0.3))
            guest.pause()  # anywhere: between commands, inside a PIO transfer...
            report = verify_diskcheck(disk, config, guest.mailbox()[0])
            assert report.ok, report.detail
            checked += 1
            guest.resume()
        guest.pause()
        report = verify_diskcheck(disk, config, guest.mailbox()[0])
        assert report.ok and report.errors == 0 and report.passes >= 4, report.detail
        assert guest.progress()["result"] == 0  # no command failed
        passes = [arg for _, code, arg in guest.events if code == 1]
        assert passes[:4] == [1, 2, 3, 4]
    assert checked >= 3


def test_diskcheck_catches_a_sector_changed_behind_its_back(tmp_path):
    disk, config, guest = diskcheck_guest(tmp_path)
    with guest:
        guest.start()
        wait_for(lambda: guest.progress()["passes"] >= 1, what="a pass")
        guest.pause()
        block = 9
        with open(disk, "r+b") as f:  # a sector of block 9 now says another generation
            f.seek(block * DISK_BLOCK_BYTES + 512)
            f.write(diskcheck_block(block, 77)[512:1024])
        assert not verify_diskcheck(disk, config).ok
        guest.resume()
        wait_for(lambda: guest.progress()["errors"] >= 1, what="the guest to notice")
        guest.pause()
        assert (0, 3, block) in guest.events  # event 3 (error), argument: the block
        assert guest.progress()["result"] == 0  # a data error, not a failed command


def test_diskcheck_sees_image_failures_as_disk_errors_and_carries_on(tmp_path, caplog):
    disk, config, guest = diskcheck_guest(tmp_path)
    with guest:
        image = guest.ata.drives[0].image
        real = image.pwrite

        def full(offset, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        guest.start()
        wait_for(lambda: guest.progress()["passes"] >= 1, what="a pass")
        image.pwrite = full
        wait_for(lambda: guest.progress()["result"] >= 3, what="failed writes")
        image.pwrite = real
        failed = guest.progress()["result"]
        passes = guest.progress()["passes"]
        wait_for(lambda: guest.progress()["passes"] >= passes + 2, what="passes again")
        guest.pause()
        assert guest.progress()["result"] <= failed + 1  # no more failures once it has room
    event = guest.disk_errors[0]
    assert (event.operation, event.nospace, event.path) == ("write", True, str(disk))
    assert "No space left on device" in caplog.text and str(disk) in caplog.text


# --- migration --------------------------------------------------------------------------------

def test_a_disk_that_is_not_shared_blocks_migration(tmp_path):
    disk, config, guest = diskcheck_guest(tmp_path)
    with guest:
        guest.start()
        migration = Migration(Machine.source(guest))
        with pytest.raises(MigrationError, match="not on shared storage") as info:
            migration.start(f"file:{tmp_path / 'snap.pymig'}")
        assert str(disk) in str(info.value) and ",shared" in str(info.value)
        assert guest.status == "running"


def test_pymig_migrate_says_why_a_guest_with_an_unshared_disk_stays(tmp_path):
    disk = make_image(tmp_path / "own.img", MiB)
    ctl = str(tmp_path / "src.sock")
    source = pymig_process("run", "--workload", "diskcheck", "--memory", "16M", "--disk",
                           str(disk), "--disk-working-set", "64K", "--control", ctl, "--quiet",
                           stderr=subprocess.PIPE)
    try:
        wait_for_path(ctl, source)
        done = run_pymig("migrate", "--control", ctl, f"unix:{tmp_path / 'never.sock'}")
        assert done.returncode != 0
        assert f"disk 0 ({disk}) is not on shared storage" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        with QmpClient(ctl) as client:
            assert client.command("query-status")["status"] == "running"
    finally:
        source.kill()
        source.wait(30)


def test_a_destination_refuses_an_image_of_another_size(tmp_path):
    disk, config, guest = diskcheck_guest(tmp_path, disk_options=",shared")
    guest.close()
    os.truncate(disk, 8 * MiB)
    from pymig.errors import DiskError

    with pytest.raises(DiskError, match="8388608 bytes, the guest's configuration says 4194304"):
        create(config, incoming=True, disk_paths=[str(disk)])


def pause_inside_a_transfer(guest, direction: int, tries: int = 5000) -> ata.IdeDriveState:
    """Pause the guest at a moment a PIO transfer of ``direction`` is in flight: a write with
    some of its DRQ block moved, a read with its block waiting in the device (a REP INSD moves
    a sector in one exit, so a read is seldom caught part-way)."""
    for _ in range(tries):
        guest.pause()
        state = guest.ata.drives[0].state
        if state.xfer == direction and (state.pos or direction == ata.XFER_IN):
            return state
        guest.resume()
        time.sleep(random.uniform(0, 0.004))
    raise AssertionError("never caught a transfer in flight")


@pytest.mark.parametrize("direction", [ata.XFER_OUT, ata.XFER_IN], ids=["write", "read"])
def test_a_migration_in_the_middle_of_a_pio_transfer_resumes_it(tmp_path, direction):
    disk, config, guest = diskcheck_guest(tmp_path, disk_options=",shared")
    with guest:
        guest.start()
        wait_for(lambda: guest.progress()["passes"] >= 1, what="a pass")
        state = pause_inside_a_transfer(guest, direction)
        assert state.status & ata.DRQ and state.pos < len(state.buffer)
        in_flight = guest.ata.save()["ide-drive0"]
        with migrate_locally(guest, f"unix:{tmp_path / 'mig.sock'}",
                             guest_options={"disk_paths": [str(disk)]}) as done:
            assert done.error is None, done.error
            dest = done.destination
            passes = dest.progress()["passes"]
            wait_for(lambda: dest.progress()["passes"] >= passes + 2, timeout=120,
                     what="two more passes at the destination")
            dest.pause()
            report = verify_diskcheck(disk, config, dest.mailbox()[0])
            assert report.ok and report.errors == 0, report.detail
            assert dest.progress()["result"] == 0
    assert in_flight.command in ata.DATA_COMMANDS


def test_diskcheck_migrates_between_processes_with_a_shared_disk(tmp_path):
    disk = make_image(tmp_path / "shared.img", 4 * MiB)
    src_ctl = str(tmp_path / "src.sock")
    source = pymig_process("run", "--workload", "diskcheck", "--memory", "32M", "--disk",
                           f"{disk},shared", "--disk-working-set", "128K", "--control", src_ctl,
                           "--quiet", stderr=subprocess.PIPE)
    dest = None
    try:
        wait_for_path(src_ctl, source)
        with QmpClient(src_ctl) as client:
            wait_for(lambda: client.command("query-guest")["progress"]["passes"] >= 1,
                     timeout=60, what="a pass at the source")
        # a destination that was not given the image refuses the stream, and the source runs on
        (tmp_path / "refusing").mkdir()
        refusing, _, bound = start_destination(tmp_path / "refusing")
        done = run_pymig("migrate", "--control", src_ctl, bound, "--json")
        assert done.returncode != 0
        said = json.loads(done.stdout.splitlines()[-1])["error-desc"]
        assert f"opens only the images it is given (pymig incoming --disk {disk})" in said, said
        refusing.wait(30)
        with QmpClient(src_ctl) as client:
            assert client.command("query-status")["status"] == "running"
        dest, dst_ctl, bound = start_destination(tmp_path, "tcp:127.0.0.1:0", "--disk",
                                                 str(disk))
        done = run_pymig("migrate", "--control", src_ctl, bound, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        diskcheck_runs_clean_behind(dst_ctl)
    finally:
        for proc in (source, dest):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait(30)


def test_a_snapshot_of_a_guest_with_a_disk_analyses_its_ata_state(tmp_path):
    from pymig.analyze import analyze
    from pymig.transport import BytesChannel

    disk, config, guest = diskcheck_guest(tmp_path, disk_options=",shared")
    path = tmp_path / "disk.pymig"
    with guest:
        guest.start()
        wait_for(lambda: guest.progress()["pages_written"] >= 1, what="a block written")
        migration = Migration(Machine.source(guest))
        migration.start(f"file:{path}")
        assert migration.wait(60).value == "completed", migration.query()
    result = analyze(BytesChannel(path.read_bytes()))
    assert result.ok and result.complete, result.problems
    assert result.config["disks"] == config.to_dict()["disks"]
    assert result.state["ide/0"]["unit"] == 0
    drive = result.state["ide-drive/0"]
    assert drive["mult_sectors"] == 8 and drive["status"] & ata.DRDY  # diskcheck set it up
