/*
 * test_errors.c — every bad argument is refused with its status, before
 * anything is written, with a message naming the argument by its C path
 * ("k->shape[2]", "opts->bias->dtype", ...). Each case runs through both
 * qkv_attention_forward and qkv_attention_reference (same contract), with
 * out and lse pre-filled with a sentinel that must survive byte for byte.
 * Also the small API: version, status strings, contexts, ISA selection,
 * defaults.
 */
#define _POSIX_C_SOURCE 200809L   /* popen, readlink, setenv, strtok_r */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* baseline: valid, small; buffers are larger than any mutated shape needs */
enum { B = 2, SQ = 5, SK = 7, HQ = 4, HKV = 2, D = 8, DV = 6, CAP = 4096 };

typedef struct {
    qkv_ctx      *ctx;
    qkv_tensor    q, k, v, out, bias;
    qkv_attn_opts opts;
    /* what is passed: point elsewhere (or NULL) to test pointers */
    qkv_tensor   *pq, *pk, *pv, *pout;
    qkv_attn_opts *popts;
    float        *lse;
    int32_t       cu_q[4], cu_k[4];
    float         qb[CAP], kb[CAP], vb[CAP], bb[CAP];
    unsigned char ob[CAP * 4], lb[CAP * 4];
} errset;

static void setup(errset *e, qkv_ctx *ctx)
{
    memset(e, 0, sizeof *e);
    e->ctx = ctx;
    rng r = rng_seed(8);
    fill_random(e->qb, QKV_F32, CAP, &r);
    fill_random(e->kb, QKV_F32, CAP, &r);
    fill_random(e->vb, QKV_F32, CAP, &r);
    e->q = qkv_tensor_4d(e->qb, QKV_F32, B, SQ, HQ, D);
    e->k = qkv_tensor_4d(e->kb, QKV_F32, B, SK, HKV, D);
    e->v = qkv_tensor_4d(e->vb, QKV_F32, B, SK, HKV, DV);
    e->out = qkv_tensor_4d(e->ob, QKV_F32, B, SQ, HQ, DV);
    e->bias = qkv_tensor_4d(e->bb, QKV_F32, B, HQ, SQ, SK);
    e->opts = qkv_attn_opts_default();
    e->pq = &e->q; e->pk = &e->k; e->pv = &e->v; e->pout = &e->out;
    e->popts = &e->opts;
    e->lse = (float *)e->lb;
}

/* varlen baseline: 3 sequences (one empty) packed in batch 1 */
static void setup_varlen(errset *e, qkv_ctx *ctx)
{
    setup(e, ctx);
    const int32_t q[4] = { 0, 3, 3, 10 }, k[4] = { 0, 5, 7, 12 };
    memcpy(e->cu_q, q, sizeof q);
    memcpy(e->cu_k, k, sizeof k);
    e->q = qkv_tensor_4d(e->qb, QKV_F32, 1, 10, HQ, D);
    e->k = qkv_tensor_4d(e->kb, QKV_F32, 1, 12, HKV, D);
    e->v = qkv_tensor_4d(e->vb, QKV_F32, 1, 12, HKV, DV);
    e->out = qkv_tensor_4d(e->ob, QKV_F32, 1, 10, HQ, DV);
    e->opts.cu_seqlens_q = e->cu_q;
    e->opts.cu_seqlens_k = e->cu_k;
    e->opts.n_seqs = 3;
}


typedef qkv_status (*attn_fn)(qkv_ctx *, const qkv_tensor *, const qkv_tensor *,
                              const qkv_tensor *, const qkv_attn_opts *, qkv_tensor *, float *);

static qkv_status call(errset *e, attn_fn fn)
{
    return fn(e->ctx, e->pq, e->pk, e->pv, e->popts, e->pout, e->lse);
}

enum { NONE = 1 };   /* "no alternative status" */

/* The call must fail with `want` (or `alt`, where qkv.h leaves the choice
   open), write nothing, and name the argument. */
