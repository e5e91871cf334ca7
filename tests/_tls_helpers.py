"""TLS credentials for tests, made with trustme in QEMU's tls-creds-x509 layout."""

from __future__ import annotations

import datetime
import os

import pytest
import trustme

from pymig.transport.tlscreds import CredentialStore, TlsCredentials

SOURCE_NAME = "src.example"
SOURCE_DN = "CN=src.example,OU=migration,O=Example"


def write_creds(directory, ca, *, server=None, client=None) -> str:
    """``directory`` (made) with ca-cert.pem and the given leaf certificates' pairs."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "ca-cert.pem"), "wb") as out:
        out.write(ca.cert_pem.bytes())
    for role, leaf in (("server", server), ("client", client)):
        if leaf is None:
            continue
        with open(os.path.join(directory, f"{role}-cert.pem"), "wb") as out:
            out.write(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        with open(os.path.join(directory, f"{role}-key.pem"), "wb") as out:
            out.write(leaf.private_key_pem.bytes())
    return str(directory)


def server_cert(ca, *names, **dates):
    return ca.issue_cert(*(names or ("127.0.0.1", "::1", "localhost")),
                         common_name="dst.example", organization_name="Example", **dates)


def client_cert(ca, common_name=SOURCE_NAME, **dates):
    return ca.issue_cert(common_name, common_name=common_name, organization_name="Example",
                         organization_unit_name="migration", **dates)


def days(n: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=n)


class Pki:
    """A CA and directories of credentials signed by it, made on demand under ``root``."""

    def __init__(self, root):
        self.root = root
        self.ca = trustme.CA()
        self._made = 0

    def dir(self, *, server=True, client=True, ca=None, **leaves) -> str:
        """A credentials directory: by default both pairs from this CA; ``server=`` /
        ``client=`` a trustme LeafCert (or False for none); ``ca``: whose ca-cert.pem."""
        self._made += 1
        server = server_cert(self.ca) if server is True else (server or None)
        client = client_cert(self.ca) if client is True else (client or None)
        return write_creds(os.path.join(self.root, f"creds{self._made}"), ca or self.ca,
                           server=server, client=client)

    def creds(self, **kwargs) -> TlsCredentials:
        return TlsCredentials.load(self.dir(**kwargs))

    def store(self, directory: str) -> CredentialStore:
        store = CredentialStore()
        store.add("tls0", TlsCredentials.load(directory))
        return store


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path / "pki")
