/*
 * fuzz_safetensors.c — libFuzzer target for the safetensors reader: the
 * input is a whole file. Every tensor the reader accepts is then copied
 * out as fp32 (when it is F32/F16/BF16), so AddressSanitizer sees any
 * offset or size that escaped the checks.
 */
#include "../src/model/st.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static qkv_ctx *ctx;
    if (!ctx)
        ctx = qkv_ctx_create(1);
    qkv__st st;
    if (qkv__st_parse(ctx, data, size, &st) != QKV_OK)
        return 0;
    for (int i = 0; i < st.n; i++) {
        const qkv__st_tensor *t = &st.t[i];
        if (t->nbytes > (64u << 20))
            continue;
        float *p = NULL;
        if (qkv__st_load(ctx, &st, t->name, t->ndim, t->shape, &p) == QKV_OK &&
            t->nbytes && p[0] != p[0] && p[0] == p[0])
            abort();   /* never: reads the copy so it is not optimized away */
        free(p);
    }
    qkv__st_close(&st);
    return 0;
}
