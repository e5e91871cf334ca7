"""pymig sweep over a link that tc shapes on a pair of network namespaces."""

from __future__ import annotations

import subprocess

import pytest

from _migration_helpers import run_pymig
from _netns import NetnsPair
from pymig.sweep import read_rows, read_trace
from pymig.sweeplink import measure_goodput

pytestmark = pytest.mark.netns

BANDWIDTH = 20_000_000


def test_the_goodput_of_a_shaped_link_is_what_tc_lets_through():
    with NetnsPair() as net:
        net.shape(rate=f"{BANDWIDTH // 2}bps", burst="64kb")
        slow = measure_goodput(net, BANDWIDTH // 2)
        net.unshape()
        fast = measure_goodput(net, BANDWIDTH // 2)
    # tc counts frames, headers and all: the payload gets a little less than the rate
    assert 0 < slow <= BANDWIDTH // 2 * 1.02
    assert fast > slow * 2  # unshaped, the veth pair is far faster


def test_pymig_sweep_over_a_namespace_pair(tmp_path):
    out = tmp_path / "sweep"
    done = run_pymig("sweep", "--out", str(out), "--link", "netns", "--rates", "1000",
                     "--bandwidths", str(BANDWIDTH), "--runs", "1", "--memory", "32M",
                     "--working-sets", "4M", "--max-total-time", "4000", timeout=300)
    assert done.returncode == 0, done.stderr
    (row,) = read_rows(str(out / "runs.jsonl"))
    assert row["status"] == "completed" and row["converged"] is True, row
    assert row["predicted_converged"] is True
    assert 0 < row["link_goodput_bps"] <= BANDWIDTH * 1.02
    # the migration ran uncapped; the link bounded it: no pass went faster than tc's rate
    # (the bucket's burst of a few packets aside)
    trace = read_trace(str(out), row)
    assert trace and trace[-1]["action"] == "switchover"
    for before, after in zip(trace, trace[1:]):
        seconds = after["time"] - before["time"]
        if after["bytes"] > 4 << 20 and seconds > 0:
            assert after["bytes"] / seconds <= BANDWIDTH * 1.1
    assert row["transferred_bytes"] / (row["total_ms"] / 1000) <= BANDWIDTH * 1.1
    # the sweep's namespaces went with it
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pymigs-" not in listing
    assert (out / "map.png").exists() and (out / "remaining.png").exists()
