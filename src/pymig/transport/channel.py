"""Channels: a byte pipe between source and destination, whatever carries it.

A :class:`Channel` moves bytes with "all or an error" semantics in both
directions: :meth:`Channel.send` returns once every byte went out,
:meth:`Channel.recv_into` once exactly the bytes asked for arrived.  Every OS
error becomes a :class:`~pymig.errors.TransportError` whose message says what
was being done, to which address, and the errno name; a peer that closes in the
middle of a read is a :class:`PeerClosedError` carrying how many bytes had come.

Two carriers exist:

* :class:`SocketChannel` (tcp, unix, fd of a socket): full duplex, so one
  thread may send while another receives (the return path).  The socket stays
  in blocking mode so ``sendall``/``sendmsg``/``recv_into(MSG_WAITALL)`` each
  move a whole buffer in one GIL-free system call; timeouts are the kernel's
  per-direction ``SO_SNDTIMEO``/``SO_RCVTIMEO``, so a receive timeout set by
  the return-path thread never cuts short a send in the migration thread.
  Sends pass ``MSG_NOSIGNAL``: a vanished peer is an ``EPIPE`` error, never a
  SIGPIPE that kills the process.
* :class:`FdChannel` (exec, fd of a pipe or file, file): one direction only,
  no return path.  Optionally owns the child process of an ``exec:`` URI and
  reports its exit status.

A timeout bounds each wait for the peer, so a peer that sends a byte now and then
never trips it.  A receive deadline (:meth:`Channel.set_recv_deadline`) bounds the
whole of each receive instead: what is asked for must have arrived by then, however
the bytes trickle in, or :class:`DeadlineExceeded` is raised.  The destination sets
one per record (:class:`pymig.stream.StreamReader`).

Every send goes through the channel's :class:`RateLimiter`, so
:meth:`Channel.set_max_bandwidth` caps a migration while it runs.
"""

from __future__ import annotations

import abc
import errno
import fcntl
import math
import os
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterable

from pymig.errors import TransportError
from pymig.transport.ratelimit import RateLimiter

#: Largest number of buffers handed to one sendmsg/writev (Linux IOV_MAX).
IOV_MAX = 1024
#: An unlimited send is still cut into pieces this large, so that a bandwidth
#: limit set while a huge buffer is going out applies to the rest of it.
UNLIMITED_CHUNK_BYTES = 16 << 20
#: How long closing an exec: channel waits for its command to finish.
EXEC_EXIT_WAIT_S = 30.0
#: How late past a receive deadline a receive may give up: the socket's timer is set again
#: only when it would overshoot the deadline by more, so that a healthy stream, whose
#: records arrive in microseconds, costs no system call for it.
DEADLINE_SLACK_S = 0.1
#: What a receive returns when the timer set for a deadline woke it with nothing new.
_WOKEN = -1


class PeerClosedError(TransportError):
    """The peer closed the channel before all requested bytes arrived.

    ``received`` of ``expected`` bytes of the read had arrived (0 means the
    channel ended exactly at the start of the read).
    """

    def __init__(self, where: str, received: int, expected: int, detail: str = ""):
        self.where = where
        self.received = received
        self.expected = expected
        super().__init__(f"{where} closed the connection after {received} of {expected} bytes"
                         + (f" ({detail})" if detail else ""))


class DeadlineExceeded(TransportError):
    """What was asked of the peer did not arrive by the receive deadline
    (:meth:`Channel.set_recv_deadline`); ``received`` of ``expected`` bytes had come."""

    def __init__(self, where: str, received: int, expected: int):
        self.where = where
        self.received = received
        self.expected = expected
        super().__init__(f"{where}: {received} of {expected} bytes arrived before the receive "
                         f"deadline")


def _timed_out(exc: OSError) -> bool:
    return isinstance(exc, TimeoutError) or exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)


def errno_name(code: int | None) -> str:
    """``ECONNRESET`` for 104, and so on; the number itself if it has no name."""
    if code is None:
        return "error"
    return errno.errorcode.get(code, f"errno {code}")


