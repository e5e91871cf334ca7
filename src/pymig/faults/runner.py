"""The fault campaign: migrations of self-checking guests broken on purpose, at a chosen
moment, and what each left behind checked.

A trial is ``TRANSPORT:KIND:FAULT:PHASE:SEED``; its seed picks the moments (and the byte a
corruption flips), so the same id replays the same trial.  Each trial runs in its own
directory with fresh processes: a source (``pymig run --workload selfcheck``) and a
destination (``pymig incoming defer``, or, for ``file:``, ``pymig incoming file:PATH`` once
the snapshot exists), and, for tcp, unix, TLS and exec, the :class:`~pymig.faults.proxy.
FaultProxy` between them.  Phases are reached by watching, not by guessing: the source runs
with ``pause-before-switchover``, so ``pre-switchover`` is a state it waits in; the proxy
holds the first bytes after ``migrate-continue`` (``stop-and-copy``), the return path's
LOADED message (``loaded``: everything loaded, COMMIT not sent yet) and its ACK
(``committed``: the destination got COMMIT and runs its guest, the source does not know yet);
``setup`` is the first bytes of the connection, ``live`` a random moment of the first
iteration.  Each trial records the phase it really hit: the source's migration status read
while the proxy held the bytes (or, without a proxy, just before the fault).  The post-copy
phases (``postcopy-active``, ``postcopy-recover``, ``postcopy-preempt``) and what their trials
must leave are :mod:`pymig.faults.postcopy`'s.

What a trial must leave (``check``):

- exactly one guest running: the destination's once it got COMMIT (or, on a one-way channel,
  the whole stream), the source's otherwise; none only where the fault killed the process
  that held it;
- that guest's self-check clean: its error counter at zero and every page of its working set
  verified (the guest stopped for it, then continued);
- nothing leaked in a process that lives on: the source's descriptors and threads as before
  the migration, a destination's as after a clean migration of the same kind (calibrated per
  campaign), no socket file or temporary file left by it (each process has its own TMPDIR);
- the surviving guest migrates again (a ``file:`` snapshot, which leaves it running).

``file:`` has no proxy: ENOSPC comes from a small tmpfs the campaign mounts (root needed; the
free space left by a filler file sets where the write fails; at ``pre-switchover`` it is set
from what the snapshot has written so far); a corruption flips a byte of the finished file in
the part written in the phase named; the restoring process is killed while it restores.
A ``file:`` snapshot leaves the source running: there the check is that the source runs and
that the restored copy runs, verified, exactly when the file is whole and intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from pymig.faults import postcopy as pc_trials
from pymig.faults.proxy import FaultProxy, Trigger

TRANSPORTS = ("tcp", "unix", "tls", "exec", "file")
KINDS = ("kvm", "simulated")
SOCKET_FAULTS = ("cut", "cut-forward", "cut-return", "kill-dst", "kill-src", "stall", "corrupt")
PHASES = ("setup", "live", "pre-switchover", "stop-and-copy", "loaded", "committed")
#: After the switch to post-copy (pymig.faults.postcopy): tcp, unix and TLS (a return path).
POSTCOPY_PHASES = pc_trials.PHASES
#: Return-path message types (docs/stream-format.md) the proxy stops at.
LOADED, ACK = 8, 3
#: Their TLS 1.3 records' sizes: the 8-byte header (+16 for ACK), the inner content type byte
#: and the 16-byte AEAD tag.
TLS_LOADED_RECORD, TLS_ACK_RECORD = 8 + 17, 24 + 17
READY_TIMEOUT_S = 60.0


def combos(transports=TRANSPORTS, kinds=KINDS) -> list[tuple[str, str, str, str]]:
    """Every (transport, kind, fault, phase) the campaign covers."""
    out = []
    for transport in transports:
        for kind in kinds:
            if transport in ("tcp", "unix", "tls"):
                out += [(transport, kind, f, p) for f in SOCKET_FAULTS
                        for p in PHASES + POSTCOPY_PHASES]
                if transport == "tls":
                    out.append((transport, kind, "tls-handshake", "setup"))
            elif transport == "exec":
                out += [(transport, kind, f, p)
                        for f in ("cut", "kill-dst", "kill-src", "stall", "corrupt")
                        for p in ("setup", "live", "pre-switchover", "stop-and-copy")]
            else:
                out += [(transport, kind, "enospc", p)
                        for p in ("setup", "live", "stop-and-copy")]
                out += [(transport, kind, "kill-src", p)
                        for p in ("setup", "live", "pre-switchover", "stop-and-copy")]
                out += [(transport, kind, "corrupt", p)
                        for p in ("setup", "live", "stop-and-copy")]
                out.append((transport, kind, "kill-dst", "restore"))
    return out


@dataclass
class TrialResult:
    id: str
    transport: str
    kind: str
    fault: str
    phase: str
    seed: int
    hit: str = ""  # the phase really hit (the source's status then, or where the bytes were)
    detail: str = ""  # what the fault did: where the proxy stopped, the byte flipped...
    source: str = ""  # where the source ended: running, paused, postmigrate, dead...
    destination: str = ""
    outcome: str = ""  # which guest runs: source, destination, none (with a reason)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def correct(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        out = asdict(self)
        out["correct"] = self.correct
        return out


def _child_env(tmp: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["TMPDIR"] = tmp
    return env


def phase_hit(status: str, what: str = "") -> str:
    """The phase a fault hit, from the source's status at that moment and where the proxy
    stood: in ``device``, the destination's LOADED held back is ``loaded``, its ACK
    ``committed``."""
    if status == "device":
        if what in (f"return message {LOADED}", f"return record of {TLS_LOADED_RECORD}"):
            return "loaded"
        if what in (f"return message {ACK}", f"return record of {TLS_ACK_RECORD}"):
            return "committed"
        return "stop-and-copy"
    return {"active": "live"}.get(status, status)


def _counts(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def _fd_links(pid: int) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return links


def _describe(pid: int) -> str:
    """What a process's descriptors point at and its threads' names, for a report."""
    fds = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            fds.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    threads = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as handle:
                threads.append(handle.read().strip())
        except OSError:
            pass
    return f"fds {' '.join(fds)}; threads {' '.join(sorted(threads))}"


def _settled_counts(pid: int, want: tuple[int, int] | None, timeout: float = 10.0):
    """Descriptor and thread counts once a migration's threads and descriptors are gone (they
    go a moment after it reports): the lowest seen until they match ``want`` or ``timeout``."""
    deadline = time.monotonic() + timeout
    fds, threads = _counts(pid)
    while want is not None and (fds, threads) != want and time.monotonic() < deadline:
        time.sleep(0.05)
        f, t = _counts(pid)
        fds, threads = min(fds, f), min(threads, t)
    return fds, threads


class Proc:
    """A pymig process of a trial, with its control socket and its own TMPDIR."""

    def __init__(self, name: str, argv: list[str], directory: str):
        self.name = name
        self.control = os.path.join(directory, f"{name}.sock")
        self.tmp = os.path.join(directory, f"tmp-{name}")
        os.makedirs(self.tmp)
        with open(os.path.join(directory, f"{name}.log"), "wb") as log:
            self.proc = subprocess.Popen(argv + ["--control", self.control, "--quiet"],
                                         env=_child_env(self.tmp), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        self.client = None
        self.killed = False

    def connect(self, timeout: float = READY_TIMEOUT_S) -> None:
        from pymig.qmp import QmpClient, wait_for_socket

        wait_for_socket(self.control, self.proc, self.name, timeout)
        self.client = QmpClient(self.control, timeout=30)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def cmd(self, name: str, **args):
        return self.client.command(name, **args)

    def try_cmd(self, name: str, **args):
        if not self.alive or self.client is None:
            return None
        try:
            return self.client.command(name, **args)
        except Exception:  # noqa: BLE001 - a process that went away meanwhile
            return None

    def kill(self) -> None:
        self.killed = True
        try:
            self.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def end(self) -> None:
        if self.client is not None:
            if self.alive:
                self.try_cmd("quit")
            try:
                self.client.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(20)


class Campaign:
    """What trials share: the TLS credentials, the tmpfs for ENOSPC, the calibrated counts."""

    def __init__(self, root: str, *, memory: str = "64M", working_set: str = "8M",
                 rate: int = 5000, max_bandwidth: int = 64_000_000, say=lambda t: None):
        self.root = root
        self.memory = memory
        self.working_set = working_set
        self.rate = rate
        self.max_bandwidth = max_bandwidth
        self.say = say
        self.pki = None
        self.tmpfs = None
        self.tmpfs_bytes = 0
        self.dest_counts: dict[tuple[str, str], tuple[int, int]] = {}

    # -- resources

    def credentials(self) -> dict[str, str]:
        if self.pki is None:
            self.pki = make_pki(os.path.join(self.root, "pki"))
        return self.pki

    def enospc_dir(self) -> str:
        """A small tmpfs (mounted once, removed by :meth:`close`)."""
        if self.tmpfs is None:
            path = os.path.join(self.root, "tmpfs")
            os.makedirs(path, exist_ok=True)
            self.tmpfs_bytes = 48 << 20
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_bytes},mode=0700",
                            "pymig-faults", path], check=True, capture_output=True)
            self.tmpfs = path
        return self.tmpfs

    def close(self) -> None:
        if self.tmpfs is not None:
            subprocess.run(["umount", self.tmpfs], capture_output=True)
            self.tmpfs = None

    # -- processes

    def source_argv(self, kind: str, tls: str | None = None) -> list[str]:
        argv = [sys.executable, "-m", "pymig", "run", "--workload", "selfcheck", "--memory",
                self.memory, "--working-set", self.working_set]
        if kind == "simulated":
            argv += ["--simulated", "--rate", str(self.rate)]
        return argv + (["--tls-creds", tls] if tls else [])

    def dest_argv(self, kind: str, uri: str = "defer", tls: str | None = None,
                  authz: str | None = None, postcopy: str = "") -> list[str]:
        """``postcopy``: "" (none), "postcopy" or "preempt" (with postcopy-preempt)."""
        argv = [sys.executable, "-m", "pymig", "incoming", uri, "--accept-kind", kind,
                "--progress-timeout", "5"]
        argv += ["--postcopy"] if postcopy else []
        argv += ["--postcopy-preempt"] if postcopy == "preempt" else []
        argv += ["--tls-creds", tls] if tls else []
        return argv + (["--tls-authz", authz] if authz else [])

    # -- trials

    def run(self, transport: str, kind: str, fault: str, phase: str, seed: int) -> TrialResult:
        result = TrialResult(f"{transport}:{kind}:{fault}:{phase}:{seed}", transport, kind,
                             fault, phase, seed)
        directory = tempfile.mkdtemp(prefix="trial-", dir=self.root)
        began = time.monotonic()
        try:
            if transport == "file":
                FileTrial(self, result, directory).run()
            elif phase in POSTCOPY_PHASES:
                PostcopyTrial(self, result, directory).run()
            else:
                SocketTrial(self, result, directory).run()
        except Exception as exc:  # noqa: BLE001 - a trial that could not run is a failure
            result.problems.append(f"the trial failed to run: {type(exc).__name__}: {exc}")
        result.seconds = round(time.monotonic() - began, 2)
        if result.correct:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            result.detail += f" (kept: {directory})"
        return result


class _Trial:
    def __init__(self, campaign: Campaign, result: TrialResult, directory: str):
        self.c = campaign
        self.r = result
        self.dir = directory
        self.rng = random.Random(result.seed)
        self.procs: list[Proc] = []
        self.recover_uris: list[str] = []  # unix sockets a post-copy recovery listened on

    def spawn(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.dir)
        self.procs.append(proc)
        return proc

    def wait_status(self, proc: Proc, wanted: tuple[str, ...], timeout: float) -> str:
        """The source's migration status once it is one of ``wanted`` (or it ended, or the
        process died, or the time ran out)."""
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            info = proc.try_cmd("query-migrate")
            if info is None:
                return "dead" if not proc.alive else status
            status = info.get("status", "")
            if status in wanted or status in ("completed", "failed", "cancelled"):
                return status
            time.sleep(0.005)
        return status

    def running_counts(self, proc: Proc) -> tuple[int, int]:
        """A source's descriptors and threads once its guest runs: the control socket comes
        before the guest starts, and KVM starts a thread of its own (the NX huge page
        recovery worker) with the first vCPU run."""
        deadline = time.monotonic() + 30
        while proc.cmd("query-guest")["progress"]["passes"] < 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {proc.name} guest made no pass in 30 s")
            time.sleep(0.02)
        return _settled_counts(proc.proc.pid, None)

    def settled(self, proc: Proc, want: tuple[int, int] | None) -> tuple[int, int]:
        return _settled_counts(proc.proc.pid, want)

    def describe(self, proc: Proc) -> str:
        return _describe(proc.proc.pid)

    def check_clean_destination(self, dst: Proc) -> None:
        """A destination that runs the guest holds as many descriptors and threads as the
        first clean one of its transport and kind, no stray files, no socket file left."""
        r = self.r
        key = (r.transport, r.kind)
        counts = self.settled(dst, self.c.dest_counts.get(key))
        self.c.dest_counts.setdefault(key, counts)
        if counts != self.c.dest_counts[key]:
            r.problems.append(f"dst: descriptors/threads {counts}, a clean destination has "
                              f"{self.c.dest_counts[key]} ({self.describe(dst)})")
        self.check_files(dst)
        if os.path.exists(os.path.join(self.dir, "dst.mig")):
            r.problems.append("dst: its unix migration socket file is still there")

    def guest_state(self, proc: Proc) -> str:
        if not proc.alive:
            return "dead" if proc.killed else f"exited {proc.proc.returncode}"
        status = proc.try_cmd("query-status")
        return status["status"] if status else "no answer"

    def verify(self, proc: Proc) -> None:
        """The running guest's self-check: its counter, then every page (stopped meanwhile)."""
        guest = proc.cmd("query-guest")
        if guest["progress"]["errors"]:
            self.r.problems.append(f"{proc.name}: self-check counted "
                                   f"{guest['progress']['errors']} errors")
        proc.cmd("stop")
        report = proc.cmd("query-guest", verify=True)["selfcheck"]
        proc.cmd("cont")
        if not report["ok"]:
            self.r.problems.append(f"{proc.name}: self-check: {report['detail']}")

    def migrate_again(self, proc: Proc) -> None:
        path = os.path.join(proc.tmp, "..", f"again-{proc.name}.pymig")
        # (a file: snapshot takes neither pausing nor post-copy; a destination of a
        # post-copy has it on)
        proc.cmd("migrate-set-capabilities", capabilities=[
            {"capability": name, "state": False} for name in (
                "pause-before-switchover", "postcopy-preempt", "postcopy-ram")])
        proc.cmd("migrate-set-parameters", **{"tls-creds": "", "max-bandwidth": 0})
        proc.cmd("migrate", uri=f"file:{os.path.abspath(path)}")
        status = self.wait_status(proc, (), 60)
        if status != "completed":
            info = proc.try_cmd("query-migrate") or {}
            self.r.problems.append(f"{proc.name}: migrating again: {status} "
                                   f"{info.get('error-desc', '')}")
        elif self.guest_state(proc) != "running":
            self.r.problems.append(f"{proc.name}: not running after its snapshot")
        os.unlink(path) if os.path.exists(path) else None

    def check_files(self, proc: Proc, allowed: tuple[str, ...] = ()) -> None:
        left = [n for n in os.listdir(proc.tmp) if n not in allowed]
        if left:
            self.r.problems.append(f"{proc.name}: left in its TMPDIR: {left}")

    def end(self) -> None:
        for proc in self.procs:
            proc.end()


