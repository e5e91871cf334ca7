"""The primary ATA (IDE) channel: a master and a slave disk on the legacy ports, PIO, polled.

The interface every PC-era boot sector and BIOS knows (ATA/ATAPI-6 for the semantics; QEMU's
``hw/ide/core.c`` is the reference for what guests expect where the standard leaves room)::

    port    read                                write
    0x1F0   data (16 or 32 bits)                data (16 or 32 bits)
    0x1F1   error                               features
    0x1F2   sector count                        sector count
    0x1F3   LBA low  / sector number            LBA low  / sector number
    0x1F4   LBA mid  / cylinder low             LBA mid  / cylinder low
    0x1F5   LBA high / cylinder high            LBA high / cylinder high
    0x1F6   device: 1x1D hhhh (L: LBA, D: slave, h: LBA 27:24 or head)
    0x1F7   status                              command
    0x3F6   alternate status                    device control: nIEN (0x02), SRST (0x04),
                                                HOB (0x80: reads of 0x1F2-0x1F5 give the
                                                previous, high-order bytes of LBA48)

Status: BSY 0x80, DRDY 0x40, DF 0x20 (device fault: a write the image did not take), DSC
0x10, DRQ 0x08 (data to move through 0x1F0), ERR 0x01.  Error: UNC 0x40 (a read the image
failed), IDNF 0x10 (an address outside the disk), ABRT 0x04 (a command the device refuses:
unknown, unsupported count, a write to a read-only disk, a failed write or flush).

Commands: IDENTIFY DEVICE (0xEC); READ SECTORS (0x20/0x21), READ SECTORS EXT (0x24); WRITE
SECTORS (0x30/0x31), WRITE SECTORS EXT (0x34); READ MULTIPLE (0xC4), READ MULTIPLE EXT (0x29),
WRITE MULTIPLE (0xC5), WRITE MULTIPLE EXT (0x39) and SET MULTIPLE MODE (0xC6: 0 or a power of
two up to 16 sectors per DRQ block, 16 after power-on as on QEMU); FLUSH CACHE (0xE7) and its
EXT (0xEA): fdatasync; READ VERIFY SECTORS (0x40/0x41/0x42): an address check; READ NATIVE MAX
ADDRESS (0xF8/0x27); EXECUTE DEVICE DIAGNOSTIC (0x90); SET FEATURES (0xEF) for the write cache,
look-ahead, PIO transfer modes and power-on defaults; INITIALIZE DEVICE PARAMETERS (0x91),
RECALIBRATE (0x1x), CHECK POWER MODE (0xE5/0x98) and the idle/standby/sleep commands as no-ops.
Anything else ends with ERR and ABRT.  Addresses are LBA28, LBA48 (the EXT commands) or CHS over
a fixed 16-head, 63-sector geometry (IDENTIFY words 1, 3, 6 and 54-58).

Transfers are synchronous: a read command has its first DRQ block in the buffer when the
command register write returns, and a write's block is in the image file (``pwrite``) before
the status says DRQ for the next block or DRDY for the end, so a guest that saw a write
complete finds it in the file.  No interrupt is raised (nIEN is kept, not acted on): guests
poll the status register.  The string forms (``rep insw/insd/outsw/outsd``) move everything one
exit carries in one call (:meth:`AtaChannel.read_string`, :meth:`AtaChannel.write_string`).

Failures of the image file are the guest's disk errors, never the VMM's: a read that fails
(``EIO``, or the file shrank under the guest) ends the command with ERR and UNC, a write or
flush that fails (``ENOSPC``, ``EIO``) with DF, ERR and ABRT; the LBA registers then hold the
first sector that failed.  Each failure is logged for the operator (the image, the sector, the
reason) and reported to ``on_error``.

State (:mod:`pymig.kvm.statedesc`): the channel's selected drive and device control register
(``ide``), and per drive its registers, multiple-mode setting and any command in flight: the
DRQ block's bytes, the position inside it, the block's first LBA and where the command ends
(``ide-drive``, instance = drive), so a migration in the middle of a PIO transfer resumes it
byte for byte.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pymig.disk import SECTOR_BYTES, DiskImage

log = logging.getLogger(__name__)

CMD_BASE = 0x1F0
CTL_PORT = 0x3F6
PORTS = (*range(CMD_BASE, CMD_BASE + 8), CTL_PORT)
REG_DATA, REG_ERROR, REG_NSECTOR, REG_SECTOR, REG_LCYL, REG_HCYL, REG_SELECT, REG_STATUS = \
    range(8)

BSY, DRDY, DF, DSC, DRQ, ERR = 0x80, 0x40, 0x20, 0x10, 0x08, 0x01
STATUS_BITS = BSY | DRDY | DF | DSC | DRQ | ERR  # the status bits this device ever sets
UNC, IDNF, ABRT, DIAG_PASSED = 0x40, 0x10, 0x04, 0x01
ERROR_BITS = UNC | IDNF | ABRT | DIAG_PASSED
NIEN, SRST, HOB = 0x02, 0x04, 0x80
DEVCTL_BITS = NIEN | SRST | HOB
SEL_LBA, SEL_DEV = 0x40, 0x10
IDLE_STATUS = DRDY | DSC

MAX_MULT_SECTORS = 16
MULT_SETTINGS = (0, 1, 2, 4, 8, 16)
MAX_BLOCK_BYTES = MAX_MULT_SECTORS * SECTOR_BYTES
MAX_LBA28_COUNT = 256
MAX_LBA48_COUNT = 65536
XFER_NONE, XFER_IN, XFER_OUT = 0, 1, 2

HEADS, SECTORS_PER_TRACK, MAX_CYLINDERS = 16, 63, 16383
MODEL = "PYMIG HARDDISK"
FIRMWARE = "PMIG1"

# Commands with data, and how they move it: (direction, LBA48, multiple, disk-backed).
IDENTIFY = 0xEC
READ_SECTORS, READ_SECTORS_NR, READ_SECTORS_EXT = 0x20, 0x21, 0x24
WRITE_SECTORS, WRITE_SECTORS_NR, WRITE_SECTORS_EXT = 0x30, 0x31, 0x34
READ_MULTIPLE, READ_MULTIPLE_EXT = 0xC4, 0x29
WRITE_MULTIPLE, WRITE_MULTIPLE_EXT = 0xC5, 0x39
SET_MULTIPLE = 0xC6
FLUSH_CACHE, FLUSH_CACHE_EXT = 0xE7, 0xEA
DATA_COMMANDS: dict[int, tuple[int, bool, bool]] = {
    READ_SECTORS: (XFER_IN, False, False), READ_SECTORS_NR: (XFER_IN, False, False),
    READ_SECTORS_EXT: (XFER_IN, True, False), READ_MULTIPLE: (XFER_IN, False, True),
    READ_MULTIPLE_EXT: (XFER_IN, True, True),
    WRITE_SECTORS: (XFER_OUT, False, False), WRITE_SECTORS_NR: (XFER_OUT, False, False),
    WRITE_SECTORS_EXT: (XFER_OUT, True, False), WRITE_MULTIPLE: (XFER_OUT, False, True),
    WRITE_MULTIPLE_EXT: (XFER_OUT, True, True),
}
VERIFY_COMMANDS = {0x40: False, 0x41: False, 0x42: True}  # READ VERIFY SECTORS (EXT)
NATIVE_MAX = {0xF8: False, 0x27: True}  # READ NATIVE MAX ADDRESS (EXT)
NOOP_COMMANDS = {0x91, *range(0x10, 0x20), 0xE0, 0xE1, 0xE2, 0xE3, 0xE6, 0x94, 0x95, 0x96,
                 0x97, 0x99}  # INITIALIZE DEVICE PARAMETERS, RECALIBRATE, standby/idle/sleep
CHECK_POWER_MODE = {0xE5, 0x98}
DIAGNOSTIC = 0x90
SET_FEATURES = 0xEF
# SET FEATURES subcommands that succeed: write cache on/off, look-ahead on/off, power-on
# defaults on/off, set transfer mode (PIO only: checked on its own).
FEATURES_OK = {0x02, 0x82, 0xAA, 0x55, 0x66, 0xCC}
FEATURE_TRANSFER_MODE = 0x03

ERROR_LOG_INTERVAL_S = 1.0  # the same failure repeated within this is counted, not logged


@dataclass
class IdeBusState:
    """The channel: which drive the device register selected, the device control register."""

    VERSION = 1
    unit: int = 0
    devctl: int = 0


@dataclass
class IdeDriveState:
    """One drive: its task-file registers (and their previous, HOB bytes), status, error,
    multiple-mode setting, and the command in flight.

    A transfer moves the DRQ block ``buffer`` through the data port, ``pos`` bytes of it done;
    a disk command's block covers sectors ``[lba, lba + len(buffer) / 512)`` and the command
    ends before ``end_lba``.
    """

    VERSION = 1
    feature: int = 0
    hob_feature: int = 0
    nsector: int = 0
    hob_nsector: int = 0
    sector: int = 0
    hob_sector: int = 0
    lcyl: int = 0
    hob_lcyl: int = 0
    hcyl: int = 0
    hob_hcyl: int = 0
    select: int = 0xA0
    status: int = IDLE_STATUS
    error: int = DIAG_PASSED
    mult_sectors: int = MAX_MULT_SECTORS
    lba48: bool = False
    xfer: int = XFER_NONE
    command: int = 0
    lba: int = 0
    end_lba: int = 0
    buffer: bytearray = field(default_factory=bytearray)
    pos: int = 0


@dataclass(frozen=True)
class DiskErrorEvent:
    """A failure of a disk's image that the guest saw as a disk error."""

    unit: int
    path: str
    operation: str  # "read", "write" or "flush"
    lba: int | None  # the first sector that failed (None: a flush)
    errno: int
    reason: str

    @property
    def nospace(self) -> bool:
        return self.errno == errno.ENOSPC


