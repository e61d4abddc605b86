/*
 * fuzz_tokenizer.c — libFuzzer target for the WordPiece tokenizer. The
 * input's first byte picks max_len; the rest is tokenized as text with a
 * fixed vocabulary, and also read as a vocabulary itself. Every id must be
 * a valid index, the count within max_len, and invalid UTF-8 refused.
 */
#include "../src/model/model.h"

#include <stdlib.h>
#include <string.h>

static const char vocab[] =
    "[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n##s\n##ing\nhello\nworld\n,\n.\n!\n"
    "a\nb\nc\n##a\n##b\n##c\ncafe\n\xe4\xb8\xad\n\xc3\xa9\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static qkv_ctx *ctx;
    static qkv__wordpiece wp;
    if (!ctx) {
        ctx = qkv_ctx_create(1);
        if (qkv__wp_from_buffer(ctx, vocab, sizeof vocab - 1, &wp) != QKV_OK)
            abort();
    }
    if (size < 1)
        return 0;
    int64_t max_len = 2 + data[0] % 64, n = -1;
    int32_t ids[66];
    qkv_status s = qkv__wp_encode(ctx, &wp, (const char *)data + 1, size - 1, ids, max_len, &n);
    if (s == QKV_OK) {
        if (n < 2 || n > max_len || ids[0] != wp.cls || ids[n - 1] != wp.sep)
            abort();
        for (int64_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= wp.n)
                abort();
    } else if (s != QKV_ERR_ARG) {
        abort();
    }
    qkv__wordpiece w2;
    if (qkv__wp_from_buffer(ctx, (const char *)data, size, &w2) == QKV_OK) {
        s = qkv__wp_encode(ctx, &w2, (const char *)data, size, ids, max_len, &n);
        if (s == QKV_OK)
            for (int64_t i = 0; i < n; i++)
                if (ids[i] < 0 || ids[i] >= w2.n)
                    abort();
        qkv__wp_free(&w2);
    }
    return 0;
}
