/*
 * kernels_portable.c — the micro-kernels written once in C with the GCC/Clang
 * vector extension, and compiled once per instruction set with that set's
 * -m flags (CMake builds this file three times: generic x86-64, AVX2+FMA,
 * AVX-512). QKV_VW is the vector width in floats for the target and
 * QKV_KERNEL_TABLE the name of the one exported function; everything else
 * is static, so each copy is self-contained and steps cleanly in gdb.
 *
 * Here: the two products of a tile (scores and P·V), the column softmax
 * pieces, fp16/bf16 widening and rounding stores, an FMA ceiling probe. Built with
 * -mavx512bf16 (the fourth copy), the file also holds the bf16 dot-product
 * kernels, which need the one instruction the vector extension cannot
 * express (vdpbf16ps). Not here: AMX.
 */
#include "kernels.h"

#include <math.h>
#include <string.h>

#ifndef QKV_VW
#define QKV_VW 4
#endif
#ifndef QKV_KERNEL_TABLE
#define QKV_KERNEL_TABLE qkv__kernels_generic
#endif
#ifndef QKV_KERNEL_NAME
#define QKV_KERNEL_NAME "generic"
#endif

#if (QKV_VW == 16 && defined(__AVX512F__)) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float   vf __attribute__((vector_size(QKV_VW * 4)));
typedef int32_t vi __attribute__((vector_size(QKV_VW * 4)));
typedef uint32_t vu __attribute__((vector_size(QKV_VW * 4)));  /* bit work */

#define VW QKV_VW
#ifndef QKV_MR
#define QKV_MR 4
#endif
#define MR QKV_MR       /* rows of the register block */
#define NR (2 * VW)     /* columns of the register block: two vectors */

static inline vf vload(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; }
static inline void vstore(float *p, vf x) { memcpy(p, &x, sizeof x); }
/* a in every lane (a - 0 is exactly a, so this folds to one broadcast) */
static inline vf vset1(float a) { return a - (vf){0}; }

/* a·b + c, fused where the set has FMA. Written out because left to
   contraction, `x = a[c]·alpha; x += p·v` may fuse either product, and
   a call's first key would then round differently from the others: P·V
   split into calls must give the bits of one call. */
static inline float fmadd1(float a, float b, float c)
{
#ifdef __FMA__
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

/* Sum of the lanes by halving (the halves add as vectors), then four
   scalars. */
static inline float hsum(vf x)
{
    float t[VW];
    memcpy(t, &x, sizeof x);
    for (int w = VW / 2; w >= 4; w /= 2)
        for (int l = 0; l < w; l++)
            t[l] += t[l + w];
    return (t[0] + t[1]) + (t[2] + t[3]);
}

/* ---- scores, keys by queries --------------------------------------------- */

/* One rows x nv·VW block (rows <= MR keys, nv in 1..2 vectors of queries;
   both are constants at every call, so the loops unroll): rows·nv
   accumulators live in registers across the d loop; each step loads nv
   vectors of the transposed queries and broadcasts one element of each
   key row. */
static inline __attribute__((always_inline))
void qk_block(const int rows, const int nv, int d, float scale, const float *k, int64_t ldk,
              const float *qt, int64_t ldqt, float *s, int64_t lds)
{
    vf c[MR][2];
    for (int r = 0; r < rows; r++)
        c[r][0] = c[r][1] = (vf){0};
    for (int x = 0; x < d; x++) {
        const float *b = qt + x * ldqt;
        vf b0 = vload(b), b1 = nv > 1 ? vload(b + VW) : b0;
        for (int r = 0; r < rows; r++) {
            vf a = vset1(k[r * ldk + x]);
            c[r][0] += a * b0;
            if (nv > 1)
                c[r][1] += a * b1;
        }
    }
    vf sc = vset1(scale);
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < nv; v++)
            vstore(s + r * lds + v * VW, c[r][v] * sc);
}

/* Fewer than NR queries left (decode, short tiles): dot products along d,
   each key row loaded once for up to four queries. */
static void qk_dots(int n, int m, int d, float scale, const float *k, int64_t ldk,
                    const float *q, int64_t ldq, float *st, int64_t ldst)
{
    const int dfull = d - d % VW;
    for (int j = 0; j < n; j++) {
        const float *a = k + j * ldk;
        int i = 0;
        for (; i + 4 <= m; i += 4) {
            const float *b0 = q + i * ldq, *b1 = b0 + ldq, *b2 = b1 + ldq, *b3 = b2 + ldq;
            vf c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
            for (int x = 0; x < dfull; x += VW) {
                vf av = vload(a + x);
                c0 += av * vload(b0 + x); c1 += av * vload(b1 + x);
                c2 += av * vload(b2 + x); c3 += av * vload(b3 + x);
            }
            float s0 = hsum(c0), s1 = hsum(c1), s2 = hsum(c2), s3 = hsum(c3);
            for (int x = dfull; x < d; x++) {
                s0 += a[x] * b0[x]; s1 += a[x] * b1[x];
                s2 += a[x] * b2[x]; s3 += a[x] * b3[x];
            }
            float *o = st + j * ldst + i;
            o[0] = s0 * scale; o[1] = s1 * scale; o[2] = s2 * scale; o[3] = s3 * scale;
        }
        for (; i < m; i++) {
            const float *b = q + i * ldq;
            vf c = {0};
            for (int x = 0; x < dfull; x += VW)
                c += vload(a + x) * vload(b + x);
            float s0 = hsum(c);
            for (int x = dfull; x < d; x++)
                s0 += a[x] * b[x];
            st[j * ldst + i] = s0 * scale;
        }
    }
}

/* Query columns i0..i0+nv·VW for every key, in blocks of MR, 4 and 1 rows. */
static inline __attribute__((always_inline))
void qk_cols(const int nv, int n, int i0, int d, float scale, const float *k, int64_t ldk,
             const float *qt, int64_t ldqt, float *st, int64_t ldst)
{
    int j = 0;
    for (; j + MR <= n; j += MR)
        qk_block(MR, nv, d, scale, k + j * ldk, ldk, qt + i0, ldqt, st + j * ldst + i0, ldst);
    for (; j + 4 <= n; j += 4)
        qk_block(4, nv, d, scale, k + j * ldk, ldk, qt + i0, ldqt, st + j * ldst + i0, ldst);
    for (; j < n; j++)
        qk_block(1, nv, d, scale, k + j * ldk, ldk, qt + i0, ldqt, st + j * ldst + i0, ldst);
}

static void qk(int n, int m, int d, float scale, const float *k, int64_t ldk,
               const float *qt, int64_t ldqt, const float *q, int64_t ldq,
               float *st, int64_t ldst)
{
    const int mfull = m - m % NR, rest = m - mfull;
    for (int i = 0; i < mfull; i += NR)
        qk_cols(2, n, i, d, scale, k, ldk, qt, ldqt, st, ldst);
    /* at least half a vector left: whole vectors over the zero padding
       beat per-query dot products */
    if (rest > VW)
        qk_cols(2, n, mfull, d, scale, k, ldk, qt, ldqt, st, ldst);
    else if (rest >= VW / 2)
        qk_cols(1, n, mfull, d, scale, k, ldk, qt, ldqt, st, ldst);
    else if (rest > 0)
        qk_dots(n, rest, d, scale, k, ldk, q + mfull * ldq, ldq, st + mfull, ldst);
}

/* ---- acc = alpha·acc + P·V ----------------------------------------------- */

/* rows x NR of acc (rows <= MR, a constant at every call). */
static inline __attribute__((always_inline))
void pv_block(const int rows, int n, const float *p, int64_t psi, int64_t psj,
              const float *v, int64_t ldv, const float *alpha, float *acc, int64_t lda)
{
    vf c[MR][2];
    for (int r = 0; r < rows; r++) {
        vf s = vset1(alpha[r]);
        c[r][0] = vload(acc + r * lda) * s;
        c[r][1] = vload(acc + r * lda + VW) * s;
    }
    for (int j = 0; j < n; j++) {
        const float *pj = p + j * psj;
        vf b0 = vload(v + j * ldv), b1 = vload(v + j * ldv + VW);
        for (int r = 0; r < rows; r++) {
            vf a = vset1(pj[r * psi]);
            c[r][0] += a * b0;
            c[r][1] += a * b1;
        }
    }
    for (int r = 0; r < rows; r++) {
        vstore(acc + r * lda, c[r][0]);
        vstore(acc + r * lda + VW, c[r][1]);
    }
}

/* Leftover columns (< NR) of V: one vector at a time, then scalars. */
static void pv_edge(int m, int n, int dv, const float *p, int64_t psi, int64_t psj,
                    const float *v, int64_t ldv, const float *alpha,
                    float *acc, int64_t lda)
{
    const int cfull = dv - dv % VW;
    for (int i = 0; i < m; i++) {
        float *a = acc + i * lda;
        const float *pi = p + i * psi;
        for (int c = 0; c < cfull; c += VW) {
            vf x = vload(a + c) * vset1(alpha[i]);
            for (int j = 0; j < n; j++)
                x += vset1(pi[j * psj]) * vload(v + j * ldv + c);
            vstore(a + c, x);
        }
#if QKV_VW == 16 && defined(__AVX512F__)
        /* the last columns as one masked vector (a head_dim below 16 is all
           tail) */
        if (cfull < dv) {
            const __mmask16 mk = (__mmask16)((1u << (dv - cfull)) - 1);
            __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, a + cfull), _mm512_set1_ps(alpha[i]));
            for (int j = 0; j < n; j++)
                x = _mm512_fmadd_ps(_mm512_set1_ps(pi[j * psj]),
                                    _mm512_maskz_loadu_ps(mk, v + j * ldv + cfull), x);
            _mm512_mask_storeu_ps(a + cfull, mk, x);
        }
#else
        for (int c = cfull; c < dv; c++) {
            float x = a[c] * alpha[i];
            for (int j = 0; j < n; j++)
                x = fmadd1(pi[j * psj], v[j * ldv + c], x);
            a[c] = x;
        }
#endif
    }
}

static void pv(int m, int n, int dv, const float *p, int64_t psi, int64_t psj,
               const float *v, int64_t ldv, const float *alpha, float *acc,
               int64_t lda)
{
    const int cfull = dv - dv % NR;
    int i = 0;
    for (; i + MR <= m; i += MR)
        for (int c = 0; c < cfull; c += NR)
            pv_block(MR, n, p + i * psi, psi, psj, v + c, ldv, alpha + i, acc + i * lda + c, lda);
    for (; i + 4 <= m; i += 4)
        for (int c = 0; c < cfull; c += NR)
            pv_block(4, n, p + i * psi, psi, psj, v + c, ldv, alpha + i, acc + i * lda + c, lda);
    for (; i < m; i++)
        for (int c = 0; c < cfull; c += NR)
            pv_block(1, n, p + i * psi, psi, psj, v + c, ldv, alpha + i, acc + i * lda + c, lda);
    if (cfull < dv)
        pv_edge(m, n, dv - cfull, p, psi, psj, v + cfull, ldv, alpha, acc + cfull, lda);
}

/* ---- softmax pieces, per query column ------------------------------------ */

static inline vf vmax(vf a, vf b)
{
    vi gt = a > b;
    return (vf)(((vi)a & gt) | ((vi)b & ~gt));
}

/* m is a multiple of 16, so of VW: whole vectors only. */
static void col_max(const float *st, int64_t ld, int n, int m, float *mx)
{
    for (int i = 0; i < m; i += VW) {
        vf acc = vset1(-INFINITY);
        for (int j = 0; j < n; j++)
            acc = vmax(vload(st + j * ld + i), acc);
        vstore(mx + i, acc);
    }
}

/* exp(x) for x <= 0 (ok up to 88): x = n·ln2 + f, |f| <= ln2/2, 2^n built in
   the exponent bits, exp(f) by Cephes' degree-6 polynomial (about 1 ulp).
   Below -87.3 the result is 0, as exp(-inf) must be. vexp_n takes u
   vectors at once, step by step across them: one vector's steps form a
   chain of about 60 cycles, and an out-of-order window (Zen 1's in
   particular) holds little more than one such chain, so separate calls
   in a loop overlap poorly. */
static inline __attribute__((always_inline)) void vexp_n(const int u, vf *x)
{
    const vf lo = vset1(-87.33654f), magic = vset1(12582912.0f);
    vi keep[8], n[8];   /* u <= 8 */
    vf t[8], f[8], p[8];
    for (int i = 0; i < u; i++) {
        keep[i] = ~(x[i] < lo);   /* NaN stays NaN */
        x[i] = (vf)(((vi)x[i] & keep[i]) | ((vi)lo & ~keep[i]));
    }
    /* round x·log2e to nearest by adding 1.5·2^23 (exact in fp32) */
    for (int i = 0; i < u; i++)
        t[i] = x[i] * vset1(1.44269504088896341f) + magic;
    for (int i = 0; i < u; i++) {
        const vf nf = t[i] - magic;
        n[i] = (vi)t[i] - (vi)magic;
        f[i] = x[i] - nf * vset1(0.693359375f) - nf * vset1(-2.12194440e-4f);
    }
    for (int i = 0; i < u; i++)
        p[i] = vset1(1.9875691500e-4f) * f[i] + vset1(1.3981999507e-3f);
    for (int i = 0; i < u; i++)
        p[i] = p[i] * f[i] + vset1(8.3334519073e-3f);
    for (int i = 0; i < u; i++)
        p[i] = p[i] * f[i] + vset1(4.1665795894e-2f);
    for (int i = 0; i < u; i++)
        p[i] = p[i] * f[i] + vset1(1.6666665459e-1f);
    for (int i = 0; i < u; i++)
        p[i] = p[i] * f[i] + vset1(5.0000001201e-1f);
    for (int i = 0; i < u; i++)
        p[i] = p[i] * f[i] * f[i] + f[i] + vset1(1.0f);
    for (int i = 0; i < u; i++) {
        const vi scale = (n[i] + 127) << 23;
        x[i] = (vf)((vi)(p[i] * (vf)scale) & keep[i]);
    }
}

