/*
 * train_copy_model.c — training a one-layer attention model in plain C.
 *
 * Task: reverse a sequence. The input is T random tokens x_0..x_{T-1} from
 * a vocabulary of V; the model must output y_i = x_{T-1-i} at each of T
 * output positions. The uniform guess costs ln(V) nats per token.
 *
 * Model (one attention layer, no MLP, no residual):
 *   keys/values  X_j = E[x_j] + P[j]           token + position embedding
 *   queries      Q_i = R[i]·Wq                 a learned "read position" i:
 *                                              the queries see no token
 *   K = X·Wk, V = X·Wv, split into `heads` heads of d/heads dims,
 *   A = softmax(Q·Kᵀ/√dh)·V                    qkv_attention_forward (fp32)
 *   logits_i = (A_i·Wo)·U,  loss = mean cross-entropy over the T·batch outputs
 * Output i can only learn x_{T-1-i} by attending from R[i] to P[T-1-i] and
 * carrying the token through Wv: attention is both needed and sufficient.
 *
 * Backward: the linear layers and embeddings by hand (mm() below), the
 * attention by qkv_attention_backward from the forward's out and lse; Adam.
 * Everything is deterministic for a given seed.
 */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime */
#include "train_copy_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

tc_config tc_config_default(void)
{
    tc_config c = { .T = 8, .V = 10, .d = 32, .heads = 2, .batch = 32, .steps = 400,
                    .lr = 3e-3f, .seed = 1, .log_every = 0, .no_attn_grad = 0 };
    return c;
}

static uint64_t next(uint64_t *s)   /* splitmix64 */
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float unif(uint64_t *s)      /* uniform in [-1, 1) */
{
    return (float)((next(s) >> 40) * (2.0 / 16777216.0) - 1.0);
}

/* C[m×n] (+)= op(A)·op(B) with op(A) m×k, op(B) k×n, all row-major; ta: A is
   stored k×m, tb: B is stored n×k (not both). */
static void mm(int m, int n, int k, const float *A, int ta, const float *B, int tb,
               float *C, int acc)
{
    if (!acc)
        memset(C, 0, (size_t)m * n * sizeof *C);
    for (int i = 0; i < m; i++)
        for (int p = 0; p < k && !tb; p++) {
            float a = ta ? A[(size_t)p * m + i] : A[(size_t)i * k + p];
            for (int j = 0; j < n; j++)
                C[(size_t)i * n + j] += a * B[(size_t)p * n + j];
        }
    for (int i = 0; i < m && tb; i++)
        for (int j = 0; j < n; j++) {
            float s = 0;
            for (int p = 0; p < k; p++)
                s += A[(size_t)i * k + p] * B[(size_t)j * k + p];
            C[(size_t)i * n + j] += s;
        }
}

typedef struct {
    tc_config c;
    int       nb;                          /* largest batch the buffers hold */
    size_t    np;                          /* number of parameters */
    size_t    off[9];                      /* where E P R Wq Wk Wv Wo U start; np */
    float    *w, *g, *m1, *m2;             /* parameters, gradients, Adam moments */
    float    *E, *P, *R, *Wq, *Wk, *Wv, *Wo, *U;   /* views into w */
    float    *X, *Q0, *Q, *K, *Vv, *A, *Hd, *Lg, *lse;          /* activations */
    float    *dLg, *dH, *dA, *dQ, *dK, *dV, *dX, *dQ0;        /* their gradients */
    int      *x;                           /* tokens [nb][T] */
} model;

static void *grab(float **pool, size_t n) { void *p = *pool; *pool += n; return p; }

