/*
 * decode.c — attention from a KV cache: a few new queries per sequence
 * (decoding, speculative verification, chunked prefill) against the cached
 * keys of each sequence, with per-sequence cache lengths, from a contiguous
 * cache or a paged one (block tables into pools of fixed-size blocks), and
 * the append that writes new rows into a paged cache (int8 with per-row
 * scales included).
 *
 * Both cache kinds are one description, kv_src: position p of sequence b
 * lives in block table[b][p / bs], row p % bs; a contiguous cache is the
 * special case of one block per sequence (no table, bs = Smax).
 *
 * A task is (sequence, kv heads, tile of query positions, key part): the
 * tile stacks the positions of every query head of a group, so each K/V
 * row is read once for the whole group; a task takes every kv head where a
 * position's heads lie together (see the prefetch notes below). The keys
 * are walked in tiles of BK positions counted from the first key the tile
 * sees, with the online softmax of forward.c; a key tile that crosses
 * block boundaries is computed run by run, or gathered where a boundary
 * would shift the kernels' groups of keys, so a paged cache gives bitwise
 * the contiguous cache's result. When the call has few tiles, long caches
 * are cut into parts whose partial (max, sum, acc) states are merged in
 * part order (split-K, "flash-decoding"); the part count depends on the
 * problem alone, never on the thread count. Long chunks of new queries
 * (chunked prefill) from bf16 or fp16 caches on sets with whole tiles run
 * through the forward instead (run_forward), a paged cache's rows
 * gathered into a contiguous copy first.
 *
 * Not here: the inner loops (src/cpu), validation of q, out and the
 * options (check.c).
 */
#include "attn.h"
#include "tile.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Keys per tile: the scores [BK][R] and a widened K or V tile stay in L2.
   The AMX few-row kernels pay a fixed cost per call (the tile
   configuration, the queries' tiles, the first products' latency): on
   the Xeon measured, tiles of 256 keys took 0.96-0.97x the time of tiles
   of 128 (bf16 from memory, 1 and 4 new queries), 0.90x from L3 with 4. */
enum { BK = 256 };

/* Rows per kv head up to which a task over a head-major pool takes every
   kv head of its sequence, as over position-major rows. A head's runs
   are a block long (4 KiB at 16 rows of 128 bf16), far apart; read head
   by head they came slower than whole blocks. Measured on Zen 4 (bf16
   pools of blocks of 16, 32/8 heads, two builds alternated, 128 MB of
   other memory read before each call): with 4 rows a head, 0.92-0.96x
   the time of a task per head at the host's lower memory level (1x32768
   and 8x8192, blocks in order or shuffled) and 0.79-0.84x at the upper;
   with 8 rows 0.97-0.99x; with 16, whose arithmetic sets the time,
   1.02-1.04x. int8, fp16 and fp32 pools: level (0.99-1.01x). Only
   where a sequence holds more than POOL_HEADS_KEYS: short caches are
   read from the CPU's caches, and more calls of fewer keys cost more
   (generation with stories260K, 4 kv heads of 8 dims, 256 positions:
   0.94x the tokens/s with every head in a task; 1x4096 bf16, 1.06x the
   time). */
enum { POOL_HEADS_ROWS = 8, POOL_HEADS_KEYS = 16 * BK };

/* Where the K and V rows of the keys live. */
typedef struct {
    qkv_tensor     k, v;      /* [blocks, bs, Hkv, D|Dv] views (dtype unused when i8) */
    int            i8;        /* int8 codes with scales ks/vs [blocks, bs, Hkv],
                                 or [blocks, Hkv, bs] when sstride is 1 */
    int64_t        es;        /* bytes per element */
    const float   *ks, *vs;
    int64_t        sstride;   /* floats between a head's scales of adjacent rows */
    int64_t        bs;        /* positions per block */
    int            shift;     /* log2(bs) for a table's power-of-two blocks */
    const int32_t *table;     /* [n_seqs][max_blocks], or NULL: block b for sequence b */
    int64_t        max_blocks;
    const int32_t *lens;      /* [n_seqs] cached positions, or NULL: bs each */
} kv_src;

static int64_t seq_len(const kv_src *src, int64_t b)
{
    return src->lens ? src->lens[b] : src->bs;
}

/* Position p's block and its row in it: paged blocks are a power of two
   long (shifts, no division); a contiguous cache is one block per
   sequence. */
static int64_t block_of(const kv_src *src, int64_t b, int64_t p)
{
    return src->table ? src->table[b * src->max_blocks + (p >> src->shift)] : b;
}

static int64_t row_in_block(const kv_src *src, int64_t p)
{
    return src->table ? p & (src->bs - 1) : p;
}

/* Element offset of position p's row for kv head h in view t (k or v). */
static int64_t row_off(const kv_src *src, const qkv_tensor *t, int64_t b, int64_t p, int64_t h)
{
    return block_of(src, b, p) * t->stride[0] + row_in_block(src, p) * t->stride[1] +
           h * t->stride[2];
}

/* The scale index of an int8 row: [block, row, head], or [block, head,
   row] in a head-major pool. */
static int64_t scale_idx(const kv_src *src, int64_t b, int64_t p, int64_t h, int64_t Hkv)
{
    const int64_t blk = block_of(src, b, p), r = row_in_block(src, p);
    return src->sstride == 1 ? (blk * Hkv + h) * src->bs + r : (blk * src->bs + r) * Hkv + h;
}

/* n fp32 rows of cols elements (positions p0.., head h): in place when
   they lie in one block as fp32 with unit inner stride, else widened or
   dequantized into buf; *ld their stride. */
static const float *rows_f32(const qkv__kernels *kn, const kv_src *src, int is_v, int64_t b,
                             int64_t p0, int64_t h, int n, int64_t cols, int64_t Hkv,
                             float *buf, int64_t *ld)
{
    const qkv_tensor *t = is_v ? &src->v : &src->k;
    const int one = row_in_block(src, p0) + n <= src->bs;
    if (!src->i8 && one)
        return qkv__tile_rows_f32(kn, t, row_off(src, t, b, p0, h), n, cols, buf, ld);
    const float *sc = is_v ? src->vs : src->ks;
    for (int c = 0; c < n; c++) {
        const int64_t off = row_off(src, t, b, p0 + c, h);
        if (src->i8)   /* pools are row-major: unit inner stride */
            kn->cvt_i8((const int8_t *)t->data + off, sc[scale_idx(src, b, p0 + c, h, Hkv)],
                       buf + c * cols, cols);
        else
            qkv__load_row(kn, t, off, t->stride[3], cols, buf + c * cols);
    }
    *ld = cols;
    return buf;
}

/* Decode reads each K/V row once, with little arithmetic per byte, so it
   runs at the speed the cache lines arrive. Measured on the virtual
   machines this is tuned on, a core's own loads keep too few lines in
   flight once the kernels' arithmetic fills the reorder window, and the
   hardware prefetchers do not make up for it; software prefetch one key
   tile ahead (into L2) does: 1.6x. In [S, Hkv, D] caches (and paged
   pools) a head's rows are 2·D bytes at a stride of Hkv rows, too sparse
   for the stream prefetchers, so a decode task takes all the kv heads of
   its sequence, and while one head works on a key tile, it asks for its
   share of the next tile's positions, every head of each position in
   address order. Where a head's rows follow each other ([Hkv, S, D]) a
   task takes one head and asks for its own next tile; in a head-major
   pool, where they do for a block only, few-row tasks take every head
   too (POOL_HEADS_ROWS). Few-row tiles of several heads go further: all
   heads walk each tile together in sub-tiles, asking one sub-tile ahead
   (tile_streamed). The few-row bf16 kernels ask as they go (qkv__pf,
   next_rows); the other paths ask for a few rows between kernel calls,
   block by block (row_asks). Pages: a cache on 4 KiB pages costs a TLB
   walk (nested on a VM) every 16 rows of 256 bytes; qkv_alloc gives
   transparent huge pages, measured 1.5x faster to decode from. */

/* Asks for bytes [p, p + span) of the cache, line by line. */
static void prefetch_span(const char *p, int64_t span, int locality)
{
    const uintptr_t lo = (uintptr_t)p & ~(uintptr_t)63, hi = (uintptr_t)p + (uintptr_t)span;
    for (uintptr_t a = lo; a < hi; a += 64) {
        if (locality == 3)
            __builtin_prefetch((const void *)a, 0, 3);
        else
            __builtin_prefetch((const void *)a, 0, 2);
    }
}

/* Prefetches the K and V rows of positions p0 .. p0+n-1 (below end) for
   kv heads h0 .. h0+nh-1: one span per position when the heads are
   adjacent rows, as in [S, Hkv, D] caches, else row by row. */
static void prefetch_rows(const kv_src *src, int64_t b, int64_t h0, int64_t nh, int64_t p0,
                          int64_t n, int64_t end, int64_t D, int64_t Dv)
{
    const qkv_tensor *k = &src->k, *v = &src->v;
    if (k->stride[3] != 1 || v->stride[3] != 1)
        return;
    const int64_t es = src->es;
    const int adj = k->stride[2] == D && v->stride[2] == Dv;
    const int64_t rows = adj ? 1 : nh, kspan = (adj ? nh * D : D) * es,
                  vspan = (adj ? nh * Dv : Dv) * es;
    for (int64_t p = p0; p < p0 + n && p < end; p++)
        for (int64_t e = 0; e < rows; e++) {
            prefetch_span((const char *)k->data + row_off(src, k, b, p, h0 + e) * es, kspan, 3);
            prefetch_span((const char *)v->data + row_off(src, v, b, p, h0 + e) * es, vspan, 2);
        }
}

enum { CHUNK = 8 };   /* keys per kernel call between two asks */
enum { MANY_CHUNK = 32 };   /* the same for tiles of more than QKV__PAD rows */

/* Tiles of up to this many rows (decoding, speculative verification;
   on sets with tiles more: kernels.h dec_rows_max) take
   head_tile_rows: scores from qk_bf16_dec / qk_dec (dot products along
   d, 4 x 4 at a time), the softmax along rows, then P·V; more rows
   (chunked prefill) take the forward's layout: qk or qk_bf16 on query
   vectors or pairs, and pv or mm_bf16 on V paired once per tile. */
enum { PAIRS_ROWS = 16 };
/* The same on sets without a bf16 dot, whose few-row kernels widen bf16
   in registers and reduce each dot product's lanes: measured on AVX2
   (1x32768 keys, 32/8 heads), 12 rows ran 0.83x the forward's kernels'
   time that way, 16 rows 1.01-1.05x. */
enum { FMA_ROWS = 12 };
/* The most rows a tile may take the few-row kernels in groups of 16 on
   sets without tiles (run, below). */
enum { DEC_GROUPS_MAX = 64 };

/* The rows of one head's next key tile still to be asked for: positions
   p .. end-1 of sequence b, head h, in cache t, cols values a row. */
typedef struct {
    const qkv_tensor *t;
    int64_t           b, h, p, end, cols;
} row_asks;

/* Keys per kernel call of a tile of m rows: CHUNK (MANY_CHUNK) while c
   has rows to ask for, else the whole run. */
static int chunk(const row_asks *c, int m)
{
    return c->p < c->end ? (m > QKV__PAD ? MANY_CHUNK : CHUNK) : BK;
}

/* Asks for c's next n rows, block by block (one address computation a
   block, then a line at a time). */
static void ask_rows(const kv_src *src, row_asks *c, int64_t n)
{
    const qkv_tensor *t = c->t;
    const int64_t e = c->p + n < c->end ? c->p + n : c->end;
    if (t->stride[3] != 1) {
        c->p = e;
        return;
    }
    const int64_t ld = t->stride[1] * src->es, span = c->cols * src->es;
    while (c->p < e) {
        const int64_t left = src->bs - row_in_block(src, c->p);
        const int64_t k = e - c->p < left ? e - c->p : left;
        const char *r = (const char *)t->data + row_off(src, t, c->b, c->p, c->h) * src->es;
        for (int64_t i = 0; i < k; i++)
            prefetch_span(r + i * ld, span, 2);
        c->p += k;
    }
}

/* ---- the job ------------------------------------------------------------- */

typedef struct {
    qkv_ctx         *ctx;
    const qkv__attn *a;
    const kv_src    *src;
    int64_t          P;        /* query positions per tile */
    int64_t          R;        /* score columns: P·group rounded up to 16 */
    int64_t          HB;       /* kv heads per task (a divisor of Hkv) */
    int              bf;       /* the bf16 dot path (q and cache bf16) */
    int              i8dot;    /* int8 codes read as codes (qk_i8_dec, pv_i8_dec) */
    int              rows_max; /* tiles of up to this many rows take head_tile_rows */
    int              f16;      /* fp16 rows read in place (qk_f16_dec, pv_f16_dec) */
    int              f16s;     /* fp16 rows split into bf16 pairs (qk_f16s_dec, pv_f16s_dec) */
    int              f16t;     /* more rows: fp16 split into bf16 on qk_bf16, mm_bf16 */
    int              hm_pool;  /* a head-major pool: each head's rows of a block one run */
    int              hm_cache; /* a contiguous head-major cache: each head's rows one run */
    int64_t         *start;    /* [B+1] first task of each sequence */
    int64_t         *tstart;   /* [B+1] first tile of each sequence */
    int64_t         *split;    /* [B] key parts per tile of each sequence */
    float           *part;     /* split-K partial states, part_size floats per task */
    int64_t         *asked;    /* [n_threads] the task whose first tile a worker asked for */
    int64_t          part_size;
} dec_job;

static int64_t pairs(int64_t n) { return (n + 1) / 2; }

/* Rows of the group of 16 from row g of m (the few-row kernels' calls
   on tiles of more rows, kernels.h dec_rows_max). */
static int group_rows(int m, int g) { return m - g < QKV__PAD ? m - g : QKV__PAD; }

/* Per-thread scratch as one kv head of the task sees it: the key tile's
   buffers are shared by the task's heads, the queries and the softmax
   state are the head's own. */
