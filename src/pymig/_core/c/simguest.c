/*
 * Simulated guest writers (see simguest.h and pymig/guest/workloads.py).
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
 * Pacing: each writer writes rate/vcpus pages per second by its own clock, which starts at
 * resume and stops while the writer is throttled.  It computes how many pages are due, writes
 * them in batches and sleeps (a timed condition wait, so pause/close/throttle changes wake it)
 * until the next batch is due.  Debt above 100 ms of writing is forgiven so a writer that cannot
 * keep up runs flat out instead of bursting later.
 *
 * Throttle p %: in every 10 ms timeslice a writer may run for (100 - p) % of it and sleeps the
 * rest.  Its pacing clock stops while it sleeps, so a throttled writer achieves (100 - p) % of
 * its rate whether or not it is CPU-bound.
 */
#define _GNU_SOURCE
#include "simguest.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WORDS_PER_PAGE (PYMIG_SIM_PAGE_SIZE / 8)
#define BATCH_MAX 64u             /* pages per batch: bounds pause latency */
#define BATCH_PERIOD_NS 1000000   /* paced writers aim at one batch per ms at most */
#define SLICE_NS 10000000         /* throttle timeslice */
#define MAX_DEBT_NS 100000000     /* pacing debt forgiven beyond this */
#define GOLDEN 0x9E3779B97F4A7C15ull

/* Mailbox record words (byte offset / 8). */
enum { MB_PASSES = 0, MB_PAGES_WRITTEN = 1, MB_ERRORS = 2, MB_RESULT = 3, MB_DONE = 4 };

struct writer {
    struct pymig_sim *sim;
    pthread_t thread;
    int started;
    uint32_t index;
    struct pymig_sim_share share;
    struct pymig_sim_cpu cpu; /* touched by the thread only inside a batch or under the lock */
    /* under sim->lock */
    int in_batch;
    int batch_logging;
    uint64_t epoch;
    /* the thread's own pacing and throttle bookkeeping */
    int64_t t0_ns;
    int64_t stolen_ns;
    int64_t slice_start_ns;
    uint64_t count;
};

struct bitmap {
    _Atomic uint64_t *words;
    uint64_t nwords;
};

