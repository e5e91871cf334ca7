"""Both guests run each built-in workload as :mod:`pymig.guest.workloads` defines it.

Every test runs on a KVM guest (the assembly) and on a simulated guest (the native writers) and
holds both to the same host-side definitions: the parameter block, the dirtier's page sequence
replayed from its seed, the mailbox counters, the dirty log, the self-check invariant and the
compute reference.  The only allowed difference is the one the definitions name: a KVM vCPU can
stop in the middle of a page (its counters may lag RAM by that page, and one selfcheck page may
be half-stamped); a simulated writer stops between batches.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import pytest

from pymig.guest import GuestConfig, create
from pymig.guest.layout import PARAMS_GPA, WORKSET_GPA
from pymig.guest.workloads import (
    compute_share,
    dirtier_counts,
    dirtier_pages,
    expected_compute_result,
    fill_content,
    read_mailbox,
    resolve,
    unpack_params,
    verify_selfcheck,
)

MiB = 1 << 20
PAGE = 4096
KINDS = [pytest.param("simulated", id="sim"), pytest.param("kvm", id="kvm", marks=pytest.mark.kvm)]
pytestmark = pytest.mark.timeout(120)


@contextmanager
def running(kind: str, workload: str, params: dict, vcpus: int):
    """A started guest of ``kind``, closed however the test ends."""
    guest = create(GuestConfig(kind, 16 * MiB, vcpus=vcpus, workload=workload, params=params))
    try:
        guest.start()
        yield guest
    finally:
        guest.pause()
        guest.close()


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def first_bytes(guest, share) -> np.ndarray:
    area = guest.ram_blocks[0].array[share.first_gpa:share.first_gpa + share.npages * PAGE]
    return area.reshape(share.npages, PAGE)[:, 0].copy()


def check_dirtier_ram(guest, exact: bool) -> list[int]:
    """Each share's first bytes are the replayed writes; the counters count them.  Returns the
    writes each vCPU made."""
    workload = resolve(guest.config)
    writes = []
    for share, record in zip(workload.shares, read_mailbox(guest, workload.vcpus)):
        ram = first_bytes(guest, share)
        # A KVM vCPU counts a write after making it: it may have stopped in between.
        candidates = [record.pages_written] + ([] if exact else [record.pages_written + 1])
        made = [n for n in candidates
                if np.array_equal(ram, dirtier_counts(workload, share.index, n))]
        assert made, f"vCPU {share.index}: RAM is not the replay of {candidates} writes"
        n, m = made[0], share.npages
        assert record.passes in {n // m, (n - 1) // m}, (record, n, m)
        if exact:
            assert record.passes == n // m
        writes.append(n)
    area = guest.ram_blocks[0].array[WORKSET_GPA:WORKSET_GPA + workload.params.area_bytes]
    assert not area.reshape(-1, PAGE)[:, 1:].any(), "a dirtier write went past byte 0"
    return writes


def area_pages(bitmap: np.ndarray, workload) -> np.ndarray:
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
    first = WORKSET_GPA // PAGE
    return np.flatnonzero(bits[first:first + workload.params.area_pages])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_parameter_block_is_the_same_but_for_the_clock(kind, vcpus):
    params = {"working_set_bytes": 2 * MiB, "pattern": "hotspot", "rate_pages_per_s": 30_000}
    config = GuestConfig(kind, 16 * MiB, vcpus=vcpus, workload="dirtier", params=params)
    guest = create(config)
    try:
        block = unpack_params(guest.ram_blocks[0].array[PARAMS_GPA:PARAMS_GPA + PAGE])
    finally:
        guest.close()
    workload = resolve(config)
    assert (block.workload, block.vcpus, block.pattern, block.shares) == \
        ("dirtier", vcpus, "hotspot", workload.shares)
    assert block.hot_share_u32 == workload.params.hot_share_u32
    assert block.pacing.batch_pages == (3 if vcpus == 1 else 2)  # ~100 us of writes per vCPU
    tick_hz = block.pacing.ticks_per_us * 1e6
    assert block.pacing.ticks_per_batch / tick_hz == pytest.approx(
        block.pacing.batch_pages * vcpus / 30_000, rel=2e-3)
    assert block.pacing.max_lag_ticks / tick_hz == pytest.approx(0.1, rel=2e-3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_idle_touches_nothing(kind, vcpus):
    with running(kind, "idle", {}, vcpus) as guest:
        guest.pause()
        guest.start_dirty_log()
        guest.resume()
        time.sleep(0.05)
        guest.pause()
        assert not any(bitmap.any() for bitmap in guest.sync_dirty())
        assert guest.progress() == {"passes": 0, "pages_written": 0, "errors": 0, "done": 0,
                                    "result": 0}


@pytest.mark.parametrize("kind", KINDS)
def test_idle_fill_is_the_defined_random_content(kind):
    fill = 4 * MiB + 3 * PAGE
    with running(kind, "idle", {"fill_bytes": fill}, 1) as guest:
        guest.pause()
        ram = guest.ram_blocks[0].array
        assert np.array_equal(ram[WORKSET_GPA:WORKSET_GPA + fill], fill_content(fill))
        assert not ram[WORKSET_GPA + fill:].any()
        assert guest.progress()["pages_written"] == 0
        del ram


@pytest.mark.parametrize("kind", KINDS)
def test_a_destination_gets_no_fill(kind):
    config = GuestConfig(kind, 16 * MiB, workload="idle", params={"fill_bytes": 4 * MiB})
    guest = create(config, incoming=True)
    try:
        assert not guest.ram_blocks[0].array.any()
    finally:
        guest.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("pattern", ["uniform", "sequential", "hotspot"])
def test_dirtier_writes_the_defined_pages(kind, vcpus, pattern):
    params = {"working_set_bytes": 2 * MiB, "pattern": pattern, "rate_pages_per_s": 40_000}
    exact = kind == "simulated"
    with running(kind, "dirtier", params, vcpus) as guest:
        workload = resolve(guest.config)
        wait_for(lambda: guest.progress()["pages_written"] >= 1000, "1000 writes")
        guest.pause()
        before = check_dirtier_ram(guest, exact)
        ram_before = [first_bytes(guest, share) for share in workload.shares]

        # A window with dirty logging: the log names exactly the pages the writes changed.
        guest.start_dirty_log()
        guest.resume()
        wait_for(lambda: guest.progress()["pages_written"] >= sum(before) + 1500,
                 "1500 more writes")
        guest.pause()
        (bitmap, *_) = guest.sync_dirty()
        after = check_dirtier_ram(guest, exact)
        assert all(b < a for a, b in zip(after, before))
        changed, upcoming, hot, total = set(), set(), 0, 0
        for share, old, n in zip(workload.shares, ram_before, after):
            delta = (first_bytes(guest, share) - old).astype(np.int64)  # uint8: mod 256
            first = (share.first_gpa - WORKSET_GPA) // PAGE
            changed |= set((first + np.flatnonzero(delta)).tolist())
            upcoming.add(first + int(dirtier_pages(workload, share.index, n + 1)[-1]))
            hot += int(delta[:share.hot_pages].sum())
            total += int(delta.sum())
        logged = set(area_pages(bitmap, workload).tolist())
        # KVM logs a page when it makes it writable, before the write: a vCPU stopped there has
        # its next page logged, unwritten.
        assert changed <= logged <= changed | (set() if exact else upcoming)
        assert total == sum(after) - sum(before)  # < 256 writes per page: nothing wrapped
        if pattern == "hotspot":
            assert 0.8 < hot / total < 0.97, (hot, total)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_selfcheck_invariant_holds_whenever_it_stops(kind, vcpus):
    with running(kind, "selfcheck", {"working_set_bytes": MiB}, vcpus) as guest:
        for stop in range(4):
            wait_for(lambda: guest.progress()["passes"] >= stop + 2, f"{stop + 2} passes")
            guest.pause()
            report = verify_selfcheck(guest, exact=kind == "simulated")
            assert report.ok, report.detail
            assert report.errors == 0 and report.passes >= stop + 2
            guest.resume()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_compute_gives_the_reference_result_and_memory(kind, vcpus):
    params = {"region_bytes": 256 * 1024, "rounds": 6}
    with running(kind, "compute", params, vcpus) as guest:
        wait_for(lambda: guest.progress()["done"], "compute to finish")
        guest.pause()
        progress = guest.progress()
        assert progress["result"] == expected_compute_result(params, vcpus)
        workload = resolve(guest.config)
        assert progress["passes"] == 6 and progress["errors"] == 0
        assert progress["pages_written"] == (1 + 6) * workload.params.area_pages
        for share, record in zip(workload.shares, read_mailbox(guest, vcpus)):
            result, words = compute_share(share.seed, share.npages, 6)
            assert (record.result, record.done, record.passes) == (result, 1, 6)
            start = share.first_gpa
            assert np.array_equal(
                guest.ram_blocks[0].array[start:start + share.npages * PAGE].view("<u8"), words)
