"""The fault campaign: its proxy on plain sockets, its plan, and a slice of it run for real
(fixed trials, each of which must leave exactly one verified guest and nothing leaked)."""

from __future__ import annotations

import os
import random
import select
import socket
import struct

import pytest

from _uffd import needs_uffd

from pymig.faults import postcopy as pc_trials
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
    for transport in ("tcp", "unix", "tls"):  # post-copy needs a return path
        assert {c[3] for c in every if c[0] == transport} == \
            set(runner.PHASES + runner.POSTCOPY_PHASES)
        assert {c[2] for c in every if c[0] == transport and c[3] == "postcopy-preempt"} == \
            set(runner.SOCKET_FAULTS)
    assert not {c[3] for c in every if c[0] in ("exec", "file")} & set(runner.POSTCOPY_PHASES)
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
    plan = runner.plan(36, 7, ("tls",), ("kvm", "simulated"), ("corrupt",))
    assert {t[:3] for t in plan} == {("tls", "kvm", "corrupt"), ("tls", "simulated", "corrupt")}
    assert {t[3] for t in plan} == set(runner.PHASES + runner.POSTCOPY_PHASES)
    with pytest.raises(ValueError, match="no trial of enospc at any phase over tls"):
        runner.plan(1, 7, ("tls",), faults=("enospc",))


def test_the_plan_of_one_phase_holds_that_phase_only():
    plan = runner.plan(30, 3, ("tcp", "unix"), ("simulated",), phases=("postcopy-recover",))
    assert {t[3] for t in plan} == {"postcopy-recover"}
    assert {t[2] for t in plan} == set(runner.SOCKET_FAULTS)
    with pytest.raises(ValueError, match="no trial of any fault at postcopy-active over exec"):
        runner.plan(1, 3, ("exec",), phases=("postcopy-active",))


def test_a_second_link_is_forwarded_and_faulted_on_its_own(tmp_path):
    """A preempt channel is the proxy's second connection: a trigger names it, and a cut of
    it leaves the first one carrying."""
    upstream = socket.socket(socket.AF_UNIX)
    upstream.bind(str(tmp_path / "up"))
    upstream.listen(2)
    proxy = FaultProxy(str(tmp_path / "proxy"), str(tmp_path / "up"), links=2)
    pairs = []
    for _ in range(2):
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(tmp_path / "proxy"))
        server, _ = upstream.accept()
        for sock in (client, server):
            sock.settimeout(10)
        pairs.append((client, server))
    upstream.close()
    (main_c, main_s), (pre_c, pre_s) = pairs
    proxy.arm(Trigger("forward", skip=4, link=1), lambda what: "cut")
    main_c.sendall(b"main-bytes")
    assert _read(main_s, 10) == b"main-bytes"  # link 0's bytes do not fire link 1's trigger
    assert not proxy.fired.is_set()
    pre_c.sendall(b"pre-bytes")
    assert _read(pre_s, 9) == b"pre-"  # up to the trigger, then the cut
    assert proxy.fired_at == "forward byte 4 of link 1"
    main_c.sendall(b"more")
    assert _read(main_s, 4) == b"more"
    main_s.sendall(RP.pack(1, 0, 0))
    assert _read(main_c, 8) == RP.pack(1, 0, 0)
    assert proxy.links[1].forwarded["forward"] == 4 and proxy.forwarded["forward"] == 14
    proxy.close()


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
        if r.phase in ("setup", "pre-switchover", "loaded", "committed", "restore",
                       *runner.POSTCOPY_PHASES) and r.fault != "tls-handshake":
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


#: Post-copy: a fault after the switch (recovered, or the guest lost by design), during a
#: recovery, and on the preempt channel.
POSTCOPY_SIMULATED_SLICE = [
    "tcp:simulated:cut:postcopy-active:1", "unix:simulated:kill-dst:postcopy-active:2",
    "tls:simulated:kill-src:postcopy-active:3", "unix:simulated:corrupt:postcopy-recover:9",
    "tcp:simulated:stall:postcopy-preempt:12",
]
POSTCOPY_KVM_SLICE = ["tls:kvm:corrupt:postcopy-active:24", "unix:kvm:stall:postcopy-recover:26"]


