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


def _descendants(pid: int) -> list[int]:
    """Live processes below ``pid``, children before grandchildren (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z":
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """A test that fails half-way may leave a guest process running flat out, which would
    slow every later test (and benchmark) on this small host: whatever a test started and
    did not stop is killed after it."""
    yield
    import signal
    import warnings

    leftover = _descendants(os.getpid())
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leftover:
        warnings.warn(f"killed {len(leftover)} process(es) the test left running", stacklevel=1)
