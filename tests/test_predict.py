"""pymig predict: the convergence policy over a model of the guest and the link."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from _migration_helpers import GUEST_KINDS, run_pymig
from pymig import policy
from pymig.predict import GuestModel, LinkModel, load_guest, parameters, predict

MiB = 1 << 20


def guest(rate: float, working_set: int = 64 * MiB, **extra) -> GuestModel:
    return GuestModel(ram_bytes=256 * MiB, write_rate_pps=rate,
                      working_set_pages=working_set // 4096, **extra)


def capped(bandwidth: float, **qmp):
    """max-bandwidth standing for the link (the stop-and-copy held to it too)."""
    return parameters(**{"max-bandwidth": int(bandwidth), "x-switchover-capped": True,
                         "downtime-limit": 100, **qmp})


def test_a_prediction_says_time_downtime_bytes_passes_and_convergence():
    result = predict(guest(2000), LinkModel(bandwidth_bps=100e6),
                     parameters(**{"downtime-limit": 100}))
    assert result.status == "completed" and result.converges
    assert result.reason == "fits-limit"
    # the first pass alone is 64 MiB at 100 MB/s
    assert result.total_s > 64 * MiB / 100e6
    assert 0 < result.downtime_s <= result.total_s
    assert result.bytes_sent >= 64 * MiB
    assert result.passes >= 2
    row = result.summary()
    assert set(row) >= {"status", "converged", "total_ms", "downtime_ms", "transferred_bytes",
                        "iterations", "expected_downtime_ms", "throttle_peak_pct"}
    json.dumps(row)  # plain numbers
    assert [r["iteration"] for r in result.trace] == list(range(1, result.passes + 1))
    assert result.trace[-1]["action"] == "switchover"


@pytest.mark.parametrize("pattern", ["uniform", "sequential"])
@pytest.mark.parametrize("rate", [500, 4000, 20000])
@pytest.mark.parametrize("switchover_capped", [False, True])
def test_more_bandwidth_never_predicts_a_longer_migration(pattern, rate, switchover_capped):
    model = guest(rate, pattern=pattern, data_pages=80 * MiB // 4096, zero_share=0.2)
    previous = None
    for bandwidth in np.geomspace(5e6, 2e9, 16):
        if switchover_capped:
            result = predict(model, LinkModel(), capped(bandwidth))
        else:
            result = predict(model, LinkModel(bandwidth_bps=bandwidth),
                             parameters(**{"downtime-limit": 100}))
        if previous is not None and previous.converges:
            assert result.converges, f"converged at {previous}, not with more bandwidth"
            # within the few ms the policy's choice between one more pass while the
            # destination catches up and a wait for it can go either way (its reports count
            # whole RAM packets, so the choice flips with the bandwidth, as a migration's does)
            assert result.total_s <= previous.total_s * 1.1, (bandwidth, previous, result)
        previous = result
    assert previous.converges  # 2 GB/s carries any of these


def test_a_guest_dirtying_faster_than_the_link_is_predicted_not_to_converge():
    # 50,000 pages/s is 205 MB/s against a 50 MB/s link
    result = predict(guest(50_000), LinkModel(bandwidth_bps=50e6),
                     parameters(**{"downtime-limit": 100}))
    assert not result.converges
    assert result.status == "does-not-converge"
    assert math.isnan(result.downtime_s)
    assert result.summary()["downtime_ms"] is None


def test_a_limit_cancels_what_does_not_converge_when_the_policy_says_so():
    result = predict(guest(50_000), LinkModel(), capped(50e6, **{
        "max-total-time": 3000, "limit-action": "cancel"}))
    assert result.status == "cancelled" and not result.converges
    assert result.reason == "cancelled-by-limit: max_total_time_s"
    # decided at the first sync past the limit (a pass is a sync apart)
    assert result.trace[-1]["time"] >= 3.0 > result.trace[-2]["time"]


def test_auto_converge_throttles_a_guest_into_converging():
    plain = predict(guest(50_000), LinkModel(), capped(50e6))
    throttled = predict(guest(50_000), LinkModel(),
                        capped(50e6, capabilities={"auto-converge": True}))
    assert not plain.converges
    assert throttled.converges and throttled.throttle_peak_pct > 0
    assert any(r["reason"].startswith("throttling: step") for r in throttled.trace)


def test_a_dirty_limit_caps_the_guest_into_converging():
    model = guest(50_000, vcpus=2)
    result = predict(model, LinkModel(), capped(50e6, **{
        "vcpu-dirty-limit": 1000, "capabilities": {"dirty-limit": True}}))
    assert result.converges
    assert any("dirty limit" in r["reason"] for r in result.trace)


def test_compression_and_zero_pages_shrink_what_goes_on_the_wire():
    link, params = LinkModel(bandwidth_bps=50e6), parameters(**{"compression": "none"})
    full = predict(guest(1000), link, params)
    zero = predict(guest(1000, data_pages=128 * MiB // 4096, zero_share=0.75), link, params)
    lz4 = predict(guest(1000, compressed_share=0.01), link, parameters())
    assert lz4.bytes_sent < full.bytes_sent / 10
    assert lz4.total_s < full.total_s
    # twice the pages to go through, three quarters of them zero: fewer bytes on the wire
    assert zero.bytes_sent < full.bytes_sent


def test_every_decision_comes_from_the_policy(monkeypatch):
    """The model decides nothing itself: policy.decide is asked at every sync, with the
    policy's own inputs, and what it says is what the model does."""
    asked = []
    real = policy.decide

    def spy(metrics, params):
        assert isinstance(metrics, policy.Metrics) and isinstance(params, policy.PolicyParams)
        asked.append(metrics)
        return real(metrics, params)

    monkeypatch.setattr(policy, "decide", spy)
    result = predict(guest(2000), LinkModel(bandwidth_bps=100e6), parameters())
    assert len(asked) == result.passes
    assert [m.iteration for m in asked] == list(range(1, result.passes + 1))
    assert asked[0].pending_bytes == 64 * MiB  # the first sync: the whole working set

    def cancel_at_third(metrics, params):
        decision = real(metrics, params)
        if metrics.iteration == 3:
            return policy.Decision(policy.Action.CANCEL, "told to", 0, None, math.inf)
        return policy.Decision(policy.Action.CONTINUE, "told to", 0, None,
                               decision.expected_downtime_s)

    monkeypatch.setattr(policy, "decide", cancel_at_third)
    told = predict(guest(2000), LinkModel(bandwidth_bps=100e6), parameters())
    assert told.status == "cancelled" and told.passes == 3 and told.reason == "told to"


