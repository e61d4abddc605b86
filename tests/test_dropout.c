/*
 * test_dropout.c — dropout on the softmax (opts->dropout_p, dropout_seed).
 *
 * The forward and backward against their references with dropout run in
 * test_forward.c and test_backward.c (a third of the random option cases);
 * here the mask itself is read off the output and checked:
 * - q = 0 gives a uniform softmax, P = 1/Sk, and V = the identity
 *   (Dv = Sk) gives out[b, i, h, j] = Z[b, h, i, j] / Sk: the mask.
 * - Every element is 0 or 1/(1 - p); the kept fraction is within 5 sigma
 *   of 1 - p (binomial) overall, per batch row and head, and per key;
 *   masks of different seeds agree where two independent masks would.
 * - The same seed gives the same bits on every kernel set and 1, 2, 3, 5
 *   threads, forward and backward; dropout_p 0 gives no-dropout bits.
 * - The mask is keyed by the query's position: a call on the last rows of
 *   q (the queries' positions kept, bottom-right) gives those rows of the
 *   full call; the first rows (positions moved) do not.
 * - Calls that read a KV cache refuse dropout; the backward refuses a bad
 *   dropout_p like the forward (test_errors.c covers the forward).
 */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { B = 2, SQ = 48, SK = 96, H = 3 };

/* The mask of (p, seed) read off a forward call on kernel set isa:
   z[((b·H + h)·SQ + i)·SK + j] = out·SK. */
static void read_mask(const char *isa, int threads, float p, uint64_t seed, float *z)
{
    static float q[B * SQ * H * 1], k[B * SK * H * 1], v[B * SK * H * SK], out[B * SQ * H * SK];
    memset(q, 0, sizeof q);
    for (size_t x = 0; x < sizeof k / sizeof k[0]; x++)
        k[x] = (float)(x % 7) - 3.0f;   /* anything: q = 0 makes every score 0 */
    memset(v, 0, sizeof v);
    for (int b = 0; b < B; b++)
        for (int j = 0; j < SK; j++)
            for (int h = 0; h < H; h++)
                v[((b * SK + j) * H + h) * SK + j] = 1.0f;
    qkv_tensor tq = qkv_tensor_4d(q, QKV_F32, B, SQ, H, 1);
    qkv_tensor tk = qkv_tensor_4d(k, QKV_F32, B, SK, H, 1);
    qkv_tensor tv = qkv_tensor_4d(v, QKV_F32, B, SK, H, SK);
    qkv_tensor to = qkv_tensor_4d(out, QKV_F32, B, SQ, H, SK);
    qkv_attn_opts o = qkv_attn_opts_default();
    o.dropout_p = p;
    o.dropout_seed = seed;
    qkv_ctx *ctx = qkv_ctx_create(threads);
    CHECK(ctx && qkv_ctx_set_isa(ctx, isa) == QKV_OK, "context %s", isa);
    qkv_status st = qkv_attention_forward(ctx, &tq, &tk, &tv, &o, &to, NULL);
    CHECK(st == QKV_OK, "forward %s: %s", isa, qkv_ctx_last_error(ctx));
    qkv_ctx_free(ctx);
    for (int b = 0; b < B; b++)
        for (int i = 0; i < SQ; i++)
            for (int h = 0; h < H; h++)
                for (int j = 0; j < SK; j++)
                    z[((b * H + h) * SQ + i) * SK + j] = out[((b * SQ + i) * H + h) * SK + j] * SK;
}

/* |kept - n(1-p)| within 5 binomial sigma (plus one for rounding). */
static void check_fraction(const char *what, long kept, long n, double p)
{
    const double mean = n * (1.0 - p), sigma = sqrt(n * p * (1.0 - p));
    CHECK(fabs((double)kept - mean) <= 5.0 * sigma + 1.0,
          "%s: %ld of %ld kept, expected %.1f +- %.1f (p %g)", what, kept, n, mean, sigma, p);
}

