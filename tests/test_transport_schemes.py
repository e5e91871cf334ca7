"""exec:, fd: and file: carry a whole stream; their failures are reported, not hidden."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from _childenv import child_env

from pymig import transport
from pymig.errors import StreamError, TransportError
from pymig.stream import ReturnPathWriter, StreamReader, StreamWriter
from pymig.transport import FdChannel, SocketChannel

from _wire_helpers import WAIT_S, expected_records, read_stream, sample_stream, write_records



def read_all(channel) -> list[tuple]:
    return read_stream(StreamReader(channel))


def test_file_round_trip(tmp_path):
    uri = f"file:{tmp_path}/vm.state"
    with transport.connect(uri) as src:
        assert not src.has_return_path
        write_records(StreamWriter(src))
    assert (tmp_path / "vm.state").read_bytes() == sample_stream()
    with transport.listen(uri) as listener:
        with listener.accept() as dst:
            assert read_all(dst) == expected_records()
            with pytest.raises(TransportError, match="no return path"):
                ReturnPathWriter(dst)
        with pytest.raises(TransportError, match="already taken"):
            listener.accept()


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(TransportError, match=r"opening file:.*missing failed: ENOENT"):
        transport.listen(f"file:{tmp_path}/missing")
    with pytest.raises(TransportError, match=r"creating file:.* failed: ENOENT"):
        transport.connect(f"file:{tmp_path}/no/such/dir/vm.state")
    with transport.connect(f"file:{tmp_path}/out") as src:
        with pytest.raises(TransportError, match="open for writing only"):
            src.recv_exact(1)


def test_exec_round_trip_through_commands(tmp_path):
    path = tmp_path / "vm.state"
    with transport.connect(f"exec:cat > {path}") as src:
        assert not src.has_return_path
        write_records(StreamWriter(src))
    assert path.read_bytes() == sample_stream()
    with transport.listen(f"exec:cat {path}") as listener:
        with listener.accept() as dst:
            assert read_all(dst) == expected_records()


def test_exec_through_a_compressor_keeps_the_stream_intact(tmp_path):
    path = tmp_path / "vm.gz"
    with transport.connect(f"exec:gzip -1 > {path}") as src:
        write_records(StreamWriter(src))
    with transport.listen(f"exec:gzip -dc {path}") as listener:
        with listener.accept() as dst:
            assert read_all(dst) == expected_records()


def test_exec_command_failure_is_reported(tmp_path):
    # The destination's command fails: the stream ends at once, and closing says why.
    listener = transport.listen(f"exec:cat {tmp_path}/missing 2>/dev/null")
    dst = listener.accept()
    with pytest.raises(StreamError, match="stream truncated") as info:
        StreamReader(dst).read_header()
    assert "exited with status 1" in str(info.value.__cause__)
    with pytest.raises(TransportError, match="exited with status 1"):
        dst.close()
    dst.close()  # idempotent once reported

    # The source's command exits early: writing fails with EPIPE instead of killing us.
    src = transport.connect("exec:exit 3")
    with pytest.raises(TransportError, match=r"writing to exec:exit 3.*EPIPE"):
        for _ in range(64):
            src.send(bytes(1 << 20))
    with pytest.raises(TransportError, match="exited with status 3"):
        src.close()


def test_exec_shutdown_ends_the_command(tmp_path):
    src = transport.connect("exec:sleep 60")
    src.shutdown()
    with pytest.raises(TransportError, match="killed by SIGKILL"):
        src.close()


def test_fd_pipe_round_trip_through_a_child(tmp_path):
    """The source is a child process that inherited the write end of a pipe."""
    read_fd, write_fd = os.pipe()
    child_code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[2])
        from _wire_helpers import write_records
        from pymig import transport
        from pymig.stream import StreamWriter
        with transport.connect("fd:" + sys.argv[1]) as ch:
            write_records(StreamWriter(ch))
    """)
    env = child_env()
    child = subprocess.Popen([sys.executable, "-c", child_code, str(write_fd),
                              os.path.dirname(__file__)], pass_fds=[write_fd], env=env)
    os.close(write_fd)
    with transport.listen(f"fd:{read_fd}") as listener:
        with listener.accept() as dst:
            assert isinstance(dst, FdChannel)
            assert read_all(dst) == expected_records()
    assert child.wait(WAIT_S) == 0
    with pytest.raises(OSError):
        os.fstat(read_fd)  # the channel owned and closed it


