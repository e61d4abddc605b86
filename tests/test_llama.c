/*
 * test_llama.c — text generation with Llama-family decoders: the llama2.c
 * tokenizer (the merge procedure against a plain rescanning encoder
 * written here, byte fallback, decoding), the checkpoint and tokenizer
 * readers against truncated and mangled files, the runtime's logits
 * against an independent float64 forward pass written here from the
 * stories260K README (prefill, decode, chunked prefill, batched), greedy
 * generations against the golden file of transformers' Llama
 * (tests/models/llama_golden.json, made by make_llama_golden.py), the
 * sampler, batched generation bitwise equal to one-by-one, and the
 * converter to a Hugging Face folder and back.
 *
 * stories260K is found in $QKV_MODELS or ../shared/models from the
 * repository root; tests that need it say SKIPPED without it. Small
 * synthetic checkpoints and tokenizers made here cover the rest.
 */
#include "test.h"
#include "../src/model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef QKV_SOURCE_DIR
#define QKV_SOURCE_DIR "."
#endif

/* ---- files -------------------------------------------------------------------- */

/* The stories260K folder, or NULL with a note. */
static const char *stories_dir(char *buf, size_t cap)
{
    const char *root = getenv("QKV_MODELS");
    if (root && *root)
        snprintf(buf, cap, "%s/stories260K", root);
    else
        snprintf(buf, cap, "%s/../shared/models/stories260K", QKV_SOURCE_DIR);
    char p[4300];
    snprintf(p, sizeof p, "%s/stories260K.bin", buf);
    if (!t_exists(p)) {
        t_note("SKIPPED: %s not found (set QKV_MODELS to the models folder)", p);
        return NULL;
    }
    return buf;
}

/* Removes the files a test put in dir, then dir. */
static void remove_dir(const char *dir)
{
    static const char *const names[] = { "config.json", "model.safetensors", "tokenizer.bin",
                                         "model.bin", "tok.bin", "other.bin" };
    char p[4200];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        remove(p);
    }
    rmdir(dir);
}

/* ---- synthetic checkpoints and tokenizers -------------------------------------- */

typedef struct { int32_t D, F, L, Hq, Hkv, V, S; int shared; } dims;

static void put32(unsigned char *p, int32_t v)
{
    memcpy(p, &v, 4);
}

/* Floats in the checkpoint after the header. */
static int64_t l2c_floats(const dims *d)
{
    const int64_t D = d->D, F = d->F, L = d->L, hs = D / d->Hq, KV = d->Hkv * hs;
    return (int64_t)d->V * D + L * D + 2 * L * D * D + 2 * L * KV * D + L * D + 3 * L * F * D +
           D + (int64_t)d->S * hs + (d->shared ? 0 : (int64_t)d->V * D);
}

/* A llama2.c checkpoint of random weights (norm weights near 1). */
static unsigned char *make_l2c(const dims *d, uint64_t seed, size_t *len)
{
    const int64_t n = l2c_floats(d);
    *len = 28 + 4 * (size_t)n;
    unsigned char *b = xmalloc(*len);
    const int32_t h[7] = { d->D, d->F, d->L, d->Hq, d->Hkv, d->shared ? d->V : -d->V, d->S };
    for (int i = 0; i < 7; i++)
        put32(b + 4 * i, h[i]);
    rng r = rng_seed(seed);
    float *f = xmalloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++)
        f[i] = (float)(0.5 * rng_unif(&r));
    /* the norm weights: rms_att and rms_ffn per layer, rms_final */
    const int64_t D = d->D, F = d->F, L = d->L, KV = d->Hkv * (D / d->Hq);
    const int64_t att = (int64_t)d->V * D, ffn = att + L * D + 2 * L * D * D + 2 * L * KV * D;
    const int64_t fin = ffn + L * D + 3 * L * F * D;
    for (int64_t i = 0; i < L * D; i++) {
        f[att + i] = 1.0f + f[att + i] * 0.2f;
        f[ffn + i] = 1.0f + f[ffn + i] * 0.2f;
    }
    for (int64_t i = 0; i < D; i++)
        f[fin + i] = 1.0f + f[fin + i] * 0.2f;
    memcpy(b + 28, f, (size_t)n * 4);
    free(f);
    return b;
}

/* The pieces of the synthetic tokenizers after <unk>, BOS, EOS and the 256
   byte tokens: scores fall with the index, except where tie_at says. */
static const char *const pieces[] = {
    " ", "a", "b", "c", "ab", "bc", " a", "abc", "ca", " ab", "aa", "bb", "cc", "é", "中",
    " c", "ba", "cab", "hello", "he", "ll", "llo", "lo", "h", "e", "l", "o", " he", " hello",
    "x", "y", "xy", "yx", "xyx",
};
enum { N_PIECES = sizeof pieces / sizeof pieces[0] };

/* A tokenizer of V >= 259 + N_PIECES tokens ("t<id>" fills the rest); when
   tie, "ab" and "bc" share one score. */
static unsigned char *make_tok(int32_t V, int tie, size_t *len)
{
    size_t cap = 4 + (size_t)V * 24, at = 4;
    unsigned char *b = xmalloc(cap);
    int32_t max_len = 0;
    for (int32_t i = 0; i < V; i++) {
        char text[32];
        if (i == 0) snprintf(text, sizeof text, "<unk>");
        else if (i == 1) snprintf(text, sizeof text, "\n<s>\n");
        else if (i == 2) snprintf(text, sizeof text, "\n</s>\n");
        else if (i < 259) snprintf(text, sizeof text, "<0x%02X>", i - 3);
        else if (i - 259 < N_PIECES) snprintf(text, sizeof text, "%s", pieces[i - 259]);
        else snprintf(text, sizeof text, "t%d", i);
        float score = i < 259 ? 0.0f : (float)(259 - i);
        if (tie && i - 259 >= 0 && i - 259 < N_PIECES && !strcmp(pieces[i - 259], "bc"))
            score = (float)(259 - (259 + 4));   /* the score of "ab" */
        const int32_t n = (int32_t)strlen(text);
        memcpy(b + at, &score, 4);
        put32(b + at + 4, n);
        memcpy(b + at + 8, text, (size_t)n);
        at += 8 + (size_t)n;
        if (n > max_len)
            max_len = n;
    }
    put32(b, max_len);
    *len = at;
    return b;
}

/* ---- a plain encoder written from the README ------------------------------------- */

/* The smallest id whose text is s (n bytes), by linear search; -1. */
static int32_t find_text(const qkv__bpe *t, const char *s, size_t n)
{
    for (int32_t i = 0; i < t->n; i++)
        if ((size_t)t->len[i] == n && memcmp(t->text + t->off[i], s, n) == 0)
            return i;
    return -1;
}

/* One code point's token, or its bytes' tokens (<unk> without one). */
static void plain_code_point(const qkv__bpe *t, const char *cp, size_t k, int32_t *ids,
                             int64_t *n)
{
    const int32_t id = find_text(t, cp, k);
    if (id >= 0) {
        ids[(*n)++] = id;
        return;
    }
    for (size_t j = 0; j < k; j++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", (unsigned char)cp[j]);
        const int32_t b = find_text(t, name, 6);
        ids[(*n)++] = b >= 0 ? b : 0;
    }
}

/* BOS, the dummy-prefix space, code points or byte tokens, then merge the
   best-scoring adjacent pair (the leftmost on ties), rescanning each time. */
static int64_t plain_encode(const qkv__bpe *t, const char *text, int32_t *ids)
{
    int64_t n = 0;
    ids[n++] = 1;
    const size_t len = strlen(text);
    if (len > 0)
        plain_code_point(t, " ", 1, ids, &n);
    for (size_t i = 0; i < len;) {
        size_t k = 1;
        while (i + k < len && k < 4 && ((unsigned char)text[i + k] & 0xC0) == 0x80)
            k++;
        plain_code_point(t, text + i, k, ids, &n);
        i += k;
    }
    char buf[512];
    for (;;) {
        float best = -INFINITY;
        int64_t at = -1;
        int32_t best_id = -1;
        for (int64_t i = 0; i + 1 < n; i++) {
            const int32_t a = ids[i], b = ids[i + 1];
            const size_t la = (size_t)t->len[a], lb = (size_t)t->len[b];
            if (la + lb > sizeof buf)
                continue;
            memcpy(buf, t->text + t->off[a], la);
            memcpy(buf + la, t->text + t->off[b], lb);
            const int32_t id = find_text(t, buf, la + lb);
            if (id >= 0 && t->score[id] > best) {
                best = t->score[id];
                at = i;
                best_id = id;
            }
        }
        if (at < 0)
            break;
        ids[at] = best_id;
        memmove(ids + at + 1, ids + at + 2, (size_t)(n - at - 2) * sizeof *ids);
        n--;
    }
    return n;
}

/* ---- an independent float64 forward, from the stories260K README ---------------- */

typedef struct {
    int     D, F, L, Hq, Hkv, V, S, hs, shared;
    double *emb, *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *wcls;
    double *kc, *vc;   /* [L][S][Hkv·hs] keys and values seen so far */
} ref_model;

static double *ref_take(const unsigned char **p, int64_t n)
{
    double *d = xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        float f;
        memcpy(&f, *p + 4 * i, 4);
        d[i] = f;
    }
    *p += 4 * n;
    return d;
}

/* Reads the checkpoint bytes (assumed well-formed) into doubles. */
static void ref_load(ref_model *r, const unsigned char *b)
{
    int32_t h[7];
    memcpy(h, b, sizeof h);
    r->D = h[0]; r->F = h[1]; r->L = h[2]; r->Hq = h[3]; r->Hkv = h[4];
    r->V = abs(h[5]); r->S = h[6]; r->shared = h[5] > 0;
    r->hs = r->D / r->Hq;
    const int64_t D = r->D, F = r->F, L = r->L, KV = (int64_t)r->Hkv * r->hs;
    const unsigned char *p = b + 28;
    r->emb = ref_take(&p, (int64_t)r->V * D);
    r->rms_att = ref_take(&p, L * D);
    r->wq = ref_take(&p, L * D * D);
    r->wk = ref_take(&p, L * KV * D);
    r->wv = ref_take(&p, L * KV * D);
    r->wo = ref_take(&p, L * D * D);
    r->rms_ffn = ref_take(&p, L * D);
    r->w1 = ref_take(&p, L * F * D);
    r->w2 = ref_take(&p, L * D * F);
    r->w3 = ref_take(&p, L * F * D);
    r->rms_final = ref_take(&p, D);
    p += 4 * (int64_t)r->S * r->hs;   /* the legacy RoPE tables */
    r->wcls = r->shared ? r->emb : ref_take(&p, (int64_t)r->V * D);
    r->kc = xmalloc((size_t)(L * r->S * KV) * sizeof(double));
    r->vc = xmalloc((size_t)(L * r->S * KV) * sizeof(double));
}

static void ref_free(ref_model *r)
{
    free(r->emb); free(r->rms_att); free(r->wq); free(r->wk); free(r->wv); free(r->wo);
    free(r->rms_ffn); free(r->w1); free(r->w2); free(r->w3); free(r->rms_final);
    if (!r->shared)
        free(r->wcls);
    free(r->kc); free(r->vc);
}

/* o = RMSNorm(x)·w */
static void ref_rmsnorm(double *o, const double *x, const double *w, int n)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    const double s = 1.0 / sqrt(ss / n + 1e-5);
    for (int i = 0; i < n; i++)
        o[i] = w[i] * (s * x[i]);
}

/* o[rows] = W[rows, cols]·x */
static void ref_matvec(double *o, const double *W, const double *x, int rows, int cols)
{
    for (int i = 0; i < rows; i++) {
        double a = 0;
        for (int j = 0; j < cols; j++)
            a += W[(int64_t)i * cols + j] * x[j];
        o[i] = a;
    }
}

