/*
 * Simulated guest writers (see simguest.h; the workloads are defined in
 * pymig/guest/workloads.py and each batch_* function below follows that definition).
 *
 * Dirty log, as KVM keeps it: a writer stores to a page, THEN sets the page's bit with release
 * ordering; sync exchanges each word with 0 with acquire ordering.  So every write whose bit a
 * sync consumed is visible to whoever reads the page after that sync, and a write whose bit a
 * sync did not consume is still in the bitmap for the next one: no write is ever lost.
 *
 * Stopping: a writer works in batches of at most BATCH_MAX pages.  It reads the control words
 * (running, logging, throttle) under the lock at the start of a batch, marks itself in_batch,
 * drops the lock for the page writes and takes it back to clear in_batch.  pause() and
 * set_logging() only wait for batches in flight, so they return within one batch (~64 pages,
 * tens of microseconds) plus scheduling delay; a writer sleeping between batches is already
 * stopped.  The lock is taken twice per batch, never per page.
 *
 * Pacing follows the parameter block exactly as the KVM guest's pace() does (workloads.py,
 * "Pacing"), with CLOCK_MONOTONIC nanoseconds as ticks: after every batch_pages page writes the
 * deadline advances by ticks_per_batch (both from the writer's share record) and the writer
 * waits for it (a timed condition wait, so
 * pause/close/throttle changes wake it); a writer more than max_lag_ticks behind restarts its
 * deadline from now.  The deadline restarts at every run(), as a vCPU's would after a pause.
 *
 * Throttle p %: in every 10 ms timeslice a writer may run for (100 - p) % of it and sleeps the
 * rest.  Its deadline moves on by the time it slept (its clock stops), so a throttled writer
 * achieves (100 - p) % of its rate whether or not it is CPU-bound.
 *
 * Dirty rate and dirty limit: every page a batch writes is a page of the writer's share that it
 * logs, so after each batch the writer adds the batch's page writes to its `dirtied` count (the
 * host reads the counts to measure each vCPU's dirty rate; the mailbox page, shared by all
 * writers, is not counted).  A writer with a dirty limit
 * of q pages/s is charged 1/q s per page it dirtied (a GCRA: `limit_paid_ns` is when its pages
 * so far fall within the quota, never more than LIMIT_CREDIT_NS in the past) and starts no
 * batch before that time, in batches of at most q / LIMIT_BATCHES_PER_S pages so that the
 * rate is even at the millisecond scale.  Unlike the throttle, the limit does not stop the
 * writer's clock: a paced writer held back by it falls behind and restarts its deadline, as a
 * KVM vCPU would.  Other writers are not affected.
 */
#define _GNU_SOURCE
#include "simguest.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WORDS_PER_PAGE (PYMIG_SIM_PAGE_SIZE / 8)
#define BATCH_MAX 64u             /* pages per batch: bounds pause latency */
#define SLICE_NS 10000000         /* throttle timeslice */
#define GOLDEN 0x9E3779B97F4A7C15ull
#define PARAMS_MAGIC 0x47494D50u  /* "PMIG" */
#define LIMIT_CREDIT_NS 10000000  /* dirty limit: quota a writer may save up, 10 ms of it */
#define LIMIT_BATCHES_PER_S 1000  /* dirty limit: at most 1 ms of quota per batch */

/* The parameter block's layout is asm/_defs.S's. */
_Static_assert(offsetof(struct pymig_sim_params, hot_share) == 0x14, "P_HOT_SHARE");
_Static_assert(offsetof(struct pymig_sim_params, rounds) == 0x1c, "P_ROUNDS");
_Static_assert(offsetof(struct pymig_sim_params, ticks_per_batch) == 0x20, "P_TSC_PER_BATCH");
_Static_assert(offsetof(struct pymig_sim_params, max_lag_ticks) == 0x28, "P_MAX_LAG");
_Static_assert(offsetof(struct pymig_sim_params, ticks_per_us) == 0x30, "P_TSC_PER_US");
_Static_assert(offsetof(struct pymig_sim_params, shares) == 0x40, "share table");
_Static_assert(sizeof(struct pymig_sim_share_record) == 64, "share record stride");
_Static_assert(offsetof(struct pymig_sim_share_record, seed) == 16, "SH_SEED");
_Static_assert(offsetof(struct pymig_sim_share_record, batch_pages) == 24, "SH_BATCH");
_Static_assert(offsetof(struct pymig_sim_share_record, ticks_per_batch) == 32,
               "SH_TSC_PER_BATCH");
