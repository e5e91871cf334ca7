"""Guest images that run one loop in a given x86 mode, and how fast pymig runs them.

Two loops, the same instructions in every mode:

* **reg**: ``1: inc eax; jmp 1b`` (2 instructions an iteration; ``inc rax`` in 64-bit code);
* **store**: ``1: mov dword ptr [0x9000], eax; inc eax; jmp 1b`` (3 instructions, one page).

The modes (:data:`MODES`) are PC boot sectors that stay in real mode or switch to 16-bit or
32-bit protected mode (paging off or on), to long mode with 32-bit code (compatibility mode,
paging on), to 64-bit code at CPL 0, or on to 64-bit code at CPL 3 (``iretq``); and the two
flat-binary entries pymig offers, ``flat`` (32-bit protected mode at CPL 0, paging off) and
``flat64`` (64-bit at CPL 3).  Each boot sector is a plain one: QEMU boots it through SeaBIOS
from a disk image (``benchmarks/guest_modes.py``), and its loop starts at a fixed place,
0000:7d80, where the VMM's side can find it.

The counter is read from the vCPU's registers (a paused guest's ``save_state``), twice; rates
are per wall-clock second and per CPU-second of the vCPU thread, the second the one to compare
on a shared host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from _kvm_helpers import build_image

from pymig.guest import make_config
from pymig.guest.kvm_guest import KvmGuest

STORE_ADDR = 0x9000
FLAT_LOAD = 0x100000
LOOP_OFFSET = {"bootsector": 0x180, "flat": 0x10, "flat64": 0x10}  # where each loop starts
LOOPS = {"reg": 2, "store": 3}  # instructions per iteration

# Boot sectors: each starts in real mode at 0000:7c00 as a PC BIOS hands over.
_PROLOGUE = """
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
    in al, 0x92
    or al, 2
    out 0x92, al
"""

_ENTER_PM = """
    lgdt [gdtr]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
"""

# 2-level paging, 4 MiB pages (CR4.PSE), identity map of 4 GiB; page directory at 0x1000.
_PAGING_32 = """
    mov edi, 0x1000
    mov eax, 0x87
    mov ecx, 1024
1:  mov [edi], eax
    add eax, 0x400000
    add edi, 4
    dec ecx
    jnz 1b
    mov eax, 0x1000
    mov cr3, eax
    mov eax, cr4
    or eax, 0x10
    mov cr4, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
"""

# 4-level paging, 2 MiB pages, identity map of 1 GiB: PML4 0x1000, PDPT 0x2000, PD 0x3000.
_ENTER_LONG = """
    mov edi, 0x1000
    mov ecx, 0xc00
    xor eax, eax
    rep stosd
    mov dword ptr [0x1000], 0x2007
    mov dword ptr [0x2000], 0x3007
    mov edi, 0x3000
    mov eax, 0x87
    mov cx, 512
1:  mov [di], eax
    add eax, 0x200000
    add di, 8
    loop 1b
    mov eax, 0x1000
    mov cr3, eax
    mov eax, 0x20
    mov cr4, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    lgdt [gdtr]
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    ljmp 0x28, offset long
.code64
long:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, 0x7c00
"""

_TO_COMPAT32 = """
    push 0x08
    lea rax, [rip + compat]
    push rax
    lretq
.code32
compat:
"""

_TO_CPL3 = """
    push 0x33
    push 0x7800
    push 0x2
    push 0x3b
    lea rax, [rip + user]
    push rax
    iretq
user:
"""

_GDT = """
.p2align 3
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff   # 0x08 code32
    .quad 0x00cf93000000ffff   # 0x10 data32
    .quad 0x00009b000000ffff   # 0x18 code16
    .quad 0x000093000000ffff   # 0x20 data16
    .quad 0x00af9b000000ffff   # 0x28 code64, DPL 0
    .quad 0x00cff3000000ffff   # 0x30 data, DPL 3
    .quad 0x00affb000000ffff   # 0x38 code64, DPL 3
gdtr:
    .word gdtr - gdt - 1
    .long gdt
.org 510
.byte 0x55, 0xaa
"""


def _loop(kind: str, bits: int, at: int | None = None) -> str:
    counter = "rax" if bits == 64 else "eax"
    store = f"    mov dword ptr [{STORE_ADDR:#x}], eax\n" if kind == "store" else ""
    place = f"    jmp loop\n.org {at:#x}\n" if at is not None else ""
    return f"""
    xor eax, eax
{place}loop:
{store}    inc {counter}
    jmp loop
