"""One guest process as its operators see it: the guest, its outgoing or incoming migration,
the migration parameters, and the events they raise.

``pymig run`` and ``pymig incoming`` each hold one :class:`Session`; the control socket
(:mod:`pymig.control`) and the CLI call only its methods.  Run states follow QEMU's names:

    ``inmigrate``    a destination waiting for (``defer``: for ``migrate-incoming``), or
                     loading, an incoming migration
    ``running``      the guest runs here
    ``paused``       stopped by ``stop``, or by ``migrate`` with ``resume: false`` to a file
                     (a snapshot is a copy: ``cont`` carries on).  A migration leaves a
                     paused guest paused: a failed or cancelled one, and a snapshot, end
                     with the guest in the state it had before (as QEMU's)
    ``finish-migrate`` vCPUs stopped for the switchover
    ``postmigrate``  the guest has moved (tcp, unix, exec, fd): it runs, or will run, at the
                     destination; ``cont`` is refused; ``quit``, or ``migrate-incoming`` to
                     receive a guest again (the one that left is released first: ``inmigrate``)
    ``shutdown``     the guest powered off or the session quit
    ``internal-error`` the guest hit an error it cannot continue from

Events: ``MIGRATION`` ``{"status"}`` on every status change of the outgoing or incoming
migration, ``MIGRATION_PASS`` ``{"pass"}`` after every dirty-log sync, ``STOP`` when the guest
stops (``stop``, or the switchover), ``RESUME`` when it runs again (``cont``, a snapshot or a
failed migration resuming it, a loaded incoming guest starting), ``SHUTDOWN`` at the end,
``BLOCK_IO_ERROR`` ``{"device", "operation", "action", "nospace", "reason"}`` when the image of
a guest's disk fails a read, write or flush (the guest sees a disk error).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

from pymig import blockdev
from pymig.errors import MigrationError, PostcopyPaused, PymigError
from pymig.guest import Guest
from pymig.incoming import Incoming, IncomingResult
from pymig.machine import Machine
from pymig.memory import release_freed_memory
from pymig.migration import ACTIVE_STATES, Migration, Status
from pymig.parameters import CAPABILITIES, ParameterStore
from pymig.transport.tlscreds import CredentialStore, TlsCredentials

EventSink = Callable[[str, dict], None]


class CommandError(PymigError):
    """A control command that cannot be carried out; ``klass`` is the QMP error class."""

    def __init__(self, desc: str, klass: str = "GenericError"):
        self.klass = klass
        super().__init__(desc)


class Session:
    """A guest process: its machine (once there is a guest), its migrations, its parameters."""

    def __init__(self, guest: Guest | None = None, *, destination: bool = False):
        if guest is not None and destination:
            raise ValueError("a destination session starts without a guest")
        self.destination = destination
        self.params = ParameterStore()
        self.credentials = CredentialStore()  # what the tls-creds parameter names
        self.machine: Machine | None = Machine.source(guest) if guest is not None else None
        self.migration: Migration | None = None
        self.incoming: Incoming | None = None
        self.incoming_result: IncomingResult | None = None
        self.incoming_uri: str | None = None
        self._sinks: list[EventSink] = []
        self._lock = threading.Lock()
        self._command_lock = threading.Lock()  # migrate / migrate-incoming, one at a time
        self._stopped_for_switchover = False
        self.quit_requested = threading.Event()
        self.guest_ready = threading.Event()
        self.trace_path: str | None = None
        self.incoming_options: dict[str, Any] = {}
        self.incoming_failed: BaseException | None = None
        self._guest_callbacks: list[Callable[[Guest], None]] = []
        self.dirty_rate = None  # the latest calc-dirty-rate (pymig.dirtyrate)
        self._dirty_rate_lock = threading.Lock()
        if guest is not None:
            self.guest_ready.set()
        self.on_guest(self._watch_disks)

    def on_guest(self, callback: Callable[[Guest], None]) -> None:
        """``callback(guest)`` as soon as this process has a guest and before it runs here:
        now for a source, just before the vCPUs start for a destination (so nothing the
        guest prints is missed)."""
        self._guest_callbacks.append(callback)
        if self.machine is not None:
            callback(self.machine.guest)

    def _watch_disks(self, guest: Guest) -> None:
        """Report each disk error the guest sees as QEMU's BLOCK_IO_ERROR event."""
        observers = getattr(guest, "disk_error_observers", None)
        if observers is None:
            return

        def report(event) -> None:
            self.emit("BLOCK_IO_ERROR", {"device": f"ide0-hd{event.unit}",
                                         "operation": event.operation, "action": "report",
                                         "nospace": event.nospace, "reason": event.reason})

        observers.append(report)

    def _guest_arrived(self, machine: Machine) -> None:
        for callback in list(self._guest_callbacks):
            callback(machine.guest)

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
    @property
    def guest(self) -> Guest | None:
        return self.machine.guest if self.machine is not None else None

    def run_state(self) -> str:
        if self.machine is None:
            return "inmigrate" if self.destination or self.incoming is not None else "paused"
        if self.moved_away():
            return "postmigrate"
        migration = self.migration
        if migration is not None and migration.status in (Status.PRE_SWITCHOVER, Status.DEVICE):
            return "finish-migrate"
        status = self.machine.guest.status
        return {"running": "running", "paused": "paused", "created": "paused",
                "shutdown": "shutdown", "error": "internal-error"}.get(status, status)

    def moved_away(self) -> bool:
        """True once a migration handed the guest to a destination (a file snapshot does not:
        the guest stays here, running or, when asked, paused)."""
        return self.migration is not None and self.migration.moved_away

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
        if self.moved_away():
            raise CommandError("the guest has migrated away and runs at the destination now; "
                               "running it here too would make two copies (to save a guest "
                               "and keep it running, migrate with resume: true)")
        guest.resume()
        self.emit("RESUME", {})

    def ram_arriving(self) -> bool:
        """Whether this destination's guest runs while its RAM is still coming (an incoming
        post-copy not over: active, paused or recovering): a page read now may be missing."""
        return self.incoming is not None and self.incoming.status.startswith("postcopy")

    def query_guest(self, verify: bool = False) -> dict[str, Any]:
        """The workload's progress (and, when asked and the guest is paused or self-checking,
        the self-check verdict), plus the console output so far."""
        guest = self._require_guest()
        if verify and self.ram_arriving():
            # Its pages are still coming: reading all of RAM here would wait for them holding
            # the GIL that the threads bringing them need (docs/architecture.md, "Post-copy").
            raise CommandError(f"the guest's RAM is still arriving ({self.incoming.status}); "
                               f"verify it once the migration has completed")
        result: dict[str, Any] = {"progress": guest.progress(), "workload": guest.config.workload,
                                  "kind": guest.config.kind, "status": guest.status}
        if verify and guest.config.workload == "selfcheck":
            from pymig.guest.workloads import verify_selfcheck

            report = verify_selfcheck(guest)
            result["selfcheck"] = {"ok": report.ok, "passes": report.passes,
                                   "errors": report.errors, "detail": report.detail}
        if verify and guest.config.workload == "diskcheck":
            from pymig.guest.workloads import verify_diskcheck

            report = verify_diskcheck(guest.config.disks[0].path, guest.config,
                                      guest.mailbox()[0])
            result["diskcheck"] = {"ok": report.ok, "passes": report.passes,
                                   "errors": report.errors, "detail": report.detail}
        result["console"] = guest.console.text()[-4096:]
        return result

    # -- disks -------------------------------------------------------------------------------
    def _checkpoints_in_use(self) -> dict[int, set[str]]:
        """Per disk unit, the checkpoint an incremental migration under way sends from."""
        migration, machine = self.migration, self.machine
        if machine is None or migration is None or migration.status not in ACTIVE_STATES:
            return {}
        return {saver.unit: {saver.checkpoint.name} for saver in machine.block_savers
                if saver.checkpoint is not None}

    def query_block(self) -> list[dict[str, Any]]:
        if self.machine is None:
            return []
        return blockdev.query_block(self.machine.guest, self._checkpoints_in_use())

    def block_dirty_bitmap_add(self, args: dict) -> None:
        blockdev.add_bitmap(self._require_guest(), args["node"], args["name"],
                            granularity=args.get("granularity"),
                            persistent=args.get("persistent"), disabled=args.get("disabled"))

    def block_dirty_bitmap_remove(self, args: dict) -> None:
        blockdev.remove_bitmap(self._require_guest(), args["node"], args["name"],
                               self._checkpoints_in_use())

    def _require_guest(self) -> Guest:
        if self.machine is None:
            raise CommandError("there is no guest yet: the incoming migration has not loaded one")
        return self.machine.guest

    def _refuse_while_migrating(self, what: str) -> None:
        migration = self.migration
        if migration is not None and migration.status in ACTIVE_STATES:
            raise CommandError(f"cannot {what} during a migration ({migration.status.value}); "
                               f"migrate_cancel first")

    # -- outgoing migration ------------------------------------------------------------------
    def migrate(self, uri: str, *, trace_path: str | None = None,
                resume: bool | None = None, blk: bool = False, inc: bool = False) -> None:
        """Start migrating to ``uri`` (returns at once).  ``resume``: whether the guest runs on
        here after success if it ran before (default: only for ``file:``, a live snapshot); a
        guest paused before stays paused.  ``blk``: the images of disks not on shared storage
        travel with the guest (block migration); ``inc``: only what was written to them since
        their checkpoint."""
        with self._command_lock:
            if self.machine is None:
                raise CommandError("there is no guest to migrate" + (
                    " (this is a destination still waiting for its guest)"
                    if self.destination else ""))
            if self.machine.guest.status in ("shutdown", "error"):
                raise CommandError(f"the guest is {self.machine.guest.status}; nothing to "
                                   f"migrate")
            if resume and self.migration is not None \
                    and self.migration.status == Status.POSTCOPY_PAUSED:
                try:  # QEMU's resume=true: a post-copy paused by a lost connection goes on
                    self.migration.recover(uri)
                except (MigrationError, ValueError) as exc:
                    raise CommandError(str(exc)) from None
                return
            if self.moved_away():
                raise CommandError("the guest has already migrated away")
            if self.migration is not None and self.migration.status in ACTIVE_STATES:
                raise CommandError(f"a migration is already {self.migration.status.value}")
            if self.migration is not None:
                try:  # the last one's live entries are the new one's: cleaned up first
                    self.migration.wait_released()
                except MigrationError as exc:
                    raise CommandError(str(exc)) from None
            # A new Migration each time: one that ended (a snapshot that completed, a failure)
            # keeps its own stats and status for query-migrate until then.
            migration = Migration(self.machine, self.params, credentials=self.credentials)
            migration.on_status(self._migration_status)
            migration.on_pass(self._migration_pass)
            previous, self.migration = self.migration, migration
            try:
                migration.start(uri, trace_path=trace_path or self.trace_path,
                                resume_source=resume, blk=blk, inc=inc)
            except (MigrationError, ValueError) as exc:
                self.migration = previous
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
        if self.migration is None:
            raise CommandError("Migration not in expected state: none")
        try:
            self.migration.continue_switchover()
        except MigrationError as exc:
            raise CommandError(str(exc)) from None

    def migrate_recover(self, uri: str) -> str:
        """``migrate-recover``: a destination paused in post-copy listens on ``uri`` for its
        source to reconnect (``migrate uri resume=true``)."""
        if self.incoming is None:
            raise CommandError("migrate-recover is for a destination whose post-copy paused")
        try:
            return self.incoming.recover(uri)
        except (MigrationError, ValueError) as exc:
            raise CommandError(str(exc)) from None

    def migrate_start_postcopy(self) -> None:
        """``migrate-start-postcopy``: the migration switches to post-copy at its next
        decision."""
        if self.migration is None:
            raise CommandError("Postcopy must be started after migration has been started")
        try:
            self.migration.start_postcopy()
        except MigrationError as exc:
            raise CommandError(str(exc)) from None

    def migrate_switchover(self) -> None:
        if self.migration is None or self.migration.status != Status.ACTIVE:
            raise CommandError("no active migration to switch over")
        self.migration.switchover()

    def query_migrate(self) -> dict[str, Any]:
        migration = self.migration
        if migration is not None:
            out = migration.query()
            # The state machine's status, as the MIGRATION events report it: the stats turn
            # to "device" when the policy decides, while the guest may still run (waiting for
            # the destination to be ready).
            out["status"] = migration.status.value
            return out
        if self.incoming is not None:
            status = self.incoming.status
            out: dict[str, Any] = {"status": status, "socket-address": self.incoming_uri}
            if self.incoming.error is not None:
                out["error-desc"] = str(self.incoming.error)
            if self.incoming_result is not None:
                r = self.incoming_result
                out["ram"] = dict(r.stats, received=r.bytes_received)
                out["load-time"] = round(r.load_time_s * 1000)
            if self.incoming.postcopy is not None:
                out["postcopy"] = self.incoming.postcopy.query()
            return out
        return {}

    def _migration_status(self, old: Status, new: Status) -> None:
        self.emit("MIGRATION", {"status": new.value})
        if new in (Status.PRE_SWITCHOVER, Status.DEVICE, Status.POSTCOPY_ACTIVE):
            # (called before the vCPUs stop: a guest already paused by the user stops no more)
            if self.machine is not None and self.machine.guest.status == "running":
                self._stopped_for_switchover = True
                self.emit("STOP", {})
        elif new in (Status.COMPLETED, Status.FAILED, Status.CANCELLED):
            stopped, self._stopped_for_switchover = self._stopped_for_switchover, False
            if stopped and self.machine is not None and self.machine.guest.status == "running":
                self.emit("RESUME", {})  # a snapshot carries on, or a failure resumed it

    def _migration_pass(self, record) -> None:
        self.emit("MIGRATION_PASS", {"pass": record.iteration})

    # -- dirty rate --------------------------------------------------------------------------
    def calc_dirty_rate(self, args: dict[str, Any]) -> None:
        """``calc-dirty-rate``: measure the guest's dirty rate (returns at once; follow it with
        ``query-dirty-rate``).  During a migration too, as QEMU: neither takes from the
        other."""
        from pymig.dirtyrate import DirtyRateConfig, DirtyRateMeasurement

        guest = self._require_guest()
        if self.moved_away():
            raise CommandError("the guest has migrated away; measure it at the destination")
        if guest.status in ("shutdown", "error"):
            raise CommandError(f"the guest is {guest.status}; nothing to measure")
        if self.ram_arriving():
            # Sampled pages may still be missing, and are hashed holding the GIL that the
            # threads bringing them need (as a full self-check would: see query_guest).
            raise CommandError(f"the guest's RAM is still arriving ({self.incoming.status}); "
                               f"measure its dirty rate once the migration has completed")
        with self._dirty_rate_lock:
            if self.dirty_rate is not None and self.dirty_rate.measuring:
                raise CommandError("the dirty rate is already being measured.")
            try:
                measurement = DirtyRateMeasurement(guest, DirtyRateConfig.from_qmp(args))
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            self.dirty_rate = measurement
            measurement.start()

    def query_dirty_rate(self, unit: str = "second") -> dict[str, Any]:
        """``query-dirty-rate``: the latest measurement, ``calc-time`` in ``unit``."""
        from pymig.dirtyrate import dirty_rate_info

        try:
            return dirty_rate_info(self.dirty_rate, unit)
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    # -- parameters --------------------------------------------------------------------------
    def set_parameters(self, values: dict[str, Any]) -> None:
        """Set parameters by QMP name, all or none.  During a migration ``max-bandwidth``
        applies at once, the others at its next iteration (the TLS ones at the next
        migration).  A ``tls-creds`` directory is loaded here, so that credentials that
        cannot work are refused now."""
        from pymig.errors import TlsError

        creds = values.get("tls-creds")
        if isinstance(creds, str) and creds:
            try:
                self.credentials.resolve(creds, reload=True)
            except TlsError as exc:
                raise CommandError(str(exc)) from None
        try:
            self.params.set(**values)
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    def load_credentials(self, directory: str, ident: str = "tls0", *,
                         verify_peer: bool = True) -> None:
        """Load TLS credentials at start (``--tls-creds DIR``) under ``ident`` and make them
        this process's ``tls-creds``; raises TlsError saying what is wrong with them."""
        self.credentials.add(ident, TlsCredentials.load(directory, verify_peer=verify_peer))
        self.params.set(**{"tls-creds": ident})

    def _incoming_tls(self):
        """(credentials, tls-authz) for an incoming migration, None without tls-creds."""
        from pymig.errors import TlsError

        params = self.params.snapshot()
        if not params.tls_creds:
            if params.tls_authz:
                raise CommandError("tls-authz is set but tls-creds is not: without TLS no "
                                   "source identity can be checked")
            return None
        try:
            creds = self.credentials.resolve(params.tls_creds)
            creds.for_role(server=True)
        except TlsError as exc:
            raise CommandError(str(exc)) from None
        if params.tls_authz and not creds.verify_peer:
            raise CommandError(f"tls-authz needs the sources' certificates, and the "
                               f"credentials {creds.directory} say verify-peer=off")
        return creds, params.tls_authz

    def query_parameters(self) -> dict[str, Any]:
        return self.params.snapshot().qmp()

    def set_capabilities(self, caps: list) -> None:
        """Switch capabilities, all or none; refused while a migration runs."""
        migration = self.migration
        if migration is not None and migration.status in ACTIVE_STATES:
            raise CommandError(f"capabilities cannot change during a migration "
                               f"({migration.status.value})")
        values: dict[str, bool] = {}
        for item in caps:
            if (not isinstance(item, dict) or set(item) != {"capability", "state"}
                    or not isinstance(item["capability"], str)
                    or not isinstance(item["state"], bool)):
                raise CommandError('each capability is {"capability": NAME, "state": true|false}'
                                   f", not {json.dumps(item)}")
            values[item["capability"]] = item["state"]
        try:
            self.params.set_capabilities(**values)  # unknown names: all or none
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    def query_capabilities(self) -> list[dict[str, Any]]:
        caps = self.params.snapshot().capabilities
        return [{"capability": name, "state": caps.get(name, False)} for name in CAPABILITIES]

    # -- incoming migration ------------------------------------------------------------------
    def start_incoming(self, uri: str) -> str:
        """Receive a migration on ``uri``: listen now, accept and load in a thread, then run the
        guest here.  Returns the address actually bound (e.g. the port of ``tcp:HOST:0``).

        The end shows as ``guest_ready``, or as ``incoming_failed`` with ``quit_requested``: a
        destination whose migration failed has nothing left to do.
        """
        with self._command_lock:
            if self.machine is not None and not self.moved_away():
                raise CommandError("this process already runs a guest; an incoming migration "
                                   "needs a destination (pymig incoming), or a process whose "
                                   "guest has migrated away")
            if self.incoming is not None and self.incoming_result is None:
                raise CommandError(f"an incoming migration on {self.incoming_uri} is already "
                                   f"{self.incoming.status}")
            tls = self._incoming_tls()
            options = dict(self.incoming_options)
            chained = options.pop("before_start", None)

            def before_start(machine: Machine) -> None:
                if chained is not None:
                    chained(machine)
                self._guest_arrived(machine)

            try:
                caps = self.params.snapshot().capabilities
                incoming = Incoming(uri, before_start=before_start,
                                    after_start=self._guest_started, tls=tls,
                                    postcopy=caps.get("postcopy-ram", False),
                                    postcopy_preempt=caps.get("postcopy-preempt", False),
                                    **options)
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            incoming.on_status(lambda old, new: self.emit("MIGRATION", {"status": new}))
            bound = incoming.listen()  # raises (port taken, no such file...) before any change
            if self.machine is not None:
                self._release_moved_guest()
            self.incoming, self.incoming_uri = incoming, bound
            self.incoming_result = None
        threading.Thread(target=self._receive, name="pymig-incoming", daemon=True).start()
        return bound

    def migrate_incoming(self, uri: str) -> str:
        """``migrate-incoming``: give a destination started with ``defer`` its URI, or
        receive a guest again in a process whose guest migrated away (``postmigrate``)."""
        if not self.destination and not self.moved_away():
            raise CommandError("migrate-incoming is for a destination started with 'pymig "
                               "incoming defer', or a process whose guest has migrated away; "
                               "this process runs a guest")
        return self.start_incoming(uri)

    def _release_moved_guest(self) -> None:
        """Free the guest that migrated away (it runs at its destination) before this
        process receives one again: its memory, its VM, the last migration's state."""
        machine, self.machine = self.machine, None
        self.migration = None
        self.guest_ready.clear()
        machine.close()
        release_freed_memory()

    def _receive(self) -> None:
        try:
            result = self.incoming.run()
        except BaseException as exc:  # noqa: BLE001 - kept for the process to report
            if isinstance(exc, PostcopyPaused):
                # The guest runs here, its vCPUs waiting for pages only the source holds:
                # the process keeps it (query-migrate says why).  (Not read from the status:
                # a migrate-recover may have moved it on already.)
                return
            self.incoming_failed = exc
            self.quit_requested.set()
            return
        self.incoming_result = result
        self.emit("RESUME", {})  # once the incoming side says "completed" (events keep order)
        release_freed_memory()  # the load's buffers, now that the guest runs

    def _guest_started(self, machine: Machine) -> None:
        # The guest is this process's from the moment its vCPUs run: commands reach it from
        # then on, before the source even hears the ACK.  Held as a source's machine, so that
        # it can migrate on (a destination's machine loads; it has nothing to send with).
        self.machine = Machine.source(machine.guest)
        self.migration = None
        self.guest_ready.set()

    # -- lifetime ----------------------------------------------------------------------------
    def quit(self) -> None:
        self.quit_requested.set()

    def close(self) -> None:
        if self.dirty_rate is not None:
            self.dirty_rate.cancel()  # it reads the guest's memory and log
        if self.incoming is not None:
            self.incoming.close()
        migration = self.migration
        if migration is not None:
            if migration.status in ACTIVE_STATES:
                try:
                    migration.cancel()
                except MigrationError:
                    pass  # past the commit: it ends on its own, and soon
            # Its thread releases what it holds after its status is final: let it finish
            # before the guest goes away under it.
            migration.wait(30)
        if self.incoming is not None and self.incoming.postcopy is not None:
            # a guest paused in post-copy goes with the process: release the vCPUs that wait
            # in their faults, or closing the guest would wait for them for ever
            self.incoming.postcopy.abandon()
        if self.machine is not None:
            self.machine.close()
        self.emit("SHUTDOWN", {"time": time.time()})
