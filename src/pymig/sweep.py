"""Sweeps: a grid of dirty rate x bandwidth (x working set x downtime limit), each point
migrated N times and also predicted, into rows and maps.

Every run starts a fresh guest running the dirtier at the point's rate over its working set
(:class:`pymig.experiment.Source`), migrates it to a fresh ``pymig incoming`` process over
a link shaped to the point's bandwidth (:mod:`pymig.sweeplink`): by pymig's own rate limiter
on loopback (``max-bandwidth`` and ``x-switchover-capped``, since a link does not speed up
when the guest stops), or by ``tc`` on a pair of network namespaces.  ``max-total-time``
with ``limit-action cancel`` ends a run that does not converge.  Before migrating, the
guest's dirty rate is measured (``measure_ms`` of dirty-bitmap) and the same guest is
predicted (:func:`pymig.predict.predict`, the real policy over the model) from what the
point sets and the pages its guest holds.

Each run is one row, appended to ``runs.jsonl`` as soon as it ends (and ``runs.csv``
rewritten from them), so a sweep that is killed continues where it was: the runs already in
``runs.jsonl`` are not run again.  :func:`cells` takes the median of each point's runs;
:func:`plot_maps` draws the convergence map (heatmaps of total time and downtime over the
grid, non-converging cells marked, the predicted convergence boundary over them) and
:func:`plot_predicted` predicted against measured.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

MiB = 1 << 20
#: The model's limits for a point: total time within this share, downtime within this share
#: or :data:`DOWNTIME_SLACK_MS`.
TIME_TOLERANCE = 0.15
DOWNTIME_SLACK_MS = 2.0
#: A destination process started for the run builds its guest when the stream's
#: configuration arrives, and loads nothing before: this long after the start, here (a
#: 64 MiB guest; its imports and probes done while it settled).
DESTINATION_READY_S = float(os.environ.get("PYMIG_SWEEP_DESTINATION_READY_S", "0.1"))


@dataclass(frozen=True)
class SweepSpec:
    """The grid and what every run shares."""

    rates: tuple[int, ...]  # pages/s the dirtier writes
    bandwidths: tuple[int, ...]  # bytes/s (max-bandwidth)
    working_sets: tuple[int, ...] = (16 * MiB,)
    downtime_limits: tuple[int, ...] = (100,)  # ms
    kind: str = "simulated"
    memory: int = 64 * MiB
    pattern: str = "uniform"
    vcpus: int = 1
    runs: int = 3
    compression: str = "none"
    max_total_time_ms: int = 4000
    warmup_s: float = 1.0
    # a destination process just started imports and probes what building a guest needs in
    # the background (pymig.machine.WarmUp): let it, or it delays the run by as much
    settle_s: float = 1.0
    # before each run the guest's dirty rate is measured this long (dirty-bitmap: the rate it
    # writes at while its writes are logged, as during a migration); 0: not measured
    measure_ms: int = 500
    link: str = "ratelimit"  # pymig.sweeplink.LINKS
    # before its first run the sweep migrates an idle guest of its shape this many times; the
    # median downtime is the switchover's fixed cost its predictions use (0: not measured,
    # pymig.estimate.SwitchoverCost's figure)
    switchover_runs: int = 5

    def points(self) -> list[dict[str, Any]]:
        return [{"kind": self.kind, "pattern": self.pattern, "working_set_bytes": ws,
                 "downtime_limit_ms": dl, "rate_pages_per_s": rate, "bandwidth_bps": bw}
                for ws, dl, rate, bw in itertools.product(self.working_sets,
                                                          self.downtime_limits, self.rates,
                                                          self.bandwidths)]


POINT_KEYS = ("kind", "pattern", "working_set_bytes", "downtime_limit_ms", "rate_pages_per_s",
              "bandwidth_bps")
ROW_KEYS = POINT_KEYS + (
    "run", "status", "converged", "switchover_reason", "total_ms", "downtime_ms",
    "expected_downtime_ms", "iterations", "transferred_bytes", "data_pages", "zero_pages",
    "predicted_status", "predicted_converged", "predicted_reason", "predicted_total_ms",
    "predicted_downtime_ms", "predicted_iterations", "predicted_transferred_bytes",
    "link_goodput_bps", "measured_rate_pps", "measured_slowdown", "first_touch_zero_us",
    "first_touch_data_us", "switchover_ms", "error")


def point_key(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in POINT_KEYS)


def settings(spec: SweepSpec, point: dict[str, Any]) -> dict[str, Any]:
    """The migration settings of ``point`` (pymig.experiment's keywords)."""
    from pymig.sweeplink import open_link

    return {"downtime_limit": point["downtime_limit_ms"], "compression": spec.compression,
            "max_total_time": spec.max_total_time_ms, "limit_action": "cancel",
            **open_link(spec.link).settings(point)}


def predict_point(spec: SweepSpec, point: dict[str, Any], data_pages: int = 0,
                  zero_pages: int = 0, *, bins: int | None = None,
                  goodput_bps: float | None = None, zero_profile=(),
                  first_touch: tuple[float, float] | None = None,
                  slowdown: float | None = None, switchover_s: float | None = None):
    """The prediction for ``point`` (a :class:`pymig.predict.Prediction`); ``goodput_bps``:
    what a shaped link was measured to carry (``netns``; the point's bandwidth without);
    ``zero_profile``: where the guest's zero pages were (:meth:`Source.zero_profile`);
    ``first_touch``: seconds per zero and per data page the destination takes to load a page
    it never had (:func:`pymig.predict.measure_first_touch`; None: measured now, once);
    ``slowdown``: how much slower the guest wrote while its writes were logged (the
    ``guest-cost`` of the measurement before the run: on KVM each page the log write-protects
    costs the guest a fault), so it writes at the point's rate times ``1 - slowdown`` during
    the migration too (never faster than the point's rate: a guest measured slower before
    than during was held up then); ``switchover_s``: the switchover's fixed cost on this host
    (:func:`measure_switchover`; None: :class:`pymig.estimate.SwitchoverCost`'s figure)."""
    from pymig.experiment import migration_settings
    from pymig.predict import GuestModel, LinkModel, parameters, predict

    qmp, caps = migration_settings(**settings(spec, point))
    link_bps = 0.0
    if spec.link == "netns":
        link_bps = float(goodput_bps or point["bandwidth_bps"])
    logged_share = 1.0 - min(max(slowdown or 0.0, 0.0), 1.0)
    guest = GuestModel(ram_bytes=spec.memory,
                       write_rate_pps=point["rate_pages_per_s"] * logged_share,
                       working_set_pages=point["working_set_bytes"] // 4096,
                       pattern=spec.pattern if spec.pattern in ("uniform", "sequential")
                       else "uniform", data_pages=data_pages, vcpus=spec.vcpus,
                       zero_share=zero_pages / data_pages if data_pages else 0.0,
                       zero_profile=tuple(zero_profile or ()),
                       # a KVM guest's bitmap log, manually protected, is re-armed chunk by
                       # chunk as a pass reaches it; a simulated guest's sync re-arms it
                       rearmed_at_send=spec.kind == "kvm")
    zero_s, data_s = first_touch or host_first_touch()
    return predict(guest, LinkModel(bandwidth_bps=link_bps,
                                    destination_ready_s=DESTINATION_READY_S,
                                    first_touch_zero_s=zero_s, first_touch_data_s=data_s,
                                    switchover_s=switchover_s or 0.0),
                   parameters(**qmp, capabilities=caps), **({"bins": bins} if bins else {}))


_FIRST_TOUCH: list[tuple[float, float]] = []


def host_first_touch() -> tuple[float, float]:
    """This host's first-touch costs, measured once per process (rows from before a sweep
    measured them per run)."""
    if not _FIRST_TOUCH:
        from pymig.predict import measure_first_touch

        _FIRST_TOUCH.append(measure_first_touch())
    return _FIRST_TOUCH[0]


def row_first_touch(row: dict[str, Any]) -> tuple[float, float] | None:
    if row.get("first_touch_zero_us") is None or row.get("first_touch_data_us") is None:
        return None
    return row["first_touch_zero_us"] / 1e6, row["first_touch_data_us"] / 1e6


def row_switchover(row: dict[str, Any]) -> float | None:
    """The switchover's fixed cost a row's sweep measured (None in rows from before)."""
    value = row.get("switchover_ms")
    return value / 1000 if value else None


def measure_switchover(spec: SweepSpec, link, runs: int | None = None) -> float | None:
    """The switchover's fixed cost on this host, for guests of ``spec``'s shape: the median
    downtime (s) of ``runs`` migrations (``spec.switchover_runs``) of an idle guest of its
    kind, memory and vCPUs, to a fresh destination process over ``link`` (open), uncapped,
    so that nothing but the fixed part is in it (stopping the vCPUs, the last sync, the
    device state, LOADED / COMMIT / ACK between two processes); None if none completed.
    What that costs depends on the host (its CPUs, what else runs there) more than on the
    guest: :class:`pymig.estimate.SwitchoverCost`'s figure was measured elsewhere."""
    from pymig.experiment import Source

    downtimes = []
    for _ in range(spec.switchover_runs if runs is None else runs):
        with Source.start("idle", kind=spec.kind, memory=spec.memory,
                          vcpus=spec.vcpus) as source:
            with link.destination() as destination:
                time.sleep(spec.settle_s)  # the destination's imports and probes, as a run's
                result = source.migrate(link.uri(destination), timeout=120, trace=False,
                                        downtime_limit=max(spec.downtime_limits))
        downtime = result.summary().get("downtime_ms")
        if result.status == "completed" and downtime is not None:
            downtimes.append(downtime / 1000)
    return statistics.median(downtimes) if downtimes else None


def run_point(spec: SweepSpec, point: dict[str, Any], run: int, *, link=None,
              switchover_s: float | None = None) -> dict[str, Any]:
    """Migrate ``point``'s guest once over ``link`` (a :mod:`pymig.sweeplink` link, open;
    by default the rate limiter), predicted first (with ``switchover_s``, the fixed cost
    :func:`measure_switchover` measured, if it did); its row."""
    from pymig.experiment import Source
    from pymig.predict import PAGE_SIZE, measure_first_touch
    from pymig.sweeplink import RateLimitLink

    link = link or RateLimitLink()
    row: dict[str, Any] = {**point, "run": run, **link.prepare(point)}
    with Source.start("dirtier", kind=spec.kind, memory=spec.memory, vcpus=spec.vcpus,
                      working_set=point["working_set_bytes"], rate=point["rate_pages_per_s"],
                      pattern=spec.pattern, warmup_s=spec.warmup_s) as source:
        with link.destination() as destination:
            began = time.monotonic()
            if spec.measure_ms:
                measured = source.dirty_rate(spec.measure_ms, mode="dirty-bitmap")
                row["measured_rate_pps"] = measured.get("write-rate-pages")
                row["measured_slowdown"] = (measured.get("guest-cost") or {}).get("slowdown")
            time.sleep(max(spec.settle_s - (time.monotonic() - began), 0.0))
            row["data_pages"], row["zero_pages"] = source.data_pages()
            row["zero_profile"] = [round(z, 4) for z in source.zero_profile()]
            zero_s, data_s = measure_first_touch(PAGE_SIZE)
            row["first_touch_zero_us"] = round(zero_s * 1e6, 3)
            row["first_touch_data_us"] = round(data_s * 1e6, 3)
            if switchover_s:
                row["switchover_ms"] = round(switchover_s * 1000, 3)
            predicted = predict_point(spec, point, row["data_pages"], row["zero_pages"],
                                      goodput_bps=row.get("link_goodput_bps"),
                                      zero_profile=row["zero_profile"],
                                      first_touch=row_first_touch(row),
                                      slowdown=row.get("measured_slowdown"),
                                      switchover_s=row_switchover(row)).summary()
            result = source.migrate(link.uri(destination),
                                    timeout=spec.max_total_time_ms / 1000 + 120,
                                    trace=True, **settings(spec, point))
            if result.status == "completed":
                destination.wait_guest()
    measured = result.summary()
    row["trace"] = result.trace
    for key in ("status", "converged", "switchover_reason", "total_ms", "downtime_ms",
                "expected_downtime_ms", "iterations", "transferred_bytes", "error"):
        row[key] = measured.get(key)
    row.update(_predicted_fields(predicted))
    return row


def _predicted_fields(predicted: dict[str, Any]) -> dict[str, Any]:
    return {"predicted_status": predicted["status"],
            "predicted_converged": predicted["converged"],
            "predicted_reason": predicted["reason"],
            "predicted_total_ms": predicted["total_ms"],
            "predicted_downtime_ms": predicted["downtime_ms"],
            "predicted_iterations": predicted["iterations"],
            "predicted_transferred_bytes": predicted["transferred_bytes"]}


def repredict(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with their predictions made again by the model as it is now (from each
    run's point and the pages its guest held), the measurements as they were."""
    out = []
    for row in rows:
        if row.get("data_pages") is None:
            out.append(row)
            continue
        point = {k: row[k] for k in POINT_KEYS}
        predicted = predict_point(spec, point, row["data_pages"], row.get("zero_pages", 0),
                                  goodput_bps=row.get("link_goodput_bps"),
                                  zero_profile=row.get("zero_profile"),
                                  first_touch=row_first_touch(row),
                                  slowdown=row.get("measured_slowdown"),
                                  switchover_s=row_switchover(row))
        out.append({**row, **_predicted_fields(predicted.summary())})
    return out


def load_spec(out_dir: str) -> SweepSpec:
    """The spec a sweep in ``out_dir`` ran with (one from before a field existed takes its
    default)."""
    with open(os.path.join(out_dir, "spec.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    return SweepSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a sweep's ``runs.jsonl`` (a line cut short by a kill is left out)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROW_KEYS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run_sweep(spec: SweepSpec, out_dir: str, *,
              say: Callable[[str], None] = lambda text: None,
              run: Callable[[SweepSpec, dict, int], dict] | None = None) -> list[dict[str, Any]]:
    """Run every point of ``spec`` ``spec.runs`` times, skipping runs ``out_dir/runs.jsonl``
    already holds; returns all its rows.  ``run(spec, point, index)`` makes one row (by
    default :func:`run_point` over the spec's link, opened once for the sweep, after
    :func:`measure_switchover` before the first run, when there is one to make)."""
    if run is None:
        from pymig.sweeplink import open_link

        with open_link(spec.link) as link:
            measured: list[float | None] = []

            def one(s: SweepSpec, p: dict[str, Any], i: int) -> dict[str, Any]:
                if not measured:
                    measured.append(measure_switchover(s, link) if s.switchover_runs else None)
                    if measured[0] is not None:
                        say(f"the switchover's fixed cost, here: {measured[0] * 1000:.2f} ms "
                            f"(median of {s.switchover_runs} idle guests migrated)")
                return run_point(s, p, i, link=link, switchover_s=measured[0])

            return run_sweep(spec, out_dir, say=say, run=one)
    os.makedirs(out_dir, exist_ok=True)
    jsonl, csv_path = os.path.join(out_dir, "runs.jsonl"), os.path.join(out_dir, "runs.csv")
    with open(os.path.join(out_dir, "spec.json"), "w", encoding="utf-8") as handle:
        json.dump(asdict(spec), handle)
    rows = read_rows(jsonl)
    _drop_torn_tail(jsonl)
    done = {(point_key(r), r["run"]) for r in rows}
    todo = [(p, i) for p in spec.points() for i in range(spec.runs)
            if (point_key(p), i) not in done]
    if done:
        say(f"{len(done)} runs already in {jsonl}; {len(todo)} to go")
    for number, (point, index) in enumerate(todo, 1):
        began = time.monotonic()
        try:
            row = run(spec, point, index)
        except Exception as exc:  # noqa: BLE001 - a point that cannot run is a row saying why
            row = {**point, "run": index, "status": "error", "error": str(exc)}
        trace = row.pop("trace", None)
        if trace:
            write_trace(out_dir, row, trace)
        with open(jsonl, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        rows.append(row)
        write_csv(rows, csv_path)
        say(f"[{number}/{len(todo)}] rate {point['rate_pages_per_s']} pages/s, bandwidth "
            f"{point['bandwidth_bps'] / 1e6:g} MB/s, run {index}: {row.get('status')} "
            f"{row.get('total_ms')} ms (predicted {row.get('predicted_total_ms')}), downtime "
            f"{row.get('downtime_ms')} ms (predicted {row.get('predicted_downtime_ms')}) "
            f"[{time.monotonic() - began:.1f} s]")
    return rows


def trace_path(out_dir: str, row: dict[str, Any]) -> str:
    """Where a run's per-sync trace is kept: ``traces/RATE-BANDWIDTH-WS-LIMIT-rRUN.jsonl``."""
    return os.path.join(out_dir, "traces", "{}-{}-{}-{}-r{}.jsonl".format(
        row["rate_pages_per_s"], row["bandwidth_bps"], row["working_set_bytes"],
        row["downtime_limit_ms"], row["run"]))


def write_trace(out_dir: str, row: dict[str, Any], trace: list[dict[str, Any]]) -> str:
    path = trace_path(out_dir, row)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in trace)
    os.replace(f"{path}.tmp", path)
    return path


def read_trace(out_dir: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's per-sync trace, or [] when the sweep kept none for it."""
    path = trace_path(out_dir, row)
    return read_rows(path) if os.path.exists(path) else []


def _drop_torn_tail(path: str) -> None:
    """A kill mid-write leaves a last line without its newline: cut it, so the next row
    starts on a line of its own."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


# -- what the rows say -----------------------------------------------------------------------

def _median(values: Iterable[Any]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return statistics.median(numbers) if numbers else None


@dataclass
class Cell:
    """One point of the grid: the medians of its runs and of their predictions."""

    point: dict[str, Any]
    runs: int
    converged: bool  # most of its runs
    predicted_converged: bool
    total_ms: float | None
    predicted_total_ms: float | None
    downtime_ms: float | None
    predicted_downtime_ms: float | None
    iterations: float | None = None
    predicted_iterations: float | None = None
    statuses: list[str] = field(default_factory=list)

    @property
    def total_error(self) -> float | None:
        if not self.total_ms or self.predicted_total_ms is None:
            return None
        return (self.predicted_total_ms - self.total_ms) / self.total_ms

    @property
    def downtime_error_ms(self) -> float | None:
        if self.downtime_ms is None or self.predicted_downtime_ms is None:
            return None
        return self.predicted_downtime_ms - self.downtime_ms

    @property
    def total_ok(self) -> bool | None:
        error = self.total_error
        return None if error is None else abs(error) <= TIME_TOLERANCE

    @property
    def downtime_ok(self) -> bool | None:
        error = self.downtime_error_ms
        if error is None:
            return None
        return abs(error) <= max(TIME_TOLERANCE * self.downtime_ms, DOWNTIME_SLACK_MS)

    def to_dict(self) -> dict[str, Any]:
        return {**self.point, "runs": self.runs, "converged": self.converged,
                "predicted_converged": self.predicted_converged, "total_ms": self.total_ms,
                "predicted_total_ms": self.predicted_total_ms, "total_error": self.total_error,
                "downtime_ms": self.downtime_ms,
                "predicted_downtime_ms": self.predicted_downtime_ms,
                "downtime_error_ms": self.downtime_error_ms, "iterations": self.iterations,
                "predicted_iterations": self.predicted_iterations}


def cells(rows: list[dict[str, Any]]) -> list[Cell]:
    """Each point's runs, as medians (runs that could not run left out)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("status") in ("completed", "cancelled", "failed"):
            groups.setdefault(point_key(row), []).append(row)
    out = []
    for key, runs in groups.items():
        converged = sum(bool(r["converged"]) for r in runs) * 2 > len(runs)
        # the medians of the runs that ended as most did: a converged point's downtime is
        # that of its converged runs
        alike = [r for r in runs if bool(r["converged"]) == converged] or runs
        out.append(Cell(
            point=dict(zip(POINT_KEYS, key)), runs=len(runs), converged=converged,
            predicted_converged=sum(bool(r["predicted_converged"]) for r in runs) * 2
            > len(runs),
            total_ms=_median(r["total_ms"] for r in alike),
            predicted_total_ms=_median(r["predicted_total_ms"] for r in alike),
            downtime_ms=_median(r["downtime_ms"] for r in alike) if converged else None,
            predicted_downtime_ms=(_median(r["predicted_downtime_ms"] for r in alike)
                                   if converged else None),
            iterations=_median(r["iterations"] for r in alike),
            predicted_iterations=_median(r["predicted_iterations"] for r in alike),
            statuses=[r["status"] for r in runs]))
    return out


def accuracy(grid: list[Cell]) -> dict[str, Any]:
    """How the predictions held: convergence right at how many points, total time and
    downtime within the tolerance at how many of the points that converged both ways."""
    both = [c for c in grid if c.converged and c.predicted_converged]
    total = [c.total_ok for c in both if c.total_ok is not None]
    down = [c.downtime_ok for c in both if c.downtime_ok is not None]
    return {"points": len(grid),
            "convergence_right": sum(c.converged == c.predicted_converged for c in grid),
            "converging_points": len(both),
            "total_within": sum(total), "total_checked": len(total),
            "downtime_within": sum(down), "downtime_checked": len(down),
            "total_error_median": _median(abs(c.total_error) for c in both
                                          if c.total_error is not None),
            "downtime_error_median_ms": _median(abs(c.downtime_error_ms) for c in both
                                                if c.downtime_error_ms is not None)}


def table(grid: list[Cell]) -> str:
    """The errors as a Markdown table, one line per point."""
    lines = ["| rate (pages/s) | bandwidth (MB/s) | converges (measured / predicted) | total ms "
             "(measured / predicted, error) | downtime ms (measured / predicted, error) | passes "
             "(measured / predicted) |", "|---|---|---|---|---|---|"]

    def fmt(value, digits=0):
        return "-" if value is None else f"{value:,.{digits}f}"

    for c in sorted(grid, key=lambda c: (c.point["working_set_bytes"],
                                         c.point["downtime_limit_ms"],
                                         c.point["rate_pages_per_s"], c.point["bandwidth_bps"])):
        conv = f"{'yes' if c.converged else 'no'} / {'yes' if c.predicted_converged else 'no'}"
        if c.converged != c.predicted_converged:
            conv += " **wrong**"
        total = (f"{fmt(c.total_ms)} / {fmt(c.predicted_total_ms)}, "
                 f"{c.total_error * 100:+.1f} %" if c.total_error is not None else "-")
        down = (f"{fmt(c.downtime_ms, 1)} / {fmt(c.predicted_downtime_ms, 1)}, "
                f"{c.downtime_error_ms:+.1f} ms" if c.downtime_error_ms is not None else "-")
        lines.append(f"| {c.point['rate_pages_per_s']:,} | {c.point['bandwidth_bps'] / 1e6:g} | "
                     f"{conv} | {total} | {down} | {fmt(c.iterations)} / "
                     f"{fmt(c.predicted_iterations)} |")
    return "\n".join(lines)


# -- figures ---------------------------------------------------------------------------------

def _axes_values(grid: list[Cell]) -> tuple[list[int], list[int]]:
    rates = sorted({c.point["rate_pages_per_s"] for c in grid})
    bandwidths = sorted({c.point["bandwidth_bps"] for c in grid})
    return rates, bandwidths


def predicted_boundary(spec: SweepSpec, point: dict[str, Any], rates: list[int],
                       bandwidths: list[int], steps: int = 14, data_pages: int = 0,
                       zero_pages: int = 0, goodput_share: float = 1.0,
                       switchover_s: float | None = None):
    """Predicted convergence over a finer log grid spanning ``rates`` x ``bandwidths``:
    (rate values, bandwidth values, converges matrix [rate][bandwidth])."""
    import numpy as np

    rate_axis = np.geomspace(min(rates), max(rates), steps)
    bw_axis = np.geomspace(min(bandwidths), max(bandwidths), steps)
    conv = np.zeros((steps, steps))
    for i, rate in enumerate(rate_axis):
        for j, bw in enumerate(bw_axis):
            p = dict(point, rate_pages_per_s=int(rate), bandwidth_bps=int(bw))
            conv[i, j] = predict_point(spec, p, data_pages, zero_pages, bins=32,
                                       goodput_bps=bw * goodput_share,
                                       switchover_s=switchover_s).converges
    return rate_axis, bw_axis, conv


def plot_maps(rows: list[dict[str, Any]], spec: SweepSpec, path: str) -> list[str]:
    """The convergence map of each working set and downtime limit: measured total time and
    downtime over rate x bandwidth, non-converging cells crossed out, the predicted boundary
    drawn over both.  Returns the files written (``path`` with a suffix per map when there
    are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    grid = cells(rows)
    written = []
    groups = sorted({(c.point["working_set_bytes"], c.point["downtime_limit_ms"]) for c in grid})
    for ws, dl in groups:
        sub = [c for c in grid if (c.point["working_set_bytes"], c.point["downtime_limit_ms"])
               == (ws, dl)]
        rates, bandwidths = _axes_values(sub)
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
        data_pages = int(_median(r.get("data_pages") for r in rows
                                 if r.get("working_set_bytes") == ws) or 0)
        zero_pages = int(_median(r.get("zero_pages") for r in rows
                                 if r.get("working_set_bytes") == ws) or 0)
        share = _median(r["link_goodput_bps"] / r["bandwidth_bps"] for r in rows
                        if r.get("link_goodput_bps")) or 1.0
        r_axis, b_axis, conv = predicted_boundary(spec, sub[0].point, rates, bandwidths,
                                                  data_pages=data_pages, zero_pages=zero_pages,
                                                  goodput_share=share,
                                                  switchover_s=_median(row_switchover(r)
                                                                       for r in rows))
        for ax, figure, label in ((axes[0], "total_ms", "total time (ms)"),
                                  (axes[1], "downtime_ms", "downtime (ms)")):
            values = np.full((len(rates), len(bandwidths)), np.nan)
            for c in sub:
                v = getattr(c, figure)
                if v is not None and (c.converged or figure == "total_ms"):
                    values[rates.index(c.point["rate_pages_per_s"]),
                           bandwidths.index(c.point["bandwidth_bps"])] = max(v, 0.01)
            finite = values[np.isfinite(values)]
            norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
            mesh = ax.pcolormesh(_edges(bandwidths), _edges(rates), values, norm=norm,
                                 cmap="viridis", shading="flat")
            fig.colorbar(mesh, ax=ax, label=label)
            for c in sub:
                x, y = c.point["bandwidth_bps"], c.point["rate_pages_per_s"]
                if not c.converged:
                    ax.plot([x], [y], marker="x", color="red", markersize=14, mew=2.5)
                v = getattr(c, figure)
                if v is not None:
                    ax.annotate(f"{v:,.0f}", (x, y), ha="center", va="bottom", fontsize=7,
                                color="white", xytext=(0, 6), textcoords="offset points")
            if conv.min() < 0.5 < conv.max():
                ax.contour(b_axis, r_axis, conv, levels=[0.5], colors="orange", linewidths=2)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("bandwidth (tc on a namespace pair, bytes/s)" if spec.link == "netns"
                          else "bandwidth (max-bandwidth, bytes/s)")
            ax.set_ylabel("guest write rate (pages/s)")
            ax.set_title(f"{label}: x = did not converge, orange = predicted boundary")
        fig.suptitle(f"{spec.kind} guest, dirtier {spec.pattern} over {ws // MiB} MiB of "
                     f"{spec.memory // MiB} MiB, downtime limit {dl} ms, medians of "
                     f"{spec.runs} runs")
        out = path if len(groups) == 1 else path.replace(".png", f"-{ws // MiB}m-{dl}ms.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def _edges(values: list[float]):
    """Cell edges, halfway (geometrically) between log-spaced centres."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return np.array([v[0] / 1.5, v[0] * 1.5])
    mids = np.sqrt(v[:-1] * v[1:])
    return np.concatenate([[v[0] ** 2 / mids[0]], mids, [v[-1] ** 2 / mids[-1]]])


def plot_predicted(rows: list[dict[str, Any]], path: str) -> str:
    """Predicted against measured, total time and downtime, one dot per point (medians);
    the diagonal and the tolerance band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = cells(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), constrained_layout=True)
    for ax, measured, predicted, label in (
            (axes[0], "total_ms", "predicted_total_ms", "total time (ms)"),
            (axes[1], "downtime_ms", "predicted_downtime_ms", "downtime (ms)")):
        pts = [(getattr(c, measured), getattr(c, predicted), c.converged) for c in grid
               if getattr(c, measured) is not None and getattr(c, predicted) is not None]
        if not pts:
            continue
        xs, ys, conv = (np.array(v) for v in zip(*pts))
        ax.scatter(xs[conv], ys[conv], label="converged", color="tab:blue")
        if (~conv).any():
            ax.scatter(xs[~conv], ys[~conv], label="did not converge (time = the limit)",
                       color="tab:red", marker="x")
        lo, hi = max(min(xs.min(), ys.min()) / 1.5, 0.1), max(xs.max(), ys.max()) * 1.5
        line = np.geomspace(lo, hi, 50)
        ax.plot(line, line, color="black", lw=1)
        ax.fill_between(line, line * (1 - TIME_TOLERANCE), line * (1 + TIME_TOLERANCE),
                        color="grey", alpha=0.25, label="±15 %")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.legend()
    fig.suptitle("pymig predict against the migrations it predicted (medians per point)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_cells(text: str) -> list[tuple[int, int]]:
    """``RATE:BANDWIDTH,...`` (pages/s, bytes/s; sizes such as ``20M`` too) as pairs."""
    from pymig.units import parse_size

    chosen = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        rate, sep, bandwidth = part.partition(":")
        if not sep:
            raise ValueError(f"a cell is RATE:BANDWIDTH, not {part!r}")
        chosen.append((int(rate), parse_size(bandwidth)))
    return chosen


def default_cells(grid: list[Cell], count: int = 4) -> list[tuple[int, int]]:
    """Cells worth a look when none are chosen: of the points that converged, those with
    the most passes (where the passes' shape decides the time), then ones that did not."""
    ranked = sorted(grid, key=lambda c: (not c.converged, -(c.iterations or 0)))
    return [(c.point["rate_pages_per_s"], c.point["bandwidth_bps"]) for c in ranked[:count]]


FLOOR_MIB = 0.01  # where remaining.png draws nothing left, on its log scale


def plot_remaining(rows: list[dict[str, Any]], spec: SweepSpec, out_dir: str, path: str,
                   chosen: list[tuple[int, int]] | None = None) -> str | None:
    """Remaining to send (pending after each dirty-log sync) against time, one panel per
    chosen cell (``(rate, bandwidth)``; every working set and downtime limit the sweep has
    of it): every run's trace as measured, a dot per pass, and the model's prediction of
    the same run dashed.  None when no chosen cell has a trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = chosen if chosen is not None else default_cells(cells(rows))
    panels = []
    for rate, bandwidth in chosen:
        runs = [r for r in rows if r.get("rate_pages_per_s") == rate
                and r.get("bandwidth_bps") == bandwidth and r.get("data_pages") is not None]
        traced = [(r, read_trace(out_dir, r)) for r in runs]
        traced = [(r, t) for r, t in traced if t]
        if traced:
            panels.append(((rate, bandwidth), traced))
    if not panels:
        return None
    columns = min(len(panels), 2)
    rows_n = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows_n, columns, figsize=(6.5 * columns, 4.4 * rows_n),
                             constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, ((rate, bandwidth), traced) in zip(axes.flat, panels):
        for i, (row, trace) in enumerate(traced):
            colour = f"C{i % 10}"
            ax.plot([t["time"] for t in trace],
                    [max(t["pending_bytes"] / MiB, FLOOR_MIB) for t in trace],
                    marker="o", ms=3.5, color=colour,
                    label=f"run {row['run']}: {row.get('status')}, {row.get('total_ms')} ms")
            point = {k: row[k] for k in POINT_KEYS}
            predicted = predict_point(spec, point, row["data_pages"],
                                      row.get("zero_pages", 0),
                                      goodput_bps=row.get("link_goodput_bps"),
                                      zero_profile=row.get("zero_profile"),
                                      first_touch=row_first_touch(row),
                                      slowdown=row.get("measured_slowdown"),
                                      switchover_s=row_switchover(row))
            ax.plot([t["time"] for t in predicted.trace],
                    [max(t["pending_bytes"] / MiB, FLOOR_MIB) for t in predicted.trace],
                    ls="--", marker=".",
                    color=colour, alpha=0.8,
                    label=f"predicted: {predicted.status}, {predicted.total_s * 1000:,.0f} ms")
        limit_mb = row["downtime_limit_ms"] / 1000 * bandwidth / MiB
        ax.axhline(limit_mb, color="grey", lw=0.8, ls=":")
        ax.annotate("downtime limit x bandwidth", (0, limit_mb), fontsize=7, color="grey",
                    va="bottom")
        ax.set_yscale("log")
        ax.set_xlabel("time since the migration began (s)")
        ax.set_ylabel(f"remaining after the sync (MiB; nothing drawn at {FLOOR_MIB})")
        ax.set_title(f"{rate:,} pages/s at {bandwidth / 1e6:g} MB/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"{spec.kind} guests: remaining to send at each pass, measured (solid) and "
                 f"predicted (dashed)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
