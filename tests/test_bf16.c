/*
 * test_bf16.c — the bf16 dot-product path of the kernel sets that have one:
 * "avx512bf16", "amx-emu" (AMX tiles emulated) and "amx" where it runs.
 *
 * With bf16 inputs and at least 16 query rows in a task, that kernel set
 * computes the scores with vdpbf16ps (exact products, fp32 sums), rounds
 * P = exp(S - m) to bf16 (round to nearest even) before P·V, and keeps the
 * softmax sum l (hence lse) from the unrounded P, as PyTorch's CPU flash
 * attention does for bf16. These tests hold that path to a bound derived
 * from those roundings instead of the generic bf16 tolerance:
 *
 *   |out - ref| <= 2^-8·ref_abs + 2^-8·|ref| + 1e-6   per element,
 *
 * where ref = attention(q, k, v) and ref_abs = attention(q, k, |v|) =
 * Σ_j p_ij·|v_jc| / l_i, both from qkv_attention_reference (double) on the
 * same bf16-rounded inputs. bf16 keeps 8 significant bits, so rounding to
 * nearest moves a value by at most 2^-8 of itself (half an ulp: between
 * 2^-9 and 2^-8 relative, depending on where in its binade it lies):
 * rounding P moves out by at most 2^-8·ref_abs, rounding out to bf16 by at
 * most 2^-8·|out|. The bound is those two worst cases at once; the fp32
 * sums add ~1e-7 relative. Random inputs reach about 3/4 of it (the worst
 * element is printed; the fp32 kernels, which only round out, reach 1/2).
 * lse must match the reference to atol 1e-4, rtol 2e-6 like every other
 * kernel.
 *
 * Each case also runs on the "avx512" kernel set (fp32 dot products, same
 * bf16 output): the bf16 path's largest error must stay below
 * 3·(the fp32 kernels' largest error) + 2^-8·max(ref_abs), and the tests
 * print both, which is the accuracy this path trades for speed.
 *
 * On a CPU without avx512bf16 every test checks that the kernel set is
 * refused (QKV_ERR_UNSUPPORTED) and says it skipped.
 */
#include "test.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void test_bf16_rounding(void);
void test_bf16_shapes(void);
void test_bf16_options(void);
void test_bf16_empty_rows(void);
void test_bf16_large_values(void);
void test_bf16_threads(void);

#define REL_BOUND (1.0 / 256)   /* 2^-8 */
#define ABS_BOUND 1e-6
/* the kernel set under test (see on_bf16_sets) */
static const char *BF = "avx512bf16";
static char BF_OUT[32] = "avx512bf16 out";

#define LSE_ATOL 1e-4
#define LSE_RTOL 2e-6

/* 1 when this CPU runs avx512bf16. Otherwise checks that a context refuses
   it and keeps its kernel set, notes the skip, and returns 0. */
static int bf16_available(const char *test)
{
    int listed = 0;
    for (int i = 0; qkv_isa_name(i); i++)
        listed += strcmp(qkv_isa_name(i), "avx512bf16") == 0;
    CHECK(listed == 1, "qkv_isa_name lists \"avx512bf16\" %d times, want once", listed);
    if (qkv_isa_supported("avx512bf16"))
        return 1;
    qkv_ctx *ctx = qkv_ctx_create(1);
    CHECK(ctx != NULL, "qkv_ctx_create(1)");
    if (ctx) {
        char before[64];
        snprintf(before, sizeof before, "%s", qkv_ctx_isa(ctx));
        qkv_status st = qkv_ctx_set_isa(ctx, "avx512bf16");
        CHECK(st == QKV_ERR_UNSUPPORTED, "set_isa(avx512bf16) on a CPU without it = %d, want %d",
              st, QKV_ERR_UNSUPPORTED);
        CHECK(strcmp(qkv_ctx_isa(ctx), before) == 0, "a refused set_isa changed the kernel set "
              "from %s to %s", before, qkv_ctx_isa(ctx));
        CHECK(qkv_ctx_last_error(ctx)[0] != '\0', "a refused set_isa left no message");
        qkv_ctx_free(ctx);
    }
    t_note("%s: skipped, this CPU lacks avx512bf16 (checked that it is refused)", test);
    return 0;
}

static qkv_ctx *ctx_isa(int n_threads, const char *isa)
{
    qkv_ctx *ctx = qkv_ctx_create(n_threads);
    CHECK(ctx != NULL, "qkv_ctx_create(%d)", n_threads);
    if (!ctx)
        exit(2);
    qkv_status st = qkv_ctx_set_isa(ctx, isa);
    CHECK(st == QKV_OK, "qkv_ctx_set_isa(%s) = %d: %s", isa, st, qkv_ctx_last_error(ctx));
    return ctx;
}

