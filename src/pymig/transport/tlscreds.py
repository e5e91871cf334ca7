"""TLS credentials in QEMU's ``tls-creds-x509`` directory layout, and who they let in.

A directory holds::

    ca-cert.pem        the CA (or CAs) a peer's certificate must chain to      always
    server-cert.pem    this host's certificate when it receives a migration    with server-key.pem
    server-key.pem     its private key
    client-cert.pem    this host's certificate when it sends a migration       with client-key.pem
    client-key.pem     its private key

as QEMU's ``-object tls-creds-x509,dir=DIR`` reads it, so an operator's set-up serves both.
A host that only sends needs the client pair, one that only receives the server pair; one that
does both (a guest migrated back and forth) needs both.  Everything is loaded and checked once,
when the credentials are loaded: a missing file, a certificate that does not parse, or a key
that does not match its certificate is refused then, before any connection.

Both ends speak TLS 1.3 only (AES-GCM with AES-NI where the CPU has it, as OpenSSL chooses;
one round trip; no renegotiation), and, as QEMU's ``verify-peer=on``, the receiving end asks
for the sender's certificate and refuses a sender without one.  ``verify-peer=off`` (QEMU's
name) lets a destination accept senders without certificates; the sender always checks the
receiver's certificate against the name it expects.

A peer's identity is its certificate's subject as an RFC 4514 distinguished name, most
specific part first, as GnuTLS (and so QEMU's ``authz`` objects) writes it:
``CN=src.example,O=Example,C=GB``.  ``tls-authz`` lists the identities a destination accepts,
each exact or a glob (``CN=*.example,O=Example,C=GB``).
"""

from __future__ import annotations

import fnmatch
import os
import ssl
from dataclasses import dataclass, field

from pymig.errors import TlsError

CA_FILE = "ca-cert.pem"
SERVER_PAIR = ("server-cert.pem", "server-key.pem")
CLIENT_PAIR = ("client-cert.pem", "client-key.pem")

#: RFC 4514's short names for the attributes of a subject (others keep Python's long name).
_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
    "emailAddress": "EMAIL",
}


