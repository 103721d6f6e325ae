/* Shared by the CPU kernels: vector width, GNU vector types, fp32/bf16/int8 loads and fp32/bf16 stores (bf16
 * rounded to nearest even, as torch does), exp, horizontal sum and max. Plain C11 + GNU vector extensions (and one
 * x86 or NEON intrinsic chain for int8 loads). */
#pragma once

#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h> /* load_i8_vec: gcc widens int8 vectors with __builtin_convertvector one element at a time */
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h> /* load_i8_vec, likewise */
#endif

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif

typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef float vf_unaligned __attribute__((vector_size(4 * VL), aligned(4), may_alias));
typedef uint16_t vh_unaligned __attribute__((vector_size(2 * VL), aligned(2), may_alias));
typedef uint16_t vh __attribute__((vector_size(2 * VL)));
typedef int8_t vb_unaligned __attribute__((vector_size(VL), aligned(1), may_alias));
typedef int8_t vb __attribute__((vector_size(VL)));

/* x - 0 rather than 0 + x: the same value (-0 included), and GCC folds it into a broadcast (an embedded one in an FMA)
 * where 0 + x costs a scalar add first. */
static inline vf splat(float x) { return x - (vf){0}; }

/* Load VL elements (float or bf16 bit patterns) as fp32. */
static inline vf load_vec(const int bf16, const char *p) {
    if (bf16) return (vf)(__builtin_convertvector(*(const vh_unaligned *)p, vu) << 16);
    return *(const vf_unaligned *)p;
}

/* Load VL int8 elements as fp32. */
static inline vf load_i8_vec(const char *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#elif defined(__aarch64__) && defined(__ARM_NEON) && VL == 4
    int32_t b4; /* 4 bytes -> sxtl, sxtl, scvtf (gcc's convertvector: 4 ldrsb + 4 scvtf + 3 ins) */
    memcpy(&b4, p, 4);
    return (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(b4))))));
#else /* GCC widens int8 vectors element by element here too; fine for a fallback */
    return __builtin_convertvector(*(const vb_unaligned *)p, vf);
#endif
}

static inline void store_vec(const int bf16, char *p, vf x) {
    if (bf16) {
        vu u = (vu)x;
        vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u); /* NaN stays a (quiet) NaN */
        vu bits = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
        *(vh_unaligned *)p = __builtin_convertvector(bits, vh);
    } else {
        *(vf_unaligned *)p = x;
    }
}

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load_scalar(const int bf16, const char *p, long i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* exp(x) for the softmax's shifted scores (x <= 0; -inf and below -87 give ~1e-38 at most), Cephes-style:
 * x = n ln2 + r with |r| <= ln2/2 (n rounded by the 1.5 * 2^23 trick), exp(r) by a degree-6 polynomial
 * (relative error ~2e-7), 2^n put in the exponent bits. */
static inline vf exp_vec(vf x) {
    const vf lo = splat(-87.0f);
    vi below = x < lo; /* also false for NaN, which stays NaN */
    x = (vf)(((vi)x & ~below) | ((vi)lo & below));
    const vf magic = splat(12582912.0f);
    vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

static inline float hsum(vf x) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += x[i];
    return s;
}

static inline float hmax(vf x) {
    float m = x[0];
    for (int i = 1; i < VL; i++) m = x[i] > m ? x[i] : m;
    return m;
}
