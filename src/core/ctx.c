/*
 * ctx.c — the context (threads, scratch, kernel choice, last error), status
 * strings, version and the small tensor helpers of the public API.
 */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

const char *qkv_version(void) { return QKV_VERSION_STRING; }

const char *qkv_status_string(qkv_status s)
{
    switch (s) {
    case QKV_OK:              return "ok";
    case QKV_ERR_NULL:        return "null pointer";
    case QKV_ERR_DTYPE:       return "bad dtype";
    case QKV_ERR_SHAPE:       return "bad shape";
    case QKV_ERR_STRIDE:      return "bad strides";
    case QKV_ERR_OVERFLOW:    return "size overflow";
    case QKV_ERR_ARG:         return "invalid argument";
    case QKV_ERR_NOMEM:       return "out of memory";
    case QKV_ERR_UNSUPPORTED: return "unsupported";
    case QKV_ERR_THREAD:      return "thread creation failed";
    case QKV_ERR_IO:          return "file not readable";
    case QKV_ERR_FORMAT:      return "malformed model file";
    default:                  return "unknown status";
    }
}

size_t qkv_dtype_size(qkv_dtype dtype)
{
    switch (dtype) {
    case QKV_F32:  return 4;
    case QKV_F16:
    case QKV_BF16: return 2;
    default:       return 0;
    }
}

qkv_tensor qkv_tensor_4d(void *data, qkv_dtype dtype, int64_t d0, int64_t d1,
                         int64_t d2, int64_t d3)
{
    qkv_tensor t;
    t.data = data;
    t.dtype = dtype;
    t.shape[0] = d0; t.shape[1] = d1; t.shape[2] = d2; t.shape[3] = d3;
    t.stride[3] = 1;
    t.stride[2] = d3;
    t.stride[1] = d2 * d3;
    t.stride[0] = d1 * d2 * d3;
    return t;
}

qkv_status qkv__fail(qkv_ctx *ctx, qkv_status status, const char *fmt, ...)
{
    if (ctx) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
        va_end(ap);
    }
    return status;
}

qkv_ctx *qkv_ctx_create(int n_threads)
{
    if (n_threads < 0)
        return NULL;
    if (n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (n > 1024 ? 1024 : (int)n) : 1;
    }
    qkv_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx)
        return NULL;
    ctx->n_threads = n_threads;
    ctx->kernels = qkv__kernels_default();
    ctx->scratch = calloc((size_t)n_threads, sizeof *ctx->scratch);
    ctx->scratch_size = calloc((size_t)n_threads, sizeof *ctx->scratch_size);
    if (!ctx->scratch || !ctx->scratch_size)
        goto fail;
    if (n_threads > 1 && !(ctx->pool = qkv__pool_create(n_threads)))
        goto fail;
    return ctx;
fail:
    qkv_ctx_free(ctx);
    return NULL;
}

void qkv_ctx_free(qkv_ctx *ctx)
{
    if (!ctx)
        return;
    qkv__pool_free(ctx->pool);
    if (ctx->scratch)
        for (int i = 0; i < ctx->n_threads; i++)
            free(ctx->scratch[i]);
    free(ctx->scratch);
    free(ctx->scratch_size);
    free(ctx->shared[0]);
    free(ctx->shared[1]);
    free(ctx);
}

const char *qkv_ctx_last_error(const qkv_ctx *ctx)
{
    return ctx ? ctx->err : "ctx: NULL context";
}

int qkv_ctx_threads(const qkv_ctx *ctx) { return ctx ? ctx->n_threads : 1; }

const char *qkv_ctx_isa(const qkv_ctx *ctx)
{
    return ctx ? ctx->kernels->name : qkv__kernels_default()->name;
}

qkv_status qkv_ctx_set_isa(qkv_ctx *ctx, const char *name)
{
    if (!ctx)
        return QKV_ERR_NULL;
    if (!name)
        return qkv__fail(ctx, QKV_ERR_NULL, "name: NULL kernel set name");
    int known;
    const qkv__kernels *t = qkv__kernels_by_name(name, &known);
    if (!known)
        return qkv__fail(ctx, QKV_ERR_ARG,
                         "name: unknown kernel set '%.64s' (see qkv_isa_name)", name);
    if (!t)
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED,
                         "name: this CPU cannot run the '%s' kernel set", name);
    ctx->kernels = t;
    ctx->err[0] = 0;
    return QKV_OK;
}

