/*
 * test_million.c — sequence lengths up to 2^20 keys with flat memory.
 * A score matrix of that size (2^40 entries) could not exist, so these
 * pass only because the forward pass is tiled. The reference checks
 * slices chosen so that the bottom-right aligned masks map exactly:
 * query rows [i0, i0+r) of a causal window of left size wl see only keys
 * [i0-wl, i0+r), so those rows and keys form a problem of their own.
 */
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* view of rows [r0, r0+n) along dim 1 */
static qkv_tensor rows(const qkv_tensor *t, int64_t r0, int64_t n)
{
    qkv_tensor s = *t;
    s.data = (char *)t->data + (size_t)(r0 * t->stride[1]) * qkv_dtype_size(t->dtype);
    s.shape[1] = n;
    return s;
}

static void check_slice(qkv_ctx *ctx, const qkv_tensor *q, const qkv_tensor *k,
                        const qkv_tensor *v, const qkv_tensor *out, const qkv_attn_opts *o,
                        int64_t i0, int64_t r, int64_t k0, const char *what)
{
    qkv_tensor qs = rows(q, i0, r), ks = rows(k, k0, i0 + r - k0), vs = rows(v, k0, i0 + r - k0);
    size_t n = (size_t)(r * q->shape[2] * v->shape[3]);
    float *ref = xmalloc(n * sizeof *ref), *got = xmalloc(n * sizeof *got);
    qkv_tensor rt = qkv_tensor_4d(ref, QKV_F32, 1, r, q->shape[2], v->shape[3]);
    CHECK(qkv_attention_reference(ctx, &qs, &ks, &vs, o, &rt, NULL) == QKV_OK,
          "%s: reference on a slice: %s", what, qkv_ctx_last_error(ctx));
    qkv_tensor os = rows(out, i0, r);
    view_gather(&os, got);
    compare(what, got, QKV_F32, ref, n, 1e-5, 1e-5);
    free(ref);
    free(got);
}

void test_million_window(void)
{
    const int64_t S = t_quick ? (1 << 18) : (1 << 20), H = 2, D = 16;
    rng r = rng_seed(20);
    size_t n = (size_t)(S * H * D);
    float *q = xmalloc(n * 4), *k = xmalloc(n * 4), *v = xmalloc(n * 4), *o = xmalloc(n * 4);
    fill_random(q, QKV_F32, n, &r);
    fill_random(k, QKV_F32, n, &r);
    fill_random(v, QKV_F32, n, &r);
    qkv_tensor tq = qkv_tensor_4d(q, QKV_F32, 1, S, H, D), tk = qkv_tensor_4d(k, QKV_F32, 1, S, H, D);
    qkv_tensor tv = qkv_tensor_4d(v, QKV_F32, 1, S, H, D), to = qkv_tensor_4d(o, QKV_F32, 1, S, H, D);
    qkv_attn_opts opts = qkv_attn_opts_default();
    opts.causal = 1;
    opts.window_left = 40;
    qkv_ctx *ctx = qkv_ctx_create(2);
    double t0 = now_sec();
    CHECK(qkv_attention_forward(ctx, &tq, &tk, &tv, &opts, &to, NULL) == QKV_OK,
          "forward, causal window, S = %lld: %s", (long long)S, qkv_ctx_last_error(ctx));
    t_note("causal window 40 over %lld positions: %.2f s", (long long)S, now_sec() - t0);
    const int64_t starts[] = { 0, 1, 63, 1000, S / 2 + 7, S - 100 };
    for (size_t i = 0; i < sizeof starts / sizeof starts[0]; i++) {
        int64_t i0 = starts[i], k0 = i0 - 40 > 0 ? i0 - 40 : 0;
        check_slice(ctx, &tq, &tk, &tv, &to, &opts, i0, 100, k0, "million window slice");
    }
    qkv_ctx_free(ctx);
    free(q); free(k); free(v); free(o);
}

/* A few queries against 2^20 keys (bf16), with lse. */
void test_million_keys(void)
{
    const int64_t Sk = t_quick ? (1 << 18) : (1 << 20), Sq = 3, Hq = 4, Hkv = 2, D = 24;
    rng r = rng_seed(21);
    size_t nq = (size_t)(Sq * Hq * D), nk = (size_t)(Sk * Hkv * D);
    uint16_t *q = xmalloc(nq * 2), *k = xmalloc(nk * 2), *v = xmalloc(nk * 2), *o = xmalloc(nq * 2);
    fill_random(q, QKV_BF16, nq, &r);
    fill_random(k, QKV_BF16, nk, &r);
    fill_random(v, QKV_BF16, nk, &r);
    qkv_tensor tq = qkv_tensor_4d(q, QKV_BF16, 1, Sq, Hq, D), tk = qkv_tensor_4d(k, QKV_BF16, 1, Sk, Hkv, D);
    qkv_tensor tv = qkv_tensor_4d(v, QKV_BF16, 1, Sk, Hkv, D), to = qkv_tensor_4d(o, QKV_BF16, 1, Sq, Hq, D);
    float lse[3 * 4], lse_ref[3 * 4];
    float *ref = xmalloc(nq * 4);
    qkv_tensor tr = qkv_tensor_4d(ref, QKV_F32, 1, Sq, Hq, D);
    /* the reference wants one dtype: fp32 copies of the rounded inputs */
    float *qf = to_f32(q, QKV_BF16, nq), *kf = to_f32(k, QKV_BF16, nk), *vf = to_f32(v, QKV_BF16, nk);
    qkv_tensor fq = qkv_tensor_4d(qf, QKV_F32, 1, Sq, Hq, D), fk = qkv_tensor_4d(kf, QKV_F32, 1, Sk, Hkv, D);
    qkv_tensor fv = qkv_tensor_4d(vf, QKV_F32, 1, Sk, Hkv, D);
    qkv_attn_opts opts = qkv_attn_opts_default();
    opts.causal = 1;
    qkv_ctx *ctx = qkv_ctx_create(2);
    CHECK(qkv_attention_forward(ctx, &tq, &tk, &tv, &opts, &to, lse) == QKV_OK,
          "forward, 3 queries x %lld keys: %s", (long long)Sk, qkv_ctx_last_error(ctx));
    CHECK(qkv_attention_reference(ctx, &fq, &fk, &fv, &opts, &tr, lse_ref) == QKV_OK,
          "reference, 3 queries x %lld keys: %s", (long long)Sk, qkv_ctx_last_error(ctx));
    compare("million keys bf16 out", o, QKV_BF16, ref, nq, 1e-2, 1.6e-2);
    compare("million keys lse", lse, QKV_F32, lse_ref, 12, 1e-4, 0);
    qkv_ctx_free(ctx);
    free(q); free(k); free(v); free(o); free(ref); free(qf); free(kf); free(vf);
}
