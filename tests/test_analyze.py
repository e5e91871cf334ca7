"""``pymig analyze`` on good and damaged streams."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _childenv import child_env
from _migration_helpers import guest_config, save_snapshot
from _wire_helpers import page_data
from pymig.analyze import analyze
from pymig.transport import BytesChannel


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    path = tmp_path_factory.mktemp("analyze") / "guest.pymig"
    return path, save_snapshot(path, guest_config("simulated", vcpus=2))


def test_a_good_stream_is_described_completely(snapshot):
    path, stats = snapshot
    result = analyze(BytesChannel(path.read_bytes()))
    assert result.ok and result.complete and not result.problems
    assert result.bytes_read == path.stat().st_size
    assert result.config["kind"] == "simulated" and result.config["vcpus"] == 2
    named = [(s["type"], s["idstr"], s["instance"]) for s in result.sections
             if s["type"] != "PART"]
    assert named == [("FULL", "pymig.config", 0), ("START", "ram", 0), ("END", "ram", 0),
                     ("FULL", "cpu", 0), ("FULL", "cpu", 1), ("EOF", "-", None)]
    assert result.ram.normal_pages == stats["ram"]["normal"]
    assert result.ram.zero_pages == stats["ram"]["duplicate"]
    assert result.ram.checksum_failures == 0
    assert set(result.state) == {"cpu/0", "cpu/1"}
    assert result.state["cpu/1"]["index"] == 1


def test_damaged_ram_is_counted_and_the_rest_still_analysed(snapshot):
    path, _ = snapshot
    data = bytearray(path.read_bytes())
    good = analyze(BytesChannel(bytes(data)))
    part = next(s for s in good.sections if s["type"] == "PART")
    header = 12  # a PART record header (type, flags, reserved, id, length); then the packet
    packet = bytes(data[part["offset"] + header:part["offset"] + header + part["size"]])
    offset, length = page_data(packet)[0]
    flip_at = part["offset"] + header + offset + length // 2  # inside the bytes of pages
    data[flip_at] ^= 0x40
    result = analyze(BytesChannel(bytes(data)))
    assert result.complete and not result.ok
    assert result.problems[0].offset == part["offset"] + header + 24
    assert "checksum" in result.problems[0].reason
    assert result.ram.checksum_failures == 1
    assert set(result.state) == {"cpu/0", "cpu/1"}  # analysed past the damage


def stream_end(data: bytes) -> int:
    """Where the stream ends in a snapshot file (its restore index follows)."""
    eof = analyze(BytesChannel(data)).sections[-1]
    assert eof["type"] == "EOF"
    return eof["offset"] + 12 + 16


def test_truncated_stream_reports_where_it_ends(snapshot):
    path, _ = snapshot
    data = path.read_bytes()
    cut = stream_end(data) - 100
    result = analyze(BytesChannel(data[:cut]))
    assert not result.complete and not result.ok
    assert result.problems[-1].offset == cut
    assert "truncated" in result.problems[-1].reason


def test_cli_reads_stdin_and_prints_json(snapshot):
    path, _ = snapshot
    with open(path, "rb") as handle:
        out = subprocess.run([sys.executable, "-m", "pymig", "analyze", "-", "--json"],
                             stdin=handle, capture_output=True, text=True, timeout=60,
                             env=child_env())
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["ram"]["checksum-failures"] == 0
    assert report["first-problem"] is None


def test_cli_exits_non_zero_on_damage_and_names_the_offset(snapshot, tmp_path):
    path, _ = snapshot
    damaged = tmp_path / "damaged.pymig"
    damaged.write_bytes(path.read_bytes()[:5000])
    out = subprocess.run([sys.executable, "-m", "pymig", "analyze", str(damaged)],
                         capture_output=True, text=True, timeout=60, env=child_env())
    assert out.returncode == 1
    assert "first problem at byte 5000" in out.stdout
