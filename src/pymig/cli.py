"""The ``pymig`` command: parse, call the library, print.  No logic of its own."""

from __future__ import annotations

import json
import os
import sys
import time

import click
from rich.console import Console

from pymig.units import parse_size

WORKLOADS = ("idle", "dirtier", "selfcheck", "compute", "diskcheck")
PATTERNS = ("uniform", "sequential", "hotspot")
BACKINGS = ("anon", "memfd", "hugetlb")  # pymig.memory.BACKINGS, without importing numpy here


class Size(click.ParamType):
    """A byte size such as 4096, 64M or 1G."""

    name = "size"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = Size()

CONTROL_TCP_TOKEN_HELP = ("the file holding the token a client over --control-tcp proves itself "
                          "with (default: $XDG_RUNTIME_DIR/pymig/control-PORT.token, or "
                          "/tmp/pymig-UID/... without XDG_RUNTIME_DIR)")


TLS_CREDS_HELP = ("TLS for migrations, mutually authenticated: a directory in QEMU's "
                  "tls-creds-x509 layout (ca-cert.pem, server-cert.pem/server-key.pem to "
                  "receive, client-cert.pem/client-key.pem to send), loaded now as tls0 and "
                  "set as the tls-creds parameter; DIR,verify-peer=off accepts sources without "
                  "a certificate")


def _fail(message: str) -> None:
    click.echo(f"pymig: {message}", err=True)
    sys.exit(1)


def _reason(exc: BaseException) -> str:
    """An error in words: an OSError without its ``[Errno N]``, naming its file."""
    if isinstance(exc, OSError) and type(exc).__str__ is OSError.__str__ and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pymig")
def main() -> None:
    """Pre-copy live migration of KVM guests.

    Shell completion, for bash (zsh_source and fish_source for the others):

    \b
      eval "$(_PYMIG_COMPLETE=bash_source pymig)"
    """
    from pymig.ram import packet_overlap

    _report_warnings_and_logs()

    try:  # read where a migration would, but refused here, before any guest exists
        packet_overlap()
    except ValueError as exc:
        _fail(str(exc))


def _report_warnings_and_logs() -> None:
    """The library's warnings and log messages reach the user as one line each, in pymig's
    own words: no source path, no line number, no logger name."""
    import logging
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        click.echo(f"pymig: warning: {message}", err=True)

    warnings.showwarning = show
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[pymig] %(message)s"))
    logger = logging.getLogger("pymig")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


# -- run ------------------------------------------------------------------------------------------
@main.command()
@click.option("--workload", type=click.Choice(WORKLOADS), default="idle", show_default=True,
              help="built-in guest workload")
@click.option("--boot-sector", type=click.Path(exists=True, dir_okay=False),
              help="run a raw 512-byte boot sector (real mode at 0000:7c00) instead")
@click.option("--flat", type=click.Path(exists=True, dir_okay=False),
              help="run a flat binary in 32-bit protected mode instead")
@click.option("--flat64", type=click.Path(exists=True, dir_okay=False),
              help="run a flat binary in 64-bit long mode (user mode) instead")
@click.option("--load-address", type=str, default=None,
              help="where --flat/--flat64 is loaded and entered (default 0x100000)")
@click.option("--memory", type=SIZE, default="256M", show_default=True, help="guest RAM")
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--working-set", type=SIZE, default=None, help="dirtier/selfcheck working set")
@click.option("--rate", type=int, default=None,
              help="page writes/s the workload makes (0: flat out)")
@click.option("--pattern", type=click.Choice(PATTERNS), default=None, help="dirtier pattern")
@click.option("--hot-fraction", type=float, default=None, help="hotspot: hot share of the set")
@click.option("--rounds", type=int, default=None, help="compute: rounds")
@click.option("--disk", "disks", multiple=True,
              metavar="PATH[,readonly][,shared][,checkpoint=NAME]",
              help="a raw disk image on the ATA channel (ports 0x1f0-0x1f7, 0x3f6): the first "
                   "--disk is the master, a second the slave; readonly: the guest's writes "
                   "fail; shared: a migration's destination opens the same file; "
                   "checkpoint=NAME: from now on, a map beside the image of the chunks "
                   "written since (migrate --inc sends only those)")
@click.option("--disk-working-set", type=SIZE, default=None,
              help="diskcheck: how much of the disk it writes and checks")
@click.option("--simulated", is_flag=True, help="use the simulated guest instead of KVM")
@click.option("--dirty-ring", type=click.IntRange(0, 65536), default=0, show_default=True,
              help="KVM: track dirty pages in a per-vCPU ring of this many entries (needed "
                   "by the dirty-limit capability; 0: the dirty bitmap only)")
@click.option("--mem-backing", type=click.Choice(BACKINGS), default="anon", show_default=True,
              help="guest RAM: anonymous memory, a memfd, or huge pages from the host's "
                   "hugetlb pool (/proc/sys/vm/nr_hugepages), which a host keeps for guests")
@click.option("--control", type=click.Path(), default=None,
              help="serve the QMP-style control socket on this unix path")
@click.option("--control-tcp", type=click.IntRange(0, 65535), default=None,
              help="also serve it on this loopback TCP port (0: a free one, announced on "
                   "stderr)")
@click.option("--control-tcp-token", type=click.Path(dir_okay=False), default=None,
              help=CONTROL_TCP_TOKEN_HELP)
@click.option("--serial", type=click.Path(dir_okay=False), default=None,
              help="append the guest's serial output to this file")
