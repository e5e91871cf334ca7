"""A picture of a migration trace: did it converge, and what did the throttle do.

Three panels over the iteration number: the guest's dirty rate against the migration's
bandwidth (MB/s of guest pages, as the policy counts them: with zero pages and compression far
above the wire's rate; the migration converges only where bandwidth stays above), the pending
bytes with the expected downtime and the destination's backlog (and where the policy decided to
switch over, with the time it then waited for the destination to catch up), and the vCPU
throttle.  matplotlib is an optional dependency (the ``pymig[plot]`` extra) and is imported
only here, only when plotting; the figure is drawn on an Agg canvas of its own, so nothing
global in matplotlib (pyplot's state, the backend) changes.
"""

from __future__ import annotations

import os
from typing import Any

from pymig.stats import read_trace


def _matplotlib() -> tuple[Any, Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError("plotting a trace needs matplotlib: install the plot extra, "
                          "pip install 'pymig[plot]'") from exc
    return Figure, FigureCanvasAgg, MaxNLocator


def plot_trace(trace_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> None:
    """Draw the trace at ``trace_path`` (written by :class:`pymig.stats.TraceWriter`) as a PNG."""
    Figure, FigureCanvasAgg, MaxNLocator = _matplotlib()
    records = read_trace(trace_path)
    if not records:
        raise ValueError(f"{os.fspath(trace_path)}: the trace has no records to plot")
    iterations = [r["iteration"] for r in records]
    mb = 1e6

    fig = Figure(figsize=(8, 9), layout="constrained")
    FigureCanvasAgg(fig)
    rates, pending, throttle = fig.subplots(3, 1, sharex=True)

    rates.plot(iterations, [r["dirty_rate"] * r["page_size"] / mb for r in records],
               marker="o", label="dirty rate")
    rates.plot(iterations, [r["bandwidth"] / mb for r in records], marker="s", label="bandwidth")
    if any("stopped_bandwidth" in r for r in records):  # traces from before it lack it
        rates.plot(iterations, [r.get("stopped_bandwidth", r["bandwidth"]) / mb for r in records],
                   linestyle=":", color="tab:green", label="expected once stopped")
    rates.set_ylabel("MB/s of pages")
    rates.set_title("guest dirty rate vs migration bandwidth")
    rates.legend(loc="best")

    pending.plot(iterations, [r["pending_bytes"] / mb for r in records], marker="o",
                 color="tab:purple", label="pending")
    if any(r.get("backlog_bytes") for r in records):  # traces from before it lack it
        pending.plot(iterations, [r.get("backlog_bytes", 0) / mb for r in records],
                     marker=".", color="tab:olive", label="sent, not yet loaded there")
    pending.set_ylabel("pending (MB)")
    downtime = pending.twinx()
    known = [(r["iteration"], r["expected_downtime"]) for r in records
             if r["expected_downtime"] is not None]
    if known:
        downtime.plot(*zip(*known), marker="x", linestyle="--", color="tab:red",
                      label="expected downtime")
    downtime.set_ylabel("expected downtime (ms)")
    # Where the policy decided to switch over, and the catch-up waits that followed (traces
    # from before these fields lack them)
    for r in records:
        if r.get("action") == "switchover":
            pending.axvline(r["iteration"], color="grey", linestyle=":", linewidth=1)
        if r.get("caught_up_wait_s"):
            pending.annotate(f"waited {r['caught_up_wait_s'] * 1000:.0f} ms",
                             (r["iteration"], r["pending_bytes"] / mb), fontsize=8,
                             textcoords="offset points", xytext=(4, 4))
    pending.set_title("pending bytes and expected downtime (dotted: switchover decided)")
    handles = pending.get_legend_handles_labels()
    extra = downtime.get_legend_handles_labels()
    pending.legend(handles[0] + extra[0], handles[1] + extra[1], loc="best")

    throttle.step(iterations, [r["throttle_pct"] for r in records], where="post",
                  color="tab:green")
    throttle.set_ylim(0, 100)
    throttle.set_ylabel("throttle (%)")
    throttle.set_xlabel("iteration")
    throttle.xaxis.set_major_locator(MaxNLocator(integer=True))
    throttle.set_title("vCPU throttle")

    fig.savefig(os.fspath(out_png), format="png", dpi=100)
