/*
 * test_train.c — the attention backward end to end: trains the model of
 * examples/train_copy_model.c (reverse 8 tokens of a vocabulary of 10 with
 * one attention layer whose queries see only output positions, so only
 * attention can route each token) and checks that it learns.
 *
 * 1. The model's whole gradient (hand-written layers plus
 *    qkv_attention_backward) against central differences, per parameter
 *    tensor: a zeroed, negated or 1%-scaled dq, dk or dv fails this.
 * 2. 200 Adam steps from seed 1 (under a second): the training loss must
 *    start at chance, ln(10), and end below 0.05·ln(10); on 1024 fresh
 *    sequences token accuracy above 99% and sequence accuracy above 95%.
 * 3. The same run with the attention gradient dropped must stay far from
 *    those marks (the task needs attention), so 2 can fail.
 */
#include "test.h"
#include "../examples/train_copy_model.h"

#include <math.h>

void test_train_copy(void)
{
    qkv_ctx *ctx = qkv_ctx_create(1);
    CHECK(ctx != NULL, "qkv_ctx_create");
    if (!ctx)
        return;

    tc_config small = tc_config_default();
    small.T = 5; small.V = 7; small.d = 8; small.heads = 2; small.batch = 3;
    double worst = INFINITY;
    qkv_status st = tc_grad_check(ctx, &small, &worst);
    CHECK(st == QKV_OK, "tc_grad_check: %s: %s", qkv_status_string(st), qkv_ctx_last_error(ctx));
    CHECK(worst < 5e-3, "model gradient vs central differences: worst tensor error %.3g "
          "of its largest element (limit 5e-3)", worst);
    t_note("gradient check: worst tensor error %.2g of its largest element", worst);

    const tc_config cfg = { .T = 8, .V = 10, .d = 32, .heads = 2, .batch = 32, .steps = 200,
                            .lr = 3e-3f, .seed = 1 };
    const double chance = log(cfg.V);
    for (int ablate = 0; ablate <= 1; ablate++) {
        tc_config c = cfg;
        c.no_attn_grad = ablate;
        tc_result r;
        st = tc_train(ctx, &c, &r);
        CHECK(st == QKV_OK, "tc_train: %s: %s", qkv_status_string(st), qkv_ctx_last_error(ctx));
        if (st != QKV_OK)
            break;
        t_note("%s: loss %.4f -> %.5f in %d steps (%.2f s); fresh sequences: loss %.5f, "
               "tokens %.1f%%, sequences %.1f%%", ablate ? "no attention gradient" : "trained",
               r.first_loss, r.final_loss, c.steps, r.seconds, r.eval_loss,
               100 * r.token_acc, 100 * r.seq_acc);
        CHECK(fabs(r.first_loss - chance) < 0.1, "first loss %.4f, expected about ln(V) = %.4f",
              r.first_loss, chance);
        if (!ablate) {
            CHECK(r.final_loss < 0.05 * chance, "final training loss %.4f not below %.4f",
                  r.final_loss, 0.05 * chance);
            CHECK(r.eval_loss < 0.05 * chance, "eval loss %.4f not below %.4f",
                  r.eval_loss, 0.05 * chance);
            CHECK(r.token_acc > 0.99, "token accuracy %.4f not above 0.99", r.token_acc);
            CHECK(r.seq_acc > 0.95, "sequence accuracy %.4f not above 0.95", r.seq_acc);
        } else {
            CHECK(r.eval_loss > 0.5 * chance && r.token_acc < 0.6,
                  "without the attention gradient the model should not learn the task: "
                  "eval loss %.4f, token accuracy %.4f", r.eval_loss, r.token_acc);
        }
    }
    qkv_ctx_free(ctx);
}