def test_the_migration_threads_holds_are_asked_too(monkeypatch):
    calls = []
    real = policy.switchover_held

    def spy(decision, metrics):
        calls.append(metrics)
        return real(decision, metrics)

    monkeypatch.setattr(policy, "switchover_held", spy)
    # 1 GB/s: the whole working set fits the limit before a page is sent, and the first
    # pass holds it back
    result = predict(guest(1000), LinkModel(), capped(1e9))
    assert calls and calls[0].swept is False
    assert result.trace[0]["reason"] == "held: first_pass"
    assert result.converges and result.passes >= 2


def test_the_working_set_curve_shapes_what_each_sync_finds():
    uniform = guest(10_000, 16 * MiB)
    assert uniform.distinct(0.01) == pytest.approx(100, rel=0.02)
    assert uniform.distinct(100) == pytest.approx(4096)
    sequential = guest(10_000, 16 * MiB, pattern="sequential")
    assert sequential.distinct(0.2) == pytest.approx(2000)
    measured = GuestModel(ram_bytes=256 * MiB, write_rate_pps=10_000, working_set_pages=4096,
                          pattern="curve", curve=((0.01, 100), (0.1, 900), (1.0, 4000)))
    assert measured.distinct(0.1) == pytest.approx(900)
    assert 100 < measured.distinct(0.03) < 900
    assert measured.distinct(5) == pytest.approx(4000)
    with pytest.raises(ValueError, match="does not fit"):
        GuestModel(ram_bytes=MiB, write_rate_pps=1, working_set_pages=1000)


