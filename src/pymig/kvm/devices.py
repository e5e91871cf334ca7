"""The few port-I/O devices pymig's VMM emulates, each with its state as a small dataclass.

==========  ===========================================================================
port        device
==========  ===========================================================================
0x3f8-0x3ff 16550-style UART (COM1): THR bytes go to the guest's Console; LSR always reads
            0x60 (transmitter empty), the other registers keep what the guest wrote.  No
            interrupts are raised and nothing is ever received.
0x92        "fast A20" system control port A: bit 1 (A20) reads back as written; bit 0 (fast
            reset) stops the guest (pymig does not reset guests).  A20 is never actually
            gated: guest memory does not wrap at 1 MiB.
0x510       pymig control port: ``in`` (dword) reads ``CONTROL_MAGIC``; ``out`` (dword)
            reports an event, ``(argument << 8) | code``: 1 pass completed, 2 compute done,
            3 selfcheck error, 4 power off (argument = exit code).
0x511       pymig pacing port: ``out`` (dword) N = the guest has nothing to do for N
            microseconds; the VMM lets the vCPU thread sleep up to that long (a pause or
            kick ends the sleep early).
==========  ===========================================================================

Every other port reads as all-ones and ignores writes, logged once per port, unless a device
the guest was configured with is attached there (the ATA channel of a guest with disks at
0x1f0-0x1f7 and 0x3f6: :mod:`pymig.kvm.ata`).

The control device also answers at the **control MMIO page** (guest-physical 0xfeb00000, not
RAM), the interface of the built-in workloads, which run at CPL 3 (no ``hlt`` there; the
ports work too, through the TSS's I/O permission bitmap, see :mod:`pymig.guest.loader`): a
dword write at +0x0 is an event (as port 0x510), at +0x8 a pacing sleep (as port 0x511), at
+0x10 "halt": the vCPU thread parks until the VMM pauses it (the CPL 3 stand-in for HLT; the
guest loops on it so it parks again after every resume).  A read at +0x0 returns ``CONTROL_MAGIC``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

SERIAL_BASE = 0x3F8
A20_PORT = 0x92
CONTROL_PORT = 0x510
PACE_PORT = 0x511
CONTROL_MAGIC = 0x47494D50  # "PMIG" little-endian
CONTROL_MMIO = 0xFEB00000
CONTROL_MMIO_BYTES = 0x1000
CTL_EVENT, CTL_PACE, CTL_HALT = 0x0, 0x8, 0x10

EV_PASS = 1
EV_DONE = 2
EV_ERROR = 3
EV_POWEROFF = 4
EVENT_NAMES = {EV_PASS: "pass", EV_DONE: "done", EV_ERROR: "error", EV_POWEROFF: "poweroff"}

MAX_PACE_SLEEP_S = 0.1


class GuestStopped(Exception):
    """Raised by a device (on a vCPU thread) when the guest asks to stop: power off or reset."""

    def __init__(self, reason: str, exit_code: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


@dataclass
class SerialState:
    """The UART registers a guest can write and read back."""

    VERSION = 1
    ier: int = 0
    lcr: int = 0x03
    mcr: int = 0
    scr: int = 0
    dll: int = 0x0C  # 9600 baud divisor, as firmware leaves it
    dlm: int = 0
    fcr: int = 0


class Serial16550:
    """COM1 transmit side: what the guest writes to THR goes to ``output``."""

    LSR_IDLE = 0x60  # THR empty | transmitter empty
    MSR_READY = 0xB0  # DCD | DSR | CTS

    def __init__(self, output: Callable[[bytes], None]):
        self.state = SerialState()
        self._output = output

    def read(self, offset: int) -> int:
        s = self.state
        dlab = bool(s.lcr & 0x80)
        if offset == 0:
            return s.dll if dlab else 0  # nothing is ever received
        if offset == 1:
            return s.dlm if dlab else s.ier
        if offset == 2:
            return 0x01 | (0xC0 if s.fcr & 1 else 0)  # no interrupt pending; FIFO bits
        return {3: s.lcr, 4: s.mcr, 5: self.LSR_IDLE, 6: self.MSR_READY, 7: s.scr}[offset]

    def write(self, offset: int, value: int) -> None:
        s = self.state
        dlab = bool(s.lcr & 0x80)
        if offset == 0:
            if dlab:
                s.dll = value
            else:
                self._output(bytes((value,)))
        elif offset == 1:
            if dlab:
                s.dlm = value
            else:
                s.ier = value & 0x0F
        elif offset == 2:
            s.fcr = value & 0xC9  # reset bits (1, 2) self-clear
        elif offset == 3:
            s.lcr = value
        elif offset == 4:
            s.mcr = value & 0x1F
        elif offset == 7:
            s.scr = value
        # offsets 5 and 6 (LSR, MSR) are read-only


@dataclass
class A20State:
    """System control port A as the guest last wrote it."""

    VERSION = 1
    value: int = 0x02  # A20 enabled, as firmware hands over


class A20Gate:
    def __init__(self) -> None:
        self.state = A20State()

    def read(self, offset: int) -> int:
        return self.state.value

    def write(self, offset: int, value: int) -> None:
        self.state.value = value & 0xFE
        if value & 1:
            raise GuestStopped("the guest requested a reset through port 0x92")


@dataclass
class ControlPortState:
    """What the guest reported through the control port so far."""

    VERSION = 1
    events: int = 0
    last_event: int = 0
    last_argument: int = 0
    error_events: int = 0


class ControlPort:
    """pymig's control and pacing ports; ``on_event(vcpu_index, code, argument)`` observers."""

    def __init__(self, sleep: Callable[[object, float | None], None]):
        self.state = ControlPortState()
        self._sleep = sleep
        self.observers: list[Callable[[int, int, int], None]] = []

    def read(self, offset: int) -> int:
        return CONTROL_MAGIC if offset == 0 else 0

    def write_from(self, vcpu: object, index: int, offset: int, value: int) -> None:
        """A port write; ``offset`` from CONTROL_PORT (0 event, 1 pacing)."""
        if offset == PACE_PORT - CONTROL_PORT:
            self._sleep(vcpu, min(value / 1e6, MAX_PACE_SLEEP_S))
        else:
            self.event(index, value)

    def mmio_write(self, vcpu: object, index: int, offset: int, value: int) -> None:
        """A write to the control MMIO page at ``offset``."""
        if offset == CTL_EVENT:
            self.event(index, value)
        elif offset == CTL_PACE:
            self._sleep(vcpu, min(value / 1e6, MAX_PACE_SLEEP_S))
        elif offset == CTL_HALT:
            self._sleep(vcpu, None)

    def event(self, index: int, value: int) -> None:
        code, argument = value & 0xFF, value >> 8
        s = self.state
        s.events += 1
        s.last_event, s.last_argument = code, argument
        if code == EV_ERROR:
            s.error_events += 1
        for observer in list(self.observers):
            observer(index, code, argument)
        if code == EV_POWEROFF:
            raise GuestStopped("the guest powered off", exit_code=argument)


