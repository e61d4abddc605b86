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

/* FNV-1a of s[0 .. len): the vocabularies' open-addressing tables. */
static inline uint32_t qkv__str_hash(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

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

/* ---- llama2.c BPE tokenizer (bpe.c) -------------------------------------------- */

enum { QKV__BPE_UNK = 0 };   /* <unk>: a byte without a byte token */

typedef struct {
    int32_t  n;          /* tokens (the model's vocab_size) */
    int32_t  max_len;    /* the file's max_token_length */
    char    *text;       /* every token's text back to back */
    size_t  *off;        /* [n] where token i's text starts */
    int32_t *len;        /* [n] its length in bytes (>= 1) */
    float   *score;      /* [n] merge priority: higher merges first */
    int16_t *byte_of;    /* [n] the byte of a <0xHH> token, else -1 */
    int32_t  byte_id[256];   /* the <0xHH> token of each byte, or -1 */
    int32_t *slot;       /* open-addressing table of ids by text, -1 empty */
    uint32_t mask;
} qkv__bpe;

/* Reads a tokenizer of exactly vocab_size tokens from a buffer (name is
   the file name for messages); QKV_ERR_FORMAT for any malformed field or
   a size that does not end with the last token. */
qkv_status qkv__bpe_parse(qkv_ctx *ctx, const void *buf, size_t size, int64_t vocab_size,
                          const char *name, qkv__bpe *t);
qkv_status qkv__bpe_load(qkv_ctx *ctx, const char *path, int64_t vocab_size, qkv__bpe *t);
void       qkv__bpe_free(qkv__bpe *t);
/* The smallest id whose text is s[0..len), or -1. */
int32_t    qkv__bpe_id(const qkv__bpe *t, const char *s, size_t len);
/* Tokenizes len bytes of text (any bytes: unknown code points fall back
   to byte tokens) into a malloc'd array *ids of *n ids, starting with bos
   when bos >= 0. */
qkv_status qkv__bpe_encode(qkv_ctx *ctx, const qkv__bpe *t, const char *text, size_t len,
                           int32_t bos, int32_t **ids, int64_t *n);
/* The bytes token id stands for after token prev: its text, the raw byte
   for <0xHH>, without the leading space right after bos. NULL (len 0) for
   an id out of range. Points into t (or a static table): not terminated. */
const char *qkv__bpe_piece(const qkv__bpe *t, int32_t prev, int32_t bos, int32_t id,
                           int64_t *len);

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
    /* after the weights, or NULL: the rest of the folder (llama: the
       tokenizer, tokenizer_path when not NULL, else the one in dir) */
    qkv_status (*finish)(qkv_ctx *ctx, const char *dir, const char *tokenizer_path,
                         void *g);
} qkv__graph;

extern const qkv__graph qkv__bert_graph, qkv__vit_graph, qkv__sasrec_graph,
                        qkv__llama_graph;

/* The public handle: a graph and its state. */
struct qkv_model {
    const qkv__graph *graph;
    void             *g;
};

typedef struct qkv__bert   qkv__bert;
typedef struct qkv__vit    qkv__vit;
typedef struct qkv__sasrec qkv__sasrec;
typedef struct qkv__llama  qkv__llama;

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

/* ---- llama (llama.c) ------------------------------------------------------------
 * Weights in the runtime's layout: fp32, rows of q and k in llama2.c's
 * order (RoPE on interleaved pairs 2i, 2i+1 of each head; a Hugging Face
 * checkpoint's split halves are permuted at load time), q, k and v
 * stacked into one matrix, the gate and up projections into another. */

typedef struct {
    float *att_norm;   /* [D] */
    float *wqkv;       /* [(Hq + 2 Hkv) hs, D]: q rows, k rows, v rows */
    float *wo;         /* [D, Hq hs] */
    float *ffn_norm;   /* [D] */
    float *w13;        /* [2F, D]: gate (w1) rows, then up (w3) rows */
    float *w2;         /* [D, F] */
} qkv__llama_layer;

enum { QKV__LLAMA_MAX_EOS = 8 };

struct qkv__llama {
    int64_t D, F, L, Hq, Hkv, hs, V, S;   /* dim, hidden, layers, heads, kv heads,
                                             head size, vocab, context */
    double  eps, theta;
    int     shared_cls;     /* cls is emb */
    float  *emb;            /* [V, D] */
    float  *cls;            /* [V, D] */
    float  *norm;           /* [D] */
    double *inv_freq;       /* [hs/2]: theta^(-2i/hs) */
    qkv__llama_layer *layer;
    int32_t bos, eos[QKV__LLAMA_MAX_EOS];
    int     n_eos;
    qkv__bpe tok;
    int      has_tok;
};

/* A llama2.c checkpoint ("version 0": 7 int32 header fields, then fp32
   arrays) from a buffer, checked against its size. name: for messages. */
qkv_status qkv__llama_parse_l2c(qkv_ctx *ctx, const void *buf, size_t size, const char *name,
                                qkv__llama *m);
/* A llama2.c checkpoint file, with its tokenizer (tokenizer_path, or the
   one beside it when NULL). m is zeroed first; released on failure. */
qkv_status qkv__llama_load_file(qkv_ctx *ctx, const char *path, const char *tokenizer_path,
                                qkv__llama *m);
void       qkv__llama_release(qkv__llama *m);

/* Per-token buffers of one forward for one sequence (llama_fwd_floats). */
int64_t    qkv__llama_tok_floats(const qkv__llama *m);
/* The cos / sin of position pos for every rotary pair: [hs/2] each. */
void       qkv__llama_rope_angles(const qkv__llama *m, int64_t pos, float *cs, float *sn);

/* The forward of one sequence's n new tokens at positions p0 .. p0+n-1
   (their keys and values go into the paged caches, one per layer, at the
   sequence's block table): prefill (n > 1; the forward kernel when p0 is
   0, else the paged kernel on the whole chunk) or a decode step (n = 1:
   matrix-vector products). Writes the logits after the last token
   [V]. buf: qkv__llama_tok_floats() floats for n = 1, else NULL (the call
   allocates). attn_s: seconds spent in attention calls are added. */
qkv_status qkv__llama_forward(qkv_ctx *ctx, const qkv__llama *m,
                              const qkv_paged_cache *caches, const int32_t *table,
                              int64_t max_blocks, const int32_t *ids, int64_t n, int64_t p0,
                              float *buf, float *logits, double *attn_s);

/* The llama state of a model, or NULL when it is another kind. */
const qkv__llama *qkv__model_llama(const qkv_model *model);

/* Writes m as a Hugging Face Llama folder: config.json, model.safetensors
   (F32; q and k rows permuted to split-half RoPE) and tokenizer.bin. */
qkv_status qkv__llama_export(qkv_ctx *ctx, const qkv__llama *m, const char *dir);

#endif /* QKV_MODEL_H */
