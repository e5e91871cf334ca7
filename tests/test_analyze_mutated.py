"""``pymig analyze`` on whatever bytes it is given: real snapshots (a simulated guest's and a
KVM guest's, restore index included) cut short, with bytes flipped, overwritten, inserted or
taken out, and with records rewritten (footers made right again) to say what a crafted
stream may: any idstr, any JSON for the configuration and the RAM block list, any payload.
Both reports, for people and ``--json``, end in a clean report and exit code: 0 for a
complete, intact stream, 1 otherwise; never a traceback.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _migration_helpers import guest_config, save_snapshot
from _wire_helpers import stream_of, stream_records
from pymig.cli import main
from pymig.stream import RecordType

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
    | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)
#: idstrs as a stream may carry them: ASCII, 1..255 bytes, markup and emoji codes included
IDSTRS = st.one_of(
    st.sampled_from(["[/]", "[bold]", "[/bold]x", ":smile:", "[link=file:///]x", "\\[", "cpu",
                     "ram", "pymig.config", "serial", "a20", "control"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=1, max_size=255))
#: keys a configuration or a block list usually has, to reach past the first check
CONFIG_KEYS = ["kind", "memory_bytes", "vcpus", "workload", "params", "blocks"]
BLOCK_KEYS = ["id", "size", "page_size", "name", "gpa"]


@pytest.fixture(scope="module", params=[
    pytest.param("simulated", id="simulated"),
    pytest.param("kvm", id="kvm", marks=pytest.mark.kvm),
])
def saved(request, tmp_path_factory) -> tuple[bytes, list]:
    path = tmp_path_factory.mktemp(f"mutated-{request.param}") / "guest.pymig"
    save_snapshot(path, guest_config(request.param, vcpus=2))
    data = path.read_bytes()
    return data, stream_records(data)


@st.composite
def rewritten(draw, records: list) -> bytes:
    """The stream with a few of its records saying something else (framing kept right)."""
    items = list(records)
    for _ in range(draw(st.integers(1, 3))):
        # (the EOF record stays; the few named records, the config among them, come often)
        named = [i for i, (r, _) in enumerate(items[:-1]) if r.idstr is not None]
        i = draw(st.sampled_from(named) | st.integers(0, len(items) - 2))
        record, payload = items[i]
        how = draw(st.sampled_from(["idstr", "json", "config", "blocks", "payload", "drop",
                                    "repeat", "type"]))
        if how == "idstr" and record.idstr is not None:
            record = record._replace(idstr=draw(IDSTRS))
        elif how == "json":
            payload = json.dumps(draw(JSON)).encode()
        elif how == "config":
            payload = json.dumps(draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON,
                                                      max_size=6))).encode()
        elif how == "blocks":
            block = st.dictionaries(st.sampled_from(BLOCK_KEYS),
                                    JSON | st.integers(-1, 1 << 40), max_size=5)
            payload = json.dumps(draw(st.lists(block, max_size=3))).encode()
        elif how == "payload":
            payload = draw(st.binary(max_size=200))
        elif how == "drop":
            del items[i]
            continue
        elif how == "repeat":
            items.insert(i, (record, payload))
            continue
        elif how == "type" and record.type is not RecordType.EOF:
            kind = draw(st.sampled_from([RecordType.START, RecordType.PART, RecordType.END,
                                         RecordType.FULL]))
            named = kind in (RecordType.START, RecordType.FULL)
            record = record._replace(type=kind, idstr=(record.idstr or "x") if named else None,
                                     instance_id=record.instance_id or 0 if named else None,
                                     version_id=record.version_id or 1 if named else None)
        items[i] = (record, payload)
    return stream_of(items)


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` with a few byte-level changes, the index after the stream included."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if how == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=32))
            out[at:at + len(chunk)] = chunk
        elif how == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif how == "delete":
            del out[at:at + draw(st.integers(1, 64))]
        elif how == "truncate":
            del out[at:]
    return bytes(out)


@st.composite
def mutated(draw, saved) -> bytes:
    data, records = saved
    kind = draw(st.sampled_from(["rewritten", "damaged", "both"]))
    if kind in ("rewritten", "both"):
        data = draw(rewritten(records))
    if kind in ("damaged", "both"):
        data = draw(damaged(data))
    return data


def analyze_cli(data: bytes, *extra: str):
    fd, path = tempfile.mkstemp(suffix=".pymig")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return CliRunner().invoke(main, ["analyze", path, *extra])
    finally:
        os.unlink(path)


def strict(constant: str):
    raise AssertionError(f"--json printed {constant}, which is not JSON")


def assert_clean(result) -> None:
    """The command ended by its own exit code, with no exception and no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        "".join(__import__("traceback").format_exception(result.exception))
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large], deadline=None)
@given(data=st.data())
def test_analyze_reports_any_stream_without_a_traceback(saved, data):
    stream = data.draw(mutated(saved))
    human = analyze_cli(stream)
    assert_clean(human)
    assert human.output.startswith("pymig stream, version")
    machine = analyze_cli(stream, "--json")
    assert_clean(machine)
    report = json.loads(machine.output, parse_constant=strict)
    assert machine.exit_code == (0 if report["ok"] else 1) == human.exit_code
    if not report["ok"] and report["problems"]:
        first = report["first-problem"]
        assert isinstance(first["offset"], int) and 0 <= first["offset"] <= len(stream) + 64
        assert f"first problem at byte {first['offset']}" in human.output


def test_the_saved_streams_themselves_are_intact(saved):
    """(What the mutations start from is a complete, intact snapshot.)"""
    result = analyze_cli(saved[0], "--json")
    assert result.exit_code == 0 and json.loads(result.output)["ok"], result.output
