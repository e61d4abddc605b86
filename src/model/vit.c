/*
 * vit.c — a Vision Transformer classifier (the ViT4MNIST layout, an early
 * vit-pytorch): non-overlapping square patches -> linear embedding ->
 * [cls] + patches + learned positions -> pre-norm blocks (LayerNorm, fused
 * QKV without bias, attention over all tokens, output projection,
 * residual; LayerNorm, GELU MLP, residual) -> MLP head on the cls token.
 *
 * Images are single-channel bytes, normalized with the config's
 * input_normalization; the attention scale comes from the config (this
 * checkpoint uses dim^-0.5, not head_dim^-0.5). Not supported: several
 * channels, a final LayerNorm, mean pooling.
 */
#include "model.h"
#include "../nn/nn.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *ln1_g, *ln1_b, *wqkv;   /* wqkv [3C, C], no bias */
    float *wo, *bo;
    float *ln2_g, *ln2_b, *w1, *b1, *w2, *b2;
} vit_layer;

struct qkv__vit {
    int64_t img, patch, grid, C, H, L, M, classes, tokens, head_hidden;
    float   scale, mean, std, eps;
    float  *wpatch, *bpatch, *cls, *pos;   /* [C, P*P], [C], [C], [tokens, C] */
    float  *wh1, *bh1, *wh2, *bh2;         /* head: [hh, C], [hh], [classes, hh], [classes] */
    vit_layer *layer;
};

enum { IMAGE_CHUNK = 256 };

int64_t qkv__vit_classes(const qkv__vit *m) { return m->classes; }
int64_t qkv__vit_pixels(const qkv__vit *m) { return m->img * m->img; }

static void vit_release(void *g)
{
    qkv__vit *m = g;
    for (int64_t l = 0; m->layer && l < m->L; l++) {
        vit_layer *y = &m->layer[l];
        float *p[] = { y->ln1_g, y->ln1_b, y->wqkv, y->wo, y->bo, y->ln2_g, y->ln2_b,
                       y->w1, y->b1, y->w2, y->b2 };
        for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
            free(p[i]);
    }
    free(m->layer);
    free(m->wpatch); free(m->bpatch); free(m->cls); free(m->pos);
    free(m->wh1); free(m->bh1); free(m->wh2); free(m->bh2);
}

static qkv_status vit_config(qkv_ctx *ctx, const char *dir, const cJSON *cfg, void *g)
{
    qkv__vit *m = g;
    const char *f = "config.json";
    int64_t ch;
    double scale, mean, std;
    qkv_status s;
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(cfg, "input_normalization");
    if ((s = qkv__json_int(ctx, cfg, f, "image_size", 1, 4096, &m->img)) ||
        (s = qkv__json_int(ctx, cfg, f, "channels", 1, 1, &ch)) ||
        (s = qkv__json_int(ctx, cfg, f, "patch_size", 1, 4096, &m->patch)) ||
        (s = qkv__json_int(ctx, cfg, f, "dim", 1, 1 << 16, &m->C)) ||
        (s = qkv__json_int(ctx, cfg, f, "depth", 1, 1 << 10, &m->L)) ||
        (s = qkv__json_int(ctx, cfg, f, "heads", 1, 1 << 10, &m->H)) ||
        (s = qkv__json_int(ctx, cfg, f, "mlp_dim", 1, 1 << 18, &m->M)) ||
        (s = qkv__json_int(ctx, cfg, f, "num_classes", 1, 1 << 20, &m->classes)) ||
        (s = qkv__json_num(ctx, cfg, f, "attention_scale", -1e6, 1e6, 1, 0.0, &scale)) ||
        (s = qkv__json_num(ctx, norm, f, "mean", -1e6, 1e6, 1, 0.0, &mean)) ||
        (s = qkv__json_num(ctx, norm, f, "std", 1e-12, 1e6, 1, 1.0, &std)))
        return s;
    if (m->img % m->patch != 0 || m->C % m->H != 0)
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "config.json: image_size %% patch_size or dim %% heads is not 0");
    const cJSON *qb = cJSON_GetObjectItemCaseSensitive(cfg, "qkv_bias");
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(cfg, "final_norm");
    const char *act = qkv__json_str(cfg, "activation");
    if (cJSON_IsTrue(qb) || cJSON_IsTrue(fn) || (act && strcmp(act, "gelu_erf") != 0))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED,
                         "config.json: qkv_bias, final_norm or an activation other than "
                         "gelu_erf");
    m->grid = m->img / m->patch;
    m->tokens = m->grid * m->grid + 1;
    m->scale = (float)scale;
    m->mean = (float)mean;
    m->std = (float)std;
    m->eps = 1e-5f;
    return QKV_OK;
}

