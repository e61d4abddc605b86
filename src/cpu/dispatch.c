/*
 * dispatch.c — picks the micro-kernel set at run time. The tables are filled
 * once: what the CPU reports through cpuid, checked against what the OS
 * saves on a context switch (XCR0), then the QKV_ISA environment override.
 * This is the only file that knows which processor it runs on.
 */
#include "kernels.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define QKV_X86 1
#endif
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

enum { ISA_GENERIC, ISA_AVX2, ISA_AVX512, ISA_AVX512BF16, ISA_AMX_EMU, ISA_AMX, ISA_COUNT };
static const char *const isa_names[ISA_COUNT] = {
    "generic", "avx2", "avx512", "avx512bf16", "amx-emu", "amx"
};
/* never the default: the emulated AMX set is for tests */
static const int manual_only[ISA_COUNT] = { [ISA_AMX_EMU] = 1 };

static qkv__kernels tables[ISA_COUNT];
static int supported[ISA_COUNT];
static int best;
static pthread_once_t once = PTHREAD_ONCE_INIT;

#ifdef QKV_X86
static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* Linux hands out the 8 KiB of tile state only to processes that ask. */
static int amx_permitted(void)
{
#if defined(__linux__) && defined(SYS_arch_prctl)
    enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;
#endif
}

static void detect(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return;
    int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx)
        return;
    uint64_t xcr0 = xgetbv0();
    int ymm_os = (xcr0 & 0x6) == 0x6;             /* SSE + AVX state */
    int zmm_os = ymm_os && (xcr0 & 0xe0) == 0xe0; /* opmask + ZMM state */
    if (__get_cpuid_max(0, NULL) < 7)
        return;
    __cpuid_count(7, 0, a, b, c, d);
    unsigned max_subleaf = a, edx7 = d, ecx7 = c;
    int avx2 = (b >> 5) & 1;
    int avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1;
    int avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    supported[ISA_AVX2] = ymm_os && avx2 && fma;
    supported[ISA_AVX512] = supported[ISA_AVX2] && zmm_os && avx512f &&
                            avx512dq && avx512bw && avx512vl;
    int avx512bf16 = 0;
    if (max_subleaf >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        avx512bf16 = (a >> 5) & 1;
    }
    /* the bf16 sets also use AVX512-VNNI (int8 caches), which every CPU
       with AVX512-BF16 has */
    const int avx512vnni = (ecx7 >> 11) & 1;
    supported[ISA_AVX512BF16] = supported[ISA_AVX512] && avx512bf16 && avx512vnni;
    supported[ISA_AMX_EMU] = supported[ISA_AVX512BF16];
    int amx_bf16 = (edx7 >> 22) & 1, amx_tile = (edx7 >> 24) & 1;
    int tiles_os = (xcr0 & 0x60000) == 0x60000;   /* XTILECFG + XTILEDATA */
    supported[ISA_AMX] = supported[ISA_AVX512BF16] && amx_bf16 && amx_tile && tiles_os &&
                         amx_permitted();
}
#endif

/* The table fillers are compiled with their set's flags, and the
   compiler may use that set's instructions in them too (storing the
   function pointers with 512-bit moves, say): only a set the CPU runs
   may fill its table. */
static void init(void)
{
    qkv__kernels_generic(&tables[ISA_GENERIC]);
    supported[ISA_GENERIC] = 1;
#ifdef QKV_X86
    static void (*const fill[ISA_COUNT])(qkv__kernels *) = {
        [ISA_AVX2] = qkv__kernels_avx2,       [ISA_AVX512] = qkv__kernels_avx512,
        [ISA_AVX512BF16] = qkv__kernels_avx512bf16, [ISA_AMX_EMU] = qkv__kernels_amx_emu,
        [ISA_AMX] = qkv__kernels_amx,
    };
    detect();
    for (int i = 0; i < ISA_COUNT; i++)
        if (fill[i] && supported[i])
            fill[i](&tables[i]);
#endif
    best = ISA_GENERIC;
    for (int i = 0; i < ISA_COUNT; i++)
        if (supported[i] && !manual_only[i])
            best = i;
    const char *env = getenv("QKV_ISA");
    if (env && *env)
        for (int i = 0; i < ISA_COUNT; i++)
            if (strcmp(env, isa_names[i]) == 0 && supported[i])
                best = i;
}

const qkv__kernels *qkv__kernels_default(void)
{
    pthread_once(&once, init);
    return &tables[best];
}

const char *qkv__kernels_name(int i)
{
    return i >= 0 && i < ISA_COUNT ? isa_names[i] : NULL;
}

const qkv__kernels *qkv__kernels_by_name(const char *name, int *known)
{
    pthread_once(&once, init);
    *known = 0;
    for (int i = 0; name && i < ISA_COUNT; i++)
        if (strcmp(name, isa_names[i]) == 0) {
            *known = 1;
            return supported[i] ? &tables[i] : NULL;
        }
    return NULL;
}
