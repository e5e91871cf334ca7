"""What the migration thread estimates: how fast the channel carries data.

The policy's expected downtime is ``pending bytes / bandwidth``; this module keeps the
bandwidth figure honest (only iterations that sent enough to be meaningful count; a cap bounds
it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Bandwidth:
    """Bytes/s the channel carried, from iterations that sent enough to be meaningful."""

    bytes_per_s: float = 0.0
    min_sample_bytes: int = 4 << 20

    def cap(self, bytes_per_s: int) -> None:
        """A bandwidth cap bounds the estimate (and is the estimate before any sample)."""
        if self.bytes_per_s == 0 or self.bytes_per_s > bytes_per_s:
            self.bytes_per_s = float(bytes_per_s)

    def sample(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        rate = nbytes / seconds
        if nbytes >= self.min_sample_bytes or self.bytes_per_s == 0:
            self.bytes_per_s = rate
