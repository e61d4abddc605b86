/*
 * qkv.h — exact transformer attention in C.
 *
 * The whole public API of libqkv. Attention maps queries, keys and values to
 * outputs:  S = Q·Kᵀ·scale,  P = softmax(S) over the keys,  O = P·V,
 * computed in tiles with an online softmax (FlashAttention-style), so memory
 * never grows with seqlen_q × seqlen_k, with fp32 accumulation for every
 * input type.
 *
 * Usage:
 *
 *     #include <qkv.h>
 *
 *     // q [B,Sq,Hq,D], k [B,Sk,Hkv,D], v [B,Sk,Hkv,Dv], out [B,Sq,Hq,Dv]
 *     qkv_ctx *ctx = qkv_ctx_create(0);          // 0: one thread per core
 *     qkv_tensor q = qkv_tensor_4d(qbuf, QKV_F32, B, Sq, Hq, D);
 *     qkv_tensor k = qkv_tensor_4d(kbuf, QKV_F32, B, Sk, Hkv, D);
 *     qkv_tensor v = qkv_tensor_4d(vbuf, QKV_F32, B, Sk, Hkv, Dv);
 *     qkv_tensor o = qkv_tensor_4d(obuf, QKV_F32, B, Sq, Hq, Dv);
 *     qkv_attn_opts opts = qkv_attn_opts_default();
 *     opts.causal = 1;
 *     qkv_status st = qkv_attention_forward(ctx, &q, &k, &v, &opts, &o, NULL);
 *     if (st != QKV_OK)
 *         fprintf(stderr, "%s: %s\n", qkv_status_string(st),
 *                 qkv_ctx_last_error(ctx));
 *     qkv_ctx_free(ctx);
 *
 * Tensors are caller-owned views: qkv never keeps a pointer past the call
 * that received it, never frees caller memory, and reads/writes only the
 * elements the shape and strides name.
 *
 * Thread safety: a qkv_ctx is used by one calling thread at a time (it owns
 * the worker threads, the scratch memory and the last-error message). Use
 * one context per calling thread for concurrent calls; different contexts
 * share nothing. Functions that take no context are thread-safe.
 *
 * Errors are values: every fallible call returns a qkv_status (QKV_OK == 0,
 * errors negative). Arguments are validated before any output is written:
 * on error the output tensors and lse are untouched and
 * qkv_ctx_last_error() names the offending argument. The library never
 * prints, exits or aborts.
 */
#ifndef QKV_H
#define QKV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(QKV_SHARED_BUILD)
#define QKV_API __declspec(dllexport)
#elif defined(__GNUC__)
#define QKV_API __attribute__((visibility("default")))
#else
#define QKV_API
#endif

/* ---- version ------------------------------------------------------------ */

#define QKV_VERSION_MAJOR 0
#define QKV_VERSION_MINOR 1
#define QKV_VERSION_PATCH 0
#define QKV_VERSION_STRING "0.1.0"

/* "MAJOR.MINOR.PATCH" of the library actually linked (may differ from the
   header's QKV_VERSION_STRING when linked dynamically). */
QKV_API const char *qkv_version(void);

/* ---- status codes ------------------------------------------------------- */

typedef int qkv_status;
enum {
    QKV_OK               =  0,
    QKV_ERR_NULL         = -1,  /* a required pointer is NULL               */
    QKV_ERR_DTYPE        = -2,  /* unknown dtype, or dtypes that must match don't */
    QKV_ERR_SHAPE        = -3,  /* non-positive or mismatched sizes         */
    QKV_ERR_STRIDE       = -4,  /* strides that alias outputs               */
    QKV_ERR_OVERFLOW     = -5,  /* a size or offset product overflows int64  */
    QKV_ERR_ARG          = -6,  /* an option value out of its domain         */
    QKV_ERR_NOMEM        = -7,  /* memory allocation failed                  */
    QKV_ERR_UNSUPPORTED  = -8,  /* valid, but not supported (e.g. an ISA the
                                   CPU lacks, bias together with varlen)     */
    QKV_ERR_THREAD       = -9   /* worker threads could not be started       */
};

/* Short English name of a status ("ok", "null pointer", ...); never NULL,
   unknown codes give "unknown status". */
QKV_API const char *qkv_status_string(qkv_status s);

/* ---- tensors ------------------------------------------------------------ */

typedef enum { QKV_F32 = 0, QKV_F16 = 1, QKV_BF16 = 2 } qkv_dtype;

/* Non-owning view of a 4-d array. Strides are in elements, may be any value
   (zero broadcasts an input dimension; negative walks backwards); element
   [i0,i1,i2,i3] lives at data + Σ i_n·stride[n] elements. */
typedef struct {
    void     *data;
    qkv_dtype dtype;
    int64_t   shape[4];   /* attention operands: [batch, seqlen, heads, head_dim] */
    int64_t   stride[4];
} qkv_tensor;

/* A view of a contiguous row-major [d0,d1,d2,d3] array (stride[3] == 1). */
QKV_API qkv_tensor qkv_tensor_4d(void *data, qkv_dtype dtype,
                                 int64_t d0, int64_t d1, int64_t d2, int64_t d3);

/* Bytes per element of dtype (4 or 2); 0 for an unknown dtype. */
QKV_API size_t qkv_dtype_size(qkv_dtype dtype);

/* Converts n elements between dtypes (any pair, including the same one).
   fp32 -> fp16/bf16 rounds to nearest even, keeps NaN and infinities, and
   overflows to ±inf. Returns QKV_ERR_NULL / QKV_ERR_DTYPE on bad input. */
QKV_API qkv_status qkv_convert(const void *src, qkv_dtype src_dtype,
                               void *dst, qkv_dtype dst_dtype, size_t n);

/* ---- memory ------------------------------------------------------------- */

