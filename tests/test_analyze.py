"""``pymig analyze`` on good and damaged streams."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _childenv import child_env
from _migration_helpers import guest_config, save_snapshot
from _wire_helpers import page_data, stream_of, stream_records
from pymig.analyze import analyze
from pymig.machine import CONFIG_IDSTR
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


def analyze_cli(path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pymig", "analyze", str(path), *extra],
                          capture_output=True, text=True, timeout=60, env=child_env())


def crafted(snapshot, tmp_path, change) -> tuple:
    """The snapshot's stream with ``change(record, payload) -> (record, payload)`` applied
    to each record (footers made right again); the path and the offset of the first record
    it changed."""
    path, _ = snapshot
    items = stream_records(path.read_bytes()[:stream_end(path.read_bytes())])
    changed = [change(record, payload) for record, payload in items]
    data = stream_of(changed)
    out = tmp_path / "crafted.pymig"
    out.write_bytes(data)
    first = next(i for i, (a, b) in enumerate(zip(items, changed)) if a != b)
    return out, stream_records(data)[first][0].offset


def test_an_idstr_that_looks_like_markup_is_printed_as_it_is(snapshot, tmp_path):
    """It raised rich's MarkupError: an idstr is data from the stream, never markup."""
    def rename(record, payload):
        if record.idstr == "cpu" and record.instance_id == 1:
            record = record._replace(idstr="[/]")
        return record, payload

    path, offset = crafted(snapshot, tmp_path, rename)
    out = analyze_cli(path)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 0, out.stderr  # a section nobody knows is no damage to report
    assert any(line.split()[:4] == [str(offset), "FULL", "2", "[/]"]
               for line in out.stdout.splitlines()), out.stdout
    for name in ("[bold]x[/]", ":smile:", "[link=x]y[/]"):
        def rename_to(record, payload, name=name):
            if record.idstr == "cpu" and record.instance_id == 1:
                record = record._replace(idstr=name)
            return record, payload

        path, _ = crafted(snapshot, tmp_path, rename_to)
        out = analyze_cli(path)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert name in out.stdout, out.stdout


@pytest.mark.parametrize("config", [
    b'"x"', b"[1, 2]", b"null", b"3",
    pytest.param(b"[" * 100_000, id="nested-too-deep-to-load"),
    # loads, but printing it again as JSON would go deeper than Python's recursion limit
    pytest.param(b'{"a": ' + b"[" * 980 + b"]" * 980 + b"}", id="nested-too-deep-to-print"),
    pytest.param(b'{"kind": "kvm", "vcpus": NaN}', id="not-a-number"),  # --json stays JSON
    pytest.param(b'{"kind": [], "memory_bytes": "lots", "vcpus": {}}', id="odd-values"),
])
def test_a_configuration_that_is_not_one_is_damage_with_its_offset(snapshot, tmp_path, config):
    """A configuration payload of ``"x"`` raised AttributeError; every one that is not a
    configuration is reported as damage, at the configuration's payload."""
    def replace(record, payload):
        return record, (config if record.idstr == CONFIG_IDSTR else payload)

    path, offset = crafted(snapshot, tmp_path, replace)
    payload_at = offset + 21 + len(CONFIG_IDSTR)  # the FULL record's header comes first
    out = analyze_cli(path)
    assert "Traceback" not in out.stderr, out.stderr
    json_out = analyze_cli(path, "--json")
    assert "Traceback" not in json_out.stderr, json_out.stderr
    report = json.loads(json_out.stdout)
    if b"lots" in config:  # an object, its values odd: described, not trusted
        assert out.returncode == 0 and json_out.returncode == 0
        assert "lots" in out.stdout and report["config"]["memory_bytes"] == "lots"
        return
    assert out.returncode == 1 and json_out.returncode == 1
    assert f"first problem at byte {payload_at}" in out.stdout
    assert report["first-problem"]["offset"] == payload_at
    assert "configuration" in report["first-problem"]["reason"]
    assert report["state"] == {} and report["complete"]
