"""``KvmRuntime``: a VM with its RAM slots, vCPU threads and port devices, and the controls
migration needs from it: run, pause (bounded latency), throttle, per-vCPU dirty limits, and how
it stopped.

Exits: port I/O goes to the :class:`~pymig.kvm.devices.PortBus`; MMIO to the control page or
to nothing (reads all-ones, writes ignored, logged once per page); HLT (only without an
in-kernel irqchip) parks the vCPU thread until a pause; SHUTDOWN (triple fault), FAIL_ENTRY,
INTERNAL_ERROR and any exit pymig does not handle stop the guest with a
:class:`~pymig.errors.GuestError` carrying the exit data (:func:`describe_stop`).  A guest
power-off (control port) or reset request (port 0x92) stops it cleanly.

Dirty limit (dirty ring only): each limited vCPU has a :class:`DirtyQuota`.  After every harvest
that found entries (a sync, a ring-full exit, a rate measurement, and the controller thread's
harvest every ``DIRTY_LIMIT_PERIOD_S`` while any limit is set), each limited vCPU is charged
the ring entries it produced since, at 1 / quota seconds per page, and held out of guest mode
(:meth:`VcpuThread.hold_until`) until its charge is paid.  Only that vCPU stops; its TSC runs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from pymig._core import kvm as _kvm
from pymig.errors import GuestError
from pymig.kvm.devices import (CONTROL_MAGIC, CONTROL_MMIO, CONTROL_MMIO_BYTES, A20Gate,
                                ControlPort, GuestStopped, PortBus, Serial16550)
from pymig.kvm.vcpu import Exit, VcpuThread
from pymig.kvm.vm import DEFAULT_TSS_ADDR, TSS_BYTES, Vm

log = logging.getLogger(__name__)

THROTTLE_TIMESLICE_S = 0.010  # QEMU's CPU_THROTTLE_TIMESLICE_NS
DIRTY_LIMIT_PERIOD_S = 0.010  # the controller harvests at least this often while limits are set
DIRTY_LIMIT_CREDIT_S = 0.010  # quota a limited vCPU may save up while it dirties less
PAUSE_TIMEOUT_S = 10.0
MMIO_FILL = b"\xff" * 8


class KvmRuntime:
    """RAM slots + vCPUs + devices of one guest.  Threads start parked; :meth:`resume` runs."""

    def __init__(self, kvm, blocks, vcpus: int, serial_output, *, irqchip: bool = True,
                 manual_protect: bool = True, initially_set: bool = False,
                 dirty_ring: int = 0):
        overlaps = any(b.guest_phys_addr < DEFAULT_TSS_ADDR + TSS_BYTES and
                       DEFAULT_TSS_ADDR < b.guest_phys_addr + b.size_bytes for b in blocks)
        self.vm = Vm(kvm, irqchip=irqchip, manual_protect=manual_protect,
                     initially_set=initially_set, dirty_ring=dirty_ring,
                     tss_addr=None if overlaps else DEFAULT_TSS_ADDR)
        self.threads: list[VcpuThread] = []
        try:
            self.slots = [self.vm.add_memory(b) for b in blocks]
            self.vcpus = [self.vm.create_vcpu(i) for i in range(vcpus)]
            self.ports = PortBus(Serial16550(serial_output), A20Gate(),
                                 ControlPort(lambda thread, s: thread.nap(s)))
            self.error: GuestError | None = None
            self.stop_reason: str | None = None
            self.exit_code: int | None = None
            self.stopped = threading.Event()
            self._mmio_logged: set[int] = set()
            self._throttle_pct = 0
            self._throttle_wake = threading.Event()
            self._throttle_thread: threading.Thread | None = None
            self._quotas: dict[int, DirtyQuota] = {}
            self._quota_lock = threading.Lock()
            self._limit_wake = threading.Event()
            self._limit_thread: threading.Thread | None = None
            self.vm.on_harvest = self._enforce_dirty_limits
            self._closing = False
            self.threads = [VcpuThread(v, self._handle_exit, self._on_vcpu_stop)
                            for v in self.vcpus]
        except BaseException:
            self.close()
            raise

    # --- run control ------------------------------------------------------------------------

    def resume(self) -> None:
        self.raise_if_failed()
        for thread in self.threads:
            thread.resume()

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> float:
        """Kick every vCPU out of guest mode and wait until all are parked; returns seconds."""
        t0 = time.perf_counter()
        for thread in self.threads:
            thread.request_pause()
        deadline = t0 + timeout
        for thread in self.threads:
            if not thread.wait_parked(max(0.0, deadline - time.perf_counter())):
                raise GuestError(f"vCPU {thread.index} did not leave guest mode in {timeout} s")
        return time.perf_counter() - t0

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def set_throttle(self, percent: int) -> None:
        """Take ``percent`` (0..99) of run time from every vCPU, QEMU style: every
        timeslice / (1 - p) each running vCPU sleeps p / (1 - p) x timeslice."""
        if not 0 <= percent <= 99:
            raise ValueError(f"throttle must be 0..99 percent, not {percent}")
        self._throttle_pct = int(percent)
        if percent and self._throttle_thread is None:
            self._throttle_thread = threading.Thread(target=self._throttle_loop,
                                                     name="pymig-throttle", daemon=True)
            self._throttle_thread.start()
        self._throttle_wake.set()

    @property
    def throttle(self) -> int:
        return self._throttle_pct

    def _throttle_loop(self) -> None:
        while not self._closing:
            pct = self._throttle_pct
            if pct <= 0:
                self._throttle_wake.wait()
                self._throttle_wake.clear()
                continue
            share = pct / 100.0
            for thread in self.threads:
                thread.request_nap(share / (1 - share) * THROTTLE_TIMESLICE_S)
            self._throttle_wake.wait(THROTTLE_TIMESLICE_S / (1 - share))
            self._throttle_wake.clear()

    # --- dirty limit (dirty ring) ------------------------------------------------------------

    def dirty_counts(self) -> list[int]:
        """Harvest the rings now; per vCPU, the ring entries it has produced so far."""
        self._require_ring()
        self.vm.harvest_rings()
        return [vcpu.dirty_pages for vcpu in self.vcpus]

    def set_dirty_limit(self, index: int, pages_per_s: float | None) -> None:
        """Cap vCPU ``index`` at ``pages_per_s`` newly dirtied pages per second, or lift its
        cap (None).  The slots must be logging for the ring to see anything (the caller's
        business, see KvmGuest)."""
        self._require_ring()
        if not 0 <= index < len(self.threads):
            raise IndexError(f"no vCPU {index} (the guest has {len(self.threads)})")
        self.vm.harvest_rings()  # charge what came before to nobody
        with self._quota_lock:  # (lock order: quotas, then a vCPU thread's condition)
            if pages_per_s is None:
                self._quotas.pop(index, None)
                self.threads[index].hold_until(0.0)
            else:
                self._quotas[index] = DirtyQuota(float(pages_per_s),
                                                 self.vcpus[index].dirty_pages,
                                                 time.monotonic())
        if self._quotas and self._limit_thread is None and not self._closing:
            self._limit_thread = threading.Thread(target=self._limit_loop,
                                                  name="pymig-dirtylimit", daemon=True)
            self._limit_thread.start()
        self._limit_wake.set()

    @property
    def dirty_limits(self) -> dict[int, float]:
        """The vCPUs with a dirty limit and their quotas in pages/s."""
        with self._quota_lock:
            return {index: q.pages_per_s for index, q in self._quotas.items()}

    def _require_ring(self) -> None:
        if not self.vm.dirty_ring:
            raise GuestError("per-vCPU dirty rates and dirty limits need the dirty ring: create "
                             "the KVM guest with dirty_ring=N (e.g. 4096); the dirty bitmap "
                             "(KVM_GET_DIRTY_LOG) says which pages are dirty, not which vCPU "
                             "dirtied them")

    def _enforce_dirty_limits(self) -> None:
        """Charge every limited vCPU for its new ring entries; hold those over quota (the
        Vm's on_harvest, on whichever thread harvested)."""
        if not self._quotas:
            return
        now = time.monotonic()
        with self._quota_lock:
            for index, quota in self._quotas.items():
                until = quota.charge(self.vcpus[index].dirty_pages, now)
                if until > now:
                    self.threads[index].hold_until(until)

    def _limit_loop(self) -> None:
        while not self._closing:
            if not self._quotas:
                self._limit_wake.wait()
                self._limit_wake.clear()
                continue
            try:
                self.vm.harvest_rings()  # charges and holds through on_harvest
            except OSError as exc:  # KVM_RESET_DIRTY_RINGS failed; close() joins us first
                log.error("dirty-limit controller stopped, limits now act only at syncs and "
                          "ring-full exits: %s", exc)
                return
            self._limit_wake.wait(DIRTY_LIMIT_PERIOD_S)
            self._limit_wake.clear()

    # --- exits (on vCPU threads) -------------------------------------------------------------

    def _handle_exit(self, thread: VcpuThread, exit_: Exit) -> None:
        reason = exit_.reason
        if reason == _IO:
            self._handle_io(thread)
        elif reason == _MMIO:
            self._handle_mmio(thread)
        elif reason == _HLT:
            thread.nap(None)  # no irqchip: nothing can wake it but a pause
        elif reason == _INTR:
            pass
        elif reason == _DIRTY_RING_FULL:
            self.vm.harvest_rings()
        else:
            raise GuestError(describe_stop(thread.vcpu, exit_))

    def _handle_io(self, thread: VcpuThread) -> None:
        area = thread.vcpu.run_area
        direction, size, port, count, offset = _kvm.run_io(area)
        if count > 1:  # a string instruction's items (rep ins/outs), at most a page of them
            device = self.ports.string_device(port)
            if device is not None:
                end = offset + size * count
                if direction == _kvm.EXIT_IO_OUT:
                    device.write_string(port, size, area[offset:end])
                else:
                    area[offset:end] = device.read_string(port, size, count)
                return
        for k in range(count):
            at = offset + k * size
            if direction == _kvm.EXIT_IO_OUT:
                value = int.from_bytes(area[at:at + size], "little")
                self.ports.write(thread, thread.index, port, size, value)
            else:
                value = self.ports.read(port, size) & ((1 << (8 * size)) - 1)
                area[at:at + size] = value.to_bytes(size, "little")

    def _handle_mmio(self, thread: VcpuThread) -> None:
        area = thread.vcpu.run_area
        addr, data, length, is_write = _kvm.run_mmio(area)
        if CONTROL_MMIO <= addr < CONTROL_MMIO + CONTROL_MMIO_BYTES:
            offset = addr - CONTROL_MMIO
            if is_write:
                value = int.from_bytes(data[:length], "little")
                self.ports.control.mmio_write(thread, thread.index, offset, value)
            else:
                value = CONTROL_MAGIC if offset == 0 else 0
                _kvm.run_set_mmio_data(area, value.to_bytes(8, "little")[:length])
            return
        page = addr >> 12
        if page not in self._mmio_logged:
            self._mmio_logged.add(page)
            log.info("vCPU %d: %s of unbacked guest-physical %#x (MMIO; %s from now on)",
                     thread.index, "write" if is_write else "read", addr,
                     "ignored" if is_write else "reads all-ones")
        if not is_write:
            _kvm.run_set_mmio_data(area, MMIO_FILL[:length])

    def _on_vcpu_stop(self, thread: VcpuThread) -> None:
        cause = thread.stopped_by
        if isinstance(cause, GuestStopped):
            if self.stop_reason is None:
                self.stop_reason, self.exit_code = cause.reason, cause.exit_code
        elif self.error is None:
            self.error = cause if isinstance(cause, GuestError) else GuestError(
                f"vCPU {thread.index} stopped: {cause!r}")
            self.error.__cause__ = None if cause is self.error else cause
        for other in self.threads:
            if other is not thread:
                other.request_pause()
        self.stopped.set()

    # --- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every thread (lifting throttle and dirty limits), then close the VM."""
        self._closing = True
        for wake in ("_throttle_wake", "_limit_wake"):
            if hasattr(self, wake):
                getattr(self, wake).set()
        if getattr(self, "_limit_thread", None) is not None:
            self._limit_thread.join(5)  # it harvests the rings: done before they are unmapped
        if hasattr(self, "_quotas"):
            with self._quota_lock:
                self._quotas.clear()
        for thread in self.threads:
            thread.stop()
        if getattr(self, "_throttle_thread", None) is not None:
            self._throttle_thread.join(5)
        self.vm.close()


@dataclass
class DirtyQuota:
    """One vCPU's dirty limit as a GCRA: ``paid`` is the time by which the pages charged so
    far fall within ``pages_per_s``; ``seen`` is the vCPU's ring count charged up to."""

    pages_per_s: float
    seen: int
    paid: float

    def charge(self, count: int, now: float) -> float:
        """Charge the entries from ``seen`` up to ``count`` at 1 / quota seconds each, with
        at most DIRTY_LIMIT_CREDIT_S of unused quota carried over; returns the time until which
        the vCPU must stay out of guest mode (in the past when it is within quota)."""
        new = count - self.seen
        self.seen = count
        if new > 0:
            self.paid = max(self.paid, now - DIRTY_LIMIT_CREDIT_S) + new / self.pages_per_s
        return self.paid



def describe_stop(vcpu, exit_: Exit) -> str:
    """Why a vCPU cannot go on, in words: the exit, its data and where the guest was."""
    area = vcpu.run_area
    reason = exit_.reason
    if reason == _SHUTDOWN:
        what = "triple fault (KVM_EXIT_SHUTDOWN)"
    elif reason == _FAIL_ENTRY:
        hw, cpu = _kvm.run_fail_entry(area)
        what = f"VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {hw:#x}, cpu {cpu})"
    elif reason == _INTERNAL_ERROR:
        sub, data = _kvm.run_internal_error(area)
        what = (f"KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {sub}, data "
                f"[{', '.join(hex(d) for d in data)}])")
    elif reason == _SYSTEM_EVENT:
        what = f"system event {_kvm.run_system_event(area)} (KVM_EXIT_SYSTEM_EVENT)"
    elif reason == _UNKNOWN:
        what = f"unknown exit (hardware reason {_kvm.run_hardware_exit_reason(area):#x})"
    elif reason == _EXCEPTION:
        nr, code = _kvm.run_exception(area)
        what = f"exception {nr} error code {code:#x} (KVM_EXIT_EXCEPTION)"
    else:
        what = f"unhandled exit KVM_EXIT_{exit_.name}"
    try:
        regs = _kvm.get_regs(vcpu.fd)
        sregs = _kvm.get_sregs(vcpu.fd)
        where = (f" at cs:rip {sregs['cs']['selector']:#x}:{regs['rip']:#x} "
                 f"rsp {regs['rsp']:#x} cr0 {sregs['cr0']:#x}")
    except OSError:
        where = ""
    return f"vCPU {vcpu.index}: {what}{where}"


_IO = _kvm.EXIT_IO
_HLT = _kvm.EXIT_HLT
_MMIO = _kvm.EXIT_MMIO
_SHUTDOWN = _kvm.EXIT_SHUTDOWN
_FAIL_ENTRY = _kvm.EXIT_FAIL_ENTRY
_INTR = _kvm.EXIT_INTR
_INTERNAL_ERROR = _kvm.EXIT_INTERNAL_ERROR
_SYSTEM_EVENT = _kvm.EXIT_SYSTEM_EVENT
_UNKNOWN = _kvm.EXIT_UNKNOWN
_EXCEPTION = _kvm.EXIT_EXCEPTION
_DIRTY_RING_FULL = _kvm.EXIT_DIRTY_RING_FULL
