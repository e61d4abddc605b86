/*
 * kernels_amx.c — the bf16 products of a tile on AMX: S = K·Qᵀ and
 * acc += P·V with tdpbf16ps on 16x16 fp32 tiles. Everything else (the
 * softmax, the fp32 path, the tails the tiles do not cover) is the
 * avx512bf16 set's, which this set extends.
 *
 * The operands are the layouts the driver already builds for the bf16 dot
 * path (see kernels.h): K rows in place are the A tiles of the scores, the
 * query pairs qp[d/2][i] their B tiles (VNNI order), and the score tile
 * comes out keys by queries, as the softmax kernels want it. For P·V, the
 * V pairs vp[j/2][c] are the B tiles; the A tiles are P by queries, a
 * 16x16 transpose (of 32-bit pairs) of the pp[j/2][i] the softmax wrote.
 *
 * Decode's few-row kernels (up to 16 query rows) read the cache in place:
 * K rows are A tiles against the queries' pairs, and V rows are B tiles
 * whose pairs are pairs of columns, taken against P spread into the even
 * or the odd halves of A's pairs (so no V row is copied or transposed).
 * On CPUs with AMX-INT8, int8 caches take int8 tiles: the codes against
 * the int16 queries' high and low bytes, P's high and low bytes against
 * V codes regrouped by 4 keys, each pair of int32 sums joined exactly.
 *
 * Compiled twice: with the AMX instructions (-mamx-tile -mamx-bf16
 * -mamx-int8 -mavx512vbmi, set "amx"), and with QKV_AMX_EMULATE, where
 * each tile instruction is a loop of AVX512-BF16 code with the same
 * arithmetic (set "amx-emu"). The emulation is slow; it exists so that
 * the tiling, the transposes and the tails of this file are tested on
 * CPUs without AMX.
 */
#include "kernels.h"

#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <string.h>

#ifndef QKV_KERNEL_TABLE
#define QKV_KERNEL_TABLE qkv__kernels_amx
#endif
#ifndef QKV_KERNEL_NAME
#define QKV_KERNEL_NAME "amx"
#endif

enum { TR = 16,        /* rows of a tile */
       TB = 64 };      /* bytes per tile row: 16 fp32 or 16 bf16 pairs */

/* ---- the tile instructions ------------------------------------------------ */

/* A tile configuration (palette 1): rows and bytes per row of each tile. */
typedef struct {
    uint8_t  palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t  rows[16];
} tile_config;

/* All eight tiles 16 rows of 64 bytes. A constant, as every configuration
   here is static: GCC does not see that ldtilecfg reads its operand, and
   dropped the stores that built one on the stack (the instruction then
   faulted on, or loaded, the stack's old bytes). */
static const tile_config tile_cfg __attribute__((aligned(64))) = {
    .palette = 1,
    .colsb = { TB, TB, TB, TB, TB, TB, TB, TB },
    .rows = { TR, TR, TR, TR, TR, TR, TR, TR },
};

#ifdef QKV_AMX_EMULATE
/* Eight 1 KiB tile registers per thread and their configuration. Loads
   fill a tile's configured rows and bytes and zero the rest; dpbf16:
   C[m][n] += Σ_k A[m][k]·B[k][n] over bf16 pairs for C's rows and A's
   pairs, products exact and sums in fp32, as tdpbf16ps does. */
static _Thread_local union { float f[TR][TR]; uint32_t u[TR][TR]; } tmm[8];
static _Thread_local tile_config tcfg;

static void t_zero(int t) { memset(&tmm[t], 0, sizeof tmm[t]); }
static void t_load(int t, const void *p, int64_t stride)
{
    memset(&tmm[t], 0, sizeof tmm[t]);
    for (int r = 0; r < tcfg.rows[t]; r++)
        memcpy(tmm[t].u[r], (const char *)p + r * stride, tcfg.colsb[t]);
}
static void t_store(int t, void *p, int64_t stride)
{
    for (int r = 0; r < tcfg.rows[t]; r++)
        memcpy((char *)p + r * stride, tmm[t].u[r], tcfg.colsb[t]);
}
static void t_dp(int c, int a, int b)
{
    for (int m = 0; m < tcfg.rows[c]; m++) {
        __m512 acc = _mm512_loadu_ps(tmm[c].f[m]);
        for (int k = 0; k < tcfg.colsb[a] / 4; k++)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32((int)tmm[a].u[m][k]),
                                   (__m512bh)_mm512_loadu_si512(tmm[b].u[k]));
        _mm512_storeu_ps(tmm[c].f[m], acc);
    }
}
/* The int8 products (tdpbssd, tdpbsud, tdpbusd): C[m][n] += Σ_k
   A[m][k]·B[k/4][4n + k%4] over A's bytes, signed (sa, sb 1) or not,
   summed in int32 (wrapping). */
static void t_dp_i8(int c, int a, int b, int sa, int sb)
{
    const uint8_t *ab = (const uint8_t *)tmm[a].u, *bb = (const uint8_t *)tmm[b].u;
    for (int m = 0; m < tcfg.rows[c]; m++)
        for (int n = 0; n < tcfg.colsb[c] / 4; n++) {
            uint32_t acc = tmm[c].u[m][n];
            for (int k = 0; k < tcfg.colsb[a]; k++) {
                const int32_t x = sa ? (int8_t)ab[m * TB + k] : ab[m * TB + k];
                const int32_t y = sb ? (int8_t)bb[k / 4 * TB + 4 * n + k % 4]
                                     : bb[k / 4 * TB + 4 * n + k % 4];
                acc += (uint32_t)(x * y);
            }
            tmm[c].u[m][n] = acc;
        }
}
static void t_cfg_load(const tile_config *c) { tcfg = *c; }
static void t_cfg_release(void) {}
#define T_ZERO(t)          t_zero(t)
#define T_LOAD(t, p, s)    t_load(t, p, s)
#define T_LOAD1(t, p, s)   t_load(t, p, s)
#define T_STORE(t, p, s)   t_store(t, p, s)
#define T_DP(c, a, b)      t_dp(c, a, b)
#define T_DPBSSD(c, a, b)  t_dp_i8(c, a, b, 1, 1)
#define T_DPBSUD(c, a, b)  t_dp_i8(c, a, b, 1, 0)
#define T_DPBUSD(c, a, b)  t_dp_i8(c, a, b, 0, 1)
#else
static void t_cfg_load(const tile_config *c) { _tile_loadconfig(c); }
static void t_cfg_release(void) { _tile_release(); }
#define T_ZERO(t)          _tile_zero(t)
#define T_LOAD(t, p, s)    _tile_loadd(t, p, s)
#define T_LOAD1(t, p, s)   _tile_stream_loadd(t, p, s)
#define T_STORE(t, p, s)   _tile_stored(t, p, s)
#define T_DP(c, a, b)      _tile_dpbf16ps(c, a, b)
#define T_DPBSSD(c, a, b)  _tile_dpbssd(c, a, b)
#define T_DPBSUD(c, a, b)  _tile_dpbsud(c, a, b)
#define T_DPBUSD(c, a, b)  _tile_dpbusd(c, a, b)
#endif
/* A tile of cache rows, read once (decode): with the hint not to keep
   them (tileloaddt1), else (rows copied into the kernel's own buffer) as
   usual. Measured on the Xeon (32/8 heads of 128, two builds alternated,
   128 MB of other memory read before each call): 1x32768 head-major
   0.98-0.99x the time, pools 0.98-1.00x, position-major 0.99-1.00x,
   8x8192 0.99x; 4 new queries 0.96x head-major, 0.98-0.99x
   position-major. Steady calls on caches of 2-16 MiB (one build a
   process, 6-10 processes each): 0.93-1.00x. */
#define T_LOAD_ROWS(t, p, s, in_place)                                       \
    do {                                                                     \
        if (in_place)                                                        \
            T_LOAD1(t, p, s);                                                \
        else                                                                 \
            T_LOAD(t, p, s);                                                 \
    } while (0)

/* A kernel configures the tiles (t_begin_cfg) and releases them when it
   returns (t_end). The decode kernels instead leave their configuration
   loaded (t_keep), and the next call on the thread with the same one
   skips the load: LDTILECFG takes about 200 cycles, and a key tile walked
   in sub-tiles calls the scores kernel for every kv head of a sub-tile in
   turn, then P·V the same way. dec_done releases what is left; a kernel
   never relies on what its tiles hold before it loads or zeroes them. */
static _Thread_local const tile_config *kept;

static void t_begin_cfg(const tile_config *c)
{
    if (kept != c)
        t_cfg_load(c);
    kept = NULL;
}
static void t_end(void) { t_cfg_release(); }
static void t_keep(const tile_config *c) { kept = c; }
static void dec_done(void)
{
    if (kept) {
        t_cfg_release();
        kept = NULL;
    }
}

static void t_begin(void) { t_begin_cfg(&tile_cfg); }

/* The avx512bf16 kernels, for what the tiles do not cover. */
static void (*dot_qk)(int, int, int, float, const uint16_t *, int64_t, const uint32_t *,
                      int64_t, float *, int64_t);
static void (*dot_pv)(int, int, int, const uint32_t *, int64_t, const uint32_t *, int64_t,
                      const float *, float *, int64_t);
static void (*dot_mm)(int, int, int, const uint32_t *, int64_t, int64_t, const uint32_t *,
                      int64_t, float *, int64_t);


/* ---- 2x2 blocks of C tiles ------------------------------------------------- */

/* C tiles 0..3, at most 2x2 (ni row blocks, nc column blocks), from or
   to c, rows ldc floats apart. */
static inline void c_load(int ni, int nc, const float *c, int64_t ldc)
{
    T_LOAD(0, c, ldc * 4);
    if (nc > 1) T_LOAD(1, c + TR, ldc * 4);
    if (ni > 1) T_LOAD(2, c + TR * ldc, ldc * 4);
    if (ni > 1 && nc > 1) T_LOAD(3, c + TR * ldc + TR, ldc * 4);
}

static inline void c_store(int ni, int nc, float *c, int64_t ldc)
{
    T_STORE(0, c, ldc * 4);
    if (nc > 1) T_STORE(1, c + TR, ldc * 4);
    if (ni > 1) T_STORE(2, c + TR * ldc, ldc * 4);
    if (ni > 1 && nc > 1) T_STORE(3, c + TR * ldc + TR, ldc * 4);
}

/* C += A·B over one chunk of 16 pairs: A tiles 4, 5 (row blocks at a0, a1,
   rows lda bytes apart), B tiles 6, 7 (column blocks at b0, b1, rows ldb
   bytes apart). */
static inline void dp_2x2(int ni, int nc, const void *a0, const void *a1, int64_t lda,
                          const void *b0, const void *b1, int64_t ldb)
{
    T_LOAD(4, a0, lda);
    if (ni > 1) T_LOAD(5, a1, lda);
    T_LOAD(6, b0, ldb);
    if (nc > 1) T_LOAD(7, b1, ldb);
    T_DP(0, 4, 6);
    if (nc > 1) T_DP(1, 4, 7);
    if (ni > 1) T_DP(2, 5, 6);
    if (ni > 1 && nc > 1) T_DP(3, 5, 7);
}

/* ---- scores ---------------------------------------------------------------- */

/* st[j][i] for 16·nk keys from k, 16·nq queries from qp (nk, nq in 1..2):
   C tiles 0..3 = (key block, query block), A tiles 4, 5 (keys), B 6, 7. */
static void qk_pair_tiles(int nk, int nq, int dp, const uint16_t *k, int64_t ldk,
                          const uint32_t *qp, int64_t ldqp, float *st, int64_t ldst)
{
    T_ZERO(0); T_ZERO(1); T_ZERO(2); T_ZERO(3);
    for (int x = 0; x < dp; x += TR)
        dp_2x2(nk, nq, k + 2 * x, k + TR * ldk + 2 * x, ldk * 2, qp + x * ldqp,
               qp + x * ldqp + TR, ldqp * 4);
    c_store(nk, nq, st, ldst);
}

/* Contract of kernels.h's qk_bf16. The tiles take whole blocks of 16 keys
   and d in chunks of 32 (dp a multiple of 16); the last n % 16 keys, and
   any d that is not, go to the dot-product kernel. */
