/*
 * test_pool.c — the task pool behind qkv__parallel: every task runs once,
 * on 1 to 5 threads, and a claim made inside a task (qkv__claim_next) is
 * the task that worker runs next.
 */
#include "test.h"
#include "../src/core/internal.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

enum { N_TASKS = 500, MAX_WORKERS = 8 };

typedef struct {
    qkv_ctx    *ctx;
    atomic_int  runs[N_TASKS];
    int64_t     claimed[MAX_WORKERS];   /* the worker's claim, -2: none made */
    atomic_int  bad_order, bad_repeat, bad_worker;
    int         every;                  /* tasks t % every == 0 claim */
} claim_job;

static void claim_task(void *arg, int64_t task, int worker)
{
    claim_job *j = arg;
    if (worker < 0 || worker >= MAX_WORKERS) {
        atomic_fetch_add(&j->bad_worker, 1);
        return;
    }
    atomic_fetch_add(&j->runs[task], 1);
    /* a worker that claimed runs its claim next */
    if (j->claimed[worker] != -2 && j->claimed[worker] != task)
        atomic_fetch_add(&j->bad_order, 1);
    j->claimed[worker] = -2;
    if (task % j->every == 0) {
        const int64_t c = qkv__claim_next(j->ctx, worker);
        if (qkv__claim_next(j->ctx, worker) != c)   /* the same claim again */
            atomic_fetch_add(&j->bad_repeat, 1);
        j->claimed[worker] = c;   /* -1: none left, so no task may follow */
    }
}

void test_pool_claims(void)
{
    for (int threads = 1; threads <= 5; threads++)
        for (int every = 1; every <= 3; every++) {
            claim_job *j = xmalloc(sizeof *j);
            memset(j, 0, sizeof *j);
            j->ctx = qkv_ctx_create(threads);
            j->every = every;
            for (int w = 0; w < MAX_WORKERS; w++)
                j->claimed[w] = -2;
            for (int64_t t = 0; t < N_TASKS; t++)
                atomic_init(&j->runs[t], 0);
            /* twice: the claims of one job do not reach the next */
            for (int rep = 0; rep < 2; rep++) {
                qkv__parallel(j->ctx, N_TASKS, 0.0, claim_task, j);
                for (int w = 0; w < MAX_WORKERS; w++) {
                    CHECK(j->claimed[w] == -2 || j->claimed[w] == -1,
                          "threads %d every %d: worker %d ended holding claim %lld", threads,
                          every, w, (long long)j->claimed[w]);
                    j->claimed[w] = -2;
                }
            }
            int wrong = 0;
            for (int64_t t = 0; t < N_TASKS; t++)
                wrong += atomic_load(&j->runs[t]) != 2;
            CHECK(wrong == 0, "threads %d every %d: %d tasks did not run exactly once per job",
                  threads, every, wrong);
            CHECK(atomic_load(&j->bad_order) == 0,
                  "threads %d every %d: %d claimed tasks ran elsewhere or later", threads, every,
                  atomic_load(&j->bad_order));
            CHECK(atomic_load(&j->bad_repeat) == 0 && atomic_load(&j->bad_worker) == 0,
                  "threads %d every %d: repeated claims differ (%d) or bad worker ids (%d)",
                  threads, every, atomic_load(&j->bad_repeat), atomic_load(&j->bad_worker));
            qkv_ctx_free(j->ctx);
            free(j);
        }
}
