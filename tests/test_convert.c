/*
 * test_convert.c — qkv_convert between fp32, fp16 and bf16.
 *
 * The expected values come from this file's own definitions, not from the
 * library: fp16 decoded from its bit fields with ldexp, bf16 as the top half
 * of an fp32, and rounding as "x / quantum rounded half-to-even" in double
 * (exact for these formats), with overflow to ±inf. Every fp16 and bf16
 * bit pattern is checked; fp32 inputs by hand-picked ties and random bits.
 * The vectorized output stores of every kernel set (src/cpu, reached
 * through the internal kernel table) are held to the same definition.
 */
#include "test.h"
#include "../src/cpu/kernels.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float f32_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t bits_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* value of an fp16 bit pattern, from its fields */
static double f16_value(uint16_t h)
{
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return (h & 0x8000) ? -v : v;
}

static double bf16_value(uint16_t b) { return f32_bits((uint32_t)b << 16); }

static double value_of(const void *p, qkv_dtype dt, size_t i)
{
    if (dt == QKV_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dt == QKV_F16 ? f16_value(h) : bf16_value(h);
}

/* x rounded half-to-even to a format with `mant` fraction bits and smallest
   normal exponent emin; beyond maxf it is ±inf. x / quantum is exact. */
static double round_fmt(double x, int mant, int emin, double maxf)
{
    if (isnan(x) || isinf(x) || x == 0)
        return x;
    int e;
    frexp(x, &e);             /* |x| in [2^(e-1), 2^e) */
    int lead = e - 1 < emin ? emin : e - 1;
    double quantum = ldexp(1.0, lead - mant);
    double r = nearbyint(x / quantum) * quantum;
    if (fabs(r) > maxf)
        r = copysign(INFINITY, x);
    return r == 0 ? copysign(0.0, x) : r;
}

static double round_to(double x, qkv_dtype dt)
{
    if (dt == QKV_F16) return round_fmt(x, 10, -14, 65504.0);
    if (dt == QKV_BF16) return round_fmt(x, 7, -126, ldexp(255.0, 120));
    return x;   /* every value tested is exact in fp32 */
}

/* same value, and same sign for zeros; NaN matches NaN */
static int same_value(double a, double b)
{
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    return a == b && signbit(a) == signbit(b);
}

static uint16_t to_f16(float x)
{
    uint16_t h = 0xDEAD;
    qkv_convert(&x, QKV_F32, &h, QKV_F16, 1);
    return h;
}

static uint16_t to_bf16(float x)
{
    uint16_t h = 0xDEAD;
    qkv_convert(&x, QKV_F32, &h, QKV_BF16, 1);
    return h;
}

/* Every 16-bit pattern of dt to fp32 (exact) and back (identity). */
static void exhaustive16(qkv_dtype dt)
{
    uint16_t *h = xmalloc(65536 * 2), *back = xmalloc(65536 * 2);
    float *f = xmalloc(65536 * 4);
    for (int i = 0; i < 65536; i++)
        h[i] = (uint16_t)i;
    CHECK(qkv_convert(h, dt, f, QKV_F32, 65536) == QKV_OK, "%s -> f32 status", dtype_name(dt));
    CHECK(qkv_convert(f, QKV_F32, back, dt, 65536) == QKV_OK, "f32 -> %s status", dtype_name(dt));
    int bad_up = 0, bad_back = 0, first_up = -1, first_back = -1;
    for (int i = 0; i < 65536; i++) {
        double want = dt == QKV_F16 ? f16_value(h[i]) : bf16_value(h[i]);
        if (!same_value(f[i], want)) {
            bad_up++;
            if (first_up < 0) first_up = i;
        }
        int ok = isnan(want) ? isnan(value_of(back, dt, (size_t)i)) : back[i] == h[i];
        if (!ok) {
            bad_back++;
            if (first_back < 0) first_back = i;
        }
    }
    CHECK(bad_up == 0, "%s -> f32: %d of 65536 patterns wrong, first 0x%04x -> %.9g (want %.9g)",
          dtype_name(dt), bad_up, first_up < 0 ? 0 : first_up,
          first_up < 0 ? 0.0 : (double)f[first_up],
          first_up < 0 ? 0.0 : value_of(h, dt, (size_t)first_up));
    CHECK(bad_back == 0, "%s -> f32 -> %s: %d of 65536 patterns changed, first 0x%04x -> 0x%04x",
          dtype_name(dt), dtype_name(dt), bad_back, first_back < 0 ? 0 : first_back,
          first_back < 0 ? 0 : back[first_back]);
    free(h);
    free(back);
    free(f);
}

void test_convert_f16_exhaustive(void) { exhaustive16(QKV_F16); }
void test_convert_bf16_exhaustive(void) { exhaustive16(QKV_BF16); }

/* Hand-picked fp32 inputs, their fp16 and bf16 bit patterns. */
void test_convert_rounding(void)
{
    static const struct { float x; uint16_t h; const char *why; } f16[] = {
        { 1.0f,                              0x3C00, "one" },
        { 1.0f + 0x1p-11f,                   0x3C00, "tie -> even (down)" },
        { 1.0f + 3 * 0x1p-11f,               0x3C02, "tie -> even (up)" },
        { 1.0f + 0x1p-11f + 0x1p-23f,        0x3C01, "just above a tie" },
        { 1.0f + 0x1p-11f - 0x1p-23f,        0x3C00, "just below a tie" },
        { -(1.0f + 0x1p-11f),                0xBC00, "negative tie" },
        { -(1.0f + 3 * 0x1p-11f),            0xBC02, "negative tie up" },
        { 65504.0f,                          0x7BFF, "largest finite" },
        { 65519.0f,                          0x7BFF, "below the overflow tie" },
        { 65520.0f,                          0x7C00, "overflow tie -> inf" },
        { 1e6f,                              0x7C00, "overflow" },
        { -1e6f,                             0xFC00, "negative overflow" },
        { FLT_MAX,                           0x7C00, "FLT_MAX" },
        { 0x1p-14f,                          0x0400, "smallest normal" },
        { 0x1p-24f,                          0x0001, "smallest subnormal" },
        { 0x1p-25f,                          0x0000, "half of it: tie -> 0" },
        { 0x1p-25f + 0x1p-40f,               0x0001, "just above that tie" },
        { 3 * 0x1p-25f,                      0x0002, "subnormal tie -> even (up)" },
        { 5 * 0x1p-25f,                      0x0002, "subnormal tie -> even (down)" },
        { 0x1p-14f - 0x1p-25f,               0x0400, "rounds up into the normals" },
        { 1023 * 0x1p-24f,                   0x03FF, "largest subnormal" },
        { -0x1p-26f,                         0x8000, "tiny negative -> -0" },
        { 1e-10f,                            0x0000, "underflow" },
        { -0.0f,                             0x8000, "-0" },
        { 0.1f,                              0x2E66, "0.1" },
        { 3.14159265f,                       0x4248, "pi" },
    };
    for (size_t i = 0; i < sizeof f16 / sizeof f16[0]; i++) {
        uint16_t h = to_f16(f16[i].x);
        CHECK(h == f16[i].h, "f32 %.10g -> f16: 0x%04x, want 0x%04x (%s)",
              (double)f16[i].x, h, f16[i].h, f16[i].why);
    }

    static const struct { uint32_t x; uint16_t b; const char *why; } bf[] = {
        { 0x3F800000, 0x3F80, "one" },
        { 0x3F808000, 0x3F80, "tie -> even (down)" },
        { 0x3F818000, 0x3F82, "tie -> even (up)" },
        { 0x3F808001, 0x3F81, "just above a tie" },
        { 0x3F807FFF, 0x3F80, "just below a tie" },
        { 0xBF818000, 0xBF82, "negative tie up" },
        { 0x7F7F0000, 0x7F7F, "largest finite bf16" },
        { 0x7F7F7FFF, 0x7F7F, "below the overflow tie" },
        { 0x7F7F8000, 0x7F80, "overflow tie -> inf" },
        { 0x7F7FFFFF, 0x7F80, "FLT_MAX -> inf" },
        { 0xFF7FFFFF, 0xFF80, "-FLT_MAX -> -inf" },
        { 0x7E967699, 0x7E96, "1e38" },
        { 0x501502F9, 0x5015, "1e10" },
        { 0x00000001, 0x0000, "smallest fp32 subnormal -> 0" },
        { 0x00008000, 0x0000, "subnormal tie -> even (down)" },
        { 0x00018000, 0x0002, "subnormal tie -> even (up)" },
        { 0x00008001, 0x0001, "subnormal just above a tie" },
        { 0x007FFFFF, 0x0080, "largest subnormal rounds into the normals" },
        { 0x80000000, 0x8000, "-0" },
    };
    for (size_t i = 0; i < sizeof bf / sizeof bf[0]; i++) {
        uint16_t b = to_bf16(f32_bits(bf[i].x));
        CHECK(b == bf[i].b, "f32 0x%08x (%.9g) -> bf16: 0x%04x, want 0x%04x (%s)",
              bf[i].x, (double)f32_bits(bf[i].x), b, bf[i].b, bf[i].why);
    }

    /* random fp32 bit patterns (all exponents) and values near 1 (dense
       ties), against round_fmt */
    size_t n = t_quick ? 200000 : 2000000;
    float *x = xmalloc(n * 4);
    uint16_t *h = xmalloc(n * 2), *b = xmalloc(n * 2);
    rng r = rng_seed(11);
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)rng_u64(&r);
        if (i % 4 == 1) u = 0x3F800000u + (u & 0xFFFFu);          /* near 1: many ties */
        if (i % 4 == 2) u = (u & 0x80000000u) | (0x33000000u + (u & 0x03FFFFFFu)); /* fp16 subnormal range */
        x[i] = f32_bits(u);
    }
    CHECK(qkv_convert(x, QKV_F32, h, QKV_F16, n) == QKV_OK, "f32 -> f16 status");
    CHECK(qkv_convert(x, QKV_F32, b, QKV_BF16, n) == QKV_OK, "f32 -> bf16 status");
    size_t bad_h = 0, bad_b = 0, fh = 0, fb = 0;
    for (size_t i = 0; i < n; i++) {
        if (!same_value(f16_value(h[i]), round_to(x[i], QKV_F16)) && !bad_h++) fh = i;
        if (!same_value(bf16_value(b[i]), round_to(x[i], QKV_BF16)) && !bad_b++) fb = i;
    }
    CHECK(bad_h == 0, "random f32 -> f16: %zu of %zu wrong, first 0x%08x -> 0x%04x (want %.9g)",
          bad_h, n, bits_f32(x[fh]), h[fh], round_to(x[fh], QKV_F16));
    CHECK(bad_b == 0, "random f32 -> bf16: %zu of %zu wrong, first 0x%08x -> 0x%04x (want %.9g)",
          bad_b, n, bits_f32(x[fb]), b[fb], round_to(x[fb], QKV_BF16));
    free(x);
    free(h);
    free(b);
}