def _escape_dn_value(value: str) -> str:
    """An attribute value as RFC 4514 writes it (section 2.4)."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (i == 0 and ch in "# ") or (i == len(value) - 1 and ch == " "):
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def distinguished_name(subject) -> str:
    """The RFC 4514 string of a subject as ``ssl.SSLSocket.getpeercert()`` gives it (a tuple
    of relative distinguished names, each a tuple of (attribute, value)): the last RDN first,
    as GnuTLS prints it."""
    parts = []
    for rdn in reversed(subject):
        parts.append("+".join(f"{_SHORT_NAMES.get(name, name)}={_escape_dn_value(value)}"
                              for name, value in rdn))
    return ",".join(parts)


def parse_authz(value) -> tuple[str, ...]:
    """``tls-authz`` as given (one identity, or a list of them; "" or []: anyone the CA
    vouches for) as a tuple of patterns; raises ValueError saying why it cannot be."""
    if isinstance(value, str):
        items = [value] if value else []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"tls-authz must be a distinguished name or a list of them, not "
                         f"{value!r}")
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"tls-authz: each identity is a non-empty distinguished name "
                             f"(exact or a glob), not {item!r}")
        if "=" not in item:
            raise ValueError(f"tls-authz: {item!r} is not a distinguished name "
                             f"(expected ATTRIBUTE=VALUE,..., e.g. CN=src.example,O=Example)")
    return tuple(items)


def authorized(identity: str | None, patterns: tuple[str, ...]) -> bool:
    """Whether a peer with ``identity`` (None: it sent no certificate) passes ``patterns``
    (empty: everyone the CA vouches for does)."""
    if not patterns:
        return True
    if identity is None:
        return False
    return any(fnmatch.fnmatchcase(identity, pattern) for pattern in patterns)


def _load_error(path: str, what: str, exc: BaseException) -> TlsError:
    detail = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return TlsError(f"TLS credentials {path}: {what}: {detail}")


@dataclass
class TlsCredentials:
    """One credentials directory, loaded and checked (:meth:`load`); ``server_context`` and
    ``client_context`` are ready for every connection (None: this directory has no such
    pair)."""

    directory: str
    verify_peer: bool = True
    server_context: ssl.SSLContext | None = field(default=None, repr=False)
    client_context: ssl.SSLContext | None = field(default=None, repr=False)

    @classmethod
    def load(cls, directory: str, *, verify_peer: bool = True) -> "TlsCredentials":
        """Load ``directory`` (QEMU's layout); raises :class:`TlsError` naming the file and
        what is wrong with it: missing, unreadable, not PEM, or a key that does not match
        its certificate."""
        directory = os.path.abspath(directory)
        if not os.path.isdir(directory):
            raise TlsError(f"TLS credentials {directory}: not a directory (expected QEMU's "
                           f"layout: {CA_FILE}, {SERVER_PAIR[0]}/{SERVER_PAIR[1]}, "
                           f"{CLIENT_PAIR[0]}/{CLIENT_PAIR[1]})")
        ca = os.path.join(directory, CA_FILE)
        if not os.path.isfile(ca):
            raise TlsError(f"TLS credentials {directory}: no {CA_FILE}: the CA that peers' "
                           f"certificates must chain to")
        creds = cls(directory, verify_peer)
        creds.server_context = creds._context(ca, SERVER_PAIR, server=True)
        creds.client_context = creds._context(ca, CLIENT_PAIR, server=False)
        if creds.server_context is None and creds.client_context is None:
            raise TlsError(f"TLS credentials {directory}: neither {SERVER_PAIR[0]} and "
                           f"{SERVER_PAIR[1]} (to receive a migration) nor {CLIENT_PAIR[0]} "
                           f"and {CLIENT_PAIR[1]} (to send one)")
        creds._rehearse()
        return creds

    def _rehearse(self) -> None:
        """A handshake in memory between this directory's two certificates, when it has both,
        so that a migration's handshake is not OpenSSL's first in this process (the first pays
        for its algorithm look-ups and caches: 3-8 ms here, against ~1 ms after).  The server
        side checks the client's certificate as a migration does; the client side skips the
        name check (it has no name to check here)."""
        if self.server_context is None or self.client_context is None:
            return
        client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_NONE
        client_context.minimum_version = ssl.TLSVersion.TLSv1_3
        client_context.load_cert_chain(*(os.path.join(self.directory, n) for n in CLIENT_PAIR))
        to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context.wrap_bio(to_client, to_server)
        server = self.server_context.wrap_bio(to_server, to_client, server_side=True)
        for _ in range(8):  # TLS 1.3 is done in two round trips; a failure ends it sooner
            for end in (client, server):
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return  # a rehearsal: whatever is wrong shows in the real handshake

    def _context(self, ca: str, pair: tuple[str, str], *, server: bool) -> ssl.SSLContext | None:
        cert, key = (os.path.join(self.directory, name) for name in pair)
        present = [os.path.exists(cert), os.path.exists(key)]
        if not any(present):
            return None
        if not all(present):
            missing = pair[present.index(False)]
            raise TlsError(f"TLS credentials {self.directory}: {missing} is missing "
                           f"({pair[0]} and {pair[1]} go together)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise _load_error(ca, "not a usable CA certificate", exc) from None
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
                raise TlsError(f"TLS credentials {self.directory}: {pair[1]} is not the key "
                               f"of {pair[0]} (they do not match)") from None
            raise _load_error(self.directory, f"{pair[0]} / {pair[1]} cannot be used",
                              exc) from None
        except OSError as exc:
            raise _load_error(self.directory, f"{pair[0]} / {pair[1]} cannot be read",
                              exc) from None
        if server:
            context.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
            context.num_tickets = 0  # one session per migration: nothing to resume
        return context

    def for_role(self, server: bool) -> ssl.SSLContext:
        """The context for receiving (``server``) or sending a migration; raises
        :class:`TlsError` if this directory has no certificate for that role."""
        context = self.server_context if server else self.client_context
        if context is None:
            pair = SERVER_PAIR if server else CLIENT_PAIR
            role = "receive a migration" if server else "send a migration"
            raise TlsError(f"TLS credentials {self.directory} have no {pair[0]} and {pair[1]}:"
                           f" this host needs them to {role} over TLS")
        return context


def parse_spec(text: str) -> tuple[str, bool]:
    """``DIR[,verify-peer=on|off]`` (the command line's ``--tls-creds``) as (directory,
    verify_peer); raises ValueError saying why it cannot be."""
    directory, *options = text.split(",")
    verify_peer = True
    for option in options:
        name, sep, value = option.partition("=")
        if name != "verify-peer" or value not in ("on", "off"):
            raise ValueError(f"--tls-creds {text!r}: unknown option {option!r} (expected "
                             f"DIR or DIR,verify-peer=on|off)")
        verify_peer = value == "on"
    if not directory:
        raise ValueError(f"--tls-creds {text!r}: no directory")
    return directory, verify_peer


class CredentialStore:
    """The credentials a process has loaded, by id (QEMU's ``-object tls-creds-x509,id=ID``):
    what the ``tls-creds`` parameter names.  Thread-safe enough: ids are only added."""

    def __init__(self) -> None:
        self._by_id: dict[str, TlsCredentials] = {}
        self._paths: set[str] = set()  # ids that are directories given as the parameter

    def add(self, ident: str, creds: TlsCredentials) -> None:
        self._by_id[ident] = creds

    def get(self, ident: str) -> TlsCredentials | None:
        return self._by_id.get(ident)

    def resolve(self, value: str, *, reload: bool = False) -> TlsCredentials:
        """What a ``tls-creds`` value names: loaded credentials' id, or else a directory,
        loaded now (``reload``: again, if it was before) and kept under its path; raises
        :class:`TlsError` saying why not."""
        creds = self._by_id.get(value)
        if creds is not None and not (reload and value in self._paths):
            return creds
        if not os.path.isdir(value):
            known = ", ".join(sorted(set(self._by_id) - self._paths)) or "none"
            raise TlsError(f"tls-creds {value!r} is neither the id of loaded credentials "
                           f"(loaded: {known}) nor a credentials directory")
        creds = TlsCredentials.load(value)
        self._by_id[value] = creds
        self._paths.add(value)
        return creds
