/*
 * tasks.c — the table that numbers a call's tasks across its sequences
 * (equal-length batches and packed varlen alike).
 */
#include "attn.h"

#include <stdlib.h>

/* units·ceil(len/rows) tasks per sequence, len its queries or its keys. */
static qkv_status tasks_make(qkv_ctx *ctx, const qkv__attn *a, int64_t units, int64_t rows,
                             int over_keys, qkv__tasks *t)
{
    t->n_seqs = a->n_seqs;
    t->start = malloc((size_t)(a->n_seqs + 1) * sizeof *t->start);
    if (!t->start)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "ctx: cannot allocate the task table");
    t->start[0] = 0;
    for (int64_t s = 0; s < a->n_seqs; s++) {
        qkv__seq sq = qkv__attn_seq(a, s);
        const int64_t len = over_keys ? sq.sk : sq.sq;
        t->start[s + 1] = t->start[s] + units * ((len + rows - 1) / rows);
    }
    t->total = t->start[a->n_seqs];
    return QKV_OK;
}

qkv_status qkv__tasks_make(qkv_ctx *ctx, const qkv__attn *a, int64_t units,
                           int64_t rows, qkv__tasks *t)
{
    return tasks_make(ctx, a, units, rows, 0, t);
}

qkv_status qkv__tasks_make_keys(qkv_ctx *ctx, const qkv__attn *a, int64_t units,
                                int64_t keys, qkv__tasks *t)
{
    return tasks_make(ctx, a, units, keys, 1, t);
}

void qkv__tasks_free(qkv__tasks *t)
{
    free(t->start);
    t->start = NULL;
}
