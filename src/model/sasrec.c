/*
 * sasrec.c — SASRec, the self-attentive sequential recommender (Kang &
 * McAuley 2018) in the layout of the pmixer/SASRec.pytorch checkpoint:
 * a history of item ids, cut to the last maxlen and left-padded with 0,
 * -> item embedding · sqrt(C) + position embedding (pads: position 0) ->
 * blocks of causal attention whose query is LayerNorm(x) while keys and
 * values read the un-normalized x, with the residual adding the normalized
 * query; then LayerNorm and a pointwise ReLU MLP whose residual again adds
 * the normalized input -> last LayerNorm -> the last slot's dot product
 * with every item embedding.
 *
 * Pad slots are attended to (this checkpoint has no timeline mask), so all
 * maxlen slots always run. Not a trainer; one history per call.
 */
#include "model.h"
#include "../nn/nn.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *lna_g, *lna_b, *win, *bin, *wo, *bo;   /* win [3C, C]: q, k, v rows */
    float *lnf_g, *lnf_b, *w1, *b1, *w2, *b2;     /* conv1 / conv2 as [C, C] */
} sasrec_layer;

struct qkv__sasrec {
    int64_t items, C, L, H, maxlen;
    float   eps, emb_scale;
    float  *item, *pos;                /* [items+1, C], [maxlen+1, C] */
    float  *last_g, *last_b;
    sasrec_layer *layer;
};

int64_t qkv__sasrec_items(const qkv__sasrec *m) { return m->items; }

static void sasrec_release(void *g)
{
    qkv__sasrec *m = g;
    for (int64_t l = 0; m->layer && l < m->L; l++) {
        sasrec_layer *y = &m->layer[l];
        float *p[] = { y->lna_g, y->lna_b, y->win, y->bin, y->wo, y->bo,
                       y->lnf_g, y->lnf_b, y->w1, y->b1, y->w2, y->b2 };
        for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
            free(p[i]);
    }
    free(m->layer);
    free(m->item); free(m->pos); free(m->last_g); free(m->last_b);
}

static qkv_status sasrec_config(qkv_ctx *ctx, const char *dir, const cJSON *cfg, void *g)
{
    qkv__sasrec *m = g;
    const char *f = "config.json";
    double eps;
    qkv_status s;
    if ((s = qkv__json_int(ctx, cfg, f, "item_num", 1, 1 << 26, &m->items)) ||
        (s = qkv__json_int(ctx, cfg, f, "hidden_units", 1, 1 << 14, &m->C)) ||
        (s = qkv__json_int(ctx, cfg, f, "num_blocks", 1, 1 << 10, &m->L)) ||
        (s = qkv__json_int(ctx, cfg, f, "num_heads", 1, 1 << 10, &m->H)) ||
        (s = qkv__json_int(ctx, cfg, f, "maxlen", 1, 1 << 16, &m->maxlen)) ||
        (s = qkv__json_num(ctx, cfg, f, "layernorm_eps", 0.0, 1.0, 1, 1e-8, &eps)))
        return s;
    if (m->C % m->H != 0)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "config.json: hidden_units %% num_heads != 0");
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cfg, "timeline_mask")) ||
        cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cfg, "attention_masks_padding_keys")))
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED,
                         "config.json: timeline / padding masks are not supported");
    m->eps = (float)eps;
    m->emb_scale = (float)sqrt((double)m->C);
    return QKV_OK;
}

static void sasrec_weights(qkv__loader *L, void *g)
{
    qkv__sasrec *m = g;
    int64_t C = m->C;
    m->item = qkv__ld(L, "item_emb.weight", 0, m->items + 1, C);
    m->pos = qkv__ld(L, "pos_emb.weight", 0, m->maxlen + 1, C);
    m->last_g = qkv__ld(L, "last_layernorm.weight", 0, C, 0);
    m->last_b = qkv__ld(L, "last_layernorm.bias", 0, C, 0);
    m->layer = calloc((size_t)m->L, sizeof *m->layer);
    if (!m->layer && L->s == QKV_OK)
        L->s = qkv__fail(L->ctx, QKV_ERR_NOMEM, "out of memory");
    for (int l = 0; m->layer && l < (int)m->L && L->s == QKV_OK; l++) {
        sasrec_layer *y = &m->layer[l];
        y->lna_g = qkv__ld(L, "attention_layernorms.%d.weight", l, C, 0);
        y->lna_b = qkv__ld(L, "attention_layernorms.%d.bias", l, C, 0);
        y->win = qkv__ld(L, "attention_layers.%d.in_proj_weight", l, 3 * C, C);
        y->bin = qkv__ld(L, "attention_layers.%d.in_proj_bias", l, 3 * C, 0);
        y->wo = qkv__ld(L, "attention_layers.%d.out_proj.weight", l, C, C);
        y->bo = qkv__ld(L, "attention_layers.%d.out_proj.bias", l, C, 0);
        y->lnf_g = qkv__ld(L, "forward_layernorms.%d.weight", l, C, 0);
        y->lnf_b = qkv__ld(L, "forward_layernorms.%d.bias", l, C, 0);
        y->w1 = qkv__ld3(L, "forward_layers.%d.conv1.weight", l, C, C, 1);
        y->b1 = qkv__ld(L, "forward_layers.%d.conv1.bias", l, C, 0);
        y->w2 = qkv__ld3(L, "forward_layers.%d.conv2.weight", l, C, C, 1);
        y->b2 = qkv__ld(L, "forward_layers.%d.conv2.bias", l, C, 0);
    }
}