static void qk_amx(int n, int m, int dp, float scale, const uint16_t *k, int64_t ldk,
                   const uint32_t *qp, int64_t ldqp, float *st, int64_t ldst)
{
    if (dp % TR) {
        dot_qk(n, m, dp, scale, k, ldk, qp, ldqp, st, ldst);
        return;
    }
    const int nfull = n - n % TR;
    t_begin();
    for (int j = 0; j < nfull; j += 2 * TR) {
        const int nk = nfull - j >= 2 * TR ? 2 : 1;
        for (int i = 0; i < m; i += 2 * TR)
            qk_pair_tiles(nk, m - i >= 2 * TR ? 2 : 1, dp, k + j * ldk, ldk, qp + i, ldqp,
                     st + j * ldst + i, ldst);
    }
    t_end();
    const __m512 sc = _mm512_set1_ps(scale);
    for (int j = 0; j < nfull; j++)
        for (int i = 0; i < m; i += 16)
            _mm512_storeu_ps(st + j * ldst + i, _mm512_mul_ps(_mm512_loadu_ps(st + j * ldst + i), sc));
    if (nfull < n)
        dot_qk(n - nfull, m, dp, scale, k + nfull * ldk, ldk, qp, ldqp, st + nfull * ldst, ldst);
}

/* ---- whole-tile products on packed operands --------------------------------- */

/* Word indices of transpose_words' rounds, by log2 of the columns per
   register before the round: lo takes the lower half of the columns, hi
   the upper, of registers a (index < 16) and b. */
static int32_t tw_idx[5][2][TR];

static void tw_idx_init(void)
{
    for (int l = 1; l <= 4; l++) {
        const int nc = 1 << l, rpr = TR / nc, h = nc / 2;
        for (int e = 0; e < TR; e++) {
            const int r = e / h, c = e % h;
            const int src = r < rpr ? nc * r + c : TR + nc * (r - rpr) + c;
            tw_idx[l][0][e] = src;
            tw_idx[l][1][e] = src + h;
        }
    }
}

/* One round of transpose_words on x[0..N), nc = 2^l columns per register
   before it: registers g·nc + b (column group g of N / nc, row block b of
   nc) pair up along b, each pair's lower columns going to the first half
   of the new group and the upper to the second. */
static inline __attribute__((always_inline)) void tw_round(__m512i *x, int N, int nc, int l)
{
    const __m512i il = _mm512_loadu_si512(tw_idx[l][0]), ih = _mm512_loadu_si512(tw_idx[l][1]);
    __m512i y[TR];
#pragma GCC unroll 16
    for (int t = 0; t < N / 2; t++) {
        const int g = t / (nc / 2), i = t % (nc / 2);
        const __m512i a = x[g * nc + 2 * i], b = x[g * nc + 2 * i + 1];
        y[2 * g * (nc / 2) + i] = _mm512_permutex2var_epi32(a, il, b);
        y[(2 * g + 1) * (nc / 2) + i] = _mm512_permutex2var_epi32(a, ih, b);
    }
#pragma GCC unroll 16
    for (int t = 0; t < N; t++)
        x[t] = y[t];
}

/* x[0..N) holds a 16 x N matrix of 32-bit words (N 4, 8 or 16), row-major,
   16/N rows per register; on return x[c] holds column c. Each round
   splits every register's columns in halves and pairs its rows with the
   next register's: N·log2(N) permutes, every index known when it is
   compiled (written as loops, GCC kept the registers in memory: decode
   scores at 16 queries took 1.7x the time). */
static inline __attribute__((always_inline)) void transpose_words(__m512i *x, int N)
{
    if (N == TR) {
        tw_round(x, TR, 16, 4);
        tw_round(x, TR, 8, 3);
        tw_round(x, TR, 4, 2);
        tw_round(x, TR, 2, 1);
    } else if (N == 8) {
        tw_round(x, 8, 8, 3);
        tw_round(x, 8, 4, 2);
        tw_round(x, 8, 2, 1);
    } else {
        tw_round(x, 4, 4, 2);
        tw_round(x, 4, 2, 1);
    }
}

static void pack_k_tiles(const uint16_t *k, int64_t ldk, int n, int dp, int dpp, uint32_t *dst)
{
    for (int j0 = 0; j0 < n; j0 += TR, dst += TR * dpp) {
        const int nk = n - j0 < TR ? n - j0 : TR;
        for (int x = 0; x < dpp; x += TR) {
            const int w = dp - x < TR ? (dp - x > 0 ? dp - x : 0) : TR;
            const __mmask16 mk = (__mmask16)((1u << w) - 1);
            __m512i r[TR];
            for (int j = 0; j < TR; j++)
                r[j] = j < nk ? _mm512_maskz_loadu_epi32(mk, k + (j0 + j) * ldk + 2 * x)
                              : _mm512_setzero_si512();
            transpose_words(r, TR);
            for (int xx = 0; xx < TR; xx++)
                _mm512_storeu_si512(dst + (x + xx) * TR, r[xx]);
        }
    }
}

/* The lanes of the first n of a vector (none for n <= 0). */
static inline __mmask16 first_lanes(int64_t n)
{
    return (__mmask16)(n <= 0 ? 0u : n < TR ? (1u << n) - 1 : 0xFFFFu);
}

/* 32 values x0 (the first 16), x1 as 32 bf16 hi = x rounded and lo =
   x - hi rounded, two vectors a conversion. */
static inline void split32(__m512 x0, __m512 x1, __m512i *hi, __m512i *lo)
{
    const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
    const __m512 h0 = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
    const __m512 h1 = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
    *hi = h;
    *lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, h1), _mm512_sub_ps(x0, h0));
}

/* hi, lo (and hi2) of the first n (up to 32) values x0, x1 at element i;
   whole vectors store unmasked (a masked store does not forward to the
   loads that soon read it). */
static inline void split_store(__m512 x0, __m512 x1, int64_t n, int64_t i, uint16_t *hi,
                               uint16_t *lo, uint16_t *hi2)
{
    __m512i h, l;
    split32(x0, x1, &h, &l);
    if (n >= 2 * TR) {
        _mm512_storeu_si512(hi + i, h);
        _mm512_storeu_si512(lo + i, l);
        if (hi2)
            _mm512_storeu_si512(hi2 + i, h);
        return;
    }
    const __mmask32 mk = (__mmask32)((1u << n) - 1);
    _mm512_mask_storeu_epi16(hi + i, mk, h);
    _mm512_mask_storeu_epi16(lo + i, mk, l);
    if (hi2)
        _mm512_mask_storeu_epi16(hi2 + i, mk, h);
}

/* Contract of kernels.h's split_f16. */
static void split_f16_amx(const uint16_t *h, int64_t n, uint16_t *hi, uint16_t *lo, uint16_t *hi2)
{
    for (int64_t i = 0; i < n; i += 2 * TR)
        split_store(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(n - i), h + i)),
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(n - i - TR), h + i + TR)),
                    n - i, i, hi, lo, hi2);
}

/* Contract of kernels.h's split_f32. */
static void split_f32_amx(const float *x, int64_t n, uint16_t *hi, uint16_t *lo, uint16_t *hi2)
{
    for (int64_t i = 0; i < n; i += 2 * TR)
        split_store(_mm512_maskz_loadu_ps(first_lanes(n - i), x + i),
                    _mm512_maskz_loadu_ps(first_lanes(n - i - TR), x + i + TR), n - i, i, hi, lo,
                    hi2);
}

/* Word indices that interleave two rows' 16 bf16 (the lower and upper
   halves of a register) into 16 pairs. */
static const uint16_t pair_idx[2 * TR] __attribute__((aligned(64))) = {
    0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31 };

/* The pairs (a, b) of hi and of lo of 16 values of two rows, at word i:
   both rows rounded in one conversion and interleaved, the pairs' halves
   shifted back to fp32 for lo. */
static inline void split_pairs_store(__m512 xa, __m512 xb, __mmask16 mk, int64_t i, uint32_t *hi,
                                     uint32_t *lo, uint32_t *hi2)
{
    const __m512i idx = _mm512_load_si512(pair_idx);
    const __m512i h = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(xb, xa));
    const __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    const __m512 hb = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32(-65536)));
    const __m512i l = _mm512_permutexvar_epi16(
        idx, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(xb, hb), _mm512_sub_ps(xa, ha)));
    if (mk == 0xFFFFu) {
        _mm512_storeu_si512(hi + i, h);
        _mm512_storeu_si512(lo + i, l);
        if (hi2)
            _mm512_storeu_si512(hi2 + i, h);
        return;
    }
    _mm512_mask_storeu_epi32(hi + i, mk, h);
    _mm512_mask_storeu_epi32(lo + i, mk, l);
    if (hi2)
        _mm512_mask_storeu_epi32(hi2 + i, mk, h);
}

/* Contract of kernels.h's split_pairs_f16. */
static void split_pairs_f16_amx(const uint16_t *a, const uint16_t *b, int64_t n, uint32_t *hi,
                                uint32_t *lo, uint32_t *hi2)
{
    for (int64_t i = 0; i < n; i += TR) {
        const __mmask16 mk = first_lanes(n - i);
        const __m512 xa = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, a + i));
        const __m512 xb =
            b ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, b + i)) : _mm512_setzero_ps();
        split_pairs_store(xa, xb, mk, i, hi, lo, hi2);
    }
}

/* Contract of kernels.h's split_pairs_f32. */
static void split_pairs_f32_amx(const float *a, const float *b, int64_t n, uint32_t *hi,
                                uint32_t *lo, uint32_t *hi2)
{
    for (int64_t i = 0; i < n; i += TR) {
        const __mmask16 mk = first_lanes(n - i);
        const __m512 xb = b ? _mm512_maskz_loadu_ps(mk, b + i) : _mm512_setzero_ps();
        split_pairs_store(_mm512_maskz_loadu_ps(mk, a + i), xb, mk, i, hi, lo, hi2);
    }
}

/* Contract of kernels.h's pack_k_split: pack_k_tiles' transposes, on the
   words of hi and of lo of 32 values of each of 16 keys. */
static void pack_k_split(const uint16_t *k, int64_t ldk, int n, int d, int dpp, uint32_t *dst)
{
    const int64_t panel = 2 * (int64_t)dpp * TR;   /* words */
    for (int j0 = 0; j0 < n; j0 += TR, dst += panel) {
        const int nk = n - j0 < TR ? n - j0 : TR;
        for (int x = 0; x < dpp; x += TR) {
            const __mmask16 m0 = first_lanes(d - 2 * x), m1 = first_lanes(d - 2 * x - TR);
            __m512i h[TR], l[TR];
            for (int j = 0; j < TR; j++) {
                h[j] = l[j] = _mm512_setzero_si512();
                if (j < nk) {
                    const uint16_t *r = k + (int64_t)(j0 + j) * ldk + 2 * x;
                    split32(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m0, r)),
                            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m1, r + TR)), &h[j], &l[j]);
                }
            }
            transpose_words(h, TR);
            transpose_words(l, TR);
            for (int xx = 0; xx < TR; xx++) {
                _mm512_storeu_si512(dst + (x + xx) * TR, h[xx]);
                _mm512_storeu_si512(dst + (dpp + x + xx) * TR, l[xx]);
            }
        }
    }
}

/* Contract of kernels.h's pack_v_split. */
static void pack_v_split(const uint16_t *v, int64_t ldv, int n, int dv, int dvp, uint32_t *dst)
{
    const int64_t chunk = (int64_t)TR * dvp;   /* words of one chunk of 32 keys */
    for (int j0 = 0; j0 < n; j0 += 2 * TR, dst += 2 * chunk)
        for (int jj = 0; jj < TR; jj++) {
            const int r0 = j0 + 2 * jj, r1 = r0 + 1;
            for (int c = 0; c < dvp; c += TR) {
                const __mmask16 mk = first_lanes(dv - c);
                const __m512 a = r0 < n ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                                              mk, v + (int64_t)r0 * ldv + c))
                                        : _mm512_setzero_ps();
                const __m512 b = r1 < n ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                                              mk, v + (int64_t)r1 * ldv + c))
                                        : _mm512_setzero_ps();
                const int64_t at = (int64_t)c * TR + jj * TR;
                split_pairs_store(a, b, 0xFFFF, 0, dst + at, dst + chunk + at, NULL);
            }
        }
}

