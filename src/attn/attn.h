/*
 * attn.h — the attention problem as the drivers see it once the public
 * arguments have been validated: sizes, options and a sequence table that
 * makes batched and packed variable-length calls look alike.
 */
#ifndef QKV_ATTN_H
#define QKV_ATTN_H

#include "../core/internal.h"
#include "../cpu/kernels.h"   /* qkv__mix32 */

typedef struct {
    qkv_dtype dt;
    int64_t   B, Sq, Sk, Hq, Hkv, D, Dv;   /* Sq, Sk: dim 1 of q and k */
    int64_t   group;                       /* Hq / Hkv */
    int64_t   n_seqs;                      /* B, or opts->n_seqs for varlen */
    int       varlen;
    const int32_t *cu_q, *cu_k;
    const int32_t *lens_k;                 /* [B] keys per batch row (not varlen), or NULL: Sk */
    float     scale, softcap;
    int       causal;
    int64_t   window_left, window_right;
    const float *alibi;                    /* [Hq] or NULL */
    const float *bias;                     /* fp32 or NULL */
    int64_t   bias_stride[4];              /* 0 on broadcast dims */
    const qkv_tensor *q, *k, *v, *out;
    float    *lse;
    int       dropout;                     /* opts->dropout_p > 0 */
    uint32_t  drop_thresh;                 /* drop when the hash is below it */
    uint32_t  drop_seed[2];
    float     drop_scale;                  /* 1 / (1 - dropout_p) */
} qkv__attn;

/* One sequence: batch row b, query rows [q0, q0+sq) and key rows [k0, k0+sk)
   along dim 1. */
typedef struct { int64_t b, q0, sq, k0, sk; } qkv__seq;

/* ---- dropout mask --------------------------------------------------------
   Element (query row i, key j) of sequence s for query head h is kept
   when qkv__mix32(row + col) >= drop_thresh (kernels.h: a 32-bit integer
   hash), with row a hash of the seed, the batch row, the sequence's first
   query row (varlen), h and the query's position p = i + sk - sq, and col
   a hash of the seed and j (both within the sequence). Keyed by position, a call on the last queries of a
   sequence draws the mask the full call draws for them. Every path
   (forward, backward, references) calls these, so they agree element by
   element. */
static inline uint32_t qkv__drop_row(const qkv__attn *a, const qkv__seq *s, int64_t h,
                                     int64_t i)
{
    const uint64_t p = (uint64_t)(i + s->sk - s->sq);
    uint32_t x = qkv__mix32((uint32_t)s->b ^ a->drop_seed[0]);
    x = qkv__mix32(x + (uint32_t)s->q0 + (uint32_t)((uint64_t)s->q0 >> 32));
    x = qkv__mix32(x + (uint32_t)h + 0x9e3779b9u);
    x = qkv__mix32(x ^ (uint32_t)p ^ (uint32_t)(p >> 32));
    return qkv__mix32(x + a->drop_seed[1]);
}

static inline uint32_t qkv__drop_col(const qkv__attn *a, int64_t j)
{
    return qkv__mix32(qkv__mix32((uint32_t)j ^ (uint32_t)((uint64_t)j >> 32) ^ 0x85ebca6bu) +
                      a->drop_seed[0]);
}

/* The factor element (row, col) multiplies P by: 0 or 1/(1 - p). */
static inline float qkv__drop_factor(const qkv__attn *a, uint32_t row, uint32_t col)
{
    return qkv__mix32(row + col) >= a->drop_thresh ? a->drop_scale : 0.0f;
}

/* The extra arguments of a backward call. */
typedef struct {
    const qkv_tensor *dout;
    const float      *lse;           /* the forward's lse (input) */
    qkv_tensor       *dq, *dk, *dv;
    qkv_tensor       *dbias;         /* NULL: the bias is not differentiated */
} qkv__grads;

/* Validates every argument of a backward call (before anything is
   written): what qkv__attn_check checks of q, k, v, opts and out (out is
   an input here; a->lse is left NULL), plus dout like out, dq like q, dk
   like k, dv like v (shapes and dtype), lse non-NULL, dq, dk, dv each
   free of self-overlap (QKV_ERR_STRIDE), and none of them sharing memory
   with another or with q, k, v, out, dout or lse (QKV_ERR_ARG; views that
   interleave without a common element, e.g. slices of one packed buffer,
   are accepted). Fills *a and *g. */
