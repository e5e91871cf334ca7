"""The built-in workloads on KVM: their images, parameter block, shares and mailbox.

Guest-physical layout (low RAM; see ``asm/_defs.S`` and docs/vmm.md):

    0x1000  GDT (null, code32 0x08, data32 0x10, TSS 0x18)   0x1800  TSS (104 bytes)
    0x2000  stacks, 1 KiB per vCPU                            0x5000  parameter block
    0x6000  mailbox, 64 bytes per vCPU                        0x7000  per-vCPU locals
    0x8000  workload code                                     0x10000 page tables
    0x100000 working set / region                              0xfeb00000 control MMIO page

``idle`` runs in 32-bit protected mode at CPL 0 (it only halts); the others in 64-bit long
mode at CPL 3, the only mode kvm_pvm runs natively (see asm/_defs.S).

Parameter block (little-endian, written by the host before start):

    +0x00 u32 magic "PMIG"       +0x04 u32 version (1)      +0x08 u32 workload id
    +0x0c u32 vcpus              +0x10 u32 pattern          +0x14 u32 hot_share x 2^32
    +0x18 u32 batch_pages        +0x1c u32 rounds           +0x20 u64 tsc_per_batch (0: unpaced)
    +0x28 u64 max_lag_tsc        +0x30 u32 tsc_per_us
    +0x40 + 64*i  share of vCPU i: u32 base_gpa, u32 npages, u32 hot_pages, u32 0, u64 seed

Pacing is done by the guest with RDTSC: each vCPU writes ``batch_pages`` pages per batch and
waits for the batch's deadline (deadline += tsc_per_batch), sleeping through the pacing port
when the wait is long; the asked rate is the whole guest's, split evenly over its vCPUs.
"""

from __future__ import annotations

import struct
from importlib import resources
from typing import Any

PARAM_ADDR = 0x5000
MAILBOX_ADDR = 0x6000
MAILBOX_STRIDE = 64
CODE_ADDR = 0x8000
WORKING_SET_BASE = 0x100000
STACK_BASE = 0x2000
STACK_BYTES = 0x400
MAX_VCPUS = 8
PAGE = 4096
USER64_WORKLOADS = ("dirtier", "selfcheck", "compute")

WORKLOAD_IDS = {"idle": 1, "dirtier": 2, "selfcheck": 3, "compute": 4}
PATTERNS = {"uniform": 0, "sequential": 1, "hotspot": 2}
COMPUTE_SEED = 0x9E3779B97F4A7C15
MAGIC = 0x47494D50
BATCH_SECONDS = 100e-6   # a pacing batch is ~100 us of writes
MAX_LAG_SECONDS = 0.100  # behind by more than this (host noise, a pause), stop catching up

DEFAULTS: dict[str, dict[str, Any]] = {
    "idle": {},
    "dirtier": {"working_set_bytes": 64 << 20, "rate_pages_per_s": 0, "pattern": "uniform",
                "hot_fraction": 0.1, "hot_share": 0.9},
    "selfcheck": {"working_set_bytes": 64 << 20, "rate_pages_per_s": 0},
    # rate_pages_per_s paces compute's page writes too (0 = as fast as it can); a pymig
    # extension so tests can stop it half-way.
    "compute": {"rounds": 64, "region_bytes": 4 << 20, "rate_pages_per_s": 0},
}


