/*
 * test_decode.c — attention from a KV cache (qkv_attention_kvcache,
 * qkv_attention_paged, qkv_paged_append).
 *
 * - Against the reference: each sequence's cached rows form a dense
 *   problem (B = 1, Sk = its length) run through qkv_attention_reference on
 *   fp32 copies of the rounded inputs; tolerances are test_forward.c's,
 *   chosen by the output dtype (bf16 queries with a bf16 cache take the
 *   bf16 dot path, hence bf16's). Every kernel set, every dtype pair,
 *   lengths 0 to past the split-K threshold, Sq 1 to 70 (chunked prefill),
 *   GQA/MQA, strided views, every option but bias and varlen.
 * - Paged equals contiguous bitwise: the same logical cache, scattered by
 *   qkv_paged_append into shuffled blocks of every block size 8..256.
 * - int8: per-element quantization error within s/2 of its row, attention
 *   within fp32 tolerance of the reference on the dequantized cache, and
 *   within a derived bound of the reference on the unquantized cache (the
 *   accuracy cost is printed).
 * - Thread counts 1, 2, 3, 5 give identical bits.
 * - Every bad argument is refused with its status, a message naming it,
 *   and outputs (or the cache) untouched.
 */
#include "test.h"
#include "../src/cpu/kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAXB = 8, MAX_ISAS = 8 };

/* One decode problem: contiguous caches [B, Smax, Hkv, D|Dv] as views of
   layout lay (q/out contiguous unless lay_q), lengths per sequence. */
typedef struct {
    int64_t   B, Sq, Smax, Hq, Hkv, D, Dv;
    qkv_dtype qdt, kdt;
    int32_t   lens[MAXB];
    int       lay_k, lay_q;
    qkv_attn_opts opts;
    float     slopes[64];
    tbuf      q, k, v;
    float    *qf, *kf, *vf;     /* logical fp32 copies, row-major */
    size_t    n_out, n_lse;
} dcase;

static void dcase_build(dcase *c, rng *r)
{
    const int64_t qs[4] = { c->B, c->Sq, c->Hq, c->D };
    const int64_t ks[4] = { c->B, c->Smax, c->Hkv, c->D };
    const int64_t vs[4] = { c->B, c->Smax, c->Hkv, c->Dv };
    tbuf_make_layout(&c->q, c->qdt, qs, c->lay_q);
    tbuf_make_layout(&c->k, c->kdt, ks, c->lay_k);
    tbuf_make_layout(&c->v, c->kdt, vs, c->lay_k);
    tbuf_fill_random(&c->q, r);
    tbuf_fill_random(&c->k, r);
    tbuf_fill_random(&c->v, r);
    const size_t nq = (size_t)(c->B * c->Sq * c->Hq * c->D);
    const size_t nk = (size_t)(c->B * c->Smax * c->Hkv * c->D);
    const size_t nv = (size_t)(c->B * c->Smax * c->Hkv * c->Dv);
    void *tmp = xmalloc(4 * (nq > nk ? (nq > nv ? nq : nv) : (nk > nv ? nk : nv)));
    view_gather(&c->q.t, tmp); c->qf = to_f32(tmp, c->qdt, nq);
    view_gather(&c->k.t, tmp); c->kf = to_f32(tmp, c->kdt, nk);
    view_gather(&c->v.t, tmp); c->vf = to_f32(tmp, c->kdt, nv);
    free(tmp);
    c->n_out = (size_t)(c->B * c->Sq * c->Hq * c->Dv);
    c->n_lse = (size_t)(c->B * c->Hq * c->Sq);
    if (c->opts.alibi_slopes) {
        for (int64_t h = 0; h < c->Hq && h < 64; h++)
            c->slopes[h] = (float)(0.5 * (rng_unif(r) + 1.0) / 2.0 + 0.01);
        c->opts.alibi_slopes = c->slopes;
    }
}

static void dcase_free(dcase *c)
{
    tbuf_free(&c->q); tbuf_free(&c->k); tbuf_free(&c->v);
    free(c->qf); free(c->kf); free(c->vf);
}

static const char *dcase_str(const dcase *c)
{
    static char s[400];
    snprintf(s, sizeof s, "B=%lld Sq=%lld Smax=%lld Hq=%lld Hkv=%lld D=%lld Dv=%lld q %s cache %s "
             "lay %s/%s causal=%d win=%lld,%lld cap=%g alibi=%d lens[0]=%d",
             (long long)c->B, (long long)c->Sq, (long long)c->Smax, (long long)c->Hq,
             (long long)c->Hkv, (long long)c->D, (long long)c->Dv, dtype_name(c->qdt),
             dtype_name(c->kdt), lay_name[c->lay_q], lay_name[c->lay_k], c->opts.causal,
             (long long)c->opts.window_left, (long long)c->opts.window_right,
             (double)c->opts.softcap, c->opts.alibi_slopes != NULL, (int)c->lens[0]);
    return s;
}

/* The reference per sequence on the fp32 copies (kf, vf: [B, Smax, ...]):
   out [B, Sq, Hq, Dv], lse [B, Hq, Sq]. */
static void dense_reference(qkv_ctx *ctx, const dcase *c, const float *kf, const float *vf,
                            float *out, float *lse)
{
    for (int64_t b = 0; b < c->B; b++) {
        float *o = out + b * c->Sq * c->Hq * c->Dv, *l = lse + b * c->Hq * c->Sq;
        const int64_t L = c->lens[b];
        if (L == 0) {
            memset(o, 0, (size_t)(c->Sq * c->Hq * c->Dv) * sizeof(float));
            for (int64_t i = 0; i < c->Hq * c->Sq; i++)
                l[i] = -INFINITY;
            continue;
        }
        qkv_tensor q = qkv_tensor_4d(c->qf + b * c->Sq * c->Hq * c->D, QKV_F32, 1, c->Sq, c->Hq, c->D);
        qkv_tensor k = qkv_tensor_4d((float *)kf + b * c->Smax * c->Hkv * c->D, QKV_F32, 1, L,
                                     c->Hkv, c->D);
        qkv_tensor v = qkv_tensor_4d((float *)vf + b * c->Smax * c->Hkv * c->Dv, QKV_F32, 1, L,
                                     c->Hkv, c->Dv);
        qkv_tensor ot = qkv_tensor_4d(o, QKV_F32, 1, c->Sq, c->Hq, c->Dv);
        qkv_status st = qkv_attention_reference(ctx, &q, &k, &v, &c->opts, &ot, l);
        CHECK(st == QKV_OK, "reference: %s [%s]", qkv_ctx_last_error(ctx), dcase_str(c));
    }
}

/* Compares out (dtype dt) and lse with the reference; alibi widens atol as
   in test_forward.c (2 ulps of the largest score). */
static double check_result(const char *what, const dcase *c, const void *out, qkv_dtype dt,
                           const float *lse, const float *ref_out, const float *ref_lse)
{
    double atol, rtol, lse_atol;
    forward_tolerances(dt, &atol, &rtol, &lse_atol);
    if (c->opts.alibi_slopes)
        atol += ldexp(0.26 * (double)(c->Sq + c->Smax), -22);
    char name[600];
    snprintf(name, sizeof name, "%s out [%s]", what, dcase_str(c));
    double e = compare(name, out, dt, ref_out, c->n_out, atol, rtol);
    snprintf(name, sizeof name, "%s lse [%s]", what, dcase_str(c));
    compare(name, lse, QKV_F32, ref_lse, c->n_lse, lse_atol, 2e-6);
    return e;
}

typedef struct {
    int      n;
    qkv_ctx *ctx[MAX_ISAS];
    const char *name[MAX_ISAS];
} isas;

static void isas_open(isas *s, int n_threads)
{
    memset(s, 0, sizeof *s);
    for (int i = 0; qkv_isa_name(i) && s->n < MAX_ISAS; i++) {
        const char *isa = qkv_isa_name(i);
        if (!qkv_isa_supported(isa))
            continue;
        qkv_ctx *ctx = qkv_ctx_create(n_threads);
        CHECK(ctx && qkv_ctx_set_isa(ctx, isa) == QKV_OK, "context for %s", isa);
        if (!ctx) continue;
        s->ctx[s->n] = ctx;
        s->name[s->n++] = isa;
    }
}

static void isas_close(isas *s)
{
    for (int i = 0; i < s->n; i++)
        qkv_ctx_free(s->ctx[i]);
}

/* Runs qkv_attention_kvcache into a fresh out/lse (malloc'd, out in q's
   dtype, contiguous); NULL out on failure. */
static void *run_kvcache(qkv_ctx *ctx, const dcase *c, float **lse)
{
    void *out = xmalloc(c->n_out * qkv_dtype_size(c->qdt));
    *lse = xmalloc(c->n_lse * sizeof(float));
    qkv_tensor ot = qkv_tensor_4d(out, c->qdt, c->B, c->Sq, c->Hq, c->Dv);
    qkv_status st = qkv_attention_kvcache(ctx, &c->q.t, &c->k.t, &c->v.t, c->lens, &c->opts,
                                          &ot, *lse);
    CHECK(st == QKV_OK, "kvcache returned %d: %s [%s]", st, qkv_ctx_last_error(ctx), dcase_str(c));
    return out;
}