/* Infinities and NaNs, including NaNs whose payload lives only in the low
   bits (truncation would make them inf) and all-ones NaNs (naive rounding
   carries them into the sign bit). */
void test_convert_special(void)
{
    static const uint32_t nans[] = { 0x7FC00000, 0x7F800001, 0x7F800100, 0x7FFFFFFF,
                                     0xFFFFFFFF, 0xFF800001, 0x7FBFFFFF, 0xFFC00000 };
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
        float x = f32_bits(nans[i]);
        uint16_t h = to_f16(x), b = to_bf16(x);
        CHECK(isnan(f16_value(h)), "f32 NaN 0x%08x -> f16 0x%04x is not NaN", nans[i], h);
        CHECK(isnan(bf16_value(b)), "f32 NaN 0x%08x -> bf16 0x%04x is not NaN", nans[i], b);
    }
    CHECK(to_f16(INFINITY) == 0x7C00, "+inf -> f16 0x%04x", to_f16(INFINITY));
    CHECK(to_f16(-INFINITY) == 0xFC00, "-inf -> f16 0x%04x", to_f16(-INFINITY));
    CHECK(to_bf16(INFINITY) == 0x7F80, "+inf -> bf16 0x%04x", to_bf16(INFINITY));
    CHECK(to_bf16(-INFINITY) == 0xFF80, "-inf -> bf16 0x%04x", to_bf16(-INFINITY));

    static const uint16_t h_nan[] = { 0x7C01, 0x7E00, 0x7FFF, 0xFC01, 0xFFFF };
    static const uint16_t b_nan[] = { 0x7F81, 0x7FC0, 0x7FFF, 0xFF81, 0xFFFF };
    for (int i = 0; i < 5; i++) {
        float f = 0, g = 0;
        uint16_t hb = 0, bh = 0;
        qkv_convert(&h_nan[i], QKV_F16, &f, QKV_F32, 1);
        qkv_convert(&b_nan[i], QKV_BF16, &g, QKV_F32, 1);
        qkv_convert(&h_nan[i], QKV_F16, &hb, QKV_BF16, 1);
        qkv_convert(&b_nan[i], QKV_BF16, &bh, QKV_F16, 1);
        CHECK(isnan(f), "f16 NaN 0x%04x -> f32 %g", h_nan[i], (double)f);
        CHECK(isnan(g), "bf16 NaN 0x%04x -> f32 %g", b_nan[i], (double)g);
        CHECK(isnan(bf16_value(hb)), "f16 NaN 0x%04x -> bf16 0x%04x", h_nan[i], hb);
        CHECK(isnan(f16_value(bh)), "bf16 NaN 0x%04x -> f16 0x%04x", b_nan[i], bh);
    }
    /* large bf16 values overflow fp16 */
    uint16_t big[] = { 0x4780 /* 65536 */, 0x501502F9 >> 16 /* 1e10 */, 0xC780, 0x477F /* 65280 */ };
    uint16_t out[4];
    qkv_convert(big, QKV_BF16, out, QKV_F16, 4);
    CHECK(out[0] == 0x7C00 && out[1] == 0x7C00 && out[2] == 0xFC00 && out[3] == 0x7BF8,
          "bf16 -> f16 overflow: 0x%04x 0x%04x 0x%04x 0x%04x, want 0x7c00 0x7c00 0xfc00 0x7bf8",
          out[0], out[1], out[2], out[3]);
}