const qkv__graph qkv__sasrec_graph = {
    "sasrec", sizeof(qkv__sasrec), sasrec_config, sasrec_weights, sasrec_release, NULL
};

qkv_status qkv__sasrec_recommend(qkv_ctx *ctx, const qkv__sasrec *m, const int32_t *history,
                                 int64_t len, int64_t k, int32_t *items, float *scores)
{
    int64_t C = m->C, S = m->maxlen, N = m->items;
    float *x = malloc((size_t)(S * C) * sizeof(float));
    float *qn = malloc((size_t)(S * C) * sizeof(float));
    float *q = malloc((size_t)(S * C) * sizeof(float));
    float *kv = malloc((size_t)(S * 2 * C) * sizeof(float));
    float *a = malloc((size_t)(S * C) * sizeof(float));
    float *h = malloc((size_t)(S * C) * sizeof(float));
    float *sc = malloc((size_t)(N + 1) * sizeof(float));
    int32_t *best = malloc((size_t)k * sizeof(int32_t));
    qkv_status s = QKV_OK;
    if (!x || !qn || !q || !kv || !a || !h || !sc || !best) {
        s = qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
        goto done;
    }
    /* slot t holds history[len - S + t] (0 = pad when that is before the start) */
    for (int64_t t = 0; t < S; t++) {
        int64_t src = len - S + t;
        int32_t id = src >= 0 ? history[src] : 0;
        const float *e = m->item + (int64_t)id * C, *p = m->pos + (id ? t + 1 : 0) * C;
        for (int64_t c = 0; c < C; c++)
            x[t * C + c] = e[c] * m->emb_scale + p[c];
    }
    qkv_attn_opts opts = qkv_attn_opts_default();
    opts.causal = 1;
    for (int64_t l = 0; l < m->L; l++) {
        const sasrec_layer *y = &m->layer[l];
        qkv__layernorm(ctx, x, C, S, C, y->lna_g, y->lna_b, m->eps, qn, C);
        qkv__linear(ctx, qn, S, C, C, y->win, y->bin, C, q, C);
        qkv__linear(ctx, x, S, C, C, y->win + C * C, y->bin + C, 2 * C, kv, 2 * C);
        s = qkv__mha(ctx, q, C, kv, kv + C, 2 * C, 1, S, m->H, C / m->H, &opts, a, C);
        if (s != QKV_OK)
            goto done;
        qkv__linear(ctx, a, S, C, C, y->wo, y->bo, C, x, C);
        qkv__add(x, C, qn, C, S, C);
        qkv__layernorm(ctx, x, C, S, C, y->lnf_g, y->lnf_b, m->eps, x, C);
        qkv__linear(ctx, x, S, C, C, y->w1, y->b1, C, h, C);
        qkv__relu(ctx, h, S, C, C);
        qkv__linear(ctx, h, S, C, C, y->w2, y->b2, C, a, C);
        qkv__add(x, C, a, C, S, C);
    }
    float *last = x + (S - 1) * C;
    qkv__layernorm(ctx, last, C, 1, C, m->last_g, m->last_b, m->eps, last, C);
    cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)N, (int)C, 1.0f, m->item + C, (int)C,
                last, 1, 0.0f, sc + 1, 1);
    /* top k by insertion: higher score first, the smaller id on ties */
    int64_t nb = 0;
    for (int32_t id = 1; id <= N; id++) {
        if (nb == k && !(sc[id] > sc[best[k - 1]]))
            continue;
        int64_t i = nb < k ? nb++ : k - 1;
        while (i > 0 && sc[id] > sc[best[i - 1]]) {
            best[i] = best[i - 1];
            i--;
        }
        best[i] = id;
    }
    for (int64_t i = 0; i < k; i++) {
        items[i] = best[i];
        if (scores)
            scores[i] = sc[best[i]];
    }
done:
    free(x); free(qn); free(q); free(kv); free(a); free(h); free(sc); free(best);
    return s;
}
