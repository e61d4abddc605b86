/*
 * test_backward_ref.c — qkv_attention_backward_reference, the specification
 * of the backward, checked without trusting its formulas:
 *
 *   - against central finite differences of the reference forward
 *     (qkv_attention_reference) of the loss L = Σ dout∘out, element by
 *     element of q, k and v, for every option (causal with Sq != Sk,
 *     windows, ALiBi, softcap, bias with broadcasting and -inf entries,
 *     GQA, MQA, varlen with empty sequences, Dv != D, negative scale) and
 *     strided layouts of every tensor;
 *   - closed forms: one key (dq = dk = 0, dv = Σ dout of the rows that see
 *     it), equal keys (uniform P: dq = 0, dv and dk by hand), equal values
 *     (dq = dk = 0), zero dout (all zero);
 *   - rows that see no key: dq exactly 0, nothing NaN; a row passed lse
 *     -inf contributes nothing;
 *   - results independent of the thread count, fp16/bf16 stores;
 *   - every bad argument refused before anything is written, with a
 *     message naming it (the style of test_errors.c).
 */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { GRAD_SENTINEL = 0xD7 };

/* One backward problem: an acase, the reference forward's out and lse,
   a random dout, and gradient views (filled with GRAD_SENTINEL) of layout
   lay_g. */
typedef struct {
    acase  c;
    int    lay_g;                  /* layout of dout, dq, dk and dv */
    tbuf   out, dout, dq, dk, dv;
    float *lse;
    float *doutf;                  /* logical fp32 dout */
    unsigned char *krow_used;      /* [B*Sk]: key row inside a sequence */
    float *gq, *gk, *gv;           /* logical fp32 gradients (unused rows 0) */
} bcase;

static int64_t numel(const qkv_tensor *t)
{
    return t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3];
}

static float *gather_f32(const qkv_tensor *t)
{
    size_t n = (size_t)numel(t);
    void *tmp = xmalloc(n * qkv_dtype_size(t->dtype));
    view_gather(t, tmp);
    float *f = to_f32(tmp, t->dtype, n);
    free(tmp);
    return f;
}

static float *elem(const qkv_tensor *t, int64_t i0, int64_t i1, int64_t i2, int64_t i3)
{
    return (float *)t->data + i0 * t->stride[0] + i1 * t->stride[1] + i2 * t->stride[2] +
           i3 * t->stride[3];
}

/* After acase_build(&b->c) (and any change to its inputs): the forward, a
   random dout and the gradient buffers. */
static void bcase_prepare(qkv_ctx *ctx, bcase *b)
{
    acase *c = &b->c;
    acase_make_out(c, &b->out, c->dt);
    b->lse = acase_make_lse(c);
    qkv_status st = qkv_attention_reference(ctx, &c->tq, &c->tk, &c->tv, &c->opts, &b->out.t, b->lse);
    CHECK(st == QKV_OK, "forward reference: %d %s [%s]", st, qkv_ctx_last_error(ctx), acase_str(c));
    rng r = rng_seed(c->seed ^ 0x5EEDull);
    int64_t so[4] = { c->B, c->Sq, c->Hq, c->Dv };
    tbuf_make_layout(&b->dout, c->dt, so, b->lay_g);
    tbuf_fill_random(&b->dout, &r);
    b->doutf = gather_f32(&b->dout.t);
    int64_t sq[4] = { c->B, c->Sq, c->Hq, c->D }, sk[4] = { c->B, c->Sk, c->Hkv, c->D },
            sv[4] = { c->B, c->Sk, c->Hkv, c->Dv };
    tbuf_make_layout(&b->dq, c->dt, sq, b->lay_g);
    tbuf_make_layout(&b->dk, c->dt, sk, b->lay_g);
    tbuf_make_layout(&b->dv, c->dt, sv, b->lay_g);
    b->krow_used = xmalloc((size_t)(c->B * c->Sk));
    memset(b->krow_used, c->n_seqs > 0 ? 0 : 1, (size_t)(c->B * c->Sk));
    for (int s = 0; s < c->n_seqs; s++)
        for (int32_t j = c->cu_k[s]; j < c->cu_k[s + 1]; j++)
            b->krow_used[j] = 1;
    b->gq = b->gk = b->gv = NULL;
}

static void bcase_free(bcase *b)
{
    tbuf_free(&b->out); tbuf_free(&b->dout);
    tbuf_free(&b->dq); tbuf_free(&b->dk); tbuf_free(&b->dv);
    acase_free_lse(b->lse);
    free(b->doutf); free(b->krow_used);
    free(b->gq); free(b->gk); free(b->gv);
    acase_free(&b->c);
}

/* CHECKs that g was written only inside its view and only in used rows;
   returns the logical fp32 gradient with unused rows zeroed. */
static float *collect_grad(const bcase *b, const tbuf *g, const unsigned char *used,
                           const char *what, const char *label)
{
    size_t changed = tbuf_outside_changed(g, GRAD_SENTINEL);
    CHECK(changed == 0, "%s: %zu bytes of %s outside its view were written [%s]",
          label, changed, what, acase_str(&b->c));
    const qkv_tensor *t = &g->t;
    size_t es = qkv_dtype_size(t->dtype), n = (size_t)numel(t);
    size_t row = (size_t)(t->shape[2] * t->shape[3]);
    unsigned char *raw = xmalloc(n * es);
    view_gather(t, raw);
    size_t bad = 0;
    for (int64_t r = 0; r < t->shape[0] * t->shape[1]; r++)
        if (!used[r])
            for (size_t e = 0; e < row * es; e++)
                bad += raw[(size_t)r * row * es + e] != GRAD_SENTINEL;
    CHECK(bad == 0, "%s: %zu bytes of %s rows outside every sequence were written [%s]",
          label, bad, what, acase_str(&b->c));
    float *f = to_f32(raw, t->dtype, n);
    for (int64_t r = 0; r < t->shape[0] * t->shape[1]; r++)
        if (!used[r])
            memset(f + (size_t)r * row, 0, row * sizeof(float));
    free(raw);
    return f;
}

/* Runs the backward reference on b (gradients first reset to the
   sentinel) and collects gq, gk, gv. */
static qkv_status bcase_backward(qkv_ctx *ctx, bcase *b, const char *label)
{
    acase *c = &b->c;
    tbuf_fill_byte(&b->dq, GRAD_SENTINEL);
    tbuf_fill_byte(&b->dk, GRAD_SENTINEL);
    tbuf_fill_byte(&b->dv, GRAD_SENTINEL);
    qkv_status st = qkv_attention_backward_reference(ctx, &c->tq, &c->tk, &c->tv, &b->out.t,
            &b->dout.t, b->lse, &c->opts, &b->dq.t, &b->dk.t, &b->dv.t);
    CHECK(st == QKV_OK, "%s: backward reference returned %d (%s): %s [%s]", label, st,
          qkv_status_string(st), qkv_ctx_last_error(ctx), acase_str(c));
    free(b->gq); free(b->gk); free(b->gv);
    b->gq = b->gk = b->gv = NULL;
    if (st == QKV_OK) {
        b->gq = collect_grad(b, &b->dq, c->row_used, "dq", label);
        b->gk = collect_grad(b, &b->dk, b->krow_used, "dk", label);
        b->gv = collect_grad(b, &b->dv, b->krow_used, "dv", label);
    }
    return st;
}

