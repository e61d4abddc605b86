/*
 * ref.h — element access and the visibility rule shared by the two
 * specifications (reference.c, backward_ref.c): plain loops, no tiles.
 */
#ifndef QKV_REF_H
#define QKV_REF_H

#include "attn.h"

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

#endif /* QKV_REF_H */