/* Memory for KV caches, paged pools and other large tensors: 64-byte
   aligned, and from 2 MiB up 2 MiB aligned and advised for transparent
   huge pages (Linux madvise; it takes effect where
   /sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise").
   Decoding streams the whole cache each step: on 4 KiB pages every 4 KiB
   costs a TLB walk, a nested one on virtual machines, and a cache in this
   memory decoded 1.5x faster there (docs/PERFORMANCE.md). Contents are
   not initialized. Returns NULL for 0 bytes or when out of memory; free
   with qkv_free (NULL is a no-op). */
QKV_API void *qkv_alloc(size_t bytes);
QKV_API void qkv_free(void *p);

/* ---- context ------------------------------------------------------------ */

typedef struct qkv_ctx qkv_ctx;

/* Creates a context with n_threads workers in total (the calling thread
   counts as one); 0 picks one per online core. The kernel set is the best
   the CPU supports, or the one named by the environment variable QKV_ISA
   (generic|avx2|avx512) when the CPU supports it. Returns NULL when
   n_threads < 0 or memory/threads are unavailable. Idle workers sleep. */
QKV_API qkv_ctx *qkv_ctx_create(int n_threads);

/* Stops the workers and frees everything; NULL is a no-op. */
QKV_API void qkv_ctx_free(qkv_ctx *ctx);

/* The message of the last failed call on ctx ("" if none), naming the
   argument at fault. Valid until the next call on ctx. NULL ctx gives a
   fixed message. */
QKV_API const char *qkv_ctx_last_error(const qkv_ctx *ctx);

/* Number of threads the context computes with (>= 1). */
QKV_API int qkv_ctx_threads(const qkv_ctx *ctx);

/* Name of the kernel set in use, one of qkv_isa_name's. */
QKV_API const char *qkv_ctx_isa(const qkv_ctx *ctx);

/* Forces a kernel set by name. QKV_ERR_UNSUPPORTED when the CPU or OS lacks
   it, QKV_ERR_ARG for an unknown name; the current choice is kept then. */
QKV_API qkv_status qkv_ctx_set_isa(qkv_ctx *ctx, const char *name);

/* Whether this CPU can run the named kernel set (1) or not (0). */
QKV_API int qkv_isa_supported(const char *name);

/* The i-th kernel set qkv knows, least preferred first, NULL for i out of
   range: "generic", "avx2", "avx512", "avx512bf16" (bf16 inputs use bf16
   dot products), "amx-emu" and "amx" (bf16 products on AMX tiles; amx-emu
   emulates each tile instruction, slowly, for testing on CPUs without
   AMX, and is never the default). The default is the last supported one;
   the environment variable QKV_ISA=name overrides it for new contexts. */
QKV_API const char *qkv_isa_name(int i);

/* Measures the fp32 multiply-add ceiling of ctx's kernel set on all of its
   threads, in GFLOP/s (the best of several short rounds, about 0.2 s): the yardstick benchmarks quote
   efficiency against. Returns 0 for a NULL ctx. */
QKV_API double qkv_peak_gflops(qkv_ctx *ctx);

/* ---- attention ---------------------------------------------------------- */

typedef struct {
    float   scale;                      /* 0 -> 1/sqrt(head_dim) */
    int     causal;                     /* bottom-right aligned */
    int64_t window_left, window_right;  /* -1 = unbounded */
    float   softcap;                    /* 0 = off; s -> softcap*tanh(s/softcap) */
    const float      *alibi_slopes;     /* [heads_q] or NULL: s -= slope*|i + Sk - Sq - j| */
    const qkv_tensor *bias;             /* fp32 additive, [B|1, Hq|1, Sq|1, Sk|1], -inf masks; NULL */
    const int32_t    *cu_seqlens_q;     /* packed variable-length: n_seqs+1 offsets; NULL */
    const int32_t    *cu_seqlens_k;
    int32_t           n_seqs;           /* sequences in a varlen call */
    float             dropout_p;        /* 0 = off; in [0, 1): P dropped after the softmax */
    uint64_t          dropout_seed;     /* the dropout mask is a function of this */
} qkv_attn_opts;

/* Options for plain attention: scale 1/sqrt(D), no mask, no varlen. */
QKV_API qkv_attn_opts qkv_attn_opts_default(void);

