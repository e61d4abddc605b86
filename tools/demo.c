/*
 * demo.c — `qkv demo`: a short tour. Attention on a small random problem
 * checked against the double-precision reference and timed (fp32, bf16),
 * decoding from a paged KV cache, and, when the stories260K model is
 * found, a short story generated with it.
 */
#include "models.h"

#include <qkv.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void fill(float *x, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(seed >> 40) / (double)(1 << 24) * 2.0 - 1.0);
    }
}

/* The median of reps timings of fn(arg). */
static double time_median(int reps, qkv_status (*fn)(void *), void *arg)
{
    double t[16];
    fn(arg);
    for (int r = 0; r < reps; r++) {
        const double t0 = now_s();
        fn(arg);
        t[r] = now_s() - t0;
    }
    for (int i = 1; i < reps; i++)
        for (int j = i; j > 0 && t[j] < t[j - 1]; j--) {
            const double x = t[j];
            t[j] = t[j - 1];
            t[j - 1] = x;
        }
    return t[reps / 2];
}

typedef struct {
    qkv_ctx      *ctx;
    qkv_tensor    q, k, v, o;
    qkv_attn_opts opts;
} fwd_job;

static qkv_status run_fwd(void *arg)
{
    fwd_job *j = arg;
    return qkv_attention_forward(j->ctx, &j->q, &j->k, &j->v, &j->opts, &j->o, NULL);
}

/* Causal attention, B=1 S=1024 H=8 D=64 in fp32 and bf16, against the
   reference. */
static int tour_attention(qkv_ctx *ctx)
{
    enum { S = 1024, H = 8, D = 64 };
    const size_t n = (size_t)S * H * D;
    float *q = malloc(n * 4), *k = malloc(n * 4), *v = malloc(n * 4), *o = malloc(n * 4);
    float *ref = malloc(n * 4), *of = malloc(n * 4);
    uint16_t *qb = malloc(n * 2), *kb = malloc(n * 2), *vb = malloc(n * 2), *ob = malloc(n * 2);
    if (!q || !k || !v || !o || !ref || !of || !qb || !kb || !vb || !ob)
        return 1;
    fill(q, n, 1); fill(k, n, 2); fill(v, n, 3);
    printf("1. attention, causal, batch 1, %d positions, %d heads of %d (random inputs)\n", S, H, D);
    fwd_job j = { ctx, qkv_tensor_4d(q, QKV_F32, 1, S, H, D), qkv_tensor_4d(k, QKV_F32, 1, S, H, D),
                  qkv_tensor_4d(v, QKV_F32, 1, S, H, D), qkv_tensor_4d(o, QKV_F32, 1, S, H, D),
                  qkv_attn_opts_default() };
    j.opts.causal = 1;
    qkv_tensor r = qkv_tensor_4d(ref, QKV_F32, 1, S, H, D);
    int bad = qkv_attention_reference(ctx, &j.q, &j.k, &j.v, &j.opts, &r, NULL) != QKV_OK;
    const double flops = 4.0 * H * D * (double)S * (S + 1) / 2;
    for (int pass = 0; !bad && pass < 2; pass++) {
        if (pass == 1) {   /* the same problem in bf16 */
            qkv_convert(q, QKV_F32, qb, QKV_BF16, n);
            qkv_convert(k, QKV_F32, kb, QKV_BF16, n);
            qkv_convert(v, QKV_F32, vb, QKV_BF16, n);
            j.q = qkv_tensor_4d(qb, QKV_BF16, 1, S, H, D);
            j.k = qkv_tensor_4d(kb, QKV_BF16, 1, S, H, D);
            j.v = qkv_tensor_4d(vb, QKV_BF16, 1, S, H, D);
            j.o = qkv_tensor_4d(ob, QKV_BF16, 1, S, H, D);
        }
        if (run_fwd(&j) != QKV_OK) {
            fprintf(stderr, "qkv demo: %s\n", qkv_ctx_last_error(ctx));
            bad = 1;
            break;
        }
        qkv_convert(j.o.data, j.o.dtype, of, QKV_F32, n);
        double err = 0.0;
        for (size_t i = 0; i < n; i++)
            err = fmax(err, fabs((double)of[i] - ref[i]));
        const double t = time_median(5, run_fwd, &j);
        printf("   %-4s max |error| vs the double reference %.1e, %.2f ms, %.1f GFLOP/s\n",
               pass ? "bf16" : "fp32", err, t * 1e3, flops / t * 1e-9);
        bad |= !(err < (pass ? 3e-2 : 1e-5));
    }
    free(q); free(k); free(v); free(o); free(ref); free(of);
    free(qb); free(kb); free(vb); free(ob);
    return bad;
}

