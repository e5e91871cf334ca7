"""A guest's configuration from a user's options (``pymig run``), and the checks a
configuration passes before any guest is built from it, on either side of a migration."""

from __future__ import annotations

import os
from typing import Any, Sequence

from pymig.disk import DiskSpec
from pymig.guest import builtin, loader, workloads
from pymig.guest.base import MAX_DISKS, DiskConfig, GuestConfig
from pymig.guest.layout import GUEST_PAGE_SIZE, MAX_VCPUS, locate

GUEST_KINDS = ("kvm", "simulated")
DEFAULT_LOAD_ADDRESS = 0x100000  # flat binaries, when the user names no address


def make_config(*, kind: str = "kvm", workload: str = "idle", params: dict[str, Any] | None = None,
                memory_bytes: int, vcpus: int = 1, boot_sector: str | os.PathLike | None = None,
                flat: str | os.PathLike | None = None, flat64: str | os.PathLike | None = None,
                load_address: int | None = None,
                disks: Sequence[str | DiskSpec] = ()) -> GuestConfig:
    """A checked :class:`GuestConfig` from a user's options (``pymig run``).

    Either a built-in workload (``workload`` and its ``params``, checked by
    :mod:`pymig.guest.workloads`) or, on KVM only, a user image: ``boot_sector`` (exactly 512
    bytes), ``flat`` (32-bit protected mode) or ``flat64`` (64-bit, CPL 3), loaded at
    ``load_address`` (flat binaries; default 1 MiB).  Anything that would not run raises
    ValueError saying why: an unknown kind, workload or parameter, a working set larger than
    RAM, an image on a simulated guest, a boot sector of another size...  The image file is
    read (its size) here, on the source; a destination never needs it.

    ``disks`` (KVM only): the ATA channel's master, then its slave, each ``PATH[,readonly]
    [,shared]`` or a :class:`~pymig.disk.DiskSpec`; each image is opened here to check it can
    be a disk and to take its size, and named by its absolute path.
    """
    disk_configs = _disk_configs(disks)
    if kind not in GUEST_KINDS:
        raise ValueError(f"unknown guest kind {kind!r} (use {' or '.join(GUEST_KINDS)})")
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0 \
            or memory_bytes % GUEST_PAGE_SIZE:
        raise ValueError(f"guest memory must be a positive multiple of {GUEST_PAGE_SIZE} bytes, "
                         f"not {memory_bytes!r}")
    images = {name: path for name, path in
              (("bootsector", boot_sector), ("flat", flat), ("flat64", flat64)) if path is not None}
    if images or workload == "image":
        return _image_config(kind, workload, params, memory_bytes, vcpus, images, load_address,
                             disk_configs)
    if load_address is not None:
        raise ValueError("a load address places a flat binary, and there is none")
    config = GuestConfig(kind=kind, memory_bytes=memory_bytes, vcpus=vcpus, workload=workload,
                         params=dict(params or {}), disks=disk_configs)
    validate_config(config)
    return config


def validate_config(config: GuestConfig) -> None:
    """Refuse, with ValueError saying why, a configuration no guest of pymig's runs, whoever
    made it: a kind other than kvm and simulated; other than 1 to :data:`MAX_VCPUS` vCPUs; a
    built-in workload whose parameters do not parse or whose structures and area do not fit
    the RAM map (on KVM also: RAM at guest-physical 0, the control MMIO page outside it); a
    user image on a simulated guest, or with parameters an image does not take.

    It reads no file and touches nothing of the host (a user image is the source's; a
    destination never needs it), so a destination runs it on a stream's configuration before
    it maps any RAM or creates a VM.
    """
    if config.kind not in GUEST_KINDS:
        raise ValueError(f"unknown guest kind {config.kind!r} (use {' or '.join(GUEST_KINDS)})")
    if not 1 <= config.vcpus <= MAX_VCPUS:
        raise ValueError(f"a guest runs on 1 to {MAX_VCPUS} vCPUs, not {config.vcpus}")
    if config.workload == "image":
        if config.kind != "kvm":
            raise ValueError("a user image runs only on a KVM guest, not on a simulated one")
        loader.check_image_params(config.params)
    elif config.kind == "kvm":
        builtin.check_config(config)
    else:
        if config.workload in workloads.KVM_ONLY:
            raise ValueError(f"{config.workload} drives a disk, which only a KVM guest has")
        workloads.resolve(config)


def _disk_configs(disks: Sequence[str | DiskSpec]) -> list[DiskConfig]:
    if not disks:
        return []
    if len(disks) > MAX_DISKS:
        raise ValueError(f"{len(disks)} disks: the ATA channel holds a master and a slave")
    configs = []
    for disk in disks:
        spec = disk if isinstance(disk, DiskSpec) else DiskSpec.parse(disk)
        with spec.open() as image:
            configs.append(DiskConfig(os.path.abspath(spec.path), image.size_bytes,
                                      spec.readonly, spec.shared))
    return configs


def _image_config(kind: str, workload: str, params: dict[str, Any] | None, memory_bytes: int,
                  vcpus: int, images: dict[str, Any], load_address: int | None,
                  disks: list[DiskConfig]) -> GuestConfig:
    if kind != "kvm":
        raise ValueError("a user image runs only on a KVM guest, not on a simulated one")
    if len(images) != 1:
        raise ValueError("give one image: a boot sector, a flat binary or a 64-bit flat binary"
                         if images else "workload 'image' needs a boot sector or a flat binary")
    if workload not in ("idle", "image"):
        raise ValueError(f"give a built-in workload or an image, not both (workload "
                         f"{workload!r})")
    if params:
        raise ValueError(f"an image takes no workload parameters, not {sorted(params)}")
    ((image_kind, path),) = images.items()
    if image_kind != "bootsector" and load_address is None:
        load_address = DEFAULT_LOAD_ADDRESS
    image_params: dict[str, Any] = {"image": os.fspath(path), "kind": image_kind}
    if load_address is not None:
        image_params["load_address"] = load_address
    loader.check_image_params(image_params)
    size = os.path.getsize(path)
    loader.check_image(image_kind, size, load_address)
    config = GuestConfig(kind="kvm", memory_bytes=memory_bytes, vcpus=vcpus, workload="image",
                         params=image_params, disks=disks)
    validate_config(config)
    start = loader.BOOT_SECTOR_ADDR if image_kind == "bootsector" else load_address
    try:
        locate(config.blocks, start, size)
    except ValueError:
        raise ValueError(f"the {size}-byte image at {start:#x} does not fit in the guest's RAM "
                         f"({memory_bytes} bytes)") from None
    return config
