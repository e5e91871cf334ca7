"""The loopback ceilings the benchmarks compare with: the file copy moves exactly the source's
bytes into the target, whichever way it sends them, and fails loudly rather than report a rate
for a copy that did not happen."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from pymig.transport.ceiling import (COPY_CHUNK_BYTES, file_copy_throughput, file_sender,
                                     receive_into_file)


def _random_file(path, nbytes: int) -> bytes:
    data = os.urandom(nbytes)
    with open(path, "wb") as handle:
        handle.write(data)
    return data


@pytest.mark.parametrize("how", ["sendfile", "read"])
def test_the_file_copy_writes_exactly_the_sources_bytes(tmp_path, how):
    # whole chunks, a partial one and a tail that is not whole pages (written through the
    # page cache, the rest past it)
    data = _random_file(tmp_path / "source.img", 3 * COPY_CHUNK_BYTES + 5 * 4096 + 512)
    target = tmp_path / "target.img"
    target.write_bytes(b"stale bytes the copy must replace" * 100_000)
    rate = file_copy_throughput(str(tmp_path / "source.img"), str(target), how=how)
    assert rate > 0
    assert target.read_bytes() == data


def test_the_file_copy_into_tmpfs(tmp_path):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    data = _random_file(tmp_path / "source.img", 2 * COPY_CHUNK_BYTES)
    target = os.path.join("/dev/shm", f"pymig-test-ceiling-{os.getpid()}.img")
    try:
        file_copy_throughput(str(tmp_path / "source.img"), target)
        with open(target, "rb") as handle:
            assert handle.read() == data
    finally:
        os.unlink(target)


def test_a_sender_that_stops_short_is_an_error_not_a_rate(tmp_path):
    a, b = socket.socketpair()
    failures = []

    def receive():
        try:
            receive_into_file(b, 2 * COPY_CHUNK_BYTES, str(tmp_path / "target.img"))
        except ConnectionError as exc:
            failures.append(exc)

    thread = threading.Thread(target=receive)
    thread.start()
    a.sendall(os.urandom(COPY_CHUNK_BYTES + 100))
    a.close()
    thread.join(30)
    b.close()
    assert failures and "sender closed after" in str(failures[0])


def test_a_source_shorter_than_asked_is_an_error(tmp_path):
    _random_file(tmp_path / "source.img", 4096)
    a, b = socket.socketpair()
    drained = threading.Thread(target=lambda: b.recv(1 << 20))
    drained.start()
    try:
        for how in ("sendfile", "read"):
            with pytest.raises(EOFError):
                file_sender(str(tmp_path / "source.img"), how)(a, 8192)
    finally:
        a.close()
        drained.join(30)
        b.close()
    with pytest.raises(ValueError):
        file_sender(str(tmp_path / "source.img"), "splice")
