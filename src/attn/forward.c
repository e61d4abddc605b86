/*
 * forward.c — the fast attention forward: FlashAttention-style tiling with
 * an online softmax, driving the micro-kernels of src/cpu.
 *
 * A task is (sequence, kv head, tile of query positions); the tile stacks
 * those positions for every query head of the kv head's group (GQA), about
 * BQ rows in all, so each K/V tile read serves the whole group. The task
 * widens its Q rows to fp32 once (row-major and transposed), then walks the
 * key tiles its rows can see. Scores are kept keys by queries,
 * St[j][i] = scale·k_j·q_i, so K and V rows are read where they lie (fp32
 * with unit inner stride) or widened row by row (fp16/bf16, other strides),
 * never transposed, and the softmax reductions run along contiguous query
 * columns. Per tile, with m, l, acc the running max, sum and accumulator:
 *     m' = max(m, max_j S),  P = exp(S - m'),  l = l·e^(m-m') + Σ_j P,
 *     acc = acc·e^(m-m') + P·V.
 * Memory is O(BQ·BK + (BQ+BK)·D) per thread, whatever the sequence length;
 * BK, the keys per tile, is sized from the L2 cache (key_tile).
 * Tiles wholly outside the causal/window band are never visited; only tiles
 * the band cuts are masked element by element.
 * On kernel sets that multiply whole tiles (AMX), bf16 calls first pack K
 * and V once into the tiles' operand layouts (pack_task; the packed copy
 * is the size of K and V), as do fp16 calls with enough query rows a key,
 * each value split into two bf16 (use_split: the copy is twice the size,
 * three times the products), and the scores are kept queries by keys: the
 * softmax runs along rows and writes P as the next product's operand
 * (task_tiles); tasks of fewer rows than one tile's take the pair path.
 * Each task writes its own rows of out and lse, and its arithmetic does
 * not depend on the thread running it, so results are bitwise identical
 * for any thread count.
 *
 * Not here: the inner loops (src/cpu), validation (check.c), the spec
 * (reference.c).
 */
#include "attn.h"
#include "tile.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


typedef struct {
    qkv_ctx         *ctx;
    const qkv__attn *a;
    qkv__tasks       tasks;
    /* split-K: each tile's keys in n_split parts whose partial softmax
       states (m, l, acc per row) go to part, and are merged afterwards */
    int64_t          n_split;
    float           *part;
    int64_t          part_size;   /* floats per (tile, part) */
    int64_t          bk;          /* keys per tile */
    /* the whole-tile path (NULL kt: not taken): K and V packed per
       sequence and kv head (kernels.h), each sequence's keys padded to 32,
       sequence s's at key position kofs[s]·Hkv */
    uint32_t        *kt, *vt;
    int64_t         *kofs;
    int64_t          dpp, dvp;    /* pairs of a K row (of each part when split), V values */
    int              split;       /* fp16 split into bf16 (kernels.h split_f16) */
    qkv__tasks       pack_tasks;  /* (sequence, kv head, tile of bk keys) */
} fwd_job;

typedef struct {                  /* per-thread scratch, fp32 */
    float *q;      /* [rows][D]   the tile's queries          */
    float *qt;     /* [D][rows]   the same, transposed        */
    float *k;      /* [BK][D]     a widened K tile            */
    float *v;      /* [BK][Dv]    a widened V tile            */
    float *st;     /* [BK][rows]  scores, keys by queries     */
    float *acc;    /* [rows][Dv]                              */
    float *m, *l, *alpha, *mx, *mref, *sum;   /* [rows]       */
    int32_t *lo, *hi;   /* [rows] the whole-tile path's row bands */
    /* the bf16 dot path (pairs: two bf16 adjacent along the reduction) */
    uint32_t *qp;  /* [D/2][rows] query pairs along d         */
    uint16_t *kb;  /* [BK][D+1]   a gathered K tile, bf16     */
    uint32_t *vp;  /* [BK/2][Dv]  V pairs along keys          */
    uint32_t *pp;  /* [BK/2][rows] P pairs along keys         */
    uint16_t *vr;  /* [2][Dv]     two gathered V rows         */
    /* the whole-tile path reuses st as S [rows][BK], pp as P [rows][BK]
       (bf16), qp as its queries [rows][D] (bf16, D a multiple of 32) and
       acc with row stride Dv (a multiple of 16); split fp16 takes x
       (x_floats) for its queries [rows][3·D] and P [rows][3·BK] (bf16) */
    uint16_t *x;
} tiles;

/* The floats of tiles.x: a split fp16 task's queries and P. */
static int64_t x_floats(int64_t rows, int64_t BK, int64_t D)
{
    return 3 * rows * D / 2 + 3 * rows * BK / 2;
}

