/*
 * test_forward.c — qkv_attention_forward against qkv_attention_reference.
 *
 * Every case runs on every kernel set the CPU supports (qkv_isa_name:
 * generic, avx2, avx512, avx512bf16), over shape classes (tiny, odd and prime lengths, D not a
 * multiple of 16, big D, Sq != Sk, GQA/MQA, long sequences), every option
 * alone and combined, each dtype, and strided layouts. The reference runs
 * once per case on logical fp32 copies of the (already rounded) inputs,
 * gathered by this file, so it never sees the strides under test.
 *
 * Tolerances, |got - ref| <= atol + rtol*|ref|: torch.testing.assert_close's
 * defaults per dtype are the bounds PyTorch's own SDPA tests hold its kernels
 * to; the reference is computed in double from the same rounded inputs, so
 * only the kernel's own fp32 arithmetic (and the final rounding to the
 * output dtype) is measured:
 *   f32   atol 1e-5, rtol 1e-5   (torch: 1e-5, 1.3e-6; the rtol is widened
 *                                 for large outputs; the max error seen is
 *                                 printed and is expected near 1e-6)
 *   f16   atol 1e-3, rtol 1e-3   (output rounding alone is 4.9e-4 relative)
 *   bf16  atol 1e-2, rtol 1.6e-2 (torch's bf16 defaults)
 *   (with ALiBi, f32 atol also grows by 2 fp32 ulps of the largest possible
 *    |score|, slope * (Sq + Sk): see check_forward)
 *   lse   atol 1e-5 (f32) / 1e-4 (f16, bf16), rtol 2e-6: lse is fp32 for
 *         every dtype, computed from the same inputs; the rtol covers scores
 *         of magnitude ~100s (ALiBi at long distances), where one fp32 ulp
 *         alone exceeds 1e-5.
 */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_ISAS = 8 };

typedef struct {
    int      n;
    qkv_ctx *ctx[MAX_ISAS];
    const char *name[MAX_ISAS];
    qkv_ctx *ref;   /* for the reference */
} isas;

/* One context per kernel set the CPU supports, n_threads each. */
static void isas_open(isas *s, int n_threads)
{
    memset(s, 0, sizeof *s);
    CHECK(qkv_isa_supported("generic") == 1, "the generic kernels must always be supported");
    for (int i = 0; qkv_isa_name(i) && s->n < MAX_ISAS; i++) {
        const char *isa = qkv_isa_name(i);
        if (!qkv_isa_supported(isa))
            continue;
        qkv_ctx *ctx = qkv_ctx_create(n_threads);
        CHECK(ctx != NULL, "qkv_ctx_create(%d)", n_threads);
        if (!ctx) continue;
        qkv_status st = qkv_ctx_set_isa(ctx, isa);
        CHECK(st == QKV_OK, "qkv_ctx_set_isa(%s) = %d", isa, st);
        CHECK(strcmp(qkv_ctx_isa(ctx), isa) == 0, "qkv_ctx_isa = %s after setting %s",
              qkv_ctx_isa(ctx), isa);
        s->ctx[s->n] = ctx;
        s->name[s->n++] = isa;
    }
    s->ref = qkv_ctx_create(0);
    CHECK(s->ref != NULL, "qkv_ctx_create(0)");
}

static void isas_close(isas *s)
{
    for (int i = 0; i < s->n; i++)
        qkv_ctx_free(s->ctx[i]);
    qkv_ctx_free(s->ref);
}

void forward_tolerances(qkv_dtype dt, double *atol, double *rtol, double *lse_atol)
{
    *atol = dt == QKV_F32 ? 1e-5 : dt == QKV_F16 ? 1e-3 : 1e-2;
    *rtol = dt == QKV_F32 ? 1e-5 : dt == QKV_F16 ? 1e-3 : 1.6e-2;
    *lse_atol = dt == QKV_F32 ? 1e-5 : 1e-4;
}
static const double LSE_RTOL = 2e-6;

/* largest errors seen since the last report(), per dtype, without and
   with ALiBi (whose large scores cost fp32 precision, see check_forward) */
static double err_out[2][3], err_lse[2][3];