/* The token at position pos (positions fed in order from 0): its logits. */
static void ref_forward(ref_model *r, int token, int pos, double *logits)
{
    const int D = r->D, F = r->F, hs = r->hs, KV = r->Hkv * hs;
    double *x = xmalloc(D * sizeof(double)), *h = xmalloc(D * sizeof(double));
    double *q = xmalloc(D * sizeof(double)), *att = xmalloc(D * sizeof(double));
    double *o = xmalloc(D * sizeof(double)), *g = xmalloc(F * sizeof(double));
    double *u = xmalloc(F * sizeof(double)), *sc = xmalloc((size_t)(pos + 1) * sizeof(double));
    memcpy(x, r->emb + (int64_t)token * D, D * sizeof(double));
    for (int l = 0; l < r->L; l++) {
        double *k = r->kc + ((int64_t)l * r->S + pos) * KV;
        double *v = r->vc + ((int64_t)l * r->S + pos) * KV;
        ref_rmsnorm(h, x, r->rms_att + (int64_t)l * D, D);
        ref_matvec(q, r->wq + (int64_t)l * D * D, h, D, D);
        ref_matvec(k, r->wk + (int64_t)l * KV * D, h, KV, D);
        ref_matvec(v, r->wv + (int64_t)l * KV * D, h, KV, D);
        /* RoPE: pairs (2i, 2i+1) of each head by pos·10000^(-2i/hs) */
        for (int e = 0; e < D; e += 2) {
            const int i = (e % hs) / 2;
            const double a = pos * pow(10000.0, -2.0 * i / hs), c = cos(a), s = sin(a);
            double u0 = q[e], u1 = q[e + 1];
            q[e] = u0 * c - u1 * s;
            q[e + 1] = u0 * s + u1 * c;
            if (e < KV) {
                u0 = k[e];
                u1 = k[e + 1];
                k[e] = u0 * c - u1 * s;
                k[e + 1] = u0 * s + u1 * c;
            }
        }
        for (int hq = 0; hq < r->Hq; hq++) {
            const int hk = hq / (r->Hq / r->Hkv);
            double mx = -INFINITY, sum = 0;
            for (int t = 0; t <= pos; t++) {
                const double *kt = r->kc + ((int64_t)l * r->S + t) * KV + hk * hs;
                double d = 0;
                for (int e = 0; e < hs; e++)
                    d += q[hq * hs + e] * kt[e];
                sc[t] = d / sqrt((double)hs);
                mx = fmax(mx, sc[t]);
            }
            for (int t = 0; t <= pos; t++)
                sum += (sc[t] = exp(sc[t] - mx));
            for (int e = 0; e < hs; e++) {
                double a = 0;
                for (int t = 0; t <= pos; t++)
                    a += sc[t] / sum * r->vc[((int64_t)l * r->S + t) * KV + hk * hs + e];
                att[hq * hs + e] = a;
            }
        }
        ref_matvec(o, r->wo + (int64_t)l * D * D, att, D, D);
        for (int i = 0; i < D; i++)
            x[i] += o[i];
        ref_rmsnorm(h, x, r->rms_ffn + (int64_t)l * D, D);
        ref_matvec(g, r->w1 + (int64_t)l * F * D, h, F, D);
        ref_matvec(u, r->w3 + (int64_t)l * F * D, h, F, D);
        for (int i = 0; i < F; i++)
            g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        ref_matvec(o, r->w2 + (int64_t)l * D * F, g, D, F);
        for (int i = 0; i < D; i++)
            x[i] += o[i];
    }
    ref_rmsnorm(h, x, r->rms_final, D);
    ref_matvec(logits, r->wcls, h, r->V, D);
    free(x); free(h); free(q); free(att); free(o); free(g); free(u); free(sc);
}

/* The float64 logits of every position of ids[0 .. n): [n][V]. */
static double *ref_all(ref_model *r, const int32_t *ids, int64_t n)
{
    double *all = xmalloc((size_t)(n * r->V) * sizeof(double));
    for (int64_t p = 0; p < n; p++)
        ref_forward(r, ids[p], (int)p, all + p * r->V);
    return all;
}

/* max |got - ref| over V logits */
static double max_diff(const float *got, const double *ref, int64_t V)
{
    double e = 0;
    for (int64_t i = 0; i < V; i++)
        e = fmax(e, fabs((double)got[i] - ref[i]));
    return e;
}

static int32_t argmax(const float *x, int64_t n)
{
    int32_t b = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* ---- generation helpers ---------------------------------------------------------- */

/* One sequence alone: prompt[0 .. P), then tokens by smp (greedy when NULL)
   with llama2.c's -n rule and its stop at BOS; ids get everything. When
   logits_out is not NULL it gets the logits of each step, [steps][V], and
   *rows (when not NULL) their number. */
static int64_t run_alone_rows(qkv_ctx *ctx, const qkv_model *m, const qkv_gen_opts *go,
                              const int32_t *prompt, int64_t P, int64_t steps, qkv_sampler *smp,
                              int32_t *ids, float *logits_out, int64_t *rows)
{
    const int64_t V = qkv_model_dim(m);
    qkv_gen *g = NULL;
    qkv_gen_opts o = *go;
    o.max_seqs = 1;
    if (qkv_gen_create(ctx, m, &o, &g) != QKV_OK) {
        CHECK(0, "gen_create: %s", qkv_ctx_last_error(ctx));
        return 0;
    }
    memcpy(ids, prompt, (size_t)P * sizeof *ids);
    int64_t n = P, k = 0;
    int32_t seq;
    qkv_status s = qkv_gen_add(g, prompt, P, &seq);
    while (s == QKV_OK && (s = qkv_gen_step(g)) == QKV_OK) {
        const float *lg = qkv_gen_logits(g, seq);
        if (logits_out)
            memcpy(logits_out + k++ * V, lg, (size_t)V * sizeof(float));
        int32_t next = argmax(lg, V);
        if (smp)
            s = qkv_sampler_sample(ctx, smp, lg, V, &next);
        if (s != QKV_OK || next == 1)
            break;
        ids[n++] = next;
        if (qkv_gen_length(g, seq) >= steps)
            break;
        s = qkv_gen_feed(g, seq, &next, 1);
    }
    CHECK(s == QKV_OK, "generation: %s", qkv_ctx_last_error(ctx));
    qkv_gen_free(g);
    if (rows)
        *rows = k;
    return n;
}

static int64_t run_alone(qkv_ctx *ctx, const qkv_model *m, const qkv_gen_opts *go,
                         const int32_t *prompt, int64_t P, int64_t steps, qkv_sampler *smp,
                         int32_t *ids, float *logits_out)
{
    return run_alone_rows(ctx, m, go, prompt, P, steps, smp, ids, logits_out, NULL);
}

static qkv_model *load_stories(qkv_ctx *ctx, const char *dir)
{
    char p[4300];
    snprintf(p, sizeof p, "%s/stories260K.bin", dir);
    qkv_model *m = NULL;
    qkv_status s = qkv_model_load(ctx, p, &m);
    CHECK(s == QKV_OK, "load %s: %s", p, qkv_ctx_last_error(ctx));
    return m;
}

static cJSON *read_golden(void)
{
    char p[4200];
    snprintf(p, sizeof p, "%s/tests/models/llama_golden.json", QKV_SOURCE_DIR);
    size_t len;
    unsigned char *b = (unsigned char *)t_read_file(p, &len);
    if (!b) {
        t_note("SKIPPED: %s not found (made by tests/models/make_llama_golden.py)", p);
        return NULL;
    }
    b[len] = '\0';
    cJSON *j = cJSON_Parse((const char *)b);
    free(b);
    CHECK(j != NULL, "%s is not JSON", p);
    return j;
}

/* ids of a JSON array into a malloc'd array; *n its length */
static int32_t *json_ids(const cJSON *a, int64_t *n)
{
    *n = cJSON_GetArraySize(a);
    int32_t *ids = xmalloc((size_t)(*n + 1) * sizeof *ids);
    for (int64_t i = 0; i < *n; i++)
        ids[i] = cJSON_GetArrayItem(a, (int)i)->valueint;
    return ids;
}

/* ---- tokenizer ---------------------------------------------------------------------- */

/* ids[0 .. n) equal want[0 .. n_want) */
static int same_ids(const int32_t *ids, int64_t n, const int32_t *want, int64_t n_want)
{
    if (n != n_want)
        return 0;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] != want[i])
            return 0;
    return 1;
}

static void ids_str(const int32_t *ids, int64_t n, char *buf, size_t cap)
{
    buf[0] = '\0';
    for (int64_t i = 0; i < n && strlen(buf) + 12 < cap; i++)
        snprintf(buf + strlen(buf), cap - strlen(buf), " %d", ids[i]);
}

/* The text of ids after BOS, from the tokenizer's pieces. */
static size_t decode_ids(const qkv__bpe *t, const int32_t *ids, int64_t n, char *out)
{
    size_t at = 0;
    for (int64_t i = 1; i < n; i++) {
        int64_t k;
        const char *p = qkv__bpe_piece(t, ids[i - 1], 1, ids[i], &k);
        memcpy(out + at, p, (size_t)k);
        at += (size_t)k;
    }
    out[at] = '\0';
    return at;
}

/* Random texts from an alphabet of pieces: the heap encoder gives the
   plain encoder's ids, and the ids decode back to the text. */
static void random_texts(qkv_ctx *ctx, const qkv__bpe *t, const char *what, int rounds,
                         uint64_t seed)
{
    static const char *const alpha[] = { "a", "b", "c", " ", "é", "中", "h", "e", "l", "o",
                                         "x", "y", "z", "\xff", "\x80", "\n", "\xe4\xb8",
                                         "Once", " upon", ",", "ab", "  " };
    rng r = rng_seed(seed);
    int bad = 0, bad_rt = 0;
    for (int round = 0; round < rounds; round++) {
        char text[512] = "";
        const int parts = (int)rng_int(&r, 0, 40);
        for (int i = 0; i < parts; i++)
            strcat(text, RNG_PICK(&r, alpha));
        int32_t *ids = NULL, want[512];
        int64_t n = 0;
        qkv_status s = qkv__bpe_encode(ctx, t, text, strlen(text), 1, &ids, &n);
        const int64_t nw = plain_encode(t, text, want);
        if (s != QKV_OK || !same_ids(ids, n, want, nw)) {
            if (bad++ < 5) {
                char a[512], b[512];
                ids_str(ids, s == QKV_OK ? n : 0, a, sizeof a);
                ids_str(want, nw, b, sizeof b);
                CHECK(0, "%s: '%s': heap encoder%s, plain%s", what, text, a, b);
            }
        }
        char back[1024];
        if (s == QKV_OK && (decode_ids(t, ids, n, back) != strlen(text) || strcmp(back, text))) {
            if (bad_rt++ < 5)
                CHECK(0, "%s: '%s' decodes to '%s'", what, text, back);
        }
        free(ids);
    }
    CHECK(bad == 0 && bad_rt == 0, "%s: %d of %d texts differ from the plain encoder, %d do "
          "not decode back", what, bad, rounds, bad_rt);
}