_Static_assert(sizeof(struct pymig_sim_params) <= PYMIG_SIM_PAGE_SIZE, "one page");

/* Mailbox record words (byte offset / 8). */
enum { MB_PASSES = 0, MB_PAGES_WRITTEN = 1, MB_ERRORS = 2, MB_RESULT = 3, MB_DONE = 4 };

/* One vCPU's share, located in the RAM blocks. */
struct share {
    uint32_t block;       /* RAM block holding the whole share */
    uint64_t first_page;  /* page index inside that block */
    uint64_t npages;      /* m >= 1 */
    uint64_t hot_pages;   /* h (hotspot: 1 <= h < m) */
    uint64_t first_frame; /* guest frame number of the first page (gpa >> 12) */
    uint64_t seed;        /* compute: the fill's xorshift64 seed */
    uint64_t batch_pages; /* this vCPU's pacing (its share record) */
    uint64_t ticks_per_batch;
};

struct writer {
    struct pymig_sim *sim;
    pthread_t thread;
    int started;
    uint32_t index;
    struct share share;
    uint8_t *base;            /* the share's first page in its RAM block */
    struct bitmap *bitmap;    /* that block's dirty bitmap */
    struct pymig_sim_cpu cpu; /* touched by the thread only inside a batch or under the lock */
    /* under sim->lock */
    int in_batch;
    int batch_logging;
    uint64_t epoch;
    /* the thread's own pacing and throttle bookkeeping */
    int64_t deadline_ns;
    uint64_t left;            /* page writes left in the current pacing batch */
    int64_t slice_start_ns;
    /* dirty rate: pages of the share this writer logged (written by the thread, read by the
     * host); dirty limit: pages per second (0: none) and the GCRA time, under sim->lock */
    _Atomic uint64_t dirtied;
    double limit_pages_per_s;
    int64_t limit_paid_ns;
};

struct bitmap {
    _Atomic uint64_t *words;
    uint64_t nwords;
};

struct pymig_sim {
    struct pymig_sim_params params;
    struct pymig_sim_block *blocks;
    uint32_t nblocks;
    uint32_t vcpus;
    uint32_t mailbox_block;
    uint64_t mailbox_offset;
    struct bitmap *bitmaps;
    struct writer *writers;
    pthread_mutex_t lock;
    pthread_cond_t wake;     /* writers wait here: run, throttle change, quit */
    pthread_cond_t idle;     /* the host waits here for batches in flight */
    /* under lock */
    int running;
    int logging;
    int throttle;
    int quit;
    uint64_t epoch;          /* bumped by every run(): writers restart their pacing deadline */
};

static int64_t
mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Sleep on sim->wake until the CLOCK_MONOTONIC time at_ns (or a broadcast); lock held. */
static void
wait_until(struct pymig_sim *sim, int64_t at_ns)
{
    struct timespec ts = {.tv_sec = at_ns / 1000000000, .tv_nsec = at_ns % 1000000000};
    pthread_cond_timedwait(&sim->wake, &sim->lock, &ts);
}

