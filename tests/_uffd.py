"""userfaultfd for tests: whether this kernel lets the process open one."""

from __future__ import annotations

import os

import pytest

from pymig._core import kvm as _kvm
from pymig.errors import KvmError


def _uffd_usable() -> bool:
    try:
        fd = _kvm.userfaultfd_open(os.O_CLOEXEC)
    except KvmError:
        return False
    os.close(fd)
    return True


needs_uffd = pytest.mark.skipif(not _uffd_usable(), reason="userfaultfd is not available here")
