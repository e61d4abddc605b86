/*
 * check.c — validation of attention arguments. Everything a kernel will
 * trust is checked here first: pointers, dtypes, shapes, the byte extent of
 * every view (no int64 overflow), outputs that would overlap themselves,
 * option domains, cumulative sequence offsets and bias broadcasting; for
 * the backward also the gradients' shapes and dtypes and that no gradient
 * shares an element with another or with an input.
 * Messages name the argument by its C path ("k->shape[2]", "opts->bias").
 */
#include "attn.h"

#include <math.h>
#include <stdlib.h>

#define FAIL(st, ...) return qkv__fail(ctx, st, __VA_ARGS__)

/* Sizes positive, dtype known, data non-NULL, and the furthest element
   reachable in both directions fits in int64 bytes. */
static qkv_status check_view(qkv_ctx *ctx, const qkv_tensor *t, const char *name)
{
    if (!t)
        FAIL(QKV_ERR_NULL, "%s: NULL tensor", name);
    if (!t->data)
        FAIL(QKV_ERR_NULL, "%s->data: NULL", name);
    size_t es = qkv_dtype_size(t->dtype);
    if (!es)
        FAIL(QKV_ERR_DTYPE, "%s->dtype: unknown dtype %d", name, (int)t->dtype);
    int64_t extent = 0;
    for (int d = 0; d < 4; d++) {
        if (t->shape[d] <= 0)
            FAIL(QKV_ERR_SHAPE, "%s->shape[%d] = %lld must be positive", name, d,
                 (long long)t->shape[d]);
        int64_t st = t->stride[d], span;
        if (st == INT64_MIN || __builtin_mul_overflow(t->shape[d] - 1, st < 0 ? -st : st, &span) ||
            __builtin_add_overflow(extent, span, &extent))
            FAIL(QKV_ERR_OVERFLOW, "%s->stride[%d] = %lld: the view's extent overflows",
                 name, d, (long long)st);
    }
    int64_t bytes;
    if (__builtin_mul_overflow(extent + 1, (int64_t)es, &bytes))
        FAIL(QKV_ERR_OVERFLOW, "%s->shape: the view's extent overflows", name);
    return QKV_OK;
}

/* An output view must not reach one element twice: sorted by |stride|,
   each dimension must step past everything the smaller ones span. */
static qkv_status check_no_overlap(qkv_ctx *ctx, const qkv_tensor *t, const char *name)
{
    int idx[4], n = 0;
    for (int d = 0; d < 4; d++)
        if (t->shape[d] > 1)
            idx[n++] = d;
    for (int i = 1; i < n; i++)                   /* insertion sort, 4 items */
        for (int j = i; j > 0 && llabs(t->stride[idx[j]]) < llabs(t->stride[idx[j - 1]]); j--) {
            int tmp = idx[j]; idx[j] = idx[j - 1]; idx[j - 1] = tmp;
        }
    int64_t span = 0;                             /* checked by check_view */
    for (int i = 0; i < n; i++) {
        int d = idx[i];
        int64_t st = llabs(t->stride[d]);
        if (st <= span)
            FAIL(QKV_ERR_STRIDE, "%s->stride[%d] = %lld makes elements overlap",
                 name, d, (long long)t->stride[d]);
        span += (t->shape[d] - 1) * st;
    }
    return QKV_OK;
}

static qkv_status check_cu(qkv_ctx *ctx, const int32_t *cu, int32_t n,
                           int64_t len, const char *name)
{
    if (!cu)
        FAIL(QKV_ERR_NULL, "opts->%s: NULL while the other cu_seqlens is set", name);
    if (cu[0] < 0)
        FAIL(QKV_ERR_SHAPE, "opts->%s[0] = %d must be >= 0", name, (int)cu[0]);
    for (int32_t s = 0; s < n; s++)
        if (cu[s + 1] < cu[s])
            FAIL(QKV_ERR_SHAPE, "opts->%s[%d] = %d is below opts->%s[%d] = %d (must not decrease)",
                 name, (int)s + 1, (int)cu[s + 1], name, (int)s, (int)cu[s]);
    if (cu[n] > len)
        FAIL(QKV_ERR_SHAPE, "opts->%s[%d] = %d is past the tensor's %lld rows",
             name, (int)n, (int)cu[n], (long long)len);
    return QKV_OK;
}

