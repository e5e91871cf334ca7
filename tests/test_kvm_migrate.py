"""Pause -> save state and memory -> restore into a fresh VM in another process -> resume."""

from __future__ import annotations

import pytest
from _kvm_helpers import kvm_config, run_destination, save_for_destination, wait_for

from pymig.guest.kvm_guest import KvmGuest
from pymig.guest.workloads import expected_compute_result, verify_selfcheck

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]


@pytest.mark.parametrize("vcpus", [1, 2])
def test_selfcheck_continues_in_another_process(tmp_path, vcpus):
    config = kvm_config("selfcheck", {"working_set_bytes": 8 << 20}, vcpus=vcpus)
    with KvmGuest.create(config) as guest:
        guest.start()
        wait_for(lambda: guest.progress()["passes"] >= 3, what="three passes")
        guest.pause()
        source = verify_selfcheck(guest)
        assert source.ok, source.detail
        state = guest.save_state()
        passes = guest.progress()["passes"]
        save_for_destination(guest, state, tmp_path)

    out = run_destination(tmp_path, "selfcheck")

    assert out["untouched_before_load"]
    assert out["start"]["passes"] == passes
    assert out["progress"]["passes"] >= passes + 2
    assert out["progress"]["errors"] == 0
    assert out["selfcheck"]["ok"], out["selfcheck"]["detail"]
    saved_tsc = [cpu.tsc for cpu in state.cpus]
    assert all(loaded >= saved for loaded, saved in zip(out["tsc_loaded"], saved_tsc))
    assert all(after > saved for after, saved in zip(out["tsc_after"], saved_tsc))


@pytest.mark.parametrize("vcpus", [1, 2])
def test_compute_result_survives_migration_half_way(tmp_path, vcpus):
    params = {"rounds": 48, "region_bytes": 1 << 20, "rate_pages_per_s": 20000}
    config = kvm_config("compute", params, vcpus=vcpus)
    with KvmGuest.create(config) as guest:
        guest.start()
        wait_for(lambda: guest.progress()["passes"] >= 4, what="four compute rounds")
        guest.pause()
        half_way = guest.progress()
        state = guest.save_state()
        save_for_destination(guest, state, tmp_path)
    assert not half_way["done"]

    out = run_destination(tmp_path, "compute")

    assert out["progress"]["done"] == 1
    assert out["progress"]["passes"] == params["rounds"]
    assert out["progress"]["result"] == expected_compute_result(params, vcpus)


def test_compute_runs_to_the_expected_result_in_place():
    params = {"rounds": 16, "region_bytes": 1 << 20}
    with KvmGuest.create(kvm_config("compute", params)) as guest:
        guest.start()
        wait_for(lambda: guest.progress()["done"], what="compute to finish")
        guest.pause()
        assert guest.progress()["result"] == expected_compute_result(params)
        assert guest.events[-1][1] == 2  # EV_DONE


@pytest.fixture
def selfcheck_guest():
    """A selfcheck guest paused after two passes over 4 MiB."""
    with KvmGuest.create(kvm_config("selfcheck", {"working_set_bytes": 4 << 20})) as guest:
        guest.start()
        wait_for(lambda: guest.progress()["passes"] >= 2, what="two passes")
        guest.pause()
        yield guest


def test_pause_save_load_resume_in_the_same_process(selfcheck_guest):
    guest = selfcheck_guest
    state = guest.save_state()
    guest.load_state(state)
    before = guest.progress()["passes"]
    guest.resume()
    wait_for(lambda: guest.progress()["passes"] >= before + 2, what="more passes")
    guest.pause()
    report = verify_selfcheck(guest)
    assert report.ok, report.detail


def test_selfcheck_detects_a_corrupted_page(selfcheck_guest):
    guest = selfcheck_guest
    low = guest.ram_blocks[0].array
    victim = 0x100000 + 700 * 4096
    low[victim + 8] ^= 0xFF  # the frame number of page 700
    del low
    assert not verify_selfcheck(guest).ok
    guest.resume()
    wait_for(lambda: guest.progress()["errors"] >= 1, what="the guest to notice")
    guest.pause()
    assert any(code == 3 for _, code, _ in guest.events)  # EV_ERROR
