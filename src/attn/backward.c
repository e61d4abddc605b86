/*
 * backward.c — the gradients of attention, FlashAttention-2 style: scores
 * and probabilities are recomputed tile by tile from q, k and the forward's
 * lse, never stored whole. With Dd_i = dout_i·out_i, per tile
 *     P  = exp(S - lse),    dP = dO·Vᵀ,    dS = P ∘ (dP - Dd) (∘ softcap'),
 *     dV += Pᵀ·dO,   dK += scale·dSᵀ·Q,   dQ += scale·dS·K.
 *
 * Deterministic without atomics: every gradient row is owned by one task.
 * When a call has at least 8 (sequence, kv head) pairs, a task owns a
 * whole kv head: it walks the query tiles (all heads of the group
 * stacked, as in forward) and their keys, completes each tile's dQ, and
 * accumulates dK and dV of the head in its scratch (head_task). With
 * fewer heads, two passes share the work more finely: pass 1 gives each
 * task a tile of keys and walks the query tiles that see it (dK, dV);
 * pass 2 gives each task a tile of query rows and walks their keys (dQ),
 * recomputing S and dP: two more tile products. Either way results are
 * bitwise identical for any thread count (the choice depends on the
 * problem only).
 *
 * Tiles are held keys by queries (St[j][r]) as in forward, so the same
 * kernels serve: qk gives S and dP (with V and dO in the places of K and
 * Q), pv gives the three gradient products through its strided P operand.
 * fp32 and fp16 inputs are widened to fp32. bf16 inputs on a kernel set
 * with bf16 dot products take the bf16 path: S and dP are pair dot
 * products straight from the bf16 rows, and P and dS are rounded to bf16
 * for the three gradient products (as PyTorch's kernels do), whose
 * operands are pairs along the reduction axis (mm_bf16); softmax
 * statistics, dS and every accumulator stay fp32.
 */
#include "attn.h"
#include "tile.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { BKB = 128 };   /* keys per pass-1 task, and per step of pass 2 */

typedef struct {
    qkv_ctx          *ctx;
    const qkv__attn  *a;
    const qkv__grads *g;
    qkv__tasks        tasks;   /* pass 1: key tiles; pass 2: query tiles */
    float            *dd;      /* Dd = dout·out per row, indexed like lse */
    /* per-head mode: query tiles of a head dealt to `parts` tasks, each
       with its dK/dV partial ([sk_max][D+Dv] at partial + task·stride)
       when parts > 1 */
    int64_t           parts, sk_max;
    float            *partial;
} bwd_job;

typedef struct {              /* per-thread scratch, fp32 */
    float *q, *qt;            /* [R][D], [D][R]   the query tile         */
    float *dout, *doutt;      /* [R][Dv], [Dv][R] dO of the query tile   */
    float *k, *v;             /* [BKB][D], [BKB][Dv] widened K / V rows  */
    float *st, *dpt, *dcap;   /* [BKB][R] S then P, dP then dS, softcap' */
    float *dk, *dv;           /* [BKB][D], [BKB][Dv] pass 1 accumulators */
    float *dq;                /* [R][D]            pass 2 accumulator    */
    float *lse, *dd, *sum;    /* [R] each                                */
    float *ones;              /* [max(BKB, R)]                           */
    /* the bf16 path; pairs hold two bf16 adjacent along the reduction */
    uint16_t *qb, *dob;       /* [R][2·pairs(D|Dv)] the tile's q, dO rows */
    uint32_t *qp, *dop;       /* [pairs(D|Dv)][R] pairs along d, for S, dP */
    uint32_t *qq, *doq;       /* [R/2][D|Dv] pairs of rows, for dK, dV    */
    uint16_t *kb, *vb;        /* [BKB][2·pairs(D|Dv)] gathered K, V rows  */
    uint32_t *kp;             /* [BKB/2][D] pairs of K rows, for dQ       */
    uint16_t *pb, *dsb;       /* [BKB][R] P, dS rounded to bf16           */
    uint32_t *dsk;            /* [BKB/2][R] dS pairs along keys, for dQ   */
    uint16_t *rows2;          /* [2][D] two gathered K rows               */
    /* the bias gradient pass */
    float *raw;               /* [BKB][R] dS without the softcap factor   */
    float *dbacc;             /* [R·BKB]  a dbias task's sums             */
} bwd_tiles;

/* The key tile's rows: fp32 (k, v) or bf16 (kb, vb, and kp for dQ). */
typedef struct {
    const float *k, *v;
    const uint16_t *kb, *vb;
    int64_t ldk, ldv;
} key_tile;

static int use_bf16(const qkv__kernels *kn, const qkv__attn *a)
{
    return kn->mm_bf16 && a->dt == QKV_BF16;
}

/* Floats of the bf16 operands (bf: the bf16 path). */
static int64_t bf16_floats(int bf, int64_t R, int64_t D, int64_t Dv)
{
    if (!bf)
        return 0;
    const int64_t pd = qkv__pairs(D), pdv = qkv__pairs(Dv);
    return 2 * R * (pd + pdv) + R / 2 * (D + Dv) + BKB * (pd + pdv) + BKB / 2 * D +
           BKB * R + BKB / 2 * R + D;
}

