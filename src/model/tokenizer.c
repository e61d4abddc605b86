/*
 * tokenizer.c — BERT's WordPiece tokenization, as the Hugging Face
 * tokenizers' BertNormalizer + BertPreTokenizer + WordPiece + [CLS]/[SEP]
 * template define it:
 *
 *   1. clean: drop NUL, U+FFFD and control / format / unassigned / private
 *      characters (not \t \n \r); every white-space character becomes ' '
 *   2. put spaces around CJK ideographs (each becomes its own word)
 *   3. uncased models: NFD, drop non-spacing marks (accents), lower-case
 *      (each step as the tokenizer config says; on by default)
 *   4. split on spaces, and every punctuation character (ASCII punctuation
 *      or a Unicode P* category) is a word of its own
 *   5. each word: longest vocabulary match from the left, continuations
 *      prefixed with "##"; a word with an unmatched rest, or longer than
 *      100 characters, becomes [UNK]
 *   6. [CLS] + ids (truncated to max_len - 2) + [SEP]
 *
 * Unicode data (categories, decompositions, case) comes from utf8proc.
 * Text that is not valid UTF-8 is refused. Not a general tokenizer
 * library: no pairs, no offsets, no BPE.
 */
#include "model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

enum { MAX_TOKEN_BYTES = 256 };

int32_t qkv__wp_id(const qkv__wordpiece *wp, const char *s, size_t len)
{
    for (uint32_t i = qkv__str_hash(s, len) & wp->mask;; i = (i + 1) & wp->mask) {
        int32_t id = wp->slot[i];
        if (id < 0)
            return -1;
        if (strlen(wp->tok[id]) == len && memcmp(wp->tok[id], s, len) == 0)
            return id;
    }
}

void qkv__wp_free(qkv__wordpiece *wp)
{
    if (!wp)
        return;
    for (int32_t i = 0; i < wp->n; i++)
        free(wp->tok[i]);
    free(wp->tok);
    free(wp->slot);
    memset(wp, 0, sizeof *wp);
}

qkv_status qkv__wp_from_buffer(qkv_ctx *ctx, const char *buf, size_t len, qkv__wordpiece *wp)
{
    memset(wp, 0, sizeof *wp);
    size_t lines = 0;
    for (size_t i = 0; i < len; i++)
        lines += buf[i] == '\n';
    lines += len > 0 && buf[len - 1] != '\n';
    if (lines == 0 || lines > (1u << 24))
        return qkv__fail(ctx, QKV_ERR_FORMAT, "vocab: %zu lines (1 to 16777216 expected)", lines);
    uint32_t cap = 1;
    while (cap < 2 * lines)
        cap <<= 1;
    wp->tok = calloc(lines, sizeof *wp->tok);
    wp->slot = malloc(cap * sizeof *wp->slot);
    if (!wp->tok || !wp->slot) {
        qkv__wp_free(wp);
        return qkv__fail(ctx, QKV_ERR_NOMEM, "vocab: out of memory");
    }
    memset(wp->slot, 0xff, cap * sizeof *wp->slot);
    wp->mask = cap - 1;
    size_t pos = 0;
    while (pos < len) {
        const char *nl = memchr(buf + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - buf) : len, n = end - pos;
        if (n > 0 && buf[pos + n - 1] == '\r')
            n--;
        int32_t id = wp->n;
        if (n == 0 || n > MAX_TOKEN_BYTES || memchr(buf + pos, '\0', n) ||
            utf8proc_decompose((const utf8proc_uint8_t *)buf + pos, (utf8proc_ssize_t)n,
                               NULL, 0, 0) < 0) {
            qkv__wp_free(wp);
            return qkv__fail(ctx, QKV_ERR_FORMAT,
                             "vocab: line %d is empty, longer than %d bytes or not UTF-8",
                             id + 1, MAX_TOKEN_BYTES);
        }
        if (qkv__wp_id(wp, buf + pos, n) >= 0) {
            qkv__wp_free(wp);
            return qkv__fail(ctx, QKV_ERR_FORMAT, "vocab: line %d repeats a token", id + 1);
        }
        wp->tok[id] = malloc(n + 1);
        if (!wp->tok[id]) {
            qkv__wp_free(wp);
            return qkv__fail(ctx, QKV_ERR_NOMEM, "vocab: out of memory");
        }
        memcpy(wp->tok[id], buf + pos, n);
        wp->tok[id][n] = '\0';
        wp->n++;
        uint32_t i = qkv__str_hash(buf + pos, n) & wp->mask;
        while (wp->slot[i] >= 0)
            i = (i + 1) & wp->mask;
        wp->slot[i] = id;
        pos = end + 1;
    }
    wp->cls = qkv__wp_id(wp, "[CLS]", 5);
    wp->sep = qkv__wp_id(wp, "[SEP]", 5);
    wp->unk = qkv__wp_id(wp, "[UNK]", 5);
    wp->lower = 1;
    wp->strip = 1;
    wp->cjk = 1;
    wp->max_chars = 100;
    if (wp->cls < 0 || wp->sep < 0 || wp->unk < 0) {
        qkv__wp_free(wp);
        return qkv__fail(ctx, QKV_ERR_FORMAT, "vocab: [CLS], [SEP] or [UNK] is missing");
    }
    return QKV_OK;
}

