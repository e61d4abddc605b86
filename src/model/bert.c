/*
 * bert.c — BERT encoders as sentence embedders (sentence-transformers'
 * all-MiniLM-L6-v2 and its kind): WordPiece ids -> word + position +
 * token-type embeddings -> LayerNorm -> post-norm encoder layers (fused
 * QKV projection, attention, output projection + residual + LayerNorm,
 * GELU MLP + residual + LayerNorm) -> mean over each sentence's tokens ->
 * L2 normalization.
 *
 * A batch is packed without padding: the sentences' tokens are stacked
 * into one [T, C] matrix and attention runs once over all of them with
 * cu_seqlens, so no compute is spent on pad tokens and no mask is needed.
 * The tokenizer follows tokenizer_config.json (lower case, accents, CJK;
 * all on when the file is absent), the truncation sentence_bert_config.json.
 * Not supported: pair inputs (token type 1), the pooler, other poolings.
 */
#include "model.h"
#include "../nn/nn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *wqkv, *bqkv;    /* [3C, C], [3C]: query, key, value rows stacked */
    float *wo, *bo;        /* [C, C], [C] */
    float *ln1_g, *ln1_b;  /* after attention */
    float *w1, *b1;        /* [I, C], [I] */
    float *w2, *b2;        /* [C, I], [C] */
    float *ln2_g, *ln2_b;  /* after the MLP */
} bert_layer;

struct qkv__bert {
    int64_t C, H, I, L, vocab, max_pos, max_tokens;
    float   eps;
    int     normalize;     /* L2-normalize the pooled vector */
    float  *wemb, *pemb, *temb, *ln_g, *ln_b;
    bert_layer   *layer;
    qkv__wordpiece wp;
};

enum { BATCH_CHUNK = 64 };   /* sentences per pass (bounds the activations) */

int64_t qkv__bert_dim(const qkv__bert *m) { return m->C; }
int64_t qkv__bert_max_tokens(const qkv__bert *m) { return m->max_tokens; }
const qkv__wordpiece *qkv__bert_vocab(const qkv__bert *m) { return &m->wp; }

static void bert_release(void *g)
{
    qkv__bert *m = g;
    for (int64_t l = 0; m->layer && l < m->L; l++) {
        bert_layer *y = &m->layer[l];
        float *p[] = { y->wqkv, y->bqkv, y->wo, y->bo, y->ln1_g, y->ln1_b,
                       y->w1, y->b1, y->w2, y->b2, y->ln2_g, y->ln2_b };
        for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
            free(p[i]);
    }
    free(m->layer);
    free(m->wemb); free(m->pemb); free(m->temb); free(m->ln_g); free(m->ln_b);
    qkv__wp_free(&m->wp);
}

/* Stacks the separate query/key/value weights into one [3C, C] matrix. */
static void load_qkv(qkv__loader *L, int l, int64_t C, bert_layer *y)
{
    static const char *const part[3] = { "query", "key", "value" };
    y->wqkv = malloc((size_t)(3 * C * C) * sizeof(float));
    y->bqkv = malloc((size_t)(3 * C) * sizeof(float));
    if (!y->wqkv || !y->bqkv) {
        if (L->s == QKV_OK)
            L->s = qkv__fail(L->ctx, QKV_ERR_NOMEM, "out of memory loading the weights");
        return;
    }
    for (int p = 0; p < 3; p++) {
        char name[96];
        snprintf(name, sizeof name, "encoder.layer.%%d.attention.self.%s.weight", part[p]);
        float *w = qkv__ld(L, name, l, C, C);
        snprintf(name, sizeof name, "encoder.layer.%%d.attention.self.%s.bias", part[p]);
        float *b = qkv__ld(L, name, l, C, 0);
        if (w && b) {
            memcpy(y->wqkv + p * C * C, w, (size_t)(C * C) * sizeof(float));
            memcpy(y->bqkv + p * C, b, (size_t)C * sizeof(float));
        }
        free(w);
        free(b);
    }
}

/* The optional configs: max_seq_length from sentence_bert_config.json,
   the tokenizer's switches from tokenizer_config.json (strip_accents null
   follows do_lower_case, as in the Hugging Face tokenizer). */
