"""Following a migration from outside: poll ``query-migrate`` through the control socket,
draw a live progress bar, and render the final stats as a table."""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pymig.qmp import QmpClient
from pymig.units import format_bytes

ENDED = ("completed", "failed", "cancelled")


def follow(client: QmpClient, *, interval: float = 0.05, timeout: float | None = None,
           on_update: Callable[[dict], None] | None = None) -> dict:
    """Poll ``query-migrate`` until the migration ends; returns the final answer."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = client.command("query-migrate")
        if on_update is not None:
            on_update(info)
        if info.get("status") in ENDED:
            return info
        if deadline is not None and time.monotonic() > deadline:
            client.command("migrate_cancel")
            timeout = None
            deadline = None
        time.sleep(interval)


class ProgressView:
    """A rich progress bar: pass, remaining, throughput, expected downtime."""

    def __init__(self, console: Console | None = None):
        self.progress = Progress(
            TextColumn("[bold]{task.fields[status]:<10}"),
            BarColumn(),
            TextColumn("pass {task.fields[iteration]:>3}"),
            TextColumn("{task.fields[remaining]:>11} left"),
            TextColumn("{task.fields[throughput]:>10}"),
            TextColumn("expected downtime {task.fields[expected]:>7}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self.task = None

    def __enter__(self) -> "ProgressView":
        self.progress.__enter__()
        self.task = self.progress.add_task("migrate", total=1, status="setup", iteration=0,
                                           remaining="-", throughput="-", expected="-")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, info: dict) -> None:
        ram = info.get("ram", {})
        total = max(ram.get("total", 0), 1)
        remaining = ram.get("remaining", total)
        done = info.get("status") == "completed"
        expected = info.get("expected-downtime")
        self.progress.update(
            self.task, total=total, completed=total if done else max(total - remaining, 0),
            status=info.get("status", "?"), iteration=info.get("iterations", 0),
            remaining=format_bytes(0 if done else remaining),
            throughput=f"{ram.get('mbps', 0) / 8:,.0f} MB/s",
            expected="-" if expected is None else f"{expected} ms")


_ROWS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("status", "status", str),
    ("total-time", "total time", lambda v: f"{v} ms"),
    ("setup-time", "setup time", lambda v: f"{v} ms"),
    ("downtime", "downtime (measured)", lambda v: f"{v} ms"),
    ("downtime-expected-at-switchover", "downtime (expected)", lambda v: f"{v} ms"),
    ("switchover-reason", "switchover reason", str),
    ("downtime-breakdown", "downtime by phase",
     lambda v: " · ".join(f"{phase} {ms:g}" for phase, ms in v.items()) + " ms"),
    ("iterations", "iterations", str),
    ("ram.transferred", "transferred", format_bytes),
    ("ram.total", "guest RAM", format_bytes),
    ("ram.normal", "normal pages", lambda v: f"{v:,}"),
    ("ram.compressed", "of them LZ4", lambda v: f"{v:,}"),
    ("ram.duplicate", "zero pages", lambda v: f"{v:,}"),
    ("ram.dirty-sync-count", "dirty-log syncs", str),
    ("ram.dirty-pages-rate", "dirty rate", lambda v: f"{v:,} pages/s"),
    ("ram.mbps", "throughput", lambda v: f"{v / 8:,.0f} MB/s ({v:,.0f} Mbit/s)"),
    ("ram.pages-per-second", "pages per second", lambda v: f"{v:,}"),
    ("cpu-throttle-percentage", "vCPU throttle (now)", lambda v: f"{v} %"),
    ("cpu-throttle-peak", "vCPU throttle (highest)", lambda v: f"{v} %"),
    ("error-desc", "error", str),
)


def _lookup(info: dict, dotted: str) -> Any:
    value: Any = info
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# Figures that hold only while a migration runs (the throttle is lifted when it ends)
_LIVE_ONLY = {"cpu-throttle-percentage"}


def stats_table(info: dict, title: str = "migration") -> Table:
    """The final ``query-migrate`` answer as a two-column table.  Values are plain text, never
    markup: ``error-desc`` quotes what a destination said (its LOAD_ERROR), which may be
    anything, ``[/]`` included."""
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    ended = info.get("status") in ENDED
    for key, label, fmt in _ROWS:
        if ended and key in _LIVE_ONLY:
            continue
        value = _lookup(info, key)
        if value is not None:
            table.add_row(label, Text(fmt(value)))
    return table