static inline uint64_t
xorshift64(uint64_t x)
{
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

/* rotl64 for any k in [0, 64): a count of 0 must not shift by 64. */
static inline uint64_t
rotl64(uint64_t x, unsigned k)
{
    return (x << k) | (x >> ((64 - k) & 63));
}

/* below(k): the high half of x * k, an integer in [0, k). */
static inline uint64_t
below(uint64_t x, uint64_t k)
{
    return (uint64_t)(((unsigned __int128)x * k) >> 64);
}

/* The page's write is done: log it (release, so a sync that consumes the bit sees the write). */
static inline void
mark_dirty(struct bitmap *bm, uint64_t page, int logging)
{
    if (logging)
        atomic_fetch_or_explicit(&bm->words[page >> 6], 1ull << (page & 63),
                                 memory_order_release);
}

static inline uint64_t *
mailbox(struct pymig_sim *sim, uint32_t index)
{
    return (uint64_t *)(sim->blocks[sim->mailbox_block].base + sim->mailbox_offset +
                        64u * index);
}

/* Mailbox words live in guest RAM and the host reads them while we run: whole-word accesses. */
static inline void
mailbox_add(uint64_t *mb, int word, uint64_t delta)
{
    if (delta)
        __atomic_store_n(&mb[word], __atomic_load_n(&mb[word], __ATOMIC_RELAXED) + delta,
                         __ATOMIC_RELAXED);
}

static uint64_t
batch_dirtier(struct pymig_sim *sim, struct writer *w, uint64_t n, int logging,
              uint64_t *passes)
{
    const struct share *s = &w->share;
    struct bitmap *bm = w->bitmap;
    uint8_t *base = w->base;
    uint64_t m = s->npages, h = s->hot_pages, pos = w->cpu.pos, x = w->cpu.rng;
    uint64_t hot_share = sim->params.hot_share;

    if (pos >= m) /* never past the share, whatever a loaded state said */
        pos = 0;

    for (uint64_t i = 0; i < n; i++) {
        uint64_t j;
        switch (sim->params.pattern) {
        case PYMIG_SIM_SEQUENTIAL:
            j = pos;
            break;
        case PYMIG_SIM_HOTSPOT:
            x = xorshift64(x);
            if ((x >> 32) < hot_share) {
                x = xorshift64(x);
                j = below(x, h);
            } else {
                x = xorshift64(x);
                j = h + below(x, m - h);
            }
            break;
        default:
            x = xorshift64(x);
            j = below(x, m);
            break;
        }
        base[j * PYMIG_SIM_PAGE_SIZE] += 1;
        mark_dirty(bm, s->first_page + j, logging);
        if (++pos >= m) {
            pos = 0;
            ++*passes;
        }
    }
    w->cpu.pos = pos;
    w->cpu.rng = x;
    return n;
}

static uint64_t
batch_selfcheck(struct pymig_sim *sim, struct writer *w, uint64_t n, int logging,
                uint64_t *passes, uint64_t *errors)
{
    const struct share *s = &w->share;
    struct bitmap *bm = w->bitmap;
    uint8_t *base = w->base;

    for (uint64_t i = 0; i < n; i++) {
        if (w->cpu.pos >= s->npages) /* never past the share, whatever a loaded state said */
            w->cpu.pos = 0;
        uint64_t pos = w->cpu.pos, p = w->cpu.pass, frame = s->first_frame + pos;
        uint64_t *pg = (uint64_t *)(base + pos * PYMIG_SIM_PAGE_SIZE);
        uint64_t old_frame = p == 1 ? 0 : frame;
        int ok = pg[0] == p - 1 && pg[1] == old_frame && pg[WORDS_PER_PAGE - 1] == p - 1;
        *errors += !ok;
        pg[WORDS_PER_PAGE - 1] = p;
        pg[1] = frame;
        pg[0] = p;
        mark_dirty(bm, s->first_page + pos, logging);
        if (++w->cpu.pos >= s->npages) {
            w->cpu.pos = 0;
            w->cpu.pass++;
            ++*passes;
        }
    }
    return n;
}

/* Up to n pages of fill, fold or feed; returns the pages written (the fold only reads).  Stops
 * early when the last round ends. */
static uint64_t
batch_compute(struct pymig_sim *sim, struct writer *w, uint64_t n, int logging,
              uint64_t *passes)
{
    const struct share *s = &w->share;
    struct bitmap *bm = w->bitmap;
    uint8_t *base = w->base;
    struct pymig_sim_cpu *c = &w->cpu;
    uint64_t written = 0;

    if (c->phase > PYMIG_SIM_DONE)
        c->phase = PYMIG_SIM_DONE;
    for (uint64_t done = 0; done < n && c->phase != PYMIG_SIM_DONE; done++) {
        if (c->pos >= s->npages) /* never past the share, whatever a loaded state said */
            c->pos = 0;
        uint64_t *pg = (uint64_t *)(base + c->pos * PYMIG_SIM_PAGE_SIZE);
        uint64_t j = c->pos * WORDS_PER_PAGE;
        if (c->phase == PYMIG_SIM_FILL) {
            uint64_t x = c->rng;
            for (unsigned i = 0; i < WORDS_PER_PAGE; i++) {
                x = xorshift64(x);
                pg[i] = x;
            }
            c->rng = x;
        } else if (c->phase == PYMIG_SIM_FOLD) {
            uint64_t sum = c->sum;
            for (unsigned i = 0; i < WORDS_PER_PAGE; i++)
                sum ^= rotl64(pg[i] + j + i, (unsigned)((j + i) & 63));
            c->sum = sum;
        } else {
            for (unsigned i = 0; i < WORDS_PER_PAGE; i++)
                pg[i] += c->sum;
        }
        if (c->phase != PYMIG_SIM_FOLD) {
            mark_dirty(bm, s->first_page + c->pos, logging);
            written++;
        }
        if (++c->pos < s->npages)
            continue;
        c->pos = 0;
        switch (c->phase) {
        case PYMIG_SIM_FILL:
            c->phase = PYMIG_SIM_FOLD;
            c->pass = 0;
            c->acc = 0;
            c->sum = 0;
            break;
        case PYMIG_SIM_FOLD:
            c->acc = rotl64(c->acc, 1) ^ c->sum;
            c->phase = PYMIG_SIM_FEED;
            break;
        default:
            c->pass++;
            ++*passes;
            c->sum = 0;
            c->phase = PYMIG_SIM_FOLD;
            break;
        }
        if (c->phase == PYMIG_SIM_FOLD && c->pass >= sim->params.rounds) {
            uint64_t *mb = mailbox(sim, w->index);
            c->phase = PYMIG_SIM_DONE;
            __atomic_store_n(&mb[MB_RESULT], c->acc, __ATOMIC_RELAXED);
            __atomic_store_n(&mb[MB_DONE], 1, __ATOMIC_RELAXED);
        }
    }
    return written;
}

/* One batch of up to n pages, then the mailbox; runs without the lock.  Returns the pages
 * written: what pacing counts and, every one a page of the share the writer logged, what its
 * dirty count and dirty limit count. */
static uint64_t
run_batch(struct pymig_sim *sim, struct writer *w, uint64_t n, int logging)
{
    uint64_t passes = 0, errors = 0, written = 0;

    switch (sim->params.workload) {
    case PYMIG_SIM_DIRTIER:
        written = batch_dirtier(sim, w, n, logging, &passes);
        break;
    case PYMIG_SIM_SELFCHECK:
        written = batch_selfcheck(sim, w, n, logging, &passes, &errors);
        break;
    case PYMIG_SIM_COMPUTE:
        written = batch_compute(sim, w, n, logging, &passes);
        break;
    default:
        return 0;
    }
    atomic_fetch_add_explicit(&w->dirtied, written, memory_order_relaxed);
    uint64_t *mb = mailbox(sim, w->index);
    mailbox_add(mb, MB_PAGES_WRITTEN, written);
    mailbox_add(mb, MB_PASSES, passes);
    mailbox_add(mb, MB_ERRORS, errors);
    /* The mailbox is guest RAM like any other page: its writes are logged too. */
    if (written || passes || errors || w->cpu.phase == PYMIG_SIM_DONE)
        mark_dirty(&sim->bitmaps[sim->mailbox_block], sim->mailbox_offset / PYMIG_SIM_PAGE_SIZE,
                   logging);
    return written;
}

static int
has_work(struct pymig_sim *sim, struct writer *w)
{
    if (sim->params.workload == PYMIG_SIM_IDLE)
        return 0;
    return sim->params.workload != PYMIG_SIM_COMPUTE || w->cpu.phase != PYMIG_SIM_DONE;
}

/*
 * Decide, under the lock, whether the writer may write a batch now.  Returns the batch size,
 * or 0 after having slept (the caller then re-evaluates everything).
 */
static uint64_t
next_batch(struct pymig_sim *sim, struct writer *w)
{
    const struct pymig_sim_params *p = &sim->params;
    int64_t now = mono_ns();

    if (w->epoch != sim->epoch) {
        w->epoch = sim->epoch;
        w->deadline_ns = now;
        w->left = w->share.batch_pages;
        w->slice_start_ns = now;
    }
    int64_t run_budget = SLICE_NS;
    if (sim->throttle > 0) {
        run_budget = (int64_t)SLICE_NS * (100 - sim->throttle) / 100;
        int64_t slice_end = w->slice_start_ns + SLICE_NS;
        if (now - w->slice_start_ns >= run_budget) {
            if (now < slice_end) {
                wait_until(sim, slice_end);
                w->deadline_ns += mono_ns() - now; /* a throttled writer's clock stops */
                return 0;
            }
            w->slice_start_ns = now;
        }
    }
    if (w->limit_pages_per_s > 0 && now < w->limit_paid_ns) {
        wait_until(sim, w->limit_paid_ns); /* over its dirty limit: sleep the excess off */
        return 0;
    }
    uint64_t n;
    if (w->share.ticks_per_batch == 0) {
        n = w->share.batch_pages < BATCH_MAX ? w->share.batch_pages : BATCH_MAX;
    } else {
        if (now < w->deadline_ns) {
            int64_t at = w->deadline_ns;
            if (sim->throttle > 0 && at > w->slice_start_ns + run_budget)
                at = w->slice_start_ns + run_budget;
            wait_until(sim, at);
            return 0;
        }
        if ((uint64_t)(now - w->deadline_ns) > p->max_lag_ticks)
            w->deadline_ns = now; /* far behind: start again from now rather than burst */
        n = w->left < BATCH_MAX ? w->left : BATCH_MAX;
    }
    if (w->limit_pages_per_s > 0) {
        double most = w->limit_pages_per_s / LIMIT_BATCHES_PER_S;
        if ((double)n > most)
            n = most < 1.0 ? 1 : (uint64_t)most;
    }
    return n;
}

/* Charge a finished batch's dirtied pages to the writer's dirty limit; lock held. */
static void
charge_limit(struct writer *w, uint64_t dirtied)
{
    if (w->limit_pages_per_s <= 0 || dirtied == 0)
        return;
    int64_t floor = mono_ns() - LIMIT_CREDIT_NS;
    if (w->limit_paid_ns < floor)
        w->limit_paid_ns = floor;
    w->limit_paid_ns += (int64_t)((double)dirtied * 1e9 / w->limit_pages_per_s);
}

/* Account a finished batch's page writes against the pacing batch; lock held. */
static void
paced(struct pymig_sim *sim, struct writer *w, uint64_t written)
{
    if (w->share.ticks_per_batch == 0 || written == 0)
        return;
    w->left -= written;
    if (w->left == 0) {
        w->left = w->share.batch_pages;
        w->deadline_ns += (int64_t)w->share.ticks_per_batch;
    }
}

static void *
writer_main(void *arg)
{
    struct writer *w = arg;
    struct pymig_sim *sim = w->sim;
    sigset_t all;

    /* Signals belong to the host's threads (Python handles them in the main thread). */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);

    pthread_mutex_lock(&sim->lock);
    while (!sim->quit) {
        if (!sim->running || !has_work(sim, w)) {
            pthread_cond_wait(&sim->wake, &sim->lock);
            continue;
        }
        uint64_t n = next_batch(sim, w);
        if (n == 0 || sim->quit || !sim->running)
            continue;
        int logging = sim->logging;
        w->batch_logging = logging;
        w->in_batch = 1;
        pthread_mutex_unlock(&sim->lock);

        uint64_t written = run_batch(sim, w, n, logging);

        pthread_mutex_lock(&sim->lock);
        w->in_batch = 0;
        paced(sim, w, written);
        charge_limit(w, written);
        pthread_cond_broadcast(&sim->idle);
    }
    pthread_mutex_unlock(&sim->lock);
    return NULL;
}

