"""The dirtier's per-vCPU rates (``vcpu_rates_pages_per_s``): parameters, the share records'
own pacing in the parameter block, and both guests pacing each vCPU by its own record."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymig.guest import GuestConfig, create
from pymig.guest.layout import GUEST_PAGE_SIZE, MAX_VCPUS, PARAMS_GPA
from pymig.guest.workloads import (
    make_workload,
    pacing,
    pack_params,
    parse_params,
    read_mailbox,
    unpack_params,
)

MiB = 1 << 20
KINDS = [pytest.param("simulated", id="sim"), pytest.param("kvm", id="kvm", marks=pytest.mark.kvm)]


@pytest.mark.parametrize("given_rates, expected", [
    ([0, 2000], (0, 2000)),
    ((5, 6, 7), (5, 6, 7)),
    ("0, 0x10", (0, 16)),  # KEY=VALUE text from a command line
    (None, ()),
])
def test_rates_parse(given_rates, expected):
    p = parse_params("dirtier", {"vcpu_rates_pages_per_s": given_rates})
    assert p.vcpu_rates == expected and p.rate_pages_per_s == 0


@pytest.mark.parametrize("params, match", [
    ({"vcpu_rates_pages_per_s": [1, -1]}, ">= 0"),
    ({"vcpu_rates_pages_per_s": "1,x"}, "list integers"),
    ({"vcpu_rates_pages_per_s": []}, "one rate per vCPU"),
    ({"vcpu_rates_pages_per_s": 5}, "list of integers"),
    ({"vcpu_rates_pages_per_s": [1.5]}, "integer"),
    ({"vcpu_rates_pages_per_s": [1, 2], "rate_pages_per_s": 10}, "not both"),
])
def test_bad_rates_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        parse_params("dirtier", params)


def test_one_rate_per_vcpu():
    with pytest.raises(ValueError, match="3 rates .* for 2 vCPUs"):
        make_workload(parse_params("dirtier", {"vcpu_rates_pages_per_s": [0, 1, 2]}), 2)
    with pytest.raises(ValueError, match="no parameter"):
        parse_params("selfcheck", {"vcpu_rates_pages_per_s": [0]})


@given(rates=st.lists(st.integers(0, 10**6), min_size=1, max_size=MAX_VCPUS),
       tick_khz=st.integers(1000, 10**7))
def test_each_share_record_carries_its_own_pacing(rates, tick_khz):
    workload = make_workload(parse_params("dirtier", {"working_set_bytes": 4 * MiB,
                                                      "vcpu_rates_pages_per_s": rates}),
                             len(rates))
    page = pack_params(workload, tick_khz)
    back = unpack_params(page)
    assert back.pack() == page
    assert back.pacing == pacing(0, len(rates), tick_khz)  # the header: the even split of 0
    for i, rate in enumerate(rates):
        assert back.share_pacing(i) == pacing(rate, 1, tick_khz)


def test_share_pacing_sits_where_the_assembly_reads_it():
    """SH_BATCH (+24 u32) and SH_TSC_PER_BATCH (+32 u64) of asm/_defs.S; without per-vCPU
    rates every record holds the even split."""
    for params, own in (({"vcpu_rates_pages_per_s": [0, 5000]}, [(64, 0), (1, 400_000)]),
                        ({"rate_pages_per_s": 5000}, [(1, 800_000), (1, 800_000)])):
        workload = make_workload(parse_params("dirtier", {"working_set_bytes": 8 * MiB,
                                                          **params}), 2)
        page = np.frombuffer(pack_params(workload, 2_000_000), dtype=np.uint8)
        for i, (batch, ticks) in enumerate(own):
            record = page[0x40 + 64 * i:0x40 + 64 * (i + 1)]
            assert record[24:28].view("<u4")[0] == batch
            assert record[32:40].view("<u8")[0] == ticks
            assert not record[40:].any()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_each_vcpu_runs_at_its_own_rate(kind):
    params = {"working_set_bytes": 8 * MiB, "vcpu_rates_pages_per_s": [0, 3000, 800]}
    guest = create(GuestConfig(kind, 16 * MiB, vcpus=3, workload="dirtier", params=params))
    try:
        block = unpack_params(guest.ram_blocks[0].array[PARAMS_GPA:PARAMS_GPA + GUEST_PAGE_SIZE])
        assert block.share_pacing(0).ticks_per_batch == 0
        guest.start()
        time.sleep(0.1)
        before, start = read_mailbox(guest, 3), time.monotonic()
        time.sleep(1.0)
        after, elapsed = read_mailbox(guest, 3), time.monotonic() - start
        rates = [(b.pages_written - a.pages_written) / elapsed for a, b in zip(before, after)]
        # Never faster than its rate; slower only by what a busy host's scheduler takes
        # (the unpaced vCPU keeps a CPU to itself, and a paced one gives up catching up on
        # what it lost beyond MAX_LAG_SECONDS), so the lower bounds leave room for that.
        assert 0.5 * 3000 < rates[1] < 1.2 * 3000, rates
        assert 0.5 * 800 < rates[2] < 1.2 * 800, rates
        assert rates[1] > 2 * rates[2], rates  # each at its own rate
        assert rates[0] > 10 * 3000, rates  # unpaced
    finally:
        guest.pause()
        guest.close()
