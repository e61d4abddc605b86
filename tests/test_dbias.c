/*
 * test_dbias.c — the gradient of the bias: qkv_attention_backward_dbias
 * and its reference.
 *
 *   - the reference's dbias against central finite differences of the
 *     reference forward's loss L = Σ dout∘out, element by element of the
 *     bias, for every broadcast shape of the bias, with causal masks,
 *     softcap (the bias is added after capping: no tanh factor), ALiBi and
 *     GQA; -inf bias elements get exactly 0;
 *   - the fast dbias against the reference on every kernel set and dtype,
 *     across tiles, with strided dbias views and sentinels around them;
 *     dq, dk and dv bitwise those of qkv_attention_backward;
 *   - bitwise identical for 1, 2, 3 and 5 threads;
 *   - every bad dbias refused with every output untouched.
 */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { DB_SENTINEL = 0xB9 };

/* A backward problem with its forward done: out, lse, dout, gradient and
   dbias views (dbias of the bias's shape, layout lay). */
typedef struct {
    acase  c;
    tbuf   out, dout, dq, dk, dv, db;
    float *lse;
} dcase;

static void dcase_prepare(qkv_ctx *ctx, dcase *d, int lay)
{
    acase *c = &d->c;
    acase_build(c);
    acase_make_out(c, &d->out, c->dt);
    d->lse = acase_make_lse(c);
    qkv_status st = qkv_attention_forward(ctx, &c->tq, &c->tk, &c->tv, &c->opts, &d->out.t,
                                          d->lse);
    CHECK(st == QKV_OK, "forward: %s [%s]", qkv_ctx_last_error(ctx), acase_str(c));
    rng r = rng_seed(c->seed ^ 0xDB1A5ull);
    const int64_t so[4] = { c->B, c->Sq, c->Hq, c->Dv }, sq[4] = { c->B, c->Sq, c->Hq, c->D };
    const int64_t sk[4] = { c->B, c->Sk, c->Hkv, c->D }, sv[4] = { c->B, c->Sk, c->Hkv, c->Dv };
    tbuf_make_layout(&d->dout, c->dt, so, LAY_CONTIG);
    tbuf_fill_random(&d->dout, &r);
    tbuf_make_layout(&d->dq, c->dt, sq, LAY_CONTIG);
    tbuf_make_layout(&d->dk, c->dt, sk, LAY_CONTIG);
    tbuf_make_layout(&d->dv, c->dt, sv, LAY_CONTIG);
    tbuf_make_layout(&d->db, QKV_F32, c->bias_t.t.shape, lay);
}

static void dcase_free(dcase *d)
{
    tbuf_free(&d->out); tbuf_free(&d->dout);
    tbuf_free(&d->dq); tbuf_free(&d->dk); tbuf_free(&d->dv); tbuf_free(&d->db);
    acase_free_lse(d->lse);
    acase_free(&d->c);
}

static qkv_status run(qkv_ctx *ctx, dcase *d, int reference)
{
    acase *c = &d->c;
    tbuf_fill_byte(&d->dq, DB_SENTINEL);
    tbuf_fill_byte(&d->dk, DB_SENTINEL);
    tbuf_fill_byte(&d->dv, DB_SENTINEL);
    tbuf_fill_byte(&d->db, DB_SENTINEL);
    return (reference ? qkv_attention_backward_dbias_reference : qkv_attention_backward_dbias)(
        ctx, &c->tq, &c->tk, &c->tv, &d->out.t, &d->dout.t, d->lse, &c->opts, &d->dq.t,
        &d->dk.t, &d->dv.t, &d->db.t);
}

static int64_t numel(const qkv_tensor *t)
{
    return t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3];
}

/* dbias as a contiguous fp32 array; CHECKs nothing outside its view moved. */
static float *collect_db(const dcase *d, const char *label)
{
    CHECK(tbuf_outside_changed(&d->db, DB_SENTINEL) == 0, "%s: dbias written outside its "
          "view [%s]", label, acase_str(&d->c));
    float *f = xmalloc((size_t)numel(&d->db.t) * sizeof(float));
    view_gather(&d->db.t, f);
    return f;
}