/* One sequence holding the whole cache (long ones are split along the
   keys), at most max_sq queries. */
static void one_full_sequence(dcase *c, int64_t max_sq)
{
    c->B = 1;
    c->lens[0] = (int32_t)c->Smax;
    if (c->Sq > max_sq)
        c->Sq = max_sq;
}

static void random_dcase(dcase *c, rng *r, int64_t max_len)
{
    static const int64_t groups[][2] = { { 1, 1 }, { 4, 1 }, { 8, 2 }, { 6, 3 }, { 4, 4 },
                                         { 32, 8 }, { 2, 1 } };
    static const int64_t dims[] = { 1, 3, 8, 16, 33, 64, 80, 96, 128, 256 };
    static const int64_t sqs[] = { 1, 1, 2, 3, 4, 5, 8, 16, 70 };
    static const qkv_dtype dts[] = { QKV_F32, QKV_F16, QKV_BF16 };
    memset(c, 0, sizeof *c);
    const int g = (int)rng_int(r, 0, 6);
    c->Hq = groups[g][0];
    c->Hkv = groups[g][1];
    c->B = rng_int(r, 1, 4);
    c->Sq = RNG_PICK(r, sqs);
    c->D = RNG_PICK(r, dims);
    c->Dv = rng_int(r, 0, 3) ? c->D : RNG_PICK(r, dims);
    c->Smax = rng_int(r, 1, max_len);
    c->qdt = RNG_PICK(r, dts);
    c->kdt = rng_int(r, 0, 2) ? c->qdt : RNG_PICK(r, dts);
    static const int lays[] = { LAY_CONTIG, LAY_CONTIG, LAY_BHSD, LAY_PAD, LAY_NEG, LAY_INNER2,
                                LAY_REVD };
    c->lay_k = RNG_PICK(r, lays);
    c->lay_q = rng_int(r, 0, 3) ? LAY_CONTIG : RNG_PICK(r, lays);
    for (int64_t b = 0; b < c->B; b++) {
        const int64_t kind = rng_int(r, 0, 5);
        c->lens[b] = (int32_t)(kind == 0 ? 0 : kind == 1 ? c->Smax : rng_int(r, 0, c->Smax));
    }
    c->opts = qkv_attn_opts_default();
    const int64_t o = rng_int(r, 0, 15);
    c->opts.causal = (o & 1) != 0;
    if (o & 2) c->opts.window_left = rng_int(r, 0, c->Smax);
    if (o & 4) c->opts.softcap = 3.0f;
    if (o & 8) c->opts.alibi_slopes = c->slopes;   /* filled by dcase_build */
    if (rng_int(r, 0, 4) == 0) c->opts.scale = (float)rng_unif(r) * 0.5f;
    if (rng_int(r, 0, 4) == 0) c->opts.window_right = rng_int(r, 0, 4);
}

/* Builds case c, runs it on every kernel set against the dense reference
   (the worst error per output dtype into worst) and frees it. */
static void check_case(const isas *s, qkv_ctx *ref, dcase *c, rng *r, double worst[3])
{
    dcase_build(c, r);
    float *ref_out = xmalloc(c->n_out * sizeof(float)), *ref_lse = xmalloc(c->n_lse * sizeof(float));
    dense_reference(ref, c, c->kf, c->vf, ref_out, ref_lse);
    for (int i = 0; i < s->n; i++) {
        float *lse;
        void *out = run_kvcache(s->ctx[i], c, &lse);
        double e = check_result(s->name[i], c, out, c->qdt, lse, ref_out, ref_lse);
        if (e > worst[c->qdt]) worst[c->qdt] = e;
        free(out);
        free(lse);
    }
    free(ref_out);
    free(ref_lse);
    dcase_free(c);
}

/* n cases (random_dcase up to max_len keys) taking their query heads,
   kv heads and new queries from shapes and their (query, cache) dtypes
   from dts in turn, the first sequence holding the whole cache; with
   long_keys at least 600 keys (several key tiles) and head dims of at
   most 128. */
static void tile_cases(const isas *s, qkv_ctx *ref, rng *r, double worst[3],
                       const int64_t (*shapes)[3], int ns, const qkv_dtype (*dts)[2], int nd,
                       int n, int64_t max_len, int long_keys)
{
    for (int it = 0; it < n; it++) {
        dcase c;
        random_dcase(&c, r, max_len);
        c.Hq = shapes[it % ns][0];
        c.Hkv = shapes[it % ns][1];
        c.Sq = shapes[it % ns][2];
        c.qdt = dts[it % nd][0];
        c.kdt = dts[it % nd][1];
        if (long_keys) {
            if (c.D > 128) c.D = 128;
            if (c.Dv > 128) c.Dv = 128;
            if (c.Smax < 600) c.Smax += 600;
        }
        c.lens[0] = (int32_t)c.Smax;
        check_case(s, ref, &c, r, worst);
    }
}

void test_decode_reference(void)
{
    isas s;
    isas_open(&s, 0);
    qkv_ctx *ref = qkv_ctx_create(0);
    rng r = rng_seed(501);
    const int n_cases = t_quick ? 40 : 160;
    double worst[3] = { 0, 0, 0 };
    for (int it = 0; it < n_cases; it++) {
        dcase c;
        /* every fourth case long enough to be split along the keys */
        random_dcase(&c, &r, it % 4 == 3 ? 12000 : 300);
        if (it % 4 == 3) {
            one_full_sequence(&c, 16);
            if (c.D > 64) c.D = c.Dv = 64;
        }
        check_case(&s, ref, &c, &r, worst);
    }
    /* head dims wider than the few-row scores kernels expand queries for
       once per call (1024 values): they split or widen them as they read
       them; bf16 queries on a bf16 cache, fp32 ones on an fp16 cache */
    for (int it = 0; it < 4; it++) {
        dcase c;
        random_dcase(&c, &r, 200);
        c.qdt = it % 2 ? QKV_F32 : QKV_BF16;
        c.kdt = it % 2 ? QKV_F16 : QKV_BF16;
        c.D = it < 2 ? 1100 : 1030;
        c.Dv = it < 2 ? 1030 : 1100;
        c.Hq = 4;
        c.Hkv = 1;
        c.Sq = 1 + it % 2;
        for (int64_t b = 0; b < c.B; b++)
            c.lens[b] = (int32_t)(b == 0 ? c.Smax : rng_int(&r, 0, c.Smax));
        check_case(&s, ref, &c, &r, worst);
    }
    /* tiles of 8 to 16 rows (speculative verification: Sq new queries
       times the query heads per kv head): sets without a bf16 dot take
       up to 12 through the few-row kernels, more through the forward's */
    static const int64_t tiles[][3] = { { 4, 1, 3 }, { 8, 2, 3 }, { 6, 3, 5 },
                                        { 4, 1, 4 }, { 2, 1, 6 }, { 32, 8, 2 } };
    static const qkv_dtype tdts[][2] = { { QKV_BF16, QKV_BF16 }, { QKV_F32, QKV_F16 },
                                         { QKV_F32, QKV_F32 }, { QKV_F16, QKV_F16 },
                                         { QKV_BF16, QKV_F16 } };
    tile_cases(&s, ref, &r, worst, tiles, 6, tdts, 5, 30, 300, 0);
    /* tiles of 17 to 64 rows, which sets with tiles run through the
       few-row kernels 16 rows at a time (kernels.h dec_rows_max; fp16
       caches up to f16s_rows_max), over several key tiles so that every
       group's rescaling counts; every layout, position-major ones with
       several kv heads a task */
    static const qkv_dtype gdts[][2] = { { QKV_BF16, QKV_BF16 }, { QKV_F16, QKV_F16 },
                                         { QKV_BF16, QKV_F16 } };
    static const int64_t grouped[][3] = { { 8, 2, 5 }, { 8, 2, 8 }, { 8, 2, 16 }, { 32, 8, 8 },
                                          { 6, 3, 7 }, { 2, 1, 16 }, { 16, 1, 4 }, { 4, 1, 70 } };
    tile_cases(&s, ref, &r, worst, grouped, 8, gdts, 3, t_quick ? 8 : 24, 1200, 1);
    /* chunks of new queries long enough (512 rows a kv head and more) for
       the forward's kernels on sets with tiles: bf16 and fp16 caches of
       the queries' dtype, every mask, sequences shorter than the chunk */
    for (int it = 0; it < 8; it++) {
        dcase c;
        random_dcase(&c, &r, 600);
        c.Sq = it % 2 ? 130 : 70;
        c.Hkv = 2;
        c.Hq = c.Sq == 70 ? 16 : it % 3 == 2 ? 16 : 8;   /* 560, 520 or 1040 rows */
        c.qdt = c.kdt = it % 2 ? QKV_F16 : QKV_BF16;
        if (c.D > 128) c.D = 128;
        if (c.Dv > 128) c.Dv = 96;
        if (c.Smax < c.Sq) c.Smax = c.Sq + 40;
        for (int64_t b = 0; b < c.B; b++)
            c.lens[b] = (int32_t)(b == 0 ? c.Smax : rng_int(&r, 0, c.Smax));
        check_case(&s, ref, &c, &r, worst);
    }
    t_note("max |out - ref| by output dtype: f32 %.2e  f16 %.2e  bf16 %.2e",
           worst[0], worst[1], worst[2]);
    qkv_ctx_free(ref);
    isas_close(&s);
}

