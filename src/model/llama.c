/*
 * llama.c — Llama-family decoders: the llama2.c checkpoint format and the
 * Hugging Face layout (config.json + model.safetensors), one runtime for
 * both, and the export of a loaded model as a Hugging Face folder.
 *
 * The forward of one token: x = emb[token]; per layer
 *   h = RMSNorm(x)·att_norm;  q, k, v = Wqkv·h;  RoPE on q and k;
 *   x += Wo·attention(q, cached k, v)   (causal, grouped kv heads)
 *   h = RMSNorm(x)·ffn_norm;  x += W2·(silu(W1·h) ⊙ (W3·h))
 * then logits = cls·(RMSNorm(x)·norm). RoPE rotates the pairs (2i, 2i+1)
 * of each head by pos·theta^(-2i/hs), as llama2.c does; a Hugging Face
 * checkpoint rotates halves (i, i + hs/2), so its q and k rows are
 * permuted at load time (and back at export) and one forward serves both.
 *
 * Keys and values go into a paged KV cache (one per layer, one block
 * table per sequence): a prompt is prefilled with GEMMs (in fixed blocks
 * of rows, so that no result depends on the thread count) and the forward
 * attention kernel (or, on top of cached positions, the paged kernel with
 * every new query), a decode step runs matrix-vector products and the
 * paged kernel. The computation of a sequence depends on its own tokens
 * only, never on other sequences of a batch (gen.c relies on it).
 *
 * Not here: batching and the pool of blocks (gen.c), sampling (sampler.c),
 * the tokenizer (bpe.c), rope scaling variants, biases.
 */
#include "model.h"
#include "../nn/nn.h"

#include <cblas.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

void qkv__llama_release(qkv__llama *m)
{
    if (!m)
        return;
    for (int64_t l = 0; m->layer && l < m->L; l++) {
        qkv__llama_layer *y = &m->layer[l];
        free(y->att_norm); free(y->wqkv); free(y->wo);
        free(y->ffn_norm); free(y->w13); free(y->w2);
    }
    free(m->layer);
    if (!m->shared_cls)
        free(m->cls);
    free(m->emb);
    free(m->norm);
    free(m->inv_freq);
    qkv__bpe_free(&m->tok);
    memset(m, 0, sizeof *m);
}

/* The derived tables and the per-layer array, once the sizes are known. */
static qkv_status alloc_layers(qkv_ctx *ctx, qkv__llama *m)
{
    m->layer = calloc((size_t)m->L, sizeof *m->layer);
    m->inv_freq = malloc((size_t)(m->hs / 2) * sizeof *m->inv_freq);
    if (!m->layer || !m->inv_freq)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < m->hs / 2; i++)
        m->inv_freq[i] = pow(m->theta, -2.0 * (double)i / (double)m->hs);
    return QKV_OK;
}

/* ---- llama2.c checkpoints ------------------------------------------------- */

static int32_t rd32(const unsigned char *p)
{
    return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                     (uint32_t)p[3] << 24);
}

/* A fresh fp32 copy of n floats at p (the file's floats are unaligned). */
static float *copy_floats(const unsigned char *p, int64_t n)
{
    float *f = malloc((size_t)(n ? n : 1) * sizeof(float));
    if (f)
        memcpy(f, p, (size_t)n * sizeof(float));
    return f;
}

