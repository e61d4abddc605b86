/*
 * fuzz_llama2c.c — libFuzzer target for the llama2.c checkpoint reader:
 * the input is a whole checkpoint file. A checkpoint the reader accepts
 * then runs: a prompt of three tokens, two decode steps, through qkv_gen
 * (so every size the header gave is exercised by the forward and the
 * paged cache). The seeds (fuzz/corpus/llama2c) are tiny random models
 * made by fuzz/make_llama_seeds.py.
 */
#include "../src/model/model.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static qkv_ctx *ctx;
    if (!ctx)
        ctx = qkv_ctx_create(1);
    qkv__llama m;
    qkv_status s = qkv__llama_parse_l2c(ctx, data, size, "fuzz.bin", &m);
    if (s != QKV_OK) {
        if (s != QKV_ERR_FORMAT && s != QKV_ERR_UNSUPPORTED && s != QKV_ERR_NOMEM)
            abort();
        return 0;
    }
    /* only small models run (the input's size bounds them anyway) */
    if (m.D * m.F * m.L <= (1 << 16) && m.S <= 4096) {
        qkv_model model = { &qkv__llama_graph, &m };
        qkv_gen_opts go = qkv_gen_opts_default();
        go.block_size = 8;
        qkv_gen *g = NULL;
        if (qkv_gen_create(ctx, &model, &go, &g) != QKV_OK)
            abort();
        const int32_t ids[3] = { 1, (int32_t)(m.V - 1), 2 };
        const int64_t n = m.S < 3 ? m.S : 3;
        int32_t seq;
        if (qkv_gen_add(g, ids, n, &seq) != QKV_OK || qkv_gen_step(g) != QKV_OK)
            abort();
        for (int64_t p = n; p < m.S && p < n + 2; p++) {
            const float *lg = qkv_gen_logits(g, seq);
            int32_t next = 0;
            for (int32_t i = 1; i < m.V; i++)
                if (lg[i] > lg[next])
                    next = i;
            if (qkv_gen_feed(g, seq, &next, 1) != QKV_OK || qkv_gen_step(g) != QKV_OK)
                abort();
        }
        qkv_gen_free(g);
    }
    qkv__llama_release(&m);
    return 0;
}