class SocketTrial(_Trial):
    """tcp, unix, TLS and exec: two processes, the proxy between them."""

    postcopy = False
    links = 1  # connections the proxy forwards
    recover_proxy: FaultProxy | None = None

    def run(self) -> None:
        r = self.r
        transport, kind, fault, phase = r.transport, r.kind, r.fault, r.phase
        tls = transport == "tls"
        pki = self.c.credentials() if tls else {}
        src_creds = pki.get("both") if tls else None
        authz = None
        if fault == "tls-handshake":
            variant = self.rng.choice(["unknown-ca", "plaintext-source", "wrong-host",
                                       "outside-authz"])
            r.detail = variant
            src_creds = {"unknown-ca": pki.get("other-ca"), "plaintext-source": None,
                         "wrong-host": pki["both"], "outside-authz": pki["both"]}[variant]
            if variant == "outside-authz":
                authz = "CN=someone.else*"
        mode = "" if not self.postcopy else \
            "preempt" if phase == "postcopy-preempt" else "postcopy"
        dst = self.spawn("dst", self.c.dest_argv(kind, tls=pki.get("both") if tls else None,
                                                 authz=authz, postcopy=mode))
        src = self.spawn("src", self.c.source_argv(kind, src_creds))
        self.proxy = None
        try:
            dst.connect()
            src.connect()
            proxy = self.setup_proxy(dst)
            if fault == "tls-handshake" and r.detail == "wrong-host":
                src.cmd("migrate-set-parameters", **{"tls-hostname": "not.this.host"})
            self.configure(src)
            baseline = self.running_counts(src)
            self.drive(src, dst, proxy)
            self.settle(src, dst, proxy)
            self.judge(src, dst, baseline)
        finally:
            for proxy in (self.proxy, self.recover_proxy):
                if proxy is not None:
                    proxy.close()
            self.end()

    def configure(self, src: Proc) -> None:
        src.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "pause-before-switchover", "state": True}])
        src.cmd("migrate-set-parameters", **{"max-bandwidth": self.c.max_bandwidth,
                                               "compression": "none"})

    def setup_proxy(self, dst: Proc) -> FaultProxy:
        r = self.r
        if r.transport == "exec":
            relay = os.path.join(self.dir, "relay")
            cmd = f"{sys.executable} -m pymig.faults.relay recv {relay}"
            dst.cmd("migrate-incoming", uri=f"exec:{cmd}")
            deadline = time.monotonic() + 30
            while not os.path.exists(relay):
                if time.monotonic() > deadline:
                    raise TimeoutError("the destination's relay did not listen")
                time.sleep(0.01)
            proxy = FaultProxy(os.path.join(self.dir, "proxy"), relay, return_path=False,
                               rng=self.rng)
            self.uri = (f"exec:{sys.executable} -m pymig.faults.relay send "
                        f"{os.path.join(self.dir, 'proxy')}")
        elif r.transport == "unix":
            upstream = os.path.join(self.dir, "dst.mig")
            dst.cmd("migrate-incoming", uri=f"unix:{upstream}")
            proxy = FaultProxy(os.path.join(self.dir, "proxy"), upstream, rng=self.rng,
                               links=self.links)
            self.uri = f"unix:{proxy.address}"
        else:
            bound = dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")["uri"]
            port = int(bound.rsplit(":", 1)[1])
            proxy = FaultProxy(("127.0.0.1", 0), ("127.0.0.1", port), tls=r.transport == "tls",
                               rng=self.rng, links=self.links)
            self.uri = f"tcp:127.0.0.1:{proxy.address[1]}"
        self.proxy = proxy
        return proxy

    def inject(self, src: Proc, dst: Proc, what: str) -> str:
        """The proxy's callback, run while it holds the bytes: record the phase hit, then
        kill a process or return the fault for the proxy to apply."""
        info = src.try_cmd("query-migrate")
        self.r.hit = self.r.hit or phase_hit(info.get("status", "") if info is not None else
                                             "dead", what)
        self.r.detail = (self.r.detail + " " if self.r.detail else "") + f"at {what}"
        fault = self.r.fault
        if fault == "kill-src":
            src.kill()
            return "pass"
        if fault == "kill-dst":
            dst.kill()
            return "pass"
        if fault == "tls-handshake":
            return "pass"
        return fault

    def drive(self, src: Proc, dst: Proc, proxy: FaultProxy) -> None:
        r = self.r
        phase, tls = r.phase, r.transport == "tls"
        callback = lambda what: self.inject(src, dst, what)  # noqa: E731
        if phase == "setup":
            # the connection accepted (for TLS, before the handshake), or its first bytes
            proxy.arm(Trigger("accept"), callback)
        src.cmd("migrate", uri=self.uri)
        if phase == "live":
            if self.wait_status(src, ("active",), 30) == "active":
                # a random moment of the first iterations: after this many bytes more
                proxy.arm(Trigger("forward", skip=self.rng.randrange(0, 256 << 10)), callback)
        if phase in ("setup", "live") or r.fault == "tls-handshake":
            if self.until_pre_switchover(src, proxy) == "pre-switchover":
                if phase == "live" and not proxy.fired.is_set():
                    proxy.arm(Trigger("forward"), callback)  # whatever comes next
                src.try_cmd("migrate-continue", state="pre-switchover")
            return
        status = self.until_pre_switchover(src, proxy)
        if status != "pre-switchover":
            r.problems.append(f"the migration never reached pre-switchover: {status}")
            return
        if phase == "pre-switchover":
            time.sleep(self.rng.uniform(0, 0.2))
            proxy.inject(self.inject(src, dst, "pre-switchover"))
        elif phase == "stop-and-copy":
            proxy.arm(Trigger("forward", skip=self.rng.randrange(0, 16 << 10)), callback)
        elif phase == "loaded":
            proxy.arm(Trigger("return-record", value=TLS_LOADED_RECORD) if tls else
                      Trigger("return-type", value=LOADED), callback)
        elif phase == "committed":
            proxy.arm(Trigger("return-record", value=TLS_ACK_RECORD) if tls else
                      Trigger("return-type", value=ACK), callback)
        src.try_cmd("migrate-continue", state="pre-switchover")

    def until_pre_switchover(self, src: Proc, proxy: FaultProxy) -> str:
        """The source's status once it waits for migrate-continue, ended, or, once the fault
        fired, stopped moving for a while (it may wait on a peer that cannot answer)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = 3.0 if proxy.fired.is_set() else deadline - time.monotonic()
            status = self.wait_status(src, ("pre-switchover",), min(left, 0.5))
            if status in ("pre-switchover", "completed", "failed", "cancelled", "dead"):
                return status
            if proxy.fired.is_set():
                fired_for = time.monotonic() - self.fired_since(proxy)
                if fired_for > 3.0:
                    return status
        return status

    def fired_since(self, proxy: FaultProxy) -> float:
        if not hasattr(proxy, "fired_t"):
            proxy.fired_t = time.monotonic()
        return proxy.fired_t

    def settle(self, src: Proc, dst: Proc, proxy: FaultProxy) -> None:
        """Wait for both ends to have decided.  A migration still under way three seconds
        after the fault (a stall, a return path cut: the source waits for its peer, 60 s)
        gets the operator's answer, a cancel; then the connection ends, as a dead network's
        timeouts would end it."""
        r = self.r
        ended = ("completed", "failed", "cancelled", "dead")
        deadline = time.monotonic() + 30.0
        status = ""
        while time.monotonic() < deadline:
            status = self.wait_status(src, (), 0.2)
            if status in ended or (proxy.fired.is_set()
                                   and time.monotonic() - self.fired_since(proxy) > 3.0):
                break
        if status not in ended:
            r.detail += f"; cancelled in {status}"
            src.try_cmd("migrate_cancel")
            status = self.wait_status(src, (), 5.0)
        proxy.close()
        status = self.wait_status(src, (), 15.0)
        if status not in ended:
            r.problems.append(f"the source's migration did not end: {status}")
        # the destination: running, or gone (its progress timeout is 5 s)
        deadline = time.monotonic() + 30
        while dst.alive and time.monotonic() < deadline:
            state = self.guest_state(dst)
            info = dst.try_cmd("query-migrate") or {}
            if state == "running" or info.get("status") in ("failed", "cancelled"):
                break
            time.sleep(0.02)
        if dst.alive and self.guest_state(dst) != "running":
            _wait_quietly(dst.proc, 5)
        if not proxy.fired.is_set():
            r.hit = r.hit or "not reached"

    def judge(self, src: Proc, dst: Proc, baseline: tuple[int, int]) -> None:
        r = self.r
        time.sleep(0.1)
        r.source, r.destination = self.guest_state(src), self.guest_state(dst)
        src_runs, dst_runs = r.source == "running", r.destination == "running"
        fired = self.proxy.fired_at or ""
        info = src.try_cmd("query-migrate") or {}
        # Committed: the proxy held the destination's ACK (it had COMMIT and ran its guest),
        # or the source says so (with a return path, it had the ACK; on a one-way channel
        # its own end of the stream was the commit).
        committed = fired in (f"return message {ACK}", f"return record of {TLS_ACK_RECORD}") \
            or info.get("status") == "completed"
        r.outcome = "both" if src_runs and dst_runs else "source" if src_runs else \
            "destination" if dst_runs else "none"
        if src_runs and dst_runs:
            r.problems.append("the guest runs on both sides")
        elif committed:
            if src_runs:
                r.problems.append("the source resumed after the commit")
            if not dst_runs and not dst.killed:
                r.problems.append(f"the destination does not run its guest after the commit "
                                  f"({r.destination})")
        else:
            if dst_runs:
                r.problems.append("the destination runs a guest the source never committed")
            if not src_runs and dst.killed and src.alive and r.source == "paused" \
                    and "did not confirm" in info.get("error-desc", ""):
                # The destination died with LOADED on its way: the source sent COMMIT before
                # it saw the connection end, and cannot know whether COMMIT arrived, so it
                # keeps the guest paused rather than risk two.  The operator, who knows the
                # destination is gone, resumes it (QEMU's answer too).
                src.cmd("cont")
                r.source = self.guest_state(src)
                src_runs = r.source == "running"
                r.outcome = "source, resumed by cont"
            if not src_runs and not src.killed:
                r.problems.append(f"the source does not run its guest ({r.source}: "
                                  f"{info.get('error-desc', '')})")
        if dst.alive and not dst_runs:
            r.problems.append(f"the destination lives on without a guest ({r.destination})")
        for proc, runs in ((src, src_runs), (dst, dst_runs)):
            if runs:
                self.verify(proc)
        if src.alive and src.killed is False:
            counts = _settled_counts(src.proc.pid, baseline)
            if counts != baseline:
                r.problems.append(f"src: descriptors/threads {baseline} -> {counts} "
                                  f"({_describe(src.proc.pid)})")
            self.check_files(src)
        if dst_runs:
            self.check_clean_destination(dst)
        for proc, runs in ((src, src_runs), (dst, dst_runs)):
            if runs:
                self.migrate_again(proc)


class PostcopyTrial(pc_trials.PostcopyTrialMixin, SocketTrial):
    """tcp, unix and TLS with post-copy: a fault after the switch (pymig.faults.postcopy)."""

    @property
    def links(self) -> int:
        return 2 if self.r.phase == "postcopy-preempt" else 1


class FileTrial(_Trial):
    """file: a snapshot (the source runs on), then a restore in a new process."""

    def run(self) -> None:
        r = self.r
        fault, phase = r.fault, r.phase
        directory = self.c.enospc_dir() if fault == "enospc" else self.dir
        path = os.path.join(directory, f"snap-{r.seed}.pymig")
        filler = os.path.join(directory, "filler")
        src = self.spawn("src", self.c.source_argv(r.kind))
        try:
            src.connect()
            src.cmd("migrate-set-parameters", **{"max-bandwidth": self.c.max_bandwidth,
                                                   "compression": "none"})
            baseline = self.running_counts(src)
            if fault == "enospc":
                # the free space is set from this guest's own snapshot size, taken first
                size = self.calibrate(src, directory)
                # tmpfs counts whole pages: none free fails the stream's first write (its
                # header, in setup); one or more lets the header, the configuration and the
                # RAM section's start (under 1 KiB) through, and fails in the RAM pages
                free = 0 if phase == "setup" else self.rng.randrange(
                    4096, max(size // 2, 4097)) if phase == "live" else 16 << 20
                _fill(filler, directory, free)
            src.cmd("migrate-set-capabilities", capabilities=[
                {"capability": "pause-before-switchover", "state": True}])
            src.cmd("migrate", uri=f"file:{path}")
            status = self.wait_status(src, ("active",), 30)
            first_active = _written(directory)
            if fault == "kill-src" and phase in ("setup", "live"):
                if phase == "live":
                    time.sleep(self.rng.uniform(0, 0.01))
                r.hit = phase_hit((src.try_cmd("query-migrate") or {}).get("status", "") or status)
                src.kill()
            status = self.wait_status(src, ("pre-switchover",), 30)
            if fault == "enospc" and status in ("failed", "cancelled"):
                r.hit = "setup" if free < 4096 else "live"
            elif not r.hit:
                r.hit = phase_hit(status)
            at_pause = _written(directory)
            if status == "pre-switchover":
                if fault == "kill-src" and phase == "pre-switchover":
                    src.kill()
                if fault == "enospc" and phase == "stop-and-copy":
                    # what is left to write is small now: room for a random part of a page
                    _fill(filler, directory, self.rng.randrange(0, 4096))
                    r.hit = "stop-and-copy"
                src.try_cmd("migrate-continue", state="pre-switchover")
                if fault == "kill-src" and phase == "stop-and-copy":
                    r.hit = phase_hit(self.wait_status(src, ("device",), 5))
                    src.kill()
            final = self.wait_status(src, (), 60)
            info = src.try_cmd("query-migrate") or {}
            r.detail = (f"written at first active {first_active}, at pre-switchover "
                        f"{at_pause}; {final} {info.get('error-desc', '')}").strip()
            # (a snapshot can be done before the kill reaches it: then it is whole)
            complete = final == "completed" or r.hit == "completed"
            if fault == "enospc" and r.hit == "pre-switchover" and not complete:
                r.hit = "stop-and-copy"  # it failed once continued
            if not r.outcome:
                r.outcome = "source" if not src.killed else "none"
            if os.path.exists(filler):
                os.unlink(filler)
            if fault == "enospc" and complete:
                r.problems.append("the snapshot completed on a full file system")
            if fault == "corrupt" and complete:
                size = os.path.getsize(path)
                lo, hi = {"setup": (0, max(first_active, 64)),
                          "live": (first_active, at_pause),
                          "stop-and-copy": (at_pause, size)}[phase]
                at = self.rng.randrange(lo, max(hi, lo + 1))
                flip = self.rng.randrange(1, 256)
                with open(path, "r+b") as handle:
                    handle.seek(at)
                    byte = handle.read(1)[0]
                    handle.seek(at)
                    handle.write(bytes([byte ^ flip]))
                r.detail += f"; flipped byte {at} of {size} by {flip:#x}"
                r.hit = phase if lo <= at < hi else "elsewhere"
            # the source: a snapshot leaves it running, whatever happened to the file
            r.source = self.guest_state(src)
            if not src.killed:
                if r.source != "running":
                    r.problems.append(f"the source does not run after its snapshot "
                                      f"({r.source})")
                else:
                    self.verify(src)
                counts = _settled_counts(src.proc.pid, baseline)
                if counts != baseline:
                    r.problems.append(f"src: descriptors/threads {baseline} -> {counts}")
                self.check_files(src)
                temps = [n for n in os.listdir(directory)
                         if n not in (os.path.basename(path), "filler")
                         and not n.startswith(("trial-", "src", "tmp-", "dst"))]
                temps = [n for n in temps if not n.endswith((".log", ".sock"))]
                if temps:
                    r.problems.append(f"src: left beside the snapshot: {temps}")
            elif os.path.exists(path) and not complete:
                r.problems.append("a source killed mid-snapshot left a snapshot in place")
            self.restore(path, whole=complete)
            if not src.killed and r.source == "running":
                self.migrate_again(src)
        finally:
            self.end()
            for leftover in os.listdir(directory) if fault == "enospc" else ():
                os.unlink(os.path.join(directory, leftover))

    def calibrate(self, src: Proc, directory: str) -> int:
        """The size of a snapshot of this source now (removed again)."""
        path = os.path.join(directory, "calibration.pymig")
        src.cmd("migrate", uri=f"file:{path}")
        if self.wait_status(src, (), 60) != "completed":
            raise RuntimeError("the calibration snapshot failed")
        size = os.path.getsize(path)
        os.unlink(path)
        # its space comes back only once the source closed it, a moment after it reports:
        # the free space set after that must stay as set
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                directory in link for link in _fd_links(src.proc.pid)):
            time.sleep(0.01)
        return size

    def restore(self, path: str, whole: bool) -> None:
        r = self.r
        if not os.path.exists(path):
            r.destination = "no file"
            return
        dst = self.spawn("dst", self.c.dest_argv(r.kind, f"file:{path}"))
        if r.fault == "kill-dst":
            time.sleep(self.rng.uniform(0.05, 0.6))
            r.hit = "restore" if dst.alive else "restored before the kill"
            dst.kill()
            r.destination = "dead"
            return
        try:
            dst.connect()
        except Exception:  # noqa: BLE001 - it refused the file before serving
            pass
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = self.guest_state(dst)
            if state in ("running",) or not dst.alive:
                break
            time.sleep(0.02)
        r.destination = state
        if state == "running":
            self.verify(dst)
            if not whole:
                r.problems.append("a guest restored from an incomplete snapshot")
            r.outcome = "source and its restored copy"
        else:
            if whole and r.fault != "corrupt":
                r.problems.append(f"a whole snapshot was not restored ({state})")
            r.outcome = "source" if r.source == "running" else "none"


def _wait_quietly(proc, timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _written(directory: str) -> int:
    """Bytes of snapshot written so far in ``directory`` (the temporary file or the file)."""
    total = 0
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if name != "filler" and os.path.isfile(full) and (".pymig" in name or "tmp" in name):
            total += os.path.getsize(full)
    return total


def _fill(path: str, directory: str, free_bytes: int) -> None:
    """Grow or shrink the filler so that ``free_bytes`` are left on the file system."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    size = os.path.getsize(path) if os.path.exists(path) else 0
    target = max(size + free - free_bytes, 0)
    with open(path, "ab") as handle:
        if target < size:
            handle.truncate(target)
        else:
            block = b"\xa5" * (1 << 20)
            remaining = target - size
            try:
                while remaining > 0:
                    remaining -= handle.write(block[:min(remaining, len(block))])
            except OSError:
                pass


