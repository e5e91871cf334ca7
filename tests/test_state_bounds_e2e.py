"""A stream whose state says what the destination's guest cannot hold is refused before the
guest runs, through a real destination: the entry, field and value named, no guest started,
nothing written outside guest memory, and a live source guest still running."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from _bounds_helpers import mutated, payload_of, replace_payload, state_records
from _bounds_walk import Entry, cases, payload_for, valid_values
from _migration_helpers import (assert_consistent, guest_config, guests, run_pymig,  # noqa: F401
                                save_snapshot, wait_for)
from pymig import vmstate
from pymig.errors import MigrationError, StateError
from pymig.guest import create
from pymig.guest.simulated import SIM_CPU_VMSD, SimCpuState
from pymig.incoming import Incoming
from pymig.machine import Machine
from pymig.migration import Migration
from _migration_helpers import ANY_KIND, ANY_KIND_ARGS

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def selfcheck_snapshot(tmp_path_factory):
    """A file: snapshot of a running two-vCPU self-checking simulated guest."""
    path = tmp_path_factory.mktemp("bounds") / "selfcheck.pymig"
    save_snapshot(path, guest_config("simulated", vcpus=2))
    return path.read_bytes()


def with_sim_cpu(data: bytes, instance: int, **values) -> bytes:
    payload = payload_of(data, "cpu", instance)
    return replace_payload(data, "cpu", instance,
                           mutated(SIM_CPU_VMSD, payload, SimCpuState.VERSION,
                                   lambda v: v.update(values)))


def test_a_position_outside_the_share_is_refused_not_written(tmp_path, selfcheck_snapshot):
    """The writer writes base + pos * 4096: a snapshot saying pos = 2**36 (its footer made
    good) once had `pymig incoming file:` die of SIGSEGV.  It runs in a child process, so a
    crash fails this test instead of ending the run."""
    path = tmp_path / "far.pymig"
    path.write_bytes(with_sim_cpu(selfcheck_snapshot, 0, pos=1 << 36))
    done = run_pymig("incoming", f"file:{path}", *ANY_KIND_ARGS, "--quiet", timeout=120)
    assert done.returncode > 0, (done.returncode, done.stderr[-2000:])  # < 0: killed by a signal
    assert "cpu/0 field pos" in done.stderr and str(1 << 36) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


# --- a sample of every description's fields, through real destinations -------------------------

def sample(entry, per_description: int = 6):
    """Refused cases of up to ``per_description`` fields of ``entry`` (one per field), spread
    over the description."""
    picked, seen = [], set()
    refused = [c for c in cases(entry, valid_values(entry)) if c.refused]
    fields_with_cases = sorted({c.path.split("[")[0] for c in refused})
    step = max(1, len(fields_with_cases) // per_description)
    wanted = set(fields_with_cases[::step][:per_description])
    for case in refused:
        name = case.path.split("[")[0]
        if name in wanted and name not in seen:
            seen.add(name)
            picked.append(case)
    return picked


def snapshot_entries(data: bytes, guest) -> list[Entry]:
    """The state entries of a snapshot, as the destination ``guest`` built for it loads them."""
    specs = {(s.idstr, s.instance_id): s for s in guest.state_specs()}
    entries = []
    for (idstr, instance), (record, _) in state_records(data).items():
        spec = specs.get((idstr, instance))
        if spec is None:
            continue  # pymig.config
        valid = vmstate.decode(spec.vmsd, payload_of(data, idstr, instance), record.version_id,
                               spec.shape)
        entries.append(Entry(guest.config.kind, idstr, instance, spec.vmsd, spec.shape, valid))
    return entries


def assert_restore_refused(tmp_path, data: bytes, entry: Entry, case,
                           guest_options: dict | None = None) -> str:
    path = tmp_path / "crafted.pymig"
    path.write_bytes(replace_payload(data, entry.idstr, entry.instance,
                                     payload_for(entry, case.set)))
    incoming = Incoming(f"file:{path}", limits=ANY_KIND, guest_options=guest_options)
    with pytest.raises(MigrationError) as info:
        incoming.run()
    text = str(info.value)
    assert f"{entry.idstr}/{entry.instance} field {case.path}" in text, (case.what, text)
    if case.shown is not None:
        assert str(case.shown) in text, (case.what, text)
    assert isinstance(info.value.__cause__, StateError), repr(info.value.__cause__)
    assert incoming.machine is None and incoming.status == "failed"  # no guest started
    return text


def restore_sample(tmp_path, data: bytes, config) -> int:
    with create(config, incoming=True) as guest:
        entries = snapshot_entries(data, guest)
    assert {e.idstr for e in entries} >= {"cpu"}
    done = 0
    for entry in entries:
        for case in sample(entry):
            assert_restore_refused(tmp_path, data, entry, case)
            done += 1
    return done


def test_a_simulated_snapshot_with_any_field_out_of_bounds_is_not_restored(
        tmp_path, selfcheck_snapshot):
    config = guest_config("simulated", vcpus=2)
    assert restore_sample(tmp_path, selfcheck_snapshot, config) >= 8


@pytest.mark.kvm
def test_a_kvm_snapshot_with_any_field_out_of_bounds_is_not_restored(tmp_path_factory,
                                                                      tmp_path):
    path = tmp_path_factory.mktemp("kvm") / "kvm.pymig"
    config = guest_config("kvm", memory=32 << 20, working_set=4 << 20)
    save_snapshot(path, config)
    data = path.read_bytes()
    # the vCPU and each device, a few fields each
    assert restore_sample(tmp_path, data, config) >= 12


@pytest.mark.kvm
def test_a_kvm_snapshot_with_a_disk_and_any_field_out_of_bounds_is_not_restored(
        tmp_path_factory, tmp_path):
    """The ATA channel's and each drive's state, bounded by the disks the destination opened,
    are refused like the vCPU's (a disk on shared storage: the destination opens it too)."""
    from pymig.guest import make_config

    here = tmp_path_factory.mktemp("kvm-disk")
    disk = here / "d.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    config = make_config(memory_bytes=32 << 20, workload="diskcheck", disks=[f"{disk},shared"],
                         params={"disk_working_set_bytes": 64 << 10})
    path = here / "disk.pymig"
    save_snapshot(path, config)
    data = path.read_bytes()
    options = {"disk_paths": [str(disk)]}
    with create(config, incoming=True, **options) as guest:
        entries = snapshot_entries(data, guest)
    assert {"ide", "ide-drive"} <= {e.idstr for e in entries}
    for entry in entries:
        if entry.idstr.startswith("ide"):
            for case in sample(entry):
                assert_restore_refused(tmp_path, data, entry, case, options)
    # a drive's command past the end of the destination's disk: the disk is its bound
    drive = next(e for e in entries if e.idstr == "ide-drive")
    case = next(c for c in cases(drive, valid_values(drive)) if c.path == "end_lba"
                and c.what == "max+1")
    assert case.shown == (1 << 20) // 512 + 1  # one past the disk's last sector
    assert_restore_refused(tmp_path, data, drive, case, options)


