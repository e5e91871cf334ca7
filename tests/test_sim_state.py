"""Save a simulated guest's state, load it into a fresh incoming guest, and carry on."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pymig
from _sim_helpers import (
    MiB,
    copy_dirty,
    migrate_in_process,
    pages_of,
    run_until,
    sim_guest,
    state_to_json,
)
from pymig.errors import StateError
from pymig.guest.base import GuestState
from pymig.guest.simulated import SimCpuState
from pymig.guest.workloads import expected_compute_result, resolve, verify_selfcheck

HELPERS = Path(__file__).with_name("_sim_helpers.py")
SELFCHECK = {"working_set_bytes": 2 * MiB, "rate_pages_per_s": 200_000}
COMPUTE = {"region_bytes": 512 * 1024, "rounds": 400}
pytestmark = pytest.mark.timeout(120)  # a deadlocked writer fails the test, not the run


def test_state_is_typed_and_versioned():
    with sim_guest("compute", COMPUTE, vcpus=2) as guest:
        state = guest.save_state()
        assert isinstance(state, GuestState) and state.devices == {}
        assert SimCpuState.VERSION == 2 and len(state.cpus) == 2
        for cpu in state.cpus:
            assert all(type(getattr(cpu, f.name)) is int for f in dataclasses.fields(cpu))
        assert state.cpus[1].index == 1
        assert state.cpus[0].rng == resolve(guest.config).shares[0].seed


def test_selfcheck_continues_after_load_with_no_inconsistency():
    with sim_guest("selfcheck", SELFCHECK, vcpus=2) as source, \
            sim_guest("selfcheck", SELFCHECK, vcpus=2, incoming=True) as dest:
        run_until(source, "passes", 2)
        migrate_in_process(source, dest)
        passes = dest.progress()["passes"]
        run_until(dest, "passes", passes + 3)
        report = verify_selfcheck(dest, exact=True)
        assert report.ok, report.detail
        assert report.errors == 0 and report.passes >= passes + 3


def test_the_guest_itself_notices_memory_that_did_not_migrate():
    with sim_guest("selfcheck", SELFCHECK) as source, \
            sim_guest("selfcheck", SELFCHECK, incoming=True) as dest:
        run_until(source, "passes", 1)
        migrate_in_process(source, dest)
        share = resolve(dest.config).shares[0]
        pages_of(dest, 0)[share.first_gpa // 4096:][:share.npages] = 0  # lose the working set
        run_until(dest, "errors", 1)
        assert not verify_selfcheck(dest).ok


def test_compute_finishes_with_the_right_result_after_load():
    with sim_guest("compute", COMPUTE, vcpus=2) as source, \
            sim_guest("compute", COMPUTE, vcpus=2, incoming=True) as dest:
        assert not run_until(source, "passes", 1)["done"], "finished before it could migrate"
        state = migrate_in_process(source, dest)
        assert any(cpu.phase in (1, 2) and 0 < cpu.pass_number < 400 for cpu in state.cpus)
        assert run_until(dest, "done", 1)["result"] == expected_compute_result(COMPUTE, 2)


def test_load_refuses_state_of_another_guest():
    with sim_guest("selfcheck", SELFCHECK, vcpus=2) as source, \
            sim_guest("selfcheck", {"working_set_bytes": MiB}, vcpus=2, incoming=True) as dest:
        state = source.save_state()
        with pytest.raises(StateError, match="npages") as info:
            dest.load_state(state)
        assert info.value.field == "npages"
        with pytest.raises(StateError, match="state has 0 vCPUs"):
            source.load_state(GuestState(cpus=[]))
        bad = dataclasses.replace(state.cpus[0], rng=-1)
        with pytest.raises(StateError, match="u64"):
            source.load_state(GuestState(cpus=[bad, state.cpus[1]]))
        with pytest.raises(StateError, match="SimCpuState"):
            source.load_state(GuestState(cpus=[object(), state.cpus[1]]))


def test_load_state_refuses_a_position_or_phase_its_writer_cannot_hold():
    """Without a stream in between too: the position indexes the share, the phase the
    workload's steps; nothing is loaded when any vCPU's state is refused."""
    with sim_guest("selfcheck", SELFCHECK, vcpus=2) as guest:
        state = guest.save_state()
        npages = state.cpus[1].npages
        for field, value in (("pos", npages), ("pos", 1 << 36), ("phase", 4)):
            bad = dataclasses.replace(state.cpus[1], **{field: value})
            with pytest.raises(StateError, match=f"{field} {value} is out of bounds") as info:
                guest.load_state(GuestState(cpus=[state.cpus[0], bad]))
            assert (info.value.field, info.value.value) == (field, value)
        assert guest.save_state() == state  # nothing was loaded


def _run_child(tmp_path: Path, source, until: str, more_passes: int = 0) -> dict:
    """Dump a paused source's RAM to files and continue it in another process."""
    memory = []
    for block in source.ram_blocks:
        path = tmp_path / f"{block.name}.ram"
        block.array.tofile(path)
        memory.append(str(path))
    job = {"config": source.config.to_dict(), "state": state_to_json(source.save_state()),
           "memory": memory, "until": until, "more_passes": more_passes}
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps(job))
    src = str(Path(pymig.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(HELPERS.parent)])}
    done = subprocess.run([sys.executable, str(HELPERS), str(job_path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_selfcheck_continues_in_another_process(tmp_path):
    with sim_guest("selfcheck", SELFCHECK, vcpus=2) as source:
        passes = run_until(source, "passes", 2)["passes"]
        report = _run_child(tmp_path, source, "passes", more_passes=3)
    assert report["untouched"], "an incoming guest wrote to its RAM before the migration did"
    assert report["before"]["passes"] == passes
    assert report["selfcheck"]["ok"], report["selfcheck"]["detail"]
    assert report["selfcheck"]["passes"] >= passes + 3
    assert report["after"]["errors"] == 0


def test_compute_finishes_in_another_process(tmp_path):
    with sim_guest("compute", COMPUTE) as source:
        assert not run_until(source, "passes", 1)["done"]
        report = _run_child(tmp_path, source, "done")
    assert report["untouched"]
    assert report["after"]["done"] == 1
    assert report["after"]["result"] == expected_compute_result(COMPUTE, 1)


class MigrationModel(RuleBasedStateMachine):
    """Random interleavings of what migration does to a running selfcheck guest.

    The model: a shadow copy kept up to date from the dirty log, and the guest's status.  After
    a pause and a final sync the shadow must equal guest memory, and the selfcheck invariant
    must hold; a "switchover" loads the shadow and the state into a new guest that carries on.
    """

    def __init__(self):
        super().__init__()
        self.stack = []
        self.guest = self._enter(sim_guest("selfcheck", {"working_set_bytes": MiB}, vcpus=2))
        self.guest.start_dirty_log()
        self.shadow = [pages_of(self.guest, 0).copy()]
        self.running = False

    def _enter(self, manager):
        guest = manager.__enter__()
        self.stack.append(manager)
        return guest

    @rule()
    def resume(self):
        self.guest.resume()
        self.running = True

    @rule()
    def pause(self):
        self.guest.pause()
        self.running = False

    @rule()
    def sync_and_copy(self):
        copy_dirty(self.guest, self.shadow, self.guest.sync_dirty())

    @rule(percent=st.sampled_from([0, 30, 90]))
    def throttle(self, percent):
        self.guest.set_throttle(percent)

    @precondition(lambda self: not self.running)
    @rule()
    def switchover(self):
        copy_dirty(self.guest, self.shadow, self.guest.sync_dirty())
        dest = self._enter(sim_guest("selfcheck", {"working_set_bytes": MiB}, vcpus=2,
                                     incoming=True))
        pages_of(dest, 0)[:] = self.shadow[0]
        dest.load_state(self.guest.save_state())
        dest.start_dirty_log()
        self.guest = dest

    @invariant()
    def paused_guest_is_consistent(self):
        if self.running:
            return
        copy_dirty(self.guest, self.shadow, self.guest.sync_dirty())
        assert np.array_equal(self.shadow[0], pages_of(self.guest, 0))
        report = verify_selfcheck(self.guest, exact=True)
        assert report.ok, report.detail

    def teardown(self):
        for manager in reversed(self.stack):
            manager.__exit__(None, None, None)


# Each example builds guests and threads: fewer examples than the profile's, never more.
MigrationModel.TestCase.settings = settings(max_examples=min(15, settings().max_examples),
                                            stateful_step_count=12)
test_migration_model = MigrationModel.TestCase


WRITER_OUTSIDE_SHARE = """
import sys, time
sys.path.insert(0, {tests!r})
from _sim_helpers import sim_guest
with sim_guest("selfcheck", {{"working_set_bytes": 1 << 20}}) as guest:
    writers = guest._writers
    for field, value in (("pos", 1 << 36), ("pos", 256), ("phase", 4)):
        state = writers.get_cpu(0)
        state[field] = value
        try:
            writers.set_cpu(0, state)
        except OSError as exc:
            print("refused", field, exc.errno, flush=True)
            continue
        writers.run()
        time.sleep(0.5)
        writers.pause()
        print("accepted", field, flush=True)
"""


def test_the_writer_itself_refuses_a_position_outside_its_share():
    """Below every check in Python, the native writer takes no state that would have it write
    outside its share (it writes base + pos * 4096): a position at or past the share's 256
    pages, an unknown phase.  In a child process, so a write outside fails this test."""
    import errno

    script = WRITER_OUTSIDE_SHARE.format(tests=str(HELPERS.parent))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split("\n")[:3] == [f"refused pos {errno.ERANGE}",
                                           f"refused pos {errno.ERANGE}",
                                           f"refused phase {errno.ERANGE}"], done.stdout