typedef struct {
    qkv_ctx *bf, *f32, *ref;   /* avx512bf16, avx512, reference */
    /* largest values since the last report() */
    double err_bf, err_f32, err_lse;
    double ratio, ratio_f32;   /* largest error / per-element bound, bf16 path and fp32 kernels */
    int cases, differ;   /* cases; cases where bf16 and fp32 kernels' outputs differ */
} suite;

static void suite_open(suite *s)
{
    memset(s, 0, sizeof *s);
    s->bf = ctx_isa(0, BF);
    s->f32 = ctx_isa(0, "avx512");
    s->ref = qkv_ctx_create(0);
    CHECK(s->ref != NULL, "qkv_ctx_create(0)");
}

static void suite_close(suite *s)
{
    t_note("%s: %d cases (%d where the bf16 path's out differs from the fp32 kernels')", BF,
           s->cases, s->differ);
    t_note("max |out - ref|: bf16 path %.3e, fp32 kernels %.3e; max |lse - ref| %.2e",
           s->err_bf, s->err_f32, s->err_lse);
    t_note("worst element at %.2f of the bound (the fp32 kernels' at %.2f)", s->ratio,
           s->ratio_f32);
    qkv_ctx_free(s->bf);
    qkv_ctx_free(s->f32);
    qkv_ctx_free(s->ref);
}

/* The reference for c, with |v| in place of v when abs_v: out [B,Sq,Hq,Dv]
   and lse [B,Hq,Sq], unused varlen rows zero. */
static void reference(qkv_ctx *ctx, const acase *c, int abs_v, float *out, float *lse)
{
    size_t nv = (size_t)(c->B * c->Sk * c->Hkv * c->Dv);
    float *v = c->vf;
    if (abs_v) {
        v = xmalloc(nv * sizeof(float));
        for (size_t x = 0; x < nv; x++)
            v[x] = fabsf(c->vf[x]);
    }
    qkv_tensor tq = qkv_tensor_4d(c->qf, QKV_F32, c->B, c->Sq, c->Hq, c->D);
    qkv_tensor tk = qkv_tensor_4d(c->kf, QKV_F32, c->B, c->Sk, c->Hkv, c->D);
    qkv_tensor tv = qkv_tensor_4d(v, QKV_F32, c->B, c->Sk, c->Hkv, c->Dv);
    qkv_tensor to = qkv_tensor_4d(out, QKV_F32, c->B, c->Sq, c->Hq, c->Dv);
    memset(out, 0, c->n_out * sizeof(float));
    memset(lse, 0, c->n_lse * sizeof(float));
    qkv_status st = qkv_attention_reference(ctx, &tq, &tk, &tv, &c->opts, &to, lse);
    CHECK(st == QKV_OK, "reference returned %d: %s [%s]", st, qkv_ctx_last_error(ctx),
          acase_str(c));
    acase_zero_unused(c, out, lse);
    if (abs_v)
        free(v);
}

/* Forward on ctx: the logical out as fp32 (unused rows zero) and a copy of
   lse in *lse_out; NULL (and *lse_out NULL) when the call failed. */
static float *forward(qkv_ctx *ctx, const acase *c, float **lse_out, const char *label)
{
    tbuf out;
    acase_make_out(c, &out, c->dt);
    float *lse = acase_make_lse(c), *got = NULL;
    *lse_out = NULL;
    qkv_status st = qkv_attention_forward(ctx, &c->tq, &c->tk, &c->tv, &c->opts, &out.t, lse);
    CHECK(st == QKV_OK, "%s: forward returned %d (%s): %s [%s]", label, st,
          qkv_status_string(st), qkv_ctx_last_error(ctx), acase_str(c));
    if (st == QKV_OK) {
        got = acase_collect(c, &out, lse, label);
        *lse_out = xmalloc(c->n_lse * sizeof(float));
        memcpy(*lse_out, lse, c->n_lse * sizeof(float));
    }
    tbuf_free(&out);
    acase_free_lse(lse);
    return got;
}

static double max_abs_diff(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t x = 0; x < n; x++) {
        double d = isfinite(a[x]) ? fabs((double)a[x] - b[x]) : INFINITY;
        if (!(d <= m))
            m = d;
    }
    return m;
}

/* Largest |got - ref| / bound over the elements (inf for a non-finite got);
   *wi: where. */
static double bound_ratio(size_t n, const float *got, const float *ref, const float *ref_abs,
                          size_t *wi, size_t *bad)
{
    double wr = -1;
    *wi = *bad = 0;
    for (size_t x = 0; x < n; x++) {
        double g = got[x], r = ref[x];
        double err = isfinite(g) ? fabs(g - r) : INFINITY;
        double ratio = err / (REL_BOUND * ref_abs[x] + REL_BOUND * fabs(r) + ABS_BOUND);
        *bad += !(ratio <= 1.0);
        if (!(ratio <= wr)) {
            wr = ratio;
            *wi = x;
        }
    }
    return wr;
}

/* One CHECK of the per-element bound; returns max |got - ref| and raises
   *worst to the largest error / bound seen. */
