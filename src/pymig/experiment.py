"""Experiments from Python: start a guest, measure its dirty rate, migrate it with parameters,
and get the stats and the per-sync trace as rows (lists of dicts, which
``pandas.DataFrame(rows)`` takes as they are).

What ``pymig run``, ``pymig dirtyrate``, ``pymig incoming`` and ``pymig migrate`` do, through
the same objects they use (:class:`pymig.session.Session`, :mod:`pymig.dirtyrate`), without a
control socket or a subprocess to drive::

    from pymig import experiment

    with experiment.Source.start("dirtier", kind="simulated", memory="256M",
                                 working_set="64M", rate=20_000) as source:
        rate = source.dirty_rate("1s", mode="dirty-bitmap")
        with experiment.Destination() as destination:
            run = source.migrate(destination, downtime_limit=100, max_bandwidth="100M")
    run.summary()         # one flat row: settings, total time, downtime, bytes, passes...
    run.trace             # one row per dirty-log sync (the --trace lines)

A :class:`Destination` receives in this process (a thread, as a ``pymig incoming`` does in
its own); ``Destination(process=True)`` runs ``pymig incoming`` as a child instead, so that
source and destination do not share an interpreter.  ``source.migrate("tcp:HOST:PORT")``
sends to any destination already listening.  A source whose guest has moved away is done:
start another for the next run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from pymig.errors import MigrationError, PymigError
from pymig.units import parse_size

#: Keyword settings of :meth:`Source.migrate` and their QMP parameter names.
PARAMETERS = {
    "downtime_limit": "downtime-limit",  # ms
    "max_bandwidth": "max-bandwidth",  # bytes/s, or a size such as "100M"
    "compression": "compression",
    "throttle_mode": "x-cpu-throttle-mode",
    "switchover_capped": "x-switchover-capped",
    "max_total_time": "max-total-time",  # ms
    "max_iterations": "max-iterations",
    "limit_action": "limit-action",
    "cpu_throttle_initial": "cpu-throttle-initial",
    "cpu_throttle_increment": "cpu-throttle-increment",
    "max_cpu_throttle": "max-cpu-throttle",
}


def migration_settings(*, auto_converge: bool | None = None, dirty_limit: int | None = None,
                       params: dict[str, Any] | None = None,
                       capabilities: dict[str, bool] | None = None,
                       **settings: Any) -> tuple[dict[str, Any], dict[str, bool]]:
    """The QMP parameters and capabilities for keyword ``settings`` (:data:`PARAMETERS`;
    ``max_bandwidth`` may be a size string), ``auto_converge`` and ``dirty_limit`` (pages/s
    per vCPU: the dirty-limit capability and vcpu-dirty-limit), with ``params`` and
    ``capabilities`` by their QMP names on top.  Raises ValueError for an unknown setting."""
    qmp: dict[str, Any] = {}
    for name, value in settings.items():
        if name not in PARAMETERS:
            raise ValueError(f"unknown migration setting {name!r}; known: "
                             f"{', '.join(sorted(PARAMETERS))}, auto_converge, dirty_limit")
        if value is None:
            continue
        if name == "max_bandwidth" and isinstance(value, str):
            value = parse_size(value)
        qmp[PARAMETERS[name]] = value
    caps: dict[str, bool] = {}
    if auto_converge is not None:
        caps["auto-converge"] = bool(auto_converge)
    if dirty_limit is not None:
        caps["dirty-limit"] = bool(dirty_limit)
        if dirty_limit:
            qmp["vcpu-dirty-limit"] = int(dirty_limit)
    qmp.update(params or {})
    caps.update(capabilities or {})
    return qmp, caps


def resolve_kind(kind: str) -> str:
    """``auto``: KVM where /dev/kvm works, else the simulated guest."""
    if kind == "auto":
        from pymig.demo import kvm_usable

        return "kvm" if kvm_usable() else "simulated"
    return kind


def _size(value: int | str | None) -> int | None:
    return parse_size(value) if isinstance(value, str) else value


@dataclass
class Run:
    """One finished migration: its settings, its final ``query-migrate`` stats and its trace
    (one dict per dirty-log sync, the fields of :class:`pymig.stats.TraceRecord`)."""

    settings: dict[str, Any]
    stats: dict[str, Any]
    trace: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.stats.get("status", "")

    @property
    def converged(self) -> bool:
        """Completed on the estimate's word (``fits-limit``), not forced by a limit."""
        return self.status == "completed" and self.stats.get("switchover-reason") == "fits-limit"

    def summary(self) -> dict[str, Any]:
        """One flat row: the settings, then what the migration did (ms, bytes)."""
        ram = self.stats.get("ram", {})
        row = dict(self.settings)
        row.update({
            "status": self.status,
            "converged": self.converged,
            "switchover_reason": self.stats.get("switchover-reason"),
            "total_ms": self.stats.get("total-time"),
            "downtime_ms": _downtime_ms(self.stats),
            "expected_downtime_ms": self.stats.get("downtime-expected-at-switchover"),
            "setup_ms": self.stats.get("setup-time"),
            "transferred_bytes": ram.get("transferred"),
            "normal_pages": ram.get("normal"),
            "zero_pages": ram.get("duplicate"),
            "iterations": self.stats.get("iterations"),
            "throttle_peak_pct": self.stats.get("cpu-throttle-peak", 0),
            "error": self.stats.get("error-desc"),
        })
        return row