static void report(void)
{
    for (int a = 0; a < 2; a++)
        t_note("max |out - ref|%s: f32 %.2e  f16 %.2e  bf16 %.2e;  max |lse - ref|: f32 %.2e  f16 %.2e  bf16 %.2e",
               a ? " (alibi)" : "        ", err_out[a][0], err_out[a][1], err_out[a][2],
               err_lse[a][0], err_lse[a][1], err_lse[a][2]);
    memset(err_out, 0, sizeof err_out);
    memset(err_lse, 0, sizeof err_lse);
}

/* The reference's answer for c: out [B,Sq,Hq,Dv] and lse [B,Hq,Sq], fp32,
   unused varlen rows zero. Returns the number of -inf rows. */
static size_t reference(qkv_ctx *ctx, const acase *c, float *out, float *lse)
{
    qkv_tensor q = qkv_tensor_4d(c->qf, QKV_F32, c->B, c->Sq, c->Hq, c->D);
    qkv_tensor k = qkv_tensor_4d(c->kf, QKV_F32, c->B, c->Sk, c->Hkv, c->D);
    qkv_tensor v = qkv_tensor_4d(c->vf, QKV_F32, c->B, c->Sk, c->Hkv, c->Dv);
    qkv_tensor o = qkv_tensor_4d(out, QKV_F32, c->B, c->Sq, c->Hq, c->Dv);
    memset(out, 0, c->n_out * sizeof(float));
    memset(lse, 0, c->n_lse * sizeof(float));
    qkv_status st = qkv_attention_reference(ctx, &q, &k, &v, &c->opts, &o, lse);
    CHECK(st == QKV_OK, "reference returned %d: %s [%s]", st, qkv_ctx_last_error(ctx), acase_str(c));
    acase_zero_unused(c, out, lse);
    size_t n = 0;
    for (size_t i = 0; i < c->n_lse; i++)
        n += lse[i] == -INFINITY;
    return n;
}

/* Runs forward on ctx and compares with ref_out / ref_lse. */
static void check_forward(qkv_ctx *ctx, const char *isa, const acase *c,
                          const float *ref_out, const float *ref_lse)
{
    tbuf out;
    acase_make_out(c, &out, c->dt);
    float *lse = c->no_lse ? NULL : acase_make_lse(c);
    qkv_status st = qkv_attention_forward(ctx, &c->tq, &c->tk, &c->tv, &c->opts, &out.t, lse);
    CHECK(st == QKV_OK, "%s: forward returned %d (%s): %s [%s]", isa, st, qkv_status_string(st),
          qkv_ctx_last_error(ctx), acase_str(c));
    if (st == QKV_OK) {
        char label[600];
        snprintf(label, sizeof label, "%s forward", isa);
        float *got = acase_collect(c, &out, lse, label);

        /* rows that see no key: exactly 0 and -inf, never NaN */
        size_t bad_empty = 0;
        for (int64_t b = 0; b < c->B; b++)
            for (int64_t h = 0; h < c->Hq; h++)
                for (int64_t i = 0; i < c->Sq; i++) {
                    if (ref_lse[(b * c->Hq + h) * c->Sq + i] != -INFINITY) continue;
                    const float *o = got + ((b * c->Sq + i) * c->Hq + h) * c->Dv;
                    for (int64_t e = 0; e < c->Dv; e++)
                        bad_empty += o[e] != 0;
                }
        CHECK(bad_empty == 0, "%s: %zu elements of rows that see no key are not exactly 0 [%s]",
              isa, bad_empty, acase_str(c));

        double atol, rtol, lse_atol;
        forward_tolerances(c->dt, &atol, &rtol, &lse_atol);
        if (c->alibi) {
            /* ALiBi at long distances makes scores of magnitude slope *
               distance (hundreds); one fp32 ulp of such a score exceeds 1e-5
               in any fp32 kernel (PyTorch's too, where ALiBi is an fp32
               bias), and moves out by that much times |v| <= 1. So atol
               grows by 2 ulps of the largest possible |score|. */
            double smax = 0;
            for (int64_t h = 0; h < c->Hq; h++)
                if (c->slopes[h] > smax) smax = c->slopes[h];
            atol += ldexp(smax * (double)(c->Sq + c->Sk), -22);
        }
        char name[700];
        snprintf(name, sizeof name, "%s out [%s]", isa, acase_str(c));
        double e = compare(name, got, QKV_F32, ref_out, c->n_out, atol, rtol);
        if (e > err_out[!!c->alibi][c->dt]) err_out[!!c->alibi][c->dt] = e;
        if (lse) {
            snprintf(name, sizeof name, "%s lse [%s]", isa, acase_str(c));
            e = compare(name, lse, QKV_F32, ref_lse, c->n_lse, lse_atol, LSE_RTOL);
            if (e > err_lse[!!c->alibi][c->dt]) err_lse[!!c->alibi][c->dt] = e;
        }
        free(got);
    }
    tbuf_free(&out);
    acase_free_lse(lse);
}