/* ---- finite differences ------------------------------------------------------
 *
 * L(q, k, v) = Σ dout∘out over the rows inside a sequence, out from the
 * reference forward (double inside, rounded to fp32 once), summed in
 * double. For an element x: (L(x+e) - L(x-e)) / (x+e - x-e) with e = FD_STEP
 * (x±e rounded to fp32; the division uses the rounded difference).
 *
 * Error budget, with inputs in [-1, 1] and gradients of order G (0.1..1):
 * - rounding: only the outputs x feeds change; each carries at most half
 *   an fp32 ulp (|out| <= 1: 6e-8), and at most a few dozen of them (a row
 *   for q, the group's rows for k, v) times |dout| <= 1 enter L, so the
 *   difference quotient carries <= ~40·6e-8 / (2·FD_STEP) = 1.2e-4 (about
 *   1e-5 typically, the errors being random);
 * - truncation: e²/6·L''', with third derivatives of order scale³·G, and
 *   up to 2·scale³/softcap²·G with softcap: ~2e-5·G for scale <= 2, and
 *   at most ~5e-4·G for the strongest softcap used here (scale 2, softcap
 *   0.5, where tanh's curvature dominates).
 * FD_TOL = 2e-3 of the case's gradient scale (the largest |gradient| of
 * q, k and v together, at least 0.05) covers both with a margin, while the
 * mistakes it must catch (a missing softcap factor, a dropped Dd term, a
 * wrong head, mask or sign) change gradients by 10-100% of G. The worst
 * ratio seen is printed: 6e-5 for the fixed cases, 1.5e-4 for the random
 * ones (scale 2 with softcap 0.5) at the time of writing.
 */
#define FD_STEP 1e-2
#define FD_TOL  2e-3

static double fd_worst;   /* largest |fd - ref| / scale over all cases */

static double loss(qkv_ctx *ctx, bcase *b, tbuf *o)
{
    acase *c = &b->c;
    qkv_status st = qkv_attention_reference(ctx, &c->tq, &c->tk, &c->tv, &c->opts, &o->t, NULL);
    if (st != QKV_OK)
        return NAN;
    const float *of = o->t.data;   /* contiguous fp32 */
    size_t row = (size_t)(c->Hq * c->Dv);
    double L = 0.0;
    for (int64_t r = 0; r < c->B * c->Sq; r++)
        if (c->row_used[r])
            for (size_t e = 0; e < row; e++)
                L += (double)b->doutf[(size_t)r * row + e] * of[(size_t)r * row + e];
    return L;
}

/* Compares gq, gk, gv of b with finite differences of every element of q,
   k and v (stride: every `every`-th element, starting at a random one). */
static void fd_check(qkv_ctx *ctx, bcase *b, int every, rng *r, const char *label)
{
    acase *c = &b->c;
    tbuf o;
    int64_t so[4] = { c->B, c->Sq, c->Hq, c->Dv };
    tbuf_make_layout(&o, QKV_F32, so, LAY_CONTIG);
    const qkv_tensor *ts[3] = { &c->tq, &c->tk, &c->tv };
    const float *gs[3] = { b->gq, b->gk, b->gv };
    const unsigned char *used[3] = { c->row_used, b->krow_used, b->krow_used };
    static const char *const names[3] = { "dq", "dk", "dv" };
    double scale = 0.05;
    for (int t = 0; t < 3; t++)
        for (int64_t e = 0; e < numel(ts[t]); e++)
            scale = fmax(scale, fabs(gs[t][e]));
    for (int t = 0; t < 3; t++) {
        const int64_t *sh = ts[t]->shape, n = numel(ts[t]);
        float *fd = xmalloc((size_t)n * sizeof(float)), *want = xmalloc((size_t)n * sizeof(float));
        int64_t m = 0;
        for (int64_t e = every > 1 ? rng_int(r, 0, every - 1) : 0; e < n; e += every) {
            int64_t i3 = e % sh[3], i2 = e / sh[3] % sh[2], i1 = e / (sh[3] * sh[2]) % sh[1],
                    i0 = e / (sh[3] * sh[2] * sh[1]);
            if (!used[t][i0 * sh[1] + i1])
                continue;
            float *p = elem(ts[t], i0, i1, i2, i3), x0 = *p;
            float xp = (float)(x0 + FD_STEP), xm = (float)(x0 - FD_STEP);
            *p = xp;
            double lp = loss(ctx, b, &o);
            *p = xm;
            double lm = loss(ctx, b, &o);
            *p = x0;
            fd[m] = (float)((lp - lm) / ((double)xp - (double)xm));
            want[m] = gs[t][e];
            double err = fabs((double)fd[m] - want[m]) / scale;
            if (!(err <= fd_worst)) fd_worst = err;
            m++;
        }
        char name[700];
        snprintf(name, sizeof name, "%s: %s vs finite differences (scale %.3g) [%s]",
                 label, names[t], scale, acase_str(c));
        compare(name, fd, QKV_F32, want, (size_t)m, FD_TOL * scale, 0.0);
        free(fd);
        free(want);
    }
    tbuf_free(&o);
}

typedef struct {
    const char *name;
    int64_t B, Sq, Sk, Hq, Hkv, D, Dv;
    int     causal;
    int64_t wl, wr;
    float   scale, softcap;
    int     alibi, bias, neg_row, varlen;   /* varlen: 1 or 2, fixed offsets below */
} fd_spec;