def _downtime_ms(stats: dict[str, Any]) -> float | None:
    phases = stats.get("downtime-breakdown")
    if phases:  # to 0.01 ms, where "downtime" is whole ms
        return round(float(sum(phases.values())), 3)
    value = stats.get("downtime")
    return None if value is None else float(value)


def frame(rows: list[dict[str, Any]]):
    """``rows`` as a pandas DataFrame (pandas is optional: ImportError saying so without it)."""
    try:
        import pandas
    except ImportError:
        raise ImportError("pymig.experiment.frame needs pandas (pip install pandas); the rows "
                          "themselves are plain dicts") from None
    return pandas.DataFrame(rows)


class Destination:
    """A destination to migrate to: a session receiving on ``uri`` in this process (a thread),
    or with ``process=True`` a ``pymig incoming`` child process.  Either takes guests of both
    kinds.  ``uri`` is the address it actually listens on once started."""

    def __init__(self, listen: str = "tcp:127.0.0.1:0", *, process: bool = False,
                 command_prefix: tuple[str, ...] = ()):
        self.listen = listen
        self.process = process
        # the process's command runs behind this (e.g. ip netns exec NAME)
        self.command_prefix = tuple(command_prefix)
        self.uri: str | None = None
        self.session = None
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._control: str | None = None

    def start(self) -> "Destination":
        if self.process:
            self._start_process()
        else:
            from pymig.limits import DestinationLimits
            from pymig.session import Session

            self.session = Session(destination=True)
            self.session.incoming_options = {
                "limits": DestinationLimits(accept_kinds=("kvm", "simulated"))}
            self.uri = self.session.start_incoming(self.listen)
        return self

    def _start_process(self) -> None:
        from pymig.qmp import QmpClient, wait_for_socket

        self._tmp = tempfile.TemporaryDirectory(prefix="pymig-dst-")
        self._control = os.path.join(self._tmp.name, "dst.sock")
        self._proc = subprocess.Popen(
            [*self.command_prefix, sys.executable, "-m", "pymig", "incoming", self.listen,
             "--control", self._control, "--quiet", "--accept-kind", "kvm,simulated"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_socket(self._control, self._proc, "destination", 60)
        with QmpClient(self._control) as client:
            self.uri = client.command("query-migrate")["socket-address"]

    def wait_guest(self, timeout: float = 30.0) -> bool:
        """Whether the guest arrived and runs here within ``timeout`` seconds."""
        if self.session is not None:
            return self.session.guest_ready.wait(timeout)
        from pymig.qmp import QmpClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with QmpClient(self._control) as client:
                if client.command("query-status")["status"] == "running":
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(20)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "Destination":
        return self.start() if self.uri is None else self

    def __exit__(self, *exc) -> None:
        self.close()


class Source:
    """A running guest in this process, as ``pymig run`` holds one (a
    :class:`~pymig.session.Session`), ready to be measured and migrated."""

    def __init__(self, session, description: dict[str, Any]):
        self.session = session
        self.description = description  # kind, workload, memory and its parameters

    @classmethod
    def start(cls, workload: str = "dirtier", *, kind: str = "auto",
              memory: int | str = "256M", vcpus: int = 1,
              working_set: int | str | None = None, rate: int | None = None,
              pattern: str | None = None, dirty_ring: int = 0, warmup_s: float = 0.0,
              **params: Any) -> "Source":
        """Build and start a guest: ``kind`` kvm, simulated or auto; a built-in ``workload``
        with its parameters (``working_set`` and ``rate`` in pages/s for the dirtier and
        selfcheck, ``pattern`` for the dirtier, others by their names); ``warmup_s``: let it
        run that long before returning.  Raises ValueError for a configuration no guest runs."""
        from pymig import guest as guests
        from pymig.session import Session

        kind = resolve_kind(kind)
        memory_bytes = _size(memory)
        extra = {"working_set_bytes": _size(working_set), "rate_pages_per_s": rate,
                 "pattern": pattern}
        params = {**{k: v for k, v in extra.items() if v is not None}, **params}
        config = guests.make_config(kind=kind, workload=workload, params=params,
                                    memory_bytes=memory_bytes, vcpus=vcpus)
        guest = guests.create(config, dirty_ring=dirty_ring)
        try:
            guest.start()
        except BaseException:
            guest.close()
            raise
        if warmup_s > 0:
            time.sleep(warmup_s)
        return cls(Session(guest), {"kind": kind, "workload": workload,
                                    "memory_bytes": memory_bytes, "vcpus": vcpus, **params})

    @property
    def guest(self):
        return self.session.guest

    def data_pages(self) -> tuple[int, int]:
        """(pages that may hold data, of which all zero) now: the first pass of a migration
        reads the pages faulted in since the RAM was mapped (the rest is zero and never sent)
        and sends a zero one in a few bytes."""
        import numpy as np

        from pymig import core

        touched = zero = 0
        for block in self.guest.ram_blocks:
            bitmap = block.touched()
            touched += int(np.unpackbits(bitmap.view(np.uint8)).sum())
            zeros = core.zero_bitmap(block.mem, block.page_size, bitmap, block.npages)
            zero += int(np.unpackbits(np.asarray(zeros).view(np.uint8)).sum())
        return touched, zero

    def zero_profile(self, stretches: int = 128) -> list[float]:
        """Where the all-zero pages are: of the pages that may hold data (those a first pass
        reads), in address order across the RAM blocks, cut into ``stretches`` equal
        stretches, the share of each that is all zero now."""
        import numpy as np

        from pymig import core

        touched_all, zero_all = [], []
        for block in self.guest.ram_blocks:
            bitmap = block.touched()
            zeros = core.zero_bitmap(block.mem, block.page_size, bitmap, block.npages)
            bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:block.npages]
            zbits = np.unpackbits(np.asarray(zeros).view(np.uint8),
                                  bitorder="little")[:block.npages]
            touched_all.append(bits.astype(bool))
            zero_all.append(zbits.astype(bool))
        touched = np.concatenate(touched_all) if touched_all else np.zeros(0, bool)
        zero = np.concatenate(zero_all)[touched] if zero_all else np.zeros(0, bool)
        if not zero.size:
            return []
        return [float(part.mean()) for part in np.array_split(zero, min(stretches, zero.size))]

    def dirty_rate(self, calc_time: str | int = "1s", mode: str = "dirty-bitmap",
                   sample_pages: int | None = None, timeout: float = 120.0) -> dict[str, Any]:
        """Measure the guest's dirty rate (QEMU's calc-dirty-rate; ``calc_time`` as ``pymig
        dirtyrate --calc-time`` takes it, or ms) and return ``query-dirty-rate``'s answer:
        write rate, working set and its curve, what measuring cost."""
        from pymig.dirtyrate import parse_calc_time

        ms = calc_time if isinstance(calc_time, int) else parse_calc_time(calc_time)
        args: dict[str, Any] = {"calc-time": ms, "calc-time-unit": "millisecond", "mode": mode}
        if sample_pages is not None:
            args["sample-pages"] = sample_pages
        self.session.calc_dirty_rate(args)
        if not self.session.dirty_rate.wait(timeout):
            raise TimeoutError(f"the dirty-rate measurement did not end within {timeout} s")
        return self.session.query_dirty_rate("millisecond")

    def migrate(self, destination: "Destination | str", *, timeout: float = 300.0,
                trace: bool = True, **settings: Any) -> Run:
        """Migrate to ``destination`` (a :class:`Destination` or a URI) with ``settings``
        (see :func:`migration_settings`), wait for the end, and return the :class:`Run`:
        completed, failed or cancelled alike (a failure leaves the guest running here; a
        cancelled one too).  A run that does not end within ``timeout`` is cancelled."""
        from pymig.stats import read_trace

        uri = destination.uri if isinstance(destination, Destination) else destination
        qmp, caps = migration_settings(**settings)
        session = self.session
        session.set_parameters(qmp)
        session.set_capabilities([{"capability": name, "state": state}
                                  for name, state in caps.items()])
        with tempfile.TemporaryDirectory(prefix="pymig-run-") as tmp:
            trace_path = os.path.join(tmp, "trace.jsonl") if trace else None
            session.migrate(uri, trace_path=trace_path)
            migration = session.migration
            if migration.wait(timeout).value not in ("completed", "failed", "cancelled"):
                try:
                    migration.cancel()
                except MigrationError:
                    pass
                migration.wait(30)
            stats = session.query_migrate()
            rows = read_trace(trace_path) if trace and os.path.exists(trace_path) else []
        if isinstance(destination, Destination) and stats.get("status") == "completed":
            destination.wait_guest()
        described = {**self.description, **{k: v for k, v in settings.items()
                                            if not isinstance(v, dict)}}
        return Run(described, stats, rows)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Destination", "PymigError", "Run", "Source", "frame", "migration_settings"]