/* Builds c, computes the reference once, checks every kernel set. Returns
   the number of rows (b, h, i) that see no key. */
static size_t run_case(const isas *s, acase *c)
{
    acase_build(c);
    float *ref_out = xmalloc(c->n_out * sizeof(float));
    float *ref_lse = xmalloc(c->n_lse * sizeof(float));
    size_t empty = reference(s->ref, c, ref_out, ref_lse);
    for (int i = 0; i < s->n; i++)
        check_forward(s->ctx[i], s->name[i], c, ref_out, ref_lse);
    free(ref_out);
    free(ref_lse);
    acase_free(c);
    return empty;
}

static const qkv_dtype dtypes[3] = { QKV_F32, QKV_F16, QKV_BF16 };

/* ---- shape classes ------------------------------------------------------ */

void test_forward_shapes(void)
{
    static const int64_t shapes[][7] = {   /* B, Sq, Sk, Hq, Hkv, D, Dv */
        { 1, 1, 1, 1, 1, 1, 1 },           /* tiny */
        { 2, 1, 7, 2, 1, 3, 3 },
        { 1, 7, 1, 4, 2, 17, 1 },
        { 2, 13, 13, 4, 4, 33, 33 },
        { 1, 31, 67, 6, 3, 80, 80 },
        { 2, 67, 31, 4, 2, 96, 100 },
        { 1, 131, 131, 8, 2, 100, 96 },
        { 1, 257, 13, 2, 1, 128, 128 },
        { 1, 1, 257, 8, 1, 128, 128 },
        { 1, 257, 257, 4, 2, 64, 64 },
        { 1, 13, 257, 2, 2, 17, 33 },
        { 3, 16, 48, 3, 1, 16, 16 },       /* exact multiples */
        { 1, 33, 100, 16, 2, 64, 64 },     /* wide GQA groups */
        { 2, 5, 300, 32, 4, 64, 64 },
        { 1, 64, 64, 12, 1, 80, 80 },      /* MQA */
        { 1, 31, 31, 2, 1, 256, 256 },     /* big head dims */
        { 1, 7, 37, 2, 2, 512, 512 },
        { 1, 17, 67, 2, 1, 512, 64 },
        { 2, 9, 9, 1, 1, 64, 512 },
        { 1, 5, 40, 1, 1, 256, 80 },
        { 1, 3, 50, 96, 1, 32, 32 },       /* tiles of more than 64 rows */
        { 1, 2, 40, 272, 1, 16, 24 },      /* ... and of more than 256 */
    };
    isas s;
    isas_open(&s, 0);
    uint64_t seed = 1;
    for (int di = 0; di < 3; di++)
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
            for (int causal = 0; causal < 2; causal++) {
                if (t_quick && shapes[i][1] * shapes[i][2] > 10000 && (causal + di) % 2)
                    continue;
                const int64_t *x = shapes[i];
                acase c;
                acase_init(&c, x[0], x[1], x[2], x[3], x[4], x[5], x[6], dtypes[di]);
                c.causal = causal;
                c.seed = seed++;
                if ((i + (size_t)causal) % 3 == 2 || x[3] > 64)   /* a third, and wide groups */
                    c.dropout = 0.25f;
                run_case(&s, &c);
            }
    report();
    isas_close(&s);
}

/* ---- options ------------------------------------------------------------- */

enum { O_CAUSAL = 1, O_WINDOW = 2, O_SOFTCAP = 4, O_ALIBI = 8, O_BIAS = 16, O_VARLEN = 32,
       O_SCALE = 64, O_ALL = 127 };

