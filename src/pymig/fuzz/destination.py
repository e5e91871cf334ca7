"""The destination the ``stream`` and ``state`` harnesses load into: its limits, its guests.

A destination sets its own limits (:class:`pymig.limits.DestinationLimits`) and checks a
stream's configuration against them before it maps a byte: so does this one, with limits set
explicitly, since the defaults would make it a destination of the host's native kind only (on
a KVM host, a refusal of every simulated stream).  It accepts both kinds of guest, at most
:data:`MAX_MEMORY_BYTES` of RAM and :data:`MAX_VCPUS` vCPUs, so that a KVM stream's
configuration goes through every check a real destination makes of it (the kind, the limits,
the built-in workload's layout, the disks).

Its operator named two disk images it may open for a stream's shared disks (``pymig
incoming --disk``): :func:`disk_paths`, at paths that do not change from process to process, so
that seeds can name them.

It then builds simulated guests only; KVM guests only with ``PYMIG_FUZZ_KVM=1``
(:func:`builds`), because loading fuzzed vCPU state into the host's KVM and running it tests
the host kernel as much as pymig, which a shared machine should not be put through.  Guest RAM
comes from a :class:`~pymig.fuzz.guarded.Pool` (guard pages on both sides, reused between
inputs).

A loaded guest runs for :data:`RUN_SECONDS` before it is paused and closed: that is when a
vCPU state that passed every check is used, and where a bad one shows.  ``PYMIG_FUZZ_NO_RUN=1``
leaves that out, to explore past a known crash of a running guest until it is fixed.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time

from pymig.fuzz.guarded import Pool, guest_ram
from pymig.guest import GuestConfig
from pymig.limits import DestinationLimits

MAX_MEMORY_BYTES = 16 << 20
MAX_VCPUS = 4
RUN_SECONDS = 0.002
KVM_ENV = "PYMIG_FUZZ_KVM"
NO_RUN_ENV = "PYMIG_FUZZ_NO_RUN"

#: What this destination accepts (the host's figures never consulted: every limit is set).
LIMITS = DestinationLimits(accept_kinds=("simulated", "kvm"), max_memory_bytes=MAX_MEMORY_BYTES,
                           max_vcpus=MAX_VCPUS)

#: The sectors of the disk images a stream's guest may have (master, slave): a master of
#: 1 MiB, and a slave of one track of 63 sectors, smaller than a cylinder.
DISK_SECTORS = (2048, 63)
SECTOR_BYTES = 512

_pool = Pool()


def kinds() -> tuple[str, ...]:
    """The guest kinds this destination builds (it accepts both)."""
    return ("simulated", "kvm") if os.environ.get(KVM_ENV) == "1" else ("simulated",)


def check_config(config: GuestConfig) -> None:
    """Refuse (:class:`pymig.limits.LimitError`) a configuration beyond this destination's
    limits, as :class:`pymig.incoming.Incoming` does right after reading it."""
    LIMITS.check(config)


def open_disks(config: GuestConfig) -> None:
    """Open the disks of an accepted KVM guest as a destination does (only shared images, only
    those its operator named: :func:`disk_paths`), then close them: DiskError if it would
    not."""
    if config.kind != "kvm" or not config.disks:
        return
    from pymig.guest.kvm_guest import open_disks

    for image in open_disks(config, True, disk_paths()):
        image.close()


def builds(config: GuestConfig) -> bool:
    """Whether this process builds the (accepted) guest ``config`` describes."""
    return config.kind in kinds()


def disk_paths() -> list[str]:
    """The images this destination opens for a stream's shared disks, master first, made (or
    set to their size again) on first use in a directory of this user's own:
    ``$TMPDIR/pymig-fuzz-UID/disk0.img`` and ``disk1.img``."""
    folder = os.path.join(tempfile.gettempdir(), f"pymig-fuzz-{os.geteuid()}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{folder} is not a private directory of this user")
    paths = []
    for unit, sectors in enumerate(DISK_SECTORS):
        path = os.path.join(folder, f"disk{unit}.img")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != sectors * SECTOR_BYTES:
                os.ftruncate(fd, sectors * SECTOR_BYTES)
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def ram():
    """Within the block, guests take their RAM from this destination's guarded pool."""
    return guest_ram(_pool)


def guest_options(config: GuestConfig) -> dict:
    """What this destination builds the guest ``config`` describes with (a KVM guest's disk
    images)."""
    return {"disk_paths": disk_paths()} if config.kind == "kvm" else {}


def build(config: GuestConfig):
    """A new, paused destination guest for ``config`` (already checked), in guarded RAM."""
    from pymig.guest import create

    with ram():
        return create(config, incoming=True, **guest_options(config))


def run_briefly(guest) -> None:
    """Let a loaded guest run for a moment, then stop it."""
    if os.environ.get(NO_RUN_ENV) == "1":
        return
    guest.resume()
    time.sleep(RUN_SECONDS)
    guest.pause()
