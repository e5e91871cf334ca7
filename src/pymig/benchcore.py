"""Benchmarks of the compiled page core, each against a ceiling timed alongside it.

Every benchmark times its kernel and its ceiling back to back on the same buffer, round after
round, and reports medians, because these hosts are noisy (single-thread memory bandwidth
varies by 10 % from run to run).  The ceilings:

* zero-page scan, bitmap scans: one plain read pass over the same bytes (the AVX2/u64 sum of
  ``pymig._core.cpu._read_sum``, as fast as this machine reads);
* packet encode and decode: ``np.copyto`` of the same page bytes (what memcpy does);
* LZ4 on pages that do not compress: the same encode without LZ4.

``run_core_benchmarks()`` returns ``{name: {value, unit, ceiling, ceiling_unit, ceiling_name,
ratio, target, ok, variant, ...}}`` where ``ratio`` is the kernel's speed as a share of the
ceiling's on the same bytes (``value / ceiling`` in GB/s, ``ceiling / value`` in ms), and
``ceiling_name`` says what that ceiling is; a row whose ratio can pass 1 says why in ``note``.
It reports each case as it finishes (``on_result``); ``format_report()`` renders the results
as two tables, one per unit, and a legend.  The pytest-benchmark files in ``benchmarks/`` time
the same cases.  Full size: 1 GiB of guest memory (populated before timing) and bitmaps of 16 Mi pages
(64 GiB of 4 KiB pages); ``quick`` shrinks both for a smoke run.
"""

from __future__ import annotations

import mmap
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

GIB = 1 << 30
PAGE = 4096
PACKET_BYTES = 1 << 20  # a GiB of pages in ~1000 encode/decode calls
BITMAP_PAGES = 16 << 20  # 64 GiB of 4 KiB pages
DENSITIES = (0.001, 0.01, 0.1, 1.0)


@dataclass
class Target:
    """``ratio >= value`` (throughput cases) or ``ms <= value`` (latency cases)."""

    kind: str  # "ratio" or "ms"
    value: float

    def met(self, ratio: float, value_ms: float) -> bool:
        return ratio >= self.value if self.kind == "ratio" else value_ms <= self.value

    def __str__(self) -> str:
        return f">= {self.value:g}x ceiling" if self.kind == "ratio" else f"<= {self.value:g} ms"


def _nothing() -> None:
    return None


@dataclass
class Case:
    """One kernel and its ceiling.  ``setup`` puts the group's shared buffers in this case's
    state (once, before measuring it); ``reset`` restores what the kernel consumes (before
    every timed run, untimed)."""

    name: str
    group: str
    kernel: Callable[[], object]
    ceiling: Callable[[], object]
    nbytes: int  # bytes per run: results in GB/s; 0: results in ms
    ceiling_name: str  # what the ceiling is, for the reader of the table
    target: Target | None = None
    setup: Callable[[], object] = _nothing
    reset: Callable[[], object] = _nothing
    info: dict = field(default_factory=dict)


# The ceilings, as the tables name them
READ_MEMORY = "a read pass over the same memory"
READ_BITMAP = "a read pass over the same bitmap"
COPY_PAGES = "np.copyto of the same pages, a memcpy"


def _kernels():
    from pymig.core import load_backend

    return load_backend("compiled")


def _read_pass(buf) -> Callable[[], int]:
    from pymig._core.cpu import _read_sum

    return lambda: _read_sum(buf)


def guest_memory(size_bytes: int) -> np.ndarray:
    """Anonymous memory asking for transparent huge pages, like guest RAM; not faulted in."""
    mem = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mem, dtype=np.uint8)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e9


def prepare(case: Case) -> None:
    """Bring the buffers into the case's state and run the kernel once (first-touch faults,
    caches, lazy imports) before anything is timed."""
    case.setup()
    case.reset()
    case.kernel()


def result_row(case: Case, kernel_s: float, ceiling_s: float) -> dict:
    """The result of a case from its median kernel and ceiling times."""
    if case.nbytes:
        value, ceiling, unit = case.nbytes / kernel_s / 1e9, case.nbytes / ceiling_s / 1e9, "GB/s"
    else:
        value, ceiling, unit = kernel_s * 1e3, ceiling_s * 1e3, "ms"
    ratio = ceiling_s / kernel_s
    return {
        "value": _sig(value), "unit": unit, "ceiling": _sig(ceiling), "ceiling_unit": unit,
        "ceiling_name": case.ceiling_name, "ratio": _sig(ratio),
        "target": str(case.target) if case.target else None,
        "ok": case.target.met(ratio, kernel_s * 1e3) if case.target else None,
        "variant": _kernels().cpu_info()["variant"], **case.info,
    }


