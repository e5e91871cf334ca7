"""The README's TLS set-up is true: its openssl commands make credentials that pymig loads,
with the identity its --tls-authz names, for a destination at 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading

import pytest

from pymig.transport import tls
from pymig.transport.channel import SocketChannel
from pymig.transport.tlscreds import TlsCredentials

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _readme_block(marker: str) -> str:
    text = open(README).read()
    match = re.search(re.escape(marker) + r"\s*```\n(.*?)```", text, re.S)
    assert match, f"no code block after {marker} in the README"
    return match.group(1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the README's commands use openssl")
def test_the_readme_makes_credentials_pymig_accepts(tmp_path):
    script = _readme_block("<!-- tls-creds-commands -->")
    out = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pki = tmp_path / "pki"
    assert sorted(os.listdir(pki)) == ["ca-cert.pem", "client-cert.pem", "client-key.pem",
                                       "server-cert.pem", "server-key.pem"]
    creds = TlsCredentials.load(str(pki))
    authz = re.search(r"--tls-authz '([^']+)'", open(README).read()).group(1)
    a, b = socket.socketpair()
    box = {}
    server = threading.Thread(target=lambda: box.update(
        s=tls.accept(SocketChannel(b, "destination"), creds, (authz,))))
    server.start()
    client = tls.connect(SocketChannel(a, "tcp:127.0.0.1:4444"), creds, "127.0.0.1")
    server.join(30)
    try:
        assert box["s"].peer_identity == authz == "CN=src.example,O=Example"
        client.send(b"guest")
        assert box["s"].recv_exact(5) == b"guest"
    finally:
        client.close()
        box["s"].close()
