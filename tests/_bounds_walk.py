"""The walk behind the state-bounds tests: every state description a guest of each kind
registers (found through its state specs, not listed by hand), every field in it, and for each
field the values a stream could carry that its bounds refuse or must take."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from _bounds_helpers import relaxed
from pymig import vmstate
from pymig.guest.base import GuestConfig, GuestState, StateShape
from pymig.guest.simulated import SimulatedGuest
from pymig.kvm.cpustate import CpuState
from pymig.kvm.statedesc import kvm_state_specs

MiB = 1 << 20

#: Simulated guests of every built-in workload: each shapes its writers' bounds differently.
SIM_WORKLOADS = {
    "idle": {},
    "dirtier": {"working_set_bytes": MiB, "pattern": "hotspot"},
    "selfcheck": {"working_set_bytes": MiB},
    "compute": {"region_bytes": MiB // 2, "rounds": 3},
}


@dataclasses.dataclass
class Entry:
    """One state entry as a destination loads it: its description, the shape its bounds are
    checked against, and a valid object of it (what a source would send)."""

    label: str
    idstr: str
    instance: int
    vmsd: vmstate.VMStateDescription
    shape: StateShape
    valid: Any

    def __str__(self) -> str:
        return f"{self.label}:{self.idstr}/{self.instance}"


@contextlib.contextmanager
def sim_entries(vcpus: int = 2) -> Iterator[list[Entry]]:
    """Every state entry of a simulated guest of each workload, with the state it saves."""
    guests = []
    try:
        entries = []
        for workload, params in SIM_WORKLOADS.items():
            guest = SimulatedGuest.create(GuestConfig("simulated", 4 * MiB, vcpus=vcpus,
                                                      workload=workload, params=params))
            guests.append(guest)
            state = guest.save_state()
            entries += [Entry(f"simulated-{workload}", s.idstr, s.instance_id, s.vmsd, s.shape,
                              s.get(state)) for s in guest.state_specs()]
        yield entries
    finally:
        for guest in guests:
            guest.close()


def kvm_entries(xsave_size: int = 4096, irqchip: bool = True, vcpus: int = 2,
                disk_sectors: tuple[int, ...] = ()) -> list[Entry]:
    """Every state entry of a KVM guest of that shape (the specs a KvmGuest registers, its
    disks' included), with the state a freshly reset vCPU and each device at power-on hold
    (what the device's description builds)."""
    shape = StateShape(vcpus, 64 * MiB, xsave_size=xsave_size, irqchip=irqchip,
                       disk_sectors=disk_sectors)
    specs = kvm_state_specs(shape)
    state = GuestState(
        cpus=[CpuState(index=i, xsave=bytes(xsave_size), lapic=bytes(1024 if irqchip else 0))
              for i in range(vcpus)],
        devices={s.device: s.vmsd.factory() for s in specs if s.device is not None})
    label = (f"kvm-xsave{xsave_size}{'' if irqchip else '-noirqchip'}"
             f"{'-disks' + 'x'.join(map(str, disk_sectors)) if disk_sectors else ''}")
    return [Entry(label, s.idstr, s.instance_id, s.vmsd, s.shape, s.get(state))
            for s in specs]


def descriptions(vmsd: vmstate.VMStateDescription) -> Iterator[vmstate.VMStateDescription]:
    """``vmsd`` and every description nested in it (fields and subsections)."""
    yield vmsd
    for f in vmsd.fields:
        if isinstance(f.elem, vmstate.VMStateDescription):
            yield from descriptions(f.elem)
    for sub in vmsd.subsections:
        yield from descriptions(sub)


# --- the cases ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One value for one field: ``refused`` says whether the loader must refuse it."""

    path: str  # as the loader names it: "sregs.cs.dpl", "xcr_index[0]"
    what: str  # "max+1", "min-1", "type max", "bool 2", "count > max", "length != exact" ...
    set: Any  # the change: callable(values dict) -> None
    refused: bool
    shown: Any  # the value the refusal must name


def fields(vmsd: vmstate.VMStateDescription, prefix: tuple[str, ...] = ()
           ) -> Iterator[tuple[tuple[str, ...], vmstate.Field]]:
    """Every leaf field of ``vmsd`` with its path of keys in decode()'s dict."""
    for f in vmsd.fields:
        if f.kind == "struct":
            yield from fields(f.elem, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f
    for sub in vmsd.subsections:  # a subsection's fields sit beside its parent's
        yield from fields(sub, prefix)


def _setter(keys: tuple[str, ...], value: Any):
    def change(values: dict) -> None:
        for key in keys[:-1]:
            values = values[key]
        values[keys[-1]] = value

    return change


def _current(valid: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        valid = valid[key]
    return valid


def cases(entry: Entry, valid: dict) -> Iterator[Case]:
    """min-1, max+1, the type's largest value and a wrong type on the wire, for every field."""
    for keys, f in fields(entry.vmsd):
        path = ".".join(keys)
        b = f.bound
        t = f.elem
        if f.kind == "scalar":
            if b.any:
                for value, what in ((t.lo, "type min"), (t.hi, "type max")):
                    yield Case(path, what, _setter(keys, value), False, value)
                continue
            lo, hi = b.limits(t, entry.shape)
            if lo > t.lo:
                yield Case(path, "min-1", _setter(keys, lo - 1), True, lo - 1)
            if hi < t.hi:
                yield Case(path, "max+1", _setter(keys, hi + 1), True, hi + 1)
            if hi < t.hi or b.check is not None:
                yield Case(path, "type max", _setter(keys, t.hi), True, t.hi)
            if t.is_bool:
                yield Case(path, "bool 2", _setter(keys, 2), True, 2)
            continue
        # arrays and buffers
        current = _current(valid, keys)
        n = len(current)
        blank = b"\0" if f.kind == "buffer" else [0]
        if f.length is None:  # the wire says how many: claim more than the maximum
            yield Case(path, "count > max", _setter(keys, blank * (f.max_count + 1)), True,
                       f.max_count + 1)
        if b.any:
            if isinstance(t, vmstate.Scalar) and f.kind == "array" and n:
                yield Case(path, "type max", _setter(keys, [t.hi] * n), False, t.hi)
            continue
        if b.exact is not None:
            exact = b.exact(entry.shape) if callable(b.exact) else b.exact
            for wrong, what in ((exact + 1, "length max+1"), (exact - 1, "length min-1")):
                if 0 <= wrong <= f.max_count:
                    yield Case(path, what, _setter(keys, blank * wrong), True, wrong)
        if b.lo is not None or b.hi is not None:
            lo, hi = b.limits(t, entry.shape)
            length = max(n, 1) if b.exact is None else n
            for value, what, cond in ((lo - 1, "min-1", lo > t.lo), (hi + 1, "max+1", hi < t.hi),
                                      (t.hi, "type max", hi < t.hi)):
                if cond and length:
                    yield Case(f"{path}[0]", f"element {what}",
                               _setter(keys, [value] + [lo] * (length - 1)), True, value)
        if b.check is not None and b.exact is None:
            grown = current + blank
            yield Case(path, "length +1 (rule)", _setter(keys, grown), True,
                       len(grown) if f.kind == "buffer" else None)


def payload_for(entry: Entry, change) -> bytes:
    """The valid object's encoding with ``change`` made to its values, bounds ignored."""
    loose = relaxed(entry.vmsd)
    values = vmstate.decode(loose, vmstate.save(entry.vmsd, entry.valid),
                            entry.vmsd.version_id)
    change(values)
    return vmstate.save(loose, values)


def valid_values(entry: Entry) -> dict:
    return vmstate.decode(entry.vmsd, vmstate.save(entry.vmsd, entry.valid),
                          entry.vmsd.version_id, entry.shape)
