/*
 * kernels_portable.c — the micro-kernels written once in C with the GCC/Clang
 * vector extension, and compiled once per instruction set with that set's
 * -m flags (CMake builds this file three times: generic x86-64, AVX2+FMA,
 * AVX-512). QKV_VW is the vector width in floats for the target and
 * QKV_KERNEL_TABLE the name of the one exported function; everything else
 * is static, so each copy is self-contained and steps cleanly in gdb.
 *
 * Not here: intrinsics, AMX, dtype handling — hand-tuned kernels live in
 * their own kernels_<isa>.c files.
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

typedef float   vf __attribute__((vector_size(QKV_VW * 4)));
typedef int32_t vi __attribute__((vector_size(QKV_VW * 4)));

#define VW QKV_VW
#define MR 4            /* rows of the register block */
#define NR (2 * VW)     /* columns of the register block: two vectors */

static inline vf vload(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; }
static inline void vstore(float *p, vf x) { memcpy(p, &x, sizeof x); }
static inline vf vset1(float a) { return (vf){0} + a; }

/* ---- S = scale · Q·Kᵀ ---------------------------------------------------- */

/* One MR x NR block: 8 accumulators live in registers across the d loop;
   each step loads two vectors of the K panel and broadcasts MR q values. */
static void qk_block(int d, float scale, const float *q, int64_t ldq,
                     const float *kt, int64_t ldk, float *s, int64_t lds)
{
    vf c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0};
    vf c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
    for (int x = 0; x < d; x++) {
        const float *b = kt + x * ldk;
        vf b0 = vload(b), b1 = vload(b + VW);
        vf a0 = vset1(q[x]), a1 = vset1(q[ldq + x]);
        vf a2 = vset1(q[2 * ldq + x]), a3 = vset1(q[3 * ldq + x]);
        c00 += a0 * b0; c01 += a0 * b1;
        c10 += a1 * b0; c11 += a1 * b1;
        c20 += a2 * b0; c21 += a2 * b1;
        c30 += a3 * b0; c31 += a3 * b1;
    }
    vf sc = vset1(scale);
    vstore(s, c00 * sc);           vstore(s + VW, c01 * sc);
    vstore(s + lds, c10 * sc);     vstore(s + lds + VW, c11 * sc);
    vstore(s + 2 * lds, c20 * sc); vstore(s + 2 * lds + VW, c21 * sc);
    vstore(s + 3 * lds, c30 * sc); vstore(s + 3 * lds + VW, c31 * sc);
}

/* One row, NR columns. */
static void qk_row(int d, float scale, const float *q, const float *kt,
                   int64_t ldk, float *s)
{
    vf c0 = {0}, c1 = {0};
    for (int x = 0; x < d; x++) {
        vf a = vset1(q[x]);
        c0 += a * vload(kt + x * ldk);
        c1 += a * vload(kt + x * ldk + VW);
    }
    vstore(s, c0 * vset1(scale));
    vstore(s + VW, c1 * vset1(scale));
}

/* Leftover columns (< NR), one element at a time. */
static void qk_edge(int m, int n, int d, float scale, const float *q,
                    int64_t ldq, const float *kt, int64_t ldk, float *s,
                    int64_t lds)
{
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            float acc = 0.0f;
            for (int x = 0; x < d; x++)
                acc += q[i * ldq + x] * kt[x * ldk + j];
            s[i * lds + j] = acc * scale;
        }
}

static void qk(int m, int n, int d, float scale, const float *q, int64_t ldq,
               const float *kt, int64_t ldk, float *s, int64_t lds)
{
    int nfull = n - n % NR;
    int i = 0;
    for (; i + MR <= m; i += MR)
        for (int j = 0; j < nfull; j += NR)
            qk_block(d, scale, q + i * ldq, ldq, kt + j, ldk, s + i * lds + j, lds);
    for (; i < m; i++)
        for (int j = 0; j < nfull; j += NR)
            qk_row(d, scale, q + i * ldq, kt + j, ldk, s + i * lds + j);
    if (nfull < n)
        qk_edge(m, n - nfull, d, scale, q, ldq, kt + nfull, ldk, s + nfull, lds);
}

