"""The guest's console keeps the newest output in a bounded ring; files and callbacks see all."""

from __future__ import annotations

import os

from pymig.guest.base import CONSOLE_BYTES, Console


def test_a_guest_that_prints_without_end_costs_a_bounded_amount_of_memory():
    console = Console()
    chunk = bytes(range(256)) * 16  # 4 KiB
    total = 8 * CONSOLE_BYTES
    for _ in range(total // len(chunk)):
        console.write(chunk)
    console.write(b"the end\n")
    kept = console.data()
    assert len(kept) == CONSOLE_BYTES
    assert kept.endswith(b"the end\n")  # the newest output is what stays
    assert console.dropped == total + len(b"the end\n") - CONSOLE_BYTES
    assert len(console._data) <= 2 * CONSOLE_BYTES  # what it holds, not only what it shows


def test_the_ring_keeps_exactly_the_newest_bytes_in_order():
    console = Console(capacity=10)
    written = b""
    for i in range(100):
        piece = str(i).encode() + b","
        console.write(piece)
        written += piece
        assert console.data() == written[-10:]
    console.write(b"x" * 25)  # one write larger than the ring
    assert console.data() == b"x" * 10
    assert console.dropped == len(written) + 25 - 10


def test_files_and_callbacks_still_see_every_byte(tmp_path):
    console = Console(capacity=16)
    seen = []
    console.subscribe(seen.append)
    tee = console.tee_to_file(str(tmp_path / "serial.log"))
    data = os.urandom(1000)
    for i in range(0, len(data), 7):
        console.write(data[i:i + 7])
    tee.close()
    assert b"".join(seen) == data
    assert (tmp_path / "serial.log").read_bytes() == data
    assert console.data() == data[-16:]
