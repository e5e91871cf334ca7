"""The fault campaign: its proxy on plain sockets, its plan, and a slice of it run for real
(fixed trials, each of which must leave exactly one verified guest and nothing leaked)."""

from __future__ import annotations

import os
import random
import select
import socket
import struct

import pytest

from pymig.faults import runner
from pymig.faults.proxy import FaultProxy, Trigger

RP = struct.Struct("<HHI")


def _pair(tmp_path, **kwargs):
    """A proxy between a client socket and an accepted upstream socket."""
    upstream = socket.socket(socket.AF_UNIX)
    upstream.bind(str(tmp_path / "up"))
    upstream.listen(1)
    proxy = FaultProxy(str(tmp_path / "proxy"), str(tmp_path / "up"), **kwargs)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "proxy"))
    server, _ = upstream.accept()
    upstream.close()
    for sock in (client, server):
        sock.settimeout(10)
    return proxy, client, server


def _read(sock, n: int) -> bytes:
    out = b""
    while len(out) < n:
        more = sock.recv(n - len(out))
        if not more:
            break
        out += more
    return out


def test_the_proxy_stops_at_a_return_message_and_the_callback_sees_it_held(tmp_path):
    proxy, client, server = _pair(tmp_path)
    seen_by_client_then = []

    def callback(what):
        # (looks without reading, and without touching the socket's mode: the test's thread
        # is inside a recv on it, which a switch to non-blocking would fail with EAGAIN)
        readable, _, _ = select.select([client], [], [], 0)
        seen_by_client_then.append(bool(readable))
        return "pass"

    proxy.arm(Trigger("return-type", value=8), callback)
    messages = [RP.pack(10, 0, 8) + bytes(8), RP.pack(8, 0, 0), RP.pack(3, 0, 16) + bytes(16)]
    server.sendall(messages[0])
    client.settimeout(10)
    assert _read(client, 16) == messages[0]
    server.sendall(messages[1] + messages[2])
    assert _read(client, 8 + 24) == messages[1] + messages[2]
    assert proxy.fired_at == "return message 8"
    assert seen_by_client_then == [False]  # LOADED was held while the callback ran
    proxy.close()


def test_corrupt_flips_one_byte_the_seed_chooses(tmp_path):
    data = bytes(range(256)) * 64
    flips = []
    for _ in range(2):
        path = tmp_path / f"run{len(flips)}"
        path.mkdir()
        proxy, client, server = _pair(path, rng=random.Random(7))
        proxy.arm(Trigger("forward", skip=1000), lambda what: "corrupt")
        client.sendall(data)
        got = _read(server, len(data))
        diff = [i for i in range(len(data)) if got[i] != data[i]]
        assert len(diff) == 1 and diff[0] >= 1000
        flips.append((diff[0], got[diff[0]] ^ data[diff[0]]))
        assert proxy.corrupted == ("forward", diff[0], flips[-1][1])
        proxy.close()
    assert flips[0] == flips[1]  # the same seed, the same byte


def test_cut_forward_ends_one_direction_and_keeps_the_other(tmp_path):
    proxy, client, server = _pair(tmp_path)
    client.sendall(b"before")
    assert _read(server, 6) == b"before"
    proxy.inject("cut-forward")
    client.sendall(b"after")
    assert server.recv(10) == b""  # the destination sees the stream end
    server.sendall(RP.pack(1, 0, 0))
    assert _read(client, 8) == RP.pack(1, 0, 0)  # the return path still carries
    proxy.close()


def test_stall_passes_nothing_and_keeps_both_open(tmp_path):
    proxy, client, server = _pair(tmp_path)
    proxy.inject("stall")
    client.sendall(b"x" * 100)
    server.settimeout(0.5)
    with pytest.raises(socket.timeout):
        server.recv(10)
    proxy.close()
    server.settimeout(10)
    assert server.recv(10) == b""  # closing the proxy ends the connection


