"""The save-state registry: ids, order, renames, blockers, and a model-checked state machine."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from pymig.errors import MigrationError, StateError
from pymig.savevm import (
    LiveHandlers,
    Priority,
    RegistrationError,
    SaveStateEntry,
    SaveStateRegistry,
)
from pymig.vmstate import Field, VMStateDescription

SERIAL_VMSD = VMStateDescription("serial", 2, 1, [Field.u8("lcr"), Field.u8("ier")])


@dataclass
class Serial:
    lcr: int = 0
    ier: int = 0


class RecordingHandlers:
    """Live handlers that note each call, so a test can see what the registry hands back."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def setup(self, opaque, out):
        self.calls.append("setup")

    def iterate(self, opaque, out):
        self.calls.append("iterate")
        return True

    def pending(self, opaque):
        return 0

    def complete(self, opaque, out):
        self.calls.append("complete")

    def load(self, opaque, data, version_id, section_type):
        self.calls.append("load")

    def cleanup(self, opaque):
        self.calls.append("cleanup")


def test_auto_instance_ids_count_per_idstr_from_the_highest():
    reg = SaveStateRegistry()
    ids = [reg.register_vmstate("serial", None, SERIAL_VMSD, Serial()).instance_id
           for _ in range(3)]
    assert ids == [0, 1, 2]
    assert reg.register_vmstate("timer", -1, SERIAL_VMSD, Serial()).instance_id == 0
    assert reg.register_vmstate("serial", 7, SERIAL_VMSD, Serial()).instance_id == 7
    assert reg.register_vmstate("serial", None, SERIAL_VMSD, Serial()).instance_id == 8


def test_section_ids_are_unique_increasing_and_never_reused():
    reg = SaveStateRegistry()
    first = reg.register_vmstate("a", 0, SERIAL_VMSD, Serial())
    second = reg.register_vmstate("b", 0, SERIAL_VMSD, Serial())
    assert second.section_id > first.section_id
    reg.unregister(second)
    third = reg.register_vmstate("b", 0, SERIAL_VMSD, Serial())
    assert third.section_id > second.section_id
    assert reg.by_section_id(third.section_id) is third
    assert reg.by_section_id(second.section_id) is None


def test_ram_first_then_platform_then_registration_order():
    reg = SaveStateRegistry()
    cpu = reg.register_vmstate("cpu", 0, SERIAL_VMSD, Serial())
    pic = reg.register_vmstate("pic", 0, SERIAL_VMSD, Serial(), priority=Priority.PLATFORM)
    serial = reg.register_vmstate("serial", 0, SERIAL_VMSD, Serial())
    ram = reg.register_savevm_live("ram", 0, 4, RecordingHandlers(), object())
    dirty = reg.register_savevm_live("dirty-bitmaps", 0, 1, RecordingHandlers(), object(),
                                     priority=Priority.DEFAULT)
    assert reg.entries() == [ram, pic, cpu, serial, dirty]
    assert reg.live_entries() == [ram, dirty]
    assert reg.state_entries() == [pic, cpu, serial]
    assert list(reg) == reg.entries() and len(reg) == 5
    assert ram.is_live and not cpu.is_live and ram.version_id == 4


def test_duplicate_registration_is_refused():
    reg = SaveStateRegistry()
    reg.register_vmstate("serial", 0, SERIAL_VMSD, Serial())
    with pytest.raises(RegistrationError, match="already registered") as err:
        reg.register_vmstate("serial", 0, SERIAL_VMSD, Serial())
    assert isinstance(err.value, ValueError) and err.value.entry == "serial"
    with pytest.raises(RegistrationError):
        reg.register_savevm_live("serial", 0, 1, RecordingHandlers(), None)
    assert len(reg) == 1


def test_two_entries_cannot_claim_the_same_compat_name_or_alias():
    reg = SaveStateRegistry()
    reg.register_vmstate("uart", 0, SERIAL_VMSD, Serial(), compat_names=["serial"], alias_id=5)
    with pytest.raises(RegistrationError, match="compat name serial/0"):
        reg.register_vmstate("uart16550", 0, SERIAL_VMSD, Serial(), compat_names=["serial"])
    with pytest.raises(RegistrationError, match="alias uart/5"):
        reg.register_vmstate("uart", 1, SERIAL_VMSD, Serial(), alias_id=5)
    assert len(reg) == 1