/* Wait (lock held) until no writer is inside a batch that started under other conditions. */
static void
wait_batches(struct pymig_sim *sim, int logging_only)
{
    for (;;) {
        int busy = 0;
        for (uint32_t i = 0; i < sim->vcpus; i++) {
            struct writer *w = &sim->writers[i];
            if (w->in_batch && (!logging_only || w->batch_logging != sim->logging))
                busy = 1;
        }
        if (!busy)
            return;
        pthread_cond_wait(&sim->idle, &sim->lock);
    }
}

/* A writer at the start of its workload (workloads.py). */
static void
init_cpu(const struct pymig_sim_params *p, const struct writer *w, struct pymig_sim_cpu *c)
{
    memset(c, 0, sizeof(*c));
    switch (p->workload) {
    case PYMIG_SIM_DIRTIER:
        c->rng = ((uint64_t)(w->index + 1) * GOLDEN) | 1;
        break;
    case PYMIG_SIM_SELFCHECK:
        c->pass = 1;
        break;
    case PYMIG_SIM_COMPUTE:
        c->phase = PYMIG_SIM_FILL;
        c->rng = w->share.seed;
        break;
    }
}

static int
init_sync(struct pymig_sim *sim)
{
    pthread_condattr_t attr;
    int err = pthread_condattr_init(&attr);
    if (err)
        return -err;
    err = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (!err)
        err = pthread_cond_init(&sim->wake, &attr);
    if (!err)
        err = pthread_cond_init(&sim->idle, &attr);
    pthread_condattr_destroy(&attr);
    if (!err)
        err = pthread_mutex_init(&sim->lock, NULL);
    return -err;
}

