"""The built-in workloads, defined once: what they do, what they leave in guest RAM, what the
host expects of them.

The KVM guest (assembly in ``asm/*.S``) and the simulated guest (native writer threads in
``_core/c/simguest.c``) run the first four of these workloads; ``diskcheck`` drives a disk,
which only the KVM guest has.  Both read the same parameter block and keep
the same mailbox, and this module is the one host-side description of both: names, defaults,
parameter checks, shares, the parameter block, the mailbox, the self-check verifier and the
reference results.  ``tests/test_workloads_agree.py`` runs every workload on both guests and
holds each to what is written here.  Everything here is pure Python/numpy.

Guest-physical map (constants in :mod:`pymig.guest.base`; the rest of the KVM guest's low
memory is in :mod:`pymig.guest.builtin`)::

    0x5000  parameter block (one page, host -> guest, written before start)
    0x6000  mailbox: one 64-byte progress record per vCPU (guest -> host)
    1 MiB   working set (dirtier, selfcheck) or region (compute), split in per-vCPU shares

Parameter block at 0x5000 (little-endian; the layout of ``asm/_defs.S``, which the checked-in
binaries are built from; the simulated writers are configured from the same bytes)::

    +0x00 u32 magic 0x47494D50 ("PMIG")   +0x04 u32 version (1)
    +0x08 u32 workload: 1 idle, 2 dirtier, 3 selfcheck, 4 compute, 5 diskcheck
    +0x0C u32 vcpus                       +0x10 u32 pattern: 0 uniform, 1 sequential, 2 hotspot
    +0x14 u32 hot_share x 2**32 (saturated at 2**32 - 1)
    +0x18 u32 batch_pages (>= 1)          +0x1C u32 rounds (compute)
    +0x20 u64 ticks per batch (0: as fast as it can)
    +0x28 u64 max lag in ticks            +0x30 u32 ticks per microsecond
    +0x34 u32 diskcheck: blocks of 4 KiB in its working set on the disk
    +0x40 + 64*i  share of vCPU i < vcpus:
        +0 u32 first_gpa  +4 u32 npages (m)  +8 u32 hot_pages (h)  +12 u32 0  +16 u64 seed
        +24 u32 batch_pages  +28 u32 0  +32 u64 ticks per batch   (this vCPU's pacing)

A *tick* is the guest's clock: the TSC on KVM (its frequency from KVM_GET_TSC_KHZ), a
nanosecond of CLOCK_MONOTONIC for the simulated guest.

Mailbox record of vCPU i at 0x6000 + 64*i (u64 each, written only by that vCPU)::

    +0 passes   +8 pages_written   +16 errors   +24 result   +32 done   +40 reserved

The counters live in RAM, so they migrate with the memory and a destination carries on
counting from the source's values.  A KVM vCPU updates them after each page and can stop at any
instruction, so they may lag RAM by the one page it was writing; the simulated writer updates
them after each batch and stops only between batches, so they never lag.  Likewise the dirty
log: both guests log every page they change, and a stopped KVM vCPU may also have logged the
page it was about to write (KVM logs a page when its write fault makes it writable, before the
write itself), which it writes, and changes, when it runs again.
``guest.progress()`` (:func:`progress_from_mailbox`) aggregates the records: ``passes`` is the
minimum over vCPUs, ``pages_written`` and ``errors`` are sums, ``done`` is 1 when every vCPU is
done and ``result`` is the XOR of the vCPUs' results (vCPU 0's with one vCPU).

Shares: with n pages in the area and v vCPUs, vCPU i owns pages [i*n//v, (i+1)*n//v) (m pages,
m >= 1).  Built-in workloads run on 1 to 8 vCPUs (the KVM guest has eight stacks).

Generators: ``xorshift64(x)``: ``x ^= x << 13; x ^= x >> 7; x ^= x << 17`` (64-bit, logical
shifts); each call advances the state and returns it.  ``below(k)`` = the high 64 bits of
``xorshift64() * k`` (an integer in [0, k)).

Pacing (``rate_pages_per_s``, 0 = as fast as it can): the rate is the whole guest's, split
evenly: each vCPU writes r = rate / v pages per second, unless the dirtier's
``vcpu_rates_pages_per_s`` gives each vCPU its own r (0 = as fast as it can).  Every vCPU paces
by its own share record's batch_pages and ticks per batch; the header's are the even split.
It writes ``batch_pages`` =
max(1, round(r * 100 us)) pages, then waits until its deadline (deadline += ticks per batch =
round(batch_pages * tick rate / r), starting from the time it started); a vCPU more than
100 ms behind (paused, throttled, descheduled) restarts its deadline from now instead of
bursting.  Unpaced, a batch is 64 pages and nobody waits.  Page writes count as in
``pages_written`` below.  Throttling differs by design: a KVM vCPU's TSC keeps running while it
is throttled, so a paced vCPU with CPU to spare catches up; a simulated writer's clock stops
while it is throttled, so it writes (100 - p) % of its rate.

idle  (fill_bytes)
    Touches no memory after start (KVM: hlt with interrupts off; a simulated writer sleeps).
    With ``fill_bytes`` > 0 the host fills guest-physical [1 MiB, 1 MiB + fill_bytes) with
    random content before start (:func:`fill_content`: the little-endian u64 words numpy's
    ``PCG64(FILL_SEED).random_raw()`` gives, in order), so the RAM holds data that is neither
    zero nor compressible, as a real guest's page cache would (migration throughput
    benchmarks).  Both guests write it from :func:`write_fill`; a destination gets it from
    the migration.

dirtier  (working_set_bytes, rate_pages_per_s, pattern, hot_fraction, hot_share,
         vcpu_rates_pages_per_s)
    vCPU i's generator starts at ``((i + 1) * GOLDEN mod 2**64) | 1``.  Each write picks a
    page j of the share and increments its byte 0 (wrapping at 256): ``uniform``:
    ``j = below(m)``; ``sequential``: ``j = pos``; ``hotspot``: ``r = xorshift64()``, then if
    ``r >> 32 < hot_share x 2**32`` ``j = below(h)`` (the hot part: the share's first h pages)
    else ``j = h + below(m - h)``.  After each write ``pages_written += 1`` and ``pos += 1``;
    when pos reaches m it restarts at 0 and ``passes += 1``, so passes counts share-sized
    rounds of writes for every pattern.  Hotspot: ``h = clamp(round(m * hot_fraction), 1,
    m - 1)`` (it needs m >= 2); h = 0 for the other patterns.  :func:`dirtier_pages` replays
    the writes.

selfcheck  (working_set_bytes, rate_pages_per_s)
    Pass p = 1, 2, ... stamps the share's pages in order.  For page j (gpa g, frame f = g >> 12)
    it first checks the page holds pass p-1 (u64 p-1 at offsets 0 and 4088, frame f at offset
    8; for p = 1 all three are zero) and adds 1 to ``errors`` per page that does not, then
    stamps, in this order: word 4088 <- p, then word 8 <- f and word 0 <- p (KVM: one 16-byte
    store); then ``pages_written += 1``; after the share's last page ``passes = p``.  The rest
    of every page stays zero.  Invariant: for each share there is k with pages [0, k) at pass
    p and [k, m) at pass p-1.  A KVM vCPU can stop between the two stores, leaving the page at
    k with its last word at p and its first word at p-1; :func:`verify_selfcheck` accepts that
    one page per share by default and nothing of the kind with ``exact=True`` (the simulated
    guest always satisfies ``exact``).

compute  (rounds, region_bytes, rate_pages_per_s)
    vCPU i works on the N = 512 * m u64 words w[0..N) of its share (ascending addresses).
    Fill: ``x = 0x9E3779B97F4A7C15 ^ i``; for j in 0..N-1: ``w[j] = x = xorshift64(x)``.  Then,
    with ``c = 0``, for each of ``rounds`` rounds::

        s = XOR over j of rotl64(w[j] + j, j mod 64)      (mod 2**64)
        c = rotl64(c, 1) ^ s
        w[j] += s  for every j                            (mod 2**64; written back to RAM)

    then ``result = c`` and ``done = 1`` in its mailbox record (KVM also raises event 2 and
    parks).  ``passes`` counts finished rounds; ``pages_written`` counts pages filled and pages
    fed ((1 + rounds) * m when done; the fold only reads).  The ``+ j`` ties each word to its
    place: every page starts at a multiple of 64 words, so a plain XOR of rotated words would
    give the same result with two pages swapped.  :func:`expected_compute_result` is the
    reference.

diskcheck  (disk_working_set_bytes)                       KVM only, one vCPU, a disk needed
    The guest drives its first disk (the master of the ATA channel, :mod:`pymig.kvm.ata`)
    through the ports, at CPL 0 in 32-bit protected mode: the working set is the disk's first
    W bytes (``P_DISK_BLOCKS`` = W / 4096 at +0x34 of the parameter block), n blocks of 8
    sectors.  The stamp of sector s (its LBA) at generation g is 128 u32 words: w0 = 0x4B444D50
    ("PMDK"), w1 = s mod 2**32, w2 = s >> 32, w3 = g, and for i = 4..127
    ``w[i] = ((s * 0x9E3779B1) ^ (g * 0x85EBCA77)) + i * 0x01000193`` (mod 2**32)
    (:func:`diskcheck_words`): every sector says where it belongs and when it was written, and
    a sector of two generations, or shifted, or from elsewhere, does not match.  At start:
    IDENTIFY DEVICE (the disk must hold the working set) and SET MULTIPLE MODE 8.  Pass p = 1,
    2, ... uses, by p mod 3, READ/WRITE SECTORS (1: a DRQ block per sector), READ/WRITE
    MULTIPLE (2) or their EXT forms (0).  For each block b in order it reads the block and
    checks that every sector holds generation p - 1 (p = 1: zero, or a stamp of any generation
    of that sector: a disk diskcheck used before), writes generation p, reads the block back
    and checks it; each block that fails a check, and each command that ends with ERR or DF,
    adds 1 to ``errors`` (the first also raises event 3, argument b); then
    ``pages_written += 1`` (blocks written).  After the last block: FLUSH CACHE, ``passes =
    p``, event 1 (argument p).  ``result`` counts the commands that failed.  Invariant: blocks
    [0, k) at p, [k, n) at p - 1, block k possibly with its first sectors at p (the guest
    stopped inside a WRITE SECTORS); :func:`verify_diskcheck` checks it on the image.
"""