static double check_bound(const char *label, const acase *c, const float *got,
                          const float *ref, const float *ref_abs, double *worst)
{
    size_t bad, wi;
    double wr = bound_ratio(c->n_out, got, ref, ref_abs, &wi, &bad);
    if (c->n_out) {
        const int64_t e = (int64_t)wi % c->Dv, h = (int64_t)wi / c->Dv % c->Hq;
        const int64_t i = (int64_t)wi / (c->Dv * c->Hq) % c->Sq;
        const int64_t b = (int64_t)wi / (c->Dv * c->Hq * c->Sq);
        CHECK(bad == 0, "%s: %zu of %zu elements break |out - ref| <= 2^-8 ref_abs + 2^-8 |ref| "
              "+ 1e-6; worst [b%lld i%lld h%lld c%lld]: got %.9g ref %.9g ref_abs %.9g "
              "(%.2f times the bound) [%s]", label, bad, c->n_out, (long long)b, (long long)i,
              (long long)h, (long long)e, (double)got[wi], (double)ref[wi], (double)ref_abs[wi],
              wr, acase_str(c));
    }
    if (wr > *worst)
        *worst = wr;
    return max_abs_diff(got, ref, c->n_out);
}

/* Builds c (already configured), runs the bf16 path and the fp32 kernels,
   checks the bound, lse, rows that see no key (exactly 0 and -inf) and the
   ratio to the fp32 kernels' error. Frees c. Returns the number of
   (b, h, i) rows that see no key. */
static size_t run_case(suite *s, acase *c)
{
    acase_build(c);
    float *ref = xmalloc(c->n_out * sizeof(float)), *ref_abs = xmalloc(c->n_out * sizeof(float));
    float *ref_lse = xmalloc(c->n_lse * sizeof(float));
    float *abs_lse = xmalloc(c->n_lse * sizeof(float));
    reference(s->ref, c, 0, ref, ref_lse);
    reference(s->ref, c, 1, ref_abs, abs_lse);
    size_t empty = 0;
    for (size_t x = 0; x < c->n_lse; x++)
        empty += ref_lse[x] == -INFINITY;

    float *lse_bf, *lse_f32;
    float *bf = forward(s->bf, c, &lse_bf, BF);
    float *f32 = forward(s->f32, c, &lse_f32, "avx512");
    if (bf && f32) {
        double e_bf = check_bound(BF_OUT, c, bf, ref, ref_abs, &s->ratio);
        double e_f32 = max_abs_diff(f32, ref, c->n_out);
        size_t wi, bad;
        double r_f32 = bound_ratio(c->n_out, f32, ref, ref_abs, &wi, &bad);
        if (r_f32 > s->ratio_f32)
            s->ratio_f32 = r_f32;
        char name[700];
        snprintf(name, sizeof name, "%s lse [%s]", BF, acase_str(c));
        double e_lse = compare(name, lse_bf, QKV_F32, ref_lse, c->n_lse, LSE_ATOL, LSE_RTOL);

        /* rows that see no key: exactly 0 and lse -inf (compare() already
           requires the -inf) */
        size_t bad_empty = 0;
        for (int64_t b = 0; b < c->B; b++)
            for (int64_t h = 0; h < c->Hq; h++)
                for (int64_t i = 0; i < c->Sq; i++) {
                    if (ref_lse[(b * c->Hq + h) * c->Sq + i] != -INFINITY)
                        continue;
                    const float *o = bf + ((b * c->Sq + i) * c->Hq + h) * c->Dv;
                    for (int64_t e = 0; e < c->Dv; e++)
                        bad_empty += o[e] != 0.0f;
                }
        CHECK(bad_empty == 0, "%s: %zu elements of rows that see no key are not "
              "exactly 0 [%s]", BF, bad_empty, acase_str(c));

        double amax = 0;
        for (size_t x = 0; x < c->n_out; x++)
            if (ref_abs[x] > amax)
                amax = ref_abs[x];
        CHECK(e_bf <= 3 * e_f32 + REL_BOUND * amax,
              "%s max error %.3e is not in the class of the fp32 kernels' %.3e "
              "(limit 3x + 2^-8 max ref_abs = %.3e) [%s]", BF, e_bf, e_f32,
              3 * e_f32 + REL_BOUND * amax, acase_str(c));

        s->cases++;
        s->differ += memcmp(bf, f32, c->n_out * sizeof(float)) != 0;
        if (e_bf > s->err_bf) s->err_bf = e_bf;
        if (e_f32 > s->err_f32) s->err_f32 = e_f32;
        if (e_lse > s->err_lse) s->err_lse = e_lse;
    }
    free(bf); free(f32); free(lse_bf); free(lse_f32);
    free(ref); free(ref_abs); free(ref_lse); free(abs_lse);
    acase_free(c);
    return empty;
}

/* Scores of standard deviation about 10 (|s| up to about 40) instead of
   about 1/3: q·k of D products of uniform [-1, 1] values has deviation
   sqrt(D)/3. */
