"""Background snapshots (the background-snapshot capability): a file: snapshot of the guest as
it was when the snapshot began, written while the guest runs on; its RAM is write-protected
with userfaultfd and each page saved before the guest's first write to it."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _migration_helpers import (ANY_KIND, MiB, assert_carries_on, assert_consistent,
                                block_digests, e2e_kind, finish, guest_config, guest_passes,
                                run_pymig, start_destination, start_source, wait_for)
from _uffd import needs_uffd

from pymig import bgsnapshot
from pymig._core import kvm as _kvm
from pymig.errors import KvmError, MigrationError
from pymig.guest import create
from pymig.incoming import Incoming
from pymig.machine import Machine
from pymig.migration import Migration
from pymig.parameters import BACKGROUND_SNAPSHOT_EXCLUDES, ParameterStore
from pymig.stats import read_trace
from pymig.transport.snapshot_index import read_index

KINDS = [
    pytest.param("simulated", id="simulated"),
    pytest.param("kvm", id="kvm", marks=pytest.mark.kvm),
]
PAGEMAP_UFFD_WP = 1 << 57  # /proc/PID/pagemap: the page's PTE is uffd write-protected




@pytest.fixture
def closing():
    things = []
    yield things.append
    for thing in reversed(things):
        thing.close()


def _running(kind, closing, vcpus=1, **options):
    guest = create(guest_config(kind, memory=64 * MiB, working_set=16 * MiB, vcpus=vcpus),
                   **options)
    closing(guest)
    guest.start()
    wait_for(lambda: guest.progress()["passes"] >= 1, what="the guest to run")
    return guest


def _protected_pages(guest) -> int:
    """Pages of the guest's RAM whose PTE is write-protected through userfaultfd."""
    count = 0
    with open("/proc/self/pagemap", "rb") as pagemap:
        for block in guest.ram_blocks:
            pagemap.seek(block.address // 4096 * 8)
            data = pagemap.read(block.size_bytes // 4096 * 8)
            count += sum(1 for (entry,) in struct.iter_unpack("<Q", data)
                         if entry & PAGEMAP_UFFD_WP)
    return count


class AtStart:
    """Records, while the snapshot holds the vCPUs stopped (its write protection in place),
    the digest of every RAM block and the guest's progress: the guest's resume is wrapped."""

    def __init__(self, guest):
        self.guest = guest
        self.digests: list[str] = []
        self.passes: int | None = None
        self.protected = 0
        self._resume = guest.resume
        guest.resume = self._resumed

    def _resumed(self) -> None:
        if not self.digests:
            self.digests = block_digests(self.guest.ram_blocks)
            self.passes = self.guest.progress()["passes"]
            self.protected = _protected_pages(self.guest)
        self._resume()


def _snapshot(guest, path, *, params=None, capabilities=None, trace=None):
    store = ParameterStore()
    # uncompressed and capped: the pass takes a while, the guest writing all along
    store.set(**{"max-bandwidth": 16 * MiB, "compression": "none", **(params or {})})
    store.set_capabilities(**{"background-snapshot": True, **(capabilities or {})})
    migration = Migration(Machine.source(guest), store)
    migration.start(f"file:{path}", trace_path=trace)
    return migration


def _restore(path, closing):
    """Restore ``path``; the digests of its RAM as loaded (before its vCPUs ran), and its
    guest."""
    loaded: list[str] = []
    result = Incoming(f"file:{path}", limits=ANY_KIND,
                      before_start=lambda m: loaded.extend(block_digests(m.guest.ram_blocks))
                      ).run()
    closing(result.machine.guest)
    return loaded, result.machine.guest


@needs_uffd
@pytest.mark.parametrize("kind,vcpus", [
    pytest.param("simulated", 1, id="simulated"),
    pytest.param("simulated", 2, id="simulated-2vcpus"),
    pytest.param("kvm", 1, id="kvm", marks=pytest.mark.kvm),
    pytest.param("kvm", 2, id="kvm-2vcpus", marks=pytest.mark.kvm),
])
def test_the_snapshot_holds_the_guest_as_it_was_when_it_began(kind, vcpus, closing, tmp_path):
    """The guest writes its pages all along the snapshot; the restored RAM is exactly what it
    was at the snapshot's start, byte for byte, and the restored guest checks clean."""
    guest = _running(kind, closing, vcpus)
    start = AtStart(guest)
    statuses: list[str] = []
    migration = _snapshot(guest, tmp_path / "snap", trace=tmp_path / "trace")
    migration.on_status(lambda old, new: statuses.append(new.value))
    assert migration.wait(120).value == "completed", migration.query()
    query = migration.query()
    # the guest ran on throughout: it was stopped only to protect its RAM, and made
    # progress while its pages were saved
    assert start.digests and start.protected > 0
    assert guest.status == "running"
    assert guest.progress()["passes"] > start.passes
    assert "device" not in statuses
    counters = query["background-snapshot"]
    assert counters["wp-faults"] > 0 and counters["pages-copied"] > 0, counters
    assert counters["pages-saved"] == counters["pages-total"] > 0
    # every page once: the stream carries as many pages as there were to save, and its
    # restore index has nothing to supersede
    assert query["ram"]["normal"] + query["ram"]["duplicate"] == counters["pages-total"]
    with open(tmp_path / "snap", "rb") as handle:
        index = read_index(handle.fileno())
    assert index is not None and index.superseded == []
    assert set(query["downtime-breakdown"]) == {"pause", "protect", "device-state", "resume"}
    # the snapshot over, no page is write-protected any more
    assert _protected_pages(guest) == 0
    # the trace follows the pass, and its last line has the final counters
    lines = [r for r in read_trace(tmp_path / "trace") if r["action"] == "background-snapshot"]
    assert lines and lines[-1]["pending_bytes"] == 0
    assert lines[-1]["background_snapshot"]["pages-copied"] == counters["pages-copied"]
    loaded, restored = _restore(tmp_path / "snap", closing)
    assert loaded == start.digests
    passes = restored.progress()["passes"]
    wait_for(lambda: restored.progress()["passes"] > passes, what="the restored guest to run")
    assert_consistent(restored)
    assert_consistent(guest)


@needs_uffd
@pytest.mark.parametrize("kind", KINDS)
def test_memfd_ram(kind, closing, tmp_path):
    """Shared-memory RAM is protected as well (userfaultfd's shmem write protection)."""
    guest = _running(kind, closing, backing="memfd")
    start = AtStart(guest)
    migration = _snapshot(guest, tmp_path / "snap")
    assert migration.wait(120).value == "completed", migration.query()
    assert migration.query()["background-snapshot"]["wp-faults"] > 0
    assert _protected_pages(guest) == 0
    loaded, restored = _restore(tmp_path / "snap", closing)
    assert loaded == start.digests
    assert_consistent(restored)


@needs_uffd
def test_asked_to_stop_the_guest_stays_paused_once_the_snapshot_is_taken(closing, tmp_path):
    """migrate ... resume=false (pymig migrate --stop): the snapshot still holds the guest as
    it was when it began; the guest, which ran meanwhile, is stopped at the end."""
    guest = _running("simulated", closing)
    start = AtStart(guest)
    store = ParameterStore()
    store.set_capabilities(**{"background-snapshot": True})
    migration = Migration(Machine.source(guest), store)
    migration.start(f"file:{tmp_path / 'snap'}", resume_source=False)
    assert migration.wait(60).value == "completed", migration.query()
    assert guest.status == "paused" and not migration.moved_away
    loaded, _ = _restore(tmp_path / "snap", closing)
    assert loaded == start.digests


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_runs_of_set_bits(bits):
    expected = []
    for page in range(64):
        if bits >> page & 1:
            if expected and sum(expected[-1]) == page:
                expected[-1] = (expected[-1][0], expected[-1][1] + 1)
            else:
                expected.append((page, 1))
    assert list(bgsnapshot._runs(bits)) == expected


@needs_uffd
@pytest.mark.parametrize("kind", KINDS)
def test_a_cancel_leaves_the_guest_running_with_every_page_writable(kind, closing, tmp_path):
    guest = _running(kind, closing)
    start = AtStart(guest)
    migration = _snapshot(guest, tmp_path / "snap", params={"max-bandwidth": 4 * MiB})
    wait_for(lambda: migration.query().get("background-snapshot", {}).get("pages-saved", 0)
             > 0, what="the pass to begin")
    assert _protected_pages(guest) > 0  # (the pass is under way: some pages still are)
    migration.cancel()
    assert migration.wait(60).value == "cancelled", migration.query()
    assert start.digests
    counters = migration.query()["background-snapshot"]
    assert counters["pages-saved"] < counters["pages-total"]
    assert not (tmp_path / "snap").exists()
    assert guest.status == "running"
    assert _protected_pages(guest) == 0
    passes = guest.progress()["passes"]
    wait_for(lambda: guest.progress()["passes"] > passes + 1, what="the guest to run on")
    assert_consistent(guest)


@needs_uffd
def test_a_failed_write_leaves_the_guest_running_with_every_page_writable(closing, tmp_path):
    """The stream's reader goes away in the middle of the pass: the snapshot fails, and the
    guest runs on, every page writable again."""
    guest = _running("simulated", closing)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = bytearray()

    def reader() -> None:  # reads the header and a little RAM, then goes away
        with open(fifo, "rb") as pipe:
            while len(got) < 2 * MiB:
                chunk = pipe.read(64 << 10)
                if not chunk:
                    return
                got.extend(chunk)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    migration = _snapshot(guest, fifo, params={"max-bandwidth": 8 * MiB})
    assert migration.wait(60).value == "failed", migration.query()
    thread.join(10)
    query = migration.query()
    assert query["background-snapshot"]["pages-total"] > 0  # it failed in the pass
    assert query["background-snapshot"]["pages-saved"] < query["background-snapshot"][
        "pages-total"]
    assert guest.status == "running"
    assert _protected_pages(guest) == 0
    passes = guest.progress()["passes"]
    wait_for(lambda: guest.progress()["passes"] > passes + 1, what="the guest to run on")
    assert_consistent(guest)


def test_pymig_migrate_background_snapshot_and_restore(tmp_path):
    """``pymig migrate --background-snapshot file:PATH``: the flag sets the capability, the
    summary says the snapshot is taken and the guest runs on; the file restores like any."""
    kind = e2e_kind()
    src, ctl = start_source(kind, tmp_path, memory="64M", working_set="16M")
    try:
        wait_for(lambda: guest_passes(ctl) >= 1, what="a first pass")
        done = run_pymig("migrate", "--control", ctl, "--background-snapshot", "--json",
                         f"file:{tmp_path}/s.pymig")
        assert done.returncode == 0, done.stderr
        assert "background-snapshot on" in done.stderr
        info = json.loads(done.stdout)
        assert info["settings"]["capabilities"]["background-snapshot"] is True
        assert info["background-snapshot"]["pages-saved"] == \
            info["background-snapshot"]["pages-total"] > 0
        assert "snapshot complete; the guest stays at the source, running" in done.stderr
        assert_carries_on(ctl)
        # a destination is no place for one
        refused = run_pymig("migrate", "--control", ctl, "--background-snapshot",
                            "tcp:127.0.0.1:1")
        assert refused.returncode == 1
        assert "one-way stream" in refused.stderr and "Traceback" not in refused.stderr
        refused = run_pymig("migrate", "--control", ctl, "--background-snapshot",
                            "--auto-converge", f"file:{tmp_path}/t.pymig")
        assert refused.returncode == 1
        assert "Background-snapshot is not compatible with auto-converge" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        finish(src)
    dst, dst_ctl, _ = start_destination(tmp_path, f"file:{tmp_path}/s.pymig")
    try:
        assert_carries_on(dst_ctl)
    finally:
        finish(dst)


ENOSPC_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from _migration_helpers import MiB, assert_consistent, guest_config, running_guest, wait_for
from test_background_snapshot import _protected_pages, _snapshot
guest = running_guest(guest_config("simulated", memory=64 * MiB, working_set=16 * MiB))
migration = _snapshot(guest, sys.argv[1])
print("status", migration.wait(60).value)
query = migration.query()
print("error", query.get("error-desc"))
counters = query["background-snapshot"]
print("in the pass", 0 < counters["pages-saved"] < counters["pages-total"])
print("guest", guest.status.value, "protected", _protected_pages(guest))
passes = guest.progress()["passes"]
wait_for(lambda: guest.progress()["passes"] > passes + 1, what="the guest to run on")
assert_consistent(guest)
print("consistent")
"""


@needs_uffd
def test_a_full_file_system_fails_the_snapshot_and_the_guest_runs_on(tmp_path):
    """A 4 MiB tmpfs in a private mount namespace (nothing outside this test sees it): the
    snapshot's write fails with ENOSPC in the middle of the pass, and the guest runs on,
    consistent, with no page write-protected."""
    from _childenv import child_env

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux unshare is not installed")
    mnt = tmp_path / "small"
    mnt.mkdir()
    tests = os.path.dirname(os.path.abspath(__file__))
    script = (f"mount -t tmpfs -o size=4m tmpfs {mnt} && "
              f"exec {sys.executable} -c '{ENOSPC_CHILD}' {mnt}/snap {tests}")
    done = subprocess.run([unshare, "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120, env=child_env())
    if done.returncode != 0 and "Operation not permitted" in done.stderr:
        pytest.skip(f"no private mount namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "status failed" in done.stdout, done.stdout
    assert "ENOSPC" in done.stdout, done.stdout
    assert "in the pass True" in done.stdout, done.stdout
    assert "guest running protected 0" in done.stdout, done.stdout
    assert "consistent" in done.stdout, done.stdout


# -- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("other", BACKGROUND_SNAPSHOT_EXCLUDES)
def test_capabilities_it_excludes_are_refused_either_way_round(other):
    store = ParameterStore()
    store.set_capabilities(**{other: True})
    with pytest.raises(ValueError, match=f"Background-snapshot is not compatible with {other}"):
        store.set_capabilities(**{"background-snapshot": True})
    store.set_capabilities(**{other: False, "background-snapshot": True})
    with pytest.raises(ValueError, match=f"Background-snapshot is not compatible with {other}"):
        store.set_capabilities(**{other: True})
    caps = store.snapshot().capabilities
    assert (caps[other], caps["background-snapshot"]) == (False, True)


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1:1", "unix:/nonexistent/sock"])
def test_a_migration_to_a_destination_is_refused(uri, closing):
    guest = _running("simulated", closing)
    store = ParameterStore()
    store.set_capabilities(**{"background-snapshot": True})
    migration = Migration(Machine.source(guest), store)
    with pytest.raises(MigrationError, match="one-way stream"):
        migration.start(uri)
    assert migration.status.value == "none" and guest.status == "running"


def test_a_socket_passed_as_fd_is_refused_before_anything_is_protected(closing):
    import socket

    guest = _running("simulated", closing)
    ours, theirs = socket.socketpair()
    closing(theirs)
    store = ParameterStore()
    store.set_capabilities(**{"background-snapshot": True})
    migration = Migration(Machine.source(guest), store)
    migration.start(f"fd:{ours.detach()}")
    assert migration.wait(30).value == "failed"
    query = migration.query()
    assert "a socket with a return path" in query["error-desc"]
    assert "background-snapshot" not in query  # refused before the tracker existed
    assert guest.status == "running" and _protected_pages(guest) == 0


def test_ram_it_cannot_protect_is_refused():
    class Block:
        name, backing = "pc.ram", "hugetlb"

    with pytest.raises(MigrationError, match="guest memory configuration.*hugetlb"):
        bgsnapshot.check_guest([Block()])


def test_the_writeprotect_wrapper_raises_ebadf_on_a_bad_fd():
    with pytest.raises(KvmError) as info:
        _kvm._unsafe_uffdio_writeprotect(-1, 0, 4096, _kvm.WRITEPROTECT_MODE_WP)
    assert info.value.errno == 9


@needs_uffd
def test_the_benchmark_measures_what_it_reports(tmp_path):
    """python -m pymig.benchbgsnapshot, small: the guest's rate alone, a background and a live
    snapshot with their times and the guest's rate during each, each restored clean."""
    from pymig import benchbgsnapshot

    run = benchbgsnapshot.run("simulated", 32, 8, str(tmp_path), {"compression": "none"})
    assert run["guest_pages_per_s_alone"] > 0
    for name in ("background", "live"):
        assert run[name]["status"] == "completed", run[name]
        assert run[name]["restored_selfcheck_errors"] == 0
        assert run[name]["total_ms"] is not None and run[name]["downtime_ms"] is not None
        assert run[name]["guest_pages_per_s_during"] is not None
    counters = run["background"]["background_snapshot"]
    assert counters["pages-saved"] == counters["pages-total"] > 0
    assert run["live"]["background_snapshot"] is None
    assert not list(tmp_path.iterdir())  # each snapshot removed once restored