static size_t tiles_floats(int64_t rows, int64_t BK, int64_t D, int64_t Dv, int split)
{
    return (size_t)(2 * rows * D + BK * D + BK * Dv + BK * rows + rows * Dv + 8 * rows +
                    qkv__pairs(D) * rows + BK * qkv__pairs(D) + BK / 2 * Dv + BK / 2 * rows + Dv +
                    (split ? x_floats(rows, BK, D) : 0));
}

static tiles tiles_at(float *base, int64_t rows, int64_t BK, int64_t D, int64_t Dv)
{
    tiles t;
    t.q = base;
    t.qt = t.q + rows * D;
    t.k = t.qt + rows * D;
    t.v = t.k + BK * D;
    t.st = t.v + BK * Dv;
    t.acc = t.st + BK * rows;
    t.m = t.acc + rows * Dv;
    t.l = t.m + rows;
    t.alpha = t.l + rows;
    t.mx = t.alpha + rows;
    t.mref = t.mx + rows;
    t.sum = t.mref + rows;
    t.lo = (int32_t *)(t.sum + rows);
    t.hi = t.lo + rows;
    t.qp = (uint32_t *)(t.hi + rows);
    t.kb = (uint16_t *)(t.qp + qkv__pairs(D) * rows);
    t.vp = (uint32_t *)(t.kb + BK * 2 * qkv__pairs(D));
    t.pp = t.vp + BK / 2 * Dv;
    t.vr = (uint16_t *)(t.pp + BK / 2 * rows);
    t.x = (uint16_t *)((float *)t.vr + Dv);
    return t;
}

/* Keys per tile: the scores (BK x rows), the widened K and V rows and their
   pairs should take about a quarter of the L2 cache, leaving room for
   the queries, the accumulators and the next rows; 64 to 256, a power of
   two. */
static int64_t key_tile(int64_t rows, int64_t D, int64_t Dv)
{
    const int64_t per_key = 4 * (rows + D + Dv) + 2 * (D + 1) + 2 * Dv + 2 * rows;
    const int64_t budget = (int64_t)qkv__l2_bytes() / 4;
    int64_t bk = 64;
    while (bk < 256 && 2 * bk * per_key <= budget)
        bk *= 2;
    return bk;
}


/* The bf16 dot path: bf16 inputs and a kernel set with bf16 dot products.
   Tiles of at least one vector of rows pack their queries as pairs
   (qk_bf16); fewer rows (decode) keep them as bf16 rows (qk_bf16_rows).
   Like PyTorch's kernels it rounds P to bf16 for P·V; scores, the softmax
   statistics and the accumulators stay fp32. */
static int use_bf16(const qkv__kernels *kn, const qkv__attn *a)
{
    return kn->qk_bf16 && a->dt == QKV_BF16;
}

/* Query rows per key (on average over the call's keys) from which fp16
   calls take the whole-tile path split. Packing K and V split writes
   twice the bf16 path's bytes, once per call, and the tiles repay it
   only over enough rows: 1,Sq,4096,32,8,128 (2 threads, Xeon with AMX)
   took 1.08x the fp32 kernels' time at Sq 16 (64 rows a key), 0.84x at
   20, 0.69x at 32, 0.64x at 64 and 0.46x at 256. */
enum { SPLIT_ROWS = 80 };

/* fp16 calls on whole tiles, split into bf16 (kernels.h split_f16): three
   times the bf16 products, which on AMX run several times as fast as the
   fp32 FMAs fp16 rows are otherwise widened for, where the call has
   SPLIT_ROWS rows a key. */
static int use_split(const qkv__kernels *kn, const qkv__attn *a)
{
    if (!kn->split_f16 || !kn->qk_tiles || a->dt != QKV_F16)
        return 0;
    double rows = 0.0, keys = 0.0;
    for (int64_t i = 0; i < a->n_seqs; i++) {
        const qkv__seq s = qkv__attn_seq(a, i);
        rows += (double)s.sq * (double)s.sk;
        keys += (double)s.sk;
    }
    return rows * (double)a->group >= SPLIT_ROWS * keys && keys > 0.0;
}

/* The tile's queries as pairs along d: qp[x/2][r] holds row r's q[x] in
   its low half and q[x+1] in its high half; zero past D and in the padding
   rows m..mpad. */
