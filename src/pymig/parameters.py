"""Migration parameters and capabilities, under the names QMP users know.

Parameters are values (``downtime-limit``, ``max-bandwidth``...), capabilities are switches
(``auto-converge``...).  Both may change while a migration runs: ``max-bandwidth`` takes effect
at once (the channel's token bucket), everything else at the next iteration, because the
migration thread reads a fresh snapshot before every decision.

Names are QEMU's where QEMU has the parameter.  ``x-cpu-throttle-mode`` is pymig's own (the
``x-`` prefix is QEMU's mark for what is not part of its interface): ``step``, the default, is
QEMU's auto-converge; ``aim`` is pymig's, and only in force when asked for.  So is
``x-switchover-capped``: ``max-bandwidth`` protects the network while the guest runs, and once
it is stopped QEMU sends the rest uncapped, as pymig does unless this asks otherwise.

``tls-creds``, ``tls-hostname`` and ``tls-authz`` are QEMU's, with one difference: QEMU's
``tls-creds`` and ``tls-authz`` name objects made with ``-object``; here ``tls-creds`` names
credentials loaded at start (``--tls-creds DIR``, id ``tls0``) or is a directory itself, and
``tls-authz`` holds the identities themselves (pymig.transport.tlscreds).
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import weakref
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parameter:
    """One tunable: its QMP name, attribute, type, bounds and meaning."""

    name: str
    attr: str
    kind: type
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("downtime-limit", "downtime_limit_ms", int, 300,
              "longest pause (ms) the guest may see at switchover", 1, 2_000_000),
    Parameter("max-bandwidth", "max_bandwidth", int, 0,
              "cap on the stream, bytes/s (0: uncapped)", 0, None),
    Parameter("throttle-trigger-threshold", "throttle_trigger_threshold", int, 50,
              "auto-converge acts on a period (at least 1 s) in which the guest dirtied more "
              "than this % of the bytes sent, the second such period since it last acted", 1, 100),
    Parameter("cpu-throttle-initial", "throttle_initial_pct", int, 20,
              "auto-converge's first throttle (%)", 1, 99),
    Parameter("cpu-throttle-increment", "throttle_increment_pct", int, 10,
              "throttle added at each later step (%)", 1, 99),
    Parameter("cpu-throttle-tailslow", "throttle_tailslow", bool, False,
              "smaller steps as the guest nears the trigger threshold (QEMU's tail slow)"),
    Parameter("max-cpu-throttle", "throttle_max_pct", int, 99,
              "highest throttle (%)", 1, 99),
    Parameter("x-cpu-throttle-mode", "throttle_mode", str, "step",
              "step: QEMU's auto-converge, from cpu-throttle-initial by cpu-throttle-increment; "
              "aim (pymig's own): at each sync, the throttle that fits the guest's measured "
              "dirty rate into half the bandwidth, at once", choices=("step", "aim")),
    Parameter("vcpu-dirty-limit", "dirty_limit_pages_per_s", int, 0,
              "with the dirty-limit capability: cap each vCPU's dirty rate (pages/s)", 0, None),
    Parameter("max-iterations", "max_iterations", int, 0,
              "after this many iterations (dirty-log syncs: passes over RAM, or 100 ms "
              "slices with a throttling capability) apply limit-action (0: no limit)", 0, None),
    Parameter("max-total-time", "max_total_time_ms", int, 0,
              "after this long apply limit-action, ms (0: no limit)", 0, None),
    Parameter("max-bytes-ratio", "max_bytes_ratio", float, 0.0,
              "after sending this multiple of RAM apply limit-action (0: no limit)", 0, None),
    Parameter("limit-action", "limit_action", str, "switchover",
              "what a reached limit does: switchover (accept a longer downtime) or cancel",
              choices=("switchover", "cancel")),
    Parameter("compression", "compression", str, "lz4",
              "lz4: RAM pages that shrink by an eighth under LZ4 go compressed (backing off "
              "where memory does not compress); none: every page as it is",
              choices=("lz4", "none")),
    Parameter("tls-creds", "tls_creds", str, "",
              "TLS for the migration stream and its return path: the id of credentials this "
              "process loaded at start (--tls-creds DIR loads them as tls0), or a credentials "
              "directory in QEMU's tls-creds-x509 layout, loaded when set (\"\": no TLS)"),
    Parameter("tls-hostname", "tls_hostname", str, "",
              "the name the destination's certificate must carry (\"\": the migration URI's "
              "host; an IP address is checked against the certificate's IP addresses)"),
    Parameter("tls-authz", "tls_authz", tuple, (),
              "a destination accepts only sources whose certificate's subject (RFC 4514, as "
              "CN=src.example,O=Example) is one of these, each exact or a glob ([]: any the "
              "CA vouches for)"),
    Parameter("x-postcopy-after", "postcopy_after_passes", int, 0,
              "with the postcopy-ram capability: switch to post-copy by itself once this many "
              "passes over RAM are through (0: only on migrate-start-postcopy)", 0, None),
    Parameter("x-switchover-capped", "switchover_capped", bool, False,
              "keep max-bandwidth in force during the stop-and-copy too (by default, as in "
              "QEMU, the guest is stopped then and the last pass goes uncapped)"),
)

CAPABILITIES: dict[str, str] = {
    "block": "move the images of disks not on shared storage with the guest (migrate blk)",
    "auto-converge": "throttle the vCPUs when the guest dirties memory faster than it moves",
    "dirty-limit": "cap the dirty rate of each vCPU instead of throttling them all",
    "pause-before-switchover": "wait for 'migrate-continue' before stopping the guest",
    "postcopy-ram": "switch to post-copy on migrate-start-postcopy: the guest runs at the "
                    "destination at once and its missing pages follow, those it touches first "
                    "(both sides)",
    "background-snapshot": "a one-way snapshot (file:, exec:) of the guest as it was when it "
                           "began, taken while the guest runs on: RAM is write-protected and "
                           "each page saved before the guest's first write to it",
    "postcopy-preempt": "with postcopy-ram: send the pages a vCPU at the destination waits for "
                        "on a second connection of their own, never behind the background "
                        "push (both sides; tcp: and unix: only)",
}

_BY_NAME = {p.name: p for p in PARAMETERS}

#: Capabilities a background snapshot refuses to run with: QEMU's list
#: (check_caps_background_snapshot) where pymig has the capability, and dirty-limit and
#: block, which need passes tracking dirty pages that a background snapshot does not make.
BACKGROUND_SNAPSHOT_EXCLUDES = ("postcopy-ram", "pause-before-switchover", "auto-converge",
                                "dirty-limit", "block")


def check_capabilities(caps: dict[str, bool]) -> None:
    """Refuse a set of capabilities that exclude each other, as QEMU's migrate_caps_check
    does when they are set (its words)."""
    if caps.get("background-snapshot"):
        for name in BACKGROUND_SNAPSHOT_EXCLUDES:
            if caps.get(name):
                raise ValueError(f"Background-snapshot is not compatible with {name}")


@dataclass
class MigrationParameters:
    """A snapshot of every parameter and capability (attribute names; QMP names via maps)."""

    downtime_limit_ms: int = 300
    max_bandwidth: int = 0
    throttle_trigger_threshold: int = 50
    throttle_initial_pct: int = 20
    throttle_increment_pct: int = 10
    throttle_tailslow: bool = False
    throttle_max_pct: int = 99
    throttle_mode: str = "step"
    dirty_limit_pages_per_s: int = 0
    max_iterations: int = 0
    max_total_time_ms: int = 0
    max_bytes_ratio: float = 0.0
    limit_action: str = "switchover"
    compression: str = "lz4"
    tls_creds: str = ""
    tls_hostname: str = ""
    tls_authz: tuple[str, ...] = ()
    switchover_capped: bool = False
    postcopy_after_passes: int = 0
    capabilities: dict[str, bool] = dataclasses.field(
        default_factory=lambda: {name: False for name in CAPABILITIES})

    def qmp(self) -> dict[str, Any]:
        """The parameters under their QMP names (``query-migrate-parameters``)."""
        return {p.name: list(value) if isinstance(value := getattr(self, p.attr), tuple)
                else value for p in PARAMETERS}


def validate(name: str, value: Any) -> Any:
    """Check and convert one parameter given by its QMP name; raises ValueError saying why."""
    spec = _BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"unknown migration parameter {name!r}; known: "
                         f"{', '.join(sorted(_BY_NAME))}")
    if spec.kind is str and not spec.choices:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, not {value!r}")
        return value
    if spec.kind is str:
        if not isinstance(value, str) or value not in spec.choices:
            raise ValueError(f"{name} must be one of {', '.join(spec.choices)}, not {value!r}")
        return value
    if spec.kind is tuple:  # tls-authz: one identity or a list of them
        from pymig.transport.tlscreds import parse_authz

        return parse_authz(value)
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if spec.kind is int and value != int(value):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    value = spec.kind(value)
    if spec.minimum is not None and value < spec.minimum:
        raise ValueError(f"{name} must be at least {spec.minimum}, not {value}")
    if spec.maximum is not None and value > spec.maximum:
        raise ValueError(f"{name} must be at most {spec.maximum}, not {value}")
    return value


class ParameterStore:
    """Thread-safe parameters: the control socket writes, the migration thread snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._params = MigrationParameters()
        self._listeners: list = []

    def snapshot(self) -> MigrationParameters:
        with self._lock:
            return dataclasses.replace(self._params,
                                       capabilities=dict(self._params.capabilities))

    def set(self, **qmp_values: Any) -> None:
        """Set parameters by QMP name, all or none (every value is checked first)."""
        checked = {_BY_NAME[n].attr if n in _BY_NAME else n: validate(n, v)
                   for n, v in qmp_values.items()}
        with self._lock:
            for attr, value in checked.items():
                setattr(self._params, attr, value)
            listeners = [ref() for ref in self._listeners]
            self._listeners = [ref for ref, callback in zip(self._listeners, listeners)
                               if callback is not None]
        for callback in listeners:
            if callback is not None:
                callback(checked)

    def set_capabilities(self, **caps: bool) -> None:
        for name, value in caps.items():
            if name not in CAPABILITIES:
                raise ValueError(f"unknown migration capability {name!r}; known: "
                                 f"{', '.join(sorted(CAPABILITIES))}")
            if not isinstance(value, bool):
                raise ValueError(f"capability {name} must be true or false, not {value!r}")
        with self._lock:
            combined = {**self._params.capabilities, **caps}
            check_capabilities(combined)
            self._params.capabilities.update(caps)

    def on_change(self, callback) -> None:
        """``callback(changed: dict[attr, value])`` after every successful :meth:`set`.

        A bound method is held weakly: the store outlives every migration of its process,
        and a migration that ended must not stay alive (with its buffers) through it."""
        ref = (weakref.WeakMethod(callback) if inspect.ismethod(callback)
               else (lambda callback=callback: callback))
        with self._lock:
            self._listeners.append(ref)
