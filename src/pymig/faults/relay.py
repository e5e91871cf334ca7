"""The two ends of an ``exec:`` migration the fault campaign runs through its proxy.

::

    source ─exec: stdin─► relay send PATH ──unix──► proxy ──unix──► relay recv PATH ─stdout─► destination

``send PATH`` copies its standard input to the unix socket PATH, ends its side and waits for
the other to close (so that its exit status 0 means the far end read everything); any failure
exits 1, which fails the migration at the source.  ``recv PATH`` listens on PATH, takes one
connection and copies it to its standard output.
"""

from __future__ import annotations

import os
import socket
import sys

CHUNK = 256 * 1024


def send(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        while True:
            data = os.read(0, CHUNK)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(CHUNK):
            pass
    except OSError as exc:
        print(f"relay send: {exc}", file=sys.stderr)
        return 1
    return 0


def recv(path: str) -> int:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(1)
    os.rename(path + ".tmp", path)  # the path appears once it can be connected to
    try:
        conn, _ = server.accept()
        server.close()
        os.unlink(path)
        while True:
            data = conn.recv(CHUNK)
            if not data:
                break
            _write_all(data)
        conn.close()
    except OSError as exc:
        print(f"relay recv: {exc}", file=sys.stderr)
        return 1
    return 0


def _write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


if __name__ == "__main__":
    role, path = sys.argv[1], sys.argv[2]
    sys.exit(send(path) if role == "send" else recv(path))