static void random_options(acase *c, rng *r, int bits)
{
    static const int64_t win[] = { -1, 0, 1, 5, 16, 40 };
    c->causal = !!(bits & O_CAUSAL);
    if (bits & O_WINDOW) {
        do {
            c->wl = RNG_PICK(r, win);
            c->wr = RNG_PICK(r, win);
        } while (c->wl < 0 && c->wr < 0);
    }
    if (bits & O_SOFTCAP) c->softcap = (float)RNG_PICK(r, ((double[]){ 0.5, 2.0, 10.0, 30.0 }));
    if (bits & O_SCALE) c->scale = (float)RNG_PICK(r, ((double[]){ 0.05, 0.3, 1.0 }));
    c->alibi = !!(bits & O_ALIBI);
    if (bits & O_BIAS) {
        c->bias = (int)rng_int(r, 1, BIAS_COUNT - 1);
        c->bias_neg_row = rng_int(r, 0, 3) == 0;
    }
}

static void random_shape(acase *c, rng *r, qkv_dtype dt, int64_t max_s)
{
    static const int64_t S[] = { 1, 2, 3, 5, 7, 13, 16, 31, 32, 33, 64, 67, 100, 129, 131, 257,
                                 255, 256, 511, 513, 1000, 1031 };
    static const int64_t Dims[] = { 1, 3, 8, 16, 17, 32, 33, 64, 80, 96, 100, 128 };
    static const int64_t Hq[] = { 1, 2, 3, 4, 6, 8 };
    int64_t hq = RNG_PICK(r, Hq), hkv;
    do hkv = rng_int(r, 1, hq); while (hq % hkv);
    int64_t sq, sk;
    do sq = RNG_PICK(r, S); while (sq > max_s);
    do sk = RNG_PICK(r, S); while (sk > max_s);
    acase_init(c, rng_int(r, 1, 2), sq, sk, hq, hkv, RNG_PICK(r, Dims), RNG_PICK(r, Dims), dt);
    c->seed = rng_u64(r);
}

/* Every combination of causal, window, softcap, ALiBi, bias, varlen and
   scale (bias with varlen is refused, so not combined). */
void test_forward_options(void)
{
    isas s;
    isas_open(&s, 0);
    rng r = rng_seed(7);
    for (int bits = 0; bits <= O_ALL; bits++) {
        if ((bits & O_BIAS) && (bits & O_VARLEN)) continue;
        for (int rep = 0; rep < (t_quick ? 1 : 9); rep++) {
            int di = (bits + rep) % 3;
            acase c;
            random_shape(&c, &r, dtypes[di], 131);
            random_options(&c, &r, bits);
            if (bits & O_VARLEN) acase_random_varlen(&c, &r, (int)rng_int(&r, 1, 5), 80);
            if (rep % 3 == 1)   /* dropout on a third of the cases */
                c.dropout = RNG_PICK(&r, ((const float[]){ 0.1f, 0.5f, 0.9f }));
            run_case(&s, &c);
        }
    }
    report();
    isas_close(&s);
}

/* ---- strides ------------------------------------------------------------- */

