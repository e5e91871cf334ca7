"""DiskImage: the one object through which a guest's disk (and, later, block migration) reads
and writes an image file: sizes and refusals, positioned I/O, holes, and the dirty-chunk log."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pymig.disk import DIRTY_CHUNK_BYTES, SECTOR_BYTES, DiskImage, DiskSpec
from pymig.errors import DiskError

MiB = 1 << 20


def image(tmp_path, size=4 * MiB, name="d.img"):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_the_size_is_the_files_in_sectors(tmp_path):
    with DiskImage(image(tmp_path, 3 * MiB)) as d:
        assert (d.size_bytes, d.sectors, d.readonly) == (3 * MiB, 3 * MiB // 512, False)


@pytest.mark.parametrize("make,reason", [
    (lambda p: None, "No such file"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(b"x" * 1000), "not a whole number of 512-byte sectors"),
    (lambda p: p.mkdir(), "Is a directory"),
])
def test_an_image_that_cannot_be_a_disk_is_refused_with_the_reason(tmp_path, make, reason):
    path = tmp_path / "bad.img"
    make(path)
    with pytest.raises(DiskError, match=reason) as info:
        DiskImage(path)
    assert str(path) in str(info.value)


def test_positioned_reads_and_writes(tmp_path):
    with DiskImage(image(tmp_path)) as d:
        d.pwrite(1000, b"hello")
        assert d.pread(998, 9) == b"\0\0hello\0\0"
        d.pwrite(d.size_bytes - 3, b"end")
        assert d.pread(d.size_bytes - 3, 3) == b"end"
        for offset, length in ((d.size_bytes - 2, 3), (-1, 1)):
            with pytest.raises(ValueError, match="outside"):
                d.pread(offset, length)
            with pytest.raises(ValueError, match="outside"):
                d.pwrite(offset, b"x" * length)


def test_readonly_opens_the_file_readonly(tmp_path):
    import fcntl

    with DiskImage(image(tmp_path), readonly=True) as d:
        assert fcntl.fcntl(d.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(OSError) as info:
            d.pwrite(0, b"x")
        assert info.value.errno == errno.EROFS
        d.flush()


def test_a_read_past_where_the_file_now_ends_says_it_shrank(tmp_path):
    path = image(tmp_path)
    with DiskImage(path) as d:
        os.truncate(path, MiB)
        with pytest.raises(OSError, match="shrank") as info:
            d.pread(2 * MiB, 512)
        assert info.value.errno == errno.EIO
        assert d.pread(0, 512) == bytes(512)


def test_data_extents_skip_holes_and_write_zeroes_punches_one(tmp_path):
    path = image(tmp_path, 16 * MiB)
    with DiskImage(path) as d:
        d.pwrite(3 * MiB, b"\1" * MiB)
        d.pwrite(10 * MiB, b"\2" * 4096)
        extents = list(d.data_extents())
        covered = [(o, o + n) for o, n in extents]
        # whatever the file system's granularity, the data is inside the extents and most of
        # the 16 MiB is not
        assert any(a <= 3 * MiB and 4 * MiB <= b for a, b in covered)
        assert any(a <= 10 * MiB and 10 * MiB + 4096 <= b for a, b in covered)
        assert sum(b - a for a, b in covered) < 8 * MiB
        assert list(d.data_extents(5 * MiB, 9 * MiB)) == []
        blocks = os.fstat(d.fd).st_blocks
        d.write_zeroes(3 * MiB, MiB)
        assert d.pread(3 * MiB, MiB) == bytes(MiB)
        assert os.fstat(d.fd).st_blocks < blocks  # a hole now, not written zeroes
        assert os.fstat(d.fd).st_size == 16 * MiB


def test_the_dirty_log_names_the_chunks_written_since_the_last_sync(tmp_path):
    with DiskImage(image(tmp_path, 200 * MiB)) as d:
        d.pwrite(0, b"before")  # not logged: logging is off
        with pytest.raises(ValueError, match="off"):
            d.sync_dirty()
        d.start_dirty_log()
        assert d.dirty_chunk_bytes == DIRTY_CHUNK_BYTES and d.chunks == 200
        d.pwrite(5 * MiB + 10, b"x")
        d.pwrite(70 * MiB - 1, b"yy")  # across chunks 69 and 70
        d.write_zeroes(199 * MiB, 512)
        bits = d.sync_dirty()
        assert bits.dtype == np.uint64 and bits.size == 4
        marked = [i for i in range(200) if int(bits[i >> 6]) >> (i & 63) & 1]
        assert marked == [5, 69, 70, 199]
        assert not d.sync_dirty().any()  # a sync takes what it returns
        d.pwrite(MiB, b"z")
        d.stop_dirty_log()
        d.start_dirty_log(chunk_bytes=4096)  # a fresh log
        assert not d.sync_dirty().any() and d.chunks == 200 * MiB // 4096


def test_a_write_that_fails_part_way_is_still_marked(tmp_path, monkeypatch):
    """Some of its bytes may be in the file: a reader of the log must look at the chunk."""
    with DiskImage(image(tmp_path)) as d:
        d.start_dirty_log()
        real = os.pwrite
        calls = []

        def short_then_fail(fd, data, offset):
            calls.append(offset)
            if len(calls) == 1:
                return real(fd, bytes(data[:100]), offset)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", short_then_fail)
        with pytest.raises(OSError):
            d.pwrite(2 * MiB, b"a" * 4096)
        assert calls == [2 * MiB, 2 * MiB + 100]  # the rest was retried where it stopped
        assert int(d.sync_dirty()[0]) == 1 << 2


def test_disk_spec_parses_the_command_lines_options():
    assert DiskSpec.parse("d.img") == DiskSpec("d.img")
    assert DiskSpec.parse("/x/d.img,readonly") == DiskSpec("/x/d.img", readonly=True)
    assert DiskSpec.parse("d.img,shared,readonly") == DiskSpec("d.img", True, True)
    for bad, why in ((",shared", "no image path"), ("d.img,rw", "unknown option")):
        with pytest.raises(ValueError, match=why):
            DiskSpec.parse(bad)


ENOSPC_CHILD = r"""
import errno, os, sys
from _ata_helpers import Driver
from pymig.disk import DiskImage
from pymig.kvm import ata
path = sys.argv[1]
with open(path, "wb") as f:
    f.truncate(64 << 20)  # a sparse 64 MiB image on a 1 MiB file system
