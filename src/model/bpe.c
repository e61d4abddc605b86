/*
 * bpe.c — the tokenizer of llama2.c checkpoints (tokenizer.bin, tok512.bin):
 * sentencepiece-style BPE driven by merge scores, with byte fallback.
 *
 * File layout: int32 max_token_length, then for each of the model's
 * vocab_size tokens (the count is not stored) a float32 score, an int32
 * byte length n and n bytes of text. Every field is checked: lengths in
 * [1, max_token_length] and inside the file, finite scores, and the file
 * must end exactly after the last token (a tokenizer made for another
 * vocabulary size is refused, not half read).
 *
 * Encoding: BOS, then (for non-empty text) the token of " " (the dummy
 * prefix), then one token per UTF-8 code point, or one byte token <0xHH>
 * per byte when the code point has none; then, repeatedly, the adjacent
 * pair whose concatenated text is a token of the highest score (the
 * leftmost on ties, BOS taking part) is merged, until no pair merges.
 * The merges run on a heap over a linked list, O(n log n), and pick
 * exactly the pair the plain rescan-everything loop picks.
 *
 * Not here: sentencepiece's .model protobuf, normalization, unigram models.
 */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_TOKEN_LEN = 1 << 16, MAX_VOCAB = 1 << 22 };

int32_t qkv__bpe_id(const qkv__bpe *t, const char *s, size_t len)
{
    for (uint32_t i = qkv__str_hash(s, len) & t->mask;; i = (i + 1) & t->mask) {
        const int32_t id = t->slot[i];
        if (id < 0)
            return -1;
        if ((size_t)t->len[id] == len && memcmp(t->text + t->off[id], s, len) == 0)
            return id;
    }
}