static void vit_weights(qkv__loader *L, void *g)
{
    qkv__vit *m = g;
    int64_t C = m->C;
    /* the head's hidden width is the checkpoint's own */
    const qkv__st_tensor *h1 = qkv__ld_find(L, "mlp_head.0.weight");
    m->head_hidden = h1 && h1->ndim == 2 && h1->shape[0] > 0 ? h1->shape[0] : m->M;
    m->cls = qkv__ld3(L, "cls_token", 0, 1, 1, C);
    m->pos = qkv__ld3(L, "pos_embedding", 0, 1, m->tokens, C);
    m->wpatch = qkv__ld(L, "patch_to_embedding.weight", 0, C, m->patch * m->patch);
    m->bpatch = qkv__ld(L, "patch_to_embedding.bias", 0, C, 0);
    m->wh1 = qkv__ld(L, "mlp_head.0.weight", 0, m->head_hidden, C);
    m->bh1 = qkv__ld(L, "mlp_head.0.bias", 0, m->head_hidden, 0);
    m->wh2 = qkv__ld(L, "mlp_head.2.weight", 0, m->classes, m->head_hidden);
    m->bh2 = qkv__ld(L, "mlp_head.2.bias", 0, m->classes, 0);
    m->layer = calloc((size_t)m->L, sizeof *m->layer);
    if (!m->layer && L->s == QKV_OK)
        L->s = qkv__fail(L->ctx, QKV_ERR_NOMEM, "out of memory");
    for (int l = 0; m->layer && l < (int)m->L && L->s == QKV_OK; l++) {
        vit_layer *y = &m->layer[l];
        y->ln1_g = qkv__ld(L, "transformer.layers.%d.0.fn.norm.weight", l, C, 0);
        y->ln1_b = qkv__ld(L, "transformer.layers.%d.0.fn.norm.bias", l, C, 0);
        y->wqkv = qkv__ld(L, "transformer.layers.%d.0.fn.fn.to_qkv.weight", l, 3 * C, C);
        y->wo = qkv__ld(L, "transformer.layers.%d.0.fn.fn.to_out.weight", l, C, C);
        y->bo = qkv__ld(L, "transformer.layers.%d.0.fn.fn.to_out.bias", l, C, 0);
        y->ln2_g = qkv__ld(L, "transformer.layers.%d.1.fn.norm.weight", l, C, 0);
        y->ln2_b = qkv__ld(L, "transformer.layers.%d.1.fn.norm.bias", l, C, 0);
        y->w1 = qkv__ld(L, "transformer.layers.%d.1.fn.fn.net.0.weight", l, m->M, C);
        y->b1 = qkv__ld(L, "transformer.layers.%d.1.fn.fn.net.0.bias", l, m->M, 0);
        y->w2 = qkv__ld(L, "transformer.layers.%d.1.fn.fn.net.2.weight", l, C, m->M);
        y->b2 = qkv__ld(L, "transformer.layers.%d.1.fn.fn.net.2.bias", l, C, 0);
    }
}

const qkv__graph qkv__vit_graph = {
    "vit", sizeof(qkv__vit), vit_config, vit_weights, vit_release, NULL
};