static inline __attribute__((always_inline)) vf vexp(vf x)
{
    vexp_n(1, &x);
    return x;
}

/* Keys (exp_cols) or vectors along a row (exp_rows) through vexp_n at
   once. */
enum { EXP_U = 4 };

static void exp_cols(float *st, int64_t ld, int n, int m, const float *mref,
                     float *sum)
{
    for (int i = 0; i < m; i += VW) {
        vf mv = vload(mref + i), acc = {0};
        int j = 0;
        for (; j + EXP_U <= n; j += EXP_U) {
            vf e[EXP_U];
            for (int u = 0; u < EXP_U; u++)
                e[u] = vload(st + (j + u) * ld + i) - mv;
            vexp_n(EXP_U, e);
            for (int u = 0; u < EXP_U; u++) {
                vstore(st + (j + u) * ld + i, e[u]);
                acc += e[u];
            }
        }
        for (; j < n; j++) {
            vf e = vexp(vload(st + j * ld + i) - mv);
            vstore(st + j * ld + i, e);
            acc += e;
        }
        vstore(sum + i, acc);
    }
}

/* ---- softmax pieces, per query row (decode) ------------------------------- */

static inline float hmax(vf v)
{
    float x = v[0];
    for (int l = 1; l < VW; l++)
        x = v[l] > x ? v[l] : x;
    return x;
}

static void row_max(const float *st, int64_t ld, int m, int n, float *mx)
{
    for (int i = 0; i < m; i++) {
        const float *s = st + i * ld;
        vf acc = vset1(-INFINITY);
        int j = 0;
        for (; j + VW <= n; j += VW)
            acc = vmax(vload(s + j), acc);
        float x = hmax(acc);
        for (; j < n; j++)
            x = s[j] > x ? s[j] : x;
        mx[i] = x;
    }
}

static void exp_rows(float *st, int64_t ld, int m, int n, const float *mref, float *sum)
{
    for (int i = 0; i < m; i++) {
        float *s = st + i * ld;
        const vf mv = vset1(mref[i]);
        vf acc = {0};
        int j = 0;
        for (; j + EXP_U * VW <= n; j += EXP_U * VW) {
            vf e[EXP_U];
            for (int u = 0; u < EXP_U; u++)
                e[u] = vload(s + j + u * VW) - mv;
            vexp_n(EXP_U, e);
            for (int u = 0; u < EXP_U; u++) {
                vstore(s + j + u * VW, e[u]);
                acc += e[u];
            }
        }
        for (; j + VW <= n; j += VW) {
            const vf e = vexp(vload(s + j) - mv);
            vstore(s + j, e);
            acc += e;
        }
        if (j < n) {   /* the tail as one vector, -inf past n */
            float t[VW];
            for (int l = 0; l < VW; l++)
                t[l] = j + l < n ? s[j + l] : -INFINITY;
            const vf e = vexp(vload(t) - mv);
            vstore(t, e);
            for (int l = 0; j + l < n; l++)
                s[j + l] = t[l];
            acc += e;
        }
        sum[i] = hsum(acc);
    }
}


/* ---- fp16 / bf16 -> fp32 --------------------------------------------------- */

typedef uint16_t vh __attribute__((vector_size(QKV_VW * 2)));

static inline vu widen(const uint16_t *p)
{
    vh h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vu);
}

/* Exact fp16 -> fp32 without branches: move exponent and mantissa into
   place and rebias; infinities/NaNs get the full fp32 exponent; subnormals
   are renormalized by an exact fp32 subtraction. */
static inline vf f16_to_f32(vu h)
{
    vu o = (h & 0x7fff) << 13;
    vu e = o & 0x0f800000;
    o += 112u << 23;
    o += (vu)(e == 0x0f800000) & (112u << 23);
    vu zero = (vu)(e == 0);
    vf sub = (vf)(o + (1u << 23)) - (vf)(((vu){0}) + (113u << 23));
    o = (zero & (vu)sub) | (~zero & o);
    return (vf)(o | ((h & 0x8000) << 16));
}

/* Whole vectors through the conversion instruction where the set has
   one (F16C: 8 at a time), which is exact too (a signaling NaN comes out
   quiet); on AVX2 the bit recipe took 45% of a decoding call from an
   fp16 cache. */
static void cvt_f16(const uint16_t *src, float *dst, int64_t n)
{
    int64_t j = 0;
#if defined(__F16C__) && QKV_VW >= 8
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j))));
#endif
    for (; j + VW <= n; j += VW)
        vstore(dst + j, f16_to_f32(widen(src + j)));
    if (j < n) {
        uint16_t tail[VW] = {0};
        float out[VW];
        memcpy(tail, src + j, (size_t)(n - j) * 2);
        vstore(out, f16_to_f32(widen(tail)));
        memcpy(dst + j, out, (size_t)(n - j) * 4);
    }
}

static void cvt_bf16(const uint16_t *src, float *dst, int64_t n)
{
    int64_t j = 0;
    for (; j + VW <= n; j += VW)
        vstore(dst + j, (vf)(widen(src + j) << 16));
    for (; j < n; j++) {
        uint32_t u = (uint32_t)src[j] << 16;
        memcpy(dst + j, &u, 4);
    }
}

typedef int8_t vc __attribute__((vector_size(QKV_VW)));
typedef int16_t vs16 __attribute__((vector_size(QKV_VW * 2)));

/* VW int8 codes at p as fp32: on AVX2 one sign extension from memory
   (GCC widens the generic form in 128-bit halves with shifts and
   unpacks); else through int16 and int32 (GCC widens a step at a time in
   vector registers, where a direct int8 -> float conversion goes
   scalar). */
static inline vf codes(const void *p)
{
#if defined(__AVX2__) && QKV_VW == 8
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    vc c;
    memcpy(&c, p, sizeof c);
    return __builtin_convertvector(__builtin_convertvector(__builtin_convertvector(c, vs16), vi),
                                   vf);
#endif
}

/* int8 cache rows: codes times their row's scale. */
static void cvt_i8(const int8_t *src, float scale, float *dst, int64_t n)
{
    const vf s = vset1(scale);
    int64_t j = 0;
    for (; j + VW <= n; j += VW) {
        vstore(dst + j, codes(src + j) * s);
    }
    for (; j < n; j++)
        dst[j] = (float)src[j] * scale;
}

/* int8 codes to bf16: the float's upper half, exact for 8-bit integers. */
static void cvt_i8_bf16(const int8_t *src, int64_t lds, int rows, int64_t n, uint16_t *dst,
                        int64_t ldd)
{
    for (int r = 0; r < rows; r++) {
        const int8_t *s = src + r * lds;
        uint16_t *d = dst + r * ldd;
        int64_t j = 0;
        for (; j + VW <= n; j += VW) {
            const vh h = __builtin_convertvector((vu)codes(s + j) >> 16, vh);
            memcpy(d + j, &h, sizeof h);
        }
        for (; j < n; j++) {
            const float f = (float)s[j];
            uint32_t u;
            memcpy(&u, &f, sizeof u);
            d[j] = (uint16_t)(u >> 16);
        }
    }
}

/* ---- fp32 -> fp16 / bf16, rounded to nearest even ------------------------- */

/* The bit recipes of src/core/convert.c, lane by lane, without branches:
   every case is computed and the right one selected. */
static inline vu f32_to_bf16_bits(vf x)
{
    vu u = (vu)x;
    vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);
    vu r = (u + 0x7fffu + ((u >> 16) & 1)) >> 16;
    return (nan & ((u >> 16) | 0x40)) | (~nan & r);
}

static inline vu f32_to_f16_bits(vf x)
{
    vu u = (vu)x;
    vu sign = (u >> 16) & 0x8000;
    vu a = u & 0x7fffffffu;
    vu normal = (a + 0xc8000fffu + ((a >> 13) & 1)) >> 13;
    vu sub = (vu)((vf)a + vset1(0.5f)) - 0x3f000000u;
    vu is_sub = (vu)(a < 0x38800000u);
    vu is_big = (vu)(a >= 0x477ff000u);
    vu is_inf_nan = (vu)(a >= 0x7f800000u);
    vu r = (is_sub & sub) | (~is_sub & normal);
    r = (is_big & 0x7c00) | (~is_big & r);
    r = (is_inf_nan & (0x7c00 | ((vu)(a > 0x7f800000u) & 0x200))) | (~is_inf_nan & r);
    return sign | r;
}

typedef uint16_t vh_out __attribute__((vector_size(QKV_VW * 2)));

#define STORE_HALF(name, bits)                                                 \
    static void name(const float *src, float mul, uint16_t *dst, int64_t n)   \
    {                                                                          \
        const vf m = vset1(mul);                                               \
        int64_t j = 0;                                                         \
        for (; j + VW <= n; j += VW) {                                         \
            vh_out h = __builtin_convertvector(bits(vload(src + j) * m), vh_out); \
            memcpy(dst + j, &h, sizeof h);                                     \
        }                                                                      \
        if (j < n) {                                                           \
            float in[VW] = {0};                                                \
            memcpy(in, src + j, (size_t)(n - j) * sizeof(float));              \
            vh_out h = __builtin_convertvector(bits(vload(in) * m), vh_out);   \
            memcpy(dst + j, &h, (size_t)(n - j) * sizeof(uint16_t));           \
        }                                                                      \
    }
STORE_HALF(store_f16, f32_to_f16_bits)
STORE_HALF(store_bf16, f32_to_bf16_bits)

#if QKV_VW == 16 && defined(__AVX512BW__)
/* Word indices that interleave two rows of 32 bf16 into pairs: the low
   16 pairs (columns c..c+15) and the high 16 (c+16..c+31); index 32 + t
   is word t of the second row. */
static const int16_t pair_lo[32] = {
    0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47 };
static const int16_t pair_hi[32] = {
    16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63 };
#endif

/* ---- decode scores, fp32: 4 keys x 4 queries reduced together ------------- */

#if defined(__AVX512F__) && QKV_VW == 16
#include <immintrin.h>
#define QKV_HAVE_DEC_F32 1

/* Sum of lanes of v[0..15] into lane L of one vector (L = 4·key + query):
   pairs of vectors add their interleaved halves, then pairs of those,
   then the four 128-bit blocks; 15 adds and 30 shuffles instead of 16
   full horizontal sums. */
static inline __m512 reduce16(const __m512 *v)
{
    __m512 a[8], b[4];
    for (int t = 0; t < 8; t++)
        a[t] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * t], v[2 * t + 1]),
                             _mm512_unpackhi_ps(v[2 * t], v[2 * t + 1]));
    for (int t = 0; t < 4; t++) {
        __m512d x = _mm512_castps_pd(a[2 * t]), y = _mm512_castps_pd(a[2 * t + 1]);
        b[t] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    /* b[t] holds sources 4t..4t+3 in each 128-bit block: add the blocks */
    __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44),
                               _mm512_shuffle_f32x4(b[0], b[1], 0xee));
    __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44),
                               _mm512_shuffle_f32x4(b[2], b[3], 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88),
                         _mm512_shuffle_f32x4(x01, x23, 0xdd));
}

/* reduce16 of int32 sums, converted to fp32 at the end. */
static inline __m512 reduce16_i32(const __m512 *v)
{
    __m512i a[8], b[4];
    for (int t = 0; t < 8; t++) {
        const __m512i x = _mm512_castps_si512(v[2 * t]), y = _mm512_castps_si512(v[2 * t + 1]);
        a[t] = _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
    }
    for (int t = 0; t < 4; t++)
        b[t] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * t], a[2 * t + 1]),
                                _mm512_unpackhi_epi64(a[2 * t], a[2 * t + 1]));
    const __m512i x01 = _mm512_add_epi32(_mm512_shuffle_i32x4(b[0], b[1], 0x44),
                                         _mm512_shuffle_i32x4(b[0], b[1], 0xee));
    const __m512i x23 = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2], b[3], 0x44),
                                         _mm512_shuffle_i32x4(b[2], b[3], 0xee));
    return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_shuffle_i32x4(x01, x23, 0x88),
                                               _mm512_shuffle_i32x4(x01, x23, 0xdd)));
}

/* Row r (< live) of st gets the 4 keys of query r in s: reduce16 leaves
   source 4·r + e (query r, key e) in lane 4·r + e. */
