/*
 * test_masks.c — masks that users build in other ways must agree:
 * a [B,1,1,Sk] padding bias of -inf equals the packed varlen call over the
 * unpadded sequences (two independent code paths of the fast kernel), a
 * [1,1,Sq,1] row bias changes nothing but lse, and a negative scale is
 * honoured. All against the reference too.
 */
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void test_masks_padding_equals_varlen(void)
{
    enum { B = 3, S = 70, HQ = 4, HKV = 2, D = 40 };
    const int32_t len[B] = { 70, 33, 1 };          /* valid keys and queries */
    rng r = rng_seed(31);
    size_t nq = (size_t)B * S * HQ * D, nk = (size_t)B * S * HKV * D;
    float *q = xmalloc(nq * 4), *k = xmalloc(nk * 4), *v = xmalloc(nk * 4);
    float *o_pad = xmalloc(nq * 4), *o_ref = xmalloc(nq * 4);
    fill_random(q, QKV_F32, nq, &r);
    fill_random(k, QKV_F32, nk, &r);
    fill_random(v, QKV_F32, nk, &r);
    float *bias = xmalloc((size_t)B * S * 4);
    for (int b = 0; b < B; b++)
        for (int j = 0; j < S; j++)
            bias[b * S + j] = j < len[b] ? 0.0f : -INFINITY;
    qkv_tensor tb = qkv_tensor_4d(bias, QKV_F32, B, 1, 1, S);
    qkv_tensor tq = qkv_tensor_4d(q, QKV_F32, B, S, HQ, D), tk = qkv_tensor_4d(k, QKV_F32, B, S, HKV, D);
    qkv_tensor tv = qkv_tensor_4d(v, QKV_F32, B, S, HKV, D);
    qkv_tensor to = qkv_tensor_4d(o_pad, QKV_F32, B, S, HQ, D), tr = qkv_tensor_4d(o_ref, QKV_F32, B, S, HQ, D);
    qkv_ctx *ctx = qkv_ctx_create(2);
    /* right padding; without causal, since bottom-right alignment over the
       padded length differs from alignment over each valid length */
    qkv_attn_opts po_opts = qkv_attn_opts_default();
    po_opts.bias = &tb;
    CHECK(qkv_attention_forward(ctx, &tq, &tk, &tv, &po_opts, &to, NULL) == QKV_OK,
          "padding bias: %s", qkv_ctx_last_error(ctx));
    CHECK(qkv_attention_reference(ctx, &tq, &tk, &tv, &po_opts, &tr, NULL) == QKV_OK,
          "padding bias, reference: %s", qkv_ctx_last_error(ctx));
    compare("padding bias vs reference", o_pad, QKV_F32, o_ref, nq, 1e-5, 1e-5);
    /* the same valid rows packed without padding, [1, total, H, D] */
    int32_t cu[B + 1];
    cu[0] = 0;
    for (int b = 0; b < B; b++)
        cu[b + 1] = cu[b] + len[b];
    const int64_t total = cu[B];
    float *pq = xmalloc((size_t)total * HQ * D * 4), *pk = xmalloc((size_t)total * HKV * D * 4);
    float *pv = xmalloc((size_t)total * HKV * D * 4), *po = xmalloc((size_t)total * HQ * D * 4);
    for (int b = 0; b < B; b++) {
        memcpy(pq + (size_t)cu[b] * HQ * D, q + (size_t)b * S * HQ * D, (size_t)len[b] * HQ * D * 4);
        memcpy(pk + (size_t)cu[b] * HKV * D, k + (size_t)b * S * HKV * D, (size_t)len[b] * HKV * D * 4);
        memcpy(pv + (size_t)cu[b] * HKV * D, v + (size_t)b * S * HKV * D, (size_t)len[b] * HKV * D * 4);
    }
    qkv_tensor vq = qkv_tensor_4d(pq, QKV_F32, 1, total, HQ, D), vk = qkv_tensor_4d(pk, QKV_F32, 1, total, HKV, D);
    qkv_tensor vv = qkv_tensor_4d(pv, QKV_F32, 1, total, HKV, D), vo = qkv_tensor_4d(po, QKV_F32, 1, total, HQ, D);
    qkv_attn_opts o = qkv_attn_opts_default();
    o.cu_seqlens_q = cu;
    o.cu_seqlens_k = cu;
    o.n_seqs = B;
    CHECK(qkv_attention_forward(ctx, &vq, &vk, &vv, &o, &vo, NULL) == QKV_OK,
          "varlen: %s", qkv_ctx_last_error(ctx));
    double worst = 0;
    for (int b = 0; b < B; b++)
        for (int64_t x = 0; x < (int64_t)len[b] * HQ * D; x++) {
            double e = fabs((double)po[(size_t)cu[b] * HQ * D + x] - o_pad[(size_t)b * S * HQ * D + x]);
            worst = e > worst ? e : worst;
        }
    CHECK(worst <= 1e-6, "padding mask and varlen disagree by %.3g", worst);
    qkv_ctx_free(ctx);
    free(q); free(k); free(v); free(o_pad); free(o_ref); free(bias);
    free(pq); free(pk); free(pv); free(po);
}

