/*
 * gen.c — qkv_gen: batched generation with a Llama-family model over one
 * paged KV pool (continuous batching). Sequences come and go; each owns a
 * row of block ids into the pool, one block per block_size positions,
 * shared by every layer's cache; removing a sequence returns its blocks.
 *
 * A step runs every sequence's pending tokens: first the prompts (more
 * than one pending token) one after another on the context's threads
 * (GEMMs in fixed blocks of rows, the forward attention kernel), then
 * every sequence with one
 * pending token in parallel, one sequence per task, each task on a
 * single-threaded context of its own with one-threaded BLAS
 * (matrix-vector products and the paged attention kernel).
 *
 * Why so: a sequence's numbers must not depend on the batch it runs in,
 * nor on the thread count. OpenBLAS's GEMM rows change in the last bits
 * with the number of rows of the call and with its thread count, and the
 * attention kernels choose their split-K by the whole call's size, so a
 * batched GEMM or one attention call over the batch would make a
 * sequence's logits depend on its neighbours. One sequence per task with
 * fixed code and single-threaded BLAS gives bitwise the logits of
 * generating it alone, whatever shares the step, on any thread count.
 */
#include "model.h"
#include "../nn/nn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    int      used;
    int32_t  len;           /* positions cached */
    int32_t *pending;       /* tokens to run at the next step */
    int64_t  n_pending, cap_pending;
    int64_t  n_blocks;      /* blocks in its table row */
    int      has_logits;
} gen_seq;

struct qkv_gen {
    qkv_ctx          *ctx;
    const qkv__llama *m;
    int64_t           max_seqs, bs, max_blocks, n_blocks;
    qkv_paged_cache  *cache;       /* [L], one block table for all */
    void             *kpool, *vpool;
    float            *kscale, *vscale;
    int32_t          *table;       /* [max_seqs][max_blocks] */
    int32_t          *free_ids;    /* a stack of free block ids */
    int64_t           n_free;
    gen_seq          *seq;         /* [max_seqs] */
    float            *logits;      /* [max_seqs][V] */
    int               n_workers;
    qkv_ctx         **wctx;        /* [n_workers] one thread each */
    float            *work;        /* [n_workers][work_floats] */
    int64_t           work_floats;
    /* the decode phase of a step */
    int32_t          *run;         /* [max_seqs] sequences */
    qkv_status       *run_status;  /* [max_seqs] */
    int              *run_worker;  /* [max_seqs] */
    double           *w_attn, *w_busy;   /* [n_workers] seconds */
    qkv_gen_stats     stats;
};

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

qkv_gen_opts qkv_gen_opts_default(void)
{
    qkv_gen_opts o;
    memset(&o, 0, sizeof o);
    o.max_seqs = 1;
    o.max_positions = 0;
    o.block_size = 16;
    o.kv_dtype = QKV_KV_F32;
    return o;
}

void qkv_gen_free(qkv_gen *g)
{
    if (!g)
        return;
    for (int64_t s = 0; g->seq && s < g->max_seqs; s++)
        free(g->seq[s].pending);
    for (int w = 0; g->wctx && w < g->n_workers; w++)
        qkv_ctx_free(g->wctx[w]);
    free(g->wctx);
    free(g->cache); qkv_free(g->kpool); qkv_free(g->vpool); free(g->kscale); free(g->vscale);
    free(g->table); free(g->free_ids); free(g->seq); free(g->logits); free(g->work);
    free(g->run); free(g->run_status); free(g->run_worker); free(g->w_attn); free(g->w_busy);
    free(g);
}

#define FAIL(st, ...) return qkv__fail(ctx, st, __VA_ARGS__)