/*
 * qkv_attention_forward — O = softmax(mask(Q·Kᵀ·scale))·V.
 *
 * Reads   q   [B, Sq, Hq, D]    k [B, Sk, Hkv, D]    v [B, Sk, Hkv, Dv]
 * Writes  out [B, Sq, Hq, Dv]   and, when lse != NULL, lse as a contiguous
 *         fp32 array [B, Hq, Sq]: the natural-log sum-exp of each row's
 *         masked, scaled scores.
 * q, k, v and out share one dtype (fp32, fp16 or bf16); arithmetic is fp32.
 * Hq must be a multiple of Hkv: query head h reads kv head h / (Hq/Hkv).
 *
 * opts is required (start from qkv_attn_opts_default()); lse may be NULL.
 *
 * Score of query i and key j, in this order:
 *   s  = scale · q_i·k_j                (scale 0 means 1/sqrt(D); any other
 *                                        finite value, negative included)
 *   s  = softcap · tanh(s / softcap)    (softcap > 0)
 *   s -= slope[h] · |i + Sk - Sq - j|   (alibi_slopes != NULL)
 *   s += bias[b, h, i, j]               (bias != NULL; any dim of size 1
 *                                        broadcasts, e.g. [B,1,1,Sk] padding)
 * Key j is visible to query i iff, with p = i + Sk - Sq (the query's
 * position when the queries are the last Sq of the keys' positions),
 *   causal: j <= p;  window_left >= 0: j >= p - window_left;
 *   window_right >= 0: j <= p + window_right.
 * A row that sees no key (or whose every visible score is -inf) gets output
 * 0 and lse -inf. A NaN score among the keys a row sees (a NaN in q or in
 * a visible key, or +inf scores) makes that row's output and lse NaN, as
 * PyTorch's softmax does; rows that do not see it are unaffected.
 *
 * Dropout (dropout_p > 0, as torch.nn.functional.dropout on the softmax's
 * output in training): out = (P ∘ Z)·V, where P is the softmax and Z holds
 * 0 with probability dropout_p and 1/(1 - dropout_p) otherwise. Element
 * Z[b, h, i, j] is a pure function of dropout_seed, the batch row b (and a
 * varlen sequence's first row), the query head h, the query's position
 * i + Sk - Sq and the key j (within the sequence), so the backward (given
 * the same opts) regenerates it, results do not depend on tiles or
 * threads, and a call on the last queries of a sequence draws the mask the
 * full call draws for them. lse is that of the softmax before dropout.
 * dropout_p must be in [0, 1) (QKV_ERR_ARG otherwise); calls that read a
 * KV cache refuse dropout (QKV_ERR_UNSUPPORTED).
 *
 * Varlen (cu_seqlens_q and cu_seqlens_k both set, n_seqs >= 1): q, k, v and
 * out have batch 1 and hold n_seqs sequences packed along dim 1; sequence
 * s occupies rows [cu_seqlens_q[s], cu_seqlens_q[s+1]) of q/out and
 * [cu_seqlens_k[s], cu_seqlens_k[s+1]) of k/v, and masks use that
 * sequence's own Sq and Sk. Offsets must be non-decreasing, start >= 0 and
 * end within the tensors. lse is then [Hq, total_q] with total_q =
 * q->shape[1]. Rows outside every sequence are not written, in out nor in
 * lse. Errors in cu_seqlens or n_seqs are QKV_ERR_SHAPE. bias together
 * with varlen is refused (QKV_ERR_UNSUPPORTED).
 *
 * Results are bitwise identical for any number of threads. On the amx
 * kernel set bf16 calls pack K and V into a copy of their size first, and
 * fp16 calls with at least 80 query rows per key (times the query heads
 * per kv head, on average) into one twice their size, each fp16
 * value split exactly into two bf16 for the bf16 tiles (P kept within
 * 2^-16; a K or V value that is not finite makes the scores of its key,
 * or its column of the output, NaN in the rows that see it); the context
 * keeps that buffer for its next call up to 256 MiB. Decoding
 * (a few query rows per kv head against many keys) is faster through
 * qkv_attention_kvcache, which reads each K/V row once for them.
 * Returns QKV_OK, or an error (out and lse untouched, message in ctx):
 * QKV_ERR_NULL, QKV_ERR_DTYPE, QKV_ERR_SHAPE, QKV_ERR_STRIDE,
 * QKV_ERR_OVERFLOW, QKV_ERR_ARG, QKV_ERR_UNSUPPORTED, QKV_ERR_NOMEM.
 */
QKV_API qkv_status qkv_attention_forward(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_attn_opts *opts,
        qkv_tensor *out, float *lse);

/*
 * qkv_attention_reference — the specification: the same contract as
 * qkv_attention_forward, computed with plain loops and double accumulation
 * (memory O(Sk) per thread). Slow; for testing and checking.
 */
QKV_API qkv_status qkv_attention_reference(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_attn_opts *opts,
        qkv_tensor *out, float *lse);

/*
 * qkv_attention_backward — the gradients of qkv_attention_forward.
 *
 * Reads   q, k, v, opts      as in forward
 *         out  [B, Sq, Hq, Dv]  the forward's output
 *         dout like out         the gradient of the loss with respect to out
 *         lse  the forward's lse ([B, Hq, Sq], or [Hq, total_q] for varlen)
 * Writes  dq like q, dk like k, dv like v. With grouped heads dk and dv
 *         sum over the query heads of each group. Every tensor shares q's
 *         dtype; arithmetic is fp32.
 *
 * Scores are recomputed from q, k and lse (no Sq x Sk matrix is kept), and
 * with dropout the mask from opts->dropout_p and dropout_seed (pass the
 * forward's);
 * memory beyond the gradients is a few tiles per thread. The bias is not
 * differentiated (qkv_attention_backward_dbias does that). Rows that saw
 * no key (lse -inf) contribute nothing and get dq 0. Results are bitwise
 * identical for any number of threads.
 * Varlen: rows outside every sequence are not written in dq, dk, dv.
 *
 * Returns QKV_OK, or an error with dq, dk and dv untouched (message in ctx):
 * those of forward, plus QKV_ERR_NULL for a missing out, dout or lse,
 * QKV_ERR_SHAPE / QKV_ERR_DTYPE when a gradient does not match its primal,
 * QKV_ERR_STRIDE when dq, dk or dv overlaps itself, and QKV_ERR_ARG when a
 * gradient shares memory with another tensor or with lse (slices of one
 * packed gradient buffer that do not touch are fine).
 */
QKV_API qkv_status qkv_attention_backward(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv);

/* qkv_attention_backward_reference — the same contract in plain loops with
   double accumulation: the specification of the backward. Slow. */
QKV_API qkv_status qkv_attention_backward_reference(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv);

/*
 * qkv_attention_backward_dbias — qkv_attention_backward that also writes
 * dbias, the gradient of opts->bias (a learned relative-position bias, a
 * soft mask): fp32, the shape of opts->bias (which must be set), any
 * strides free of self-overlap. dbias[b,h,i,j] is the score gradient dS of
 * that element (before the softcap derivative: the bias is added after
 * capping), summed over the dimensions the bias broadcasts (size 1) in a
 * fixed order, so it is bitwise identical for any thread count; masked
 * (-inf) elements and rows that see no key get 0. The extra pass
 * recomputes the score and dP tiles, and its memory is a few tiles per
 * thread. Errors as qkv_attention_backward's (dbias untouched too), plus
 * QKV_ERR_ARG for dbias without opts->bias or sharing memory with another
 * tensor, QKV_ERR_SHAPE / QKV_ERR_DTYPE when it is not fp32 of the bias's
 * shape.
 */
