/* Paged decode attention on the CPU: one query token per sequence, K/V read straight from the blocks.
 *
 * Built by hf_paged/kernels/cpu_decode_attention.py with the system C compiler (no torch headers) and
 * called through ctypes with raw data pointers.
 *
 * Layouts (elements, not bytes):
 *   q            [D, H, hd]            row strides q_s0 (sequence), q_s1 (head); head_dim contiguous
 *   key/value    [num_blocks, block_size, KVH, hd] contiguous (one layer's cache)
 *   block_tables [D, >= ceil(kv_len / block_size)] int64, row stride bt_stride
 *   kv_lens      [D] int32: the number of cached tokens of each sequence, the query being the last one
 *   out          [D, H, hd]            row strides o_s0, o_s1; head_dim contiguous
 * window > 0: a query at position p = kv_len - 1 sees keys j >= kv_len - window only.
 * softcap > 0: scores = tanh(scores / softcap) * softcap before the softmax.
 * GQA: query head h reads KV head h / (H / KVH).
 *
 * Work split: one task per (sequence, KV head), handling the H / KVH query heads of that KV head, so each
 * K/V row is read once per step. A task computes the scores of its heads over the visible keys into a
 * per-thread buffer, then the softmax, then the weighted sum of V rows. Everything accumulates in fp32.
 * The bf16 variant takes uint16 bit patterns and writes bf16 (round to nearest even).
 *
 * No -ffast-math needed: the reductions carry `omp simd reduction` and exp is a vectorizable polynomial.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* exp(x) for x <= 0 (the softmax's shifted scores), Cephes-style: x = n ln2 + r, |r| <= ln2/2,
 * exp(r) by a degree-6 polynomial (relative error ~2e-7), 2^n built in the exponent bits.
 * Plain arithmetic only, so gcc vectorizes loops that call it. */
#pragma omp declare simd notinbranch
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;  /* ln2 split in two for an exact first step */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
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
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* A bf16 row widened into an fp32 buffer. */
static inline const float *row_bf16(const uint16_t *src, float *tmp, int hd) {
    uint32_t *t = (uint32_t *)tmp;
#pragma omp simd
    for (int d = 0; d < hd; d++) t[d] = (uint32_t)src[d] << 16;
    return tmp;
}

#define MAX_GROUP 64

/* The kernel, written once for both element types: `bf16` is a constant in each caller and the function
 * is always inlined, so gcc specializes it. Data pointers are to float or uint16_t elements as `bf16`
 * says; strides and offsets are in elements. */
static inline __attribute__((always_inline)) int paged_decode_attention(
    const int bf16, const void *q_, long q_s0, long q_s1, const void *key_cache_, const void *value_cache_,
    const int64_t *block_tables, long bt_stride, const int32_t *kv_lens, void *out_, long o_s0, long o_s1, int D, int H, int KVH,
    int hd, int block_size, int window, float scale, float softcap, int num_threads) {
    const long esz = bf16 ? 2 : 4;
    const char *q = (const char *)q_, *key_cache = (const char *)key_cache_;
    const char *value_cache = (const char *)value_cache_;
    char *out = (char *)out_;
    if (D <= 0) return 0;
    if (KVH <= 0 || H % KVH != 0 || H / KVH > MAX_GROUP || hd <= 0 || block_size <= 0) return -1;
    const int G = H / KVH;
    const long row = (long)KVH * hd; /* elements between consecutive slots */
    int max_len = 1;
    for (int s = 0; s < D; s++) {
        int n = kv_lens[s];
        if (window > 0 && n > window) n = window;
        if (n > max_len) max_len = n;
    }
    const long n_tasks = (long)D * KVH;
    /* Tiny steps are not worth waking the team. */
    if ((long)D * max_len * H * hd < 32768) num_threads = 1;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > n_tasks) num_threads = (int)n_tasks;
    int err = 0;
