/*
 * kernels.h — the micro-kernel table: the few inner loops attention spends
 * its time in, one implementation per instruction set, chosen at run time
 * by dispatch.c. Kernels receive fp32 tiles in scratch memory and a range of
 * work; they never allocate, never create threads and never see dtypes
 * other than fp32 except in the row load/store kernels.
 */
#ifndef QKV_KERNELS_H
#define QKV_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* The K or V rows of a decode kernel call: row j starts at
   blk[(r0 + j) >> shift] + ((r0 + j) mod 2^shift)·ld bytes. The blocks
   of a paged cache (2^shift rows each, the call's first row r0 rows into
   blk[0]), or one run of rows at one stride (shift QKV__RUN). */
typedef struct {
    const char *const *blk;
    int64_t            ld;
    int                shift, r0;
} qkv__rows;

enum { QKV__RUN = 30 };

static inline const char *qkv__row(const qkv__rows *r, int j)
{
    const int x = r->r0 + j;
    return r->blk[x >> r->shift] + (int64_t)(x & ((1 << r->shift) - 1)) * r->ld;
}

/* A walk along the rows of r in groups of `step` rows that never cross a
   block (the kernels' groups of 2 or 4 keys from the call's first: the
   callers keep r0 a multiple of 4): the group's first row, and the rows
   left in its block. */
typedef struct {
    const char *at;
    int         left;
} qkv__walk;

static inline qkv__walk qkv__walk_at(const qkv__rows *r, int j)
{
    const int x = r->r0 + j, in = x & ((1 << r->shift) - 1);
    const qkv__walk w = { r->blk[x >> r->shift] + (int64_t)in * r->ld, (1 << r->shift) - in };
    return w;
}

/* On to the group of `step` rows at row j (the one after w's). */
static inline void qkv__walk_next(qkv__walk *w, const qkv__rows *r, int j, int step)
{
    w->left -= step;
    if (w->left > 0)
        w->at += step * r->ld;
    else
        *w = qkv__walk_at(r, j);
}

/* Cache lines a decode kernel asks for while it works (software
   prefetch, into L2): `rows` rows `ld` bytes apart from base (or at
   bases[row] when bases is set: the blocks of a paged cache), `lines`
   lines of 64 bytes each, `per4` lines after each 4 keys until all are
   asked for; row/line is the progress, kept across calls. */
typedef struct {
    const char        *base;
    const char *const *bases;
    int64_t            ld;
    int32_t            rows, lines, per4;
    int32_t            row, line;
} qkv__pf;

/* Row `row` of pf's lines. */
static inline const char *qkv__pf_row(const qkv__pf *pf, int row)
{
    return pf->bases ? pf->bases[row] : pf->base + (int64_t)row * pf->ld;
}

/* Asks for up to `count` more lines of pf. */
static inline void qkv__pf_lines(qkv__pf *pf, int count)
{
    while (count > 0 && pf->row < pf->rows) {
        const char *r = qkv__pf_row(pf, pf->row);
        int l = pf->line;
        const int e = count < pf->lines - l ? l + count : pf->lines;
        count -= e - l;
        for (; l < e; l++)
            __builtin_prefetch(r + 64 * l, 0, 2);
        if (e == pf->lines) {
            pf->line = 0;
            pf->row++;
        } else {
            pf->line = e;
        }
    }
}

/* pf as a cursor over its rows of lines, from where it is (any pf; end
   NULL when none are left), which an inner loop steps along: a pointer
   compare and a few prefetches at a time, on to pf's next row (a paged
   pool's next block) at the end of one. The scores kernels ask through
   it 4 lines at a time (qkv__pf_ask): from L2 the bf16 one took 25.4
   cycles per key through qkv__pf_lines, 21.8 through the cursor, as
   without prefetches; over paged pools (Zen 4, 1x4096 from the L3, bf16
   and int8) decoding took 0.90-0.94x the time, from memory the same.
   P·V asks line by line: pv_rows_fma through qkv__pf_run_each (on Zen 1
   qkv__pf_lines cost it 18 cycles per key of 4 rows, the cursor 6; in
   groups of 4 its lines slowed a thread reading from memory by 5-10%);
   the few-row bf16 and int8 P·V kernels through qkv__pf_lines (through
   the cursor they took 0.96x the time from the L3 over pools, but
   1.04-1.06x from memory). */