QKV_API qkv_status qkv_attention_backward_dbias(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv, qkv_tensor *dbias);

/* The same in plain loops with double accumulation. */
QKV_API qkv_status qkv_attention_backward_dbias_reference(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k, const qkv_tensor *v, const qkv_tensor *out,
        const qkv_tensor *dout, const float *lse, const qkv_attn_opts *opts,
        qkv_tensor *dq, qkv_tensor *dk, qkv_tensor *dv, qkv_tensor *dbias);

/* ---- models -------------------------------------------------------------
 *
 * Pretrained transformers run on qkv's attention: a folder with
 * config.json and model.safetensors (F32, F16 or BF16 weights; fp32
 * compute), plus vocab.txt for text models. config.json's "model_type"
 * picks the graph:
 *
 *   "bert"    sentence embeddings (sentence-transformers' all-MiniLM-L6-v2
 *             and its kind): WordPiece tokens, mean pooling over each
 *             sentence's tokens, L2 normalization (when modules.json lists
 *             a Normalize module, or there is no modules.json).
 *             max_seq_length from sentence_bert_config.json when present
 *             (longer texts are truncated), else max_position_embeddings;
 *             tokenizer_config.json's lower-casing and accent switches.
 *   "vit"     image classification (ViT for 28x28 MNIST digits).
 *   "sasrec"  next-item recommendation from a history of item ids.
 *   "llama"   text generation with a Llama-family decoder (see "generation"
 *             below); also from a llama2.c checkpoint file.
 *
 *     qkv_model *m;
 *     if (qkv_model_load(ctx, "all-MiniLM-L6-v2", &m) != QKV_OK) ... ;
 *     const char *texts[2] = { "A cat.", "Un chat." };
 *     float emb[2 * 384];                   // [n, qkv_model_dim(m)]
 *     qkv_model_embed(ctx, m, texts, 2, emb);
 *     qkv_model_free(m);
 *
 * Every file is checked before use (header lengths, dtypes, shapes and
 * offsets of the safetensors file against its size; every tensor's shape
 * against the config); a malformed one is refused with QKV_ERR_FORMAT and
 * a message in ctx naming the file and field. A loaded model is read-only:
 * calls on it from several threads are safe with one ctx per thread.
 */

enum {
    QKV_ERR_IO     = -20,   /* a file cannot be opened, read or mapped */
    QKV_ERR_FORMAT = -21    /* a model file is malformed or does not match its config */
};

typedef struct qkv_model qkv_model;

/* Loads the model in folder dir into *model (NULL on error). dir may also
   be a llama2.c checkpoint file (loaded as qkv_model_load_llama does with
   the tokenizer beside it). Returns QKV_OK, QKV_ERR_NULL, QKV_ERR_IO
   (missing file), QKV_ERR_FORMAT, QKV_ERR_UNSUPPORTED (unknown
   model_type) or QKV_ERR_NOMEM; the message is in ctx. The weights are
   copied: the files may change afterwards. */
QKV_API qkv_status qkv_model_load(qkv_ctx *ctx, const char *dir, qkv_model **model);

/* Frees the model; NULL is a no-op. */
QKV_API void qkv_model_free(qkv_model *model);

/* "bert", "vit", "sasrec" or "llama" ("" for NULL). */
QKV_API const char *qkv_model_type(const qkv_model *model);

/* The width of one result row: the embedding size (bert), the number of
   classes (vit), the number of items (sasrec), the vocabulary size
   (llama: one row of logits); 0 for NULL. */
QKV_API int64_t qkv_model_dim(const qkv_model *model);

/* bert: the most tokens one text gives, [CLS] and [SEP] included (longer
   texts are truncated); llama: the context (positions a sequence may
   reach); 0 for other models. */
QKV_API int64_t qkv_model_max_tokens(const qkv_model *model);

/* vit: the bytes of one input image (28*28 for MNIST); 0 otherwise. */
QKV_API int64_t qkv_model_image_pixels(const qkv_model *model);

/* bert: the token ids of NUL-terminated UTF-8 text, as the model sees them
   ([CLS] ... [SEP], truncated), into ids[0 .. *n_ids). cap must be at least
   qkv_model_max_tokens(). QKV_ERR_ARG for text that is not valid UTF-8.
   llama: BOS and the BPE tokens of the text (any bytes: a character
   without a token becomes its byte tokens), never truncated; when they
   are more than cap, QKV_ERR_SHAPE with the count needed in *n_ids. */
QKV_API qkv_status qkv_model_tokenize(qkv_ctx *ctx, const qkv_model *model,
                                      const char *text, int32_t *ids, int64_t cap,
                                      int64_t *n_ids);

/* bert: writes out [n, qkv_model_dim()] with the embedding (unit length
   when the model normalizes) of each NUL-terminated UTF-8 text. Texts of any lengths batch together
   (packed, no padding). QKV_ERR_ARG (message names the text) when one is
   not valid UTF-8; out may be partly written then. */
QKV_API qkv_status qkv_model_embed(qkv_ctx *ctx, const qkv_model *model,
                                   const char *const *texts, int64_t n, float *out);

/* vit: pixels [n, qkv_model_image_pixels()] bytes (0 background .. 255
   ink, row-major, as in the MNIST files) -> logits [n, qkv_model_dim()].
   The model normalizes the pixels as its config says. */
QKV_API qkv_status qkv_model_classify(qkv_ctx *ctx, const qkv_model *model,
                                      const uint8_t *pixels, int64_t n, float *logits);

/* sasrec: from history[0 .. len) (item ids 1..qkv_model_dim(), oldest
   first; only the last maxlen count) writes the k best next items, best
   first, to items[0 .. k) and their scores to scores (may be NULL). Ties
   go to the smaller id. QKV_ERR_ARG for an id out of range,
   QKV_ERR_SHAPE for len < 1 or k out of [1, items]. */
