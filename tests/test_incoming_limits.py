"""A destination sets its own limits on the guest a stream asks for (guest kinds, RAM, vCPUs, a
configuration that can be built), refuses anything else before it maps a byte or creates a
VM, and tells the source why; the source's migration fails with that reason and its guest runs
on."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from _childenv import child_env
from _migration_helpers import guests  # noqa: F401 - fixture
from _migration_helpers import (GUEST_KINDS, assert_consistent, finish, guest_config,
                                guest_passes, pymig_process, run_pymig, start_destination,
                                start_source, wait_for, wait_for_path)
from pymig import stream, transport
from pymig.errors import MigrationError
from pymig.guest import GuestConfig, make_config
from pymig.guest.layout import MAX_VCPUS, pc_layout
from pymig.incoming import Incoming
from pymig.limits import DestinationLimits, Host, LimitError, parse_kinds
from pymig.machine import CONFIG_IDSTR, CONFIG_SECTION_ID, CONFIG_VERSION, Machine
from pymig.memory import RamBlock
from pymig.migration import Migration
from pymig.qmp import QmpClient

MiB = 1 << 20
GiB = 1 << 30
WAIT_S = 60.0


class FakeHost(Host):
    """A host whose native kind and available memory the test chooses."""

    def __init__(self, native: str = "kvm", memory: int = 8 * GiB):
        self.native = native
        self.memory = memory

    def native_kind(self) -> str:
        return self.native

    def memory_bytes(self, backing: str) -> tuple[int, str]:
        return self.memory, "what the host has available (MemAvailable)"


@pytest.fixture
def allocations(monkeypatch):
    """Every RAM block mapped from now on, by name."""
    made: list[str] = []
    allocate = RamBlock.allocate.__func__

    def spy(cls, name, *args, **kwargs):
        made.append(name)
        return allocate(cls, name, *args, **kwargs)

    monkeypatch.setattr(RamBlock, "allocate", classmethod(spy))
    return made


class Destination:
    """An :class:`Incoming` running in a thread of this process."""

    def __init__(self, tmp_path, **options):
        options.setdefault("accept_timeout", WAIT_S)
        self.incoming = Incoming(f"unix:{tmp_path}/dst.sock", **options)
        self.uri = self.incoming.listen()
        self.error: BaseException | None = None
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.incoming.run()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc

    def join(self) -> None:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the destination did not finish"
        if self.result is not None:
            self.result.machine.close()


def migrate_to(destination: Destination, source) -> Migration:
    """Migrate ``source`` to ``destination`` and wait for the end."""
    migration = Migration(Machine.source(source))
    migration.start(destination.uri)
    migration.wait(WAIT_S)
    destination.join()
    return migration


def assert_refused(destination: Destination, migration: Migration, source, reason: str,
                   allocations: list[str], ram_before: int) -> None:
    """Both sides name ``reason``; nothing was mapped for the destination's guest; the source
    guest runs on, consistent."""
    assert migration.status.value == "failed", migration.query()
    assert reason in migration.query()["error-desc"]
    assert isinstance(destination.error, MigrationError)
    assert reason in str(destination.error)
    assert destination.incoming.machine is None
    assert len(allocations) == ram_before, f"the destination mapped {allocations[ram_before:]}"
    assert source.status == "running"
    passes = source.progress()["passes"]
    wait_for(lambda: source.progress()["passes"] > passes, what="the source guest to run on")
    if source.config.workload == "selfcheck":
        assert_consistent(source)


# -- guest kinds ----------------------------------------------------------------------------

def test_a_kvm_host_refuses_a_simulated_guest_by_default(tmp_path, guests, allocations):
    source = guests(guest_config("simulated"))
    mapped = len(allocations)
    destination = Destination(tmp_path, limits=DestinationLimits(host=FakeHost("kvm")))
    migration = migrate_to(destination, source)
    assert_refused(destination, migration, source,
                   "the stream's guest is a simulated guest; this destination accepts kvm "
                   "guests only (--accept-kind)", allocations, mapped)


def test_a_host_without_kvm_takes_simulated_guests_by_default():
    limits = DestinationLimits(host=FakeHost("simulated"))
    assert limits.kinds() == ("simulated",)
    limits.check(guest_config("simulated"))
    with pytest.raises(LimitError, match="is a kvm guest; this destination accepts simulated"):
        limits.check(guest_config("kvm"))


def test_accepted_kinds_are_named_on_the_command_line_way():
    assert parse_kinds(["kvm,simulated"]) == ("kvm", "simulated")
    assert parse_kinds(["simulated", "kvm"]) == ("simulated", "kvm")
    assert parse_kinds([]) is None
    limits = DestinationLimits(accept_kinds=parse_kinds(["simulated"]), host=FakeHost("kvm"))
    limits.check(guest_config("simulated"))
    with pytest.raises(ValueError, match="'xen'"):
        DestinationLimits(accept_kinds=("kvm", "xen"))


@pytest.mark.parametrize("args,message", [
    (("--accept-kind", "kvm,xen"), "guest kinds to accept: kvm, simulated, not 'xen'"),
    (("--max-memory", "0"), "max_memory_bytes (--max-memory) must be a positive integer"),
    (("--progress-timeout", "-1"), "-1"),
])
def test_pymig_incoming_refuses_limits_that_make_no_sense(args, message):
    done = run_pymig("incoming", "tcp:127.0.0.1:0", *args, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("kind,accept,other", [("simulated", (), "kvm"),
                                               ("kvm", ("--accept-kind", "simulated"),
                                                "simulated")])
def test_pymig_incoming_refuses_a_source_of_a_kind_it_does_not_accept(kind, accept, other,
                                                                       tmp_path):
    """Two processes as a user runs them; with no --accept-kind, this host (it has KVM) takes
    KVM guests only."""
    src, src_ctl = start_source(kind, tmp_path)
    dst_ctl = str(tmp_path / "dst.sock")
    dst = pymig_process("incoming", "tcp:127.0.0.1:0", "--control", dst_ctl, "--quiet",
                        *accept, stderr=subprocess.PIPE)
    try:
        wait_for_path(dst_ctl, dst)
        with QmpClient(dst_ctl) as client:
            uri = client.command("query-migrate")["socket-address"]
        refused_by_process(src, src_ctl, dst, uri,
                           f"the stream's guest is a {kind} guest; this destination accepts "
                           f"{other} guests only (--accept-kind)")
    finally:
        finish(src, dst)


def refused_by_process(src, src_ctl, dst, uri, reason: str) -> None:
    """``pymig migrate`` fails naming ``reason``, the destination process ends saying it, and
    the source guest runs on, consistent."""
    wait_for(lambda: guest_passes(src_ctl) >= 1, what="the source guest to run")
    out = subprocess.run([*PYMIG, "migrate", "--control", src_ctl, uri, "--json"],
                         capture_output=True, text=True, timeout=120, env=child_env())
    assert out.returncode == 1, out.stderr
    final = json.loads(out.stdout)
    assert final["status"] == "failed"
    assert reason in final["error-desc"], final["error-desc"]
    assert dst.wait(60) == 1
    assert reason in dst.stderr.read().decode()
    assert src.poll() is None, "the source quit"
    with QmpClient(src_ctl) as client:
        assert client.command("query-status")["status"] == "running"
        passes = client.command("query-guest")["progress"]["passes"]
        wait_for(lambda: client.command("query-guest")["progress"]["passes"] > passes,
                 what="the source guest to run on")
        client.command("stop")
        report = client.command("query-guest", verify=True)
        assert report["selfcheck"]["ok"], report["selfcheck"]


PYMIG = [sys.executable, "-m", "pymig"]


# -- RAM -------------------------------------------------------------------------------------

def test_a_guest_larger_than_the_host_can_give_is_refused_by_default(tmp_path, guests,
                                                                      allocations):
    # The source's 16 GiB are mapped, and only its 16 MiB working set is touched.
    source = guests(guest_config("simulated", memory=16 * GiB))
    mapped = len(allocations)
    destination = Destination(tmp_path, limits=DestinationLimits(
        accept_kinds=("simulated",), host=FakeHost(memory=12 * GiB)))
    migration = migrate_to(destination, source)
    assert_refused(destination, migration, source,
                   "the stream's guest has 16.0 GiB of RAM; this destination accepts at most "
                   "12.0 GiB (what the host has available (MemAvailable); --max-memory)",
                   allocations, mapped)


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_max_memory_refuses_a_larger_guest_between_processes(kind, tmp_path):
    src, src_ctl = start_source(kind, tmp_path, memory="128M")
    dst, _, uri = start_destination(tmp_path, "tcp:127.0.0.1:0", "--max-memory", "64M")
    try:
        refused_by_process(src, src_ctl, dst, uri,
                           "the stream's guest has 128.0 MiB of RAM; this destination accepts "
                           "at most 64.0 MiB (the limit set; --max-memory)")
    finally:
        finish(src, dst)


def test_an_exact_memory_size_is_taken_whatever_the_host_has():
    """--memory means exactly that guest: the operator has decided, the host is not asked."""
    config = GuestConfig("simulated", 16 * GiB, workload="idle")
    DestinationLimits(accept_kinds=("simulated",), memory_bytes=16 * GiB,
                      host=FakeHost(memory=1 * GiB)).check(config)
    with pytest.raises(LimitError, match="--memory says"):
        DestinationLimits(accept_kinds=("simulated",), memory_bytes=8 * GiB).check(config)
    with pytest.raises(LimitError, match="at most 4.0 GiB"):  # and a limit still limits
        DestinationLimits(accept_kinds=("simulated",), memory_bytes=16 * GiB,
                          max_memory_bytes=4 * GiB).check(config)


def test_the_default_memory_limit_is_the_hugetlb_pool_for_hugetlb_ram(monkeypatch):
    import pymig.memory

    monkeypatch.setattr(pymig.memory, "hugetlb_pool", lambda: (2 * MiB, 100, 32))
    most, why = Host().memory_bytes("hugetlb")
    assert most == 64 * MiB and "huge pages" in why and "nr_hugepages" in why
    with pytest.raises(LimitError, match="at most 64.0 MiB"):
        DestinationLimits(accept_kinds=("simulated",)).check(
            guest_config("simulated", memory=128 * MiB), backing="hugetlb")


def test_the_default_memory_limit_is_the_hosts_available_memory():
    from pymig.memory import memory_available

    most, why = Host().memory_bytes("anon")
    assert abs(most - memory_available()) < 1 * GiB and "MemAvailable" in why
    huge = GuestConfig("simulated", most + 64 * GiB, workload="idle")
    with pytest.raises(LimitError, match="MemAvailable"):
        DestinationLimits(accept_kinds=("simulated",)).check(huge)


# -- vCPUs -----------------------------------------------------------------------------------

def offer(uri: str, config: dict) -> str:
    """Do what any peer can: connect, send a stream header and a guest configuration of its
    choosing, and return the LOAD_ERROR text the destination answers."""
    channel = transport.connect(uri, timeout=10)
    try:
        writer = stream.StreamWriter(channel)
        writer.write_header()
        writer.full(CONFIG_SECTION_ID, CONFIG_IDSTR, 0, CONFIG_VERSION,
                    json.dumps(config).encode())
        reader = stream.ReturnPathReader(channel)
        while True:
            message = reader.recv(timeout=WAIT_S)
            assert message is not None, "the destination said nothing"
            if isinstance(message, stream.LoadError):
                return message.text
            assert not isinstance(message, stream.Ready), "the destination built the guest"
    finally:
        channel.close()


def image_config(vcpus: int, memory: int = 16 * MiB) -> dict:
    return {"kind": "kvm", "memory_bytes": memory, "vcpus": vcpus, "workload": "image",
            "params": {"image": "boot.img", "kind": "bootsector"}}


def test_an_image_guest_of_256_vcpus_is_refused_before_any_vm_exists(tmp_path, allocations,
                                                                       monkeypatch):
    import pymig.kvm.vm

    vms = []
    monkeypatch.setattr(pymig.kvm.vm.Vm, "__init__", lambda self, *a, **k: vms.append(a))
    destination = Destination(tmp_path, limits=DestinationLimits(accept_kinds=("kvm",)))
    text = offer(destination.uri, image_config(256))
    destination.join()
    reason = f"the stream's guest has 256 vCPUs; this destination accepts at most {MAX_VCPUS}"
    assert reason in text
    assert reason in str(destination.error)
    assert allocations == [] and vms == []


def test_max_vcpus_lowers_the_vmms_limit_but_never_raises_it():
    two = guest_config("simulated", vcpus=2)
    with pytest.raises(LimitError, match=r"2 vCPUs; this destination accepts at most 1 "
                                         r"\(the limit set; --max-vcpus\)"):
        DestinationLimits(accept_kinds=("simulated",), max_vcpus=1).check(two)
    DestinationLimits(accept_kinds=("simulated",), max_vcpus=2).check(two)
    many = GuestConfig("kvm", 16 * MiB, vcpus=MAX_VCPUS + 1, workload="image",
                       params={"image": "x", "kind": "bootsector"})
    with pytest.raises(LimitError, match="pymig's VMM runs at most that many"):
        DestinationLimits(accept_kinds=("kvm",), max_vcpus=1024).check(many)


def test_a_host_whose_kvm_runs_fewer_vcpus_than_the_vmm_says_so():
    host = Host()
    host.__dict__["_kvm"] = (None, 4)  # what the probe would find on such a host
    assert host.max_vcpus("kvm") == (4, "this host's KVM_CAP_MAX_VCPUS")
    assert host.max_vcpus("simulated") == (MAX_VCPUS, "pymig's VMM runs at most that many")
    with pytest.raises(LimitError, match=r"6 vCPUs; this destination accepts at most 4 "
                                         r"\(this host's KVM_CAP_MAX_VCPUS; --max-vcpus\)"):
        DestinationLimits(host=host).check(guest_config("kvm", vcpus=6))


def test_a_source_cannot_make_an_image_guest_of_more_vcpus_than_the_vmm_runs(tmp_path):
    image = tmp_path / "boot.img"
    image.write_bytes(bytes(510) + b"\x55\xaa")
    make_config(memory_bytes=16 * MiB, vcpus=MAX_VCPUS, boot_sector=image)
    with pytest.raises(ValueError, match=f"1 to {MAX_VCPUS} vCPUs, not {MAX_VCPUS + 1}"):
        make_config(memory_bytes=16 * MiB, vcpus=MAX_VCPUS + 1, boot_sector=image)


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_max_vcpus_refuses_a_guest_with_more_between_processes(kind, tmp_path):
    src, src_ctl = start_source(kind, tmp_path, vcpus=2)
    dst, _, uri = start_destination(tmp_path, "tcp:127.0.0.1:0", "--max-vcpus", "1")
    try:
        refused_by_process(src, src_ctl, dst, uri,
                           "the stream's guest has 2 vCPUs; this destination accepts at most 1 "
                           "(the limit set; --max-vcpus)")
    finally:
        finish(src, dst)


def test_a_deferred_destination_applies_its_limits_at_migrate_incoming(tmp_path):
    src, src_ctl = start_source("simulated", tmp_path)
    dst_ctl = str(tmp_path / "dst.sock")
    dst = pymig_process("incoming", "defer", "--control", dst_ctl, "--quiet",
                        "--accept-kind", "simulated", "--max-memory", "64M",
                        stderr=subprocess.PIPE)
    try:
        wait_for_path(dst_ctl, dst)
        with QmpClient(dst_ctl) as client:
            uri = client.command("migrate-incoming", uri="tcp:127.0.0.1:0")["uri"]
        refused_by_process(src, src_ctl, dst, uri,
                           "the stream's guest has 128.0 MiB of RAM; this destination accepts "
                           "at most 64.0 MiB (the limit set; --max-memory)")
    finally:
        finish(src, dst)


# -- the configuration itself ----------------------------------------------------------------

def _config(**changes) -> dict:
    config = GuestConfig("simulated", 64 * MiB, workload="selfcheck",
                         params={"working_set_bytes": 16 * MiB}).to_dict()
    config.update(changes)
    return config


def _blocks(*blocks) -> list[dict]:
    return [{"name": n, "size_bytes": s, "guest_phys_addr": a} for n, s, a in blocks]


BAD_CONFIGS = {
    "memory as text": (_config(memory_bytes="64M"), "memory_bytes: '64M' is not int"),
    "memory not in pages": (_config(memory_bytes=64 * MiB + 1, blocks=_blocks(
        ("ram-low", 64 * MiB + 1, 0))), "memory_bytes: 67108865: not a multiple of 4096"),
    "vcpus as a boolean": (_config(vcpus=True), "vcpus: True is not int"),
    "no vcpus": (_config(vcpus=0), "vcpus: 0 is out of bounds [1, 4096]"),
    "params not an object": (_config(params=[1, 2]), "params: [1, 2] is not dict"),
    "no blocks": (_config(blocks=[{}]), "block 0 is not an object of exactly"),
    "too many blocks": (_config(memory_bytes=33 * 4096, blocks=_blocks(
        *((f"b{i}", 4096, i * 8192) for i in range(33)))), "33 RAM blocks, more than 8"),
    "overlapping blocks": (_config(blocks=_blocks(("a", 32 * MiB, 0),
                                                  ("b", 32 * MiB, 16 * MiB))),
                           "RAM blocks 'a' and 'b' overlap"),
    "block beyond the physical address space": (
        _config(blocks=_blocks(("a", 32 * MiB, 0), ("b", 32 * MiB, 1 << 60))),
        "block 1 is empty or ends above 0x10000000000000"),
    "block off a page boundary": (_config(blocks=_blocks(("a", 32 * MiB, 0),
                                                         ("b", 32 * MiB, 64 * MiB + 1))),
                                  "block 1's address 67108865 is not a page multiple"),
    "blocks that do not add up": (_config(blocks=_blocks(("a", 32 * MiB, 0))),
                                  "add up to 33554432 bytes, not the memory size"),
    "two blocks of one name": (_config(blocks=_blocks(("a", 32 * MiB, 0),
                                                      ("a", 32 * MiB, 64 * MiB))),
                               "two RAM blocks are named 'a'"),
    "a block name of control characters": (_config(blocks=_blocks(
        ("\x1b[2J", 64 * MiB, 0))), "printable ASCII"),
    "working set beyond RAM": (_config(params={"working_set_bytes": 1 << 30}),
                               "do not fit in one of the guest's RAM blocks"),
    "an unknown workload": (_config(workload="fork-bomb"), "workload: 'fork-bomb': not a workload this build knows"),
    "an image on a simulated guest": (_config(workload="image", params={
        "image": "x", "kind": "bootsector"}), "a user image runs only on a KVM guest"),
    "an image address that is not a number": (
        {**image_config(1), "params": {"image": "x", "kind": "flat", "load_address": "high"}},
        "'load_address' must be a 32-bit address"),
    "more vCPUs than the workloads run": (_config(vcpus=MAX_VCPUS + 1),
                                          f"accepts at most {MAX_VCPUS}"),
    "a configuration that is not an object": ([1, 2, 3], "is a JSON object, not list"),
}


@pytest.mark.parametrize("config,reason", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_a_configuration_no_guest_can_have_is_refused_before_anything_is_mapped(
        config, reason, tmp_path, allocations):
    destination = Destination(tmp_path, limits=DestinationLimits(
        accept_kinds=("kvm", "simulated")))
    text = offer(destination.uri, config)
    destination.join()
    assert reason in text
    assert reason in str(destination.error)
    assert allocations == []


def test_the_pc_layout_of_any_size_a_source_makes_passes_the_shape_check():
    for memory in (4096, 64 * MiB, 3 * GiB, 3 * GiB + 4096, 64 * GiB):
        config = GuestConfig("simulated", memory, workload="idle")
        assert GuestConfig.from_dict(config.to_dict()) == config
        assert config.blocks == pc_layout(memory)
