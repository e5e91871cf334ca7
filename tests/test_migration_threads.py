"""A source's migration that fails or is cancelled leaves no thread of its own behind once it has
ended: the return path's reader (the TLS session's too) and a cancel's grace timer are joined
before the migration's thread ends, so the process can migrate again with nothing of the last
run still holding its channel."""

from __future__ import annotations

import threading
import time

import pytest

from _migration_helpers import ANY_KIND, guest_config, guests  # noqa: F401
from _tls_helpers import SOURCE_DN, pki  # noqa: F401

from pymig.faults.proxy import FaultProxy, Trigger
from pymig.incoming import Incoming
from pymig.machine import Machine
from pymig.migration import Migration, ReturnPath
from pymig.parameters import ParameterStore

#: How long the return path's thread takes to end once its receive failed: the window between
#: the socket's shutdown and the thread's end that a busy host's scheduler can stretch.
SLOW_EXIT_S = 1.0


def _source_threads(before: set[threading.Thread]) -> list[str]:
    """Threads of this process started since ``before`` that belong to a source's migration."""
    return sorted(t.name for t in set(threading.enumerate()) - before
                  if t.is_alive() and (isinstance(t, threading.Timer)
                                       or t.name in ("pymig-migration", "pymig-return-path")))


@pytest.fixture
def slow_return_path_exit(monkeypatch):
    """The return path's thread ends SLOW_EXIT_S after its loop has."""
    loop = ReturnPath._loop

    def slow(self):
        try:
            loop(self)
        finally:
            time.sleep(SLOW_EXIT_S)

    monkeypatch.setattr(ReturnPath, "_loop", slow)


def _destination(uri: str, **kwargs):
    incoming = Incoming(uri, accept_timeout=60, progress_timeout=10, limits=ANY_KIND, **kwargs)
    bound = incoming.listen()
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=_run(incoming)), daemon=True,
                              name="test-destination")
    thread.start()
    return bound, thread


def _run(incoming):
    try:
        return incoming.run()
    except Exception as exc:  # noqa: BLE001 - the destination's failure is expected here
        return exc


def test_tls_corrupted_in_flight_joins_the_return_path(guests, pki, slow_return_path_exit):
    """A byte flipped in a TLS record on its way to the destination: the destination's
    decryption fails and it ends the session; the source fails, its guest runs on, and by the
    time its migration thread has ended, the return path's thread has too."""
    guest = guests(guest_config("simulated", memory=64 << 20, working_set=8 << 20))
    bound, destination = _destination("tcp:127.0.0.1:0", tls=(pki.creds(), (SOURCE_DN,)))
    port = int(bound.rsplit(":", 1)[1])
    proxy = FaultProxy(("127.0.0.1", 0), ("127.0.0.1", port), tls=True)
    fired = []
    proxy.arm(Trigger("forward", skip=256 << 10), lambda what: fired.append(what) or "corrupt")
    store = ParameterStore()
    store.set(**{"tls-creds": "tls0", "max-bandwidth": 32_000_000, "compression": "none"})
    migration = Migration(Machine.source(guest), store, credentials=pki.store(pki.dir()))
    before = set(threading.enumerate())
    try:
        migration.start(f"tcp:127.0.0.1:{proxy.address[1]}")
        migration.wait(60)
        left = _source_threads(before)
    finally:
        proxy.close()
        destination.join(30)
    assert fired and proxy.corrupted is not None, f"no byte corrupted: {migration.error}"
    assert migration.status.value == "failed", migration.query()
    assert guest.status == "running"
    assert left == [], f"threads of the failed migration still alive: {left}"


def test_a_cancel_leaves_no_grace_timer_behind(guests):
    """A cancel arms a timer that cuts a send stuck past its grace period; the migration ends
    well inside it (between two records), and the timer goes with it."""
    guest = guests(guest_config("simulated", memory=64 << 20, working_set=8 << 20))
    bound, destination = _destination("tcp:127.0.0.1:0")
    store = ParameterStore()
    store.set(**{"max-bandwidth": 1_000_000, "compression": "none"})  # a pass of seconds
    migration = Migration(Machine.source(guest), store)
    before = set(threading.enumerate())
    migration.start(bound)
    deadline = time.monotonic() + 30
    while migration.status.value != "active":
        assert time.monotonic() < deadline, migration.query()
        time.sleep(0.01)
    time.sleep(0.2)
    migration.cancel()
    migration.wait(30)
    left = _source_threads(before)
    destination.join(30)
    assert migration.status.value == "cancelled", migration.query()
    assert guest.status == "running"
    assert left == [], f"threads of the cancelled migration still alive: {left}"


def test_a_migration_started_as_the_last_one_fails_is_not_undone_by_its_release(guests,
                                                                               monkeypatch):
    """The status says failed before the failed run has released what it held; a new
    ``migrate`` right then waits for that release rather than have it clean up the new run's
    live entries and close the new run's channel."""
    from pymig import migration as migration_mod
    from pymig.limits import DestinationLimits

    release = migration_mod._Run.release

    def slow_release(self):
        time.sleep(SLOW_EXIT_S)  # a busy host's scheduler, between the status and the rest
        release(self)

    monkeypatch.setattr(migration_mod._Run, "release", slow_release)
    guest = guests(guest_config("simulated", memory=32 << 20, working_set=4 << 20, rate=200))
    # the first destination takes KVM guests only: it refuses this one once the stream began
    refusing = Incoming("tcp:127.0.0.1:0", accept_timeout=60, progress_timeout=10,
                        limits=DestinationLimits(accept_kinds=("kvm",)))
    first = refusing.listen()
    threading.Thread(target=_run, args=(refusing,), daemon=True).start()
    second, destination = _destination("tcp:127.0.0.1:0")
    store = ParameterStore()
    store.set(**{"max-bandwidth": 2_000_000, "compression": "none"})  # the second: seconds
    migration = Migration(Machine.source(guest), store)
    migration.start(first)
    deadline = time.monotonic() + 30
    while migration.status.value != "failed":
        assert time.monotonic() < deadline, migration.query()
        time.sleep(0.001)
    migration.start(second)
    migration.wait(60)
    destination.join(60)
    assert migration.status.value == "completed", migration.query()


def test_a_session_waits_for_the_last_migrations_release_before_the_next(guests, monkeypatch):
    """``migrate`` through the session (QMP's path) makes a new Migration each time; the new one
    shares the machine's live entries with the last, so it waits for the last one's release
    too, and completes."""
    from pymig import migration as migration_mod
    from pymig.limits import DestinationLimits
    from pymig.session import Session

    release = migration_mod._Run.release

    def slow_release(self):
        time.sleep(SLOW_EXIT_S)
        release(self)

    monkeypatch.setattr(migration_mod._Run, "release", slow_release)
    session = Session(guests(guest_config("simulated", memory=32 << 20, working_set=4 << 20,
                                          rate=200)))
    session.params.set(**{"max-bandwidth": 2_000_000, "compression": "none"})
    refusing = Incoming("tcp:127.0.0.1:0", accept_timeout=60, progress_timeout=10,
                        limits=DestinationLimits(accept_kinds=("kvm",)))
    first = refusing.listen()
    threading.Thread(target=_run, args=(refusing,), daemon=True).start()
    second, destination = _destination("tcp:127.0.0.1:0")
    session.migrate(first)
    deadline = time.monotonic() + 30
    while session.migration.status.value != "failed":
        assert time.monotonic() < deadline, session.migration.query()
        time.sleep(0.001)
    session.migrate(second)
    session.migration.wait(60)
    destination.join(60)
    assert session.migration.status.value == "completed", session.migration.query()
