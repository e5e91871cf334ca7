"""pymig.experiment: guests, dirty rates and migrations from Python, results as rows."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from _migration_helpers import GUEST_KINDS, wait_for
from pymig import experiment
from pymig.experiment import Destination, Source, frame, migration_settings

MiB = 1 << 20


def test_settings_map_to_qmp_names():
    qmp, caps = migration_settings(downtime_limit=50, max_bandwidth="100M", compression="none",
                                   auto_converge=True, switchover_capped=True,
                                   params={"max-cpu-throttle": 80})
    assert qmp == {"downtime-limit": 50, "max-bandwidth": 100 * MiB, "compression": "none",
                   "x-switchover-capped": True, "max-cpu-throttle": 80}
    assert caps == {"auto-converge": True}
    qmp, caps = migration_settings(dirty_limit=2000)
    assert qmp == {"vcpu-dirty-limit": 2000} and caps == {"dirty-limit": True}
    with pytest.raises(ValueError, match="unknown migration setting 'bandwidth'"):
        migration_settings(bandwidth=5)


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_measure_migrate_and_read_the_rows(kind):
    with Source.start("dirtier", kind=kind, memory="64M", working_set="8M", rate=5000,
                      warmup_s=0.3) as source:
        data, zero = source.data_pages()
        assert data >= 2048 and 0 <= zero <= data
        began = time.monotonic()
        profile = source.zero_profile(16)
        data, zero = source.data_pages()
        # the guest goes on writing, at most its rate's worth of pages (twice over) meanwhile
        written = 2 * 5000 * (time.monotonic() - began)
        assert len(profile) == 16 and all(0 <= share <= 1 for share in profile)
        # the stretches are equal, so their mean is the zero share (to a page a stretch)
        assert np.mean(profile) == pytest.approx(zero / data, abs=(16 + written) / data)
        rate = source.dirty_rate("500ms", mode="dirty-bitmap")
        assert rate["status"] == "measured"
        assert rate["write-rate-pages"] == pytest.approx(5000, rel=0.3)
        with Destination() as destination:
            run = source.migrate(destination, downtime_limit=300, max_bandwidth="200M",
                                 compression="none")
            assert run.status == "completed", run.stats
            arrived = destination.session.guest
            before = arrived.progress()["pages_written"]
            wait_for(lambda: arrived.progress()["pages_written"] > before,
                     what="the guest to run at the destination")
    row = run.summary()
    assert row["kind"] == kind and row["rate_pages_per_s"] == 5000
    assert row["max_bandwidth"] == "200M" and row["converged"] is True
    assert row["total_ms"] > 0 and row["downtime_ms"] > 0 and row["iterations"] >= 2
    assert row["transferred_bytes"] >= 8 * MiB
    json.dumps(row)
    assert len(run.trace) == row["iterations"]
    assert {"time", "iteration", "dirty_pages", "pending_bytes", "bandwidth",
            "reason"} <= set(run.trace[0])
    assert run.trace[-1]["action"] == "switchover"


def test_a_run_that_cannot_converge_ends_cancelled_and_the_guest_stays():
    with Source.start("dirtier", kind="simulated", memory="64M", working_set="16M",
                      rate=50_000, warmup_s=0.2) as source:
        with Destination() as destination:
            run = source.migrate(destination, downtime_limit=20, max_bandwidth=20_000_000,
                                 switchover_capped=True, compression="none",
                                 max_total_time=1500, limit_action="cancel")
        assert run.status == "cancelled" and not run.converged
        assert run.summary()["downtime_ms"] is None
        assert source.guest.status == "running"


def test_a_destination_in_its_own_process():
    with Source.start("selfcheck", kind="simulated", memory="32M", working_set="4M",
                      rate=20_000) as source:
        with Destination(process=True) as destination:
            assert destination.uri.startswith("tcp:127.0.0.1:")
            run = source.migrate(destination.uri)
            assert run.status == "completed", run.stats
            assert destination.wait_guest(30)
        assert source.session.moved_away()


def test_rows_make_a_frame_with_pandas_and_say_so_without(monkeypatch):
    rows = [{"rate": 1, "total_ms": 10.0}, {"rate": 2, "total_ms": 20.0}]
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs pandas"):
            frame(rows)
    else:
        assert list(frame(rows)["total_ms"]) == [10.0, 20.0]


def test_a_guest_no_pymig_runs_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="do not fit"):
        Source.start("dirtier", kind="simulated", memory="4M", working_set="64M")
    assert experiment.resolve_kind("simulated") == "simulated"
