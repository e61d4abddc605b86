/*
 * dispatch_nn.c — picks the element-wise kernels of the model layers to
 * match the attention kernel set a context runs (src/cpu/dispatch.c made
 * that choice from cpuid and QKV_ISA, so nothing is probed again here).
 */
#include "kernels_nn.h"

#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define QKV_X86 1
#endif

void qkv__nn_kernels_for(const char *isa, qkv__nn_kernels *t)
{
    qkv__nn_kernels_generic(t);
#ifdef QKV_X86
    if (isa && (strncmp(isa, "avx512", 6) == 0 || strncmp(isa, "amx", 3) == 0))
        qkv__nn_kernels_avx512(t);
    else if (isa && strcmp(isa, "avx2") == 0)
        qkv__nn_kernels_avx2(t);
#else
    (void)isa;
#endif
}