qkv_status qkv_gen_create(qkv_ctx *ctx, const qkv_model *model, const qkv_gen_opts *opts,
                          qkv_gen **gen)
{
    if (!ctx)
        return QKV_ERR_NULL;
    if (!gen)
        FAIL(QKV_ERR_NULL, "qkv_gen_create: gen is NULL");
    *gen = NULL;
    if (!model || !opts)
        FAIL(QKV_ERR_NULL, "qkv_gen_create: %s is NULL", !model ? "model" : "opts");
    const qkv__llama *m = qkv__model_llama(model);
    if (!m)
        FAIL(QKV_ERR_UNSUPPORTED, "qkv_gen_create needs a llama model, this one is %s",
             qkv_model_type(model));
    const qkv_kv_dtype dt = opts->kv_dtype;
    if (dt != QKV_KV_F32 && dt != QKV_KV_F16 && dt != QKV_KV_BF16 && dt != QKV_KV_I8)
        FAIL(QKV_ERR_DTYPE, "opts->kv_dtype = %d is not a qkv_kv_dtype", (int)dt);
    const int64_t bs = opts->block_size;
    if (bs < 8 || bs > 256 || (bs & (bs - 1)))
        FAIL(QKV_ERR_ARG, "opts->block_size = %lld must be a power of two from 8 to 256",
             (long long)bs);
    if (opts->max_seqs < 1 || opts->max_seqs > (1 << 20))
        FAIL(QKV_ERR_ARG, "opts->max_seqs = %lld must be in [1, 1048576]",
             (long long)opts->max_seqs);
    const int64_t max_blocks = (m->S + bs - 1) / bs;
    int64_t positions = opts->max_positions;
    if (positions < 0 || (positions > 0 && positions < m->S) || positions > ((int64_t)1 << 40))
        FAIL(QKV_ERR_ARG, "opts->max_positions = %lld must be 0 or in [the model's context "
             "%lld, 2^40]", (long long)positions, (long long)m->S);
    if (positions == 0)
        positions = opts->max_seqs * max_blocks * bs;
    const int64_t n_blocks = (positions + bs - 1) / bs;
    if (n_blocks > INT32_MAX)
        FAIL(QKV_ERR_ARG, "opts->max_positions: more than 2^31 blocks");
    const int64_t es = dt == QKV_KV_I8 ? 1 : (int64_t)qkv_dtype_size((qkv_dtype)dt);
    int64_t rows, bytes;   /* one layer's pool: rows of hs elements */
    if (__builtin_mul_overflow(n_blocks, bs * m->Hkv, &rows) ||
        __builtin_mul_overflow(rows, m->hs * es * m->L, &bytes) || (uint64_t)bytes > SIZE_MAX)
        FAIL(QKV_ERR_OVERFLOW, "qkv_gen_create: the KV pool's size overflows");

    qkv_gen *g = calloc(1, sizeof *g);
    if (!g)
        FAIL(QKV_ERR_NOMEM, "out of memory");
    g->ctx = ctx;
    g->m = m;
    g->max_seqs = opts->max_seqs;
    g->bs = bs;
    g->max_blocks = max_blocks;
    g->n_blocks = n_blocks;
    g->n_workers = qkv_ctx_threads(ctx);
    g->work_floats = (qkv__llama_tok_floats(m) + 15) / 16 * 16;
    const size_t S = (size_t)g->max_seqs;
    g->cache = calloc((size_t)m->L, sizeof *g->cache);
    g->kpool = qkv_alloc((size_t)bytes);   /* huge pages: decode streams the pool */
    g->vpool = qkv_alloc((size_t)bytes);
    if (dt == QKV_KV_I8) {
        g->kscale = malloc((size_t)(rows * m->L) * sizeof(float));
        g->vscale = malloc((size_t)(rows * m->L) * sizeof(float));
    }
    g->table = malloc(S * (size_t)max_blocks * sizeof *g->table);
    g->free_ids = malloc((size_t)n_blocks * sizeof *g->free_ids);
    g->seq = calloc(S, sizeof *g->seq);
    g->logits = malloc(S * (size_t)m->V * sizeof(float));
    g->wctx = calloc((size_t)g->n_workers, sizeof *g->wctx);
    g->work = malloc((size_t)g->n_workers * (size_t)g->work_floats * sizeof(float));
    g->run = malloc(S * sizeof *g->run);
    g->run_status = malloc(S * sizeof *g->run_status);
    g->run_worker = malloc(S * sizeof *g->run_worker);
    g->w_attn = calloc((size_t)g->n_workers, sizeof(double));
    g->w_busy = calloc((size_t)g->n_workers, sizeof(double));
    int ok = g->cache && g->kpool && g->vpool && (dt != QKV_KV_I8 || (g->kscale && g->vscale)) &&
             g->table && g->free_ids && g->seq && g->logits && g->wctx && g->work && g->run &&
             g->run_status && g->run_worker && g->w_attn && g->w_busy;
    for (int w = 0; ok && w < g->n_workers; w++)
        ok = (g->wctx[w] = qkv_ctx_create(1)) != NULL;
    if (!ok) {
        qkv_gen_free(g);
        FAIL(QKV_ERR_NOMEM, "qkv_gen_create: out of memory for a KV pool of %lld blocks of %lld "
             "positions", (long long)n_blocks, (long long)bs);
    }
    const int64_t layer_bytes = bytes / m->L;
    for (int64_t l = 0; l < m->L; l++) {
        qkv_paged_cache *c = &g->cache[l];
        c->k = (char *)g->kpool + l * layer_bytes;
        c->v = (char *)g->vpool + l * layer_bytes;
        c->k_scale = g->kscale ? g->kscale + l * rows : NULL;
        c->v_scale = g->vscale ? g->vscale + l * rows : NULL;
        c->dtype = dt;
        c->n_blocks = n_blocks;
        c->block_size = bs;
        c->heads_kv = m->Hkv;
        c->head_dim = c->head_dim_v = m->hs;
        c->head_major = 1;   /* a run per head in each block: decodes faster */
    }
    /* the lowest ids are handed out first */
    for (int64_t i = 0; i < n_blocks; i++)
        g->free_ids[i] = (int32_t)(n_blocks - 1 - i);
    g->n_free = n_blocks;
    *gen = g;
    return QKV_OK;
}

