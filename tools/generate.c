/*
 * generate.c — text generation from the shell (declared in models.h):
 *
 *   qkv generate -m MODEL [-z TOKENIZER] -p PROMPT... | -b FILE  [options]
 *   qkv convert-llama IN OUTDIR [-z TOKENIZER]
 *
 * and qkv_generate_run, the generation loop `qkv demo` shares. A thin
 * shell over qkv_gen and qkv_sampler: prompts are added as sequences
 * while there is room (continuous batching), every step samples each
 * sequence's next token, and a sequence ends at BOS/EOS or at -n
 * positions, counted as llama2.c counts them (prompt included).
 */
#include "models.h"

#include <qkv.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* One prompt's text as it grows. */
typedef struct {
    const char  *prompt;
    int32_t     *ids;          /* prompt ids, then the generated ones */
    int64_t      n_prompt, n_ids;
    char        *out;          /* prompt + continuation */
    size_t       out_len, out_cap;
    qkv_sampler *smp;
    int32_t      seq;
    int          state;        /* 0 waiting, 1 running, 2 done */
} job;

static int out_append(job *j, const char *p, size_t n)
{
    if (j->out_len + n + 1 > j->out_cap) {
        size_t cap = (j->out_len + n + 1) * 2;
        char *o = realloc(j->out, cap);
        if (!o)
            return 0;
        j->out = o;
        j->out_cap = cap;
    }
    memcpy(j->out + j->out_len, p, n);
    j->out_len += n;
    j->out[j->out_len] = '\0';
    return 1;
}

qkv_generate_opts qkv_generate_defaults(void)
{
    qkv_generate_opts o;
    memset(&o, 0, sizeof o);
    o.steps = 256;
    o.sampler = qkv_sampler_opts_default();
    o.gen = qkv_gen_opts_default();
    o.batch = 32;
    return o;
}

/* Prints finished outputs in prompt order from *next_print on. */
static void print_ready(const qkv_generate_opts *o, job *jobs, int n, int *next_print)
{
    while (*next_print < n && jobs[*next_print].state == 2) {
        const job *j = &jobs[(*next_print)++];
        if (o->print_ids) {
            for (int64_t i = 0; i < j->n_ids; i++)
                printf(i ? " %d" : "%d", j->ids[i]);
            printf("\n");
        } else if (!o->stream) {
            fwrite(j->out, 1, j->out_len, stdout);
            printf(n > 1 ? "\n\n" : "\n");
        }
        fflush(stdout);
    }
}