typedef struct {
    float    *kw;    /* [BK][D]  widened K rows                             */
    float    *vw;    /* [BK][Dv] widened V rows                             */
    float    *st;    /* [BK][R]  scores, keys by queries                    */
    float    *mx, *mref, *sum, *ones;                   /* [R]              */
    uint16_t *kb;    /* [BK][2·pairs(D)] gathered bf16 K rows               */
    uint16_t *vb;    /* [BK][Dv]   gathered bf16 V rows                     */
    uint32_t *pp;    /* [BK/2][R]  P pairs along keys                       */
    float    *ksc, *vsc;   /* [BK] an int8 tile's row scales                */
    /* the head's own */
    float    *q;     /* [R][D]   fp32 queries, or bf16 rows [R][2·pairs(D)], or
                        (with qt) their split tiles (f16s_queries)          */
    float    *qt;    /* [D][R]   transposed, zero past m                    */
    float    *acc;   /* [R][Dv]                                             */
    float    *m, *l, *alpha;                            /* [R]              */
    float    *hst;   /* [R][BK] the head's own scores (streamed tiles)      */
    uint32_t *hpp;   /* [R][BK/2] its P                                      */
    float    *hps;   /* [2] int8 P's scale, and 1 where a V row was not finite */
    /* fp16 split into bf16 (f16t; kernels.h split_f16), W = 3·dim32(D):
       rows (kh | kl | kh) against queries (qh | qh | ql), P pairs (ph; ph;
       pl) against V pairs (vh; vl; vh) */
    uint16_t *xk;    /* [BK][W]       split K rows                          */
    uint32_t *xq;    /* [W/2][R]      the queries' pairs                    */
    uint32_t *xp;    /* [3·BK/2][R]   P's pairs                             */
    uint32_t *xv;    /* [3·BK/2][Dv]  V's pairs                             */
    uint16_t *xg;    /* [2][Dv]       V rows gathered from a stride         */
} scratch;

static int64_t split_width(int64_t D) { return 3 * ((D + 31) / 32 * 32); }

static int64_t split_floats(int64_t R, int64_t D, int64_t Dv)
{
    const int64_t W = split_width(D);
    return BK * W / 2 + W / 2 * R + 3 * BK / 2 * R + 3 * BK / 2 * Dv + Dv;
}

static int64_t shared_floats(int64_t R, int64_t D, int64_t Dv, int split)
{
    return BK * D + BK * Dv + BK * R + 4 * R + BK * pairs(D) + BK / 2 * Dv + BK / 2 * R +
           2 * BK + (split ? split_floats(R, D, Dv) : 0);
}

static int64_t head_floats(int64_t R, int64_t D, int64_t Dv)
{
    return 2 * R * D + R * Dv + 3 * R + BK * R + BK / 2 * R + 2;
}

/* The scratch of head slot e (of HB). */
static scratch scratch_at(const dec_job *job, float *base, int64_t e)
{
    const int64_t R = job->R, D = job->a->D, Dv = job->a->Dv;
    scratch s;
    s.kw = base;
    s.vw = s.kw + BK * D;
    s.st = s.vw + BK * Dv;
    s.mx = s.st + BK * R;
    s.mref = s.mx + R;
    s.sum = s.mref + R;
    s.ones = s.sum + R;
    s.kb = (uint16_t *)(s.ones + R);
    s.vb = s.kb + BK * 2 * pairs(D);
    s.pp = (uint32_t *)(s.vb + BK * Dv);
    s.ksc = (float *)(s.pp + BK / 2 * R);
    s.vsc = s.ksc + BK;
    s.q = base + shared_floats(R, D, Dv, job->f16t) + e * head_floats(R, D, Dv);
    s.qt = s.q + R * D;
    s.acc = s.qt + R * D;
    s.m = s.acc + R * Dv;
    s.l = s.m + R;
    s.alpha = s.l + R;
    s.hst = s.alpha + R;
    s.hpp = (uint32_t *)(s.hst + BK * R);
    s.hps = (float *)(s.hpp + BK / 2 * R);
    /* the split buffers close the shared part */
    const int64_t W = split_width(D);
    s.xk = (uint16_t *)(s.vsc + BK);
    s.xq = (uint32_t *)(s.xk + BK * W);
    s.xp = s.xq + W / 2 * R;
    s.xv = s.xp + 3 * BK / 2 * R;
    s.xg = (uint16_t *)(s.xv + 3 * BK / 2 * Dv);
    return s;
}

/* The sequence, first kv head, query tile and key part of a task. A
   sequence's tasks run part by part, its tiles (kv heads, query tiles)
   within a part: the workers then read the same positions of different
   heads at once, which in a head-major pool are neighbouring runs of a
   block (1,1,32768, 8 kv heads: 0.89x the time of tile by tile, 1,4,32768
   0.91x; without grouped heads, 32 kv heads, an int8 pool 0.93x; the
   other layouts level). */
static void task_of(const dec_job *job, int64_t task, qkv__seq *s, int64_t *hk0,
                    qkv__tile_map *tm, int64_t *part)
{
    const qkv__attn *a = job->a;
    int64_t lo = 0, hi = a->B;        /* the sequence: start[lo] <= task < start[lo+1] */
    while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (job->start[mid] <= task) lo = mid; else hi = mid;
    }
    const int64_t t = task - job->start[lo], nt = job->tstart[lo + 1] - job->tstart[lo];
    const int64_t n_qt = (a->Sq + job->P - 1) / job->P, tile = t % nt;
    s->b = lo; s->q0 = 0; s->sq = a->Sq; s->k0 = 0; s->sk = seq_len(job->src, lo);
    *part = t / nt;
    *hk0 = tile / n_qt * job->HB;
    tm->h0 = *hk0 * a->group;
    tm->i0 = (n_qt - 1 - tile % n_qt) * job->P;
    tm->mp = (int)(a->Sq - tm->i0 < job->P ? a->Sq - tm->i0 : job->P);
}

/* The int16 queries qk_i8_dec reads (in qt, which the few-row path does
   not use): row r is q_r / qsc[r] rounded, qsc[r] = max_d |q_r| / 32767;
   rows m .. m4-1 zero. */
static int16_t *queries_i16(const scratch *sc) { return (int16_t *)sc->qt; }
static float *query_scales(const scratch *sc, int m4, int64_t D)
{
    return (float *)(queries_i16(sc) + m4 * D);
}

static void quantize_queries(const scratch *sc, int bf, int m, int m4, int64_t D, int64_t w)
{
    int16_t *q16 = queries_i16(sc);
    float *qs = query_scales(sc, m4, D);
    for (int r = 0; r < m4; r++) {
        /* bf16 rows of w values (bf), else fp32 rows of D */
        const uint16_t *qb = (const uint16_t *)sc->q + r * w;
        const float *qf = sc->q + r * D;
        float big = 0.0f;
        for (int64_t x = 0; r < m && x < D; x++) {
            const float v = fabsf(bf ? qkv__bf16_to_f32(qb[x]) : qf[x]);
            big = v > big ? v : big;
        }
        qs[r] = big > 0.0f ? big / 32767.0f : 0.0f;
        const float inv = big > 0.0f ? 32767.0f / big : 0.0f;
        for (int64_t x = 0; x < D; x++)
            q16[r * D + x] =
                r < m ? (int16_t)lrintf((bf ? qkv__bf16_to_f32(qb[x]) : qf[x]) * inv) : 0;
    }
}

/* Loads the tile's queries: bf16 rows for the bf16 path, else fp32 rows
   and their transpose (zero columns m..R). */
static void load_queries(const dec_job *job, const qkv__seq *s, const qkv__tile_map *tm,
                         int m, const scratch *sc)
{
    const qkv__attn *a = job->a;
    const qkv__kernels *kn = job->ctx->kernels;
    const qkv_tensor *q = a->q;
    const int64_t D = a->D, R = job->R, w = 2 * pairs(D);
    if (job->f16t && m > job->rows_max) {   /* rows (qh | qh | ql), pairs for qk_bf16 */
        const int64_t W = split_width(D), w1 = W / 3;
        float *row = (float *)sc->xk;             /* free until the first tile */
        uint16_t *sp = (uint16_t *)(row + D);
        memset(sc->xq, 0, (size_t)(W / 2 * R) * sizeof *sc->xq);
        memset(sp, 0, (size_t)W * sizeof *sp);
        for (int r = 0; r < m; r++) {
            const int64_t h = tm->h0 + r / tm->mp, i = tm->i0 + r % tm->mp;
            qkv__load_row(kn, q, s->b * q->stride[0] + i * q->stride[1] + h * q->stride[2],
                          q->stride[3], D, row);
            kn->split_f32(row, D, sp, sp + 2 * w1, sp + w1);
            for (int64_t x = 0; x < W / 2; x++)
                sc->xq[x * R + r] = (uint32_t)sp[2 * x] | (uint32_t)sp[2 * x + 1] << 16;
        }
        return;
    }
    if (job->bf && m > job->rows_max) {   /* pairs for qk_bf16 */
        qkv__load_q_pairs(a, s, tm, m, (m + QKV__PAD - 1) / QKV__PAD * QKV__PAD, R,
                          (uint32_t *)sc->q);
        return;
    }
    for (int r = 0; r < m; r++) {
        const int64_t h = tm->h0 + r / tm->mp, i = tm->i0 + r % tm->mp;
        const int64_t off = s->b * q->stride[0] + i * q->stride[1] + h * q->stride[2];
        if (job->bf) {
            uint16_t *qr = (uint16_t *)sc->q + r * w;
            for (int64_t x = 0; x < D; x++)
                qr[x] = ((const uint16_t *)q->data)[off + x * q->stride[3]];
            if (D % 2)
                qr[D] = 0;
        } else {
            qkv__load_row(kn, q, off, q->stride[3], D, sc->q + r * D);
        }
    }
    if (m <= job->rows_max) {
        /* head_tile_rows: the kernels read rows up to round_up(m, 4) */
        const int64_t row = job->bf ? w / 2 : D;   /* floats per row */
        const int m4 = (m + 3) / 4 * 4;
        memset(sc->q + m * row, 0, (size_t)((m4 - m) * row) * sizeof(float));
        if (job->i8dot)
            quantize_queries(sc, job->bf, m, m4, D, w);
        if (job->f16s) {   /* the split queries' tiles over q and qt, once a task,
                              32·D words for each group of 16 rows */
            memcpy(sc->hst, sc->q, (size_t)(m * D) * sizeof(float));
            for (int g = 0; g < m; g += QKV__PAD)
                kn->f16s_queries(group_rows(m, g), (int)D, sc->hst + g * D, D,
                                 (uint32_t *)sc->q + g / QKV__PAD * 32 * D);
        }
        return;
    }
    if (!job->bf)   /* the transpose qk reads */
        for (int64_t d = 0; d < D; d++)
            for (int64_t r = 0; r < R; r++)
                sc->qt[d * R + r] = r < m ? sc->q[r * D + d] : 0.0f;
}

/* Whether positions p0 .. p0+n-1 lie in one block (rows at one stride). */
static int one_block(const kv_src *src, int64_t p0, int n)
{
    return row_in_block(src, p0) + n <= src->bs;
}

/* n bf16 rows of t (positions p0.., head h) for the dot kernels, each
   `w` elements with zeros past cols: in place when they lie at one stride
   with unit inner stride and w == cols, else gathered into buf. */
static const uint16_t *rows_bf16(const kv_src *src, const qkv_tensor *t, int64_t b, int64_t p0,
                                 int64_t h, int n, int64_t cols, int64_t w, uint16_t *buf,
                                 int64_t *ld)
{
    const uint16_t *data = t->data;
    if (one_block(src, p0, n) && t->stride[3] == 1 && w == cols) {
        *ld = t->stride[1];
        return data + row_off(src, t, b, p0, h);
    }
    for (int c = 0; c < n; c++) {
        const uint16_t *r = data + row_off(src, t, b, p0 + c, h);
        for (int64_t x = 0; x < cols; x++)
            buf[c * w + x] = r[x * t->stride[3]];
        for (int64_t x = cols; x < w; x++)
            buf[c * w + x] = 0;
    }
    *ld = w;
    return buf;
}

/* The length of the run of the tile's keys from offset c0 (of n, the
   tile starting at position p0) that the kernels take in one row set: up
   to the end of c0's block, or the whole rest when `align` does not
   divide p0 or the block size (a block boundary inside the tile would
   then shift the kernels' groups of `align` keys; the rows are gathered
   instead). */
static int run_length(const kv_src *src, int64_t p0, int c0, int n, int align)
{
    const int64_t left = src->bs - row_in_block(src, p0 + c0);
    if (((p0 % align == 0 && src->bs % align == 0) || one_block(src, p0, n)) && left < n - c0)
        return (int)left;
    return n - c0;
}

/* run_length, ending at offset end (a sub-tile's end) at the latest. */
static int run_until(const kv_src *src, int64_t p0, int c0, int end, int n, int align)
{
    const int nr = run_length(src, p0, c0, n, align);
    return nr < end - c0 ? nr : end - c0;
}

/* At most this many blocks hold a key tile (blocks of 8, the tile
   starting inside one). */
enum { TILE_BLOCKS = BK / 8 + 1 };

/* A run of rows at one stride (ld bytes) as the kernels take it. */
static qkv__rows run_rows(const void *first, int64_t ld, const char **blk)
{
    blk[0] = first;
    const qkv__rows r = { blk, ld, QKV__RUN, 0 };
    return r;
}

/* Keys p0 .. p0+n-1 of t (head h) for the few-row kernels, in place:
   the blocks they lie in (pointers into blk, TILE_BLOCKS of them) or, in
   a contiguous cache, their run. The rows must be the kernels' width
   (`bytes`) with a unit inner stride. The kernels' groups of 4 keys from
   p0 must not cross a block: where they would (p0 not a multiple of 4
   and the keys in several blocks), the rows are copied into buf. */
