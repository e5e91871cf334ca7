"""TLS over a socket channel (tcp, unix, or a socket passed as fd:), full duplex.

::

    migration stream / return path        (plaintext: pymig.stream, unchanged)
            │ send / sendv / recv_into
    TlsChannel ── SSLObject (OpenSSL) ── outgoing MemoryBIO ──► SocketChannel.sendv ──► socket
                                    ◄── incoming MemoryBIO ◄── SocketChannel.recv_available ◄─┘

Why memory BIOs.  The stream goes one way while the return path comes the other, each from
its own thread.  OpenSSL's ``SSL`` object is not safe for an ``SSL_read`` in one thread while
an ``SSL_write`` runs in another, and CPython's ``SSLSocket`` calls both on one object without
a lock, so a full-duplex ``SSLSocket`` shared by two threads can corrupt the session or crash.
Here the ``SSL`` object never touches the socket: every call into it (encrypt into the
outgoing BIO, decrypt from the incoming BIO) is CPU work under one lock that no thread holds
while it waits for the peer, and the socket I/O happens outside that lock on the plain
:class:`~pymig.transport.channel.SocketChannel`, which keeps its per-direction kernel
timeouts, receive deadlines, ``MSG_NOSIGNAL`` and send-queue figures.  A second lock keeps
the records of concurrent senders in the order they were encrypted.  (Linux kernel TLS would
make the socket itself full duplex and encrypt in the kernel; this machine's kernel is built
without it, and Python 3.11 has no ``OP_ENABLE_KTLS``.)

Speed: TLS 1.3 only, whose suites are AES-GCM (AES-NI and VAES where the CPU has them) or
ChaCha20-Poly1305, as OpenSSL orders them; records of the largest size TLS allows (16 KiB of
plaintext); a large buffer is encrypted in 256 KiB slices, each sent with one ``sendmsg``;
small buffers (record headers, footers, return-path messages) are gathered into one record.
OpenSSL's record layer copies each record's plaintext once on its way in and out; the memory
BIOs add one copy of the ciphertext on each side (docs/performance.md measures the whole).

The handshake is checked both ways before a byte of the migration goes: the source checks the
destination's certificate and name, the destination the source's certificate (unless its
credentials say ``verify-peer=off``) and, with ``tls-authz``, its identity; then the
destination sends its verdict as the session's first record (layout in
docs/stream-format.md, "TLS")::

    0        4         5          6            8
    +--------+---------+----------+------------+--------------------+
    | "PMTA" | verdict | reserved | reason_len | reason (UTF-8)     |
    |        | u8      | u8 = 0   | u16        | reason_len bytes   |
    +--------+---------+----------+------------+--------------------+
    verdict: 0 accepted (reason_len 0), 1 refused (the reason; at most 1024 bytes)

so a refused source learns why before it sends anything (TLS 1.3 ends the client's handshake
before the server has checked the client's certificate).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time

from pymig.errors import TlsError, TransportError
from pymig.transport.channel import Channel, SocketChannel
from pymig.transport.tlscreds import TlsCredentials, authorized, distinguished_name

#: Most plaintext one TLS record carries (RFC 8446, 5.1).
RECORD_PLAINTEXT_BYTES = 16384
#: Plaintext encrypted per hold of the SSL lock, and ciphertext gathered per send.
SEND_SLICE_BYTES = 256 << 10
#: Buffers smaller than this are gathered with their neighbours into shared records.
SMALL_BUFFER_BYTES = 4096
#: Most ciphertext taken from the socket at a time.
RECV_BUFFER_BYTES = 256 << 10
#: A whole TLS 1.3 record on the wire: header, plaintext, content type, AEAD tag.
MAX_RECORD_BYTES = 5 + RECORD_PLAINTEXT_BYTES + 1 + 256
#: How long the handshake, the verdict included, may take.
HANDSHAKE_TIMEOUT_S = 10.0

#: Bytes of what the peer sends first kept for telling what it speaks: a whole plaintext
#: LOAD_ERROR return-path message (8 + 4096 bytes) fits.
FIRST_BYTES_KEPT = 8 + 4096

VERDICT = struct.Struct("<4sBBH")  # magic, verdict, reserved, reason_len
VERDICT_MAGIC = b"PMTA"
ACCEPTED, REFUSED = 0, 1
MAX_REASON_BYTES = 1024

_ALERT_PREFIXES = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")
#: What a peer's alert means for this side, by OpenSSL's reason.
_ALERT_MEANING = {
    "unknown ca": "it does not trust the CA that signed this side's certificate",
    "certificate expired": "it finds this side's certificate expired (or not yet valid)",
    "certificate required": "it requires a certificate and this side sent none "
                            "(client-cert.pem)",
    "bad certificate": "it does not accept this side's certificate (its log says why: a name "
                       "that does not match, a date, a usage)",
    "certificate unknown": "it does not accept this side's certificate (its log says why)",
    "access denied": "it does not let this side's identity in",
    "decrypt error": "the handshake's signature did not verify (a key that does not match "
                     "its certificate?)",
    "protocol version": "it does not speak TLS 1.3",
    "handshake failure": "no common TLS parameters",
}
#: OpenSSL reasons that mean the bytes from the peer are not TLS at all.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST",
            "RECORD_LAYER_FAILURE", "UNEXPECTED_RECORD", "UNEXPECTED_MESSAGE",
            "RECORD_LENGTH_MISMATCH", "LENGTH_MISMATCH", "UNKNOWN_PROTOCOL"}


class PlaintextPeerError(TlsError):
    """The peer of a TLS destination sent a plaintext migration stream."""


def describe_ssl_error(exc: ssl.SSLError, peer: str) -> str:
    """What an OpenSSL error during a session with ``peer`` ("the source", "the destination")
    means, in the words an operator needs."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        hint = ""
        lowered = message.lower()
        if "mismatch" in lowered:
            hint = " (the name checked is tls-hostname, or else the migration URI's host)"
        elif "issuer" in lowered or "self-signed" in lowered or "self signed" in lowered:
            hint = " (it does not chain to this side's ca-cert.pem)"
        return f"{peer}'s certificate is not accepted here: {message}{hint}"
    reason = getattr(exc, "reason", None) or ""
    for prefix in _ALERT_PREFIXES:
        if reason.startswith(prefix):
            alert = reason[len(prefix):].lower().replace("_", " ")
            meaning = _ALERT_MEANING.get(alert, "")
            return (f"{peer} refused this side (TLS alert: {alert})"
                    + (f": {meaning}" if meaning else ""))
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return (f"{peer} sent no certificate, and this side requires one (verify-peer): give "
                f"it client-cert.pem and client-key.pem in its tls-creds")
    if reason in _NOT_TLS:
        return f"{peer} does not speak TLS ({reason.lower().replace('_', ' ')})"
    if isinstance(exc, ssl.SSLEOFError):
        return f"{peer} closed the connection in the middle of the TLS handshake"
    return f"TLS error with {peer}: {reason.lower().replace('_', ' ') or exc}"


