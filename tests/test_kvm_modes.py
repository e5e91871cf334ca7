"""User code in each x86 mode a boot sector or a flat binary can reach, under pymig.

The images are those of ``_mode_images`` (and of ``benchmarks/guest_modes.py``, which also
runs them under QEMU): a loop counting in eax/rax, here the one that stores its counter too.
"""

from __future__ import annotations

import struct
import time

import pytest
from _kvm_helpers import wait_for
from _mode_images import STORE_ADDR, build, in_loop, measure_pymig, pymig_guest

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

# Every mode whose loop this host's KVM runs (kvm_pvm cannot enable paging outside long mode:
# "pm32-paging" triple-faults there, under QEMU as under pymig; docs/vmm.md).
RUNNABLE = ["real", "pm16", "pm32", "compat32", "lm64", "lm64-cpl3", "flat", "flat64"]
NATIVE_FRACTION = 0.2


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("modes")
    return lambda mode, kind: build(d, mode, kind)


@pytest.mark.parametrize("mode", RUNNABLE)
def test_each_mode_runs_its_store_loop(images, mode):
    with pymig_guest(images(mode, "store"), mode) as guest:
        guest.start()
        counts = []
        for _ in range(2):
            # the loop runs from a fixed address once the mode switch is done
            count, stored = wait_for(lambda: _in_loop(guest, mode), what=f"the {mode} loop")
            # stopped after the store or after the increment that follows it
            assert stored in (count, (count - 1) & 0xFFFFFFFF)
            counts.append(count)
            time.sleep(0.05)
        assert counts[1] != counts[0]  # it went on counting in between


def _in_loop(guest, mode):
    """(counter, value stored at STORE_ADDR) of a guest paused in its loop, else None."""
    guest.pause()
    try:
        regs = guest.save_state().cpus[0].regs
        if not in_loop(mode, regs.rip):
            return None
        return regs.rax & 0xFFFFFFFF, struct.unpack("<I", guest.read_phys(STORE_ADDR, 4))[0]
    finally:
        guest.resume()


def test_boot_sector_in_64bit_user_mode_runs_at_native_speed(images):
    # A boot sector that switches to 64-bit code at CPL 3 runs its loop as fast as pymig's
    # own 64-bit CPL 3 entry (--flat64), measured now per CPU-second of the vCPU.  Where that
    # code went through KVM's instruction emulator, it would reach about 1/2000 of it.
    native = measure_pymig(images("flat64", "reg"), "flat64", "reg", seconds=0.3,
                           cpu_seconds=0.2)
    boot = measure_pymig(images("lm64-cpl3", "reg"), "lm64-cpl3", "reg", seconds=0.3,
                         cpu_seconds=0.2)
    assert boot.per_cpu_s >= NATIVE_FRACTION * native.per_cpu_s, (boot, native)