def _sig(x: float) -> float:
    """x to 6 significant digits (tidy JSON without losing the small millisecond figures)."""
    return float(f"{x:.6g}")


def measure(case: Case, rounds: int) -> dict:
    """Median of ``rounds`` back-to-back (ceiling, kernel) timings, as a result row."""
    prepare(case)
    ceilings, kernels = [], []
    for _ in range(rounds):
        ceilings.append(timed(case.ceiling))
        case.reset()
        kernels.append(timed(case.kernel))
    return result_row(case, statistics.median(kernels), statistics.median(ceilings))

# --------------------------------------------------------------------------------- cases


def zero_scan_cases(size_bytes: int) -> list[Case]:
    """Per-page zero detection over every page (zero_bitmap with all bits set), on zero pages
    (a full read each) and on pages with data in their first byte (early exit)."""
    k = _kernels()
    npages = size_bytes // PAGE
    every = np.full(k.new_bitmap(npages).shape, 2**64 - 1, dtype=np.uint64)
    mem = guest_memory(size_bytes)
    first_bytes = mem.reshape(npages, PAGE)[:, 0]

    def zero_pages():
        mem[:] = 0  # real zeroed frames, not the shared zero page an untouched mapping reads

    def data_pages():
        first_bytes[:] = 1

    def scan():
        return k.zero_bitmap(mem, PAGE, every, npages)

    return [
        Case("zero_scan_all_zero", "zero", scan, _read_pass(mem), size_bytes, READ_MEMORY,
             Target("ratio", 0.8), setup=zero_pages),
        Case("zero_scan_data_pages", "zero", scan, _read_pass(mem), size_bytes, READ_MEMORY,
             setup=data_pages,
             info={"note": "each page has data in its first byte, where the scan stops: it "
                           "reads a page's first cache line, the ceiling all 64 of them"}),
    ]


def bitmap_cases(npages: int) -> list[Case]:
    """bitmap -> runs and bitmap -> indices at several densities, and an all-clear bitmap."""
    k = _kernels()
    rng = np.random.default_rng(12345)
    empty = k.new_bitmap(npages)
    cases = [Case("bitmap_runs_clear", "bitmap", lambda: k.bitmap_runs(empty, npages),
                  _read_pass(empty), 0, READ_BITMAP, Target("ms", 0.5))]
    for density in DENSITIES:
        if density == 1.0:
            bm = np.full(empty.shape, 2**64 - 1, dtype=np.uint64)
        else:
            bits = rng.random(npages) < density
            bm = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
        label = f"{density * 100:g}pct"
        target = Target("ms", 2.0) if density == 0.01 else None
        cases.append(Case(f"bitmap_runs_{label}", "bitmap",
                          lambda bm=bm: k.bitmap_runs(bm, npages), _read_pass(bm), 0,
                          READ_BITMAP, target))
        cases.append(Case(f"bitmap_indices_{label}", "bitmap",
                          lambda bm=bm: k.bitmap_indices(bm, npages), _read_pass(bm), 0,
                          READ_BITMAP))
    return cases


def _packet_bench(size_bytes: int):
    """What the packet cases share: the kernels, the page count, a zeroed destination, a dirty
    bitmap with the reset that sets all of it, and a 1 MiB packet buffer."""
    k = _kernels()
    npages = size_bytes // PAGE
    dst = guest_memory(size_bytes)
    dst[:] = 0
    dirty = k.new_bitmap(npages)

    def reset():
        dirty[:] = 2**64 - 1

    return k, npages, dst, dirty, reset, np.empty(PACKET_BYTES, dtype=np.uint8)


