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
    /* the memory yardsticks: plausible for each loop, 0 for what is not
       one, the triad's the same as qkv_peak_bandwidth's */
    static const char *names[] = { "triad", "copy", "read" };
    for (int k = 0; k < 3; k++) {
        const double bw = qkv_memory_bandwidth(ctx, (qkv_stream)k);
        CHECK(bw > 0.05 && bw < 1e5, "qkv_memory_bandwidth(%s) = %g GB/s, not plausible",
              names[k], bw);
        t_note("%s: %.1f GB/s", names[k], bw);
    }
    CHECK(qkv_memory_bandwidth(NULL, QKV_STREAM_READ) == 0.0, "a NULL ctx must give 0");
    CHECK(qkv_memory_bandwidth(ctx, (qkv_stream)3) == 0.0 &&
          qkv_memory_bandwidth(ctx, (qkv_stream)-1) == 0.0, "an unknown loop must give 0");
    CHECK(qkv_peak_bandwidth(NULL) == 0.0, "qkv_peak_bandwidth(NULL) must be 0");
    const double tb = qkv_peak_bandwidth(ctx);
    CHECK(tb > 0.05 && tb < 1e5, "qkv_peak_bandwidth = %g GB/s, not plausible", tb);
    qkv_ctx_free(ctx);
}

/* qkv_alloc: alignment by size, every byte writable, 0 bytes and NULL. */
void test_api_alloc(void)
{
    CHECK(qkv_alloc(0) == NULL, "qkv_alloc(0) must be NULL");
    qkv_free(NULL);
    const size_t sizes[] = { 1, 63, 4096, (2u << 20) - 1, 2u << 20, (5u << 20) + 3 };
    for (size_t t = 0; t < sizeof sizes / sizeof *sizes; t++) {
        const size_t n = sizes[t];
        unsigned char *p = qkv_alloc(n);
        CHECK(p != NULL, "qkv_alloc(%zu) failed", n);
        if (!p)
            continue;
        const uintptr_t align = n >= (2u << 20) ? (2u << 20) : 64;
        CHECK((uintptr_t)p % align == 0, "qkv_alloc(%zu) = %p, not %zu-byte aligned", n,
              (void *)p, (size_t)align);
        for (size_t i = 0; i < n; i++)
            p[i] = (unsigned char)i;
        size_t bad = 0;
        for (size_t i = 0; i < n; i++)
            bad += p[i] != (unsigned char)i;
        CHECK(bad == 0, "qkv_alloc(%zu): %zu bytes did not read back", n, bad);
        qkv_free(p);
    }
}