def test_a_snapshot_whose_configuration_is_out_of_bounds_is_not_restored(
        tmp_path, selfcheck_snapshot):
    for name, value in (("vcpus", 0), ("memory_bytes", 1 << 60), ("kind", "xen"),
                        ("blocks", [{"name": "ram-low", "size_bytes": 4096,
                                     "guest_phys_addr": 1}])):
        record, at = state_records(selfcheck_snapshot)[("pymig.config", 0)]
        config = json.loads(selfcheck_snapshot[at:at + record.payload_len])
        config[name] = value
        path = tmp_path / "config.pymig"
        path.write_bytes(replace_payload(selfcheck_snapshot, "pymig.config", 0,
                                         json.dumps(config).encode()))
        incoming = Incoming(f"file:{path}", limits=ANY_KIND)
        with pytest.raises(MigrationError, match=f"pymig.config: {name}") as info:
            incoming.run()
        assert json.dumps(value)[:40] in str(info.value) or str(value)[:40] in str(info.value)
        assert incoming.machine is None


# --- live: the source keeps running ------------------------------------------------------------

def migrate_tampered(guest, entry_key: tuple[str, int], change):
    """Migrate ``guest`` over TCP to a destination in this process, the source's state entry
    ``entry_key`` changed by ``change(values)`` on its way out (what a hostile source could
    send).  Returns (migration, destination error, incoming)."""
    machine = Machine.source(guest)
    encode = machine._encode_state

    def tampered(entry, state):
        data = encode(entry, state)
        if (entry.idstr, entry.instance_id) == entry_key:
            data = mutated(entry.vmsd, data, entry.version_id, change)
        return data

    machine._encode_state = tampered
    incoming = Incoming("tcp:127.0.0.1:0", limits=ANY_KIND, accept_timeout=60)
    bound = incoming.listen()
    box = {}
    thread = threading.Thread(target=lambda: _run(incoming, box), daemon=True)
    thread.start()
    migration = Migration(machine)
    migration.start(bound)
    migration.wait(120)
    thread.join(60)
    assert not thread.is_alive(), "the destination did not finish"
    return migration, box.get("error"), incoming


