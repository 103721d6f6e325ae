/* The small per-layer ops of a Llama-style decoder layer, one C call each instead of 5-15 eager torch ops:
 * RMSNorm (alone, or after the residual add), rotary embedding of q and k (alone, or writing the rotated k and v
 * into their cache slots), and SiLU(gate) * up; beside them greedy sampling's argmax over the vocabulary.
 *
 * Built with the other CPU kernels into one library (hf_paged/execution/kernels/cpu_library.py), called through
 * ctypes by hf_paged/execution/kernels/cpu_fused_ops.py and hf_paged/execution/patches/fused_layers.py. Each function
 * computes what transformers' eager code computes, rounding to bf16 where its ops round (a bf16 torch op computes in
 * fp32 and rounds its result): rotary embedding is bit-exact in fp32 and bf16; RMSNorm sums the squares in another
 * order and SiLU uses cpu_vec.h's exp and a refined reciprocal, so those differ from torch by an ulp or so of fp32
 * before any rounding.
 *
 * torch rounds the products of q*cos + rotate_half(q)*sin separately: no_contract() keeps the compiler from
 * fusing them into a multiply-add.
 *
 * Rows are contiguous in their last dimension; strides are in elements. bf16 values are uint16 bit patterns.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"
#include "hf_paged_kernels.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Below this many elements a call stays on one thread (a parallel region costs a few microseconds). */
#define PARALLEL_MIN_ELEMENTS (1 << 12)

#if defined(__AVX512BF16__) && VL == 16
/* vcvtneps2bf16 rounds to nearest even like torch; it also flushes fp32 denormals (below 1.2e-38) to zero. */
static inline vf round_to(const int bf16, vf x) {
    if (!bf16) return x;
    __m256i h = (__m256i)_mm512_cvtneps_pbh((__m512)x);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}

static inline void store_out(const int bf16, char *p, vf x) {
    if (bf16)
        _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh((__m512)x));
    else
        *(vf_unaligned *)p = x;
}
#else
/* x rounded to the nearest bf16 (ties to even), as fp32; NaN stays a quiet NaN. */
static inline vf round_to(const int bf16, vf x) {
    if (!bf16) return x;
    vu u = (vu)x;
    vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);
    return (vf)((rounded & ~nan) | ((u | 0x400000u) & 0xffff0000u & nan));
}

static inline void store_out(const int bf16, char *p, vf x) { store_vec(bf16, p, x); }
#endif

/* x as computed, never fused with the operation that uses it (an empty asm the compiler cannot see through;
 * elsewhere than x86-64 and AArch64, a trip through memory). */
#if defined(__x86_64__) || defined(__i386__)
#define OPAQUE(x) __asm__("" : "+v"(x))
#elif defined(__aarch64__)
#define OPAQUE(x) __asm__("" : "+w"(x))
#else
#define OPAQUE(x)                            \
    do {                                     \
        volatile __typeof__(x) opaque_ = (x); \
        (x) = opaque_;                       \
    } while (0)
#endif

static inline vf no_contract(vf x) {
    OPAQUE(x);
    return x;
}

static inline float no_contract_scalar(float x) {
    OPAQUE(x);
    return x;
}

static inline float round_scalar(const int bf16, float x) { return bf16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

static inline void store_scalar(const int bf16, char *p, long i, float x) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(x);
    else
        ((float *)p)[i] = x;
}

#define INLINE static inline __attribute__((always_inline))

/* One row of hf_rms_norm. */
INLINE void rms_norm_row(const int bf16, const char *x, const char *w, char *out, int dim, float eps) {
    const long esz = bf16 ? 2 : 4;
    if (dim % VL == 0) {
        vf acc = splat(0.0f);
        for (int i = 0; i < dim; i += VL) {
            vf v = load_vec(bf16, x + i * esz);
            acc += v * v;
        }
        const float inv = 1.0f / sqrtf(hsum(acc) / (float)dim + eps);
        for (int i = 0; i < dim; i += VL) {
            vf h = round_to(bf16, load_vec(bf16, x + i * esz) * inv);
            store_out(bf16, out + i * esz, load_vec(bf16, w + i * esz) * h);
        }
    } else {
        float acc = 0.0f;
        for (int i = 0; i < dim; i++) {
            float v = load_scalar(bf16, x, i);
            acc += v * v;
        }
        const float inv = 1.0f / sqrtf(acc / (float)dim + eps);
        for (int i = 0; i < dim; i++)
            store_scalar(bf16, out, i, load_scalar(bf16, w, i) * round_scalar(bf16, load_scalar(bf16, x, i) * inv));
    }
}

/* out = w * to_dtype(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm (w in the input's dtype). */
void hf_rms_norm(const char *x, long x_stride, const char *w, char *out, long out_stride, long rows, int dim,
                 float eps, int bf16) {
    const long esz = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        if (bf16)
            rms_norm_row(1, x + r * x_stride * esz, w, out + r * out_stride * esz, dim, eps);
        else
            rms_norm_row(0, x + r * x_stride * esz, w, out + r * out_stride * esz, dim, eps);
    }
}