static qkv_status read_optional_configs(qkv_ctx *ctx, const char *dir, qkv__bert *m)
{
    cJSON *j;
    qkv_status s = qkv__json_read_optional(ctx, dir, "sentence_bert_config.json", &j);
    if (s == QKV_OK && j && cJSON_GetObjectItemCaseSensitive(j, "max_seq_length"))
        s = qkv__json_int(ctx, j, "sentence_bert_config.json", "max_seq_length", 2,
                          m->max_pos, &m->max_tokens);
    cJSON_Delete(j);
    if (s != QKV_OK || (s = qkv__json_read_optional(ctx, dir, "tokenizer_config.json", &j)))
        return s;
    const char *f = "tokenizer_config.json";
    if (j && ((s = qkv__json_bool(ctx, j, f, "do_lower_case", 1, &m->wp.lower)) ||
              (s = qkv__json_bool(ctx, j, f, "strip_accents", m->wp.lower, &m->wp.strip)) ||
              (s = qkv__json_bool(ctx, j, f, "tokenize_chinese_chars", 1, &m->wp.cjk)))) {
        cJSON_Delete(j);
        return s;
    }
    cJSON_Delete(j);
    /* pooling: only the mean over the tokens */
    if ((s = qkv__json_read_optional(ctx, dir, "1_Pooling/config.json", &j)) != QKV_OK)
        return s;
    int mean = 1, other = 0;
    const char *const modes[] = { "pooling_mode_cls_token", "pooling_mode_max_tokens",
                                  "pooling_mode_mean_sqrt_len_tokens" };
    f = "1_Pooling/config.json";
    s = j ? qkv__json_bool(ctx, j, f, "pooling_mode_mean_tokens", 1, &mean) : QKV_OK;
    for (int i = 0; s == QKV_OK && j && i < 3; i++) {
        int on = 0;
        s = qkv__json_bool(ctx, j, f, modes[i], 0, &on);
        other |= on;
    }
    cJSON_Delete(j);
    if (s == QKV_OK && (!mean || other))
        s = qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "%s: only mean pooling is supported", f);
    if (s != QKV_OK)
        return s;
    /* modules.json lists a Normalize module when the vectors are L2-normalized */
    if ((s = qkv__json_read_optional(ctx, dir, "modules.json", &j)) != QKV_OK)
        return s;
    const cJSON *mod;
    if (j)
        m->normalize = 0;
    cJSON_ArrayForEach(mod, j) {   /* no-op when j is NULL */
        const char *type = qkv__json_str(mod, "type"), *known[] = {
            "sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
            "sentence_transformers.models.Normalize" };
        int k = 0;
        while (k < 3 && !(type && strcmp(type, known[k]) == 0))
            k++;
        if (k == 3) {
            s = qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "modules.json: module '%.80s' is not "
                          "supported (Transformer, Pooling, Normalize)", type ? type : "?");
            break;
        }
        m->normalize |= k == 2;
    }
    cJSON_Delete(j);
    return s;
}

/* config.json, vocab.txt, and the optional configs */
static qkv_status bert_config(qkv_ctx *ctx, const char *dir, const cJSON *cfg, void *g)
{
    qkv__bert *m = g;
    const char *f = "config.json";
    double eps;
    qkv_status s;
    if ((s = qkv__json_int(ctx, cfg, f, "hidden_size", 1, 1 << 16, &m->C)) ||
        (s = qkv__json_int(ctx, cfg, f, "num_attention_heads", 1, 1 << 10, &m->H)) ||
        (s = qkv__json_int(ctx, cfg, f, "intermediate_size", 1, 1 << 18, &m->I)) ||
        (s = qkv__json_int(ctx, cfg, f, "num_hidden_layers", 1, 1 << 10, &m->L)) ||
        (s = qkv__json_int(ctx, cfg, f, "vocab_size", 3, 1 << 24, &m->vocab)) ||
        (s = qkv__json_int(ctx, cfg, f, "max_position_embeddings", 2, 1 << 20, &m->max_pos)) ||
        (s = qkv__json_num(ctx, cfg, f, "layer_norm_eps", 0.0, 1.0, 1, 1e-12, &eps)))
        return s;
    const char *act = qkv__json_str(cfg, "hidden_act");
    if (m->C % m->H != 0 || (act && strcmp(act, "gelu") != 0))
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "config.json: hidden_size %% num_attention_heads != 0, or hidden_act "
                         "is not \"gelu\"");
    m->eps = (float)eps;
    m->normalize = 1;
    m->max_tokens = m->max_pos;
    char path[4096];
    if ((s = qkv__path_join(ctx, path, sizeof path, dir, "vocab.txt")) ||
        (s = qkv__wp_load(ctx, path, &m->wp)) || (s = read_optional_configs(ctx, dir, m)))
        return s;
    if (m->wp.n != m->vocab)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "vocab.txt has %d tokens, config.json says %lld",
                         m->wp.n, (long long)m->vocab);
    return QKV_OK;
}

