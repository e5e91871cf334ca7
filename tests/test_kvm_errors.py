"""Error paths of the KVM layer: every ioctl wrapper on a bad fd, capabilities, lint."""

from __future__ import annotations

import errno
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from pymig._core import kvm as _kvm
from pymig.errors import KvmError
from pymig.kvm.cpustate import Registers, SpecialRegisters, VcpuEvents, sregs_to_kvm

ROOT = Path(__file__).resolve().parent.parent

REGS = vars(Registers())
SREGS = sregs_to_kvm(SpecialRegisters())
EVENTS = vars(VcpuEvents())
DEBUGREGS = {"db": [0, 0, 0, 0], "dr6": 0, "dr7": 0, "flags": 0}
BITMAP = np.zeros(4, dtype=np.uint64)

# (wrapper, extra arguments after the fd, the ioctl named in the error)
CALLS = [
    (_kvm.get_api_version, (), "KVM_GET_API_VERSION"),
    (_kvm.check_extension, (1,), "KVM_CHECK_EXTENSION"),
    (_kvm.get_vcpu_mmap_size, (), "KVM_GET_VCPU_MMAP_SIZE"),
    (_kvm.get_msr_index_list, (), "KVM_GET_MSR_INDEX_LIST"),
    (_kvm.get_supported_cpuid, (), "KVM_GET_SUPPORTED_CPUID"),
    (_kvm.create_vm, (), "KVM_CREATE_VM"),
    (_kvm.enable_cap, (168, 1), "KVM_ENABLE_CAP"),
    (_kvm.set_tss_addr, (0xFFFBD000,), "KVM_SET_TSS_ADDR"),
    (_kvm.create_irqchip, (), "KVM_CREATE_IRQCHIP"),
    (_kvm._unsafe_set_user_memory_region, (0, 0, 0, 0, 0), "KVM_SET_USER_MEMORY_REGION"),
    (_kvm.get_dirty_log, (0, BITMAP), "KVM_GET_DIRTY_LOG"),
    (_kvm.clear_dirty_log, (0, BITMAP, 0, 64), "KVM_CLEAR_DIRTY_LOG"),
    (_kvm.reset_dirty_rings, (), "KVM_RESET_DIRTY_RINGS"),
    (_kvm.create_vcpu, (0,), "KVM_CREATE_VCPU"),
    (_kvm.run, (), "KVM_RUN"),
    (_kvm.run_gated, (bytearray(4096), _kvm.RunGate()), "KVM_RUN"),
    (_kvm.get_regs, (), "KVM_GET_REGS"),
    (_kvm.set_regs, (REGS,), "KVM_SET_REGS"),
    (_kvm.get_sregs, (), "KVM_GET_SREGS"),
    (_kvm.set_sregs, (SREGS,), "KVM_SET_SREGS"),
    (_kvm.get_xsave, (4096,), "KVM_GET_XSAVE"),
    (_kvm.get_xsave, (8192,), "KVM_GET_XSAVE2"),
    (_kvm.set_xsave, (bytes(4096), 4096), "KVM_SET_XSAVE"),
    (_kvm.get_xcrs, (), "KVM_GET_XCRS"),
    (_kvm.set_xcrs, ([(0, 1)],), "KVM_SET_XCRS"),
    (_kvm.get_msrs, ([0x10],), "KVM_GET_MSRS"),
    (_kvm.set_msrs, ([0x10], [0]), "KVM_SET_MSRS"),
    (_kvm.get_lapic, (), "KVM_GET_LAPIC"),
    (_kvm.set_lapic, (bytes(1024),), "KVM_SET_LAPIC"),
    (_kvm.get_mp_state, (), "KVM_GET_MP_STATE"),
    (_kvm.set_mp_state, (0,), "KVM_SET_MP_STATE"),
    (_kvm.get_vcpu_events, (), "KVM_GET_VCPU_EVENTS"),
    (_kvm.set_vcpu_events, (EVENTS,), "KVM_SET_VCPU_EVENTS"),
    (_kvm.get_debugregs, (), "KVM_GET_DEBUGREGS"),
    (_kvm.set_debugregs, (DEBUGREGS,), "KVM_SET_DEBUGREGS"),
    (_kvm.get_tsc_khz, (), "KVM_GET_TSC_KHZ"),
    (_kvm.set_cpuid2, ([(0, 0, 0, 0, 0, 0, 0)],), "KVM_SET_CPUID2"),
]


@pytest.fixture
def bad_fd():
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)  # a number that is certainly not open now
    return fd


@pytest.mark.parametrize("call,args,name", CALLS, ids=[c[2] + "-" + c[0].__name__ for c in CALLS])
def test_every_wrapper_raises_ebadf_on_a_bad_fd(bad_fd, call, args, name):
    with pytest.raises(KvmError) as info:
        call(bad_fd, *args)
    assert info.value.errno == errno.EBADF
    assert info.value.ioctl == name
    assert isinstance(info.value, OSError)


