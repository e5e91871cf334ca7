"""The simulated guest: lifecycle, dirty log, workloads in RAM, pause, throttle and pacing.

No timing is asserted tightly: bands are wide and windows long enough for a noisy 2-vCPU host.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from _sim_helpers import (
    MiB,
    PAGE,
    bitmap_pages,
    copy_dirty,
    pages_of,
    run_until,
    sim_guest,
    wait_for,
)
from pymig.errors import GuestError
from pymig.guest import create
from pymig.guest.base import Guest, GuestConfig
from pymig.guest.layout import MAILBOX_GPA, PARAMS_GPA, WORKSET_GPA
from pymig.guest.simulated import SimulatedGuest
from pymig.guest.workloads import (
    compute_share,
    expected_compute_result,
    resolve,
    unpack_params,
    verify_selfcheck,
)

MAILBOX_PAGE = MAILBOX_GPA // PAGE
pytestmark = pytest.mark.timeout(120)  # a deadlocked writer fails the test, not the run


def test_create_dispatches_and_implements_the_protocol():
    config = GuestConfig("simulated", 4 * MiB, workload="idle")
    guest = create(config)
    try:
        assert isinstance(guest, SimulatedGuest) and isinstance(guest, Guest)
        assert guest.status == "created" and guest.vcpu_count == 1
        assert [b.size_bytes for b in guest.ram_blocks] == [4 * MiB]
    finally:
        guest.close()
    assert guest.status == "shutdown"
    guest.close()
    with pytest.raises(ValueError, match="simulated"):
        SimulatedGuest.create(GuestConfig("kvm", 4 * MiB))


def test_lifecycle_transitions():
    with sim_guest("selfcheck", {"working_set_bytes": MiB}) as guest:
        guest.pause()  # nothing to pause yet: a no-op
        assert guest.status == "created"
        guest.start()
        assert guest.status == "running"
        with pytest.raises(GuestError, match="created"):
            guest.start()
        with pytest.raises(GuestError, match="stopped"):
            guest.save_state()
        guest.pause()
        assert guest.status == "paused"
        guest.resume()
        guest.resume()
        assert guest.status == "running"
        guest.pause()
        assert b"selfcheck" in guest.console.data()
        guest.close()
        for call in (guest.pause, guest.resume, guest.progress, guest.start_dirty_log):
            with pytest.raises(GuestError):
                call()


def test_source_writes_the_parameter_block_and_destination_writes_nothing():
    params = {"working_set_bytes": 2 * MiB, "rate_pages_per_s": 1000}
    with sim_guest("selfcheck", params, vcpus=2, memory_bytes=8 * MiB) as source:
        block = source.ram_blocks[0].array
        assert unpack_params(block[PARAMS_GPA:PARAMS_GPA + PAGE]).shares == \
            resolve(source.config).shares
        assert not block[MAILBOX_GPA:MAILBOX_GPA + PAGE].any()
    with sim_guest("selfcheck", params, vcpus=2, memory_bytes=8 * MiB, incoming=True) as dest:
        dest.start_dirty_log()
        with pytest.raises(GuestError, match="load_state"):
            dest.resume()
        with pytest.raises(GuestError, match="no vCPU state"):
            dest.save_state()
        dest.stop_dirty_log()
        assert all(not b.touched().any() for b in dest.ram_blocks)


def test_idle_touches_no_memory():
    with sim_guest("idle", vcpus=2) as guest:
        guest.start_dirty_log()
        guest.start()
        time.sleep(0.05)
        guest.pause()
        assert not any(b.any() for b in guest.sync_dirty())
        assert guest.progress()["pages_written"] == 0


# --- dirty log -----------------------------------------------------------------------------

def test_sync_needs_logging_and_logs_nothing_from_before():
    with sim_guest("selfcheck", {"working_set_bytes": MiB}) as guest:
        with pytest.raises(GuestError, match="dirty logging"):
            guest.sync_dirty()
        run_until(guest, "passes", 2)
        guest.start_dirty_log()
        assert not any(b.any() for b in guest.sync_dirty())
        guest.stop_dirty_log()
        with pytest.raises(GuestError):
            guest.sync_dirty()


def test_dirty_log_is_exactly_the_pages_that_changed():
    """Selfcheck changes a page with every stamp, so dirty == changed, both ways."""
    params = {"working_set_bytes": 2 * MiB, "rate_pages_per_s": 20_000}
    with sim_guest("selfcheck", params, vcpus=2) as guest:
        guest.start_dirty_log()
        for _ in range(3):
            before = pages_of(guest, 0).copy()
            guest.sync_dirty()  # forget what happened before the snapshot
            guest.resume()
            wait_for(lambda: guest.progress()["pages_written"] > 0, what="some writes")
            time.sleep(0.02)
            guest.pause()
            (bitmap,) = guest.sync_dirty()
            changed = np.flatnonzero((pages_of(guest, 0) != before).any(axis=1))
            dirty = bitmap_pages(bitmap, guest.ram_blocks[0].npages)
            assert MAILBOX_PAGE in dirty
            assert dirty.tolist() == changed.tolist()
            assert not guest.sync_dirty()[0].any()  # sync cleared what it returned


def test_clear_dirty_is_a_checked_no_op():
    with sim_guest("dirtier", {"working_set_bytes": MiB, "pattern": "sequential"}) as guest:
        guest.start_dirty_log()
        run_until(guest, "passes", 1)
        (bitmap,) = guest.sync_dirty()
        guest.clear_dirty(0, 0, guest.ram_blocks[0].npages)
        assert bitmap_pages(bitmap, guest.ram_blocks[0].npages).size == 257  # 256 + mailbox
        with pytest.raises(ValueError):
            guest.clear_dirty(0, 10, guest.ram_blocks[0].npages)


@pytest.mark.parametrize("workload, params", [
    ("dirtier", {"working_set_bytes": 2 * MiB, "pattern": "uniform"}),
    ("selfcheck", {"working_set_bytes": 2 * MiB}),
    ("compute", {"region_bytes": MiB, "rounds": 1_000_000}),
])
def test_no_write_is_lost_by_concurrent_syncs(workload, params):
    """Migration's property: copy the dirty pages while the writers run; after pause and a final
    sync, the copy equals guest memory exactly."""
    with sim_guest(workload, params, vcpus=2) as guest:
        guest.start()
        guest.start_dirty_log()
        shadow = [pages_of(guest, i).copy() for i in range(len(guest.ram_blocks))]
        rounds, copied = 0, 0
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            copied += copy_dirty(guest, shadow, guest.sync_dirty())
            rounds += 1
        guest.pause()
        copy_dirty(guest, shadow, guest.sync_dirty())
        for i in range(len(guest.ram_blocks)):
            assert np.array_equal(shadow[i], pages_of(guest, i))
        assert rounds > 10 and copied > 0
        assert guest.progress()["errors"] == 0


# --- workloads in RAM ----------------------------------------------------------------------

def test_selfcheck_keeps_its_invariant_with_two_vcpus():
    with sim_guest("selfcheck", {"working_set_bytes": MiB}, vcpus=2) as guest:
        for _ in range(5):
            written = guest.progress()["pages_written"]
            run_until(guest, "pages_written", written + 1)
            report = verify_selfcheck(guest, exact=True)
            assert report.ok, report.detail
            assert report.passes == guest.progress()["passes"]


def test_compute_result_and_final_memory_match_the_reference():
    params = {"region_bytes": 256 * 1024, "rounds": 20}
    with sim_guest("compute", params, vcpus=2) as guest:
        progress = run_until(guest, "done", 1)
        assert progress["result"] == expected_compute_result(params, 2)
        assert progress["passes"] == 20
        assert progress["pages_written"] == 64 * 21
        for share in resolve(guest.config).shares:
            _, words = compute_share(share.seed, share.npages, 20)
            start = share.first_gpa
            ram = guest.ram_blocks[0].array[start:start + share.npages * PAGE].view("<u8")
            assert np.array_equal(ram, words)


def test_dirtier_writes_increment_first_bytes_only():
    params = {"working_set_bytes": 512 * 1024, "rate_pages_per_s": 20_000,
              "pattern": "sequential"}
    with sim_guest("dirtier", params, vcpus=2) as guest:
        written = run_until(guest, "pages_written", 500)["pages_written"]
        pages = pages_of(guest, 0)[WORKSET_GPA // PAGE:WORKSET_GPA // PAGE + 128]
        assert not pages[:, 1:].any()
        counts = pages[:, 0].astype(np.int64)
        assert counts.sum() == written  # < 256 writes per page: no byte wrapped
        # Sequential: within each share, counts differ by one at most, higher ones first.
        for half in (counts[:64], counts[64:]):
            assert half.max() - half.min() <= 1 and np.all(np.diff(half) <= 0)


def test_hotspot_sends_the_hot_share_of_writes_to_the_hot_pages():
    params = {"working_set_bytes": 4 * MiB, "rate_pages_per_s": 40_000, "pattern": "hotspot",
              "hot_fraction": 0.1, "hot_share": 0.9}
    with sim_guest("dirtier", params, vcpus=2, memory_bytes=8 * MiB) as guest:
        written = run_until(guest, "pages_written", 5000)["pages_written"]
        counts = pages_of(guest, 0)[:, 0].astype(np.int64)
        assert counts[WORKSET_GPA // PAGE:].sum() == written, "a first byte wrapped"
        hot = sum(counts[s.first_gpa // PAGE:s.first_gpa // PAGE + s.hot_pages].sum()
                  for s in resolve(guest.config).shares)
        assert 0.85 < hot / written < 0.95


def test_uniform_spreads_writes_over_the_share():
    params = {"working_set_bytes": 4 * MiB, "rate_pages_per_s": 40_000}
    with sim_guest("dirtier", params, memory_bytes=8 * MiB) as guest:
        run_until(guest, "pages_written", 8000)
        counts = pages_of(guest, 0)[WORKSET_GPA // PAGE:WORKSET_GPA // PAGE + 1024, 0]
        first_tenth = counts[:102].astype(np.int64).sum() / counts.astype(np.int64).sum()
        assert 0.07 < first_tenth < 0.13


# --- pause, pacing, throttle ---------------------------------------------------------------

def test_pause_stops_every_writer():
    with sim_guest("dirtier", {"working_set_bytes": 2 * MiB}, vcpus=2) as guest:
        run_until(guest, "pages_written", 10_000)
        snapshot = pages_of(guest, 0).copy()
        written = guest.progress()["pages_written"]
        time.sleep(0.05)
        assert guest.progress()["pages_written"] == written
        assert np.array_equal(snapshot, pages_of(guest, 0))


def _rate(guest: SimulatedGuest, seconds: float) -> float:
    """Pages per second the guest writes over ``seconds`` of running."""
    before = guest.progress()["pages_written"]
    start = time.monotonic()
    guest.resume()
    time.sleep(seconds)
    guest.pause()
    elapsed = time.monotonic() - start
    return (guest.progress()["pages_written"] - before) / elapsed


@pytest.mark.parametrize("asked, vcpus", [(2_000, 1), (20_000, 2)])
def test_pacing_holds_the_asked_rate(asked, vcpus):
    params = {"working_set_bytes": 2 * MiB, "rate_pages_per_s": asked}
    with sim_guest("dirtier", params, vcpus=vcpus) as guest:
        rate = _rate(guest, 1.0)
        assert 0.5 * asked < rate < 1.5 * asked


def test_throttle_takes_its_share_of_run_time():
    params = {"working_set_bytes": 2 * MiB, "rate_pages_per_s": 20_000}
    with sim_guest("dirtier", params) as guest:
        with pytest.raises(ValueError):
            guest.set_throttle(100)
        guest.set_throttle(50)
        assert guest.throttle == 50
        rate = _rate(guest, 1.0)
        assert 0.25 * 20_000 < rate < 0.75 * 20_000
        guest.set_throttle(0)
        rate = _rate(guest, 0.5)
        assert rate > 0.75 * 20_000


def test_heavy_throttle_slows_a_writer_that_runs_flat_out():
    with sim_guest("selfcheck", {"working_set_bytes": 2 * MiB}) as guest:
        free = _rate(guest, 0.3)
        guest.set_throttle(95)
        throttled = _rate(guest, 0.3)
        assert throttled < 0.3 * free
        assert guest.progress()["errors"] == 0