/* The bias element of the case's bias view, and the logical index e. */
static float *bias_elem(const qkv_tensor *b, int64_t e)
{
    const int64_t *sh = b->shape;
    const int64_t i3 = e % sh[3], i2 = e / sh[3] % sh[2], i1 = e / (sh[3] * sh[2]) % sh[1],
                  i0 = e / (sh[3] * sh[2] * sh[1]);
    return (float *)b->data + i0 * b->stride[0] + i1 * b->stride[1] + i2 * b->stride[2] +
           i3 * b->stride[3];
}

/* L = Σ dout∘out with out from the reference forward, summed in double. */
static double loss(qkv_ctx *ctx, const dcase *d, tbuf *o, const float *doutf)
{
    const acase *c = &d->c;
    if (qkv_attention_reference(ctx, &c->tq, &c->tk, &c->tv, &c->opts, &o->t, NULL) != QKV_OK)
        return NAN;
    const float *of = o->t.data;
    double L = 0.0;
    for (size_t e = 0; e < c->n_out; e++)
        L += (double)doutf[e] * of[e];
    return L;
}

/* See test_backward_ref.c for the finite-difference error budget: the
   bias enters the scores additively, so the step and tolerance that hold
   for q, k and v hold here with scale-free curvature. */
#define FD_STEP 1e-2
#define FD_TOL  2e-3

void test_dbias_fd(void)
{
    static const struct { int bias, causal, alibi, gqa; float softcap; } cases[] = {
        { BIAS_FULL, 0, 0, 0, 0 },  { BIAS_FULL, 1, 0, 1, 0 }, { BIAS_B1, 0, 1, 0, 0 },
        { BIAS_H1, 1, 0, 1, 0.8f }, { BIAS_11, 0, 0, 1, 0 },  { BIAS_PAD, 0, 0, 0, 1.5f },
        { BIAS_KEYS, 1, 0, 0, 0 },  { BIAS_ROWS, 0, 1, 1, 0 }, { BIAS_KEYS, 0, 0, 1, 0.6f },
    };
    qkv_ctx *ctx = qkv_ctx_create(1);
    CHECK(ctx != NULL, "qkv_ctx_create");
    if (!ctx)
        return;
    double worst = 0.0;
    for (size_t n = 0; n < sizeof cases / sizeof cases[0]; n++) {
        dcase d;
        memset(&d, 0, sizeof d);
        acase *c = &d.c;
        acase_init(c, 2, 5, 6, cases[n].gqa ? 4 : 2, 2, 4, 3, QKV_F32);
        c->seed = 300 + n;
        c->bias = cases[n].bias;
        c->causal = cases[n].causal;
        c->alibi = cases[n].alibi;
        c->softcap = cases[n].softcap;
        if (c->softcap > 0)
            c->scale = 1.5f;
        dcase_prepare(ctx, &d, n % 2 ? LAY_PAD : LAY_CONTIG);
        char label[96];
        snprintf(label, sizeof label, "fd case %zu", n);
        qkv_status st = run(ctx, &d, 1);
        CHECK(st == QKV_OK, "%s: %s [%s]", label, qkv_ctx_last_error(ctx), acase_str(c));
        if (st == QKV_OK) {
            float *db = collect_db(&d, label);
            float *doutf = xmalloc(c->n_out * sizeof(float));
            view_gather(&d.dout.t, doutf);
            tbuf o;
            const int64_t so[4] = { c->B, c->Sq, c->Hq, c->Dv };
            tbuf_make_layout(&o, QKV_F32, so, LAY_CONTIG);
            const int64_t nb = numel(&c->bias_t.t);
            double scale = 0.05;
            for (int64_t e = 0; e < nb; e++)
                scale = fmax(scale, fabs(db[e]));
            float *fd = xmalloc((size_t)nb * sizeof(float)), *want = xmalloc((size_t)nb * sizeof(float));
            size_t m = 0, inf_bad = 0;
            for (int64_t e = 0; e < nb; e++) {
                float *p = bias_elem(&c->bias_t.t, e), x0 = *p;
                if (x0 == -INFINITY) {   /* masked: no gradient */
                    inf_bad += db[e] != 0.0f;
                    continue;
                }
                const float xp = (float)(x0 + FD_STEP), xm = (float)(x0 - FD_STEP);
                *p = xp;
                const double lp = loss(ctx, &d, &o, doutf);
                *p = xm;
                const double lm = loss(ctx, &d, &o, doutf);
                *p = x0;
                fd[m] = (float)((lp - lm) / ((double)xp - (double)xm));
                want[m] = db[e];
                worst = fmax(worst, fabs((double)fd[m] - want[m]) / scale);
                m++;
            }
            CHECK(inf_bad == 0, "%s: %zu -inf bias elements got a nonzero gradient", label, inf_bad);
            char name[600];
            snprintf(name, sizeof name, "%s: dbias vs finite differences [%s]", label, acase_str(c));
            compare(name, fd, QKV_F32, want, m, FD_TOL * scale, 0.0);
            free(fd); free(want); free(db); free(doutf);
            tbuf_free(&o);
        }
        dcase_free(&d);
    }
    t_note("dbias finite differences: worst |fd - ref| / scale = %.2e (tolerance %.0e)", worst,
           FD_TOL);
    qkv_ctx_free(ctx);
}