QKV_API qkv_status qkv_model_recommend(qkv_ctx *ctx, const qkv_model *model,
                                       const int32_t *history, int64_t len, int64_t k,
                                       int32_t *items, float *scores);

/* ---- serving: decoding from a KV cache ------------------------------------
 *
 * A decoder keeps the keys and values of every token it has seen in a
 * cache and, at each step, attends from a few new queries (one, or several
 * when speculative decoding verifies a draft; a chunk of a prompt in
 * chunked prefill) to the cached keys of each sequence. Sequences of one
 * batch have their own cache lengths. The new tokens' keys and values are
 * in the cache before the call, so the queries see themselves.
 *
 * Positions are bottom-right aligned as everywhere in qkv: with L keys
 * cached for sequence b and Sq queries, query i sits at position
 * L - Sq + i; causal lets it see keys j <= L - Sq + i, windows and ALiBi
 * measure from there. opts->bias and varlen (cu_seqlens) are refused
 * (QKV_ERR_UNSUPPORTED); every other option works as in
 * qkv_attention_forward.
 *
 * Work is split by sequence and query tile (and kv head where the cache
 * keeps each head's rows together); when that gives few tasks, long
 * caches are also split along the keys and the partial softmax states
 * merged in a fixed order (split-K). Each K/V row is read once for all the
 * query heads of its group. Split decisions depend on the problem
 * alone: results are bitwise identical for any number of threads, and a
 * paged cache gives bitwise the result of the contiguous cache holding the
 * same rows. The problem is the whole call, though: the split of one
 * sequence's keys depends on how many tasks the batch gives, so a
 * sequence of 1024 or more cached keys may round differently in a batch
 * than alone. Batch-invariant serving calls once per sequence (as qkv_gen
 * does).
 */

/*
 * qkv_attention_kvcache — attention from a contiguous cache.
 *
 * Reads   q       [B, Sq, Hq, D]
 *         k_cache [B, Smax, Hkv, D]   v_cache [B, Smax, Hkv, Dv]
 *         seqlens_k [B]: rows [0, seqlens_k[b]) of sequence b's cache are
 *         its keys, 0 <= seqlens_k[b] <= Smax; NULL: Smax for every b.
 * Writes  out [B, Sq, Hq, Dv], and lse [B, Hq, Sq] when lse != NULL.
 * q and out share one dtype, k_cache and v_cache one dtype (fp32, fp16 or
 * bf16 each; the two may differ); arithmetic is fp32. Strides are free as
 * in qkv_attention_forward. With every seqlens_k[b] = Smax it computes
 * what qkv_attention_forward computes on the same tensors (up to fp32
 * rounding: the key tiles differ). On the amx kernel set, bf16 queries
 * against a bf16 cache run on tiles that take V's columns in pairs: an
 * infinite or NaN value in V makes the other column of its pair NaN in
 * the rows that see it, where other sets leave that column finite. An
 * fp16 cache with fp16 or bf16 queries and more than 8 query rows per kv
 * head (Sq times the query heads per kv head) runs there on tiles too,
 * each fp16 value split exactly into two bf16 and P kept within 2^-16:
 * a K or V value that is not finite makes the scores of its key, or its
 * column of the output, NaN (not infinite) in the rows that see it.
 * There, chunks of at least 512 query rows per kv head (chunked prefill)
 * from a bf16 or fp16 cache of q's dtype run on qkv_attention_forward's
 * kernels, with its packed copy of K and V, where that copy takes at most
 * 256 MiB.
 *
 * Returns QKV_OK, or an error with out and lse untouched (message in ctx):
 * those of qkv_attention_forward, QKV_ERR_SHAPE for a length out of
 * [0, Smax].
 */
QKV_API qkv_status qkv_attention_kvcache(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_tensor *k_cache, const qkv_tensor *v_cache, const int32_t *seqlens_k,
        const qkv_attn_opts *opts, qkv_tensor *out, float *lse);

/* Element types of a paged cache: the three float types of qkv_dtype, and
   int8 with one fp32 scale per cached row of each kv head. */
typedef enum {
    QKV_KV_F32 = QKV_F32, QKV_KV_F16 = QKV_F16, QKV_KV_BF16 = QKV_BF16,
    QKV_KV_I8 = 16
} qkv_kv_dtype;

/*
 * A paged KV cache (as in vLLM): two caller-owned pools of fixed-size
 * blocks, each block holding block_size consecutive positions of one
 * sequence for every kv head:
 *   k [n_blocks, block_size, heads_kv, head_dim]     row-major
 *   v [n_blocks, block_size, heads_kv, head_dim_v]   row-major
 * or, with head_major = 1, [n_blocks, heads_kv, block_size, head_dim|_v]:
 * a head's rows of a block follow each other, runs that decoding reads
 * a block at a time (on Zen 4, blocks of 16 in shuffled order decode from
 * memory in 1.01-1.02x a contiguous cache's time at the host's slower
 * memory level and 1.17x at the faster one, position-major blocks in
 * 1.11x and 1.29x; on a Xeon with AMX, 0.97-1.00x the position-major
 * blocks' time: docs/PERFORMANCE.md). The scales below follow the same
 * layout.
 * A sequence owns a block table, a row of int32 block ids: its position p
 * lives in block table[p / block_size], row p % block_size. Blocks may be
 * shared between sequences for reading (a common prompt prefix).
 *
 * QKV_KV_I8 stores x as round(x / s) in [-127, 127] with s = max|x| / 127
 * over the head_dim values of that row; k_scale and v_scale
 * [n_blocks, block_size, heads_kv] (with head_major = 1 [n_blocks,
 * heads_kv, block_size]) hold the s (fp32), written by qkv_paged_append. An element reads back as code·s, off by at most s/2
 * (1/254 of its row's largest magnitude) plus fp32 rounding. A row holding a non-finite value
 * gets a NaN scale (it reads back as NaN). Other dtypes leave the scales
 * NULL. With bf16 or fp16 queries on a CPU with AVX512-VNNI (head dims
 * multiples of 32, the keys' at most 256) attention reads the codes as
 * they are (on AMX-INT8 tiles where the CPU has them):
 * each query row is rounded to int16 on its own scale, and P times the V
 * scales to int16 on one scale per key tile (2^-15 of the largest, finer
 * than the bf16 P of other paths); the dot products are exact in int32.
 *
 * block_size is a power of two from 8 to 256.
 */
