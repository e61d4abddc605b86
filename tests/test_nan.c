/*
 * test_nan.c — a NaN reaches exactly the rows that see it. A NaN in K (or
 * the NaN scale an int8 pool gives a row holding one) makes the output
 * and lse of every query row that sees that key NaN, as PyTorch's softmax
 * does, and leaves every other row bitwise as it is without the NaN: the
 * reference, the forward (every dtype), the KV-cache and paged paths
 * (bf16 and int8 pools), on every kernel set. A NaN in a query makes its
 * own rows NaN.
 */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { B = 2, HQ = 4, HKV = 2, D = 64, S = 300, NAN_KEY = 100, NAN_HEAD = 1 };

typedef struct {
    float *q, *k, *v;   /* fp32 sources: q [B, sq, HQ, D], k/v [B, S, HKV, D] */
    int64_t sq;
} inputs;

static void make_inputs(inputs *in, int64_t sq, rng *r)
{
    in->sq = sq;
    in->q = xmalloc((size_t)(B * sq * HQ * D) * sizeof(float));
    in->k = xmalloc((size_t)(B * S * HKV * D) * sizeof(float));
    in->v = xmalloc((size_t)(B * S * HKV * D) * sizeof(float));
    fill_random(in->q, QKV_F32, (size_t)(B * sq * HQ * D), r);
    fill_random(in->k, QKV_F32, (size_t)(B * S * HKV * D), r);
    fill_random(in->v, QKV_F32, (size_t)(B * S * HKV * D), r);
}

static void free_inputs(inputs *in)
{
    free(in->q); free(in->k); free(in->v);
}

/* x converted to dtype dt in a new buffer. */
static void *as(const float *x, size_t n, qkv_dtype dt)
{
    void *y = xmalloc(n * qkv_dtype_size(dt));
    CHECK(qkv_convert(x, QKV_F32, y, dt, (int64_t)n) == QKV_OK, "convert");
    return y;
}

/* Which rows a NaN reaches: row (b, i, h) with query position p (its
   place among the sequence's keys) sees key j when it is visible. */
typedef int (*reach_fn)(int64_t b, int64_t p, int64_t h, int64_t len);

static int reach_key(int64_t b, int64_t p, int64_t h, int64_t len)
{
    return b == 0 && h / (HQ / HKV) == NAN_HEAD && NAN_KEY <= p && NAN_KEY < len;
}

static int reach_query(int64_t b, int64_t p, int64_t h, int64_t len)
{
    (void)len;
    return b == 1 && h == 3 && p == S - 1;   /* the last query of sequence 1 */
}

/* Rows reached are NaN in every output and lse; the others equal the run
   without the NaN bit for bit; some: whether any row is reached. causal,
   bottom-right aligned: row i's position is len - sq + i. */
static void check_rows(const char *what, qkv_dtype dt, const void *out, const float *lse,
                       const void *clean, const float *clean_lse, int64_t sq,
                       const int32_t *lens, reach_fn reach, int some)
{
    const size_t es = qkv_dtype_size(dt);
    float *o = to_f32(out, dt, (size_t)(B * sq * HQ * D));
    size_t bad_nan = 0, bad_clean = 0, reached = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < sq; i++)
            for (int64_t h = 0; h < HQ; h++) {
                const int64_t row = (b * sq + i) * HQ + h, len = lens ? lens[b] : S;
                if (reach(b, len - sq + i, h, len)) {
                    reached++;
                    for (int64_t x = 0; x < D; x++)
                        bad_nan += !isnan(o[row * D + x]);
                    bad_nan += !isnan(lse[(b * HQ + h) * sq + i]);
                } else {
                    bad_clean += memcmp((const char *)out + row * D * es,
                                        (const char *)clean + row * D * es, D * es) != 0;
                    bad_clean += memcmp(lse + (b * HQ + h) * sq + i,
                                        clean_lse + (b * HQ + h) * sq + i, sizeof *lse) != 0;
                }
            }
    CHECK((reached > 0) == some && bad_nan == 0 && bad_clean == 0,
          "%s: %zu rows reached, %zu values there not NaN, %zu rows elsewhere changed", what,
          reached, bad_nan, bad_clean);
    free(o);
}

