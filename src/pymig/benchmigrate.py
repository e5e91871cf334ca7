"""Migration benchmarks as users run migrations: a source process and a destination process
talking over loopback TCP, driven through their control sockets.

Each run of a :class:`Scenario`::

    source process  (python -m pymig.benchmigrate source ...: builds the guest, starts it and
                     serves it exactly as ``pymig run --control`` does, through
                     pymig.session.Session and pymig.process.serve)
    destination     (python -m pymig incoming tcp:127.0.0.1:0 --control ...: the real CLI)
    this process    sets the parameters and capabilities over QMP, resets the source's peak
                    RSS (/proc/PID/clear_refs), sends ``migrate``, waits for the MIGRATION
                    event that ends it, reads ``query-migrate``, the source's peak RSS, and
                    (when the scenario compares with it) the raw loopback socket ceiling
                    measured right after, in the same run

and :func:`run_scenario` repeats it and reports medians and each figure's ratio to its target
(a ratio <= 1 meets an "at most" target, >= 1 an "at least" one).

Two ceilings are measured right after each run of a scenario that compares with them, over the
same loopback, between this process and a fresh child process:

* ``ceiling_bps``: a plain ``sendall`` loop of 1 MiB writes into a receiver that reuses one
  4 MiB buffer (:func:`pymig.transport.ceiling.raw_socket_throughput`), the issue's ceiling;
* ``fresh_ceiling_bps``: the same sender into a receiver that receives into a fresh mapping of
  the guest's RAM size (transparent huge pages, as a destination's RAM), so it pays the first
  touch of new memory exactly once per byte, as any destination must.  Measured right after
  the run's processes freed theirs, it gets memory freed a moment ago, the host's fast case;
  ``fresh-memory`` below measures the cold one too.

    python -m pymig.benchmigrate bench [SCENARIO ...] [--runs N] [--json] [--verbose]
                                       [--tls-creds DIR]   (for the *-tls scenarios)
    python -m pymig.benchmigrate tls [SCENARIO] --tls-creds DIR [--runs N]
    python -m pymig.benchmigrate fresh-memory [--size 1G] [--idle 40] [--runs 3]

``tls`` runs a scenario and its TLS twin in turns and prints the ratio of their throughputs
and the TLS set-up time (:func:`tls_comparison`).

The second measures what this host's fresh memory allows any destination, cold and warm
(:func:`fresh_memory_ceilings`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Target:
    """One figure's target: ``at_most`` (ratio = value / limit) or ``at_least``
    (ratio = value / limit, where the limit may be relative to a ceiling)."""

    figure: str
    limit: float
    kind: str = "at_most"  # "at_most" | "at_least"
    relative_to: str | None = None  # a figure the limit is a share of (e.g. the ceiling)

    def limit_value(self, figures: dict[str, float]) -> float:
        if self.relative_to is None:
            return self.limit
        return self.limit * figures[self.relative_to]

    def ratio(self, figures: dict[str, float]) -> float:
        limit = self.limit_value(figures)
        value = figures[self.figure]
        return value / limit if limit else math.inf

    def met(self, figures: dict[str, float]) -> bool:
        ratio = self.ratio(figures)
        return ratio <= 1.0 if self.kind == "at_most" else ratio >= 1.0


@dataclass(frozen=True)
class Scenario:
    """A guest, migration settings and the targets its figures are held to."""

    name: str
    memory_bytes: int
    workload: str = "idle"
    params: dict[str, Any] = field(default_factory=dict)
    kind: str = "kvm"  # "kvm" | "simulated" | "auto" (KVM where /dev/kvm works)
    vcpus: int = 1
    downtime_limit_ms: int = 300
    max_bandwidth: int = 0
    auto_converge: bool = False
    throttle_mode: str = "step"  # x-cpu-throttle-mode, with auto_converge
    warmup_s: float = 0.3  # the workload runs this long before the migration starts
    ceiling: bool = False  # measure the raw loopback socket ceiling in each run
    timeout_s: float = 120.0
    targets: tuple[Target, ...] = ()
    description: str = ""
    destination_backing: str = "anon"  # the destination's guest RAM (pymig incoming --mem-backing)
    destination_prealloc: bool = False  # ... made ready before the migration (--mem-prealloc)
    compression: str = "lz4"  # the migration parameter
    tls: bool = False  # over TLS (run_once's tls_creds: both processes' credentials)


# Figures every run reports (ms, bytes, bytes/s, or a plain ratio).
FIGURES = ("total_ms", "downtime_ms", "expected_downtime_ms", "expected_error", "setup_ms",
           "transferred_bytes", "throughput_bps", "iterations", "throttle_pct",
           "rss_overhead_bytes", "rss_overhead_ratio", "ceiling_bps", "throughput_ratio",
           "fresh_ceiling_bps", "fresh_ratio", "tls_handshake_ms", "source_cpu_s",
           "destination_cpu_s", "cpu_s_per_gib")

SCENARIOS: dict[str, Scenario] = {}


def _add(scenario: Scenario) -> None:
    SCENARIOS[scenario.name] = scenario


_add(Scenario("idle-1g", 1 * GiB, description="idle 1 GiB guest, uncapped",
              targets=(Target("total_ms", 50), Target("downtime_ms", 5),
                       Target("expected_error", 0.30), Target("rss_overhead_ratio", 0.02))))
_add(Scenario("idle-4g", 4 * GiB, description="idle 4 GiB guest, uncapped",
              targets=(Target("total_ms", 100),)))
_add(Scenario("idle-16g", 16 * GiB, description="idle 16 GiB guest, uncapped",
              targets=(Target("total_ms", 150),)))
_add(Scenario("dirty-100m", 1 * GiB, "dirtier",
              {"working_set_bytes": 100 * MiB, "pattern": "sequential", "rate_pages_per_s": 0},
              warmup_s=1.0,
              description="1 GiB guest incrementing a byte in every page of a 100 MiB working "
                          "set, pass after pass, flat out; uncapped, downtime limit 300 ms",
              targets=(Target("total_ms", 500), Target("downtime_ms", 40),
                       Target("expected_error", 0.30), Target("rss_overhead_ratio", 0.02))))
_add(Scenario("random-1g", 1 * GiB, "idle", {"fill_bytes": 1 * GiB - MiB}, ceiling=True,
              warmup_s=0.3,
              description="idle 1 GiB guest whose RAM holds random content, uncapped; "
                          "throughput against a raw loopback socket stream of 1 MiB writes",
              targets=(Target("throughput_bps", 0.6, "at_least", "ceiling_bps"),
                       Target("expected_error", 0.30), Target("rss_overhead_ratio", 0.02))))
_add(Scenario("nonconv-512m", 1 * GiB, "dirtier",
              {"working_set_bytes": 512 * MiB, "pattern": "sequential", "rate_pages_per_s": 0},
              auto_converge=True, throttle_mode="aim", warmup_s=1.0,
              description="1 GiB guest incrementing a byte in every page of a 512 MiB working "
                          "set, flat out; uncapped, auto-converge (aim)",
              targets=(Target("total_ms", 1200), Target("downtime_ms", 150))))
_add(Scenario("nonconv-512m-dl150", 1 * GiB, "dirtier",
              {"working_set_bytes": 512 * MiB, "pattern": "sequential", "rate_pages_per_s": 0},
              auto_converge=True, throttle_mode="aim", warmup_s=1.0, downtime_limit_ms=150,
              description="the same, asking for the target's downtime: downtime limit 150 ms",
              targets=(Target("total_ms", 1200), Target("downtime_ms", 150),
                       Target("expected_error", 0.30))))
_add(Scenario("nonconv-512m-100mbs", 1 * GiB, "dirtier",
              {"working_set_bytes": 512 * MiB, "pattern": "sequential", "rate_pages_per_s": 0},
              auto_converge=True, throttle_mode="aim", max_bandwidth=100_000_000, warmup_s=1.0,
              timeout_s=90.0,
              description="the same guest with max-bandwidth 100 MB/s, auto-converge (aim)",
              targets=(Target("total_ms", 60_000), Target("downtime_ms", 300))))



def _on_hugetlb(name: str) -> Scenario:
    """Scenario ``name`` with the destination's RAM from the host's hugetlb pool."""
    base = SCENARIOS[name]
    return replace(base, name=f"{name}-hugetlb", destination_backing="hugetlb",
                   description=f"{base.description}; the destination's RAM from the hugetlb "
                               f"pool (512 free huge pages: echo 512 > /proc/sys/vm/nr_hugepages)")


for _name in ("random-1g", "dirty-100m", "nonconv-512m-dl150"):
    _add(_on_hugetlb(_name))

# A destination started ahead of its migration can fault its RAM in while it waits, as a
# production one started with QEMU's -mem-prealloc does; these measure the pipeline without
# the host's cost of backing fresh memory.
for _name in ("random-1g", "dirty-100m", "nonconv-512m-dl150", "random-1g-hugetlb"):
    _add(replace(SCENARIOS[_name], name=f"{_name}-prealloc", destination_prealloc=True,
                 description=f"{SCENARIOS[_name].description}; the destination's RAM faulted in "
                             f"before the migration (pymig incoming --mem-prealloc)"))

# The same migrations over TLS (both ends with the credentials run_once is given; the
# destination's certificate must carry 127.0.0.1).  tls_comparison() runs each next to its
# plaintext twin and reports the ratio of their throughputs.
for _name in ("random-1g", "random-1g-prealloc", "idle-1g"):
    _add(replace(SCENARIOS[_name], name=f"{_name}-tls", tls=True,
                 targets=SCENARIOS[_name].targets + (Target("tls_handshake_ms", 10),),
                 description=f"{SCENARIOS[_name].description}; over TLS"))

# The dirtier's pages are zero but for one byte, so LZ4 sends them in 1/200 of their size;
# sent as they are, they measure the pipeline that QEMU's figures (no compression) compare to.
for _name in ("dirty-100m", "dirty-100m-hugetlb", "nonconv-512m-dl150"):
    _add(replace(SCENARIOS[_name], name=f"{_name}-uncompressed", compression="none",
                 description=f"{SCENARIOS[_name].description}; pages sent as they are "
                             f"(compression none)"))


# --- processes ---------------------------------------------------------------------------------

def child_env() -> dict[str, str]:
    """Environment for a child that imports the pymig this process imports."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(20)


