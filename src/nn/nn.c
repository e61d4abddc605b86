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

void qkv__blas_single_thread(void)
{
    openblas_set_num_threads(1);
}

/* A product in fixed blocks of rows and columns spread over the
   context's threads, each block one single-threaded BLAS call: what an
   element comes to depends on the shapes alone, never on the thread
   count (OpenBLAS's own threads give other last bits for other counts).
   beta 1: y holds the bias already. */
typedef struct {
    const float *x, *W;
    float       *y;
    int64_t      M, K, ldx, N, ldy, rows, cols, col_blocks;
    float        beta;
} linear_job;

static void linear_task(void *arg, int64_t task, int worker)
{
    (void)worker;
    const linear_job *j = arg;
    const int64_t r0 = task / j->col_blocks * j->rows, c0 = task % j->col_blocks * j->cols;
    const int64_t m = j->M - r0 < j->rows ? j->M - r0 : j->rows;
    const int64_t n = j->N - c0 < j->cols ? j->N - c0 : j->cols;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)n, (int)j->K, 1.0f,
                j->x + r0 * j->ldx, (int)j->ldx, j->W + c0 * j->K, (int)j->K, j->beta,
                j->y + r0 * j->ldy + c0, (int)j->ldy);
}

static void linear_blocks(qkv_ctx *ctx, linear_job *j)
{
    qkv__blas_single_thread();
    const int64_t row_blocks = (j->M + j->rows - 1) / j->rows;
    j->col_blocks = (j->N + j->cols - 1) / j->cols;
    qkv__parallel(ctx, row_blocks * j->col_blocks,
                  2.0 * (double)j->M * (double)j->N * (double)j->K, linear_task, j);
}

/* The blocks of qkv__linear: rows in blocks of LINEAR_ROWS with all the
   columns, or, where that makes fewer than LINEAR_TASKS blocks, the
   columns split evenly (in multiples of 16) to make that many. A
   function of the shape alone. MiniLM embeddings on 2 threads with
   OpenBLAS's Zen kernels took as long as with OpenBLAS's own threads
   (within noise); blocks of 32 rows by 256 columns took 1.5-2x. */
enum { LINEAR_ROWS = 64, LINEAR_TASKS = 4 };

void qkv__linear(qkv_ctx *ctx, const float *x, int64_t M, int64_t K, int64_t ldx,
                 const float *W, const float *b, int64_t N, float *y, int64_t ldy)
{
    if (M <= 0 || N <= 0)
        return;
    if (b)
        for (int64_t i = 0; i < M; i++)
            memcpy(y + i * ldy, b, (size_t)N * sizeof(float));
    linear_job j = { x, W, y, M, K, ldx, N, ldy, LINEAR_ROWS, N, 0, b ? 1.0f : 0.0f };
    const int64_t row_blocks = (M + LINEAR_ROWS - 1) / LINEAR_ROWS;
    if (row_blocks < LINEAR_TASKS) {
        const int64_t split = (LINEAR_TASKS + row_blocks - 1) / row_blocks;
        j.cols = ((N + split - 1) / split + 15) / 16 * 16;
    }
    linear_blocks(ctx, &j);
}

/* Rows in blocks of 32, all columns at once (the llama runtime's). */
enum { LINEAR_ROWS_ONLY = 32 };

void qkv__linear_rows(qkv_ctx *ctx, const float *x, int64_t M, int64_t K, int64_t ldx,
                      const float *W, int64_t N, float *y, int64_t ldy)
{
    if (M <= 0 || N <= 0)
        return;
    linear_job j = { x, W, y, M, K, ldx, N, ldy, LINEAR_ROWS_ONLY, N, 0, 0.0f };
    linear_blocks(ctx, &j);
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