/* ---- paged -------------------------------------------------------------------- */

/* A paged cache holding the same logical rows as c's contiguous cache,
   written by qkv_paged_append in chunks of random sizes into shuffled
   blocks (block_size bs, dtype kdt, or int8 when i8; head-major pools
   when hm). */
typedef struct {
    qkv_paged_cache pc;
    int32_t        *table;
    int64_t         max_blocks;
} paged;

static void paged_fill(qkv_ctx *ctx, paged *p, const dcase *c, int64_t bs, int i8, int hm,
                       rng *r)
{
    memset(p, 0, sizeof *p);
    p->pc.head_major = hm;
    p->max_blocks = (c->Smax + bs - 1) / bs + 1;
    const int64_t n_blocks = c->B * p->max_blocks + 3;
    p->pc.dtype = i8 ? QKV_KV_I8 : (qkv_kv_dtype)c->kdt;
    p->pc.n_blocks = n_blocks;
    p->pc.block_size = bs;
    p->pc.heads_kv = c->Hkv;
    p->pc.head_dim = c->D;
    p->pc.head_dim_v = c->Dv;
    const size_t es = i8 ? 1 : qkv_dtype_size(c->kdt);
    const size_t rows = (size_t)(n_blocks * bs * c->Hkv);
    p->pc.k = xmalloc(rows * (size_t)c->D * es);
    p->pc.v = xmalloc(rows * (size_t)c->Dv * es);
    memset(p->pc.k, 0x7f, rows * (size_t)c->D * es);   /* unused rows: large garbage */
    memset(p->pc.v, 0x7f, rows * (size_t)c->Dv * es);
    if (i8) {
        p->pc.k_scale = xmalloc(rows * sizeof(float));
        p->pc.v_scale = xmalloc(rows * sizeof(float));
        memset(p->pc.k_scale, 0x7f, rows * sizeof(float));
        memset(p->pc.v_scale, 0x7f, rows * sizeof(float));
    }
    /* a shuffled assignment of blocks */
    int32_t *perm = xmalloc((size_t)n_blocks * sizeof *perm);
    for (int64_t i = 0; i < n_blocks; i++)
        perm[i] = (int32_t)i;
    for (int64_t i = n_blocks - 1; i > 0; i--) {
        const int64_t j = rng_int(r, 0, i);
        int32_t t = perm[i]; perm[i] = perm[j]; perm[j] = t;
    }
    p->table = xmalloc((size_t)(c->B * p->max_blocks) * sizeof *p->table);
    for (int64_t i = 0; i < c->B * p->max_blocks; i++)
        p->table[i] = perm[i];
    free(perm);
    /* append each sequence's rows in chunks, one sequence per call */
    for (int64_t b = 0; b < c->B; b++) {
        int32_t len = 0;
        while (len < c->lens[b]) {
            int32_t n = (int32_t)rng_int(r, 1, 40);
            if (n > c->lens[b] - len) n = c->lens[b] - len;
            qkv_tensor kn = c->k.t, vn = c->v.t;
            kn.data = (char *)c->k.t.data + (b * kn.stride[0] + len * kn.stride[1]) *
                                            (int64_t)qkv_dtype_size(c->kdt);
            vn.data = (char *)c->v.t.data + (b * vn.stride[0] + len * vn.stride[1]) *
                                            (int64_t)qkv_dtype_size(c->kdt);
            kn.shape[0] = vn.shape[0] = 1;
            kn.shape[1] = vn.shape[1] = n;
            qkv_status st = qkv_paged_append(ctx, &p->pc, p->table + b * p->max_blocks,
                                             p->max_blocks, &len, &kn, &vn);
            CHECK(st == QKV_OK, "append: %s", qkv_ctx_last_error(ctx));
            len += n;
        }
    }
}

static void paged_free(paged *p)
{
    free(p->pc.k); free(p->pc.v); free(p->pc.k_scale); free(p->pc.v_scale);
    free(p->table);
}

static void *run_paged(qkv_ctx *ctx, const dcase *c, const paged *p, float **lse)
{
    void *out = xmalloc(c->n_out * qkv_dtype_size(c->qdt));
    *lse = xmalloc(c->n_lse * sizeof(float));
    qkv_tensor ot = qkv_tensor_4d(out, c->qdt, c->B, c->Sq, c->Hq, c->Dv);
    qkv_status st = qkv_attention_paged(ctx, &c->q.t, &p->pc, p->table, p->max_blocks, c->lens,
                                        &c->opts, &ot, *lse);
    CHECK(st == QKV_OK, "paged returned %d: %s [%s]", st, qkv_ctx_last_error(ctx), dcase_str(c));
    return out;
}

/* The paged cache's rows, read back through the table, equal the
   contiguous cache's (bitwise; same dtype). */
static void check_rows(const dcase *c, const paged *p)
{
    const size_t es = qkv_dtype_size(c->kdt);
    size_t bad = 0;
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t j = 0; j < c->lens[b]; j++)
            for (int64_t h = 0; h < c->Hkv; h++)
                for (int e = 0; e < 2; e++) {
                    const tbuf *t = e ? &c->v : &c->k;
                    const int64_t cols = e ? c->Dv : c->D;
                    const int64_t blk = p->table[b * p->max_blocks + j / p->pc.block_size];
                    const int64_t bs = p->pc.block_size,
                                  row = p->pc.head_major ? (blk * c->Hkv + h) * bs + j % bs
                                                         : (blk * bs + j % bs) * c->Hkv + h;
                    const char *pr = (const char *)(e ? p->pc.v : p->pc.k) +
                                     row * cols * (int64_t)es;
                    for (int64_t x = 0; x < cols; x++) {
                        const int64_t off = b * t->t.stride[0] + j * t->t.stride[1] +
                                            h * t->t.stride[2] + x * t->t.stride[3];
                        bad += memcmp(pr + x * (int64_t)es,
                                      (const char *)t->t.data + off * (int64_t)es, es) != 0;
                    }
                }
    CHECK(bad == 0, "%zu appended elements differ from the source [%s]", bad, dcase_str(c));
}

/* On every kernel set: c from a paged copy (blocks of bs, head-major or
   not) equals c from its contiguous cache, bitwise. */
static void paged_vs_contiguous(const isas *s, const dcase *c, int64_t bs, int head_major,
                                rng *r)
{
    for (int i = 0; i < s->n; i++) {
        paged p;
        paged_fill(s->ctx[i], &p, c, bs, 0, head_major, r);
        if (i == 0)
            check_rows(c, &p);
        float *l1, *l2;
        void *o1 = run_kvcache(s->ctx[i], c, &l1), *o2 = run_paged(s->ctx[i], c, &p, &l2);
        CHECK(memcmp(o1, o2, c->n_out * qkv_dtype_size(c->qdt)) == 0 &&
              memcmp(l1, l2, c->n_lse * sizeof(float)) == 0,
              "%s: paged (block_size %lld%s) differs from contiguous [%s]", s->name[i],
              (long long)bs, head_major ? ", head-major" : "", dcase_str(c));
        free(o1); free(o2); free(l1); free(l2);
        paged_free(&p);
    }
}