static int model_init(model *M, const tc_config *c, int nb)
{
    memset(M, 0, sizeof *M);
    M->c = *c;
    M->nb = nb;
    const size_t T = c->T, V = c->V, d = c->d, rows = (size_t)nb * T;
    const size_t len[8] = { V * d, T * d, T * d, d * d, d * d, d * d, d * d, d * V };
    for (int t = 0; t < 8; t++)
        M->off[t + 1] = M->off[t] + len[t];
    M->np = M->off[8];
    size_t na = rows * (12 * d + 2 * V) + 2 * T * d + (size_t)nb * c->heads * T;
    M->w = calloc(4 * M->np + na, sizeof(float));
    M->x = malloc(rows * sizeof(int));
    if (!M->w || !M->x)
        return 0;
    float *p = M->w;
    M->w = grab(&p, M->np); M->g = grab(&p, M->np);
    M->m1 = grab(&p, M->np); M->m2 = grab(&p, M->np);
    M->X = grab(&p, rows * d); M->Q = grab(&p, rows * d); M->K = grab(&p, rows * d);
    M->Vv = grab(&p, rows * d); M->A = grab(&p, rows * d); M->Hd = grab(&p, rows * d);
    M->Lg = grab(&p, rows * V); M->dLg = grab(&p, rows * V);
    M->dH = grab(&p, rows * d); M->dA = grab(&p, rows * d); M->dQ = grab(&p, rows * d);
    M->dK = grab(&p, rows * d); M->dV = grab(&p, rows * d); M->dX = grab(&p, rows * d);
    M->Q0 = grab(&p, T * d); M->dQ0 = grab(&p, T * d);
    M->lse = grab(&p, (size_t)nb * c->heads * T);

    uint64_t s = c->seed;   /* embeddings ~ U(-1,1), matrices ~ U(-1,1)/√fan_in */
    float **view[8] = { &M->E, &M->P, &M->R, &M->Wq, &M->Wk, &M->Wv, &M->Wo, &M->U };
    for (int t = 0; t < 8; t++)
        *view[t] = M->w + M->off[t];
    for (size_t i = 0; i < M->np; i++)
        M->w[i] = unif(&s) * (i < M->off[3] ? 1.0f : 1.0f / sqrtf((float)d));
    return 1;
}

/* Random sequences for n rows of the batch, from the state in *s. */
static void make_batch(model *M, int n, uint64_t *s)
{
    for (int i = 0; i < n * M->c.T; i++)
        M->x[i] = (int)(next(s) % (uint64_t)M->c.V);
}

/* Forward (and, when train, backward into M->g) over n sequences in M->x.
   Adds the summed loss to *loss and the correct tokens / sequences. */