static inline void store_rows4(__m512 s, int live, float *st, int64_t ldst)
{
    _mm_storeu_ps(st, _mm512_extractf32x4_ps(s, 0));
    if (live > 1)
        _mm_storeu_ps(st + ldst, _mm512_extractf32x4_ps(s, 1));
    if (live > 2)
        _mm_storeu_ps(st + 2 * ldst, _mm512_extractf32x4_ps(s, 2));
    if (live > 3)
        _mm_storeu_ps(st + 3 * ldst, _mm512_extractf32x4_ps(s, 3));
}

/* c + a·b per lane: fp32 values, (bf 1) pairs of bf16 values along the
   reduction (vdpbf16ps), or (bf 2) pairs of int16 values into int32 sums
   (vpdpwssd), on sets that have them. */
static inline __attribute__((always_inline))
__m512 dot_step(const int bf, __m512 c, __m512i a, __m512i b)
{
#ifdef __AVX512VNNI__
    if (bf == 2)
        return _mm512_castsi512_ps(_mm512_dpwssd_epi32(_mm512_castps_si512(c), a, b));
#endif
#ifdef __AVX512BF16__
    if (bf == 1)
        return _mm512_dpbf16_ps(c, (__m512bh)a, (__m512bh)b);
#endif
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), c);
}

/* Query-major scores st[i·ldst + j] of n keys by m queries in blocks of 4
   keys x 4 queries, rows of len 32-bit lanes (fp32 values, bf16 pairs when
   bf is 1; bf 2: int8 K rows, 2 codes per lane, widened to int16 pairs for
   int16 queries, len a multiple of 16, sums in int32 times qsc[i]; bf 3:
   fp16 K rows of len values, widened exactly to fp32 lanes), the
   queries ldq bytes apart; the last n % 4 keys one sum at a time. q (and
   qsc) are readable up to row round_up(m, 4). pf's lines are asked for
   along the first 4 queries' pass, spread over the steps along the row. */
static inline __attribute__((always_inline))
void qk_rows_blocks(const int bf, int n, int m, int len, float scale, const qkv__rows *k,
                    const char *q, int64_t ldq, const float *qsc, float *st, int64_t ldst,
                    qkv__pf *pf)
{
    const int full = len - len % VW;
    const __mmask16 tail = (__mmask16)((1u << (len - full)) - 1);
    const __m512 sc = _mm512_set1_ps(scale);
    const int steps = (len + VW - 1) / VW;
    const int spread = pf ? (pf->per4 + steps - 1) / steps : 0;
    qkv__pf_run run = qkv__pf_run_begin(pf);
    for (int i = 0; i < m; i += 4) {
        const int live = m - i < 4 ? m - i : 4;
        const char *q0 = q + i * ldq;
        __m512 sv = sc;
        if (bf == 2)
            sv = _mm512_mul_ps(sc, _mm512_setr_ps(qsc[i], qsc[i], qsc[i], qsc[i], qsc[i + 1],
                                                  qsc[i + 1], qsc[i + 1], qsc[i + 1], qsc[i + 2],
                                                  qsc[i + 2], qsc[i + 2], qsc[i + 2], qsc[i + 3],
                                                  qsc[i + 3], qsc[i + 3], qsc[i + 3]));
        const int64_t ldk = k->ld;
        qkv__walk kw = qkv__walk_at(k, 0);
        int j = 0;
        for (; j + 4 <= n; j += 4) {
            if (j)
                qkv__walk_next(&kw, k, j, 4);
            __m512 c[16];
            for (int t = 0; t < 16; t++)
                c[t] = _mm512_setzero_ps();
            const char *k0 = kw.at;
            for (int x = 0; x < full + (tail ? VW : 0); x += VW) {
                /* whole steps load unmasked: masked loads do not train
                   the hardware prefetchers */
                __m512i kv[4], qv[4];
                if (bf == 2) {
                    for (int e = 0; e < 4; e++) {
                        kv[e] = _mm512_cvtepi8_epi16(
                            _mm256_loadu_si256((const __m256i *)(k0 + e * ldk + 2 * x)));
                        qv[e] = _mm512_loadu_si512(q0 + e * ldq + 4 * x);
                    }
                } else if (bf == 3) {
                    for (int e = 0; e < 4; e++) {
                        const __m256i h =
                            x < full ? _mm256_loadu_si256((const __m256i *)(k0 + e * ldk + 2 * x))
                                     : _mm256_maskz_loadu_epi16(tail, k0 + e * ldk + 2 * x);
                        kv[e] = _mm512_castps_si512(_mm512_cvtph_ps(h));
                        qv[e] = x < full ? _mm512_loadu_si512(q0 + e * ldq + 4 * x)
                                         : _mm512_maskz_loadu_epi32(tail, q0 + e * ldq + 4 * x);
                    }
                } else if (x < full) {
                    for (int e = 0; e < 4; e++) {
                        kv[e] = _mm512_loadu_si512(k0 + e * ldk + 4 * x);
                        qv[e] = _mm512_loadu_si512(q0 + e * ldq + 4 * x);
                    }
                } else {
                    for (int e = 0; e < 4; e++) {
                        kv[e] = _mm512_maskz_loadu_epi32(tail, k0 + e * ldk + 4 * x);
                        qv[e] = _mm512_maskz_loadu_epi32(tail, q0 + e * ldq + 4 * x);
                    }
                }
                for (int r = 0; r < 4; r++)   /* rows past m stay zero */
                    if (r < live)
                        for (int e = 0; e < 4; e++)
                            c[4 * r + e] = dot_step(bf, c[4 * r + e], kv[e], qv[r]);
                if (i == 0)
                    qkv__pf_ask(pf, &run, spread);
            }
            store_rows4(_mm512_mul_ps(bf == 2 ? reduce16_i32(c) : reduce16(c), sv), live,
                        st + i * ldst + j, ldst);
        }
        for (; j < n; j++)
            for (int r = 0; r < live; r++) {
                const char *kj = qkv__row(k, j);
                __m512 c = _mm512_setzero_ps();
                for (int x = 0; x < full + (tail ? VW : 0); x += VW) {
                    const __mmask16 mk = x < full ? (__mmask16)0xffff : tail;
                    const __m512i kx =
                        bf == 2 ? _mm512_cvtepi8_epi16(
                                      _mm256_loadu_si256((const __m256i *)(kj + 2 * x)))
                        : bf == 3 ? _mm512_castps_si512(
                                        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, kj + 2 * x)))
                                  : _mm512_maskz_loadu_epi32(mk, kj + 4 * x);
                    c = dot_step(bf, c, kx, _mm512_maskz_loadu_epi32(mk, q0 + r * ldq + 4 * x));
                }
                st[(i + r) * ldst + j] =
                    bf == 2 ? (float)_mm512_reduce_add_epi32(_mm512_castps_si512(c)) * scale *
                                  qsc[i + r]
                            : _mm512_reduce_add_ps(c) * scale;
            }
    }
    qkv__pf_run_end(pf, &run);
}

/* The most 32-bit units (fp32 values, bf16 or int16 pairs) a row the
   lanes kernels take, and the fewest queries: their lanes run along 16
   of them whatever their number. Zen 4, one thread, bf16 1,Sq,1024 from
   the L3 against qk_rows_blocks: 16 rows 0.92x the call's time, 12 rows
   1.06x, 8 rows 1.27x. */
enum { LANES_MAXDP = 256, LANES_MINROWS = 14 };

/* nk keys (rows kr[e]) against the queries' pairs qt [dp][16], lanes
   along the queries, each key's sums one chain over the pairs (so every
   grouping of the keys gives the same bits): fp32 values (bf 0), bf16
   pairs (bf 1), or int16 pairs into exact int32 sums (bf 2); times sv (a
   scale per query) into
   st[r·ldst + e] for r < m. pf's lines asked for every 16 pairs,
   `spread` at a time. */
static inline __attribute__((always_inline))
void qk_lanes_block(const int bf, const int nk, int m, int dp, __m512 sv,
                    const char *const *kr, const uint32_t *qt, float *st, int64_t ldst,
                    qkv__pf *pf, qkv__pf_run *run, int spread)
{
    __m512 c[8];
    for (int e = 0; e < nk; e++)
        c[e] = _mm512_setzero_ps();
    const int32_t *kp[8];
    for (int e = 0; e < nk; e++)
        kp[e] = (const int32_t *)kr[e];
    for (int x0 = 0; x0 < dp; x0 += 16) {
        const int x1 = dp - x0 < 16 ? dp : x0 + 16;
        for (int x = x0; x < x1; x++) {
            const __m512i qv = _mm512_load_si512(qt + 16 * x);
            for (int e = 0; e < nk; e++)
                c[e] = dot_step(bf, c[e], _mm512_set1_epi32(kp[e][x]), qv);
        }
        qkv__pf_ask(pf, run, spread);
    }
    for (int e = 0; e < nk; e++)
        c[e] = _mm512_mul_ps(bf == 2 ? _mm512_cvtepi32_ps(_mm512_castps_si512(c[e])) : c[e], sv);
    if (nk < 8) {   /* one key at a time: row r's value is lane r */
        for (int e = 0; e < nk; e++) {
            float v[16];
            _mm512_storeu_ps(v, c[e]);
            for (int r = 0; r < m; r++)
                st[r * ldst + e] = v[r];
        }
        return;
    }
    /* 8 keys x 16 queries to query rows of 8: interleave pairs of keys,
       then pairs of those; u[t] (keys 0-3) and w[t] (keys 4-7) hold query
       4·b + t in 128-bit block b */
    __m512 u[4], w[4];
    for (int h = 0; h < 2; h++) {
        const __m512 *a = c + 4 * h;
        const __m512d l01 = _mm512_castps_pd(_mm512_unpacklo_ps(a[0], a[1]));
        const __m512d h01 = _mm512_castps_pd(_mm512_unpackhi_ps(a[0], a[1]));
        const __m512d l23 = _mm512_castps_pd(_mm512_unpacklo_ps(a[2], a[3]));
        const __m512d h23 = _mm512_castps_pd(_mm512_unpackhi_ps(a[2], a[3]));
        __m512 *o = h ? w : u;
        o[0] = _mm512_castpd_ps(_mm512_unpacklo_pd(l01, l23));
        o[1] = _mm512_castpd_ps(_mm512_unpackhi_pd(l01, l23));
        o[2] = _mm512_castpd_ps(_mm512_unpacklo_pd(h01, h23));
        o[3] = _mm512_castpd_ps(_mm512_unpackhi_pd(h01, h23));
    }
#define LANES_STORE(b)                                                          \
    for (int t = 0; t < 4 && 4 * (b) + t < m; t++) {                            \
        float *row = st + (4 * (b) + t) * ldst;                                 \
        _mm_storeu_ps(row, _mm512_extractf32x4_ps(u[t], b));                    \
        _mm_storeu_ps(row + 4, _mm512_extractf32x4_ps(w[t], b));                \
    }
    LANES_STORE(0)
    LANES_STORE(1)
    LANES_STORE(2)
    LANES_STORE(3)
#undef LANES_STORE
}

/* The pairs (32 bits) of m (<= 16) query rows q [m][ldq] (16-bit units)
   transposed: qt[16·x + r] pair x of row r, zero for r >= m. */
static void lanes_queries(int m, int dp, const uint16_t *q, int64_t ldq, uint32_t *qt)
{
    for (int x = 0; x < dp; x++)
        for (int r = 0; r < 16; r++) {
            uint32_t u = 0;
            if (r < m)
                memcpy(&u, q + r * ldq + 2 * x, sizeof u);
            qt[16 * x + r] = u;
        }
}

/* The decode scores of LANES_MINROWS-16 queries: n keys (rows of k: fp32
   values, bf 0; bf16 pairs, bf 1; int8 codes, bf 2, d = 2·dp of them,
   widened to int16 pairs block by block) for m query rows q [m][ldq]
   (16-bit units; pairs, or fp32 values, of 32 bits), times sv (a scale
   per query), through qk_lanes_block, 8 keys a block, then one at a
   time: the queries transposed once a call, each key's pair broadcast,
   so no sums are reduced across lanes (qk_rows_blocks: 45 shuffles and
   adds a block of 4 keys x 4 queries). */
static inline __attribute__((always_inline))
void qk_lanes_rows(const int bf, int n, int m, int dp, __m512 sv, const qkv__rows *k,
                   const uint16_t *q, int64_t ldq, float *st, int64_t ldst, qkv__pf *pf)
{
    uint32_t qt[LANES_MAXDP * 16] __attribute__((aligned(64)));
    int16_t kw[8][2 * LANES_MAXDP] __attribute__((aligned(64)));   /* bf 2 */
    lanes_queries(m, dp, q, ldq, qt);
    const int segs = (dp + 15) / 16;
    const int spread = pf ? (2 * pf->per4 + segs - 1) / segs : 0;
    qkv__pf_run run = qkv__pf_run_begin(pf);
    for (int j = 0; j < n;) {
        const int nk = n - j >= 8 ? 8 : 1;
        const char *kr[8];
        for (int e = 0; e < nk; e++) {
            kr[e] = qkv__row(k, j + e);
            if (bf == 2) {
                for (int c = 0; c < 2 * dp; c += 32)
                    _mm512_store_si512(kw[e] + c, _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                                      (const __m256i *)(kr[e] + c))));
                kr[e] = (const char *)kw[e];
            }
        }
        if (nk == 8)
            qk_lanes_block(bf, 8, m, dp, sv, kr, qt, st + j, ldst, pf, &run, spread);
        else
            qk_lanes_block(bf, 1, m, dp, sv, kr, qt, st + j, ldst, pf, &run, spread);
        j += nk;
    }
    qkv__pf_run_end(pf, &run);
}