qkv_status qkv__wp_load(qkv_ctx *ctx, const char *path, qkv__wordpiece *wp)
{
    memset(wp, 0, sizeof *wp);
    char *buf;
    size_t n;
    qkv_status s = qkv__read_file(ctx, path, (size_t)64 << 20, &buf, &n);
    if (s != QKV_OK)
        return s;
    s = qkv__wp_from_buffer(ctx, buf, n, wp);
    free(buf);
    return s;
}

/* ---- character classes ------------------------------------------------------ */

static int is_white(int32_t c)   /* \t \n \r and Unicode White_Space */
{
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0B || c == 0x0C ||
        c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
        c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000)
        return 1;
    return utf8proc_category(c) == UTF8PROC_CATEGORY_ZS;
}

static int is_control(int32_t c)   /* the C* categories, except \t \n \r */
{
    if (c == '\t' || c == '\n' || c == '\r')
        return 0;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_CC: case UTF8PROC_CATEGORY_CF: case UTF8PROC_CATEGORY_CN:
    case UTF8PROC_CATEGORY_CO: case UTF8PROC_CATEGORY_CS:
        return 1;
    default:
        return 0;
    }
}

static int is_punct(int32_t c)
{
    if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) ||
        (c >= 123 && c <= 126))
        return 1;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_PC: case UTF8PROC_CATEGORY_PD: case UTF8PROC_CATEGORY_PS:
    case UTF8PROC_CATEGORY_PE: case UTF8PROC_CATEGORY_PI: case UTF8PROC_CATEGORY_PF:
    case UTF8PROC_CATEGORY_PO:
        return 1;
    default:
        return 0;
    }
}