def test_a_model_saved_and_loaded_predicts_the_same(tmp_path):
    model = guest(3000, pattern="sequential", zero_share=0.5, data_pages=20_000)
    path = tmp_path / "guest.json"
    path.write_text(json.dumps(model.to_dict()))
    assert load_guest(path) == model
    link, params = LinkModel(bandwidth_bps=80e6), parameters()
    assert predict(load_guest(path), link, params).summary() == \
        predict(model, link, params).summary()


def test_a_measurement_or_a_trace_becomes_a_model(tmp_path):
    info = {"page-size": 4096, "write-rate-pages": 5000.0,
            "working-set": {"pages": 4096, "curve": [
                {"window-ms": 10, "pages": 50}, {"window-ms": 1000, "pages": 2900}]}}
    path = tmp_path / "rate.json"
    path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="RAM size"):
        load_guest(path)
    model = load_guest(path, 64 * MiB)
    assert model.write_rate_pps == 5000 and model.working_set_pages == 4096
    assert model.pattern == "curve" and model.distinct(1.0) == pytest.approx(2900)
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"dirty_rate": rate, "dirty_pages": pages,
                                         "throttle_pct": 0, "page_size": 4096}) + "\n"
                             for rate, pages in ((0, 0), (3000, 700), (3100, 650), (2900, 640))))
    from_trace = load_guest(trace, 64 * MiB)
    assert from_trace.write_rate_pps == 3000 and from_trace.working_set_pages == 700


