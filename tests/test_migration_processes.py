"""Migration between separate processes, driven as a user drives it: ``pymig run``,
``pymig incoming`` and ``pymig migrate`` over the control socket."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from _childenv import child_env
from _migration_helpers import (GUEST_KINDS, assert_carries_on, finish, guest_passes,
                                start_destination, start_source, wait_for)
from pymig.qmp import QmpClient
from pymig.ram import OVERLAP_ENV
from pymig.stats import read_trace


@pytest.mark.parametrize("overlap", ["on", "off"])
@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_cli_migration_carries_the_guest_over(kind, overlap, tmp_path, monkeypatch):
    # both ways of moving packets, with and without threads of their own (pymig.ram), on
    # whatever host this runs
    monkeypatch.setenv(OVERLAP_ENV, overlap)
    src, src_ctl = start_source(kind, tmp_path)
    dst, dst_ctl, uri = start_destination(tmp_path)
    try:
        wait_for(lambda: guest_passes(src_ctl) >= 1, what="the source guest to run")
        out = subprocess.run([*_pymig_argv(), "migrate", "--control", src_ctl, uri, "--json"],
                             capture_output=True, text=True, timeout=180, env=child_env())
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        assert stats["status"] == "completed"
        assert stats["ram"]["remaining"] == 0 and stats["downtime"] >= 0
        src.wait(30)  # pymig migrate quits the source once the guest has moved
        assert src.returncode == 0
        with QmpClient(dst_ctl) as client:
            first = client.command("query-guest")["progress"]["passes"]
            wait_for(lambda: client.command("query-guest")["progress"]["passes"] > first,
                     what="the guest to carry on at the destination")
            client.command("stop")
            report = client.command("query-guest", verify=True)
            assert report["selfcheck"]["ok"], report["selfcheck"]
            assert client.command("query-status") == {"running": False, "status": "paused"}
            client.command("cont")
            assert client.command("query-status")["running"] is True
            client.command("quit")
        assert dst.wait(30) == 0
    finally:
        finish(src, dst)


def _pymig_argv():
    return [sys.executable, "-m", "pymig"]


def test_killed_destination_leaves_the_source_running(tmp_path):
    src, src_ctl = start_source("simulated", tmp_path, memory="256M", working_set="128M")
    dst, dst_ctl, uri = start_destination(tmp_path)
    try:
        with QmpClient(src_ctl) as client:
            client.command("migrate-set-parameters", **{"max-bandwidth": 20 << 20, "compression": "none"})
            client.command("migrate", uri=uri)
            wait_for(lambda: client.command("query-migrate")["ram"]["transferred"] > 8 << 20,
                     what="the migration to be under way")
            dst.send_signal(signal.SIGKILL)
            dst.wait(30)
            wait_for(lambda: client.command("query-migrate")["status"] == "failed",
                     timeout=60, what="the source to notice")
            assert client.command("query-status")["status"] == "running"
            assert_carries_on(src_ctl)
            client.command("quit")
        assert src.wait(30) == 0
    finally:
        finish(src, dst)


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_a_source_killed_in_the_stop_and_copy_leaves_no_guest_at_the_destination(kind,
                                                                                 tmp_path):
    """The guest is paused at the source and half sent when the source dies: the destination
    has part of it and no commit, so it must not run it."""
    src, src_ctl = start_source(kind, tmp_path, memory="128M", working_set="32M", rate="2000")
    dst, dst_ctl, uri = start_destination(tmp_path)
    try:
        with QmpClient(src_ctl) as client:
            wait_for(lambda: guest_passes(src_ctl) >= 1, what="the source guest to run")
            # 20 MB/s, pages as they are, the cap kept on the switchover and a downtime limit
            # of 2 s: the stop-and-copy sends the working set's dirty pages for a good part
            # of a second
            client.command("migrate-set-parameters",
                           **{"max-bandwidth": 20 << 20, "compression": "none",
                              "downtime-limit": 2000, "x-switchover-capped": True})
            client.command("migrate", uri=uri)
            wait_for(lambda: client.command("query-migrate")["status"] == "device",
                     interval=0.001, what="the stop-and-copy")
            src.send_signal(signal.SIGKILL)
        src.wait(30)
        assert dst.wait(60) == 1
        err = dst.stderr.read().decode()
        assert "incoming migration failed" in err and "the guest was not started" in err, err
    finally:
        finish(src, dst)


class CuttingProxy:
    """Forwards a TCP connection and cuts it (RST) after ``limit`` bytes from the source."""

    def __init__(self, target: tuple[str, int], limit: int):
        self.target = target
        self.limit = limit
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cut = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        client, _ = self.server.accept()
        upstream = socket.create_connection(self.target)
        forwarded = 0
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        while forwarded < self.limit:
            data = client.recv(1 << 16)
            if not data:
                break
            upstream.sendall(data)
            forwarded += len(data)
        for sock in (client, upstream):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RDWR)  # wakes the pump thread blocked in recv
            sock.close()
        self.cut.set()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass


def test_cut_connection_fails_both_sides_cleanly(tmp_path):
    src, src_ctl = start_source("simulated", tmp_path, memory="256M", working_set="128M")
    dst, dst_ctl, uri = start_destination(tmp_path)
    host, port = uri.split(":")[1], int(uri.rsplit(":", 1)[1])
    proxy = CuttingProxy((host, port), limit=16 << 20)
    try:
        with QmpClient(src_ctl) as client:
            client.command("migrate-set-parameters", **{"max-bandwidth": 40 << 20, "compression": "none"})
            client.command("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
            assert proxy.cut.wait(60)
            wait_for(lambda: client.command("query-migrate")["status"] == "failed",
                     timeout=60, what="the source to notice the cut")
            assert "error-desc" in client.command("query-migrate")
            assert client.command("query-status")["status"] == "running"
            client.command("stop")
            assert client.command("query-guest", verify=True)["selfcheck"]["ok"]
            client.command("quit")
        # the destination never started a partial guest: it exits non-zero
        assert dst.wait(60) == 1
        assert "incoming migration failed" in dst.stderr.read().decode()
    finally:
        finish(src, dst)


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_cli_dirty_limit_caps_a_guest_the_link_cannot_keep_up_with(kind, tmp_path):
    """``pymig run --dirty-ring`` + ``pymig migrate --dirty-limit``: the self-checking guest
    flat out (KVM) or at 200k pages/s (simulated) over a 24 MB/s link converges once each
    vCPU is capped, and carries on at the destination.  Its pages are sent as they are: LZ4
    shrinks them enough to converge over that link uncapped."""
    src, src_ctl = start_source(kind, tmp_path, vcpus=2, rate=str(RATE_FLAT_OUT[kind]),
                                extra=["--dirty-ring", "4096"])
    dst, dst_ctl, uri = start_destination(tmp_path)
    try:
        wait_for(lambda: guest_passes(src_ctl) >= 1, what="the source guest to run")
        out = subprocess.run([*_pymig_argv(), "migrate", "--control", src_ctl, uri, "--json",
                              "--max-bandwidth", "24M", "--dirty-limit", "1000",
                              "--compression", "none",
                              "--trace", str(tmp_path / "trace.jsonl")],
                             capture_output=True, text=True, timeout=180, env=child_env())
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        assert stats["status"] == "completed" and stats["switchover-reason"] == "fits-limit"
        limits = [r.get("vcpu_dirty_limits") for r in read_trace(tmp_path / "trace.jsonl")]
        assert [1000, 1000] in limits, limits
        assert src.wait(30) == 0
        assert_carries_on(dst_ctl)
        with QmpClient(dst_ctl) as client:
            client.command("quit")
        assert dst.wait(30) == 0
    finally:
        finish(src, dst)


RATE_FLAT_OUT = {"simulated": 200_000, "kvm": 0}
