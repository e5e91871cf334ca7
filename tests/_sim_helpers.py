"""Helpers for the simulated-guest tests, and the child side of the cross-process tests.

Run as a script (``python _sim_helpers.py JOB.json``) it plays a migration destination: it builds
an incoming guest from the job's configuration, fills its RAM from the job's memory files, loads
the saved writer states, resumes, lets the workload run, pauses, and prints a JSON report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pymig.guest.base import GuestConfig, GuestState
from pymig.guest.simulated import SimCpuState, SimulatedGuest
from pymig.guest.workloads import verify_selfcheck

MiB = 1 << 20
PAGE = 4096


@contextlib.contextmanager
def sim_guest(workload: str, params: dict[str, Any] | None = None, *, vcpus: int = 1,
              memory_bytes: int = 4 * MiB, incoming: bool = False) -> Iterator[SimulatedGuest]:
    """A simulated guest that is closed however the test ends."""
    config = GuestConfig("simulated", memory_bytes, vcpus=vcpus, workload=workload,
                         params=dict(params or {}))
    guest = SimulatedGuest.create(config, incoming=incoming)
    try:
        yield guest
    finally:
        guest.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; a generous bound so a stalled host fails, not hangs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def run_until(guest: SimulatedGuest, key: str, at_least: int) -> dict[str, int]:
    """Run (or resume) the guest until ``progress()[key] >= at_least``, pause it, and return its
    progress."""
    guest.resume()
    wait_for(lambda: guest.progress()[key] >= at_least, what=f"{key} >= {at_least}")
    guest.pause()
    return guest.progress()


def bitmap_pages(bitmap: np.ndarray, npages: int) -> np.ndarray:
    """Page indices whose bit is set (KVM layout: little-endian u64 words, bit i = page i)."""
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:npages]
    return np.flatnonzero(bits)


def pages_of(guest: SimulatedGuest, block: int) -> np.ndarray:
    ram = guest.ram_blocks[block]
    return ram.array.reshape(ram.npages, ram.page_size)


def copy_dirty(guest: SimulatedGuest, shadow: list[np.ndarray], bitmaps: list[np.ndarray]) -> int:
    """Copy the pages the bitmaps name into the shadow copy, as a migration pass would."""
    copied = 0
    for index, bitmap in enumerate(bitmaps):
        pages = bitmap_pages(bitmap, guest.ram_blocks[index].npages)
        shadow[index][pages] = pages_of(guest, index)[pages]
        copied += pages.size
    return copied


def migrate_in_process(source: SimulatedGuest, destination: SimulatedGuest) -> GuestState:
    """Copy a paused source's RAM and state into an incoming destination."""
    state = source.save_state()
    for src, dst in zip(source.ram_blocks, destination.ram_blocks):
        dst.array[:] = src.array
    destination.load_state(state)
    return state


def state_to_json(state: GuestState) -> list[dict[str, int]]:
    return [dataclasses.asdict(cpu) for cpu in state.cpus]


def state_from_json(cpus: list[dict[str, int]]) -> GuestState:
    return GuestState(cpus=[SimCpuState(**cpu) for cpu in cpus], devices={})


def run_destination(job: dict[str, Any]) -> dict[str, Any]:
    """The child side: continue a saved guest and report what it did."""
    config = GuestConfig.from_dict(job["config"])
    guest = SimulatedGuest.create(config, incoming=True)
    try:
        untouched = all(not block.touched().any() for block in guest.ram_blocks)
        for block, path in zip(guest.ram_blocks, job["memory"]):
            block.array[:] = np.fromfile(path, dtype=np.uint8)
        guest.load_state(state_from_json(job["state"]))
        before = guest.progress()
        if job["until"] == "done":
            after = run_until(guest, "done", 1)
        else:
            after = run_until(guest, "passes", before["passes"] + job["more_passes"])
        report: dict[str, Any] = {"untouched": untouched, "before": before, "after": after}
        if config.workload == "selfcheck":
            check = verify_selfcheck(guest, exact=True)
            report["selfcheck"] = {"ok": check.ok, "passes": check.passes,
                                   "errors": check.errors, "detail": check.detail}
        return report
    finally:
        guest.close()


if __name__ == "__main__":
    print(json.dumps(run_destination(json.loads(Path(sys.argv[1]).read_text()))))
