/*
 * The simulated guest's writers: one native thread per simulated vCPU, running a built-in
 * workload over guest RAM with no Python (and no GIL) involved, and a dirty log with KVM's
 * semantics.  The workloads are defined in pymig/guest/workloads.py; this file and that
 * docstring must agree word for word.
 *
 * Functions return 0 or -errno and never touch Python objects.
 */
#ifndef PYMIG_SIMGUEST_H
#define PYMIG_SIMGUEST_H

#include <stdint.h>

#define PYMIG_SIM_PAGE_SIZE 4096u

enum pymig_sim_workload {
    PYMIG_SIM_IDLE = 0,
    PYMIG_SIM_DIRTIER = 1,
    PYMIG_SIM_SELFCHECK = 2,
    PYMIG_SIM_COMPUTE = 3,
};

enum pymig_sim_pattern {
    PYMIG_SIM_UNIFORM = 0,
    PYMIG_SIM_SEQUENTIAL = 1,
    PYMIG_SIM_HOTSPOT = 2,
};

enum pymig_sim_phase {
    PYMIG_SIM_FILL = 0, /* compute: filling the share with xorshift64 */
    PYMIG_SIM_FOLD = 1, /* compute: folding rounds */
    PYMIG_SIM_DONE = 2, /* compute: result written; the writer only sleeps from now on */
};

/* One RAM block: host address, guest-physical base, size in guest pages. */
struct pymig_sim_block {
    uint8_t *base;
    uint64_t npages;
};

/* One vCPU's share of the working set (see the parameter block in workloads.py). */
struct pymig_sim_share {
    uint32_t block;       /* RAM block holding the whole share */
    uint32_t seed32;      /* xorshift32 state to start from (dirtier) */
    uint64_t first_page;  /* page index inside that block */
    uint64_t npages;      /* m >= 1 */
    uint64_t hot_pages;   /* h in [1, m] */
    uint64_t first_frame; /* guest frame number of the first page (gpa >> 12) */
    uint64_t seed64;      /* xorshift64 state to start from (compute) */
};

struct pymig_sim_config {
    uint32_t workload;
    uint32_t pattern;
    uint32_t vcpus;
    uint32_t hot_share_q16;     /* 0..65536 */
    uint64_t rate_pages_per_s;  /* whole guest; 0 = as fast as it can */
    uint64_t rounds;            /* compute */
    uint32_t nblocks;
    uint32_t mailbox_block;     /* block holding the mailbox page (0x6000) */
    uint64_t mailbox_offset;    /* its byte offset inside that block */
    const struct pymig_sim_block *blocks;
    const struct pymig_sim_share *shares; /* vcpus of them */
};

/* A writer's whole state ("vCPU state"): enough to continue exactly where it stopped. */
struct pymig_sim_cpu {
    uint64_t phase; /* enum pymig_sim_phase (compute), 0 otherwise */
    uint64_t pos;   /* next page of the share */
    uint64_t pass;  /* selfcheck: pass being stamped (>= 1); compute: round */
    uint64_t rng;   /* xorshift32 (dirtier) or xorshift64 (compute fill) state */
    uint64_t acc;   /* compute: checksum so far */
    uint64_t sum;   /* compute: this round's partial sum */
};

struct pymig_sim;

/* Copies the configuration, allocates the dirty bitmaps (logging off), sets every writer to
 * the workload's initial state and starts the threads stopped.  The blocks must outlive the
 * object. */
int pymig_sim_new(const struct pymig_sim_config *cfg, struct pymig_sim **out);
/* Stops and joins the writers, frees everything. */
void pymig_sim_free(struct pymig_sim *sim);

void pymig_sim_run(struct pymig_sim *sim);
/* Returns once no writer is between the start and the end of a batch of page writes. */
void pymig_sim_pause(struct pymig_sim *sim);
void pymig_sim_set_throttle(struct pymig_sim *sim, int percent);
/* Returns once every write from now on is logged (on) or none is (off, bitmaps cleared). */
void pymig_sim_set_logging(struct pymig_sim *sim, int on);
/* Fetch-and-clear block's dirty bitmap into out (npages bits rounded up to u64 words). */
void pymig_sim_sync(struct pymig_sim *sim, uint32_t block, uint64_t *out);
int pymig_sim_get_cpu(struct pymig_sim *sim, uint32_t index, struct pymig_sim_cpu *cpu);
/* -EBUSY while running. */
int pymig_sim_set_cpu(struct pymig_sim *sim, uint32_t index, const struct pymig_sim_cpu *cpu);

#endif
