"""Helpers for migration tests: guests of either kind, and a source and a destination in one
process (threads) or in two (subprocesses through the CLI)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

from _childenv import child_env

from pymig.guest import GuestConfig, create
from pymig.incoming import Incoming
from pymig.limits import DestinationLimits
from pymig.machine import Machine
from pymig.migration import Migration
from pymig.parameters import ParameterStore
from pymig.qmp import QmpClient

MiB = 1 << 20

GUEST_KINDS = [
    pytest.param("simulated", id="simulated"),
    pytest.param("kvm", id="kvm", marks=pytest.mark.kvm),
]
# A destination that takes either kind of guest (by default a KVM host takes KVM guests only)
ANY_KIND = DestinationLimits(accept_kinds=("kvm", "simulated"))
ANY_KIND_ARGS = ("--accept-kind", "kvm,simulated")


def block_digests(blocks) -> list[str]:
    """A digest per RAM block of its whole content, to compare source and destination."""
    import xxhash

    return [xxhash.xxh3_128_hexdigest(b.mem) for b in blocks]


def guest_config(kind: str, workload: str = "selfcheck", *, memory: int = 64 * MiB,
                 working_set: int = 16 * MiB, rate: int | None = None, vcpus: int = 1,
                 **params) -> GuestConfig:
    if workload in ("selfcheck", "dirtier"):
        params.setdefault("working_set_bytes", working_set)
        # the simulated writer flat out (~60M pages/s) never converges; KVM flat out does
        params.setdefault("rate_pages_per_s", rate if rate is not None
                          else (100_000 if kind == "simulated" else 0))
    return GuestConfig(kind, memory, vcpus=vcpus, workload=workload, params=params)


def running_guest(config: GuestConfig, *, min_passes: int = 1, timeout: float = 30.0,
                  **options):
    guest = create(config, **options)
    guest.start()
    deadline = time.monotonic() + timeout
    while config.workload == "selfcheck" and guest.progress()["passes"] < min_passes:
        assert time.monotonic() < deadline, "the guest made no progress"
        time.sleep(0.01)
    return guest


@pytest.fixture
def guests():
    """Running guests made by a test, ``guests(config, **create_options)``, closed after it."""
    made = []

    def make(config: GuestConfig, **options):
        made.append(running_guest(config, **options))
        return made[-1]

    yield make
    for guest in made:
        guest.close()


@dataclass
class LocalMigration:
    """A finished in-process migration: both sides and what was recorded at switchover."""

    migration: Migration
    incoming: Incoming
    result: object | None
    error: BaseException | None
    digests_at_load: list[str] = field(default_factory=list)

    @property
    def destination(self):
        return self.result.machine.guest if self.result is not None else None

    def __enter__(self) -> "LocalMigration":
        return self

    def __exit__(self, *exc) -> None:
        if self.destination is not None:
            self.destination.close()


def assert_consistent(guest) -> None:
    """Pause a self-checking guest and check every page of its working set."""
    from pymig.guest.workloads import verify_selfcheck

    guest.pause()
    report = verify_selfcheck(guest)
    assert report.ok and report.errors == 0, report.detail


def assert_arrived_and_runs(done: "LocalMigration", source):
    """The migration completed, the destination held every page the source had at the
    switchover before its vCPUs ran, and its guest runs on, consistent; returns that guest."""
    assert done.error is None, done.error
    assert done.migration.query()["status"] == "completed"
    guest = done.destination
    assert done.digests_at_load == block_digests(source.ram_blocks)
    passes = guest.progress()["passes"]
    wait_for(lambda: guest.progress()["passes"] > passes, what="the guest to run")
    assert_consistent(guest)
    return guest


def save_snapshot(path, config: GuestConfig) -> dict:
    """Run a guest for ``config``, save it live to ``path`` (file:), return the stats."""
    guest = running_guest(config)
    try:
        migration = Migration(Machine.source(guest))
        migration.start(f"file:{path}")
        assert migration.wait(60).value == "completed", migration.query()
        return migration.query()
    finally:
        guest.close()


def migrate_locally(guest, uri: str, *, params: dict | None = None,
                    capabilities: dict | None = None, timeout: float = 120.0,
                    decide=None, during=None, trace_path: str | None = None,
                    digests: bool = True, guest_options: dict | None = None,
                    limits: DestinationLimits = ANY_KIND,
                    progress_timeout: float | None = 60.0, tls=None,
                    credentials=None, before_start=None,
                    start_options: dict | None = None) -> LocalMigration:
    """Migrate ``guest`` to a destination in this process (its guest built with
    ``guest_options``, within ``limits``); ``during(migration)`` runs in the test's thread
    once the migration is under way.  ``tls``: the destination's (credentials, tls-authz);
    ``credentials``: the CredentialStore the source's tls-creds parameter names;
    ``before_start(machine)``: called at the destination once everything is loaded, before its
    guest runs; ``start_options``: more arguments for :meth:`Migration.start`."""
    at_load: list[str] = []

    def loaded(machine) -> None:
        if digests:
            at_load.extend(block_digests(machine.guest.ram_blocks))
        if before_start is not None:
            before_start(machine)

    incoming = Incoming(uri, accept_timeout=timeout, guest_options=guest_options,
                        limits=limits, progress_timeout=progress_timeout, tls=tls,
                        before_start=loaded if digests or before_start else None)
    bound = incoming.listen()
    box: dict = {}

    def destination() -> None:
        try:
            box["result"] = incoming.run()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            box["error"] = exc

    thread = threading.Thread(target=destination, daemon=True)
    thread.start()
    store = ParameterStore()
    if params:
        store.set(**params)
    if capabilities:
        store.set_capabilities(**capabilities)
    kwargs = {"decide": decide} if decide is not None else {}
    migration = Migration(Machine.source(guest), store, credentials=credentials, **kwargs)
    migration.start(bound, trace_path=trace_path, **(start_options or {}))
    if during is not None:
        during(migration)
    migration.wait(timeout)
    assert migration.status.value in ("completed", "failed", "cancelled"), \
        f"migration still {migration.status.value} after {timeout} s"
    thread.join(timeout)
    assert not thread.is_alive(), "the destination did not finish"
    return LocalMigration(migration, incoming, box.get("result"), box.get("error"), at_load)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.01, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pymig_process(*args: str, **popen) -> subprocess.Popen:
    """``python -m pymig ARGS`` in a child process (inheriting this interpreter and path)."""
    return subprocess.Popen([sys.executable, "-m", "pymig", *args], env=child_env(),
                            stdin=subprocess.DEVNULL, **popen)


def wait_for_path(path: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            out = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {path}: {out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


RATE = {"simulated": "100000", "kvm": "0"}


def start_source(kind, tmp_path, *, memory="128M", working_set="32M", rate=None, vcpus=1,
                 extra=(), **popen):
    """``pymig run`` with the self-checking workload; returns (process, control path)."""
    ctl = str(tmp_path / "src.sock")
    args = ["run", "--workload", "selfcheck", "--memory", memory, "--working-set", working_set,
            "--rate", rate or RATE[kind], "--vcpus", str(vcpus), "--control", ctl, "--quiet",
            "--serial", str(tmp_path / "src-serial.log"), *extra]
    if kind == "simulated":
        args.append("--simulated")
    popen.setdefault("stderr", subprocess.PIPE)
    proc = pymig_process(*args, **popen)
    wait_for_path(ctl, proc)
    return proc, ctl


def start_destination(tmp_path, uri="tcp:127.0.0.1:0", *extra, **popen):
    """``pymig incoming URI`` (taking either kind of guest unless ``extra`` says which);
    returns (process, control path, the address it receives on)."""
    ctl = str(tmp_path / "dst.sock")
    popen.setdefault("stderr", subprocess.PIPE)
    if "--accept-kind" not in extra:
        extra = (*ANY_KIND_ARGS, *extra)
    proc = pymig_process("incoming", uri, "--control", ctl, "--quiet",
                         "--serial", str(tmp_path / "dst-serial.log"), *extra, **popen)
    wait_for_path(ctl, proc)
    with QmpClient(ctl) as client:
        bound = client.command("query-migrate").get("socket-address")
    return proc, ctl, bound


def finish(*procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def guest_passes(ctl):
    with QmpClient(ctl) as client:
        return client.command("query-guest")["progress"]["passes"]




def run_pymig(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """``python -m pymig ARGS`` to completion, output captured as text."""
    return subprocess.run([sys.executable, "-m", "pymig", *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(), stdin=subprocess.DEVNULL)


def e2e_kind() -> str:
    """The guest kind for end-to-end tests: KVM where /dev/kvm works, else the simulated one."""
    from conftest import kvm_unusable_reason

    return "kvm" if kvm_unusable_reason() is None else "simulated"


def assert_carries_on(ctl: str, *, at_least: int = 0) -> dict:
    """The guest behind ``ctl`` runs: its passes grow from at least ``at_least``, and stopped,
    its self-check finds every page consistent.  Returns its progress."""
    with QmpClient(ctl) as client:
        wait_for(lambda: client.command("query-status")["status"] == "running", timeout=60,
                 what="the guest to run (a destination loads it first)")
        first = client.command("query-guest")["progress"]["passes"]
        assert first >= at_least, (first, at_least)
        wait_for(lambda: client.command("query-guest")["progress"]["passes"] > first,
                 what="the guest's passes to grow")
        client.command("stop")
        report = client.command("query-guest", verify=True)
        assert report["selfcheck"]["ok"], report["selfcheck"]
        assert report["progress"]["errors"] == 0
        client.command("cont")
        return report["progress"]


def announced_port(proc, timeout: float = 30.0) -> int:
    """The port ``--control-tcp 0`` chose, from the process's stderr."""
    deadline = time.monotonic() + timeout
    text = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.1)
        if ready:
            text += os.read(proc.stderr.fileno(), 4096)
            for line in text.decode(errors="replace").splitlines():
                if line.startswith("[pymig] control socket on tcp:"):
                    return int(line.rsplit(":", 1)[1])
    raise AssertionError(f"no control socket announced: {text!r}")
