"""Each ``pymig migrate`` states everything it needs: the parameters and capabilities it has
flags for are set for that migration (their defaults where a flag is absent), whatever an
earlier run set, and the run says which are in force.  A QMP client's settings persist, as in
QEMU."""

from __future__ import annotations

import json

import pytest

from _migration_helpers import GUEST_KINDS, finish, run_pymig, start_source
from pymig.qmp import QmpClient

MiB = 1 << 20

DEFAULTS_LINE = ("with downtime-limit 300 ms, max-bandwidth uncapped, compression lz4, "
                 "auto-converge off, dirty-limit off")


def _snapshot(ctl: str, path, *flags: str):
    """``pymig migrate --json`` to a file: snapshot; (process result, its JSON or None)."""
    done = run_pymig("migrate", "--control", ctl, f"file:{path}", *flags, "--json")
    try:
        return done, json.loads(done.stdout)
    except ValueError:
        return done, None


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_a_dirty_limit_does_not_stay_behind(kind, tmp_path):
    """A KVM guest without the dirty ring cannot take a dirty limit: refused; the simulated
    guest takes it.  Either way the next plain run has none."""
    src, ctl = start_source(kind, tmp_path, memory="64M", working_set="4M", rate="100")
    try:
        limited, info = _snapshot(ctl, tmp_path / "a.pymig", "--dirty-limit", "2000")
        assert "Traceback" not in limited.stderr
        if kind == "kvm":
            assert limited.returncode == 1, limited.stderr
            assert "dirty ring" in limited.stderr
        else:
            assert limited.returncode == 0, limited.stderr
            assert info["settings"]["capabilities"]["dirty-limit"] is True
            assert "dirty-limit on, vcpu-dirty-limit 2,000 pages/s per vCPU" in limited.stderr
        plain, info = _snapshot(ctl, tmp_path / "b.pymig")
        assert plain.returncode == 0, plain.stderr
        assert info["status"] == "completed"
        assert info["settings"]["capabilities"]["dirty-limit"] is False
        assert DEFAULTS_LINE in plain.stderr
    finally:
        finish(src)


def test_each_run_sets_its_own_bandwidth_and_compression_and_says_so(tmp_path):
    src, ctl = start_source("simulated", tmp_path, memory="64M", working_set="4M", rate="100")
    try:
        capped, info = _snapshot(ctl, tmp_path / "a.pymig", "--max-bandwidth", "5M",
                                 "--compression", "none", "--auto-converge")
        assert capped.returncode == 0, capped.stderr
        assert ("with downtime-limit 300 ms, max-bandwidth 5.0 MiB/s, compression none, "
                "auto-converge on, dirty-limit off") in capped.stderr
        settings = info["settings"]
        assert settings["parameters"]["max-bandwidth"] == 5 * MiB
        assert settings["parameters"]["compression"] == "none"
        assert settings["capabilities"]["auto-converge"] is True
        assert info["ram"]["compressed"] == 0

        with QmpClient(ctl) as client:
            # what the last run set stays with the process for QMP clients, as in QEMU ...
            params = client.command("query-migrate-parameters")
            assert (params["max-bandwidth"], params["compression"]) == (5 * MiB, "none")
            # ... and what a QMP client sets that pymig migrate has no flag for persists
            client.command("migrate-set-parameters", **{"cpu-throttle-initial": 30})

        plain, info = _snapshot(ctl, tmp_path / "b.pymig")
        assert plain.returncode == 0, plain.stderr
        assert DEFAULTS_LINE + "; also in force on the source: cpu-throttle-initial 30" \
            in plain.stderr
        settings = info["settings"]
        assert settings["parameters"]["max-bandwidth"] == 0  # uncapped
        assert settings["parameters"]["compression"] == "lz4"
        assert settings["parameters"]["cpu-throttle-initial"] == 30
        assert settings["capabilities"]["auto-converge"] is False
        assert "max-bandwidth" in settings["set-by-command-line"]
        assert info["ram"]["compressed"] > 0  # LZ4 again

        # an explicit off, and a contradiction refused before anything is set
        off, info = _snapshot(ctl, tmp_path / "c.pymig", "--no-auto-converge",
                              "--no-dirty-limit")
        assert off.returncode == 0, off.stderr
        assert info["settings"]["capabilities"]["auto-converge"] is False
        both = run_pymig("migrate", "--control", ctl, f"file:{tmp_path}/d.pymig",
                         "--auto-converge", "--dirty-limit", "100")
        assert both.returncode == 1 and "exclude each other" in both.stderr
    finally:
        finish(src)


def test_settings_are_refused_while_a_migration_runs(tmp_path):
    """pymig migrate never changes the parameters of a migration already under way."""
    src, ctl = start_source("simulated", tmp_path, memory="64M", working_set="16M",
                            rate="200000")
    try:
        with QmpClient(ctl) as client:
            client.command("migrate-set-parameters", **{"max-bandwidth": 1 * MiB,
                                                        "compression": "none"})
            client.command("migrate", uri=f"file:{tmp_path}/slow.pymig")
            second = run_pymig("migrate", "--control", ctl, f"file:{tmp_path}/b.pymig")
            assert second.returncode == 1
            assert "already active" in second.stderr or "already setup" in second.stderr
            assert client.command("query-migrate-parameters")["max-bandwidth"] == 1 * MiB
            client.command("migrate_cancel")
    finally:
        finish(src)