def _prealloc_args(scenario: Scenario) -> list[str]:
    if not scenario.destination_prealloc:
        return []
    return ["--memory", str(scenario.memory_bytes), "--mem-prealloc"]


def resolve_kind(kind: str) -> str:
    if kind != "auto":
        return kind
    from pymig.demo import kvm_usable

    return "kvm" if kvm_usable() else "simulated"


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _cpu_seconds(pid: int) -> float:
    """CPU-seconds ``pid`` has used so far, user and system, its ended threads included."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reset_peak_rss(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# --- one run -----------------------------------------------------------------------------------

def hugetlb_shortfall(scenario: Scenario) -> int:
    """Huge pages the host's pool lacks for the scenario's destination (0: none lacking)."""
    if scenario.destination_backing != "hugetlb":
        return 0
    from pymig.memory import hugetlb_pool

    size, _, free = hugetlb_pool()
    return max(-(-scenario.memory_bytes // size) - free, 0)


def run_once(scenario: Scenario, workdir: str, *, say: Callable[[str], None] = lambda s: None,
             wrap: Callable[[str, list[str]], list[str]] | None = None,
             trace: str | None = None, tls_creds: str | None = None) -> dict[str, float]:
    """One migration of ``scenario`` between two fresh processes; its figures.

    ``wrap(role, argv)`` may rewrite the command line of the "source" or "destination"
    process (a profiler, a tracer); ``trace`` is a path for the source's per-iteration trace;
    ``tls_creds`` the credentials directory of a TLS scenario (both ends use it).
    """
    if scenario.tls and not tls_creds:
        raise RuntimeError(f"{scenario.name} runs over TLS and needs credentials: a directory "
                           f"in QEMU's layout whose server certificate carries 127.0.0.1 "
                           f"(--tls-creds DIR)")
    wrap = wrap or (lambda role, argv: argv)
    from pymig.qmp import QmpClient, wait_for_socket

    missing = hugetlb_shortfall(scenario)
    if missing:
        raise RuntimeError(f"{scenario.name}: the destination's RAM needs {missing} more free "
                           f"huge pages (echo N > /proc/sys/vm/nr_hugepages)")

    kind = resolve_kind(scenario.kind)
    src_ctl = os.path.join(workdir, "src.sock")
    dst_ctl = os.path.join(workdir, "dst.sock")
    for path in (src_ctl, dst_ctl):
        if os.path.exists(path):
            os.unlink(path)
    config = {"kind": kind, "workload": scenario.workload, "params": scenario.params,
              "memory_bytes": scenario.memory_bytes, "vcpus": scenario.vcpus}
    env = child_env()
    src = dst = None
    try:
        src = subprocess.Popen(wrap("source", [sys.executable, "-m", "pymig.benchmigrate",
                                               "source", json.dumps(config), src_ctl]),
                               env=env, stdout=subprocess.DEVNULL)
        dst = subprocess.Popen(wrap("destination", [sys.executable, "-m", "pymig", "incoming",
                                                    "tcp:127.0.0.1:0", "--control", dst_ctl,
                                                    "--accept-kind", kind,
                                                    "--mem-backing",
                                                    scenario.destination_backing, "--quiet",
                                                    *_prealloc_args(scenario),
                                                    *(["--tls-creds", tls_creds]
                                                      if scenario.tls else [])]),
                               env=env, stdout=subprocess.DEVNULL)
        wait_for_socket(src_ctl, src, "source", 60)
        wait_for_socket(dst_ctl, dst, "destination", 60)
        with QmpClient(dst_ctl) as client:
            uri = client.command("query-migrate")["socket-address"]
        with QmpClient(src_ctl) as client:
            params: dict[str, Any] = {"downtime-limit": scenario.downtime_limit_ms,
                                      "max-bandwidth": scenario.max_bandwidth,
                                      "compression": scenario.compression}
            if scenario.tls:
                params["tls-creds"] = tls_creds  # loaded now, before the migration
            client.command("migrate-set-parameters", **params)
            if scenario.auto_converge:
                client.command("migrate-set-parameters",
                               **{"x-cpu-throttle-mode": scenario.throttle_mode})
                client.command("migrate-set-capabilities", capabilities=[
                    {"capability": "auto-converge", "state": True}])
            time.sleep(scenario.warmup_s)
            rss_before = _proc_status(src.pid)["VmRSS"]
            peak_reset = _reset_peak_rss(src.pid)
            cpu_before = _cpu_seconds(src.pid), _cpu_seconds(dst.pid)
            client.command("migrate", uri=uri, **({"trace": trace} if trace else {}))
            final = _wait_migration(client, scenario.timeout_s)
            cpu = _cpu_seconds(src.pid) - cpu_before[0], _cpu_seconds(dst.pid) - cpu_before[1]
            peak = _proc_status(src.pid)["VmHWM"] if peak_reset else math.nan
            try:
                client.command("quit")
            except Exception:  # noqa: BLE001 - the process may already be going
                pass
        if final.get("status") != "completed":
            raise RuntimeError(f"{scenario.name}: migration ended {final.get('status')}: "
                               f"{final.get('error-desc', '')}")
        figures = figures_from_stats(final, scenario.memory_bytes)
        figures["rss_overhead_bytes"] = max(peak - rss_before, 0)
        figures["rss_overhead_ratio"] = figures["rss_overhead_bytes"] / scenario.memory_bytes
        figures["source_cpu_s"], figures["destination_cpu_s"] = cpu
        if figures["transferred_bytes"]:
            figures["cpu_s_per_gib"] = sum(cpu) / (figures["transferred_bytes"] / GiB)
        if "tls" in final:
            figures["tls_cipher"] = final["tls"]["cipher"]
        with QmpClient(dst_ctl) as client:
            client.command("quit")
        dst.wait(30)
    finally:
        _stop(src)
        _stop(dst)
    if scenario.ceiling:
        from pymig.transport.ceiling import raw_socket_throughput

        figures["ceiling_bps"] = raw_socket_throughput(
            "tcp", 1 << 20, total_bytes=scenario.memory_bytes, receiver="process")
        figures["throughput_ratio"] = figures["throughput_bps"] / figures["ceiling_bps"]
        figures["fresh_ceiling_bps"] = fresh_memory_throughput(scenario.memory_bytes)
        figures["fresh_ratio"] = figures["throughput_bps"] / figures["fresh_ceiling_bps"]
    say(f"{scenario.name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in figures.items()))
    return figures


_FRESH_RECEIVER = r"""
import mmap, socket, sys
port, total = int(sys.argv[1]), int(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port))
ram = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
ram.madvise(mmap.MADV_HUGEPAGE)
view, got = memoryview(ram), 0
while got < total:
    n = sock.recv_into(view[got:got + (4 << 20)], 0, socket.MSG_WAITALL)
    if not n:
        sys.exit(f"sender closed after {got} of {total} bytes")
    got += n