from __future__ import annotations

import functools
import math
import operator
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from pymig.guest.layout import (
    GUEST_PAGE_SIZE,
    MAILBOX_GPA,
    MAILBOX_RECORD_BYTES,
    MAX_VCPUS,
    PARAMS_GPA,
    WORKSET_GPA,
    locate,
)
from pymig.memory import touch_without_gil

if TYPE_CHECKING:
    from pymig.guest.base import GuestConfig

MiB = 1 << 20
GOLDEN = 0x9E3779B97F4A7C15
# diskcheck: its blocks, its two buffers in guest RAM (at WORKSET_GPA: the block read, the block
# expected), and the stamp of a sector (module docstring).
DISK_SECTOR_BYTES = 512
DISK_BLOCK_SECTORS = 8
DISK_BLOCK_BYTES = DISK_BLOCK_SECTORS * DISK_SECTOR_BYTES
DISKCHECK_BUFFER_BYTES = 2 * DISK_BLOCK_BYTES
DISK_MAGIC = 0x4B444D50  # "PMDK"
DISK_LBA_MUL, DISK_GEN_MUL, DISK_STEP = 0x9E3779B1, 0x85EBCA77, 0x01000193
COMPUTE_SEED = GOLDEN
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

WORKLOAD_IDS = {"idle": 1, "dirtier": 2, "selfcheck": 3, "compute": 4, "diskcheck": 5}
PATTERN_IDS = {"uniform": 0, "sequential": 1, "hotspot": 2}
DEFAULTS: dict[str, dict[str, Any]] = {
    "idle": {"fill_bytes": 0},
    "dirtier": {"working_set_bytes": 64 * MiB, "rate_pages_per_s": 0, "pattern": "uniform",
                "hot_fraction": 0.1, "hot_share": 0.9, "vcpu_rates_pages_per_s": None},
    "selfcheck": {"working_set_bytes": 64 * MiB, "rate_pages_per_s": 0},
    "compute": {"rounds": 64, "region_bytes": 4 * MiB, "rate_pages_per_s": 0},
    "diskcheck": {"disk_working_set_bytes": 16 * MiB},
}
#: Workloads only the KVM guest runs: they drive a device the simulated guest does not have.
KVM_ONLY = ("diskcheck",)

BATCH_SECONDS = 100e-6    # a paced batch is ~100 us of writes
MAX_LAG_SECONDS = 0.100   # behind by more than this, a vCPU stops catching up
UNPACED_BATCH_PAGES = 64

PARAMS_MAGIC = 0x47494D50
PARAMS_VERSION = 1
PARAMS_HEADER = struct.Struct("<IIIIIIIIQQII")
SHARES_OFFSET = 0x40
SHARE_STRIDE = 64
SHARE_RECORD = struct.Struct("<IIIIQIIQ")  # ... seed, then this vCPU's batch and ticks
MAILBOX_RECORD = struct.Struct("<QQQQQQ16x")  # 5 words, reserved +40, padding
# Byte offsets of the mailbox words, for code that reads or writes one word in place.
MB_PASSES, MB_PAGES_WRITTEN, MB_ERRORS, MB_RESULT, MB_DONE = 0, 8, 16, 24, 32

