/* A whole Llama decoder layer for a decode-only step (fp32 or bf16), in one call: the same kernels the fused Python
 * path calls one by one (hf_paged/execution/patches/fused_layers.py), in the same order, so the results are the same bits.
 *
 *   normed   = rms_norm(x)                          hf_rms_norm
 *   qkv      = normed @ [Wq; Wk; Wv]^T              linear
 *   q_rot    = rope(q); cache[slots] = rope(k), v   hf_rope_write_kv
 *   attn     = paged attention(q_rot)               paged_decode_attention_{f32,bf16}
 *   residual = x + attn @ Wo^T; normed = rms_norm(residual)   linear, hf_add_rms_norm
 *   act      = silu(gate) * up, [gate, up] = normed @ [Wg; Wu]^T   linear, hf_silu_mul
 *   out      = residual + act @ Wd^T                linear, then the add (rounded to bf16 in bf16)
 *
 * `linear` is hf_amx_linear (LINEAR_AMX, bf16 only) or hf_small_linear_{f32,bf16} (LINEAR_AVX512), as the
 * weights were packed. With int8 K/V (key_scales / value_scales not NULL) the cache write and the attention are
 * hf_rope, paged_write_kv_i8 and paged_decode_attention_{f32,bf16}_i8, as the fused Python path calls them.
 * What it saves is the Python between those calls, 5-10% of a decode step.
 * Tensors are contiguous rows of the layer's dtype; the caller checks shapes and how every weight is packed.
 */
#include <stdint.h>

#include "cpu_vec.h"

enum { LINEAR_AMX = 0, LINEAR_AVX512 = 1 };

int hf_amx_linear(const uint16_t *x, long x_stride, long M, const uint16_t *packed, const uint16_t *bias, long N,
                  long K, uint16_t *out, long out_stride, int num_threads);
int hf_small_linear_f32(const float *x, long x_stride, long M, const float *packed, const float *bias, long N,
                        long K, float *out, long out_stride, int num_threads);
int hf_small_linear_bf16(const uint16_t *x, long x_stride, long M, const uint16_t *packed, const uint16_t *bias,
                         long N, long K, uint16_t *out, long out_stride, int num_threads);
void hf_rms_norm(const char *x, long x_stride, const char *w, char *out, long out_stride, long rows, int dim,
                 float eps, int bf16);
void hf_add_rms_norm(const char *x, const char *a, const char *w, char *residual_out, char *out, long rows, int dim,
                     float eps, int bf16);
void hf_rope_write_kv(const char *q, long q_s0, long q_s1, int Hq, const char *k, long k_s0, long k_s1, int Hk,
                      const char *v, long v_s0, long v_s1, char *q_out, const char *cos, const char *sin,
                      const int64_t *slots, char *key_cache, char *value_cache, long T, int hd, int bf16);
void hf_silu_mul(const char *gate_up, long gu_stride, char *out, long out_stride, long rows, int inter, int bf16);
void hf_rope(const char *q, long q_s0, long q_s1, int Hq, const char *k, long k_s0, long k_s1, int Hk, char *q_out,
             char *k_out, const char *cos, const char *sin, long T, int hd, int bf16);
void paged_write_kv_i8(const char *k, long k_s0, long k_s1, const char *v, long v_s0, long v_s1,
                       const int64_t *slots, long T, int8_t *key_cache, int8_t *value_cache, float *key_scales,
                       float *value_scales, int KVH, int hd, int block_size, int bf16);
int paged_decode_attention_f32_i8(const void *q, long q_s0, long q_s1, const void *key_cache, const void *value_cache,
                                  const float *key_scales, const float *value_scales, const int64_t *block_tables,
                                  long bt_stride, const int32_t *kv_lens, void *out, long o_s0, long o_s1, int D,
                                  int H, int KVH, int hd, int block_size, int window, float scale, float softcap,
                                  int num_threads);
int paged_decode_attention_bf16_i8(const void *q, long q_s0, long q_s1, const void *key_cache, const void *value_cache,
                                   const float *key_scales, const float *value_scales, const int64_t *block_tables,
                                   long bt_stride, const int32_t *kv_lens, void *out, long o_s0, long o_s1, int D,
                                   int H, int KVH, int hd, int block_size, int window, float scale, float softcap,
                                   int num_threads);
int paged_decode_attention_f32(const void *q, long q_s0, long q_s1, const void *key_cache, const void *value_cache,
                               const int64_t *block_tables, long bt_stride, const int32_t *kv_lens, void *out,
                               long o_s0, long o_s1, int D, int H, int KVH, int hd, int block_size, int window,
                               float scale, float softcap, int num_threads);
int paged_decode_attention_bf16(const void *q, long q_s0, long q_s1, const void *key_cache, const void *value_cache,
                                const int64_t *block_tables, long bt_stride, const int32_t *kv_lens, void *out,
                                long o_s0, long o_s1, int D, int H, int KVH, int hd, int block_size, int window,
                                float scale, float softcap, int num_threads);