static void expect(errset *e, const char *label, qkv_status want, qkv_status alt, const char *names)
{
    static const struct { const char *name; attn_fn fn; } fns[2] = {
        { "forward", qkv_attention_forward }, { "reference", qkv_attention_reference } };
    for (int f = 0; f < 2; f++) {
        memset(e->ob, 0xA7, sizeof e->ob);
        memset(e->lb, 0xB9, sizeof e->lb);
        qkv_status st = call(e, fns[f].fn);
        CHECK(st == want || (alt != NONE && st == alt),
              "%s %s: status %d (%s), want %d (%s)%s", fns[f].name, label, st,
              qkv_status_string(st), want, qkv_status_string(want), alt != NONE ? " or the alternative" : "");
        int out_ok = 1, lse_ok = 1;
        for (size_t i = 0; i < sizeof e->ob; i++) out_ok &= e->ob[i] == 0xA7;
        for (size_t i = 0; i < sizeof e->lb; i++) lse_ok &= e->lb[i] == 0xB9;
        CHECK(out_ok, "%s %s: out was written by a failing call", fns[f].name, label);
        CHECK(lse_ok, "%s %s: lse was written by a failing call", fns[f].name, label);
        if (e->ctx && names) {
            const char *msg = qkv_ctx_last_error(e->ctx);
            CHECK(msg && msg_names(msg, names), "%s %s: message \"%s\" does not name %s",
                  fns[f].name, label, msg ? msg : "(null)", names);
        }
    }
}

static void expect_ok(errset *e, const char *label)
{
    qkv_status st = call(e, qkv_attention_forward);
    CHECK(st == QKV_OK, "forward %s: status %d (%s): %s", label, st, qkv_status_string(st),
          qkv_ctx_last_error(e->ctx));
    st = call(e, qkv_attention_reference);
    CHECK(st == QKV_OK, "reference %s: status %d (%s): %s", label, st, qkv_status_string(st),
          qkv_ctx_last_error(e->ctx));
}

static qkv_ctx *new_ctx(void)
{
    qkv_ctx *ctx = qkv_ctx_create(2);
    CHECK(ctx != NULL, "qkv_ctx_create(2)");
    return ctx;
}

/* ---- small API -------------------------------------------------------------- */

