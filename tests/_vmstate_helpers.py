"""Descriptions and objects shared by the vmstate tests: a small x86-like vCPU."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from pymig.vmstate import Field, VMStateDescription


@dataclass
class Segment:
    base: int = 0
    limit: int = 0
    selector: int = 0
    present: bool = False


@dataclass
class Msr:
    index: int = 0
    value: int = 0


@dataclass
class Cpu:
    rax: int = 0
    rflags: int = 2
    cs: Segment = field(default_factory=Segment)
    nmsrs: int = 0
    msrs: list[Msr] = field(default_factory=list)
    dr: list[int] = field(default_factory=lambda: [0] * 4)
    lapic: bytes = bytes(32)
    note: bytes = b""
    halted: bool = False
    pat: int = 0x0007040600070406
    xcr0: int = 1


SEGMENT_VMSD = VMStateDescription(
    "segment", 1, 1,
    [Field.u64("base"), Field.u32("limit"), Field.u16("selector"), Field.bool("present")],
    factory=Segment,
)
MSR_VMSD = VMStateDescription("msr", 1, 1, [Field.u32("index"), Field.u64("value")], factory=Msr)
PAT_VMSD = VMStateDescription(
    "cpu/pat", 1, 1, [Field.u64("pat")], needed=lambda cpu: cpu.pat != 0x0007040600070406
)
XCR_VMSD = VMStateDescription("cpu/xcr", 1, 1, [Field.u64("xcr0")],
                              needed=lambda cpu: cpu.xcr0 != 1)


def cpu_vmsd(version_id: int = 2,
             subsections: tuple[VMStateDescription, ...] = (PAT_VMSD, XCR_VMSD),
             **hooks: Any) -> VMStateDescription:
    """The vCPU description; version 1 lacks ``halted`` (added in version 2)."""
    fields_ = [
        Field.u64("rax"),
        Field.u64("rflags"),
        Field.struct("cs", SEGMENT_VMSD),
        Field.u32("nmsrs"),
        Field.varray("msrs", MSR_VMSD, count="nmsrs", max_count=64),
        Field.array("dr", "u64", 4),
        Field.buffer("lapic", 32),
        Field.buffer("note", max_size=100),
    ]
    if version_id >= 2:
        fields_.append(Field.bool("halted", version_id=2))
    return VMStateDescription("cpu", version_id, 1, fields_, subsections=subsections, **hooks)


CPU_VMSD = cpu_vmsd()


def sample_cpu() -> Cpu:
    return Cpu(
        rax=0x1122334455667788,
        cs=Segment(base=0xFFFF0000, limit=0xFFFF, selector=0xF000, present=True),
        nmsrs=2,
        msrs=[Msr(0x10, 12345), Msr(0xC0000080, 0xD01)],
        dr=[1, 2, 3, 0xFFFF0FF0],
        lapic=bytes(range(32)),
        note=b"hello",
        halted=True,
    )


def plain(value: Any) -> Any:
    """Dataclasses as dicts (recursively), as :func:`pymig.vmstate.decode` returns them."""
    if is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
