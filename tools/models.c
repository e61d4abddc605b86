/*
 * models.c — the model commands of `qkv` (declared in models.h):
 *
 *   qkv embed DIR [-t N] [--tokens] [FILE]   one embedding (or id list) per line
 *   qkv recommend DIR [-t N] [-k K] ID...    the next items after a history
 *   qkv classify DIR IMAGES [LABELS] [-q]   digits of an IDX image file
 *
 * Thin shells over qkv_model_*: they read text, call the library and print.
 */
#include "models.h"

#include <qkv.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

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

/* An IDX file (gzip'd or not: zlib reads both) with the given magic and
   number of dimensions; returns its data (malloc'd) and the dimensions. */
static unsigned char *read_idx(const char *path, uint32_t magic, int ndims,
                               uint32_t dims[3], size_t *n_bytes)
{
    gzFile f = gzopen(path, "rb");
    if (!f) {
        fprintf(stderr, "qkv classify: cannot open '%s'\n", path);
        return NULL;
    }
    unsigned char hdr[16];
    int hb = 4 + 4 * ndims;
    size_t total = 1;
    int ok = gzread(f, hdr, (unsigned)hb) == hb &&
             ((uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | hdr[2] << 8 | hdr[3]) == magic;
    for (int d = 0; ok && d < ndims; d++) {
        const unsigned char *p = hdr + 4 + 4 * d;
        dims[d] = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        ok = dims[d] > 0 && dims[d] <= (1u << 24) && total <= ((size_t)1 << 31) / dims[d];
        total *= ok ? dims[d] : 1;
    }
    unsigned char *b = ok ? malloc(total) : NULL;
    if (!b || gzread(f, b, (unsigned)total) != (int)total) {
        fprintf(stderr, "qkv classify: '%s' is not an IDX file of magic %u\n", path, magic);
        free(b);
        b = NULL;
    }
    gzclose(f);
    *n_bytes = total;
    return b;
}

int qkv_cmd_classify(int argc, char **argv)
{
    const char *args[3] = { 0 };
    int threads = 0, n_args = 0, quiet = 0;
    for (int i = 0; i < argc; i++) {
        if ((!strcmp(argv[i], "-t") || !strcmp(argv[i], "--threads")) && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-q") || !strcmp(argv[i], "--quiet"))
            quiet = 1;
        else if (n_args < 3)
            args[n_args++] = argv[i];
        else {
            fprintf(stderr, "qkv classify: unexpected argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (n_args < 2) {
        fprintf(stderr, "usage: qkv classify MODEL_DIR IMAGES_IDX [LABELS_IDX] [-t N] [-q]\n");
        return 2;
    }
    uint32_t dims[3], ldims[3];
    size_t n_px = 0, n_lab = 0;
    unsigned char *px = read_idx(args[1], 2051, 3, dims, &n_px);
    unsigned char *lab = args[2] && px ? read_idx(args[2], 2049, 1, ldims, &n_lab) : NULL;
    qkv_ctx *ctx = px && (!args[2] || lab) ? qkv_ctx_create(threads) : NULL;
    qkv_model *m = ctx ? open_model(ctx, "classify", args[0]) : NULL;
    int rc = 1;
    if (m && strcmp(qkv_model_type(m), "vit") != 0) {
        fprintf(stderr, "qkv classify: %s is a %s model, not an image classifier\n", args[0],
                qkv_model_type(m));
    } else if (m && qkv_model_image_pixels(m) != (int64_t)dims[1] * dims[2]) {
        fprintf(stderr, "qkv classify: images are %ux%u, the model takes %lld pixels\n",
                dims[1], dims[2], (long long)qkv_model_image_pixels(m));
    } else if (m && lab && ldims[0] != dims[0]) {
        fprintf(stderr, "qkv classify: %u images but %u labels\n", dims[0], ldims[0]);
    } else if (m) {
        int64_t n = dims[0], k = qkv_model_dim(m), correct = 0;
        float *logits = malloc((size_t)(n * k) * sizeof(float));
        if (!logits || qkv_model_classify(ctx, m, px, n, logits) != QKV_OK) {
            fprintf(stderr, "qkv classify: %s\n", logits ? qkv_ctx_last_error(ctx) : "out of memory");
        } else {
            for (int64_t i = 0; i < n; i++) {
                int64_t best = 0;
                for (int64_t c = 1; c < k; c++)
                    if (logits[i * k + c] > logits[i * k + best])
                        best = c;
                if (!quiet)
                    printf("%lld\n", (long long)best);
                correct += lab && best == lab[i];
            }
            if (lab)
                fprintf(quiet ? stdout : stderr, "accuracy %.2f %% (%lld of %lld)\n",
                        100.0 * (double)correct / (double)n, (long long)correct, (long long)n);
            rc = 0;
        }
        free(logits);
    }
    free(px);
    free(lab);
    qkv_model_free(m);
    qkv_ctx_free(ctx);
    return rc;
}