def test_pymig_predict_prints_json_and_refuses_a_guest_described_twice(tmp_path):
    done = run_pymig("predict", "--rate", "2000", "--working-set", "64M", "--memory", "256M",
                     "--bandwidth", "100000000", "--downtime-limit", "100", "--json",
                     "--save-profile", str(tmp_path / "g.json"))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["converged"] is True and out["total_ms"] > 0 and out["iterations"] >= 2
    again = run_pymig("predict", "--profile", str(tmp_path / "g.json"), "--bandwidth",
                      "100000000", "--downtime-limit", "100", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["total_ms"] == out["total_ms"]
    table = run_pymig("predict", "--profile", str(tmp_path / "g.json"), "--bandwidth", "10M")
    assert table.returncode == 0 and "converges" in table.stdout
    # the switchover's fixed cost measured on the host, where the built-in figure was not
    costly = run_pymig("predict", "--profile", str(tmp_path / "g.json"), "--bandwidth",
                       "100000000", "--downtime-limit", "100", "--json",
                       "--switchover-cost", "20")
    assert costly.returncode == 0, costly.stderr
    costly_out = json.loads(costly.stdout)
    assert costly_out["downtime_ms"] == pytest.approx(out["downtime_ms"] + 20 - 3.0, abs=0.1)
    measured = run_pymig("predict", "--profile", str(tmp_path / "g.json"), "--measure-link",
                         "--json")
    assert measured.returncode == 0, measured.stderr
    assert "the link carried" in measured.stderr
    assert json.loads(measured.stdout)["total_ms"] > 0
    # a KVM guest's log, re-armed as the pass reaches each chunk: fewer pages sent again
    kvm = run_pymig("predict", "--profile", str(tmp_path / "g.json"), "--bandwidth",
                    "100000000", "--downtime-limit", "100", "--json", "--rearm-at-send")
    assert kvm.returncode == 0, kvm.stderr
    assert json.loads(kvm.stdout)["page_bytes"] < out["page_bytes"]
    both = run_pymig("predict", "--rate", "10", "--profile", str(tmp_path / "g.json"))
    assert both.returncode == 1 and "one way" in both.stderr and "Traceback" not in both.stderr


@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_pymig_predict_measures_a_running_guest(kind, tmp_path):
    from _migration_helpers import finish, pymig_process, wait_for_path

    ctl = str(tmp_path / "src.sock")
    proc = pymig_process("run", "--workload", "dirtier", "--memory", "64M", "--working-set",
                         "16M", "--rate", "8000", *(["--simulated"] if kind == "simulated"
                                                    else []), "--control", ctl, "--quiet")
    try:
        wait_for_path(ctl, proc)
        done = run_pymig("predict", "--control", ctl, "--memory", "64M", "--calc-time",
                         "500ms", "--bandwidth", "20000000", "--downtime-limit", "100",
                         "--json", "--save-profile", str(tmp_path / "guest.json"))
    finally:
        finish(proc)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    model = out["guest"]
    assert model["write_rate_pps"] == pytest.approx(8000, rel=0.3)
    assert model["pattern"] == "curve" and len(model["curve"]) >= 3
    # the guest's kind says how its dirty log is re-armed: by the pass (KVM) or the sync
    assert model["rearmed_at_send"] is (kind == "kvm")
    # 8,000 pages/s is 33 MB/s of pages against a 20 MB/s link
    assert out["converged"] is False
    assert load_guest(tmp_path / "guest.json").write_rate_pps == model["write_rate_pps"]


def test_a_zero_profile_places_the_zero_pages_where_it_says():
    from pymig.predict import zero_by_bin

    edges = np.linspace(0, 1000, 11).round().astype(np.int64)
    # the first half all data, the second all zero: a tenth of the bins each way
    half = guest(0, data_pages=1000, zero_share=0.5, zero_profile=(0.0, 1.0))
    assert list(zero_by_bin(half, edges)) == [0.0] * 5 + [1.0] * 5
    assert list(zero_by_bin(guest(0, data_pages=1000, zero_share=0.3), edges)) == [0.3] * 10
    with pytest.raises(ValueError, match="zero profile"):
        guest(0, zero_profile=(0.5, 1.5))


def test_zero_pages_at_the_end_of_the_first_pass_leave_the_destination_behind_at_its_sync():
    """The first pass ends with a run of zero pages, which cross in a moment: the sync that
    follows sees the destination's report still behind them (its reports count whole RAM
    packets, and trail by its report period), as a migration's trace shows; spread over the
    pass, the same zero pages leave it a packet less behind (the sync follows the last
    packet, which went on a bucket not yet in debt, and finds the destination behind by that
    one and the one before)."""
    from pymig import predict as model

    seen: list[list[float]] = []
    real = model.ask_policy

    def spy(state, params):
        seen[-1].append(state.backlog())
        return real(state, params)

    link, params = LinkModel(), capped(13.5e6)
    data_pages = 8704
    tail = (0.0,) * 120 + (1.0,) * 8  # the last 544 pages all zero
    try:
        model.ask_policy = spy
        seen.append([])
        predict(guest(1000, 32 * MiB, data_pages=data_pages, zero_share=8 / 128,
                      zero_profile=tail), link, params)
        seen.append([])
        predict(guest(1000, 32 * MiB, data_pages=data_pages, zero_share=8 / 128), link, params)
    finally:
        model.ask_policy = real
    at_end, spread = (backlogs[1] for backlogs in seen)
    assert at_end >= 2 * MiB and at_end - spread > MiB / 2  # about a packet more


def test_a_destination_slower_to_fault_pages_in_than_the_link_bounds_the_migration():
    params = parameters(**{"downtime-limit": 100})
    model = guest(100, data_pages=20480, zero_share=0.5)
    fast = predict(model, LinkModel(bandwidth_bps=1e9), params)
    slow = predict(model, LinkModel(bandwidth_bps=1e9, first_touch_zero_s=50e-6,
                                    first_touch_data_s=150e-6), params)
    assert fast.converges and slow.converges
    assert fast.total_s < 0.5
    # 10,240 pages of each kind: 2.05 s to fault them in, whatever the link carries
    assert slow.total_s >= 10240 * (50e-6 + 150e-6)


def test_first_touch_is_measured_per_page_on_fresh_memory():
    from pymig.predict import measure_first_touch

    zero_s, data_s = measure_first_touch(pages=256, repeats=1)
    assert 0 < zero_s < 0.01 and 0 < data_s < 0.01  # seconds per page


def test_a_slow_dirtying_guest_waits_out_a_destination_far_behind_in_a_pass_or_two():
    # A destination that faults fresh pages in at 150-250 us each is seconds behind a 45 MB/s
    # first pass.  The policy holds the switchover while it is (Held.BEHIND), and a held pass
    # waits for it as long as the guest's 500 pages/s add little to the downtime expected:
    # a pass or two, not one per BEHIND_PERIOD_S of the destination's backlog.
    slow = LinkModel(first_touch_zero_s=150e-6, first_touch_data_s=250e-6)
    model = guest(500, 32 * MiB, data_pages=8704, zero_share=0.75)
    result = predict(model, slow, capped(45e6))
    held = [row for row in result.trace if row["reason"] == "held: behind"]
    assert held, result.trace
    assert result.converges and result.passes <= 6, result.trace
    # what the destination takes to fault the first pass in bounds the migration, not passes
    assert result.total_s >= 8704 * (0.75 * 150e-6 + 0.25 * 250e-6)
    # the logged rate over each pass, not over the sync alone: 500 pages/s as the guest writes
    assert 400 <= held[0]["dirty_rate"] <= 700, held[0]


def sweep_guest(rate: float) -> GuestModel:
    """A sweep's guest: 64 MiB, 34 MiB of it holding data, nearly all zero but the 32 MiB the
    guest writes uniformly at ``rate`` pages/s."""
    return GuestModel(ram_bytes=64 * MiB, write_rate_pps=rate, working_set_pages=8192,
                      data_pages=8704, zero_share=0.88)


def test_the_stop_and_copy_takes_what_the_bucket_saved_up_and_pays_the_cap_for_the_rest():
    # max-bandwidth's bucket refills while the sender waits for the destination (here, the
    # pass held while it loads the first): a few pages left at the stop go at once, as
    # pymig.transport.ratelimit lets them; a stop right after a long pass held to the cap
    # finds it empty, and what is left goes at the cap
    fixed = LinkModel(switchover_s=0.002)
    result = predict(sweep_guest(500), fixed, capped(20e6))
    left = result.trace[-1]["pending_bytes"]
    assert result.converges and left > 0
    assert 0.002 <= result.downtime_s < 0.002 + 0.5 * left / 20e6
    result = predict(sweep_guest(2000), fixed, capped(9e6))
    left = result.trace[-1]["pending_bytes"]
    assert result.converges and left > 1 * MiB
    assert result.downtime_s == pytest.approx(0.002 + left / 9e6, rel=0.1)


def test_the_models_token_bucket_is_the_rate_limiters():
    # its smallest burst at the start, refilled at the cap up to 0.1 s of it while idle,
    # what it holds going at once and the rest at the cap
    from pymig.predict import TokenBucket

    bucket = TokenBucket(20e6, 0.0)
    assert bucket.send(0.0, 1 * MiB) == 0.0
    assert bucket.send(0.0, 2e6) == pytest.approx(0.1)
    assert bucket.send(10.0, 2e6) == 0.0  # idle: 0.1 s of the cap, no more
    assert bucket.send(10.1, 3e6) == pytest.approx(0.05)
    assert bucket.send(10.1, 1e6, busy_s=0.2) == pytest.approx(0.05)
    assert bucket.send(10.35, 2e6) == pytest.approx(0.0)  # refilled while the sender was busy
    assert TokenBucket(0, 0.0).send(0.0, 1e9) == 0.0


@pytest.mark.parametrize("rate", [500, 2000])
@pytest.mark.parametrize("bandwidth", [9e6, 13.5e6, 20e6])
def test_the_catch_up_wait_before_a_switchover_lasts_the_destinations_report_interval(
        rate, bandwidth):
    # After a pass of re-sends on loopback the destination has every packet as the pass
    # ends and says CAUGHT_UP within its report interval (pymig.machine): the model waits
    # that long at most before it syncs again and stops the guest, never a report lag more
    # (what the guest dirtied meanwhile would go in the downtime).
    from pymig.machine import CAUGHT_UP_INTERVAL_S

    result = predict(sweep_guest(rate), LinkModel(), capped(bandwidth))
    assert result.converges and result.passes >= 3  # a pass of re-sends before the stop
    waits = [b["time"] - a["time"] for a, b in zip(result.trace, result.trace[1:])
             if "waiting for the destination" in a["reason"]]
    assert all(w <= CAUGHT_UP_INTERVAL_S + LinkModel().per_sync_s for w in waits), waits


def test_the_first_pass_ends_as_its_last_packet_leaves_and_the_next_pass_pays_for_it():
    # The rate limiter lets a packet go on a bucket not in debt and charges it after: the
    # first pass ends as its last packet (the last re-protect chunk's data pages: 512 of
    # 8,704 here, so the packet's whole megabyte) leaves, a packet's time at the cap before
    # the bucket has paid for it, and the pass after it pays (a sweep's traces: the second
    # pass carries its bytes below the cap by as much).
    from pymig.predict import PAGE_FRAMING_SHARE, PAGE_SIZE

    rate = 13.5e6
    model = GuestModel(ram_bytes=64 * MiB, write_rate_pps=10, working_set_pages=8192,
                       data_pages=8704)
    link = LinkModel()
    result = predict(model, link, capped(rate))
    wire = 8704 * PAGE_SIZE * (1 + PAGE_FRAMING_SHARE)
    paid = link.setup_s + (wire - 1 * MiB) / rate  # the first megabyte from the new bucket
    second_sync = result.trace[1]["time"]
    assert second_sync == pytest.approx(paid - 1 * MiB / rate + link.per_sync_s, abs=0.002)
    assert result.converges and result.total_s > paid


def test_a_log_rearmed_as_the_pass_reaches_each_chunk_misses_rewrites_before_it():
    # A KVM guest's dirty bitmap, manually protected, is re-armed chunk by chunk just before
    # the pass reads it: a page the last sync found that the guest writes again before its
    # chunk is re-armed goes in this pass's copy, and the log, its bit still set, shows
    # nothing new.  So the syncs after the first pass find fewer pages than a log the sync
    # re-arms (a simulated guest's): those written after their chunk's re-arm and the pages
    # not found before, no more.  The first pass, its log holding next to nothing, is alike.
    from pymig.sweep import SweepSpec, predict_point

    rate, working_set = 2000, 8192

    def run(rearmed_at_send):
        model = GuestModel(ram_bytes=64 * MiB, write_rate_pps=rate,
                           working_set_pages=working_set, data_pages=working_set,
                           rearmed_at_send=rearmed_at_send)
        return predict(model, LinkModel(), capped(9e6))

    at_send, at_sync = run(True), run(False)
    assert at_send.trace[1]["dirty_pages"] == pytest.approx(at_sync.trace[1]["dirty_pages"],
                                                           abs=5)
    found = at_send.trace[1]["dirty_pages"]  # pending as the second pass begins, all re-sent
    window = at_send.trace[2]["time"] - at_send.trace[1]["time"]
    pass_s = found * 4096 / 9e6

    def p(t):  # the chance a working-set page is written in t seconds
        return -math.expm1(-rate * t / working_set)

    lost = at_sync.trace[2]["dirty_pages"] - at_send.trace[2]["dirty_pages"]
    # a chunk re-armed as the pass begins loses nothing, one re-armed as it ends the most;
    # the pass reaches its eight chunks spread over it
    most = found * (p(window) - p(window - pass_s))
    assert 0.3 * most < lost < 0.6 * most
    # fewer pages to re-send each pass: the migration ends sooner, in fewer passes
    assert at_send.converges and at_sync.converges
    assert at_send.passes < at_sync.passes and at_send.total_s < at_sync.total_s
    # a sweep's KVM guests are modelled so, its simulated ones not
    spec = SweepSpec(rates=(rate,), bandwidths=(9_000_000,), memory=64 << 20, runs=1,
                     kind="kvm")
    point = {"rate_pages_per_s": rate, "bandwidth_bps": 9_000_000,
             "working_set_bytes": working_set * 4096, "downtime_limit_ms": 100}
    kvm = predict_point(spec, point, working_set, 0, first_touch=(0.0, 0.0))
    simulated = predict_point(dataclasses.replace(spec, kind="simulated"), point,
                              working_set, 0, first_touch=(0.0, 0.0))
    assert kvm.trace[2]["dirty_pages"] < simulated.trace[2]["dirty_pages"]
