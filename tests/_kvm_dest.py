"""Destination process for the KVM migration tests: builds an incoming guest from the
config, fills its RAM from files, loads the saved state, resumes it and reports as JSON.

    python _kvm_dest.py DIRECTORY selfcheck|compute
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _kvm_helpers import wait_for  # noqa: E402

from pymig.guest.base import GuestConfig  # noqa: E402
from pymig.guest.kvm_guest import KvmGuest  # noqa: E402
from pymig.guest.workloads import verify_selfcheck  # noqa: E402


def main(directory: Path, action: str) -> dict:
    saved = pickle.loads((directory / "state.pkl").read_bytes())
    config = GuestConfig.from_dict(saved["config"])
    state = saved["state"]
    guest = KvmGuest.create(config, incoming=True)
    try:
        untouched = all(int(b.touched().sum()) == 0 for b in guest.ram_blocks)
        for i, block in enumerate(guest.ram_blocks):
            with open(directory / f"ram-{i}.bin", "rb") as f:
                f.readinto(block.mem)
        guest.load_state(state)
        tsc_loaded = [cpu.tsc for cpu in guest.save_state().cpus]
        start = guest.progress()
        guest.resume()
        if action == "selfcheck":
            wait_for(lambda: guest.progress()["passes"] >= start["passes"] + 2,
                     what="two more selfcheck passes")
        else:
            wait_for(lambda: guest.progress()["done"], what="compute to finish")
        guest.pause()
        after = guest.save_state()
        report = verify_selfcheck(guest) if action == "selfcheck" else None
        return {
            "untouched_before_load": untouched,
            "start": start,
            "progress": guest.progress(),
            "selfcheck": report.__dict__ if report else None,
            "tsc_loaded": tsc_loaded,
            "tsc_after": [cpu.tsc for cpu in after.cpus],
            "status": guest.status,
        }
    finally:
        guest.close()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