assert SHARES_OFFSET >= PARAMS_HEADER.size and SHARE_STRIDE >= SHARE_RECORD.size
assert SHARES_OFFSET + SHARE_STRIDE * MAX_VCPUS <= GUEST_PAGE_SIZE
assert MAILBOX_RECORD.size == MAILBOX_RECORD_BYTES


@dataclass(frozen=True)
class WorkloadParams:
    """A workload's parameters, validated and completed with the defaults.

    ``area_bytes`` is the working set (dirtier, selfcheck) or the region (compute), 0 for idle;
    ``fill_bytes`` the random fill of an idle guest (from 1 MiB, written by the host).
    """

    workload: str
    area_bytes: int = 0
    rate_pages_per_s: int = 0
    pattern: str = "uniform"
    hot_fraction: float = 0.1
    hot_share: float = 0.9
    rounds: int = 0
    vcpu_rates: tuple[int, ...] = ()  # dirtier: one rate per vCPU instead of the even split
    fill_bytes: int = 0
    disk_bytes: int = 0  # diskcheck: the working set on the disk

    @property
    def disk_blocks(self) -> int:
        """diskcheck: the blocks (of DISK_BLOCK_BYTES) of its working set on the disk."""
        return self.disk_bytes // DISK_BLOCK_BYTES

    @property
    def workload_id(self) -> int:
        return WORKLOAD_IDS[self.workload]

    @property
    def area_pages(self) -> int:
        return self.area_bytes // GUEST_PAGE_SIZE

    @property
    def hot_share_u32(self) -> int:
        """The parameter block's hot_share: a 32-bit fraction, saturated."""
        return min(int(self.hot_share * 2**32), U32)


@dataclass(frozen=True)
class Share:
    """One vCPU's part of the area, as its parameter-block record holds it."""

    index: int
    first_gpa: int
    npages: int
    hot_pages: int
    seed: int

    @property
    def first_frame(self) -> int:
        return self.first_gpa // GUEST_PAGE_SIZE

    @property
    def dirtier_seed(self) -> int:
        """Where the dirtier's generator starts (each guest derives it from the index)."""
        return ((self.index + 1) * GOLDEN & U64) | 1