static qkv_status check_bias(qkv_ctx *ctx, const qkv_tensor *b, qkv__attn *a)
{
    qkv_status st = check_view(ctx, b, "opts->bias");
    if (st)
        return st;
    if (b->dtype != QKV_F32)
        FAIL(QKV_ERR_DTYPE, "opts->bias->dtype must be QKV_F32");
    if (a->varlen)
        FAIL(QKV_ERR_UNSUPPORTED, "opts->bias: not supported together with varlen (cu_seqlens)");
    const int64_t want[4] = { a->B, a->Hq, a->Sq, a->Sk };
    static const char *const what[4] = { "batch", "heads_q", "seqlen_q", "seqlen_k" };
    for (int d = 0; d < 4; d++) {
        if (b->shape[d] != want[d] && b->shape[d] != 1)
            FAIL(QKV_ERR_SHAPE, "opts->bias->shape[%d] = %lld must be 1 or %s = %lld",
                 d, (long long)b->shape[d], what[d], (long long)want[d]);
        a->bias_stride[d] = b->shape[d] == 1 ? 0 : b->stride[d];
    }
    a->bias = b->data;
    return QKV_OK;
}

/* The option values every attention call checks (varlen and bias apart). */
static qkv_status check_opts(qkv_ctx *ctx, const qkv_attn_opts *opts)
{
    if (!isfinite(opts->scale))
        FAIL(QKV_ERR_ARG, "opts->scale = %g must be finite (0 = 1/sqrt(head_dim))", opts->scale);
    if (!(opts->softcap >= 0.0f) || isinf(opts->softcap))
        FAIL(QKV_ERR_ARG, "opts->softcap = %g must be finite and >= 0 (0 = off)", opts->softcap);
    if (opts->window_left < -1)
        FAIL(QKV_ERR_ARG, "opts->window_left = %lld must be >= -1 (-1 = unbounded)",
             (long long)opts->window_left);
    if (opts->window_right < -1)
        FAIL(QKV_ERR_ARG, "opts->window_right = %lld must be >= -1 (-1 = unbounded)",
             (long long)opts->window_right);
    if (!(opts->dropout_p >= 0.0f && opts->dropout_p < 1.0f))
        FAIL(QKV_ERR_ARG, "opts->dropout_p = %g must be in [0, 1) (0 = off)",
             (double)opts->dropout_p);
    return QKV_OK;
}

/* Sizes and options of *a from q, the keys' Sk, Hkv and Dv, and opts. */
static void fill_attn(qkv__attn *a, const qkv_tensor *q, const qkv_attn_opts *opts,
                      int64_t Sk, int64_t Hkv, int64_t Dv)
{
    const int64_t Sq = q->shape[1], D = q->shape[3];
    a->dt = q->dtype;
    a->B = q->shape[0]; a->Sq = Sq; a->Sk = Sk; a->Hq = q->shape[2]; a->Hkv = Hkv;
    a->D = D; a->Dv = Dv;
    a->group = a->Hq / Hkv;
    a->lens_k = NULL;
    a->scale = opts->scale != 0.0f ? opts->scale : (float)(1.0 / sqrt((double)D));
    a->softcap = opts->softcap;
    a->causal = opts->causal != 0;
    /* a window wider than every sequence is no window; clamping here keeps
       position arithmetic (p ± window) far from int64 overflow */
    a->window_left = opts->window_left > Sq + Sk ? -1 : opts->window_left;
    a->window_right = opts->window_right > Sq + Sk ? -1 : opts->window_right;
    a->alibi = opts->alibi_slopes;
    a->bias = NULL;
    a->dropout = opts->dropout_p > 0.0f;
    /* drop when a uniform 32-bit hash is below p·2^32 (p < 1: it fits) */
    a->drop_thresh = (uint32_t)ldexp((double)opts->dropout_p, 32);
    a->drop_seed[0] = (uint32_t)opts->dropout_seed;
    a->drop_seed[1] = (uint32_t)(opts->dropout_seed >> 32);
    a->drop_scale = a->dropout ? (float)(1.0 / (1.0 - (double)opts->dropout_p)) : 1.0f;
}

