/*
 * test_backward.c — qkv_attention_backward against
 * qkv_attention_backward_reference (itself checked against finite
 * differences in test_backward_ref.c).
 *
 * Each case runs the forward for out and lse, draws dout, computes the
 * reference gradients on logical fp32 copies of the (rounded) inputs, then
 * the fast backward on every kernel set with the case's strided layouts,
 * gradients written into views filled with a sentinel: nothing outside the
 * views, nor in varlen rows outside every sequence, may change.
 *
 * Tolerances, |got - ref| <= atol·max|ref| + rtol·|ref| per gradient
 * tensor: each gradient element is a sum over up to Sq or Sk rows of fp32
 * products, so fp32 errors grow with the largest terms, not with the
 * element itself; 1e-4 of the tensor's largest value is ten times the
 * error of an fp32 sum of 10^4 terms. fp16/bf16 gradients are rounded to
 * their dtype (2^-11 / 2^-8 relative) after the same fp32 arithmetic.
 * A floor of 1% of the largest value of the three gradients keeps exact
 * zeros (one key: dq = dk = 0) from demanding exact cancellation.
 */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { GRAD_SENTINEL = 0xA7 };

static void tolerances(qkv_dtype dt, double *atol, double *rtol)
{
    *atol = dt == QKV_F32 ? 1e-4 : dt == QKV_F16 ? 1e-3 : 8e-3;
    *rtol = dt == QKV_F32 ? 1e-4 : dt == QKV_F16 ? 1e-3 : 8e-3;
}

static double worst[3];   /* largest error / allowed, per dtype */

/* A contiguous fp32 tensor over data. */
static qkv_tensor f32_view(float *data, int64_t a, int64_t b, int64_t c, int64_t d)
{
    return qkv_tensor_4d(data, QKV_F32, a, b, c, d);
}

/* k rows (dim 1) of a key-side tensor inside some sequence. */
static void key_rows_used(const acase *c, unsigned char *used)
{
    memset(used, c->n_seqs > 0 ? 0 : 1, (size_t)(c->B * c->Sk));
    for (int s = 0; s < c->n_seqs; s++)
        for (int32_t j = c->cu_k[s]; j < c->cu_k[s + 1]; j++)
            used[j] = 1;
}

/* Gathers a gradient view as logical fp32; CHECKs that rows (dim 1) not in
   `used` kept the sentinel, and zeroes them. */
static float *collect(const tbuf *tb, const unsigned char *used, const char *label,
                      const acase *c)
{
    const qkv_tensor *t = &tb->t;
    const size_t es = qkv_dtype_size(t->dtype);
    const int64_t rows = t->shape[0] * t->shape[1], row = t->shape[2] * t->shape[3];
    CHECK(tbuf_outside_changed(tb, GRAD_SENTINEL) == 0, "%s wrote outside its view [%s]",
          label, acase_str(c));
    unsigned char *raw = xmalloc((size_t)(rows * row) * es);
    view_gather(t, raw);
    size_t bad = 0;
    for (int64_t r = 0; r < rows; r++)
        if (!used[r])
            for (size_t x = 0; x < (size_t)row * es; x++)
                bad += raw[(size_t)r * (size_t)row * es + x] != GRAD_SENTINEL;
    CHECK(bad == 0, "%s: %zu bytes of rows outside every sequence were written [%s]", label,
          bad, acase_str(c));
    float *f = to_f32(raw, t->dtype, (size_t)(rows * row));
    for (int64_t r = 0; r < rows; r++)
        if (!used[r])
            memset(f + r * row, 0, (size_t)row * sizeof(float));
    free(raw);
    return f;
}

static double max_abs(const float *x, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fabs(x[i]) > m ? fabs(x[i]) : m;
    return m;
}

