/*
 * reference.c — the specification of attention: plain loops over the
 * definition in qkv.h, every product and sum in double, every mask decided
 * element by element. It shares only argument validation with the fast
 * path, so the tests compare two independent computations. Memory is O(Sk)
 * per thread; rows are spread over the context's threads.
 *
 * Not here: tiling, vector code, anything clever.
 */
#include "attn.h"
#include "ref.h"

#include <math.h>
#include <stdlib.h>

#define ROWS_PER_TASK 16

typedef struct {
    qkv_ctx       *ctx;
    const qkv__attn *a;
    qkv__tasks     tasks;
} ref_job;

/* One query row i (within sequence s) of head h. */
static void ref_row(const qkv__attn *a, const qkv__seq *s, int64_t h, int64_t i,
                    double *score, double *acc)
{
    const int64_t hk = h / a->group, qi = s->q0 + i;
    double m = -INFINITY;
    int nan = 0;
    for (int64_t j = 0; j < s->sk; j++) {
        double x = -INFINITY;
        if (visible(a, i, j, s)) {
            double dot = 0.0;
            for (int64_t d = 0; d < a->D; d++)
                dot += at(a->q, s->b, qi, h, d) * at(a->k, s->b, s->k0 + j, hk, d);
            x = score_mods(a, s, h, i, j, (double)a->scale * dot, NULL);
        }
        score[j] = x;
        if (x > m)
            m = x;
        nan |= x != x;
    }
    for (int64_t c = 0; c < a->Dv; c++)
        acc[c] = 0.0;
    double l = 0.0;
    if (m > -INFINITY) {
        const uint32_t row = a->dropout ? qkv__drop_row(a, s, h, i) : 0;
        for (int64_t j = 0; j < s->sk; j++) {
            if (score[j] == -INFINITY)
                continue;
            double p = exp(score[j] - m);
            l += p;   /* the softmax's sum: dropout comes after it */
            if (a->dropout)
                p *= qkv__drop_factor(a, row, qkv__drop_col(a, j));
            for (int64_t c = 0; c < a->Dv; c++)
                acc[c] += p * at(a->v, s->b, s->k0 + j, hk, c);
        }
    }
    if (nan)   /* a NaN score among the keys the row sees: a NaN row */
        l = NAN;
    for (int64_t c = 0; c < a->Dv; c++)
        put(a->out, s->b, qi, h, c, !(l <= 0.0) ? acc[c] / l : 0.0);
    if (a->lse)
        a->lse[qkv__lse_index(a, s->b, h, qi)] = !(l <= 0.0) ? (float)(m + log(l)) : -INFINITY;
}

static void ref_task(void *arg, int64_t task, int worker)
{
    ref_job *job = arg;
    const qkv__attn *a = job->a;
    int64_t t;
    qkv__seq s = qkv__attn_seq(a, qkv__tasks_find(&job->tasks, task, &t));
    int64_t blocks = (s.sq + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    int64_t h = t / blocks, i0 = (t % blocks) * ROWS_PER_TASK;
    int64_t i1 = i0 + ROWS_PER_TASK < s.sq ? i0 + ROWS_PER_TASK : s.sq;
    double *score = job->ctx->scratch[worker];
    double *acc = score + a->Sk;
    for (int64_t i = i0; i < i1; i++)
        ref_row(a, &s, h, i, score, acc);
}

qkv_status qkv_attention_reference(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_attn_opts *opts,
        qkv_tensor *out, float *lse)
{
    qkv__attn a;
    qkv_status st = qkv__attn_check(ctx, q, k, v, opts, out, lse, &a);
    if (st)
        return st;
    if ((uint64_t)(a.Sk + a.Dv) > SIZE_MAX / sizeof(double))
        return qkv__fail(ctx, QKV_ERR_OVERFLOW, "k->shape[1]: seqlen_k too large");
    if ((st = qkv__scratch_reserve(ctx, (size_t)(a.Sk + a.Dv) * sizeof(double))))
        return st;
    ref_job job = { ctx, &a, { NULL, 0, 0 } };
    if ((st = qkv__tasks_make(ctx, &a, a.Hq, ROWS_PER_TASK, &job.tasks)))
        return st;
    qkv__parallel(ctx, job.tasks.total, 0.0, ref_task, &job);
    qkv__tasks_free(&job.tasks);
    return QKV_OK;
}