void qkv__load_q_pairs(const qkv__attn *a, const qkv__seq *s, const qkv__tile_map *tm,
                         int m, int mpad, int64_t R, uint32_t *qp)
{
    const qkv_tensor *q = a->q;
    const uint16_t *src = q->data;
    for (int64_t x = 0; x < qkv__pairs(a->D); x++)
        memset(qp + x * R, 0, (size_t)mpad * sizeof *qp);
    for (int r = 0; r < m; r++) {
        const int64_t h = tm->h0 + r / tm->mp, i = s->q0 + tm->i0 + r % tm->mp;
        const int64_t off = s->b * q->stride[0] + i * q->stride[1] + h * q->stride[2];
        if (q->stride[3] == 1 && a->D % 2 == 0) {   /* the pairs lie in memory */
            const uint16_t *row = src + off;
            uint32_t *col = qp + r;
            for (int64_t x = 0, dp = a->D / 2; x < dp; x++) {
                uint32_t u;
                memcpy(&u, row + 2 * x, sizeof u);
                col[x * R] = u;
            }
            continue;
        }
        for (int64_t x = 0; x < a->D; x++) {
            const uint32_t u = src[off + x * q->stride[3]];
            qp[(x >> 1) * R + r] |= x & 1 ? u << 16 : u;
        }
    }
}

/* Tile number `tile` of the job: its sequence, kv head and rows. */
static int64_t tile_of(const fwd_job *job, int64_t tile, qkv__seq *s, int64_t *hk,
                       qkv__tile_map *tm)
{
    const qkv__attn *a = job->a;
    int64_t t;
    const int64_t seq = qkv__tasks_find(&job->tasks, tile, &t);
    *s = qkv__attn_seq(a, seq);
    const int64_t P = qkv__tile_positions(a->group);
    const int64_t n_qt = (s->sq + P - 1) / P;
    *hk = t / n_qt;
    tm->h0 = *hk * a->group;
    /* last tiles first: under a causal mask they see the most keys, and
       starting them early balances the threads' loads */
    tm->i0 = (n_qt - 1 - t % n_qt) * P;
    tm->mp = (int)(s->sq - tm->i0 < P ? s->sq - tm->i0 : P);
    return seq;
}

/* Writes row r's output and lse from its softmax state (m, l, acc). */
static void store_result(const qkv__kernels *kn, const qkv__attn *a, const qkv__seq *s,
                         const qkv__tile_map *tm, int r, float m, float l, const float *acc)
{
    const qkv_tensor *out = a->out;
    const int64_t h = tm->h0 + r / tm->mp, qi = s->q0 + tm->i0 + r % tm->mp;
    qkv__store_row(kn, out, s->b * out->stride[0] + qi * out->stride[1] + h * out->stride[2],
              out->stride[3], a->Dv, acc, !(l <= 0.0f) ? 1.0f / l : 0.0f);
    if (a->lse)
        a->lse[qkv__lse_index(a, s->b, h, qi)] = !(l <= 0.0f) ? m + logf(l) : -INFINITY;
}

/* Head dims as the whole-tile path lays them out (and the scratch is
   sized for every path): D in whole tiles of 16 pairs, Dv of 16 values. */
static int64_t dim32(int64_t d) { return (d + 31) / 32 * 32; }
static int64_t dim16(int64_t d) { return (d + 15) / 16 * 16; }

/* The keys the tile's rows see, [*klo, *khi) (the band is monotone in the
   query position), narrowed to this task's part under split-K; *lo_last
   and *hi_first bound the keys every row sees.
   align: *klo rounded down to a multiple (the keys before the band are
   then masked like any band cut). */
static void task_keys(const fwd_job *job, const qkv__seq *s, const qkv__tile_map *tm,
                      int64_t part, int64_t align, int64_t *klo, int64_t *khi,
                      int64_t *lo_last, int64_t *hi_first)
{
    const qkv__attn *a = job->a;
    qkv__key_range(a, s, tm->i0, klo, hi_first);
    qkv__key_range(a, s, tm->i0 + tm->mp - 1, lo_last, khi);
    if (*khi < *klo)
        *khi = *klo;
    *klo -= *klo % align;
    if (job->n_split > 1) {
        /* this part's share of the tile's keys, in whole key tiles */
        const int64_t BK = job->bk;
        const int64_t per = ((*khi - *klo + job->n_split - 1) / job->n_split + BK - 1) / BK * BK;
        const int64_t lo = *klo + part * per;
        *khi = lo + per < *khi ? lo + per : *khi;
        *klo = lo < *khi ? lo : *khi;
    }
}

/* The online softmax's state before a task's first key tile: rows
   running maxima -inf, sums 0, and the first acc_floats of acc 0. */
static void start_rows(tiles *tl, int rows, size_t acc_floats)
{
    memset(tl->acc, 0, acc_floats * sizeof(float));
    for (int r = 0; r < rows; r++) {
        tl->m[r] = -INFINITY;
        tl->l[r] = 0.0f;
    }
}