/* ---- acc = alpha·acc + P·V ----------------------------------------------- */

static void pv_block(int n, const float *p, int64_t ldp, const float *v,
                     int64_t ldv, const float *alpha, float *acc, int64_t lda)
{
    vf s0 = vset1(alpha[0]), s1 = vset1(alpha[1]);
    vf s2 = vset1(alpha[2]), s3 = vset1(alpha[3]);
    vf c00 = vload(acc) * s0,           c01 = vload(acc + VW) * s0;
    vf c10 = vload(acc + lda) * s1,     c11 = vload(acc + lda + VW) * s1;
    vf c20 = vload(acc + 2 * lda) * s2, c21 = vload(acc + 2 * lda + VW) * s2;
    vf c30 = vload(acc + 3 * lda) * s3, c31 = vload(acc + 3 * lda + VW) * s3;
    for (int j = 0; j < n; j++) {
        vf b0 = vload(v + j * ldv), b1 = vload(v + j * ldv + VW);
        vf a0 = vset1(p[j]), a1 = vset1(p[ldp + j]);
        vf a2 = vset1(p[2 * ldp + j]), a3 = vset1(p[3 * ldp + j]);
        c00 += a0 * b0; c01 += a0 * b1;
        c10 += a1 * b0; c11 += a1 * b1;
        c20 += a2 * b0; c21 += a2 * b1;
        c30 += a3 * b0; c31 += a3 * b1;
    }
    vstore(acc, c00);           vstore(acc + VW, c01);
    vstore(acc + lda, c10);     vstore(acc + lda + VW, c11);
    vstore(acc + 2 * lda, c20); vstore(acc + 2 * lda + VW, c21);
    vstore(acc + 3 * lda, c30); vstore(acc + 3 * lda + VW, c31);
}

static void pv_row(int n, const float *p, const float *v, int64_t ldv,
                   float alpha, float *acc)
{
    vf c0 = vload(acc) * vset1(alpha), c1 = vload(acc + VW) * vset1(alpha);
    for (int j = 0; j < n; j++) {
        vf a = vset1(p[j]);
        c0 += a * vload(v + j * ldv);
        c1 += a * vload(v + j * ldv + VW);
    }
    vstore(acc, c0);
    vstore(acc + VW, c1);
}

static void pv_edge(int m, int n, int dv, const float *p, int64_t ldp,
                    const float *v, int64_t ldv, const float *alpha,
                    float *acc, int64_t lda)
{
    for (int i = 0; i < m; i++)
        for (int c = 0; c < dv; c++) {
            float a = acc[i * lda + c] * alpha[i];
            for (int j = 0; j < n; j++)
                a += p[i * ldp + j] * v[j * ldv + c];
            acc[i * lda + c] = a;
        }
}

static void pv(int m, int n, int dv, const float *p, int64_t ldp,
               const float *v, int64_t ldv, const float *alpha, float *acc,
               int64_t lda)
{
    int cfull = dv - dv % NR;
    int i = 0;
    for (; i + MR <= m; i += MR)
        for (int c = 0; c < cfull; c += NR)
            pv_block(n, p + i * ldp, ldp, v + c, ldv, alpha + i, acc + i * lda + c, lda);
    for (; i < m; i++)
        for (int c = 0; c < cfull; c += NR)
            pv_row(n, p + i * ldp, v + c, ldv, alpha[i], acc + i * lda + c);
    if (cfull < dv)
        pv_edge(m, n, dv - cfull, p, ldp, v + cfull, ldv, alpha, acc + cfull, lda);
}

/* ---- softmax pieces ------------------------------------------------------ */

