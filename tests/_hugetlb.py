"""A hugetlb pool for tests of hugetlb-backed guest RAM: reserved for the test, given back."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from pymig.memory import hugetlb_pool

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


@contextmanager
def free_huge_pages(pages: int, *, exactly: bool = False):
    """At least (or ``exactly``) ``pages`` free huge pages for the duration; the pool's size is
    restored after.  Skips, saying why, where the pool cannot be sized (not root, no hugetlb)."""
    _, total, free = hugetlb_pool()
    try:
        with open(NR_HUGEPAGES) as f:
            before = int(f.read())
        if free < pages or (exactly and free != pages):
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(total + pages - free))
    except OSError as exc:
        pytest.skip(f"cannot reserve {pages} huge pages through {NR_HUGEPAGES}: {exc}")
    try:
        if hugetlb_pool()[2] < pages:
            pytest.skip(f"the kernel gave the hugetlb pool only {hugetlb_pool()[2]} free pages "
                        f"of the {pages} asked for (memory too fragmented)")
        yield
    finally:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(before))