/* Everything a forward call checks; out_written says whether out is the
   call's output (then it must not overlap itself) or an input (backward). */
static qkv_status check_attn(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_attn_opts *opts,
        const qkv_tensor *out, float *lse, qkv__attn *a, int out_written)
{
    qkv_status st;
    if (!ctx)
        return QKV_ERR_NULL;
    ctx->err[0] = 0;
    if ((st = check_view(ctx, q, "q")) || (st = check_view(ctx, k, "k")) ||
        (st = check_view(ctx, v, "v")) || (st = check_view(ctx, out, "out")))
        return st;
    if (!opts)
        FAIL(QKV_ERR_NULL, "opts: NULL (use qkv_attn_opts_default())");
    if (k->dtype != q->dtype || v->dtype != q->dtype || out->dtype != q->dtype)
        FAIL(QKV_ERR_DTYPE, "%s->dtype differs from q->dtype (q, k, v and out share one dtype)",
             k->dtype != q->dtype ? "k" : v->dtype != q->dtype ? "v" : "out");

    const int64_t B = q->shape[0], Sq = q->shape[1], Hq = q->shape[2], D = q->shape[3];
    const int64_t Sk = k->shape[1], Hkv = k->shape[2], Dv = v->shape[3];
    if (k->shape[0] != B || v->shape[0] != B || out->shape[0] != B)
        FAIL(QKV_ERR_SHAPE, "%s->shape[0] (batch) differs from q->shape[0] = %lld",
             k->shape[0] != B ? "k" : v->shape[0] != B ? "v" : "out", (long long)B);
    if (k->shape[3] != D)
        FAIL(QKV_ERR_SHAPE, "k->shape[3] = %lld differs from q->shape[3] = %lld (head_dim)",
             (long long)k->shape[3], (long long)D);
    if (v->shape[1] != Sk)
        FAIL(QKV_ERR_SHAPE, "v->shape[1] = %lld differs from k->shape[1] = %lld (seqlen_k)",
             (long long)v->shape[1], (long long)Sk);
    if (v->shape[2] != Hkv)
        FAIL(QKV_ERR_SHAPE, "v->shape[2] = %lld differs from k->shape[2] = %lld (heads_kv)",
             (long long)v->shape[2], (long long)Hkv);
    if (Hq % Hkv != 0)
        FAIL(QKV_ERR_SHAPE, "k->shape[2] = %lld (heads_kv) must divide q->shape[2] = %lld (heads_q)",
             (long long)Hkv, (long long)Hq);
    if (out->shape[1] != Sq)
        FAIL(QKV_ERR_SHAPE, "out->shape[1] = %lld differs from q->shape[1] = %lld (seqlen_q)",
             (long long)out->shape[1], (long long)Sq);
    if (out->shape[2] != Hq)
        FAIL(QKV_ERR_SHAPE, "out->shape[2] = %lld differs from q->shape[2] = %lld (heads_q)",
             (long long)out->shape[2], (long long)Hq);
    if (out->shape[3] != Dv)
        FAIL(QKV_ERR_SHAPE, "out->shape[3] = %lld differs from v->shape[3] = %lld (head_dim_v)",
             (long long)out->shape[3], (long long)Dv);
    if (out_written && (st = check_no_overlap(ctx, out, "out")))
        return st;

    if ((st = check_opts(ctx, opts)))
        return st;
    fill_attn(a, q, opts, Sk, Hkv, Dv);
    a->q = q; a->k = k; a->v = v; a->out = out; a->lse = lse;

    a->varlen = opts->cu_seqlens_q || opts->cu_seqlens_k;
    if (a->varlen) {
        if (opts->n_seqs <= 0)
            FAIL(QKV_ERR_SHAPE, "opts->n_seqs = %d must be >= 1 with cu_seqlens",
                 (int)opts->n_seqs);
        if (B != 1)
            FAIL(QKV_ERR_SHAPE, "q->shape[0] = %lld must be 1 with cu_seqlens (packed varlen)",
                 (long long)B);
        if ((st = check_cu(ctx, opts->cu_seqlens_q, opts->n_seqs, Sq, "cu_seqlens_q")) ||
            (st = check_cu(ctx, opts->cu_seqlens_k, opts->n_seqs, Sk, "cu_seqlens_k")))
            return st;
        a->cu_q = opts->cu_seqlens_q;
        a->cu_k = opts->cu_seqlens_k;
        a->n_seqs = opts->n_seqs;
    } else {
        a->cu_q = a->cu_k = NULL;
        a->n_seqs = B;
    }
    if (opts->bias && (st = check_bias(ctx, opts->bias, a)))
        return st;

    /* B·Hq·Sq (lse and task counts) must fit; out's extent bounds it
       unless dims are 1, so check the product directly. */
    int64_t rows, bytes;
    if (__builtin_mul_overflow(B, Hq, &rows) || __builtin_mul_overflow(rows, Sq, &rows) ||
        __builtin_mul_overflow(rows, (int64_t)sizeof(float), &bytes))
        FAIL(QKV_ERR_OVERFLOW, "lse: batch x heads_q x seqlen_q overflows");
    return QKV_OK;
}