#undef FAIL
#define FAIL(st, ...) return qkv__fail(g->ctx, st, __VA_ARGS__)

/* The sequence seq of g, or NULL (with a message) when it is not alive. */
static gen_seq *live(qkv_gen *g, int32_t seq, const char *call)
{
    if (seq < 0 || seq >= g->max_seqs || !g->seq[seq].used) {
        qkv__fail(g->ctx, QKV_ERR_ARG, "%s: seq = %d is not a live sequence", call, seq);
        return NULL;
    }
    return &g->seq[seq];
}

/* Queues n tokens for s, checked against the vocabulary and the context. */
static qkv_status queue(qkv_gen *g, gen_seq *s, const int32_t *ids, int64_t n,
                        const char *call)
{
    if (n < 1 || !ids)
        FAIL(n < 1 ? QKV_ERR_SHAPE : QKV_ERR_NULL, "%s: %s", call,
             n < 1 ? "no tokens (n < 1)" : "ids is NULL");
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= g->m->V)
            FAIL(QKV_ERR_ARG, "%s: ids[%lld] = %d is not a token id in [0, %lld)", call,
                 (long long)i, ids[i], (long long)g->m->V);
    if ((int64_t)s->len + s->n_pending + n > g->m->S)
        FAIL(QKV_ERR_SHAPE, "%s: %lld tokens would reach position %lld, past the model's "
             "context of %lld", call, (long long)n,
             (long long)((int64_t)s->len + s->n_pending + n), (long long)g->m->S);
    if (s->n_pending + n > s->cap_pending) {
        int64_t cap = s->n_pending + n;
        int32_t *p = realloc(s->pending, (size_t)cap * sizeof *p);
        if (!p)
            FAIL(QKV_ERR_NOMEM, "%s: out of memory", call);
        s->pending = p;
        s->cap_pending = cap;
    }
    memcpy(s->pending + s->n_pending, ids, (size_t)n * sizeof *ids);
    s->n_pending += n;
    return QKV_OK;
}

