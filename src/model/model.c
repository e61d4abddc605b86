/*
 * model.c — the qkv_model handle: reads config.json, picks the graph by
 * "model_type" (bert, vit, sasrec) and forwards the public calls to it,
 * checking that each call suits the loaded model. Also the weight loader
 * the graphs share.
 */
#include "model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { KIND_BERT, KIND_VIT, KIND_SASREC } model_kind;

struct qkv_model {
    model_kind   kind;
    qkv__bert   *bert;
    qkv__vit    *vit;
    qkv__sasrec *sasrec;
};

static float *load_named(qkv__loader *L, const char *fmt, int layer, int ndim,
                         const int64_t *shape)
{
    if (L->s != QKV_OK)
        return NULL;
    char rel[256], name[300];
    snprintf(rel, sizeof rel, fmt, layer);
    snprintf(name, sizeof name, "%s%s", L->prefix, rel);
    float *p = NULL;
    L->s = qkv__st_load(L->ctx, L->st, name, ndim, shape, &p);
    return p;
}

float *qkv__ld(qkv__loader *L, const char *fmt, int layer, int64_t d0, int64_t d1)
{
    int64_t shape[2] = { d0, d1 };
    return load_named(L, fmt, layer, d1 ? 2 : 1, shape);
}

float *qkv__ld3(qkv__loader *L, const char *fmt, int layer, int64_t d0, int64_t d1,
                int64_t d2)
{
    int64_t shape[3] = { d0, d1, d2 };
    return load_named(L, fmt, layer, 3, shape);
}

qkv_status qkv_model_load(qkv_ctx *ctx, const char *dir, qkv_model **model)
{
    if (!model)
        return qkv__fail(ctx, QKV_ERR_NULL, "model is NULL");
    *model = NULL;
    if (!ctx || !dir)
        return qkv__fail(ctx, QKV_ERR_NULL, "%s is NULL", ctx ? "dir" : "ctx");
    char path[4096];
    cJSON *cfg;
    qkv_status s = qkv__path_join(ctx, path, sizeof path, dir, "config.json");
    if (s != QKV_OK || (s = qkv__json_read(ctx, path, &cfg)) != QKV_OK)
        return s;
    qkv_model *m = calloc(1, sizeof *m);
    if (!m) {
        cJSON_Delete(cfg);
        return qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
    }
    const char *type = qkv__json_str(cfg, "model_type");
    if (!type) {
        s = qkv__fail(ctx, QKV_ERR_FORMAT, "config.json: 'model_type' is missing");
    } else if (strcmp(type, "bert") == 0) {
        m->kind = KIND_BERT;
        s = qkv__bert_load(ctx, dir, cfg, &m->bert);
    } else if (strcmp(type, "vit") == 0) {
        m->kind = KIND_VIT;
        s = qkv__vit_load(ctx, dir, cfg, &m->vit);
    } else if (strcmp(type, "sasrec") == 0) {
        m->kind = KIND_SASREC;
        s = qkv__sasrec_load(ctx, dir, cfg, &m->sasrec);
    } else {
        s = qkv__fail(ctx, QKV_ERR_UNSUPPORTED,
                      "config.json: model_type '%.64s' (bert, vit or sasrec supported)", type);
    }
    cJSON_Delete(cfg);
    if (s != QKV_OK) {
        qkv_model_free(m);
        return s;
    }
    *model = m;
    return QKV_OK;
}

void qkv_model_free(qkv_model *model)
{
    if (!model)
        return;
    qkv__bert_free(model->bert);
    qkv__vit_free(model->vit);
    qkv__sasrec_free(model->sasrec);
    free(model);
}

const char *qkv_model_type(const qkv_model *model)
{
    if (!model)
        return "";
    switch (model->kind) {
    case KIND_BERT: return "bert";
    case KIND_VIT:  return "vit";
    default:        return "sasrec";
    }
}

int64_t qkv_model_dim(const qkv_model *model)
{
    if (!model)
        return 0;
    switch (model->kind) {
    case KIND_BERT: return qkv__bert_dim(model->bert);
    case KIND_VIT:  return qkv__vit_classes(model->vit);
    default:        return qkv__sasrec_items(model->sasrec);
    }
}

