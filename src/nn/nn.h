/*
 * nn.h — the layers the model graphs are built from, on row-major fp32
 * activations [rows, width] with a leading dimension (ld, in elements) so
 * that a layer can read or write a column slice of a wider buffer (the
 * fused QKV projection writes q, k and v side by side; attention reads them
 * in place as [B, S, H, D] views).
 *
 * Matrix products go through BLAS (cblas_sgemm); attention through
 * qkv_attention_forward. Element-wise layers run on the context's threads.
 * Not a graph engine: the models call these in order.
 */
#ifndef QKV_NN_H
#define QKV_NN_H

#include "../core/internal.h"

/* y[M, N] (ld ldy) = x[M, K] (ld ldx) · Wᵀ + b, with W [N, K] row-major
   (PyTorch's Linear layout) and b [N] or NULL. Fixed blocks of rows and
   columns, each one single-threaded BLAS call, spread over the context's
   threads: an element's result depends on the shape alone, never on the
   thread count (OpenBLAS's threaded GEMM gives other last bits for other
   counts on some CPUs). Sets BLAS to one thread. */
void qkv__linear(qkv_ctx *ctx, const float *x, int64_t M, int64_t K, int64_t ldx,
                 const float *W, const float *b, int64_t N, float *y, int64_t ldy);

/* The same product without the bias, in blocks of 32 rows with all the
   columns: a row's result depends on its block's size alone (the llama
   runtime's, whose outputs do not change with M's other rows). Sets
   BLAS to one thread. */
void qkv__linear_rows(qkv_ctx *ctx, const float *x, int64_t M, int64_t K, int64_t ldx,
                      const float *W, int64_t N, float *y, int64_t ldy);

/* y[M, C] = (x - mean) / sqrt(var + eps) * g + b per row (biased
   variance); y may be x. Rows of ld elements. */
void qkv__layernorm(qkv_ctx *ctx, const float *x, int64_t ldx, int64_t M, int64_t C,
                    const float *g, const float *b, float eps, float *y, int64_t ldy);

/* In place on [M, C] (ld ld): x = 0.5·x·(1 + erf(x/√2)) (the exact GELU). */
void qkv__gelu(qkv_ctx *ctx, float *x, int64_t M, int64_t C, int64_t ld);
/* In place on [M, C] (ld ld): x = max(x, 0). */
void qkv__relu(qkv_ctx *ctx, float *x, int64_t M, int64_t C, int64_t ld);
/* y[M, C] += x[M, C], both with ld elements per row. */
void qkv__add(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t M, int64_t C);

/* Multi-head self-attention on views of projections already computed:
   q, k and v point at column offsets of row-major buffers with ldq / ldkv
   elements per row; token (b, s) is row b·S + s, head h its columns
   h·D .. h·D+D-1. Writes out [B·S, H·D] (ld ldo). opts as for
   qkv_attention_forward (varlen: B = 1, S = total rows). */
qkv_status qkv__mha(qkv_ctx *ctx, const float *q, int64_t ldq, const float *k,
                    const float *v, int64_t ldkv, int64_t B, int64_t S, int64_t H,
                    int64_t D, const qkv_attn_opts *opts, float *out, int64_t ldo);

/* Sets the BLAS library to one thread (for BLAS calls from several
   threads at once). */
void qkv__blas_single_thread(void);

#endif /* QKV_NN_H */