/* The block and page of guest-physical [gpa, gpa + npages pages), all in one block. */
static int
locate(const struct pymig_sim_block *blocks, uint32_t nblocks, uint64_t gpa, uint64_t npages,
       uint32_t *block, uint64_t *page)
{
    if (gpa % PYMIG_SIM_PAGE_SIZE)
        return -EINVAL;
    for (uint32_t b = 0; b < nblocks; b++) {
        uint64_t first = blocks[b].gpa / PYMIG_SIM_PAGE_SIZE, at = gpa / PYMIG_SIM_PAGE_SIZE;
        if (at >= first && at - first + npages <= blocks[b].npages) {
            *block = b;
            *page = at - first;
            return 0;
        }
    }
    return -EINVAL;
}

/* Check the parameter block against the RAM and turn its share records into shares. */
static int
check_params(const struct pymig_sim_params *p, const struct pymig_sim_block *blocks,
             uint32_t nblocks, struct share *shares)
{
    if (p->magic != PARAMS_MAGIC || p->version != 1 || p->vcpus == 0 ||
        p->vcpus > PYMIG_SIM_MAX_VCPUS || p->workload < PYMIG_SIM_IDLE ||
        p->workload > PYMIG_SIM_COMPUTE || p->pattern > PYMIG_SIM_HOTSPOT ||
        p->batch_pages == 0 || p->ticks_per_us != PYMIG_SIM_TICKS_PER_US)
        return -EINVAL;
    for (uint32_t i = 0; i < p->vcpus; i++) {
        const struct pymig_sim_share_record *r = &p->shares[i];
        struct share *s = &shares[i];
        memset(s, 0, sizeof(*s));
        s->seed = r->seed;
        s->batch_pages = r->batch_pages;
        s->ticks_per_batch = r->ticks_per_batch;
        if (p->workload == PYMIG_SIM_IDLE)
            continue;
        if (r->batch_pages == 0)
            return -EINVAL;
        if (r->npages == 0 || locate(blocks, nblocks, r->first_gpa, r->npages, &s->block,
                                     &s->first_page))
            return -EINVAL;
        if (p->workload == PYMIG_SIM_DIRTIER && p->pattern == PYMIG_SIM_HOTSPOT &&
            (r->hot_pages == 0 || r->hot_pages >= r->npages))
            return -EINVAL;
        s->npages = r->npages;
        s->hot_pages = r->hot_pages;
        s->first_frame = r->first_gpa / PYMIG_SIM_PAGE_SIZE;
    }
    return 0;
}

