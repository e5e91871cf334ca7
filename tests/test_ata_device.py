"""The ATA channel as a guest's driver sees it through the ports, without KVM: IDENTIFY, the
read and write commands in their 28-bit, 48-bit and multiple forms, 16- and 32-bit PIO item
by item or as one string instruction, the error bits the standard gives (IDNF, ABRT, UNC, DF),
failures of the image file, reset, and the state of a command in flight saved and loaded."""

from __future__ import annotations

import errno
import logging
import os

import pytest
from _ata_helpers import Driver, accmode, channel, close, file_bytes, make_image, pattern

from pymig import vmstate
from pymig.disk import SECTOR_BYTES, DiskImage
from pymig.errors import StateError
from pymig.guest.base import StateShape
from pymig.kvm import ata
from pymig.kvm.statedesc import IDE_BUS, IDE_DRIVE

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path):
    return make_image(tmp_path / "d.img", 4 * MiB)


@pytest.fixture
def drv(disk):
    ch = channel(disk)
    yield Driver(ch)
    close(ch)


def words_text(words: list[int], first: int, count: int) -> str:
    raw = b"".join(w.to_bytes(2, "big") for w in words[first:first + count])
    return raw.decode("ascii").rstrip()


# --- IDENTIFY ---------------------------------------------------------------------------------

