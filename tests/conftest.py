"""Shared test configuration: hypothesis profiles and the /dev/kvm gate.

``HYPOTHESIS_PROFILE=dev`` runs fewer examples while working; CI uses ``ci`` (the default).
Tests marked ``kvm`` run against the real /dev/kvm and skip, with the reason, only where it is
not usable; everything they cover also runs against the simulated guest.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def kvm_unusable_reason() -> str | None:
    """Why /dev/kvm cannot be used here, or None when it can."""
    path = "/dev/kvm"
    if not os.path.exists(path):
        return "/dev/kvm does not exist on this machine"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm cannot be opened: {exc.strerror}"
    os.close(fd)
    return None


def pytest_collection_modifyitems(config, items):
    reason = kvm_unusable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)
