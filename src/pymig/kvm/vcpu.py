"""``Vcpu`` (a vCPU fd and its mmap'd ``kvm_run``) and ``VcpuThread`` (its run loop).

Each vCPU runs in its own Python thread; KVM_RUN releases the GIL for as long as the guest
runs.  Other threads stop it with a *kick*: set ``kvm_run.immediate_exit``, then send the kick
signal to the thread (a no-op C handler without SA_RESTART, so a blocking KVM_RUN returns
EINTR).  Requests are always recorded under the thread's lock *before* the kick, and the
thread clears ``immediate_exit`` *before* it looks at the requests, so no kick is lost:

    requester: lock; set request; immediate_exit = 1; unlock; pthread_kill
    vCPU:      KVM_RUN -> EINTR; immediate_exit = 0; read requests; park or handle them; KVM_RUN

A pause request is also written to the vCPU's :class:`~pymig._core.kvm.RunGate`, a small C
struct the vCPU thread reads right after KVM_RUN returns: a kicked vCPU with a pause requested
parks inside the KVM_RUN call (a futex wait, GIL released) and the requester waits on the
same struct, so a pause never waits for the vCPU thread to get the GIL, however busy the
process's other threads are.  Any other request (nap, hold, stop) returns to the Python loop,
which reads it under the lock.  A vCPU that was handling an exit when the pause came
completes it through the same call and parks there; one that was napping, held or never
started parks in the loop and marks the gate parked there.

A vCPU only parks after a KVM_RUN that returned EINTR, so an I/O exit it was handling is
always completed by KVM first (KVM's rule before saving state).  With an in-kernel irqchip,
a guest HLT with interrupts off sleeps inside KVM_RUN (no host CPU) and a kick still ends it.

Two ways to take run time from a running vCPU, both outside guest mode with the TSC running:
a *nap* of some seconds (the throttle's) and a *hold* until a point in time (the dirty limit's,
:meth:`VcpuThread.hold_until`), which a later call moves or cancels; pause and stop end either.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pymig._core import kvm as _kvm

#: The longest a pause request waits holding the GIL for a vCPU in guest mode to park; other
#: Python threads of the process wait meanwhile.
PARK_WAIT_WITH_GIL_S = 0.020

_kick_handler_installed = False
_install_lock = threading.Lock()


def _ensure_kick_handler() -> None:
    global _kick_handler_installed
    with _install_lock:
        if not _kick_handler_installed:
            _kvm.install_kick_handler()
            _kick_handler_installed = True


@dataclass
class Exit:
    """Why KVM_RUN returned: ``reason`` (KVM_EXIT_* number) and its name."""

    reason: int
    name: str


class Vcpu:
    """A vCPU's fd and its ``kvm_run`` area.  Owns both; close() releases them."""

    def __init__(self, vm, index: int):
        self.vm = vm
        self.index = index
        self.fd = _kvm.create_vcpu(vm.fd, index)
        self.run_area: mmap.mmap | None = None
        self.ring: mmap.mmap | None = None
        self.ring_fetch = 0  # index of the next dirty-ring entry to harvest
        self.dirty_pages = 0  # dirty-ring entries harvested from this vCPU's ring, ever
        try:
            self.run_area = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
            if vm.dirty_ring:
                self.ring = mmap.mmap(self.fd, vm.dirty_ring * _kvm.DIRTY_GFN_BYTES,
                                      mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                      offset=_kvm.DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
            _kvm.set_cpuid2(self.fd, cpuid_for(vm.kvm.supported_cpuid, index))
        except BaseException:
            self.close()
            raise

    def run(self, gate: _kvm.RunGate | None = None) -> Exit | None:
        """One KVM_RUN (GIL released).  None when a kick interrupted it, else the exit.  With
        a ``gate``, a kick that finds a pause requested parks inside the call until resumed."""
        if _kvm.run(self.fd) if gate is None else _kvm.run_gated(self.fd, self.run_area, gate):
            return None
        reason = _kvm.run_exit_reason(self.run_area)
        return Exit(reason, _kvm.EXIT_REASONS.get(reason, f"exit {reason}"))

    def set_immediate_exit(self, value: bool) -> None:
        _kvm.run_set_immediate_exit(self.run_area, value)

    def close(self) -> None:
        if self.fd >= 0:
            for area in (self.run_area, self.ring):
                if area is not None:
                    area.close()
            os.close(self.fd)
            self.fd = -1


def cpuid_for(entries: list[tuple[int, ...]], index: int) -> list[tuple[int, ...]]:
    """KVM's supported CPUID with this vCPU's APIC id in leaf 1 EBX[31:24] and leaf 0xB EDX."""
    out = []
    for function, idx, flags, eax, ebx, ecx, edx in entries:
        if function == 1:
            ebx = (ebx & 0x00FFFFFF) | (index << 24)
        elif function in (0xB, 0x1F):
            edx = index
        out.append((function, idx, flags, eax, ebx, ecx, edx))
    return out


class VcpuThread:
    """Runs one vCPU in its own thread, parks it on request, and reports how it stopped.

    ``handler(thread, exit)`` decides what each exit means; it may call :meth:`nap` to let the
    vCPU sleep (pacing, HLT without irqchip) and raises to stop the vCPU for good.
    """

    def __init__(self, vcpu: Vcpu, handler: Callable[["VcpuThread", Exit], None],
                 on_stop: Callable[["VcpuThread"], None] | None = None):
        _ensure_kick_handler()
        self._on_stop = on_stop
        self.vcpu = vcpu
        self.index = vcpu.index
        self._handler = handler
        self._cond = threading.Condition()
        self._run_allowed = False
        self._quit = False
        self._nap_request = 0.0
        self.naps = 0  # throttle naps taken (observability for tests and stats)
        self._hold_until = 0.0  # dirty limit: no KVM_RUN before this time.monotonic()
        self._holding = False
        self.holds = 0  # dirty-limit holds taken
        self._gate = _kvm.RunGate()
        self._gate.set_parked(True)
        self._tid: int | None = None
        self.stopped_by: BaseException | None = None  # set once the thread has ended
        self._thread = threading.Thread(target=self._main, name=f"pymig-vcpu{vcpu.index}",
                                        daemon=True)
        self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self._tid is not None or self.stopped_by is not None)

    # --- requests from other threads -------------------------------------------------------

    def resume(self) -> None:
        with self._cond:
            self._run_allowed = True
            self._gate.request(False)
            self._cond.notify_all()

    @property
    def thread_ident(self) -> int | None:
        """The Python thread id of the vCPU thread (for per-thread CPU clocks)."""
        return self._thread.ident

    @property
    def native_id(self) -> int | None:
        """The kernel's id of the vCPU thread (a userfaultfd fault message names it)."""
        return self._thread.native_id

    def request_pause(self) -> None:
        with self._cond:
            self._run_allowed = False
            self._gate.request(True)
            self._kick_locked()

    def request_nap(self, seconds: float) -> None:
        """Take ``seconds`` of run time away from the vCPU (throttling), if it is running."""
        with self._cond:
            if self._run_allowed and not self._gate.parked:
                self._nap_request = max(self._nap_request, seconds)
                self._kick_locked()

    def hold_until(self, deadline: float) -> None:
        """Keep the vCPU out of guest mode until ``time.monotonic()`` reaches ``deadline``
        (the dirty limit); replaces the previous deadline, so 0 releases a held vCPU at once.
        A vCPU in guest mode is kicked out unless the caller is its own thread (a ring-full
        exit), which holds before it re-enters anyway."""
        with self._cond:
            later = deadline > self._hold_until
            self._hold_until = deadline
            self._cond.notify_all()  # a hold in progress re-reads its deadline
            if (later and self._run_allowed and not self._gate.parked and not self._holding
                    and threading.get_ident() != self._thread.ident):
                self._kick_locked()

    def wait_parked(self, timeout: float) -> bool:
        """True once the vCPU is out of guest mode and parked (or has stopped for good).

        While the vCPU thread is inside KVM_RUN's wrapper it parks without the GIL, so the
        wait keeps the GIL then (for up to PARK_WAIT_WITH_GIL_S): the caller, who goes on
        with the stop-and-copy, would otherwise wait its turn for the GIL behind every busy
        thread of the process once the vCPU has parked.  Otherwise, or after that, the wait
        releases the GIL."""
        t0 = time.monotonic()
        if self._gate.wait_parked_holding_gil(min(timeout, PARK_WAIT_WITH_GIL_S)):
            return True
        return self._gate.wait_parked(max(0.0, timeout - (time.monotonic() - t0)))

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread (the vCPU fd stays open for the owner to close)."""
        with self._cond:
            self._quit = True
            self._run_allowed = False
            self._gate.request(False)  # a vCPU parked in KVM_RUN returns to its loop and ends
            self._kick_locked()
        self._thread.join(timeout)

    @property
    def parked(self) -> bool:
        return self._gate.parked

    def pause_timeline(self) -> tuple[int, int, int]:
        """The last pause as CLOCK_MONOTONIC ns: (kicked, KVM_RUN returned, parked); see
        :meth:`pymig._core.kvm.RunGate.timeline`."""
        return self._gate.timeline()

    def _kick_locked(self) -> None:
        self._cond.notify_all()  # a vCPU napping in the VMM wakes up too
        if self._tid is None or self.vcpu.fd < 0:
            return
        self.vcpu.set_immediate_exit(True)
        _kvm.kick_thread(self._tid)

    # --- the vCPU thread -------------------------------------------------------------------

    def nap(self, seconds: float | None) -> None:
        """Sleep on the vCPU thread for up to ``seconds`` (None: until paused); a pause or a
        stop request ends the nap early."""
        with self._cond:
            self._cond.wait_for(lambda: not self._run_allowed or self._quit, seconds)

    def _hold(self) -> None:
        """Stay out of guest mode until the hold deadline (which may move meanwhile), a pause
        or a stop."""
        with self._cond:
            self.holds += 1
            self._holding = True
            try:
                while self._run_allowed and not self._quit:
                    left = self._hold_until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self._holding = False

    def _main(self) -> None:
        try:
            _kvm.unblock_kick_signal()
            with self._cond:
                self._tid = _kvm.thread_self()
                self._cond.notify_all()
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported to the owner through stopped_by
            self.stopped_by = exc
        finally:
            with self._cond:
                self._tid = None  # never kick a thread that has ended
                if self.stopped_by is None:
                    self.stopped_by = SystemExit("vCPU thread stopped")
                self._gate.set_parked(True)  # after stopped_by: a waiter then sees why
                quitting = self._quit
                self._cond.notify_all()
            if self._on_stop is not None and not quitting:
                self._on_stop(self)

    def _loop(self) -> None:
        vcpu = self.vcpu
        pending = False  # an exit was handled but KVM has not completed it yet
        while True:
            with self._cond:
                complete = pending and (self._quit or not self._run_allowed)
                if not complete:
                    while not self._run_allowed and not self._quit:
                        if not self._gate.parked:
                            self._gate.set_parked(True)
                        self._cond.wait()
                    if self._quit:
                        return
                    self._gate.set_parked(False)
                    nap, self._nap_request = self._nap_request, 0.0
                    hold = self._hold_until > time.monotonic()
            if complete:
                # KVM finishes the I/O the guest exited for on the next KVM_RUN; with
                # immediate_exit set it does only that, so the state is whole when we park.
                vcpu.set_immediate_exit(True)
                vcpu.run(self._gate)  # parks in there when the pause is still requested
                vcpu.set_immediate_exit(False)
                pending = False
                continue
            if nap:
                self.naps += 1
                self.nap(nap)
                continue
            if hold:
                self._hold()
                continue
            exit_ = vcpu.run(self._gate)
            if exit_ is None:
                pending = False
                vcpu.set_immediate_exit(False)
                continue
            pending = True
            self._handler(self, exit_)
