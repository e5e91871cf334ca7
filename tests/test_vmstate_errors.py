"""Malformed streams and objects: every one is a StateError naming the entry and the field,
raised before anything large is allocated and before the target object changes."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _vmstate_helpers import CPU_VMSD, Cpu, sample_cpu
from pymig.errors import StateError
from pymig.vmstate import Field, VMStateDescription, decode, load, save

SAMPLE = sample_cpu()
SAMPLE.pat = 5  # so that the stream carries a subsection as well
DATA = save(CPU_VMSD, SAMPLE)


def load_error(vmsd, data, version_id=None) -> StateError:
    target = Cpu() if vmsd is CPU_VMSD else {}
    before = repr(target)
    with pytest.raises(StateError) as err:
        load(vmsd, target, data, vmsd.version_id if version_id is None else version_id)
    assert repr(target) == before, "a failed load must leave the object untouched"
    with pytest.raises(StateError):
        decode(vmsd, data, vmsd.version_id if version_id is None else version_id)
    return err.value


@pytest.mark.parametrize("cut", range(len(DATA)))
def test_every_truncation_is_refused(cut):
    err = load_error(CPU_VMSD, DATA[:cut])
    assert err.entry == "cpu"
    assert "truncated" in str(err) or "left" in str(err)


def test_trailing_garbage_is_refused():
    err = load_error(CPU_VMSD, DATA + b"\x00")
    assert "trailing" in str(err) and err.entry == "cpu"


def test_count_field_above_its_maximum_is_refused_naming_the_field():
    vmsd = VMStateDescription("dev", 1, 1, [Field.u32("n"), Field.varray("v", "u64", count="n",
                                                                           max_count=8)])
    err = load_error(vmsd, struct.pack("<I", 9) + bytes(9 * 8) + b"\x00")
    assert err.field == "v" and "maximum 8" in str(err)


def test_prefixed_count_is_bounded_before_allocation():
    vmsd = VMStateDescription("dev", 1, 1, [Field.varray("v", "u64")])
    err = load_error(vmsd, struct.pack("<I", 0xFFFFFFFF))
    assert err.field == "v" and "maximum" in str(err)
    vmsd = VMStateDescription("dev", 1, 1, [Field.buffer("b")])
    err = load_error(vmsd, struct.pack("<I", 0xFFFFFFFF))
    assert err.field == "b" and "maximum" in str(err)


def test_size_field_beyond_the_remaining_bytes_is_refused():
    vmsd = VMStateDescription("dev", 1, 1, [Field.u16("len"), Field.buffer("b", "len")])
    err = load_error(vmsd, struct.pack("<H", 1000) + b"abc\x00")
    assert err.field == "b" and "1000" in str(err)
    structs = VMStateDescription("dev", 1, 1, [Field.u16("n"),
                                               Field.varray("v", CPU_VMSD, count="n")])
    err = load_error(structs, struct.pack("<H", 1000) + bytes(40))
    assert err.field == "v" and "left" in str(err)


def test_negative_signed_count_is_refused():
    vmsd = VMStateDescription("dev", 1, 1, [Field.i8("n"), Field.varray("v", "u8", count="n")])
    err = load_error(vmsd, b"\xff\x00")
    assert err.field == "v" and "negative" in str(err)


def test_bool_other_than_zero_or_one_is_refused():
    vmsd = VMStateDescription("dev", 1, 1, [Field.bool("on"), Field.array("bits", "bool", 2)])
    assert load_error(vmsd, b"\x02\x00\x00\x00").field == "on"
    assert load_error(vmsd, b"\x01\x00\x07\x00").field == "bits[1]"


def test_bad_marker_where_subsections_start():
    vmsd = VMStateDescription("dev", 1, 1, [Field.u8("a")])
    err = load_error(vmsd, b"\x01\x07")
    assert "0x07" in str(err) and err.entry == "dev"


def test_nested_errors_name_the_path():
    inner = VMStateDescription("inner", 1, 1, [Field.bool("flag")])
    vmsd = VMStateDescription("dev", 1, 1, [Field.array("items", inner, 2)])
    err = load_error(vmsd, b"\x01\x00\x05\x00\x00")
    assert err.field == "items[1].flag" and err.entry == "dev"


def subsection(name: bytes, version: int, body: bytes, nbytes: int | None = None) -> bytes:
    size = len(body) if nbytes is None else nbytes
    return b"\x05" + bytes([len(name)]) + name + struct.pack("<II", version, size) + body


WITH_SUB = VMStateDescription("dev", 1, 1, [Field.u8("a")], subsections=[
    VMStateDescription("dev/s", 1, 1, [Field.u8("b")])])


def test_subsection_longer_than_the_data_is_refused():
    err = load_error(WITH_SUB, b"\x01" + subsection(b"dev/s", 1, b"\x02\x00", nbytes=50) + b"\x00")
    assert "50" in str(err) and err.field == "dev/s"


def test_subsection_with_data_left_over_is_refused():
    err = load_error(WITH_SUB, b"\x01" + subsection(b"dev/s", 1, b"\x02\x00\x09") + b"\x00")
    assert "trailing" in str(err) and err.field == "dev/s"


def test_subsection_twice_is_refused():
    once = subsection(b"dev/s", 1, b"\x02\x00")
    err = load_error(WITH_SUB, b"\x01" + once + once + b"\x00")
    assert "twice" in str(err)


def test_unknown_subsection_name_is_named_even_if_not_utf8():
    err = load_error(WITH_SUB, b"\x01" + subsection(b"\xffgpu", 1, b"\x00") + b"\x00")
    assert "gpu" in str(err) and "dev/s" in str(err)


@dataclass
class Frozen:
    __slots__ = ("a",)
    a: int


@pytest.mark.parametrize("obj, message, field", [
    ({}, "no value", "a"),
    ({"a": "x"}, "integer", "a"),
    ({"a": 1.5}, "integer", "a"),
])
def test_unsaveable_scalars(obj, message, field):
    vmsd = VMStateDescription("dev", 1, 1, [Field.u8("a")])
    with pytest.raises(StateError, match=message) as err:
        save(vmsd, obj)
    assert err.value.field == field and err.value.entry == "dev"


def test_unsaveable_sequences():
    vmsd = VMStateDescription("dev", 1, 1, [
        Field.u8("n"), Field.varray("v", "u8", count="n"), Field.buffer("fixed", 4),
        Field.varray("pre", "u8", max_count=2)])
    good = {"n": 1, "v": [1], "fixed": b"abcd", "pre": [1]}
    save(vmsd, good)
    cases = [({"v": [1, 2]}, "v", "size field n says 1"), ({"fixed": b"abc"}, "fixed", "fixes 4"),
             ({"fixed": "abcd"}, "fixed", "bytes"), ({"pre": [1, 2, 3]}, "pre", "maximum 2"),
             ({"v": [256]}, "v[0]", "does not fit")]
    for change, field, message in cases:
        with pytest.raises(StateError, match=message) as err:
            save(vmsd, {**good, **change})
        assert err.value.field == field


def test_hook_failures_become_state_errors_naming_the_entry():
    def boom(*args):
        raise RuntimeError("device is wedged")

    for hooks in ({"pre_save": boom}, {"needed": boom}):
        sub = VMStateDescription("dev/s", 1, 1, [], **hooks)
        vmsd = VMStateDescription("dev", 1, 1, [Field.u8("a")], subsections=[sub])
        with pytest.raises(StateError, match="device is wedged") as err:
            save(vmsd, {"a": 1})
        assert err.value.entry == "dev" and isinstance(err.value.__cause__, RuntimeError)

    vmsd = VMStateDescription("dev", 1, 1, [Field.u8("a")], post_load=boom)
    with pytest.raises(StateError, match="post_load of dev failed") as err:
        load(vmsd, {}, b"\x01\x00", 1)
    assert err.value.entry == "dev"


def test_factory_failure_and_unsettable_attribute_become_state_errors():
    def broken_factory():
        raise OSError("no memory for the nested object")

    inner = VMStateDescription("inner", 1, 1, [Field.u8("x")], factory=broken_factory)
    vmsd = VMStateDescription("dev", 1, 1, [Field.array("items", inner, 1)])
    with pytest.raises(StateError, match="factory of inner"):
        load(vmsd, {}, b"\x01\x00\x00", 1)

    vmsd = VMStateDescription("dev", 1, 1, [Field.u8("a"), Field.u8("b")])
    with pytest.raises(StateError) as err:
        load(vmsd, Frozen(1), b"\x01\x02\x00", 1)
    assert err.value.field == "b"


@given(st.data())
def test_corrupted_streams_load_or_fail_only_with_state_error(data):
    corrupt = bytearray(DATA)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupt[data.draw(st.integers(0, len(corrupt) - 1))] = data.draw(st.integers(0, 255))
    try:
        load(CPU_VMSD, Cpu(), bytes(corrupt), 2)
    except StateError as err:
        assert err.entry == "cpu"
