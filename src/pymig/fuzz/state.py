"""Fuzz target ``state``: one state entry's payload, through its description into a guest.

Input::

    0 entry u8        which entry (modulo the number of entries, in :func:`entries` order)
    1 version u32     the version the stream claims for it
    5 payload         the entry's payload as a FULL record carries it

The entries are every state description a destination registers, each bounded by the shape of
the guest it loads into (:class:`pymig.guest.base.StateShape`), and the ``pymig.config``
section:

* the simulated vCPU (``SIM:cpu/I``), of a destination guest of each simulated seed's
  configuration (:data:`SIM_GUESTS`: every workload, one and two vCPUs), which then runs for a
  moment;
* the KVM vCPU and devices (``kvm:IDSTR/I``) of a KVM guest of one vCPU with two disks
  (:func:`kvm_shape`): the serial port, A20 gate and control port into a port bus; the ATA
  channel and each drive into a channel over the destination's disk images
  (:func:`pymig.fuzz.destination.disk_paths`), whose transfer in flight is then carried on
  for a few blocks (every access must stay inside the disk, and the image keep its size); the
  vCPU into a real vCPU only with ``PYMIG_FUZZ_KVM=1`` (:mod:`pymig.fuzz.destination`);
* the configuration, through what a destination does with it before any stream record: parsed,
  checked against the destination's limits, a KVM guest's disks opened, a guest built.

A description's payload is loaded (:func:`pymig.vmstate.load`) into a new object and decoded
again without one (:func:`pymig.vmstate.decode`, as ``pymig analyze`` does: it must accept what
``load`` accepted), then handed to the guest.

Clean ends: PymigError.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from dataclasses import dataclass
from functools import cache
from typing import Callable

from pymig import stream, vmstate
from pymig.errors import PymigError
from pymig.fuzz import destination
from pymig.fuzz._harness import Finding
from pymig.fuzz.words import stream_words as dictionary  # noqa: F401 - for _harness
from pymig.guest import GuestConfig
from pymig.guest.base import GuestState, StateShape
from pymig.machine import CONFIG_IDSTR, CONFIG_SECTION_ID, load_config
from pymig.transport import BytesChannel

HEAD = struct.Struct("<BI")
KiB, MiB = 1 << 10, 1 << 20
#: Blocks of a transfer in flight carried on after an ATA drive's state is loaded.
ATA_BLOCKS = 4


def _sim(workload: str, vcpus: int = 1, **params) -> GuestConfig:
    return GuestConfig("simulated", 4 * MiB, vcpus=vcpus, workload=workload, params=params)


#: The destination guests simulated vCPU state is loaded into, by name: the configurations of
#: the simulated seeds (:mod:`pymig.fuzz.seeds`), so that each seed's vCPU states fit theirs.
SIM_GUESTS = {
    "sim-selfcheck": _sim("selfcheck", working_set_bytes=128 * KiB, rate_pages_per_s=20000),
    "sim-idle": _sim("idle", fill_bytes=16 * KiB),
    "sim-selfcheck-2cpu-plain": _sim("selfcheck", 2, working_set_bytes=32 * KiB,
                                     rate_pages_per_s=20000),
    "sim-dirtier-live": _sim("dirtier", 2, working_set_bytes=32 * KiB,
                             rate_pages_per_s=400_000),
    "sim-compute": _sim("compute", region_bytes=64 * KiB, rounds=4),
}
SIM_CONFIG = SIM_GUESTS["sim-selfcheck"]
#: The KVM guest the KVM entries are bounded by (and, with PYMIG_FUZZ_KVM=1, loaded into).
KVM_CONFIG = GuestConfig("kvm", 4 * MiB, vcpus=1, workload="idle")


@dataclass(frozen=True)
class Entry:
    """One thing the harness loads: its name, its description (None: the configuration), the
    shape its bounds are checked against and what hands a loaded object to a guest."""

    name: str
    vmsd: vmstate.VMStateDescription | None
    shape: StateShape | None
    apply: Callable[[object], None]


_entries: list[Entry] = []
_guests: dict[str, object] = {}


def entries() -> list[Entry]:
    """Every entry, built once per process."""
    if not _entries:
        _entries.extend(_build_entries())
    return _entries


def entry_name(guest: str, idstr: str, instance: int) -> str:
    """The name of the entry that loads ``idstr`` instance ``instance`` into ``guest`` (a
    name of :data:`SIM_GUESTS`, or ``kvm``)."""
    return f"{guest}:{idstr}/{instance}"


def _build_entries() -> list[Entry]:
    from pymig.kvm.statedesc import kvm_state_specs

    found: list[Entry] = [Entry(CONFIG_IDSTR, None, None, _apply_config)]
    sims = list(SIM_GUESTS)
    # the order of the first entries is that of older corpora: configuration, a simulated
    # vCPU, the KVM vCPU and devices
    for name in sims[:1]:
        found += _sim_entries(name)
    for spec in kvm_state_specs(kvm_shape()):
        if spec.cpu is not None:
            apply = _apply_kvm_cpu
        elif spec.idstr.startswith("ide"):
            apply = _apply_ata(spec.device)
        else:
            apply = _apply_device(spec.device)
        found.append(Entry(entry_name("kvm", spec.idstr, spec.instance_id), spec.vmsd,
                           spec.shape, apply))
    for name in sims[1:]:
        found += _sim_entries(name)
    return found


def _sim_entries(name: str) -> list[Entry]:
    guest = _sim_guest(name)
    return [Entry(entry_name(name, spec.idstr, spec.instance_id), spec.vmsd, spec.shape,
                  _apply_sim(name, spec)) for spec in guest.state_specs()]


@cache
def kvm_shape() -> StateShape:
    """The KVM guest the KVM entries load into: :data:`KVM_CONFIG` with the destination's two
    disks, an XSAVE area of this host's VM size and an in-kernel irqchip (a real guest's,
    built, with PYMIG_FUZZ_KVM=1)."""
    sectors = destination.DISK_SECTORS
    if "kvm" in destination.kinds():
        return dataclasses.replace(_kvm_guest().state_shape(), disk_sectors=sectors)
    xsave, irqchip = 4096, True
    try:
        from pymig.kvm.system import Kvm

        with Kvm() as kvm:
            xsave = max(kvm.check("KVM_CAP_XSAVE2"), xsave)
            irqchip = kvm.check("KVM_CAP_IRQCHIP") > 0
    except Exception:  # noqa: BLE001 - no /dev/kvm: the shape of a host without XSAVE2
        pass
    return StateShape(KVM_CONFIG.vcpus, KVM_CONFIG.memory_bytes, xsave_size=xsave,
                      irqchip=irqchip, disk_sectors=sectors)


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
        vmstate.load(entry.vmsd, obj, payload, version, entry.shape)
    except PymigError:
        return
    try:
        vmstate.decode(entry.vmsd, payload, version, entry.shape)
    except PymigError as exc:
        raise Finding(f"{entry.name}: load took the payload, decode refused it: {exc}") from exc
    try:
        entry.apply(obj)
    except PymigError:
        pass


# --- the guests ------------------------------------------------------------------------------

def _sim_guest(name: str):
    guest = _guests.get(name)
    if guest is None or guest.status == "shutdown":
        guest = _guests[name] = destination.build(SIM_GUESTS[name])
        guest.load_state(_start_state(guest))
    return guest


def _start_state(guest) -> GuestState:
    """Every writer of a new destination guest at the start of its share (what the vCPUs an
    input does not load keep)."""
    from pymig.guest.simulated import SimCpuState

    params = guest.workload.params
    first_pass = 1 if params.workload == "selfcheck" else 0
    return GuestState(cpus=[SimCpuState(share.index, params.workload_id, share.first_frame,
                                        share.npages, phase=0, pos=0, pass_number=first_pass,
                                        rng=1, acc=0, partial_sum=0)
                            for share in guest.workload.shares], devices={})


def _apply_sim(name: str, spec) -> Callable[[object], None]:
    def apply(obj: object) -> None:
        guest = _sim_guest(name)
        state = guest.save_state()
        spec.put(state, obj)
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


class _Disks:
    """The ATA channel over the destination's disk images, built once per process."""

    channel = None
    errors: list = []

    @classmethod
    def get(cls):
        if cls.channel is None:
            from pymig.disk import DiskImage
            from pymig.kvm.ata import AtaChannel

            images = [DiskImage(path) for path in destination.disk_paths()]
            cls.channel = AtaChannel(images, on_error=cls.errors.append)
        return cls.channel