static const fd_spec fd_specs[] = {
    /* name                B  Sq Sk Hq Hkv D Dv  causal wl  wr  scale softcap alibi bias neg varlen */
    { "plain",             2, 5, 6, 2, 2, 4, 4, 0, -1, -1, 0, 0, 0, 0, 0, 0 },
    { "causal Sq<Sk",      1, 4, 7, 2, 1, 4, 3, 1, -1, -1, 0, 0, 0, 0, 0, 0 },
    { "causal Sq>Sk",      2, 7, 4, 2, 2, 3, 4, 1, -1, -1, 0, 0, 0, 0, 0, 0 },
    { "window(1,2)",       1, 6, 6, 2, 2, 4, 4, 0, 1, 2, 0, 0, 0, 0, 0, 0 },
    { "window(2,-1)",      1, 5, 8, 2, 1, 4, 4, 0, 2, -1, 0, 0, 0, 0, 0, 0 },
    { "window(0,0) Sq>Sk", 1, 6, 4, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
    { "alibi causal",      1, 5, 7, 4, 2, 4, 4, 1, -1, -1, 0, 0, 1, 0, 0, 0 },
    { "softcap",           1, 5, 6, 2, 2, 4, 4, 0, -1, -1, 2.0f, 0.7f, 0, 0, 0, 0 },
    { "softcap alibi win", 1, 6, 6, 2, 1, 4, 3, 0, 1, 1, 1.5f, 1.0f, 1, 0, 0, 0 },
    { "bias full",         2, 4, 5, 2, 2, 4, 4, 0, -1, -1, 0, 0, 0, BIAS_FULL, 0, 0 },
    { "bias [1,1,Sq,Sk]",  2, 5, 5, 2, 1, 3, 4, 0, -1, -1, 0, 0, 0, BIAS_11, 1, 0 },
    { "bias [1,Hq,Sq,Sk]", 2, 4, 6, 2, 2, 4, 3, 1, -1, -1, 0, 0, 0, BIAS_B1, 0, 0 },
    { "bias [B,1,Sq,Sk]",  2, 4, 5, 4, 2, 3, 3, 0, -1, -1, 0, 0, 0, BIAS_H1, 0, 0 },
    { "bias zero strides", 1, 5, 5, 2, 2, 4, 4, 0, -1, -1, 1.2f, 0.8f, 0, BIAS_ZSTRIDE, 0, 0 },
    { "GQA group 2",       1, 5, 6, 4, 2, 4, 4, 1, -1, -1, 0, 0, 0, 0, 0, 0 },
    { "GQA group 4",       1, 5, 6, 8, 2, 3, 2, 0, -1, -1, 0, 0, 0, 0, 0, 0 },
    { "MQA",               2, 4, 5, 3, 1, 4, 4, 0, -1, -1, 0, 0, 0, 0, 0, 0 },
    { "varlen 3 seqs",     1, 0, 0, 4, 2, 4, 3, 0, -1, -1, 0, 0, 0, 0, 0, 1 },
    { "varlen causal",     1, 0, 0, 2, 1, 3, 4, 1, -1, -1, 0, 0, 1, 0, 0, 2 },
    { "Dv > D",            1, 5, 6, 2, 2, 2, 7, 0, -1, -1, 0, 0, 0, 0, 0, 0 },
    { "Dv < D",            2, 4, 5, 2, 1, 5, 2, 1, -1, -1, 0, 0, 0, 0, 0, 0 },
    { "negative scale",    1, 5, 6, 2, 2, 4, 4, 0, 1, 3, -0.8f, 0, 1, 0, 0, 0 },
    /* more rows and keys than one task's block (16) */
    { "blocks window",     1, 20, 35, 2, 1, 3, 2, 0, 8, 4, 0, 0, 0, 0, 0, 0 },
    { "blocks varlen",     1, 0, 0, 2, 1, 2, 3, 1, -1, -1, 0, 0, 1, 0, 0, 3 },
};

/* varlen 1: sequences (sq, sk) = (3, 3), (0, 4): keys nobody sees,
   (5, 0): rows that see nothing; q row 0 and 9 and k row 7 unused.
   varlen 2: (3, 2), (4, 6); q row 7 and k rows 0, 1 unused.
   varlen 3: (17, 0), (0, 18), (23, 39); k rows 0..2 unused. */
static void spec_case(bcase *b, const fd_spec *s, int idx)
{
    acase *c = &b->c;
    acase_init(c, s->B, s->Sq, s->Sk, s->Hq, s->Hkv, s->D, s->Dv, QKV_F32);
    c->seed = 1000 + (uint64_t)idx;
    c->causal = s->causal;
    c->wl = s->wl; c->wr = s->wr;
    c->scale = s->scale; c->softcap = s->softcap;
    c->alibi = s->alibi; c->bias = s->bias; c->bias_neg_row = s->neg_row;
    if (s->varlen) {
        static const int32_t q1[4] = { 1, 4, 4, 9 }, k1[4] = { 0, 3, 7, 7 };
        static const int32_t q2[3] = { 0, 3, 7 }, k2[3] = { 2, 4, 10 };
        static const int32_t q3[4] = { 0, 17, 17, 40 }, k3[4] = { 3, 3, 21, 60 };
        static const int32_t *const cq[3] = { q1, q2, q3 }, *const ck[3] = { k1, k2, k3 };
        static const int nseq[3] = { 3, 2, 3 }, tq[3] = { 10, 8, 40 }, tk[3] = { 8, 11, 60 };
        c->n_seqs = nseq[s->varlen - 1];
        memcpy(c->cu_q, cq[s->varlen - 1], (size_t)(c->n_seqs + 1) * sizeof(int32_t));
        memcpy(c->cu_k, ck[s->varlen - 1], (size_t)(c->n_seqs + 1) * sizeof(int32_t));
        c->Sq = tq[s->varlen - 1];
        c->Sk = tk[s->varlen - 1];
    }
    /* strided layouts that FD can perturb (no broadcast, no packing) */
    static const int lays[6] = { LAY_CONTIG, LAY_BHSD, LAY_PAD, LAY_NEG, LAY_INNER2, LAY_REVD };
    c->lay_q = lays[idx % 6];
    c->lay_k = lays[(idx + 1) % 6];
    c->lay_v = lays[(idx + 2) % 6];
    c->lay_o = lays[(idx + 3) % 6];
    b->lay_g = lays[(idx + 4) % 6];
}

void test_backward_ref_fd(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2), *one = qkv_ctx_create(1);
    CHECK(ctx && one, "qkv_ctx_create");
    if (!ctx || !one) { qkv_ctx_free(ctx); qkv_ctx_free(one); return; }
    rng r = rng_seed(5);
    fd_worst = 0;
    const int n = (int)(sizeof fd_specs / sizeof fd_specs[0]);
    for (int i = 0; i < n; i++) {
        bcase b;
        memset(&b, 0, sizeof b);
        spec_case(&b, &fd_specs[i], i);
        acase_build(&b.c);
        bcase_prepare(ctx, &b);
        if (bcase_backward(ctx, &b, fd_specs[i].name) == QKV_OK)
            fd_check(one, &b, t_quick ? 3 : 1, &r, fd_specs[i].name);
        bcase_free(&b);
    }
    t_note("finite differences: worst |fd - ref| / gradient scale = %.2e (tolerance %.0e)",
           fd_worst, FD_TOL);
    qkv_ctx_free(ctx);
    qkv_ctx_free(one);
}

/* Random combinations of options on random tiny shapes, a sample of the
   elements each. */
void test_backward_ref_random(void)
{
    qkv_ctx *ctx = qkv_ctx_create(3), *one = qkv_ctx_create(1);
    CHECK(ctx && one, "qkv_ctx_create");
    if (!ctx || !one) { qkv_ctx_free(ctx); qkv_ctx_free(one); return; }
    rng r = rng_seed(77);
    fd_worst = 0;
    const int n = t_quick ? 40 : 200;
    static const int64_t hq_opts[] = { 1, 2, 4 };
    for (int it = 0; it < n; it++) {
        bcase b;
        memset(&b, 0, sizeof b);
        acase *c = &b.c;
        int64_t Hq = RNG_PICK(&r, hq_opts), Hkv = Hq;
        while (rng_int(&r, 0, 1) && Hkv > 1) Hkv /= 2;
        acase_init(c, rng_int(&r, 1, 2), rng_int(&r, 1, 7), rng_int(&r, 1, 7), Hq, Hkv,
                   rng_int(&r, 1, 5), rng_int(&r, 1, 5), QKV_F32);
        c->seed = rng_u64(&r);
        c->causal = (int)rng_int(&r, 0, 1);
        if (rng_int(&r, 0, 2) == 0) { c->wl = rng_int(&r, -1, 3); c->wr = rng_int(&r, -1, 3); }
        if (rng_int(&r, 0, 2) == 0) c->softcap = (float)RNG_PICK(&r, ((double[]){ 0.5, 1.0, 3.0 }));
        if (rng_int(&r, 0, 2) == 0) c->scale = (float)RNG_PICK(&r, ((double[]){ -1.0, 0.5, 2.0 }));
        c->alibi = rng_int(&r, 0, 2) == 0;
        if (rng_int(&r, 0, 2) == 0)
            acase_random_varlen(c, &r, (int)rng_int(&r, 1, 3), 5);
        else if (rng_int(&r, 0, 2) == 0)
            c->bias = (int)rng_int(&r, 1, BIAS_COUNT - 1);
        static const int lays[6] = { LAY_CONTIG, LAY_BHSD, LAY_PAD, LAY_NEG, LAY_INNER2, LAY_REVD };
        c->lay_q = RNG_PICK(&r, lays); c->lay_k = RNG_PICK(&r, lays);
        c->lay_v = RNG_PICK(&r, lays); c->lay_o = RNG_PICK(&r, lays);
        b.lay_g = RNG_PICK(&r, lays);
        acase_build(c);
        bcase_prepare(ctx, &b);
        if (bcase_backward(ctx, &b, "random") == QKV_OK)
            fd_check(one, &b, 1, &r, "random");
        bcase_free(&b);
    }
    t_note("finite differences: worst |fd - ref| / gradient scale = %.2e (tolerance %.0e)",
           fd_worst, FD_TOL);
    qkv_ctx_free(ctx);
    qkv_ctx_free(one);
}

/* ---- closed forms ------------------------------------------------------------ */

/* One CHECK: a and b hold the same n floats, bit for bit. */
static void same_floats(const char *name, const float *a, const float *b, size_t n)
{
    size_t bad = 0, first = 0;
    for (size_t i = n; i-- > 0; )
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0) {
            bad++;
            first = i;
        }
    CHECK(bad == 0, "%s: %zu of %zu elements differ; first [%zu]: %.9g vs %.9g", name, bad, n,
          first, bad ? (double)a[first] : 0.0, bad ? (double)b[first] : 0.0);
}

