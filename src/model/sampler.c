/*
 * sampler.c — qkv_sampler: the next token from a row of logits. Greedy
 * (temperature 0: the largest logit, the smaller id on ties) or a draw
 * from softmax(logits / temperature), restricted first to the top_k most
 * probable tokens, then to the smallest prefix of them (most probable
 * first, the smaller id on ties) whose probability reaches top_p of what
 * is left.
 *
 * The draws come from SplitMix64 (Steele, Lea & Flood 2014) seeded with
 * opts.seed: u = (next >> 11) · 2^-53, uniform in [0, 1); one draw per
 * sampled token, none for a greedy one. Probabilities are computed in
 * double, so a seed gives the same tokens on every machine for the same
 * logits.
 */
#include "../core/internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double  p;    /* probability, unnormalized */
    int32_t id;
} cand;

struct qkv_sampler {
    qkv_sampler_opts o;
    uint64_t state;
    double  *p;     /* [cap] probabilities (unnormalized) */
    cand    *c;     /* [cap] candidates */
    int64_t  cap;
};

qkv_sampler_opts qkv_sampler_opts_default(void)
{
    qkv_sampler_opts o;
    memset(&o, 0, sizeof o);
    o.temperature = 1.0f;
    o.top_k = 0;
    o.top_p = 1.0f;
    o.seed = 0;
    return o;
}

qkv_status qkv_sampler_create(qkv_ctx *ctx, const qkv_sampler_opts *opts, qkv_sampler **out)
{
    if (!ctx)
        return QKV_ERR_NULL;
    if (!out || !opts)
        return qkv__fail(ctx, QKV_ERR_NULL, "qkv_sampler_create: %s is NULL",
                         !out ? "sampler" : "opts");
    *out = NULL;
    if (!(opts->temperature >= 0.0f) || isinf(opts->temperature))
        return qkv__fail(ctx, QKV_ERR_ARG, "opts->temperature = %g must be finite and >= 0",
                         (double)opts->temperature);
    if (opts->top_k < 0)
        return qkv__fail(ctx, QKV_ERR_ARG, "opts->top_k = %lld must be >= 0 (0: off)",
                         (long long)opts->top_k);
    if (!(opts->top_p > 0.0f && opts->top_p <= 1.0f))
        return qkv__fail(ctx, QKV_ERR_ARG, "opts->top_p = %g must be in (0, 1] (1: off)",
                         (double)opts->top_p);
    qkv_sampler *s = calloc(1, sizeof *s);
    if (!s)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
    s->o = *opts;
    s->state = opts->seed;
    *out = s;
    return QKV_OK;
}

void qkv_sampler_free(qkv_sampler *s)
{
    if (!s)
        return;
    free(s->p);
    free(s->c);
    free(s);
}

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double uniform(qkv_sampler *s)
{
    return (double)(splitmix64(&s->state) >> 11) * 0x1p-53;
}

/* Candidate order: the more probable first, the smaller id on ties. */
static int ahead(const cand *a, const cand *b)
{
    return a->p > b->p || (a->p == b->p && a->id < b->id);
}

static int by_prob(const void *a, const void *b)
{
    return ahead(a, b) ? -1 : ahead(b, a) ? 1 : 0;
}

/* The k best of p[0..n) into c[0..k), best first: a heap of the best so
   far whose root is the worst kept, then sorted. */
static void top_k(const double *p, int64_t n, int64_t k, cand *c)
{
    int64_t m = 0;
    for (int32_t id = 0; id < n; id++) {
        const cand x = { p[id], id };
        if (m == k && !ahead(&x, &c[0]))
            continue;
        int64_t i;
        if (m < k) {   /* sift up from the end */
            i = m++;
            while (i > 0 && ahead(&c[(i - 1) / 2], &x)) {
                c[i] = c[(i - 1) / 2];
                i = (i - 1) / 2;
            }
        } else {       /* replace the root, sift down */
            i = 0;
            for (;;) {
                int64_t ch = 2 * i + 1;
                if (ch >= m)
                    break;
                if (ch + 1 < m && ahead(&c[ch], &c[ch + 1]))
                    ch++;
                if (!ahead(&x, &c[ch]))
                    break;
                c[i] = c[ch];
                i = ch;
            }
        }
        c[i] = x;
    }
    qsort(c, (size_t)k, sizeof *c, by_prob);
}

