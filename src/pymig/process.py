"""The life of a ``pymig run`` or ``pymig incoming`` process around its :class:`Session`.

It serves the control socket, shows the guest's serial output live (stdout) and a status line
about once a second (stderr: run state, what the guest's workload counts, each figure named
for what it counts, and the migration's progress), and ends on ``quit``, Ctrl-C, guest
power-off, or a failed incoming migration.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import BinaryIO, Callable

from pymig.control import ControlServer
from pymig.session import Session
from pymig.signals import CaughtSignals
from pymig.units import format_bytes


class _Serial:
    """Copies the guest console to stdout and/or a file, from the moment it is attached."""

    def __init__(self, out: BinaryIO | None, path: str | None):
        self.out = out
        self.path = path
        self.guest = None
        self._tee = None
        self._callback = None

    def attach(self, guest) -> None:
        self.detach()
        self.guest = guest
        if self.out is not None:
            def write(data: bytes, out=self.out) -> None:
                out.write(data)
                out.flush()

            self._callback = write
            guest.console.subscribe(write)
        if self.path:
            self._tee = guest.console.tee_to_file(self.path)

    def detach(self) -> None:
        if self.guest is None:
            return
        if self._callback is not None:
            self.guest.console.unsubscribe(self._callback)
        if self._tee is not None:
            self.guest.console.unsubscribe(self._tee)
            self._tee.close()
        self.guest = None


def status_line(session: Session, elapsed: float, rate: float | None) -> str:
    """The process's status line: its run state, what the guest's own counters mean for its
    workload (``rate``: their ``pages_written`` per second since the last line), and the
    migration under way, if any."""
    state = session.run_state()
    parts = [f"[pymig] {elapsed:7.1f} s  {state:<14}"]
    guest = session.guest
    if guest is not None and state in ("running", "paused", "finish-migrate") \
            and not session.ram_arriving():
        parts += workload_figures(guest.config.workload, guest.progress(), rate)
    parts += migration_figures(session)
    return "  ".join(part for part in parts if part).rstrip()


def workload_figures(workload: str, progress: dict, rate: float | None) -> list[str]:
    """What the mailbox counters say for ``workload`` (see :mod:`pymig.guest.workloads`): each
    figure named for what it counts.  A user's image and the idle workload keep no counters."""
    written, passes, errors = progress["pages_written"], progress["passes"], progress["errors"]
    if workload == "dirtier":  # a write changes a byte of a page: many writes, fewer pages
        return [f"{rate:>13,.0f} writes/s" if rate is not None else "",
                f"rounds {passes:,}"]
    if workload == "selfcheck":  # every page of the working set stamped once a pass
        return [f"{rate:>11,.0f} pages stamped/s" if rate is not None else "",
                f"passes {passes:,}", f"errors {errors:,}"]
    if workload == "diskcheck":  # its counter is of 4 KiB disk blocks
        return [f"{rate * 4096 / 1e3:>8,.0f} kB/s to disk" if rate is not None else "",
                f"blocks written {written:,}", f"passes {passes:,}", f"errors {errors:,}"]
    if workload == "compute":
        return [f"rounds {passes:,}" + ("  done" if progress["done"] else "")]
    return []


def migration_figures(session: Session) -> list[str]:
    """The migration this process takes part in: an outgoing one's progress, or where an
    incoming one stands."""
    migration = session.query_migrate()
    status = migration.get("status")
    if session.destination and session.machine is None:  # still receiving its guest
        where = migration.get("socket-address") or "?"
        if status is None:
            return ["waiting for migrate-incoming"]
        if status == "setup":
            return [f"waiting for the source on {where}"]
        if status == "active":
            return ["receiving the guest"]
        return []
    if status in ("setup", "active", "pre-switchover", "device", "cancelling"):
        ram = migration.get("ram", {})
        return [f"migration {status}: {format_bytes(ram.get('remaining', 0))} of pages left"]
    return []


