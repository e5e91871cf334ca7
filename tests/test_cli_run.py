"""``pymig run`` as a user runs it: serial output live, the dirty rate, exit codes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from _childenv import child_env
from _kvm_helpers import HELLO_BOOT_SECTOR, HELLO_EXIT_CODE, HELLO_OUTPUT, build_image
from _migration_helpers import GUEST_KINDS, pymig_process


def pymig(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "pymig", *args], capture_output=True,
                          timeout=120, env=child_env(), **kwargs)


@pytest.mark.kvm
def test_boot_sector_prints_over_serial_and_its_power_off_code_is_the_exit_code(tmp_path):
    image, _ = build_image(tmp_path, "hello", HELLO_BOOT_SECTOR, 0x7C00)
    serial = tmp_path / "serial.log"
    done = pymig("run", "--boot-sector", str(image), "--memory", "16M", "--serial", str(serial))
    assert done.returncode == HELLO_EXIT_CODE, done.stderr
    assert done.stdout == HELLO_OUTPUT
    assert serial.read_bytes() == HELLO_OUTPUT
    assert b"guest stopped" in done.stderr


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_status_lines_show_the_guest_dirty_rate(kind):
    args = ["run", "--workload", "dirtier", "--memory", "32M", "--working-set", "4M",
            "--rate", "5000"] + (["--simulated"] if kind == "simulated" else [])
    proc = pymig_process(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rates = []
    try:
        for line in proc.stderr:
            match = re.search(r"([\d,]+) pages/s", line)
            if match:
                rates.append(int(match.group(1).replace(",", "")))
            if len(rates) >= 3:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # asked 5,000 pages/s: the shown rate is of that order (the host is noisy)
    assert rates and 1_000 < rates[-1] < 20_000, rates


@pytest.mark.parametrize("args, message", [
    (["--boot-sector", "{img}", "--flat", "{img}"], "give one of --boot-sector"),
    (["--simulated", "--boot-sector", "{img}"], "simulated"),
    (["--workload", "selfcheck", "--working-set", "64M", "--memory", "32M", "--simulated"],
     "do not fit in one of the guest's RAM blocks"),
    (["--disk", "{dir}/missing.img"], "missing.img: No such file or directory"),
    (["--disk", "{img},rw"], "unknown option"),
    (["--disk", "{img}", "--simulated"], "the simulated guest has no disk"),
    (["--workload", "diskcheck"], "diskcheck needs a disk (--disk PATH)"),
    (["--workload", "diskcheck", "--disk", "{img}", "--disk-working-set", "1M"],
     "does not fit on"),
])
def test_bad_options_are_refused_with_the_reason(tmp_path, args, message):
    image = tmp_path / "img.bin"
    image.write_bytes(bytes(510) + b"\x55\xaa")
    done = pymig("run", *[a.format(img=image, dir=tmp_path) for a in args], text=True)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.kvm
def test_diskcheck_shows_its_progress_on_the_disk(tmp_path):
    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    proc = pymig_process("run", "--workload", "diskcheck", "--memory", "16M", "--disk",
                         str(disk), "--disk-working-set", "64K", stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"kB/s to disk\s+blocks (\d+)\s+passes (\d+)\s+errors (\d+)",
                              line)
            if match and int(match.group(2)) >= 2:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert match and int(match.group(1)) >= 32 and match.group(3) == "0", lines


@pytest.mark.kvm
def test_an_image_that_shrinks_under_diskcheck_is_a_disk_error_and_a_line_for_the_operator(
        tmp_path):
    import os
    import time

    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    proc = pymig_process("run", "--workload", "diskcheck", "--memory", "16M", "--disk",
                         str(disk), "--disk-working-set", "64K", stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"passes [1-9]", line):
                break
        # The guest's writes grow the file again; cut it for a while, so that its reads
        # meet the end of the file (not only blocks of zeroes, which are data errors).
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            os.truncate(disk, 4096)
            time.sleep(0.02)
        deadline = time.monotonic() + 60
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"errors [1-9]", line) or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # the process carries on and ends as asked
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert re.search(rf"disk 0 \({disk}\): read at sector \d+ failed", text), text
    assert "shrank" in text and "the guest sees ERR + UNC" in text
    assert re.search(r"errors [1-9]", text) and "Traceback" not in text


def test_a_size_that_does_not_parse_is_refused():
    done = pymig("run", "--memory", "12X", text=True)
    assert done.returncode == 2
    assert "is not a size" in done.stderr


@pytest.mark.parametrize("command", [["run", "--memory", "16M"], ["incoming", "tcp:127.0.0.1:0"]])
def test_a_bad_packet_overlap_setting_is_refused_before_any_guest(monkeypatch, command):
    # refused at start-up: a destination would otherwise meet it only once a migration came
    monkeypatch.setenv("PYMIG_PACKET_OVERLAP", "sometimes")
    done = pymig(*command, text=True)
    assert done.returncode == 1
    assert "PYMIG_PACKET_OVERLAP='sometimes': expected on, off or auto" in done.stderr
    assert "Traceback" not in done.stderr