static float big_scale(int64_t D) { return (float)(30.0 / sqrt((double)D)); }

/* ---- P is rounded to bf16, l is not ---------------------------------------- */

static uint16_t bf16_of(float x)
{
    uint16_t h;
    qkv_convert(&x, QKV_F32, &h, QKV_BF16, 1);
    return h;
}

static float f32_of_bf16(uint16_t h)
{
    float x;
    qkv_convert(&h, QKV_BF16, &x, QKV_F32, 1);
    return x;
}

/*
 * Scores chosen so that rounding P shows in a bf16 output. D = Dv = 2,
 * scale 1, every query (1, 0), 64 keys per kv head:
 *   kv head 0: key 0 score 0 (P = 1), v (-1, 1); key 1 score x0 = -3·2^-10,
 *              P = e^x0 = 1 - 0.75·2^-8, which rounds to 1 - 2^-8, v (1, 1)
 *   kv head 1: the same with x1 = -2^-10, e^x1 = 1 - 0.25·2^-8, rounding to 1
 *   kv head 2: key 0 score 0, keys 1..63 score x0, v (1, 0)
 *   other keys of heads 0 and 1 score -200 (P = 0), v 0.
 * Then out[0] of head 0 is -2^-8/(1 + e^x0) (-0.75·2^-8/(1 + e^x0) without
 * rounding P, 25% away), out[0] of head 1 is exactly 0 (rounding to
 * nearest; truncation would give -2^-8/(1 + e^x1)), out[1] is 1, and lse
 * is log(l) of the unrounded P: log(1 + e^x0), log(1 + e^x1),
 * log(1 + 63·e^x0) (a sum of rounded P would be off by 5e-4 and 1e-3).
 */
static void rounding_case(qkv_ctx *ctx, int64_t Sq, int64_t group, int expect_bf16)
{
    const int64_t Sk = 64, Hkv = 3, Hq = Hkv * group;
    const double x0 = -3.0 / 1024, x1 = -1.0 / 1024;
    size_t nq = (size_t)(Sq * Hq * 2), nk = (size_t)(Sk * Hkv * 2), no = nq;
    float *qf = xmalloc(nq * 4), *kf = xmalloc(nk * 4), *vf = xmalloc(nk * 4);
    for (size_t x = 0; x < nq; x++)
        qf[x] = x % 2 ? 0.0f : 1.0f;
    for (int64_t j = 0; j < Sk; j++)
        for (int64_t h = 0; h < Hkv; h++) {
            float *kk = kf + (j * Hkv + h) * 2, *vv = vf + (j * Hkv + h) * 2;
            kk[1] = 0;
            if (h < 2) {
                kk[0] = j == 0 ? 0.0f : j == 1 ? (float)(h == 0 ? x0 : x1) : -200.0f;
                vv[0] = j == 0 ? -1.0f : j == 1 ? 1.0f : 0.0f;
                vv[1] = j < 2 ? 1.0f : 0.0f;
            } else {
                kk[0] = j == 0 ? 0.0f : (float)x0;
                vv[0] = 1;
                vv[1] = 0;
            }
        }
    uint16_t *q = xmalloc(nq * 2), *k = xmalloc(nk * 2), *v = xmalloc(nk * 2), *o = xmalloc(no * 2);
    qkv_convert(qf, QKV_F32, q, QKV_BF16, nq);
    qkv_convert(kf, QKV_F32, k, QKV_BF16, nk);
    qkv_convert(vf, QKV_F32, v, QKV_BF16, nk);
    qkv_tensor tq = qkv_tensor_4d(q, QKV_BF16, 1, Sq, Hq, 2);
    qkv_tensor tk = qkv_tensor_4d(k, QKV_BF16, 1, Sk, Hkv, 2);
    qkv_tensor tv = qkv_tensor_4d(v, QKV_BF16, 1, Sk, Hkv, 2);
    qkv_tensor to = qkv_tensor_4d(o, QKV_BF16, 1, Sq, Hq, 2);
    qkv_attn_opts opts = qkv_attn_opts_default();
    opts.scale = 1.0f;
    float *lse = xmalloc((size_t)(Hq * Sq) * 4);
    qkv_status st = qkv_attention_forward(ctx, &tq, &tk, &tv, &opts, &to, lse);
    CHECK(st == QKV_OK, "rounding case: forward returned %d: %s", st, qkv_ctx_last_error(ctx));

    const double e0 = exp(x0), e1 = exp(x1);
    const double p_bf[2] = { 1 - 1.0 / 256, 1.0 };        /* bf16(e^x0), bf16(e^x1) */
    const double p_ex[2] = { e0, e1 };
    const double want_lse[3] = { log(1 + e0), log(1 + e1), log(1 + 63 * e0) };
    size_t bad_bf = 0, bad_ex = 0, bad_lse = 0, bad_other = 0;
    for (int64_t i = 0; st == QKV_OK && i < Sq; i++)
        for (int64_t h = 0; h < Hq; h++) {
            const int64_t hk = h / group;
            const float got0 = f32_of_bf16(o[(i * Hq + h) * 2]);
            const float got1 = f32_of_bf16(o[(i * Hq + h) * 2 + 1]);
            bad_lse += !(fabs(lse[h * Sq + i] - want_lse[hk]) <= 1e-5);
            if (hk == 2) {   /* out = (1, 0) up to rounding */
                bad_other += got0 != 1.0f || got1 != 0.0f;
                continue;
            }
            bad_other += got1 != 1.0f;
            /* out[0] with P rounded (bf) and exact (ex), each rounded to bf16 */
            double w_bf = f32_of_bf16(bf16_of((float)((p_bf[hk] - 1) / (1 + p_ex[hk]))));
            double w_ex = f32_of_bf16(bf16_of((float)((p_ex[hk] - 1) / (1 + p_ex[hk]))));
            bad_bf += !(fabs(got0 - w_bf) <= fabs(w_bf) / 128);   /* one bf16 ulp */
            bad_ex += !(fabs(got0 - w_ex) <= fabs(w_ex) / 128);
        }
    const size_t rows = (size_t)(Sq * 2 * group);
    if (expect_bf16) {
        CHECK(bad_bf == 0, "Sq %lld group %lld: %zu of %zu outputs are not those of P rounded to "
              "bf16 (nearest even) before P.V; %zu match unrounded P", (long long)Sq,
              (long long)group, bad_bf, rows, rows - bad_ex);
        CHECK(bad_lse == 0, "Sq %lld group %lld: %zu of %zu lse are not log of the unrounded sum",
              (long long)Sq, (long long)group, bad_lse, (size_t)(Sq * Hq));
    } else {
        /* fewer than 16 rows: the path is the kernel set's choice, but it
           must be one of the two, with the exact lse */
        CHECK(bad_bf == 0 || bad_ex == 0, "Sq %lld group %lld: outputs match neither P rounded "
              "to bf16 (%zu off) nor unrounded P (%zu off)", (long long)Sq, (long long)group,
              bad_bf, bad_ex);
        CHECK(bad_lse == 0, "Sq %lld group %lld: %zu lse are not log of the unrounded sum",
              (long long)Sq, (long long)group, bad_lse);
        t_note("Sq %lld, group %lld (%lld rows): %s", (long long)Sq, (long long)group,
               (long long)(Sq * group), bad_bf == 0 ? "P rounded to bf16" : "fp32 P (fp32 path)");
    }
    CHECK(bad_other == 0, "Sq %lld group %lld: %zu outputs that are 1 or 0 up to rounding are not",
          (long long)Sq, (long long)group, bad_other);
    free(qf); free(kf); free(vf); free(q); free(k); free(v); free(o); free(lse);
}