/* Floats of a thread's tiles (bf: the bf16 path, db: the dbias pass). */
static size_t bwd_floats(int bf, int db, int64_t R, int64_t D, int64_t Dv)
{
    const int64_t n1 = R > BKB ? R : BKB;
    return (size_t)(2 * R * D + 2 * R * Dv + 2 * BKB * (D + Dv) + 3 * BKB * R + R * D +
                    3 * R + n1 + bf16_floats(bf, R, D, Dv) + (db ? 2 * BKB * R : 0));
}

static bwd_tiles bwd_at(float *base, int bf, int db, int64_t R, int64_t D, int64_t Dv)
{
    bwd_tiles t;
    t.q = base;
    t.qt = t.q + R * D;
    t.dout = t.qt + R * D;
    t.doutt = t.dout + R * Dv;
    t.k = t.doutt + R * Dv;
    t.v = t.k + BKB * D;
    t.st = t.v + BKB * Dv;
    t.dpt = t.st + BKB * R;
    t.dcap = t.dpt + BKB * R;
    t.dk = t.dcap + BKB * R;
    t.dv = t.dk + BKB * D;
    t.dq = t.dv + BKB * Dv;
    t.lse = t.dq + R * D;
    t.dd = t.lse + R;
    t.sum = t.dd + R;
    t.ones = t.sum + R;
    const int64_t n1 = R > BKB ? R : BKB;
    for (int64_t i = 0; i < n1; i++)
        t.ones[i] = 1.0f;
    if (bf) {
        const int64_t pd = qkv__pairs(D), pdv = qkv__pairs(Dv);
        t.qb = (uint16_t *)(t.ones + n1);
        t.dob = t.qb + R * 2 * pd;
        t.qp = (uint32_t *)(t.dob + R * 2 * pdv);
        t.dop = t.qp + pd * R;
        t.qq = t.dop + pdv * R;
        t.doq = t.qq + R / 2 * D;
        t.kb = (uint16_t *)(t.doq + R / 2 * Dv);
        t.vb = t.kb + BKB * 2 * pd;
        t.kp = (uint32_t *)(t.vb + BKB * 2 * pdv);
        t.pb = (uint16_t *)(t.kp + BKB / 2 * D);
        t.dsb = t.pb + BKB * R;
        t.dsk = (uint32_t *)(t.dsb + BKB * R);
        t.rows2 = (uint16_t *)(t.dsk + BKB / 2 * R);
    }
    t.raw = t.dbacc = NULL;
    if (db) {
        t.raw = t.ones + n1 + bf16_floats(bf, R, D, Dv);
        t.dbacc = t.raw + BKB * R;
    }
    return t;
}

/* bf16 rows [m][2·pairs(cols)] to pairs along cols, transposed:
   dst[x][r] = (rows[r][2x], rows[r][2x+1]), zero in the padding rows. */
static void pairs_transposed(const uint16_t *rows, int m, int mpad, int64_t cols, int64_t R,
                             uint32_t *dst)
{
    const int64_t np = qkv__pairs(cols);
    for (int r = 0; r < mpad; r++)
        for (int64_t x = 0; x < np; x++) {
            uint32_t u = 0;
            if (r < m)
                memcpy(&u, rows + r * 2 * np + 2 * x, sizeof u);
            dst[x * R + r] = u;
        }
}

/* bf16 rows [m][2·pairs(cols)] to pairs of rows: dst[rr][c] =
   (rows[2rr][c], rows[2rr+1][c]), the high half 0 for a last odd row. */
static void row_pairs(const qkv__kernels *kn, const uint16_t *rows, int m, int64_t cols,
                      uint32_t *dst)
{
    const int64_t w = 2 * qkv__pairs(cols);
    for (int rr = 0; 2 * rr < m; rr++)
        kn->pack_pairs(rows + 2 * rr * w, 2 * rr + 1 < m ? rows + (2 * rr + 1) * w : NULL,
                       cols, dst + rr * cols);
}

/* The query tile's rows: q and dO row-major and transposed (zero in the
   padding columns m..mpad), or on the bf16 path as pairs along d and as
   pairs of rows; lse (0 where -inf: those rows see no key and their
   scores are all -inf) and Dd. */