@click.option("--tls-creds", metavar="DIR[,verify-peer=off]", default=None, help=TLS_CREDS_HELP)
@click.option("--quiet", is_flag=True, help="no serial output or status lines on the console")
def run(workload, boot_sector, flat, flat64, load_address, memory, vcpus, working_set, rate, pattern,
        hot_fraction, rounds, disks, disk_working_set, simulated, dirty_ring, mem_backing, control,
        control_tcp, control_tcp_token, serial, tls_creds, quiet) -> None:
    """Run a guest, with its serial output live and, once a second, what its workload did
    (the dirtier's writes/s, selfcheck's pages stamped/s and passes, ...)."""
    from pymig import guest as guests
    from pymig.errors import PymigError
    from pymig.session import Session

    if sum(bool(x) for x in (boot_sector, flat, flat64)) > 1:
        _fail("give one of --boot-sector, --flat and --flat64")
    if load_address is not None:
        try:
            load_address = int(load_address, 0)
        except ValueError:
            _fail(f"--load-address {load_address!r} is not an address (e.g. 0x100000)")
    params = {k: v for k, v in {"working_set_bytes": working_set, "rate_pages_per_s": rate,
                                "pattern": pattern, "hot_fraction": hot_fraction,
                                "rounds": rounds,
                                "disk_working_set_bytes": disk_working_set}.items()
              if v is not None}
    try:
        config = guests.make_config(
            kind="simulated" if simulated else "kvm", workload=workload, params=params,
            memory_bytes=memory, vcpus=vcpus, boot_sector=boot_sector, flat=flat, flat64=flat64,
            load_address=load_address, disks=disks)
        guest = guests.create(config, dirty_ring=dirty_ring, backing=mem_backing)
    except (PymigError, ValueError, OSError) as exc:
        _fail(_reason(exc))
    session = Session(guest)
    _load_tls(session, tls_creds)
    _serve(session, control=control, control_tcp=_loopback(control_tcp),
           control_token=control_tcp_token, serial_file=serial, quiet=quiet, start=True)


def _preallocate(memory: int, backing: str, quiet: bool):
    from pymig.guest.base import PreallocatedRam

    if not quiet:
        click.echo(f"[pymig] faulting in {memory / (1 << 30):.2f} GiB of guest RAM before "
                   f"listening (--mem-prealloc)", err=True)
    started = time.monotonic()
    try:
        ram = PreallocatedRam(memory, backing=backing)
    except (OSError, ValueError) as exc:
        _fail(f"--mem-prealloc: {_reason(exc)}")
    if not quiet:
        click.echo(f"[pymig] {memory / (1 << 30):.2f} GiB of RAM made ready in "
                   f"{time.monotonic() - started:.2f} s", err=True)
    return ram


def _load_tls(session, spec: str | None, authz: tuple[str, ...] = ()) -> None:
    """--tls-creds (and --tls-authz): loaded and checked before anything is served."""
    from pymig.errors import TlsError
    from pymig.transport.tlscreds import parse_spec

    try:
        if spec is not None:
            directory, verify_peer = parse_spec(spec)
            session.load_credentials(directory, verify_peer=verify_peer)
        if authz:
            session.params.set(**{"tls-authz": list(authz)})
    except (TlsError, ValueError) as exc:
        session.close()
        _fail(str(exc))


def _loopback(port: int | None) -> tuple[str, int] | None:
    return None if port is None else ("127.0.0.1", port)


def _serve(session, **options) -> None:
    """Serve ``session`` until it ends, and exit with its code (or say why it could not)."""
    from pymig.errors import PymigError
    from pymig.process import serve

    if options.get("control_token") and options.get("control_tcp") is None:
        session.close()
        _fail("--control-tcp-token is where --control-tcp's token goes; give --control-tcp too")
    try:
        code = serve(session, **options)
    except (PymigError, ValueError, OSError) as exc:
        _fail(_reason(exc))
    sys.exit(code)


# -- incoming -------------------------------------------------------------------------------------
@main.command()
@click.argument("uri")
@click.option("--control", type=click.Path(), default=None, help="control socket path")
@click.option("--control-tcp", type=click.IntRange(0, 65535), default=None,
              help="control socket on this loopback TCP port (0: a free one, announced)")
@click.option("--control-tcp-token", type=click.Path(dir_okay=False), default=None,
              help=CONTROL_TCP_TOKEN_HELP)
@click.option("--serial", type=click.Path(dir_okay=False), default=None,
              help="append the guest's serial output to this file")
@click.option("--memory", type=SIZE, default=None, help="refuse a stream of another RAM size")
@click.option("--vcpus", type=click.IntRange(1, None), default=None,
              help="refuse a stream with another vCPU count")
@click.option("--accept-kind", "accept_kinds", multiple=True, metavar="KIND",
              help="guest kinds to accept, kvm and/or simulated (repeat, or a comma list; "
                   "default: the kind this host runs natively, kvm where /dev/kvm works)")
@click.option("--max-memory", type=SIZE, default=None,
              help="refuse a guest with more RAM (default: what the host has available when "
                   "the stream comes, or the --mem-prealloc RAM)")
@click.option("--max-vcpus", type=click.IntRange(1, None), default=None,
              help="refuse a guest with more vCPUs (default: the most pymig's VMM runs, 8; "
                   "this only lowers it)")
@click.option("--progress-timeout", type=click.FloatRange(0, None), default=None,
              metavar="SECONDS",
              help="drop a source from which no whole record came in this long, however it "
                   "trickles bytes (default 60; 0: never)")
@click.option("--mem-backing", type=click.Choice(BACKINGS), default="anon", show_default=True,
              help="guest RAM: anonymous memory, a memfd, or huge pages from the host's "
                   "hugetlb pool (/proc/sys/vm/nr_hugepages), which a host keeps for guests")
@click.option("--mem-prealloc", is_flag=True,
              help="map the --memory RAM and fault it all in before listening, so the "
                   "migration does not pay for first touches (QEMU's -mem-prealloc)")
@click.option("--disk", "disks", multiple=True, metavar="PATH | diskN=PATH[,overwrite]",
              help="PATH: a disk image on shared storage the incoming guest may use (its "
                   "source ran it with --disk PATH,shared); a stream naming any other image "
                   "is refused.  diskN=PATH: where disk N goes when its image travels with "
                   "the guest (migrate --blk): created sparse if missing; one of another "
                   "size is refused, and one holding data unless ,overwrite")
