"""Measuring a running guest's dirty rate without migrating it: QEMU's ``calc-dirty-rate`` and
``query-dirty-rate``, and the working-set curve.

Modes, by QEMU's names:

* ``page-sampling``: ``sample-pages`` pages per GiB of each RAM block, chosen at random (one
  in each of as many equal stretches of the block: :func:`sample_pages`), are
  hashed (:func:`pymig.core.page_hashes`: one call over the list of indices) at the start and
  then every interval; a sample whose hash changed was written.  Blind to a page written back
  to what it held (the dirtier's byte counter after 256 writes), cheap, and the only mode that
  does not touch the dirty log.
* ``dirty-bitmap``: the guest's own dirty log (KVM's bitmap, or its rings on a ring guest; the
  simulated writer's log), harvested every interval by a :class:`~pymig.guest.base.
  DirtyLogReader`, which re-protects what it takes.
* ``dirty-ring``: as dirty-bitmap, and each vCPU's ring entries counted (KVM guests created
  with ``--dirty-ring``; a simulated writer counts its own writes), so the rate is known per
  vCPU.

QEMU reports what its mode sees over the whole ``calc-time``: distinct pages dirtied, over
the time (``dirty-rate``, MB/s with QEMU's MB of 2**20 bytes), which saturates at the
working set once a window is long enough for the guest to write all of it.  pymig reports
that too, and the curve it comes from (:class:`WorkingSetCurve`): the measurement harvests
every :data:`INTERVAL_S` and, for window lengths of 1, 2, 4 ... intervals up to the whole
time, ORs the intervals' bitmaps into one bitmap per length, counting the distinct pages in
each aligned window as the window closes (one ``bitmap_merge`` per length per harvest, in the
core).  The curve's slope at the shortest window is the guest's write rate (``write-rate``:
pages first written in an interval of 10 ms, which is what a migration has to send again); its
plateau is the working set (``working-set``).

A measurement coexists with a migration, as QEMU's does: page sampling only reads, and the log
modes take nothing from the migration (:class:`~pymig.guest.base.DirtyLogShare`).  Before the
measurement proper, the guest's progress counter (its mailbox's ``pages_written``) is read
over a baseline of at most a second, and again over the measurement: what the measurement
cost the guest (``guest-cost``).

States, as QEMU's: ``unstarted`` -> ``measuring`` -> ``measured``; a new ``calc-dirty-rate``
starts again from ``unstarted``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pymig import core
from pymig.errors import PymigError

MODES = ("page-sampling", "dirty-bitmap", "dirty-ring")
#: calc-time's units and their length in milliseconds (QEMU's TimeUnit)
TIME_UNITS = {"second": 1000, "millisecond": 1}
MIN_CALC_TIME_MS, MAX_CALC_TIME_MS = 50, 60_000  # QEMU's bounds
MIN_SAMPLE_PAGES, MAX_SAMPLE_PAGES = 128, 16384  # per GiB, QEMU's bounds
DEFAULT_SAMPLE_PAGES = 512
MB = 1 << 20  # QEMU's dirty-rate unit
#: How often the dirty log is harvested (and sampled pages hashed), the curve's shortest window.
INTERVAL_S = 0.010
#: Page sampling hashes for at most this share of each interval; more samples, longer intervals.
HASH_SHARE = 0.1
#: The longest baseline of the guest's progress before a measurement.
BASELINE_S = 1.0
#: The working set has settled when the window half as long as the whole measurement (or
#: more) saw this share of the pages the whole one did.
SETTLED_SHARE = 0.95


class MeasurementCancelled(PymigError):
    """The measurement was stopped before its end (its guest is going away)."""


@dataclass(frozen=True)
class DirtyRateConfig:
    """What ``calc-dirty-rate`` asks for, checked."""

    calc_time_ms: int
    mode: str = "page-sampling"
    sample_pages: int = DEFAULT_SAMPLE_PAGES

    @classmethod
    def from_qmp(cls, args: dict[str, Any]) -> "DirtyRateConfig":
        """``calc-time`` (in ``calc-time-unit``, seconds by default), ``mode``,
        ``sample-pages`` (page-sampling only); ValueError in QEMU's words otherwise."""
        unit = args.get("calc-time-unit", "second")
        if unit not in TIME_UNITS:
            raise ValueError(f"Parameter 'calc-time-unit' does not accept value {unit!r} "
                             f"(use {' or '.join(TIME_UNITS)})")
        calc_time = args.get("calc-time")
        if isinstance(calc_time, bool) or not isinstance(calc_time, int):
            raise ValueError("Parameter 'calc-time' is missing or not an integer")
        calc_time_ms = calc_time * TIME_UNITS[unit]
        if not MIN_CALC_TIME_MS <= calc_time_ms <= MAX_CALC_TIME_MS:
            raise ValueError(f"Calculation time is out of range [{MIN_CALC_TIME_MS}ms, "
                             f"{MAX_CALC_TIME_MS}ms].")
        mode = args.get("mode", "page-sampling")
        if mode not in MODES:
            raise ValueError(f"Parameter 'mode' does not accept value {mode!r} (use one of "
                             f"{', '.join(MODES)})")
        sample_pages = args.get("sample-pages")
        if sample_pages is not None and mode != "page-sampling":
            raise ValueError("sample-pages is used only in page-sampling mode")
        if sample_pages is None:
            sample_pages = DEFAULT_SAMPLE_PAGES
        elif isinstance(sample_pages, bool) or not isinstance(sample_pages, int) \
                or not MIN_SAMPLE_PAGES <= sample_pages <= MAX_SAMPLE_PAGES:
            raise ValueError(f"sample-pages is out of range[{MIN_SAMPLE_PAGES}, "
                             f"{MAX_SAMPLE_PAGES}].")
        return cls(calc_time_ms, mode, sample_pages)