static void load_query_tile(const qkv__kernels *kn, const bwd_job *job, const qkv__seq *s,
                            const qkv__tile_map *tm, int m, int mpad, int64_t R,
                            bwd_tiles *tl)
{
    const qkv__attn *a = job->a;
    const qkv__grads *g = job->g;
    const int64_t D = a->D, Dv = a->Dv;
    const qkv_tensor *q = a->q, *dout = g->dout;
    for (int r = 0; r < m; r++) {
        const int64_t h = tm->h0 + r / tm->mp, i = s->q0 + tm->i0 + r % tm->mp;
        const int64_t li = qkv__lse_index(a, s->b, h, i);
        tl->dd[r] = job->dd[li];
        tl->lse[r] = g->lse[li] == -INFINITY ? 0.0f : g->lse[li];
    }
    for (int r = m; r < mpad; r++) {
        tl->dd[r] = 0.0f;
        tl->lse[r] = 0.0f;
    }
    if (use_bf16(kn, a)) {
        qkv__tile_rows_bf16(q, s, tm, m, D, 2 * qkv__pairs(D), tl->qb);
        qkv__tile_rows_bf16(dout, s, tm, m, Dv, 2 * qkv__pairs(Dv), tl->dob);
        pairs_transposed(tl->qb, m, mpad, D, R, tl->qp);
        pairs_transposed(tl->dob, m, mpad, Dv, R, tl->dop);
        row_pairs(kn, tl->qb, m, D, tl->qq);
        row_pairs(kn, tl->dob, m, Dv, tl->doq);
        return;
    }
    for (int r = 0; r < m; r++) {
        const int64_t h = tm->h0 + r / tm->mp, i = s->q0 + tm->i0 + r % tm->mp;
        qkv__load_row(kn, q, s->b * q->stride[0] + i * q->stride[1] + h * q->stride[2],
                      q->stride[3], D, tl->q + r * D);
        qkv__load_row(kn, dout, s->b * dout->stride[0] + i * dout->stride[1] +
                      h * dout->stride[2], dout->stride[3], Dv, tl->dout + r * Dv);
    }
    if (m >= kn->qk_qt_rows) {
        qkv__transpose_tile(tl->q, m, D, mpad, R, tl->qt);
        qkv__transpose_tile(tl->dout, m, Dv, mpad, R, tl->doutt);
    }
}

/* Keys j0..j0+n of kv head hk: fp32 rows, or bf16 rows (with K's pairs of
   rows in tl->kp when dq asks for them). */
static key_tile load_key_tile(const qkv__kernels *kn, const qkv__attn *a, const qkv__seq *s,
                              int64_t hk, int64_t j0, int n, int dq, bwd_tiles *tl)
{
    const qkv_tensor *k = a->k, *v = a->v;
    const int64_t krow = s->b * k->stride[0] + (s->k0 + j0) * k->stride[1] + hk * k->stride[2];
    const int64_t vrow = s->b * v->stride[0] + (s->k0 + j0) * v->stride[1] + hk * v->stride[2];
    key_tile kt = { NULL, NULL, NULL, NULL, 0, 0 };
    if (use_bf16(kn, a)) {
        kt.kb = qkv__key_rows_bf16(k, krow, n, a->D, tl->kb, &kt.ldk);
        kt.vb = qkv__key_rows_bf16(v, vrow, n, a->Dv, tl->vb, &kt.ldv);
        if (dq)
            qkv__key_pairs_bf16(kn, k, krow, n, a->D, tl->rows2, tl->kp);
    } else {
        kt.k = qkv__tile_rows_f32(kn, k, krow, n, a->D, tl->k, &kt.ldk);
        kt.v = qkv__tile_rows_f32(kn, v, vrow, n, a->Dv, tl->v, &kt.ldv);
    }
    return kt;
}

/* Pass 0: task = (sequence, query head); Dd = dout·out for each row. */
static void dd_task(void *arg, int64_t task, int worker)
{
    const bwd_job *job = arg;
    const qkv__attn *a = job->a;
    const qkv__kernels *kn = job->ctx->kernels;
    const qkv_tensor *out = a->out, *dout = job->g->dout;
    const qkv__seq s = qkv__attn_seq(a, task / a->Hq);
    const int64_t h = task % a->Hq, Dv = a->Dv;
    float *o = job->ctx->scratch[worker], *d = o + Dv;
    for (int64_t i = s.q0; i < s.q0 + s.sq; i++) {
        qkv__load_row(kn, out, s.b * out->stride[0] + i * out->stride[1] + h * out->stride[2],
                      out->stride[3], Dv, o);
        qkv__load_row(kn, dout, s.b * dout->stride[0] + i * dout->stride[1] +
                      h * dout->stride[2], dout->stride[3], Dv, d);
        float acc = 0.0f;
        for (int64_t c = 0; c < Dv; c++)
            acc += o[c] * d[c];
        job->dd[qkv__lse_index(a, s.b, h, i)] = acc;
    }
}

/* For keys j0..j0+n against the loaded query tile: P in st, dS in dpt
   (keys by queries); on the bf16 path also both rounded, in pb and dsb;
   with raw, dS without the softcap factor there. */