static int same_view(const tbuf *a, const tbuf *b)
{
    return a->bytes == b->bytes && memcmp(a->buf, b->buf, a->bytes) == 0;
}

void test_dbias_fast(void)
{
    static const int64_t shapes[][7] = {
        /* B, Sq, Sk, Hq, Hkv, D, Dv: one tile, across query and key tiles, GQA */
        { 2, 9, 13, 2, 2, 16, 16 }, { 1, 70, 150, 4, 2, 32, 24 }, { 2, 33, 140, 8, 2, 7, 5 },
        { 1, 130, 260, 2, 1, 64, 64 },
    };
    const char *sets[8];
    const int n_sets = kernel_sets(sets);
    qkv_ctx *ref = qkv_ctx_create(2);
    CHECK(ref != NULL, "qkv_ctx_create");
    if (!ref)
        return;
    rng r = rng_seed(77);
    double worst = 0.0;
    int k = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int bias = BIAS_FULL; bias < BIAS_COUNT; bias++) {
            if (bias == BIAS_ZSTRIDE || (t_quick && (bias + (int)s) % 3))
                continue;
            const qkv_dtype dt = (qkv_dtype)(k++ % 3);
            dcase d;
            memset(&d, 0, sizeof d);
            acase *c = &d.c;
            const int64_t *sh = shapes[s];
            acase_init(c, sh[0], sh[1], sh[2], sh[3], sh[4], sh[5], sh[6], dt);
            c->seed = 500 + (uint64_t)k;
            c->bias = bias;
            c->causal = rng_int(&r, 0, 1);
            c->softcap = rng_int(&r, 0, 2) == 0 ? 3.0f : 0.0f;
            c->bias_neg_row = rng_int(&r, 0, 3) == 0;
            dcase_prepare(ref, &d, (int)RNG_PICK(&r, ((const int[]){ LAY_CONTIG, LAY_PAD,
                                                                     LAY_NEG, LAY_REVD })));
            char label[64];
            snprintf(label, sizeof label, "reference");
            qkv_status st = run(ref, &d, 1);
            CHECK(st == QKV_OK, "reference: %s [%s]", qkv_ctx_last_error(ref), acase_str(c));
            if (st != QKV_OK) {
                dcase_free(&d);
                continue;
            }
            float *want = collect_db(&d, label);
            const size_t nb = (size_t)numel(&d.db.t);
            /* a row-constant bias ([1,Hq,Sq,1]) has gradient 0: its sums
               of dS = P·(dP - Dd) over the keys cancel, leaving fp32
               rounding of terms of the size of dv's entries; so the scale
               has a floor, the largest |dv| */
            const size_t nv = (size_t)numel(&d.dv.t);
            void *raw = xmalloc(nv * qkv_dtype_size(dt));
            view_gather(&d.dv.t, raw);
            float *dvf = to_f32(raw, dt, nv);
            double mx = 0.0;
            for (size_t e = 0; e < nv; e++)
                mx = fmax(mx, fabs(dvf[e]));
            free(raw);
            free(dvf);
            for (size_t e = 0; e < nb; e++)
                mx = fmax(mx, fabs(want[e]));
            const double tol = dt == QKV_F32 ? 1e-4 : 1e-3;
            for (int i = 0; i < n_sets; i++) {
                qkv_ctx *ctx = qkv_ctx_create(2);
                CHECK(ctx && qkv_ctx_set_isa(ctx, sets[i]) == QKV_OK, "set_isa %s", sets[i]);
                /* dq, dk, dv of the plain backward, to compare bitwise */
                tbuf pq, pk, pv;
                tbuf_make_layout(&pq, dt, d.dq.t.shape, LAY_CONTIG);
                tbuf_make_layout(&pk, dt, d.dk.t.shape, LAY_CONTIG);
                tbuf_make_layout(&pv, dt, d.dv.t.shape, LAY_CONTIG);
                tbuf_fill_byte(&pq, DB_SENTINEL);
                tbuf_fill_byte(&pk, DB_SENTINEL);
                tbuf_fill_byte(&pv, DB_SENTINEL);
                st = qkv_attention_backward(ctx, &c->tq, &c->tk, &c->tv, &d.out.t, &d.dout.t,
                                            d.lse, &c->opts, &pq.t, &pk.t, &pv.t);
                CHECK(st == QKV_OK, "%s backward: %s", sets[i], qkv_ctx_last_error(ctx));
                st = run(ctx, &d, 0);
                CHECK(st == QKV_OK, "%s: %s [%s]", sets[i], qkv_ctx_last_error(ctx), acase_str(c));
                if (st == QKV_OK) {
                    snprintf(label, sizeof label, "%s dbias", sets[i]);
                    float *got = collect_db(&d, label);
                    char name[600];
                    snprintf(name, sizeof name, "%s [%s]", label, acase_str(c));
                    double e = compare(name, got, QKV_F32, want, nb, tol * mx, tol);
                    worst = fmax(worst, e / fmax(tol * mx, 1e-30));
                    CHECK(same_view(&pq, &d.dq) && same_view(&pk, &d.dk) &&
                          same_view(&pv, &d.dv), "%s: dq, dk, dv differ from "
                          "qkv_attention_backward's [%s]", sets[i], acase_str(c));
                    free(got);
                }
                tbuf_free(&pq); tbuf_free(&pk); tbuf_free(&pv);
                qkv_ctx_free(ctx);
            }
            free(want);
            dcase_free(&d);
        }
    t_note("dbias: worst error / allowed %.2f", worst);
    qkv_ctx_free(ref);
}

