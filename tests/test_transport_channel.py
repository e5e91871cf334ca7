"""Socket channels: exact transfers, scatter-gather, full duplex, timeouts, broken peers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from pymig import transport
from pymig.errors import TransportError, UriError
from pymig.stream import ReturnPathReader, ReturnPathWriter
from pymig.transport import PeerClosedError, SocketChannel

from _childenv import child_env
from _wire_helpers import SOCKET_KINDS, WAIT_S, Background, channel_pair

def _subprocess_env() -> dict:
    return child_env()


@pytest.mark.parametrize("kind", SOCKET_KINDS)
def test_send_and_receive_exact_bytes(kind, tmp_path):
    data = os.urandom(3 << 20)
    with channel_pair(kind, tmp_path) as (src, dst):
        assert src.has_return_path and dst.has_return_path
        sender = Background(lambda: (src.send(data[:1000]), src.send(memoryview(data)[1000:])))
        buf = bytearray(len(data) + 10)
        assert dst.recv_into(buf, len(data)) == len(data)
        sender.result()
        assert bytes(buf[:len(data)]) == data
        assert src.bytes_sent == dst.bytes_received == len(data)


@pytest.mark.parametrize("kind", ["socketpair", "tcp4"])
def test_sendv_keeps_order_across_many_and_empty_buffers(kind, tmp_path):
    # More buffers than one sendmsg takes (IOV_MAX), with empty ones among them.
    pieces = [os.urandom(i % 7) for i in range(2500)] + [os.urandom(2 << 20)]
    expected = b"".join(pieces)
    with channel_pair(kind, tmp_path) as (src, dst):
        sender = Background(src.sendv, pieces)
        got = dst.recv_exact(len(expected))
        sender.result()
    assert got == expected
    assert src.bytes_sent == len(expected)


def test_numpy_buffers_go_out_as_their_bytes(tmp_path):
    words = np.arange(100_000, dtype=np.uint64)
    with channel_pair("socketpair", tmp_path) as (src, dst):
        sender = Background(src.sendv, [words, words[:3]])
        back = np.zeros(100_003, dtype=np.uint64)
        dst.recv_into(back)
        sender.result()
        with pytest.raises(TypeError, match="C-contiguous"):
            src.send(words[::2])
    assert np.array_equal(back[:100_000], words) and list(back[100_000:]) == [0, 1, 2]


def test_recv_into_checks_its_arguments(tmp_path):
    with channel_pair("socketpair", tmp_path) as (src, dst):
        with pytest.raises(ValueError, match="cannot receive 9 bytes"):
            dst.recv_into(bytearray(8), 9)
        with pytest.raises(TypeError, match="writable"):
            dst.recv_into(b"12345678")


def test_peer_closing_mid_read_reports_how_much_came(tmp_path):
    with channel_pair("tcp4", tmp_path) as (src, dst):
        src.send(b"x" * 100)
        src.close()
        with pytest.raises(PeerClosedError, match="after 100 of 4096 bytes") as info:
            dst.recv_into(bytearray(4096))
        assert (info.value.received, info.value.expected) == (100, 4096)
        assert isinstance(info.value, TransportError)


def test_close_is_idempotent_and_wakes_a_blocked_receiver(tmp_path):
    with channel_pair("tcp4", tmp_path) as (src, dst):
        receiver = Background(dst.recv_exact, 10)
        threading.Event().wait(0.2)  # let it block in recv
        dst.close()
        dst.close()
        with pytest.raises(TransportError):
            receiver.result()
        assert dst.closed


def test_shutdown_wakes_a_blocked_sender(tmp_path):
    with channel_pair("unix", tmp_path) as (src, dst):
        sender = Background(src.send, bytes(64 << 20))  # far more than the socket buffers hold
        threading.Event().wait(0.2)
        src.shutdown()
        with pytest.raises(TransportError, match="sending to"):
            sender.result()


def test_receive_timeout(tmp_path):
    with channel_pair("tcp4", tmp_path) as (src, dst):
        assert not dst.wait_readable(0.05)
        dst.settimeout(0.2)
        assert dst.timeout == 0.2
        with pytest.raises(TransportError, match="timed out after 0.2 s"):
            dst.recv_exact(1)
        with pytest.raises(ValueError):
            dst.settimeout(0)


def test_full_duplex_send_while_receiving_with_a_timeout(tmp_path):
    """The source's return-path thread polls with short timeouts while the migration thread
    is blocked sending; neither disturbs the other."""
    total = 48 << 20
    with channel_pair("tcp4", tmp_path) as (src, dst):
        sender = Background(src.send, bytes(total))
        reader = ReturnPathReader(src)
        assert reader.recv(timeout=0.1) is None  # the send is blocked meanwhile: dst not reading
        writer = ReturnPathWriter(dst)
        writer.ping(1)
        buf = bytearray(1 << 20)
        received = 0
        pongs = []
        while received < total:
            received += dst.recv_into(buf, min(len(buf), total - received))
            if received == 8 << 20:
                writer.pong(2)
            message = reader.recv(timeout=0.001) if len(pongs) < 2 else None
            if message is not None:
                pongs.append(message)
        sender.result()
        while len(pongs) < 2:
            pongs.append(reader.recv(timeout=WAIT_S))
        assert [type(m).__name__ for m in pongs] == ["Ping", "Pong"]


def test_accept_timeout_and_refused_connection():
    with transport.listen("tcp:127.0.0.1:0") as listener:
        with pytest.raises(TransportError, match="timed out after 0.1 s"):
            listener.accept(timeout=0.1)
        port = listener.uri.port
    with pytest.raises(TransportError, match=rf"connecting to tcp:127.0.0.1:{port} failed: "
                                             r"ECONNREFUSED"):
        transport.connect(f"tcp:127.0.0.1:{port}", timeout=WAIT_S)
    with pytest.raises(TransportError, match="cannot resolve host"):
        transport.connect("tcp:no-such-host.invalid:4444", timeout=WAIT_S)


def test_a_numeric_address_connects_without_the_resolver(monkeypatch):
    """A process's first getaddrinfo() loads the resolver (milliseconds of a migration's setup
    time): addresses written in numbers go straight to connect(); names still resolve."""
    with transport.listen("tcp::0") as listener:
        port = listener.uri.port
        resolve = socket.getaddrinfo
        resolved: list[str] = []

        def watching(host, *args, **kwargs):
            resolved.append(host)
            return resolve(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", watching)
        for uri in (f"tcp:127.0.0.1:{port}", f"tcp:[::1]:{port}", f"tcp:localhost:{port}"):
            with transport.connect(uri, timeout=WAIT_S) as src:
                with listener.accept(WAIT_S) as dst:
                    src.send(b"hello")
                    assert dst.recv_exact(5) == b"hello"
        assert resolved == ["localhost"]


def test_listen_on_any_address_and_free_port():
    with transport.listen("tcp::0") as listener:
        assert listener.uri.host == "" and listener.uri.port > 0
        with transport.connect(f"tcp:127.0.0.1:{listener.uri.port}", timeout=WAIT_S) as src:
            with listener.accept(WAIT_S) as dst:
                src.send(b"v4 reaches a dual-stack listener")
                assert dst.recv_exact(32) == b"v4 reaches a dual-stack listener"


def test_unix_listener_owns_its_socket_file(tmp_path):
    path = tmp_path / "mig.sock"
    listener = transport.listen(f"unix:{path}")
    assert path.exists()
    with pytest.raises(TransportError, match="another process is listening"):
        transport.listen(f"unix:{path}")
    listener.close()
    listener.close()
    assert not path.exists()

    # A leftover socket file nobody listens on is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with transport.listen(f"unix:{path}") as listener:
        with transport.connect(listener.uri, timeout=WAIT_S):
            listener.accept(WAIT_S).close()
    assert not path.exists()

    path.write_text("not a socket")
    with pytest.raises(TransportError, match="exists and is not a socket"):
        transport.listen(f"unix:{path}")
    with pytest.raises(TransportError, match="ECONNREFUSED"):
        transport.connect(f"unix:{path}", timeout=WAIT_S)


def test_listener_on_a_port_in_use_says_so():
    with transport.listen("tcp:127.0.0.1:0") as first:
        with pytest.raises(TransportError, match="EADDRINUSE"):
            transport.listen(first.uri)


def test_connect_rejects_a_bad_uri_before_any_io():
    with pytest.raises(UriError):
        transport.connect("tcp:[::1", timeout=1)


_SENDER = textwrap.dedent("""
    import sys
    from pymig import transport
    ch = transport.connect(sys.argv[1], timeout=20)
    chunk = bytes(1 << 20)
    ch.send(b"started!")
    while True:
        ch.send(chunk)
