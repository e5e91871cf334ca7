"""The checked-in workload binaries are what their assembly sources build to."""

from __future__ import annotations

import pytest

from pymig.guest import build_workloads
from pymig.guest.builtin import image

pytestmark = pytest.mark.skipif(bool(build_workloads.missing_tools()),
                                reason="GNU binutils (as, ld, objcopy) are not installed")


def test_rebuilding_reproduces_the_checked_in_binaries(tmp_path):
    built = build_workloads.build_all(tmp_path)
    assert set(built) == set(build_workloads.WORKLOADS)
    for name, data in built.items():
        assert data == image(name), f"{name}.bin is stale: rebuild with build_workloads"


def test_check_mode_reports_a_stale_binary(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    build_workloads.build_all(bin_dir)
    (bin_dir / "idle.bin").write_bytes(b"\x90")
    monkeypatch.setattr(build_workloads, "BIN_DIR", bin_dir)
    assert build_workloads.main(["--check"]) == 1