static void bf16_rounding(void)
{
    if (!bf16_available("bf16_rounding"))
        return;
    for (int threads = 1; threads <= 2; threads++) {
        qkv_ctx *ctx = ctx_isa(threads, BF);
        rounding_case(ctx, 16, 1, 1);    /* 16 query rows */
        rounding_case(ctx, 40, 1, 1);
        rounding_case(ctx, 1, 16, 1);    /* 16 query heads on one kv head */
        rounding_case(ctx, 2, 8, 1);
        rounding_case(ctx, 5, 4, 1);     /* 20 rows */
        if (threads == 1) {
            rounding_case(ctx, 15, 1, 0);
            rounding_case(ctx, 1, 8, 0);
        }
        qkv_ctx_free(ctx);
    }
}

/* ---- shape classes --------------------------------------------------------- */

static void bf16_shapes(void)
{
    if (!bf16_available("bf16_shapes"))
        return;
    static const int64_t shapes[][7] = {   /* B, Sq, Sk, Hq, Hkv, D, Dv */
        { 1, 31, 129, 2, 1, 2, 2 },        /* head dims */
        { 1, 16, 17, 2, 2, 7, 7 },
        { 2, 64, 255, 2, 1, 16, 16 },
        { 1, 65, 300, 2, 2, 40, 40 },
        { 1, 200, 129, 1, 1, 64, 64 },
        { 1, 31, 255, 2, 1, 80, 80 },
        { 1, 64, 129, 2, 2, 128, 128 },
        { 1, 16, 300, 1, 1, 256, 256 },
        { 1, 31, 129, 2, 1, 64, 48 },      /* Dv != D */
        { 1, 65, 17, 2, 1, 64, 7 },
        { 2, 31, 255, 2, 1, 7, 64 },
        { 1, 16, 1, 2, 1, 64, 64 },        /* one key */
        { 1, 64, 1, 1, 1, 7, 16 },
        { 1, 16, 2, 1, 1, 16, 16 },
        { 1, 8, 129, 4, 2, 64, 64 },       /* GQA groups: 2, 4, 8, 16 */
        { 1, 4, 255, 8, 2, 40, 40 },
        { 2, 2, 300, 8, 1, 16, 16 },
        { 1, 1, 129, 16, 1, 64, 64 },
        { 1, 3, 17, 32, 2, 7, 7 },
        { 1, 17, 31, 16, 1, 16, 24 },
        { 1, 2, 67, 80, 1, 16, 16 },       /* a group wider than a tile */
    };
    suite s;
    suite_open(&s);
    uint64_t seed = 1000;
    for (size_t x = 0; x < sizeof shapes / sizeof shapes[0]; x++)
        for (int causal = 0; causal < 2; causal++)
            for (int big = 0; big < 2; big++) {
                if (t_quick && (causal + big + (int)x) % 2)
                    continue;
                const int64_t *z = shapes[x];
                acase c;
                acase_init(&c, z[0], z[1], z[2], z[3], z[4], z[5], z[6], QKV_BF16);
                c.causal = causal;
                if (big)
                    c.scale = big_scale(c.D);
                c.seed = seed++;
                run_case(&s, &c);
            }
    CHECK(s.differ * 2 > s.cases, "the bf16 path's out equals the fp32 kernels' in %d of %d cases: "
          "is the bf16 path running?", s.cases - s.differ, s.cases);
    suite_close(&s);
}