int qkv_generate_run(qkv_ctx *ctx, qkv_model *m, const char *const *prompts, int n,
                     const qkv_generate_opts *o, qkv_generate_result *res)
{
    char **texts_out = res->texts_out;
    memset(res, 0, sizeof *res);
    res->texts_out = texts_out;
    const int64_t ctx_len = qkv_model_max_tokens(m), V = qkv_model_dim(m);
    int64_t steps = o->steps <= 0 || o->steps > ctx_len ? ctx_len : o->steps;
    job *jobs = calloc((size_t)n, sizeof *jobs);
    int rc = jobs ? 0 : 1;
    /* every prompt tokenized and checked before anything runs */
    for (int i = 0; rc == 0 && i < n; i++) {
        job *j = &jobs[i];
        j->prompt = prompts[i];
        if (!prompts[i][0]) {
            fprintf(stderr, "qkv generate: prompt %d is empty (give text to continue)\n", i + 1);
            rc = 2;
            break;
        }
        int64_t need = 0;
        int32_t one;
        qkv_status s = qkv_model_tokenize(ctx, m, prompts[i], &one, 0, &need);
        j->ids = s == QKV_ERR_SHAPE ? malloc((size_t)(need + steps + 2) * sizeof(int32_t)) : NULL;
        if (!j->ids || qkv_model_tokenize(ctx, m, prompts[i], j->ids, need, &j->n_prompt)) {
            fprintf(stderr, "qkv generate: prompt %d: %s\n", i + 1,
                    j->ids ? qkv_ctx_last_error(ctx) : "out of memory");
            rc = 1;
            break;
        }
        j->n_ids = j->n_prompt;
        if (j->n_prompt > ctx_len || j->n_prompt > steps) {
            fprintf(stderr, "qkv generate: prompt %d is %lld tokens, longer than %s %lld\n",
                    i + 1, (long long)j->n_prompt,
                    j->n_prompt > ctx_len ? "the model's context of" : "-n",
                    (long long)(j->n_prompt > ctx_len ? ctx_len : steps));
            rc = 2;
            break;
        }
        if (!out_append(j, prompts[i], strlen(prompts[i])) ||
            qkv_sampler_create(ctx, &o->sampler, &j->smp) != QKV_OK) {
            fprintf(stderr, "qkv generate: %s\n", qkv_ctx_last_error(ctx));
            rc = 1;
            break;
        }
    }
    qkv_gen_opts go = o->gen;
    go.max_seqs = n < o->batch ? n : o->batch;
    qkv_gen *g = NULL;
    if (rc == 0 && qkv_gen_create(ctx, m, &go, &g) != QKV_OK) {
        fprintf(stderr, "qkv generate: %s\n", qkv_ctx_last_error(ctx));
        rc = 1;
    }
    if (rc == 0 && o->stream) {
        fwrite(jobs[0].out, 1, jobs[0].out_len, stdout);
        fflush(stdout);
    }
    int next_add = 0, active = 0, finished = 0, next_print = 0;
    const double t0 = now_s();
    while (rc == 0 && finished < n) {
        while (active < go.max_seqs && next_add < n) {
            job *j = &jobs[next_add++];
            if (qkv_gen_add(g, j->ids, j->n_prompt, &j->seq) != QKV_OK) {
                fprintf(stderr, "qkv generate: %s\n", qkv_ctx_last_error(ctx));
                rc = 1;
                break;
            }
            j->state = 1;
            active++;
        }
        if (rc || qkv_gen_step(g) != QKV_OK) {
            if (!rc)
                fprintf(stderr, "qkv generate: %s\n", qkv_ctx_last_error(ctx));
            rc = 1;
            break;
        }
        for (int i = 0; rc == 0 && i < n; i++) {
            job *j = &jobs[i];
            if (j->state != 1)
                continue;
            int32_t next;
            if (qkv_sampler_sample(ctx, j->smp, qkv_gen_logits(g, j->seq), V, &next) != QKV_OK) {
                fprintf(stderr, "qkv generate: %s\n", qkv_ctx_last_error(ctx));
                rc = 1;
                break;
            }
            int done = qkv_model_is_stop(m, next);
            if (!done) {
                int64_t len;
                const char *piece = qkv_model_piece(m, j->ids[j->n_ids - 1], next, &len);
                j->ids[j->n_ids++] = next;
                res->generated++;
                if (!out_append(j, piece, (size_t)len)) {
                    fprintf(stderr, "qkv generate: out of memory\n");
                    rc = 1;
                    break;
                }
                if (o->stream) {
                    fwrite(piece, 1, (size_t)len, stdout);
                    fflush(stdout);
                }
                done = qkv_gen_length(g, j->seq) >= steps;
                if (!done && qkv_gen_feed(g, j->seq, &next, 1) != QKV_OK) {
                    fprintf(stderr, "qkv generate: %s\n", qkv_ctx_last_error(ctx));
                    rc = 1;
                    break;
                }
            }
            if (done) {
                qkv_gen_remove(g, j->seq);
                j->state = 2;
                active--;
                finished++;
            }
        }
        print_ready(o, jobs, n, &next_print);
    }
    res->wall_s = now_s() - t0;
    if (rc == 0 && o->stream && !o->print_ids)
        printf("\n");
    if (g)
        qkv_gen_get_stats(g, &res->stats);
    for (int i = 0; i < n; i++)
        res->prompt_tokens += jobs[i].n_prompt;
    if (res->texts_out && rc == 0)
        for (int i = 0; i < n; i++) {
            res->texts_out[i] = jobs[i].out;
            jobs[i].out = NULL;
        }
    for (int i = 0; jobs && i < n; i++) {
        free(jobs[i].ids);
        free(jobs[i].out);
        qkv_sampler_free(jobs[i].smp);
    }
    free(jobs);
    qkv_gen_free(g);
    return rc;
}

void qkv_generate_report(const qkv_generate_result *r, int verbose, int json)
{
    const qkv_gen_stats *s = &r->stats;
    const double gen_s = r->wall_s - s->prefill_s;
    fprintf(stderr, "prompt: %lld tokens, %.0f tok/s; generated: %lld tokens, %.0f tok/s\n",
            (long long)r->prompt_tokens, s->prefill_s > 0 ? (double)s->prefill_tokens / s->prefill_s : 0.0,
            (long long)r->generated, gen_s > 0 ? (double)r->generated / gen_s : 0.0);
    if (verbose)
        fprintf(stderr, "time: %.3f s in all; of the forward's %.3f thread-seconds, %.1f %% in "
                "attention (KV appends and kernels), %.1f %% in the rest (matrix products, "
                "norms, RoPE, SwiGLU); %lld steps\n", r->wall_s, s->compute_s,
                s->compute_s > 0 ? 100.0 * s->attention_s / s->compute_s : 0.0,
                s->compute_s > 0 ? 100.0 * (1.0 - s->attention_s / s->compute_s) : 0.0,
                (long long)s->steps);
    if (json)
        fprintf(stderr, "{\"prompt_tokens\": %lld, \"generated\": %lld, \"wall_s\": %.6f, "
                "\"prefill_s\": %.6f, \"decode_s\": %.6f, \"compute_s\": %.6f, "
                "\"attention_s\": %.6f, \"steps\": %lld, \"decode_tokens\": %lld}\n",
                (long long)r->prompt_tokens, (long long)r->generated, r->wall_s, s->prefill_s,
                s->decode_s, s->compute_s, s->attention_s, (long long)s->steps,
                (long long)s->decode_tokens);
}

