"""Seed corpora from real streams: ``python -m pymig.fuzz seeds DIR``.

Each guest kind runs for a moment and is saved live as a ``file:`` snapshot (small guests, so
the seeds stay small): simulated guests of every workload (idle, dirtier, selfcheck, compute;
one snapshot without compression, one of a guest that dirties pages while it is saved so the
index has ranges to skip) and, where /dev/kvm works, a KVM guest of a built-in workload and one
running a boot sector.  Every target's seeds come out of those snapshots:

* ``stream``, ``analyze``, ``index``: the snapshots themselves;
* ``packet``: RAM packets from them (every distinct one up to :data:`MAX_PACKET_SEED_BYTES`)
  and a few encoded here from pages of each kind, each with its decoding parameters;
* ``state``: every vCPU and device payload and configuration, with its entry and version;
* ``control``: QMP conversations, whole and cut in pieces, on unix and (with the token) TCP;
* ``returnpath``: what destinations say back, from a migration that goes through to a refusal.

Nothing here is random: the same pymig makes the same seeds (up to the guests' timing).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from pymig import core, stream
from pymig.demo import kvm_usable
from pymig.fuzz import TARGETS, destination, packet, state
from pymig.guest import GuestConfig, create
from pymig.machine import CONFIG_IDSTR, Machine
from pymig.migration import Migration
from pymig.parameters import ParameterStore
from pymig.transport import BytesChannel

KiB, MiB = 1 << 10, 1 << 20
MAX_PACKET_SEED_BYTES = 64 * KiB
SNAPSHOT_TIMEOUT_S = 60.0

# A boot sector: real mode at 0000:7c00, counts at 0x7e00 and prints '.' to the UART forever.
BOOT_SECTOR = (bytes.fromhex("fa31c08ed88ed0bc007cbaf803ff06007eb02eee66b9204e0000664975fcebed")
               .ljust(510, b"\0") + b"\x55\xaa")


#: (name, configuration, migration parameters) of every snapshot; the KVM ones need /dev/kvm.
#: The simulated guests are those the state harness loads vCPU state into (state.SIM_GUESTS).
SIMULATED = [
    ("sim-idle", state.SIM_GUESTS["sim-idle"], {}),
    ("sim-selfcheck", state.SIM_GUESTS["sim-selfcheck"], {}),
    ("sim-selfcheck-2cpu-plain", state.SIM_GUESTS["sim-selfcheck-2cpu-plain"],
     {"compression": "none"}),
    # slower than the guest dirties its pages: three passes, so the index skips two
    ("sim-dirtier-live", state.SIM_GUESTS["sim-dirtier-live"],
     {"compression": "none", "max-bandwidth": 128 * KiB, "downtime-limit": 1,
      "max-iterations": 3}),
    ("sim-compute", state.SIM_GUESTS["sim-compute"], {}),
]
KVM = [
    ("kvm-selfcheck", GuestConfig("kvm", 4 * MiB, vcpus=1, workload="selfcheck",
                                  params={"working_set_bytes": 128 * KiB}), {}),
    ("kvm-bootsector", None, {}),  # made from BOOT_SECTOR at run time
    ("kvm-diskcheck", None, {}),  # on the destination's disk images, made at run time
]

QMP_CONVERSATIONS = [
    b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n',
    b'{"execute":"qmp_capabilities"}{"execute":"query-migrate","id":1}'
    b'{"execute":"query-commands","id":"x"}',
    b'{"execute": "qmp_capabilities"}\n{"execute": "migrate-set-parameters", "arguments": '
    b'{"max-bandwidth": 100000000, "downtime-limit": 300, "compression": "none"}}\n'
    b'{"execute": "query-migrate-parameters"}\n',
    b'{"execute": "qmp_capabilities"}\n{"execute": "migrate-set-capabilities", "arguments": '
    b'{"capabilities": [{"capability": "auto-converge", "state": true}]}}\n'
    b'{"execute": "query-migrate-capabilities"}\n',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n',
    b'{"execute": "qmp_capabilities"}\n{"execute": "migrate", "arguments": '
    b'{"uri": "tcp:127.0.0.1:4444", "detach": true}, "id": [1, {"a": null}]}\n'
    b'{"execute": "migrate-incoming", "arguments": {"uri": "unix:/tmp/x.sock"}}\n',
    b'{"execute": "qmp_capabilities"}\n{"execute": "migrate_cancel"}\n{"execute": "stop"}\n'
    b'{"execute": "cont"}\n{"execute": "query-guest", "arguments": {"verify": true}}\n'
    b'{"execute": "migrate-continue", "arguments": {"state": "pre-switchover"}}\n',
    b'{"execute": "qmp_capabilities"}\n{"execute": "migrate", "arguments": '
    b'{"uri": "file:/tmp/x.pymig", "resume": false, "trace": "/tmp/t.jsonl"}}\n'
    b'{"execute": "x-migrate-switchover"}\n{"execute": "quit"}\n',
    b'{"execute": "query-status"} [1, 2] "text" 12.5e3 nul {"execute": 1} '
    b'{"execute": "qmp_capabilities", "extra": 1}\n{"execute": "migrate", "arguments": []}\n',
    b'{"execute": "qmp_capabilities"}\n{"execute": "migrate-set-parameters", "arguments": '
    b'{"max-bytes-ratio": 1e308, "throttle-mode": "step", "limit-action": "cancel", '
    b'"vcpu-dirty-limit": 2000, "max-total-time": 10}}\n',
    b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n{"execute": "qmp_capabilities"}',
    b'{"a": "\\"}\\\\", "b": [[[{}]]]}\n{"execute": "qmp_capabilities"}',
]


def snapshot(config: GuestConfig, path: Path, params: dict | None = None,
             run_s: float = 0.05) -> bytes:
    """Run a guest for ``config`` a moment and save it live to ``path``; the file's bytes."""
    guest = create(config)
    try:
        guest.start()
        time.sleep(run_s)
        store = ParameterStore()
        if params:
            store.set(**params)
        migration = Migration(Machine.source(guest), store)
        migration.start(f"file:{path}")
        status = migration.wait(SNAPSHOT_TIMEOUT_S)
        if status.value != "completed":
            raise RuntimeError(f"snapshot of {config.workload} ended {status.value}: "
                               f"{migration.query().get('error-desc')}")
    finally:
        guest.close()
    return path.read_bytes()


