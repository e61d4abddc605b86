/*
 * tile.c — the pieces of a tile shared by the forward and backward drivers:
 * rows in and out of the tensors (widening, rounding, prefetching), the
 * keys a query row sees, and the score modifications (softcap, ALiBi,
 * bias, the band mask) applied to a tile of scores.
 */
#include "tile.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* dst[c] = src[off + c·stride] as fp32, c < n. */
void qkv__load_row(const qkv__kernels *kn, const qkv_tensor *t, int64_t off,
                     int64_t stride, int64_t n, float *dst)
{
    if (stride == 1) {
        const uint16_t *h = (const uint16_t *)t->data + off;
        switch (t->dtype) {
        case QKV_F32:  memcpy(dst, (const float *)t->data + off, (size_t)n * sizeof(float)); return;
        case QKV_F16:  kn->cvt_f16(h, dst, n); return;
        case QKV_BF16: kn->cvt_bf16(h, dst, n); return;
        }
    }
    for (int64_t c = 0; c < n; c++)
        dst[c] = qkv__load(t->data, t->dtype, off + c * stride);
}

void qkv__store_row(const qkv__kernels *kn, const qkv_tensor *t, int64_t off,
                      int64_t stride, int64_t n, const float *src, float mul)
{
    if (stride == 1) {
        uint16_t *h = (uint16_t *)t->data + off;
        switch (t->dtype) {
        case QKV_F32:
            for (int64_t c = 0; c < n; c++)
                ((float *)t->data)[off + c] = src[c] * mul;
            return;
        case QKV_F16:  kn->store_f16(src, mul, h, n); return;
        case QKV_BF16: kn->store_bf16(src, mul, h, n); return;
        }
    }
    for (int64_t c = 0; c < n; c++)
        qkv__store(t->data, t->dtype, off + c * stride, src[c] * mul);
}

/* The keys query row i can see, as a half-open range [*lo, *hi) within a
   sequence of sq queries and sk keys; empty when *lo >= *hi. */
void qkv__key_range(const qkv__attn *a, const qkv__seq *s, int64_t i,
                      int64_t *lo, int64_t *hi)
{
    int64_t p = i + s->sk - s->sq;
    int64_t l = 0, h = s->sk;
    if (a->window_left >= 0 && p - a->window_left > l)
        l = p - a->window_left;
    if (a->causal && p + 1 < h)
        h = p + 1;
    if (a->window_right >= 0 && p + a->window_right + 1 < h)
        h = p + a->window_right + 1;
    *lo = l < s->sk ? l : s->sk;
    *hi = h > *lo ? h : *lo;
}


/* Softcap, ALiBi, bias and the band mask on one score tile (keys j0..j0+n
   by m query rows, leading dimension ld). `band` says whether the band cuts
   this tile. With softcap, dcap (same layout, or NULL) receives the
   derivative of the cap, 1 - tanh²(s/softcap), for the backward. */
void qkv__score_mods(const qkv__attn *a, const qkv__seq *s, const qkv__tile_map *tm,
                     int m, int64_t j0, int n, int band, float *st, int64_t ldr, int64_t ld,
                     float *dcap)
{
    const float cap = a->softcap;
    for (int r = 0; r < m; r++) {
        float *col = st + r * ldr;
        const int64_t h = tm->h0 + r / tm->mp, i = tm->i0 + r % tm->mp;
        const int64_t p = i + s->sk - s->sq;
        if (cap > 0.0f)
            for (int c = 0; c < n; c++) {
                const float t = tanhf(col[c * ld] / cap);
                col[c * ld] = cap * t;
                if (dcap)
                    dcap[c * ld + r] = 1.0f - t * t;
            }
        if (a->alibi) {
            const float slope = a->alibi[h];
            for (int c = 0; c < n; c++)
                col[c * ld] -= slope * (float)llabs(p - (j0 + c));
        }
        if (a->bias) {
            const float *b = a->bias + s->b * a->bias_stride[0] + h * a->bias_stride[1] +
                             i * a->bias_stride[2] + j0 * a->bias_stride[3];
            for (int c = 0; c < n; c++)
                col[c * ld] += b[c * a->bias_stride[3]];
        }
        if (band) {   /* hide keys before lo and from hi on */
            int64_t lo, hi;
            qkv__key_range(a, s, i, &lo, &hi);
            const int64_t c_lo = lo - j0 < 0 ? 0 : lo - j0 > n ? n : lo - j0;
            const int64_t c_hi = hi - j0 < c_lo ? c_lo : hi - j0 > n ? n : hi - j0;
            for (int64_t c = 0; c < c_lo; c++)
                col[c * ld] = -INFINITY;
            for (int64_t c = c_hi; c < n; c++)
                col[c * ld] = -INFINITY;
        }
    }
}