void qkv__bpe_free(qkv__bpe *t)
{
    if (!t)
        return;
    free(t->text);
    free(t->off);
    free(t->len);
    free(t->score);
    free(t->slot);
    free(t->byte_of);
    memset(t, 0, sizeof *t);
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10
         : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* The byte a token "<0xHH>" stands for, or -1. */
static int byte_token(const char *s, int32_t len)
{
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    const int hi = hexval(s[3]), lo = hexval(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

static int32_t read_i32(const unsigned char *p)
{
    return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                     (uint32_t)p[3] << 24);
}

qkv_status qkv__bpe_parse(qkv_ctx *ctx, const void *buf, size_t size, int64_t vocab_size,
                          const char *name, qkv__bpe *t)
{
    memset(t, 0, sizeof *t);
    const unsigned char *b = buf;
    if (vocab_size < 3 || vocab_size > MAX_VOCAB)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: vocab_size %lld is outside [3, %d]", name,
                         (long long)vocab_size, MAX_VOCAB);
    if (!buf || size < 4)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: %zu bytes, shorter than the 4-byte "
                         "max_token_length", name, size);
    const int32_t max_len = read_i32(b);
    if (max_len < 1 || max_len > MAX_TOKEN_LEN)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: max_token_length %d is outside [1, %d]",
                         name, max_len, MAX_TOKEN_LEN);
    /* a first pass checks the layout and measures the text */
    size_t at = 4, text_bytes = 0;
    for (int64_t i = 0; i < vocab_size; i++) {
        if (size - at < 8)
            return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: ends inside token %lld of the %lld "
                             "the model's vocab_size says (%zu bytes; a tokenizer for a "
                             "smaller vocabulary?)", name, (long long)i,
                             (long long)vocab_size, size);
        float score;
        memcpy(&score, b + at, 4);
        const int32_t n = read_i32(b + at + 4);
        if (!isfinite(score))
            return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: token %lld has a non-finite score",
                             name, (long long)i);
        if (n < 1 || n > max_len)
            return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: token %lld has length %d, outside "
                             "[1, max_token_length = %d]", name, (long long)i, n, max_len);
        if ((size_t)n > size - at - 8)
            return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: token %lld (%d bytes) runs past the "
                             "end of the file", name, (long long)i, n);
        at += 8 + (size_t)n;
        text_bytes += (size_t)n;
    }
    if (at != size)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: %zu bytes follow the %lld tokens the "
                         "model's vocab_size says (a tokenizer for a larger vocabulary?)",
                         name, size - at, (long long)vocab_size);
    const int32_t V = (int32_t)vocab_size;
    uint32_t cap = 1;
    while (cap < 2u * (uint32_t)V)
        cap <<= 1;
    t->n = V;
    t->max_len = max_len;
    t->text = malloc(text_bytes + 1);
    t->off = malloc((size_t)V * sizeof *t->off);
    t->len = malloc((size_t)V * sizeof *t->len);
    t->score = malloc((size_t)V * sizeof *t->score);
    t->byte_of = malloc((size_t)V * sizeof *t->byte_of);
    t->slot = malloc(cap * sizeof *t->slot);
    t->mask = cap - 1;
    if (!t->text || !t->off || !t->len || !t->score || !t->byte_of || !t->slot) {
        qkv__bpe_free(t);
        return qkv__fail(ctx, QKV_ERR_NOMEM, "%s: out of memory", name);
    }
    memset(t->slot, 0xff, cap * sizeof *t->slot);
    for (int i = 0; i < 256; i++)
        t->byte_id[i] = -1;
    at = 4;
    size_t to = 0;
    for (int32_t i = 0; i < V; i++) {
        memcpy(&t->score[i], b + at, 4);
        t->len[i] = read_i32(b + at + 4);
        t->off[i] = to;
        memcpy(t->text + to, b + at + 8, (size_t)t->len[i]);
        at += 8 + (size_t)t->len[i];
        to += (size_t)t->len[i];
        /* texts that repeat keep their smallest id for lookups */
        const char *s = t->text + t->off[i];
        if (qkv__bpe_id(t, s, (size_t)t->len[i]) < 0) {
            uint32_t h = qkv__str_hash(s, (size_t)t->len[i]) & t->mask;
            while (t->slot[h] >= 0)
                h = (h + 1) & t->mask;
            t->slot[h] = i;
        }
        const int byte = byte_token(s, t->len[i]);
        t->byte_of[i] = (int16_t)byte;
        if (byte >= 0 && t->byte_id[byte] < 0)
            t->byte_id[byte] = i;
    }
    t->text[text_bytes] = '\0';
    return QKV_OK;
}

qkv_status qkv__bpe_load(qkv_ctx *ctx, const char *path, int64_t vocab_size, qkv__bpe *t)
{
    char *buf;
    size_t len;
    memset(t, 0, sizeof *t);
    /* 4 bytes, and per token 8 + at most MAX_TOKEN_LEN */
    qkv_status s = qkv__read_file(ctx, path, (size_t)4 + (size_t)MAX_VOCAB * 64, &buf, &len);
    if (s != QKV_OK)
        return s;
    s = qkv__bpe_parse(ctx, buf, len, vocab_size, path, t);
    free(buf);
    return s;
}

/* ---- encoding ------------------------------------------------------------- */

/* A mergeable adjacent pair on the heap: nodes i < j (j = next of i when
   pushed) and the versions they had then; stale when either changed. */
typedef struct {
    float   score;
    int32_t i, j, id;
    int32_t vi, vj;
} pair;

/* Heap order: the higher score first, then the leftmost pair. */
static int before(const pair *a, const pair *b)
{
    return a->score > b->score || (a->score == b->score && a->i < b->i);
}

typedef struct {
    pair   *h;
    int64_t n, cap;
} heap;