void test_decode_paged_bitwise(void)
{
    isas s;
    isas_open(&s, 0);
    rng r = rng_seed(502);
    static const int64_t sizes[] = { 8, 16, 32, 64, 128, 256 };
    const int n_cases = t_quick ? 12 : 48;
    for (int it = 0; it < n_cases; it++) {
        dcase c;
        random_dcase(&c, &r, it % 6 == 5 ? 5000 : 700);
        if (it % 6 == 5)
            one_full_sequence(&c, 16);
        dcase_build(&c, &r);
        paged_vs_contiguous(&s, &c, sizes[it % 6], it % 2, &r);
        dcase_free(&c);
    }
    /* fp16 caches with 5 to 16 rows a tile (split into bf16 pairs on sets
       with tiles), from every contiguous layout, against both pools */
    static const int f16_lays[] = { LAY_CONTIG, LAY_BHSD, LAY_INNER2, LAY_REVD };
    for (int it = 0; it < 8; it++) {
        dcase c;
        random_dcase(&c, &r, it % 4 == 3 ? 3000 : 600);
        c.Hq = it % 3 == 2 ? 2 : it % 2 ? 8 : 4;
        c.Hkv = it % 3 == 2 ? 2 : it % 2 ? 2 : 1;
        c.Sq = it % 3 == 2 ? 5 : 2 + it % 3;
        c.qdt = it % 3 == 2 ? QKV_BF16 : QKV_F16;
        c.kdt = QKV_F16;
        c.lay_k = f16_lays[it % 4];
        if (c.D % 16 || c.D > 256) c.D = 64;
        if (c.Dv % 16 || c.Dv > 256) c.Dv = c.D;
        dcase_build(&c, &r);
        paged_vs_contiguous(&s, &c, sizes[it % 6], it / 4, &r);
        dcase_free(&c);
    }
    /* More rows a tile than the few-row kernels take (speculative
       verification, chunked prefill: 8 and 16 new queries of 4 query heads
       a kv head), bf16, where P·V takes a whole key tile in one product:
       every block size, both pools, some sequences long enough for parts */
    for (int it = 0; it < 12; it++) {
        dcase c;
        memset(&c, 0, sizeof c);
        c.B = 1 + it % 3;
        c.Sq = it % 2 ? 16 : 8;
        c.Hq = 8;
        c.Hkv = 2;
        c.D = c.Dv = it % 4 == 3 ? 80 : 128;
        c.Smax = it % 6 == 5 ? 9000 : 300 + 131 * it;
        for (int64_t b = 0; b < c.B; b++)
            c.lens[b] = (int32_t)(c.Smax - 37 * b);
        c.qdt = c.kdt = QKV_BF16;
        c.lay_q = LAY_CONTIG;
        c.lay_k = it % 3 == 1 ? LAY_BHSD : LAY_CONTIG;
        c.opts = qkv_attn_opts_default();
        c.opts.causal = it % 4 == 2;
        dcase_build(&c, &r);
        paged_vs_contiguous(&s, &c, sizes[it % 6], it % 2, &r);
        dcase_free(&c);
    }
    /* fp16 caches with more rows than the few-row kernels take (on sets
       with tiles split into bf16 for the forward's tile kernels, every
       row gathered), fp16 and bf16 queries, every contiguous layout */
    for (int it = 0; it < 8; it++) {
        dcase c;
        memset(&c, 0, sizeof c);
        c.B = 1 + it % 2;
        c.Sq = it % 3 == 2 ? 70 : it % 2 ? 16 : 8;
        c.Hq = 8;
        c.Hkv = 2;
        c.D = it % 4 == 1 ? 80 : it % 4 == 3 ? 64 : 128;
        c.Dv = it % 4 == 3 ? 96 : c.D;
        c.Smax = it == 5 ? 9000 : 200 + 157 * it;
        for (int64_t b = 0; b < c.B; b++)
            c.lens[b] = (int32_t)(c.Smax - 29 * b);
        c.qdt = it % 3 == 1 ? QKV_BF16 : QKV_F16;
        c.kdt = QKV_F16;
        c.lay_q = LAY_CONTIG;
        c.lay_k = f16_lays[it % 4];
        c.opts = qkv_attn_opts_default();
        c.opts.causal = it % 4 == 2;
        dcase_build(&c, &r);
        paged_vs_contiguous(&s, &c, sizes[(it + 2) % 6], it % 2, &r);
        dcase_free(&c);
    }
    /* Chunks that run through the forward's kernels (520 rows a kv head
       on sets with tiles): a pool's rows gathered give the contiguous
       cache's bits, sequences shorter than the chunk included */
    for (int it = 0; it < 6; it++) {
        dcase c;
        memset(&c, 0, sizeof c);
        c.B = 1 + it % 3;
        c.Sq = 130;
        c.Hq = 8;
        c.Hkv = 2;
        c.D = c.Dv = it % 3 == 1 ? 80 : 128;
        c.Smax = it == 4 ? 5000 : 200 + 97 * it;
        for (int64_t b = 0; b < c.B; b++)
            c.lens[b] = (int32_t)(b == 2 ? 100 : c.Smax - 41 * b);
        c.qdt = c.kdt = it % 2 ? QKV_F16 : QKV_BF16;
        c.lay_q = LAY_CONTIG;
        c.lay_k = f16_lays[it % 4];
        c.opts = qkv_attn_opts_default();
        c.opts.causal = it % 3 != 2;
        if (it == 3) c.opts.window_left = 150;
        if (it == 5) c.opts.softcap = 3.0f;
        dcase_build(&c, &r);
        paged_vs_contiguous(&s, &c, sizes[it % 6], it % 2, &r);
        dcase_free(&c);
    }
    /* A sequence long enough to be cut into key parts, with 8 kv heads: a
       task takes every kv head of a position-major cache and one of a
       head-major cache, and the parts must not depend on that. Each
       contiguous layout against pools of the other layout and of its own. */
    for (int it = 0; it < 4; it++) {
        dcase c;
        memset(&c, 0, sizeof c);
        c.B = 1;
        c.Sq = 1;
        c.Hq = 32;
        c.Hkv = 8;
        c.D = c.Dv = 64;
        c.Smax = 37000;
        c.lens[0] = (int32_t)c.Smax;
        c.qdt = c.kdt = QKV_BF16;
        c.lay_q = LAY_CONTIG;
        c.lay_k = it < 2 ? LAY_CONTIG : LAY_BHSD;
        c.opts = qkv_attn_opts_default();
        dcase_build(&c, &r);
        paged_vs_contiguous(&s, &c, 64, it % 2, &r);
        dcase_free(&c);
    }
    isas_close(&s);
}

/* ---- int8 --------------------------------------------------------------------- */

/* The dequantized paged cache as contiguous fp32 [B, Smax, Hkv, cols], and
   the largest element error against src relative to its row's max. */
static float *dequantized(const dcase *c, const paged *p, int is_v, double *rel_err)
{
    const int64_t cols = is_v ? c->Dv : c->D;
    const float *src = is_v ? c->vf : c->kf;
    float *d = xmalloc((size_t)(c->B * c->Smax * c->Hkv * cols) * sizeof(float));
    memset(d, 0, (size_t)(c->B * c->Smax * c->Hkv * cols) * sizeof(float));
    *rel_err = 0;
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t j = 0; j < c->lens[b]; j++)
            for (int64_t h = 0; h < c->Hkv; h++) {
                const int64_t blk = p->table[b * p->max_blocks + j / p->pc.block_size],
                              bs = p->pc.block_size;
                /* scales and codes alike: [block, row, head] or [block, head, row] */
                const int64_t row = p->pc.head_major ? (blk * c->Hkv + h) * bs + j % bs
                                                     : (blk * bs + j % bs) * c->Hkv + h;
                const int8_t *codes = (const int8_t *)(is_v ? p->pc.v : p->pc.k) + row * cols;
                const float sc = (is_v ? p->pc.v_scale : p->pc.k_scale)[row];
                const float *x = src + ((b * c->Smax + j) * c->Hkv + h) * cols;
                float *o = d + ((b * c->Smax + j) * c->Hkv + h) * cols;
                double amax = 0;
                for (int64_t e = 0; e < cols; e++)
                    amax = fmax(amax, fabs(x[e]));
                for (int64_t e = 0; e < cols; e++) {
                    o[e] = (float)codes[e] * sc;
                    if (amax > 0)
                        *rel_err = fmax(*rel_err, fabs(o[e] - x[e]) / amax);
                }
            }
    return d;
}

/* One int8 case: the pool's elements within half a step of their row
   max, the output against the dequantized cache as any call, and against
   the unquantized one within the derived bound, on every kernel set. */
static void int8_case(const isas *s, qkv_ctx *ref, dcase *c, rng *r, int64_t bs, int hm,
                      double *worst_q, double *worst_out, double *worst_ratio)
{
    c->kdt = QKV_F32;
    c->lay_k = LAY_CONTIG;
    c->opts.softcap = 0.0f;    /* the bound below assumes plain scores */
    c->opts.alibi_slopes = NULL;
    dcase_build(c, r);
    paged p;
    paged_fill(s->ctx[0], &p, c, bs, 1, hm, r);
    double ek, ev;
    float *kd = dequantized(c, &p, 0, &ek), *vd = dequantized(c, &p, 1, &ev);
    /* s/2 relative to the row max, plus the fp32 roundings of x/s and
       code·s (an ulp of the row max each) */
    const double half = 0.5 / 127.0 + ldexp(1.0, -22);
    CHECK(ek <= half && ev <= half, "int8 element error %.3g / %.3g of the row max, "
          "bound %.3g [%s]", ek, ev, half, dcase_str(c));
    *worst_q = fmax(*worst_q, fmax(ek, ev));
    float *deq_out = xmalloc(c->n_out * sizeof(float)), *deq_lse = xmalloc(c->n_lse * sizeof(float));
    float *raw_out = xmalloc(c->n_out * sizeof(float)), *raw_lse = xmalloc(c->n_lse * sizeof(float));
    dense_reference(ref, c, kd, vd, deq_out, deq_lse);
    dense_reference(ref, c, c->kf, c->vf, raw_out, raw_lse);
    /* the cost of int8 against the unquantized cache: scores move by
       at most delta = |scale|·max_i Σ_x|q_ix|·max|k|/254, so each
       weight by a factor within e^(±2·delta), and the output by at
       most (e^(2·delta) - 1)·max|v| + max|v|/254 */
    double qsum = 0;
    for (int64_t i = 0; i < c->B * c->Sq * c->Hq; i++) {
        double t = 0;
        for (int64_t x = 0; x < c->D; x++)
            t += fabs(c->qf[i * c->D + x]);
        qsum = fmax(qsum, t);
    }
    const double scale = c->opts.scale != 0.0f ? fabs(c->opts.scale) : 1.0 / sqrt((double)c->D);
    const double delta = scale * qsum * half;   /* |k|, |v| <= 1 */
    const double bound = expm1(2 * delta) + half + 1e-5;
    for (int i = 0; i < s->n; i++) {
        float *lse;
        void *out = run_paged(s->ctx[i], c, &p, &lse);
        char what[64];
        snprintf(what, sizeof what, "%s int8 vs dequantized", s->name[i]);
        check_result(what, c, out, c->qdt, lse, deq_out, deq_lse);
        float *got = to_f32(out, c->qdt, c->n_out);
        double e = 0;
        for (size_t x = 0; x < c->n_out; x++)
            e = fmax(e, fabs(got[x] - raw_out[x]));
        double atol, rtol, lse_atol;
        forward_tolerances(c->qdt, &atol, &rtol, &lse_atol);
        CHECK(e <= bound + atol + rtol, "%s: int8 error %.3g past its bound %.3g [%s]",
              s->name[i], e, bound + atol + rtol, dcase_str(c));
        *worst_out = fmax(*worst_out, e);
        *worst_ratio = fmax(*worst_ratio, e / bound);
        free(got); free(out); free(lse);
    }
    free(kd); free(vd); free(deq_out); free(deq_lse); free(raw_out); free(raw_lse);
    paged_free(&p);
}