def _boot_sector_config(directory: Path) -> GuestConfig:
    from pymig.guest import make_config

    image = directory / "bootsector.img"
    image.write_bytes(BOOT_SECTOR)
    return make_config(kind="kvm", memory_bytes=4 * MiB, boot_sector=image)


def _diskcheck_config() -> GuestConfig:
    """A KVM guest driving the fuzzing destination's disks (shared: the destination opens the
    same images), so its ATA state is mid-command more often than not."""
    from pymig.guest import make_config

    return make_config(kind="kvm", workload="diskcheck", memory_bytes=4 * MiB,
                       params={"disk_working_set_bytes": 256 * KiB},
                       disks=[f"{path},shared" for path in destination.disk_paths()])


def streams(directory: Path, *, kvm: bool | None = None, quick: bool = False
            ) -> dict[str, bytes]:
    """Snapshot files by name: the simulated ones, and the KVM ones where ``kvm`` (default:
    where /dev/kvm works).  ``quick``: two small simulated ones only (the CI smoke run)."""
    wanted = SIMULATED[:2] if quick else list(SIMULATED)
    if kvm if kvm is not None else (not quick and kvm_usable()):
        wanted += KVM
    out = {}
    for name, config, params in wanted:
        if name == "kvm-bootsector":
            config = _boot_sector_config(directory)
        elif name == "kvm-diskcheck":
            config = _diskcheck_config()
        out[name] = snapshot(config, directory / f"{name}.pymig", params)
    return out


def _records(data: bytes):
    """(record header, payload bytes) of every record up to EOF."""
    reader = stream.StreamReader(BytesChannel(data))
    reader.read_header()
    names = {}
    while True:
        record = reader.next_record()
        if record.type == stream.RecordType.EOF:
            return
        if record.idstr is not None:
            names[record.section_id] = record
        yield names[record.section_id], record, bytes(reader.read_payload())


def packet_seeds(snapshots: dict[str, bytes]) -> list[bytes]:
    seeds = []
    for data in snapshots.values():
        for named, record, payload in _records(data):
            if (named.idstr == "ram" and record.type == stream.RecordType.PART
                    and len(payload) <= MAX_PACKET_SEED_BYTES):
                info = core.packet_info(payload)
                runs = core.packet_runs(payload, info.page_size, info.block_id,
                                        packet.MAX_PAGES)
                npages = int((runs[:, 0] + runs[:, 1]).max()) if len(runs) else 1
                seeds.append(packet.PARAMS.pack(0, npages - 1, 0) + payload)
                seeds.append(packet.PARAMS.pack(1, npages - 1, 0) + payload)
    seeds += _encoded_packets()
    return seeds