static void qk_f32_dec(int n, int m, int d, float scale, const qkv__rows *k, const float *q,
                       int64_t ldq, float *st, int64_t ldst, qkv__pf *pf)
{
    if (m >= LANES_MINROWS && m <= 16 && d <= LANES_MAXDP)
        qk_lanes_rows(0, n, m, d, _mm512_set1_ps(scale), k, (const uint16_t *)q, 2 * ldq, st,
                      ldst, pf);
    else
        qk_rows_blocks(0, n, m, d, scale, k, (const char *)q, ldq * 4, NULL, st, ldst, pf);
}

/* qk_f32_dec's blocks on fp16 rows widened as they are loaded: the bits
   of qk_f32_dec on the widened rows. */
static void qk_f16_dec(int n, int m, int d, float scale, const qkv__rows *k, const float *q,
                       int64_t ldq, float *st, int64_t ldst, qkv__pf *pf)
{
    qk_rows_blocks(3, n, m, d, scale, k, (const char *)q, ldq * 4, NULL, st, ldst, pf);
}

/* rows (<= 4) of acc x nw·32 columns (the ones past cols masked) over n
   V rows [n][ldv bytes] from v, fp16 (h 1, widened as they load) or fp32
   (h 0), P fp32 [rows][ldp]: each lane adds its keys' products one key at
   a time (FMAs), after acc times alpha. pf_key of pf's lines after each
   key; with `touch` the rest of each V row (from the block's 64 columns
   up to byte `touch`) brought into L1, so its lines are read in address
   order. The sums are pv's on fp32 rows, bit for bit. */
static inline __attribute__((always_inline))
void pvh_block(const int h, const int rows, const int nw, const int full, int n, int cols,
               const float *p, int64_t ldp, const char *v, int64_t ldv, const float *alpha,
               float *acc, int64_t lda, int touch, qkv__pf *pf, int pf_key)
{
    const int esz = h ? 2 : 4;
    __mmask16 mc[4];
    for (int t = 0; t < 4; t++) {
        const int left = full ? 16 : cols - 16 * t;
        mc[t] = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
    }
    __m512 c[4][4];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < 2 * nw; t++) {
            c[r][t] = _mm512_maskz_loadu_ps(mc[t], acc + r * lda + 16 * t);
            if (alpha)
                c[r][t] = _mm512_mul_ps(c[r][t], _mm512_set1_ps(alpha[r]));
        }
    for (int j = 0; j < n; j++) {
        const char *vj = v + j * ldv;
        for (int x = 64 * esz; x < touch; x += 64)
            __builtin_prefetch(vj + x, 0, 3);
        __m512 b[4];
        for (int t = 0; t < 2 * nw; t++) {   /* whole vectors unmasked: they train the prefetchers */
            const char *at = vj + 16 * esz * t;
            if (h)
                b[t] = _mm512_cvtph_ps(mc[t] == 0xffff
                                           ? _mm256_loadu_si256((const __m256i *)at)
                                           : _mm256_maskz_loadu_epi16(mc[t], at));
            else
                b[t] = mc[t] == 0xffff ? _mm512_loadu_ps(at) : _mm512_maskz_loadu_ps(mc[t], at);
        }
        /* whole vectors as pv_block's expression, masked ones as pv_edge's
           FMA: the fp32 path's bits even where the compiler does not
           contract a·b + c (unoptimized builds) */
        for (int r = 0; r < rows; r++) {
            const __m512 a = _mm512_set1_ps(p[r * ldp + j]);
            for (int t = 0; t < 2 * nw; t++)
                c[r][t] = mc[t] == 0xffff ? (__m512)((vf)c[r][t] + (vf)a * (vf)b[t])
                                          : _mm512_fmadd_ps(a, b[t], c[r][t]);
        }
        if (pf)
            qkv__pf_lines(pf, pf_key);
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < 2 * nw; t++)
            _mm512_mask_storeu_ps(acc + r * lda + 16 * t, mc[t], c[r][t]);
}

/* One row group of a chunk of keys: column blocks of 64, then of 32;
   the first block touches the rest of the rows, the first row group's
   blocks share asking for pf. */
#define PVH_CALL(h, rows, nw, full)                                               \
    pvh_block(h, rows, nw, full, nk, cols, p + i * ldp + kc, ldp,                 \
              vc + (h ? 2 : 4) * c0, v->ld, al ? al + i : NULL, acc + i * lda + c0, \
              lda, c0 || i ? 0 : (h ? 2 : 4) * dv, i ? NULL : pf, pf_key)
#define PVH_ROWS(h, rows)                                                         \
    do {                                                                          \
        for (int c0 = 0; c0 < dv; c0 += 64) {                                     \
            const int cols = dv - c0 < 64 ? dv - c0 : 64;                         \
            if (cols == 64) PVH_CALL(h, rows, 2, 1);                              \
            else if (cols > 32) PVH_CALL(h, rows, 2, 0);                          \
            else if (cols == 32) PVH_CALL(h, rows, 1, 1);                         \
            else PVH_CALL(h, rows, 1, 0);                                         \
        }                                                                         \
    } while (0)

/* acc = alpha·acc + P·V from fp16 (h 1) or fp32 V rows in place
   (kernels.h): chunks of keys that end at v's block boundaries, row
   groups of 4 over each. */
static inline __attribute__((always_inline))
void pv_wide_dec(const int h, int m, int n, int dv, const float *p, int64_t ldp,
                 const qkv__rows *v, const float *alpha, float *acc, int64_t lda, qkv__pf *pf)
{
    const int blocks = (dv + 63) / 64;
    const int pf_key = pf ? (pf->per4 + 4 * blocks - 1) / (4 * blocks) : 0;
    for (int kc = 0, nk; kc < n; kc += nk) {
        const qkv__walk w = qkv__walk_at(v, kc);
        const char *vc = w.at;
        nk = n - kc < 32 ? n - kc : 32;
        nk = nk < w.left ? nk : w.left;
        const float *al = kc ? NULL : alpha;
        for (int i = 0; i < m; i += 4)
            switch (m - i) {
            case 1: PVH_ROWS(h, 1); break;
            case 2: PVH_ROWS(h, 2); break;
            case 3: PVH_ROWS(h, 3); break;
            default: PVH_ROWS(h, 4); break;
            }
    }
    if (!n && alpha)   /* no keys: acc still takes alpha */
        for (int i = 0; i < m; i++)
            for (int c = 0; c < dv; c++)
                acc[i * lda + c] *= alpha[i];
}

static void pv_f16_dec(int m, int n, int dv, const float *p, int64_t ldp, const qkv__rows *v,
                       const float *alpha, float *acc, int64_t lda, qkv__pf *pf)
{
    pv_wide_dec(1, m, n, dv, p, ldp, v, alpha, acc, lda, pf);
}

static void pv_f32_dec(int m, int n, int dv, const float *p, int64_t ldp, const qkv__rows *v,
                       const float *alpha, float *acc, int64_t lda, qkv__pf *pf)
{
    pv_wide_dec(0, m, n, dv, p, ldp, v, alpha, acc, lda, pf);
}
#endif

/* ---- bf16 dot products (vdpbf16ps) --------------------------------------- */

#if defined(__AVX512BF16__) && QKV_VW == 16
#include <immintrin.h>
#define QKV_HAVE_BF16_DOT 1

/* c + a.lo·b.lo + a.hi·b.hi per 32-bit lane: a pair of bf16 values adjacent
   along the reduction axis, products exact, sums in fp32. */
static inline vf dot2(vf c, __m512i a, __m512i b)
{
    return (vf)_mm512_dpbf16_ps((__m512)c, (__m512bh)a, (__m512bh)b);
}

static inline __m512i pair_bcast(const uint16_t *p)
{
    uint32_t u;
    memcpy(&u, p, sizeof u);
    return _mm512_set1_epi32((int)u);
}

static inline __m512i pairs_load(const uint32_t *p) { return _mm512_loadu_si512(p); }

/* rows keys x nv·16 queries of the scores (both constant at every call). */
static inline __attribute__((always_inline))
void qkb_block(const int rows, const int nv, int dp, float scale, const uint16_t *k,
               int64_t ldk, const uint32_t *qp, int64_t ldqp, float *s, int64_t lds)
{
    vf c[MR][2];
    for (int r = 0; r < rows; r++)
        c[r][0] = c[r][1] = (vf){0};
    for (int x = 0; x < dp; x++) {
        const uint32_t *b = qp + x * ldqp;
        __m512i b0 = pairs_load(b), b1 = nv > 1 ? pairs_load(b + VW) : b0;
        for (int r = 0; r < rows; r++) {
            __m512i a = pair_bcast(k + r * ldk + 2 * x);
            c[r][0] = dot2(c[r][0], a, b0);
            if (nv > 1)
                c[r][1] = dot2(c[r][1], a, b1);
        }
    }
    vf sc = vset1(scale);
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < nv; v++)
            vstore(s + r * lds + v * VW, c[r][v] * sc);
}

#define QKB_COLS(rows)                                                          \
    do {                                                                        \
        int i = 0;                                                              \
        for (; i + 2 * VW <= m; i += 2 * VW)                                    \
            qkb_block(rows, 2, dp, scale, k + j * ldk, ldk, qp + i, ldqp,       \
                      st + j * ldst + i, ldst);                                 \
        if (i < m)                                                              \
            qkb_block(rows, 1, dp, scale, k + j * ldk, ldk, qp + i, ldqp,       \
                      st + j * ldst + i, ldst);                                 \
    } while (0)

static void qk_bf16(int n, int m, int dp, float scale, const uint16_t *k, int64_t ldk,
                    const uint32_t *qp, int64_t ldqp, float *st, int64_t ldst)
{
    int j = 0;
    for (; j + MR <= n; j += MR)
        QKB_COLS(MR);
    for (; j + 4 <= n; j += 4)
        QKB_COLS(4);
    for (; j < n; j++)
        QKB_COLS(1);
}

/* Few queries (decode): dot products along d straight from the bf16 rows,
   32 elements per instruction, up to four queries per key row read. */
static void qk_bf16_rows(int n, int m, int dp, float scale, const uint16_t *k, int64_t ldk,
                         const uint16_t *q, int64_t ldq, float *st, int64_t ldst)
{
    const int full = dp - dp % VW;
    const __mmask16 tail = (__mmask16)((1u << (dp - full)) - 1);
    for (int j = 0; j < n; j++) {
        const uint16_t *kr = k + j * ldk;
        for (int i = 0; i < m; i += 4) {
            const int w = m - i < 4 ? m - i : 4;
            vf c[4] = { {0}, {0}, {0}, {0} };
            for (int x = 0; x < full; x += VW) {
                __m512i a = _mm512_loadu_si512(kr + 2 * x);
                for (int r = 0; r < w; r++)
                    c[r] = dot2(c[r], a, _mm512_loadu_si512(q + (i + r) * ldq + 2 * x));
            }
            if (tail) {
                __m512i a = _mm512_maskz_loadu_epi32(tail, kr + 2 * full);
                for (int r = 0; r < w; r++)
                    c[r] = dot2(c[r], a,
                                _mm512_maskz_loadu_epi32(tail, q + (i + r) * ldq + 2 * full));
            }
            for (int r = 0; r < w; r++)
                st[j * ldst + i + r] = _mm512_reduce_add_ps((__m512)c[r]) * scale;
        }
    }
}

/* Word 2t takes word t (the even key), word 2t+1 word 16+t (the odd key). */
static inline __m512i pair_interleave(void)
{
    int16_t ix[32];
    for (int t = 0; t < 16; t++) {
        ix[2 * t] = (int16_t)t;
        ix[2 * t + 1] = (int16_t)(16 + t);
    }
    return _mm512_loadu_si512(ix);
}

static void exp_pack_bf16(const float *st, int64_t ld, int n, int m, const float *mref,
                          const float *pmul, float *sum, uint32_t *pp, int64_t ldp)
{
    const __m512i ix = pair_interleave();
    for (int i = 0; i < m; i += VW) {
        vf mv = vload(mref + i), acc = {0};
        for (int j = 0; j < n; j += 2) {
            vf e0 = vexp(vload(st + j * ld + i) - mv);
            vf e1 = j + 1 < n ? vexp(vload(st + (j + 1) * ld + i) - mv) : (vf){0};
            acc += e0 + e1;
            if (pmul) {
                e0 *= vset1(pmul[j]);
                if (j + 1 < n)
                    e1 *= vset1(pmul[j + 1]);
            }
            __m512i h = (__m512i)_mm512_cvtne2ps_pbh((__m512)e1, (__m512)e0);
            _mm512_storeu_si512(pp + (j / 2) * ldp + i, _mm512_permutexvar_epi16(ix, h));
        }
        vstore(sum + i, acc);
    }
}

