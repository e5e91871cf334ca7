"""Pausing a vCPU: an I/O exit in flight completes first, and pause/resume never loses or
repeats a guest step (whether the vCPU parks inside KVM_RUN or in the VMM's loop)."""

from __future__ import annotations

import threading

import pytest
from _kvm_helpers import build_image, wait_for

from pymig.guest.base import GuestConfig
from pymig.guest.kvm_guest import KvmGuest

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]

STEP_PORT = 0x700
ANSWER = 0x5AFE600D

# Each step: take a number from the port (an IN exit the VMM must complete), report the step
# count back on the same port (an OUT exit), then store the count in RAM at 0x9000.
STEPPER = f"""
.intel_syntax noprefix
.code64
.global start
start:
    mov dx, {STEP_PORT:#x}
    xor ecx, ecx
1:  xor eax, eax
    in eax, dx
    mov dword ptr [0x9008], eax
    inc ecx
    mov eax, ecx
    out dx, eax
    mov dword ptr [0x9000], ecx
    jmp 1b
"""


class StepPort:
    """Answers the stepper's IN with ANSWER and records each step it reports.  ``hold_at``
    makes the IN of that step block until ``release`` is set."""

    ports = (STEP_PORT,)

    def __init__(self):
        self.steps: list[int] = []
        self.hold_at: int | None = None
        self.holding = threading.Event()
        self.release = threading.Event()

    def read(self, port, size):
        if self.hold_at is not None and len(self.steps) + 1 == self.hold_at:
            self.holding.set()
            self.release.wait(60)
        return ANSWER

    def write(self, port, size, value):
        self.steps.append(value)

    def save(self):
        return {}


@pytest.fixture(scope="module")
def stepper_image(tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("stepper"), "stepper", STEPPER, 0x100000)[0]


def stepper_guest(image) -> tuple[KvmGuest, StepPort]:
    config = GuestConfig(kind="kvm", memory_bytes=16 << 20, workload="image",
                         params={"image": str(image), "kind": "flat64",
                                 "load_address": 0x100000, "stack": 0x7000})
    guest = KvmGuest.create(config)
    port = StepPort()
    guest.runtime.ports.attach(port)
    return guest, port


def guest_u32(guest, gpa: int) -> int:
    return int.from_bytes(guest.read_phys(gpa, 4), "little")


@pytest.mark.parametrize("park_in_kvm_run", [True, False], ids=["park-in-c", "park-in-loop"])
def test_a_pause_waits_for_the_io_exit_in_flight_and_completes_it(stepper_image,
                                                                  park_in_kvm_run):
    guest, port = stepper_guest(stepper_image)
    with guest:
        guest.runtime.threads[0]._gate.park_here = park_in_kvm_run
        port.hold_at = 5
        guest.start()
        assert port.holding.wait(30), "the guest never reached the held IN"
        pauser = threading.Thread(target=guest.pause)
        pauser.start()
        pauser.join(0.5)
        assert pauser.is_alive(), "pause returned while an I/O exit was being handled"
        assert not guest.runtime.threads[0].parked
        port.release.set()
        pauser.join(30)
        assert not pauser.is_alive() and guest.status == "paused"
        # The IN that was in flight has completed: its answer is in RAX, RIP is past it,
        # and the guest has not run on (it would have stored the answer and reported step 5).
        regs = guest.save_state().cpus[0].regs
        assert regs.rax == ANSWER
        assert port.steps == [1, 2, 3, 4]
        assert guest_u32(guest, 0x9008) == ANSWER and guest_u32(guest, 0x9000) == 4
        guest.resume()
        wait_for(lambda: len(port.steps) >= 8, what="the guest to step on")
        guest.pause()
        assert port.steps == list(range(1, len(port.steps) + 1))


@pytest.mark.parametrize("park_in_kvm_run", [True, False], ids=["park-in-c", "park-in-loop"])
def test_a_hundred_pauses_neither_lose_nor_repeat_a_guest_step(stepper_image, park_in_kvm_run):
    guest, port = stepper_guest(stepper_image)
    with guest:
        thread = guest.runtime.threads[0]
        thread._gate.park_here = park_in_kvm_run
        guest.start()
        for _ in range(100):
            seen = len(port.steps)
            wait_for(lambda: len(port.steps) > seen + 1, what="the guest to step")
            guest.pause()
            assert thread.parked
            steps = list(port.steps)
            assert steps == list(range(1, len(steps) + 1)), "a step was lost or repeated"
            # Paused, nothing moves: no step is reported and RAM keeps its count, which is
            # the last reported step or, stopped before the store, the one before it.
            stored = guest_u32(guest, 0x9000)
            assert stored in (len(steps), len(steps) - 1)
            regs = guest.save_state().cpus[0].regs
            assert regs.rcx & 0xFFFFFFFF in (len(steps), len(steps) + 1)
            assert port.steps == steps and guest_u32(guest, 0x9000) == stored
            guest.resume()
        guest.pause()
        assert port.steps == list(range(1, len(port.steps) + 1))
        assert len(port.steps) > 200


@pytest.mark.parametrize("park", ["kvm-run", "loop"])
def test_the_pause_benchmark_times_every_pause_in_parts(park):
    """python -m pymig.benchpause, small: each pause has a total, and its kick, park and wake
    when the vCPU was in guest mode; the parts are times, never negative."""
    from pymig import benchpause

    run = benchpause.run(pauses=5, busy=1, park=park, memory_mib=16)
    assert run["parks_in"] == park and run["total"]["n"] == 5
    timed = run["kick"].get("n", 0)
    assert timed + run["pauses_not_in_kvm_run"] == 5 and timed >= 1
    for part in ("kick", "park", "wake"):
        assert run[part]["n"] == timed and run[part]["min"] >= 0
