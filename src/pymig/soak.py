"""The soak: one self-checking guest migrated back and forth between two long-lived processes.

::

    process A  pymig run --workload selfcheck --control A        (the guest starts here)
    process B  pymig incoming defer --control B
    round trip i:  B migrate-incoming tcp:127.0.0.1:0 ; A migrate → B   (A releases its guest
                   A migrate-incoming tcp:127.0.0.1:0 ; B migrate → A    when it receives again)

Both processes live through every round trip: a process whose guest migrated away
(``postmigrate``) takes ``migrate-incoming`` and receives it again.  After each migration the
guest must run at its destination with its self-check error counter at zero; every
``--verify-every`` round trips it is stopped and every page of its working set checked, then
continued.  After each round trip each process's resident memory (VmRSS), open descriptors and
threads are read; what counts is their change from the end of the ``--warmup`` round trips to
the end (a process's first migrations load modules, warm OpenSSL and fill allocator pools
once): RSS as the median of a window of round trips (a tenth of them, at least 3) against the
last window's.  Pass: no failed migration, 0 self-check errors, RSS growth at most
``--max-rss-growth`` (5 %), descriptor and thread counts the same after every round trip.

    python -m pymig.soak [--round-trips 200] [--tls-creds DIR] [--kind auto|kvm|simulated]
                         [--memory 64M] [--working-set 16M] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

MiB = 1 << 20


@dataclass
class Sample:
    """One process after a round trip."""

    rss_bytes: int
    fds: int
    threads: int


@dataclass
class SoakResult:
    """What a soak found; :attr:`passed` holds it to the targets."""

    mode: str
    kind: str
    round_trips: int
    warmup: int
    migrations: int = 0
    failures: list[str] = field(default_factory=list)
    selfcheck_errors: int = 0
    verifications: int = 0
    seconds: float = 0.0
    total_ms: list[int] = field(default_factory=list)
    downtime_ms: list[int] = field(default_factory=list)
    handshake_ms: list[float] = field(default_factory=list)
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {"A": [], "B": []})
    max_rss_growth: float = 0.05

    def window(self) -> int:
        """Round trips per window: RSS is compared as the median of a window after the warm-up
        against the median of the last one, since a single sample moves by megabytes with
        when the collector last freed a migration's buffers (which glibc may keep mapped)."""
        return max(3, (self.round_trips - self.warmup) // 10)

    def growth(self, name: str) -> dict[str, float]:
        """RSS growth (ratio of window medians), and descriptor and thread changes, from the
        warm-up's end to the last round trip."""
        samples = self.samples[name][self.warmup:]
        if len(samples) < 2:
            return {"rss": 0.0, "fds": 0, "threads": 0}
        width = min(self.window(), len(samples) // 2)
        base = statistics.median(s.rss_bytes for s in samples[:width])
        last = statistics.median(s.rss_bytes for s in samples[-width:])
        return {"rss": (last - base) / base,
                "fds": samples[-1].fds - samples[0].fds,
                "threads": samples[-1].threads - samples[0].threads,
                "rss_base_bytes": base, "rss_last_bytes": last,
                "rss_min_bytes": min(s.rss_bytes for s in samples),
                "rss_peak_bytes": max(s.rss_bytes for s in samples),
                "fds_base": samples[0].fds, "threads_base": samples[0].threads,
                "fds_range": [min(s.fds for s in samples), max(s.fds for s in samples)],
                "threads_range": [min(s.threads for s in samples),
                                  max(s.threads for s in samples)]}

    @property
    def passed(self) -> bool:
        if self.failures or self.selfcheck_errors:
            return False
        if self.migrations != 2 * self.round_trips:
            return False
        for name in self.samples:
            g = self.growth(name)
            if g["rss"] > self.max_rss_growth or g.get("fds_range", [0, 0])[0] != \
                    g.get("fds_range", [0, 0])[1] or g.get("threads_range", [0, 0])[0] != \
                    g.get("threads_range", [0, 0])[1]:
                return False
        return True

    def to_dict(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        out["growth"] = {name: self.growth(name) for name in self.samples}
        for key in ("total_ms", "downtime_ms", "handshake_ms"):
            values = getattr(self, key)
            out[key] = {"median": statistics.median(values) if values else None,
                        "max": max(values) if values else None}
        return out


def _sample(pid: int) -> Sample:
    rss = 0
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return Sample(rss, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")))


def _settled_sample(pid: int, previous: Sample | None, timeout: float = 2.0) -> Sample:
    """A sample once the threads and descriptors a migration used are gone: its threads end,
    and its collector pass runs, a moment after it reports.  Sampled until the counts are back
    to the previous round trip's or ``timeout`` passed; the lowest counts seen then (a thread
    or a descriptor that leaks stays, and shows in every sample)."""
    deadline = time.monotonic() + timeout
    sample = _sample(pid)
    fds, threads = sample.fds, sample.threads
    while previous is not None and (fds, threads) != (previous.fds, previous.threads) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
        sample = _sample(pid)
        fds, threads = min(fds, sample.fds), min(threads, sample.threads)
    return Sample(sample.rss_bytes, fds, threads)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def run_soak(round_trips: int = 200, *, tls_creds: str | None = None, kind: str = "auto",
             memory: str = "64M", working_set: str = "16M", warmup: int = 5,
             verify_every: int = 10, max_rss_growth: float = 0.05,
             say=lambda text: None) -> SoakResult:
    """Run the soak; the processes are always ended before it returns."""
    from pymig.benchmigrate import resolve_kind
    from pymig.qmp import QmpClient, wait_for_socket

    kind = resolve_kind(kind)
    warmup = min(warmup, max(round_trips - 1, 0))
    result = SoakResult("tls" if tls_creds else "plaintext", kind, round_trips, warmup,
                        max_rss_growth=max_rss_growth)
    tls = ["--tls-creds", tls_creds] if tls_creds else []
    with tempfile.TemporaryDirectory(prefix="pymig-soak-") as tmp:
        ctl = {"A": os.path.join(tmp, "a.sock"), "B": os.path.join(tmp, "b.sock")}
        run = [sys.executable, "-m", "pymig", "run", "--workload", "selfcheck", "--memory",
               memory, "--working-set", working_set, "--control", ctl["A"], "--quiet", *tls]
        if kind == "simulated":
            run += ["--simulated", "--rate", "100000"]
        incoming = [sys.executable, "-m", "pymig", "incoming", "defer", "--control", ctl["B"],
                    "--accept-kind", kind, "--quiet", *tls]
        procs = {}
        clients = {}
        try:
            procs["A"] = subprocess.Popen(run, env=_child_env(), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL)
            procs["B"] = subprocess.Popen(incoming, env=_child_env(), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL)
            for name in ("A", "B"):
                wait_for_socket(ctl[name], procs[name], name, 60)
                clients[name] = QmpClient(ctl[name])
            if tls_creds:
                # the guest goes back and forth: each end checks the other's name and identity
                for client in clients.values():
                    client.command("migrate-set-parameters", **{"tls-hostname": "localhost"})
            started = time.monotonic()
            holder, other = "A", "B"
            for trip in range(round_trips):
                for _ in range(2):
                    _migrate_once(result, clients[holder], clients[other], trip, verify=(
                        verify_every and trip % verify_every == verify_every - 1))
                    holder, other = other, holder
                for name in ("A", "B"):
                    samples = result.samples[name]
                    samples.append(_settled_sample(procs[name].pid,
                                                   samples[-1] if samples else None))
                if result.failures:
                    break
                say(f"round trip {trip + 1}/{round_trips}: "
                    + "  ".join(f"{n} rss {s[-1].rss_bytes / MiB:.1f} MiB fds {s[-1].fds} "
                                f"threads {s[-1].threads}" for n, s in result.samples.items()))
            result.seconds = time.monotonic() - started
        finally:
            for client in clients.values():
                try:
                    client.command("quit")
                except Exception:  # noqa: BLE001 - it may be gone already
                    pass
                client.close()
            for proc in procs.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
    return result


def _migrate_once(result: SoakResult, source, destination, trip: int, verify: bool) -> None:
    uri = destination.command("migrate-incoming", uri="tcp:127.0.0.1:0")["uri"]
    source.command("migrate", uri=uri)
    final = _wait(lambda: (lambda q: q if q.get("status") in ("completed", "failed",
                                                              "cancelled") else None)(
        source.command("query-migrate")), 120, "the migration to end")
    if final["status"] != "completed":
        result.failures.append(f"round trip {trip + 1}: {final.get('error-desc', final)}")
        return
    result.migrations += 1
    result.total_ms.append(final.get("total-time", 0))
    result.downtime_ms.append(final.get("downtime", 0))
    if "tls" in final:
        result.handshake_ms.append(final["tls"]["handshake-time"])
    _wait(lambda: destination.command("query-status")["status"] == "running", 60,
          "the guest to run at its destination")
    guest = destination.command("query-guest")
    result.selfcheck_errors += guest["progress"]["errors"]
    if verify:
        destination.command("stop")
        report = destination.command("query-guest", verify=True)["selfcheck"]
        destination.command("cont")
        result.verifications += 1
        if not report["ok"]:
            result.selfcheck_errors += max(report["errors"], 1)
            result.failures.append(f"round trip {trip + 1}: self-check: {report['detail']}")


def format_result(result: SoakResult) -> str:
    d = result.to_dict()
    lines = [f"soak ({result.mode}, {result.kind} guest): {result.migrations} migrations in "
             f"{result.round_trips} round trips, {result.seconds:.0f} s; "
             f"{'PASSED' if result.passed else 'FAILED'}",
             f"  self-check errors {result.selfcheck_errors} (full checks: "
             f"{result.verifications}); failed migrations {len(result.failures)}",
             f"  migration total-time median {d['total_ms']['median']} ms (max "
             f"{d['total_ms']['max']}), downtime median {d['downtime_ms']['median']} ms"]
    if result.handshake_ms:
        lines.append(f"  TLS handshake median {d['handshake_ms']['median']} ms (max "
                     f"{d['handshake_ms']['max']})")
    for name, g in d["growth"].items():
        if "rss_base_bytes" not in g:
            continue
        lines.append(f"  {name}: RSS {g['rss_base_bytes'] / MiB:.1f} -> "
                     f"{g['rss_last_bytes'] / MiB:.1f} MiB ({g['rss'] * 100:+.2f} %; medians of "
                     f"{result.window()} round trips; samples {g['rss_min_bytes'] / MiB:.1f}-"
                     f"{g['rss_peak_bytes'] / MiB:.1f}), fds {g['fds_range'][0]}-"
                     f"{g['fds_range'][1]}, threads {g['threads_range'][0]}-"
                     f"{g['threads_range'][1]} after the {result.warmup} warm-up round trips")
    lines += [f"  {failure}" for failure in result.failures[:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pymig.soak", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--tls-creds", metavar="DIR", default=None,
                        help="migrate over TLS with these credentials (both pairs: each "
                             "process sends and receives); their server certificate must "
                             "carry the name localhost")
    parser.add_argument("--kind", choices=("auto", "kvm", "simulated"), default="auto")
    parser.add_argument("--memory", default="64M")
    parser.add_argument("--working-set", default="16M")
    parser.add_argument("--warmup", type=int, default=5,
                        help="round trips before the baseline sample")
    parser.add_argument("--verify-every", type=int, default=10,
                        help="stop the guest and check every page each N round trips")
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="a line per round trip")
    args = parser.parse_args(argv)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if args.verbose else \
        (lambda text: None)
    result = run_soak(args.round_trips, tls_creds=args.tls_creds, kind=args.kind,
                      memory=args.memory, working_set=args.working_set, warmup=args.warmup,
                      verify_every=args.verify_every, max_rss_growth=args.max_rss_growth,
                      say=say)
    print(json.dumps(result.to_dict()) if args.json else format_result(result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
