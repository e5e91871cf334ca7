"""Per-vCPU dirty rates and dirty limits on both guests (Guest.vcpu_dirty_rates,
Guest.set_vcpu_dirty_limit).

The guest is a 2-vCPU dirtier: vCPU 0 dirties as fast as it can, vCPU 1 at a low paced rate.
The rates the dirty tracking measures are compared with the workload's own counters (the
mailbox), which the guests keep independently of it.  The host is noisy (two cores, one of
them shared), so the bands are wide, the windows are over a second long, and the cap is set
relative to what vCPU 0 achieved: the tests check behaviour, not speed.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from _dirty_limit_helpers import SLOW_RATE, assert_shadow_is_ram, copy_dirty, dirtier

from pymig.errors import GuestError
from pymig.guest.base import Guest
from pymig.guest.workloads import read_mailbox

MiB = 1 << 20
WINDOW_S = 1.5
KINDS = [pytest.param("simulated", id="sim"), pytest.param("kvm", id="kvm", marks=pytest.mark.kvm)]
pytestmark = pytest.mark.timeout(90)


def measure(guest, seconds: float = WINDOW_S) -> tuple[list[float], list[float]]:
    """(rates the dirty tracking measured, rates the mailbox counted) over ``seconds``."""
    guest.vcpu_dirty_rates()  # the window starts here
    before, start = read_mailbox(guest, 2), time.monotonic()
    time.sleep(seconds)
    measured = guest.vcpu_dirty_rates()
    after, elapsed = read_mailbox(guest, 2), time.monotonic() - start
    counted = [(b.pages_written - a.pages_written) / elapsed for a, b in zip(before, after)]
    return measured, counted


def within(value: float, target: float, low: float, high: float) -> bool:
    return low * target <= value <= high * target


@pytest.mark.parametrize("kind", KINDS)
def test_rates_match_the_counters_and_a_cap_slows_only_its_vcpu(kind):
    with dirtier(kind) as guest:
        assert isinstance(guest, Guest) and guest.supports_dirty_limit
        guest.start_dirty_log()
        time.sleep(0.2)  # past the first faults of a freshly protected guest

        free, counted = measure(guest)
        report = [("free", free, counted)]
        slow = min(counted[1], SLOW_RATE)  # vCPU 1's pace as this host keeps it now
        assert within(free[0], counted[0], 0.6, 1.3), report
        assert within(free[1], counted[1], 0.6, 1.5), report
        assert within(counted[1], SLOW_RATE, 0.5, 1.2), report
        assert free[0] > 5 * slow, report
        cap = min(20_000.0, free[0] / 8)  # well below what vCPU 0 does here and now

        guest.set_vcpu_dirty_limit(0, cap)
        time.sleep(0.1)
        capped, counted = measure(guest)
        report.append(("capped", capped, counted))
        assert within(capped[0], cap, 0.5, 1.3), report
        assert within(counted[0], cap, 0.5, 1.3), report  # the workload really slowed down
        assert within(capped[1], counted[1], 0.6, 1.5), report
        # vCPU 1 is unaffected: not slower than it was (noise only ever slows a paced vCPU)
        assert within(counted[1], slow, 0.7, 1.2 * SLOW_RATE / slow), report

        guest.set_vcpu_dirty_limit(0, None)
        # Back far above the cap, which a capped vCPU cannot be over a window this long; a
        # second window if the host took vCPU 0's core during the first.
        for _ in range(2):
            time.sleep(0.1)
            lifted, counted = measure(guest)
            report.append(("lifted", lifted, counted))
            if lifted[0] > 2 * cap:
                break
        assert lifted[0] > 2 * cap, report
        assert within(counted[1], slow, 0.7, 1.2 * SLOW_RATE / slow), report
        print(kind, report)


@pytest.mark.parametrize("kind", KINDS)
def test_no_write_is_lost_while_a_limit_holds_a_vcpu(kind):
    # The default shares (16 Ki pages each) keep vCPU 0's writes on pages not yet dirtied, so
    # the workload's counter and the dirty tracking count the same thing: a limit caps newly
    # dirtied pages, and on a small share a burst rewrites pages KVM counts once.
    with dirtier(kind) as guest:
        guest.start_dirty_log()
        shadow = [block.array.copy() for block in guest.ram_blocks]
        guest.set_vcpu_dirty_limit(0, 5_000)
        guest.set_vcpu_dirty_limit(1, 1_500)  # below vCPU 1's pace: it is held too
        before, start = read_mailbox(guest, 2), time.monotonic()
        deadline, rounds, copied = start + 1.5, 0, 0
        while time.monotonic() < deadline:
            copied += copy_dirty(guest, shadow)
            rounds += 1
            time.sleep(0.01)
        guest.pause()
        elapsed = time.monotonic() - start
        copy_dirty(guest, shadow)
        assert rounds > 20 and copied > 1000
        assert_shadow_is_ram(guest, shadow)
        rates = [(b.pages_written - a.pages_written) / elapsed
                 for a, b in zip(before, read_mailbox(guest, 2))]
        # Held near the caps (noise only ever slows a vCPU; the bound leaves room for the
        # credit and one controller period of overshoot); free, vCPU 0 runs 50-100x faster.
        assert 1_000 < rates[0] < 5_000 * 2 and rates[1] < 1_500 * 2, rates


@pytest.mark.parametrize("kind", KINDS)
def test_a_limit_tracks_by_itself_and_closing_lifts_it(kind):
    with dirtier(kind, working_set_bytes=16 * MiB) as guest:
        with pytest.raises(GuestError, match="start_dirty_log"):
            guest.vcpu_dirty_rates()  # nothing tracks yet
        guest.set_vcpu_dirty_limit(1, 1000)  # no dirty logging: the limit tracks by itself
        time.sleep(0.5)
        rates = guest.vcpu_dirty_rates()
        assert len(rates) == 2 and rates[0] > 5 * rates[1] and 300 < rates[1] < 1500, rates
        guest.start_dirty_log()
        guest.stop_dirty_log()
        guest.vcpu_dirty_rates()  # still tracking: the limit is set
        guest.set_vcpu_dirty_limit(1, None)
        with pytest.raises(GuestError, match="start_dirty_log"):
            guest.vcpu_dirty_rates()
        guest.set_vcpu_dirty_limit(0, 1000)
        guest.close()
        with pytest.raises(GuestError):
            guest.set_vcpu_dirty_limit(0, 1000)
        with pytest.raises(GuestError):
            guest.vcpu_dirty_rates()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_limits_are_refused(kind):
    with dirtier(kind, working_set_bytes=4 * MiB) as guest:
        for index in (2, -1, True, "0"):
            with pytest.raises(IndexError):
                guest.set_vcpu_dirty_limit(index, 1000)
        for rate in (0, -5, float("inf"), float("nan"), "100", True):
            with pytest.raises(ValueError):
                guest.set_vcpu_dirty_limit(0, rate)
        guest.set_vcpu_dirty_limit(0, np.float64(1e6))
        guest.set_vcpu_dirty_limit(0, None)
        guest.set_vcpu_dirty_limit(0, None)  # lifting twice is fine