void test_errors_api(void)
{
    CHECK(strcmp(qkv_version(), QKV_VERSION_STRING) == 0, "qkv_version() = %s, header %s",
          qkv_version(), QKV_VERSION_STRING);

    static const qkv_status codes[] = { QKV_OK, QKV_ERR_NULL, QKV_ERR_DTYPE, QKV_ERR_SHAPE,
        QKV_ERR_STRIDE, QKV_ERR_OVERFLOW, QKV_ERR_ARG, QKV_ERR_NOMEM, QKV_ERR_UNSUPPORTED,
        QKV_ERR_THREAD };
    enum { NC = sizeof codes / sizeof codes[0] };
    for (int i = 0; i < NC; i++) {
        const char *s = qkv_status_string(codes[i]);
        CHECK(s != NULL && s[0] != 0, "qkv_status_string(%d) is empty", codes[i]);
        CHECK(s == NULL || strcmp(s, "unknown status") != 0, "qkv_status_string(%d) = unknown", codes[i]);
        for (int j = 0; j < i; j++)
            CHECK(s && qkv_status_string(codes[j]) && strcmp(s, qkv_status_string(codes[j])) != 0,
                  "statuses %d and %d share the name \"%s\"", codes[i], codes[j], s ? s : "");
    }
    CHECK(strcmp(qkv_status_string(QKV_OK), "ok") == 0, "status_string(OK) = %s", qkv_status_string(QKV_OK));
    CHECK(strcmp(qkv_status_string(QKV_ERR_NULL), "null pointer") == 0, "status_string(NULL) = %s",
          qkv_status_string(QKV_ERR_NULL));
    static const qkv_status unknown[] = { 1, -10, 12345, -100000 };
    for (int i = 0; i < 4; i++) {
        const char *s = qkv_status_string(unknown[i]);
        CHECK(s && strcmp(s, "unknown status") == 0, "qkv_status_string(%d) = %s", unknown[i], s ? s : "(null)");
    }

    /* contexts */
    CHECK(qkv_ctx_create(-1) == NULL, "qkv_ctx_create(-1) must fail");
    qkv_ctx_free(NULL);   /* no-op */
    CHECK(qkv_ctx_last_error(NULL) != NULL, "qkv_ctx_last_error(NULL) is NULL");
    qkv_ctx *ctx = qkv_ctx_create(3);
    CHECK(ctx != NULL, "qkv_ctx_create(3)");
    if (!ctx) return;
    CHECK(qkv_ctx_threads(ctx) == 3, "qkv_ctx_threads = %d, want 3", qkv_ctx_threads(ctx));
    CHECK(qkv_ctx_last_error(ctx) && qkv_ctx_last_error(ctx)[0] == 0,
          "a fresh context's last error is \"%s\", want \"\"", qkv_ctx_last_error(ctx));
    qkv_ctx *c0 = qkv_ctx_create(0);
    CHECK(c0 && qkv_ctx_threads(c0) >= 1, "qkv_ctx_create(0) threads %d", c0 ? qkv_ctx_threads(c0) : -1);
    qkv_ctx_free(c0);

    /* kernel sets */
    const char *isa0 = qkv_ctx_isa(ctx);
    int listed = 0;
    for (int i = 0; isa0 && qkv_isa_name(i); i++)
        listed |= !strcmp(isa0, qkv_isa_name(i));
    CHECK(listed, "qkv_ctx_isa = %s, not a qkv_isa_name", isa0 ? isa0 : "(null)");
    CHECK(qkv_isa_name(-1) == NULL, "qkv_isa_name(-1) is not NULL");
    CHECK(qkv_isa_name(0) && !strcmp(qkv_isa_name(0), "generic"), "qkv_isa_name(0) is not generic");
    char before[32];
    snprintf(before, sizeof before, "%s", isa0 ? isa0 : "");
    CHECK(qkv_ctx_set_isa(ctx, "nope") == QKV_ERR_ARG, "set_isa(\"nope\") != QKV_ERR_ARG");
    CHECK(strcmp(qkv_ctx_isa(ctx), before) == 0, "a failed set_isa changed the isa to %s", qkv_ctx_isa(ctx));
    qkv_status st = qkv_ctx_set_isa(ctx, NULL);
    CHECK(st == QKV_ERR_NULL || st == QKV_ERR_ARG, "set_isa(NULL) = %d", st);
    CHECK(qkv_ctx_set_isa(NULL, "generic") == QKV_ERR_NULL, "set_isa on a NULL ctx");
    CHECK(qkv_isa_supported("nope") == 0, "isa_supported(\"nope\")");
    CHECK(qkv_isa_supported("generic") == 1, "isa_supported(\"generic\")");
    static const char *const names[6] = { "generic", "avx2", "avx512", "avx512bf16",
                                          "amx-emu", "amx" };
    for (int i = 0; i < 6; i++) {
        st = qkv_ctx_set_isa(ctx, names[i]);
        if (qkv_isa_supported(names[i]))
            CHECK(st == QKV_OK && !strcmp(qkv_ctx_isa(ctx), names[i]), "set_isa(%s) = %d, isa %s",
                  names[i], st, qkv_ctx_isa(ctx));
        else
            CHECK(st == QKV_ERR_UNSUPPORTED, "set_isa(%s) unsupported = %d", names[i], st);
    }
    qkv_ctx_free(ctx);

    /* QKV_ISA picks the kernel set of new contexts. The library may read it
       once per process, so ask a fresh process: this binary, --print-isa. */
    char self[4096], cmd[4200];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len > 0) {
        self[len] = 0;
        snprintf(cmd, sizeof cmd, "QKV_ISA=generic '%s' --print-isa", self);
        FILE *p = popen(cmd, "r");
        char line[64] = "";
        if (p) {
            if (!fgets(line, sizeof line, p)) line[0] = 0;
            pclose(p);
        }
        line[strcspn(line, "\n")] = 0;
        CHECK(strcmp(line, "generic") == 0, "QKV_ISA=generic: a new process's context uses \"%s\"", line);
    }

    /* defaults and tensor views */
    qkv_attn_opts o = qkv_attn_opts_default();
    CHECK(o.scale == 0 && o.causal == 0 && o.window_left == -1 && o.window_right == -1 &&
          o.softcap == 0 && !o.alibi_slopes && !o.bias && !o.cu_seqlens_q && !o.cu_seqlens_k,
          "qkv_attn_opts_default: unexpected field values");
    float x;
    qkv_tensor t = qkv_tensor_4d(&x, QKV_BF16, 2, 3, 4, 5);
    CHECK(t.data == &x && t.dtype == QKV_BF16 && t.shape[0] == 2 && t.shape[1] == 3 &&
          t.shape[2] == 4 && t.shape[3] == 5 && t.stride[0] == 60 && t.stride[1] == 20 &&
          t.stride[2] == 5 && t.stride[3] == 1, "qkv_tensor_4d: wrong shape/strides");
}

