"""The per-sync trace: lines round-trip, half-written lines, and the plot."""

from __future__ import annotations

import json
import math
import sys

import pytest

from pymig.stats import MigrationStats, TraceRecord, TraceWriter, read_trace

TRACE_KEYS = {"time", "iteration", "dirty_pages", "pages_sent", "bytes", "bandwidth",
              "stopped_bandwidth", "expected_downtime", "pending_bytes", "throttle_pct",
              "dirty_rate", "page_size", "action", "reason", "caught_up_wait_s",
              "backlog_bytes"}


def run_migration(path, iterations=5):
    now = [0.0]
    with TraceWriter(path) as trace:
        stats = MigrationStats(page_size=4096, trace=trace, clock=lambda: now[0])
        stats.begin(1 << 30)
        stats.setup_done()
        records = []
        for i in range(1, iterations + 1):
            now[0] += 1.5
            stats.add_sent(nbytes=1000 * i, normal_pages=i, zero_pages=1)
            pending = (iterations - i) * 4096
            expected = math.inf if i == 1 else pending / 1e6
            records.append(stats.record_sync(
                iteration=i, dirty_pages=iterations - i, remaining_bytes=pending,
                bandwidth_bps=0.0 if i == 1 else 1e6, dirty_rate_pps=100.0 / i,
                expected_downtime_s=expected, throttle_pct=min(10 * i, 99),
                stopped_bandwidth_bps=0.0 if i < 3 else 2e6,
                action="switchover" if i == iterations else "continue",
                reason="fits-limit" if i == iterations else "converging",
                caught_up_wait_s=0.25 if i == iterations else 0.0,
                backlog_bytes=(iterations - i) * 8192))
            assert read_trace(path)[-1]["iteration"] == i  # flushed per line
    return records


def test_trace_lines_round_trip(tmp_path):
    path = tmp_path / "trace.jsonl"
    records = run_migration(path)
    lines = read_trace(path)
    assert len(lines) == 5 and all(set(line) == TRACE_KEYS for line in lines)
    assert [TraceRecord(**line) for line in lines] == records
    assert lines[0]["expected_downtime"] is None  # unknown bandwidth: no number
    assert lines[1]["stopped_bandwidth"] == 1e6  # not given: the live phase's
    assert lines[2] == {"time": 4.5, "iteration": 3, "dirty_pages": 2, "pages_sent": 4,
                        "bytes": 3000, "bandwidth": 1e6, "stopped_bandwidth": 2e6,
                        "expected_downtime": 8,
                        "pending_bytes": 8192, "throttle_pct": 30,
                        "dirty_rate": pytest.approx(33.333, rel=1e-3), "page_size": 4096,
                        "action": "continue", "reason": "converging", "caught_up_wait_s": 0.0,
                        "backlog_bytes": 16384}
    assert (lines[4]["action"], lines[4]["reason"], lines[4]["caught_up_wait_s"]) == \
        ("switchover", "fits-limit", 0.25)


def test_half_written_last_line_is_skipped_but_a_bad_middle_line_is_not(tmp_path):
    path = tmp_path / "trace.jsonl"
    run_migration(path, iterations=2)
    with open(path, "a") as handle:
        handle.write('{"time": 3.0, "itera')
    assert len(read_trace(path)) == 2
    text = path.read_text().replace('{"time": 3.0, "itera', "garbage\n" + json.dumps({"a": 1}))
    path.write_text(text)
    with pytest.raises(ValueError, match=":3:"):
        read_trace(path)


def test_plot_writes_a_png(tmp_path):
    from pymig.plot import plot_trace

    trace, png = tmp_path / "trace.jsonl", tmp_path / "trace.png"
    run_migration(trace)
    plot_trace(trace, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_refuses_an_empty_trace(tmp_path):
    from pymig.plot import plot_trace

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no records"):
        plot_trace(empty, tmp_path / "x.png")


def test_plot_without_matplotlib_says_what_is_missing(tmp_path, monkeypatch):
    from pymig.plot import plot_trace

    trace = tmp_path / "trace.jsonl"
    run_migration(trace, iterations=1)
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like
    with pytest.raises(ImportError, match=r"needs matplotlib.*pip install 'matplotlib"):
        plot_trace(trace, tmp_path / "x.png")
