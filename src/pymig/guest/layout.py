"""Where things are in a guest's physical memory, for every kind of guest: the RAM blocks
around the PC hole, the pages the built-in workloads share with the host, and how many vCPUs a
guest may have.  It imports nothing of the guest layer, which all builds on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from pymig.memory import RamBlock

GiB = 1 << 30
# PC layout: RAM below the 3 GiB PCI hole, the rest from 4 GiB, as firmware would report it.
LOW_RAM_LIMIT = 3 * GiB
HIGH_RAM_BASE = 4 * GiB

# Guest-physical map shared by the KVM and the simulated guest (both run the same workloads):
#
#   0x0000_5000  parameter block, one page, written by the host before start
#   0x0000_6000  mailbox: one 64-byte progress record per vCPU, written by the guest
#   0x0010_0000  working set / compute region (1 MiB upwards)
#
# The field layouts of the parameter block and the mailbox are in pymig.guest.workloads.
GUEST_PAGE_SIZE = 4096
PARAMS_GPA = 0x5000
MAILBOX_GPA = 0x6000
MAILBOX_RECORD_BYTES = 64
WORKSET_GPA = 0x100000
# Every guest runs on at most 8 vCPUs, whatever its kind: the built-in workloads' low memory
# has room for eight stacks (pymig.guest.builtin) and their parameter block for eight share
# records; a user image gets no MP or ACPI table through which it could find more than its
# boot vCPU; and each vCPU costs the host a thread and descriptors, which a stream must not
# be able to ask for by the hundred.
MAX_VCPUS = 8


@dataclass(frozen=True)
class RamLayout:
    """One RAM block of a guest's memory map."""

    name: str
    size_bytes: int
    guest_phys_addr: int


def pc_layout(memory_bytes: int) -> list[RamLayout]:
    """Split ``memory_bytes`` of RAM around the PC hole: ``ram-low`` at 0, ``ram-high`` at 4 GiB."""
    if memory_bytes <= 0:
        raise ValueError(f"guest memory size must be positive, not {memory_bytes}")
    low = min(memory_bytes, LOW_RAM_LIMIT)
    blocks = [RamLayout("ram-low", low, 0)]
    if memory_bytes > low:
        blocks.append(RamLayout("ram-high", memory_bytes - low, HIGH_RAM_BASE))
    return blocks


def locate(blocks: Sequence[RamLayout | RamBlock], gpa: int, nbytes: int = 1) -> tuple[int, int]:
    """Which block holds guest-physical ``[gpa, gpa + nbytes)``: ``(block index, byte offset)``.

    The whole range must lie inside one block; a range across a hole or a block edge raises
    ValueError (workloads keep their structures inside one block).
    """
    for index, block in enumerate(blocks):
        offset = gpa - block.guest_phys_addr
        if 0 <= offset and offset + nbytes <= block.size_bytes:
            return index, offset
    raise ValueError(f"guest-physical range [{gpa:#x}, {gpa + nbytes:#x}) is not inside one RAM "
                     f"block")