/* ---- pointers ---------------------------------------------------------------- */

void test_errors_pointers(void)
{
    qkv_ctx *ctx = new_ctx();
    if (!ctx) return;
    static errset e;
    setup(&e, ctx);
    expect_ok(&e, "baseline");
    e.lse = NULL;
    expect_ok(&e, "lse NULL");

    setup(&e, NULL);
    expect(&e, "NULL ctx", QKV_ERR_NULL, NONE, NULL);
    setup(&e, ctx); e.pq = NULL;    expect(&e, "NULL q", QKV_ERR_NULL, NONE, "q");
    setup(&e, ctx); e.pk = NULL;    expect(&e, "NULL k", QKV_ERR_NULL, NONE, "k");
    setup(&e, ctx); e.pv = NULL;    expect(&e, "NULL v", QKV_ERR_NULL, NONE, "v");
    setup(&e, ctx); e.pout = NULL;  expect(&e, "NULL out", QKV_ERR_NULL, NONE, "out");
    /* qkv.h does not say opts may be NULL: treated as a required pointer */
    setup(&e, ctx); e.popts = NULL; expect(&e, "NULL opts", QKV_ERR_NULL, NONE, "opts");
    setup(&e, ctx); e.q.data = NULL;   expect(&e, "NULL q->data", QKV_ERR_NULL, NONE, "q->data");
    setup(&e, ctx); e.k.data = NULL;   expect(&e, "NULL k->data", QKV_ERR_NULL, NONE, "k->data");
    setup(&e, ctx); e.v.data = NULL;   expect(&e, "NULL v->data", QKV_ERR_NULL, NONE, "v->data");
    setup(&e, ctx); e.out.data = NULL; expect(&e, "NULL out->data", QKV_ERR_NULL, NONE, "out->data");
    qkv_ctx_free(ctx);
}

/* ---- dtypes ------------------------------------------------------------------ */

