"""Every harness in turn, each for a time or a number of executions: ``python -m pymig.fuzz run``.

Each target runs in a process of its own (``python -m pymig.fuzz TARGET``) over a working
corpus seeded from ``SEEDS/<target>`` (made first when missing, see :mod:`pymig.fuzz.seeds`),
with libFuzzer's per-input time and memory limits.  What libFuzzer reports is gathered into a
summary per target: executions, executions per second, coverage (``cov``: edges, here the
branches of pymig's instrumented Python and of any native code built for the fuzzer; ``ft``:
libFuzzer's finer features), corpus size, and crashes, each a file under
``ARTIFACTS/<target>/`` that ``python -m pymig.fuzz repro TARGET FILE`` replays.  The summary
is printed, and written as JSON and Markdown when asked.  The exit status is 1 if any target
crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pymig.fuzz import TARGETS, _harness

DEFAULT_TIMEOUT_S = 20
DEFAULT_RSS_LIMIT_MB = 2048
_STATUS = re.compile(r"^#(\d+)\s+\S+\s+cov: (\d+) ft: (\d+)(?: corp: (\d+)/)?")
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")
_ARTIFACT = re.compile(r"^(crash|timeout|oom|leak)-")


@dataclass
class Result:
    """What one target's run came to."""

    target: str
    seconds: float = 0.0
    executions: int = 0
    exec_per_s: float = 0.0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    peak_rss_mb: int = 0
    exit_code: int | None = None
    crashes: list[str] = field(default_factory=list)
    log: str = ""

    @property
    def ok(self) -> bool:
        return not self.crashes and self.exit_code == 0


def parse(output: str, result: Result) -> None:
    """Fill ``result`` from libFuzzer's output (status lines and final stats)."""
    for line in output.splitlines():
        status = _STATUS.match(line)
        if status:
            result.executions = max(result.executions, int(status[1]))
            result.cov, result.ft = int(status[2]), int(status[3])
            if status[4]:
                result.corpus = int(status[4])
            continue
        stat = _STAT.match(line)
        if stat:
            name, value = stat[1], int(stat[2])
            if name == "number_of_executed_units":
                result.executions = value
            elif name == "average_exec_per_sec":
                result.exec_per_s = value
            elif name == "peak_rss_mb":
                result.peak_rss_mb = value


def run_target(target: str, *, seeds: Path, corpus: Path, artifacts: Path, logs: Path,
               seconds: float | None, runs: int | None, timeout_s: int, rss_limit_mb: int,
               env: dict[str, str], extra: list[str] = ()) -> Result:
    """Fuzz one target; returns what it came to."""
    work = corpus / target
    found = artifacts / target
    work.mkdir(parents=True, exist_ok=True)
    found.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(found))
    args = [sys.executable, "-m", "pymig.fuzz", target, "-print_final_stats=1",
            f"-artifact_prefix={found}{os.sep}", f"-timeout={timeout_s}",
            f"-rss_limit_mb={rss_limit_mb}", *extra]
    if seconds is not None:
        args.append(f"-max_total_time={max(1, int(seconds))}")
    if runs is not None:
        args.append(f"-runs={runs}")
    args += [str(work), str(seeds / target)]
    result = Result(target)
    log = logs / f"{target}.log"
    last = logs / f"{target}.last-input"
    result.log = str(log)
    started = time.monotonic()
    with open(log, "w") as handle:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=handle,
                              stderr=subprocess.STDOUT,
                              env={**env, _harness.LAST_INPUT_ENV: str(last)})
    result.seconds = round(time.monotonic() - started, 1)
    result.exit_code = proc.returncode
    parse(log.read_text(errors="replace"), result)
    if not result.exec_per_s and result.seconds:
        result.exec_per_s = round(result.executions / result.seconds)
    result.crashes = sorted(str(found / name) for name in set(os.listdir(found)) - before
                            if _ARTIFACT.match(name))
    if proc.returncode < 0 and not result.crashes and last.exists():
        # killed by a signal libFuzzer never saw (see pymig.fuzz._harness._recording)
        data = last.read_bytes()
        crash = found / f"crash-signal{-proc.returncode}-{hashlib.sha1(data).hexdigest()}"
        crash.write_bytes(data)
        result.crashes.append(str(crash))
    last.unlink(missing_ok=True)
    for directory in (found, artifacts):  # nothing found: nothing left behind
        if directory.is_dir() and not os.listdir(directory):
            directory.rmdir()
    return result


