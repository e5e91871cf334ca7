"""The built-in workloads, as the host sees them: parameters, guest-RAM layouts, expected results.

The KVM guest (assembly) and the simulated guest (a native writer thread) run the same four
workloads and keep the same words in guest RAM, so one host-side module describes them, checks
them, and predicts their results.  Everything here is pure Python/numpy.

Guest-physical map (constants in :mod:`pymig.guest.base`)::

    0x5000  parameter block (one page, host -> guest, written before start)
    0x6000  mailbox: 64-byte progress record per vCPU (guest -> host)
    1 MiB   working set (dirtier, selfcheck) or region (compute), split in per-vCPU shares

Parameter block at 0x5000 (little-endian; every value the guest needs is precomputed here so a
32-bit guest never divides or multiplies 64-bit numbers)::

    +0x00 u32 magic 0x4C574D50 ("PMWL")   +0x04 u32 version (1)
    +0x08 u32 workload: 0 idle, 1 dirtier, 2 selfcheck, 3 compute
    +0x0C u32 vcpus                       +0x10 u32 pattern: 0 uniform, 1 sequential, 2 hotspot
    +0x14 u32 hot_share_q16 (0..65536)    +0x18 u32 rounds (compute)
    +0x1C u32 page_size (4096)            +0x20 u64 rate_pages_per_s (whole guest; 0 = max)
    +0x28 u64 area_gpa (0x100000)         +0x30 u64 area_bytes (working set or region)
    +0x38 .. +0xFF reserved, zero
    +0x100 + 32*i  per-vCPU share record, i < vcpus:
        +0 u64 first_gpa   guest-physical address of the share's first page
        +8 u64 npages      pages in the share (m >= 1; 0 for idle)
        +16 u32 hot_pages  h: the share's first h pages are its hot part (hotspot)
        +20 u32 seed32     xorshift32 state to start from (non-zero)
        +24 u64 seed64     xorshift64 state to start from (non-zero)

Mailbox record of vCPU i at 0x6000 + 64*i (u64 each, written only by that vCPU)::

    +0 passes   +8 pages_written   +16 errors   +24 result   +32 done   +40 reserved

The counters live in RAM: a vCPU adds to them in place after every page (the simulated writer
after every batch, and it stops only between batches), so they migrate with the memory and a
destination carries on counting from the source's values.

Shares: with m_total pages in the area and v vCPUs, vCPU i owns pages
[i*m_total//v, (i+1)*m_total//v).  ``rate_pages_per_s`` counts page writes (a page written
twice counts twice) of the whole guest: each vCPU writes rate/v pages per second.  Seeds:
``seed64_i = SEED ^ (i * GOLDEN mod 2**64)`` (SEED when that is 0) and
``seed32_i = (seed64_i ^ seed64_i >> 32) & 0xFFFFFFFF`` (0x9E3779B9 when 0), with
``SEED = 0x853C49E6748FEA9B`` and ``GOLDEN = 0x9E3779B97F4A7C15``.  The host precomputes all of
it into the parameter block.

Generators (all shifts logical, values wrap at the register width)::

    xorshift32(x): x ^= x << 13; x ^= x >> 17; x ^= x << 5      (32-bit)
    xorshift64(x): x ^= x << 13; x ^= x >> 7;  x ^= x << 17     (64-bit; in 32-bit code a pair
                                                                  of registers with shld/shrd)
    Each call advances the state and returns the new state.

idle
    Touches no memory after start.

dirtier  (working_set_bytes, rate_pages_per_s, pattern, hot_fraction, hot_share)
    Each write picks a page j of the vCPU's share (m pages, h hot) and increments byte 0 of it
    (wrapping at 256).  With r = xorshift32 and ``mulhi(r, x) = (r * x) >> 32``:
    uniform ``j = mulhi(r, m)``; sequential ``j = pos``; hotspot: ``r1 = r``, if
    ``(r1 >> 16) < hot_share_q16`` then ``j = mulhi(r2, h)`` else ``j = h + mulhi(r2, m - h)``
    (``mulhi(r2, h)`` when h == m), r2 being the next xorshift32 value.  After each write
    ``pos += 1``; when pos reaches m it restarts at 0 and ``passes`` is incremented, so passes
    counts share-sized rounds of writes for every pattern.  ``h = clamp(round(m*hot_fraction),
    1, m)``, ``hot_share_q16 = round(hot_share * 65536)``.

selfcheck  (working_set_bytes, rate_pages_per_s)
    Pass p = 1, 2, ... stamps the share's pages in order.  For page j (gpa g, frame f = g >> 12)
    it first checks the page's three words hold pass p-1 (u64 at 0 and at 4088, frame f at 8; for
    p = 1 all three are zero) and adds 1 to ``errors`` per page that does not, then stamps, in
    this order: word 4088 <- p, word 8 <- f, word 0 <- p; then ``pages_written += 1``; after the
    share's last page ``passes += 1``.  The rest of every page stays zero.  Invariant: for each
    share there is k with pages [0, k) at pass p and [k, m) at pass p-1 (see
    :func:`verify_selfcheck`, which also accepts the one page a vCPU stopped mid-stamp).

compute  (rounds, region_bytes)
    vCPU i works on the N = 512 * m u64 words w[0..N) of its share (ascending addresses).
    Fill: ``x = seed64_i``; for J in 0..N-1: ``x = xorshift64(x); w[J] = x``.  Then, with
    ``acc = 0``, for r in 0..rounds-1::

        key = acc + GOLDEN + r                          (mod 2**64)
        s = 0
        for J in 0..N-1:
            w[J] = rotl64(w[J] ^ key, 7) + J            (mod 2**64; written back to RAM)
            s = s + w[J]                                (mod 2**64)
        acc = rotl64(acc, 9) ^ s

    then ``result = acc`` and ``done = 1`` in its mailbox record.  Every step is a 64-bit xor,
    add (add/adc) or rotate (two shld), so 32-bit code implements it without multiplication.
    ``pages_written`` counts pages filled plus pages folded ((1 + rounds) * m when done);
    ``passes`` counts completed rounds.  The guest's result (``progress()["result"]``) is the XOR
    of the vCPUs' results.

    Worked example (SEED, one vCPU): the first xorshift64 outputs are 0x00EA4BE701D3338E,
    0x44103C51B1BFB669, 0x3FF8298A6D767345; a 4096-byte region with rounds=1 ends with
    w[0] = 0x6E992F3F4CA7CDCF, w[1] = 0x13A2F4677AE53E6E and result 0x991505C3478EEFB0; with
    rounds=2 the result is 0x22086244583CBE81.  With the defaults (4 MiB, 64 rounds) the result
    is 0xD9E680B7A2BBBB07 on one vCPU and 0x6C2AA5B60FB08D3E on two.
"""