def packet_cases(size_bytes: int) -> list[Case]:
    """Encode all of guest memory (every page with data) into 1 MiB packets, and decode the
    packets into another guest memory; both against np.copyto of the same bytes."""
    k, npages, dst, dirty, reset, out = _packet_bench(size_bytes)
    src = guest_memory(size_bytes)
    src.view(np.uint64)[:] = np.arange(1, size_bytes // 8 + 1, dtype=np.uint64)  # no zero word

    def encode() -> int:
        cursor, calls = 0, 0
        while (result := k.encode_packet(src, PAGE, 0, dirty, npages, cursor, out)).nbytes:
            cursor, calls = result.cursor, calls + 1
        return calls

    reset()
    encoding = Case("encode_1MiB_packets", "packet", encode, lambda: np.copyto(dst, src),
                    size_bytes, COPY_PAGES, Target("ratio", 0.5), reset=reset,
                    info={"calls_per_GiB": encode() * GIB // size_bytes})

    # every packet of the memory, back to back, as a receiver would have them
    stream = guest_memory(size_bytes + size_bytes // 64)
    spans, cursor, offset = [], 0, 0
    reset()
    while True:
        result = k.encode_packet(src, PAGE, 0, dirty, npages, cursor,
                                 stream[offset:offset + PACKET_BYTES])
        if not result.nbytes:
            break
        spans.append(stream[offset:offset + result.nbytes])
        cursor, offset = result.cursor, offset + result.nbytes

    def decode():
        for packet in spans:
            k.decode_packet(packet, dst, PAGE, 0, npages)

    decoding = Case("decode_1MiB_packets", "packet", decode, lambda: np.copyto(dst, src),
                    size_bytes, COPY_PAGES, Target("ratio", 0.5),
                    info={"calls_per_GiB": len(spans) * GIB // size_bytes})
    return [encoding, decoding]


def compression_cases(size_bytes: int) -> list[Case]:
    """LZ4 inside the encoder: pages zero but for their first byte (a dirtier's) encoded and
    decoded against np.copyto of the same bytes, and incompressible pages encoded with
    compression against the same encode without it (what the backoff costs)."""
    from pymig._coreshared import new_compress_state

    k, npages, dst, dirty, reset, out = _packet_bench(size_bytes)
    sparse = guest_memory(size_bytes)
    sparse[:] = 0
    sparse[::PAGE] = 1
    noise = guest_memory(size_bytes)
    noise.view(np.uint64)[:] = np.random.default_rng(1).integers(
        0, 2**63, size_bytes // 8, dtype=np.uint64)

    def encode(src, compress, keep=False) -> list:
        """Every packet of src (copies when ``keep``, else their sizes)."""
        cursor, packets = 0, []
        state = new_compress_state() if compress else None
        while (result := k.encode_packet(src, PAGE, 0, dirty, npages, cursor, out,
                                         state)).nbytes:
            cursor = result.cursor
            packets.append(bytes(out[:result.nbytes]) if keep else result.nbytes)
        return packets

    def encode_again(src, compress):
        reset()
        return encode(src, compress)

    reset()
    sizes = encode(sparse, True)
    sparse_case = Case("encode_lz4_sparse_pages", "compression", lambda: encode(sparse, True),
                       lambda: np.copyto(dst, sparse), size_bytes, COPY_PAGES,
                       Target("ratio", 0.5), reset=reset,
                       info={"wire_bytes_per_GiB": sum(sizes) * GIB // size_bytes,
                             "note": "pages zero but for a byte: LZ4 writes a few dozen bytes "
                                     "of each, the ceiling copies all 4096"})
    noise_case = Case("encode_lz4_random_pages", "compression", lambda: encode(noise, True),
                      lambda: encode_again(noise, False), size_bytes,
                      "the same encode without LZ4", Target("ratio", 0.9), reset=reset,
                      info={"note": "what trying LZ4 on memory that does not compress costs "
                                    "(its backoff): 1x is no cost"})
    reset()
    packets = encode(sparse, True, keep=True)

    def decode():
        for packet in packets:
            k.decode_packet(packet, dst, PAGE, 0, npages)

    decode_case = Case("decode_lz4_sparse_pages", "compression", decode,
                       lambda: np.copyto(dst, sparse), size_bytes, COPY_PAGES,
                       Target("ratio", 0.5))
    return [sparse_case, noise_case, decode_case]


def sizes(quick: bool) -> tuple[int, int]:
    """(guest memory bytes, bitmap pages) of a full or a quick run."""
    return (64 << 20, BITMAP_PAGES // 16) if quick else (GIB, BITMAP_PAGES)


def groups(quick: bool = False) -> Iterator[list[Case]]:
    """The cases, one buffer group at a time, so at most ~3 GiB is mapped at once."""
    memory_bytes, bitmap_pages = sizes(quick)
    yield zero_scan_cases(memory_bytes)
    yield bitmap_cases(bitmap_pages)
    yield packet_cases(memory_bytes)
    yield compression_cases(memory_bytes)


def rounds_for(case: Case, quick: bool) -> int:
    """Rounds per case: millisecond kernels get more, their median costs nothing."""
    rounds = 3 if quick else 7
    return rounds if case.nbytes else rounds * 3


def case_count() -> int:
    """How many cases :func:`groups` yields (known before any buffer is mapped)."""
    return 2 + 1 + 2 * len(DENSITIES) + 2 + 3


def run_core_benchmarks(quick: bool = False,
                        on_result: Callable[[str, dict, int, int], None] | None = None) -> dict:
    """Run every case; results keyed by benchmark name (see the module docstring).
    ``on_result(name, row, done, total)`` after each case, as it finishes."""
    results = {}
    total = case_count()
    for group in groups(quick):
        for case in group:
            results[case.name] = measure(case, rounds_for(case, quick))
            if on_result is not None:
                on_result(case.name, results[case.name], len(results), total)
    return results


def describe_run(quick: bool) -> str:
    """What a run measures, in a line, before it starts."""
    memory_bytes, bitmap_pages = sizes(quick)
    return (f"{case_count()} benchmarks of the compiled core ({_kernels().cpu_info()['variant']}) "
            f"on {memory_bytes >> 20} MiB of memory and bitmaps of {bitmap_pages:,} pages, "
            f"each timed against its ceiling in the same run")


def describe_result(name: str, row: dict, done: int, total: int) -> str:
    """One finished case, in a line."""
    return (f"[{done}/{total}] {name}: {row['value']:.4g} {row['unit']}, {row['ratio']:.2f}x "
            f"its ceiling ({row['ceiling_name']}: {row['ceiling']:.4g} {row['ceiling_unit']})")


RATIO_LEGEND = ("x ceiling: the kernel's speed over its ceiling's, on the same bytes, timed in "
                "the same run (1.00x: as fast as the ceiling; ms tables: ceiling ms / kernel "
                "ms). A ceiling reads or copies every byte; above 1x, the kernel does less "
                "(see its note).")


def format_report(results: dict):
    """``run_core_benchmarks()`` results for a rich Console: a table of the throughput cases
    (GB/s), one of the latency cases (ms), each row naming its ceiling, then the legend and the
    notes."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    variants = sorted({row["variant"] for row in results.values()})
    notes = [(name, row["note"]) for name, row in results.items() if row.get("note")]
    marks = {name: f"[{number}]" for number, (name, _) in enumerate(notes, 1)}
    parts = []
    for unit, what in (("GB/s", "throughput: GB/s of guest memory"),
                       ("ms", "latency: ms per call over the whole bitmap")):
        rows = {name: row for name, row in results.items() if row["unit"] == unit}
        if not rows:
            continue
        table = Table(title=f"pymig compiled core ({', '.join(variants)}), {what}",
                      title_justify="left")
        table.add_column("benchmark")
        table.add_column(f"kernel ({unit})", justify="right")
        table.add_column("ceiling")
        table.add_column(f"ceiling ({unit})", justify="right")
        table.add_column("x ceiling", justify="right")
        table.add_column("target (x ceiling)" if unit == "GB/s" else "target (ms)",
                         justify="right")
        table.add_column("ok", justify="right")
        for name, row in rows.items():
            ok = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[row["ok"]]
            target = row["target"] or ""
            if target:  # ">= 0.8x ceiling" / "<= 0.5 ms": the header carries the unit
                target = target.replace("x ceiling", "").replace(" ms", "")
            table.add_row(f"{name} {marks.get(name, '')}".rstrip(), f"{row['value']:.4g}",
                          row["ceiling_name"], f"{row['ceiling']:.4g}",
                          f"{row['ratio']:.2f}x", target, ok)
        parts.append(table)
    parts.append(Text(RATIO_LEGEND))
    parts += [Text(f"{marks[name]} {name}: {note}") for name, note in notes]
    return Group(*parts)
