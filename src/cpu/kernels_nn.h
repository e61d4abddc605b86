/*
 * kernels_nn.h — the element-wise kernels of the model layers (src/nn),
 * compiled once per instruction set from kernels_nn.c like the attention
 * kernels, and chosen by the context's kernel set (qkv__nn_kernels_for).
 */
#ifndef QKV_KERNELS_NN_H
#define QKV_KERNELS_NN_H

#include <stdint.h>

typedef struct {
    const char *name;
    /* x[0..n) = GELU(x) = 0.5·x·(1 + erf(x/√2)), in place */
    void (*gelu)(float *x, int64_t n);
} qkv__nn_kernels;

void qkv__nn_kernels_generic(qkv__nn_kernels *t);
void qkv__nn_kernels_avx2(qkv__nn_kernels *t);
void qkv__nn_kernels_avx512(qkv__nn_kernels *t);

/* Fills t with the set matching the attention kernel set named isa
   (qkv_ctx_isa's names): AVX-512 for avx512*, amx*; AVX2 for avx2;
   generic otherwise and off x86-64. */
void qkv__nn_kernels_for(const char *isa, qkv__nn_kernels *t);

#endif /* QKV_KERNELS_NN_H */