@click.option("--disk-dir", type=click.Path(file_okay=False), default=None,
              help="where each disk that travels with the guest and has no diskN=PATH goes: "
                   "its image's file name in this directory")
@click.option("--tls-creds", metavar="DIR[,verify-peer=off]", default=None, help=TLS_CREDS_HELP)
@click.option("--tls-authz", "tls_authz", multiple=True, metavar="DN",
              help="accept only a source whose certificate's subject is DN (RFC 4514, e.g. "
                   "'CN=src.example,O=Example'; a glob matches too; repeat for more)")
@click.option("--postcopy", is_flag=True,
              help="the postcopy-ram capability: take a source that switches to post-copy "
                   "(the guest runs here before all of its RAM has come)")
@click.option("--postcopy-preempt", is_flag=True,
              help="with --postcopy: the postcopy-preempt capability, take the pages the "
                   "guest waits for on a second connection of the source's (tcp: and unix:)")
@click.option("--quiet", is_flag=True, help="no serial output or status lines on the console")
def incoming(uri, control, control_tcp, control_tcp_token, serial, memory, vcpus, accept_kinds,
             max_memory, max_vcpus, progress_timeout, mem_backing, mem_prealloc, disks,
             disk_dir, tls_creds, tls_authz, postcopy, postcopy_preempt, quiet) -> None:
    """Receive a migration on URI, then run the guest here.

    URI: tcp:HOST:PORT, unix:PATH, exec:COMMAND (read the command's output), fd:N (an
    inherited descriptor), file:PATH (restore a snapshot), or 'defer' (wait for
    migrate-incoming on the control socket).  The guest's configuration comes from the
    stream, within this destination's limits (--accept-kind, --max-memory, --max-vcpus),
    checked before anything is allocated; --memory/--vcpus ask for exactly that guest,
    --mem-prealloc readies that much RAM ahead of it, and --disk names the shared disk images
    the guest may open (a stream naming any other file is refused) and, as diskN=PATH, where
    each disk that travels with the guest goes (migrate --blk or --inc).  With --tls-creds the
    source must come over TLS with a certificate that DIR's CA signed (and, with --tls-authz,
    one of those identities); anything else is refused before a byte of its stream is read.
    """
    from pymig.incoming import DEFAULT_PROGRESS_TIMEOUT_S
    from pymig.limits import DestinationLimits, parse_kinds
    from pymig.session import Session

    try:
        limits = DestinationLimits(accept_kinds=parse_kinds(accept_kinds),
                                   max_memory_bytes=max_memory, max_vcpus=max_vcpus,
                                   memory_bytes=memory, vcpus=vcpus)
    except ValueError as exc:
        _fail(str(exc))
    from pymig.block import DiskTarget, is_target

    shared, targets = [], []
    for text in disks:  # the stream names them later; a wrong name should not wait for it
        if is_target(text):
            try:
                targets.append(DiskTarget.parse(text))
            except ValueError as exc:
                _fail(str(exc))
        elif not os.path.exists(text):
            _fail(f"--disk {text}: no such file")
        else:
            shared.append(text)
    if len({t.unit for t in targets}) != len(targets):
        _fail("--disk: a disk named twice as a target")
    if disk_dir is not None and not os.path.isdir(disk_dir):
        _fail(f"--disk-dir {disk_dir}: no such directory")
    guest_options = {"backing": mem_backing, "disk_paths": shared, "disk_targets": targets,
                     "disk_dir": disk_dir}
    if mem_prealloc:
        if memory is None:
            _fail("--mem-prealloc needs --memory: the size of the RAM to make ready")
        guest_options["prealloc"] = _preallocate(memory, mem_backing, quiet)

    if progress_timeout is None:
        progress_timeout = DEFAULT_PROGRESS_TIMEOUT_S
    if uri == "defer" and control is None and control_tcp is None:
        _fail("'defer' needs --control or --control-tcp (migrate-incoming gives the URI later)")
    session = Session(destination=True)
    if postcopy_preempt and not postcopy:
        _fail("--postcopy-preempt needs --postcopy")
    if postcopy:
        session.params.set_capabilities(**{"postcopy-ram": True,
                                           "postcopy-preempt": bool(postcopy_preempt)})
    _load_tls(session, tls_creds, tls_authz)
    session.incoming_options = {"limits": limits, "guest_options": guest_options,
                                "progress_timeout": progress_timeout or None}
    _serve(session, incoming=None if uri == "defer" else uri, control=control,
           control_tcp=_loopback(control_tcp), control_token=control_tcp_token,
           serial_file=serial, quiet=quiet)


# -- migrate --------------------------------------------------------------------------------------
@main.command()
@click.option("--control", required=True,
              help="control socket of the running guest: its unix path (pymig run --control) "
                   "or tcp:127.0.0.1:PORT (--control-tcp)")
@click.argument("uri")
@click.option("--control-tcp-token", type=click.Path(dir_okay=False), default=None,
              help=CONTROL_TCP_TOKEN_HELP)
@click.option("--max-bandwidth", type=SIZE, default=None,
              help="cap on the stream, bytes/s (e.g. 100M; default 0: uncapped)")
@click.option("--downtime-limit", type=click.IntRange(1, None), default=None, metavar="MS",
              help="longest pause the guest may see at the switchover (default 300)")
@click.option("--compression", type=click.Choice(["lz4", "none"]), default=None,
              help="lz4 (default): pages that shrink under LZ4 go compressed; none: as they are")
@click.option("--auto-converge/--no-auto-converge", default=None,
              help="throttle every vCPU of a guest that will not converge (default: off)")