qkv_status qkv__llama_parse_l2c(qkv_ctx *ctx, const void *buf, size_t size, const char *name,
                                qkv__llama *m)
{
    memset(m, 0, sizeof *m);
    const unsigned char *b = buf;
    if (!buf || size < 28)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: %zu bytes, shorter than the 28-byte "
                         "llama2.c header", name, size);
    if ((uint32_t)rd32(b) == 0x616b3432u)
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "%s: a llama2.c export of version %d "
                         "('ak42' magic); only the legacy version 0 is read", name,
                         size >= 8 ? rd32(b + 4) : -1);
    static const char *const field[7] = { "dim", "hidden_dim", "n_layers", "n_heads",
                                          "n_kv_heads", "vocab_size", "seq_len" };
    static const int64_t hi[7] = { 1 << 16, 1 << 18, 1 << 10, 1 << 10, 1 << 10, 1 << 22,
                                   1 << 20 };
    int64_t h[7];
    for (int i = 0; i < 7; i++) {
        h[i] = rd32(b + 4 * i);
        const int64_t v = i == 5 ? llabs(h[i]) : h[i];
        const int64_t lo = i == 5 ? 3 : 1;
        if (v < lo || v > hi[i])
            return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: header field %s = %lld is outside "
                             "[%lld, %lld]%s", name, field[i], (long long)h[i], (long long)lo,
                             (long long)hi[i], i == 5 ? " in magnitude" : "");
    }
    m->D = h[0]; m->F = h[1]; m->L = h[2]; m->Hq = h[3]; m->Hkv = h[4];
    m->V = llabs(h[5]); m->S = h[6];
    m->shared_cls = h[5] > 0;
    if (m->D % m->Hq != 0)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: dim %lld is not a multiple of n_heads %lld",
                         name, (long long)m->D, (long long)m->Hq);
    if (m->Hq % m->Hkv != 0)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: n_heads %lld is not a multiple of "
                         "n_kv_heads %lld", name, (long long)m->Hq, (long long)m->Hkv);
    m->hs = m->D / m->Hq;
    if (m->hs % 2 != 0)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: head size %lld is odd (RoPE rotates pairs)",
                         name, (long long)m->hs);
    const int64_t D = m->D, F = m->F, L = m->L, KV = m->Hkv * m->hs, V = m->V;
    /* the bounds keep every product below 2^62 */
    const int64_t floats = V * D + L * D + L * D * D + 2 * L * KV * D + L * D * D + L * D +
                           3 * L * F * D + D + m->S * m->hs + (m->shared_cls ? 0 : V * D);
    const uint64_t want = 28 + 4 * (uint64_t)floats;
    if ((uint64_t)size != want)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: %zu bytes, but its header (dim %lld, "
                         "hidden_dim %lld, n_layers %lld, n_heads %lld, n_kv_heads %lld, "
                         "vocab_size %lld, seq_len %lld, %s classifier) needs exactly %llu",
                         name, size, (long long)D, (long long)F, (long long)L,
                         (long long)m->Hq, (long long)m->Hkv, (long long)h[5],
                         (long long)m->S, m->shared_cls ? "shared" : "separate",
                         (unsigned long long)want);
    m->eps = 1e-5;
    m->theta = 10000.0;
    m->bos = 1;
    m->eos[0] = 2;
    m->n_eos = 1;
    qkv_status s = alloc_layers(ctx, m);
    if (s != QKV_OK) {
        qkv__llama_release(m);
        return s;
    }
    const unsigned char *p = b + 28;
    /* the arrays in file order; per-layer arrays stacked over layers */
    const unsigned char *emb = p, *rms_att = emb + 4 * V * D, *wq = rms_att + 4 * L * D;
    const unsigned char *wk = wq + 4 * L * D * D, *wv = wk + 4 * L * KV * D;
    const unsigned char *wo = wv + 4 * L * KV * D, *rms_ffn = wo + 4 * L * D * D;
    const unsigned char *w1 = rms_ffn + 4 * L * D, *w2 = w1 + 4 * L * F * D;
    const unsigned char *w3 = w2 + 4 * L * D * F, *rms_final = w3 + 4 * L * F * D;
    const unsigned char *wcls = rms_final + 4 * D + 4 * m->S * m->hs;
    m->emb = copy_floats(emb, V * D);
    m->cls = m->shared_cls ? m->emb : copy_floats(wcls, V * D);
    m->norm = copy_floats(rms_final, D);
    int ok = m->emb && m->cls && m->norm;
    for (int64_t l = 0; ok && l < L; l++) {
        qkv__llama_layer *y = &m->layer[l];
        y->att_norm = copy_floats(rms_att + 4 * l * D, D);
        y->ffn_norm = copy_floats(rms_ffn + 4 * l * D, D);
        y->wo = copy_floats(wo + 4 * l * D * D, D * D);
        y->w2 = copy_floats(w2 + 4 * l * D * F, D * F);
        y->wqkv = malloc((size_t)((D + 2 * KV) * D) * sizeof(float));
        y->w13 = malloc((size_t)(2 * F * D) * sizeof(float));
        ok = y->att_norm && y->ffn_norm && y->wo && y->w2 && y->wqkv && y->w13;
        if (!ok)
            break;
        memcpy(y->wqkv, wq + 4 * l * D * D, (size_t)(D * D) * 4);
        memcpy(y->wqkv + D * D, wk + 4 * l * KV * D, (size_t)(KV * D) * 4);
        memcpy(y->wqkv + (D + KV) * D, wv + 4 * l * KV * D, (size_t)(KV * D) * 4);
        memcpy(y->w13, w1 + 4 * l * F * D, (size_t)(F * D) * 4);
        memcpy(y->w13 + F * D, w3 + 4 * l * F * D, (size_t)(F * D) * 4);
    }
    if (!ok) {
        qkv__llama_release(m);
        return qkv__fail(ctx, QKV_ERR_NOMEM, "%s: out of memory", name);
    }
    return QKV_OK;
}

/* The tokenizer beside a model: dir/tokenizer.bin, dir/tok<V>.bin, or the
   only dir/tok*.bin. */
