"""The link a sweep's runs cross, shaped to each point's bandwidth.

``ratelimit``: loopback TCP, the link being pymig's own rate limiter (``max-bandwidth`` at the
point's bandwidth, kept through the stop-and-copy with ``x-switchover-capped``, since a link
does not speed up when the guest stops).

``netns``: two network namespaces joined by a veth pair (:class:`pymig.netns.NetnsPair`),
the destination process in one, the source's socket made in the other, and ``tc``'s token
bucket filter on the source side's egress at the point's bandwidth; the migration itself is
uncapped.  The link's goodput (TCP payload bytes/s, below the rate ``tc`` counts in frames
with their headers) is measured once per bandwidth before the first run through it, by the
same kind of stream the migration sends, and the prediction uses it.  Nothing leaves the
namespaces: they have no route anywhere else.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

LINKS = ("ratelimit", "netns")
#: How the goodput of a shaped link is measured: this long a stream (at least
#: GOODPUT_MIN_BYTES), timed from its first GOODPUT_SKIP_S (the bucket's burst, TCP's start).
GOODPUT_S = 0.8
GOODPUT_MIN_BYTES = 2 << 20
GOODPUT_SKIP_S = 0.15


class RateLimitLink:
    """Loopback TCP and pymig's rate limiter."""

    name = "ratelimit"

    def __enter__(self) -> "RateLimitLink":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def settings(self, point: dict[str, Any]) -> dict[str, Any]:
        return {"max_bandwidth": point["bandwidth_bps"], "switchover_capped": True}

    def prepare(self, point: dict[str, Any]) -> dict[str, Any]:
        """Shape the link for ``point``; what the row records of it."""
        return {}

    def destination(self):
        from pymig.experiment import Destination

        return Destination(process=True)

    def uri(self, destination) -> str:
        return destination.uri


class NetnsLink:
    """A namespace pair shaped with tc; the goodput measured per bandwidth."""

    name = "netns"

    def __init__(self) -> None:
        self.pair = None
        self.shaped: int | None = None
        self.goodput: dict[int, float] = {}

    def __enter__(self) -> "NetnsLink":
        from pymig.netns import NetnsPair

        self.pair = NetnsPair(prefix="pymigs").__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.pair is not None:
            self.pair.close()
            self.pair = None

    def settings(self, point: dict[str, Any]) -> dict[str, Any]:
        return {"max_bandwidth": 0}

    def prepare(self, point: dict[str, Any]) -> dict[str, Any]:
        bandwidth = int(point["bandwidth_bps"])
        if self.shaped != bandwidth:
            # tc's "bps" is bytes per second; the bucket holds a few packets' worth
            self.pair.shape(rate=f"{bandwidth}bps", burst=f"{max(bandwidth // 200, 16384)}b")
            self.shaped = bandwidth
        if bandwidth not in self.goodput:
            self.goodput[bandwidth] = measure_goodput(self.pair, bandwidth)
        return {"link": self.name, "link_goodput_bps": round(self.goodput[bandwidth])}

    def destination(self):
        from pymig.experiment import Destination
        from pymig.netns import IPV4

        return Destination(f"tcp:{IPV4['b']}:0", process=True,
                           command_prefix=("ip", "netns", "exec", self.pair.ns["b"]))

    def uri(self, destination) -> str:
        from pymig.netns import IPV4

        port = int(destination.uri.rsplit(":", 1)[1])
        sock = self.pair.connect("a", (IPV4["b"], port))
        return f"fd:{sock.detach()}"  # the migration's channel owns the descriptor


def open_link(name: str):
    if name not in LINKS:
        raise ValueError(f"the link is one of {', '.join(LINKS)}, not {name!r}")
    return NetnsLink() if name == "netns" else RateLimitLink()


def measure_goodput(pair, bandwidth: int) -> float:
    """Payload bytes/s a TCP stream gets from side a to side b of ``pair`` as shaped now."""
    from pymig.netns import IPV4

    listener = pair.call_in("b", lambda: socket.create_server((IPV4["b"], 0)))
    total = max(int(bandwidth * GOODPUT_S), GOODPUT_MIN_BYTES)
    marks: list[tuple[float, int]] = []

    def sink() -> None:
        conn, _ = listener.accept()
        got = 0
        with conn:
            while got < total:
                data = conn.recv(1 << 16)
                if not data:
                    break
                got += len(data)
                marks.append((time.monotonic(), got))

    reader = threading.Thread(target=sink, daemon=True)
    reader.start()
    try:
        with pair.connect("a", (IPV4["b"], listener.getsockname()[1])) as sock:
            chunk = bytes(1 << 16)
            sent = 0
            while sent < total:
                sent += sock.send(chunk[:total - sent])
            reader.join(60)
    finally:
        listener.close()
    if len(marks) < 2:
        raise RuntimeError("the shaped link carried nothing")
    start = marks[0][0] + GOODPUT_SKIP_S
    after = [m for m in marks if m[0] >= start] or marks
    (t0, b0), (t1, b1) = after[0], marks[-1]
    if t1 <= t0:
        (t0, b0) = marks[0]
    return (b1 - b0) / (t1 - t0)