/* rows of acc x nv·16 columns, the last vector masked by `tail`; the pair
   of row r and reduction step jj is pp[r·psi + jj·psj]. alpha NULL: no
   rescaling of acc. */
static inline __attribute__((always_inline))
void pvb_block(const int rows, const int nv, __mmask16 tail, int np, const uint32_t *pp,
               int64_t psi, int64_t psj, const uint32_t *vp, int64_t ldvp,
               const float *alpha, float *acc, int64_t lda)
{
    vf c[MR][2];
    const __mmask16 mk[2] = { nv > 1 ? (__mmask16)0xffff : tail, tail };
    for (int r = 0; r < rows; r++) {
        for (int v = 0; v < nv; v++)
            c[r][v] = (vf)_mm512_maskz_loadu_ps(mk[v], acc + r * lda + v * VW);
        if (alpha) {
            vf s = vset1(alpha[r]);
            for (int v = 0; v < nv; v++)
                c[r][v] *= s;
        }
    }
    for (int jj = 0; jj < np; jj++) {
        const uint32_t *b = vp + jj * ldvp;
        __m512i b0 = _mm512_maskz_loadu_epi32(mk[0], b);
        __m512i b1 = nv > 1 ? _mm512_maskz_loadu_epi32(mk[1], b + VW) : b0;
        for (int r = 0; r < rows; r++) {
            __m512i a = _mm512_set1_epi32((int)pp[r * psi + jj * psj]);
            c[r][0] = dot2(c[r][0], a, b0);
            if (nv > 1)
                c[r][1] = dot2(c[r][1], a, b1);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < nv; v++)
            _mm512_mask_storeu_ps(acc + r * lda + v * VW, mk[v], (__m512)c[r][v]);
}

#define PVB_COLS(rows, psi, psj, alpha_r)                                       \
    do {                                                                        \
        int c0 = 0;                                                             \
        for (; c0 + 2 * VW <= dv; c0 += 2 * VW)                                 \
            pvb_block(rows, 2, 0xffff, np, pp + i * (psi), psi, psj, vp + c0,   \
                      ldvp, alpha_r, acc + i * lda + c0, lda);                  \
        for (; c0 < dv; c0 += VW)                                               \
            pvb_block(rows, 1,                                                  \
                      dv - c0 >= VW ? (__mmask16)0xffff                         \
                                    : (__mmask16)((1u << (dv - c0)) - 1),       \
                      np, pp + i * (psi), psi, psj, vp + c0, ldvp, alpha_r,     \
                      acc + i * lda + c0, lda);                                 \
    } while (0)

static void pv_bf16(int m, int np, int dv, const uint32_t *pp, int64_t ldp,
                    const uint32_t *vp, int64_t ldvp, const float *alpha,
                    float *acc, int64_t lda)
{
    int i = 0;
    for (; i + MR <= m; i += MR)
        PVB_COLS(MR, 1, ldp, alpha + i);
    for (; i + 4 <= m; i += 4)
        PVB_COLS(4, 1, ldp, alpha + i);
    for (; i < m; i++)
        PVB_COLS(1, 1, ldp, alpha + i);
}

#define MM_ROWS(psi, psj)                                                       \
    do {                                                                        \
        int i = 0;                                                              \
        for (; i + MR <= m; i += MR)                                            \
            PVB_COLS(MR, psi, psj, NULL);                                       \
        for (; i + 4 <= m; i += 4)                                              \
            PVB_COLS(4, psi, psj, NULL);                                        \
        for (; i < m; i++)                                                      \
            PVB_COLS(1, psi, psj, NULL);                                        \
    } while (0)

/* A unit stride on either side (every caller's case) is a constant in
   the inner loops: the broadcasts need no multiply. */
static void mm_bf16(int m, int np, int dv, const uint32_t *pp, int64_t psi, int64_t psj,
                    const uint32_t *vp, int64_t ldvp, float *acc, int64_t lda)
{
    if (psi == 1)
        MM_ROWS(1, psj);
    else if (psj == 1)
        MM_ROWS(psi, 1);
    else
        MM_ROWS(psi, psj);
}
/* ---- decode: few queries, keys and values read in place ------------------- */

static void qk_bf16_dec(int n, int m, int dp, float scale, const qkv__rows *k,
                        const uint16_t *q, int64_t ldq, float *st, int64_t ldst, qkv__pf *pf)
{
    if (m >= LANES_MINROWS && m <= 16 && dp <= LANES_MAXDP)
        qk_lanes_rows(1, n, m, dp, _mm512_set1_ps(scale), k, q, ldq, st, ldst, pf);
    else
        qk_rows_blocks(1, n, m, dp, scale, k, (const char *)q, ldq * 2, NULL, st, ldst, pf);
}

/* cvt_i8_bf16 with the conversion instructions: 32 codes through int32
   and fp32 to bf16 (exact) at a time. */
static void cvt_i8_bf16_dot(const int8_t *src, int64_t lds, int rows, int64_t n, uint16_t *dst,
                            int64_t ldd)
{
    for (int r = 0; r < rows; r++) {
        const int8_t *s = src + r * lds;
        uint16_t *d = dst + r * ldd;
        for (int64_t j = 0; j < n; j += 32) {
            const int64_t left = n - j;
            const __mmask16 m0 = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
            const __mmask16 m1 = left >= 32 ? 0xffff : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
            const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m0, s + j)));
            const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m1, s + j + 16)));
            const __mmask32 mw = left >= 32 ? 0xffffffffu : (__mmask32)((1ull << left) - 1);
            _mm512_mask_storeu_epi16(d + j, mw, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
        }
    }
}

static void exp_rows_bf16(const float *st, int64_t ld, int m, int n, const float *mref,
                          const float *pmul, float *sum, uint16_t *p, int64_t ldp)
{
    for (int i = 0; i < m; i++) {
        const vf mv = vset1(mref[i]);
        vf acc = {0};
        for (int j = 0; j < n; j += 2 * VW) {
            const int l0 = n - j, l1 = n - j - VW;
            const __mmask16 m0 = l0 >= VW ? (__mmask16)0xffff : (__mmask16)((1u << l0) - 1);
            const __mmask16 m1 = l1 >= VW ? (__mmask16)0xffff
                                 : l1 > 0 ? (__mmask16)((1u << l1) - 1) : 0;
            const float *s = st + i * ld + j;
            const vf e0 = (vf)_mm512_maskz_mov_ps(m0, (__m512)vexp((vf)_mm512_maskz_loadu_ps(m0, s) - mv));
            const vf e1 = (vf)_mm512_maskz_mov_ps(m1, (__m512)vexp((vf)_mm512_maskz_loadu_ps(m1, s + VW) - mv));
            acc += e0 + e1;
            vf w0 = e0, w1 = e1;
            if (pmul) {
                w0 *= (vf)_mm512_maskz_loadu_ps(m0, pmul + j);
                w1 *= (vf)_mm512_maskz_loadu_ps(m1, pmul + j + VW);
            }
            _mm512_storeu_si512(p + i * ldp + j,
                                (__m512i)_mm512_cvtne2ps_pbh((__m512)w1, (__m512)w0));
        }
        sum[i] = _mm512_reduce_add_ps((__m512)acc);
    }
}

/* rows (<= 4) of acc x nw·32 columns from column c0 (nw 1 or 2; the
   ones past cols masked) over the pairs of n keys, v's rows from k0 (the
   pairs of each block's run at one stride); pf_pair of pf's lines asked
   for after each pair, and with `touch` the rest of each V row (bytes
   128 .. 2·dv) brought into L1, so the cache lines of the rows are first
   read in address order. */
static inline __attribute__((always_inline))
void pvd_block(const int rows, const int nw, int n, int cols, const uint32_t *pp, int64_t ldp,
               const qkv__rows *v, int k0, int c0, const float *alpha, float *acc, int64_t lda,
               __m512i ilo, __m512i ihi, int touch, qkv__pf *pf, int pf_pair)
{
    __mmask32 mw[2];
    __mmask16 mc[4];
    for (int w = 0; w < 2; w++) {
        const int left = cols - 32 * w;
        mw[w] = left >= 32 ? 0xffffffffu : left > 0 ? (__mmask32)((1ull << left) - 1) : 0;
    }
    for (int t = 0; t < 4; t++) {
        const int left = cols - 16 * t;
        mc[t] = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
    }
    vf c[4][4];
    for (int r = 0; r < rows; r++) {
        const vf s = vset1(alpha ? alpha[r] : 1.0f);
        for (int t = 0; t < 2 * nw; t++) {
            c[r][t] = (vf)_mm512_maskz_loadu_ps(mc[t], acc + r * lda + 16 * t);
            if (alpha)
                c[r][t] *= s;
        }
    }
    const int64_t ldv = v->ld / 2;
    for (int k = 0, nr; k < n; k += nr, pp += nr / 2) {
        /* run by run (each an even number of rows but the call's last) */
        const qkv__walk wk = qkv__walk_at(v, k0 + k);
        nr = n - k < wk.left ? n - k : wk.left;
        const uint16_t *vr = (const uint16_t *)wk.at + c0;
        for (int jj = 0; 2 * jj < nr; jj++) {
            const uint16_t *v0 = vr + 2 * jj * ldv, *v1 = v0 + ldv;
            const int odd = 2 * jj + 1 < nr;
            for (int x = 128; x < touch; x += 64) {
                __builtin_prefetch((const char *)v0 + x, 0, 3);
                if (odd)
                    __builtin_prefetch((const char *)v1 + x, 0, 3);
            }
            __m512i b[4];
            for (int w = 0; w < nw; w++) {
                const int whole = mw[w] == 0xffffffffu;   /* unmasked: as in qk_rows_blocks */
                const __m512i x = whole ? _mm512_loadu_si512(v0 + 32 * w)
                                        : _mm512_maskz_loadu_epi16(mw[w], v0 + 32 * w);
                const __m512i y = !odd ? _mm512_setzero_si512()
                                  : whole ? _mm512_loadu_si512(v1 + 32 * w)
                                          : _mm512_maskz_loadu_epi16(mw[w], v1 + 32 * w);
                b[2 * w] = _mm512_permutex2var_epi16(x, ilo, y);
                b[2 * w + 1] = _mm512_permutex2var_epi16(x, ihi, y);
            }
            for (int r = 0; r < rows; r++) {
                const __m512i a = _mm512_set1_epi32((int)pp[r * ldp + jj]);
                for (int t = 0; t < 2 * nw; t++)
                    c[r][t] = dot2(c[r][t], a, b[t]);
            }
            if (pf)
                qkv__pf_lines(pf, pf_pair);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < 2 * nw; t++)
            _mm512_mask_storeu_ps(acc + r * lda + 16 * t, mc[t], (__m512)c[r][t]);
}

/* One row group over keys [0, n) of a chunk: column blocks of 64 (then
   32); the first block touches the rest of the rows, and the first row
   group's blocks share asking for pf: all in the first block, beside the
   V rows' own first reads, they left one thread reading a bf16 cache at
   22 GB/s, spread over the blocks at 26. */
#define PVD_ROWS(rows)                                                          \
    do {                                                                        \
        int c0 = 0;                                                             \
        for (; c0 + 64 <= dv; c0 += 64)                                         \
            pvd_block(rows, 2, nk, 64, pp + i * ldpp + kc / 2, ldpp, v, kc, c0, \
                      al ? al + i : NULL, acc + i * lda + c0, lda, ilo, ihi,    \
                      c0 || i ? 0 : 2 * dv, i ? NULL : pf, pf_pair);            \
        for (; c0 < dv; c0 += 32)                                               \
            pvd_block(rows, 1, nk, dv - c0, pp + i * ldpp + kc / 2, ldpp, v,    \
                      kc, c0, al ? al + i : NULL, acc + i * lda + c0, lda, ilo, \
                      ihi, c0 || i ? 0 : 2 * dv, i ? NULL : pf, pf_pair);       \
    } while (0)

/* Keys per chunk of the few-row P·V kernels: the chunk's V rows stay in
   L1 while the row groups and column blocks pass over them, and the
   accumulators are loaded and stored once a chunk and block. 64 bf16
   rows of 128 (16 KiB); int8 codes 128 with one row group (the same
   bytes), 64 with more. A chunk must divide the decode's sub-tiles of
   128 keys for its tiles of 256 to give the same bits where the sums
   round at the chunk's end (int8: int32 sums converted to fp32). Zen 4,
   2 threads, bf16 1,1,4096 from the L3, against chunks of 32 that also
   ended at each block of a paged cache: 0.94-0.98x the time (a
   position-major pool of 16 positions a block 0.93-1.0x); from memory
   (1,1,32768) level. One chunk for the whole call (up to 256 keys) with
   one row group: 0.91-0.94x from the L3 but 1.02-1.05x from memory, the
   V lines the first column block brings in for the second gone from L1
   by then. */
static inline int pv_chunk(int m, int i8)
{
    return i8 && m <= 4 ? 128 : 64;
}

/* The few-row P·V kernels' loops: chunks of up to `chunk` keys, row
   groups of 4 (each ROWS(rows) its column blocks), pf_pair of pf's lines
   after each pair of keys in each column block of the first group. */
#define PV_DEC_LOOPS(ROWS, chunk)                                               \
    do {                                                                        \
        const uint32_t *pp = (const uint32_t *)p;                               \
        const int64_t ldpp = ldp / 2;                                           \
        const int blocks = dv / 64 + (dv % 64 + 31) / 32;                       \
        const int pf_pair = pf ? (pf->per4 + 2 * blocks - 1) / (2 * blocks) : 0; \
        for (int kc = 0, nk; kc < n; kc += nk) {                                \
            nk = n - kc < (chunk) ? n - kc : (chunk);                           \
            const float *al = kc ? NULL : alpha;                                \
            for (int i = 0; i < m; i += 4) {                                    \
                switch (m - i) {                                                \
                case 1: ROWS(1); break;                                         \
                case 2: ROWS(2); break;                                         \
                case 3: ROWS(3); break;                                         \
                default: ROWS(4); break;                                        \
                }                                                               \
            }                                                                   \
        }                                                                       \
    } while (0)

static void pv_bf16_dec(int m, int n, int dv, const uint16_t *p, int64_t ldp,
                        const qkv__rows *v, const float *alpha, float *acc, int64_t lda,
                        qkv__pf *pf)
{
    const __m512i ilo = _mm512_loadu_si512(pair_lo), ihi = _mm512_loadu_si512(pair_hi);
    PV_DEC_LOOPS(PVD_ROWS, pv_chunk(m, 0));
}
#endif /* __AVX512BF16__ */

/* ---- decode in fp32 FMAs (sets without a bf16 dot): bf16, int8, fp16 and
   fp32 rows widened in registers ------------------------------------------ */

#ifndef QKV_HAVE_BF16_DOT
/* A vector of VW words (2·VW bf16 values) splits into its even values
   (the low halves shifted up: fp32 exactly) and its odd ones (the high
   halves, masked): two fp32 vectors for an integer op each, no
   shuffles. Dot products take the queries split the same way; P·V keeps
   its accumulators split by even and odd columns while it runs. */
static inline vf bf16_even(vu w) { return (vf)(w << 16); }
static inline vf bf16_odd(vu w) { return (vf)(w & 0xffff0000u); }
static inline vu words(const void *p) { vu w; memcpy(&w, p, sizeof w); return w; }

typedef float vf4 __attribute__((vector_size(16)));

/* EVENS / ODDS: lanes of (a, b) de-interleaved; ZIP_LO / ZIP_HI: back;
   HE / HO: the even and odd lanes of each 128-bit block of a, then of
   b (the halves of a horizontal add that stays in its blocks). */
#if VW == 4
#define EVENS(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6)
#define ODDS(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7)
#define ZIP_LO(a, b) __builtin_shufflevector(a, b, 0, 4, 1, 5)
#define ZIP_HI(a, b) __builtin_shufflevector(a, b, 2, 6, 3, 7)
#define HE(a, b) EVENS(a, b)
#define HO(a, b) ODDS(a, b)
#define FOLD4(g) (g)
#elif VW == 8
#define EVENS(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14)
#define ODDS(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15)
#define ZIP_LO(a, b) __builtin_shufflevector(a, b, 0, 8, 1, 9, 2, 10, 3, 11)
#define ZIP_HI(a, b) __builtin_shufflevector(a, b, 4, 12, 5, 13, 6, 14, 7, 15)
#define HE(a, b) __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14)
#define HO(a, b) __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15)
#define FOLD4(g) (__builtin_shufflevector(g, g, 0, 1, 2, 3) + \
                  __builtin_shufflevector(g, g, 4, 5, 6, 7))
