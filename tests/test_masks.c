/*
 * test_masks.c — masks that users build in other ways must agree:
 * a [B,1,1,Sk] padding bias of -inf equals the packed varlen call over the
 * unpadded sequences (two independent code paths of the fast kernel), a
 * [1,1,Sq,1] row bias changes nothing but lse, and a negative scale is
 * honoured. All against the reference too. A packed variable-length call
 * gives each sequence its separate call's bits, on every kernel set.
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

/* Sequences of 3, 17, 1, 40 and 70 queries (6 to 140 rows per kv head:
   tasks below and above one tile's rows, which take different paths on
   some kernel sets) against 5 to 300 keys, causal, packed in one call and
   called one by one: out and lse bitwise equal, in fp32 and bf16 on every
   kernel set. */
void test_masks_varlen_equals_separate(void)
{
    enum { NS = 5, HQ = 4, HKV = 2, D = 64 };
    const int32_t lq[NS] = { 3, 17, 1, 40, 70 }, lk[NS] = { 5, 17, 9, 41, 300 };
    int32_t cq[NS + 1] = { 0 }, ck[NS + 1] = { 0 };
    for (int s = 0; s < NS; s++) {
        cq[s + 1] = cq[s] + lq[s];
        ck[s + 1] = ck[s] + lk[s];
    }
    const size_t nq = (size_t)cq[NS] * HQ * D, nk = (size_t)ck[NS] * HKV * D;
    for (int di = 0; di < 2; di++) {
        const qkv_dtype dt = di ? QKV_BF16 : QKV_F32;
        const size_t es = qkv_dtype_size(dt);
        rng r = rng_seed(33 + (uint64_t)di);
        char *q = xmalloc(nq * es), *k = xmalloc(nk * es), *v = xmalloc(nk * es);
        char *out = xmalloc(nq * es), *one = xmalloc(nq * es);
        float *lse = xmalloc((size_t)HQ * cq[NS] * 4), *lse1 = xmalloc((size_t)HQ * cq[NS] * 4);
        fill_random(q, dt, nq, &r);
        fill_random(k, dt, nk, &r);
        fill_random(v, dt, nk, &r);
        for (int i = 0; qkv_isa_name(i); i++) {
            const char *isa = qkv_isa_name(i);
            if (!qkv_isa_supported(isa))
                continue;
            qkv_ctx *ctx = qkv_ctx_create(2);
            CHECK(ctx && qkv_ctx_set_isa(ctx, isa) == QKV_OK, "%s: context", isa);
            if (!ctx)
                continue;
            qkv_tensor tq = qkv_tensor_4d(q, dt, 1, cq[NS], HQ, D);
            qkv_tensor tk = qkv_tensor_4d(k, dt, 1, ck[NS], HKV, D);
            qkv_tensor tv = qkv_tensor_4d(v, dt, 1, ck[NS], HKV, D);
            qkv_tensor to = qkv_tensor_4d(out, dt, 1, cq[NS], HQ, D);
            qkv_attn_opts o = qkv_attn_opts_default();
            o.causal = 1;
            o.cu_seqlens_q = cq;
            o.cu_seqlens_k = ck;
            o.n_seqs = NS;
            CHECK(qkv_attention_forward(ctx, &tq, &tk, &tv, &o, &to, lse) == QKV_OK,
                  "%s varlen: %s", isa, qkv_ctx_last_error(ctx));
            qkv_attn_opts o1 = qkv_attn_opts_default();
            o1.causal = 1;
            int differ = 0, lse_differ = 0;
            for (int s = 0; s < NS; s++) {
                qkv_tensor sq = qkv_tensor_4d(q + (size_t)cq[s] * HQ * D * es, dt, 1, lq[s], HQ, D);
                qkv_tensor sk = qkv_tensor_4d(k + (size_t)ck[s] * HKV * D * es, dt, 1, lk[s], HKV, D);
                qkv_tensor sv = qkv_tensor_4d(v + (size_t)ck[s] * HKV * D * es, dt, 1, lk[s], HKV, D);
                qkv_tensor so = qkv_tensor_4d(one, dt, 1, lq[s], HQ, D);
                CHECK(qkv_attention_forward(ctx, &sq, &sk, &sv, &o1, &so, lse1) == QKV_OK,
                      "%s sequence %d: %s", isa, s, qkv_ctx_last_error(ctx));
                differ += memcmp(one, out + (size_t)cq[s] * HQ * D * es,
                                 (size_t)lq[s] * HQ * D * es) != 0;
                for (int h = 0; h < HQ; h++)   /* lse: [HQ][total] against [1][HQ][lq] */
                    lse_differ += memcmp(lse1 + (size_t)h * lq[s], lse + (size_t)h * cq[NS] + cq[s],
                                         (size_t)lq[s] * 4) != 0;
            }
            CHECK(differ == 0 && lse_differ == 0,
                  "%s %s: %d sequences' out and %d heads' lse differ from their separate calls",
                  isa, di ? "bf16" : "f32", differ, lse_differ);
            qkv_ctx_free(ctx);
        }
        free(q); free(k); free(v); free(out); free(one); free(lse); free(lse1);
    }
}
