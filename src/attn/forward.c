/*
 * forward.c — the fast attention forward: FlashAttention-style tiling with
 * an online softmax, driving the micro-kernels of src/cpu.
 *
 * A task is (sequence, query head, tile of BQ query rows). It packs its Q
 * tile to fp32 once, then walks the key tiles its rows can see: each K tile
 * is packed transposed ([D][BK]) and each V tile row-major ([BK][Dv]) in
 * fp32, S = scale·Q·Kᵀ goes through the masks, and the running row max m,
 * sum l and accumulator acc are updated:
 *     m' = max(m, rowmax S),  P = exp(S - m'),  l = l·e^(m-m') + ΣP,
 *     acc = acc·e^(m-m') + P·V.
 * Memory is O(BQ·BK + (BQ+BK)·D) per thread, whatever the sequence length.
 * Tiles wholly outside the causal/window band are never visited; only tiles
 * the band cuts are masked element by element. Each task writes its own
 * rows of out and lse, and its arithmetic does not depend on the thread
 * running it, so results are bitwise identical for any thread count.
 *
 * Not here: the inner loops (src/cpu), validation (check.c), the spec
 * (reference.c).
 */
#include "attn.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { BQ = 64, BK = 128 };

typedef struct {
    qkv_ctx         *ctx;
    const qkv__attn *a;
    int64_t         *task_start;  /* [n_seqs+1] first task of each sequence */
} fwd_job;

typedef struct {                  /* per-thread scratch, fp32 */
    float *q;      /* [BQ][D]   */
    float *kt;     /* [D][BK]   */
    float *v;      /* [BK][Dv]  */
    float *s;      /* [BQ][BK]  */
    float *acc;    /* [BQ][Dv]  */
    float *m, *l, *alpha;  /* [BQ] */
} tiles;

static size_t tiles_floats(int64_t D, int64_t Dv)
{
    return (size_t)(BQ * D + D * BK + BK * Dv + BQ * BK + BQ * Dv + 3 * BQ);
}

static tiles tiles_at(float *base, int64_t D, int64_t Dv)
{
    tiles t;
    t.q = base;
    t.kt = t.q + BQ * D;
    t.v = t.kt + D * BK;
    t.s = t.v + BK * Dv;
    t.acc = t.s + BQ * BK;
    t.m = t.acc + BQ * Dv;
    t.l = t.m + BQ;
    t.alpha = t.l + BQ;
    return t;
}

/* dst[c] = src[c·stride] as fp32, c < n. */
static void load_row(const qkv_tensor *t, int64_t off, int64_t stride, int64_t n, float *dst)
{
    if (t->dtype == QKV_F32 && stride == 1) {
        memcpy(dst, (const float *)t->data + off, (size_t)n * sizeof(float));
        return;
    }
    for (int64_t c = 0; c < n; c++)
        dst[c] = qkv__load(t->data, t->dtype, off + c * stride);
}

static void store_row(const qkv_tensor *t, int64_t off, int64_t stride, int64_t n,
                      const float *src, float mul)
{
    for (int64_t c = 0; c < n; c++) {
        float x = src[c] * mul;
        int64_t o = off + c * stride;
        switch (t->dtype) {
        case QKV_F16:  ((uint16_t *)t->data)[o] = qkv__f32_to_f16(x); break;
        case QKV_BF16: ((uint16_t *)t->data)[o] = qkv__f32_to_bf16(x); break;
        default:       ((float *)t->data)[o] = x; break;
        }
    }
}

/* The keys query row i can see, as a half-open range [*lo, *hi) within a
   sequence of sq queries and sk keys; empty when *lo >= *hi. */
static void key_range(const qkv__attn *a, const qkv__seq *s, int64_t i,
                      int64_t *lo, int64_t *hi)
{
    int64_t p = i + s->sk - s->sq;
    int64_t l = 0, h = s->sk;
    if (a->window_left >= 0 && p - a->window_left > l)
        l = p - a->window_left;
    if (a->causal && p + 1 < h)
        h = p + 1;
    if (a->window_right >= 0 && p + a->window_right + 1 < h)
        h = p + a->window_right + 1;
    *lo = l < s->sk ? l : s->sk;
    *hi = h > *lo ? h : *lo;
}

/* Softcap, ALiBi, bias and the band mask on one score tile: rows i0.., keys
   j0..j0+n. `band` says whether the band cuts this tile. */
static void score_mods(const qkv__attn *a, const qkv__seq *s, int64_t h,
                       int64_t i0, int m, int64_t j0, int n, int band, float *st)
{
    const float cap = a->softcap, slope = a->alibi ? a->alibi[h] : 0.0f;
    for (int r = 0; r < m; r++) {
        float *row = st + (int64_t)r * BK;
        int64_t i = i0 + r, p = i + s->sk - s->sq;
        if (cap > 0.0f)
            for (int c = 0; c < n; c++)
                row[c] = cap * tanhf(row[c] / cap);
        if (a->alibi)
            for (int c = 0; c < n; c++)
                row[c] -= slope * (float)llabs(p - (j0 + c));
        if (a->bias) {
            const float *b = a->bias + s->b * a->bias_stride[0] + h * a->bias_stride[1] +
                             i * a->bias_stride[2] + j0 * a->bias_stride[3];
            for (int c = 0; c < n; c++)
                row[c] += b[c * a->bias_stride[3]];
        }
        if (band) {
            int64_t lo, hi;
            key_range(a, s, i, &lo, &hi);
            for (int c = 0; c < n; c++)
                if (j0 + c < lo || j0 + c >= hi)
                    row[c] = -INFINITY;
        }
    }
}

