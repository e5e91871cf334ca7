"""Guests: the :class:`Guest` protocol and its KVM and simulated implementations."""

from __future__ import annotations

from typing import Any

from pymig.guest.base import Console, Guest, GuestConfig, GuestStatus
from pymig.guest.config import make_config, validate_config
from pymig.guest.layout import RamLayout, pc_layout

__all__ = ["Console", "Guest", "GuestConfig", "GuestStatus", "RamLayout", "create", "make_config",
           "pc_layout", "validate_config"]


def create(config: GuestConfig, **options: Any) -> Guest:
    """Build a new, paused guest with fresh RAM for ``config`` (source or destination)."""
    if config.kind == "kvm":
        from pymig.guest.kvm_guest import KvmGuest  # KVM's extension loads only when used

        return KvmGuest.create(config, **options)
    if config.kind == "simulated":
        from pymig.guest.simulated import SimulatedGuest

        return SimulatedGuest.create(config, **options)
    raise ValueError(f"unknown guest kind {config.kind!r} (use 'kvm' or 'simulated')")