#pragma omp parallel num_threads(num_threads)
    {
        /* per thread: q rows [G, hd], accumulators [G, hd], one widened row [hd], scores [G, max_len] */
        const size_t n_floats = ((size_t)G * (2 * hd + max_len) + hd + 15) / 16 * 16;
        float *buf = (float *)aligned_alloc(64, sizeof(float) * n_floats);
        if (!buf) {
#pragma omp atomic write
            err = -2;
        } else {
            float *qf = buf, *acc = buf + (size_t)G * hd, *tmp = acc + (size_t)G * hd;
            float *sc = tmp + hd;
#pragma omp for schedule(dynamic, 2)
            for (long task = 0; task < n_tasks; task++) {
                const int s = (int)(task / KVH), kh = (int)(task % KVH);
                const int len = kv_lens[s];
                const int start = (window > 0 && len > window) ? len - window : 0;
                const int n = len - start;
                const int64_t *bt = block_tables + (long)s * bt_stride;
                char *o = out + ((long)s * o_s0 + (long)kh * G * o_s1) * esz;
                if (n <= 0) {
                    for (int g = 0; g < G; g++) memset(o + g * o_s1 * esz, 0, (size_t)(esz * hd));
                    continue;
                }
                /* The scale folds into q (the softcap divides the scaled score). */
                for (int g = 0; g < G; g++) {
                    const char *qs = q + ((long)s * q_s0 + (long)(kh * G + g) * q_s1) * esz;
                    float *qd = qf + (size_t)g * hd;
                    if (bf16) {
                        const uint16_t *qh = (const uint16_t *)qs;
#pragma omp simd
                        for (int d = 0; d < hd; d++) qd[d] = bf16_to_f32(qh[d]) * scale;
                    } else {
                        const float *qh = (const float *)qs;
#pragma omp simd
                        for (int d = 0; d < hd; d++) qd[d] = qh[d] * scale;
                    }
                }
                /* Scores: each K row is read once for all G heads. */
                for (int j = start; j < len;) {
                    const int off0 = j % block_size;
                    const int end = (len < j - off0 + block_size) ? len : j - off0 + block_size;
                    const char *kb = key_cache + (bt[j / block_size] * block_size * row + (long)kh * hd) * esz;
                    for (int off = off0; j < end; j++, off++) {
                        const float *kr = bf16 ? row_bf16((const uint16_t *)(kb + off * row * esz), tmp, hd)
                                               : (const float *)(kb + off * row * esz);
                        for (int g = 0; g < G; g++) {
                            const float *qd = qf + (size_t)g * hd;
                            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                            for (int d = 0; d < hd; d++) dot += qd[d] * kr[d];
                            sc[(size_t)g * max_len + (j - start)] = dot;
                        }
                    }
                }
                /* Softmax per head, unnormalized (the sum divides at the end). */
                float inv_sum[MAX_GROUP];
                for (int g = 0; g < G; g++) {
                    float *sg = sc + (size_t)g * max_len;
                    if (softcap > 0.0f) {
                        const float inv_cap = 1.0f / softcap;
                        for (int i = 0; i < n; i++) sg[i] = tanhf(sg[i] * inv_cap) * softcap;
                    }
                    float m = sg[0];
#pragma omp simd reduction(max : m)
                    for (int i = 0; i < n; i++) m = sg[i] > m ? sg[i] : m;
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int i = 0; i < n; i++) {
                        const float e = exp_neg(sg[i] - m);
                        sg[i] = e;
                        sum += e;
                    }
                    inv_sum[g] = 1.0f / sum;
                }
                /* Weighted sum of V rows, each read once for all G heads. */
                memset(acc, 0, sizeof(float) * (size_t)G * hd);
                for (int j = start; j < len;) {
                    const int off0 = j % block_size;
                    const int end = (len < j - off0 + block_size) ? len : j - off0 + block_size;
                    const char *vb = value_cache + (bt[j / block_size] * block_size * row + (long)kh * hd) * esz;
                    for (int off = off0; j < end; j++, off++) {
                        const float *vr = bf16 ? row_bf16((const uint16_t *)(vb + off * row * esz), tmp, hd)
                                               : (const float *)(vb + off * row * esz);
                        for (int g = 0; g < G; g++) {
                            const float p = sc[(size_t)g * max_len + (j - start)];
                            float *ag = acc + (size_t)g * hd;
#pragma omp simd
                            for (int d = 0; d < hd; d++) ag[d] += p * vr[d];
                        }
                    }
                }
                for (int g = 0; g < G; g++) {
                    const float *ag = acc + (size_t)g * hd;
                    const float mul = inv_sum[g];
                    if (bf16) {
                        uint16_t *od = (uint16_t *)o + g * o_s1;
                        for (int d = 0; d < hd; d++) od[d] = f32_to_bf16(ag[d] * mul);
                    } else {
                        float *od = (float *)o + g * o_s1;
#pragma omp simd
                        for (int d = 0; d < hd; d++) od[d] = ag[d] * mul;
                    }
                }
            }
            free(buf);
        }
    }
    return err;
}

#define ARGS                                                                                                  \
    const void *q, long q_s0, long q_s1, const void *key_cache, const void *value_cache,                     \
        const int64_t *block_tables, long bt_stride, const int32_t *kv_lens, void *out, long o_s0, long o_s1, \
        int D, int H, int KVH, \
        int hd, int block_size, int window, float scale, float softcap, int num_threads
#define PASS                                                                                                  \
    q, q_s0, q_s1, key_cache, value_cache, block_tables, bt_stride, kv_lens, out, o_s0, o_s1, D, H, KVH, hd, block_size,  \
        window, scale, softcap, num_threads

/* Common head dims get their own copy of the kernel, with the head-dim loops fully unrolled. */
#define SPECIALIZE(BF16)                                                                                      \
    switch (hd) {                                                                                             \
    case 64: { const int hd = 64; return paged_decode_attention(BF16, PASS); }                              \
    case 128: { const int hd = 128; return paged_decode_attention(BF16, PASS); }                            \
    default: return paged_decode_attention(BF16, PASS);                                                       \
    }

/* q, key/value caches and out hold float32. Returns 0, or < 0 on bad arguments or no memory. */
int paged_decode_attention_f32(ARGS) { SPECIALIZE(0) }

/* q, key/value caches and out hold bfloat16 (uint16 bit patterns). */
int paged_decode_attention_bf16(ARGS) { SPECIALIZE(1) }

/* The OpenMP runtime's default team size (a load-time sanity check). */
int paged_decode_attention_max_threads(void) { return omp_get_max_threads(); }
