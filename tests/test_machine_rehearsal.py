"""A destination rehearses loading its own state before the stream's (so that the
switchover's load is not the first in the process): the guest must come out as it went in,
and a rehearsal that fails must not fail the migration."""

from __future__ import annotations

import logging

import pytest
from _migration_helpers import guest_config

from pymig import vmstate
from pymig.machine import Machine


MSR_TSC = 0x10


def decoded_state(machine: Machine) -> dict[str, dict]:
    """Every state entry as the stream would carry it, decoded; without the TSC, which a
    KVM guest's clock moves on between two saves."""
    state = machine.guest.save_state()
    out = {}
    for entry in machine.registry.state_entries():
        fields = vmstate.decode(entry.vmsd, machine._encode_state(entry, state),
                                entry.version_id)
        fields.pop("tsc", None)
        if "msr_index" in fields:
            fields["msr_value"] = [v for i, v in zip(fields["msr_index"], fields["msr_value"])
                                   if i != MSR_TSC]
        out[entry.name] = fields
    return out


@pytest.mark.kvm
def test_the_rehearsal_leaves_the_guest_as_it_was():
    machine = Machine.incoming(guest_config("kvm", "selfcheck", vcpus=2))
    try:
        before = decoded_state(machine)
        machine.rehearse_state_load()
        assert decoded_state(machine) == before
        assert {"cpu/0", "cpu/1"} <= before.keys() and len(before) >= 3
        assert machine.guest.status not in ("running", "closed")
    finally:
        machine.close()


def test_a_rehearsal_that_cannot_run_is_only_logged(caplog):
    # A simulated destination has no vCPU state of its own until the stream gives it one.
    machine = Machine.incoming(guest_config("simulated", "selfcheck"))
    try:
        with caplog.at_level(logging.DEBUG, logger="pymig.machine"):
            machine.rehearse_state_load()
        assert "rehearsal stopped: this incoming guest has no vCPU state" in caplog.text
    finally:
        machine.close()
