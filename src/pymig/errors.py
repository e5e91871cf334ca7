"""The exception tree.  Compiled code and its pure-Python twin raise the same classes.

    PymigError
    ├── StreamError        a malformed, truncated or unexpected migration stream (offset, reason)
    │   └── PacketError    a RAM packet that fails a check (offset inside the packet, reason)
    ├── KvmError           an ioctl failed (errno, ioctl name); also an OSError
    │   └── UnsupportedCapability  this host's KVM lacks a capability pymig needs
    ├── GuestError         the guest stopped in a way it cannot continue from (exit data)
    ├── TransportError     a URI that does not parse, a connection that fails or drops
    │   └── UriError       a bad URI (also a ValueError)
    ├── MigrationError     a migration that cannot start or did not complete
    │   └── SourceCancelled  the source gave the migration up and told the destination so
    ├── StateError         device state that does not load (entry, field, versions)
    ├── ControlError       a control socket that cannot be served, or reached with its token
    └── DiskError          a disk image that cannot be opened or used as asked
"""

from __future__ import annotations


class PymigError(Exception):
    """Base of every error pymig raises on purpose."""


class StreamError(PymigError):
    """The stream is not what the format allows.

    ``offset`` is the byte offset of the problem from the start of the unit being parsed (the
    stream for stream-level errors, the packet for :class:`PacketError`), ``reason`` says what
    is wrong in words a user can act on.
    """

    def __init__(self, offset: int, reason: str):
        self.offset = offset
        self.reason = reason
        super().__init__(f"at byte {offset}: {reason}")

    def __reduce__(self):
        return (type(self), (self.offset, self.reason))


class PacketError(StreamError):
    """A RAM packet failed a check; no byte outside its declared pages was written."""


class KvmError(PymigError, OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""

    def __init__(self, errno: int, ioctl: str, detail: str = ""):
        import os

        self.ioctl = ioctl
        text = f"{ioctl}: {os.strerror(errno)}" + (f" ({detail})" if detail else "")
        OSError.__init__(self, errno, text)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return (type(self), (self.errno, self.ioctl))


class UnsupportedCapability(KvmError):
    """KVM on this host lacks a capability pymig needs (errno EOPNOTSUPP)."""

    def __init__(self, cap_name: str, what: str = ""):
        import errno

        self.cap_name = cap_name
        detail = f"this host's KVM does not offer {cap_name}" + (f", needed for {what}" if what
                                                                 else "")
        super().__init__(errno.EOPNOTSUPP, "KVM_CHECK_EXTENSION", detail)

    def __reduce__(self):
        return (type(self), (self.cap_name,))


class GuestError(PymigError):
    """The guest stopped in a state it cannot continue from (triple fault, failed entry...)."""


class TransportError(PymigError):
    """A channel could not be opened, or broke while in use."""


class TlsError(TransportError):
    """TLS credentials that cannot be used, or a TLS session that could not be set up: the
    message says which side refused what, and why."""


class UriError(TransportError, ValueError):
    """A migration URI that pymig cannot use, with the reason."""


class MigrationError(PymigError):
    """A migration that cannot start or did not complete; the source guest keeps running."""


class SourceCancelled(MigrationError):
    """The source gave the migration up and said so (a CANCEL record, or a CANCEL message
    instead of COMMIT): a destination that reads this loads nothing more and starts nothing.

    ``reason`` is the source's (possibly empty), ``offset`` where in the stream it came (None:
    on the return path after the stream's end)."""

    def __init__(self, reason: str = "", offset: int | None = None):
        self.reason = reason
        self.offset = offset
        super().__init__("the source cancelled the migration" + (f": {reason}" if reason else ""))

    def __reduce__(self):
        return (type(self), (self.reason, self.offset))


class PostcopyPaused(MigrationError):
    """An incoming post-copy paused: the guest runs at the destination, its vCPUs that need a
    missing page waiting for the source to reconnect (``migrate-recover``).  Not a failure to
    give up on: this side holds the guest's newest pages."""


class StateError(PymigError):
    """Device state that does not save or load.

    ``entry`` is the state entry (idstr), ``field`` the field being handled (or None), and
    ``versions`` the (stream, minimum, current) versions involved when versions are the cause,
    ``value`` the value a stream carried that is out of its field's bounds (or None).
    """

    def __init__(self, message: str, entry: str | None = None, field: str | None = None,
                 versions: tuple[int, ...] | None = None, value: object = None):
        self.entry = entry
        self.field = field
        self.versions = versions
        self.value = value
        super().__init__(message)


class ControlError(PymigError):
    """The control socket cannot be served (its path is taken, its token file cannot be
    written) or a client cannot use it (no token to prove itself with)."""


class DiskError(PymigError):
    """A disk image that cannot be opened or used as asked (missing, empty, the wrong size for
    the guest that names it); the message names the file and the reason."""