static qkv_status step(qkv_ctx *ctx, model *M, int n, int train,
                       double *loss, long *right, long *seq_right)
{
    const int T = M->c.T, V = M->c.V, d = M->c.d, H = M->c.heads, rows = n * T;
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < d; j++)
            M->X[(size_t)r * d + j] = M->E[(size_t)M->x[r] * d + j] + M->P[(size_t)(r % T) * d + j];
    mm(T, d, d, M->R, 0, M->Wq, 0, M->Q0, 0);
    for (int b = 0; b < n; b++)
        memcpy(M->Q + (size_t)b * T * d, M->Q0, (size_t)T * d * sizeof(float));
    mm(rows, d, d, M->X, 0, M->Wk, 0, M->K, 0);
    mm(rows, d, d, M->X, 0, M->Wv, 0, M->Vv, 0);

    qkv_tensor q = qkv_tensor_4d(M->Q, QKV_F32, n, T, H, d / H);
    qkv_tensor k = qkv_tensor_4d(M->K, QKV_F32, n, T, H, d / H);
    qkv_tensor v = qkv_tensor_4d(M->Vv, QKV_F32, n, T, H, d / H);
    qkv_tensor o = qkv_tensor_4d(M->A, QKV_F32, n, T, H, d / H);
    qkv_attn_opts opts = qkv_attn_opts_default();
    qkv_status st = qkv_attention_forward(ctx, &q, &k, &v, &opts, &o, M->lse);
    if (st != QKV_OK)
        return st;
    mm(rows, d, d, M->A, 0, M->Wo, 0, M->Hd, 0);
    mm(rows, V, d, M->Hd, 0, M->U, 0, M->Lg, 0);

    /* softmax cross-entropy; dLg = (softmax - onehot) / rows */
    int row_ok = 1;
    for (int r = 0; r < rows; r++) {
        const float *z = M->Lg + (size_t)r * V;
        float *dz = M->dLg + (size_t)r * V;
        int y = M->x[(r / T) * T + T - 1 - r % T], best = 0;
        float mx = z[0], sum = 0;
        for (int c = 1; c < V; c++)
            if (z[c] > mx) { mx = z[c]; best = c; }
        for (int c = 0; c < V; c++)
            sum += dz[c] = expf(z[c] - mx);
        *loss += logf(sum) - (z[y] - mx);
        *right += best == y;
        row_ok = (r % T == 0 || row_ok) && best == y;
        *seq_right += r % T == T - 1 && row_ok;
        for (int c = 0; c < V; c++)
            dz[c] = (dz[c] / sum - (c == y)) / rows;
    }
    if (!train)
        return QKV_OK;

    float *gE = M->g, *gP = gE + M->off[1], *gR = gE + M->off[2], *gWq = gE + M->off[3];
    float *gWk = gE + M->off[4], *gWv = gE + M->off[5], *gWo = gE + M->off[6], *gU = gE + M->off[7];
    mm(d, V, rows, M->Hd, 1, M->dLg, 0, gU, 0);          /* dU  = Hᵀ·dLg   */
    mm(rows, d, V, M->dLg, 0, M->U, 1, M->dH, 0);        /* dH  = dLg·Uᵀ   */
    mm(d, d, rows, M->A, 1, M->dH, 0, gWo, 0);           /* dWo = Aᵀ·dH    */
    mm(rows, d, d, M->dH, 0, M->Wo, 1, M->dA, 0);        /* dA  = dH·Woᵀ   */

    if (M->c.no_attn_grad) {
        memset(M->dQ, 0, (size_t)rows * d * sizeof(float));
        memset(M->dK, 0, (size_t)rows * d * sizeof(float));
        memset(M->dV, 0, (size_t)rows * d * sizeof(float));
    } else {
        qkv_tensor dout = qkv_tensor_4d(M->dA, QKV_F32, n, T, H, d / H);
        qkv_tensor dq = qkv_tensor_4d(M->dQ, QKV_F32, n, T, H, d / H);
        qkv_tensor dk = qkv_tensor_4d(M->dK, QKV_F32, n, T, H, d / H);
        qkv_tensor dv = qkv_tensor_4d(M->dV, QKV_F32, n, T, H, d / H);
        st = qkv_attention_backward(ctx, &q, &k, &v, &o, &dout, M->lse, &opts, &dq, &dk, &dv);
        if (st != QKV_OK)
            return st;
    }
    memset(M->dQ0, 0, (size_t)T * d * sizeof(float));   /* Q was R·Wq for every b */
    for (size_t i = 0; i < (size_t)rows * d; i++)
        M->dQ0[i % ((size_t)T * d)] += M->dQ[i];
    mm(d, d, T, M->R, 1, M->dQ0, 0, gWq, 0);             /* dWq = Rᵀ·dQ0   */
    mm(T, d, d, M->dQ0, 0, M->Wq, 1, gR, 0);             /* dR  = dQ0·Wqᵀ  */
    mm(d, d, rows, M->X, 1, M->dK, 0, gWk, 0);           /* dWk = Xᵀ·dK    */
    mm(d, d, rows, M->X, 1, M->dV, 0, gWv, 0);           /* dWv = Xᵀ·dV    */
    mm(rows, d, d, M->dK, 0, M->Wk, 1, M->dX, 0);        /* dX  = dK·Wkᵀ   */
    mm(rows, d, d, M->dV, 0, M->Wv, 1, M->dX, 1);        /*     + dV·Wvᵀ   */
    memset(gE, 0, (size_t)(V + T) * d * sizeof(float));
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < d; j++) {
            gE[(size_t)M->x[r] * d + j] += M->dX[(size_t)r * d + j];
            gP[(size_t)(r % T) * d + j] += M->dX[(size_t)r * d + j];
        }
    return QKV_OK;
}