static void tile_grads(const qkv__kernels *kn, const qkv__attn *a, const qkv__seq *s,
                       const qkv__tile_map *tm, int m, int mpad, int64_t R, int64_t j0, int n,
                       int band, const key_tile *kt, bwd_tiles *tl, float *raw)
{
    const int bf = kt->kb != NULL;
    if (bf)
        kn->qk_bf16(n, mpad, (int)qkv__pairs(a->D), a->scale, kt->kb, kt->ldk, tl->qp, R,
                    tl->st, R);
    else
        kn->qk(n, m, (int)a->D, a->scale, kt->k, kt->ldk, tl->qt, R, tl->q, a->D, tl->st, R);
    const int cap = a->softcap > 0.0f;
    if (cap || a->alibi || a->bias || band)
        qkv__score_mods(a, s, tm, m, j0, n, band, tl->st, 1, R, cap ? tl->dcap : NULL);
    for (int c = 0; c < n; c++)
        for (int r = m; r < mpad; r++)
            tl->st[c * R + r] = -INFINITY;
    /* P = exp(S - lse) in place (the sums are not needed) */
    kn->exp_cols(tl->st, R, n, mpad, tl->lse, tl->sum);
    if (bf)
        kn->qk_bf16(n, mpad, (int)qkv__pairs(a->Dv), 1.0f, kt->vb, kt->ldv, tl->dop, R,
                    tl->dpt, R);
    else
        kn->qk(n, m, (int)a->Dv, 1.0f, kt->v, kt->ldv, tl->doutt, R, tl->dout, a->Dv,
               tl->dpt, R);
    /* dropout: dP·Z in dS's place, then P·Z (what weighs V) in P's */
    if (a->dropout)
        qkv__dropout_tile(kn, a, s, tm, m, j0, n, tl->dpt, R);
    for (int c = 0; c < n; c++) {
        float *p = tl->st + c * R, *ds = tl->dpt + c * R;
        const float *dc = tl->dcap + c * R;
        if (raw)
            for (int r = 0; r < mpad; r++)
                raw[c * R + r] = p[r] * (ds[r] - tl->dd[r]);
        for (int r = 0; r < mpad; r++)
            ds[r] = p[r] * (ds[r] - tl->dd[r]) * (cap ? dc[r] : 1.0f);
    }
    if (a->dropout)
        qkv__dropout_tile(kn, a, s, tm, m, j0, n, tl->st, R);
    if (bf)
        for (int c = 0; c < n; c++) {
            kn->store_bf16(tl->st + c * R, 1.0f, tl->pb + c * R, mpad);
            kn->store_bf16(tl->dpt + c * R, 1.0f, tl->dsb + c * R, mpad);
        }
}

/* dV += Pᵀ·dO and dK += dSᵀ·Q for the tile's n keys (the output rows). */
static void add_dkv(const qkv__kernels *kn, const qkv__attn *a, const key_tile *kt, int m,
                    int n, int64_t R, bwd_tiles *tl, float *dk_acc, float *dv_acc)
{
    const int D = (int)a->D, Dv = (int)a->Dv;
    if (kt->kb) {   /* rows of P and dS in pairs of queries */
        const int np = (int)qkv__pairs(m);
        kn->mm_bf16(n, np, Dv, (const uint32_t *)tl->pb, R / 2, 1, tl->doq, Dv, dv_acc, Dv);
        kn->mm_bf16(n, np, D, (const uint32_t *)tl->dsb, R / 2, 1, tl->qq, D, dk_acc, D);
        return;
    }
    kn->pv(n, m, Dv, tl->st, R, 1, tl->dout, Dv, tl->ones, dv_acc, Dv);
    kn->pv(n, m, D, tl->dpt, R, 1, tl->q, D, tl->ones, dk_acc, D);
}

/* dQ += dS·K for the tile's m query rows (the output rows). */
static void add_dq(const qkv__kernels *kn, const qkv__attn *a, const key_tile *kt, int m,
                   int n, int64_t R, bwd_tiles *tl)
{
    const int D = (int)a->D;
    if (kt->kb) {   /* dS in pairs of keys against K's pairs of rows */
        for (int jj = 0; 2 * jj < n; jj++)
            kn->pack_pairs(tl->dsb + 2 * jj * R, 2 * jj + 1 < n ? tl->dsb + (2 * jj + 1) * R
                                                                : NULL,
                           m, tl->dsk + jj * R);
        kn->mm_bf16(m, (int)qkv__pairs(n), D, tl->dsk, 1, R, tl->kp, D, tl->dq, D);
        return;
    }
    kn->pv(m, n, D, tl->dpt, 1, R, kt->k, kt->ldk, tl->ones, tl->dq, D);
}

/* Stores dK (times scale) and dV of keys j0..j0+n of kv head hk from
   their accumulators ([n][D], [n][Dv]). */
static void store_dkv(const qkv__kernels *kn, const qkv__attn *a, const qkv__grads *g,
                      const qkv__seq *s, int64_t hk, int64_t j0, int64_t n,
                      const float *dk_acc, const float *dv_acc)
{
    const qkv_tensor *dk = g->dk, *dv = g->dv;
    for (int64_t c = 0; c < n; c++) {
        const int64_t j = s->k0 + j0 + c;
        qkv__store_row(kn, dk, s->b * dk->stride[0] + j * dk->stride[1] + hk * dk->stride[2],
                       dk->stride[3], a->D, dk_acc + c * a->D, a->scale);
        qkv__store_row(kn, dv, s->b * dv->stride[0] + j * dv->stride[1] + hk * dv->stride[2],
                       dv->stride[3], a->Dv, dv_acc + c * a->Dv, 1.0f);
    }
}

