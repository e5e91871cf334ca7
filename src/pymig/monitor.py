"""Following a migration from outside: poll ``query-migrate`` through the control socket,
cancel it on a signal, draw a live progress bar, render the final stats as a table and say
where the guest runs.

Figures say what they count: bytes on the wire (``ram.transferred``, ``ram.mbps``: compressed
pages, zero-page markers and headers) and bytes of guest pages moved (pages x page size, the
work done for the guest), and their ratio, which zero pages and LZ4 raise far above 1.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from pymig.qmp import Interrupted, QmpClient, QmpError
from pymig.signals import CaughtSignals
from pymig.units import format_bytes, format_rate

# (post-copy paused: nothing more happens without a recovery)
ENDED = ("completed", "failed", "cancelled", "postcopy-paused")


def follow(client: QmpClient, *, interval: float = 0.05, timeout: float | None = None,
           on_update: Callable[[dict], None] | None = None,
           interrupts: "Interrupts | None" = None,
           say: Callable[[str], None] | None = None) -> "Followed":
    """Poll ``query-migrate`` until the migration ends; returns how it ended.

    ``timeout``: cancel the migration after that many seconds (then wait for its end).
    ``interrupts``: the first signal cancels the migration (``migrate_cancel``) and this goes on
    until the source says it ended; the second stops following at once (``detached``), even
    in the middle of a command a source stuck somewhere does not answer, and leaves the
    migration to the source.  ``say`` gets a line for each of those steps.
    """
    say = say or (lambda text: None)
    deadline = None if timeout is None else time.monotonic() + timeout
    cancel_asked = False
    info: dict = {}
    handled = 0  # signals acted on

    def new_signal() -> bool:
        return interrupts is not None and interrupts.count > handled

    def detach() -> bool:
        return interrupts is not None and interrupts.count >= 2

    while True:
        try:
            info = client.command("query-migrate", interrupted=new_signal)
        except Interrupted:
            pass  # a signal came while the source was slow to answer: it goes first
        else:
            if on_update is not None:
                on_update(info)
            if info.get("status") in ENDED:
                return Followed(info, cancel_asked=cancel_asked)
        signals = interrupts.count if interrupts is not None else 0
        timed_out = deadline is not None and time.monotonic() > deadline
        if (signals or timed_out) and not cancel_asked:
            cancel_asked = True
            why = f"{interrupts.name}: " if signals else f"no end in {timeout:g} s: "
            say(f"{why}cancelling the migration; waiting for the source to confirm "
                f"(again to stop waiting)")
            try:
                client.command("migrate_cancel", interrupted=detach)
            except QmpError as exc:
                say(f"the source refused: {exc.desc}; waiting for the migration to end")
            except Interrupted:
                pass
        if detach():
            return Followed(info, cancel_asked=cancel_asked, detached=True)
        handled = signals
        time.sleep(interval)


@dataclass
class Followed:
    """How a migration followed with :func:`follow` ended: its last ``query-migrate`` answer,
    whether a cancel was asked for, whether the follower stopped waiting first."""

    info: dict
    cancel_asked: bool = False
    detached: bool = False

    @property
    def status(self) -> str:
        return "detached" if self.detached else self.info.get("status", "?")


class Interrupts(CaughtSignals):
    """Counts SIGINT and SIGTERM while in force, instead of letting them end the process, so
    that a follower can cancel what it started and say how it ended.

    The handler only counts: what to do is decided where the count is read, between two
    commands on the control socket, never in the middle of one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.last: int | None = None

    @property
    def name(self) -> str:
        return {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(self.last, "signal")

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.last = signum


class ProgressView:
    """A rich progress bar and one line of figures: pass, what is left, the rates of pages
    moved and of bytes on the wire, the downtime expected if the guest stopped now."""

    def __init__(self, console: Console | None = None, *, transient: bool = False):
        # transient: the bar goes when the migration ends (what follows says how it ended)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[status]:<10}"),
            BarColumn(bar_width=None),  # what the figures leave of the line
            TextColumn("{task.fields[figures]}"),
            console=console or Console(stderr=True),
            transient=transient,
        )
        self.task = None

    def __enter__(self) -> "ProgressView":
        self.progress.__enter__()
        self.task = self.progress.add_task("migrate", total=1, status="setup", figures="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, info: dict) -> None:
        ram = info.get("ram", {})
        disk = info.get("disk", {})  # disks that travel with the guest count as RAM does
        total = max(ram.get("total", 0) + disk.get("total", 0), 1)
        remaining = ram.get("remaining", total) + disk.get("remaining", 0)
        done = info.get("status") == "completed"
        self.progress.update(
            self.task, total=total, completed=total if done else max(total - remaining, 0),
            status=info.get("status", "?"), figures=progress_figures(info))


def progress_figures(info: dict) -> str:
    """The progress line's figures for one ``query-migrate`` answer."""
    ram = info.get("ram")
    if not ram:
        return ""
    done = info.get("status") == "completed"
    figures = [f"pass {info.get('iterations', 0)}",
               f"{format_bytes(0 if done else ram.get('remaining', 0))} left", rates(ram)]
    disk = info.get("disk")
    if disk:
        figures[1] = (f"RAM {figures[1]}, disk "
                      f"{format_bytes(0 if done else disk.get('remaining', 0))} left "
                      f"({format_bytes(disk.get('transferred', 0))} sent)")
    ratio = compression_ratio(ram)
    if ratio is not None and ratio >= 1.05:  # what zero pages and LZ4 save on the wire
        figures[-1] += f" ({ratio:,.0f}x less)" if ratio >= 10 else f" ({ratio:.1f}x less)"
    expected = info.get("expected-downtime")
    if expected is not None:
        figures.append(f"downtime ≈{expected} ms")
    return ", ".join(figures)


def page_bytes(ram: dict) -> int:
    """Bytes of guest pages moved (with their data, or as zero-page markers)."""
    return (ram.get("normal", 0) + ram.get("duplicate", 0)) * ram.get("page-size", 4096)


def compression_ratio(ram: dict) -> float | None:
    """Page bytes moved per byte on the wire (None before anything went)."""
    wire = ram.get("transferred", 0)
    return page_bytes(ram) / wire if wire else None


def rates(ram: dict) -> str:
    """What goes over the wire per second, and how many bytes of pages that moves."""
    wire = ram.get("mbps", 0) * 1e6 / 8
    pages = ram.get("pages-per-second", 0) * ram.get("page-size", 4096)
    return f"pages {format_rate(pages)}, wire {format_rate(wire)}"


def _transferred(info: dict) -> str:
    ram = info["ram"]
    return format_bytes(ram["transferred"])


def _pages_moved(info: dict) -> str:
    ram = info["ram"]
    count = ram.get("normal", 0) + ram.get("duplicate", 0)
    return f"{format_bytes(page_bytes(ram))} ({count:,} pages)"


def _ratio(info: dict) -> str:
    return f"{compression_ratio(info['ram']):,.1f}x (pages moved / wire bytes)"


def _wire_rate(info: dict) -> str:
    mbps = info["ram"].get("mbps", 0)
    return f"{format_rate(mbps * 1e6 / 8)} ({mbps:,.0f} Mbit/s)"


def _page_rate(info: dict) -> str:
    ram = info["ram"]
    pages = ram.get("pages-per-second", 0)
    return f"{format_rate(pages * ram.get('page-size', 4096))} ({pages:,} pages/s)"


# (key in query-migrate, label, format).  A key starting with "=" is a figure made of several:
# the format gets the whole answer, and the row is shown when the RAM counters are there.
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
    ("ram.total", "guest RAM", format_bytes),
    ("=transferred", "transferred (wire bytes)", _transferred),
    ("=pages", "pages moved", _pages_moved),
    ("=ratio", "compression", _ratio),
    ("ram.normal", "pages with data", lambda v: f"{v:,}"),
    ("ram.compressed", "of them LZ4", lambda v: f"{v:,}"),
    ("ram.duplicate", "zero pages", lambda v: f"{v:,}"),
    ("ram.dirty-sync-count", "dirty-log syncs", str),
    ("ram.dirty-pages-rate", "dirty rate", lambda v: f"{v:,} pages dirtied/s (last sync)"),
    ("=wire-rate", "throughput (wire)", _wire_rate),
    ("=page-rate", "throughput (pages)", _page_rate),
    ("disk.total", "disks moved (images)", format_bytes),
    ("disk.transferred", "disk data sent (wire bytes)", format_bytes),
    ("cpu-throttle-percentage", "vCPU throttle (now)", lambda v: f"{v} %"),
    ("cpu-throttle-peak", "vCPU throttle (highest)", lambda v: f"{v} %"),
    ("error-desc", "error", str),
)


