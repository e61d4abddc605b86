/*
 * bandwidth.c — the memory-bandwidth yardstick: a STREAM-style triad on
 * the context's threads over arrays far larger than any cache (allocated
 * as caches should be, by qkv_alloc), the ceiling memory-bound calls
 * (decoding) are quoted against.
 */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime */
#include "internal.h"

#include <stdlib.h>
#include <time.h>

enum { TRIAD_FLOATS = 1 << 24, TRIAD_CHUNKS = 256 };   /* 64 MiB per array */

typedef struct {
    float *a, *b, *c;
    float  s;
    int    init;
} triad_job;

/* Chunk `task` of the arrays: initialized once (first touch on the thread
   that streams it), then a[i] = b[i] + s·c[i]. */
static void triad_task(void *arg, int64_t task, int worker)
{
    triad_job *job = arg;
    const int64_t n = TRIAD_FLOATS / TRIAD_CHUNKS, i0 = task * n;
    float *a = job->a + i0;
    const float *b = job->b + i0, *c = job->c + i0;
    if (job->init) {
        for (int64_t i = 0; i < n; i++) {
            a[i] = 0.0f;
            job->b[i0 + i] = 1.0f;
            job->c[i0 + i] = 2.0f;
        }
        return;
    }
    const float s = job->s;
    for (int64_t i = 0; i < n; i++)
        a[i] = b[i] + s * c[i];
}

double qkv_peak_bandwidth(qkv_ctx *ctx)
{
    if (!ctx)
        return 0.0;
    triad_job job = { NULL, NULL, NULL, 0.5f, 1 };
    const size_t bytes = (size_t)TRIAD_FLOATS * sizeof(float);
    job.a = qkv_alloc(bytes);
    job.b = qkv_alloc(bytes);
    job.c = qkv_alloc(bytes);
    if (!job.a || !job.b || !job.c) {
        qkv_free(job.a);
        qkv_free(job.b);
        qkv_free(job.c);
        return 0.0;
    }
    qkv__parallel(ctx, TRIAD_CHUNKS, 0.0, triad_task, &job);
    job.init = 0;
    /* the best of several rounds: a ceiling, so interference only lowers it */
    double best = 0.0;
    for (int round = 0; round < 10; round++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        qkv__parallel(ctx, TRIAD_CHUNKS, 0.0, triad_task, &job);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        const double dt = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        const double gbs = dt > 0.0 ? 3.0 * (double)bytes / dt * 1e-9 : 0.0;
        best = gbs > best ? gbs : best;
    }
    qkv_free(job.a);
    qkv_free(job.b);
    qkv_free(job.c);
    return best;
}