static qkv__rows tile_rows(const kv_src *src, const qkv_tensor *t, int64_t b, int64_t p0,
                           int64_t h, int n, int64_t bytes, void *buf, const char **blk)
{
    const char *data = t->data;
    qkv__rows r = { blk, t->stride[1] * src->es, QKV__RUN, 0 };
    if (!src->table || one_block(src, p0, n)) {
        blk[0] = data + row_off(src, t, b, p0, h) * src->es;
        return r;
    }
    if (p0 % 4) {
        for (int c = 0; c < n; c++)
            memcpy((char *)buf + c * bytes, data + row_off(src, t, b, p0 + c, h) * src->es,
                   (size_t)bytes);
        return run_rows(buf, bytes, blk);
    }
    r.shift = src->shift;
    r.r0 = (int)row_in_block(src, p0);
    const int64_t first = p0 - r.r0;
    for (int64_t i = 0; i * src->bs < r.r0 + n; i++)
        blk[i] = data + row_off(src, t, b, first + i * src->bs, h) * src->es;
    return r;
}

/* Keys p0 .. p0+n-1 of t (head h) as bf16 rows of w elements (zeros
   past cols) for the few-row kernels: in place (tile_rows) when they are
   that wide at a unit inner stride, else gathered into buf. */
static qkv__rows bf16_rows(const kv_src *src, const qkv_tensor *t, int64_t b, int64_t p0,
                           int64_t h, int n, int64_t cols, int64_t w, uint16_t *buf,
                           const char **blk)
{
    if (t->stride[3] == 1 && w == cols)
        return tile_rows(src, t, b, p0, h, n, w * 2, buf, blk);
    int64_t ld;
    const uint16_t *rows = rows_bf16(src, t, b, p0, h, n, cols, w, buf, &ld);
    return run_rows(rows, ld * 2, blk);
}

static const uint16_t *i8_rows(const dec_job *job, int64_t b, int is_v, int64_t p0, int64_t h,
                               int n, const scratch *sc, int c0, int64_t *ld);

/* Row p of t (head h) as fp16 values at a unit stride: in place, or
   gathered into g. */
static const uint16_t *f16_row(const kv_src *src, const qkv_tensor *t, int64_t b, int64_t p,
                               int64_t h, int64_t cols, uint16_t *g)
{
    int64_t ld;
    return rows_bf16(src, t, b, p, h, 1, cols, cols, g, &ld);
}

/* n K rows (positions p0.., head h) split into bf16 (kernels.h
   split_f16) as rows (kh | kl | kh) of W values at dst, zero past D in
   each part. */
static void split_keys(const dec_job *job, int64_t b, int64_t p0, int64_t h, int n,
                       const scratch *sc, uint16_t *dst)
{
    const kv_src *src = job->src;
    const qkv__kernels *kn = job->ctx->kernels;
    const int64_t D = job->a->D, W = split_width(D), w1 = W / 3;
    for (int c = 0; c < n; c++) {
        uint16_t *d = dst + c * W;
        kn->split_f16(f16_row(src, &src->k, b, p0 + c, h, D, sc->kb), D, d, d + w1, d + 2 * w1);
        for (int part = 0; part < 3 && D < w1; part++)
            memset(d + part * w1 + D, 0, (size_t)(w1 - D) * sizeof *d);
    }
}

/* P (st [n][R], rows < mpad) split into bf16 pairs along keys, (ph; ph;
   pl) in xp: the A operand of tile_values' product. */
static void split_p(const qkv__kernels *kn, const scratch *sc, int n, int mpad, int64_t R)
{
    const int np = (int)pairs(n);
    for (int jj = 0; jj < np; jj++)
        kn->split_pairs_f32(sc->st + 2 * jj * R, 2 * jj + 1 < n ? sc->st + (2 * jj + 1) * R : NULL,
                            mpad, sc->xp + jj * R, sc->xp + (2 * np + jj) * R,
                            sc->xp + (np + jj) * R);
}

/* Scores of keys p0 .. p0+n-1 for the tile's m rows into st [n][R],
   chunk() keys per kernel call, each followed by asks for as many of the
   next tile's K rows (ak). */
static void tile_scores(const dec_job *job, const qkv__seq *s, int64_t hk, int64_t p0, int n,
                        int m, const scratch *sc, row_asks *ak)
{
    const qkv__attn *a = job->a;
    const kv_src *src = job->src;
    const qkv__kernels *kn = job->ctx->kernels;
    const int64_t D = a->D, R = job->R, w = 2 * pairs(D);
    const int mpad = (m + QKV__PAD - 1) / QKV__PAD * QKV__PAD;
    if (job->f16t) {   /* chunk by chunk: the rows split, then their scores */
        const int64_t W = split_width(D);
        for (int c = 0, nc; c < n; c += nc) {
            const int ch = chunk(ak, m);
            nc = n - c < ch ? n - c : ch;
            split_keys(job, s->b, p0 + c, hk, nc, sc, sc->xk + c * W);
            kn->qk_bf16(nc, mpad, (int)(W / 2), a->scale, sc->xk + c * W, W, sc->xq, R,
                        sc->st + c * R, R);
            ask_rows(src, ak, nc);
        }
        return;
    }
    if (job->bf && src->i8)   /* an int8 tile's codes as bf16, one run */
        for (int c0 = 0; c0 < n;) {
            const int nr = run_length(src, p0, c0, n, 1);
            int64_t ld;
            i8_rows(job, s->b, 0, p0 + c0, hk, nr, sc, c0, &ld);
            c0 += nr;
        }
    for (int c0 = 0; c0 < n;) {
        if (job->bf) {
            /* runs start at multiples of 16 keys from p0, chunks are
               multiples of 16: the kernels' blocks of keys (4 for the dot
               products, 16 for tiles, whose scores differ from the dot
               products' in their last bits) are the same for every cache
               layout */
            const int nr = src->i8 ? n : run_length(src, p0, c0, n, 16);
            int64_t ldk = w;
            const uint16_t *kr = src->i8 ? sc->kb
                                         : rows_bf16(src, &src->k, s->b, p0 + c0, hk, nr, D, w,
                                                     sc->kb + c0 * w, &ldk);
            for (int c = 0, nc; c < nr; c += nc) {
                const int ch = chunk(ak, m);
                nc = nr - c < ch ? nr - c : ch;
                kn->qk_bf16(nc, mpad, (int)pairs(D), a->scale, kr + c * ldk, ldk,
                            (const uint32_t *)sc->q, R, sc->st + (c0 + c) * R, R);
                ask_rows(src, ak, nc);
            }
            c0 += nr;
            continue;
        }
        /* fp32 rows (more than rows_max of them): qk computes each key
           alone */
        const int nr = run_length(src, p0, c0, n, 4);
        int64_t ldk;
        const float *kr = rows_f32(kn, src, 0, s->b, p0 + c0, hk, nr, D, a->Hkv,
                                   sc->kw + c0 * D, &ldk);
        for (int c = 0, nc; c < nr; c += nc) {
            const int ch = chunk(ak, m);
            nc = nr - c < ch ? nr - c : ch;
            float *st = sc->st + (c0 + c) * R;
            kn->qk(nc, m, (int)D, a->scale, kr + c * ldk, ldk, sc->qt, R, sc->q, D, st, R);
            ask_rows(src, ak, nc);
        }
        c0 += nr;
    }
    if (job->bf && src->i8)   /* s = scale·q·(code·ks) */
        for (int c = 0; c < n; c++)
            for (int r = 0; r < mpad; r++)
                sc->st[c * R + r] *= sc->ksc[c];
}

/* acc = alpha·acc + P·V over keys p0 .. p0+n-1 (P in st, or as bf16 pairs
   in pp for the bf16 path, split in xp for f16t). bf16: the V rows are
   paired run by run into one buffer (f16t: split into pairs row by row),
   and one product takes the whole tile, so a paged cache's tile is the
   same call as a contiguous one's. fp32: run by run, the
   first call scaling acc by alpha, the later ones adding (alpha 1),
   which gives the bits of one call. */
static void tile_values(const dec_job *job, const qkv__seq *s, int64_t hk, int64_t p0, int n,
                        int m, const scratch *sc, row_asks *av)
{
    const qkv__attn *a = job->a;
    const kv_src *src = job->src;
    const qkv__kernels *kn = job->ctx->kernels;
    const int64_t Dv = a->Dv, R = job->R;
    if (job->f16t || job->bf) {
        /* P's pairs against V's, one product for the tile */
        const int np = (int)pairs(n);
        uint32_t *vp = job->f16t ? sc->xv : (uint32_t *)sc->vw;
        if (job->f16t) {   /* V pairs (vh; vl; vh) against P's (ph; ph; pl) */
            for (int jj = 0; jj < np; jj++) {
                const uint16_t *v0 = f16_row(src, &src->v, s->b, p0 + 2 * jj, hk, Dv, sc->xg);
                const uint16_t *v1 = 2 * jj + 1 < n ? f16_row(src, &src->v, s->b, p0 + 2 * jj + 1,
                                                              hk, Dv, sc->xg + Dv)
                                                    : NULL;
                kn->split_pairs_f16(v0, v1, Dv, vp + jj * Dv, vp + (np + jj) * Dv,
                                    vp + (2 * np + jj) * Dv);
                if (jj & 1)   /* every 4 keys */
                    ask_rows(src, av, 4);
            }
        }
        for (int c0 = 0; !job->f16t && c0 < n;) {
            /* pairs of keys counted from p0, as in the scores */
            const int nr = run_length(src, p0, c0, n, 2);
            int64_t ldv;
            const uint16_t *vr = src->i8 ? i8_rows(job, s->b, 1, p0 + c0, hk, nr, sc, c0, &ldv)
                                         : rows_bf16(src, &src->v, s->b, p0 + c0, hk, nr, Dv, Dv,
                                                     sc->vb + c0 * Dv, &ldv);
            for (int jj = 0; 2 * jj < nr; jj++) {
                kn->pack_pairs(vr + 2 * jj * ldv,
                               2 * jj + 1 < nr ? vr + (2 * jj + 1) * ldv : NULL, Dv,
                               vp + (c0 / 2 + jj) * Dv);
                if (jj & 1)   /* every 4 keys */
                    ask_rows(src, av, 4);
            }
            c0 += nr;
        }
        kn->pv_bf16(m, job->f16t ? 3 * np : np, (int)Dv, job->f16t ? sc->xp : sc->pp, R, vp, Dv,
                    sc->alpha, sc->acc, Dv);
        return;
    }
    for (int c0 = 0; c0 < n;) {
        const int ns = run_length(src, p0, c0, n, 1);   /* to the block's end */
        int64_t ldv;
        const float *vr = rows_f32(kn, src, 1, s->b, p0 + c0, hk, ns, Dv, a->Hkv, sc->vw, &ldv);
        kn->pv(m, ns, (int)Dv, sc->st + c0 * R, 1, R, vr, ldv, c0 ? sc->ones : sc->alpha,
               sc->acc, Dv);
        ask_rows(src, av, ns);
        c0 += ns;
    }
}

/* Writes row r's output and lse from its softmax state. */
static void store_row(const dec_job *job, const qkv__seq *s, const qkv__tile_map *tm, int r,
                      float m, float l, const float *acc)
{
    const qkv__attn *a = job->a;
    const qkv_tensor *out = a->out;
    const int64_t h = tm->h0 + r / tm->mp, i = tm->i0 + r % tm->mp;
    qkv__store_row(job->ctx->kernels, out,
                   s->b * out->stride[0] + i * out->stride[1] + h * out->stride[2],
                   out->stride[3], a->Dv, acc, !(l <= 0.0f) ? 1.0f / l : 0.0f);
    if (a->lse)   /* a NaN sum (a NaN score) stays NaN */
        a->lse[qkv__lse_index(a, s->b, h, i)] = !(l <= 0.0f) ? m + logf(l) : -INFINITY;
}

/* The online softmax update of rows 0..m-1 from the tile's maxima mx. */
static void new_max(const scratch *sc, int m)
{
    for (int r = 0; r < m; r++) {
        const float mn = sc->mx[r] > sc->m[r] ? sc->mx[r] : sc->m[r];
        sc->mref[r] = mn == -INFINITY ? 0.0f : mn;   /* all hidden: P = 0 */
        sc->alpha[r] = sc->m[r] == mn ? 1.0f : expf(sc->m[r] - sc->mref[r]);
        sc->m[r] = mn;
    }
}

/* n int8 rows of K (is_v 0) or V (positions p0.. of one block, head h)
   as bf16 codes in the tile's buffer at key offset c0, zero-padded to the
   kernels' width, and their scales into ksc / vsc; *ld the row stride.
   The scales multiply the scores (K) and P (V). */
static const uint16_t *i8_rows(const dec_job *job, int64_t b, int is_v, int64_t p0, int64_t h,
                               int n, const scratch *sc, int c0, int64_t *ld)
{
    const kv_src *src = job->src;
    const qkv_tensor *t = is_v ? &src->v : &src->k;
    const int64_t cols = is_v ? job->a->Dv : job->a->D, w = is_v ? cols : 2 * pairs(cols);
    uint16_t *dst = (is_v ? sc->vb : sc->kb) + c0 * w;
    const float *scales = is_v ? src->vs : src->ks;
    float *sk = (is_v ? sc->vsc : sc->ksc) + c0;
    const qkv__kernels *kn = job->ctx->kernels;
    const int8_t *data = t->data;
    if (one_block(src, p0, n))
        kn->cvt_i8_bf16(data + row_off(src, t, b, p0, h), t->stride[1], n, cols, dst, w);
    else
        for (int c = 0; c < n; c++)
            kn->cvt_i8_bf16(data + row_off(src, t, b, p0 + c, h), 0, 1, cols, dst + c * w, w);
    for (int c = 0; c < n; c++) {
        if (w > cols)
            dst[c * w + cols] = 0;
        sk[c] = scales[scale_idx(src, b, p0 + c, h, job->a->Hkv)];
    }
    *ld = w;
    return dst;
}

/* What head slot e of a task asks for while it works on a tile of n keys:
   its share of the next tile's rows of t (positions p .. p+next-1). Where
   the task's heads are adjacent rows ([S, Hkv, D] caches), slot e takes
   positions e/HB .. (e+1)/HB of the next tile, every head of each (one
   span per position); else its own head's rows. In a paged cache whose
   rows of a block are one run of lines, a share that starts a block takes
   each block it reaches as a run (bases, TILE_BLOCKS of them; the last
   may be asked for whole); else the share's first block. */