def _lookup(info: dict, dotted: str) -> Any:
    if dotted.startswith("="):
        if dotted == "=ratio" and compression_ratio(info.get("ram", {})) is None:
            return None
        return info if isinstance(info.get("ram"), dict) else None
    value: Any = info
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# Figures that hold only while a migration runs (the throttle is lifted when it ends)
_LIVE_ONLY = {"cpu-throttle-percentage"}


def stats_table(info: dict, title: str = "migration", *, error: bool = True) -> Table:
    """The final ``query-migrate`` answer as a two-column table (``error``: with the error's
    row, for a reader who has not been told it already).  Values are plain text, never
    markup: ``error-desc`` quotes what a destination said (its LOAD_ERROR), which may be
    anything, ``[/]`` included."""
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    ended = info.get("status") in ENDED
    for key, label, fmt in _ROWS:
        if (ended and key in _LIVE_ONLY) or (key == "error-desc" and not error):
            continue
        value = _lookup(info, key)
        if value is not None:
            table.add_row(label, Text(fmt(value)))
    return table


def outcome(followed: Followed, source_state: str | None, *, quit_source: bool,
            control: str) -> str:
    """One line: how the migration ended and where the guest runs now.  ``source_state`` is
    the source's run state after the end (None: unknown), ``quit_source`` whether the source
    process was told to quit, ``control`` its control socket as the user named it."""
    info = followed.info
    status = info.get("status", "?")
    if followed.detached:
        asked = "; a cancel was asked for" if followed.cancel_asked else ""
        return (f"stopped waiting: the migration is {status} in the source process{asked}; "
                f"'pymig qmp --control {control} query-migrate' follows it, "
                f"'... migrate_cancel' stops it")
    here = f"the guest stays at the source, {source_state}" if source_state else \
        "the guest stays at the source"
    if status == "completed":
        if source_state == "postmigrate":
            return "the guest now runs at the destination" + (
                "; the source process quits" if quit_source else
                "; the source process stays, without it (--keep-source)")
        return f"snapshot complete; {here}"
    if status == "cancelled":
        return "migration cancelled" + (" as asked" if followed.cancel_asked else "") + \
            f"; {here}"
    return here