qkv_status qkv_gen_add(qkv_gen *g, const int32_t *ids, int64_t n, int32_t *seq)
{
    if (!g)
        return QKV_ERR_NULL;
    if (!seq)
        FAIL(QKV_ERR_NULL, "qkv_gen_add: seq is NULL");
    *seq = -1;
    int64_t slot = 0;
    while (slot < g->max_seqs && g->seq[slot].used)
        slot++;
    if (slot == g->max_seqs)
        FAIL(QKV_ERR_ARG, "qkv_gen_add: all max_seqs = %lld sequences are in use (remove "
             "finished ones)", (long long)g->max_seqs);
    gen_seq *s = &g->seq[slot];
    s->len = 0;
    s->n_pending = 0;
    s->n_blocks = 0;
    s->has_logits = 0;
    qkv_status st = queue(g, s, ids, n, "qkv_gen_add");
    if (st != QKV_OK)
        return st;
    s->used = 1;
    *seq = (int32_t)slot;
    return QKV_OK;
}

qkv_status qkv_gen_feed(qkv_gen *g, int32_t seq, const int32_t *ids, int64_t n)
{
    if (!g)
        return QKV_ERR_NULL;
    gen_seq *s = live(g, seq, "qkv_gen_feed");
    return s ? queue(g, s, ids, n, "qkv_gen_feed") : QKV_ERR_ARG;
}

qkv_status qkv_gen_remove(qkv_gen *g, int32_t seq)
{
    if (!g)
        return QKV_ERR_NULL;
    gen_seq *s = live(g, seq, "qkv_gen_remove");
    if (!s)
        return QKV_ERR_ARG;
    for (int64_t i = 0; i < s->n_blocks; i++)
        g->free_ids[g->n_free++] = g->table[seq * g->max_blocks + i];
    s->used = 0;
    s->len = 0;
    s->n_pending = 0;
    s->n_blocks = 0;
    s->has_logits = 0;
    return QKV_OK;
}

const float *qkv_gen_logits(const qkv_gen *g, int32_t seq)
{
    if (!g || seq < 0 || seq >= g->max_seqs || !g->seq[seq].used || !g->seq[seq].has_logits)
        return NULL;
    return g->logits + (int64_t)seq * g->m->V;
}

int64_t qkv_gen_length(const qkv_gen *g, int32_t seq)
{
    if (!g || seq < 0 || seq >= g->max_seqs || !g->seq[seq].used)
        return -1;
    return g->seq[seq].len;
}

int64_t qkv_gen_free_positions(const qkv_gen *g)
{
    return g ? g->n_free * g->bs : 0;
}

void qkv_gen_get_stats(const qkv_gen *g, qkv_gen_stats *out)
{
    if (!out)
        return;
    memset(out, 0, sizeof *out);
    if (g)
        *out = g->stats;
}

void qkv_gen_reset_stats(qkv_gen *g)
{
    if (g)
        memset(&g->stats, 0, sizeof g->stats);
}

/* One decode task: sequence run[i] on the worker's own context. */
static void decode_task(void *arg, int64_t i, int worker)
{
    qkv_gen *g = arg;
    const int32_t seq = g->run[i];
    gen_seq *s = &g->seq[seq];
    const double t0 = now_s();
    g->run_status[i] = qkv__llama_forward(g->wctx[worker], g->m, g->cache,
                                          g->table + seq * g->max_blocks, g->max_blocks,
                                          s->pending, 1, s->len,
                                          g->work + worker * g->work_floats,
                                          g->logits + (int64_t)seq * g->m->V, &g->w_attn[worker]);
    g->run_worker[i] = worker;
    g->w_busy[worker] += now_s() - t0;
}

/* A sequence's tokens have run: they are cached, its logits are new. */
static void advance(gen_seq *s)
{
    s->len += (int32_t)s->n_pending;
    s->n_pending = 0;
    s->has_logits = 1;
}