void test_llama_tokenizer(void)
{
    qkv_ctx *ctx = qkv_ctx_create(1);
    /* a small vocabulary: merges by score, ties to the leftmost pair */
    for (int tie = 0; tie < 2; tie++) {
        size_t len;
        unsigned char *tb = make_tok(320, tie, &len);
        qkv__bpe t;
        qkv_status s = qkv__bpe_parse(ctx, tb, len, 320, "synthetic", &t);
        CHECK(s == QKV_OK, "synthetic tokenizer: %s", qkv_ctx_last_error(ctx));
        free(tb);
        if (s != QKV_OK)
            continue;
        /* "abc": " " a b c; ab and bc score alike when tie: ab (leftmost) merges,
           then abc; " " stays (" abc" is no token) */
        int32_t *ids;
        int64_t n;
        const int32_t want[3] = { 1, 259, 266 };
        s = qkv__bpe_encode(ctx, &t, "abc", 3, 1, &ids, &n);
        CHECK(s == QKV_OK && same_ids(ids, n, want, 3), "'abc' (tie %d)", tie);
        free(ids);
        /* no " " token for the byte 0xff: its byte token */
        const int32_t want2[3] = { 1, 259, 0xff + 3 };
        s = qkv__bpe_encode(ctx, &t, "\xff", 1, 1, &ids, &n);
        CHECK(s == QKV_OK && same_ids(ids, n, want2, 3), "byte fallback for 0xff");
        free(ids);
        /* the empty text is BOS alone; no BOS when bos < 0 */
        s = qkv__bpe_encode(ctx, &t, "", 0, 1, &ids, &n);
        CHECK(s == QKV_OK && n == 1 && ids[0] == 1, "empty text");
        free(ids);
        s = qkv__bpe_encode(ctx, &t, "", 0, -1, &ids, &n);
        CHECK(s == QKV_OK && n == 0, "empty text without BOS: %lld ids", (long long)n);
        free(ids);
        random_texts(ctx, &t, tie ? "synthetic, tie" : "synthetic", t_quick ? 300 : 2000, 71 + tie);
        qkv__bpe_free(&t);
    }

    char dir[4096];
    if (!stories_dir(dir, sizeof dir)) {
        qkv_ctx_free(ctx);
        return;
    }
    qkv_model *m = load_stories(ctx, dir);
    if (!m) {
        qkv_ctx_free(ctx);
        return;
    }
    const qkv__llama *lm = qkv__model_llama(m);
    /* the README's example, and byte fallback: U+4E2D has no token */
    int32_t ids[600];
    int64_t n = 0;
    qkv_status s = qkv_model_tokenize(ctx, m, "Once upon a time", ids, 600, &n);
    const int32_t once[5] = { 1, 403, 407, 261, 378 };
    CHECK(s == QKV_OK && same_ids(ids, n, once, 5), "'Once upon a time': status %d, %lld ids",
          s, (long long)n);
    s = qkv_model_tokenize(ctx, m, "\xe4\xb8\xad", ids, 600, &n);
    const int32_t zh[5] = { 1, 410, 0xe4 + 3, 0xb8 + 3, 0xad + 3 };
    CHECK(s == QKV_OK && same_ids(ids, n, zh, 5), "byte fallback for U+4E2D");
    char text[64];
    int64_t tl = 0;
    s = qkv_model_detokenize(ctx, m, ids, n, text, sizeof text, &tl);
    CHECK(s == QKV_OK && tl == 3 && !strcmp(text, "\xe4\xb8\xad"), "decode U+4E2D: '%s'", text);
    /* pieces: the space after BOS goes, byte tokens are raw bytes, BOS and
       EOS print nothing */
    int64_t pl;
    const char *p = qkv_model_piece(m, 1, 403, &pl);
    CHECK(p && pl == 4 && !memcmp(p, "Once", 4), "piece 403 after BOS");
    p = qkv_model_piece(m, 403, 403, &pl);
    CHECK(p && pl == 5 && !memcmp(p, " Once", 5), "piece 403 after 403");
    p = qkv_model_piece(m, 1, 3, &pl);
    CHECK(p && pl == 1 && p[0] == '\0', "piece <0x00> is a NUL byte");
    p = qkv_model_piece(m, 5, 1, &pl);
    CHECK(p && pl == 0, "BOS piece is empty");
    p = qkv_model_piece(m, 5, 2, &pl);
    CHECK(p && pl == 0, "EOS piece is empty");
    CHECK(!qkv_model_piece(m, 1, 512, &pl) && pl == 0 && !qkv_model_piece(m, 1, -1, NULL),
          "pieces out of range");
    CHECK(qkv_model_bos(m) == 1 && qkv_model_eos(m) == 2 && qkv_model_is_stop(m, 1) &&
          qkv_model_is_stop(m, 2) && !qkv_model_is_stop(m, 3), "BOS, EOS");
    /* a cap too small says how many ids are needed */
    s = qkv_model_tokenize(ctx, m, "Once upon a time", ids, 3, &n);
    CHECK(s == QKV_ERR_SHAPE && n == 5 && strstr(qkv_ctx_last_error(ctx), "cap"),
          "cap 3: status %d, n %lld", s, (long long)n);
    s = qkv_model_detokenize(ctx, m, once, 5, text, 4, &tl);
    CHECK(s == QKV_ERR_SHAPE && tl == 16, "detokenize into 4 bytes: %d, len %lld", s,
          (long long)tl);
    random_texts(ctx, &lm->tok, "stories260K", t_quick ? 100 : 600, 73);

    /* the golden file's texts, made by an independent Python encoder */
    cJSON *gold = read_golden();
    const cJSON *cases = gold ? cJSON_GetObjectItem(gold, "tokenizer") : NULL;
    int n_cases = cJSON_GetArraySize(cases), equal = 0, texts = 0;
    for (int c = 0; c < n_cases; c++) {
        const cJSON *cs = cJSON_GetArrayItem(cases, c);
        const char *tx = cJSON_GetObjectItem(cs, "text")->valuestring;
        const char *dec = cJSON_GetObjectItem(cs, "decoded")->valuestring;
        int64_t nw;
        int32_t *want = json_ids(cJSON_GetObjectItem(cs, "ids"), &nw);
        int32_t *got = xmalloc((size_t)(strlen(tx) + 2) * sizeof *got);
        s = qkv_model_tokenize(ctx, m, tx, got, (int64_t)strlen(tx) + 2, &n);
        const int ok = s == QKV_OK && same_ids(got, n, want, nw);
        equal += ok;
        CHECK(ok, "golden text %d '%.40s': ids differ", c, tx);
        char *back = xmalloc(strlen(tx) * 4 + 16);
        if (ok && qkv_model_detokenize(ctx, m, got, n, back, (int64_t)strlen(tx) * 4 + 16,
                                       &tl) == QKV_OK) {
            if (strstr(dec, "\xef\xbf\xbd") && !strstr(tx, "\xef\xbf\xbd")) {
                t_note("golden text %d: decoded with replacement characters, not compared", c);
            } else {
                texts++;
                CHECK(!strcmp(back, dec) && !strcmp(back, tx), "golden text %d: decoded '%s'",
                      c, back);
            }
        }
        free(back);
        free(got);
        free(want);
    }
    if (gold)
        t_note("tokenizer: %d/%d golden id lists equal, %d texts decoded back", equal, n_cases,
               texts);
    cJSON_Delete(gold);
    qkv_model_free(m);
    qkv_ctx_free(ctx);
}

/* ---- malformed tokenizers and checkpoints ------------------------------------------ */

static void expect_bpe(qkv_ctx *ctx, const unsigned char *b, size_t len, int64_t V,
                       const char *msg, const char *what)
{
    qkv__bpe t;
    qkv_status s = qkv__bpe_parse(ctx, b, len, V, "tok.bin", &t);
    CHECK(s == QKV_ERR_FORMAT && strstr(qkv_ctx_last_error(ctx), msg) &&
          strstr(qkv_ctx_last_error(ctx), "tok.bin"),
          "%s: status %d, message '%s' (want '%s')", what, s, qkv_ctx_last_error(ctx), msg);
    if (s == QKV_OK)
        qkv__bpe_free(&t);
}

/* Byte offset of token i's 8-byte (score, length) record. */
static size_t tok_record(const unsigned char *b, int32_t i)
{
    size_t at = 4;
    for (int32_t k = 0; k < i; k++) {
        int32_t n;
        memcpy(&n, b + at + 4, 4);
        at += 8 + (size_t)n;
    }
    return at;
}

void test_llama_tokenizer_bad(void)
{
    qkv_ctx *ctx = qkv_ctx_create(1);
    const int32_t V = 300;
    size_t len;
    unsigned char *tb = make_tok(V, 0, &len);
    unsigned char *b = xmalloc(len + 16);
    /* every truncation */
    int refused = 0;
    for (size_t cut = 0; cut < len; cut++) {
        qkv__bpe t;
        memcpy(b, tb, cut);
        qkv_status s = qkv__bpe_parse(ctx, b, cut, V, "tok.bin", &t);
        refused += s == QKV_ERR_FORMAT;
        if (s == QKV_OK)
            qkv__bpe_free(&t);
    }
    CHECK(refused == (int)len, "%d of %zu truncations refused", refused, len);
    /* trailing bytes, and vocabulary sizes that disagree */
    memcpy(b, tb, len);
    memset(b + len, 0, 16);
    expect_bpe(ctx, b, len + 1, V, "follow", "one trailing byte");
    expect_bpe(ctx, b, len + 8, V, "follow", "a trailing record");
    expect_bpe(ctx, b, len, V + 1, "ends inside token 300", "vocab_size 301");
    expect_bpe(ctx, b, len, V - 1, "follow the 299 tokens", "vocab_size 299");
    expect_bpe(ctx, b, len, 2, "vocab_size", "vocab_size 2");
    /* the header and the records, one field at a time */
    static const struct { int field; int32_t value; const char *msg; } edits[] = {
        { 0, 0, "max_token_length" }, { 0, -5, "max_token_length" },
        { 0, 1 << 20, "max_token_length" }, { 0, 5, "length 6" },
        { 1, 0, "length 0" }, { 1, -1, "length -1" }, { 1, 0x7fffffff, "length" },
        { 1, 7, "" }, { 2, 0x7fc00000, "non-finite" }, { 2, 0x7f800000, "non-finite" },
    };
    for (size_t e = 0; e < sizeof edits / sizeof edits[0]; e++) {
        memcpy(b, tb, len);
        /* field 0: max_token_length; 1: the length of token 259 (" ", 1 byte);
           2: the score of token 260 */
        const size_t at = edits[e].field == 0 ? 0 : edits[e].field == 1
                              ? tok_record(tb, 259) + 4 : tok_record(tb, 260);
        put32(b + at, edits[e].value);
        char what[64];
        snprintf(what, sizeof what, "field %d = %d", edits[e].field, edits[e].value);
        expect_bpe(ctx, b, len, V, edits[e].msg, what);
    }
    /* random damage: refused, or a tokenizer whose ids stay in range */
    rng r = rng_seed(81);
    int ok = 0, rounds = t_quick ? 200 : 1000;
    for (int round = 0; round < rounds; round++) {
        memcpy(b, tb, len);
        for (int h = (int)rng_int(&r, 1, 4); h > 0; h--)
            b[rng_int(&r, 0, (int64_t)len - 1)] = (unsigned char)rng_u64(&r);
        qkv__bpe t;
        qkv_status s = qkv__bpe_parse(ctx, b, len, V, "tok.bin", &t);
        CHECK(s == QKV_OK || s == QKV_ERR_FORMAT, "damaged tokenizer: status %d", s);
        if (s != QKV_OK)
            continue;
        ok++;
        int32_t *ids;
        int64_t n;
        if (qkv__bpe_encode(ctx, &t, "hello abc \xff\xfe", 13, 1, &ids, &n) == QKV_OK) {
            int in = 1;
            for (int64_t i = 0; i < n; i++)
                in &= ids[i] >= 0 && ids[i] < V;
            CHECK(in, "damaged tokenizer gave an id out of range");
            free(ids);
        }
        qkv__bpe_free(&t);
    }
    t_note("%d of %d damaged tokenizers still well-formed", ok, rounds);
    free(b);

    /* through the model loader: stories260K with tokenizers of other sizes */
    char sdir[4096];
    if (stories_dir(sdir, sizeof sdir)) {
        char model[4300], tok[4300], tmp[] = "/tmp/qkv_tok_XXXXXX";
        snprintf(model, sizeof model, "%s/stories260K.bin", sdir);
        CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
        snprintf(tok, sizeof tok, "%s/tok.bin", tmp);
        t_write_file(tok, tb, len);
        qkv_model *m = (qkv_model *)1;
        qkv_status s = qkv_model_load_llama(ctx, model, tok, &m);
        CHECK(s == QKV_ERR_FORMAT && !m && strstr(qkv_ctx_last_error(ctx), "vocab_size") &&
              strstr(qkv_ctx_last_error(ctx), "tok.bin"),
              "300-token tokenizer for a 512-token model: %d '%s'", s, qkv_ctx_last_error(ctx));
        unsigned char *big = make_tok(600, 0, &len);
        t_write_file(tok, big, len);
        free(big);
        s = qkv_model_load_llama(ctx, model, tok, &m);
        CHECK(s == QKV_ERR_FORMAT && strstr(qkv_ctx_last_error(ctx), "follow the 512 tokens"),
              "600-token tokenizer: %d '%s'", s, qkv_ctx_last_error(ctx));
        remove(tok);
        s = qkv_model_load_llama(ctx, model, tok, &m);
        CHECK(s == QKV_ERR_IO && strstr(qkv_ctx_last_error(ctx), "tok.bin"),
              "missing tokenizer: %d '%s'", s, qkv_ctx_last_error(ctx));
        /* a checkpoint with no tokenizer beside it */
        char copy[4300];
        snprintf(copy, sizeof copy, "%s/model.bin", tmp);
        size_t ml;
        unsigned char *mb = (unsigned char *)t_read_file(model, &ml);
        t_write_file(copy, mb, ml);
        free(mb);
        s = qkv_model_load(ctx, copy, &m);
        CHECK(s == QKV_ERR_IO && strstr(qkv_ctx_last_error(ctx), "no tokenizer"),
              "no tokenizer beside: %d '%s'", s, qkv_ctx_last_error(ctx));
        remove_dir(tmp);
    }
    free(tb);
    qkv_ctx_free(ctx);
}

