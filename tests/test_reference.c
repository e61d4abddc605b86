/*
 * test_reference.c — qkv_attention_reference against an independent oracle.
 *
 * naive() below is written from the definition in qkv.h alone: for each
 * sequence and head it materializes the whole [Sq][Sk] score matrix in
 * double, applies softcap, ALiBi, bias and the visibility rule in the order
 * qkv.h states, and takes an exact softmax. It is only for tiny shapes.
 * The closed-form checks do not depend on either implementation.
 */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* q, k, v: logical row-major fp32 [B,Sq,Hq,D], [B,Sk,Hkv,D], [B,Sk,Hkv,Dv].
   Writes out [B,Sq,Hq,Dv] and lse [B,Hq,Sq] for rows inside a sequence. */
static void naive(const acase *c, const qkv_attn_opts *o, float *out, float *lse)
{
    const int64_t Hq = c->Hq, Hkv = c->Hkv, D = c->D, Dv = c->Dv;
    const int varlen = o->cu_seqlens_q != NULL;
    const int nseq = varlen ? o->n_seqs : (int)c->B;
    const double scale = o->scale != 0 ? (double)o->scale : 1.0 / sqrt((double)D);
    for (int s = 0; s < nseq; s++) {
        int64_t b = varlen ? 0 : s;
        int64_t q0 = varlen ? o->cu_seqlens_q[s] : 0, k0 = varlen ? o->cu_seqlens_k[s] : 0;
        int64_t sq = varlen ? o->cu_seqlens_q[s + 1] - q0 : c->Sq;
        int64_t sk = varlen ? o->cu_seqlens_k[s + 1] - k0 : c->Sk;
        double *S = xmalloc((size_t)(sq * sk + 1) * sizeof(double));
        for (int64_t h = 0; h < Hq; h++) {
            int64_t hk = h / (Hq / Hkv);
            for (int64_t i = 0; i < sq; i++)
                for (int64_t j = 0; j < sk; j++) {
                    const float *qi = c->qf + ((b * c->Sq + q0 + i) * Hq + h) * D;
                    const float *kj = c->kf + ((b * c->Sk + k0 + j) * Hkv + hk) * D;
                    double dot = 0;
                    for (int64_t d = 0; d < D; d++)
                        dot += (double)qi[d] * (double)kj[d];
                    double x = scale * dot;
                    if (o->softcap > 0)
                        x = o->softcap * tanh(x / o->softcap);
                    if (o->alibi_slopes)
                        x -= o->alibi_slopes[h] * fabs((double)(i + sk - sq - j));
                    if (o->bias) {
                        const qkv_tensor *bt = o->bias;
                        int64_t bb = bt->shape[0] == 1 ? 0 : b, hh = bt->shape[1] == 1 ? 0 : h;
                        int64_t ii = bt->shape[2] == 1 ? 0 : i, jj = bt->shape[3] == 1 ? 0 : j;
                        x += ((const float *)bt->data)[bb * bt->stride[0] + hh * bt->stride[1] +
                                                       ii * bt->stride[2] + jj * bt->stride[3]];
                    }
                    int64_t p = i + sk - sq;
                    int visible = (!o->causal || j <= p) &&
                                  (o->window_left < 0 || j >= p - o->window_left) &&
                                  (o->window_right < 0 || j <= p + o->window_right);
                    S[i * sk + j] = visible ? x : -INFINITY;
                }
            for (int64_t i = 0; i < sq; i++) {
                const double *row = S + i * sk;
                double m = -INFINITY, l = 0;
                for (int64_t j = 0; j < sk; j++)
                    if (row[j] > m) m = row[j];
                float *oi = out + ((b * c->Sq + q0 + i) * Hq + h) * Dv;
                float *li = lse + (b * Hq + h) * c->Sq + q0 + i;
                if (m == -INFINITY) {   /* sees no key */
                    for (int64_t e = 0; e < Dv; e++) oi[e] = 0;
                    *li = -INFINITY;
                    continue;
                }
                for (int64_t j = 0; j < sk; j++) l += exp(row[j] - m);
                for (int64_t e = 0; e < Dv; e++) {
                    double acc = 0;
                    for (int64_t j = 0; j < sk; j++)
                        acc += exp(row[j] - m) *
                               (double)c->vf[((b * c->Sk + k0 + j) * Hkv + hk) * Dv + e];
                    oi[e] = (float)(acc / l);
                }
                *li = (float)(m + log(l));
            }
        }
        free(S);
    }
}

