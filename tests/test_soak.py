"""The soak, short: one self-checking guest back and forth between two long-lived processes,
plaintext and over TLS, and what makes that possible (a process whose guest migrated away
receives one again; a destination's guest migrates on)."""

from __future__ import annotations

import pytest

from _migration_helpers import ANY_KIND, e2e_kind, guest_config, guests  # noqa: F401
from _tls_helpers import pki  # noqa: F401

from pymig import soak
from pymig.session import CommandError, Session

KIND = e2e_kind()


@pytest.mark.parametrize("mode", ["plaintext", "tls"])
def test_soak_short(pki, mode):
    result = soak.run_soak(10, tls_creds=pki.dir() if mode == "tls" else None, kind=KIND,
                           memory="32M", working_set="8M", warmup=2, verify_every=3)
    report = soak.format_result(result)
    assert result.failures == [], report
    assert result.migrations == 20 and result.verifications == 6, report  # both ends
    assert result.selfcheck_errors == 0, report
    for name in ("A", "B"):
        growth = result.growth(name)
        assert growth["fds_range"][0] == growth["fds_range"][1], report
        assert growth["threads_range"][0] == growth["threads_range"][1], report
        assert growth["rss"] <= 0.05, report
    assert result.passed, report
    assert (len(result.handshake_ms) == 20) == (mode == "tls")


def test_a_soak_that_leaks_fails():
    result = soak.SoakResult("plaintext", "simulated", 4, 1, migrations=8)
    for rss, fds in ((100, 9), (100, 9), (100, 10), (100, 10)):
        for name in ("A", "B"):
            result.samples[name].append(soak.Sample(rss << 20, fds, 7))
    assert not result.passed  # a descriptor more after a round trip
    result.samples["A"] = [soak.Sample(mib << 20, 9, 7) for mib in (100, 100, 108, 108)]
    result.samples["B"] = list(result.samples["A"])
    assert result.growth("A")["rss"] == pytest.approx(0.08)
    assert not result.passed


def test_a_process_receives_again_once_its_guest_migrated_away(guests, tmp_path):
    source = Session(guests(guest_config("simulated", memory=32 << 20, working_set=4 << 20)))
    destination = Session(destination=True)
    for session in (source, destination):
        session.incoming_options = {"limits": ANY_KIND}
    try:
        with pytest.raises(CommandError, match="this process runs a guest"):
            source.migrate_incoming("tcp:127.0.0.1:0")
        for sender, receiver in ((source, destination), (destination, source)):
            bound = receiver.migrate_incoming("tcp:127.0.0.1:0")
            assert receiver.run_state() == "inmigrate"
            sender.migrate(bound)
            assert sender.migration.wait(60).value == "completed", sender.query_migrate()
            assert receiver.guest_ready.wait(60)
            assert sender.run_state() == "postmigrate"
            assert receiver.run_state() == "running"
        assert source.guest.progress()["errors"] == 0
    finally:
        destination.close()
        source.close()