@click.option("--dirty-limit", type=click.IntRange(1, None), default=None, metavar="PAGES",
              help="instead, cap each vCPU that dirties faster than PAGES pages/s (KVM guests "
                   "need pymig run --dirty-ring N)")
@click.option("--no-dirty-limit", is_flag=True,
              help="no per-vCPU dirty cap (the default)")
@click.option("--postcopy", is_flag=True, default=None,
              help="the postcopy-ram capability: the migration may switch to post-copy (the "
                   "destination needs pymig incoming --postcopy)")
@click.option("--postcopy-preempt", is_flag=True, default=None,
              help="with --postcopy: the postcopy-preempt capability, the pages the guest "
                   "waits for go on a second connection, never behind the background push "
                   "(tcp: and unix:; the destination needs pymig incoming --postcopy-preempt)")
@click.option("--postcopy-after", type=click.IntRange(1, None), default=None, metavar="N",
              help="with --postcopy: switch to post-copy by itself once N passes over RAM "
                   "are through (default: only on migrate-start-postcopy)")
@click.option("--background-snapshot", is_flag=True, default=None,
              help="the background-snapshot capability (file: or exec: only): the snapshot "
                   "holds the guest as it was when it began, and the guest runs on while it "
                   "is written (pauses only to write-protect its RAM)")
@click.option("--trace", type=click.Path(dir_okay=False), default=None,
              help="write one JSON line per iteration to this file (on the source's side)")
@click.option("--keep-source", is_flag=True,
              help="leave the source process running after success (it stays paused)")
@click.option("--stop", "stop_guest", is_flag=True,
              help="file: snapshots: stop the guest once the snapshot is taken (by default "
                   "it carries on)")
@click.option("--blk", is_flag=True,
              help="move the images of disks not on shared storage with the guest (block "
                   "migration; the destination names where each goes: --disk diskN=PATH)")
@click.option("--inc", is_flag=True,
              help="incremental block migration: only the chunks written since the disk's "
                   "checkpoint (pymig run --disk PATH,checkpoint=NAME) travel; the "
                   "destination's target is the copy taken for it")
@click.option("--json", "as_json", is_flag=True,
              help="print the final stats as JSON, with the settings in force")
def migrate(control, uri, control_tcp_token, max_bandwidth, downtime_limit, compression,
            auto_converge, dirty_limit, no_dirty_limit, postcopy, postcopy_preempt,
            postcopy_after, background_snapshot, trace, keep_source, stop_guest, blk, inc,
            as_json) -> None:
    """Migrate the guest behind --control to URI, with a progress bar.

    Every run sets each parameter and capability it has a flag for, to the flag's value or its
    default, so nothing carries over from an earlier run; it prints them as it starts.
    Ctrl-C (or SIGTERM) cancels the migration and waits for the source to confirm; a second
    one stops waiting and leaves the migration to the source.  Exit status: 0 completed, 1
    failed or cancelled, 128+N after the second signal N.
    """
    from pymig.errors import PymigError
    from pymig.monitor import Interrupts, ProgressView, follow, outcome, stats_table
    from pymig.qmp import QmpError
    from pymig.settings import MigrateSettings, apply, describe

    if dirty_limit is not None and no_dirty_limit:
        _fail("--dirty-limit and --no-dirty-limit contradict each other")
    if dirty_limit is not None and auto_converge:
        _fail("--auto-converge and --dirty-limit exclude each other: one slows every vCPU, "
              "the other only those that dirty too fast")
    settings = MigrateSettings.from_flags({
        "max-bandwidth": max_bandwidth, "downtime-limit": downtime_limit,
        "compression": compression, "auto-converge": auto_converge,
        "dirty-limit": True if dirty_limit is not None else None,
        "vcpu-dirty-limit": dirty_limit, "postcopy-ram": postcopy,
        "postcopy-preempt": postcopy_preempt, "x-postcopy-after": postcopy_after,
        "background-snapshot": background_snapshot})
    if postcopy_after is not None and not postcopy:
        _fail("--postcopy-after needs --postcopy")
    if postcopy_preempt and not postcopy:
        _fail("--postcopy-preempt needs --postcopy")
    arguments = {"uri": uri}
    if trace:
        arguments["trace"] = trace
    if stop_guest:
        arguments["resume"] = False
    if blk:
        arguments["blk"] = True
    if inc:
        arguments["inc"] = True
    console = Console(stderr=True)

    def say(text: str) -> None:
        # a terminal gets lines wrapped between words; anything else one line per message
        console.print(f"pymig: {text}", soft_wrap=not console.is_terminal, highlight=False,
                      markup=False)

    client = _connect(control, control_tcp_token)
    with client, Interrupts() as interrupts:
        try:
            settings_in_force = apply(client, settings)
            say(f"migrating to {uri} with " + describe(settings_in_force["parameters"],
                                                       settings_in_force["capabilities"]))
            if interrupts.count:
                _fail(f"{interrupts.name}: stopped before the migration started")
            client.command("migrate", **arguments)
            if as_json or not console.is_terminal:  # a bar is for a terminal to redraw
                followed = follow(client, interrupts=interrupts, say=say)
            else:
                with ProgressView(console, transient=True) as view:
                    followed = follow(client, on_update=view.update, interrupts=interrupts,
                                      say=say)
            # (a source left to itself is not asked anything more: it may be what hangs)
            state = None if followed.detached else client.command("query-status")["status"]
            moved = followed.status == "completed" and state == "postmigrate"
            if moved and not keep_source:
                client.command("quit")  # the guest lives at the destination now
        except QmpError as exc:
            _fail(exc.desc)
        except PymigError as exc:
            _fail(str(exc))
    info = followed.info
    where = outcome(followed, state, quit_source=moved and not keep_source, control=control)
    # The cause first: a migration that failed before anything moved has no figures to show.
    if info.get("status") in ("failed", "postcopy-paused"):
        say(f"migration {info['status']}: {info.get('error-desc', 'unknown error')}")
    if as_json:
        click.echo(json.dumps(dict(info, settings=settings_in_force, outcome=followed.status,
                                   guest=where)))
    elif info.get("ram", {}).get("transferred") or info.get("status") == "completed":
        Console().print(stats_table(info, error=False))
    say(where)
    if followed.detached:
        sys.exit(128 + (interrupts.last or 2))
    sys.exit(0 if info.get("status") == "completed" else 1)