void test_dbias_threads(void)
{
    static const int nthreads[4] = { 1, 2, 3, 5 };
    static const int biases[4] = { BIAS_FULL, BIAS_11, BIAS_KEYS, BIAS_ROWS };
    for (int b = 0; b < 4; b++) {
        dcase d;
        memset(&d, 0, sizeof d);
        acase *c = &d.c;
        acase_init(c, 2, 97, 150, 8, 2, 32, 32, b % 2 ? QKV_BF16 : QKV_F32);
        c->seed = 900 + (uint64_t)b;
        c->bias = biases[b];
        c->causal = b < 2;
        qkv_ctx *first = qkv_ctx_create(1);
        dcase_prepare(first, &d, LAY_CONTIG);
        tbuf keep;
        tbuf_make_layout(&keep, QKV_F32, d.db.t.shape, LAY_CONTIG);
        for (int t = 0; t < 4; t++) {
            qkv_ctx *ctx = t == 0 ? first : qkv_ctx_create(nthreads[t]);
            qkv_status st = run(ctx, &d, 0);
            CHECK(st == QKV_OK, "%d threads: %s", nthreads[t], qkv_ctx_last_error(ctx));
            if (t == 0)
                memcpy(keep.buf, d.db.buf, d.db.bytes);
            else
                CHECK(same_view(&keep, &d.db), "dbias with %d threads differs from 1 thread "
                      "[%s]", nthreads[t], acase_str(c));
            if (t > 0)
                qkv_ctx_free(ctx);
        }
        qkv_ctx_free(first);
        tbuf_free(&keep);
        dcase_free(&d);
    }
}

/* A refused call: the status, a message naming `names`, every output and
   lse untouched. */
