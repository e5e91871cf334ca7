"""Migration between two hosts: network namespaces joined by a veth pair, shaped with tc."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _childenv import child_env
from _migration_helpers import ANY_KIND_ARGS, GUEST_KINDS, assert_carries_on, wait_for_path
from _netns import NetnsPair
from pymig.qmp import QmpClient

pytestmark = pytest.mark.netns

PORT = 4444


def pymig_in(net: NetnsPair, side: str, *args: str) -> subprocess.Popen:
    return net.popen(side, [sys.executable, "-m", "pymig", *args], env=child_env(),
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE)


@pytest.mark.parametrize("kind", GUEST_KINDS)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_guest_moves_across_a_shaped_link(kind, family, tmp_path):
    with NetnsPair() as net:
        net.shape(rate="200mbit")  # what the source sends is capped at ~25 MB/s
        address = net.ipv4("b") if family == "ipv4" else f"[{net.ipv6('b')}]"
        dst_ctl, src_ctl = str(tmp_path / "dst.sock"), str(tmp_path / "src.sock")
        dst = pymig_in(net, "b", "incoming", f"tcp:{address}:{PORT}", "--control", dst_ctl,
                       "--quiet", *ANY_KIND_ARGS)
        wait_for_path(dst_ctl, dst)
        args = ["run", "--workload", "selfcheck", "--memory", "64M", "--working-set", "8M",
                "--rate", "1000", "--control", src_ctl, "--quiet"]
        src = pymig_in(net, "a", *args, *(["--simulated"] if kind == "simulated" else []))
        wait_for_path(src_ctl, src)
        # the control sockets are unix paths: reachable from here, whatever the namespace
        out = subprocess.run([sys.executable, "-m", "pymig", "migrate", "--control", src_ctl,
                              f"tcp:{address}:{PORT}", "--json"], capture_output=True,
                             text=True, timeout=180, env=child_env())
        assert out.returncode == 0, out.stderr + dst.stderr.read1().decode(errors="replace")
        stats = json.loads(out.stdout)
        assert stats["status"] == "completed"
        # the link, not pymig, bounds the stream: at most its 200 Mbit/s (and some burst)
        assert stats["ram"]["mbps"] < 260
        assert src.wait(30) == 0
        assert_carries_on(dst_ctl)  # on the other host
        with QmpClient(dst_ctl) as client:
            client.command("quit")
        assert dst.wait(30) == 0
