"""Every field of every state description declares its bounds, and the loader refuses a value
outside them: the entry, field and value named, before anything is applied.

The descriptions are found the way a destination finds them (the state specs of a simulated
guest of each workload, of a KVM guest, the guest configuration's keys), so a description added
later is walked too, and fails here until its fields say which values they take.  For each
field the walk tries min-1, max+1, the largest value of its type and the wrong types the wire
can carry (a bool byte of 2, a count beyond the maximum, a buffer of the wrong length); a field
declared to take any value must take its type's smallest and largest.  Through a real
destination: test_state_bounds_e2e.py.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _bounds_walk import Entry, cases, descriptions, fields, kvm_entries, payload_for, \
    sim_entries, valid_values
from pymig import stream, vmstate
from pymig.errors import StateError
from pymig.guest.base import CONFIG_FIELDS, GuestConfig
from pymig.machine import CONFIG_IDSTR, CONFIG_SECTION_ID, CONFIG_VERSION, load_config
from pymig.transport import BytesChannel


@pytest.fixture(scope="module")
def entries():
    """Every state entry of each kind of guest, with a valid object of it."""
    with sim_entries() as sim:
        yield (sim + kvm_entries(4096) + kvm_entries(8192) + kvm_entries(4096, irqchip=False)
               + kvm_entries(4096, disk_sectors=(2048, 1 << 20)))


def test_every_field_of_every_description_declares_its_bounds(entries):
    undeclared, seen = [], set()
    for entry in entries:
        assert entry.shape is not None, f"{entry} comes without the guest's shape"
        for vmsd in descriptions(entry.vmsd):
            for f in vmsd.fields:
                if not f.declared and (vmsd.name, f.name) not in seen:
                    undeclared.append(f"{vmsd.name}.{f.name}")
                seen.add((vmsd.name, f.name))
    assert not undeclared, f"fields without declared bounds: {undeclared}"
    # both kinds found (a discovery that found nothing would pass the line above)
    names = {e.idstr for e in entries}
    assert {"cpu", "serial", "a20", "control", "ide", "ide-drive"} <= names, names


def load(entry: Entry, payload: bytes) -> object:
    target = copy.deepcopy(entry.valid)
    vmstate.load(entry.vmsd, target, payload, entry.vmsd.version_id, entry.shape)
    return target


def walk(entry: Entry) -> tuple[int, int, list[str]]:
    """Every case of every field of ``entry``: (fields, cases, failures)."""
    valid = valid_values(entry)  # the valid state is itself within bounds
    failures, count = [], 0
    for case in cases(entry, valid):
        count += 1
        payload = payload_for(entry, case.set)
        target = copy.deepcopy(entry.valid)
        before = copy.deepcopy(target)
        where = f"{entry} {case.path} {case.what}"
        try:
            vmstate.load(entry.vmsd, target, payload, entry.vmsd.version_id, entry.shape)
        except StateError as exc:
            text = str(exc)
            if not case.refused:
                failures.append(f"{where}: refused a value its bounds take: {text}")
            elif exc.entry != entry.vmsd.name or exc.field != case.path:
                failures.append(f"{where}: the refusal names {exc.entry} / {exc.field}: {text}")
            elif case.shown is not None and str(case.shown) not in text:
                failures.append(f"{where}: the refusal does not name the value "
                                f"{case.shown}: {text}")
            elif target != before:
                failures.append(f"{where}: the refused load changed the object")
            continue
        if case.refused:
            failures.append(f"{where}: loaded a value out of bounds")
    return sum(1 for _ in fields(entry.vmsd)), count, failures


def test_every_field_refuses_what_is_out_of_its_bounds_and_takes_what_is_in(entries):
    total_cases = 0
    failures = []
    walked = set()
    for entry in entries:
        _, n_cases, failed = walk(entry)
        failures += failed
        total_cases += n_cases
        walked |= {(entry.vmsd.name, entry.idstr, keys) for keys, _ in fields(entry.vmsd)}
    assert not failures, "\n".join(failures[:40])
    print(f"\nstate bounds: {len(walked)} fields walked in {len(entries)} entries of "
          f"{len({e.label for e in entries})} guest shapes, {total_cases} cases")
    assert len(walked) > 150 and total_cases > 1000  # the walk found the descriptions


def test_every_field_with_bounds_has_a_value_it_refuses(entries):
    """A bound that refuses nothing in any guest is no bound: say any instead."""
    refusing: dict[tuple[str, str], bool] = {}
    for entry in entries:
        valid = valid_values(entry)
        for keys, f in fields(entry.vmsd):
            key = (entry.vmsd.name, ".".join(keys))
            if not f.bound.any:
                refusing.setdefault(key, False)
        for case in cases(entry, valid):
            key = (entry.vmsd.name, case.path.split("[")[0])
            if case.refused and "count > max" not in case.what:
                refusing[key] = True
    assert all(refusing.values()), [k for k, v in refusing.items() if not v]


def test_a_refusal_comes_before_anything_is_applied(entries):
    """A bad last field leaves even the first fields of the object as they were."""
    entry = next(e for e in entries if e.label.startswith("kvm") and e.idstr == "cpu")
    target = copy.deepcopy(entry.valid)
    target.regs.rax = 0x1234
    payload = payload_for(entry, lambda v: v.update(mp_state=99))
    original = copy.deepcopy(target)
    with pytest.raises(StateError, match="mp_state: 99 is out of bounds"):
        vmstate.load(entry.vmsd, target, payload, entry.vmsd.version_id, entry.shape)
    assert target == original


def test_the_message_names_entry_instance_field_and_value():
    from pymig.savevm import SaveStateRegistry

    entry = next(e for e in kvm_entries() if e.idstr == "cpu" and e.instance == 1)
    registry = SaveStateRegistry()
    registered = registry.register_vmstate("cpu", 1, entry.vmsd, copy.deepcopy(entry.valid))
    payload = payload_for(entry, lambda v: v["sregs"]["cs"].update(dpl=4))
    with pytest.raises(StateError) as info:
        registered.load_state(payload, entry.vmsd.version_id, entry.shape)
    assert str(info.value) == "cpu/1 field sregs.cs.dpl: 4 is out of bounds: this guest " \
                              "takes [0, 3]"
    assert (info.value.entry, info.value.field, info.value.value) == ("cpu", "sregs.cs.dpl", 4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_scalar_value_is_refused_exactly_when_out_of_bounds(entries, data):
    """Hypothesis: any value of its type in a random scalar field of a random entry."""
    entry = data.draw(st.sampled_from(entries))
    scalars = [(keys, f) for keys, f in fields(entry.vmsd) if f.kind == "scalar"]
    keys, f = data.draw(st.sampled_from(scalars))
    value = data.draw(st.integers(f.elem.lo, f.elem.hi))
    lo, hi = (f.elem.lo, f.elem.hi) if f.bound.any else f.bound.limits(f.elem, entry.shape)

    def change(values):
        for key in keys[:-1]:
            values = values[key]
        values[keys[-1]] = value

    try:
        load(entry, payload_for(entry, change))
        refused = None
    except StateError as exc:
        refused = exc
    if not lo <= value <= hi:
        assert refused is not None and refused.field == ".".join(keys), (str(entry), keys, value)
        assert str(value) in str(refused)
    elif refused is not None:  # in range: only a rule over other fields may refuse it
        assert f.bound.check is not None, (str(entry), keys, value, str(refused))


# --- the guest configuration ------------------------------------------------------------------

CONFIG = GuestConfig("simulated", 64 << 20, vcpus=2, workload="selfcheck",
                     params={"working_set_bytes": 1 << 20}).to_dict()
WRONG_TYPE = {int: "12", str: 12, dict: ["x"], list: {"x": 1}}
BAD_VALUE = {"kind": "xen", "workload": "nope", "params": {"working_set_bytes": [[1]]},
             "blocks": [{"name": "", "size_bytes": 1, "guest_phys_addr": 3}],
             "disks": [{"path": "d.img", "size_bytes": 1000, "readonly": 0, "shared": True}]}


def config_stream(config) -> bytes:
    channel = BytesChannel()
    writer = stream.StreamWriter(channel)
    writer.write_header()
    writer.full(CONFIG_SECTION_ID, CONFIG_IDSTR, 0, CONFIG_VERSION, json.dumps(config).encode())
    writer.eof()
    return channel.getvalue()


def config_cases():
    for f in CONFIG_FIELDS:
        bad = [("wrong type", WRONG_TYPE[f.type]), ("bool", True)]
        if f.lo is not None:
            bad.append(("min-1", f.lo - 1))
        if f.hi is not None:
            bad += [("max+1", f.hi + 1), ("huge", 10**30)]
        if f.name in BAD_VALUE:
            bad.append(("refused by its rule", BAD_VALUE[f.name]))
        for what, value in bad:
            yield pytest.param(f.name, value, id=f"{f.name}-{what}")


@pytest.mark.parametrize("name,value", list(config_cases()))
def test_every_configuration_key_refuses_a_value_out_of_bounds(name, value):
    config = dict(CONFIG, **{name: value})
    reader = stream.StreamReader(BytesChannel(config_stream(config)))
    reader.read_header()
    with pytest.raises(StateError) as info:
        load_config(reader)
    assert (info.value.entry, info.value.field) == (CONFIG_IDSTR, name), str(info.value)
    assert name in str(info.value)
    shown = json.dumps(value) if not isinstance(value, (str, int)) else str(value)
    assert repr(value)[:60] in str(info.value) or shown[:60] in str(info.value), str(info.value)


def test_every_configuration_key_is_walked():
    assert {f.name for f in CONFIG_FIELDS} == set(CONFIG)
    assert {p.values[0] for p in config_cases()} == set(CONFIG)


@pytest.mark.parametrize("payload", [b'"x"', b"[1, 2]", b"null", b"[" * 100_000],
                         ids=["string", "list", "null", "deep"])
def test_a_configuration_that_is_not_an_object_is_refused(payload):
    channel = BytesChannel()
    writer = stream.StreamWriter(channel)
    writer.write_header()
    writer.full(CONFIG_SECTION_ID, CONFIG_IDSTR, 0, CONFIG_VERSION, payload)
    reader = stream.StreamReader(BytesChannel(channel.getvalue()))
    reader.read_header()
    with pytest.raises((StateError, stream.StreamError), match="configuration"):
        load_config(reader)


# --- RAM's own records ---------------------------------------------------------------------------

@pytest.fixture
def ram_loader():
    from pymig.guest.simulated import SimulatedGuest
    from pymig.ram import RamLoader

    guest = SimulatedGuest.create(GuestConfig("simulated", 8 << 20, workload="idle"),
                                  incoming=True)
    try:
        yield RamLoader(guest)
    finally:
        guest.close()


def test_every_key_of_the_ram_block_list_must_be_this_guests(ram_loader):
    """START carries the source's block list; each value in it must equal the destination's,
    so each is bounded by the guest built: a value off by one, the largest u64, a wrong type."""
    from pymig.ram import describe_blocks

    ours = json.loads(describe_blocks(ram_loader.blocks))
    walked = 0
    for key, value in ours[0].items():
        wrong = ([value + 1, value - 1, (1 << 64) - 1, str(value)] if isinstance(value, int)
                 else [value + "x", 1, None])
        for bad in wrong:
            theirs = copy.deepcopy(ours)
            theirs[0][key] = bad
            with pytest.raises(StateError, match="RAM layout differs"):
                ram_loader.load_start(json.dumps(theirs).encode())
            walked += 1
    assert walked >= 15 and not ram_loader.started
    for payload in (b"[" * 50_000, b"x" * (1 << 20), json.dumps(ours * 2).encode()):
        with pytest.raises(StateError):
            ram_loader.load_start(payload)
    ram_loader.load_start(describe_blocks(ram_loader.blocks))
    assert ram_loader.started


def test_ram_end_carries_nothing(ram_loader):
    from pymig.ram import describe_blocks

    ram_loader.load_start(describe_blocks(ram_loader.blocks))
    with pytest.raises(StateError, match="RAM end carries 3 bytes"):
        ram_loader.load_end(b"abc")
    assert not ram_loader.ended
    ram_loader.load_end(b"")
    assert ram_loader.ended
