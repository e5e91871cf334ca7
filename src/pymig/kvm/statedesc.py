"""How the KVM guest's vCPU and device state travel: declarative state descriptions.

Field widths follow ``linux/kvm.h`` so a value that does not fit the register it came from is
refused on save, and the stream analyzer can print every register by name.  The variable
parts (XSAVE area, MSR and XCR lists, local APIC page) are length-prefixed and bounded.
"""

from __future__ import annotations

from pymig.guest.base import StateSpec
from pymig.kvm.cpustate import (CpuState, DebugRegisters, DescriptorTable, Registers,
                                Segment, SpecialRegisters, VcpuEvents)
from pymig.kvm.devices import A20State, ControlPortState, SerialState
from pymig.vmstate import Field, VMStateDescription

SEGMENT = VMStateDescription(
    "segment", version_id=1, minimum_version_id=1, factory=Segment,
    fields=[Field.u64("base"), Field.u32("limit"), Field.u16("selector"), Field.u8("type"),
            Field.u8("present"), Field.u8("dpl"), Field.u8("db"), Field.u8("s"), Field.u8("l"),
            Field.u8("g"), Field.u8("avl"), Field.u8("unusable")])

DTABLE = VMStateDescription(
    "dtable", version_id=1, minimum_version_id=1, factory=DescriptorTable,
    fields=[Field.u64("base"), Field.u16("limit")])

REGS = VMStateDescription(
    "regs", version_id=1, minimum_version_id=1, factory=Registers,
    fields=[Field.u64(name) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")])

SREGS = VMStateDescription(
    "sregs", version_id=1, minimum_version_id=1, factory=SpecialRegisters,
    fields=[*(Field.struct(name, SEGMENT)
              for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
            Field.struct("gdt", DTABLE), Field.struct("idt", DTABLE),
            *(Field.u64(name) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                           "apic_base")),
            Field.array("interrupt_bitmap", "u64", 4)])

EVENTS = VMStateDescription(
    "events", version_id=1, minimum_version_id=1, factory=VcpuEvents,
    fields=[Field.u8("exception_injected"), Field.u8("exception_nr"),
            Field.u8("exception_has_error_code"), Field.u8("exception_pending"),
            Field.u32("exception_error_code"),
            Field.u8("interrupt_injected"), Field.u8("interrupt_nr"),
            Field.u8("interrupt_soft"), Field.u8("interrupt_shadow"),
            Field.u8("nmi_injected"), Field.u8("nmi_pending"), Field.u8("nmi_masked"),
            Field.u32("sipi_vector"), Field.u32("flags"),
            Field.u8("smi_smm"), Field.u8("smi_pending"), Field.u8("smi_inside_nmi"),
            Field.u8("smi_latched_init"), Field.u8("triple_fault_pending"),
            Field.u8("exception_has_payload"), Field.u64("exception_payload")])

DEBUGREGS = VMStateDescription(
    "debugregs", version_id=1, minimum_version_id=1, factory=DebugRegisters,
    fields=[Field.array("db", "u64", 4), Field.u64("dr6"), Field.u64("dr7"),
            Field.u64("flags")])


def _msr_lists_match(cpu: CpuState, version_id: int) -> None:
    if len(cpu.msr_index) != len(cpu.msr_value) or len(cpu.xcr_index) != len(cpu.xcr_value):
        raise ValueError("MSR or XCR index and value lists differ in length")


CPU = VMStateDescription(
    "cpu", version_id=CpuState.VERSION, minimum_version_id=1, factory=CpuState,
    post_load=_msr_lists_match,
    fields=[Field.u32("index"), Field.struct("regs", REGS), Field.struct("sregs", SREGS),
            Field.buffer("xsave", max_size=64 << 10),
            Field.varray("xcr_index", "u32", max_count=16),
            Field.varray("xcr_value", "u64", max_count=16),
            Field.varray("msr_index", "u32", max_count=4096),
            Field.varray("msr_value", "u64", max_count=4096),
            Field.buffer("lapic", max_size=4096), Field.u32("mp_state"),
            Field.struct("events", EVENTS), Field.struct("debugregs", DEBUGREGS),
            Field.u64("tsc"), Field.u32("tsc_khz")])

SERIAL = VMStateDescription(
    "serial", version_id=SerialState.VERSION, minimum_version_id=1, factory=SerialState,
    fields=[Field.u8(name) for name in ("ier", "lcr", "mcr", "scr", "dll", "dlm", "fcr")])

A20 = VMStateDescription(
    "a20", version_id=A20State.VERSION, minimum_version_id=1, factory=A20State,
    fields=[Field.u8("value")])

CONTROL_PORT = VMStateDescription(
    "control", version_id=ControlPortState.VERSION, minimum_version_id=1,
    factory=ControlPortState,
    fields=[Field.u64("events"), Field.u32("last_event"), Field.u64("last_argument"),
            Field.u64("error_events")])

DEVICES = {"serial": SERIAL, "a20": A20, "control": CONTROL_PORT}


def kvm_state_specs(vcpus: int) -> list[StateSpec]:
    """The KVM guest's state entries: one ``cpu`` per vCPU, then its devices."""
    specs = [StateSpec("cpu", i, CPU, cpu=i) for i in range(vcpus)]
    specs += [StateSpec(name, 0, vmsd, device=name) for name, vmsd in DEVICES.items()]
    return specs
