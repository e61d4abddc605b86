/*
 * ref.h — element access and the visibility rule shared by the two
 * specifications (reference.c, backward_ref.c): plain loops, no tiles.
 */
#ifndef QKV_REF_H
#define QKV_REF_H

#include "attn.h"

#include <math.h>

/* Element (i0, i1, i2, i3) of t as a double, and a double stored into it
   (rounded to t's dtype). */
static inline double at(const qkv_tensor *t, int64_t i0, int64_t i1, int64_t i2, int64_t i3)
{
    int64_t off = i0 * t->stride[0] + i1 * t->stride[1] + i2 * t->stride[2] + i3 * t->stride[3];
    return qkv__load(t->data, t->dtype, off);
}

static inline void put(const qkv_tensor *t, int64_t i0, int64_t i1, int64_t i2, int64_t i3, double x)
{
    int64_t off = i0 * t->stride[0] + i1 * t->stride[1] + i2 * t->stride[2] + i3 * t->stride[3];
    qkv__store(t->data, t->dtype, off, (float)x);
}

/* Whether query i (within sequence s) sees key j under causal/windows. */
static inline int visible(const qkv__attn *a, int64_t i, int64_t j, const qkv__seq *s)
{
    int64_t p = i + s->sk - s->sq;
    if (a->causal && j > p)
        return 0;
    if (a->window_left >= 0 && j < p - a->window_left)
        return 0;
    if (a->window_right >= 0 && j > p + a->window_right)
        return 0;
    return 1;
}

/* The score modifications of query i (head h) and key j on x = scale·q·k:
   softcap, ALiBi, bias, in the contract's order. With dcap non-NULL it
   receives the softcap's derivative (1 without softcap). */
static inline double score_mods(const qkv__attn *a, const qkv__seq *s, int64_t h, int64_t i,
                                int64_t j, double x, double *dcap)
{
    if (dcap)
        *dcap = 1.0;
    if (a->softcap > 0.0f) {
        const double t = tanh(x / a->softcap);
        x = a->softcap * t;
        if (dcap)
            *dcap = 1.0 - t * t;
    }
    if (a->alibi)
        x -= a->alibi[h] * fabs((double)(i + s->sk - s->sq - j));
    if (a->bias)
        x += a->bias[s->b * a->bias_stride[0] + h * a->bias_stride[1] +
                     i * a->bias_stride[2] + j * a->bias_stride[3]];
    return x;
}

#endif /* QKV_REF_H */
