"""Fuzz target ``analyze``: ``pymig analyze`` on any bytes, both renderings.

Input: a stream or snapshot file.  :func:`pymig.analyze.analyze` reads it, and the result is
rendered as ``pymig analyze`` prints it (rich, into a string) and as ``--json`` prints it.
``analyze`` reports damage as problems and never raises, so any exception is a crash: the CLI
would show it as a traceback.  An analysis that calls the input intact while a destination
would refuse to read its records is a crash too.  Each input also runs with its checksums
repaired.
"""

from __future__ import annotations

import io
import json

from pymig import stream
from pymig.analyze import analyze, render
from pymig.errors import PymigError
from pymig.fuzz import repair
from pymig.fuzz._harness import Finding
from pymig.fuzz.mutate import stream_mutator as mutator  # noqa: F401 - for _harness
from pymig.fuzz.words import stream_words as dictionary  # noqa: F401 - for _harness
from pymig.transport import BytesChannel


def test_one_input(data: bytes) -> None:
    _analyze(data)
    fixed = repair.everything(data)
    if fixed != data:
        _analyze(fixed)


def _analyze(data: bytes) -> None:
    from rich.console import Console

    result = analyze(BytesChannel(data))
    render(result, Console(file=io.StringIO(), width=100, color_system=None))
    json.dumps(result.to_dict())
    if result.ok:
        _check_framing(data)


def _check_framing(data: bytes) -> None:
    reader = stream.StreamReader(BytesChannel(data))
    try:
        reader.read_header()
        while reader.next_record().type != stream.RecordType.EOF:
            reader.skip_payload()
    except PymigError as exc:
        raise Finding(f"analyze calls the stream intact, the stream reader refuses it: "
                      f"{exc}") from exc