class _Signals(CaughtSignals):
    """SIGTERM and SIGINT end the process the way ``quit`` does, through the same cleanup.

    The handler only records the signal: a KeyboardInterrupt raised wherever the main thread
    happens to be could cut the cleanup short (socket files left behind), and setting an Event
    from a handler can deadlock on the Event's own lock.  A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        super().__init__()
        self.received: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum


#: How often the process looks for a signal or a quit between status lines.
TICK_S = 0.1


def serve(session: Session, *, control: str | None = None,
          control_tcp: tuple[str, int] | None = None, control_token: str | None = None,
          incoming: str | None = None, serial_file: str | None = None,
          serial_out: BinaryIO | None = None, quiet: bool = False, interval: float = 1.0,
          start: bool = False, say: Callable[[str], None] | None = None) -> int:
    """Run until the session ends; returns the process exit code.

    ``incoming``: receive a migration on this URI first (a destination's session).
    ``control_token``: where the TCP control socket's token goes (default: its port's default
    file).  ``start``: start the session's (source) guest once its console is attached.  Exit
    code 0: quit, Ctrl-C or SIGTERM; a power-off: the guest's code; 1: a guest error or a failed
    incoming migration (the guest never started here).  What it made (the migration listener's
    socket file, the control socket, its token file) goes however it ends; a failure to set up
    is raised (PymigError, ValueError, OSError) once that is done.
    """
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    serial = _Serial(None if quiet and serial_out is None else (serial_out or sys.stdout.buffer),
                     serial_file)
    server = None
    code = 0
    with _Signals() as signals:
        try:
            if serial_file:  # now, not when a destination's guest arrives
                _check_appendable(serial_file)
            if incoming is not None:
                bound = session.start_incoming(incoming)
            if control is not None or control_tcp is not None:
                server = ControlServer(session, control, control_tcp, token_path=control_token)
            if incoming is not None and not quiet:  # once nothing more can fail to start
                say(f"[pymig] {receiving(bound)}")
            if server is not None and server.tcp_address is not None and (
                    not quiet or control_tcp[1] == 0):  # a port the system chose must be told
                host, port = server.tcp_address
                say(f"[pymig] control socket on "
                    f"tcp:{'[' + host + ']' if ':' in host else host}:{port}")
                say(f"[pymig] its token (clients over TCP need it) is in {server.token_path}")
            session.on_guest(serial.attach)
            if start:
                session.guest.start()
            code = _watch(session, signals, quiet=quiet, interval=interval, say=say)
        finally:
            if session.incoming_failed is not None:
                say(f"[pymig] {session.incoming_failed}; the guest was not started here")
                code = 1
            serial.detach()
            if server is not None:
                server.close()
            session.close()
    return code


def _check_appendable(path: str) -> None:
    try:
        open(path, "ab").close()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot append the guest's serial output to {path}: "
                                 f"{exc.strerror}") from None


def receiving(uri: str) -> str:
    """What a destination says it does with ``uri``, the address it receives on."""
    scheme = uri.partition(":")[0]
    if scheme == "file":
        return f"restoring {uri}"
    if scheme in ("exec", "fd"):
        return f"reading a migration from {uri}"
    return f"waiting for a migration on {uri}"


def _watch(session: Session, signals: _Signals, *, quiet: bool, interval: float,
           say: Callable[[str], None]) -> int:
    """Show status lines until a quit, a signal or the guest's end; returns the exit code."""
    began = time.monotonic()
    next_status = began + interval
    last_written: int | None = None
    last_t = began
    announced = False
    while signals.received is None:
        if session.incoming_result is not None and not announced and not quiet:
            announced = True
            say(f"[pymig] incoming migration loaded in "
                f"{session.incoming_result.load_time_s * 1000:.0f} ms; guest running")
        if session.quit_requested.wait(min(interval, TICK_S)):
            if session.moved_away() and not quiet:
                say("[pymig] the guest now runs at the destination; this process exits")
            return 0
        now = time.monotonic()
        if now < next_status:
            continue
        next_status = now + interval
        guest = session.guest
        rate = None
        # (not while an incoming post-copy's pages still come: its mailbox page may be
        # missing, and this loop, which ends the process on quit or a signal, would wait for
        # it, for as long as the post-copy stays paused)
        if guest is not None and guest.status in ("running", "paused") \
                and not session.ram_arriving():
            written = guest.progress()["pages_written"]
            if last_written is not None:
                rate = (written - last_written) / max(now - last_t, 1e-9)
            last_written, last_t = written, now
        if not quiet:
            say(status_line(session, now - began, rate))
        if guest is not None and guest.status in ("shutdown", "error"):
            reason = getattr(guest, "stop_reason", None) or guest.status
            say(f"[pymig] guest stopped: {reason}")
            return 1 if guest.status == "error" else (getattr(guest, "exit_code", 0) or 0)
    if signals.received == signal.SIGINT:
        say("[pymig] interrupted")
    return 0