static size_t count_nonzero(const float *x, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += x[i] != 0.0f;
    return k;
}

/* Key j visible to row i (plain batch, no varlen) by the rules of qkv.h. */
static int sees(const acase *c, int64_t i, int64_t j)
{
    int64_t p = i + c->Sk - c->Sq;
    return (!c->causal || j <= p) && (c->wl < 0 || j >= p - c->wl) && (c->wr < 0 || j <= p + c->wr);
}

void test_backward_ref_closed_form(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2);
    CHECK(ctx != NULL, "qkv_ctx_create(2)");
    if (!ctx) return;

    /* One key: P = 1 for every row that sees it, so dP = dout·v = dout·out
       = Dd (out == v exactly): dS = 0, dq = dk = 0 exactly, and dv = Σ of
       dout over the (head, row) pairs that see the key. */
    for (int t = 0; t < 3; t++) {
        bcase b;
        memset(&b, 0, sizeof b);
        acase *c = &b.c;
        acase_init(c, 2, t == 2 ? 3 : 4, 1, 4, 2, 5, 6, QKV_F32);
        c->seed = 40 + (uint64_t)t;
        c->scale = (float)(0.5 + t);
        c->causal = t == 1;                       /* only the last row sees it */
        if (t == 2) c->wl = c->wr = 0;            /* likewise, by the window */
        b.lay_g = t == 0 ? LAY_CONTIG : LAY_PAD;
        acase_build(c);
        bcase_prepare(ctx, &b);
        if (bcase_backward(ctx, &b, "one key") == QKV_OK) {
            size_t nq = (size_t)numel(&c->tq), nk = (size_t)numel(&c->tk);
            CHECK(count_nonzero(b.gq, nq) == 0, "one key (case %d): %zu dq elements not 0", t,
                  count_nonzero(b.gq, nq));
            CHECK(count_nonzero(b.gk, nk) == 0, "one key (case %d): %zu dk elements not 0", t,
                  count_nonzero(b.gk, nk));
            float want[2 * 2 * 6];
            for (int64_t bb = 0; bb < 2; bb++)
                for (int64_t hk = 0; hk < 2; hk++)
                    for (int64_t e = 0; e < 6; e++) {
                        double s = 0;
                        for (int64_t h = 2 * hk; h < 2 * hk + 2; h++)
                            for (int64_t i = 0; i < c->Sq; i++)
                                if (sees(c, i, 0))
                                    s += b.doutf[((bb * c->Sq + i) * 4 + h) * 6 + e];
                        want[(bb * 2 + hk) * 6 + e] = (float)s;
                    }
            compare(t == 0 ? "one key: dv = sum of dout" : "one key, one row sees it: dv = its dout",
                    b.gv, QKV_F32, want, 24, 1e-6, 1e-6);
        }
        bcase_free(&b);
    }

    /* Equal keys (k stride 0 along the sequence): every visible P is 1/n_i,
       out_i = mean of the n_i visible v rows, so
         dq_i = scale·Σ_j dS_j·k = scale·k·(Σ_j P_j·dP_j - Dd_i) = 0,
         dv_j = Σ_{h, i sees j} dout_i / n_i,
         dk_j = scale·Σ_{h, i sees j} (dout_i·v_j - dout_i·out_i)·q_i / n_i.
       Tolerance 1e-5: the reference uses the fp32-rounded out for Dd. */
    for (int t = 0; t < 2; t++) {
        bcase b;
        memset(&b, 0, sizeof b);
        acase *c = &b.c;
        enum { Sq = 5, Sk = 6, Hq = 4, Hkv = 2, D = 3, Dv = 4 };
        acase_init(c, 1, Sq, Sk, Hq, Hkv, D, Dv, QKV_F32);
        c->seed = 50 + (uint64_t)t;
        c->causal = t;
        b.lay_g = LAY_BHSD;
        acase_build(c);
        c->tk.stride[1] = 0;                      /* every key row is row 0 */
        bcase_prepare(ctx, &b);
        if (bcase_backward(ctx, &b, "equal keys") == QKV_OK) {
            const double scale = 1.0 / sqrt((double)D);
            float zero[Sq * Hq * D], wdv[Sk * Hkv * Dv], wdk[Sk * Hkv * D];
            memset(zero, 0, sizeof zero);
            double dk[Sk * Hkv * D], dv[Sk * Hkv * Dv];
            memset(dk, 0, sizeof dk);
            memset(dv, 0, sizeof dv);
            for (int64_t h = 0; h < Hq; h++) {
                int64_t hk = h / (Hq / Hkv);
                for (int64_t i = 0; i < Sq; i++) {
                    const float *dO = b.doutf + (i * Hq + h) * Dv, *qi = c->qf + (i * Hq + h) * D;
                    double n = 0, mean[Dv] = { 0 };
                    for (int64_t j = 0; j < Sk; j++)
                        if (sees(c, i, j)) {
                            n++;
                            for (int64_t e = 0; e < Dv; e++) mean[e] += c->vf[(j * Hkv + hk) * Dv + e];
                        }
                    if (n == 0) continue;
                    double dd = 0;
                    for (int64_t e = 0; e < Dv; e++) dd += dO[e] * mean[e] / n;
                    for (int64_t j = 0; j < Sk; j++) {
                        if (!sees(c, i, j)) continue;
                        double dp = 0;
                        for (int64_t e = 0; e < Dv; e++) {
                            dp += dO[e] * (double)c->vf[(j * Hkv + hk) * Dv + e];
                            dv[(j * Hkv + hk) * Dv + e] += dO[e] / n;
                        }
                        for (int64_t d = 0; d < D; d++)
                            dk[(j * Hkv + hk) * D + d] += scale * (dp - dd) * qi[d] / n;
                    }
                }
            }
            for (size_t e = 0; e < sizeof wdv / sizeof wdv[0]; e++) wdv[e] = (float)dv[e];
            for (size_t e = 0; e < sizeof wdk / sizeof wdk[0]; e++) wdk[e] = (float)dk[e];
            compare(t ? "equal keys, causal: dq = 0" : "equal keys: dq = 0", b.gq, QKV_F32, zero,
                    Sq * Hq * D, 1e-5, 0);
            compare(t ? "equal keys, causal: dv" : "equal keys: dv", b.gv, QKV_F32, wdv,
                    Sk * Hkv * Dv, 1e-5, 1e-5);
            compare(t ? "equal keys, causal: dk" : "equal keys: dk", b.gk, QKV_F32, wdk,
                    Sk * Hkv * D, 1e-5, 1e-5);
        }
        bcase_free(&b);
    }

    /* Equal values (v stride 0 along the sequence): out = v_0 whatever P
       is, so dP_j = Dd_i and dq = dk = 0 (up to out's rounding).
       Zero dout: every gradient exactly 0. */
    for (int t = 0; t < 2; t++) {
        bcase b;
        memset(&b, 0, sizeof b);
        acase *c = &b.c;
        acase_init(c, 2, 4, 5, 2, 1, 4, 3, QKV_F32);
        c->seed = 60 + (uint64_t)t;
        c->softcap = 1.0f;
        c->alibi = 1;
        b.lay_g = LAY_NEG;
        acase_build(c);
        if (t == 0)
            c->tv.stride[1] = 0;
        bcase_prepare(ctx, &b);
        if (t == 1)
            tbuf_fill_byte(&b.dout, 0);
        if (bcase_backward(ctx, &b, t ? "zero dout" : "equal values") == QKV_OK) {
            size_t nq = (size_t)numel(&c->tq), nk = (size_t)numel(&c->tk);
            float *zero = xmalloc(nq * sizeof(float));
            memset(zero, 0, nq * sizeof(float));
            if (t == 0) {
                compare("equal values: dq = 0", b.gq, QKV_F32, zero, nq, 1e-6, 0);
                compare("equal values: dk = 0", b.gk, QKV_F32, zero, nk, 1e-6, 0);
            } else {
                size_t nv = (size_t)numel(&c->tv);
                CHECK(count_nonzero(b.gq, nq) + count_nonzero(b.gk, nk) + count_nonzero(b.gv, nv) == 0,
                      "zero dout: %zu gradient elements not 0",
                      count_nonzero(b.gq, nq) + count_nonzero(b.gk, nk) + count_nonzero(b.gv, nv));
            }
            free(zero);
        }
        bcase_free(&b);
    }
    qkv_ctx_free(ctx);
}

