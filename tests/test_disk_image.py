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

from pymig.disk import DIRTY_CHUNK_BYTES, DiskImage, DiskSpec
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


# --- writes past the page cache (an incoming block migration's target) ----------------------

def _file_system(path) -> str:
    """The type of the file system ``path`` is on (/proc/self/mounts, longest mount point)."""
    path = os.path.realpath(path)
    best = ("", "")
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, kind = line.split()[:3]
            point = point.replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) \
                    and len(point) > len(best[0]):
                best = (point, kind)
    return best[1]


def _resident_pages(path, offset: int, length: int) -> int:
    """How many pages of ``[offset, offset + length)`` of the file are in the page cache
    (mincore of a mapping of it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ, offset=offset)
    try:
        vec = ctypes.create_string_buffer(-(-length // mmap.PAGESIZE))
        pages = np.frombuffer(mapping, dtype=np.uint8)
        try:
            if libc.mincore(ctypes.c_void_p(pages.ctypes.data), length, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del pages
        return sum(b & 1 for b in vec.raw)
    finally:
        mapping.close()


def _aligned(data: bytes):
    """``data`` in page-aligned memory."""
    import mmap

    buf = mmap.mmap(-1, max(len(data), 1))
    buf[:len(data)] = data
    return buf


def test_writes_through_read_back_equal_however_they_sit_in_memory_and_the_file(tmp_path):
    """Page-aligned data from page-aligned memory goes straight to the storage; data anywhere
    else in memory through an aligned buffer; a head or tail that is not whole pages through
    the page cache.  Whichever way, the image reads back what was written."""
    rng = np.random.default_rng(20)
    model = bytearray(16 * MiB)
    with DiskImage(image(tmp_path, 16 * MiB)) as d:
        direct = d.open_direct()
        cases = [
            (0, _aligned(rng.bytes(MiB))),  # the usual PART: page-aligned both ways
            (MiB, memoryview(bytearray(16) + rng.bytes(MiB))[16:]),  # memory not aligned
            (3 * MiB + 512, rng.bytes(2 * MiB)),  # file offset in a page: head and tail
            (6 * MiB, rng.bytes(4096 * 3 + 512)),  # whole pages, then a sector
            (8 * MiB + 1024, rng.bytes(1024)),  # inside one page
            (16 * MiB - 4096, rng.bytes(4096)),  # the last page
            (10 * MiB, _aligned(rng.bytes(3 * MiB))),  # more than the aligned buffer holds
            (11 * MiB, memoryview(bytearray(8) + rng.bytes(2 * MiB + 4096))[8:]),
        ]
        for offset, data in cases:
            d.write_through(offset, data)
            model[offset:offset + len(data)] = data
        assert d.pread(0, 16 * MiB) == bytes(model)
        if direct:
            # only the whole aligned pages went past the cache
            assert 0 < d.direct_bytes <= sum(len(c[1]) for c in cases)
        d.close_direct()
        d.write_through(0, b"after")  # through the cache once closed
        model[0:5] = b"after"
        assert d.pread(0, 16 * MiB) == bytes(model)
    with open(tmp_path / "d.img", "rb") as f:  # and so does the file, from another descriptor
        assert f.read() == bytes(model)


def test_written_through_data_stays_out_of_the_page_cache(tmp_path):
    """The target of an incoming disk is written past the host's page cache (tmpfs has only
    the page cache, so this holds on other file systems)."""
    if _file_system(tmp_path) in ("tmpfs", "ramfs", ""):
        pytest.skip(f"{tmp_path} is on {_file_system(tmp_path) or 'an unknown'} file system")
    path = image(tmp_path, 8 * MiB)
    with DiskImage(path) as d:
        if not d.open_direct():
            pytest.skip(f"{_file_system(tmp_path)} refuses O_DIRECT")
        d.write_through(0, _aligned(os.urandom(4 * MiB)))
        d.pwrite(4 * MiB, os.urandom(4 * MiB))  # the guest's path: through the cache
        d.flush()
    assert _resident_pages(path, 0, 4 * MiB) == 0  # past the cache
    assert _resident_pages(path, 4 * MiB, 4 * MiB) > 0  # (the measure sees the cache)


def test_a_file_system_that_refuses_a_direct_write_gets_it_through_the_cache(tmp_path,
                                                                             monkeypatch):
    with DiskImage(image(tmp_path)) as d:
        d.start_dirty_log()
        if not d.open_direct():
            pytest.skip("no O_DIRECT here")
        real = os.pwrite
        refused = []

        def refuse_direct(fd, data, offset):
            if fd != d.fd:
                refused.append(offset)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", refuse_direct)
        data = os.urandom(2 * MiB)
        d.write_through(MiB, _aligned(data))
        d.write_through(0, _aligned(data[:MiB]))  # no second try: direct is off now
        assert refused == [MiB] and d.direct_bytes == 0
        assert d.pread(MiB, 2 * MiB) == data and d.pread(0, MiB) == data[:MiB]
        assert int(d.sync_dirty()[0]) == 0b111  # logged like any write


def test_a_short_direct_write_has_its_rest_written_through_the_cache(tmp_path, monkeypatch):
    with DiskImage(image(tmp_path)) as d:
        if not d.open_direct():
            pytest.skip("no O_DIRECT here")
        real = os.pwrite
        sizes = []

        def short_direct(fd, data, offset):
            sizes.append((fd == d.fd, len(data)))
            if fd != d.fd:
                return real(fd, data[:4096 + 512], offset)  # not whole pages
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", short_direct)
        data = os.urandom(MiB)
        d.write_through(0, _aligned(data))
        monkeypatch.setattr(os, "pwrite", real)
        assert d.pread(0, MiB) == data
        assert sizes == [(False, MiB), (True, MiB - 4096 - 512)], sizes


def test_a_failing_direct_write_raises_and_is_marked(tmp_path, monkeypatch):
    with DiskImage(image(tmp_path)) as d:
        d.start_dirty_log()
        if not d.open_direct():
            pytest.skip("no O_DIRECT here")
        real = os.pwrite

        def no_space(fd, data, offset):
            if fd != d.fd:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", no_space)
        with pytest.raises(OSError) as info:
            d.write_through(2 * MiB, _aligned(b"a" * 8192))
        assert info.value.errno == errno.ENOSPC
        assert int(d.sync_dirty()[0]) == 1 << 2