""")


def test_sender_killed_mid_transfer_is_a_transport_error_for_the_receiver():
    with transport.listen("tcp:127.0.0.1:0") as listener:
        child = subprocess.Popen([sys.executable, "-c", _SENDER, str(listener.uri)],
                                 env=_subprocess_env())
        try:
            dst = listener.accept(WAIT_S)
            dst.settimeout(WAIT_S)  # a hang would fail the test instead of blocking it
            assert dst.recv_exact(8) == b"started!"
            dst.recv_into(bytearray(3 << 20))
            child.send_signal(signal.SIGKILL)
            child.wait(WAIT_S)
            buf = bytearray(1 << 20)
            with pytest.raises(TransportError):
                while True:  # drain what was in flight, then the end
                    dst.recv_into(buf)
        finally:
            child.kill()
            child.wait()
    dst.close()


_RECEIVER = textwrap.dedent("""
    import socket, sys
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    sock.recv(1000, socket.MSG_WAITALL)
    sock.close()
""")

_SIGPIPE_SENDER = textwrap.dedent("""
    import signal, sys
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # as in a C program: SIGPIPE kills
    from pymig import transport
    from pymig.errors import TransportError
    ch = transport.connect(sys.argv[1], timeout=20)
    try:
        while True:
            ch.send(bytes(1 << 20))
    except TransportError as exc:
        print("caught:", exc)