/* ---- rows that see no key ----------------------------------------------------- */

static int all_finite(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

void test_backward_ref_empty_rows(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2);
    CHECK(ctx != NULL, "qkv_ctx_create(2)");
    if (!ctx) return;

    /* causal Sq > Sk: rows 0..3 see nothing; window (0,0) with Sq > Sk: rows
       0, 1; a -inf bias row; varlen sequences with no keys; and scores so
       large (scale 60, softcap 0.05) that P saturates and tanh' underflows */
    for (int t = 0; t < 6; t++) {
        bcase b;
        memset(&b, 0, sizeof b);
        acase *c = &b.c;
        acase_init(c, 2, 7, t == 1 ? 5 : 3, 2, 1, 4, 3, QKV_F32);
        c->seed = 70 + (uint64_t)t;
        if (t == 0) c->causal = 1;
        if (t == 1) { c->wl = c->wr = 0; c->scale = -0.7f; }   /* -0.7·0 must store +0 */
        if (t == 2) { c->bias = BIAS_FULL; c->bias_neg_row = 1; }
        if (t == 3) {
            /* (sq, sk) = (3, 0): rows that see nothing; (0, 3): keys nobody
               sees; (4, 1) */
            static const int32_t q[4] = { 0, 3, 3, 7 }, k[4] = { 0, 0, 3, 4 };
            c->B = 1; c->Sk = 4; c->n_seqs = 3;
            memcpy(c->cu_q, q, sizeof q);
            memcpy(c->cu_k, k, sizeof k);
        }
        if (t >= 4) { c->scale = 60.0f; c->softcap = t == 5 ? 0.05f : 0.0f; c->causal = 1; }
        b.lay_g = LAY_REVD;
        acase_build(c);
        bcase_prepare(ctx, &b);
        if (bcase_backward(ctx, &b, "empty rows") != QKV_OK) {
            bcase_free(&b);
            continue;
        }
        size_t nq = (size_t)numel(&c->tq), nk = (size_t)numel(&c->tk), nv = (size_t)numel(&c->tv);
        CHECK(all_finite(b.gq, nq) && all_finite(b.gk, nk) && all_finite(b.gv, nv),
              "empty rows: a gradient is not finite [%s]", acase_str(c));
        int bad = 0, empty = 0, lse_bad = 0;
        for (int64_t bb = 0; bb < c->B; bb++)
            for (int64_t i = 0; i < c->Sq; i++)
                for (int64_t h = 0; h < c->Hq; h++) {
                    int none = ((t == 0 || t >= 4) && i < 4) || (t == 1 && i < 2) || (t == 2 && i == c->Sq / 2) ||
                               (t == 3 && i < 3);
                    if (!none) continue;
                    empty++;
                    lse_bad += b.lse[(bb * c->Hq + h) * c->Sq + i] != -INFINITY;
                    for (int64_t d = 0; d < c->D; d++) {
                        float x = b.gq[((bb * c->Sq + i) * c->Hq + h) * c->D + d];
                        bad += x != 0.0f || signbit(x);
                    }
                }
        CHECK(lse_bad == 0, "empty rows: the forward gave %d of them a finite lse [%s]", lse_bad,
              acase_str(c));
        CHECK(bad == 0, "empty rows: %d dq elements of rows that see no key are not +0 [%s]", bad,
              acase_str(c));
        CHECK(empty > 0, "empty rows: case %d has none", t);
        if (t == 3) {   /* keys 0..2: sequence 1 has no query */
            size_t nz = count_nonzero(b.gk, (size_t)(3 * c->Hkv * c->D)) +
                        count_nonzero(b.gv, (size_t)(3 * c->Hkv * c->Dv));
            CHECK(nz == 0, "varlen: %zu dk/dv elements of keys no query sees are not 0", nz);
        }
        bcase_free(&b);
    }

    /* A row passed lse = -inf contributes nothing: the same dk and dv as
       when that row's dout is zero, and dq 0 for it. */
    {
        bcase b;
        memset(&b, 0, sizeof b);
        acase *c = &b.c;
        acase_init(c, 1, 5, 6, 4, 2, 4, 3, QKV_F32);
        c->seed = 80;
        b.lay_g = LAY_CONTIG;
        acase_build(c);
        bcase_prepare(ctx, &b);
        const int64_t h = 1, i = 2;
        float *lse_row = &b.lse[h * c->Sq + i], saved = *lse_row;
        *lse_row = -INFINITY;
        if (bcase_backward(ctx, &b, "lse -inf") == QKV_OK) {
            size_t nk = (size_t)numel(&c->tk), nv = (size_t)numel(&c->tv);
            float *dk1 = b.gk, *dv1 = b.gv;
            b.gk = b.gv = NULL;
            int bad = 0;
            for (int64_t d = 0; d < c->D; d++) bad += b.gq[(i * c->Hq + h) * c->D + d] != 0.0f;
            CHECK(bad == 0, "lse -inf: %d dq elements of that row are not 0", bad);
            *lse_row = saved;
            for (int64_t e = 0; e < c->Dv; e++) *elem(&b.dout.t, 0, i, h, e) = 0.0f;
            if (bcase_backward(ctx, &b, "zero dout row") == QKV_OK) {
                same_floats("row with lse -inf == row with zero dout: dk", dk1, b.gk, nk);
                same_floats("row with lse -inf == row with zero dout: dv", dv1, b.gv, nv);
            }
            free(dk1);
            free(dv1);
        }
        bcase_free(&b);
    }
    qkv_ctx_free(ctx);
}

/* ---- threads and dtypes ------------------------------------------------------- */

static int same_bytes(const tbuf *a, const tbuf *b)
{
    return a->bytes == b->bytes && memcmp(a->buf, b->buf, a->bytes) == 0;
}

/* Bitwise the same gradients with 1, 2 and 5 threads. */
void test_backward_ref_threads(void)
{
    static const int threads[3] = { 1, 2, 5 };
    for (int t = 0; t < 2; t++) {
        bcase b;
        memset(&b, 0, sizeof b);
        acase *c = &b.c;
        acase_init(c, 2, 37, 45, 4, 2, 8, 5, QKV_F32);
        c->seed = 90 + (uint64_t)t;
        c->causal = 1;
        c->alibi = 1;
        c->softcap = 2.0f;
        b.lay_g = LAY_PAD;
        if (t == 1) {
            rng r = rng_seed(91);
            acase_random_varlen(c, &r, 4, 30);
        }
        acase_build(c);
        qkv_ctx *ctx[3];
        for (int n = 0; n < 3; n++) {
            ctx[n] = qkv_ctx_create(threads[n]);
            CHECK(ctx[n] != NULL, "qkv_ctx_create(%d)", threads[n]);
        }
        if (ctx[0] && ctx[1] && ctx[2]) {
            bcase_prepare(ctx[0], &b);
            tbuf g0[3];
            memset(g0, 0, sizeof g0);
            for (int n = 0; n < 3; n++) {
                if (bcase_backward(ctx[n], &b, "threads") != QKV_OK)
                    break;
                if (n == 0) {
                    g0[0] = b.dq; g0[1] = b.dk; g0[2] = b.dv;
                    for (int x = 0; x < 3; x++) {
                        tbuf *src = x == 0 ? &b.dq : x == 1 ? &b.dk : &b.dv;
                        g0[x].buf = xmalloc(src->bytes);
                        memcpy(g0[x].buf, src->buf, src->bytes);
                    }
                    continue;
                }
                CHECK(same_bytes(&g0[0], &b.dq) && same_bytes(&g0[1], &b.dk) &&
                      same_bytes(&g0[2], &b.dv),
                      "gradients with %d threads differ from 1 thread [%s]", threads[n], acase_str(c));
            }
            for (int x = 0; x < 3; x++) free(g0[x].buf);
        }
        for (int n = 0; n < 3; n++) qkv_ctx_free(ctx[n]);
        bcase_free(&b);
    }
}