class PortBus:
    """Routes port I/O to the devices; unknown ports read all-ones and are logged once.

    Devices a guest has only when configured (the ATA channel of a guest with disks) are
    :meth:`attach`-ed: such a device names its ``ports``, answers ``read(port, size)`` and
    ``write(port, size, value)``, may move the items of a string instruction in one call
    (``read_string(port, size, count)`` / ``write_string(port, size, data)``), and
    ``save()`` / ``load(devices)`` its state by device name."""

    def __init__(self, serial: Serial16550, a20: A20Gate, control: ControlPort):
        self.serial = serial
        self.a20 = a20
        self.control = control
        self.attached: list = []
        self._by_port: dict = {}
        self._logged: set[tuple[int, bool]] = set()

    def attach(self, device) -> None:
        """Route ``device.ports`` to ``device`` (before the guest runs)."""
        taken = [hex(p) for p in device.ports if p in self._by_port]
        if taken:
            raise ValueError(f"ports {', '.join(taken)} already have a device")
        self.attached.append(device)
        for port in device.ports:
            self._by_port[port] = device

    def string_device(self, port: int):
        """The device that moves all the items of a string I/O exit at ``port`` in one call,
        or None (each item then goes through read/write)."""
        device = self._by_port.get(port)
        return device if device is not None and hasattr(device, "read_string") else None

    def read(self, port: int, size: int) -> int:
        device = self._by_port.get(port)
        if device is not None:
            return device.read(port, size)
        if SERIAL_BASE <= port < SERIAL_BASE + 8:
            return self.serial.read(port - SERIAL_BASE)
        if port == A20_PORT:
            return self.a20.read(0)
        if port in (CONTROL_PORT, PACE_PORT):
            return self.control.read(port - CONTROL_PORT)
        self._log_once(port, False)
        return (1 << (8 * size)) - 1

    def write(self, vcpu: object, index: int, port: int, size: int, value: int) -> None:
        device = self._by_port.get(port)
        if device is not None:
            device.write(port, size, value)
        elif SERIAL_BASE <= port < SERIAL_BASE + 8:
            self.serial.write(port - SERIAL_BASE, value & 0xFF)
        elif port == A20_PORT:
            self.a20.write(0, value & 0xFF)
        elif port in (CONTROL_PORT, PACE_PORT):
            self.control.write_from(vcpu, index, port - CONTROL_PORT, value)
        else:
            self._log_once(port, True)

    def _log_once(self, port: int, is_write: bool) -> None:
        if (port, is_write) not in self._logged:
            self._logged.add((port, is_write))
            log.info("guest %s unemulated port %#x (ignored from now on)",
                     "wrote" if is_write else "read", port)

    def save(self) -> dict[str, object]:
        states = {"serial": self.serial.state, "a20": self.a20.state,
                  "control": self.control.state}
        for device in self.attached:
            states.update(device.save())
        return states

    def load(self, devices: dict[str, object]) -> None:
        self.serial.state = _copy(devices["serial"], SerialState)
        self.a20.state = _copy(devices["a20"], A20State)
        self.control.state = _copy(devices["control"], ControlPortState)
        for device in self.attached:
            device.load(devices)


def _copy(state: object, cls: type):
    """A fresh instance of ``cls`` from a saved state object (so the guest never aliases it)."""
    if not isinstance(state, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(state).__name__}")
    return cls(**vars(state))
