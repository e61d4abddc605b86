/*
 * model.h — the model handle and what the model graphs share: the weight
 * loader, the BERT WordPiece tokenizer and each graph's load / run entry.
 * One file per graph: bert.c, vit.c, sasrec.c; model.c dispatches on
 * config.json's "model_type" and holds the public qkv_model_* calls.
 */
#ifndef QKV_MODEL_H
#define QKV_MODEL_H

#include "st.h"

/* ---- weights ---------------------------------------------------------------- */

/* Loads weights with a sticky error: after the first failure every call
   returns NULL and `s` keeps that failure's status (the message is in ctx). */
typedef struct {
    qkv_ctx       *ctx;
    const qkv__st *st;
    const char    *prefix;   /* prepended to every name ("" for none) */
    qkv_status     s;
} qkv__loader;

/* Tensor named prefix + fmt (fmt may use one %d: layer) of shape [d0]
   (d1 == 0) or [d0, d1]; a fresh fp32 copy, or NULL after an error. */
float *qkv__ld(qkv__loader *L, const char *fmt, int layer, int64_t d0, int64_t d1);
/* The tensor prefix + name, or NULL. */
const qkv__st_tensor *qkv__ld_find(const qkv__loader *L, const char *name);
/* The same for a 3-d shape [d0, d1, d2]. */
float *qkv__ld3(qkv__loader *L, const char *fmt, int layer, int64_t d0, int64_t d1,
                int64_t d2);

/* ---- WordPiece tokenizer (tokenizer.c) ---------------------------------------- */

typedef struct {
    char    **tok;       /* [n] token strings, id = index */
    int32_t   n;
    int32_t  *slot;      /* open-addressing table of ids, -1 empty */
    uint32_t  mask;      /* table size - 1 */
    int32_t   cls, sep, unk;
    int       lower;     /* lower-case (default 1) */
    int       strip;     /* strip accents: NFD, drop marks (default 1) */
    int       cjk;       /* CJK ideographs are words of their own (default 1) */
    int       max_chars; /* longer words become [UNK] (100) */
} qkv__wordpiece;

/* Reads vocab.txt (one token per line, id = line number). */
qkv_status qkv__wp_load(qkv_ctx *ctx, const char *path, qkv__wordpiece *wp);
/* The same from a buffer (for tests and the fuzzer). */
qkv_status qkv__wp_from_buffer(qkv_ctx *ctx, const char *buf, size_t len,
                               qkv__wordpiece *wp);
void       qkv__wp_free(qkv__wordpiece *wp);
int32_t    qkv__wp_id(const qkv__wordpiece *wp, const char *s, size_t len);
/* Tokenizes len bytes of UTF-8 text into [CLS] ids... [SEP], truncated to
   max_len ids in all (max_len >= 2). *n gets the count; ids needs room for
   max_len. QKV_ERR_ARG for text that is not valid UTF-8. */
qkv_status qkv__wp_encode(qkv_ctx *ctx, const qkv__wordpiece *wp, const char *text,
                          size_t len, int32_t *ids, int64_t max_len, int64_t *n);

/* ---- the graphs --------------------------------------------------------------- */

/* A model graph, as model.c loads it: zeroed state of `size` bytes, then
   config() (config.json and any other small file of the folder), then
   weights() on dir/model.safetensors; release() frees what the state holds
   (not the state itself) after a failure at any step, or at the end. */
typedef struct {
    const char *type;   /* config.json's model_type */
    size_t      size;
    qkv_status (*config)(qkv_ctx *ctx, const char *dir, const cJSON *cfg, void *g);
    void       (*weights)(qkv__loader *L, void *g);
    void       (*release)(void *g);
} qkv__graph;

extern const qkv__graph qkv__bert_graph, qkv__vit_graph, qkv__sasrec_graph;

typedef struct qkv__bert   qkv__bert;
typedef struct qkv__vit    qkv__vit;
typedef struct qkv__sasrec qkv__sasrec;

int64_t    qkv__bert_dim(const qkv__bert *m);
const qkv__wordpiece *qkv__bert_vocab(const qkv__bert *m);
int64_t    qkv__bert_max_tokens(const qkv__bert *m);
qkv_status qkv__bert_embed(qkv_ctx *ctx, const qkv__bert *m, const char *const *texts,
                           int64_t n, float *out);

int64_t    qkv__vit_classes(const qkv__vit *m);
int64_t    qkv__vit_pixels(const qkv__vit *m);
qkv_status qkv__vit_classify(qkv_ctx *ctx, const qkv__vit *m, const uint8_t *pixels,
                             int64_t n, float *logits);

int64_t    qkv__sasrec_items(const qkv__sasrec *m);
qkv_status qkv__sasrec_recommend(qkv_ctx *ctx, const qkv__sasrec *m, const int32_t *history,
                                 int64_t len, int64_t k, int32_t *items, float *scores);

#endif /* QKV_MODEL_H */