void test_dropout_mask(void)
{
    enum { N = B * H * SQ * SK };
    static float z[N], z2[N];
    static const float ps[] = { 0.1f, 0.5f, 0.9f };
    for (int pi = 0; pi < 3; pi++) {
        const float p = ps[pi];
        const double scale = 1.0 / (1.0 - (double)(float)p);
        read_mask("generic", 2, p, 1234567 + (uint64_t)pi, z);
        long kept = 0;
        int values_ok = 1;
        for (int x = 0; x < N; x++) {
            const int keep = z[x] != 0.0f;
            kept += keep;
            /* out = (1/Sk)·z·(1/1)... summed once: z·Sk back within a few ulps */
            if (keep && !(fabs(z[x] - scale) <= 1e-5 * scale))
                values_ok = 0;
        }
        CHECK(values_ok, "p %g: a kept element is not 1/(1-p) = %g", (double)p, scale);
        check_fraction("all", kept, N, p);
        /* per (batch row, head) and per key: no structure along an index */
        for (int bh = 0; bh < B * H; bh++) {
            long kb = 0;
            for (int x = 0; x < SQ * SK; x++)
                kb += z[bh * SQ * SK + x] != 0.0f;
            check_fraction("one (batch, head)", kb, SQ * SK, p);
        }
        for (int j = 0; j < SK; j++) {
            long kj = 0;
            for (int r = 0; r < B * H * SQ; r++)
                kj += z[r * SK + j] != 0.0f;
            check_fraction("one key", kj, B * H * SQ, p);
        }
        /* rows differ from each other (a row hash that ignored an index
           would repeat rows) */
        int same_rows = 0;
        for (int r = 1; r < B * H * SQ; r++)
            same_rows += memcmp(z + r * SK, z + (r - 1) * SK, SK * sizeof(float)) == 0;
        CHECK(same_rows == 0, "p %g: %d rows equal to the row before", (double)p, same_rows);
        /* another seed: independent masks agree on p² + (1-p)² of the elements */
        read_mask("generic", 2, p, 7654321 + (uint64_t)pi, z2);
        long agree = 0;
        for (int x = 0; x < N; x++)
            agree += (z[x] != 0.0f) == (z2[x] != 0.0f);
        const double pa = (double)p * p + (1.0 - p) * (1.0 - p);
        check_fraction("two seeds agreeing", N - agree, N, pa);
        /* the same seed: the same mask on every kernel set and thread count */
        const char *sets[8];
        const int n_sets = kernel_sets(sets);
        static const int threads[] = { 1, 3, 5 };
        for (int si = 0; si < n_sets; si++)
            for (int ti = 0; ti < 3; ti++) {
                read_mask(sets[si], threads[ti], p, 1234567 + (uint64_t)pi, z2);
                long diff = 0;
                for (int x = 0; x < N; x++)
                    diff += (z[x] != 0.0f) != (z2[x] != 0.0f);
                CHECK(diff == 0, "p %g: %s, %d threads: %ld mask elements differ from generic",
                      (double)p, sets[si], threads[ti], diff);
            }
    }
    t_note("kept fractions, per (batch, head) and per key, within 5 sigma for p 0.1, 0.5, 0.9");
}

/* Forward and backward with dropout: identical bits for 1, 2, 3, 5
   threads; dropout_p 0 with a seed is plain attention. */
