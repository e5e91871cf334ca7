"""What one ``pymig migrate`` puts in force for its migration, and how it says so.

Migration parameters and capabilities belong to the source process, as in QEMU: a QMP client's
``migrate-set-parameters`` or ``migrate-set-capabilities`` holds for every later migration of
that process until someone changes it.  ``pymig migrate`` is a QMP client that sets, before
each migration, every parameter and capability it has a flag for, to the flag's value or, where
the flag is absent, to its default (:data:`COMMAND_LINE`).  So a run states everything it
depends on and inherits nothing from an earlier run; what it has no flag for (the throttle's
steps, the iteration limits, ...) stays as the process's QMP clients set it, and the run names
those of them that are not at their defaults.  It does not put the old values back afterwards:
a migration's parameters may change while it runs (``max-bandwidth`` at once), a run that is
killed or detached could not put anything back, and ``query-migrate-parameters`` then shows
what the last migration ran with.

A setting is one row of :data:`COMMAND_LINE`; a new parameter the command line should set is one
more row (and its flag in :mod:`pymig.cli`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pymig.parameters import CAPABILITIES, PARAMETERS
from pymig.units import format_bytes

_PARAMETER_DEFAULTS = {p.name: p.default for p in PARAMETERS}


@dataclass(frozen=True)
class Setting:
    """A parameter (``capability=False``) or capability that ``pymig migrate`` sets for every
    migration, under its QMP name; ``show`` renders its value for the settings line."""

    name: str
    capability: bool = False
    show: Callable[[Any], str] = str

    @property
    def default(self) -> Any:
        return False if self.capability else _PARAMETER_DEFAULTS[self.name]


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _bandwidth(value: int) -> str:
    return "uncapped" if not value else f"{format_bytes(value)}/s"


#: Everything ``pymig migrate`` sets each time, in the order the settings line shows it.
COMMAND_LINE: tuple[Setting, ...] = (
    Setting("downtime-limit", show=lambda v: f"{v} ms"),
    Setting("max-bandwidth", show=_bandwidth),
    Setting("compression"),
    Setting("auto-converge", capability=True, show=_on_off),
    Setting("dirty-limit", capability=True, show=_on_off),
    Setting("vcpu-dirty-limit", show=lambda v: f"{v:,} pages/s per vCPU" if v else "none"),
    Setting("postcopy-ram", capability=True, show=_on_off),
    Setting("postcopy-preempt", capability=True, show=_on_off),
    Setting("x-postcopy-after", show=lambda v: f"{v} passes" if v else "on request"),
    Setting("background-snapshot", capability=True, show=_on_off),
)


def _setting_names() -> set[str]:
    return {s.name for s in COMMAND_LINE}


@dataclass
class MigrateSettings:
    """The values one ``pymig migrate`` sets: QMP parameter and capability names to values
    (every :data:`COMMAND_LINE` setting, defaults filled in)."""

    parameters: dict[str, Any]
    capabilities: dict[str, bool]

    @classmethod
    def from_flags(cls, given: Mapping[str, Any]) -> "MigrateSettings":
        """``given``: QMP name -> value for the flags the user gave (None: absent)."""
        unknown = set(given) - _setting_names()
        if unknown:
            raise ValueError(f"not a setting of pymig migrate: {', '.join(sorted(unknown))}")
        parameters: dict[str, Any] = {}
        capabilities: dict[str, bool] = {}
        for setting in COMMAND_LINE:
            value = given.get(setting.name)
            value = setting.default if value is None else value
            (capabilities if setting.capability else parameters)[setting.name] = value
        return cls(parameters, capabilities)

    def qmp_capabilities(self) -> list[dict[str, Any]]:
        """The ``capabilities`` argument of ``migrate-set-capabilities``."""
        return [{"capability": name, "state": state} for name, state in self.capabilities.items()]


def apply(client, settings: MigrateSettings) -> dict[str, Any]:
    """Put ``settings`` in force on the source behind ``client`` (a
    :class:`pymig.qmp.QmpClient`) before its next migration; returns :func:`in_force` as the
    source then reports it.  Refused (PymigError) while a migration is under way there: its
    parameters would change under it."""
    from pymig.errors import PymigError
    from pymig.stats import IN_PROGRESS

    if client.command("query-status")["status"] == "inmigrate":
        raise PymigError("there is no guest to migrate: this is a destination still waiting "
                         "for its guest")
    status = client.command("query-migrate").get("status")
    if status in IN_PROGRESS:
        raise PymigError(f"a migration of this guest is already {status}; pymig migrate sets "
                         f"its parameters only between migrations")
    client.command("migrate-set-parameters", **settings.parameters)
    client.command("migrate-set-capabilities", capabilities=settings.qmp_capabilities())
    parameters = client.command("query-migrate-parameters")
    capabilities = {c["capability"]: c["state"]
                    for c in client.command("query-migrate-capabilities")}
    return in_force(parameters, capabilities)


def in_force(parameters: Mapping[str, Any], capabilities: Mapping[str, bool]) -> dict[str, Any]:
    """What ``--json`` reports: every parameter and capability the source process has now
    (``query-migrate-parameters``, ``query-migrate-capabilities``), and which of them this
    command line set."""
    return {"parameters": dict(parameters), "capabilities": dict(capabilities),
            "set-by-command-line": [s.name for s in COMMAND_LINE]}


def describe(parameters: Mapping[str, Any], capabilities: Mapping[str, bool]) -> str:
    """One line: the command line's settings as the source now has them, then any other
    parameter or capability the process has away from its default (a QMP client set it, or
    the process was started with it)."""
    values = {**parameters, **capabilities}
    own = []
    for setting in COMMAND_LINE:
        if setting.name == "vcpu-dirty-limit" and not capabilities.get("dirty-limit"):
            continue  # it means nothing without the capability
        if setting.name in ("postcopy-ram", "postcopy-preempt", "x-postcopy-after") \
                and not capabilities.get("postcopy-ram"):
            continue  # named only where a migration may switch to post-copy
        if setting.name == "background-snapshot" and not capabilities.get(setting.name):
            continue  # named only where the snapshot is one
        if setting.name in values:
            own.append(f"{setting.name} {setting.show(values[setting.name])}")
    names = _setting_names()
    others = [f"{name} {value}" for name, value in parameters.items()
              if name not in names and name in _PARAMETER_DEFAULTS
              and value != _PARAMETER_DEFAULTS[name]]
    others += [f"{name} {_on_off(state)}" for name, state in capabilities.items()
               if name not in names and name in CAPABILITIES and state]
    line = ", ".join(own)
    if others:
        line += "; also in force on the source: " + ", ".join(others)
    return line
