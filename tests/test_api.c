/*
 * test_api.c — small public calls not covered elsewhere.
 */
#include "test.h"

void test_api_peak(void)
{
    CHECK(qkv_peak_gflops(NULL) == 0.0, "qkv_peak_gflops(NULL) must be 0");
    qkv_ctx *ctx = qkv_ctx_create(2);
    double g = qkv_peak_gflops(ctx);
    CHECK(g > 0.1 && g < 1e6, "qkv_peak_gflops = %g, not a plausible ceiling", g);
    t_note("fp32 FMA ceiling with %s kernels, 2 threads: %.0f GFLOP/s", qkv_ctx_isa(ctx), g);
    qkv_ctx_free(ctx);
}