static void adam(model *M, int t)
{
    const float b1 = 0.9f, b2 = 0.999f, lr = M->c.lr;
    const float c1 = 1 - powf(b1, (float)t), c2 = 1 - powf(b2, (float)t);
    for (size_t i = 0; i < M->np; i++) {
        M->m1[i] = b1 * M->m1[i] + (1 - b1) * M->g[i];
        M->m2[i] = b2 * M->m2[i] + (1 - b2) * M->g[i] * M->g[i];
        M->w[i] -= lr * (M->m1[i] / c1) / (sqrtf(M->m2[i] / c2) + 1e-8f);
    }
}

static double seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Central differences with steps of ±0.03: the forward is fp32, and smaller
   steps drown in its rounding. */
qkv_status tc_grad_check(qkv_ctx *ctx, const tc_config *cfg, double *worst)
{
    model M;
    *worst = INFINITY;
    if (!model_init(&M, cfg, cfg->batch)) {
        free(M.w);
        free(M.x);
        return QKV_ERR_NOMEM;
    }
    uint64_t data = cfg->seed ^ 0xD1B54A32D192ED03ull;
    double loss = 0, err = 0, big = 0, rows = (double)cfg->batch * cfg->T;
    long right = 0, sr = 0;
    make_batch(&M, cfg->batch, &data);
    qkv_status st = step(ctx, &M, cfg->batch, 1, &loss, &right, &sr);
    for (size_t i = 0, t = 0; i < M.np && st == QKV_OK; i++) {
        const float w = M.w[i], wu = w + 3e-2f, wd = w - 3e-2f;
        double up = 0, down = 0;
        M.w[i] = wu;
        st = step(ctx, &M, cfg->batch, 0, &up, &right, &sr);
        M.w[i] = wd;
        if (st == QKV_OK)
            st = step(ctx, &M, cfg->batch, 0, &down, &right, &sr);
        M.w[i] = w;
        double num = (up - down) / ((double)wu - wd) / rows;
        err = fmax(err, fabs(num - M.g[i]));
        big = fmax(big, fabs(num));
        if (i + 1 == M.off[t + 1]) {   /* the last element of parameter tensor t */
            *worst = t == 0 ? err / big : fmax(*worst, err / big);
            err = big = 0;
            t++;
        }
    }
    free(M.w);
    free(M.x);
    return st;
}

qkv_status tc_train(qkv_ctx *ctx, const tc_config *cfg, tc_result *res)
{
    enum { EVAL = 1024 };
    model M;
    memset(res, 0, sizeof *res);
    if (!model_init(&M, cfg, cfg->batch > EVAL ? cfg->batch : EVAL)) {
        free(M.w);
        free(M.x);
        return QKV_ERR_NOMEM;
    }
    const int tail = cfg->steps / 10 > 0 ? cfg->steps / 10 : 1;
    uint64_t data = cfg->seed ^ 0xD1B54A32D192ED03ull;
    qkv_status st = QKV_OK;
    double t0 = seconds(), window = 0;
    for (int t = 1; t <= cfg->steps && st == QKV_OK; t++) {
        double loss = 0;
        long right = 0, sr = 0;
        make_batch(&M, cfg->batch, &data);
        st = step(ctx, &M, cfg->batch, 1, &loss, &right, &sr);
        if (st != QKV_OK)
            break;
        adam(&M, t);
        loss /= (double)cfg->batch * cfg->T;
        window += loss;
        if (t == 1)
            res->first_loss = loss;
        if (t > cfg->steps - tail)
            res->final_loss += loss / tail;
        if (cfg->log_every > 0 && t % cfg->log_every == 0) {
            printf("step %5d  loss %.5f  last batch %5.1f%% right\n", t,
                   window / cfg->log_every, 100.0 * right / ((double)cfg->batch * cfg->T));
            window = 0;
        }
    }
    res->seconds = seconds() - t0;
    if (st == QKV_OK) {   /* fresh sequences, never trained on (with probability ~1) */
        double loss = 0;
        long right = 0, sr = 0;
        make_batch(&M, EVAL, &data);
        st = step(ctx, &M, EVAL, 0, &loss, &right, &sr);
        res->eval_loss = loss / ((double)EVAL * cfg->T);
        res->token_acc = right / ((double)EVAL * cfg->T);
        res->seq_acc = sr / (double)EVAL;
    }
    free(M.w);
    free(M.x);
    return st;
}