static int heap_push(heap *q, pair p)
{
    if (q->n == q->cap) {
        int64_t cap = q->cap ? 2 * q->cap : 64;
        pair *h = realloc(q->h, (size_t)cap * sizeof *h);
        if (!h)
            return 0;
        q->h = h;
        q->cap = cap;
    }
    int64_t i = q->n++;
    while (i > 0 && before(&p, &q->h[(i - 1) / 2])) {
        q->h[i] = q->h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    q->h[i] = p;
    return 1;
}

static pair heap_pop(heap *q)
{
    pair top = q->h[0], last = q->h[--q->n];
    int64_t i = 0;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= q->n)
            break;
        if (c + 1 < q->n && before(&q->h[c + 1], &q->h[c]))
            c++;
        if (!before(&q->h[c], &last))
            break;
        q->h[i] = q->h[c];
        i = c;
    }
    if (q->n > 0)
        q->h[i] = last;
    return top;
}

typedef struct {
    const qkv__bpe *t;
    int32_t *id, *next, *prev, *ver;
    char    *buf;     /* room for two tokens' texts */
    heap     q;
} merger;

/* Pushes the pair (i, next of i) when its concatenation is a token. */
static int push_pair(merger *m, int32_t i)
{
    const int32_t j = m->next[i];
    if (j < 0)
        return 1;
    const qkv__bpe *t = m->t;
    const int32_t a = m->id[i], b = m->id[j];
    const int32_t la = t->len[a], lb = t->len[b];
    if (la + lb > t->max_len)
        return 1;
    memcpy(m->buf, t->text + t->off[a], (size_t)la);
    memcpy(m->buf + la, t->text + t->off[b], (size_t)lb);
    const int32_t id = qkv__bpe_id(t, m->buf, (size_t)(la + lb));
    if (id < 0)
        return 1;
    pair p = { t->score[id], i, j, id, m->ver[i], m->ver[j] };
    return heap_push(&m->q, p);
}

/* The token of one code point's bytes, or its bytes' tokens (<unk> for a
   byte without one), appended to ids. */
static void code_point(const qkv__bpe *t, const char *s, size_t len, int32_t *ids, int64_t *n)
{
    const int32_t id = qkv__bpe_id(t, s, len);
    if (id >= 0) {
        ids[(*n)++] = id;
        return;
    }
    for (size_t k = 0; k < len; k++) {
        const int32_t b = t->byte_id[(unsigned char)s[k]];
        ids[(*n)++] = b >= 0 ? b : QKV__BPE_UNK;
    }
}

qkv_status qkv__bpe_encode(qkv_ctx *ctx, const qkv__bpe *t, const char *text, size_t len,
                           int32_t bos, int32_t **ids_out, int64_t *n_out)
{
    *ids_out = NULL;
    *n_out = 0;
    if (len > ((size_t)1 << 30))
        return qkv__fail(ctx, QKV_ERR_ARG, "text: %zu bytes (at most 2^30)", len);
    /* at most one token per byte, plus BOS and the dummy prefix */
    const int64_t cap = (int64_t)len + 2;
    merger m = { t, NULL, NULL, NULL, NULL, NULL, { NULL, 0, 0 } };
    m.id = malloc((size_t)cap * sizeof *m.id);
    m.next = malloc((size_t)cap * sizeof *m.next);
    m.prev = malloc((size_t)cap * sizeof *m.prev);
    m.ver = calloc((size_t)cap, sizeof *m.ver);
    m.buf = malloc(2 * (size_t)t->max_len);
    qkv_status s = QKV_OK;
    if (!m.id || !m.next || !m.prev || !m.ver || !m.buf) {
        s = qkv__fail(ctx, QKV_ERR_NOMEM, "tokenizer: out of memory");
        goto done;
    }
    int64_t n = 0;
    if (bos >= 0)
        m.id[n++] = bos;
    if (len > 0)
        code_point(t, " ", 1, m.id, &n);
    /* code points as llama2.c groups them: a byte that is not a
       continuation starts one, up to 4 bytes in all */
    for (size_t i = 0; i < len;) {
        size_t k = 1;
        while (i + k < len && k < 4 && ((unsigned char)text[i + k] & 0xC0) == 0x80)
            k++;
        code_point(t, text + i, k, m.id, &n);
        i += k;
    }
    for (int64_t i = 0; i < n; i++) {
        m.next[i] = i + 1 < n ? (int32_t)(i + 1) : -1;
        m.prev[i] = (int32_t)i - 1;
    }
    for (int64_t i = 0; i + 1 < n; i++)
        if (!push_pair(&m, (int32_t)i)) {
            s = qkv__fail(ctx, QKV_ERR_NOMEM, "tokenizer: out of memory");
            goto done;
        }
    while (m.q.n > 0) {
        const pair p = heap_pop(&m.q);
        if (m.ver[p.i] != p.vi || m.ver[p.j] != p.vj || m.next[p.i] != p.j)
            continue;   /* a pair that a merge has changed */
        m.id[p.i] = p.id;
        m.ver[p.i]++;
        m.ver[p.j] = -1;   /* removed: no pair with it is valid any more */
        m.next[p.i] = m.next[p.j];
        if (m.next[p.j] >= 0)
            m.prev[m.next[p.j]] = p.i;
        const int ok = push_pair(&m, p.i) && (m.prev[p.i] < 0 || push_pair(&m, m.prev[p.i]));
        if (!ok) {
            s = qkv__fail(ctx, QKV_ERR_NOMEM, "tokenizer: out of memory");
            goto done;
        }
    }
    int64_t k = 0;
    for (int32_t i = n ? 0 : -1; i >= 0; i = m.next[i])
        m.id[k++] = m.id[i];
    *ids_out = m.id;
    *n_out = k;
    m.id = NULL;
done:
    free(m.id);
    free(m.next);
    free(m.prev);
    free(m.ver);
    free(m.buf);
    free(m.q.h);
    return s;
}

