"""pytest-benchmark: how fast user code runs in each x86 mode, against 64-bit code at CPL 3.

    PYTHONPATH=tests .venv/bin/python -m pytest benchmarks/test_bench_modes.py --benchmark-only -s

For every mode of ``tests/_mode_images.py`` (real mode, 16/32-bit protected mode with paging
off and on, long mode with 32-bit code, 64-bit code at CPL 0 and CPL 3, the ``--flat`` and
``--flat64`` entries) and both loops (register, store): instructions per CPU-second of the
vCPU, and the ratio to the same loop entered as ``--flat64`` (64-bit, CPL 3: the mode kvm_pvm
runs natively), the two measured back to back in one round.  A mode the host's KVM cannot run
is skipped with how it failed.  ``benchmarks/guest_modes.py --qemu`` runs the same boot
sectors under QEMU (a manual step: QEMU is not a dependency).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _mode_images import LOOPS, MODES, REFERENCE, build, measure_pymig  # noqa: E402

from pymig.errors import GuestError  # noqa: E402

pytestmark = pytest.mark.kvm

SECONDS = 1.0
CPU_SECONDS = 0.5


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("modes")
    return lambda mode, kind: build(d, mode, kind)


@pytest.mark.parametrize("kind", list(LOOPS))
@pytest.mark.parametrize("mode", [m.name for m in MODES if m.name != REFERENCE])
def test_mode_against_64bit_cpl3(benchmark, images, mode, kind, mode_results):
    benchmark.group = f"guest modes, {kind} loop (seconds per measurement pair)"

    def pair():
        reference = measure_pymig(images(REFERENCE, kind), REFERENCE, kind, SECONDS,
                                  CPU_SECONDS)
        try:
            return reference, measure_pymig(images(mode, kind), mode, kind, SECONDS,
                                            CPU_SECONDS)
        except GuestError as exc:
            return reference, exc

    reference, rate = benchmark.pedantic(pair, rounds=1, iterations=1)
    if isinstance(rate, GuestError):
        benchmark.extra_info["error"] = str(rate)
        mode_results.append({"mode": mode, "loop": kind, "error": str(rate)})
        pytest.skip(f"{mode} does not run on this host's KVM: {rate}")
    row = {"mode": mode, "loop": kind, "instr_per_cpu_s": rate.per_cpu_s,
           "instr_per_s": rate.per_s, "reference_per_cpu_s": reference.per_cpu_s,
           "ratio": rate.per_cpu_s / reference.per_cpu_s}
    benchmark.extra_info.update(row)
    mode_results.append(row)