/* The online softmax's bookkeeping for a tile's maxima mx: the new
   running max m, the reference mref the exponentials subtract, and alpha,
   the factor on the old sums. */
static void tile_max(tiles *tl, int rows)
{
    for (int r = 0; r < rows; r++) {
        const float mn = tl->mx[r] > tl->m[r] ? tl->mx[r] : tl->m[r];
        tl->mref[r] = mn == -INFINITY ? 0.0f : mn;   /* all hidden: P = 0 */
        tl->alpha[r] = tl->m[r] == mn ? 1.0f : expf(tl->m[r] - tl->mref[r]);
        tl->m[r] = mn;
    }
}

/* The key tiles of a task on the whole-tile path (kernels.h): the queries
   as bf16 rows, S = Q·Kᵀ queries by keys from the packed K, the softmax
   along rows writing P as the next product's A operand, acc += P·V from
   the packed V. */
static void task_tiles(const fwd_job *job, const qkv__seq *s, int64_t seq, int64_t hk,
                       const qkv__tile_map *tm, int64_t part, tiles *tl)
{
    const qkv__attn *a = job->a;
    const qkv__kernels *kn = job->ctx->kernels;
    const int m = tm->mp * (int)a->group, mpad = (m + QKV__PAD - 1) / QKV__PAD * QKV__PAD;
    const int64_t BK = job->bk, dpp = job->dpp, dvp = job->dvp;
    const int split = job->split, sp = split ? 3 : 1, kv = split ? 2 : 1;
    const int64_t w = sp * 2 * dpp;   /* the queries' row, (qh | qh | ql) split */
    uint16_t *qr = split ? tl->x : (uint16_t *)tl->qp;
    uint16_t *p = split ? tl->x + mpad * w : (uint16_t *)tl->pp;
    /* the queries as rows of w values, zero past D and in the padding rows;
       split, the fp16 rows (qh | qh | ql) */
    if (split) {
        const int64_t w1 = w / 3;
        uint16_t *raw = (uint16_t *)tl->q;
        qkv__tile_rows_bf16(a->q, s, tm, m, a->D, w1, raw);
        for (int r = 0; r < m; r++) {
            uint16_t *row = qr + r * w;
            job->ctx->kernels->split_f16(raw + r * w1, w1, row, row + 2 * w1, row + w1);
        }
    } else {
        qkv__tile_rows_bf16(a->q, s, tm, m, a->D, w, qr);
    }
    memset(qr + m * w, 0, (size_t)((mpad - m) * w) * sizeof *qr);
    start_rows(tl, mpad, (size_t)mpad * (size_t)dvp);
    int64_t klo, khi, lo_last, hi_first;
    task_keys(job, s, tm, part, 32, &klo, &khi, &lo_last, &hi_first);
    const int64_t pos = job->kofs[seq] * a->Hkv + hk * dim32(s->sk);
    const uint32_t *kt = job->kt + pos * kv * dpp, *vt = job->vt + pos * kv * (dvp / 2);
    const int modded = a->softcap > 0.0f || a->alibi || a->bias;
    /* the softmax applies the scale, unless the mods need scaled scores
       (or the scale is not positive: then the max of the scaled scores is
       not the scaled max) */
    const int fold = !modded && a->scale > 0.0f;

    if (fold) {
        /* every tile in one pipelined call, each row cut to its own keys */
        for (int r = 0; r < mpad; r++) {
            int64_t lo = 0, hi = 0;
            if (r < m)
                qkv__key_range(a, s, tm->i0 + r % tm->mp, &lo, &hi);
            lo = lo < klo ? 0 : lo - klo;
            hi = hi < klo ? 0 : hi - klo;
            tl->lo[r] = (int32_t)(lo < khi - klo ? lo : khi - klo);
            tl->hi[r] = (int32_t)(hi < khi - klo ? hi : khi - klo);
        }
        if (khi > klo)
            kn->attn_tiles(mpad, (int)(khi - klo), tl->lo, tl->hi, (int)BK, (int)dpp, (int)dvp,
                           a->scale, qr, w, kt + klo * kv * dpp, vt + klo * kv * (dvp / 2),
                           tl->m, tl->l, tl->alpha, tl->acc, dvp, tl->st, p, split);
        return;
    }
    for (int64_t j0 = klo; j0 < khi;) {
        const int n = (int)(khi - j0 < BK ? khi - j0 : BK);
        const int band = !(lo_last <= j0 && hi_first >= j0 + n);
        const uint32_t *kj = kt + j0 * kv * dpp, *vj = vt + j0 * kv * (dvp / 2);
        /* the scores scaled before the mods, the softmax's scale 1 */
        kn->qk_tiles(mpad, (n + 15) / 16, (int)dpp, qr, w, kj, tl->st, BK, split);
        for (int r = 0; r < m; r++)
            for (int c = 0; c < n; c++)
                tl->st[r * BK + c] *= a->scale;
        if (modded || band)
            qkv__score_mods(a, s, tm, m, j0, n, band, tl->st, BK, 1, NULL);
        kn->softmax_tiles(mpad, n, 1.0f, tl->st, BK, tl->m, tl->l, tl->alpha, p, sp * BK,
                          split);
        kn->pv_tiles(mpad, (n + 31) / 32, (int)dvp, p, sp * BK, vj, tl->alpha, tl->acc, dvp,
                     split);
        j0 += n;
    }
}