# -- the working-set curve -------------------------------------------------------------------

@dataclass
class CurvePoint:
    """Distinct pages dirtied in windows of one length: the mean over ``windows`` windows of
    ``window_s`` seconds on average, and the fewest and most any of them saw."""

    window_s: float
    pages: float
    windows: int
    least: float
    most: float

    def qmp(self) -> dict[str, Any]:
        return {"window-ms": round(self.window_s * 1000, 3), "pages": round(self.pages, 1),
                "windows": self.windows, "least": round(self.least, 1),
                "most": round(self.most, 1)}


class WorkingSetCurve:
    """Distinct pages dirtied against window length, from one bitmap per interval.

    Window lengths are 1, 2, 4 ... 2**levels intervals; each has a bitmap per block into which
    the intervals are ORed, and each time 2**k intervals have gone in, the distinct pages of
    that aligned window are recorded and the bitmap starts again.  A last bitmap is never
    reset: the distinct pages of the whole measurement.  ``weights`` scale each block's pages
    (page sampling: the pages each sample stands for).
    """

    def __init__(self, npages: Sequence[int], levels: int, weights: Sequence[float] | None = None):
        self.npages = list(npages)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.npages)
        self.levels = max(0, levels)
        words = [core.bitmap_words(n) for n in self.npages]
        self._acc = [[np.zeros(w, dtype=np.uint64) for w in words]
                     for _ in range(self.levels + 1)]
        self._counts = [0.0] * (self.levels + 1)
        self._opened = [0.0] * (self.levels + 1)
        self._samples: list[list[tuple[float, float]]] = [[] for _ in range(self.levels + 1)]
        self._whole = [np.zeros(w, dtype=np.uint64) for w in words]
        self.whole_pages = 0.0
        self.intervals = 0
        self.started = self.last = 0.0

    def start(self, now: float) -> None:
        self.started = self.last = now
        self._opened = [now] * (self.levels + 1)

    def add(self, bitmaps: Sequence[np.ndarray], now: float) -> None:
        """The pages dirtied in the interval that ends ``now``, per block."""
        self.intervals += 1
        for level in range(self.levels + 1):
            acc = self._acc[level]
            for bits, into, npages, weight in zip(bitmaps, acc, self.npages, self.weights):
                self._counts[level] += core.bitmap_merge(into, bits, npages) * weight
            if self.intervals % (1 << level) == 0:
                self._samples[level].append((now - self._opened[level], self._counts[level]))
                self._counts[level] = 0.0
                self._opened[level] = now
                for into in acc:
                    into[:] = 0
        for bits, into, npages, weight in zip(bitmaps, self._whole, self.npages, self.weights):
            self.whole_pages += core.bitmap_merge(into, bits, npages) * weight
        self.last = now

    @property
    def duration_s(self) -> float:
        return self.last - self.started

    def points(self) -> list[CurvePoint]:
        """One point per window length that closed at least once, then the whole."""
        out = []
        for samples in self._samples:
            if samples:
                out.append(CurvePoint(sum(d for d, _ in samples) / len(samples),
                                      sum(p for _, p in samples) / len(samples), len(samples),
                                      min(p for _, p in samples), max(p for _, p in samples)))
        if self.duration_s > 0 and (not out or self.duration_s > out[-1].window_s * 1.001):
            out.append(CurvePoint(self.duration_s, self.whole_pages, 1, self.whole_pages,
                                  self.whole_pages))
        return out

    def write_rate(self) -> float:
        """Pages/s: the pages first written in each interval over the intervals' time, the
        curve's slope at its shortest window (a lower bound once a page is written twice
        within one interval).  Every interval counts, stretched or not: a busy host that
        delays a harvest slows the guest too, so dropping the long ones would leave out
        its slow moments."""
        samples = self._samples[0]
        seconds = sum(d for d, _ in samples)
        return sum(p for _, p in samples) / seconds if seconds > 0 else 0.0

    def settled(self) -> bool:
        """Whether the distinct pages stopped growing with the window: the longest window
        of at most half the whole saw :data:`SETTLED_SHARE` of what the whole did."""
        half = [s for s in self._samples if s and s[0][0] <= self.duration_s / 2 * 1.05]
        if not half or self.whole_pages <= 0:
            return False
        longest = half[-1]
        return max(p for _, p in longest) >= SETTLED_SHARE * self.whole_pages


