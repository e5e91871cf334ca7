"""How the KVM guest's vCPU and device state travel: declarative state descriptions.

Field widths follow ``linux/kvm.h`` so a value that does not fit the register it came from is
refused on save, and the stream analyzer can print every register by name.  The variable
parts (XSAVE area, MSR and XCR lists, local APIC page) are length-prefixed and bounded.
Every field declares the values a destination takes (:class:`pymig.vmstate.Bound`): flags
that KVM reports as single bits, vectors, privilege levels and flag words within what
``linux/kvm.h`` defines, sizes against the VM the destination built; a register that may hold
anything says so.
"""

from __future__ import annotations

import dataclasses

from pymig._core import kvm as _kvm
from pymig.disk import SECTOR_BYTES
from pymig.guest.base import StateShape, StateSpec
from pymig.kvm.ata import (DATA_COMMANDS, DEVCTL_BITS, DRQ, ERROR_BITS, IDENTIFY,
                           MAX_BLOCK_BYTES, MAX_LBA48_COUNT, MULT_SETTINGS, STATUS_BITS,
                           XFER_IN, XFER_NONE, XFER_OUT, IdeBusState, IdeDriveState)
from pymig.kvm.cpustate import (CpuState, DebugRegisters, DescriptorTable, Registers,
                                Segment, SpecialRegisters, VcpuEvents)
from pymig.kvm.devices import A20State, ControlPortState, SerialState
from pymig.vmstate import Field, VMStateDescription, any_value

BIT = {"hi": 1}  # a flag KVM reports as 0 or 1
U32_MAX = (1 << 32) - 1
GPR = any_value("a register: the guest may hold any value in it")
VALIDATED = any_value("KVM_SET_* checks it against what the VM allows and refuses the rest")


def _only_bits(mask: int):
    def check(value, values) -> str | None:
        return f"has bits {value & ~mask:#x} outside {mask:#x}" if value & ~mask else None

    return check


def _at_most(other: str):
    def check(value, values) -> str | None:
        return f"more than {other} ({values[other]})" if value > values[other] else None

    return check


def _same_length_as(other: str):
    def check(value, values) -> str | None:
        if len(value) != len(values[other]):
            return f"{len(value)} values for {len(values[other])} entries of {other}"
        return None

    return check


SEGMENT = VMStateDescription(
    "segment", version_id=1, minimum_version_id=1, factory=Segment,
    fields=[Field.u64("base", bound=GPR), Field.u32("limit", bound=GPR),
            Field.u16("selector", bound=GPR), Field.u8("type", hi=15),
            Field.u8("present", **BIT), Field.u8("dpl", hi=3), Field.u8("db", **BIT),
            Field.u8("s", **BIT), Field.u8("l", **BIT), Field.u8("g", **BIT),
            Field.u8("avl", **BIT), Field.u8("unusable", **BIT)])

DTABLE = VMStateDescription(
    "dtable", version_id=1, minimum_version_id=1, factory=DescriptorTable,
    fields=[Field.u64("base", bound=GPR), Field.u16("limit", bound=GPR)])