/* out [M, N] = x [M, K] @ W^T + bias, rows contiguous, with the kernel the weight was packed for. */
static int linear(int kind, int bf16, const char *x, long M, const char *packed, const char *bias, long N, long K,
                  char *out, int num_threads) {
    if (kind == LINEAR_AMX)
        return bf16 ? hf_amx_linear((const uint16_t *)x, K, M, (const uint16_t *)packed, (const uint16_t *)bias, N, K,
                                    (uint16_t *)out, N, num_threads)
                    : -1;
    if (bf16)
        return hf_small_linear_bf16((const uint16_t *)x, K, M, (const uint16_t *)packed, (const uint16_t *)bias, N,
                                    K, (uint16_t *)out, N, num_threads);
    return hf_small_linear_f32((const float *)x, K, M, (const float *)packed, (const float *)bias, N, K, (float *)out,
                               N, num_threads);
}

/* Elements of scratch space hf_llama_decode_layer needs for T tokens. */
long hf_llama_decode_layer_workspace(long T, int D, int H, int KVH, int hd, int I) {
    return T * (4L * D + (long)(H + 3 * KVH) * hd + 2L * H * hd + 3L * I); /* + the rotated K of int8 caches */
}

int hf_llama_decode_layer(const char *x, char *out, long T, int D, const char *norm1_w, float eps1,
                          const char *norm2_w, float eps2, const char *qkv_w, const char *qkv_b, int H, int KVH,
                          int hd, const char *o_w, const char *o_b, const char *gate_up_w, const char *gate_up_b,
                          int I, const char *down_w, const char *down_b, const char *cos, const char *sin,
                          const int64_t *slots, char *key_cache, char *value_cache, float *key_scales,
                          float *value_scales, const int64_t *block_tables,
                          long bt_stride, const int32_t *kv_lens, int block_size, float scale, char *work,
                          int linear_kind, int bf16, int num_threads) {
    const long es = bf16 ? 2 : 4, nqkv = (long)(H + 2 * KVH) * hd, nq = (long)H * hd;
    char *normed = work, *qkv = normed + T * D * es, *q_rot = qkv + T * nqkv * es, *attn = q_rot + T * nq * es,
         *o = attn + T * nq * es, *residual = o + T * D * es, *gate_up = residual + T * D * es,
         *act = gate_up + T * 2L * I * es, *down = act + T * I * es;
    int rc;
    hf_rms_norm(x, D, norm1_w, normed, D, T, D, eps1, bf16);
    if ((rc = linear(linear_kind, bf16, normed, T, qkv_w, qkv_b, nqkv, D, qkv, num_threads))) return rc;
    const char *v = qkv + (nq + (long)KVH * hd) * es;
    if (key_scales) {
        char *k_rot = down + T * D * es;
        hf_rope(qkv, nqkv, hd, H, qkv + nq * es, nqkv, hd, KVH, q_rot, k_rot, cos, sin, T, hd, bf16);
        paged_write_kv_i8(k_rot, (long)KVH * hd, hd, v, nqkv, hd, slots, T, (int8_t *)key_cache, (int8_t *)value_cache,
                          key_scales, value_scales, KVH, hd, block_size, bf16);
        rc = (bf16 ? paged_decode_attention_bf16_i8 : paged_decode_attention_f32_i8)(
            q_rot, nq, hd, key_cache, value_cache, key_scales, value_scales, block_tables, bt_stride, kv_lens, attn, nq,
            hd, (int)T, H, KVH, hd, block_size, 0, scale, 0.0f, num_threads);
    } else {
        hf_rope_write_kv(qkv, nqkv, hd, H, qkv + nq * es, nqkv, hd, KVH, v, nqkv, hd, q_rot, cos, sin, slots, key_cache,
                         value_cache, T, hd, bf16);
        rc = (bf16 ? paged_decode_attention_bf16 : paged_decode_attention_f32)(
            q_rot, nq, hd, key_cache, value_cache, block_tables, bt_stride, kv_lens, attn, nq, hd, (int)T, H, KVH, hd,
            block_size, 0, scale, 0.0f, num_threads);
    }
    if (rc) return rc;
    if ((rc = linear(linear_kind, bf16, attn, T, o_w, o_b, D, nq, o, num_threads))) return rc;
    hf_add_rms_norm(x, o, norm2_w, residual, normed, T, D, eps2, bf16);
    if ((rc = linear(linear_kind, bf16, normed, T, gate_up_w, gate_up_b, 2L * I, D, gate_up, num_threads))) return rc;
    hf_silu_mul(gate_up, 2L * I, act, I, T, I, bf16);
    if ((rc = linear(linear_kind, bf16, act, T, down_w, down_b, D, I, down, num_threads))) return rc;
    const long n = T * D;
    long i = 0;
    for (; i + VL <= n; i += VL)
        store_vec(bf16, out + i * es, load_vec(bf16, residual + i * es) + load_vec(bf16, down + i * es));
    for (; i < n; i++) {
        const float sum = load_scalar(bf16, residual, i) + load_scalar(bf16, down, i);
        if (bf16)
            ((uint16_t *)out)[i] = f32_to_bf16(sum);
        else
            ((float *)out)[i] = sum;
    }
    return 0;
}
