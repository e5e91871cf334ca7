"""``pymig demo``: a live migration of a running, self-checking guest between two processes.

It starts a destination (``pymig incoming tcp:127.0.0.1:0``) and a source (``pymig run`` with
the self-checking workload: a real KVM guest where /dev/kvm works, else the simulated guest),
lets the guest run, migrates it over loopback TCP while it keeps stamping its pages, and then
proves it carries on at the destination: its pass counter keeps growing there and its
self-check finds every page consistent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from pymig.qmp import QmpClient, wait_for_socket

MiB = 1 << 20


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass
class DemoOptions:
    simulated: bool | None = None  # None: KVM when /dev/kvm works
    memory: int = 1024 * MiB
    working_set: int = 128 * MiB
    rate: int = 0  # pages/s; 0: as fast as the guest can (the simulated guest: 200k)
    vcpus: int = 1
    transport: str = "tcp"
    downtime_limit_ms: int = 300
    max_bandwidth: int = 0
    compression: str = "lz4"
    mem_prealloc: bool = False  # the destination faults its RAM in before it listens
    warmup_s: float = 1.0
    timeout_s: float = 120.0


def run_demo(options: DemoOptions, *, on_update: Callable[[dict], None] | None = None,
             say: Callable[[str], None] = lambda text: None) -> dict:
    """Run the demo; returns the final ``query-migrate`` stats plus ``guest_verified`` and
    the evidence behind it."""
    simulated = (not kvm_usable()) if options.simulated is None else options.simulated
    kind = "simulated" if simulated else "kvm"
    rate = options.rate or (200_000 if simulated else 0)
    with tempfile.TemporaryDirectory(prefix="pymig-demo-") as tmp:
        dst_ctl, src_ctl = os.path.join(tmp, "dst.sock"), os.path.join(tmp, "src.sock")
        listen = ("tcp:127.0.0.1:0" if options.transport == "tcp"
                  else f"unix:{os.path.join(tmp, 'migration.sock')}")
        python = [sys.executable, "-m", "pymig"]
        procs: list[subprocess.Popen] = []
        try:
            dst = subprocess.Popen(
                python + ["incoming", listen, "--control", dst_ctl, "--quiet",
                          "--accept-kind", kind,
                          "--serial", os.path.join(tmp, "dst-serial.log"),
                          *(["--memory", str(options.memory), "--mem-prealloc"]
                            if options.mem_prealloc else [])],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(tmp, "dst.err"), "wb"))
            procs.append(dst)
            src_args = ["run", "--workload", "selfcheck", "--memory", str(options.memory),
                        "--working-set", str(options.working_set), "--rate", str(rate),
                        "--vcpus", str(options.vcpus), "--control", src_ctl, "--quiet",
                        "--serial", os.path.join(tmp, "src-serial.log")]
            if simulated:
                src_args.append("--simulated")
            src = subprocess.Popen(python + src_args, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL,
                                   stderr=open(os.path.join(tmp, "src.err"), "wb"))
            procs.append(src)
            wait_for_socket(dst_ctl, dst, "destination", 60)
            wait_for_socket(src_ctl, src, "source", 60)
            with QmpClient(dst_ctl) as dq, QmpClient(src_ctl) as sq:
                uri = dq.command("query-migrate")["socket-address"]
                say(f"source: {kind} guest, {options.memory // MiB} MiB RAM, self-checking "
                    f"{options.working_set // MiB} MiB working set; destination on {uri}")
                time.sleep(options.warmup_s)
                before = sq.command("query-guest")["progress"]
                sq.command("migrate-set-parameters", **{
                    "downtime-limit": options.downtime_limit_ms,
                    "max-bandwidth": options.max_bandwidth,
                    "compression": options.compression})
                sq.command("migrate", uri=uri)
                from pymig.monitor import follow

                final = follow(sq, on_update=on_update, timeout=options.timeout_s).info
                result = dict(final)
                result["guest_kind"] = kind
                result["progress_before_migration"] = before
                if final.get("status") != "completed":
                    result["guest_verified"] = False
                    return result
                result.update(_verify_destination(dq))
                sq.command("quit")
                dq.command("quit")
            for proc in procs:
                proc.wait(30)
            return result
        except BaseException:
            for proc in procs:
                err = os.path.join(tmp, ("dst" if proc is procs[0] else "src") + ".err")
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if os.path.exists(err):
                    text = open(err, errors="replace").read().strip()
                    if text:
                        say(text[-2000:])
            raise


def _verify_destination(dq: QmpClient) -> dict:
    """The guest carries on at the destination: its passes grow and its self-check holds."""
    first = dq.command("query-guest")["progress"]
    deadline = time.monotonic() + 10
    later = first
    while later["passes"] <= first["passes"] and time.monotonic() < deadline:
        time.sleep(0.1)
        later = dq.command("query-guest")["progress"]
    dq.command("stop")
    checked = dq.command("query-guest", verify=True)
    dq.command("cont")
    selfcheck = checked.get("selfcheck", {})
    verified = bool(later["passes"] > first["passes"] and selfcheck.get("ok")
                    and later["errors"] == 0)
    return {"guest_verified": verified, "destination_progress": later,
            "destination_selfcheck": selfcheck}