def levels_for(calc_time_s: float, interval_s: float) -> int:
    """How many doublings of ``interval_s`` fit in ``calc_time_s``."""
    if calc_time_s < interval_s:
        return 0
    return int(math.floor(math.log2(calc_time_s / interval_s) + 1e-9))


def sample_pages(npages: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct pages of ``npages``, ascending: one at random in each of ``count``
    equal strata.  QEMU draws them at random from the whole block; strata keep the share of
    samples in any stretch of memory (a workload's working set) within one of its share of
    the pages, where independent draws stray by the square root of their number."""
    edges = np.arange(count + 1, dtype=np.int64) * npages // count
    return edges[:-1] + (rng.random(count) * (edges[1:] - edges[:-1])).astype(np.int64)


def pack_bools(flags: np.ndarray) -> np.ndarray:
    """A bool per page -> a KVM-layout bitmap."""
    words = core.bitmap_words(len(flags))
    packed = np.zeros(words * 8, dtype=np.uint8)
    bits = np.packbits(flags.astype(bool), bitorder="little")
    packed[:bits.size] = bits
    return packed.view("<u8").astype(np.uint64)


# -- a measurement ---------------------------------------------------------------------------

@dataclass
class Result:
    """What a finished measurement found (:meth:`DirtyRateMeasurement.info` words it)."""

    calc_time_s: float
    page_size: int
    curve: list[CurvePoint]
    dirty_pages: float
    write_rate: float  # pages/s
    settled: bool
    interval_s: float
    vcpu_pages: list[int] | None = None  # dirty-ring: per vCPU, over calc_time_s
    progress_before: float | None = None  # the guest's pages_written per second
    progress_during: float | None = None
    samples: int = 0  # page sampling: pages hashed


@dataclass
class DirtyRateMeasurement:
    """One ``calc-dirty-rate`` on ``guest``: run it with :meth:`start`, follow it with
    :meth:`info` (``query-dirty-rate``), stop it early with :meth:`cancel`."""

    guest: Any
    config: DirtyRateConfig
    baseline_s: float = BASELINE_S
    interval_s: float = INTERVAL_S
    status: str = "unstarted"
    start_time: float = field(default_factory=time.time)
    result: Result | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        if self.config.mode == "dirty-ring" and not self.guest.supports_dirty_limit:
            raise ValueError("mode dirty-ring needs the dirty ring, which says which vCPU "
                             "dirtied each page; this guest was created without it (pymig "
                             "run --dirty-ring N creates one): measure with dirty-bitmap or "
                             "page-sampling instead")

    def start(self) -> None:
        with self._lock:
            if self.status != "unstarted":
                raise ValueError("a measurement runs once")
            self.status = "measuring"
        self._thread = threading.Thread(target=self._run, name="pymig-dirtyrate", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether it has finished (within ``timeout``)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status == "measured"

    def cancel(self, timeout: float = 10.0) -> None:
        """Stop early and wait for the thread (its dirty-log reader closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def measuring(self) -> bool:
        return self.status == "measuring"

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.result = self._measure()
        except MeasurementCancelled as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported by query-dirty-rate
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, PymigError) \
                else str(exc)
        with self._lock:
            self.status = "measured"

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(max(0.0, seconds)):
            raise MeasurementCancelled("the measurement was cancelled")

    def _progress(self) -> tuple[int, float] | None:
        try:
            return self.guest.progress()["pages_written"], time.monotonic()
        except Exception:  # noqa: BLE001 - an image guest's mailbox may be anything
            return None

    @staticmethod
    def _rate(first, last) -> float | None:
        if first is None or last is None or last[1] <= first[1]:
            return None
        return max(0, last[0] - first[0]) / (last[1] - first[1])

    def _measure(self) -> Result:
        calc_time_s = self.config.calc_time_ms / 1000
        baseline_s = min(self.baseline_s, calc_time_s)
        first = self._progress()
        self._sleep(baseline_s)
        before = self._rate(first, self._progress())
        self.start_time = time.time()
        if self.config.mode == "page-sampling":
            result = self._page_sampling(calc_time_s)
        else:
            result = self._dirty_log(calc_time_s, ring=self.config.mode == "dirty-ring")
        result.progress_before = before
        return result

    def _harvests(self, curve: WorkingSetCurve, interval_s: float, calc_time_s: float,
                  fetch) -> None:
        """Every ``interval_s`` until ``calc_time_s`` has passed: ``fetch()`` into the curve
        (the next harvest is due an interval after the last one ended, however late it was:
        the curve measures the intervals it got)."""
        now = time.monotonic()
        curve.start(now)
        end = now + calc_time_s
        while True:
            self._sleep(min(curve.last + interval_s, end) - time.monotonic())
            bitmaps = fetch()
            now = time.monotonic()
            curve.add(bitmaps, now)
            if now >= end:
                return

    def _dirty_log(self, calc_time_s: float, *, ring: bool) -> Result:
        guest = self.guest
        blocks = guest.ram_blocks
        curve = WorkingSetCurve([b.npages for b in blocks],
                                levels_for(calc_time_s, self.interval_s))
        with guest.open_dirty_reader() as reader:
            counts = guest.vcpu_dirty_counts() if ring else None
            progress = self._progress()
            self._harvests(curve, self.interval_s, calc_time_s, reader.harvest)
            during = self._rate(progress, self._progress())
            if ring:
                counts = [max(0, b - a) for a, b in zip(counts, guest.vcpu_dirty_counts())]
        return Result(curve.duration_s, blocks[0].page_size, curve.points(), curve.whole_pages,
                      curve.write_rate(), curve.settled(), self.interval_s, vcpu_pages=counts,
                      progress_during=during)

    def _page_sampling(self, calc_time_s: float) -> Result:
        rng = np.random.default_rng()
        blocks = self.guest.ram_blocks
        chosen = [sample_pages(block.npages, min(block.npages, max(1, (
            block.size_bytes * self.config.sample_pages) >> 30)), rng) for block in blocks]
        progress = self._progress()
        started = time.perf_counter()
        hashes = [core.page_hashes(b.array, b.page_size, pages) for b, pages in zip(blocks, chosen)]
        hash_s = time.perf_counter() - started
        interval_s = max(self.interval_s, hash_s / HASH_SHARE)
        curve = WorkingSetCurve([len(p) for p in chosen], levels_for(calc_time_s, interval_s),
                                [b.npages / len(p) for b, p in zip(blocks, chosen)])

        def fetch() -> list[np.ndarray]:
            changed = []
            for index, (block, pages) in enumerate(zip(blocks, chosen)):
                now = core.page_hashes(block.array, block.page_size, pages)
                changed.append(pack_bools(now != hashes[index]))
                hashes[index] = now
            return changed

        self._harvests(curve, interval_s, calc_time_s, fetch)
        during = self._rate(progress, self._progress())
        return Result(curve.duration_s, blocks[0].page_size, curve.points(), curve.whole_pages,
                      curve.write_rate(), curve.settled(), interval_s,
                      progress_during=during, samples=sum(len(p) for p in chosen))

    # -- query-dirty-rate ----------------------------------------------------------------------
    def info(self, unit: str = "second") -> dict[str, Any]:
        """``query-dirty-rate``'s answer, ``calc-time`` in ``unit`` (rounded down, as QEMU)."""
        return dirty_rate_info(self, unit)


def _qemu_mb_per_s(pages: float, page_size: int, seconds: float) -> int:
    """QEMU's figure: whole MB (2**20 bytes) dirtied, over the whole milliseconds."""
    ms = max(1, int(seconds * 1000))
    return ((int(pages) * page_size) >> 20) * 1000 // ms


def dirty_rate_info(measurement: DirtyRateMeasurement | None,
                    unit: str = "second") -> dict[str, Any]:
    """QEMU's ``DirtyRateInfo`` of ``measurement`` (None: none was started yet), with pymig's
    own fields once it is measured (see docs/convergence.md)."""
    if unit not in TIME_UNITS:
        raise ValueError(f"Parameter 'calc-time-unit' does not accept value {unit!r} "
                         f"(use {' or '.join(TIME_UNITS)})")
    if measurement is None:
        return {"status": "unstarted", "start-time": 0, "calc-time": 0, "calc-time-unit": unit,
                "sample-pages": 0, "mode": "page-sampling"}
    config, result = measurement.config, measurement.result
    calc_ms = config.calc_time_ms if result is None else int(result.calc_time_s * 1000)
    info: dict[str, Any] = {
        "status": measurement.status, "start-time": int(measurement.start_time),
        "calc-time": calc_ms // TIME_UNITS[unit], "calc-time-unit": unit,
        "sample-pages": config.sample_pages if config.mode == "page-sampling" else 0,
        "mode": config.mode,
    }
    if measurement.status != "measured":
        return info
    if result is None:
        info["error-desc"] = measurement.error or "the measurement did not finish"
        return info
    page_size = result.page_size
    info["dirty-rate"] = _qemu_mb_per_s(result.dirty_pages, page_size, result.calc_time_s)
    if result.vcpu_pages is not None:
        info["vcpu-dirty-rate"] = [
            {"id": index, "dirty-rate": _qemu_mb_per_s(pages, page_size, result.calc_time_s),
             "write-rate-pages": round(pages / result.calc_time_s, 1)}
            for index, pages in enumerate(result.vcpu_pages)]
        info["dirty-rate"] = sum(v["dirty-rate"] for v in info["vcpu-dirty-rate"])
    info["page-size"] = page_size
    info["dirty-pages"] = int(round(result.dirty_pages))
    info["write-rate-pages"] = round(result.write_rate, 1)
    info["write-rate"] = round(result.write_rate * page_size / MB, 3)
    info["working-set"] = {
        "pages": int(round(result.dirty_pages)),
        "bytes": int(round(result.dirty_pages)) * page_size,
        "settled": result.settled,
        "interval-ms": round(result.interval_s * 1000, 3),
        "curve": [point.qmp() for point in result.curve],
    }
    if result.samples:
        info["sampled-pages"] = result.samples
    cost = None
    if result.progress_before and result.progress_during is not None:
        cost = {"counter": "pages_written", "before": round(result.progress_before, 1),
                "during": round(result.progress_during, 1),
                "slowdown": round(1 - result.progress_during / result.progress_before, 4)}
    info["guest-cost"] = cost
    return info


# -- for the command line --------------------------------------------------------------------

def parse_calc_time(text: str) -> int:
    """``"500ms"``, ``"2s"`` or ``"1.5"`` (seconds) -> milliseconds, within QEMU's bounds."""
    value = text.strip().lower()
    scale = 1000.0
    if value.endswith("ms"):
        value, scale = value[:-2], 1.0
    elif value.endswith("s"):
        value = value[:-1]
    try:
        ms = float(value) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a time (examples: 500ms, 2s, 1.5)") from None
    if not math.isfinite(ms) or not MIN_CALC_TIME_MS <= ms <= MAX_CALC_TIME_MS:
        raise ValueError(f"{text!r}: a measurement lasts {MIN_CALC_TIME_MS} ms to "
                         f"{MAX_CALC_TIME_MS // 1000} s")
    return int(round(ms))


def measure(client, calc_time_ms: int, mode: str = "page-sampling",
            sample_pages: int | None = None, *, poll_s: float = 0.05,
            timeout_s: float | None = None) -> dict[str, Any]:
    """``calc-dirty-rate`` through ``client`` (a :class:`pymig.qmp.QmpClient`), then
    ``query-dirty-rate`` (in milliseconds) until it is measured; its answer.  PymigError
    when it did not finish or failed."""
    arguments: dict[str, Any] = {"calc-time": calc_time_ms, "calc-time-unit": "millisecond",
                                 "mode": mode}
    if sample_pages is not None:
        arguments["sample-pages"] = sample_pages
    client.command("calc-dirty-rate", **arguments)
    if timeout_s is None:
        timeout_s = calc_time_ms / 1000 + BASELINE_S + 60
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.command("query-dirty-rate", **{"calc-time-unit": "millisecond"})
        if info.get("status") == "measured":
            break
        if time.monotonic() > deadline:
            raise PymigError(f"the measurement did not finish within {timeout_s:.0f} s")
        time.sleep(poll_s)
    if "error-desc" in info:
        raise PymigError(f"the measurement failed: {info['error-desc']}")
    return info


def report(info: dict[str, Any]):
    """``query-dirty-rate``'s answer (millisecond unit) for people: a rich renderable."""
    from rich.console import Group
    from rich.table import Table

    from pymig.units import format_bytes

    page_size = info["page-size"]
    seconds = info["calc-time"] / 1000 if info["calc-time-unit"] == "millisecond" \
        else info["calc-time"]
    ws = info["working-set"]
    rate = info["write-rate-pages"]
    summary = Table(title=f"dirty rate, {info['mode']}, over {seconds:.3f} s", show_header=False,
                    title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("write rate", f"{rate:,.0f} pages/s = {info['write-rate']:,.1f} MiB/s "
                    f"(pages first written in each {ws['interval-ms']:.0f} ms)")
    summary.add_row("dirty-rate (QEMU's)", f"{info['dirty-rate']:,} MiB/s: {info['dirty-pages']:,} "
                    f"distinct pages over the whole time")
    state = "settled" if ws["settled"] else "still growing at the longest window"
    summary.add_row("working set", f"{ws['pages']:,} pages = {format_bytes(ws['bytes'])} "
                    f"({state})")
    for vcpu in info.get("vcpu-dirty-rate", []):
        summary.add_row(f"vCPU {vcpu['id']}", f"{vcpu['write-rate-pages']:,.0f} pages/s = "
                        f"{vcpu['dirty-rate']:,} MiB/s")
    if info.get("sampled-pages"):
        summary.add_row("pages sampled", f"{info['sampled-pages']:,} of "
                        f"{info['sample-pages']:,} per GiB")
    cost = info.get("guest-cost")
    if cost is not None:
        summary.add_row("cost to the guest", f"{cost['slowdown'] * 100:+.1f} % slower: "
                        f"{cost['before']:,.0f} pages written/s before, "
                        f"{cost['during']:,.0f} during")
    else:
        summary.add_row("cost to the guest", "unknown (its progress counter did not move)")
    curve = Table(title="working-set curve: distinct pages dirtied in a window",
                  title_justify="left")
    for name in ("window", "pages (mean)", "least", "most", "windows", "MiB"):
        curve.add_column(name, justify="right")
    for point in ws["curve"]:
        curve.add_row(f"{point['window-ms']:,.1f} ms", f"{point['pages']:,.1f}",
                      f"{point['least']:,.0f}", f"{point['most']:,.0f}", str(point["windows"]),
                      f"{point['pages'] * page_size / MB:,.2f}")
    return Group(summary, curve)