/* ---- options and layouts --------------------------------------------------- */

static void bf16_options(void)
{
    if (!bf16_available("bf16_options"))
        return;
    suite s;
    suite_open(&s);
    rng r = rng_seed(77);
    uint64_t seed = 2000;
    for (int big = 0; big < 2; big++) {
        for (int t = 0; t < 14; t++) {
            if (t_quick && (t + big) % 2)
                continue;
            acase c;
            acase_init(&c, 2, 37, 129, 4, 2, 40, 24, QKV_BF16);
            switch (t) {
            case 0: c.causal = 1; c.Sq = 100; c.Sk = 67; break;         /* Sq > Sk */
            case 1: c.wl = 16; c.wr = 0; break;
            case 2: c.wl = 5; c.wr = 40; c.Sk = 300; break;
            case 3: c.causal = 1; c.wl = 3; c.Sq = 129; break;
            case 4: c.alibi = 1; break;
            case 5: c.alibi = 1; c.causal = 1; c.Sk = 255; c.D = 64; c.Dv = 64; break;
            case 6: c.softcap = 2.0f; break;
            case 7: c.softcap = 30.0f; c.D = 7; break;
            case 8: c.bias = BIAS_FULL; c.bias_neg_row = 1; break;
            case 9: c.bias = (int)rng_int(&r, BIAS_B1, BIAS_COUNT - 1); c.causal = 1; break;
            case 10: c.causal = 1; c.wl = 20; c.wr = 2; c.alibi = 1; c.softcap = 5.0f;
                     c.bias = BIAS_H1; break;
            case 11: c.Hq = 8; acase_random_varlen(&c, &r, 5, 80); break;
            case 12: c.Hq = 8; acase_random_varlen(&c, &r, 6, 70); c.causal = 1; c.wl = 9;
                     c.alibi = 1; break;
            default: c.Hq = 16; c.Hkv = 1; c.D = 7; acase_random_varlen(&c, &r, 8, 40);
                     c.softcap = 3.0f; break;
            }
            if (big)
                c.scale = big_scale(c.D);
            c.seed = seed++;
            run_case(&s, &c);
        }
        /* every layout for K and V (inner stride 2 and -1 force the
           gathers), q and out rotating, even and odd D */
        for (int L = 0; L < LAY_COUNT; L++)
            for (int odd = 0; odd < 2; odd++) {
                if (t_quick && (L + odd + big) % 2)
                    continue;
                acase c;
                acase_init(&c, 2, 33, 131, 4, 2, odd ? 7 : 40, odd ? 40 : 7, QKV_BF16);
                c.lay_k = L;
                c.lay_v = (L + odd) % LAY_COUNT;
                c.lay_q = (L + 2) % LAY_COUNT;
                c.lay_o = (L + 1) % LAY_BCAST;
                c.causal = odd;
                if (big)
                    c.scale = big_scale(c.D);
                c.seed = seed++;
                run_case(&s, &c);
            }
        /* q, k, v slices of one packed [B, S, 3, H, D] buffer */
        for (int odd = 0; odd < 2; odd++) {
            acase c;
            acase_init(&c, 2, 67, 67, 2, 2, odd ? 7 : 64, odd ? 7 : 64, QKV_BF16);
            c.packed = 1;
            c.causal = !odd;
            c.lay_o = odd ? LAY_PAD : LAY_CONTIG;
            if (big)
                c.scale = big_scale(c.D);
            c.seed = seed++;
            run_case(&s, &c);
        }
    }
    CHECK(s.differ * 2 > s.cases, "the bf16 path's out equals the fp32 kernels' in %d of %d cases: "
          "is the bf16 path running?", s.cases - s.differ, s.cases);
    suite_close(&s);
}

