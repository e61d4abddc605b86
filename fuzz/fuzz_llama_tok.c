/*
 * fuzz_llama_tok.c — libFuzzer target for the llama2.c tokenizer reader
 * and its encoder. The input's first two bytes give the vocabulary size
 * (3 + a 16-bit number mod 1024) and the rest is the tokenizer file. A
 * tokenizer the reader accepts then encodes a few fixed texts and the
 * input itself: every id must be in range and have a piece. The seeds
 * (fuzz/corpus/llama_tok) come from fuzz/make_llama_seeds.py.
 */
#include "../src/model/model.h"

#include <stdlib.h>
#include <string.h>

static void encode(qkv_ctx *ctx, const qkv__bpe *t, const char *text, size_t len)
{
    int32_t *ids = NULL;
    int64_t n = 0;
    if (qkv__bpe_encode(ctx, t, text, len, 1, &ids, &n) != QKV_OK)
        abort();   /* any bytes encode */
    if (n < 1 || n > (int64_t)len + 2)   /* BOS may merge: it takes part */
        abort();
    for (int64_t i = 0; i < n; i++) {
        int64_t k;
        if (ids[i] < 0 || ids[i] >= t->n || !qkv__bpe_piece(t, i ? ids[i - 1] : -1, 1, ids[i], &k))
            abort();
    }
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static qkv_ctx *ctx;
    if (!ctx)
        ctx = qkv_ctx_create(1);
    if (size < 2)
        return 0;
    const int64_t V = 3 + ((int64_t)data[0] | (int64_t)data[1] << 8) % 1024;
    qkv__bpe t;
    qkv_status s = qkv__bpe_parse(ctx, data + 2, size - 2, V, "fuzz.bin", &t);
    if (s != QKV_OK) {
        if (s != QKV_ERR_FORMAT && s != QKV_ERR_NOMEM)
            abort();
        return 0;
    }
    static const char *const texts[] = { "", "Once upon a time", "a  b\n\tc",
                                         "caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x98\x80",
                                         "\xff\xfe\x80 broken \xe4\xb8" };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
        encode(ctx, &t, texts[i], strlen(texts[i]));
    encode(ctx, &t, (const char *)data, size);
    qkv__bpe_free(&t);
    return 0;
}
