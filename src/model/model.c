/*
 * model.c — the qkv_model handle: reads config.json, picks the graph by
 * "model_type" (bert, vit, sasrec, llama) and forwards the public calls to
 * it, checking that each call suits the loaded model; a path that is a
 * file is a llama2.c checkpoint. Also the weight loader the graphs share.
 */
#include "model.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const qkv__graph *const graphs[] = { &qkv__bert_graph, &qkv__vit_graph,
                                             &qkv__sasrec_graph, &qkv__llama_graph };

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

const qkv__st_tensor *qkv__ld_find(const qkv__loader *L, const char *name)
{
    char full[300];
    snprintf(full, sizeof full, "%s%s", L->prefix, name);
    return qkv__st_find(L->st, full);
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

/* A llama2.c checkpoint file as a model. */
static qkv_status load_llama_file(qkv_ctx *ctx, const char *path, const char *tokenizer,
                                  qkv_model **model)
{
    qkv_model *m = calloc(1, sizeof *m);
    qkv__llama *g = calloc(1, sizeof *g);
    if (!m || !g) {
        free(m);
        free(g);
        return qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
    }
    qkv_status s = qkv__llama_load_file(ctx, path, tokenizer, g);
    if (s != QKV_OK) {
        free(m);
        free(g);
        return s;
    }
    m->graph = &qkv__llama_graph;
    m->g = g;
    *model = m;
    return QKV_OK;
}

static int is_file(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* A model folder (or a llama2.c file); tokenizer: llama's, or NULL. */
static qkv_status load(qkv_ctx *ctx, const char *dir, const char *tokenizer, int want_llama,
                       qkv_model **model)
{
    if (!model)
        return qkv__fail(ctx, QKV_ERR_NULL, "model is NULL");
    *model = NULL;
    if (!ctx || !dir)
        return qkv__fail(ctx, QKV_ERR_NULL, "%s is NULL", ctx ? "path" : "ctx");
    struct stat sb;
    if (stat(dir, &sb) != 0)
        return qkv__fail(ctx, QKV_ERR_IO, "cannot open '%s' (a folder with config.json, or a "
                         "llama2.c checkpoint): %s", dir, strerror(errno));
    if (is_file(dir))
        return load_llama_file(ctx, dir, tokenizer, model);
    char path[4096];
    cJSON *cfg;
    qkv_status s = qkv__path_join(ctx, path, sizeof path, dir, "config.json");
    if (s != QKV_OK || (s = qkv__json_read(ctx, path, &cfg)) != QKV_OK)
        return s;
    const char *type = qkv__json_str(cfg, "model_type");
    const qkv__graph *graph = NULL;
    for (size_t i = 0; type && i < sizeof graphs / sizeof graphs[0]; i++)
        if (strcmp(type, graphs[i]->type) == 0)
            graph = graphs[i];
    qkv_model *m = graph ? calloc(1, sizeof *m) : NULL;
    void *g = m ? calloc(1, graph->size) : NULL;
    if (!type)
        s = qkv__fail(ctx, QKV_ERR_FORMAT, "config.json: 'model_type' is missing");
    else if (!graph)
        s = qkv__fail(ctx, QKV_ERR_UNSUPPORTED,
                      "config.json: model_type '%.64s' (bert, vit, sasrec or llama supported)",
                      type);
    else if (want_llama && graph != &qkv__llama_graph)
        s = qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "config.json: model_type '%s' is not llama",
                      type);
    else if (!g)
        s = qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory");
    else
        s = graph->config(ctx, dir, cfg, g);
    cJSON_Delete(cfg);
    qkv__st st;
    if (s == QKV_OK && (s = qkv__st_open_dir(ctx, dir, &st)) == QKV_OK) {
        qkv__loader L = { ctx, &st, "", QKV_OK };
        graph->weights(&L, g);
        s = L.s;
        qkv__st_close(&st);
    }
    if (s == QKV_OK && graph->finish)
        s = graph->finish(ctx, dir, tokenizer, g);
    if (s != QKV_OK) {
        if (g)
            graph->release(g);
        free(g);
        free(m);
        return s;
    }
    m->graph = graph;
    m->g = g;
    *model = m;
    return QKV_OK;
}

qkv_status qkv_model_load(qkv_ctx *ctx, const char *path, qkv_model **model)
{
    return load(ctx, path, NULL, 0, model);
}

qkv_status qkv_model_load_llama(qkv_ctx *ctx, const char *path, const char *tokenizer,
                                qkv_model **model)
{
    return load(ctx, path, tokenizer, 1, model);
}

void qkv_model_free(qkv_model *model)
{
    if (!model)
        return;
    model->graph->release(model->g);
    free(model->g);
    free(model);
}

const char *qkv_model_type(const qkv_model *model)
{
    return model ? model->graph->type : "";
}

int64_t qkv_model_dim(const qkv_model *model)
{
    if (!model)
        return 0;
    if (model->graph == &qkv__bert_graph)
        return qkv__bert_dim(model->g);
    if (model->graph == &qkv__vit_graph)
        return qkv__vit_classes(model->g);
    if (model->graph == &qkv__llama_graph)
        return ((const qkv__llama *)model->g)->V;
    return qkv__sasrec_items(model->g);
}

/* The common checks of the calls below: ctx, model, its kind. */
static qkv_status want(qkv_ctx *ctx, const qkv_model *model, const qkv__graph *graph,
                       const char *call)
{
    if (!ctx)
        return QKV_ERR_NULL;
    if (!model)
        return qkv__fail(ctx, QKV_ERR_NULL, "%s: model is NULL", call);
    if (model->graph != graph)
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "%s needs a %s model, this one is %s",
                         call, graph->type, model->graph->type);
    return QKV_OK;
}