#elif VW == 16
#define EVENS(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, \
                                            24, 26, 28, 30)
#define ODDS(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, \
                                           25, 27, 29, 31)
#define ZIP_LO(a, b) __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, \
                                             6, 22, 7, 23)
#define ZIP_HI(a, b) __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, \
                                             29, 14, 30, 15, 31)
#define HE(a, b) __builtin_shufflevector(a, b, 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, \
                                         12, 14, 28, 30)
#define HO(a, b) __builtin_shufflevector(a, b, 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, \
                                         13, 15, 29, 31)
#define FOLD4(g) ((__builtin_shufflevector(g, g, 0, 1, 2, 3) +   \
                   __builtin_shufflevector(g, g, 4, 5, 6, 7)) + \
                  (__builtin_shufflevector(g, g, 8, 9, 10, 11) + \
                   __builtin_shufflevector(g, g, 12, 13, 14, 15)))
#endif

static inline vf hpair(vf a, vf b) { return HE(a, b) + HO(a, b); }

/* The lane sums of a, b, c, d: lanes paired within 128-bit blocks, then
   the blocks added (one fixed order for every sum). */
static inline vf4 reduce4(vf a, vf b, vf c, vf d)
{
    const vf g = hpair(hpair(a, b), hpair(c, d));
    return FOLD4(g);
}

/* Queries a scores call expands (bf16 split into even and odd values,
   step by step) to read as fp32 vectors: 4 rows of up to this many
   floats; longer rows are split as they are read. */
enum { QX_FLOATS = 1024 };

/* Row layouts of the few-row scores kernel: fp32 rows and queries (a
   step is 2·VW floats, read as two vectors); bf16 rows and queries, a
   step split into even and odd values, the queries split once per call
   into qx or as they are read; int8 rows (2·VW codes a step, widened in
   order) with bf16 queries, widened once per call into qx or as read;
   fp16 rows (widened in order) with fp32 queries. */
enum { ROWS_F32, ROWS_BF16_QX, ROWS_BF16, ROWS_I8_QX, ROWS_I8, ROWS_F16 };

static inline int rows_bf16(int lay) { return lay == ROWS_BF16_QX || lay == ROWS_BF16; }
static inline int rows_i8(int lay) { return lay == ROWS_I8_QX || lay == ROWS_I8; }
static inline int rows_qx(int lay) { return lay == ROWS_BF16_QX || lay == ROWS_I8_QX; }

/* VW bf16 values at p widened in order. */
static inline vf bf16_wide(const void *p) { return (vf)(widen(p) << 16); }

/* VW fp16 values at p widened in order (F16C where the set has it). */
static inline vf f16_wide(const void *p)
{
#if defined(__F16C__) && QKV_VW == 8
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    return f16_to_f32(widen(p));
#endif
}

/* The two vectors of a step of 2·VW values at p: fp32 values in order,
   bf16 ones split into even and odd, int8 codes in order; q 1: the
   step of a query row of that layout (bf16 for int8 rows). */
static inline __attribute__((always_inline))
void step_pair(const int lay, const int q, const void *p, vf *a, vf *b)
{
    if (lay == ROWS_F32 || (lay == ROWS_F16 && q)) {
        *a = vload(p);
        *b = vload((const float *)p + VW);
    } else if (lay == ROWS_F16) {
        *a = f16_wide(p);
        *b = f16_wide((const uint16_t *)p + VW);
    } else if (rows_bf16(lay)) {
        const vu w = words(p);
        *a = bf16_even(w);
        *b = bf16_odd(w);
    } else if (q) {
        *a = bf16_wide(p);
        *b = bf16_wide((const uint16_t *)p + VW);
    } else {
        *a = codes(p);
        *b = codes((const int8_t *)p + VW);
    }
}

/* Bytes per value of a layout's key rows (q 0) or query rows (q 1). */
static inline int lay_bytes(int lay, int q)
{
    if (lay == ROWS_F16)
        return q ? 4 : 2;
    return lay == ROWS_F32 ? 4 : rows_bf16(lay) || q ? 2 : 1;
}

/* Scores of 2 keys (k0, k1: their rows; t0, t1: a last step the rows end
   inside, zero past the end) by 4 queries (q: their rows, ldq bytes
   apart; qt: their last steps; qx: expanded ones): c[key][query] sums of
   lanes. Each step adds its first vectors' products, then its second's:
   eight accumulators, each two FMAs deep a step, so the FMA latency hides
   behind the sixteen FMAs; 8 accumulators, 4 key vectors and a mask fit
   AVX2's 16 registers with the queries read as memory operands. */
static inline __attribute__((always_inline))
void qk_quad(const int lay, int steps, int part, const char *k0, const char *k1,
             const char *t0, const char *t1, const float *qx, const char *q, int64_t ldq,
             const char *qt, vf c[2][4], qkv__pf *pf, qkv__pf_run *run, int spread)
{
    const int kstep = 2 * VW * lay_bytes(lay, 0), qstep = 2 * VW * lay_bytes(lay, 1);
    for (int r = 0; r < 4; r++)
        c[0][r] = c[1][r] = (vf){0};
    for (int s = 0; s < steps; s++) {
        const int tail = part && s == steps - 1;
        vf e0, o0, e1, o1, qe[4], qo[4];
        step_pair(lay, 0, tail ? t0 : k0 + s * kstep, &e0, &o0);
        step_pair(lay, 0, tail ? t1 : k1 + s * kstep, &e1, &o1);
        for (int r = 0; r < 4; r++) {
            if (rows_qx(lay)) {
                qe[r] = vload(qx + r * QX_FLOATS + 2 * s * VW);
                qo[r] = vload(qx + r * QX_FLOATS + (2 * s + 1) * VW);
            } else {
                step_pair(lay, 1, tail ? qt + r * qstep : q + r * ldq + s * qstep, &qe[r],
                          &qo[r]);
            }
        }
        for (int r = 0; r < 4; r++) {
            c[0][r] += e0 * qe[r];
            c[1][r] += e1 * qe[r];
        }
        for (int r = 0; r < 4; r++) {
            c[0][r] += o0 * qo[r];
            c[1][r] += o1 * qo[r];
        }
    }
    if (run)
        qkv__pf_ask(pf, run, spread);
}

/* The few-row scores in fp32 FMAs, rows of len values (lay): per key and
   query, the lanes accumulate step by step along the row (a step's first
   vector's products, then its second's), and reduce4 sums them. Keys go
   2 at a time (a last odd key paired with itself, so every key takes the
   same path); each key's sum depends on that key alone, so any split of
   the keys gives the same bits. q: 4 rows of each group readable, ldq
   bytes apart. */
static inline __attribute__((always_inline))
void qk_rows_fma(const int lay, int n, int m, int len, float scale, const qkv__rows *k,
                 const char *q, int64_t ldq, float *st, int64_t ldst, qkv__pf *pf)
{
    const int kes = lay_bytes(lay, 0), qes = lay_bytes(lay, 1);
    const int kstep = 2 * VW * kes, qstep = 2 * VW * qes;
    const int steps = (len + 2 * VW - 1) / (2 * VW), part = len % (2 * VW);
    float qx[rows_qx(lay) ? 4 * QX_FLOATS : 1] __attribute__((aligned(64)));
    float t0[2 * VW], t1[2 * VW], qt[4 * 2 * VW];   /* last steps, zero past len */
    memset(t0, 0, sizeof t0);
    memset(t1, 0, sizeof t1);
    memset(qt, 0, sizeof qt);
    /* pf's lines: half of per4 after each pair of keys (asked for after
       each step along the row, the bookkeeping cost AVX2 a tenth of the
       call's time) */
    const int spread = pf ? (pf->per4 + 1) / 2 : 0;
    qkv__pf_run run = qkv__pf_run_begin(pf);
    for (int i = 0; i < m; i += 4) {
        const int live = m - i < 4 ? m - i : 4;
        const char *qi = q + i * ldq;
        for (int r = 0; r < 4 && part; r++)
            memcpy((char *)qt + r * qstep, qi + r * ldq + (int64_t)(steps - 1) * qstep,
                   (size_t)(part * qes));
        if (rows_qx(lay))   /* the rows' vectors once */
            for (int r = 0; r < 4; r++)
                for (int s = 0; s < steps; s++) {
                    vf e, o;
                    step_pair(lay, 1, part && s == steps - 1 ? (const char *)qt + r * qstep
                                                             : qi + r * ldq + s * qstep, &e, &o);
                    vstore(qx + r * QX_FLOATS + 2 * s * VW, e);
                    vstore(qx + r * QX_FLOATS + (2 * s + 1) * VW, o);
                }
        qkv__walk kw = qkv__walk_at(k, 0);
        for (int j = 0; j < n; j += 2) {
            if (j)
                qkv__walk_next(&kw, k, j, 2);
            const char *k0 = kw.at, *k1 = j + 1 < n ? k0 + k->ld : k0;
            if (part) {
                memcpy(t0, k0 + (int64_t)(steps - 1) * kstep, (size_t)(part * kes));
                memcpy(t1, k1 + (int64_t)(steps - 1) * kstep, (size_t)(part * kes));
            }
            vf c[2][4];
            const vf4 sc = (vf4){ scale, scale, scale, scale };
            qk_quad(lay, steps, part, k0, k1, (const char *)t0, (const char *)t1, qx, qi, ldq,
                    (const char *)qt, c, pf, i ? NULL : &run, spread);
            const vf4 s01 = reduce4(c[0][0], c[1][0], c[0][1], c[1][1]) * sc;
            const vf4 s23 = reduce4(c[0][2], c[1][2], c[0][3], c[1][3]) * sc;
            const float s[2][4] = { { s01[0], s01[2], s23[0], s23[2] },
                                    { s01[1], s01[3], s23[1], s23[3] } };
            for (int e = 0; e < 2 && j + e < n; e++)
                for (int r = 0; r < live; r++)
                    st[(i + r) * ldst + j + e] = s[e][r];
        }
    }
    qkv__pf_run_end(pf, &run);
}