sock.sendall(b"\x06")
"""


def fresh_memory_throughput(total_bytes: int, write_bytes: int = 1 << 20) -> float:
    """Bytes/s of a ``sendall`` loop of ``write_bytes`` writes into a child process that
    receives straight into a fresh mapping of ``total_bytes`` (a destination's first touch of
    its RAM, and nothing else)."""
    import socket

    from pymig.transport.ceiling import sendall_loop

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    child = subprocess.Popen([sys.executable, "-c", _FRESH_RECEIVER,
                              str(listener.getsockname()[1]), str(total_bytes)])
    try:
        listener.settimeout(30)
        sock, _ = listener.accept()
        with sock:
            sock.setblocking(True)
            send = sendall_loop(write_bytes)
            start = time.perf_counter()
            send(sock, total_bytes)
            if sock.recv(1) != b"\x06":
                raise ConnectionError("the receiver did not confirm the transfer")
            elapsed = time.perf_counter() - start
    finally:
        listener.close()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return total_bytes / elapsed


def fresh_memory_ceilings(total_bytes: int, idle_s: float, *,
                          sleep: Callable[[float], None] = time.sleep) -> dict[str, float]:
    """What a receiver of ``total_bytes`` gets from the host's fresh memory, cold and warm.

    A host that is itself a VM may hand freed memory back to its hypervisor (virtio-balloon
    free page reporting), which then backs it again, page by page, on its next first touch.
    So memory no process has touched for ``idle_s`` seconds can be several times slower to
    receive into than memory freed a moment ago, and a fresh destination process gets mostly
    the former.  This measures, one after the other: the bare socket into fresh memory after
    ``idle_s`` seconds of quiet (``cold_bps``), the same at once again (``warm_bps``: what the
    first freed), and the raw socket ceiling (``ceiling_bps``)."""
    from pymig.transport.ceiling import raw_socket_throughput

    sleep(idle_s)
    cold = fresh_memory_throughput(total_bytes)
    warm = fresh_memory_throughput(total_bytes)
    ceiling = raw_socket_throughput("tcp", 1 << 20, total_bytes=total_bytes, receiver="process")
    return {"cold_bps": cold, "warm_bps": warm, "ceiling_bps": ceiling,
            "cold_ratio": cold / ceiling, "warm_ratio": warm / ceiling}


def _wait_migration(client, timeout: float) -> dict:
    """Wait for the MIGRATION event that ends the migration, then its final stats."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            try:
                client.command("migrate_cancel")
            finally:
                raise TimeoutError(f"the migration did not end within {timeout} s")
        try:
            event = client.events.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            continue
        if event.get("event") == "MIGRATION" and event["data"].get("status") in (
                "completed", "failed", "cancelled"):
            return client.command("query-migrate")