static qkv_status find_tokenizer(qkv_ctx *ctx, const char *dir, int64_t V, char *path,
                                 size_t cap)
{
    struct stat sb;
    char name[64];
    qkv_status s = qkv__path_join(ctx, path, cap, dir, "tokenizer.bin");
    if (s != QKV_OK || stat(path, &sb) == 0)
        return s;
    snprintf(name, sizeof name, "tok%lld.bin", (long long)V);
    if ((s = qkv__path_join(ctx, path, cap, dir, name)) != QKV_OK || stat(path, &sb) == 0)
        return s;
    char pat[4200];
    glob_t g;
    snprintf(pat, sizeof pat, "%s/tok*.bin", dir);
    int found = glob(pat, 0, NULL, &g) == 0 ? (int)g.gl_pathc : 0;
    if (found == 1)
        snprintf(path, cap, "%s", g.gl_pathv[0]);
    globfree(&g);
    if (found == 1)
        return QKV_OK;
    return qkv__fail(ctx, QKV_ERR_IO, "no tokenizer beside the model in '%s' (tokenizer.bin "
                     "or tok*.bin%s); name one (qkv_model_load_llama, qkv generate -z)", dir,
                     found > 1 ? ": several tok*.bin" : "");
}

/* The tokenizer for a model whose files are in dir. */
static qkv_status load_tokenizer(qkv_ctx *ctx, const char *dir, const char *tokenizer_path,
                                 qkv__llama *m)
{
    char path[4096];
    qkv_status s = QKV_OK;
    if (tokenizer_path)
        snprintf(path, sizeof path, "%s", tokenizer_path);
    else
        s = find_tokenizer(ctx, dir, m->V, path, sizeof path);
    if (s == QKV_OK && (s = qkv__bpe_load(ctx, path, m->V, &m->tok)) == QKV_OK)
        m->has_tok = 1;
    return s;
}

qkv_status qkv__llama_load_file(qkv_ctx *ctx, const char *path, const char *tokenizer_path,
                                qkv__llama *m)
{
    memset(m, 0, sizeof *m);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return qkv__fail(ctx, QKV_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return qkv__fail(ctx, QKV_ERR_IO, "'%s' is not a regular file", path);
    }
    const size_t size = (size_t)sb.st_size;
    void *map = size ? mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    close(fd);
    if (map == MAP_FAILED)
        return qkv__fail(ctx, QKV_ERR_IO, "cannot map '%s'", path);
    qkv_status s = qkv__llama_parse_l2c(ctx, map, size, path, m);
    if (map)
        munmap(map, size);
    if (s != QKV_OK)
        return s;
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        snprintf(dir, sizeof dir, ".");
    if ((s = load_tokenizer(ctx, dir, tokenizer_path, m)) != QKV_OK)
        qkv__llama_release(m);
    return s;
}

/* ---- Hugging Face folders ---------------------------------------------------- */

/* cfg's key holds a boolean true (the option is on). */
static int json_true(const cJSON *cfg, const char *key)
{
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cfg, key));
}

static qkv_status llama_config(qkv_ctx *ctx, const char *dir, const cJSON *cfg, void *g)
{
    qkv__llama *m = g;
    const char *f = "config.json";
    qkv_status s;
    int tie = 0;
    if ((s = qkv__json_int(ctx, cfg, f, "hidden_size", 1, 1 << 16, &m->D)) ||
        (s = qkv__json_int(ctx, cfg, f, "intermediate_size", 1, 1 << 18, &m->F)) ||
        (s = qkv__json_int(ctx, cfg, f, "num_hidden_layers", 1, 1 << 10, &m->L)) ||
        (s = qkv__json_int(ctx, cfg, f, "num_attention_heads", 1, 1 << 10, &m->Hq)) ||
        (s = qkv__json_int(ctx, cfg, f, "vocab_size", 3, 1 << 22, &m->V)) ||
        (s = qkv__json_int(ctx, cfg, f, "max_position_embeddings", 1, 1 << 20, &m->S)) ||
        (s = qkv__json_num(ctx, cfg, f, "rms_norm_eps", 0.0, 1.0, 1, 1e-6, &m->eps)) ||
        (s = qkv__json_num(ctx, cfg, f, "rope_theta", 1.0, 1e12, 1, 10000.0, &m->theta)) ||
        (s = qkv__json_bool(ctx, cfg, f, "tie_word_embeddings", 0, &tie)))
        return s;
    m->Hkv = m->Hq;
    if (cJSON_GetObjectItemCaseSensitive(cfg, "num_key_value_heads") &&
        (s = qkv__json_int(ctx, cfg, f, "num_key_value_heads", 1, m->Hq, &m->Hkv)))
        return s;
    if (m->Hq % m->Hkv != 0)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "config.json: num_attention_heads %lld is not a "
                         "multiple of num_key_value_heads %lld", (long long)m->Hq,
                         (long long)m->Hkv);
    if (cJSON_GetObjectItemCaseSensitive(cfg, "head_dim")) {
        if ((s = qkv__json_int(ctx, cfg, f, "head_dim", 2, 1 << 12, &m->hs)))
            return s;
    } else if (m->D % m->Hq != 0) {
        return qkv__fail(ctx, QKV_ERR_FORMAT, "config.json: hidden_size %lld is not a multiple "
                         "of num_attention_heads %lld", (long long)m->D, (long long)m->Hq);
    } else {
        m->hs = m->D / m->Hq;
    }
    if (m->hs % 2 != 0)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "config.json: head size %lld is odd (RoPE "
                         "rotates pairs)", (long long)m->hs);
    const char *act = qkv__json_str(cfg, "hidden_act");
    if (cJSON_GetObjectItemCaseSensitive(cfg, "hidden_act") && (!act || strcmp(act, "silu")))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "config.json: hidden_act must be \"silu\"");
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(cfg, "rope_scaling");
    if (rs && !cJSON_IsNull(rs))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "config.json: rope_scaling is not supported");
    if (json_true(cfg, "attention_bias") || json_true(cfg, "mlp_bias"))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED,
                         "config.json: attention_bias / mlp_bias are not supported");
    int64_t v = 1;
    if (cJSON_GetObjectItemCaseSensitive(cfg, "bos_token_id") &&
        !cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(cfg, "bos_token_id")) &&
        (s = qkv__json_int(ctx, cfg, f, "bos_token_id", 0, m->V - 1, &v)))
        return s;
    m->bos = (int32_t)v;
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(cfg, "eos_token_id");
    if (!eos || cJSON_IsNull(eos)) {
        m->eos[0] = 2;
        m->n_eos = 1;
    } else if (cJSON_IsArray(eos)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, eos) {
            if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) ||
                e->valuedouble < 0 || e->valuedouble >= (double)m->V ||
                m->n_eos == QKV__LLAMA_MAX_EOS)
                return qkv__fail(ctx, QKV_ERR_FORMAT, "config.json: eos_token_id must be up "
                                 "to %d token ids below vocab_size", QKV__LLAMA_MAX_EOS);
            m->eos[m->n_eos++] = (int32_t)e->valuedouble;
        }
    } else {
        if ((s = qkv__json_int(ctx, cfg, f, "eos_token_id", 0, m->V - 1, &v)))
            return s;
        m->eos[0] = (int32_t)v;
        m->n_eos = 1;
    }
    m->shared_cls = tie;
    return alloc_layers(ctx, m);
}

