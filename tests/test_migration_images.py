"""A user's own boot sector migrates like a built-in guest: its serial output carries on."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from _childenv import child_env
from _kvm_helpers import build_image
from _migration_helpers import pymig_process, wait_for, wait_for_path
from pymig.qmp import QmpClient

pytestmark = pytest.mark.kvm

# Real mode, no BIOS: count in RAM at 0x7e00 and print "tick NNNN" (hex) over the UART forever.
TICKER = r"""
.intel_syntax noprefix
.code16
.global start
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    mov dx, 0x3f8
next:
    inc word ptr [0x7e00]
    mov si, offset msg
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  mov bx, [0x7e00]
    mov cx, 4
3:  rol bx, 4
    mov al, bl
    and al, 0x0f
    add al, 0x30
    cmp al, 0x39
    jbe 4f
    add al, 7
4:  out dx, al
    loop 3b
    mov al, 10
    out dx, al
    mov ecx, 20000
5:  dec ecx
    jnz 5b
    jmp next
msg: .asciz "tick "
.org 510
.byte 0x55, 0xaa
"""


def ticks(*paths) -> list[int]:
    text = "".join(p.read_text() if p.exists() else "" for p in paths)
    return [int(t, 16) for t in re.findall(r"tick ([0-9A-F]{4})\n", text)]


def test_boot_sector_guest_migrates_and_keeps_counting(tmp_path):
    image, _ = build_image(tmp_path, "ticker", TICKER, 0x7C00)
    src_log, dst_log = tmp_path / "src.log", tmp_path / "dst.log"
    dst_ctl, src_ctl = str(tmp_path / "dst.sock"), str(tmp_path / "src.sock")
    dst = pymig_process("incoming", "tcp:127.0.0.1:0", "--control", dst_ctl, "--quiet",
                        "--serial", str(dst_log), stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
    src = pymig_process("run", "--boot-sector", str(image), "--memory", "16M", "--control",
                        src_ctl, "--quiet", "--serial", str(src_log),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_path(dst_ctl, dst)
        wait_for_path(src_ctl, src)
        wait_for(lambda: len(ticks(src_log)) >= 3, timeout=60, what="the guest to tick")
        with QmpClient(dst_ctl) as client:
            uri = client.command("query-migrate")["socket-address"]
        out = subprocess.run([sys.executable, "-m", "pymig", "migrate", "--control", src_ctl,
                              uri, "--json"], capture_output=True, text=True, timeout=120,
                             env=child_env())
        assert out.returncode == 0, out.stderr
        assert src.wait(30) == 0
        wait_for(lambda: len(ticks(dst_log)) >= 3, timeout=60, what="ticks on the destination")
        # one count, carried on: the destination goes on where the source stopped, even in
        # the middle of a line (the two logs joined read as one)
        both = ticks(src_log, dst_log)
        assert both == list(range(1, len(both) + 1))
        assert both[-1] > ticks(src_log)[-1] + 1
        with QmpClient(dst_ctl) as client:
            client.command("quit")
        assert dst.wait(30) == 0
    finally:
        for proc in (src, dst):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