/* One query tile against every key its rows see: dQ of the tile, stored;
   with dkh/dvh ([sk][D], [sk][Dv], indexed from the sequence's first key)
   also dK and dV added there. */
static void query_tile(const bwd_job *job, const qkv__seq *s, int64_t hk,
                       const qkv__tile_map *tm, bwd_tiles *tl, float *dkh, float *dvh)
{
    const qkv__attn *a = job->a;
    const qkv__kernels *kn = job->ctx->kernels;
    const int m = tm->mp * (int)a->group;
    const int mpad = (int)((m + QKV__PAD - 1) / QKV__PAD * QKV__PAD);
    const int64_t D = a->D, R = qkv__tile_rows(a->group);

    load_query_tile(kn, job, s, tm, m, mpad, R, tl);
    memset(tl->dq, 0, (size_t)(m * a->D) * sizeof(float));
    int64_t klo, khi, lo_last, hi_first;
    qkv__key_range(a, s, tm->i0, &klo, &hi_first);
    qkv__key_range(a, s, tm->i0 + tm->mp - 1, &lo_last, &khi);
    for (int64_t j0 = klo; j0 < khi; j0 += BKB) {
        const int n = (int)(khi - j0 < BKB ? khi - j0 : BKB);
        const key_tile kt = load_key_tile(kn, a, s, hk, j0, n, 1, tl);
        const int band = !(lo_last <= j0 && hi_first >= j0 + n);
        tile_grads(kn, a, s, tm, m, mpad, R, j0, n, band, &kt, tl, NULL);
        if (dkh)
            add_dkv(kn, a, &kt, m, n, R, tl, dkh + j0 * a->D, dvh + j0 * a->Dv);
        add_dq(kn, a, &kt, m, n, R, tl);
    }
    const qkv_tensor *dq = job->g->dq;
    for (int r = 0; r < m; r++) {
        const int64_t h = tm->h0 + r / tm->mp, i = s->q0 + tm->i0 + r % tm->mp;
        qkv__store_row(kn, dq, s->b * dq->stride[0] + i * dq->stride[1] + h * dq->stride[2],
                       dq->stride[3], D, tl->dq + r * D, a->scale);
    }
}

/* Whether the query tile tm sees any of keys j0..j0+n (the band is
   monotone in i, so its first and last rows bound it), and in *band
   whether some of its (row, key) pairs are masked. */
static int tile_sees_keys(const qkv__attn *a, const qkv__seq *s, const qkv__tile_map *tm,
                          int64_t j0, int n, int *band)
{
    int64_t lo_first, hi_first, lo_last, hi_last;
    qkv__key_range(a, s, tm->i0, &lo_first, &hi_first);
    qkv__key_range(a, s, tm->i0 + tm->mp - 1, &lo_last, &hi_last);
    if (hi_last <= j0 || lo_first >= j0 + n || hi_last <= lo_first)
        return 0;
    *band = !(lo_last <= j0 && hi_first >= j0 + n);
    return 1;
}

/* Pass 1: task = (sequence, kv head, tile of BKB keys); dK and dV of those
   keys over every query row of the group that sees them. */
static void dkv_task(void *arg, int64_t task, int worker)
{
    const bwd_job *job = arg;
    const qkv__attn *a = job->a;
    const qkv__grads *g = job->g;
    const qkv__kernels *kn = job->ctx->kernels;
    int64_t t;
    const qkv__seq s = qkv__attn_seq(a, qkv__tasks_find(&job->tasks, task, &t));
    const int64_t n_kt = (s.sk + BKB - 1) / BKB;
    const int64_t hk = t / n_kt, j0 = (t % n_kt) * BKB;
    const int n = (int)(s.sk - j0 < BKB ? s.sk - j0 : BKB);
    const int64_t D = a->D, Dv = a->Dv, R = qkv__tile_rows(a->group);
    const int64_t P = qkv__tile_positions(a->group);
    bwd_tiles tl = bwd_at(job->ctx->scratch[worker], use_bf16(kn, a), 0, R, D, Dv);
    const key_tile kt = load_key_tile(kn, a, &s, hk, j0, n, 0, &tl);
    memset(tl.dk, 0, (size_t)(n * D) * sizeof(float));
    memset(tl.dv, 0, (size_t)(n * Dv) * sizeof(float));

    for (int64_t i0 = 0; i0 < s.sq; i0 += P) {
        qkv__tile_map tm = { hk * a->group, i0, (int)(s.sq - i0 < P ? s.sq - i0 : P) };
        int band;
        if (!tile_sees_keys(a, &s, &tm, j0, n, &band))
            continue;
        const int m = tm.mp * (int)a->group;
        const int mpad = (int)((m + QKV__PAD - 1) / QKV__PAD * QKV__PAD);
        load_query_tile(kn, job, &s, &tm, m, mpad, R, &tl);
        tile_grads(kn, a, &s, &tm, m, mpad, R, j0, n, band, &kt, &tl, NULL);
        add_dkv(kn, a, &kt, m, n, R, &tl, tl.dk, tl.dv);
    }

    store_dkv(kn, a, g, &s, hk, j0, n, tl.dk, tl.dv);
}

