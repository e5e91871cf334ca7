"""pymig.benchcore: the measuring helpers behind `pymig bench core`, on small buffers (the
figures themselves are not checked: the host is too noisy for timing assertions)."""

from __future__ import annotations

import pytest

from _core_helpers import needs_compiled
from pymig import benchcore

pytestmark = needs_compiled
KEYS = {"value", "unit", "ceiling", "ceiling_unit", "ratio", "target", "ok", "variant"}


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
    table = benchcore.format_table(results)
    assert table.row_count == len(results)