/* Rows of q or k from split-half RoPE order (Hugging Face) to interleaved
   pairs, head by head: row h·hs + 2i + c takes row h·hs + c·hs/2 + i. */
static void unpermute_rows(float *w, int64_t heads, int64_t hs, int64_t cols, const float *src)
{
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < hs / 2; i++)
            for (int c = 0; c < 2; c++)
                memcpy(w + (h * hs + 2 * i + c) * cols, src + (h * hs + c * hs / 2 + i) * cols,
                       (size_t)cols * sizeof(float));
}

/* The reverse: interleaved pairs to split halves. */
static void permute_rows(float *dst, int64_t heads, int64_t hs, int64_t cols, const float *w)
{
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < hs / 2; i++)
            for (int c = 0; c < 2; c++)
                memcpy(dst + (h * hs + c * hs / 2 + i) * cols, w + (h * hs + 2 * i + c) * cols,
                       (size_t)cols * sizeof(float));
}

static void llama_weights(qkv__loader *L, void *g)
{
    qkv__llama *m = g;
    const int64_t D = m->D, F = m->F, QD = m->Hq * m->hs, KV = m->Hkv * m->hs;
    m->emb = qkv__ld(L, "model.embed_tokens.weight", 0, m->V, D);
    m->norm = qkv__ld(L, "model.norm.weight", 0, D, 0);
    m->cls = m->shared_cls ? m->emb : qkv__ld(L, "lm_head.weight", 0, m->V, D);
    for (int l = 0; l < (int)m->L && L->s == QKV_OK; l++) {
        qkv__llama_layer *y = &m->layer[l];
        y->att_norm = qkv__ld(L, "model.layers.%d.input_layernorm.weight", l, D, 0);
        y->ffn_norm = qkv__ld(L, "model.layers.%d.post_attention_layernorm.weight", l, D, 0);
        y->wo = qkv__ld(L, "model.layers.%d.self_attn.o_proj.weight", l, D, QD);
        y->w2 = qkv__ld(L, "model.layers.%d.mlp.down_proj.weight", l, D, F);
        float *wq = qkv__ld(L, "model.layers.%d.self_attn.q_proj.weight", l, QD, D);
        float *wk = qkv__ld(L, "model.layers.%d.self_attn.k_proj.weight", l, KV, D);
        float *wv = qkv__ld(L, "model.layers.%d.self_attn.v_proj.weight", l, KV, D);
        float *w1 = qkv__ld(L, "model.layers.%d.mlp.gate_proj.weight", l, F, D);
        float *w3 = qkv__ld(L, "model.layers.%d.mlp.up_proj.weight", l, F, D);
        if (L->s == QKV_OK) {
            y->wqkv = malloc((size_t)((QD + 2 * KV) * D) * sizeof(float));
            y->w13 = malloc((size_t)(2 * F * D) * sizeof(float));
            if (!y->wqkv || !y->w13)
                L->s = qkv__fail(L->ctx, QKV_ERR_NOMEM, "out of memory loading the weights");
        }
        if (L->s == QKV_OK) {
            unpermute_rows(y->wqkv, m->Hq, m->hs, D, wq);
            unpermute_rows(y->wqkv + QD * D, m->Hkv, m->hs, D, wk);
            memcpy(y->wqkv + (QD + KV) * D, wv, (size_t)(KV * D) * sizeof(float));
            memcpy(y->w13, w1, (size_t)(F * D) * sizeof(float));
            memcpy(y->w13 + F * D, w3, (size_t)(F * D) * sizeof(float));
        }
        free(wq); free(wk); free(wv); free(w1); free(w3);
    }
}

