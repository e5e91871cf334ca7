"""Channel and stream throughput against the raw socket ceiling, measured in the same run.

Run: ``.venv/bin/python -m pytest benchmarks/bench_transport.py --benchmark-only``.
Each case first interleaves a few raw ``socket.sendall`` runs with runs of the
sender under test (the host is noisy: interleaving spreads the noise over
both), records the medians and their ratio in ``extra_info``, then lets
pytest-benchmark time the sender under test.  All senders write 1 MiB buffers
into the same draining receiver (pymig.transport.ceiling).
"""

from __future__ import annotations

import os
import socket
import statistics

import pytest

from pymig.stream import FOOTER_BYTES, StreamWriter
from pymig.transport.ceiling import measure_throughput, sendall_loop
from pymig.transport.channel import SocketChannel

WRITE_BYTES = 1 << 20
TOTAL_WRITES = 192
PAIRS = 5
PART_OVERHEAD_BYTES = 12 + FOOTER_BYTES  # PART record header + footer
_PAYLOAD = memoryview(bytearray(os.urandom(WRITE_BYTES)))


def _channel_send(sock: socket.socket, total_bytes: int) -> None:
    channel = SocketChannel(sock, "bench")
    for _ in range(total_bytes // WRITE_BYTES):
        channel.send(_PAYLOAD)


def _channel_sendv(sock: socket.socket, total_bytes: int) -> None:
    channel = SocketChannel(sock, "bench")
    half = WRITE_BYTES // 2
    for _ in range(total_bytes // WRITE_BYTES):
        channel.sendv([_PAYLOAD[:half], _PAYLOAD[half:]])


def _stream_part(nocsum: bool):
    def send(sock: socket.socket, total_bytes: int) -> None:
        writer = StreamWriter(SocketChannel(sock, "bench"))
        for _ in range(total_bytes // (WRITE_BYTES + PART_OVERHEAD_BYTES)):
            writer.part(7, _PAYLOAD, nocsum=nocsum)

    return send


SENDERS = {
    "raw_sendall": (sendall_loop(WRITE_BYTES), WRITE_BYTES),
    "channel_send": (_channel_send, WRITE_BYTES),
    "channel_sendv": (_channel_sendv, WRITE_BYTES),
    "stream_part_nocsum": (_stream_part(True), WRITE_BYTES + PART_OVERHEAD_BYTES),
    "stream_part_xxh3": (_stream_part(False), WRITE_BYTES + PART_OVERHEAD_BYTES),
}


@pytest.mark.parametrize("receiver", ["thread", "process"])
@pytest.mark.parametrize("sender", list(SENDERS))
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_throughput(benchmark, kind, sender, receiver):
    send, unit = SENDERS[sender]
    total = TOTAL_WRITES * unit
    raw_send = SENDERS["raw_sendall"][0]
    raw_total = TOTAL_WRITES * WRITE_BYTES
    raw, ours = [], []
    for _ in range(PAIRS):
        raw.append(measure_throughput(raw_send, kind, raw_total, receiver=receiver))
        ours.append(measure_throughput(send, kind, total, receiver=receiver))
    raw_median, ours_median = statistics.median(raw), statistics.median(ours)
    benchmark.group = f"loopback {kind}, 1 MiB writes, receiver in a {receiver}"
    benchmark.extra_info.update(
        bytes_per_round=total,
        raw_sendall_gbps=round(raw_median / 1e9, 3),
        gbps=round(ours_median / 1e9, 3),
        ratio_to_raw=round(ours_median / raw_median, 3),
    )
    benchmark.pedantic(measure_throughput, args=(send, kind, total),
                       kwargs={"receiver": receiver}, rounds=5, iterations=1)
