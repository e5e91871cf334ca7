"""Rebuild the built-in guest workloads: ``asm/<name>.S`` -> ``bin/<name>.bin``.

Each workload is assembled with GNU ``as --64`` and linked at the load address with ``ld``
(``-m elf_x86_64``; each source picks .code32 or .code64 itself), then stripped to a flat
image with ``objcopy -O binary``.  Flat binaries
carry no timestamps or paths, so the same sources and tools give the same bytes; a test checks
that a rebuild reproduces the checked-in ``bin/*.bin`` where ``as`` is installed.

    python -m pymig.guest.build_workloads [--check] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASM_DIR = HERE / "asm"
BIN_DIR = HERE / "bin"
LOAD_ADDRESS = 0x8000
WORKLOADS = ("idle", "dirtier", "selfcheck", "compute", "diskcheck")
TOOLS = ("as", "ld", "objcopy")


def missing_tools() -> list[str]:
    """The GNU binutils programs the build needs that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def assemble(source: Path, out: Path, load_address: int = LOAD_ADDRESS,
             include_dirs: tuple[Path, ...] = (ASM_DIR,)) -> bytes:
    """Assemble one ``.S`` file (entry symbol ``start``) into a flat binary at ``out``."""
    with tempfile.TemporaryDirectory(prefix="pymig-as-") as tmp:
        obj = Path(tmp) / "image.o"
        elf = Path(tmp) / "image.elf"
        includes = [f"-I{d}" for d in include_dirs]
        _run(["as", "--64", *includes, "-o", str(obj), str(source)])
        _run(["ld", "-m", "elf_x86_64", "-nostdlib", "--build-id=none", "-e", "start",
              f"-Ttext=0x{load_address:x}", "-o", str(elf), str(obj)])
        _run(["objcopy", "-O", "binary", str(elf), str(out)])
    return out.read_bytes()


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr}")


def build_all(out_dir: Path = BIN_DIR) -> dict[str, bytes]:
    """Build every workload into ``out_dir``; returns ``{name: image bytes}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: assemble(ASM_DIR / f"{name}.S", out_dir / f"{name}.bin")
            for name in WORKLOADS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BIN_DIR, help="output directory")
    parser.add_argument("--check", action="store_true",
                        help="build into a temporary directory and compare with bin/")
    args = parser.parse_args(argv)
    if missing := missing_tools():
        print(f"missing GNU binutils: {', '.join(missing)}", file=sys.stderr)
        return 2
    if not args.check:
        for name, image in build_all(args.out).items():
            print(f"{name}: {len(image)} bytes")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        built = build_all(Path(tmp))
    stale = [n for n, image in built.items() if (BIN_DIR / f"{n}.bin").read_bytes() != image]
    for name in stale:
        print(f"{name}.bin differs from its source", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
