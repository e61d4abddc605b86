/*
 * convert.c — fp32 <-> fp16 / bf16 conversion, bit-exact and portable
 * (round to nearest even, NaN kept quiet, overflow to infinity), and the
 * public qkv_convert over arrays.
 */
#include "internal.h"

#include <string.h>

static uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

uint16_t qkv__f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)          /* NaN: keep it quiet */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);                /* round to nearest even */
    return (uint16_t)(u >> 16);
}

uint16_t qkv__f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u)                          /* inf or NaN */
        return sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0);
    if (a >= 0x477ff000u)                          /* rounds to >= 65520 */
        return sign | 0x7c00;
    if (a < 0x38800000u) {                         /* below 2^-14: subnormal */
        /* scale so the 10 subnormal bits land in the low mantissa, letting
           the fp32 adder round to nearest even */
        float r = bits_f32(a) + 0.5f;              /* 0.5 = 2^-1: ulp 2^-24 */
        return sign | (uint16_t)(f32_bits(r) - 0x3f000000u);
    }
    uint32_t mant_odd = (a >> 13) & 1;
    a += 0xc8000fffu + mant_odd;                   /* rebias 127->15, round */
    return sign | (uint16_t)(a >> 13);
}

float qkv__f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f)                                 /* inf or NaN */
        return bits_f32(sign | 0x7f800000u | (m << 13));
    if (e == 0) {                                  /* zero or subnormal */
        float r = (float)m * 5.9604644775390625e-8f; /* m·2^-24, exact */
        return sign ? -r : r;
    }
    return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

qkv_status qkv_convert(const void *src, qkv_dtype src_dtype, void *dst,
                       qkv_dtype dst_dtype, size_t n)
{
    if (!src || !dst)
        return QKV_ERR_NULL;
    if (!qkv_dtype_size(src_dtype) || !qkv_dtype_size(dst_dtype))
        return QKV_ERR_DTYPE;
    if (src_dtype == dst_dtype) {
        memmove(dst, src, n * qkv_dtype_size(src_dtype));
        return QKV_OK;
    }
    for (size_t i = 0; i < n; i++)
        qkv__store(dst, dst_dtype, (int64_t)i, qkv__load(src, src_dtype, (int64_t)i));
    return QKV_OK;
}