void test_decode_int8(void)
{
    isas s;
    isas_open(&s, 0);
    qkv_ctx *ref = qkv_ctx_create(0);
    rng r = rng_seed(503);
    double worst_q = 0, worst_out = 0, worst_ratio = 0;
    const int n_cases = t_quick ? 10 : 30;
    for (int it = 0; it < n_cases; it++) {
        dcase c;
        random_dcase(&c, &r, it % 5 == 4 ? 4000 : 400);
        int8_case(&s, ref, &c, &r, (int64_t)8 << (it % 6), it % 4 == 3, &worst_q, &worst_out,
                  &worst_ratio);
        dcase_free(&c);
    }
    /* bf16 queries with head dims the int16 dot products take (multiples
       of 32 up to 256), then others (the last steps and columns of the
       kernels that widen codes in registers): every row count up to 16,
       and more (8, 16 and 70 new queries: codes as bf16 for the forward's
       kernels, the V scales on P), key counts with odd tails and split-K,
       blocks of 8 to 256 */
    static const int64_t dd[][2] = { { 32, 32 }, { 64, 96 }, { 128, 128 }, { 256, 64 },
                                     { 33, 33 }, { 40, 24 }, { 72, 100 }, { 8, 20 } };
    static const int64_t gs[][3] = { { 1, 1, 1 }, { 4, 1, 1 }, { 4, 1, 4 }, { 8, 2, 2 },
                                     { 16, 1, 1 }, { 8, 2, 8 }, { 8, 2, 16 },
                                     { 8, 2, 70 } };   /* Hq, Hkv, Sq */
    static const int64_t lens[] = { 1, 3, 37, 130, 1000, 5000 };
    for (int it = 0; it < (t_quick ? 16 : 64); it++) {
        dcase c;
        random_dcase(&c, &r, 400);
        c.qdt = QKV_BF16;
        c.D = dd[it % 8][0];
        c.Dv = dd[it % 8][1];
        const int g = (it + it / 8) % 8;   /* every pairing with dd */
        c.Hq = gs[g][0];
        c.Hkv = gs[g][1];
        c.Sq = gs[g][2];
        c.Smax = lens[it % 6];
        for (int64_t b = 0; b < c.B; b++)
            c.lens[b] = (int32_t)(b == 0 ? c.Smax : rng_int(&r, 0, c.Smax));
        int8_case(&s, ref, &c, &r, (int64_t)8 << (it % 6), it % 4 == 3, &worst_q, &worst_out,
                  &worst_ratio);
        dcase_free(&c);
    }
    /* head dims wider than the scores kernels widen queries for once per
       call: they widen them as they read them */
    for (int it = 0; it < 2; it++) {
        dcase c;
        random_dcase(&c, &r, 300);
        c.qdt = QKV_BF16;
        c.D = it ? 1030 : 1100;
        c.Dv = it ? 1100 : 1030;
        c.Hq = 4;
        c.Hkv = 1;
        c.Sq = 1 + it;
        for (int64_t b = 0; b < c.B; b++)
            c.lens[b] = (int32_t)(b == 0 ? c.Smax : rng_int(&r, 0, c.Smax));
        int8_case(&s, ref, &c, &r, 32, it, &worst_q, &worst_out, &worst_ratio);
        dcase_free(&c);
    }
    /* a V row that held a non-finite value has a NaN scale: its head's
       outputs are NaN, the other head's and sequence's are not (one new
       query, and 8: more rows than the few-row kernels take) */
    for (int sq = 1; sq <= 8; sq += 7) {
        dcase c;
        random_dcase(&c, &r, 400);
        c.qdt = QKV_BF16;
        c.kdt = QKV_F32;
        c.lay_k = LAY_CONTIG;
        c.B = 2; c.Sq = sq; c.Hq = 8; c.Hkv = 2; c.D = 128; c.Dv = 128; c.Smax = 300;
        c.lens[0] = c.lens[1] = 300;
        c.opts = qkv_attn_opts_default();
        dcase_build(&c, &r);
        paged p;
        paged_fill(s.ctx[0], &p, &c, 16, 1, 0, &r);
        const int64_t j = 123, h = 1, bs = p.pc.block_size;
        const int64_t blk = p.table[j / bs], row = (blk * bs + j % bs) * c.Hkv + h;
        p.pc.v_scale[row] = NAN;
        for (int i = 0; i < s.n; i++) {
            float *lse;
            void *out = run_paged(s.ctx[i], &c, &p, &lse);
            float *got = to_f32(out, c.qdt, c.n_out);
            size_t wrong = 0;
            for (int64_t b = 0; b < c.B; b++)
                for (int64_t iq = 0; iq < c.Sq; iq++)
                    for (int64_t hq = 0; hq < c.Hq; hq++)
                        for (int64_t x = 0; x < c.Dv; x++) {
                            const int want_nan = b == 0 && hq / (c.Hq / c.Hkv) == h;
                            const float g = got[((b * c.Sq + iq) * c.Hq + hq) * c.Dv + x];
                            wrong += (isnan(g) != 0) != want_nan;
                        }
            CHECK(wrong == 0, "%s: a NaN V scale: %zu outputs NaN where they should not be "
                  "or the reverse", s.name[i], wrong);
            free(got); free(out); free(lse);
        }
        paged_free(&p);
        dcase_free(&c);
    }
    /* the same logical int8 cache in pools of any block size and either
       layout gives the same outputs, through the codes (D 128), bf16
       conversion (D 40) and fp32 widening (fp32 queries) paths: the
       kernels take a tile's blocks in one call */
    static const int64_t dims[3] = { 128, 40, 64 };
    static const qkv_dtype qdts[3] = { QKV_BF16, QKV_BF16, QKV_F32 };
    for (int it = 0; it < (t_quick ? 3 : 9); it++) {
        dcase c;
        random_dcase(&c, &r, it % 3 == 2 ? 3000 : 500);
        c.qdt = qdts[it % 3];
        c.kdt = QKV_F32;
        c.lay_k = LAY_CONTIG;
        c.D = c.Dv = dims[it % 3];
        c.Hq = 8;   /* a few rows per tile: the decode kernels */
        c.Hkv = 2;
        c.Sq = 1 + it % 2;
        dcase_build(&c, &r);
        for (int i = 0; i < s.n; i++) {
            void *first = NULL;
            float *first_lse = NULL;
            int differ = 0;
            for (int64_t bs = 8; bs <= 256; bs *= 4)
                for (int hm = 0; hm < 2; hm++) {
                    paged p;
                    paged_fill(s.ctx[i], &p, &c, bs, 1, hm, &r);
                    float *lse;
                    void *out = run_paged(s.ctx[i], &c, &p, &lse);
                    if (!first) {
                        first = out;
                        first_lse = lse;
                    } else {
                        differ += memcmp(out, first, c.n_out * qkv_dtype_size(c.qdt)) != 0 ||
                                  memcmp(lse, first_lse, c.n_lse * sizeof(float)) != 0;
                        free(out);
                        free(lse);
                    }
                    paged_free(&p);
                }
            CHECK(differ == 0, "%s: int8 pools of other block sizes or layouts differ in %d "
                  "of 5 [%s]", s.name[i], differ, dcase_str(&c));
            free(first);
            free(first_lse);
        }
        dcase_free(&c);
    }
    t_note("int8 cache: max element error %.2e of its row max (bound %.2e); max |out - ref on "
           "unquantized cache| %.2e, at most %.0f%% of the derived bound",
           worst_q, 0.5 / 127, worst_out, 100 * worst_ratio);
    qkv_ctx_free(ref);
    isas_close(&s);
}

/* ---- threads ------------------------------------------------------------------ */

/* Whether the calling thread's AMX tiles are released (their
   configuration all zero, as after TILERELEASE): the decode kernels keep
   theirs loaded between calls, and each task releases it. */
static int tiles_released(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    unsigned char cfg[64] __attribute__((aligned(64)));
    memset(cfg, 0xff, sizeof cfg);
    __asm__ volatile("sttilecfg %0" : "=m"(cfg));
    for (int i = 0; i < 64; i++)
        if (cfg[i])
            return 0;
#endif
    return 1;
}

