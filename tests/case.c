/*
 * case.c — building one attention problem for the tests (see acase in
 * test.h): strided random inputs, bias, ALiBi slopes, varlen offsets, the
 * opts struct, logical fp32 copies for the oracles, and the checks that an
 * output call wrote only where it may; and msg_names, which checks that an
 * error message names the argument at fault.
 */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void acase_init(acase *c, int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hkv,
                int64_t D, int64_t Dv, qkv_dtype dt)
{
    memset(c, 0, sizeof *c);
    c->B = B; c->Sq = Sq; c->Sk = Sk; c->Hq = Hq; c->Hkv = Hkv; c->D = D; c->Dv = Dv;
    c->dt = dt;
    c->wl = c->wr = -1;
    c->seed = 1;
}

void acase_random_varlen(acase *c, rng *r, int n_seqs, int max_len)
{
    c->n_seqs = n_seqs;
    c->cu_q[0] = (int32_t)rng_int(r, 0, 2);     /* unused leading rows */
    c->cu_k[0] = (int32_t)rng_int(r, 0, 2);
    for (int s = 0; s < n_seqs; s++) {
        c->cu_q[s + 1] = c->cu_q[s] + (int32_t)rng_int(r, 0, max_len);
        c->cu_k[s + 1] = c->cu_k[s] + (int32_t)rng_int(r, 0, max_len);
    }
    c->B = 1;
    c->Sq = c->cu_q[n_seqs] + rng_int(r, 0, 2);   /* unused trailing rows */
    c->Sk = c->cu_k[n_seqs] + rng_int(r, 0, 2);
    if (c->Sq == 0) c->Sq = 1;
    if (c->Sk == 0) c->Sk = 1;
}

static void make_input(tbuf *tb, qkv_dtype dt, int64_t a, int64_t b, int64_t h, int64_t d,
                       int layout, rng *r)
{
    int64_t shape[4] = { a, b, h, d };
    tbuf_make_layout(tb, dt, shape, layout);
    tbuf_fill_random(tb, r);
}

static float *gather_f32(const qkv_tensor *t)
{
    size_t n = (size_t)(t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3]);
    void *tmp = xmalloc(n * qkv_dtype_size(t->dtype));
    view_gather(t, tmp);
    float *f = to_f32(tmp, t->dtype, n);
    free(tmp);
    return f;
}

void acase_build(acase *c)
{
    rng r = rng_seed(c->seed);
    if (c->packed) {
        /* one [B, S, 3, H, D] buffer (Sq == Sk, Hq == Hkv, D == Dv) */
        make_input(&c->qkv, c->dt, c->B, c->Sq, 3 * c->Hq, c->D, LAY_CONTIG, &r);
        size_t es = qkv_dtype_size(c->dt);
        qkv_tensor t = c->qkv.t;   /* strides [S*3*H*D, 3*H*D, D, 1] */
        c->tq = c->tk = c->tv = t;
        c->tq.shape[2] = c->tk.shape[2] = c->tv.shape[2] = c->Hq;
        c->tk.data = (char *)t.data + (size_t)(c->Hq * c->D) * es;
        c->tv.data = (char *)t.data + (size_t)(2 * c->Hq * c->D) * es;
    } else {
        make_input(&c->q, c->dt, c->B, c->Sq, c->Hq, c->D, c->lay_q, &r);
        make_input(&c->k, c->dt, c->B, c->Sk, c->Hkv, c->D, c->lay_k, &r);
        make_input(&c->v, c->dt, c->B, c->Sk, c->Hkv, c->Dv, c->lay_v, &r);
        c->tq = c->q.t; c->tk = c->k.t; c->tv = c->v.t;
    }
    c->qf = gather_f32(&c->tq);
    c->kf = gather_f32(&c->tk);
    c->vf = gather_f32(&c->tv);

    c->opts = qkv_attn_opts_default();
    c->opts.scale = c->scale;
    c->opts.causal = c->causal;
    c->opts.window_left = c->wl;
    c->opts.window_right = c->wr;
    c->opts.softcap = c->softcap;
    c->opts.dropout_p = c->dropout;
    c->opts.dropout_seed = (c->seed + 1) * 0x9e3779b97f4a7c15ull;
    if (c->alibi) {
        c->slopes = xmalloc((size_t)c->Hq * sizeof(float));
        for (int64_t h = 0; h < c->Hq; h++)
            c->slopes[h] = (float)(0.25 * (rng_unif(&r) + 1.0) + 1e-3);
        c->opts.alibi_slopes = c->slopes;
    }
    if (c->bias) {
        int64_t bs[4] = { c->B, c->Hq, c->Sq, c->Sk }, st[4];
        if (c->bias == BIAS_B1 || c->bias == BIAS_11) bs[0] = 1;
        if (c->bias == BIAS_H1 || c->bias == BIAS_11) bs[1] = 1;
        if (c->bias == BIAS_KEYS) bs[1] = bs[2] = 1;
        if (c->bias == BIAS_ROWS) bs[0] = bs[3] = 1;
        layout_strides(c->bias == BIAS_PAD ? LAY_PAD : LAY_CONTIG, bs, st);
        if (c->bias == BIAS_ZSTRIDE) {   /* full shape, broadcast by strides */
            st[0] = st[1] = 0;
            st[2] = c->Sk;
        }
        tbuf_make(&c->bias_t, QKV_F32, bs, st);
        float *bb = (float *)c->bias_t.buf;
        size_t n = c->bias_t.bytes / sizeof(float);
        for (size_t i = 0; i < n; i++) {
            double u = rng_unif(&r);
            bb[i] = fabs(u) > 0.92 ? -INFINITY : (float)u;
        }
        if (c->bias_neg_row && bs[2] > 1) {
            float *base = c->bias_t.t.data;
            for (int64_t a = 0; a < bs[0]; a++)
                for (int64_t h = 0; h < bs[1]; h++)
                    for (int64_t j = 0; j < bs[3]; j++)
                        base[a * st[0] + h * st[1] + (c->Sq / 2) * st[2] + j * st[3]] = -INFINITY;
        }
        c->opts.bias = &c->bias_t.t;
    }
    if (c->n_seqs > 0) {
        c->opts.cu_seqlens_q = c->cu_q;
        c->opts.cu_seqlens_k = c->cu_k;
        c->opts.n_seqs = c->n_seqs;
    }
    c->n_out = (size_t)(c->B * c->Sq * c->Hq * c->Dv);
    c->n_lse = (size_t)(c->B * c->Hq * c->Sq);
    c->row_used = xmalloc((size_t)(c->B * c->Sq));
    memset(c->row_used, c->n_seqs > 0 ? 0 : 1, (size_t)(c->B * c->Sq));
    for (int s = 0; s < c->n_seqs; s++)
        for (int32_t i = c->cu_q[s]; i < c->cu_q[s + 1]; i++)
            c->row_used[i] = 1;
}

