"""The nogil kernels under a thread pool, and decode's promises about guest memory it must
not read or write, each in a subprocess with a timeout so a deadlock or a stray access fails
the test instead of hanging or killing the run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from _core_helpers import needs_compiled

from _childenv import child_env

pytestmark = needs_compiled


def _run(code: str, timeout: float = 120) -> str:
    env = child_env()
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_kernels_from_a_thread_pool():
    out = _run("""
        import numpy as np
        from concurrent.futures import ThreadPoolExecutor
        from pymig.core import load_backend

        k = load_backend("compiled")
        PS, N = 4096, 2048                     # 8 MiB per job: every call releases the GIL
        rng = np.random.default_rng(5)
        shared = rng.integers(0, 256, N * PS, dtype=np.uint8)
        shared[: N * PS // 2] = 0              # half zero pages, read by every thread at once
        full = np.full(k.new_bitmap(N).shape, 2**64 - 1, dtype=np.uint64)
        sparse = (rng.random(N * 64) < 0.02)
        sparse_bm = np.packbits(sparse, bitorder="little").view("<u8").astype(np.uint64)

        def job(i):
            bm = full.copy()
            dst = np.full(N * PS, i % 255 + 1, dtype=np.uint8)
            out = bytearray(1 << 20)
            cursor = 0
            while (r := k.encode_packet(shared, PS, i, bm, N, cursor, out)).nbytes:
                k.decode_packet(memoryview(out)[: r.nbytes], dst, PS, i, N)
                cursor = r.cursor
            assert np.array_equal(dst, shared), i
            assert k.zero_bitmap(shared, PS, full, N).tolist() == zero_ref
            assert k.bitmap_runs(sparse_bm, N * 64).tolist() == runs_ref
            assert k.is_zero(shared[: N * PS // 2]) and not k.is_zero(shared)
            return i

        zero_ref = k.zero_bitmap(shared, PS, full, N).tolist()
        runs_ref = k.bitmap_runs(sparse_bm, N * 64).tolist()
        with ThreadPoolExecutor(4) as pool:
            done = sorted(pool.map(job, range(24)))
        print(len(done))
    """)
    assert out.strip() == "24"


def test_decode_never_touches_known_zero_pages_nor_writes_zero_over_zero():
    """Guest pages that `present` marks known-zero are made unreadable, pages that are already
    zero read-only: a ZERO run over them must neither read the first nor write the second."""
    out = _run("""
        import ctypes, mmap
        import numpy as np
        import xxhash
        from pymig.core import load_backend

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        PS, N = 4096, 16

        def packet(runs):
            payload = b"".join(first.to_bytes(8, "little") + count.to_bytes(4, "little")
                               + bytes([kind, 0, 0, 0]) for first, count, kind in runs)
            head = b"PMGP" + (2).to_bytes(2, "little") + bytes(2) + bytes(4) + \\
                PS.to_bytes(4, "little") + len(runs).to_bytes(4, "little") + \\
                len(payload).to_bytes(4, "little")
            return head + xxhash.xxh3_64_intdigest(payload + head).to_bytes(8, "little") + \\
                payload

        for name in ("compiled", "reference"):
            k = load_backend(name)
            mem = mmap.mmap(-1, N * PS)
            arr = np.frombuffer(mem, dtype=np.uint8)
            arr[8 * PS: 9 * PS] = 7                    # page 8 has stale data
            base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
            assert libc.mprotect(base, 4 * PS, 0) == 0               # pages 0-3: no access
            assert libc.mprotect(base + 4 * PS, 4 * PS, mmap.PROT_READ) == 0   # 4-7: read only
            present = k.new_bitmap(N)
            k.bitmap_set_range(present, N, 4, 12)      # 0-3 known zero, 4-15 may hold data
            result = k.decode_packet(packet([(0, 9, 2)]), mem, PS, 0, N, present)
            assert result == (0, 9, 1, 0), result
            assert k.bitmap_indices(present, N).tolist() == list(range(9, 16))
            assert not arr[8 * PS: 9 * PS].any()
            libc.mprotect(base, 8 * PS, mmap.PROT_READ | mmap.PROT_WRITE)
            del arr
            print(name, "ok")
    """)
    assert out.split() == ["compiled", "ok", "reference", "ok"]
