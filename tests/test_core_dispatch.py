"""SIMD dispatch: the choice made at import, PYMIG_DISABLE_SIMD, the private setter, and the
build rules (target attributes only in dispatch files, never -march=native)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _childenv import child_env

from _core_helpers import COMPILED, REF, needs_compiled
from pymig._coreshared import SIMD_VARIANTS, disabled_variants

ROOT = Path(__file__).resolve().parent.parent
C_DIR = ROOT / "src" / "pymig" / "_core" / "c"


def _cpu_info_with(env_value: str | None, backend: str = "compiled") -> dict:
    """cpu_info() of a fresh interpreter with PYMIG_DISABLE_SIMD set to env_value."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYMIG_DISABLE_SIMD",
                                                            "PYMIG_PUREPYTHON")}
    if env_value is not None:
        env["PYMIG_DISABLE_SIMD"] = env_value
    if backend == "reference":
        env["PYMIG_PUREPYTHON"] = "1"
    env["PYTHONPATH"] = child_env()["PYTHONPATH"]
    code = "import json, pymig.core as c; print(json.dumps(c.cpu_info()))"
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


@needs_compiled
def test_cpu_info_reports_a_usable_variant():
    info = COMPILED.cpu_info()
    assert info["variant"] in info["available"]
    assert info["variant"] not in info["disabled"]
    assert "scalar" in info["available"]
    assert [v for v in SIMD_VARIANTS if v in info["available"]] == info["available"]
    usable = [v for v in info["available"] if v not in info["disabled"]]
    assert info["variant"] == usable[0]  # the most preferred one wins
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if "avx2" in info["available"]:
        assert re.search(r"\bavx2\b", flags)
    if "avx512" in info["available"]:
        assert re.search(r"\bavx512f\b", flags) and re.search(r"\bavx512bw\b", flags)


@needs_compiled
@pytest.mark.parametrize("value, disabled", [
    ("all", ["avx512", "avx2"]), ("avx2,avx512", ["avx512", "avx2"]),
    ("AVX512", ["avx512"]), ("", [])])
def test_disable_simd_forces_fallbacks(value, disabled):
    info = _cpu_info_with(value)
    assert info["disabled"] == disabled
    usable = [v for v in info["available"] if v not in disabled]
    assert info["variant"] == usable[0]
    if value == "all":
        assert info["variant"] == "scalar"


def test_disable_simd_parsing_warns_on_unknown_names():
    with pytest.warns(RuntimeWarning, match="avx-512"):
        assert disabled_variants("avx2, avx-512") == ["avx2"]
    with pytest.warns(RuntimeWarning, match="cannot be disabled"):
        assert disabled_variants("scalar,all") == ["avx512", "avx2"]
    assert disabled_variants(None) == [] and disabled_variants(" ,") == []


def test_reference_cpu_info():
    info = REF.cpu_info()
    assert info["variant"] == "scalar" and info["backend"] == "reference"
    assert _cpu_info_with("all", "reference")["disabled"] == ["avx512", "avx2"]


@needs_compiled
def test_setter_refuses_variants_this_machine_cannot_run():
    from pymig._core import cpu

    before = cpu.cpu_info()["variant"]
    for name in SIMD_VARIANTS:
        if name not in cpu.cpu_info()["available"]:
            with pytest.raises(ValueError, match="not available"):
                cpu._set_variant(name)
    with pytest.raises(ValueError):
        cpu._set_variant("sse9")
    assert cpu.cpu_info()["variant"] == before


@needs_compiled
def test_read_sum_ceiling_agrees_across_variants():
    import numpy as np
    from pymig._core import cpu

    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    words = data[: len(data) // 8 * 8].view("<u8")
    expected = (int(words.sum(dtype=np.uint64)) + int(data[len(data) // 8 * 8:].sum())) % 2**64
    before = cpu.cpu_info()["variant"]
    try:
        for name in cpu.cpu_info()["available"]:
            if name not in cpu.cpu_info()["disabled"]:
                cpu._set_variant(name)
                assert cpu._read_sum(data) == expected
    finally:
        cpu._set_variant(before)


def test_only_dispatch_files_carry_simd_target_attributes():
    """Per-function targets keep the default build portable: SIMD code lives only in
    *_avx2.c / *_avx512.c, chosen at run time; nothing is built with -march=native."""
    pattern = re.compile(r"target\s*\(|immintrin\.h|__AVX2__|__AVX512")
    offenders = []
    for path in sorted(C_DIR.glob("*.[ch]")):
        dispatch = re.fullmatch(r".+_avx(2|512)\.c", path.name)
        if pattern.search(path.read_text()) and not dispatch:
            offenders.append(path.name)
    assert offenders == []
    assert not re.search(r"[\"']-march", (ROOT / "setup.py").read_text())
    assert sorted(p.name for p in C_DIR.glob("*_avx*.c")) == [
        "bitmap_avx2.c", "packet_avx2.c", "zeropage_avx2.c", "zeropage_avx512.c"]
    for path in C_DIR.glob("*_avx*.c"):
        assert "#if defined(__x86_64__)" in path.read_text()  # aarch64 builds the rest