/* Every (src, dst) pair, including same-dtype copies, over every 16-bit
   pattern and a set of fp32 values; odd lengths and offsets (vector tails)
   must give what element-by-element conversion gives, and write nothing
   past n. */
void test_convert_pairs(void)
{
    static const qkv_dtype dts[3] = { QKV_F32, QKV_F16, QKV_BF16 };
    enum { N = 65536 };
    rng r = rng_seed(5);
    for (int si = 0; si < 3; si++) {
        qkv_dtype sd = dts[si];
        size_t ses = qkv_dtype_size(sd);
        unsigned char *src = xmalloc(N * ses);
        for (size_t i = 0; i < N; i++) {
            if (sd == QKV_F32) {
                float x = (float)(rng_unif(&r) * ldexp(1.0, (int)rng_int(&r, -30, 20)));
                if (i < 8) x = (float[]){ 0.0f, -0.0f, INFINITY, -INFINITY, NAN, 65520.0f, 0x1p-25f, 1.0f + 0x1p-11f }[i];
                memcpy(src + 4 * i, &x, 4);
            } else {
                uint16_t h = (uint16_t)i;
                memcpy(src + 2 * i, &h, 2);
            }
        }
        for (int di = 0; di < 3; di++) {
            qkv_dtype dd = dts[di];
            size_t des = qkv_dtype_size(dd);
            unsigned char *dst = xmalloc(N * des);
            CHECK(qkv_convert(src, sd, dst, dd, N) == QKV_OK, "%s -> %s status",
                  dtype_name(sd), dtype_name(dd));
            size_t bad = 0, first = 0;
            for (size_t i = 0; i < N; i++) {
                double want = round_to(value_of(src, sd, i), dd);
                int ok = same_value(value_of(dst, dd, i), want);
                if (sd == dd && !isnan(want))    /* a copy keeps the bits */
                    ok = memcmp(src + i * ses, dst + i * des, des) == 0;
                if (!ok && !bad++) first = i;
            }
            CHECK(bad == 0, "%s -> %s: %zu of %d wrong, first [%zu] %.9g -> %.9g (want %.9g)",
                  dtype_name(sd), dtype_name(dd), bad, N, first, value_of(src, sd, first),
                  value_of(dst, dd, first), round_to(value_of(src, sd, first), dd));

            /* tails: n and offsets that are not multiples of any vector width */
            static const size_t lens[] = { 0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 100 };
            unsigned char *part = xmalloc(128 * des + 16);
            size_t tail_bad = 0;
            for (size_t off = 0; off < 4; off++)
                for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
                    size_t n = lens[li];
                    memset(part, 0xAB, 128 * des + 16);
                    if (qkv_convert(src + (1000 + off) * ses, sd, part + off * des, dd, n) != QKV_OK)
                        tail_bad++;
                    for (size_t i = 0; i < n; i++)
                        if (memcmp(part + (off + i) * des, dst + (1000 + off + i) * des, des))
                            tail_bad++;
                    for (size_t i = 0; i < 128 * des + 16; i++)
                        if ((i < off * des || i >= (off + n) * des) && part[i] != 0xAB)
                            tail_bad++;
                }
            CHECK(tail_bad == 0, "%s -> %s: short/offset conversions differ or write outside [0,n) (%zu)",
                  dtype_name(sd), dtype_name(dd), tail_bad);
            free(part);
            free(dst);
        }
        free(src);
    }
}