/* got vs ref with the tensor-scaled tolerance; returns error / allowed. */
static double check_grad(const char *label, const float *got, const float *ref, size_t n,
                         double floor, qkv_dtype dt, const acase *c)
{
    double atol, rtol;
    tolerances(dt, &atol, &rtol);
    double scale = max_abs(ref, n);
    scale = scale > floor ? scale : floor;
    double ratio = 0;
    size_t bad = 0, worst_i = 0;
    for (size_t i = 0; i < n; i++) {
        const double allowed = atol * scale + rtol * fabs(ref[i]) + 1e-30;
        const double e = fabs((double)got[i] - ref[i]);
        if (!(e <= allowed)) {
            if (!bad || e / allowed > ratio) worst_i = i;
            bad++;
        }
        if (e / allowed > ratio || e != e)
            ratio = e != e ? INFINITY : e / allowed;
    }
    CHECK(bad == 0, "%s: %zu of %zu out of tolerance (max|ref| %.3g); worst [%zu] got %.9g "
          "ref %.9g [%s]", label, bad, n, scale, worst_i, bad ? got[worst_i] : 0.0,
          bad ? ref[worst_i] : 0.0, acase_str(c));
    return ratio;
}

/* Runs one case on every kernel set. */
static void run_case(acase *c, const char *const *sets, int n_sets, qkv_ctx *ref_ctx)
{
    acase_build(c);
    const qkv_dtype dt = c->dt;
    const int64_t B = c->B, Sq = c->Sq, Sk = c->Sk;
    /* out and lse from the forward, in the case's dtype */
    tbuf out;
    int64_t oshape[4] = { B, Sq, c->Hq, c->Dv };
    tbuf_make_layout(&out, dt, oshape, LAY_CONTIG);
    float *lse = xmalloc(c->n_lse * sizeof(float));
    for (size_t i = 0; i < c->n_lse; i++)
        lse[i] = -INFINITY;
    qkv_status st = qkv_attention_forward(ref_ctx, &c->tq, &c->tk, &c->tv, &c->opts, &out.t, lse);
    CHECK(st == QKV_OK, "forward: %s [%s]", qkv_ctx_last_error(ref_ctx), acase_str(c));
    tbuf dout;
    tbuf_make_layout(&dout, dt, oshape, c->lay_o);
    rng r = rng_seed(c->seed * 7919 + 3);
    tbuf_fill_random(&dout, &r);

    /* the reference on fp32 copies */
    const size_t nq = (size_t)(B * Sq * c->Hq * c->D), nk = (size_t)(B * Sk * c->Hkv * c->D);
    const size_t nv = (size_t)(B * Sk * c->Hkv * c->Dv), no = c->n_out;
    void *raw = xmalloc(no * 4);
    view_gather(&out.t, raw);
    float *of = to_f32(raw, dt, no);
    view_gather(&dout.t, raw);
    float *dof = to_f32(raw, dt, no);
    free(raw);
    float *rq = calloc(nq, 4), *rk = calloc(nk, 4), *rv = calloc(nv, 4);
    qkv_tensor tq = f32_view(c->qf, B, Sq, c->Hq, c->D), tk = f32_view(c->kf, B, Sk, c->Hkv, c->D);
    qkv_tensor tv = f32_view(c->vf, B, Sk, c->Hkv, c->Dv), to = f32_view(of, B, Sq, c->Hq, c->Dv);
    qkv_tensor tdo = f32_view(dof, B, Sq, c->Hq, c->Dv);
    qkv_tensor gq = f32_view(rq, B, Sq, c->Hq, c->D), gk = f32_view(rk, B, Sk, c->Hkv, c->D);
    qkv_tensor gv = f32_view(rv, B, Sk, c->Hkv, c->Dv);
    st = qkv_attention_backward_reference(ref_ctx, &tq, &tk, &tv, &to, &tdo, lse, &c->opts,
                                          &gq, &gk, &gv);
    CHECK(st == QKV_OK, "backward reference: %s [%s]", qkv_ctx_last_error(ref_ctx), acase_str(c));

    unsigned char *kused = xmalloc((size_t)(B * Sk));
    key_rows_used(c, kused);
    const int64_t qs[4] = { B, Sq, c->Hq, c->D }, ks[4] = { B, Sk, c->Hkv, c->D };
    const int64_t vs[4] = { B, Sk, c->Hkv, c->Dv };
    float *first[3] = { NULL, NULL, NULL };
    for (int i = 0; i < n_sets; i++) {
        qkv_ctx *ctx = qkv_ctx_create(2);
        CHECK(ctx && qkv_ctx_set_isa(ctx, sets[i]) == QKV_OK, "set_isa %s", sets[i]);
        tbuf dq, dk, dv;
        tbuf_make_layout(&dq, dt, qs, c->lay_q == LAY_BCAST ? LAY_CONTIG : c->lay_q);
        tbuf_make_layout(&dk, dt, ks, c->lay_k == LAY_BCAST ? LAY_CONTIG : c->lay_k);
        tbuf_make_layout(&dv, dt, vs, c->lay_v == LAY_BCAST ? LAY_CONTIG : c->lay_v);
        tbuf_fill_byte(&dq, GRAD_SENTINEL);
        tbuf_fill_byte(&dk, GRAD_SENTINEL);
        tbuf_fill_byte(&dv, GRAD_SENTINEL);
        st = qkv_attention_backward(ctx, &c->tq, &c->tk, &c->tv, &out.t, &dout.t, lse, &c->opts,
                                    &dq.t, &dk.t, &dv.t);
        CHECK(st == QKV_OK, "%s backward: %s [%s]", sets[i], qkv_ctx_last_error(ctx),
              acase_str(c));
        if (st == QKV_OK) {
            char label[64];
            snprintf(label, sizeof label, "%s dq", sets[i]);
            float *gdq = collect(&dq, c->row_used, label, c);
            snprintf(label, sizeof label, "%s dk", sets[i]);
            float *gdk = collect(&dk, kused, label, c);
            snprintf(label, sizeof label, "%s dv", sets[i]);
            float *gdv = collect(&dv, kused, label, c);
            /* dS = P·(dP - Dd) cancels: its rounding follows dP's size, so
               a gradient that is exactly 0 (one key) still gets an
               absolute floor, 1% of the largest gradient value */
            double floor = max_abs(rq, nq);
            floor = max_abs(rk, nk) > floor ? max_abs(rk, nk) : floor;
            floor = 1e-2 * (max_abs(rv, nv) > floor ? max_abs(rv, nv) : floor);
            double e = check_grad("dq", gdq, rq, nq, floor, dt, c);
            double e2 = check_grad("dk", gdk, rk, nk, floor, dt, c);
            double e3 = check_grad("dv", gdv, rv, nv, floor, dt, c);
            e = e2 > e ? e2 : e;
            e = e3 > e ? e3 : e;
            if (e > worst[dt]) worst[dt] = e;
            if (i == 0) {
                first[0] = gdq; first[1] = gdk; first[2] = gdv;
            } else {
                free(gdq); free(gdk); free(gdv);
            }
        }
        tbuf_free(&dq); tbuf_free(&dk); tbuf_free(&dv);
        qkv_ctx_free(ctx);
    }
    free(first[0]); free(first[1]); free(first[2]);
    free(kused); free(rq); free(rk); free(rv); free(of); free(dof); free(lse);
    tbuf_free(&out); tbuf_free(&dout);
    acase_free(c);
}

