"""Block migration's live entry without a guest: a source image's chunks through
:class:`BlockSaver` into a :class:`BlockLoader`'s target (holes not sent, zeroes as zero
records, the target as sparse as the source, writes during the copy sent again, the last ones
at completion); every field of a block record bounded against the target before any write;
the destination's target (created sparse, refused at another size or holding data unless told
to overwrite, marked incomplete until the guest runs on it, and refused by every opener
meanwhile)."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymig import stream
from pymig.block import (DISK_START, KIND_DATA, KIND_ZERO, RECORD, BlockLoader, BlockSaver,
                         DiskTarget, is_target, open_target, parse_part,
                         receive_offset)
from pymig.disk import (DIRECT_ALIGN, DiskImage, DiskSpec, buffer_address, checkpoint_files,
                        incomplete_marker)
from pymig.errors import DiskError, MigrationError, PacketError

MiB = 1 << 20
KiB = 1 << 10


class Sections:
    """What a live entry wrote, section by section (the migration's SectionOut)."""

    def __init__(self):
        self.records: list[tuple[int, bytes]] = []

    def start(self, payload) -> None:
        self.records.append((stream.RecordType.START, bytes(payload)))

    def part(self, payload, *, nocsum: bool = False, stands_for: int = 0) -> None:
        views = payload if isinstance(payload, list) else [payload]  # as StreamWriter takes
        self.records.append((stream.RecordType.PART, b"".join(bytes(v) for v in views)))

    def end(self, payload) -> None:
        self.records.append((stream.RecordType.END, bytes(payload)))

    def replay(self, loader: BlockLoader, since: int = 0) -> None:
        for kind, payload in self.records[since:]:
            {stream.RecordType.START: loader.load_start, stream.RecordType.PART:
             loader.load_part, stream.RecordType.END: loader.load_end}[kind](payload)


def sparse_image(path, size: int, pieces: dict[int, bytes] = {}) -> str:  # noqa: B006
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return str(path)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def target_for(tmp_path, size: int) -> DiskImage:
    return open_target(DiskTarget(0, str(tmp_path / "target.img")), size, "source.img")


def test_a_sparse_image_arrives_equal_and_as_sparse_with_only_its_data_sent(tmp_path):
    size = 64 * MiB
    data = os.urandom(3 * MiB + 4 * KiB)
    source = sparse_image(tmp_path / "source.img", size, {
        5 * MiB + 512: data,  # not chunk-aligned: spans five chunks
        40 * MiB: bytes(2 * MiB),  # written, but zeroes: goes as zero records
        63 * MiB: b"\xff" * 4096,  # the last chunk
    })
    with DiskImage(source) as image, target_for(tmp_path, size) as target:
        saver, out = BlockSaver(image, 0), Sections()
        saver.setup(out)
        assert saver.pending() < 10 * MiB  # only chunks that may hold data, never the holes
        while not saver.iterate(out):
            pass
        saver.complete(out)
        saver.cleanup()
        loader = BlockLoader(target, 0)
        out.replay(loader)
        assert loader.ended
        sent = sum(len(p) for k, p in out.records if k == stream.RecordType.PART)
        assert sent < len(data) + 4 * KiB + 64 * KiB  # data, one chunk's sectors, headers
        assert saver.counters.data_bytes < len(data) + 2 * 4 * KiB + 4096
        loader.finish()
    assert digest(source) == digest(tmp_path / "target.img")
    assert allocated(tmp_path / "target.img") <= allocated(source)
    assert allocated(tmp_path / "target.img") < 5 * MiB  # the zeroes did not land as data
    assert not os.path.exists(incomplete_marker(str(tmp_path / "target.img")))


def test_chunks_written_during_the_copy_go_again_and_the_last_ones_at_completion(tmp_path):
    size = 16 * MiB
    source = sparse_image(tmp_path / "source.img", size, {0: os.urandom(size)})
    with DiskImage(source) as image, target_for(tmp_path, size) as target:
        saver, out = BlockSaver(image, 0), Sections()
        saver.setup(out)
        saver._send(out, deadline=0)  # one chunk of the bulk phase
        image.pwrite(0, b"A" * 4096)  # a chunk already sent: its 64 KiB go again
        image.pwrite(9 * MiB, b"B" * 512)  # one not sent yet: goes once, with its new bytes
        assert saver.pending() == size - MiB + 64 * KiB  # the 15 still to go, and that
        while not saver.iterate(out):
            pass
        assert saver.swept and saver.pending() == 0
        image.pwrite(3 * MiB + 7 * 512, b"C" * 1024)  # after the last iteration
        image.write_zeroes(12 * MiB, MiB)  # a whole chunk punched: a zero record
        assert saver.pending() == MiB + 64 * KiB
        image.pwrite(15 * MiB, b"D" * 512)  # after the migration loop's last look
        saver.complete(out)
        assert out.records[-1] == (stream.RecordType.END, b"")
        loader = BlockLoader(target, 0)
        out.replay(loader)
        assert loader.bytes_zeroed >= MiB
    assert digest(source) == digest(tmp_path / "target.img")


def test_a_cancel_stops_the_copy_between_chunks(tmp_path):
    source = sparse_image(tmp_path / "source.img", 8 * MiB, {0: os.urandom(8 * MiB)})
    with DiskImage(source) as image:
        saver, out = BlockSaver(image, 0), Sections()
        saver.setup(out)
        saver.cancelled = lambda: True
        with pytest.raises(MigrationError, match="cancelled"):
            saver.iterate(out)
        saver.cleanup()
        assert not image.logging
    assert len(out.records) == 1  # the header alone


# --- what the destination takes from a stream ------------------------------------------------

def record(kind: int, length: int, offset: int, data: bytes = b"") -> bytes:
    return RECORD.pack(kind, length, offset) + data


@pytest.mark.parametrize("payload,reason", [
    (record(KIND_DATA, 512, 4 * MiB, b"x" * 512), "past the end of the 4194304-byte disk"),
    (record(KIND_ZERO, 1024, 4 * MiB - 512), "past the end"),
    (record(KIND_ZERO, 512, (1 << 64) - 512), "past the end"),
    (record(KIND_DATA, 100, 0, b"x" * 100), "not whole 512-byte sectors"),
    (record(KIND_ZERO, 512, 100), "not whole 512-byte sectors"),
    (record(KIND_ZERO, 0, 0), "not whole 512-byte sectors"),
    (record(KIND_DATA, 2 * MiB, 0), "more than the 1048576-byte chunk"),
    (record(KIND_ZERO, 512 * KiB, 0) + record(KIND_ZERO, 768 * KiB, MiB), "covering"),
    (record(7, 512, 0), "unknown block record kind 7"),
    (record(KIND_DATA, 4096, 0, b"x" * 100), "cut short (100 of 4096"),
    (record(KIND_ZERO, 512, 0)[:10], "header cut short"),
    (b"", "no record"),
    (b"\0" * (2 * MiB), "more than a 1048576-byte chunk makes"),
])
def test_a_malformed_block_record_is_refused_before_any_write(tmp_path, payload, reason):
    with target_for(tmp_path, 4 * MiB) as target:
        loader = BlockLoader(target, 0)
        loader.load_start(DISK_START.pack(4 * MiB, MiB, 0))
        target.pwrite(0, b"keep" * 128)
        before = digest(target.path)
        good = record(KIND_DATA, 512, 512, b"w" * 512)  # valid, ahead of the bad one
        with pytest.raises(PacketError, match=reason.replace("(", r"\(")):
            loader.load_part(good + payload if payload else payload)
        assert digest(target.path) == before


@pytest.mark.parametrize("header,reason", [
    (DISK_START.pack(8 * MiB, MiB, 0), "source's disk is 8388608 bytes, the target"),
    (DISK_START.pack(4 * MiB, 128 << 20, 0), "a chunk of 134217728 bytes"),
    (DISK_START.pack(4 * MiB, 1000, 0), "a chunk of 1000 bytes"),
    (DISK_START.pack(4 * MiB, MiB, 2), "unknown disk flags"),
    (DISK_START.pack(4 * MiB, MiB, 1), "does not hold a checkpoint's name and id"),
    (DISK_START.pack(4 * MiB, MiB, 1) + b"\x02ab" + b"z" * 32, "'zzzz.*' is not a checkpoint id"),
    (DISK_START.pack(4 * MiB, MiB, 1) + b"\x02a/" + b"0" * 32, "'a/' is not a checkpoint name"),
    (DISK_START.pack(4 * MiB, MiB, 0) + b"\0", "a disk header of 17 bytes"),
])
def test_a_disk_header_that_does_not_fit_the_target_is_refused(tmp_path, header, reason):
    with target_for(tmp_path, 4 * MiB) as target:
        loader = BlockLoader(target, 0)
        with pytest.raises(PacketError, match=reason):
            loader.load_start(header)


def test_disk_records_out_of_order_are_refused(tmp_path):
    with target_for(tmp_path, 4 * MiB) as target:
        loader = BlockLoader(target, 0)
        with pytest.raises(PacketError, match="before its header"):
            loader.load_part(record(KIND_ZERO, 512, 0))
        with pytest.raises(PacketError, match="end before its header"):
            loader.load_end(b"")
        loader.load_start(DISK_START.pack(4 * MiB, MiB, 0))
        with pytest.raises(PacketError, match="second START"):
            loader.load_start(DISK_START.pack(4 * MiB, MiB, 0))
        loader.load_end(b"")
        with pytest.raises(PacketError, match="after its end"):
            loader.load_part(record(KIND_ZERO, 512, 0))


def test_parse_part_takes_a_chunk_of_alternating_extents():
    records = parse_part(record(KIND_DATA, 512, 0, b"a" * 512) + record(KIND_ZERO, 512, 512)
                         + record(KIND_DATA, 1024, 1024, b"b" * 1024), 4 * MiB, MiB)
    assert [(k, o, n) for k, o, n, _ in records] == [(KIND_DATA, 0, 512), (KIND_ZERO, 512, 512),
                                                     (KIND_DATA, 1024, 1024)]


# --- the destination's target ----------------------------------------------------------------

def test_a_missing_target_is_created_sparse_and_marked_incomplete_until_finished(tmp_path):
    path = str(tmp_path / "new.img")
    with open_target(DiskTarget(1, path), 32 * MiB, "/src/disk.img") as image:
        assert image.size_bytes == 32 * MiB and allocated(path) == 0
        loader = BlockLoader(image, 1)
        assert not os.path.exists(incomplete_marker(path))  # nothing written yet
        loader.load_start(DISK_START.pack(32 * MiB, MiB, 0))
        with pytest.raises(DiskError, match="incomplete: an incoming migration of "
                                            "/src/disk.img into this image has not completed"):
            DiskImage(path)
        with pytest.raises(DiskError, match=f"remove {path}.incomplete"):
            DiskSpec(path).open()
        loader.finish()
    DiskImage(path).close()


def test_a_target_of_another_size_is_refused_even_with_overwrite(tmp_path):
    path = sparse_image(tmp_path / "t.img", 8 * MiB)
    for overwrite in (False, True):
        with pytest.raises(DiskError, match="is 8388608 bytes; the incoming disk is 4194304"):
            open_target(DiskTarget(0, path, overwrite), 4 * MiB, "s.img")
    assert os.path.getsize(path) == 8 * MiB and not os.path.exists(incomplete_marker(path))


HEADER = DISK_START.pack(4 * MiB, MiB, 0)


def test_a_target_holding_data_is_refused_unless_overwrite_which_empties_it(tmp_path):
    path = sparse_image(tmp_path / "t.img", 4 * MiB, {MiB: b"old data" * 64})
    before = digest(path)
    with open_target(DiskTarget(0, path), 4 * MiB, "s.img") as image:
        with pytest.raises(DiskError, match="already holds data; give disk0=.*,overwrite"):
            BlockLoader(image, 0).load_start(HEADER)
    assert digest(path) == before and not os.path.exists(incomplete_marker(path))
    with open_target(DiskTarget(0, path, overwrite=True), 4 * MiB, "s.img") as image:
        BlockLoader(image, 0).load_start(HEADER)
        assert image.pread(MiB, 512) == bytes(512)
        assert os.path.exists(incomplete_marker(path))
    with open_target(DiskTarget(0, path), 4 * MiB, "s.img") as image:
        BlockLoader(image, 0).load_start(HEADER)  # its own earlier, incomplete copy


def test_an_empty_target_of_the_right_size_or_none_at_all_is_taken(tmp_path):
    path = sparse_image(tmp_path / "t.img", 4 * MiB)
    open_target(DiskTarget(0, path), 4 * MiB, "s.img").close()
    zero = tmp_path / "zero.img"
    zero.touch()
    with open_target(DiskTarget(0, str(zero)), 4 * MiB, "s.img") as image:
        assert image.size_bytes == 4 * MiB


def test_target_names_parse():
    assert DiskTarget.parse("disk1=/tmp/x.img,overwrite") == DiskTarget(1, "/tmp/x.img", True)
    assert DiskTarget.parse("disk0=rel.img").path == os.path.abspath("rel.img")
    assert is_target("disk0=/x") and not is_target("/images/disk0=x.img")
    assert not is_target("/tmp/plain.img")
    for bad in ("disk0=", "diskA=/x", "disk0=/x,sparse"):
        with pytest.raises(ValueError):
            DiskTarget.parse(bad)


def test_a_corrupt_marker_still_refuses(tmp_path):
    path = sparse_image(tmp_path / "t.img", MiB)
    with open(incomplete_marker(path), "wb") as f:
        f.write(b"\xff not json")
    with pytest.raises(DiskError, match="incomplete: an incoming migration into it has not"):
        DiskImage(path)


def test_the_disk_header_layout():
    assert DISK_START.size == 16 and RECORD.size == 16
    assert struct.unpack("<QII", DISK_START.pack(1, 2, 3)) == (1, 2, 3)


def test_the_progress_line_and_the_summary_show_the_disk_next_to_ram():
    from rich.console import Console

    from pymig.monitor import ProgressView, progress_figures, stats_table

    info = {"status": "active", "iterations": 3,
            "ram": {"total": 64 * MiB, "remaining": 2 * MiB, "transferred": 10 * MiB},
            "disk": {"total": 256 * MiB, "remaining": 100 * MiB, "transferred": 156 * MiB}}
    line = progress_figures(info)
    assert "RAM 2.0 MiB left, disk 100.0 MiB left (156.0 MiB sent)" in line, line
    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    with ProgressView(console) as view:
        view.update(info)
        task = view.progress.tasks[0]
        assert (task.total, task.completed) == (320 * MiB, 218 * MiB)
    console.print(stats_table(dict(info, status="completed")))
    text = console.export_text()
    assert "disks moved (images)" in text and "disk data sent (wire bytes)" in text


# --- incremental: a checkpoint and the chunks written since ---------------------------------

def copy_with_checkpoint(image_path: str, name: str, to: str) -> None:
    """What an operator does to ready a destination: the image and its checkpoint's identity
    (its map is made afresh, empty, when the copy is opened)."""
    import shutil

    shutil.copyfile(image_path, to)
    shutil.copyfile(checkpoint_files(image_path, name)[0], checkpoint_files(to, name)[0])


def test_a_checkpoint_maps_every_write_from_its_making_on_even_in_runs_that_do_not_name_it(
        tmp_path):
    path = sparse_image(tmp_path / "d.img", 8 * MiB, {0: b"before" * 100})
    spec = DiskSpec.parse(f"{path},checkpoint=base")
    assert spec.checkpoint == "base"
    with spec.open() as image:
        identity = image.checkpoints["base"].identity
        assert identity["size_bytes"] == 8 * MiB and len(identity["id"]) == 32
        assert not image.checkpoints["base"].written().any()  # earlier writes are the base
        image.pwrite(3 * MiB + 10 * 512, b"x" * 512)
        # on the map's file already, not only in this process
        with open(checkpoint_files(path, "base")[1], "rb") as f:
            assert f.read()[0] == 1 << 3
    with DiskImage(path) as image:  # a later run that names no checkpoint
        assert image.checkpoints["base"].identity == identity
        image.write_zeroes(6 * MiB, 2 * MiB)
        assert np.flatnonzero(image.checkpoints["base"].written()).tolist() == [3, 6, 7]
    with DiskSpec.parse(f"{path},checkpoint=base").open() as image:  # not made again
        assert image.checkpoints["base"].identity == identity
    with pytest.raises(DiskError, match="read-only: a checkpoint cannot be made"):
        DiskSpec.parse(f"{path},readonly,checkpoint=other").open()
    for bad in (f"{path},checkpoint=", f"{path},checkpoint=a/b"):
        with pytest.raises(ValueError, match="checkpoint name"):
            DiskSpec.parse(bad)


def test_an_incremental_copy_sends_only_what_changed_since_the_checkpoint(tmp_path):
    size = 32 * MiB
    source = sparse_image(tmp_path / "source.img", size, {0: os.urandom(size)})
    DiskSpec.parse(f"{source},checkpoint=c1").open().close()
    target = str(tmp_path / "copy.img")
    copy_with_checkpoint(source, "c1", target)
    with DiskImage(source) as image:
        image.pwrite(5 * MiB, os.urandom(2 * MiB))  # chunks 5, 6
        image.pwrite(20 * MiB + 512, b"z" * 512)  # chunk 20
        saver, out = BlockSaver(image, 0), Sections()
        saver.checkpoint = image.checkpoints["c1"]
        saver.setup(out)
        assert saver.pending() == 3 * MiB
        image.pwrite(30 * MiB, b"during")  # the dirty log adds it
        while not saver.iterate(out):
            pass
        saver.complete(out)
        # the checkpoint's three chunks whole (its map is in chunks), 64 KiB of the fourth
        assert saver.counters.parts == 4
    with open_target(DiskTarget(0, target), size, source) as copy:
        loader = BlockLoader(copy, 0)
        out.replay(loader)
        assert loader.incremental and loader.bytes_written == 3 * MiB + 64 * KiB
        loader.finish()
    assert digest(source) == digest(target)


@pytest.mark.parametrize("case", ["another-checkpoint", "no-identity", "incomplete"])
def test_an_incremental_copy_into_anything_but_the_checkpoints_copy_is_refused(tmp_path, case):
    size = 4 * MiB
    source = sparse_image(tmp_path / "source.img", size, {0: os.urandom(size)})
    DiskSpec.parse(f"{source},checkpoint=c1").open().close()
    target = str(tmp_path / "copy.img")
    if case == "another-checkpoint":  # a copy of the same name, of another checkpoint
        other = sparse_image(tmp_path / "other.img", size, {0: b"o"})
        DiskSpec.parse(f"{other},checkpoint=c1").open().close()
        copy_with_checkpoint(other, "c1", target)
        said = "is not a copy of checkpoint c1 of the source's image: its identity is"
    elif case == "no-identity":
        sparse_image(target, size, {0: b"stale"})
        said = "is not a copy of checkpoint c1 of the source's image \\(no checkpoint identity"
    else:
        copy_with_checkpoint(source, "c1", target)
        with open(incomplete_marker(target), "w") as f:
            f.write("{}")
        said = "is incomplete: an incremental migration needs the whole copy"
    before = digest(target)
    with DiskImage(source) as image:
        saver, out = BlockSaver(image, 0), Sections()
        saver.checkpoint = image.checkpoints["c1"]
        saver.setup(out)
    with open_target(DiskTarget(0, target, overwrite=True), size, source) as copy:
        with pytest.raises(DiskError, match=said):
            BlockLoader(copy, 0).load_start(out.records[0][1])
    assert digest(target) == before


@pytest.mark.parametrize("args,said", [
    (["--disk-dir", "/nonexistent/dir"], "--disk-dir /nonexistent/dir: no such directory"),
    (["--disk", "disk0=/t.img,sparse"], "unknown option(s) ['sparse'] (known: overwrite)"),
    (["--disk", "disk0=/a.img", "--disk", "disk0=/b.img"], "a disk named twice as a target"),
])
def test_pymig_incoming_refuses_disk_targets_it_cannot_use(args, said):
    from click.testing import CliRunner

    from pymig.cli import main

    done = CliRunner().invoke(main, ["incoming", "tcp:127.0.0.1:0", *args])
    assert done.exit_code != 0 and said in done.output, done.output


def test_pymig_migrate_inc_and_blk_reach_the_migrate_command(monkeypatch):
    from click.testing import CliRunner

    from pymig import cli

    sent: list = []

    class Stop(Exception):
        pass

    class Client:  # a source's control socket that takes the migrate command, then stops
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def command(self, name, **arguments):
            sent.append((name, arguments))
            if name == "migrate":
                raise Stop

    monkeypatch.setattr(cli, "_connect", lambda control, token: Client())
    monkeypatch.setattr("pymig.settings.apply", lambda client, settings: {
        "parameters": {}, "capabilities": {}})
    monkeypatch.setattr("pymig.settings.describe", lambda p, c: "")
    done = CliRunner().invoke(cli.main, ["migrate", "--control", "/nowhere",
                                         "tcp:127.0.0.1:1", "--blk", "--inc"])
    assert isinstance(done.exception, Stop)
    assert ("migrate", {"uri": "tcp:127.0.0.1:1", "blk": True, "inc": True}) in sent


# --- any bytes at all ------------------------------------------------------------------------


@st.composite
def block_parts(draw):
    """PARTs near the valid shape (records whose fields a mutation may push anywhere) and
    arbitrary bytes."""
    records = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from([KIND_DATA, KIND_ZERO, 0, 3, 255]))
        length = draw(st.one_of(st.sampled_from([0, 1, 512, 4096, MiB, MiB + 512]),
                                st.integers(0, (1 << 32) - 1)))
        offset = draw(st.one_of(st.sampled_from([0, 512, 4 * MiB - 512, 4 * MiB]),
                                st.integers(0, (1 << 64) - 1)))
        data = draw(st.binary(max_size=2048)) if kind == KIND_DATA else b""
        records.append(RECORD.pack(kind, length, offset) + data)
    return draw(st.one_of(st.just(b"".join(records)), st.binary(max_size=256)))