from __future__ import annotations

import functools
import math
import operator
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np

from pymig.guest.base import (
    GUEST_PAGE_SIZE,
    MAILBOX_GPA,
    MAILBOX_RECORD_BYTES,
    MAX_VCPUS,
    PARAMS_GPA,
    WORKSET_GPA,
    GuestConfig,
    locate,
)

MiB = 1 << 20
SEED = 0x853C49E6748FEA9B
GOLDEN = 0x9E3779B97F4A7C15
SEED32_FALLBACK = 0x9E3779B9
U64 = (1 << 64) - 1

WORKLOAD_IDS = {"idle": 0, "dirtier": 1, "selfcheck": 2, "compute": 3}
PATTERN_IDS = {"uniform": 0, "sequential": 1, "hotspot": 2}
DEFAULTS: dict[str, dict[str, Any]] = {
    "idle": {},
    "dirtier": {"working_set_bytes": 64 * MiB, "rate_pages_per_s": 0, "pattern": "uniform",
                "hot_fraction": 0.1, "hot_share": 0.9},
    "selfcheck": {"working_set_bytes": 64 * MiB, "rate_pages_per_s": 0},
    "compute": {"rounds": 64, "region_bytes": 4 * MiB},
}

PARAMS_MAGIC = 0x4C574D50
PARAMS_VERSION = 1
PARAMS_HEADER = struct.Struct("<IIIIIIIIQQQ")
SHARE_RECORD = struct.Struct("<QQIIQ")
SHARES_OFFSET = 0x100
MAILBOX_RECORD = struct.Struct("<QQQQQQ16x")  # 5 words, reserved +40, padding
# Byte offsets of the mailbox words, for code that reads or writes one word in place.
MB_PASSES, MB_PAGES_WRITTEN, MB_ERRORS, MB_RESULT, MB_DONE = 0, 8, 16, 24, 32

