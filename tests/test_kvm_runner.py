"""The ``pymig run`` library entry point."""

from __future__ import annotations

import io

import pytest
from _kvm_helpers import HELLO_BOOT_SECTOR, HELLO_EXIT_CODE, HELLO_OUTPUT, build_image

from pymig.guest import make_config
from pymig.guest.runner import run

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

def test_run_shows_serial_output_and_returns_the_exit_code(tmp_path):
    image, _ = build_image(tmp_path, "hello", HELLO_BOOT_SECTOR, 0x7C00)
    out, lines = io.BytesIO(), []
    config = make_config(boot_sector=image, memory_bytes=16 << 20)
    code = run(config, serial_out=out, serial_file=str(tmp_path / "serial.log"),
               status=lines.append, interval=0.05, duration=20)
    assert code == HELLO_EXIT_CODE
    assert out.getvalue() == HELLO_OUTPUT
    assert (tmp_path / "serial.log").read_bytes() == HELLO_OUTPUT
    assert "powered off" in lines[-1]


@pytest.mark.parametrize("dirty_log", [False, True])
def test_run_reports_the_dirty_rate_until_the_duration_ends(dirty_log):
    lines = []
    config = make_config(workload="dirtier", memory_bytes=32 << 20,
                         params={"working_set_bytes": 4 << 20, "rate_pages_per_s": 5000})
    code = run(config, serial_out=io.BytesIO(), status=lines.append, interval=0.1,
               duration=0.35, dirty_log=dirty_log)
    assert code == 0
    samples = [line for line in lines if "pages/s" in line]
    assert samples and all(("dirty log" in s) == dirty_log for s in samples)


def test_parse_params_reads_numbers_and_words():
    from pymig.guest.runner import parse_params

    assert parse_params(["rate_pages_per_s=20000", "working_set_bytes=0x400000",
                         "hot_share=0.8", "pattern=hotspot"]) == {
        "rate_pages_per_s": 20000, "working_set_bytes": 0x400000, "hot_share": 0.8,
        "pattern": "hotspot"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_params(["oops"])
