"""Two network namespaces joined by a veth pair: a real, shapeable link inside this machine,
for the tests and for ``pymig sweep --link netns``.

    with NetnsPair() as net:                      # unique names, torn down on any exit
        net.shape(rate="100mbit")                 # tbf on a's egress; delay=... needs netem
        server = net.python("b", SERVER_CODE, str(port))
        sock = net.connect("a", (net.ipv4("b"), port))   # a socket of side a, in this process

Side "a" has 198.18.0.1 and 2001:2::1, side "b" 198.18.0.2 and 2001:2::2: the ranges set aside
for network benchmarking (RFC 2544, RFC 5180).  The namespaces have no route anywhere else,
so nothing sent in them can leave the machine.

Every pair's names carry this process's pid; a pair whose process died without cleaning up is
deleted by the next :class:`NetnsPair` created on the machine (:func:`remove_stale`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from pymig.errors import PymigError

PREFIX = "pymigt"
IFNAME = "pmveth"
IPV4 = {"a": "198.18.0.1", "b": "198.18.0.2"}
IPV4_PREFIX = 30
IPV6 = {"a": "2001:2::1", "b": "2001:2::2"}
IPV6_PREFIX = 64

_counter = itertools.count()


CLONE_NEWNET = 0x40000000


class NetnsUnavailable(PymigError):
    """Namespaces cannot be built here (not root, no iproute2)."""


class NetnsUnsupported(PymigError):
    """The kernel lacks something asked for (e.g. the netem qdisc)."""


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's 'ip' command is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(prefix: str = PREFIX) -> None:
    """Delete namespaces left by processes that no longer exist."""
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if len(parts) == 4 and parts[0] == prefix and parts[1].isdigit():
            if not _pid_alive(int(parts[1])):
                _ip("netns", "del", name, check=False)


class NetnsPair:
    """Namespaces ``a`` and ``b`` linked by a veth pair, with IPv4 and IPv6 addresses."""

    def __init__(self, prefix: str = PREFIX) -> None:
        tag = f"{prefix}-{os.getpid()}-{next(_counter)}"
        self.prefix = prefix
        self.ns = {"a": f"{tag}-a", "b": f"{tag}-b"}
        self.ifname = IFNAME
        self._processes: list[subprocess.Popen] = []
        self._created: list[str] = []

    # --- life cycle -----------------------------------------------------------------------
    def __enter__(self) -> NetnsPair:
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        remove_stale(self.prefix)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        for side in "ab":
            _ip("netns", "add", self.ns[side])
            self._created.append(self.ns[side])
        # Both ends are born inside their namespaces: nothing ever appears in the host's.
        _ip("link", "add", IFNAME, "netns", self.ns["a"], "type", "veth",
            "peer", "name", IFNAME, "netns", self.ns["b"])
        for side in "ab":
            ns = self.ns[side]
            _ip("-n", ns, "addr", "add", f"{IPV4[side]}/{IPV4_PREFIX}", "dev", IFNAME)
            _ip("-n", ns, "-6", "addr", "add", f"{IPV6[side]}/{IPV6_PREFIX}", "dev", IFNAME,
                "nodad")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", IFNAME, "up")
        self._wait_link_up()

    def _wait_link_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = [json.loads(_ip("-n", self.ns[s], "-j", "link", "show", "dev",
                                     IFNAME).stdout)[0]["operstate"] for s in "ab"]
            if states == ["UP", "UP"]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"veth link did not come up: operstate {states}")
            time.sleep(0.02)

    def close(self) -> None:
        """Kill the processes started in the namespaces, then delete the namespaces
        (which deletes the veth pair with them).  Safe to call more than once."""
        for proc in self._processes:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._processes.clear()
        for name in self._created:
            _ip("netns", "del", name, check=False)
        self._created.clear()

    # --- addresses --------------------------------------------------------------------------
    def ipv4(self, side: str) -> str:
        return IPV4[side]

    def ipv6(self, side: str) -> str:
        return IPV6[side]

    # --- link shaping -----------------------------------------------------------------------
    def shape(self, *, rate: str | None = None, delay: str | None = None, side: str = "a",
              burst: str = "64kb", latency: str = "100ms") -> None:
        """Shape what ``side`` sends: ``rate`` alone uses tbf; ``delay`` (with or without a
        rate) uses netem, which raises :class:`NetnsUnsupported` if the kernel lacks it."""
        if delay is not None:
            args = ["netem", "delay", delay] + (["rate", rate] if rate else [])
        elif rate is not None:
            args = ["tbf", "rate", rate, "burst", burst, "latency", latency]
        else:
            raise ValueError("shape() needs a rate, a delay or both")
        result = subprocess.run(["ip", "netns", "exec", self.ns[side], "tc", "qdisc", "replace",
                                 "dev", IFNAME, "root", *args],
                                capture_output=True, text=True, timeout=30)
        if result.returncode:
            if "unknown" in result.stderr.lower():
                raise NetnsUnsupported(f"this kernel has no '{args[0]}' qdisc "
                                       f"({result.stderr.strip()})")
            raise RuntimeError(f"tc qdisc {' '.join(args)} failed: {result.stderr.strip()}")

    def unshape(self, side: str = "a") -> None:
        subprocess.run(["ip", "netns", "exec", self.ns[side], "tc", "qdisc", "del", "dev",
                        IFNAME, "root"], capture_output=True, text=True, timeout=30)

    # --- sockets in this process ------------------------------------------------------------
    def connect(self, side: str, address: tuple[str, int], timeout: float = 30.0,
                family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket of namespace ``side``, connected to ``address``, for this process
        (a socket keeps the namespace it was made in; this process stays where it is)."""
        return self.call_in(side, lambda: socket.create_connection(address, timeout))

    def call_in(self, side: str, call):
        """``call()`` run in namespace ``side``: in a thread of its own, which setns(2)
        moves there and which ends with it (a namespace is per thread)."""
        out: dict = {}

        def inside() -> None:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
                fd = os.open(f"/var/run/netns/{self.ns[side]}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns into {self.ns[side]}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                out["value"] = call()
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller
                out["error"] = exc

        thread = threading.Thread(target=inside, name=f"netns-{side}", daemon=True)
        thread.start()
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    # --- processes --------------------------------------------------------------------------
    def popen(self, side: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``side``; killed by :meth:`close` if still running."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[side], *argv], **kwargs)
        self._processes.append(proc)
        return proc

    def python(self, side: str, code: str, *args: str, **kwargs) -> subprocess.Popen:
        """Run ``python -c code args`` in ``side`` with pymig importable; stdout piped, text."""
        env = dict(kwargs.pop("env", os.environ))
        # the child resolves imports as this process does: the installed pymig (or src/ when
        # the tests run from a source tree), and the caller's helpers beside it
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("text", True)
        return self.popen(side, [sys.executable, "-c", code, *args], env=env, **kwargs)
