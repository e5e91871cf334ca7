"""User images on KVM: a boot sector in real mode, flat binaries in protected and long mode."""

from __future__ import annotations

import pytest
from _kvm_helpers import HELLO_BOOT_SECTOR, HELLO_EXIT_CODE, HELLO_OUTPUT, build_image, wait_for

from pymig.errors import GuestError
from pymig.guest.base import GuestConfig
from pymig.guest.kvm_guest import KvmGuest
from pymig.guest.loader import ImageError
from pymig.kvm.devices import SerialState

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

FLAT32 = r"""
.intel_syntax noprefix
.code32
.global start
start:
    mov dx, 0x3fb               # LCR: set DLAB, write the divisor, clear DLAB
    mov al, 0x83
    out dx, al
    mov dx, 0x3f8
    mov al, 0x01
    out dx, al
    mov dx, 0x3fb
    mov al, 0x03
    out dx, al
    mov dx, 0x3ff               # scratch register
    mov al, 0x5a
    out dx, al
    mov dx, 0x3fd               # LSR must say transmitter empty
    in al, dx
    mov byte ptr [0x9000], al
    in al, 0x80                 # unemulated port: all-ones
    mov byte ptr [0x9001], al
    mov eax, dword ptr [0xe0000000]   # unbacked memory (MMIO): all-ones
    mov dword ptr [0x9004], eax
    mov esi, offset msg
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  mov dx, 0x510
    mov eax, 0x0004             # power off, exit code 0
    out dx, eax
    hlt
msg: .asciz "flat32 ok\n"
"""

# 64-bit code at CPL 3 (IOPL 0): the ports come through the TSS's I/O permission bitmap.
FLAT64_PORTS = r"""
.intel_syntax noprefix
.code64
.global start
start:
    lea rsi, [rip + msg]
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  mov dx, 0x510
    in eax, dx                  # the control port answers PMIG
    mov dword ptr [0x9000], eax
    mov eax, 0x0504             # power off, exit code 5
    out dx, eax
3:  jmp 3b
msg: .asciz "flat64 ok\n"
"""

TRIPLE_FAULT = """
.intel_syntax noprefix
.code32
.global start
start:
    ud2                         # no IDT: #UD -> #GP -> #DF -> triple fault
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    return lambda name, source, address: build_image(d, name, source, address)


def image_guest(path, kind, **params) -> KvmGuest:
    config = GuestConfig(kind="kvm", memory_bytes=16 << 20, workload="image",
                         params={"image": str(path), "kind": kind, **params})
    return KvmGuest.create(config)


def test_boot_sector_runs_in_real_mode_and_prints_over_the_uart(build):
    path, image = build("boot", HELLO_BOOT_SECTOR, 0x7C00)
    assert len(image) == 512
    with image_guest(path, "bootsector") as guest:
        guest.start()
        assert guest.wait(30) == "shutdown"
        assert guest.runtime.exit_code == HELLO_EXIT_CODE
        assert guest.console.data() == HELLO_OUTPUT


def test_flat_binary_in_protected_mode_and_device_state(build):
    path, _ = build("flat32", FLAT32, 0x100000)
    with image_guest(path, "flat", load_address=0x100000) as guest:
        guest.start()
        assert guest.wait(30) == "shutdown"
        assert guest.console.text() == "flat32 ok\n"
        assert guest.read_phys(0x9000, 2) == b"\x60\xff"
        assert guest.read_phys(0x9004, 4) == b"\xff" * 4
        serial = guest.save_state().devices["serial"]
        assert serial == SerialState(ier=0, lcr=0x03, mcr=0, scr=0x5A, dll=0x01, dlm=0, fcr=0)


def test_flat64_binary_at_cpl3_uses_the_uart_and_the_control_port(build):
    path, _ = build("flat64ports", FLAT64_PORTS, 0x100000)
    with image_guest(path, "flat64", load_address=0x100000, stack=0x7000) as guest:
        guest.start()
        assert guest.wait(30) == "shutdown"
        assert guest.console.text() == "flat64 ok\n"
        assert guest.read_phys(0x9000, 4) == b"PMIG"
        assert guest.runtime.exit_code == 5
        cpu = guest.save_state().cpus[0]
        assert cpu.sregs.cs.dpl == 3 and cpu.regs.rflags & 0x3000 == 0  # CPL 3, IOPL 0


def test_a_triple_fault_stops_the_guest_with_guest_error(build):
    path, _ = build("ud2", TRIPLE_FAULT, 0x100000)
    with image_guest(path, "flat", load_address=0x100000) as guest:
        guest.start()
        with pytest.raises(GuestError, match="triple fault"):
            guest.wait(30)
        assert guest.status == "error"
        with pytest.raises(GuestError):
            guest.resume()


def test_boot_sector_must_be_512_bytes(tmp_path):
    path = tmp_path / "short.img"
    path.write_bytes(b"\xf4" * 100)
    with pytest.raises(ImageError, match="512"):
        image_guest(path, "bootsector")


def test_boot_sector_without_signature_warns(tmp_path):
    path = tmp_path / "unsigned.img"
    path.write_bytes(b"\xfa\xf4" + bytes(510))
    with pytest.warns(UserWarning, match="0x55AA"):
        guest = image_guest(path, "bootsector")
    guest.close()


def test_destination_never_reads_the_image(tmp_path):
    config = GuestConfig(kind="kvm", memory_bytes=16 << 20, workload="image",
                         params={"image": str(tmp_path / "gone.img"), "kind": "bootsector"})
    with KvmGuest.create(config, incoming=True) as guest:
        assert guest.status == "created"
        assert all(int(b.touched().sum()) == 0 for b in guest.ram_blocks)


def test_boot_sector_guest_pauses_and_resumes_while_halted(build):
    source = ".code16\n.global start\nstart:\n cli\n1: hlt\n jmp 1b\n.org 510\n.byte 0x55, 0xaa\n"
    path, _ = build("halt16", source, 0x7C00)
    with image_guest(path, "bootsector") as guest:
        guest.start()
        wait_for(lambda: guest.runtime.threads[0].parked is False, what="the vCPU to run")
        guest.pause()
        guest.resume()
        guest.pause()
        assert guest.status == "paused"


def test_an_instruction_kvm_cannot_run_stops_the_guest_without_hanging(build):
    # kvm_pvm emulates 32-bit code, and its emulator has no PINSRD: KVM_EXIT_INTERNAL_ERROR.
    # Where the CPU runs it natively, the ud2 after it triple-faults instead.
    source = ".intel_syntax noprefix\n.code32\n.global start\nstart:\n pinsrd xmm0, eax, 1\n ud2\n"
    path, _ = build("pinsrd", source, 0x100000)
    with image_guest(path, "flat", load_address=0x100000) as guest:
        guest.start()
        with pytest.raises(GuestError, match="KVM_EXIT_INTERNAL_ERROR|triple fault"):
            guest.wait(30)