def transport_error(action: str, exc: OSError, timeout: float | None = None) -> TransportError:
    """Wrap an OS error as a :class:`TransportError` naming the action and the errno.

    ``action`` reads like "sending to tcp:10.0.0.2:4444".  ``EAGAIN`` on a
    blocking descriptor only ever comes from an expired socket timeout, so it
    is reported as a timeout.
    """
    if _timed_out(exc):
        after = f" after {timeout:g} s" if timeout else ""
        return TransportError(f"{action} timed out{after}")
    return TransportError(f"{action} failed: {errno_name(exc.errno)} ({exc.strerror or exc})")


def byte_view(buf) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer (bytes, mmap, numpy...), no copy."""
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if view.ndim != 1 or view.format != "B":
        try:
            view = view.cast("B")
        except TypeError as exc:
            raise TypeError(f"channel buffers must be C-contiguous: {exc}") from None
    return view


def _skip_sent(views: list[memoryview], sent: int) -> list[memoryview]:
    """What remains of ``views`` once their first ``sent`` bytes went out."""
    rest = []
    for view in views:
        if sent >= len(view):
            sent -= len(view)
        else:
            rest.append(view[sent:] if sent else view)
            sent = 0
    return rest


def _send_views(write: Callable[[list[memoryview]], int], views: list[memoryview]) -> None:
    """Call ``write`` (sendmsg/writev: returns bytes taken) until every view is sent."""
    views = [v for v in views if len(v)]
    i = 0
    while i < len(views):
        n = write(views[i:i + IOV_MAX])
        while n:
            length = len(views[i])
            if n >= length:
                n -= length
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


def _poll(fd: int, events: int, timeout: float | None) -> bool:
    """Wait until ``fd`` has ``events`` (or an error/hang-up); False on timeout."""
    poller = select.poll()
    poller.register(fd, events)
    ms = None if timeout is None else max(0, int(timeout * 1000))
    while True:
        try:
            return bool(poller.poll(ms))
        except InterruptedError:  # pragma: no cover - PEP 475 retries poll itself
            continue


class Closable(abc.ABC):
    """``close()`` runs the subclass's ``_close()`` once, however often it is called;
    ``with`` closes on the way out."""

    _closed = False

    def close(self) -> None:
        """Release the object; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._close()

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the underlying resource; called once, by :meth:`close`."""

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Channel(Closable):
    """A byte pipe to the peer; see the module docstring for the guarantees.

    Subclasses implement ``_send_all``, ``_send_vector``, ``_recv_some``,
    ``_apply_timeout``, :meth:`wait_readable`, :meth:`shutdown` and ``_close``;
    :meth:`close` is idempotent and a channel is a context manager.
    """

    #: True when the peer can send back on this channel (full-duplex sockets).
    has_return_path: bool = False

    def __init__(self, name: str):
        self.name = name
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rate_limiter = RateLimiter(0)
        self._timeout: float | None = None
        self._recv_deadline: float | None = None

    # --- configuration -------------------------------------------------------------------
    def settimeout(self, seconds: float | None) -> None:
        """Bound every wait for the peer to ``seconds`` (None: wait forever).

        A send or receive that makes no progress for that long raises
        :class:`TransportError`; the channel is unusable afterwards, since the
        peer may have seen part of the data.
        """
        if seconds is not None and not seconds > 0:
            raise ValueError(f"a timeout must be positive or None, got {seconds!r}")
        self._timeout = seconds
        self._apply_timeout(seconds)

    @property
    def timeout(self) -> float | None:
        return self._timeout

    def set_recv_deadline(self, when: float | None) -> None:
        """Make every receive from now on complete by ``when`` (a ``time.monotonic()``
        instant), or raise :class:`DeadlineExceeded`; None: no deadline.

        Unlike :meth:`settimeout`, which bounds each wait, this bounds the whole of each
        receive, so a peer cannot stretch one by sending a byte now and then.  While a
        deadline is set it alone ends receives that wait (the timeout still bounds sends).
        """
        self._recv_deadline = when
        self._deadline_changed(when)

    def set_max_bandwidth(self, bytes_per_s: int) -> None:
        """Cap sending to ``bytes_per_s`` (0 = unlimited); applies to sends in progress."""
        self.rate_limiter.set_rate(bytes_per_s)

    @property
    def max_bandwidth(self) -> int:
        return self.rate_limiter.rate

    def unsent_bytes(self) -> int:
        """Bytes handed to the kernel that have not left this side yet (0 when unknown)."""
        return 0

    # --- sending --------------------------------------------------------------------------
    def _check_open(self) -> None:
        # A closed descriptor's number may already belong to another file: never touch it.
        if self._closed:
            raise TransportError(f"{self.name} is closed")

    def send(self, buf) -> None:
        """Send every byte of ``buf`` (any C-contiguous buffer), honouring the rate limit."""
        self._check_open()
        view = byte_view(buf)
        size = len(view)
        limiter = self.rate_limiter
        if limiter.rate == 0 and size <= UNLIMITED_CHUNK_BYTES:
            self._send_all(view)
            self.bytes_sent += size
            return
        offset = 0
        while offset < size:
            chunk = limiter.burst_bytes if limiter.rate else UNLIMITED_CHUNK_BYTES
            piece = view[offset:offset + chunk]
            limiter.acquire(len(piece))
            self._send_all(piece)
            self.bytes_sent += len(piece)
            offset += len(piece)

    def sendv(self, buffers: Iterable) -> None:
        """Send several buffers back to back without joining them (scatter-gather)."""
        self._check_open()
        views = [byte_view(b) for b in buffers]
        total = sum(map(len, views))
        limiter = self.rate_limiter
        if limiter.rate and total > limiter.burst_bytes:
            # Too big for one bucket charge: pace it piece by piece instead.
            for view in views:
                self.send(view)
            return
        limiter.acquire(total)
        self._send_vector(views)
        self.bytes_sent += total

    # --- receiving ------------------------------------------------------------------------
    def recv_into(self, buf, nbytes: int | None = None) -> int:
        """Fill the first ``nbytes`` (default: all) of ``buf``; returns ``nbytes``.

        Raises :class:`PeerClosedError` if the peer closes first.
        """
        self._check_open()
        view = byte_view(buf)
        if view.readonly:
            raise TypeError("recv_into needs a writable buffer")
        if nbytes is None:
            nbytes = len(view)
        elif not 0 <= nbytes <= len(view):
            raise ValueError(f"cannot receive {nbytes} bytes into a buffer of {len(view)}")
        if nbytes < len(view):
            view = view[:nbytes]
        got = 0
        while got < nbytes:
            n = self._recv_some(view[got:] if got else view)
            if n == 0:
                raise PeerClosedError(self.name, got, nbytes, self._closed_detail())
            if n > 0:
                got += n
                self.bytes_received += n
            deadline = self._recv_deadline
            if deadline is not None and got < nbytes and time.monotonic() >= deadline:
                raise DeadlineExceeded(self.name, got, nbytes)
        return nbytes

    def recv_exact(self, nbytes: int) -> bytes:
        """Receive exactly ``nbytes`` and return them as bytes (for small messages)."""
        buf = bytearray(nbytes)
        self.recv_into(buf)
        return bytes(buf)

    @abc.abstractmethod
    def wait_readable(self, timeout: float | None) -> bool:
        """True once a receive would not block (data, end of stream or error)."""

    # --- life cycle ---------------------------------------------------------------------------
    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the channel in both directions, waking any thread blocked on it."""

    def end_sending(self) -> None:
        """Say that nothing more will be sent (the peer reads the end of the stream after
        what was sent), keeping the other direction open.  A channel that cannot half-close
        does nothing: its close ends the stream."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """The descriptor the channel reads or writes (for poll/select)."""

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.name} {state}>"

    # --- for subclasses ---------------------------------------------------------------------
    @abc.abstractmethod
    def _send_all(self, view: memoryview) -> None:
        """Send every byte of a flat byte view, or raise TransportError."""

    @abc.abstractmethod
    def _send_vector(self, views: list[memoryview]) -> None:
        """Send the views back to back without joining them, or raise TransportError."""

    @abc.abstractmethod
    def _recv_some(self, view: memoryview) -> int:
        """Receive into ``view``; returns how many bytes came, 0 at end of stream.  With a
        receive deadline set, it waits no later than the deadline (give or take
        :data:`DEADLINE_SLACK_S`) and may return a negative number when it woke with
        nothing; the caller decides whether the deadline has passed."""

    @abc.abstractmethod
    def _apply_timeout(self, seconds: float | None) -> None:
        """Make each later wait for the peer give up after ``seconds`` (None: never)."""

    def _deadline_changed(self, when: float | None) -> None:
        """A receive deadline was set or cleared (a hook for the carrier's timers)."""

    def _closed_detail(self) -> str:
        """Extra words for a premature end of stream (e.g. a command's exit status)."""
        return ""


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval`` for SO_SNDTIMEO/SO_RCVTIMEO; all-zero means "no timeout"."""
    if seconds is None:
        return struct.pack("@ll", 0, 0)
    whole = int(seconds)
    micros = int(round((seconds - whole) * 1e6))
    if whole == 0 and micros == 0:
        micros = 1  # a zero timeval would mean "forever"
    return struct.pack("@ll", whole, micros)


class SocketChannel(Channel):
    """A connected stream socket (TCP or AF_UNIX): full duplex, with a return path."""

    has_return_path = True

    def __init__(self, sock: socket.socket, name: str):
        super().__init__(name)
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Records are written whole with sendmsg, so Nagle only delays the
            # small ones: return-path acks and the last record before switchover.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._fd = sock.fileno()
        # what SO_RCVTIMEO holds now (None: no timeout; inf: unknown, set it before relying
        # on it)
        self._rcvtimeo: float | None = None

    def fileno(self) -> int:
        return self._fd

    def unsent_bytes(self) -> int:
        if self._closed:
            return 0  # a closed descriptor's number may belong to another file by now
        try:
            return max(struct.unpack("i", fcntl.ioctl(self._fd, termios.TIOCOUTQ,
                                                      b"\0\0\0\0"))[0], 0)
        except OSError:
            return 0

    def _send_all(self, view: memoryview) -> None:
        try:
            self.sock.sendall(view, socket.MSG_NOSIGNAL)
        except OSError as exc:
            raise transport_error(f"sending to {self.name}", exc, self._timeout) from exc

    def _send_vector(self, views: list[memoryview]) -> None:
        sendmsg = self.sock.sendmsg
        try:
            if len(views) <= IOV_MAX:
                # A blocking sendmsg normally takes everything in one call.
                sent = sendmsg(views, (), socket.MSG_NOSIGNAL)
                if sent == sum(map(len, views)):
                    return
                views = _skip_sent(views, sent)
            _send_views(lambda vs: sendmsg(vs, (), socket.MSG_NOSIGNAL), views)
        except OSError as exc:
            raise transport_error(f"sending to {self.name}", exc, self._timeout) from exc

    def _recv_some(self, view: memoryview, flags: int = socket.MSG_WAITALL) -> int:
        deadline = self._recv_deadline
        if deadline is not None:
            # SO_RCVTIMEO bounds the whole of one blocking receive (MSG_WAITALL included),
            # so a timer no longer than what is left of the deadline ends it in time.
            left = max(deadline - time.monotonic(), 1e-6)
            if self._rcvtimeo is None or self._rcvtimeo > left + DEADLINE_SLACK_S:
                self._set_rcvtimeo(left)
        try:
            # MSG_WAITALL: the kernel fills the whole view before waking us,
            # one wake-up per buffer instead of one per segment.
            return self.sock.recv_into(view, len(view), flags)
        except OSError as exc:
            if deadline is not None and _timed_out(exc):
                # A timer set for an earlier deadline may have woken it early: the next
                # receive sets one for this deadline.
                self._rcvtimeo = math.inf
                return _WOKEN
            raise transport_error(f"receiving from {self.name}", exc, self._timeout) from exc

    def recv_available(self, view: memoryview) -> int:
        """Receive what has arrived, up to ``len(view)`` bytes, waiting only for the first
        (a layer above that frames the bytes itself, such as TLS records); 0 at end of stream,
        negative when a receive deadline's timer woke it with nothing."""
        self._check_open()
        return self._recv_some(view, 0)

    def _apply_timeout(self, seconds: float | None) -> None:
        tv = _timeval(seconds)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        except OSError as exc:
            raise transport_error(f"setting a timeout on {self.name}", exc) from exc
        if self._recv_deadline is None:
            self._set_rcvtimeo(seconds)

    def _deadline_changed(self, when: float | None) -> None:
        if when is None and self._rcvtimeo != self._timeout:
            self._set_rcvtimeo(self._timeout)  # back to bounding each wait

    def _set_rcvtimeo(self, seconds: float | None) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        except OSError as exc:
            raise transport_error(f"setting a timeout on {self.name}", exc) from exc
        self._rcvtimeo = seconds

    def wait_readable(self, timeout: float | None) -> bool:
        return _poll(self._fd, select.POLLIN, timeout)

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected (any more): nothing to wake

    def end_sending(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _close(self) -> None:
        # Shut down first: a thread blocked in recv on this socket wakes up with
        # end-of-stream instead of sleeping on a closed descriptor.
        self.shutdown()
        self.sock.close()


def _enlarge_pipe(fd: int) -> None:
    """Grow a pipe to 1 MiB (the default pipe-max-size) so big writes take fewer wake-ups."""
    try:
        import fcntl

        if hasattr(fcntl, "F_SETPIPE_SZ"):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass  # not a pipe, or the limit is lower here: the default size still works


class FdChannel(Channel):
    """One direction over a pipe or file descriptor (``exec:``, ``fd:``, ``file:``).

    Owns ``fd`` and closes it.  With ``process`` (the ``sh -c`` child of an
    ``exec:`` URI), :meth:`close` waits for the command and raises
    :class:`TransportError` if it failed.

    With ``tap`` (a :class:`~pymig.transport.tap.StreamTap`), the channel follows the
    migration stream it writes and calls :meth:`_stream_ended` right after the EOF record
    went out, inside that write: what fails there fails the migration while the source can
    still resume its guest.  A writing command's channel then ends its input and waits for
    it, so that a command that fails (a full disk under ``gzip > FILE``, an ssh that drops)
    is reported as a failed migration rather than after the source gave its guest away.
    """

    has_return_path = False

    def __init__(self, fd: int, name: str, *, writable: bool,
                 process: subprocess.Popen | None = None, tap=None):
        super().__init__(name)
        self._fd = fd
        self._fd_open = True
        self._writable = writable
        self.process = process
        self.tap = tap
        self._command_done = False
        self._blocking: bool | None = None  # as set by this channel (None: as it came)
        _enlarge_pipe(fd)

    def fileno(self) -> int:
        return self._fd

    def _check_direction(self, want_write: bool) -> None:
        if want_write != self._writable:
            mode = "writing" if self._writable else "reading"
            raise TransportError(f"{self.name} is open for {mode} only")

    def _wait(self, events: int, action: str) -> None:
        if not _poll(self._fd, events, self._timeout):
            raise TransportError(f"{action} timed out after {self._timeout:g} s")

    def _wait_readable_until(self, deadline: float) -> bool:
        """Wait for data until ``deadline``; False if it passed first."""
        return _poll(self._fd, select.POLLIN, max(deadline - time.monotonic(), 0.0))

    def _send_all(self, view: memoryview) -> None:
        self._send_vector([view])

    def _send_vector(self, views: list[memoryview]) -> None:
        self._check_direction(True)
        if not self._fd_open:
            raise TransportError(f"{self.name}: the stream has ended; nothing more can be sent")
        action = f"writing to {self.name}"

        def writev(vs: list[memoryview]) -> int:
            while True:
                try:
                    return os.writev(self._fd, vs)
                except BlockingIOError:  # only with a timeout: the fd is non-blocking then
                    self._wait(select.POLLOUT, action)

        try:
            _send_views(writev, views)
        except OSError as exc:
            detail = self._closed_detail()
            raise transport_error(action + (f" ({detail})" if detail else ""), exc) from exc
        tap = self.tap
        if tap is not None and tap.following:
            tap.feed(views)
            if tap.ended:
                self._stream_ended()

    def _stream_ended(self) -> None:
        """The EOF record has just been written (needs a ``tap``)."""
        if self.process is not None and self._writable:
            self._release_fd()  # the command reads the end of its input
            self._finish_command()

    def _recv_some(self, view: memoryview) -> int:
        self._check_direction(False)
        action = f"reading from {self.name}"
        try:
            while True:
                try:
                    return os.readv(self._fd, [view])
                except BlockingIOError:
                    deadline = self._recv_deadline
                    if deadline is None:
                        self._wait(select.POLLIN, action)
                    elif not self._wait_readable_until(deadline):
                        return _WOKEN
        except OSError as exc:
            raise transport_error(action, exc) from exc

    def _apply_timeout(self, seconds: float | None) -> None:
        # With a timeout (or a receive deadline) the descriptor turns non-blocking, so
        # that a large write into a pipe nobody drains comes back (EAGAIN) to wait in
        # poll() instead of blocking for good inside the kernel, and a read waits in a
        # poll() that ends at the deadline.  Regular files ignore this.
        self._set_blocking(seconds is None and self._recv_deadline is None)

    def _deadline_changed(self, when: float | None) -> None:
        self._set_blocking(when is None and self._timeout is None)

    def _set_blocking(self, blocking: bool) -> None:
        # a receive deadline is set per record: the mode changes far less often than that
        if not self._fd_open or blocking == self._blocking:
            return
        try:
            os.set_blocking(self._fd, blocking)
        except OSError as exc:
            raise transport_error(f"setting a timeout on {self.name}", exc) from exc
        self._blocking = blocking

    def wait_readable(self, timeout: float | None) -> bool:
        self._check_direction(False)
        return _poll(self._fd, select.POLLIN, timeout)

    def shutdown(self) -> None:
        # A pipe has no shutdown(); ending the command at the other end gives a
        # blocked reader end-of-stream and a blocked writer EPIPE.
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def _release_fd(self) -> None:
        if self._fd_open:
            self._fd_open = False
            os.close(self._fd)

    def _close(self) -> None:
        self._release_fd()
        if self.process is not None and not self._command_done:
            self._finish_command()

    def _finish_command(self) -> None:
        """Wait for the command; raise if it failed (once: its status is reported once)."""
        self._command_done = True
        try:
            status = self.process.wait(EXEC_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise TransportError(f"{self.name}: the command did not exit within "
                                 f"{EXEC_EXIT_WAIT_S:g} s of the end of the stream; killed it")
        # A reader that stops early makes a still-writing command die of SIGPIPE;
        # that is the reader's doing, not the command failing.
        if status and not (not self._writable and status == -signal.SIGPIPE):
            raise TransportError(f"{self.name}: the command {_describe_status(status)}")

    def _closed_detail(self) -> str:
        if self.process is None:
            return ""
        try:
            # The command usually exits right after closing its end; a short
            # wait lets the error say how it ended.
            status = self.process.wait(0.2)
        except subprocess.TimeoutExpired:
            return ""
        return f"the command {_describe_status(status)}"


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"
