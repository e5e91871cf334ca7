/*
 * The simulated guest's writers: one native thread per simulated vCPU, running a built-in
 * workload over guest RAM with no Python (and no GIL) involved, and a dirty log with KVM's
 * semantics.  The workloads are defined in pymig/guest/workloads.py (its docstring is the
 * definition); the writers are configured from the same parameter block the KVM guest's
 * assembly reads (asm/_defs.S), so one block means one thing to both guests.
 *
 * Functions return 0 or -errno and never touch Python objects.
 */
#ifndef PYMIG_SIMGUEST_H
#define PYMIG_SIMGUEST_H

#include <stdint.h>

#define PYMIG_SIM_PAGE_SIZE 4096u
#define PYMIG_SIM_MAILBOX_GPA 0x6000u
#define PYMIG_SIM_MAX_VCPUS 8u
/* The writers' clock is CLOCK_MONOTONIC: a tick of the parameter block is one nanosecond. */
#define PYMIG_SIM_TICKS_PER_US 1000u

enum pymig_sim_workload {
    PYMIG_SIM_IDLE = 1,
    PYMIG_SIM_DIRTIER = 2,
    PYMIG_SIM_SELFCHECK = 3,
    PYMIG_SIM_COMPUTE = 4,
};

enum pymig_sim_pattern {
    PYMIG_SIM_UNIFORM = 0,
    PYMIG_SIM_SEQUENTIAL = 1,
    PYMIG_SIM_HOTSPOT = 2,
};

enum pymig_sim_phase {
    PYMIG_SIM_FILL = 0, /* compute: filling the share with xorshift64 */
    PYMIG_SIM_FOLD = 1, /* compute: reading the share into this round's s */
    PYMIG_SIM_FEED = 2, /* compute: adding s to every word */
    PYMIG_SIM_DONE = 3, /* compute: result written; the writer only sleeps from now on */
};

/* One share record of the parameter block (+0x40 + 64 * i). */
struct pymig_sim_share_record {
    uint32_t first_gpa;
    uint32_t npages;
    uint32_t hot_pages;
    uint32_t zero;
    uint64_t seed;
    uint32_t batch_pages;     /* this vCPU's pacing: pages per batch (>= 1) */
    uint32_t zero2;
    uint64_t ticks_per_batch; /* this vCPU's ticks per batch, 0 = as fast as it can */
    uint8_t reserved[24];
};

/* The parameter block at guest-physical 0x5000, little-endian (x86 only, like KVM). */
struct pymig_sim_params {
    uint32_t magic;             /* "PMIG" */
    uint32_t version;           /* 1 */
    uint32_t workload;          /* enum pymig_sim_workload */
    uint32_t vcpus;
    uint32_t pattern;           /* enum pymig_sim_pattern */
    uint32_t hot_share;         /* share of writes to the hot part, x 2^32 */
    uint32_t batch_pages;       /* pages per pacing batch, even split (writers use shares[]) */
    uint32_t rounds;            /* compute */
    uint64_t ticks_per_batch;   /* even split; 0 = as fast as it can */
    uint64_t max_lag_ticks;
    uint32_t ticks_per_us;
    uint32_t reserved[3];
    struct pymig_sim_share_record shares[PYMIG_SIM_MAX_VCPUS];
};

/* One RAM block: host address, guest-physical base, size in guest pages. */
struct pymig_sim_block {
    uint8_t *base;
    uint64_t gpa;
    uint64_t npages;
};

/* A writer's whole state ("vCPU state"): enough to continue exactly where it stopped. */
struct pymig_sim_cpu {
    uint64_t phase; /* enum pymig_sim_phase (compute), 0 otherwise */
    uint64_t pos;   /* next page of the share (dirtier: writes so far in this pass) */
    uint64_t pass;  /* selfcheck: pass being stamped (>= 1); compute: round */
    uint64_t rng;   /* xorshift64 state (dirtier, compute fill) */
    uint64_t acc;   /* compute: checksum c so far */
    uint64_t sum;   /* compute: this round's s (partial while folding) */
};

struct pymig_sim;

/* Checks and copies the parameter block, allocates the dirty bitmaps (logging off), sets every
 * writer to the workload's initial state and starts the threads stopped.  -EINVAL for a block
 * that does not describe a workload in these RAM blocks.  The blocks must outlive the object. */
int pymig_sim_new(const struct pymig_sim_params *params, const struct pymig_sim_block *blocks,
                  uint32_t nblocks, struct pymig_sim **out);
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
/* Cap writer index's dirty rate at pages_per_s (0: no limit); -EINVAL for a bad index or
 * rate.  A new limit starts from now, with no credit saved up. */
int pymig_sim_set_dirty_limit(struct pymig_sim *sim, uint32_t index, double pages_per_s);
/* Each writer's count of the pages of its share it has dirtied (vcpus entries into out). */
void pymig_sim_dirty_counts(struct pymig_sim *sim, uint64_t *out);
int pymig_sim_get_cpu(struct pymig_sim *sim, uint32_t index, struct pymig_sim_cpu *cpu);
/* -EBUSY while running; -ERANGE for a position outside the writer's share or an unknown
 * phase. */
int pymig_sim_set_cpu(struct pymig_sim *sim, uint32_t index, const struct pymig_sim_cpu *cpu);

#endif
