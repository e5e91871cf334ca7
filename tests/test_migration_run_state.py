"""The source guest ends a migration that leaves it here in the run state it had before: a
failed one, a cancelled one and a ``file:`` snapshot start again only a guest that was
running, as QEMU does; a guest the user had stopped stays stopped, and its workload makes no
progress until ``cont``.  A snapshot asked to stop the guest (``resume: false``, ``pymig
migrate --stop``) leaves it paused either way.
"""

from __future__ import annotations

import threading
import time

import pytest

from _migration_helpers import guest_config, running_guest, wait_for
from pymig.incoming import Incoming
from pymig.machine import Machine
from pymig.migration import Status
from pymig.session import Session
from _migration_helpers import ANY_KIND

MiB = 1 << 20
QUIET_S = 0.5  # how long a paused guest is watched for progress it must not make


def progress(guest) -> tuple[int, int]:
    counters = guest.progress()
    return counters["passes"], counters["pages_written"]


def assert_in_state(session: Session, running: bool) -> None:
    """``query-status`` says ``running`` or ``paused``, and the workload agrees: it moves on
    while running; paused, it stands still, and moves on again after ``cont``."""
    guest = session.guest
    if running:
        assert session.query_status() == {"running": True, "status": "running"}
        before = progress(guest)[1]
        wait_for(lambda: progress(guest)[1] > before, what="the running guest to make progress")
        return
    assert session.query_status() == {"running": False, "status": "paused"}
    frozen = progress(guest)
    time.sleep(QUIET_S)
    assert progress(guest) == frozen, "a paused guest made progress"
    assert session.query_status()["status"] == "paused"
    session.cont()
    wait_for(lambda: progress(guest)[1] > frozen[1], what="the guest to carry on after cont")


def fail_after_the_stop(session: Session, tmp_path) -> str:
    """A one-way channel whose command fails once the whole stream, stop-and-copy included,
    went out: the migration fails after it stopped the guest."""
    session.migrate("exec:cat > /dev/null; exit 3")
    assert session.migration.wait(120) == Status.FAILED
    assert "exited with status 3" in session.query_migrate()["error-desc"]
    return "failed"


def cancel_after_the_stop(session: Session, tmp_path, monkeypatch) -> str:
    """A destination that loads everything, then takes its time to say so: the source has
    stopped its guest for the switchover and waits; the user cancels meanwhile."""
    loaded, release = threading.Event(), threading.Event()
    load_stream = Machine.load_stream

    def slow_to_confirm(self, *args, **kwargs):
        load_stream(self, *args, **kwargs)
        loaded.set()
        release.wait(60)

    monkeypatch.setattr(Machine, "load_stream", slow_to_confirm)
    incoming = Incoming(f"unix:{tmp_path}/m.sock", limits=ANY_KIND, accept_timeout=60)
    bound = incoming.listen()
    thread = threading.Thread(target=lambda: _quietly(incoming.run), daemon=True)
    thread.start()
    try:
        session.migrate(bound)
        assert loaded.wait(120), "the destination did not load the stream"
        assert session.migration.status == Status.DEVICE  # waiting for LOADED, guest stopped
        session.migrate_cancel()
        assert session.migration.wait(60) == Status.CANCELLED
    finally:
        release.set()
        thread.join(60)
    assert incoming.machine is None and incoming.status == "failed"  # it never ran there
    return "cancelled"


def snapshot(session: Session, tmp_path, resume: bool | None) -> str:
    session.migrate(f"file:{tmp_path}/snap.pymig", resume=resume)
    assert session.migration.wait(120) == Status.COMPLETED
    assert (tmp_path / "snap.pymig").stat().st_size > 0
    return "completed"


CASES = {
    "failure": lambda session, tmp_path, monkeypatch: fail_after_the_stop(session, tmp_path),
    "cancel": cancel_after_the_stop,
    "snapshot": lambda session, tmp_path, monkeypatch: snapshot(session, tmp_path, None),
    "snapshot-stop": lambda session, tmp_path, monkeypatch: snapshot(session, tmp_path, False),
}


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the destination of a cancelled migration fails
        pass


def run_case(kind: str, case: str, before: str, tmp_path, monkeypatch) -> None:
    guest = running_guest(guest_config(kind, memory=64 * MiB, working_set=8 * MiB))
    session = Session(guest)
    events: list[str] = []
    session.subscribe(lambda name, data: events.append(name))
    try:
        if before == "paused":
            session.stop()
            assert session.query_status()["status"] == "paused"
        events.clear()
        CASES[case](session, tmp_path, monkeypatch)
        running = before == "running" and case != "snapshot-stop"
        run_events = [e for e in events if e in ("STOP", "RESUME")]
        if before == "paused":
            assert run_events == []  # it neither stopped nor ran again
        else:
            assert run_events == (["STOP", "RESUME"] if running else ["STOP"])
        assert_in_state(session, running)
    finally:
        session.close()


@pytest.mark.parametrize("before", ["running", "paused"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_source_guest_ends_in_the_run_state_it_had_before(case, before, tmp_path,
                                                              monkeypatch):
    run_case("simulated", case, before, tmp_path, monkeypatch)


@pytest.mark.kvm
@pytest.mark.parametrize("case", ["failure", "snapshot"])
def test_a_paused_kvm_guest_stays_paused(case, tmp_path, monkeypatch):
    run_case("kvm", case, "paused", tmp_path, monkeypatch)