/* The key tiles of a task on the other paths: scores keys by queries
   (fp32 products, or bf16 pair dot products), the softmax down columns. */
static void task_pairs(const fwd_job *job, const qkv__seq *s, int64_t hk,
                       const qkv__tile_map *tm, int64_t part, tiles *tl)
{
    const qkv__attn *a = job->a;
    const qkv__kernels *kn = job->ctx->kernels;
    const int m = tm->mp * (int)a->group;
    const int64_t D = a->D, Dv = a->Dv;
    const qkv_tensor *q = a->q, *k = a->k, *v = a->v;
    const int64_t R = qkv__tile_rows(a->group);
    const int64_t BK = job->bk;
    /* query columns m..mpad of the scores are padding: -inf scores against
       a reference of 0 give P = 0, so the softmax kernels run on whole
       vectors and the padding never reaches l or acc */
    const int mpad = (m + QKV__PAD - 1) / QKV__PAD * QKV__PAD;
    /* fewer rows than a vector: bf16 rows where the set has a kernel for
       them, else the fp32 path */
    const int bf = use_bf16(kn, a) && (m >= QKV__PAD || kn->qk_bf16_rows);
    const int bf_rows = bf && m < QKV__PAD;
    uint16_t *q_rows = (uint16_t *)tl->q;   /* bf_rows: [m][2·qkv__pairs(D)] */

    if (bf_rows)
        qkv__tile_rows_bf16(a->q, s, tm, m, D, 2 * qkv__pairs(D), q_rows);
    else if (bf)
        qkv__load_q_pairs(a, s, tm, m, mpad, R, tl->qp);
    else {
        for (int r = 0; r < m; r++) {
            const int64_t h = tm->h0 + r / tm->mp, i = s->q0 + tm->i0 + r % tm->mp;
            float *qr = tl->q + r * D;
            qkv__load_row(kn, q, s->b * q->stride[0] + i * q->stride[1] + h * q->stride[2],
                     q->stride[3], D, qr);
        }
        /* transposed, with qk's padding columns m..mpad zero */
        if (m >= kn->qk_qt_rows)
            qkv__transpose_tile(tl->q, m, D, mpad, R, tl->qt);
    }
    start_rows(tl, mpad, (size_t)m * (size_t)Dv);

    int64_t klo, khi, lo_last, hi_first;
    task_keys(job, s, tm, part, 1, &klo, &khi, &lo_last, &hi_first);
    const int modded = a->softcap > 0.0f || a->alibi || a->bias;
    const int64_t kbase = s->b * k->stride[0] + s->k0 * k->stride[1] + hk * k->stride[2];
    const int64_t vbase = s->b * v->stride[0] + s->k0 * v->stride[1] + hk * v->stride[2];

    for (int64_t j0 = klo; j0 < khi; j0 += BK) {
        const int n = (int)(khi - j0 < BK ? khi - j0 : BK);
        int64_t ldk;
        if (bf) {
            const int dp = (int)qkv__pairs(D);
            const uint16_t *kr = qkv__key_rows_bf16(k, kbase + j0 * k->stride[1], n, D, tl->kb,
                                                    &ldk);
            if (bf_rows)
                kn->qk_bf16_rows(n, m, dp, a->scale, kr, ldk, q_rows, 2 * dp, tl->st, R);
            else
                kn->qk_bf16(n, mpad, dp, a->scale, kr, ldk, tl->qp, R, tl->st, R);
        } else {
            const float *kr = qkv__tile_rows_f32(kn, k, kbase + j0 * k->stride[1], n, D, tl->k, &ldk);
            kn->qk(n, m, (int)D, a->scale, kr, ldk, tl->qt, R, tl->q, D, tl->st, R);
        }
        /* the band cuts this tile unless every row sees all of it */
        const int band = !(lo_last <= j0 && hi_first >= j0 + n);
        if (modded || band)
            qkv__score_mods(a, s, tm, m, j0, n, band, tl->st, 1, R, NULL);
        if (mpad > m)
            for (int c = 0; c < n; c++)
                for (int r = m; r < mpad; r++)
                    tl->st[c * R + r] = -INFINITY;
        kn->col_max(tl->st, R, n, mpad, tl->mx);
        tile_max(tl, mpad);
        if (bf && !a->dropout) {
            kn->exp_pack_bf16(tl->st, R, n, mpad, tl->mref, NULL, tl->sum, tl->pp, R);
        } else {
            kn->exp_cols(tl->st, R, n, mpad, tl->mref, tl->sum);
            if (a->dropout)   /* after the sums: l is the softmax's */
                qkv__dropout_tile(kn, a, s, tm, m, j0, n, tl->st, R);
            if (bf)
                qkv__pack_p_bf16(kn, tl->st, R, n, mpad, tl->pp);
        }
        for (int r = 0; r < mpad; r++)
            tl->l[r] = tl->l[r] * tl->alpha[r] + tl->sum[r];
        if (bf) {
            qkv__key_pairs_bf16(kn, v, vbase + j0 * v->stride[1], n, Dv, tl->vr, tl->vp);
            kn->pv_bf16(m, (int)qkv__pairs(n), (int)Dv, tl->pp, R, tl->vp, Dv, tl->alpha, tl->acc,
                        Dv);
        } else {
            int64_t ldv;
            const float *vr = qkv__tile_rows_f32(kn, v, vbase + j0 * v->stride[1], n, Dv, tl->v, &ldv);
            kn->pv(m, n, (int)Dv, tl->st, 1, R, vr, ldv, tl->alpha, tl->acc, Dv);
        }
    }
}