void test_convert_errors(void)
{
    float src[4] = { 1, 2, 3, 4 };
    unsigned char dst[16], before[16];
    memset(dst, 0x5C, sizeof dst);
    memcpy(before, dst, sizeof dst);

    CHECK(qkv_convert(NULL, QKV_F32, dst, QKV_F16, 4) == QKV_ERR_NULL, "NULL src");
    CHECK(qkv_convert(src, QKV_F32, NULL, QKV_F16, 4) == QKV_ERR_NULL, "NULL dst");
    CHECK(qkv_convert(src, (qkv_dtype)7, dst, QKV_F16, 4) == QKV_ERR_DTYPE, "src dtype 7");
    CHECK(qkv_convert(src, QKV_F32, dst, (qkv_dtype)7, 4) == QKV_ERR_DTYPE, "dst dtype 7");
    CHECK(qkv_convert(src, (qkv_dtype)-1, dst, QKV_F32, 4) == QKV_ERR_DTYPE, "src dtype -1");
    CHECK(qkv_convert(src, QKV_F16, dst, (qkv_dtype)3, 4) == QKV_ERR_DTYPE, "dst dtype 3");
    CHECK(memcmp(dst, before, sizeof dst) == 0, "a failed qkv_convert wrote to dst");
    CHECK(qkv_convert(src, QKV_F32, dst, QKV_F16, 0) == QKV_OK, "n = 0 is a no-op");
    CHECK(memcmp(dst, before, sizeof dst) == 0, "qkv_convert with n = 0 wrote to dst");

    CHECK(qkv_dtype_size(QKV_F32) == 4, "dtype_size(f32) = %zu", qkv_dtype_size(QKV_F32));
    CHECK(qkv_dtype_size(QKV_F16) == 2, "dtype_size(f16) = %zu", qkv_dtype_size(QKV_F16));
    CHECK(qkv_dtype_size(QKV_BF16) == 2, "dtype_size(bf16) = %zu", qkv_dtype_size(QKV_BF16));
    CHECK(qkv_dtype_size((qkv_dtype)7) == 0, "dtype_size(7) = %zu", qkv_dtype_size((qkv_dtype)7));
    CHECK(qkv_dtype_size((qkv_dtype)-1) == 0, "dtype_size(-1) = %zu", qkv_dtype_size((qkv_dtype)-1));
}

