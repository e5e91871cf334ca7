"""``pymig plot`` on traces of real migrations: it runs where the README's main command
installed pymig, its axes are time and logarithmic rates, and the switchover is one mark, not a
wall of lines."""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path

import pytest

from _migration_helpers import guests  # noqa: F401 - fixture
from _migration_helpers import guest_config, migrate_locally, run_pymig
from pymig.plot import TIME_LABEL, plot_trace
from pymig.policy import Action, Decision
from pymig.stats import read_trace

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_readme_main_command_installs_matplotlib():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- main-command -->", 1)[1].split("```")[1]
    installs = re.findall(r"pip install ('?)\.(\[[\w,]+\])?\1", block)
    assert installs, block
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for _, extras in installs:
        for extra in extras.strip("[]").split(",") if extras else ():
            requirements += project["optional-dependencies"][extra]
    assert any(re.match(r"matplotlib\b", r) for r in requirements), requirements


@pytest.fixture
def held_trace(tmp_path, guests):
    """The trace of a real migration over a capped link whose policy wanted to switch over at
    every sync: each was held until the first pass was through, then one went ahead."""
    def always(metrics, params):
        return Decision(Action.SWITCHOVER, "fits-limit", 0, None, 0.001)

    trace = tmp_path / "trace.jsonl"
    source = guests(guest_config("simulated", memory=64 << 20, working_set=16 << 20))
    with migrate_locally(source, f"unix:{tmp_path}/m.sock", decide=always,
                         params={"max-bandwidth": 8_000_000, "compression": "none"},
                         capabilities={"auto-converge": True}, trace_path=str(trace)) as done:
        assert done.error is None and done.migration.status.value == "completed"
    return trace


def _vertical_lines(axes) -> list:
    return [line for line in axes.lines
            if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2]


def test_plot_of_a_real_trace_is_over_time_on_log_axes_with_one_switchover_mark(held_trace,
                                                                               tmp_path):
    records = read_trace(held_trace)
    decided = [r for r in records if r["action"] == "switchover"]
    assert len(decided) >= 3, "the trace needs switchovers decided and held"
    png = tmp_path / "plot.png"
    fig = plot_trace(held_trace, png)

    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and 20_000 < len(data) < 2_000_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (900, 900)

    rates, pending, throttle, downtime = fig.axes
    assert throttle.get_xlabel() == TIME_LABEL and "time" in TIME_LABEL
    # the panels share the time axis: the throttle's step line has a point per record, at
    # the record's time, not at its iteration number
    times = [r["time"] for r in records]
    step = [line for line in throttle.lines if line.get_label() == "throttle in force"]
    assert len(step) == 1 and list(step[0].get_xdata()) == times
    assert throttle.get_shared_x_axes().joined(throttle, rates)
    assert rates.get_yscale() == pending.get_yscale() == downtime.get_yscale() == "log"
    assert throttle.get_yscale() == "linear" and throttle.get_ylim() == (0, 100)
    # one switchover line per panel, at the switchover that went ahead; the held ones are
    # a single series of marks
    for axes in (rates, pending, throttle):
        lines = _vertical_lines(axes)
        assert len(lines) == 1 and lines[0].get_xdata()[0] == decided[-1]["time"]
    held = [line for line in pending.lines if line.get_label().startswith("switchover decided")]
    assert len(held) == 1 and len(pending.lines) <= 4  # pending, backlog, switchover, held


def test_a_first_pass_spike_does_not_flatten_the_rest(tmp_path):
    """A 1000-fold spike: on the log axis the later rates still span a good part of the
    height (on a linear one they would sit in its bottom thousandth)."""
    trace = tmp_path / "spike.jsonl"
    lines = []
    for i in range(1, 41):
        bandwidth = 2e9 if i == 1 else 2e6 * (1 + i % 4)
        lines.append({"time": 0.1 * i, "iteration": i, "dirty_pages": 10, "pages_sent": 100,
                      "bytes": 1000, "bandwidth": bandwidth, "stopped_bandwidth": bandwidth,
                      "expected_downtime": 500, "pending_bytes": 10_000_000, "throttle_pct": 0,
                      "dirty_rate": 500.0, "page_size": 4096, "action": "continue",
                      "reason": "converging", "caught_up_wait_s": 0.0, "backlog_bytes": 0})
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    fig = plot_trace(trace, tmp_path / "spike.png")
    rates = fig.axes[0]
    lo, hi = rates.get_ylim()
    later_span = math.log10(8e6 / 2e6)  # MB/s 2..8 after the spike
    assert later_span / math.log10(hi / lo) > 0.1


def test_cli_plot_writes_the_png_it_names(held_trace, tmp_path):
    png = tmp_path / "cli.png"
    done = run_pymig("plot", str(held_trace), "-o", str(png))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(png)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