static void bert_weights(qkv__loader *L, void *g)
{
    qkv__bert *m = g;
    /* checkpoints saved from BertForX carry a "bert." prefix */
    if (qkv__st_find(L->st, "bert.embeddings.word_embeddings.weight"))
        L->prefix = "bert.";
    int64_t C = m->C;
    m->wemb = qkv__ld(L, "embeddings.word_embeddings.weight", 0, m->vocab, C);
    m->pemb = qkv__ld(L, "embeddings.position_embeddings.weight", 0, m->max_pos, C);
    /* the token-type table may have any number of rows: row 0 is used */
    const qkv__st_tensor *tt = qkv__ld_find(L, "embeddings.token_type_embeddings.weight");
    m->temb = qkv__ld(L, "embeddings.token_type_embeddings.weight", 0,
                      tt && tt->ndim == 2 && tt->shape[0] >= 1 ? tt->shape[0] : 1, C);
    m->ln_g = qkv__ld(L, "embeddings.LayerNorm.weight", 0, C, 0);
    m->ln_b = qkv__ld(L, "embeddings.LayerNorm.bias", 0, C, 0);
    m->layer = calloc((size_t)m->L, sizeof *m->layer);
    if (!m->layer && L->s == QKV_OK)
        L->s = qkv__fail(L->ctx, QKV_ERR_NOMEM, "out of memory");
    for (int l = 0; m->layer && l < (int)m->L && L->s == QKV_OK; l++) {
        bert_layer *y = &m->layer[l];
        load_qkv(L, l, C, y);
        y->wo = qkv__ld(L, "encoder.layer.%d.attention.output.dense.weight", l, C, C);
        y->bo = qkv__ld(L, "encoder.layer.%d.attention.output.dense.bias", l, C, 0);
        y->ln1_g = qkv__ld(L, "encoder.layer.%d.attention.output.LayerNorm.weight", l, C, 0);
        y->ln1_b = qkv__ld(L, "encoder.layer.%d.attention.output.LayerNorm.bias", l, C, 0);
        y->w1 = qkv__ld(L, "encoder.layer.%d.intermediate.dense.weight", l, m->I, C);
        y->b1 = qkv__ld(L, "encoder.layer.%d.intermediate.dense.bias", l, m->I, 0);
        y->w2 = qkv__ld(L, "encoder.layer.%d.output.dense.weight", l, C, m->I);
        y->b2 = qkv__ld(L, "encoder.layer.%d.output.dense.bias", l, C, 0);
        y->ln2_g = qkv__ld(L, "encoder.layer.%d.output.LayerNorm.weight", l, C, 0);
        y->ln2_b = qkv__ld(L, "encoder.layer.%d.output.LayerNorm.bias", l, C, 0);
    }
}

const qkv__graph qkv__bert_graph = {
    "bert", sizeof(qkv__bert), bert_config, bert_weights, bert_release, NULL
};

/* The activations of one pass over T packed tokens. */
typedef struct {
    float *x, *qkv, *a, *h, *f;   /* [T,C] [T,3C] [T,C] [T,C] [T,I] */
} bert_bufs;

/* Runs the encoder on x [T, C] (already embedded) in place. */
static qkv_status encode(qkv_ctx *ctx, const qkv__bert *m, int64_t T, const int32_t *cu,
                         int32_t n_seqs, bert_bufs *b)
{
    int64_t C = m->C, H = m->H, D = C / H, I = m->I;
    qkv_attn_opts opts = qkv_attn_opts_default();
    opts.cu_seqlens_q = cu;
    opts.cu_seqlens_k = cu;
    opts.n_seqs = n_seqs;
    for (int64_t l = 0; l < m->L; l++) {
        const bert_layer *y = &m->layer[l];
        qkv__linear(ctx, b->x, T, C, C, y->wqkv, y->bqkv, 3 * C, b->qkv, 3 * C);
        qkv_status s = qkv__mha(ctx, b->qkv, 3 * C, b->qkv + C, b->qkv + 2 * C, 3 * C,
                                1, T, H, D, &opts, b->a, C);
        if (s != QKV_OK)
            return s;
        qkv__linear(ctx, b->a, T, C, C, y->wo, y->bo, C, b->h, C);
        qkv__add(b->h, C, b->x, C, T, C);
        qkv__layernorm(ctx, b->h, C, T, C, y->ln1_g, y->ln1_b, m->eps, b->x, C);
        qkv__linear(ctx, b->x, T, C, C, y->w1, y->b1, I, b->f, I);
        qkv__gelu(ctx, b->f, T, I, I);
        qkv__linear(ctx, b->f, T, I, I, y->w2, y->b2, C, b->h, C);
        qkv__add(b->h, C, b->x, C, T, C);
        qkv__layernorm(ctx, b->h, C, T, C, y->ln2_g, y->ln2_b, m->eps, b->x, C);
    }
    return QKV_OK;
}

