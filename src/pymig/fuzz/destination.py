"""The destination the ``stream`` and ``state`` harnesses load into: its limits, its guests.

Like a destination started with limits, it refuses a configuration beyond them before building
anything: guests of at most :data:`MAX_MEMORY_BYTES` and :data:`MAX_VCPUS`, of the kinds it
accepts.  That is the simulated guest; KVM guests only with ``PYMIG_FUZZ_KVM=1``, because
loading fuzzed vCPU state into the host's KVM and running it tests the host kernel as much as
pymig, which a shared machine should not be put through.  Guest RAM comes from a
:class:`~pymig.fuzz.guarded.Pool` (guard pages on both sides, reused between inputs).

A loaded guest runs for :data:`RUN_SECONDS` before it is paused and closed: that is when a
vCPU state that passed every check is used, and where a bad one shows.  ``PYMIG_FUZZ_NO_RUN=1``
leaves that out, to explore past a known crash of a running guest until it is fixed.
"""

from __future__ import annotations

import os
import time

from pymig.fuzz.guarded import Pool, guest_ram
from pymig.guest import GuestConfig

MAX_MEMORY_BYTES = 16 << 20
MAX_VCPUS = 4
RUN_SECONDS = 0.002
KVM_ENV = "PYMIG_FUZZ_KVM"
NO_RUN_ENV = "PYMIG_FUZZ_NO_RUN"

_pool = Pool()


def kinds() -> tuple[str, ...]:
    """The guest kinds this destination builds."""
    return ("simulated", "kvm") if os.environ.get(KVM_ENV) == "1" else ("simulated",)


def check_config(config: GuestConfig) -> None:
    """Refuse (ValueError) a configuration beyond this destination's limits."""
    if config.kind not in kinds():
        raise ValueError(f"this destination accepts {' and '.join(kinds())} guests, not "
                         f"{config.kind!r}")
    memory = config.memory_bytes
    if isinstance(memory, bool) or not isinstance(memory, int) or memory > MAX_MEMORY_BYTES:
        raise ValueError(f"guest memory {memory!r} is beyond this destination's "
                         f"{MAX_MEMORY_BYTES} bytes")
    if any(not isinstance(b.size_bytes, int) or b.size_bytes > MAX_MEMORY_BYTES
           for b in config.blocks):
        raise ValueError("a RAM block is beyond this destination's memory")
    if isinstance(config.vcpus, bool) or not isinstance(config.vcpus, int) \
            or config.vcpus > MAX_VCPUS:
        raise ValueError(f"{config.vcpus!r} vCPUs are beyond this destination's {MAX_VCPUS}")


def ram():
    """Within the block, guests take their RAM from this destination's guarded pool."""
    return guest_ram(_pool)


def build(config: GuestConfig):
    """A new, paused destination guest for ``config`` (already checked), in guarded RAM."""
    from pymig.guest import create

    with ram():
        return create(config, incoming=True)


def run_briefly(guest) -> None:
    """Let a loaded guest run for a moment, then stop it."""
    if os.environ.get(NO_RUN_ENV) == "1":
        return
    guest.resume()
    time.sleep(RUN_SECONDS)
    guest.pause()