/* Whether a call's queries fit qx, 2·VW values a step. */
static inline int fits_qx(int len) { return 2 * VW * ((len + 2 * VW - 1) / (2 * VW)) <= QX_FLOATS; }

static void qk_bf16_dec_f32(int n, int m, int dp, float scale, const qkv__rows *k,
                            const uint16_t *q, int64_t ldq, float *st, int64_t ldst, qkv__pf *pf)
{
    if (fits_qx(2 * dp))
        qk_rows_fma(ROWS_BF16_QX, n, m, 2 * dp, scale, k, (const char *)q, 2 * ldq, st, ldst,
                    pf);
    else
        qk_rows_fma(ROWS_BF16, n, m, 2 * dp, scale, k, (const char *)q, 2 * ldq, st, ldst, pf);
}

static void qk_i8f_dec(int n, int m, int d, float scale, const qkv__rows *k, const uint16_t *q,
                       int64_t ldq, float *st, int64_t ldst, qkv__pf *pf)
{
    if (fits_qx(d))
        qk_rows_fma(ROWS_I8_QX, n, m, d, scale, k, (const char *)q, 2 * ldq, st, ldst, pf);
    else
        qk_rows_fma(ROWS_I8, n, m, d, scale, k, (const char *)q, 2 * ldq, st, ldst, pf);
}

/* exp_rows_bf16 with the vector extension: P rounded to bf16 as
   qkv_convert rounds, the sums of the unrounded P one vector at a time. */
static void exp_rows_bf16_f32(const float *st, int64_t ld, int m, int n, const float *mref,
                              const float *pmul, float *sum, uint16_t *p, int64_t ldp)
{
    enum { U = 32 / VW };   /* vectors through vexp_n at once: 32 values */
    const int n32 = (n + 31) / 32 * 32;
    for (int i = 0; i < m; i++) {
        const float *s = st + i * ld;
        uint16_t *pi = p + i * ldp;
        const vf mv = vset1(mref[i]);
        vf acc = {0};
        for (int j = 0; j < n32; j += U * VW) {
            vf x[U], w[U];
            if (j + U * VW <= n) {
                for (int u = 0; u < U; u++)
                    x[u] = vload(s + j + u * VW) - mv;
                vexp_n(U, x);
                for (int u = 0; u < U; u++)
                    w[u] = pmul ? x[u] * vload(pmul + j + u * VW) : x[u];
            } else {   /* the tail, 0 past n */
                float t[U * VW], v[U * VW];
                for (int l = 0; l < U * VW; l++) {
                    t[l] = j + l < n ? s[j + l] : -INFINITY;
                    v[l] = j + l < n && pmul ? pmul[j + l] : 1.0f;
                }
                for (int u = 0; u < U; u++)
                    x[u] = vload(t + u * VW) - mv;
                vexp_n(U, x);
                for (int u = 0; u < U; u++)
                    w[u] = x[u] * vload(v + u * VW);
            }
            for (int u = 0; u < U; u++) {
                acc += x[u];
                const vh_out h = __builtin_convertvector(f32_to_bf16_bits(w[u]), vh_out);
                memcpy(pi + j + u * VW, &h, sizeof h);
            }
        }
        sum[i] = hsum(acc);
    }
}

/* Keys per chunk of P·V: their P as fp32 and their V row pointers on the
   stack while the column passes go over them. */
enum { PVF_CHUNK = 64 };

/* rows (<= 4) of acc by one step of 2·VW columns at column x of the V
   rows vr (bf16 rows: acc split into even columns, then odd, VW each;
   int8 rows: in order), over n keys with P pr[r·PVF_CHUNK + j]. */
static inline __attribute__((always_inline))
void pvf_block(const int lay, const int rows, int n, const float *pr, const char *const *vr,
               int x, float *acc, int64_t lda, qkv__pf *pf, qkv__pf_run *run, int ask)
{
    vf c[4][2];
    for (int r = 0; r < rows; r++) {
        c[r][0] = vload(acc + r * lda);
        c[r][1] = vload(acc + r * lda + VW);
    }
    for (int j = 0; j < n; j++) {
        vf e, o;
        step_pair(lay, 0, vr[j] + x * lay_bytes(lay, 0), &e, &o);
        for (int r = 0; r < rows; r++) {
            const vf a = vset1(pr[r * PVF_CHUNK + j]);
            c[r][0] += a * e;
            c[r][1] += a * o;
        }
        if (ask && j % 4 == 3 && run->end)
            qkv__pf_run_each(pf, run, ask);
    }
    for (int r = 0; r < rows; r++) {
        vstore(acc + r * lda, c[r][0]);
        vstore(acc + r * lda + VW, c[r][1]);
    }
}

/* Value c of a V row of the layout. */
static inline float v_at(const int lay, const char *row, int c)
{
    if (rows_i8(lay))
        return (float)((const int8_t *)row)[c];
    if (lay == ROWS_F32)
        return ((const float *)row)[c];
    if (lay == ROWS_F16) {
        float f[VW];
        uint16_t h[VW] = { ((const uint16_t *)row)[c] };
        vstore(f, f16_to_f32(widen(h)));
        return f[0];
    }
    const uint32_t u = (uint32_t)((const uint16_t *)row)[c] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* P·V in fp32 FMAs (the bf16 P of exp_rows_bf16 with bf16 or int8 V
   rows; exp_rows' fp32 P with fp16 or fp32 rows): each accumulator adds
   its keys' products one key at a time, so any split of the keys gives
   the same bits. With bf16 rows acc's whole steps of 2·VW columns are
   split into even and odd columns for the call; acc is multiplied by
   alpha first; the last dv % (2·VW) columns go one by one. */
static inline __attribute__((always_inline))
void pv_rows_fma(const int lay, int m, int n, int dv, const void *p, int64_t ldp,
                 const qkv__rows *v, const float *alpha, float *acc, int64_t lda, qkv__pf *pf)
{
    const int steps = dv / (2 * VW), cfull = steps * 2 * VW;
    for (int i = 0; i < m; i++) {
        const vf s = vset1(alpha ? alpha[i] : 1.0f);
        for (int t = 0; t < steps; t++) {
            float *a = acc + i * lda + 2 * VW * t;
            const vf lo = vload(a), hi = vload(a + VW);
            vstore(a, (rows_bf16(lay) ? EVENS(lo, hi) : lo) * s);
            vstore(a + VW, (rows_bf16(lay) ? ODDS(lo, hi) : hi) * s);
        }
        for (int c = cfull; c < dv && alpha; c++)
            acc[i * lda + c] *= alpha[i];
    }
    /* pf's lines: per4 per 4 keys, shared by the first row group's steps */
    const int ask = pf && steps ? (pf->per4 + steps - 1) / steps : 0;
    qkv__pf_run run = qkv__pf_run_begin(pf);
    float pr[16 * PVF_CHUNK];
    const char *vr[PVF_CHUNK];
    for (int kc = 0; kc < n; kc += PVF_CHUNK) {
        const int nk = n - kc < PVF_CHUNK ? n - kc : PVF_CHUNK;
        for (int j = 0; j < nk; j++)
            vr[j] = qkv__row(v, kc + j);
        for (int i0 = 0; i0 < m; i0 += 16) {
            const int mi = m - i0 < 16 ? m - i0 : 16;
            for (int r = 0; r < mi; r++)
                if (lay == ROWS_F16 || lay == ROWS_F32)   /* P in fp32 (exp_rows) */
                    memcpy(pr + r * PVF_CHUNK, (const float *)p + (i0 + r) * ldp + kc,
                           (size_t)nk * sizeof(float));
                else
                    cvt_bf16((const uint16_t *)p + (i0 + r) * ldp + kc, pr + r * PVF_CHUNK, nk);
            for (int i = 0; i < mi; i += 4) {
                float *ai = acc + (i0 + i) * lda;
                const float *pi = pr + i * PVF_CHUNK;
                qkv__pf *pfi = i0 + i ? NULL : pf;
                const int as = i0 + i ? 0 : ask;
                for (int t = 0; t < steps; t++) {
                    float *at = ai + 2 * VW * t;
                    switch (mi - i) {
                    case 1: pvf_block(lay, 1, nk, pi, vr, 2 * VW * t, at, lda, pfi, &run, as); break;
                    case 2: pvf_block(lay, 2, nk, pi, vr, 2 * VW * t, at, lda, pfi, &run, as); break;
                    case 3: pvf_block(lay, 3, nk, pi, vr, 2 * VW * t, at, lda, pfi, &run, as); break;
                    default: pvf_block(lay, 4, nk, pi, vr, 2 * VW * t, at, lda, pfi, &run, as); break;
                    }
                }
                for (int r = 0; r < 4 && i + r < mi; r++)
                    for (int c = cfull; c < dv; c++) {
                        float y = ai[r * lda + c];
                        for (int j = 0; j < nk; j++)
                            y = fmadd1(pi[r * PVF_CHUNK + j], v_at(lay, vr[j], c), y);
                        ai[r * lda + c] = y;
                    }
            }
        }
    }
    qkv__pf_run_end(pf, &run);
    if (pf && !steps)
        qkv__pf_lines(pf, pf->per4 * ((n + 3) / 4));
    for (int i = 0; i < m && rows_bf16(lay); i++)
        for (int t = 0; t < steps; t++) {
            float *a = acc + i * lda + 2 * VW * t;
            const vf e = vload(a), o = vload(a + VW);
            vstore(a, ZIP_LO(e, o));
            vstore(a + VW, ZIP_HI(e, o));
        }
}

static void pv_bf16_dec_f32(int m, int n, int dv, const uint16_t *p, int64_t ldp,
                            const qkv__rows *v, const float *alpha, float *acc, int64_t lda,
                            qkv__pf *pf)
{
    pv_rows_fma(ROWS_BF16, m, n, dv, p, ldp, v, alpha, acc, lda, pf);
}

static void pv_i8f_dec(int m, int n, int dv, const uint16_t *p, int64_t ldp, const qkv__rows *v,
                       const float *alpha, float *acc, int64_t lda, qkv__pf *pf)
{
    pv_rows_fma(ROWS_I8, m, n, dv, p, ldp, v, alpha, acc, lda, pf);
}

#ifndef QKV_HAVE_DEC_F32
static void qk_dec_fma(int n, int m, int d, float scale, const qkv__rows *k, const float *q,
                       int64_t ldq, float *st, int64_t ldst, qkv__pf *pf)
{
    qk_rows_fma(ROWS_F32, n, m, d, scale, k, (const char *)q, 4 * ldq, st, ldst, pf);
}

static void qk_f16_dec(int n, int m, int d, float scale, const qkv__rows *k, const float *q,
                       int64_t ldq, float *st, int64_t ldst, qkv__pf *pf)
{
    qk_rows_fma(ROWS_F16, n, m, d, scale, k, (const char *)q, 4 * ldq, st, ldst, pf);
}

static void pv_f16_dec(int m, int n, int dv, const float *p, int64_t ldp, const qkv__rows *v,
                       const float *alpha, float *acc, int64_t lda, qkv__pf *pf)
{
    pv_rows_fma(ROWS_F16, m, n, dv, p, ldp, v, alpha, acc, lda, pf);
}

static void pv_f32_dec(int m, int n, int dv, const float *p, int64_t ldp, const qkv__rows *v,
                       const float *alpha, float *acc, int64_t lda, qkv__pf *pf)
{
    pv_rows_fma(ROWS_F32, m, n, dv, p, ldp, v, alpha, acc, lda, pf);
}
#endif
#endif /* !QKV_HAVE_BF16_DOT */

/* ---- decode from int8 codes: int16 products in int32 (vpdpwssd) ----------- */

#if defined(__AVX512VNNI__) && defined(QKV_HAVE_DEC_F32) && defined(QKV_HAVE_BF16_DOT)
#define QKV_HAVE_I8_DOT 1

static void qk_i8_dec(int n, int m, int d, float scale, const qkv__rows *k, const int16_t *q,
                      int64_t ldq, const float *qsc, float *st, int64_t ldst, qkv__pf *pf)
{
    /* 14-16 rows: lanes along the queries, each block's 8 K rows widened
       once (qk_rows_blocks widens each row for every group of 4 queries);
       the int32 sums are exact, so the scores keep qk_rows_blocks' bits */
    if (m >= LANES_MINROWS && m <= 16 && d % 32 == 0 && d <= 2 * LANES_MAXDP) {
        float s[16] = { 0 };
        for (int r = 0; r < m; r++)
            s[r] = scale * qsc[r];
        qk_lanes_rows(2, n, m, d / 2, _mm512_loadu_ps(s), k, (const uint16_t *)q, ldq, st, ldst,
                      pf);
    } else {
        qk_rows_blocks(2, n, m, d / 2, scale, k, (const char *)q, ldq * 2, qsc, st, ldst, pf);
    }
}

static void exp_rows_i16(const float *st, int64_t ld, int m, int n, const float *mref,
                         const float *pmul, float inv, float *sum, int16_t *p, int64_t ldp)
{
    const __m512 iv = _mm512_set1_ps(inv);
    for (int i = 0; i < m; i++) {
        const vf mv = vset1(mref[i]);
        vf acc = {0};
        for (int j = 0; j < n; j += VW) {
            const int left = n - j;
            const __mmask16 mk = left >= VW ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            const vf e = (vf)_mm512_maskz_mov_ps(
                mk, (__m512)vexp((vf)_mm512_maskz_loadu_ps(mk, st + i * ld + j) - mv));
            acc += e;
            const __m512 w = _mm512_mul_ps(_mm512_mul_ps((__m512)e, _mm512_maskz_loadu_ps(mk, pmul + j)), iv);
            _mm256_storeu_si256((__m256i *)(p + i * ldp + j),
                                _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(w)));
        }
        for (int j = (n + VW - 1) / VW * VW; j < (n + 31) / 32 * 32; j += VW)
            _mm256_storeu_si256((__m256i *)(p + i * ldp + j), _mm256_setzero_si256());
        sum[i] = _mm512_reduce_add_ps((__m512)acc);
    }
}

/* rows (<= 4) of acc x 32·nw columns (nw 1 or 2) over the pairs of n
   keys: V codes of two keys widened to int16 and interleaved lane by lane
   (vpunpcklwd / vpunpckhwd: the low pairs are columns 0-3, 8-11, 16-19,
   24-27 of each 32, the high ones the rest), int32 sums, added to acc as
   acc·alpha + pscale·sum; with touch the rest of each row is brought
   into L1, and pf_pair of pf's lines are asked for after each pair. */
static const int32_t i8_cols_0[16] = { 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23 };
static const int32_t i8_cols_1[16] = { 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31 };

static inline __attribute__((always_inline))
void pv8_block(const int rows, const int nw, int n, const uint32_t *pp, int64_t ldp,
               const qkv__rows *v, int k0, int c0, const float *alpha, float pscale,
               float *acc, int64_t lda, int touch, qkv__pf *pf, int pf_pair)
{
    __m512i c[4][4];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < 2 * nw; t++)
            c[r][t] = _mm512_setzero_si512();
    const int64_t ldv = v->ld;
    for (int k = 0, nr; k < n; k += nr, pp += nr / 2) {
        /* run by run, as pvd_block (each an even number of rows but the
           call's last) */
        const qkv__walk wk = qkv__walk_at(v, k0 + k);
        nr = n - k < wk.left ? n - k : wk.left;
        const int8_t *vr = (const int8_t *)wk.at + c0;
        for (int jj = 0; 2 * jj < nr; jj++) {
            const int odd = 2 * jj + 1 < nr;
            const int8_t *v0 = vr + 2 * jj * ldv, *v1 = odd ? v0 + ldv : v0;
            for (int x = 64; x < touch; x += 64) {
                __builtin_prefetch(v0 + x, 0, 3);
                if (odd)
                    __builtin_prefetch(v1 + x, 0, 3);
            }
            __m512i b[4];
            for (int w = 0; w < nw; w++) {
                const __m512i x =
                    _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v0 + 32 * w)));
                const __m512i y = odd ? _mm512_cvtepi8_epi16(
                                            _mm256_loadu_si256((const __m256i *)(v1 + 32 * w)))
                                      : _mm512_setzero_si512();
                b[2 * w] = _mm512_unpacklo_epi16(x, y);
                b[2 * w + 1] = _mm512_unpackhi_epi16(x, y);
            }
            for (int r = 0; r < rows; r++) {
                const __m512i a = _mm512_set1_epi32((int)pp[r * ldp + jj]);
                for (int t = 0; t < 2 * nw; t++)
                    c[r][t] = _mm512_dpwssd_epi32(c[r][t], a, b[t]);
            }
            if (pf)
                qkv__pf_lines(pf, pf_pair);
        }
    }
    const __m512i f0 = _mm512_loadu_si512(i8_cols_0), f1 = _mm512_loadu_si512(i8_cols_1);
    const __m512 ps = _mm512_set1_ps(pscale);
    for (int r = 0; r < rows; r++) {
        const __m512 al = _mm512_set1_ps(alpha ? alpha[r] : 1.0f);
        for (int w = 0; w < nw; w++) {
            const __m512 lo = _mm512_cvtepi32_ps(c[r][2 * w]), hi = _mm512_cvtepi32_ps(c[r][2 * w + 1]);
            float *a0 = acc + r * lda + 32 * w;
            _mm512_storeu_ps(a0, _mm512_fmadd_ps(_mm512_loadu_ps(a0), al,
                                                 _mm512_mul_ps(_mm512_permutex2var_ps(lo, f0, hi), ps)));
            _mm512_storeu_ps(a0 + 16, _mm512_fmadd_ps(_mm512_loadu_ps(a0 + 16), al,
                                                      _mm512_mul_ps(_mm512_permutex2var_ps(lo, f1, hi), ps)));
        }
    }
}

