"""A destination refuses a damaged or foreign stream, names what is wrong, and never starts."""

from __future__ import annotations

import json

import pytest

from _migration_helpers import ANY_KIND, guest_config, save_snapshot
from _wire_helpers import page_data
from pymig import stream
from pymig.errors import MigrationError
from pymig.incoming import Incoming
from pymig.transport import BytesChannel


@pytest.fixture(scope="module")
def saved_stream(tmp_path_factory):
    """The bytes of a whole migration of a running self-checking guest."""
    path = tmp_path_factory.mktemp("stream") / "guest.pymig"
    save_snapshot(path, guest_config("simulated", vcpus=2))
    return path.read_bytes()


def records(data: bytes) -> list[tuple[stream.RecordHeader, bytes]]:
    reader = stream.StreamReader(BytesChannel(data))
    reader.read_header()
    out = []
    while True:
        record = reader.next_record()
        payload = bytes(reader.read_payload()) if record.payload_len else b""
        out.append((record, payload))
        if record.type == stream.RecordType.EOF:
            return out


def rewrite(items) -> bytes:
    channel = BytesChannel()
    writer = stream.StreamWriter(channel)
    writer.write_header()
    for record, payload in items:
        t = record.type
        if t == stream.RecordType.EOF:
            writer.eof()
        elif t in (stream.RecordType.START, stream.RecordType.FULL):
            method = writer.start if t == stream.RecordType.START else writer.full
            method(record.section_id, record.idstr, record.instance_id, record.version_id,
                   payload, nocsum=record.nocsum)
        else:
            method = writer.part if t == stream.RecordType.PART else writer.end
            method(record.section_id, payload, nocsum=record.nocsum)
    return channel.getvalue()


def load(tmp_path, data: bytes) -> Incoming:
    path = tmp_path / "stream.pymig"
    path.write_bytes(data)
    incoming = Incoming(f"file:{path}", limits=ANY_KIND)
    with pytest.raises(MigrationError) as info:
        incoming.run()
    assert incoming.machine is None, "a destination that failed kept a guest"
    assert incoming.status == "failed"
    incoming.failure = str(info.value)
    return incoming


def test_the_saved_stream_itself_loads(tmp_path, saved_stream):
    path = tmp_path / "ok.pymig"
    path.write_bytes(saved_stream)
    result = Incoming(f"file:{path}", limits=ANY_KIND).run()
    try:
        assert result.machine.guest.status == "running"
    finally:
        result.machine.close()


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.7, 0.999])
def test_truncated_stream_is_refused(tmp_path, saved_stream, fraction):
    cut = max(1, int(len(saved_stream) * fraction))
    incoming = load(tmp_path, saved_stream[:cut])
    assert any(word in incoming.failure for word in ("truncated", "closed", "ended")), \
        incoming.failure


def test_flipped_bit_in_ram_is_refused_by_its_checksum(tmp_path, saved_stream):
    items = records(saved_stream)
    index, (offset, length) = next(
        (i, span) for i, (r, p) in enumerate(items) if r.type == stream.RecordType.PART
        for span in page_data(p))
    record, payload = items[index]
    damaged = bytearray(payload)
    damaged[offset + length // 2] ^= 0x10
    items[index] = (record, bytes(damaged))
    incoming = load(tmp_path, rewrite(items))
    assert "checksum" in incoming.failure, incoming.failure


def test_flipped_bit_in_device_state_is_refused_by_its_footer(tmp_path, saved_stream):
    data = bytearray(saved_stream)
    items = records(saved_stream)
    cpu = next(r for r, p in items if r.idstr == "cpu")
    data[cpu.offset + 30] ^= 0x01  # inside the cpu section's payload
    incoming = load(tmp_path, bytes(data))
    assert "checksum" in incoming.failure


def test_wrong_stream_version_is_refused(tmp_path, saved_stream):
    data = bytearray(saved_stream)
    data[8:12] = (7).to_bytes(4, "little")
    incoming = load(tmp_path, bytes(data))
    assert "version 7" in incoming.failure


def test_newer_section_version_is_refused_naming_the_entry(tmp_path, saved_stream):
    items = [(r._replace(version_id=9) if r.idstr == "cpu" else r, p)
             for r, p in records(saved_stream)]
    incoming = load(tmp_path, rewrite(items))
    assert "cpu" in incoming.failure and "version 9" in incoming.failure


def test_wrong_ram_size_is_refused(tmp_path, saved_stream):
    items = records(saved_stream)
    record, payload = items[0]
    config = json.loads(payload)
    config["memory_bytes"] *= 2
    config["blocks"][0]["size_bytes"] *= 2
    items[0] = (record, json.dumps(config).encode())
    incoming = load(tmp_path, rewrite(items))
    assert "RAM layout differs" in incoming.failure


def test_unknown_section_is_refused_naming_it(tmp_path, saved_stream):
    items = records(saved_stream)
    record = items[-2][0]._replace(type=stream.RecordType.FULL, idstr="floppy",
                                   instance_id=0, version_id=1, section_id=77)
    items.insert(len(items) - 1, (record, b"\x00"))
    incoming = load(tmp_path, rewrite(items))
    assert "unknown section 'floppy'" in incoming.failure


def test_stream_without_vcpu_state_is_refused(tmp_path, saved_stream):
    items = [(r, p) for r, p in records(saved_stream) if not (r.idstr == "cpu"
                                                             and r.instance_id == 1)]
    incoming = load(tmp_path, rewrite(items))
    assert "cpu/1" in incoming.failure


def test_not_a_stream_is_refused(tmp_path):
    incoming = load(tmp_path, b"GET / HTTP/1.1\r\n\r\n" + bytes(100))
    assert "not a pymig migration stream" in incoming.failure
