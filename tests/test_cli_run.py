"""``pymig run`` as a user runs it: serial output live, the dirty rate, exit codes."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

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
def test_status_lines_show_the_guest_write_rate(kind):
    args = ["run", "--workload", "dirtier", "--memory", "32M", "--working-set", "4M",
            "--rate", "5000"] + (["--simulated"] if kind == "simulated" else [])
    lines = status_lines(args, 3)
    rates = [int(m.group(1).replace(",", "")) for m in
             (re.search(r"([\d,]+) writes/s", line) for line in lines) if m]
    # asked 5,000 writes/s: the shown rate is of that order (the host is noisy)
    assert rates and 1_000 < rates[-1] < 20_000, lines


def status_lines(args: list[str], count: int, timeout: float = 60.0,
                 until=None) -> list[str]:
    """The first ``count`` status lines of ``pymig ARGS`` (or the lines up to one for which
    ``until(line)`` is true), then SIGTERM: it must exit 0."""
    proc = pymig_process(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []
    text = ""
    deadline = time.monotonic() + timeout
    try:
        while (until is None and len(lines) < count) or (
                until is not None and not any(until(line) for line in lines)):
            assert time.monotonic() < deadline, f"not enough status lines: {text!r}"
            ready, _, _ = select.select([proc.stderr], [], [], 0.1)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
                assert chunk, f"pymig ended: {text!r}"
                text += chunk
                lines = [line for line in text.splitlines() if re.match(r"\[pymig\]\s+[\d.]+ s", line)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return lines


@pytest.mark.parametrize("args, message", [
    (["--boot-sector", "{img}", "--flat", "{img}"], "give one of --boot-sector"),
    (["--simulated", "--boot-sector", "{img}"], "simulated"),
    (["--workload", "selfcheck", "--working-set", "64M", "--memory", "32M", "--simulated"],
     "do not fit in one of the guest's RAM blocks"),
    (["--disk", "{dir}/missing.img"], "missing.img: No such file or directory"),
    (["--disk", "{img},rw"], "unknown option"),
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
    pattern = r"kB/s to disk\s+blocks written (\d+)\s+passes (\d+)\s+errors (\d+)"

    def two_passes(line: str) -> bool:
        match = re.search(pattern, line)
        return bool(match) and int(match.group(2)) >= 2

    lines = status_lines(["run", "--workload", "diskcheck", "--memory", "16M", "--disk",
                          str(disk), "--disk-working-set", "64K"], 0, until=two_passes)
    match = re.search(pattern, next(line for line in lines if two_passes(line)))
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


# A boot sector that runs on for ever, doing nothing a status line could count
SPIN_BOOT_SECTOR = r"""
.intel_syntax noprefix
.code16
.global start
start:
    jmp start
.org 510
.byte 0x55, 0xaa
"""


@pytest.mark.parametrize("workload, shown, not_shown", [
    ("dirtier", ["writes/s", "rounds"], ["pages/s", "passes", "errors"]),
    ("selfcheck", ["pages stamped/s", "passes", "errors 0"], ["writes/s"]),
    ("idle", [], ["pages/s", "writes/s", "passes", "errors"]),
])
def test_status_lines_show_what_means_something_for_the_workload(workload, shown, not_shown):
    args = ["run", "--simulated", "--workload", workload, "--memory", "32M"] + (
        ["--working-set", "4M", "--rate", "5000"] if workload != "idle" else [])
    last = status_lines(args, 3)[-1]
    for text in shown:
        assert text in last, last
    for text in not_shown:
        assert text not in last, last


@pytest.mark.kvm
def test_status_lines_of_a_boot_sector_show_no_workload_counters(tmp_path):
    image, _ = build_image(tmp_path, "spin", SPIN_BOOT_SECTOR, 0x7C00)
    lines = status_lines(["run", "--boot-sector", str(image), "--memory", "16M"], 3)
    assert all("running" in line for line in lines), lines
    assert not any(word in line for line in lines
                   for word in ("passes", "errors", "pages/s", "writes/s")), lines


def test_a_waiting_destination_says_what_it_waits_for():
    lines = status_lines(["incoming", "tcp:127.0.0.1:0", "--accept-kind", "simulated"], 2)
    assert all(re.search(r"inmigrate\s+waiting for the source on tcp:127\.0\.0\.1:\d+$", line)
               for line in lines), lines
    assert not any("0 B left" in line for line in lines), lines
