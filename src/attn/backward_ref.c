/*
 * backward_ref.c — the specification of the backward: the gradients of the
 * attention defined in qkv.h, in plain loops with every product and sum in
 * double, every mask decided element by element, as reference.c does for
 * the forward. Per query row i of head h (kv head h / group), for each
 * visible key j:
 *
 *   x_j  = scale·q_i·k_j;  with softcap: t_j = tanh(x_j / cap), x_j = cap·t_j
 *   x_j -= slope_h·|i + Sk - Sq - j|;  x_j += bias        (constants)
 *   P_j  = exp(x_j - lse_i)               (the lse passed in)
 *   dP_j = dout_i·v_j·Z_j, Dd_i = dout_i·out_i   (the out passed in; Z_j
 *                                         dropout's factor, 1 without)
 *   dS_j = P_j·(dP_j - Dd_i),  times (1 - t_j²) with softcap
 *   dq_i += scale·dS_j·k_j,  dk_j += scale·dS_j·q_i,  dv_j += P_j·Z_j·dout_i
 *
 * A row whose lse is -inf contributes nothing (and gets dq 0). The bias's
 * gradient, when asked for, is dS_j without the softcap factor, summed over
 * the dimensions the bias broadcasts.
 *
 * Two passes, each task owning its outputs (so results do not depend on
 * the thread count): tasks over (sequence, query head, block of rows) write
 * dq; tasks over (sequence, kv head, block of keys) sum dk and dv over
 * every query row of the kv head's group. Memory is O(D + Dv) doubles per
 * thread and a key block's accumulators.
 */
#include "attn.h"
#include "ref.h"

#include <math.h>
#include <stdlib.h>

#define ROWS_PER_TASK 16   /* query rows of a dq task */
#define KEYS_PER_TASK 16   /* key rows of a dk/dv task */

typedef struct {
    qkv_ctx          *ctx;
    const qkv__attn  *a;
    const qkv__grads *g;
    qkv__tasks        rows, keys;
} bref_job;


/* What a query row brings to the gradients: its q row, its dout row,
   Dd = dout·out and lse. Returns 0 when the row contributes nothing. */
typedef struct { double *q, *dout, delta, lse; } qrow;

static int load_row(const qkv__attn *a, const qkv__grads *g, const qkv__seq *s,
                    int64_t h, int64_t i, qrow *r)
{
    const int64_t qi = s->q0 + i;
    r->lse = g->lse[qkv__lse_index(a, s->b, h, qi)];
    if (r->lse == -INFINITY)
        return 0;
    for (int64_t d = 0; d < a->D; d++)
        r->q[d] = at(a->q, s->b, qi, h, d);
    r->delta = 0.0;
    for (int64_t c = 0; c < a->Dv; c++) {
        r->dout[c] = at(g->dout, s->b, qi, h, c);
        r->delta += r->dout[c] * at(a->out, s->b, qi, h, c);
    }
    return 1;
}

/* For visible key j of row i (head h): P_j in *p, the P_j·Z_j that
   weighs V in *pz (dropout's factor Z_j, 1 without dropout), and dS_j,
   with the softcap derivative, as the return value; *raw (when not NULL)
   receives dS_j without it, the gradient of the bias. *p = *pz = 0 (and 0
   returned) for a -inf score. With dropout dP_j is dout_i·v_j·Z_j. */
static double grad_score(const qkv__attn *a, const qkv__seq *s, int64_t h, int64_t i,
                         int64_t j, const qrow *r, double *p, double *pz, double *raw)
{
    const int64_t hk = h / a->group, kj = s->k0 + j;
    double dot = 0.0;
    for (int64_t d = 0; d < a->D; d++)
        dot += r->q[d] * at(a->k, s->b, kj, hk, d);
    double dcap;
    const double x = score_mods(a, s, h, i, j, (double)a->scale * dot, &dcap);
    *p = *pz = 0.0;
    if (raw)
        *raw = 0.0;
    if (x == -INFINITY)
        return 0.0;
    *p = exp(x - r->lse);
    double dp = 0.0;
    for (int64_t c = 0; c < a->Dv; c++)
        dp += r->dout[c] * at(a->v, s->b, kj, hk, c);
    const double z = a->dropout ? qkv__drop_factor(a, qkv__drop_row(a, s, h, i),
                                                   qkv__drop_col(a, j))
                                : 1.0;
    dp *= z;
    *pz = *p * z;
    if (raw)
        *raw = *p * (dp - r->delta);
    return *p * (dp - r->delta) * dcap;
}

