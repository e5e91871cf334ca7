"""Guest RAM: one :class:`RamBlock` per contiguous range of guest-physical memory.

A block is an mmap the guest writes (through KVM's memory slot or the simulated writer) and the
migration reads (source) or fills (destination).  Two facts about fresh anonymous memory shape
the whole migration:

* a page nobody touched since the mmap is zero and is not resident, so :meth:`RamBlock.touched`
  (``mincore``) tells which pages may hold data without reading a single page: an idle guest
  with 16 GiB of RAM costs what it touched, not what it has.  A page the host swapped out is
  not resident either, yet holds data: with swap in use, ``touched`` also asks where each
  page is (the page map's swap bit; a memfd's SEEK_DATA, shmem keeping no swap entry in the
  page tables);
* the first write to a fresh page costs a fault (~1.5 us per 4 KiB page here, a third of that
  with transparent huge pages; on a host that is itself a VM, ten times that for memory its
  hypervisor took back), so blocks ask for huge pages and a destination can populate its RAM
  ahead of the data, from several threads (:meth:`RamBlock.populate`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

MADV_POPULATE_WRITE = 23  # linux/mman.h; Python's mmap module does not name it before 3.13

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int
# Called through ctypes, which lets go of the GIL for the call: Python's own mmap.madvise
# keeps it, so one thread faulting in a GiB of cold memory (seconds) froze every other.
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc's; other C libraries lack it
if _malloc_trim is not None:
    _malloc_trim.argtypes = [ctypes.c_size_t]
    _malloc_trim.restype = ctypes.c_int


MADV_DONTNEED = 4  # linux/mman.h
MADV_REMOVE = 9


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) on [address, address + length), without the GIL; raises OSError."""
    while _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"madvise({advice}) of {length} bytes at {address:#x}: "
                               f"{os.strerror(err)}")


