"""Everything a destination needs to continue a vCPU exactly where the source stopped.

:class:`CpuState` is a plain dataclass (``VERSION = 1``) of typed fields only (ints, bools,
bytes, lists of ints, nested dataclasses), so a declarative state description can serialise
it.  :func:`capture` reads it from a paused vCPU, :func:`restore` writes it into a paused vCPU
of a VM built from the same configuration (same host CPU features and XSAVE size).

Restore order follows QEMU's ``kvm_arch_put_registers``: general registers, XSAVE, XCRs,
special registers, MSRs, MP state, local APIC, events, debug registers.

The TSC travels as the IA32_TSC MSR (0x10) and is restored to exactly the saved value: the
guest resumes with the TSC it stopped with, so it never goes backwards, and the downtime is
invisible to it (QEMU does the same without kvmclock).  Advancing it by the elapsed wall time
would need both hosts' clocks to agree and would show the guest a jump it cannot tell from a
hang; a guest that wants wall time reads it from its own devices.  Within one process a pause
does not stop the TSC: the guest clock keeps running while it is paused or throttled.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
from dataclasses import dataclass, field

from pymig._core import kvm as _kvm
from pymig.errors import KvmError

MSR_IA32_TSC = 0x10

SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass
class Segment:
    VERSION = 1
    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the descriptor's L bit, named as in kvm.h
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass
class DescriptorTable:
    VERSION = 1
    base: int = 0
    limit: int = 0


@dataclass
class Registers:
    VERSION = 1
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 2


@dataclass
class SpecialRegisters:
    VERSION = 1
    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: list[int] = field(default_factory=lambda: [0, 0, 0, 0])


@dataclass
class VcpuEvents:
    """KVM_GET_VCPU_EVENTS, flattened (field names as in kvm.h with the sub-struct prefix)."""

    VERSION = 1
    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    sipi_vector: int = 0
    flags: int = 0
    smi_smm: int = 0
    smi_pending: int = 0
    smi_inside_nmi: int = 0
    smi_latched_init: int = 0
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0


@dataclass
class DebugRegisters:
    VERSION = 1
    db: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    dr6: int = 0
    dr7: int = 0
    flags: int = 0


@dataclass
class CpuState:
    """One vCPU's complete architectural state as KVM exposes it."""

    VERSION = 1
    index: int = 0
    regs: Registers = field(default_factory=Registers)
    sregs: SpecialRegisters = field(default_factory=SpecialRegisters)
    xsave: bytes = b""             # XSAVE layout (FPU, SSE, AVX...), the VM's XSAVE2 size
    xcr_index: list[int] = field(default_factory=list)
    xcr_value: list[int] = field(default_factory=list)
    msr_index: list[int] = field(default_factory=list)
    msr_value: list[int] = field(default_factory=list)
    lapic: bytes = b""             # 1024-byte register page; empty without in-kernel irqchip
    mp_state: int = 0
    events: VcpuEvents = field(default_factory=VcpuEvents)
    debugregs: DebugRegisters = field(default_factory=DebugRegisters)
    tsc: int = 0                   # IA32_TSC when captured (also in the MSR lists)
    tsc_khz: int = 0               # the source's guest TSC frequency

    def msr(self, index: int) -> int:
        return self.msr_value[self.msr_index.index(index)]


def _segment(d: dict) -> Segment:
    return Segment(**{name: d[name] for name in _field_names(Segment)})


def sregs_from_kvm(d: dict) -> SpecialRegisters:
    """SpecialRegisters from the dict KVM_GET_SREGS returns."""
    segs = {name: _segment(d[name]) for name in SEGMENT_NAMES}
    tables = {name: DescriptorTable(d[name]["base"], d[name]["limit"]) for name in ("gdt", "idt")}
    return SpecialRegisters(**segs, **tables, cr0=d["cr0"], cr2=d["cr2"], cr3=d["cr3"],
                            cr4=d["cr4"], cr8=d["cr8"], efer=d["efer"],
                            apic_base=d["apic_base"], interrupt_bitmap=list(d["interrupt_bitmap"]))


def _shallow_dict(obj) -> dict:
    """A flat dataclass's fields by name: what the ioctl wrappers read (``dataclasses.asdict``
    deep-copies every value, a cost restore() pays inside the downtime)."""
    return {name: getattr(obj, name) for name in _field_names(type(obj))}


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def sregs_to_kvm(s: SpecialRegisters) -> dict:
    """The dict KVM_SET_SREGS takes (padding fields zero)."""
    out: dict = {}
    for name in SEGMENT_NAMES:
        out[name] = _shallow_dict(getattr(s, name)) | {"padding": 0}
    for name in ("gdt", "idt"):
        table = getattr(s, name)
        out[name] = {"base": table.base, "limit": table.limit, "padding": [0, 0, 0]}
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        out[name] = getattr(s, name)
    out["interrupt_bitmap"] = list(s.interrupt_bitmap)
    return out


def capture(vcpu) -> CpuState:
    """Read the complete state of a paused :class:`pymig.kvm.Vcpu` (out of KVM_RUN, with any
    I/O it exited for already completed)."""
    fd = vcpu.fd
    xcrs = _kvm.get_xcrs(fd)
    msr_index = list(vcpu.vm.kvm.migratable_msrs(vcpu.vm.irqchip))
    msr_value = _kvm.get_msrs(fd, msr_index)
    if len(msr_value) != len(msr_index):
        raise RuntimeError(f"KVM_GET_MSRS stopped at MSR {msr_index[len(msr_value)]:#x}")
    return CpuState(
        index=vcpu.index,
        regs=Registers(**_kvm.get_regs(fd)),
        sregs=sregs_from_kvm(_kvm.get_sregs(fd)),
        xsave=_kvm.get_xsave(fd, vcpu.vm.xsave_size),
        xcr_index=[x for x, _ in xcrs],
        xcr_value=[v for _, v in xcrs],
        msr_index=msr_index,
        msr_value=msr_value,
        lapic=_kvm.get_lapic(fd) if vcpu.vm.irqchip else b"",
        mp_state=_kvm.get_mp_state(fd),
        events=VcpuEvents(**_kvm.get_vcpu_events(fd)),
        debugregs=DebugRegisters(**_kvm.get_debugregs(fd)),
        tsc=msr_value[msr_index.index(MSR_IA32_TSC)] if MSR_IA32_TSC in msr_index else 0,
        tsc_khz=vcpu.vm.kvm.tsc_khz,
    )


def restore(vcpu, state: CpuState) -> None:
    """Write ``state`` into a paused vCPU of a VM built like the source's."""
    fd = vcpu.fd
    if state.lapic and not vcpu.vm.irqchip:
        raise ValueError("the state has a local APIC but this VM has no in-kernel irqchip")
    _kvm.set_regs(fd, _shallow_dict(state.regs))
    _kvm.set_xsave(fd, state.xsave, vcpu.vm.xsave_size)
    _kvm.set_xcrs(fd, list(zip(state.xcr_index, state.xcr_value)))
    _kvm.set_sregs(fd, sregs_to_kvm(state.sregs))
    done = _kvm.set_msrs(fd, list(state.msr_index), list(state.msr_value))
    if done != len(state.msr_index):
        raise KvmError(errno.EINVAL, "KVM_SET_MSRS",
                       f"KVM refused MSR {state.msr_index[done]:#x}")
    _kvm.set_mp_state(fd, state.mp_state)
    if state.lapic:
        _kvm.set_lapic(fd, state.lapic)
    _kvm.set_vcpu_events(fd, _shallow_dict(state.events))
    _kvm.set_debugregs(fd, _shallow_dict(state.debugregs))
