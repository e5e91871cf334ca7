"""The ``pymig run`` library entry point."""

from __future__ import annotations

import io
import shutil

import pytest

from pymig.guest.build_workloads import assemble
from pymig.guest.runner import make_config, run

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

HELLO = r"""
.intel_syntax noprefix
.code16
.global start
start:
    mov si, offset msg
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  mov dx, 0x510
    mov eax, 0x0304             # power off, exit code 3
    out dx, eax
    hlt
msg: .asciz "hi\n"
.org 510
.byte 0x55, 0xaa
"""


def test_run_shows_serial_output_and_returns_the_exit_code(tmp_path):
    if shutil.which("as") is None:
        pytest.skip("GNU as is not installed")
    (tmp_path / "hello.S").write_text(HELLO)
    assemble(tmp_path / "hello.S", tmp_path / "hello.img", 0x7C00)
    out, lines = io.BytesIO(), []
    config = make_config(image=str(tmp_path / "hello.img"), memory_bytes=16 << 20)
    code = run(config, serial_out=out, serial_file=str(tmp_path / "serial.log"),
               status=lines.append, interval=0.05, duration=20)
    assert code == 3
    assert out.getvalue() == b"hi\n"
    assert (tmp_path / "serial.log").read_bytes() == b"hi\n"
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