qkv_status qkv__attn_check(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_attn_opts *opts,
        const qkv_tensor *out, float *lse, qkv__attn *a)
{
    return check_attn(ctx, q, k, v, opts, out, lse, a, 1);
}

/* ---- backward ------------------------------------------------------------- */

/* t (already a valid view) has the dtype and shape of its primal p. */
static qkv_status check_like(qkv_ctx *ctx, const qkv_tensor *t, const char *name,
                             const qkv_tensor *p, const char *pname)
{
    if (t->dtype != p->dtype)
        FAIL(QKV_ERR_DTYPE, "%s->dtype = %d, want %s->dtype = %d (every tensor shares q's dtype)",
             name, (int)t->dtype, pname, (int)p->dtype);
    for (int d = 0; d < 4; d++)
        if (t->shape[d] != p->shape[d])
            FAIL(QKV_ERR_SHAPE, "%s->shape[%d] = %lld, want %s->shape[%d] = %lld",
                 name, d, (long long)t->shape[d], pname, d, (long long)p->shape[d]);
    return QKV_OK;
}

/* The bytes [*lo, *hi) of a valid view's extent. */
static void view_bytes(const qkv_tensor *t, uintptr_t *lo, uintptr_t *hi)
{
    int64_t es = (int64_t)qkv_dtype_size(t->dtype), neg = 0, pos = 0;
    for (int d = 0; d < 4; d++) {
        int64_t span = (t->shape[d] - 1) * t->stride[d];   /* bounded by check_view */
        if (span < 0) neg += span; else pos += span;
    }
    *lo = (uintptr_t)t->data - (uintptr_t)(-neg * es);
    *hi = (uintptr_t)t->data + (uintptr_t)((pos + 1) * es);
}

static int64_t floor_div(int64_t a, int64_t b)   /* b > 0 */
{
    int64_t q = a / b;
    return q - (a % b != 0 && a < 0);
}

static int64_t ceil_div(int64_t a, int64_t b)    /* b > 0 */
{
    int64_t q = a / b;
    return q + (a % b != 0 && a > 0);
}

/* One unknown of the overlap equation: an integer x in [lo, hi] times s > 0. */
typedef struct { int64_t s, lo, hi; } overlap_term;

/* Whether Σ x_m·s_m = delta has a solution with each x_m in its range;
   terms sorted by decreasing s, tail_lo/tail_hi[m] the least and greatest
   value of the terms after m. Only x_m that leave delta reachable by the
   later terms are tried: one or two per level for views that do not
   overlap themselves. Past `*budget` tries it answers yes (overlap). */
