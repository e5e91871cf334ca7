"""pymig.benchcore: the measuring helpers behind `pymig bench core`, on small buffers (the
figures themselves are not checked: the host is too noisy for timing assertions)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from _childenv import child_env
from _core_helpers import needs_compiled
from pymig import benchcore

pytestmark = needs_compiled
KEYS = {"value", "unit", "ceiling", "ceiling_unit", "ceiling_name", "ratio", "target", "ok",
        "variant"}


def test_targets():
    assert benchcore.Target("ratio", 0.8).met(0.81, 99.0)
    assert not benchcore.Target("ratio", 0.8).met(0.79, 0.0)
    assert benchcore.Target("ms", 2.0).met(0.0, 1.9) and not benchcore.Target("ms", 2).met(9, 2.1)
    assert str(benchcore.Target("ms", 0.5)) == "<= 0.5 ms"


def test_measure_rows_and_table():
    cases = (benchcore.bitmap_cases(1 << 16) + benchcore.packet_cases(1 << 21)
             + benchcore.compression_cases(1 << 21))
    results = {case.name: benchcore.measure(case, 1) for case in cases}
    for name, row in results.items():
        assert set(row) >= KEYS, name
        assert row["value"] > 0 and row["ceiling"] > 0
        assert row["ratio"] == pytest.approx(
            row["value"] / row["ceiling"] if row["unit"] == "GB/s"
            else row["ceiling"] / row["value"], rel=1e-3)
        assert (row["ok"] is None) == (row["target"] is None)
    assert 1024 <= results["encode_1MiB_packets"]["calls_per_GiB"] <= 2048  # low thousands
    # pages zero but for a byte: LZ4 takes them to well under 1 % of their size
    assert results["encode_lz4_sparse_pages"]["wire_bytes_per_GiB"] < (1 << 30) // 100
    tables = [part for part in benchcore.format_report(results).renderables
              if hasattr(part, "row_count")]
    assert [t.columns[1].header for t in tables] == ["kernel (GB/s)", "kernel (ms)"]
    assert sum(t.row_count for t in tables) == len(results)


def test_every_row_names_its_ceiling_and_explains_a_ratio_above_one():
    cases = benchcore.zero_scan_cases(1 << 21) + benchcore.compression_cases(1 << 21)
    results = {case.name: benchcore.measure(case, 1) for case in cases}
    assert all(row["ceiling_name"] for row in results.values())
    assert results["encode_lz4_random_pages"]["ceiling_name"] == "the same encode without LZ4"
    # the early exit reads a line per page: faster than any full read, and said so
    assert "first cache line" in results["zero_scan_data_pages"]["note"]


def _table_rows(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The (header cells, row cells) of each rich table in ``text``."""
    tables, header, rows = [], None, []
    for line in text.splitlines():
        if line.startswith("┃"):
            header = [c.strip() for c in line.strip("┃").split("┃")]
            rows = []
            tables.append((header, rows))
        elif line.startswith("│") and header is not None:
            rows.append([c.strip() for c in line.strip("│").split("│")])
    return tables


def test_cli_bench_core_reports_as_it_goes_one_unit_per_column_and_names_each_ceiling():
    proc = subprocess.Popen([sys.executable, "-m", "pymig", "bench", "core", "--quick"],
                            env=dict(child_env(), COLUMNS="240"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()  # what it is about to measure, at once
        assert f"{benchcore.case_count()} benchmarks" in first, first
        result = proc.stderr.readline()
        assert re.match(rf"\[1/{benchcore.case_count()}\] zero_scan_all_zero: ", result), result
        assert proc.poll() is None  # reported while the other benchmarks still run
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    done = [int(m) for m in re.findall(r"^\[(\d+)/\d+\] ", result + err, re.M)]
    assert done == list(range(1, benchcore.case_count() + 1))

    tables = _table_rows(out)
    assert [t[0][1] for t in tables] == ["kernel (GB/s)", "kernel (ms)"]
    names = {}
    for header, rows in tables:
        unit = header[1][len("kernel ("):-1]
        assert header[:5] == ["benchmark", f"kernel ({unit})", "ceiling", f"ceiling ({unit})",
                              "x ceiling"]
        for cells in rows:
            float(cells[1]), float(cells[3])  # numbers alone: the unit is the column's
            assert cells[2] in (benchcore.READ_MEMORY, benchcore.READ_BITMAP,
                                benchcore.COPY_PAGES, "the same encode without LZ4"), cells
            assert re.fullmatch(r"\d+\.\d\dx", cells[4]), cells
            name, _, mark = cells[0].partition(" ")
            names[name] = mark
    assert len(names) == benchcore.case_count()
    # the early exit reads less than its ceiling by design, and a note says so
    mark = names["zero_scan_data_pages"]
    assert re.search(rf"^{re.escape(mark)} zero_scan_data_pages: .*first cache line", out,
                     re.M), out
    assert "x ceiling: the kernel's speed over its ceiling's" in out