def _connect(control: str, token_path: str | None):
    from pymig.errors import PymigError
    from pymig.qmp import QmpClient, control_address

    try:
        return QmpClient(control_address(control), token_path=token_path)
    except (PymigError, ValueError) as exc:
        _fail(str(exc))


# -- qmp ------------------------------------------------------------------------------------------
@main.command("qmp")
@click.option("--control", required=True,
              help="control socket: a unix path or tcp:127.0.0.1:PORT")
@click.option("--control-tcp-token", type=click.Path(dir_okay=False), default=None,
              help=CONTROL_TCP_TOKEN_HELP)
@click.argument("command")
@click.argument("arguments", nargs=-1)
def qmp_command(control, control_tcp_token, command, arguments) -> None:
    """Run one control-socket COMMAND and print its answer as JSON.

    ARGUMENTS are NAME=VALUE; a VALUE that parses as JSON is taken as JSON (numbers, true,
    lists...), anything else as a string:

    \b
      pymig qmp --control /tmp/src.sock \\
          migrate-set-parameters max-bandwidth=100000000
      pymig qmp --control /tmp/dst.sock \\
          migrate-incoming uri=tcp:0.0.0.0:4444
    """
    from pymig.errors import PymigError
    from pymig.qmp import QmpError

    args = {}
    for item in arguments:
        name, sep, text = item.partition("=")
        if not sep or not name:
            _fail(f"argument {item!r} is not NAME=VALUE")
        try:
            args[name] = json.loads(text)
        except ValueError:
            args[name] = text
    client = _connect(control, control_tcp_token)
    with client:
        try:
            value = client.command(command, **args)
        except QmpError as exc:
            # QEMU's class names the kind of refusal; GenericError, the common one, says nothing
            _fail(exc.desc if exc.klass == "GenericError" else f"{exc.klass}: {exc.desc}")
        except PymigError as exc:
            _fail(str(exc))
    click.echo(json.dumps(value, indent=2))


# -- dirtyrate ------------------------------------------------------------------------------------
@main.command()
@click.option("--control", required=True,
              help="control socket of the running guest: a unix path or tcp:127.0.0.1:PORT")
@click.option("--control-tcp-token", type=click.Path(dir_okay=False), default=None,
              help=CONTROL_TCP_TOKEN_HELP)
@click.option("--calc-time", default="1s", show_default=True,
              help="how long to measure: 500ms, 2s, 1.5 (seconds); 50ms to 60s")
@click.option("--mode", type=click.Choice(["page-sampling", "dirty-bitmap", "dirty-ring"]),
              default="page-sampling", show_default=True,
              help="hash sampled pages; or read the dirty log; or the dirty ring, per vCPU "
                   "(KVM guests run with --dirty-ring N)")
@click.option("--sample-pages", type=click.IntRange(128, 16384), default=None,
              help="page-sampling: pages sampled per GiB (default 512)")
@click.option("--json", "as_json", is_flag=True, help="print query-dirty-rate's answer as JSON")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), default=None,
              help="draw the working-set curve to this PNG")
def dirtyrate(control, control_tcp_token, calc_time, mode, sample_pages, as_json,
              plot_png) -> None:
    """Measure the dirty rate of the guest behind --control, without migrating it: the write
    rate, the working-set curve and what measuring cost the guest."""
    from pymig.dirtyrate import measure, parse_calc_time, report
    from pymig.errors import PymigError
    from pymig.qmp import QmpError

    try:
        calc_time_ms = parse_calc_time(calc_time)
    except ValueError as exc:
        _fail(f"--calc-time {exc}")
    if sample_pages is not None and mode != "page-sampling":
        _fail("--sample-pages is for --mode page-sampling")
    client = _connect(control, control_tcp_token)
    with client:
        try:
            info = measure(client, calc_time_ms, mode, sample_pages)
        except QmpError as exc:
            _fail(exc.desc)
        except PymigError as exc:
            _fail(str(exc))
    if plot_png:
        from pymig.plot import plot_working_set

        plot_working_set(info, plot_png)
    if as_json:
        click.echo(json.dumps(info))
    else:
        Console().print(report(info))
        if plot_png:
            click.echo(plot_png)


# -- predict --------------------------------------------------------------------------------------
@main.command()
@click.option("--control", default=None,
              help="measure the running guest behind this control socket (pymig dirtyrate)")
@click.option("--control-tcp-token", type=click.Path(dir_okay=False), default=None,
              help=CONTROL_TCP_TOKEN_HELP)
@click.option("--calc-time", default="2s", show_default=True,
              help="--control: how long to measure (500ms, 2s, 1.5)")
@click.option("--mode", type=click.Choice(["page-sampling", "dirty-bitmap", "dirty-ring"]),
              default="dirty-bitmap", show_default=True, help="--control: how to measure")
@click.option("--profile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a saved guest model (--save-profile), a saved 'pymig dirtyrate --json' or "
                   "a migration's --trace")
@click.option("--memory", type=SIZE, default=None,
              help="the guest's RAM (needed with --control, a measurement or a trace)")
@click.option("--rate", type=float, default=None, help="the guest's write rate, pages/s")
@click.option("--working-set", type=SIZE, default=None, help="the guest's working set")
@click.option("--pattern", type=click.Choice(["uniform", "sequential"]), default=None,
              help="how the guest writes its working set (default uniform)")
@click.option("--data", type=SIZE, default=None,
              help="memory holding data when the migration starts (default: the working set)")