@needs_uffd
def test_campaign_slice_postcopy_simulated(tmp_path):
    results = _run_slice(tmp_path, POSTCOPY_SIMULATED_SLICE)
    outcomes = [r.outcome for r in results]
    assert outcomes == ["destination", pc_trials.LOST, pc_trials.LOST, "destination",
                        "destination"]
    assert all("recovered" in r.detail for r in results if r.fault not in ("kill-dst",
                                                                          "kill-src",
                                                                          "stall"))
    assert results[0].source == "postmigrate" and results[1].source == "paused"
    assert results[2].destination == "running"  # its vCPUs waiting for pages, not failing


@needs_uffd
@pytest.mark.kvm
def test_campaign_slice_postcopy_kvm(tmp_path):
    results = _run_slice(tmp_path, POSTCOPY_KVM_SLICE)
    assert all(r.outcome == "destination" and "recovered" in r.detail for r in results)


class _FakeProc:
    """What the post-copy verdict reads of a process: scripted answers."""

    def __init__(self, name, *, alive=True, killed=False, status="postcopy-paused",
                 run_state="paused", error="post-copy paused: the connection ended",
                 takes_cont=False):
        self.name, self.alive, self.killed = name, alive, killed
        self.status, self.run_state, self.error = status, run_state, error
        self.takes_cont = takes_cont
        self.proc = type("P", (), {"pid": 0, "returncode": -9})()

    def try_cmd(self, name, **args):
        if not self.alive:
            return None
        if name == "query-status":
            return {"status": self.run_state}
        if name == "query-migrate":
            return {"status": self.status, **({"error-desc": self.error} if self.error else {})}
        return {}

    def cmd(self, name, **args):
        if name == "cont" and self.takes_cont:
            self.run_state = "running"
            return {}
        raise RuntimeError(f"{name} refused")


def _verdict(tmp_path, fault, src, dst):
    result = runner.TrialResult(f"tcp:simulated:{fault}:postcopy-active:1", "tcp", "simulated",
                                fault, "postcopy-active", 1, hit="postcopy-active")
    trial = runner.PostcopyTrial(runner.Campaign(str(tmp_path)), result, str(tmp_path))
    trial.settled = lambda proc, want: want
    trial.check_files = trial.quits = lambda proc: None
    trial.judge(src, dst, (9, 7))
    return result


@pytest.mark.parametrize("case,problem", [
    ("paused", None),
    ("failed", None),
    ("resumed", "the source runs its guest after the switch to post-copy"),
    ("takes-cont", "the source took cont after the switch to post-copy"),
    ("no-reason", "src: no reason in query-migrate"),
    ("completed", "src: completed after the kill-dst, not postcopy-paused or failed"),
    ("crashed", "the src did not survive the kill-dst"),
])
def test_a_destination_killed_after_the_switch_loses_the_guest_by_design_only(
        case, problem, tmp_path):
    """kill-dst after the switch: the guest is lost by design, and that alone; the source
    must live on, say why, and never run the guest whose newer pages were at the
    destination."""
    src = _FakeProc("src", status={"failed": "failed", "completed": "completed"}.get(
        case, "postcopy-paused"), run_state="running" if case == "resumed" else "paused",
        error=None if case == "no-reason" else "post-copy paused: the connection ended",
        takes_cont=case == "takes-cont", alive=case != "crashed")
    dst = _FakeProc("dst", alive=False, killed=True)
    result = _verdict(tmp_path, "kill-dst", src, dst)
    assert result.outcome == pc_trials.LOST
    if problem is None:
        assert result.correct, result.problems
    else:
        assert any(p.startswith(problem) for p in result.problems), result.problems


@pytest.mark.parametrize("status,correct", [("postcopy-paused", True), ("failed", False),
                                            ("completed", False)])
def test_a_source_killed_after_the_switch_leaves_the_destination_waiting(status, correct,
                                                                        tmp_path):
    src = _FakeProc("src", alive=False, killed=True)
    dst = _FakeProc("dst", status=status, run_state="running")
    result = _verdict(tmp_path, "kill-src", src, dst)
    assert result.outcome == pc_trials.LOST and result.correct is correct, result.problems
