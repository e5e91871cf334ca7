"""Guest RAM the host swapped out, for real: a swap file of the test's own, and a memory
cgroup whose pages a test can push out to it and drop from the swap cache, so that they are
neither mapped nor resident (mincore sees nothing) while they still hold data."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess

import pytest

MADV_PAGEOUT = 21  # linux/mman.h
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "swapping guest RAM out needs root (swapon, a memory cgroup)"
    for tool in ("mkswap", "swapon", "swapoff"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not (os.path.isdir("/sys/fs/cgroup/memory")
            or os.path.exists("/sys/fs/cgroup/cgroup.controllers")):
        return "no memory cgroup controller is mounted"
    return None


@contextlib.contextmanager
def swap_file(directories, size_bytes: int = 256 << 20):
    """A swap file of ``size_bytes`` in the first of ``directories`` that takes one, on while
    the block runs."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    errors = []
    for directory in directories:
        path = os.path.join(directory, "pymig-test.swap")
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size_bytes)
            finally:
                os.close(fd)
            subprocess.run(["mkswap", path], check=True, capture_output=True)
            subprocess.run(["swapon", path], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            errors.append(f"{directory}: {getattr(exc, 'stderr', b'') or exc}")
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        try:
            yield path
        finally:
            subprocess.run(["swapoff", path], check=True, capture_output=True)
            os.unlink(path)
        return
    pytest.fail(f"no directory took a swap file: {errors}")


class MemoryCgroup:
    """A memory cgroup this process joins while it faults pages in (they are charged to it),
    leaves, then squeezes: what it was charged goes to swap and out of the swap cache."""

    def __init__(self, name: str):
        self.v1 = os.path.isdir("/sys/fs/cgroup/memory")
        root = "/sys/fs/cgroup/memory" if self.v1 else "/sys/fs/cgroup"
        self.parent = root
        self.path = os.path.join(root, name)
        os.makedirs(self.path, exist_ok=True)

    def _join(self, group: str) -> None:
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    @contextlib.contextmanager
    def charged(self):
        """Pages this process faults in meanwhile are charged to the group."""
        self._join(self.path)
        try:
            yield
        finally:
            self._join(self.parent)

    def squeeze(self, address: int, length: int) -> None:
        """Out to swap and dropped from the swap cache: [address, +length) (charged here)."""
        if _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_PAGEOUT):
            raise OSError(ctypes.get_errno(), "MADV_PAGEOUT")
        if self.v1:
            limit = os.path.join(self.path, "memory.limit_in_bytes")
            for size in (1 << 20, 64 << 10, 4 << 10):
                with contextlib.suppress(OSError):  # EBUSY: could not get under it
                    with open(limit, "w") as f:
                        f.write(str(size))
            # and no limit again: what comes back in from swap is charged here, and under a
            # limit of a few pages every read of one would push another out
            with open(limit, "w") as f:
                f.write("-1")
        else:
            with contextlib.suppress(OSError):  # EAGAIN: reclaimed less than asked
                with open(os.path.join(self.path, "memory.reclaim"), "w") as f:
                    f.write(str(1 << 30))

    def remove(self) -> None:
        os.rmdir(self.path)


def resident_pages(address: int, length: int) -> int:
    """How many 4 KiB pages of the range mincore calls resident."""
    import numpy as np

    vec = np.zeros(length // 4096, dtype=np.uint8)
    if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length),
                     ctypes.c_void_p(vec.ctypes.data)):
        raise OSError(ctypes.get_errno(), "mincore")
    return int((vec & 1).sum())
