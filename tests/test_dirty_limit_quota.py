"""The pieces of the dirty limit that need no guest: the KVM controller's GCRA, the rate meter
and the argument checks both guests share."""

from __future__ import annotations

import numpy as np
import pytest

from pymig.guest.base import DirtyRateMeter, check_dirty_limit, check_vcpu_index
from pymig.kvm.runtime import DIRTY_LIMIT_CREDIT_S, DirtyQuota


def test_a_vcpu_within_quota_is_never_held():
    quota = DirtyQuota(1000.0, seen=0, paid=0.0)
    for step in range(1, 50):  # 10 pages every 10 ms = exactly 1000 pages/s
        assert quota.charge(10 * step, now=step * 0.01) <= step * 0.01 + 1e-9


def test_a_vcpu_over_quota_is_held_until_its_pages_are_paid_for():
    quota = DirtyQuota(1000.0, seen=100, paid=5.0)
    assert quota.charge(100, now=5.0) == 5.0  # nothing new
    assert quota.charge(600, now=5.0) == pytest.approx(5.5)  # 500 pages at 1 ms each
    assert quota.charge(700, now=5.2) == pytest.approx(5.6)  # still in debt: it adds up
    # Idle for long, it saves up at most DIRTY_LIMIT_CREDIT_S of quota.
    assert quota.charge(710, now=100.0) == pytest.approx(100.0 - DIRTY_LIMIT_CREDIT_S + 0.01)


def test_the_rate_meter_measures_between_readings():
    meter = DirtyRateMeter()
    meter.restart([0, 100], now=10.0)
    assert meter.rates([500, 100], now=10.5) == [1000.0, 0.0]
    assert meter.rates([500, 400], now=11.5) == [0.0, 300.0]
    assert meter.rates([500, 400], now=11.5) == [0.0, 0.0]  # no time passed
    fresh = DirtyRateMeter()
    assert fresh.rates([7], now=1.0) == [0.0]  # the first reading starts the window


@pytest.mark.parametrize("rate", [1, 0.5, 1e9, np.int64(3), np.float32(2.5)])
def test_good_limits(rate):
    assert check_dirty_limit(rate) == float(rate)
    assert check_dirty_limit(None) is None


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf"), True, "5", [5]])
def test_bad_limits(rate):
    with pytest.raises(ValueError):
        check_dirty_limit(rate)


def test_vcpu_indexes():
    assert check_vcpu_index(np.int32(1), 2) == 1
    for index in (2, -1, False, 1.0):
        with pytest.raises(IndexError):
            check_vcpu_index(index, 2)