static void llama_release_g(void *g)
{
    qkv__llama_release(g);
}

static qkv_status llama_finish(qkv_ctx *ctx, const char *dir, const char *tokenizer_path,
                               void *g)
{
    return load_tokenizer(ctx, dir, tokenizer_path, g);
}

const qkv__graph qkv__llama_graph = {
    "llama", sizeof(qkv__llama), llama_config, llama_weights, llama_release_g, llama_finish
};

/* ---- the forward ------------------------------------------------------------- */

int64_t qkv__llama_tok_floats(const qkv__llama *m)
{
    const int64_t QD = m->Hq * m->hs, W = QD + 2 * m->Hkv * m->hs;
    return 2 * m->D + W + QD + 2 * m->F + m->hs;
}

void qkv__llama_rope_angles(const qkv__llama *m, int64_t pos, float *cs, float *sn)
{
    for (int64_t i = 0; i < m->hs / 2; i++) {
        const double a = (double)pos * m->inv_freq[i];
        cs[i] = (float)cos(a);
        sn[i] = (float)sin(a);
    }
}

/* y = RMSNorm(x)·w over D elements (the mean square in double). */
static void rmsnorm(float *y, const float *x, const float *w, int64_t D, double eps)
{
    double ss = 0.0;
    for (int64_t i = 0; i < D; i++)
        ss += (double)x[i] * x[i];
    const float inv = (float)(1.0 / sqrt(ss / (double)D + eps));
    for (int64_t i = 0; i < D; i++)
        y[i] = w[i] * (x[i] * inv);
}

/* Rotates the pairs of `heads` heads of hs elements in v. */
static void rope(float *v, int64_t heads, int64_t hs, const float *cs, const float *sn)
{
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < hs / 2; i++) {
            float *p = v + h * hs + 2 * i;
            const float u = p[0], w = p[1];
            p[0] = u * cs[i] - w * sn[i];
            p[1] = u * sn[i] + w * cs[i];
        }
}

/* g[i] = silu(g[i])·u[i] for F elements. */
static void swiglu(float *g, const float *u, int64_t F)
{
    for (int64_t i = 0; i < F; i++)
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* y = W·x (+ y when add), W [N, K] row-major. */
static void matvec(const float *W, int64_t N, int64_t K, const float *x, float *y, int add)
{
    cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)N, (int)K, 1.0f, W, (int)K, x, 1,
                add ? 1.0f : 0.0f, y, 1);
}

/* One token at position p0 (n = 1): matrix-vector products, the paged
   kernel over the sequence's cached keys. */
static qkv_status decode_token(qkv_ctx *ctx, const qkv__llama *m, const qkv_paged_cache *caches,
                               const int32_t *table, int64_t max_blocks, int32_t id, int64_t p0,
                               float *buf, float *logits, double *attn_s)
{
    const int64_t D = m->D, F = m->F, hs = m->hs, QD = m->Hq * hs, KV = m->Hkv * hs;
    const int64_t W = QD + 2 * KV;
    float *x = buf, *h = x + D, *qkv = h + D, *att = qkv + W, *gu = att + QD;
    float *cs = gu + 2 * F, *sn = cs + hs / 2;
    memcpy(x, m->emb + (int64_t)id * D, (size_t)D * sizeof(float));
    qkv__llama_rope_angles(m, p0, cs, sn);
    const int32_t len0 = (int32_t)p0, len1 = (int32_t)p0 + 1;
    qkv_attn_opts opts = qkv_attn_opts_default();
    opts.causal = 1;
    qkv_tensor q = qkv_tensor_4d(qkv, QKV_F32, 1, 1, m->Hq, hs);
    qkv_tensor kn = qkv_tensor_4d(qkv + QD, QKV_F32, 1, 1, m->Hkv, hs);
    qkv_tensor vn = qkv_tensor_4d(qkv + QD + KV, QKV_F32, 1, 1, m->Hkv, hs);
    qkv_tensor out = qkv_tensor_4d(att, QKV_F32, 1, 1, m->Hq, hs);
    for (int64_t l = 0; l < m->L; l++) {
        const qkv__llama_layer *y = &m->layer[l];
        rmsnorm(h, x, y->att_norm, D, m->eps);
        matvec(y->wqkv, W, D, h, qkv, 0);
        rope(qkv, m->Hq, hs, cs, sn);
        rope(qkv + QD, m->Hkv, hs, cs, sn);
        const double t0 = now_s();
        qkv_status s = qkv_paged_append(ctx, &caches[l], table, max_blocks, &len0, &kn, &vn);
        if (s == QKV_OK)
            s = qkv_attention_paged(ctx, &q, &caches[l], table, max_blocks, &len1, &opts, &out,
                                    NULL);
        *attn_s += now_s() - t0;
        if (s != QKV_OK)
            return s;
        matvec(y->wo, D, QD, att, x, 1);
        rmsnorm(h, x, y->ffn_norm, D, m->eps);
        matvec(y->w13, 2 * F, D, h, gu, 0);
        swiglu(gu, gu + F, F);
        matvec(y->w2, D, F, gu, x, 1);
    }
    rmsnorm(h, x, m->norm, D, m->eps);
    matvec(m->cls, m->V, D, h, logits, 0);
    return QKV_OK;
}