def test_every_ioctl_of_the_header_we_use_has_an_ebadf_test():
    source = (ROOT / "src/pymig/_core/kvm.pyx").read_text()
    used = set(re.findall(r'b"(KVM_[A-Z0-9_]+)"', source))
    assert used == {name for _, _, name in CALLS}


def test_kvm_error_pickles_with_errno_and_ioctl():
    err = pickle.loads(pickle.dumps(KvmError(errno.ENOENT, "KVM_GET_DIRTY_LOG")))
    assert (err.errno, err.ioctl) == (errno.ENOENT, "KVM_GET_DIRTY_LOG")


def test_ioctl_is_called_from_one_module_only():
    """Only src/pymig/_core/kvm.pyx may contain ``ioctl(`` (generated C excepted), besides the
    socket channel's send-queue query (SIOCOUTQ), which is no KVM call."""
    allowed = {ROOT / "src/pymig/_core/kvm.pyx", ROOT / "src/pymig/transport/channel.py",
               Path(__file__).resolve()}
    offenders = []
    for top in ("src", "tests", "benchmarks"):
        for path in (ROOT / top).rglob("*"):
            if path.suffix not in {".py", ".pyx", ".pxd", ".c", ".h"} or not path.is_file():
                continue
            if path.suffix == ".c" and path.with_suffix(".pyx").exists():
                continue  # Cython's output for a .pyx
            if path in allowed:
                continue
            if "ioctl(" in path.read_text(errors="replace"):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.kvm
def test_an_unsupported_capability_is_a_clear_error():
    from pymig.kvm import Kvm, UnsupportedCapability

    with Kvm() as kvm:
        assert kvm.require("KVM_CAP_USER_MEMORY") > 0
        with pytest.raises(UnsupportedCapability) as info:
            kvm.require(0x7FFF_FFFF, "a feature from the future")
        assert info.value.errno == errno.EOPNOTSUPP
        assert "does not offer" in str(info.value) and "future" in str(info.value)
        with pytest.raises(ValueError, match="unknown capability"):
            kvm.check("KVM_CAP_NOT_A_THING")


@pytest.mark.kvm
def test_kvm_reports_what_this_host_offers():
    from pymig.kvm import Kvm

    with Kvm() as kvm:
        assert kvm.api_version == 12
        caps = kvm.capabilities()
        assert caps["KVM_CAP_USER_MEMORY"] > 0
        assert 0x10 in kvm.supported_msrs  # IA32_TSC
        assert set(kvm.supported_msrs) <= set(kvm.msr_index_list)
        assert kvm.tsc_khz > 0
    assert kvm.fd == -1


def _stopped_vcpu(reason: int, union: bytes):
    """A stand-in vCPU whose kvm_run area holds one exit (its fd is not open)."""
    import struct
    from types import SimpleNamespace

    area = bytearray(12288)
    struct.pack_into("<I", area, 8, reason)
    area[32:32 + len(union)] = union
    return SimpleNamespace(run_area=area, fd=-1, index=1)


def test_failed_entry_and_internal_error_carry_their_exit_data():
    import struct

    from pymig.kvm.runtime import describe_stop
    from pymig.kvm.vcpu import Exit

    vcpu = _stopped_vcpu(_kvm.EXIT_FAIL_ENTRY, struct.pack("<QI", 0x80000021, 1))
    text = describe_stop(vcpu, Exit(_kvm.EXIT_FAIL_ENTRY, "FAIL_ENTRY"))
    assert text == ("vCPU 1: VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason 0x80000021, "
                    "cpu 1)")

    vcpu = _stopped_vcpu(_kvm.EXIT_INTERNAL_ERROR, struct.pack("<II3Q", 1, 3, 0, 0x6e0f66, 7))
    text = describe_stop(vcpu, Exit(_kvm.EXIT_INTERNAL_ERROR, "INTERNAL_ERROR"))
    assert "KVM_EXIT_INTERNAL_ERROR, suberror 1, data [0x0, 0x6e0f66, 0x7]" in text


def test_harvesting_a_dirty_ring_reads_published_entries_and_hands_them_back():
    import struct

    ring = bytearray(16 * 8)
    for index, (slot, offset) in enumerate([(0, 5), (1, 7), (0, 9)]):
        struct.pack_into("<IIQ", ring, 16 * ((6 + index) % 8), 1, slot, offset)  # DIRTY
    slots, offsets = np.zeros(8, np.int64), np.zeros(8, np.int64)

    n, fetch = _kvm.harvest_dirty_ring(ring, 6, slots, offsets)  # wraps past the end

    assert (n, fetch) == (3, 9)
    assert slots[:3].tolist() == [0, 1, 0] and offsets[:3].tolist() == [5, 7, 9]
    flags = [struct.unpack_from("<I", ring, 16 * (i % 8))[0] for i in (6, 7, 8, 9)]
    assert flags == [2, 2, 2, 0]  # RESET for the three harvested, the next untouched
    assert _kvm.harvest_dirty_ring(ring, fetch, slots, offsets) == (0, 9)
    with pytest.raises(ValueError, match="power of two"):
        _kvm.harvest_dirty_ring(bytearray(16 * 3), 0, slots, offsets)
