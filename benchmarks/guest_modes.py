"""How fast a guest's own code runs in each x86 mode, under pymig and (optionally) QEMU.

    PYTHONPATH=tests .venv/bin/python benchmarks/guest_modes.py [--seconds S] [--qemu] [--json F]

The images and loops are those of ``tests/_mode_images.py``: a register loop and a store loop
in real mode, 16-bit and 32-bit protected mode (paging off and on), long mode with 32-bit code,
64-bit code at CPL 0 and at CPL 3, each in a PC boot sector, and the ``--flat`` / ``--flat64``
entries pymig offers.  Each is counted under pymig; with ``--qemu`` every boot sector is also
booted by QEMU (through SeaBIOS, from a disk image) and counted through QEMU's monitor (``info
registers``), so both VMMs run the same instructions on the same /dev/kvm.

Rates are instructions per wall second and per CPU-second of the vCPU (pymig: the vCPU
thread's CPU clock; QEMU: the whole process, almost all of it its vCPU thread, after SeaBIOS);
on a shared host compare the second.  A mode this host's KVM cannot run shows how it failed.

QEMU is not a dependency of pymig: ``--qemu`` needs ``qemu-system-x86_64`` on PATH (Debian:
``apt-get install qemu-system-x86``); it runs as ``qemu-system-x86_64 -accel kvm -cpu
host,-arch-capabilities -m 256 -net none -no-reboot`` (the CPU model the comparison in
docs/performance.md used).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _mode_images import (LOOPS, MODE_BY_NAME, MODES, REFERENCE, Rate, _rate,  # noqa: E402
                          build, in_loop, measure_pymig)

from pymig.errors import GuestError  # noqa: E402

QEMU = "qemu-system-x86_64"
QEMU_ARGS = ["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "256", "-net", "none",
             "-display", "none", "-serial", "none", "-parallel", "none", "-no-reboot"]
_ACC = re.compile(r"\b[RE]AX=([0-9a-f]+)")
_IP = re.compile(r"\b[RE]IP=([0-9a-f]+)")


class QemuStopped(RuntimeError):
    """QEMU ended or stopped the guest before or while its loop ran."""


class Monitor:
    """QEMU's human monitor on a unix socket, one command at a time."""

    def __init__(self, path: Path, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self._read_prompt()

    def _read_prompt(self) -> str:
        data = b""
        while not data.endswith(b"(qemu) "):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QemuStopped("QEMU's monitor closed")
            data += chunk
        return data.decode(errors="replace")

    def command(self, line: str) -> str:
        try:
            self.sock.sendall(line.encode() + b"\n")
        except OSError as exc:
            raise QemuStopped(f"QEMU's monitor closed ({exc})") from None
        return self._read_prompt()

    def close(self) -> None:
        self.sock.close()


def _process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_qemu(path: Path, mode: str, kind: str, seconds: float = 1.0,
                 cpu_seconds: float = 0.2, boot_timeout: float = 120.0) -> Rate:
    """Boot the boot sector of ``mode`` in QEMU (SeaBIOS first) and count its loop as
    :func:`measure_pymig` does."""
    if MODE_BY_NAME[mode].image != "bootsector":
        raise ValueError(f"QEMU runs only the boot sectors, not {mode!r}")
    with tempfile.TemporaryDirectory(prefix="pymig-qemu-") as tmp:
        disk = Path(tmp) / "disk.img"
        disk.write_bytes(path.read_bytes().ljust(1 << 20, b"\0"))
        sock = Path(tmp) / "monitor.sock"
        proc = subprocess.Popen(
            [QEMU, *QEMU_ARGS, "-drive", f"file={disk},format=raw",
             "-monitor", f"unix:{sock},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            monitor = Monitor(sock)

            def sample():
                regs = monitor.command("info registers")
                status = monitor.command("info status")
                if "running" not in status:
                    raise QemuStopped(status.split("\n")[1].strip())
                return (int(_ACC.search(regs).group(1), 16), time.perf_counter(),
                        _process_cpu(proc.pid), int(_IP.search(regs).group(1), 16))

            deadline = time.perf_counter() + boot_timeout
            first = sample()
            while not in_loop(mode, first[3]):  # SeaBIOS first
                if time.perf_counter() > deadline:
                    raise QemuStopped(f"the loop did not start in {boot_timeout} s")
                time.sleep(0.1)
                first = sample()
            while time.perf_counter() - first[1] < seconds or \
                    _process_cpu(proc.pid) - first[2] < cpu_seconds:
                time.sleep(0.05)
            last = sample()
            monitor.close()
        except QemuStopped as exc:
            proc.terminate()
            err = proc.communicate(timeout=10)[1].decode(errors="replace")
            exited = "QEMU exited (a triple fault, with -no-reboot)" if proc.returncode == 0 \
                else str(exc)
            raise QemuStopped(f"{exited}: {err.strip()[:300]}") from None
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    return _rate(mode, kind, "qemu", first, last)


def measure_all(seconds: float, qemu: bool, modes: list[str] | None = None,
                loops: tuple[str, ...] = tuple(LOOPS)) -> tuple[list[Rate], list[dict]]:
    """Every mode and loop under pymig (and QEMU): the rates, and the runs that failed."""
    rates, failed = [], []
    with tempfile.TemporaryDirectory(prefix="pymig-modes-") as tmp:
        for mode in modes or [m.name for m in MODES]:
            for kind in loops:
                path = build(Path(tmp), mode, kind)
                vmms = [("pymig", measure_pymig)]
                if qemu and MODE_BY_NAME[mode].image == "bootsector":
                    vmms.append(("qemu", measure_qemu))
                for vmm, measure in vmms:
                    try:
                        rates.append(measure(path, mode, kind, seconds))
                        print(_line(rates[-1]), flush=True)
                    except (GuestError, QemuStopped) as exc:
                        failed.append({"mode": mode, "loop": kind, "vmm": vmm,
                                       "error": str(exc)})
                        print(f"{mode:12s} {kind:5s} {vmm:5s} fails: {exc}", flush=True)
    return rates, failed


def _line(r: Rate) -> str:
    return (f"{r.mode:12s} {r.loop:5s} {r.vmm:5s} {r.per_s / 1e6:10.2f} M instr/s "
            f"{r.per_cpu_s / 1e6:10.2f} M instr/CPU-s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="counting time per loop")
    parser.add_argument("--qemu", action="store_true", help=f"also boot the boot sectors in {QEMU}")
    parser.add_argument("--mode", action="append", choices=[m.name for m in MODES],
                        help="only these modes (repeatable)")
    parser.add_argument("--json", type=Path, help="write the rates and failures here")
    args = parser.parse_args(argv)
    if args.qemu and shutil.which(QEMU) is None:
        print(f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86)",
              file=sys.stderr)
        return 2
    rates, failed = measure_all(args.seconds, args.qemu, args.mode)
    reference = {r.loop: r for r in rates if r.mode == REFERENCE and r.vmm == "pymig"}
    if reference:
        print(f"\nper CPU-second, against the same loop in {REFERENCE} (64-bit, CPL 3), pymig:")
        for r in rates:
            if r.loop in reference:
                print(f"  {r.mode:12s} {r.loop:5s} {r.vmm:5s} "
                      f"{r.per_cpu_s / reference[r.loop].per_cpu_s:.5f}")
    if args.json:
        args.json.write_text(json.dumps({"rates": [asdict(r) for r in rates],
                                         "failed": failed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
