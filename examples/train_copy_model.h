/*
 * train_copy_model.h — a one-layer attention model that learns to reverse
 * a sequence, trained with qkv_attention_forward / qkv_attention_backward
 * (see train_copy_model.c for the task, the model and the gradients).
 * Used by examples/train_copy.c and by the test suite (tests/test_train.c).
 */
#ifndef TRAIN_COPY_MODEL_H
#define TRAIN_COPY_MODEL_H

#include <qkv.h>
#include <stdint.h>

typedef struct {
    int      T, V;          /* sequence length, vocabulary size */
    int      d, heads;      /* model width, attention heads (d % heads == 0) */
    int      batch, steps;  /* sequences per step, optimizer steps */
    float    lr;            /* Adam learning rate */
    uint64_t seed;          /* initial weights and every batch */
    int      log_every;     /* print the loss every N steps; 0: silent */
    int      no_attn_grad;  /* ablation: drop the gradient through attention */
} tc_config;

typedef struct {
    double first_loss;      /* training loss of step 1 */
    double final_loss;      /* mean training loss of the last 10% of steps */
    double eval_loss;       /* on fresh sequences after training */
    double token_acc;       /* fraction of output tokens right */
    double seq_acc;         /* fraction of sequences entirely right */
    double seconds;         /* training wall time */
} tc_result;

/* T 8, V 10, d 32, 2 heads, batch 32, 400 steps, lr 3e-3, seed 1. */
tc_config tc_config_default(void);

/* Trains from cfg->seed and evaluates on 1024 fresh sequences. Returns
   QKV_OK, QKV_ERR_NOMEM, or the status of a failed attention call (the
   message is then in ctx). */
qkv_status tc_train(qkv_ctx *ctx, const tc_config *cfg, tc_result *res);

/* Checks the whole backward (hand-written layers and qkv_attention_backward)
   against central differences on one batch at cfg's initial weights: sets
   *worst to the largest, over the 8 parameter tensors, of
   max|analytic - numeric| / max|numeric|. */
qkv_status tc_grad_check(qkv_ctx *ctx, const tc_config *cfg, double *worst);

#endif /* TRAIN_COPY_MODEL_H */