static qkv__pf next_rows(const dec_job *job, const qkv_tensor *t, int64_t b, int64_t hk0,
                         int64_t e, int64_t p, int64_t next, int64_t cols, int n,
                         const char **bases)
{
    const kv_src *src = job->src;
    qkv__pf pf;
    memset(&pf, 0, sizeof pf);
    const int64_t HB = job->HB;
    const int adj = HB > 1 && t->stride[2] == cols;
    int64_t lo = p, cnt = next, h = hk0 + e, span = cols * src->es;
    if (adj) {
        lo = p + next * e / HB;
        cnt = p + next * (e + 1) / HB - lo;
        h = hk0;
        span *= HB;
    }
    if (cnt <= 0 || t->stride[3] != 1)
        return pf;
    const int64_t r0 = row_in_block(src, lo), left = src->bs - r0;
    const uintptr_t at = (uintptr_t)((const char *)t->data + row_off(src, t, b, lo, h) * src->es);
    pf.base = (const char *)(at & ~(uintptr_t)63);
    pf.ld = t->stride[1] * src->es;
    pf.lines = (int32_t)((at % 64 + (uintptr_t)span + 63) / 64 + (pf.ld % 64 != 0));
    pf.rows = (int32_t)(cnt < left ? cnt : left);
    if (pf.ld == 64 * (int64_t)pf.lines) {   /* one run of lines per block */
        if (src->table && r0 == 0 && cnt > left) {
            int32_t nb = 0;
            for (int64_t q = lo; q < lo + cnt; q += src->bs)
                bases[nb++] = (const char *)t->data + row_off(src, t, b, q, h) * src->es;
            pf.bases = bases;
            pf.lines *= (int32_t)src->bs;
            pf.rows = nb;
        } else {
            pf.lines *= pf.rows;
            pf.rows = 1;
        }
    }
    const int64_t steps = (n + 3) / 4;
    pf.per4 = (int32_t)(((int64_t)pf.rows * pf.lines + steps - 1) / steps);
    return pf;
}

/* A few-row tile's scores done: times the keys' int8 scales (ksc; NULL:
   none), the score modifications, each row's maximum and the running
   maxima. */
static void scores_done(const dec_job *job, const qkv__seq *s, const qkv__tile_map *tm,
                        int64_t j0, int n, int m, int band, const scratch *sc, const float *ksc)
{
    const qkv__attn *a = job->a;
    if (ksc)   /* s = scale·q·(code·ks) */
        for (int r = 0; r < m; r++)
            for (int c = 0; c < n; c++)
                sc->st[r * BK + c] *= ksc[c];
    if (a->softcap > 0.0f || a->alibi || band)
        qkv__score_mods(a, s, tm, m, j0, n, band, sc->st, BK, 1, NULL);
    job->ctx->kernels->row_max(sc->st, BK, m, n, sc->mx);
    new_max(sc, m);
}

/* dst[c] = the scale of position p0 + c's row for kv head h, c < n: a
   head's scales lie heads_kv floats apart within a block, or together in
   a head-major pool. */
static void i8_scales(const dec_job *job, int64_t b, const float *scales, int64_t p0, int64_t h,
                      int n, float *dst)
{
    const kv_src *src = job->src;
    const int64_t Hkv = job->a->Hkv, ss = src->sstride;
    for (int c = 0; c < n;) {
        const int64_t left = src->table ? src->bs - row_in_block(src, p0 + c) : n - c;
        const int run = left < n - c ? (int)left : n - c;
        const float *s0 = scales + scale_idx(src, b, p0 + c, h, Hkv);
        if (ss == 1)
            memcpy(dst + c, s0, (size_t)run * sizeof *dst);
        else
            for (int x = 0; x < run; x++)
                dst[c + x] = s0[x * ss];
        c += run;
    }
}

/* The softmax of an int8 tile of n keys from j0 for kv head hk, its
   scores in sc->st: times the key scales, the masks and modifications,
   the online softmax update, and P times the V scales as int16 in p, on
   one scale for the tile (the largest V scale over 32767), which it
   returns; *nan_row is 1 where a V row held a value that is not finite. */
static float i8_softmax(const dec_job *job, const qkv__seq *s, const qkv__tile_map *tm,
                        int64_t hk, int64_t j0, int n, int m, int band, const scratch *sc,
                        int16_t *p, int *nan_row)
{
    const kv_src *src = job->src;
    i8_scales(job, s->b, src->ks, j0, hk, n, sc->ksc);
    scores_done(job, s, tm, j0, n, m, band, sc, sc->ksc);
    float vmax = 0.0f;
    *nan_row = 0;
    i8_scales(job, s->b, src->vs, j0, hk, n, sc->vsc);
    for (int c = 0; c < n; c++) {
        vmax = sc->vsc[c] > vmax ? sc->vsc[c] : vmax;
        *nan_row |= sc->vsc[c] != sc->vsc[c];
    }
    job->ctx->kernels->exp_rows_i16(sc->st, BK, m, n, sc->mref, sc->vsc,
                                    vmax > 0.0f ? 32767.0f / vmax : 0.0f, sc->sum, p, BK);
    for (int x = 0; x < m; x++)
        sc->l[x] = sc->l[x] * sc->alpha[x] + sc->sum[x];
    return vmax / 32767.0f;
}

/* acc NaN, as a weight times NaN would make it: P is int16 here. */
static void i8_nan(const scratch *sc, int m, int64_t Dv)
{
    for (int64_t x = 0; x < m * Dv; x++)
        sc->acc[x] = NAN;
}

/* pa's asks spread over the calls of m rows in groups of 16. */
static void spread_asks(qkv__pf *pa, int m)
{
    const int groups = (m + QKV__PAD - 1) / QKV__PAD;
    if (pa && groups > 1)
        pa->per4 = (pa->per4 + groups - 1) / groups;
}

/* The few-row kernels of a key tile of n keys from j0 for kv head hk
   (head_tile_rows, tile_streamed; all but int8 codes taken as bf16),
   keys j0+c .. j0+c+nc-1 at a time; sh: the scratch's shared buffers,
   pa: the lines to ask for meanwhile. The scores into sc->hst: */
static void rows_scores(const dec_job *job, const qkv__seq *s, int64_t hk, int64_t j0, int n,
                        int c, int nc, int m, const scratch *sc, const scratch *sh, qkv__pf *pa)
{
    const qkv__attn *a = job->a;
    const kv_src *src = job->src;
    const qkv__kernels *kn = job->ctx->kernels;
    const int64_t D = a->D, w = 2 * pairs(D);
    const char *blk[TILE_BLOCKS];
    qkv__rows r;
    if (job->i8dot) {   /* 16 rows a call (kernels.h dec_rows_max) */
        const int m4 = (m + 3) / 4 * 4;
        r = tile_rows(src, &src->k, s->b, j0 + c, hk, nc, D, sh->kb, blk);
        spread_asks(pa, m);
        for (int g = 0; g < m; g += QKV__PAD)
            kn->qk_i8_dec(nc, group_rows(m, g), (int)D, a->scale, &r,
                          queries_i16(sc) + g * D, D, query_scales(sc, m4, D) + g,
                          sc->hst + g * BK + c, BK, pa);
    } else if (job->f16s) {   /* each group's split queries at 32·D words */
        r = bf16_rows(src, &src->k, s->b, j0 + c, hk, nc, D, D, sh->kb, blk);
        spread_asks(pa, m);
        for (int g = 0; g < m; g += QKV__PAD)
            kn->qk_f16s_dec(nc, group_rows(m, g), (int)D, a->scale, &r,
                            (const uint32_t *)sc->q + g / QKV__PAD * 32 * D,
                            sc->hst + g * BK + c, BK, pa);
    } else if (job->f16) {
        r = tile_rows(src, &src->k, s->b, j0 + c, hk, nc, 2 * D, sh->kw, blk);
        kn->qk_f16_dec(nc, m, (int)D, a->scale, &r, sc->q, D, sc->hst + c, BK, pa);
    } else if (job->bf) {   /* 16 rows a call (kernels.h dec_rows_max) */
        r = bf16_rows(src, &src->k, s->b, j0 + c, hk, nc, D, w, sh->kb, blk);
        spread_asks(pa, m);
        for (int g = 0; g < m; g += QKV__PAD)
            kn->qk_bf16_dec(nc, group_rows(m, g), (int)pairs(D), a->scale, &r,
                            (const uint16_t *)sc->q + g * w, w, sc->hst + g * BK + c, BK, pa);
    } else {   /* fp32 rows, converted run by run where they are not fp32 */
        for (int c0 = c; c0 < c + nc;) {
            const int nr = run_until(src, j0, c0, c + nc, n, 4);
            int64_t ldk;
            const float *kr = rows_f32(kn, src, 0, s->b, j0 + c0, hk, nr, D, a->Hkv, sh->kw,
                                       &ldk);
            r = run_rows(kr, ldk * 4, blk);
            kn->qk_dec(nr, m, (int)D, a->scale, &r, sc->q, D, sc->hst + c0, BK, pa);
            c0 += nr;
        }
    }
}

/* ... and between them the scores' masks and the online softmax update,
   P into sc->hpp (bf16; int8 codes: int16, its scale and a non-finite V
   row's flag in sc->hps) or in place (fp32). */
static void rows_softmax(const dec_job *job, const qkv__seq *s, const qkv__tile_map *tm,
                         int64_t hk, int64_t j0, int n, int m, int band, const scratch *sc0)
{
    const qkv__kernels *kn = job->ctx->kernels;
    scratch sc = *sc0;
    sc.st = sc.hst;
    if (job->i8dot) {
        int nan_row;
        sc.hps[0] = i8_softmax(job, s, tm, hk, j0, n, m, band, &sc, (int16_t *)sc.hpp, &nan_row);
        sc.hps[1] = (float)nan_row;
        return;
    }
    scores_done(job, s, tm, j0, n, m, band, &sc, NULL);
    if (job->bf)
        kn->exp_rows_bf16(sc.hst, BK, m, n, sc.mref, NULL, sc.sum, (uint16_t *)sc.hpp, BK);
    else   /* P in place, fp32 */
        kn->exp_rows(sc.hst, BK, m, n, sc.mref, sc.sum);
    for (int x = 0; x < m; x++)
        sc.l[x] = sc.l[x] * sc.alpha[x] + sc.sum[x];
}

/* acc += P·V (P from rows_softmax), acc first times alpha when c is 0: */
static void rows_values(const dec_job *job, const qkv__seq *s, int64_t hk, int64_t j0, int n,
                        int c, int nc, int m, const scratch *sc, const scratch *sh, qkv__pf *pa)
{
    const qkv__attn *a = job->a;
    const kv_src *src = job->src;
    const qkv__kernels *kn = job->ctx->kernels;
    const int64_t Dv = a->Dv;
    const float *al = c ? NULL : sc->alpha;
    const char *blk[TILE_BLOCKS];
    qkv__rows r;
    if (job->i8dot) {
        r = tile_rows(src, &src->v, s->b, j0 + c, hk, nc, Dv, sh->vb, blk);
        spread_asks(pa, m);
        for (int g = 0; g < m; g += QKV__PAD)
            kn->pv_i8_dec(group_rows(m, g), nc, (int)Dv,
                          (const int16_t *)sc->hpp + g * BK + c, BK, &r, al ? al + g : NULL,
                          sc->hps[0], sc->acc + g * Dv, Dv, pa);
        if (c + nc == n && sc->hps[1] != 0.0f)
            i8_nan(sc, m, Dv);
    } else if (job->f16s) {
        r = bf16_rows(src, &src->v, s->b, j0 + c, hk, nc, Dv, Dv, sh->vb, blk);
        spread_asks(pa, m);
        for (int g = 0; g < m; g += QKV__PAD)
            kn->pv_f16s_dec(group_rows(m, g), nc, (int)Dv,
                            sc->hst + g * BK + c, BK, &r, al ? al + g : NULL, sc->acc + g * Dv,
                            Dv, pa);
    } else if (job->f16) {
        r = tile_rows(src, &src->v, s->b, j0 + c, hk, nc, 2 * Dv, sh->vw, blk);
        kn->pv_f16_dec(m, nc, (int)Dv, sc->hst + c, BK, &r, al, sc->acc, Dv, pa);
    } else if (job->bf) {
        r = bf16_rows(src, &src->v, s->b, j0 + c, hk, nc, Dv, Dv, sh->vb, blk);
        spread_asks(pa, m);
        for (int g = 0; g < m; g += QKV__PAD)
            kn->pv_bf16_dec(group_rows(m, g), nc, (int)Dv,
                            (const uint16_t *)sc->hpp + g * BK + c, BK, &r, al ? al + g : NULL,
                            sc->acc + g * Dv, Dv, pa);
    } else {   /* fp32 P·V run by run (alpha on the tile's first run:
                  the bits of one call), the next lines asked for as the
                  kernel goes (asked for between calls of 16 keys they
                  were not read any sooner) */
        for (int c0 = c; c0 < c + nc;) {
            const int nr = run_until(src, j0, c0, c + nc, n, 1);
            int64_t ldv;
            const float *vr = rows_f32(kn, src, 1, s->b, j0 + c0, hk, nr, Dv, a->Hkv, sh->vw,
                                       &ldv);
            r = run_rows(vr, ldv * 4, blk);
            kn->pv_f32_dec(m, nr, (int)Dv, sc->hst + c0, BK, &r, c0 ? NULL : sc->alpha,
                           sc->acc, Dv, pa);
            c0 += nr;
        }
    }
}

/* A key tile for a few rows (decoding) of kv head hk: scores
   query-major [m][BK] and the softmax along each row; then, with bf16
   (or int8) rows, P rounded to bf16 and P·V with the accumulators in
   registers, else fp32 P·V (rows_scores, rows_softmax, rows_values on
   the whole tile). The bf16 kernels take the tile's rows in place, block
   by block in a paged cache (gathered where they are not the kernels'
   width at a unit stride); fp32 and int8 rows converted run by run; int8
   codes read as codes on sets with int16 dot products. The kernels ask
   for the next tile's K (pfk) and V (pfv) lines as they go. Every cache
   layout gives the same bits. */