static void expect_l2c(qkv_ctx *ctx, const unsigned char *b, size_t len, qkv_status want,
                       const char *msg, const char *what)
{
    qkv__llama m;
    qkv_status s = qkv__llama_parse_l2c(ctx, b, len, "model.bin", &m);
    CHECK(s == want && strstr(qkv_ctx_last_error(ctx), msg) &&
          strstr(qkv_ctx_last_error(ctx), "model.bin"),
          "%s: status %d (want %d), message '%s' (want '%s')", what, s, want,
          qkv_ctx_last_error(ctx), msg);
    if (s == QKV_OK)
        qkv__llama_release(&m);
}

void test_llama_checkpoint_bad(void)
{
    qkv_ctx *ctx = qkv_ctx_create(1);
    const dims d = { 16, 24, 2, 4, 2, 300, 32, 1 };
    size_t len;
    unsigned char *cb = make_l2c(&d, 5, &len);
    unsigned char *b = xmalloc(len + 8);
    qkv__llama m;
    qkv_status s = qkv__llama_parse_l2c(ctx, cb, len, "model.bin", &m);
    CHECK(s == QKV_OK && m.D == 16 && m.hs == 4 && m.V == 300 && m.shared_cls,
          "synthetic checkpoint: %s", qkv_ctx_last_error(ctx));
    if (s == QKV_OK)
        qkv__llama_release(&m);
    /* every truncation, and bytes beyond the layout */
    int refused = 0;
    for (size_t cut = 0; cut < len; cut++) {
        memcpy(b, cb, cut);
        s = qkv__llama_parse_l2c(ctx, b, cut, "model.bin", &m);
        refused += s == QKV_ERR_FORMAT;
        if (s == QKV_OK)
            qkv__llama_release(&m);
    }
    CHECK(refused == (int)len, "%d of %zu truncations refused", refused, len);
    memcpy(b, cb, len);
    memset(b + len, 0, 8);
    expect_l2c(ctx, b, len + 4, QKV_ERR_FORMAT, "needs exactly", "4 bytes more");
    expect_l2c(ctx, b, 27, QKV_ERR_FORMAT, "28-byte", "27 bytes");
    /* header fields: out of range, inconsistent, or not matching the size */
    static const struct { int field; int32_t value; const char *msg; } edits[] = {
        { 0, 0, "dim" }, { 0, -16, "dim" }, { 0, 0x7fffffff, "dim" }, { 0, 18, "multiple" },
        { 0, 12, "odd" }, { 0, 32, "needs exactly" },
        { 1, 0, "hidden_dim" }, { 1, -1, "hidden_dim" }, { 1, 25, "needs exactly" },
        { 2, 0, "n_layers" }, { 2, 1 << 20, "n_layers" }, { 2, 3, "needs exactly" },
        { 3, 0, "n_heads" }, { 3, 3, "multiple" }, { 3, -4, "n_heads" },
        { 4, 0, "n_kv_heads" }, { 4, 3, "multiple" }, { 4, 4, "needs exactly" },
        { 4, 2000, "n_kv_heads" },
        { 5, 0, "vocab_size" }, { 5, 2, "vocab_size" }, { 5, -300, "separate" },
        { 5, 301, "needs exactly" }, { 5, (int32_t)0x80000000, "vocab_size" },
        { 6, 0, "seq_len" }, { 6, 33, "needs exactly" }, { 6, -32, "seq_len" },
    };
    for (size_t e = 0; e < sizeof edits / sizeof edits[0]; e++) {
        memcpy(b, cb, len);
        put32(b + 4 * edits[e].field, edits[e].value);
        char what[64];
        snprintf(what, sizeof what, "header field %d = %d", edits[e].field, edits[e].value);
        expect_l2c(ctx, b, len, QKV_ERR_FORMAT, edits[e].msg, what);
    }
    memcpy(b, cb, len);
    memcpy(b, "24ka", 4);   /* the 'ak42' magic of the version 1 and 2 exports */
    put32(b + 4, 2);
    expect_l2c(ctx, b, len, QKV_ERR_UNSUPPORTED, "version 2", "version 2 export");
    /* random header damage: refused, or consistent with the file size */
    rng r = rng_seed(91);
    int ok = 0, rounds = t_quick ? 300 : 2000;
    for (int round = 0; round < rounds; round++) {
        memcpy(b, cb, len);
        b[rng_int(&r, 0, 27)] ^= (unsigned char)(1u << rng_int(&r, 0, 7));
        s = qkv__llama_parse_l2c(ctx, b, len, "model.bin", &m);
        CHECK(s == QKV_OK || s == QKV_ERR_FORMAT || s == QKV_ERR_UNSUPPORTED,
              "damaged header: status %d", s);
        if (s == QKV_OK) {
            ok++;
            qkv__llama_release(&m);
        }
    }
    t_note("%d of %d one-bit header damages still parse (a layout of the same size)", ok,
           rounds);
    free(b);
    free(cb);

    /* the real checkpoint, cut at each kind of place, through the loader */
    char sdir[4096];
    if (stories_dir(sdir, sizeof sdir)) {
        char model[4300], tmp[] = "/tmp/qkv_ckpt_XXXXXX", copy[4300], tok[4300];
        snprintf(model, sizeof model, "%s/stories260K.bin", sdir);
        CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
        snprintf(copy, sizeof copy, "%s/model.bin", tmp);
        snprintf(tok, sizeof tok, "%s/tokenizer.bin", tmp);
        size_t ml, tl;
        unsigned char *mb = (unsigned char *)t_read_file(model, &ml);
        snprintf(model, sizeof model, "%s/tok512.bin", sdir);
        unsigned char *tk = (unsigned char *)t_read_file(model, &tl);
        t_write_file(tok, tk, tl);
        const size_t cuts[] = { 0, 4, 27, 28, 29, 1000, ml / 2, ml - 4, ml - 1 };
        for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
            t_write_file(copy, mb, cuts[i]);
            qkv_model *mm = (qkv_model *)1;
            s = qkv_model_load(ctx, copy, &mm);
            CHECK(s == QKV_ERR_FORMAT && !mm && strstr(qkv_ctx_last_error(ctx), "model.bin"),
                  "stories260K cut to %zu bytes: %d '%s'", cuts[i], s, qkv_ctx_last_error(ctx));
        }
        unsigned char *longer = xmalloc(ml + 4);
        memcpy(longer, mb, ml);
        memset(longer + ml, 0, 4);
        t_write_file(copy, longer, ml + 4);
        qkv_model *mm = NULL;
        s = qkv_model_load(ctx, copy, &mm);
        CHECK(s == QKV_ERR_FORMAT && strstr(qkv_ctx_last_error(ctx), "needs exactly 1056540"),
              "stories260K + 4 bytes: %d '%s'", s, qkv_ctx_last_error(ctx));
        /* a tokenizer cut short, beside a good checkpoint */
        t_write_file(copy, mb, ml);
        t_write_file(tok, tk, tl - 3);
        s = qkv_model_load(ctx, copy, &mm);
        CHECK(s == QKV_ERR_FORMAT && strstr(qkv_ctx_last_error(ctx), "tokenizer.bin"),
              "tokenizer cut by 3 bytes: %d '%s'", s, qkv_ctx_last_error(ctx));
        t_write_file(tok, tk, tl);
        s = qkv_model_load(ctx, copy, &mm);
        CHECK(s == QKV_OK && !strcmp(qkv_model_type(mm), "llama") && qkv_model_dim(mm) == 512 &&
              qkv_model_max_tokens(mm) == 512, "the copy loads: %s", qkv_ctx_last_error(ctx));
        qkv_model_free(mm);
        free(longer);
        free(mb);
        free(tk);
        remove_dir(tmp);
    }
    qkv_model *mm = NULL;
    s = qkv_model_load(ctx, "/nonexistent/qkv/model.bin", &mm);
    CHECK(s == QKV_ERR_IO, "missing file: %d", s);
    qkv_ctx_free(ctx);
}

/* ---- logits against the float64 forward -------------------------------------------- */

/* A prompt of ids[0 .. P) as one sequence, then ids[P .. end) one per step:
   the logits of each step against ref (all positions of ids); returns the
   largest difference, counting the positions checked in *checked. */
static double check_run(qkv_ctx *ctx, const qkv_model *m, const qkv_gen_opts *go,
                        const int32_t *ids, int64_t P, int64_t end, const double *ref,
                        const char *what, int64_t *checked)
{
    const int64_t V = qkv_model_dim(m);
    qkv_gen *g = NULL;
    qkv_status s = qkv_gen_create(ctx, m, go, &g);
    CHECK(s == QKV_OK, "%s: gen_create: %s", what, qkv_ctx_last_error(ctx));
    if (s != QKV_OK)
        return INFINITY;
    int32_t seq;
    double worst = 0.0;
    s = qkv_gen_add(g, ids, P, &seq);
    for (int64_t p = P - 1; s == QKV_OK && p < end; p++) {
        if (p >= P && (s = qkv_gen_feed(g, seq, &ids[p], 1)) != QKV_OK)
            break;
        if ((s = qkv_gen_step(g)) != QKV_OK)
            break;
        const double e = max_diff(qkv_gen_logits(g, seq), ref + p * V, V);
        worst = fmax(worst, e);
        (*checked)++;
        if (!(e <= 1e-4))
            CHECK(0, "%s: position %lld: logits differ by %.3g from the float64 forward", what,
                  (long long)p, e);
    }
    CHECK(s == QKV_OK, "%s: %s", what, qkv_ctx_last_error(ctx));
    CHECK(qkv_gen_length(g, seq) == end, "%s: %lld positions cached, want %lld", what,
          (long long)qkv_gen_length(g, seq), (long long)end);
    qkv_gen_stats st;
    qkv_gen_get_stats(g, &st);
    CHECK(st.prefill_tokens + st.decode_tokens == end,
          "%s: %lld + %lld tokens run for %lld positions (a prefix recomputed?)", what,
          (long long)st.prefill_tokens, (long long)st.decode_tokens, (long long)end);
    qkv_gen_free(g);
    return worst;
}