def markdown(results: list[Result], title: str) -> str:
    lines = [f"### {title}", "",
             "| target | executions | exec/s | cov | ft | corpus | peak RSS MB | crashes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.target} | {r.executions:,} | {r.exec_per_s:,.0f} | {r.cov:,} | "
                     f"{r.ft:,} | {r.corpus:,} | {r.peak_rss_mb:,} | {len(r.crashes)} |")
    total = sum(r.executions for r in results)
    lines += ["", f"{total:,} executions in all, {sum(len(r.crashes) for r in results)} "
                  f"crashes."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pymig.fuzz run", description=__doc__)
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated targets (default: all)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, help="per target")
    budget.add_argument("--runs", type=int, help="executions per target")
    parser.add_argument("--target-runs", action="append", default=[], metavar="TARGET=N",
                        help="executions for one target instead of --runs (repeatable: the "
                             "targets run at speeds hundreds of times apart)")
    parser.add_argument("--seeds", type=Path, help="seed corpora (made there when missing; "
                                                   "default: made in a temporary directory)")
    parser.add_argument("--quick-seeds", action="store_true",
                        help="make only the few seeds of the CI smoke run")
    parser.add_argument("--corpus", type=Path, help="working corpora, kept (default: "
                                                    "temporary)")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"),
                        help="crashes go to ARTIFACTS/<target>/ (default: ./fuzz-artifacts)")
    parser.add_argument("--logs", type=Path, help="keep each target's libFuzzer output here "
                                                  "(default: shown only for a failure)")
    parser.add_argument("--summary", type=Path, help="write the summary as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the summary as Markdown here")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S,
                        help="seconds one input may take (libFuzzer -timeout)")
    parser.add_argument("--rss-limit-mb", type=int, default=DEFAULT_RSS_LIMIT_MB)
    parser.add_argument("--kvm", action="store_true",
                        help="destinations build KVM guests too (PYMIG_FUZZ_KVM=1; not on a "
                             "shared host)")
    parser.add_argument("libfuzzer", nargs="*", help="more libFuzzer flags, after --")
    args = parser.parse_args(argv)
    if args.seconds is None and args.runs is None and not args.target_runs:
        args.seconds = 60.0
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown} (known: {', '.join(TARGETS)})")
    runs_for = {}
    for item in args.target_runs:
        target, _, number = item.partition("=")
        if target not in TARGETS or not number.isdigit():
            parser.error(f"--target-runs {item!r}: expected TARGET=N with a known target")
        runs_for[target] = int(number)
    if runs_for and args.runs is None:
        parser.error("--target-runs goes with --runs (the budget of the other targets)")
    env = dict(os.environ)
    if args.kvm:
        env["PYMIG_FUZZ_KVM"] = "1"
    scratch = Path(tempfile.mkdtemp(prefix="pymig-fuzz-"))
    try:
        seeds = args.seeds or scratch / "seeds"
        if not all((seeds / t).is_dir() for t in targets):
            from pymig.fuzz import seeds as make_seeds

            print(f"making seeds in {seeds} ...", flush=True)
            counts = make_seeds.generate(seeds, quick=args.quick_seeds,
                                         kvm=True if args.kvm else None)
            print("seeds: " + ", ".join(f"{t} {n}" for t, n in counts.items()), flush=True)
        corpus = args.corpus or scratch / "corpus"
        logs = args.logs or scratch / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        results = []
        for target in targets:
            result = run_target(target, seeds=seeds, corpus=corpus, artifacts=args.artifacts,
                                logs=logs, seconds=args.seconds,
                                runs=runs_for.get(target, args.runs),
                                timeout_s=args.timeout, rss_limit_mb=args.rss_limit_mb,
                                env=env, extra=args.libfuzzer)
            results.append(result)
            verdict = "ok" if result.ok else (f"{len(result.crashes)} crash(es): "
                                              + " ".join(result.crashes) if result.crashes
                                              else f"exit {result.exit_code}, see {result.log}")
            print(f"{target:8} {result.executions:>10,} runs {result.exec_per_s:>8,.0f}/s "
                  f"cov {result.cov:>6,} ft {result.ft:>6,} corpus {result.corpus:>5,} "
                  f"{result.seconds:>7.1f} s  {verdict}", flush=True)
            if not result.ok and not args.logs:  # the log goes with the scratch directory
                print(Path(result.log).read_text(errors="replace")[-4000:], flush=True)
        if args.seconds is not None:
            budget = f"{args.seconds:g} s per target"
        else:
            budget = ", ".join(f"{t} {runs_for.get(t, args.runs):,}" for t in targets) \
                + " executions"
        if args.summary:
            args.summary.write_text(json.dumps({"budget": budget, "backend": _backend(),
                                                "results": [asdict(r) for r in results]},
                                               indent=2) + "\n")
        if args.markdown:
            args.markdown.write_text(markdown(results, f"pymig fuzzing, {budget}, "
                                                       f"{_backend()} backend"))
        return 0 if all(r.ok for r in results) else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _backend() -> str:
    return "reference" if os.environ.get("PYMIG_PUREPYTHON") == "1" else "compiled"