qkv_status qkv_sampler_sample(qkv_ctx *ctx, qkv_sampler *s, const float *logits, int64_t n,
                              int32_t *token)
{
    if (!ctx)
        return QKV_ERR_NULL;
    if (!s || !logits || !token)
        return qkv__fail(ctx, QKV_ERR_NULL, "qkv_sampler_sample: %s is NULL",
                         !s ? "sampler" : !logits ? "logits" : "token");
    if (n < 1 || n > INT32_MAX)
        return qkv__fail(ctx, QKV_ERR_SHAPE, "qkv_sampler_sample: n = %lld must be in [1, 2^31)",
                         (long long)n);
    int32_t best = -1;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(logits[i]) || logits[i] == INFINITY)
            return qkv__fail(ctx, QKV_ERR_ARG, "qkv_sampler_sample: logits[%lld] is %s",
                             (long long)i, isnan(logits[i]) ? "NaN" : "+inf");
        if (logits[i] > -INFINITY && (best < 0 || logits[i] > logits[best]))
            best = (int32_t)i;
    }
    if (best < 0)
        return qkv__fail(ctx, QKV_ERR_ARG, "qkv_sampler_sample: every logit is -inf");
    const qkv_sampler_opts *o = &s->o;
    if (o->temperature == 0.0f || o->top_k == 1) {
        *token = best;
        return QKV_OK;
    }
    if (n > s->cap) {
        double *p = realloc(s->p, (size_t)n * sizeof *p);
        cand *c = p ? realloc(s->c, (size_t)n * sizeof *c) : NULL;
        if (p)
            s->p = p;
        if (!c)
            return qkv__fail(ctx, QKV_ERR_NOMEM, "qkv_sampler_sample: out of memory");
        s->c = c;
        s->cap = n;
    }
    double *p = s->p, total = 0.0;
    const double mx = logits[best], inv_t = 1.0 / (double)o->temperature;
    for (int64_t i = 0; i < n; i++) {
        p[i] = exp(((double)logits[i] - mx) * inv_t);
        total += p[i];
    }
    const double u = uniform(s);
    if (o->top_k == 0 && o->top_p >= 1.0f) {   /* the whole distribution, in id order */
        double c = 0.0, at = u * total;
        for (int64_t i = 0; i < n; i++) {
            c += p[i];
            if (at < c && p[i] > 0.0) {
                *token = (int32_t)i;
                return QKV_OK;
            }
        }
        *token = best;   /* rounding left u·total at the very end */
        return QKV_OK;
    }
    cand *cd = s->c;
    int64_t k;
    if (o->top_k > 0 && o->top_k < n) {
        k = o->top_k;
        top_k(p, n, k, cd);
    } else {
        /* top-p alone: a token below (1 - top_p)·total / (n - 1) cannot be
           in the nucleus (all of them together hold less than 1 - top_p) */
        const double cut = n > 1 ? (1.0 - (double)o->top_p) * total / (double)(n - 1) : 0.0;
        k = 0;
        for (int32_t i = 0; i < n; i++)
            if (p[i] >= cut && p[i] > 0.0) {
                cd[k].p = p[i];
                cd[k++].id = i;
            }
        qsort(cd, (size_t)k, sizeof *cd, by_prob);
    }
    /* the mass top-p measures against: what top-k kept, else everything
       (the candidates of the cut are not all of it) */
    double kept = 0.0;
    for (int64_t i = 0; i < k; i++)
        kept += cd[i].p;
    const double base = o->top_k > 0 && o->top_k < n ? kept : total;
    if (o->top_p < 1.0f) {
        const double want = (double)o->top_p * base;
        double c = 0.0;
        int64_t i = 0;
        while (i < k) {
            c += cd[i++].p;
            if (c >= want)
                break;
        }
        k = i;
        kept = c;
    }
    double c = 0.0, at = u * kept;
    for (int64_t i = 0; i < k; i++) {
        c += cd[i].p;
        if (at < c) {
            *token = cd[i].id;
            return QKV_OK;
        }
    }
    *token = cd[k - 1].id;
    return QKV_OK;
}
