"""The page-core benchmarks of pymig.benchcore under pytest-benchmark: each case's kernel
timed against its ceiling (read pass or memcpy) in the same run, ratio in extra_info."""

from __future__ import annotations

import pytest

from conftest import QUICK
from pymig import benchcore

MEMORY_BYTES, BITMAP_PAGES = benchcore.sizes(QUICK)
ZERO = ["zero_scan_all_zero", "zero_scan_data_pages"]
BITMAP = ["bitmap_runs_clear"] + [f"bitmap_{kind}_{d * 100:g}pct"
                                  for d in benchcore.DENSITIES for kind in ("runs", "indices")]
PACKET = ["encode_1MiB_packets", "decode_1MiB_packets"]
COMPRESSION = ["encode_lz4_sparse_pages", "encode_lz4_random_pages", "decode_lz4_sparse_pages"]


def _by_name(cases):
    return {case.name: case for case in cases}


@pytest.fixture(scope="module")
def zero_cases():
    return _by_name(benchcore.zero_scan_cases(MEMORY_BYTES))


@pytest.fixture(scope="module")
def bitmap_cases():
    return _by_name(benchcore.bitmap_cases(BITMAP_PAGES))


@pytest.fixture(scope="module")
def packet_cases():
    return _by_name(benchcore.packet_cases(MEMORY_BYTES))


@pytest.fixture(scope="module")
def compression_cases():
    return _by_name(benchcore.compression_cases(MEMORY_BYTES))


@pytest.mark.parametrize("name", ZERO)
def test_zero_scan(run_case, zero_cases, name):
    row = run_case(zero_cases[name])
    assert row["value"] > 0 and row["ceiling"] > 0


@pytest.mark.parametrize("name", BITMAP)
def test_bitmap_scan(run_case, bitmap_cases, name):
    row = run_case(bitmap_cases[name])
    assert row["value"] > 0 and row["ceiling"] > 0


@pytest.mark.parametrize("name", PACKET)
def test_packets(run_case, packet_cases, name):
    row = run_case(packet_cases[name])
    assert row["value"] > 0 and row["ceiling"] > 0


@pytest.mark.parametrize("name", COMPRESSION)
def test_compression(run_case, compression_cases, name):
    row = run_case(compression_cases[name])
    assert row["value"] > 0 and row["ceiling"] > 0
