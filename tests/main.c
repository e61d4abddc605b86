/*
 * main.c — the test runner and the helpers declared in test.h.
 *
 *   qkv_tests [substring]     runs every test whose name contains substring
 *   QKV_TEST_QUICK=1          smaller random sweeps (for sanitizer builds)
 *
 * Counts CHECKs; the last line is always "N passed, N failed" and the exit
 * status is 0 only when nothing failed.
 */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime */
#include "test.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>

/* test_bf16.c (declared here, next to their registration) */
void test_pool_claims(void);
void test_nan_rows(void);
void test_bf16_rounding(void);
void test_bf16_shapes(void);
void test_bf16_options(void);
void test_bf16_empty_rows(void);
void test_bf16_large_values(void);
void test_bf16_threads(void);
/* test_decode.c */
void test_decode_reference(void);
void test_decode_paged_bitwise(void);
void test_decode_int8(void);
void test_decode_threads(void);
void test_decode_errors(void);

/* test_llama.c */
void test_llama_tokenizer(void);
void test_llama_tokenizer_bad(void);
void test_llama_checkpoint_bad(void);
void test_llama_logits(void);
void test_llama_golden(void);
void test_llama_batched(void);
void test_llama_sampler(void);
void test_llama_convert(void);
void test_llama_bad_input(void);

/* test_dbias.c */
void test_dbias_fd(void);
void test_dbias_fast(void);
void test_dbias_threads(void);
void test_dbias_errors(void);
/* test_models.c */
void test_safetensors_read(void);
void test_safetensors_mangled(void);
void test_nn_layers(void);
void test_tokenizer_wordpiece(void);
void test_model_minilm(void);
void test_model_vit_mnist(void);
void test_model_sasrec(void);
void test_model_bad_files(void);
void test_model_bad_bert(void);