""")


def test_receiver_going_away_is_a_transport_error_for_the_sender():
    with transport.listen("tcp:127.0.0.1:0") as listener:
        child = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(listener.uri.port)])
        src = None
        try:
            src = listener.accept(WAIT_S)
            src.settimeout(WAIT_S)
            with pytest.raises(TransportError, match=r"sending to .* failed: (EPIPE|ECONNRESET)"):
                for _ in range(10_000):
                    src.send(bytes(1 << 20))
        finally:
            child.wait(WAIT_S)
            if src is not None:
                src.close()


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1:0", "unix"])
def test_broken_connection_never_raises_sigpipe(uri, tmp_path):
    if uri == "unix":
        uri = f"unix:{tmp_path}/s.sock"
    with transport.listen(uri) as listener:
        child = subprocess.Popen([sys.executable, "-c", _SIGPIPE_SENDER, str(listener.uri)],
                                 env=_subprocess_env(), stdout=subprocess.PIPE, text=True)
        dst = listener.accept(WAIT_S)
        dst.recv_exact(1 << 20)
        dst.close()
        out, _ = child.communicate(timeout=WAIT_S)
    assert child.returncode == 0, f"sender died with status {child.returncode}"
    assert "caught: sending to" in out and ("EPIPE" in out or "ECONNRESET" in out)


def test_socket_channel_from_a_plain_socket_is_full_duplex():
    a, b = socket.socketpair()
    src, dst = SocketChannel(a, "a"), SocketChannel(b, "b")
    try:
        src.send(b"ping")
        dst.send(b"pong")
        assert dst.recv_exact(4) == b"ping" and src.recv_exact(4) == b"pong"
    finally:
        src.close()
        dst.close()


def test_partial_vector_send_bookkeeping():
    """After a sendmsg that took only part (a timeout or signal), the rest is exactly what
    remains: whole views dropped, the cut one sliced, empty ones gone."""
    from pymig.transport.channel import _send_views, _skip_sent

    views = [memoryview(b"abc"), memoryview(b""), memoryview(b"defgh"), memoryview(b"ij")]
    for sent in range(11):
        rest = _skip_sent(views, sent)
        assert b"".join(bytes(v) for v in rest) == b"abcdefghij"[sent:]
        assert all(len(v) for v in rest)

    out = bytearray()

    def trickle(vs):  # a writer that takes at most 3 bytes per call
        taken = b"".join(bytes(v) for v in vs)[:3]
        out.extend(taken)
        return len(taken)

    _send_views(trickle, views)
    assert bytes(out) == b"abcdefghij"