static void pack_v_tiles(const uint16_t *v, int64_t ldv, int n, int dv, int dvp, uint32_t *dst)
{
    for (int j0 = 0; j0 < n; j0 += 2 * TR, dst += TR * dvp)
        for (int jj = 0; jj < TR; jj++) {
            const int r0 = j0 + 2 * jj, r1 = r0 + 1;
            for (int c = 0; c < dvp; c += TR) {
                const int w = dv - c < TR ? (dv - c > 0 ? dv - c : 0) : TR;
                const __mmask16 mk = (__mmask16)((1u << w) - 1);
                const __m256i a = r0 < n ? _mm256_maskz_loadu_epi16(mk, v + r0 * ldv + c)
                                         : _mm256_setzero_si256();
                const __m256i b = r1 < n ? _mm256_maskz_loadu_epi16(mk, v + r1 * ldv + c)
                                         : _mm256_setzero_si256();
                const __m512i p = _mm512_or_si512(
                    _mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
                _mm512_storeu_si512(dst + c * TR + jj * TR, p);
            }
        }
}

/* 2^x for x <= 0 or NaN, 16 at a time: x = n + f with n an integer and
   |f| <= 1/2 (vreduceps), 2^f by a degree-5 polynomial fitted for relative
   error on that range (2.3e-7 in fp32 arithmetic), 2^n by vscalefps. Below
   -125 the result is 0 (so 2^-inf = 0), set by the mask rather than by
   underflow: an underflowing result costs a microcode assist, and the
   softmax of a masked tile ran 15 times slower through them. NaN stays
   NaN. */
static inline __m512 exp2_16(__m512 x)
{
    const __m512 lo = _mm512_set1_ps(-125.0f);
    const __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
    x = _mm512_max_ps(lo, x);   /* NaN: the second operand */
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 n = _mm512_sub_ps(x, f);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.327637699e-3f), f, _mm512_set1_ps(9.675515816e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713465e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402212024e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000119e+0f));
    return _mm512_maskz_scalef_ps(live, p, n);
}

/* The lanes of the vector at key j that lie in [lo, hi). */
static inline __mmask16 lanes(int j, int lo, int hi)
{
    const int a = lo - j > 0 ? lo - j : 0, b = hi - j < TR ? hi - j : TR;
    return b <= a ? 0 : (__mmask16)(((1u << b) - 1) & ~((1u << a) - 1));
}

/* The 32 bf16 of P for keys j .. j+31 (e0 the first 16) into pi: as
   they are, or split (softmax_tiles): ph = P rounded, pl = P - ph
   rounded, as ph, ph, pl from pi + 3j. */
static inline void store_p(uint16_t *pi, int j, __m512 e0, __m512 e1, int split)
{
    if (!split) {
        _mm512_storeu_si512(pi + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        return;
    }
    __m512i h, l;
    split32(e0, e1, &h, &l);
    _mm512_storeu_si512(pi + 3 * j, h);
    _mm512_storeu_si512(pi + 3 * j + 2 * TR, h);
    _mm512_storeu_si512(pi + 3 * j + 4 * TR, l);
}

/* The exponentials of a row's keys [lo, hi) against reference mref
   (mref·log2e = -nm in nm): P = 2^(x·sc + nm), times pmul[j] where pmul
   is set, into pi (split or not, store_p), zero elsewhere up to
   round_up(nz, 32); returns Σ P (unrounded, before pmul) and, in *vmax,
   the lanes' max of the raw scores (NaN dropped) when track is set. */
static inline float exp_row(int lo, int hi, int nz, __m512 sc, __m512 nm, const float *si,
                            const float *pmul, uint16_t *pi, int split, int track, __m512 *vmax)
{
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps(), v0 = ninf, v1 = ninf;
    for (int j = 0; j < nz; j += 2 * TR) {
        if (j + 2 * TR <= lo || j >= hi) {
            store_p(pi, j, _mm512_setzero_ps(), _mm512_setzero_ps(), split);
            continue;
        }
        __m512 x0, x1;
        if (j >= lo && j + 2 * TR <= hi) {
            x0 = _mm512_loadu_ps(si + j);
            x1 = _mm512_loadu_ps(si + j + TR);
        } else {   /* keys outside [lo, hi) read as -inf: P = 0 */
            x0 = _mm512_mask_loadu_ps(ninf, lanes(j, lo, hi), si + j);
            x1 = _mm512_mask_loadu_ps(ninf, lanes(j + TR, lo, hi), si + j + TR);
        }
        if (track) {
            v0 = _mm512_max_ps(x0, v0);
            v1 = _mm512_max_ps(x1, v1);
        }
        __m512 e0 = exp2_16(_mm512_fmadd_ps(x0, sc, nm));
        __m512 e1 = exp2_16(_mm512_fmadd_ps(x1, sc, nm));
        sum0 = _mm512_add_ps(sum0, e0);
        sum1 = _mm512_add_ps(sum1, e1);
        if (pmul) {
            e0 = _mm512_mul_ps(e0, _mm512_maskz_loadu_ps(lanes(j, lo, hi), pmul + j));
            e1 = _mm512_mul_ps(e1, _mm512_maskz_loadu_ps(lanes(j + TR, lo, hi), pmul + j + TR));
        }
        store_p(pi, j, e0, e1, split);
    }
    if (track)
        *vmax = _mm512_max_ps(v0, v1);
    return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

/* How far (natural log) a row's max may rise above its reference before
   the reference moves: P stays below e^8 against a stale one. */
#define REF_SLACK 8.0f

/* One row of softmax_tiles: s_i's scores of keys [lo, hi) (the others
   hidden), sc = scale·log2e (scale > 0), P into p_i up to round_up(nz,
   32) (nz >= hi). The reference the exponentials subtract is the running
   max, but it moves only when a tile's max rises more than REF_SLACK above
   it: then one pass over the row does, with alpha 1 and acc left alone. A
   first tile, or a larger rise, takes the row's max first and a second
   pass. mrow holds the reference: lse = mrow + log(lrow) either way.
   split: P split as softmax_tiles splits it. */
static inline void softmax_row(int lo, int hi, int nz, float scale, __m512 sc, const float *si,
                               float *mrow, float *lrow, float *alpha, uint16_t *pi, int split)
{
    const float log2e = 1.44269504088896341f;
    const float mo = *mrow;
    nz = (nz + 2 * TR - 1) / (2 * TR) * (2 * TR);
    if (mo > -INFINITY) {
        __m512 vmax;
        const float sum =
            exp_row(lo, hi, nz, sc, _mm512_set1_ps(-mo * log2e), si, NULL, pi, split, 1, &vmax);
        const float mx = _mm512_reduce_max_ps(vmax) * scale;
        if (!(mx > mo + REF_SLACK)) {
            *alpha = 1.0f;
            *lrow += sum;
            return;
        }
    }
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 v0 = ninf, v1 = ninf;
    int j = lo / TR * TR;
    for (; j + 2 * TR <= hi; j += 2 * TR) {
        v0 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, lanes(j, lo, hi), si + j), v0);
        v1 = _mm512_max_ps(_mm512_loadu_ps(si + j + TR), v1);
    }
    for (; j < hi; j += TR)
        v0 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, lanes(j, lo, hi), si + j), v0);
    /* scale > 0: the max of the scaled scores is the scaled max */
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(v0, v1)) * scale;
    const float mn = mx > mo ? mx : mo;
    const float mref = mn == -INFINITY ? 0.0f : mn;   /* all hidden: P = 0 */
    *alpha = mo == mn ? 1.0f : expf(mo - mref);
    *mrow = mn;
    const float sum =
        exp_row(lo, hi, nz, sc, _mm512_set1_ps(-mref * log2e), si, NULL, pi, split, 0, NULL);
    *lrow = *lrow * *alpha + sum;
}

static void softmax_tiles(int m, int n, float scale, const float *s, int64_t lds, float *mrow,
                          float *lrow, float *alpha, uint16_t *p, int64_t ldp, int split)
{
    const __m512 sc = _mm512_set1_ps(scale * 1.44269504088896341f);
    for (int i = 0; i < m; i++)
        softmax_row(0, n, n, scale, sc, s + i * lds, mrow + i, lrow + i, alpha + i, p + i * ldp,
                    split);
}

/* ---- the three steps pipelined over blocks of rows ------------------------- */

/* attn_tiles runs units of (key tile, block of up to 32 rows). While the
   vector units take the softmax of unit u row by row, the tile unit works
   through the scores of unit u + 1 and the P·V of unit u - 1, a few tile
   steps after each row: AMX and AVX-512 instructions interleaved, so that
   a CPU able to run them side by side can. The Xeon measured mostly
   cannot (4 tdpbf16ps and 96 FMAs took the sum of their times), and this
   kernel ran 1.07x as fast as the three steps called one after another
   (1,2048,2048,16,16,128: 1305 -> 1400 GFLOP/s). A step is one 2x2
   block of tile products (4 loads, 4 tdpbf16ps); a cursor walks a unit's
   steps. */
enum { UNIT_ROWS = 2 * TR };

typedef struct {
    int kind;                 /* 0 idle, 1 scores, 2 P·V */
    int ni, nk, nsteps;       /* row blocks; key panels (scores) or 2 column blocks */
    int blk, nblk, step;      /* the 2x2 block and the step within it */
    const uint16_t *a;        /* q or P rows */
    int64_t lda;              /* their stride, elements */
    const uint32_t *b;        /* packed K or V */
    int dpp, dvp;             /* pairs of a packed key; values of a packed V row */
    int split;                /* split fp16 (kernels.h split_f16): */
    int wrap;                 /* scores: the steps from which K's first part is read again */
    float *c;                 /* S (scores) or acc */
    int64_t ldc;
} tile_cursor;

/* One step of cursor t; 0 when it has none left. */
static int tile_step(tile_cursor *t)
{
    if (t->kind == 0 || t->blk >= t->nblk)
        return 0;
    const int ni = t->ni, step = t->step;
    if (t->kind == 1) {   /* scores: block = pair of key panels, step = 16 pairs of d */
        const int pnl = 2 * t->blk, nk = t->nk - pnl > 1 ? 2 : 1;
        const int ks = t->wrap && step >= t->wrap ? step - t->wrap : step;   /* (kh | kl | kh) */
        const uint32_t *kb = t->b + pnl * TR * t->dpp + ks * TR * TR;
        const uint16_t *qa = t->a + 2 * TR * step;
        float *c = t->c + pnl * TR;
        if (step == 0) {
            T_ZERO(0); T_ZERO(1); T_ZERO(2); T_ZERO(3);
        }
        dp_2x2(ni, nk, qa, qa + TR * t->lda, t->lda * 2, kb, kb + TR * t->dpp, TB);
        if (step + 1 == t->nsteps)
            c_store(ni, nk, c, t->ldc);
    } else {              /* P·V: block = pair of column blocks, step = chunk of 32 keys */
        const int c0 = 2 * TR * t->blk, nc = t->dvp - c0 > TR ? 2 : 1;
        float *c = t->c + c0;
        /* split: P's chunks ph, ph, pl against V's vh, vl, vh */
        const int vs = t->split ? 2 * (step / 3) + (step % 3 == 1) : step;
        const uint32_t *v = t->b + vs * TR * t->dvp + c0 * TR;
        const uint16_t *pa = t->a + 2 * TR * step;
        if (step == 0)
            c_load(ni, nc, c, t->ldc);
        dp_2x2(ni, nc, pa, pa + TR * t->lda, t->lda * 2, v, v + TR * TR, TB);
        if (step + 1 == t->nsteps)
            c_store(ni, nc, c, t->ldc);
    }
    if (++t->step == t->nsteps) {
        t->step = 0;
        t->blk++;
    }
    return 1;
}

/* A cursor over the scores s = q·kᵀ of mr <= 32 rows and the n keys of
   the panels kt, dpp pairs a part (split: q of three parts, kt of two). */
static tile_cursor cursor_qk(int mr, int n, int dpp, const uint16_t *q, int64_t ldq,
                             const uint32_t *kt, float *s, int64_t lds, int split)
{
    const int nk = (n + TR - 1) / TR;
    const tile_cursor c = { .kind = 1, .ni = (mr + TR - 1) / TR, .nk = nk,
                            .nsteps = (split ? 3 : 1) * dpp / TR, .nblk = (nk + 1) / 2, .a = q,
                            .lda = ldq, .b = kt, .dpp = (split ? 2 : 1) * dpp,
                            .wrap = split ? 2 * dpp / TR : 0, .c = s, .ldc = lds };
    return c;
}

/* A cursor over acc += P·V for mr <= 32 rows and the n keys of the
   chunks vt (split: P of three chunks a chunk of keys, vt of two). */
static tile_cursor cursor_pv(int mr, int n, int dvp, const uint16_t *p, int64_t ldp,
                             const uint32_t *vt, float *acc, int64_t lda, int split)
{
    const tile_cursor c = { .kind = 2, .ni = (mr + TR - 1) / TR,
                            .nsteps = (split ? 3 : 1) * ((n + 2 * TR - 1) / (2 * TR)),
                            .nblk = (dvp + 2 * TR - 1) / (2 * TR), .a = p, .lda = ldp, .b = vt,
                            .dvp = dvp, .split = split, .c = acc, .ldc = lda };
    return c;
}

/* acc's rows r < m times alpha[r], where it is not 1. */
static void rescale_rows(int m, int dvp, const float *alpha, float *acc, int64_t lda)
{
    for (int i = 0; i < m; i++)
        if (alpha[i] != 1.0f) {
            const __m512 a = _mm512_set1_ps(alpha[i]);
            for (int c = 0; c < dvp; c += TR)
                _mm512_storeu_ps(acc + i * lda + c, _mm512_mul_ps(_mm512_loadu_ps(acc + i * lda + c), a));
        }
}