static void head_tile_rows(const dec_job *job, const qkv__seq *s, const qkv__tile_map *tm,
                           int64_t hk, int64_t j0, int n, int m, int band, const scratch *sc,
                           qkv__pf *pfk, qkv__pf *pfv)
{
    const qkv__attn *a = job->a;
    const kv_src *src = job->src;
    const qkv__kernels *kn = job->ctx->kernels;
    if (!(job->bf && src->i8 && !job->i8dot)) {
        rows_scores(job, s, hk, j0, n, 0, n, m, sc, sc, pfk);
        rows_softmax(job, s, tm, hk, j0, n, m, band, sc);
        rows_values(job, s, hk, j0, n, 0, n, m, sc, sc, pfv);
        return;
    }
    /* int8 codes as bf16: widened in the kernels (sets without a bf16
       dot), else converted to bf16 rows for the bf16 kernels */
    const int64_t D = a->D, Dv = a->Dv, w = 2 * pairs(D);
    const int i8f = kn->qk_i8f_dec != NULL;
    uint16_t *p = (uint16_t *)sc->pp;
    const char *blk[TILE_BLOCKS];
    qkv__rows r;
    if (i8f) {
        r = tile_rows(src, &src->k, s->b, j0, hk, n, D, sc->kb, blk);
        kn->qk_i8f_dec(n, m, (int)D, a->scale, &r, (const uint16_t *)sc->q, w, sc->st, BK, pfk);
        i8_scales(job, s->b, src->ks, j0, hk, n, sc->ksc);
    } else {
        for (int c0 = 0; c0 < n;) {
            const int nr = run_length(src, j0, c0, n, 1);
            int64_t ld;
            i8_rows(job, s->b, 0, j0 + c0, hk, nr, sc, c0, &ld);
            c0 += nr;
        }
        r = run_rows(sc->kb, w * 2, blk);
        kn->qk_bf16_dec(n, m, (int)pairs(D), a->scale, &r, (const uint16_t *)sc->q, w, sc->st,
                        BK, pfk);
    }
    scores_done(job, s, tm, j0, n, m, band, sc, sc->ksc);
    if (i8f)   /* the V scales, which P takes */
        i8_scales(job, s->b, src->vs, j0, hk, n, sc->vsc);
    else   /* the V codes and their scales */
        for (int c0 = 0; c0 < n;) {
            const int nr = run_length(src, j0, c0, n, 1);
            int64_t ldv;
            i8_rows(job, s->b, 1, j0 + c0, hk, nr, sc, c0, &ldv);
            c0 += nr;
        }
    kn->exp_rows_bf16(sc->st, BK, m, n, sc->mref, sc->vsc, sc->sum, p, BK);
    for (int x = 0; x < m; x++)
        sc->l[x] = sc->l[x] * sc->alpha[x] + sc->sum[x];
    if (i8f) {
        r = tile_rows(src, &src->v, s->b, j0, hk, n, Dv, sc->vb, blk);
        kn->pv_i8f_dec(m, n, (int)Dv, p, BK, &r, sc->alpha, sc->acc, Dv, pfv);
        return;
    }
    r = run_rows(sc->vb, Dv * 2, blk);
    kn->pv_bf16_dec(m, n, (int)Dv, p, BK, &r, sc->alpha, sc->acc, Dv, pfv);
}

/* Asks for the K and V scales of positions p .. p+n-1 of kv heads h ..
   h+nh-1 (an int8 pool), block by block: nh 1 in a head-major pool, where
   each head's scales are a run of their own; in a position-major one
   the heads' scales of a position are adjacent, so one call covers
   them all. */
static void prefetch_scales(const kv_src *src, int64_t b, int64_t h, int64_t nh, int64_t Hkv,
                            int64_t p, int64_t n)
{
    for (int64_t q = p; q < p + n;) {
        const int64_t left = src->table ? src->bs - row_in_block(src, q) : p + n - q;
        const int64_t run = left < p + n - q ? left : p + n - q;
        /* heads h .. h+nh-1 at rows q .. q+run-1: one span either way */
        const int64_t i = scale_idx(src, b, q, h, Hkv),
                      span = src->sstride == 1 ? (nh - 1) * src->bs + run
                                               : (run - 1) * src->sstride + nh;
        prefetch_span((const char *)(src->ks + i), span * (int64_t)sizeof(float), 2);
        prefetch_span((const char *)(src->vs + i), span * (int64_t)sizeof(float), 2);
        q += run;
    }
}

/* Position-major caches ([S, Hkv, D] rows, paged pools of that layout)
   and head-major pools with few rows per head take their key tiles in a
   streamed order (every dtype but int8 codes taken as bf16 by the bf16
   kernels): the task's kv heads walk the tile's K in sub-tiles
   (sub_keys), every head's scores of a sub-tile before the next (the
   positions' rows of all heads are one run, or a pool's blocks' runs of
   all heads are), then each head's softmax, then the V rows the same way;
   meanwhile each call asks for a share of the sub-tile one ahead in that
   order (the V rows' first after the last K sub-tile, the next tile's or
   next task's K after the last V). Head by head, each head would read a
   1/Hkv share of every position of the tile, the whole next tile (1 MiB
   at 8 heads of 128 bf16) being asked for meanwhile: measured on the
   Xeon (1x32768 and 8x8192, 32/8 heads), this order took 0.80x that
   time with bf16 rows, 0.83x with fp16, 0.90x with int8 codes and
   0.63-0.67x with fp32 rows. The kernels' calls split at multiples of 32
   keys give the bits of one call per tile (their contracts), so every
   layout still gives the same bits. Sub-tiles of 16 or 32 keys ran
   1.3-1.5x slower (fixed costs per call), 128 level with 64 (within 3%
   either way) for up to 8 rows; with 16 rows (4 new queries, more fixed
   cost per call) 128 took 0.90-0.93x the time of 64; int8 codes read as
   codes (half the bytes a key) take 128 too: 0.92-0.96x the time of 64
   (256: 0.96-0.99x). Asking two or three sub-tiles ahead took 1.03-1.25x the
   time, sub-tiles of a whole tile (the next tile asked for meanwhile)
   1.2x. Head-major pools of bf16 rows take 128 as well on the sets with
   tiles (dec_done set: their kernels pay for the tiles' setup per call):
   on the Xeon 128 took 0.92-0.97x the time of 64 there (fp16 rows 1.01x
   and fp32 rows 1.09-1.10x, which keep 64), and 1.01-1.02x on its
   avx512bf16 set (Zen 4: level). */
static int sub_keys(const dec_job *job, int m)
{
    const int tiles = job->ctx->kernels->dec_done != NULL;
    return m > 8 || job->i8dot || (job->bf && job->hm_pool && tiles) ? 128 : 64;
}

/* The positions after a tile that its last sub-tiles ask for: those of
   sequence b, kv heads from hk0, from p (cnt of them; 0: none). */
typedef struct {
    int64_t b, hk0, p, cnt;
} stream_next;

/* Unit u of a streamed tile of n keys from j0 in sub-tiles of `sub`
   keys: its K sub-tiles, then its V sub-tiles, then the first sub-tiles
   of nx (K). Returns 0 past them; else t (0 K, 1 V), the sequence, first
   kv head and positions. */
static int stream_unit(const qkv__seq *s, int64_t hk0, int64_t j0, int n, int sub,
                       const stream_next *nx, int64_t u, int *t, int64_t *b, int64_t *h,
                       int64_t *p, int64_t *cnt)
{
    const int64_t units = (n + sub - 1) / sub;
    int64_t first = j0, len = n, c = u % units * sub;
    *t = u >= units;
    *b = s->b;
    *h = hk0;
    if (u >= 2 * units) {
        c = (u - 2 * units) * sub;
        first = nx->p;
        len = nx->cnt;
        *t = 0;
        *b = nx->b;
        *h = nx->hk0;
    }
    if (c >= len)
        return 0;
    *p = first + c;
    *cnt = len - c < sub ? len - c : sub;
    return 1;
}

/* One key tile (keys j0 .. j0+n-1) of every kv head of the task in the
   streamed order (above): scores into each head's hst, the masks and
   the online softmax update head by head, P·V into each head's acc. */
static void tile_streamed(const dec_job *job, const qkv__seq *s, const qkv__tile_map *tm0,
                          int64_t hk0, int64_t j0, int n, int m, int band,
                          const stream_next *nx, float *base)
{
    const qkv__attn *a = job->a;
    const kv_src *src = job->src;
    const int64_t D = a->D, Dv = a->Dv;
    const int sub = sub_keys(job, m);
    const int64_t units = (n + sub - 1) / sub;
    const scratch sh = scratch_at(job, base, 0);
    for (int64_t u = 0; u < 2 * units; u++) {
        if (u == units)
            for (int64_t e = 0; e < job->HB; e++) {
                const scratch sc = scratch_at(job, base, e);
                qkv__tile_map tm = *tm0;
                tm.h0 = (hk0 + e) * a->group;
                rows_softmax(job, s, &tm, hk0 + e, j0, n, m, band, &sc);
            }
        const int is_v = u >= units;
        const int c = (int)(u % units) * sub, nc = n - c < sub ? n - c : sub;
        int at;
        int64_t ab, ah, ap, acnt;
        const int ask = stream_unit(s, hk0, j0, n, sub, nx, u + 1, &at, &ab, &ah, &ap, &acnt);
        if (ask && !at && src->i8)   /* the scales of every head, with their K rows */
            prefetch_scales(src, ab, ah, job->HB, a->Hkv, ap, acnt);
        for (int64_t e = 0; e < job->HB; e++) {
            const scratch sc = scratch_at(job, base, e);
            const char *bases[TILE_BLOCKS];
            qkv__pf pf;
            if (ask)
                pf = next_rows(job, at ? &src->v : &src->k, ab, ah, e, ap, acnt, at ? Dv : D,
                               nc, bases);
            if (is_v)
                rows_values(job, s, hk0 + e, j0, n, c, nc, m, &sc, &sh, ask ? &pf : NULL);
            else
                rows_scores(job, s, hk0 + e, j0, n, c, nc, m, &sc, &sh, ask ? &pf : NULL);
        }
    }
}

/* One key tile (keys j0 .. j0+n-1) for kv head hk: scores, masks and
   modifications, the online softmax update, P·V; meanwhile the next
   tile's K (ak) and V (av) rows are asked for. */
static void head_tile(const dec_job *job, const qkv__seq *s, const qkv__tile_map *tm,
                      int64_t hk, int64_t j0, int n, int m, int band, const scratch *sc,
                      row_asks *ak, row_asks *av)
{
    const qkv__attn *a = job->a;
    const qkv__kernels *kn = job->ctx->kernels;
    const int64_t R = job->R;
    const int mpad = (m + QKV__PAD - 1) / QKV__PAD * QKV__PAD;
    tile_scores(job, s, hk, j0, n, m, sc, ak);
    if (a->softcap > 0.0f || a->alibi || band)
        qkv__score_mods(a, s, tm, m, j0, n, band, sc->st, 1, R, NULL);
    for (int c = 0; c < n; c++)   /* qk, qk_bf16 may write the padding columns */
            for (int r = m; r < mpad; r++)
                sc->st[c * R + r] = -INFINITY;
    kn->col_max(sc->st, R, n, mpad, sc->mx);
    new_max(sc, mpad);
    if (job->bf && job->src->i8)   /* P times the V scales */
        i8_scales(job, s->b, job->src->vs, j0, hk, n, sc->vsc);
    if (job->bf)
        kn->exp_pack_bf16(sc->st, R, n, mpad, sc->mref, job->src->i8 ? sc->vsc : NULL, sc->sum,
                          sc->pp, R);
    else
        kn->exp_cols(sc->st, R, n, mpad, sc->mref, sc->sum);
    if (job->f16t)
        split_p(kn, sc, n, mpad, R);
    for (int r = 0; r < mpad; r++)
        sc->l[r] = sc->l[r] * sc->alpha[r] + sc->sum[r];
    tile_values(job, s, hk, j0, n, m, sc, av);
}

/* The keys klo .. khi-1 a task reads: those any row of its tile sees
   (the band is monotone in i), its part's share of them in whole key
   tiles; lo_last / hi_first bound the keys every row sees. */
static void task_keys(const dec_job *job, const qkv__seq *s, const qkv__tile_map *tm,
                      int64_t part, int64_t *klo, int64_t *khi, int64_t *lo_last,
                      int64_t *hi_first)
{
    const qkv__attn *a = job->a;
    qkv__key_range(a, s, tm->i0, klo, hi_first);
    qkv__key_range(a, s, tm->i0 + tm->mp - 1, lo_last, khi);
    if (*khi < *klo)
        *khi = *klo;
    const int64_t ns = job->split[s->b];
    if (ns > 1) {
        const int64_t per = ((*khi - *klo + ns - 1) / ns + BK - 1) / BK * BK;
        const int64_t lo = *klo + part * per;
        *khi = lo + per < *khi ? lo + per : *khi;
        *klo = lo < *khi ? lo : *khi;
    }
}

/* The first keys of the task this worker runs next (claimed now), for a
   task's last tile to ask for; cnt 0 when none is left. */
static void next_task_keys(const dec_job *job, int worker, stream_next *nx)
{
    nx->cnt = 0;
    const int64_t task = qkv__claim_next(job->ctx, worker);
    if (task < 0)
        return;
    job->asked[worker] = task;
    qkv__seq s;
    qkv__tile_map tm;
    int64_t part, klo, khi, lo_last, hi_first;
    task_of(job, task, &s, &nx->hk0, &tm, &part);
    task_keys(job, &s, &tm, part, &klo, &khi, &lo_last, &hi_first);
    nx->b = s.b;
    nx->p = klo;
    nx->cnt = khi - klo < BK ? khi - klo : BK;
}

/* Split-K task `task`'s partial state for head slot e of m rows: the
   maxima [m], the sums [m], then acc [m][Dv]. */
static float *part_state(const dec_job *job, int64_t task, int64_t e, int m)
{
    return job->part + task * job->part_size + e * m * (2 + job->a->Dv);
}

/* The rows head slot e asks for during a task's last tile: its share of
   the first tile of the task this worker runs next (claimed now), in
   *pfk and *pfv; empty when none is left. */
