# distutils: sources = src/pymig/_core/c/simguest.c
"""Native writers of the simulated guest (private: see :mod:`pymig.guest.simulated`).

:class:`Writers` owns one C thread per simulated vCPU.  The threads run without the GIL; every
method that may wait for them (pause, dirty-log switches) releases it too.  The object keeps a
buffer export of each RAM block it writes, so the blocks cannot be unmapped under the threads;
:meth:`Writers.close` joins the threads and then lets go of the blocks.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free

import os


cdef extern from "simguest.h" nogil:
    enum: PYMIG_SIM_MAX_VCPUS

    struct pymig_sim_block:
        uint8_t *base
        uint64_t gpa
        uint64_t npages

    struct pymig_sim_params:
        pass

    struct pymig_sim_cpu:
        uint64_t phase
        uint64_t pos
        uint64_t pass_ "pass"
        uint64_t rng
        uint64_t acc
        uint64_t sum

    struct pymig_sim:
        pass

    int pymig_sim_new(const pymig_sim_params *params, const pymig_sim_block *blocks,
                      uint32_t nblocks, pymig_sim **out)
    void pymig_sim_free(pymig_sim *sim)
    void pymig_sim_run(pymig_sim *sim)
    void pymig_sim_pause(pymig_sim *sim)
    void pymig_sim_set_throttle(pymig_sim *sim, int percent)
    void pymig_sim_set_logging(pymig_sim *sim, int on)
    void pymig_sim_sync(pymig_sim *sim, uint32_t block, uint64_t *out)
    int pymig_sim_set_dirty_limit(pymig_sim *sim, uint32_t index, double pages_per_s)
    void pymig_sim_dirty_counts(pymig_sim *sim, uint64_t *out)
    int pymig_sim_get_cpu(pymig_sim *sim, uint32_t index, pymig_sim_cpu *cpu)
    int pymig_sim_set_cpu(pymig_sim *sim, uint32_t index, const pymig_sim_cpu *cpu)

PAGE_SIZE = 4096
# Below this many bitmap words (64 Ki pages) a sync is quicker than giving the GIL away.
cdef enum:
    NOGIL_MIN_WORDS = 1024
CPU_FIELDS = ("phase", "pos", "pass_number", "rng", "acc", "partial_sum")


cdef _raise(int err, str what):
    raise OSError(-err, f"simulated guest: {what}: {os.strerror(-err)}")


cdef class Writers:
    """The writer threads of one simulated guest, created stopped.

    ``blocks``: ``(guest-physical address, writable uint8 array)`` per RAM block.  ``params``:
    the parameter block page (pymig.guest.workloads), packed for a clock of one tick per
    nanosecond; the writers take their workload, shares and pacing from it.
    """

    cdef pymig_sim *sim
    cdef list _blocks
    cdef readonly int vcpus
    cdef readonly list nwords

    def __cinit__(self):
        self.sim = NULL

    def __init__(self, list blocks, const uint8_t[::1] params not None):
        cdef pymig_sim_block *cblocks = NULL
        cdef uint8_t[::1] view
        cdef int err
        if not blocks:
            raise ValueError("a simulated guest needs RAM blocks")
        if params.shape[0] != PAGE_SIZE:
            raise ValueError(f"a parameter block is {PAGE_SIZE} bytes, not {params.shape[0]}")
        self._blocks = [array for _, array in blocks]
        self.vcpus = int.from_bytes(bytes(params[12:16]), "little")
        self.nwords = []
        cblocks = <pymig_sim_block *>calloc(len(blocks), sizeof(pymig_sim_block))
        try:
            if cblocks == NULL:
                raise MemoryError()
            for i, (gpa, block) in enumerate(blocks):
                view = block
                if view.shape[0] % PAGE_SIZE or view.shape[0] == 0 or gpa % PAGE_SIZE:
                    raise ValueError(f"RAM block {i} is not a whole number of {PAGE_SIZE}-byte "
                                     f"pages")
                cblocks[i].base = &view[0]
                cblocks[i].gpa = gpa
                cblocks[i].npages = view.shape[0] // PAGE_SIZE
                self.nwords.append((cblocks[i].npages + 63) // 64)
            err = pymig_sim_new(<const pymig_sim_params *>&params[0], cblocks, len(blocks),
                                &self.sim)
            if err:
                _raise(err, "cannot start the writers")
        finally:
            free(cblocks)

    cdef pymig_sim *_live(self) except NULL:
        if self.sim == NULL:
            raise ValueError("the simulated guest's writers are closed")
        return self.sim

    def run(self):
        """Let the writers run (again); their pacing clocks restart now."""
        cdef pymig_sim *sim = self._live()
        with nogil:
            pymig_sim_run(sim)

    def pause(self):
        """Return once every writer is stopped between two batches of page writes."""
        cdef pymig_sim *sim = self._live()
        with nogil:
            pymig_sim_pause(sim)

    def set_throttle(self, int percent):
        cdef pymig_sim *sim = self._live()
        with nogil:
            pymig_sim_set_throttle(sim, percent)

    def set_logging(self, bint on):
        """Switch dirty logging; returns once the switch holds for every write that follows."""
        cdef pymig_sim *sim = self._live()
        with nogil:
            pymig_sim_set_logging(sim, on)

    def sync(self, uint32_t block, uint64_t[::1] out not None):
        """Fetch-and-clear block ``block``'s dirty bitmap into ``out`` (its ``nwords`` words)."""
        cdef pymig_sim *sim = self._live()
        if block >= len(self._blocks):
            raise IndexError(f"no RAM block {block}")
        if out.shape[0] != self.nwords[block]:
            raise ValueError(f"block {block}'s bitmap has {self.nwords[block]} words, not "
                             f"{out.shape[0]}")
        if out.shape[0] < NOGIL_MIN_WORDS:
            pymig_sim_sync(sim, block, &out[0])
        else:
            with nogil:
                pymig_sim_sync(sim, block, &out[0])

    def set_dirty_limit(self, uint32_t index, double pages_per_s):
        """Cap writer ``index`` at ``pages_per_s`` dirtied pages per second (0: no limit)."""
        cdef int err = pymig_sim_set_dirty_limit(self._live(), index, pages_per_s)
        if err:
            _raise(err, f"cannot set writer {index}'s dirty limit to {pages_per_s}")

    def dirty_counts(self):
        """Per writer, the pages of its share it has dirtied so far (counted where it logs
        them, logging on or not)."""
        cdef pymig_sim *sim = self._live()
        cdef uint64_t counts[PYMIG_SIM_MAX_VCPUS]
        pymig_sim_dirty_counts(sim, counts)
        return [counts[i] for i in range(self.vcpus)]

    def get_cpu(self, uint32_t index):
        """Writer ``index``'s state as a dict of ``CPU_FIELDS``; the writers must be paused."""
        cdef pymig_sim_cpu cpu
        cdef int err = pymig_sim_get_cpu(self._live(), index, &cpu)
        if err:
            _raise(err, f"cannot read writer {index}'s state")
        return {"phase": cpu.phase, "pos": cpu.pos, "pass_number": cpu.pass_, "rng": cpu.rng,
                "acc": cpu.acc, "partial_sum": cpu.sum}

    def set_cpu(self, uint32_t index, dict state):
        """Load writer ``index``'s state (a dict of ``CPU_FIELDS``); the writers must be paused."""
        cdef pymig_sim_cpu cpu
        cpu.phase = state["phase"]
        cpu.pos = state["pos"]
        cpu.pass_ = state["pass_number"]
        cpu.rng = state["rng"]
        cpu.acc = state["acc"]
        cpu.sum = state["partial_sum"]
        cdef int err = pymig_sim_set_cpu(self._live(), index, &cpu)
        if err:
            _raise(err, f"cannot load writer {index}'s state")

    def close(self):
        """Stop and join the threads, then release the RAM blocks.  Idempotent."""
        cdef pymig_sim *sim = self.sim
        self.sim = NULL
        if sim != NULL:
            with nogil:
                pymig_sim_free(sim)
        self._blocks = []

    def __dealloc__(self):
        if self.sim != NULL:
            pymig_sim_free(self.sim)
            self.sim = NULL