/* ---- rows that see no key --------------------------------------------------- */

static void bf16_empty_rows(void)
{
    if (!bf16_available("bf16_empty_rows"))
        return;
    suite s;
    suite_open(&s);
    for (int t = 0; t < 6; t++) {
        acase c;
        acase_init(&c, 2, 40, 17, 4, 2, 34, 20, QKV_BF16);
        c.seed = (uint64_t)(3000 + t);
        const char *what = "";
        switch (t) {
        case 0: c.causal = 1; what = "causal Sq > Sk"; break;
        case 1: c.wl = 0; c.wr = 0; what = "window (0,0) Sq > Sk"; break;
        case 2: c.wr = 2; c.Hq = 32; c.Hkv = 2; c.Sq = 30; what = "window (-1,2), group 16"; break;
        case 3: c.bias = BIAS_B1; c.bias_neg_row = 1; c.Sk = 129; what = "-inf bias row"; break;
        case 4: c.wl = 2; c.causal = 1; c.alibi = 1; c.Sq = 64; what = "causal + window"; break;
        default: {   /* a sequence with queries but no keys */
            what = "varlen sequence with no keys";
            int32_t q[4] = { 1, 10, 45, 60 }, k[4] = { 0, 7, 7, 17 };
            c.B = 1; c.Sq = 62; c.n_seqs = 3;
            memcpy(c.cu_q, q, sizeof q);
            memcpy(c.cu_k, k, sizeof k);
            break;
        }
        }
        size_t empty = run_case(&s, &c);
        CHECK(empty > 0, "%s: the case was meant to have rows that see no key", what);
    }
    suite_close(&s);
}

/* ---- values near the top of the bf16 range ----------------------------------- */

/* Multiplies every element of tb by 2^e (exact in bf16 unless it leaves the
   normal range; tiny results become 0) and refreshes the logical copy. */
static void rescale(tbuf *tb, float **logical, int e)
{
    size_t n = tb->bytes / 2;
    float *f = to_f32(tb->buf, QKV_BF16, n);
    for (size_t x = 0; x < n; x++) {
        f[x] = ldexpf(f[x], e);
        if (fabsf(f[x]) < FLT_MIN)
            f[x] = 0.0f;
    }
    qkv_convert(f, QKV_F32, tb->buf, QKV_BF16, n);
    free(f);
    const qkv_tensor *t = &tb->t;
    size_t m = (size_t)(t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3]);
    uint16_t *raw = xmalloc(m * 2);
    view_gather(t, raw);
    free(*logical);
    *logical = to_f32(raw, QKV_BF16, m);
    free(raw);
}

/* q, k, v scaled by 2^eq, 2^ek, 2^ev (scale compensating q·k): inputs up to
   about 2^127 = 1.7e38 (bf16's largest finite value is 3.4e38) whose scores
   are ordinary, and v as large as an fp32 accumulator of up to Sk weights
   <= 1 allows. Outputs must be finite and within the bound. */
static void bf16_large_values(void)
{
    if (!bf16_available("bf16_large_values"))
        return;
    static const int es[][3] = {   /* eq, ek, ev */
        { 127, -100, 0 }, { -100, 127, 0 }, { 60, -60, 118 }, { 0, 0, 118 },
        { 126, -110, 110 }, { 100, -100, 100 },
    };
    suite s;
    suite_open(&s);
    for (size_t x = 0; x < sizeof es / sizeof es[0]; x++)
        for (int v = 0; v < 2; v++) {
            if (t_quick && ((int)x + v) % 2)
                continue;
            acase c;
            if (v)
                acase_init(&c, 1, 33, 255, 8, 2, 64, 64, QKV_BF16);
            else
                acase_init(&c, 2, 40, 300, 2, 1, 7, 16, QKV_BF16);
            c.causal = v;
            c.lay_k = v ? LAY_INNER2 : LAY_CONTIG;
            c.seed = 4000 + x * 2 + (uint64_t)v;
            acase_build(&c);
            rescale(&c.q, &c.qf, es[x][0]);
            rescale(&c.k, &c.kf, es[x][1]);
            rescale(&c.v, &c.vf, es[x][2]);
            /* the same scores as unscaled inputs, twice the default scale */
            c.opts.scale = ldexpf((float)(2.0 / sqrt((double)c.D)), -(es[x][0] + es[x][1]));
            float *ref = xmalloc(c.n_out * 4), *ref_abs = xmalloc(c.n_out * 4);
            float *ref_lse = xmalloc(c.n_lse * 4), *abs_lse = xmalloc(c.n_lse * 4);
            reference(s.ref, &c, 0, ref, ref_lse);
            reference(s.ref, &c, 1, ref_abs, abs_lse);
            float *lse;
            float *got = forward(s.bf, &c, &lse, BF);
            if (got) {
                size_t nonfinite = 0;
                for (size_t y = 0; y < c.n_out; y++)
                    nonfinite += !isfinite(got[y]);
                for (size_t y = 0; y < c.n_lse; y++)
                    nonfinite += !isfinite(lse[y]);
                CHECK(nonfinite == 0, "q x2^%d, k x2^%d, v x2^%d: %zu non-finite values in out "
                      "and lse [%s]", es[x][0], es[x][1], es[x][2], nonfinite, acase_str(&c));
                char name[700];
                snprintf(name, sizeof name, "q x2^%d, k x2^%d, v x2^%d", es[x][0], es[x][1],
                         es[x][2]);
                check_bound(name, &c, got, ref, ref_abs, &s.ratio);
                compare(name, lse, QKV_F32, ref_lse, c.n_lse, LSE_ATOL, LSE_RTOL);
                s.cases++;
            }
            free(got); free(lse);
            free(ref); free(ref_abs); free(ref_lse); free(abs_lse);
            acase_free(&c);
        }
    t_note("%s: %d cases, worst element at %.2f of the bound", BF, s.cases, s.ratio);
    qkv_ctx_free(s.bf);
    qkv_ctx_free(s.f32);
    qkv_ctx_free(s.ref);
}