"""


def _segments(selector: int) -> str:
    return "".join(f"    mov ax, {selector:#x}\n    mov {s}, ax\n" for s in ("ds", "es", "ss"))


def boot_sector_source(mode: str, kind: str) -> str:
    """Assembly of the boot sector for ``mode`` (see MODES) running loop ``kind``."""
    body = _PROLOGUE
    if mode == "real":
        body += _loop(kind, 16, LOOP_OFFSET["bootsector"])
    elif mode == "pm16":
        body += (_ENTER_PM + "    ljmp 0x18, offset pm\npm:\n" + _segments(0x20)
                 + _loop(kind, 16, LOOP_OFFSET["bootsector"]))
    elif mode in ("pm32", "pm32-paging"):
        body += _ENTER_PM + "    ljmp 0x08, offset pm\n.code32\npm:\n" + _segments(0x10)
        if mode == "pm32-paging":
            body += _PAGING_32
        body += _loop(kind, 32, LOOP_OFFSET["bootsector"])
    elif mode == "compat32":
        body += _ENTER_LONG + _TO_COMPAT32 + _loop(kind, 32, LOOP_OFFSET["bootsector"])
    elif mode in ("lm64", "lm64-cpl3"):
        body += (_ENTER_LONG + (_TO_CPL3 if mode == "lm64-cpl3" else "")
                 + _loop(kind, 64, LOOP_OFFSET["bootsector"]))
    else:
        raise ValueError(f"no boot sector for mode {mode!r}")
    return body + _GDT


def flat_source(mode: str, kind: str) -> str:
    """Assembly of a flat binary entered by pymig (``flat``: 32-bit, ``flat64``: 64-bit)."""
    bits = {"flat": 32, "flat64": 64}[mode]
    return (f".intel_syntax noprefix\n.code{bits}\n.global start\nstart:\n"
            + _loop(kind, bits, LOOP_OFFSET[mode]))


@dataclass(frozen=True)
class Mode:
    name: str
    image: str  # "bootsector", "flat" or "flat64"
    what: str


MODES = [
    Mode("real", "bootsector", "boot sector, real mode"),
    Mode("pm16", "bootsector", "boot sector -> 16-bit protected mode"),
    Mode("pm32", "bootsector", "boot sector -> 32-bit protected mode, paging off"),
    Mode("pm32-paging", "bootsector", "boot sector -> 32-bit protected mode, paging on"),
    Mode("compat32", "bootsector", "boot sector -> long mode, 32-bit code (paging on), CPL 0"),
    Mode("lm64", "bootsector", "boot sector -> 64-bit long mode, CPL 0"),
    Mode("lm64-cpl3", "bootsector", "boot sector -> 64-bit long mode, CPL 3"),
    Mode("flat", "flat", "--flat: 32-bit protected mode, CPL 0, paging off"),
    Mode("flat64", "flat64", "--flat64: 64-bit long mode, CPL 3 (the reference)"),
]
MODE_BY_NAME = {m.name: m for m in MODES}
# the loop counts in eax, or rax in 64-bit code
COUNTER_MASKS = {m.name: (1 << (64 if m.name in ("lm64", "lm64-cpl3", "flat64") else 32)) - 1
                 for m in MODES}
REFERENCE = "flat64"


def loop_address(mode: str) -> int:
    """Guest address of the first instruction of ``mode``'s loop."""
    image = MODE_BY_NAME[mode].image
    return (0x7C00 if image == "bootsector" else FLAT_LOAD) + LOOP_OFFSET[image]


def in_loop(mode: str, rip: int) -> bool:
    return 0 <= rip - loop_address(mode) < 16


def build(directory: Path, mode: str, kind: str) -> Path:
    """Assemble the image of ``mode`` with loop ``kind`` into ``directory`` (skips the test
    without GNU as)."""
    image = MODE_BY_NAME[mode].image
    if image == "bootsector":
        source, address = boot_sector_source(mode, kind), 0x7C00
    else:
        source, address = flat_source(mode, kind), FLAT_LOAD
    return build_image(directory, f"{mode}-{kind}", source, address)[0]


@dataclass
class Rate:
    """Instructions per second of one loop: per wall second and per vCPU CPU-second."""

    mode: str
    loop: str
    vmm: str
    per_s: float
    per_cpu_s: float
    seconds: float


def _rate(mode: str, kind: str, vmm: str, first: tuple, last: tuple) -> Rate:
    (n0, t0, c0), (n1, t1, c1) = first[:3], last[:3]
    done = ((n1 - n0) & COUNTER_MASKS[mode]) * LOOPS[kind]
    return Rate(mode, kind, vmm, done / (t1 - t0), done / max(c1 - c0, 1e-9), t1 - t0)


def pymig_guest(path: Path, mode: str) -> KvmGuest:
    """A created (not started) pymig guest running the image of ``mode``."""
    image = MODE_BY_NAME[mode].image
    if image == "bootsector":
        config = make_config(boot_sector=path, memory_bytes=64 << 20)
    else:
        config = make_config(**{image: path}, load_address=FLAT_LOAD, memory_bytes=64 << 20)
    return KvmGuest.create(config)


def _pymig_sample(guest: KvmGuest) -> tuple[int, float, float, int]:
    guest.pause()
    try:
        regs = guest.save_state().cpus[0].regs
        return regs.rax, time.perf_counter(), _vcpu_clock(guest), regs.rip
    finally:
        guest.resume()


def _vcpu_clock(guest: KvmGuest) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(guest.runtime.threads[0].thread_ident))


def measure_pymig(path: Path, mode: str, kind: str, seconds: float = 1.0,
                  cpu_seconds: float = 0.2, timeout: float = 30.0) -> Rate:
    """Run the image of ``mode`` under pymig and count its loop ``kind`` for at least
    ``seconds`` and until the vCPU thread has had ``cpu_seconds`` of CPU (at most ``timeout``
    seconds: a busy host may give it little).  A guest that stops (a triple fault) raises
    its GuestError."""
    with pymig_guest(path, mode) as guest:
        guest.start()
        deadline = time.perf_counter() + timeout
        first = _pymig_sample(guest)
        while not in_loop(mode, first[3]):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{mode}: the loop did not start in {timeout} s")
            time.sleep(0.01)
            first = _pymig_sample(guest)
        while time.perf_counter() < deadline and (
                time.perf_counter() - first[1] < seconds or
                _vcpu_clock(guest) - first[2] < cpu_seconds):
            time.sleep(0.02)
        last = _pymig_sample(guest)
        guest.pause()
    return _rate(mode, kind, "pymig", first, last)