static int overlap_solve(const overlap_term *t, const int64_t *tail_lo, const int64_t *tail_hi,
                         int n, int m, int64_t delta, int *budget)
{
    if (m == n)
        return delta == 0;
    int64_t r_lo, r_hi;
    if (__builtin_sub_overflow(delta, tail_hi[m], &r_lo) ||
        __builtin_sub_overflow(delta, tail_lo[m], &r_hi))
        return 1;
    int64_t x0 = ceil_div(r_lo, t[m].s), x1 = floor_div(r_hi, t[m].s);
    if (x0 < t[m].lo) x0 = t[m].lo;
    if (x1 > t[m].hi) x1 = t[m].hi;
    for (int64_t x = x0; x <= x1; x++) {
        if (--*budget < 0)
            return 1;
        if (overlap_solve(t, tail_lo, tail_hi, n, m + 1, delta - x * t[m].s, budget))
            return 1;
    }
    return 0;
}

/* Whether views a and b (valid, same dtype) can reach a common byte. Views
   whose byte ranges meet are examined element by element (packed gradients
   interleave without sharing an element): b's element j lies on a's
   element i iff Σ i_d·a.stride[d] - Σ j_d·b.stride[d] = b.data - a.data,
   solved exactly over the index ranges. Misaligned views that meet, and
   equations too costly to settle, count as overlapping. */
static int views_overlap(const qkv_tensor *a, const qkv_tensor *b)
{
    uintptr_t alo, ahi, blo, bhi;
    view_bytes(a, &alo, &ahi);
    view_bytes(b, &blo, &bhi);
    if (ahi <= blo || bhi <= alo)
        return 0;
    int64_t es = (int64_t)qkv_dtype_size(a->dtype);
    /* the ranges meet, so the difference is below their two extents */
    int64_t bytes = (int64_t)((uintptr_t)b->data - (uintptr_t)a->data);
    if (es != (int64_t)qkv_dtype_size(b->dtype) || bytes % es != 0)
        return 1;
    overlap_term t[8];
    int n = 0;
    for (int side = 0; side < 2; side++) {
        const qkv_tensor *x = side ? b : a;
        for (int d = 0; d < 4; d++) {
            int64_t st = x->stride[d], m = x->shape[d] - 1;
            if (st == 0 || m == 0)
                continue;
            /* a's indices enter with +stride, b's with -stride */
            int flip = (st < 0) != (side == 1);
            overlap_term u = { st < 0 ? -st : st, flip ? -m : 0, flip ? 0 : m };
            int merged = 0;
            for (int i = 0; i < n && !merged; i++)
                if (t[i].s == u.s) {
                    if (__builtin_add_overflow(t[i].lo, u.lo, &t[i].lo) ||
                        __builtin_add_overflow(t[i].hi, u.hi, &t[i].hi))
                        return 1;
                    merged = 1;
                }
            if (!merged)
                t[n++] = u;
        }
    }
    for (int i = 1; i < n; i++)                   /* insertion sort, decreasing s */
        for (int j = i; j > 0 && t[j].s > t[j - 1].s; j--) {
            overlap_term tmp = t[j]; t[j] = t[j - 1]; t[j - 1] = tmp;
        }
    int64_t tail_lo[8], tail_hi[8], lo = 0, hi = 0;
    for (int m = n - 1; m >= 0; m--) {
        tail_lo[m] = lo;
        tail_hi[m] = hi;
        int64_t plo, phi;
        if (__builtin_mul_overflow(t[m].lo, t[m].s, &plo) ||
            __builtin_mul_overflow(t[m].hi, t[m].s, &phi) ||
            __builtin_add_overflow(lo, plo, &lo) || __builtin_add_overflow(hi, phi, &hi))
            return 1;
    }
    int budget = 1 << 12;
    return overlap_solve(t, tail_lo, tail_hi, n, 0, bytes / es, &budget);
}