static void fwd_task(void *arg, int64_t task, int worker)
{
    const fwd_job *job = arg;
    const qkv__attn *a = job->a;
    const qkv__kernels *kn = job->ctx->kernels;
    const int64_t tile = task / job->n_split, part = task % job->n_split;
    qkv__seq s;
    int64_t hk;
    qkv__tile_map tm;
    const int64_t seq = tile_of(job, tile, &s, &hk, &tm);
    const int m = tm.mp * (int)a->group;
    const int64_t Dv = a->Dv, R = qkv__tile_rows(a->group);
    tiles tl = tiles_at(job->ctx->scratch[worker], R, job->bk, dim32(a->D), dim16(Dv));
    /* the whole-tile path for tasks of a tile's rows at least */
    const int whole = job->kt && m >= QKV__PAD;
    const int64_t lda = whole ? job->dvp : Dv;   /* acc's row stride */

    if (whole)
        task_tiles(job, &s, seq, hk, &tm, part, &tl);
    else
        task_pairs(job, &s, hk, &tm, part, &tl);
    if (job->n_split == 1) {
        for (int r = 0; r < m; r++)
            store_result(kn, a, &s, &tm, r, tl.m[r], tl.l[r], tl.acc + r * lda);
        return;
    }
    float *pm = job->part + task * job->part_size, *pl = pm + R, *pacc = pl + R;
    memcpy(pm, tl.m, (size_t)m * sizeof *pm);
    memcpy(pl, tl.l, (size_t)m * sizeof *pl);
    for (int r = 0; r < m; r++)
        memcpy(pacc + r * Dv, tl.acc + r * lda, (size_t)Dv * sizeof *pacc);
}

/* ---- packing K and V for the whole-tile path ------------------------------ */

