"""``tcp:HOST:PORT``: IPv4 addresses, ``[IPv6]`` addresses and host names.

On the destination ``tcp:HOST:0`` listens on a free port (the listener's
``uri`` tells which) and ``tcp::PORT`` on every local address, IPv4 and IPv6.
"""

from __future__ import annotations

import socket

from pymig.errors import TransportError, UriError
from pymig.transport.channel import SocketChannel, transport_error
from pymig.transport.listener import SocketListener
from pymig.transport.uri import Uri, uri_error

SCHEME = "tcp"


def parse(rest: str, text: str) -> Uri:
    """Parse what follows ``tcp:``."""
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise uri_error(text, "an IPv6 address opened with '[' has no closing ']'")
        host, after = rest[1:close], rest[close + 1:]
        if not host:
            raise uri_error(text, "the brackets hold no IPv6 address")
        try:
            socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        except OSError:
            raise uri_error(text, f"{host!r} in brackets is not an IPv6 address") from None
        if not after.startswith(":"):
            raise uri_error(text, "expected ':PORT' right after the ']' of the IPv6 address")
        port_text = after[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise uri_error(text, "missing port: expected tcp:HOST:PORT")
        if "[" in host or "]" in host:
            raise uri_error(text, "brackets must enclose the whole IPv6 address: tcp:[::1]:PORT")
        if ":" in host:
            raise uri_error(text, "an IPv6 address must be written in brackets: tcp:[::1]:PORT")
    return Uri("tcp", host=host, port=_parse_port(port_text, text))


def _parse_port(port_text: str, text: str) -> int:
    if not port_text:
        raise uri_error(text, "missing port: expected tcp:HOST:PORT")
    if not (port_text.isascii() and port_text.isdigit()):
        raise uri_error(text, f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise uri_error(text, f"port {port} is out of range (0..65535)")
    return port


def connect(uri: Uri, *, timeout: float | None) -> SocketChannel:
    """Connect to a listening destination."""
    if not uri.host:
        raise UriError(f"cannot connect to {uri}: no host given")
    if uri.port == 0:
        raise UriError(f"cannot connect to {uri}: port 0 only means 'any free port' "
                       "when listening")
    try:
        family = _numeric_family(uri.host)
        if family is None:
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        else:
            sock = _connect_numeric(family, uri.host, uri.port, timeout)
    except socket.gaierror as exc:
        raise TransportError(f"connecting to {uri} failed: cannot resolve host {uri.host!r} "
                             f"({exc.strerror})") from exc
    except OSError as exc:
        raise transport_error(f"connecting to {uri}", exc, timeout) from exc
    return SocketChannel(sock, str(uri))


def _numeric_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an address written in numbers (without an IPv6 zone), else
    None: a name to resolve."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except OSError:
            pass
    return None


def _connect_numeric(family: int, host: str, port: int, timeout: float | None) -> socket.socket:
    # Straight to connect(): a process's first getaddrinfo() loads the resolver's modules
    # and configuration, 4-6 ms here, which a migration would count in its setup time.
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def listen(uri: Uri) -> SocketListener:
    """Listen for the source; ``tcp:HOST:0`` picks a free port."""
    if uri.host:
        try:
            infos = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise TransportError(f"listening on {uri} failed: cannot resolve host "
                                 f"{uri.host!r} ({exc.strerror})") from exc
        family, _, _, _, address = infos[0]
    elif socket.has_ipv6:
        family, address = socket.AF_INET6, ("::", uri.port)
    else:  # pragma: no cover - every supported Linux has IPv6 sockets
        family, address = socket.AF_INET, ("0.0.0.0", uri.port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not uri.host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise transport_error(f"listening on {uri}", exc) from exc
    host = sock.getsockname()[0] if uri.host else ""
    return SocketListener(sock, Uri("tcp", host=host, port=sock.getsockname()[1]))