void test_decode_threads(void)
{
    static const int nthreads[4] = { 1, 2, 3, 5 };
    rng r = rng_seed(504);
    for (int isa = 0; qkv_isa_name(isa); isa++) {
        const char *name = qkv_isa_name(isa);
        if (!qkv_isa_supported(name)) continue;
        qkv_ctx *ctx[4];
        for (int t = 0; t < 4; t++) {
            ctx[t] = qkv_ctx_create(nthreads[t]);
            CHECK(ctx[t] && qkv_ctx_set_isa(ctx[t], name) == QKV_OK, "context %s", name);
        }
        const int n_it = t_quick ? 2 : 4;
        for (int it = 0; it <= n_it + 3; it++) {
            dcase c;
            random_dcase(&c, &r, it % 2 ? 10000 : 300);
            if (it % 2)   /* split along the keys */
                one_full_sequence(&c, 16);
            if (it > n_it) {
                /* a chunk that runs through the forward's kernels on the
                   amx set (520 rows a kv head), a pool's rows gathered */
                c.B = 2;
                c.Sq = 130;
                c.Hq = 8;
                c.Hkv = 2;
                c.D = c.Dv = 64;
                c.Smax = 700;
                c.lens[0] = 700;
                c.lens[1] = 300;
                c.qdt = c.kdt = it == n_it + 1 ? QKV_BF16 : QKV_F16;
                c.lay_k = LAY_CONTIG;
                c.opts = qkv_attn_opts_default();
                c.opts.causal = 1;
            }
            if (it == n_it || it == n_it + 3) {
                /* one sequence not split along the keys: how many kv
                   heads a task takes of a position-major cache or a
                   head-major pool follows the thread count; a row per
                   kv head, or (bf16) 32 rows, which the amx set takes 16
                   at a time, in tasks of 8, 4, 2 and 1 kv heads at 1, 2,
                   3 and 5 threads */
                c.B = 1;
                c.Hkv = 8;
                c.Hq = it == n_it ? 8 : 32;
                c.Sq = it == n_it ? 1 : 8;
                c.D = c.Dv = 64;
                c.Smax = 4200;
                c.lens[0] = 4200;
                c.lay_k = LAY_CONTIG;
                if (it > n_it)
                    c.qdt = c.kdt = QKV_BF16;
            }
            dcase_build(&c, &r);
            paged p;
            paged_fill(ctx[0], &p, &c, 16, it == 3, it == 2 || it == n_it, &r);
            void *o0 = NULL, *p0 = NULL;
            float *l0 = NULL, *pl0 = NULL;
            for (int t = 0; t < 4; t++) {
                float *l, *pl;
                void *o = run_kvcache(ctx[t], &c, &l), *po = run_paged(ctx[t], &c, &p, &pl);
                if (t == 0 && !strcmp(name, "amx"))   /* one thread: the caller ran every task */
                    CHECK(tiles_released(), "amx: tiles left configured [%s]", dcase_str(&c));
                if (t == 0) {
                    o0 = o; l0 = l; p0 = po; pl0 = pl;
                    continue;
                }
                CHECK(memcmp(o, o0, c.n_out * qkv_dtype_size(c.qdt)) == 0 &&
                      memcmp(l, l0, c.n_lse * sizeof(float)) == 0 &&
                      memcmp(po, p0, c.n_out * qkv_dtype_size(c.qdt)) == 0 &&
                      memcmp(pl, pl0, c.n_lse * sizeof(float)) == 0,
                      "%s: %d threads differ from 1 [%s]", name, nthreads[t], dcase_str(&c));
                free(o); free(l); free(po); free(pl);
            }
            free(o0); free(l0); free(p0); free(pl0);
            paged_free(&p);
            dcase_free(&c);
        }
        for (int t = 0; t < 4; t++)
            qkv_ctx_free(ctx[t]);
    }
}

/* ---- errors ------------------------------------------------------------------- */

/* A valid small problem: 2 sequences, Sq 2, Hq 4, Hkv 2, D 8, Dv 6; a
   paged fp32 cache of 8 blocks of 8 and an int8 twin; a contiguous cache
   of Smax 16. Each case breaks one thing. */
enum { EB = 2, ESQ = 2, EHQ = 4, EHKV = 2, ED = 8, EDV = 6, ESMAX = 16, ENB = 8, EBS = 8,
       EMAXB = 3, ECAP = 2048 };

typedef struct {
    qkv_ctx        *ctx;
    qkv_tensor      q, out, kc, vc, kn, vn;
    qkv_paged_cache pc;
    int32_t         table[EB * EMAXB], lens[EB];
    int64_t         max_blocks;
    qkv_attn_opts   opts;
    float           qb[ECAP], kb[ECAP], vb[ECAP], knb[ECAP], vnb[ECAP];
    float           pk[ENB * EBS * EHKV * ED], pv[ENB * EBS * EHKV * EDV];
    unsigned char   ob[ECAP * 4], lb[ECAP * 4];
} eset;

static void eset_init(eset *e, qkv_ctx *ctx)
{
    memset(e, 0, sizeof *e);
    e->ctx = ctx;
    rng r = rng_seed(77);
    fill_random(e->qb, QKV_F32, ECAP, &r);
    fill_random(e->kb, QKV_F32, ECAP, &r);
    fill_random(e->vb, QKV_F32, ECAP, &r);
    fill_random(e->knb, QKV_F32, ECAP, &r);
    fill_random(e->vnb, QKV_F32, ECAP, &r);
    e->q = qkv_tensor_4d(e->qb, QKV_F32, EB, ESQ, EHQ, ED);
    e->out = qkv_tensor_4d(e->ob, QKV_F32, EB, ESQ, EHQ, EDV);
    e->kc = qkv_tensor_4d(e->kb, QKV_F32, EB, ESMAX, EHKV, ED);
    e->vc = qkv_tensor_4d(e->vb, QKV_F32, EB, ESMAX, EHKV, EDV);
    e->kn = qkv_tensor_4d(e->knb, QKV_F32, EB, 3, EHKV, ED);
    e->vn = qkv_tensor_4d(e->vnb, QKV_F32, EB, 3, EHKV, EDV);
    e->pc.k = e->pk;
    e->pc.v = e->pv;
    e->pc.dtype = QKV_KV_F32;
    e->pc.n_blocks = ENB;
    e->pc.block_size = EBS;
    e->pc.heads_kv = EHKV;
    e->pc.head_dim = ED;
    e->pc.head_dim_v = EDV;
    const int32_t table[EB * EMAXB] = { 5, 2, 7, 0, 3, 1 };
    memcpy(e->table, table, sizeof table);
    e->lens[0] = 13;   /* blocks 5, 2 (and 7 when 3 rows are appended) */
    e->lens[1] = 9;    /* blocks 0, 3 */
    e->max_blocks = EMAXB;
    e->opts = qkv_attn_opts_default();
    memset(e->ob, OUT_SENTINEL, sizeof e->ob);
    memset(e->lb, LSE_SENTINEL, sizeof e->lb);
    fill_random(e->pk, QKV_F32, sizeof e->pk / sizeof(float), &r);
    fill_random(e->pv, QKV_F32, sizeof e->pv / sizeof(float), &r);
}

enum { CALL_KVCACHE, CALL_PAGED, CALL_APPEND };

static qkv_status ecall(eset *e, int which)
{
    switch (which) {
    case CALL_KVCACHE:
        return qkv_attention_kvcache(e->ctx, &e->q, &e->kc, &e->vc, e->lens, &e->opts, &e->out,
                                     (float *)e->lb);
    case CALL_PAGED:
        return qkv_attention_paged(e->ctx, &e->q, &e->pc, e->table, e->max_blocks, e->lens,
                                   &e->opts, &e->out, (float *)e->lb);
    default:
        return qkv_paged_append(e->ctx, &e->pc, e->table, e->max_blocks, e->lens, &e->kn, &e->vn);
    }
}

/* The call fails with want, names `names`, and writes nothing. */
static void expect(eset *e, int which, qkv_status want, const char *names, const char *what)
{
    static float pk0[sizeof ((eset *)0)->pk / sizeof(float)], pv0[sizeof ((eset *)0)->pv / sizeof(float)];
    memcpy(pk0, e->pk, sizeof pk0);
    memcpy(pv0, e->pv, sizeof pv0);
    qkv_status st = ecall(e, which);
    const char *msg = qkv_ctx_last_error(e->ctx);
    CHECK(st == want, "%s: status %d (%s), want %d; message: %s", what, st,
          qkv_status_string(st), want, msg);
    CHECK(msg_names(msg, names), "%s: message '%s' does not name %s", what, msg, names);
    size_t touched = 0;
    for (size_t i = 0; i < sizeof e->ob; i++)
        touched += e->ob[i] != OUT_SENTINEL;
    for (size_t i = 0; i < sizeof e->lb; i++)
        touched += e->lb[i] != LSE_SENTINEL;
    touched += memcmp(pk0, e->pk, sizeof pk0) != 0;
    touched += memcmp(pv0, e->pv, sizeof pv0) != 0;
    CHECK(touched == 0, "%s: the failed call wrote to its outputs (%zu)", what, touched);
}