static void next_task_rows(const dec_job *job, int worker, int64_t e, int n, qkv__pf *pfk,
                           qkv__pf *pfv, const char **kbases, const char **vbases)
{
    stream_next nx;
    next_task_keys(job, worker, &nx);
    memset(pfk, 0, sizeof *pfk);
    memset(pfv, 0, sizeof *pfv);
    if (!nx.cnt)
        return;
    *pfk = next_rows(job, &job->src->k, nx.b, nx.hk0, e, nx.p, nx.cnt, job->a->D, n, kbases);
    *pfv = next_rows(job, &job->src->v, nx.b, nx.hk0, e, nx.p, nx.cnt, job->a->Dv, n, vbases);
}

static void dec_task(void *arg, int64_t task, int worker)
{
    const dec_job *job = arg;
    const qkv__attn *a = job->a;
    qkv__seq s;
    qkv__tile_map tm0;
    int64_t hk0, part;
    task_of(job, task, &s, &hk0, &tm0, &part);
    const int m = tm0.mp * (int)a->group;
    const int mpad = (m + QKV__PAD - 1) / QKV__PAD * QKV__PAD;
    const int64_t Dv = a->Dv;
    float *base = job->ctx->scratch[worker];

    for (int64_t e = 0; e < job->HB; e++) {
        const scratch sc = scratch_at(job, base, e);
        qkv__tile_map tm = tm0;
        tm.h0 = (hk0 + e) * a->group;
        load_queries(job, &s, &tm, m, &sc);
        memset(sc.acc, 0, (size_t)m * (size_t)Dv * sizeof(float));
        for (int r = 0; r < mpad; r++) {
            sc.m[r] = -INFINITY;
            sc.l[r] = 0.0f;
        }
    }
    const scratch sh = scratch_at(job, base, 0);
    for (int r = 0; r < mpad; r++)
        sh.ones[r] = 1.0f;
    const int rows = m <= job->rows_max;   /* head_tile_rows */
    const int streamed = rows && job->HB > 1 && !(job->bf && job->src->i8 && !job->i8dot);

    int64_t klo, khi, lo_last, hi_first;
    task_keys(job, &s, &tm0, part, &klo, &khi, &lo_last, &hi_first);
    const int64_t ns = job->split[s.b];

    /* tile by tile, head by head; meanwhile the next tile's rows are
       asked for, spread evenly over the kernel calls of this one, and
       during the last tile (few-row tiles) the first tile of the task this
       worker claims next. A task whose first tile was not asked for that
       way asks for it at once, and its first tile waits for it: 1 thread,
       1x32768 bf16 in 64 tasks, 2-3% of the time. */
    if (job->asked[worker] != task)
        prefetch_rows(job->src, s.b, hk0, job->HB, klo, streamed ? sub_keys(job, m) : BK, khi, a->D,
                      Dv);
    for (int64_t j0 = klo; j0 < khi; j0 += BK) {
        const int n = (int)(khi - j0 < BK ? khi - j0 : BK);
        const int band = !(lo_last <= j0 && hi_first >= j0 + n);
        const int64_t next = khi - j0 - n < BK ? khi - j0 - n : BK;
        if (streamed) {
            stream_next nx = { s.b, hk0, j0 + n, next };
            if (!next)
                next_task_keys(job, worker, &nx);
            tile_streamed(job, &s, &tm0, hk0, j0, n, m, band, &nx, base);
            continue;
        }
        for (int64_t e = 0; e < job->HB; e++) {
            qkv__tile_map tm = tm0;
            tm.h0 = (hk0 + e) * a->group;
            const scratch sc = scratch_at(job, base, e);
            if (rows) {
                qkv__pf pfk, pfv;
                const char *kbases[TILE_BLOCKS], *vbases[TILE_BLOCKS];
                if (next > 0) {
                    if (job->i8dot && job->src->sstride == 1)
                        prefetch_scales(job->src, s.b, hk0 + e, 1, a->Hkv, j0 + n, next);
                    else if (job->i8dot && e == 0)   /* every head's, once */
                        prefetch_scales(job->src, s.b, hk0, job->HB, a->Hkv, j0 + n, next);
                    pfk = next_rows(job, &job->src->k, s.b, hk0, e, j0 + n, next, a->D, n,
                                    kbases);
                    pfv = next_rows(job, &job->src->v, s.b, hk0, e, j0 + n, next, Dv, n,
                                    vbases);
                } else {
                    next_task_rows(job, worker, e, n, &pfk, &pfv, kbases, vbases);
                }
                head_tile_rows(job, &s, &tm, hk0 + e, j0, n, m, band, &sc, &pfk, &pfv);
            } else {
                /* many rows: a head-major cache's rows, one run a head,
                   come faster without the asks (two threads, 1,8,16384
                   and 1,16,16384 bf16: 0.77-0.92x the time; the other
                   layouts took 1.0-1.25x without) */
                const int64_t ask_end = job->hm_cache ? j0 + n : j0 + n + next;
                row_asks ak = { &job->src->k, s.b, hk0 + e, j0 + n, ask_end, a->D };
                row_asks av = { &job->src->v, s.b, hk0 + e, j0 + n, ask_end, Dv };
                head_tile(job, &s, &tm, hk0 + e, j0, n, m, band, &sc, &ak, &av);
            }
        }
    }

    for (int64_t e = 0; e < job->HB; e++) {
        const scratch sc = scratch_at(job, base, e);
        qkv__tile_map tm = tm0;
        tm.h0 = (hk0 + e) * a->group;
        if (ns == 1) {
            for (int r = 0; r < m; r++)
                store_row(job, &s, &tm, r, sc.m[r], sc.l[r], sc.acc + r * Dv);
            continue;
        }
        float *pm = part_state(job, task, e, m);
        float *pl = pm + m, *pacc = pl + m;
        memcpy(pm, sc.m, (size_t)m * sizeof *pm);
        memcpy(pl, sc.l, (size_t)m * sizeof *pl);
        memcpy(pacc, sc.acc, (size_t)m * (size_t)Dv * sizeof *pacc);
    }
    if (job->ctx->kernels->dec_done)
        job->ctx->kernels->dec_done();
}

/* Merges the key parts of one tile in part order, head by head and row by
   row: M = max m_p,  l = Σ l_p·e^(m_p - M),  acc = Σ acc_p·e^(m_p - M). */
static void merge_task(void *arg, int64_t tile, int worker)
{
    const dec_job *job = arg;
    const qkv__attn *a = job->a;
    int64_t b = 0;
    while (job->tstart[b + 1] <= tile)
        b++;
    const int64_t ns = job->split[b];
    if (ns == 1)
        return;
    /* part p of the tile is task first + p·nt */
    const int64_t nt = job->tstart[b + 1] - job->tstart[b];
    const int64_t first = job->start[b] + tile - job->tstart[b];
    qkv__seq s;
    qkv__tile_map tm;
    int64_t hk0, part;
    task_of(job, first, &s, &hk0, &tm, &part);
    const int m = tm.mp * (int)a->group;
    const int64_t Dv = a->Dv;
    float *acc = job->ctx->scratch[worker];
    for (int64_t e = 0; e < job->HB; e++) {
        tm.h0 = (hk0 + e) * a->group;
        for (int r = 0; r < m; r++) {
            float mx = -INFINITY, l = 0.0f;
            for (int64_t p = 0; p < ns; p++) {
                const float mp = part_state(job, first + p * nt, e, m)[r];
                mx = mp > mx ? mp : mx;
            }
            memset(acc, 0, (size_t)Dv * sizeof *acc);
            for (int64_t p = 0; p < ns && mx > -INFINITY; p++) {
                const float *pm = part_state(job, first + p * nt, e, m);
                if (pm[r] == -INFINITY)
                    continue;
                const float wgt = expf(pm[r] - mx);
                const float *pacc = pm + 2 * m + r * Dv;
                l += pm[m + r] * wgt;
                for (int64_t c = 0; c < Dv; c++)
                    acc[c] += pacc[c] * wgt;
            }
            store_row(job, &s, &tm, r, mx, l, acc);
        }
    }
}

/* Key parts per tile for each sequence: 1 when the call has enough
   (sequence, kv head, query tile) tiles to share out, else enough parts
   to reach about MIN_TASKS of them, each part at least MIN_KEYS keys. A
   part's first key tile has nothing to overlap its reads with (its rows
   are asked for when the part starts), so parts span at least 16 tiles:
   with all 8 kv heads of a position-major cache in a task and tiles of
   128 keys, parts of 512 keys read 1x32768 bf16 at 13 GB/s on one
   thread, parts of 2048 at 16. A function of the problem alone, not of
   the cache's layout (how many kv heads a task takes), so every layout
   of the same cache, paged or not, gives the same bits. */
static void split_counts(const qkv__attn *a, const kv_src *src, int64_t n_qt, int64_t *split)
{
    enum { MIN_TASKS = 64, MIN_KEYS = 16 * BK, MAX_SPLIT = 64 };
    const int64_t tiles = a->B * a->Hkv * n_qt;
    const int64_t want = tiles >= MIN_TASKS ? 1 : (MIN_TASKS + tiles - 1) / tiles;
    for (int64_t b = 0; b < a->B; b++) {
        int64_t n = seq_len(src, b) / MIN_KEYS;
        if (n > want) n = want;
        if (n > MAX_SPLIT) n = MAX_SPLIT;
        split[b] = n > 1 ? n : 1;
    }
}

/* Rows a kv head (new queries times query heads per kv head) from which a
   chunk of new queries from a bf16 or fp16 cache of its own dtype runs
   through the forward on a set with whole tiles (AMX): K and V packed
   once a call into the tiles' layouts and the fused tile kernel, where a
   task here pairs V and rounds P again for every tile of 64 rows. Xeon
   with AMX, 2 threads, 32/8 heads, D 128, against this path: 1,128,8192
   (512 rows) 0.81x the time in bf16 and 0.92x in fp16, 1,256,8192 0.69x
   and 0.81x; at 4,64,4096 (256 rows) 1.00x and 1.14x. */
enum { CHUNK_ROWS = 512 };

/* Whether the call runs through the forward: a chunk of CHUNK_ROWS, and
   the forward's packed copy (and a paged cache's gathered one) within
   what the context keeps between calls, so that a chunk over a large
   batch of long caches does not take a transient copy of them all. */
static int chunk_forward(const qkv_ctx *ctx, const qkv__attn *a, const kv_src *src)
{
    if (!ctx->kernels->qk_tiles || src->i8 || (a->dt != QKV_BF16 && a->dt != QKV_F16) ||
        src->k.dtype != a->dt || src->v.dtype != a->dt || a->Sq * a->group < CHUNK_ROWS)
        return 0;
    qkv__attn f = *a;   /* the sequences' lengths as the forward will see them */
    f.lens_k = src->lens;
    const size_t bytes = qkv__forward_packed_bytes(ctx, &f);
    return bytes > 0 && bytes <= QKV__KEEP_BYTES;
}

/* A paged cache's rows gathered into contiguous k and v, block by block:
   task t copies block t - first[b] of sequence b. */
typedef struct {
    const kv_src *src;
    int64_t       B, Hkv;
    qkv_tensor    k, v;
    int64_t      *first;   /* [B+1] */
} gather_job;

static void gather_task(void *arg, int64_t task, int worker)
{
    const gather_job *g = arg;
    const kv_src *src = g->src;
    (void)worker;
    int64_t b = 0;
    while (g->first[b + 1] <= task)
        b++;
    const int64_t p0 = (task - g->first[b]) * src->bs, len = seq_len(src, b);
    const int64_t n = len - p0 < src->bs ? len - p0 : src->bs, es = src->es;
    for (int pass = 0; pass < 2; pass++) {
        const qkv_tensor *t = pass ? &src->v : &src->k, *d = pass ? &g->v : &g->k;
        const int64_t cols = t->shape[3];
        for (int64_t h = 0; h < g->Hkv; h++) {
            const char *from = (const char *)t->data + row_off(src, t, b, p0, h) * es;
            char *to = (char *)d->data +
                       (b * d->stride[0] + p0 * d->stride[1] + h * d->stride[2]) * es;
            if (t->stride[1] == d->stride[1] && t->stride[2] == cols &&
                t->stride[1] == g->Hkv * cols) {
                /* position-major: the block's rows of every head, one run */
                memcpy(to, from, (size_t)(n * g->Hkv * cols * es));
                break;
            }
            if (t->stride[1] == cols && d->stride[1] == cols) {   /* head-major: the head's run */
                memcpy(to, from, (size_t)(n * cols * es));
                continue;
            }
            for (int64_t r = 0; r < n; r++)
                memcpy(to + r * d->stride[1] * es, from + r * t->stride[1] * es,
                       (size_t)(cols * es));
        }
    }
}

/* The call through the forward, each sequence's cached rows as its keys:
   a contiguous cache in place, a paged one's rows gathered into one
   contiguous copy first (head-major or position-major as the pool is),
   both as [B, L, Hkv, D] with L the longest sequence, so that either
   gives the same bits. QKV_ERR_NOMEM where the copy cannot be allocated
   (the caller then decodes tile by tile). */