static void report(const char *what)
{
    t_note("%s: worst error / allowed: f32 %.2f  f16 %.2f  bf16 %.2f", what, worst[QKV_F32],
           worst[QKV_F16], worst[QKV_BF16]);
    memset(worst, 0, sizeof worst);
}

/* Shapes: tiny, odd, GQA/MQA, Sq != Sk, D != Dv, lengths across tiles. */
void test_backward_shapes(void)
{
    static const int64_t shapes[][7] = {
        /* B, Sq, Sk, Hq, Hkv, D, Dv */
        /* fewer than 8 (batch, kv head) x query-tile tasks: the two passes */
        { 1, 1, 1, 1, 1, 8, 8 },     { 2, 5, 7, 2, 2, 16, 16 },  { 1, 17, 33, 4, 2, 24, 24 },
        { 1, 64, 64, 2, 2, 64, 64 }, { 1, 70, 130, 4, 1, 32, 40 },
        { 1, 100, 200, 2, 2, 128, 128 }, { 1, 3, 150, 16, 4, 64, 64 },
        /* few kv heads, their query tiles dealt to 2-3 tasks each: summed
           dK/dV partials */
        { 2, 33, 9, 8, 2, 7, 5 },    { 1, 129, 65, 3, 3, 80, 16 }, { 1, 300, 90, 2, 1, 48, 32 },
        /* eight or more (batch, kv head) pairs: one task per kv head */
        { 2, 40, 50, 8, 4, 32, 32 },  { 1, 30, 170, 8, 8, 16, 24 }, { 4, 65, 65, 4, 2, 64, 64 },
        /* tiles of more than 64 and 256 rows (wide groups) */
        { 1, 3, 50, 96, 1, 32, 32 },  { 1, 2, 40, 272, 1, 16, 24 },
    };
    const char *sets[8];
    const int n_sets = kernel_sets(sets);
    qkv_ctx *ref = qkv_ctx_create(0);
    const int n_shapes = (int)(sizeof shapes / sizeof shapes[0]);
    for (int si = 0; si < n_shapes; si++)
        for (int d = 0; d < 3; d++)
            for (int causal = 0; causal < 2; causal++) {
                if (t_quick && (si % 2 || d == 1))
                    continue;
                const int64_t *x = shapes[si];
                acase c;
                acase_init(&c, x[0], x[1], x[2], x[3], x[4], x[5], x[6], (qkv_dtype)d);
                c.causal = causal;
                c.seed = (uint64_t)(100 + si * 6 + d * 2 + causal);
                if ((si + causal) % 3 == 2)   /* dropout on a third of them */
                    c.dropout = 0.25f;
                run_case(&c, sets, n_sets, ref);
            }
    qkv_ctx_free(ref);
    report("shapes");
}