static const char *gen_usage =
"usage: qkv generate -m MODEL [-z TOKENIZER] (-p PROMPT ... | -b FILE) [options]\n"
"  -m, --model PATH    a llama2.c checkpoint (.bin) or a Llama safetensors folder\n"
"  -z, --tokenizer F   the llama2.c tokenizer (default: the one beside the model)\n"
"  -p, --prompt TEXT   a prompt (repeat for several, generated together)\n"
"  -b, --batch-file F  one prompt per line\n"
"  -n, --steps N       positions per text, prompt included (default 256, 0: the context)\n"
"  -t, --temperature T 0 is greedy (default 1.0)\n"
"  -k, --top-k K       sample from the K most likely tokens (default 0: all)\n"
"  -P, --top-p P       sample from the smallest set of likely tokens of probability P\n"
"                      (default 0.9; 1: all)\n"
"  -s, --seed S        the sampler's seed (default: the time)\n"
"      --batch N       sequences in flight at once (default 32)\n"
"      --threads N     threads (default: one per core)\n"
"      --kv TYPE       KV cache elements: f32 (default), f16, bf16, i8\n"
"      --block N       KV cache block size, a power of two from 8 to 256 (default 16)\n"
"      --ids           print token ids instead of text\n"
"  -v, --verbose       where the time went (attention and the rest)\n"
"      --json          the counters as one JSON line on stderr\n"
"One prompt streams its text as it is made; several print each text when done,\n"
"in prompt order. Timing on stderr.\n";

