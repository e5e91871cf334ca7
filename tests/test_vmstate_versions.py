"""Version gating, subsections, and what a description refuses to be built from."""

from __future__ import annotations

import pytest

from _vmstate_helpers import CPU_VMSD, PAT_VMSD, XCR_VMSD, Cpu, cpu_vmsd, sample_cpu
from pymig.errors import StateError
from pymig.vmstate import Field, VMStateDescription, decode, load, save

OLD_CPU_VMSD = cpu_vmsd(version_id=1)


def test_old_stream_loads_into_new_description_with_the_gated_field_left_default():
    cpu = sample_cpu()
    data = save(OLD_CPU_VMSD, cpu)  # an older build: version 1, no "halted"
    target = Cpu(halted=True)
    load(CPU_VMSD, target, data, 1)
    assert target.halted is True  # untouched default: version 1 streams do not carry it
    assert target.rax == cpu.rax and target.msrs == cpu.msrs
    assert "halted" not in decode(CPU_VMSD, data, 1)


def test_post_load_sees_the_stream_version_and_can_fix_up_old_streams():
    def fix_up(cpu, version_id):
        if version_id < 2:
            cpu.halted = False  # version 1 builds never migrated halted vCPUs

    vmsd = cpu_vmsd(post_load=fix_up)
    target = Cpu(halted=True)
    load(vmsd, target, save(OLD_CPU_VMSD, sample_cpu()), 1)
    assert target.halted is False


def test_new_stream_into_old_description_fails_naming_entry_and_versions():
    data = save(CPU_VMSD, sample_cpu())
    target = Cpu()
    with pytest.raises(StateError) as err:
        load(OLD_CPU_VMSD, target, data, 2)
    assert err.value.entry == "cpu"
    assert err.value.versions == (2, 1, 1)
    assert "version 2" in str(err.value) and "newer" in str(err.value)
    assert target == Cpu()


def test_stream_below_minimum_version_is_refused():
    vmsd = VMStateDescription("dev", 5, 3, [Field.u8("a")])
    with pytest.raises(StateError) as err:
        load(vmsd, {}, b"\x01\x00", 2)
    assert err.value.versions == (2, 3, 5)
    assert "dev" in str(err.value) and "oldest" in str(err.value)


def test_subsection_sent_only_when_needed():
    plain_cpu = sample_cpu()
    assert save(CPU_VMSD, plain_cpu).endswith(b"\x00")
    assert b"cpu/pat" not in save(CPU_VMSD, plain_cpu)

    odd_cpu = sample_cpu()
    odd_cpu.pat = 0x0606060606060606
    data = save(CPU_VMSD, odd_cpu)
    assert b"cpu/pat" in data and b"cpu/xcr" not in data
    target = Cpu()
    load(CPU_VMSD, target, data, 2)
    assert target.pat == 0x0606060606060606 and target.xcr0 == 1


def test_absent_subsection_leaves_the_default():
    target = Cpu(pat=0x1234)
    load(CPU_VMSD, target, save(CPU_VMSD, sample_cpu()), 2)
    assert target.pat == 0x1234


def test_unknown_subsection_is_an_error_naming_it():
    newer = cpu_vmsd(subsections=(PAT_VMSD, XCR_VMSD))
    older = cpu_vmsd(subsections=(PAT_VMSD,))
    cpu = sample_cpu()
    cpu.xcr0 = 7
    with pytest.raises(StateError) as err:
        load(older, Cpu(), save(newer, cpu), 2)
    assert "cpu/xcr" in str(err.value) and err.value.entry == "cpu"


def test_subsection_version_is_checked_against_its_own_description():
    new_sub = VMStateDescription("cpu/pat", 2, 2, [Field.u64("pat")], needed=lambda c: True)
    cpu = sample_cpu()
    data = save(cpu_vmsd(subsections=(new_sub,)), cpu)
    with pytest.raises(StateError) as err:
        load(cpu_vmsd(subsections=(PAT_VMSD,)), Cpu(), data, 2)
    assert err.value.versions == (2, 1, 1) and "cpu/pat" in str(err.value)


def test_subsection_fields_may_be_version_gated_too():
    v1 = VMStateDescription("dev/extra", 1, 1, [Field.u8("x")])
    v2 = VMStateDescription("dev/extra", 2, 1, [Field.u8("x"), Field.u8("y", version_id=2)])
    old = VMStateDescription("dev", 1, 1, [Field.u8("a")], subsections=[v1])
    new = VMStateDescription("dev", 1, 1, [Field.u8("a")], subsections=[v2])
    target = {"y": 9}
    load(new, target, save(old, {"a": 1, "x": 2}), 1)
    assert target == {"a": 1, "x": 2, "y": 9}


@pytest.mark.parametrize("build, message", [
    (lambda: VMStateDescription("d", 1, 2, []), "minimum_version_id"),
    (lambda: VMStateDescription("d", 1, 1, [Field.u8("a", version_id=2)]), "version_id 2"),
    (lambda: VMStateDescription("d", 1, 1, [Field.u8("a"), Field.u8("a")]), "twice"),
    (lambda: VMStateDescription("d", 1, 1, [Field.varray("v", "u8", count="n"), Field.u8("n")]),
     "earlier field"),
    (lambda: VMStateDescription("d", 1, 1, [Field.bool("n"), Field.buffer("b", "n")]),
     "integer"),
    (lambda: VMStateDescription("d", 2, 1, [Field.u8("n", version_id=2),
                                            Field.buffer("b", "n")]), "newer"),
    (lambda: VMStateDescription("", 1, 1, []), "name"),
    (lambda: VMStateDescription("x" * 256, 1, 1, []), "name"),
    (lambda: VMStateDescription("d", 1, 1, [], subsections=[PAT_VMSD, PAT_VMSD]), "unique"),
    (lambda: Field.array("a", "u128", 2), "element"),
    (lambda: Field.array("a", "u8", "n"), "varray"),
    (lambda: Field.scalar("a", "f32"), "f32"),
])
def test_descriptions_that_cannot_work_are_refused_when_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()
