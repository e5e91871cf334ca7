"""Post-copy's benchmark: downtime and blocktime against a bare userfaultfd round trip,
measured in the same run (``python -m pymig.benchpostcopy``).

* **bare round trip**: one thread touches pages of a registered anonymous range one after
  the other (without the GIL, as a vCPU does); a handler thread built as post-copy's fault
  thread (poll, read the message, UFFDIO_COPY from a ready page) serves each.  Per fault:
  the time from the touch to its return.  A plain first touch of fresh memory beside it.
* **post-copy**: a guest migrated over loopback TCP between two threads of this process,
  switched to post-copy after one pass, its working set written all along: the downtime
  (vCPUs stopped at the source to running at the destination) with its phases, the total
  time, and the destination's blocktime per fault that waited for the source; once with
  the requested pages on the main channel, once on a preempt channel (postcopy-preempt),
  unless ``--preempt`` says one of them.
* **against pre-copy** (``--against-precopy``): the non-converging guest of the pre-copy
  benchmarks (``nonconv-512m``: a byte incremented in every page of the working set, 512 MiB
  by default, flat out) moved by pre-copy with auto-converge (``aim``), uncapped, then by
  post-copy after one pass: total time, downtime and the highest vCPU throttle of each
  (post-copy never throttles the guest).

Figures go to docs/performance.md, never into code.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import threading
import time

import numpy as np

from pymig.uffd import read_faults

PAGE = 4096


def bare_round_trip(npages: int = 2000) -> dict:
    """Median and mean µs per fault through a userfaultfd handler thread, and per plain
    first touch, over ``npages`` pages each."""
    from pymig._core import kvm as _kvm

    region = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    source = np.full(PAGE, 0x5A, dtype=np.uint8)
    uffd = _kvm.userfaultfd_open(os.O_CLOEXEC | os.O_NONBLOCK)
    _kvm.uffdio_api(uffd, _kvm.FEATURE_THREAD_ID)
    _kvm._unsafe_uffdio_register(uffd, base, npages * PAGE, _kvm.REGISTER_MODE_MISSING)
    stop_r, stop_w = os.pipe()

    def place(event: int, flags: int, address: int, tid: int) -> None:
        page = address & ~(PAGE - 1)
        _kvm._unsafe_uffdio_copy(uffd, page, source.ctypes.data, PAGE)

    def handler() -> None:
        read_faults(uffd, stop_r, place)

    thread = threading.Thread(target=handler, daemon=True)
    thread.start()
    scratch = ctypes.create_string_buffer(8)
    faults = []
    for page in range(npages):
        t0 = time.perf_counter_ns()
        ctypes.memmove(scratch, base + page * PAGE, 8)  # the GIL is let go for the call
        faults.append(time.perf_counter_ns() - t0)
    os.write(stop_w, b"x")
    thread.join()
    os.close(uffd)
    os.close(stop_r)
    os.close(stop_w)
    plain_region = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    plain_region.madvise(mmap.MADV_NOHUGEPAGE)
    plain_base = ctypes.addressof(ctypes.c_char.from_buffer(plain_region))
    touches = []
    for page in range(npages):
        t0 = time.perf_counter_ns()
        ctypes.memmove(plain_base + page * PAGE, scratch, 8)
        touches.append(time.perf_counter_ns() - t0)
    return {"pages": npages,
            "uffd_fault_median_us": float(np.median(faults)) / 1000,
            "uffd_fault_mean_us": float(np.mean(faults)) / 1000,
            "first_touch_median_us": float(np.median(touches)) / 1000}


def postcopy_migration(kind: str, memory_mib: int, working_set_mib: int,
                       preempt: bool = False, postcopy: bool = True,
                       workload: str = "selfcheck") -> dict:
    """One post-copy migration of a self-checking guest between two threads (loopback TCP);
    ``preempt``: with the postcopy-preempt capability.  ``postcopy`` False: pre-copy with
    auto-converge (``aim``) instead, the guest otherwise the same.  ``workload`` "dirtier":
    the benchmarks' non-converging guest (a byte incremented in every page of the working
    set in turn, flat out) instead of the self-checking one."""
    from pymig.guest import GuestConfig, create
    from pymig.guest.workloads import verify_selfcheck
    from pymig.incoming import Incoming
    from pymig.limits import DestinationLimits
    from pymig.machine import Machine
    from pymig.migration import Migration
    from pymig.parameters import ParameterStore

    params = {"working_set_bytes": working_set_mib << 20,
              "rate_pages_per_s": 0 if kind == "kvm" else 1_000_000}
    if workload == "dirtier":
        params = {"working_set_bytes": working_set_mib << 20, "pattern": "sequential",
                  "rate_pages_per_s": 0}
    config = GuestConfig(kind, memory_mib << 20, vcpus=1, workload=workload, params=params)
    guest = create(config)
    guest.start()
    while guest.progress()["passes"] < 1:
        time.sleep(0.01)
    incoming = Incoming("tcp:127.0.0.1:0", limits=DestinationLimits(
        accept_kinds=("kvm", "simulated")), postcopy=postcopy, postcopy_preempt=preempt)
    bound = incoming.listen()
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", incoming.run()),
                              daemon=True)
    thread.start()
    store = ParameterStore()
    if postcopy:
        store.set(**{"x-postcopy-after": 1})
        store.set_capabilities(**{"postcopy-ram": True, "postcopy-preempt": preempt})
    else:
        store.set(**{"x-cpu-throttle-mode": "aim"})
        store.set_capabilities(**{"auto-converge": True})
    migration = Migration(Machine.source(guest), store)
    migration.start(bound)
    migration.wait(600)
    thread.join(600)
    source = migration.query()
    dest = incoming.postcopy.query() if incoming.postcopy is not None else {}
    out = {"kind": kind, "memory_mib": memory_mib, "working_set_mib": working_set_mib,
           "mode": "postcopy" if postcopy else "precopy-auto-converge", "preempt": preempt,
           "cpu_throttle_peak": source.get("cpu-throttle-peak"),
           "passes": source.get("ram", {}).get("dirty-sync-count"),
           "status": source["status"], "downtime_ms": source.get("downtime"),
           "downtime_breakdown_ms": source.get("downtime-breakdown"),
           "total_ms": source.get("total-time"), "source": source.get("postcopy"),
           "destination": dest}
    if incoming.machine is not None:
        dguest = incoming.machine.guest
        dguest.pause()
        if workload == "selfcheck":
            out["selfcheck_errors"] = verify_selfcheck(dguest).errors
        incoming.machine.close()
    guest.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pymig.benchpostcopy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("kvm", "simulated"), default="kvm")
    parser.add_argument("--memory", type=int, default=1024, metavar="MIB")
    parser.add_argument("--working-set", type=int, default=None, metavar="MIB",
                        help="256 by default; 512 with --against-precopy (the pre-copy "
                             "benchmarks' non-converging guest)")
    parser.add_argument("--faults", type=int, default=2000)
    parser.add_argument("--preempt", choices=("off", "on", "both"), default="both",
                        help="requested pages on the main channel, on a preempt channel, or "
                             "one run of each (default)")
    parser.add_argument("--against-precopy", action="store_true",
                        help="move the same guest by pre-copy with auto-converge, then by "
                             "post-copy (with preempt), and compare their total times")
    args = parser.parse_args(argv)
    if args.working_set is None:
        args.working_set = 512 if args.against_precopy else 256
    if args.against_precopy:
        runs = [postcopy_migration(args.kind, args.memory, args.working_set, postcopy=False,
                                   workload="dirtier"),
                postcopy_migration(args.kind, args.memory, args.working_set, preempt=True,
                                   workload="dirtier")]
        for run in runs:
            print(json.dumps({"run": run}), flush=True)
        precopy, post = (r["total_ms"] for r in runs)
        print(json.dumps({"postcopy_total_over_precopy": round(post / precopy, 2)
                          if precopy and post else None}), flush=True)
        return
    bare = bare_round_trip(args.faults)
    print(json.dumps({"bare": bare}), flush=True)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.preempt]
    for preempt in modes:
        run = postcopy_migration(args.kind, args.memory, args.working_set, preempt)
        per_fault = run["destination"].get("blocktime-per-fault-us")
        run["blocktime_per_fault_over_bare_round_trip"] = (
            round(per_fault / bare["uffd_fault_median_us"], 2) if per_fault else None)
        print(json.dumps({"postcopy": run}), flush=True)


if __name__ == "__main__":
    main()
