"""Pictures: a migration trace (did it converge, and what did the throttle do), and a guest's
working-set curve (:func:`plot_working_set`).

Three panels over the time since the migration began (each trace record is one dirty-log sync,
and syncs come every 100 ms or once a pass, so the iteration number says little about time):

* the guest's dirty rate against the migration's bandwidth (MB/s of guest pages, as the policy
  counts them: with zero pages and compression far above the wire's rate; the migration
  converges only where bandwidth stays above);
* the pending bytes, the destination's backlog and the expected downtime;
* the vCPU throttle, as the step line it is.

Rates, bytes and the expected downtime span orders of magnitude within one migration (a first
pass of a GB/s over an idle guest, then MB/s of a throttled one), so those axes are
logarithmic: a spike no longer flattens the rest.  Zeros have no place on them and are left
out.  The switchover is one line across the panels, at the sync that decided it; a switchover
decided and then held for another pass (the destination behind, the first pass not through) is
a small mark on the pending line, and only the longest catch-up wait is written out.

matplotlib is imported only here, only when plotting; the figure is drawn on an Agg canvas of
its own, so nothing global in matplotlib (pyplot's state, the backend) changes.
"""

from __future__ import annotations

import os
from typing import Any

from pymig.stats import read_trace

MB = 1e6
TIME_LABEL = "time since the migration began (s)"


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting a trace needs matplotlib, which pymig installs; this "
                          "environment lacks it: pip install 'matplotlib>=3.8'") from exc
    return Figure, FigureCanvasAgg


def _positive(times: list[float], values: list[float | None]) -> tuple[list, list]:
    """The points a logarithmic axis can show (values above zero)."""
    kept = [(t, v) for t, v in zip(times, values) if v is not None and v > 0]
    return [t for t, _ in kept], [v for _, v in kept]


def plot_trace(trace_path: str | os.PathLike[str], out_png: str | os.PathLike[str]):
    """Draw the trace at ``trace_path`` (written by :class:`pymig.stats.TraceWriter`) as a PNG
    at ``out_png``; returns the matplotlib Figure."""
    Figure, FigureCanvasAgg = _matplotlib()
    records = read_trace(trace_path)
    if not records:
        raise ValueError(f"{os.fspath(trace_path)}: the trace has no records to plot")
    _check_records(trace_path, records)
    times = [r["time"] for r in records]

    fig = Figure(figsize=(9, 9), layout="constrained")
    FigureCanvasAgg(fig)
    rates, pending, throttle = fig.subplots(3, 1, sharex=True)

    rates.plot(*_positive(times, [r["dirty_rate"] * r["page_size"] / MB for r in records]),
               marker=".", label="guest dirty rate")
    rates.plot(*_positive(times, [r["bandwidth"] / MB for r in records]), marker=".",
               label="bandwidth")
    if any("stopped_bandwidth" in r for r in records):  # traces from before it lack it
        rates.plot(*_positive(times, [r.get("stopped_bandwidth", r["bandwidth"]) / MB
                                      for r in records]),
                   linestyle=":", color="tab:green", label="expected once stopped")
    rates.set_yscale("log")
    rates.set_ylabel("MB/s of pages (log)")
    rates.set_title("guest dirty rate vs migration bandwidth")

    pending.plot(*_positive(times, [r["pending_bytes"] / MB for r in records]), marker=".",
                 color="tab:purple", label="pending")
    if any(r.get("backlog_bytes") for r in records):  # traces from before it lack it
        pending.plot(*_positive(times, [r.get("backlog_bytes", 0) / MB for r in records]),
                     marker=".", color="tab:olive", label="sent, not yet loaded there")
    pending.set_yscale("log")
    pending.set_ylabel("MB (log)")
    downtime = pending.twinx()
    downtime.plot(*_positive(times, [r["expected_downtime"] for r in records]), marker="x",
                  linestyle="--", color="tab:red", label="expected downtime")
    downtime.set_yscale("log")
    downtime.set_ylabel("expected downtime (ms, log)")
    _mark_decisions(records, pending, (rates, pending, throttle))
    pending.set_title("pending bytes, the destination's backlog, and the expected downtime")

    throttle.step(times, [r["throttle_pct"] for r in records], where="post",
                  color="tab:green", label="throttle in force")
    throttle.set_ylim(0, 100)
    throttle.set_ylabel("throttle (%)")
    throttle.set_xlabel(TIME_LABEL)
    peak = max(r["throttle_pct"] for r in records)
    throttle.set_title(f"vCPU throttle (highest {peak} %)")

    for axes, extra in ((rates, None), (pending, downtime), (throttle, None)):
        handles, labels = axes.get_legend_handles_labels()
        if extra is not None:
            more = extra.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        if handles:
            axes.legend(handles, labels, loc="best", fontsize=8)

    try:
        fig.savefig(os.fspath(out_png), format="png", dpi=100)
    except OSError as exc:
        raise ValueError(f"cannot write {os.fspath(out_png)}: {exc.strerror or exc}") from None
    return fig


#: What every trace record has, with a number (or None) for each.
_NEEDED = ("time", "dirty_rate", "page_size", "bandwidth", "pending_bytes",
           "expected_downtime", "throttle_pct")