def _apply_ata(name: str) -> Callable[[object], None]:
    def apply(obj: object) -> None:
        from pymig.kvm import ata

        channel = _Disks.get()
        state = channel.save()
        state[name] = obj
        try:
            channel.load(state)
        except TypeError as exc:
            raise Finding(f"kvm:{name}: the ATA channel refused a loaded object: {exc}") from exc
        if name != "ide":  # carry on the transfer in flight, through its drive
            channel.bus.unit = int(name[len("ide-drive"):])
        _Disks.errors.clear()
        for _ in range(ATA_BLOCKS):
            for port in ata.PORTS:
                channel.read(port, 1)
            channel.read_string(ata.CMD_BASE, 2, ata.MAX_BLOCK_BYTES // 2)
            channel.write_string(ata.CMD_BASE, 4, bytes(ata.MAX_BLOCK_BYTES))
        if _Disks.errors:
            raise Finding(f"kvm:{name}: a loaded state made the disk fail: {_Disks.errors[0]}")
        for drive, sectors in zip(channel.drives, destination.DISK_SECTORS):
            size = os.fstat(drive.image.fd).st_size
            if size != sectors * destination.SECTOR_BYTES:
                raise Finding(f"kvm:{name}: a loaded state made disk {drive.unit} grow to "
                              f"{size} bytes")

    return apply


def _kvm_guest():
    guest = _guests.get("kvm")
    if guest is None:
        guest = _guests["kvm"] = destination.build(KVM_CONFIG)
    return guest


def _apply_kvm_cpu(obj: object) -> None:
    if "kvm" not in destination.kinds():
        return
    guest = _kvm_guest()
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
        destination.open_disks(config)
    except PymigError:
        return
    if not destination.builds(config):
        return
    try:
        guest = destination.build(config)
    except PymigError:
        return
    guest.close()