/* residual_out = to_dtype(x + a), then out = hf_rms_norm(residual_out): a decoder layer's residual add and the
 * norm after it (contiguous rows). */
void hf_add_rms_norm(const char *x, const char *a, const char *w, char *residual_out, char *out, long rows, int dim,
                     float eps, int bf16) {
    const long esz = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const long off = r * dim * esz;
        if (dim % VL == 0) {
            for (int i = 0; i < dim; i += VL)
                store_out(bf16, residual_out + off + i * esz,
                          load_vec(bf16, x + off + i * esz) + load_vec(bf16, a + off + i * esz));
        } else {
            for (int i = 0; i < dim; i++)
                store_scalar(bf16, residual_out + off, i,
                             load_scalar(bf16, x + off, i) + load_scalar(bf16, a + off, i));
        }
        if (bf16)
            rms_norm_row(1, residual_out + off, w, out + off, dim, eps);
        else
            rms_norm_row(0, residual_out + off, w, out + off, dim, eps);
    }
}

/* One head row: out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[half:], x[:half]). */
INLINE void rope_row(const int bf16, const char *x, const char *cos, const char *sin, char *out, int hd) {
    const long esz = bf16 ? 2 : 4;
    const int half = hd / 2;
    if (half % VL == 0) {
        for (int i = 0; i < half; i += VL) {
            vf a = load_vec(bf16, x + i * esz), b = load_vec(bf16, x + (i + half) * esz);
            vf c0 = load_vec(bf16, cos + i * esz), s0 = load_vec(bf16, sin + i * esz);
            vf c1 = load_vec(bf16, cos + (i + half) * esz), s1 = load_vec(bf16, sin + (i + half) * esz);
            vf lo = round_to(bf16, no_contract(a * c0)) + round_to(bf16, no_contract(-b * s0));
            vf hi = round_to(bf16, no_contract(b * c1)) + round_to(bf16, no_contract(a * s1));
            store_out(bf16, out + i * esz, lo);
            store_out(bf16, out + (i + half) * esz, hi);
        }
    } else {
        for (int i = 0; i < hd; i++) {
            float rot = i < half ? -load_scalar(bf16, x, i + half) : load_scalar(bf16, x, i - half);
            store_scalar(bf16, out, i,
                         round_scalar(bf16, no_contract_scalar(load_scalar(bf16, x, i) * load_scalar(bf16, cos, i))) +
                             round_scalar(bf16, no_contract_scalar(rot * load_scalar(bf16, sin, i))));
        }
    }
}

/* All heads of one token: q heads then k heads. */
INLINE void rope_token(const int bf16, const char *q, long q_s1, int Hq, const char *k, long k_s1, int Hk, char *q_out,
                       char *k_out, const char *cos, const char *sin, int hd) {
    const long esz = bf16 ? 2 : 4;
    for (int h = 0; h < Hq; h++) rope_row(bf16, q + h * q_s1 * esz, cos, sin, q_out + (long)h * hd * esz, hd);
    for (int h = 0; h < Hk; h++) rope_row(bf16, k + h * k_s1 * esz, cos, sin, k_out + (long)h * hd * esz, hd);
}

/* Rotary embedding of q [T, Hq, hd] and k [T, Hk, hd] (strides s0 per token, s1 per head) into contiguous
 * q_out [T, Hq, hd] and k_out [T, Hk, hd]; cos and sin contiguous [T, hd]. */
void hf_rope(const char *q, long q_s0, long q_s1, int Hq, const char *k, long k_s0, long k_s1, int Hk, char *q_out,
             char *k_out, const char *cos, const char *sin, long T, int hd, int bf16) {
    const long esz = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (T * (Hq + Hk) * hd >= PARALLEL_MIN_ELEMENTS)
    for (long t = 0; t < T; t++) {
        const char *qt = q + t * q_s0 * esz, *kt = k + t * k_s0 * esz, *c = cos + t * hd * esz, *s = sin + t * hd * esz;
        char *qo = q_out + t * Hq * hd * esz, *ko = k_out + t * Hk * hd * esz;
        if (bf16)
            rope_token(1, qt, q_s1, Hq, kt, k_s1, Hk, qo, ko, c, s, hd);
        else
            rope_token(0, qt, q_s1, Hq, kt, k_s1, Hk, qo, ko, c, s, hd);
    }
}

/* 1 / d: with AVX-512 a 14-bit reciprocal refined by one Newton step (~1 ulp; vdivps is 16 cycles a vector). */
INLINE vf reciprocal(vf d) {
#if defined(__AVX512F__)
    vf r = (vf)_mm512_rcp14_ps((__m512)d);
    return r * (2.0f - d * r);
#else
    return 1.0f / d;
#endif
}

/* hf_rope, with k's rotated rows and v's rows written straight into their cache slots (the engine's cache
 * write): q_out [T, Hq, hd] contiguous; caches [num_slots, Hk, hd] contiguous; slots [T]. */