REGS = VMStateDescription(
    "regs", version_id=1, minimum_version_id=1, factory=Registers,
    fields=[Field.u64(name, bound=GPR) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")])

SREGS = VMStateDescription(
    "sregs", version_id=1, minimum_version_id=1, factory=SpecialRegisters,
    fields=[*(Field.struct(name, SEGMENT)
              for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
            Field.struct("gdt", DTABLE), Field.struct("idt", DTABLE),
            *(Field.u64(name, bound=VALIDATED) for name in ("cr0", "cr2", "cr3", "cr4")),
            Field.u64("cr8", hi=15),  # the task priority: four bits
            Field.u64("efer", bound=VALIDATED), Field.u64("apic_base", bound=VALIDATED),
            Field.array("interrupt_bitmap", "u64", 4,
                        bound=any_value("one bit per vector: any set of the 256 vectors"))])

# kvm_vcpu_events: flags, shadows and vectors as linux/kvm.h defines them.
EVENT_FLAGS = 0x3F  # NMI_PENDING | SIPI_VECTOR | SHADOW | SMM | PAYLOAD | TRIPLE_FAULT
EVENTS = VMStateDescription(
    "events", version_id=1, minimum_version_id=1, factory=VcpuEvents,
    fields=[Field.u8("exception_injected", **BIT), Field.u8("exception_nr", hi=31),
            Field.u8("exception_has_error_code", **BIT), Field.u8("exception_pending", **BIT),
            Field.u32("exception_error_code", bound=GPR),
            Field.u8("interrupt_injected", **BIT),
            Field.u8("interrupt_nr", bound=any_value("an interrupt vector: any of the 256")),
            Field.u8("interrupt_soft", **BIT),
            Field.u8("interrupt_shadow", hi=3),  # MOV_SS | STI
            Field.u8("nmi_injected", **BIT), Field.u8("nmi_pending", hi=2),  # KVM queues two
            Field.u8("nmi_masked", **BIT),
            Field.u32("sipi_vector", hi=255), Field.u32("flags", hi=EVENT_FLAGS),
            Field.u8("smi_smm", **BIT), Field.u8("smi_pending", **BIT),
            Field.u8("smi_inside_nmi", **BIT), Field.u8("smi_latched_init", **BIT),
            Field.u8("triple_fault_pending", **BIT), Field.u8("exception_has_payload", **BIT),
            Field.u64("exception_payload", bound=any_value("a CR2 or DR6 value"))])

DEBUGREGS = VMStateDescription(
    "debugregs", version_id=1, minimum_version_id=1, factory=DebugRegisters,
    fields=[Field.array("db", "u64", 4, bound=any_value("breakpoint addresses")),
            Field.u64("dr6", hi=U32_MAX), Field.u64("dr7", hi=U32_MAX),  # KVM: upper half 0
            Field.u64("flags", hi=0)])  # KVM takes no flags


LAPIC_BYTES = 1024
MAX_XCRS = 16

# The variable parts are sized by the VM the destination built: the XSAVE area exactly the
# VM's KVM_CAP_XSAVE2 size (what KVM_SET_XSAVE reads), the local APIC page exactly 1024
# bytes with an in-kernel irqchip and absent without one, MSR lists no longer than one
# KVM_SET_MSRS call takes and each value list as long as its index list.
CPU = VMStateDescription(
    "cpu", version_id=CpuState.VERSION, minimum_version_id=1, factory=CpuState,
    fields=[Field.u32("index", lo=lambda g: g.instance, hi=lambda g: g.instance),
            Field.struct("regs", REGS), Field.struct("sregs", SREGS),
            Field.buffer("xsave", max_size=64 << 10, exact=lambda g: g.xsave_size),
            Field.varray("xcr_index", "u32", max_count=MAX_XCRS, hi=0),  # XCR0: all KVM sets
            Field.varray("xcr_value", "u64", max_count=MAX_XCRS,
                         check=_same_length_as("xcr_index")),
            Field.varray("msr_index", "u32", max_count=_kvm.MAX_MSRS,
                         bound=any_value("MSR numbers: KVM refuses one it does not know")),
            Field.varray("msr_value", "u64", max_count=_kvm.MAX_MSRS,
                         check=_same_length_as("msr_index")),
            Field.buffer("lapic", max_size=4096,
                         exact=lambda g: LAPIC_BYTES if g.irqchip else 0),
            Field.u32("mp_state", hi=4),  # RUNNABLE .. SIPI_RECEIVED: x86's states
            Field.struct("events", EVENTS), Field.struct("debugregs", DEBUGREGS),
            Field.u64("tsc", bound=GPR),
            Field.u32("tsc_khz", bound=any_value("the source's TSC rate, for information"))])

SERIAL = VMStateDescription(
    "serial", version_id=SerialState.VERSION, minimum_version_id=1, factory=SerialState,
    fields=[Field.u8("ier", hi=0x0F), Field.u8("lcr", bound=any_value("eight line bits")),
            Field.u8("mcr", hi=0x1F), Field.u8("scr", bound=any_value("a scratch byte")),
            Field.u8("dll", bound=any_value("divisor latch, low byte")),
            Field.u8("dlm", bound=any_value("divisor latch, high byte")),
            Field.u8("fcr", check=_only_bits(0xC9))])

A20 = VMStateDescription(
    "a20", version_id=A20State.VERSION, minimum_version_id=1, factory=A20State,
    fields=[Field.u8("value", check=_only_bits(0xFE))])  # bit 0 resets: never kept

CONTROL_PORT = VMStateDescription(
    "control", version_id=ControlPortState.VERSION, minimum_version_id=1,
    factory=ControlPortState,
    fields=[Field.u64("events", bound=any_value("a count of events")),
            Field.u32("last_event", hi=0xFF),  # an event's low byte
            Field.u64("last_argument", hi=(1 << 56) - 1),  # the rest of a 64-bit write
            Field.u64("error_events", check=_at_most("events"))])

DEVICES = {"serial": SERIAL, "a20": A20, "control": CONTROL_PORT}

# The ATA channel (pymig.kvm.ata): the drive selected and the device control register, then
# per drive its task file, status, multiple mode and the PIO command in flight, bounded by the
# disk the destination opened for that drive (its sectors) and by what a DRQ block can hold.
IDE_BUS = VMStateDescription(
    "ide", version_id=IdeBusState.VERSION, minimum_version_id=1, factory=IdeBusState,
    fields=[Field.u8("unit", hi=1),  # master or slave, present or not: a guest may select either
            Field.u8("devctl", check=_only_bits(DEVCTL_BITS))])

TASK_FILE = any_value("a task-file register: the guest may write any byte to it")


def _capacity(shape: StateShape) -> int:
    return shape.disk_sectors[shape.instance]


def _idle(values) -> bool:
    """No command in flight, or one whose data is not the disk's (IDENTIFY)."""
    return values["xfer"] == XFER_NONE or values["command"] == IDENTIFY


def _drq_says_transfer(value, values) -> str | None:
    if bool(values["status"] & DRQ) != (value != XFER_NONE):
        return f"a transfer {'without' if value else 'with'} DRQ in the status"
    return None


def _command_moves_data(value, values) -> str | None:
    xfer = values["xfer"]
    if xfer == XFER_NONE:
        return "a command with no transfer in flight" if value else None
    if value == IDENTIFY:
        return None if xfer == XFER_IN else "IDENTIFY sends no data to the device"
    if value not in DATA_COMMANDS:
        return "not a command that moves data"
    return None if DATA_COMMANDS[value][0] == xfer else "the transfer goes the other way"


def _no_address_when_idle(value, values) -> str | None:
    return "an address with no disk transfer in flight" if value and _idle(values) else None


def _command_span(value, values) -> str | None:
    if _idle(values):
        return _no_address_when_idle(value, values)
    lba = values["lba"]
    if not lba < value <= lba + MAX_LBA48_COUNT:
        return f"a command ending there cannot be at sector {lba} (at most {MAX_LBA48_COUNT})"
    return None


def _block_fits(value, values) -> str | None:
    n, xfer = len(value), values["xfer"]
    if xfer == XFER_NONE:
        return "bytes with no transfer in flight" if n else None
    if values["command"] == IDENTIFY:
        return None if n == SECTOR_BYTES else f"IDENTIFY sends {SECTOR_BYTES} bytes"
    sectors, rest = divmod(n, SECTOR_BYTES)
    per_block = values["mult_sectors"] if DATA_COMMANDS[values["command"]][2] else 1
    if rest or not 1 <= sectors <= per_block:
        return f"not 1 to {per_block} whole sectors"
    if values["lba"] + sectors > values["end_lba"]:
        return "a block past the command's end"
    return None


def _inside_block(value, values) -> str | None:
    n = len(values["buffer"])
    if value % 2 or (value >= n if n else value):
        return f"not an even position inside the {n}-byte block"
    return None


IDE_DRIVE = VMStateDescription(
    "ide-drive", version_id=IdeDriveState.VERSION, minimum_version_id=1,
    factory=IdeDriveState,
    fields=[*(Field.u8(name, bound=TASK_FILE) for name in (
                "feature", "hob_feature", "nsector", "hob_nsector", "sector", "hob_sector",
                "lcyl", "hob_lcyl", "hcyl", "hob_hcyl", "select")),
            Field.u8("status", check=_only_bits(STATUS_BITS)),
            Field.u8("error", check=_only_bits(ERROR_BITS)),
            Field.u8("mult_sectors", hi=max(MULT_SETTINGS),
                     check=lambda v, _: None if v in MULT_SETTINGS else
                     f"not one of {list(MULT_SETTINGS)}"),
            Field.bool("lba48", bound=any_value("which address form the last command used")),
            Field.u8("xfer", hi=XFER_OUT, check=_drq_says_transfer),
            Field.u8("command", check=_command_moves_data),
            Field.u64("lba", hi=_capacity, check=_no_address_when_idle),
            Field.u64("end_lba", hi=_capacity, check=_command_span),
            Field.buffer("buffer", max_size=MAX_BLOCK_BYTES, check=_block_fits),
            Field.u16("pos", check=_inside_block)])

DISK_DEVICES = {"ide": IDE_BUS, "ide-drive": IDE_DRIVE}  # a guest with disks has these too


def kvm_state_specs(shape: StateShape) -> list[StateSpec]:
    """The KVM guest's state entries: one ``cpu`` per vCPU, then its devices (the ATA channel
    and one ``ide-drive`` per disk when it has disks), each bounded by ``shape`` (the
    guest's, with the entry's instance)."""
    specs = [StateSpec("cpu", i, CPU, cpu=i, shape=dataclasses.replace(shape, instance=i))
             for i in range(shape.vcpus)]
    specs += [StateSpec(name, 0, vmsd, device=name, shape=shape)
              for name, vmsd in DEVICES.items()]
    if shape.disk_sectors:  # the ATA channel exists with its disks
        specs.append(StateSpec("ide", 0, IDE_BUS, device="ide", shape=shape))
        specs += [StateSpec("ide-drive", unit, IDE_DRIVE, device=f"ide-drive{unit}",
                            shape=dataclasses.replace(shape, instance=unit))
                  for unit in range(len(shape.disk_sectors))]
    return specs