@pytest.mark.parametrize("kwargs", [
    {"idstr": ""}, {"idstr": "x" * 256}, {"instance_id": -2}, {"instance_id": 2**32},
    {"alias_id": -1}, {"compat_names": [""]},
])
def test_bad_names_and_ids_are_refused(kwargs):
    args = {"idstr": "dev", "instance_id": 0, "vmsd": SERIAL_VMSD, "opaque": Serial(), **kwargs}
    with pytest.raises(RegistrationError):
        SaveStateRegistry().register_vmstate(**args)


def test_live_handlers_must_implement_the_protocol():
    class Incomplete:
        def setup(self, opaque, out): ...
        def iterate(self, opaque, out): ...

    assert isinstance(RecordingHandlers(), LiveHandlers)
    with pytest.raises(TypeError, match="pending, complete, load, cleanup"):
        SaveStateRegistry().register_savevm_live("ram", 0, 1, Incomplete(), None)
    with pytest.raises(TypeError):
        SaveStateRegistry().register_vmstate("dev", 0, "not a description", None)


def test_find_tries_idstr_then_compat_names_then_aliases():
    reg = SaveStateRegistry()
    # A build that renamed "serial" to "uart" and renumbered its instance 3 as 0.
    uart = reg.register_vmstate("uart", 0, SERIAL_VMSD, Serial(), compat_names=("serial", "com"),
                                alias_id=3)
    assert reg.find("uart", 0) is uart
    assert reg.find("serial", 0) is uart and reg.find("com", 0) is uart
    assert reg.find("uart", 3) is uart and reg.find("serial", 3) is uart
    assert reg.find("serial", 1) is None and reg.find("uart", 1) is None

    # A new device really called "serial": the exact name wins over the compat name.
    serial = reg.register_vmstate("serial", 0, SERIAL_VMSD, Serial())
    assert reg.find("serial", 0) is serial
    assert reg.find("serial", 3) is uart  # still the alias
    reg.unregister(uart)
    assert reg.find("com", 0) is None and reg.find("uart", 3) is None
    assert reg.find("serial", 0) is serial


def test_old_stream_loads_into_renamed_device_through_find():
    old_build, new_build = SaveStateRegistry(), SaveStateRegistry()
    source = old_build.register_vmstate("serial", 0, SERIAL_VMSD, Serial(lcr=3, ier=1))
    target_dev = Serial()
    new_build.register_vmstate("uart", 0, SERIAL_VMSD, target_dev, compat_names=["serial"])
    data = source.save_state()
    entry = new_build.find(source.idstr, source.instance_id)
    entry.check_load_version(source.version_id)
    entry.load_state(data, source.version_id)
    assert target_dev == Serial(lcr=3, ier=1)


def test_entry_load_errors_name_the_entry():
    reg = SaveStateRegistry()
    entry = reg.register_vmstate("com1", 0, SERIAL_VMSD, Serial())
    with pytest.raises(StateError) as err:
        entry.load_state(b"\x01", 2)
    assert err.value.entry == "com1" and "com1/0" in str(err.value)
    with pytest.raises(StateError) as err:
        entry.check_load_version(3)
    assert err.value.versions == (3, 1, 2)
    entry.check_load_version(1)
    live = reg.register_savevm_live("ram", 0, 4, RecordingHandlers(), None)
    with pytest.raises(TypeError, match="live entry"):
        live.save_state()
    with pytest.raises(StateError):
        live.check_load_version(5)