/* Asks for the cache lines of the row `ahead` rows (dim 1) after the row
   at element offset off (cols elements at unit stride; other strides are
   left to the hardware). The address is computed in unsigned arithmetic
   and never dereferenced, so rows past the tensor are harmless. */
void qkv__prefetch_row(const qkv_tensor *t, int64_t off, int64_t ahead, int64_t cols)
{
    if (t->stride[3] != 1)
        return;
    const uint64_t es = qkv_dtype_size(t->dtype);
    const uintptr_t p = (uintptr_t)t->data +
                        (uintptr_t)((uint64_t)off * es + (uint64_t)ahead * (uint64_t)t->stride[1] * es);
    for (uint64_t b = 0; b < (uint64_t)cols * es; b += 64)
        __builtin_prefetch((const void *)(p + (uintptr_t)b));
}

/* n rows of a K or V tile, starting at element offset row0, as fp32 with
   unit inner stride: in place when they already are, widened into buf
   ([n][cols]) otherwise. Returns the rows and sets *ld to their stride. */
const float *qkv__tile_rows_f32(const qkv__kernels *kn, const qkv_tensor *t,
                                  int64_t row0, int n, int64_t cols, float *buf,
                                  int64_t *ld)
{
    if (t->dtype == QKV_F32 && (t->stride[3] == 1 || cols == 1)) {
        *ld = t->stride[1];
        return (const float *)t->data + row0;
    }
    if (t->stride[3] == 1 && t->stride[1] == cols) {
        /* rows back to back ([B, H, S, D] tensors, a head-major pool's
           block): one run of values, widened in one call, which the
           hardware prefetchers follow */
        qkv__load_row(kn, t, row0, 1, (int64_t)n * cols, buf);
        *ld = cols;
        return buf;
    }
    for (int c = 0; c < n; c++) {
        qkv__prefetch_row(t, row0 + c * t->stride[1], QKV__PREFETCH_ROWS, cols);
        qkv__load_row(kn, t, row0 + c * t->stride[1], t->stride[3], cols, buf + c * cols);
    }
    *ld = cols;
    return buf;
}


void qkv__transpose_tile(const float *src, int m, int64_t cols, int mpad, int64_t R,
                         float *dst)
{
    /* the padding columns m..mpad lie within the last QKV__PAD of each
       row: zero those whole, then write the m columns over them */
    for (int64_t c = 0; c < cols; c++)
        memset(dst + c * R + (mpad - QKV__PAD), 0, QKV__PAD * sizeof *dst);
    for (int r = 0; r < m; r++)
        for (int64_t c = 0; c < cols; c++)
            dst[c * R + r] = src[r * cols + c];
}

/* ---- bf16 rows and pairs ------------------------------------------------- */

void qkv__tile_rows_bf16(const qkv_tensor *t, const qkv__seq *s, const qkv__tile_map *tm,
                         int m, int64_t cols, int64_t ld, uint16_t *dst)
{
    const uint16_t *src = t->data;
    for (int r = 0; r < m; r++) {
        const int64_t h = tm->h0 + r / tm->mp, i = s->q0 + tm->i0 + r % tm->mp;
        const int64_t off = s->b * t->stride[0] + i * t->stride[1] + h * t->stride[2];
        uint16_t *d = dst + r * ld;
        if (t->stride[3] == 1)
            memcpy(d, src + off, (size_t)cols * sizeof *d);
        else
            for (int64_t x = 0; x < cols; x++)
                d[x] = src[off + x * t->stride[3]];
        memset(d + cols, 0, (size_t)(ld - cols) * sizeof *d);
    }
}