static void refused(qkv_ctx *ctx, dcase *d, qkv_tensor *db, const qkv_attn_opts *opts,
                    qkv_status want, const char *names, const char *what)
{
    acase *c = &d->c;
    for (int reference = 0; reference < 2; reference++) {
        tbuf_fill_byte(&d->dq, DB_SENTINEL);
        tbuf_fill_byte(&d->db, DB_SENTINEL);
        qkv_status st = (reference ? qkv_attention_backward_dbias_reference
                                   : qkv_attention_backward_dbias)(
            ctx, &c->tq, &c->tk, &c->tv, &d->out.t, &d->dout.t, d->lse, opts, &d->dq.t,
            &d->dk.t, &d->dv.t, db);
        const char *msg = qkv_ctx_last_error(ctx);
        CHECK(st == want, "%s: status %d, want %d (%s)", what, st, want, msg);
        CHECK(msg_names(msg, names), "%s: message \"%s\" does not name %s", what, msg, names);
        size_t moved = 0;
        for (size_t e = 0; e < d->dq.bytes; e++)
            moved += d->dq.buf[e] != DB_SENTINEL;
        for (size_t e = 0; e < d->db.bytes; e++)
            moved += d->db.buf[e] != DB_SENTINEL;
        CHECK(moved == 0, "%s: %zu bytes of dq or dbias written by a refused call", what, moved);
    }
}

void test_dbias_errors(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2);
    CHECK(ctx != NULL, "qkv_ctx_create");
    if (!ctx)
        return;
    dcase d;
    memset(&d, 0, sizeof d);
    acase_init(&d.c, 2, 6, 7, 2, 2, 8, 8, QKV_F32);
    d.c.bias = BIAS_FULL;
    dcase_prepare(ctx, &d, LAY_CONTIG);
    acase *c = &d.c;
    qkv_attn_opts no_bias = c->opts;
    no_bias.bias = NULL;
    refused(ctx, &d, &d.db.t, &no_bias, QKV_ERR_ARG, "dbias&opts->bias", "no bias");
    refused(ctx, &d, NULL, &c->opts, QKV_ERR_NULL, "dbias", "NULL dbias");
    qkv_tensor t = d.db.t;
    t.data = NULL;
    refused(ctx, &d, &t, &c->opts, QKV_ERR_NULL, "dbias->data", "NULL dbias->data");
    t = d.db.t;
    t.dtype = QKV_F16;
    refused(ctx, &d, &t, &c->opts, QKV_ERR_DTYPE, "dbias->dtype", "fp16 dbias");
    t = d.db.t;
    t.shape[1] = 1;
    refused(ctx, &d, &t, &c->opts, QKV_ERR_SHAPE, "dbias->shape[1]&opts->bias->shape[1]",
            "dbias broadcast where the bias is not");
    t = d.db.t;
    t.stride[0] = 0;
    refused(ctx, &d, &t, &c->opts, QKV_ERR_STRIDE, "dbias", "dbias overlapping itself");
    t = d.db.t;
    t.data = c->bias_t.t.data;
    refused(ctx, &d, &t, &c->opts, QKV_ERR_ARG, "dbias&opts->bias", "dbias over the bias");
    t = d.db.t;
    t.data = d.dq.t.data;
    refused(ctx, &d, &t, &c->opts, QKV_ERR_ARG, "dbias&dq", "dbias over dq");
    /* lse in a buffer as large as dbias, so that a dbias view over it
       overlaps lse and no other operand (malloc may place one after lse) */
    const size_t lse_bytes = (size_t)(c->B * c->Hq * c->Sq) * sizeof(float);
    float *lse = d.lse;
    d.lse = xmalloc(lse_bytes > d.db.bytes ? lse_bytes : d.db.bytes);
    memcpy(d.lse, lse, lse_bytes);
    t = d.db.t;
    t.data = d.lse;
    refused(ctx, &d, &t, &c->opts, QKV_ERR_ARG, "dbias&lse", "dbias over lse");
    free(d.lse);
    d.lse = lse;
    t = d.db.t;
    t.data = c->tq.data;
    refused(ctx, &d, &t, &c->opts, QKV_ERR_ARG, "dbias&q", "dbias over q");
    dcase_free(&d);
    qkv_ctx_free(ctx);
}