def test_the_plan_covers_every_combination_and_a_seed_replays_it():
    every = runner.combos()
    assert {c[3] for c in every if c[0] == "tcp"} == set(runner.PHASES)
    assert {c[2] for c in every if c[0] == "tcp"} == set(runner.SOCKET_FAULTS)
    assert ("tls", "kvm", "tls-handshake", "setup") in every
    assert {c[2] for c in every if c[0] == "file"} == {"enospc", "kill-src", "corrupt",
                                                       "kill-dst"}
    plan = runner.plan(len(every), 5)
    assert sorted(t[:4] for t in plan) == sorted(every)  # each once before any twice
    assert runner.plan(50, 5) == plan[:50]
    trial = plan[3]
    assert runner.parse_id(":".join(map(str, trial))) == trial


def test_the_plan_of_one_fault_holds_that_fault_in_every_phase():
    plan = runner.plan(24, 7, ("tls",), ("kvm", "simulated"), ("corrupt",))
    assert {t[:3] for t in plan} == {("tls", "kvm", "corrupt"), ("tls", "simulated", "corrupt")}
    assert {t[3] for t in plan} == set(runner.PHASES)
    with pytest.raises(ValueError, match="no trial of enospc at any phase over tls"):
        runner.plan(1, 7, ("tls",), faults=("enospc",))


def test_the_summary_counts_trials_per_fault_phase_and_transport():
    results = [{"transport": "tcp", "fault": "cut", "phase": "live", "correct": True},
               {"transport": "tcp", "fault": "cut", "phase": "live", "correct": False},
               {"transport": "unix", "fault": "cut", "phase": "live", "correct": True}]
    table = runner.summary(results)
    assert "| cut | live | 1/2 | 1/1 |" in table
    assert "2/3 trials correct" in table


def _run_slice(tmp_path, ids):
    campaign = runner.Campaign(str(tmp_path))
    try:
        results = [campaign.run(*runner.parse_id(i)) for i in ids]
    finally:
        campaign.close()
    report = "\n".join(f"{r.id} hit={r.hit} {r.outcome}: {r.problems} {r.detail}"
                       for r in results)
    assert all(r.correct for r in results), report
    for r in results:
        if r.phase in ("setup", "pre-switchover", "loaded", "committed", "restore") \
                and r.fault != "tls-handshake":
            assert r.hit == r.phase, report  # the proxy or the state put it there
    return results


#: A fixed slice: every transport and fault, the phases the proxy holds precisely.
KVM_SLICE = [
    "tcp:kvm:cut:live:101", "tcp:kvm:kill-src:committed:103",
    "tcp:kvm:stall:pre-switchover:104", "tcp:kvm:corrupt:stop-and-copy:105",
    "unix:kvm:cut-return:loaded:106", "unix:kvm:cut-forward:committed:107",
    
    "tls:kvm:tls-handshake:setup:109", "tls:kvm:corrupt:live:110",
    
    "exec:kvm:corrupt:stop-and-copy:112", 
    "file:kvm:corrupt:stop-and-copy:114", "file:kvm:kill-src:pre-switchover:115",
]
SIMULATED_SLICE = [
    "tcp:simulated:cut:stop-and-copy:201", "unix:simulated:kill-dst:committed:202",
    "exec:simulated:cut:pre-switchover:203", "file:simulated:kill-dst:restore:204",
    # COMMIT lost (the forward direction cut with LOADED on its way back): the destination's
    # LOAD_ERROR gives the guest back to the source, which stayed paused before
    "unix:simulated:cut-forward:loaded:1",
]
ENOSPC_SLICE = ["file:simulated:enospc:live:301", "file:simulated:enospc:stop-and-copy:302"]


@pytest.mark.kvm
def test_campaign_slice_kvm(tmp_path):
    _run_slice(tmp_path, KVM_SLICE)


def test_campaign_slice_simulated(tmp_path):
    _run_slice(tmp_path, SIMULATED_SLICE)


@pytest.mark.skipif(os.geteuid() != 0, reason="ENOSPC comes from a tmpfs it mounts (root)")
def test_campaign_slice_enospc(tmp_path):
    results = _run_slice(tmp_path, ENOSPC_SLICE)
    assert [r.hit for r in results] == ["live", "stop-and-copy"]
    assert all(r.source == "running" and r.destination == "no file" for r in results)