/* fp16 / bf16 gradients are the fp32 ones rounded: the reference reads
   every input as fp32 and stores (float)x, so with the same values in both
   dtypes (inputs, out and dout representable in dt) the dt result is the
   rounding of the fp32 result, bit for bit. */
void test_backward_ref_dtypes(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2);
    CHECK(ctx != NULL, "qkv_ctx_create(2)");
    if (!ctx) return;
    for (qkv_dtype dt = QKV_F16; dt <= QKV_BF16; dt++) {
        bcase lo, hi;
        memset(&lo, 0, sizeof lo);
        memset(&hi, 0, sizeof hi);
        for (int x = 0; x < 2; x++) {
            bcase *b = x ? &hi : &lo;
            acase_init(&b->c, 2, 6, 7, 4, 2, 5, 3, x ? QKV_F32 : dt);
            b->c.seed = 95;
            b->c.causal = 1;
            b->c.softcap = 1.5f;
            b->lay_g = LAY_INNER2;
            b->c.lay_q = LAY_NEG;
        }
        acase_build(&lo.c);
        bcase_prepare(ctx, &lo);
        /* hi: the same values in fp32 (inputs, out, dout) and the same lse */
        acase_build(&hi.c);
        for (int x = 0; x < 3; x++) {
            const qkv_tensor *src = x == 0 ? &lo.c.tq : x == 1 ? &lo.c.tk : &lo.c.tv;
            const qkv_tensor *dst = x == 0 ? &hi.c.tq : x == 1 ? &hi.c.tk : &hi.c.tv;
            float *f = gather_f32(src);
            const int64_t *s = dst->shape;
            for (int64_t e = 0; e < numel(dst); e++)
                *elem(dst, e / (s[3] * s[2] * s[1]), e / (s[3] * s[2]) % s[1], e / s[3] % s[2],
                      e % s[3]) = f[e];
            free(f);
        }
        bcase_prepare(ctx, &hi);
        float *of = gather_f32(&lo.out.t);
        const int64_t *s = hi.out.t.shape;
        for (int64_t e = 0; e < numel(&hi.out.t); e++) {
            int64_t i0 = e / (s[3] * s[2] * s[1]), i1 = e / (s[3] * s[2]) % s[1], i2 = e / s[3] % s[2],
                    i3 = e % s[3];
            *elem(&hi.out.t, i0, i1, i2, i3) = of[e];
            *elem(&hi.dout.t, i0, i1, i2, i3) = lo.doutf[e];
        }
        memcpy(hi.lse, lo.lse, lo.c.n_lse * sizeof(float));
        free(of);
        if (bcase_backward(ctx, &lo, dtype_name(dt)) == QKV_OK &&
            bcase_backward(ctx, &hi, "f32") == QKV_OK) {
            const float *gl[3] = { lo.gq, lo.gk, lo.gv }, *gh[3] = { hi.gq, hi.gk, hi.gv };
            const int64_t n[3] = { numel(&lo.c.tq), numel(&lo.c.tk), numel(&lo.c.tv) };
            for (int x = 0; x < 3; x++) {
                void *r = xmalloc((size_t)n[x] * 2);
                float *rf = xmalloc((size_t)n[x] * sizeof(float));
                qkv_convert(gh[x], QKV_F32, r, dt, (size_t)n[x]);
                qkv_convert(r, dt, rf, QKV_F32, (size_t)n[x]);
                char name[64];
                snprintf(name, sizeof name, "%s %s == rounded f32", dtype_name(dt),
                         x == 0 ? "dq" : x == 1 ? "dk" : "dv");
                same_floats(name, gl[x], rf, (size_t)n[x]);
                free(r);
                free(rf);
            }
        }
        bcase_free(&lo);
        bcase_free(&hi);
    }
    qkv_ctx_free(ctx);
}

/* ---- argument errors ---------------------------------------------------------- */

/* baseline: valid, small; buffers are larger than any mutated shape needs */
enum { EB = 2, ESQ = 5, ESK = 7, EHQ = 4, EHKV = 2, ED = 8, EDV = 6, ECAP = 4096 };

typedef struct {
    qkv_ctx      *ctx;
    qkv_tensor    q, k, v, out, dout, dq, dk, dv, bias;
    qkv_attn_opts opts;
    /* what is passed: point elsewhere (or NULL) to test pointers */
    qkv_tensor   *pq, *pk, *pv, *pout, *pdout, *pdq, *pdk, *pdv;
    qkv_attn_opts *popts;
    float        *lse;
    int32_t       cu_q[4], cu_k[4];
    float         qb[ECAP], kb[ECAP], vb[ECAP], ob[ECAP], gb[ECAP], bb[ECAP], lb[ECAP];
    unsigned char dqb[ECAP * 4], dkb[ECAP * 4], dvb[ECAP * 4];
} berr;

static void bsetup(berr *e, qkv_ctx *ctx)
{
    memset(e, 0, sizeof *e);
    e->ctx = ctx;
    rng r = rng_seed(18);
    fill_random(e->qb, QKV_F32, ECAP, &r);
    fill_random(e->kb, QKV_F32, ECAP, &r);
    fill_random(e->vb, QKV_F32, ECAP, &r);
    fill_random(e->ob, QKV_F32, ECAP, &r);
    fill_random(e->gb, QKV_F32, ECAP, &r);
    for (int i = 0; i < ECAP; i++)
        e->lb[i] = 1.5f;
    e->q = qkv_tensor_4d(e->qb, QKV_F32, EB, ESQ, EHQ, ED);
    e->k = qkv_tensor_4d(e->kb, QKV_F32, EB, ESK, EHKV, ED);
    e->v = qkv_tensor_4d(e->vb, QKV_F32, EB, ESK, EHKV, EDV);
    e->out = qkv_tensor_4d(e->ob, QKV_F32, EB, ESQ, EHQ, EDV);
    e->dout = qkv_tensor_4d(e->gb, QKV_F32, EB, ESQ, EHQ, EDV);
    e->dq = qkv_tensor_4d(e->dqb, QKV_F32, EB, ESQ, EHQ, ED);
    e->dk = qkv_tensor_4d(e->dkb, QKV_F32, EB, ESK, EHKV, ED);
    e->dv = qkv_tensor_4d(e->dvb, QKV_F32, EB, ESK, EHKV, EDV);
    e->bias = qkv_tensor_4d(e->bb, QKV_F32, EB, EHQ, ESQ, ESK);
    e->opts = qkv_attn_opts_default();
    e->pq = &e->q; e->pk = &e->k; e->pv = &e->v; e->pout = &e->out; e->pdout = &e->dout;
    e->pdq = &e->dq; e->pdk = &e->dk; e->pdv = &e->dv;
    e->popts = &e->opts;
    e->lse = e->lb;
}


static qkv_status bcall(berr *e)
{
    return qkv_attention_backward_reference(e->ctx, e->pq, e->pk, e->pv, e->pout, e->pdout,
                                            e->lse, e->popts, e->pdq, e->pdk, e->pdv);
}

/* The call must fail with `want`, write nothing (the gradient buffers keep
   their sentinel, the inputs their values) and name the argument(s). */