qkv_status qkv__attn_check_backward(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv, qkv__attn *a, qkv__grads *g)
{
    qkv_status st = check_attn(ctx, q, k, v, opts, out, NULL, a, 0);
    if (st)
        return st;
    if ((st = check_view(ctx, dout, "dout")) || (st = check_view(ctx, dq, "dq")) ||
        (st = check_view(ctx, dk, "dk")) || (st = check_view(ctx, dv, "dv")))
        return st;
    if (!lse)
        FAIL(QKV_ERR_NULL, "lse: NULL (the backward needs the forward's log-sum-exp)");
    if ((st = check_like(ctx, dout, "dout", out, "out")) || (st = check_like(ctx, dq, "dq", q, "q")) ||
        (st = check_like(ctx, dk, "dk", k, "k")) || (st = check_like(ctx, dv, "dv", v, "v")))
        return st;
    if ((st = check_no_overlap(ctx, dq, "dq")) || (st = check_no_overlap(ctx, dk, "dk")) ||
        (st = check_no_overlap(ctx, dv, "dv")))
        return st;

    /* a gradient must not share memory with another one, nor with an input */
    const qkv_tensor *grad[3] = { dq, dk, dv };
    static const char *const gname[3] = { "dq", "dk", "dv" };
    const qkv_tensor *in[5] = { q, k, v, out, dout };
    static const char *const iname[5] = { "q", "k", "v", "out", "dout" };
    for (int i = 0; i < 3; i++)
        for (int j = i + 1; j < 3; j++)
            if (views_overlap(grad[i], grad[j]))
                FAIL(QKV_ERR_ARG, "%s and %s share memory (each gradient needs its own)",
                     gname[i], gname[j]);
    /* the lse array [B·Hq·Sq] floats (its size checked by check_attn) */
    uintptr_t llo = (uintptr_t)lse, lhi = llo + (uintptr_t)(a->B * a->Hq * a->Sq) * sizeof(float);
    for (int i = 0; i < 3; i++) {
        for (int j = 0; j < 5; j++)
            if (views_overlap(grad[i], in[j]))
                FAIL(QKV_ERR_ARG, "%s and %s share memory (a gradient must not overwrite an input)",
                     gname[i], iname[j]);
        uintptr_t lo, hi;
        view_bytes(grad[i], &lo, &hi);
        if (lo < lhi && llo < hi)
            FAIL(QKV_ERR_ARG, "%s and lse share memory (a gradient must not overwrite an input)",
                 gname[i]);
    }
    g->dout = dout;
    g->lse = lse;
    g->dq = dq; g->dk = dk; g->dv = dv;
    g->dbias = NULL;
    return QKV_OK;
}

qkv_status qkv__attn_check_dbias(qkv_ctx *ctx, const qkv__attn *a, qkv__grads *g,
                                 const qkv_attn_opts *opts, qkv_tensor *dbias)
{
    qkv_status st = check_view(ctx, dbias, "dbias");
    if (st)
        return st;
    const qkv_tensor *bias = opts->bias;
    if (!bias)
        FAIL(QKV_ERR_ARG, "dbias: given, but opts->bias is NULL (no bias to differentiate)");
    if (dbias->dtype != QKV_F32)
        FAIL(QKV_ERR_DTYPE, "dbias->dtype must be QKV_F32, as opts->bias");
    for (int d = 0; d < 4; d++)
        if (dbias->shape[d] != bias->shape[d])
            FAIL(QKV_ERR_SHAPE, "dbias->shape[%d] = %lld differs from opts->bias->shape[%d] = "
                 "%lld", d, (long long)dbias->shape[d], d, (long long)bias->shape[d]);
    if ((st = check_no_overlap(ctx, dbias, "dbias")))
        return st;
    const qkv_tensor *other[9] = { g->dq, g->dk, g->dv, a->q, a->k, a->v, a->out, g->dout,
                                   bias };
    static const char *const name[9] = { "dq", "dk", "dv", "q", "k", "v", "out", "dout",
                                         "opts->bias" };
    for (int i = 0; i < 9; i++)
        if (views_overlap(dbias, other[i]))
            FAIL(QKV_ERR_ARG, "dbias and %s share memory (each output needs its own, and "
                 "must not overwrite an input)", name[i]);
    uintptr_t lo, hi, llo = (uintptr_t)g->lse;
    uintptr_t lhi = llo + (uintptr_t)(a->B * a->Hq * a->Sq) * sizeof(float);
    view_bytes(dbias, &lo, &hi);
    if (lo < lhi && llo < hi)
        FAIL(QKV_ERR_ARG, "dbias and lse share memory (an output must not overwrite an input)");
    g->dbias = dbias;
    return QKV_OK;
}