static double rtol_of(qkv_dtype dt)
{
    /* the output is rounded to dt once: half an ulp, 2^-11 / 2^-8 */
    return dt == QKV_F32 ? 1e-5 : dt == QKV_F16 ? 1e-3 : 8e-3;
}

/* Runs the reference on c (already built) and compares with naive(). */
static void check_case(qkv_ctx *ctx, acase *c)
{
    float *want = xmalloc(c->n_out * sizeof(float)), *want_lse = xmalloc(c->n_lse * sizeof(float));
    memset(want, 0, c->n_out * sizeof(float));
    memset(want_lse, 0, c->n_lse * sizeof(float));
    naive(c, &c->opts, want, want_lse);

    tbuf out;
    acase_make_out(c, &out, c->dt);
    float *lse = acase_make_lse(c);
    qkv_status st = qkv_attention_reference(ctx, &c->tq, &c->tk, &c->tv, &c->opts, &out.t, lse);
    CHECK(st == QKV_OK, "reference returned %d (%s): %s [%s]", st, qkv_status_string(st),
          qkv_ctx_last_error(ctx), acase_str(c));
    if (st == QKV_OK) {
        char name[640];
        float *got = acase_collect(c, &out, lse, "reference");
        acase_zero_unused(c, want, want_lse);
        snprintf(name, sizeof name, "reference out [%s]", acase_str(c));
        compare(name, got, QKV_F32, want, c->n_out, 1e-6, rtol_of(c->dt));
        snprintf(name, sizeof name, "reference lse [%s]", acase_str(c));
        compare(name, lse, QKV_F32, want_lse, c->n_lse, 1e-5, 1e-6);
        free(got);
    }
    tbuf_free(&out);
    acase_free_lse(lse);
    free(want);
    free(want_lse);
}

enum { O_CAUSAL = 1, O_WINDOW = 2, O_SOFTCAP = 4, O_ALIBI = 8, O_BIAS = 16, O_VARLEN = 32,
       O_SCALE = 64, O_ALL = 127 };

/* A random tiny problem with the options in `bits`. */
static void random_case(acase *c, rng *r, int bits, qkv_dtype dt)
{
    static const int64_t hq_opts[] = { 1, 2, 4 };
    static const int64_t dims[] = { 1, 2, 3, 5, 7 };
    int64_t Hq = RNG_PICK(r, hq_opts), Hkv = Hq;
    while (rng_int(r, 0, 1) && Hkv > 1) Hkv /= 2;
    acase_init(c, rng_int(r, 1, 2), rng_int(r, 1, 9), rng_int(r, 1, 9), Hq, Hkv,
               RNG_PICK(r, dims), RNG_PICK(r, dims), dt);
    c->seed = rng_u64(r);
    c->causal = !!(bits & O_CAUSAL);
    if (bits & O_WINDOW) {
        do {
            c->wl = rng_int(r, -1, 3);
            c->wr = rng_int(r, -1, 3);
        } while (c->wl < 0 && c->wr < 0);
    }
    if (bits & O_SOFTCAP) c->softcap = (float)RNG_PICK(r, ((double[]){ 0.3, 1.0, 4.0 }));
    if (bits & O_ALIBI) c->alibi = 1;
    if (bits & O_SCALE) c->scale = (float)RNG_PICK(r, ((double[]){ 0.1, 0.7, 2.5 }));
    if (bits & O_BIAS) {
        c->bias = (int)rng_int(r, 1, BIAS_COUNT - 1);
        c->bias_neg_row = rng_int(r, 0, 3) == 0;
    }
    if (bits & O_VARLEN) acase_random_varlen(c, r, (int)rng_int(r, 1, 4), 5);
}

/* Single key, equal keys, Sq > Sk causal, -inf bias rows: answers known
   without any softmax code. */