@click.option("--zero-share", type=click.FloatRange(0, 1), default=None,
              help="share of that memory all zero")
@click.option("--compressed-share", type=click.FloatRange(0.001, 1), default=None,
              help="wire bytes per page byte of a data page under LZ4 (1: incompressible)")
@click.option("--vcpus", type=click.IntRange(1, 8), default=None)
@click.option("--rearm-at-send", is_flag=True,
              help="the dirty log is re-armed chunk by chunk as a pass reaches it (a KVM "
                   "guest's dirty bitmap, manual protection): a page written again before "
                   "its chunk is re-armed is not sent again")
@click.option("--bandwidth", type=SIZE, default="0",
              help="the link, bytes/s (0: the source's own rate bounds)")
@click.option("--measure-link", is_flag=True,
              help="measure the link instead: loopback TCP to a receiving process, as a "
                   "destination on this host would get it")
@click.option("--rtt", type=click.FloatRange(0, None), default=0.0, metavar="MS",
              help="the link's round trip")
@click.option("--source-rate", type=SIZE, default=None,
              help="page bytes/s the source moves when nothing else bounds it (default 1.5G)")
@click.option("--first-touch", type=SIZE, default="0",
              help="page bytes/s a destination takes pages it never had at (0: no bound)")
@click.option("--switchover-cost", type=click.FloatRange(0, 60_000), default=0.0, metavar="MS",
              help="the switchover's fixed cost on the host (the downtime of an idle guest of "
                   "this shape migrated there; 0: the built-in figure)")
@click.option("--downtime-limit", type=click.IntRange(1, None), default=300, show_default=True,
              metavar="MS")
@click.option("--max-bandwidth", type=SIZE, default="0", help="bytes/s (0: uncapped)")
@click.option("--switchover-capped", is_flag=True,
              help="keep max-bandwidth during the stop-and-copy (x-switchover-capped)")
@click.option("--auto-converge", is_flag=True)
@click.option("--throttle-mode", type=click.Choice(["step", "aim"]), default="step",
              show_default=True)
@click.option("--dirty-limit", type=click.IntRange(1, None), default=None, metavar="PAGES",
              help="cap each vCPU at PAGES pages/s (the dirty-limit capability)")
@click.option("--compression", type=click.Choice(["lz4", "none"]), default="lz4",
              show_default=True)
@click.option("--max-total-time", type=click.IntRange(0, None), default=0, metavar="MS",
              help="give up (or switch over: --limit-action) after this long (0: never)")
@click.option("--limit-action", type=click.Choice(["switchover", "cancel"]),
              default="switchover", show_default=True)
@click.option("--save-profile", type=click.Path(dir_okay=False), default=None,
              help="write the guest model as JSON (for --profile)")
@click.option("--trace", "show_trace", is_flag=True, help="also print the model's syncs")
@click.option("--json", "as_json", is_flag=True, help="print the prediction as JSON")
def predict(control, control_tcp_token, calc_time, mode, profile, memory, rate, working_set,
            pattern, data, zero_share, compressed_share, vcpus, rearm_at_send, bandwidth,
            measure_link, rtt, source_rate, first_touch, switchover_cost, downtime_limit,
            max_bandwidth, switchover_capped, auto_converge, throttle_mode, dirty_limit,
            compression, max_total_time, limit_action, save_profile, show_trace, as_json) -> None:
    """Predict a migration before running it: total time, downtime, bytes, passes, and
    whether it converges, by running pymig's convergence policy over a model of the guest
    (measured behind --control, a saved --profile, or given by --rate and --working-set) and
    of the link."""
    from pymig.errors import PymigError
    from pymig.predict import GuestModel, LinkModel, load_guest, parameters
    from pymig.predict import predict as run_model
    from pymig.qmp import QmpError

    given = sum(x is not None for x in (control, profile, rate))
    if given != 1:
        _fail("describe the guest one way: --control (measure it), --profile FILE, or --rate "
              "with --working-set and --memory")
    overrides = {k: v for k, v in {"pattern": pattern, "zero_share": zero_share,
                                   "compressed_share": compressed_share,
                                   "vcpus": vcpus, "rearmed_at_send": rearm_at_send or None,
                                   }.items() if v is not None}  # else a profile's own
    if data is not None:
        overrides["data_pages"] = data // 4096
    try:
        if control is not None:
            from pymig.dirtyrate import measure, parse_calc_time

            if memory is None:
                _fail("--control needs --memory: the guest's RAM size")
            client = _connect(control, control_tcp_token)
            with client:
                info = measure(client, parse_calc_time(calc_time), mode)
                # a KVM guest's log is re-armed as each pass reaches a chunk (--rearm-at-send)
                overrides.setdefault("rearmed_at_send",
                                     client.command("query-guest").get("kind") == "kvm")
            guest = GuestModel.from_dirty_rate(info, memory, **overrides)
        elif profile is not None:
            guest = load_guest(profile, memory, **overrides)
        else:
            if working_set is None or memory is None:
                _fail("--rate needs --working-set and --memory")
            guest = GuestModel(ram_bytes=memory, write_rate_pps=rate,
                               working_set_pages=working_set // 4096, **overrides)
        qmp = {"downtime-limit": downtime_limit, "max-bandwidth": max_bandwidth,
               "x-switchover-capped": switchover_capped, "x-cpu-throttle-mode": throttle_mode,
               "compression": compression, "max-total-time": max_total_time,
               "limit-action": limit_action}
        caps = {"auto-converge": auto_converge}
        if dirty_limit is not None:
            if auto_converge:
                _fail("--auto-converge and --dirty-limit exclude each other")
            qmp["vcpu-dirty-limit"] = dirty_limit
            caps["dirty-limit"] = True
        if measure_link:
            from pymig.transport.ceiling import raw_socket_throughput

            bandwidth = raw_socket_throughput("tcp", 1 << 20, total_bytes=256 << 20,
                                              receiver="process")
            click.echo(f"pymig: the link carried {bandwidth / 1e6:,.0f} MB/s", err=True)
        link = LinkModel(bandwidth_bps=bandwidth, rtt_s=rtt / 1000, first_touch_bps=first_touch,
                         switchover_s=switchover_cost / 1000,
                         **({"source_rate_bps": source_rate} if source_rate else {}))
        result = run_model(guest, link, parameters(**qmp, capabilities=caps))
    except QmpError as exc:
        _fail(exc.desc)
    except (PymigError, ValueError, OSError) as exc:
        _fail(_reason(exc))
    if save_profile:
        with open(save_profile, "w", encoding="utf-8") as handle:
            json.dump(guest.to_dict(), handle)
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(dict(summary, guest=guest.to_dict(),
                                   **({"trace": result.trace} if show_trace else {}))))
        return
    from rich.table import Table

    table = Table(title=f"predicted: {guest.ram_bytes >> 20} MiB guest writing "
                        f"{guest.write_rate_pps:,.0f} pages/s over {guest.working_set_pages:,} "
                        f"pages")
    table.add_column("figure")
    table.add_column("value", justify="right")
    verdict = ("converges" if result.converges else
               {"cancelled": "does not converge: cancelled by a limit",
                "does-not-converge": "does not converge"}.get(result.status,
                                                              f"{result.status} (forced)"))
    rows = [("outcome", verdict), ("policy's last word", result.reason),
            ("total time", f"{summary['total_ms']:,.0f} ms"),
            ("downtime", "-" if summary["downtime_ms"] is None
             else f"{summary['downtime_ms']:,.1f} ms"),
            ("downtime expected at switchover", "-" if summary["expected_downtime_ms"] is None
             else f"{summary['expected_downtime_ms']:,.1f} ms"),
            ("bytes sent", f"{result.bytes_sent:,}"), ("passes (syncs)", f"{result.passes}"),
            ("highest throttle", f"{result.throttle_peak_pct} %")]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    if show_trace:
        for record in result.trace:
            click.echo(json.dumps(record))


