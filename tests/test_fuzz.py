"""The fuzzing harnesses (pymig.fuzz): a short run of every one, the machinery they stand on
(repairs, the record-aware mutator, guarded guest RAM, the harnesses' own checks), and every
saved crash reproducer replayed."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from _childenv import child_env
from pymig import core, stream, vmstate
from pymig.errors import PacketError, StreamError
from pymig.fuzz import TARGETS, _harness, mutate, repair
from pymig.fuzz import control as control_harness
from pymig.fuzz import packet as packet_harness
from pymig.fuzz import seeds as fuzz_seeds
from pymig.fuzz import state as state_harness
from pymig.fuzz import streamload
from pymig.fuzz.guarded import GUARD_BYTES, Pool
from pymig.guest import GuestConfig
from pymig.guest.layout import pc_layout
from pymig.guest.simulated import SimulatedGuest
from pymig.ram import RamLoader
from pymig.transport import BytesChannel

CRASHES = Path(__file__).resolve().parent.parent / "fuzz" / "crashes"
SMOKE_SECONDS_PER_TARGET = 4
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

@pytest.fixture(scope="module")
def quick_seeds(tmp_path_factory) -> Path:
    """The smoke run's seed corpora (SEEDS/<target>/), made once."""
    seeds = tmp_path_factory.mktemp("fuzz-seeds")
    fuzz_seeds.generate(seeds, quick=True)
    return seeds


def _run(tmp_path: Path, seeds: Path, *args: str, **env: str) -> tuple:
    """``python -m pymig.fuzz run`` in ``tmp_path`` over ``seeds``: (process, summary by
    target)."""
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pymig.fuzz", "run", "--seeds", str(seeds),
         "--artifacts", str(tmp_path / "artifacts"), "--summary", str(summary), *args,
         "--", "-seed=1"],
        capture_output=True, text=True, timeout=400, env=child_env(**env), cwd=tmp_path)
    results = ({r["target"]: r for r in json.loads(summary.read_text())["results"]}
               if summary.exists() else {})
    return proc, results


@pytest.mark.slow
def test_every_harness_runs_a_few_seconds_without_a_crash(tmp_path, quick_seeds):
    before = set(os.listdir(tmp_path))
    proc, results = _run(tmp_path, quick_seeds, "--seconds", str(SMOKE_SECONDS_PER_TARGET))
    lines = [line for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in TARGETS]
    assert proc.returncode == 0, "\n".join([*lines, proc.stdout[-4000:], proc.stderr[-2000:]])
    assert list(results) == list(TARGETS)
    for target, result in results.items():
        assert result["executions"] > 0 and result["cov"] > 0, (target, result)
        assert result["crashes"] == [] and result["exit_code"] == 0, (target, result)
    # nothing left behind but what was asked for: no crashes, so no artifacts either
    assert set(os.listdir(tmp_path)) - before == {"summary.json"}


PLANTED = """
import ctypes, signal, threading
import pymig.control, pymig.guest.simulated

handle = pymig.control._Client.handle
def planted_handle(self, text):
    if b"query-status" in text:
        raise RuntimeError("planted")
    return handle(self, text)
pymig.control._Client.handle = planted_handle

resume = pymig.guest.simulated.SimulatedGuest.resume
def planted_resume(self):
    def fault():  # as a writer thread faults: every signal blocked, libFuzzer never hears
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        ctypes.memset(16, 1, 1)
    thread = threading.Thread(target=fault)
    thread.start()
    thread.join()
    return resume(self)
pymig.guest.simulated.SimulatedGuest.resume = planted_resume
"""