int
pymig_sim_new(const struct pymig_sim_params *params, const struct pymig_sim_block *blocks,
              uint32_t nblocks, struct pymig_sim **out)
{
    struct share shares[PYMIG_SIM_MAX_VCPUS];
    uint32_t mb_block;
    uint64_t mb_page;
    struct pymig_sim *sim;
    int err;

    *out = NULL;
    if (nblocks == 0 || check_params(params, blocks, nblocks, shares) ||
        locate(blocks, nblocks, PYMIG_SIM_MAILBOX_GPA, 1, &mb_block, &mb_page))
        return -EINVAL;
    sim = calloc(1, sizeof(*sim));
    if (!sim)
        return -ENOMEM;
    sim->params = *params;
    sim->nblocks = nblocks;
    sim->vcpus = params->vcpus;
    sim->mailbox_block = mb_block;
    sim->mailbox_offset = mb_page * PYMIG_SIM_PAGE_SIZE;
    sim->blocks = calloc(nblocks, sizeof(*sim->blocks));
    sim->bitmaps = calloc(nblocks, sizeof(*sim->bitmaps));
    sim->writers = calloc(sim->vcpus, sizeof(*sim->writers));
    if (!sim->blocks || !sim->bitmaps || !sim->writers) {
        free(sim->blocks);
        free(sim->bitmaps);
        free(sim->writers);
        free(sim);
        return -ENOMEM;
    }
    memcpy(sim->blocks, blocks, nblocks * sizeof(*sim->blocks));
    err = init_sync(sim);
    if (err) {
        free(sim->blocks);
        free(sim->bitmaps);
        free(sim->writers);
        free(sim);
        return err;
    }
    for (uint32_t b = 0; b < nblocks; b++) {
        sim->bitmaps[b].nwords = (blocks[b].npages + 63) / 64;
        sim->bitmaps[b].words = calloc(sim->bitmaps[b].nwords, sizeof(uint64_t));
        if (!sim->bitmaps[b].words) {
            pymig_sim_free(sim);
            return -ENOMEM;
        }
    }
    for (uint32_t i = 0; i < sim->vcpus; i++) {
        struct writer *w = &sim->writers[i];
        w->sim = sim;
        w->index = i;
        w->share = shares[i];
        w->base = sim->blocks[shares[i].block].base + shares[i].first_page * PYMIG_SIM_PAGE_SIZE;
        w->bitmap = &sim->bitmaps[shares[i].block];
        init_cpu(params, w, &w->cpu);
    }
    for (uint32_t i = 0; i < sim->vcpus; i++) {
        err = pthread_create(&sim->writers[i].thread, NULL, writer_main, &sim->writers[i]);
        if (err) {
            pymig_sim_free(sim);
            return -err;
        }
        sim->writers[i].started = 1;
    }
    *out = sim;
    return 0;
}

