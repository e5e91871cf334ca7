"""``pymig demo``, the README's main command: a running self-checking guest migrated between two
processes, with the final stats, and the proof that it carries on at the destination."""

from __future__ import annotations

import json

import pytest
from _migration_helpers import GUEST_KINDS, run_pymig

MiB = 1 << 20
SMALL = ("--memory", "64M", "--working-set", "8M")


def demo_json(*args: str) -> dict:
    done = run_pymig("demo", *SMALL, "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_pymig_demo_json_migrates_the_guest_and_proves_it_carries_on(kind):
    stats = demo_json(*(["--simulated"] if kind == "simulated" else []))
    assert stats["guest_kind"] == kind
    assert stats["status"] == "completed"
    assert stats["ram"]["total"] == 64 * MiB
    assert stats["ram"]["normal"] > 0 and stats["ram"]["remaining"] == 0
    assert stats["downtime"] >= 0 and stats["total-time"] >= stats["downtime"]
    assert stats["guest_verified"] is True
    before, after = stats["progress_before_migration"], stats["destination_progress"]
    assert after["passes"] > before["passes"] and after["errors"] == 0
    assert stats["destination_selfcheck"]["ok"]


@pytest.mark.parametrize("options, check", [
    (("--compression", "none"), lambda s: s["ram"]["compressed"] == 0),
    (("--transport", "unix"), lambda s: s["status"] == "completed"),
    (("--mem-prealloc",), lambda s: s["status"] == "completed"),
])
def test_pymig_demo_options_reach_the_migration(options, check):
    stats = demo_json(*options)
    assert check(stats), stats
    assert stats["guest_verified"] is True


def test_pymig_demo_prints_the_stats_table_and_the_verdict():
    done = run_pymig("demo", *SMALL)
    assert done.returncode == 0, done.stderr
    out = done.stdout  # the table and the verdict; progress and notes went to stderr
    for row in ("status", "downtime (measured)", "downtime (expected)", "dirty rate",
                "pages with data", "transferred (wire bytes)", "pages moved", "compression"):
        assert row in out, out
    assert "guest verified on the destination" in out and "self-check consistent" in out
    assert "pass" in done.stderr and "left" in done.stderr  # the progress line
