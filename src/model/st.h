/*
 * st.h — what the model files share: the safetensors reader, config.json
 * access through cJSON, and the weight loader built on both.
 *
 * Every size, offset and shape read from a file is checked against the
 * file before it is used; a malformed file is refused with QKV_ERR_FORMAT
 * and a message naming the field, never trusted.
 */
#ifndef QKV_MODEL_ST_H
#define QKV_MODEL_ST_H

#include "../core/internal.h"

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

/* ---- safetensors (safetensors.c) ----------------------------------------- */

enum { QKV__ST_MAX_DIMS = 8 };

/* the element types a safetensors header may name */
typedef enum {
    QKV__ST_F32, QKV__ST_F16, QKV__ST_BF16, QKV__ST_F64,
    QKV__ST_I64, QKV__ST_I32, QKV__ST_I16, QKV__ST_I8,
    QKV__ST_U64, QKV__ST_U32, QKV__ST_U16, QKV__ST_U8, QKV__ST_BOOL,
    QKV__ST_F8_E4M3, QKV__ST_F8_E5M2
} qkv__st_dtype;

typedef struct {
    char           *name;
    qkv__st_dtype   dtype;
    int             ndim;
    int64_t         shape[QKV__ST_MAX_DIMS];
    const unsigned char *data;     /* inside the mapped file */
    size_t          nbytes;        /* == product(shape) * element size */
} qkv__st_tensor;

typedef struct {
    void           *map;           /* the mapping (NULL for a caller buffer) */
    size_t          map_size;
    qkv__st_tensor *t;
    int             n;
} qkv__st;

/* Parses a safetensors image of `size` bytes at buf (kept by reference:
   buf must outlive st). QKV_ERR_FORMAT with a message for any malformed
   field; st is empty then. */
qkv_status qkv__st_parse(qkv_ctx *ctx, const void *buf, size_t size, qkv__st *st);
/* Maps the file read-only and parses it. QKV_ERR_IO when it cannot be
   opened or mapped. */
qkv_status qkv__st_open(qkv_ctx *ctx, const char *path, qkv__st *st);
/* qkv__st_open on dir/model.safetensors. */
qkv_status qkv__st_open_dir(qkv_ctx *ctx, const char *dir, qkv__st *st);
void       qkv__st_close(qkv__st *st);
const qkv__st_tensor *qkv__st_find(const qkv__st *st, const char *name);

/* Copies tensor `name` into a new fp32 array (F32, F16 or BF16 in the
   file) after checking that its shape is exactly shape[0..ndim).
   QKV_ERR_FORMAT when it is missing, of another dtype or shape. */
qkv_status qkv__st_load(qkv_ctx *ctx, const qkv__st *st, const char *name,
                        int ndim, const int64_t *shape, float **out);

/* ---- config.json (config.c) ----------------------------------------------- */

/* Parses len bytes of JSON text; NULL when it is not one JSON value
   followed by nothing but white space (*error_at: where it went wrong). */
cJSON *qkv__json_parse(const char *buf, size_t len, size_t *error_at);
/* Reads a whole regular file of at most max bytes into a malloc'd,
   NUL-terminated buffer. QKV_ERR_IO / QKV_ERR_FORMAT (too large). */
qkv_status qkv__read_file(qkv_ctx *ctx, const char *path, size_t max, char **buf,
                          size_t *len);
/* Reads and parses a JSON file (at most 16 MiB). QKV_ERR_IO / _FORMAT. */
qkv_status qkv__json_read(qkv_ctx *ctx, const char *path, cJSON **out);
/* Reads dir/name like qkv__json_read, arrays allowed too; a file that
   does not exist gives QKV_OK and *out NULL. */
qkv_status qkv__json_read_optional(qkv_ctx *ctx, const char *dir, const char *name,
                                   cJSON **out);
/* A boolean member; absent or null gives def. QKV_ERR_FORMAT otherwise. */
qkv_status qkv__json_bool(qkv_ctx *ctx, const cJSON *obj, const char *file,
                          const char *key, int def, int *out);
/* An integer member in [lo, hi]; QKV_ERR_FORMAT when absent, not an
   integer or out of range (the message names file and key). */
qkv_status qkv__json_int(qkv_ctx *ctx, const cJSON *obj, const char *file,
                         const char *key, int64_t lo, int64_t hi, int64_t *out);
/* A finite number member in [lo, hi]; absent gives def when has_def. */
qkv_status qkv__json_num(qkv_ctx *ctx, const cJSON *obj, const char *file,
                         const char *key, double lo, double hi, int has_def,
                         double def, double *out);
/* A string member, or NULL when absent / not a string. */
const char *qkv__json_str(const cJSON *obj, const char *key);

/* path = dir + "/" + name into buf; QKV_ERR_ARG when it does not fit. */
qkv_status qkv__path_join(qkv_ctx *ctx, char *buf, size_t cap, const char *dir,
                          const char *name);

#endif /* QKV_MODEL_ST_H */
