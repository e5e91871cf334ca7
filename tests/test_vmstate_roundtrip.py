"""Round trips through save/load/decode, and the exact wire layout."""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _vmstate_helpers import CPU_VMSD, SEGMENT_VMSD, Cpu, Msr, Segment, plain, sample_cpu
from pymig.errors import StateError
from pymig.vmstate import SCALARS, Field, VMStateDescription, decode, load, save

INT_TYPES = [name for name in SCALARS if name != "bool"]
ALL_SCALARS = VMStateDescription("scalars", 1, 1, [Field.scalar(t, t) for t in SCALARS])


def scalar_values(type_name: str) -> st.SearchStrategy:
    t = SCALARS[type_name]
    if t.is_bool:
        return st.booleans()
    return st.integers(t.lo, t.hi) | st.sampled_from([t.lo, t.hi, 0, t.lo + 1, t.hi - 1])


@given(st.fixed_dictionaries({t: scalar_values(t) for t in SCALARS}))
def test_every_scalar_width_round_trips(values):
    data = save(ALL_SCALARS, values)
    assert len(data) == sum(SCALARS[t].size for t in SCALARS) + 1
    loaded: dict = {}
    load(ALL_SCALARS, loaded, data, 1)
    assert loaded == values
    assert decode(ALL_SCALARS, data, 1) == values


@pytest.mark.parametrize("type_name", INT_TYPES)
def test_extremes_round_trip_and_one_past_is_refused(type_name):
    t = SCALARS[type_name]
    vmsd = VMStateDescription("one", 1, 1, [Field.scalar("v", type_name)])
    for value in (t.lo, t.hi):
        assert decode(vmsd, save(vmsd, {"v": value}), 1) == {"v": value}
    for value in (t.lo - 1, t.hi + 1):
        with pytest.raises(StateError) as err:
            save(vmsd, {"v": value})
        assert err.value.entry == "one" and err.value.field == "v"
        assert type_name in str(err.value)


cpus = st.builds(
    Cpu,
    rax=st.integers(0, 2**64 - 1),
    rflags=st.integers(0, 2**64 - 1),
    cs=st.builds(Segment, base=st.integers(0, 2**64 - 1), limit=st.integers(0, 2**32 - 1),
                 selector=st.integers(0, 2**16 - 1), present=st.booleans()),
    dr=st.lists(st.integers(0, 2**64 - 1), min_size=4, max_size=4),
    lapic=st.binary(min_size=32, max_size=32),
    note=st.binary(max_size=100),
    halted=st.booleans(),
    pat=st.integers(0, 2**64 - 1),
    xcr0=st.integers(0, 2**64 - 1),
)
msrs_ = st.builds(Msr, index=st.integers(0, 2**32 - 1), value=st.integers(0, 2**64 - 1))
msr_lists = st.lists(msrs_, max_size=64)


@given(cpus, msr_lists)
def test_cpu_round_trips_and_decode_equals_what_load_sets(cpu, msrs):
    cpu = replace(cpu, msrs=msrs, nmsrs=len(msrs))
    data = save(CPU_VMSD, cpu)
    loaded = Cpu()
    load(CPU_VMSD, loaded, data, CPU_VMSD.version_id)
    assert loaded == cpu
    decoded, everything = decode(CPU_VMSD, data, CPU_VMSD.version_id), plain(loaded)
    assert decoded == {name: everything[name] for name in decoded}
    not_sent = {f.name for sub in CPU_VMSD.subsections if not sub.needed(cpu) for f in sub.fields}
    assert set(everything) - set(decoded) == not_sent
    as_dict: dict = {}
    load(CPU_VMSD, as_dict, data, CPU_VMSD.version_id)
    assert plain(as_dict) == decode(CPU_VMSD, data, CPU_VMSD.version_id)