#define PV8_ROWS(rows)                                                          \
    do {                                                                        \
        int c0 = 0;                                                             \
        for (; c0 + 64 <= dv; c0 += 64)                                         \
            pv8_block(rows, 2, nk, pp + i * ldpp + kc / 2, ldpp, v, kc, c0,     \
                      al ? al + i : NULL, pscale, acc + i * lda + c0, lda,      \
                      c0 || i ? 0 : dv, i ? NULL : pf, pf_pair);                \
        for (; c0 < dv; c0 += 32)                                               \
            pv8_block(rows, 1, nk, pp + i * ldpp + kc / 2, ldpp, v, kc, c0,     \
                      al ? al + i : NULL, pscale, acc + i * lda + c0, lda,      \
                      c0 || i ? 0 : dv, i ? NULL : pf, pf_pair);                \
    } while (0)

static void pv_i8_dec(int m, int n, int dv, const int16_t *p, int64_t ldp, const qkv__rows *v,
                      const float *alpha, float pscale, float *acc, int64_t lda, qkv__pf *pf)
{
    PV_DEC_LOOPS(PV8_ROWS, pv_chunk(m, 1));
}
#endif /* __AVX512VNNI__ */

/* qkv__mix32 (kernels.h) lane by lane. */
static inline vu vmix32(vu x)
{
    QKV__MIX32(x);
    return x;
}

static void drop_cols(float *st, int64_t ld, int n, int m, const uint32_t *row,
                      const uint32_t *col, uint32_t thresh, float scale)
{
    const vu th = thresh - (vu){0};
    const vi sc = (vi)vset1(scale);
    for (int j = 0; j < n; j++) {
        float *p = st + j * ld;
        const vu c = col[j] - (vu){0};
        int i = 0;
        for (; i + VW <= m; i += VW) {
            vu r;
            memcpy(&r, row + i, sizeof r);
            const vi keep = (vi)(vmix32(r + c) >= th);
            vstore(p + i, vload(p + i) * (vf)(sc & keep));
        }
        for (; i < m; i++)
            p[i] *= qkv__mix32(row[i] + col[j]) >= thresh ? scale : 0.0f;
    }
}

/* dst[c] = a[c] | b[c] << 16, c < n: two bf16 rows interleaved into pairs
   (b NULL: zeros). */
#if QKV_VW == 16 && defined(__AVX512BW__)
/* 32 columns at a time: two word permutes interleave a's and b's into
   16 pairs each (widening both and merging took 2.5x the operations). */
static void pack_pairs(const uint16_t *a, const uint16_t *b, int64_t n, uint32_t *dst)
{
    if (!b) {
        int64_t c = 0;
        for (; c + 16 <= n; c += 16)
            _mm512_storeu_si512(dst + c, _mm512_cvtepu16_epi32(
                                             _mm256_loadu_si256((const __m256i *)(a + c))));
        for (; c < n; c++)
            dst[c] = a[c];
        return;
    }
    const __m512i ilo = _mm512_loadu_si512(pair_lo), ihi = _mm512_loadu_si512(pair_hi);
    for (int64_t c = 0; c < n; c += 32) {
        const int64_t left = n - c;
        if (left >= 32) {
            const __m512i x = _mm512_loadu_si512(a + c), y = _mm512_loadu_si512(b + c);
            _mm512_storeu_si512(dst + c, _mm512_permutex2var_epi16(x, ilo, y));
            _mm512_storeu_si512(dst + c + 16, _mm512_permutex2var_epi16(x, ihi, y));
        } else {
            const __mmask32 mw = (__mmask32)((1u << left) - 1);
            const __m512i x = _mm512_maskz_loadu_epi16(mw, a + c);
            const __m512i y = _mm512_maskz_loadu_epi16(mw, b + c);
            const __mmask16 m0 = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            const __mmask16 m1 = left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
            _mm512_mask_storeu_epi32(dst + c, m0, _mm512_permutex2var_epi16(x, ilo, y));
            _mm512_mask_storeu_epi32(dst + c + 16, m1, _mm512_permutex2var_epi16(x, ihi, y));
        }
    }
}
#else
static void pack_pairs(const uint16_t *a, const uint16_t *b, int64_t n, uint32_t *dst)
{
    if (!b) {
        for (int64_t c = 0; c < n; c++)
            dst[c] = a[c];
        return;
    }
    int64_t c = 0;
    for (; c + VW <= n; c += VW)
        vstore((float *)(dst + c), (vf)(widen(a + c) | (widen(b + c) << 16)));
    for (; c < n; c++)
        dst[c] = (uint32_t)a[c] | (uint32_t)b[c] << 16;
}
#endif

/* ---- machine ceiling ------------------------------------------------------ */

/* Twelve independent accumulators hide the FMA latency; the compiler
   contracts a·b + c into one instruction where the target has FMA. */
static double fma_probe(int64_t iters)
{
    vf a[12];
    for (int i = 0; i < 12; i++)
        a[i] = vset1(1.0f + (float)i * 1e-3f);
    const vf b = vset1(0.999999f), c = vset1(1e-6f);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 12; i++)
            a[i] = a[i] * b + c;
    volatile float sink = 0.0f;
    for (int i = 0; i < 12; i++)
        sink += a[i][0];
    (void)sink;
    return (double)iters * 12 * VW * 2;
}

void QKV_KERNEL_TABLE(qkv__kernels *t)
{
    t->name = QKV_KERNEL_NAME;
    t->qk = qk;
    t->qk_qt_rows = VW / 2 > 1 ? VW / 2 : 1;
    t->pv = pv;
    t->col_max = col_max;
    t->exp_cols = exp_cols;
    t->cvt_f16 = cvt_f16;
    t->cvt_bf16 = cvt_bf16;
    t->cvt_i8 = cvt_i8;
    t->cvt_i8_bf16 = cvt_i8_bf16;
#ifdef QKV_HAVE_DEC_F32
    t->qk_dec = qk_f32_dec;
    /* widening in the kernels costs each row group of 4 its conversions,
       on the FMAs' ports: measured on the Xeon (1x32768, 32/8 heads),
       0.71x the time of widened tiles at 4 rows, 0.89x at 8, 1.12x at 16 */
    t->f16_rows_max = 8;
#else
    t->qk_dec = qk_dec_fma;
#endif
    t->qk_f16_dec = qk_f16_dec;
    t->pv_f16_dec = pv_f16_dec;
    t->pv_f32_dec = pv_f32_dec;
    t->row_max = row_max;
    t->exp_rows = exp_rows;
    t->drop_cols = drop_cols;
    t->fma_probe = fma_probe;
    t->pack_pairs = pack_pairs;
    t->store_f16 = store_f16;
    t->store_bf16 = store_bf16;
#ifdef QKV_HAVE_BF16_DOT
    t->qk_bf16 = qk_bf16;
    t->qk_bf16_rows = qk_bf16_rows;
    t->exp_pack_bf16 = exp_pack_bf16;
    t->pv_bf16 = pv_bf16;
    t->mm_bf16 = mm_bf16;
    t->qk_bf16_dec = qk_bf16_dec;
    t->cvt_i8_bf16 = cvt_i8_bf16_dot;
    t->exp_rows_bf16 = exp_rows_bf16;
    t->pv_bf16_dec = pv_bf16_dec;
    t->qk_i8f_dec = NULL;
    t->pv_i8f_dec = NULL;
#else
    t->qk_bf16 = NULL;
    t->qk_bf16_rows = NULL;
    t->exp_pack_bf16 = NULL;
    t->pv_bf16 = NULL;
    t->mm_bf16 = NULL;
    t->qk_bf16_dec = qk_bf16_dec_f32;
    t->exp_rows_bf16 = exp_rows_bf16_f32;
    t->pv_bf16_dec = pv_bf16_dec_f32;
    t->qk_i8f_dec = qk_i8f_dec;
    t->pv_i8f_dec = pv_i8f_dec;
#endif
#ifdef QKV_HAVE_I8_DOT
    t->qk_i8_dec = qk_i8_dec;
    t->exp_rows_i16 = exp_rows_i16;
    t->pv_i8_dec = pv_i8_dec;
#else
    t->qk_i8_dec = NULL;
    t->exp_rows_i16 = NULL;
    t->pv_i8_dec = NULL;
#endif
}