/* Pass 2: task = (sequence, kv head, query tile) as in forward; dQ of its
   rows over the keys they see. */
static void dq_task(void *arg, int64_t task, int worker)
{
    const bwd_job *job = arg;
    const qkv__attn *a = job->a;
    int64_t t;
    const qkv__seq s = qkv__attn_seq(a, qkv__tasks_find(&job->tasks, task, &t));
    const int64_t P = qkv__tile_positions(a->group);
    const int64_t n_qt = (s.sq + P - 1) / P;
    const int64_t hk = t / n_qt;
    qkv__tile_map tm = { hk * a->group, (t % n_qt) * P, 0 };
    tm.mp = (int)(s.sq - tm.i0 < P ? s.sq - tm.i0 : P);
    bwd_tiles tl = bwd_at(job->ctx->scratch[worker], use_bf16(job->ctx->kernels, a), 0,
                          qkv__tile_rows(a->group), a->D, a->Dv);
    query_tile(job, &s, hk, &tm, &tl, NULL, NULL);
}

/* The one-pass variant, used when a call has enough (sequence, kv head)
   pairs, or query tiles per head, to share out: a task owns a kv head, or
   every parts-th query tile of one, so dK and dV of all the head's keys
   accumulate in the task's own memory ([sk][D] and [sk][Dv]: its scratch
   after the tiles, or its partial) while each query tile's dQ is complete
   after its key loop: five tile products instead of seven. */
static void head_task(void *arg, int64_t task, int worker)
{
    const bwd_job *job = arg;
    const qkv__attn *a = job->a;
    const int64_t head = task / job->parts, part = task % job->parts;
    const qkv__seq s = qkv__attn_seq(a, head / a->Hkv);
    const int64_t hk = head % a->Hkv;
    const int64_t D = a->D, Dv = a->Dv, R = qkv__tile_rows(a->group);
    const int64_t P = qkv__tile_positions(a->group);
    const int bf = use_bf16(job->ctx->kernels, a);
    bwd_tiles tl = bwd_at(job->ctx->scratch[worker], bf, 0, R, D, Dv);
    float *dkh = job->parts > 1 ? job->partial + task * job->sk_max * (D + Dv)
                                : (float *)job->ctx->scratch[worker] +
                                  bwd_floats(bf, 0, R, D, Dv);
    float *dvh = dkh + s.sk * D;
    memset(dkh, 0, (size_t)(s.sk * (D + Dv)) * sizeof(float));
    /* dealt round-robin: under a causal mask later tiles see more keys */
    for (int64_t i0 = part * P; i0 < s.sq; i0 += job->parts * P) {
        const qkv__tile_map tm = { hk * a->group, i0, (int)(s.sq - i0 < P ? s.sq - i0 : P) };
        query_tile(job, &s, hk, &tm, &tl, dkh, dvh);
    }
    if (job->parts == 1)
        store_dkv(job->ctx->kernels, a, job->g, &s, hk, 0, s.sk, dkh, dvh);
}

/* After head_task with parts > 1: task = (sequence, kv head, tile of BKB
   keys); sums the parts' dK and dV of those keys in part order and stores
   them. */
static void reduce_task(void *arg, int64_t task, int worker)
{
    const bwd_job *job = arg;
    const qkv__attn *a = job->a;
    const int64_t n_kt = (job->sk_max + BKB - 1) / BKB;
    const int64_t head = task / n_kt, j0 = task % n_kt * BKB;
    const qkv__seq s = qkv__attn_seq(a, head / a->Hkv);
    if (j0 >= s.sk)
        return;
    const int64_t D = a->D, Dv = a->Dv, n = s.sk - j0 < BKB ? s.sk - j0 : BKB;
    const int64_t stride = job->sk_max * (D + Dv);
    float *dk = job->ctx->scratch[worker], *dv = dk + n * D;
    const float *p0 = job->partial + head * job->parts * stride;
    memcpy(dk, p0 + j0 * D, (size_t)(n * D) * sizeof(float));
    memcpy(dv, p0 + s.sk * D + j0 * Dv, (size_t)(n * Dv) * sizeof(float));
    for (int64_t p = 1; p < job->parts; p++) {
        const float *pk = p0 + p * stride + j0 * D, *pv = p0 + p * stride + s.sk * D + j0 * Dv;
        for (int64_t x = 0; x < n * D; x++)
            dk[x] += pk[x];
        for (int64_t x = 0; x < n * Dv; x++)
            dv[x] += pv[x];
    }
    store_dkv(job->ctx->kernels, a, job->g, &s, head % a->Hkv, j0, n, dk, dv);
}

/* The bias gradient pass. Each dimension of dbias either matches the
   problem's (a task takes one batch row, kv head, query tile or key tile
   of it) or has size 1 (a task walks all of them and sums): a task owns
   its dbias elements, sums into them in a fixed order and stores them. */
typedef struct { int b, h, i, j; int64_t nb, nh, ni, nj; } dbias_split;