@dataclass(frozen=True)
class Workload:
    """A workload placed in a guest: its parameters and every vCPU's share."""

    params: WorkloadParams
    vcpus: int
    shares: tuple[Share, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.params.workload


def _int_param(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"workload parameter {name!r} must be an integer, not {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"workload parameter {name!r} must be an integer, not {value!r}") from None
    if number < minimum:
        raise ValueError(f"workload parameter {name!r} must be >= {minimum}, not {number}")
    return number


def _fraction_param(name: str, value: Any, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"workload parameter {name!r} must be a number, not {value!r}")
    number = float(value)
    low_ok = number > 0.0 if low_open else number >= 0.0
    if not (low_ok and number <= 1.0) or math.isnan(number):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"workload parameter {name!r} must be in {interval}, not {value!r}")
    return number


def _size_param(name: str, value: Any) -> int:
    size = _int_param(name, value, GUEST_PAGE_SIZE)
    if size % GUEST_PAGE_SIZE:
        raise ValueError(f"workload parameter {name!r} must be a multiple of {GUEST_PAGE_SIZE}, "
                         f"not {size}")
    return size


def parse_params(workload: str, params: dict[str, Any] | None = None) -> WorkloadParams:
    """Validate ``params`` for ``workload`` and fill in the defaults.

    Unknown workloads, unknown parameter names and out-of-range values raise ValueError with
    the name of the culprit.
    """
    if workload not in DEFAULTS:
        raise ValueError(f"unknown workload {workload!r} (built-in: {', '.join(DEFAULTS)})")
    given = dict(params or {})
    unknown = set(given) - set(DEFAULTS[workload])
    if unknown:
        raise ValueError(f"workload {workload!r} has no parameter(s) {sorted(unknown)}; it takes "
                         f"{sorted(DEFAULTS[workload]) or 'none'}")
    merged = {**DEFAULTS[workload], **given}
    if workload == "diskcheck":
        size = _int_param("disk_working_set_bytes", merged["disk_working_set_bytes"],
                          DISK_BLOCK_BYTES)
        if size % DISK_BLOCK_BYTES or size // DISK_BLOCK_BYTES > U32:
            raise ValueError(f"workload parameter 'disk_working_set_bytes' must be a multiple "
                             f"of {DISK_BLOCK_BYTES} of at most {U32} blocks, not {size}")
        return WorkloadParams("diskcheck", disk_bytes=size)
    if workload == "idle":
        fill = _int_param("fill_bytes", merged["fill_bytes"], 0)
        if fill % GUEST_PAGE_SIZE:
            raise ValueError(f"workload parameter 'fill_bytes' must be a multiple of "
                             f"{GUEST_PAGE_SIZE}, not {fill}")
        return WorkloadParams("idle", fill_bytes=fill)
    rate = _int_param("rate_pages_per_s", merged["rate_pages_per_s"], 0)
    if workload == "compute":
        rounds = _int_param("rounds", merged["rounds"], 1)
        if rounds > U32:
            raise ValueError(f"workload parameter 'rounds' must be < 2**32, not {rounds}")
        return WorkloadParams("compute", area_bytes=_size_param("region_bytes",
                                                                merged["region_bytes"]),
                              rate_pages_per_s=rate, rounds=rounds)
    area = _size_param("working_set_bytes", merged["working_set_bytes"])
    if workload == "selfcheck":
        return WorkloadParams("selfcheck", area_bytes=area, rate_pages_per_s=rate)
    pattern = merged["pattern"]
    if pattern not in PATTERN_IDS:
        raise ValueError(f"workload parameter 'pattern' must be one of {sorted(PATTERN_IDS)}, "
                         f"not {pattern!r}")
    vcpu_rates = _rates_param("vcpu_rates_pages_per_s", merged["vcpu_rates_pages_per_s"])
    if vcpu_rates and rate:
        raise ValueError("give the dirtier 'rate_pages_per_s' (the whole guest's) or "
                         "'vcpu_rates_pages_per_s' (one per vCPU), not both")
    return WorkloadParams("dirtier", area_bytes=area, rate_pages_per_s=rate, pattern=pattern,
                          hot_fraction=_fraction_param("hot_fraction", merged["hot_fraction"],
                                                       True),
                          hot_share=_fraction_param("hot_share", merged["hot_share"], False),
                          vcpu_rates=vcpu_rates)


def _rates_param(name: str, value: Any) -> tuple[int, ...]:
    """Per-vCPU rates: None, a sequence of integers >= 0, or their comma-separated text (as a
    command line gives them); () when not given."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: Any = [item.strip() for item in value.split(",")]
        try:
            items = [int(item, 0) for item in items]
        except ValueError:
            raise ValueError(f"workload parameter {name!r} must list integers, not "
                             f"{value!r}") from None
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ValueError(f"workload parameter {name!r} must be a list of integers, not "
                         f"{value!r}")
    rates = tuple(_int_param(name, item, 0) for item in items)
    if not rates:
        raise ValueError(f"workload parameter {name!r} needs one rate per vCPU")
    return rates


def share_bounds(total_pages: int, vcpus: int, index: int) -> tuple[int, int]:
    """Pages ``[start, end)`` of the area that vCPU ``index`` of ``vcpus`` owns."""
    return index * total_pages // vcpus, (index + 1) * total_pages // vcpus


def hot_pages(params: WorkloadParams, npages: int) -> int:
    """h: the hot part of a share of ``npages`` pages (0 unless the dirtier's hotspot)."""
    if params.workload != "dirtier" or params.pattern != "hotspot":
        return 0
    return min(max(round(npages * params.hot_fraction), 1), npages - 1)


def make_workload(params: WorkloadParams, vcpus: int) -> Workload:
    """Split the workload's area between ``vcpus`` vCPUs."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"the built-in workloads run on 1 to {MAX_VCPUS} vCPUs, not {vcpus}")
    if params.workload == "diskcheck" and vcpus != 1:
        raise ValueError(f"diskcheck drives one disk from one vCPU, not {vcpus}")
    total = params.area_pages
    if params.vcpu_rates and len(params.vcpu_rates) != vcpus:
        raise ValueError(f"{params.workload}: {len(params.vcpu_rates)} rates in "
                         f"vcpu_rates_pages_per_s for {vcpus} vCPUs")
    if params.workload not in ("idle", "diskcheck") and total < vcpus:
        raise ValueError(f"{params.workload}: {total} pages cannot give each of {vcpus} vCPUs a "
                         f"page of its own")
    if WORKSET_GPA + params.area_bytes > 1 << 32:
        raise ValueError(f"{params.workload}: the area must end below 4 GiB (the parameter "
                         f"block holds 32-bit addresses), not at "
                         f"{WORKSET_GPA + params.area_bytes:#x}")
    shares = []
    for index in range(vcpus):
        start, end = share_bounds(total, vcpus, index)
        npages = end - start
        if params.pattern == "hotspot" and params.workload == "dirtier" and npages < 2:
            raise ValueError("dirtier: the hotspot pattern needs at least two pages per vCPU")
        shares.append(Share(index, WORKSET_GPA + start * GUEST_PAGE_SIZE, npages,
                            hot_pages(params, npages), COMPUTE_SEED ^ index))
    return Workload(params, vcpus, tuple(shares))


def resolve(config: GuestConfig) -> Workload:
    """The workload of ``config``, checked against its memory map.

    The parameter block, the mailbox and the whole area must each lie inside one RAM block.
    """
    workload = make_workload(parse_params(config.workload, config.params), config.vcpus)
    locate(config.blocks, PARAMS_GPA, GUEST_PAGE_SIZE)
    locate(config.blocks, MAILBOX_GPA, GUEST_PAGE_SIZE)
    buffers = DISKCHECK_BUFFER_BYTES if workload.name == "diskcheck" else 0
    for nbytes, what in ((workload.params.area_bytes, f"{workload.name}: its"),
                         (workload.params.fill_bytes, "idle: a fill of"),
                         (buffers, "diskcheck: its buffers of")):
        if not nbytes:
            continue
        try:
            locate(config.blocks, WORKSET_GPA, nbytes)
        except ValueError:
            raise ValueError(
                f"{what} {nbytes} bytes at {WORKSET_GPA:#x} do not fit in one of the guest's "
                f"RAM blocks ({config.memory_bytes} bytes)") from None
    return workload


# --- pacing and the parameter block --------------------------------------------------------

class Pacing(NamedTuple):
    """How a vCPU paces its page writes, in ticks of the guest's clock (module docstring)."""

    batch_pages: int
    ticks_per_batch: int  # 0: as fast as it can
    max_lag_ticks: int
    ticks_per_us: int


def pacing(rate_pages_per_s: int, vcpus: int, tick_khz: int) -> Pacing:
    """The pacing of each of ``vcpus`` vCPUs for a whole-guest rate, with a clock of
    ``tick_khz`` kHz."""
    if tick_khz < 1000:
        raise ValueError(f"a guest clock of {tick_khz} kHz is too slow to pace by")
    tick_hz = tick_khz * 1000
    max_lag = round(MAX_LAG_SECONDS * tick_hz)
    if not rate_pages_per_s:
        return Pacing(UNPACED_BATCH_PAGES, 0, max_lag, tick_khz // 1000)
    per_vcpu = rate_pages_per_s / vcpus
    batch = min(max(1, round(per_vcpu * BATCH_SECONDS)), U32)
    return Pacing(batch, max(1, round(batch * tick_hz / per_vcpu)), max_lag, tick_khz // 1000)


@dataclass(frozen=True)
class ParamBlock:
    """The parameter block's fields (module docstring): what a guest reads at 0x5000."""

    workload: str
    vcpus: int
    pattern: str
    hot_share_u32: int
    rounds: int
    pacing: Pacing
    shares: tuple[Share, ...]
    vcpu_pacing: tuple[Pacing, ...]  # each share's own (``pacing`` is the header's even split)
    disk_blocks: int = 0

    def share_pacing(self, index: int) -> Pacing:
        """How vCPU ``index`` paces (its share record's batch_pages and ticks per batch)."""
        return self.vcpu_pacing[index]

    def pack(self) -> bytes:
        page = bytearray(GUEST_PAGE_SIZE)
        PARAMS_HEADER.pack_into(page, 0, PARAMS_MAGIC, PARAMS_VERSION,
                                WORKLOAD_IDS[self.workload], self.vcpus,
                                PATTERN_IDS[self.pattern], self.hot_share_u32,
                                self.pacing.batch_pages, self.rounds, self.pacing.ticks_per_batch,
                                self.pacing.max_lag_ticks, self.pacing.ticks_per_us,
                                self.disk_blocks)
        for share in self.shares:
            own = self.share_pacing(share.index)
            SHARE_RECORD.pack_into(page, SHARES_OFFSET + SHARE_STRIDE * share.index,
                                   share.first_gpa, share.npages, share.hot_pages, 0, share.seed,
                                   own.batch_pages, 0, own.ticks_per_batch)
        return bytes(page)

    @classmethod
    def unpack(cls, page: bytes | memoryview | np.ndarray) -> "ParamBlock":
        """Read a parameter block back (tools, tests, a guest double-checking its config)."""
        buf = bytes(page)
        if len(buf) < GUEST_PAGE_SIZE:
            raise ValueError(f"a parameter block is {GUEST_PAGE_SIZE} bytes, not {len(buf)}")
        (magic, version, workload_id, vcpus, pattern_id, hot_share, batch, rounds, ticks,
         max_lag, ticks_per_us, disk_blocks) = PARAMS_HEADER.unpack_from(buf, 0)
        if magic != PARAMS_MAGIC:
            raise ValueError(f"no parameter block here (magic {magic:#010x})")
        if version != PARAMS_VERSION:
            raise ValueError(f"parameter block version {version}, this pymig writes "
                             f"{PARAMS_VERSION}")
        names = {v: k for k, v in WORKLOAD_IDS.items()}
        patterns = {v: k for k, v in PATTERN_IDS.items()}
        if workload_id not in names or pattern_id not in patterns or not 1 <= vcpus <= MAX_VCPUS:
            raise ValueError(f"parameter block names workload {workload_id}, pattern "
                             f"{pattern_id}, {vcpus} vCPUs")
        shares, own = [], []
        for i in range(vcpus):
            first_gpa, npages, hot, _, seed, share_batch, _, share_ticks = \
                SHARE_RECORD.unpack_from(buf, SHARES_OFFSET + SHARE_STRIDE * i)
            shares.append(Share(i, first_gpa, npages, hot, seed))
            own.append(Pacing(share_batch, share_ticks, max_lag, ticks_per_us))
        return cls(names[workload_id], vcpus, patterns[pattern_id], hot_share, rounds,
                   Pacing(batch, ticks, max_lag, ticks_per_us), tuple(shares), tuple(own),
                   disk_blocks)


def param_block(workload: Workload, tick_khz: int) -> ParamBlock:
    """The parameter block of ``workload`` for a guest whose clock runs at ``tick_khz``."""
    p = workload.params
    even = pacing(p.rate_pages_per_s, workload.vcpus, tick_khz)
    own = tuple(pacing(p.vcpu_rates[s.index], 1, tick_khz) if p.vcpu_rates else even
                for s in workload.shares)
    return ParamBlock(p.workload, workload.vcpus, p.pattern, p.hot_share_u32, p.rounds, even,
                      workload.shares, own, p.disk_blocks)


def pack_params(workload: Workload, tick_khz: int) -> bytes:
    """The parameter block page the host writes at 0x5000 before start."""
    return param_block(workload, tick_khz).pack()


def unpack_params(page: bytes | memoryview | np.ndarray) -> ParamBlock:
    return ParamBlock.unpack(page)


# --- the random fill ------------------------------------------------------------------------

FILL_SEED = 0x504D_4947_4649_4C4C  # "PMIGFILL"
FILL_CHUNK_BYTES = 64 * MiB  # generated and written this much at a time


def fill_chunks(fill_bytes: int, chunk_bytes: int = FILL_CHUNK_BYTES):
    """The random fill of ``fill_bytes`` (a multiple of 8), as ``(offset, uint8 array)`` pieces
    of at most ``chunk_bytes`` (a multiple of 8) in order; see ``idle`` in the module
    docstring."""
    if fill_bytes % 8 or chunk_bytes % 8 or chunk_bytes <= 0:
        raise ValueError("the fill and its chunks are whole u64 words")
    bitgen = np.random.PCG64(FILL_SEED)
    for offset in range(0, fill_bytes, chunk_bytes):
        words = bitgen.random_raw(min(chunk_bytes, fill_bytes - offset) // 8)
        yield offset, words.astype("<u8", copy=False).view(np.uint8)


def fill_content(fill_bytes: int) -> np.ndarray:
    """The whole random fill of ``fill_bytes`` bytes (tests; guests write it by chunks)."""
    out = np.empty(fill_bytes, dtype=np.uint8)
    for offset, chunk in fill_chunks(fill_bytes):
        out[offset:offset + chunk.size] = chunk
    return out


def write_fill(blocks: Sequence[Any], workload: Workload) -> None:
    """Write ``workload``'s random fill into a source guest's RAM blocks (nothing without
    one).  Called by both guests at creation, before start; never on a destination."""
    fill = workload.params.fill_bytes
    if not fill:
        return
    index, start = locate(blocks, WORKSET_GPA, fill)
    array = blocks[index].array
    for offset, chunk in fill_chunks(fill):
        array[start + offset:start + offset + chunk.size] = chunk


# --- guest memory as the host reads it -----------------------------------------------------

class PhysMemory:
    """Read-only access to guest-physical ranges of a guest's RAM, without copying.

    Built from a guest (anything with ``ram_blocks``), from RAM blocks, or from plain buffers
    (numpy arrays, bytes, mmaps) given in the order of ``config.blocks``.
    """

    def __init__(self, source: Any, config: GuestConfig | None = None):
        blocks = getattr(source, "ram_blocks", source)
        self.regions: list[tuple[int, np.ndarray]] = []
        for index, block in enumerate(blocks):
            if hasattr(block, "guest_phys_addr") and hasattr(block, "array"):
                self.regions.append((block.guest_phys_addr, block.array))
                continue
            if config is None:
                raise ValueError("plain buffers need the guest configuration for their addresses")
            array = np.frombuffer(block, dtype=np.uint8) if not isinstance(block, np.ndarray) \
                else block.view(np.uint8).reshape(-1)
            layout = config.blocks[index]
            if array.size != layout.size_bytes:
                raise ValueError(f"buffer {index} has {array.size} bytes, block {layout.name!r} "
                                 f"{layout.size_bytes}")
            self.regions.append((layout.guest_phys_addr, array))

    def view(self, gpa: int, nbytes: int) -> np.ndarray:
        """The bytes ``[gpa, gpa + nbytes)`` as a uint8 array sharing the guest's memory."""
        for base, array in self.regions:
            offset = gpa - base
            if 0 <= offset and offset + nbytes <= array.size:
                return array[offset:offset + nbytes]
        raise ValueError(f"guest-physical range [{gpa:#x}, {gpa + nbytes:#x}) is not inside one "
                         f"RAM block")

    def words(self, gpa: int, nbytes: int) -> np.ndarray:
        """The same range as little-endian u64 words."""
        return self.view(gpa, nbytes).view("<u8")


# --- the mailbox ---------------------------------------------------------------------------

class MailboxRecord(NamedTuple):
    """One vCPU's progress record (mailbox at 0x6000 + 64*i)."""

    passes: int = 0
    pages_written: int = 0
    errors: int = 0
    result: int = 0
    done: int = 0


def pack_mailbox(records: Sequence[MailboxRecord]) -> bytes:
    """The mailbox bytes for ``records`` (vCPU 0 first)."""
    return b"".join(MAILBOX_RECORD.pack(*record, 0) for record in records)


def unpack_mailbox(data: bytes | memoryview | np.ndarray, vcpus: int) -> list[MailboxRecord]:
    """The first ``vcpus`` records of a mailbox."""
    buf = bytes(data[:MAILBOX_RECORD_BYTES * vcpus])
    return [MailboxRecord(*MAILBOX_RECORD.unpack_from(buf, MAILBOX_RECORD_BYTES * i)[:5])
            for i in range(vcpus)]


def read_mailbox(memory: Any, vcpus: int) -> list[MailboxRecord]:
    """The mailbox records of a guest, RAM blocks or :class:`PhysMemory`."""
    phys = memory if isinstance(memory, PhysMemory) else PhysMemory(memory)
    return unpack_mailbox(phys.view(MAILBOX_GPA, MAILBOX_RECORD_BYTES * vcpus), vcpus)


def touch_mailbox(blocks: Sequence[Any], vcpus: int) -> None:
    """Fault the mailbox in without the GIL: during post-copy its page may still be missing at
    the destination, and a reader that waits for it holding the GIL would stop the threads
    that fetch it (docs/architecture.md, "Post-copy")."""
    nbytes = MAILBOX_RECORD_BYTES * vcpus
    index, offset = locate(blocks, MAILBOX_GPA, nbytes)
    touch_without_gil(blocks[index].address + offset, nbytes)


def progress_from_mailbox(blocks: Any, vcpus: int) -> dict[str, int]:
    """What ``guest.progress()`` returns: the vCPUs' records aggregated.

    ``passes`` is the minimum over vCPUs, ``pages_written`` and ``errors`` are sums, ``done`` is
    1 when every vCPU is done, ``result`` the XOR of the vCPUs' results (vCPU 0's with one vCPU).
    Each word is read as one aligned 64-bit load, so a running guest gives a recent value of each
    word, though not one instant for all of them.
    """
    records = read_mailbox(blocks, vcpus)
    result = 0
    for record in records:
        result ^= record.result
    return {
        "passes": min(r.passes for r in records),
        "pages_written": sum(r.pages_written for r in records),
        "errors": sum(r.errors for r in records),
        "done": int(all(r.done for r in records)),
        "result": result,
    }


# --- selfcheck verification ----------------------------------------------------------------

@dataclass
class SelfCheckReport:
    """Outcome of :func:`verify_selfcheck`.

    ``passes``: completed passes according to RAM (minimum over vCPUs); ``errors``: the sum of
    the guest's own error counters; ``detail``: one line per problem (empty when ``ok``);
    ``in_progress``: pages found half-stamped (a vCPU stopped mid-stamp; never for the simulated
    guest, which stops between pages).
    """

    ok: bool
    passes: int
    errors: int
    detail: list[str] = field(default_factory=list)
    in_progress: int = 0


_DETAIL_LIMIT = 8  # lines per vCPU: enough to see the pattern of a failure


def _check_share(phys: PhysMemory, share: Share, record: MailboxRecord,
                 exact: bool) -> tuple[int, int, list[str]]:
    """Check one vCPU's share; returns (completed passes, half-stamped pages, problems)."""
    n = share.npages
    pages = phys.words(share.first_gpa, n * GUEST_PAGE_SIZE).reshape(n, GUEST_PAGE_SIZE // 8)
    first, frame, last = pages[:, 0], pages[:, 1], pages[:, -1]
    frames = np.arange(share.first_frame, share.first_frame + n, dtype=np.uint64)
    # Page 0 always carries the newest pass in its last word (it is stamped first, last word
    # first), so one rogue page elsewhere cannot shift what "new" means.
    hi = int(last[0])
    where = f"vCPU {share.index}"
    problems: list[str] = []

    def frame_ok(p: int) -> np.ndarray:
        return frame == (frames if p >= 1 else 0)

    new = (first == hi) & (last == hi) & frame_ok(hi)
    if hi >= 1:
        old = (first == hi - 1) & (last == hi - 1) & frame_ok(hi - 1)
        # Mid-stamp: the last word is stamped first, then the frame, then word 0.
        partial = (first == hi - 1) & (last == hi) & (frame_ok(hi - 1) | frame_ok(hi))
    else:
        old = partial = np.zeros(n, dtype=bool)
    for j in np.flatnonzero(pages[:, 2:-1].any(axis=1))[:_DETAIL_LIMIT]:
        problems.append(f"{where}: page {j} (gpa {share.first_gpa + j * GUEST_PAGE_SIZE:#x}) has "
                        f"data outside the stamp words")
    for j in np.flatnonzero(~(new | old | partial))[:_DETAIL_LIMIT]:
        a, f, b = int(first[j]), int(frame[j]), int(last[j])
        if a != b:
            what = f"torn: pass words {a} and {b} differ"
        elif a not in (hi, hi - 1):
            what = f"pass {a} where {hi - 1} or {hi} belong"
        else:
            what = f"frame word {f:#x}, expected {int(frames[j]) if a else 0:#x}"
        problems.append(f"{where}: page {j} (gpa {share.first_gpa + j * GUEST_PAGE_SIZE:#x}) "
                        f"{what}")

    if new.all() or hi == 0:
        completed, stamped, half = hi, hi * n, 0
    else:
        k = int(np.argmin(new))  # pages [0, k) carry the new pass
        half = int(partial[k])
        misplaced = k + half + np.flatnonzero((new | partial)[k + half:])
        if misplaced.size:
            problems.append(f"{where}: stamps out of order: page {k} is not at pass {hi} but "
                            f"page {misplaced[0]} is")
        if half and exact:
            problems.append(f"{where}: page {k} is half-stamped")
        completed, stamped = hi - 1, (hi - 1) * n + k

    pw, passes = record.pages_written, record.passes
    counted = pw == stamped or (not exact and not half and pw == stamped - 1)
    expect_passes = {pw // n} | ({pw // n - 1} if not exact and pw and pw % n == 0 else set())
    if not counted:
        problems.append(f"{where}: mailbox says {pw} pages written, RAM shows {stamped} stamps")
    elif passes not in expect_passes:
        problems.append(f"{where}: mailbox says {passes} passes after {pw} stamps of {n} pages")
    return completed, half, problems


def verify_selfcheck(guest_or_blocks: Any, config: GuestConfig | None = None, *,
                     exact: bool = False) -> SelfCheckReport:
    """Check the selfcheck workload's invariant in a stopped guest's RAM.

    For each vCPU's share: pages [0, k) carry pass p, pages [k, m) pass p-1, both pass words of
    each page are equal, the frame word is right (zero for pass 0) and nothing else in the page
    is written; the mailbox agrees (``pages_written`` = stamps in RAM, ``passes`` = completed
    passes) and its error counters are zero.

    A KVM vCPU stops at any instruction, so by default one page at k may be half-stamped in the
    documented stamp order (last word, frame, first word) and the counters may lag that stamp
    by one.  ``exact=True`` accepts neither; the simulated guest always satisfies it because it
    stops only between pages.  Call this on a paused guest (or a copy of its RAM): on a running
    guest the pages and the mailbox are from different moments.
    """
    config = config if config is not None else guest_or_blocks.config
    if config.workload != "selfcheck":
        raise ValueError(f"the guest runs {config.workload!r}, not the selfcheck workload")
    workload = resolve(config)
    phys = PhysMemory(guest_or_blocks, config)
    records = read_mailbox(phys, workload.vcpus)
    detail: list[str] = []
    passes, half_pages = [], 0
    for share, record in zip(workload.shares, records):
        completed, half, problems = _check_share(phys, share, record, exact)
        passes.append(completed)
        half_pages += half
        detail += problems
        if record.errors:
            detail.append(f"vCPU {share.index}: the guest counted {record.errors} error(s)")
    errors = sum(r.errors for r in records)
    return SelfCheckReport(not detail, min(passes), errors, detail, half_pages)


# --- generators ----------------------------------------------------------------------------

def _xorshift64_step(x: int) -> int:
    x ^= (x << 13) & U64
    x ^= x >> 7
    x ^= (x << 17) & U64
    return x


def _byte_tables(images: np.ndarray) -> np.ndarray:
    """For a GF(2)-linear map given by the images of the 64 unit vectors, 8 lookup tables of 256
    entries: the image of byte value v at byte position t is ``tables[t, v]``."""
    bits = ((np.arange(256, dtype=np.uint64)[:, None] >> np.arange(8, dtype=np.uint64)) & 1) \
        .astype(bool)
    tables = np.zeros((8, 256), dtype=np.uint64)
    for t in range(8):
        for b in range(8):
            tables[t][bits[:, b]] ^= images[8 * t + b]
    return tables


def _apply_linear(tables: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for t in range(8):
        out ^= tables[t][((x >> np.uint64(8 * t)) & np.uint64(0xFF)).astype(np.intp)]
    return out


def xorshift64_sequence(seed: int, count: int) -> np.ndarray:
    """The first ``count`` xorshift64 outputs from ``seed``, vectorised.

    xorshift64 is linear over GF(2), so step L maps x_k to x_{k+L}: the sequence doubles in
    length with one table-driven application of that map per doubling.
    """
    out = np.empty(count, dtype=np.uint64)
    x, head = seed, min(count, 64)
    for i in range(head):
        x = _xorshift64_step(x)
        out[i] = x
    length = head
    # Images of the unit vectors under "step 64 times", then squared as the sequence doubles.
    images = np.array([1 << b for b in range(64)], dtype=np.uint64)
    for _ in range(64):
        images ^= images << np.uint64(13)
        images ^= images >> np.uint64(7)
        images ^= images << np.uint64(17)
    while length < count:
        tables = _byte_tables(images)
        take = min(length, count - length)
        out[length:length + take] = _apply_linear(tables, out[:take])
        length += take
        images = _apply_linear(tables, images)
    return out


def _below(x: np.ndarray, k: int | np.ndarray) -> np.ndarray:
    """``below``: the high 64 bits of ``x * k`` for k < 2**32, in 64-bit arithmetic."""
    k = np.asarray(k, dtype=np.uint64)
    high, low = x >> np.uint64(32), x & np.uint64(U32)
    return (high * k + ((low * k) >> np.uint64(32))) >> np.uint64(32)


# --- dirtier reference ---------------------------------------------------------------------

def dirtier_pages(workload: Workload, index: int, count: int) -> np.ndarray:
    """The pages (indices inside its share) that vCPU ``index``'s first ``count`` dirtier writes
    go to, in order."""
    if workload.name != "dirtier":
        raise ValueError(f"{workload.name} is not the dirtier")
    share, pattern = workload.shares[index], workload.params.pattern
    m, h = share.npages, share.hot_pages
    if pattern == "sequential":
        return np.arange(count, dtype=np.int64) % m
    if pattern == "uniform":
        return _below(xorshift64_sequence(share.dirtier_seed, count), m).astype(np.int64)
    draws = xorshift64_sequence(share.dirtier_seed, 2 * count)
    hot = (draws[0::2] >> np.uint64(32)) < np.uint64(workload.params.hot_share_u32)
    span = np.where(hot, h, m - h).astype(np.uint64)
    return (np.where(hot, 0, h) + _below(draws[1::2], span)).astype(np.int64)


def dirtier_counts(workload: Workload, index: int, count: int) -> np.ndarray:
    """Byte 0 of each page of vCPU ``index``'s share after its first ``count`` writes (from
    zero), as uint8."""
    pages = dirtier_pages(workload, index, count)
    return (np.bincount(pages, minlength=workload.shares[index].npages) % 256).astype(np.uint8)


# --- compute reference ---------------------------------------------------------------------

def compute_rounds(words: np.ndarray, rounds: int, c: int = 0) -> tuple[int, np.ndarray]:
    """``rounds`` compute rounds over one share's words (j counted from ``words[0]``), from
    checksum ``c``: ``(c, the words after them)``."""
    words = words.astype(np.uint64, copy=True)
    index = np.arange(words.size, dtype=np.uint64)
    left = index & np.uint64(63)
    right = (np.uint64(64) - left) & np.uint64(63)
    for _ in range(rounds):
        v = words + index
        s = int(np.bitwise_xor.reduce((v << left) | (v >> right))) if words.size else 0
        c = (((c << 1) | (c >> 63)) & U64) ^ s
        words += np.uint64(s)
    return c, words


def compute_share(seed: int, npages: int, rounds: int) -> tuple[int, np.ndarray]:
    """One vCPU's compute workload: ``(result, its share's final words)``."""
    return compute_rounds(xorshift64_sequence(seed, npages * (GUEST_PAGE_SIZE // 8)), rounds)


@functools.lru_cache(maxsize=16)
def _compute_results(rounds: int, region_bytes: int, vcpus: int) -> tuple[int, ...]:
    params = WorkloadParams("compute", area_bytes=region_bytes, rounds=rounds)
    workload = make_workload(params, vcpus)
    return tuple(compute_share(s.seed, s.npages, rounds)[0] for s in workload.shares)


def expected_compute_results(params: dict[str, Any] | None, vcpus: int = 1) -> list[int]:
    """Each vCPU's compute result for ``params`` (the defaults filled in)."""
    p = parse_params("compute", params)
    return list(_compute_results(p.rounds, p.area_bytes, vcpus))


def expected_compute_result(params: dict[str, Any] | None, vcpus: int = 1) -> int:
    """The guest's compute result: the XOR of its vCPUs' results (``progress()["result"]``)."""
    result = 0
    for value in expected_compute_results(params, vcpus):
        result ^= value
    return result


# --- diskcheck reference and verification --------------------------------------------------

def diskcheck_words(first_lba: int, count: int, generation: int | np.ndarray) -> np.ndarray:
    """The stamps of sectors ``[first_lba, first_lba + count)`` at ``generation`` (one for all,
    or one per sector), as a (count, 128) array of u32 words."""
    lba = np.arange(first_lba, first_lba + count, dtype=np.uint64)
    gen = np.broadcast_to(np.asarray(generation, dtype=np.uint64), lba.shape) & np.uint64(U32)
    seed = ((lba * np.uint64(DISK_LBA_MUL)) ^ (gen * np.uint64(DISK_GEN_MUL))) & np.uint64(U32)
    step = np.arange(DISK_SECTOR_BYTES // 4, dtype=np.uint64) * np.uint64(DISK_STEP)
    words = (seed[:, None] + step[None, :]) & np.uint64(U32)
    words[:, 0] = DISK_MAGIC
    words[:, 1] = lba & np.uint64(U32)
    words[:, 2] = lba >> np.uint64(32)
    words[:, 3] = gen
    return words.astype(np.uint32)


def diskcheck_block(block: int, generation: int) -> bytes:
    """Block ``block`` of the working set as diskcheck writes it at ``generation``."""
    return diskcheck_words(block * DISK_BLOCK_SECTORS, DISK_BLOCK_SECTORS,
                           generation).astype("<u4").tobytes()


@dataclass
class DiskCheckReport:
    """Outcome of :func:`verify_diskcheck`: ``passes`` completed according to the disk,
    ``errors`` the guest's own count, ``detail`` one line per problem (empty when ``ok``),
    ``in_progress`` 1 when the block being written was found part-way (sectors of the new
    pass, then of the previous one: the guest stopped inside a WRITE SECTORS command)."""

    ok: bool
    passes: int
    errors: int
    detail: list[str] = field(default_factory=list)
    in_progress: int = 0


def verify_diskcheck(image: Any, config: GuestConfig,
                     record: MailboxRecord | None = None) -> DiskCheckReport:
    """Check diskcheck's invariant on its disk image (a path, or the bytes of the working set)
    of a stopped guest: blocks [0, k) stamped with pass p, block k possibly with its first
    sectors at p and the rest at p - 1, blocks (k, n) at p - 1 (pass 0: unwritten, all zero,
    or any well-formed stamp of a disk diskcheck used before); with the guest's ``record``,
    that its counters agree (blocks written = blocks stamped, or one less when the guest
    stopped before counting; passes) and that it counted no error."""
    if config.workload != "diskcheck":
        raise ValueError(f"the guest runs {config.workload!r}, not the diskcheck workload")
    n = resolve(config).params.disk_blocks
    nbytes = n * DISK_BLOCK_BYTES
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = np.frombuffer(image, dtype="<u4", count=nbytes // 4)
    else:
        data = np.fromfile(image, dtype="<u4", count=nbytes // 4)
    if data.size * 4 < nbytes:
        return DiskCheckReport(False, 0, 0, [f"the image holds {data.size * 4} bytes of the "
                                             f"{nbytes}-byte working set"])
    sectors = data.reshape(n * DISK_BLOCK_SECTORS, DISK_SECTOR_BYTES // 4)
    hi = int(sectors[0, 3]) if sectors[0, 0] == DISK_MAGIC else 0
    count = n * DISK_BLOCK_SECTORS
    new = (sectors == diskcheck_words(0, count, hi)).all(axis=1) if hi else \
        np.zeros(count, dtype=bool)
    if hi >= 2:
        old = (sectors == diskcheck_words(0, count, hi - 1)).all(axis=1)
    else:  # pass 0: unwritten, or a stamp of its own (any generation) from an earlier run
        old = ~sectors.any(axis=1) | (sectors == diskcheck_words(0, count, sectors[:, 3])).all(
            axis=1)
    detail: list[str] = []
    bad = np.flatnonzero(~(new | old))
    for s in bad[:_DETAIL_LIMIT]:
        word = sectors[s]
        what = (f"generation {int(word[3])} where {hi - 1} or {hi} belong"
                if word[0] == DISK_MAGIC and word[1] == s % (1 << 32) else
                "not a stamp of this sector" if word.any() else "zero")
        detail.append(f"sector {s} (block {s // DISK_BLOCK_SECTORS}): {what}")
    block_new = new.reshape(n, DISK_BLOCK_SECTORS).all(axis=1)
    half = 0
    if block_new.all():
        completed, stamped = hi, hi * n
    else:
        k = int(np.argmin(block_new))
        inside = new[k * DISK_BLOCK_SECTORS:(k + 1) * DISK_BLOCK_SECTORS]
        written = int(np.argmin(inside)) if not inside.all() else DISK_BLOCK_SECTORS
        half = int(written > 0)
        if inside[written:].any():
            detail.append(f"block {k}: its sectors are not written in order")
        later = np.flatnonzero(new[(k + 1) * DISK_BLOCK_SECTORS:])
        if later.size and hi:
            detail.append(f"blocks out of order: block {k} is not at pass {hi} but sector "
                          f"{(k + 1) * DISK_BLOCK_SECTORS + int(later[0])} is")
        completed, stamped = max(hi - 1, 0), max(hi - 1, 0) * n + k
    errors = 0
    if record is not None:
        errors = record.errors
        pw, passes = record.pages_written, record.passes
        if pw != stamped and (half or pw != stamped - 1):
            detail.append(f"mailbox says {pw} blocks written, the disk shows {stamped}")
        allowed = {completed} | ({completed - 1} if stamped == completed * n and completed
                                 else set())
        if passes not in allowed:
            detail.append(f"mailbox says {passes} passes, the disk shows {completed}")
        if errors:
            detail.append(f"the guest counted {errors} error(s)")
    return DiskCheckReport(not detail, completed, errors, detail, half)
