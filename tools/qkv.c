/*
 * qkv.c — the `qkv` command: run and measure attention from the shell.
 *
 *   qkv bench [options]   time attention on a set of shapes, checked first
 *   qkv info              library version, kernel set, threads
 *   qkv embed / recommend / classify   run a pretrained model (tools/models.c)
 *   qkv generate / convert-llama        text generation (tools/generate.c)
 *   qkv demo              a short tour (tools/demo.c)
 *   qkv --help            every command and flag
 */
#include <qkv.h>
#include "models.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *usage =
"usage: qkv <command> [options]\n"
"\n"
"commands:\n"
"  bench     time qkv_attention_forward on a set of shapes and print a table\n"
"            (shape, dtype, mask, ms, GFLOP/s); every shape is first checked\n"
"            against the double-precision reference on its last query rows\n"
"  info      print the library version, the kernel set, the thread count and\n"
"            the measured fp32 FMA ceiling\n"
"  embed DIR [-t N] [--tokens] [FILE]\n"
"            sentence embeddings with the text model in DIR (all-MiniLM-L6-v2):\n"
"            one line of FILE (default stdin) in, one line of floats out;\n"
"            --tokens prints the token ids instead\n"
"  recommend DIR [-t N] [-k K] ID...\n"
"            the K (default 10) most likely next items after the history\n"
"            ID... (oldest first) with the SASRec model in DIR\n"
"  classify DIR IMAGES [LABELS] [-t N] [-q]\n"
"            classify the images of an IDX file (gzip'd or not, as MNIST's)\n"
"            with the ViT model in DIR: one class per line; with LABELS, the\n"
"            accuracy (-q: the accuracy only)\n"
"  generate -m MODEL [-z TOKENIZER] -p PROMPT [-n STEPS] [-t TEMP] [-s SEED] ...\n"
"            text from a Llama-family model (a llama2.c checkpoint or a Llama\n"
"            safetensors folder): prompt and continuation on stdout, tokens/s on\n"
"            stderr; several -p (or -b FILE) run together; `qkv generate` alone\n"
"            lists every option\n"
"  convert-llama CHECKPOINT OUTDIR [-z TOKENIZER]\n"
"            write a llama2.c checkpoint as a Hugging Face Llama folder\n"
"  demo      a short tour: attention checked and timed, decoding from a paged\n"
"            KV cache, a story from stories260K when it is found\n"
"  version   print the library version\n"
"  help      print this text (also -h, --help)\n"
"\n"
"bench options:\n"
"  -t, --threads N     threads (default: one per core)\n"
"  -d, --dtype T       f32, f16, bf16 or all (default: f32 and bf16)\n"
"  -s, --shape SPEC    one shape B,Sq,Sk,Hq,Hkv,D instead of the default set\n"
"                      (repeatable); Sk may be given as 0 to mean Sk = Sq\n"
"  -c, --causal        causal mask on the --shape entries\n"
"  -w, --window L,R    sliding window on the --shape entries\n"
"  -r, --reps N        timed repetitions per shape, median reported (default 5)\n"
"      --isa NAME      kernel set: generic, avx2, avx512, avx512bf16, amx (default: best)\n"
"      --no-check      skip the check against the reference\n"
"  -b, --backward      time qkv_attention_backward (FLOPs: 2.5x the forward's)\n"
"  -p, --dropout P     dropout with probability P (seed 1) on the --shape entries\n"
"\n"
"FLOPs are counted as 4*Hq*D per visible (query, key) pair per batch (so a\n"
"causal square shape counts about half of 4*B*Hq*Sq*Sk*D); %peak compares\n"
"with the fp32 FMA ceiling measured at the start of the run.\n"
"The environment variable QKV_ISA also selects the kernel set.\n";

typedef struct { int64_t B, Sq, Sk, Hq, Hkv, D; int causal; int64_t wl, wr; float drop; } shape;

