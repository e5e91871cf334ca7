"""The parsed form of a migration URI, shared by every scheme module.

Each scheme module (``tcp``, ``unix``, ``exec``, ``fd``, ``file``) turns the
text after ``SCHEME:`` into a :class:`Uri`; :func:`pymig.transport.parse_uri`
picks the module by scheme.  ``str(uri)`` gives the canonical text back, which
parses to an equal :class:`Uri`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymig.errors import UriError


@dataclass(frozen=True)
class Uri:
    """One migration address.  Only the fields its scheme uses are set.

    ``tcp``: ``host`` (no brackets; "" = every local address, listen only) and
    ``port`` (0 = any free port, listen only); ``unix`` and ``file``: ``path``;
    ``exec``: ``command`` (run with ``sh -c``); ``fd``: ``fd``.
    """

    scheme: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    command: str | None = None
    fd: int | None = None

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        if self.scheme == "exec":
            return f"exec:{self.command}"
        if self.scheme == "fd":
            return f"fd:{self.fd}"
        return f"{self.scheme}:{self.path}"


def uri_error(text: str, reason: str) -> UriError:
    """A :class:`UriError` that quotes the URI the user gave and says what is wrong."""
    return UriError(f"bad migration URI {text!r}: {reason}")