void test_errors_dtypes(void)
{
    qkv_ctx *ctx = new_ctx();
    if (!ctx) return;
    static errset e;
    for (int dt = QKV_F16; dt <= QKV_BF16; dt++) {
        setup(&e, ctx);
        rng r = rng_seed(9);
        fill_random(e.qb, (qkv_dtype)dt, CAP, &r);
        fill_random(e.kb, (qkv_dtype)dt, CAP, &r);
        fill_random(e.vb, (qkv_dtype)dt, CAP, &r);
        e.q.dtype = e.k.dtype = e.v.dtype = e.out.dtype = (qkv_dtype)dt;
        expect_ok(&e, dt == QKV_F16 ? "all f16" : "all bf16");
    }

    setup(&e, ctx); e.k.dtype = QKV_F16;  expect(&e, "k f16, q f32", QKV_ERR_DTYPE, NONE, "k->dtype");
    setup(&e, ctx); e.v.dtype = QKV_BF16; expect(&e, "v bf16, q f32", QKV_ERR_DTYPE, NONE, "v->dtype");
    setup(&e, ctx); e.out.dtype = QKV_F16; expect(&e, "out f16, q f32", QKV_ERR_DTYPE, NONE, "out->dtype");
    setup(&e, ctx); e.q.dtype = (qkv_dtype)7; expect(&e, "q dtype 7", QKV_ERR_DTYPE, NONE, "q->dtype");
    setup(&e, ctx); e.k.dtype = (qkv_dtype)3; expect(&e, "k dtype 3", QKV_ERR_DTYPE, NONE, "k->dtype");
    setup(&e, ctx); e.out.dtype = (qkv_dtype)-1; expect(&e, "out dtype -1", QKV_ERR_DTYPE, NONE, "out->dtype");
    qkv_ctx_free(ctx);
}

/* ---- shapes ------------------------------------------------------------------ */

void test_errors_shapes(void)
{
    qkv_ctx *ctx = new_ctx();
    if (!ctx) return;
    static errset e;
#define S(field, val, name, what) do { setup(&e, ctx); field = val; \
        expect(&e, what, QKV_ERR_SHAPE, NONE, name); } while (0)
    S(e.k.shape[0], 3, "k->shape[0]", "k batch 3, q batch 2");
    S(e.v.shape[0], 1, "v->shape[0]", "v batch 1, q batch 2");
    S(e.out.shape[0], 3, "out->shape[0]", "out batch 3");
    S(e.v.shape[1], SK + 1, "v->shape[1]|k->shape[1]", "seqlen of v != k");
    S(e.k.shape[3], D + 1, "k->shape[3]|q->shape[3]", "head_dim of k != q");
    S(e.out.shape[3], DV + 1, "out->shape[3]|v->shape[3]", "head_dim of out != v");
    S(e.out.shape[1], SQ + 1, "out->shape[1]", "seqlen of out != q");
    S(e.out.shape[2], HQ / 2, "out->shape[2]", "heads of out != q");
    S(e.v.shape[2], 1, "v->shape[2]|k->shape[2]", "heads of v != k");
