"""The source's estimators as one object: what a sync turns into for the policy."""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

from pymig.measure import Course, Estimators
from pymig.parameters import ParameterStore

PAGE = 4096
MB = 1_000_000


class Entry:
    """A live entry as the registry lists it: its handlers and their opaque."""

    def __init__(self, name: str, pending_bytes: int):
        self.name, self.opaque = name, SimpleNamespace(pending=pending_bytes)
        self.handlers = SimpleNamespace(pending=lambda opaque: opaque.pending)


class ReturnPath:
    def __init__(self):
        self.loaded_offset = 0
        self.thread = threading.current_thread()

    def caught_up(self, offset: int) -> bool:
        return self.loaded_offset >= offset


def estimators(*entries: Entry, ret=None, delivered: int | None = None):
    channel = SimpleNamespace(bytes_sent=10 * MB, unsent_bytes=lambda: 0,
                              rate_limiter=SimpleNamespace(slept_s=0.0))
    saver = SimpleNamespace(page_bytes_sent=20 * MB, busy_seconds=0.0, swept=False,
                            sender=SimpleNamespace(thread=None),
                            resend_pending=lambda: 3 * PAGE)
    progress = SimpleNamespace(delivered=lambda sent: delivered)
    guest = SimpleNamespace(vcpu_count=2, vcpu_dirty_rates=lambda: [1.0, 2.0])
    registry = SimpleNamespace(live_entries=lambda: list(entries))
    writer = SimpleNamespace(bytes_written=10 * MB)
    est = Estimators(channel=channel, saver=saver, registry=registry, guest=guest,
                     writer=writer, ret=ret, progress=progress, ram_bytes=64 << 20,
                     page_size=PAGE, started=0.0)
    return est, saver


def test_pending_bytes_are_summed_over_every_live_entry():
    # RAM and whatever else iterates beside it (a disk, say), as QEMU's save_live_pending
    est, _ = estimators(Entry("ram", 5 * MB), Entry("disk", 7 * MB))
    m = est.metrics(10, ParameterStore().snapshot(), Course(iteration=1),
                    manual_switchover=False)
    assert m.pending_bytes == 12 * MB
    assert (m.iteration, m.page_size, m.ram_bytes) == (1, PAGE, 64 << 20)
    assert m.resend_bytes == 3 * PAGE and m.swept is False
    assert m.vcpu_dirty_rates is None  # only measured with the dirty-limit capability


def test_the_course_carried_between_syncs_reaches_the_policy():
    est, _ = estimators(Entry("ram", MB))
    course = Course(iteration=4, throttle_pct=30, dirty_limits=(100, 100), hot_periods=1,
                    expected_before_wait_s=0.02, passes_after_wait=1)
    params = ParameterStore().snapshot()
    params.capabilities["dirty-limit"] = True
    m = est.metrics(0, params, course, manual_switchover=True)
    assert (m.throttle_pct, m.dirty_limited, m.hot_periods) == (30, True, 1)
    assert (m.expected_before_wait_s, m.passes_after_wait) == (0.02, 1)
    assert m.manual_switchover_requested and m.vcpu_dirty_rates == (1.0, 2.0)


def test_with_a_return_path_the_backlog_is_what_the_destination_has_not_reported():
    ret = ReturnPath()
    est, saver = estimators(Entry("ram", MB), ret=ret, delivered=15 * MB)
    m = est.metrics(0, ParameterStore().snapshot(), Course(iteration=1),
                    manual_switchover=False)
    assert m.backlog_bytes == 5 * MB  # 20 MB of pages sent, 15 reported loaded
    assert not m.caught_up and m.in_flight_bytes == 0
    ret.loaded_offset = 10 * MB  # CAUGHT_UP at the writer's offset
    assert est.metrics(0, ParameterStore().snapshot(), Course(iteration=2),
                       manual_switchover=False).caught_up


def test_one_way_the_destination_counts_as_caught_up():
    est, _ = estimators(Entry("ram", MB))
    m = est.metrics(0, ParameterStore().snapshot(), Course(iteration=1),
                    manual_switchover=False)
    assert m.caught_up and m.backlog_bytes == 0 and m.expected_before_wait_s == math.inf


def test_after_a_catch_up_wait_the_dirty_rate_is_held_at_the_last_one():
    est, _ = estimators(Entry("ram", MB))
    params = ParameterStore().snapshot()
    first = est.metrics(1000, params, Course(iteration=1), manual_switchover=False)
    assert first.dirty_rate_bps > 0
    est.all_loaded()  # nothing re-armed since: a sync finding nothing is no evidence
    held = est.metrics(0, params, Course(iteration=2), manual_switchover=False)
    assert held.dirty_rate_bps >= first.dirty_rate_bps * (1 - 1e-9)
    after = est.metrics(0, params, Course(iteration=3), manual_switchover=False)
    assert after.dirty_rate_bps < first.dirty_rate_bps  # held for the one sync only
