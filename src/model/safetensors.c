/*
 * safetensors.c — reads the safetensors format: an 8-byte little-endian
 * header length N, N bytes of JSON mapping tensor names to
 * {dtype, shape, data_offsets: [begin, end]} (offsets relative to the end
 * of the header), then the data.
 *
 * The file is mapped, never read whole; each header field is checked
 * (lengths against the file size, dtype names, shapes non-negative and
 * their products free of overflow, offsets ordered, inside the data and
 * exactly the bytes the shape needs) before any tensor is handed out.
 * Not a writer, and not a general JSON layer: cJSON parses the header.
 */
#include "st.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

enum { MAX_HEADER = 100 << 20 };   /* the format's own limit on N */

static const struct { const char *name; qkv__st_dtype dt; size_t size; } dtypes[] = {
    { "F32", QKV__ST_F32, 4 },  { "F16", QKV__ST_F16, 2 },  { "BF16", QKV__ST_BF16, 2 },
    { "F64", QKV__ST_F64, 8 },  { "I64", QKV__ST_I64, 8 },  { "I32", QKV__ST_I32, 4 },
    { "I16", QKV__ST_I16, 2 },  { "I8", QKV__ST_I8, 1 },    { "U64", QKV__ST_U64, 8 },
    { "U32", QKV__ST_U32, 4 },  { "U16", QKV__ST_U16, 2 },  { "U8", QKV__ST_U8, 1 },
    { "BOOL", QKV__ST_BOOL, 1 }, { "F8_E4M3", QKV__ST_F8_E4M3, 1 },
    { "F8_E5M2", QKV__ST_F8_E5M2, 1 },
};

static const char *dtype_name(qkv__st_dtype dt)
{
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (dtypes[i].dt == dt)
            return dtypes[i].name;
    return "?";
}

/* A JSON number that is an integer in [0, 2^53] (exact in a double). */
static int json_uint(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j))
        return 0;
    double v = j->valuedouble;
    if (!(v >= 0.0 && v <= 9007199254740992.0) || v != floor(v))
        return 0;
    *out = (uint64_t)v;
    return 1;
}

void qkv__st_close(qkv__st *st)
{
    if (!st)
        return;
    for (int i = 0; i < st->n; i++)
        free(st->t[i].name);
    free(st->t);
    if (st->map)
        munmap(st->map, st->map_size);
    memset(st, 0, sizeof *st);
}

/* Checks one header entry and fills *t. */
static qkv_status parse_entry(qkv_ctx *ctx, const cJSON *e, const unsigned char *data,
                              uint64_t data_size, qkv__st_tensor *t)
{
    const char *nm = e->string;
    if (!cJSON_IsObject(e))
        return qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: entry '%s' is not an object", nm);
    const cJSON *jd = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *jo = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(jd))
        return qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: '%s' has no dtype string", nm);
    size_t es = 0;
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (strcmp(jd->valuestring, dtypes[i].name) == 0) {
            t->dtype = dtypes[i].dt;
            es = dtypes[i].size;
        }
    if (!es)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: '%s' has unknown dtype '%.32s'",
                         nm, jd->valuestring);
    if (!cJSON_IsArray(js))
        return qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: '%s' has no shape array", nm);
    int nd = cJSON_GetArraySize(js);
    if (nd > QKV__ST_MAX_DIMS)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: '%s' has %d dims (at most %d)",
                         nm, nd, QKV__ST_MAX_DIMS);
    uint64_t count = 1;
    int d = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, js) {
        uint64_t v;
        if (!json_uint(x, &v))
            return qkv__fail(ctx, QKV_ERR_FORMAT,
                             "safetensors: '%s' shape[%d] is not a non-negative integer", nm, d);
        if (v && count > UINT64_MAX / v)
            return qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: '%s' shape overflows", nm);
        count *= v;
        t->shape[d++] = (int64_t)v;
    }
    t->ndim = nd;
    if (count > UINT64_MAX / es)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: '%s' shape overflows", nm);
    uint64_t begin, end;
    if (!cJSON_IsArray(jo) || cJSON_GetArraySize(jo) != 2 ||
        !json_uint(cJSON_GetArrayItem(jo, 0), &begin) ||
        !json_uint(cJSON_GetArrayItem(jo, 1), &end))
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "safetensors: '%s' data_offsets is not two non-negative integers", nm);
    if (begin > end || end > data_size)
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "safetensors: '%s' data_offsets [%llu, %llu] outside the %llu data bytes",
                         nm, (unsigned long long)begin, (unsigned long long)end,
                         (unsigned long long)data_size);
    if (end - begin != count * es)
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "safetensors: '%s' holds %llu bytes but its shape needs %llu", nm,
                         (unsigned long long)(end - begin), (unsigned long long)(count * es));
    t->data = data + begin;
    t->nbytes = (size_t)(end - begin);
    t->name = strdup(nm);
    if (!t->name)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "safetensors: out of memory");
    return QKV_OK;
}

