/*
 * bandwidth.c — the memory-bandwidth yardsticks: STREAM-style loops (a
 * triad, a copy, and a read-only sum) on the context's threads over arrays
 * far larger than any cache (allocated as caches should be, by
 * qkv_alloc), the ceilings memory-bound calls (decoding) are quoted
 * against.
 */
#define _DEFAULT_SOURCE   /* clock_gettime, sysconf's cache sizes */
#include "internal.h"

#include <stdlib.h>
#include <time.h>
#include <unistd.h>

enum { TRIAD_CHUNKS = 256 };

/* Bytes per array. STREAM's rule: each array at least 4 times the
   last-level cache, so that no round finds the last round's lines there;
   at least 64 MiB, at most 1 GiB (and so where the cache is not known)
   and 1/16 of the memory. On a Xeon whose L3 reads 480 MiB (2 threads,
   two builds alternated), arrays of 64 MiB gave a triad of 34.0-35.7
   GB/s against 31.1-31.2 with 1 GiB, a copy 1.13-1.21x as high, the
   read-only loop the same: the written lines came back from the L3. (A
   triad over 2 GiB arrays read 29.6-30.2 there.) */
static size_t array_bytes(void)
{
    const size_t lo = (size_t)64 << 20;
    size_t want = (size_t)1 << 30;
#ifdef _SC_LEVEL3_CACHE_SIZE
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    const long llc = l3 > 0 ? l3 : l2;
    if (llc > 0 && (size_t)llc < want / 4)
        want = 4 * (size_t)llc;
#endif
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0 && (size_t)pages / 16 * (size_t)page < want)
        want = (size_t)pages / 16 * (size_t)page;
    if (want < lo)
        want = lo;
    /* whole chunks of whole 64-byte lines */
    const size_t unit = (size_t)TRIAD_CHUNKS * 64;
    return want / unit * unit;
}

typedef struct {
    float   *a, *b, *c;
    int64_t  n;      /* floats per array */
    float    s;
    int      init, kind;
    uint32_t sink[TRIAD_CHUNKS];   /* the read loop's results, kept */
} triad_job;

/* Chunk `task` of the arrays: initialized once (first touch on the thread
   that streams it), then the kind's loop: a[i] = b[i] + s·c[i] (triad),
   a[i] = b[i] (copy), or the bits of b and c folded together (read). */
static void triad_task(void *arg, int64_t task, int worker)
{
    triad_job *job = arg;
    (void)worker;
    const int64_t n = job->n / TRIAD_CHUNKS, i0 = task * n;
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
    if (job->kind == QKV_STREAM_COPY) {
        for (int64_t i = 0; i < n; i++)
            a[i] = b[i];
    } else if (job->kind == QKV_STREAM_READ) {
        /* integer xor, which compilers vectorize and reorder freely */
        const uint32_t *ub = (const uint32_t *)b, *uc = (const uint32_t *)c;
        uint32_t x = 0;
        for (int64_t i = 0; i < n; i++)
            x ^= ub[i] ^ uc[i];
        job->sink[task] = x;
    } else {
        for (int64_t i = 0; i < n; i++)
            a[i] = b[i] + s * c[i];
    }
}

double qkv_memory_bandwidth(qkv_ctx *ctx, qkv_stream kind)
{
    if (!ctx || (kind != QKV_STREAM_TRIAD && kind != QKV_STREAM_COPY && kind != QKV_STREAM_READ))
        return 0.0;
    triad_job *job = calloc(1, sizeof *job);
    if (!job)
        return 0.0;
    job->s = 0.5f;
    job->init = 1;
    job->kind = kind;
    const size_t bytes = array_bytes();
    job->n = (int64_t)(bytes / sizeof(float));
    job->a = qkv_alloc(bytes);
    job->b = qkv_alloc(bytes);
    job->c = qkv_alloc(bytes);
    double best = 0.0;
    if (job->a && job->b && job->c) {
        qkv__parallel(ctx, TRIAD_CHUNKS, 0.0, triad_task, job);
        job->init = 0;
        /* bytes counted as STREAM does: arrays read plus arrays written */
        const double arrays = kind == QKV_STREAM_TRIAD ? 3.0 : 2.0;
        /* the best of several rounds: a ceiling, so interference only
           lowers it */
        for (int round = 0; round < 10; round++) {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            qkv__parallel(ctx, TRIAD_CHUNKS, 0.0, triad_task, job);
            clock_gettime(CLOCK_MONOTONIC, &t1);
            const double dt = (double)(t1.tv_sec - t0.tv_sec) +
                              1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
            const double gbs = dt > 0.0 ? arrays * (double)bytes / dt * 1e-9 : 0.0;
            best = gbs > best ? gbs : best;
        }
    }
    qkv_free(job->a);
    qkv_free(job->b);
    qkv_free(job->c);
    free(job);
    return best;
}

double qkv_peak_bandwidth(qkv_ctx *ctx)
{
    return qkv_memory_bandwidth(ctx, QKV_STREAM_TRIAD);
}