class TlsChannel(Channel):
    """A TLS 1.3 session over a :class:`SocketChannel`: full duplex, with a return path.

    Made by :func:`connect` (the source) and :func:`accept` (the destination) once the
    handshake and the verdict are through.  ``peer_identity`` is the peer's certificate's
    subject (RFC 4514), None if it sent none; ``cipher`` and ``version`` what was agreed;
    ``handshake_s`` how long setting the session up took.
    """

    has_return_path = True

    def __init__(self, raw: SocketChannel, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, peer: str):
        super().__init__(raw.name)
        self.raw = raw
        self._ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self._peer = peer
        self._ssl_lock = threading.Lock()  # every call into the SSL object; never held to wait
        self._send_lock = threading.Lock()  # records reach the socket in the order encrypted
        self._recv_lock = threading.Lock()
        self._rbuf = memoryview(bytearray(RECV_BUFFER_BYTES))
        self._peeked = bytearray()  # plaintext wait_readable decrypted ahead of a receive
        self._ended = False  # the peer ended the session: every receive returns 0
        self.peer_identity: str | None = None
        self.handshake_s = 0.0

    @property
    def cipher(self) -> str:
        return self._ssl.cipher()[0]

    @property
    def version(self) -> str:
        return self._ssl.version()

    @property
    def sock(self):
        """The socket under the session (what the in-flight estimate asks the kernel about)."""
        return self.raw.sock

    def fileno(self) -> int:
        return self.raw.fileno()

    def unsent_bytes(self) -> int:
        return self.raw.unsent_bytes()

    # --- sending --------------------------------------------------------------------------
    def _send_all(self, view: memoryview) -> None:
        self._send_vector([view])

    def _send_vector(self, views: list[memoryview]) -> None:
        with self._send_lock:
            sealed: list[bytes] = []
            sealed_bytes = 0
            small = bytearray()

            def seal(plaintext) -> None:
                nonlocal sealed_bytes
                ciphertext = self._encrypt(plaintext)
                sealed.append(ciphertext)
                sealed_bytes += len(ciphertext)
                if sealed_bytes >= SEND_SLICE_BYTES:
                    flush()

            def flush() -> None:
                nonlocal sealed, sealed_bytes
                if sealed:
                    self.raw.sendv(sealed)
                    sealed, sealed_bytes = [], 0

            for view in views:
                if len(view) < SMALL_BUFFER_BYTES:
                    small += view
                    if len(small) >= RECORD_PLAINTEXT_BYTES:
                        seal(small)
                        small = bytearray()
                    continue
                if small:
                    seal(small)
                    small = bytearray()
                for offset in range(0, len(view), SEND_SLICE_BYTES):
                    seal(view[offset:offset + SEND_SLICE_BYTES])
            if small:
                seal(small)
            flush()

    def _encrypt(self, plaintext) -> bytes:
        with self._ssl_lock:
            try:
                self._ssl.write(plaintext)
            except ssl.SSLError as exc:
                raise self._error(exc) from None
            return self._out.read()

    # --- receiving ------------------------------------------------------------------------
    def _recv_some(self, view: memoryview) -> int:
        with self._recv_lock:
            if self._ended:
                return 0
            if self._peeked:
                n = min(len(view), len(self._peeked))
                view[:n] = self._peeked[:n]
                del self._peeked[:n]
                return n
            while True:
                got = self._decrypt_into(view)
                if got or self._ended:
                    return got
                # Ciphertext that cannot hold the rest of the view wakes this thread early for
                # nothing: wait for as much as it certainly holds (beyond what is buffered here
                # and at most one record OpenSSL keeps partly read).
                wanted = min(len(view) - self._in.pending - MAX_RECORD_BYTES,
                             RECV_BUFFER_BYTES)
                if wanted > 0:
                    n = self.raw._recv_some(self._rbuf[:wanted])
                else:
                    n = self.raw.recv_available(self._rbuf)
                if n <= 0:
                    return n  # end of stream, or a receive deadline's timer
                with self._ssl_lock:
                    self._in.write(self._rbuf[:n])

    def _decrypt_into(self, view: memoryview) -> int:
        """Decrypt what the buffered records hold into ``view``, record after record under
        one hold of the lock (OpenSSL returns one record per call); 0 if no whole record is
        buffered, or the peer ended the session (then :attr:`_ended` is set)."""
        got = 0
        size = len(view)
        read = self._ssl.read
        with self._ssl_lock:
            while got < size:
                try:
                    n = read(size - got, view[got:] if got else view)
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._ended = True  # the peer ended the session (close_notify or socket)
                    break
                except ssl.SSLError as exc:
                    if got:
                        break  # what came before the error first; the error next time
                    raise self._error(exc) from None
                if n == 0:  # CPython's word for the peer's close_notify
                    self._ended = True
                    break
                got += n
        return got

    def wait_readable(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._recv_lock:
            while True:
                if self._peeked:
                    return True
                with self._ssl_lock:
                    if self._ssl.pending():
                        return True
                    if self._in.pending:
                        # Bytes that may hold a whole record: only decrypting tells.
                        try:
                            self._peeked += self._ssl.read(RECORD_PLAINTEXT_BYTES)
                            return True
                        except ssl.SSLWantReadError:
                            pass
                        except ssl.SSLError:
                            return True  # a receive now returns at once (end, or the error)
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if not self.raw.wait_readable(left):
                    return False
                n = self.raw.recv_available(self._rbuf)
                if n == 0:
                    return True
                if n > 0:
                    with self._ssl_lock:
                        self._in.write(self._rbuf[:n])
                elif left == 0.0:
                    return False

    def _error(self, exc: ssl.SSLError) -> TlsError:
        return TlsError(f"TLS with {self.name}: {describe_ssl_error(exc, self._peer)}")

    # --- the carrier ----------------------------------------------------------------------
    def _apply_timeout(self, seconds: float | None) -> None:
        self.raw.settimeout(seconds)

    def _deadline_changed(self, when: float | None) -> None:
        self.raw.set_recv_deadline(when)

    def shutdown(self) -> None:
        self.raw.shutdown()

    def end_sending(self) -> None:
        # Records already sent stay readable: the peer reads them, then the socket's end.
        self.raw.end_sending()

    def _close(self) -> None:
        # close_notify, unless a send is under way (a thread blocked on a full socket is woken
        # by the shutdown instead): the peer sees the session end, not a cut connection.
        if self._send_lock.acquire(blocking=False):
            try:
                with self._ssl_lock:
                    try:
                        self._ssl.unwrap()
                    except (ssl.SSLError, ValueError):
                        pass
                    notify = self._out.read()
                if notify:
                    try:
                        self.raw.sock.send(notify, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                    except OSError:
                        pass
            finally:
                self._send_lock.release()
        self.raw.close()


# --- setting a session up ------------------------------------------------------------------------

def _handshake(raw: SocketChannel, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
               outgoing: ssl.MemoryBIO, deadline: float, first: bytearray) -> None:
    """Run the handshake to its end over ``raw``; ``first`` collects the first bytes the peer
    sent (what it speaks, when the handshake fails).  SSLError and TransportError pass."""
    buf = memoryview(bytearray(RECV_BUFFER_BYTES))
    raw.set_recv_deadline(deadline)
    try:
        while True:
            try:
                sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    raw.send(pending)
            except ssl.SSLError:
                # The alert that says why goes to the peer, so that it can tell its operator.
                alert = outgoing.read()
                if alert:
                    try:
                        raw.send(alert)
                    except TransportError:
                        pass
                raise
            n = raw.recv_available(buf)
            if n == 0:
                raise TlsError("the peer closed the connection during the TLS handshake")
            if n < 0:
                if time.monotonic() >= deadline:
                    raise TlsError(f"the TLS handshake did not finish within "
                                   f"{HANDSHAKE_TIMEOUT_S:g} s")
                continue
            if len(first) < FIRST_BYTES_KEPT:
                first += buf[:min(n, FIRST_BYTES_KEPT - len(first))]
            incoming.write(buf[:n])
        pending = outgoing.read()
        if pending:
            raw.send(pending)
    finally:
        raw.set_recv_deadline(None)


def connect(raw: SocketChannel, creds: TlsCredentials, hostname: str,
            timeout: float = HANDSHAKE_TIMEOUT_S) -> TlsChannel:
    """The source's end: a TLS session with the destination on ``raw``, its certificate
    checked against ``hostname`` (a name, or an IP literal checked against the certificate's
    IP addresses), and the destination's verdict on this source read.  Raises
    :class:`TlsError` saying who refused what; ``raw`` is closed then."""
    started = time.monotonic()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    first = bytearray()
    try:
        context = creds.for_role(server=False)
        sslobj = context.wrap_bio(incoming, outgoing, server_hostname=hostname.split("%")[0])
        raw.settimeout(timeout)
        _handshake(raw, sslobj, incoming, outgoing, started + timeout, first)
        channel = TlsChannel(raw, sslobj, incoming, outgoing, "the destination")
        _read_verdict(channel, started + timeout)
    except ssl.SSLError as exc:
        text = _plaintext_answer(_whole_answer(raw, first))
        raw.close()
        if text is not None:
            raise TlsError(f"TLS with {raw.name}: the destination does not speak TLS; it "
                           f"answered in plaintext: {text}") from None
        raise TlsError(f"TLS with {raw.name}: "
                       f"{describe_ssl_error(exc, 'the destination')}") from None
    except TransportError as exc:
        raw.close()
        if isinstance(exc, TlsError) and str(exc).startswith("TLS with"):
            raise
        raise TlsError(f"TLS with {raw.name}: {exc}") from None
    except BaseException:
        raw.close()
        raise
    channel.handshake_s = time.monotonic() - started
    return channel


def _read_verdict(channel: TlsChannel, deadline: float) -> None:
    head = bytearray(VERDICT.size)
    channel.set_recv_deadline(deadline)
    try:
        channel.recv_into(head)
        magic, verdict, reserved, length = VERDICT.unpack(head)
        if magic != VERDICT_MAGIC or reserved or verdict not in (ACCEPTED, REFUSED) \
                or length > MAX_REASON_BYTES or (verdict == ACCEPTED and length):
            raise TlsError(f"TLS with {channel.name}: the destination's first record is not "
                           f"pymig's TLS verdict ({bytes(head)!r})")
        reason = bytearray(length)
        if length:
            channel.recv_into(reason)
    finally:
        channel.set_recv_deadline(None)
    if verdict == REFUSED:
        raise TlsError(f"TLS with {channel.name}: the destination refused this source: "
                       f"{reason.decode('utf-8', 'replace')}")


def _whole_answer(raw: SocketChannel, first: bytearray) -> bytes:
    """``first``, and the rest of a plaintext return-path message it begins, if one is on the
    way (waiting a second at most)."""
    from pymig import stream

    if len(first) >= stream.RP_HEAD_BYTES:
        length = stream.RP_HEAD.unpack_from(first)[2]
        missing = stream.RP_HEAD_BYTES + min(length, stream.MAX_RETURN_PAYLOAD) - len(first)
        if missing > 0:
            rest = bytearray(missing)
            raw.set_recv_deadline(time.monotonic() + 1.0)
            try:
                raw.recv_into(rest)
                first += rest
            except TransportError:
                pass
            finally:
                raw.set_recv_deadline(None)
    return bytes(first)


def _plaintext_answer(data: bytes) -> str | None:
    """The text of a plaintext LOAD_ERROR return-path message at the start of ``data`` (a
    destination without TLS refusing a TLS source), or None."""
    from pymig import stream  # the return path's format; stream imports the transports

    if len(data) < stream.RP_HEAD_BYTES:
        return None
    rtype, reserved, length = stream.RP_HEAD.unpack_from(data)
    if rtype != stream.ReturnType.LOAD_ERROR or reserved or length > stream.MAX_RETURN_PAYLOAD:
        return None
    text = data[stream.RP_HEAD_BYTES:stream.RP_HEAD_BYTES + length].decode("utf-8", "replace")
    return text + ("..." if len(data) < stream.RP_HEAD_BYTES + length else "")


def accept(raw: SocketChannel, creds: TlsCredentials, authz: tuple[str, ...] = (),
           timeout: float = HANDSHAKE_TIMEOUT_S) -> TlsChannel:
    """The destination's end: a TLS session with the source on ``raw``, its certificate
    checked (verify-peer) and its identity held to ``authz`` (exact distinguished names or
    globs; empty: anyone the CA vouches for), and the verdict sent.  Raises
    :class:`TlsError` (:class:`PlaintextPeerError` for a source that sent a plaintext stream,
    with ``raw`` still open for the answer); ``raw`` is closed otherwise."""
    try:
        return _accept(raw, creds, authz, timeout)
    except PlaintextPeerError:
        raise
    except BaseException:
        raw.close()
        raise


def _accept(raw: SocketChannel, creds: TlsCredentials, authz: tuple[str, ...],
            timeout: float) -> TlsChannel:
    started = time.monotonic()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    first = bytearray()
    try:
        context = creds.for_role(server=True)
        sslobj = context.wrap_bio(incoming, outgoing, server_side=True)
        raw.settimeout(timeout)
        _handshake(raw, sslobj, incoming, outgoing, started + timeout, first)
        channel = TlsChannel(raw, sslobj, incoming, outgoing, "the source")
        cert = sslobj.getpeercert()
        identity = distinguished_name(cert["subject"]) if cert else None
        channel.peer_identity = identity
        if not authorized(identity, authz):
            who = identity if identity is not None else "(no certificate)"
            reason = f"its identity {who} is not in tls-authz ({'; '.join(authz)})"
            _send_verdict(channel, REFUSED, reason)
            raise TlsError(f"TLS with {raw.name}: refused the source: {reason}")
        _send_verdict(channel, ACCEPTED, "")
    except ssl.SSLError as exc:
        from pymig import stream

        if bytes(first).startswith(stream.MAGIC):
            raise PlaintextPeerError(
                f"TLS with {raw.name}: the source sent a plaintext migration stream, but this "
                f"destination accepts migrations over TLS only: set tls-creds on the source "
                f"(pymig run --tls-creds DIR, or migrate-set-parameters tls-creds)") from None
        raise TlsError(f"TLS with {raw.name}: {describe_ssl_error(exc, 'the source')}") from None
    except TransportError as exc:
        if isinstance(exc, TlsError) and str(exc).startswith("TLS with"):
            raise
        raise TlsError(f"TLS with {raw.name}: {exc}") from None
    channel.handshake_s = time.monotonic() - started
    return channel


def _send_verdict(channel: TlsChannel, verdict: int, reason: str) -> None:
    text = reason.encode("utf-8")[:MAX_REASON_BYTES]
    channel.send(VERDICT.pack(VERDICT_MAGIC, verdict, 0, len(text)) + text)