void test_forward_strides(void)
{
    isas s;
    isas_open(&s, 0);
    uint64_t seed = 500;
    for (int di = 0; di < 3; di++) {
        /* each input layout, rotated so every pair meets; out never broadcasts */
        for (int L = 0; L < LAY_COUNT; L++)
            for (int opt = 0; opt < 2; opt++) {
                acase c;
                acase_init(&c, 2, 37, 45, 4, 2, 24, 40, dtypes[di]);
                c.lay_q = L;
                c.lay_k = (L + 1 + opt) % LAY_COUNT;
                c.lay_v = (L + 3) % LAY_COUNT;
                c.lay_o = (L + opt) % LAY_BCAST;
                c.causal = opt;
                c.alibi = opt;
                c.seed = seed++;
                run_case(&s, &c);
            }
        /* q, k, v as slices of one packed [B, S, 3, H, D] buffer */
        for (int opt = 0; opt < 2; opt++) {
            acase c;
            acase_init(&c, 2, 33 + 40 * opt, 33 + 40 * opt, 4, 4, 48, 48, dtypes[di]);
            c.packed = 1;
            c.causal = opt;
            c.lay_o = opt ? LAY_PAD : LAY_CONTIG;
            c.seed = seed++;
            run_case(&s, &c);
        }
        /* varlen with strided inputs and padded out */
        {
            acase c;
            rng r = rng_seed(seed++);
            acase_init(&c, 1, 1, 1, 6, 2, 40, 24, dtypes[di]);
            acase_random_varlen(&c, &r, 4, 40);
            c.lay_q = LAY_NEG; c.lay_k = LAY_BHSD; c.lay_v = LAY_PAD; c.lay_o = LAY_PAD;
            c.causal = 1;
            c.seed = seed++;
            run_case(&s, &c);
        }
        /* strided and broadcast bias */
        for (int bias = 1; bias < BIAS_COUNT; bias++) {
            acase c;
            acase_init(&c, 2, 19, 70, 4, 1, 32, 32, dtypes[di]);
            c.bias = bias;
            c.lay_k = LAY_BHSD;
            c.seed = seed++;
            run_case(&s, &c);
        }
    }
    report();
    isas_close(&s);
}

/* ---- rows that see no key ----------------------------------------------- */

void test_forward_empty_rows(void)
{
    isas s;
    isas_open(&s, 0);
    for (int di = 0; di < 3; di++)
        for (int t = 0; t < 5; t++) {
            acase c;
            acase_init(&c, 2, 40, 17, 4, 2, 33, 20, dtypes[di]);
            c.seed = (uint64_t)(900 + 10 * di + t);
            const char *what = "";
            if (t == 0) { c.causal = 1; what = "causal Sq > Sk"; }
            if (t == 1) { c.wl = 0; c.wr = 0; what = "window (0,0) Sq > Sk"; }
            if (t == 2) { c.bias = BIAS_B1; c.bias_neg_row = 1; what = "-inf bias row"; }
            if (t == 3) { c.wl = 2; c.wr = -1; c.causal = 1; c.alibi = 1; what = "causal + window"; }
            if (t == 4) {   /* a sequence with queries but no keys */
                what = "varlen sequence with no keys";
                c.n_seqs = 3; c.B = 1;
                int32_t q[4] = { 1, 10, 25, 40 }, k[4] = { 0, 7, 7, 17 };
                memcpy(c.cu_q, q, sizeof q);
                memcpy(c.cu_k, k, sizeof k);
            }
            size_t empty = run_case(&s, &c);
            CHECK(empty > 0, "%s: the test meant to produce rows that see no key", what);
        }
    report();
    isas_close(&s);
}

/* ---- closed forms ----------------------------------------------------------- */

/* One key: out == v (exact for f16/bf16 outputs, whose rounding absorbs
   fp32 error), lse == scale * q.k. */
void test_forward_closed_form(void)
{
    isas s;
    isas_open(&s, 0);
    for (int di = 0; di < 3; di++)
        for (int i = 0; i < s.n; i++) {
            acase c;
            acase_init(&c, 2, 9, 1, 4, 2, 19, 21, dtypes[di]);
            c.seed = (uint64_t)(40 + di);
            c.scale = 0.7f;
            acase_build(&c);
            tbuf out;
            acase_make_out(&c, &out, c.dt);
            float *lse = acase_make_lse(&c);
            qkv_status st = qkv_attention_forward(s.ctx[i], &c.tq, &c.tk, &c.tv, &c.opts, &out.t, lse);
            CHECK(st == QKV_OK, "%s single key: %s", s.name[i], qkv_ctx_last_error(s.ctx[i]));
            if (st == QKV_OK) {
                float *got = acase_collect(&c, &out, lse, "single key");
                size_t bad = 0, bad_lse = 0;
                for (int64_t b = 0; b < 2; b++)
                    for (int64_t q = 0; q < 9; q++)
                        for (int64_t h = 0; h < 4; h++) {
                            const float *o = got + ((b * 9 + q) * 4 + h) * 21;
                            const float *v = c.vf + (b * 2 + h / 2) * 21;
                            for (int e = 0; e < 21; e++)
                                bad += c.dt == QKV_F32 ? fabsf(o[e] - v[e]) > 1e-6f : o[e] != v[e];
                            double dot = 0;
                            for (int d = 0; d < 19; d++)
                                dot += (double)c.qf[((b * 9 + q) * 4 + h) * 19 + d] *
                                       c.kf[(b * 2 + h / 2) * 19 + d];
                            bad_lse += fabs(lse[(b * 4 + h) * 9 + q] - 0.7 * dot) > 1e-5;
                        }
                CHECK(bad == 0, "%s %s single key: %zu elements of out != v", s.name[i],
                      dtype_name(c.dt), bad);
                CHECK(bad_lse == 0, "%s %s single key: %zu lse != scale*q.k", s.name[i],
                      dtype_name(c.dt), bad_lse);
                free(got);
            }
            tbuf_free(&out);
            acase_free_lse(lse);
            acase_free(&c);
        }
    isas_close(&s);
}