def test_nested_objects_are_filled_in_place_or_built_by_the_factory():
    cpu = sample_cpu()
    data = save(CPU_VMSD, cpu)
    target = Cpu()
    cs_before = target.cs
    load(CPU_VMSD, target, data, 2)
    assert target.cs is cs_before and target.cs == cpu.cs
    assert all(type(m) is Msr for m in target.msrs)

    target.cs = None
    load(CPU_VMSD, target, data, 2)
    assert isinstance(target.cs, Segment) and target.cs == cpu.cs


def test_nested_description_without_factory_builds_dicts():
    inner = VMStateDescription("inner", 1, 1, [Field.u8("x")])
    outer = VMStateDescription("outer", 1, 1, [Field.struct("a", inner),
                                               Field.array("b", inner, 2)])

    @dataclass
    class Outer:
        a: object = None
        b: object = None

    obj = Outer()
    load(outer, obj, save(outer, {"a": {"x": 1}, "b": [{"x": 2}, {"x": 3}]}), 1)
    assert obj.a == {"x": 1} and obj.b == [{"x": 2}, {"x": 3}]


def test_wire_layout_is_the_documented_one():
    sub = VMStateDescription("s/x", 3, 1, [Field.u16("extra")], needed=lambda o: True)
    vmsd = VMStateDescription(
        "dev", 1, 1,
        [Field.u8("a"), Field.i16("b"), Field.u8("n"), Field.varray("arr", "u32", count="n"),
         Field.varray("pre", "u8"), Field.buffer("buf", 2), Field.struct("seg", SEGMENT_VMSD)],
        subsections=[sub],
    )
    obj = {"a": 1, "b": -2, "n": 2, "arr": [3, 4], "pre": [5], "buf": b"\xaa\xbb",
           "seg": {"base": 6, "limit": 7, "selector": 8, "present": True}, "extra": 0x1234}
    expected = (
        b"\x01" + struct.pack("<h", -2) + b"\x02" + struct.pack("<II", 3, 4)
        + struct.pack("<I", 1) + b"\x05" + b"\xaa\xbb"
        + struct.pack("<QIH?", 6, 7, 8, True) + b"\x00"              # nested struct + its end
        + b"\x05" + bytes([3]) + b"s/x" + struct.pack("<II", 3, 3)  # subsection header
        + struct.pack("<H", 0x1234) + b"\x00"                      # subsection body
        + b"\x00"                                                  # end of the entry
    )
    assert save(vmsd, obj) == expected
    assert decode(vmsd, expected, 1) == obj


def test_hooks_run_in_order_with_the_loaded_version():
    calls = []
    inner = VMStateDescription("inner", 1, 1, [Field.u8("x")],
                               pre_save=lambda o: calls.append(("pre", "inner")),
                               post_load=lambda o, v: calls.append(("post", "inner", v)))

    def outer_pre_save(obj):
        calls.append(("pre", "outer"))
        obj["y"] = 42  # pre_save may compute a field from others

    outer = VMStateDescription("outer", 3, 1, [Field.u8("y"), Field.struct("s", inner)],
                               pre_save=outer_pre_save,
                               post_load=lambda o, v: calls.append(("post", "outer", v)))
    data = save(outer, {"y": 0, "s": {"x": 1}})
    assert calls == [("pre", "outer"), ("pre", "inner")]
    calls.clear()
    target: dict = {}
    load(outer, target, data, 3)
    assert target == {"y": 42, "s": {"x": 1}}
    assert calls == [("post", "inner", 1), ("post", "outer", 3)]
    assert decode(outer, data, 3) == target and len(calls) == 2  # decode runs no hooks


def test_scalar_arrays_of_bools_and_signed_values():
    vmsd = VMStateDescription("arr", 1, 1, [Field.array("flags", "bool", 3),
                                            Field.varray("deltas", "i64", max_count=4)])
    obj = {"flags": [True, False, True], "deltas": [-(2**63), 2**63 - 1, -1]}
    assert decode(vmsd, save(vmsd, obj), 1) == obj