static void bexpect(berr *e, const char *label, qkv_status want, const char *names)
{
    static float in[7][ECAP];
    float *const bufs[7] = { e->qb, e->kb, e->vb, e->ob, e->gb, e->bb, e->lb };
    for (int i = 0; i < 7; i++) memcpy(in[i], bufs[i], sizeof in[i]);
    memset(e->dqb, 0xA7, sizeof e->dqb);
    memset(e->dkb, 0xA7, sizeof e->dkb);
    memset(e->dvb, 0xA7, sizeof e->dvb);
    qkv_status st = bcall(e);
    CHECK(st == want, "backward reference %s: status %d (%s), want %d (%s)", label, st,
          qkv_status_string(st), want, qkv_status_string(want));
    int ok = 1;
    for (size_t i = 0; i < sizeof e->dqb; i++)
        ok &= e->dqb[i] == 0xA7 && e->dkb[i] == 0xA7 && e->dvb[i] == 0xA7;
    CHECK(ok, "backward reference %s: a gradient was written by a failing call", label);
    int same = 1;
    for (int i = 0; i < 7; i++) same &= memcmp(in[i], bufs[i], sizeof in[i]) == 0;
    CHECK(same, "backward reference %s: an input was written by a failing call", label);
    if (e->ctx && names) {
        const char *msg = qkv_ctx_last_error(e->ctx);
        CHECK(msg && msg_names(msg, names), "backward reference %s: message \"%s\" does not name %s",
              label, msg ? msg : "(null)", names);
    }
}

static void bexpect_ok(berr *e, const char *label)
{
    qkv_status st = bcall(e);
    CHECK(st == QKV_OK, "backward reference %s: status %d (%s): %s", label, st,
          qkv_status_string(st), qkv_ctx_last_error(e->ctx));
}

void test_backward_ref_errors(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2);
    CHECK(ctx != NULL, "qkv_ctx_create(2)");
    if (!ctx) return;
    static berr e;
    bsetup(&e, ctx); bexpect_ok(&e, "baseline");

    /* pointers */
    bsetup(&e, NULL); bexpect(&e, "NULL ctx", QKV_ERR_NULL, NULL);
#define P(field, name) do { bsetup(&e, ctx); field = NULL; \
        bexpect(&e, "NULL " name, QKV_ERR_NULL, name); } while (0)
    P(e.pq, "q"); P(e.pk, "k"); P(e.pv, "v"); P(e.pout, "out"); P(e.popts, "opts");
    P(e.pdout, "dout"); P(e.pdq, "dq"); P(e.pdk, "dk"); P(e.pdv, "dv"); P(e.lse, "lse");
    P(e.out.data, "out->data"); P(e.dout.data, "dout->data"); P(e.dq.data, "dq->data");
    P(e.dk.data, "dk->data"); P(e.dv.data, "dv->data"); P(e.q.data, "q->data");
#undef P

    /* dtypes: every tensor shares q's */
    for (int dt = QKV_F16; dt <= QKV_BF16; dt++) {
        bsetup(&e, ctx);
        e.q.dtype = e.k.dtype = e.v.dtype = e.out.dtype = e.dout.dtype = (qkv_dtype)dt;
        e.dq.dtype = e.dk.dtype = e.dv.dtype = (qkv_dtype)dt;
        bexpect_ok(&e, dt == QKV_F16 ? "all f16" : "all bf16");
    }