static void qk_tiles(int m, int nb, int dpp, const uint16_t *q, int64_t ldq,
                     const uint32_t *kt, float *s, int64_t lds, int split)
{
    t_begin();
    for (int i = 0; i < m; i += UNIT_ROWS) {
        tile_cursor c = cursor_qk(m - i < UNIT_ROWS ? m - i : UNIT_ROWS, TR * nb, dpp,
                                  q + i * ldq, ldq, kt, s + i * lds, lds, split);
        while (tile_step(&c))
            ;
    }
    t_end();
}

static void pv_tiles(int m, int nch, int dvp, const uint16_t *p, int64_t ldp,
                     const uint32_t *vt, const float *alpha, float *acc, int64_t lda, int split)
{
    if (alpha)
        rescale_rows(m, dvp, alpha, acc, lda);
    t_begin();
    for (int i = 0; i < m; i += UNIT_ROWS) {
        tile_cursor c = cursor_pv(m - i < UNIT_ROWS ? m - i : UNIT_ROWS, 2 * TR * nch, dvp,
                                  p + i * ldp, ldp, vt, acc + i * lda, lda, split);
        while (tile_step(&c))
            ;
    }
    t_end();
}

/* A unit of attn_tiles: key tile kt of n keys, rows r0..r0+mr. */
typedef struct { int kt, n, r0, mr; } tile_unit;

static tile_unit unit_at(int u, int m, int n, int bk)
{
    const int nb = (m + UNIT_ROWS - 1) / UNIT_ROWS, kt = u / nb, r0 = u % nb * UNIT_ROWS;
    const tile_unit t = { kt, n - kt * bk < bk ? n - kt * bk : bk, r0,
                          m - r0 < UNIT_ROWS ? m - r0 : UNIT_ROWS };
    return t;
}

static void attn_tiles(int m, int n, const int32_t *lo, const int32_t *hi, int bk, int dpp,
                       int dvp, float scale,
                       const uint16_t *q, int64_t ldq, const uint32_t *kt, const uint32_t *vt,
                       float *mrow, float *lrow, float *alpha, float *acc, int64_t lda, float *s,
                       uint16_t *p, int split)
{
    const int nunits = (n + bk - 1) / bk * ((m + UNIT_ROWS - 1) / UNIT_ROWS);
    const __m512 sc = _mm512_set1_ps(scale * 1.44269504088896341f);
    /* split: P and its row stride three times as long, V's chunks and K's
       panels two */
    const int sp = split ? 3 : 1, ldp = sp * bk, kd = (split ? 2 : 1) * dpp;
    /* S and P of units u and u + 1 in two buffers each, by parity */
    float *const sb[2] = { s, s + UNIT_ROWS * bk };
    uint16_t *const pb[2] = { p, p + UNIT_ROWS * ldp };
    tile_cursor qc, pc;
    t_begin();
    for (int u = -1; u <= nunits; u++) {
        /* the scores of unit u + 1 */
        memset(&qc, 0, sizeof qc);
        if (u + 1 < nunits) {
            const tile_unit x = unit_at(u + 1, m, n, bk);
            qc = cursor_qk(x.mr, x.n, dpp, q + x.r0 * ldq, ldq, kt + (int64_t)x.kt * bk * kd,
                           sb[(u + 1) & 1], bk, split);
        }
        /* the P·V of unit u - 1, its acc rows first rescaled */
        memset(&pc, 0, sizeof pc);
        if (u >= 1) {
            const tile_unit x = unit_at(u - 1, m, n, bk);
            rescale_rows(x.mr, dvp, alpha + x.r0, acc + x.r0 * lda, lda);
            pc = cursor_pv(x.mr, x.n, dvp, pb[(u - 1) & 1], ldp,
                           vt + (int64_t)x.kt * (split ? 2 : 1) * bk * (dvp / 2),
                           acc + x.r0 * lda, lda, split);
        }
        /* the softmax of unit u, a share of the tile steps after each row */
        if (u >= 0 && u < nunits) {
            const tile_unit x = unit_at(u, m, n, bk);
            const int steps = qc.nblk * qc.nsteps + pc.nblk * pc.nsteps;
            const int per = (steps + x.mr - 1) / x.mr;
            const float *su = sb[u & 1];
            uint16_t *pu = pb[u & 1];
            for (int i = 0; i < x.mr; i++) {
                const int r = x.r0 + i, k0 = x.kt * bk;
                const int l = lo && lo[r] > k0 ? lo[r] - k0 : 0;
                const int h = hi && hi[r] - k0 < x.n ? hi[r] - k0 : x.n;
                softmax_row(l, h > l ? h : l, x.n, scale, sc, su + i * bk, mrow + r, lrow + r,
                            alpha + r, pu + i * ldp, split);
                for (int k = 0; k < per; k++)
                    if (!tile_step(&qc))
                        tile_step(&pc);
            }
        }
        while (tile_step(&qc))
            ;
        while (tile_step(&pc))
            ;
    }
    t_end();
}

/* ---- decode: a few query rows against K and V rows in place --------------- */

/* The decode kernels of this set take head dims that are multiples of 32
   up to DEC_MAXD and at most 16 query rows; others go to wide_qk_dec and
   wide_pv_dec (the avx512 set's, which widen bf16 to fp32 FMAs). */
enum { DEC_MAXD = 256 };

static void (*wide_qk_dec)(int, int, int, float, const qkv__rows *, const uint16_t *, int64_t,
                           float *, int64_t, qkv__pf *);
static void (*wide_pv_dec)(int, int, int, const uint16_t *, int64_t, const qkv__rows *,
                           const float *, float *, int64_t, qkv__pf *);

/* P·V of m rows, 64 columns a pass: C tiles 0..3 (acc's even and odd
   columns of two blocks of 32, m rows), A tiles 4, 5 (P's keys in the
   even and odd halves of pairs, m rows of 16 keys), B tiles 6, 7 (V, 16
   keys by 32 columns of each block). */
#define PV_CFG(m) { .palette = 1, .colsb = { TB, TB, TB, TB, TB, TB, TB, TB }, \
                    .rows = { m, m, m, m, m, m, TR, TR } }
static const tile_config pv_cfg[TR + 1] __attribute__((aligned(64))) = {   /* by m; 0 unused */
    PV_CFG(1), PV_CFG(1), PV_CFG(2), PV_CFG(3), PV_CFG(4), PV_CFG(5), PV_CFG(6), PV_CFG(7),
    PV_CFG(8), PV_CFG(9), PV_CFG(10), PV_CFG(11), PV_CFG(12), PV_CFG(13), PV_CFG(14),
    PV_CFG(15), PV_CFG(16),
};

/* Query columns of the score tiles: m rounded up to 4, 8 or 16. */
static int dec_cols(int m)
{
    return m <= 4 ? 4 : m <= 8 ? 8 : TR;
}

/* f(args..., N) with N = dec_cols(m) a constant: the scores kernels are
   built once per column count, so that each pair of groups turns its
   scores out inline, with no call and no test of N. (As a function
   called for every pair, N tested at run time, the turn-out cost one
   thread 3% of its decode rate from DRAM: 1,1,32768 read 11.7-11.8 GB/s
   against 12.1-12.2.) */
#define BY_COLS(m, f, ...)                                                   \
    do {                                                                     \
        if (dec_cols(m) == 4)                                                \
            f(__VA_ARGS__, 4);                                               \
        else if (dec_cols(m) == 8)                                           \
            f(__VA_ARGS__, 8);                                               \
        else                                                                 \
            f(__VA_ARGS__, TR);                                              \
    } while (0)

/* The tiles of decode's scores for N query columns (4, 8, 16): 0, 1 the
   scores of two groups of 16 keys by N queries; 2, 3 their K rows, 16
   keys by 16 pairs of d; 4..7 the queries' pairs, 16 by N, one tile per
   chunk of 16 pairs (for head dims up to 128 loaded once per call, else
   4 and 5 in turn). */
#define QK_CFG(N) { .palette = 1, \
    .colsb = { 4 * (N), 4 * (N), TB, TB, 4 * (N), 4 * (N), 4 * (N), 4 * (N) }, \
    .rows = { TR, TR, TR, TR, TR, TR, TR, TR } }
static const tile_config qk_cfg[3] __attribute__((aligned(64))) = {
    QK_CFG(4), QK_CFG(8), QK_CFG(16),
};

/* The scores of a score tile s (16 keys by N queries) into m rows of st,
   the keys of mask mk, times sc. */
static inline __attribute__((always_inline)) void scores_out(const float *s, int N, int m,
                                                             __m512 sc, __mmask16 mk, float *st,
                                                             int64_t ldst)
{
    __m512i r[TR];   /* keys by queries: rows of 16/N keys, turned query-major */
#pragma GCC unroll 16
    for (int t = 0; t < N; t++)
        r[t] = _mm512_load_si512(s + t * TR);
    transpose_words(r, N);
    for (int i = 0; i < m && i < N; i++)
        _mm512_mask_storeu_ps(st + i * ldst, mk, _mm512_mul_ps(_mm512_castsi512_ps(r[i]), sc));
}

/* Word indices of queries_tiles' rounds, by log2 of the unit: lo takes
   the units of the lower halves of registers a and b in turn, hi those
   of the upper halves. */
static int32_t qt_idx[4][2][TR];

static void qt_idx_init(void)
{
    for (int l = 0; l < 4; l++) {
        const int u = 1 << l;
        for (int e = 0; e < TR; e++) {
            const int ue = e / u, w = e % u;
            const int src = (ue % 2 ? TR : 0) + ue / 2 * u + w;
            qt_idx[l][0][e] = src;
            qt_idx[l][1][e] = src + TR / 2;
        }
    }
}

/* One round of queries_tiles: registers 2i and 2i + 1 interleaved in
   units of 2^l words, the lower halves to register i and the upper to
   i + N/2; first[] follows the first pair each register holds (ppr pairs
   per register before the round). */
static inline __attribute__((always_inline)) void qt_round(__m512i *r, int *first, int N, int l,
                                                           int ppr)
{
    const __m512i il = _mm512_loadu_si512(qt_idx[l][0]), ih = _mm512_loadu_si512(qt_idx[l][1]);
    __m512i y[TR];
    int f[TR];
#pragma GCC unroll 8
    for (int i = 0; i < N / 2; i++) {
        y[i] = _mm512_permutex2var_epi32(r[2 * i], il, r[2 * i + 1]);
        y[i + N / 2] = _mm512_permutex2var_epi32(r[2 * i], ih, r[2 * i + 1]);
        f[i] = first[2 * i];
        f[i + N / 2] = first[2 * i] + ppr / 2;
    }
#pragma GCC unroll 16
    for (int i = 0; i < N; i++) {
        r[i] = y[i];
        first[i] = f[i];
    }
}

/* The B tiles of the scores: for each chunk x of 16 pairs of d, 16 rows
   (pairs) of N queries' words at qt + 16·N·x, from m rows of q (zero
   rows up to N). log2(N) rounds interleave pairs of registers in units of
   1, 2, ... words, each register keeping the first pair it holds. */
static inline __attribute__((always_inline)) void queries_tiles(const uint16_t *q, int64_t ldq,
                                                                int m, int dp, int N,
                                                                uint32_t *qt)
{
    for (int x = 0; x < dp; x += TR) {
        __m512i r[TR];
        int first[TR];
#pragma GCC unroll 16
        for (int i = 0; i < N; i++) {
            r[i] = i < m ? _mm512_loadu_si512(q + i * ldq + 2 * x) : _mm512_setzero_si512();
            first[i] = 0;
        }
        qt_round(r, first, N, 0, TR);
        qt_round(r, first, N, 1, TR / 2);
        if (N > 4)
            qt_round(r, first, N, 2, TR / 4);
        if (N > 8)
            qt_round(r, first, N, 3, TR / 8);
#pragma GCC unroll 16
        for (int i = 0; i < N; i++)
            _mm512_store_si512(qt + x * N + first[i] * N, r[i]);
    }
}

/* scores_out for a pair of score tiles s[0], s[1] of nk keys (1..32). */
static inline __attribute__((always_inline)) void scores_groups(float s[2][TR * TR], int N, int m,
                                                                 __m512 sc, int nk, float *st,
                                                                 int64_t ldst)
{
    for (int h = 0; h < 2 && nk > TR * h; h++) {
        const int nh = nk - TR * h < TR ? nk - TR * h : TR;
        const __mmask16 mk = (__mmask16)((1u << nh) - 1);
        if (N == 4)
            scores_out(s[h], 4, m, sc, mk, st + TR * h, ldst);
        else if (N == 8)
            scores_out(s[h], 8, m, sc, mk, st + TR * h, ldst);
        else
            scores_out(s[h], TR, m, sc, mk, st + TR * h, ldst);
    }
}