/* ---- thread counts ------------------------------------------------------- */

/* Contexts of 1, 2 and 3 threads (and a second call on the 3-thread one):
   out and lse bitwise identical on the bf16 path. */
static void bf16_threads(void)
{
    if (!bf16_available("bf16_threads"))
        return;
    qkv_ctx *ctx[3];
    for (int t = 0; t < 3; t++) {
        ctx[t] = ctx_isa(t + 1, BF);
        CHECK(qkv_ctx_threads(ctx[t]) == t + 1, "qkv_ctx_threads = %d, want %d",
              qkv_ctx_threads(ctx[t]), t + 1);
    }
    rng r = rng_seed(5150);
    for (int k = 0; k < 5; k++) {
        acase c;
        switch (k) {
        case 0: acase_init(&c, 2, 200, 300, 4, 2, 64, 64, QKV_BF16); c.causal = 1; break;
        case 1: acase_init(&c, 1, 3, 1500, 32, 2, 128, 128, QKV_BF16); c.alibi = 1; break;
        case 2: acase_init(&c, 1, 1, 1, 8, 2, 40, 24, QKV_BF16);
                acase_random_varlen(&c, &r, 6, 120); c.wl = 20; c.wr = 3; break;
        case 3: acase_init(&c, 2, 100, 257, 6, 3, 7, 33, QKV_BF16);
                c.lay_k = LAY_INNER2; c.lay_v = LAY_REVD; c.bias = BIAS_H1; break;
        default: acase_init(&c, 1, 129, 129, 4, 4, 80, 80, QKV_BF16); c.packed = 1;
                 c.softcap = 3.0f; c.scale = big_scale(80); break;
        }
        c.seed = 5000 + (uint64_t)k;
        acase_build(&c);
        float *out[4], *lse[4];
        for (int t = 0; t < 4; t++)
            out[t] = forward(ctx[t < 3 ? t : 2], &c, &lse[t], "threads");
        for (int t = 1; t < 4 && out[0]; t++) {
            if (!out[t])
                continue;
            const char *again = t == 3 ? " (second call)" : "";
            CHECK(memcmp(out[0], out[t], c.n_out * sizeof(float)) == 0,
                  "out differs between 1 and %d threads%s [%s]", t < 3 ? t + 1 : 3, again,
                  acase_str(&c));
            CHECK(memcmp(lse[0], lse[t], c.n_lse * sizeof(float)) == 0,
                  "lse differs between 1 and %d threads%s [%s]", t < 3 ? t + 1 : 3, again,
                  acase_str(&c));
        }
        for (int t = 0; t < 4; t++) {
            free(out[t]);
            free(lse[t]);
        }
        acase_free(&c);
    }
    for (int t = 0; t < 3; t++)
        qkv_ctx_free(ctx[t]);
}

/* Each test runs on every kernel set with the bf16 dot path: avx512bf16
   (and its refusal where the CPU lacks it), amx-emu and amx where they
   run. */
static void on_bf16_sets(void (*fn)(void))
{
    static const char *const sets[3] = { "avx512bf16", "amx-emu", "amx" };
    for (int i = 0; i < 3; i++) {
        if (i > 0 && !qkv_isa_supported(sets[i]))
            continue;
        BF = sets[i];
        snprintf(BF_OUT, sizeof BF_OUT, "%s out", BF);
        fn();
    }
}

void test_bf16_rounding(void) { on_bf16_sets(bf16_rounding); }
void test_bf16_shapes(void) { on_bf16_sets(bf16_shapes); }
void test_bf16_options(void) { on_bf16_sets(bf16_options); }
void test_bf16_empty_rows(void) { on_bf16_sets(bf16_empty_rows); }
void test_bf16_large_values(void) { on_bf16_sets(bf16_large_values); }
void test_bf16_threads(void) { on_bf16_sets(bf16_threads); }
