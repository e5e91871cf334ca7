"""The SaveStateEntry registry: everything of a guest that migrates, under stable names.

Each guest owns one :class:`SaveStateRegistry` (there is no global one: two guests in one process,
a source and a destination in a test, never share entries).  Devices register once, when they
are built; the migration then walks the registry:

* **live entries** (:meth:`~SaveStateRegistry.register_savevm_live`, RAM above all) are sent
  while the guest runs, through their :class:`LiveHandlers`: ``setup`` once, ``iterate`` until
  the policy switches over, ``complete`` with the guest stopped, ``cleanup`` always;
* **state entries** (:meth:`~SaveStateRegistry.register_vmstate`) are sent once, with the guest
  stopped, as a :class:`~pymig.vmstate.VMStateDescription` describes their object.

Names.  An entry is known on the wire by ``(idstr, instance_id)``: ``idstr`` says what it is
("ram", "cpu", "serial"), ``instance_id`` which one (vCPU 0, 1, ...).  ``instance_id=None`` (or
-1) takes one more than the highest instance registered under that idstr, so devices built in
the same order on both sides get the same ids.  ``section_id`` numbers entries in registration
order (unique, increasing, never reused in a registry); the stream uses it to refer to an entry
after first naming it.

Renames.  A build that renamed a device still loads streams written under the old name:
:meth:`~SaveStateRegistry.find` tries, in order, the exact ``(idstr, instance_id)``, then the
entries' ``compat_names`` (older idstrs) with that instance id, then their ``alias_id`` (an
older instance id) under the idstr or a compat name.  Two entries may never claim the same key
at the same step, so the answer is never a matter of registration order.

Order.  Entries run by descending :class:`Priority`, then in registration order: RAM
(``Priority.RAM``, the default for live entries) goes first, devices whose state others depend
on at load (``Priority.PLATFORM``) next, then everything else.  This is QEMU's
``MigrationPriority`` idea with room between the levels.

Blockers.  A migration must not start while something cannot be migrated: an
:meth:`~SaveStateRegistry.add_blocker` reason (a passthrough device, an operation in progress) or
an entry registered with ``unmigratable=reason``.
:meth:`~SaveStateRegistry.check_migratable` raises :class:`~pymig.errors.MigrationError` listing
every reason at once, so the user fixes them all in one go.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterator, Protocol, runtime_checkable

from pymig import vmstate
from pymig.errors import MigrationError, StateError
from pymig.vmstate import VMStateDescription

MAX_ID = 0xFFFFFFFF  # instance, alias and version ids travel as u32
AUTO_INSTANCE = -1


class Priority(IntEnum):
    """Where an entry goes in the stream: higher first, ties in registration order."""

    DEFAULT = 0
    PLATFORM = 50  # interrupt controllers, buses: loaded before the devices wired to them
    RAM = 100


class RegistrationError(StateError, ValueError):
    """An entry that cannot be registered (or unregistered) as asked: the message says why."""


@runtime_checkable
class LiveHandlers(Protocol):
    """What a live entry does at each step of a migration.

    ``opaque`` is the object given at registration.  ``out`` is the section writer the migration
    hands in: the entry writes its data for this step through it (the migration frames it as
    one section of this entry).
    """

    def setup(self, opaque: Any, out: Any) -> None:
        """Start: note what must be sent (e.g. every page dirty) and send any header."""

    def iterate(self, opaque: Any, out: Any) -> bool:
        """Send a bounded amount; True when there is nothing left to send for now."""

    def pending(self, opaque: Any) -> int:
        """Bytes still to send (an estimate), for the convergence policy."""

    def complete(self, opaque: Any, out: Any) -> None:
        """With the guest stopped: send everything that is left."""

    def load(self, opaque: Any, data: Any, version_id: int, section_type: int) -> None:
        """Destination: apply one section of this entry (``section_type`` as the stream says)."""

    def cleanup(self, opaque: Any) -> None:
        """After success, failure or cancel: release what ``setup`` took; must not raise."""


@dataclass(eq=False)
class SaveStateEntry:
    """One registered piece of migratable state (live handlers or a state description)."""

    idstr: str
    instance_id: int
    section_id: int
    version_id: int
    priority: int
    opaque: Any
    handlers: LiveHandlers | None = None
    vmsd: VMStateDescription | None = None
    alias_id: int | None = None
    compat_names: tuple[str, ...] = ()
    unmigratable: str | None = None

    @property
    def is_live(self) -> bool:
        return self.handlers is not None

    @property
    def name(self) -> str:
        """``idstr/instance_id``, how messages refer to the entry."""
        return f"{self.idstr}/{self.instance_id}"

    def check_load_version(self, version_id: int) -> None:
        """Refuse a stream version this build cannot load (newer, or older than the minimum)."""
        minimum = self.vmsd.minimum_version_id if self.vmsd is not None else 0
        if not minimum <= version_id <= self.version_id:
            raise StateError(
                f"{self.name}: stream has version {version_id}, this build loads "
                f"{minimum}..{self.version_id}",
                entry=self.idstr, versions=(version_id, minimum, self.version_id))

    def save_state(self, obj: Any = None) -> bytes:
        """``obj`` encoded as the entry's description says (None: the object registered
        with the entry).  The entry itself is not touched, so saves may run at once."""
        return self._with_entry_name(vmstate.save, self._description(),
                                     self.opaque if obj is None else obj)

    def load_state(self, data: bytes | bytearray | memoryview, version_id: int,
                   shape: Any = None, into: Any = None) -> Any:
        """The object ``data`` (written at ``version_id``) describes, its fields bounded for
        the guest ``shape`` describes (see :class:`pymig.vmstate.Bound`): loaded into
        ``into``, else into the object registered with the entry, else into a new one from
        the description's factory; returned.  The entry itself is not touched."""
        vmsd = self._description()
        target = into if into is not None else self.opaque
        if target is None:
            target = vmsd.factory() if vmsd.factory else {}
        self._with_entry_name(vmstate.load, vmsd, target, data, version_id, shape)
        return target

    def _description(self) -> VMStateDescription:
        if self.vmsd is None:
            raise TypeError(f"{self.name} is a live entry; its handlers save and load it")
        return self.vmsd

    def _with_entry_name(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except StateError as exc:
            text = str(exc)
            if exc.entry == self.idstr:
                if not text.startswith(self.idstr + " ") or text.startswith(self.name):
                    raise
                # The description's own name: say which instance (``cpu/1 field pos: ...``).
                text = text[len(self.idstr):]
                raise StateError(f"{self.name}{text}", entry=self.idstr, field=exc.field,
                                 versions=exc.versions, value=exc.value) from exc
            # The description may be shared by several entries: say which one failed.
            raise StateError(f"{self.name}: {exc}", entry=self.idstr, field=exc.field,
                             versions=exc.versions, value=exc.value) from exc


@dataclass(frozen=True, eq=False)
class Blocker:
    """A handle for one :meth:`SaveStateRegistry.add_blocker` reason."""

    reason: str


@dataclass
class _Keys:
    """The lookup keys one entry claims, per lookup step."""

    primary: tuple[str, int]
    compat: list[tuple[str, int]] = field(default_factory=list)
    alias: list[tuple[str, int]] = field(default_factory=list)


class SaveStateRegistry:
    """The per-guest registry of save-state entries and migration blockers (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: list[SaveStateEntry] = []  # in stream order
        self._keys: dict[SaveStateEntry, _Keys] = {}
        self._primary: dict[tuple[str, int], SaveStateEntry] = {}
        self._compat: dict[tuple[str, int], SaveStateEntry] = {}
        self._alias: dict[tuple[str, int], SaveStateEntry] = {}
        self._section_ids = itertools.count()
        self._blockers: list[Blocker] = []

    # --- registration ---------------------------------------------------------------------

    def register_savevm_live(self, idstr: str, instance_id: int | None, version_id: int,
                             handlers: LiveHandlers, opaque: Any, *,
                             priority: int = Priority.RAM,
                             unmigratable: str | None = None) -> SaveStateEntry:
        """Register a live entry; returns it (keep it to unregister)."""
        if not isinstance(handlers, LiveHandlers):
            missing = [m for m in ("setup", "iterate", "pending", "complete", "load", "cleanup")
                       if not callable(getattr(handlers, m, None))]
            raise TypeError(f"{idstr}: live handlers lack {', '.join(missing)}")
        return self._register(idstr, instance_id, version_id, opaque, priority,
                              handlers=handlers, unmigratable=unmigratable)

    def register_vmstate(self, idstr: str, instance_id: int | None, vmsd: VMStateDescription,
                         opaque: Any, *, alias_id: int | None = None,
                         compat_names: tuple[str, ...] | list[str] = (),
                         priority: int = Priority.DEFAULT,
                         unmigratable: str | None = None) -> SaveStateEntry:
        """Register a state entry for ``opaque`` as ``vmsd`` describes it; returns it.

        ``compat_names`` are idstrs older builds used for this entry; ``alias_id`` an instance id
        they used.  Both only widen :meth:`find`; the entry saves under its own name.
        """
        if not isinstance(vmsd, VMStateDescription):
            raise TypeError(f"{idstr}: register_vmstate needs a VMStateDescription, not {vmsd!r}")
        return self._register(idstr, instance_id, vmsd.version_id, opaque, priority, vmsd=vmsd,
                              alias_id=alias_id, compat_names=tuple(compat_names),
                              unmigratable=unmigratable)

    def _register(self, idstr: str, instance_id: int | None, version_id: int, opaque: Any,
                  priority: int, **kwargs: Any) -> SaveStateEntry:
        _check_name(idstr)
        for name in kwargs.get("compat_names", ()):
            _check_name(name)
        _check_id(idstr, "version_id", version_id)
        if kwargs.get("alias_id") is not None:
            _check_id(idstr, "alias_id", kwargs["alias_id"])
        with self._lock:
            if instance_id is None or instance_id == AUTO_INSTANCE:
                instance_id = 1 + max((e.instance_id for e in self._entries if e.idstr == idstr),
                                      default=-1)
            _check_id(idstr, "instance_id", instance_id)
            entry = SaveStateEntry(idstr, instance_id, -1, version_id, int(priority), opaque,
                                   **kwargs)
            keys = _keys_of(entry)
            self._claim(entry, keys)
            entry.section_id = next(self._section_ids)
            self._keys[entry] = keys
            # Stable insertion keeps registration order within a priority.
            position = next((i for i, e in enumerate(self._entries) if e.priority < entry.priority),
                            len(self._entries))
            self._entries.insert(position, entry)
            return entry

    def _claim(self, entry: SaveStateEntry, keys: _Keys) -> None:
        """Refuse an entry whose keys another entry already holds at the same lookup step."""
        holder = self._primary.get(keys.primary)
        if holder is not None:
            raise RegistrationError(f"{entry.name} is already registered (section "
                                    f"{holder.section_id})", entry=entry.idstr)
        for table, claimed, what in ((self._compat, keys.compat, "compat name"),
                                     (self._alias, keys.alias, "alias")):
            for key in claimed:
                if key in table:
                    raise RegistrationError(
                        f"{entry.name}: {what} {key[0]}/{key[1]} is already claimed by "
                        f"{table[key].name}", entry=entry.idstr)
        self._primary[keys.primary] = entry
        for key in keys.compat:
            self._compat[key] = entry
        for key in keys.alias:
            self._alias[key] = entry

    def unregister(self, entry: SaveStateEntry) -> None:
        """Remove ``entry`` (and its unmigratable reason); its section id is not reused."""
        with self._lock:
            keys = self._keys.pop(entry, None)
            if keys is None:
                raise RegistrationError(f"{entry.name} is not registered here", entry=entry.idstr)
            del self._primary[keys.primary]
            for key in keys.compat:
                del self._compat[key]
            for key in keys.alias:
                del self._alias[key]
            self._entries.remove(entry)

    # --- lookup -----------------------------------------------------------------------------

    def find(self, idstr: str, instance_id: int) -> SaveStateEntry | None:
        """The entry a stream section named ``(idstr, instance_id)`` belongs to, or None.

        Tries the exact name, then compat names, then alias instance ids (see the module doc).
        """
        key = (idstr, instance_id)
        with self._lock:
            return self._primary.get(key) or self._compat.get(key) or self._alias.get(key)

    def by_section_id(self, section_id: int) -> SaveStateEntry | None:
        with self._lock:
            return next((e for e in self._entries if e.section_id == section_id), None)

    def entries(self) -> list[SaveStateEntry]:
        """Every entry, in stream order (priority, then registration)."""
        with self._lock:
            return list(self._entries)

    def live_entries(self) -> list[SaveStateEntry]:
        return [e for e in self.entries() if e.is_live]

    def state_entries(self) -> list[SaveStateEntry]:
        return [e for e in self.entries() if not e.is_live]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __iter__(self) -> Iterator[SaveStateEntry]:
        return iter(self.entries())

    # --- blockers ---------------------------------------------------------------------------

    def add_blocker(self, reason: str) -> Blocker:
        """Block migration for ``reason`` until :meth:`remove_blocker` with the handle."""
        if not isinstance(reason, str) or not reason:
            raise ValueError("a migration blocker needs a reason a user can read")
        handle = Blocker(reason)
        with self._lock:
            self._blockers.append(handle)
        return handle

    def remove_blocker(self, handle: Blocker) -> bool:
        """Lift a blocker; False if it was not (or no longer) in place."""
        with self._lock:
            if handle in self._blockers:
                self._blockers.remove(handle)
                return True
            return False

    def blockers(self) -> list[str]:
        """Every reason migration is blocked now (blockers first, then unmigratable entries)."""
        with self._lock:
            reasons = [b.reason for b in self._blockers]
            reasons += [f"{e.name} cannot be migrated: {e.unmigratable}"
                        for e in self._entries if e.unmigratable is not None]
        return reasons

    def check_migratable(self) -> None:
        """Raise :class:`MigrationError` naming every reason, if there is any."""
        reasons = self.blockers()
        if reasons:
            raise MigrationError("migration is blocked: " + "; ".join(reasons))


def _check_name(idstr: str) -> None:
    if not isinstance(idstr, str) or not 0 < len(idstr.encode()) <= 255:
        raise RegistrationError(f"an entry name must be 1..255 bytes of UTF-8, not {idstr!r}")


def _check_id(idstr: str, what: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise RegistrationError(f"{idstr}: {what} must be an int in 0..{MAX_ID}, not {value!r}",
                                entry=idstr)


def _keys_of(entry: SaveStateEntry) -> _Keys:
    keys = _Keys((entry.idstr, entry.instance_id))
    keys.compat = [(name, entry.instance_id) for name in entry.compat_names]
    if entry.alias_id is not None:
        keys.alias = [(name, entry.alias_id) for name in (entry.idstr, *entry.compat_names)]
    return keys