/* The kernels' fp32 -> fp16/bf16 stores (the forward's output path): on a
   sweep of fp32 bit patterns, times 1 and times a scale, every kernel set
   the CPU runs must round as round_to() does, NaN staying NaN. Lengths
   vary so the vector tails are crossed. */
void test_convert_store_kernels(void)
{
    const int64_t n = t_quick ? (1 << 16) : (1 << 20);
    float *src = malloc((size_t)n * sizeof *src);
    uint16_t *got = malloc((size_t)n * sizeof *got);
    double *want[2] = { malloc((size_t)n * sizeof(double)), malloc((size_t)n * sizeof(double)) };
    if (!src || !got || !want[0] || !want[1]) {
        CHECK(0, "out of memory");
        return;
    }
    const float muls[2] = { 1.0f, 0.7071067811865476f };
    int sets = 0;
    for (int round = 0; round < 2; round++) {
        /* a stride through all 2^32 patterns, then the area around 1 */
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = round == 0 ? (uint32_t)(i * (int64_t)(4294967296.0 / (double)n)) + (uint32_t)i
                                    : 0x3f000000u + (uint32_t)(i * 7);
            memcpy(&src[i], &u, 4);
        }
        for (int mi = 0; mi < 2; mi++) {
            for (int d = 0; d < 2; d++) {
                const qkv_dtype dt = d ? QKV_BF16 : QKV_F16;
                for (int64_t i = 0; i < n; i++)
                    want[d][i] = round_to((double)(src[i] * muls[mi]), dt);
            }
            for (int k = 0; qkv__kernels_name(k); k++) {
                int known;
                const qkv__kernels *kn = qkv__kernels_by_name(qkv__kernels_name(k), &known);
                if (!kn)
                    continue;
                sets += round == 0 && mi == 0;
                for (int d = 0; d < 2; d++) {
                    const qkv_dtype dt = d ? QKV_BF16 : QKV_F16;
                    /* chunks of 1..37 elements */
                    for (int64_t i = 0, len = 1; i < n; i += len, len = len % 37 + 1) {
                        const int64_t m = i + len <= n ? len : n - i;
                        (d ? kn->store_bf16 : kn->store_f16)(src + i, muls[mi], got + i, m);
                    }
                    int64_t bad = 0, first = -1;
                    for (int64_t i = 0; i < n; i++)
                        if (!same_value(value_of(got, dt, (size_t)i), want[d][i])) {
                            if (first < 0) first = i;
                            bad++;
                        }
                    uint32_t fu = 0;
                    if (first >= 0) memcpy(&fu, &src[first], 4);
                    CHECK(bad == 0, "%s store_%s x%g: %lld of %lld wrong, first input 0x%08x -> 0x%04x",
                          kn->name, d ? "bf16" : "f16", (double)muls[mi], (long long)bad,
                          (long long)n, fu, first >= 0 ? got[first] : 0);
                }
            }
        }
    }
    t_note("%d kernel sets, %lld patterns each", sets, (long long)(2 * n));
    free(src); free(got); free(want[0]); free(want[1]);
}