#undef S
    setup(&e, ctx); e.k.shape[2] = e.v.shape[2] = 3;
    expect(&e, "Hq % Hkv != 0", QKV_ERR_SHAPE, NONE, "q->shape[2]&k->shape[2]");

    /* zero and negative sizes, consistent across tensors */
    setup(&e, ctx); e.q.shape[0] = e.k.shape[0] = e.v.shape[0] = e.out.shape[0] = 0;
    expect(&e, "batch 0", QKV_ERR_SHAPE, NONE, "q->shape[0]|k->shape[0]|v->shape[0]|out->shape[0]");
    setup(&e, ctx); e.q.shape[1] = e.out.shape[1] = 0;
    expect(&e, "Sq 0", QKV_ERR_SHAPE, NONE, "q->shape[1]|out->shape[1]");
    setup(&e, ctx); e.k.shape[1] = e.v.shape[1] = 0;
    expect(&e, "Sk 0", QKV_ERR_SHAPE, NONE, "k->shape[1]|v->shape[1]");
    setup(&e, ctx); e.k.shape[2] = e.v.shape[2] = 0;
    expect(&e, "Hkv 0", QKV_ERR_SHAPE, NONE, "k->shape[2]|v->shape[2]");
    setup(&e, ctx); e.q.shape[2] = e.out.shape[2] = -4;
    expect(&e, "Hq -4", QKV_ERR_SHAPE, NONE, "q->shape[2]|out->shape[2]");
    setup(&e, ctx); e.q.shape[3] = e.k.shape[3] = 0;
    expect(&e, "D 0", QKV_ERR_SHAPE, NONE, "q->shape[3]|k->shape[3]");
    setup(&e, ctx); e.v.shape[3] = e.out.shape[3] = -1;
    expect(&e, "Dv -1", QKV_ERR_SHAPE, NONE, "v->shape[3]|out->shape[3]");
    setup(&e, ctx); e.k.shape[1] = e.v.shape[1] = -7;
    expect(&e, "Sk -7", QKV_ERR_SHAPE, NONE, "k->shape[1]|v->shape[1]");

    /* extents that overflow int64 (elements or bytes) */
    setup(&e, ctx);
    e.q.shape[1] = e.out.shape[1] = (int64_t)1 << 40;
    e.q.stride[1] = (int64_t)1 << 40;
    e.out.stride[0] = ((int64_t)1 << 40) * HQ * DV;
    expect(&e, "q shape 2^40 x stride 2^40", QKV_ERR_OVERFLOW, NONE, "q");
    setup(&e, ctx); e.q.stride[0] = (int64_t)1 << 62;
    expect(&e, "q stride[0] 2^62 (bytes overflow)", QKV_ERR_OVERFLOW, NONE, "q");
    setup(&e, ctx); e.k.stride[1] = (int64_t)1 << 60;
    expect(&e, "k 6 x 2^60 elements (bytes overflow)", QKV_ERR_OVERFLOW, NONE, "k");
    setup(&e, ctx); e.v.stride[1] = INT64_MAX / 3;
    expect(&e, "v 6 x INT64_MAX/3", QKV_ERR_OVERFLOW, NONE, "v");
    setup(&e, ctx); e.v.stride[3] = -((int64_t)1 << 62);
    expect(&e, "v stride[3] -2^62", QKV_ERR_OVERFLOW, NONE, "v");
    setup(&e, ctx); e.out.stride[0] = (int64_t)1 << 62;
    expect(&e, "out stride[0] 2^62", QKV_ERR_OVERFLOW, NONE, "out");
    setup(&e, ctx); e.opts.bias = &e.bias; e.bias.stride[0] = (int64_t)1 << 62;
    expect(&e, "bias stride[0] 2^62", QKV_ERR_OVERFLOW, NONE, "opts->bias");
    qkv_ctx_free(ctx);
}

/* ---- strides ----------------------------------------------------------------- */

void test_errors_strides(void)
{
    qkv_ctx *ctx = new_ctx();
    if (!ctx) return;
    static errset e;
    for (int d = 0; d < 4; d++) {
        char what[64], name[32];
        setup(&e, ctx);
        e.out.stride[d] = 0;
        snprintf(what, sizeof what, "out->stride[%d] = 0", d);
        snprintf(name, sizeof name, "out->stride[%d]", d);
        expect(&e, what, QKV_ERR_STRIDE, NONE, name);
    }
    /* inputs may broadcast; an output dim of size 1 may have stride 0 */
    setup(&e, ctx); e.q.stride[0] = 0; e.k.stride[2] = 0; e.v.stride[1] = 0;
    expect_ok(&e, "zero-stride inputs");
    setup(&e, ctx);
    e.q.shape[0] = e.k.shape[0] = e.v.shape[0] = e.out.shape[0] = 1;
    e.out.stride[0] = 0;
    expect_ok(&e, "out stride 0 on a size-1 dim");
    setup(&e, ctx);
    e.out.stride[1] = -HQ * DV;
    e.out.data = e.ob + (size_t)(SQ - 1) * HQ * DV * sizeof(float);
    e.out.shape[0] = e.q.shape[0] = e.k.shape[0] = e.v.shape[0] = 1;
    expect_ok(&e, "negative out stride");
    qkv_ctx_free(ctx);
}

/* ---- options ----------------------------------------------------------------- */

