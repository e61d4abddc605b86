/*
 * check.c — validation of attention arguments. Everything a kernel will
 * trust is checked here first: pointers, dtypes, shapes, the byte extent of
 * every view (no int64 overflow), outputs that would overlap themselves,
 * option domains, cumulative sequence offsets and bias broadcasting.
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

qkv_status qkv__attn_check(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_attn_opts *opts,
        const qkv_tensor *out, float *lse, qkv__attn *a)
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
    if ((st = check_no_overlap(ctx, out, "out")))
        return st;

    /* options */
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

    a->dt = q->dtype;
    a->B = B; a->Sq = Sq; a->Sk = Sk; a->Hq = Hq; a->Hkv = Hkv; a->D = D; a->Dv = Dv;
    a->group = Hq / Hkv;
    a->scale = opts->scale != 0.0f ? opts->scale : (float)(1.0 / sqrt((double)D));
    a->softcap = opts->softcap;
    a->causal = opts->causal != 0;
    /* a window wider than every sequence is no window; clamping here keeps
       position arithmetic (p ± window) far from int64 overflow */
    a->window_left = opts->window_left > Sq + Sk ? -1 : opts->window_left;
    a->window_right = opts->window_right > Sq + Sk ? -1 : opts->window_right;
    a->alibi = opts->alibi_slopes;
    a->bias = NULL;
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
