"""Running one harness: under atheris with pymig's Python instrumented, or once per saved input.

A harness module defines ``test_one_input(data: bytes)``, which returns on an input its target
handled as documented and raises anything else (an exception the target let out, or a
:class:`Finding` of the harness's own checks); optionally ``setup()``, called once before the
first input; ``mutator(mutate)``, which makes a libFuzzer custom mutator from atheris's
``Mutate``; and ``dictionary()``, the words of its format (:mod:`pymig.fuzz.words`).
Nothing else of pymig is imported here, so that the fuzzer's import hook sees the targets'
modules load and instruments them.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable
from types import ModuleType

from pymig.fuzz import TARGETS

#: Set for every harness process before pymig loads: the destination decodes RAM packets in
#: the thread that reads them, so an input's whole run is in the thread the fuzzer watches.
HARNESS_ENV = {"PYMIG_PACKET_OVERLAP": "off"}
#: Where a fuzzing process leaves the input it is running (see :func:`_recording`).
LAST_INPUT_ENV = "PYMIG_FUZZ_LAST_INPUT"


class Finding(AssertionError):
    """A harness's own check failed: the target misbehaved without raising."""


def harness(target: str) -> ModuleType:
    if target not in TARGETS:
        raise SystemExit(f"unknown fuzz target {target!r} (known: {', '.join(TARGETS)})")
    for name, value in HARNESS_ENV.items():
        os.environ.setdefault(name, value)
    return importlib.import_module(TARGETS[target])


def fuzz(target: str, args: list[str]) -> None:
    """Fuzz ``target`` with libFuzzer ``args`` (flags and corpus directories); never returns."""
    try:
        import atheris
    except ImportError:
        raise SystemExit("fuzzing needs atheris: pip install 'pymig[fuzz]'") from None
    # Only the code under test: atheris's comparison hook leaks the result of every
    # comparison that is not a bool or a small int (a numpy array, here), so the harnesses'
    # own checks stay uninstrumented (exclusions name modules, not packages).  The hook
    # stays on: pymig imports some modules where they are first needed (a guest kind's),
    # and those must be instrumented too.
    atheris.instrument_imports(include=["pymig"], exclude=_harness_modules()).__enter__()
    module = harness(target)
    _setup(module)
    test_one_input = module.test_one_input
    last = os.environ.get(LAST_INPUT_ENV)
    if last:
        test_one_input = _recording(test_one_input, last)
    dictionary = getattr(module, "dictionary", None)
    if dictionary is not None and not any(arg.startswith("-dict=") for arg in args):
        args = [f"-dict={_dictionary_file(dictionary())}", *args]
    options = {}
    mutator = getattr(module, "mutator", None)
    if mutator is not None:
        # looked up at each call: atheris binds Mutate only once Fuzz() runs
        options["custom_mutator"] = mutator(lambda data, size: atheris.Mutate(data, size))
    # libFuzzer runs argv[0] as a shell command line for -minimize_crash, -fork and -jobs
    atheris.Setup([f"{sys.executable} -m pymig.fuzz {target}", *args], test_one_input,
                  **options)
    atheris.Fuzz()


def _dictionary_file(words: list[bytes]) -> str:
    """A path to ``words`` as a libFuzzer dictionary, in memory (nothing left behind); the
    descriptor is inherited, so processes libFuzzer starts (-fork, -minimize_crash) read it
    too."""
    from pymig.fuzz.words import write

    fd = os.memfd_create("pymig-fuzz-dictionary", 0)
    with os.fdopen(os.dup(fd), "wb") as handle:
        write(words, handle)
    return f"/proc/self/fd/{fd}"


def _recording(test_one_input: Callable[[bytes], None], path: str) -> Callable[[bytes], None]:
    """``test_one_input`` that first leaves the input in ``path``: a fault in a thread that
    blocks signals (the simulated guest's vCPUs) kills the process before libFuzzer can
    save what did it, and the runner then takes the input from there."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def recorded(data: bytes) -> None:
        os.ftruncate(fd, len(data))
        os.pwrite(fd, data, 0)
        test_one_input(data)

    return recorded


def _harness_modules() -> list[str]:
    import pkgutil

    import pymig.fuzz

    return ["pymig.fuzz"] + [f"pymig.fuzz.{m.name}" for m in pkgutil.iter_modules(
        pymig.fuzz.__path__)]


def repro(target: str, paths: list[str]) -> int:
    """Run ``target`` once on each file (no fuzzer, no instrumentation); 1 if any failed."""
    module = harness(target)
    _setup(module)
    failed = 0
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read()
        try:
            module.test_one_input(data)
        except BaseException:  # noqa: BLE001 - every way out is reported
            failed += 1
            print(f"{target}: {path}: FAILED", flush=True)
            traceback.print_exc()
        else:
            print(f"{target}: {path}: ok", flush=True)
    return 1 if failed else 0


def _setup(module: ModuleType) -> None:
    setup = getattr(module, "setup", None)
    if setup is not None:
        setup()