/* ---- long sequences ------------------------------------------------------ */

/* Many tiles, partially masked tiles, split keys. */
void test_forward_long(void)
{
    isas s;
    isas_open(&s, 0);
    const int64_t L = t_quick ? 3 : 1;   /* quick: a third of the lengths */
    acase c;

    acase_init(&c, 1, 1031 / L, 1031 / L, 2, 1, 64, 64, QKV_F32);
    c.causal = 1; c.seed = 1;
    run_case(&s, &c);

    acase_init(&c, 1, 1000 / L, 1500 / L, 2, 2, 64, 64, QKV_BF16);
    c.wl = 128; c.wr = 0; c.alibi = 1; c.seed = 2;
    run_case(&s, &c);

    acase_init(&c, 1, 1500 / L, 1000 / L, 4, 2, 32, 32, QKV_F16);
    c.causal = 1; c.bias = BIAS_H1; c.seed = 3;
    run_case(&s, &c);

    acase_init(&c, 1, 1, 1, 2, 1, 64, 48, QKV_F32);
    c.n_seqs = 3;
    {
        int32_t q[4] = { 0, 600, 600, 1100 }, k[4] = { 0, 700, 1000, 1400 };
        for (int i = 0; i < 4; i++) { c.cu_q[i] = q[i] / (int32_t)L; c.cu_k[i] = k[i] / (int32_t)L; }
    }
    c.Sq = c.cu_q[3] + 3; c.Sk = c.cu_k[3];
    c.causal = 1; c.softcap = 5.0f; c.scale = 0.5f; c.seed = 4;
    run_case(&s, &c);

    acase_init(&c, 2, 1, 4099 / L, 8, 2, 128, 128, QKV_F32);   /* decode */
    c.seed = 5;
    run_case(&s, &c);

    acase_init(&c, 1, 4, 3001 / L, 4, 1, 64, 64, QKV_BF16);
    c.causal = 1; c.wl = 1000 / L; c.seed = 6;
    run_case(&s, &c);

    acase_init(&c, 1, 1024 / L, 1024 / L, 1, 1, 128, 128, QKV_F16);
    c.seed = 7;
    run_case(&s, &c);

    report();
    isas_close(&s);
}

/* ---- random sweep --------------------------------------------------------- */

void test_forward_random(void)
{
    isas s;
    isas_open(&s, 0);
    rng r = rng_seed(31337);
    int n = t_quick ? 150 : 1500;
    for (int it = 0; it < n; it++) {
        acase c;
        int bits = (int)rng_int(&r, 0, O_ALL);
        if ((bits & O_BIAS) && (bits & O_VARLEN)) bits &= rng_int(&r, 0, 1) ? ~O_BIAS : ~O_VARLEN;
        do {
            random_shape(&c, &r, dtypes[rng_int(&r, 0, 2)], 1031);
        } while (c.B * c.Hq * c.Sq * c.Sk * (c.D + c.Dv) > 30000000);
        random_options(&c, &r, bits);
        if (bits & O_VARLEN) acase_random_varlen(&c, &r, (int)rng_int(&r, 1, MAX_SEQS), 100);
        if (rng_int(&r, 0, 2) == 0) {
            c.lay_q = (int)rng_int(&r, 0, LAY_COUNT - 1);
            c.lay_k = (int)rng_int(&r, 0, LAY_COUNT - 1);
            c.lay_v = (int)rng_int(&r, 0, LAY_COUNT - 1);
            c.lay_o = (int)rng_int(&r, 0, LAY_BCAST - 1);
        }
        if (c.Sq == c.Sk && c.Hq == c.Hkv && c.D == c.Dv && !c.n_seqs && rng_int(&r, 0, 1))
            c.packed = 1;
        c.no_lse = rng_int(&r, 0, 4) == 0;
        run_case(&s, &c);
    }
    report();
    isas_close(&s);
}

