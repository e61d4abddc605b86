/*
 * internal.h — what the library's files share and callers never see:
 * the context, error reporting, the thread pool and dtype conversion.
 * Symbols that cross files are named qkv__*.
 */
#ifndef QKV_INTERNAL_H
#define QKV_INTERNAL_H

#include "qkv.h"
#include "../cpu/kernels.h"

#include <pthread.h>
#include <stdint.h>

/* ---- thread pool (src/core/pool.c) -------------------------------------- */

/* Work is a range of task indices [0, n_tasks); fn runs each task exactly
   once on some thread; `worker` (0..n_threads-1) selects per-thread scratch.
   Which thread runs a task must not change its result. */
typedef void (*qkv__task_fn)(void *arg, int64_t task, int worker);

typedef struct qkv__pool qkv__pool;
qkv__pool *qkv__pool_create(int n_threads);      /* NULL on failure */
void       qkv__pool_free(qkv__pool *pool);
/* Runs fn over all tasks with up to n_threads threads (caller included) and
   returns when all are done. */
void       qkv__pool_run(qkv__pool *pool, int64_t n_tasks, qkv__task_fn fn,
                         void *arg);
/* qkv__claim_next for a worker of the pool's current job. */
int64_t    qkv__pool_claim(qkv__pool *pool, int worker);

/* ---- context ------------------------------------------------------------ */

struct qkv_ctx {
    int               n_threads;
    qkv__pool        *pool;          /* NULL when n_threads == 1 */
    const qkv__kernels *kernels;     /* the chosen micro-kernel set */
    /* per-thread scratch, grown on demand, freed with the context */
    void            **scratch;       /* [n_threads] */
    size_t           *scratch_size;  /* [n_threads] bytes */
    /* shared buffers a call's threads fill together (qkv__shared_slot),
       grown on demand up to QKV__KEEP_BYTES and kept for the next call,
       whose first touch of fresh pages would cost more than filling them;
       larger ones live for one call */
    void             *shared[2];
    size_t            shared_size[2];
    int64_t           serial_task, serial_n;   /* qkv__parallel run by the caller alone */
    char              err[512];
};

/* Records a formatted message in ctx (if any) and returns status. */
qkv_status qkv__fail(qkv_ctx *ctx, qkv_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Makes every thread's scratch at least `bytes` (64-byte aligned).
   QKV_ERR_NOMEM (with a message) when it cannot. */
qkv_status qkv__scratch_reserve(qkv_ctx *ctx, size_t bytes);

/* A 64-byte aligned buffer of at least `bytes` for one call's threads to
   share (NULL when out of memory); qkv__shared_done after the call. One
   per slot: the forward's packed K and V, and the rows of a paged cache
   gathered for it (decode.c), which live at once. */
#define QKV__KEEP_BYTES ((size_t)256 << 20)
typedef enum { QKV__SHARED_PACK, QKV__SHARED_GATHER } qkv__shared_slot;
void *qkv__shared_get(qkv_ctx *ctx, qkv__shared_slot slot, size_t bytes);
void  qkv__shared_done(qkv_ctx *ctx, qkv__shared_slot slot);

/* The L2 cache size of this machine in bytes (sysconf; 1 MiB when it does
   not say), clamped to [256 KiB, 4 MiB]. */
size_t qkv__l2_bytes(void);

/* Runs fn over n_tasks on ctx's threads. work estimates the flops of the
   whole job: below QKV__SERIAL_FLOPS waking the workers costs more than it
   saves, and the caller runs every task itself (0: unknown, always share). */
#define QKV__SERIAL_FLOPS 1e6
void qkv__parallel(qkv_ctx *ctx, int64_t n_tasks, double work, qkv__task_fn fn, void *arg);

/* From inside a task of qkv__parallel: claims the task that `worker` runs
   after this one and returns it (-1: none is left), so that the task can
   ask for the next one's first memory while it finishes. Later calls in
   the same task return the same claim. Tasks are still handed out in
   order, each once; only which thread takes a claimed one is fixed
   earlier. */
int64_t qkv__claim_next(qkv_ctx *ctx, int worker);

/* ---- dtype conversion (src/core/convert.c) ------------------------------ */

static inline float qkv__bf16_to_f32(uint16_t h)
{
    union { uint32_t u; float f; } x = { (uint32_t)h << 16 };
    return x.f;
}

uint16_t qkv__f32_to_bf16(float f);
uint16_t qkv__f32_to_f16(float f);
float    qkv__f16_to_f32(uint16_t h);

/* Loads element i of a strided row of dtype dt as fp32. */
static inline float qkv__load(const void *base, qkv_dtype dt, int64_t off)
{
    switch (dt) {
    case QKV_F16:  return qkv__f16_to_f32(((const uint16_t *)base)[off]);
    case QKV_BF16: return qkv__bf16_to_f32(((const uint16_t *)base)[off]);
    default:       return ((const float *)base)[off];
    }
}

/* Stores x as element off of dtype dt (rounded to nearest even). */
static inline void qkv__store(void *base, qkv_dtype dt, int64_t off, float x)
{
    switch (dt) {
    case QKV_F16:  ((uint16_t *)base)[off] = qkv__f32_to_f16(x); break;
    case QKV_BF16: ((uint16_t *)base)[off] = qkv__f32_to_bf16(x); break;
    default:       ((float *)base)[off] = x; break;
    }
}

#endif /* QKV_INTERNAL_H */
