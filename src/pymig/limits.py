"""What a destination accepts: which kinds of guest, and how much RAM and how many vCPUs.

A stream opens with the configuration of the guest it carries (``pymig.config``), and whoever
sends it is not trusted with the destination's resources: left to the stream, any peer that
reaches the port chooses how much RAM the destination maps, how many vCPU threads it starts,
and whether a KVM host runs a simulated guest.  So a destination checks the configuration
against limits of its own before it maps a byte or creates a VM (:meth:`DestinationLimits.check`,
called by :class:`pymig.incoming.Incoming` right after the configuration is read), and a
refusal goes back to the source as LOAD_ERROR: the source's migration fails with that reason
and its guest runs on.

Each limit left at None takes its default, worked out when the stream arrives:

* ``accept_kinds``: the kinds the host runs natively: ``kvm`` where /dev/kvm works (so a KVM
  host refuses a simulated stream unless told to take one), ``simulated`` elsewhere.
* ``max_memory_bytes``: what the host can give a guest then: MemAvailable for anonymous and
  memfd RAM, the free pages of the hugetlb pool for hugetlb RAM, the RAM itself when it was
  made ready before the stream came (``--mem-prealloc``).  With an exact ``memory_bytes`` the
  operator has said how much, and the host's figure is not consulted.
* ``max_vcpus``: the VMM's limit, :data:`pymig.guest.layout.MAX_VCPUS` for every kind of guest,
  and on KVM no more than the host's KVM_CAP_MAX_VCPUS.

``memory_bytes`` and ``vcpus`` ask for exactly that much (``pymig incoming --memory
--vcpus``).  QEMU has no counterpart: its destination's command line fixes the machine, and a
stream for another one fails to load; pymig's destination builds the guest the stream
describes, within these limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

from pymig.errors import MigrationError
from pymig.guest import GuestConfig, validate_config
from pymig.guest.base import PreallocatedRam
from pymig.guest.layout import MAX_VCPUS
from pymig.units import format_bytes

GUEST_KINDS = ("kvm", "simulated")


class LimitError(MigrationError):
    """A destination refuses the guest a stream describes: a kind it does not take, more RAM
    or vCPUs than it allows, or a configuration no guest of pymig's can have."""


class Host:
    """What this host offers a guest, read when asked (so, when a stream arrives).  Tests
    hand :class:`DestinationLimits` one of their own."""

    @cached_property
    def _kvm(self) -> tuple[str | None, int]:
        """(why /dev/kvm cannot run guests or None, KVM_CAP_MAX_VCPUS); probed once."""
        try:
            from pymig.kvm.system import Kvm

            with Kvm() as kvm:
                return None, kvm.check("KVM_CAP_MAX_VCPUS") or kvm.check("KVM_CAP_NR_VCPUS")
        except Exception as exc:  # noqa: BLE001 - no /dev/kvm, no permission, old API...
            return str(exc) or type(exc).__name__, 0

    def native_kind(self) -> str:
        """``kvm`` where /dev/kvm runs guests, ``simulated`` elsewhere."""
        return "kvm" if self._kvm[0] is None else "simulated"

    def max_vcpus(self, kind: str) -> tuple[int, str]:
        """The most vCPUs a guest of ``kind`` can have here, and why."""
        if kind == "kvm" and self._kvm[0] is None and 0 < self._kvm[1] < MAX_VCPUS:
            return self._kvm[1], "this host's KVM_CAP_MAX_VCPUS"
        return MAX_VCPUS, "pymig's VMM runs at most that many"

    def memory_bytes(self, backing: str) -> tuple[int, str]:
        """How much RAM of ``backing`` this host can give a new guest now, and where that
        figure comes from."""
        from pymig.memory import hugetlb_pool, memory_available

        if backing == "hugetlb":
            size, _, free = hugetlb_pool()
            return free * size, ("the free huge pages in the host's hugetlb pool, "
                                 "/proc/sys/vm/nr_hugepages")
        return memory_available(), "what the host has available (MemAvailable)"


_HOST = Host()