void test_errors_options(void)
{
    qkv_ctx *ctx = new_ctx();
    if (!ctx) return;
    static errset e;
#define A(field, val, name, what) do { setup(&e, ctx); field = val; \
        expect(&e, what, QKV_ERR_ARG, NONE, name); } while (0)
    A(e.opts.window_left, -2, "opts->window_left", "window_left -2");
    A(e.opts.window_left, INT64_MIN, "opts->window_left", "window_left INT64_MIN");
    A(e.opts.window_right, -7, "opts->window_right", "window_right -7");
    A(e.opts.scale, NAN, "opts->scale", "scale NaN");
    A(e.opts.scale, INFINITY, "opts->scale", "scale inf");
    A(e.opts.scale, -INFINITY, "opts->scale", "scale -inf");
    A(e.opts.softcap, -1.0f, "opts->softcap", "softcap -1");
    A(e.opts.softcap, NAN, "opts->softcap", "softcap NaN");
    A(e.opts.dropout_p, -0.1f, "opts->dropout_p", "dropout_p -0.1");
    A(e.opts.dropout_p, 1.0f, "opts->dropout_p", "dropout_p 1");
    A(e.opts.dropout_p, 2.5f, "opts->dropout_p", "dropout_p 2.5");
    A(e.opts.dropout_p, NAN, "opts->dropout_p", "dropout_p NaN");
    A(e.opts.dropout_p, INFINITY, "opts->dropout_p", "dropout_p inf");
#undef A
    setup(&e, ctx); e.opts.dropout_p = 0.999f; expect_ok(&e, "dropout_p 0.999");
    setup(&e, ctx); e.opts.window_left = 0; e.opts.window_right = 0; expect_ok(&e, "window (0, 0)");
    setup(&e, ctx); e.opts.causal = 1; e.opts.softcap = 0; expect_ok(&e, "causal");

    /* a huge window is no window: p - window_left must not overflow */
    setup(&e, ctx);
    float want[SQ * HQ * DV * B], got[SQ * HQ * DV * B];
    e.out.data = want;
    CHECK(call(&e, qkv_attention_forward) == QKV_OK, "forward, no window");
    e.opts.window_left = e.opts.window_right = INT64_MAX;
    e.out.data = got;
    CHECK(call(&e, qkv_attention_forward) == QKV_OK, "forward, window INT64_MAX: %s",
          qkv_ctx_last_error(ctx));
    compare("forward: window (INT64_MAX, INT64_MAX) == no window", got, QKV_F32, want,
            B * SQ * HQ * DV, 1e-6, 1e-6);
    CHECK(call(&e, qkv_attention_reference) == QKV_OK, "reference, window INT64_MAX: %s",
          qkv_ctx_last_error(ctx));
    compare("reference: window (INT64_MAX, INT64_MAX) == no window", got, QKV_F32, want,
            B * SQ * HQ * DV, 1e-5, 1e-5);
    qkv_ctx_free(ctx);
}

/* ---- varlen ------------------------------------------------------------------ */