/* ---- decoding --------------------------------------------------------------- */

static const unsigned char all_bytes[256] = {
      0,   1,   2,   3,   4,   5,   6,   7,   8,   9,  10,  11,  12,  13,  14,  15,
     16,  17,  18,  19,  20,  21,  22,  23,  24,  25,  26,  27,  28,  29,  30,  31,
     32,  33,  34,  35,  36,  37,  38,  39,  40,  41,  42,  43,  44,  45,  46,  47,
     48,  49,  50,  51,  52,  53,  54,  55,  56,  57,  58,  59,  60,  61,  62,  63,
     64,  65,  66,  67,  68,  69,  70,  71,  72,  73,  74,  75,  76,  77,  78,  79,
     80,  81,  82,  83,  84,  85,  86,  87,  88,  89,  90,  91,  92,  93,  94,  95,
     96,  97,  98,  99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111,
    112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127,
    128, 129, 130, 131, 132, 133, 134, 135, 136, 137, 138, 139, 140, 141, 142, 143,
    144, 145, 146, 147, 148, 149, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159,
    160, 161, 162, 163, 164, 165, 166, 167, 168, 169, 170, 171, 172, 173, 174, 175,
    176, 177, 178, 179, 180, 181, 182, 183, 184, 185, 186, 187, 188, 189, 190, 191,
    192, 193, 194, 195, 196, 197, 198, 199, 200, 201, 202, 203, 204, 205, 206, 207,
    208, 209, 210, 211, 212, 213, 214, 215, 216, 217, 218, 219, 220, 221, 222, 223,
    224, 225, 226, 227, 228, 229, 230, 231, 232, 233, 234, 235, 236, 237, 238, 239,
    240, 241, 242, 243, 244, 245, 246, 247, 248, 249, 250, 251, 252, 253, 254, 255,
};

const char *qkv__bpe_piece(const qkv__bpe *t, int32_t prev, int32_t bos, int32_t id,
                           int64_t *len)
{
    *len = 0;
    if (id < 0 || id >= t->n)
        return NULL;
    if (t->byte_of[id] >= 0) {
        *len = 1;
        return (const char *)&all_bytes[t->byte_of[id]];
    }
    const char *s = t->text + t->off[id];
    int64_t n = t->len[id];
    if (prev == bos && bos >= 0 && n > 0 && s[0] == ' ') {   /* the dummy prefix */
        s++;
        n--;
    }
    *len = n;
    return s;
}
