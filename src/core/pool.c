/*
 * pool.c — a small fixed thread pool. The caller of qkv__pool_run works too,
 * so a pool of n threads starts n-1 workers. Tasks are handed out through
 * one atomic counter. A worker that finds no job polls for the next one
 * for at most SPIN_NS, yielding the CPU between polls (back-to-back calls,
 * such as decode steps or a Python loop, then start without a wake-up,
 * which can cost a quarter of a millisecond on a virtual machine), and then
 * sleeps on a condition variable: qkv never keeps a core busy between
 * bursts of calls, beside NumPy or PyTorch.
 *
 * Not here: work splitting or reduction order — callers make each task's
 * result independent of the thread that runs it.
 */
#include "internal.h"

#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

enum { SPIN_NS = 1000000 };   /* 1 ms */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Polls until *x != seen or SPIN_NS pass, yielding the CPU between
   rounds: when the thread we wait for shares our CPU (more threads than
   free cores, beside another library's pool), it runs instead of us. */
static void spin_while_equal(const atomic_ullong *x, uint64_t seen)
{
    const int64_t t0 = now_ns();
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (atomic_load_explicit(x, memory_order_acquire) != seen)
                return;
            cpu_relax();
        }
        if (now_ns() - t0 > SPIN_NS)
            return;
        sched_yield();
    }
}

/* Polls until *x is 0 or SPIN_NS pass, yielding likewise. */
static void spin_until_zero(const atomic_int *x)
{
    const int64_t t0 = now_ns();
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (atomic_load_explicit(x, memory_order_acquire) == 0)
                return;
            cpu_relax();
        }
        if (now_ns() - t0 > SPIN_NS)
            return;
        sched_yield();
    }
}

struct qkv__pool {
    int              n_workers;   /* threads besides the caller */
    pthread_t       *threads;
    pthread_mutex_t  mu;
    pthread_cond_t   wake;        /* a new job, or shutdown */
    pthread_cond_t   done;        /* the last worker left the job */
    atomic_ullong    generation;  /* bumped per job (and at shutdown), under mu */
    int              shutdown;    /* under mu */
    atomic_int       busy;        /* workers still inside the current job */
    /* the current job */
    qkv__task_fn     fn;
    void            *arg;
    int64_t          n_tasks;
    atomic_llong     next;
    /* per worker: the task it claimed ahead (qkv__pool_claim), else -1;
       written only by its own worker, a cache line apart */
    struct { int64_t task; char pad[56]; } *claimed;
};

typedef struct { qkv__pool *pool; int id; } worker_arg;

static void drain(qkv__pool *p, int worker)
{
    int64_t *claimed = &p->claimed[worker].task;
    *claimed = -1;
    for (;;) {
        int64_t t = *claimed;
        if (t < 0)
            t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        *claimed = -1;
        if (t >= p->n_tasks)
            break;
        p->fn(p->arg, t, worker);
    }
}

int64_t qkv__pool_claim(qkv__pool *p, int worker)
{
    int64_t *claimed = &p->claimed[worker].task;
    if (*claimed < 0)
        *claimed = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
    return *claimed < p->n_tasks ? *claimed : -1;
}

static void *worker_main(void *varg)
{
    worker_arg *wa = varg;
    qkv__pool *p = wa->pool;
    int id = wa->id;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        spin_while_equal(&p->generation, seen);
        pthread_mutex_lock(&p->mu);
        while (!p->shutdown && atomic_load(&p->generation) == seen)
            pthread_cond_wait(&p->wake, &p->mu);
        if (p->shutdown) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = atomic_load(&p->generation);
        pthread_mutex_unlock(&p->mu);
        drain(p, id);
        if (atomic_fetch_sub(&p->busy, 1) == 1) {
            /* under mu, so a caller between its check and its wait
               cannot miss the signal */
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

qkv__pool *qkv__pool_create(int n_threads)
{
    qkv__pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->threads = calloc((size_t)n_threads, sizeof *p->threads);
    p->claimed = calloc((size_t)n_threads, sizeof *p->claimed);
    if (!p->threads || !p->claimed) {
        free(p->threads);
        free(p->claimed);
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->next, 0);
    atomic_init(&p->generation, 0);
    atomic_init(&p->busy, 0);
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (wa) {
            wa->pool = p;
            wa->id = i;
        }
        if (!wa || pthread_create(&p->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            qkv__pool_free(p);
            return NULL;
        }
        p->n_workers++;
    }
    return p;
}

void qkv__pool_free(qkv__pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->shutdown = 1;
    atomic_fetch_add(&p->generation, 1);   /* ends the workers' polling */
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_workers; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p->threads);
    free(p->claimed);
    free(p);
}

void qkv__pool_run(qkv__pool *p, int64_t n_tasks, qkv__task_fn fn, void *arg)
{
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    atomic_store(&p->busy, p->n_workers);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    drain(p, 0);

    spin_until_zero(&p->busy);
    pthread_mutex_lock(&p->mu);
    while (atomic_load(&p->busy) > 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
