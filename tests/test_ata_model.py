"""The ATA channel against a model (hypothesis state machine): random commands of every data
form, addresses in and past the disk, PIO items of 16 and 32 bits one by one or as strings of
any length (across DRQ blocks and past a transfer's end), multiple-mode changes, software
resets, and migrations of the device state at any point.  The model is a byte stream per
command: reads give the disk's bytes in order (zeroes past the end), writes reach the image a
whole DRQ block at a time, and every byte the image holds is the model's."""

from __future__ import annotations

import os
import tempfile

from _ata_helpers import Driver
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pymig import vmstate
from pymig.disk import SECTOR_BYTES, DiskImage
from pymig.guest.base import StateShape
from pymig.kvm import ata
from pymig.kvm.statedesc import IDE_BUS, IDE_DRIVE

SIZES = (48, 80)  # sectors of the master and the slave

COMMANDS = {  # name: (command, write, lba48, multiple)
    "read": (ata.READ_SECTORS, False, False, False),
    "write": (ata.WRITE_SECTORS, True, False, False),
    "read_ext": (ata.READ_SECTORS_EXT, False, True, False),
    "write_ext": (ata.WRITE_SECTORS_EXT, True, True, False),
    "read_multiple": (ata.READ_MULTIPLE, False, False, True),
    "write_multiple": (ata.WRITE_MULTIPLE, True, False, True),
    "read_multiple_ext": (ata.READ_MULTIPLE_EXT, False, True, True),
    "write_multiple_ext": (ata.WRITE_MULTIPLE_EXT, True, True, True),
}


class AtaModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory(prefix="pymig-ata-model-")
        self.paths = []
        for unit, sectors in enumerate(SIZES):
            path = os.path.join(self.dir.name, f"d{unit}.img")
            with open(path, "wb") as f:
                f.truncate(sectors * SECTOR_BYTES)
            self.paths.append(path)
        self.disks = [bytearray(n * SECTOR_BYTES) for n in SIZES]
        self.channel = self._channel()
        self.drv = Driver(self.channel)
        self.mults = [ata.MAX_MULT_SECTORS] * len(SIZES)  # each drive's multiple setting
        self.unit = 0
        self.xfer = None  # (unit, write, first byte on disk, stream bytes, block bytes, done)
        self.pending = bytearray()
        self.counter = 0

    def _channel(self) -> ata.AtaChannel:
        return ata.AtaChannel([DiskImage(p) for p in self.paths])

    def teardown(self):
        for drive in self.channel.drives:
            drive.image.close()
        self.dir.cleanup()

    # --- commands --------------------------------------------------------------------------

    @rule(name=st.sampled_from(sorted(COMMANDS)), unit=st.integers(0, 1),
          lba=st.integers(0, max(SIZES) + 4), count=st.integers(0, 40))
    def command(self, name, unit, lba, count):
        command, write, lba48, multiple = COMMANDS[name]
        (self.drv.lba48 if lba48 else self.drv.lba28)(lba, count, unit=unit)
        status = self.drv.command(command)
        if self.xfer is not None:  # ignored while DRQ: the transfer in flight goes on
            assert status & ata.DRQ
            return
        self.unit = unit
        n = count or (65536 if lba48 else 256)
        if multiple and not self.mults[unit]:
            assert (status, self.drv.error()) == (ata.DRDY | ata.ERR, ata.ABRT)
        elif lba + n > SIZES[unit]:
            assert (status, self.drv.error()) == (ata.DRDY | ata.ERR, ata.IDNF)
        else:
            assert status == ata.DRDY | ata.DSC | ata.DRQ
            block = (self.mults[unit] if multiple else 1) * SECTOR_BYTES
            self.xfer = [unit, write, lba * SECTOR_BYTES, n * SECTOR_BYTES, block, 0]
            self.pending = bytearray()

    @rule(size=st.sampled_from([2, 4]), items=st.integers(1, 700), string=st.booleans())
    def move_data(self, size, items, string):
        nbytes = size * items
        if self.xfer is not None and self.xfer[1]:
            self.counter += 1
            data = bytes((self.counter * 7 + i * 13) & 0xFF for i in range(nbytes))
            self.drv.write_items(data, size, string)
            self._written(data)
        else:
            got = self.drv.read_items(size, items, string)
            if self.xfer is None:
                assert got == bytes(nbytes)
                return
            unit, _, first, total, _, done = self.xfer
            take = min(nbytes, total - done)
            assert got[:take] == bytes(self.disks[unit][first + done:first + done + take])
            assert got[take:] == bytes(nbytes - take)
            self.xfer[5] += take
            if self.xfer[5] == total:
                self.xfer = None

    def _written(self, data: bytes) -> None:
        unit, _, first, total, block, done = self.xfer
        take = min(len(data), total - done)
        self.pending += data[:take]
        done += take
        # whole DRQ blocks reach the image; the last block of a command may be short
        applied = done - len(self.pending)
        while self.pending:
            end = min(applied + block, total)
            if done < end:
                break
            size = end - applied
            self.disks[unit][first + applied:first + end] = self.pending[:size]
            del self.pending[:size]
            applied = end
        self.xfer[5] = done
        if done == total:
            self.xfer = None

    @rule(count=st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32]))
    def set_multiple(self, count):
        self.drv.select(self.unit)
        self.drv.out(2, count)
        status = self.drv.command(ata.SET_MULTIPLE)
        if self.xfer is not None:
            return
        if count in ata.MULT_SETTINGS:
            assert status == ata.DRDY | ata.DSC
            self.mults[self.unit] = count
        else:
            assert (status, self.drv.error()) == (ata.DRDY | ata.ERR, ata.ABRT)

    @rule()
    def software_reset(self):
        self.channel.write(ata.CTL_PORT, 1, ata.SRST)
        assert self.drv.alt_status() & ata.BSY
        self.channel.write(ata.CTL_PORT, 1, 0)
        self.xfer = None  # the data of an unfinished block is lost
        self.pending = bytearray()
        self.unit = 0

    @rule()
    def migrate(self):
        """The state goes through its encoding, bounded by the disks, into a new channel on
        the same images; the old channel is gone."""
        saved = self.channel.save()
        loaded = {}
        for name, obj in saved.items():
            vmsd = IDE_BUS if name == "ide" else IDE_DRIVE
            unit = 0 if name == "ide" else int(name[-1])
            target = vmsd.factory()
            vmstate.load(vmsd, target, vmstate.save(vmsd, obj), vmsd.version_id,
                         StateShape(1, 1 << 24, unit, disk_sectors=SIZES))
            loaded[name] = target
        for drive in self.channel.drives:
            drive.image.close()
        self.channel = self._channel()
        self.channel.load(loaded)
        self.drv = Driver(self.channel)

    # --- what must always hold -------------------------------------------------------------

    @invariant()
    def images_hold_the_model(self):
        for path, disk in zip(self.paths, self.disks):
            with open(path, "rb") as f:
                assert f.read() == bytes(disk)

    @invariant()
    def drq_says_whether_data_is_owed(self):
        status = self.drv.alt_status()  # the drive in flight stays selected
        assert bool(status & ata.DRQ) == (self.xfer is not None), (status, self.xfer)


TestAtaModel = AtaModel.TestCase
TestAtaModel.settings = settings(stateful_step_count=40, deadline=None)