void test_dropout_threads(void)
{
    static const int nthreads[4] = { 1, 2, 3, 5 };
    const char *sets[8];
    const int n_sets = kernel_sets(sets);
    rng r = rng_seed(4242);
    for (int it = 0; it < (t_quick ? 2 : 6); it++) {
        acase c;
        const qkv_dtype dt = (qkv_dtype)(it % 3);
        acase_init(&c, rng_int(&r, 1, 2), rng_int(&r, 1, 150), rng_int(&r, 1, 300), 4,
                   it % 2 ? 2 : 4, 64, 64, dt);
        c.causal = it % 2;
        c.dropout = 0.3f;
        c.seed = 900 + (uint64_t)it;
        acase_build(&c);
        const int64_t os[4] = { c.B, c.Sq, c.Hq, c.Dv };
        const int64_t qs[4] = { c.B, c.Sq, c.Hq, c.D }, ks[4] = { c.B, c.Sk, c.Hkv, c.D };
        const int64_t vs[4] = { c.B, c.Sk, c.Hkv, c.Dv };
        tbuf dout;
        tbuf_make_layout(&dout, c.dt, os, LAY_CONTIG);
        tbuf_fill_random(&dout, &r);
        const char *isa = sets[n_sets - 1 - it % n_sets];
        tbuf out[4], g[4][3];
        float *lse[4];
        for (int t = 0; t < 4; t++) {
            qkv_ctx *ctx = qkv_ctx_create(nthreads[t]);
            CHECK(ctx && qkv_ctx_set_isa(ctx, isa) == QKV_OK, "context %s", isa);
            tbuf_make_layout(&out[t], c.dt, os, LAY_CONTIG);
            lse[t] = xmalloc(c.n_lse * sizeof(float));
            CHECK(qkv_attention_forward(ctx, &c.tq, &c.tk, &c.tv, &c.opts, &out[t].t, lse[t]) ==
                  QKV_OK, "forward: %s", qkv_ctx_last_error(ctx));
            tbuf_make_layout(&g[t][0], c.dt, qs, LAY_CONTIG);
            tbuf_make_layout(&g[t][1], c.dt, ks, LAY_CONTIG);
            tbuf_make_layout(&g[t][2], c.dt, vs, LAY_CONTIG);
            CHECK(qkv_attention_backward(ctx, &c.tq, &c.tk, &c.tv, &out[0].t, &dout.t, lse[0],
                                         &c.opts, &g[t][0].t, &g[t][1].t, &g[t][2].t) == QKV_OK,
                  "backward: %s", qkv_ctx_last_error(ctx));
            qkv_ctx_free(ctx);
            if (t == 0)
                continue;
            CHECK(memcmp(out[t].buf, out[0].buf, out[0].bytes) == 0 &&
                  memcmp(lse[t], lse[0], c.n_lse * sizeof(float)) == 0,
                  "%s forward: 1 and %d threads differ [%s]", isa, nthreads[t], acase_str(&c));
            for (int w = 0; w < 3; w++)
                CHECK(memcmp(g[t][w].buf, g[0][w].buf, g[0][w].bytes) == 0,
                      "%s %s: 1 and %d threads differ [%s]", isa, w == 0 ? "dq" : w == 1 ? "dk" : "dv",
                      nthreads[t], acase_str(&c));
        }
        /* p = 0 with the seed set: the bits of plain attention */
        qkv_ctx *ctx = qkv_ctx_create(2);
        CHECK(ctx && qkv_ctx_set_isa(ctx, isa) == QKV_OK, "context %s", isa);
        tbuf a0, a1;
        tbuf_make_layout(&a0, c.dt, os, LAY_CONTIG);
        tbuf_make_layout(&a1, c.dt, os, LAY_CONTIG);
        qkv_attn_opts o = c.opts;
        o.dropout_p = 0.0f;
        CHECK(qkv_attention_forward(ctx, &c.tq, &c.tk, &c.tv, &o, &a0.t, NULL) == QKV_OK, "p 0");
        o.dropout_seed = 0;
        CHECK(qkv_attention_forward(ctx, &c.tq, &c.tk, &c.tv, &o, &a1.t, NULL) == QKV_OK, "plain");
        CHECK(memcmp(a0.buf, a1.buf, a0.bytes) == 0, "dropout_p 0 with a seed differs from plain");
        CHECK(memcmp(a0.buf, out[0].buf, a0.bytes) != 0 || c.Sk == 0,
              "dropout_p 0.3 gives the output of no dropout [%s]", acase_str(&c));
        qkv_ctx_free(ctx);
        tbuf_free(&a0);
        tbuf_free(&a1);
        for (int t = 0; t < 4; t++) {
            tbuf_free(&out[t]);
            free(lse[t]);
            for (int w = 0; w < 3; w++)
                tbuf_free(&g[t][w]);
        }
        tbuf_free(&dout);
        acase_free(&c);
    }
}

