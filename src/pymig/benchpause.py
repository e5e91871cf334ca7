"""Pausing a running KVM guest, timed in parts (``python -m pymig.benchpause``).

A KVM guest writing its working set is paused and resumed ``--pauses`` times, each pause
once the vCPU is back in guest mode, while ``--busy`` Python threads of the same process
spin (as a migration's own threads would: they hold the GIL in turns).  Per pause, from the
vCPU's :meth:`~pymig.kvm.vcpu.VcpuThread.pause_timeline`:

* **kick**: from the kick to KVM_RUN returning on the vCPU thread (the kernel's and the
  host scheduler's part: the vCPU thread must get a CPU to leave guest mode);
* **park**: from KVM_RUN returning to the vCPU parked (pymig's part);
* **wake**: from the park to ``pause()`` returning on the requesting thread (which must get
  the GIL back);
* **total**: ``pause()``'s own time.

``--park loop`` makes the vCPU park in its Python loop instead of inside KVM_RUN, as it did
before it parked without the GIL.  Distributions in ms (min, median, p90, p99, max); figures
go to docs/performance.md, never into code.
"""

from __future__ import annotations

import argparse
import json
import threading
import time


def _distribution(values_ms: list[float]) -> dict:
    if not values_ms:
        return {}
    xs = sorted(values_ms)

    def at(q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)

    return {"n": len(xs), "min": round(xs[0], 3), "p50": at(0.5), "p90": at(0.9),
            "p99": at(0.99), "max": round(xs[-1], 3)}


def run(pauses: int, busy: int, park: str, memory_mib: int = 64) -> dict:
    from pymig.guest import GuestConfig, create

    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i * i

    spinners = [threading.Thread(target=spin, name=f"busy{i}", daemon=True)
                for i in range(busy)]
    for t in spinners:
        t.start()
    config = GuestConfig("kvm", memory_mib << 20, vcpus=1, workload="dirtier",
                         params={"working_set_bytes": 4 << 20})
    parts: dict[str, list[float]] = {"kick": [], "park": [], "wake": [], "total": []}
    not_in_guest = 0
    guest = create(config)
    try:
        thread = guest.runtime.threads[0]
        thread._gate.park_here = park == "kvm-run"
        guest.start()
        for _ in range(pauses):
            written = guest.progress()["pages_written"]
            while guest.progress()["pages_written"] == written:  # back in guest mode
                time.sleep(0.0005)
            time.sleep(0.002)
            t0 = time.monotonic_ns()
            guest.pause()
            t1 = time.monotonic_ns()
            kicked, exited, parked = thread.pause_timeline()
            parts["total"].append((t1 - t0) / 1e6)
            if exited > kicked:
                parts["kick"].append((exited - kicked) / 1e6)
                parts["park"].append((parked - exited) / 1e6)
                parts["wake"].append((t1 - parked) / 1e6)
            else:
                not_in_guest += 1
            guest.resume()
    finally:
        stop.set()
        guest.close()
    return {"pauses": pauses, "busy_threads": busy, "parks_in": park,
            "pauses_not_in_kvm_run": not_in_guest,
            **{name: _distribution(values) for name, values in parts.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pymig.benchpause", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pauses", type=int, default=200)
    parser.add_argument("--busy", type=int, default=1, metavar="THREADS",
                        help="spinning Python threads in the process (default 1)")
    parser.add_argument("--park", choices=("kvm-run", "loop"), default="kvm-run")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.pauses, args.busy, args.park)), flush=True)


if __name__ == "__main__":
    main()