typedef qkv_status (*attn_fn)(qkv_ctx *ctx, const qkv_tensor *q, const qkv_tensor *k,
                              const qkv_tensor *v, const qkv_attn_opts *opts, qkv_tensor *out,
                              float *lse);

/* One call of fn (forward or reference) on the inputs in dtype dt; out
   and lse malloc'd. */
static void run_dense(qkv_ctx *ctx, attn_fn fn, const inputs *in, qkv_dtype dt, void **out,
                      float **lse)
{
    void *q = as(in->q, (size_t)(B * in->sq * HQ * D), dt),
         *k = as(in->k, (size_t)(B * S * HKV * D), dt), *v = as(in->v, (size_t)(B * S * HKV * D), dt);
    *out = xmalloc((size_t)(B * in->sq * HQ * D) * qkv_dtype_size(dt));
    *lse = xmalloc((size_t)(B * HQ * in->sq) * sizeof(float));
    qkv_tensor qt = qkv_tensor_4d(q, dt, B, in->sq, HQ, D), kt = qkv_tensor_4d(k, dt, B, S, HKV, D),
               vt = qkv_tensor_4d(v, dt, B, S, HKV, D), ot = qkv_tensor_4d(*out, dt, B, in->sq, HQ, D);
    qkv_attn_opts o = qkv_attn_opts_default();
    o.causal = 1;
    CHECK(fn(ctx, &qt, &kt, &vt, &o, &ot, *lse) == QKV_OK, "attention: %s", qkv_ctx_last_error(ctx));
    free(q); free(k); free(v);
}

/* qkv_attention_kvcache (pool < 0) or qkv_attention_paged on a pool of
   dtype pool (a qkv_kv_dtype), queries in dt. */
static void run_cache(qkv_ctx *ctx, const inputs *in, qkv_dtype dt, int pool, const int32_t *lens,
                      void **out, float **lse)
{
    void *q = as(in->q, (size_t)(B * in->sq * HQ * D), dt);
    *out = xmalloc((size_t)(B * in->sq * HQ * D) * qkv_dtype_size(dt));
    *lse = xmalloc((size_t)(B * HQ * in->sq) * sizeof(float));
    qkv_tensor qt = qkv_tensor_4d(q, dt, B, in->sq, HQ, D), ot = qkv_tensor_4d(*out, dt, B, in->sq, HQ, D);
    qkv_attn_opts o = qkv_attn_opts_default();
    o.causal = 1;
    if (pool < 0) {
        void *k = as(in->k, (size_t)(B * S * HKV * D), dt), *v = as(in->v, (size_t)(B * S * HKV * D), dt);
        qkv_tensor kt = qkv_tensor_4d(k, dt, B, S, HKV, D), vt = qkv_tensor_4d(v, dt, B, S, HKV, D);
        CHECK(qkv_attention_kvcache(ctx, &qt, &kt, &vt, lens, &o, &ot, *lse) == QKV_OK,
              "kvcache: %s", qkv_ctx_last_error(ctx));
        free(k); free(v);
    } else {
        enum { BS = 16, PER = S / BS + 1 };
        qkv_paged_cache c;
        memset(&c, 0, sizeof c);
        c.dtype = (qkv_kv_dtype)pool;
        c.n_blocks = B * PER;
        c.block_size = BS;
        c.heads_kv = HKV;
        c.head_dim = c.head_dim_v = D;
        c.head_major = 1;
        const size_t rows = (size_t)(c.n_blocks * BS * HKV), es = pool == QKV_KV_I8 ? 1 : 2;
        c.k = xmalloc(rows * D * es);
        c.v = xmalloc(rows * D * es);
        if (pool == QKV_KV_I8) {
            c.k_scale = xmalloc(rows * sizeof(float));
            c.v_scale = xmalloc(rows * sizeof(float));
        }
        int32_t table[B * PER], len[B] = { 0, 0 };
        for (int x = 0; x < B * PER; x++)
            table[x] = (int32_t)((x * 7) % (B * PER));   /* scattered */
        qkv_tensor kt = qkv_tensor_4d(in->k, QKV_F32, B, S, HKV, D),
                   vt = qkv_tensor_4d(in->v, QKV_F32, B, S, HKV, D);
        CHECK(qkv_paged_append(ctx, &c, table, PER, len, &kt, &vt) == QKV_OK, "append: %s",
              qkv_ctx_last_error(ctx));
        CHECK(qkv_attention_paged(ctx, &qt, &c, table, PER, lens, &o, &ot, *lse) == QKV_OK,
              "paged: %s", qkv_ctx_last_error(ctx));
        free(c.k); free(c.v); free(c.k_scale); free(c.v_scale);
    }
    free(q);
}

