"""``pymig.guest.make_config``: user options to a checked GuestConfig, for both kinds of guest."""

from __future__ import annotations

import pytest

from pymig.guest import GuestConfig, make_config
from pymig.guest.base import GuestConfig as BaseGuestConfig

MiB = 1 << 20


@pytest.mark.parametrize("kind", ["kvm", "simulated"])
def test_builtin_workloads_give_the_same_config_on_both_kinds(kind):
    config = make_config(kind=kind, workload="dirtier", memory_bytes=32 * MiB, vcpus=2,
                         params={"working_set_bytes": 4 * MiB, "pattern": "hotspot"})
    assert isinstance(config, BaseGuestConfig) and GuestConfig is BaseGuestConfig
    assert (config.kind, config.workload, config.vcpus, config.memory_bytes) == \
        (kind, "dirtier", 2, 32 * MiB)
    assert config.params == {"working_set_bytes": 4 * MiB, "pattern": "hotspot"}
    assert GuestConfig.from_dict(config.to_dict()) == config
    assert make_config(kind=kind, memory_bytes=4 * MiB).workload == "idle"


@pytest.mark.parametrize("kind", ["kvm", "simulated"])
@pytest.mark.parametrize("options, message", [
    ({"workload": "dirtier", "params": {"speed": 3}}, "no parameter.*speed"),
    ({"workload": "selfcheck", "params": {"working_set_bytes": 64 * MiB}}, "do not fit"),
    ({"workload": "compute", "params": {"rounds": 0}}, "rounds"),
    ({"workload": "spin"}, "unknown workload 'spin'"),
    ({"workload": "idle", "vcpus": 9}, "1 to 8 vCPUs"),
    ({"workload": "idle", "vcpus": 0}, "at least one vCPU"),
    ({"workload": "idle", "load_address": 0x100000}, "load address"),
    ({"workload": "idle", "memory_bytes": 32 * MiB + 100}, "multiple of 4096"),
])
def test_bad_options_are_clear_value_errors(kind, options, message):
    options = {"memory_bytes": 32 * MiB, **options}
    with pytest.raises(ValueError, match=message):
        make_config(kind=kind, **options)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown guest kind 'xen'"):
        make_config(kind="xen", memory_bytes=4 * MiB)


def test_images(tmp_path):
    boot = tmp_path / "boot.img"
    boot.write_bytes(bytes(510) + b"\x55\xaa")
    flat = tmp_path / "flat.bin"
    flat.write_bytes(b"\xf4" * 100)

    config = make_config(boot_sector=boot, memory_bytes=16 * MiB)
    assert (config.kind, config.workload) == ("kvm", "image")
    assert config.params == {"image": str(boot), "kind": "bootsector"}
    config = make_config(flat=flat, memory_bytes=16 * MiB)
    assert config.params == {"image": str(flat), "kind": "flat", "load_address": 0x100000}
    config = make_config(flat64=flat, load_address=0x200000, memory_bytes=16 * MiB)
    assert config.params == {"image": str(flat), "kind": "flat64", "load_address": 0x200000}


def test_bad_images(tmp_path):
    boot = tmp_path / "boot.img"
    boot.write_bytes(bytes(511))
    flat = tmp_path / "flat.bin"
    flat.write_bytes(b"\xf4" * 100)
    with pytest.raises(ValueError, match="exactly 512 bytes, not 511"):
        make_config(boot_sector=boot, memory_bytes=16 * MiB)
    with pytest.raises(ValueError, match="only on a KVM guest"):
        make_config(kind="simulated", flat=flat, memory_bytes=16 * MiB)
    with pytest.raises(ValueError, match="only on a KVM guest"):
        make_config(kind="simulated", workload="image", memory_bytes=16 * MiB)
    with pytest.raises(ValueError, match="one image"):
        make_config(boot_sector=boot, flat=flat, memory_bytes=16 * MiB)
    with pytest.raises(ValueError, match="needs a boot sector or a flat binary"):
        make_config(workload="image", memory_bytes=16 * MiB)
    with pytest.raises(ValueError, match="not both"):
        make_config(workload="dirtier", flat=flat, memory_bytes=16 * MiB)
    with pytest.raises(ValueError, match="no workload parameters"):
        make_config(flat=flat, params={"rounds": 3}, memory_bytes=16 * MiB)
    with pytest.raises(ValueError, match="does not fit in the guest's RAM"):
        make_config(flat=flat, load_address=16 * MiB - 50, memory_bytes=16 * MiB)
    with pytest.raises(ValueError, match="4 KiB and 4 GiB"):
        make_config(flat=flat, load_address=0x800, memory_bytes=16 * MiB)
    with pytest.raises(OSError):
        make_config(flat=tmp_path / "missing.bin", memory_bytes=16 * MiB)