assert SHARES_OFFSET >= PARAMS_HEADER.size
assert SHARES_OFFSET + SHARE_RECORD.size * MAX_VCPUS <= GUEST_PAGE_SIZE
assert MAILBOX_RECORD.size == MAILBOX_RECORD_BYTES


@dataclass(frozen=True)
class WorkloadParams:
    """A workload's parameters, validated and completed with the defaults.

    ``area_bytes`` is the working set (dirtier, selfcheck) or the region (compute), 0 for idle.
    """

    workload: str
    area_bytes: int = 0
    rate_pages_per_s: int = 0
    pattern: str = "uniform"
    hot_fraction: float = 0.1
    hot_share: float = 0.9
    rounds: int = 0

    @property
    def workload_id(self) -> int:
        return WORKLOAD_IDS[self.workload]

    @property
    def area_pages(self) -> int:
        return self.area_bytes // GUEST_PAGE_SIZE

    @property
    def hot_share_q16(self) -> int:
        return round(self.hot_share * 65536)


@dataclass(frozen=True)
class Share:
    """One vCPU's part of the working set and the values it starts from."""

    index: int
    first_gpa: int
    npages: int
    hot_pages: int
    seed32: int
    seed64: int

    @property
    def first_frame(self) -> int:
        return self.first_gpa // GUEST_PAGE_SIZE


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
    if workload == "idle":
        return WorkloadParams("idle")
    if workload == "compute":
        rounds = _int_param("rounds", merged["rounds"], 1)
        if rounds > 0xFFFFFFFF:
            raise ValueError(f"workload parameter 'rounds' must be < 2**32, not {rounds}")
        return WorkloadParams("compute", area_bytes=_size_param("region_bytes",
                                                                merged["region_bytes"]),
                              rounds=rounds)
    rate = _int_param("rate_pages_per_s", merged["rate_pages_per_s"], 0)
    area = _size_param("working_set_bytes", merged["working_set_bytes"])
    if workload == "selfcheck":
        return WorkloadParams("selfcheck", area_bytes=area, rate_pages_per_s=rate)
    pattern = merged["pattern"]
    if pattern not in PATTERN_IDS:
        raise ValueError(f"workload parameter 'pattern' must be one of {sorted(PATTERN_IDS)}, "
                         f"not {pattern!r}")
    return WorkloadParams("dirtier", area_bytes=area, rate_pages_per_s=rate, pattern=pattern,
                          hot_fraction=_fraction_param("hot_fraction", merged["hot_fraction"],
                                                       True),
                          hot_share=_fraction_param("hot_share", merged["hot_share"], False))


def vcpu_seeds(index: int) -> tuple[int, int]:
    """``(seed32, seed64)`` of vCPU ``index`` (see the module docstring)."""
    seed64 = SEED ^ ((index * GOLDEN) & U64) or SEED
    seed32 = ((seed64 ^ (seed64 >> 32)) & 0xFFFFFFFF) or SEED32_FALLBACK
    return seed32, seed64


def share_bounds(total_pages: int, vcpus: int, index: int) -> tuple[int, int]:
    """Pages ``[start, end)`` of the area that vCPU ``index`` of ``vcpus`` owns."""
    return index * total_pages // vcpus, (index + 1) * total_pages // vcpus


