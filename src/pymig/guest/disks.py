"""A guest's disk images, opened as its configuration names them: by a source, or by a
destination that writes a disk travelling with the guest into the target its operator named.
Either kind of guest opens its disks here (the KVM guest's ATA channel drives them; nothing in
the simulated guest does, so only what the host writes through them changes them)."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from pymig.block import DiskTarget, disk_id, open_target
from pymig.disk import DiskImage
from pymig.errors import DiskError
from pymig.guest.base import GuestConfig


def open_disks(config: GuestConfig, incoming: bool, allowed: Sequence[str] | None = None,
               targets: Sequence[DiskTarget] = (), target_dir: str | None = None
               ) -> list[DiskImage]:
    """The images of ``config``'s disks, each the size the configuration says.

    A destination's configuration comes from the stream, which may say anything: it opens
    only shared images among ``allowed``, the images its operator named, and writes a disk
    that travels with the guest only into the target its operator named for it
    (``targets``) or into ``target_dir`` under the image's own file name (one name, never
    ``.`` or ``..``), so a stream cannot make it open, and its guest write, any file it
    likes."""
    permitted = {os.path.realpath(p) for p in allowed or ()}
    by_unit = {t.unit: t for t in targets}
    images: list[DiskImage] = []
    try:
        for unit, disk in enumerate(config.disks):
            if incoming and not disk.shared:
                target = by_unit.get(unit)
                if target is None and target_dir is not None:
                    target = _target_in(target_dir, unit, disk.path)
                if target is None:
                    raise DiskError(f"disk {unit} ({disk.path}) travels with the guest (block "
                                    f"migration): name where it goes, pymig incoming --disk "
                                    f"{disk_id(unit)}=PATH")
                images.append(open_target(target, disk.size_bytes, disk.path))
                continue
            if incoming and os.path.realpath(disk.path) not in permitted:
                raise DiskError(f"disk {unit} of the incoming guest is {disk.path} on shared "
                                f"storage; this destination opens only the images it is given "
                                f"(pymig incoming --disk {disk.path})")
            image = DiskImage(disk.path, readonly=disk.readonly)
            images.append(image)
            if image.size_bytes != disk.size_bytes:
                raise DiskError(f"disk {unit} ({disk.path}) is {image.size_bytes} bytes, the "
                                f"guest's configuration says {disk.size_bytes}")
    except BaseException:
        for image in images:
            image.close()
        raise
    return images


def _target_in(directory: str, unit: int, source_path: str) -> DiskTarget:
    """Disk ``unit``'s target in ``directory``: the source image's file name there (the
    stream's path, so no more than one plain name of it)."""
    name = os.path.basename(source_path)
    if name in ("", ".", ".."):
        raise DiskError(f"disk {unit} ({source_path}) has no file name to take in "
                        f"{directory}; name its target: --disk {disk_id(unit)}=PATH")
    return DiskTarget(unit, os.path.join(os.path.abspath(directory), name))


def with_targets(config: GuestConfig, disks: Sequence[DiskImage]) -> GuestConfig:
    """``config`` naming, for each disk that travelled with the guest, the target it was
    written into (what the guest runs on here)."""
    if not any(not d.shared for d in config.disks):
        return config
    return dataclasses.replace(config, disks=[
        d if d.shared else dataclasses.replace(d, path=image.path)
        for d, image in zip(config.disks, disks)])