def _check_records(path, records: list) -> None:
    """Every record is a trace record (:class:`pymig.stats.TraceRecord`); ValueError naming
    the first that is not."""
    for number, record in enumerate(records, 1):
        missing = [key for key in _NEEDED if not isinstance(record, dict) or key not in record]
        wrong = [key for key in _NEEDED if key not in missing
                 and not (record[key] is None and key == "expected_downtime")
                 and (isinstance(record[key], bool)
                      or not isinstance(record[key], (int, float)))]
        if missing or wrong:
            problem = (f"lacks {', '.join(missing)}" if missing
                       else f"has a {', '.join(wrong)} that is not a number")
            raise ValueError(f"{os.fspath(path)}: record {number} is not a pymig trace record: "
                             f"it {problem}")


def _mark_decisions(records: list[dict], pending, panels) -> None:
    """The switchover: one line across ``panels`` at the last sync that decided it (the one
    the migration went with).  Switchovers decided before it and held for another pass: small
    marks on the pending line.  The longest catch-up wait: written out once."""
    decided = [r for r in records if r.get("action") == "switchover"]
    if decided:
        final = decided[-1]
        for number, axes in enumerate(panels):
            axes.axvline(final["time"], color="tab:red", linewidth=1, alpha=0.6,
                         label="switchover" if number == 1 else None)
        held = [r for r in decided[:-1] if r["pending_bytes"] > 0]
        if held:
            pending.plot([r["time"] for r in held], [r["pending_bytes"] / MB for r in held],
                         linestyle="none", marker="|", markersize=8, color="grey",
                         label="switchover decided, held for another pass")
    waits = [r for r in records
             if r.get("caught_up_wait_s", 0) >= 0.001 and r["pending_bytes"] > 0]
    if waits:
        longest = max(waits, key=lambda r: r["caught_up_wait_s"])
        pending.annotate(f"waited {longest['caught_up_wait_s'] * 1000:.0f} ms for the "
                         f"destination", (longest["time"], longest["pending_bytes"] / MB),
                         fontsize=8, textcoords="offset points", xytext=(4, 4))


# -- a guest's working-set curve (pymig dirtyrate --plot) -------------------------------------

WINDOW_LABEL = "window length (s, log)"
MiB = 1 << 20  # QEMU's dirty-rate unit, which it calls MB


def plot_working_set(info: dict[str, Any], out_png: str | os.PathLike[str] | None = None):
    """Draw a measured ``query-dirty-rate`` answer (:mod:`pymig.dirtyrate`): the working-set
    curve, and what it makes of a dirty rate; returns the matplotlib Figure, and writes it as a
    PNG at ``out_png`` when given.

    Two panels over the window length, both logarithmic (windows run from 10 ms to seconds,
    pages from a few to the whole guest):

    * the distinct pages dirtied in a window (the mean, and the band from the fewest to the
      most any window of that length saw), against the write rate's straight line and the
      working set's level: the curve follows the first while windows are short and bends
      onto the second once the guest has written all of its working set;
    * the rate a measurement of that length reports (distinct pages over the window, which
      is QEMU's dirty-rate), against the write rate: it falls once the window is longer than
      the time the guest takes to write its working set.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    ws = info.get("working-set")
    if not ws or not ws.get("curve"):
        raise ValueError("the measurement has no working-set curve to plot (status "
                         f"{info.get('status')!r})")
    points = ws["curve"]
    windows = [p["window-ms"] / 1000 for p in points]
    pages = [p["pages"] for p in points]
    rate = info["write-rate-pages"]

    fig = Figure(figsize=(9, 8), layout="constrained")
    FigureCanvasAgg(fig)
    curve, rates = fig.subplots(2, 1, sharex=True)

    curve.fill_between(windows, [max(p["least"], 0.5) for p in points],
                       [max(p["most"], 0.5) for p in points], color="tab:blue", alpha=0.2,
                       label="fewest to most in one window")
    curve.plot(*_positive(windows, pages), marker="o", color="tab:blue",
               label="distinct pages dirtied (mean)")
    if rate > 0:
        curve.plot(windows, [rate * w for w in windows], linestyle="--", color="tab:red",
                   label=f"write rate {rate:,.0f} pages/s")
    settled = "settled" if ws["settled"] else "still growing"
    if ws["pages"] > 0:
        curve.axhline(ws["pages"], linestyle=":", color="tab:green",
                      label=f"working set {ws['pages']:,} pages ({settled})")
    curve.set_xscale("log")
    curve.set_yscale("log")
    curve.set_ylabel("distinct pages (log)")
    curve.set_title(f"working-set curve ({info['mode']})")

    page_size = info.get("page-size", 4096)
    rates.plot(*_positive(windows, [p / w * page_size / MiB for p, w in zip(pages, windows)]),
               marker="o", color="tab:purple", label="distinct pages / window")
    if rate > 0:
        rates.axhline(rate * page_size / MiB, linestyle="--", color="tab:red",
                      label="write rate")
    rates.set_xscale("log")
    rates.set_yscale("log")
    rates.set_ylabel("MiB/s (log)")
    rates.set_xlabel(WINDOW_LABEL)
    rates.set_title("the dirty rate a measurement of that length reports")
    for axes in (curve, rates):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize=8)
    if out_png is not None:
        fig.savefig(os.fspath(out_png), format="png", dpi=100)
    return fig
