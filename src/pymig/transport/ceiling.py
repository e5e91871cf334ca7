"""The loopback ceiling: how fast a plain ``socket.sendall`` loop moves bytes right now.

Loopback throughput on a shared 2-vCPU host varies up to 2x from one minute to
the next, so a benchmark measures its ceiling in the same run and reports a
ratio instead of comparing with a number taken another day.

:func:`measure_throughput` is the harness: it connects a sender socket to a
receiver (a thread, or a separate process so the two do not share a GIL),
runs a caller-supplied send function and times until the receiver confirms it
has every byte.  :func:`raw_socket_throughput` runs it with the plain
``sendall`` loop; a benchmark of anything else passes its own send function to
the same harness, so both numbers come from identical plumbing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from pymig.transport import sockfile

#: Receive buffer of the draining side: large, and filled with MSG_WAITALL, so
#: the receiver is never the bottleneck being measured.
DRAIN_CHUNK_BYTES = 4 << 20
DEFAULT_TOTAL_BYTES = 256 << 20
_ACK = b"\x06"

_CHILD = r"""
import socket, sys
kind, address, total, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "tcp":
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
else:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
buf = memoryview(bytearray(chunk))
got = 0
while got < total:
    n = sock.recv_into(buf, min(chunk, total - got), socket.MSG_WAITALL)
    if not n:
        sys.exit(f"sender closed after {got} of {total} bytes")
    got += n
sock.sendall(b"\x06")
sock.close()
"""


def drain(sock: socket.socket, total_bytes: int, chunk_bytes: int = DRAIN_CHUNK_BYTES) -> None:
    """Receive and discard ``total_bytes``, then send one acknowledgement byte."""
    buf = memoryview(bytearray(chunk_bytes))
    got = 0
    while got < total_bytes:
        n = sock.recv_into(buf, min(chunk_bytes, total_bytes - got), socket.MSG_WAITALL)
        if not n:
            raise ConnectionError(f"sender closed after {got} of {total_bytes} bytes")
        got += n
    sock.sendall(_ACK)


def _listener(kind: str, tmpdir: str) -> tuple[socket.socket, str]:
    if kind == "tcp":
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{lsock.getsockname()[1]}"
    elif kind == "unix":
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = os.path.join(tmpdir, "ceiling.sock")
        sockfile.bind_private(lsock, address)
    else:
        raise ValueError(f"kind must be 'tcp' or 'unix', not {kind!r}")
    lsock.listen(1)
    return lsock, address


def measure_throughput(send: Callable[[socket.socket, int], None], kind: str = "tcp",
                       total_bytes: int = DEFAULT_TOTAL_BYTES, *,
                       receiver: str = "thread") -> float:
    """Bytes per second achieved by ``send(sock, total_bytes)`` into a draining receiver.

    ``sock`` is a connected, blocking socket with default options; ``send``
    must write exactly ``total_bytes``.  The clock runs from just before
    ``send`` until the receiver acknowledges the last byte.
    """
    if receiver not in ("thread", "process"):
        raise ValueError(f"receiver must be 'thread' or 'process', not {receiver!r}")
    with tempfile.TemporaryDirectory(prefix="pymig-ceiling-") as tmpdir:
        lsock, address = _listener(kind, tmpdir)
        child = thread = None
        errors: list[BaseException] = []
        try:
            if receiver == "process":
                child = subprocess.Popen([sys.executable, "-c", _CHILD, kind, address,
                                          str(total_bytes), str(DRAIN_CHUNK_BYTES)])
                lsock.settimeout(30)
                sender, _ = lsock.accept()
                sender.setblocking(True)
            else:
                family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
                rsock = socket.socket(family, socket.SOCK_STREAM)
                rsock.connect(lsock.getsockname())
                sender, _ = lsock.accept()

                def run() -> None:
                    try:
                        drain(rsock, total_bytes)
                    except BaseException as exc:  # reported by the caller's thread
                        errors.append(exc)
                    finally:
                        rsock.close()

                thread = threading.Thread(target=run, name="ceiling-drain", daemon=True)
                thread.start()
            with sender:
                start = time.perf_counter()
                send(sender, total_bytes)
                ack = sender.recv(1)
                elapsed = time.perf_counter() - start
        finally:
            lsock.close()
            if thread is not None:
                thread.join(30)
            if child is not None:
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        if errors:
            raise errors[0]
        if ack != _ACK:
            raise ConnectionError("the receiver did not confirm the transfer")
    return total_bytes / elapsed


def sendall_loop(write_bytes: int) -> Callable[[socket.socket, int], None]:
    """A send function: ``sock.sendall`` of one ``write_bytes`` buffer until the total is sent."""
    data = memoryview(bytearray(os.urandom(write_bytes)))

    def send(sock: socket.socket, total_bytes: int) -> None:
        left = total_bytes
        while left:
            piece = data if left >= len(data) else data[:left]
            sock.sendall(piece)
            left -= len(piece)

    return send


def raw_socket_throughput(kind: str = "tcp", write_bytes: int = 1 << 20,
                          total_bytes: int = DEFAULT_TOTAL_BYTES, *,
                          receiver: str = "thread") -> float:
    """Bytes per second of a plain ``socket.sendall`` loop over loopback ``kind``
    ("tcp" or "unix"), writing ``write_bytes`` per call."""
    return measure_throughput(sendall_loop(write_bytes), kind, total_bytes, receiver=receiver)