# -- sweep ----------------------------------------------------------------------------------------
def _int_list(text: str, convert=int) -> tuple:
    try:
        return tuple(convert(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="directory for runs.jsonl, runs.csv and the figures (a sweep killed "
                   "continues from what is there)")
@click.option("--rates", default="400,800,1600,3200,6400,12800", show_default=True,
              help="dirty rates, pages/s, comma-separated")
@click.option("--bandwidths", default="4000000,6000000,9000000,13500000,20000000,30000000",
              show_default=True,
              help="bandwidths (max-bandwidth), bytes/s, comma-separated")
@click.option("--working-sets", default="16M", show_default=True, help="comma-separated")
@click.option("--downtime-limits", default="100", show_default=True, help="ms, comma-separated")
@click.option("--kind", type=click.Choice(["simulated", "kvm", "auto"]), default="simulated",
              show_default=True)
@click.option("--memory", type=SIZE, default="64M", show_default=True)
@click.option("--pattern", type=click.Choice(["uniform", "sequential"]), default="uniform",
              show_default=True)
@click.option("--runs", type=click.IntRange(1, None), default=3, show_default=True,
              help="migrations per point (the point is their median)")
@click.option("--compression", type=click.Choice(["lz4", "none"]), default="none",
              show_default=True)
@click.option("--max-total-time", type=click.IntRange(100, None), default=6000,
              show_default=True, metavar="MS", help="a run not converged by then is cancelled")
@click.option("--link", type=click.Choice(["ratelimit", "netns"]), default="ratelimit",
              show_default=True,
              help="what shapes the link: pymig's rate limiter (max-bandwidth) on loopback, or "
                   "tc on a pair of network namespaces (root; the goodput measured per "
                   "bandwidth)")
@click.option("--cells", "chosen_cells", default=None, metavar="RATE:BANDWIDTH,...",
              help="cells whose passes remaining.png draws (remaining against time, measured "
                   "and predicted); by default the converging ones with the most passes")
@click.option("--switchover-runs", type=click.IntRange(0, 100), default=5, show_default=True,
              help="idle guests migrated before the first run; their median downtime is the "
                   "switchover's fixed cost the predictions use (0: the built-in figure)")
@click.option("--plot-only", is_flag=True, help="draw the figures from what is in --out")
def sweep(out_dir, rates, bandwidths, working_sets, downtime_limits, kind, memory, pattern, runs,
          compression, max_total_time, link, chosen_cells, switchover_runs, plot_only) -> None:
    """Migrate a grid of dirty rate x bandwidth (x working set x downtime limit), each point
    --runs times and predicted too; rows to runs.jsonl and runs.csv, every run's per-sync
    trace to traces/, the convergence map, predicted against measured and remaining against
    time per pass to PNGs, the errors to stdout."""
    from pymig.errors import PymigError
    from pymig.experiment import resolve_kind
    from pymig.sweep import (SweepSpec, accuracy, cells, load_spec, parse_cells, plot_maps,
                             plot_predicted, plot_remaining, read_rows, repredict, run_sweep,
                             table)

    try:
        chosen = parse_cells(chosen_cells) if chosen_cells else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--cells") from None

    if plot_only:
        try:
            spec = load_spec(out_dir)
        except OSError as exc:
            _fail(f"{out_dir}: no sweep there ({_reason(exc)})")
    else:
        from pymig.units import parse_size

        spec = SweepSpec(rates=_int_list(rates), bandwidths=_int_list(bandwidths, parse_size),
                         working_sets=_int_list(working_sets, parse_size),
                         downtime_limits=_int_list(downtime_limits), kind=resolve_kind(kind),
                         memory=memory, pattern=pattern, runs=runs, compression=compression,
                         max_total_time_ms=max_total_time, link=link,
                         switchover_runs=switchover_runs)
        try:
            run_sweep(spec, out_dir, say=lambda text: click.echo(text, err=True))
        except PymigError as exc:
            _fail(f"sweep: {exc}")
    rows = repredict(spec, read_rows(os.path.join(out_dir, "runs.jsonl")))
    if not rows:
        _fail(f"{out_dir}: no runs yet")
    for path in plot_maps(rows, spec, os.path.join(out_dir, "map.png")):
        click.echo(path, err=True)
    click.echo(plot_predicted(rows, os.path.join(out_dir, "predicted.png")), err=True)
    remaining = plot_remaining(rows, spec, out_dir, os.path.join(out_dir, "remaining.png"),
                               chosen)
    if remaining:
        click.echo(remaining, err=True)
    elif chosen:
        click.echo("no trace of the chosen cells: remaining.png not drawn", err=True)
    grid = cells(rows)
    click.echo(table(grid))
    click.echo(json.dumps(accuracy(grid)))


# -- demo -----------------------------------------------------------------------------------------
@main.command()
@click.option("--simulated", is_flag=True, default=None,
              help="use the simulated guest even where /dev/kvm works")
@click.option("--memory", type=SIZE, default="1G", show_default=True)
@click.option("--working-set", type=SIZE, default="128M", show_default=True)
@click.option("--rate", type=int, default=0, help="pages/s (0: as fast as the guest can)")
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--transport", type=click.Choice(["tcp", "unix"]), default="tcp",
              show_default=True)