void test_errors_varlen(void)
{
    qkv_ctx *ctx = new_ctx();
    if (!ctx) return;
    static errset e;
    setup_varlen(&e, ctx);
    expect_ok(&e, "varlen baseline");

    /* qkv.h leaves open whether bad offsets are a bad option (ARG) or bad
       sizes (SHAPE): either is accepted */
    setup_varlen(&e, ctx); e.cu_q[1] = 4; e.cu_q[2] = 3;
    expect(&e, "cu_seqlens_q decreasing", QKV_ERR_ARG, QKV_ERR_SHAPE, "opts->cu_seqlens_q");
    setup_varlen(&e, ctx); e.cu_k[0] = -1;
    expect(&e, "cu_seqlens_k negative", QKV_ERR_ARG, QKV_ERR_SHAPE, "opts->cu_seqlens_k");
    setup_varlen(&e, ctx); e.cu_q[3] = 11;
    expect(&e, "cu_seqlens_q past q->shape[1]", QKV_ERR_ARG, QKV_ERR_SHAPE, "opts->cu_seqlens_q");
    setup_varlen(&e, ctx); e.cu_k[3] = 13;
    expect(&e, "cu_seqlens_k past k->shape[1]", QKV_ERR_ARG, QKV_ERR_SHAPE, "opts->cu_seqlens_k");
    setup_varlen(&e, ctx); e.opts.cu_seqlens_k = NULL;
    expect(&e, "only cu_seqlens_q", QKV_ERR_ARG, QKV_ERR_NULL, "opts->cu_seqlens_k|opts->cu_seqlens_q");
    setup_varlen(&e, ctx); e.opts.cu_seqlens_q = NULL;
    expect(&e, "only cu_seqlens_k", QKV_ERR_ARG, QKV_ERR_NULL, "opts->cu_seqlens_q|opts->cu_seqlens_k");
    setup_varlen(&e, ctx); e.opts.n_seqs = 0;
    expect(&e, "n_seqs 0", QKV_ERR_ARG, QKV_ERR_SHAPE, "opts->n_seqs");
    setup_varlen(&e, ctx); e.opts.n_seqs = -1;
    expect(&e, "n_seqs -1", QKV_ERR_ARG, QKV_ERR_SHAPE, "opts->n_seqs");
    setup_varlen(&e, ctx);
    e.q.shape[0] = e.k.shape[0] = e.v.shape[0] = e.out.shape[0] = 2;
    expect(&e, "varlen with batch 2", QKV_ERR_SHAPE, NONE,
           "q->shape[0]|opts->cu_seqlens_q|opts->n_seqs");
    setup_varlen(&e, ctx);
    e.bias = qkv_tensor_4d(e.bb, QKV_F32, 1, HQ, 10, 12);
    e.opts.bias = &e.bias;
    expect(&e, "bias with varlen", QKV_ERR_UNSUPPORTED, NONE, "opts->bias");
    qkv_ctx_free(ctx);
}

/* ---- bias -------------------------------------------------------------------- */

void test_errors_bias(void)
{
    qkv_ctx *ctx = new_ctx();
    if (!ctx) return;
    static errset e;
    setup(&e, ctx); e.opts.bias = &e.bias;
    expect_ok(&e, "bias [B,Hq,Sq,Sk]");
    setup(&e, ctx); e.opts.bias = &e.bias; e.bias.shape[0] = e.bias.shape[1] = 1;
    expect_ok(&e, "bias [1,1,Sq,Sk]");
    setup(&e, ctx); e.opts.bias = &e.bias; e.bias.stride[0] = e.bias.stride[1] = 0;
    expect_ok(&e, "bias with zero strides");

    setup(&e, ctx); e.opts.bias = &e.bias; e.bias.dtype = QKV_F16;
    expect(&e, "bias f16", QKV_ERR_DTYPE, NONE, "opts->bias->dtype");
    setup(&e, ctx); e.opts.bias = &e.bias; e.bias.dtype = (qkv_dtype)7;
    expect(&e, "bias dtype 7", QKV_ERR_DTYPE, NONE, "opts->bias->dtype");
    setup(&e, ctx); e.opts.bias = &e.bias; e.bias.data = NULL;
    expect(&e, "bias data NULL", QKV_ERR_NULL, NONE, "opts->bias->data");
    static const int64_t bad[4][4] = {
        { B, HQ, SQ, SK + 1 }, { 3, HQ, SQ, SK }, { B, 2, SQ, SK }, { B, HQ, SQ + 1, SK } };
    static const char *const names[4] = {
        "opts->bias->shape[3]", "opts->bias->shape[0]", "opts->bias->shape[1]", "opts->bias->shape[2]" };
    for (int i = 0; i < 4; i++) {
        setup(&e, ctx);
        e.bias = qkv_tensor_4d(e.bb, QKV_F32, bad[i][0], bad[i][1], bad[i][2], bad[i][3]);
        e.opts.bias = &e.bias;
        char what[64];
        snprintf(what, sizeof what, "bias [%lld,%lld,%lld,%lld]", (long long)bad[i][0],
                 (long long)bad[i][1], (long long)bad[i][2], (long long)bad[i][3]);
        expect(&e, what, QKV_ERR_SHAPE, NONE, names[i]);
    }
    qkv_ctx_free(ctx);
}
