"""Smaller reproducers: ``python -m pymig.fuzz minimize TARGET FILE [-o OUT]``.

libFuzzer's ``-minimize_crash`` shrinks inputs that fail with a Python exception, but a fault in
the simulated guest's vCPU threads kills the process before libFuzzer hears of it, and a stream
of kilobytes shrinks slowly byte by byte.  This removes whole parts instead: the records of a
stream (or of a snapshot: the index goes first), then halves and quarters of what is left
after them, keeping each removal after which the input still fails the same way (the same
signal, or the same exception type), each try in a process of its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

from pymig.fuzz import mutate

_EXCEPTION = re.compile(rb"^([A-Za-z_][\w.]*(?:Error|Exception|Finding|Fault)\w*)\b", re.M)


def failure(target: str, data: bytes, timeout_s: float = 60.0) -> tuple | None:
    """How ``target`` fails on ``data`` (None if it does not): the signal, or the exception."""
    with tempfile.NamedTemporaryFile(prefix="pymig-min-", delete=False) as handle:
        handle.write(data)
    try:
        proc = subprocess.run([sys.executable, "-m", "pymig.fuzz", "repro", target,
                               handle.name], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return ("timeout",)
    finally:
        os.unlink(handle.name)
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return ("signal", -proc.returncode)
    names = _EXCEPTION.findall(proc.stdout + proc.stderr)
    return ("exception", names[-1].decode() if names else "?")


def minimize(target: str, data: bytes, log=print) -> bytes:
    """The smallest input found that fails like ``data``."""
    want = failure(target, data)
    if want is None:
        raise ValueError(f"{target} does not fail on this input")
    log(f"{len(data)} bytes fail with {want}")

    def still(candidate: bytes) -> bool:
        return candidate != data and failure(target, candidate) == want

    header, records, tail = mutate.split(data)
    if records:
        if tail and still(mutate.join(header, records, b"")):
            tail = b""
        i = len(records) - 1
        while i >= 0:
            fewer = records[:i] + records[i + 1:]
            candidate = mutate.join(header, fewer, tail)
            if still(candidate):
                records, data = fewer, candidate
                log(f"  without record {i}: {len(data)} bytes")
            i -= 1
        data = mutate.join(header, records, tail)
    cut = len(data) // 2
    while cut >= 1:
        for start in range(len(data) - cut, -1, -cut):
            candidate = data[:start] + data[start + cut:]
            if still(candidate):
                data = candidate
                log(f"  without bytes {start}..{start + cut}: {len(data)} bytes")
        cut = cut // 4 if cut > 64 else 0  # coarse steps only: each try is a process
    return data


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pymig.fuzz minimize")
    parser.add_argument("target")
    parser.add_argument("file")
    parser.add_argument("-o", "--output", help="default: FILE.min")
    args = parser.parse_args(argv)
    with open(args.file, "rb") as handle:
        data = handle.read()
    smaller = minimize(args.target, data)
    output = args.output or args.file + ".min"
    with open(output, "wb") as handle:
        handle.write(smaller)
    print(f"{len(data)} -> {len(smaller)} bytes: {output}")
    return 0