@click.option("--downtime-limit", type=int, default=300, show_default=True, help="ms")
@click.option("--max-bandwidth", type=SIZE, default="0", help="bytes/s (0: uncapped)")
@click.option("--compression", type=click.Choice(["lz4", "none"]), default="lz4",
              show_default=True, help="RAM pages that shrink under LZ4 go compressed")
@click.option("--mem-prealloc", is_flag=True,
              help="the destination faults its RAM in before the migration starts")
@click.option("--json", "as_json", is_flag=True, help="print the final stats as JSON")
def demo(simulated, memory, working_set, rate, vcpus, transport, downtime_limit, max_bandwidth,
         compression, mem_prealloc, as_json) -> None:
    """Migrate a running self-checking guest between two processes, and prove it carries on."""
    from pymig.demo import DemoOptions, run_demo
    from pymig.errors import PymigError
    from pymig.monitor import ProgressView, stats_table

    options = DemoOptions(simulated=simulated or None, memory=memory, working_set=working_set,
                          rate=rate, vcpus=vcpus, transport=transport,
                          downtime_limit_ms=downtime_limit, max_bandwidth=max_bandwidth,
                          compression=compression, mem_prealloc=mem_prealloc)
    console = Console(stderr=True)
    try:
        if as_json:
            result = run_demo(options, say=lambda text: console.print(text))
        else:
            with ProgressView(console) as view:
                result = run_demo(options, on_update=view.update,
                                  say=lambda text: console.print(text))
    except PymigError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(result))
    else:
        out = Console()
        out.print(stats_table(result, title=f"live migration of a {result['guest_kind']} guest"))
        if result.get("guest_verified"):
            p = result["destination_progress"]
            out.print(f"[green]guest verified on the destination[/]: passes keep growing "
                      f"({p['passes']} so far), self-check consistent, 0 errors",
                      soft_wrap=True)  # one line, whatever the width: scripts grep it
        else:
            out.print("[red]the guest could not be verified on the destination[/]")
    sys.exit(0 if result.get("guest_verified") else 1)


# -- bench ----------------------------------------------------------------------------------------
@main.group()
def bench() -> None:
    """Benchmarks that report ratios to this machine's ceilings."""


@bench.command("core")
@click.option("--json", "as_json", is_flag=True, help="one JSON object keyed by benchmark")
@click.option("--quick", is_flag=True, help="smaller buffers, fewer rounds")
def bench_core(as_json, quick) -> None:
    """Bitmap scan, zero detection, packet encode/decode vs memory bandwidth.

    Each benchmark is reported on stderr as it finishes; the tables (or the JSON) follow on
    stdout."""
    from pymig.benchcore import describe_result, describe_run, format_report, run_core_benchmarks

    def finished(name, row, done, total):
        click.echo(describe_result(name, row, done, total), err=True)

    click.echo(describe_run(quick), err=True)
    results = run_core_benchmarks(quick=quick, on_result=finished)
    if as_json:
        click.echo(json.dumps(results))
    else:
        Console().print(format_report(results))


# -- analyze --------------------------------------------------------------------------------------
@main.command()
@click.argument("source", metavar="FILE|-")
@click.option("--json", "as_json", is_flag=True, help="one JSON object for tools")
def analyze(source, as_json) -> None:
    """Describe a saved migration stream (a file: snapshot, or '-' for stdin)."""
    from pymig.analyze import analyze as run_analysis
    from pymig.analyze import render
    from pymig.transport import FdChannel

    try:
        if source == "-":
            channel = FdChannel(sys.stdin.fileno(), "stdin", writable=False)
        else:
            channel = FdChannel(os.open(source, os.O_RDONLY | os.O_CLOEXEC), source,
                                writable=False)
    except OSError as exc:
        _fail(f"cannot read {source}: {exc.strerror}")
    with channel:
        result = run_analysis(channel)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        render(result, Console())
    sys.exit(0 if result.ok else 1)


# -- plot -----------------------------------------------------------------------------------------
@main.command()
@click.argument("trace", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="PNG to write")
def plot(trace, output) -> None:
    """Plot a migration trace: dirty rate vs bandwidth, pending bytes, throttle."""
    from pymig.plot import plot_trace

    try:
        plot_trace(trace, output)
    except (ImportError, ValueError) as exc:
        _fail(str(exc))
    click.echo(output)


if __name__ == "__main__":
    main()