/* A pair of score groups (keys j.., nk of them) done: their tiles 0, 1
   stored into s[cur], and the previous pair's (keys *last.., *lastn of
   them, in s[cur ^ 1]) turned out now that their stores have landed. */
static inline __attribute__((always_inline)) void scores_pair(float s[2][2][TR * TR], int cur,
                                                              int two, int N, int m, __m512 sc,
                                                              int j, int nk, int *last,
                                                              int *lastn, float *st,
                                                              int64_t ldst)
{
    T_STORE(0, s[cur][0], 4 * N);
    if (two) T_STORE(1, s[cur][1], 4 * N);
    if (*last >= 0)
        scores_groups(s[cur ^ 1], N, m, sc, *lastn, st + *last, ldst);
    *last = j;
    *lastn = nk;
}

/* Contract of kernels.h's qk_bf16_dec. The scores come out keys by
   queries: each group of 16 keys is an A tile, read in place where its
   rows lie in one block at one stride (else copied, zero past n), against
   the queries' pairs as B tiles (transposed once per call); the 16 x N
   result, turned query-major in registers and scaled, goes to st. Each
   key's scores depend on its row alone, so any split of the keys, and any
   layout of the cache, gives the same bits. */
static inline __attribute__((always_inline)) void qk_dec_cols(int n, int m, int dp, float scale,
                                                               const qkv__rows *k,
                                                               const uint16_t *q, int64_t ldq,
                                                               float *st, int64_t ldst,
                                                               qkv__pf *pf, const int N)
{
    uint32_t qt[DEC_MAXD / 2 * TR] __attribute__((aligned(64)));
    uint32_t kb[2 * TR * DEC_MAXD / 2] __attribute__((aligned(64)));
    queries_tiles(q, ldq, m, dp, N, qt);
    const __m512 sc = _mm512_set1_ps(scale);
    const int nx = dp / TR;   /* chunks of 16 pairs of d */
    const int ask_x = pf ? (8 * pf->per4 + nx - 1) / nx : 0;   /* per chunk of 32 keys */
    /* the scores of the last pair of groups, turned out one pair later,
       when their tile stores have landed */
    float s[2][2][TR * TR] __attribute__((aligned(64)));
    int last = -1, lastn = 0;
    const tile_config *cfg = &qk_cfg[N == 4 ? 0 : N == 8 ? 1 : 2];
    t_begin_cfg(cfg);
    if (nx <= 4) {   /* the queries' tiles stay for the call */
        T_LOAD(4, qt, 4 * N);
        if (nx > 1) T_LOAD(5, qt + TR * N, 4 * N);
        if (nx > 2) T_LOAD(6, qt + 2 * TR * N, 4 * N);
        if (nx > 3) T_LOAD(7, qt + 3 * TR * N, 4 * N);
    }
    int cur = 0;
    for (int j = 0; j < n; j += 2 * TR, cur ^= 1) {
        const int nk = n - j < 2 * TR ? n - j : 2 * TR, two = nk > TR;
        const char *a[2];
        int64_t lda[2];
        int in_place[2] = { 1, 1 };
        for (int h = 0; h <= two; h++) {
            const int jh = j + TR * h, nh = nk - TR * h < TR ? nk - TR * h : TR;
            const qkv__walk w = qkv__walk_at(k, jh);
            a[h] = w.at;
            lda[h] = k->ld;
            if (nh < TR || w.left < TR) {
                in_place[h] = 0;
                uint32_t *dst = kb + h * TR * DEC_MAXD / 2;
                for (int jj = 0; jj < TR; jj++)
                    if (jj < nh)
                        memcpy(dst + jj * dp, qkv__row(k, jh + jj), (size_t)dp * 4);
                    else
                        memset(dst + jj * dp, 0, (size_t)dp * 4);
                a[h] = (const char *)dst;
                lda[h] = (int64_t)dp * 4;
            }
        }
        T_ZERO(0);
        if (two) T_ZERO(1);
        for (int x = 0; x < nx; x++) {
            T_LOAD_ROWS(2, a[0] + TB * x, lda[0], in_place[0]);
            if (two) T_LOAD_ROWS(3, a[1] + TB * x, lda[1], in_place[1]);
            if (nx > 4) {
                if (x & 1) T_LOAD(5, qt + x * TR * N, 4 * N);
                else T_LOAD(4, qt + x * TR * N, 4 * N);
            }
            switch (nx > 4 ? x & 1 : x) {
            case 0: T_DP(0, 2, 4); if (two) T_DP(1, 3, 4); break;
            case 1: T_DP(0, 2, 5); if (two) T_DP(1, 3, 5); break;
            case 2: T_DP(0, 2, 6); if (two) T_DP(1, 3, 6); break;
            default: T_DP(0, 2, 7); if (two) T_DP(1, 3, 7); break;
            }
            if (pf)
                qkv__pf_lines(pf, ask_x);
        }
        scores_pair(s, cur, two, N, m, sc, j, nk, &last, &lastn, st, ldst);
    }
    if (last >= 0)   /* the last pair, in s[cur ^ 1] */
        scores_groups(s[cur ^ 1], N, m, sc, lastn, st + last, ldst);
    t_keep(cfg);
}

static void qk_dec_amx(int n, int m, int dp, float scale, const qkv__rows *k,
                       const uint16_t *q, int64_t ldq, float *st, int64_t ldst, qkv__pf *pf)
{
    if (dp % TR || 2 * dp > DEC_MAXD || m > TR)
        wide_qk_dec(n, m, dp, scale, k, q, ldq, st, ldst, pf);
    else
        BY_COLS(m, qk_dec_cols, n, m, dp, scale, k, q, ldq, st, ldst, pf);
}

/* Contract of kernels.h's exp_rows_bf16: the forward's exp_row over the
   keys [0, n), P = 2^(s·log2 e - mref·log2 e). */
static void exp_rows_dec_amx(const float *st, int64_t ld, int m, int n, const float *mref,
                             const float *pmul, float *sum, uint16_t *p, int64_t ldp)
{
    const float log2e = 1.44269504088896341f;
    const int nz = (n + 2 * TR - 1) / (2 * TR) * (2 * TR);
    for (int i = 0; i < m; i++)
        sum[i] = exp_row(0, n, nz, _mm512_set1_ps(log2e), _mm512_set1_ps(-mref[i] * log2e),
                         st + i * ld, pmul, p + i * ldp, 0, 0, NULL);
}

/* Contract of kernels.h's pv_bf16_dec, but the sums over keys run in
   groups of 16 from the call's first key (calls split at multiples of 16
   give the same bits), and a V value that is not finite makes its column
   pair's sums NaN. V rows are the B tiles in place, each pair of
   columns (c, c + 1) a pair of the tile: P's keys in the even halves of
   A's pairs (zero odd halves) give the sums of the even columns, in the
   odd halves those of the odd columns. Each pass takes 64 columns (two
   blocks of 32, the last pass maybe one), acc's split into even and odd
   columns in C tiles, and walks the keys in groups of 16: a group whose
   rows cross a block, and the tail, are copied (zero past n). */
static inline __attribute__((always_inline)) void pv_dec_rows(const int m, int n, int dv,
                                                               const uint16_t *p, int64_t ldp,
                                                               const qkv__rows *v,
                                                               const float *alpha, float *acc,
                                                               int64_t lda, qkv__pf *pf)
{
    enum { KG = TR };   /* keys per group */
    /* P in the even (pe) and odd (po) halves of pairs: group g at
       pe + g·TR·TR, m rows of 16 pairs */
    uint32_t pe[128 / KG * TR * TR] __attribute__((aligned(64)));
    uint32_t po[128 / KG * TR * TR] __attribute__((aligned(64)));
    uint32_t vb[TR * 2 * TR] __attribute__((aligned(64)));
    float ce[2 * TR * TR] __attribute__((aligned(64)));
    float co[2 * TR * TR] __attribute__((aligned(64)));
    const __m512i eo_e =
        _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i eo_o = _mm512_add_epi32(eo_e, _mm512_set1_epi32(1));
    const __m512i lo_i = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_i = _mm512_add_epi32(lo_i, _mm512_set1_epi32(8));
    const int passes = (dv + 4 * TR - 1) / (4 * TR);
    const int ask = pf ? (4 * pf->per4 + passes - 1) / passes : 0;   /* per 16 keys of a pass */
    const tile_config *cfg = &pv_cfg[m];
    t_begin_cfg(cfg);
    for (int j0 = 0; j0 < n; j0 += 128) {
        const int nn = n - j0 < 128 ? n - j0 : 128, gn = (nn + KG - 1) / KG;
        for (int g = 0; g < gn; g++)
            for (int i = 0; i < m; i++) {
                const __m512i x = _mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((const __m256i *)(p + i * ldp + j0 + g * KG)));
                _mm512_store_si512(pe + g * TR * TR + i * TR, x);
                _mm512_store_si512(po + g * TR * TR + i * TR, _mm512_slli_epi32(x, 16));
            }
        for (int c0 = 0; c0 < dv; c0 += 4 * TR) {
            const int two = dv - c0 >= 4 * TR;   /* two blocks of 32 columns */
            /* acc's columns c0..c0+32 (and the next 32): even ones into
               ce, odd into co (alpha applied once) */
            for (int h = 0; h <= two; h++)
                for (int i = 0; i < m; i++) {
                    const float *ar = acc + i * lda + c0 + 2 * TR * h;
                    __m512 a0 = _mm512_loadu_ps(ar), a1 = _mm512_loadu_ps(ar + TR);
                    if (alpha && j0 == 0) {
                        const __m512 al = _mm512_set1_ps(alpha[i]);
                        a0 = _mm512_mul_ps(a0, al);
                        a1 = _mm512_mul_ps(a1, al);
                    }
                    _mm512_store_ps(ce + (h * TR + i) * TR, _mm512_permutex2var_ps(a0, eo_e, a1));
                    _mm512_store_ps(co + (h * TR + i) * TR, _mm512_permutex2var_ps(a0, eo_o, a1));
                }
            T_LOAD(0, ce, TB);
            T_LOAD(1, co, TB);
            if (two) {
                T_LOAD(2, ce + TR * TR, TB);
                T_LOAD(3, co + TR * TR, TB);
            }
            for (int g = 0; g < gn; g++) {
                const int j = j0 + g * KG, nk = n - j < KG ? n - j : KG;
                const qkv__walk w = qkv__walk_at(v, j);
                const char *b = w.at + c0 * 2;
                int64_t ldb = v->ld;
                int in_place = 1;
                if (nk < KG || w.left < KG) {
                    in_place = 0;
                    for (int jj = 0; jj < KG; jj++) {
                        /* no row (nor block) past n is looked up */
                        const uint16_t *r =
                            jj < nk ? (const uint16_t *)qkv__row(v, j + jj) + c0 : NULL;
                        _mm512_store_si512(vb + jj * 2 * TR, r ? _mm512_loadu_si512(r)
                                                               : _mm512_setzero_si512());
                        if (two)
                            _mm512_store_si512(vb + jj * 2 * TR + TR,
                                               r ? _mm512_loadu_si512(r + 2 * TR)
                                                 : _mm512_setzero_si512());
                    }
                    b = (const char *)vb;
                    ldb = 2 * TB;
                }
                T_LOAD(4, pe + g * TR * TR, TB);
                T_LOAD(5, po + g * TR * TR, TB);
                T_LOAD_ROWS(6, b, ldb, in_place);
                T_DP(0, 4, 6);
                T_DP(1, 5, 6);
                if (two) {
                    T_LOAD_ROWS(7, b + TB, ldb, in_place);
                    T_DP(2, 4, 7);
                    T_DP(3, 5, 7);
                }
                if (pf)
                    qkv__pf_lines(pf, ask);
            }
            T_STORE(0, ce, TB);
            T_STORE(1, co, TB);
            if (two) {
                T_STORE(2, ce + TR * TR, TB);
                T_STORE(3, co + TR * TR, TB);
            }
            for (int h = 0; h <= two; h++)
                for (int i = 0; i < m; i++) {
                    const __m512 e = _mm512_load_ps(ce + (h * TR + i) * TR),
                                 o = _mm512_load_ps(co + (h * TR + i) * TR);
                    float *ar = acc + i * lda + c0 + 2 * TR * h;
                    _mm512_storeu_ps(ar, _mm512_permutex2var_ps(e, lo_i, o));
                    _mm512_storeu_ps(ar + TR, _mm512_permutex2var_ps(e, hi_i, o));
                }
        }
    }
    t_keep(cfg);
}

/* pv_dec_rows with the common row counts constants, its loops over rows
   unrolled (one thread, 1,1,32768 from DRAM: 12.2-12.6 GB/s against
   12.0-12.4 with m read at run time). */