/* n > 1 tokens at positions p0 .. p0+n-1: GEMMs over the rows; attention
   by the forward kernel on the new keys when nothing is cached, else by
   the paged kernel with all n queries (chunked prefill). */
static qkv_status prefill(qkv_ctx *ctx, const qkv__llama *m, const qkv_paged_cache *caches,
                          const int32_t *table, int64_t max_blocks, const int32_t *ids,
                          int64_t n, int64_t p0, float *logits, double *attn_s)
{
    const int64_t D = m->D, F = m->F, hs = m->hs, QD = m->Hq * hs, KV = m->Hkv * hs;
    const int64_t W = QD + 2 * KV;
    float *x = malloc((size_t)(n * D) * sizeof(float));
    float *h = malloc((size_t)(n * D) * sizeof(float));
    float *t = malloc((size_t)(n * D) * sizeof(float));
    float *qkv = malloc((size_t)(n * W) * sizeof(float));
    float *att = malloc((size_t)(n * QD) * sizeof(float));
    float *gu = malloc((size_t)(n * 2 * F) * sizeof(float));
    float *cs = malloc((size_t)(n * hs) * sizeof(float));
    qkv_status s = QKV_OK;
    if (!x || !h || !t || !qkv || !att || !gu || !cs) {
        s = qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory for a prefill of %lld tokens",
                      (long long)n);
        goto done;
    }
    for (int64_t i = 0; i < n; i++) {
        memcpy(x + i * D, m->emb + (int64_t)ids[i] * D, (size_t)D * sizeof(float));
        qkv__llama_rope_angles(m, p0 + i, cs + i * hs, cs + i * hs + hs / 2);
    }
    const int32_t len0 = (int32_t)p0, len1 = (int32_t)(p0 + n);
    qkv_attn_opts opts = qkv_attn_opts_default();
    opts.causal = 1;
    /* [1, n, heads, hs] views of the q, k and v columns of the qkv rows */
    qkv_tensor q = { qkv, QKV_F32, { 1, n, m->Hq, hs }, { n * W, W, hs, 1 } };
    qkv_tensor k = { qkv + QD, QKV_F32, { 1, n, m->Hkv, hs }, { n * W, W, hs, 1 } };
    qkv_tensor v = { qkv + QD + KV, QKV_F32, { 1, n, m->Hkv, hs }, { n * W, W, hs, 1 } };
    qkv_tensor out = qkv_tensor_4d(att, QKV_F32, 1, n, m->Hq, hs);
    for (int64_t l = 0; l < m->L; l++) {
        const qkv__llama_layer *y = &m->layer[l];
        for (int64_t i = 0; i < n; i++)
            rmsnorm(h + i * D, x + i * D, y->att_norm, D, m->eps);
        qkv__linear_rows(ctx, h, n, D, D, y->wqkv, W, qkv, W);
        for (int64_t i = 0; i < n; i++) {
            const float *c = cs + i * hs, *sn = c + hs / 2;
            rope(qkv + i * W, m->Hq, hs, c, sn);
            rope(qkv + i * W + QD, m->Hkv, hs, c, sn);
        }
        const double t0 = now_s();
        s = qkv_paged_append(ctx, &caches[l], table, max_blocks, &len0, &k, &v);
        if (s == QKV_OK && p0 == 0)
            s = qkv_attention_forward(ctx, &q, &k, &v, &opts, &out, NULL);
        else if (s == QKV_OK)
            s = qkv_attention_paged(ctx, &q, &caches[l], table, max_blocks, &len1, &opts, &out,
                                    NULL);
        *attn_s += now_s() - t0;
        if (s != QKV_OK)
            goto done;
        qkv__linear_rows(ctx, att, n, QD, QD, y->wo, D, t, D);
        qkv__add(x, D, t, D, n, D);
        for (int64_t i = 0; i < n; i++)
            rmsnorm(h + i * D, x + i * D, y->ffn_norm, D, m->eps);
        qkv__linear_rows(ctx, h, n, D, D, y->w13, 2 * F, gu, 2 * F);
        for (int64_t i = 0; i < n; i++)
            swiglu(gu + i * 2 * F, gu + i * 2 * F + F, F);
        qkv__linear_rows(ctx, gu, n, F, 2 * F, y->w2, D, t, D);
        qkv__add(x, D, t, D, n, D);
    }
    rmsnorm(h, x + (n - 1) * D, m->norm, D, m->eps);
    matvec(m->cls, m->V, D, h, logits, 0);
