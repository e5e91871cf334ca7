"""KvmGuest as the Guest protocol: status, pause/resume, halting, throttling, two vCPUs."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from _kvm_helpers import kvm_config, wait_for

from pymig.errors import GuestError
from pymig.guest.base import Guest, GuestState
from pymig.guest.layout import WORKSET_GPA
from pymig.guest.kvm_guest import KvmGuest
from pymig.guest.workloads import resolve
from pymig.kvm.cpustate import CpuState

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

MP_STATE_HALTED = 3


def thread_cpu_seconds(guest: KvmGuest, index: int = 0) -> float:
    ident = guest.runtime.threads[index].thread_ident
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def test_kvm_guest_is_a_guest_and_walks_its_states():
    with KvmGuest.create(kvm_config("dirtier", {"working_set_bytes": 4 << 20})) as guest:
        assert isinstance(guest, Guest)
        assert guest.status == "created" and guest.vcpu_count == 1
        guest.start()
        assert guest.status == "running"
        with pytest.raises(GuestError, match="created"):
            guest.start()
        wait_for(lambda: guest.progress()["pages_written"] > 0, what="writes")
        guest.pause()
        assert guest.status == "paused"
        written = guest.progress()["pages_written"]
        assert guest.progress()["pages_written"] == written  # nothing runs while paused
        guest.resume()
        wait_for(lambda: guest.progress()["pages_written"] > written, what="more writes")
        guest.pause()
    assert guest.status == "closed"


def test_idle_guest_halts_sleeps_and_migrates_in_that_state():
    with KvmGuest.create(kvm_config("idle")) as guest:
        guest.start()
        cpu0 = thread_cpu_seconds(guest)
        time.sleep(0.3)
        # a halted vCPU sleeps in KVM_RUN: its thread uses (almost) no CPU
        assert thread_cpu_seconds(guest) - cpu0 < 0.1
        guest.pause()
        state = guest.save_state()
        assert state.cpus[0].mp_state == MP_STATE_HALTED
        data = bytes(guest.ram_blocks[0].mem)
        with KvmGuest.create(guest.config, incoming=True) as twin:
            twin.ram_blocks[0].mem[:] = data
            twin.load_state(state)
            twin.resume()
            twin.pause()
            again = twin.save_state().cpus[0]
            assert again.mp_state == MP_STATE_HALTED
            assert again.regs.rip == state.cpus[0].regs.rip
        assert guest.progress()["pages_written"] == 0


def test_throttle_takes_run_time_away_from_the_vcpu():
    with KvmGuest.create(kvm_config("dirtier", {"working_set_bytes": 4 << 20})) as guest:
        guest.start()
        guest.set_throttle(80)
        time.sleep(0.1)
        cpu0, wall0 = thread_cpu_seconds(guest), time.monotonic()
        time.sleep(0.5)
        cpu = thread_cpu_seconds(guest) - cpu0
        wall = time.monotonic() - wall0
        assert guest.runtime.threads[0].naps > 0
        assert cpu < 0.6 * wall  # 80 % throttled: well under the whole time
        guest.set_throttle(0)
        guest.pause()
        with pytest.raises(ValueError):
            guest.set_throttle(100)


def test_two_vcpus_each_write_their_own_share():
    params = {"working_set_bytes": 4 << 20, "pattern": "uniform"}
    with KvmGuest.create(kvm_config("dirtier", params, vcpus=2)) as guest:
        guest.start()
        guest.start_dirty_log()
        before = [r.passes for r in guest.mailbox()]
        wait_for(lambda: all(r.passes >= b + 3 for r, b in zip(guest.mailbox(), before)),
                 what="three passes by both vCPUs while logging")
        guest.pause()
        (bitmap,) = guest.sync_dirty()
        bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
        for share in resolve(guest.config).shares:
            first = share.first_frame
            assert bits[first:first + share.npages].sum() > share.npages // 2
        state = guest.save_state()
        assert [cpu.index for cpu in state.cpus] == [0, 1]
        progress = guest.progress()
        assert progress["pages_written"] == sum(r.pages_written for r in guest.mailbox())


def test_saved_state_is_plain_versioned_dataclasses():
    with KvmGuest.create(kvm_config("selfcheck", {"working_set_bytes": 1 << 20})) as guest:
        guest.start()
        wait_for(lambda: guest.progress()["passes"] >= 1, what="one pass")
        guest.pause()
        state = guest.save_state()
    assert isinstance(state, GuestState)
    cpu = state.cpus[0]
    assert isinstance(cpu, CpuState) and CpuState.VERSION == 1
    assert cpu.tsc > 0 and cpu.tsc == cpu.msr(0x10) and cpu.tsc_khz > 0
    assert len(cpu.lapic) == 1024 and len(cpu.xsave) >= 4096
    assert cpu.sregs.efer & 0x500 == 0x500  # long mode (LME | LMA)

    def check(obj):
        assert dataclasses.is_dataclass(obj) and isinstance(type(obj).VERSION, int)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                check(value)
            elif isinstance(value, list):
                assert all(type(v) is int for v in value), f.name
            else:
                assert type(value) in (int, bool, bytes), (f.name, type(value))

    check(cpu)
    for device in state.devices.values():
        check(device)


def test_load_state_refuses_a_running_guest_and_a_wrong_vcpu_count():
    with KvmGuest.create(kvm_config("idle", vcpus=2)) as guest:
        guest.pause()  # not running: a no-op
        state = guest.save_state()
        guest.start()
        with pytest.raises(GuestError, match="paused"):
            guest.load_state(state)
        guest.pause()
        with pytest.raises(GuestError, match="vCPUs"):
            guest.load_state(GuestState(cpus=state.cpus[:1], devices=state.devices))


def test_the_package_factory_builds_kvm_guests():
    from pymig.guest import create

    with create(kvm_config("idle"), incoming=True) as guest:
        assert isinstance(guest, KvmGuest) and guest.status == "created"
        assert all(int(b.touched().sum()) == 0 for b in guest.ram_blocks)


def test_workload_parameters_are_checked():
    with pytest.raises(ValueError, match="no parameter.*speed"):
        KvmGuest.create(kvm_config("dirtier", {"speed": 3}))
    with pytest.raises(ValueError, match="do not fit"):
        KvmGuest.create(kvm_config("dirtier", {"working_set_bytes": 64 << 20}, memory_mib=32))
    with pytest.raises(ValueError, match="unknown workload"):
        KvmGuest.create(kvm_config("mine"))
    with pytest.raises(ValueError, match="vCPUs"):
        KvmGuest.create(kvm_config("idle", vcpus=9))


def test_memfd_backed_ram_is_guest_memory_other_processes_can_map():
    import os

    config = kvm_config("selfcheck", {"working_set_bytes": 1 << 20})
    with KvmGuest.create(config, backing="memfd") as guest:
        guest.start()
        wait_for(lambda: guest.progress()["passes"] >= 3, what="three passes")
        guest.pause()
        block = guest.ram_blocks[0]
        assert block.fd is not None
        page = os.pread(block.fd, 4096, WORKSET_GPA)
        assert page == bytes(block.page(WORKSET_GPA >> 12))
        assert int.from_bytes(page[:8], "little") >= 3


def test_without_irqchip_a_halted_vcpu_parks_in_the_vmm():
    with KvmGuest.create(kvm_config("idle"), irqchip=False) as guest:
        assert not guest.runtime.vm.irqchip
        guest.start()
        wait_for(lambda: guest.runtime.threads[0].parked is False, what="the vCPU to run")
        time.sleep(0.05)  # long enough to reach HLT; the test holds either way
        guest.pause()
        state = guest.save_state()
        assert state.cpus[0].lapic == b""
        guest.load_state(state)
        guest.resume()
        guest.pause()
        assert guest.status == "paused"
