/*
 * train_copy.c — trains a one-layer attention model to reverse sequences
 * of 8 tokens (vocabulary 10), with qkv's attention forward and backward
 * and hand-written gradients for the rest; the model, the task and the
 * backward are in train_copy_model.c. Prints the loss as it falls from
 * ln(10) = 2.30 and the accuracy on fresh sequences.
 *
 *   build/train_copy [steps] [seed]
 */
#include "train_copy_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    tc_config cfg = tc_config_default();
    if (argc > 1) cfg.steps = atoi(argv[1]);
    if (argc > 2) cfg.seed = strtoull(argv[2], NULL, 10);
    cfg.log_every = cfg.steps >= 10 ? cfg.steps / 10 : 1;
    if (cfg.steps < 1) {
        fprintf(stderr, "usage: train_copy [steps >= 1] [seed]\n");
        return 2;
    }
    qkv_ctx *ctx = qkv_ctx_create(1);   /* the problem is tiny: one thread */
    if (!ctx) {
        fprintf(stderr, "train_copy: no qkv context\n");
        return 1;
    }
    printf("reverse %d tokens of %d: %d heads, d %d, batch %d, Adam lr %g, seed %llu; "
           "uniform guess: loss %.4f\n", cfg.T, cfg.V, cfg.heads, cfg.d, cfg.batch,
           cfg.lr, (unsigned long long)cfg.seed, log((double)cfg.V));
    tc_result r;
    qkv_status st = tc_train(ctx, &cfg, &r);
    if (st != QKV_OK) {
        fprintf(stderr, "train_copy: %s: %s\n", qkv_status_string(st), qkv_ctx_last_error(ctx));
        qkv_ctx_free(ctx);
        return 1;
    }
    printf("%d steps in %.2f s; on 1024 fresh sequences: loss %.4f, "
           "token accuracy %.2f%%, sequence accuracy %.2f%%\n", cfg.steps, r.seconds,
           r.eval_loss, 100 * r.token_acc, 100 * r.seq_acc);
    qkv_ctx_free(ctx);
    return r.token_acc > 0.95 ? 0 : 1;
}
