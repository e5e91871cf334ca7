"""Background snapshots' benchmark: how long one takes, and how much it slows the guest, against
a live snapshot of the same guest in the same run (``python -m pymig.benchbgsnapshot``).

A self-checking guest writes its working set; its write rate (pages/s, from its own counters)
is measured for a while before anything starts.  Then, to the same directory:

* **background**: a ``file:`` snapshot with the background-snapshot capability: total time,
  downtime (the stop to protect RAM) with its phases, the guest's write rate while the pages
  were being saved, the write faults and the pages copied aside;
* **live**: a plain ``file:`` snapshot (pre-copy passes, then a stop-and-copy): total time,
  downtime, the guest's write rate meanwhile.

Each file is restored and its guest's self-check run.  Figures go to docs/performance.md,
never into code.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

RATE_WINDOW_S = 1.0


def _written(guest) -> int:
    return guest.progress()["pages_written"]


def _rate(guest, seconds: float) -> float:
    before, t0 = _written(guest), time.monotonic()
    time.sleep(seconds)
    return (_written(guest) - before) / (time.monotonic() - t0)


def snapshot(guest, path: str, *, background: bool, params: dict | None = None) -> dict:
    """One ``file:`` snapshot of the running ``guest`` to ``path``; its figures, and the
    guest's write rate (pages/s) while it ran."""
    from pymig.machine import Machine
    from pymig.migration import Migration
    from pymig.parameters import ParameterStore

    store = ParameterStore()
    if params:
        store.set(**params)
    if background:
        store.set_capabilities(**{"background-snapshot": True})
    migration = Migration(Machine.source(guest), store)
    before, t0 = _written(guest), time.monotonic()
    migration.start(f"file:{path}")
    status = migration.wait(600).value
    elapsed = time.monotonic() - t0
    written = _written(guest) - before
    info = migration.query()
    return {"status": status, "total_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "downtime_breakdown_ms": info.get("downtime-breakdown"),
            "guest_pages_per_s_during": round(written / elapsed) if elapsed > 0 else None,
            "wire_bytes": info.get("ram", {}).get("transferred"),
            "background_snapshot": info.get("background-snapshot")}


def restore_checks(path: str) -> int:
    """Restore ``path`` and run its guest's self-check; the errors it found."""
    from pymig.guest.workloads import verify_selfcheck
    from pymig.incoming import Incoming
    from pymig.limits import DestinationLimits

    result = Incoming(f"file:{path}", limits=DestinationLimits(
        accept_kinds=("kvm", "simulated"))).run()
    guest = result.machine.guest
    try:
        guest.pause()
        return verify_selfcheck(guest).errors
    finally:
        result.machine.close()


def run(kind: str, memory_mib: int, working_set_mib: int, directory: str,
        params: dict | None = None) -> dict:
    """The guest's rate alone, then a background and a live snapshot of it."""
    from pymig.guest import GuestConfig, create

    config = GuestConfig(kind, memory_mib << 20, vcpus=1, workload="selfcheck",
                         params={"working_set_bytes": working_set_mib << 20,
                                 "rate_pages_per_s": 0 if kind == "kvm" else 1_000_000})
    guest = create(config)
    try:
        guest.start()
        while guest.progress()["passes"] < 1:
            time.sleep(0.01)
        out = {"kind": kind, "memory_mib": memory_mib, "working_set_mib": working_set_mib,
               "params": params or {},
               "guest_pages_per_s_alone": round(_rate(guest, RATE_WINDOW_S))}
        for name, background in (("background", True), ("live", False)):
            path = os.path.join(directory, f"{name}.pymig")
            out[name] = snapshot(guest, path, background=background, params=params)
            out[name]["restored_selfcheck_errors"] = restore_checks(path)
            os.unlink(path)
        return out
    finally:
        guest.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pymig.benchbgsnapshot",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("kvm", "simulated"), default="kvm")
    parser.add_argument("--memory", type=int, default=1024, metavar="MIB")
    parser.add_argument("--working-set", type=int, default=256, metavar="MIB")
    parser.add_argument("--dir", default=None, help="where the snapshots go (default: a "
                                                    "temporary directory)")
    parser.add_argument("--max-bandwidth", type=int, default=0, metavar="BYTES_PER_S")
    parser.add_argument("--compression", choices=("lz4", "none"), default="lz4")
    args = parser.parse_args(argv)
    params = {"max-bandwidth": args.max_bandwidth, "compression": args.compression}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        print(json.dumps(run(args.kind, args.memory, args.working_set, directory, params)),
              flush=True)


if __name__ == "__main__":
    main()