def test_blockers_and_unmigratable_entries_are_all_reported():
    reg = SaveStateRegistry()
    reg.check_migratable()
    vfio = reg.add_blocker("VFIO device 0000:01:00.0 is assigned")
    job = reg.add_blocker("a snapshot job is running")
    gpu = reg.register_vmstate("gpu", 0, SERIAL_VMSD, Serial(), unmigratable="no state save")
    with pytest.raises(MigrationError) as err:
        reg.check_migratable()
    text = str(err.value)
    assert "VFIO device" in text and "snapshot job" in text and "gpu/0" in text
    assert "no state save" in text
    assert reg.remove_blocker(vfio) is True and reg.remove_blocker(vfio) is False
    reg.remove_blocker(job)
    with pytest.raises(MigrationError, match="gpu/0"):
        reg.check_migratable()
    reg.unregister(gpu)
    reg.check_migratable()
    assert reg.blockers() == []
    with pytest.raises(ValueError):
        reg.add_blocker("")


def test_unregister_twice_is_an_error():
    reg = SaveStateRegistry()
    entry = reg.register_vmstate("dev", None, SERIAL_VMSD, Serial())
    reg.unregister(entry)
    with pytest.raises(RegistrationError, match="not registered"):
        reg.unregister(entry)
    other = SaveStateRegistry()
    with pytest.raises(RegistrationError):
        other.unregister(reg.register_vmstate("dev", None, SERIAL_VMSD, Serial()))


class RegistryMachine(RuleBasedStateMachine):
    """Register, unregister and find against a dict model of (idstr, instance) -> entry."""

    registered = Bundle("registered")

    def __init__(self) -> None:
        super().__init__()
        self.registry = SaveStateRegistry()
        self.model: dict[tuple[str, int], SaveStateEntry] = {}
        self.last_section_id = -1

    @rule(target=registered, idstr=st.sampled_from(["ram", "cpu", "serial"]),
          instance=st.none() | st.integers(0, 3), live=st.booleans(),
          priority=st.sampled_from(list(Priority)))
    def register(self, idstr, instance, live, priority):
        taken = {i for (name, i) in self.model if name == idstr}
        if instance is not None and instance in taken:
            with pytest.raises(RegistrationError):
                self.registry.register_vmstate(idstr, instance, SERIAL_VMSD, Serial())
            return multiple()  # nothing new for the bundle
        expected = instance if instance is not None else max(taken, default=-1) + 1
        if live:
            entry = self.registry.register_savevm_live(idstr, instance, 1, RecordingHandlers(),
                                                       None, priority=priority)
        else:
            entry = self.registry.register_vmstate(idstr, instance, SERIAL_VMSD, Serial(),
                                                   priority=priority)
        assert entry.instance_id == expected
        assert entry.section_id > self.last_section_id
        self.last_section_id = entry.section_id
        self.model[(idstr, expected)] = entry
        return entry

    @rule(entry=consumes(registered))
    def unregister(self, entry):
        self.registry.unregister(entry)
        del self.model[(entry.idstr, entry.instance_id)]

    @rule(idstr=st.sampled_from(["ram", "cpu", "serial", "other"]), instance=st.integers(0, 5))
    def find(self, idstr, instance):
        assert self.registry.find(idstr, instance) is self.model.get((idstr, instance))

    @invariant()
    def ordered_by_priority_then_registration(self):
        entries = self.registry.entries()
        assert set(entries) == set(self.model.values())
        assert entries == sorted(entries, key=lambda e: (-e.priority, e.section_id))
        assert self.registry.live_entries() == [e for e in entries if e.is_live]
        assert len({e.section_id for e in entries}) == len(entries)


TestRegistryMachine = RegistryMachine.TestCase


def test_state_goes_in_and_out_as_values_and_the_entry_is_untouched():
    # The machine registers its vCPU and device entries without an object: each save takes
    # the object to encode, each load returns a new one, and the entry stays as registered.
    reg = SaveStateRegistry()
    vmsd = VMStateDescription("serial", 2, 1, [Field.u8("lcr"), Field.u8("ier")],
                              factory=Serial)
    entry = reg.register_vmstate("com1", 0, vmsd, None)
    first, second = entry.save_state(Serial(lcr=3)), entry.save_state(Serial(ier=1))
    loaded = entry.load_state(first, entry.version_id)
    assert loaded == Serial(lcr=3) and entry.load_state(second, 2) == Serial(ier=1)
    assert entry.opaque is None
    into = Serial()
    assert entry.load_state(first, 2, into=into) is into and into == Serial(lcr=3)