void hf_rope_write_kv(const char *q, long q_s0, long q_s1, int Hq, const char *k, long k_s0, long k_s1, int Hk,
                      const char *v, long v_s0, long v_s1, char *q_out, const char *cos, const char *sin,
                      const int64_t *slots, char *key_cache, char *value_cache, long T, int hd, int bf16) {
    const long esz = bf16 ? 2 : 4;
    const long row = (long)hd * esz;
#pragma omp parallel for schedule(static) if (T * (Hq + Hk) * hd >= PARALLEL_MIN_ELEMENTS)
    for (long t = 0; t < T; t++) {
        const char *qt = q + t * q_s0 * esz, *kt = k + t * k_s0 * esz, *c = cos + t * hd * esz, *s = sin + t * hd * esz;
        char *qo = q_out + t * Hq * row, *ko = key_cache + slots[t] * Hk * row;
        if (bf16)
            rope_token(1, qt, q_s1, Hq, kt, k_s1, Hk, qo, ko, c, s, hd);
        else
            rope_token(0, qt, q_s1, Hq, kt, k_s1, Hk, qo, ko, c, s, hd);
        for (int h = 0; h < Hk; h++)
            memcpy(value_cache + (slots[t] * Hk + h) * row, v + (t * v_s0 + h * v_s1) * esz, row);
    }
}

/* silu(x) = x / (1 + exp(-x)) (exp's argument kept finite: the quotient is -0 or a denormal either way). */
INLINE vf silu_vec(vf x) {
    vf e = -x;
    const vf hi = splat(88.0f);
    vi over = e > hi;
    e = (vf)(((vi)e & ~over) | ((vi)hi & over));
    return x * reciprocal(1.0f + exp_vec(e));
}

/* One row of hf_silu_mul. */
INLINE void silu_mul_row(const int bf16, const char *g, char *o, int inter) {
    const long esz = bf16 ? 2 : 4;
    const char *u = g + (long)inter * esz;
    int i = 0;
    for (; i + VL <= inter; i += VL) {
        vf act = round_to(bf16, silu_vec(load_vec(bf16, g + i * esz)));
        store_out(bf16, o + i * esz, act * load_vec(bf16, u + i * esz));
    }
    for (; i < inter; i++) {
        float x = load_scalar(bf16, g, i);
        float act = round_scalar(bf16, x / (1.0f + expf(-x)));
        store_scalar(bf16, o, i, act * load_scalar(bf16, u, i));
    }
}

/* out[r, :] = to_dtype(silu(gate)) * up, gate = gate_up[r, :inter], up = gate_up[r, inter:2 * inter]. */
void hf_silu_mul(const char *gate_up, long gu_stride, char *out, long out_stride, long rows, int inter, int bf16) {
    const long esz = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (rows * inter >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        if (bf16)
            silu_mul_row(1, gate_up + r * gu_stride * esz, out + r * out_stride * esz, inter);
        else
            silu_mul_row(0, gate_up + r * gu_stride * esz, out + r * out_stride * esz, inter);
    }
}

/* out[r] = the index of the first maximum of row r of x [rows, n] (fp32), or of its first NaN, as torch.max
 * along a dim picks it: greedy sampling's argmax over the vocabulary. */
void hf_argmax_rows(const float *x, long stride, long rows, long n, int64_t *out) {
#pragma omp parallel for schedule(static) if (rows * n >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        long i = 0, best_i = 0;
        float best = n > 0 ? row[0] : 0.0f;
        int nan = n > 0 && best != best;
        if (n >= VL && !nan) {
            vf lane_best = *(const vf_unaligned *)row;
            vi lane_i = {0}, idx = {0};
            for (int l = 0; l < VL; l++) idx[l] = l;
            lane_i = idx;
            vi any_nan = lane_best != lane_best;
            for (i = VL; i + VL <= n; i += VL) {
                vf v = *(const vf_unaligned *)(row + i);
                idx += VL;
                vi gt = v > lane_best; /* strictly greater: a lane keeps its first maximum */
                any_nan |= v != v;
                lane_best = (vf)(((vi)v & gt) | ((vi)lane_best & ~gt));
                lane_i = (idx & gt) | (lane_i & ~gt);
            }
            int seen_nan = 0;
            for (int l = 0; l < VL; l++) seen_nan |= any_nan[l] != 0;
            if (seen_nan) {
                i = 0; /* rare: find the first NaN by a plain scan below */
                nan = 1;
            } else {
                best = lane_best[0];
                best_i = lane_i[0];
                for (int l = 1; l < VL; l++)
                    if (lane_best[l] > best || (lane_best[l] == best && lane_i[l] < best_i)) {
                        best = lane_best[l];
                        best_i = lane_i[l];
                    }
            }
        }
        if (nan) {
            for (i = 0; i < n && row[i] == row[i]; i++) {
            }
            out[r] = i < n ? i : 0;
            continue;
        }
        for (; i < n; i++) {
            const float v = row[i];
            if (v != v) { /* a NaN in the tail */
                best_i = i;
                break;
            }
            if (v > best) {
                best = v;
                best_i = i;
            }
        }
        out[r] = best_i;
    }
}
