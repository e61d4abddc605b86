/*
 * config.c — config.json and the other small JSON files of a model folder,
 * read through cJSON, with typed, range-checked member access so that a
 * wrong or hostile config is refused before any size derived from it is
 * used.
 */
#include "st.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

enum { MAX_JSON = 16 << 20 };

cJSON *qkv__json_parse(const char *buf, size_t len, size_t *error_at)
{
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(buf, len, &end, 0);
    size_t at = end && end >= buf && end <= buf + len ? (size_t)(end - buf) : 0;
    if (j) {   /* only white space may follow the value */
        while (at < len && (buf[at] == ' ' || buf[at] == '\t' || buf[at] == '\n' ||
                            buf[at] == '\r'))
            at++;
        if (at < len) {
            cJSON_Delete(j);
            j = NULL;
        }
    }
    *error_at = at;
    return j;
}

qkv_status qkv__path_join(qkv_ctx *ctx, char *buf, size_t cap, const char *dir,
                          const char *name)
{
    int n = snprintf(buf, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap)
        return qkv__fail(ctx, QKV_ERR_ARG, "path '%s/%s' is too long", dir, name);
    return QKV_OK;
}

qkv_status qkv__read_file(qkv_ctx *ctx, const char *path, size_t max, char **buf,
                          size_t *len)
{
    *buf = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return qkv__fail(ctx, QKV_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return qkv__fail(ctx, QKV_ERR_IO, "'%s' is not a regular file", path);
    }
    if ((uint64_t)sb.st_size > max) {
        fclose(f);
        return qkv__fail(ctx, QKV_ERR_FORMAT, "'%s' is larger than %zu bytes", path, max);
    }
    size_t n = (size_t)sb.st_size;
    char *b = malloc(n + 1);
    if (!b) {
        fclose(f);
        return qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory reading '%s'", path);
    }
    size_t got = fread(b, 1, n, f);
    int err = ferror(f);
    fclose(f);
    if (err || got != n) {
        free(b);
        return qkv__fail(ctx, QKV_ERR_IO, "cannot read '%s'", path);
    }
    b[n] = '\0';
    *buf = b;
    *len = n;
    return QKV_OK;
}

/* The JSON file at path: an object, or also an array when arrays are allowed. */
static qkv_status read_json(qkv_ctx *ctx, const char *path, int allow_array, cJSON **out)
{
    *out = NULL;
    char *buf;
    size_t n;
    qkv_status s = qkv__read_file(ctx, path, MAX_JSON, &buf, &n);
    if (s != QKV_OK)
        return s;
    size_t at;
    cJSON *j = qkv__json_parse(buf, n, &at);
    if (!j || !(cJSON_IsObject(j) || (allow_array && cJSON_IsArray(j)))) {
        cJSON_Delete(j);
        free(buf);
        return qkv__fail(ctx, QKV_ERR_FORMAT, "'%s' is not a JSON %s (error near byte %zu)",
                         path, allow_array ? "object or array" : "object", at);
    }
    free(buf);
    *out = j;
    return QKV_OK;
}

qkv_status qkv__json_read(qkv_ctx *ctx, const char *path, cJSON **out)
{
    return read_json(ctx, path, 0, out);
}

qkv_status qkv__json_read_optional(qkv_ctx *ctx, const char *dir, const char *name,
                                  cJSON **out)
{
    char path[4096];
    struct stat sb;
    *out = NULL;
    qkv_status s = qkv__path_join(ctx, path, sizeof path, dir, name);
    if (s != QKV_OK || (stat(path, &sb) != 0 && errno == ENOENT))
        return s;
    return read_json(ctx, path, 1, out);
}

qkv_status qkv__json_bool(qkv_ctx *ctx, const cJSON *obj, const char *file,
                          const char *key, int def, int *out)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j || cJSON_IsNull(j)) {
        *out = def;
        return QKV_OK;
    }
    if (!cJSON_IsBool(j))
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: '%s' must be true, false or null", file,
                         key);
    *out = cJSON_IsTrue(j);
    return QKV_OK;
}

qkv_status qkv__json_int(qkv_ctx *ctx, const cJSON *obj, const char *file,
                         const char *key, int64_t lo, int64_t hi, int64_t *out)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: '%s' is missing", file, key);
    double v = cJSON_IsNumber(j) ? j->valuedouble : NAN;
    if (!(v == floor(v)) || v < (double)lo || v > (double)hi)
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "%s: '%s' must be an integer in [%lld, %lld]", file, key,
                         (long long)lo, (long long)hi);
    *out = (int64_t)v;
    return QKV_OK;
}

qkv_status qkv__json_num(qkv_ctx *ctx, const cJSON *obj, const char *file,
                         const char *key, double lo, double hi, int has_def,
                         double def, double *out)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j && has_def) {
        *out = def;
        return QKV_OK;
    }
    if (!j)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: '%s' is missing", file, key);
    double v = cJSON_IsNumber(j) ? j->valuedouble : NAN;
    if (!(v >= lo && v <= hi))
        return qkv__fail(ctx, QKV_ERR_FORMAT, "%s: '%s' must be a number in [%g, %g]",
                         file, key, lo, hi);
    *out = v;
    return QKV_OK;
}

const char *qkv__json_str(const cJSON *obj, const char *key)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(j) ? j->valuestring : NULL;
}
