/*
 * alloc.c — memory for caches and other large tensors: aligned, and on
 * Linux advised for transparent huge pages, which decoding reads faster
 * (one TLB entry per 2 MiB instead of 512).
 */
#define _DEFAULT_SOURCE   /* madvise */
#include "internal.h"

#include <stdlib.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

enum { HUGE_PAGE = 2 << 20, LINE = 64 };

void *qkv_alloc(size_t bytes)
{
    if (bytes == 0)
        return NULL;
    const size_t align = bytes >= HUGE_PAGE ? HUGE_PAGE : LINE;
    void *p = NULL;
    if (posix_memalign(&p, align, bytes))
        return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    /* advice only: where huge pages are off it fails and nothing changes */
    if (align == HUGE_PAGE)
        (void)madvise(p, bytes / HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE);
#endif
    return p;
}

void qkv_free(void *p)
{
    free(p);
}