static void pv_dec_amx(int m, int n, int dv, const uint16_t *p, int64_t ldp,
                       const qkv__rows *v, const float *alpha, float *acc, int64_t lda,
                       qkv__pf *pf)
{
    if (dv % (2 * TR) || dv > DEC_MAXD || m > TR)
        wide_pv_dec(m, n, dv, p, ldp, v, alpha, acc, lda, pf);
    else if (m == 4)
        pv_dec_rows(4, n, dv, p, ldp, v, alpha, acc, lda, pf);
    else if (m == 8)
        pv_dec_rows(8, n, dv, p, ldp, v, alpha, acc, lda, pf);
    else if (m == TR)
        pv_dec_rows(TR, n, dv, p, ldp, v, alpha, acc, lda, pf);
    else
        pv_dec_rows(m, n, dv, p, ldp, v, alpha, acc, lda, pf);
}

/* ---- decode from fp16 rows split into pairs of bf16 ----------------------- */

/* The keys (or V rows) of a chunk, 16 fp16 values from h, as words (hi,
   lo) of two bf16 whose sum is exactly each value: hi its top 16 bits as
   fp32, lo the rest (at most 3 significant bits: fp16 keeps 11). A value
   that is not finite gives a NaN lo. */
static inline __m512i split_f16(const uint16_t *h)
{
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
    const __m512i fi = _mm512_castps_si512(f);
    const __m512 lo = _mm512_sub_ps(f, _mm512_castsi512_ps(
                                           _mm512_and_si512(fi, _mm512_set1_epi32(-65536))));
    return _mm512_mask_blend_epi16((__mmask32)0xAAAAAAAAu, _mm512_srli_epi32(fi, 16),
                                   _mm512_castps_si512(lo));
}

/* n rows of r from row j, d fp16 values each, split into rows of d words
   at dst (ld words apart); rows n .. rows-1 zero. */
static void split_rows(const qkv__rows *r, int j, int n, int rows, int d, uint32_t *dst,
                       int64_t ld)
{
    for (int jj = 0; jj < rows; jj++) {
        const uint16_t *h = jj < n ? (const uint16_t *)qkv__row(r, j + jj) : NULL;
        for (int x = 0; x < d; x += TR)
            _mm512_store_si512(dst + jj * ld + x, h ? split_f16(h + x) : _mm512_setzero_si512());
    }
}

/* Contract of kernels.h's f16s_queries: the words (qh, qh) of the m
   query rows, then (ql, ql), each set as the B tiles of N = dec_cols(m)
   columns queries_tiles builds (d·N words a set). */
static void f16s_queries_amx(int m, int d, const float *q, int64_t ldq, uint32_t *qt)
{
    const int N = dec_cols(m);
    uint32_t qw[TR * DEC_MAXD] __attribute__((aligned(64)));
    uint32_t tiles[2 * DEC_MAXD * TR] __attribute__((aligned(64)));   /* qt may not be */
    for (int half = 0; half < 2; half++) {   /* (qh, qh), then (ql, ql) */
        for (int i = 0; i < m; i++)
            for (int x = 0; x < d; x += TR) {
                const __m512 f = _mm512_loadu_ps(q + i * ldq + x);
                const __m512i hi =
                    _mm512_and_si512(_mm512_castps_si512(f), _mm512_set1_epi32(-65536));
                const __m512i w =
                    half ? _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(
                                                f, _mm512_castsi512_ps(hi))),
                                            _mm512_set1_epi32(-65536))
                         : hi;
                _mm512_store_si512(qw + i * d + x, _mm512_or_si512(w, _mm512_srli_epi32(w, 16)));
            }
        uint32_t *dst = tiles + half * d * N;
        if (N == 4)
            queries_tiles((const uint16_t *)qw, 2 * d, m, d, 4, dst);
        else if (N == 8)
            queries_tiles((const uint16_t *)qw, 2 * d, m, d, 8, dst);
        else
            queries_tiles((const uint16_t *)qw, 2 * d, m, d, TR, dst);
    }
    memcpy(qt, tiles, (size_t)(2 * d * N) * sizeof *qt);
}

/* Contract of kernels.h's qk_f16s_dec. Each key's row, split into words
   (kh, kl) of d values, is a row of the A tiles (two groups of 16 keys at
   a time); the queries' words (qh, qh) and (ql, ql) are two sets of B
   tiles, so that the two products sum kh·qh + kl·qh + kh·ql + kl·ql,
   every product exact, in fp32. The 16 x N results go out as
   qk_dec_amx's. */
static inline __attribute__((always_inline)) void qk_f16s_dec_cols(int n, int m, int d,
                                                                    float scale,
                                                                    const qkv__rows *k,
                                                                    const uint32_t *qt, float *st,
                                                                    int64_t ldst, qkv__pf *pf,
                                                                    const int N)
{
    const int nx = d / TR;
    uint32_t kb[2 * TR * DEC_MAXD] __attribute__((aligned(64)));
    float s[2][2][TR * TR] __attribute__((aligned(64)));
    const uint32_t *qh = qt, *ql = qt + d * N;
    const __m512 sc = _mm512_set1_ps(scale);
    const int ask = pf ? (8 * pf->per4 + nx - 1) / nx : 0;   /* per chunk of 32 keys */
    int last = -1, lastn = 0;
    const tile_config *cfg = &qk_cfg[N == 4 ? 0 : N == 8 ? 1 : 2];
    t_begin_cfg(cfg);
    int cur = 0;
    for (int j = 0; j < n; j += 2 * TR, cur ^= 1) {
        const int nk = n - j < 2 * TR ? n - j : 2 * TR, two = nk > TR;
        split_rows(k, j, nk, two ? 2 * TR : TR, d, kb, d);
        T_ZERO(0);
        if (two) T_ZERO(1);
        for (int x = 0; x < nx; x++) {
            T_LOAD(2, kb + x * TR, 4 * d);
            if (two) T_LOAD(3, kb + TR * d + x * TR, 4 * d);
            T_LOAD(4, qh + x * TR * N, 4 * N);
            T_LOAD(5, ql + x * TR * N, 4 * N);
            T_DP(0, 2, 4);
            T_DP(0, 2, 5);
            if (two) {
                T_DP(1, 3, 4);
                T_DP(1, 3, 5);
            }
            if (pf)
                qkv__pf_lines(pf, ask);
        }
        scores_pair(s, cur, two, N, m, sc, j, nk, &last, &lastn, st, ldst);
    }
    if (last >= 0)   /* the last pair, in s[cur ^ 1] */
        scores_groups(s[cur ^ 1], N, m, sc, lastn, st + last, ldst);
    t_keep(cfg);
}

static void qk_f16s_dec_amx(int n, int m, int d, float scale, const qkv__rows *k,
                            const uint32_t *qt, float *st, int64_t ldst, qkv__pf *pf)
{
    BY_COLS(m, qk_f16s_dec_cols, n, m, d, scale, k, qt, st, ldst, pf);
}

/* Contract of kernels.h's pv_f16s_dec. Chunks of 64 keys (32 where dv >
   128): P's rows split into words (ph, ph) and (pl, pl) (ph P's top 16
   bits, pl the rest rounded to bf16) are two A tiles per group of 16
   keys, the V rows split into words (vh, vl) the B tiles, so that each
   group adds ph·vh + ph·vl + pl·vh + pl·vl to acc's C tiles (m rows, 64
   columns a pass, loaded from acc and stored back each chunk). */
static void pv_f16s_dec_amx(int m, int n, int dv, const float *p, int64_t ldp,
                            const qkv__rows *v, const float *alpha, float *acc, int64_t lda,
                            qkv__pf *pf)
{
    enum { VB = 64 * 128 };   /* words of the V chunk */
    uint32_t ph[4 * TR * TR] __attribute__((aligned(64)));
    uint32_t pl[4 * TR * TR] __attribute__((aligned(64)));
    uint32_t vb[VB] __attribute__((aligned(64)));
    const int kc = VB / dv < 64 ? VB / dv / TR * TR : 64;
    if (alpha)
        for (int i = 0; i < m; i++)
            for (int c = 0; c < dv; c += TR) {
                float *a = acc + i * lda + c;
                _mm512_storeu_ps(a, _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_set1_ps(alpha[i])));
            }
    const int passes = (dv + 4 * TR - 1) / (4 * TR);
    const int ask = pf ? (4 * pf->per4 + passes - 1) / passes : 0;   /* per 16 keys of a pass */
    const tile_config *cfg = &pv_cfg[m];
    t_begin_cfg(cfg);
    for (int j0 = 0; j0 < n; j0 += kc) {
        const int nn = n - j0 < kc ? n - j0 : kc, gn = (nn + TR - 1) / TR;
        for (int g = 0; g < gn; g++) {
            const int nk = nn - g * TR < TR ? nn - g * TR : TR;
            const __mmask16 mk = (__mmask16)((1u << nk) - 1);
            for (int i = 0; i < m; i++) {
                const __m512 f = _mm512_maskz_loadu_ps(mk, p + i * ldp + j0 + g * TR);
                const __m512i hi =
                    _mm512_and_si512(_mm512_castps_si512(f), _mm512_set1_epi32(-65536));
                const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(
                    _mm512_sub_ps(f, _mm512_castsi512_ps(hi))));
                _mm512_store_si512(ph + (g * TR + i) * TR,
                                   _mm512_or_si512(hi, _mm512_srli_epi32(hi, 16)));
                _mm512_store_si512(pl + (g * TR + i) * TR,
                                   _mm512_or_si512(lo, _mm512_slli_epi32(lo, 16)));
            }
            split_rows(v, j0 + g * TR, nk, TR, dv, vb + g * TR * dv, dv);
        }
        for (int c0 = 0; c0 < dv; c0 += 4 * TR) {
            const int nb = dv - c0 < 4 * TR ? (dv - c0) / TR : 4;   /* C tiles */
            float *ac = acc + c0;
            T_LOAD(0, ac, 4 * lda);
            if (nb > 1) T_LOAD(1, ac + TR, 4 * lda);
            if (nb > 2) T_LOAD(2, ac + 2 * TR, 4 * lda);
            if (nb > 3) T_LOAD(3, ac + 3 * TR, 4 * lda);
            for (int g = 0; g < gn; g++) {
                const uint32_t *b = vb + g * TR * dv + c0;
                T_LOAD(4, ph + g * TR * TR, TB);
                T_LOAD(5, pl + g * TR * TR, TB);
                T_LOAD(6, b, 4 * dv);
                T_DP(0, 4, 6);
                T_DP(0, 5, 6);
                if (nb > 1) {
                    T_LOAD(7, b + TR, 4 * dv);
                    T_DP(1, 4, 7);
                    T_DP(1, 5, 7);
                }
                if (nb > 2) {
                    T_LOAD(6, b + 2 * TR, 4 * dv);
                    T_DP(2, 4, 6);
                    T_DP(2, 5, 6);
                }
                if (nb > 3) {
                    T_LOAD(7, b + 3 * TR, 4 * dv);
                    T_DP(3, 4, 7);
                    T_DP(3, 5, 7);
                }
                if (pf)
                    qkv__pf_lines(pf, ask);
            }
            T_STORE(0, ac, 4 * lda);
            if (nb > 1) T_STORE(1, ac + TR, 4 * lda);
            if (nb > 2) T_STORE(2, ac + 2 * TR, 4 * lda);
            if (nb > 3) T_STORE(3, ac + 3 * TR, 4 * lda);
        }
    }
    t_keep(cfg);
}

/* ---- decode from int8 codes on int8 tiles ---------------------------------- */

/* The int8 kernels of the avx512bf16 set (int16 dot products), for what
   the tiles do not cover. */
static void (*wide_qk_i8)(int, int, int, float, const qkv__rows *, const int16_t *, int64_t,
                          const float *, float *, int64_t, qkv__pf *);
static void (*wide_pv_i8)(int, int, int, const int16_t *, int64_t, const qkv__rows *,
                          const float *, float, float *, int64_t, qkv__pf *);

/* int16 values x = 256·hi + lo split into their bytes, hi = x >> 8 and
   lo = x & 255 (the same bytes whether hi is read signed or not): columns
   c0 .. c0+d-1 (d a multiple of 32) of m rows of x [..][ldx], zero from
   column lim and in rows m .. rows-1, into rows of hi and lo ldo bytes
   apart. */