static const struct { const char *name; void (*fn)(void); } tests[] = {
    { "convert_f16_exhaustive",  test_convert_f16_exhaustive },
    { "convert_bf16_exhaustive", test_convert_bf16_exhaustive },
    { "convert_rounding",        test_convert_rounding },
    { "convert_special",         test_convert_special },
    { "convert_pairs",           test_convert_pairs },
    { "convert_errors",          test_convert_errors },
    { "pool_claims",             test_pool_claims },
    { "nan_rows",                test_nan_rows },
    { "convert_store_kernels",   test_convert_store_kernels },
    { "convert_i8_bf16_kernels", test_convert_i8_bf16_kernels },
    { "convert_pack_pairs_kernels", test_convert_pack_pairs_kernels },
    { "errors_api",              test_errors_api },
    { "errors_pointers",         test_errors_pointers },
    { "errors_dtypes",           test_errors_dtypes },
    { "errors_shapes",           test_errors_shapes },
    { "errors_strides",          test_errors_strides },
    { "errors_options",          test_errors_options },
    { "errors_varlen",           test_errors_varlen },
    { "errors_bias",             test_errors_bias },
    { "reference_closed_form",   test_reference_closed_form },
    { "reference_options",       test_reference_options },
    { "reference_random",        test_reference_random },
    { "forward_closed_form",     test_forward_closed_form },
    { "forward_shapes",          test_forward_shapes },
    { "forward_options",         test_forward_options },
    { "forward_strides",         test_forward_strides },
    { "forward_empty_rows",      test_forward_empty_rows },
    { "forward_long",            test_forward_long },
    { "forward_random",          test_forward_random },
    { "forward_threads",         test_forward_threads },
    { "backward_shapes",         test_backward_shapes },
    { "backward_options",        test_backward_options },
    { "backward_threads",        test_backward_threads },
    { "dropout_mask",            test_dropout_mask },
    { "dropout_threads",         test_dropout_threads },
    { "dropout_errors",          test_dropout_errors },
    { "dropout_last_rows",       test_dropout_last_rows },
    { "million_window",          test_million_window },
    { "million_keys",            test_million_keys },
    { "forward_nonfinite",       test_forward_nonfinite },
    { "bf16_rounding",           test_bf16_rounding },
    { "bf16_shapes",             test_bf16_shapes },
    { "bf16_options",            test_bf16_options },
    { "bf16_empty_rows",         test_bf16_empty_rows },
    { "bf16_large_values",       test_bf16_large_values },
    { "bf16_threads",            test_bf16_threads },
    { "masks_padding_varlen",    test_masks_padding_equals_varlen },
    { "masks_row_bias_scale",    test_masks_row_bias_and_negative_scale },
    { "masks_varlen_separate",   test_masks_varlen_equals_separate },
    { "api_peak",                test_api_peak },
    { "api_alloc",               test_api_alloc },
    { "fuzz_arguments",          test_fuzz_arguments },
    { "backward_ref_errors",     test_backward_ref_errors },
    { "backward_ref_closed_form", test_backward_ref_closed_form },
    { "backward_ref_empty_rows", test_backward_ref_empty_rows },
    { "backward_ref_fd",         test_backward_ref_fd },
    { "backward_ref_random",     test_backward_ref_random },
    { "backward_ref_threads",    test_backward_ref_threads },
    { "backward_ref_dtypes",     test_backward_ref_dtypes },
    { "dbias_fd",                test_dbias_fd },
    { "dbias_fast",              test_dbias_fast },
    { "dbias_threads",           test_dbias_threads },
    { "dbias_errors",            test_dbias_errors },
    { "train_copy",              test_train_copy },
    { "safetensors_read",        test_safetensors_read },
    { "safetensors_mangled",     test_safetensors_mangled },
    { "nn_layers",               test_nn_layers },
    { "tokenizer_wordpiece",     test_tokenizer_wordpiece },
    { "model_minilm",            test_model_minilm },
    { "model_vit_mnist",         test_model_vit_mnist },
    { "model_sasrec",            test_model_sasrec },
    { "model_bad_files",         test_model_bad_files },
    { "model_bad_bert",          test_model_bad_bert },
    { "llama_tokenizer",         test_llama_tokenizer },
    { "llama_tokenizer_bad",     test_llama_tokenizer_bad },
    { "llama_checkpoint_bad",    test_llama_checkpoint_bad },
    { "llama_logits",            test_llama_logits },
    { "llama_golden",            test_llama_golden },
    { "llama_batched",           test_llama_batched },
    { "llama_sampler",           test_llama_sampler },
    { "llama_convert",           test_llama_convert },
    { "llama_bad_input",         test_llama_bad_input },
    { "decode_errors",           test_decode_errors },
    { "decode_reference",        test_decode_reference },
    { "decode_paged_bitwise",    test_decode_paged_bitwise },
    { "decode_int8",             test_decode_int8 },
    { "decode_threads",          test_decode_threads },
    { "decode_i8_kernel_bits", test_decode_i8_kernel_bits },
    { "decode_pv_kernel_bits", test_decode_pv_kernel_bits },
};

int t_quick;
static long n_pass, n_fail, n_printed;