void acase_free(acase *c)
{
    tbuf_free(&c->q); tbuf_free(&c->k); tbuf_free(&c->v);
    tbuf_free(&c->qkv); tbuf_free(&c->bias_t);
    free(c->slopes); free(c->qf); free(c->kf); free(c->vf); free(c->row_used);
    c->slopes = c->qf = c->kf = c->vf = NULL;
    c->row_used = NULL;
}

const char *acase_str(const acase *c)
{
    static char s[512];
    int n = snprintf(s, sizeof s, "%s B%lld Sq%lld Sk%lld Hq%lld Hkv%lld D%lld Dv%lld",
                     dtype_name(c->dt), (long long)c->B, (long long)c->Sq, (long long)c->Sk,
                     (long long)c->Hq, (long long)c->Hkv, (long long)c->D, (long long)c->Dv);
#define ADD(...) do { if (n < (int)sizeof s) n += snprintf(s + n, sizeof s - (size_t)n, __VA_ARGS__); } while (0)
    if (c->causal) ADD(" causal");
    if (c->wl >= 0 || c->wr >= 0) ADD(" window(%lld,%lld)", (long long)c->wl, (long long)c->wr);
    if (c->scale != 0) ADD(" scale%g", (double)c->scale);
    if (c->softcap != 0) ADD(" softcap%g", (double)c->softcap);
    if (c->alibi) ADD(" alibi");
    if (c->dropout) ADD(" dropout%g", (double)c->dropout);
    if (c->bias) ADD(" bias%d%s", c->bias, c->bias_neg_row ? "(-inf row)" : "");
    if (c->n_seqs) {
        ADD(" varlen q[");
        for (int i = 0; i <= c->n_seqs; i++) ADD("%s%d", i ? "," : "", c->cu_q[i]);
        ADD("] k[");
        for (int i = 0; i <= c->n_seqs; i++) ADD("%s%d", i ? "," : "", c->cu_k[i]);
        ADD("]");
    }
    if (c->packed) ADD(" packed-qkv");
    else if (c->lay_q || c->lay_k || c->lay_v)
        ADD(" q:%s k:%s v:%s", lay_name[c->lay_q], lay_name[c->lay_k], lay_name[c->lay_v]);
    if (c->lay_o) ADD(" out:%s", lay_name[c->lay_o]);
    ADD(" seed%llu", (unsigned long long)c->seed);
#undef ADD
    return s;
}

