"""userfaultfd's fault messages, read by the fault threads of post-copy and of background
snapshots."""

from __future__ import annotations

import os
import select
import struct
from typing import Callable

#: struct uffd_msg as a page fault fills it: event, fault flags, address, faulting thread id
FAULT = struct.Struct("<B7xQQI4x")
#: how many messages one read takes at most
BATCH = 64


def read_faults(uffd: int, stop_fd: int,
                on_fault: Callable[[int, int, int, int], None]) -> None:
    """Hand every message read from ``uffd`` (non-blocking) to ``on_fault(event, flags,
    address, tid)``, in order, until ``stop_fd`` becomes readable."""
    poller = select.poll()
    poller.register(uffd, select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    while True:
        events = dict(poller.poll())
        if stop_fd in events:
            return
        try:
            data = os.read(uffd, FAULT.size * BATCH)
        except BlockingIOError:
            continue
        for at in range(0, len(data) - len(data) % FAULT.size, FAULT.size):
            on_fault(*FAULT.unpack_from(data, at))