@dataclass(frozen=True)
class DestinationLimits:
    """A destination's limits on the guest a stream may ask for (module docstring); None
    takes the default."""

    accept_kinds: tuple[str, ...] | None = None
    max_memory_bytes: int | None = None
    max_vcpus: int | None = None
    memory_bytes: int | None = None  # exactly
    vcpus: int | None = None  # exactly
    host: Host = _HOST

    def __post_init__(self) -> None:
        if self.accept_kinds is not None:
            kinds = tuple(dict.fromkeys(self.accept_kinds))
            unknown = [k for k in kinds if k not in GUEST_KINDS]
            if unknown or not kinds:
                raise ValueError(f"guest kinds to accept: {', '.join(GUEST_KINDS)}, not "
                                 f"{', '.join(map(repr, unknown)) or 'none'}")
            object.__setattr__(self, "accept_kinds", kinds)
        for name, flag in (("max_memory_bytes", "--max-memory"), ("max_vcpus", "--max-vcpus"),
                           ("memory_bytes", "--memory"), ("vcpus", "--vcpus")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise ValueError(f"{name} ({flag}) must be a positive integer, not {value!r}")

    def kinds(self) -> tuple[str, ...]:
        """The guest kinds accepted."""
        return self.accept_kinds or (self.host.native_kind(),)

    def check(self, config: GuestConfig, *, backing: str = "anon",
              prealloc: PreallocatedRam | None = None) -> None:
        """Refuse ``config`` (:class:`LimitError`, saying what and by which limit) unless
        this destination takes it: its kind, vCPUs and RAM within the limits, and a
        configuration a guest can be built from (:func:`pymig.guest.validate_config`).
        ``backing`` is the RAM the guest would get, ``prealloc`` RAM made ready for it."""
        kinds = self.kinds()
        if config.kind not in kinds:
            raise LimitError(f"the stream's guest is a {config.kind} guest; this destination "
                             f"accepts {' and '.join(kinds)} guests only (--accept-kind)")
        self._check_vcpus(config)
        self._check_memory(config, backing, prealloc)
        try:
            validate_config(config)
        except ValueError as exc:
            raise LimitError(f"the stream's guest cannot be built: {exc}") from None

    def _check_vcpus(self, config: GuestConfig) -> None:
        if self.vcpus is not None and config.vcpus != self.vcpus:
            raise LimitError(f"the stream's guest has {config.vcpus} vCPUs, --vcpus says "
                             f"{self.vcpus}")
        most, why = self.host.max_vcpus(config.kind)
        if self.max_vcpus is not None and self.max_vcpus < most:
            most, why = self.max_vcpus, "the limit set"
        if config.vcpus > most:
            raise LimitError(f"the stream's guest has {config.vcpus} vCPUs; this destination "
                             f"accepts at most {most} ({why}; --max-vcpus)")

    def _check_memory(self, config: GuestConfig, backing: str,
                      prealloc: PreallocatedRam | None) -> None:
        size = config.memory_bytes
        if self.memory_bytes is not None and size != self.memory_bytes:
            raise LimitError(f"the stream's guest has {size} bytes of RAM, --memory says "
                             f"{self.memory_bytes}")
        if self.max_memory_bytes is not None:
            most, why = self.max_memory_bytes, "the limit set"
        elif prealloc is not None:
            most = sum(layout.size_bytes for layout in prealloc.layout)
            why = "the RAM made ready before the stream came"
        elif self.memory_bytes is not None:
            return
        else:
            most, why = self.host.memory_bytes(backing)
        if size > most:
            raise LimitError(f"the stream's guest has {format_bytes(size)} of RAM; this "
                             f"destination accepts at most {format_bytes(most)} ({why}; "
                             f"--max-memory)")


def parse_kinds(values: Iterable[str]) -> tuple[str, ...] | None:
    """``--accept-kind`` values (each a kind or a comma-separated list) as a tuple; None when
    there are none (the default then applies)."""
    kinds = tuple(k.strip() for value in values for k in value.split(",") if k.strip())
    return kinds or None