qkv_status qkv_gen_step(qkv_gen *g)
{
    if (!g)
        return QKV_ERR_NULL;
    qkv_ctx *ctx = g->ctx;
    ctx->err[0] = 0;
    /* blocks first, for every sequence, so that a pool too small changes nothing */
    int64_t need = 0;
    for (int64_t i = 0; i < g->max_seqs; i++) {
        const gen_seq *s = &g->seq[i];
        if (s->used && s->n_pending)
            need += ((int64_t)s->len + s->n_pending + g->bs - 1) / g->bs - s->n_blocks;
    }
    if (need > g->n_free)
        FAIL(QKV_ERR_NOMEM, "qkv_gen_step: the KV pool has %lld free blocks, this step needs "
             "%lld (remove finished sequences, or make max_positions larger)",
             (long long)g->n_free, (long long)need);
    for (int64_t i = 0; i < g->max_seqs; i++) {
        gen_seq *s = &g->seq[i];
        const int64_t want = s->used && s->n_pending ?
                             ((int64_t)s->len + s->n_pending + g->bs - 1) / g->bs : 0;
        while (s->n_blocks < want)
            g->table[i * g->max_blocks + s->n_blocks++] = g->free_ids[--g->n_free];
    }
    for (int w = 0; w < g->n_workers; w++)
        if (strcmp(qkv_ctx_isa(g->wctx[w]), qkv_ctx_isa(ctx)) != 0)
            qkv_ctx_set_isa(g->wctx[w], qkv_ctx_isa(ctx));

    /* prompts: one at a time, on the context's threads */
    qkv_status first = QKV_OK;
    double t0 = now_s();
    for (int64_t i = 0; i < g->max_seqs; i++) {
        gen_seq *s = &g->seq[i];
        if (!s->used || s->n_pending < 2)
            continue;
        double attn = 0.0;
        const double ts = now_s();
        qkv_status st = qkv__llama_forward(ctx, g->m, g->cache, g->table + i * g->max_blocks,
                                           g->max_blocks, s->pending, s->n_pending, s->len,
                                           NULL, g->logits + i * g->m->V, &attn);
        g->stats.attention_s += attn;
        g->stats.compute_s += now_s() - ts;
        if (st != QKV_OK) {
            if (first == QKV_OK) {
                char msg[sizeof ctx->err];
                snprintf(msg, sizeof msg, "%s", qkv_ctx_last_error(ctx));
                first = qkv__fail(ctx, st, "qkv_gen_step: sequence %lld: %s", (long long)i, msg);
            }
            continue;
        }
        g->stats.prefill_tokens += s->n_pending;
        advance(s);
    }
    const double t1 = now_s();
    g->stats.prefill_s += t1 - t0;

    /* single tokens: in parallel, one sequence per task */
    int64_t n_run = 0;
    for (int64_t i = 0; i < g->max_seqs; i++)
        if (g->seq[i].used && g->seq[i].n_pending == 1)
            g->run[n_run++] = (int32_t)i;
    if (n_run > 0) {
        qkv__blas_single_thread();
        for (int w = 0; w < g->n_workers; w++)
            g->w_attn[w] = g->w_busy[w] = 0.0;
        const qkv__llama *m = g->m;
        const double flops = 2.0 * (double)n_run *
            ((double)m->L * (double)(m->D * (m->Hq + 2 * m->Hkv) * m->hs + m->D * m->Hq * m->hs +
                                     3 * m->D * m->F) + (double)m->V * (double)m->D);
        qkv__parallel(ctx, n_run, flops, decode_task, g);
        for (int w = 0; w < g->n_workers; w++) {
            g->stats.attention_s += g->w_attn[w];
            g->stats.compute_s += g->w_busy[w];
        }
        for (int64_t i = 0; i < n_run; i++) {
            gen_seq *s = &g->seq[g->run[i]];
            if (g->run_status[i] != QKV_OK) {
                if (first == QKV_OK)
                    first = qkv__fail(ctx, g->run_status[i], "qkv_gen_step: sequence %d: %s",
                                      g->run[i], qkv_ctx_last_error(g->wctx[g->run_worker[i]]));
                continue;
            }
            g->stats.decode_tokens++;
            advance(s);
        }
        g->stats.decode_s += now_s() - t1;
    }
    g->stats.steps++;
    return first;
}