qkv_status qkv__attn_check_backward(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv, qkv__attn *a, qkv__grads *g);

/* After qkv__attn_check_backward: dbias, the bias's gradient, non-NULL,
   fp32, of opts->bias's shape (which must be set), free of self-overlap
   and sharing no memory with another output or an input. Sets
   g->dbias. */
qkv_status qkv__attn_check_dbias(qkv_ctx *ctx, const qkv__attn *a, qkv__grads *g,
                                 const qkv_attn_opts *opts, qkv_tensor *dbias);
/* The view checks of check.c for any tensor argument (name as in messages). */
qkv_status qkv__check_tensor(qkv_ctx *ctx, const qkv_tensor *t, const char *name);

/* Validates q, opts, out and lse of a call whose keys come from a cache
   (named `keys` in messages) of Hkv heads, head_dim D and Dv, at most Smax
   positions per sequence, and fills *a (a->k and a->v NULL, one sequence
   per batch row). Refuses varlen and bias (QKV_ERR_UNSUPPORTED). */
qkv_status qkv__attn_check_cache(qkv_ctx *ctx, const qkv_tensor *q, const qkv_attn_opts *opts,
        const qkv_tensor *out, float *lse, int64_t Smax, int64_t Hkv, int64_t D, int64_t Dv,
        const char *keys, qkv__attn *a);

/* Validates every argument of a forward call (before anything is written)
   and fills *a. */
qkv_status qkv__attn_check(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_attn_opts *opts,
        const qkv_tensor *out, float *lse, qkv__attn *a);

/* The forward of a validated problem (forward.c); the KV-cache calls
   run long chunks of new queries through it (decode.c), a->k and a->v
   then the cache (or a contiguous copy of a paged one's rows) and
   a->lens_k its sequences' lengths. */
qkv_status qkv__forward_run(qkv_ctx *ctx, const qkv__attn *a);

/* The bytes of K and V the forward packs for a (0: it packs none). */
size_t qkv__forward_packed_bytes(const qkv_ctx *ctx, const qkv__attn *a);

static inline qkv__seq qkv__attn_seq(const qkv__attn *a, int64_t s)
{
    qkv__seq r;
    if (a->varlen) {
        r.b = 0;
        r.q0 = a->cu_q[s];
        r.sq = a->cu_q[s + 1] - a->cu_q[s];
        r.k0 = a->cu_k[s];
        r.sk = a->cu_k[s + 1] - a->cu_k[s];
    } else {
        r.b = s; r.q0 = 0; r.sq = a->Sq; r.k0 = 0; r.sk = a->lens_k ? a->lens_k[s] : a->Sk;
    }
    return r;
}

/* Index of lse for query row i (of dim 1) and head h. */
static inline int64_t qkv__lse_index(const qkv__attn *a, int64_t b, int64_t h,
                                     int64_t i)
{
    return (b * a->Hq + h) * a->Sq + i;
}

/* Work split shared by the drivers: sequence s gives units·ceil(sq/rows)
   tasks (units: heads or kv heads), numbered sequence after sequence. */
typedef struct {
    int64_t *start;    /* [n_seqs+1]: first task of each sequence */
    int64_t  n_seqs;
    int64_t  total;
} qkv__tasks;

qkv_status qkv__tasks_make(qkv_ctx *ctx, const qkv__attn *a, int64_t units,
                           int64_t rows, qkv__tasks *t);
/* The same over key rows: units·ceil(sk/keys) tasks per sequence. */
qkv_status qkv__tasks_make_keys(qkv_ctx *ctx, const qkv__attn *a, int64_t units,
                                int64_t keys, qkv__tasks *t);
void       qkv__tasks_free(qkv__tasks *t);

/* The sequence holding task, and (in *local) the task's index within it.
   Empty sequences own no task, so the search lands past them. */
static inline int64_t qkv__tasks_find(const qkv__tasks *t, int64_t task, int64_t *local)
{
    int64_t lo = 0, hi = t->n_seqs;
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (t->start[mid] <= task) lo = mid; else hi = mid;
    }
    *local = task - t->start[lo];
    return lo;
}

#endif /* QKV_ATTN_H */