void
pymig_sim_free(struct pymig_sim *sim)
{
    if (!sim)
        return;
    pthread_mutex_lock(&sim->lock);
    sim->quit = 1;
    pthread_cond_broadcast(&sim->wake);
    pthread_mutex_unlock(&sim->lock);
    for (uint32_t i = 0; i < sim->vcpus; i++)
        if (sim->writers[i].started)
            pthread_join(sim->writers[i].thread, NULL);
    for (uint32_t b = 0; b < sim->nblocks; b++)
        free(sim->bitmaps[b].words);
    pthread_cond_destroy(&sim->wake);
    pthread_cond_destroy(&sim->idle);
    pthread_mutex_destroy(&sim->lock);
    free(sim->bitmaps);
    free(sim->blocks);
    free(sim->writers);
    free(sim);
}

void
pymig_sim_run(struct pymig_sim *sim)
{
    pthread_mutex_lock(&sim->lock);
    sim->running = 1;
    sim->epoch++;
    pthread_cond_broadcast(&sim->wake);
    pthread_mutex_unlock(&sim->lock);
}

void
pymig_sim_pause(struct pymig_sim *sim)
{
    pthread_mutex_lock(&sim->lock);
    sim->running = 0;
    wait_batches(sim, 0);
    pthread_mutex_unlock(&sim->lock);
}