def _run(incoming, box):
    try:
        box["result"] = incoming.run()
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        box["error"] = exc
        return
    box["result"].machine.close()  # a destination that took the state: the test fails


LIVE = {
    "simulated": [(("cpu", 0), "pos", lambda v: v.update(pos=1 << 36), "cpu/0 field pos"),
                  (("cpu", 1), "phase", lambda v: v.update(phase=9), "cpu/1 field phase"),
                  (("cpu", 1), "index", lambda v: v.update(index=0), "cpu/1 field index")],
    "kvm": [(("cpu", 0), "xsave", lambda v: v.update(xsave=v["xsave"] + bytes(64)),
             "cpu/0 field xsave"),
            (("cpu", 0), "dpl", lambda v: v["sregs"]["cs"].update(dpl=7),
             "cpu/0 field sregs.cs.dpl: 7"),
            (("cpu", 0), "mp_state", lambda v: v.update(mp_state=1 << 31),
             f"cpu/0 field mp_state: {1 << 31}"),
            (("serial", 0), "ier", lambda v: v.update(ier=0xFF), "serial/0 field ier: 255"),
            (("control", 0), "error_events",
             lambda v: v.update(error_events=v["events"] + 1), "control/0 field error_events")],
}


@pytest.mark.parametrize("kind,index", [
    pytest.param(kind, i, id=f"{kind}-{LIVE[kind][i][1]}",
                 marks=[pytest.mark.kvm] if kind == "kvm" else [])
    for kind in LIVE for i in range(len(LIVE[kind]))])
def test_a_live_migration_with_a_field_out_of_bounds_fails_and_the_source_runs_on(
        kind, index, guests):
    key, _, change, named = LIVE[kind][index]
    source = guests(guest_config(kind, vcpus=2, memory=32 << 20, working_set=4 << 20))
    migration, error, incoming = migrate_tampered(source, key, change)
    assert migration.status.value == "failed", migration.query()
    assert isinstance(error, MigrationError) and named in str(error), repr(error)
    assert named in migration.query()["error-desc"]  # the reason went back to the source
    assert incoming.machine is None  # no guest started
    assert source.status == "running"
    passes = source.progress()["passes"]
    wait_for(lambda: source.progress()["passes"] > passes, what="the source guest to run on")
    assert_consistent(source)


# --- set_xsave ----------------------------------------------------------------------------------

@pytest.mark.kvm
def test_set_xsave_takes_exactly_the_vms_xsave_size():
    """KVM_SET_XSAVE reads the VM's XSAVE size (KVM_CAP_XSAVE2) from the area: a shorter
    area would have it read past the buffer, a longer one was not this VM's."""
    from pymig.kvm import cpustate

    with create(guest_config("kvm", "idle", memory=16 << 20)) as guest:
        vcpu = guest.runtime.vcpus[0]
        size = guest.runtime.vm.xsave_size
        state = cpustate.capture(vcpu)
        assert len(state.xsave) == size
        for wrong in (state.xsave + bytes(64), state.xsave[:-64], state.xsave + bytes(4096)):
            bad = dataclasses.replace(state, xsave=wrong)
            with pytest.raises(ValueError, match=f"XSAVE area of {len(wrong)} bytes: this "
                                                 f"VM's XSAVE size is {size}"):
                cpustate.restore(vcpu, bad)
        cpustate.restore(vcpu, state)
        assert cpustate.capture(vcpu).xsave == state.xsave