void test_decode_errors(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2);
    eset e;
    /* the baselines work */
    for (int w = 0; w < 3; w++) {
        eset_init(&e, ctx);
        qkv_status st = ecall(&e, w);
        CHECK(st == QKV_OK, "baseline %d: %s", w, qkv_ctx_last_error(ctx));
    }
    eset_init(&e, ctx);
    CHECK(qkv_attention_kvcache(NULL, &e.q, &e.kc, &e.vc, e.lens, &e.opts, &e.out, NULL) ==
          QKV_ERR_NULL, "NULL ctx");
    CHECK(qkv_attention_paged(NULL, &e.q, &e.pc, e.table, EMAXB, e.lens, &e.opts, &e.out, NULL) ==
          QKV_ERR_NULL, "NULL ctx");
    CHECK(qkv_paged_append(NULL, &e.pc, e.table, EMAXB, e.lens, &e.kn, &e.vn) == QKV_ERR_NULL,
          "NULL ctx");

    /* contiguous cache */
    eset_init(&e, ctx); e.lens[1] = ESMAX + 1;
    expect(&e, CALL_KVCACHE, QKV_ERR_SHAPE, "seqlens_k[1]&k_cache->shape[1]", "length past Smax");
    eset_init(&e, ctx); e.lens[0] = -1;
    expect(&e, CALL_KVCACHE, QKV_ERR_SHAPE, "seqlens_k[0]", "negative length");
    eset_init(&e, ctx); e.vc.shape[1] = ESMAX - 1;
    expect(&e, CALL_KVCACHE, QKV_ERR_SHAPE, "v_cache->shape[1]", "v_cache rows");
    eset_init(&e, ctx); e.vc.dtype = QKV_BF16;
    expect(&e, CALL_KVCACHE, QKV_ERR_DTYPE, "v_cache->dtype", "v_cache dtype");
    eset_init(&e, ctx); e.kc.shape[0] = 1; e.vc.shape[0] = 1;
    expect(&e, CALL_KVCACHE, QKV_ERR_SHAPE, "k_cache->shape[0]", "cache batch");
    eset_init(&e, ctx); e.kc.shape[3] = ED - 1;
    expect(&e, CALL_KVCACHE, QKV_ERR_SHAPE, "q->shape[3]&k_cache", "head_dim");
    eset_init(&e, ctx); e.kc.data = NULL;
    expect(&e, CALL_KVCACHE, QKV_ERR_NULL, "k_cache->data", "NULL k_cache data");
    eset_init(&e, ctx); e.out.shape[3] = EDV + 1;
    expect(&e, CALL_KVCACHE, QKV_ERR_SHAPE, "out->shape[3]", "out head_dim");
    eset_init(&e, ctx); e.out.dtype = QKV_F16;
    expect(&e, CALL_KVCACHE, QKV_ERR_DTYPE, "out->dtype", "out dtype");
    eset_init(&e, ctx); e.out.stride[1] = 0;
    expect(&e, CALL_KVCACHE, QKV_ERR_STRIDE, "out->stride[1]", "out overlapping");
    int32_t cu[3] = { 0, 1, 2 };
    eset_init(&e, ctx); e.opts.cu_seqlens_q = cu; e.opts.cu_seqlens_k = cu; e.opts.n_seqs = 2;
    expect(&e, CALL_KVCACHE, QKV_ERR_UNSUPPORTED, "opts->cu_seqlens_q", "varlen");
    float bias[4] = { 0 };
    qkv_tensor bt = qkv_tensor_4d(bias, QKV_F32, 1, 1, 1, 1);
    eset_init(&e, ctx); e.opts.bias = &bt;
    expect(&e, CALL_PAGED, QKV_ERR_UNSUPPORTED, "opts->bias", "bias");
    eset_init(&e, ctx); e.opts.window_left = -2;
    expect(&e, CALL_PAGED, QKV_ERR_ARG, "opts->window_left", "window");
    eset_init(&e, ctx); e.opts.scale = NAN;
    expect(&e, CALL_KVCACHE, QKV_ERR_ARG, "opts->scale", "scale");

    /* the paged cache description, for attention and append alike */
    for (int w = CALL_PAGED; w <= CALL_APPEND; w++) {
        eset_init(&e, ctx); e.pc.k = NULL;
        expect(&e, w, QKV_ERR_NULL, "cache->k", "NULL pool");
        eset_init(&e, ctx); e.pc.dtype = (qkv_kv_dtype)7;
        expect(&e, w, QKV_ERR_DTYPE, "cache->dtype", "bad dtype");
        eset_init(&e, ctx); e.pc.dtype = QKV_KV_I8;
        expect(&e, w, QKV_ERR_NULL, "cache->k_scale", "int8 without scales");
        static const int64_t bad_bs[] = { 0, 4, 12, 512, -8 };
        for (size_t i = 0; i < sizeof bad_bs / sizeof bad_bs[0]; i++) {
            eset_init(&e, ctx); e.pc.block_size = bad_bs[i];
            expect(&e, w, QKV_ERR_ARG, "cache->block_size", "block size");
        }
        eset_init(&e, ctx); e.pc.head_major = 2;
        expect(&e, w, QKV_ERR_ARG, "cache->head_major", "unknown layout");
        eset_init(&e, ctx); e.pc.n_blocks = 0;
        expect(&e, w, QKV_ERR_ARG, "cache->n_blocks", "no blocks");
        eset_init(&e, ctx); e.pc.n_blocks = INT64_MAX / 4;
        expect(&e, w, QKV_ERR_OVERFLOW, "cache", "pool size overflow");
        eset_init(&e, ctx); e.pc.heads_kv = 0;
        expect(&e, w, QKV_ERR_ARG, "cache->heads_kv", "no heads");
        eset_init(&e, ctx); e.table[1] = ENB;
        expect(&e, w, QKV_ERR_SHAPE, "block_table[0][1]&cache->n_blocks", "block id past the pool");
        eset_init(&e, ctx); e.table[4] = -1;
        expect(&e, w, QKV_ERR_SHAPE, "block_table[1][1]", "negative block id");
        eset_init(&e, ctx); e.max_blocks = 0;
        expect(&e, w, QKV_ERR_SHAPE, "max_blocks", "no table columns");
        eset_init(&e, ctx); e.lens[1] = -3;
        expect(&e, w, QKV_ERR_SHAPE, w == CALL_PAGED ? "seqlens_k[1]" : "seqlens[1]",
               "negative length");
        eset_init(&e, ctx); e.lens[0] = EMAXB * EBS + 1;
        expect(&e, w, QKV_ERR_SHAPE, w == CALL_PAGED ? "seqlens_k[0]" : "seqlens[0]",
               "length past the table");
        eset_init(&e, ctx);
        if (w == CALL_PAGED) e.q.shape[2] = 3; else e.kn.shape[2] = 3;
        expect(&e, w, QKV_ERR_SHAPE, w == CALL_PAGED ? "q->shape[2]&cache" : "k_new->shape[2]",
               "heads");
    }
    /* blocks the call does not reach are not checked */
    eset_init(&e, ctx); e.table[5] = -1;
    CHECK(ecall(&e, CALL_PAGED) == QKV_OK, "an unused table cell refused: %s",
          qkv_ctx_last_error(ctx));

    /* append: room, shapes, dtypes, blocks written twice */
    eset_init(&e, ctx); e.lens[1] = 2 * EBS - 2;   /* 3 more rows need a third block */
    e.table[5] = ENB + 4;
    expect(&e, CALL_APPEND, QKV_ERR_SHAPE, "block_table[1][2]", "append into a bad block");
    eset_init(&e, ctx); e.lens[0] = EMAXB * EBS - 2;
    expect(&e, CALL_APPEND, QKV_ERR_SHAPE, "seqlens[0]", "append past the table");
    eset_init(&e, ctx); e.table[4] = 2;   /* sequence 1's block 1 is sequence 0's block 1 */
    expect(&e, CALL_APPEND, QKV_ERR_ARG, "block_table[0][1]&block_table[1][1]", "shared block");
    eset_init(&e, ctx); e.table[1] = 5;   /* sequence 0 lists block 5 twice */
    expect(&e, CALL_APPEND, QKV_ERR_ARG, "block_table[0][0]&block_table[0][1]", "repeated block");
    eset_init(&e, ctx); e.table[3] = 2;   /* sequence 1 reads the block sequence 0 writes */
    expect(&e, CALL_APPEND, QKV_ERR_ARG, "block_table[0][1]&block_table[1][0]",
           "writing a shared block");
    eset_init(&e, ctx); e.table[3] = 5;   /* a read-only shared prefix block is fine */
    CHECK(ecall(&e, CALL_APPEND) == QKV_OK, "a shared read-only block refused: %s",
          qkv_ctx_last_error(ctx));
    eset_init(&e, ctx); e.vn.dtype = QKV_F16;
    expect(&e, CALL_APPEND, QKV_ERR_DTYPE, "v_new->dtype", "v_new dtype");
    eset_init(&e, ctx); e.vn.shape[3] = EDV + 1;
    expect(&e, CALL_APPEND, QKV_ERR_SHAPE, "v_new->shape[3]&cache->head_dim_v", "v_new head_dim");
    eset_init(&e, ctx); e.vn.shape[1] = 2;
    expect(&e, CALL_APPEND, QKV_ERR_SHAPE, "v_new->shape[1]&k_new->shape[1]", "v_new rows");
    eset_init(&e, ctx); e.kn.data = NULL;
    expect(&e, CALL_APPEND, QKV_ERR_NULL, "k_new->data", "NULL k_new data");

    /* random tables and lengths, a few ids and lengths just out of range:
       refused exactly when a used cell or a length is bad, else computed
       (the sanitizer build sees any read outside the pools) */
    rng r = rng_seed(505);
    for (int it = 0; it < 400; it++) {
        eset_init(&e, ctx);
        int bad = 0;
        for (int b = 0; b < EB; b++) {
            e.lens[b] = (int32_t)rng_int(&r, -1, EMAXB * EBS + 1);
            bad |= e.lens[b] < 0 || e.lens[b] > EMAXB * EBS;
            for (int i = 0; i < EMAXB; i++) {
                int32_t id = (int32_t)rng_int(&r, -1, ENB);
                e.table[b * EMAXB + i] = id;
                if ((int64_t)i * EBS < e.lens[b] && (id < 0 || id >= ENB))
                    bad = 1;
            }
        }
        if (bad) {
            expect(&e, CALL_PAGED, QKV_ERR_SHAPE, "seqlens_k|block_table", "random table");
        } else {
            qkv_status st = ecall(&e, CALL_PAGED);
            CHECK(st == QKV_OK, "random valid table refused: %s", qkv_ctx_last_error(ctx));
        }
    }
    qkv_ctx_free(ctx);
}