void test_masks_row_bias_and_negative_scale(void)
{
    enum { S = 37, H = 3, D = 19 };
    rng r = rng_seed(32);
    size_t n = (size_t)S * H * D;
    float *q = xmalloc(n * 4), *k = xmalloc(n * 4), *v = xmalloc(n * 4);
    float *o1 = xmalloc(n * 4), *o2 = xmalloc(n * 4), *ref = xmalloc(n * 4);
    float lse1[H * S], lse2[H * S], rowb[S];
    fill_random(q, QKV_F32, n, &r);
    fill_random(k, QKV_F32, n, &r);
    fill_random(v, QKV_F32, n, &r);
    for (int i = 0; i < S; i++)
        rowb[i] = (float)i * 0.25f - 3.0f;
    qkv_tensor tq = qkv_tensor_4d(q, QKV_F32, 1, S, H, D), tk = qkv_tensor_4d(k, QKV_F32, 1, S, H, D);
    qkv_tensor tv = qkv_tensor_4d(v, QKV_F32, 1, S, H, D);
    qkv_tensor t1 = qkv_tensor_4d(o1, QKV_F32, 1, S, H, D), t2 = qkv_tensor_4d(o2, QKV_F32, 1, S, H, D);
    qkv_tensor tr = qkv_tensor_4d(ref, QKV_F32, 1, S, H, D);
    qkv_tensor tb = qkv_tensor_4d(rowb, QKV_F32, 1, 1, S, 1);
    qkv_ctx *ctx = qkv_ctx_create(2);
    qkv_attn_opts o = qkv_attn_opts_default();
    o.causal = 1;
    CHECK(qkv_attention_forward(ctx, &tq, &tk, &tv, &o, &t1, lse1) == QKV_OK, "plain");
    o.bias = &tb;                 /* constant along each row: shifts lse only */
    CHECK(qkv_attention_forward(ctx, &tq, &tk, &tv, &o, &t2, lse2) == QKV_OK,
          "row bias [1,1,S,1]: %s", qkv_ctx_last_error(ctx));
    compare("row bias leaves out unchanged", o2, QKV_F32, o1, n, 1e-6, 1e-5);
    float shifted[H * S];
    for (int h = 0; h < H; h++)
        for (int i = 0; i < S; i++)
            shifted[h * S + i] = lse1[h * S + i] + rowb[i];
    compare("row bias shifts lse", lse2, QKV_F32, shifted, (size_t)H * S, 1e-5, 1e-6);
    o.bias = NULL;
    o.scale = -0.3f;
    CHECK(qkv_attention_forward(ctx, &tq, &tk, &tv, &o, &t1, NULL) == QKV_OK, "negative scale");
    CHECK(qkv_attention_reference(ctx, &tq, &tk, &tv, &o, &tr, NULL) == QKV_OK, "negative scale, reference");
    compare("negative scale", o1, QKV_F32, ref, n, 1e-5, 1e-5);
    qkv_ctx_free(ctx);
    free(q); free(k); free(v); free(o1); free(o2); free(ref);
}