static const shape default_shapes[] = {
    { 1,   64,   64,  8,  8,  64, 0, -1, -1, 0.0f },
    { 1,  512,  512, 12, 12,  64, 0, -1, -1, 0.0f },
    { 1, 1024, 1024, 12, 12, 128, 0, -1, -1, 0.0f },
    { 1, 1024, 1024, 12, 12, 128, 1, -1, -1, 0.0f },
    { 1, 2048, 2048, 16,  4, 128, 1, -1, -1, 0.0f },
    { 2,  512,  512,  8,  8,  64, 0, 128, 0, 0.0f },
    { 8,    1, 4096, 32,  8, 128, 0, -1, -1, 0.0f },
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void fill_random(void *buf, qkv_dtype dt, size_t n, uint64_t seed)
{
    float *tmp = malloc(n * sizeof(float));
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        tmp[i] = (float)((x >> 40) * (1.0 / (1 << 24))) * 2.0f - 1.0f;
    }
    qkv_convert(tmp, QKV_F32, buf, dt, n);
    free(tmp);
}

static const char *dtype_name(qkv_dtype dt)
{
    return dt == QKV_F32 ? "f32" : dt == QKV_F16 ? "f16" : "bf16";
}

/* Checks the last rows of out against the reference on the same rows: with
   bottom-right aligned masks, the last r queries alone see the same keys. */
static int check(qkv_ctx *ctx, const qkv_tensor *q, const qkv_tensor *k,
                 const qkv_tensor *v, const qkv_attn_opts *o, const qkv_tensor *out,
                 double *max_err)
{
    int64_t r = q->shape[1] < 16 ? q->shape[1] : 16;
    size_t es = qkv_dtype_size(q->dtype);
    qkv_tensor qs = *q;
    qs.shape[1] = r;
    qs.data = (char *)q->data + (size_t)((q->shape[1] - r) * q->stride[1]) * es;
    size_t n = (size_t)(q->shape[0] * r * q->shape[2] * v->shape[3]);
    void *ref = malloc(n * es);
    float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
    qkv_tensor rt = qkv_tensor_4d(ref, q->dtype, q->shape[0], r, q->shape[2], v->shape[3]);
    int ok = qkv_attention_reference(ctx, &qs, k, v, o, &rt, NULL) == QKV_OK;
    qkv_convert(ref, q->dtype, b, QKV_F32, n);
    /* gather the same rows of out */
    size_t idx = 0;
    for (int64_t bi = 0; bi < q->shape[0]; bi++)
        for (int64_t i = q->shape[1] - r; i < q->shape[1]; i++)
            for (int64_t h = 0; h < q->shape[2]; h++) {
                const char *row = (const char *)out->data +
                    (size_t)(bi * out->stride[0] + i * out->stride[1] + h * out->stride[2]) * es;
                qkv_convert(row, q->dtype, a + idx, QKV_F32, (size_t)v->shape[3]);
                idx += (size_t)v->shape[3];
            }
    double tol = q->dtype == QKV_F32 ? 1e-5 : q->dtype == QKV_F16 ? 2e-3 : 2e-2;
    *max_err = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        if (e > *max_err) *max_err = e;
        if (!(e <= tol + tol * fabs(b[i]))) ok = 0;
    }
    free(ref); free(a); free(b);
    return ok;
}

