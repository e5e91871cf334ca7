"""Putting code into a KVM guest: boot sectors, flat binaries, and the CPU state to enter them.

* **Boot sector**: exactly 512 bytes, loaded at 0x7c00 and entered in real mode at
  0000:7c00 with DL = 0x80 (first hard disk), SS:SP = 0000:7c00 and interrupts off, as a PC
  BIOS hands over, so the same image runs under QEMU.  There is no BIOS: every interrupt
  vector points at an ``iret`` (so ``int 10h`` returns without doing anything) and output
  goes through the UART at 0x3f8.  A missing 0x55AA signature is warned about, not refused.
* **Flat binary** (``kind="flat"``): loaded at ``load_address`` and entered in 32-bit
  protected mode (flat 4 GiB code/data segments, paging and interrupts off) at ``entry``
  (default: the load address), with ESP = ``stack`` (default: the load address; the stack
  grows below the image).
* **64-bit flat binary** (``kind="flat64"``): the same, entered in 64-bit long mode at CPL 3
  over identity-mapped 2 MiB pages (page tables at 0x10000), the mode kvm_pvm runs natively;
  it may use ports 0-0xfff (the UART, the control port: the TSS's I/O bitmap allows them) or
  the control MMIO page (see :mod:`pymig.kvm.devices`).
* The built-in workloads are flat binaries too: ``idle`` in 32-bit protected mode (it only
  halts), the others in 64-bit long mode at CPL 3 (:func:`user64_mode`), the only mode
  kvm_pvm runs natively, with RSI = vCPU index.

Only vCPU 0 runs an image; other vCPUs wait for INIT/SIPI as on a PC.  A destination never
needs the image: memory and vCPU state come from the migration stream.
"""

from __future__ import annotations

import dataclasses
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from pymig.kvm.cpustate import DescriptorTable, Segment, SpecialRegisters

BOOT_SECTOR_ADDR = 0x7C00
BOOT_SECTOR_BYTES = 512
BOOT_SIGNATURE = b"\x55\xaa"
BOOT_DRIVE = 0x80
IRET_STUB_ADDR = 0x500
GDT_ADDR = 0x1000
TSS_ADDR = 0x1800
# The TSS carries an I/O permission bitmap for ports 0-0xfff (the UART, port 0x92, the control
# ports): at CPL 3, kvm_pvm ignores IOPL but honours the bitmap, so 64-bit user code (the only
# code it runs natively) can use the same ports as code at CPL 0.  The limit includes the 0xff
# byte that ends the bitmap; higher ports #GP.
IO_BITMAP_PORTS = 0x1000
TSS_IO_BITMAP = 0x68  # right after the 104 bytes of a 64-bit TSS
TSS_LIMIT = TSS_IO_BITMAP + IO_BITMAP_PORTS // 8
SEL_CODE, SEL_DATA, SEL_CODE64 = 0x08, 0x10, 0x18
SEL_USER_DATA, SEL_USER_CODE64, SEL_TSS = 0x23, 0x2B, 0x30
PAGE_TABLES_ADDR = 0x10000  # PML4, PDPT, then one page directory per GiB, below 1 MiB
PAGE_TABLES_END = 0x100000
GiB = 1 << 30

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 0x1, 0x2, 0x10, 0x20, 0x10000, 0x80000000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400
# Page-table entry bits: present, writable, user, accessed, dirty, 2 MiB page.  A and D are
# preset so KVM never writes the guest's page tables (they stay out of the dirty log).
PTE_TABLE = 0x1 | 0x2 | 0x4 | 0x20
PTE_4K = PTE_TABLE | 0x40
PTE_2M = PTE_4K | 0x80
PTE_CODE = 0x1 | 0x4 | 0x20  # present, user, accessed: read-only


class ImageError(ValueError):
    """An image that cannot be loaded as asked (size, address, kind)."""


@dataclass
class Entry:
    """How a vCPU starts: its special registers and the general registers that matter."""

    sregs: SpecialRegisters
    rip: int
    rsp: int
    rsi: int = 0
    rdx: int = 0


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((limit >> 16) & 0x0F) | (flags << 4), (base >> 24) & 0xFF)


def gdt_bytes() -> bytes:
    """Null, code32 (0x08), data (0x10), code64 (0x18), user data (0x23), user code64 (0x2b),
    TSS (0x30, 16 bytes): the segments :func:`protected_mode` and :func:`user64_mode` load, so
    a guest reloading a selector gets the segment it already has."""
    return (bytes(8) + _descriptor(0, 0xFFFFF, 0x9B, 0xC) + _descriptor(0, 0xFFFFF, 0x93, 0xC)
            + _descriptor(0, 0xFFFFF, 0x9B, 0xA) + _descriptor(0, 0xFFFFF, 0xF3, 0xC)
            + _descriptor(0, 0xFFFFF, 0xFB, 0xA)
            + _descriptor(TSS_ADDR, TSS_LIMIT, 0x8B, 0x0) + bytes(8))


