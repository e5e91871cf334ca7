"""What the command line tells its user: figures that say what they count, errors that lead
with their cause in one line of pymig's own words (never a traceback), and where the guest
is at the end.  Real processes throughout."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess

import pytest

from _childenv import child_env
from _kvm_helpers import HELLO_BOOT_SECTOR, HELLO_EXIT_CODE, build_image
from _migration_helpers import (finish, guest_passes, pymig_process, run_pymig,
                                start_destination, start_source, wait_for)
from pymig import stream
from pymig.qmp import QmpClient
from pymig.transport import FdChannel

WAIT_S = 60.0
#: What shows that an error or a warning escaped as Python's rather than in pymig's words
RAW = ("Traceback", "Exception in thread", 'File "', "[Errno", "UserWarning",
       "RuntimeWarning")


def assert_clean(stderr: str) -> None:
    """No traceback, no raw Python error or warning, no log record in its bare format."""
    for line in stderr.splitlines():
        assert not any(marker in line for marker in RAW), stderr
        assert not re.match(r"^(WARNING|ERROR|DEBUG|INFO):", line), stderr


# -- figures ---------------------------------------------------------------------------------

def test_the_summary_counts_wire_bytes_and_page_bytes_and_their_ratio(tmp_path):
    src, ctl = start_source("simulated", tmp_path, memory="64M", working_set="16M",
                            rate="1000")
    try:
        wait_for(lambda: guest_passes(ctl) >= 1, timeout=WAIT_S, what="a first pass")
        done = run_pymig("migrate", "--control", ctl, f"file:{tmp_path}/s.pymig")
        assert done.returncode == 0, done.stderr
        rows = {label: value.strip() for label, value in
                re.findall(r"^(\S.*?)\s{2,}(.*)$", done.stdout, re.MULTILINE)}
        wire = _bytes(rows["transferred (wire bytes)"])
        pages_text = rows["pages moved"]
        pages = _bytes(pages_text)
        count = int(re.search(r"\(([\d,]+) pages\)", pages_text).group(1).replace(",", ""))
        assert pages == pytest.approx(count * 4096, rel=0.01)
        ratio = float(re.match(r"([\d,.]+)x \(pages moved / wire bytes\)$",
                               rows["compression"]).group(1).replace(",", ""))
        assert ratio == pytest.approx(pages / wire, rel=0.05)
        assert ratio > 2  # a selfcheck page is three words and zeros: LZ4 takes it small
        assert re.match(r"[\d,]+ MB/s \([\d,]+ Mbit/s\)$", rows["throughput (wire)"]), rows
        assert re.match(r"[\d,]+ MB/s \([\d,]+ pages/s\)$", rows["throughput (pages)"]), rows
        assert re.match(r"[\d,]+ pages dirtied/s", rows["dirty rate"]), rows["dirty rate"]
        assert "snapshot complete; the guest stays at the source, running" in done.stderr
    finally:
        finish(src)


def _bytes(text: str) -> float:
    number, unit = re.match(r"([\d.]+) (B|KiB|MiB|GiB)", text).groups()
    return float(number) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


# -- mistakes --------------------------------------------------------------------------------

@pytest.fixture
def setting(tmp_path):
    """Files of the wrong kind, a port something listens on and one nothing does; and, made
    when first asked for (``setting.src``, ``setting.dst``), a running source and a
    destination waiting, each behind its control socket."""
    return Setting(tmp_path)


class Setting(dict):
    def __init__(self, tmp):
        super().__init__()
        self.procs: list = []
        busy = socket.create_server(("127.0.0.1", 0))
        closed = socket.create_server(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        garbage = tmp / "garbage.bin"
        garbage.write_bytes(b"x" * 512)
        not_a_trace = tmp / "not-a-trace.jsonl"
        not_a_trace.write_text('{"a": 1}\n')
        trace = tmp / "t.jsonl"
        trace.write_text(json.dumps({
            "time": 0.1, "iteration": 1, "dirty_pages": 1, "pages_sent": 1, "bytes": 4096,
            "bandwidth": 1e6, "stopped_bandwidth": 1e6, "expected_downtime": 3,
            "pending_bytes": 4096, "throttle_pct": 0, "dirty_rate": 10.0,
            "page_size": 4096}) + "\n")
        self._busy = busy
        self.update(tmp=tmp, busy=busy.getsockname()[1], closed=closed_port, garbage=garbage,
                    not_a_trace=not_a_trace, trace=trace)

    def __missing__(self, key):
        tmp = self["tmp"]
        if key == "src":
            proc, self["src"] = start_source("simulated", tmp, memory="32M", working_set="4M",
                                             rate="100")
            self.procs.append(proc)
        elif key == "dst":
            proc, self["dst"], _ = start_destination(tmp, "tcp:127.0.0.1:0")
            self.procs.append(proc)
        else:
            raise KeyError(key)
        return self[key]

    def close(self) -> None:
        self._busy.close()
        finish(*self.procs)


# (command line, what the one line saying why must hold); {name}s come from the setting
MISTAKES = [
    (["run", "--simulated", "--memory", "10T"], "not enough memory for 10 TiB of guest RAM"),
    (["run", "--simulated", "--memory", "12X"], "'12X' is not a size"),
    (["run", "--simulated", "--control", "{src}"], "another process is listening on"),
    (["run", "--simulated", "--control", "/nonexistent/dir/c.sock"],
     "cannot serve the control socket: /nonexistent/dir/c.sock: No such file or directory"),
    (["run", "--simulated", "--serial", "/nonexistent/dir/s.log"],
     "/nonexistent/dir/s.log: No such file or directory"),
    (["run", "--simulated", "--vcpus", "99"], "1 to 8 vCPUs"),
    (["run", "--flat", "{garbage}", "--load-address", "zz"], "'zz' is not an address"),
    (["run", "--boot-sector", "/nonexistent.img"], "does not exist"),
    (["run", "--disk", "/nonexistent.img"], "No such file or directory"),
    (["run", "--simulated", "--control-tcp", "{busy}"], "Address already in use"),
    (["incoming", "tcp:127.0.0.1:{busy}"], "EADDRINUSE"),
    (["incoming", "tcp:127.0.0.1:0", "--control", "/nonexistent/dir/d.sock"],
     "cannot serve the control socket: /nonexistent/dir/d.sock: No such file or directory"),
    (["incoming", "unix:/nonexistent/dir/m.sock"], "ENOENT"),
    (["incoming", "bogus:x"], "unknown scheme 'bogus'"),
    (["incoming", "tcp:127.0.0.1:99999"], "port 99999 is out of range"),
    (["incoming", "file:/nonexistent.pymig"], "ENOENT"),
    (["incoming", "file:{garbage}"], "not a pymig migration stream"),
    (["incoming", "defer"], "needs --control"),
    (["incoming", "tcp:127.0.0.1:0", "--disk", "/nonexistent.img"], "no such file"),
    (["incoming", "tcp:127.0.0.1:0", "--memory", "10T", "--mem-prealloc"],
     "not enough memory for 10 TiB of guest RAM"),
    (["incoming", "tcp:127.0.0.1:0", "--accept-kind", "xen"], "not 'xen'"),
    (["incoming", "tcp:127.0.0.1:0", "--serial", "/nonexistent/dir/s.log"],
     "cannot append the guest's serial output to /nonexistent/dir/s.log"),
    (["migrate", "--control", "{src}", "bogus:x"], "bad migration URI 'bogus:x'"),
    (["migrate", "--control", "{src}", "tcp:127.0.0.1:{closed}"], "ECONNREFUSED"),
    (["migrate", "--control", "{src}", "tcp:no-such-host.invalid:4444"], "cannot resolve"),
    (["migrate", "--control", "{src}", "unix:/nonexistent/m.sock"], "ENOENT"),
    (["migrate", "--control", "{src}", "file:/nonexistent/dir/x.pymig"], "ENOENT"),
    (["migrate", "--control", "{src}", "exec:false"], "exited with status 1"),
    (["migrate", "--control", "{src}", "exec:no-such-command-here"], "exited with status 127"),
    (["migrate", "--control", "{src}", "file:{tmp}/x.pymig", "--trace",
      "/nonexistent/dir/t.jsonl"], "cannot write the trace /nonexistent/dir/t.jsonl"),
    (["migrate", "--control", "{src}", "file:{tmp}/x.pymig", "--downtime-limit", "0"],
     "0 is not in the range"),
    (["migrate", "--control", "/nonexistent.sock", "file:x"],
     "cannot reach the control socket"),
    (["migrate", "--control", "{dst}", "file:{tmp}/x.pymig"], "no guest to migrate"),
    (["migrate", "--control", "tcp:127.0.0.1:{closed}", "file:x"], "token"),
    (["qmp", "--control", "{src}", "no-such-command"], "CommandNotFound"),
    (["qmp", "--control", "{src}", "migrate", "uri=bogus"], "bad migration URI 'bogus'"),
    (["qmp", "--control", "{src}", "migrate-set-parameters", "max-bandwidth"],
     "is not NAME=VALUE"),
    (["analyze", "/nonexistent.pymig"], "cannot read /nonexistent.pymig"),
    (["plot", "{trace}", "-o", "/nonexistent/dir/x.png"],
     "cannot write /nonexistent/dir/x.png: No such file or directory"),
    (["plot", "{not_a_trace}", "-o", "{tmp}/x.png"], "is not a pymig trace record"),
    (["plot", "{garbage}", "-o", "{tmp}/x.png"], "the trace has no records to plot"),
]


@pytest.mark.parametrize("args, reason", MISTAKES,
                         ids=[" ".join(args)[:60] for args, _ in MISTAKES])
def test_a_mistake_gets_one_line_saying_why(setting, args, reason):
    try:
        argv = [a.format_map(setting) for a in args]
        done = run_pymig(*argv, timeout=WAIT_S)
    finally:
        setting.close()
    assert done.returncode != 0, (argv, done.stdout, done.stderr)
    assert_clean(done.stderr)
    lines = [line for line in done.stderr.splitlines() if reason in line]
    assert lines, (argv, done.stderr)
    # pymig's errors are "pymig: ...", a destination's end "[pymig] ...", click's usage errors
    # "Error: ..."
    assert re.match(r"^(pymig: |\[pymig\] |Error: )", lines[0]), done.stderr
    assert "GenericError" not in done.stderr


def test_the_source_terminal_stays_clean_and_usable_after_failed_migrations(setting):
    """Migrations that fail in every way leave nothing raw on the source's terminal, and
    none leaves the source stuck: a plain migration works after them."""
    try:
        ctl, tmp = setting["src"], setting["tmp"]
        for uri, *flags in (["exec:false"], ["exec:no-such-command-here"],
                            [f"tcp:127.0.0.1:{setting['closed']}"],
                            [f"file:{tmp}/x.pymig", "--trace", "/nonexistent/dir/t.jsonl"],
                            ["file:/nonexistent/dir/x.pymig"]):
            failed = run_pymig("migrate", "--control", ctl, uri, *flags, timeout=WAIT_S)
            assert failed.returncode == 1, failed.stderr
        done = run_pymig("migrate", "--control", ctl, f"file:{tmp}/after.pymig",
                         timeout=WAIT_S)
        assert done.returncode == 0, done.stderr
        src = setting.procs[0]
        src.terminate()
        assert src.wait(30) == 0
        err = src.stderr.read().decode(errors="replace")
        assert_clean(err)
        assert "migration cleanup" not in err, err
    finally:
        setting.close()


@pytest.mark.kvm
def test_a_boot_sector_without_its_signature_is_a_warning_in_pymigs_words(tmp_path):
    image, data = build_image(tmp_path, "hello", HELLO_BOOT_SECTOR, 0x7C00)
    unsigned = tmp_path / "unsigned.bin"
    unsigned.write_bytes(data[:510] + b"\0\0")
    done = subprocess.run([*_pymig(), "run", "--boot-sector", str(unsigned), "--memory",
                           "16M"], capture_output=True, timeout=WAIT_S, env=child_env(),
                          stdin=subprocess.DEVNULL)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == HELLO_EXIT_CODE, err
    assert "pymig: warning: boot sector has no 0x55AA signature" in err
    assert "UserWarning" not in err and ".py:" not in err, err


def _pymig() -> list[str]:
    import sys

    return [sys.executable, "-m", "pymig"]


# -- errors lead with their cause -------------------------------------------------------------

def test_a_migration_that_fails_before_it_starts_says_why_first_and_shows_no_table(setting):
    try:
        done = run_pymig("migrate", "--control", str(setting["src"]),
                         f"tcp:127.0.0.1:{setting['closed']}", timeout=WAIT_S)
    finally:
        setting.close()
    assert done.returncode == 1
    assert done.stdout == ""  # no table of zeros
    lines = done.stderr.splitlines()
    assert lines[0].startswith("pymig: migrating to tcp:127.0.0.1:"), lines
    assert lines[1].startswith("pymig: migration failed: connecting to tcp:127.0.0.1:"), lines
    assert "ECONNREFUSED" in lines[1]
    assert lines[-1] == "pymig: the guest stays at the source, running", lines


def test_incoming_and_analyze_name_the_same_offset_for_a_damaged_packet(tmp_path):
    src, ctl = start_source("simulated", tmp_path, memory="32M", working_set="4M", rate="100")
    try:
        wait_for(lambda: guest_passes(ctl) >= 1, timeout=WAIT_S, what="a first pass")
        done = run_pymig("migrate", "--control", ctl, f"file:{tmp_path}/s.pymig")
        assert done.returncode == 0, done.stderr
    finally:
        finish(src)
    snapshot = tmp_path / "s.pymig"
    data = bytearray(snapshot.read_bytes())
    payload = _ram_packet_offset(snapshot, 3)
    data[payload + 24] ^= 0xFF  # a byte of the packet's checksum field
    damaged = tmp_path / "damaged.pymig"
    damaged.write_bytes(data)

    analyzed = run_pymig("analyze", str(damaged), "--json")
    first = json.loads(analyzed.stdout)["problems"][0]["offset"]
    restored = run_pymig("incoming", f"file:{damaged}", "--accept-kind", "simulated",
                         timeout=WAIT_S)
    assert restored.returncode == 1
    said = re.search(r"incoming migration failed: \w+ at byte (\d+): checksum",
                     restored.stderr)
    assert said, restored.stderr
    assert int(said.group(1)) == first == payload + 24


def _ram_packet_offset(path, number: int) -> int:
    """Where the payload of the ``number``-th RAM PART record of the stream at ``path``
    starts."""
    fd = os.open(path, os.O_RDONLY)
    with FdChannel(fd, str(path), writable=False) as channel:
        reader = stream.StreamReader(channel)
        reader.read_header()
        seen = 0
        while True:
            record = reader.next_record()
            if record.type == stream.RecordType.PART:
                seen += 1
                if seen == number:
                    return reader.offset
            if record.payload_len:
                reader.skip_payload()


# -- where the guest is, and smaller things -----------------------------------------------------

def test_a_migrated_away_source_says_so_and_a_restore_says_restoring(tmp_path):
    ctl = str(tmp_path / "src.sock")
    src = pymig_process("run", "--simulated", "--workload", "selfcheck", "--memory", "32M",
                        "--working-set", "4M", "--rate", "100", "--control", ctl,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dst, _, bound = start_destination(tmp_path)
    try:
        wait_for(lambda: os.path.exists(ctl), timeout=WAIT_S, what="the source")
        done = run_pymig("migrate", "--control", ctl, bound, timeout=WAIT_S)
        assert done.returncode == 0, done.stderr
        assert "the guest now runs at the destination; the source process quits" \
            in done.stderr
        assert src.wait(WAIT_S) == 0
        assert "[pymig] the guest now runs at the destination; this process exits" in \
            src.stderr.read().decode()
        with QmpClient(str(tmp_path / "dst.sock")) as client:
            client.command("migrate", uri=f"file:{tmp_path}/s.pymig")
            wait_for(lambda: client.command("query-migrate")["status"] == "completed",
                     timeout=WAIT_S, what="the snapshot")
    finally:
        finish(src, dst)
    restore = pymig_process("incoming", f"file:{tmp_path}/s.pymig", "--accept-kind",
                            "simulated", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        line = restore.stderr.readline().decode()
        assert line == f"[pymig] restoring file:{tmp_path}/s.pymig\n", line
    finally:
        finish(restore)


def test_the_qmp_examples_do_not_wrap_inside_a_parameter():
    done = subprocess.run([*_pymig(), "qmp", "--help"], capture_output=True, text=True,
                          timeout=WAIT_S, env=child_env(COLUMNS="80"))
    assert done.returncode == 0
    assert "migrate-set-parameters max-bandwidth=100000000" in done.stdout, done.stdout
    assert "migrate-incoming uri=tcp:0.0.0.0:4444" in done.stdout
    assert all(len(line) <= 80 for line in done.stdout.splitlines()), done.stdout


def test_shell_completion_is_click_s_and_is_told():
    import shutil

    pymig = shutil.which("pymig", path=os.path.dirname(_pymig()[0]))
    assert pymig, "the pymig script is installed next to this interpreter"
    script = subprocess.run([pymig], capture_output=True, text=True, timeout=WAIT_S,
                            env=child_env(_PYMIG_COMPLETE="bash_source"))
    assert "complete -o nosort -F _pymig_completion pymig" in script.stdout, script.stdout
    words = subprocess.run([pymig], capture_output=True, text=True, timeout=WAIT_S,
                           env=child_env(_PYMIG_COMPLETE="bash_complete",
                                         COMP_WORDS="pymig mig", COMP_CWORD="1"))
    assert "plain,migrate" in words.stdout.splitlines(), words.stdout
    told = subprocess.run([pymig, "--help"], capture_output=True, text=True, timeout=WAIT_S,
                          env=child_env())
    assert "_PYMIG_COMPLETE=bash_source pymig" in told.stdout
    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    assert "_PYMIG_COMPLETE=bash_source pymig" in open(readme, encoding="utf-8").read()