void test_llama_logits(void)
{
    char dir[4096];
    if (!stories_dir(dir, sizeof dir))
        return;
    char path[4300];
    snprintf(path, sizeof path, "%s/stories260K.bin", dir);
    size_t len;
    unsigned char *ck = (unsigned char *)t_read_file(path, &len);
    ref_model r;
    ref_load(&r, ck);
    free(ck);
    qkv_ctx *ctx = qkv_ctx_create(2);
    qkv_model *m = load_stories(ctx, dir);
    if (!m) {
        ref_free(&r);
        qkv_ctx_free(ctx);
        return;
    }
    const int64_t V = 512, S = 512;
    /* a story the model writes (greedy, to the whole context), and random ids */
    int32_t prompt[5] = { 1, 403, 407, 261, 378 }, *story = xmalloc(S * sizeof(int32_t) + 8);
    qkv_gen_opts go = qkv_gen_opts_default();
    const int64_t steps = t_quick ? 160 : S;
    int64_t n = run_alone(ctx, m, &go, prompt, 5, steps, NULL, story, NULL);
    if (n < steps)   /* a BOS stop: go on with the ids the model would not choose */
        for (rng rr = rng_seed(3); n < steps; n++)
            story[n] = (int32_t)rng_int(&rr, 3, V - 1);
    int32_t rnd[96];
    rng rr = rng_seed(4);
    rnd[0] = 1;
    for (int i = 1; i < 96; i++)
        rnd[i] = (int32_t)rng_int(&rr, 0, V - 1);
    double *ref_story = ref_all(&r, story, steps), *ref_rnd = ref_all(&r, rnd, 96);
    double worst = 0.0;
    int64_t checked = 0;
    /* prefill at many lengths, then decode; one run to the end of the context */
    static const int64_t prompts[] = { 1, 2, 3, 7, 16, 17, 64, 100, 150 };
    for (size_t i = 0; i < sizeof prompts / sizeof prompts[0]; i++) {
        const int64_t P = prompts[i], end = i == 0 ? steps : P + 12 < steps ? P + 12 : steps;
        char what[64];
        snprintf(what, sizeof what, "story, prompt of %lld", (long long)P);
        worst = fmax(worst, check_run(ctx, m, &go, story, P, end, ref_story, what, &checked));
    }
    worst = fmax(worst, check_run(ctx, m, &go, rnd, 40, 96, ref_rnd, "random ids", &checked));
    /* block sizes and one thread */
    static const int64_t blocks[] = { 8, 64, 256 };
    for (size_t i = 0; i < sizeof blocks / sizeof blocks[0]; i++) {
        qkv_gen_opts o = go;
        o.block_size = blocks[i];
        char what[64];
        snprintf(what, sizeof what, "blocks of %lld", (long long)blocks[i]);
        worst = fmax(worst, check_run(ctx, m, &o, story, 20, 70, ref_story, what, &checked));
    }
    qkv_ctx *one = qkv_ctx_create(1);
    worst = fmax(worst, check_run(one, m, &go, story, 9, 40, ref_story, "1 thread", &checked));
    /* chunked prefill: more tokens on top of cached ones, in one step */
    {
        qkv_gen *g = NULL;
        int32_t seq;
        qkv_status s = qkv_gen_create(ctx, m, &go, &g);
        static const int64_t cut[] = { 10, 17, 50, 51, 90 };
        if (s == QKV_OK)
            s = qkv_gen_add(g, story, cut[0], &seq);
        for (size_t c = 0; s == QKV_OK && c < sizeof cut / sizeof cut[0]; c++) {
            if (c > 0)
                s = qkv_gen_feed(g, seq, story + cut[c - 1], cut[c] - cut[c - 1]);
            if (s == QKV_OK && (s = qkv_gen_step(g)) == QKV_OK) {
                const double e = max_diff(qkv_gen_logits(g, seq), ref_story + (cut[c] - 1) * V, V);
                worst = fmax(worst, e);
                checked++;
                CHECK(e <= 1e-4, "chunk ending at %lld: logits differ by %.3g", (long long)cut[c], e);
            }
        }
        CHECK(s == QKV_OK, "chunked prefill: %s", qkv_ctx_last_error(ctx));
        qkv_gen_free(g);
    }
    /* several sequences in one generator, in the same steps */
    {
        qkv_gen_opts o = go;
        o.max_seqs = 4;
        qkv_gen *g = NULL;
        qkv_status s = qkv_gen_create(ctx, m, &o, &g);
        const int32_t *src[4] = { story, rnd, story, rnd };
        const double *ref[4] = { ref_story, ref_rnd, ref_story, ref_rnd };
        const int64_t P[4] = { 5, 1, 30, 12 }, end[4] = { 60, 50, 45, 96 };
        int32_t seq[4];
        for (int i = 0; s == QKV_OK && i < 4; i++)
            s = qkv_gen_add(g, src[i], P[i], &seq[i]);
        for (int64_t k = 0; s == QKV_OK && k < 96; k++) {
            if ((s = qkv_gen_step(g)) != QKV_OK)
                break;
            for (int i = 0; i < 4; i++) {
                const int64_t p = P[i] - 1 + k;
                if (p >= end[i])
                    continue;
                const double e = max_diff(qkv_gen_logits(g, seq[i]), ref[i] + p * V, V);
                worst = fmax(worst, e);
                checked++;
                CHECK(e <= 1e-4, "batched sequence %d, position %lld: differ by %.3g", i,
                      (long long)p, e);
                if (p + 1 < end[i])
                    s = qkv_gen_feed(g, seq[i], &src[i][p + 1], 1);
            }
        }
        CHECK(s == QKV_OK, "batched: %s", qkv_ctx_last_error(ctx));
        qkv_gen_free(g);
    }
    t_note("logits at %lld positions within %.2g of the float64 forward (tolerance 1e-4)",
           (long long)checked, worst);
    /* caches of other element types: further, but the same text */
    static const qkv_kv_dtype kv[] = { QKV_KV_F16, QKV_KV_BF16, QKV_KV_I8 };
    static const char *const kv_name[] = { "f16", "bf16", "i8" };
    /* int8 rows of 8 values are off by up to 1/254 of their largest */
    static const double kv_tol[] = { 3e-2, 3e-1, 1.5 };
    for (int i = 0; i < 3; i++) {
        qkv_gen_opts o = go;
        o.kv_dtype = kv[i];
        int32_t *ids = xmalloc(S * sizeof(int32_t) + 8);
        float *lg = xmalloc((size_t)(80 * V) * sizeof(float));
        int64_t rows;
        const int64_t k = run_alone_rows(ctx, m, &o, prompt, 5, 80, NULL, ids, lg, &rows);
        double e = 0;
        for (int64_t p = 0; p < rows; p++)
            e = fmax(e, max_diff(lg + p * V, ref_story + (4 + p) * V, V));
        int agree = 0;
        while (agree < k && ids[agree] == story[agree])
            agree++;
        t_note("%s KV cache: logits within %.2g of float64 over %lld positions, greedy ids "
               "equal to the fp32 cache's for %d of %lld", kv_name[i], e, (long long)rows,
               agree, (long long)k);
        CHECK(e < kv_tol[i], "%s KV cache: logits differ by %.3g", kv_name[i], e);
        CHECK(i > 0 || agree == k, "f16 KV cache: the greedy text differs from position %d",
              agree);
        free(ids);
        free(lg);
    }
    free(ref_story);
    free(ref_rnd);
    free(story);
    ref_free(&r);
    qkv_model_free(m);
    qkv_ctx_free(one);
    qkv_ctx_free(ctx);
}

/* ---- greedy generations against the golden file -------------------------------------- */

void test_llama_golden(void)
{
    char dir[4096];
    if (!stories_dir(dir, sizeof dir))
        return;
    cJSON *gold = read_golden();
    if (!gold)
        return;
    qkv_ctx *ctx = qkv_ctx_create(2);
    qkv_model *m = load_stories(ctx, dir);
    const cJSON *cases = cJSON_GetObjectItem(gold, "generate");
    const int n_cases = cJSON_GetArraySize(cases);
    const int64_t V = 512;
    int equal = 0, texts = 0, n_logits = 0;
    double worst = 0.0;
    qkv_gen_opts go = qkv_gen_opts_default();
    for (int c = 0; m && c < n_cases; c++) {
        const cJSON *cs = cJSON_GetArrayItem(cases, c);
        const char *prompt = cJSON_GetObjectItem(cs, "prompt")->valuestring;
        const char *gtext = cJSON_GetObjectItem(cs, "text")->valuestring;
        const int64_t steps = (int64_t)cJSON_GetObjectItem(cs, "steps")->valuedouble;
        const double margin = cJSON_GetObjectItem(cs, "min_margin")->valuedouble;
        int64_t nw, P;
        int32_t *want = json_ids(cJSON_GetObjectItem(cs, "ids"), &nw);
        int32_t *ids = xmalloc((size_t)(steps + strlen(prompt) + 8) * sizeof *ids);
        qkv_status s = qkv_model_tokenize(ctx, m, prompt, ids, steps + 1, &P);
        CHECK(s == QKV_OK && P <= nw && same_ids(ids, P, want, P),
              "golden %d ('%s'): prompt ids differ", c, prompt);
        float *lg = xmalloc((size_t)((steps + 1) * V) * sizeof(float));
        int64_t rows;
        const int64_t n = run_alone_rows(ctx, m, &go, want, P, steps, NULL, ids, lg, &rows);
        const int same = same_ids(ids, n, want, nw);
        equal += same;
        if (!same) {
            int64_t k = 0;
            while (k < n && k < nw && ids[k] == want[k])
                k++;
            CHECK(0, "golden %d ('%s', %lld steps): ids differ from position %lld (%lld vs %lld "
                  "ids)", c, prompt, (long long)steps, (long long)k, (long long)n, (long long)nw);
        }
        /* the text: the prompt as given, then each generated piece */
        char *text = xmalloc((size_t)(strlen(prompt) + 8 * (n + 1) + 1));
        size_t tl = strlen(prompt);
        memcpy(text, prompt, tl);
        for (int64_t i = P; i < n; i++) {
            int64_t k;
            const char *p = qkv_model_piece(m, ids[i - 1], ids[i], &k);
            memcpy(text + tl, p, (size_t)k);
            tl += (size_t)k;
        }
        text[tl] = '\0';
        if (strstr(gtext, "\xef\xbf\xbd")) {
            t_note("golden %d: its text has replacement characters; ids compared only", c);
        } else {
            texts += !strcmp(text, gtext);
            CHECK(!strcmp(text, gtext), "golden %d: the text differs", c);
        }
        /* next-token logits where the file has them */
        const cJSON *gl = cJSON_GetObjectItem(cs, "logits"), *e;
        cJSON_ArrayForEach(e, gl) {
            const int64_t pos = (int64_t)cJSON_GetObjectItem(e, "pos")->valuedouble;
            const cJSON *vals = cJSON_GetObjectItem(e, "values");
            float got[512];
            if (pos >= P - 1 && pos - (P - 1) < rows) {
                memcpy(got, lg + (pos - (P - 1)) * V, sizeof got);
            } else {   /* inside the prompt: a prefill up to pos */
                qkv_gen *g = NULL;
                int32_t seq;
                if (qkv_gen_create(ctx, m, &go, &g) != QKV_OK ||
                    qkv_gen_add(g, want, pos + 1, &seq) != QKV_OK || qkv_gen_step(g) != QKV_OK) {
                    CHECK(0, "golden %d: prefill to %lld: %s", c, (long long)pos,
                          qkv_ctx_last_error(ctx));
                    qkv_gen_free(g);
                    continue;
                }
                memcpy(got, qkv_gen_logits(g, seq), sizeof got);
                qkv_gen_free(g);
            }
            double d = 0;
            for (int i = 0; i < 512; i++)
                d = fmax(d, fabs((double)got[i] - cJSON_GetArrayItem(vals, i)->valuedouble));
            worst = fmax(worst, d);
            n_logits++;
            CHECK(d <= 1e-4, "golden %d, position %lld: logits differ by %.3g", c, (long long)pos,
                  d);
        }
        if (margin < 1e-3)
            t_note("golden %d ('%s'): its smallest top-1 margin is %.2g, within reach of fp32 "
                   "rounding; the ids %s all the same", c, prompt, margin,
                   same ? "agree" : "do not agree");
        free(text);
        free(lg);
        free(ids);
        free(want);
    }
    t_note("golden generations: %d/%d id sequences and %d texts equal to transformers' Llama "
           "(float64); %d logit rows within %.2g", equal, n_cases, texts, n_logits, worst);
    qkv_model_free(m);
    cJSON_Delete(gold);
    qkv_ctx_free(ctx);
}