def tss_bytes() -> bytes:
    """The TSS at TSS_ADDR: no stacks (no IDT either), the I/O bitmap allowing every port below
    IO_BITMAP_PORTS."""
    return (bytes(0x66) + struct.pack("<H", TSS_IO_BITMAP) + bytes(IO_BITMAP_PORTS // 8)
            + b"\xff")


def identity_page_tables(limit_bytes: int, readonly: range = range(0)) -> list[tuple[int, bytes]]:
    """Memory writes for 4-level page tables identity-mapping [0, limit) (limit rounded up to
    whole GiB) for CPL 3: 4 KiB pages for the first 2 MiB, 2 MiB pages above.

    Pages of the first 2 MiB whose frame number is in ``readonly`` (the code) are mapped
    read-only.  Under shadow paging KVM maps a page writable on its first access when the
    guest's PTE is writable and dirty, and logs it dirty right then; read-only code pages
    therefore never show up in the dirty log, whatever KVM rebuilds."""
    gibs = max(1, -(-limit_bytes // GiB))
    pml4, pdpt, pt0 = PAGE_TABLES_ADDR, PAGE_TABLES_ADDR + 0x1000, PAGE_TABLES_ADDR + 0x2000
    pds = PAGE_TABLES_ADDR + 0x3000
    if pds + gibs * 0x1000 > PAGE_TABLES_END:
        raise ImageError(f"cannot identity-map {gibs} GiB below 1 MiB")
    pdpt_entries = b"".join(struct.pack("<Q", (pds + 0x1000 * i) | PTE_TABLE)
                            for i in range(gibs))
    pt_entries = b"".join(struct.pack("<Q", (i << 12) | (PTE_CODE if i in readonly else PTE_4K))
                          for i in range(512))
    pd_entries = struct.pack("<Q", pt0 | PTE_TABLE) + b"".join(
        struct.pack("<Q", (i << 21) | PTE_2M) for i in range(1, 512 * gibs))
    return [(pml4, struct.pack("<Q", pdpt | PTE_TABLE)), (pdpt, pdpt_entries), (pt0, pt_entries),
            (pds, pd_entries)]


def protected_mode(base: SpecialRegisters) -> SpecialRegisters:
    """Flat 32-bit protected mode, paging off, SSE enabled (CR4.OSFXSR), GDT at GDT_ADDR."""
    code = Segment(base=0, limit=0xFFFFFFFF, selector=SEL_CODE, type=0xB, present=1, dpl=0,
                   db=1, s=1, l=0, g=1)
    data = dataclasses.replace(code, selector=SEL_DATA, type=0x3)
    return dataclasses.replace(
        base, cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=_tss(),
        gdt=DescriptorTable(GDT_ADDR, len(gdt_bytes()) - 1), idt=DescriptorTable(0, 0),
        cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE, cr4=CR4_OSFXSR | CR4_OSXMMEXCPT, efer=0)


def user64_mode(base: SpecialRegisters) -> SpecialRegisters:
    """64-bit long mode at CPL 3 over :func:`identity_page_tables`, SSE enabled: the mode
    kvm_pvm runs without emulation.  Ports below IO_BITMAP_PORTS are open through the TSS's
    bitmap (IOPL stays 0).  No IDT: any exception ends in a triple fault."""
    code = Segment(base=0, limit=0xFFFFFFFF, selector=SEL_USER_CODE64, type=0xB, present=1,
                   dpl=3, db=0, s=1, l=1, g=1)
    data = Segment(base=0, limit=0xFFFFFFFF, selector=SEL_USER_DATA, type=0x3, present=1,
                   dpl=3, db=1, s=1, l=0, g=1)
    return dataclasses.replace(
        base, cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=_tss(),
        gdt=DescriptorTable(GDT_ADDR, len(gdt_bytes()) - 1), idt=DescriptorTable(0, 0),
        cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG, cr3=PAGE_TABLES_ADDR,
        cr4=CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT, efer=EFER_LME | EFER_LMA)


def _tss() -> Segment:
    return Segment(base=TSS_ADDR, limit=TSS_LIMIT, selector=SEL_TSS, type=0xB, present=1, s=0)


def real_mode(base: SpecialRegisters) -> SpecialRegisters:
    """Real mode with every segment at 0 (CS:IP = 0000:7c00 as a BIOS leaves it)."""
    code = Segment(base=0, limit=0xFFFF, selector=0, type=0xB, present=1, s=1)
    data = dataclasses.replace(code, type=0x3)
    return dataclasses.replace(base, cs=code, ds=data, es=data, fs=data, gs=data, ss=data,
                               idt=DescriptorTable(0, 0x3FF))


def boot_sector(data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    """Memory writes for a boot sector; the flag says whether it has the 0x55AA signature."""
    if len(data) != BOOT_SECTOR_BYTES:
        raise ImageError(f"a boot sector is exactly {BOOT_SECTOR_BYTES} bytes, not {len(data)}")
    signed = data[510:512] == BOOT_SIGNATURE
    if not signed:
        warnings.warn("boot sector has no 0x55AA signature at offset 510; loading it anyway",
                      stacklevel=2)
    ivt = struct.pack("<HH", IRET_STUB_ADDR, 0) * 256
    return [(0, ivt), (IRET_STUB_ADDR, b"\xcf"), (BOOT_SECTOR_ADDR, data)], signed


def boot_sector_entry(base: SpecialRegisters) -> Entry:
    return Entry(real_mode(base), rip=BOOT_SECTOR_ADDR, rsp=BOOT_SECTOR_ADDR, rdx=BOOT_DRIVE)


def flat_entry(base: SpecialRegisters, entry: int, stack: int, index: int = 0) -> Entry:
    return Entry(protected_mode(base), rip=entry, rsp=stack, rsi=index)


def user64_entry(base: SpecialRegisters, entry: int, stack: int, index: int = 0) -> Entry:
    return Entry(user64_mode(base), rip=entry, rsp=stack, rsi=index)


def read_image(path: str | Path) -> bytes:
    return Path(path).read_bytes()


IMAGE_KINDS = ("bootsector", "flat", "flat64")
IMAGE_PARAMS = ("image", "kind", "load_address", "entry", "stack")


def code_pages(address: int, size: int) -> range:
    """Frame numbers of the pages [address, address + size) covers."""
    return range(address >> 12, (address + max(size, 1) + 4095) >> 12)


def check_image_params(params: dict) -> None:
    """Check a user image's configuration (``GuestConfig.params`` of workload ``"image"``)
    without reading the image: known keys, a known kind, a load address for a flat binary."""
    unknown = set(params) - set(IMAGE_PARAMS)
    if unknown:
        raise ImageError(f"unknown image parameter(s) {sorted(unknown)}; an image takes "
                         f"{', '.join(IMAGE_PARAMS)}")
    if not params.get("image") or not isinstance(params["image"], str):
        raise ImageError("an image configuration names its file ('image')")
    kind = params.get("kind", "bootsector")
    if kind not in IMAGE_KINDS:
        raise ImageError(f"unknown image kind {kind!r} (use {', '.join(IMAGE_KINDS)})")
    if kind == "bootsector" and params.get("load_address") is not None:
        raise ImageError(f"a boot sector always loads at {BOOT_SECTOR_ADDR:#x}")
    if kind != "bootsector" and params.get("load_address") is None:
        raise ImageError("a flat binary needs a load address")
    for name in ("load_address", "entry", "stack"):  # guest-physical / register values
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < 1 << 32):
            raise ImageError(f"image parameter {name!r} must be a 32-bit address, not "
                             f"{value!r}")


def check_image(kind: str, size: int, load_address: int | None) -> None:
    """Check that an image of ``size`` bytes can be placed as asked."""
    if kind == "bootsector":
        if size != BOOT_SECTOR_BYTES:
            raise ImageError(f"a boot sector is exactly {BOOT_SECTOR_BYTES} bytes, not {size}")
        return
    if kind not in IMAGE_KINDS:
        raise ImageError(f"unknown image kind {kind!r} (use {', '.join(IMAGE_KINDS)})")
    if load_address is None:
        raise ImageError("a flat binary needs a load address")
    if load_address < 0x1000 or load_address + size > 1 << 32:
        raise ImageError(f"flat binary of {size} bytes at {load_address:#x} does not fit "
                         f"between 4 KiB and 4 GiB")


def image_writes(kind: str, data: bytes, load_address: int | None,
                 ram_top: int = 1 << 32) -> list[tuple[int, bytes]]:
    """Memory writes for an image of ``kind`` (see IMAGE_KINDS); ``ram_top`` is the end of
    the highest RAM block, which a 64-bit image's identity map must cover."""
    check_image(kind, len(data), load_address)
    if kind == "bootsector":
        return boot_sector(data)[0]
    writes = [(GDT_ADDR, gdt_bytes()), (TSS_ADDR, tss_bytes())]
    if kind == "flat64":
        writes += identity_page_tables(max(ram_top, 1 << 32), code_pages(load_address, len(data)))
    return writes + [(load_address, data)]


def image_entry(kind: str, base: SpecialRegisters, params: dict) -> Entry:
    """vCPU 0's entry for an image (``params``: load_address, entry, stack)."""
    if kind == "bootsector":
        return boot_sector_entry(base)
    load_address = params["load_address"]
    enter = user64_entry if kind == "flat64" else flat_entry
    return enter(base, params.get("entry", load_address), params.get("stack", load_address))