void
pymig_sim_set_throttle(struct pymig_sim *sim, int percent)
{
    pthread_mutex_lock(&sim->lock);
    sim->throttle = percent < 0 ? 0 : percent > 99 ? 99 : percent;
    pthread_cond_broadcast(&sim->wake);
    pthread_mutex_unlock(&sim->lock);
}

void
pymig_sim_set_logging(struct pymig_sim *sim, int on)
{
    pthread_mutex_lock(&sim->lock);
    sim->logging = on != 0;
    wait_batches(sim, 1);
    if (!on)
        for (uint32_t b = 0; b < sim->nblocks; b++)
            for (uint64_t i = 0; i < sim->bitmaps[b].nwords; i++)
                atomic_store_explicit(&sim->bitmaps[b].words[i], 0, memory_order_relaxed);
    pthread_mutex_unlock(&sim->lock);
}

void
pymig_sim_sync(struct pymig_sim *sim, uint32_t block, uint64_t *out)
{
    struct bitmap *bm = &sim->bitmaps[block];

    for (uint64_t i = 0; i < bm->nwords; i++) {
        /* A word read as 0 has nothing to consume; a bit set right after stays for next time. */
        uint64_t v = atomic_load_explicit(&bm->words[i], memory_order_relaxed);
        if (v)
            v = atomic_exchange_explicit(&bm->words[i], 0, memory_order_acquire);
        out[i] = v;
    }
}

int
pymig_sim_set_dirty_limit(struct pymig_sim *sim, uint32_t index, double pages_per_s)
{
    if (index >= sim->vcpus || !(pages_per_s >= 0.0))
        return -EINVAL;
    pthread_mutex_lock(&sim->lock);
    struct writer *w = &sim->writers[index];
    w->limit_pages_per_s = pages_per_s;
    w->limit_paid_ns = mono_ns(); /* a new quota starts now, without saved-up credit */
    pthread_cond_broadcast(&sim->wake);
    pthread_mutex_unlock(&sim->lock);
    return 0;
}

void
pymig_sim_dirty_counts(struct pymig_sim *sim, uint64_t *out)
{
    for (uint32_t i = 0; i < sim->vcpus; i++)
        out[i] = atomic_load_explicit(&sim->writers[i].dirtied, memory_order_relaxed);
}

int
pymig_sim_get_cpu(struct pymig_sim *sim, uint32_t index, struct pymig_sim_cpu *cpu)
{
    if (index >= sim->vcpus)
        return -EINVAL;
    pthread_mutex_lock(&sim->lock);
    *cpu = sim->writers[index].cpu;
    int busy = sim->writers[index].in_batch;
    pthread_mutex_unlock(&sim->lock);
    return busy ? -EBUSY : 0;
}

int
pymig_sim_set_cpu(struct pymig_sim *sim, uint32_t index, const struct pymig_sim_cpu *cpu)
{
    int err = 0;

    if (index >= sim->vcpus)
        return -EINVAL;
    /* A position outside the share would have the writer write outside it (base + pos pages):
     * refused here whatever the caller checked. */
    const struct share *s = &sim->writers[index].share;
    if (cpu->pos >= (s->npages ? s->npages : 1) || cpu->phase > PYMIG_SIM_DONE)
        return -ERANGE;
    pthread_mutex_lock(&sim->lock);
    if (sim->running)
        err = -EBUSY;
    else
        sim->writers[index].cpu = *cpu;
    pthread_mutex_unlock(&sim->lock);
    return err;
}
