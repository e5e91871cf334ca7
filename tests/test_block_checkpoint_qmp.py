"""A disk's checkpoint made and removed over QMP, with QEMU's own client library (``qemu.qmp``)
and QEMU's commands for a persistent dirty bitmap: ``block-dirty-bitmap-add`` makes the
checkpoint an incremental migration (``migrate inc``) sends from, ``query-block`` shows it
under the disk's ``inserted.dirty-bitmaps`` with what was written since, and
``block-dirty-bitmap-remove`` deletes it, after which ``migrate inc`` is refused."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient

from _ata_helpers import make_image
from _control_helpers import WAIT_S, Served, serve_guest
from _migration_helpers import wait_for
from pymig.disk import DIRTY_CHUNK_BYTES, checkpoint_files, checkpoint_names
from pymig.guest import create, make_config
from pymig.session import Session

MiB = 1 << 20
KiB = 1 << 10
DISK_BYTES = 64 * MiB
FILLED_AT = 40 * MiB  # data the guest never writes: an incremental migration leaves it
FILLED_BYTES = 8 * MiB


async def connect(path: str) -> QMPClient:
    client = QMPClient("pymig")
    await client.connect(path)
    return client


async def refused(client: QMPClient, command: str, arguments: dict) -> str:
    with pytest.raises(ExecuteError) as caught:
        await client.execute(command, arguments)
    assert caught.value.error_class == "GenericError", caught.value
    return caught.value.error.error.desc


async def bitmaps(client: QMPClient) -> dict[str, dict]:
    (disk,) = await client.execute("query-block")
    assert disk["device"] == "ide0-hd0" and disk["inserted"]["node-name"] == "disk0"
    return {b["name"]: b for b in disk["inserted"]["dirty-bitmaps"]}


async def until_migrated(client: QMPClient) -> dict:
    deadline = time.monotonic() + WAIT_S
    while True:
        info = await client.execute("query-migrate")
        if info["status"] in ("completed", "failed", "cancelled"):
            return info
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.05)


async def checkpoint_over_qmp(path: str, image: str, tmp_path) -> None:
    client = await connect(path)
    try:
        (disk,) = await client.execute("query-block")
        inserted = disk["inserted"]
        assert inserted["file"] == image and inserted["ro"] is False
        assert inserted["image"]["virtual-size"] == DISK_BYTES
        assert inserted["dirty-bitmaps"] == []

        for arguments, words in [
            ({"node": "ide0-hd1", "name": "base", "persistent": True},
             "Cannot find device='ide0-hd1' nor node-name='ide0-hd1'"),
            ({"node": "disk0", "name": "base"}, "give persistent: true"),
            ({"node": "disk0", "name": "base", "persistent": True, "granularity": 4096},
             f"a checkpoint keeps its map in {DIRTY_CHUNK_BYTES}-byte chunks"),
            ({"node": "disk0", "name": "base", "persistent": True, "granularity": 3000},
             "Granularity must be power of 2 and at least 512"),
            ({"node": "disk0", "name": "base", "persistent": True, "disabled": True},
             "always record"),
            ({"node": "disk0", "name": "no/slash", "persistent": True},
             "is not a checkpoint name"),
        ]:
            assert words in await refused(client, "block-dirty-bitmap-add", arguments)
        assert checkpoint_names(image) == []  # nothing was made by a refused command

        # by the device's name, as QEMU's scripts give it
        assert await client.execute("block-dirty-bitmap-add", {
            "node": "ide0-hd0", "name": "base", "persistent": True}) == {}
        assert os.path.exists(checkpoint_files(image, "base")[0])
        assert checkpoint_names(image) == ["base"]  # what a later `pymig run --disk` opens
        assert "Bitmap already exists: base" in await refused(
            client, "block-dirty-bitmap-add",
            {"node": "disk0", "name": "base", "persistent": True})
        base = (await bitmaps(client))["base"]
        assert base["persistent"] is True and base["recording"] is True
        assert base["busy"] is False and base["granularity"] == DIRTY_CHUNK_BYTES

        # diskcheck writes its working set again and again: the map records it
        deadline = time.monotonic() + WAIT_S
        while (await bitmaps(client))["base"]["count"] == 0:
            assert time.monotonic() < deadline, "the guest's writes never reached the map"
            await asyncio.sleep(0.05)
        count = (await bitmaps(client))["base"]["count"]
        assert count % DIRTY_CHUNK_BYTES == 0 and count < FILLED_AT

        # migrate inc sends from it: what the guest wrote, never the 8 MiB it did not touch
        snapshot = str(tmp_path / "inc.pymig")
        assert await client.execute("migrate", {"uri": f"file:{snapshot}", "inc": True,
                                                "resume": True}) == {}
        info = await until_migrated(client)
        assert info["status"] == "completed", info
        assert 0 < info["disk"]["transferred"] < 2 * MiB, info["disk"]

        assert await client.execute("block-dirty-bitmap-remove",
                                    {"node": "disk0", "name": "base"}) == {}
        assert checkpoint_names(image) == []
        assert not any(os.path.exists(p) for p in checkpoint_files(image, "base"))
        assert await bitmaps(client) == {}
        assert "Dirty bitmap 'base' not found" in await refused(
            client, "block-dirty-bitmap-remove", {"node": "disk0", "name": "base"})
        assert "has no checkpoint" in await refused(
            client, "migrate", {"uri": f"file:{tmp_path / 'again.pymig'}", "inc": True})
        assert (await client.execute("query-status"))["status"] == "running"
    finally:
        await client.disconnect()


@pytest.mark.kvm
@pytest.mark.timeout(300)
def test_a_checkpoint_made_over_qmp_is_what_migrate_inc_sends_from(tmp_path):
    image = make_image(tmp_path / "disk.img", DISK_BYTES)
    with open(image, "r+b") as f:
        f.seek(FILLED_AT)
        f.write(os.urandom(FILLED_BYTES))
    config = make_config(memory_bytes=32 * MiB, workload="diskcheck",
                         params={"disk_working_set_bytes": 256 * KiB}, disks=[str(image)])
    guest = create(config)
    guest.start()
    wait_for(lambda: guest.progress()["passes"] >= 1, timeout=120, what="a diskcheck pass")
    served = Served(Session(guest), str(tmp_path / "ctl.sock"))
    try:
        asyncio.run(checkpoint_over_qmp(served.path, str(image), tmp_path))
        assert guest.progress()["errors"] == 0
    finally:
        served.close()


async def no_disk(path: str) -> None:
    client = await connect(path)
    try:
        assert await client.execute("query-block") == []
        assert "Cannot find device='disk0' nor node-name='disk0'" in await refused(
            client, "block-dirty-bitmap-add",
            {"node": "disk0", "name": "base", "persistent": True})
        assert "Cannot find device='ide0-hd0'" in await refused(
            client, "block-dirty-bitmap-remove", {"node": "ide0-hd0", "name": "base"})
    finally:
        await client.disconnect()


def test_a_guest_without_a_disk_has_no_block_device_to_checkpoint(tmp_path):
    served = serve_guest(tmp_path, working_set=8 * MiB)
    try:
        asyncio.run(no_disk(served.path))
    finally:
        served.close()