struct pymig_sim {
    struct pymig_sim_config cfg;
    struct pymig_sim_block *blocks;
    struct bitmap *bitmaps;
    struct writer *writers;
    double rate_per_writer;  /* pages/s, 0 = unpaced */
    uint64_t batch_pages;
    pthread_mutex_t lock;
    pthread_cond_t wake;     /* writers wait here: run, throttle change, quit */
    pthread_cond_t idle;     /* the host waits here for batches in flight */
    /* under lock */
    int running;
    int logging;
    int throttle;
    int quit;
    uint64_t epoch;          /* bumped by every run(): writers restart their pacing clock */
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

static inline uint32_t
xorshift32(uint32_t x)
{
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return x;
}

static inline uint64_t
xorshift64(uint64_t x)
{
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

static inline uint64_t
rotl64(uint64_t x, unsigned k)
{
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t
mulhi32(uint32_t r, uint64_t x)
{
    return ((uint64_t)r * x) >> 32;
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
    return (uint64_t *)(sim->blocks[sim->cfg.mailbox_block].base + sim->cfg.mailbox_offset +
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
    const struct pymig_sim_share *s = &w->share;
    struct bitmap *bm = &sim->bitmaps[s->block];
    uint8_t *base = sim->blocks[s->block].base + s->first_page * PYMIG_SIM_PAGE_SIZE;
    uint64_t m = s->npages, h = s->hot_pages, pos = w->cpu.pos;
    uint32_t x = (uint32_t)w->cpu.rng;

    for (uint64_t i = 0; i < n; i++) {
        uint64_t j;
        switch (sim->cfg.pattern) {
        case PYMIG_SIM_SEQUENTIAL:
            j = pos;
            break;
        case PYMIG_SIM_HOTSPOT:
            x = xorshift32(x);
            if ((x >> 16) < sim->cfg.hot_share_q16 || m == h) {
                x = xorshift32(x);
                j = mulhi32(x, h);
            } else {
                x = xorshift32(x);
                j = h + mulhi32(x, m - h);
            }
            break;
        default:
            x = xorshift32(x);
            j = mulhi32(x, m);
            break;
        }
        base[j * PYMIG_SIM_PAGE_SIZE] += 1;
        mark_dirty(bm, s->first_page + j, logging);
        if (++pos == m) {
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
    const struct pymig_sim_share *s = &w->share;
    struct bitmap *bm = &sim->bitmaps[s->block];
    uint8_t *base = sim->blocks[s->block].base + s->first_page * PYMIG_SIM_PAGE_SIZE;

    for (uint64_t i = 0; i < n; i++) {
        uint64_t pos = w->cpu.pos, p = w->cpu.pass, frame = s->first_frame + pos;
        uint64_t *pg = (uint64_t *)(base + pos * PYMIG_SIM_PAGE_SIZE);
        int ok = p == 1 ? (pg[0] == 0 && pg[1] == 0 && pg[WORDS_PER_PAGE - 1] == 0)
                        : (pg[0] == p - 1 && pg[1] == frame && pg[WORDS_PER_PAGE - 1] == p - 1);
        *errors += !ok;
        pg[WORDS_PER_PAGE - 1] = p;
        pg[1] = frame;
        pg[0] = p;
        mark_dirty(bm, s->first_page + pos, logging);
        if (++w->cpu.pos == s->npages) {
            w->cpu.pos = 0;
            w->cpu.pass++;
            ++*passes;
        }
    }
    return n;
}

/* Fill or fold up to n pages; stops early when the last round ends. */
static uint64_t
batch_compute(struct pymig_sim *sim, struct writer *w, uint64_t n, int logging,
              uint64_t *passes)
{
    const struct pymig_sim_share *s = &w->share;
    struct bitmap *bm = &sim->bitmaps[s->block];
    uint8_t *base = sim->blocks[s->block].base + s->first_page * PYMIG_SIM_PAGE_SIZE;
    struct pymig_sim_cpu *c = &w->cpu;
    uint64_t done = 0;

    while (done < n && c->phase != PYMIG_SIM_DONE) {
        uint64_t *pg = (uint64_t *)(base + c->pos * PYMIG_SIM_PAGE_SIZE);
        if (c->phase == PYMIG_SIM_FILL) {
            uint64_t x = c->rng;
            for (unsigned i = 0; i < WORDS_PER_PAGE; i++) {
                x = xorshift64(x);
                pg[i] = x;
            }
            c->rng = x;
        } else {
            uint64_t key = c->acc + GOLDEN + c->pass, sum = c->sum;
            uint64_t J = c->pos * WORDS_PER_PAGE;
            for (unsigned i = 0; i < WORDS_PER_PAGE; i++) {
                uint64_t v = rotl64(pg[i] ^ key, 7) + J + i;
                pg[i] = v;
                sum += v;
            }
            c->sum = sum;
        }
        mark_dirty(bm, s->first_page + c->pos, logging);
        done++;
        if (++c->pos < s->npages)
            continue;
        c->pos = 0;
        if (c->phase == PYMIG_SIM_FILL) {
            c->phase = PYMIG_SIM_FOLD;
            c->pass = 0;
            c->acc = 0;
            c->sum = 0;
            continue;
        }
        c->acc = rotl64(c->acc, 9) ^ c->sum;
        c->sum = 0;
        c->pass++;
        ++*passes;
        if (c->pass == sim->cfg.rounds) {
            uint64_t *mb = mailbox(sim, w->index);
            c->phase = PYMIG_SIM_DONE;
            __atomic_store_n(&mb[MB_RESULT], c->acc, __ATOMIC_RELAXED);
            __atomic_store_n(&mb[MB_DONE], 1, __ATOMIC_RELAXED);
        }
    }
    return done;
}

/* One batch of page writes, then the mailbox; runs without the lock. */
static uint64_t
run_batch(struct pymig_sim *sim, struct writer *w, uint64_t n, int logging)
{
    uint64_t passes = 0, errors = 0, written = 0;

    switch (sim->cfg.workload) {
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
    uint64_t *mb = mailbox(sim, w->index);
    mailbox_add(mb, MB_PAGES_WRITTEN, written);
    mailbox_add(mb, MB_PASSES, passes);
    mailbox_add(mb, MB_ERRORS, errors);
    /* The mailbox is guest RAM like any other page: its writes are logged too. */
    uint64_t mb_page = sim->cfg.mailbox_offset / PYMIG_SIM_PAGE_SIZE;
    mark_dirty(&sim->bitmaps[sim->cfg.mailbox_block], mb_page, logging);
    return written;
}

static int
has_work(struct pymig_sim *sim, struct writer *w)
{
    if (sim->cfg.workload == PYMIG_SIM_IDLE)
        return 0;
    return sim->cfg.workload != PYMIG_SIM_COMPUTE || w->cpu.phase != PYMIG_SIM_DONE;
}

/*
 * Decide, under the lock, whether the writer may write a batch now.  Returns the batch size,
 * or 0 after having slept (the caller then re-evaluates everything).
 */
static uint64_t
next_batch(struct pymig_sim *sim, struct writer *w)
{
    int64_t now = mono_ns();

    if (w->epoch != sim->epoch) {
        w->epoch = sim->epoch;
        w->t0_ns = now;
        w->stolen_ns = 0;
        w->slice_start_ns = now;
        w->count = 0;
    }
    int64_t run_budget = SLICE_NS;
    if (sim->throttle > 0) {
        run_budget = (int64_t)SLICE_NS * (100 - sim->throttle) / 100;
        int64_t slice_end = w->slice_start_ns + SLICE_NS;
        if (now - w->slice_start_ns >= run_budget) {
            if (now < slice_end) {
                wait_until(sim, slice_end);
                w->stolen_ns += mono_ns() - now;
                return 0;
            }
            w->slice_start_ns = now;
        }
    }
    if (sim->rate_per_writer <= 0)
        return sim->batch_pages;

    double rate = sim->rate_per_writer;
    double due = (double)(now - w->t0_ns - w->stolen_ns) * 1e-9 * rate;
    double max_debt = rate * (MAX_DEBT_NS * 1e-9) + (double)sim->batch_pages;
    if (due - (double)w->count > max_debt)
        w->count = (uint64_t)(due - max_debt);
    if (due - (double)w->count >= (double)sim->batch_pages)
        return sim->batch_pages;
    double next_s = (double)(w->count + sim->batch_pages) / rate;
    int64_t at = w->t0_ns + w->stolen_ns + (int64_t)(next_s * 1e9);
    if (sim->throttle > 0 && at > w->slice_start_ns + run_budget)
        at = w->slice_start_ns + run_budget;
    wait_until(sim, at);
    return 0;
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
        w->count += written;
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
        for (uint32_t i = 0; i < sim->cfg.vcpus; i++) {
            struct writer *w = &sim->writers[i];
            if (w->in_batch && (!logging_only || w->batch_logging != sim->logging))
                busy = 1;
        }
        if (!busy)
            return;
        pthread_cond_wait(&sim->idle, &sim->lock);
    }
}

static void
init_cpu(const struct pymig_sim_config *cfg, const struct pymig_sim_share *s,
         struct pymig_sim_cpu *c)
{
    memset(c, 0, sizeof(*c));
    switch (cfg->workload) {
    case PYMIG_SIM_DIRTIER:
        c->rng = s->seed32;
        break;
    case PYMIG_SIM_SELFCHECK:
        c->pass = 1;
        break;
    case PYMIG_SIM_COMPUTE:
        c->phase = PYMIG_SIM_FILL;
        c->rng = s->seed64;
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

int
pymig_sim_new(const struct pymig_sim_config *cfg, struct pymig_sim **out)
{
    struct pymig_sim *sim;
    int err;

    *out = NULL;
    if (cfg->vcpus == 0 || cfg->nblocks == 0 || cfg->mailbox_block >= cfg->nblocks ||
        cfg->mailbox_offset % PYMIG_SIM_PAGE_SIZE ||
        cfg->mailbox_offset / PYMIG_SIM_PAGE_SIZE >= cfg->blocks[cfg->mailbox_block].npages)
        return -EINVAL;
    for (uint32_t i = 0; cfg->workload != PYMIG_SIM_IDLE && i < cfg->vcpus; i++) {
        const struct pymig_sim_share *s = &cfg->shares[i];
        if (s->block >= cfg->nblocks || s->npages == 0 || s->hot_pages == 0 ||
            s->hot_pages > s->npages || s->first_page + s->npages > cfg->blocks[s->block].npages)
            return -EINVAL;
    }
    sim = calloc(1, sizeof(*sim));
    if (!sim)
        return -ENOMEM;
    sim->cfg = *cfg;
    sim->blocks = calloc(cfg->nblocks, sizeof(*sim->blocks));
    sim->bitmaps = calloc(cfg->nblocks, sizeof(*sim->bitmaps));
    sim->writers = calloc(cfg->vcpus, sizeof(*sim->writers));
    if (!sim->blocks || !sim->bitmaps || !sim->writers) {
        free(sim->blocks);
        free(sim->bitmaps);
        free(sim->writers);
        free(sim);
        return -ENOMEM;
    }
    memcpy(sim->blocks, cfg->blocks, cfg->nblocks * sizeof(*sim->blocks));
    sim->cfg.blocks = sim->blocks;
    sim->cfg.shares = NULL; /* copied into the writers */
    err = init_sync(sim);
    if (err) {
        free(sim->blocks);
        free(sim->bitmaps);
        free(sim->writers);
        free(sim);
        return err;
    }
    for (uint32_t b = 0; b < cfg->nblocks; b++) {
        sim->bitmaps[b].nwords = (cfg->blocks[b].npages + 63) / 64;
        sim->bitmaps[b].words = calloc(sim->bitmaps[b].nwords, sizeof(uint64_t));
        if (!sim->bitmaps[b].words) {
            pymig_sim_free(sim);
            return -ENOMEM;
        }
    }
    if (cfg->rate_pages_per_s) {
        sim->rate_per_writer = (double)cfg->rate_pages_per_s / cfg->vcpus;
        double per_period = sim->rate_per_writer * (BATCH_PERIOD_NS * 1e-9);
        sim->batch_pages = per_period < 1 ? 1 : per_period > BATCH_MAX ? BATCH_MAX
                                                                         : (uint64_t)per_period;
    } else {
        sim->batch_pages = BATCH_MAX;
    }
    for (uint32_t i = 0; i < cfg->vcpus; i++) {
        struct writer *w = &sim->writers[i];
        w->sim = sim;
        w->index = i;
        w->share = cfg->shares[i];
        init_cpu(cfg, &w->share, &w->cpu);
    }
    for (uint32_t i = 0; i < cfg->vcpus; i++) {
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
    for (uint32_t i = 0; i < sim->cfg.vcpus; i++)
        if (sim->writers[i].started)
            pthread_join(sim->writers[i].thread, NULL);
    for (uint32_t b = 0; b < sim->cfg.nblocks; b++)
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
        for (uint32_t b = 0; b < sim->cfg.nblocks; b++)
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
pymig_sim_get_cpu(struct pymig_sim *sim, uint32_t index, struct pymig_sim_cpu *cpu)
{
    if (index >= sim->cfg.vcpus)
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

    if (index >= sim->cfg.vcpus)
        return -EINVAL;
    pthread_mutex_lock(&sim->lock);
    if (sim->running)
        err = -EBUSY;
    else
        sim->writers[index].cpu = *cpu;
    pthread_mutex_unlock(&sim->lock);
    return err;
}