/* Every option, alone and combined, and strided layouts. */
void test_backward_options(void)
{
    const char *sets[8];
    const int n_sets = kernel_sets(sets);
    qkv_ctx *ref = qkv_ctx_create(0);
    rng r = rng_seed(777);
    const int n = t_quick ? 24 : 120;
    for (int it = 0; it < n; it++) {
        const qkv_dtype dt = (qkv_dtype)rng_int(&r, 0, 2);
        const int64_t hkv = rng_int(&r, 1, 3), group = rng_int(&r, 1, 4);
        acase c;
        acase_init(&c, rng_int(&r, 1, 2), rng_int(&r, 1, 90), rng_int(&r, 1, 140), hkv * group,
                   hkv, RNG_PICK(&r, ((const int64_t[]){ 4, 16, 33, 64 })),
                   RNG_PICK(&r, ((const int64_t[]){ 4, 16, 33, 64 })), dt);
        c.seed = (uint64_t)(5000 + it);
        c.causal = (int)rng_int(&r, 0, 1);
        if (rng_int(&r, 0, 3) == 0) c.wl = rng_int(&r, 0, 40);
        if (rng_int(&r, 0, 3) == 0) c.wr = rng_int(&r, 0, 40);
        if (rng_int(&r, 0, 3) == 0) c.softcap = (float)rng_int(&r, 1, 30);
        if (rng_int(&r, 0, 3) == 0) c.alibi = 1;
        if (rng_int(&r, 0, 2) == 0) c.scale = (float)(rng_unif(&r) * 0.5);
        if (rng_int(&r, 0, 3) == 0) {
            acase_random_varlen(&c, &r, (int)rng_int(&r, 1, 4), 40);
        } else if (rng_int(&r, 0, 3) == 0) {
            c.bias = (int)rng_int(&r, 1, BIAS_COUNT - 1);
            c.bias_neg_row = (int)rng_int(&r, 0, 1);
        }
        c.lay_q = (int)rng_int(&r, 0, LAY_COUNT - 1);
        c.lay_k = (int)rng_int(&r, 0, LAY_COUNT - 1);
        c.lay_v = (int)rng_int(&r, 0, LAY_COUNT - 1);
        c.lay_o = (int)rng_int(&r, 0, LAY_COUNT - 2);   /* no broadcast for dout */
        if (it % 3 == 2)   /* dropout on a third of the cases */
            c.dropout = RNG_PICK(&r, ((const float[]){ 0.1f, 0.5f, 0.9f }));
        run_case(&c, sets, n_sets, ref);
    }
    qkv_ctx_free(ref);
    report("options");
}