static int bench(int argc, char **argv)
{
    int threads = 0, reps = 5, do_check = 1, causal = 0, backward = 0;
    int64_t wl = -1, wr = -1;
    float dropout = 0.0f;
    const char *isa = NULL;
    qkv_dtype dtypes[3] = { QKV_F32, QKV_BF16 };
    int n_dtypes = 2;
    shape shapes[64];
    int n_shapes = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        int takes = 1;
        if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            if (val) threads = atoi(val);
        } else if (!strcmp(a, "-r") || !strcmp(a, "--reps")) {
            if (val) reps = atoi(val);
        } else if (!strcmp(a, "-d") || !strcmp(a, "--dtype")) {
            if (!val) takes = 1;
            else if (!strcmp(val, "f32")) { dtypes[0] = QKV_F32; n_dtypes = 1; }
            else if (!strcmp(val, "f16")) { dtypes[0] = QKV_F16; n_dtypes = 1; }
            else if (!strcmp(val, "bf16")) { dtypes[0] = QKV_BF16; n_dtypes = 1; }
            else if (!strcmp(val, "all")) {
                dtypes[0] = QKV_F32; dtypes[1] = QKV_F16; dtypes[2] = QKV_BF16; n_dtypes = 3;
            } else { fprintf(stderr, "qkv bench: unknown dtype '%s'\n", val); return 2; }
        } else if (!strcmp(a, "-s") || !strcmp(a, "--shape")) {
            shape s = { 0, 0, 0, 0, 0, 0, 0, -1, -1, 0.0f };
            long long v[6];
            if (!val || sscanf(val, "%lld,%lld,%lld,%lld,%lld,%lld", &v[0], &v[1], &v[2],
                               &v[3], &v[4], &v[5]) != 6 || n_shapes == 64) {
                fprintf(stderr, "qkv bench: --shape wants B,Sq,Sk,Hq,Hkv,D\n");
                return 2;
            }
            s.B = v[0]; s.Sq = v[1]; s.Sk = v[2] ? v[2] : v[1]; s.Hq = v[3]; s.Hkv = v[4]; s.D = v[5];
            shapes[n_shapes++] = s;
        } else if (!strcmp(a, "-w") || !strcmp(a, "--window")) {
            long long l, r;
            if (!val || sscanf(val, "%lld,%lld", &l, &r) != 2) {
                fprintf(stderr, "qkv bench: --window wants L,R\n");
                return 2;
            }
            wl = l; wr = r;
        } else if (!strcmp(a, "--isa")) {
            isa = val;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--dropout")) {
            if (val) dropout = (float)atof(val);
        } else {
            takes = 0;
            if (!strcmp(a, "-c") || !strcmp(a, "--causal")) causal = 1;
            else if (!strcmp(a, "--no-check")) do_check = 0;
            else if (!strcmp(a, "-b") || !strcmp(a, "--backward")) backward = 1;
            else { fprintf(stderr, "qkv bench: unknown option '%s' (see qkv --help)\n", a); return 2; }
        }
        if (takes) {
            if (!val) { fprintf(stderr, "qkv bench: %s needs a value\n", a); return 2; }
            i++;
        }
    }
    if (reps < 1) reps = 1;
    if (n_shapes == 0) {
        n_shapes = (int)(sizeof default_shapes / sizeof default_shapes[0]);
        memcpy(shapes, default_shapes, sizeof default_shapes);
    } else {
        for (int i = 0; i < n_shapes; i++) {
            shapes[i].causal = causal; shapes[i].wl = wl; shapes[i].wr = wr;
            shapes[i].drop = dropout;
        }
    }
    qkv_ctx *ctx = qkv_ctx_create(threads);
    if (!ctx) { fprintf(stderr, "qkv bench: cannot create a context\n"); return 1; }
    if (isa && qkv_ctx_set_isa(ctx, isa) != QKV_OK) {
        fprintf(stderr, "qkv bench: %s\n", qkv_ctx_last_error(ctx));
        qkv_ctx_free(ctx);
        return 2;
    }
    double peak = qkv_peak_gflops(ctx);
    printf("qkv %s, kernels %s, %d threads, median of %d; fp32 FMA ceiling %.0f GFLOP/s\n",
           qkv_version(), qkv_ctx_isa(ctx), qkv_ctx_threads(ctx), reps, peak);
    printf("%-24s %-5s %-18s %10s %9s %6s %9s\n", "B,Sq,Sk,Hq,Hkv,D", "dtype", "mask", "ms",
           "GFLOP/s", "%peak", "max err");
    int failed = 0;
    for (int si = 0; si < n_shapes; si++)
        for (int di = 0; di < n_dtypes; di++) {
            const shape *s = &shapes[si];
            qkv_dtype dt = dtypes[di];
            size_t es = qkv_dtype_size(dt);
            size_t nq = (size_t)(s->B * s->Sq * s->Hq * s->D);
            size_t nk = (size_t)(s->B * s->Sk * s->Hkv * s->D);
            void *qb = malloc(nq * es), *kb = malloc(nk * es), *vb = malloc(nk * es);
            void *ob = malloc(nq * es);
            if (!qb || !kb || !vb || !ob) {
                fprintf(stderr, "qkv bench: out of memory\n");
                return 1;
            }
            fill_random(qb, dt, nq, 1); fill_random(kb, dt, nk, 2); fill_random(vb, dt, nk, 3);
            qkv_tensor q = qkv_tensor_4d(qb, dt, s->B, s->Sq, s->Hq, s->D);
            qkv_tensor k = qkv_tensor_4d(kb, dt, s->B, s->Sk, s->Hkv, s->D);
            qkv_tensor v = qkv_tensor_4d(vb, dt, s->B, s->Sk, s->Hkv, s->D);
            qkv_tensor o = qkv_tensor_4d(ob, dt, s->B, s->Sq, s->Hq, s->D);
            qkv_attn_opts opts = qkv_attn_opts_default();
            opts.causal = s->causal;
            opts.window_left = s->wl;
            opts.window_right = s->wr;
            opts.dropout_p = s->drop;
            opts.dropout_seed = 1;
            char name[64], mask[48];
            snprintf(name, sizeof name, "%lld,%lld,%lld,%lld,%lld,%lld", (long long)s->B,
                     (long long)s->Sq, (long long)s->Sk, (long long)s->Hq, (long long)s->Hkv,
                     (long long)s->D);
            if (s->wl >= 0 || s->wr >= 0)
                snprintf(mask, sizeof mask, "%swin%lld,%lld", s->causal ? "c+" : "",
                         (long long)s->wl, (long long)s->wr);
            else
                snprintf(mask, sizeof mask, "%s", s->causal ? "causal" : "none");
            if (s->drop > 0.0f) {
                char d[32];
                snprintf(d, sizeof d, " drop%g", (double)s->drop);
                strncat(mask, d, sizeof mask - strlen(mask) - 1);
            }
            if (backward)
                strncat(mask, " bwd", sizeof mask - strlen(mask) - 1);
            qkv_status st = qkv_attention_forward(ctx, &q, &k, &v, &opts, &o, NULL);
            if (st != QKV_OK) {
                printf("%-24s %-5s %-18s error: %s\n", name, dtype_name(dt), mask,
                       qkv_ctx_last_error(ctx));
                failed = 1;
            } else {
                double err = 0;
                int ok = !do_check || check(ctx, &q, &k, &v, &opts, &o, &err);
                double *t = malloc((size_t)reps * sizeof(double));
                /* backward: out and lse from one forward, a random dout */
                float *lse = NULL;
                void *gb[4] = { NULL, NULL, NULL, NULL };
                qkv_tensor dout, dq, dk, dv;
                if (backward) {
                    lse = malloc((size_t)(s->B * s->Hq * s->Sq) * sizeof(float));
                    gb[0] = malloc(nq * es); gb[1] = malloc(nq * es);
                    gb[2] = malloc(nk * es); gb[3] = malloc(nk * es);
                    if (!lse || !gb[0] || !gb[1] || !gb[2] || !gb[3]) {
                        fprintf(stderr, "qkv bench: out of memory\n");
                        return 1;
                    }
                    fill_random(gb[0], dt, nq, 4);
                    dout = qkv_tensor_4d(gb[0], dt, s->B, s->Sq, s->Hq, s->D);
                    dq = qkv_tensor_4d(gb[1], dt, s->B, s->Sq, s->Hq, s->D);
                    dk = qkv_tensor_4d(gb[2], dt, s->B, s->Sk, s->Hkv, s->D);
                    dv = qkv_tensor_4d(gb[3], dt, s->B, s->Sk, s->Hkv, s->D);
                    qkv_attention_forward(ctx, &q, &k, &v, &opts, &o, lse);
                }
                for (int r = 0; r < reps; r++) {
                    double t0 = now_s();
                    if (backward)
                        qkv_attention_backward(ctx, &q, &k, &v, &o, &dout, lse, &opts, &dq, &dk,
                                               &dv);
                    else
                        qkv_attention_forward(ctx, &q, &k, &v, &opts, &o, NULL);
                    t[r] = now_s() - t0;
                }
                free(lse);
                for (int g = 0; g < 4; g++)
                    free(gb[g]);
                qsort(t, (size_t)reps, sizeof(double), cmp_double);
                double med = t[reps / 2];
                free(t);
                /* visible (query, key) pairs: exact for causal and windows */
                double pairs = 0;
                for (int64_t i = 0; i < s->Sq; i++) {
                    int64_t p = i + s->Sk - s->Sq, lo = 0, hi = s->Sk - 1;
                    if (s->wl >= 0 && p - s->wl > lo) lo = p - s->wl;
                    if (s->causal && p < hi) hi = p;
                    if (s->wr >= 0 && p + s->wr < hi) hi = p + s->wr;
                    if (hi >= lo) pairs += (double)(hi - lo + 1);
                }
                /* backward: 2.5 times the forward's, as FlashAttention counts */
                double flops = 4.0 * s->B * s->Hq * pairs * s->D * (backward ? 2.5 : 1.0);
                double gf = flops / med * 1e-9;
                printf("%-24s %-5s %-18s %10.3f %9.1f %5.0f%% %9.2e%s\n", name, dtype_name(dt),
                       mask, med * 1e3, gf, peak > 0 ? 100.0 * gf / peak : 0.0, err,
                       !do_check ? "" : ok ? "" : "  MISMATCH");
                if (!ok) failed = 1;
            }
            free(qb); free(kb); free(vb); free(ob);
        }
    qkv_ctx_free(ctx);
    return failed;
}

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "--help")) {
        fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "version") || !strcmp(argv[1], "--version")) {
        printf("qkv %s\n", qkv_version());
        return 0;
    }
    if (!strcmp(argv[1], "info")) {
        qkv_ctx *ctx = qkv_ctx_create(0);
        if (!ctx) return 1;
        printf("qkv %s\nkernels: %s (supported:", qkv_version(), qkv_ctx_isa(ctx));
        for (int i = 0; qkv_isa_name(i); i++)
            if (qkv_isa_supported(qkv_isa_name(i)))
                printf(" %s", qkv_isa_name(i));
        printf(")\nthreads: %d\nfp32 FMA ceiling: %.0f GFLOP/s\n", qkv_ctx_threads(ctx),
               qkv_peak_gflops(ctx));
        qkv_ctx_free(ctx);
        return 0;
    }
    if (!strcmp(argv[1], "bench"))
        return bench(argc - 2, argv + 2);
    if (!strcmp(argv[1], "embed"))
        return qkv_cmd_embed(argc - 2, argv + 2);
    if (!strcmp(argv[1], "recommend"))
        return qkv_cmd_recommend(argc - 2, argv + 2);
    if (!strcmp(argv[1], "classify"))
        return qkv_cmd_classify(argc - 2, argv + 2);
    if (!strcmp(argv[1], "generate"))
        return qkv_cmd_generate(argc - 2, argv + 2);
    if (!strcmp(argv[1], "convert-llama"))
        return qkv_cmd_convert_llama(argc - 2, argv + 2);
    if (!strcmp(argv[1], "demo"))
        return qkv_cmd_demo(argc - 2, argv + 2);
    fprintf(stderr, "qkv: unknown command '%s'\n\n%s", argv[1], usage);
    return 2;
}