def figures_from_stats(stats: dict, ram_bytes: int) -> dict[str, float]:
    """The figures of one finished migration, from its query-migrate answer."""
    ram = stats.get("ram", {})
    total_ms = float(stats["total-time"])
    downtime = float(stats.get("downtime", math.nan))
    phases = stats.get("downtime-breakdown")
    if phases:  # the same downtime, to 0.01 ms rather than whole ms
        downtime = float(sum(phases.values()))
    expected = float(stats.get("downtime-expected-at-switchover", math.nan))
    transferred = float(ram.get("transferred", 0))
    tls = {"tls_handshake_ms": float(stats["tls"]["handshake-time"])} if "tls" in stats else {}
    return tls | {
        "total_ms": total_ms,
        "downtime_ms": downtime,
        "expected_downtime_ms": expected,
        "expected_error": abs(expected - downtime) / downtime if downtime > 0 else math.nan,
        "setup_ms": float(stats.get("setup-time", math.nan)),
        "transferred_bytes": transferred,
        "throughput_bps": transferred / (total_ms / 1000) if total_ms > 0 else math.nan,
        "iterations": float(stats.get("iterations", 0)),
        "throttle_pct": float(stats.get("cpu-throttle-percentage", 0)),
    }


# --- many runs -----------------------------------------------------------------------------------