/* n >= 0 items, and both arrays present when n > 0. */
static qkv_status batch_args(qkv_ctx *ctx, const char *call, int64_t n, const void *in,
                             const char *in_name, const void *out, const char *out_name)
{
    if (n < 0)
        return qkv__fail(ctx, QKV_ERR_SHAPE, "%s: n = %lld < 0", call, (long long)n);
    if (n > 0 && (!in || !out))
        return qkv__fail(ctx, QKV_ERR_NULL, "%s: %s is NULL", call, !in ? in_name : out_name);
    return QKV_OK;
}

/* llama: BOS + the BPE tokens of text; QKV_ERR_SHAPE (with the count in
   *n_ids) when they do not fit in cap. */
static qkv_status tokenize_llama(qkv_ctx *ctx, const qkv__llama *m, const char *text,
                                 int32_t *ids, int64_t cap, int64_t *n_ids)
{
    int32_t *all;
    int64_t n;
    qkv_status s = qkv__bpe_encode(ctx, &m->tok, text, strlen(text), m->bos, &all, &n);
    if (s != QKV_OK)
        return s;
    *n_ids = n;
    if (n > cap) {
        free(all);
        return qkv__fail(ctx, QKV_ERR_SHAPE, "qkv_model_tokenize: the text gives %lld tokens, "
                         "more than cap = %lld", (long long)n, (long long)cap);
    }
    memcpy(ids, all, (size_t)n * sizeof *ids);
    free(all);
    return QKV_OK;
}

qkv_status qkv_model_tokenize(qkv_ctx *ctx, const qkv_model *model, const char *text,
                              int32_t *ids, int64_t cap, int64_t *n_ids)
{
    if (ctx && model && model->graph == &qkv__llama_graph) {
        if (!text || !ids || !n_ids)
            return qkv__fail(ctx, QKV_ERR_NULL, "qkv_model_tokenize: %s is NULL",
                             !text ? "text" : !ids ? "ids" : "n_ids");
        return tokenize_llama(ctx, model->g, text, ids, cap, n_ids);
    }
    qkv_status s = want(ctx, model, &qkv__bert_graph, "qkv_model_tokenize");
    if (s != QKV_OK)
        return s;
    if (!text || !ids || !n_ids)
        return qkv__fail(ctx, QKV_ERR_NULL, "qkv_model_tokenize: %s is NULL",
                         !text ? "text" : !ids ? "ids" : "n_ids");
    int64_t max = qkv__bert_max_tokens(model->g);
    if (cap < max)
        return qkv__fail(ctx, QKV_ERR_SHAPE, "qkv_model_tokenize: cap %lld < %lld tokens",
                         (long long)cap, (long long)max);
    return qkv__wp_encode(ctx, qkv__bert_vocab(model->g), text, strlen(text), ids, max,
                          n_ids);
}

int64_t qkv_model_max_tokens(const qkv_model *model)
{
    if (model && model->graph == &qkv__llama_graph)
        return ((const qkv__llama *)model->g)->S;
    return model && model->graph == &qkv__bert_graph ? qkv__bert_max_tokens(model->g) : 0;
}

/* ---- llama: tokens and text ------------------------------------------------------ */

const qkv__llama *qkv__model_llama(const qkv_model *model)
{
    return model && model->graph == &qkv__llama_graph ? model->g : NULL;
}

int32_t qkv_model_bos(const qkv_model *model)
{
    const qkv__llama *m = qkv__model_llama(model);
    return m ? m->bos : -1;
}

int32_t qkv_model_eos(const qkv_model *model)
{
    const qkv__llama *m = qkv__model_llama(model);
    return m ? m->eos[0] : -1;
}

/* id is an EOS id of m */
static int is_eos(const qkv__llama *m, int32_t id)
{
    for (int i = 0; i < m->n_eos; i++)
        if (m->eos[i] == id)
            return 1;
    return 0;
}

int qkv_model_is_stop(const qkv_model *model, int32_t id)
{
    const qkv__llama *m = qkv__model_llama(model);
    return m && (id == m->bos || is_eos(m, id));
}

