/*
 * kernels.h — the micro-kernel table: the few inner loops attention spends
 * its time in, one implementation per instruction set, chosen at run time
 * by dispatch.c. Kernels receive fp32 tiles in scratch memory and a range of
 * work; they never allocate, never create threads and never see dtypes
 * other than fp32 except in the row load/store kernels.
 */
#ifndef QKV_KERNELS_H
#define QKV_KERNELS_H

#include <stdint.h>

typedef struct qkv__kernels {
    const char *name;

    /* s[i][j] = scale · Σ_d q[i][d]·kt[d][j]   for i < m, j < n.
       q [m][ldq], kt [d][ldk] (a K tile packed transposed), s [m][lds]. */
    void (*qk)(int m, int n, int d, float scale,
               const float *q, int64_t ldq, const float *kt, int64_t ldk,
               float *s, int64_t lds);

    /* acc[i][c] = alpha[i]·acc[i][c] + Σ_j p[i][j]·v[j][c]  for i < m, c < dv.
       p [m][ldp], v [n][ldv], acc [m][lda]. */
    void (*pv)(int m, int n, int dv, const float *p, int64_t ldp,
               const float *v, int64_t ldv, const float *alpha,
               float *acc, int64_t lda);

    /* Largest of s[0..n); -inf when n == 0 or all are -inf. */
    float (*row_max)(const float *s, int n);

    /* s[j] = exp(s[j] - m) in place (exp(-inf) = 0) and returns Σ s[j].
       m is finite. */
    float (*exp_sum)(float *s, int n, float m);

    /* dst[j] = src[j] widened to fp32 exactly, j < n (contiguous rows). */
    void (*cvt_f16)(const uint16_t *src, float *dst, int64_t n);
    void (*cvt_bf16)(const uint16_t *src, float *dst, int64_t n);
} qkv__kernels;

/* Kernel sets, in order of preference on x86-64: avx512, avx2, generic. */
void qkv__kernels_generic(qkv__kernels *t);
void qkv__kernels_avx2(qkv__kernels *t);
void qkv__kernels_avx512(qkv__kernels *t);

/* The best set this CPU and OS support (or QKV_ISA's choice). */
const qkv__kernels *qkv__kernels_default(void);
/* The named set, or NULL when unknown (*known = 0) or unsupported. */
const qkv__kernels *qkv__kernels_by_name(const char *name, int *known);

#endif /* QKV_KERNELS_H */
