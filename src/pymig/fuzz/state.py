"""Fuzz target ``state``: one state entry's payload, through its description into a guest.

Input::

    0 entry u8        which entry (modulo the number of entries, in :func:`entries` order)
    1 version u32     the version the stream claims for it
    5 payload         the entry's payload as a FULL record carries it

The entries are every state description a guest kind registers (a destination's
``state_specs()``: the simulated vCPU; the KVM vCPU and devices), and the ``pymig.config``
section.  A description's payload is loaded (:func:`pymig.vmstate.load`) into a new object,
decoded again without one (:func:`pymig.vmstate.decode`, as ``pymig analyze`` does: it must
accept what ``load`` accepted), and then handed to a guest: the simulated vCPU to a destination
guest of the shape the seeds come from (:data:`SIM_CONFIG`), which then runs for a moment; the
KVM devices to a port bus; the KVM vCPU to a real vCPU only with ``PYMIG_FUZZ_KVM=1``
(:mod:`pymig.fuzz.destination`).  The configuration goes through what a destination does with
it before any stream record: parsed, checked against the destination's limits, and a guest
built.

Clean ends: PymigError, and ValueError from the configuration's refusal.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from pymig import stream, vmstate
from pymig.errors import PymigError
from pymig.fuzz import destination
from pymig.fuzz._harness import Finding
from pymig.fuzz.words import stream_words as dictionary  # noqa: F401 - for _harness
from pymig.guest import GuestConfig
from pymig.guest.base import GuestState
from pymig.machine import CONFIG_IDSTR, CONFIG_SECTION_ID, load_config
from pymig.transport import BytesChannel

HEAD = struct.Struct("<BI")
MiB = 1 << 20
#: The destination guest simulated vCPU state is loaded into; the seeds are its states.
SIM_CONFIG = GuestConfig("simulated", 4 * MiB, vcpus=1, workload="selfcheck",
                         params={"working_set_bytes": 128 << 10, "rate_pages_per_s": 20000})


@dataclass(frozen=True)
class Entry:
    """One thing the harness loads: its name, its description (None: the configuration)
    and what hands a loaded object to a guest."""

    name: str
    vmsd: vmstate.VMStateDescription | None
    apply: Callable[[object], None]


_entries: list[Entry] = []
_guests: dict[str, object] = {}


def entries() -> list[Entry]:
    """Every entry, built once per process."""
    if not _entries:
        _entries.extend(_build_entries())
    return _entries


def _build_entries() -> list[Entry]:
    from pymig.kvm.statedesc import kvm_state_specs

    found: list[Entry] = [Entry(CONFIG_IDSTR, None, _apply_config)]
    guest = _sim_guest()
    for spec in guest.state_specs():
        found.append(Entry(f"simulated:{spec.idstr}", spec.vmsd, _apply_sim(spec)))
    seen = set()
    for spec in kvm_state_specs(1):
        if spec.idstr in seen:
            continue
        seen.add(spec.idstr)
        apply = _apply_kvm_cpu if spec.cpu is not None else _apply_device(spec.device)
        found.append(Entry(f"kvm:{spec.idstr}", spec.vmsd, apply))
    return found


def make_input(name: str, version: int, payload: bytes) -> bytes:
    """The input that loads ``payload`` at ``version`` into the entry called ``name``."""
    index = next(i for i, e in enumerate(entries()) if e.name == name)
    return HEAD.pack(index, version) + payload


def setup() -> None:
    entries()


def test_one_input(data: bytes) -> None:
    if len(data) < HEAD.size:
        return
    index, version = HEAD.unpack_from(data)
    all_entries = entries()
    entry = all_entries[index % len(all_entries)]
    payload = data[HEAD.size:]
    if entry.vmsd is None:
        entry.apply((version, payload))
        return
    obj = entry.vmsd.factory() if entry.vmsd.factory else {}
    try:
        vmstate.load(entry.vmsd, obj, payload, version)
    except PymigError:
        return
    try:
        vmstate.decode(entry.vmsd, payload, version)
    except PymigError as exc:
        raise Finding(f"{entry.name}: load took the payload, decode refused it: {exc}") from exc
    try:
        entry.apply(obj)
    except PymigError:
        pass


# --- the guests ------------------------------------------------------------------------------

def _sim_guest():
    guest = _guests.get("simulated")
    if guest is None or guest.status == "shutdown":
        guest = _guests["simulated"] = destination.build(SIM_CONFIG)
    return guest


def _apply_sim(spec) -> Callable[[object], None]:
    def apply(obj: object) -> None:
        guest = _sim_guest()
        cpus = [None] * guest.vcpu_count
        state = GuestState(cpus=cpus, devices={})
        spec.put(state, obj)
        if any(cpu is None for cpu in cpus):
            return  # an entry of another vCPU than this guest has: nothing to hand over
        guest.load_state(state)
        destination.run_briefly(guest)

    return apply


def _apply_device(name: str) -> Callable[[object], None]:
    def apply(obj: object) -> None:
        from pymig.kvm import devices

        bus = devices.PortBus(devices.Serial16550(lambda data: None), devices.A20Gate(),
                              devices.ControlPort(lambda vcpu, seconds: None))
        state = bus.save()
        state[name] = obj
        try:
            bus.load(state)
        except TypeError as exc:
            raise Finding(f"kvm:{name}: the port bus refused a loaded object: {exc}") from exc
        for port in range(devices.SERIAL_BASE, devices.SERIAL_BASE + 8):
            bus.read(port, 1)
        bus.read(devices.A20_PORT, 1)
        bus.read(devices.CONTROL_PORT, 1)

    return apply


def _apply_kvm_cpu(obj: object) -> None:
    if "kvm" not in destination.kinds():
        return
    guest = _guests.get("kvm")
    if guest is None:
        config = GuestConfig("kvm", 4 * MiB, vcpus=1, workload="idle")
        guest = _guests["kvm"] = destination.build(config)
    state = guest.save_state()
    state.cpus[0] = obj
    guest.load_state(state)


def _apply_config(item: tuple[int, bytes]) -> None:
    """The configuration section, as a destination reads it first thing."""
    version, payload = item
    out = BytesChannel()
    writer = stream.StreamWriter(out)
    writer.write_header()
    writer.full(CONFIG_SECTION_ID, CONFIG_IDSTR, 0, version, payload)
    reader = stream.StreamReader(BytesChannel(out.getvalue()))
    reader.read_header()
    try:
        config = load_config(reader)
        destination.check_config(config)
        guest = destination.build(config)
    except (PymigError, ValueError):
        return
    guest.close()