typedef struct {
    void        *k, *v;
    float       *k_scale, *v_scale;
    qkv_kv_dtype dtype;
    int64_t      n_blocks, block_size, heads_kv, head_dim, head_dim_v;
    int          head_major;   /* 0: the layout above; 1: k [n_blocks, heads_kv,
                                  block_size, head_dim] and v alike, each head's
                                  rows of a block together */
} qkv_paged_cache;

/*
 * qkv_paged_append — writes new tokens' keys and values into a paged cache.
 *
 * Reads   k_new [B, Snew, Hkv, D], v_new [B, Snew, Hkv, Dv] (fp32, fp16 or
 *         bf16, one dtype; any strides), block_table [B][max_blocks],
 *         seqlens [B]: the rows already cached per sequence.
 * Writes  the cache rows of positions seqlens[b] .. seqlens[b]+Snew-1 of
 *         every sequence (converted to the cache's dtype, rounding to
 *         nearest even; for int8 with their scales). seqlens is not
 *         changed: the caller adds Snew afterwards.
 * The blocks holding those positions must be in [0, n_blocks), and a
 * block the call writes must appear in no other cell of the tables' used
 * part (positions below seqlens[b]+Snew): a block shared for reading is
 * copied by the caller before new rows go into it.
 *
 * Returns QKV_OK, or an error with the cache untouched (message in ctx):
 * QKV_ERR_NULL, QKV_ERR_DTYPE, QKV_ERR_SHAPE (shapes, a length below 0 or
 * past max_blocks·block_size, a block id out of range), QKV_ERR_ARG (a
 * written block named twice, a bad cache description), QKV_ERR_OVERFLOW.
 */
QKV_API qkv_status qkv_paged_append(qkv_ctx *ctx, const qkv_paged_cache *cache,
        const int32_t *block_table, int64_t max_blocks, const int32_t *seqlens,
        const qkv_tensor *k_new, const qkv_tensor *v_new);

/*
 * qkv_attention_paged — attention from a paged cache.
 *
 * Reads   q [B, Sq, Hq, D] (fp32, fp16 or bf16), the cache, block_table
 *         [B][max_blocks], seqlens_k [B]: sequence b's keys are its
 *         positions 0 .. seqlens_k[b]-1.
 * Writes  out [B, Sq, Hq, Dv] in q's dtype, and lse [B, Hq, Sq] when
 *         lse != NULL.
 * Semantics as qkv_attention_kvcache; Hkv, D and Dv come from the cache.
 * Only the blocks holding positions below seqlens_k[b] are read, and each
 * of those ids must be in [0, n_blocks). From an fp32, fp16 or bf16
 * pool the result is bitwise that of qkv_attention_kvcache on a
 * contiguous cache holding the same rows. A
 * chunk that runs on the forward's kernels (qkv_attention_kvcache) first
 * gathers the sequences' rows into one contiguous copy, which the
 * context keeps for its next call up to 256 MiB.
 *
 * Returns QKV_OK, or an error with out and lse untouched (message in ctx):
 * those of qkv_attention_kvcache, QKV_ERR_SHAPE for a length below 0 or
 * past max_blocks·block_size or a block id out of range, QKV_ERR_ARG for a
 * bad cache description.
 */
QKV_API qkv_status qkv_attention_paged(qkv_ctx *ctx, const qkv_tensor *q,
        const qkv_paged_cache *cache, const int32_t *block_table, int64_t max_blocks,
        const int32_t *seqlens_k, const qkv_attn_opts *opts, qkv_tensor *out, float *lse);

/* The loops qkv_memory_bandwidth times, as STREAM's: */
typedef enum {
    QKV_STREAM_TRIAD = 0,   /* a[i] = b[i] + s·c[i]: 3 × 4 bytes per element */
    QKV_STREAM_COPY  = 1,   /* a[i] = b[i]: 2 × 4 bytes                      */
    QKV_STREAM_READ  = 2    /* b[i] and c[i] only read: 2 × 4 bytes           */
} qkv_stream;

/* Measures the memory bandwidth ctx's threads reach on a STREAM-style
   loop over arrays far larger than the caches (each four times the
   last-level cache, as STREAM asks, from 64 MiB to 1 GiB, allocated as
   qkv_alloc does), in GB/s counting the bytes of the arrays read and
   written as STREAM does (a store's read of its line is not counted; the
   best of several rounds, 0.3-1 s): the yardsticks for memory-bound
   calls such as decoding, which only read. Returns 0 for a NULL ctx, an
   unknown kind, or when the arrays cannot be allocated. */
QKV_API double qkv_memory_bandwidth(qkv_ctx *ctx, qkv_stream kind);

/* qkv_memory_bandwidth(ctx, QKV_STREAM_TRIAD). */
QKV_API double qkv_peak_bandwidth(qkv_ctx *ctx);

