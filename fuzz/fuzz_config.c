/*
 * fuzz_config.c — libFuzzer target for config.json: the input becomes the
 * config.json of an otherwise empty model folder and qkv_model_load reads
 * it. Every graph's config checks run (model_type picks which) before the
 * load stops at the missing weights or vocabulary; nothing may crash,
 * leak, or read outside the input.
 */
#include <qkv.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static qkv_ctx *ctx;
    static char dir[64], path[128];
    if (!ctx) {
        ctx = qkv_ctx_create(1);
        snprintf(dir, sizeof dir, "/tmp/qkv_fuzz_config_XXXXXX");
        if (!mkdtemp(dir))
            abort();
        snprintf(path, sizeof path, "%s/config.json", dir);
    }
    FILE *f = fopen(path, "wb");
    if (!f)
        abort();
    fwrite(data, 1, size, f);
    fclose(f);
    qkv_model *m = NULL;
    qkv_status s = qkv_model_load(ctx, dir, &m);
    if (s == QKV_OK)   /* impossible without weights: a bug */
        abort();
    if (m || strlen(qkv_ctx_last_error(ctx)) == 0)
        abort();
    return 0;
}
