/*
 * tile.h — the pieces of a tile shared by the forward and backward drivers
 * (tile.c): rows in and out of the tensors, the keys a row sees, and the
 * score modifications.
 */
#ifndef QKV_TILE_H
#define QKV_TILE_H

#include "attn.h"
#include "../cpu/kernels.h"

/* Rows are widened QKV__PREFETCH_ROWS ahead of their first touch: with few
   queries per key (decode) the loads, not the arithmetic, are the cost. */
enum { QKV__PREFETCH_ROWS = 16 };

/* Query tiles hold about QKV__BQ rows; the softmax kernels take query
   columns in whole vectors of QKV__PAD (the drivers pad with -inf). */
enum { QKV__BQ = 64, QKV__PAD = 16 };

/* Positions per head in a tile: the heads of a GQA group are stacked so
   one K/V tile serves all of them. */
static inline int64_t qkv__tile_positions(int64_t group)
{
    return group >= QKV__BQ ? 1 : QKV__BQ / group;
}

/* Rows of a tile: QKV__BQ, or one per query head of a group when the group
   is larger, rounded up to whole vectors. */
static inline int64_t qkv__tile_rows(int64_t group)
{
    int64_t r = group > QKV__BQ ? group : QKV__BQ;
    return (r + QKV__PAD - 1) / QKV__PAD * QKV__PAD;
}

/* Row r of a tile holding mp positions per head: head h0 + r / mp at query
   position i0 + r % mp (within its sequence). */
typedef struct { int64_t h0, i0; int mp; } qkv__tile_map;

/* dst[c] = t's element off + c·stride as fp32, c < n. */
void qkv__load_row(const qkv__kernels *kn, const qkv_tensor *t, int64_t off,
                   int64_t stride, int64_t n, float *dst);

/* t's element off + c·stride = src[c]·mul in t's dtype, c < n. */
void qkv__store_row(const qkv__kernels *kn, const qkv_tensor *t, int64_t off,
                    int64_t stride, int64_t n, const float *src, float mul);

/* The keys query row i can see, as a half-open range [*lo, *hi) within a
   sequence of sq queries and sk keys; empty when *lo >= *hi. */
void qkv__key_range(const qkv__attn *a, const qkv__seq *s, int64_t i,
                    int64_t *lo, int64_t *hi);

/* Softcap, ALiBi, bias and the band mask on a tile of scores st[r·ldr + c·ld]
   (keys j0..j0+n by m rows; dcap, when given, [c·ld + r]); see tile.c. */
void qkv__score_mods(const qkv__attn *a, const qkv__seq *s, const qkv__tile_map *tm,
                     int m, int64_t j0, int n, int band, float *st, int64_t ldr, int64_t ld,
                     float *dcap);

/* The tile's m bf16 queries (of a->q) as pairs along d for qk_bf16:
   qp[x/2][r] holds row r's q[x] low and q[x+1] high, zero past D and in
   rows m..mpad; row stride R (forward.c). */
void qkv__load_q_pairs(const qkv__attn *a, const qkv__seq *s, const qkv__tile_map *tm,
                       int m, int mpad, int64_t R, uint32_t *qp);

/* Prefetches the row `ahead` rows (dim 1) after element offset off. */
void qkv__prefetch_row(const qkv_tensor *t, int64_t off, int64_t ahead, int64_t cols);

/* n rows (dim 1) of t from element offset row0 as fp32 rows of cols
   elements: in place when they already are, widened into buf otherwise;
   *ld receives their stride. */
const float *qkv__tile_rows_f32(const qkv__kernels *kn, const qkv_tensor *t,
                                int64_t row0, int n, int64_t cols, float *buf,
                                int64_t *ld);

/* dst[c·R + r] = src[r·cols + c] for r < m and 0 for m <= r < mpad, c <
   cols: a tile's rows transposed, with zero padding columns (mpad a
   positive multiple of QKV__PAD, mpad - m < QKV__PAD). */
void qkv__transpose_tile(const float *src, int m, int64_t cols, int mpad, int64_t R,
                         float *dst);

/* ---- bf16 operands of the pair dot products (two bf16 values adjacent
   along the reduction axis in one uint32, the lower index low) ---------- */

/* Pairs covering n elements. */
static inline int64_t qkv__pairs(int64_t n) { return (n + 1) / 2; }

/* The tile's m rows of a query-side bf16 tensor t (q, dout), row r at
   dst + r·ld (ld >= cols), zero from cols up to ld. */
void qkv__tile_rows_bf16(const qkv_tensor *t, const qkv__seq *s, const qkv__tile_map *tm,
                         int m, int64_t cols, int64_t ld, uint16_t *dst);

/* n bf16 rows (dim 1) of t from element offset row0, each 2·pairs(cols)
   elements long: in place when cols is even and rows are contiguous, else
   gathered into buf with a zero after an odd cols; *ld receives the
   stride. */
const uint16_t *qkv__key_rows_bf16(const qkv_tensor *t, int64_t row0, int n, int64_t cols,
                                   uint16_t *buf, int64_t *ld);

/* n bf16 rows (dim 1) of t from element offset row0 as pairs of rows:
   dst[jj][c] = (t[2jj][c], t[2jj+1][c]), the high half 0 for a last odd
   row. rows2 ([2][cols]) gathers rows that are not contiguous. */
void qkv__key_pairs_bf16(const qkv__kernels *kn, const qkv_tensor *t, int64_t row0, int n,
                         int64_t cols, uint16_t *rows2, uint32_t *dst);

/* Dropout on a tile of P (keys j0..j0+n of sequence s by the m rows of
   tm): st[c·ld + r] times element (r, c)'s factor, 0 or 1/(1 - p)
   (attn.h). */
void qkv__dropout_tile(const qkv__kernels *kn, const qkv__attn *a, const qkv__seq *s,
                       const qkv__tile_map *tm, int m, int64_t j0, int n, float *st,
                       int64_t ld);

/* P tile st [n][R] (fp32, m rows) rounded to bf16 as pairs of keys
   pp[j/2][r] (row stride R; the high half of a last odd key 0): what
   exp_pack_bf16 writes, for a P that was changed after the exponentials. */
void qkv__pack_p_bf16(const qkv__kernels *kn, const float *st, int64_t R, int n, int m,
                      uint32_t *pp);

#endif /* QKV_TILE_H */