@pytest.mark.slow
def test_the_smoke_run_fails_on_a_planted_crash(tmp_path, quick_seeds):
    """An exception a target lets out, and a fault in a thread that blocks every signal (as
    the simulated guest's vCPUs do), each fail the run and leave an input that replays."""
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(PLANTED)
    planted = {"PYTHONPATH": os.pathsep.join([str(plant), child_env()["PYTHONPATH"]])}
    proc, results = _run(tmp_path, quick_seeds, "--seconds", "5", "--targets",
                         "stream,control", **planted)
    assert proc.returncode == 1, proc.stdout[-4000:]
    (control_crash,) = results["control"]["crashes"]
    (stream_crash,) = results["stream"]["crashes"]
    assert Path(control_crash).name.startswith("crash-")
    assert Path(stream_crash).name.startswith("crash-signal11-")
    for target, crash in (("control", control_crash), ("stream", stream_crash)):
        again = subprocess.run([sys.executable, "-m", "pymig.fuzz", "repro", target, crash],
                               capture_output=True, text=True, timeout=120,
                               env=child_env(**planted))
        assert again.returncode != 0, again.stdout
        clean = subprocess.run([sys.executable, "-m", "pymig.fuzz", "repro", target, crash],
                               capture_output=True, text=True, timeout=120, env=child_env())
        assert clean.returncode == 0, clean.stdout + clean.stderr


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


# -- the harnesses get past the refusals, to what they are for -----------------------------------

def _spy(monkeypatch, cls, name: str, calls: Counter) -> None:
    real = getattr(cls, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, name, counted)


def test_the_stream_harness_loads_a_real_snapshot_and_runs_its_guest(snapshot, monkeypatch):
    """The harness's destination sets its own limits: with the defaults, a KVM host would
    refuse every simulated stream, and the fuzzer would see nothing but that refusal."""
    calls = Counter()
    for cls, name in ((RamLoader, "load_part"), (SimulatedGuest, "load_state"),
                      (SimulatedGuest, "resume")):
        _spy(monkeypatch, cls, name, calls)
    streamload.test_one_input(snapshot)
    assert calls["load_part"] >= 1 and calls["load_state"] >= 1 and calls["resume"] == 1, calls


def test_the_state_harness_takes_every_payload_of_a_real_snapshot(snapshot):
    """Each vCPU payload and the configuration fit the guest the harness loads them into."""
    state_harness.setup()
    entries = state_harness.entries()
    seeds = fuzz_seeds.state_seeds({"sim-selfcheck": snapshot})
    assert len(seeds) == 2
    for seed in seeds:
        index, version = state_harness.HEAD.unpack_from(seed)
        entry = entries[index % len(entries)]
        payload = seed[state_harness.HEAD.size:]
        if entry.vmsd is None:
            config = GuestConfig.from_dict(json.loads(payload))
            state_harness.destination.check_config(config)
            assert state_harness.destination.builds(config)
        else:
            vmstate.load(entry.vmsd, entry.vmsd.factory(), payload, version, entry.shape)


def _tcp(token: str) -> bytes:
    return bytes([control_harness.TCP]) + (
        b'{"execute": "qmp_capabilities", "arguments": {"token": "%s"}}\n'
        b'{"execute": "query-status", "id": 1}\n' % token.encode())


def test_the_control_harness_gets_past_the_tcp_handshake_with_its_token():
    good, bad = _tcp(control_harness.TOKEN), _tcp("0" * 64)
    answers = control_harness._converse(good[0], good[1:], [len(good)])
    assert [json.loads(a).get("id") for a in answers] == [None, 1]
    assert "return" in json.loads(answers[1])
    (refusal,) = control_harness._converse(bad[0], bad[1:], [len(bad)])
    assert "Authentication failed" in refusal
    control_harness.test_one_input(good)
    control_harness.test_one_input(bad)


def test_the_control_harness_catches_a_handshake_that_lets_a_stranger_in(monkeypatch):
    monkeypatch.setattr(control_harness._Server, "check_token", lambda self, given, needed: None)
    with pytest.raises(_harness.Finding):
        control_harness.test_one_input(_tcp("0" * 64))


