"""Disks in a guest's configuration and the diskcheck workload's definition, without KVM: what
``--disk`` and ``--disk-working-set`` give and refuse, what a destination opens, the parameter
block, and the verifier of diskcheck's invariant on an image."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _ata_helpers import make_image

from pymig.errors import DiskError
from pymig.guest import GuestConfig, make_config
from pymig.guest.kvm_guest import open_disks
from pymig.guest.workloads import (DISK_BLOCK_BYTES, MailboxRecord, diskcheck_block,
                                   diskcheck_words, pack_params, resolve, unpack_params,
                                   verify_diskcheck)

MiB = 1 << 20
KiB = 1 << 10


def test_disks_are_named_by_absolute_path_with_their_size_and_options(tmp_path, monkeypatch):
    make_image(tmp_path / "a.img", 2 * MiB)
    make_image(tmp_path / "b.img", 3 * MiB)
    monkeypatch.chdir(tmp_path)
    config = make_config(memory_bytes=16 * MiB, disks=["a.img,shared", "b.img,readonly"])
    assert config.to_dict()["disks"] == [
        {"path": str(tmp_path / "a.img"), "size_bytes": 2 * MiB, "readonly": False,
         "shared": True},
        {"path": str(tmp_path / "b.img"), "size_bytes": 3 * MiB, "readonly": True,
         "shared": False}]
    again = GuestConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.disks[1].readonly


@pytest.mark.parametrize("options, message", [
    ({"disks": ["missing.img"]}, "missing.img: No such file"),
    ({"disks": ["a.img,rw"]}, "unknown option"),
    ({"disks": ["a.img", "a.img", "a.img"]}, "master and a slave"),
    ({"kind": "simulated", "workload": "diskcheck"}, "only a KVM guest has"),
    ({"workload": "diskcheck"}, "diskcheck needs a disk"),
    ({"workload": "diskcheck", "disks": ["a.img,readonly"]}, "is read-only"),
    ({"workload": "diskcheck", "disks": ["a.img"],
      "params": {"disk_working_set_bytes": 4 * MiB}}, "does not fit on"),
    ({"workload": "diskcheck", "disks": ["a.img"],
      "params": {"disk_working_set_bytes": 6000}}, "multiple of 4096"),
    ({"workload": "diskcheck", "disks": ["a.img"], "vcpus": 2}, "one vCPU"),
])
def test_bad_disk_options_are_clear_errors(tmp_path, monkeypatch, options, message):
    make_image(tmp_path / "a.img", 2 * MiB)
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, DiskError), match=message):
        make_config(**{"memory_bytes": 16 * MiB, **options})


@pytest.mark.parametrize("disk, message", [
    ({"path": "rel.img"}, "absolute path"),
    ({"size_bytes": 1000}, "whole number of sectors"),
    ({"size_bytes": True}, "whole number of sectors"),
    ({"shared": 1}, "booleans"),
    ({"extra": 1}, "exactly"),
])
def test_a_streams_disk_list_is_bounded(disk, message):
    entry = {"path": "/d.img", "size_bytes": MiB, "readonly": False, "shared": True, **disk}
    with pytest.raises(ValueError, match=message):
        GuestConfig.from_dict({"kind": "kvm", "memory_bytes": 16 * MiB, "disks": [entry]})
    with pytest.raises(ValueError, match="more than the 2"):
        GuestConfig.from_dict({"kind": "kvm", "memory_bytes": 16 * MiB,
                               "disks": [dict(entry, path="/d.img", size_bytes=MiB)] * 3})


def test_a_destination_opens_only_shared_disks_it_was_given_of_the_stream_size(tmp_path):
    path = make_image(tmp_path / "d.img", 2 * MiB)
    other = make_image(tmp_path / "other.img", 2 * MiB)
    config = make_config(memory_bytes=16 * MiB, disks=[str(path)])
    # a disk not on shared storage goes only where the operator said (block migration)
    with pytest.raises(DiskError, match="travels with the guest .* --disk disk0=PATH"):
        open_disks(config, incoming=True, allowed=[str(path)])
    shared = make_config(memory_bytes=16 * MiB, disks=[f"{path},shared"])
    for allowed in (None, [], [str(other)]):  # a stream names a file: only the operator's open
        with pytest.raises(DiskError, match=f"opens only the images it is given .*--disk {path}"):
            open_disks(shared, incoming=True, allowed=allowed)
    via_link = tmp_path / "link.img"
    via_link.symlink_to(path)
    images = open_disks(shared, incoming=True, allowed=[str(via_link)])  # the same file
    assert [i.path for i in images] == [str(path)]
    for image in images:
        image.close()
    os.truncate(path, MiB)
    with pytest.raises(DiskError, match="1048576 bytes, the guest's configuration says 2097152"):
        open_disks(shared, incoming=True, allowed=[str(path)])


def test_the_parameter_block_carries_the_disk_working_set():
    config = GuestConfig("kvm", 16 * MiB, workload="diskcheck",
                         params={"disk_working_set_bytes": 256 * KiB})
    block = unpack_params(pack_params(resolve(config), 2_000_000))
    assert (block.workload, block.disk_blocks) == ("diskcheck", 64)


# --- the verifier -------------------------------------------------------------------------------

N = 8  # blocks in the working set


def diskcheck_config() -> GuestConfig:
    return GuestConfig("kvm", 16 * MiB, workload="diskcheck",
                       params={"disk_working_set_bytes": N * DISK_BLOCK_BYTES})


def disk_at(generation_of_block, partial: tuple[int, int, int] | None = None) -> bytearray:
    """A working set whose block b holds ``generation_of_block(b)`` (0: unwritten); ``partial``
    (block, sectors, generation) writes the first sectors of a block at another generation."""
    data = bytearray()
    for b in range(N):
        g = generation_of_block(b)
        data += diskcheck_block(b, g) if g else bytes(DISK_BLOCK_BYTES)
    if partial is not None:
        b, sectors, g = partial
        data[b * DISK_BLOCK_BYTES:b * DISK_BLOCK_BYTES + 512 * sectors] = \
            diskcheck_block(b, g)[:512 * sectors]
    return data


def mailbox(passes, written, errors=0):
    return MailboxRecord(passes=passes, pages_written=written, errors=errors)


def test_the_stamp_is_the_documented_words():
    words = diskcheck_words(9, 1, 5)[0]
    seed = ((9 * 0x9E3779B1) ^ (5 * 0x85EBCA77)) & 0xFFFFFFFF
    assert list(words[:4]) == [0x4B444D50, 9, 0, 5]
    assert all(int(words[i]) == (seed + i * 0x01000193) & 0xFFFFFFFF for i in range(4, 128))
    assert diskcheck_block(1, 5)[:512] == diskcheck_words(8, 1, 5).astype("<u4").tobytes()


@pytest.mark.parametrize("disk, record, passes, half", [
    (disk_at(lambda b: 0), mailbox(0, 0), 0, 0),  # nothing written yet
    (disk_at(lambda b: 1 if b < 3 else 0), mailbox(0, 3), 0, 0),
    (disk_at(lambda b: 1 if b < 3 else 0), mailbox(0, 2), 0, 0),  # not yet counted
    (disk_at(lambda b: 1), mailbox(1, N), 1, 0),
    (disk_at(lambda b: 1), mailbox(0, N), 1, 0),  # before its passes were updated
    (disk_at(lambda b: 3 if b < 5 else 2), mailbox(2, 2 * N + 5), 2, 0),
    (disk_at(lambda b: 3 if b < 5 else 2, partial=(5, 3, 3)), mailbox(2, 2 * N + 5), 2, 1),
    (disk_at(lambda b: 1 if b < 2 else 7), mailbox(0, 2), 0, 0),  # an earlier run's blocks
])
def test_the_verifier_takes_every_state_a_stopped_guest_can_leave(disk, record, passes, half):
    report = verify_diskcheck(bytes(disk), diskcheck_config(), record)
    assert report.ok, report.detail
    assert (report.passes, report.in_progress) == (passes, half)


@pytest.mark.parametrize("disk, record, problem", [
    (disk_at(lambda b: 3 if b < 5 else 2, partial=(6, 1, 3)), mailbox(2, 2 * N + 5),
     "not at pass 3 but sector 48"),
    (disk_at(lambda b: 3 if b != 4 else 1), mailbox(3, 3 * N), "generation 1 where 2 or 3"),
    (disk_at(lambda b: 2), mailbox(2, 2 * N - 3), "mailbox says 13 blocks written"),
    (disk_at(lambda b: 2), mailbox(1, 2 * N), None),  # fine: passes not yet updated
    (disk_at(lambda b: 2), mailbox(0, 2 * N), "mailbox says 0 passes"),
    (disk_at(lambda b: 1), mailbox(1, N, errors=2), "counted 2 error"),
])
def test_the_verifier_finds_what_the_invariant_forbids(disk, record, problem):
    report = verify_diskcheck(bytes(disk), diskcheck_config(), record)
    if problem is None:
        assert report.ok, report.detail
    else:
        assert not report.ok and any(problem in line for line in report.detail), report.detail


def test_a_swapped_or_foreign_sector_is_found(tmp_path):
    disk = disk_at(lambda b: 2)
    a, b = 3 * 512, 4 * 512
    disk[a:a + 512], disk[b:b + 512] = disk[b:b + 512], disk[a:a + 512]
    report = verify_diskcheck(bytes(disk), diskcheck_config(), mailbox(2, 2 * N))
    assert not report.ok and "sector 3 (block 0): not a stamp of this sector" in report.detail
    path = tmp_path / "d.img"
    path.write_bytes(bytes(disk[:DISK_BLOCK_BYTES]))  # an image too short for the set
    assert not verify_diskcheck(path, diskcheck_config()).ok
    word = np.frombuffer(diskcheck_block(0, 1), dtype="<u4")
    assert word[0] == 0x4B444D50


def test_a_destination_puts_a_travelling_disk_where_it_is_told(tmp_path):
    from pymig.block import DiskTarget

    source = make_image(tmp_path / "d.img", 2 * MiB)
    config = make_config(memory_bytes=16 * MiB, disks=[str(source)])
    (tmp_path / "named").mkdir()
    (tmp_path / "dir").mkdir()
    named = tmp_path / "named" / "t.img"
    for images in (open_disks(config, True, targets=[DiskTarget(0, str(named))],
                              target_dir=str(tmp_path / "dir")),  # a named target first
                   open_disks(config, True, target_dir=str(tmp_path / "dir"))):
        for image in images:
            assert image.size_bytes == 2 * MiB
            image.close()
    assert named.exists() and (tmp_path / "dir" / "d.img").exists()
    # a stream's path gives one file name in the directory, never a way out of it
    sneaky = GuestConfig.from_dict(dict(config.to_dict(), disks=[
        dict(config.to_dict()["disks"][0], path=f"{tmp_path}/x/..")]))
    with pytest.raises(DiskError, match=r"has no file name to take in .*--disk disk0=PATH"):
        open_disks(sneaky, True, target_dir=str(tmp_path / "dir"))
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["d.img"]