/* Reads the lines of path (without their newlines) into a NULL-ended array. */
static char **read_lines(const char *path, int *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char **lines = NULL, *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int cnt = 0;
    while ((len = getline(&line, &cap, f)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        char **l = realloc(lines, (size_t)(cnt + 2) * sizeof *l);
        if (!l)
            break;
        lines = l;
        lines[cnt++] = line;
        lines[cnt] = NULL;
        line = NULL;
        cap = 0;
    }
    free(line);
    fclose(f);
    *n = cnt;
    return lines;
}

int qkv_cmd_generate(int argc, char **argv)
{
    const char *model = NULL, *tok = NULL, *file = NULL;
    const char **prompts = calloc((size_t)argc + 1, sizeof *prompts);
    int n_prompts = 0, threads = 0, verbose = 0, json = 0, seed_given = 0;
    qkv_generate_opts o = qkv_generate_defaults();
    o.sampler.top_p = 0.9f;
    for (int i = 0; prompts && i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
#define IS(s, l) (!strcmp(a, s) || !strcmp(a, l))
        if (IS("-v", "--verbose")) { verbose = 1; continue; }
        if (!strcmp(a, "--json")) { json = 1; continue; }
        if (!strcmp(a, "--ids")) { o.print_ids = 1; continue; }
        if (!v) {
            fprintf(stderr, "qkv generate: %s needs a value\n\n%s", a, gen_usage);
            free(prompts);
            return 2;
        }
        i++;
        if (IS("-m", "--model")) model = v;
        else if (IS("-z", "--tokenizer")) tok = v;
        else if (IS("-p", "--prompt")) prompts[n_prompts++] = v;
        else if (IS("-b", "--batch-file")) file = v;
        else if (IS("-n", "--steps")) o.steps = strtoll(v, &end, 10);
        else if (IS("-t", "--temperature")) o.sampler.temperature = strtof(v, &end);
        else if (IS("-k", "--top-k")) o.sampler.top_k = strtoll(v, &end, 10);
        else if (IS("-P", "--top-p")) o.sampler.top_p = strtof(v, &end);
        else if (IS("-s", "--seed")) { o.sampler.seed = strtoull(v, &end, 10); seed_given = 1; }
        else if (!strcmp(a, "--batch")) o.batch = strtol(v, &end, 10);
        else if (!strcmp(a, "--threads")) threads = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--block")) o.gen.block_size = strtoll(v, &end, 10);
        else if (!strcmp(a, "--kv")) {
            static const struct { const char *name; qkv_kv_dtype dt; } kv[] = {
                { "f32", QKV_KV_F32 }, { "f16", QKV_KV_F16 }, { "bf16", QKV_KV_BF16 },
                { "i8", QKV_KV_I8 } };
            int found = 0;
            for (size_t k = 0; k < sizeof kv / sizeof kv[0]; k++)
                if (!strcmp(v, kv[k].name)) {
                    o.gen.kv_dtype = kv[k].dt;
                    found = 1;
                }
            if (!found) {
                fprintf(stderr, "qkv generate: --kv wants f32, f16, bf16 or i8\n");
                free(prompts);
                return 2;
            }
        } else {
            fprintf(stderr, "qkv generate: unknown option '%s'\n\n%s", a, gen_usage);
            free(prompts);
            return 2;
        }
#undef IS
        if (end && (*end || end == v)) {
            fprintf(stderr, "qkv generate: %s: '%s' is not a number\n", a, v);
            free(prompts);
            return 2;
        }
    }
    if (!prompts || !model || (n_prompts == 0) == !file || o.batch < 1 || threads < 0) {
        fprintf(stderr, "%s", gen_usage);
        free(prompts);
        return 2;
    }
    const char *bad = !(o.sampler.temperature >= 0.0f) || isinf(o.sampler.temperature)
                          ? "-t: the temperature must be >= 0"
                    : o.sampler.top_k < 0 ? "-k: top-k must be >= 0"
                    : !(o.sampler.top_p > 0.0f && o.sampler.top_p <= 1.0f)
                          ? "-P: top-p must be in (0, 1]"
                    : o.steps < 0 ? "-n: the positions must be >= 0 (0: the model's context)"
                    : NULL;
    if (bad) {
        fprintf(stderr, "qkv generate: %s\n", bad);
        free(prompts);
        return 2;
    }
    char **lines = NULL;
    if (file) {
        lines = read_lines(file, &n_prompts);
        if (!lines) {
            fprintf(stderr, "qkv generate: cannot read prompts from '%s'\n", file);
            free(prompts);
            return 1;
        }
    }
    if (!seed_given)
        o.sampler.seed = (uint64_t)time(NULL);
    o.stream = n_prompts == 1 && !o.print_ids;
    qkv_ctx *ctx = qkv_ctx_create(threads);
    qkv_model *m = NULL;
    int rc = 1;
    if (!ctx) {
        fprintf(stderr, "qkv generate: cannot create a context\n");
    } else if (qkv_model_load_llama(ctx, model, tok, &m) != QKV_OK) {
        fprintf(stderr, "qkv generate: %s\n", qkv_ctx_last_error(ctx));
    } else {
        qkv_generate_result r;
        rc = qkv_generate_run(ctx, m, lines ? (const char *const *)lines : prompts, n_prompts,
                              &o, &r);
        if (rc == 0)
            qkv_generate_report(&r, verbose, json);
    }
    for (int i = 0; lines && lines[i]; i++)
        free(lines[i]);
    free(lines);
    free(prompts);
    qkv_model_free(m);
    qkv_ctx_free(ctx);
    return rc;
}

int qkv_cmd_convert_llama(int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *tok = NULL;
    int extra = 0;
    for (int i = 0; i < argc; i++) {
        if ((!strcmp(argv[i], "-z") || !strcmp(argv[i], "--tokenizer")) && i + 1 < argc)
            tok = argv[++i];
        else if (!in)
            in = argv[i];
        else if (!out)
            out = argv[i];
        else
            extra = 1;
    }
    if (!in || !out || extra) {
        fprintf(stderr, "usage: qkv convert-llama CHECKPOINT OUTDIR [-z TOKENIZER]\n"
                "  writes a Hugging Face Llama folder (config.json, model.safetensors in\n"
                "  F32, tokenizer.bin) from a llama2.c checkpoint (or another Llama folder)\n");
        return 2;
    }
    qkv_ctx *ctx = qkv_ctx_create(1);
    qkv_model *m = NULL;
    int rc = 1;
    if (ctx && qkv_model_load_llama(ctx, in, tok, &m) == QKV_OK &&
        qkv_model_export(ctx, m, out) == QKV_OK) {
        fprintf(stderr, "wrote %s/config.json, model.safetensors and tokenizer.bin\n", out);
        rc = 0;
    } else {
        fprintf(stderr, "qkv convert-llama: %s\n", ctx ? qkv_ctx_last_error(ctx) : "no context");
    }
    qkv_model_free(m);
    qkv_ctx_free(ctx);
    return rc;
}