static void pack_task(void *arg, int64_t task, int worker)
{
    const fwd_job *job = arg;
    const qkv__attn *a = job->a;
    const qkv__kernels *kn = job->ctx->kernels;
    int64_t t;
    const int64_t seq = qkv__tasks_find(&job->pack_tasks, task, &t);
    const qkv__seq s = qkv__attn_seq(a, seq);
    const int64_t BK = job->bk, n_kt = (s.sk + BK - 1) / BK;
    const int64_t hk = t / n_kt, j0 = t % n_kt * BK;
    const int n = (int)(s.sk - j0 < BK ? s.sk - j0 : BK);
    tiles tl = tiles_at(job->ctx->scratch[worker], qkv__tile_rows(a->group), BK, dim32(a->D),
                        dim16(a->Dv));
    const int64_t pos = job->kofs[seq] * a->Hkv + hk * dim32(s.sk) + j0;
    const qkv_tensor *k = a->k, *v = a->v;
    int64_t ld;
    const uint16_t *rows = qkv__key_rows_bf16(
        k, s.b * k->stride[0] + (s.k0 + j0) * k->stride[1] + hk * k->stride[2], n, a->D, tl.kb,
        &ld);
    if (job->split) {   /* fp16 rows split into bf16 as they are packed */
        kn->pack_k_split(rows, ld, n, (int)a->D, (int)job->dpp, job->kt + pos * 2 * job->dpp);
        rows = qkv__key_rows_bf16(v, s.b * v->stride[0] + (s.k0 + j0) * v->stride[1] +
                                         hk * v->stride[2], n, a->Dv, (uint16_t *)tl.v, &ld);
        kn->pack_v_split(rows, ld, n, (int)a->Dv, (int)job->dvp,
                         job->vt + pos * 2 * (job->dvp / 2));
        return;
    }
    kn->pack_k_tiles(rows, ld, n, (int)qkv__pairs(a->D), (int)job->dpp, job->kt + pos * job->dpp);
    rows = qkv__key_rows_bf16(v, s.b * v->stride[0] + (s.k0 + j0) * v->stride[1] +
                                     hk * v->stride[2], n, a->Dv, (uint16_t *)tl.v, &ld);
    kn->pack_v_tiles(rows, ld, n, (int)a->Dv, (int)job->dvp, job->vt + pos * (job->dvp / 2));
}

static void free_packed(fwd_job *job)
{
    if (job->kt)
        qkv__shared_done(job->ctx, QKV__SHARED_PACK);
    free(job->kofs);
    qkv__tasks_free(&job->pack_tasks);
    job->kt = job->vt = NULL;
    job->kofs = NULL;
}

/* Takes the whole-tile path when the kernel set has it, for bf16 calls
   without dropout whose tasks can fill a tile's rows (tasks of fewer rows
   take the pair path, as in a call of their sequence alone: a packed
   variable-length call gives each sequence's separate result bitwise),
   and packs K and V for it; where the packed copy cannot be allocated,
   the call takes the pair path instead. */
/* The bytes of K and V packed for the whole-tile path, 0 where the call
   does not take it; *split: fp16 split into bf16 (packed in two parts). */
static size_t packed_bytes(const qkv__kernels *kn, const qkv__attn *a, int *split)
{
    *split = use_split(kn, a);
    if (!(use_bf16(kn, a) || *split) || !kn->qk_tiles || a->dropout ||
        a->Sq * a->group < QKV__PAD) {
        *split = 0;
        return 0;
    }
    size_t keys = 0;
    for (int64_t i = 0; i < a->n_seqs; i++)
        keys += (size_t)dim32(qkv__attn_seq(a, i).sk);
    return keys * (size_t)a->Hkv * (size_t)((*split ? 2 : 1) * (dim32(a->D) + dim16(a->Dv)) / 2) *
           sizeof(uint32_t);
}

size_t qkv__forward_packed_bytes(const qkv_ctx *ctx, const qkv__attn *a)
{
    int split;
    return packed_bytes(ctx->kernels, a, &split);
}

static qkv_status pack_kv(fwd_job *job)
{
    const qkv__attn *a = job->a;
    qkv_ctx *ctx = job->ctx;
    const size_t bytes = packed_bytes(ctx->kernels, a, &job->split);
    if (!bytes)
        return QKV_OK;
    const int kv = job->split ? 2 : 1;   /* parts packed */
    job->dpp = dim32(a->D) / 2;
    job->dvp = dim16(a->Dv);
    job->kofs = malloc((size_t)(a->n_seqs + 1) * sizeof *job->kofs);
    if (!job->kofs)
        return QKV_OK;
    job->kofs[0] = 0;
    for (int64_t i = 0; i < a->n_seqs; i++)
        job->kofs[i + 1] = job->kofs[i] + dim32(qkv__attn_seq(a, i).sk);
    /* in the context's shared buffer: kept between calls, its pages are
       touched once, not on every call */
    const size_t keys = (size_t)(job->kofs[a->n_seqs] * a->Hkv);
    job->kt = qkv__shared_get(ctx, QKV__SHARED_PACK, bytes);
    job->vt = job->kt ? job->kt + keys * (size_t)(kv * job->dpp) : NULL;
    qkv_status st = QKV_OK;
    if (job->kt &&
        (st = qkv__tasks_make_keys(ctx, a, a->Hkv, job->bk, &job->pack_tasks)) == QKV_OK) {
        qkv__parallel(ctx, job->pack_tasks.total, (double)keys * (double)(a->D + a->Dv),
                      pack_task, job);
        return QKV_OK;
    }
    free_packed(job);
    return st;
}

/* Merges the parts of one tile, in part order:
   M = max_s m_s,  l = Σ_s l_s·e^(m_s-M),  acc = Σ_s acc_s·e^(m_s-M). */