typedef struct {
    qkv_ctx         *ctx;
    qkv_tensor       q, o;
    qkv_paged_cache  c;
    int32_t         *table, *lens;
    int64_t          max_blocks;
    qkv_attn_opts    opts;
} dec_job;

static qkv_status run_dec(void *arg)
{
    dec_job *j = arg;
    return qkv_attention_paged(j->ctx, &j->q, &j->c, j->table, j->max_blocks, j->lens, &j->opts,
                               &j->o, NULL);
}

/* 8 sequences of 1..4096 cached positions in a paged fp32 cache, one new
   query each, against the reference on the same keys. */
static int tour_decode(qkv_ctx *ctx)
{
    enum { B = 8, L = 4096, HQ = 32, HKV = 8, D = 128, BS = 16 };
    const int64_t mb = L / BS, nblk = B * mb;
    dec_job j;
    memset(&j, 0, sizeof j);
    j.ctx = ctx;
    j.c.dtype = QKV_KV_F32;
    j.c.n_blocks = nblk; j.c.block_size = BS; j.c.heads_kv = HKV;
    j.c.head_dim = j.c.head_dim_v = D;
    const size_t pool = (size_t)nblk * BS * HKV * D;
    float *k = malloc(pool * 4), *v = malloc(pool * 4), *q = malloc((size_t)B * HQ * D * 4);
    float *o = malloc((size_t)B * HQ * D * 4), *ref = malloc((size_t)B * HQ * D * 4);
    j.table = malloc((size_t)nblk * sizeof(int32_t));
    j.lens = malloc(B * sizeof(int32_t));
    float *kc = malloc((size_t)L * HKV * D * 4), *vc = malloc((size_t)L * HKV * D * 4);
    if (!k || !v || !q || !o || !ref || !j.table || !j.lens || !kc || !vc)
        return 1;
    fill(k, pool, 4); fill(v, pool, 5); fill(q, (size_t)B * HQ * D, 6);
    for (int64_t i = 0; i < nblk; i++)   /* blocks scattered over the pool */
        j.table[i] = (int32_t)((i * 7919) % nblk);
    for (int b = 0; b < B; b++)
        j.lens[b] = L - b * 450;
    j.c.k = k; j.c.v = v;
    j.max_blocks = mb;
    j.q = qkv_tensor_4d(q, QKV_F32, B, 1, HQ, D);
    j.o = qkv_tensor_4d(o, QKV_F32, B, 1, HQ, D);
    j.opts = qkv_attn_opts_default();
    printf("2. decoding from a paged KV cache: %d sequences of %d..%d positions, %d query "
           "heads sharing %d kv heads of %d, blocks of %d\n", B, L - (B - 1) * 450, L, HQ, HKV,
           D, BS);
    int bad = run_dec(&j) != QKV_OK;
    double err = 0.0, bytes = 0.0;
    for (int b = 0; !bad && b < B; b++) {   /* each sequence's keys gathered, then the reference */
        for (int p = 0; p < j.lens[b]; p++) {
            const size_t at = ((size_t)j.table[b * mb + p / BS] * BS + p % BS) * HKV * D;
            memcpy(kc + (size_t)p * HKV * D, k + at, HKV * D * 4);
            memcpy(vc + (size_t)p * HKV * D, v + at, HKV * D * 4);
        }
        qkv_tensor tq = qkv_tensor_4d(q + (size_t)b * HQ * D, QKV_F32, 1, 1, HQ, D);
        qkv_tensor tk = qkv_tensor_4d(kc, QKV_F32, 1, j.lens[b], HKV, D);
        qkv_tensor tv = qkv_tensor_4d(vc, QKV_F32, 1, j.lens[b], HKV, D);
        qkv_tensor tr = qkv_tensor_4d(ref + (size_t)b * HQ * D, QKV_F32, 1, 1, HQ, D);
        bad |= qkv_attention_reference(ctx, &tq, &tk, &tv, &j.opts, &tr, NULL) != QKV_OK;
        bytes += 2.0 * j.lens[b] * HKV * D * 4;
    }
    for (int i = 0; !bad && i < B * HQ * D; i++)
        err = fmax(err, fabs((double)o[i] - ref[i]));
    if (!bad) {
        const double t = time_median(7, run_dec, &j);
        printf("   max |error| vs the double reference %.1e, %.3f ms, %.1f GB/s of cache read\n",
               err, t * 1e3, bytes / t * 1e-9);
    }
    bad |= !(err < 1e-5);
    free(k); free(v); free(q); free(o); free(ref); free(j.table); free(j.lens); free(kc);
    free(vc);
    return bad;
}