/* Kernel set k where this CPU runs it, else NULL. */
static const qkv__kernels *kernel_set(int k)
{
    int known;
    return qkv__kernels_by_name(qkv__kernels_name(k), &known);
}

/* cvt_i8_bf16 on every kernel set: every code, rows at a stride, lengths
   1..70 (the vector bodies and their tails); only the row's n elements
   written. */
void test_convert_i8_bf16_kernels(void)
{
    int8_t src[3 * 80];
    for (int i = 0; i < 3 * 80; i++)
        src[i] = (int8_t)(i * 37 - 128);
    for (int k = 0; qkv__kernels_name(k); k++) {
        const qkv__kernels *kn = kernel_set(k);
        if (!kn)
            continue;
        int64_t bad = 0;
        for (int n = 1; n <= 70; n++) {
            uint16_t dst[3 * 72];
            for (int i = 0; i < 3 * 72; i++)
                dst[i] = 0xdead;
            kn->cvt_i8_bf16(src + 3, 80, 3, n, dst, 72);
            for (int r = 0; r < 3; r++)
                for (int j = 0; j < 72; j++) {
                    const float f = (float)src[3 + r * 80 + j];
                    uint32_t u;
                    memcpy(&u, &f, sizeof u);
                    const uint16_t want = j < n ? (uint16_t)(u >> 16) : 0xdead;
                    bad += dst[r * 72 + j] != want;
                }
        }
        CHECK(bad == 0, "%s: cvt_i8_bf16 wrote %lld wrong elements", qkv__kernels_name(k),
              (long long)bad);
    }
}

/* Pairs pack_pairs of set kn writes wrong: word c of a in the low half of
   dst[c], of b (or 0 with no b) in the high half, for n 1..100 (the
   vector bodies and their tails); only the n pairs written. */
static int64_t pack_pairs_wrong(const qkv__kernels *kn, const uint16_t *a, const uint16_t *b)
{
    int64_t bad = 0;
    for (int n = 1; n <= 100; n++)
        for (int half = 0; half < 2; half++) {
            uint32_t dst[104];
            for (int i = 0; i < 104; i++)
                dst[i] = 0xdeadbeefu;
            kn->pack_pairs(a, half ? b : NULL, n, dst);
            for (int c = 0; c < 104; c++) {
                const uint32_t want = c >= n ? 0xdeadbeefu
                                             : (uint32_t)a[c] | (half ? (uint32_t)b[c] << 16 : 0u);
                bad += dst[c] != want;
            }
        }
    return bad;
}

void test_convert_pack_pairs_kernels(void)
{
    uint16_t a[104], b[104];
    for (int i = 0; i < 104; i++) {
        a[i] = (uint16_t)(i * 2654435761u >> 7);
        b[i] = (uint16_t)(i * 40503u + 17);
    }
    for (int k = 0; qkv__kernels_name(k); k++)
        if (kernel_set(k))
            CHECK(pack_pairs_wrong(kernel_set(k), a + 1, b + 3) == 0,
                  "%s: pack_pairs wrote wrong pairs", qkv__kernels_name(k));
}