const char *qkv_isa_name(int i) { return qkv__kernels_name(i); }

int qkv_isa_supported(const char *name)
{
    int known;
    return qkv__kernels_by_name(name, &known) != NULL;
}

typedef struct {
    const qkv__kernels *kn;
    int64_t             iters;
    double              flops[1024];   /* per worker */
} peak_job;

static void peak_task(void *arg, int64_t task, int worker)
{
    peak_job *job = arg;
    double f = job->kn->fma_probe(job->iters);
    if (worker < 1024)
        job->flops[worker] += f;
}

/* One timed round of the probe on every thread, in GFLOP/s. */
static double peak_round(qkv_ctx *ctx, peak_job *job)
{
    memset(job->flops, 0, sizeof job->flops);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* several tasks per thread so every worker gets its share */
    qkv__parallel(ctx, 8 * (int64_t)ctx->n_threads, 0.0, peak_task, job);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double flops = 0.0;
    for (int i = 0; i < ctx->n_threads && i < 1024; i++)
        flops += job->flops[i];
    double dt = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    return dt > 0.0 ? flops / dt * 1e-9 : 0.0;
}

double qkv_peak_gflops(qkv_ctx *ctx)
{
    if (!ctx)
        return 0.0;
    peak_job *job = calloc(1, sizeof *job);
    if (!job)
        return 0.0;
    job->kn = ctx->kernels;
    job->iters = 1 << 20;
    /* the best of several rounds: a ceiling, so interference only lowers it */
    double best = 0.0;
    for (int round = 0; round < 7; round++) {
        double g = peak_round(ctx, job);
        best = g > best ? g : best;
    }
    free(job);
    return best;
}

qkv_status qkv__scratch_reserve(qkv_ctx *ctx, size_t bytes)
{
    bytes = (bytes + 63) & ~(size_t)63;
    for (int i = 0; i < ctx->n_threads; i++) {
        if (ctx->scratch_size[i] >= bytes)
            continue;
        void *p = NULL;
        if (posix_memalign(&p, 64, bytes) != 0)
            return qkv__fail(ctx, QKV_ERR_NOMEM,
                             "ctx: cannot allocate %zu bytes of scratch", bytes);
        free(ctx->scratch[i]);
        ctx->scratch[i] = p;
        ctx->scratch_size[i] = bytes;
    }
    return QKV_OK;
}

void *qkv__shared_get(qkv_ctx *ctx, qkv__shared_slot slot, size_t bytes)
{
    bytes = (bytes + 63) & ~(size_t)63;
    if (ctx->shared_size[slot] >= bytes)
        return ctx->shared[slot];
    free(ctx->shared[slot]);
    ctx->shared[slot] = NULL;
    ctx->shared_size[slot] = 0;
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes) != 0)
        return NULL;
    ctx->shared[slot] = p;
    ctx->shared_size[slot] = bytes;
    return p;
}

void qkv__shared_done(qkv_ctx *ctx, qkv__shared_slot slot)
{
    if (ctx->shared_size[slot] > QKV__KEEP_BYTES) {
        free(ctx->shared[slot]);
        ctx->shared[slot] = NULL;
        ctx->shared_size[slot] = 0;
    }
}

void qkv__parallel(qkv_ctx *ctx, int64_t n_tasks, double work, qkv__task_fn fn, void *arg)
{
    if (!ctx->pool || n_tasks <= 1 || (work > 0.0 && work < QKV__SERIAL_FLOPS)) {
        ctx->serial_n = n_tasks;
        for (int64_t t = 0; t < n_tasks; t++) {
            ctx->serial_task = t;
            fn(arg, t, 0);
        }
        ctx->serial_n = 0;
        return;
    }
    qkv__pool_run(ctx->pool, n_tasks, fn, arg);
}

int64_t qkv__claim_next(qkv_ctx *ctx, int worker)
{
    if (ctx->serial_n > 0)
        return ctx->serial_task + 1 < ctx->serial_n ? ctx->serial_task + 1 : -1;
    return ctx->pool ? qkv__pool_claim(ctx->pool, worker) : -1;
}

size_t qkv__l2_bytes(void)
{
    long b = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (b <= 0)
        b = 1L << 20;
    if (b < (256L << 10)) b = 256L << 10;
    if (b > (4L << 20)) b = 4L << 20;
    return (size_t)b;
}
