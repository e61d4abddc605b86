/*
 * nn.c — linear (BLAS), LayerNorm, GELU, ReLU, residual add and the
 * multi-head attention that views fused projections in place. See nn.h.
 */
#include "nn.h"
#include "../cpu/kernels_nn.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

/* OpenBLAS's own call for its thread count; absent from other BLAS
   libraries' cblas.h, so declared here and resolved at link time. */
void openblas_set_num_threads(int num_threads);

void qkv__blas_threads(qkv_ctx *ctx)
{
    openblas_set_num_threads(ctx ? ctx->n_threads : 1);
}

void qkv__blas_single_thread(void)
{
    openblas_set_num_threads(1);
}

void qkv__linear(qkv_ctx *ctx, const float *x, int64_t M, int64_t K, int64_t ldx,
                 const float *W, const float *b, int64_t N, float *y, int64_t ldy)
{
    if (M <= 0 || N <= 0)
        return;
    if (b)
        for (int64_t i = 0; i < M; i++)
            memcpy(y + i * ldy, b, (size_t)N * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)K, 1.0f,
                x, (int)ldx, W, (int)K, b ? 1.0f : 0.0f, y, (int)ldy);
}

typedef struct {
    const float *x, *W;
    float       *y;
    int64_t      M, K, ldx, N, ldy;
} linear_job;

enum { LINEAR_ROWS = 32 };   /* rows per block of qkv__linear_rows */

static void linear_task(void *arg, int64_t task, int worker)
{
    const linear_job *j = arg;
    const int64_t r0 = task * LINEAR_ROWS;
    const int64_t m = j->M - r0 < LINEAR_ROWS ? j->M - r0 : LINEAR_ROWS;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)j->N, (int)j->K, 1.0f,
                j->x + r0 * j->ldx, (int)j->ldx, j->W, (int)j->K, 0.0f, j->y + r0 * j->ldy,
                (int)j->ldy);
}

void qkv__linear_rows(qkv_ctx *ctx, const float *x, int64_t M, int64_t K, int64_t ldx,
                      const float *W, int64_t N, float *y, int64_t ldy)
{
    if (M <= 0 || N <= 0)
        return;
    qkv__blas_single_thread();
    linear_job j = { x, W, y, M, K, ldx, N, ldy };
    qkv__parallel(ctx, (M + LINEAR_ROWS - 1) / LINEAR_ROWS, 2.0 * (double)M * (double)N * (double)K,
                  linear_task, &j);
}

/* Element-wise jobs split into row blocks over the context's threads. */
typedef struct {
    const float *x;
    float       *y;
    int64_t      ldx, ldy, M, C, rows;
    const float *g, *b;
    float        eps;
    int          relu;    /* activation_task: ReLU, else GELU */
    qkv__nn_kernels k;
} rows_job;

enum { ROWS_PER_TASK = 16 };

static void layernorm_task(void *arg, int64_t task, int worker)
{
    const rows_job *j = arg;
    int64_t r1 = (task + 1) * j->rows < j->M ? (task + 1) * j->rows : j->M;
    for (int64_t r = task * j->rows; r < r1; r++) {
        const float *x = j->x + r * j->ldx;
        float *y = j->y + r * j->ldy;
        double s = 0.0, ss = 0.0;
        for (int64_t c = 0; c < j->C; c++)
            s += x[c];
        double mean = s / (double)j->C;
        for (int64_t c = 0; c < j->C; c++) {
            double d = x[c] - mean;
            ss += d * d;
        }
        float inv = (float)(1.0 / sqrt(ss / (double)j->C + j->eps));
        float m = (float)mean;
        for (int64_t c = 0; c < j->C; c++)
            y[c] = (x[c] - m) * inv * j->g[c] + j->b[c];
    }
}

/* GELU or ReLU in place, on rows of the job's block */
static void activation_task(void *arg, int64_t task, int worker)
{
    const rows_job *j = arg;
    int64_t r1 = (task + 1) * j->rows < j->M ? (task + 1) * j->rows : j->M;
    for (int64_t r = task * j->rows; r < r1; r++) {
        float *y = j->y + r * j->ldy;
        if (j->relu)
            for (int64_t c = 0; c < j->C; c++)
                y[c] = y[c] > 0.0f ? y[c] : 0.0f;
        else
            j->k.gelu(y, j->C);
    }
}

static void run_rows(qkv_ctx *ctx, rows_job *j, qkv__task_fn fn, double cost_per_elem)
{
    j->rows = ROWS_PER_TASK;
    int64_t tasks = (j->M + j->rows - 1) / j->rows;
    qkv__parallel(ctx, tasks, cost_per_elem * (double)j->M * (double)j->C, fn, j);
}

void qkv__layernorm(qkv_ctx *ctx, const float *x, int64_t ldx, int64_t M, int64_t C,
                    const float *g, const float *b, float eps, float *y, int64_t ldy)
{
    rows_job j = { .x = x, .y = y, .ldx = ldx, .ldy = ldy, .M = M, .C = C,
                   .g = g, .b = b, .eps = eps };
    run_rows(ctx, &j, layernorm_task, 8.0);
}

void qkv__gelu(qkv_ctx *ctx, float *x, int64_t M, int64_t C, int64_t ld)
{
    rows_job j = { .y = x, .ldy = ld, .M = M, .C = C };
    qkv__nn_kernels_for(qkv_ctx_isa(ctx), &j.k);
    run_rows(ctx, &j, activation_task, 20.0);
}

void qkv__relu(qkv_ctx *ctx, float *x, int64_t M, int64_t C, int64_t ld)
{
    rows_job j = { .y = x, .ldy = ld, .M = M, .C = C, .relu = 1 };
    run_rows(ctx, &j, activation_task, 1.0);
}

void qkv__add(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t M, int64_t C)
{
    for (int64_t r = 0; r < M; r++)
        for (int64_t c = 0; c < C; c++)
            y[r * ldy + c] += x[r * ldx + c];
}

qkv_status qkv__mha(qkv_ctx *ctx, const float *q, int64_t ldq, const float *k,
                    const float *v, int64_t ldkv, int64_t B, int64_t S, int64_t H,
                    int64_t D, const qkv_attn_opts *opts, float *out, int64_t ldo)
{
    qkv_tensor tq = { (void *)q, QKV_F32, { B, S, H, D }, { S * ldq, ldq, D, 1 } };
    qkv_tensor tk = { (void *)k, QKV_F32, { B, S, H, D }, { S * ldkv, ldkv, D, 1 } };
    qkv_tensor tv = { (void *)v, QKV_F32, { B, S, H, D }, { S * ldkv, ldkv, D, 1 } };
    qkv_tensor to = { out, QKV_F32, { B, S, H, D }, { S * ldo, ldo, D, 1 } };
    return qkv_attention_forward(ctx, &tq, &tk, &tv, opts, &to, NULL);
}