static void fwd_task(void *arg, int64_t task, int worker)
{
    const fwd_job *job = arg;
    const qkv__attn *a = job->a;
    const qkv__kernels *kn = job->ctx->kernels;
    int64_t lo = 0, hi = a->n_seqs;               /* sequence holding task */
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (job->task_start[mid] <= task) lo = mid; else hi = mid;
    }
    const qkv__seq s = qkv__attn_seq(a, lo);
    const int64_t t = task - job->task_start[lo];
    const int64_t n_qt = (s.sq + BQ - 1) / BQ;
    const int64_t h = t / n_qt, hk = h / a->group;
    const int64_t i0 = (t % n_qt) * BQ;
    const int m = (int)(s.sq - i0 < BQ ? s.sq - i0 : BQ);
    const int64_t D = a->D, Dv = a->Dv;
    const qkv_tensor *q = a->q, *k = a->k, *v = a->v, *out = a->out;
    tiles tl = tiles_at(job->ctx->scratch[worker], D, Dv);

    for (int r = 0; r < m; r++) {
        load_row(q, s.b * q->stride[0] + (s.q0 + i0 + r) * q->stride[1] + h * q->stride[2],
                 q->stride[3], D, tl.q + r * D);
        tl.m[r] = -INFINITY;
        tl.l[r] = 0.0f;
    }
    memset(tl.acc, 0, (size_t)m * (size_t)Dv * sizeof(float));

    /* keys seen by any row of the tile: the band is monotone in i */
    int64_t klo, khi, lo_last, hi_first;
    key_range(a, &s, i0, &klo, &hi_first);
    key_range(a, &s, i0 + m - 1, &lo_last, &khi);
    if (khi < klo)
        khi = klo;
    const int modded = a->softcap > 0.0f || a->alibi || a->bias;

    for (int64_t j0 = klo; j0 < khi; j0 += BK) {
        const int n = (int)(khi - j0 < BK ? khi - j0 : BK);
        /* pack K transposed and V row-major */
        for (int c = 0; c < n; c++) {
            const int64_t kr = s.b * k->stride[0] + (s.k0 + j0 + c) * k->stride[1] + hk * k->stride[2];
            for (int64_t d = 0; d < D; d++)
                tl.kt[d * BK + c] = qkv__load(k->data, k->dtype, kr + d * k->stride[3]);
            load_row(v, s.b * v->stride[0] + (s.k0 + j0 + c) * v->stride[1] + hk * v->stride[2],
                     v->stride[3], Dv, tl.v + c * Dv);
        }
        kn->qk(m, n, (int)D, a->scale, tl.q, D, tl.kt, BK, tl.s, BK);
        /* the band cuts this tile unless every row sees all of it */
        const int band = !(lo_last <= j0 && hi_first >= j0 + n);
        if (modded || band)
            score_mods(a, &s, h, i0, m, j0, n, band, tl.s);
        for (int r = 0; r < m; r++) {
            float *row = tl.s + r * BK;
            float mx = kn->row_max(row, n);
            float m_new = mx > tl.m[r] ? mx : tl.m[r];
            if (m_new == -INFINITY) {             /* nothing visible yet */
                memset(row, 0, (size_t)n * sizeof(float));
                tl.alpha[r] = 1.0f;
                continue;
            }
            float alpha = tl.m[r] == m_new ? 1.0f : expf(tl.m[r] - m_new);
            tl.l[r] = tl.l[r] * alpha + kn->exp_sum(row, n, m_new);
            tl.m[r] = m_new;
            tl.alpha[r] = alpha;
        }
        kn->pv(m, n, (int)Dv, tl.s, BK, tl.v, Dv, tl.alpha, tl.acc, Dv);
    }

    for (int r = 0; r < m; r++) {
        const int64_t qi = s.q0 + i0 + r;
        const float l = tl.l[r];
        store_row(out, s.b * out->stride[0] + qi * out->stride[1] + h * out->stride[2],
                  out->stride[3], Dv, tl.acc + r * Dv, l > 0.0f ? 1.0f / l : 0.0f);
        if (a->lse)
            a->lse[qkv__lse_index(a, s.b, h, qi)] = l > 0.0f ? tl.m[r] + logf(l) : -INFINITY;
    }
}

qkv_attn_opts qkv_attn_opts_default(void)
{
    qkv_attn_opts o;
    memset(&o, 0, sizeof o);
    o.window_left = -1;
    o.window_right = -1;
    return o;
}

qkv_status qkv_attention_forward(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_attn_opts *opts,
        qkv_tensor *out, float *lse)
{
    qkv__attn a;
    qkv_status st = qkv__attn_check(ctx, q, k, v, opts, out, lse, &a);
    if (st)
        return st;
    if (a.D > (1 << 20) || a.Dv > (1 << 20))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "%s: head_dim above 1048576",
                         a.D > (1 << 20) ? "q->shape[3]" : "v->shape[3]");
    if ((st = qkv__scratch_reserve(ctx, tiles_floats(a.D, a.Dv) * sizeof(float))))
        return st;
    int64_t *task_start = malloc((size_t)(a.n_seqs + 1) * sizeof *task_start);
    if (!task_start)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "ctx: cannot allocate the task table");
    task_start[0] = 0;
    for (int64_t i = 0; i < a.n_seqs; i++) {
        qkv__seq s = qkv__attn_seq(&a, i);
        task_start[i + 1] = task_start[i] + a.Hq * ((s.sq + BQ - 1) / BQ);
    }
    fwd_job job = { ctx, &a, task_start };
    qkv__parallel(ctx, task_start[a.n_seqs], fwd_task, &job);
    free(task_start);
    return QKV_OK;
}