def make_workload(params: WorkloadParams, vcpus: int) -> Workload:
    """Split the workload's area between ``vcpus`` vCPUs."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"the built-in workloads run on 1 to {MAX_VCPUS} vCPUs, not {vcpus}")
    total = params.area_pages
    if params.workload != "idle" and total < vcpus:
        raise ValueError(f"{params.workload}: {total} pages cannot give each of {vcpus} vCPUs a "
                         f"page of its own")
    shares = []
    for index in range(vcpus):
        start, end = share_bounds(total, vcpus, index)
        npages = end - start
        hot = min(max(round(npages * params.hot_fraction), 1), npages) if npages else 0
        seed32, seed64 = vcpu_seeds(index)
        shares.append(Share(index, WORKSET_GPA + start * GUEST_PAGE_SIZE, npages, hot, seed32,
                            seed64))
    return Workload(params, vcpus, tuple(shares))


def resolve(config: GuestConfig) -> Workload:
    """The workload of ``config``, checked against its memory map.

    The parameter block, the mailbox and the whole area must each lie inside one RAM block.
    """
    workload = make_workload(parse_params(config.workload, config.params), config.vcpus)
    locate(config.blocks, PARAMS_GPA, GUEST_PAGE_SIZE)
    locate(config.blocks, MAILBOX_GPA, GUEST_PAGE_SIZE)
    if workload.params.area_bytes:
        try:
            locate(config.blocks, WORKSET_GPA, workload.params.area_bytes)
        except ValueError:
            raise ValueError(
                f"{workload.name}: its {workload.params.area_bytes} bytes at {WORKSET_GPA:#x} do "
                f"not fit in the guest's RAM blocks ({config.memory_bytes} bytes)") from None
    return workload


# --- the parameter block -------------------------------------------------------------------

def pack_params(workload: Workload) -> bytes:
    """The parameter block page the host writes at 0x5000 before start."""
    p = workload.params
    page = bytearray(GUEST_PAGE_SIZE)
    PARAMS_HEADER.pack_into(page, 0, PARAMS_MAGIC, PARAMS_VERSION, p.workload_id, workload.vcpus,
                            PATTERN_IDS[p.pattern], p.hot_share_q16, p.rounds, GUEST_PAGE_SIZE,
                            p.rate_pages_per_s, WORKSET_GPA, p.area_bytes)
    for share in workload.shares:
        SHARE_RECORD.pack_into(page, SHARES_OFFSET + SHARE_RECORD.size * share.index,
                               share.first_gpa, share.npages, share.hot_pages, share.seed32,
                               share.seed64)
    return bytes(page)


def unpack_params(page: bytes | memoryview | np.ndarray) -> Workload:
    """Read a parameter block back (tools, tests, a destination double-checking its config)."""
    buf = bytes(page)
    if len(buf) < GUEST_PAGE_SIZE:
        raise ValueError(f"a parameter block is {GUEST_PAGE_SIZE} bytes, not {len(buf)}")
    (magic, version, workload_id, vcpus, pattern_id, hot_q16, rounds, page_size, rate, area_gpa,
     area_bytes) = PARAMS_HEADER.unpack_from(buf, 0)
    if magic != PARAMS_MAGIC:
        raise ValueError(f"no parameter block here (magic {magic:#010x})")
    if version != PARAMS_VERSION or page_size != GUEST_PAGE_SIZE or area_gpa != WORKSET_GPA:
        raise ValueError(f"parameter block version {version}, page size {page_size}, area at "
                         f"{area_gpa:#x}: not what this pymig writes")
    names = {v: k for k, v in WORKLOAD_IDS.items()}
    patterns = {v: k for k, v in PATTERN_IDS.items()}
    if workload_id not in names or pattern_id not in patterns or not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"parameter block names workload {workload_id}, pattern {pattern_id}, "
                         f"{vcpus} vCPUs")
    shares = tuple(Share(i, *SHARE_RECORD.unpack_from(buf, SHARES_OFFSET + SHARE_RECORD.size * i))
                   for i in range(vcpus))
    hot_fraction = shares[0].hot_pages / shares[0].npages if shares[0].npages else 0.1
    params = WorkloadParams(names[workload_id], area_bytes=area_bytes, rate_pages_per_s=rate,
                            pattern=patterns[pattern_id], hot_fraction=hot_fraction,
                            hot_share=hot_q16 / 65536, rounds=rounds)
    return Workload(params, vcpus, shares)


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


# --- compute reference ---------------------------------------------------------------------

def _rotl64(x: np.ndarray, k: int) -> np.ndarray:
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


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


def compute_share(seed64: int, npages: int, rounds: int) -> tuple[int, np.ndarray]:
    """One vCPU's compute workload: ``(result, its share's final words)``."""
    words = xorshift64_sequence(seed64, npages * (GUEST_PAGE_SIZE // 8))
    index = np.arange(words.size, dtype=np.uint64)
    acc = 0
    for r in range(rounds):
        key = np.uint64((acc + GOLDEN + r) & U64)
        words = _rotl64(words ^ key, 7)
        words += index
        s = int(words.sum(dtype=np.uint64))
        acc = (((acc << 9) | (acc >> 55)) & U64) ^ s
    return acc, words


@functools.lru_cache(maxsize=16)
def _compute_results(rounds: int, region_bytes: int, vcpus: int) -> tuple[int, ...]:
    params = WorkloadParams("compute", area_bytes=region_bytes, rounds=rounds)
    workload = make_workload(params, vcpus)
    return tuple(compute_share(s.seed64, s.npages, rounds)[0] for s in workload.shares)


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