static float row_max(const float *s, int n)
{
    vf mv = vset1(-INFINITY);
    int j = 0;
    for (; j + VW <= n; j += VW) {
        vf x = vload(s + j);
        vi gt = x > mv;                      /* lanes where x wins */
        mv = (vf)(((vi)x & gt) | ((vi)mv & ~gt));
    }
    float m = -INFINITY;
    for (int l = 0; l < VW; l++)
        m = mv[l] > m ? mv[l] : m;
    for (; j < n; j++)
        m = s[j] > m ? s[j] : m;
    return m;
}

/* exp(x) for x <= 0 (ok up to 88): x = n·ln2 + f, |f| <= ln2/2, 2^n built in
   the exponent bits, exp(f) by Cephes' degree-6 polynomial (about 1 ulp).
   Below -87.3 the result is 0, as exp(-inf) must be. */
static inline vf vexp(vf x)
{
    const vf lo = vset1(-87.33654f);
    vi keep = x >= lo;
    x = (vf)(((vi)x & keep) | ((vi)lo & ~keep));
    /* round x·log2e to nearest by adding 1.5·2^23 (exact in fp32) */
    const vf magic = vset1(12582912.0f);
    vf t = x * vset1(1.44269504088896341f) + magic;
    vf nf = t - magic;
    vi n = (vi)t - (vi)magic;
    vf f = x - nf * vset1(0.693359375f) - nf * vset1(-2.12194440e-4f);
    vf p = vset1(1.9875691500e-4f);
    p = p * f + vset1(1.3981999507e-3f);
    p = p * f + vset1(8.3334519073e-3f);
    p = p * f + vset1(4.1665795894e-2f);
    p = p * f + vset1(1.6666665459e-1f);
    p = p * f + vset1(5.0000001201e-1f);
    p = p * f * f + f + vset1(1.0f);
    vi scale = (n + 127) << 23;
    return (vf)((vi)(p * (vf)scale) & keep);
}

static float exp_sum(float *s, int n, float m)
{
    vf acc = {0};
    vf mv = vset1(m);
    int j = 0;
    for (; j + VW <= n; j += VW) {
        vf e = vexp(vload(s + j) - mv);
        vstore(s + j, e);
        acc += e;
    }
    if (j < n) {                     /* pad the tail with -inf lanes */
        float tail[VW];
        for (int l = 0; l < VW; l++)
            tail[l] = j + l < n ? s[j + l] : -INFINITY;
        vf e = vexp(vload(tail) - mv);
        acc += e;
        for (int l = 0; j + l < n; l++)
            s[j + l] = e[l];
    }
    float sum = 0.0f;
    for (int l = 0; l < VW; l++)
        sum += acc[l];
    return sum;
}

/* ---- fp16 / bf16 -> fp32 --------------------------------------------------- */

typedef uint16_t vh __attribute__((vector_size(QKV_VW * 2)));

static inline vi widen(const uint16_t *p)
{
    vh h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vi);
}

/* Exact fp16 -> fp32 without branches: move exponent and mantissa into
   place and rebias; infinities/NaNs get the full fp32 exponent; subnormals
   are renormalized by an exact fp32 subtraction. */
static inline vf f16_to_f32(vi h)
{
    vi o = (h & 0x7fff) << 13;
    vi e = o & 0x0f800000;
    o += 112 << 23;
    o += (e == 0x0f800000) & (112 << 23);
    vi zero = e == 0;
    vf sub = (vf)(o + (1 << 23)) - (vf)(((vi){0}) + (113 << 23));
    o = (zero & (vi)sub) | (~zero & o);
    return (vf)(o | ((h & 0x8000) << 16));
}

static void cvt_f16(const uint16_t *src, float *dst, int64_t n)
{
    int64_t j = 0;
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

void QKV_KERNEL_TABLE(qkv__kernels *t)
{
    t->name = QKV_KERNEL_NAME;
    t->qk = qk;
    t->pv = pv;
    t->row_max = row_max;
    t->exp_sum = exp_sum;
    t->cvt_f16 = cvt_f16;
    t->cvt_bf16 = cvt_bf16;
}
