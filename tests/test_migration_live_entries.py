"""The migration loop over every live entry, not RAM alone (QEMU's save_live_* handlers)."""

from __future__ import annotations

from _migration_helpers import guests  # noqa: F401 - fixture
from _migration_helpers import assert_consistent, guest_config, migrate_locally

from pymig.machine import Machine
from pymig.policy import Action, Decision
from _migration_helpers import block_digests

EXTRA_BYTES = 64 << 20  # what the extra entry has pending per pass still to go


class Extra:
    """A live entry beside RAM (a disk, say) with bytes pending until it has iterated
    ``passes`` times; it writes no section, so the destination needs no twin of it."""

    def __init__(self, passes: int):
        self.left = passes
        self.calls: list[str] = []

    def setup(self, opaque, out) -> None:
        self.calls.append("setup")

    def iterate(self, opaque, out) -> bool:
        self.calls.append("iterate")
        self.left = max(self.left - 1, 0)
        return self.left == 0

    def pending(self, opaque) -> int:
        return self.left * EXTRA_BYTES

    def complete(self, opaque, out) -> None:
        self.calls.append("complete")

    def load(self, opaque, data, version_id, section_type) -> None:
        raise AssertionError("the extra entry is never sent")

    def cleanup(self, opaque) -> None:
        self.calls.append("cleanup")


def test_every_live_entry_iterates_beside_ram_and_its_pending_bytes_count(tmp_path, guests,
                                                                          monkeypatch):
    extra = Extra(passes=3)
    source_machine = Machine.source.__func__

    def with_extra(cls, guest):
        machine = source_machine(cls, guest)
        machine.registry.register_savevm_live("x-extra", 0, 1, extra, None)
        return machine

    monkeypatch.setattr(Machine, "source", classmethod(with_extra))
    pending = []

    def drained(metrics, params):  # switch over once the extra entry has nothing pending
        pending.append(metrics.pending_bytes)
        if metrics.iteration > 50:
            return Decision(Action.CANCEL, "the extra entry never drained", 0, None, 1.0)
        if metrics.pending_bytes < EXTRA_BYTES:
            return Decision(Action.SWITCHOVER, "manual", 0, None, 0.0)
        return Decision(Action.CONTINUE, "extra pending", 0, None, 1.0)

    source = guests(guest_config("simulated"))
    with migrate_locally(source, f"unix:{tmp_path}/m.sock", decide=drained) as done:
        assert done.error is None and done.migration.status.value == "completed", done.error
        assert block_digests(source.ram_blocks) == done.digests_at_load
        assert_consistent(done.destination)
    # the policy saw the extra's bytes with RAM's, sync after sync, until they were sent
    assert pending[0] >= 3 * EXTRA_BYTES and pending[-1] < EXTRA_BYTES, pending
    assert extra.calls == ["setup", "iterate", "iterate", "iterate", "complete", "cleanup"]
