"""Helpers for the KVM tests: configurations, guests built from test images, a subprocess
destination.  What the built-in workloads should leave in RAM is checked with
:mod:`pymig.guest.workloads`, as for the simulated guest.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pymig.guest.base import GuestConfig
from pymig.guest.build_workloads import assemble
from pymig.guest.kvm_guest import KvmGuest

from _childenv import child_env

WAIT_S = 30.0


# --- the writer guest: writes exactly the pages the host lists --------------------------------
# 64-bit, CPL 3 (native under kvm_pvm).  It spins reading a command page at 0x9000; when the
# host bumps ``go`` it increments one byte in each page listed in the command table, then
# stores ``done = go``.  A round dirties exactly the listed pages plus the command page; it has
# no stack traffic and its code page is mapped read-only.

CMD = 0x9000
CMD_PAGE = CMD >> 12
TABLE_MAX = (4096 - 0x108) // 8

WRITER_SOURCE = """
.intel_syntax noprefix
.code64
.global start
start:
    mov rbx, 0x9000
wait:
    mov rax, qword ptr [rbx]
    cmp rax, qword ptr [rbx + 8]
    jne run
    pause
    jmp wait
run:
    mov rcx, qword ptr [rbx + 0x100]
    lea rsi, [rbx + 0x108]
    test rcx, rcx
    jz 2f
1:
    mov rdi, qword ptr [rsi]
    inc byte ptr [rdi]
    add rsi, 8
    dec rcx
    jnz 1b
2:
    mov qword ptr [rbx + 8], rax
    jmp wait
"""


def build_writer(directory: Path) -> Path:
    """Assemble the writer guest into ``directory`` (skips the test without GNU as)."""
    return build_image(directory, "writer", WRITER_SOURCE, 0x8000)[0]


def make_writer_guest(image, memory_bytes=64 << 20, **options) -> KvmGuest:
    config = GuestConfig(kind="kvm", memory_bytes=memory_bytes, workload="image",
                         params={"image": str(image), "kind": "flat64",
                                 "load_address": 0x8000, "stack": 0x7000})
    return KvmGuest.create(config, **options)


def write_round(guest: KvmGuest, gpas: list[int]) -> None:
    """Have the guest write one byte in each page of ``gpas``; returns once it is done."""
    assert len(gpas) <= TABLE_MAX
    go = struct.unpack("<Q", guest.read_phys(CMD, 8))[0] + 1
    guest.write_phys(CMD + 0x100, struct.pack(f"<Q{len(gpas)}Q", len(gpas), *gpas))
    guest.write_phys(CMD, struct.pack("<Q", go))
    wait_for(lambda: struct.unpack("<Q", guest.read_phys(CMD + 8, 8))[0] == go,
             what="the guest to finish its round")


def pages(bitmap: np.ndarray, npages: int) -> set[int]:
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:npages]
    return set(np.flatnonzero(bits).tolist())


def dirty(guest: KvmGuest) -> list[set[int]]:
    return [pages(bm, b.npages) for bm, b in zip(guest.sync_dirty(), guest.ram_blocks)]


# A boot sector that prints a line and the boot drive (DL) over the UART, calls int 10h (no
# BIOS: the iret stub returns) and powers off with exit code 7.
HELLO_BOOT_SECTOR = r"""
.intel_syntax noprefix
.code16
.global start
start:
    cli
    mov bl, dl
    xor ax, ax
    mov ds, ax
    mov si, offset msg
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  mov al, bl
    out dx, al
    int 0x10
    mov dx, 0x510
    mov eax, 0x0704
    out dx, eax
    hlt
msg: .asciz "hello from the boot sector\n"
.org 510
.byte 0x55, 0xaa
"""
HELLO_OUTPUT = b"hello from the boot sector\n\x80"
HELLO_EXIT_CODE = 7


def build_image(directory: Path, name: str, source: str, address: int) -> tuple[Path, bytes]:
    """Assemble ``source`` into ``directory/name.bin`` (skips the test without GNU as)."""
    import pytest

    if shutil.which("as") is None:
        pytest.skip("GNU as is not installed")
    (directory / f"{name}.S").write_text(source)
    return directory / f"{name}.bin", assemble(directory / f"{name}.S",
                                                 directory / f"{name}.bin", address)


def kvm_config(workload: str, params: dict | None = None, *, memory_mib: int = 64,
               vcpus: int = 1) -> GuestConfig:
    return GuestConfig(kind="kvm", memory_bytes=memory_mib << 20, vcpus=vcpus,
                       workload=workload, params=dict(params or {}))


def wait_for(predicate, timeout: float = WAIT_S, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def save_for_destination(guest, state, directory: Path) -> None:
    """Write what a destination process needs: the config, the state, each RAM block."""
    for i, block in enumerate(guest.ram_blocks):
        (directory / f"ram-{i}.bin").write_bytes(block.mem)
    with open(directory / "state.pkl", "wb") as f:
        pickle.dump({"config": guest.config.to_dict(), "state": state}, f)


def run_destination(directory: Path, action: str, timeout: float = 120.0) -> dict:
    """Run ``_kvm_dest.py`` in a fresh process; returns the JSON it prints."""
    script = Path(__file__).with_name("_kvm_dest.py")
    proc = subprocess.run([sys.executable, str(script), str(directory), action],
                          env=child_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"destination failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