/* ---- batched generation equals one-by-one ------------------------------------------ */

enum { NB = 6 };

typedef struct {
    int32_t ids[600];
    int64_t P, n, steps, k;      /* prompt, ids so far, -n, steps taken */
    float  *logits;              /* [steps][V] of each step */
    qkv_sampler_opts so;
} bseq;

/* Generates every sequence of b[] in one generator of max_seqs sequences
   and a pool of `positions`, adding each when a slot is free (continuous
   batching); fills ids, n and logits. Returns the blocks handed out. */
static int64_t run_batched(qkv_ctx *ctx, const qkv_model *m, bseq *b, int nb, int64_t max_seqs,
                           int64_t positions)
{
    const int64_t V = qkv_model_dim(m);
    qkv_gen_opts o = qkv_gen_opts_default();
    o.max_seqs = max_seqs;
    o.max_positions = positions;
    qkv_gen *g = NULL;
    qkv_status s = qkv_gen_create(ctx, m, &o, &g);
    qkv_sampler *smp[NB] = { 0 };
    int32_t seq[NB];
    int state[NB] = { 0 }, next = 0, active = 0, done = 0;
    int64_t handed = 0;
    for (int i = 0; s == QKV_OK && i < nb; i++) {
        s = qkv_sampler_create(ctx, &b[i].so, &smp[i]);
        b[i].n = b[i].P;
        b[i].k = 0;
    }
    while (s == QKV_OK && done < nb) {
        while (active < max_seqs && next < nb) {
            if ((s = qkv_gen_add(g, b[next].ids, b[next].P, &seq[next])) != QKV_OK)
                break;
            state[next++] = 1;
            active++;
        }
        if (s != QKV_OK || (s = qkv_gen_step(g)) != QKV_OK)
            break;
        for (int i = 0; s == QKV_OK && i < nb; i++) {
            if (state[i] != 1)
                continue;
            bseq *q = &b[i];
            const float *lg = qkv_gen_logits(g, seq[i]);
            memcpy(q->logits + q->k++ * V, lg, (size_t)V * sizeof(float));
            int32_t t;
            s = qkv_sampler_sample(ctx, smp[i], lg, V, &t);
            int end = s != QKV_OK || t == 1;
            if (!end) {
                q->ids[q->n++] = t;
                end = qkv_gen_length(g, seq[i]) >= q->steps;
                if (!end)
                    s = qkv_gen_feed(g, seq[i], &t, 1);
            }
            if (end) {
                handed += (qkv_gen_length(g, seq[i]) + 15) / 16;
                qkv_gen_remove(g, seq[i]);
                state[i] = 2;
                active--;
                done++;
            }
        }
    }
    CHECK(s == QKV_OK, "batched generation: %s", qkv_ctx_last_error(ctx));
    CHECK(qkv_gen_free_positions(g) >= positions, "blocks not all returned: %lld free of %lld",
          (long long)qkv_gen_free_positions(g), (long long)positions);
    for (int i = 0; i < nb; i++)
        qkv_sampler_free(smp[i]);
    qkv_gen_free(g);
    return handed;
}

void test_llama_batched(void)
{
    char dir[4096];
    if (!stories_dir(dir, sizeof dir))
        return;
    qkv_ctx *ctx = qkv_ctx_create(2);
    qkv_model *m = load_stories(ctx, dir);
    if (!m) {
        qkv_ctx_free(ctx);
        return;
    }
    const int64_t V = 512;
    static const char *const prompts[NB] = {
        "Once upon a time", "Lily and Tom went to the park. They saw a big dog and",
        "The", "One day, a little bird", "Sam had a red ball. He liked to play with it every day.",
        "Mom said" };
    static const int64_t steps[NB] = { 60, 90, 160, 70, 120, 50 };
    bseq alone[NB], batch[NB];
    for (int i = 0; i < NB; i++) {
        bseq *a = &alone[i];
        qkv_model_tokenize(ctx, m, prompts[i], a->ids, 600, &a->P);
        a->steps = steps[i];
        a->so = qkv_sampler_opts_default();
        if (i % 3 == 0) {           /* greedy */
            a->so.temperature = 0.0f;
        } else {                    /* sampled: top-p, or top-k */
            a->so.temperature = 0.9f;
            a->so.seed = 1000 + (uint64_t)i;
            if (i % 3 == 1)
                a->so.top_p = 0.9f;
            else
                a->so.top_k = 20;
        }
        a->logits = xmalloc((size_t)(steps[i] * V) * sizeof(float));
        /* alone: a generator of its own */
        int64_t handed = run_batched(ctx, m, a, 1, 1, 0);
        (void)handed;
    }
    /* together: three at a time in a pool of 512 positions (32 blocks), on
       1, 2 and 3 threads */
    for (int threads = 1; threads <= 3; threads++) {
        qkv_ctx *c = qkv_ctx_create(threads);
        for (int i = 0; i < NB; i++) {
            batch[i] = alone[i];
            batch[i].n = batch[i].P;
            batch[i].logits = xmalloc((size_t)(steps[i] * V) * sizeof(float));
        }
        const int64_t handed = run_batched(c, m, batch, NB, 3, 512);
        int same_ids = 1, same_logits = 1;
        for (int i = 0; i < NB; i++) {
            const int ok_ids = batch[i].n == alone[i].n &&
                               !memcmp(batch[i].ids, alone[i].ids, (size_t)alone[i].n * 4);
            const int ok_lg = batch[i].k == alone[i].k &&
                              !memcmp(batch[i].logits, alone[i].logits,
                                      (size_t)(alone[i].k * V) * sizeof(float));
            CHECK(ok_ids && ok_lg, "%d threads, sequence %d: batched %s differ from alone "
                  "(%lld vs %lld ids)", threads, i, ok_ids ? "logits" : "ids",
                  (long long)batch[i].n, (long long)alone[i].n);
            same_ids &= ok_ids;
            same_logits &= ok_lg;
            free(batch[i].logits);
        }
        CHECK(handed > 32, "the pool's blocks were not reused (%lld handed out)",
              (long long)handed);
        if (threads == 2)
            t_note("6 sequences (%lld..%lld positions, greedy, top-p and top-k sampling), 3 at "
                   "a time in 32 blocks (%lld handed out): ids %s, logits %s bitwise",
                   (long long)steps[5], (long long)steps[2], (long long)handed,
                   same_ids ? "equal" : "DIFFER", same_logits ? "equal" : "DIFFER");
        qkv_ctx_free(c);
    }
    int64_t lens[NB];
    for (int i = 0; i < NB; i++)
        lens[i] = alone[i].n;
    t_note("finished at %lld, %lld, %lld, %lld, %lld and %lld ids", (long long)lens[0],
           (long long)lens[1], (long long)lens[2], (long long)lens[3], (long long)lens[4],
           (long long)lens[5]);

    /* a pool too small for a step: refused, nothing changed, then it runs */
    qkv_gen_opts o = qkv_gen_opts_default();
    o.max_seqs = 2;
    o.max_positions = 512;
    qkv_gen *g = NULL;
    qkv_status s = qkv_gen_create(ctx, m, &o, &g);
    int32_t *ids = xmalloc(300 * sizeof(int32_t)), a, b;
    for (int i = 0; i < 300; i++)
        ids[i] = alone[2].ids[i % alone[2].n];
    if (s == QKV_OK)
        s = qkv_gen_add(g, ids, 300, &a);
    if (s == QKV_OK)
        s = qkv_gen_add(g, ids, 300, &b);
    CHECK(s == QKV_OK, "add: %s", qkv_ctx_last_error(ctx));
    s = qkv_gen_step(g);
    CHECK(s == QKV_ERR_NOMEM && strstr(qkv_ctx_last_error(ctx), "free blocks") &&
          qkv_gen_length(g, a) == 0 && !qkv_gen_logits(g, a) &&
          qkv_gen_free_positions(g) == 512, "pool too small: %d '%s'", s,
          qkv_ctx_last_error(ctx));
    qkv_gen_remove(g, b);
    s = qkv_gen_step(g);
    CHECK(s == QKV_OK && qkv_gen_length(g, a) == 300 && qkv_gen_logits(g, a),
          "after removing one: %s", qkv_ctx_last_error(ctx));
    free(ids);
    qkv_gen_free(g);
    for (int i = 0; i < NB; i++)
        free(alone[i].logits);
    qkv_model_free(m);
    qkv_ctx_free(ctx);
}

/* ---- the sampler -------------------------------------------------------------------- */

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Draws N tokens from logits with opts and checks their frequencies against
   the probabilities want[] (a chi-square over the tokens with want > 0;
   tokens with want 0 must never come). */
static void check_freq(qkv_ctx *ctx, const qkv_sampler_opts *o, const float *logits, int n,
                       const double *want, const char *what)
{
    const int N = t_quick ? 40000 : 200000;
    qkv_sampler *s = NULL;
    qkv_sampler_create(ctx, o, &s);
    int64_t cnt[16] = { 0 };
    int errors = 0;
    for (int i = 0; i < N; i++) {
        int32_t t;
        if (qkv_sampler_sample(ctx, s, logits, n, &t) != QKV_OK || t < 0 || t >= n)
            errors++;
        else
            cnt[t]++;
    }
    double chi = 0;
    int df = -1, outside = 0;
    for (int i = 0; i < n; i++) {
        if (want[i] == 0) {
            outside += cnt[i] != 0;
            continue;
        }
        const double e = want[i] * N;
        chi += (cnt[i] - e) * (cnt[i] - e) / e;
        df++;
    }
    /* the 1e-5 quantile of chi-square is below 30 for df <= 7 */
    CHECK(errors == 0 && outside == 0 && chi < 30.0,
          "%s: chi-square %.1f (df %d), %d tokens drawn that should not be", what, chi, df,
          outside);
    t_note("sampler %s: chi-square %.1f with %d degrees of freedom over %d draws", what, chi, df, N);
    qkv_sampler_free(s);
}