def make_pki(directory: str) -> dict[str, str]:
    """Credentials with openssl: ``both`` (a CA, a server pair for 127.0.0.1/localhost, a
    client pair, CN=src.example), ``other-ca`` (a client pair from a CA nobody trusts)."""
    os.makedirs(directory, exist_ok=True)
    out = {}
    for name in ("both", "other-ca"):
        d = os.path.join(directory, name)
        os.makedirs(d, exist_ok=True)
        ca_key = os.path.join(directory, f"{name}-ca-key.pem")

        def run(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "30", "-subj", f"/O=Faults/CN={name} CA", "-keyout", ca_key,
            "-out", os.path.join(d, "ca-cert.pem"))
        exts = {"server": "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                          "extendedKeyUsage=serverAuth\n",
                "client": "extendedKeyUsage=clientAuth\n"}
        for role, cn in (("server", "localhost"), ("client", "src.example")):
            ext = os.path.join(directory, f"{name}-{role}.ext")
            with open(ext, "w") as handle:
                handle.write(exts[role])
            csr = os.path.join(directory, f"{name}-{role}.csr")
            run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-subj", f"/O=Faults/CN={cn}", "-keyout", os.path.join(d, f"{role}-key.pem"),
                "-out", csr)
            run("x509", "-req", "-in", csr, "-CA", os.path.join(d, "ca-cert.pem"), "-CAkey",
                ca_key, "-CAcreateserial", "-days", "30", "-extfile", ext,
                "-out", os.path.join(d, f"{role}-cert.pem"))
        out[name] = d
    return out


