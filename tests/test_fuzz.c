/*
 * test_fuzz.c — random argument mutations. Each round builds a small valid
 * call, then breaks one to three things at random (a size, a stride, a
 * dtype, a NULL, an option, cu_seqlens, the bias view). Whatever comes of
 * it: an error must leave out and lse untouched and say something; success
 * must agree with the reference. Views the caller's memory could not hold
 * are skipped (the contract makes those the caller's fault). Under
 * ASan+UBSan this is where a missing check shows up as a bad read.
 */
#include "test.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { HALF = 4096 };                 /* elements each side of a view's origin */

typedef struct { unsigned char *mem; void *origin; } arena;

static void arena_make(arena *a, rng *r)
{
    a->mem = xmalloc(2 * HALF * 4);
    fill_random(a->mem, QKV_BF16, 4 * HALF, r);   /* finite in any dtype */
    a->origin = a->mem + HALF * 4;
}

/* Whether every element the view can reach lies inside the arena. */
static int fits(const qkv_tensor *t)
{
    size_t es = qkv_dtype_size(t->dtype);
    if (!es || !t->data)
        return 1;                                  /* refused before use */
    int64_t lo = 0, hi = 0;
    for (int d = 0; d < 4; d++) {
        if (t->shape[d] <= 0)
            return 1;
        if (t->shape[d] > HALF || t->stride[d] > HALF || t->stride[d] < -HALF)
            return t->shape[d] == 1;               /* stride unused at size 1 */
        int64_t span = (t->shape[d] - 1) * t->stride[d];
        if (span < 0) lo += span; else hi += span;
    }
    int64_t lim = (int64_t)(HALF * 4 / es);
    return lo >= -lim && hi < lim;
}

static const int64_t odd_sizes[] = { -1, 0, 1, 2, 3, 5, (int64_t)1 << 40, INT64_MAX };
static const int64_t odd_strides[] = { 0, 1, -1, 2, 7, -9, 64, (int64_t)1 << 40, INT64_MIN,
                                       INT64_MAX };

static void mutate(rng *r, qkv_tensor *t[5], qkv_attn_opts *o, int32_t *cu_q, int32_t *cu_k)
{
    qkv_tensor *x = t[rng_int(r, 0, 4)];
    switch (rng_int(r, 0, 9)) {
    case 0: x->shape[rng_int(r, 0, 3)] = RNG_PICK(r, odd_sizes); break;
    case 1: {
        int64_t *sz = &x->shape[rng_int(r, 0, 3)];
        if (*sz < HALF)
            *sz += rng_int(r, -1, 1);
        break;
    }
    case 2: x->stride[rng_int(r, 0, 3)] = RNG_PICK(r, odd_strides); break;
    case 3: x->dtype = (qkv_dtype)rng_int(r, -1, 3); break;
    case 4: if (rng_int(r, 0, 3) == 0) x->data = NULL; break;
    case 5: {
        static const int64_t w[] = { -3, -2, -1, 0, 1, 4, INT64_MAX };
        o->window_left = RNG_PICK(r, w);
        o->window_right = RNG_PICK(r, w);
        o->causal = (int)rng_int(r, 0, 1);
        break;
    }
    case 6: {
        static const float v[] = { 0.0f, -1.0f, 0.5f, 30.0f, NAN, INFINITY, -INFINITY };
        o->scale = RNG_PICK(r, v);
        o->softcap = RNG_PICK(r, v);
        break;
    }
    case 7:                                         /* varlen, maybe broken */
        o->n_seqs = (int32_t)rng_int(r, -1, 3);
        for (int i = 0; i < 4; i++) {
            cu_q[i] = (int32_t)rng_int(r, -1, 10);
            cu_k[i] = (int32_t)rng_int(r, -1, 10);
        }
        if (rng_int(r, 0, 1)) {                     /* sorted: likelier valid */
            for (int i = 1; i < 4; i++) {
                if (cu_q[i] < cu_q[i - 1]) cu_q[i] = cu_q[i - 1];
                if (cu_k[i] < cu_k[i - 1]) cu_k[i] = cu_k[i - 1];
            }
        }
        o->cu_seqlens_q = cu_q;
        o->cu_seqlens_k = rng_int(r, 0, 5) ? cu_k : NULL;
        break;
    case 8: o->bias = t[4]; break;
    default: x->shape[rng_int(r, 0, 3)] = 1; break;
    }
}

