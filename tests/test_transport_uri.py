"""Migration URI parsing: every scheme's good forms, and a clear reason for each bad one."""

from __future__ import annotations

import os

import pytest

from pymig.errors import TransportError, UriError
from pymig.transport import Uri, connect, parse_uri


@pytest.mark.parametrize("text, expected", [
    ("tcp:127.0.0.1:4444", Uri("tcp", host="127.0.0.1", port=4444)),
    ("tcp:localhost:0", Uri("tcp", host="localhost", port=0)),
    ("tcp:migration-host.example:65535", Uri("tcp", host="migration-host.example", port=65535)),
    ("tcp:[::1]:4444", Uri("tcp", host="::1", port=4444)),
    ("tcp:[fe80::1%eth0]:1", Uri("tcp", host="fe80::1%eth0", port=1)),
    ("tcp::4444", Uri("tcp", host="", port=4444)),
    ("unix:/run/pymig/mig.sock", Uri("unix", path="/run/pymig/mig.sock")),
    ("unix:relative.sock", Uri("unix", path="relative.sock")),
    ("exec:gzip -c > /tmp/vm.gz", Uri("exec", command="gzip -c > /tmp/vm.gz")),
    ("exec:cat a:b", Uri("exec", command="cat a:b")),
    ("file:/var/lib/vm.state", Uri("file", path="/var/lib/vm.state")),
])
def test_good_uris_parse_and_print_back(text, expected):
    uri = parse_uri(text)
    assert uri == expected
    assert str(uri) == text
    assert parse_uri(str(uri)) == uri


def test_fd_uri_needs_an_open_descriptor():
    read_fd, write_fd = os.pipe()
    try:
        assert parse_uri(f"fd:{write_fd}") == Uri("fd", fd=write_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    with pytest.raises(UriError, match=f"descriptor {write_fd} is not open"):
        parse_uri(f"fd:{write_fd}")


@pytest.mark.parametrize("text, reason", [
    ("", "no scheme"),
    ("127.0.0.1", "no scheme"),
    ("udp:127.0.0.1:4444", "unknown scheme 'udp'"),
    ("TCP:127.0.0.1:4444", "unknown scheme 'TCP'"),
    ("tcp:127.0.0.1", "missing port"),
    ("tcp:127.0.0.1:", "missing port"),
    ("tcp:", "missing port"),
    ("tcp:127.0.0.1:http", "port 'http' is not a number"),
    ("tcp:127.0.0.1:-1", "port '-1' is not a number"),
    ("tcp:127.0.0.1:65536", "port 65536 is out of range"),
    ("tcp:127.0.0.1:99999999999", "out of range"),
    ("tcp:::1:4444", "must be written in brackets"),
    ("tcp:[::1:4444", "no closing ']'"),
    ("tcp:[::1]4444", "expected ':PORT'"),
    ("tcp:[::1]", "expected ':PORT'"),
    ("tcp:[]:4444", "no IPv6 address"),
    ("tcp:[127.0.0.1]:4444", "not an IPv6 address"),
    ("tcp:host]:4444", "brackets must enclose"),
    ("unix:", "empty socket path"),
    ("unix:/" + "x" * 200, "AF_UNIX allows at most 107"),
    ("exec:", "no command"),
    ("exec:   ", "no command"),
    ("fd:", "not a descriptor number"),
    ("fd:three", "not a descriptor number"),
    ("fd:-1", "not a descriptor number"),
    ("file:", "empty path"),
])
def test_bad_uris_say_why(text, reason):
    with pytest.raises(UriError, match=reason) as info:
        parse_uri(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TransportError)
    assert repr(text) in str(info.value)


def test_connect_refuses_what_only_listening_allows():
    with pytest.raises(UriError, match="no host"):
        connect("tcp::4444", timeout=1)
    with pytest.raises(UriError, match="port 0"):
        connect("tcp:127.0.0.1:0", timeout=1)


def test_non_string_uri_is_refused():
    with pytest.raises(UriError, match="must be a string"):
        parse_uri(4444)