def resolve_params(workload: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` over the workload's defaults; unknown workloads or keys are errors."""
    if workload not in DEFAULTS:
        raise ValueError(f"unknown built-in workload {workload!r} "
                         f"(choose from {', '.join(DEFAULTS)} or 'image')")
    unknown = set(params) - set(DEFAULTS[workload])
    if unknown:
        raise ValueError(f"unknown {workload} parameters: {sorted(unknown)}")
    return DEFAULTS[workload] | params


def image(workload: str) -> bytes:
    """The checked-in flat binary of a built-in workload (loaded at CODE_ADDR)."""
    return resources.files("pymig.guest").joinpath("bin", f"{workload}.bin").read_bytes()


def shares(npages: int, vcpus: int) -> list[tuple[int, int]]:
    """(first page, page count) of each vCPU's share: pages [i*n/v, (i+1)*n/v)."""
    return [(i * npages // vcpus, (i + 1) * npages // vcpus - i * npages // vcpus)
            for i in range(vcpus)]


def area_pages(workload: str, params: dict[str, Any]) -> int:
    """Pages of the working set / region at WORKING_SET_BASE the workload uses."""
    key = "region_bytes" if workload == "compute" else "working_set_bytes"
    return params.get(key, 0) // PAGE


def stack_top(index: int) -> int:
    return STACK_BASE + STACK_BYTES * (index + 1)


def param_block(workload: str, params: dict[str, Any], vcpus: int, tsc_khz: int) -> bytes:
    """The parameter block for ``workload`` (params already resolved)."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"built-in workloads run on 1..{MAX_VCPUS} vCPUs, not {vcpus}")
    npages = area_pages(workload, params)
    if workload != "idle" and npages < vcpus:
        raise ValueError(f"{workload}: the working set must have at least one page per vCPU")
    rate = float(params.get("rate_pages_per_s", 0))
    if rate < 0:
        raise ValueError("rate_pages_per_s must be >= 0")
    tsc_hz = tsc_khz * 1000
    if rate > 0:
        per_vcpu = rate / vcpus
        batch = max(1, round(per_vcpu * BATCH_SECONDS))
        tsc_per_batch = max(1, round(batch * tsc_hz / per_vcpu))
    else:
        batch, tsc_per_batch = 64, 0
    pattern = PATTERNS.get(params.get("pattern", "uniform"))
    if pattern is None:
        raise ValueError(f"unknown pattern {params['pattern']!r} (use {', '.join(PATTERNS)})")
    hot_share = min(max(float(params.get("hot_share", 0.9)), 0.0), 1.0)
    head = struct.pack("<IIIIIIII", MAGIC, 1, WORKLOAD_IDS[workload], vcpus, pattern,
                       min(int(hot_share * 2**32), 2**32 - 1), batch, params.get("rounds", 0))
    head += struct.pack("<QQI", tsc_per_batch, round(MAX_LAG_SECONDS * tsc_hz),
                        max(1, tsc_khz // 1000))
    head = head.ljust(0x40, b"\0")
    for i, (first, count) in enumerate(shares(npages, vcpus)):
        hot = 0
        if pattern == PATTERNS["hotspot"]:
            if count < 2:
                raise ValueError("hotspot needs at least two pages per vCPU")
            hot = min(max(1, round(count * float(params.get("hot_fraction", 0.1)))), count - 1)
        head += struct.pack("<IIIIQ", WORKING_SET_BASE + first * PAGE, count, hot, 0,
                            COMPUTE_SEED ^ i).ljust(64, b"\0")
    return head


MAILBOX_FIELDS = ("passes", "pages_written", "errors", "result", "done")


def read_mailbox(ram, vcpus: int) -> list[dict[str, int]]:
    """Each vCPU's progress record from low RAM (a uint8 numpy array or buffer)."""
    records = []
    for i in range(vcpus):
        at = MAILBOX_ADDR + MAILBOX_STRIDE * i
        values = struct.unpack_from("<5Q", bytes(ram[at:at + 40]))
        records.append(dict(zip(MAILBOX_FIELDS, values)))
    return records


def aggregate(records: list[dict[str, int]]) -> dict[str, int]:
    """``progress()``: passes = min, pages_written and errors = sum, done = all,
    result = XOR of the vCPUs' results (vCPU 0's alone with one vCPU)."""
    result = 0
    for r in records:
        result ^= r["result"]
    return {"passes": min(r["passes"] for r in records),
            "pages_written": sum(r["pages_written"] for r in records),
            "errors": sum(r["errors"] for r in records),
            "done": int(all(r["done"] for r in records)),
            "result": result}
