"""calc-dirty-rate and query-dirty-rate through the control socket (and once through QEMU's own
client, qemu.qmp), ``pymig dirtyrate`` against guest processes, and the working-set plot."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient

from _control_helpers import pair  # noqa: F401 - fixture
from _control_helpers import WAIT_S, serve_guest, start_slow_migration, wait_status
from _migration_helpers import (GUEST_KINDS, finish, guest_config, pymig_process, run_pymig,
                                running_guest, wait_for, wait_for_path)
from pymig.dirtyrate import DirtyRateConfig, DirtyRateMeasurement
from pymig.plot import WINDOW_LABEL, plot_working_set
from pymig.qmp import QmpError

MiB = 1 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIRTIER = {"workload": "dirtier", "memory": 64 * MiB, "working_set": 16 * MiB, "rate": 20_000}


def measured(client, unit: str = "millisecond") -> dict:
    answer: dict = {}

    def done() -> bool:
        nonlocal answer
        answer = client.command("query-dirty-rate", **{"calc-time-unit": unit})
        return answer["status"] == "measured"

    wait_for(done, timeout=WAIT_S, interval=0.02, what="the measurement")
    return answer


@pytest.fixture
def dirtier(tmp_path):
    served = serve_guest(tmp_path, **DIRTIER)
    yield served
    served.close()


def test_nothing_measured_yet(dirtier):
    client = dirtier.client()
    assert client.command("query-dirty-rate") == {
        "status": "unstarted", "start-time": 0, "calc-time": 0, "calc-time-unit": "second",
        "sample-pages": 0, "mode": "page-sampling"}
    assert client.command("query-dirty-rate", **{"calc-time-unit": "millisecond"})[
        "calc-time-unit"] == "millisecond"


def test_a_measurement_through_the_control_socket(dirtier):
    client = dirtier.client()
    started = time.time()
    assert client.command("calc-dirty-rate", **{"calc-time": 300, "calc-time-unit": "millisecond",
                                                "mode": "dirty-bitmap"}) == {}
    answer = client.command("query-dirty-rate")
    assert answer["status"] == "measuring" and answer["mode"] == "dirty-bitmap"
    assert "dirty-rate" not in answer
    with pytest.raises(QmpError, match="the dirty rate is already being measured"):
        client.command("calc-dirty-rate", **{"calc-time": 1})
    answer = measured(client)
    assert 300 <= answer["calc-time"] < 1000 and answer["calc-time-unit"] == "millisecond"
    assert abs(answer["start-time"] - started) <= 5
    assert answer["sample-pages"] == 0
    assert answer["dirty-rate"] > 0 and answer["write-rate-pages"] > 0
    assert answer["working-set"]["curve"] and answer["guest-cost"]["before"] > 0
    # QEMU reports calc-time rounded down to the unit asked for
    assert client.command("query-dirty-rate")["calc-time"] == answer["calc-time"] // 1000 == 0

    client.command("calc-dirty-rate", **{"calc-time": 1, "sample-pages": 256})
    answer = measured(client, "second")
    assert (answer["mode"], answer["sample-pages"], answer["calc-time"]) == \
        ("page-sampling", 256, 1)
    assert answer["sampled-pages"] == 256 * 64 // 1024  # 64 MiB of guest RAM


@pytest.mark.parametrize("arguments, words", [
    ({}, "Parameter 'calc-time' is missing"),
    ({"calc-time": "1"}, "Invalid parameter type for 'calc-time', expected: integer"),
    ({"calc-time": 1, "bogus": 1}, "'bogus' is unexpected"),
    ({"calc-time": 61}, "Calculation time is out of range [50ms, 60000ms]."),
    ({"calc-time": 1, "mode": "dirty-bitmap", "sample-pages": 512},
     "sample-pages is used only in page-sampling mode"),
    ({"calc-time": 1, "calc-time-unit": "hour"}, "calc-time-unit"),
])
def test_bad_arguments_are_refused_and_nothing_starts(dirtier, arguments, words):
    client = dirtier.client()
    with pytest.raises(QmpError) as caught:
        client.command("calc-dirty-rate", **arguments)
    assert caught.value.klass == "GenericError" and words in caught.value.desc
    assert client.command("query-dirty-rate")["status"] == "unstarted"


@pytest.mark.kvm
def test_dirty_ring_is_refused_on_a_kvm_guest_without_one(tmp_path):
    served = serve_guest(tmp_path, kind="kvm", **DIRTIER)
    try:
        client = served.client()
        with pytest.raises(QmpError) as caught:
            client.command("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-ring"})
        assert "--dirty-ring" in caught.value.desc and "dirty-bitmap" in caught.value.desc
        assert client.command("query-dirty-rate")["status"] == "unstarted"
    finally:
        served.close()


def test_a_measurement_during_a_migration(pair, tmp_path):
    """Both at once, as QEMU allows: the measurement sees the guest's writes, the migration
    goes on."""
    src, dst = pair
    client, target = src.client(), dst.client()
    uri = target.command("migrate-incoming", uri=f"unix:{tmp_path}/m.sock")["uri"]
    start_slow_migration(client, uri)
    client.command("calc-dirty-rate", **{"calc-time": 500, "calc-time-unit": "millisecond",
                                         "mode": "dirty-bitmap"})
    answer = measured(client)
    assert answer["dirty-pages"] > 0 and "error-desc" not in answer
    assert client.command("query-migrate")["status"] == "active"
    client.command("migrate_cancel")
    wait_status(client, "cancelled")


def test_quitting_ends_a_long_measurement(tmp_path):
    served = serve_guest(tmp_path, **DIRTIER)
    client = served.client()
    client.command("calc-dirty-rate", **{"calc-time": 60, "mode": "dirty-bitmap"})
    measurement = served.session.dirty_rate
    started = time.monotonic()
    served.close()
    assert time.monotonic() - started < 20
    assert measurement.status == "measured" and "cancelled" in measurement.error


# -- QEMU's own client ------------------------------------------------------------------------

async def measure_with_qemu_qmp(path: str) -> dict:
    client = QMPClient("pymig")
    await client.connect(path)
    try:
        with pytest.raises(ExecuteError) as caught:
            await client.execute("calc-dirty-rate", {"calc-time": 0})
        assert caught.value.error_class == "GenericError"
        assert await client.execute("calc-dirty-rate", {
            "calc-time": 200, "calc-time-unit": "millisecond", "mode": "dirty-bitmap"}) == {}
        deadline = time.monotonic() + WAIT_S
        while True:
            info = await client.execute("query-dirty-rate", {"calc-time-unit": "millisecond"})
            if info["status"] == "measured" or time.monotonic() > deadline:
                return info
            await asyncio.sleep(0.05)
    finally:
        await client.disconnect()


def test_qemu_qmp_measures_a_dirty_rate(dirtier):
    info = asyncio.run(measure_with_qemu_qmp(dirtier.path))
    assert info["status"] == "measured" and info["mode"] == "dirty-bitmap"
    assert info["calc-time"] >= 200 and info["dirty-rate"] > 0


# -- pymig dirtyrate --------------------------------------------------------------------------

def start_dirtier(tmp_path, kind: str, *extra: str):
    ctl = str(tmp_path / "guest.sock")
    args = ["run", "--workload", "dirtier", "--memory", "256M", "--working-set", "64M",
            "--rate", "20000", "--vcpus", "2", "--control", ctl, "--quiet", *extra]
    if kind == "simulated":
        args.append("--simulated")
    proc = pymig_process(*args, stderr=subprocess.PIPE)
    wait_for_path(ctl, proc)
    return proc, ctl


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_pymig_dirtyrate_measures_a_guest_process(tmp_path, kind):
    ring = ("--dirty-ring", "4096") if kind == "kvm" else ()
    proc, ctl = start_dirtier(tmp_path, kind, *ring)
    try:
        time.sleep(1)  # past its first touches of the working set
        png = tmp_path / "curve.png"
        done = run_pymig("dirtyrate", "--control", ctl, "--calc-time", "2s", "--mode",
                         "dirty-ring", "--json", "--plot", str(png))
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        assert info["status"] == "measured" and info["calc-time-unit"] == "millisecond"
        during = info["guest-cost"]["during"]
        assert abs(info["write-rate-pages"] - during) <= 0.1 * during, info
        assert len(info["vcpu-dirty-rate"]) == 2
        assert png.read_bytes().startswith(PNG_MAGIC)

        done = run_pymig("dirtyrate", "--control", ctl, "--calc-time", "300ms")
        assert done.returncode == 0, done.stderr
        for words in ("write rate", "working set", "page-sampling", "cost to the guest",
                      "working-set curve"):
            assert words in done.stdout, done.stdout
        run_pymig("qmp", "--control", ctl, "quit")
        assert proc.wait(60) == 0
    finally:
        finish(proc)


@pytest.mark.kvm
def test_pymig_dirtyrate_says_why_it_cannot(tmp_path):
    proc, ctl = start_dirtier(tmp_path, "kvm")
    try:
        done = run_pymig("dirtyrate", "--control", ctl, "--mode", "dirty-ring")
        assert done.returncode == 1
        assert done.stderr.startswith("pymig: mode dirty-ring needs the dirty ring")
        assert "Traceback" not in done.stderr
        for args, words in [(("--calc-time", "90s"), "--calc-time '90s'"),
                            (("--mode", "dirty-bitmap", "--sample-pages", "512"),
                             "--sample-pages is for --mode page-sampling")]:
            done = run_pymig("dirtyrate", "--control", ctl, *args)
            assert done.returncode == 1 and words in done.stderr, done.stderr
        run_pymig("qmp", "--control", ctl, "quit")
        assert proc.wait(60) == 0
    finally:
        finish(proc)


# -- the plot -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured_info():
    guest = running_guest(guest_config("simulated", "dirtier", memory=64 * MiB,
                                       working_set=8 * MiB, rate=20_000, pattern="sequential"))
    try:
        measurement = DirtyRateMeasurement(guest, DirtyRateConfig(600, "dirty-bitmap"),
                                           baseline_s=0.1)
        measurement.start()
        assert measurement.wait(60)
        return measurement.info("millisecond")
    finally:
        guest.close()


def test_the_working_set_plot(measured_info, tmp_path):
    png = tmp_path / "ws.png"
    fig = plot_working_set(measured_info, png)
    assert png.read_bytes().startswith(PNG_MAGIC)
    curve, rates = fig.axes[:2]
    assert all(a.get_xscale() == "log" and a.get_yscale() == "log" for a in (curve, rates))
    assert rates.get_xlabel() == WINDOW_LABEL
    points = measured_info["working-set"]["curve"]
    lines = {line.get_label(): line for line in curve.lines}
    mean = lines["distinct pages dirtied (mean)"]
    assert list(mean.get_xdata()) == pytest.approx([p["window-ms"] / 1000 for p in points])
    assert list(mean.get_ydata()) == pytest.approx([p["pages"] for p in points])
    rate = measured_info["write-rate-pages"]
    (write,) = [line for label, line in lines.items() if label.startswith("write rate")]
    assert list(write.get_ydata()) == pytest.approx([rate * p["window-ms"] / 1000
                                                     for p in points])
    (level,) = [line for label, line in lines.items() if label.startswith("working set")]
    assert set(level.get_ydata()) == {measured_info["working-set"]["pages"]}
    assert "settled" in level.get_label()
    assert curve.get_legend() is not None and rates.get_legend() is not None


def test_nothing_to_plot_before_a_measurement():
    with pytest.raises(ValueError, match="no working-set curve"):
        plot_working_set({"status": "measuring", "mode": "dirty-bitmap"})