void test_fuzz_arguments(void)
{
    const int rounds = t_quick ? 5000 : 20000;
    rng r = rng_seed(77);
    arena mem[6];
    for (int i = 0; i < 6; i++)
        arena_make(&mem[i], &r);
    float slopes[16];
    for (int i = 0; i < 16; i++)
        slopes[i] = 0.1f * (float)(i + 1);
    qkv_ctx *ctx = qkv_ctx_create(2);
    int ok_calls = 0, refused = 0, skipped = 0;
    for (int round = 0; round < rounds; round++) {
        const int64_t B = rng_int(&r, 1, 2), Sq = rng_int(&r, 1, 9), Sk = rng_int(&r, 1, 9);
        const int64_t Hkv = rng_int(&r, 1, 3), Hq = Hkv * rng_int(&r, 1, 3);
        const int64_t D = rng_int(&r, 1, 9), Dv = rng_int(&r, 1, 9);
        const qkv_dtype dt = (qkv_dtype)rng_int(&r, 0, 2);
        qkv_tensor q = qkv_tensor_4d(mem[0].origin, dt, B, Sq, Hq, D);
        qkv_tensor k = qkv_tensor_4d(mem[1].origin, dt, B, Sk, Hkv, D);
        qkv_tensor v = qkv_tensor_4d(mem[2].origin, dt, B, Sk, Hkv, Dv);
        qkv_tensor out = qkv_tensor_4d(mem[3].origin, dt, B, Sq, Hq, Dv);
        qkv_tensor bias = qkv_tensor_4d(mem[4].origin, QKV_F32, B, Hq, Sq, Sk);
        qkv_tensor *views[5] = { &q, &k, &v, &out, &bias };
        qkv_attn_opts o = qkv_attn_opts_default();
        int32_t cu_q[4], cu_k[4];
        if (rng_int(&r, 0, 3) == 0)
            o.alibi_slopes = slopes;
        for (int n = (int)rng_int(&r, 1, 3); n > 0; n--)
            mutate(&r, views, &o, cu_q, cu_k);
        if (!fits(&q) || !fits(&k) || !fits(&v) || !fits(&out) || (o.bias && !fits(&bias)) ||
            q.shape[2] > 16) {
            skipped++;
            continue;
        }
        int64_t n_lse = 1;
        for (int d = 0; d < 3; d++)
            n_lse *= q.shape[d] > 0 ? q.shape[d] : 1;
        float *lse = xmalloc((size_t)(n_lse + 32) * sizeof *lse);
        memset(lse, 0xC5, (size_t)(n_lse + 32) * sizeof *lse);
        memset(mem[3].mem, 0xC3, 2 * HALF * 4);
        qkv_status st = qkv_attention_forward(ctx, &q, &k, &v, &o, &out, lse);
        if (st != QKV_OK) {
            refused++;
            int touched = 0;
            for (size_t i = 0; i < 2 * HALF * 4; i++)
                touched |= mem[3].mem[i] != 0xC3;
            for (size_t i = 0; i < (size_t)(n_lse + 32) * sizeof *lse; i++)
                touched |= ((unsigned char *)lse)[i] != 0xC5;
            CHECK(!touched, "round %d: status %d but out or lse was written", round, st);
            CHECK(qkv_ctx_last_error(ctx)[0] != 0, "round %d: status %d without a message",
                  round, st);
            CHECK(qkv_attention_reference(ctx, &q, &k, &v, &o, &out, NULL) == st,
                  "round %d: the reference judges these arguments differently", round);
        } else {
            ok_calls++;
            /* same call through the reference into a second buffer */
            qkv_tensor ref = out;
            ref.data = mem[5].origin;
            float *a = xmalloc((size_t)(B * Sq * Hq * Dv) * 4), *b = xmalloc((size_t)(B * Sq * Hq * Dv) * 4);
            memset(mem[5].mem, 0xC3, 2 * HALF * 4);
            CHECK(qkv_attention_reference(ctx, &q, &k, &v, &o, &ref, NULL) == QKV_OK,
                  "round %d: forward accepted what the reference refused", round);
            view_gather(&out, a);
            view_gather(&ref, b);
            size_t n = (size_t)(out.shape[0] * out.shape[1] * out.shape[2] * out.shape[3]);
            float *bf = to_f32(b, out.dtype, n);
            double tol = out.dtype == QKV_F32 ? 1e-5 : out.dtype == QKV_F16 ? 2e-3 : 2e-2;
            /* rows outside every varlen sequence hold the sentinel in both */
            compare("fuzz: forward vs reference", a, out.dtype, bf, n, tol, tol);
            free(a); free(b); free(bf);
        }
        free(lse);
    }
    t_note("%d rounds: %d accepted, %d refused, %d skipped (views outside memory)",
           rounds, ok_calls, refused, skipped);
    CHECK(ok_calls > rounds / 20 && refused > rounds / 4, "fuzz mix: %d ok, %d refused",
          ok_calls, refused);
    qkv_ctx_free(ctx);
    for (int i = 0; i < 6; i++)
        free(mem[i].mem);
}
