/* models.h — the model commands of the qkv tool (tools/models.c). */
#ifndef QKV_TOOLS_MODELS_H
#define QKV_TOOLS_MODELS_H

/* argv holds the arguments after the command name; returns the exit status. */
int qkv_cmd_embed(int argc, char **argv);
int qkv_cmd_recommend(int argc, char **argv);
int qkv_cmd_classify(int argc, char **argv);

#endif