def geometry(sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) of the CHS view of a disk of ``sectors``: 16
    heads of 63 sectors, or fewer on a disk smaller than one cylinder of them, so that every
    CHS address is on the disk."""
    if sectors >= HEADS * SECTORS_PER_TRACK:
        return min(sectors // (HEADS * SECTORS_PER_TRACK), MAX_CYLINDERS), HEADS, \
            SECTORS_PER_TRACK
    spt = min(sectors, SECTORS_PER_TRACK)
    return 1, max(1, min(HEADS, sectors // spt)), spt


def _ata_string(text: str, nbytes: int) -> bytes:
    """ATA's string layout: ASCII padded with spaces, the two bytes of each word swapped."""
    raw = text.encode("ascii")[:nbytes].ljust(nbytes, b" ")
    return bytes(raw[i ^ 1] for i in range(nbytes))


def identify_data(sectors: int, unit: int, mult_sectors: int) -> bytes:
    """The 512 bytes IDENTIFY DEVICE returns for a disk of ``sectors`` 512-byte sectors."""
    cylinders, heads, spt = geometry(sectors)
    chs = cylinders * heads * spt
    words = [0] * 256
    words[0] = 0x0040  # fixed device, ATA
    words[1], words[3], words[6] = cylinders, heads, spt
    words[47] = 0x8000 | MAX_MULT_SECTORS
    words[48] = 0x0001  # 32-bit PIO (QEMU's word 48)
    words[49] = (1 << 11) | (1 << 9)  # IORDY, LBA; no DMA
    words[50] = 0x4000
    words[51] = 0x0200
    words[53] = 0x0003  # words 54-58 and 64-70 are valid
    words[54], words[55], words[56] = cylinders, heads, spt
    words[57], words[58] = chs & 0xFFFF, chs >> 16
    if mult_sectors:
        words[59] = 0x0100 | mult_sectors
    lba28 = min(sectors, 0x0FFFFFFF)
    words[60], words[61] = lba28 & 0xFFFF, lba28 >> 16
    words[64] = 0x0003  # PIO modes 3 and 4
    words[65] = words[66] = words[67] = words[68] = 120
    words[80] = 0x0070  # ATA/ATAPI-4 to -6
    words[83] = 0x4000 | (1 << 13) | (1 << 12) | (1 << 10)  # FLUSH CACHE (EXT), LBA48
    words[84] = 0x4000
    words[86] = (1 << 13) | (1 << 12) | (1 << 10)
    words[87] = 0x4000
    for i in range(4):
        words[100 + i] = (sectors >> (16 * i)) & 0xFFFF
    data = bytearray(b"".join(w.to_bytes(2, "little") for w in words))
    data[20:40] = _ata_string(f"PMIG{unit:016d}", 20)
    data[46:54] = _ata_string(FIRMWARE, 8)
    data[54:94] = _ata_string(MODEL, 40)
    data[510] = 0xA5  # word 255: signature, and a checksum making all 512 bytes sum to 0
    data[511] = (-sum(data[:511])) & 0xFF
    return bytes(data)