def swap_in_use() -> bool:
    """Whether the host has swap space (a swap device or file, zram and zswap included);
    True when /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"SwapTotal:"):
                    return int(line.split()[1]) > 0
    except (OSError, ValueError, IndexError):
        pass
    return True


def _pread_whole(path: str, view: memoryview, offset: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{path}: {done} of {len(view)} bytes at {offset:#x}")
            done += n
    finally:
        os.close(fd)


def _data_pages(fd: int, host_pages: int) -> np.ndarray:
    """Per host page of the file ``fd``, whether it holds data (SEEK_DATA / SEEK_HOLE)."""
    pages = np.zeros(host_pages, dtype=bool)
    end = host_pages * mmap.PAGESIZE
    at = 0
    while at < end:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past here
                break
            raise
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        pages[start // mmap.PAGESIZE:(stop + mmap.PAGESIZE - 1) // mmap.PAGESIZE] = True
        at = stop
    return pages


def touch_without_gil(address: int, nbytes: int) -> None:
    """Read [address, address + nbytes) once with the GIL released (ctypes lets go of it for
    the call).  A reader of guest RAM calls it first where a page may still be missing in
    post-copy: a thread that waits for a page while holding the GIL would stop the very
    threads that fetch and place it."""
    scratch = ctypes.create_string_buffer(nbytes)
    ctypes.memmove(scratch, ctypes.c_void_p(address), nbytes)


def release_freed_memory() -> None:
    """Free what a finished migration left to the collector (its packet buffers sit in
    reference cycles with the machine they served) and hand the C heap's free pages back to
    the system, so that a process that migrates again and again stays the same size rather
    than wandering by megabytes with when the collector last ran.  Tens of milliseconds at
    most; called between migrations, never inside one."""
    import gc

    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)

#: Populate works in pieces of this many bytes (a multiple of any huge page size it meets),
#: shared out among threads: on a host that is itself a VM, each first touch of cold memory
#: costs CPU time in its hypervisor, and two CPUs fault it in twice as fast as one.
POPULATE_CHUNK_BYTES = 64 << 20
#: At most this many threads populate at once (QEMU's -mem-prealloc uses up to 16).
POPULATE_MAX_THREADS = 16


def populate_threads() -> int:
    """Threads a populate uses by default: one per CPU this process may run on."""
    return min(len(os.sched_getaffinity(0)), POPULATE_MAX_THREADS)

MAP_HUGETLB = 0x40000  # linux/mman.h

Backing = Literal["anon", "memfd", "hugetlb"]
BACKINGS: tuple[str, ...] = ("anon", "memfd", "hugetlb")


def _meminfo() -> dict[str, list[str]]:
    fields = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, rest = line.partition(":")
            fields[name] = rest.split()
    return fields


def memory_available() -> int:
    """Bytes the kernel reckons it can give new allocations without swapping
    (MemAvailable in /proc/meminfo)."""
    return int(_meminfo()["MemAvailable"][0]) * 1024


def hugetlb_pool() -> tuple[int, int, int]:
    """(huge page size in bytes, pages in the pool, pages free) from /proc/meminfo."""
    fields = _meminfo()
    size = int(fields.get("Hugepagesize", ["2048"])[0]) * 1024
    return size, int(fields.get("HugePages_Total", ["0"])[0]), \
        int(fields.get("HugePages_Free", ["0"])[0])


def _map_hugetlb(name: str, size_bytes: int) -> mmap.mmap:
    huge, total, free = hugetlb_pool()
    if size_bytes % huge:
        raise ValueError(f"RAM block {name!r}: {size_bytes} bytes is not a multiple of the "
                         f"huge page size {huge}, which hugetlb backing needs")
    try:
        return mmap.mmap(-1, size_bytes,
                         flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        need = size_bytes // huge
        raise OSError(exc.errno, f"RAM block {name!r}: cannot reserve {need} huge pages of "
                                 f"{huge >> 10} KiB from the hugetlb pool ({free} of {total} "
                                 f"free; a larger pool: echo N > /proc/sys/vm/nr_hugepages): "
                                 f"{exc.strerror}") from None


def _map(name: str, size_bytes: int, *, flags: int, fd: int = -1) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size_bytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        if exc.errno != errno.ENOMEM:
            raise
        raise not_enough_memory(size_bytes, f" (block {name!r})") from None


def not_enough_memory(size_bytes: int, what: str = "") -> OSError:
    """The ENOMEM of a mapping of ``size_bytes`` of guest RAM, in numbers."""
    return OSError(errno.ENOMEM, f"not enough memory for {_size(size_bytes)} of guest RAM"
                                 f"{what}: the host has {_size(memory_available())} available")


def _size(nbytes: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.3g} {unit}"
    return f"{nbytes} bytes"


class RamBlock:
    """A contiguous range of guest RAM backed by an mmap this object owns.

    ``array`` is a writable uint8 view of the whole block; ``mem`` the mmap itself.  While any
    view of the block exists the mmap cannot be closed, so compiled kernels holding a view never
    read unmapped memory.
    """

    def __init__(self, name: str, mem: mmap.mmap, size_bytes: int, guest_phys_addr: int,
                 block_id: int, page_size: int, fd: int | None, backing: Backing):
        self.name = name
        self.mem = mem
        self.size_bytes = size_bytes
        self.guest_phys_addr = guest_phys_addr
        self.block_id = block_id
        self.page_size = page_size
        self.npages = size_bytes // page_size
        self.backing = backing
        self.fd = fd
        self.array = np.frombuffer(mem, dtype=np.uint8)
        self.address = self.array.ctypes.data

    @classmethod
    def allocate(cls, name: str, size_bytes: int, guest_phys_addr: int = 0, *, block_id: int = 0,
                 page_size: int = 4096, backing: Backing = "anon", hugepages: bool = True,
                 populate: bool = False) -> "RamBlock":
        """Map ``size_bytes`` of fresh, zeroed guest RAM.

        ``backing="memfd"`` shares the memory through a file descriptor (``fd``) another process
        could map; ``backing="hugetlb"`` takes it from the host's pool of huge pages
        (``/proc/sys/vm/nr_hugepages``), reserved when mapped: memory a host sets aside for
        guests, which a VM host's own hypervisor keeps backed once touched, where memory freed
        to the kernel comes back cold (first touch 0.5-0.65 GB/s on the development host,
        against 4.9-5.8 GB/s from a pool touched before).  ``hugepages`` asks for transparent
        huge pages (first touch 2-3x faster than 4 KiB pages); ``populate`` faults every page
        in now rather than on first touch.
        """
        if page_size < 512 or page_size & (page_size - 1):
            raise ValueError(f"page size must be a power of two >= 512, not {page_size}")
        if size_bytes <= 0 or size_bytes % page_size:
            raise ValueError(f"RAM block {name!r}: size {size_bytes} is not a positive multiple "
                             f"of the page size {page_size}")
        if guest_phys_addr % page_size:
            raise ValueError(f"RAM block {name!r}: guest address {guest_phys_addr:#x} is not "
                             f"page aligned")
        fd = None
        if backing == "memfd":
            fd = os.memfd_create(f"pymig-{name}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size_bytes)
                mem = _map(name, size_bytes, fd=fd, flags=mmap.MAP_SHARED)
            except BaseException:
                os.close(fd)
                raise
        elif backing == "anon":
            mem = _map(name, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        elif backing == "hugetlb":
            mem = _map_hugetlb(name, size_bytes)
            hugepages = False  # they are huge pages already
        else:
            raise ValueError(f"unknown RAM backing {backing!r} (use one of "
                             f"{', '.join(BACKINGS)})")
        if hugepages:
            mem.madvise(mmap.MADV_HUGEPAGE)
        block = cls(name, mem, size_bytes, guest_phys_addr, block_id, page_size, fd, backing)
        if populate:
            block.populate(0, block.npages)
        return block

    def touched(self) -> np.ndarray:
        """Bitmap (KVM layout, uint64 words) of pages that may be non-zero.

        A clear bit means the page was never faulted in since allocation, so it is zero and need
        not be read.  Set bits are a superset of the written pages (reads and huge pages fault
        in neighbours too); callers still zero-check them.  A page swapped out counts as
        touched: it holds data the migration must read.
        """
        vec = np.empty(self.npages * self.page_size // mmap.PAGESIZE, dtype=np.uint8)
        if _libc.mincore(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size_bytes),
                         ctypes.c_void_p(vec.ctypes.data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore on RAM block {self.name!r}: {os.strerror(err)}")
        resident = (vec & 1).astype(bool)
        # (asked after mincore: a page swapped out before it was, swap is still there now)
        if self.backing != "hugetlb" and swap_in_use():
            resident |= self._swapped_or_allocated()
        if self.page_size != mmap.PAGESIZE:
            resident = resident.reshape(self.npages, -1).any(axis=1)
        words = (self.npages + 63) // 64
        packed = np.zeros(words * 8, dtype=np.uint8)
        bits = np.packbits(resident, bitorder="little")
        packed[: bits.size] = bits
        return packed.view("<u8").astype(np.uint64, copy=False)

    def _swapped_or_allocated(self) -> np.ndarray:
        """Per host page, whether it may hold data mincore cannot see: for anonymous memory,
        swapped out (bit 62 of its page map entry, readable without privileges); for a
        memfd, every page of the file that holds data (SEEK_DATA), swapped or not."""
        host_pages = self.size_bytes // mmap.PAGESIZE
        if self.fd is not None:
            return _data_pages(self.fd, host_pages)
        entries = np.empty(host_pages, dtype="<u8")
        _pread_whole("/proc/self/pagemap", memoryview(entries).cast("B"),
                     self.address // mmap.PAGESIZE * 8)
        return ((entries >> np.uint64(62)) & np.uint64(1)).astype(bool)

    def populate(self, first_page: int, npages: int, *, threads: int | None = None,
                 chunk_bytes: int = POPULATE_CHUNK_BYTES) -> None:
        """Fault in ``npages`` pages from ``first_page`` for writing, ahead of the data.

        The range goes in ``chunk_bytes`` pieces (whole huge pages, counted from the block's
        start) to ``threads`` threads (default :func:`populate_threads`), none of them holding
        the GIL while it faults.  The first failure stops the rest and is raised, naming the
        block; an interrupt (Ctrl-C) stops it after the pieces under way.
        """
        if npages <= 0:
            return
        if first_page < 0 or first_page + npages > self.npages:
            raise ValueError(f"pages [{first_page}, {first_page + npages}) outside RAM block "
                             f"{self.name!r} of {self.npages} pages")
        if chunk_bytes <= 0 or chunk_bytes % self.page_size:
            raise ValueError(f"populate pieces of {chunk_bytes} bytes are not whole pages of "
                             f"{self.page_size}")
        if self.mem.closed:
            raise ValueError(f"RAM block {self.name!r} is closed")
        if self.backing == "hugetlb":  # a piece must be whole huge pages, whatever their size
            huge = hugetlb_pool()[0]
            chunk_bytes = -(-chunk_bytes // huge) * huge
        start = first_page * self.page_size
        end = start + npages * self.page_size
        first_cut = (start // chunk_bytes + 1) * chunk_bytes
        pieces = [(start, min(first_cut, end))]
        pieces += [(at, min(at + chunk_bytes, end)) for at in range(first_cut, end, chunk_bytes)]
        workers = min(threads or populate_threads(), len(pieces))
        if workers <= 1:
            for piece in pieces:
                self._populate_piece(*piece)
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix=f"populate-{self.name}")
        try:
            for future in [pool.submit(self._populate_piece, *piece) for piece in pieces]:
                future.result()
        finally:
            # after a failure or an interrupt: the pieces under way finish, the rest never start
            pool.shutdown(wait=True, cancel_futures=True)

    def _populate_piece(self, start: int, end: int) -> None:
        while _libc.madvise(ctypes.c_void_p(self.address + start), ctypes.c_size_t(end - start),
                            MADV_POPULATE_WRITE) != 0:
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"faulting in bytes [{start}, {end}) of RAM block "
                                   f"{self.name!r}: {os.strerror(err)}")

    def discard(self, runs) -> None:
        """Drop the contents of pages ``runs`` ((first page, count) pairs): they read as zero
        again and are no longer resident (anonymous memory: MADV_DONTNEED; memfd: the file's
        pages too, MADV_REMOVE), so a page registered with userfaultfd faults again."""
        advice = MADV_REMOVE if self.backing == "memfd" else MADV_DONTNEED
        for first, count in runs:
            first, count = int(first), int(count)
            if first < 0 or count < 0 or first + count > self.npages:
                raise ValueError(f"pages [{first}, {first + count}) outside RAM block "
                                 f"{self.name!r} of {self.npages}")
            madvise(self.address + first * self.page_size, count * self.page_size, advice)

    def no_hugepages(self) -> None:
        """Stop asking for transparent huge pages (pages placed one by one stay that way)."""
        if self.backing != "hugetlb":
            self.mem.madvise(mmap.MADV_NOHUGEPAGE)

    def page(self, index: int) -> memoryview:
        """A writable view of one page (tests and tools; hot paths use the compiled core)."""
        if not 0 <= index < self.npages:
            raise IndexError(f"page {index} outside RAM block {self.name!r} of {self.npages}")
        start = index * self.page_size
        return memoryview(self.mem)[start:start + self.page_size]

    def close(self) -> None:
        """Unmap the block.  Raises BufferError while a view of it is still alive."""
        if self.mem.closed:
            return
        self.array = None  # drop our own export so the mmap can close
        self.mem.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __repr__(self) -> str:
        return (f"RamBlock({self.name!r}, id={self.block_id}, gpa={self.guest_phys_addr:#x}, "
                f"size={self.size_bytes}, page_size={self.page_size})")