const uint16_t *qkv__key_rows_bf16(const qkv_tensor *t, int64_t row0, int n, int64_t cols,
                                   uint16_t *buf, int64_t *ld)
{
    const uint16_t *src = t->data;
    if (t->stride[3] == 1 && cols % 2 == 0) {
        /* read in place by the kernel: ask for the next tile's rows */
        for (int c = 0; c < n; c++)
            qkv__prefetch_row(t, row0 + c * t->stride[1], n, cols);
        *ld = t->stride[1];
        return src + row0;
    }
    const int64_t w = 2 * qkv__pairs(cols);
    for (int c = 0; c < n; c++) {
        for (int64_t x = 0; x < cols; x++)
            buf[c * w + x] = src[row0 + c * t->stride[1] + x * t->stride[3]];
        if (cols % 2)
            buf[c * w + cols] = 0;
    }
    *ld = w;
    return buf;
}

void qkv__key_pairs_bf16(const qkv__kernels *kn, const qkv_tensor *t, int64_t row0, int n,
                         int64_t cols, uint16_t *rows2, uint32_t *dst)
{
    const uint16_t *src = t->data;
    for (int jj = 0; 2 * jj < n; jj++) {
        const uint16_t *r[2] = { NULL, NULL };
        for (int e = 0; e < 2 && 2 * jj + e < n; e++) {
            const int64_t off = row0 + (2 * jj + e) * t->stride[1];
            qkv__prefetch_row(t, off, QKV__PREFETCH_ROWS, cols);
            if (t->stride[3] == 1) {
                r[e] = src + off;
                continue;
            }
            for (int64_t c = 0; c < cols; c++)
                rows2[e * cols + c] = src[off + c * t->stride[3]];
            r[e] = rows2 + e * cols;
        }
        kn->pack_pairs(r[0], r[1], cols, dst + jj * cols);
    }
}

void qkv__dropout_tile(const qkv__kernels *kn, const qkv__attn *a, const qkv__seq *s,
                       const qkv__tile_map *tm, int m, int64_t j0, int n, float *st,
                       int64_t ld)
{
    enum { ROWS = 64, KEYS = 256 };
    uint32_t rk[ROWS], ck[KEYS];
    for (int c0 = 0; c0 < n; c0 += KEYS) {
        const int cn = n - c0 < KEYS ? n - c0 : KEYS;
        for (int c = 0; c < cn; c++)
            ck[c] = qkv__drop_col(a, j0 + c0 + c);
        for (int r0 = 0; r0 < m; r0 += ROWS) {
            const int rn = m - r0 < ROWS ? m - r0 : ROWS;
            for (int r = 0; r < rn; r++) {
                const int rr = r0 + r;
                rk[r] = qkv__drop_row(a, s, tm->h0 + rr / tm->mp, tm->i0 + rr % tm->mp);
            }
            kn->drop_cols(st + c0 * ld + r0, ld, cn, rn, rk, ck, a->drop_thresh,
                          a->drop_scale);
        }
    }
}

void qkv__pack_p_bf16(const qkv__kernels *kn, const float *st, int64_t R, int n, int m,
                      uint32_t *pp)
{
    enum { ROWS = 256 };
    uint16_t lo[ROWS], hi[ROWS];
    for (int jj = 0; 2 * jj < n; jj++) {
        const int odd = 2 * jj + 1 < n;
        for (int r0 = 0; r0 < m; r0 += ROWS) {
            const int rn = m - r0 < ROWS ? m - r0 : ROWS;
            kn->store_bf16(st + 2 * jj * R + r0, 1.0f, lo, rn);
            if (odd)
                kn->store_bf16(st + (2 * jj + 1) * R + r0, 1.0f, hi, rn);
            kn->pack_pairs(lo, odd ? hi : NULL, rn, pp + jj * R + r0);
        }
    }
}
