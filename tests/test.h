/*
 * test.h — the tiny framework shared by tests/test_*.c.
 *
 * CHECK(cond, fmt, ...) counts one passed or failed check; a failure prints
 * file:line and the message. The test functions are listed in main.c (a
 * plain array). Helpers: a deterministic RNG, random fills of any dtype,
 * compare() against an fp32 reference, and strided test buffers with
 * margins (to see writes outside a view). Not a general-purpose framework:
 * no fixtures, no forking, no token pasting.
 */
#ifndef QKV_TEST_H
#define QKV_TEST_H

#include <qkv.h>
#include <stddef.h>
#include <stdint.h>

/* ---- checks ------------------------------------------------------------- */

extern int t_quick;   /* QKV_TEST_QUICK=1: smaller random sweeps (sanitizers) */

void t_check(int ok, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define CHECK(cond, ...) t_check((cond) ? 1 : 0, __FILE__, __LINE__, __VA_ARGS__)

/* prints an informational line (max errors seen, ...) */
void t_note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- helpers ------------------------------------------------------------ */

typedef struct { uint64_t s; } rng;

rng      rng_seed(uint64_t seed);
uint64_t rng_u64(rng *r);                          /* splitmix64 */
double   rng_unif(rng *r);                         /* uniform in [-1, 1] */
int64_t  rng_int(rng *r, int64_t lo, int64_t hi);  /* uniform in [lo, hi] */
#define RNG_PICK(r, arr) ((arr)[rng_int((r), 0, (int64_t)(sizeof(arr) / sizeof((arr)[0])) - 1)])

void  *xmalloc(size_t n);                          /* exits on failure */
int    t_exists(const char *path);
/* The whole file, NUL-terminated (len, when not NULL, its size), or NULL
   when it cannot be opened. */
char  *t_read_file(const char *path, size_t *len);
void   t_write_file(const char *path, const void *buf, size_t len);   /* exits on failure */
double now_sec(void);
const char *dtype_name(qkv_dtype dt);

/* n random values in [-1, 1] of dtype dt (fp16/bf16: fp32 rounded by
   qkv_convert). */
void   fill_random(void *buf, qkv_dtype dt, size_t n, rng *r);
/* malloc'd fp32 copy of n elements of dtype dt */
float *to_f32(const void *src, qkv_dtype dt, size_t n);

/* One CHECK: |got[i] - ref[i]| <= atol + rtol*|ref[i]| for all i < n (got
   is converted from dtype got_dt; an infinite or NaN ref must be matched
   exactly). On failure prints the worst element. Returns the largest
   |got - ref| over the elements whose ref is finite (inf on a mismatch of
   non-finite values). */
double compare(const char *name, const void *got, qkv_dtype got_dt,
               const float *ref, size_t n, double atol, double rtol);

/* Whether an error message names the arguments in `names`: alternatives
   separated by '|', each a list of names joined by '&' that must all
   appear, each as a whole path (not inside a longer identifier). */
int    msg_names(const char *msg, const char *names);

/* ---- strided test buffers ------------------------------------------------ */

/* A qkv_tensor view into its own allocation, which has a margin on each
   side of the view's extent, so that writes outside the view show. */
typedef struct {
    qkv_tensor     t;
    unsigned char *buf;     /* the whole allocation */
    size_t         bytes;
} tbuf;

enum {
    LAY_CONTIG,   /* row-major [d0,d1,d2,d3] */
    LAY_BHSD,     /* memory order [d0,d2,d1,d3]: heads outside seqlen */
    LAY_PAD,      /* row-major with gaps after every dim */
    LAY_NEG,      /* dim 1 walks backwards (negative stride) */
    LAY_INNER2,   /* stride[3] == 2: every other element */
    LAY_REVD,     /* stride[3] == -1: dim 3 reversed */
    LAY_BCAST,    /* stride 0 on dims 0 and 2 (inputs only) */
    LAY_COUNT
};
extern const char *const lay_name[LAY_COUNT];

void   layout_strides(int layout, const int64_t shape[4], int64_t stride[4]);
/* Allocates a view of shape/stride; the buffer is zero-filled. */
void   tbuf_make(tbuf *tb, qkv_dtype dt, const int64_t shape[4], const int64_t stride[4]);
void   tbuf_make_layout(tbuf *tb, qkv_dtype dt, const int64_t shape[4], int layout);
void   tbuf_fill_random(tbuf *tb, rng *r);        /* the whole allocation */
void   tbuf_fill_byte(tbuf *tb, unsigned char byte);
void   tbuf_free(tbuf *tb);
/* Copies the elements of view t into dst as a contiguous row-major array
   of t's dtype. */
void   view_gather(const qkv_tensor *t, void *dst);
/* Bytes outside tb's view that are no longer `byte`. */
size_t tbuf_outside_changed(const tbuf *tb, unsigned char byte);

/* ---- attention cases (case.c) ---------------------------------------------
 * One attention problem: the caller sets sizes, dtype, options and layouts,
 * acase_build() makes the strided inputs (random), the bias, slopes and
 * opts, and logical fp32 copies of the inputs for an oracle. */

enum { MAX_SEQS = 8 };
/* bias shapes: [B,Hq,Sq,Sk], [1,Hq,Sq,Sk], [B,1,Sq,Sk], [1,1,Sq,Sk], full
   with zero strides, full with padded strides, [B,1,1,Sk] (padding masks),
   [1,Hq,Sq,1] (one value per query row) */
enum { BIAS_NONE, BIAS_FULL, BIAS_B1, BIAS_H1, BIAS_11, BIAS_ZSTRIDE, BIAS_PAD, BIAS_KEYS,
       BIAS_ROWS, BIAS_COUNT };
enum { OUT_SENTINEL = 0xC3, LSE_SENTINEL = 0xC5, LSE_MARGIN = 16 };

typedef struct {
    /* set by the caller (acase_init gives plain attention) */
    int64_t   B, Sq, Sk, Hq, Hkv, D, Dv;   /* Sq, Sk: packed totals when varlen */
    qkv_dtype dt;
    int       causal;
    int64_t   wl, wr;
    float     scale, softcap;
    int       alibi;          /* random slopes in (0, 0.5] */
    int       bias;           /* BIAS_*: broadcast shape / strides of the fp32 bias */
    int       bias_neg_row;   /* bias row i = Sq/2 is all -inf */
    int       n_seqs;         /* > 0: varlen, with cu_q / cu_k */
    int32_t   cu_q[MAX_SEQS + 1], cu_k[MAX_SEQS + 1];
    int       lay_q, lay_k, lay_v, lay_o;
    int       packed;         /* q, k, v are slices of one [B, S, 3, H, D] buffer */
    int       no_lse;         /* pass lse = NULL to the call under test */
    float     dropout;        /* opts.dropout_p (its seed drawn from seed) */
    uint64_t  seed;
    /* made by acase_build */
    tbuf          q, k, v, qkv, bias_t;
    qkv_tensor    tq, tk, tv;
    float        *slopes;
    qkv_attn_opts opts;
    float        *qf, *kf, *vf;   /* logical row-major fp32 copies of q, k, v */
    size_t        n_out, n_lse;   /* B*Sq*Hq*Dv, B*Hq*Sq */
    unsigned char *row_used;      /* [B*Sq]: row is inside a sequence */
} acase;

void acase_init(acase *c, int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hkv,
                int64_t D, int64_t Dv, qkv_dtype dt);
/* random varlen offsets: n_seqs sequences of 0..max_len rows each, a few
   unused rows before and after; sets B = 1 and Sq, Sk to the totals */
void acase_random_varlen(acase *c, rng *r, int n_seqs, int max_len);
void acase_build(acase *c);
void acase_free(acase *c);
/* a one-line description, for failure messages */
const char *acase_str(const acase *c);
/* an output view of layout lay_o filled with OUT_SENTINEL, and an lse
   buffer (n_lse floats between margins) filled with LSE_SENTINEL */
void   acase_make_out(const acase *c, tbuf *out, qkv_dtype dt);
float *acase_make_lse(const acase *c);          /* returns the pointer to pass */
void   acase_free_lse(float *lse);
/* After a successful call: CHECKs that nothing outside out's view, outside
   the used rows, or outside lse[0, n_lse) changed; returns the logical
   output as malloc'd fp32 with unused rows zeroed (and zeroes them in lse). */
float *acase_collect(const acase *c, const tbuf *out, float *lse, const char *label);
/* zeroes rows outside every sequence in a logical out / lse */
void   acase_zero_unused(const acase *c, float *out, float *lse);

/* The forward's tolerances per output dtype (test_forward.c): out atol and
   rtol, lse atol. */
void forward_tolerances(qkv_dtype dt, double *atol, double *rtol, double *lse_atol);

/* The kernel sets this CPU runs (at most 8), least preferred first;
   returns their number. */
int kernel_sets(const char **sets);

/* ---- the tests (listed in main.c) ---------------------------------------- */

void test_convert_f16_exhaustive(void);
void test_convert_bf16_exhaustive(void);
void test_convert_rounding(void);
void test_convert_special(void);
void test_convert_pairs(void);
void test_convert_errors(void);
void test_convert_store_kernels(void);
void test_convert_i8_bf16_kernels(void);
void test_convert_pack_pairs_kernels(void);
void test_decode_i8_kernel_bits(void);
void test_decode_pv_kernel_bits(void);

void test_reference_closed_form(void);
void test_reference_options(void);
void test_reference_random(void);

void test_forward_shapes(void);
void test_forward_options(void);
void test_forward_strides(void);
void test_forward_empty_rows(void);
void test_forward_long(void);
void test_forward_random(void);
void test_forward_closed_form(void);
void test_forward_threads(void);
void test_forward_nonfinite(void);

void test_backward_shapes(void);    /* test_backward.c */
void test_backward_options(void);
void test_backward_threads(void);

void test_dropout_mask(void);       /* test_dropout.c */
void test_dropout_threads(void);
void test_dropout_errors(void);
void test_dropout_last_rows(void);

void test_million_window(void);   /* test_million.c */
void test_million_keys(void);
void test_masks_padding_equals_varlen(void);        /* test_masks.c */
void test_masks_row_bias_and_negative_scale(void);
void test_masks_varlen_equals_separate(void);
void test_api_peak(void);                           /* test_api.c */
void test_api_alloc(void);                          /* test_api.c */
void test_fuzz_arguments(void);                     /* test_fuzz.c */
void test_train_copy(void);                         /* test_train.c */

void test_backward_ref_fd(void);                    /* test_backward_ref.c */
void test_backward_ref_random(void);
void test_backward_ref_closed_form(void);
void test_backward_ref_empty_rows(void);
void test_backward_ref_threads(void);
void test_backward_ref_dtypes(void);
void test_backward_ref_errors(void);

void test_errors_api(void);
void test_errors_pointers(void);
void test_errors_dtypes(void);
void test_errors_shapes(void);
void test_errors_strides(void);
void test_errors_options(void);
void test_errors_varlen(void);
void test_errors_bias(void);

#endif /* QKV_TEST_H */
