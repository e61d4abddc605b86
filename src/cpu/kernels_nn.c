/*
 * kernels_nn.c — element-wise kernels of the model layers, written once in
 * plain C and compiled once per instruction set (CMake: generic, AVX2+FMA,
 * AVX-512) so that the compiler vectorizes them at that width.
 * QKV_NN_TABLE names the one exported function; the rest is static.
 */
#include "kernels_nn.h"

#ifndef QKV_NN_TABLE
#define QKV_NN_TABLE qkv__nn_kernels_generic
#endif
#ifndef QKV_NN_NAME
#define QKV_NN_NAME "generic"
#endif

/* erf(x) for |x| <= 4 as x·P(x²)/Q(x²), a rational fit (weighted least
   squares, then Lawson iterations toward minimax relative error) made for
   this file: 2.5e-8 relative in exact arithmetic, within 4e-7 absolute in
   fp32 (so GELU is within 1.2e-6 absolute, the most near x = -5). Past
   |x| = 4, erf is ±1 to within 1.6e-8. Plain arithmetic on a clamped x, so
   the loop below vectorizes, which libm's erff does not. */
static inline float erf_rational(float x)
{
    x = x < -4.0f ? -4.0f : x > 4.0f ? 4.0f : x;
    float t = x * x;
    float p = 1.9867724653097436e-06f;
    p = p * t + 2.845671184340529e-04f;
    p = p * t + 3.8833974441678147e-03f;
    p = p * t + 5.310190734590701e-02f;
    p = p * t + 1.9354630612293072e-01f;
    p = p * t + 1.1283791392956413f;
    float q = 3.7420137338835844e-05f;
    q = q * t + 1.1855842072022835e-03f;
    q = q * t + 1.5207356876046756e-02f;
    q = q * t + 1.1535051186845674e-01f;
    q = q * t + 5.048585030825141e-01f;
    q = q * t + 1.0f;
    float e = x * p / q;
    return e < -1.0f ? -1.0f : e > 1.0f ? 1.0f : e;   /* GELU(x < 0) stays <= 0 */
}

static void gelu(float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = 0.5f * x[i] * (1.0f + erf_rational(x[i] * 0.70710678118654752f));
}

void QKV_NN_TABLE(qkv__nn_kernels *t)
{
    t->name = QKV_NN_NAME;
    t->gelu = gelu;
}
