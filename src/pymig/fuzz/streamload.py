"""Fuzz target ``stream``: a whole migration stream into a destination guest.

Input: a stream as a source sends it (a ``file:`` snapshot with its index works too; what
follows the EOF record is not read).  The destination does what :class:`pymig.incoming.Incoming`
does with it: reads the header and the configuration, refuses a guest beyond its limits
(:mod:`pymig.fuzz.destination`), builds the guest, rehearses a state load, loads every record
(RAM packets through the RAM loader, vCPU and device state through their descriptions and the
guest's own checks), and then runs the guest for a moment.

Clean ends: a :class:`~pymig.errors.PymigError` anywhere, and a ValueError while the
configuration is refused (what ``Incoming`` turns into "incoming migration failed").  Anything
else is a crash, and so is a fault in guest RAM's guard pages.  Each input also runs with its
checksums repaired (:mod:`pymig.fuzz.repair`).
"""

from __future__ import annotations

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
        with destination.ram():
            machine = Machine.incoming(config)
    except (PymigError, ValueError):
        return
    try:
        machine.rehearse_state_load()
        machine.load_stream(reader, _ignore, _ignore)
        destination.run_briefly(machine.guest)
    except PymigError:
        pass
    finally:
        machine.close()


def _ignore(offset: int) -> None:
    pass
