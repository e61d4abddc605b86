/* models.h — the model commands of the qkv tool (tools/models.c,
   tools/generate.c, tools/demo.c). */
#ifndef QKV_TOOLS_MODELS_H
#define QKV_TOOLS_MODELS_H

#include <qkv.h>

/* argv holds the arguments after the command name; returns the exit status. */
int qkv_cmd_embed(int argc, char **argv);
int qkv_cmd_recommend(int argc, char **argv);
int qkv_cmd_classify(int argc, char **argv);
int qkv_cmd_generate(int argc, char **argv);
int qkv_cmd_convert_llama(int argc, char **argv);
int qkv_cmd_demo(int argc, char **argv);

/* The generation loop of `qkv generate` and `qkv demo`. */
typedef struct {
    int64_t          steps;      /* positions per text, prompt included (0: context) */
    int              batch;      /* sequences in flight at once */
    int              stream;     /* print the (single) text piece by piece */
    int              print_ids;  /* print ids instead of text */
    qkv_sampler_opts sampler;    /* one sampler per prompt, each with this seed */
    qkv_gen_opts     gen;        /* max_seqs is set from batch */
} qkv_generate_opts;

typedef struct {
    int64_t       prompt_tokens, generated;
    double        wall_s;        /* the whole loop */
    qkv_gen_stats stats;
    char        **texts_out;     /* set by the caller: receives each text (malloc'd) */
} qkv_generate_result;

qkv_generate_opts qkv_generate_defaults(void);
/* Generates from prompts[0 .. n) and prints them; returns an exit status
   (0, or 1/2 after printing the error). res->texts_out, when the caller
   sets it (before the call, through a result whose other fields the call
   fills), gets the texts. */
int  qkv_generate_run(qkv_ctx *ctx, qkv_model *m, const char *const *prompts, int n,
                      const qkv_generate_opts *o, qkv_generate_result *res);
/* "prompt: N tokens, X tok/s; generated: M tokens, Y tok/s" on stderr,
   with the time split when verbose, and a JSON line when json. */
void qkv_generate_report(const qkv_generate_result *r, int verbose, int json);

#endif