done:
    free(x); free(h); free(t); free(qkv); free(att); free(gu); free(cs);
    return s;
}

qkv_status qkv__llama_forward(qkv_ctx *ctx, const qkv__llama *m,
                              const qkv_paged_cache *caches, const int32_t *table,
                              int64_t max_blocks, const int32_t *ids, int64_t n, int64_t p0,
                              float *buf, float *logits, double *attn_s)
{
    if (n == 1)
        return decode_token(ctx, m, caches, table, max_blocks, ids[0], p0, buf, logits, attn_s);
    return prefill(ctx, m, caches, table, max_blocks, ids, n, p0, logits, attn_s);
}

/* ---- export --------------------------------------------------------------------- */

typedef struct {
    char        name[96];
    const float *data;     /* rows to write, already in the file's order */
    int64_t     rows, cols;
} out_tensor;

/* fmt names the tensor, with %d for the layer where it has one */
static void set_tensor(out_tensor *t, const char *fmt, int64_t layer, const float *data,
                       int64_t rows, int64_t cols)
{
    snprintf(t->name, sizeof t->name, fmt, (int)layer);
    t->data = data;
    t->rows = rows;
    t->cols = cols;
}

static qkv_status write_file(qkv_ctx *ctx, const char *path, const void *buf, size_t len,
                             FILE **keep)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return qkv__fail(ctx, QKV_ERR_IO, "cannot create '%s': %s", path, strerror(errno));
    if (len && fwrite(buf, 1, len, f) != len) {
        fclose(f);
        return qkv__fail(ctx, QKV_ERR_IO, "cannot write '%s'", path);
    }
    if (keep) {
        *keep = f;
        return QKV_OK;
    }
    if (fclose(f) != 0)
        return qkv__fail(ctx, QKV_ERR_IO, "cannot write '%s'", path);
    return QKV_OK;
}

static qkv_status write_config(qkv_ctx *ctx, const qkv__llama *m, const char *dir)
{
    cJSON *c = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(c, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString("LlamaForCausalLM"));
    cJSON_AddStringToObject(c, "model_type", "llama");
    cJSON_AddNumberToObject(c, "hidden_size", (double)m->D);
    cJSON_AddNumberToObject(c, "intermediate_size", (double)m->F);
    cJSON_AddNumberToObject(c, "num_hidden_layers", (double)m->L);
    cJSON_AddNumberToObject(c, "num_attention_heads", (double)m->Hq);
    cJSON_AddNumberToObject(c, "num_key_value_heads", (double)m->Hkv);
    cJSON_AddNumberToObject(c, "head_dim", (double)m->hs);
    cJSON_AddNumberToObject(c, "vocab_size", (double)m->V);
    cJSON_AddNumberToObject(c, "max_position_embeddings", (double)m->S);
    cJSON_AddNumberToObject(c, "rms_norm_eps", m->eps);
    cJSON_AddNumberToObject(c, "rope_theta", m->theta);
    cJSON_AddBoolToObject(c, "tie_word_embeddings", m->shared_cls);
    cJSON_AddStringToObject(c, "hidden_act", "silu");
    cJSON_AddNumberToObject(c, "bos_token_id", m->bos);
    if (m->n_eos == 1) {
        cJSON_AddNumberToObject(c, "eos_token_id", m->eos[0]);
    } else {
        cJSON *e = cJSON_AddArrayToObject(c, "eos_token_id");
        for (int i = 0; i < m->n_eos; i++)
            cJSON_AddItemToArray(e, cJSON_CreateNumber(m->eos[i]));
    }
    cJSON_AddStringToObject(c, "torch_dtype", "float32");
    char *text = cJSON_Print(c);
    cJSON_Delete(c);
    if (!text)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
    char path[4096];
    qkv_status s = qkv__path_join(ctx, path, sizeof path, dir, "config.json");
    if (s == QKV_OK)
        s = write_file(ctx, path, text, strlen(text), NULL);
    free(text);
    return s;
}

static qkv_status write_tokenizer(qkv_ctx *ctx, const qkv__bpe *t, const char *dir)
{
    size_t len = 4;
    for (int32_t i = 0; i < t->n; i++)
        len += 8 + (size_t)t->len[i];
    unsigned char *b = malloc(len);
    if (!b)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
    memcpy(b, &t->max_len, 4);
    size_t at = 4;
    for (int32_t i = 0; i < t->n; i++) {
        memcpy(b + at, &t->score[i], 4);
        memcpy(b + at + 4, &t->len[i], 4);
        memcpy(b + at + 8, t->text + t->off[i], (size_t)t->len[i]);
        at += 8 + (size_t)t->len[i];
    }
    char path[4096];
    qkv_status s = qkv__path_join(ctx, path, sizeof path, dir, "tokenizer.bin");
    if (s == QKV_OK)
        s = write_file(ctx, path, b, len, NULL);
    free(b);
    return s;
}