/* The common checks of the calls below: ctx, model, its kind. */
static qkv_status want(qkv_ctx *ctx, const qkv_model *model, model_kind kind,
                       const char *call)
{
    static const char *const names[] = { "bert", "vit", "sasrec" };
    if (!ctx)
        return QKV_ERR_NULL;
    if (!model)
        return qkv__fail(ctx, QKV_ERR_NULL, "%s: model is NULL", call);
    if (model->kind != kind)
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "%s needs a %s model, this one is %s",
                         call, names[kind], names[model->kind]);
    return QKV_OK;
}

qkv_status qkv_model_tokenize(qkv_ctx *ctx, const qkv_model *model, const char *text,
                              int32_t *ids, int64_t cap, int64_t *n_ids)
{
    qkv_status s = want(ctx, model, KIND_BERT, "qkv_model_tokenize");
    if (s != QKV_OK)
        return s;
    if (!text || !ids || !n_ids)
        return qkv__fail(ctx, QKV_ERR_NULL, "qkv_model_tokenize: %s is NULL",
                         !text ? "text" : !ids ? "ids" : "n_ids");
    int64_t max = qkv__bert_max_tokens(model->bert);
    if (cap < max)
        return qkv__fail(ctx, QKV_ERR_SHAPE, "qkv_model_tokenize: cap %lld < %lld tokens",
                         (long long)cap, (long long)max);
    return qkv__wp_encode(ctx, qkv__bert_vocab(model->bert), text, strlen(text), ids, max,
                          n_ids);
}

int64_t qkv_model_max_tokens(const qkv_model *model)
{
    return model && model->kind == KIND_BERT ? qkv__bert_max_tokens(model->bert) : 0;
}

qkv_status qkv_model_embed(qkv_ctx *ctx, const qkv_model *model, const char *const *texts,
                           int64_t n, float *out)
{
    qkv_status s = want(ctx, model, KIND_BERT, "qkv_model_embed");
    if (s != QKV_OK)
        return s;
    if (n < 0)
        return qkv__fail(ctx, QKV_ERR_SHAPE, "qkv_model_embed: n = %lld < 0", (long long)n);
    if (n > 0 && (!texts || !out))
        return qkv__fail(ctx, QKV_ERR_NULL, "qkv_model_embed: %s is NULL",
                         !texts ? "texts" : "out");
    return qkv__bert_embed(ctx, model->bert, texts, n, out);
}

qkv_status qkv_model_classify(qkv_ctx *ctx, const qkv_model *model, const uint8_t *pixels,
                              int64_t n, float *logits)
{
    qkv_status s = want(ctx, model, KIND_VIT, "qkv_model_classify");
    if (s != QKV_OK)
        return s;
    if (n < 0)
        return qkv__fail(ctx, QKV_ERR_SHAPE, "qkv_model_classify: n = %lld < 0", (long long)n);
    if (n > 0 && (!pixels || !logits))
        return qkv__fail(ctx, QKV_ERR_NULL, "qkv_model_classify: %s is NULL",
                         !pixels ? "pixels" : "logits");
    return qkv__vit_classify(ctx, model->vit, pixels, n, logits);
}

qkv_status qkv_model_recommend(qkv_ctx *ctx, const qkv_model *model, const int32_t *history,
                               int64_t len, int64_t k, int32_t *items, float *scores)
{
    qkv_status s = want(ctx, model, KIND_SASREC, "qkv_model_recommend");
    if (s != QKV_OK)
        return s;
    int64_t n_items = qkv__sasrec_items(model->sasrec);
    if (len < 1 || k < 1 || k > n_items)
        return qkv__fail(ctx, QKV_ERR_SHAPE,
                         "qkv_model_recommend: len %lld must be >= 1 and k %lld in [1, %lld]",
                         (long long)len, (long long)k, (long long)n_items);
    if (!history || !items)
        return qkv__fail(ctx, QKV_ERR_NULL, "qkv_model_recommend: %s is NULL",
                         !history ? "history" : "items");
    for (int64_t i = 0; i < len; i++)
        if (history[i] < 1 || history[i] > n_items)
            return qkv__fail(ctx, QKV_ERR_ARG,
                             "qkv_model_recommend: history[%lld] = %d is not an item id in "
                             "[1, %lld]", (long long)i, history[i], (long long)n_items);
    return qkv__sasrec_recommend(ctx, model->sasrec, history, len, k, items, scores);
}

int64_t qkv_model_image_pixels(const qkv_model *model)
{
    return model && model->kind == KIND_VIT ? qkv__vit_pixels(model->vit) : 0;
}