def test_identify_describes_the_disk(drv):
    status = drv.status()
    assert status == ata.DRDY | ata.DSC and not status & ata.DRQ
    w = drv.identify()
    sectors = 4 * MiB // SECTOR_BYTES
    assert w[0] == 0x0040  # fixed ATA device
    assert (w[1], w[3], w[6]) == (max(1, sectors // (16 * 63)), 16, 63)
    assert w[47] == 0x8000 | 16  # READ/WRITE MULTIPLE, up to 16 sectors per block
    assert w[59] == 0x0100 | 16  # multiple mode valid, 16 after power-on
    assert w[49] & (1 << 9)  # LBA
    assert w[60] | w[61] << 16 == sectors  # LBA28 capacity
    assert w[83] & (1 << 10) and w[86] & (1 << 10)  # LBA48 supported and enabled
    assert w[83] & (1 << 12) and w[83] & (1 << 13)  # FLUSH CACHE, FLUSH CACHE EXT
    assert sum(w[100 + i] << (16 * i) for i in range(4)) == sectors  # LBA48 capacity
    assert words_text(w, 27, 20) == "PYMIG HARDDISK"
    assert words_text(w, 23, 4) == "PMIG1"
    assert words_text(w, 10, 10).startswith("PMIG")
    raw = b"".join(x.to_bytes(2, "little") for x in w)
    assert raw[510] == 0xA5 and sum(raw) % 256 == 0  # word 255: signature and checksum
    assert not drv.status() & ata.DRQ  # all 512 bytes read: the command is over


def test_identify_caps_lba28_capacity_and_reports_lba48(tmp_path):
    huge = make_image(tmp_path / "huge.img", 200 << 30)  # sparse: 200 GiB > 2**28 sectors
    ch = channel(huge)
    try:
        w = Driver(ch).identify()
    finally:
        close(ch)
    assert w[60] | w[61] << 16 == 0x0FFFFFFF
    assert sum(w[100 + i] << (16 * i) for i in range(4)) == (200 << 30) // SECTOR_BYTES
    assert w[1] == 16383


def test_set_multiple_mode_takes_powers_of_two_up_to_16_and_shows_in_word_59(drv):
    for count in (3, 32, 17):
        drv.out(2, count)
        assert drv.command(ata.SET_MULTIPLE) == ata.DRDY | ata.ERR and drv.error() == ata.ABRT
    drv.out(2, 8)
    assert drv.command(ata.SET_MULTIPLE) == ata.DRDY | ata.DSC
    assert drv.identify()[59] == 0x0100 | 8
    drv.out(2, 0)
    assert drv.command(ata.SET_MULTIPLE) == ata.DRDY | ata.DSC
    assert drv.identify()[59] == 0  # multiple mode off
    drv.lba28(0, 4)
    assert drv.command(ata.READ_MULTIPLE) == ata.DRDY | ata.ERR and drv.error() == ata.ABRT


# --- reads and writes -------------------------------------------------------------------------

@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("string", [False, True], ids=["item-by-item", "string"])
def test_write_then_read_sectors_with_16_and_32_bit_transfers(drv, disk, size, string):
    data = pattern(7, 3)
    status = drv.write_sectors(7, data, size=size, string=string)
    assert status == ata.DRDY | ata.DSC  # done, nothing left to move
    assert file_bytes(disk, 7, 3) == data
    assert drv.read_sectors(7, 3, size=size, string=string) == data
    assert drv.status() == ata.DRDY | ata.DSC
    # the task file moved on as the command did: next sector 10, nothing left
    assert (drv.reg(3), drv.reg(4), drv.reg(5), drv.reg(2)) == (10, 0, 0, 0)


def test_a_write_is_in_the_file_before_the_status_says_done(drv, disk):
    """Each sector goes to the image before DRQ asks for the next one (or DRDY ends it)."""
    drv.lba28(100, 2)
    drv.command(ata.WRITE_SECTORS)
    first, second = pattern(100), pattern(101)
    drv.write_items(first, 4)
    assert drv.status() & ata.DRQ and file_bytes(disk, 100, 1) == first
    drv.write_items(second, 4)
    assert drv.status() == ata.DRDY | ata.DSC and file_bytes(disk, 101, 1) == second


def test_lba48_commands_reach_sectors_beyond_28_bits(tmp_path):
    huge = make_image(tmp_path / "huge.img", 200 << 30)
    lba = (1 << 28) + 12345
    ch = channel(huge)
    d = Driver(ch)
    try:
        data = pattern(lba, 2)
        assert d.write_sectors(lba, data, command=ata.WRITE_SECTORS_EXT, size=4) == \
            ata.DRDY | ata.DSC
        assert file_bytes(huge, lba, 2) == data
        assert d.read_sectors(lba, 2, command=ata.READ_SECTORS_EXT) == data
        # HOB: with the device control register's bit 7 set the high bytes read back
        d.ch.write(ata.CTL_PORT, 1, ata.HOB)
        end = lba + 2
        assert (d.reg(3), d.reg(4), d.reg(5)) == ((end >> 24) & 0xFF, (end >> 32) & 0xFF,
                                                  (end >> 40) & 0xFF)
        d.ch.write(ata.CTL_PORT, 1, 0)
        assert (d.reg(3), d.reg(4), d.reg(5)) == (end & 0xFF, (end >> 8) & 0xFF,
                                                  (end >> 16) & 0xFF)
    finally:
        close(ch)


def test_read_and_write_multiple_move_blocks_of_the_multiple_setting(drv, disk):
    drv.out(2, 4)
    drv.command(ata.SET_MULTIPLE)
    data = pattern(40, 10)
    drv.lba28(40, 10)
    assert drv.command(ata.WRITE_MULTIPLE) & ata.DRQ
    drv.write_items(data[:4 * SECTOR_BYTES - 2], 2)
    assert file_bytes(disk, 40, 1) == bytes(SECTOR_BYTES)  # a block is written whole
    drv.write_items(data[4 * SECTOR_BYTES - 2:4 * SECTOR_BYTES], 2)
    assert file_bytes(disk, 40, 4) == data[:4 * SECTOR_BYTES]
    drv.write_items(data[4 * SECTOR_BYTES:], 4)  # 4 + 2 sectors: the last block is short
    assert drv.status() == ata.DRDY | ata.DSC
    assert file_bytes(disk, 40, 10) == data
    assert drv.read_sectors(40, 10, command=ata.READ_MULTIPLE, size=4) == data


def test_one_string_call_moves_many_blocks(drv, disk):
    """A rep insd of 1024 items crosses DRQ blocks within one call, as KVM hands it over."""
    data = pattern(0, 16)
    with open(disk, "r+b") as f:
        f.write(data)
    drv.out(2, 2)
    drv.command(ata.SET_MULTIPLE)
    drv.lba28(0, 16)
    drv.command(ata.READ_MULTIPLE)
    got = drv.ch.read_string(ata.CMD_BASE, 4, 1024)  # 4 KiB: 4 blocks of 2 sectors
    assert got == data[:4096]
    assert drv.status() & ata.DRQ
    assert drv.ch.read_string(ata.CMD_BASE, 4, 1024) == data[4096:]
    assert drv.status() == ata.DRDY | ata.DSC
    # past the end of the transfer: zeroes, nothing moves
    assert drv.ch.read_string(ata.CMD_BASE, 2, 8) == bytes(16)


@pytest.mark.parametrize("string", [False, True], ids=["item", "string"])
def test_a_32_bit_item_across_two_drq_blocks_takes_half_from_each(drv, disk, string):
    """As a 32-bit access would on a 16-bit bus: two cycles, one each side of the boundary."""
    data = pattern(30, 2)
    with open(disk, "r+b") as f:
        f.seek(30 * SECTOR_BYTES)
        f.write(data)
    drv.lba28(30, 2)
    drv.command(ata.READ_SECTORS)
    got = drv.read_items(2, 255, string) + drv.read_items(4, 1, string)
    got += drv.read_items(2, 255, string)
    assert got == data and drv.status() == ata.DRDY | ata.DSC
    fresh = pattern(60, 2, salt=1)
    drv.lba28(60, 2)
    drv.command(ata.WRITE_SECTORS)
    drv.write_items(fresh[:510], 2, string)
    drv.write_items(fresh[510:514], 4, string)
    assert file_bytes(disk, 60, 1) == fresh[:512]
    drv.write_items(fresh[514:], 2, string)
    assert file_bytes(disk, 60, 2) == fresh and drv.status() == ata.DRDY | ata.DSC


def test_a_count_of_zero_means_256_sectors(drv, disk):
    data = pattern(300, 256)
    drv.write_sectors(300, data, size=4)  # count register 0
    assert file_bytes(disk, 300, 256) == data


def test_chs_addresses_map_through_16_heads_of_63_sectors(drv, disk):
    cylinder, head, sector = 1, 2, 5
    lba = (cylinder * 16 + head) * 63 + sector - 1
    drv.select(lba=False, head=head)
    drv.out(2, 1)
    drv.out(3, sector)
    drv.out(4, cylinder)
    drv.out(5, 0)
    assert drv.command(ata.WRITE_SECTORS) & ata.DRQ
    drv.write_items(pattern(lba), 2)
    assert file_bytes(disk, lba, 1) == pattern(lba)
    drv.out(3, 0)  # sector 0 does not exist
    assert drv.command(ata.READ_SECTORS) == ata.DRDY | ata.ERR and drv.error() == ata.IDNF


@pytest.mark.parametrize("sectors", [1, 62, 128, 1007, 1008, 16383 * 1008 + 5])
def test_every_chs_address_identify_describes_is_on_the_disk(sectors):
    cylinders, heads, spt = ata.geometry(sectors)
    assert 1 <= cylinders * heads * spt <= sectors
    assert heads <= 16 and spt <= 63 and cylinders <= 16383


def test_flush_cache_syncs_the_image(drv, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    for command in (ata.FLUSH_CACHE, ata.FLUSH_CACHE_EXT):
        assert drv.command(command) == ata.DRDY | ata.DSC
    assert calls == [drv.ch.drives[0].image.fd] * 2


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("lba,count", [(8192, 1), (8190, 3), (0x0FFFFFFF, 1)])
def test_a_command_past_the_end_of_the_disk_is_idnf_with_no_data_phase(drv, disk, lba, count):
    before = disk.read_bytes()
    for command in (ata.READ_SECTORS, ata.WRITE_SECTORS, 0x40):  # read, write, verify
        drv.lba28(lba, count)
        assert drv.command(command) == ata.DRDY | ata.ERR
        assert drv.error() == ata.IDNF
    drv.lba48(1 << 40, 1)
    assert drv.command(ata.READ_SECTORS_EXT) == ata.DRDY | ata.ERR and drv.error() == ata.IDNF
    assert disk.read_bytes() == before


@pytest.mark.parametrize("command", [0x00, 0xA0, 0xC8, 0xCA, 0xFF, 0x08])
def test_an_unknown_command_is_aborted(drv, command):
    """NOP, PACKET, DMA reads/writes, and others this device does not implement."""
    assert drv.command(command) == ata.DRDY | ata.ERR
    assert drv.error() == ata.ABRT
    assert drv.command(ata.IDENTIFY) & ata.DRQ  # the next command starts clean
    assert drv.error() == 0


def test_a_readonly_disk_refuses_writes_with_abrt(tmp_path):
    path = make_image(tmp_path / "ro.img", MiB, pattern(0))
    ch = channel(path, readonly=(True,))
    d = Driver(ch)
    try:
        assert accmode(ch.drives[0].image.fd) == os.O_RDONLY
        for command in (ata.WRITE_SECTORS, ata.WRITE_MULTIPLE, ata.WRITE_SECTORS_EXT):
            d.lba28(0, 1)
            assert d.command(command) == ata.DRDY | ata.ERR and d.error() == ata.ABRT
        assert d.read_sectors(0, 1) == pattern(0)
        assert d.command(ata.FLUSH_CACHE) == ata.DRDY | ata.DSC
    finally:
        close(ch)
    assert file_bytes(path, 0, 1) == pattern(0)


class FailingImage(DiskImage):
    """An image whose reads, writes or flushes fail with a chosen errno."""

    fail: dict[str, int] = {}

    def pread(self, offset, length):
        if "read" in self.fail:
            raise OSError(self.fail["read"], os.strerror(self.fail["read"]))
        return super().pread(offset, length)

    def pwrite(self, offset, data):
        if "write" in self.fail:
            raise OSError(self.fail["write"], os.strerror(self.fail["write"]))
        super().pwrite(offset, data)

    def flush(self):
        if "flush" in self.fail:
            raise OSError(self.fail["flush"], os.strerror(self.fail["flush"]))
        super().flush()


@pytest.fixture
def failing(disk):
    image = FailingImage(disk)
    image.fail = {}
    events = []
    ch = ata.AtaChannel([image], on_error=events.append)
    yield Driver(ch), image, events
    image.close()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_write_the_image_refuses_is_a_write_fault(failing, caplog, err):
    d, image, events = failing
    image.fail = {"write": err}
    with caplog.at_level(logging.ERROR, logger="pymig.kvm.ata"):
        status = d.write_sectors(77, pattern(77, 2))
    assert status == ata.DRDY | ata.DF | ata.ERR
    assert d.error() == ata.ABRT
    assert (d.reg(3), d.reg(4)) == (77, 0)  # the sector that failed
    assert not d.status() & ata.DRQ  # the rest of the data is not asked for
    assert events[-1].operation == "write" and events[-1].lba == 77
    assert events[-1].nospace == (err == errno.ENOSPC)
    assert image.path in caplog.text and "sector 77" in caplog.text
    assert os.strerror(err) in caplog.text
    image.fail = {}
    assert d.write_sectors(77, pattern(77)) == ata.DRDY | ata.DSC  # the next one works
    assert d.error() == 0


def test_a_read_the_image_fails_is_uncorrectable(failing, caplog):
    d, image, events = failing
    image.fail = {"read": errno.EIO}
    d.lba28(5, 1)
    with caplog.at_level(logging.ERROR, logger="pymig.kvm.ata"):
        assert d.command(ata.READ_SECTORS) == ata.DRDY | ata.ERR
    assert d.error() == ata.UNC
    assert events[-1].operation == "read" and "sector 5" in caplog.text


def test_a_failed_flush_is_a_write_fault(failing):
    d, image, events = failing
    image.fail = {"flush": errno.EIO}
    assert d.command(ata.FLUSH_CACHE) == ata.DRDY | ata.DF | ata.ERR
    assert d.error() == ata.ABRT and events[-1].operation == "flush"


def test_repeated_failures_are_logged_once_a_second_with_a_count(failing, caplog):
    d, image, _ = failing
    image.fail = {"write": errno.ENOSPC}
    with caplog.at_level(logging.ERROR, logger="pymig.kvm.ata"):
        for _ in range(5):
            d.write_sectors(1, pattern(1))
    assert caplog.text.count("failed") == 1


def test_an_image_that_shrinks_under_the_guest_gives_read_errors(drv, disk, caplog):
    drv.write_sectors(4000, pattern(4000))
    os.truncate(disk, 1 * MiB)
    drv.lba28(4000, 1)
    with caplog.at_level(logging.ERROR, logger="pymig.kvm.ata"):
        assert drv.command(ata.READ_SECTORS) == ata.DRDY | ata.ERR
    assert drv.error() == ata.UNC
    assert "shrank" in caplog.text
    assert drv.read_sectors(10, 1) == bytes(SECTOR_BYTES)  # what is left still reads


# --- reset, selection, HOB --------------------------------------------------------------------

def test_software_reset_aborts_the_transfer_and_sets_the_signature(drv):
    drv.lba28(0, 4)
    drv.command(ata.READ_SECTORS)
    assert drv.status() & ata.DRQ
    drv.ch.write(ata.CTL_PORT, 1, ata.SRST)
    assert drv.alt_status() & ata.BSY
    assert drv.command(ata.IDENTIFY) & ata.BSY  # nothing is taken while busy
    drv.ch.write(ata.CTL_PORT, 1, 0)
    assert drv.status() == ata.DRDY | ata.DSC
    assert drv.error() == ata.DIAG_PASSED
    assert [drv.reg(n) for n in (2, 3, 4, 5)] == [1, 1, 0, 0]  # an ATA device's signature
    assert drv.read_items(2, 4) == bytes(8)  # the transfer is gone


def test_the_slave_is_absent_unless_a_second_disk_is_given(drv):
    drv.select(unit=1)
    assert drv.status() == 0 and drv.alt_status() == 0
    drv.command(ata.IDENTIFY)
    assert drv.status() == 0  # ignored
    drv.select(unit=0)
    assert drv.status() == ata.DRDY | ata.DSC


def test_master_and_slave_are_separate_disks(tmp_path):
    a = make_image(tmp_path / "a.img", MiB)
    b = make_image(tmp_path / "b.img", 2 * MiB)
    ch = channel(a, b)
    d = Driver(ch)
    try:
        assert d.identify(1)[60] == 2 * MiB // SECTOR_BYTES
        d.lba28(3, 1, unit=1)
        d.command(ata.WRITE_SECTORS)
        d.write_items(pattern(3, salt=1), 4)
        d.lba28(3, 1, unit=0)
        d.command(ata.WRITE_SECTORS)
        d.write_items(pattern(3, salt=0), 4)
    finally:
        close(ch)
    assert file_bytes(a, 3, 1) == pattern(3, salt=0)
    assert file_bytes(b, 3, 1) == pattern(3, salt=1)


def test_task_file_writes_are_ignored_while_data_is_pending(drv, disk):
    drv.lba28(20, 1)
    drv.command(ata.WRITE_SECTORS)
    drv.out(3, 99)  # ignored: DRQ is set
    drv.write_items(pattern(20), 2)
    assert file_bytes(disk, 20, 1) == pattern(20)


# --- dirty chunks -----------------------------------------------------------------------------

def test_writes_through_the_device_mark_their_chunks(drv):
    image = drv.ch.drives[0].image
    image.start_dirty_log(chunk_bytes=64 * 1024)
    drv.write_sectors(127, pattern(127, 2))  # bytes 65024..66048: chunks 0 and 1
    drv.read_sectors(1000, 4)  # reads mark nothing
    bits = image.sync_dirty()
    assert int(bits[0]) == 0b11
    assert not image.sync_dirty().any()


# --- state: a command in flight migrates ------------------------------------------------------

def shape(*sectors: int, instance: int = 0) -> StateShape:
    return StateShape(1, 64 * MiB, instance, disk_sectors=sectors)


def save_load(ch: ata.AtaChannel, into: ata.AtaChannel) -> None:
    """Encode the channel's state as a migration does and load it into another channel."""
    saved = ch.save()
    loaded = {}
    for name, obj in saved.items():
        vmsd = IDE_BUS if name == "ide" else IDE_DRIVE
        unit = 0 if name == "ide" else int(name[-1])
        data = vmstate.save(vmsd, obj)
        target = vmsd.factory()
        vmstate.load(vmsd, target, data, vmsd.version_id,
                     shape(*(d.sectors for d in into.drives), instance=unit))
        loaded[name] = target
    into.load(loaded)


@pytest.mark.parametrize("split", [1, 300, 1023, 2048, 2050])
def test_a_write_multiple_in_flight_resumes_exactly_after_save_and_load(tmp_path, split):
    """Stop a 10-sector WRITE MULTIPLE (blocks of 4) after ``split`` words, move its state to a
    fresh channel on the same image, finish it there: the image holds exactly the data."""
    path = make_image(tmp_path / "d.img", MiB)
    data = pattern(50, 10, salt=split)
    src = channel(path)
    d = Driver(src)
    d.out(2, 4)
    d.command(ata.SET_MULTIPLE)
    d.lba28(50, 10)
    d.command(ata.WRITE_MULTIPLE)
    d.write_items(data[:2 * split], 2)
    dst = channel(path)
    save_load(src, dst)
    close(src)
    e = Driver(dst)
    assert e.status() & ata.DRQ
    e.write_items(data[2 * split:], 2)
    assert e.status() == ata.DRDY | ata.DSC
    close(dst)
    assert file_bytes(path, 50, 10) == data


@pytest.mark.parametrize("split", [2, 256, 1000])
def test_a_read_in_flight_resumes_exactly_after_save_and_load(tmp_path, split):
    path = make_image(tmp_path / "d.img", MiB, pattern(0, 8))
    src = channel(path)
    d = Driver(src)
    d.lba28(0, 8)
    d.command(ata.READ_SECTORS)
    first = d.read_items(2, split)
    # the source's image changes after the block was read: the buffer in flight travels
    with open(path, "r+b") as f:
        f.write(bytes(SECTOR_BYTES))
    dst = channel(path)
    save_load(src, dst)
    close(src)
    rest = Driver(dst).read_items(2, 8 * 256 - split)
    close(dst)
    assert (first + rest)[SECTOR_BYTES:] == pattern(1, 7)
    assert (first + rest)[:2 * split] == pattern(0, 8)[:2 * split]


def test_a_command_in_flight_beyond_the_destination_disk_is_refused(tmp_path):
    path = make_image(tmp_path / "d.img", MiB)
    ch = channel(path)
    d = Driver(ch)
    d.lba28(2000, 40)
    d.command(ata.WRITE_SECTORS)
    state = ch.save()["ide-drive0"]
    close(ch)
    data = vmstate.save(IDE_DRIVE, state)
    with pytest.raises(StateError, match="end_lba: 2040 is out of bounds"):
        vmstate.load(IDE_DRIVE, IDE_DRIVE.factory(), data, 1, shape(2039))
    vmstate.load(IDE_DRIVE, IDE_DRIVE.factory(), data, 1, shape(2040))