def test_the_state_harness_carries_a_disk_transfer_on_inside_the_disk_only():
    """A WRITE SECTORS in flight on the slave's last sector is carried on; the same one
    sector further (the slave has 63) is refused by the drive's bounds, and were it not, the
    harness would reach the image outside the disk."""
    from pymig.kvm import ata, statedesc

    state_harness.setup()
    (entry,) = [e for e in state_harness.entries() if e.name == "kvm:ide-drive/1"]
    last = state_harness.destination.DISK_SECTORS[1] - 1
    good = ata.IdeDriveState(status=ata.IDLE_STATUS | ata.DRQ, xfer=ata.XFER_OUT,
                             command=ata.WRITE_SECTORS, lba=last, end_lba=last + 1,
                             buffer=bytearray(512))
    beyond = dataclasses.replace(good, lba=last + 1, end_lba=last + 2)
    for state in (good, beyond):
        state_harness.test_one_input(state_harness.make_input(
            entry.name, 1, vmstate.save(statedesc.IDE_DRIVE, state)))
    entry.apply(dataclasses.replace(good, buffer=bytearray(512)))
    with pytest.raises(ValueError, match="outside"):
        entry.apply(dataclasses.replace(beyond, buffer=bytearray(512)))


def test_the_index_harness_catches_an_index_that_restores_another_guest(snapshot, monkeypatch):
    """An index that skips a RAM record whose pages no later record holds is refused; were it
    let through, the guest restored through it would differ."""
    from pymig.fuzz import index as index_harness
    from pymig.transport import file as snapshot_file
    from pymig.transport.snapshot_index import IndexCheck, SnapshotIndex

    records = records_of(snapshot)
    stream_bytes = records[-1].offset + 28
    whole = streamload.restored(snapshot[:stream_bytes])
    for i in reversed(range(len(records) - 1)):  # a RAM record that matters (not all zero)
        start, end = records[i].offset, records[i + 1].offset
        without = streamload.restored(snapshot[:start] + snapshot[end:stream_bytes])
        if records[i].type == stream.RecordType.PART and without not in (None, whole):
            break
    else:
        pytest.fail("no RAM record of the snapshot changes the guest")
    crafted = snapshot[:stream_bytes] + SnapshotIndex(stream_bytes, [(start, end - start)]).encode()
    index_harness.test_one_input(crafted)  # the index does not hold: refused, cleanly
    monkeypatch.setattr(snapshot_file.IndexedFileChannel, "_skip",
                        lambda self, offset, length: self.tap.skip(length))
    monkeypatch.setattr(IndexCheck, "finish", lambda self: None)
    with pytest.raises(_harness.Finding, match="another guest"):
        index_harness.test_one_input(crafted)


def test_the_returnpath_harness_migrates_as_its_destination_says(monkeypatch):
    from pymig.fuzz import returnpath

    ends, errors = [], []
    check = returnpath._check
    monkeypatch.setattr(returnpath, "_check", lambda migration, guest, data: (
        ends.append((migration.status.value, guest.status)),
        errors.append(migration.query().get("error-desc")), check(migration, guest, data)))
    through, refused = fuzz_seeds.returnpath_seeds()[:2]
    returnpath.test_one_input(through)
    returnpath.test_one_input(refused)
    returnpath.test_one_input(b"")  # a destination that says nothing and goes
    assert ends == [("completed", "paused"), ("failed", "running"), ("failed", "running")], errors
    # the custom mutator changes the conversation and keeps every message framed right
    custom = returnpath.mutator(lambda data, size: bytes(data) + b"!")
    mutated = [custom(through, 4096, seed) for seed in range(50)]
    framed = [m for m in mutated if b"".join(
        stream.RP_HEAD.pack(kind, 0, len(payload)) + payload
        for kind, payload in returnpath._split(m)) == m]
    assert len(returnpath._split(through)) == 5
    assert len(framed) >= 25 and len(set(framed) - {through}) >= 10


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
