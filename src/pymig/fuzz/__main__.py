"""``python -m pymig.fuzz``: fuzz a target, run them all, make seeds, replay and shrink
saved inputs.

::

    python -m pymig.fuzz TARGET [libFuzzer flags] [CORPUS...]   fuzz one target (atheris)
    python -m pymig.fuzz run [--seconds S | --runs N] ...       every target, with a summary
    python -m pymig.fuzz seeds DIR [--quick] [--kvm | --no-kvm] seed corpora from real streams
    python -m pymig.fuzz repro TARGET FILE...                   run saved inputs once, no fuzzer
    python -m pymig.fuzz minimize TARGET FILE [-o OUT]          a smaller input failing alike
"""

from __future__ import annotations

import sys

from pymig.fuzz import TARGETS

USAGE = __doc__.split("::", 1)[1].strip("\n") + f"\n\ntargets: {', '.join(TARGETS)}"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from pymig.fuzz import runner

        return runner.main(rest)
    if command == "seeds":
        return _seeds(rest)
    if command == "repro":
        from pymig.fuzz import _harness

        if len(rest) < 2:
            print("usage: python -m pymig.fuzz repro TARGET FILE...", file=sys.stderr)
            return 2
        return _harness.repro(rest[0], rest[1:])
    if command == "minimize":
        from pymig.fuzz import minimize

        return minimize.main(rest)
    if command in TARGETS:
        from pymig.fuzz import _harness

        _harness.fuzz(command, rest)
        return 0
    print(f"unknown command or target {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _seeds(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pymig.fuzz seeds")
    parser.add_argument("directory")
    parser.add_argument("--quick", action="store_true", help="the few seeds of the smoke run")
    parser.add_argument("--kvm", action=argparse.BooleanOptionalAction, default=None,
                        help="KVM guests too (default: where /dev/kvm works)")
    args = parser.parse_args(argv)
    from pymig.fuzz import seeds

    counts = seeds.generate(args.directory, kvm=args.kvm, quick=args.quick)
    for target, count in counts.items():
        print(f"{target}: {count} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