/* Refusals: a KV cache does not drop out; the backward checks dropout_p. */
void test_dropout_errors(void)
{
    enum { D = 8, SMAX = 16 };
    static float q[1 * 2 * 2 * D], kc[1 * SMAX * 1 * D], vc[1 * SMAX * 1 * D], out[1 * 2 * 2 * D];
    memset(q, 0, sizeof q);
    memset(kc, 0, sizeof kc);
    memset(vc, 0, sizeof vc);
    qkv_tensor tq = qkv_tensor_4d(q, QKV_F32, 1, 2, 2, D), to = qkv_tensor_4d(out, QKV_F32, 1, 2, 2, D);
    qkv_tensor tk = qkv_tensor_4d(kc, QKV_F32, 1, SMAX, 1, D), tv = qkv_tensor_4d(vc, QKV_F32, 1, SMAX, 1, D);
    qkv_attn_opts o = qkv_attn_opts_default();
    o.dropout_p = 0.1f;
    qkv_ctx *ctx = qkv_ctx_create(1);
    memset(out, 0xA7, sizeof out);
    const int32_t lens[1] = { 5 };
    qkv_status st = qkv_attention_kvcache(ctx, &tq, &tk, &tv, lens, &o, &to, NULL);
    CHECK(st == QKV_ERR_UNSUPPORTED, "kvcache with dropout: status %d (%s)", st,
          qkv_status_string(st));
    CHECK(msg_names(qkv_ctx_last_error(ctx), "opts->dropout_p"), "kvcache message \"%s\"",
          qkv_ctx_last_error(ctx));
    unsigned char untouched = 1;
    for (size_t x = 0; x < sizeof out; x++)
        untouched &= ((unsigned char *)out)[x] == 0xA7;
    CHECK(untouched, "kvcache with dropout wrote out");

    /* the backward: the same check of dropout_p as the forward */
    static float lse[2 * 2], g[3][1 * 16 * 2 * D];
    qkv_tensor qq = qkv_tensor_4d(q, QKV_F32, 1, 2, 2, D), kk = qkv_tensor_4d(kc, QKV_F32, 1, 4, 2, D);
    qkv_tensor vv = qkv_tensor_4d(vc, QKV_F32, 1, 4, 2, D), oo = qkv_tensor_4d(out, QKV_F32, 1, 2, 2, D);
    qkv_tensor gq = qkv_tensor_4d(g[0], QKV_F32, 1, 2, 2, D), gk = qkv_tensor_4d(g[1], QKV_F32, 1, 4, 2, D);
    qkv_tensor gv = qkv_tensor_4d(g[2], QKV_F32, 1, 4, 2, D);
    static const float bad[] = { -0.5f, 1.0f, NAN };
    for (int i = 0; i < 3; i++) {
        o.dropout_p = bad[i];
        memset(g, 0x5A, sizeof g);
        st = qkv_attention_backward(ctx, &qq, &kk, &vv, &oo, &oo, lse, &o, &gq, &gk, &gv);
        CHECK(st == QKV_ERR_ARG, "backward dropout_p %g: status %d", (double)bad[i], st);
        CHECK(msg_names(qkv_ctx_last_error(ctx), "opts->dropout_p"), "backward message \"%s\"",
              qkv_ctx_last_error(ctx));
        unsigned char same = 1;
        for (size_t x = 0; x < sizeof g; x++)
            same &= ((unsigned char *)g)[x] == 0x5A;
        CHECK(same, "backward dropout_p %g wrote a gradient", (double)bad[i]);
    }
    qkv_ctx_free(ctx);
}

/* The last r rows of q alone equal those rows of the full call (their
   positions i + Sk - Sq are the same); the first r rows alone do not. */
void test_dropout_last_rows(void)
{
    const char *sets[8];
    const int n_sets = kernel_sets(sets);
    for (int si = 0; si < n_sets; si++) {
        acase c;
        acase_init(&c, 2, 40, 70, 4, 2, 32, 32, QKV_F32);
        c.causal = si % 2;   /* the last rows keep their causal band */
        c.dropout = 0.4f;
        c.seed = 31;
        acase_build(&c);
        qkv_ctx *ctx = qkv_ctx_create(2);
        CHECK(ctx && qkv_ctx_set_isa(ctx, sets[si]) == QKV_OK, "context %s", sets[si]);
        enum { R = 7 };
        const int64_t Sq = c.Sq, row = c.Hq * c.Dv;
        float *full = xmalloc((size_t)(c.B * Sq * row) * sizeof(float));
        float *part = xmalloc((size_t)(c.B * R * row) * sizeof(float));
        qkv_tensor to = qkv_tensor_4d(full, QKV_F32, c.B, Sq, c.Hq, c.Dv);
        CHECK(qkv_attention_forward(ctx, &c.tq, &c.tk, &c.tv, &c.opts, &to, NULL) == QKV_OK,
              "full: %s", qkv_ctx_last_error(ctx));
        for (int last = 1; last >= 0; last--) {
            qkv_tensor q = c.tq;
            q.shape[1] = R;
            q.data = (char *)q.data + (last ? (Sq - R) : 0) * q.stride[1] * 4;
            qkv_tensor tp = qkv_tensor_4d(part, QKV_F32, c.B, R, c.Hq, c.Dv);
            if (!last && c.causal)   /* the first rows alone would see other keys */
                continue;
            CHECK(qkv_attention_forward(ctx, &q, &c.tk, &c.tv, &c.opts, &tp, NULL) == QKV_OK,
                  "part: %s", qkv_ctx_last_error(ctx));
            double worst = 0.0;
            for (int64_t b = 0; b < c.B; b++)
                for (int64_t i = 0; i < R; i++)
                    for (int64_t x = 0; x < row; x++) {
                        const double e = fabs((double)part[(b * R + i) * row + x] -
                                              full[(b * Sq + (last ? Sq - R : 0) + i) * row + x]);
                        worst = e > worst ? e : worst;
                    }
            if (last)
                CHECK(worst <= 1e-5, "%s: the last %d rows alone differ by %g", sets[si], R,
                      worst);
            else
                CHECK(worst > 1e-2, "%s: the first %d rows alone give the full call's dropout "
                      "(%g): the mask ignores positions", sets[si], R, worst);
        }
        free(full);
        free(part);
        qkv_ctx_free(ctx);
        acase_free(&c);
    }
}