/* stories260K.bin in $QKV_MODELS, ../shared/models, or beside the repository
   this binary was built in. */
static int find_stories(char *buf, size_t cap)
{
    const char *env = getenv("QKV_MODELS");
    char exe[4096] = "";
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = '\0';
    char *slash = strrchr(exe, '/');
    if (slash)
        *slash = '\0';
    const char *roots[4] = { env && *env ? env : NULL, "../shared/models", NULL, NULL };
    char r2[4200], r3[4200];
    if (exe[0]) {
        snprintf(r2, sizeof r2, "%s/../../shared/models", exe);   /* build/ in the repository */
        snprintf(r3, sizeof r3, "%s/../shared/models", exe);
        roots[2] = r2;
        roots[3] = r3;
    }
    for (int i = 0; i < 4; i++) {
        struct stat sb;
        if (!roots[i])
            continue;
        snprintf(buf, cap, "%s/stories260K/stories260K.bin", roots[i]);
        if (stat(buf, &sb) == 0)
            return 1;
    }
    return 0;
}

static int tour_story(qkv_ctx *ctx)
{
    char path[4300];
    if (!find_stories(path, sizeof path)) {
        printf("3. a story: stories260K not found (set QKV_MODELS to the folder holding "
               "stories260K/); skipped\n");
        return 0;
    }
    qkv_model *m = NULL;
    if (qkv_model_load(ctx, path, &m) != QKV_OK) {
        fprintf(stderr, "qkv demo: %s\n", qkv_ctx_last_error(ctx));
        return 1;
    }
    printf("3. a story from stories260K (Llama architecture, 260K parameters, %s;\n"
           "   temperature 0.8, top-p 0.9, seed 42, 200 positions):\n\n", path);
    fflush(stdout);
    qkv_generate_opts o = qkv_generate_defaults();
    o.steps = 200;
    o.stream = 1;
    o.sampler.temperature = 0.8f;
    o.sampler.top_p = 0.9f;
    o.sampler.seed = 42;
    const char *prompt = "Once upon a time";
    qkv_generate_result r;
    r.texts_out = NULL;
    const int rc = qkv_generate_run(ctx, m, &prompt, 1, &o, &r);
    fflush(stdout);
    if (rc == 0) {
        printf("\n");
        fflush(stdout);
        qkv_generate_report(&r, 1, 0);
    }
    qkv_model_free(m);
    return rc;
}

int qkv_cmd_demo(int argc, char **argv)
{
    int threads = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: qkv demo [--threads N]\n");
            return 2;
        }
    }
    qkv_ctx *ctx = qkv_ctx_create(threads);
    if (!ctx) {
        fprintf(stderr, "qkv demo: cannot create a context\n");
        return 1;
    }
    printf("qkv %s: exact attention in C; kernels %s, %d threads\n\n", qkv_version(),
           qkv_ctx_isa(ctx), qkv_ctx_threads(ctx));
    int bad = tour_attention(ctx);
    printf("\n");
    bad |= tour_decode(ctx);
    printf("\n");
    bad |= tour_story(ctx);
    qkv_ctx_free(ctx);
    return bad ? 1 : 0;
}