static dbias_split dbias_tasks(const qkv__attn *a, const qkv_tensor *db)
{
    const int64_t P = qkv__tile_positions(a->group);
    dbias_split d;
    d.b = db->shape[0] == a->B;
    d.h = db->shape[1] == a->Hq;
    d.i = db->shape[2] == a->Sq;
    d.j = db->shape[3] == a->Sk;
    d.nb = d.b ? a->B : 1;
    d.nh = d.h ? a->Hkv : 1;
    d.ni = d.i ? (a->Sq + P - 1) / P : 1;
    d.nj = d.j ? (a->Sk + BKB - 1) / BKB : 1;
    return d;
}

static void dbias_task(void *arg, int64_t task, int worker)
{
    const bwd_job *job = arg;
    const qkv__attn *a = job->a;
    const qkv__kernels *kn = job->ctx->kernels;
    const qkv_tensor *db = job->g->dbias;
    const dbias_split d = dbias_tasks(a, db);
    const int64_t tb = task / (d.nh * d.ni * d.nj), th = task / (d.ni * d.nj) % d.nh;
    const int64_t tq = task / d.nj % d.ni, tk = task % d.nj;
    const int64_t R = qkv__tile_rows(a->group), P = qkv__tile_positions(a->group);
    bwd_tiles tl = bwd_at(job->ctx->scratch[worker], use_bf16(kn, a), 1, R, a->D, a->Dv);
    /* sums [heads][positions][keys] of the task's elements */
    const int64_t hn = d.h ? a->group : 1, in = d.i ? P : 1, jn = d.j ? BKB : 1;
    memset(tl.dbacc, 0, (size_t)(hn * in * jn) * sizeof(float));
    for (int64_t b = d.b ? tb : 0; b < (d.b ? tb + 1 : a->B); b++) {
        const qkv__seq s = qkv__attn_seq(a, b);
        for (int64_t hk = d.h ? th : 0; hk < (d.h ? th + 1 : a->Hkv); hk++)
            for (int64_t i0 = d.i ? tq * P : 0; i0 < (d.i ? tq * P + 1 : s.sq); i0 += P)
                for (int64_t j0 = d.j ? tk * BKB : 0; j0 < (d.j ? tk * BKB + 1 : s.sk);
                     j0 += BKB) {
                    const qkv__tile_map tm = { hk * a->group, i0,
                                               (int)(s.sq - i0 < P ? s.sq - i0 : P) };
                    const int n = (int)(s.sk - j0 < BKB ? s.sk - j0 : BKB);
                    int band;
                    if (!tile_sees_keys(a, &s, &tm, j0, n, &band))
                        continue;
                    const int m = tm.mp * (int)a->group;
                    const int mpad = (int)((m + QKV__PAD - 1) / QKV__PAD * QKV__PAD);
                    load_query_tile(kn, job, &s, &tm, m, mpad, R, &tl);
                    const key_tile kt = load_key_tile(kn, a, &s, hk, j0, n, 0, &tl);
                    tile_grads(kn, a, &s, &tm, m, mpad, R, j0, n, band, &kt, &tl, tl.raw);
                    for (int c = 0; c < n; c++)
                        for (int r = 0; r < m; r++) {
                            const int64_t hh = d.h ? r / tm.mp : 0, ii = d.i ? r % tm.mp : 0;
                            tl.dbacc[(hh * in + ii) * jn + (d.j ? c : 0)] += tl.raw[c * R + r];
                        }
                }
    }
    const int64_t mp = d.i ? (a->Sq - tq * P < P ? a->Sq - tq * P : P) : 1;
    const int64_t nk = d.j ? (a->Sk - tk * BKB < BKB ? a->Sk - tk * BKB : BKB) : 1;
    float *out = db->data;
    for (int64_t hh = 0; hh < hn; hh++)
        for (int64_t ii = 0; ii < mp; ii++)
            for (int64_t jj = 0; jj < nk; jj++) {
                const int64_t off = (d.b ? tb : 0) * db->stride[0] +
                                    (d.h ? th * a->group + hh : 0) * db->stride[1] +
                                    (d.i ? tq * P + ii : 0) * db->stride[2] +
                                    (d.j ? tk * BKB + jj : 0) * db->stride[3];
                out[off] = tl.dbacc[(hh * in + ii) * jn + jj] + 0.0f;
            }
}

/* Keys of the longest sequence. */
static int64_t max_keys(const qkv__attn *a)
{
    int64_t mx = 0;
    for (int64_t i = 0; i < a->n_seqs; i++) {
        const qkv__seq s = qkv__attn_seq(a, i);
        mx = s.sk > mx ? s.sk : mx;
    }
    return mx;
}