static void split_words(const int16_t *x, int64_t ldx, int m, int rows, int c0, int d, int lim,
                        uint8_t *hi, uint8_t *lo, int64_t ldo)
{
    const __m512i ff = _mm512_set1_epi16(0xff);
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < d; c += 32) {
            const int left = lim - c0 - c;
            const __mmask32 mk = left >= 32 ? ~0u : left > 0 ? (__mmask32)((1ull << left) - 1) : 0;
            const __m512i w = i < m ? _mm512_maskz_loadu_epi16(mk, x + i * ldx + c0 + c)
                                    : _mm512_setzero_si512();
            _mm256_storeu_si256((__m256i *)(hi + i * ldo + c),
                                _mm512_cvtepi16_epi8(_mm512_srli_epi16(w, 8)));
            _mm256_storeu_si256((__m256i *)(lo + i * ldo + c),
                                _mm512_cvtepi16_epi8(_mm512_and_si512(w, ff)));
        }
}

/* A score tile pair (hi and lo sums, 16 keys by N queries, int32) into m
   rows of st: 256·hi + lo, exact in int32, converted, turned
   query-major, times rsc[i], for the keys of mask mk. */
static inline __attribute__((always_inline)) void scores_out_i8(const int32_t *sh,
                                                                const int32_t *sl, int N,
                                                                int m, const float *rsc,
                                                                __mmask16 mk, float *st,
                                                                int64_t ldst)
{
    __m512i r[TR];
#pragma GCC unroll 16
    for (int t = 0; t < N; t++)
        r[t] = _mm512_castps_si512(_mm512_cvtepi32_ps(
            _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sh + t * TR), 8),
                             _mm512_load_si512(sl + t * TR))));
    transpose_words(r, N);
    for (int i = 0; i < m && i < N; i++)
        _mm512_mask_storeu_ps(st + i * ldst, mk,
                              _mm512_mul_ps(_mm512_castsi512_ps(r[i]), _mm512_set1_ps(rsc[i])));
}

static inline __attribute__((always_inline)) void scores_group_i8(const int32_t *sh,
                                                                   const int32_t *sl, int N,
                                                                   int m, const float *rsc,
                                                                   int nk, float *st,
                                                                   int64_t ldst)
{
    const __mmask16 mk = (__mmask16)((1u << nk) - 1);
    if (N == 4)
        scores_out_i8(sh, sl, 4, m, rsc, mk, st, ldst);
    else if (N == 8)
        scores_out_i8(sh, sl, 8, m, rsc, mk, st, ldst);
    else
        scores_out_i8(sh, sl, TR, m, rsc, mk, st, ldst);
}

/* Contract of kernels.h's qk_i8_dec (the same int32 sums, so the same
   bits as the avx512bf16 set's). Each group of 16 keys is an A tile of
   codes, in place where its rows lie in one block at one stride (else
   copied, zero past n); each int16 query is 256·hi + lo, whose bytes are
   B tiles (hi signed: tdpbssd; lo unsigned: tdpbsud), and the two sums
   are joined exactly in int32. A group's scores are turned out one group
   later, when its tile stores have landed. */
static inline __attribute__((always_inline)) void qk_i8_dec_cols(int n, int m, int d,
                                                                  float scale,
                                                                  const qkv__rows *k,
                                                                  const int16_t *q, int64_t ldq,
                                                                  const float *qsc, float *st,
                                                                  int64_t ldst, qkv__pf *pf,
                                                                  const int N)
{
    const int nx = d / TB;
    uint8_t qh[TR * DEC_MAXD] __attribute__((aligned(64)));
    uint8_t ql[TR * DEC_MAXD] __attribute__((aligned(64)));
    uint32_t th[DEC_MAXD / 4 * TR] __attribute__((aligned(64)));
    uint32_t tl[DEC_MAXD / 4 * TR] __attribute__((aligned(64)));
    int8_t kb[TR * DEC_MAXD] __attribute__((aligned(64)));
    split_words(q, ldq, m, N, 0, d, d, qh, ql, d);
    /* the bytes as rows of d/4 words, in the scores' B tile order */
    queries_tiles((const uint16_t *)qh, d / 2, m, d / 4, N, th);
    queries_tiles((const uint16_t *)ql, d / 2, m, d / 4, N, tl);
    float rsc[TR];
    for (int i = 0; i < m; i++)
        rsc[i] = scale * qsc[i];
    const int ask = pf ? (4 * pf->per4 + nx - 1) / nx : 0;   /* per chunk of 16 keys */
    int32_t sh[2][TR * TR] __attribute__((aligned(64)));
    int32_t sl[2][TR * TR] __attribute__((aligned(64)));
    int last = -1, lastn = 0;
    /* tiles: 0, 1 the hi and lo sums; 2, 3 the K codes of chunks of 64;
       4, 5 hi and 6, 7 lo of the queries (reloaded by chunk beyond 2) */
    const tile_config *cfg = &qk_cfg[N == 4 ? 0 : N == 8 ? 1 : 2];
    t_begin_cfg(cfg);
    if (nx <= 2) {
        T_LOAD(4, th, 4 * N);
        T_LOAD(6, tl, 4 * N);
        if (nx > 1) {
            T_LOAD(5, th + TR * N, 4 * N);
            T_LOAD(7, tl + TR * N, 4 * N);
        }
    }
    for (int j = 0, cur = 0; j < n; j += TR, cur ^= 1) {
        const int nk = n - j < TR ? n - j : TR;
        const qkv__walk w = qkv__walk_at(k, j);
        const char *a = w.at;
        int64_t lda = k->ld;
        if (nk < TR || w.left < TR) {
            for (int jj = 0; jj < TR; jj++)
                if (jj < nk)
                    memcpy(kb + jj * d, qkv__row(k, j + jj), (size_t)d);
                else
                    memset(kb + jj * d, 0, (size_t)d);
            a = (const char *)kb;
            lda = d;
        }
        T_ZERO(0);
        T_ZERO(1);
        for (int x = 0; x < nx; x++) {
            if (nx > 2) {
                if (x & 1) {
                    T_LOAD(5, th + x * TR * N, 4 * N);
                    T_LOAD(7, tl + x * TR * N, 4 * N);
                } else {
                    T_LOAD(4, th + x * TR * N, 4 * N);
                    T_LOAD(6, tl + x * TR * N, 4 * N);
                }
            }
            if (x & 1) {
                T_LOAD(3, a + TB * x, lda);
                T_DPBSSD(0, 3, 5);
                T_DPBSUD(1, 3, 7);
            } else {
                T_LOAD(2, a + TB * x, lda);
                T_DPBSSD(0, 2, 4);
                T_DPBSUD(1, 2, 6);
            }
            if (pf)
                qkv__pf_lines(pf, ask);
        }
        T_STORE(0, sh[cur], 4 * N);
        T_STORE(1, sl[cur], 4 * N);
        if (last >= 0)
            scores_group_i8(sh[cur ^ 1], sl[cur ^ 1], N, m, rsc, lastn, st + last, ldst);
        last = j;
        lastn = nk;
    }
    if (last >= 0)
        scores_group_i8(sh[(last / TR) & 1], sl[(last / TR) & 1], N, m, rsc, lastn, st + last,
                        ldst);
    t_keep(cfg);
}

static void qk_i8_dec_amx(int n, int m, int d, float scale, const qkv__rows *k,
                          const int16_t *q, int64_t ldq, const float *qsc, float *st,
                          int64_t ldst, qkv__pf *pf)
{
    if (d % TB || d > DEC_MAXD || m > TR)
        wide_qk_i8(n, m, d, scale, k, q, ldq, qsc, st, ldst, pf);
    else
        BY_COLS(m, qk_i8_dec_cols, n, m, d, scale, k, q, ldq, qsc, st, ldst, pf);
}

/* Keys per int32 sum of int8 P·V (P's int16 values are at most 32767,
   the codes at most 128 in magnitude: 64 of their products stay below
   2^28). */
enum { I8_CHUNK = 64 };

/* V codes of 4·rows keys (rows of 4 keys, pointers vr, zero past nk) by
   dv columns into B tiles: tile cb (16 columns) row r holds, for each of
   its columns c, the codes of keys 4r .. 4r+3 (bytes 4c .. 4c+3). With
   AVX512-VBMI two rounds of byte permutes (8 for 4 keys by 64 columns),
   else unpacks and lane shuffles (16). */
#ifdef __AVX512VBMI__
static uint8_t vq_idx[4][64];   /* pairs of rows: columns 0..31, 32..63; quads: 0..15, 16..31 */

static void vq_idx_init(void)
{
    for (int b = 0; b < 64; b++) {
        const int c = b / 2, t = b % 2;
        vq_idx[0][b] = (uint8_t)(c + 64 * t);
        vq_idx[1][b] = (uint8_t)(32 + c + 64 * t);
        const int c4 = b / 4, t4 = b % 4;
        vq_idx[2][b] = (uint8_t)(2 * c4 + t4 % 2 + 64 * (t4 / 2));
        vq_idx[3][b] = (uint8_t)(2 * (16 + c4) + t4 % 2 + 64 * (t4 / 2));
    }
}
#else
static void vq_idx_init(void) {}
#endif

static void v_quads(const int8_t *const *vr, int nk, int rows, int dv, uint8_t *dst)
{
#ifdef __AVX512VBMI__
    const __m512i pl = _mm512_loadu_si512(vq_idx[0]), phi = _mm512_loadu_si512(vq_idx[1]),
                  q0 = _mm512_loadu_si512(vq_idx[2]), q1 = _mm512_loadu_si512(vq_idx[3]);
#endif
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < dv; c += TB) {
            /* a last block of 32 columns loads only those (whole blocks
               unmasked: masked loads do not train the prefetchers) */
            const int whole = dv - c >= TB;
            const __mmask64 mk = whole ? ~0ull : (1ull << (dv - c)) - 1;
            __m512i x[4];
            for (int t = 0; t < 4; t++)
                x[t] = 4 * r + t >= nk ? _mm512_setzero_si512()
                       : whole         ? _mm512_loadu_si512(vr[4 * r + t] + c)
                                       : _mm512_maskz_loadu_epi8(mk, vr[4 * r + t] + c);
            uint8_t *o = dst + (c / TR) * TR * TB + r * TB;
#ifdef __AVX512VBMI__
            const __m512i a0 = _mm512_permutex2var_epi8(x[0], pl, x[1]),
                          a1 = _mm512_permutex2var_epi8(x[0], phi, x[1]),
                          b0 = _mm512_permutex2var_epi8(x[2], pl, x[3]),
                          b1 = _mm512_permutex2var_epi8(x[2], phi, x[3]);
            _mm512_storeu_si512(o, _mm512_permutex2var_epi8(a0, q0, b0));
            _mm512_storeu_si512(o + TR * TB, _mm512_permutex2var_epi8(a0, q1, b0));
            _mm512_storeu_si512(o + 2 * TR * TB, _mm512_permutex2var_epi8(a1, q0, b1));
            _mm512_storeu_si512(o + 3 * TR * TB, _mm512_permutex2var_epi8(a1, q1, b1));
#else
            const __m512i a = _mm512_unpacklo_epi8(x[0], x[1]),
                          b = _mm512_unpackhi_epi8(x[0], x[1]),
                          e = _mm512_unpacklo_epi8(x[2], x[3]),
                          f = _mm512_unpackhi_epi8(x[2], x[3]);
            /* lane L of u0..u3: columns 16L .. 16L+15, four at a time */
            const __m512i u0 = _mm512_unpacklo_epi16(a, e), u1 = _mm512_unpackhi_epi16(a, e),
                          u2 = _mm512_unpacklo_epi16(b, f), u3 = _mm512_unpackhi_epi16(b, f);
            const __m512i t0 = _mm512_shuffle_i64x2(u0, u1, 0x44),
                          t1 = _mm512_shuffle_i64x2(u0, u1, 0xee),
                          t2 = _mm512_shuffle_i64x2(u2, u3, 0x44),
                          t3 = _mm512_shuffle_i64x2(u2, u3, 0xee);
            _mm512_storeu_si512(o, _mm512_shuffle_i64x2(t0, t2, 0x88));
            _mm512_storeu_si512(o + TR * TB, _mm512_shuffle_i64x2(t0, t2, 0xdd));
            _mm512_storeu_si512(o + 2 * TR * TB, _mm512_shuffle_i64x2(t1, t3, 0x88));
            _mm512_storeu_si512(o + 3 * TR * TB, _mm512_shuffle_i64x2(t1, t3, 0xdd));
#endif
        }
}

/* Contract of kernels.h's pv_i8_dec, but the int32 sums run over chunks
   of 64 keys from the call's first (dv a multiple of 32). P's int16
   values are 256·hi + lo: the chunk's bytes are two A tiles (unsigned:
   tdpbusd) against its V codes regrouped by 4 keys (v_quads), two blocks
   of 16 columns a pass; the hi and lo sums are joined exactly in int32.
   (Building the next chunk's operands before this chunk's products, and
   adding a pass's sums one pass later, measured no faster.) */