void acase_make_out(const acase *c, tbuf *out, qkv_dtype dt)
{
    int64_t shape[4] = { c->B, c->Sq, c->Hq, c->Dv };
    tbuf_make_layout(out, dt, shape, c->lay_o);
    tbuf_fill_byte(out, OUT_SENTINEL);
}

float *acase_make_lse(const acase *c)
{
    size_t n = c->n_lse + 2 * LSE_MARGIN;
    float *p = xmalloc(n * sizeof(float));
    memset(p, LSE_SENTINEL, n * sizeof(float));
    return p + LSE_MARGIN;
}

void acase_free_lse(float *lse)
{
    if (lse) free(lse - LSE_MARGIN);
}

static int all_bytes(const void *p, size_t n, unsigned char byte)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != byte) return 0;
    return 1;
}

void acase_zero_unused(const acase *c, float *out, float *lse)
{
    size_t row = (size_t)(c->Hq * c->Dv);
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t i = 0; i < c->Sq; i++) {
            if (c->row_used[b * c->Sq + i]) continue;
            if (out) memset(out + (size_t)(b * c->Sq + i) * row, 0, row * sizeof(float));
            for (int64_t h = 0; lse && h < c->Hq; h++)
                lse[(b * c->Hq + h) * c->Sq + i] = 0;
        }
}

float *acase_collect(const acase *c, const tbuf *out, float *lse, const char *label)
{
    size_t changed = tbuf_outside_changed(out, OUT_SENTINEL);
    CHECK(changed == 0, "%s: %zu bytes of out outside its view were written [%s]",
          label, changed, acase_str(c));
    size_t es = qkv_dtype_size(out->t.dtype);
    unsigned char *raw = xmalloc(c->n_out * es);
    view_gather(&out->t, raw);
    size_t row = (size_t)(c->Hq * c->Dv), bad_rows = 0, bad_lse = 0;
    for (int64_t r = 0; r < c->B * c->Sq; r++)
        if (!c->row_used[r] && !all_bytes(raw + (size_t)r * row * es, row * es, OUT_SENTINEL))
            bad_rows++;
    CHECK(bad_rows == 0, "%s: %zu out rows outside every sequence were written [%s]",
          label, bad_rows, acase_str(c));
    float *got = to_f32(raw, out->t.dtype, c->n_out);
    free(raw);
    if (lse) {
        CHECK(all_bytes(lse - LSE_MARGIN, LSE_MARGIN * sizeof(float), LSE_SENTINEL) &&
              all_bytes(lse + c->n_lse, LSE_MARGIN * sizeof(float), LSE_SENTINEL),
              "%s: lse written outside [0, B*Hq*Sq) [%s]", label, acase_str(c));
        for (int64_t b = 0; b < c->B; b++)
            for (int64_t h = 0; h < c->Hq; h++)
                for (int64_t i = 0; i < c->Sq; i++)
                    if (!c->row_used[b * c->Sq + i] &&
                        !all_bytes(&lse[(b * c->Hq + h) * c->Sq + i], sizeof(float), LSE_SENTINEL))
                        bad_lse++;
        CHECK(bad_lse == 0, "%s: %zu lse entries of rows outside every sequence were written [%s]",
              label, bad_lse, acase_str(c));
    }
    acase_zero_unused(c, got, lse);
    return got;
}

/* ---- error messages ---------------------------------------------------------- */

static int ident(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_';
}

/* name occurs in msg as a whole path: not inside a longer identifier */
static int has_name(const char *msg, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = strstr(msg, name); p; p = strstr(p + 1, name)) {
        char before = p == msg ? ' ' : p[-1], after = p[n];
        if (!ident(before) && before != '>' && before != '.' && !ident(after))
            return 1;
    }
    return 0;
}

/* names: alternatives separated by '|', each a list of names joined by
   '&' that must all appear */
int msg_names(const char *msg, const char *names)
{
    char buf[256];
    snprintf(buf, sizeof buf, "%s", names);
    char *save_alt = NULL;
    for (char *alt = strtok_r(buf, "|", &save_alt); alt; alt = strtok_r(NULL, "|", &save_alt)) {
        int all = 1;
        char *save = NULL;
        for (char *nm = strtok_r(alt, "&", &save); nm; nm = strtok_r(NULL, "&", &save))
            all &= has_name(msg, nm);
        if (all) return 1;
    }
    return 0;
}

int kernel_sets(const char **sets)
{
    int n = 0;
    for (int i = 0; qkv_isa_name(i) && n < 8; i++)
        if (qkv_isa_supported(qkv_isa_name(i)))
            sets[n++] = qkv_isa_name(i);
    return n;
}