/* Classifies n <= IMAGE_CHUNK images. */
static qkv_status classify_chunk(qkv_ctx *ctx, const qkv__vit *m, const uint8_t *pixels,
                                 int64_t n, float *logits)
{
    int64_t C = m->C, S = m->tokens, T = n * S, P = m->patch, G = m->grid, PP = P * P;
    int64_t np = n * G * G, hh = m->head_hidden;
    float *patches = malloc((size_t)(np * PP) * sizeof(float));
    float *emb = malloc((size_t)(np * C) * sizeof(float));
    float *x = malloc((size_t)(T * C) * sizeof(float));
    float *h = malloc((size_t)(T * C) * sizeof(float));
    float *qkv = malloc((size_t)(T * 3 * C) * sizeof(float));
    float *a = malloc((size_t)(T * C) * sizeof(float));
    float *f = malloc((size_t)(T * (m->M > hh ? m->M : hh)) * sizeof(float));
    qkv_status s = QKV_OK;
    if (!patches || !emb || !x || !h || !qkv || !a || !f) {
        s = qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory for %lld images", (long long)n);
        goto done;
    }
    /* patch (b, r, c) -> row (b*G + r)*G + c; inside, pixels row-major */
    for (int64_t b = 0; b < n; b++)
        for (int64_t r = 0; r < G; r++)
            for (int64_t c = 0; c < G; c++) {
                float *p = patches + ((b * G + r) * G + c) * PP;
                for (int64_t i = 0; i < P; i++)
                    for (int64_t j = 0; j < P; j++) {
                        uint8_t v = pixels[(b * m->img + r * P + i) * m->img + c * P + j];
                        p[i * P + j] = ((float)v / 255.0f - m->mean) / m->std;
                    }
            }
    qkv__linear(ctx, patches, np, PP, PP, m->wpatch, m->bpatch, C, emb, C);
    for (int64_t b = 0; b < n; b++)
        for (int64_t t = 0; t < S; t++) {
            const float *src = t == 0 ? m->cls : emb + (b * (S - 1) + t - 1) * C;
            for (int64_t c = 0; c < C; c++)
                x[(b * S + t) * C + c] = src[c] + m->pos[t * C + c];
        }
    qkv_attn_opts opts = qkv_attn_opts_default();
    opts.scale = m->scale;
    for (int64_t l = 0; l < m->L; l++) {
        const vit_layer *y = &m->layer[l];
        qkv__layernorm(ctx, x, C, T, C, y->ln1_g, y->ln1_b, m->eps, h, C);
        qkv__linear(ctx, h, T, C, C, y->wqkv, NULL, 3 * C, qkv, 3 * C);
        s = qkv__mha(ctx, qkv, 3 * C, qkv + C, qkv + 2 * C, 3 * C, n, S, m->H, C / m->H,
                     &opts, a, C);
        if (s != QKV_OK)
            goto done;
        qkv__linear(ctx, a, T, C, C, y->wo, y->bo, C, h, C);
        qkv__add(x, C, h, C, T, C);
        qkv__layernorm(ctx, x, C, T, C, y->ln2_g, y->ln2_b, m->eps, h, C);
        qkv__linear(ctx, h, T, C, C, y->w1, y->b1, m->M, f, m->M);
        qkv__gelu(ctx, f, T, m->M, m->M);
        qkv__linear(ctx, f, T, m->M, m->M, y->w2, y->b2, C, h, C);
        qkv__add(x, C, h, C, T, C);
    }
    /* the head reads the cls rows in place: row b*S, a stride of S*C */
    qkv__linear(ctx, x, n, C, S * C, m->wh1, m->bh1, hh, f, hh);
    qkv__gelu(ctx, f, n, hh, hh);
    qkv__linear(ctx, f, n, hh, hh, m->wh2, m->bh2, m->classes, logits, m->classes);
done:
    free(patches); free(emb); free(x); free(h); free(qkv); free(a); free(f);
    return s;
}

qkv_status qkv__vit_classify(qkv_ctx *ctx, const qkv__vit *m, const uint8_t *pixels,
                             int64_t n, float *logits)
{
    int64_t px = m->img * m->img;
    for (int64_t i = 0; i < n; i += IMAGE_CHUNK) {
        int64_t k = n - i < IMAGE_CHUNK ? n - i : IMAGE_CHUNK;
        qkv_status s = classify_chunk(ctx, m, pixels + i * px, k, logits + i * m->classes);
        if (s != QKV_OK)
            return s;
    }
    return QKV_OK;
}