#define T(field, val, name) do { bsetup(&e, ctx); field = val; \
        bexpect(&e, name " = " #val, QKV_ERR_DTYPE, name); } while (0)
    T(e.dout.dtype, QKV_F16, "dout->dtype"); T(e.dq.dtype, QKV_BF16, "dq->dtype");
    T(e.dk.dtype, QKV_F16, "dk->dtype"); T(e.dv.dtype, QKV_BF16, "dv->dtype");
    T(e.dq.dtype, (qkv_dtype)7, "dq->dtype"); T(e.dout.dtype, (qkv_dtype)-1, "dout->dtype");
    T(e.out.dtype, QKV_F16, "out->dtype"); T(e.k.dtype, QKV_BF16, "k->dtype");
#undef T

    /* shapes: each gradient like its primal, dout like out */
    {
        qkv_tensor *g[4] = { &e.dout, &e.dq, &e.dk, &e.dv };
        static const char *const gn[4] = { "dout", "dq", "dk", "dv" };
        static const char *const pn[4] = { "out", "q", "k", "v" };
        for (int x = 0; x < 4; x++)
            for (int d = 0; d < 4; d++)
                for (int delta = -1; delta <= 1; delta += 2) {
                    bsetup(&e, ctx);
                    g[x]->shape[d] += delta;
                    char what[64], names[64];
                    snprintf(what, sizeof what, "%s->shape[%d] %+d", gn[x], d, delta);
                    snprintf(names, sizeof names, "%s->shape[%d]&%s->shape[%d]", gn[x], d, pn[x], d);
                    bexpect(&e, what, QKV_ERR_SHAPE, names);
                }
        for (int x = 0; x < 4; x++) {
            char what[64], names[32];
            bsetup(&e, ctx); g[x]->shape[1] = 0;
            snprintf(what, sizeof what, "%s->shape[1] = 0", gn[x]);
            snprintf(names, sizeof names, "%s->shape[1]", gn[x]);
            bexpect(&e, what, QKV_ERR_SHAPE, names);
            bsetup(&e, ctx); g[x]->stride[0] = (int64_t)1 << 62;
            snprintf(what, sizeof what, "%s->stride[0] = 2^62", gn[x]);
            bexpect(&e, what, QKV_ERR_OVERFLOW, gn[x]);
            bsetup(&e, ctx); g[x]->stride[3] = INT64_MIN;
            snprintf(what, sizeof what, "%s->stride[3] = INT64_MIN", gn[x]);
            bexpect(&e, what, QKV_ERR_OVERFLOW, gn[x]);
        }
    }
    bsetup(&e, ctx); e.out.shape[3] = EDV + 1;
    bexpect(&e, "out->shape[3] != v->shape[3]", QKV_ERR_SHAPE, "out->shape[3]");
    bsetup(&e, ctx); e.k.shape[2] = e.v.shape[2] = e.dk.shape[2] = e.dv.shape[2] = 3;
    bexpect(&e, "Hq % Hkv != 0", QKV_ERR_SHAPE, "q->shape[2]&k->shape[2]");

    /* gradients must not overlap themselves */
    {
        qkv_tensor *g[3] = { &e.dq, &e.dk, &e.dv };
        static const char *const gn[3] = { "dq", "dk", "dv" };
        for (int x = 0; x < 3; x++)
            for (int d = 0; d < 4; d++) {
                char what[64], name[32];
                bsetup(&e, ctx);
                g[x]->stride[d] = 0;
                snprintf(what, sizeof what, "%s->stride[%d] = 0", gn[x], d);
                snprintf(name, sizeof name, "%s->stride[%d]", gn[x], d);
                bexpect(&e, what, QKV_ERR_STRIDE, name);
            }
        bsetup(&e, ctx); e.dq.stride[2] = ED / 2;   /* heads overlap by half a row */
        bexpect(&e, "dq heads overlap", QKV_ERR_STRIDE, "dq->stride[2]");
        bsetup(&e, ctx); e.dv.stride[1] = -EHKV * EDV + 1;
        e.dv.data = e.dvb + sizeof e.dvb / 2;
        bexpect(&e, "dv rows overlap (negative stride)", QKV_ERR_STRIDE, "dv->stride[1]");
    }
    /* inputs may broadcast, out and dout included (they are inputs here) */
    bsetup(&e, ctx); e.q.stride[0] = 0; e.k.stride[2] = 0; e.out.stride[1] = 0; e.dout.stride[2] = 0;
    bexpect_ok(&e, "zero-stride inputs");
    bsetup(&e, ctx);
    e.dq.stride[1] = -EHQ * ED;
    e.dq.data = e.dqb + (size_t)(ESQ - 1) * EHQ * ED * sizeof(float);
    e.dq.shape[0] = e.dk.shape[0] = e.dv.shape[0] = 1;
    e.q.shape[0] = e.k.shape[0] = e.v.shape[0] = e.out.shape[0] = e.dout.shape[0] = 1;
    bexpect_ok(&e, "negative dq stride");

    /* gradients must not share memory with each other or with an input */
    const size_t F = sizeof(float);
    bsetup(&e, ctx); e.dq.data = e.qb;            bexpect(&e, "dq on q", QKV_ERR_ARG, "dq&q");
    bsetup(&e, ctx); e.dk.data = e.kb + 3;        bexpect(&e, "dk on k + 3", QKV_ERR_ARG, "dk&k");
    bsetup(&e, ctx); e.dv.data = e.vb;            bexpect(&e, "dv on v", QKV_ERR_ARG, "dv&v");
    bsetup(&e, ctx); e.dq.data = e.ob + 100;      bexpect(&e, "dq in out", QKV_ERR_ARG, "dq&out");
    bsetup(&e, ctx); e.dv.data = e.gb + 7;        bexpect(&e, "dv in dout", QKV_ERR_ARG, "dv&dout");
    bsetup(&e, ctx); e.dk.data = e.lb + 10;       bexpect(&e, "dk in lse", QKV_ERR_ARG, "dk&lse");
    bsetup(&e, ctx); e.dk.data = e.dv.data;       bexpect(&e, "dk on dv", QKV_ERR_ARG, "dk&dv");
    bsetup(&e, ctx);                              /* dk's first element is dq's last */
    e.dk.data = e.dqb + (size_t)(EB * ESQ * EHQ * ED - 1) * F;
    bexpect(&e, "dk starts on dq's last element", QKV_ERR_ARG, "dq&dk");
    bsetup(&e, ctx);                              /* interleaved, sharing every other element */
    e.dq.stride[3] = 2; e.dq.stride[2] = 2 * ED; e.dq.stride[1] = 2 * EHQ * ED;
    e.dq.stride[0] = 2 * ESK * EHQ * ED;
    e.dv = e.dq;
    e.dv.shape[1] = ESK; e.dv.shape[2] = EHKV; e.dv.shape[3] = EDV;
    e.dv.data = e.dqb + 2 * F * (2 * EHQ * ED + ED);
    bexpect(&e, "dv on every other element of dq", QKV_ERR_ARG, "dq&dv");
    bsetup(&e, ctx);                              /* half an fp16 element off */
    e.q.dtype = e.k.dtype = e.v.dtype = e.out.dtype = e.dout.dtype = QKV_F16;
    e.dq.dtype = e.dk.dtype = e.dv.dtype = QKV_F16;
    e.dv.data = e.dqb + 2 * 2 * 16 + 1;
    e.dv.stride[3] = 2; e.dv.stride[2] = 2 * EDV; e.dv.stride[1] = 2 * EHKV * EDV;
    e.dv.stride[0] = 2 * ESK * EHKV * EDV;
    e.dq.stride[3] = 2; e.dq.stride[2] = 2 * ED; e.dq.stride[1] = 2 * EHQ * ED;
    e.dq.stride[0] = 2 * ESQ * EHQ * ED;
    bexpect(&e, "dv misaligned inside dq's range", QKV_ERR_ARG, "dq&dv");

    /* interleaved without sharing an element: dq, dk, dv as the three
       slices of one packed [B, S, 3, H, 8] buffer (as a packed dqkv); the
       gradients equal those of separate buffers */
    {
        bsetup(&e, ctx);
        bexpect_ok(&e, "separate");
        static unsigned char want[3][ECAP * 4];
        memcpy(want[0], e.dqb, sizeof want[0]);
        memcpy(want[1], e.dkb, sizeof want[1]);
        memcpy(want[2], e.dvb, sizeof want[2]);
        static float packed[EB * ESK * 3 * EHQ * ED];
        const int64_t st[4] = { ESK * 3 * EHQ * ED, 3 * EHQ * ED, ED, 1 };
        qkv_tensor *g[3] = { &e.dq, &e.dk, &e.dv };
        for (int x = 0; x < 3; x++) {
            memcpy(g[x]->stride, st, sizeof st);
            g[x]->data = packed + x * EHQ * ED;
        }
        bexpect_ok(&e, "packed dq, dk, dv");
        int same = 1;
        for (int x = 0; x < 3; x++) {
            const int64_t *s = g[x]->shape;
            const float *w = (const float *)want[x];
            for (int64_t a = 0; a < s[0]; a++)
                for (int64_t b = 0; b < s[1]; b++)
                    for (int64_t c = 0; c < s[2]; c++)
                        for (int64_t d = 0; d < s[3]; d++)
                            same &= memcmp(elem(g[x], a, b, c, d),
                                           &w[((a * s[1] + b) * s[2] + c) * s[3] + d], F) == 0;
        }
        CHECK(same, "packed dq, dk, dv differ from separate buffers");
    }

    /* the forward's checks still apply */
    bsetup(&e, ctx); e.opts.window_left = -2;
    bexpect(&e, "window_left -2", QKV_ERR_ARG, "opts->window_left");
    bsetup(&e, ctx); e.opts.scale = NAN; bexpect(&e, "scale NaN", QKV_ERR_ARG, "opts->scale");
    bsetup(&e, ctx); e.opts.softcap = -1; bexpect(&e, "softcap -1", QKV_ERR_ARG, "opts->softcap");
    bsetup(&e, ctx); e.opts.bias = &e.bias; bexpect_ok(&e, "bias");
    bsetup(&e, ctx); e.opts.bias = &e.bias; e.bias.dtype = QKV_F16;
    bexpect(&e, "bias f16", QKV_ERR_DTYPE, "opts->bias->dtype");
    bsetup(&e, ctx); e.opts.bias = &e.bias; e.bias.shape[2] = ESQ + 1;
    bexpect(&e, "bias seqlen_q", QKV_ERR_SHAPE, "opts->bias->shape[2]");

    /* varlen: 3 sequences (one empty) packed in batch 1 */
    {
        static const int32_t q[4] = { 0, 3, 3, 10 }, k[4] = { 0, 5, 7, 12 };
#define VARLEN() do { bsetup(&e, ctx); memcpy(e.cu_q, q, sizeof q); memcpy(e.cu_k, k, sizeof k); \
        e.q.shape[0] = e.k.shape[0] = e.v.shape[0] = e.out.shape[0] = e.dout.shape[0] = 1; \
        e.dq.shape[0] = e.dk.shape[0] = e.dv.shape[0] = 1; \
        e.q.shape[1] = e.out.shape[1] = e.dout.shape[1] = e.dq.shape[1] = 10; \
        e.k.shape[1] = e.v.shape[1] = e.dk.shape[1] = e.dv.shape[1] = 12; \
        e.opts.cu_seqlens_q = e.cu_q; e.opts.cu_seqlens_k = e.cu_k; e.opts.n_seqs = 3; } while (0)
        VARLEN(); bexpect_ok(&e, "varlen");
        VARLEN(); e.cu_q[3] = 11;
        bexpect(&e, "cu_seqlens_q past q->shape[1]", QKV_ERR_SHAPE, "opts->cu_seqlens_q");
        VARLEN(); e.opts.n_seqs = 0; bexpect(&e, "n_seqs 0", QKV_ERR_SHAPE, "opts->n_seqs");
        VARLEN(); e.dk.shape[1] = 11;
        bexpect(&e, "varlen dk->shape[1]", QKV_ERR_SHAPE, "dk->shape[1]&k->shape[1]");
        VARLEN(); e.opts.bias = &e.bias;
        bexpect(&e, "bias with varlen", QKV_ERR_UNSUPPORTED, "opts->bias");
#undef VARLEN
    }
    qkv_ctx_free(ctx);
}
