"""Declares the compiled core; everything else lives in pyproject.toml.

Every ``src/pymig/_core/*.pyx`` becomes ``pymig._core.<name>``; a module names the C files it
needs with a ``# distutils: sources = ...`` line at its top.  Build switches:

* ``PYMIG_DEBUG=1``    -O0 -g and Cython line tracing
* ``PYMIG_SANITIZE=1`` AddressSanitizer + UndefinedBehaviorSanitizer
* ``PYMIG_ANNOTATE=1`` writes Cython's HTML annotation next to each .pyx

SIMD code is compiled per function with ``__attribute__((target(...)))`` and chosen at import,
so the default build never uses -march=native and runs on any x86-64 (or aarch64).
"""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

CORE = "src/pymig/_core"
debug = os.environ.get("PYMIG_DEBUG") == "1"
sanitize = os.environ.get("PYMIG_SANITIZE") == "1"

cflags = ["-O0", "-g"] if debug else ["-O3"]
cflags += ["-fno-strict-aliasing", "-Wno-unused-function", "-Wno-unreachable-code"]
ldflags = []
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if debug:
    macros.append(("CYTHON_TRACE_NOGIL", "1"))
if sanitize:
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    ldflags += ["-fsanitize=address,undefined"]

extensions = [
    Extension(
        "pymig._core." + os.path.splitext(os.path.basename(pyx))[0],
        [pyx],
        include_dirs=[CORE + "/c"],
        depends=sorted(glob.glob(CORE + "/c/**/*.h", recursive=True)),
        define_macros=macros,
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    for pyx in sorted(glob.glob(CORE + "/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=os.environ.get("PYMIG_ANNOTATE") == "1",
        compiler_directives={"linetrace": debug, "embedsignature": True},
    )
)