/* ---- attention from a KV cache (decode.c) --------------------------------- */

qkv_status qkv__check_tensor(qkv_ctx *ctx, const qkv_tensor *t, const char *name)
{
    return check_view(ctx, t, name);
}

qkv_status qkv__attn_check_cache(qkv_ctx *ctx, const qkv_tensor *q, const qkv_attn_opts *opts,
        const qkv_tensor *out, float *lse, int64_t Smax, int64_t Hkv, int64_t D, int64_t Dv,
        const char *keys, qkv__attn *a)
{
    qkv_status st;
    if ((st = check_view(ctx, q, "q")) || (st = check_view(ctx, out, "out")))
        return st;
    if (!opts)
        FAIL(QKV_ERR_NULL, "opts: NULL (use qkv_attn_opts_default())");
    if (out->dtype != q->dtype)
        FAIL(QKV_ERR_DTYPE, "out->dtype differs from q->dtype (q and out share one dtype)");
    const int64_t B = q->shape[0], Sq = q->shape[1], Hq = q->shape[2];
    if (q->shape[3] != D)
        FAIL(QKV_ERR_SHAPE, "q->shape[3] = %lld differs from the head_dim of %s = %lld",
             (long long)q->shape[3], keys, (long long)D);
    if (Hq % Hkv != 0)
        FAIL(QKV_ERR_SHAPE, "%s: heads_kv = %lld must divide q->shape[2] = %lld (heads_q)",
             keys, (long long)Hkv, (long long)Hq);
    static const char *const what[4] = { "batch", "seqlen_q", "heads_q", "head_dim_v" };
    const int64_t want[4] = { B, Sq, Hq, Dv };
    for (int d = 0; d < 4; d++)
        if (out->shape[d] != want[d])
            FAIL(QKV_ERR_SHAPE, "out->shape[%d] = %lld, want %s = %lld", d,
                 (long long)out->shape[d], what[d], (long long)want[d]);
    if ((st = check_no_overlap(ctx, out, "out")) || (st = check_opts(ctx, opts)))
        return st;
    if (opts->cu_seqlens_q || opts->cu_seqlens_k)
        FAIL(QKV_ERR_UNSUPPORTED, "opts->cu_seqlens_q/k: packed varlen is not supported with a "
             "KV cache (per-sequence lengths come from seqlens_k)");
    if (opts->bias)
        FAIL(QKV_ERR_UNSUPPORTED, "opts->bias: not supported with a KV cache");
    if (opts->dropout_p != 0.0f)
        FAIL(QKV_ERR_UNSUPPORTED, "opts->dropout_p = %g: dropout is for training; attention "
             "from a KV cache does not drop out", (double)opts->dropout_p);
    int64_t rows, bytes;
    if (__builtin_mul_overflow(B, Hq, &rows) || __builtin_mul_overflow(rows, Sq, &rows) ||
        __builtin_mul_overflow(rows, (int64_t)sizeof(float), &bytes))
        FAIL(QKV_ERR_OVERFLOW, "lse: batch x heads_q x seqlen_q overflows");
    fill_attn(a, q, opts, Smax, Hkv, Dv);
    a->varlen = 0;
    a->cu_q = a->cu_k = NULL;
    a->n_seqs = B;
    a->q = q; a->k = a->v = NULL; a->out = out; a->lse = lse;
    return QKV_OK;
}