static qkv_status run_forward(qkv_ctx *ctx, const qkv__attn *a, const kv_src *src)
{
    int64_t L = 0;
    for (int64_t b = 0; b < a->B; b++)
        L = seq_len(src, b) > L ? seq_len(src, b) : L;
    qkv_tensor k = src->k, v = src->v;
    char *copy = NULL;
    if (src->table) {
        int64_t rows, kb, vb;
        if (__builtin_mul_overflow(a->B, L, &rows) || __builtin_mul_overflow(rows, a->Hkv, &rows) ||
            __builtin_mul_overflow(rows, a->D * src->es, &kb) ||
            __builtin_mul_overflow(rows, a->Dv * src->es, &vb) || kb > INT64_MAX - vb)
            return QKV_ERR_NOMEM;
        gather_job g = { src, a->B, a->Hkv, k, v, malloc((size_t)(a->B + 1) * sizeof(int64_t)) };
        if (!g.first || !(copy = qkv__shared_get(ctx, QKV__SHARED_GATHER, (size_t)(kb + vb)))) {
            free(g.first);
            return QKV_ERR_NOMEM;
        }
        g.k = qkv_tensor_4d(copy, a->dt, a->B, L, a->Hkv, a->D);
        g.v = qkv_tensor_4d(copy + kb, a->dt, a->B, L, a->Hkv, a->Dv);
        if (src->k.stride[1] == a->D) {   /* a head-major pool: [B, Hkv, L, D] */
            g.k.stride[1] = a->D;
            g.k.stride[2] = L * a->D;
            g.v.stride[1] = a->Dv;
            g.v.stride[2] = L * a->Dv;
        }
        g.first[0] = 0;
        for (int64_t b = 0; b < a->B; b++)
            g.first[b + 1] = g.first[b] + (seq_len(src, b) + src->bs - 1) / src->bs;
        qkv__parallel(ctx, g.first[a->B], 0.0, gather_task, &g);
        free(g.first);
        k = g.k;
        v = g.v;
    }
    k.shape[1] = v.shape[1] = L;
    qkv__attn f = *a;
    f.k = &k;
    f.v = &v;
    f.Sk = L;
    f.lens_k = src->lens;
    const qkv_status st = qkv__forward_run(ctx, &f);
    if (copy)
        qkv__shared_done(ctx, QKV__SHARED_GATHER);
    return st;
}

static qkv_status run(qkv_ctx *ctx, const qkv__attn *a, const kv_src *src, int cache_bf16)
{
    /* bounds that keep the scratch arithmetic far from overflow */
    if (a->D > (1 << 20) || a->Dv > (1 << 20))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "%s: head_dim above 1048576",
                         a->D > (1 << 20) ? "q->shape[3]" : "head_dim_v");
    if (a->group > (1 << 20))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED,
                         "q->shape[2]: more than 1048576 query heads per kv head");
    if (chunk_forward(ctx, a, src)) {
        const qkv_status st = run_forward(ctx, a, src);
        if (st != QKV_ERR_NOMEM)
            return st;
        ctx->err[0] = 0;
    }
    dec_job job;
    memset(&job, 0, sizeof job);
    job.ctx = ctx;
    job.a = a;
    job.src = src;
    job.P = qkv__tile_positions(a->group);
    if (job.P > a->Sq)
        job.P = a->Sq;
    job.R = (job.P * a->group + QKV__PAD - 1) / QKV__PAD * QKV__PAD;
    /* bf16 rows read in place: dot products along d for a few rows (sets
       without a bf16 dot widen them in registers), on query pairs for
       more (chunked prefill, as the forward's bf16 path: sets with one) */
    job.rows_max = ctx->kernels->qk_bf16 ? PAIRS_ROWS : FMA_ROWS;
    job.bf = cache_bf16 && a->dt == QKV_BF16 && ctx->kernels->qk_bf16_dec &&
             (job.P * a->group <= job.rows_max || ctx->kernels->qk_bf16);
    /* int8 codes are exact in bf16: with bf16 queries and few rows per
       tile they take head_tile_rows too, scales applied to the scores and
       to P; more rows take the forward's bf16 kernels the same way */
    if (src->i8 && a->dt == QKV_BF16 && ctx->kernels->qk_bf16_dec &&
        (job.P * a->group <= job.rows_max || ctx->kernels->qk_bf16))
        job.bf = 1;
    const int64_t rows = job.P * a->group;
    /* sets whose few-row kernels take up to 16 rows on tiles: tiles of up
       to dec_rows_max rows of bf16 or of int8 codes read as codes, and up
       to f16s_rows_max of fp16, call them 16 rows at a time (rows_scores,
       rows_values; rows_max raised below) */
    const int grouped = ctx->kernels->dec_rows_max > job.rows_max;
    /* fp16 rows: on sets with bf16 tiles, tiles of more than
       f16s_rows_min rows split the values into pairs of bf16 (with fp16
       or bf16 queries, which split exactly as well; whatever the strides,
       for the same bits in every layout); else read in place at a unit
       stride, up to the set's row limit */
    job.f16s = !src->i8 && src->k.dtype == QKV_F16 && src->v.dtype == QKV_F16 &&
               ctx->kernels->qk_f16s_dec && rows > ctx->kernels->f16s_rows_min &&
               rows <= (grouped ? ctx->kernels->f16s_rows_max
                                : job.rows_max < 16 ? job.rows_max : 16) &&
               (a->dt == QKV_F16 || a->dt == QKV_BF16) &&
               a->D % 16 == 0 && a->D <= 256 && a->Dv % 16 == 0 && a->Dv <= 256;
    /* more rows (chunked prefill, verification of more than 4 tokens):
       the forward's bf16 tile kernels on fp16 split into bf16, three
       times the products (fp32 queries keep the fp32 kernels: split,
       they would keep 16 of their bits); only tiles of more than rows_max
       rows (head_tile) take them */
    job.f16t = !job.f16s && !src->i8 && src->k.dtype == QKV_F16 && src->v.dtype == QKV_F16 &&
               rows > job.rows_max && (a->dt == QKV_F16 || a->dt == QKV_BF16) &&
               ctx->kernels->split_f16 && ctx->kernels->qk_tiles;
    job.f16 = !job.f16s && !src->i8 && src->k.dtype == QKV_F16 && src->v.dtype == QKV_F16 &&
              src->k.stride[3] == 1 && src->v.stride[3] == 1 && ctx->kernels->qk_f16_dec &&
              (!ctx->kernels->f16_rows_max || rows <= ctx->kernels->f16_rows_max);
    /* where the set has int16 dot products, the codes are read as they
       are (d up to 256 keeps the int32 sums of the scores exact), with
       bf16 or fp16 queries: their rows on an int16 scale each and P on one
       per tile are within those dtypes' tolerances; fp32 queries keep
       dequantized fp32 arithmetic */
    job.i8dot = src->i8 && ctx->kernels->qk_i8_dec && a->D % 32 == 0 && a->D <= 256 &&
                a->Dv % 32 == 0 &&
                rows <= (grouped && !ctx->kernels->i8_rows_max ? ctx->kernels->dec_rows_max
                                                               : job.rows_max) &&
                (a->dt == QKV_BF16 ? job.bf : a->dt == QKV_F16) &&
                (!ctx->kernels->i8_rows_max || rows <= ctx->kernels->i8_rows_max);
    if (grouped && ((job.bf && !src->i8) || job.i8dot || job.f16s))
        job.rows_max = ctx->kernels->dec_rows_max;
    /* sets with a bf16 dot and no tiles: the many-row scores run their
       lanes along the queries, 16 at a time, so a tile of 17-64 bf16 rows
       computes them rounded up to 16; where that is 6/5 of the rows or
       more, the few-row kernels take the tile 16 rows at a time instead,
       with the next tile's rows asked for as they go. Zen 4, 2 threads,
       1,Sq,16384 from memory, against the many-row kernels: 20 rows
       0.74-0.83x the time (head-major or position-major pools of 16
       positions a block: 0.80x), 24 rows 0.82x, 36 0.84-0.88x, 40
       0.92-0.97x, 52 0.95x; from the L3 (1,Sq,2048) 20 rows 0.87x, 24
       0.97x, 36 0.99x, 40 1.08x. Where fewer are computed for nothing
       the many-row kernels stay: 32 rows took 0.90-0.95x from a
       head-major cache but 1.05-1.07x from pools and 1.08x from the L3;
       48 rows 0.95x and 1.07x; 64 rows 1.04-1.09x and 1.13x. */
    const int64_t rows16 = (rows + QKV__PAD - 1) / QKV__PAD * QKV__PAD;
    if (!grouped && job.bf && !src->i8 && ctx->kernels->qk_bf16 && rows > job.rows_max &&
        rows <= DEC_GROUPS_MAX && 6 * rows <= 5 * rows16)
        job.rows_max = (int)rows;
    /* rows of one head that follow each other for the whole sequence
       ([B, Hkv, S, D] caches): one stream per head, a task per head. In a
       head-major pool they follow each other for one block only (a run of
       block_size rows per head): with few rows per head and long
       sequences (POOL_HEADS_ROWS, POOL_HEADS_KEYS) a task takes every
       head, and each block's runs are read together */
    int64_t longest = 0;
    for (int64_t b = 0; b < a->B; b++)
        longest = seq_len(src, b) > longest ? seq_len(src, b) : longest;
    const int head_rows = src->k.stride[1] == a->D && src->v.stride[1] == a->Dv;
    job.hm_pool = src->table && head_rows;
    job.hm_cache = !src->table && head_rows;
    const int streams = head_rows && !(job.hm_pool && job.P * a->group <= POOL_HEADS_ROWS &&
                                       longest > POOL_HEADS_KEYS);
    const int64_t n_qt = (a->Sq + job.P - 1) / job.P;
    const size_t nb = (size_t)a->B;
    job.start = malloc((2 * (nb + 1) + nb + (size_t)ctx->n_threads) * sizeof(int64_t));
    if (!job.start)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "ctx: cannot allocate the task table");
    job.tstart = job.start + nb + 1;
    job.split = job.tstart + nb + 1;
    job.asked = job.split + nb;
    for (int w = 0; w < ctx->n_threads; w++)
        job.asked[w] = -1;
    split_counts(a, src, n_qt, job.split);
    int64_t parts = 0;
    for (int64_t b = 0; b < a->B; b++)
        parts += job.split[b];
    /* kv heads per task: with few rows per head (decode: up to 16, or the
       tiles up to dec_rows_max that take the few-row kernels 16 rows at a
       time) and rows that do not stream, as many as keep their states
       within 1 MiB and leave a task for each thread; else (a stream per
       head, or chunked prefill) one. Position-major bf16 on the Xeon
       (1x16384, 32/8 heads, 2 threads): with 5 and 8 new queries (20 and
       32 rows a head) 0.78-0.81x the time of a task per head, with 16 (64
       rows, 4 heads a task) 0.94x. A short cache of one sequence is not
       split, and all its heads in one task left the other threads idle:
       with a task per thread, 1x1024 and 1x4096 (32/8 heads, 2 threads) from position-major
       caches and pools took 0.58-0.66x the time. Four tasks a thread took
       2x at 1x8192 from a position-major pool, each task reading a
       quarter of every position's rows. The results do not depend on
       it. */
    job.HB = 1;
    if (!streams && rows <= (job.rows_max > QKV__PAD ? job.rows_max : QKV__PAD))
        for (int64_t hb = a->Hkv; hb > 1; hb--)
            if (a->Hkv % hb == 0 && hb * head_floats(job.R, a->D, a->Dv) * 4 <= (1 << 20) &&
                a->Hkv / hb * n_qt * parts >= ctx->n_threads) {
                job.HB = hb;
                break;
            }
    const int64_t n_hb = a->Hkv / job.HB;
    qkv_status st = qkv__scratch_reserve(ctx, (size_t)(shared_floats(job.R, a->D, a->Dv, job.f16t) +
                                         job.HB * head_floats(job.R, a->D, a->Dv)) * sizeof(float));
    if (st) {
        free(job.start);
        return st;
    }
    job.start[0] = job.tstart[0] = 0;
    double work = 0.0;
    for (int64_t b = 0; b < a->B; b++) {
        job.tstart[b + 1] = job.tstart[b] + n_hb * n_qt;
        job.start[b + 1] = job.start[b] + n_hb * n_qt * job.split[b];
        work += 2.0 * (double)(a->D + a->Dv) * (double)a->Hq * (double)a->Sq *
                (double)seq_len(src, b);
    }
    const int64_t tasks = job.start[a->B];
    int split = 0;
    for (int64_t b = 0; b < a->B; b++)
        split |= job.split[b] > 1;
    if (split) {
        job.part_size = job.HB * job.P * a->group * (2 + a->Dv);
        job.part = malloc((size_t)tasks * (size_t)job.part_size * sizeof(float));
        if (!job.part) {
            free(job.start);
            return qkv__fail(ctx, QKV_ERR_NOMEM, "ctx: cannot allocate split-K partial results");
        }
    }
    qkv__parallel(ctx, tasks, work, dec_task, &job);
    if (split)
        qkv__parallel(ctx, job.tstart[a->B], 0.0, merge_task, &job);
    free(job.part);
    free(job.start);
    return QKV_OK;
}

/* ---- contiguous cache ------------------------------------------------------ */

qkv_status qkv_attention_kvcache(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k_cache, const qkv_tensor *v_cache, const int32_t *seqlens_k,
        const qkv_attn_opts *opts, qkv_tensor *out, float *lse)
{
    if (!ctx)
        return QKV_ERR_NULL;
    ctx->err[0] = 0;
    qkv_status st;
    if ((st = qkv__check_tensor(ctx, k_cache, "k_cache")) ||
        (st = qkv__check_tensor(ctx, v_cache, "v_cache")))
        return st;
    if (v_cache->dtype != k_cache->dtype)
        return qkv__fail(ctx, QKV_ERR_DTYPE, "v_cache->dtype differs from k_cache->dtype");
    for (int d = 0; d < 3; d++)
        if (v_cache->shape[d] != k_cache->shape[d])
            return qkv__fail(ctx, QKV_ERR_SHAPE, "v_cache->shape[%d] = %lld differs from "
                             "k_cache->shape[%d] = %lld", d, (long long)v_cache->shape[d], d,
                             (long long)k_cache->shape[d]);
    const int64_t Smax = k_cache->shape[1];
    qkv__attn a;
    if ((st = qkv__attn_check_cache(ctx, q, opts, out, lse, Smax, k_cache->shape[2],
                                    k_cache->shape[3], v_cache->shape[3], "k_cache", &a)))
        return st;
    if (k_cache->shape[0] != a.B)
        return qkv__fail(ctx, QKV_ERR_SHAPE, "k_cache->shape[0] = %lld differs from "
                         "q->shape[0] = %lld (batch)", (long long)k_cache->shape[0],
                         (long long)a.B);
    for (int64_t b = 0; seqlens_k && b < a.B; b++)
        if (seqlens_k[b] < 0 || seqlens_k[b] > Smax)
            return qkv__fail(ctx, QKV_ERR_SHAPE, "seqlens_k[%lld] = %d is outside [0, "
                             "k_cache->shape[1] = %lld]", (long long)b, (int)seqlens_k[b],
                             (long long)Smax);
    kv_src src;
    memset(&src, 0, sizeof src);
    src.k = *k_cache;
    src.v = *v_cache;
    src.bs = Smax;
    src.es = (int64_t)qkv_dtype_size(k_cache->dtype);
    src.lens = seqlens_k;
    return run(ctx, &a, &src, k_cache->dtype == QKV_BF16);
}