def _encoded_packets() -> list[bytes]:
    """Packets of zero, random, repetitive and mixed pages, compressed and not."""
    pages = 16
    mem = np.zeros(pages * 4096, dtype=np.uint8)
    rng = np.random.default_rng(16)
    mem[4096:3 * 4096] = rng.integers(0, 256, 2 * 4096, dtype=np.uint8)
    mem[5 * 4096:9 * 4096] = np.frombuffer(b"pymig fuzz " * (4 * 4096 // 11 + 1),
                                           np.uint8)[:4 * 4096]
    mem[12 * 4096 + 100] = 7
    seeds = []
    for compress in (None, core.new_compress_state()):
        for first in (0, 5, 12):
            bitmap = core.new_bitmap(pages)
            core.bitmap_set_range(bitmap, pages, first, pages - first)
            out = bytearray(1 << 20)
            result = core.encode_packet(mem, 4096, 0, bitmap, pages, 0, out, compress)
            payload = bytes(out[:result.nbytes])
            for flags in (0, 1, 2, 3):
                seeds.append(packet.PARAMS.pack(flags, pages - 1, 0x55) + payload)
    return seeds


def state_seeds(snapshots: dict[str, bytes]) -> list[bytes]:
    """Every vCPU and device payload of each snapshot, for the entry of the guest that takes
    it (a simulated snapshot's own guest; the KVM guest), and every configuration."""
    names = {e.name for e in state.entries()}
    seeds = []
    for snapshot_name, data in snapshots.items():
        guest = snapshot_name if snapshot_name in state.SIM_GUESTS else "kvm"
        for named, record, payload in _records(data):
            name = state.entry_name(guest, named.idstr, named.instance_id)
            if named.idstr == CONFIG_IDSTR:
                seeds.append(state.make_input(CONFIG_IDSTR, named.version_id, payload))
            elif record.type == stream.RecordType.FULL and name in names:
                seeds.append(state.make_input(name, named.version_id, payload))
    return seeds


def control_seeds() -> list[bytes]:
    """Each conversation on a unix socket (in one piece, in pieces, to a destination, with a
    small limit), and over TCP with the harness's token in its qmp_capabilities (and once
    with a wrong one)."""
    from pymig.fuzz import control

    seeds = []
    for text in QMP_CONVERSATIONS:
        seeds += [bytes([0x00]) + text, bytes([0x03]) + text, bytes([0x27]) + text,
                  bytes([0x11]) + text, bytes([0x80]) + text]
        for token in (control.TOKEN, "0" * len(control.TOKEN)):
            proved = re.sub(rb'("qmp_capabilities")(, "arguments": \{|\})',
                            lambda m: m[1] + b', "arguments": {"token": "' + token.encode()
                            + b'"' + (b", " if m[2].endswith(b"{") else b"}}"), text, count=1)
            seeds += [bytes([control.TCP]) + proved, bytes([control.TCP | 0x23]) + proved]
    return seeds


def returnpath_seeds() -> list[bytes]:
    """What destinations say: a migration that goes through (READY, reports, LOADED, ACK), one
    refused with a reason, and a few odd conversations."""
    now = time.time_ns()
    said = stream.encode_return
    through = [stream.Ready(), stream.Progress(4096), stream.CaughtUp(1 << 40), stream.Loaded(),
               stream.Ack(now, now)]
    conversations = [
        through,
        [stream.Ready(), stream.LoadError("StateError cpu field pos: 137438953472 is out of "
                                          "bounds: this guest takes [0, 31]")],
        [stream.Ping(1), stream.Pong(1), stream.PageRequest(0, 5, 1), *through[1:],
         stream.Shut()],
        [stream.Loaded(), stream.Ack(now, now), stream.CaughtUp(1 << 40)],
        [stream.Ready(), stream.CaughtUp(0), stream.Progress(0)],
        [stream.Ready()],
    ]
    return [b"".join(said(m) for m in c) for c in conversations]


def generate(out: str | os.PathLike, *, kvm: bool | None = None, quick: bool = False
             ) -> dict[str, int]:
    """Write every target's seeds under ``out/<target>/``; the number of seeds per target."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="pymig-seeds-") as scratch:
        snapshots = streams(Path(scratch), kvm=kvm, quick=quick)
    files = list(snapshots.values())
    per_target = {
        "stream": files, "analyze": files, "index": files,
        "packet": packet_seeds(snapshots), "state": state_seeds(snapshots),
        "control": control_seeds(), "returnpath": returnpath_seeds(),
    }
    counts = {}
    for target in TARGETS:
        directory = out / target
        directory.mkdir(parents=True, exist_ok=True)
        seeds = {hashlib.sha1(seed).hexdigest(): seed for seed in per_target[target]}
        for name, seed in seeds.items():
            (directory / f"seed-{name}").write_bytes(seed)
        counts[target] = len(seeds)
    return counts