static void pv_i8_dec_amx(int m, int n, int dv, const int16_t *p, int64_t ldp,
                          const qkv__rows *v, const float *alpha, float pscale, float *acc,
                          int64_t lda, qkv__pf *pf)
{
    if (dv % (2 * TR) || dv > DEC_MAXD || m > TR) {
        wide_pv_i8(m, n, dv, p, ldp, v, alpha, pscale, acc, lda, pf);
        return;
    }
    uint8_t ph[TR * TB] __attribute__((aligned(64)));
    uint8_t pl[TR * TB] __attribute__((aligned(64)));
    uint8_t vq[DEC_MAXD / TR * TR * TB] __attribute__((aligned(64)));
    int32_t ch[2][TR * TR] __attribute__((aligned(64)));
    int32_t cl[2][TR * TR] __attribute__((aligned(64)));
    const __m512 ps = _mm512_set1_ps(pscale);
    if (alpha)
        for (int i = 0; i < m; i++)
            for (int c = 0; c < dv; c += TR)
                _mm512_storeu_ps(acc + i * lda + c, _mm512_mul_ps(_mm512_loadu_ps(acc + i * lda + c),
                                                                  _mm512_set1_ps(alpha[i])));
    const int passes = dv / (2 * TR);
    const int ask = pf ? (pf->per4 * (I8_CHUNK / 4) + passes - 1) / passes : 0;   /* per pass */
    const tile_config *cfg = &pv_cfg[m];
    t_begin_cfg(cfg);
    for (int k0 = 0; k0 < n; k0 += I8_CHUNK) {
        const int kn = n - k0 < I8_CHUNK ? n - k0 : I8_CHUNK;
        split_words(p, ldp, m, m, k0, I8_CHUNK, n, ph, pl, TB);   /* zero past n */
        const int8_t *vr[I8_CHUNK];
        for (int jj = 0; jj < kn; jj++)
            vr[jj] = (const int8_t *)qkv__row(v, k0 + jj);
        v_quads(vr, kn, TR, dv, vq);
        for (int x = 0; x < passes; x++) {
            /* tiles: 0, 1 hi sums of columns 32x.. and 32x+16..; 2, 3 lo;
               4, 5 P's hi and lo bytes; 6, 7 the V quads */
            T_LOAD(4, ph, TB);
            T_LOAD(5, pl, TB);
            T_LOAD(6, vq + 2 * x * TR * TB, TB);
            T_LOAD(7, vq + (2 * x + 1) * TR * TB, TB);
            T_ZERO(0);
            T_ZERO(1);
            T_ZERO(2);
            T_ZERO(3);
            T_DPBUSD(0, 4, 6);
            T_DPBUSD(1, 4, 7);
            T_DPBUSD(2, 5, 6);
            T_DPBUSD(3, 5, 7);
            T_STORE(0, ch[0], TB);
            T_STORE(1, ch[1], TB);
            T_STORE(2, cl[0], TB);
            T_STORE(3, cl[1], TB);
            if (pf)
                qkv__pf_lines(pf, ask);
            for (int h = 0; h < 2; h++)
                for (int i = 0; i < m; i++) {
                    const __m512i s = _mm512_add_epi32(
                        _mm512_slli_epi32(_mm512_load_si512(ch[h] + i * TR), 8),
                        _mm512_load_si512(cl[h] + i * TR));
                    float *ar = acc + i * lda + 2 * TR * x + TR * h;
                    _mm512_storeu_ps(ar, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), ps,
                                                         _mm512_loadu_ps(ar)));
                }
        }
    }
    t_keep(cfg);
}

/* ---- the backward's products ------------------------------------------------ */

/* acc rows i..i+16·ni, columns c..c+16·nc (ni, nc in 1..2) += A·B over nch
   chunks of 16 pairs, A row block r's chunk ch at a[r][ch] (stride lda
   bytes), B chunk ch at b + ch·16·ldb: C tiles 0..3, A 4, 5, B 6, 7. */
static void mm_block(int ni, int nc, int nch, const uint32_t *const a[2], int64_t a_ch,
                     int64_t a_ld, const uint32_t *b, int64_t ldb, float *acc, int64_t lda)
{
    c_load(ni, nc, acc, lda);
    for (int ch = 0; ch < nch; ch++)
        dp_2x2(ni, nc, a[0] + ch * a_ch, a[1] + ch * a_ch, a_ld, b + ch * TR * ldb,
               b + ch * TR * ldb + TR, ldb * 4);
    c_store(ni, nc, acc, lda);
}

enum { MAXCH = 8 };   /* chunks of 16 pairs transposed at a time */

/* Contract of kernels.h's mm_bf16. Whole 16x16 blocks of acc over whole
   chunks of 16 pairs go to the tiles: A read in place where its pairs run
   along rows (asj 1), else (asi 1) transposed 16x16 at a time into a
   buffer; the rest of acc's rows, columns and pairs to the dot-product
   kernel. */
static void mm_amx(int m, int np, int n, const uint32_t *a, int64_t asi, int64_t asj,
                   const uint32_t *b, int64_t ldb, float *acc, int64_t lda)
{
    const int mf = m - m % TR, nf = n - n % TR, npf = np - np % TR;
    if (mf == 0 || nf == 0 || npf == 0 || (asj != 1 && asi != 1)) {
        dot_mm(m, np, n, a, asi, asj, b, ldb, acc, lda);
        return;
    }
    uint32_t buf[2][MAXCH * TR * TR];
    t_begin();
    for (int i = 0; i < mf; i += 2 * TR) {
        const int ni = mf - i > TR ? 2 : 1;
        for (int ch0 = 0; ch0 < npf / TR; ch0 += MAXCH) {
            const int nch = npf / TR - ch0 < MAXCH ? npf / TR - ch0 : MAXCH;
            const uint32_t *ab[2] = { NULL, NULL };
            int64_t a_ch, a_ld;
            if (asj == 1) {
                for (int r = 0; r < ni; r++)
                    ab[r] = a + (i + TR * r) * asi + ch0 * TR;
                a_ch = TR;
                a_ld = asi * 4;
            } else {
                for (int r = 0; r < ni; r++) {
                    for (int ch = 0; ch < nch; ch++) {
                        __m512i v[TR];
                        for (int k = 0; k < TR; k++)
                            v[k] = _mm512_loadu_si512(a + (int64_t)((ch0 + ch) * TR + k) * asj +
                                                      i + TR * r);
                        transpose_words(v, TR);
                        for (int x = 0; x < TR; x++)
                            _mm512_storeu_si512(buf[r] + (ch * TR + x) * TR, v[x]);
                    }
                    ab[r] = buf[r];
                }
                a_ch = TR * TR;
                a_ld = TB;
            }
            if (ni == 1)
                ab[1] = ab[0];
            for (int c = 0; c < nf; c += 2 * TR)
                mm_block(ni, nf - c > TR ? 2 : 1, nch, ab, a_ch, a_ld,
                         b + (int64_t)ch0 * TR * ldb + c, ldb, acc + i * lda + c, lda);
        }
    }
    t_end();
    if (npf < np)
        dot_mm(mf, np - npf, nf, a + npf * asj, asi, asj, b + npf * ldb, ldb, acc, lda);
    if (nf < n)
        dot_mm(mf, np, n - nf, a, asi, asj, b + nf, ldb, acc + nf, lda);
    if (mf < m)
        dot_mm(m - mf, np, n, a + mf * asi, asi, asj, b, ldb, acc + mf * lda, lda);
}

/* Contract of kernels.h's pv_bf16: the dot-product kernel applies alpha
   to acc and adds the pairs past the last whole chunk of 16, then the rest
   is mm_amx's product with P read down its columns. */
static void pv_amx(int m, int np, int dv, const uint32_t *pp, int64_t ldp,
                   const uint32_t *vp, int64_t ldvp, const float *alpha,
                   float *acc, int64_t lda)
{
    const int npf = np - np % TR;
    dot_pv(m, np - npf, dv, pp + npf * ldp, ldp, vp + npf * ldvp, ldvp, alpha, acc, lda);
    if (npf > 0)
        mm_amx(m, npf, dv, pp, 1, ldp, vp, ldvp, acc, lda);
}

/* Whether the CPU has the int8 tile products (the emulation has them). */
static int amx_int8(void)
{
#ifdef QKV_AMX_EMULATE
    return 1;
#else
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (d >> 25) & 1;
#endif
}

void QKV_KERNEL_TABLE(qkv__kernels *t)
{
    qkv__kernels_avx512bf16(t);
    dot_qk = t->qk_bf16;
    dot_pv = t->pv_bf16;
    dot_mm = t->mm_bf16;
    t->name = QKV_KERNEL_NAME;
    t->qk_bf16 = qk_amx;
    t->pv_bf16 = pv_amx;
    t->mm_bf16 = mm_amx;
    /* decode's few-row bf16 kernels run on tiles, the softmax between
       them on exp2_16 (16 rows: 0.5x the time of the avx512 set's); where
       the tiles do not fit (head dims, rows) the products widen bf16 to
       fp32 FMAs, as the avx512 set's do: on the Xeon with AMX measured,
       vdpbf16ps ran at half the FMAs' rate. */
    qkv__kernels wide;
    memset(&wide, 0, sizeof wide);
    qkv__kernels_avx512(&wide);
    wide_qk_dec = wide.qk_bf16_dec;
    wide_pv_dec = wide.pv_bf16_dec;
    t->exp_rows_bf16 = exp_rows_dec_amx;
    t->qk_bf16_dec = qk_dec_amx;
    t->pv_bf16_dec = pv_dec_amx;
    t->dec_done = dec_done;
    /* tiles of 17-64 rows (4-16 new queries of 4 query heads a kv head)
       in groups of 16 rows: 2 threads, 1x16384 bf16, 32/8 heads, against
       the many-row kernels: 8 new queries 0.82x the time from L3, 0.84x
       from DRAM; 16 0.89x and 0.87x */
    t->dec_rows_max = 64;
    /* fp16 caches with more than 8 rows a tile split into bf16 pairs on
       the tiles: per key from L1 (TSC cycles, D 128) scores and P·V 56 +
       59 against 85 + 70 read in place at 12 rows, 62 + 65 against 110 +
       80 at 16; at 8 rows 39-42 + 45 against 48 + 40, and from memory
       1,2,32768 took 1.04-1.07x the time split */
    t->f16s_queries = f16s_queries_amx;
    t->qk_f16s_dec = qk_f16s_dec_amx;
    t->pv_f16s_dec = pv_f16s_dec_amx;
    t->f16s_rows_min = 8;
    /* up to 32 rows, each group of 16 splitting the rows again: 2 threads,
       32/8 heads, against the many-row split kernels (f16t), 5 new
       queries (20 rows) 0.77x the time head-major and 0.59x
       position-major, 8 (32 rows) 1.01x and 0.71-0.74x; with 16 (64 rows)
       the splits cost more: 1.11-1.13x head-major, 0.87-0.93x
       position-major */
    t->f16s_rows_max = 32;
    /* int8 pools with more than 8 rows a tile: codes as bf16 on the tiles
       (Sq = 4, 16 rows: 0.88x the time of the int16 dot products; 4 rows
       took 1.6x that way) */
    t->i8_rows_max = 8;
    /* with AMX-INT8, on int8 tiles for any row count: on the Xeon (TSC
       cycles per key from L2, D 128) scores 7 against 20 at 4 rows and 13
       against 22 at 16, P·V 17-20 against 17 at 4 rows and 26 against 64
       at 16; 1,4,32768 from a position-major int8 pool 7.1-7.3 ms against
       10.1-10.7 (bf16 codes on the tiles) */
    if (amx_int8()) {
        vq_idx_init();
        wide_qk_i8 = t->qk_i8_dec;
        wide_pv_i8 = t->pv_i8_dec;
        t->qk_i8_dec = qk_i8_dec_amx;
        t->pv_i8_dec = pv_i8_dec_amx;
        t->i8_rows_max = 0;
    }
    qt_idx_init();
    /* and the forward's tasks of under 16 rows take the fp32 path: 1,1,32768,
       32,8,128 bf16 took 16.2 ms that way against 23.5 with vdpbf16ps */
    t->qk_bf16_rows = NULL;
    tw_idx_init();
    t->split_f16 = split_f16_amx;
    t->split_f32 = split_f32_amx;
    t->split_pairs_f16 = split_pairs_f16_amx;
    t->split_pairs_f32 = split_pairs_f32_amx;
    t->pack_k_split = pack_k_split;
    t->pack_v_split = pack_v_split;
    t->pack_k_tiles = pack_k_tiles;
    t->pack_v_tiles = pack_v_tiles;
    t->qk_tiles = qk_tiles;
    t->softmax_tiles = softmax_tiles;
    t->attn_tiles = attn_tiles;
    t->pv_tiles = pv_tiles;
}
