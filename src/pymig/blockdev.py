"""The guest's disks as QMP shows and changes them: ``query-block``, and a disk's checkpoints
as QEMU's persistent dirty bitmaps (``block-dirty-bitmap-add`` / ``-remove``).

A checkpoint (:class:`pymig.disk.Checkpoint`) is what an incremental migration (``migrate
inc``) sends from: the chunks written since it was made.  QEMU keeps the same thing as a
persistent dirty bitmap in the qcow2 image; pymig keeps it beside the raw image, always
persistent, in :data:`~pymig.disk.DIRTY_CHUNK_BYTES` chunks, always recording.  A disk is
named as QEMU names it, by its device (``ide0-hd0``, as BLOCK_IO_ERROR says) or by its node
(``disk0``, as ``pymig incoming --disk disk0=PATH`` says).  Errors are QEMU's words where it
has them.
"""

from __future__ import annotations

import os
from typing import Any

from pymig.block import disk_id
from pymig.disk import CHECKPOINT_NAME, DIRTY_CHUNK_BYTES, DiskImage
from pymig.errors import DiskError


def device_name(unit: int) -> str:
    """QEMU's name of the disk on the primary ATA channel's ``unit`` (0 master, 1 slave)."""
    return f"ide0-hd{unit}"


def find_disk(guest, node: str) -> tuple[int, DiskImage]:
    """The unit and image of the guest's disk named ``node`` (device or node name)."""
    for unit, image in enumerate(getattr(guest, "disk_images", [])):
        if node in (device_name(unit), disk_id(unit)):
            return unit, image
    raise DiskError(f"Cannot find device='{node}' nor node-name='{node}'")


def dirty_bitmaps(image: DiskImage, busy: set[str]) -> list[dict[str, Any]]:
    """QEMU's BlockDirtyInfo for each checkpoint of ``image`` (``busy``: the names an
    incremental migration is sending from now)."""
    return [{"name": name, "count": checkpoint.written_bytes(),
             "granularity": checkpoint.chunk_bytes, "recording": True,
             "busy": name in busy, "persistent": True}
            for name, checkpoint in sorted(image.checkpoints.items())]


def query_block(guest, busy: dict[int, set[str]]) -> list[dict[str, Any]]:
    """QEMU's BlockInfo for each disk of ``guest``; ``busy``: per unit, the checkpoints a
    migration is using."""
    disks = getattr(guest, "disk_images", [])
    config = getattr(guest, "config", None)
    specs = list(getattr(config, "disks", []))
    answer = []
    for unit, image in enumerate(disks):
        try:
            actual = os.fstat(image.fd).st_blocks * 512
        except OSError:
            actual = 0
        shared = bool(specs[unit].shared) if unit < len(specs) else False
        answer.append({
            "device": device_name(unit), "qdev": device_name(unit), "type": "unknown",
            "removable": False, "locked": False, "io-status": "ok",
            "inserted": {
                "file": image.path, "node-name": disk_id(unit), "ro": image.readonly,
                "drv": "raw", "encrypted": False, "detect_zeroes": "off",
                "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                "write_threshold": 0, "cache": {"writeback": True, "direct": False,
                                                "no-flush": False},
                "image": {"filename": image.path, "format": "raw",
                          "virtual-size": image.size_bytes, "actual-size": actual,
                          "dirty-flag": False},
                "dirty-bitmaps": dirty_bitmaps(image, busy.get(unit, set())),
                # pymig's: whether the destination opens the same file (no block migration)
                "x-shared": shared,
            },
        })
    return answer


def add_bitmap(guest, node: str, name: str, *, granularity: int | None = None,
               persistent: bool | None = None, disabled: bool | None = None) -> None:
    """``block-dirty-bitmap-add``: make checkpoint ``name`` of disk ``node``, recording from
    now on.  Only what pymig keeps is accepted: persistent, enabled, in its chunk size."""
    _, image = find_disk(guest, node)
    if not isinstance(name, str) or not name:
        raise DiskError("Bitmap name cannot be empty")
    if not CHECKPOINT_NAME.match(name):
        raise DiskError(f"Bitmap name {name!r} is not a checkpoint name: 1 to 64 letters, "
                        f"digits, '.', '_' or '-'")
    if granularity is not None:
        if granularity < 512 or granularity & (granularity - 1):
            raise DiskError("Granularity must be power of 2 and at least 512")
        if granularity != DIRTY_CHUNK_BYTES:
            raise DiskError(f"Granularity {granularity} is not supported: a checkpoint keeps "
                            f"its map in {DIRTY_CHUNK_BYTES}-byte chunks")
    if not persistent:
        raise DiskError("pymig keeps a checkpoint beside its image, for incremental "
                        "migrations after this process ends: give persistent: true")
    if disabled:
        raise DiskError("a disabled bitmap records nothing; pymig's checkpoints always "
                        "record (leave disabled out or false)")
    if image.readonly:
        raise DiskError(f"Cannot add a persistent bitmap to the read-only disk {node} "
                        f"({image.path})")
    if name in image.checkpoints:
        raise DiskError(f"Bitmap already exists: {name}")
    image.add_checkpoint(name)


def remove_bitmap(guest, node: str, name: str, busy: dict[int, set[str]]) -> None:
    """``block-dirty-bitmap-remove``: forget checkpoint ``name`` of disk ``node`` and delete
    its files; refused while a migration sends from it."""
    unit, image = find_disk(guest, node)
    if name not in image.checkpoints:
        raise DiskError(f"Dirty bitmap '{name}' not found")
    if name in busy.get(unit, set()):
        raise DiskError(f"Bitmap '{name}' is currently in use by another operation and cannot "
                        f"be used")
    image.remove_checkpoint(name)