with DiskImage(path) as d:
    d.pwrite(0, b"\1" * (512 << 10))
    try:
        for i in range(1, 64):
            d.pwrite(i << 20, b"\2" * (1 << 20))
    except OSError as exc:
        print("errno", exc.errno)
events = []
channel = ata.AtaChannel([DiskImage(path)], on_error=events.append)
drv = Driver(channel)
for lba in range(4096, 8192, 16):  # WRITE MULTIPLE of 8 KiB until the file system is full
    drv.lba28(lba, 16)
    drv.command(ata.WRITE_MULTIPLE)
    drv.write_items(bytes(range(256)) * 32, 4)
    if drv.status() & ata.ERR:
        print("status", hex(drv.status()), "error", hex(drv.error()),
              "nospace", events[-1].nospace, "at", lba == events[-1].lba)
        break
"""


def test_a_real_full_file_system_fails_the_write_with_enospc(tmp_path):
    """A 1 MiB tmpfs in a private mount namespace (nothing outside this test sees it): the
    image's write fails with ENOSPC, and a guest's WRITE MULTIPLE there ends with DF, ERR and
    ABRT."""
    from _childenv import child_env

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux unshare is not installed")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && "
              f"exec {sys.executable} -c '{ENOSPC_CHILD}' {mnt}/d.img")
    done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60, env=child_env())
    if done.returncode != 0 and "Operation not permitted" in done.stderr:
        pytest.skip(f"no private mount namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"errno {errno.ENOSPC}" in done.stdout
    assert "status 0x61 error 0x4 nospace True at True" in done.stdout, done.stdout
    assert "No space left on device" in done.stderr  # the operator's line