typedef struct {
    const char *at, *end;
} qkv__pf_run;

static inline qkv__pf_run qkv__pf_run_begin(const qkv__pf *pf)
{
    qkv__pf_run r = { NULL, NULL };
    if (pf && pf->row < pf->rows) {
        const char *b = qkv__pf_row(pf, pf->row);
        r.at = b + 64 * (int64_t)pf->line;
        r.end = b + 64 * (int64_t)pf->lines;
    }
    return r;
}

/* r on to pf's next row once its run is done; 0 when none is left. */
static inline int qkv__pf_run_next(qkv__pf *pf, qkv__pf_run *r)
{
    if (r->at < r->end)
        return 1;
    if (pf->row + 1 >= pf->rows)
        return 0;
    pf->row++;
    pf->line = 0;
    r->at = qkv__pf_row(pf, pf->row);
    r->end = r->at + 64 * (int64_t)pf->lines;
    return 1;
}

/* Asks for the next `count` lines of r one by one. */
static inline void qkv__pf_run_each(qkv__pf *pf, qkv__pf_run *r, int count)
{
    for (; count > 0 && qkv__pf_run_next(pf, r); count--, r->at += 64)
        __builtin_prefetch(r->at, 0, 2);
}

/* Asks for about `count` more lines of r (end NULL: none), in groups of 4
   where a row has 4 left. */
static inline void qkv__pf_ask(qkv__pf *pf, qkv__pf_run *r, int count)
{
    if (!r->end)
        return;
    for (int c = 0; c < count && qkv__pf_run_next(pf, r);) {
        if (r->end - r->at >= 256) {
            __builtin_prefetch(r->at, 0, 2);
            __builtin_prefetch(r->at + 64, 0, 2);
            __builtin_prefetch(r->at + 128, 0, 2);
            __builtin_prefetch(r->at + 192, 0, 2);
            r->at += 256;
            c += 4;
        } else {
            __builtin_prefetch(r->at, 0, 2);
            r->at += 64;
            c++;
        }
    }
}

/* Keeps r's progress in pf, for the next kernel call on it. */
static inline void qkv__pf_run_end(qkv__pf *pf, const qkv__pf_run *r)
{
    if (r->end) {   /* the line reached in the row r is on */
        const int64_t l = (r->at - (r->end - 64 * (int64_t)pf->lines)) / 64;
        pf->line = l < pf->lines ? (int32_t)l : pf->lines;
    }
}

/* A 32-bit integer hash (lowbias32: two multiply–xorshift rounds): the
   dropout mask's (attn.h, drop_cols). QKV__MIX32 hashes x in place, a
   uint32_t or a vector of them (the kernels' lane-by-lane form). */
#define QKV__MIX32(x)                                                          \
    do {                                                                       \
        (x) ^= (x) >> 16;                                                      \
        (x) *= 0x7feb352du;                                                    \
        (x) ^= (x) >> 15;                                                      \
        (x) *= 0x846ca68bu;                                                    \
        (x) ^= (x) >> 16;                                                      \
    } while (0)

static inline uint32_t qkv__mix32(uint32_t x)
{
    QKV__MIX32(x);
    return x;
}