void test_reference_closed_form(void)
{
    qkv_ctx *ctx = qkv_ctx_create(1);
    CHECK(ctx != NULL, "qkv_ctx_create(1)");
    if (!ctx) return;
    rng r = rng_seed(3);

    /* one key: out == v exactly, lse == scale * q.k */
    for (int t = 0; t < 4; t++) {
        acase c;
        acase_init(&c, 2, 3, 1, 4, 2, 5, 6, QKV_F32);
        c.seed = rng_u64(&r);
        c.scale = t == 0 ? 0.0f : (float)(0.5 * t);
        acase_build(&c);
        tbuf out;
        acase_make_out(&c, &out, QKV_F32);
        float *lse = acase_make_lse(&c);
        CHECK(qkv_attention_reference(ctx, &c.tq, &c.tk, &c.tv, &c.opts, &out.t, lse) == QKV_OK,
              "single key: %s", qkv_ctx_last_error(ctx));
        float *got = acase_collect(&c, &out, lse, "single key");
        double sc = c.scale != 0 ? c.scale : 1.0 / sqrt(5.0);
        int bad_out = 0, bad_lse = 0;
        for (int64_t b = 0; b < 2; b++)
            for (int64_t i = 0; i < 3; i++)
                for (int64_t h = 0; h < 4; h++) {
                    const float *vv = c.vf + (b * 2 + h / 2) * 6;
                    bad_out += memcmp(got + ((b * 3 + i) * 4 + h) * 6, vv, 6 * sizeof(float)) != 0;
                    double dot = 0;
                    for (int d = 0; d < 5; d++)
                        dot += (double)c.qf[((b * 3 + i) * 4 + h) * 5 + d] * c.kf[(b * 2 + h / 2) * 5 + d];
                    bad_lse += fabs(lse[(b * 4 + h) * 3 + i] - sc * dot) > 1e-6;
                }
        CHECK(bad_out == 0, "single key: %d rows differ from v (scale %g)", bad_out, (double)c.scale);
        CHECK(bad_lse == 0, "single key: %d lse != scale*q.k (scale %g)", bad_lse, (double)c.scale);
        free(got);
        tbuf_free(&out);
        acase_free_lse(lse);
        acase_free(&c);
    }

    /* all keys equal: out = mean of v rows, lse = s + log(Sk) */
    {
        const int64_t Sq = 4, Sk = 7, H = 2, D = 3, Dv = 5;
        acase c;
        acase_init(&c, 1, Sq, Sk, H, H, D, Dv, QKV_F32);
        c.seed = 77;
        acase_build(&c);
        float *kd = c.tk.data;   /* copy key row 0 of each head to every row */
        for (int64_t j = 1; j < Sk; j++)
            memcpy(kd + j * H * D, kd, (size_t)(H * D) * sizeof(float));
        memcpy(c.kf, kd, (size_t)(Sk * H * D) * sizeof(float));
        tbuf out;
        acase_make_out(&c, &out, QKV_F32);
        float *lse = acase_make_lse(&c);
        CHECK(qkv_attention_reference(ctx, &c.tq, &c.tk, &c.tv, &c.opts, &out.t, lse) == QKV_OK,
              "equal keys: %s", qkv_ctx_last_error(ctx));
        float *got = acase_collect(&c, &out, lse, "equal keys");
        float want[4 * 2 * 5], want_lse[2 * 4];
        for (int64_t i = 0; i < Sq; i++)
            for (int64_t h = 0; h < H; h++) {
                for (int64_t e = 0; e < Dv; e++) {
                    double m = 0;
                    for (int64_t j = 0; j < Sk; j++) m += c.vf[(j * H + h) * Dv + e];
                    want[(i * H + h) * Dv + e] = (float)(m / Sk);
                }
                double dot = 0;
                for (int64_t d = 0; d < D; d++)
                    dot += (double)c.qf[(i * H + h) * D + d] * c.kf[h * D + d];
                want_lse[h * Sq + i] = (float)(dot / sqrt((double)D) + log((double)Sk));
            }
        compare("equal keys: out = mean(v)", got, QKV_F32, want, 40, 1e-6, 1e-6);
        compare("equal keys: lse = s + log(Sk)", lse, QKV_F32, want_lse, 8, 1e-6, 1e-6);
        free(got);
        tbuf_free(&out);
        acase_free_lse(lse);
        acase_free(&c);
    }

    /* causal with Sq > Sk: rows i < Sq-Sk see nothing -> exactly 0, -inf;
       window (0,0) with Sq == Sk: row i sees only key i -> exactly v_i;
       a bias row of -inf -> 0, -inf */
    for (int t = 0; t < 3; t++) {
        acase c;
        acase_init(&c, 2, 7, t == 1 ? 7 : 3, 2, 1, 4, 3, QKV_F32);
        c.seed = 100 + (uint64_t)t;
        if (t == 0) c.causal = 1;
        if (t == 1) c.wl = c.wr = 0;
        if (t == 2) { c.bias = BIAS_FULL; c.bias_neg_row = 1; }
        acase_build(&c);
        tbuf out;
        acase_make_out(&c, &out, QKV_F32);
        float *lse = acase_make_lse(&c);
        CHECK(qkv_attention_reference(ctx, &c.tq, &c.tk, &c.tv, &c.opts, &out.t, lse) == QKV_OK,
              "closed form %d: %s", t, qkv_ctx_last_error(ctx));
        float *got = acase_collect(&c, &out, lse, "closed form");
        int bad = 0;
        for (int64_t b = 0; b < 2; b++)
            for (int64_t i = 0; i < 7; i++)
                for (int64_t h = 0; h < 2; h++) {
                    const float *o = got + ((b * 7 + i) * 2 + h) * 3;
                    float l = lse[(b * 2 + h) * 7 + i];
                    int empty = (t == 0 && i < 4) || (t == 2 && i == 3);
                    if (empty) {
                        bad += !(o[0] == 0 && o[1] == 0 && o[2] == 0 && l == -INFINITY);
                    } else if (t == 1) {
                        bad += memcmp(o, c.vf + (b * 7 + i) * 3, 3 * sizeof(float)) != 0 ||
                               !isfinite(l);
                    } else {
                        bad += !isfinite(l) || isnan(o[0]) || isnan(o[1]) || isnan(o[2]);
                    }
                }
        CHECK(bad == 0, "closed form %s: %d rows wrong",
              t == 0 ? "causal Sq>Sk (empty rows 0/-inf)" :
              t == 1 ? "window(0,0) (out == v_i)" : "-inf bias row (0/-inf)", bad);
        free(got);
        tbuf_free(&out);
        acase_free_lse(lse);
        acase_free(&c);
    }
    qkv_ctx_free(ctx);
}