/* qk_i8_dec of every kernel set that has it: the scores of 14-16 query
   rows in one call (lanes along the queries on AVX-512 sets) are those of
   the same rows in calls of 4 (blocks of 4 keys x 4 queries): the int32
   sums are exact, and both scale them alike. 37 keys (a block of 8 and
   single keys), d 128 and 64. */
void test_decode_i8_kernel_bits(void)
{
    enum { N = 37, D = 128, LD = D + 32, M = 16 };
    rng r = rng_seed(77);
    int8_t *k = malloc((size_t)N * LD);
    int16_t q[M * D];
    float qsc[M];
    for (int i = 0; i < N * LD; i++)
        k[i] = (int8_t)rng_int(&r, -127, 127);
    for (int i = 0; i < M * D; i++)
        q[i] = (int16_t)rng_int(&r, -32767, 32767);
    for (int i = 0; i < M; i++)
        qsc[i] = (float)(rng_unif(&r) * 1e-4 + 1e-6);
    const char *blk[1] = { (const char *)k };
    const qkv__rows rows = { blk, LD, QKV__RUN, 0 };
    int sets = 0;
    for (int s = 0; qkv__kernels_name(s); s++) {
        int known;
        const qkv__kernels *kn = qkv__kernels_by_name(qkv__kernels_name(s), &known);
        if (!kn || !kn->qk_i8_dec)
            continue;
        sets++;
        for (int d = 64; d <= D; d += 64)
            for (int m = 14; m <= M; m++) {
                float one[M * N], fours[M * N];
                kn->qk_i8_dec(N, m, d, 0.125f, &rows, q, D, qsc, one, N, NULL);
                for (int g = 0; g < m; g += 4)
                    kn->qk_i8_dec(N, m - g < 4 ? m - g : 4, d, 0.125f, &rows, q + g * D, D,
                                  qsc + g, fours + g * N, N, NULL);
                CHECK(memcmp(one, fours, (size_t)m * N * sizeof(float)) == 0,
                      "%s: qk_i8_dec of %d rows (d %d) differs from calls of 4 rows",
                      kn->name, m, d);
            }
    }
    t_note("%d kernel sets", sets);
    free(k);
}

/* The few-row P·V kernels' bits (kernels.h): pv_bf16_dec and pv_i8_dec
   over V rows in blocks of 8 scattered in memory (a paged cache) give the
   bits of the same rows in one run, and calls split at multiples of 128
   keys (the decode's sub-tiles against its tiles of 256) the bits of one
   call. Large int16 P and int8 codes push the int32 sums past 2^24, where
   converting them to fp32 rounds. */
void test_decode_pv_kernel_bits(void)
{
    enum { N = 256 + 37, DV = 96, M = 16, LDP = 320, BS = 8, LDB = DV + 32 };
    rng r = rng_seed(78);
    uint16_t *vb = malloc((size_t)N * DV * 2), *pb = malloc((size_t)M * LDP * 2);
    int8_t *v8 = malloc((size_t)N * DV);
    int16_t *p16 = malloc((size_t)M * LDP * 2);
    float acc0[M * DV], alpha[M];
    for (int i = 0; i < N * DV; i++) {
        v8[i] = (int8_t)rng_int(&r, -127, 127);
        const float x = (float)rng_unif(&r);
        qkv_convert(&x, QKV_F32, vb + i, QKV_BF16, 1);
    }
    for (int i = 0; i < M * LDP; i++) {
        const int j = i % LDP;
        const float x = j < N ? (float)(rng_unif(&r) * 0.5 + 0.5) : 0.0f;
        qkv_convert(&x, QKV_F32, pb + i, QKV_BF16, 1);
        p16[i] = (int16_t)(j < N ? rng_int(&r, 20000, 32767) : 0);
    }
    for (int i = 0; i < M * DV; i++)
        acc0[i] = (float)rng_unif(&r);
    for (int i = 0; i < M; i++)
        alpha[i] = (float)(rng_unif(&r) * 0.5 + 0.5);
    /* the same rows in blocks of BS, each block LDB wide, blocks in
       reverse order in one buffer (bf16 and int8) */
    const int nblk = (N + BS - 1) / BS;
    uint16_t *pgb = calloc((size_t)nblk * BS * LDB, 2);
    int8_t *pg8 = calloc((size_t)nblk * BS * LDB, 1);
    const char *bb[(N + BS - 1) / BS], *b8[(N + BS - 1) / BS];
    for (int b = 0; b < nblk; b++) {
        const int at = nblk - 1 - b;
        bb[b] = (const char *)(pgb + (size_t)at * BS * LDB);
        b8[b] = (const char *)(pg8 + (size_t)at * BS * LDB);
        for (int j = 0; j < BS && b * BS + j < N; j++) {
            memcpy(pgb + ((size_t)at * BS + j) * LDB, vb + (size_t)(b * BS + j) * DV, DV * 2);
            memcpy(pg8 + ((size_t)at * BS + j) * LDB, v8 + (size_t)(b * BS + j) * DV, DV);
        }
    }
    int sets = 0;
    for (int s = 0; qkv__kernels_name(s); s++) {
        int known;
        const qkv__kernels *kn = qkv__kernels_by_name(qkv__kernels_name(s), &known);
        if (!kn || !kn->pv_bf16_dec)
            continue;
        sets++;
        for (int i8 = 0; i8 < 2; i8++) {
            if (i8 && !kn->pv_i8_dec)
                continue;
            const char *run[1] = { i8 ? (const char *)v8 : (const char *)vb };
            const int64_t es = i8 ? 1 : 2;
            for (int m = 1; m <= M; m++) {
                float one[M * DV], paged[M * DV], split[M * DV];
                memcpy(one, acc0, sizeof one);
                memcpy(paged, acc0, sizeof paged);
                memcpy(split, acc0, sizeof split);
                const qkv__rows rr = { run, DV * es, QKV__RUN, 0 };
                const qkv__rows rp = { i8 ? b8 : bb, LDB * es, 3, 0 };
                for (int c = 0; c < 3; c++) {   /* one call, paged, split at 128 */
                    float *acc = c == 0 ? one : c == 1 ? paged : split;
                    for (int k0 = 0; k0 < N;) {
                        const int n = c < 2 ? N : N - k0 < 128 ? N - k0 : 128;
                        const char *at[1] = { run[0] + (int64_t)k0 * DV * es };
                        const qkv__rows rs = { at, DV * es, QKV__RUN, 0 };
                        const qkv__rows *v = c == 0 ? &rr : c == 1 ? &rp : &rs;
                        if (i8)
                            kn->pv_i8_dec(m, n, DV, p16 + k0, LDP, v, k0 ? NULL : alpha,
                                          1.0f / 8192, acc, DV, NULL);
                        else
                            kn->pv_bf16_dec(m, n, DV, pb + k0, LDP, v, k0 ? NULL : alpha, acc,
                                            DV, NULL);
                        k0 += n;
                    }
                }
                CHECK(memcmp(one, paged, (size_t)m * DV * sizeof(float)) == 0,
                      "%s: pv_%s_dec of %d rows over blocks of %d differs from one run",
                      kn->name, i8 ? "i8" : "bf16", m, BS);
                CHECK(memcmp(one, split, (size_t)m * DV * sizeof(float)) == 0,
                      "%s: pv_%s_dec of %d rows in calls of 128 keys differs from one call",
                      kn->name, i8 ? "i8" : "bf16", m);
            }
        }
    }
    t_note("%d kernel sets", sets);
    free(vb); free(pb); free(v8); free(p16); free(pgb); free(pg8);
}
