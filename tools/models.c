/*
 * models.c — the model commands of `qkv` (declared in models.h):
 *
 *   qkv embed DIR [-t N] [--tokens] [FILE]   one embedding (or id list) per line
 *   qkv recommend DIR [-t N] [-k K] ID...    the next items after a history
 *
 * Thin shells over qkv_model_*: they read text, call the library and print.
 */
#include "models.h"

#include <qkv.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { BATCH = 32 };

static qkv_model *open_model(qkv_ctx *ctx, const char *cmd, const char *dir)
{
    qkv_model *m = NULL;
    if (qkv_model_load(ctx, dir, &m) != QKV_OK)
        fprintf(stderr, "qkv %s: %s\n", cmd, qkv_ctx_last_error(ctx));
    return m;
}

/* Embeds (or tokenizes) the lines held in lines[0..n) and prints them. */
static int flush(qkv_ctx *ctx, qkv_model *m, int tokens, char **lines, int n, float *emb,
                 int32_t *ids)
{
    int64_t dim = qkv_model_dim(m);
    if (tokens) {
        for (int i = 0; i < n; i++) {
            int64_t k;
            if (qkv_model_tokenize(ctx, m, lines[i], ids, qkv_model_max_tokens(m), &k) != QKV_OK) {
                fprintf(stderr, "qkv embed: %s\n", qkv_ctx_last_error(ctx));
                return 1;
            }
            for (int64_t t = 0; t < k; t++)
                printf(t ? " %d" : "%d", ids[t]);
            printf("\n");
        }
        return 0;
    }
    if (qkv_model_embed(ctx, m, (const char *const *)lines, n, emb) != QKV_OK) {
        fprintf(stderr, "qkv embed: %s\n", qkv_ctx_last_error(ctx));
        return 1;
    }
    for (int i = 0; i < n; i++)
        for (int64_t c = 0; c < dim; c++)
            printf(c + 1 < dim ? "%.7g " : "%.7g\n", emb[i * dim + c]);
    return 0;
}

int qkv_cmd_embed(int argc, char **argv)
{
    const char *dir = NULL, *file = NULL;
    int threads = 0, tokens = 0;
    for (int i = 0; i < argc; i++) {
        if ((!strcmp(argv[i], "-t") || !strcmp(argv[i], "--threads")) && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tokens"))
            tokens = 1;
        else if (!dir)
            dir = argv[i];
        else if (!file)
            file = argv[i];
        else {
            fprintf(stderr, "qkv embed: unexpected argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (!dir) {
        fprintf(stderr, "usage: qkv embed MODEL_DIR [-t N] [--tokens] [FILE]\n");
        return 2;
    }
    FILE *in = file ? fopen(file, "rb") : stdin;
    if (!in) {
        fprintf(stderr, "qkv embed: cannot open '%s'\n", file);
        return 1;
    }
    qkv_ctx *ctx = qkv_ctx_create(threads);
    qkv_model *m = ctx ? open_model(ctx, "embed", dir) : NULL;
    int rc = m ? 0 : 1;
    if (m && strcmp(qkv_model_type(m), "bert") != 0) {
        fprintf(stderr, "qkv embed: %s is a %s model, not a text encoder\n", dir,
                qkv_model_type(m));
        rc = 1;
    }
    char *lines[BATCH] = { 0 };
    float *emb = m ? malloc((size_t)(BATCH * qkv_model_dim(m)) * sizeof(float)) : NULL;
    int32_t *ids = m ? malloc((size_t)qkv_model_max_tokens(m) * sizeof(int32_t) + 4) : NULL;
    if (rc == 0 && (!emb || !ids)) {
        fprintf(stderr, "qkv embed: out of memory\n");
        rc = 1;
    }
    int n = 0;
    size_t cap = 0;
    char *line = NULL;
    ssize_t len;
    while (rc == 0 && (len = getline(&line, &cap, in)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        lines[n++] = line;
        line = NULL;
        cap = 0;
        if (n == BATCH) {
            rc = flush(ctx, m, tokens, lines, n, emb, ids);
            for (int i = 0; i < n; i++)
                free(lines[i]);
            n = 0;
        }
    }
    if (rc == 0 && n > 0)
        rc = flush(ctx, m, tokens, lines, n, emb, ids);
    for (int i = 0; i < n; i++)
        free(lines[i]);
    free(line);
    free(emb);
    free(ids);
    if (in != stdin)
        fclose(in);
    qkv_model_free(m);
    qkv_ctx_free(ctx);
    return rc;
}

int qkv_cmd_recommend(int argc, char **argv)
{
    const char *dir = NULL;
    int threads = 1;
    long k = 10;
    int32_t *hist = malloc((size_t)(argc > 0 ? argc : 1) * sizeof(int32_t));
    int64_t len = 0;
    for (int i = 0; hist && i < argc; i++) {
        if ((!strcmp(argv[i], "-t") || !strcmp(argv[i], "--threads")) && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-k") && i + 1 < argc)
            k = strtol(argv[++i], NULL, 10);
        else if (!dir)
            dir = argv[i];
        else {
            char *end;
            long v = strtol(argv[i], &end, 10);
            if (*end || v < 0 || v > INT32_MAX) {
                fprintf(stderr, "qkv recommend: '%s' is not an item id\n", argv[i]);
                free(hist);
                return 2;
            }
            hist[len++] = (int32_t)v;
        }
    }
    if (!dir || len == 0 || k < 1) {
        fprintf(stderr, "usage: qkv recommend MODEL_DIR [-t N] [-k K] ITEM_ID...\n");
        free(hist);
        return 2;
    }
    qkv_ctx *ctx = qkv_ctx_create(threads);
    qkv_model *m = ctx ? open_model(ctx, "recommend", dir) : NULL;
    int32_t *items = malloc((size_t)k * sizeof(int32_t));
    float *scores = malloc((size_t)k * sizeof(float));
    int rc = 1;
    if (m && items && scores) {
        if (qkv_model_recommend(ctx, m, hist, len, k, items, scores) != QKV_OK) {
            fprintf(stderr, "qkv recommend: %s\n", qkv_ctx_last_error(ctx));
        } else {
            for (long i = 0; i < k; i++)
                printf("%d\t%.5f\n", items[i], scores[i]);
            rc = 0;
        }
    }
    free(items); free(scores); free(hist);
    qkv_model_free(m);
    qkv_ctx_free(ctx);
    return rc;
}