@dataclass
class ScenarioResult:
    scenario: Scenario
    runs: list[dict[str, float]]

    @property
    def medians(self) -> dict[str, float]:
        keys = [k for k in FIGURES if any(k in r for r in self.runs)]
        out = {}
        for key in keys:
            values = [r[key] for r in self.runs if key in r and not math.isnan(r[key])]
            out[key] = statistics.median(values) if values else math.nan
        return out

    def ratios(self) -> dict[str, dict[str, Any]]:
        med = self.medians
        out = {}
        for target in self.scenario.targets:
            if target.figure not in med or (target.relative_to and
                                            target.relative_to not in med):
                continue
            out[target.figure] = {"median": med[target.figure],
                                  "limit": target.limit_value(med), "kind": target.kind,
                                  "ratio": target.ratio(med), "met": target.met(med)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": asdict(self.scenario), "runs": self.runs, "medians": self.medians,
                "targets": self.ratios()}


def run_scenario(scenario: Scenario | str, runs: int = 5, *,
                 say: Callable[[str], None] = lambda s: None,
                 tls_creds: str | None = None) -> ScenarioResult:
    """``runs`` migrations of ``scenario`` (each between two fresh processes)."""
    if isinstance(scenario, str):
        scenario = SCENARIOS[scenario]
    workdir = tempfile.mkdtemp(prefix="pymig-bench-")
    try:
        results = [run_once(scenario, workdir, say=say, tls_creds=tls_creds)
                   for _ in range(runs)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return ScenarioResult(scenario, results)


@dataclass
class TlsComparison:
    """A scenario and its TLS twin, run in turns: what TLS costs, as ratios."""

    plaintext: ScenarioResult
    tls: ScenarioResult

    #: What the cipher alone costs on one core (:func:`cipher_throughput`), when measured.
    cipher: dict[str, float] | None = None

    def figures(self) -> dict[str, float]:
        plain, secured = self.plaintext.medians, self.tls.medians
        pairs = [t["throughput_bps"] / p["throughput_bps"]
                 for p, t in zip(self.plaintext.runs, self.tls.runs)]
        ratio = secured["throughput_bps"] / plain["throughput_bps"]
        out = {"plaintext_bps": plain["throughput_bps"], "tls_bps": secured["throughput_bps"],
               "throughput_ratio": ratio, "pair_ratios": pairs,
               "pair_ratio_median": statistics.median(pairs),
               "plaintext_setup_ms": plain["setup_ms"], "tls_setup_ms": secured["setup_ms"],
               "tls_handshake_ms": secured.get("tls_handshake_ms", math.nan),
               "plaintext_total_ms": plain["total_ms"], "tls_total_ms": secured["total_ms"],
               "plaintext_cpu_s_per_gib": plain.get("cpu_s_per_gib", math.nan),
               "tls_cpu_s_per_gib": secured.get("cpu_s_per_gib", math.nan)}
        if self.cipher is not None:
            out |= tls_ceilings(plain["throughput_bps"], out["plaintext_cpu_s_per_gib"],
                                self.cipher)
            out["fraction_of_cpu_ceiling"] = ratio / out["cpu_ceiling_ratio"]
            out["fraction_of_thread_ceiling"] = ratio / out["thread_ceiling_ratio"]
        return out


def tls_ceilings(plaintext_bps: float, plaintext_cpu_s_per_gib: float,
                 cipher: dict[str, float]) -> dict[str, float]:
    """The best ratio to the plaintext migration a TLS that cost nothing but its cipher could
    reach, two ways: ``cpu_ceiling_ratio`` where the host's CPUs are what limits both
    migrations (both ends share them: every byte costs the plaintext migration's CPU-seconds
    and an encryption and a decryption more); ``thread_ceiling_ratio`` where each end's one
    thread is what limits them (the source's thread encrypts each byte on top of its
    plaintext work, the destination's decrypts it: the slower of the two sets the pace)."""
    cipher_s_per_gib = GiB / cipher["encrypt_bps"] + GiB / cipher["decrypt_bps"]
    slower = min(cipher["encrypt_bps"], cipher["decrypt_bps"])
    return {"cipher_encrypt_bps": cipher["encrypt_bps"],
            "cipher_decrypt_bps": cipher["decrypt_bps"],
            "cipher_cpu_s_per_gib": cipher_s_per_gib,
            "cpu_ceiling_ratio": plaintext_cpu_s_per_gib / (plaintext_cpu_s_per_gib
                                                            + cipher_s_per_gib),
            "thread_ceiling_ratio": 1 / (1 + plaintext_bps / slower)}


#: TLS 1.3's suites as OpenSSL names them, and their AEAD as ``openssl speed -evp`` does.
_SUITE_AEADS = {"TLS_AES_128_GCM_SHA256": "aes-128-gcm", "TLS_AES_256_GCM_SHA384": "aes-256-gcm",
                "TLS_CHACHA20_POLY1305_SHA256": "chacha20-poly1305"}


def cipher_throughput(suite: str, seconds: int = 1, record_bytes: int = 16384) -> dict[str, float]:
    """Bytes/s of the AEAD of the TLS 1.3 ``suite`` on one core, sealing and opening
    ``record_bytes`` records (TLS's largest), as ``openssl speed -evp`` measures it with the
    libcrypto Python's ``ssl`` uses: the cipher alone, none of TLS's copies."""
    out = {}
    for way, extra in (("encrypt_bps", []), ("decrypt_bps", ["-decrypt"])):
        run = subprocess.run(["openssl", "speed", "-seconds", str(seconds), "-bytes",
                              str(record_bytes), *extra, "-evp", _SUITE_AEADS[suite]],
                             capture_output=True, text=True, timeout=60, check=True)
        # the last line: the cipher's name, then thousands of bytes per second
        out[way] = float(run.stdout.strip().splitlines()[-1].split()[-1].rstrip("k")) * 1000
    return out


def tls_comparison(name: str, runs: int, tls_creds: str, *,
                   say: Callable[[str], None] = lambda s: None) -> TlsComparison:
    """``runs`` migrations of scenario ``name`` and as many of its TLS twin, alternating (the
    host's speed moves from minute to minute: each pair sees the same host)."""
    plain, secured = SCENARIOS[name], SCENARIOS[f"{name}-tls"]
    workdir = tempfile.mkdtemp(prefix="pymig-bench-")
    plain_runs, tls_runs, ciphers = [], [], []
    try:
        for _ in range(runs):
            plain_runs.append(run_once(plain, workdir, say=say))
            tls_runs.append(run_once(secured, workdir, say=say, tls_creds=tls_creds))
            try:  # the cipher the session agreed, alone, in the same minute as the pair
                ciphers.append(cipher_throughput(tls_runs[-1]["tls_cipher"]))
            except (OSError, KeyError, ValueError, IndexError, subprocess.SubprocessError):
                pass  # no openssl command here, or a suite it does not name
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cipher = {key: statistics.median(c[key] for c in ciphers)
              for key in ("encrypt_bps", "decrypt_bps")} if ciphers else None
    return TlsComparison(ScenarioResult(plain, plain_runs), ScenarioResult(secured, tls_runs),
                         cipher)


def _fmt(value: float) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value == int(value):
        return str(int(value))
    return f"{value:.3f}"


_UNITS = {"ms": ("ms", 1.0), "bps": ("MB/s", 1e-6), "bytes": ("MiB", 1 / MiB)}


def _with_unit(figure: str, value: float) -> str:
    for suffix, (unit, scale) in _UNITS.items():
        if figure.endswith("_" + suffix):
            return f"{value * scale:.1f} {unit}"
    return f"{value:.3f}" if isinstance(value, float) and value != int(value) else str(value)


def format_table(results: list[ScenarioResult]):
    """A rich Table: each scenario's targeted figures (median), limits, ratios."""
    from rich.table import Table

    table = Table(title="pymig migration targets (source and destination processes, loopback "
                        "TCP; medians)")
    for column in ("scenario", "runs", "figure", "median", "target", "ratio", "met"):
        table.add_column(column, justify="left" if column in ("scenario", "figure") else "right")
    for result in results:
        first = True
        for figure, r in result.ratios().items():
            bound = "<=" if r["kind"] == "at_most" else ">="
            table.add_row(result.scenario.name if first else "",
                          str(len(result.runs)) if first else "", figure,
                          _with_unit(figure, r["median"]),
                          f"{bound} {_with_unit(figure, r['limit'])}", f"{r['ratio']:.2f}",
                          "[green]yes[/]" if r["met"] else "[red]no[/]")
            first = False
    return table


def format_result(result: ScenarioResult) -> str:
    med = result.medians
    lines = [f"{result.scenario.name}: {result.scenario.description} "
             f"(median of {len(result.runs)})"]
    for key, value in med.items():
        lines.append(f"  {key:22s} {_with_unit(key, value)}")
    for figure, r in result.ratios().items():
        lines.append(f"  target {figure}: {_fmt(r['median'])} vs {r['kind']} "
                     f"{_fmt(r['limit'])} -> ratio {r['ratio']:.2f} "
                     f"{'met' if r['met'] else 'NOT MET'}")
    return "\n".join(lines)


# --- the source child ------------------------------------------------------------------------------

def serve_source(config_json: str, control: str) -> int:
    """Build and start the guest described by ``config_json`` and serve it like ``pymig run
    --control``; returns the process's exit code."""
    from pymig import guest as guests
    from pymig.process import serve
    from pymig.session import Session

    spec = json.loads(config_json)
    config = guests.make_config(kind=spec["kind"], workload=spec["workload"],
                                params=spec["params"], memory_bytes=spec["memory_bytes"],
                                vcpus=spec["vcpus"])
    return serve(Session(guests.create(config)), control=control, quiet=True, start=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pymig.benchmigrate")
    sub = parser.add_subparsers(dest="command", required=True)
    p_src = sub.add_parser("source", help="(internal) serve a source guest")
    p_src.add_argument("config")
    p_src.add_argument("control")
    p_bench = sub.add_parser("bench", help="run scenarios")
    p_bench.add_argument("scenarios", nargs="*",
                         default=[n for n, sc in SCENARIOS.items() if not sc.tls])
    p_bench.add_argument("--runs", type=int, default=5)
    p_bench.add_argument("--json", action="store_true")
    p_bench.add_argument("--verbose", action="store_true")
    p_bench.add_argument("--tls-creds", metavar="DIR", default=None,
                         help="credentials for the *-tls scenarios (QEMU's layout; the server "
                              "certificate must carry 127.0.0.1)")
    p_tls = sub.add_parser("tls", help="a scenario and its TLS twin in turns: the ratio of "
                                       "their throughputs, and the TLS set-up time")
    p_tls.add_argument("scenario", nargs="?", default="random-1g")
    p_tls.add_argument("--tls-creds", metavar="DIR", required=True)
    p_tls.add_argument("--runs", type=int, default=5)
    p_tls.add_argument("--verbose", action="store_true")
    p_fresh = sub.add_parser(
        "fresh-memory", help="the bare socket into fresh memory, cold (after a quiet wait) "
                             "and warm, against the raw socket: what any destination's first "
                             "touch of its RAM can reach on this host")
    p_fresh.add_argument("--size", default="1G", help="bytes to receive (default 1G)")
    p_fresh.add_argument("--idle", type=float, default=40.0,
                         help="seconds of quiet before the cold figure (default 40)")
    p_fresh.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "source":
        return serve_source(args.config, args.control)
    if args.command == "fresh-memory":
        from pymig.units import parse_size

        size = parse_size(args.size)
        for _ in range(args.runs):
            f = fresh_memory_ceilings(size, args.idle)
            print(f"fresh memory after {args.idle:g} s idle {f['cold_bps'] / 1e6:.0f} MB/s "
                  f"({f['cold_ratio']:.2f} x the socket), right after "
                  f"{f['warm_bps'] / 1e6:.0f} MB/s ({f['warm_ratio']:.2f} x), raw socket "
                  f"{f['ceiling_bps'] / 1e6:.0f} MB/s", flush=True)
        return 0
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else (lambda s: None)
    if args.command == "tls":
        figures = tls_comparison(args.scenario, args.runs, args.tls_creds, say=say).figures()
        print(json.dumps(figures))
        return 0
    results = []
    for name in args.scenarios:
        result = run_scenario(name, args.runs, say=say, tls_creds=args.tls_creds)
        results.append(result)
        if not args.json:
            print(format_result(result), flush=True)
    if args.json:
        print(json.dumps([r.to_dict() for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