typedef struct qkv__kernels {
    const char *name;

    /* Scores, keys by queries: st[j][i] = scale · Σ_x k[j][x]·q[i][x] for
       j < n keys, i < m queries. k [n][ldk] row-major (used in place);
       the queries come twice: qt [d][ldqt] (transposed, for whole vectors
       of queries) and q [m][ldq] (row-major, for a few leftover columns).
       qt is zero and st writable up to column round_up(m, 16): the kernel
       may compute padding columns instead of per-query dot products. */
    void (*qk)(int n, int m, int d, float scale, const float *k, int64_t ldk,
               const float *qt, int64_t ldqt, const float *q, int64_t ldq,
               float *st, int64_t ldst);
    /* qk reads qt only when m >= qk_qt_rows (fewer queries take per-query
       dot products from q): callers may leave qt unset below that. */
    int qk_qt_rows;

    /* acc[i][c] = alpha[i]·acc[i][c] + Σ_j p(i,j)·v[j][c]  for i < m, c < dv,
       where p(i,j) = p[i·psi + j·psj]; v [n][ldv], acc [m][lda]. */
    void (*pv)(int m, int n, int dv, const float *p, int64_t psi, int64_t psj,
               const float *v, int64_t ldv, const float *alpha,
               float *acc, int64_t lda);

    /* The two softmax kernels run over whole vectors of query columns: m
       is a multiple of 16 (callers pad with -inf scores and mref 0). */

    /* mx[i] = max_j st[j][i] (-inf when all are), i < m, j < n. */
    void (*col_max)(const float *st, int64_t ld, int n, int m, float *mx);

    /* st[j][i] = exp(st[j][i] - mref[i]) in place (exp(-inf) = 0) and
       sum[i] = Σ_j st[j][i]; mref finite. */
    void (*exp_cols)(float *st, int64_t ld, int n, int m, const float *mref,
                     float *sum);

    /* dst[j] = src[j] widened to fp32 exactly, j < n (contiguous rows). */
    void (*cvt_f16)(const uint16_t *src, float *dst, int64_t n);
    void (*cvt_bf16)(const uint16_t *src, float *dst, int64_t n);

    /* dst[j] = src[j]·mul rounded to nearest even, j < n, bit for bit as
       qkv_convert does (NaN kept quiet, overflow to infinity). */
    void (*store_f16)(const float *src, float mul, uint16_t *dst, int64_t n);
    void (*store_bf16)(const float *src, float mul, uint16_t *dst, int64_t n);

    /* ---- bf16 dot products: NULL where the CPU has no bf16 dot ----------
       A pair is a uint32 holding two bf16 values adjacent along the
       reduction axis, the lower index in the low half. */

    /* dst[c] = a[c] | b[c] << 16 for c < n (b NULL: high halves 0). */
    void (*pack_pairs)(const uint16_t *a, const uint16_t *b, int64_t n, uint32_t *dst);

    /* st[j][i] = scale · Σ_x k[j][x]·q[i][x] for j < n keys, i < m queries
       (m a multiple of 16). k: bf16 rows of 2·dp readable elements,
       stride ldk elements; qp [dp][ldqp] pairs of q along x. */
    void (*qk_bf16)(int n, int m, int dp, float scale, const uint16_t *k, int64_t ldk,
                    const uint32_t *qp, int64_t ldqp, float *st, int64_t ldst);

    /* The same scores for a few queries (any m): q [m][ldq] bf16 rows of
       2·dp readable elements, dot products along d. NULL: tasks of fewer
       rows than a vector take the fp32 path. */
    void (*qk_bf16_rows)(int n, int m, int dp, float scale, const uint16_t *k, int64_t ldk,
                         const uint16_t *q, int64_t ldq, float *st, int64_t ldst);

    /* P = exp(st[j][i] - mref[i]), times pmul[j] (NULL: 1) rounded to
       bf16, stored as pairs of keys pp[j/2][i] (the high half of a last
       odd key 0), and sum[i] = Σ_j of the unrounded P without pmul. m a
       multiple of 16; st is left as it was. */
    void (*exp_pack_bf16)(const float *st, int64_t ld, int n, int m, const float *mref,
                          const float *pmul, float *sum, uint32_t *pp, int64_t ldp);

    /* acc[i][c] = alpha[i]·acc[i][c] + Σ_jj pp[jj][i]·vp[jj][c] (pair dot
       products) for i < m, c < dv, jj < np. */
    void (*pv_bf16)(int m, int np, int dv, const uint32_t *pp, int64_t ldp,
                    const uint32_t *vp, int64_t ldvp, const float *alpha,
                    float *acc, int64_t lda);

    /* acc[i][c] += Σ_jj a(i,jj)·b[jj][c] (pair dot products) for i < m,
       c < n, jj < np, where a(i,jj) = a[i·asi + jj·asj]: the backward's
       three gradient products, their operands laid out as they come. */
    void (*mm_bf16)(int m, int np, int n, const uint32_t *a, int64_t asi, int64_t asj,
                    const uint32_t *b, int64_t ldb, float *acc, int64_t lda);

    /* ---- whole-tile bf16 products (AMX; NULL in other sets) ------------
       Operands in tiles of 16 rows of 16 pairs. dpp: the pairs of a K row
       rounded up to 16; dvp: a V row's values rounded up to 16.
       Packed K: panels of 16 keys, dpp·16 words each, word x·16 + j of a
       panel the pair x (along d) of its key j. Packed V: chunks of 32 keys,
       16·dvp words each, word (c/16)·256 + jj·16 + c%16 of a chunk the pair
       (v[2jj][c], v[2jj+1][c]) of its keys. Zeros pad both past the rows'
       values and past the last key. */

    /* fp16 rows on the same tiles, exactly: each fp16 value x = hi + lo,
       hi x rounded to bf16 and lo the rest (at most 3 significant bits),
       so that with operands laid out as (qh | qh | ql)·(kh | kl | kh) the
       scores are qh·kh + qh·kl + ql·kh (dropping ql·kl, below 2^-18 of
       |q|·|k|), and with P split the same way P·V is ph·vh + ph·vl +
       pl·vh: three times the bf16 tile products. The whole-tile kernels
       (split set) keep K and V packed in two parts, (kh | kl) and (vh,
       vl), and read the first again for the third.
       split_f16: hi[i], lo[i] for the n fp16 values h[i] (a value that is
       not finite gives a NaN lo), and hi again in hi2 unless it is NULL. */
    void (*split_f16)(const uint16_t *h, int64_t n, uint16_t *hi, uint16_t *lo, uint16_t *hi2);
    /* The same for n fp32 values x (fp16 and bf16 values split exactly;
       other values keep 16 of their bits): queries, and P for P·V. */
    void (*split_f32)(const float *x, int64_t n, uint16_t *hi, uint16_t *lo, uint16_t *hi2);
    /* Two rows a, b (b NULL: zeros) of n values split as split_f16 and
       split_f32 do, as pairs along the rows: hi[c] = (a's hi, b's hi) in
       the low and high halves, lo[c] the same of the lo, hi2 (unless
       NULL) hi again: the B operand of P·V from two V rows, or the A
       operand from two keys' P. */
    void (*split_pairs_f16)(const uint16_t *a, const uint16_t *b, int64_t n, uint32_t *hi,
                            uint32_t *lo, uint32_t *hi2);
    void (*split_pairs_f32)(const float *a, const float *b, int64_t n, uint32_t *hi,
                            uint32_t *lo, uint32_t *hi2);

    /* Packs n keys (rows k, stride ldk elements, dp readable pairs each)
       into ceil(n/16) panels at dst. */
    void (*pack_k_tiles)(const uint16_t *k, int64_t ldk, int n, int dp, int dpp,
                         uint32_t *dst);

    /* The same from fp16 rows split into bf16 (split_f16): n keys of d
       values as panels of rows (kh | kl), 2·dpp pairs a key (dpp: a
       part's pairs, d/2 rounded up to 16); n value rows as chunks of 32
       keys in twos, vh then vl. */
    void (*pack_k_split)(const uint16_t *k, int64_t ldk, int n, int d, int dpp, uint32_t *dst);
    void (*pack_v_split)(const uint16_t *v, int64_t ldv, int n, int dv, int dvp, uint32_t *dst);

    /* Packs n value rows (v, stride ldv elements, dv values each) into
       ceil(n/32) chunks at dst. */
    void (*pack_v_tiles)(const uint16_t *v, int64_t ldv, int n, int dv, int dvp,
                         uint32_t *dst);

    /* s[i·lds + j] = Σ_x q_i·k_j (unscaled) for i < m (a multiple of 16)
       and the 16·nb keys of nb panels kt; q [m][ldq] bf16 rows of dpp
       pairs (ldq even). split: q rows (qh | qh | ql) of 3·dpp pairs, kt
       packed by pack_k_split. */
    void (*qk_tiles)(int m, int nb, int dpp, const uint16_t *q, int64_t ldq,
                     const uint32_t *kt, float *s, int64_t lds, int split);

    /* The online softmax of a tile along its rows i < m, keys j < n, with
       x = scale·s[i·lds + j] (scale > 0): mrow[i], the running max, takes
       the tile's; alpha[i] = exp(old max - new) (1 when unchanged); P =
       exp(x - new max) (0 for all -inf) rounded to bf16 into
       p[i·ldp + j], zero from j = n to round_up(n, 32); lrow[i] =
       lrow[i]·alpha[i] + Σ_j P (unrounded). split: P as ph (P rounded to
       bf16) and pl (P - ph rounded), each chunk of 32 keys from j0 as
       three, ph, ph, pl, at p[i·ldp + 3·j0 ...] (ldp >= 3·round_up(n,
       32)): the A operand of P·V against V packed (vh, vl, vh) a chunk. */
    void (*softmax_tiles)(int m, int n, float scale, const float *s, int64_t lds, float *mrow,
                          float *lrow, float *alpha, uint16_t *p, int64_t ldp, int split);

    /* The three steps above for n keys in tiles of bk (a multiple of 32)
       and rows i < m (a multiple of 16), tile by tile: S = Q·Kᵀ, the
       softmax (scale > 0, no score changes between but for the band: row
       i sees the keys lo[i] <= j < hi[i], lo or hi NULL for no bound on
       that side), acc += P·V with acc's rows rescaled by alpha. s: 64·bk
       floats and p: 64·bk bf16 of scratch (3 times that split: q as
       qk_tiles takes it, P split as softmax_tiles splits it, K and V
       packed by pack_k_split and pack_v_split). dpp: pairs of a part. The tile
       products of one block of rows are interleaved with the softmax of
       another. */
    void (*attn_tiles)(int m, int n, const int32_t *lo, const int32_t *hi, int bk, int dpp,
                       int dvp, float scale,
                       const uint16_t *q, int64_t ldq, const uint32_t *kt, const uint32_t *vt,
                       float *mrow, float *lrow, float *alpha, float *acc, int64_t lda, float *s,
                       uint16_t *p, int split);

    /* acc[i][c] = alpha[i]·acc[i][c] + Σ_j p[i·ldp + j]·v[j][c] for i < m
       (a multiple of 16), c < dvp and the 32·nch keys of nch chunks vt;
       p bf16 rows (ldp even, as exp_rows_bf16 writes them). split: P as
       softmax_tiles splits it, vt packed by pack_v_split. */
    void (*pv_tiles)(int m, int nch, int dvp, const uint16_t *p, int64_t ldp,
                     const uint32_t *vt, const float *alpha, float *acc, int64_t lda, int split);
    /* ---- decode: a few query rows against many keys (every set: where
       the CPU has no bf16 dot, bf16 values are widened in registers and
       the products are fp32 FMAs) ----------------------------------------- */

    /* The scores of qk_bf16_rows, query-major: st[i·ldst + j] for j < n,
       i < m, computed in blocks of 4 keys x 4 queries whose 16 dot
       products are reduced together (only the last n % 4 keys are reduced
       one by one; sets without a bf16 dot: 2 keys x 4 queries, each key
       alike; calls of 14-16 queries on the AVX-512 sets: lanes along the
       queries, each key's sum one chain over the pairs, 8 keys a block,
       so that no sums are reduced across lanes); k's rows are dp pairs of
       bf16, q [m][ldq], readable up
       to row round_up(m, 4). Splitting the keys into calls of multiples of
       4 gives the same bits. Asks for the lines of pf (NULL: none) as it
       goes. */
    void (*qk_bf16_dec)(int n, int m, int dp, float scale, const qkv__rows *k,
                        const uint16_t *q, int64_t ldq, float *st, int64_t ldst,
                        qkv__pf *pf);

    /* P = exp(st[i·ld + j] - mref[i]) and sum[i] = Σ_j P (fp32); P·pmul[j]
       (pmul NULL: P) rounded to bf16 into p[i·ldp + j], zero from j = n up
       to round_up(n, 32); mref finite. Row i of p read as uint32 is its
       pairs of keys (j even low, j + 1 high). */
    void (*exp_rows_bf16)(const float *st, int64_t ld, int m, int n, const float *mref,
                          const float *pmul, float *sum, uint16_t *p, int64_t ldp);

    /* acc[i][c] = alpha[i]·acc[i][c] + Σ_jj P(i,jj)·(v[2jj][c], v[2jj+1][c])
       for i < m, c < dv, jj < (n+1)/2, where P(i,jj) is pair jj of row i of
       p ([m][ldp] bf16 from exp_rows_bf16) and v's rows of dv bf16 values,
       paired along keys on the fly (a last odd row pairs with zero);
       alpha NULL: no rescaling. The sums run pair by pair in fp32, so
       calls split at even key counts give the same bits as one call (the
       amx set: in groups of 16 keys from the call's first, so calls split
       at multiples of 16; and a V value that is not finite makes the
       other column of its pair of columns NaN too). Asks for the lines of
       pf (NULL: none) as it goes. */
    void (*pv_bf16_dec)(int m, int n, int dv, const uint16_t *p, int64_t ldp,
                        const qkv__rows *v, const float *alpha, float *acc, int64_t lda,
                        qkv__pf *pf);

    /* Rows (a multiple of 16, 0: none) up to which decode runs the
       few-row kernels on a tile 16 query rows at a time, each group
       against the key tile in L2: qk_bf16_dec, exp_rows_bf16 and
       pv_bf16_dec on bf16 rows, rather than the many-row kernels
       (qk_bf16, pack_pairs, mm_bf16); qk_i8_dec and pv_i8_dec on int8
       codes where i8_rows_max is 0; the f16s kernels up to
       f16s_rows_max. */
    int dec_rows_max;

    /* The decode kernels of sets with tiles (_dec: bf16, f16s, i8) may
       leave their tile configuration loaded for the next call on the
       thread; a task that called them calls this before it ends (NULL on
       other sets). */
    void (*dec_done)(void);

    /* int8 caches read as codes (sets with AVX512-VNNI, else NULL): the
       scores of qk_bf16_dec from int8 K rows of d codes and int16
       queries q [m][ldq] (readable up to row round_up(m, 4)), the dot
       products exact in int32 (d even, d <= 256), then times
       scale·qsc[i]. Tiles of more than i8_rows_max rows (0: any) take
       the codes as bf16 through qk_bf16_dec and pv_bf16_dec instead. */
    int i8_rows_max;
    void (*qk_i8_dec)(int n, int m, int d, float scale, const qkv__rows *k,
                      const int16_t *q, int64_t ldq, const float *qsc, float *st,
                      int64_t ldst, qkv__pf *pf);

    /* P = exp(st[i·ld + j] - mref[i]), sum[i] = Σ_j P (fp32), and
       P·pmul[j]·inv rounded to int16 into p[i·ldp + j] (it must fit: inv
       at most 32767 / max pmul), zero from j = n up to round_up(n, 32);
       mref finite. Row i of p read as uint32 is its pairs of keys. */
    void (*exp_rows_i16)(const float *st, int64_t ld, int m, int n, const float *mref,
                         const float *pmul, float inv, float *sum, int16_t *p, int64_t ldp);

    /* pv_bf16_dec with int16 P (exp_rows_i16) and int8 V rows (dv codes
       each): acc[i][c] = alpha[i]·acc[i][c] + pscale·Σ_j P(i,j)·v[j][c],
       the sums exact in int32 over chunks of keys from the call's first
       (up to 4 rows: 128 keys; more: 64; the amx set with AMX-INT8: 64),
       so calls split at multiples of 128 keys give the bits of one call;
       dv a multiple of 32. */
    void (*pv_i8_dec)(int m, int n, int dv, const int16_t *p, int64_t ldp, const qkv__rows *v,
                      const float *alpha, float pscale, float *acc, int64_t lda, qkv__pf *pf);

    /* int8 caches on sets without the int16 dot path (else NULL): the
       scores of qk_bf16_dec from int8 K rows of d codes (the caller
       applies the key scales), and pv_bf16_dec over int8 V rows of dv
       codes (P times the V scales from exp_rows_bf16); codes widened to
       fp32 in registers. */
    void (*qk_i8f_dec)(int n, int m, int d, float scale, const qkv__rows *k,
                       const uint16_t *q, int64_t ldq, float *st, int64_t ldst, qkv__pf *pf);
    void (*pv_i8f_dec)(int m, int n, int dv, const uint16_t *p, int64_t ldp,
                       const qkv__rows *v, const float *alpha, float *acc, int64_t lda,
                       qkv__pf *pf);

    /* fp16 caches read in place (every set): the scores of qk_dec from
       fp16 K rows of d values (the bits of qk_dec on the rows widened;
       on the AVX-512 sets for calls of up to 13 rows, as qk_dec takes 14
       to 16 with lanes along the queries),
       and P·V from fp16 V rows of dv values with P in fp32 (p [m][ldp], as
       exp_rows leaves it): acc[i][c] = alpha[i]·acc[i][c] + Σ_j
       P(i,j)·v[j][c], summed key by key in fp32 (any split of the keys
       gives the same bits). Values widened in registers; pf as in
       pv_bf16_dec. Tiles of more than f16_rows_max rows (0: any) widen
       each tile's rows once instead, for qk_dec and pv (where the set
       does not split them: qk_f16s_dec, pv_f16s_dec, below). */
    int f16_rows_max;
    void (*qk_f16_dec)(int n, int m, int d, float scale, const qkv__rows *k, const float *q,
                       int64_t ldq, float *st, int64_t ldst, qkv__pf *pf);
    void (*pv_f16_dec)(int m, int n, int dv, const float *p, int64_t ldp, const qkv__rows *v,
                       const float *alpha, float *acc, int64_t lda, qkv__pf *pf);

    /* fp16 caches with more rows than f16_rows_max, on sets with bf16
       tiles (else NULL): each fp16 value split exactly into two bf16 (its
       top 16 bits as fp32, and the rest), the products on the tiles. The
       scores of qk_f16_dec, for queries whose values are fp16 or bf16 (q
       fp32 rows; they split exactly too): every product exact, the sums
       in fp32, each key's scores from its row alone. P·V as pv_f16_dec,
       P split into its top 16 bits and the rest rounded to bf16 (P within
       2^-16 of itself), the sums over keys in groups of 16 from the
       call's first key (calls split at multiples of 16 give the same
       bits), and a V value that is not finite making its column NaN. d
       and dv multiples of 16 up to 256, m up to 16; the rows are read one
       by one, in any layout. Decode takes them for tiles of more than
       f16s_rows_min rows. The scores read the queries as f16s_queries
       prepared them from m fp32 rows q [m][ldq] into qt (at most 32·d
       words), once for every call on those queries. */
    int f16s_rows_min;
    /* ... and up to f16s_rows_max rows (sets with dec_rows_max, at most
       that), 16 rows a call, each group splitting the rows again */
    int f16s_rows_max;
    void (*f16s_queries)(int m, int d, const float *q, int64_t ldq, uint32_t *qt);
    void (*qk_f16s_dec)(int n, int m, int d, float scale, const qkv__rows *k,
                        const uint32_t *qt, float *st, int64_t ldst, qkv__pf *pf);
    void (*pv_f16s_dec)(int m, int n, int dv, const float *p, int64_t ldp, const qkv__rows *v,
                        const float *alpha, float *acc, int64_t lda, qkv__pf *pf);

    /* ---- decode, every set ---------------------------------------------- */

    /* The scores of qk for a few queries, query-major as qk_bf16_dec:
       st[i·ldst + j] for j < n, i < m; q [m][ldq] fp32 rows, readable up to
       row round_up(m, 4), k's rows d fp32 values (calls of 14-16 queries
       on the AVX-512 sets: lanes along the queries, as qk_bf16_dec).
       Splitting the keys into calls of multiples of 4 gives the same bits.
       Asks for pf's lines as it goes. */
    void (*qk_dec)(int n, int m, int d, float scale, const qkv__rows *k, const float *q,
                   int64_t ldq, float *st, int64_t ldst, qkv__pf *pf);

    /* P·V of pv_f16_dec from fp32 V rows of dv values in place (the rows
       of fp32 caches, and the fp32 rows other dtypes are widened to):
       acc[i][c] = alpha[i]·acc[i][c] + Σ_j P(i,j)·v[j][c], summed key by
       key in fp32 (any split of the keys gives the same bits), asking for
       pf's lines as it goes. */
    void (*pv_f32_dec)(int m, int n, int dv, const float *p, int64_t ldp, const qkv__rows *v,
                       const float *alpha, float *acc, int64_t lda, qkv__pf *pf);

    /* mx[i] = max_j st[i·ld + j] (-inf when all are), i < m, j < n. */
    void (*row_max)(const float *st, int64_t ld, int m, int n, float *mx);

    /* st[i·ld + j] = exp(st[i·ld + j] - mref[i]) in place (exp(-inf) = 0)
       and sum[i] = Σ_j of them, i < m, j < n; mref finite. */
    void (*exp_rows)(float *st, int64_t ld, int m, int n, const float *mref, float *sum);

    /* dst[j] = src[j]·scale, int8 codes widened to fp32, j < n. */
    void (*cvt_i8)(const int8_t *src, float scale, float *dst, int64_t n);

    /* dst[r·ldd + j] = src[r·lds + j] as bf16 (exact: codes have at most
       8 significant bits), r < rows, j < n. */
    void (*cvt_i8_bf16)(const int8_t *src, int64_t lds, int rows, int64_t n, uint16_t *dst,
                        int64_t ldd);

    /* Dropout on a tile of P: st[j·ld + i] times scale where
       qkv__mix32(row[i] + col[j]) >= thresh, else 0, i < m, j < n. */
    void (*drop_cols)(float *st, int64_t ld, int n, int m, const uint32_t *row,
                      const uint32_t *col, uint32_t thresh, float scale);

    /* Runs iters rounds of independent fp32 vector FMAs (a ceiling probe
       for benchmarks); returns the flops done. */
    double (*fma_probe)(int64_t iters);
} qkv__kernels;

/* Kernel sets, in order of preference on x86-64: amx, avx512bf16, avx512,
   avx2, generic; amx-emu (AMX emulated, for tests) only when asked for. */
void qkv__kernels_generic(qkv__kernels *t);
void qkv__kernels_avx2(qkv__kernels *t);
void qkv__kernels_avx512(qkv__kernels *t);
void qkv__kernels_avx512bf16(qkv__kernels *t);
void qkv__kernels_amx(qkv__kernels *t);
void qkv__kernels_amx_emu(qkv__kernels *t);

/* The best set this CPU and OS support (or QKV_ISA's choice). */
const qkv__kernels *qkv__kernels_default(void);
/* The name of the i-th set qkv knows (least preferred first), NULL past
   the last. */
const char *qkv__kernels_name(int i);
/* The named set, or NULL when unknown (*known = 0) or unsupported. */
const qkv__kernels *qkv__kernels_by_name(const char *name, int *known);

#endif /* QKV_KERNELS_H */