/* ---- generation: Llama-family decoders -------------------------------------
 *
 * A "llama" model is a Llama-architecture decoder (RMSNorm, rotary
 * embeddings, SwiGLU, grouped-query attention) with a llama2.c tokenizer
 * (sentencepiece-style BPE by merge scores, byte fallback). It loads from
 *   - a llama2.c checkpoint file ("version 0": a 7-int32 header, then fp32
 *     arrays), its tokenizer beside it (tokenizer.bin, tok<vocab>.bin or
 *     the only tok*.bin in its folder) or named;
 *   - a Hugging Face folder: config.json with model_type "llama",
 *     model.safetensors (model.embed_tokens.weight, model.layers.N.*,
 *     model.norm.weight, lm_head.weight unless tie_word_embeddings), and a
 *     llama2.c tokenizer in the folder or named (qkv_model_export writes
 *     one there).
 * Every size in either file is checked against the file before use
 * (QKV_ERR_FORMAT names file and field), and the tokenizer must hold
 * exactly the model's vocab_size tokens.
 *
 *     qkv_model *m;
 *     qkv_model_load(ctx, "stories260K/stories260K.bin", &m);
 *     int32_t ids[512];
 *     int64_t n;
 *     qkv_model_tokenize(ctx, m, "Once upon a time", ids, 512, &n);
 *     qkv_gen_opts go = qkv_gen_opts_default();       // one sequence
 *     qkv_gen *g;
 *     qkv_gen_create(ctx, m, &go, &g);
 *     qkv_sampler_opts so = qkv_sampler_opts_default();
 *     so.temperature = 0.8f; so.seed = 42;
 *     qkv_sampler *smp;
 *     qkv_sampler_create(ctx, &so, &smp);
 *     int32_t seq, prev = ids[n - 1], next;
 *     qkv_gen_add(g, ids, n, &seq);                     // the prompt
 *     while (qkv_gen_step(g) == QKV_OK && qkv_gen_length(g, seq) < 256) {
 *         qkv_sampler_sample(ctx, smp, qkv_gen_logits(g, seq), qkv_model_dim(m), &next);
 *         if (qkv_model_is_stop(m, next)) break;
 *         int64_t len;
 *         const char *piece = qkv_model_piece(m, prev, next, &len);
 *         fwrite(piece, 1, len, stdout);
 *         qkv_gen_feed(g, seq, &next, 1);               // decoded at the next step
 *         prev = next;
 *     }
 *     qkv_sampler_free(smp); qkv_gen_free(g); qkv_model_free(m);
 */

/* Loads a llama model from path (a llama2.c checkpoint file or a Hugging
   Face folder) with the tokenizer file `tokenizer`, or, when it is NULL,
   the one beside the model. Errors as qkv_model_load's; QKV_ERR_FORMAT
   when the tokenizer does not hold exactly vocab_size tokens,
   QKV_ERR_UNSUPPORTED for a folder of another model_type, a llama2.c
   export of version 1 or 2, rope_scaling or biases. */
QKV_API qkv_status qkv_model_load_llama(qkv_ctx *ctx, const char *path, const char *tokenizer,
                                        qkv_model **model);

/* llama: the BOS id the tokenizer starts with, and the (first) EOS id;
   -1 for other models. */
QKV_API int32_t qkv_model_bos(const qkv_model *model);
QKV_API int32_t qkv_model_eos(const qkv_model *model);

/* llama: 1 when a sampled id ends the text: BOS (llama2.c's stories
   separate texts with it) or an EOS id of the model; else 0. */
QKV_API int qkv_model_is_stop(const qkv_model *model, int32_t id);

/* llama: the bytes token id stands for when it follows token prev: its
   text, the raw byte for a byte token <0xHH>, without its leading space
   right after BOS (the tokenizer's dummy prefix); nothing for BOS and the
   EOS ids. *len (may be NULL) gets the length: the bytes are not
   NUL-terminated (a byte piece may be a NUL). Points into the model, valid
   while it lives. NULL (len 0) for an id out of range or another model. */
QKV_API const char *qkv_model_piece(const qkv_model *model, int32_t prev, int32_t id,
                                    int64_t *len);

/* llama: the text of ids[0 .. n) (the pieces of qkv_model_piece, each after
   its predecessor) into text, NUL-terminated; *len gets its length in
   bytes (not counting the NUL) even when cap is too small, which is
   QKV_ERR_SHAPE (text may be NULL with cap 0, to ask for the length).
   QKV_ERR_ARG for an id out of range. */
QKV_API qkv_status qkv_model_detokenize(qkv_ctx *ctx, const qkv_model *model,
                                        const int32_t *ids, int64_t n, char *text,
                                        int64_t cap, int64_t *len);

/* llama: writes the model as a Hugging Face Llama folder dir (made when
   missing): config.json, model.safetensors (F32; q and k rows permuted
   to Hugging Face's split-half rotary convention) and tokenizer.bin. So a
   llama2.c checkpoint converts: qkv_model_load, then qkv_model_export;
   the folder loads back to the same logits, bit for bit. QKV_ERR_IO when
   a file cannot be written. */
QKV_API qkv_status qkv_model_export(qkv_ctx *ctx, const qkv_model *model, const char *dir);

/*
 * qkv_gen — generation with a llama model for several sequences at once,
 * each growing its own keys and values in one paged KV pool (blocks of
 * block_size positions; see qkv_paged_cache), each added, run and removed
 * on its own (continuous batching).
 *
 * A sequence's tokens are queued (qkv_gen_add, qkv_gen_feed) and run by
 * the next qkv_gen_step, which runs every sequence's queued tokens:
 * several (a prompt) through matrix products and qkv_attention_forward
 * (qkv_attention_paged with all of them as queries when the sequence has
 * cached positions), one (decoding) through matrix-vector products and
 * qkv_attention_paged against its cache: the prefix is never recomputed.
 * After the step, qkv_gen_logits gives the logits that follow each run
 * sequence's last token.
 *
 * A sequence's logits are bitwise the same whatever other sequences share
 * its steps, and whether its tokens arrive in one step or are fed one by
 * one after a prompt; so batched generation gives exactly the text of
 * generating each sequence alone. Single tokens of different sequences
 * run in parallel on ctx's threads (one sequence per thread at a time);
 * prompts run one after another on all of them.
 *
 * The generator keeps ctx (its errors go there; the thread rule of ctx
 * applies to gen) and model: both must outlive it.
 */