static int is_cjk(int32_t c)
{
    return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
           (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
           (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

/* ---- encoding ---------------------------------------------------------------- */

/* A growable array of code points. */
typedef struct { int32_t *c; size_t n, cap; int oom; } cps;

static void push(cps *a, int32_t c)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 256;
        int32_t *p = realloc(a->c, cap * sizeof *p);
        if (!p) {
            a->oom = 1;
            return;
        }
        a->c = p;
        a->cap = cap;
    }
    a->c[a->n++] = c;
}

/* Steps 1-3: the normalized text as code points. */
static qkv_status normalize(qkv_ctx *ctx, const qkv__wordpiece *wp, const char *text,
                            size_t len, cps *out)
{
    const utf8proc_uint8_t *s = (const utf8proc_uint8_t *)text;
    size_t i = 0;
    while (i < len) {
        utf8proc_int32_t c;
        utf8proc_ssize_t k = utf8proc_iterate(s + i, (utf8proc_ssize_t)(len - i), &c);
        if (k <= 0)
            return qkv__fail(ctx, QKV_ERR_ARG, "text is not valid UTF-8 at byte %zu", i);
        i += (size_t)k;
        if (c == 0 || c == 0xFFFD || is_control(c))
            continue;
        if (is_white(c)) {
            push(out, ' ');
            continue;
        }
        if (wp->cjk && is_cjk(c)) {
            push(out, ' ');
            push(out, c);
            push(out, ' ');
            continue;
        }
        if (!wp->strip) {
            push(out, wp->lower ? utf8proc_tolower(c) : c);
            continue;
        }
        utf8proc_int32_t d[32];
        int last = 0;
        utf8proc_ssize_t nd = utf8proc_decompose_char(c, d, 32, UTF8PROC_DECOMPOSE, &last);
        if (nd < 0 || nd > 32) {
            d[0] = c;
            nd = 1;
        }
        for (utf8proc_ssize_t j = 0; j < nd; j++)
            if (utf8proc_category(d[j]) != UTF8PROC_CATEGORY_MN)
                push(out, wp->lower ? utf8proc_tolower(d[j]) : d[j]);
    }
    if (out->oom)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "tokenizer: out of memory");
    return QKV_OK;
}

/* Step 5 for one word of n code points; appends ids while *count < cap. */
static void wordpiece(const qkv__wordpiece *wp, const int32_t *w, size_t n,
                      int32_t *ids, int64_t cap, int64_t *count)
{
    if (*count >= cap)
        return;
    if (n > (size_t)wp->max_chars) {
        ids[(*count)++] = wp->unk;
        return;
    }
    char u[4 * 100], key[2 + 4 * 100];
    size_t off[101];   /* byte offset of each code point in u */
    size_t b = 0;
    for (size_t i = 0; i < n; i++) {
        off[i] = b;
        b += (size_t)utf8proc_encode_char(w[i], (utf8proc_uint8_t *)u + b);
    }
    off[n] = b;
    memcpy(key, "##", 2);
    int32_t pieces[100];
    size_t np = 0, start = 0;
    while (start < n) {
        int32_t id = -1;
        size_t end = n;
        for (; end > start; end--) {
            size_t bytes = off[end] - off[start];
            if (start) {
                memcpy(key + 2, u + off[start], bytes);
                id = qkv__wp_id(wp, key, bytes + 2);
            } else {
                id = qkv__wp_id(wp, u, bytes);
            }
            if (id >= 0)
                break;
        }
        if (id < 0) {
            ids[(*count)++] = wp->unk;
            return;
        }
        pieces[np++] = id;
        start = end;
    }
    for (size_t i = 0; i < np && *count < cap; i++)
        ids[(*count)++] = pieces[i];
}

qkv_status qkv__wp_encode(qkv_ctx *ctx, const qkv__wordpiece *wp, const char *text,
                          size_t len, int32_t *ids, int64_t max_len, int64_t *n)
{
    *n = 0;
    if (max_len < 2)
        return qkv__fail(ctx, QKV_ERR_ARG, "tokenizer: max_len %lld < 2", (long long)max_len);
    cps cp = { 0 };
    qkv_status s = normalize(ctx, wp, text, len, &cp);
    if (s != QKV_OK) {
        free(cp.c);
        return s;
    }
    int64_t count = 1, cap = max_len - 1;   /* room for [CLS] ... [SEP] */
    ids[0] = wp->cls;
    size_t i = 0;
    while (i < cp.n && count < cap) {
        int32_t c = cp.c[i];
        if (c == ' ') {
            i++;
            continue;
        }
        if (is_punct(c)) {
            wordpiece(wp, &c, 1, ids, cap, &count);
            i++;
            continue;
        }
        size_t j = i;
        while (j < cp.n && cp.c[j] != ' ' && !is_punct(cp.c[j]))
            j++;
        wordpiece(wp, cp.c + i, j - i, ids, cap, &count);
        i = j;
    }
    ids[count++] = wp->sep;
    *n = count;
    free(cp.c);
    return QKV_OK;
}