/* The piece of id after prev: BOS and EOS print nothing. */
static const char *piece(const qkv__llama *m, int32_t prev, int32_t id, int64_t *len)
{
    const char *p = qkv__bpe_piece(&m->tok, prev, m->bos, id, len);
    if (p && (id == m->bos || is_eos(m, id))) {
        *len = 0;
        return "";
    }
    return p;
}

const char *qkv_model_piece(const qkv_model *model, int32_t prev, int32_t id, int64_t *len)
{
    const qkv__llama *m = qkv__model_llama(model);
    int64_t n = 0;
    const char *p = m ? piece(m, prev, id, &n) : NULL;
    if (len)
        *len = n;
    return p;
}

qkv_status qkv_model_detokenize(qkv_ctx *ctx, const qkv_model *model, const int32_t *ids,
                                int64_t n, char *text, int64_t cap, int64_t *len)
{
    if (!ctx)
        return QKV_ERR_NULL;
    const qkv__llama *m = qkv__model_llama(model);
    if (!model)
        return qkv__fail(ctx, QKV_ERR_NULL, "qkv_model_detokenize: model is NULL");
    if (!m)
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "qkv_model_detokenize needs a llama "
                         "model, this one is %s", model->graph->type);
    if (n < 0 || (n > 0 && !ids) || (!text && cap > 0) || !len)
        return qkv__fail(ctx, n < 0 ? QKV_ERR_SHAPE : QKV_ERR_NULL,
                         "qkv_model_detokenize: %s", n < 0 ? "n < 0" : !len ? "len is NULL"
                         : n > 0 && !ids ? "ids is NULL" : "text is NULL");
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t k;
        if (!piece(m, i ? ids[i - 1] : -1, ids[i], &k))
            return qkv__fail(ctx, QKV_ERR_ARG, "qkv_model_detokenize: ids[%lld] = %d is not a "
                             "token id in [0, %lld)", (long long)i, ids[i], (long long)m->V);
        total += k;
    }
    *len = total;
    if (total + 1 > cap)
        return qkv__fail(ctx, QKV_ERR_SHAPE, "qkv_model_detokenize: the text has %lld bytes, "
                         "cap = %lld leaves no room for them and the NUL", (long long)total,
                         (long long)cap);
    int64_t at = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t k;
        const char *p = piece(m, i ? ids[i - 1] : -1, ids[i], &k);
        memcpy(text + at, p, (size_t)k);
        at += k;
    }
    text[at] = '\0';
    return QKV_OK;
}

qkv_status qkv_model_export(qkv_ctx *ctx, const qkv_model *model, const char *dir)
{
    if (!ctx)
        return QKV_ERR_NULL;
    if (!model || !dir)
        return qkv__fail(ctx, QKV_ERR_NULL, "qkv_model_export: %s is NULL",
                         !model ? "model" : "dir");
    const qkv__llama *m = qkv__model_llama(model);
    if (!m)
        return qkv__fail(ctx, QKV_ERR_UNSUPPORTED, "qkv_model_export needs a llama model, "
                         "this one is %s", model->graph->type);
    return qkv__llama_export(ctx, m, dir);
}

qkv_status qkv_model_embed(qkv_ctx *ctx, const qkv_model *model, const char *const *texts,
                           int64_t n, float *out)
{
    qkv_status s = want(ctx, model, &qkv__bert_graph, "qkv_model_embed");
    if (s != QKV_OK)
        return s;
    if ((s = batch_args(ctx, "qkv_model_embed", n, texts, "texts", out, "out")) != QKV_OK)
        return s;
    return qkv__bert_embed(ctx, model->g, texts, n, out);
}

qkv_status qkv_model_classify(qkv_ctx *ctx, const qkv_model *model, const uint8_t *pixels,
                              int64_t n, float *logits)
{
    qkv_status s = want(ctx, model, &qkv__vit_graph, "qkv_model_classify");
    if (s != QKV_OK)
        return s;
    s = batch_args(ctx, "qkv_model_classify", n, pixels, "pixels", logits, "logits");
    if (s != QKV_OK)
        return s;
    return qkv__vit_classify(ctx, model->g, pixels, n, logits);
}

qkv_status qkv_model_recommend(qkv_ctx *ctx, const qkv_model *model, const int32_t *history,
                               int64_t len, int64_t k, int32_t *items, float *scores)
{
    qkv_status s = want(ctx, model, &qkv__sasrec_graph, "qkv_model_recommend");
    if (s != QKV_OK)
        return s;
    int64_t n_items = qkv__sasrec_items(model->g);
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
    return qkv__sasrec_recommend(ctx, model->g, history, len, k, items, scores);
}

int64_t qkv_model_image_pixels(const qkv_model *model)
{
    return model && model->graph == &qkv__vit_graph ? qkv__vit_pixels(model->g) : 0;
}
