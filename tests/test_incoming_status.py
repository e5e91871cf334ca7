"""The destination's status moves as its transition table allows, compare-and-set, and its
listeners hear every move: a migration that loads and runs goes none → setup → active →
completed; one whose source goes away goes to failed, and nothing moves a failed destination
again."""

from __future__ import annotations

import threading

import pytest

from _migration_helpers import ANY_KIND, guest_config, migrate_locally, running_guest
from pymig.incoming import Incoming, IncomingStatus
from pymig.transport import connect

MiB = 1 << 20


def test_a_migration_that_loads_and_runs(tmp_path, monkeypatch):
    moves = []
    real_init = Incoming.__init__

    def hearing(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.on_status(lambda old, new: moves.append((old, new)))

    monkeypatch.setattr(Incoming, "__init__", hearing)
    source = running_guest(guest_config("simulated", memory=16 * MiB, working_set=4 * MiB))
    try:
        with migrate_locally(source, f"unix:{tmp_path}/m.sock") as done:
            assert done.error is None and done.migration.status.value == "completed"
    finally:
        source.close()
    S = IncomingStatus
    assert moves == [(S.NONE, S.SETUP), (S.SETUP, S.ACTIVE), (S.ACTIVE, S.COMPLETED)]
    assert all(isinstance(new, str) and new == new.value for _, new in moves)


def test_a_source_that_goes_away_fails_the_destination_for_good(tmp_path):
    incoming = Incoming(f"unix:{tmp_path}/m.sock", limits=ANY_KIND, accept_timeout=30)
    moves = []
    incoming.on_status(lambda old, new: moves.append(new))
    bound = incoming.listen()
    box = {}
    thread = threading.Thread(target=lambda: box.update(
        error=pytest.raises(Exception, incoming.run).value), daemon=True)
    thread.start()
    channel = connect(bound, timeout=10)
    channel.close()  # not a byte of a stream
    thread.join(30)
    assert not thread.is_alive() and box["error"] is not None
    assert moves == [IncomingStatus.SETUP, IncomingStatus.ACTIVE, IncomingStatus.FAILED]
    assert incoming.status == "failed"
    assert not incoming._transition(IncomingStatus.ACTIVE, IncomingStatus.COMPLETED)
    with pytest.raises(AssertionError):
        incoming._set_status(IncomingStatus.ACTIVE)