/* Embeds n <= BATCH_CHUNK sentences into out [n, C]. */
static qkv_status embed_chunk(qkv_ctx *ctx, const qkv__bert *m, const char *const *texts,
                              int64_t n, float *out)
{
    int64_t C = m->C, I = m->I, S = m->max_tokens;
    int32_t *ids = malloc((size_t)(n * S) * sizeof(int32_t));
    int32_t *cu = malloc((size_t)(n + 1) * sizeof(int32_t));
    double *acc = malloc((size_t)C * sizeof(double));
    bert_bufs b = { 0 };
    qkv_status s = QKV_OK;
    if (!ids || !cu || !acc) {
        s = qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
        goto done;
    }
    cu[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t k;
        if (!texts[i]) {
            s = qkv__fail(ctx, QKV_ERR_NULL, "texts[%lld] is NULL", (long long)i);
            goto done;
        }
        s = qkv__wp_encode(ctx, &m->wp, texts[i], strlen(texts[i]), ids + cu[i], S, &k);
        if (s != QKV_OK) {
            char msg[400];
            snprintf(msg, sizeof msg, "%s", qkv_ctx_last_error(ctx));
            qkv__fail(ctx, s, "texts[%lld]: %s", (long long)i, msg);
            goto done;
        }
        cu[i + 1] = cu[i] + (int32_t)k;
    }
    int64_t T = cu[n];
    b.x = malloc((size_t)(T * C) * sizeof(float));
    b.qkv = malloc((size_t)(T * 3 * C) * sizeof(float));
    b.a = malloc((size_t)(T * C) * sizeof(float));
    b.h = malloc((size_t)(T * C) * sizeof(float));
    b.f = malloc((size_t)(T * I) * sizeof(float));
    if (!b.x || !b.qkv || !b.a || !b.h || !b.f) {
        s = qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory for %lld tokens", (long long)T);
        goto done;
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t t = cu[i]; t < cu[i + 1]; t++) {
            const float *w = m->wemb + (int64_t)ids[t] * C, *p = m->pemb + (t - cu[i]) * C;
            float *x = b.x + t * C;
            for (int64_t c = 0; c < C; c++)
                x[c] = w[c] + p[c] + m->temb[c];
        }
    qkv__layernorm(ctx, b.x, C, T, C, m->ln_g, m->ln_b, m->eps, b.x, C);
    if ((s = encode(ctx, m, T, cu, (int32_t)n, &b)) != QKV_OK)
        goto done;
    for (int64_t i = 0; i < n; i++) {   /* mean pooling, then L2 */
        double ss = 0.0;
        for (int64_t c = 0; c < C; c++)
            acc[c] = 0.0;
        for (int64_t t = cu[i]; t < cu[i + 1]; t++)
            for (int64_t c = 0; c < C; c++)
                acc[c] += b.x[t * C + c];
        for (int64_t c = 0; c < C; c++) {
            acc[c] /= (double)(cu[i + 1] - cu[i]);
            ss += acc[c] * acc[c];
        }
        double inv = m->normalize ? 1.0 / fmax(sqrt(ss), 1e-12) : 1.0;
        for (int64_t c = 0; c < C; c++)
            out[i * C + c] = (float)(acc[c] * inv);
    }
done:
    free(ids); free(cu); free(acc);
    free(b.x); free(b.qkv); free(b.a); free(b.h); free(b.f);
    return s;
}

qkv_status qkv__bert_embed(qkv_ctx *ctx, const qkv__bert *m, const char *const *texts,
                           int64_t n, float *out)
{
    for (int64_t i = 0; i < n; i += BATCH_CHUNK) {
        int64_t k = n - i < BATCH_CHUNK ? n - i : BATCH_CHUNK;
        qkv_status s = embed_chunk(ctx, m, texts + i, k, out + i * m->C);
        if (s != QKV_OK)
            return s;
    }
    return QKV_OK;
}
