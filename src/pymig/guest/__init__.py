"""Guests: the :class:`Guest` protocol and its KVM and simulated implementations."""

from pymig.guest.base import Console, Guest, GuestConfig, RamLayout, create, pc_layout

__all__ = ["Console", "Guest", "GuestConfig", "RamLayout", "create", "pc_layout"]