/* ---- thread-count determinism -------------------------------------------- */

/* Same inputs, contexts of 1, 2, 3 and 5 threads (and a second call on the
   same context): out and lse must be bitwise identical. */
void test_forward_threads(void)
{
    static const int nthreads[4] = { 1, 2, 3, 5 };
    rng r = rng_seed(4242);
    for (int isa = 0; qkv_isa_name(isa); isa++) {
        const char *name = qkv_isa_name(isa);
        if (!qkv_isa_supported(name)) continue;
        qkv_ctx *ctx[4];
        for (int t = 0; t < 4; t++) {
            ctx[t] = qkv_ctx_create(nthreads[t]);
            CHECK(ctx[t] != NULL, "qkv_ctx_create(%d)", nthreads[t]);
            if (!ctx[t]) return;
            CHECK(qkv_ctx_threads(ctx[t]) == nthreads[t], "qkv_ctx_threads = %d, want %d",
                  qkv_ctx_threads(ctx[t]), nthreads[t]);
            CHECK(qkv_ctx_set_isa(ctx[t], name) == QKV_OK, "set_isa %s", name);
        }
        for (int k = 0; k < 6; k++) {
            acase c;
            switch (k) {
            case 0: acase_init(&c, 2, 257, 257, 4, 2, 64, 64, QKV_F32); c.causal = 1; break;
            case 1: acase_init(&c, 1, 1, 3001, 8, 1, 128, 128, QKV_F32); break;
            case 2: acase_init(&c, 1, 5, 2000, 2, 2, 80, 80, QKV_BF16); c.alibi = 1; break;
            case 3: acase_init(&c, 1, 1, 1, 4, 2, 64, 32, QKV_F16);
                    acase_random_varlen(&c, &r, 5, 150); c.wl = 20; c.wr = 3; break;
            case 4: acase_init(&c, 3, 100, 77, 6, 3, 33, 17, QKV_F32); c.bias = BIAS_H1; break;
            default: acase_init(&c, 1, 2, 1500, 2, 1, 96, 96, QKV_F16); c.softcap = 3; break;
            }
            c.seed = 60 + (uint64_t)k;
            acase_build(&c);
            tbuf out[5];
            float *lse[5];
            for (int t = 0; t < 5; t++) {
                acase_make_out(&c, &out[t], c.dt);
                lse[t] = acase_make_lse(&c);
                qkv_ctx *x = ctx[t < 4 ? t : 2];   /* the 5th: again on 3 threads */
                qkv_status st = qkv_attention_forward(x, &c.tq, &c.tk, &c.tv, &c.opts, &out[t].t, lse[t]);
                CHECK(st == QKV_OK, "%s %d threads: %s", name, qkv_ctx_threads(x),
                      qkv_ctx_last_error(x));
            }
            for (int t = 1; t < 5; t++) {
                CHECK(memcmp(out[0].buf, out[t].buf, out[0].bytes) == 0,
                      "%s: out differs between 1 and %d threads%s [%s]", name,
                      nthreads[t < 4 ? t : 2], t == 4 ? " (second call)" : "", acase_str(&c));
                CHECK(memcmp(lse[0], lse[t], c.n_lse * sizeof(float)) == 0,
                      "%s: lse differs between 1 and %d threads%s [%s]", name,
                      nthreads[t < 4 ? t : 2], t == 4 ? " (second call)" : "", acase_str(&c));
            }
            for (int t = 0; t < 5; t++) {
                tbuf_free(&out[t]);
                acase_free_lse(lse[t]);
            }
            acase_free(&c);
        }
        for (int t = 0; t < 4; t++)
            qkv_ctx_free(ctx[t]);
    }
}

