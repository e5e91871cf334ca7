"""Sizes and rates as people type them: ``1G``, ``512MiB``, ``100M`` (bytes, powers of 1024
for sizes), and their display."""

from __future__ import annotations

import re

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"1G"`` → 1073741824.  Plain numbers are bytes; K/M/G/T (with optional ``iB``/``B``)
    are powers of 1024.  Raises ValueError with the accepted forms."""
    if isinstance(text, int):
        value = text
    else:
        match = _PATTERN.match(text)
        if not match:
            raise ValueError(f"{text!r} is not a size (examples: 4096, 64M, 1G, 512MiB)")
        number, suffix = match.groups()
        value = float(number) * _SUFFIX[suffix.lower()]
        if value != int(value):
            raise ValueError(f"{text!r} is not a whole number of bytes")
        value = int(value)
    if value < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return value


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:,.0f} MB/s"