/* ---- paged cache ------------------------------------------------------------ */

#define FAIL(st, ...) return qkv__fail(ctx, st, __VA_ARGS__)

/* The cache description: pointers, dtype, sizes, and pools whose byte size
   fits in int64; fills src's views (without table and lengths). */
static qkv_status check_paged(qkv_ctx *ctx, const qkv_paged_cache *c, kv_src *src)
{
    if (!c)
        FAIL(QKV_ERR_NULL, "cache: NULL");
    if (!c->k || !c->v)
        FAIL(QKV_ERR_NULL, "cache->%s: NULL pool", c->k ? "v" : "k");
    const int i8 = c->dtype == QKV_KV_I8;
    if (!i8 && c->dtype != QKV_KV_F32 && c->dtype != QKV_KV_F16 && c->dtype != QKV_KV_BF16)
        FAIL(QKV_ERR_DTYPE, "cache->dtype = %d is not a qkv_kv_dtype", (int)c->dtype);
    if (i8 && (!c->k_scale || !c->v_scale))
        FAIL(QKV_ERR_NULL, "cache->%s: NULL with QKV_KV_I8", c->k_scale ? "v_scale" : "k_scale");
    if (c->head_major != 0 && c->head_major != 1)
        FAIL(QKV_ERR_ARG, "cache->head_major = %d must be 0 or 1", c->head_major);
    if (c->block_size < 8 || c->block_size > 256 || (c->block_size & (c->block_size - 1)))
        FAIL(QKV_ERR_ARG, "cache->block_size = %lld must be a power of two from 8 to 256",
             (long long)c->block_size);
    static const char *const name[4] = { "n_blocks", "heads_kv", "head_dim", "head_dim_v" };
    const int64_t size[4] = { c->n_blocks, c->heads_kv, c->head_dim, c->head_dim_v };
    for (int i = 0; i < 4; i++)
        if (size[i] <= 0)
            FAIL(QKV_ERR_ARG, "cache->%s = %lld must be positive", name[i], (long long)size[i]);
    const int64_t es = i8 ? 1 : (int64_t)qkv_dtype_size((qkv_dtype)c->dtype);
    for (int v = 0; v < 2; v++) {
        int64_t n;
        if (__builtin_mul_overflow(c->n_blocks, c->block_size, &n) ||
            __builtin_mul_overflow(n, c->heads_kv, &n) ||
            __builtin_mul_overflow(n, v ? c->head_dim_v : c->head_dim, &n) ||
            __builtin_mul_overflow(n, es, &n) || (uint64_t)n > SIZE_MAX)
            FAIL(QKV_ERR_OVERFLOW, "cache: the %s pool's size overflows", v ? "v" : "k");
    }
    memset(src, 0, sizeof *src);
    src->k = qkv_tensor_4d(c->k, i8 ? QKV_F32 : (qkv_dtype)c->dtype, c->n_blocks,
                           c->block_size, c->heads_kv, c->head_dim);
    src->v = qkv_tensor_4d(c->v, i8 ? QKV_F32 : (qkv_dtype)c->dtype, c->n_blocks,
                           c->block_size, c->heads_kv, c->head_dim_v);
    if (c->head_major) {   /* [n_blocks, heads_kv, block_size, head_dim] */
        src->k.stride[1] = c->head_dim;
        src->k.stride[2] = c->block_size * c->head_dim;
        src->v.stride[1] = c->head_dim_v;
        src->v.stride[2] = c->block_size * c->head_dim_v;
    }
    src->i8 = i8;
    src->es = es;
    src->ks = c->k_scale;
    src->vs = c->v_scale;
    src->sstride = c->head_major ? 1 : c->heads_kv;
    src->bs = c->block_size;
    while ((int64_t)1 << src->shift < src->bs)
        src->shift++;
    return QKV_OK;
}

/* The block table and lengths of B sequences: every sequence's positions
   lo[b] .. hi[b]-1 (hi = lens + extra) must map to blocks in range. */
static qkv_status check_table(qkv_ctx *ctx, const qkv_paged_cache *c, const int32_t *table,
                              int64_t max_blocks, const int32_t *lens, const char *lens_name,
                              int64_t B, int64_t extra, int from_len)
{
    if (!table)
        FAIL(QKV_ERR_NULL, "block_table: NULL");
    if (!lens)
        FAIL(QKV_ERR_NULL, "%s: NULL", lens_name);
    int64_t cap, cells;
    if (max_blocks <= 0 || __builtin_mul_overflow(max_blocks, c->block_size, &cap) ||
        __builtin_mul_overflow(max_blocks, B, &cells) || cap > INT32_MAX)
        FAIL(QKV_ERR_SHAPE, "max_blocks = %lld must be positive with max_blocks x "
             "block_size within int32", (long long)max_blocks);
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] < 0 || lens[b] + extra > cap)
            FAIL(QKV_ERR_SHAPE, "%s[%lld] = %d%s is outside [0, max_blocks x block_size = %lld]",
                 lens_name, (long long)b, (int)lens[b], extra ? " plus the new rows" : "",
                 (long long)cap);
        const int64_t first = from_len ? lens[b] / c->block_size : 0;
        const int64_t last = (lens[b] + extra + c->block_size - 1) / c->block_size;
        for (int64_t i = first; i < last; i++) {
            const int32_t id = table[b * max_blocks + i];
            if (id < 0 || id >= c->n_blocks)
                FAIL(QKV_ERR_SHAPE, "block_table[%lld][%lld] = %d is outside [0, cache->n_blocks "
                     "= %lld)", (long long)b, (long long)i, (int)id, (long long)c->n_blocks);
        }
    }
    return QKV_OK;
}

qkv_status qkv_attention_paged(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_paged_cache *cache, const int32_t *block_table, int64_t max_blocks,
        const int32_t *seqlens_k, const qkv_attn_opts *opts, qkv_tensor *out, float *lse)
{
    if (!ctx)
        return QKV_ERR_NULL;
    ctx->err[0] = 0;
    kv_src src;
    qkv_status st = check_paged(ctx, cache, &src);
    if (st)
        return st;
    qkv__attn a;
    if ((st = qkv__attn_check_cache(ctx, q, opts, out, lse, max_blocks > 0 && max_blocks <= INT32_MAX ?
                                    max_blocks * cache->block_size : 0,
                                    cache->heads_kv, cache->head_dim, cache->head_dim_v, "cache",
                                    &a)) ||
        (st = check_table(ctx, cache, block_table, max_blocks, seqlens_k, "seqlens_k", a.B, 0, 0)))
        return st;
    src.table = block_table;
    src.max_blocks = max_blocks;
    src.lens = seqlens_k;
    return run(ctx, &a, &src, cache->dtype == QKV_KV_BF16);
}

/* ---- append ----------------------------------------------------------------- */

typedef struct {
    qkv_ctx          *ctx;
    const kv_src     *src;
    const qkv_tensor *kn, *vn;   /* [B, Snew, Hkv, D|Dv] */
    int64_t           Hkv;
} app_job;

/* Row x (cols elements, fp32) into the cache at element offset off of t:
   converted, or quantized with its scale *scale for int8. */
static void put_row(const kv_src *src, const qkv_tensor *t, int64_t off, const float *x,
                    int64_t cols, float *scale)
{
    if (!src->i8) {
        for (int64_t c = 0; c < cols; c++)
            qkv__store(t->data, t->dtype, off + c, x[c]);
        return;
    }
    float amax = 0.0f;
    for (int64_t c = 0; c < cols; c++)
        amax = fabsf(x[c]) > amax || isnan(x[c]) ? fabsf(x[c]) : amax;
    int8_t *dst = (int8_t *)t->data + off;
    if (!isfinite(amax) || amax == 0.0f) {
        *scale = isfinite(amax) ? 0.0f : NAN;
        memset(dst, 0, (size_t)cols);
        return;
    }
    const float s = amax / 127.0f;
    *scale = s;
    for (int64_t c = 0; c < cols; c++) {
        float y = nearbyintf(x[c] / s);
        dst[c] = (int8_t)(y > 127.0f ? 127.0f : y < -127.0f ? -127.0f : y);
    }
}

/* Task: one new position (b, i) of every kv head. */
static void app_task(void *arg, int64_t task, int worker)
{
    const app_job *job = arg;
    const kv_src *src = job->src;
    const qkv__kernels *kern = job->ctx->kernels;
    const int64_t Snew = job->kn->shape[1], b = task / Snew, i = task % Snew;
    const int64_t p = src->lens[b] + i;
    float *x = job->ctx->scratch[worker];
    for (int64_t h = 0; h < job->Hkv; h++)
        for (int e = 0; e < 2; e++) {
            const qkv_tensor *in = e ? job->vn : job->kn;
            const qkv_tensor *t = e ? &src->v : &src->k;
            const int64_t cols = in->shape[3];
            qkv__load_row(kern, in, b * in->stride[0] + i * in->stride[1] + h * in->stride[2],
                          in->stride[3], cols, x);
            float *sc = src->i8 ? (float *)(e ? src->vs : src->ks) +
                                  scale_idx(src, b, p, h, job->Hkv) : NULL;
            put_row(src, t, row_off(src, t, b, p, h), x, cols, sc);
        }
}

/* Orders (block id, table cell, written) triples by id, then cell. */
static int cmp_cell(const void *x, const void *y)
{
    const int64_t *a = x, *b = y;
    return a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : (a[1] > b[1]) - (a[1] < b[1]);
}

qkv_status qkv_paged_append(qkv_ctx *ctx, const qkv_paged_cache *cache,
        const int32_t *block_table, int64_t max_blocks, const int32_t *seqlens,
        const qkv_tensor *k_new, const qkv_tensor *v_new)
{
    if (!ctx)
        return QKV_ERR_NULL;
    ctx->err[0] = 0;
    kv_src src;
    qkv_status st;
    if ((st = check_paged(ctx, cache, &src)) ||
        (st = qkv__check_tensor(ctx, k_new, "k_new")) ||
        (st = qkv__check_tensor(ctx, v_new, "v_new")))
        return st;
    if (v_new->dtype != k_new->dtype)
        FAIL(QKV_ERR_DTYPE, "v_new->dtype differs from k_new->dtype");
    const int64_t want_k[4] = { k_new->shape[0], k_new->shape[1], cache->heads_kv, cache->head_dim };
    const int64_t want_v[4] = { k_new->shape[0], k_new->shape[1], cache->heads_kv, cache->head_dim_v };
    static const char *const what[4] = { "k_new->shape[0]", "k_new->shape[1]", "cache->heads_kv",
                                         "cache->head_dim" };
    for (int d = 0; d < 4; d++) {
        if (k_new->shape[d] != want_k[d])
            FAIL(QKV_ERR_SHAPE, "k_new->shape[%d] = %lld differs from %s = %lld", d,
                 (long long)k_new->shape[d], what[d], (long long)want_k[d]);
        if (v_new->shape[d] != want_v[d])
            FAIL(QKV_ERR_SHAPE, "v_new->shape[%d] = %lld differs from %s = %lld", d,
                 (long long)v_new->shape[d], d == 3 ? "cache->head_dim_v" : what[d],
                 (long long)want_v[d]);
    }
    const int64_t B = k_new->shape[0], Snew = k_new->shape[1];
    if (Snew > INT32_MAX)
        FAIL(QKV_ERR_SHAPE, "k_new->shape[1] = %lld: more new rows than int32 lengths hold",
             (long long)Snew);
    if ((st = check_table(ctx, cache, block_table, max_blocks, seqlens, "seqlens", B, Snew, 1)))
        return st;

    /* a block written belongs to one table cell only: no other sequence
       reads it (a shared prefix block is copied before it is written) and
       no two positions of one sequence land in it */
    int64_t n = 0;
    for (int64_t b = 0; b < B; b++)
        n += (seqlens[b] + Snew + cache->block_size - 1) / cache->block_size;
    int64_t *cells = malloc((size_t)n * 3 * sizeof *cells);
    if (!cells)
        FAIL(QKV_ERR_NOMEM, "ctx: cannot allocate the block check");
    n = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i * cache->block_size < seqlens[b] + Snew; i++, n++) {
            cells[3 * n] = block_table[b * max_blocks + i];
            cells[3 * n + 1] = b * max_blocks + i;
            cells[3 * n + 2] = (i + 1) * cache->block_size > seqlens[b];   /* written */
        }
    qsort(cells, (size_t)n, 3 * sizeof *cells, cmp_cell);
    for (int64_t i = 1; i < n; i++)
        if (cells[3 * i] == cells[3 * i - 3] && (cells[3 * i + 2] || cells[3 * i - 1])) {
            const int64_t c0 = cells[3 * i - 2], c1 = cells[3 * i + 1], id = cells[3 * i];
            free(cells);
            FAIL(QKV_ERR_ARG, "block_table[%lld][%lld] and block_table[%lld][%lld] are both "
                 "block %lld, which this append writes (a written block must have one owner)",
                 (long long)(c0 / max_blocks), (long long)(c0 % max_blocks),
                 (long long)(c1 / max_blocks), (long long)(c1 % max_blocks), (long long)id);
        }
    free(cells);

    const int64_t cols = cache->head_dim > cache->head_dim_v ? cache->head_dim : cache->head_dim_v;
    if (cols > (1 << 24))
        FAIL(QKV_ERR_UNSUPPORTED, "cache->head_dim: above 16777216");
    if ((st = qkv__scratch_reserve(ctx, (size_t)cols * sizeof(float))))
        return st;
    src.table = block_table;
    src.max_blocks = max_blocks;
    src.lens = seqlens;
    app_job job = { ctx, &src, k_new, v_new, cache->heads_kv };
    qkv__parallel(ctx, B * Snew, (double)(B * Snew) * (double)cache->heads_kv * (double)cols,
                  app_task, &job);
    return QKV_OK;
}
