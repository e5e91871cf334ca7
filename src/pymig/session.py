"""One guest process as its operators see it: the guest, its outgoing or incoming migration,
the migration parameters, and the events they raise.

``pymig run`` and ``pymig incoming`` each hold one :class:`Session`; the control socket
(:mod:`pymig.control`) and the CLI call only its methods.  Run states follow QEMU's names:

    ``inmigrate``    waiting for, or loading, an incoming migration
    ``running``      the guest runs here
    ``paused``       stopped by ``stop`` (or by a failed incoming that never started)
    ``finish-migrate`` vCPUs stopped for the switchover
    ``postmigrate``  the guest has moved to the destination; only ``quit`` is left to do
    ``shutdown``     the guest powered off or the session quit
    ``internal-error`` the guest hit an error it cannot continue from
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from pymig.errors import MigrationError, PymigError
from pymig.guest import Guest
from pymig.incoming import Incoming, IncomingResult
from pymig.machine import Machine
from pymig.migration import Migration, Status
from pymig.parameters import CAPABILITIES, ParameterStore

EventSink = Callable[[str, dict], None]


class CommandError(PymigError):
    """A control command that cannot be carried out; ``klass`` is the QMP error class."""

    def __init__(self, desc: str, klass: str = "GenericError"):
        self.klass = klass
        super().__init__(desc)


class Session:
    """A guest process: its machine (once there is a guest), its migrations, its parameters."""

    def __init__(self, guest: Guest | None = None):
        self.params = ParameterStore()
        self.machine: Machine | None = Machine.source(guest) if guest is not None else None
        self.migration: Migration | None = None
        self.incoming: Incoming | None = None
        self.incoming_result: IncomingResult | None = None
        self.incoming_uri: str | None = None
        self._sinks: list[EventSink] = []
        self._lock = threading.Lock()
        self.quit_requested = threading.Event()
        self.guest_ready = threading.Event()
        self.trace_path: str | None = None
        self.incoming_options: dict[str, Any] = {}
        self._guest_callbacks: list[Callable[[Guest], None]] = []
        self.incoming_failed: BaseException | None = None
        if guest is not None:
            self.guest_ready.set()

    # -- events ------------------------------------------------------------------------------
    def subscribe(self, sink: EventSink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def unsubscribe(self, sink: EventSink) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def emit(self, name: str, data: dict) -> None:
        with self._lock:
            sinks = list(self._sinks)
        for sink in sinks:
            sink(name, data)

    # -- guest -------------------------------------------------------------------------------
    def on_guest(self, callback: Callable[[Guest], None]) -> None:
        """``callback(guest)`` as soon as this process has a guest and before it runs here:
        now for a source, just before the vCPUs start for a destination (so nothing the
        guest prints is missed)."""
        self._guest_callbacks.append(callback)
        if self.machine is not None:
            callback(self.machine.guest)

    def _guest_arrived(self, machine: Machine) -> None:
        for callback in list(self._guest_callbacks):
            callback(machine.guest)

    @property
    def guest(self) -> Guest | None:
        return self.machine.guest if self.machine is not None else None

    def run_state(self) -> str:
        if self.machine is None:
            return "inmigrate" if self.incoming is not None else "paused"
        migration = self.migration
        if migration is not None:
            if migration.status == Status.COMPLETED and not migration.resume_source:
                return "postmigrate"
            if migration.status == Status.DEVICE:
                return "finish-migrate"
        status = self.machine.guest.status
        return {"running": "running", "paused": "paused", "created": "paused",
                "shutdown": "shutdown", "error": "internal-error"}.get(status, status)

    def query_status(self) -> dict[str, Any]:
        state = self.run_state()
        return {"running": state == "running", "status": state}

    def stop(self) -> None:
        guest = self._require_guest()
        self._refuse_while_migrating("stop")
        guest.pause()
        self.emit("STOP", {})

    def cont(self) -> None:
        guest = self._require_guest()
        self._refuse_while_migrating("cont")
        if self.run_state() == "postmigrate":
            raise CommandError("the guest has migrated away; it runs on the destination now")
        guest.resume()
        self.emit("RESUME", {})

    def query_guest(self, verify: bool = False) -> dict[str, Any]:
        """The workload's progress (and, when asked and the guest is paused or self-checking,
        the self-check verdict), plus the console output so far."""
        guest = self._require_guest()
        result: dict[str, Any] = {"progress": guest.progress(), "workload": guest.config.workload,
                                  "kind": guest.config.kind, "status": guest.status}
        if verify and guest.config.workload == "selfcheck":
            from pymig.guest.workloads import verify_selfcheck

            report = verify_selfcheck(guest)
            result["selfcheck"] = {"ok": report.ok, "passes": report.passes,
                                   "errors": report.errors, "detail": report.detail}
        result["console"] = guest.console.text()[-4096:]
        return result

    def _require_guest(self) -> Guest:
        if self.machine is None:
            raise CommandError("there is no guest yet: the incoming migration has not loaded one")
        return self.machine.guest

    def _refuse_while_migrating(self, what: str) -> None:
        migration = self.migration
        if migration is not None and migration.status in (Status.SETUP, Status.ACTIVE,
                                                          Status.DEVICE, Status.CANCELLING):
            raise CommandError(f"cannot {what} during a migration ({migration.status.value})")

    # -- outgoing migration ------------------------------------------------------------------
    def migrate(self, uri: str, *, trace_path: str | None = None,
                resume: bool | None = None) -> None:
        if self.machine is None:
            raise CommandError("there is no guest to migrate")
        if self.machine.guest.status in ("shutdown", "error"):
            raise CommandError(f"the guest is {self.machine.guest.status}; nothing to migrate")
        if self.migration is None:
            self.migration = Migration(self.machine, self.params)
            self.migration.on_status(self._migration_status)
            self.migration.on_pass(self._migration_pass)
        try:
            self.migration.start(uri, trace_path=trace_path or self.trace_path,
                                 resume_source=resume)
        except (MigrationError, ValueError) as exc:
            raise CommandError(str(exc)) from None

    def migrate_cancel(self) -> None:
        if self.migration is not None:
            try:
                self.migration.cancel()
            except MigrationError as exc:
                raise CommandError(str(exc)) from None
        elif self.incoming is not None and self.machine is None:
            raise CommandError("an incoming migration cannot be cancelled from the destination;"
                               " cancel it on the source")

    def migrate_continue(self) -> None:
        if self.migration is None or self.migration.status != Status.ACTIVE:
            raise CommandError("no migration is waiting before switchover")
        self.migration.continue_switchover()

    def migrate_switchover(self) -> None:
        if self.migration is None or self.migration.status != Status.ACTIVE:
            raise CommandError("no active migration to switch over")
        self.migration.switchover()

    def query_migrate(self) -> dict[str, Any]:
        if self.migration is not None:
            return self.migration.query()
        if self.incoming is not None:
            status = self.incoming.status
            out: dict[str, Any] = {"status": status, "socket-address": self.incoming_uri}
            if self.incoming.error is not None:
                out["error-desc"] = str(self.incoming.error)
            if self.incoming_result is not None:
                r = self.incoming_result
                out["ram"] = dict(r.stats, received=r.bytes_received)
                out["load-time"] = round(r.load_time_s * 1000)
            return out
        return {}

    def _migration_status(self, old: Status, new: Status) -> None:
        self.emit("MIGRATION", {"status": new.value})

    def _migration_pass(self, record) -> None:
        self.emit("MIGRATION_PASS", {"pass": record.iteration})

    # -- parameters --------------------------------------------------------------------------
    def set_parameters(self, values: dict[str, Any]) -> None:
        try:
            self.params.set(**values)
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    def query_parameters(self) -> dict[str, Any]:
        return self.params.snapshot().qmp()

    def set_capabilities(self, caps: list[dict]) -> None:
        if self.migration is not None and self.migration.status in (
                Status.SETUP, Status.ACTIVE, Status.DEVICE):
            raise CommandError("capabilities cannot change during a migration")
        values: dict[str, bool] = {}
        for item in caps:
            if not isinstance(item, dict) or set(item) != {"capability", "state"}:
                raise CommandError("each capability is {\"capability\": NAME, \"state\": BOOL}")
            values[item["capability"]] = item["state"]
        try:
            self.params.set_capabilities(**values)
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    def query_capabilities(self) -> list[dict[str, Any]]:
        caps = self.params.snapshot().capabilities
        return [{"capability": name, "state": caps.get(name, False)} for name in CAPABILITIES]

    # -- incoming migration ------------------------------------------------------------------
    def prepare_incoming(self, uri: str, **incoming_options: Any) -> str:
        """Listen on ``uri`` now; :meth:`run_incoming` accepts and loads.  Returns the bound
        address."""
        if self.machine is not None:
            raise CommandError("this process already has a guest")
        if self.incoming is not None and self.incoming.status not in ("failed",):
            raise CommandError(f"an incoming migration is already {self.incoming.status}")
        chained = incoming_options.pop("before_start", None)

        def before_start(machine: Machine) -> None:
            if chained is not None:
                chained(machine)
            self._guest_arrived(machine)

        try:
            self.incoming = Incoming(uri, before_start=before_start, **incoming_options)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.incoming.on_status(lambda old, new: self.emit("MIGRATION", {"status": new}))
        self.incoming_uri = self.incoming.listen()
        return self.incoming_uri

    def run_incoming(self) -> IncomingResult:
        """Accept and load the migration, then run the guest here (blocks until it is loaded)."""
        assert self.incoming is not None
        result = self.incoming.run()
        self.incoming_result = result
        self.machine = result.machine
        self.migration = None
        self.guest_ready.set()
        self.emit("RESUME", {})
        return result

    def migrate_incoming(self, uri: str) -> str:
        """Listen on ``uri`` and load a migration in the background (a deferred destination's
        ``migrate-incoming``); returns the bound address."""
        if self.incoming is not None and self.incoming.status != "failed":
            raise CommandError(f"an incoming migration is already {self.incoming.status}")
        bound = self.prepare_incoming(uri, **self.incoming_options)
        self.start_incoming_thread()
        return bound

    def start_incoming_thread(self) -> None:
        """Accept and load in a thread; ``guest_ready`` or ``incoming_failed`` tells the end."""
        def body() -> None:
            try:
                self.run_incoming()
            except BaseException as exc:  # noqa: BLE001 - kept for the process to report
                self.incoming_failed = exc
                self.quit_requested.set()

        threading.Thread(target=body, name="pymig-incoming", daemon=True).start()

    # -- lifetime ----------------------------------------------------------------------------
    def quit(self) -> None:
        self.quit_requested.set()

    def close(self) -> None:
        migration = self.migration
        if migration is not None and migration.status in (Status.SETUP, Status.ACTIVE,
                                                          Status.DEVICE):
            migration.cancel()
            migration.wait(30)
        if self.machine is not None:
            self.machine.close()
        self.emit("SHUTDOWN", {"time": time.time()})