void test_llama_sampler(void)
{
    qkv_ctx *ctx = qkv_ctx_create(1);
    const float lg[8] = { 1.0f, 2.0f, 0.5f, -1.0f, 2.0f, 0.0f, 1.5f, -INFINITY };
    qkv_sampler_opts o = qkv_sampler_opts_default();
    qkv_sampler *s = NULL;
    int32_t t = -1;
    /* greedy: temperature 0, top_k 1, a tiny top_p: the first largest */
    const float temps[3] = { 0.0f, 1.0f, 1.0f };
    const int64_t ks[3] = { 0, 1, 0 };
    const float ps[3] = { 1.0f, 1.0f, 1e-6f };
    for (int c = 0; c < 3; c++) {
        o = qkv_sampler_opts_default();
        o.temperature = temps[c];
        o.top_k = ks[c];
        o.top_p = ps[c];
        o.seed = 5;
        qkv_sampler_create(ctx, &o, &s);
        int all = 1;
        for (int i = 0; i < 200; i++)
            all &= qkv_sampler_sample(ctx, s, lg, 8, &t) == QKV_OK && t == 1;
        CHECK(all, "greedy case %d: not always token 1 (the first largest)", c);
        qkv_sampler_free(s);
    }
    /* the draws are SplitMix64's: with equal logits, token = floor(u·n) */
    o = qkv_sampler_opts_default();
    o.seed = 42;
    qkv_sampler_create(ctx, &o, &s);
    float flat[64] = { 0 };
    uint64_t x = 42;
    int match = 1;
    for (int i = 0; i < 1000; i++) {
        const double u = (double)(splitmix(&x) >> 11) * 0x1p-53;
        match &= qkv_sampler_sample(ctx, s, flat, 64, &t) == QKV_OK && t == (int32_t)(u * 64);
    }
    CHECK(match, "draws are not SplitMix64(seed 42)");
    qkv_sampler_free(s);
    /* a seed gives the same stream; another seed another */
    int32_t a[300], b[300], c[300];
    const uint64_t seeds[3] = { 7, 7, 8 };
    int32_t *out[3] = { a, b, c };
    for (int k = 0; k < 3; k++) {
        o = qkv_sampler_opts_default();
        o.temperature = 0.8f;
        o.top_p = 0.95f;
        o.seed = seeds[k];
        qkv_sampler_create(ctx, &o, &s);
        for (int i = 0; i < 300; i++)
            qkv_sampler_sample(ctx, s, lg, 8, &out[k][i]);
        qkv_sampler_free(s);
    }
    CHECK(!memcmp(a, b, sizeof a) && memcmp(a, c, sizeof a), "seeds: same stream for 7, "
          "another for 8");
    /* frequencies: softmax at temperature 1 and 0.5; top-k; top-p; both */
    double p[8], w[8];
    for (int k = 0; k < 5; k++) {
        o = qkv_sampler_opts_default();
        o.seed = 99 + (uint64_t)k;
        const char *what;
        double T = 1.0;
        int keep[8] = { 1, 1, 1, 1, 1, 1, 1, 0 };
        if (k == 1) {
            o.temperature = 0.5f;
            T = 0.5;
            what = "temperature 0.5";
        } else if (k == 2) {
            o.top_k = 3;   /* ids 1, 4 (2.0) and 6 (1.5) */
            for (int i = 0; i < 8; i++)
                keep[i] = i == 1 || i == 4 || i == 6;
            what = "top-k 3";
        } else if (k == 3) {
            /* by probability 1, 4, 6, 0, 2, 5, 3: 1 and 4 hold 0.59, with 6 0.77 */
            o.top_p = 0.6f;
            for (int i = 0; i < 8; i++)
                keep[i] = i == 1 || i == 4 || i == 6;
            what = "top-p 0.6";
        } else if (k == 4) {
            o.top_k = 5;   /* 1, 4, 6, 0, 2; then top-p 0.5 of those: 1, 4 */
            o.top_p = 0.5f;
            for (int i = 0; i < 8; i++)
                keep[i] = i == 1 || i == 4;
            what = "top-k 5 then top-p 0.5";
        } else {
            what = "temperature 1";
        }
        double sum = 0;
        for (int i = 0; i < 8; i++)
            sum += (p[i] = keep[i] ? exp(lg[i] / T) : 0.0);
        for (int i = 0; i < 8; i++)
            w[i] = p[i] / sum;
        check_freq(ctx, &o, lg, 8, w, what);
    }
    /* bad input */
    o = qkv_sampler_opts_default();
    qkv_sampler_create(ctx, &o, &s);
    float bad[4] = { 0.0f, NAN, 1.0f, 2.0f };
    qkv_status st = qkv_sampler_sample(ctx, s, bad, 4, &t);
    CHECK(st == QKV_ERR_ARG && strstr(qkv_ctx_last_error(ctx), "logits[1]"), "NaN: %d '%s'", st,
          qkv_ctx_last_error(ctx));
    bad[1] = INFINITY;
    CHECK(qkv_sampler_sample(ctx, s, bad, 4, &t) == QKV_ERR_ARG, "+inf logit");
    for (int i = 0; i < 4; i++)
        bad[i] = -INFINITY;
    st = qkv_sampler_sample(ctx, s, bad, 4, &t);
    CHECK(st == QKV_ERR_ARG && strstr(qkv_ctx_last_error(ctx), "-inf"), "all -inf: %d", st);
    CHECK(qkv_sampler_sample(ctx, s, lg, 0, &t) == QKV_ERR_SHAPE, "n = 0");
    CHECK(qkv_sampler_sample(ctx, s, NULL, 8, &t) == QKV_ERR_NULL, "NULL logits");
    CHECK(qkv_sampler_sample(ctx, NULL, lg, 8, &t) == QKV_ERR_NULL, "NULL sampler");
    qkv_sampler_free(s);
    qkv_sampler_free(NULL);
    const struct { float t; int64_t k; float p; const char *msg; } bad_opts[] = {
        { -1.0f, 0, 1.0f, "temperature" }, { NAN, 0, 1.0f, "temperature" },
        { INFINITY, 0, 1.0f, "temperature" }, { 1.0f, -1, 1.0f, "top_k" },
        { 1.0f, 0, 0.0f, "top_p" }, { 1.0f, 0, 1.5f, "top_p" }, { 1.0f, 0, NAN, "top_p" },
    };
    for (size_t i = 0; i < sizeof bad_opts / sizeof bad_opts[0]; i++) {
        o = qkv_sampler_opts_default();
        o.temperature = bad_opts[i].t;
        o.top_k = bad_opts[i].k;
        o.top_p = bad_opts[i].p;
        s = (qkv_sampler *)1;
        st = qkv_sampler_create(ctx, &o, &s);
        CHECK(st == QKV_ERR_ARG && !s && strstr(qkv_ctx_last_error(ctx), bad_opts[i].msg),
              "bad option %zu: %d '%s'", i, st, qkv_ctx_last_error(ctx));
    }
    qkv_ctx_free(ctx);
}

/* ---- the converter ------------------------------------------------------------------ */

/* Generation from two models gives bitwise the same logits and ids. */
static void same_generation(qkv_ctx *ctx, const qkv_model *a, const qkv_model *b,
                            const int32_t *prompt, int64_t P, int64_t steps, const char *what)
{
    const int64_t V = qkv_model_dim(a);
    qkv_gen_opts go = qkv_gen_opts_default();
    int32_t *ia = xmalloc((size_t)(steps + 1) * 4), *ib = xmalloc((size_t)(steps + 1) * 4);
    float *la = xmalloc((size_t)(steps * V) * 4), *lb = xmalloc((size_t)(steps * V) * 4);
    memset(la, 0, (size_t)(steps * V) * 4);
    memset(lb, 0, (size_t)(steps * V) * 4);
    int64_t ra, rb;
    const int64_t na = run_alone_rows(ctx, a, &go, prompt, P, steps, NULL, ia, la, &ra);
    const int64_t nb = run_alone_rows(ctx, b, &go, prompt, P, steps, NULL, ib, lb, &rb);
    CHECK(na == nb && ra == rb && !memcmp(ia, ib, (size_t)na * 4) &&
          !memcmp(la, lb, (size_t)(ra * V) * 4),
          "%s: generations differ (%lld vs %lld ids)", what, (long long)na, (long long)nb);
    free(ia); free(ib); free(la); free(lb);
}

/* Replaces the first `from` of dir/config.json by `to`, loads the folder
   and expects status want with msg in the message; restores the file. */
static void expect_config(qkv_ctx *ctx, const char *dir, const char *from, const char *to,
                          qkv_status want, const char *msg)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    size_t len;
    unsigned char *orig = (unsigned char *)t_read_file(path, &len);
    orig[len] = '\0';
    char *at = strstr((char *)orig, from);
    CHECK(at != NULL, "'%s' not in config.json", from);
    if (!at) {
        free(orig);
        return;
    }
    char *edit = xmalloc(len + strlen(to) + 1);
    snprintf(edit, len + strlen(to) + 1, "%.*s%s%s", (int)(at - (char *)orig), (char *)orig, to,
             at + strlen(from));
    t_write_file(path, edit, strlen(edit));
    qkv_model *m = (qkv_model *)1;
    qkv_status s = qkv_model_load(ctx, dir, &m);
    CHECK(s == want && (want == QKV_OK ? m != NULL : !m && strstr(qkv_ctx_last_error(ctx), msg)),
          "config '%s' -> '%s': status %d (want %d), '%s' (want '%s')", from, to, s, want,
          qkv_ctx_last_error(ctx), msg);
    if (s == QKV_OK)
        qkv_model_free(m);
    t_write_file(path, orig, len);
    free(orig);
    free(edit);
}