/* ---- non-finite inputs -------------------------------------------------- */

static void poke(const acase *c, const qkv_tensor *t, float *logical, int64_t idx, float x)
{
    /* contiguous layouts only: the view's element idx is logical[idx] */
    qkv_convert(&x, QKV_F32, (char *)t->data + idx * (int64_t)qkv_dtype_size(c->dt), c->dt, 1);
    qkv_convert((char *)t->data + idx * (int64_t)qkv_dtype_size(c->dt), c->dt, &logical[idx], QKV_F32, 1);
}

/* NaN and inf inside batch 0 of q, k and v: qkv.h does not refuse them
   (what batch 0 gets is unspecified), but the call must succeed without
   undefined behaviour, and batch 1 must be exactly as without them. */
void test_forward_nonfinite(void)
{
    isas s;
    isas_open(&s, 0);
    const int64_t Sq = 9, Sk = 11, H = 2, D = 19, Dv = 21;
    for (int di = 0; di < 3; di++) {
        acase c;
        acase_init(&c, 2, Sq, Sk, H, 1, D, Dv, dtypes[di]);
        c.seed = (uint64_t)(70 + di);
        c.causal = di == 1;
        acase_build(&c);
        poke(&c, &c.tq, c.qf, 0, NAN);
        poke(&c, &c.tq, c.qf, 3 * H * D + 4, INFINITY);
        poke(&c, &c.tk, c.kf, 3 * D + 5, INFINITY);
        poke(&c, &c.tk, c.kf, 6 * D + 1, -INFINITY);
        poke(&c, &c.tv, c.vf, 4 * Dv + 2, -INFINITY);
        poke(&c, &c.tv, c.vf, 5 * Dv + 7, NAN);
        /* the reference for batch 1 alone */
        size_t n1 = (size_t)(Sq * H * Dv), l1 = (size_t)(H * Sq);
        float *ref = xmalloc(n1 * sizeof(float)), ref_lse[2 * 9];
        qkv_tensor q1 = qkv_tensor_4d(c.qf + Sq * H * D, QKV_F32, 1, Sq, H, D);
        qkv_tensor k1 = qkv_tensor_4d(c.kf + Sk * D, QKV_F32, 1, Sk, 1, D);
        qkv_tensor v1 = qkv_tensor_4d(c.vf + Sk * Dv, QKV_F32, 1, Sk, 1, Dv);
        qkv_tensor o1 = qkv_tensor_4d(ref, QKV_F32, 1, Sq, H, Dv);
        CHECK(qkv_attention_reference(s.ref, &q1, &k1, &v1, &c.opts, &o1, ref_lse) == QKV_OK,
              "reference, batch 1: %s", qkv_ctx_last_error(s.ref));
        double atol, rtol, lse_atol;
        forward_tolerances(c.dt, &atol, &rtol, &lse_atol);
        for (int i = 0; i < s.n; i++) {
            tbuf out;
            acase_make_out(&c, &out, c.dt);
            float *lse = acase_make_lse(&c);
            qkv_status st = qkv_attention_forward(s.ctx[i], &c.tq, &c.tk, &c.tv, &c.opts, &out.t, lse);
            CHECK(st == QKV_OK, "%s %s: forward with NaN/inf inputs returned %d: %s", s.name[i],
                  dtype_name(c.dt), st, qkv_ctx_last_error(s.ctx[i]));
            if (st == QKV_OK) {
                float *got = acase_collect(&c, &out, lse, "non-finite inputs");
                char name[128];
                snprintf(name, sizeof name, "%s %s: batch 1 out next to a batch with NaN/inf",
                         s.name[i], dtype_name(c.dt));
                compare(name, got + n1, QKV_F32, ref, n1, atol, rtol);
                snprintf(name, sizeof name, "%s %s: batch 1 lse next to a batch with NaN/inf",
                         s.name[i], dtype_name(c.dt));
                compare(name, lse + l1, QKV_F32, ref_lse, l1, lse_atol, LSE_RTOL);
                free(got);
            }
            tbuf_free(&out);
            acase_free_lse(lse);
        }
        free(ref);
        acase_free(&c);
    }
    isas_close(&s);
}
