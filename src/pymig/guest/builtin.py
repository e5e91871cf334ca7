"""The built-in workloads on KVM: their images, the guest environment they run in, and how the
vCPUs enter them.

What the workloads do, their parameters, shares, parameter block and mailbox are defined once in
:mod:`pymig.guest.workloads`, for the KVM and the simulated guest alike; this module adds only
what KVM needs.  Guest-physical layout of low RAM (``asm/_defs.S``, docs/vmm.md)::

    0x1000  GDT               0x1800  TSS               0x2000  stacks, 1 KiB per vCPU
    0x5000  parameter block   0x6000  mailbox           0x7000  per-vCPU locals (64 B each)
    0x8000  workload code     0x10000 page tables       0x100000 working set / region
    0xfeb00000 control MMIO page (never RAM)

``idle`` runs in 32-bit protected mode at CPL 0 (it only halts), and so does ``diskcheck`` (it
uses port I/O, the instructions of CPL 0; its time goes to I/O exits, not to the emulation of
that mode); the others in 64-bit long mode at CPL 3, the only mode kvm_pvm runs natively, with
RSI = vCPU index.
"""

from __future__ import annotations

from importlib import resources

from pymig.guest import loader
from pymig.guest.base import GuestConfig
from pymig.guest.layout import MAX_VCPUS, PARAMS_GPA
from pymig.guest.workloads import Workload, pack_params, resolve
from pymig.kvm.cpustate import SpecialRegisters

CODE_ADDR = 0x8000
STACK_BASE = 0x2000
STACK_BYTES = 0x400
USER64_WORKLOADS = ("dirtier", "selfcheck", "compute")

assert STACK_BASE + STACK_BYTES * MAX_VCPUS <= PARAMS_GPA - 0x1000


def image(workload: str) -> bytes:
    """The checked-in flat binary of a built-in workload (loaded at CODE_ADDR)."""
    return resources.files("pymig.guest").joinpath("bin", f"{workload}.bin").read_bytes()


def stack_top(index: int) -> int:
    return STACK_BASE + STACK_BYTES * (index + 1)


def check_config(config: GuestConfig) -> Workload:
    """The workload of a KVM ``config``, checked against what the KVM environment needs on top
    of :func:`pymig.guest.workloads.resolve`: RAM at guest-physical 0 (its tables, the
    parameter block and the code live there) and the control MMIO page outside RAM."""
    from pymig.kvm.devices import CONTROL_MMIO

    workload = resolve(config)
    if workload.name == "diskcheck":
        if not config.disks:
            raise ValueError("diskcheck needs a disk (--disk PATH)")
        master = config.disks[0]
        if master.readonly:
            raise ValueError(f"diskcheck writes its disk, and {master.path} is read-only")
        if workload.params.disk_bytes > master.size_bytes:
            raise ValueError(f"diskcheck: a working set of {workload.params.disk_bytes} bytes "
                             f"does not fit on {master.path} ({master.size_bytes} bytes)")
    if any(b.guest_phys_addr <= CONTROL_MMIO < b.guest_phys_addr + b.size_bytes
           for b in config.blocks):
        raise ValueError(f"built-in workloads need guest-physical {CONTROL_MMIO:#x} (the "
                         f"control MMIO page) outside RAM; use the PC layout")
    if not any(b.guest_phys_addr == 0 for b in config.blocks):
        raise ValueError("built-in workloads need RAM at guest-physical 0")
    return workload


def memory_writes(workload: Workload, tsc_khz: int, ram_top: int) -> list[tuple[int, bytes]]:
    """What the host writes into a source guest's RAM before start: the GDT, the TSS, the
    parameter block, the code and (64-bit workloads) page tables mapping all of RAM."""
    code = image(workload.name)
    writes = [(loader.GDT_ADDR, loader.gdt_bytes()), (loader.TSS_ADDR, loader.tss_bytes()),
              (PARAMS_GPA, pack_params(workload, tsc_khz)), (CODE_ADDR, code)]
    if workload.name in USER64_WORKLOADS:
        writes += loader.identity_page_tables(max(ram_top, 1 << 32),
                                              loader.code_pages(CODE_ADDR, len(code)))
    return writes


def entry(workload: str, base: SpecialRegisters, index: int) -> loader.Entry:
    """How vCPU ``index`` enters ``workload``."""
    enter = loader.user64_entry if workload in USER64_WORKLOADS else loader.flat_entry
    return enter(base, CODE_ADDR, stack_top(index), index)