qkv_status qkv__llama_export(qkv_ctx *ctx, const qkv__llama *m, const char *dir)
{
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return qkv__fail(ctx, QKV_ERR_IO, "cannot create '%s': %s", dir, strerror(errno));
    const int64_t D = m->D, F = m->F, QD = m->Hq * m->hs, KV = m->Hkv * m->hs;
    const int64_t n_t = 3 + 9 * m->L;
    out_tensor *t = calloc((size_t)n_t, sizeof *t);
    float **perm = calloc((size_t)(2 * m->L), sizeof *perm);
    char *hdr = NULL;
    FILE *f = NULL;
    qkv_status s = QKV_OK;
    if (!t || !perm) {
        s = qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
        goto done;
    }
    int64_t k = 0;
#define ADD(nm, l, ptr, r, c) (set_tensor(&t[k++], nm, l, ptr, r, c))
    ADD("model.embed_tokens.weight", 0, m->emb, m->V, D);
    for (int64_t l = 0; l < m->L; l++) {
        const qkv__llama_layer *y = &m->layer[l];
        perm[2 * l] = malloc((size_t)(QD * D) * sizeof(float));
        perm[2 * l + 1] = malloc((size_t)(KV * D) * sizeof(float));
        if (!perm[2 * l] || !perm[2 * l + 1]) {
            s = qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
            goto done;
        }
        permute_rows(perm[2 * l], m->Hq, m->hs, D, y->wqkv);
        permute_rows(perm[2 * l + 1], m->Hkv, m->hs, D, y->wqkv + QD * D);
        ADD("model.layers.%d.input_layernorm.weight", l, y->att_norm, D, 0);
        ADD("model.layers.%d.self_attn.q_proj.weight", l, perm[2 * l], QD, D);
        ADD("model.layers.%d.self_attn.k_proj.weight", l, perm[2 * l + 1], KV, D);
        ADD("model.layers.%d.self_attn.v_proj.weight", l, y->wqkv + (QD + KV) * D, KV, D);
        ADD("model.layers.%d.self_attn.o_proj.weight", l, y->wo, D, QD);
        ADD("model.layers.%d.post_attention_layernorm.weight", l, y->ffn_norm, D, 0);
        ADD("model.layers.%d.mlp.gate_proj.weight", l, y->w13, F, D);
        ADD("model.layers.%d.mlp.up_proj.weight", l, y->w13 + F * D, F, D);
        ADD("model.layers.%d.mlp.down_proj.weight", l, y->w2, D, F);
    }
    ADD("model.norm.weight", 0, m->norm, D, 0);
    if (!m->shared_cls)
        ADD("lm_head.weight", 0, m->cls, m->V, D);
#undef ADD
    /* the header: names, shapes, offsets; padded with spaces to 8 bytes */
    size_t cap = 256 + (size_t)k * 192, len = 0, off = 0;
    hdr = malloc(cap);
    if (!hdr) {
        s = qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
        goto done;
    }
    len += (size_t)snprintf(hdr + len, cap - len, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int64_t i = 0; i < k; i++) {
        const size_t bytes = (size_t)(t[i].rows * (t[i].cols ? t[i].cols : 1)) * 4;
        char shape[64];
        if (t[i].cols)
            snprintf(shape, sizeof shape, "%lld,%lld", (long long)t[i].rows,
                     (long long)t[i].cols);
        else
            snprintf(shape, sizeof shape, "%lld", (long long)t[i].rows);
        len += (size_t)snprintf(hdr + len, cap - len, ",\"%s\":{\"dtype\":\"F32\",\"shape\":[%s],"
                                "\"data_offsets\":[%zu,%zu]}", t[i].name, shape, off,
                                off + bytes);
        off += bytes;
    }
    len += (size_t)snprintf(hdr + len, cap - len, "}");
    while (len % 8)
        hdr[len++] = ' ';
    unsigned char n8[8];
    for (int i = 0; i < 8; i++)
        n8[i] = (unsigned char)((uint64_t)len >> (8 * i));
    char path[4096];
    if ((s = qkv__path_join(ctx, path, sizeof path, dir, "model.safetensors")) ||
        (s = write_file(ctx, path, n8, 8, &f)))
        goto done;
    int ok = fwrite(hdr, 1, len, f) == len;
    for (int64_t i = 0; ok && i < k; i++) {
        const size_t nf = (size_t)(t[i].rows * (t[i].cols ? t[i].cols : 1));
        ok = fwrite(t[i].data, sizeof(float), nf, f) == nf;
    }
    ok = fclose(f) == 0 && ok;
    f = NULL;
    if (!ok) {
        s = qkv__fail(ctx, QKV_ERR_IO, "cannot write '%s'", path);
        goto done;
    }
    if ((s = write_config(ctx, m, dir)) == QKV_OK && m->has_tok)
        s = write_tokenizer(ctx, &m->tok, dir);
done:
    for (int64_t l = 0; perm && l < 2 * m->L; l++)
        free(perm[l]);
    free(perm);
    free(t);
    free(hdr);
    if (f)
        fclose(f);
    return s;
}