void t_check(int ok, const char *file, int line, const char *fmt, ...)
{
    if (ok) {
        n_pass++;
        return;
    }
    n_fail++;
    /* a broken kernel fails thousands of checks: print the first 200 */
    if (++n_printed > 200) {
        if (n_printed == 201)
            printf("  (further failures are counted, not printed)\n");
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    printf("  %s:%d: FAIL: ", file, line);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
}

void t_note(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("  ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

/* ---- helpers ------------------------------------------------------------ */

rng rng_seed(uint64_t seed)
{
    rng r = { seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull };
    return r;
}

uint64_t rng_u64(rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double rng_unif(rng *r)
{
    return (double)(rng_u64(r) >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

int64_t rng_int(rng *r, int64_t lo, int64_t hi)
{
    return lo + (int64_t)(rng_u64(r) % (uint64_t)(hi - lo + 1));
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

int t_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

char *t_read_file(const char *path, size_t *len)
{
    if (len)
        *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = xmalloc((size_t)(n > 0 ? n : 0) + 1);
    size_t got = fread(b, 1, (size_t)(n > 0 ? n : 0), f);
    fclose(f);
    b[got] = '\0';
    if (len)
        *len = got;
    return b;
}

void t_write_file(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f || (len && fwrite(buf, 1, len, f) != len)) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
    fclose(f);
}

double now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

const char *dtype_name(qkv_dtype dt)
{
    return dt == QKV_F32 ? "f32" : dt == QKV_F16 ? "f16" : dt == QKV_BF16 ? "bf16" : "?";
}

void fill_random(void *buf, qkv_dtype dt, size_t n, rng *r)
{
    float *f = dt == QKV_F32 ? (float *)buf : xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        f[i] = (float)rng_unif(r);
    if (dt != QKV_F32) {
        if (qkv_convert(f, QKV_F32, buf, dt, n) != QKV_OK) {
            fprintf(stderr, "fill_random: qkv_convert failed\n");
            exit(2);
        }
        free(f);
    }
}

float *to_f32(const void *src, qkv_dtype dt, size_t n)
{
    float *f = xmalloc(n * sizeof(float));
    if (qkv_convert(src, dt, f, QKV_F32, n) != QKV_OK) {
        fprintf(stderr, "to_f32: qkv_convert failed\n");
        exit(2);
    }
    return f;
}

double compare(const char *name, const void *got, qkv_dtype got_dt,
               const float *ref, size_t n, double atol, double rtol)
{
    float *g = to_f32(got, got_dt, n);
    double max_err = 0, worst_ratio = 0;
    size_t worst = 0, bad = 0;
    for (size_t i = 0; i < n; i++) {
        double a = g[i], b = ref[i], err, ratio;
        if (!isfinite(b)) {   /* inf / NaN must be reproduced exactly */
            int same = isnan(b) ? isnan(a) : a == b;
            err = same ? 0 : INFINITY;
            ratio = same ? 0 : INFINITY;
        } else {
            err = isfinite(a) ? fabs(a - b) : INFINITY;
            ratio = err / (atol + rtol * fabs(b));
            if (err > max_err)
                max_err = err;
        }
        if (!(ratio <= 1.0)) {
            bad++;
            if (!(ratio <= worst_ratio)) {   /* NaN-proof max */
                worst_ratio = ratio;
                worst = i;
            }
        }
        if (isinf(err) && !(err <= max_err))
            max_err = INFINITY;
    }
    double gw = n ? g[worst] : 0, rw = n ? ref[worst] : 0;
    CHECK(bad == 0, "%s: %zu of %zu elements out of tolerance (atol %g, rtol %g); "
          "worst [%zu]: got %.9g, ref %.9g, |err| %.3g",
          name, bad, n, atol, rtol, worst, gw, rw, fabs(gw - rw));
    free(g);
    return max_err;
}

/* ---- strided test buffers ------------------------------------------------ */

const char *const lay_name[LAY_COUNT] = {
    "contig", "bhsd", "padded", "neg-seq", "inner2", "rev-d", "bcast"
};

void layout_strides(int layout, const int64_t s[4], int64_t st[4])
{
    switch (layout) {
    case LAY_BHSD:   /* memory [d0][d2][d1][d3] */
        st[3] = 1; st[1] = s[3]; st[2] = s[1] * s[3]; st[0] = s[2] * s[1] * s[3];
        break;
    case LAY_PAD:
        st[3] = 1; st[2] = s[3] + 3; st[1] = s[2] * st[2] + 5; st[0] = s[1] * st[1] + 7;
        break;
    case LAY_NEG:
        st[3] = 1; st[2] = s[3]; st[1] = -s[2] * s[3]; st[0] = s[1] * s[2] * s[3];
        break;
    case LAY_INNER2:
        st[3] = 2; st[2] = 2 * s[3]; st[1] = s[2] * st[2]; st[0] = s[1] * st[1];
        break;
    case LAY_REVD:
        st[3] = -1; st[2] = s[3]; st[1] = s[2] * s[3]; st[0] = s[1] * st[1];
        break;
    case LAY_BCAST:
        st[3] = 1; st[2] = 0; st[1] = s[3]; st[0] = 0;
        break;
    default:
        st[3] = 1; st[2] = s[3]; st[1] = s[2] * s[3]; st[0] = s[1] * st[1];
        break;
    }
}

enum { MARGIN = 16 };   /* elements on each side of the view's extent */

void tbuf_make(tbuf *tb, qkv_dtype dt, const int64_t shape[4], const int64_t stride[4])
{
    size_t es = qkv_dtype_size(dt);
    int64_t lo = 0, hi = 0;
    for (int d = 0; d < 4; d++) {
        int64_t span = (shape[d] - 1) * stride[d];
        if (span < 0) lo += span; else hi += span;
    }
    size_t elems = (size_t)(hi - lo + 1 + 2 * MARGIN);
    tb->bytes = elems * es;
    tb->buf = xmalloc(tb->bytes);
    memset(tb->buf, 0, tb->bytes);
    tb->t.data = tb->buf + (size_t)(MARGIN - lo) * es;
    tb->t.dtype = dt;
    memcpy(tb->t.shape, shape, sizeof tb->t.shape);
    memcpy(tb->t.stride, stride, sizeof tb->t.stride);
}

void tbuf_make_layout(tbuf *tb, qkv_dtype dt, const int64_t shape[4], int layout)
{
    int64_t st[4];
    layout_strides(layout, shape, st);
    tbuf_make(tb, dt, shape, st);
}

void tbuf_fill_random(tbuf *tb, rng *r)
{
    fill_random(tb->buf, tb->t.dtype, tb->bytes / qkv_dtype_size(tb->t.dtype), r);
}

void tbuf_fill_byte(tbuf *tb, unsigned char byte)
{
    memset(tb->buf, byte, tb->bytes);
}

void tbuf_free(tbuf *tb)
{
    free(tb->buf);
    tb->buf = NULL;
}

void view_gather(const qkv_tensor *t, void *dst)
{
    size_t es = qkv_dtype_size(t->dtype);
    const int64_t *s = t->shape, *st = t->stride;
    unsigned char *o = dst;
    for (int64_t a = 0; a < s[0]; a++)
        for (int64_t b = 0; b < s[1]; b++)
            for (int64_t c = 0; c < s[2]; c++)
                for (int64_t d = 0; d < s[3]; d++) {
                    int64_t off = a * st[0] + b * st[1] + c * st[2] + d * st[3];
                    memcpy(o, (const unsigned char *)t->data + off * (int64_t)es, es);
                    o += es;
                }
}

size_t tbuf_outside_changed(const tbuf *tb, unsigned char byte)
{
    size_t es = qkv_dtype_size(tb->t.dtype), changed = 0;
    unsigned char *in = calloc(tb->bytes, 1);
    if (!in) exit(2);
    const int64_t *s = tb->t.shape, *st = tb->t.stride;
    int64_t base = (const unsigned char *)tb->t.data - tb->buf;
    for (int64_t a = 0; a < s[0]; a++)
        for (int64_t b = 0; b < s[1]; b++)
            for (int64_t c = 0; c < s[2]; c++)
                for (int64_t d = 0; d < s[3]; d++) {
                    int64_t off = a * st[0] + b * st[1] + c * st[2] + d * st[3];
                    memset(in + base + off * (int64_t)es, 1, es);
                }
    for (size_t i = 0; i < tb->bytes; i++)
        changed += !in[i] && tb->buf[i] != byte;
    free(in);
    return changed;
}

/* ---- runner ------------------------------------------------------------- */

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--print-isa") == 0) {   /* for errors_api */
        qkv_ctx *ctx = qkv_ctx_create(1);
        printf("%s\n", ctx ? qkv_ctx_isa(ctx) : "(no ctx)");
        qkv_ctx_free(ctx);
        return 0;
    }
    const char *filter = argc > 1 ? argv[1] : NULL;
    const char *q = getenv("QKV_TEST_QUICK");
    t_quick = q && *q && strcmp(q, "0") != 0;
    setvbuf(stdout, NULL, _IOLBF, 0);

    double t_all = now_sec();
    int ran = 0;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        if (filter && !strstr(tests[i].name, filter))
            continue;
        long f0 = n_fail, p0 = n_pass;
        double t0 = now_sec();
        printf("%-26s ...\n", tests[i].name);
        tests[i].fn();
        printf("%-26s %s  %ld checks, %.2f s\n", tests[i].name,
               n_fail > f0 ? "FAILED" : "ok", (n_pass - p0) + (n_fail - f0),
               now_sec() - t0);
        ran++;
    }
    printf("%d tests%s in %.1f s\n", ran, t_quick ? " (quick)" : "", now_sec() - t_all);
    printf("%ld passed, %ld failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