@given(block_parts())
def test_any_part_is_refused_with_a_packet_error_or_stays_inside_the_disk(payload):
    size, chunk = 4 * MiB, MiB
    try:
        records = parse_part(payload, size, chunk)
    except PacketError as exc:
        assert 0 <= exc.offset <= len(payload)
        return
    covered = 0
    for kind, offset, length, at in records:
        assert kind in (KIND_DATA, KIND_ZERO)
        assert offset % 512 == 0 and length % 512 == 0 and 0 < length <= chunk
        assert offset + length <= size
        if kind == KIND_DATA:
            assert at + length <= len(payload)
        covered += length
    assert covered <= chunk


@given(st.integers(min_value=0, max_value=1 << 47))
def test_a_part_received_at_receive_offset_has_its_first_data_on_a_page(address):
    shift = receive_offset(address)
    assert 0 <= shift < DIRECT_ALIGN
    assert (address + shift + RECORD.size) % DIRECT_ALIGN == 0


def test_a_dense_chunk_received_page_aligned_goes_to_the_target_past_the_cache(tmp_path,
                                                                             monkeypatch):
    """The destination's usual PART, one chunk of data, received where receive_offset puts
    it: its data is written from the receive buffer itself, past the page cache where the
    file system allows, and the image ends equal to the source's."""
    import mmap

    size = 8 * MiB
    source = sparse_image(tmp_path / "source.img", size, {0: os.urandom(size)})
    with DiskImage(source) as image, target_for(tmp_path, size) as target:
        saver, out = BlockSaver(image, 0), Sections()
        saver.setup(out)
        saver.complete(out)
        saver.cleanup()
        loader = BlockLoader(target, 0)
        buffer = mmap.mmap(-1, MiB + 2 * DIRECT_ALIGN)  # (at a page, as a decoder's need not)
        start = receive_offset(buffer_address(memoryview(buffer)))
        copies = []
        real = DiskImage._write_direct

        def watch(self, offset, view):
            copies.append(buffer_address(view) % DIRECT_ALIGN)  # 0: no copy needed
            return real(self, offset, view)

        monkeypatch.setattr(DiskImage, "_write_direct", watch)
        for kind, payload in out.records:
            if kind == stream.RecordType.PART:
                buffer[start:start + len(payload)] = payload
                payload = memoryview(buffer)[start:start + len(payload)]
            {stream.RecordType.START: loader.load_start, stream.RecordType.PART:
             loader.load_part, stream.RecordType.END: loader.load_end}[kind](payload)
            if isinstance(payload, memoryview):
                payload.release()
        direct = target.direct_bytes
        loader.finish()
    assert digest(source) == digest(tmp_path / "target.img")
    if direct:  # O_DIRECT here: every chunk went from the buffer as received, no copy first
        assert direct == size and copies == [0] * (size // MiB)