def test_fd_socket_is_full_duplex_with_a_return_path(tmp_path):
    """The destination is a child that inherited one end of a socketpair: it reads the stream
    and acknowledges over the same descriptor."""
    ours, theirs = socket.socketpair()
    child_code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[2])
        from pymig import transport
        from pymig.stream import ReturnPathWriter, StreamReader
        with transport.listen("fd:" + sys.argv[1]) as listener:
            ch = listener.accept()
            reader = StreamReader(ch)
            reader.read_header()
            rp = ReturnPathWriter(ch)
            rp.ready()
            count = 0
            while reader.next_record().type.name != "EOF":
                reader.read_payload()
                count += 1
            rp.ack(vcpu_start_ns=count)
            ch.close()
    """)
    env = child_env()
    child = subprocess.Popen([sys.executable, "-c", child_code, str(theirs.fileno()),
                              os.path.dirname(__file__)], pass_fds=[theirs.fileno()], env=env)
    theirs.close()
    from pymig.stream import Ack, Ready, ReturnPathReader

    src = SocketChannel(ours, "socketpair")
    try:
        write_records(StreamWriter(src))
        rp = ReturnPathReader(src)
        assert rp.recv(timeout=WAIT_S) == Ready()
        ack = rp.recv(timeout=WAIT_S)
        assert isinstance(ack, Ack) and ack.vcpu_start_ns == len(expected_records()) - 1
    finally:
        src.close()
    assert child.wait(WAIT_S) == 0


def test_fd_direction_must_match(tmp_path):
    read_fd, write_fd = os.pipe()
    try:
        with pytest.raises(TransportError, match=f"descriptor {read_fd} is not open for writing"):
            transport.connect(f"fd:{read_fd}")
        with pytest.raises(TransportError, match=f"descriptor {write_fd} is not open for reading"):
            transport.listen(f"fd:{write_fd}")
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_pipe_read_timeout(tmp_path):
    read_fd, write_fd = os.pipe()
    try:
        with transport.listen(f"fd:{read_fd}") as listener:
            dst = listener.accept()
            dst.settimeout(0.1)
            with pytest.raises(TransportError, match="timed out after 0.1 s"):
                dst.recv_exact(1)
            os.write(write_fd, b"ok")
            assert dst.wait_readable(WAIT_S) and dst.recv_exact(2) == b"ok"
            dst.close()
    finally:
        os.close(write_fd)


def test_pipe_write_timeout_bounds_a_large_blocked_write():
    read_fd, write_fd = os.pipe()
    try:
        with transport.connect(f"fd:{write_fd}") as src:
            src.settimeout(0.2)
            with pytest.raises(TransportError, match="writing to .* timed out after 0.2 s"):
                src.send(bytes(8 << 20))  # nobody reads: far more than the pipe holds
    finally:
        os.close(read_fd)


def test_closed_channel_refuses_io(tmp_path):
    src = transport.connect(f"file:{tmp_path}/out")
    src.close()
    with pytest.raises(TransportError, match="is closed"):
        src.send(b"x")
    with pytest.raises(TransportError, match="is closed"):
        src.sendv([b"x"])
    assert not (tmp_path / "out").exists()  # no stream was written: no file either
    (tmp_path / "out").write_bytes(b"")
    dst = transport.listen(f"file:{tmp_path}/out").accept()
    dst.close()
    with pytest.raises(TransportError, match="is closed"):
        dst.recv_exact(1)