class AtaDrive:
    """One disk on the channel: its image and its state."""

    def __init__(self, unit: int, image: DiskImage):
        self.unit = unit
        self.image = image
        self.sectors = image.sectors
        self.state = IdeDriveState()


class AtaChannel:
    """The primary ATA channel with one or two disks (master first).  Thread-safe: the vCPU
    threads of a guest may all touch the ports."""

    ports = PORTS

    def __init__(self, images: list[DiskImage],
                 on_error: Callable[[DiskErrorEvent], None] | None = None):
        if not 1 <= len(images) <= 2:
            raise ValueError(f"an ATA channel holds a master and a slave, not {len(images)} "
                             f"disks")
        self.drives = [AtaDrive(i, image) for i, image in enumerate(images)]
        self.bus = IdeBusState()
        self.on_error = on_error
        self._lock = threading.Lock()
        self._last_logged: dict[tuple[int, str, int], list[float]] = {}

    # --- port access (vCPU threads) --------------------------------------------------------

    def read(self, port: int, size: int) -> int:
        with self._lock:
            if port == CTL_PORT:
                drive = self._selected()
                return drive.state.status if drive is not None else 0
            reg = port - CMD_BASE
            if reg == REG_DATA:
                if size == 1:
                    return 0xFF
                data = self._read_data(size, 1)
                return int.from_bytes(data, "little")
            return self._read_register(reg)

    def write(self, port: int, size: int, value: int) -> None:
        with self._lock:
            if port == CTL_PORT:
                self._write_devctl(value & 0xFF)
                return
            reg = port - CMD_BASE
            if reg == REG_DATA:
                if size > 1:
                    self._write_data(size, value.to_bytes(size, "little"))
                return
            self._write_register(reg, value & 0xFF)

    def read_string(self, port: int, size: int, count: int) -> bytes:
        """``count`` items of ``size`` bytes read from ``port`` at once (``rep ins``)."""
        if port != CMD_BASE or size == 1:
            return b"".join(self.read(port, size).to_bytes(size, "little")
                            for _ in range(count))
        with self._lock:
            return self._read_data(size, count)

    def write_string(self, port: int, size: int, data: bytes | memoryview) -> None:
        """The items of ``data`` (``size`` bytes each) written to ``port`` at once
        (``rep outs``)."""
        if port != CMD_BASE or size == 1:
            for at in range(0, len(data), size):
                self.write(port, size, int.from_bytes(data[at:at + size], "little"))
            return
        with self._lock:
            self._write_data(size, bytes(data))

    # --- registers -------------------------------------------------------------------------

    def _selected(self) -> AtaDrive | None:
        unit = self.bus.unit
        return self.drives[unit] if unit < len(self.drives) else None

    def _read_register(self, reg: int) -> int:
        drive = self._selected()
        if drive is None:
            # An absent slave: what QEMU answers (no status, no error; the shared registers
            # still read back through the master's).
            if reg in (REG_ERROR, REG_STATUS):
                return 0
            s = self.drives[0].state
        else:
            s = drive.state
        hob = bool(self.bus.devctl & HOB)
        if reg == REG_ERROR:
            return s.error
        if reg == REG_NSECTOR:
            return s.hob_nsector if hob else s.nsector
        if reg == REG_SECTOR:
            return s.hob_sector if hob else s.sector
        if reg == REG_LCYL:
            return s.hob_lcyl if hob else s.lcyl
        if reg == REG_HCYL:
            return s.hob_hcyl if hob else s.hcyl
        if reg == REG_SELECT:
            return s.select
        return s.status

    def _write_register(self, reg: int, value: int) -> None:
        selected = self._selected() or self.drives[0]
        if reg == REG_STATUS:
            self._command(value)
            return
        if selected.state.status & (BSY | DRQ):
            return  # the host must not write the command block while BSY or DRQ: ignored
        self.bus.devctl &= ~HOB  # a command block write clears HOB
        name = {REG_ERROR: "feature", REG_NSECTOR: "nsector", REG_SECTOR: "sector",
                REG_LCYL: "lcyl", REG_HCYL: "hcyl"}.get(reg)
        for drive in self.drives:  # both drives latch the task file
            s = drive.state
            if name is None:
                s.select = value
            else:
                setattr(s, "hob_" + name, getattr(s, name))
                setattr(s, name, value)
        if reg == REG_SELECT:
            self.bus.unit = (value >> 4) & 1

    def _write_devctl(self, value: int) -> None:
        was = self.bus.devctl
        if not was & SRST and value & SRST:  # reset asserted: every drive busy, nothing moves
            for drive in self.drives:
                self._stop_transfer(drive.state)
                drive.state.status = BSY | DSC
        elif was & SRST and not value & SRST:  # released: diagnostics passed, signature set
            for drive in self.drives:
                s = drive.state
                s.status, s.error = IDLE_STATUS, DIAG_PASSED
                s.nsector = s.sector = 1
                s.lcyl = s.hcyl = 0
                s.select = 0xA0
            self.bus.unit = 0
        self.bus.devctl = value & DEVCTL_BITS

    # --- commands --------------------------------------------------------------------------

    def _command(self, command: int) -> None:
        drive = self._selected()
        if drive is None:
            return  # commands to an absent slave are ignored
        s = drive.state
        if s.status & (BSY | DRQ):
            return  # only DEVICE RESET (a packet device's) is taken while busy
        self.bus.devctl &= ~HOB
        s.error = 0
        s.status = IDLE_STATUS
        if command == IDENTIFY:
            self._start_transfer(s, XFER_IN, command, 0, 0,
                                 identify_data(drive.sectors, drive.unit, s.mult_sectors))
        elif command in DATA_COMMANDS:
            self._start_data_command(drive, command)
        elif command == SET_MULTIPLE:
            if s.nsector not in MULT_SETTINGS:
                self._abort(s)
            else:
                s.mult_sectors = s.nsector
        elif command in (FLUSH_CACHE, FLUSH_CACHE_EXT):
            if not drive.image.readonly:
                try:
                    drive.image.flush()
                except OSError as exc:
                    self._write_fault(drive, "flush", None, exc)
        elif command in VERIFY_COMMANDS:
            lba48 = VERIFY_COMMANDS[command]
            lba, count = self._address(drive, lba48), self._count(s, lba48)
            if lba is None or lba + count > drive.sectors:
                self._idnf(s)
        elif command in NATIVE_MAX:
            s.lba48 = NATIVE_MAX[command]
            self._set_address(drive, drive.sectors - 1)
        elif command == DIAGNOSTIC:
            for each in self.drives:
                each.state.nsector = each.state.sector = 1
                each.state.lcyl = each.state.hcyl = 0
                each.state.error = DIAG_PASSED
        elif command == SET_FEATURES:
            mode = s.nsector >> 3
            if s.feature not in FEATURES_OK and not (
                    s.feature == FEATURE_TRANSFER_MODE and mode in (0, 1)):
                self._abort(s)
        elif command in CHECK_POWER_MODE:
            s.nsector = 0xFF  # active or idle
        elif command not in NOOP_COMMANDS:
            self._abort(s)

    def _start_data_command(self, drive: AtaDrive, command: int) -> None:
        s = drive.state
        direction, lba48, multiple = DATA_COMMANDS[command]
        if multiple and not s.mult_sectors:
            self._abort(s)  # READ/WRITE MULTIPLE before SET MULTIPLE MODE (or after 0)
            return
        if direction == XFER_OUT and drive.image.readonly:
            self._abort(s)
            return
        s.lba48 = lba48
        lba, count = self._address(drive, lba48), self._count(s, lba48)
        if lba is None or lba + count > drive.sectors:
            self._idnf(s)
            return
        s.command, s.xfer = command, direction
        s.lba, s.end_lba = lba, lba + count
        if direction == XFER_IN:
            self._read_block(drive)
        else:
            self._start_transfer(s, XFER_OUT, command, lba, lba + count,
                                 bytes(self._block_sectors(s) * SECTOR_BYTES))

    def _block_sectors(self, s: IdeDriveState) -> int:
        """Sectors in the next DRQ block of the command in flight."""
        per_block = s.mult_sectors if DATA_COMMANDS[s.command][2] else 1
        return min(per_block, s.end_lba - s.lba)

    def _count(self, s: IdeDriveState, lba48: bool) -> int:
        if lba48:
            return (s.hob_nsector << 8 | s.nsector) or MAX_LBA48_COUNT
        return s.nsector or MAX_LBA28_COUNT

    def _address(self, drive: AtaDrive, lba48: bool) -> int | None:
        """The command's first sector from the task file; None for a CHS address that names
        no sector."""
        s = drive.state
        if s.select & SEL_LBA:
            if lba48:
                return (s.hob_hcyl << 40 | s.hob_lcyl << 32 | s.hob_sector << 24
                        | s.hcyl << 16 | s.lcyl << 8 | s.sector)
            return (s.select & 0x0F) << 24 | s.hcyl << 16 | s.lcyl << 8 | s.sector
        cylinders, heads, spt = geometry(drive.sectors)
        cylinder, head, sector = s.hcyl << 8 | s.lcyl, s.select & 0x0F, s.sector
        if not 1 <= sector <= spt or head >= heads or cylinder >= cylinders:
            return None
        return (cylinder * heads + head) * spt + sector - 1

    def _set_address(self, drive: AtaDrive, lba: int) -> None:
        """Put ``lba`` in the task file, in the form the last command used."""
        s = drive.state
        if s.select & SEL_LBA:
            s.sector, s.lcyl, s.hcyl = lba & 0xFF, (lba >> 8) & 0xFF, (lba >> 16) & 0xFF
            if s.lba48:
                s.hob_sector, s.hob_lcyl, s.hob_hcyl = ((lba >> 24) & 0xFF,
                                                        (lba >> 32) & 0xFF,
                                                        (lba >> 40) & 0xFF)
            else:
                s.select = (s.select & 0xF0) | ((lba >> 24) & 0x0F)
            return
        _, heads, spt = geometry(drive.sectors)
        cylinder, rest = divmod(lba, heads * spt)
        s.hcyl, s.lcyl = (cylinder >> 8) & 0xFF, cylinder & 0xFF
        s.select = (s.select & 0xF0) | (rest // spt)
        s.sector = rest % spt + 1

    # --- transfers -------------------------------------------------------------------------

    def _start_transfer(self, s: IdeDriveState, direction: int, command: int, lba: int,
                        end_lba: int, block: bytes) -> None:
        s.xfer, s.command, s.lba, s.end_lba = direction, command, lba, end_lba
        s.buffer = bytearray(block)
        s.pos = 0
        s.status = IDLE_STATUS | DRQ

    def _stop_transfer(self, s: IdeDriveState) -> None:
        s.xfer = XFER_NONE
        s.command = s.lba = s.end_lba = s.pos = 0
        s.buffer = bytearray()
        s.status &= ~DRQ

    def _read_block(self, drive: AtaDrive) -> None:
        """Read the next DRQ block of the read command in flight into the buffer."""
        s = drive.state
        n = self._block_sectors(s)
        try:
            data = drive.image.pread(s.lba * SECTOR_BYTES, n * SECTOR_BYTES)
        except OSError as exc:
            self._fail(drive, "read", s.lba, exc, UNC, 0)
            return
        self._start_transfer(s, XFER_IN, s.command, s.lba, s.end_lba, data)
        self._progress(drive, s.lba + n)

    def _progress(self, drive: AtaDrive, next_lba: int) -> None:
        """Keep the task file where the command has got to (as QEMU does): the next sector
        and the count left."""
        s = drive.state
        self._set_address(drive, next_lba)
        left = s.end_lba - next_lba
        s.nsector = left & 0xFF
        if s.lba48:
            s.hob_nsector = (left >> 8) & 0xFF

    def _end_of_block(self, drive: AtaDrive) -> None:
        s = drive.state
        if s.command not in DATA_COMMANDS:  # IDENTIFY: one block
            self._finish(s)
            return
        n = len(s.buffer) // SECTOR_BYTES
        if s.xfer == XFER_OUT:
            try:
                drive.image.pwrite(s.lba * SECTOR_BYTES, s.buffer)
            except OSError as exc:
                self._write_fault(drive, "write", s.lba, exc)
                return
            self._progress(drive, s.lba + n)
        s.lba += n
        if s.lba >= s.end_lba:
            self._finish(s)
        elif s.xfer == XFER_IN:
            self._read_block(drive)
        else:
            self._start_transfer(s, XFER_OUT, s.command, s.lba, s.end_lba,
                                 bytes(self._block_sectors(s) * SECTOR_BYTES))

    def _finish(self, s: IdeDriveState) -> None:
        self._stop_transfer(s)
        s.status = IDLE_STATUS

    def _read_data(self, size: int, count: int) -> bytes:
        """Up to ``count`` items of ``size`` bytes from the transfer in flight; items past its
        end read as zero."""
        drive = self._selected()
        want = size * count
        out = bytearray()
        while drive is not None and len(out) < want:
            s = drive.state
            if not s.status & DRQ or s.xfer != XFER_IN:
                break
            take = min(want - len(out), len(s.buffer) - s.pos)
            out += s.buffer[s.pos:s.pos + take]
            s.pos += take
            if s.pos >= len(s.buffer):
                self._end_of_block(drive)
        # An item across the end of one block takes its rest from the next block, as two
        # 16-bit cycles would; items past the end of the transfer read as zero.
        return bytes(out.ljust(want, b"\0"))

    def _write_data(self, size: int, data: bytes) -> None:
        drive = self._selected()
        done = 0
        while drive is not None and done < len(data):
            s = drive.state
            if not s.status & DRQ or s.xfer != XFER_OUT:
                return  # no write in flight: the rest is ignored
            take = min(len(data) - done, len(s.buffer) - s.pos)
            s.buffer[s.pos:s.pos + take] = data[done:done + take]
            s.pos += take
            done += take
            if s.pos >= len(s.buffer):
                self._end_of_block(drive)

    # --- errors ----------------------------------------------------------------------------

    def _abort(self, s: IdeDriveState) -> None:
        self._stop_transfer(s)
        s.status, s.error = DRDY | ERR, ABRT

    def _idnf(self, s: IdeDriveState) -> None:
        self._stop_transfer(s)
        s.status, s.error = DRDY | ERR, IDNF

    def _write_fault(self, drive: AtaDrive, operation: str, lba: int | None,
                     exc: OSError) -> None:
        self._fail(drive, operation, lba, exc, ABRT, DF)

    def _fail(self, drive: AtaDrive, operation: str, lba: int | None, exc: OSError,
              error: int, extra_status: int) -> None:
        """End the command with ``error``: the task file names the first sector that failed
        (``lba``; None for a flush, which names none)."""
        s = drive.state
        self._stop_transfer(s)
        s.status, s.error = DRDY | ERR | extra_status, error
        if lba is not None:
            self._set_address(drive, lba)
        event = DiskErrorEvent(drive.unit, drive.image.path, operation, lba,
                               exc.errno or errno.EIO, exc.strerror or str(exc))
        self._log(event, "UNC" if error == UNC else "DF + ABRT")
        if self.on_error is not None:
            try:
                self.on_error(event)
            except Exception:  # noqa: BLE001 - an observer never takes the device down
                log.exception("disk error observer failed")

    def _log(self, event: DiskErrorEvent, seen: str) -> None:
        key = (event.unit, event.operation, event.errno)
        now = time.monotonic()
        last = self._last_logged.get(key)
        if last is not None and now - last[0] < ERROR_LOG_INTERVAL_S:
            last[1] += 1
            return
        repeated = f" ({last[1]} more like it not shown)" if last and last[1] else ""
        self._last_logged[key] = [now, 0]
        where = f" at sector {event.lba}" if event.lba is not None else ""
        log.error("disk %d (%s): %s%s failed: %s; the guest sees ERR + %s%s", event.unit,
                  event.path, event.operation, where, event.reason, seen, repeated)

    # --- state -----------------------------------------------------------------------------

    def save(self) -> dict[str, object]:
        """Copies of the channel's and each drive's state, by device name."""
        with self._lock:
            states: dict[str, object] = {"ide": dataclasses.replace(self.bus)}
            for drive in self.drives:
                states[f"ide-drive{drive.unit}"] = dataclasses.replace(
                    drive.state, buffer=bytes(drive.state.buffer))
            return states

    def load(self, devices: dict[str, object]) -> None:
        """Take the states :meth:`save` named (from this guest or a migration's source)."""
        bus = devices["ide"]
        drives = [devices[f"ide-drive{d.unit}"] for d in self.drives]
        for state, cls in ((bus, IdeBusState), *((d, IdeDriveState) for d in drives)):
            if not isinstance(state, cls):
                raise TypeError(f"expected {cls.__name__}, got {type(state).__name__}")
        with self._lock:
            self.bus = dataclasses.replace(bus)
            for drive, state in zip(self.drives, drives):
                drive.state = dataclasses.replace(state, buffer=bytearray(state.buffer))
