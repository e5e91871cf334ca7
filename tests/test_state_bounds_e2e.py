"""A stream whose state says what the destination's guest cannot hold is refused before the
guest runs, through a real destination: the entry, field and value named, no guest started,
nothing written outside guest memory, and a live source guest still running."""

from __future__ import annotations

import pytest

from _bounds_helpers import payload_of, replace_payload, mutated
from _migration_helpers import guest_config, run_pymig, save_snapshot
from pymig.guest.simulated import SIM_CPU_VMSD, SimCpuState

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
    done = run_pymig("incoming", f"file:{path}", "--quiet", timeout=120)
    assert done.returncode > 0, (done.returncode, done.stderr[-2000:])  # < 0: killed by a signal
    assert "cpu/0 field pos" in done.stderr and str(1 << 36) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
