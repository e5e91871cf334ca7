"""The two ends of an ``exec:`` migration the fault campaign runs through its proxy.

::

    source ─exec: stdin─► relay send PATH ─unix─► proxy ─unix─► relay recv PATH ─stdout─► dest

``send PATH`` copies its standard input to the unix socket PATH, ends its side and waits for
the far end's SHA-256 of what it read: its exit status is 0 only if that is the digest of what
it sent, and 1 on any failure, which fails the migration at the source, whose guest runs on
(the relay stands for what carries an ``exec:`` stream in practice, such as ssh: a transport
that delivers every byte intact or fails).  ``recv PATH`` listens on PATH, takes one
connection, copies it to its standard output, and at its end answers the digest.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys

CHUNK = 256 * 1024


def send(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        digest = hashlib.sha256()
        while True:
            data = os.read(0, CHUNK)
            if not data:
                break
            digest.update(data)
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < 32:
            more = sock.recv(32 - len(answer))
            if not more:
                break
            answer += more
    except OSError as exc:
        print(f"relay send: {exc}", file=sys.stderr)
        return 1
    if answer != digest.digest():
        print("relay send: the far end did not confirm what was sent", file=sys.stderr)
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
        digest = hashlib.sha256()
        while True:
            data = conn.recv(CHUNK)
            if not data:
                break
            digest.update(data)
            _write_all(data)
        conn.sendall(digest.digest())
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
