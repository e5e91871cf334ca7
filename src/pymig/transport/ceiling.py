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

:func:`file_copy_throughput` is the ceiling of copying a file's bytes over the same loopback
into another file, done the fastest way the kernel offers a program that writes its target
past the page cache (as a block migration's destination does): the file's bytes sent with
``sendfile`` (no copy into the sender's memory) or read into one reused buffer and sent, and
received into page-aligned buffers that a second thread writes with ``O_DIRECT`` while the
next ones arrive.
"""

from __future__ import annotations

import errno
import mmap
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
if len(sys.argv) > 5:  # imported before the clock starts (it runs from the connection on)
    from pymig.transport.ceiling import receive_into_file
if kind == "tcp":
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
else:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
if len(sys.argv) > 5:
    receive_into_file(sock, total, sys.argv[5])
    sock.sendall(b"\x06")
    sock.close()
    sys.exit()
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
#: What the file copy's receiver receives and writes at a time (a block migration's chunk),
#: and how many such buffers it has: one being received while others are written.
COPY_CHUNK_BYTES = 1 << 20
COPY_BUFFERS = 4
COPY_ALIGN = 4096  # O_DIRECT: offsets, lengths and memory in whole pages


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
                       receiver: str = "thread", into: str | None = None) -> float:
    """Bytes per second achieved by ``send(sock, total_bytes)`` into a draining receiver.

    ``sock`` is a connected, blocking socket with default options; ``send``
    must write exactly ``total_bytes``.  The clock runs from just before
    ``send`` until the receiver acknowledges the last byte.  With ``into`` (a
    process receiver only) the receiver writes what it receives into the file
    at that path (:func:`receive_into_file`) rather than dropping it.
    """
    if receiver not in ("thread", "process"):
        raise ValueError(f"receiver must be 'thread' or 'process', not {receiver!r}")
    if into is not None and receiver != "process":
        raise ValueError("a receiver that writes into a file is a process")
    with tempfile.TemporaryDirectory(prefix="pymig-ceiling-") as tmpdir:
        lsock, address = _listener(kind, tmpdir)
        child = thread = None
        errors: list[BaseException] = []
        try:
            if receiver == "process":
                child = subprocess.Popen([sys.executable, "-c", _CHILD, kind, address,
                                          str(total_bytes), str(DRAIN_CHUNK_BYTES),
                                          *([into] if into is not None else [])])
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


def receive_into_file(sock: socket.socket, total_bytes: int, path: str) -> None:
    """Receive ``total_bytes`` from ``sock`` into a fresh file at ``path`` (created, or
    emptied, ``total_bytes`` long and sparse): each :data:`COPY_CHUNK_BYTES` received into a
    page-aligned buffer, which a second thread writes with ``O_DIRECT`` (through the page cache
    where the file system refuses it, and for a tail that is not whole pages) while the next
    one is received.  Raises what the writes raise, ConnectionError if the sender stops
    short."""
    import queue

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, total_bytes)
        try:
            direct = os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0) | os.O_CLOEXEC)
        except OSError:
            direct = -1
        free: queue.SimpleQueue = queue.SimpleQueue()
        jobs: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(COPY_BUFFERS):
            free.put(mmap.mmap(-1, COPY_CHUNK_BYTES))  # page-aligned
        errors: list[BaseException] = []

        def write() -> None:
            nonlocal direct
            while (job := jobs.get()) is not None:
                buf, offset, length = job
                try:
                    if not errors:
                        view = memoryview(buf)[:length]
                        pages = length - length % COPY_ALIGN if direct >= 0 else 0
                        done = 0
                        try:
                            while done < pages:
                                done += os.pwrite(direct, view[done:pages], offset + done)
                        except OSError as exc:
                            if exc.errno != errno.EINVAL:
                                raise
                            os.close(direct)  # no O_DIRECT write here after all
                            direct = -1
                        while done < length:
                            done += os.pwrite(fd, view[done:], offset + done)
                        view.release()
                except BaseException as exc:  # raised by the receiving thread
                    errors.append(exc)
                finally:
                    free.put(buf)

        writer = threading.Thread(target=write, name="ceiling-writer", daemon=True)
        writer.start()
        try:
            got = 0
            while got < total_bytes and not errors:
                buf = free.get()
                length = min(COPY_CHUNK_BYTES, total_bytes - got)
                view = memoryview(buf)
                n = 0
                try:
                    while n < length:
                        k = sock.recv_into(view[n:length], length - n, socket.MSG_WAITALL)
                        if not k:
                            raise ConnectionError(f"sender closed after {got + n} of "
                                                  f"{total_bytes} bytes")
                        n += k
                finally:
                    view.release()
                jobs.put((buf, got, length))
                got += length
        finally:
            jobs.put(None)
            writer.join()
            if direct >= 0:
                os.close(direct)
        if errors:
            raise errors[0]
    finally:
        os.close(fd)


def file_sender(path: str, how: str = "sendfile") -> Callable[[socket.socket, int], None]:
    """A send function that sends the first ``total_bytes`` of the file at ``path``: with
    ``os.sendfile`` (``how`` "sendfile": no copy into this process) or ``os.preadv`` into one
    reused buffer and ``sendall`` ("read")."""
    if how not in ("sendfile", "read"):
        raise ValueError(f"how must be 'sendfile' or 'read', not {how!r}")

    def send(sock: socket.socket, total_bytes: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if how == "sendfile":
                done = 0
                while done < total_bytes:
                    n = os.sendfile(sock.fileno(), fd, done,
                                    min(COPY_CHUNK_BYTES, total_bytes - done))
                    if not n:
                        raise EOFError(f"{path} ends at byte {done}, before {total_bytes}")
                    done += n
                return
            buf = memoryview(bytearray(COPY_CHUNK_BYTES))
            for offset in range(0, total_bytes, COPY_CHUNK_BYTES):
                piece = buf[:min(COPY_CHUNK_BYTES, total_bytes - offset)]
                n = os.preadv(fd, [piece], offset)
                if n != len(piece):
                    raise EOFError(f"{path} ends at byte {offset + n}, before {total_bytes}")
                sock.sendall(piece)
        finally:
            os.close(fd)

    return send


def file_copy_throughput(source: str, target: str, kind: str = "tcp", *,
                         how: str = "sendfile") -> float:
    """Bytes per second of copying the file at ``source`` over loopback ``kind`` into a fresh
    file at ``target`` (created or emptied; the caller removes it), into a receiving process
    that writes it past the page cache (:func:`receive_into_file`), the source's bytes sent as
    :func:`file_sender` ``how`` says.  The clock stops when the receiver has written the last
    byte."""
    total = os.path.getsize(source)
    return measure_throughput(file_sender(source, how), kind, total, receiver="process",
                              into=target)
