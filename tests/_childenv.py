"""The environment for a child Python process that must import what this one imports: the
installed pymig (or src/ when the tests run from a source tree) and these test helpers."""

from __future__ import annotations

import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS] + [p for p in sys.path if p])
    env.update(extra)
    return env