typedef struct qkv_gen qkv_gen;

typedef struct {
    int64_t      max_seqs;       /* sequences alive at once (default 1) */
    int64_t      max_positions;  /* positions the KV pool holds, all sequences
                                    together; 0 (default): max_seqs x the
                                    model's context */
    int64_t      block_size;     /* positions per block, a power of two from
                                    8 to 256 (default 16) */
    qkv_kv_dtype kv_dtype;       /* cache elements (default QKV_KV_F32) */
} qkv_gen_opts;

/* max_seqs 1, max_positions 0, block_size 16, fp32 cache. */
QKV_API qkv_gen_opts qkv_gen_opts_default(void);

/* Creates a generator for model (a llama model) with its KV pool (2 x
   layers x positions x heads_kv x head_dim elements). QKV_ERR_UNSUPPORTED
   for another kind of model, QKV_ERR_ARG / QKV_ERR_DTYPE for bad options
   (max_positions below the model's context included), QKV_ERR_NOMEM. */
QKV_API qkv_status qkv_gen_create(qkv_ctx *ctx, const qkv_model *model,
                                  const qkv_gen_opts *opts, qkv_gen **gen);

/* Frees the generator and its pool; NULL is a no-op. */
QKV_API void qkv_gen_free(qkv_gen *gen);

/* Starts a sequence with tokens ids[0 .. n) (usually BOS and a prompt) to
   run at the next step; *seq gets its id, in [0, max_seqs) (the id of a
   removed sequence is given out again). QKV_ERR_ARG when max_seqs
   sequences are alive or an id is not in [0, vocab); QKV_ERR_SHAPE for
   n < 1 or more tokens than the context. */
QKV_API qkv_status qkv_gen_add(qkv_gen *gen, const int32_t *ids, int64_t n, int32_t *seq);

/* Queues ids[0 .. n) after sequence seq's tokens (the sampled one, or
   more text), to run at the next step. QKV_ERR_ARG for a dead sequence or
   a bad id, QKV_ERR_SHAPE when the context would overflow. */
QKV_API qkv_status qkv_gen_feed(qkv_gen *gen, int32_t seq, const int32_t *ids, int64_t n);

/* Runs the queued tokens of every sequence. QKV_ERR_NOMEM when the pool
   lacks the blocks they need (nothing runs then); any other error leaves
   the sequences that failed with their tokens still queued. */
QKV_API qkv_status qkv_gen_step(qkv_gen *gen);

/* The logits [vocab] after sequence seq's last run token, valid until the
   next step or removal; NULL before its first step or for a dead id. */
QKV_API const float *qkv_gen_logits(const qkv_gen *gen, int32_t seq);

/* Positions of seq held in the cache (its run tokens); -1 for a dead id. */
QKV_API int64_t qkv_gen_length(const qkv_gen *gen, int32_t seq);

/* Positions the pool has free (whole blocks). */
QKV_API int64_t qkv_gen_free_positions(const qkv_gen *gen);

/* Ends sequence seq: its blocks go back to the pool, its id may be given
   out again. QKV_ERR_ARG for a dead id. */
QKV_API qkv_status qkv_gen_remove(qkv_gen *gen, int32_t seq);

/* Where the time of the steps went. */
typedef struct {
    int64_t steps;
    int64_t prefill_tokens;    /* tokens run in prompts (several at once) */
    int64_t decode_tokens;     /* tokens run one per sequence */
    double  prefill_s;         /* wall seconds of the steps' prompt phase */
    double  decode_s;          /* wall seconds of their single-token phase */
    double  compute_s;         /* seconds in the forward, summed over the
                                  threads that ran sequences */
    double  attention_s;       /* of which in qkv's attention: the KV-cache
                                  appends and the attention calls */
} qkv_gen_stats;

/* Copies the counters (summed since creation or the last reset). */
QKV_API void qkv_gen_get_stats(const qkv_gen *gen, qkv_gen_stats *stats);
QKV_API void qkv_gen_reset_stats(qkv_gen *gen);

/*
 * qkv_sampler — the next token from a row of logits: greedy (temperature
 * 0, or top_k 1: the largest logit, the smaller id on ties), or a draw
 * from softmax(logits / temperature) kept to the top_k most probable ids,
 * then to the smallest set of the most probable (the smaller id first on
 * ties) whose probability reaches top_p of what is left. Draws come from
 * SplitMix64 seeded with seed, u = (x >> 11)·2^-53 in [0, 1), one per
 * sampled token; the same seed and logits give the same tokens anywhere.
 * A sampler is one stream of draws: use one per sequence.
 */
typedef struct {
    float    temperature;   /* >= 0 (default 1); 0: greedy */
    int64_t  top_k;         /* >= 0 (default 0: all tokens) */
    float    top_p;         /* in (0, 1] (default 1: all tokens) */
    uint64_t seed;          /* default 0 */
} qkv_sampler_opts;

typedef struct qkv_sampler qkv_sampler;

/* temperature 1, top_k 0, top_p 1, seed 0. */
QKV_API qkv_sampler_opts qkv_sampler_opts_default(void);

/* QKV_ERR_ARG for an option out of its domain. */
QKV_API qkv_status qkv_sampler_create(qkv_ctx *ctx, const qkv_sampler_opts *opts,
                                      qkv_sampler **sampler);
/* NULL is a no-op. */
QKV_API void qkv_sampler_free(qkv_sampler *sampler);

/* Picks *token from logits[0 .. n). QKV_ERR_ARG for a NaN or +inf logit or
   when every logit is -inf (-inf marks a banned id), QKV_ERR_SHAPE for
   n < 1. */
QKV_API qkv_status qkv_sampler_sample(qkv_ctx *ctx, qkv_sampler *sampler, const float *logits,
                                      int64_t n, int32_t *token);

#ifdef __cplusplus
}
#endif

#endif /* QKV_H */