def plan(count: int, seed: int, transports=TRANSPORTS, kinds=KINDS,
         faults: tuple[str, ...] = (), phases: tuple[str, ...] = ()) -> list[tuple]:
    """``count`` trials: every combination (of ``faults`` and ``phases`` only, if given) in
    turn (shuffled by ``seed``), each with its own seed derived from the campaign's."""
    rng = random.Random(seed)
    every = [c for c in combos(transports, kinds)
             if (not faults or c[2] in faults) and (not phases or c[3] in phases)]
    if not every:
        raise ValueError(f"no trial of {', '.join(faults or ('any fault',))} at "
                         f"{', '.join(phases or ('any phase',))} over {', '.join(transports)}")
    trials = []
    while len(trials) < count:
        batch = list(every)
        rng.shuffle(batch)
        trials += [(*c, rng.randrange(1 << 31)) for c in batch]
    return trials[:count]


def parse_id(text: str) -> tuple[str, str, str, str, int]:
    transport, kind, fault, phase, seed = text.split(":")
    return transport, kind, fault, phase, int(seed)


def summary(results: list[dict]) -> str:
    """A table: trials and correct ones per fault × the phase really hit (the phase aimed at
    where none was recorded), a column per transport."""
    cells: dict[tuple[str, str], dict[str, list[int]]] = {}
    transports = sorted({r["transport"] for r in results}, key=lambda t: (
        TRANSPORTS.index(t) if t in TRANSPORTS else 99))
    for r in results:
        cell = cells.setdefault((r["fault"], r.get("hit") or r["phase"]), {})
        counts = cell.setdefault(r["transport"], [0, 0])
        counts[0] += 1
        counts[1] += bool(r["correct"])
    lines = ["| fault | phase | " + " | ".join(transports) + " |",
             "|---|---|" + "---|" * len(transports)]
    order = list(SOCKET_FAULTS) + ["tls-handshake", "enospc"]
    phases = PHASES + POSTCOPY_PHASES
    for (fault, phase) in sorted(cells, key=lambda k: (
            order.index(k[0]) if k[0] in order else 99,
            phases.index(k[1]) if k[1] in phases else 99)):
        row = cells[(fault, phase)]
        lines.append(f"| {fault} | {phase} | " + " | ".join(
            f"{row[t][1]}/{row[t][0]}" if t in row else "" for t in transports) + " |")
    total = len(results)
    good = sum(bool(r["correct"]) for r in results)
    on_target = sum((r.get("hit") or r["phase"]) == r["phase"] for r in results)
    lines.append(f"\n{good}/{total} trials correct; {on_target} hit the phase aimed at")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pymig.faults",
                                     description="the fault campaign (see the module's text)")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--transport", action="append", choices=TRANSPORTS)
    parser.add_argument("--kind", action="append", choices=("kvm", "simulated"))
    parser.add_argument("--fault", action="append",
                        choices=SOCKET_FAULTS + ("tls-handshake", "enospc"),
                        help="only this fault (again for more)")
    parser.add_argument("--phase", action="append",
                        choices=PHASES + POSTCOPY_PHASES + ("restore",),
                        help="only this phase (again for more)")
    parser.add_argument("--replay", action="append", metavar="ID",
                        help="run this trial (TRANSPORT:KIND:FAULT:PHASE:SEED) again")
    parser.add_argument("--out", metavar="JSONL", help="append a JSON line per trial")
    parser.add_argument("--summary", metavar="JSONL", help="only print the table of a run")
    parser.add_argument("--dir", help="where the trials run (default: a new temporary one)")
    args = parser.parse_args(argv)
    if args.summary:
        with open(args.summary) as handle:
            print(summary([json.loads(line) for line in handle if line.strip()]))
        return 0
    kinds = tuple(args.kind or ("kvm", "simulated"))
    if "kvm" in kinds and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        kinds = tuple(k for k in kinds if k != "kvm") or ("simulated",)
    try:
        trials = [parse_id(t) for t in args.replay] if args.replay else \
            plan(args.trials, args.seed, tuple(args.transport or TRANSPORTS), kinds,
                 tuple(args.fault or ()), tuple(args.phase or ()))
    except ValueError as exc:
        parser.error(str(exc))
    # SIGTERM ends the campaign through its cleanup (the tmpfs unmounted, processes ended)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    if os.geteuid() != 0 and any(t[2] == "enospc" for t in trials):
        print("not root: the ENOSPC trials (a tmpfs to mount) are left out",
              file=sys.stderr)
        trials = [t for t in trials if t[2] != "enospc"]
    root = tempfile.mkdtemp(prefix="pymig-faults-", dir=args.dir)
    campaign = Campaign(root, say=lambda t: print(t, file=sys.stderr, flush=True))
    results = []
    out = open(args.out, "a") if args.out else None
    try:
        for i, trial in enumerate(trials):
            result = campaign.run(*trial)
            results.append(result.to_dict())
            line = json.dumps(result.to_dict())
            if out:
                out.write(line + "\n")
                out.flush()
            print(f"[{i + 1}/{len(trials)}] {result.id} hit={result.hit} "
                  f"{'ok' if result.correct else 'FAILED: ' + '; '.join(result.problems)} "
                  f"({result.outcome}, {result.seconds} s)", file=sys.stderr, flush=True)
    finally:
        campaign.close()
        if out:
            out.close()
        if all(r["correct"] for r in results):
            shutil.rmtree(root, ignore_errors=True)
    print(summary(results))
    return 0 if all(r["correct"] for r in results) else 1