void test_nan_rows(void)
{
    rng r = rng_seed(71);
    static const qkv_dtype dts[3] = { QKV_F32, QKV_F16, QKV_BF16 };
    for (int isa = 0; qkv_isa_name(isa); isa++) {
        const char *name = qkv_isa_name(isa);
        if (!qkv_isa_supported(name))
            continue;
        qkv_ctx *ctx = qkv_ctx_create(2);
        CHECK(qkv_ctx_set_isa(ctx, name) == QKV_OK, "isa %s", name);
        char what[128];
        /* the forward and the reference: every query position */
        for (int which = 0; which < 2; which++) {
            inputs in;
            make_inputs(&in, S, &r);
            for (int t = 0; t < 3; t++)
                for (int ref = 0; ref < 2; ref++) {
                    if (ref && t)
                        continue;
                    attn_fn fn = ref ? qkv_attention_reference : qkv_attention_forward;
                    void *clean, *out;
                    float *clean_lse, *lse;
                    run_dense(ctx, fn, &in, dts[t], &clean, &clean_lse);
                    float *spot = which ? &in.q[(((int64_t)1 * S + S - 1) * HQ + 3) * D + 5]
                                        : &in.k[(NAN_KEY * HKV + NAN_HEAD) * D + 7];
                    const float keep = *spot;
                    *spot = NAN;
                    run_dense(ctx, fn, &in, dts[t], &out, &lse);
                    *spot = keep;
                    snprintf(what, sizeof what, "%s %s %s, NaN in %s", name,
                             ref ? "reference" : "forward", dtype_name(dts[t]),
                             which ? "q" : "k");
                    check_rows(what, dts[t], out, lse, clean, clean_lse, S, NULL,
                               which ? reach_query : reach_key, 1);
                    free(clean); free(clean_lse); free(out); free(lse);
                }
            free_inputs(&in);
        }
        /* decoding: the cache's NaN key seen (length 300) or not (100) */
        for (int64_t sq = 1; sq <= 3; sq += 2) {
            inputs in;
            make_inputs(&in, sq, &r);
            static const int32_t lens_all[B] = { S, S }, lens_short[B] = { NAN_KEY, S };
            /* pools: -1 contiguous, else bf16 or int8 paged */
            static const int pools[3] = { -1, QKV_KV_BF16, QKV_KV_I8 };
            for (int t = 0; t < 3; t++)
                for (int pl = 0; pl < 3; pl++)
                    for (int shortened = 0; shortened < 2; shortened++) {
                        if (pools[pl] == QKV_KV_BF16 && dts[t] != QKV_BF16)
                            continue;
                        const int32_t *lens = shortened ? lens_short : lens_all;
                        void *clean, *out;
                        float *clean_lse, *lse;
                        run_cache(ctx, &in, dts[t], pools[pl], lens, &clean, &clean_lse);
                        float *spot = &in.k[(NAN_KEY * HKV + NAN_HEAD) * D + 7];
                        const float keep = *spot;
                        *spot = NAN;
                        run_cache(ctx, &in, dts[t], pools[pl], lens, &out, &lse);
                        *spot = keep;
                        snprintf(what, sizeof what, "%s %s sq %lld %s%s", name,
                                 pl == 0 ? "kvcache" : pl == 1 ? "paged bf16" : "paged int8",
                                 (long long)sq, dtype_name(dts[t]),
                                 shortened ? ", NaN key past the length" : "");
                        check_rows(what, dts[t], out, lse, clean, clean_lse, sq, lens, reach_key,
                                   !shortened);
                        free(clean); free(clean_lse); free(out); free(lse);
                    }
            free_inputs(&in);
        }
        qkv_ctx_free(ctx);
    }
}