static void merge_task(void *arg, int64_t tile, int worker)
{
    const fwd_job *job = arg;
    const qkv__attn *a = job->a;
    qkv__seq s;
    int64_t hk;
    qkv__tile_map tm;
    tile_of(job, tile, &s, &hk, &tm);
    const int m = tm.mp * (int)a->group;
    const int64_t R = qkv__tile_rows(a->group), Dv = a->Dv;
    float *acc = job->ctx->scratch[worker];
    for (int r = 0; r < m; r++) {
        float mx = -INFINITY, l = 0.0f;
        for (int64_t p = 0; p < job->n_split; p++) {
            const float mp = job->part[(tile * job->n_split + p) * job->part_size + r];
            mx = mp > mx ? mp : mx;
        }
        memset(acc, 0, (size_t)Dv * sizeof *acc);
        for (int64_t p = 0; p < job->n_split && mx > -INFINITY; p++) {
            const float *pm = job->part + (tile * job->n_split + p) * job->part_size;
            const float *pacc = pm + 2 * R + r * Dv;
            if (pm[r] == -INFINITY)
                continue;
            const float w = expf(pm[r] - mx);
            l += pm[R + r] * w;
            for (int64_t c = 0; c < Dv; c++)
                acc[c] += pacc[c] * w;
        }
        store_result(job->ctx->kernels, a, &s, &tm, r, mx, l, acc);
    }
}

/* Parts per tile: 1 unless the call has too few tiles to keep a machine's
   cores busy and long key ranges to split. A function of the problem
   alone, so results do not depend on the thread count. */
static int64_t split_count(const qkv__attn *a, int64_t tiles)
{
    enum { MIN_TASKS = 32, MIN_KEYS = 1024, MAX_SPLIT = 64 };
    if (tiles == 0 || tiles >= MIN_TASKS)
        return 1;
    int64_t n = (MIN_TASKS + tiles - 1) / tiles;
    int64_t by_keys = a->k->shape[1] / MIN_KEYS;
    if (n > by_keys) n = by_keys;
    if (n > MAX_SPLIT) n = MAX_SPLIT;
    return n > 1 ? n : 1;
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
    return qkv__forward_run(ctx, &a);
}

qkv_status qkv__forward_run(qkv_ctx *ctx, const qkv__attn *ap)
{
    qkv__attn a = *ap;
    qkv_status st;
    /* bounds that keep the scratch size arithmetic far from overflow */
    if (a.D > (1 << 20) || a.Dv > (1 << 20))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "%s: head_dim above 1048576",
                         a.D > (1 << 20) ? "q->shape[3]" : "v->shape[3]");
    if (a.group > (1 << 20))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED,
                         "q->shape[2]: more than 1048576 query heads per kv head");
    const int64_t bk = key_tile(qkv__tile_rows(a.group), a.D, a.Dv);
    if ((st = qkv__scratch_reserve(ctx, tiles_floats(qkv__tile_rows(a.group), bk, dim32(a.D),
                                                     dim16(a.Dv), use_split(ctx->kernels, &a)) *
                                            sizeof(float))))
        return st;
    fwd_job job;
    memset(&job, 0, sizeof job);
    job.ctx = ctx;
    job.a = &a;
    job.n_split = 1;
    job.bk = bk;
    if ((st = pack_kv(&job)))
        return st;
    if ((st = qkv__tasks_make(ctx, &a, a.Hkv, qkv__tile_positions(a.group), &job.tasks))) {
        free_packed(&job);
        return st;
    }
    job.n_split = split_count(&a, job.tasks.total);
    if (job.n_split > 1) {
        const int64_t R = qkv__tile_rows(a.group);
        job.part_size = R * (2 + a.Dv);
        job.part = malloc((size_t)(job.tasks.total * job.n_split * job.part_size) * sizeof(float));
        if (!job.part) {
            qkv__tasks_free(&job.tasks);
            free_packed(&job);
            return qkv__fail(ctx, QKV_ERR_NOMEM, "ctx: cannot allocate split-K partial results");
        }
    }
    /* an upper bound on the flops (every row sees every key of dim 1) */
    const double work = 2.0 * (double)(a.D + a.Dv) * (double)a.Hq * (double)a.q->shape[0] *
                        (double)a.q->shape[1] * (double)a.k->shape[1];
    qkv__parallel(ctx, job.tasks.total * job.n_split, work, fwd_task, &job);
    if (job.n_split > 1)
        qkv__parallel(ctx, job.tasks.total, 0.0, merge_task, &job);
    free(job.part);
    qkv__tasks_free(&job.tasks);
    free_packed(&job);
    return QKV_OK;
}
