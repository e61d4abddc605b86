/*
 * pool.c — a small fixed thread pool. The caller of qkv__pool_run works too,
 * so a pool of n threads starts n-1 workers. Tasks are handed out through
 * one atomic counter; idle workers sleep on a condition variable (no
 * spinning), so qkv costs nothing beside NumPy or PyTorch between calls.
 *
 * Not here: work splitting or reduction order — callers make each task's
 * result independent of the thread that runs it.
 */
#include "internal.h"

#include <stdatomic.h>
#include <stdlib.h>

struct qkv__pool {
    int              n_workers;   /* threads besides the caller */
    pthread_t       *threads;
    pthread_mutex_t  mu;
    pthread_cond_t   wake;        /* a new job, or shutdown */
    pthread_cond_t   done;        /* the last worker left the job */
    uint64_t         generation;  /* bumped per job, under mu */
    int              shutdown;
    int              busy;        /* workers still inside the current job */
    /* the current job */
    qkv__task_fn     fn;
    void            *arg;
    int64_t          n_tasks;
    atomic_llong     next;
};

typedef struct { qkv__pool *pool; int id; } worker_arg;

static void drain(qkv__pool *p, int worker)
{
    for (;;) {
        int64_t t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (t >= p->n_tasks)
            break;
        p->fn(p->arg, t, worker);
    }
}

static void *worker_main(void *varg)
{
    worker_arg *wa = varg;
    qkv__pool *p = wa->pool;
    int id = wa->id;
    free(wa);
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->shutdown && p->generation == seen)
            pthread_cond_wait(&p->wake, &p->mu);
        if (p->shutdown)
            break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        drain(p, id);
        pthread_mutex_lock(&p->mu);
        if (--p->busy == 0)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

qkv__pool *qkv__pool_create(int n_threads)
{
    qkv__pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->threads = calloc((size_t)n_threads, sizeof *p->threads);
    if (!p->threads) {
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->next, 0);
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
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_workers; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p->threads);
    free(p);
}

void qkv__pool_run(qkv__pool *p, int64_t n_tasks, qkv__task_fn fn, void *arg)
{
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    p->busy = p->n_workers;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    drain(p, 0);

    pthread_mutex_lock(&p->mu);
    while (p->busy > 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
