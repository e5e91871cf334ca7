"""Fuzz target ``stream``: a whole migration stream into a destination guest.

Input: a stream as a source sends it (a ``file:`` snapshot with its index works too; what
follows the EOF record is not read).  The destination does what :class:`pymig.incoming.Incoming`
does with it: reads the header and the configuration, refuses a guest beyond its limits
(:mod:`pymig.fuzz.destination`: both kinds accepted, so a KVM configuration is checked as a
KVM destination checks it), builds the guest (a simulated one; a KVM one only with
``PYMIG_FUZZ_KVM=1``), rehearses a state load, loads every record (RAM packets through the RAM
loader, vCPU and device state through their descriptions and the guest's own checks), and
then runs the guest for a moment.

Clean ends: a :class:`~pymig.errors.PymigError` anywhere (the configuration's refusal is a
:class:`~pymig.limits.LimitError`).  Anything else is a crash: a configuration the checks let
through and the guest's build then chokes on too, and so is a fault in guest RAM's guard
pages.  Each input also runs with its checksums repaired (:mod:`pymig.fuzz.repair`).
"""

from __future__ import annotations

import xxhash

from pymig import stream
from pymig.errors import PymigError
from pymig.fuzz import destination, repair
from pymig.fuzz.mutate import stream_mutator as mutator  # noqa: F401 - for _harness
from pymig.fuzz.words import stream_words as dictionary  # noqa: F401 - for _harness
from pymig.machine import Machine, load_config
from pymig.transport import BytesChannel


def test_one_input(data: bytes) -> None:
    _load(data)
    fixed = repair.everything(data)
    if fixed != data:
        _load(fixed)


def _load(data: bytes) -> None:
    reader = stream.StreamReader(BytesChannel(data))
    try:
        reader.read_header()
        config = load_config(reader)
        destination.check_config(config)
        destination.open_disks(config)
    except PymigError:
        return
    if not destination.builds(config):
        return
    with destination.ram():
        try:
            machine = Machine.incoming(config, **destination.guest_options(config))
        except PymigError:
            return
    try:
        machine.rehearse_state_load()
        machine.load_stream(reader, _ignore, _ignore)
        destination.run_briefly(machine.guest)
    except PymigError:
        pass
    finally:
        machine.close()


def restored(data: bytes) -> tuple[tuple[int, ...], list] | None:
    """The guest a destination restores from the stream ``data``: a digest of each RAM block
    and the vCPU states; None if it refuses the stream (PymigError) or does not build its
    guest here."""
    reader = stream.StreamReader(BytesChannel(data))
    try:
        reader.read_header()
        config = load_config(reader)
        destination.check_config(config)
    except PymigError:
        return None
    if not destination.builds(config):
        return None
    with destination.ram():
        try:
            machine = Machine.incoming(config, **destination.guest_options(config))
        except PymigError:
            return None
    try:
        machine.load_stream(reader)
        ram = tuple(xxhash.xxh3_64_intdigest(block.array) for block in machine.guest.ram_blocks)
        return ram, machine.guest.save_state().cpus
    except PymigError:
        return None
    finally:
        machine.close()


def _ignore(offset: int) -> None:
    pass