/* Every combination of options (bias with varlen excluded: refused), each
   on a few random tiny shapes. */
void test_reference_options(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2);
    CHECK(ctx != NULL, "qkv_ctx_create(2)");
    if (!ctx) return;
    rng r = rng_seed(2024);
    int reps = t_quick ? 4 : 20;
    for (int bits = 0; bits <= O_ALL; bits++) {
        if ((bits & O_BIAS) && (bits & O_VARLEN)) continue;
        for (int rep = 0; rep < reps; rep++) {
            acase c;
            random_case(&c, &r, bits, QKV_F32);
            acase_build(&c);
            check_case(ctx, &c);
            acase_free(&c);
        }
    }
    qkv_ctx_free(ctx);
}

/* Random options, dtypes and strided layouts of q, k, v and out. */
void test_reference_random(void)
{
    qkv_ctx *ctx = qkv_ctx_create(0);
    CHECK(ctx != NULL, "qkv_ctx_create(0)");
    if (!ctx) return;
    rng r = rng_seed(99);
    static const qkv_dtype dts[] = { QKV_F32, QKV_F16, QKV_BF16 };
    int n = t_quick ? 600 : 3000;
    for (int it = 0; it < n; it++) {
        int bits = (int)rng_int(&r, 0, O_ALL);
        if ((bits & O_BIAS) && (bits & O_VARLEN)) bits &= ~O_VARLEN;
        acase c;
        random_case(&c, &r, bits, RNG_PICK(&r, dts));
        c.lay_q = (int)rng_int(&r, 0, LAY_COUNT - 1);
        c.lay_k = (int)rng_int(&r, 0, LAY_COUNT - 1);
        c.lay_v = (int)rng_int(&r, 0, LAY_COUNT - 1);
        c.lay_o = (int)rng_int(&r, 0, LAY_BCAST - 1);   /* outputs cannot broadcast */
        acase_build(&c);
        check_case(ctx, &c);
        acase_free(&c);
    }
    qkv_ctx_free(ctx);
}
