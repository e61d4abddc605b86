/*
 * hello.c — the smallest complete qkv program: causal attention over a
 * random batch, checked against the double-precision reference.
 *
 *   cc hello.c $(pkg-config --cflags --libs qkv) -lm -o hello && ./hello
 */
#include <qkv.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

int main(void)
{
    enum { B = 2, S = 100, HQ = 8, HKV = 2, D = 64 };
    size_t nq = (size_t)B * S * HQ * D, nk = (size_t)B * S * HKV * D;
    float *q = malloc(nq * sizeof *q), *k = malloc(nk * sizeof *k);
    float *v = malloc(nk * sizeof *v), *out = malloc(nq * sizeof *out);
    float *ref = malloc(nq * sizeof *ref);
    srand(1);
    for (size_t i = 0; i < nq; i++) q[i] = rand() / (float)RAND_MAX - 0.5f;
    for (size_t i = 0; i < nk; i++) k[i] = rand() / (float)RAND_MAX - 0.5f;
    for (size_t i = 0; i < nk; i++) v[i] = rand() / (float)RAND_MAX - 0.5f;

    qkv_ctx *ctx = qkv_ctx_create(0);
    qkv_tensor tq = qkv_tensor_4d(q, QKV_F32, B, S, HQ, D);
    qkv_tensor tk = qkv_tensor_4d(k, QKV_F32, B, S, HKV, D);
    qkv_tensor tv = qkv_tensor_4d(v, QKV_F32, B, S, HKV, D);
    qkv_tensor to = qkv_tensor_4d(out, QKV_F32, B, S, HQ, D);
    qkv_tensor tr = qkv_tensor_4d(ref, QKV_F32, B, S, HQ, D);
    qkv_attn_opts opts = qkv_attn_opts_default();
    opts.causal = 1;

    qkv_status st = qkv_attention_forward(ctx, &tq, &tk, &tv, &opts, &to, NULL);
    if (st == QKV_OK)
        st = qkv_attention_reference(ctx, &tq, &tk, &tv, &opts, &tr, NULL);
    if (st != QKV_OK) {
        fprintf(stderr, "qkv: %s: %s\n", qkv_status_string(st), qkv_ctx_last_error(ctx));
        return 1;
    }
    double err = 0;
    for (size_t i = 0; i < nq; i++)
        err = fmax(err, fabs((double)out[i] - ref[i]));
    printf("qkv %s (%s kernels, %d threads): causal GQA attention, max |err| %.2e\n",
           qkv_version(), qkv_ctx_isa(ctx), qkv_ctx_threads(ctx), err);
    qkv_ctx_free(ctx);
    free(q); free(k); free(v); free(out); free(ref);
    return err < 1e-5 ? 0 : 1;
}
