"""A host-side driver for the ATA channel, the way a boot sector or a BIOS drives one: task-file
writes, a command, status polls, data through port 0x1f0 (item by item or as one string
instruction), so device tests need neither KVM nor a guest."""

from __future__ import annotations

import os
from pathlib import Path

from pymig.disk import SECTOR_BYTES, DiskImage
from pymig.kvm import ata

BASE = ata.CMD_BASE


def make_image(path: Path, size_bytes: int, content: bytes = b"") -> Path:
    """A sparse raw image of ``size_bytes`` beginning with ``content``."""
    with open(path, "wb") as f:
        f.write(content)
        f.truncate(size_bytes)
    return path


def pattern(lba: int, sectors: int = 1, salt: int = 0) -> bytes:
    """Distinct bytes for sectors ``[lba, lba + sectors)``: every sector names itself."""
    out = bytearray()
    for i in range(sectors):
        tag = f"lba {lba + i} salt {salt} ".encode()
        out += (tag * (SECTOR_BYTES // len(tag) + 1))[:SECTOR_BYTES]
    return bytes(out)


class Driver:
    """Drives one :class:`~pymig.kvm.ata.AtaChannel` through its ports."""

    def __init__(self, channel: ata.AtaChannel):
        self.ch = channel

    # registers
    def status(self) -> int:
        return self.ch.read(BASE + 7, 1)

    def alt_status(self) -> int:
        return self.ch.read(ata.CTL_PORT, 1)

    def error(self) -> int:
        return self.ch.read(BASE + 1, 1)

    def reg(self, n: int) -> int:
        return self.ch.read(BASE + n, 1)

    def out(self, n: int, value: int) -> None:
        self.ch.write(BASE + n, 1, value)

    def select(self, unit: int = 0, lba: bool = True, head: int = 0) -> None:
        self.out(6, 0xA0 | (0x40 if lba else 0) | (unit << 4) | head)

    def lba28(self, lba: int, count: int, unit: int = 0) -> None:
        self.out(6, 0xE0 | (unit << 4) | ((lba >> 24) & 0x0F))
        self.out(2, count & 0xFF)
        self.out(3, lba & 0xFF)
        self.out(4, (lba >> 8) & 0xFF)
        self.out(5, (lba >> 16) & 0xFF)

    def lba48(self, lba: int, count: int, unit: int = 0) -> None:
        self.out(6, 0xE0 | (unit << 4))
        self.out(2, (count >> 8) & 0xFF)  # each register twice: the high byte first
        self.out(2, count & 0xFF)
        for n, shift in ((3, 0), (4, 8), (5, 16)):
            self.out(n, (lba >> (shift + 24)) & 0xFF)
            self.out(n, (lba >> shift) & 0xFF)

    def command(self, command: int) -> int:
        self.out(7, command)
        return self.status()

    # data
    def read_items(self, size: int, count: int, string: bool = True) -> bytes:
        if string:
            return self.ch.read_string(BASE, size, count)
        return b"".join(self.ch.read(BASE, size).to_bytes(size, "little")
                        for _ in range(count))

    def write_items(self, data: bytes, size: int, string: bool = True) -> None:
        if string:
            self.ch.write_string(BASE, size, data)
        else:
            for at in range(0, len(data), size):
                self.ch.write(BASE, size, int.from_bytes(data[at:at + size], "little"))

    def identify(self, unit: int = 0) -> list[int]:
        self.select(unit)
        assert self.command(ata.IDENTIFY) & ata.DRQ
        data = self.read_items(2, 256)
        return [int.from_bytes(data[i:i + 2], "little") for i in range(0, 512, 2)]

    def read_sectors(self, lba: int, count: int, *, command: int = ata.READ_SECTORS,
                     size: int = 2, string: bool = True) -> bytes:
        ext = command in (ata.READ_SECTORS_EXT, ata.READ_MULTIPLE_EXT)
        (self.lba48 if ext else self.lba28)(lba, count)
        status = self.command(command)
        assert status & ata.DRQ, f"no DRQ after command {command:#x}: status {status:#x}, " \
                                 f"error {self.error():#x}"
        data = self.read_items(size, count * SECTOR_BYTES // size, string)
        return data

    def write_sectors(self, lba: int, data: bytes, *, command: int = ata.WRITE_SECTORS,
                      size: int = 2, string: bool = True) -> int:
        ext = command in (ata.WRITE_SECTORS_EXT, ata.WRITE_MULTIPLE_EXT)
        (self.lba48 if ext else self.lba28)(lba, len(data) // SECTOR_BYTES)
        status = self.command(command)
        assert status & ata.DRQ, f"no DRQ after command {command:#x}: status {status:#x}, " \
                                 f"error {self.error():#x}"
        self.write_items(data, size, string)
        return self.status()


def channel(*paths: Path, readonly: tuple[bool, ...] = (), on_error=None) -> ata.AtaChannel:
    images = [DiskImage(p, readonly=readonly[i] if i < len(readonly) else False)
              for i, p in enumerate(paths)]
    return ata.AtaChannel(images, on_error=on_error)


def close(channel_: ata.AtaChannel) -> None:
    for drive in channel_.drives:
        drive.image.close()


def file_bytes(path: Path, lba: int, sectors: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(lba * SECTOR_BYTES)
        return f.read(sectors * SECTOR_BYTES)


def accmode(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