static qkv_status backward(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv, int with_dbias, qkv_tensor *dbias)
{
    qkv__attn a;
    qkv__grads g;
    qkv_status st = qkv__attn_check_backward(ctx, q, k, v, out, dout, lse, opts, dq, dk, dv,
                                             &a, &g);
    if (st || (with_dbias && (st = qkv__attn_check_dbias(ctx, &a, &g, opts, dbias))))
        return st;
    if (a.D > (1 << 20) || a.Dv > (1 << 20))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "%s: head_dim above 1048576",
                         a.D > (1 << 20) ? "q->shape[3]" : "v->shape[3]");
    if (a.group > (1 << 20))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED,
                         "q->shape[2]: more than 1048576 query heads per kv head");
    const int64_t R = qkv__tile_rows(a.group);
    /* One pass per kv head when there are enough heads to share out;
       with fewer heads each head's query tiles are dealt to several tasks
       whose dK/dV partials are summed afterwards, when those fit; else the
       two passes. The choice depends on the problem only, so results do
       not depend on the thread count. */
    enum { MIN_TASKS = 8 };
    const int64_t PARTIAL_BYTES = (int64_t)256 << 20, HEAD_BYTES = (int64_t)64 << 20;
    const int64_t sk_max = max_keys(&a), heads = a.n_seqs * a.Hkv;
    const int64_t head_bytes = sk_max * (a.D + a.Dv) * (int64_t)sizeof(float);
    int64_t parts = heads >= MIN_TASKS ? 1 : (MIN_TASKS + heads - 1) / heads;
    const int64_t n_qt = (a.Sq + qkv__tile_positions(a.group) - 1) /
                         qkv__tile_positions(a.group);
    parts = parts < n_qt ? parts : n_qt > 0 ? n_qt : 1;
    const int per_head = heads * parts >= MIN_TASKS &&
                         (parts == 1 ? head_bytes <= HEAD_BYTES
                                     : heads * parts * head_bytes <= PARTIAL_BYTES);
    const int bf = use_bf16(ctx->kernels, &a);
    size_t scratch = bwd_floats(bf, g.dbias != NULL, R, a.D, a.Dv);
    if (per_head && parts == 1)
        scratch += (size_t)(sk_max * (a.D + a.Dv));
    if ((st = qkv__scratch_reserve(ctx, scratch * sizeof(float))))
        return st;
    const double work = 2.0 * (double)(a.D + a.Dv) * (double)a.Hq * (double)a.q->shape[0] *
                        (double)a.q->shape[1] * (double)a.k->shape[1];
    /* both task tables before any write, so a failure leaves dq, dk, dv
       untouched */
    const int64_t n_rows = a.varlen ? a.Hq * a.Sq : a.B * a.Hq * a.Sq;
    float *dd = malloc((size_t)n_rows * sizeof(float));
    if (!dd)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "ctx: cannot allocate %lld row sums",
                         (long long)n_rows);
    bwd_job keys = { ctx, &a, &g, { NULL, 0, 0 }, dd, per_head ? parts : 1, sk_max, NULL };
    bwd_job rows = keys;
    if (per_head && parts > 1 &&
        !(keys.partial = malloc((size_t)(heads * parts) * (size_t)head_bytes))) {
        free(dd);
        return qkv__fail(ctx, QKV_ERR_NOMEM, "ctx: cannot allocate %lld bytes of partial "
                         "gradients", (long long)(heads * parts * head_bytes));
    }
    if ((st = qkv__tasks_make_keys(ctx, &a, a.Hkv, BKB, &keys.tasks))) {
        free(keys.partial);
    if (g.dbias) {
        const dbias_split d = dbias_tasks(&a, g.dbias);
        qkv__parallel(ctx, d.nb * d.nh * d.ni * d.nj, work, dbias_task, &keys);
    }
        free(dd);
        return st;
    }
    if ((st = qkv__tasks_make(ctx, &a, a.Hkv, qkv__tile_positions(a.group), &rows.tasks))) {
        qkv__tasks_free(&keys.tasks);
        free(keys.partial);
    if (g.dbias) {
        const dbias_split d = dbias_tasks(&a, g.dbias);
        qkv__parallel(ctx, d.nb * d.nh * d.ni * d.nj, work, dbias_task, &keys);
    }
        free(dd);
        return st;
    }
    qkv__parallel(ctx, a.n_seqs * a.Hq, work / 64.0, dd_task, &keys);
    if (per_head) {
        qkv__parallel(ctx, heads * parts, work, head_task, &keys);
        if (parts > 1)
            qkv__parallel(ctx, heads * ((sk_max + BKB - 1) / BKB),
                          (double)(heads * parts * head_bytes), reduce_task, &keys);
    } else {
        qkv__parallel(ctx, keys.tasks.total, work, dkv_task, &keys);
        qkv__parallel(ctx, rows.tasks.total, work, dq_task, &rows);
    }
    free(keys.partial);
    if (g.dbias) {
        const dbias_split d = dbias_tasks(&a, g.dbias);
        qkv__parallel(ctx, d.nb * d.nh * d.ni * d.nj, work, dbias_task, &keys);
    }
    qkv__tasks_free(&keys.tasks);
    qkv__tasks_free(&rows.tasks);
    free(dd);
    return QKV_OK;
}

qkv_status qkv_attention_backward(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv)
{
    return backward(ctx, q, k, v, out, dout, lse, opts, dq, dk, dv, 0, NULL);
}

qkv_status qkv_attention_backward_dbias(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv, qkv_tensor *dbias)
{
    return backward(ctx, q, k, v, out, dout, lse, opts, dq, dk, dv, 1, dbias);
}
