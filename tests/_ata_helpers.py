"""A host-side driver for the ATA channel, the way a boot sector or a BIOS drives one: task-file
writes, a command, status polls, data through port 0x1f0 (item by item or as one string
instruction), so device tests need neither KVM nor a guest."""

from __future__ import annotations

import os
from pathlib import Path

from pymig.disk import SECTOR_BYTES, DiskImage
from pymig.kvm import ata
from pymig.qmp import QmpClient

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


# --- a boot sector that uses the disk as a BIOS-era one would ---------------------------------
# Real mode, 16-bit PIO, polling.  IDENTIFY DEVICE and print the model; write sectors 1-2 (this
# very sector, then a pattern of words 0x1234 + 0x0101 * i) with WRITE SECTORS and REP OUTSW,
# one DRQ block per sector; read them back with READ SECTORS and REP INSW; FLUSH CACHE; compare;
# print the message at the end of this sector as read back from the disk.  Then exit: QEMU's
# isa-debug-exit at port 0xf4 (pymig ignores that port) and pymig's power off at 0x510, exit code
# 0 when all went well, 1 (after printing "!") when a command failed or the data differed.
# The same image runs under pymig and under QEMU (``-drive if=ide``).

BOOT_SECTOR_DISK = r"""
.intel_syntax noprefix
.code16
.global start
start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    cld
    mov dx, 0x1f6
    mov al, 0xe0
    out dx, al
    mov al, 0xec                  # IDENTIFY DEVICE
    call command
    jc bad
    mov di, 0x9000
    mov cx, 256
    mov dx, 0x1f0
    rep insw
    mov si, 0x9000 + 54           # the model: words 27-46, two characters a word
    mov cx, 20
1:  lodsw
    xchg al, ah
    call putc
    mov al, ah
    call putc
    loop 1b
    mov al, 10
    call putc
    mov di, 0x7e00                # the pattern, after this sector
    mov cx, 256
    mov ax, 0x1234
2:  stosw
    add ax, 0x0101
    loop 2b
    mov al, 0x30                  # WRITE SECTORS 1-2
    call lba1
    mov si, 0x7c00
    call wait_drq
    jc bad
    mov cx, 256
    mov dx, 0x1f0
    rep outsw
    call wait_drq
    jc bad
    mov cx, 256
    mov dx, 0x1f0
    rep outsw
    call wait_ready
    jc bad
    mov al, 0x20                  # READ SECTORS 1-2
    call lba1
    mov di, 0x9000
    call wait_drq
    jc bad
    mov cx, 256                   # a DRQ block per sector, each one string instruction
    mov dx, 0x1f0
    rep insw
    call wait_drq
    jc bad
    mov cx, 256
    mov dx, 0x1f0
    rep insw
    call wait_ready
    jc bad
    mov dx, 0x1f7
    mov al, 0xe7                  # FLUSH CACHE
    out dx, al
    call wait_ready
    jc bad
    mov si, 0x7c00
    mov di, 0x9000
    mov cx, 512
    repe cmpsw
    jne bad
    mov si, 0x9000 + msg - start  # the message, as the disk gave it back
3:  lodsb
    test al, al
    jz 4f
    call putc
    jmp 3b
4:  xor ax, ax
    jmp done
bad:
    mov al, '!'
    call putc
    mov ax, 1
done:
    mov dx, 0xf4
    out dx, al
    shl ax, 8
    or al, 4
    mov dx, 0x510
    out dx, eax
    hlt

lba1:                             # sectors 1-2 of the master, LBA28, then command AL
    push ax
    mov dx, 0x1f6
    mov al, 0xe0
    out dx, al
    mov dx, 0x1f2
    mov al, 2
    out dx, al
    inc dx
    mov al, 1
    out dx, al
    inc dx
    xor al, al
    out dx, al
    inc dx
    out dx, al
    pop ax
command:
    mov dx, 0x1f7
    out dx, al
wait_drq:                         # CF: ERR, DF, or no DRQ
    call wait_ready
    jc 1f
    test al, 0x08
    jnz 1f
    stc
1:  ret
wait_ready:                       # CF: ERR or DF
    mov dx, 0x1f7
1:  in al, dx
    test al, 0x80
    jnz 1b
    test al, 0x21
    jz 2f
    stc
2:  ret
putc:
    push dx
    mov dx, 0x3f8
    out dx, al
    pop dx
    ret
msg: .asciz "pymig ata: sectors written, read back and flushed\n"
.org 510
.byte 0x55, 0xaa
"""
BOOT_DISK_MESSAGE = b"pymig ata: sectors written, read back and flushed\n"


def boot_disk_pattern() -> bytes:
    """What the boot sector writes to sector 2."""
    return b"".join(((0x1234 + 0x0101 * i) & 0xFFFF).to_bytes(2, "little") for i in range(256))


def diskcheck_runs_clean_behind(control: str) -> dict:
    """The diskcheck guest behind ``control`` runs (two more passes), then, stopped, checks
    its disk and memory with no error; its ``query-guest verify`` report."""
    from _migration_helpers import wait_for

    with QmpClient(control) as client:
        wait_for(lambda: client.command("query-status")["status"] == "running", timeout=60,
                 what="the destination to run")
        first = client.command("query-guest")["progress"]["passes"]
        wait_for(lambda: client.command("query-guest")["progress"]["passes"] >= first + 2,
                 timeout=120, what="two passes at the destination")
        client.command("stop")
        report = client.command("query-guest", verify=True)
    assert report["diskcheck"]["ok"], report["diskcheck"]
    assert report["progress"]["errors"] == 0
    return report