void test_llama_convert(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2);
    char tmp[] = "/tmp/qkv_hf_XXXXXX", tmp2[] = "/tmp/qkv_hf2_XXXXXX";
    CHECK(mkdtemp(tmp) && mkdtemp(tmp2), "mkdtemp");
    /* synthetic models: a separate classifier with one kv head (MQA), and
       plain multi-head attention; each against the float64 forward, and
       through a Hugging Face folder and back */
    const dims ds[2] = { { 32, 40, 2, 4, 1, 320, 64, 0 }, { 24, 36, 3, 3, 3, 320, 48, 1 } };
    for (int k = 0; k < 2; k++) {
        size_t cl, tl;
        unsigned char *cb = make_l2c(&ds[k], 11 + (uint64_t)k, &cl);
        unsigned char *tb = make_tok(320, 0, &tl);
        char mp[4300], tp[4300];
        snprintf(mp, sizeof mp, "%s/model.bin", tmp);
        snprintf(tp, sizeof tp, "%s/tokenizer.bin", tmp);
        t_write_file(mp, cb, cl);
        t_write_file(tp, tb, tl);
        qkv_model *a = NULL, *b = NULL;
        qkv_status s = qkv_model_load(ctx, mp, &a);
        CHECK(s == QKV_OK, "synthetic %d: %s", k, qkv_ctx_last_error(ctx));
        if (s == QKV_OK)
            s = qkv_model_export(ctx, a, tmp2);
        if (s == QKV_OK)
            s = qkv_model_load(ctx, tmp2, &b);
        CHECK(s == QKV_OK, "synthetic %d through a folder: %s", k, qkv_ctx_last_error(ctx));
        if (s == QKV_OK) {
            ref_model r;
            ref_load(&r, cb);
            int32_t ids[64];
            rng rr = rng_seed(12 + (uint64_t)k);
            for (int i = 0; i < ds[k].S; i++)
                ids[i] = i ? (int32_t)rng_int(&rr, 0, 319) : 1;
            double *ref = ref_all(&r, ids, ds[k].S);
            int64_t checked = 0;
            qkv_gen_opts go = qkv_gen_opts_default();
            const double e = fmax(check_run(ctx, a, &go, ids, 7, ds[k].S, ref, "synthetic",
                                            &checked),
                                  check_run(ctx, b, &go, ids, 7, ds[k].S, ref, "synthetic, hf",
                                            &checked));
            t_note("synthetic model %d (%s, %s classifier): logits within %.2g of float64 at "
                   "%lld positions", k, ds[k].Hkv == 1 ? "one kv head" : "as many kv heads as "
                   "query heads", ds[k].shared ? "shared" : "separate", e, (long long)checked);
            same_generation(ctx, a, b, ids, 3, ds[k].S, "synthetic, .bin vs folder");
            free(ref);
            ref_free(&r);
            char cfg[4300];
            snprintf(cfg, sizeof cfg, "%s/config.json", tmp2);
            size_t n;
            unsigned char *c = (unsigned char *)t_read_file(cfg, &n);
            c[n] = '\0';
            CHECK(strstr((char *)c, ds[k].shared ? "\"tie_word_embeddings\":\ttrue"
                                                  : "\"tie_word_embeddings\":\tfalse") != NULL,
                  "config.json's tie_word_embeddings");
            free(c);
        }
        qkv_model_free(a);
        qkv_model_free(b);
        free(cb);
        free(tb);
        remove_dir(tmp2);
        CHECK(mkdir(tmp2, 0700) == 0, "mkdir");
    }
    remove_dir(tmp);

    char dir[4096];
    if (!stories_dir(dir, sizeof dir)) {
        remove_dir(tmp2);
        qkv_ctx_free(ctx);
        return;
    }
    qkv_model *bin = load_stories(ctx, dir), *hf = NULL;
    qkv_status s = bin ? qkv_model_export(ctx, bin, tmp2) : QKV_ERR_IO;
    CHECK(s == QKV_OK, "export: %s", qkv_ctx_last_error(ctx));
    if (s == QKV_OK && (s = qkv_model_load(ctx, tmp2, &hf)) == QKV_OK) {
        CHECK(!strcmp(qkv_model_type(hf), "llama") && qkv_model_dim(hf) == 512,
              "the folder is a llama model");
        const int32_t prompt[5] = { 1, 403, 407, 261, 378 };
        same_generation(ctx, bin, hf, prompt, 5, t_quick ? 120 : 400, "stories260K .bin vs "
                        "Hugging Face folder");
        /* the tokenizer written beside it is the one read */
        char a[4300], b[4300];
        snprintf(a, sizeof a, "%s/tok512.bin", dir);
        snprintf(b, sizeof b, "%s/tokenizer.bin", tmp2);
        size_t la, lb;
        unsigned char *ta = (unsigned char *)t_read_file(a, &la), *tb = (unsigned char *)t_read_file(b, &lb);
        CHECK(ta && tb && la == lb && !memcmp(ta, tb, la), "tokenizer.bin differs from tok512.bin");
        free(ta);
        free(tb);
        /* the safetensors file: F32 tensors of Hugging Face's names and shapes */
        snprintf(b, sizeof b, "%s/model.safetensors", tmp2);
        qkv__st st;
        if (qkv__st_open(ctx, b, &st) == QKV_OK) {
            const qkv__st_tensor *q = qkv__st_find(&st, "model.layers.4.self_attn.q_proj.weight");
            const qkv__st_tensor *k = qkv__st_find(&st, "model.layers.0.self_attn.k_proj.weight");
            CHECK(st.n == 2 + 9 * 5 && q && q->dtype == QKV__ST_F32 && q->shape[0] == 64 &&
                  q->shape[1] == 64 && k && k->shape[0] == 32 && !qkv__st_find(&st, "lm_head.weight"),
                  "safetensors: %d tensors", st.n);
            qkv__st_close(&st);
        }
        qkv_model_free(hf);
        /* a tokenizer named explicitly, and the folder's config edited */
        snprintf(a, sizeof a, "%s/tok512.bin", dir);
        s = qkv_model_load_llama(ctx, tmp2, a, &hf);
        CHECK(s == QKV_OK, "explicit tokenizer: %s", qkv_ctx_last_error(ctx));
        qkv_model_free(hf);
        expect_config(ctx, tmp2, "\"rms_norm_eps\"", "\"rope_scaling\": {\"type\": \"linear\"}, "
                      "\"rms_norm_eps\"", QKV_ERR_UNSUPPORTED, "rope_scaling");
        expect_config(ctx, tmp2, "\"silu\"", "\"gelu\"", QKV_ERR_UNSUPPORTED, "hidden_act");
        expect_config(ctx, tmp2, "\"num_key_value_heads\":\t4", "\"num_key_value_heads\":\t3",
                      QKV_ERR_FORMAT, "multiple");
        expect_config(ctx, tmp2, "\"hidden_size\":\t64", "\"hidden_size\":\t65",
                      QKV_ERR_FORMAT, "the config needs");
        expect_config(ctx, tmp2, "\"vocab_size\":\t512", "\"vocab_size\":\t511",
                      QKV_ERR_FORMAT, "the config needs");
        expect_config(ctx, tmp2, "\"tie_word_embeddings\":\ttrue",
                      "\"tie_word_embeddings\":\tfalse", QKV_ERR_FORMAT, "lm_head.weight");
        expect_config(ctx, tmp2, "\"hidden_act\"", "\"attention_bias\": true, \"hidden_act\"",
                      QKV_ERR_UNSUPPORTED, "attention_bias");
        expect_config(ctx, tmp2, "\"max_position_embeddings\":\t512",
                      "\"max_position_embeddings\":\t0", QKV_ERR_FORMAT,
                      "max_position_embeddings");
        expect_config(ctx, tmp2, "\"eos_token_id\":\t2", "\"eos_token_id\":\t[2, 600]",
                      QKV_ERR_FORMAT, "eos_token_id");
        expect_config(ctx, tmp2, "\"model_type\":\t\"llama\"", "\"model_type\":\t\"gpt9\"",
                      QKV_ERR_UNSUPPORTED, "gpt9");
        s = qkv_model_load_llama(ctx, tmp2, a, &hf);
        CHECK(s == QKV_OK, "restored: %s", qkv_ctx_last_error(ctx));
        qkv_model_free(hf);
        /* several EOS ids, each a stop */
        expect_config(ctx, tmp2, "\"eos_token_id\":\t2", "\"eos_token_id\":\t[2, 7]", QKV_OK, "");
        snprintf(b, sizeof b, "%s/tokenizer.bin", tmp2);
        remove(b);
        qkv_model *mm = (qkv_model *)1;
        s = qkv_model_load(ctx, tmp2, &mm);
        CHECK(s == QKV_ERR_IO && !mm && strstr(qkv_ctx_last_error(ctx), "no tokenizer"),
              "folder without a tokenizer: %d '%s'", s, qkv_ctx_last_error(ctx));
    }
    qkv_model_free(bin);
    remove_dir(tmp2);
    qkv_ctx_free(ctx);
}

/* ---- bad calls ------------------------------------------------------------------------ */

void test_llama_bad_input(void)
{
    char dir[4096];
    if (!stories_dir(dir, sizeof dir))
        return;
    qkv_ctx *ctx = qkv_ctx_create(1);
    qkv_model *m = load_stories(ctx, dir);
    if (!m) {
        qkv_ctx_free(ctx);
        return;
    }
    qkv_gen_opts go = qkv_gen_opts_default();
    go.max_seqs = 2;
    qkv_gen *g = NULL;
    qkv_status s = qkv_gen_create(ctx, m, &go, &g);
    CHECK(s == QKV_OK, "gen_create: %s", qkv_ctx_last_error(ctx));
    int32_t ids[600], seq = 5, seq2, seq3;
    for (int i = 0; i < 600; i++)
        ids[i] = 3 + i % 500;
    ids[0] = 1;
#define EXPECT(call, st, msg) do { qkv_status r_ = (call); \
        CHECK(r_ == (st) && strstr(qkv_ctx_last_error(ctx), msg), "%s: status %d (want %d), " \
              "'%s' (want '%s')", #call, r_, st, qkv_ctx_last_error(ctx), msg); } while (0)
    EXPECT(qkv_gen_add(g, ids, 0, &seq), QKV_ERR_SHAPE, "no tokens");
    CHECK(seq == -1, "seq is -1 after a failed add");
    EXPECT(qkv_gen_add(g, NULL, 3, &seq), QKV_ERR_NULL, "ids");
    EXPECT(qkv_gen_add(g, ids, 513, &seq), QKV_ERR_SHAPE, "context of 512");
    ids[7] = 512;
    EXPECT(qkv_gen_add(g, ids, 10, &seq), QKV_ERR_ARG, "ids[7] = 512");
    ids[7] = -1;
    EXPECT(qkv_gen_add(g, ids, 10, &seq), QKV_ERR_ARG, "ids[7] = -1");
    ids[7] = 10;
    EXPECT(qkv_gen_add(g, ids, 10, NULL), QKV_ERR_NULL, "seq");
    EXPECT(qkv_gen_add(g, ids, 512, &seq), QKV_OK, "");
    EXPECT(qkv_gen_feed(g, seq, ids, 1), QKV_ERR_SHAPE, "past the model's context");
    EXPECT(qkv_gen_add(g, ids, 10, &seq2), QKV_OK, "");
    EXPECT(qkv_gen_add(g, ids, 10, &seq3), QKV_ERR_ARG, "max_seqs = 2");
    EXPECT(qkv_gen_feed(g, 7, ids, 1), QKV_ERR_ARG, "seq = 7");
    EXPECT(qkv_gen_feed(g, -1, ids, 1), QKV_ERR_ARG, "seq = -1");
    CHECK(!qkv_gen_logits(g, seq) && qkv_gen_length(g, seq) == 0 && qkv_gen_length(g, 7) == -1,
          "no logits before the first step");
    EXPECT(qkv_gen_step(g), QKV_OK, "");
    CHECK(qkv_gen_logits(g, seq) && qkv_gen_length(g, seq) == 512, "a full-context prompt runs");
    EXPECT(qkv_gen_remove(g, seq), QKV_OK, "");
    EXPECT(qkv_gen_remove(g, seq), QKV_ERR_ARG, "not a live sequence");
    CHECK(!qkv_gen_logits(g, seq), "no logits after removal");
    EXPECT(qkv_gen_add(g, ids, 3, &seq3), QKV_OK, "");
    CHECK(seq3 == seq, "a removed id is given out again");
    qkv_gen_free(g);
    qkv_gen_free(NULL);
    /* options */
    const struct { int64_t seqs, pos, bs; int dt; qkv_status st; const char *msg; } bad[] = {
        { 0, 0, 16, QKV_KV_F32, QKV_ERR_ARG, "max_seqs" },
        { 1, 100, 16, QKV_KV_F32, QKV_ERR_ARG, "max_positions" },
        { 1, -1, 16, QKV_KV_F32, QKV_ERR_ARG, "max_positions" },
        { 1, 0, 12, QKV_KV_F32, QKV_ERR_ARG, "block_size" },
        { 1, 0, 512, QKV_KV_F32, QKV_ERR_ARG, "block_size" },
        { 1, 0, 16, 5, QKV_ERR_DTYPE, "kv_dtype" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        qkv_gen_opts o = qkv_gen_opts_default();
        o.max_seqs = bad[i].seqs;
        o.max_positions = bad[i].pos;
        o.block_size = bad[i].bs;
        o.kv_dtype = (qkv_kv_dtype)bad[i].dt;
        g = (qkv_gen *)1;
        EXPECT(qkv_gen_create(ctx, m, &o, &g), bad[i].st, bad[i].msg);
        CHECK(g == NULL, "gen is NULL after a failed create");
    }
    EXPECT(qkv_gen_create(ctx, NULL, &go, &g), QKV_ERR_NULL, "model");
    EXPECT(qkv_gen_create(ctx, m, NULL, &g), QKV_ERR_NULL, "opts");
    /* text calls */
    int64_t n;
    EXPECT(qkv_model_tokenize(ctx, m, NULL, ids, 10, &n), QKV_ERR_NULL, "text");
    char text[8];
    ids[1] = 999;
    EXPECT(qkv_model_detokenize(ctx, m, ids, 3, text, 8, &n), QKV_ERR_ARG, "ids[1] = 999");
    EXPECT(qkv_model_detokenize(ctx, m, ids, -1, text, 8, &n), QKV_ERR_SHAPE, "n < 0");
    EXPECT(qkv_model_export(ctx, m, "/proc/qkv_no/such"), QKV_ERR_IO, "cannot create");
#undef EXPECT
    /* a model of another kind */
    char sas[4200];
    snprintf(sas, sizeof sas, "%s/../sasrec-ml1m", dir);
    qkv_model *other = NULL;
    if (t_exists(sas) && qkv_model_load(ctx, sas, &other) == QKV_OK) {
        s = qkv_gen_create(ctx, other, &go, &g);
        CHECK(s == QKV_ERR_UNSUPPORTED && strstr(qkv_ctx_last_error(ctx), "sasrec"),
              "gen on sasrec: %d '%s'", s, qkv_ctx_last_error(ctx));
        s = qkv_model_export(ctx, other, "/tmp");
        CHECK(s == QKV_ERR_UNSUPPORTED, "export of sasrec: %d", s);
        CHECK(!qkv_model_piece(other, 1, 5, &n) && qkv_model_bos(other) == -1 &&
              !qkv_model_is_stop(other, 1), "llama calls on sasrec");
        s = qkv_model_detokenize(ctx, other, ids, 1, text, 8, &n);
        CHECK(s == QKV_ERR_UNSUPPORTED, "detokenize on sasrec: %d", s);
        qkv_model *again = (qkv_model *)1;
        s = qkv_model_load_llama(ctx, sas, NULL, &again);
        CHECK(s == QKV_ERR_UNSUPPORTED && !again && strstr(qkv_ctx_last_error(ctx), "not llama"),
              "load_llama on sasrec: %d '%s'", s, qkv_ctx_last_error(ctx));
    }
    qkv_model_free(other);
    qkv_model_free(m);
    qkv_ctx_free(ctx);
}