qkv_status qkv__st_parse(qkv_ctx *ctx, const void *buf, size_t size, qkv__st *st)
{
    memset(st, 0, sizeof *st);
    const unsigned char *b = buf;
    if (!buf || size < 8)
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "safetensors: %zu bytes, shorter than the 8-byte header length", size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | b[i];
    if (n < 2 || n > MAX_HEADER || n > size - 8)
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "safetensors: header length %llu does not fit the %zu-byte file",
                         (unsigned long long)n, size);
    const char *hdr = (const char *)b + 8;
    if (hdr[0] != '{')
        return qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: header does not start with '{'");
    size_t at;
    cJSON *root = qkv__json_parse(hdr, (size_t)n, &at);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "safetensors: header is not a JSON object (error near byte %zu)", at);
    }
    int count = cJSON_GetArraySize(root);
    st->t = calloc((size_t)count + 1, sizeof *st->t);
    if (!st->t) {
        cJSON_Delete(root);
        return qkv__fail(ctx, QKV_ERR_NOMEM, "safetensors: out of memory");
    }
    const unsigned char *data = b + 8 + n;
    uint64_t data_size = size - 8 - n;
    qkv_status s = QKV_OK;
    const cJSON *e;
    cJSON_ArrayForEach(e, root) {
        if (!e->string) {
            s = qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: an entry has no name");
            break;
        }
        if (strcmp(e->string, "__metadata__") == 0) {
            if (!cJSON_IsObject(e)) {
                s = qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: __metadata__ is not an object");
                break;
            }
            continue;
        }
        if (qkv__st_find(st, e->string)) {
            s = qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: tensor '%s' appears twice",
                          e->string);
            break;
        }
        s = parse_entry(ctx, e, data, data_size, &st->t[st->n]);
        if (s != QKV_OK)
            break;
        st->n++;
    }
    cJSON_Delete(root);
    if (s != QKV_OK)
        qkv__st_close(st);
    return s;
}

qkv_status qkv__st_open(qkv_ctx *ctx, const char *path, qkv__st *st)
{
    memset(st, 0, sizeof *st);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return qkv__fail(ctx, QKV_ERR_IO, "cannot open '%s'", path);
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return qkv__fail(ctx, QKV_ERR_IO, "'%s' is not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    if (size < 8) {
        close(fd);
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "safetensors: '%s' has %zu bytes, shorter than the 8-byte header length",
                         path, size);
    }
    void *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return qkv__fail(ctx, QKV_ERR_IO, "cannot map '%s'", path);
    qkv_status s = qkv__st_parse(ctx, m, size, st);
    if (s != QKV_OK) {
        munmap(m, size);
        return s;
    }
    st->map = m;
    st->map_size = size;
    return QKV_OK;
}

qkv_status qkv__st_open_dir(qkv_ctx *ctx, const char *dir, qkv__st *st)
{
    char path[4096];
    memset(st, 0, sizeof *st);
    qkv_status s = qkv__path_join(ctx, path, sizeof path, dir, "model.safetensors");
    return s == QKV_OK ? qkv__st_open(ctx, path, st) : s;
}

const qkv__st_tensor *qkv__st_find(const qkv__st *st, const char *name)
{
    for (int i = 0; i < st->n; i++)
        if (strcmp(st->t[i].name, name) == 0)
            return &st->t[i];
    return NULL;
}

qkv_status qkv__st_load(qkv_ctx *ctx, const qkv__st *st, const char *name,
                        int ndim, const int64_t *shape, float **out)
{
    *out = NULL;
    const qkv__st_tensor *t = qkv__st_find(st, name);
    if (!t)
        return qkv__fail(ctx, QKV_ERR_FORMAT, "safetensors: tensor '%s' is missing", name);
    int same = t->ndim == ndim;
    size_t n = 1;
    for (int d = 0; same && d < ndim; d++) {
        same = t->shape[d] == shape[d];
        n *= (size_t)shape[d];
    }
    if (!same) {
        char want[160] = "", got[160] = "";
        for (int d = 0; d < ndim; d++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld",
                     d ? "," : "", (long long)shape[d]);
        for (int d = 0; d < t->ndim; d++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld",
                     d ? "," : "", (long long)t->shape[d]);
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "safetensors: tensor '%s' has shape [%s], the config needs [%s]",
                         name, got, want);
    }
    qkv_dtype dt;
    switch (t->dtype) {
    case QKV__ST_F32:  dt = QKV_F32; break;
    case QKV__ST_F16:  dt = QKV_F16; break;
    case QKV__ST_BF16: dt = QKV_BF16; break;
    default:
        return qkv__fail(ctx, QKV_ERR_FORMAT,
                         "safetensors: tensor '%s' is %s (F32, F16 or BF16 needed)",
                         name, dtype_name(t->dtype));
    }
    float *f = malloc(n ? n * sizeof(float) : 1);
    if (!f)
        return qkv__fail(ctx, QKV_ERR_NOMEM, "out of memory loading '%s'", name);
    if (dt == QKV_F32) {
        memcpy(f, t->data, n * sizeof(float));   /* the data may be unaligned */
    } else {
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, t->data + 2 * i, 2);
            f[i] = dt == QKV_F16 ? qkv__f16_to_f32(h) : qkv__bf16_to_f32(h);
        }
    }
    *out = f;
    return QKV_OK;
}
