"""The fuzzing harnesses (pymig.fuzz): a short run of every one, the machinery they stand on
(repairs, the record-aware mutator, guarded guest RAM, the harnesses' own checks), and every
saved crash reproducer replayed."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _childenv import child_env
from pymig import core, stream
from pymig.errors import PacketError, StreamError
from pymig.fuzz import TARGETS, _harness, mutate, repair
from pymig.fuzz import control as control_harness
from pymig.fuzz import packet as packet_harness
from pymig.fuzz import seeds as fuzz_seeds
from pymig.fuzz.guarded import GUARD_BYTES, Pool
from pymig.guest.base import pc_layout
from pymig.transport import BytesChannel

CRASHES = Path(__file__).resolve().parent.parent / "fuzz" / "crashes"
SMOKE_SECONDS_PER_TARGET = 5
MiB = 1 << 20


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> bytes:
    """A live snapshot of a small simulated guest (stream, then index)."""
    name, config, params = fuzz_seeds.SIMULATED[1]
    return fuzz_seeds.snapshot(config, tmp_path_factory.mktemp("fuzz") / "guest.pymig", params)


def records_of(data: bytes) -> list:
    reader = stream.StreamReader(BytesChannel(data))
    reader.read_header()
    found = []
    while True:
        record = reader.next_record()
        found.append(record)
        if record.type == stream.RecordType.EOF:
            return found
        reader.skip_payload()


# -- the smoke run (CI) -------------------------------------------------------------------------

@pytest.mark.slow
def test_every_harness_runs_a_few_seconds_without_a_crash(tmp_path):
    artifacts, summary = tmp_path / "artifacts", tmp_path / "summary.json"
    before = set(os.listdir(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "pymig.fuzz", "run", "--quick-seeds",
         "--seconds", str(SMOKE_SECONDS_PER_TARGET), "--artifacts", str(artifacts),
         "--summary", str(summary), "--", "-seed=1"],
        capture_output=True, text=True, timeout=400, env=child_env(), cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in TARGETS]
    assert proc.returncode == 0, "\n".join([*lines, proc.stdout[-4000:], proc.stderr[-2000:]])
    results = {r["target"]: r for r in json.loads(summary.read_text())["results"]}
    assert list(results) == list(TARGETS)
    for target, result in results.items():
        assert result["executions"] > 0 and result["cov"] > 0, (target, result)
        assert result["crashes"] == [] and result["exit_code"] == 0, (target, result)
    # nothing left behind but what was asked for: no crashes, so no artifacts either
    assert set(os.listdir(tmp_path)) - before == {"summary.json"}


# -- repairs and the mutator ------------------------------------------------------------------

def test_repair_makes_every_footer_and_packet_checksum_right_again(snapshot):
    damaged = bytearray(snapshot)
    for record in records_of(snapshot)[:-1]:
        start = record.offset + 12 + (1 + len(record.idstr) + 8 if record.idstr else 0)
        end = start + record.payload_len
        if record.type == stream.RecordType.PART:
            damaged[start + 24] ^= 0xFF  # a RAM packet's own checksum
        elif record.payload_len:
            damaged[end - 1] ^= 0xFF  # the payload's last byte
        damaged[end + 8] ^= 0xFF  # and the footer's checksum
    damaged = bytes(damaged)
    with pytest.raises(StreamError):
        records_of(damaged)
    fixed = repair.everything(damaged)
    assert [r.type for r in records_of(fixed)] == [r.type for r in records_of(snapshot)]
    for payload in _ram_packets(fixed):  # packets decode again: their checksums are right
        info = core.packet_info(payload)
        mem = np.zeros(4 * MiB, dtype=np.uint8)
        core.decode_packet(payload, mem, info.page_size, info.block_id, 1024)
    from pymig.transport import file as snapshot_file

    end = records_of(fixed)[-1].offset + 28
    assert snapshot_file.decode_index(fixed[end:], end).stream_bytes == end


def _ram_packets(data: bytes) -> list[bytes]:
    reader = stream.StreamReader(BytesChannel(data))
    reader.read_header()
    packets = []
    while (record := reader.next_record()).type != stream.RecordType.EOF:
        payload = bytes(reader.read_payload())
        if record.type == stream.RecordType.PART:
            packets.append(payload)
    assert packets
    return packets


def test_the_mutator_takes_a_stream_apart_and_frames_what_it_changed(snapshot):
    header, records, tail = mutate.split(snapshot)
    assert mutate.join(header, records, tail) == snapshot
    records[1] = mutate.Record(records[1].head, records[1].payload + b"more")
    longer = mutate.join(header, records, tail)
    assert records_of(longer)[1].payload_len == len(records[1].payload)
    custom = mutate.stream_mutator(lambda data, size: bytes(data) + b"!")
    framed = sum(1 for seed in range(50)
                 if records_of_or_none(custom(snapshot, 1 << 20, seed)) is not None)
    assert framed >= 25  # most mutations keep the framing right


def records_of_or_none(data: bytes):
    try:
        return records_of(data)
    except Exception:  # noqa: BLE001 - a broken framing is what is counted
        return None


# -- guarded guest RAM --------------------------------------------------------------------------

def test_guarded_ram_is_zeroed_when_reused():
    pool = Pool()
    (block,) = pool.allocate(pc_layout(MiB))
    block.array[:] = 7
    address = block.address
    block.close()
    (again,) = pool.allocate(pc_layout(MiB))
    assert again.address == address and not again.array.any()


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_write_just_outside_guarded_ram_faults(where):
    offset = "-1" if where == "before" else "block.size_bytes"
    code = ("import ctypes; from pymig.fuzz.guarded import Pool; "
            "from pymig.guest.base import pc_layout; "
            "(block,) = Pool().allocate(pc_layout(1 << 20)); "
            f"ctypes.memset(block.address + {offset}, 1, 1); print('written')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert proc.returncode == -11 and "written" not in proc.stdout, proc
    assert GUARD_BYTES >= 4096


# -- the harnesses' own checks find what they are for -------------------------------------------

def _encoded_packet() -> bytes:
    mem = np.zeros(8 * 4096, dtype=np.uint8)
    mem[4096:2 * 4096] = 9
    bitmap = core.new_bitmap(8)
    core.bitmap_set_range(bitmap, 8, 0, 8)
    out = bytearray(1 << 16)
    result = core.encode_packet(mem, 4096, 0, bitmap, 8, 0, out)
    return bytes(out[:result.nbytes])


def test_the_packet_harness_passes_a_good_packet():
    packet_harness.setup()
    packet_harness.test_one_input(packet_harness.PARAMS.pack(1, 7, 0) + _encoded_packet())


@pytest.mark.parametrize("bug", ["past the end", "on refusal", "disagreeing"])
def test_the_packet_harness_catches_a_decoder_that_misbehaves(monkeypatch, bug):
    packet_harness.setup()
    real = packet_harness._backends[0]

    class Broken:
        backend = "broken"

        @staticmethod
        def decode_packet(packet, mem, page_size, block_id, npages, present=None):
            result = real.decode_packet(packet, mem, page_size, block_id, npages, present)
            view = np.frombuffer(mem, dtype=np.uint8)
            if bug == "past the end":
                ctypes.memset(view.ctypes.data + len(view), 0, 1)
            elif bug == "on refusal":
                view[0] ^= 1
                raise PacketError(0, "refused after all")
            else:
                view[-1] ^= 1
            return result

    monkeypatch.setattr(packet_harness, "_backends", [Broken, real])
    with pytest.raises(_harness.Finding):
        packet_harness.test_one_input(packet_harness.PARAMS.pack(2, 7, 0) + _encoded_packet())


def test_the_control_harness_catches_a_splitter_that_cuts_by_piece(monkeypatch):
    text = b'\x03{"execute": "qmp_capabilities"}{"execute": "query-status"}'
    control_harness.test_one_input(text)
    real_feed = control_harness.MessageSplitter.feed

    def forgetful(self, data):  # loses a text that ends on a piece's last byte
        texts = real_feed(self, data)
        return texts[:-1] if len(data) < 4 else texts

    monkeypatch.setattr(control_harness.MessageSplitter, "feed", forgetful)
    with pytest.raises(_harness.Finding):
        control_harness.test_one_input(text)


def test_a_recording_harness_leaves_the_input_it_runs(tmp_path):
    seen = []
    path = tmp_path / "last"
    recorded = _harness._recording(lambda data: seen.append(path.read_bytes()), str(path))
    recorded(b"a longer input")
    recorded(b"short")
    assert seen == [b"a longer input", b"short"]


# -- saved reproducers --------------------------------------------------------------------------

OPEN = pytest.mark.xfail(strict=True, reason="a known crash, fixed outside the fuzzing work: "
                                             "once it replays clean, move it out of open/")


def _reproducers() -> list:
    """Every saved crash: ``fuzz/crashes/<target>/NAME`` must replay clean; those in
    ``fuzz/crashes/<target>/open/`` still crash (each listed in fuzz/crashes/README.md)."""
    params = []
    for target in TARGETS:
        for path in sorted((CRASHES / target).glob("*")) + sorted(
                (CRASHES / target / "open").glob("*")):
            if path.is_file():
                marks = [OPEN] if path.parent.name == "open" else []
                params.append(pytest.param(target, path, marks=marks,
                                           id=str(path.relative_to(CRASHES))))
    return params


@pytest.mark.parametrize("target, path", _reproducers())
def test_a_saved_crash_replays_clean(target, path):
    proc = subprocess.run([sys.executable, "-m", "pymig.fuzz", "repro", target, str(path)],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