/* 1, 2, 3 and 5 threads: dq, dk and dv bitwise identical. */
void test_backward_threads(void)
{
    static const int nthreads[4] = { 1, 2, 3, 5 };
    for (int k = 0; k < 6; k++) {
        acase c;
        /* k < 2: 2 x 2 (batch, kv head) pairs, query tiles dealt to two
           tasks each; k 2-3: 2 x 4, one task per kv head; k >= 4: 12
           queries, the two passes */
        acase_init(&c, 2, k < 4 ? 97 : 12, 150, 8, k < 2 || k >= 4 ? 2 : 4, 64, 48,
                   k % 2 ? QKV_BF16 : QKV_F32);
        c.causal = k < 2;
        c.softcap = k == 3 ? 20.0f : 0.0f;
        c.seed = (uint64_t)(900 + k);
        acase_build(&c);
        const int64_t os[4] = { c.B, c.Sq, c.Hq, c.Dv };
        tbuf out, dout;
        tbuf_make_layout(&out, c.dt, os, LAY_CONTIG);
        tbuf_make_layout(&dout, c.dt, os, LAY_CONTIG);
        rng r = rng_seed(31 + (uint64_t)k);
        tbuf_fill_random(&dout, &r);
        float *lse = xmalloc(c.n_lse * sizeof(float));
        qkv_ctx *ctx1 = qkv_ctx_create(1);
        CHECK(qkv_attention_forward(ctx1, &c.tq, &c.tk, &c.tv, &c.opts, &out.t, lse) == QKV_OK,
              "forward");
        const int64_t qs[4] = { c.B, c.Sq, c.Hq, c.D }, ks[4] = { c.B, c.Sk, c.Hkv, c.D };
        const int64_t vs[4] = { c.B, c.Sk, c.Hkv, c.Dv };
        tbuf g[4][3];
        for (int t = 0; t < 4; t++) {
            qkv_ctx *ctx = qkv_ctx_create(nthreads[t]);
            tbuf_make_layout(&g[t][0], c.dt, qs, LAY_CONTIG);
            tbuf_make_layout(&g[t][1], c.dt, ks, LAY_CONTIG);
            tbuf_make_layout(&g[t][2], c.dt, vs, LAY_CONTIG);
            qkv_status st = qkv_attention_backward(ctx, &c.tq, &c.tk, &c.tv, &out.t, &dout.t,
                                                   lse, &c.opts, &g[t][0].t, &g[t][1].t,
                                                   &g[t][2].t);
            CHECK(st == QKV_OK, "%d threads: %s", nthreads[t], qkv_ctx_last_error(ctx));
            qkv_ctx_free(ctx);
            for (int w = 0; t > 0 && w < 3; w++)
                CHECK(g[t][w].bytes == g[0][w].bytes &&
                      memcmp(g[t][w].buf, g[0][w].buf, g[0][w].bytes) == 0,
                      "%s differs between 1 and %d threads [%s]", w == 0 ? "dq" : w == 1 ? "dk" : "dv",
                      nthreads[t], acase_str(&c));
        }
        for (int t = 0; t < 4; t++)
            for (int w = 0; w < 3; w++)
                tbuf_free(&g[t][w]);
        qkv_ctx_free(ctx1);
        free(lse);
        tbuf_free(&out);
        tbuf_free(&dout);
        acase_free(&c);
    }
}