/* dq of a block of query rows of one head. */
static void dq_task(void *arg, int64_t task, int worker)
{
    bref_job *job = arg;
    const qkv__attn *a = job->a;
    const qkv__grads *g = job->g;
    int64_t t;
    qkv__seq s = qkv__attn_seq(a, qkv__tasks_find(&job->rows, task, &t));
    int64_t blocks = (s.sq + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    int64_t h = t / blocks, i0 = (t % blocks) * ROWS_PER_TASK;
    int64_t i1 = i0 + ROWS_PER_TASK < s.sq ? i0 + ROWS_PER_TASK : s.sq;
    const int64_t hk = h / a->group;
    double *acc = job->ctx->scratch[worker];
    qrow r = { acc + a->D, acc + 2 * a->D, 0.0, 0.0 };
    for (int64_t i = i0; i < i1; i++) {
        for (int64_t d = 0; d < a->D; d++)
            acc[d] = 0.0;
        if (load_row(a, g, &s, h, i, &r))
            for (int64_t j = 0; j < s.sk; j++) {
                double p, pz;
                if (!visible(a, i, j, &s))
                    continue;
                double ds = grad_score(a, &s, h, i, j, &r, &p, &pz, NULL);
                if (p == 0.0)
                    continue;
                for (int64_t d = 0; d < a->D; d++)
                    acc[d] += ds * at(a->k, s.b, s.k0 + j, hk, d);
            }
        for (int64_t d = 0; d < a->D; d++)
            put(g->dq, s.b, s.q0 + i, h, d, (double)a->scale * acc[d] + 0.0);   /* +0, not -0 */
    }
}

/* dk and dv of a block of keys of one kv head: every query row of every
   query head of the group, in order. */
static void dkv_task(void *arg, int64_t task, int worker)
{
    bref_job *job = arg;
    const qkv__attn *a = job->a;
    const qkv__grads *g = job->g;
    int64_t t;
    qkv__seq s = qkv__attn_seq(a, qkv__tasks_find(&job->keys, task, &t));
    int64_t blocks = (s.sk + KEYS_PER_TASK - 1) / KEYS_PER_TASK;
    int64_t hk = t / blocks, j0 = (t % blocks) * KEYS_PER_TASK;
    int64_t j1 = j0 + KEYS_PER_TASK < s.sk ? j0 + KEYS_PER_TASK : s.sk;
    const int64_t D = a->D, Dv = a->Dv, nk = j1 - j0;
    double *dk = job->ctx->scratch[worker];        /* [nk][D] */
    double *dv = dk + KEYS_PER_TASK * D;           /* [nk][Dv] */
    qrow r = { dv + KEYS_PER_TASK * Dv, dv + KEYS_PER_TASK * Dv + D, 0.0, 0.0 };
    for (int64_t e = 0; e < nk * D; e++)
        dk[e] = 0.0;
    for (int64_t e = 0; e < nk * Dv; e++)
        dv[e] = 0.0;
    for (int64_t h = hk * a->group; h < (hk + 1) * a->group; h++)
        for (int64_t i = 0; i < s.sq; i++) {
            if (!load_row(a, g, &s, h, i, &r))
                continue;
            for (int64_t j = j0; j < j1; j++) {
                double p, pz;
                if (!visible(a, i, j, &s))
                    continue;
                double ds = grad_score(a, &s, h, i, j, &r, &p, &pz, NULL);
                if (p == 0.0)
                    continue;
                for (int64_t d = 0; d < D; d++)
                    dk[(j - j0) * D + d] += ds * r.q[d];
                for (int64_t c = 0; c < Dv; c++)
                    dv[(j - j0) * Dv + c] += pz * r.dout[c];
            }
        }
    for (int64_t j = j0; j < j1; j++) {
        for (int64_t d = 0; d < D; d++)
            put(g->dk, s.b, s.k0 + j, hk, d, (double)a->scale * dk[(j - j0) * D + d] + 0.0);
        for (int64_t c = 0; c < Dv; c++)
            put(g->dv, s.b, s.k0 + j, hk, c, dv[(j - j0) * Dv + c]);
    }
}

/* A row of dbias: task = (b', h', i') over the bias's own shape; sums the
   bias gradient dS (without the softcap derivative) of every (b, h, i, j)
   that reads bias element [b', h', i', j'] (a dim of size 1 broadcasts),
   in order of b, h, i, j. */
static void dbias_task(void *arg, int64_t task, int worker)
{
    bref_job *job = arg;
    const qkv__attn *a = job->a;
    const qkv__grads *g = job->g;
    const qkv_tensor *db = g->dbias;
    const int64_t nb = db->shape[0], nh = db->shape[1], ni = db->shape[2], nj = db->shape[3];
    const int64_t bb = task / (nh * ni), hb = task / ni % nh, ib = task % ni;
    double *acc = job->ctx->scratch[worker];          /* [nj] */
    qrow r = { acc + nj, acc + nj + a->D, 0.0, 0.0 };
    for (int64_t j = 0; j < nj; j++)
        acc[j] = 0.0;
    for (int64_t b = nb == 1 ? 0 : bb; b < (nb == 1 ? a->B : bb + 1); b++) {
        const qkv__seq s = qkv__attn_seq(a, b);
        for (int64_t h = nh == 1 ? 0 : hb; h < (nh == 1 ? a->Hq : hb + 1); h++)
            for (int64_t i = ni == 1 ? 0 : ib; i < (ni == 1 ? s.sq : ib + 1); i++) {
                if (!load_row(a, g, &s, h, i, &r))
                    continue;
                for (int64_t j = 0; j < s.sk; j++) {
                    double p, pz, raw;
                    if (!visible(a, i, j, &s))
                        continue;
                    grad_score(a, &s, h, i, j, &r, &p, &pz, &raw);
                    acc[nj == 1 ? 0 : j] += raw;
                }
            }
    }
    float *d = db->data;
    for (int64_t j = 0; j < nj; j++)
        d[bb * db->stride[0] + hb * db->stride[1] + ib * db->stride[2] + j * db->stride[3]] =
            (float)acc[j] + 0.0f;
}

static qkv_status backward_reference(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv, int with_dbias, qkv_tensor *dbias)
{
    qkv__attn a;
    qkv__grads g;
    qkv_status st = qkv__attn_check_backward(ctx, q, k, v, out, dout, lse, opts,
                                             dq, dk, dv, &a, &g);
    if (st || (with_dbias && (st = qkv__attn_check_dbias(ctx, &a, &g, opts, dbias))))
        return st;
    /* per thread: a dk/dv task's accumulators and one query row (D + Dv),
       which also covers a dq task's 2·D + Dv */
    uint64_t per = (uint64_t)(KEYS_PER_TASK + 1) * (uint64_t)(a.D + a.Dv);
    if (g.dbias)   /* a dbias row's accumulators and one query row */
        per = per > (uint64_t)(a.Sk + a.D + a.Dv) ? per : (uint64_t)(a.Sk + a.D + a.Dv);
    if (per > SIZE_MAX / sizeof(double))
        return qkv__fail(ctx, QKV_ERR_OVERFLOW, "q->shape[3]: head_dim too large");
    if ((st = qkv__scratch_reserve(ctx, (size_t)per * sizeof(double))))
        return st;
    bref_job job = { ctx, &a, &g, { NULL, 0, 0 }, { NULL, 0, 0 } };
    if ((st = qkv__tasks_make(ctx, &a, a.Hq, ROWS_PER_TASK, &job.rows)))
        return st;
    if ((st = qkv__tasks_make_keys(ctx, &a, a.Hkv, KEYS_PER_TASK, &job.keys))) {
        qkv__tasks_free(&job.rows);
        return st;
    }
    qkv__parallel(ctx, job.rows.total, 0.0, dq_task, &job);
    qkv__parallel(ctx, job.keys.total, 0.0, dkv_task, &job);
    if (g.dbias)
        qkv__parallel(ctx, dbias->shape[0] * dbias->shape[1] * dbias->shape[2], 0.0,
                      dbias_task, &job);
    qkv__tasks_free(&job.rows);
    qkv__tasks_free(&job.keys);
    return QKV_OK;
}

qkv_status qkv_attention_backward_reference(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv)
{
    return backward_reference(ctx, q, k, v, out, dout, lse, opts, dq, dk, dv, 0, NULL);
}

qkv_status qkv_attention_backward_dbias_reference(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv, qkv_tensor *dbias)
{
    return backward_reference(ctx, q, k, v, out, dout, lse, opts, dq, dk, dv, 1, dbias);
}
